/**
 * What `qemu-img compare` does to two images, without its command line: walk both by block
 * status, read and compare what is not zero in both, and check that the longer image reads as
 * zeroes past the shorter one's end; in strict mode sizes and allocation must match too. The
 * `compare` verb prints the {@linkcode CompareResult} and turns it into qemu-img's exit code.
 *
 * @module
 */
import type { BlockNode } from "../src/block/node.ts";
import { entryAt, type MapEntry } from "./map.ts";

/** Options of {@linkcode compareImages}. */
export interface CompareOptions {
  /** Strict mode (qemu-img compare -s): sizes and allocation must match as well as contents. */
  strict?: boolean;
  /** Bytes compared so far of the larger image's size. */
  onProgress?: (done: number, total: number) => void;
  /**
   * Called once when the sizes differ and the common part matched, before the longer image's
   * tail is checked (where qemu-img prints "Warning: Image size mismatch!").
   */
  onSizeMismatch?: () => void;
}

/** How two images compare; offsets are guest offsets (a 512-byte sector's start for contents). */
export type CompareResult =
  | { kind: "identical" }
  /** Strict mode: the sizes differ. */
  | { kind: "size-mismatch" }
  /** Strict mode: the allocation differs at `offset`. */
  | { kind: "status-mismatch"; offset: number }
  /** The first sector whose contents differ (or, past the shorter image, is not zero). */
  | { kind: "content-mismatch"; offset: number }
  /** Block status of `filename` failed at `offset` (qemu-img's exit code 3). */
  | { kind: "status-error"; offset: number; filename: string; cause: unknown }
  /** Reading `filename` failed at `offset` (qemu-img's exit code 4). */
  | { kind: "read-error"; offset: number; filename: string; cause: unknown };

const CHUNK = 1 << 20;

/** A failed block status or read, carried out of the walk as its result. */
class Failure extends Error {
  constructor(readonly result: CompareResult) {
    super(result.kind);
  }
}

async function status(node: BlockNode, pos: number, max: number): Promise<MapEntry> {
  try {
    return await entryAt(node, pos, max);
  } catch (e) {
    throw new Failure({ kind: "status-error", offset: pos, filename: node.filename, cause: e });
  }
}

async function read(node: BlockNode, pos: number, dst: Uint8Array): Promise<void> {
  try {
    await node.read(pos, dst);
  } catch (e) {
    throw new Failure({ kind: "read-error", offset: pos, filename: node.filename, cause: e });
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

/**
 * Compare what two open images show the guest, as qemu-img compare does.
 *
 * @param one The first image (qemu-img's filename1).
 * @param two The second image.
 * @param opts Strict mode, progress, and the size-mismatch notice.
 * @returns Identical, the first difference, or the block status or read that failed.
 * @example
 * ```ts
 * import { compareImages } from "./compare.ts";
 * import { RawNode } from "./raw.ts";
 * import { MemoryFile } from "../src/host/memory.ts";
 * const a = await RawNode.open(new MemoryFile("a", new Uint8Array(4096)));
 * const b = await RawNode.open(new MemoryFile("b", new Uint8Array(4096).fill(1, 1024)));
 * const r = await compareImages(a, b);
 * if (r.kind !== "content-mismatch" || r.offset !== 1024) throw new Error(r.kind);
 * ```
 */
export async function compareImages(
  one: BlockNode,
  two: BlockNode,
  opts: CompareOptions = {},
): Promise<CompareResult> {
  try {
    return await walk(one, two, opts);
  } catch (e) {
    if (e instanceof Failure) return e.result;
    throw e;
  }
}

async function walk(one: BlockNode, two: BlockNode, opts: CompareOptions): Promise<CompareResult> {
  const strict = opts.strict ?? false;
  const onProgress = opts.onProgress ?? (() => {});
  if (one.size !== two.size && strict) return { kind: "size-mismatch" };
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
      return { kind: "status-mismatch", offset: pos };
    }
    if (!(s1.zero && s2.zero)) {
      await read(one, pos, a.subarray(0, len));
      await read(two, pos, b.subarray(0, len));
      const at = firstDifference(a.subarray(0, len), b.subarray(0, len));
      if (at >= 0) return { kind: "content-mismatch", offset: pos + at };
    }
    pos += len;
    onProgress(pos, total);
  }
  // The larger image's tail must read as zeroes (qemu-img warns only once the common part matched).
  if (one.size !== two.size) opts.onSizeMismatch?.();
  const larger = one.size > two.size ? one : two;
  for (let pos = common; pos < larger.size;) {
    const s = await status(larger, pos, Math.min(CHUNK, larger.size - pos));
    if (!s.zero) {
      await read(larger, pos, a.subarray(0, s.length));
      const at = firstNonZero(a.subarray(0, s.length));
      if (at >= 0) return { kind: "content-mismatch", offset: pos + at };
    }
    pos += s.length;
    onProgress(pos, total);
  }
  return { kind: "identical" };
}
