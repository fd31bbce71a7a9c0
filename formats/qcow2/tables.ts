/**
 * L1 and L2 table entries: decoding, classification and encoding. Entries are read as two
 * big-endian u32 words so the hot path never touches bigint.
 *
 * @module
 */

/** COPIED (bit 63): refcount is exactly 1, the cluster may be written in place. */
export const HI_COPIED = 0x80000000;
/** Compressed (bit 62). */
export const HI_COMPRESSED = 0x40000000;
/** Reads-as-zero flag (bit 0) of a standard L2 entry. */
export const LO_ZERO = 0x1;
/** Offset bits 9..55 split over the two words. */
const HI_OFFSET_MASK = 0x00ffffff;
const LO_OFFSET_MASK = 0xfffffe00;
/** Bits 53..55: an offset beyond what a JS number holds exactly (and QEMU's 2^56 limit is not reached in practice). */
const HI_UNSAFE_MASK = 0x00e00000;
/** Reserved L1 bits: 1..8 and 56..62. */
const L1_HI_RESERVED = 0x7f000000;
const L1_LO_RESERVED = 0x000001fe;

export const SUBCLUSTERS = 32;

/** What an L2 entry (or one subcluster of it) says about its guest range. */
export type ClusterKind =
  | "unallocated" // reads from backing or zeroes; no host cluster
  | "unallocated-alloc" // extended L2: host cluster exists but this subcluster reads from backing
  | "zero-plain" // reads as zeroes, no host cluster
  | "zero-alloc" // reads as zeroes, host cluster kept
  | "normal" // data at hostOffset
  | "compressed"
  | "invalid";

/** An L2 entry decoded. `hostOffset` is the cluster's host offset (0 for none). */
export interface L2Entry {
  hi: number;
  lo: number;
  /** Extended L2 bitmap: allocation bits (low word) and zero bits (high word). */
  allocMask: number;
  zeroMask: number;
}

/** The host offset of a standard (not compressed) entry; -1 when it is not exactly representable. */
export function entryOffset(hi: number, lo: number): number {
  if (hi & HI_UNSAFE_MASK) return -1;
  return (hi & HI_OFFSET_MASK) * 0x100000000 + ((lo & LO_OFFSET_MASK) >>> 0);
}

/** Encode the high and low words of a standard entry for `hostOffset` with flags. */
export function encodeEntry(hostOffset: number, copied: boolean, zero: boolean): [number, number] {
  const hi = Math.floor(hostOffset / 0x100000000);
  const lo = hostOffset % 0x100000000;
  return [
    ((copied ? HI_COPIED : 0) | hi) >>> 0,
    ((lo & LO_OFFSET_MASK) | (zero ? LO_ZERO : 0)) >>> 0,
  ];
}

/** True when the L1 entry has reserved bits set. */
export function l1Reserved(hi: number, lo: number): boolean {
  return (hi & L1_HI_RESERVED) !== 0 || (lo & L1_LO_RESERVED) !== 0;
}

/**
 * Classify a standard L2 entry (no extended L2). Reserved bits are ignored, as QEMU's I/O path
 * ignores them (only `check` reports them).
 */
export function classifyStandard(hi: number, lo: number, v3: boolean): ClusterKind {
  if (hi & HI_COMPRESSED) return "compressed";
  const offset = (hi & HI_OFFSET_MASK) !== 0 || (lo & LO_OFFSET_MASK) !== 0;
  // v2 has no zero flag: QEMU treats one found there as corruption.
  if (lo & LO_ZERO) return v3 ? (offset ? "zero-alloc" : "zero-plain") : "invalid";
  return offset ? "normal" : "unallocated";
}

/**
 * Classify subcluster `sc` of an extended L2 entry as QEMU does (qcow2_get_subcluster_type):
 * the standard descriptor's zero bit is unused and ignored, so is a compressed entry's bitmap;
 * an entry is invalid as a whole when any subcluster is both allocated and zero, or when it has
 * no host cluster but allocated subclusters.
 */
export function classifySubcluster(
  hi: number,
  lo: number,
  alloc: number,
  zero: number,
  sc: number,
): ClusterKind {
  if (hi & HI_COMPRESSED) return "compressed";
  const hasOffset = (hi & HI_OFFSET_MASK) !== 0 || (lo & LO_OFFSET_MASK) !== 0;
  const bit = 1 << sc;
  if (hasOffset) {
    if ((alloc & zero) !== 0) return "invalid";
    if (zero & bit) return "zero-alloc";
    return alloc & bit ? "normal" : "unallocated-alloc";
  }
  if (alloc !== 0) return "invalid";
  return zero & bit ? "zero-plain" : "unallocated";
}

/** Where a compressed cluster's bytes are: host byte offset and how many bytes to read. */
export interface CompressedLocation {
  hostOffset: number;
  length: number;
}

/** Decode a compressed L2 entry for a given cluster_bits. */
export function compressedLocation(
  hi: number,
  lo: number,
  clusterBits: number,
): CompressedLocation {
  const value = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0);
  const x = BigInt(62 - (clusterBits - 8));
  const hostOffset = Number(value & ((1n << x) - 1n));
  const sectors = Number(value >> x);
  return { hostOffset, length: (sectors + 1) * 512 - (hostOffset & 511) };
}

/** Encode a compressed L2 entry for `length` bytes at `hostOffset`. */
export function encodeCompressed(
  hostOffset: number,
  length: number,
  clusterBits: number,
): [number, number] {
  const x = BigInt(62 - (clusterBits - 8));
  const sectors = BigInt(
    Math.floor((hostOffset + length - 1) / 512) - Math.floor(hostOffset / 512),
  );
  const value = (1n << 62n) | (sectors << x) | BigInt(hostOffset);
  return [Number(value >> 32n) >>> 0, Number(value & 0xffffffffn) >>> 0];
}

/** The host clusters a compressed extent touches (each gets one refcount). */
export function compressedClusters(loc: CompressedLocation, clusterBits: number): [number, number] {
  const first = Math.floor(loc.hostOffset / 2 ** clusterBits);
  const last = Math.floor((loc.hostOffset + loc.length - 1) / 2 ** clusterBits);
  return [first, last];
}
