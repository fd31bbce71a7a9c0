/**
 * `vstor bitmap (--add [-g GRANULARITY] | --remove | --clear | --enable | --disable | --merge SOURCE
 * [-b SRC_FILE [-F SRC_FMT]])... [-f FMT] FILE BITMAP`, as qemu-img 7.2's bitmap command: the
 * actions run in the order given, on the image opened read-write without its backing chain; the
 * first failure stops with `Operation OP on bitmap NAME failed: …`.
 *
 * @module
 */
import type { BlockNode } from "../block/node.ts";
import { BlockError } from "../errors.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import { type DirtyBitmap, inconsistentError } from "../../formats/qcow2/bitmap.ts";
import { type CliIo, errorLine, EXIT_ERROR, EXIT_OK, programName, UsageError } from "./cli_io.ts";
import type { VerbHelp } from "./help.ts";
import { openVerbImage } from "./args.ts";
import { probedRawWarning } from "./text/messages.ts";
import { parseSize } from "./text/size.ts";

export const BITMAP_USAGE =
  "vstor bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... " +
  "[-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILE BITMAP";

type Action = { op: "add" | "remove" | "clear" | "enable" | "disable" } | {
  op: "merge";
  source: string;
};

interface BitmapArgs {
  actions: Action[];
  granularity: bigint;
  format?: string;
  sourceFile?: string;
  sourceFormat?: string;
  positionals: string[];
  help: boolean;
}

const FLAGS = ["add", "remove", "clear", "enable", "disable"] as const;
/** Long options (getopt_long accepts unambiguous prefixes) and whether they take an argument. */
const LONG: Record<string, boolean> = {
  help: false,
  object: true,
  "image-opts": false,
  add: false,
  remove: false,
  clear: false,
  enable: false,
  disable: false,
  merge: true,
  granularity: true,
  "source-file": true,
  "source-format": true,
};

/** bitmap's short options: getopt's ":b:f:F:g:h". */
const SHORT = ["b", "f", "F", "g", "h"];

/** `vstor help bitmap`. */
export const bitmapHelp: VerbHelp = {
  text: `usage: ${BITMAP_USAGE}

Change the persistent dirty bitmap BITMAP of a qcow2 image FILE: the actions run in the order
given.

  --add                       create BITMAP (enabled: it records writes from now on)
  --remove                    delete BITMAP
  --clear                     mark every cluster of BITMAP clean
  --enable                    let BITMAP record writes
  --disable                   stop BITMAP from recording writes
  --merge SOURCE              set in BITMAP every cluster dirty in bitmap SOURCE
  -g, --granularity SIZE      with --add: bytes each bit covers (a power of two, 512 to 2G;
                              default the cluster size, at least 64k)
  -b, --source-file FILE      with --merge: take SOURCE from this image instead of FILE
  -F, --source-format FMT     the format of the -b image
  -f FMT                      FILE's format (probed when absent)
  --object, --image-opts      not supported by vstor
  -h, --help                  print this help

Example: vstor bitmap --add -g 64k disk.qcow2 backup-1
`,
  options: [...SHORT.map((c) => `-${c}`), ...Object.keys(LONG).map((name) => `--${name}`)],
};

function granularityArg(text: string): bigint {
  const r = parseSize(text);
  if (!r.ok && r.reason === "invalid") {
    throw new UsageError(`Invalid granularity '${text}'`, {
      tryHelp: false,
      qemu: "Invalid granularity specified. You may use k, M, G, T, P or E suffixes for\n" +
        "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
    });
  }
  if (!r.ok || r.value > 0x7fffffffffffffffn) {
    throw new UsageError(
      "Invalid granularity specified. Must be between 0 and 9223372036854775807.",
      {
        tryHelp: false,
      },
    );
  }
  return r.value;
}

