/**
 * Persistent dirty bitmaps in qcow2 (docs/interop/qcow2.txt "Bitmaps extension"): the bitmaps
 * header extension, the bitmap directory, bitmap tables and data clusters — read and validated
 * with every field untrusted, tracked in memory while the image is open read-write, and stored
 * back on close as QEMU's block/qcow2-bitmap.c does (IN_USE set on disk while open read-write;
 * a bitmap found IN_USE at open is inconsistent and never stored).
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import type { HostFile } from "../../src/host/host_file.ts";
import {
  AUTOCLEAR_BITMAPS,
  EXT_BITMAPS,
  hasFeature,
  type Qcow2Header,
  serializeHeader,
} from "./header.ts";
import type { Refcounts } from "./refcount.ts";

/** Bitmap directory entry flags. */
export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
const BME_RESERVED_FLAGS = 0xfffffffc;
/** Most bitmaps one image holds (QCOW2_MAX_BITMAPS). */
export const MAX_BITMAPS = 65535;
/** Largest bitmap directory (QCOW2_MAX_BITMAP_DIRECTORY_SIZE). */
export const MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS;
/** Entries of one bitmap table at most (BME_MAX_TABLE_SIZE). */
export const BME_MAX_TABLE_SIZE = 0x8000000;
/** Bytes of one bitmap's data clusters at most (BME_MAX_PHYS_SIZE: 512 MiB). */
export const BME_MAX_PHYS_SIZE = 0x20000000;
export const BME_MIN_GRANULARITY_BITS = 9;
export const BME_MAX_GRANULARITY_BITS = 31;
export const BME_MAX_NAME_SIZE = 1023;
const DIR_ENTRY_HEADER = 24;
const BT_DIRTY_TRACKING = 1;
const TABLE_RESERVED_HI = 0xff000000;
const TABLE_RESERVED_LO = 0x1fe;
const TABLE_ALL_ONES = 1;

/** The bitmaps header extension's fields. */
export interface BitmapsExtension {
  count: number;
  directorySize: number;
  directoryOffset: number;
}

/** One bitmap directory entry (without extra data: QEMU refuses entries that have any). */
export interface BitmapDirEntry {
  name: string;
  /** Bytes of the name up to its first NUL (C's strlen, as QEMU measures it). */
  nameLength?: number;
  tableOffset: number;
  /** Entries of the bitmap table. */
  tableSize: number;
  flags: number;
  granularityBits: number;
}

function invalid(path: string, message: string, offset?: number): BlockError {
  return new BlockError(
    "invalid-format",
    message,
    offset === undefined ? { path } : { path, offset },
  );
}

/**
 * The bitmaps extension of a header, as QEMU reads it: undefined without one, or when the
 * autoclear bit says a program without bitmap support wrote the image since (then the bitmaps
 * are lost: `stale` is true and a read-write open drops the extension).
 *
 * @throws {BlockError} `invalid-format` with QEMU's words for a malformed extension
 */
export function parseBitmapsExtension(
  h: Qcow2Header,
  path: string,
): { ext?: BitmapsExtension; stale: boolean } {
  const raw = h.otherExtensions.find((e) => e.type === EXT_BITMAPS);
  if (raw === undefined) return { stale: false };
  if (raw.data.length !== 24) throw invalid(path, "bitmaps_ext: Invalid extension length");
  if (!hasFeature(h.autoclearFeatures, AUTOCLEAR_BITMAPS)) return { stale: true };
  const v = new DataView(raw.data.buffer, raw.data.byteOffset, 24);
  if (v.getUint32(4) !== 0) throw invalid(path, "bitmaps_ext: Reserved field is not zero");
  const count = v.getUint32(0);
  const size = v.getBigUint64(8);
  const offset = v.getBigUint64(16);
  if (count > MAX_BITMAPS) {
    throw invalid(
      path,
      `bitmaps_ext: Image has ${count} bitmaps, exceeding the QEMU supported maximum of ${MAX_BITMAPS}`,
    );
  }
  if (count === 0) throw invalid(path, "found bitmaps extension with zero bitmaps");
  if (offset % BigInt(2 ** h.clusterBits) !== 0n) {
    throw invalid(path, "bitmaps_ext: invalid bitmap directory offset");
  }
  if (size > BigInt(MAX_BITMAP_DIRECTORY_SIZE)) {
    throw invalid(
      path,
      `bitmaps_ext: bitmap directory size (${size}) exceeds the maximum supported size (${MAX_BITMAP_DIRECTORY_SIZE})`,
    );
  }
  if (offset > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw invalid(path, "bitmaps_ext: invalid bitmap directory offset");
  }
  return {
    ext: { count, directorySize: Number(size), directoryOffset: Number(offset) },
    stale: false,
  };
}

