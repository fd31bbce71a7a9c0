/**
 * `vstor create [-f FMT] [-o OPTIONS] [-q] FILE SIZE`, as qemu-img create.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { EFBIG, ENOSPC } from "../sys/libc.ts";
import { validateQcow2Options } from "../../formats/qcow2/create.ts";
import {
  createImage,
  type CreateOptions,
  formatNames,
  openImage,
  resolveBacking,
} from "../../formats/open.ts";
import { type CliIo, errorLine, EXIT_ERROR, EXIT_OK, programName, UsageError } from "./cli_io.ts";
import { parseSize } from "./text/size.ts";
import type { ParseArgsOptionsConfig } from "node:util";
import { optionFlags, type VerbHelp } from "./help.ts";
import { hostPath, parseVerbArgs } from "./args.ts";

const PREALLOCATION = ["off", "metadata", "falloc", "full"] as const;

/** qemu-img's message for a size option that does not parse. */
const SIZE_HINT = "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
  "and exabytes, respectively.";

/** Parse a qemu-img size argument into a safe integer of bytes. */
export function parseImageSize(text: string): number {
  const parsed = parseSize(text);
  if (!parsed.ok || parsed.value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new UsageError(
      `Invalid image size '${text}'. You may use k, M, G, T, P or E suffixes for kilobytes, ` +
        `megabytes, gigabytes, terabytes, petabytes and exabytes (at most ${Number.MAX_SAFE_INTEGER} bytes)`,
      { qemu: `Parameter 'size' expects a non-negative number below 2^64\n${SIZE_HINT}` },
    );
  }
  return Number(parsed.value);
}

/** The protocol (file) options: qemu-img lists them only when given a file name. */
const FILE_OPTIONS: Array<[string, string]> = [
  ["extent_size_hint=<size>", "Extent size hint for the image file, 0 to disable"],
  ["nocow=<bool (on/off)>", "Turn off copy-on-write (valid only on btrfs)"],
  ["preallocation=<str>", "Preallocation mode (allowed values: off, falloc, full)"],
  ["size=<size>", "Virtual disk size"],
];

/** Each format's own `-o` options, with their help lines (QEMU's, for what vstor supports). */
const FORMAT_OPTIONS: Record<string, Array<[string, string]>> = {
  raw: [
    ["size=<size>", "Virtual disk size"],
  ],
  qcow2: [
    ["backing_file=<str>", "File name of a base image"],
    ["backing_fmt=<str>", "Image format of the base image"],
    ["cluster_size=<size>", "qcow2 cluster size"],
    ["compat=<str>", "Compatibility level (v2 [0.10] or v3 [1.1])"],
    ["compression_type=<str>", "Compression method used for image cluster compression"],
    ["extended_l2=<bool (on/off)>", "Extended L2 tables"],
    ["lazy_refcounts=<bool (on/off)>", "Postpone refcount updates"],
    ["preallocation=<str>", "Preallocation mode (allowed values: off, metadata, falloc, full)"],
    ["refcount_bits=<num>", "Width of a reference count entry in bits"],
    ["size=<size>", "Virtual disk size"],
  ],
};

/** The options create takes for a format: its own, then the file protocol's it lacks. */
function allOptions(format: string): Array<[string, string]> {
  const own = FORMAT_OPTIONS[format] ?? [];
  const key = ([name]: [string, string]) => name.slice(0, name.indexOf("="));
  const names = new Set(own.map(key));
  return [...own, ...FILE_OPTIONS.filter((o) => !names.has(key(o)))]
    .sort((a, b) => key(a) < key(b) ? -1 : 1);
}

/**
 * qemu-img's `-o help` text for a format: with a target file name, every option (the format's
 * and the file protocol's) under "Supported options:"; without one, the format's own and a note.
 */
