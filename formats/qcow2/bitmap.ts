/**
 * Persistent dirty bitmaps in qcow2 (docs/interop/qcow2.txt "Bitmaps extension"): the bitmaps
 * header extension, the bitmap directory, bitmap tables and data clusters — read and validated
 * with every field untrusted, tracked in memory while the image is open read-write, and stored
 * back on close as QEMU's block/qcow2-bitmap.c does (IN_USE set on disk while open read-write;
 * a bitmap found IN_USE at open is inconsistent and never stored).
 *
 * This file holds an image's set of bitmaps (`Qcow2Bitmaps`: load, IN_USE, add, remove, store);
 * the on-disk format is `bitmap_format.ts` and one bitmap in memory `dirty_bitmap.ts`, both
 * re-exported here.
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import type { HostFile } from "../../src/host/host_file.ts";
import { AUTOCLEAR_BITMAPS, type Qcow2Header, serializeHeader } from "./header.ts";
import type { Refcounts } from "./refcount.ts";
import {
  bitmapBytes,
  type BitmapDirEntry,
  type BitmapsExtension,
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  BME_MAX_NAME_SIZE,
  BME_MAX_PHYS_SIZE,
  BME_MAX_TABLE_SIZE,
  dirEntrySize,
  invalid,
  MAX_BITMAP_DIRECTORY_SIZE,
  MAX_BITMAPS,
  parseBitmapsExtension,
  readBitmapDirectory,
  readBitmapTable,
  serializeBitmapDirectory,
  setBitmapsExtension,
} from "./bitmap_format.ts";
import { DirtyBitmap } from "./dirty_bitmap.ts";

export {
  bitmapBytes,
  type BitmapDirEntry,
  type BitmapsExtension,
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  BME_MAX_GRANULARITY_BITS,
  BME_MAX_NAME_SIZE,
  BME_MAX_PHYS_SIZE,
  BME_MAX_TABLE_SIZE,
  BME_MIN_GRANULARITY_BITS,
  countBitmapClusters,
  dirEntrySize,
  MAX_BITMAP_DIRECTORY_SIZE,
  MAX_BITMAPS,
  parseBitmapsExtension,
  readBitmapDirectory,
  readBitmapTable,
  serializeBitmapDirectory,
  setBitmapsExtension,
} from "./bitmap_format.ts";
export { DirtyBitmap } from "./dirty_bitmap.ts";

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