/** Replace (or with undefined, remove) the bitmaps extension in a header's extension list. */
export function setBitmapsExtension(h: Qcow2Header, ext: BitmapsExtension | undefined): void {
  const at = h.otherExtensions.findIndex((e) => e.type === EXT_BITMAPS);
  if (ext === undefined) {
    if (at >= 0) h.otherExtensions.splice(at, 1);
    return;
  }
  const data = new Uint8Array(24);
  const v = new DataView(data.buffer);
  v.setUint32(0, ext.count);
  v.setBigUint64(8, BigInt(ext.directorySize));
  v.setBigUint64(16, BigInt(ext.directoryOffset));
  // QEMU writes the bitmaps extension before the unknown extensions it keeps.
  if (at >= 0) h.otherExtensions[at] = { type: EXT_BITMAPS, data };
  else h.otherExtensions.unshift({ type: EXT_BITMAPS, data });
}

/** Bytes of a directory entry with a name of `nameBytes` bytes (padded to 8). */
export function dirEntrySize(nameBytes: number): number {
  return Math.ceil((DIR_ENTRY_HEADER + nameBytes) / 8) * 8;
}

/** Bytes of bitmap data for `imageSize` bytes at `granularityBits`. */
export function bitmapBytes(imageSize: number, granularityBits: number): number {
  return Math.ceil(Math.ceil(imageSize / 2 ** granularityBits) / 8);
}

/** QEMU's check_dir_entry: whether an entry satisfies the constraints. */
function entryValid(
  e: BitmapDirEntry & { type: number },
  nameSize: number,
  clusterSize: number,
  imageSize: number,
): boolean {
  if (
    e.tableSize === 0 || e.tableOffset === 0 || e.tableOffset % clusterSize !== 0 ||
    e.tableSize > BME_MAX_TABLE_SIZE || e.granularityBits > BME_MAX_GRANULARITY_BITS ||
    e.granularityBits < BME_MIN_GRANULARITY_BITS || (e.flags & BME_RESERVED_FLAGS) !== 0 ||
    nameSize > BME_MAX_NAME_SIZE || e.type !== BT_DIRTY_TRACKING
  ) {
    return false;
  }
  const phys = e.tableSize * clusterSize;
  if (phys > BME_MAX_PHYS_SIZE) return false;
  return (e.flags & BME_FLAG_IN_USE) !== 0 || imageSize <= phys * 8 * 2 ** e.granularityBits;
}

/**
 * Read and validate the bitmap directory (QEMU's bitmap_list_load): entry count matches the
 * extension, entries within the directory, no extra data, each entry within QEMU's constraints.
 *
 * @throws {BlockError} `invalid-format` with QEMU's message
 */
export function readBitmapDirectory(
  file: HostFile,
  ext: BitmapsExtension,
  clusterSize: number,
  imageSize: number,
  path: string,
): BitmapDirEntry[] {
  const size = ext.directorySize;
  if (size === 0) throw invalid(path, "Requested bitmap directory size is zero");
  if (size > MAX_BITMAP_DIRECTORY_SIZE) {
    throw invalid(path, "Requested bitmap directory size is too big");
  }
  if (ext.directoryOffset + size > file.size()) {
    throw invalid(path, "Failed to read bitmap directory: past the end of the file");
  }
  const dir = new Uint8Array(size);
  file.readAt(ext.directoryOffset, dir);
  const v = new DataView(dir.buffer);
  const out: BitmapDirEntry[] = [];
  const decoder = new TextDecoder();
  let at = 0;
  while (at < size) {
    if (at + DIR_ENTRY_HEADER > size) throw invalid(path, "Broken bitmap directory");
    if (out.length + 1 > ext.count) {
      throw invalid(path, "More bitmaps found than specified in header extension");
    }
    const nameSize = v.getUint16(at + 18);
    const extra = v.getUint32(at + 20);
    const next = at + Math.ceil((DIR_ENTRY_HEADER + nameSize + extra) / 8) * 8;
    if (next > size) throw invalid(path, "Broken bitmap directory");
    if (extra !== 0) throw invalid(path, "Bitmap extra data is not supported");
    const nameBytes = dir.subarray(at + DIR_ENTRY_HEADER, at + DIR_ENTRY_HEADER + nameSize);
    const nul = nameBytes.indexOf(0);
    const hiOffset = v.getUint32(at);
    const e = {
      name: decoder.decode(nul < 0 ? nameBytes : nameBytes.subarray(0, nul)),
      nameLength: nul < 0 ? nameSize : nul,
      tableOffset: hiOffset * 2 ** 32 + v.getUint32(at + 4),
      tableSize: v.getUint32(at + 8),
      flags: v.getUint32(at + 12),
      type: dir[at + 16]!,
      granularityBits: dir[at + 17]!,
    };
    if (hiOffset >= 2 ** 21 || !entryValid(e, nameSize, clusterSize, imageSize)) {
      throw invalid(path, `Bitmap '${e.name}' doesn't satisfy the constraints`);
    }
    const { type: _type, ...entry } = e;
    out.push(entry);
    at = next;
  }
  if (out.length !== ext.count) {
    throw invalid(path, "Less bitmaps found than specified in header extension");
  }
  return out;
}

