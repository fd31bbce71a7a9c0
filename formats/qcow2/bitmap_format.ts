/**
 * The on-disk format of persistent dirty bitmaps (docs/interop/qcow2.txt "Bitmaps extension"): the
 * bitmaps header extension, the bitmap directory and bitmap tables, parsed with every field
 * untrusted and with QEMU's words for what is wrong (block/qcow2-bitmap.c), serialized as QEMU
 * writes them; and the clusters they occupy, for the refcount check.
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import type { HostFile } from "../../src/host/host_file.ts";
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS, hasFeature, type Qcow2Header } from "./header.ts";

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
/** A `BlockError` of kind `invalid-format` naming the image (and the offset, when known). */
export function invalid(path: string, message: string, offset?: number): BlockError {
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