export function createOptionsHelp(format: string, withFile = true): string {
  const list = withFile ? allOptions(format) : FORMAT_OPTIONS[format] ?? [];
  const lines = [withFile ? "Supported options:" : `Supported ${format} options:`];
  for (const [name, help] of list) lines.push(`  ${name.padEnd(22)} - ${help}`);
  if (!withFile) {
    lines.push(
      "",
      "The protocol level may support further options.",
      "Specify the target filename to include those options.",
    );
  }
  return lines.join("\n") + "\n";
}

/** Parsed `-o` options: what the format gets, plus `size` and the file-level options. */
export type ParsedCreateOptions = CreateOptions & {
  size?: number;
  /** The file options (no effect on the image's contents here, printed as qemu-img does). */
  nocow?: boolean;
  extentSizeHint?: number;
};

/**
 * How {@linkcode parseCreateOptions} reports, for qemu-img's wording: `file` prefixes its
 * messages, and with `deferred` a bad value for a string option (compat, preallocation,
 * compression_type) is collected there instead of thrown, as qemu-img only finds those after
 * printing "Formatting …"; `verbatim` gets string values as they were given.
 */
export interface CreateOptionsContext {
  file?: string;
  deferred?: string[];
  verbatim?: Map<string, string>;
}

/**
 * Parse `-o key=value,key=value` lists into format options. `size` comes back separately.
 *
 * @throws {UsageError} naming the parameter for an unknown key or a bad value
 */
export function parseCreateOptions(
  lists: string[],
  format: string,
  context: CreateOptionsContext = {},
): ParsedCreateOptions {
  const known = new Set(allOptions(format).map(([name]) => name.slice(0, name.indexOf("="))));
  const named = (message: string) =>
    context.file === undefined ? message : `${context.file}: ${message}`;
  // A type error (qemu's option parsing): before anything is printed, no "Try" line.
  const typeError = (message: string, vstor = message) =>
    new UsageError(vstor, { qemu: named(message), tryHelp: false });
  // A value error (the format driver's): after "Formatting …" when deferred.
  const valueError = (key: string, value: string) => {
    const message = `Parameter '${key}' does not accept value '${value}'`;
    if (context.deferred === undefined) throw new UsageError(message, { qemu: named(message) });
    context.deferred.push(named(message));
  };
  const size = (key: string, value: string): number => {
    const parsed = parseSize(value);
    if (!parsed.ok || parsed.value > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw typeError(
        `Parameter '${key}' expects a non-negative number below 2^64\n${SIZE_HINT}`,
        `Invalid size '${value}' for '${key}' (at most ${Number.MAX_SAFE_INTEGER} bytes)`,
      );
    }
    return Number(parsed.value);
  };
  const bool = (key: string, value: string): boolean => {
    if (value === "on" || value === "true" || value === "yes") return true;
    if (value === "off" || value === "false" || value === "no") return false;
    throw typeError(`Parameter '${key}' expects 'on' or 'off'`);
  };
  const opts: ParsedCreateOptions = {};
  for (const list of lists) {
    // qemu's option lists escape a comma as ",,".
    for (const item of list.replaceAll(",,", "\0").split(",").map((i) => i.replaceAll("\0", ","))) {
      if (item === "") continue;
      const eq = item.indexOf("=");
      const key = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? "on" : item.slice(eq + 1);
      if (!known.has(key)) {
        throw typeError(
          `Invalid parameter '${key}'`,
          `Invalid parameter '${key}' for format ${format}`,
        );
      }
      switch (key) {
        case "preallocation": {
          context.verbatim?.set(key, value);
          const mode = PREALLOCATION.find((m) => m === value);
          if (mode === undefined) valueError(key, value);
          else if (format === "raw" && mode === "metadata") {
            throw new UsageError(`Unsupported preallocation mode 'metadata' for raw`);
          } else opts.preallocation = mode;
          break;
        }
        case "size":
          opts.size = size(key, value);
          break;
        case "compat": {
          context.verbatim?.set(key, value);
          if (value === "0.10" || value === "v2") opts.compat = "0.10";
          else if (value === "1.1" || value === "v3") opts.compat = "1.1";
          // QEMU's qcow2 names this option 'version' when it refuses a value.
          else valueError("version", value);
          break;
        }
        case "cluster_size":
          opts.clusterSize = size(key, value);
          break;
        case "refcount_bits": {
          if (!/^-?[0-9]+$/.test(value)) {
            throw typeError(`Parameter 'refcount_bits' expects a number`);
          }
          // As QEMU's strtou64, "-N" wraps around: a width no format accepts.
          opts.refcountBits = value.startsWith("-")
            ? 2 ** 64 - Number(value.slice(1))
            : Number(value);
          context.verbatim?.set(key, value);
          break;
        }
        case "lazy_refcounts":
          opts.lazyRefcounts = bool(key, value);
          break;
        case "extended_l2":
          opts.extendedL2 = bool(key, value);
          break;
        case "compression_type":
          context.verbatim?.set(key, value);
          if (value === "zlib" || value === "zstd") opts.compressionType = value;
          else valueError("compression-type", value);
          break;
        case "backing_file":
          opts.backingFile = value;
          break;
        case "backing_fmt":
          opts.backingFormat = value;
          break;
        case "nocow":
          opts.nocow = bool(key, value);
          break;
        case "extent_size_hint":
          opts.extentSizeHint = size(key, value);
          break;
      }
    }
  }
  return opts;
}

