/**
 * `vstor measure [--output=human|json] [-O FMT] [-o OPTIONS] [--size N | [-f FMT] [-l SNAPSHOT]
 * [-U] FILE]`, as qemu-img measure: the bytes a new image needs for FILE's contents, or for an
 * empty image of N bytes.
 *
 * @module
 */
import type { BlockNode } from "../block/node.ts";
import { BlockError, isBlockError } from "../errors.ts";
import {
  checkMeasureOptions,
  loadMeasureSnapshot,
  measureImage,
  type MeasureInfo,
  type MeasureOptions,
  type MeasureSnapshot,
} from "../../formats/measure.ts";
import { type CliIo, EXIT_OK, UsageError } from "./cli_io.ts";
import { parseSize } from "./text/size.ts";
import { openVerbImage, parseVerbArgs } from "./args.ts";
import type { ParseArgsOptionsConfig } from "node:util";
import { optionFlags, type VerbHelp } from "./help.ts";

/** The measure verb's synopsis. */
export const MEASURE_USAGE =
  "vstor measure [--output=human|json] [-O FMT] [-o OPTIONS] [--size N | [-f FMT] [-l SNAPSHOT] [-U] FILE]";

const HELP = `usage: ${MEASURE_USAGE}

Print how many bytes a new image of format FMT needs: for FILE's contents (its backing chain
included), or for an empty image of N bytes.

  -O FMT                target format: raw (default) or qcow2
  -o OPTIONS            target creation options, comma-separated (cluster_size, compat,
                        refcount_bits, extended_l2, preallocation, backing_file, ...)
  --size N              measure an empty image of N bytes (k, M, G, T, P, E suffixes)
  -f FMT                FILE's format (probed when absent)
  -l SNAPSHOT           measure FILE's internal snapshot (ID or name, or
                        snapshot.id=ID[,snapshot.name=NAME])
  -U, --force-share     open FILE even when another process uses it
  --output=human|json   output format (default human)
  -h, --help            print this help

"required size" covers what FILE holds; "fully allocated size" a target with every cluster
allocated; "bitmaps size" (qcow2 v3 source and target) the persistent bitmaps on top.

Example: vstor measure -O qcow2 --output=json disk.raw
`;

type OptionType = "string" | "bool" | "number" | "size";

/** The `-o` options qemu-img measure accepts per target format (the format's create options and the file protocol's), with their types. */
const FILE_OPTIONS: Record<string, OptionType> = {
  size: "size",
  preallocation: "string",
  nocow: "bool",
  extent_size_hint: "size",
};
const TARGET_OPTIONS: Record<string, Record<string, OptionType>> = {
  raw: FILE_OPTIONS,
  qcow2: {
    ...FILE_OPTIONS,
    backing_file: "string",
    backing_fmt: "string",
    cluster_size: "size",
    compat: "string",
    compression_type: "string",
    data_file: "string",
    data_file_raw: "bool",
    "encrypt.cipher-alg": "string",
    "encrypt.cipher-mode": "string",
    "encrypt.format": "string",
    "encrypt.hash-alg": "string",
    "encrypt.iter-time": "number",
    "encrypt.ivgen-alg": "string",
    "encrypt.ivgen-hash-alg": "string",
    "encrypt.key-secret": "string",
    encryption: "bool",
    extended_l2: "bool",
    lazy_refcounts: "bool",
    refcount_bits: "number",
  },
};

/** Formats QEMU can create but not measure. */
const UNMEASURABLE_FORMATS = new Set(["vmdk", "vdi", "vhdx", "vpc", "qcow", "qed", "parallels"]);

const U64 = 1n << 64n;
const INT64_MAX = (1n << 63n) - 1n;

/** qemu-img's rule for one `-o` argument: not empty, no leading comma, no lone trailing comma. */
function isValidOptionList(list: string): boolean {
  if (list === "" || list.startsWith(",")) return false;
  const trailing = list.length - list.replace(/,+$/, "").length;
  return trailing % 2 === 0;
}

