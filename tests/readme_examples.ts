/**
 * The README's shell examples as data, and how their output is compared (`readme_test.ts` runs
 * them). The rules, all of them:
 *
 * - An example is a line of a ```sh block. Commands quoted inline in prose (the Speed section's
 *   benches, `tests/iotests/run.sh`, the fuzzer, `deno task …`) are not examples.
 * - In a block with `$ ` lines (a transcript), a line starting with `$ ` is a command, continued on
 *   the next lines while it ends with `\`; the lines after it, up to the next `$ `, are its expected
 *   output (stdout and stderr together, as a terminal shows them). A command shown without output
 *   may print anything: only its exit code is checked.
 * - Expected output compares line by line and exactly, except: a line that is only `…` matches any
 *   number of lines (none included); `…` inside a line matches any text; a date and time
 *   (`2026-11-25 16:24:53`) matches any date and time.
 * - Every command must exit 0, unless its expected output ends with a line `[exit N]`: then it
 *   must exit N (that line is not part of the output).
 * - A block without `$ ` lines is a script: each line (with `\` continuations) is a command that
 *   must exit 0; its output is not compared. A block starting with `#!` shows a file instead: the
 *   file named by the last `code span` before the block, in the session's current directory, must
 *   hold exactly that text.
 * - `vstor` stands for `deno run -A <clone>/mod.ts` (a shell function), `/path/to/vstor` for the
 *   clone, `~` for a fresh home directory inside the session's temporary directory.
 * - Examples matching {@link SKIPS} are not run (each skip is listed in the test's output, and a
 *   skip rule that matches nothing fails the test, so the list stays true).
 *
 * @module
 */

/** One example: a command (or a file check) at a line of README.md. */
export interface Example {
  /** 1-based line of README.md where the command starts. */
  line: number;
  /** "command": run it in the session; "file": the session's file `file` must hold `text`. */
  kind: "command" | "file";
  /** The command as written (continuation lines joined with their newlines), or the file's text. */
  text: string;
  /** Expected output lines; `null` when the README shows none (not compared). */
  expected: string[] | null;
  /** Expected exit code. */
  exit: number;
  /** For "file": the file's name. */
  file?: string;
}

/** Examples not run, each with why: they install things or run for minutes. */
export const SKIPS: { pattern: RegExp; reason: string }[] = [
  {
    pattern: /^npx -y deno@/,
    reason: "installs Deno from the npm registry (network); `vstor run` below runs the same job",
  },
  {
    pattern: /^\.ci\/run$/,
    reason: "runs the whole check and test suite (minutes; includes this)",
  },
  {
    pattern: /^vstor serve /,
    reason: "starts a daemon that runs until SIGTERM (tests/serve/ and the real-guest test run it)",
  },
  {
    pattern: /^qemu-system-x86_64 /,
    reason: "boots a VM (tests/interop/vhost_user_guest_test.ts does, with the guest recipe)",
  },
  {
    pattern: /tests\/stress_suite\.sh /,
    reason: "runs the test suite many times beside CPU hogs (tens of minutes; includes this)",
  },
];

const FENCE_OPEN = /^```sh\s*$/;
const FENCE_CLOSE = /^```\s*$/;
const EXIT_LINE = /^\[exit (\d+)\]$/;

/** Every example of `markdown` in order. */
export function extractExamples(markdown: string): Example[] {
  const lines = markdown.split("\n");
  const examples: Example[] = [];
  let i = 0;
  while (i < lines.length) {
    if (!FENCE_OPEN.test(lines[i]!)) {
      i++;
      continue;
    }
    const start = i + 1;
    let end = start;
    while (end < lines.length && !FENCE_CLOSE.test(lines[end]!)) end++;
    if (end === lines.length) throw new Error(`README.md:${i + 1}: unclosed \`\`\`sh block`);
    const body = lines.slice(start, end);
    if (body.some((l) => l.startsWith("$ "))) examples.push(...transcript(body, start));
    else if (body[0]?.startsWith("#!")) {
      const file = lastCodeSpan(lines.slice(0, i));
      if (file === undefined) throw new Error(`README.md:${i + 1}: no \`file\` names this block`);
      examples.push({
        line: start + 1,
        kind: "file",
        text: body.join("\n") + "\n",
        expected: null,
        exit: 0,
        file,
      });
    } else examples.push(...script(body, start));
    i = end + 1;
  }
  return examples;
}

