/**
 * Where things are in a job or machine file: the line of every member and element of a JSON text,
 * or of every section and key of an fio INI file, by the path errors use, so they can say
 * `jobs.json:7: jobs[1].bs: …`.
 *
 * @module
 */

/**
 * The 1-based line of every member key and array element of `text`, keyed by its path as
 * `formatPath` writes it (`jobs[1].bs`, `devices[0].drive.file`); the root is `""`. Returns an
 * empty map for text that is not JSON (the caller's parser reports that).
 *
 * @example
 * ```ts
 * import { jsonLines } from "./file_lines.ts";
 * const lines = jsonLines('{\n  "jobs": [\n    { "bs": "4q" }\n  ]\n}');
 * if (lines.get("jobs[0].bs") !== 3) throw new Error("wrong line");
 * ```
 */
export function jsonLines(text: string): Map<string, number> {
  const out = new Map<string, number>();
  let at = 0;
  let line = 1;
  const MAX_DEPTH = 256;
  const space = () => {
    while (at < text.length) {
      const c = text[at]!;
      if (c === "\n") line++;
      else if (c !== " " && c !== "\t" && c !== "\r") break;
      at++;
    }
  };
  const fail = (): never => {
    throw new SyntaxError("not JSON");
  };
  const string = (): string => {
    if (text[at] !== '"') fail();
    const start = at++;
    while (at < text.length && text[at] !== '"') {
      if (text[at] === "\\") at++;
      else if (text[at] === "\n") fail();
      at++;
    }
    if (at >= text.length) fail();
    at++;
    return JSON.parse(text.slice(start, at)) as string;
  };
  const value = (path: string, depth: number): void => {
    if (depth > MAX_DEPTH) fail();
    space();
    const c = text[at];
    if (c === "{") {
      at++;
      space();
      if (text[at] === "}") {
        at++;
        return;
      }
      for (;;) {
        space();
        const keyLine = line;
        const key = string();
        const child = path === "" ? key : `${path}.${key}`;
        out.set(child, keyLine);
        space();
        if (text[at] !== ":") fail();
        at++;
        value(child, depth + 1);
        space();
        if (text[at] === ",") {
          at++;
          continue;
        }
        if (text[at] === "}") {
          at++;
          return;
        }
        fail();
      }
    }
    if (c === "[") {
      at++;
      space();
      if (text[at] === "]") {
        at++;
        return;
      }
      for (let i = 0;; i++) {
        space();
        const child = `${path}[${i}]`;
        out.set(child, line);
        value(child, depth + 1);
        space();
        if (text[at] === ",") {
          at++;
          continue;
        }
        if (text[at] === "]") {
          at++;
          return;
        }
        fail();
      }
    }
    if (c === '"') {
      string();
      return;
    }
    const m = /^(?:-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)/.exec(text.slice(at, at + 64));
    if (m === null) fail();
    at += m![0].length;
  };
  try {
    out.set("", 1);
    value("", 0);
    return out;
  } catch {
    return new Map();
  }
}

/**
 * The line of `path` in `lines`, or of its nearest ancestor that has one (a missing field is
 * reported where its object starts).
 */
export function lineOf(lines: ReadonlyMap<string, number>, path: string): number | undefined {
  for (let p = path; p !== ""; p = p.replace(/(\.[^.[\]]*|\[\d+\])$/, "")) {
    const line = lines.get(p);
    if (line !== undefined) return line;
    if (!/(\.[^.[\]]*|\[\d+\])$/.test(p)) break;
  }
  return lines.get(path.split(/[.[]/)[0] ?? "") ?? lines.get("");
}

/**
 * The 1-based line of every section (`[name]`) and key (`[name].key`) of an fio INI job file, as
 * the job parser names them (a job's options inherited from `[global]` are found under it too).
 */
export function iniLines(text: string): Map<string, number> {
  const out = new Map<string, number>();
  let section = "";
  text.split(/\r?\n/).forEach((raw, n) => {
    const line = raw.replace(/[;#].*$/, "").trim();
    const header = /^\[(.+)\]$/.exec(line);
    if (header !== null) {
      section = `[${header[1]!.trim()}]`;
      if (!out.has(section)) out.set(section, n + 1);
    } else if (line !== "" && section !== "") {
      const eq = line.indexOf("=");
      const key = (eq < 0 ? line : line.slice(0, eq)).trim();
      out.set(`${section}.${key}`, n + 1);
    }
  });
  return out;
}

/** The line of an INI path: the key in its section, else in [global], else the section's. */
export function iniLineOf(lines: ReadonlyMap<string, number>, path: string): number | undefined {
  const m = /^(\[[^\]]+\])\.(.+)$/.exec(path);
  if (m === null) return lines.get(path);
  return lines.get(path) ?? lines.get(`[global].${m[2]}`) ?? lines.get(m[1]!);
}
