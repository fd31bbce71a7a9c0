/**
 * `vstor amend [-f FMT] -o OPTIONS [-p] [-q] [--force] FILE`, as qemu-img amend: change a qcow2
 * image's compat level, lazy refcounts, refcount width or size in place. Silent on success.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { formatNames } from "../../formats/open.ts";
import { amendQcow2, type Qcow2AmendOptions } from "../../formats/qcow2/amend.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import { type CliIo, EXIT_OK, UsageError } from "./cli_io.ts";
import { probedRawWarning } from "./text/messages.ts";
import { progressBar } from "./progress.ts";
import { oneFile, openVerbImage, parseVerbArgs } from "./args.ts";
import type { ParseArgsOptionsConfig } from "node:util";
import { optionFlags, type VerbHelp } from "./help.ts";
import { parseSize } from "./text/size.ts";

/** The usage line of the amend verb. */
export const AMEND_USAGE = "vstor amend [-f FMT] -o OPTIONS [-p] [-q] [--force] FILE";

type OptionType = "string" | "number" | "size" | "bool";

/** qcow2's amend options in QEMU's list order (the order its checks run in). */
const AMEND_OPTIONS: ReadonlyArray<readonly [string, OptionType]> = [
  ["encrypt.state", "string"],
  ["encrypt.keyslot", "number"],
  ["encrypt.old-secret", "string"],
  ["encrypt.new-secret", "string"],
  ["encrypt.iter-time", "number"],
  ["size", "size"],
  ["compat", "string"],
  ["backing_file", "string"],
  ["backing_fmt", "string"],
  ["data_file", "string"],
  ["data_file_raw", "bool"],
  ["lazy_refcounts", "bool"],
  ["refcount_bits", "number"],
];

/** qcow2's creation-only options: named in the error hint when one is given to amend. */
const CREATE_ONLY_OPTIONS: ReadonlyArray<readonly [string, OptionType]> = [
  ["encryption", "bool"],
  ["encrypt.format", "string"],
  ["encrypt.key-secret", "string"],
  ["encrypt.cipher-alg", "string"],
  ["encrypt.cipher-mode", "string"],
  ["encrypt.ivgen-alg", "string"],
  ["encrypt.ivgen-hash-alg", "string"],
  ["encrypt.hash-alg", "string"],
  ["encrypt.iter-time", "number"],
  ["cluster_size", "size"],
  ["extended_l2", "bool"],
  ["preallocation", "string"],
  ["compression_type", "string"],
];

/** What `qemu-img amend -o help` prints for qcow2 (QEMU's list, sorted by name). */
const QCOW2_AMEND_HELP = `Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
`;

/** A parsed `-o` value. */
type OptionValue = string | bigint | boolean;

/** The items of a qemu option list: `,,` is a literal comma. */
function splitOptionList(list: string): string[] {
  return list.replaceAll(",,", "\0").split(",").map((i) => i.replaceAll("\0", ","));
}

/** qemu-img's is_valid_option_list: not empty, no unescaped trailing comma. */
function isValidOptionList(list: string): boolean {
  if (list === "") return false;
  const trailing = /,+$/.exec(list)?.[0].length ?? 0;
  return trailing % 2 === 0;
}

/** True when the list asks for help (`help` or `?` as an item). */
function wantsHelp(list: string): boolean {
  return splitOptionList(list).some((i) => i === "help" || i === "?");
}

/** QEMU's qemu_strtou64 with base 0 (decimal, 0x hex, 0 octal; a minus sign wraps around). */
function parseNumber(text: string): bigint | undefined {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (m === null) return undefined;
  const digits = m[2]!;
  const value = /^0[xX]/.test(digits)
    ? BigInt(digits)
    : digits.length > 1 && digits.startsWith("0")
    ? BigInt(`0o${digits.slice(1)}`)
    : BigInt(digits);
  if (value >= 1n << 64n) return undefined;
  return m[1] === "-" ? ((1n << 64n) - value) % (1n << 64n) : value;
}

