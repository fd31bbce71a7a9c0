/**
 * `vstor compare [-f FMT] [-F FMT] [-p] [-q] [-s] [-U] FILE1 FILE2`, as qemu-img compare: exit 0
 * identical, 1 different, 2 open error, 3 block status error, 4 read error.
 *
 * @module
 */
import type { BlockNode } from "../block/node.ts";
import { entryAt, type MapEntry } from "../../formats/map.ts";
import { type CliIo, errorLine, reportError, UsageError } from "./cli_io.ts";
import { progressBar } from "./progress.ts";
import { hostPath, openVerbImage, parseVerbArgs } from "./args.ts";
import type { ParseArgsOptionsConfig } from "node:util";
import { optionFlags, type VerbHelp } from "./help.ts";

export const COMPARE_USAGE = "vstor compare [-f FMT] [-F FMT] [-p] [-q] [-s] [-U] FILE1 FILE2";

const SAME = 0, DIFFERENT = 1, OPEN_ERROR = 2, STATUS_ERROR = 3, READ_ERROR = 4;
const CHUNK = 1 << 20;

class Stop extends Error {
  constructor(readonly code: number, message: string) {
    super(message);
  }
}

async function status(node: BlockNode, pos: number, max: number): Promise<MapEntry> {
  try {
    return await entryAt(node, pos, max);
  } catch (e) {
    throw new Stop(
      STATUS_ERROR,
      `Block status error at offset ${pos} of ${node.filename}: ${(e as Error).message}`,
    );
  }
}

async function read(node: BlockNode, pos: number, dst: Uint8Array): Promise<void> {
  try {
    await node.read(pos, dst);
  } catch (e) {
    throw new Stop(
      READ_ERROR,
      `Error while reading offset ${pos} of ${node.filename}: ${(e as Error).message}`,
    );
  }
}

/** Offset of the first differing 512-byte sector, or -1. */
function firstDifference(a: Uint8Array, b: Uint8Array): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i - (i % 512);
  return -1;
}

function firstNonZero(a: Uint8Array): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== 0) return i - (i % 512);
  return -1;
}

/** Compare two open images; returns the exit code and prints qemu-img's lines. */
async function compareNodes(
  one: BlockNode,
  two: BlockNode,
  strict: boolean,
  say: (s: string) => void,
  onProgress: (d: number, t: number) => void,
): Promise<number> {
  if (one.size !== two.size && strict) {
    say("Strict mode: Image size mismatch!\n");
    return DIFFERENT;
  }
  const common = Math.min(one.size, two.size);
  const total = Math.max(one.size, two.size);
  const a = new Uint8Array(CHUNK), b = new Uint8Array(CHUNK);
  for (let pos = 0; pos < common;) {
    const s1 = await status(one, pos, Math.min(CHUNK, common - pos));
    const s2 = await status(two, pos, s1.length);
    const len = Math.min(s1.length, s2.length);
    if (
      strict && (s1.present !== s2.present || s1.zero !== s2.zero || s1.data !== s2.data ||
        (s1.offset === undefined) !== (s2.offset === undefined))
    ) {
      say(`Strict mode: Offset ${pos} block status mismatch!\n`);
      return DIFFERENT;
    }
    if (!(s1.zero && s2.zero)) {
      await read(one, pos, a.subarray(0, len));
      await read(two, pos, b.subarray(0, len));
      const at = firstDifference(a.subarray(0, len), b.subarray(0, len));
      if (at >= 0) {
        say(`Content mismatch at offset ${pos + at}!\n`);
        return DIFFERENT;
      }
    }
    pos += len;
    onProgress(pos, total);
  }
  // The larger image's tail must read as zeroes (qemu-img warns only once the common part matched).
  if (one.size !== two.size) say("Warning: Image size mismatch!\n");
  const larger = one.size > two.size ? one : two;
  for (let pos = common; pos < larger.size;) {
    const s = await status(larger, pos, Math.min(CHUNK, larger.size - pos));
    if (!s.zero) {
      await read(larger, pos, a.subarray(0, s.length));
      const at = firstNonZero(a.subarray(0, s.length));
      if (at >= 0) {
        say(`Content mismatch at offset ${pos + at}!\n`);
        return DIFFERENT;
      }
    }
    pos += s.length;
    onProgress(pos, total);
  }
  say("Images are identical.\n");
  return SAME;
}

const COMPARE_OPTIONS = {
  "format-a": { type: "string", short: "f" },
  "format-b": { type: "string", short: "F" },
  progress: { type: "boolean", short: "p", default: false },
  quiet: { type: "boolean", short: "q", default: false },
  strict: { type: "boolean", short: "s", default: false },
  "force-share": { type: "boolean", short: "U", default: false },
  help: { type: "boolean", short: "h", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help compare`. */
export const compareHelp: VerbHelp = {
  text: `usage: ${COMPARE_USAGE}

Compare what two images show the guest; sizes may differ when the longer one is zero past the
other's end.

  -f FMT        FILE1's format (probed when absent)
  -F FMT        FILE2's format (probed when absent)
  -s            strict: sizes and allocation must match too
  -p            show progress
  -q            quiet: print nothing, only the exit code tells
  -U            force share: open the images even while another process writes them
  -h, --help    print this help

Exit codes: 0 identical, 1 different, 2 open error, 3 block status error, 4 read error.

Example: vstor compare base.qcow2 copy.raw
`,
  options: optionFlags(COMPARE_OPTIONS),
};

/** The compare verb; returns qemu-img compare's exit code. */
export async function compareMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, COMPARE_OPTIONS);
  if (values.help) {
    io.stdout(compareHelp.text);
    return SAME;
  }
  if (positionals.length !== 2) throw new UsageError("Expecting two image file names");
  const [file1, file2] = positionals.map((name) => hostPath(io, name)) as [string, string];
  const share = values["force-share"];
  const nodes: BlockNode[] = [];
  try {
    for (
      const [file, format] of [[file1, values["format-a"]], [file2, values["format-b"]]] as const
    ) {
      try {
        nodes.push(
          await openVerbImage(io, file, {
            ...(format === undefined ? {} : { format }),
            readOnly: true,
            forceShare: share,
          }),
        );
      } catch (e) {
        reportError(e, io);
        return OPEN_ERROR;
      }
    }
    const bar = progressBar(values.progress && !values.quiet, io, 2);
    try {
      const code = await compareNodes(nodes[0]!, nodes[1]!, values.strict, (s) => {
        if (!values.quiet) io.stdout(s);
      }, (d, t) => bar.update(d, t));
      bar.end();
      return code;
    } catch (e) {
      bar.end();
      if (e instanceof Stop) {
        errorLine(io, e.message);
        return e.code;
      }
      throw e;
    }
  } finally {
    for (const n of nodes) await n.close();
  }
}
