/**
 * One concern per file (#14): no source file of `src/`, `formats/` or `mod.ts` grows past
 * {@linkcode MAX_LINES} lines. A file that does holds more than one concern: split it where they
 * meet (as `formats/qcow2/check*.ts` and `bitmap*.ts` are) instead of raising the limit. Tests are
 * exempt.
 *
 * @module
 */

import assert from "node:assert/strict";
import { join, resolve } from "node:path";

const ROOT = resolve(import.meta.dirname!, "../..");
const ROOTS = ["src", "formats", "mod.ts"];
/** Most lines one source file may have. */
const MAX_LINES = 1000;

/** Every `.ts` file under `root` (a folder or a file), relative to the repository root. */
async function sourceFiles(root: string): Promise<string[]> {
  const path = join(ROOT, root);
  const info = await Deno.stat(path);
  if (info.isFile) return root.endsWith(".ts") ? [root] : [];
  const out: string[] = [];
  for await (const entry of Deno.readDir(path)) {
    const child = `${root}/${entry.name}`;
    if (entry.isDirectory) out.push(...await sourceFiles(child));
    else if (entry.isFile && entry.name.endsWith(".ts")) out.push(child);
  }
  return out;
}

/** Lines of `text` as an editor counts them: a final newline ends the last line, it starts none. */
function lineCount(text: string): number {
  if (text === "") return 0;
  const newlines = text.split("\n").length - 1;
  return text.endsWith("\n") ? newlines : newlines + 1;
}

/** `path: N lines` for every file over `max` lines, longest first. */
function oversized(files: ReadonlyMap<string, string>, max: number): string[] {
  return [...files]
    .map(([path, text]) => [path, lineCount(text)] as const)
    .filter(([, lines]) => lines > max)
    .sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))
    .map(([path, lines]) => `${path}: ${lines} lines`);
}

/** Test files (`*_test.ts`, `*_bench.ts`) are exempt; they are not under these roots anyway. */
function isTest(path: string): boolean {
  return /_(test|bench)\.ts$/.test(path) || path.split("/").includes("tests");
}

Deno.test(`no source file of src/, formats/ or mod.ts exceeds ${MAX_LINES} lines`, async () => {
  const files = new Map<string, string>();
  for (const root of ROOTS) {
    for (const file of await sourceFiles(root)) {
      if (isTest(file)) continue;
      files.set(file, await Deno.readTextFile(join(ROOT, file)));
    }
  }
  assert.ok(files.has("mod.ts") && files.has("formats/qcow2/qcow2.ts"), "the walk found the tree");
  const over = oversized(files, MAX_LINES);
  assert.deepEqual(
    over,
    [],
    `files over ${MAX_LINES} lines (split them by concern):\n${over.join("\n")}`,
  );
});

Deno.test("oversized files are listed with their line counts, longest first", () => {
  const files = new Map([
    ["a.ts", "x\n".repeat(3)],
    ["b.ts", "x\n".repeat(5)],
    ["c.ts", "x\n".repeat(2) + "x"],
    ["d.ts", "x\n".repeat(2)],
  ]);
  assert.deepEqual(oversized(files, 2), ["b.ts: 5 lines", "a.ts: 3 lines", "c.ts: 3 lines"]);
  assert.equal(lineCount(""), 0);
  assert.ok(isTest("src/x_test.ts") && isTest("tests/formats/x.ts") && !isTest("src/x.ts"));
});
