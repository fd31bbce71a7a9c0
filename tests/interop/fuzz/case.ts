/**
 * A fuzz case: a chain of image layers and the commands run on it, and how each command reads as
 * a qemu-img/qemu-io command line (vstor takes the same arguments after its verb).
 *
 * Layer `i` lives in the file {@linkcode layerFile}`(case, i)` and is created on layer `i - 1`
 * (layer 0 has no backing file). Commands name layers by index; the runner works with the files'
 * bare names inside one directory per side, so a reproducer runs unchanged in a shell.
 *
 * @module
 */

/** One layer's creation parameters. qcow2 fields are ignored for raw layers. */
export interface LayerSpec {
  format: "raw" | "qcow2";
  /** Virtual size in bytes at creation. */
  size: number;
  compat: "0.10" | "1.1";
  clusterSize: number;
  extendedL2: boolean;
  refcountBits: number;
  lazyRefcounts: boolean;
  preallocation: "off" | "metadata" | "falloc" | "full";
  compressionType: "zlib" | "zstd";
}

/** One guest request inside a qemu-io session. */
export type IoCmd =
  | { op: "write"; offset: number; length: number; pattern: number }
  | { op: "zero"; offset: number; length: number; unmap: boolean }
  | { op: "discard"; offset: number; length: number }
  | { op: "compress"; offset: number; length: number; pattern: number };

/** One command of a case: a qemu-io session or a qemu-img verb on one layer. */
export type Step =
  | { kind: "io"; layer: number; cmds: IoCmd[] }
  | { kind: "resize"; layer: number; size: number; shrink: boolean }
  | { kind: "snapshot"; layer: number; op: "create" | "apply" | "delete"; name: string }
  | { kind: "commit"; layer: number; base: number | null; drop: boolean }
  | { kind: "rebase"; layer: number; backing: number | null; unsafe: boolean };

/** A whole case: layers created bottom-up, then the steps in order. */
export interface Case {
  layers: LayerSpec[];
  steps: Step[];
}

/**
 * Marks an argument naming an image file by its path: the runner puts the copy's directory in its
 * place (`/tmp/…/q/L1.qcow2`), a script `"$Q"/L1.qcow2`. Backing names (`-b`) stay bare, relative
 * to the image's directory as qemu-img reads them; nobody depends on the working directory.
 */
export const IN_DIR = "@dir/";

/** A command line: `tool` is qemu-img or qemu-io; vstor runs `verb(...)` with the same args. */
export interface CommandLine {
  tool: "qemu-img" | "qemu-io";
  args: string[];
}

/** The defaults qemu-img 7.2 uses: options equal to these are left off the command line. */
export const DEFAULT_QCOW2: Omit<LayerSpec, "format" | "size"> = {
  compat: "1.1",
  clusterSize: 65536,
  extendedL2: false,
  refcountBits: 16,
  lazyRefcounts: false,
  preallocation: "off",
  compressionType: "zlib",
};

/** The file name of layer `i`. */
export function layerFile(c: Case, i: number): string {
  return `L${i}.${c.layers[i]?.format === "raw" ? "raw" : "qcow2"}`;
}

/** The `-o` list of a qcow2 layer: only options that differ from qemu-img's defaults. */
export function createOptions(l: LayerSpec): string[] {
  const o: string[] = [];
  if (l.compat !== DEFAULT_QCOW2.compat) o.push(`compat=${l.compat}`);
  if (l.clusterSize !== DEFAULT_QCOW2.clusterSize) o.push(`cluster_size=${l.clusterSize}`);
  if (l.extendedL2) o.push("extended_l2=on");
  if (l.refcountBits !== DEFAULT_QCOW2.refcountBits) o.push(`refcount_bits=${l.refcountBits}`);
  if (l.lazyRefcounts) o.push("lazy_refcounts=on");
  if (l.preallocation !== "off") o.push(`preallocation=${l.preallocation}`);
  if (l.compressionType !== "zlib") o.push(`compression_type=${l.compressionType}`);
  return o;
}

