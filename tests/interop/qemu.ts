/**
 * Finding QEMU's tools for interop tests. Without them the tests are skipped, unless
 * VSTOR_REQUIRE_QEMU=1 (as CI sets), when their absence fails the run.
 *
 * @module
 */

function have(tool: string): boolean {
  try {
    return new Deno.Command(tool, { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

/** True when the interop tests must run. */
export const requireQemu = Deno.env.get("VSTOR_REQUIRE_QEMU") === "1";

/** Whether `tool` is missing and tests needing it should be ignored. Throws under VSTOR_REQUIRE_QEMU=1. */
export function ignoreWithout(tool: "qemu-img" | "qemu-io"): boolean {
  if (have(tool)) return false;
  if (requireQemu) throw new Error(`VSTOR_REQUIRE_QEMU=1 but ${tool} is not installed`);
  return true;
}

/** Result of running a QEMU tool. */
export interface ToolResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a tool to completion and capture its output. */
export async function runTool(tool: string, args: string[], stdin?: string): Promise<ToolResult> {
  const child = new Deno.Command(tool, {
    args,
    stdin: stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (stdin !== undefined) {
    const w = child.stdin.getWriter();
    await w.write(new TextEncoder().encode(stdin));
    await w.close();
  }
  const out = await child.output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}