/** Split `key=value,key=value` as QemuOpts does: `,,` is a literal comma, a bare key means `on`. */
function splitOptionList(list: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let at = 0;
  while (at < list.length) {
    const stop = list.slice(at).search(/[=,]/);
    const end = stop < 0 ? list.length : at + stop;
    const key = list.slice(at, end);
    if (list[end] !== "=") {
      out.push([key, "on"]);
      at = end + 1;
      continue;
    }
    let value = "";
    let i = end + 1;
    for (; i < list.length; i++) {
      if (list[i] !== ",") value += list[i];
      else if (list[i + 1] === ",") value += list[i++];
      else break;
    }
    out.push([key, value]);
    at = i + 1;
  }
  return out;
}

/** C's strtoull with base 0 (decimal, 0x hex, 0 octal), as QEMU's number options; undefined when not a number. */
function parseNumber(text: string): bigint | undefined {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (m === null) return undefined;
  const digits = m[2]!;
  const value = /^0[0-7]+$/.test(digits) ? BigInt(`0o${digits.slice(1)}`) : BigInt(digits);
  if (value >= U64) return undefined;
  return m[1] === "-" ? (U64 - value) % U64 : value;
}

function parseBool(key: string, value: string): boolean {
  if (["on", "yes", "true", "y"].includes(value)) return true;
  if (["off", "no", "false", "n"].includes(value)) return false;
  throw new UsageError(`Parameter '${key}' expects 'on' or 'off'`);
}

/**
 * Parse measure's `-o` lists for a target format into measure options, with QemuOpts' type
 * checks; the last of repeated keys wins.
 *
 * @throws {UsageError} for an invalid list, an unknown key or a value of the wrong type
 */
export function parseMeasureOptions(lists: readonly string[], format: string): MeasureOptions {
  const known = TARGET_OPTIONS[format] ?? {};
  const opts: MeasureOptions = {};
  for (const list of lists) {
    if (!isValidOptionList(list)) throw new UsageError(`Invalid option list: ${list}`);
  }
  for (const [key, value] of splitOptionList(lists.join(","))) {
    const type = Object.hasOwn(known, key) ? known[key] : undefined;
    if (type === undefined) throw new UsageError(`Invalid parameter '${key}'`);
    let number: bigint | undefined;
    if (type === "bool") {
      const on = parseBool(key, value);
      if (key === "extended_l2") opts.extendedL2 = on;
    } else if (type === "number") {
      number = parseNumber(value);
      if (number === undefined) throw new UsageError(`Parameter '${key}' expects a number`);
    } else if (type === "size") {
      const parsed = parseSize(value);
      if (!parsed.ok) {
        throw new UsageError(
          parsed.reason === "too-large"
            ? `Value '${value}' is out of range for parameter '${key}'`
            : `Parameter '${key}' expects a non-negative number below 2^64 ` +
              "(optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- " +
              "and exabytes, respectively)",
        );
      }
      number = parsed.value;
    }
    switch (key) {
      case "size":
        opts.size = number!;
        break;
      case "cluster_size":
        opts.clusterSize = Number(number!);
        break;
      case "refcount_bits":
        opts.refcountBits = Number(number!);
        break;
      case "compat":
        opts.compat = value;
        break;
      case "preallocation":
        opts.preallocation = value;
        break;
      case "backing_file":
        opts.backingFile = value;
        break;
      case "encrypt.format":
        opts.encryptFormat = value;
        break;
    }
  }
  return opts;
}

/** qemu-img's `--size`: a size of at most INT64_MAX bytes. */
function parseMeasureSize(text: string): bigint {
  const parsed = parseSize(text);
  if (!parsed.ok && parsed.reason === "invalid") {
    throw new UsageError(
      "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, " +
        "megabytes, gigabytes, terabytes, petabytes and exabytes",
    );
  }
  if (!parsed.ok || parsed.value > INT64_MAX) {
    throw new UsageError(`Invalid image size specified. Must be between 0 and ${INT64_MAX}`);
  }
  return parsed.value;
}

/** -l's argument: an ID or name, or qemu's `snapshot.id=…,snapshot.name=…`. */
function parseSnapshotSpec(text: string): MeasureSnapshot {
  if (!text.startsWith("snapshot.")) return { key: text };
  const spec: { id?: string; name?: string } = {};
  for (const [key, value] of splitOptionList(text)) {
    if (key === "snapshot.id") spec.id = value;
    else if (key === "snapshot.name") spec.name = value;
    else {throw new UsageError(
        `Invalid parameter '${key}' (failed in parsing snapshot param '${text}')`,
      );}
  }
  return spec;
}