/** getopt_long(":b:f:F:g:h") with qemu-img bitmap's long options, keeping the actions' order. */
function parseBitmapArgs(args: string[]): BitmapArgs {
  const out: BitmapArgs = { actions: [], granularity: 0n, positionals: [], help: false };
  const take = (opt: string, inline: string | undefined, i: number): [string, number] => {
    if (inline !== undefined) return [inline, i];
    if (i + 1 >= args.length) throw new UsageError(`missing argument for option '${opt}'`);
    return [args[i + 1]!, i + 1];
  };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === "--") {
      out.positionals.push(...args.slice(i + 1));
      break;
    }
    if (arg.startsWith("--")) {
      const eq = arg.indexOf("=");
      const typed = eq < 0 ? arg.slice(2) : arg.slice(2, eq);
      const matches = Object.keys(LONG).filter((k) => k.startsWith(typed));
      const name = matches.includes(typed) ? typed : matches.length === 1 ? matches[0] : undefined;
      if (name === undefined) throw new UsageError(`unrecognized option '${arg}'`);
      let value: string | undefined;
      if (LONG[name]) [value, i] = take(arg, eq < 0 ? undefined : arg.slice(eq + 1), i);
      else if (eq >= 0) throw new UsageError(`unrecognized option '${arg}'`);
      if (name === "help") out.help = true;
      else if (name === "merge") out.actions.push({ op: "merge", source: value! });
      else if (name === "granularity") out.granularity = granularityArg(value!);
      else if (name === "source-file") out.sourceFile = value!;
      else if (name === "source-format") out.sourceFormat = value!;
      else if (name === "object") {
        throw new UsageError("--object is not supported by vstor", { tryHelp: false });
      } else if (name === "image-opts") {
        throw new UsageError("--image-opts is not supported by vstor", { tryHelp: false });
      } else out.actions.push({ op: name as (typeof FLAGS)[number] });
      continue;
    }
    if (arg.startsWith("-") && arg !== "-") {
      for (let k = 1; k < arg.length; k++) {
        const c = arg[k]!;
        if (c === "h") {
          out.help = true;
          continue;
        }
        if (!SHORT.includes(c)) throw new UsageError(`unrecognized option '${arg}'`);
        const rest = arg.slice(k + 1);
        let value: string;
        [value, i] = take(`-${c}`, rest === "" ? undefined : rest, i);
        if (c === "b") out.sourceFile = value;
        else if (c === "f") out.format = value;
        else if (c === "F") out.sourceFormat = value;
        else out.granularity = granularityArg(value);
        break;
      }
      continue;
    }
    out.positionals.push(arg);
  }
  return out;
}

/** A message from the bitmap layer as qemu-img words it after "Operation OP on bitmap B failed: ". */
function lookup(node: BlockNode, name: string): DirtyBitmap {
  const bm = node instanceof Qcow2Node ? node.bitmaps?.find(name) : undefined;
  if (bm === undefined) throw new BlockError("not-found", `Dirty bitmap '${name}' not found`);
  return bm;
}

async function runAction(
  node: BlockNode,
  source: BlockNode,
  action: Action,
  name: string,
  granularity: bigint,
): Promise<void> {
  if (action.op === "add") {
    if (name === "") throw new BlockError("invalid-argument", "Bitmap name cannot be empty");
    // qemu-img passes the int64 granularity as QMP's uint32; zero means the default.
    const g32 = Number(granularity & 0xffffffffn);
    if (granularity !== 0n && (g32 < 512 || (g32 & (g32 - 1)) !== 0)) {
      throw new BlockError("invalid-argument", "Granularity must be power of 2 and at least 512");
    }
    if (!(node instanceof Qcow2Node) || node.bitmaps === undefined) {
      throw new BlockError(
        "unsupported",
        `Can't store persistent bitmaps to ${node.filename ?? "#block"}: Operation not supported`,
      );
    }
    const cs = node.clusterSize;
    const g = granularity !== 0n ? g32 : Math.min(65536, Math.max(4096, cs));
    node.bitmaps.add(name, g, false);
    return;
  }
  const bm = lookup(node, name);
  const bitmaps = (node as Qcow2Node).bitmaps!;
  switch (action.op) {
    case "remove":
      bitmaps.remove(name);
      return;
    case "clear":
      if (bm.inconsistent) throw inconsistentError(name);
      bm.clear();
      return;
    case "enable":
    case "disable":
      if (bm.inconsistent) throw inconsistentError(name);
      bm.enabled = action.op === "enable";
      bitmaps.changed();
      return;
    case "merge": {
      const src = lookup(source, action.source);
      if (bm.inconsistent) throw inconsistentError(name);
      if (src.inconsistent) throw inconsistentError(src.name);
      if (src.size !== bm.size) {
        throw new BlockError(
          "invalid-argument",
          `Bitmaps are of different sizes (destination size is ${bm.size}, source size is ${src.size}) and can't be merged`,
        );
      }
      bm.merge(src);
      return;
    }
  }
  await Promise.resolve();
}