/** The commands of a `$ ` block; `first` is the 0-based index of its first line. */
function transcript(body: string[], first: number): Example[] {
  const out: Example[] = [];
  let j = 0;
  while (j < body.length && !body[j]!.startsWith("$ ")) {
    if (body[j]!.trim() !== "") {
      throw new Error(`README.md:${first + j + 1}: output before the block's first \`$ \``);
    }
    j++;
  }
  while (j < body.length) {
    const line = first + j + 1;
    const cmd = [body[j]!.slice(2)];
    while (cmd.at(-1)!.endsWith("\\") && j + 1 < body.length) cmd.push(body[++j]!);
    j++;
    const output: string[] = [];
    while (j < body.length && !body[j]!.startsWith("$ ")) output.push(body[j++]!);
    let exit = 0;
    const last = output.at(-1)?.match(EXIT_LINE);
    if (last) {
      exit = Number(last[1]);
      output.pop();
    }
    out.push({
      line,
      kind: "command",
      text: cmd.join("\n"),
      expected: output.length > 0 ? output : null,
      exit,
    });
  }
  return out;
}

/** The commands of a block without `$ `: one per line, `\` continuations joined. */
function script(body: string[], first: number): Example[] {
  const out: Example[] = [];
  for (let j = 0; j < body.length; j++) {
    if (body[j]!.trim() === "") continue;
    const line = first + j + 1;
    const cmd = [body[j]!];
    while (cmd.at(-1)!.endsWith("\\") && j + 1 < body.length) cmd.push(body[++j]!);
    out.push({ line, kind: "command", text: cmd.join("\n"), expected: null, exit: 0 });
  }
  return out;
}

/** The last `code span` in the last non-empty paragraph of `lines`. */
function lastCodeSpan(lines: string[]): string | undefined {
  let k = lines.length - 1;
  while (k >= 0 && lines[k]!.trim() === "") k--;
  const para: string[] = [];
  while (k >= 0 && lines[k]!.trim() !== "") para.unshift(lines[k--]!);
  const spans = [...para.join(" ").matchAll(/`([^`]+)`/g)];
  return spans.at(-1)?.[1];
}

/** Why `example` is skipped, or undefined when it runs. */
export function skipReason(example: Example): string | undefined {
  return SKIPS.find((s) => s.pattern.test(example.text))?.reason;
}

const DATE_TIME = /\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g;

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** A regular expression for one expected line (`…` any text, a date and time any date and time). */
function lineRegExp(expected: string): RegExp {
  const parts = expected.split("…").map((part) =>
    part.split(DATE_TIME).map(escape).join("\\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d:\\d\\d")
  );
  return new RegExp(`^${parts.join(".*")}$`);
}

/**
 * Whether `actual` (the output's lines) matches `expected` by the rules above.
 *
 * @returns true when it matches
 */
export function outputMatches(expected: string[], actual: string[]): boolean {
  const res = expected.map((e) => e === "…" ? null : lineRegExp(e));
  const memo = new Map<string, boolean>();
  const go = (e: number, a: number): boolean => {
    const key = `${e},${a}`;
    const known = memo.get(key);
    if (known !== undefined) return known;
    let ok: boolean;
    if (e === res.length) ok = a === actual.length;
    else if (res[e] === null) ok = go(e + 1, a) || (a < actual.length && go(e, a + 1));
    else ok = a < actual.length && res[e]!.test(actual[a]!) && go(e + 1, a + 1);
    memo.set(key, ok);
    return ok;
  };
  return go(0, 0);
}