/** qemu-img measure's human output. */
export function measureHuman(info: MeasureInfo): string {
  let text = `required size: ${info.required}\nfully allocated size: ${info.fullyAllocated}\n`;
  if (info.bitmaps !== undefined) text += `bitmaps size: ${info.bitmaps}\n`;
  return text;
}

/**
 * qemu-img measure's JSON, fields in its order, exact past 2^53. The fields are QAPI `int`s, so
 * like qemu-img it prints 2^63 and up as negative int64 values (the human output does not).
 */
export function measureJson(info: MeasureInfo): string {
  const int = (v: bigint) => BigInt.asIntN(64, v);
  const fields: string[] = [];
  if (info.bitmaps !== undefined) fields.push(`    "bitmaps": ${int(info.bitmaps)}`);
  fields.push(
    `    "required": ${int(info.required)}`,
    `    "fully-allocated": ${int(info.fullyAllocated)}`,
  );
  return `{\n${fields.join(",\n")}\n}\n`;
}

const MEASURE_OPTIONS = {
  output: { type: "string", default: "human" },
  size: { type: "string" },
  format: { type: "string", short: "f" },
  snapshot: { type: "string", short: "l" },
  "target-format": { type: "string", short: "O", default: "raw" },
  options: { type: "string", short: "o", multiple: true, default: [] },
  "force-share": { type: "boolean", short: "U", default: false },
  help: { type: "boolean", short: "h", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help measure`. */
export const measureHelp: VerbHelp = {
  text: `${HELP}`,
  options: optionFlags(MEASURE_OPTIONS),
};

/**
 * The measure verb; returns the exit code. Command-line mistakes (bad flags, option values, sizes,
 * FILE with --size) are usage errors (exit 2); failing to open or read FILE exits 1.
 *
 * @example
 * ```ts
 * import { measureMain } from "./measure.ts";
 * let out = "";
 * await measureMain(["--size", "1G", "-O", "qcow2"], { stdout: (s) => out += s, stderr: () => {} });
 * if (out !== "required size: 393216\nfully allocated size: 1074135040\n") throw new Error(out);
 * ```
 */
export async function measureMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, MEASURE_OPTIONS);
  if (values.help) {
    io.stdout(measureHelp.text);
    return EXIT_OK;
  }
  if (values.output !== "human" && values.output !== "json") {
    throw new UsageError("--output must be used with human or json as argument");
  }
  const size = values.size === undefined ? undefined : parseMeasureSize(values.size);
  const snapshot = values.snapshot === undefined ? undefined : parseSnapshotSpec(values.snapshot);
  if (positionals.length > 1) throw new UsageError("At most one filename argument is allowed");
  const file = positionals[0];
  if (file === undefined && (values.format !== undefined || snapshot !== undefined)) {
    throw new UsageError("-f and -l require a filename argument");
  }
  if (file !== undefined && size !== undefined) {
    throw new UsageError("--size N cannot be used together with a filename");
  }
  if (file === undefined && size === undefined) {
    throw new UsageError("Either --size N or one filename must be specified");
  }

  let node: BlockNode | undefined;
  try {
    let sourceSize = 0;
    if (file !== undefined) {
      node = await openVerbImage(io, file, {
        ...(values.format === undefined ? {} : { format: values.format }),
        readOnly: true,
        forceShare: values["force-share"],
      });
      // QEMU keeps the image's current length while a snapshot is loaded.
      sourceSize = node.size;
      if (snapshot !== undefined) loadMeasureSnapshot(node, snapshot);
    }
    const target = values["target-format"];
    if (TARGET_OPTIONS[target] === undefined) {
      if (UNMEASURABLE_FORMATS.has(target)) {
        throw new BlockError(
          "unsupported",
          `Block driver '${target}' does not support size measurement`,
        );
      }
      throw new UsageError(`Unknown file format '${target}'`);
    }
    const opts = parseMeasureOptions(values.options, target);
    if (size !== undefined) opts.size = size;
    try {
      checkMeasureOptions(target, opts);
    } catch (e) {
      if (isBlockError(e, "invalid-argument")) throw new UsageError(e.message);
      throw e;
    }
    const info = await measureImage(
      target,
      opts,
      node === undefined ? undefined : { node, size: sourceSize },
    );
    io.stdout(values.output === "json" ? measureJson(info) : measureHuman(info));
    return EXIT_OK;
  } finally {
    await node?.close();
  }
}
