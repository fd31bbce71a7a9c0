/**
 * What `qemu-img dd` (QEMU 7.2) does to images, without its command line: how much of the input
 * to copy and how large the output is ({@linkcode planDd}: the input's size capped at count·bs,
 * less skip·bs, in whole sectors), and the block-by-block copy ({@linkcode ddCopy}, a short last
 * block included). The `dd` verb parses its operands, creates the output and prints the result.
 *
 * @module
 */
import type { BlockNode } from "../src/block/node.ts";

const INT64_MAX = 0x7fffffffffffffffn;

/** dd's operands that shape the copy (as qemu-img reads them: bs ≥ 1, all ≤ INT64_MAX). */
export interface DdOptions {
  /** bs=: bytes read and written at a time. */
  blockSize: bigint;
  /** count=: copy at most this many blocks. */
  count?: bigint;
  /** skip=: start this many blocks into the input. */
  skip?: bigint;
}

/** What a dd copies, decided from the input's size before anything is created. */
export interface DdPlan {
  /** Bytes per block. */
  blockSize: number;
  /** Input offset of the first byte copied (the input's end when skip is past it). */
  start: number;
  /** Input offset after the last byte copied. */
  end: number;
  /** Size to create the output image with: what is copied, rounded up to whole sectors. */
  outputSize: number;
  /** skip= pointed past the end of what count= leaves: the output is empty. */
  skipPastEnd: boolean;
}

/**
 * Plan a dd of an input of `inputSize` bytes, as qemu-img 7.2 sizes it.
 *
 * @example
 * ```ts
 * import { planDd } from "./dd.ts";
 * const plan = planDd(10000, { blockSize: 4096n, skip: 1n });
 * if (plan.start !== 4096 || plan.end !== 10000 || plan.outputSize !== 6144) throw new Error();
 * ```
 */
export function planDd(inputSize: number, opts: DdOptions): DdPlan {
  const bs = opts.blockSize;
  let size = BigInt(inputSize);
  const count = opts.count;
  if (count !== undefined && count <= INT64_MAX / bs && count * bs < size) size = count * bs;
  // A skip past the end (or one that overflows) makes an empty output, as dd(1).
  const skip = opts.skip ?? 0n;
  const beyond = opts.skip !== undefined && (skip > INT64_MAX / bs || size < bs * skip);
  const outSize = beyond ? 0n : size - bs * skip;
  return {
    blockSize: Number(bs),
    start: beyond ? Number(size) : Number(bs * skip),
    end: Number(size),
    // Image creation rounds the size up to whole sectors, as QEMU's raw and qcow2 drivers do.
    outputSize: Number((outSize + 511n) / 512n * 512n),
    skipPastEnd: beyond,
  };
}

/** How a dd copy ended: every block copied, or the read or write that failed. */
export type DdCopyResult =
  | { kind: "done"; bytes: number }
  | { kind: "read-error"; offset: number; cause: unknown }
  | { kind: "write-error"; offset: number; cause: unknown };

/**
 * Copy `plan`'s input range from `src` to the start of `dst`, one block at a time (one buffer
 * reused), stopping at the first failed read or write.
 *
 * @param src The input image.
 * @param dst The output image, at least `plan.end - plan.start` bytes long.
 * @param plan From {@linkcode planDd}.
 * @returns The bytes copied, or the failure (input offset for reads, output offset for writes).
 */
export async function ddCopy(src: BlockNode, dst: BlockNode, plan: DdPlan): Promise<DdCopyResult> {
  const block = new Uint8Array(plan.blockSize);
  let inPos = plan.start, outPos = 0;
  while (inPos < plan.end) {
    const bytes = Math.min(block.length, plan.end - inPos);
    const buf = block.subarray(0, bytes);
    try {
      await src.read(inPos, buf);
    } catch (e) {
      return { kind: "read-error", offset: inPos, cause: e };
    }
    inPos += bytes;
    try {
      await dst.write(outPos, buf);
    } catch (e) {
      return { kind: "write-error", offset: outPos, cause: e };
    }
    outPos += bytes;
  }
  return { kind: "done", bytes: outPos };
}
