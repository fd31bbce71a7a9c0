/**
 * Running one command line on each side: QEMU's tool as a child process, vstor in-process (its
 * CLI's `main`, as `deno run -A mod.ts VERB` would), both in a given directory.
 *
 * @module
 */
import { main } from "../../../src/cli/main.ts";
import { type CommandLine, inDir } from "./case.ts";

/** What one side did with a command. */
export interface Outcome {
  /** Exit code; -1 when vstor threw instead of returning one, -2 when QEMU's tool was killed. */
  code: number;
  /** stdout and stderr, interleaved as far as the tool allows. */
  output: string;
}

/** How long a QEMU tool may run before it is killed (a hang is reported, not waited out). */
export const QEMU_TIMEOUT_MS = 60_000;

/** Run QEMU's tool in `cwd`; killed after {@linkcode QEMU_TIMEOUT_MS} (code -2). */
export async function runQemu(line: CommandLine, cwd: string): Promise<Outcome> {
  const child = new Deno.Command(line.tool, {
    args: line.args,
    cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill("SIGKILL");
  }, QEMU_TIMEOUT_MS);
  try {
    const out = await child.output();
    const dec = new TextDecoder();
    const output = dec.decode(out.stdout) + dec.decode(out.stderr);
    if (timedOut) return { code: -2, output: `${output}killed after ${QEMU_TIMEOUT_MS} ms` };
    return { code: out.code, output };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Run the vstor verb for `line` in-process, as `deno run -A mod.ts VERB` would. The working
 * directory is left alone (other test files in this process may rely on it): image arguments are
 * absolute paths. An exception escaping the CLI is an outcome of its own (code -1).
 */
export async function runVstor(line: CommandLine): Promise<Outcome> {
  const args = line.tool === "qemu-io" ? ["io", ...line.args] : line.args;
  let output = "";
  try {
    const code = await main(args, { stdout: (s) => output += s, stderr: (s) => output += s });
    return { code, output };
  } catch (e) {
    return { code: -1, output: `${output}uncaught: ${e instanceof Error ? e.stack : String(e)}` };
  }
}

/**
 * Run `line` on both sides at once (QEMU's child runs while vstor works in-process), each with
 * its image paths in its own directory; QEMU's tool runs in `neutral`, neither copy's directory.
 */
export async function runBoth(
  line: CommandLine,
  dirs: { q: string; v: string; root: string },
): Promise<{ qemu: Outcome; vstor: Outcome }> {
  const qemu = runQemu(inDir(line, dirs.q), dirs.root);
  const vstor = await runVstor(inDir(line, dirs.v));
  return { qemu: await qemu, vstor };
}

/** The requests of a qemu-io session that failed, by verb, in order ("write", "discard", ...). */
export function failedRequests(output: string): string[] {
  return [...output.matchAll(/^(\w+) failed: /gm)].map((m) => m[1]!);
}