/** The directory bytes for `entries` (QEMU's bitmap_list_store layout). */
export function serializeBitmapDirectory(entries: readonly BitmapDirEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const names = entries.map((e) => enc.encode(e.name));
  const size = names.reduce((n, b) => n + dirEntrySize(b.length), 0);
  const dir = new Uint8Array(size);
  const v = new DataView(dir.buffer);
  let at = 0;
  entries.forEach((e, i) => {
    const name = names[i]!;
    v.setBigUint64(at, BigInt(e.tableOffset));
    v.setUint32(at + 8, e.tableSize);
    v.setUint32(at + 12, e.flags);
    dir[at + 16] = BT_DIRTY_TRACKING;
    dir[at + 17] = e.granularityBits;
    v.setUint16(at + 18, name.length);
    v.setUint32(at + 20, 0);
    dir.set(name, at + DIR_ENTRY_HEADER);
    at += dirEntrySize(name.length);
  });
  return dir;
}

/**
 * Read a bitmap table (QEMU's bitmap_table_load): each entry is 0 (all zeroes), 1 (all ones) or
 * a cluster-aligned data cluster offset inside the file.
 *
 * @throws {BlockError} `invalid-format` for a table past the end of the file or a bad entry
 */
export function readBitmapTable(
  file: HostFile,
  entry: BitmapDirEntry,
  clusterSize: number,
  path: string,
): Float64Array {
  // tableSize is bounded by check_dir_entry (phys size <= 512 MiB): at most 1 Mi entries.
  const bytes = new Uint8Array(entry.tableSize * 8);
  if (entry.tableOffset + bytes.length > file.size()) {
    throw invalid(
      path,
      `Could not read bitmap_table table from image for bitmap '${entry.name}': past the end of the file`,
      entry.tableOffset,
    );
  }
  file.readAt(entry.tableOffset, bytes);
  const v = new DataView(bytes.buffer);
  const out = new Float64Array(entry.tableSize);
  const fileSize = file.size();
  for (let i = 0; i < entry.tableSize; i++) {
    const hi = v.getUint32(i * 8), lo = v.getUint32(i * 8 + 4);
    const offset = (hi & 0x00ffffff) * 2 ** 32 + ((lo & ~0x1ff) >>> 0);
    const bad = (hi & TABLE_RESERVED_HI) !== 0 || (lo & TABLE_RESERVED_LO) !== 0 ||
      (offset !== 0 && ((lo & TABLE_ALL_ONES) !== 0 || offset % clusterSize !== 0 ||
        offset + clusterSize > fileSize));
    if (bad) {
      throw invalid(
        path,
        `Could not read bitmap_table table from image for bitmap '${entry.name}': Invalid argument`,
        entry.tableOffset + i * 8,
      );
    }
    out[i] = offset !== 0 ? offset : lo & TABLE_ALL_ONES;
  }
  return out;
}

/** One all-ones chunk per cluster size, shared: an all-ones table entry costs no memory. */
const ONES = new Map<number, Uint8Array>();
function onesChunk(clusterSize: number): Uint8Array {
  let chunk = ONES.get(clusterSize);
  if (chunk === undefined) ONES.set(clusterSize, chunk = new Uint8Array(clusterSize).fill(0xff));
  return chunk;
}

/**
 * One dirty bitmap in memory: bit k covers guest bytes [k·g, (k+1)·g) for granularity g, stored
 * in chunks of one cluster each (the on-disk data cluster layout: least significant bit first),
 * allocated when first dirtied — memory follows what is dirty, not the image size.
 *
 * @example
 * ```ts
 * import { DirtyBitmap } from "./bitmap.ts";
 * const bm = new DirtyBitmap("b0", {
 *   granularityBits: 16,
 *   enabled: true,
 *   clusterSize: 65536,
 *   size: 1 << 30,
 * });
 * bm.mark(65535, 2); // the last byte of granule 0, the first of granule 1
 * if (!bm.get(0) || !bm.get(1) || bm.get(2) || bm.count() !== 2) throw new Error("bits");
 * ```
 */
export class DirtyBitmap {
  /** The bitmap's name, unique in the image. */
  readonly name: string;
  /** Bytes of the name as the image stores it (up to a NUL). */
  readonly nameLength: number;
  /** log2 of the granularity: one bit covers this many guest bytes. */
  granularityBits: number;
  /** Tracks writes (the AUTO flag). */
  enabled: boolean;
  /** Found IN_USE at open: its data is lost; it is never stored and refuses use. */
  readonly inconsistent: boolean;
  readonly #clusterSize: number;
  readonly #chunkBits: number;
  #size: number;
  #chunks: Array<Uint8Array | undefined> = [];
  /** The shared all-ones chunk, once one is used (compared by identity, never written). */
  #ones: Uint8Array | undefined;