/** The option summary qemu-img prints after "Formatting": its order and names, values as given. */
function describeOptions(
  format: string,
  size: number | bigint,
  o: ParsedCreateOptions,
  verbatim: Map<string, string>,
): string {
  const parts: string[] = [];
  const add = (name: string, value: string | number | undefined) => {
    const shown = verbatim.get(name) ?? value;
    if (shown !== undefined) parts.push(`${name}=${shown}`);
  };
  const onOff = (v: boolean | undefined) => v === undefined ? undefined : v ? "on" : "off";
  if (format === "qcow2") {
    add("cluster_size", o.clusterSize ?? 65536);
    add("extended_l2", onOff(o.extendedL2 ?? false));
    add("preallocation", o.preallocation);
    add("compression_type", o.compressionType ?? "zlib");
    parts.push(`size=${size}`);
    add("compat", o.compat);
    add("backing_file", o.backingFile);
    add("backing_fmt", o.backingFormat);
    add("lazy_refcounts", onOff(o.lazyRefcounts ?? false));
    add("refcount_bits", o.refcountBits ?? 16);
  } else {
    parts.push(`size=${size}`);
  }
  // The file protocol's options come last, in its order.
  add("nocow", onOff(o.nocow));
  if (format !== "qcow2") add("preallocation", o.preallocation);
  add("extent_size_hint", o.extentSizeHint);
  return parts.join(" ");
}

