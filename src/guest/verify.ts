/**
 * Data verification as fio does it: every written block starts with a verify header naming what
 * it should be — magic, type, length, the seed of its data, its own offset, and a CRC32C of the
 * header — followed by the payload: a repeated pattern (`verify=pattern`) or seeded pseudo-random
 * bytes with their CRC32C (`verify=crc32c`, fio's `struct vhdr_crc32` right after the header).
 *
 * The header makes a block self-describing: a read that returns another block's data (a misdirected
 * write or read) fails the offset check; a torn or flipped byte fails a CRC. Because the whole block
 * is a function of (job seed, offset), a failure is located exactly: the expected block is rebuilt
 * and the first differing byte reported with its device offset, expected and found value.
 *
 * Layout (fio's `struct verify_header`, little-endian): magic u16 @0 (0xACCA), verify_type u16 @2,
 * len u32 @4, rand_seed u64 @8, offset u64 @16, time_sec u32 @24, time_nsec u32 @28, thread u16 @32,
 * numberio u16 @34, crc32 u32 @36 (CRC32C of bytes 0..35). crc32c: data CRC u32 @40 over bytes
 * 44..len. pattern: pattern bytes from @40. Time, thread and numberio are written as 0 so a block
 * depends only on (seed, offset) and a later `verify_only` run can rebuild it.
 *
 * @module
 */

import { fmix32, mix32 } from "./random.ts";

/** fio's FIO_HDR_MAGIC. */
export const VERIFY_MAGIC = 0xacca;
/** Bytes of the verify header. */
export const VERIFY_HEADER_BYTES = 40;
/** Smallest block that holds a header and a data CRC. */
export const VERIFY_MIN_BLOCK = 64;
/** verify_type of a crc32c block (fio's enum value). */
export const VERIFY_TYPE_CRC32C = 5;
/** verify_type of a pattern block (fio's enum value). */
export const VERIFY_TYPE_PATTERN = 17;

const H_MAGIC = 0;
const H_TYPE = 2;
const H_LEN = 4;
const H_SEED = 8;
const H_OFFSET = 16;
const H_CRC = 36;
const CRC_FIELD = 40;
const CRC_DATA = 44;

/** Verification modes with a header. */
export type VerifyMode = "pattern" | "crc32c";

/** What identifies a job's blocks. */
export interface VerifyStamp {
  readonly mode: VerifyMode;
  /** The job's seed (shared by its clones, so overlapping clones write identical blocks). */
  readonly seed: number;
  /** Pattern bytes for `pattern` mode (at least one). */
  readonly pattern: Uint8Array;
}

/** Which check failed. */
export type VerifyReason =
  | "magic"
  | "type"
  | "length"
  | "header-crc"
  | "offset"
  | "seed"
  | "data"
  | "data-crc";

/** A block that failed verification. */
export interface VerifyFailure {
  /** Device offset of the block. */
  readonly blockOffset: number;
  /** Block length. */
  readonly length: number;
  /** Which check failed. */
  readonly reason: VerifyReason;
  /** The failing field's expected and found value (a byte for `data`). */
  readonly expected: number;
  /** The failing field's value as read. */
  readonly found: number;
  /** Device offset of the first byte that differs from the rebuilt block (−1 if none differs). */
  readonly offset: number;
  /** That byte, expected and found. */
  readonly expectedByte: number;
  /** That byte as read. */
  readonly foundByte: number;
}

// ---- CRC32C (Castagnoli), slicing-by-8 -------------------------------------------------------------

const CRC_TABLES = (() => {
  const t = new Int32Array(8 * 256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = (c & 1) !== 0 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[n] = c;
  }
  for (let n = 0; n < 256; n++) {
    let c = t[n]!;
    for (let s = 1; s < 8; s++) {
      c = t[c & 0xff]! ^ (c >>> 8);
      t[s * 256 + n] = c;
    }
  }
  return t;
})();

/**
 * CRC32C of `data[start, end)`, continuing from `crc` (0 to start).
 *
 * @example
 * ```ts
 * import { crc32c } from "./verify.ts";
 * const check = crc32c(new TextEncoder().encode("123456789"));
 * if (check !== 0xe3069283) throw new Error("crc32c");
 * ```
 */
export function crc32c(data: Uint8Array, start = 0, end: number = data.length, crc = 0): number {
  const t = CRC_TABLES;
  let c = ~crc;
  let i = start;
  for (; i + 8 <= end; i += 8) {
    c ^= data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24);
    c = t[1792 + (c & 0xff)]! ^ t[1536 + ((c >>> 8) & 0xff)]! ^
      t[1280 + ((c >>> 16) & 0xff)]! ^ t[1024 + (c >>> 24)]! ^
      t[768 + data[i + 4]!]! ^ t[512 + data[i + 5]!]! ^ t[256 + data[i + 6]!]! ^
      t[data[i + 7]!]!;
  }
  for (; i < end; i++) c = t[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

// ---- Blocks -------------------------------------------------------------------------------------------

/** The seed of the block at `offset`: what its header's rand_seed holds. */
export function blockSeed(stamp: VerifyStamp, offset: number): number {
  return mix32(stamp.seed, offset);
}

function setU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, value >>> 0, true);
  view.setUint32(at + 4, Math.floor(value / 0x1_0000_0000), true);
}

function getU64(view: DataView, at: number): number {
  return view.getUint32(at + 4, true) * 0x1_0000_0000 + view.getUint32(at, true);
}

/**
 * Writes the block for device offset `offset` into `buf[0, length)`.
 *
 * @param view a DataView over exactly `buf`'s bytes (callers cache one per buffer)
 * @param length block length, a multiple of 4 and at least {@linkcode VERIFY_MIN_BLOCK}
 */