/** QEMU's qapi_bool_parse. */
function parseBool(text: string): boolean | undefined {
  if (["on", "yes", "true", "y"].includes(text)) return true;
  if (["off", "no", "false", "n"].includes(text)) return false;
  return undefined;
}

/**
 * Parse one option list against `known` (QEMU's qemu_opts_do_parse): the first bad item throws
 * its message; a later value for the same name replaces an earlier one.
 */
function parseOptionList(
  list: string,
  known: ReadonlyMap<string, OptionType>,
): Map<string, OptionValue> {
  const values = new Map<string, OptionValue>();
  for (const item of splitOptionList(list)) {
    if (item === "") continue;
    const eq = item.indexOf("=");
    let name = eq < 0 ? item : item.slice(0, eq);
    let text = eq < 0 ? "on" : item.slice(eq + 1);
    // A bare "noNAME" is NAME=off, as QEMU's option parser reads flags.
    if (eq < 0 && name.startsWith("no") && !known.has(name)) {
      name = name.slice(2);
      text = "off";
    }
    const type = known.get(name);
    if (type === undefined) throw new BlockError("invalid-argument", `Invalid parameter '${name}'`);
    let value: OptionValue | undefined;
    switch (type) {
      case "string":
        value = text;
        break;
      case "number":
        value = parseNumber(text);
        if (value === undefined) {
          throw new BlockError("invalid-argument", `Parameter '${name}' expects a number`);
        }
        break;
      case "bool":
        value = parseBool(text);
        if (value === undefined) {
          throw new BlockError("invalid-argument", `Parameter '${name}' expects 'on' or 'off'`);
        }
        break;
      case "size": {
        const parsed = parseSize(text);
        if (!parsed.ok) {
          throw new BlockError(
            "invalid-argument",
            `Parameter '${name}' expects a non-negative number below 2^64\n` +
              "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
              "and exabytes, respectively.",
          );
        }
        value = parsed.value;
        break;
      }
    }
    values.set(name, value);
  }
  return values;
}

/**
 * Turn `-o` lists into qcow2 amend options, with qemu-img's messages (and its hint when an
 * option exists only for image creation).
 *
 * @throws {BlockError} `invalid-argument` for an unknown option or a malformed value
 */
export function parseAmendOptions(list: string): Qcow2AmendOptions {
  const amendOnly = new Map(AMEND_OPTIONS);
  let values: Map<string, OptionValue>;
  try {
    values = parseOptionList(list, amendOnly);
  } catch (e) {
    const withCreate = new Map([...CREATE_ONLY_OPTIONS, ...AMEND_OPTIONS]);
    let creationOnly = false;
    try {
      parseOptionList(list, withCreate);
      creationOnly = true;
    } catch {
      // Not a creation option either: the first error stands alone.
    }
    if (creationOnly && e instanceof BlockError) {
      throw new BlockError(
        "invalid-argument",
        `${e.message}\nThis option is only supported for image creation`,
      );
    }
    throw e;
  }
  const opts: Qcow2AmendOptions = {};
  const str = (name: string) => values.get(name) as string | undefined;
  const size = values.get("size") as bigint | undefined;
  if (size !== undefined) {
    opts.size = size > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER + 1 : Number(size);
  }
  const compat = str("compat");
  if (compat !== undefined) opts.compat = compat;
  const backingFile = str("backing_file");
  if (backingFile !== undefined) opts.backingFile = backingFile;
  const backingFormat = str("backing_fmt");
  if (backingFormat !== undefined) opts.backingFormat = backingFormat;
  const dataFile = str("data_file");
  if (dataFile !== undefined) opts.dataFile = dataFile;
  const dataFileRaw = values.get("data_file_raw") as boolean | undefined;
  if (dataFileRaw !== undefined) opts.dataFileRaw = dataFileRaw;
  const lazy = values.get("lazy_refcounts") as boolean | undefined;
  if (lazy !== undefined) opts.lazyRefcounts = lazy;
  const bits = values.get("refcount_bits") as bigint | undefined;
  if (bits !== undefined) opts.refcountBits = bits > 64n ? 65 : Number(bits);
  if ([...values.keys()].some((k) => k.startsWith("encrypt."))) opts.encryption = true;
  return opts;
}

