/**
 * The repository's import graph, read from the source text: which `.ts` file names which, and
 * which folder names which. `imports_test.ts` checks it for cycles and for the layering rules.
 *
 * An edge is any module specifier a file names: `import … from`, `import type … from`,
 * `export … from`, a side-effect `import "…"`, a dynamic `import("…")` with a string literal
 * (`typeof import("…")` too) and a Worker or backend entry `new URL("…", import.meta.url)`.
 * Type-only edges count: the rule is no cycles between files, not between emitted modules.
 *
 * @module
 */

import { dirname, join, relative, resolve } from "node:path";

/** One specifier in one file. */
export interface ImportEdge {
  /** The importing file, relative to the repository root, with `/` separators. */
  readonly from: string;
  /** The imported file, relative to the repository root. */
  readonly to: string;
  /** 1-based line of the specifier. */
  readonly line: number;
  /** How the file names it. */
  readonly kind: "import" | "export" | "dynamic" | "url";
}

/** The files read and the edges between them. */
export interface ImportGraph {
  readonly files: readonly string[];
  readonly edges: readonly ImportEdge[];
}

type Token =
  | { readonly type: "word"; readonly text: string; readonly line: number }
  | { readonly type: "punct"; readonly text: string; readonly line: number }
  | { readonly type: "string"; readonly text: string; readonly line: number }
  | { readonly type: "template"; readonly text: string; readonly line: number };

const WORD_START = /[A-Za-z_$]/;
const WORD_PART = /[A-Za-z0-9_$]/;
/** Keywords after which a `/` starts a regular expression, not a division. */
const REGEX_AFTER_WORD = new Set([
  "return",
  "typeof",
  "instanceof",
  "in",
  "of",
  "new",
  "delete",
  "void",
  "throw",
  "case",
  "do",
  "else",
  "yield",
  "await",
]);

/**
 * The tokens of TypeScript source that matter to module specifiers: words, punctuation and string
 * literals, with comments, regular expressions and template bodies skipped so that text inside them
 * never reads as an import.
 *
 * @param source a file's text
 * @returns its tokens in order
 */
export function tokenize(source: string): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  let line = 1;
  // Brace depth at which each open template's `${` started: `}` at that depth resumes the template.
  const templateStack: number[] = [];
  let braceDepth = 0;

  const regexAllowed = (): boolean => {
    const last = tokens[tokens.length - 1];
    if (last === undefined) return true;
    if (last.type === "word") return REGEX_AFTER_WORD.has(last.text);
    if (last.type === "punct") {
      return !(last.text === ")" || last.text === "]" || last.text === "}");
    }
    return false;
  };

  const readTemplate = (): void => {
    // At a template's text: runs to the closing backtick or to `${`.
    const startLine = line;
    while (i < source.length) {
      const c = source[i]!;
      if (c === "\\") {
        i += 2;
        continue;
      }
      if (c === "\n") line++;
      if (c === "`") {
        i++;
        tokens.push({ type: "template", text: "", line: startLine });
        return;
      }
      if (c === "$" && source[i + 1] === "{") {
        i += 2;
        templateStack.push(braceDepth);
        braceDepth++;
        tokens.push({ type: "punct", text: "(", line: startLine });
        return;
      }
      i++;
    }
  };

  while (i < source.length) {
    const c = source[i]!;
    if (c === "\n") {
      line++;
      i++;
      continue;
    }
    if (c === " " || c === "\t" || c === "\r") {
      i++;
      continue;
    }
    if (c === "/" && source[i + 1] === "/") {
      while (i < source.length && source[i] !== "\n") i++;
      continue;
    }
    if (c === "/" && source[i + 1] === "*") {
      const end = source.indexOf("*/", i + 2);
      const stop = end < 0 ? source.length : end + 2;
      for (let k = i; k < stop; k++) if (source[k] === "\n") line++;
      i = stop;
      continue;
    }
    if (c === '"' || c === "'") {
      const startLine = line;
      let text = "";
      i++;
      while (i < source.length && source[i] !== c) {
        if (source[i] === "\\") {
          text += source[i + 1] ?? "";
          i += 2;
          continue;
        }
        if (source[i] === "\n") line++;
        text += source[i];
        i++;
      }
      i++;
      tokens.push({ type: "string", text, line: startLine });
      continue;
    }
    if (c === "`") {
      i++;
      readTemplate();
      continue;
    }
    if (c === "/" && regexAllowed()) {
      i++;
      let inClass = false;
      while (i < source.length && source[i] !== "\n") {
        const r = source[i]!;
        if (r === "\\") {
          i += 2;
          continue;
        }
        if (r === "[") inClass = true;
        else if (r === "]") inClass = false;
        else if (r === "/" && !inClass) break;
        i++;
      }
      i++;
      while (i < source.length && WORD_PART.test(source[i]!)) i++;
      tokens.push({ type: "string", text: "", line });
      continue;
    }
    if (WORD_START.test(c)) {
      let end = i + 1;
      while (end < source.length && WORD_PART.test(source[end]!)) end++;
      tokens.push({ type: "word", text: source.slice(i, end), line });
      i = end;
      continue;
    }
    if (c === "{") braceDepth++;
    if (c === "}") {
      braceDepth--;
      if (templateStack.length > 0 && templateStack[templateStack.length - 1] === braceDepth) {
        templateStack.pop();
        i++;
        tokens.push({ type: "punct", text: ")", line });
        readTemplate();
        continue;
      }
    }
    tokens.push({ type: "punct", text: c, line });
    i++;
  }
  return tokens;
}