export function fillBlock(
  buf: Uint8Array,
  view: DataView,
  length: number,
  offset: number,
  stamp: VerifyStamp,
): void {
  const seed = blockSeed(stamp, offset);
  view.setUint16(H_MAGIC, VERIFY_MAGIC, true);
  view.setUint16(H_TYPE, stamp.mode === "crc32c" ? VERIFY_TYPE_CRC32C : VERIFY_TYPE_PATTERN, true);
  view.setUint32(H_LEN, length, true);
  setU64(view, H_SEED, seed);
  setU64(view, H_OFFSET, offset);
  view.setUint32(24, 0, true); // time_sec
  view.setUint32(28, 0, true); // time_nsec
  view.setUint32(32, 0, true); // thread, numberio
  view.setUint32(H_CRC, crc32c(buf, 0, H_CRC), true);
  if (stamp.mode === "pattern") {
    const p = stamp.pattern;
    const plen = p.length;
    for (let i = CRC_FIELD; i < length; i++) buf[i] = p[i % plen]!;
    return;
  }
  // xorshift32 from the block's seed (never 0: xorshift would stay 0).
  let x = fmix32(seed) | 1;
  for (let i = CRC_DATA; i < length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    view.setUint32(i, x >>> 0, true);
  }
  view.setUint32(CRC_FIELD, crc32c(buf, CRC_DATA, length), true);
}

/**
 * Checks the block read from device offset `offset` in `buf[0, length)`, in fio's order: magic,
 * type, length, header CRC, offset, seed, then the payload (pattern bytes, or the data CRC).
 *
 * @param scratch at least `length` bytes the function may overwrite (the rebuilt block on failure)
 * @returns null when the block is intact
 */
export function checkBlock(
  buf: Uint8Array,
  view: DataView,
  length: number,
  offset: number,
  stamp: VerifyStamp,
  scratch: Uint8Array,
): VerifyFailure | null {
  const type = stamp.mode === "crc32c" ? VERIFY_TYPE_CRC32C : VERIFY_TYPE_PATTERN;
  const magic = view.getUint16(H_MAGIC, true);
  if (magic !== VERIFY_MAGIC) {
    return locate(buf, length, offset, stamp, scratch, "magic", VERIFY_MAGIC, magic);
  }
  const foundType = view.getUint16(H_TYPE, true);
  if (foundType !== type) {
    return locate(buf, length, offset, stamp, scratch, "type", type, foundType);
  }
  const len = view.getUint32(H_LEN, true);
  if (len !== length) return locate(buf, length, offset, stamp, scratch, "length", length, len);
  const headerCrc = view.getUint32(H_CRC, true);
  const wantHeaderCrc = crc32c(buf, 0, H_CRC);
  if (headerCrc !== wantHeaderCrc) {
    return locate(buf, length, offset, stamp, scratch, "header-crc", wantHeaderCrc, headerCrc);
  }
  const at = getU64(view, H_OFFSET);
  if (at !== offset) return locate(buf, length, offset, stamp, scratch, "offset", offset, at);
  const seed = blockSeed(stamp, offset);
  const foundSeed = getU64(view, H_SEED);
  if (foundSeed !== seed) {
    return locate(buf, length, offset, stamp, scratch, "seed", seed, foundSeed);
  }
  if (stamp.mode === "pattern") {
    const p = stamp.pattern;
    const plen = p.length;
    for (let i = CRC_FIELD; i < length; i++) {
      if (buf[i] !== p[i % plen]) {
        return locate(buf, length, offset, stamp, scratch, "data", p[i % plen]!, buf[i]!);
      }
    }
    return null;
  }
  const dataCrc = view.getUint32(CRC_FIELD, true);
  const wantDataCrc = crc32c(buf, CRC_DATA, length);
  if (dataCrc !== wantDataCrc) {
    return locate(buf, length, offset, stamp, scratch, "data-crc", wantDataCrc, dataCrc);
  }
  return null;
}

/** Rebuilds the expected block in `scratch` and finds the first byte that differs. */
function locate(
  buf: Uint8Array,
  length: number,
  offset: number,
  stamp: VerifyStamp,
  scratch: Uint8Array,
  reason: VerifyReason,
  expected: number,
  found: number,
): VerifyFailure {
  const want = scratch.subarray(0, length);
  fillBlock(want, new DataView(want.buffer, want.byteOffset, length), length, offset, stamp);
  let at = -1;
  for (let i = 0; i < length; i++) {
    if (buf[i] !== want[i]) {
      at = i;
      break;
    }
  }
  if (reason === "data-crc" && at >= 0) {
    // The data CRC is a symptom; the byte is the finding.
    reason = "data";
    expected = want[at]!;
    found = buf[at]!;
  }
  return {
    blockOffset: offset,
    length,
    reason,
    expected,
    found,
    offset: at < 0 ? -1 : offset + at,
    expectedByte: at < 0 ? 0 : want[at]!,
    foundByte: at < 0 ? 0 : buf[at]!,
  };
}

/** One line naming a failure: where, what, expected vs found. */
export function describeFailure(f: VerifyFailure): string {
  const hex = (n: number) => `0x${n.toString(16)}`;
  const what = f.reason === "data"
    ? `data byte: expected ${hex(f.expected)}, found ${hex(f.found)}`
    : `${f.reason}: expected ${hex(f.expected)}, found ${hex(f.found)}`;
  const where = f.offset < 0
    ? ""
    : ` (first bad byte at offset ${f.offset}: expected ${hex(f.expectedByte)}, found ${
      hex(f.foundByte)
    })`;
  return `verify failed in block at offset ${f.blockOffset} (length ${f.length}): ${what}${where}`;
}