/** qemu-img's print_amend_option_help for a format name. */
function amendHelp(format: string): string {
  if (format === "qcow2") return QCOW2_AMEND_HELP;
  if (!formatNames().includes(format)) {
    throw new BlockError("invalid-argument", `Unknown file format '${format}'`);
  }
  throw new BlockError(
    "unsupported",
    `Format driver '${format}' does not support option amendment`,
  );
}

const AMEND_ARGS = {
  format: { type: "string", short: "f" },
  options: { type: "string", short: "o", multiple: true, default: [] },
  progress: { type: "boolean", short: "p", default: false },
  quiet: { type: "boolean", short: "q", default: false },
  force: { type: "boolean", default: false },
  help: { type: "boolean", short: "h", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help amend`. */
export const amendVerbHelp: VerbHelp = {
  text: `usage: ${AMEND_USAGE}

Change a qcow2 image's options in place.

  -o OPTIONS    comma-separated options to change (-o help lists them): compat,
                lazy_refcounts, refcount_bits, size (backing_file/backing_fmt only as they
                are: use rebase)
  -f FMT        image format (probed when absent); only qcow2 images can be amended
  -p            show progress
  -q            quiet: print nothing but errors
  --force       accepted for qemu-img compatibility (it only matters for encryption)
  -h, --help    print this help

Example: vstor amend -o compat=v3,lazy_refcounts=on disk.qcow2
`,
  options: optionFlags(AMEND_ARGS),
};

/** The amend verb; returns the exit code. */
export async function amendMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, AMEND_ARGS);
  if (values.help) {
    io.stdout(amendVerbHelp.text);
    return EXIT_OK;
  }
  if (values.options.length === 0) throw new UsageError("Must specify options (-o)");
  for (const list of values.options) {
    if (!isValidOptionList(list)) throw new UsageError(`Invalid option list: ${list}`);
  }
  const list = values.options.join(",");
  const format = values.format;
  // As qemu-img: with -f, help needs no image.
  if (format !== undefined && wantsHelp(list)) {
    io.stdout(amendHelp(format));
    return EXIT_OK;
  }
  const file = oneFile(positionals, io);
  const first = await openVerbImage(io, file, format === undefined ? {} : { format });
  let handed = false;
  try {
    if (format === undefined && first.format === "raw") io.stderr(probedRawWarning(file));
    if (wantsHelp(list)) {
      io.stdout(amendHelp(first.format));
      return EXIT_OK;
    }
    if (!(first instanceof Qcow2Node)) {
      throw new BlockError(
        "unsupported",
        `Format driver '${first.format}' does not support option amendment`,
      );
    }
    const opts = parseAmendOptions(list);
    const bar = progressBar(values.progress && !values.quiet, io, 1);
    // The first open is handed to the amend (which closes it); later ones reopen the same way.
    handed = true;
    let given = false;
    await amendQcow2(
      async () => {
        if (!given) {
          given = true;
          return first;
        }
        const node = await openVerbImage(io, file, { format: "qcow2" });
        if (!(node instanceof Qcow2Node)) {
          await node.close();
          throw new BlockError("invalid-format", "Image is not in qcow2 format", { path: file });
        }
        return node;
      },
      opts,
      (done, total) => bar.update(done, total),
    );
    bar.finish();
    bar.end();
    return EXIT_OK;
  } finally {
    if (!handed) await first.close();
  }
}
