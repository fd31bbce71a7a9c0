/**
 * `vstor create [-f FMT] [-o OPTIONS] [-q] FILE SIZE`, as qemu-img create.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import {
  createImage,
  type CreateOptions,
  formatNames,
  openImage,
  resolveBacking,
} from "../../formats/open.ts";
import { type CliIo, errorLine, EXIT_ERROR, EXIT_OK, programName, UsageError } from "./main.ts";
import { parseSize } from "./size.ts";
import { parseVerbArgs } from "./args.ts";

const PREALLOCATION = ["off", "metadata", "falloc", "full"] as const;

/** Parse a qemu-img size argument into a safe integer of bytes. */
export function parseImageSize(text: string): number {
  const parsed = parseSize(text);
  if (!parsed.ok || parsed.value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new UsageError(
      `Invalid image size '${text}'. You may use k, M, G, T, P or E suffixes for kilobytes, ` +
        `megabytes, gigabytes, terabytes, petabytes and exabytes (at most ${Number.MAX_SAFE_INTEGER} bytes)`,
    );
  }
  return Number(parsed.value);
}

/** qemu-img's `-o` options per format, with their help lines. */
const FORMAT_OPTIONS: Record<string, Array<[string, string]>> = {
  raw: [
    ["preallocation=<str>", "Preallocation mode (allowed values: off, falloc, full)"],
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

/** qemu-img's `-o help` text for a format. */
export function createOptionsHelp(format: string): string {
  const lines = [`Supported ${format} options:`];
  for (const [name, help] of FORMAT_OPTIONS[format] ?? []) {
    lines.push(`  ${name.padEnd(22)} - ${help}`);
  }
  return lines.join("\n") + "\n";
}

function parseBool(key: string, value: string): boolean {
  if (value === "on" || value === "true" || value === "yes") return true;
  if (value === "off" || value === "false" || value === "no") return false;
  throw new UsageError(`Parameter '${key}' expects 'on' or 'off'`);
}

function oneOf<T extends string>(key: string, value: string, allowed: readonly T[]): T {
  const found = allowed.find((a) => a === value);
  if (found === undefined) {
    throw new UsageError(`Parameter '${key}' does not accept value '${value}'`);
  }
  return found;
}

/**
 * Parse `-o key=value,key=value` lists into format options. `size` comes back separately.
 *
 * @throws {UsageError} naming the parameter for an unknown key or a bad value
 */
export function parseCreateOptions(
  lists: string[],
  format: string,
): CreateOptions & { size?: number } {
  const known = new Set(
    (FORMAT_OPTIONS[format] ?? []).map(([name]) => name.slice(0, name.indexOf("="))),
  );
  const opts: CreateOptions & { size?: number } = {};
  for (const list of lists) {
    // qemu's option lists escape a comma as ",,".
    for (const item of list.replaceAll(",,", "\0").split(",").map((i) => i.replaceAll("\0", ","))) {
      if (item === "") continue;
      const eq = item.indexOf("=");
      const key = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? "on" : item.slice(eq + 1);
      if (!known.has(key)) throw new UsageError(`Invalid parameter '${key}' for format ${format}`);
      switch (key) {
        case "preallocation":
          opts.preallocation = oneOf(key, value, PREALLOCATION);
          if (format === "raw" && opts.preallocation === "metadata") {
            throw new UsageError(`Unsupported preallocation mode 'metadata' for raw`);
          }
          break;
        case "size":
          opts.size = parseImageSize(value);
          break;
        case "compat": {
          const v = oneOf(key, value, ["0.10", "v2", "1.1", "v3"] as const);
          opts.compat = v === "0.10" || v === "v2" ? "0.10" : "1.1";
          break;
        }
        case "cluster_size":
          opts.clusterSize = parseImageSize(value);
          break;
        case "refcount_bits": {
          const n = Number(value);
          if (!/^[0-9]+$/.test(value)) {
            throw new UsageError(`Parameter 'refcount_bits' expects a number`);
          }
          opts.refcountBits = n;
          break;
        }
        case "lazy_refcounts":
          opts.lazyRefcounts = parseBool(key, value);
          break;
        case "extended_l2":
          opts.extendedL2 = parseBool(key, value);
          break;
        case "compression_type":
          opts.compressionType = oneOf("compression-type", value, ["zlib", "zstd"] as const);
          break;
        case "backing_file":
          opts.backingFile = value;
          break;
        case "backing_fmt":
          opts.backingFormat = value;
          break;
      }
    }
  }
  return opts;
}

/** The option summary qemu-img prints after "Formatting": its order and names. */
function describeOptions(format: string, size: number, o: CreateOptions): string {
  const parts: string[] = [];
  const add = (name: string, value: string | number | undefined) => {
    if (value !== undefined) parts.push(`${name}=${value}`);
  };
  const onOff = (v: boolean | undefined) => v === undefined ? undefined : v ? "on" : "off";
  if (format === "qcow2") {
    add("cluster_size", o.clusterSize ?? 65536);
    add("extended_l2", onOff(o.extendedL2 ?? false));
    add("preallocation", o.preallocation);
    add("compression_type", o.compressionType ?? "zlib");
    add("size", size);
    add("compat", o.compat);
    add("backing_file", o.backingFile);
    add("backing_fmt", o.backingFormat);
    add("lazy_refcounts", onOff(o.lazyRefcounts ?? false));
    add("refcount_bits", o.refcountBits ?? 16);
  } else {
    add("size", size);
    add("preallocation", o.preallocation);
  }
  return parts.join(" ");
}

/** The format a backing file probes as, or undefined when it does not open. */
async function detectFormat(path: string): Promise<string | undefined> {
  try {
    const node = await openImage(path, { readOnly: true, forceShare: true, noBacking: true });
    await node.close();
    return node.format;
  } catch {
    return undefined;
  }
}

/** The create verb; returns the exit code. */
export async function createMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, {
    format: { type: "string", short: "f", default: "raw" },
    options: { type: "string", short: "o", multiple: true, default: [] },
    quiet: { type: "boolean", short: "q", default: false },
    help: { type: "boolean", short: "h", default: false },
    backing: { type: "string", short: "b" },
    "backing-format": { type: "string", short: "F" },
    unsafe: { type: "boolean", short: "u", default: false },
  });
  if (values.help) {
    io.stdout(
      "usage: vstor create [-f FMT] [-o OPTIONS] [-b BACKING -F BACKING_FMT [-u]] [-q] FILE [SIZE]\n" +
        `  -f FMT   image format (${formatNames().join(", ")}; default raw)\n` +
        "  -o OPTS  comma-separated format options (-o help lists them)\n" +
        "  -b FILE  backing file (qcow2), resolved relative to FILE's directory\n" +
        "  -F FMT   format of the backing file (required with -b)\n" +
        "  -u       unsafe: do not open the backing file (SIZE is then required)\n" +
        "  -q       quiet: do not print the 'Formatting' line\n" +
        "  SIZE     bytes, or with a k, M, G, T, P or E suffix\n",
    );
    return EXIT_OK;
  }
  const format = values.format;
  if (!formatNames().includes(format)) {
    throw new UsageError(`Unknown file format '${format}' (known: ${formatNames().join(", ")})`, {
      qemu: `${positionals[0] ?? ""}: Unknown file format '${format}'`,
      tryHelp: false,
    });
  }
  if (values.options.some((o) => o === "help" || o === "?")) {
    io.stdout(createOptionsHelp(format));
    return EXIT_OK;
  }
  const [file, sizeText, ...extra] = positionals;
  if (file === undefined) throw new UsageError("Expecting image file name");
  if (extra.length > 0) throw new UsageError(`Unexpected argument '${extra[0]}'`);
  const { size: optionSize, ...opts } = parseCreateOptions(values.options, format);
  if (values.backing !== undefined) opts.backingFile = values.backing;
  if (values["backing-format"] !== undefined) opts.backingFormat = values["backing-format"];
  let size = sizeText !== undefined ? parseImageSize(sizeText) : optionSize;
  if (opts.backingFile !== undefined) {
    if (format !== "qcow2") {
      throw new UsageError(`Backing file not supported for file format '${format}'`);
    }
    if (opts.backingFormat === undefined) {
      const message = `${file}: Backing file specified without backing format`;
      if (programName(io) === "vstor") throw new UsageError(message);
      // qemu-img names the format it probed, in a hint that ends without a newline.
      const probed = await detectFormat(resolveBacking(file, opts.backingFile));
      errorLine(io, message);
      if (probed !== undefined) io.stderr(`Detected format of ${probed}.`);
      return EXIT_ERROR;
    }
    if (!values.unsafe) {
      // As qemu-img: the base must open (relative to the new image), and gives the size by default.
      const basePath = resolveBacking(file, opts.backingFile);
      let base;
      try {
        base = await openImage(basePath, {
          format: opts.backingFormat,
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
    }
  }
  if (size === undefined) {
    throw new UsageError(`${file}: Image creation needs a size parameter`, { tryHelp: false });
  }
  // qcow2 sizes are whole sectors (qemu-img rounds up).
  const imageSize = format === "qcow2" ? Math.ceil(size / 512) * 512 : size;
  if (!values.quiet) {
    io.stdout(`Formatting '${file}', fmt=${format} ${describeOptions(format, imageSize, opts)}\n`);
  }
  await createImage(file, format, imageSize, opts);
  return EXIT_OK;
}