/** The `create` command of layer `i`. */
export function createLine(c: Case, i: number): CommandLine {
  const l = c.layers[i]!;
  const args = ["create", "-q", "-f", l.format];
  const o = l.format === "qcow2" ? createOptions(l) : [];
  if (o.length > 0) args.push("-o", o.join(","));
  if (i > 0) args.push("-b", layerFile(c, i - 1), "-F", c.layers[i - 1]!.format);
  args.push(IN_DIR + layerFile(c, i), String(l.size));
  return { tool: "qemu-img", args };
}

/** The qemu-io command text of one request. */
export function ioText(cmd: IoCmd): string {
  const range = `${cmd.offset} ${cmd.length}`;
  const hex = (p: number) => `0x${p.toString(16).padStart(2, "0")}`;
  switch (cmd.op) {
    case "write":
      return `write -q -P ${hex(cmd.pattern)} ${range}`;
    case "zero":
      return `write -q -z${cmd.unmap ? " -u" : ""} ${range}`;
    case "discard":
      return `discard -q ${range}`;
    case "compress":
      return `write -q -c -P ${hex(cmd.pattern)} ${range}`;
  }
}

/** The command line of a step. */
export function stepLine(c: Case, s: Step): CommandLine {
  const file = IN_DIR + layerFile(c, s.layer);
  const fmt = c.layers[s.layer]!.format;
  switch (s.kind) {
    case "io":
      return {
        tool: "qemu-io",
        args: ["-f", fmt, ...s.cmds.flatMap((x) => ["-c", ioText(x)]), file],
      };
    case "resize":
      return {
        tool: "qemu-img",
        args: ["resize", "-q", "-f", fmt, ...(s.shrink ? ["--shrink"] : []), file, String(s.size)],
      };
    case "snapshot": {
      const flag = { create: "-c", apply: "-a", delete: "-d" }[s.op];
      // qemu-img 7.2's snapshot takes no -f: the format is probed.
      return { tool: "qemu-img", args: ["snapshot", "-q", flag, s.name, file] };
    }
    case "commit":
      return {
        tool: "qemu-img",
        args: [
          "commit",
          "-q",
          "-f",
          fmt,
          ...(s.drop ? ["-d"] : []),
          ...(s.base === null ? [] : ["-b", layerFile(c, s.base)]),
          file,
        ],
      };
    case "rebase":
      return {
        tool: "qemu-img",
        args: [
          "rebase",
          "-q",
          "-f",
          fmt,
          ...(s.unsafe ? ["-u"] : []),
          ...(s.backing === null
            ? ["-b", ""]
            : ["-b", layerFile(c, s.backing), "-F", c.layers[s.backing]!.format]),
          file,
        ],
      };
  }
}

/** Every command of a case in order: the creates, then the steps. */
export function allLines(c: Case): CommandLine[] {
  return [...c.layers.map((_, i) => createLine(c, i)), ...c.steps.map((s) => stepLine(c, s))];
}

/** A shell word: bare when safe, else single-quoted. */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_./=,:+-]+$/.test(word) ? word : `'${word.replaceAll("'", `'\\''`)}'`;
}

/** How a command line reads in a shell: image paths in the directory `$dirVar`. */
export function lineText(line: CommandLine, dirVar: string, vstor?: string): string {
  const head = vstor === undefined
    ? line.tool
    : `${vstor} ${line.tool === "qemu-io" ? "io" : ""}`.trimEnd();
  const word = (a: string) =>
    a.startsWith(IN_DIR) ? `"$${dirVar}"/${shellQuote(a.slice(IN_DIR.length))}` : shellQuote(a);
  return [head, ...line.args.map(word)].join(" ");
}

/** `line` with its image paths in `dir`. */
export function inDir(line: CommandLine, dir: string): CommandLine {
  return {
    tool: line.tool,
    args: line.args.map((a) => (a.startsWith(IN_DIR) ? `${dir}/${a.slice(IN_DIR.length)}` : a)),
  };
}

/** A short description of a layer, for logs and shapes. */
export function describeLayer(l: LayerSpec): string {
  if (l.format === "raw") return `raw ${l.size}`;
  const o = createOptions(l);
  return `qcow2 ${l.size}${o.length > 0 ? ` ${o.join(",")}` : ""}`;
}