  /**
   * Makes an empty bitmap (no bit set) of the given geometry.
   *
   * @param name the bitmap's name
   * @param opts granularity, AUTO flag, whether it was found inconsistent, the image's cluster size
   *   (the chunk size of the bit store), the guest size covered and the stored name length
   */
  constructor(
    name: string,
    opts: {
      granularityBits: number;
      enabled: boolean;
      inconsistent?: boolean;
      clusterSize: number;
      size: number;
      nameLength?: number;
    },
  ) {
    this.name = name;
    this.nameLength = opts.nameLength ?? new TextEncoder().encode(name).length;
    this.granularityBits = opts.granularityBits;
    this.enabled = opts.enabled;
    this.inconsistent = opts.inconsistent ?? false;
    this.#clusterSize = opts.clusterSize;
    this.#chunkBits = opts.clusterSize * 8;
    this.#size = opts.size;
  }

  /** Guest bytes one bit covers (`2 ** granularityBits`). */
  get granularity(): number {
    return 2 ** this.granularityBits;
  }

  /** Guest bytes the bitmap covers. */
  get size(): number {
    return this.#size;
  }

  /** Bits of the bitmap. */
  get bits(): number {
    return Math.ceil(this.#size / this.granularity);
  }

  /** Entries its bitmap table needs: one per cluster of bitmap data. */
  get tableSize(): number {
    return Math.ceil(bitmapBytes(this.#size, this.granularityBits) / this.#clusterSize);
  }

  /** The chunk (one cluster of bitmap data) at `index`, if any bit of it was ever set. */
  chunk(index: number): Uint8Array | undefined {
    return this.#chunks[index];
  }

  /** Set chunk `index` from a data cluster (load). */
  setChunk(index: number, data: Uint8Array | undefined): void {
    this.#chunks[index] = data;
  }

  /**
   * Set every bit of chunk `index` (an all-ones table entry) without allocating: the chunk is
   * shared and never written (marking it changes nothing; shrinking copies it first).
   */
  setChunkOnes(index: number): void {
    this.#chunks[index] = this.#ones = onesChunk(this.#clusterSize);
  }

  /** Mark guest bytes [offset, offset+length) dirty. Hot path: no allocation once chunks exist. */
  mark(offset: number, length: number): void {
    if (length <= 0) return;
    const g = this.granularity;
    let bit = Math.floor(offset / g);
    const end = Math.min(Math.floor((offset + length - 1) / g) + 1, this.bits);
    const per = this.#chunkBits;
    while (bit < end) {
      const index = Math.floor(bit / per);
      let chunk = this.#chunks[index];
      if (chunk === undefined) chunk = this.#chunks[index] = new Uint8Array(this.#clusterSize);
      const base = index * per;
      const stop = Math.min(end, base + per) - base;
      if (chunk === this.#ones) {
        bit = base + stop;
        continue;
      }
      let b = bit - base;
      // Single bits up to a byte boundary, whole bytes, then single bits.
      while (b < stop && (b & 7) !== 0) chunk[b >> 3]! |= 1 << (b & 7), b++;
      if (stop - b >= 8) {
        chunk.fill(0xff, b >> 3, stop >> 3);
        b = stop & ~7;
      }
      while (b < stop) chunk[b >> 3]! |= 1 << (b & 7), b++;
      bit = base + stop;
    }
  }

  /** Whether bit `k` is set. */
  get(k: number): boolean {
    const chunk = this.#chunks[Math.floor(k / this.#chunkBits)];
    if (chunk === undefined) return false;
    const b = k % this.#chunkBits;
    return (chunk[b >> 3]! & (1 << (b & 7))) !== 0;
  }

  /** Number of set bits (qemu's dirty count in granules). */
  count(): number {
    let n = 0;
    for (const chunk of this.#chunks) {
      if (chunk === undefined) continue;
      for (const byte of chunk) {
        let x = byte;
        while (x) {
          x &= x - 1;
          n++;
        }
      }
    }
    return n;
  }

  /** Clears every bit. */
  clear(): void {
    this.#chunks = [];
  }

  /** The chunk size of this bitmap (bytes of one data cluster). */
  get chunkBytes(): number {
    return this.#clusterSize;
  }

  /** OR `src` into this bitmap (same size; any granularity and cluster size). */
  merge(src: DirtyBitmap): void {
    if (src.granularityBits === this.granularityBits && src.chunkBytes === this.#clusterSize) {
      for (let i = 0; i < src.tableSize; i++) {
        const from = src.chunk(i);
        if (from === undefined) continue;
        let to = this.#chunks[i];
        if (to !== undefined && to === this.#ones) continue;
        if (from === ONES.get(this.#clusterSize)) {
          this.#chunks[i] = this.#ones = from;
          continue;
        }
        if (to === undefined) to = this.#chunks[i] = new Uint8Array(this.#clusterSize);
        const n = Math.min(to.length, from.length);
        for (let k = 0; k < n; k++) to[k]! |= from[k]!;
      }
      return;
    }
    // Different layouts: every set source granule marks its guest bytes here (set bits only).
    const g = src.granularity;
    const per = src.chunkBytes * 8;
    for (let i = 0; i < src.tableSize; i++) {
      const from = src.chunk(i);
      if (from === undefined) continue;
      for (let byte = 0; byte < from.length; byte++) {
        const x = from[byte]!;
        if (x === 0) continue;
        for (let b = 0; b < 8; b++) {
          if ((x & (1 << b)) === 0) continue;
          const k = i * per + byte * 8 + b;
          if (k >= src.bits) break;
          this.mark(k * g, Math.min(g, this.#size - k * g));
        }
      }
    }
  }

  /** Follow an image resize: bits past the new end are dropped, new bits are clean. */
  resize(size: number): void {
    this.#size = size;
    const bits = this.bits;
    const chunks = Math.ceil(bits / this.#chunkBits);
    this.#chunks.length = Math.min(this.#chunks.length, chunks);
    let last = this.#chunks[chunks - 1];
    if (last !== undefined && last === this.#ones) {
      last = this.#chunks[chunks - 1] = last.slice();
    }
    if (last !== undefined) {
      const from = bits - (chunks - 1) * this.#chunkBits;
      for (let b = from; b < this.#chunkBits && (b & 7) !== 0; b++) {
        last[b >> 3]! &= ~(1 << (b & 7));
      }
      last.fill(0, Math.ceil(from / 8));
    }
  }
}

/** What the bitmap store needs from the image it lives in. */
export interface BitmapHost {
  readonly file: HostFile;
  readonly filename: string;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly refcounts: Refcounts;
  /** Guest size of the image. */
  readonly size: number;
  /** Write the header (with its extensions) as it is now, and make it durable. */
  writeHeader(): void;
  /** Write cached tables and apply deferred frees (before clusters are allocated or freed). */
  flushMetadata(): void;
  /** Make what was written durable (fdatasync unless cache=unsafe). */
  barrier(): void;
}

/**
 * The persistent bitmaps of one open qcow2 image: loaded at open, tracked while open
 * read-write, stored on close.
 */
export class Qcow2Bitmaps {
  readonly #host: BitmapHost;
  /** In QEMU's bs->dirty_bitmaps order: the newest first. */
  #list: DirtyBitmap[] = [];
  /** The enabled, consistent bitmaps: what a write marks. */
  #tracking: DirtyBitmap[] = [];
  readonly #writable: boolean;
  /**
   * Where the directory is, as QEMU keeps it in memory (nb_bitmaps, bitmap_directory_offset/size)
   * from open on: an amend to v2 clears the autoclear bit but the bitmaps are still stored (and
   * the old directory freed) on close.
   */
  #ext: BitmapsExtension | undefined;
  /** Open quiet() handles. */
  #quiet = 0;

  private constructor(host: BitmapHost, writable: boolean) {
    this.#host = host;
    this.#writable = writable;
  }

  /**
   * Load the bitmaps of an image (QEMU's qcow2_load_dirty_bitmaps). On a writable image a stale
   * extension (autoclear bit cleared) is dropped from the header, and consistent bitmaps are
   * marked IN_USE on disk, in place.
   *
   * @throws {BlockError} `invalid-format` for a malformed extension, directory or table
   */
  static load(
    host: BitmapHost,
    writable: boolean,
    warn?: (message: string, trailer?: string) => void,
  ): Qcow2Bitmaps {
    const set = new Qcow2Bitmaps(host, writable);
    const h = host.header;
    const { ext, stale } = parseBitmapsExtension(h, host.filename);
    if (stale) {
      warn?.(
        h.version < 3
          ? "This qcow2 v2 image contains bitmaps, but they may have been modified by a program " +
            "without persistent bitmap support; so now they must all be considered inconsistent"
          : "a program lacking bitmap support modified this file, so all bitmaps are now " +
            "considered inconsistent",
        "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.",
      );
      if (writable) {
        const before = headerLength(host);
        setBitmapsExtension(h, undefined);
        host.writeHeader();
        zeroHeaderTail(host, before);
      }
      return set;
    }
    if (ext === undefined) return set;
    set.#ext = ext;
    const cs = host.clusterSize;
    const entries = readBitmapDirectory(host.file, ext, cs, host.size, host.filename);
    const loaded: DirtyBitmap[] = [];
    let needsUpdate = false;
    for (const e of entries) {
      const inconsistent = (e.flags & BME_FLAG_IN_USE) !== 0;
      const bm = new DirtyBitmap(e.name, {
        granularityBits: e.granularityBits,
        enabled: (e.flags & BME_FLAG_AUTO) !== 0,
        inconsistent,
        clusterSize: cs,
        size: host.size,
        ...(e.nameLength === undefined ? {} : { nameLength: e.nameLength }),
      });
      if (!inconsistent) {
        const table = readBitmapTable(host.file, e, cs, host.filename);
        if (table.length !== bm.tableSize) {
          throw invalid(
            host.filename,
            `Could not read bitmap '${e.name}' from image: Invalid argument`,
          );
        }
        for (let i = 0; i < table.length; i++) {
          const t = table[i]!;
          if (t === 0) continue;
          if (t === 1) bm.setChunkOnes(i);
          else {
            const chunk = new Uint8Array(cs);
            host.file.readAt(t, chunk);
            bm.setChunk(i, chunk);
          }
        }
        // Bits past the end of the image in the last cluster are not part of the bitmap.
        bm.resize(host.size);
        e.flags |= BME_FLAG_IN_USE;
        needsUpdate = true;
      }
      loaded.push(bm);
    }
    set.#list = loaded.reverse();
    set.#retrack();
    if (needsUpdate && writable) set.#updateInPlace(ext, entries);
    return set;
  }

  /** QEMU's update_ext_header_and_dir_in_place: autoclear off, directory, autoclear on. */
  #updateInPlace(ext: BitmapsExtension, entries: BitmapDirEntry[]): void {
    const h = this.#host.header;
    const dir = serializeBitmapDirectory(entries);
    if (dir.length !== ext.directorySize) {
      throw invalid(this.#host.filename, "Can't update bitmap directory: Invalid argument");
    }
    h.autoclearFeatures &= ~BigInt(AUTOCLEAR_BITMAPS);
    this.#host.writeHeader();
    this.#host.file.writeAt(ext.directoryOffset, dir);
    this.#host.writeHeader();
    h.autoclearFeatures |= BigInt(AUTOCLEAR_BITMAPS);
    this.#host.writeHeader();
  }

  #retrack(): void {
    this.#tracking = this.#list.filter((b) => b.enabled && !b.inconsistent);
  }

  /** The bitmaps, in the image's directory order. */
  get list(): readonly DirtyBitmap[] {
    return [...this.#list].reverse();
  }

  /** The bitmap called `name`, if any. */
  find(name: string): DirtyBitmap | undefined {
    return this.#list.find((b) => b.name === name);
  }

  /** Mark guest bytes dirty in every enabled bitmap (writes, zero writes, discards). */
  mark(offset: number, length: number): void {
    if (this.#quiet > 0) return;
    const t = this.#tracking;
    for (let i = 0; i < t.length; i++) t[i]!.mark(offset, length);
  }

  /**
   * Stop marking until the returned handle is disposed (`using`): the zeroes an image resize
   * writes into its new range are not guest writes.
   */
  quiet(): Disposable {
    this.#quiet++;
    return { [Symbol.dispose]: () => void this.#quiet-- };
  }

  /** A bitmap was enabled or disabled: what writes mark changes. */
  changed(): void {
    this.#retrack();
  }

  /**
   * Add a new persistent bitmap (QEMU's block-dirty-bitmap-add with persistent=on).
   *
   * @throws {BlockError} `invalid-argument` with QEMU's message
   */
  add(name: string, granularity: number, disabled: boolean): DirtyBitmap {
    const h = this.#host.header;
    if (name === "") throw new BlockError("invalid-argument", "Bitmap name cannot be empty");
    if (granularity < 512 || (granularity & (granularity - 1)) !== 0 || granularity > 2 ** 31) {
      throw new BlockError("invalid-argument", "Granularity must be power of 2 and at least 512");
    }
    if (this.find(name) !== undefined) {
      throw new BlockError("invalid-argument", `Bitmap already exists: ${name}`);
    }
    const prefix = `Can't make bitmap '${name}' persistent in '${this.#host.filename}': `;
    if (h.version < 3) {
      throw new BlockError("unsupported", prefix + "Cannot store dirty bitmaps in qcow2 v2 files");
    }
    const bits = Math.log2(granularity);
    const bytes = bitmapBytes(this.#host.size, bits);
    if (bytes > BME_MAX_PHYS_SIZE || bytes > BME_MAX_TABLE_SIZE * this.#host.clusterSize) {
      throw new BlockError(
        "invalid-argument",
        prefix + "Too much space will be occupied by the bitmap. Use larger granularity",
      );
    }
    const enc = new TextEncoder();
    const nameBytes = enc.encode(name).length;
    if (nameBytes > BME_MAX_NAME_SIZE) {
      throw new BlockError(
        "invalid-argument",
        prefix + `Name length exceeds maximum (${BME_MAX_NAME_SIZE} characters)`,
      );
    }
    if (this.#list.length + 1 > MAX_BITMAPS) {
      throw new BlockError(
        "invalid-argument",
        prefix + "Maximum number of persistent bitmaps is already reached",
      );
    }
    const dirSize = this.#list.reduce((n, b) => n + dirEntrySize(enc.encode(b.name).length), 0) +
      dirEntrySize(nameBytes);
    if (dirSize > MAX_BITMAP_DIRECTORY_SIZE) {
      throw new BlockError("invalid-argument", prefix + "Not enough space in the bitmap directory");
    }
    const bm = new DirtyBitmap(name, {
      granularityBits: bits,
      enabled: !disabled,
      clusterSize: this.#host.clusterSize,
      size: this.#host.size,
    });
    this.#list.unshift(bm);
    this.#retrack();
    return bm;
  }

  /**
   * Remove a bitmap from memory and the image at once (QEMU's
   * qcow2_co_remove_persistent_dirty_bitmap): a new directory without it, then its clusters freed.
   */
  remove(name: string): void {
    const bm = this.find(name);
    if (bm === undefined) throw new BlockError("not-found", `Dirty bitmap '${name}' not found`);
    this.#list = this.#list.filter((b) => b !== bm);
    this.#retrack();
    const host = this.#host;
    const ext = this.#ext;
    if (ext === undefined) return;
    const entries = readBitmapDirectory(host.file, ext, host.clusterSize, host.size, host.filename);
    const gone = entries.find((e) => e.name === name);
    if (gone === undefined) return;
    host.flushMetadata();
    this.#writeDirectory(entries.filter((e) => e !== gone), ext);
    this.#freeTable(gone);
    host.refcounts.flush();
    host.barrier();
  }

  /** Whether an image resize may go on (QEMU's qcow2_truncate_bitmaps_check). */
  checkResize(): void {
    for (const bm of this.list) {
      if (bm.inconsistent) throw inconsistentError(bm.name);
    }
  }

  /** Follow an image resize. */
  resize(size: number): void {
    for (const bm of this.#list) if (!bm.inconsistent) bm.resize(size);
  }

  /**
   * Store every consistent bitmap (QEMU's qcow2_store_persistent_dirty_bitmaps on close): data
   * clusters and a table for each, in directory order, a new directory, one header switch, then
   * the old directory and the old tables are freed.
   */
  store(): void {
    if (!this.#writable) return;
    const host = this.#host;
    const cs = host.clusterSize;
    const ext = this.#ext;
    const entries = ext === undefined
      ? []
      : readBitmapDirectory(host.file, ext, cs, host.size, host.filename);
    const drop: BitmapDirEntry[] = [];
    const stored = new Map<BitmapDirEntry, DirtyBitmap>();
    let needWrite = false;
    for (const bm of this.#list) {
      if (bm.inconsistent) continue;
      needWrite = true;
      let e = entries.find((x) => x.name === bm.name);
      if (e === undefined) {
        e = { name: bm.name, tableOffset: 0, tableSize: 0, flags: 0, granularityBits: 0 };
        entries.push(e);
      } else {
        if ((e.flags & BME_FLAG_IN_USE) === 0) {
          throw new BlockError("invalid-format", `Bitmap '${bm.name}' already exists in the image`);
        }
        drop.push({ ...e });
      }
      e.flags = bm.enabled ? BME_FLAG_AUTO : 0;
      e.granularityBits = bm.granularityBits;
      stored.set(e, bm);
    }
    if (!needWrite) return;
    host.flushMetadata();
    for (const e of entries) {
      const bm = stored.get(e);
      if (bm === undefined) continue;
      const tableSize = bm.tableSize;
      if (tableSize > BME_MAX_TABLE_SIZE || tableSize * cs > BME_MAX_PHYS_SIZE) {
        throw new BlockError("invalid-argument", `Bitmap '${bm.name}' is too big`);
      }
      const table = new Uint8Array(tableSize * 8);
      const tv = new DataView(table.buffer);
      for (let i = 0; i < tableSize; i++) {
        const chunk = bm.chunk(i);
        if (chunk === undefined || !chunk.some((b) => b !== 0)) continue;
        const offset = host.refcounts.allocate(1);
        host.file.writeAt(offset, chunk);
        tv.setBigUint64(i * 8, BigInt(offset));
      }
      const tableOffset = host.refcounts.allocate(Math.ceil(table.length / cs));
      host.file.writeAt(tableOffset, table);
      e.tableOffset = tableOffset;
      e.tableSize = tableSize;
    }
    this.#writeDirectory(entries, ext);
    for (const old of drop) this.#freeTable(old);
    host.refcounts.flush();
    host.barrier();
  }

  /** QEMU's update_ext_header_and_dir: new directory, header switch, old directory freed. */
  #writeDirectory(entries: BitmapDirEntry[], old: BitmapsExtension | undefined): void {
    const host = this.#host;
    const cs = host.clusterSize;
    const h = host.header;
    let ext: BitmapsExtension | undefined;
    if (entries.length > 0) {
      const dir = serializeBitmapDirectory(entries);
      const offset = host.refcounts.allocate(Math.ceil(dir.length / cs));
      host.file.writeAt(offset, dir);
      host.refcounts.flush();
      host.barrier();
      ext = { count: entries.length, directorySize: dir.length, directoryOffset: offset };
      h.autoclearFeatures |= BigInt(AUTOCLEAR_BITMAPS);
    } else {
      h.autoclearFeatures &= ~BigInt(AUTOCLEAR_BITMAPS);
    }
    const before = headerLength(host);
    setBitmapsExtension(h, ext);
    this.#ext = ext;
    host.writeHeader();
    zeroHeaderTail(host, before);
    if (old !== undefined && old.directorySize > 0) {
      host.refcounts.change(old.directoryOffset / cs, Math.ceil(old.directorySize / cs), -1);
    }
  }

  /** QEMU's free_bitmap_clusters: data clusters (space released), then the table. */
  #freeTable(e: BitmapDirEntry): void {
    const host = this.#host;
    const cs = host.clusterSize;
    const table = readBitmapTable(host.file, e, cs, host.filename);
    for (const t of table) {
      if (t <= 1) continue;
      host.refcounts.change(t / cs, 1, -1);
      if (host.refcounts.get(t / cs) === 0) host.file.punchHole?.(t, cs);
    }
    host.refcounts.change(e.tableOffset / cs, Math.ceil(e.tableSize * 8 / cs), -1);
  }
}

/** Bytes the header cluster's used part takes (header, extensions, backing name). */
function headerLength(host: BitmapHost): number {
  return serializeHeader(host.header, host.filename).length;
}

/**
 * A header that lost its bitmaps extension is shorter: zero what the old one held past the new
 * end, as QEMU's qcow2_update_header writes the whole header cluster zero-padded.
 */
function zeroHeaderTail(host: BitmapHost, before: number): void {
  const after = headerLength(host);
  if (after < before) host.file.writeAt(after, new Uint8Array(before - after));
}

/** QEMU's error for using an inconsistent bitmap (with its hint line). */
export function inconsistentError(name: string): BlockError {
  return new BlockError(
    "invalid-argument",
    `Bitmap '${name}' is inconsistent and cannot be used\n` +
      "Try block-dirty-bitmap-remove to delete this bitmap from disk",
  );
}

/**
 * Every host cluster the bitmaps occupy (directory, tables, data clusters), for the refcount
 * check: QEMU's qcow2_check_bitmaps_refcounts. Calls `count(offset, bytes)` for each structure;
 * returns the number of corruptions found (an unreadable directory or table, a bad entry).
 */
export function countBitmapClusters(
  file: HostFile,
  header: Qcow2Header,
  imageSize: number,
  path: string,
  count: (offset: number, bytes: number) => void,
): number {
  let ext: BitmapsExtension | undefined;
  try {
    ext = parseBitmapsExtension(header, path).ext;
  } catch {
    return 0;
  }
  if (ext === undefined) return 0;
  const cs = 2 ** header.clusterBits;
  count(ext.directoryOffset, ext.directorySize);
  let entries: BitmapDirEntry[];
  try {
    entries = readBitmapDirectory(file, ext, cs, imageSize, path);
  } catch {
    return 1;
  }
  let corruptions = 0;
  for (const e of entries) {
    count(e.tableOffset, e.tableSize * 8);
    if (e.tableOffset + e.tableSize * 8 > file.size()) return corruptions + 1;
    const bytes = new Uint8Array(e.tableSize * 8);
    file.readAt(e.tableOffset, bytes);
    const v = new DataView(bytes.buffer);
    for (let i = 0; i < e.tableSize; i++) {
      const hi = v.getUint32(i * 8), lo = v.getUint32(i * 8 + 4);
      const offset = (hi & 0x00ffffff) * 2 ** 32 + ((lo & ~0x1ff) >>> 0);
      if (
        (hi & TABLE_RESERVED_HI) !== 0 || (lo & TABLE_RESERVED_LO) !== 0 ||
        (offset !== 0 && ((lo & TABLE_ALL_ONES) !== 0 || offset % cs !== 0))
      ) {
        corruptions++;
        continue;
      }
      if (offset !== 0) count(offset, cs);
    }
  }
  return corruptions;
}
