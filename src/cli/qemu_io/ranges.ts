/**
 * Byte-granular I/O over a {@linkcode BlockNode}, as QEMU's block layer serves qemu-io: read-modify-write
 * for nodes that need aligned requests, QEMU's range check, and allocation status for one layer.
 *
 * @module
 */
import type { BlockNode, Extent } from "../../block/node.ts";
import { EIO, IoFailure } from "./text.ts";

function alignDown(n: number, align: number): number {
  return n - (n % align);
}

function isAligned(node: BlockNode, offset: number, length: number): boolean {
  const align = node.requestAlignment;
  return align <= 1 || (offset % align === 0 && length % align === 0);
}

/** The aligned range covering `[offset, offset+length)`, clipped to the node. */
function covering(node: BlockNode, offset: number, length: number): [number, number] {
  const align = node.requestAlignment;
  const start = alignDown(offset, align);
  const end = Math.min(node.size, alignDown(offset + length + align - 1, align));
  return [start, end];
}

export async function readInto(node: BlockNode, offset: number, dst: Uint8Array): Promise<void> {
  const length = dst.length;
  if (isAligned(node, offset, length) || length === 0) return await node.read(offset, dst);
  const [start, end] = covering(node, offset, length);
  const bounce = new Uint8Array(end - start);
  await node.read(start, bounce);
  dst.set(bounce.subarray(offset - start, offset - start + length));
}

export async function writeBytes(
  node: BlockNode,
  offset: number,
  src: Uint8Array,
  fua: boolean,
): Promise<void> {
  const opts = fua ? { fua } : {};
  if (isAligned(node, offset, src.length) || src.length === 0) {
    return await node.write(offset, src, opts);
  }
  const [start, end] = covering(node, offset, src.length);
  const bounce = new Uint8Array(end - start);
  await node.read(start, bounce);
  bounce.set(src, offset - start);
  await node.write(start, bounce, opts);
}

export async function zeroBytes(
  node: BlockNode,
  offset: number,
  length: number,
  unmap: boolean,
  fua: boolean,
): Promise<void> {
  const opts = { ...(unmap ? { unmap } : {}), ...(fua ? { fua } : {}) };
  if (isAligned(node, offset, length) || length === 0) {
    return await node.writeZeroes(offset, length, opts);
  }
  const align = node.requestAlignment;
  const end = offset + length;
  const middleStart = alignDown(offset + align - 1, align);
  const middleEnd = alignDown(end, align);
  if (middleStart >= middleEnd) {
    return await writeBytes(node, offset, new Uint8Array(length), fua);
  }
  if (middleStart > offset) {
    await writeBytes(node, offset, new Uint8Array(middleStart - offset), fua);
  }
  await node.writeZeroes(middleStart, middleEnd - middleStart, opts);
  if (end > middleEnd) await writeBytes(node, middleEnd, new Uint8Array(end - middleEnd), fua);
}

/** Discard is a hint: an unaligned head or tail is left alone, as QEMU does. */
export async function discardBytes(node: BlockNode, offset: number, length: number): Promise<void> {
  if (isAligned(node, offset, length)) return await node.discard(offset, length);
  const align = node.requestAlignment;
  const start = alignDown(offset + align - 1, align);
  const end = alignDown(offset + length, align);
  if (end > start) await node.discard(start, end - start);
}

/** QEMU's request check: inside the node, else EIO. Returns the range as numbers. */
export function checkRange(node: BlockNode, offset: bigint, length: bigint): [number, number] {
  const size = BigInt(node.size);
  if (offset > size || length > size - offset) throw new IoFailure(EIO);
  return [Number(offset), Number(length)];
}

function isAllocated(extent: Extent): boolean {
  return extent.kind === "data" || extent.kind === "zero" || extent.kind === "compressed";
}

/** bdrv_is_allocated(): whether `offset` is allocated in this layer, and for how many bytes. */
export async function allocationAt(
  node: BlockNode,
  offset: number,
  bytes: number,
): Promise<{ allocated: boolean; length: number }> {
  if (offset >= node.size || bytes === 0) return { allocated: false, length: 0 };
  const extent = await node.blockStatus(offset, Math.min(bytes, node.size - offset));
  if (extent.kind === "eof") return { allocated: false, length: 0 };
  return { allocated: isAllocated(extent), length: extent.length };
}

/**
 * Copy-on-read (qemu-io -C): the parts of `[offset, offset+data.length)` this layer does not hold
 * yet are written with what the read returned, so later reads no longer reach the backing node.
 */
export async function copyOnRead(node: BlockNode, offset: number, data: Uint8Array): Promise<void> {
  if (node.backing === undefined || node.readOnly) return;
  let at = offset;
  const end = offset + data.length;
  while (at < end) {
    const extent = await node.blockStatus(at, end - at);
    if (extent.kind === "eof" || extent.length <= 0) return;
    const length = Math.min(extent.length, end - at);
    if (extent.kind === "unallocated") {
      await writeBytes(node, at, data.subarray(at - offset, at - offset + length), false);
    }
    at += length;
  }
}