/** A specifier as written, before resolution. */
export interface Specifier {
  readonly specifier: string;
  readonly line: number;
  readonly kind: ImportEdge["kind"];
}

/**
 * The module specifiers a file names, in source order.
 *
 * @param source a file's text
 * @returns every specifier written as a string literal in an import position
 */
export function specifiers(source: string): Specifier[] {
  const tokens = tokenize(source);
  const found: Specifier[] = [];
  const at = (k: number) => tokens[k];
  const is = (k: number, type: Token["type"], text?: string): boolean => {
    const t = at(k);
    return t !== undefined && t.type === type && (text === undefined || t.text === text);
  };
  // Scans a declaration's clause up to `from "…"`, stopping at `;` or at a token that ends it.
  const fromClause = (k: number): number => {
    let depth = 0;
    for (let j = k; j < tokens.length; j++) {
      const t = tokens[j]!;
      if (t.type === "punct") {
        if (t.text === "{") depth++;
        else if (t.text === "}") depth--;
        else if (t.text === ";" && depth === 0) return -1;
      }
      if (depth === 0 && t.type === "word" && t.text === "from" && is(j + 1, "string")) {
        return j + 1;
      }
      if (depth === 0 && t.type === "string") return -1;
    }
    return -1;
  };
  for (let k = 0; k < tokens.length; k++) {
    const t = tokens[k]!;
    if (t.type !== "word") continue;
    const afterDot = is(k - 1, "punct", ".");
    if (afterDot) continue;
    if (t.text === "import") {
      if (is(k + 1, "punct", "(")) {
        const s = at(k + 2);
        if (s?.type === "string" && (is(k + 3, "punct", ")") || is(k + 3, "punct", ","))) {
          found.push({ specifier: s.text, line: s.line, kind: "dynamic" });
        }
        continue;
      }
      if (is(k + 1, "punct", ".")) continue; // import.meta
      if (is(k + 1, "string")) {
        found.push({ specifier: at(k + 1)!.text, line: at(k + 1)!.line, kind: "import" });
        continue;
      }
      const s = fromClause(k + 1);
      if (s >= 0) found.push({ specifier: tokens[s]!.text, line: tokens[s]!.line, kind: "import" });
      continue;
    }
    if (t.text === "export") {
      let j = k + 1;
      if (is(j, "word", "type")) j++;
      if (is(j, "punct", "{") || is(j, "punct", "*")) {
        const s = fromClause(j);
        if (s >= 0) {
          found.push({ specifier: tokens[s]!.text, line: tokens[s]!.line, kind: "export" });
        }
      }
      continue;
    }
    if (
      t.text === "new" && is(k + 1, "word", "URL") && is(k + 2, "punct", "(") &&
      is(k + 3, "string") && is(k + 4, "punct", ",") && is(k + 5, "word", "import") &&
      is(k + 6, "punct", ".") && is(k + 7, "word", "meta") && is(k + 8, "punct", ".") &&
      is(k + 9, "word", "url")
    ) {
      found.push({ specifier: at(k + 3)!.text, line: at(k + 3)!.line, kind: "url" });
    }
  }
  return found;
}

async function walk(root: string, dir: string, out: string[]): Promise<void> {
  for await (const entry of Deno.readDir(join(root, dir))) {
    const path = dir === "" ? entry.name : `${dir}/${entry.name}`;
    if (entry.isDirectory) await walk(root, path, out);
    else if (entry.isFile && entry.name.endsWith(".ts")) out.push(path);
  }
}

/**
 * Reads the import graph of the given roots (folders and files, relative to `root`).
 * Specifiers that are not relative (`node:`, `npm:`, `jsr:`) name no file of the repository and
 * make no edge; a relative specifier that names no file of the repository throws.
 *
 * @param root the repository's root directory
 * @param roots the folders and files to read, as `["src", "formats", "mod.ts"]`
 * @returns every file read (sorted) and every edge between repository files
 * @throws {Error} when a relative specifier resolves to a missing file
 */