/** The bitmap verb; returns the exit code. */
export async function bitmapMain(args: string[], io: CliIo): Promise<number> {
  const a = parseBitmapArgs(args);
  if (a.help) {
    io.stdout(bitmapHelp.text);
    return EXIT_OK;
  }
  const early = (message: string) => new UsageError(message, { tryHelp: false });
  if (a.actions.length === 0) {
    throw early("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
  }
  if (a.granularity !== 0n && !a.actions.some((x) => x.op === "add")) {
    throw early("granularity only supported with --add");
  }
  if (a.sourceFormat !== undefined && a.sourceFile === undefined) {
    throw early("-F only supported with -b");
  }
  if (a.sourceFile !== undefined && !a.actions.some((x) => x.op === "merge")) {
    throw early("Merge bitmap source file only supported with --merge");
  }
  if (a.positionals.length !== 2) throw early("Expecting filename and bitmap name");
  const [file, name] = a.positionals as [string, string];
  const node = await openVerbImage(io, file, {
    ...(a.format === undefined ? {} : { format: a.format }),
    noBacking: true,
  });
  let source: BlockNode | undefined;
  try {
    if (a.format === undefined && node.format === "raw" && programName(io) !== "vstor") {
      io.stderr(probedRawWarning(file));
    }
    if (a.sourceFile !== undefined) {
      source = await openVerbImage(io, a.sourceFile, {
        ...(a.sourceFormat === undefined ? {} : { format: a.sourceFormat }),
        readOnly: true,
        noBacking: true,
      });
    }
    for (const action of a.actions) {
      try {
        await runAction(node, source ?? node, action, name, a.granularity);
      } catch (e) {
        if (!(e instanceof BlockError)) throw e;
        errorLine(io, `Operation ${action.op} on bitmap ${name} failed: ${e.message}`);
        return EXIT_ERROR;
      }
    }
  } finally {
    await source?.close();
    await node.close();
  }
  return EXIT_OK;
}

/** qemu-img info's human lines for the bitmaps list (under "Format specific information:"). */
export function bitmapInfoHuman(list: Array<Record<string, unknown>>): string[] {
  const lines = ["    bitmaps:"];
  list.forEach((b, i) => {
    lines.push(`        [${i}]:`, "            flags:");
    (b["flags"] as string[]).forEach((f, k) => lines.push(`                [${k}]: ${f}`));
    lines.push(`            name: ${b["name"]}`, `            granularity: ${b["granularity"]}`);
  });
  return lines;
}

/** qemu-img's JSON prints an empty list as `[`, newline, `]` at the key's indentation. */
export function qemuJsonEmptyLists(json: string): string {
  return json.replace(/^( *)(.*)\[\]/gm, "$1$2[\n$1]");
}

/**
 * convert --bitmaps before copying (qemu-img's convert_check_bitmaps): the source must store
 * bitmaps (qcow2 v3) and, without --skip-broken-bitmaps, hold no inconsistent one. Returns the
 * error lines qemu-img prints, or undefined when the bitmaps can be copied.
 */
export async function convertBitmapsCheck(
  io: CliIo,
  source: string,
  opts: { format?: string; forceShare: boolean; skipBroken: boolean },
): Promise<{ problem?: string; size: number }> {
  const node = await openVerbImage(io, source, {
    ...(opts.format === undefined ? {} : { format: opts.format }),
    readOnly: true,
    forceShare: opts.forceShare,
    noBacking: true,
  });
  try {
    const size = node.size;
    if (!(node instanceof Qcow2Node) || node.header.version < 3 || node.bitmaps === undefined) {
      return { problem: "Source lacks bitmap support", size };
    }
    if (opts.skipBroken) return { size };
    // QEMU walks its bitmap list newest first: the last directory entry is named first.
    const broken = [...node.bitmaps.list].reverse().find((b) => b.inconsistent);
    if (broken === undefined) return { size };
    return {
      problem: `Cannot copy inconsistent bitmap '${broken.name}'\n` +
        "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
      size,
    };
  } finally {
    await node.close();
  }
}

/**
 * convert --bitmaps after copying (qemu-img's convert_copy_bitmaps): every bitmap of the source
 * is added to the target with its granularity and enabled state and filled by a merge; the
 * target stores them when it closes. Inconsistent ones are skipped with a warning.
 */
export async function convertBitmapsCopy(
  io: CliIo,
  source: string,
  dst: BlockNode,
  opts: { format?: string; targetFormat: string; forceShare: boolean; skipBroken: boolean },
): Promise<void> {
  const src = await openVerbImage(io, source, {
    ...(opts.format === undefined ? {} : { format: opts.format }),
    readOnly: true,
    forceShare: opts.forceShare,
    noBacking: true,
  });
  try {
    {
      if (!(src instanceof Qcow2Node) || !(dst instanceof Qcow2Node)) return;
      for (const bm of [...src.bitmaps?.list ?? []].reverse()) {
        if (bm.inconsistent) {
          if (opts.skipBroken) {
            errorLine(io, `warning: Skipping inconsistent bitmap '${bm.name}'`);
            continue;
          }
          throw inconsistentError(bm.name);
        }
        let added: DirtyBitmap;
        try {
          added = dst.bitmaps!.add(bm.name, bm.granularity, !bm.enabled);
        } catch (e) {
          throw new BlockError(
            "invalid-argument",
            `Failed to create bitmap ${bm.name}: ${message(e)}`,
          );
        }
        if (added.size !== bm.size) {
          dst.bitmaps!.remove(bm.name);
          throw new BlockError(
            "invalid-argument",
            `Failed to populate bitmap ${bm.name}: Bitmaps are of different sizes (destination size is ${added.size}, source size is ${bm.size}) and can't be merged`,
          );
        }
        added.merge(bm);
      }
    }
  } finally {
    await src.close();
  }
}

/**
 * The checks convert --bitmaps makes before copying, in qemu-img's order: one source, a source
 * that stores bitmaps and has no inconsistent one (unless skipped), a target format that stores
 * them (qcow2 v3). Returns the options for {@linkcode convertBitmapsCopy}.
 *
 * @throws {BlockError} with qemu-img's message
 */
export async function convertBitmapsBefore(
  io: CliIo,
  sources: string[],
  target: string,
  opts: {
    format?: string;
    targetFormat: string;
    compat: string | undefined;
    noCreate: boolean;
    forceShare: boolean;
    skipBroken: boolean;
    /** Create the target of `size` bytes: qemu-img has made it when it finds the format lacking. */
    create: (size: number) => Promise<void>;
  },
): Promise<{ format?: string; targetFormat: string; forceShare: boolean; skipBroken: boolean }> {
  const fail = (message: string) => new BlockError("unsupported", message);
  if (sources.length > 1) throw fail("Copying bitmaps only possible with single source");
  const { problem, size } = await convertBitmapsCheck(io, sources[0]!, opts);
  if (problem !== undefined) throw fail(problem);
  let v3 = opts.targetFormat === "qcow2" && opts.compat !== "0.10";
  if (opts.targetFormat === "qcow2" && opts.noCreate) {
    // -n: the existing target decides (an unopenable one fails later, in convert's words).
    try {
      const node = await openVerbImage(io, target, {
        format: "qcow2",
        readOnly: true,
        noBacking: true,
      });
      v3 = node instanceof Qcow2Node && node.header.version >= 3;
      await node.close();
    } catch {
      v3 = true;
    }
  }
  if (!v3) {
    if (!opts.noCreate) await opts.create(size);
    throw fail(`Format driver '${opts.targetFormat}' does not support bitmaps`);
  }
  const { format, targetFormat, forceShare, skipBroken } = opts;
  return { ...(format === undefined ? {} : { format }), targetFormat, forceShare, skipBroken };
}

function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
