/**
 * `vstor dd [-f FMT] [-O OUTPUT_FMT] [-U] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT
 * of=OUTPUT`, as qemu-img 7.2's dd: the output image is created (its size: the input's, capped at
 * count·bs, less skip·bs), then filled block by block (a short last block included); a skip past
 * the end makes an empty output and a warning, exit 0. qemu-img 7.2 has no `osize=`.
 *
 * @module
 */
import type { BlockNode } from "../block/node.ts";
import { BlockError } from "../errors.ts";
import { ddCopy, planDd } from "../../formats/dd.ts";
import { createImage, formatNames } from "../../formats/open.ts";
import { type CliIo, errorLine, EXIT_ERROR, EXIT_OK, UsageError } from "./cli_io.ts";
import type { VerbHelp } from "./help.ts";
import { openVerbImage } from "./args.ts";
import { parseSize } from "./text/size.ts";

export const DD_USAGE =
  "vstor dd [-f FMT] [-O OUTPUT_FMT] [-U] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT";

const INT64_MAX = 0x7fffffffffffffffn;
const INT_MAX = 0x7fffffffn;
const SUFFIX_HINT = "You may use k, M, G, T, P or E suffixes for\n" +
  "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";

/** qemu-img's cvtnum_full: a size in [min, max], its two messages otherwise. */
function cvtnum(name: string, text: string, min = 0n, max = INT64_MAX): bigint {
  const r = parseSize(text);
  if (!r.ok && r.reason === "invalid") {
    throw new UsageError(`Invalid ${name} '${text}'`, {
      tryHelp: false,
      qemu: `Invalid ${name} specified. ${SUFFIX_HINT}`,
    });
  }
  if (!r.ok || r.value > max || r.value < min) {
    throw new UsageError(`Invalid ${name} specified. Must be between ${min} and ${max}.`, {
      tryHelp: false,
    });
  }
  return r.value;
}

interface DdArgs {
  format?: string;
  outFormat: string;
  forceShare: boolean;
  help: boolean;
  operands: string[];
}

/** dd's long options (getopt_long accepts unambiguous prefixes). */
const DD_LONG = ["help", "object", "image-opts", "force-share"];
/** dd's short options: getopt's ":hf:O:U". */
const DD_SHORT = ["h", "f", "O", "U"];

/** `vstor help dd`. */
export const ddHelp: VerbHelp = {
  text: `usage: ${DD_USAGE}

Copy an image into a new image OUTPUT block by block, as dd(1): the OUTPUT_FMT image is created
with the size copied.

  if=INPUT            the image to read
  of=OUTPUT           the image to create (overwritten when it exists)
  bs=BLOCK_SIZE       bytes read and written at a time (default 512; k, M, G suffixes)
  count=BLOCKS        copy only this many blocks
  skip=BLOCKS         skip this many blocks at the start of INPUT
  -f FMT              INPUT's format (probed when absent)
  -O OUTPUT_FMT       OUTPUT's format (default raw)
  -U, --force-share   read INPUT even while another process writes it
  --object, --image-opts
                      not supported by vstor
  -h, --help          print this help

Example: vstor dd -O qcow2 bs=1M count=64 if=disk.raw of=head.qcow2
`,
  options: [...DD_SHORT.map((c) => `-${c}`), ...DD_LONG.map((name) => `--${name}`)],
};

/** getopt_long(":hf:O:U") with --help, --object, --image-opts, --force-share; the rest operands. */
function parseDdArgs(args: string[]): DdArgs {
  const out: DdArgs = { outFormat: "raw", forceShare: false, help: false, operands: [] };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === "--") {
      out.operands.push(...args.slice(i + 1));
      break;
    }
    if (arg.startsWith("--")) {
      const name = arg.slice(2).split("=")[0]!;
      const known = DD_LONG.filter((k) => k.startsWith(name));
      const long = known.includes(name) ? name : known.length === 1 ? known[0] : undefined;
      if (long === undefined || name === "") throw new UsageError(`unrecognized option '${arg}'`);
      if (long === "help") out.help = true;
      else if (long === "force-share") out.forceShare = true;
      else {
        throw new UsageError(`--${long} is not supported by vstor`, { tryHelp: false });
      }
      continue;
    }
    if (arg.startsWith("-") && arg !== "-") {
      for (let k = 1; k < arg.length; k++) {
        const c = arg[k]!;
        if (c === "h") out.help = true;
        else if (c === "U") out.forceShare = true;
        else if (c === "f" || c === "O") {
          let value = arg.slice(k + 1);
          if (value === "") {
            if (i + 1 >= args.length) throw new UsageError(`missing argument for option '-${c}'`);
            value = args[++i]!;
          }
          if (c === "f") out.format = value;
          else out.outFormat = value;
          break;
        } else throw new UsageError(`unrecognized option '${arg}'`);
      }
      continue;
    }
    out.operands.push(arg);
  }
  return out;
}

/** The dd verb; returns the exit code. */
export async function ddMain(args: string[], io: CliIo): Promise<number> {
  const a = parseDdArgs(args);
  if (a.help) {
    io.stdout(ddHelp.text);
    return EXIT_OK;
  }
  let bs = 512n, count = 0n, skip = 0n;
  let input: string | undefined, output: string | undefined;
  let hasCount = false, hasSkip = false;
  for (const operand of a.operands) {
    const eq = operand.indexOf("=");
    const key = eq < 0 ? operand : operand.slice(0, eq);
    const value = operand.slice(eq + 1);
    if (eq < 0 || !["bs", "count", "if", "of", "skip"].includes(key)) {
      throw new UsageError(`unrecognized operand ${key}`, { tryHelp: false });
    }
    if (key === "bs") bs = cvtnum("bs", value, 1n, INT_MAX);
    else if (key === "count") [count, hasCount] = [cvtnum("count", value), true];
    else if (key === "skip") [skip, hasSkip] = [cvtnum("skip", value), true];
    else if (key === "if") input = value;
    else output = value;
  }
  if (input === undefined || output === undefined) {
    throw new UsageError("Must specify both input and output files", { tryHelp: false });
  }
  const src = await openVerbImage(io, input, {
    ...(a.format === undefined ? {} : { format: a.format }),
    readOnly: true,
    forceShare: a.forceShare,
  });
  let dst: BlockNode | undefined;
  try {
    if (!formatNames().includes(a.outFormat)) {
      errorLine(io, "Unknown file format");
      return EXIT_ERROR;
    }
    const plan = planDd(src.size, {
      blockSize: bs,
      ...(hasCount ? { count } : {}),
      ...(hasSkip ? { skip } : {}),
    });
    try {
      await createImage(output, a.outFormat, plan.outputSize);
    } catch (e) {
      const why = e instanceof Error ? e.message : String(e);
      errorLine(io, `${output}: error while creating output image: ${why}`);
      return EXIT_ERROR;
    }
    dst = await openVerbImage(io, output, { format: a.outFormat });
    if (plan.skipPastEnd) errorLine(io, `${input}: cannot skip to specified offset`);
    const copied = await ddCopy(src, dst, plan);
    if (copied.kind === "read-error") {
      errorLine(io, `error while reading from input image file: ${ioMessage(copied.cause)}`);
      return EXIT_ERROR;
    }
    if (copied.kind === "write-error") {
      errorLine(io, `error while writing to output image file: ${ioMessage(copied.cause)}`);
      return EXIT_ERROR;
    }
  } finally {
    await src.close();
    await dst?.close();
  }
  return EXIT_OK;
}

function ioMessage(e: unknown): string {
  return e instanceof BlockError || e instanceof Error ? e.message : String(e);
}