export async function readImportGraph(
  root: string,
  roots: readonly string[],
): Promise<ImportGraph> {
  const files: string[] = [];
  for (const r of roots) {
    const stat = await Deno.stat(join(root, r));
    if (stat.isDirectory) await walk(root, r, files);
    else files.push(r);
  }
  files.sort();
  const edges: ImportEdge[] = [];
  for (const from of files) {
    const source = await Deno.readTextFile(join(root, from));
    for (const s of specifiers(source)) {
      if (!s.specifier.startsWith("./") && !s.specifier.startsWith("../")) continue;
      const absolute = resolve(root, dirname(from), s.specifier);
      const to = relative(root, absolute).split("\\").join("/");
      if (to === from) continue; // `new URL(import.meta.url)`-style self references
      try {
        await Deno.stat(absolute);
      } catch {
        throw new Error(`${from}:${s.line}: "${s.specifier}" names no file`);
      }
      edges.push({ from, to, line: s.line, kind: s.kind });
    }
  }
  return { files, edges };
}

/** The folder a file lives in: `src/cli/qemu_io/read.ts` → `src/cli/qemu_io`, `mod.ts` → `.`. */
export function folderOf(file: string): string {
  const slash = file.lastIndexOf("/");
  return slash < 0 ? "." : file.slice(0, slash);
}

/**
 * The cycles of a directed graph: for every edge inside a strongly connected component, the
 * shortest cycle through it, each listed once (rotated to start at its smallest node). Together
 * they name every edge that takes part in some cycle.
 *
 * @param nodes the graph's nodes
 * @param edges pairs `[from, to]`
 * @returns cycles as node lists whose last element repeats the first
 */
export function findCycles(
  nodes: readonly string[],
  edges: readonly (readonly [string, string])[],
): string[][] {
  const next = new Map<string, Set<string>>();
  for (const n of nodes) next.set(n, new Set());
  for (const [a, b] of edges) {
    if (!next.has(a)) next.set(a, new Set());
    if (!next.has(b)) next.set(b, new Set());
    next.get(a)!.add(b);
  }
  const component = stronglyConnected(next);
  const cycles = new Map<string, string[]>();
  for (const [a, targets] of next) {
    for (const b of targets) {
      if (component.get(a) !== component.get(b)) continue;
      const path = shortestPath(next, b, a, component);
      if (path === undefined) continue;
      const cycle = [a, ...path.slice(0, -1)];
      let start = 0;
      for (let k = 1; k < cycle.length; k++) if (cycle[k]! < cycle[start]!) start = k;
      const rotated = [...cycle.slice(start), ...cycle.slice(0, start)];
      rotated.push(rotated[0]!);
      cycles.set(rotated.join("\0"), rotated);
    }
  }
  return [...cycles.values()].sort((x, y) => x.join(" ").localeCompare(y.join(" ")));
}

function stronglyConnected(next: Map<string, Set<string>>): Map<string, number> {
  // Tarjan's algorithm, iterative so deep chains cannot overflow the stack.
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const onStack = new Set<string>();
  const stack: string[] = [];
  const component = new Map<string, number>();
  let counter = 0;
  let components = 0;
  for (const start of next.keys()) {
    if (index.has(start)) continue;
    const work: { node: string; targets: Iterator<string> }[] = [];
    const enter = (n: string) => {
      index.set(n, counter);
      low.set(n, counter);
      counter++;
      stack.push(n);
      onStack.add(n);
      work.push({ node: n, targets: next.get(n)!.values() });
    };
    enter(start);
    while (work.length > 0) {
      const frame = work[work.length - 1]!;
      const step = frame.targets.next();
      if (!step.done) {
        const m = step.value;
        if (!index.has(m)) enter(m);
        else if (onStack.has(m)) low.set(frame.node, Math.min(low.get(frame.node)!, index.get(m)!));
        continue;
      }
      work.pop();
      const parent = work[work.length - 1];
      if (parent !== undefined) {
        low.set(parent.node, Math.min(low.get(parent.node)!, low.get(frame.node)!));
      }
      if (low.get(frame.node) === index.get(frame.node)) {
        let m: string;
        do {
          m = stack.pop()!;
          onStack.delete(m);
          component.set(m, components);
        } while (m !== frame.node);
        components++;
      }
    }
  }
  return component;
}

function shortestPath(
  next: Map<string, Set<string>>,
  from: string,
  to: string,
  component: Map<string, number>,
): string[] | undefined {
  const previous = new Map<string, string | null>([[from, null]]);
  const queue = [from];
  for (let q = 0; q < queue.length; q++) {
    const n = queue[q]!;
    if (n === to) {
      const path: string[] = [];
      for (let m: string | null = n; m !== null; m = previous.get(m)!) path.push(m);
      return path.reverse();
    }
    for (const m of next.get(n)!) {
      if (previous.has(m) || component.get(m) !== component.get(from)) continue;
      previous.set(m, n);
      queue.push(m);
    }
  }
  return undefined;
}