const CREATE_OPTIONS = {
  format: { type: "string", short: "f", default: "raw" },
  options: { type: "string", short: "o", multiple: true, default: [] },
  quiet: { type: "boolean", short: "q", default: false },
  help: { type: "boolean", short: "h", default: false },
  backing: { type: "string", short: "b" },
  "backing-format": { type: "string", short: "F" },
  unsafe: { type: "boolean", short: "u", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help create`. */
export const createHelp: VerbHelp = {
  text:
    "usage: vstor create [-f FMT] [-o OPTIONS] [-b BACKING -F BACKING_FMT [-u]] [-q] FILE [SIZE]\n" +
    "\n" +
    "Create a new image FILE of SIZE bytes (an existing FILE is overwritten). On failure no\n" +
    "unfinished image is left behind.\n" +
    "\n" +
    "  -f FMT          image format: raw (default) or qcow2\n" +
    "  -o OPTIONS      comma-separated format options, e.g. cluster_size=64k,preallocation=full\n" +
    "                  (-o help lists them)\n" +
    "  -b BACKING      backing file (qcow2), resolved relative to FILE's directory\n" +
    "  -F BACKING_FMT  format of the backing file (required with -b)\n" +
    "  -u              unsafe: do not open the backing file (SIZE is then required)\n" +
    "  -q              quiet: do not print the 'Formatting' line\n" +
    "  -h, --help      print this help\n" +
    "  SIZE            bytes, or with a k, M, G, T, P or E suffix (default: the backing file's)\n" +
    "\n" +
    "Example: vstor create -f qcow2 -o cluster_size=64k disk.qcow2 10G\n",
  options: optionFlags(CREATE_OPTIONS),
};

/** The create verb; returns the exit code. */
export async function createMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, CREATE_OPTIONS);
  if (values.help) {
    io.stdout(createHelp.text);
    return EXIT_OK;
  }
  const dropIn = programName(io) !== "vstor";
  const format = values.format;
  if (!formatNames().includes(format)) {
    throw new UsageError(`Unknown file format '${format}' (known: ${formatNames().join(", ")})`, {
      qemu: `${positionals[0] ?? ""}: Unknown file format '${format}'`,
      tryHelp: false,
    });
  }
  if (values.options.some((o) => o === "help" || o === "?")) {
    io.stdout(createOptionsHelp(format, positionals[0] !== undefined));
    return EXIT_OK;
  }
  const [name, sizeText, ...extra] = positionals;
  if (name === undefined) throw new UsageError("Expecting image file name");
  // "Formatting" names the image as given; the file created is the one qemu's protocol names.
  const file = name;
  const path = hostPath(io, name);
  if (extra.length > 0) {
    throw new UsageError(`Unexpected argument '${extra[0]}'`, {
      qemu: `Unexpected argument: ${extra[0]}`,
    });
  }
  // qemu-img parses the size argument first, then the options.
  const hugeSize = sizeText === undefined ? undefined : parseHugeSize(sizeText, dropIn);
  const deferred: string[] = [];
  const verbatim = new Map<string, string>();
  const { size: optionSize, ...opts } = parseCreateOptions(
    values.options,
    format,
    dropIn ? { file, deferred, verbatim } : {},
  );
  if (values.backing !== undefined) opts.backingFile = values.backing;
  if (values["backing-format"] !== undefined) opts.backingFormat = values["backing-format"];
  let size: number | bigint | undefined = hugeSize ??
    (sizeText !== undefined ? parseImageSize(sizeText) : optionSize);
  if (opts.backingFile !== undefined) {
    if (format !== "qcow2") {
      throw new UsageError(`Backing file not supported for file format '${format}'`, {
        qemu: `${file}: Backing file not supported for file format '${format}'`,
        tryHelp: false,
      });
    }
    const missingFormat = `${file}: Backing file specified without backing format`;
    if (opts.backingFormat === undefined && (!dropIn || values.unsafe)) {
      throw new UsageError(missingFormat, { tryHelp: false });
    }
    if (!values.unsafe) {
      // As qemu-img: the base must open (relative to the new image), and gives the size by default.
      const basePath = resolveBacking(path, opts.backingFile);
      let base;
      try {
        base = await openImage(basePath, {
          ...(opts.backingFormat === undefined ? {} : { format: opts.backingFormat }),
          readOnly: true,
          forceShare: true,
        });
      } catch (e) {
        throw new BlockError(
          "io",
          `${file}: ${(e as Error).message}\nCould not open backing image.`,
          { cause: e },
        );
      }
      size ??= base.size;
      await base.close();
      if (opts.backingFormat === undefined) {
        // qemu-img names the format it probed, in a hint that ends without a newline.
        errorLine(io, missingFormat);
        io.stderr(`Detected format of ${base.format}.`);
        return EXIT_ERROR;
      }
    }
  }
  if (size === undefined) {
    throw new UsageError(`${file}: Image creation needs a size parameter`, { tryHelp: false });
  }
  // vstor refuses bad qcow2 options before touching FILE, so an existing file is left alone;
  // qemu-img finds them only after creating (and so deletes) the file, and drop-in does as it does.
  if (!dropIn && format === "qcow2" && typeof size === "number") {
    validateQcow2Options(opts, Math.ceil(size / 512) * 512, path);
  }
  if (!values.quiet) {
    io.stdout(
      `Formatting '${file}', fmt=${format} ${describeOptions(format, size, opts, verbatim)}\n`,
    );
  }
  // What qemu-img's format driver refuses only once it runs, after "Formatting …".
  if (deferred.length > 0) {
    errorLine(io, deferred[0]!);
    return EXIT_ERROR;
  }
  const tooLarge = `${file}: The image size is too large for file format '${format}'` +
    (format === "qcow2" ? " (try using a larger cluster size)" : "");
  if (typeof size === "bigint") {
    errorLine(io, tooLarge);
    return EXIT_ERROR;
  }
  // qcow2 sizes are whole sectors (qemu-img rounds up, and prints the size as given).
  const imageSize = format === "qcow2" ? Math.ceil(size / 512) * 512 : size;
  try {
    await createImage(path, format, imageSize, opts);
  } catch (e) {
    if (!(e instanceof Error)) throw e;
    // As qemu's bdrv_img_create: EFBIG becomes its own message; every failure names the file.
    if (dropIn) errorLine(io, /too large/i.test(e.message) ? tooLarge : `${file}: ${e.message}`);
    else errorLine(io, createFailure(path, e));
    return EXIT_ERROR;
  }
  return EXIT_OK;
}

/** The errno a failure carries, looking through its causes. */
function errnoOf(e: unknown): number | undefined {
  for (let at = e; at instanceof Error; at = at.cause) {
    if (at instanceof BlockError && at.context.errno !== undefined) return at.context.errno;
  }
  return undefined;
}

/** Plain vstor's line for a create that failed while writing: why, and what became of FILE. */
function createFailure(path: string, e: Error): string {
  const code = errnoOf(e);
  let exists = true;
  try {
    Deno.statSync(path);
  } catch {
    exists = false;
  }
  const removed = exists ? "" : "; the unfinished image was removed";
  if (code === EFBIG) {
    return `${path}: Could not create the image: File too large (it needs more than the file ` +
      `size limit, ulimit -f, or the file system allows)${removed}`;
  }
  if (code === ENOSPC) {
    return `${path}: Could not create the image: No space left on device${removed}`;
  }
  // As qemu-img: a file that cannot be opened for writing "could not be created".
  if (e.message.startsWith(`Could not open '${path}'`)) {
    return `${path}: ${e.message.replace("Could not open", "Could not create")}`;
  }
  return e.message.includes(path) ? e.message : `${path}: ${e.message}`;
}

/**
 * In drop-in mode, the size argument as qemu-img checks it: its messages for what does not parse,
 * and a size past what vstor handles (2^53) kept as a bigint for the "too large" answer.
 */
function parseHugeSize(text: string, dropIn: boolean): bigint | undefined {
  if (!dropIn) return undefined;
  const parsed = parseSize(text);
  if (!parsed.ok || text.startsWith("-")) {
    throw new UsageError("Invalid image size", {
      qemu: parsed.ok || parsed.reason === "invalid"
        ? "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" +
          "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        : "Invalid image size specified. Must be between 0 and 9223372036854775807.",
      tryHelp: false,
    });
  }
  if (parsed.value > 0x7fffffffffffffffn) {
    throw new UsageError("Invalid image size", {
      qemu: "Invalid image size specified. Must be between 0 and 9223372036854775807.",
      tryHelp: false,
    });
  }
  return parsed.value > BigInt(Number.MAX_SAFE_INTEGER) ? parsed.value : undefined;
}
