/**
 * Damaging qcow2 images on purpose, for check and repair tests: just enough of the format to find
 * the refcount table and blocks, the L1 and L2 tables (active and snapshots') and patch their
 * entries in place. Independent of vstor's own qcow2 code so that a bug there cannot hide here.
 *
 * @module
 */

/** Bit 63 of L1/L2 entries: refcount is exactly 1. */
export const COPIED = 1n << 63n;
/** Bit 62 of L2 entries: compressed cluster. */
export const COMPRESSED = 1n << 62n;
/** Bit 0 of a standard L2 entry (v3, not extended L2): reads as zeroes. */
export const ZERO = 1n;
/** Offset bits 9..55 of L1 entries and standard L2 entries. */
export const OFFSET_MASK = 0x00fffffffffffe00n;

/** The header fields the damage helpers need. */
export interface Qcow2Layout {
  version: number;
  clusterBits: number;
  clusterSize: number;
  /** Virtual size in bytes. */
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  refcountBits: number;
  extendedL2: boolean;
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  l2EntryBytes: number;
  /** Entries per L2 table. */
  l2Entries: number;
}

/** Where a guest cluster's L2 entry lives, and what it holds. */
export interface L2Slot {
  l1Index: number;
  l2Offset: number;
  l2Index: number;
  entry: bigint;
}

/** One snapshot's L1 table. */
export interface SnapshotL1 {
  l1TableOffset: number;
  l1Size: number;
}

/** A qcow2 image opened for patching, with synchronous positional I/O. */
export class Qcow2Patcher {
  readonly layout: Qcow2Layout;
  #file: Deno.FsFile;

  private constructor(file: Deno.FsFile, layout: Qcow2Layout) {
    this.#file = file;
    this.layout = layout;
  }

  /** Open `path` read-write and parse its header. */
  static open(path: string): Qcow2Patcher {
    const file = Deno.openSync(path, { read: true, write: true });
    const header = new Uint8Array(104);
    readAt(file, 0, header);
    const v = new DataView(header.buffer);
    if (v.getUint32(0) !== 0x514649fb) {
      file.close();
      throw new Error(`${path} is not a qcow2 image`);
    }
    const version = v.getUint32(4);
    const clusterBits = v.getUint32(20);
    const incompatible = version >= 3 ? v.getBigUint64(72) : 0n;
    const extendedL2 = (incompatible & (1n << 4n)) !== 0n;
    const clusterSize = 2 ** clusterBits;
    const l2EntryBytes = extendedL2 ? 16 : 8;
    const layout: Qcow2Layout = {
      version,
      clusterBits,
      clusterSize,
      size: Number(v.getBigUint64(24)),
      l1Size: v.getUint32(36),
      l1TableOffset: Number(v.getBigUint64(40)),
      refcountTableOffset: Number(v.getBigUint64(48)),
      refcountTableClusters: v.getUint32(56),
      nbSnapshots: v.getUint32(60),
      snapshotsOffset: Number(v.getBigUint64(64)),
      refcountBits: version >= 3 ? 2 ** v.getUint32(96) : 16,
      extendedL2,
      l2EntryBytes,
      l2Entries: clusterSize / l2EntryBytes,
    };
    return new Qcow2Patcher(file, layout);
  }

  /** The file's length in bytes. */
  fileSize(): number {
    return this.#file.statSync().size;
  }

  /** Grow (or shrink) the file to `bytes`. */
  truncate(bytes: number): void {
    this.#file.truncateSync(bytes);
  }

  /** Read `length` bytes at `offset`. */
  read(offset: number, length: number): Uint8Array {
    const buf = new Uint8Array(length);
    readAt(this.#file, offset, buf);
    return buf;
  }

  /** Write `data` at `offset`. */
  write(offset: number, data: Uint8Array): void {
    this.#file.seekSync(offset, Deno.SeekMode.Start);
    let done = 0;
    while (done < data.length) done += this.#file.writeSync(data.subarray(done));
  }

  #u64(offset: number): bigint {
    return new DataView(this.read(offset, 8).buffer).getBigUint64(0);
  }

  #setU64(offset: number, value: bigint): void {
    const buf = new Uint8Array(8);
    new DataView(buf.buffer).setBigUint64(0, value);
    this.write(offset, buf);
  }

  /** Where cluster `cluster`'s refcount lives: the block's host offset and the entry index in it. */
  #refcountSlot(cluster: number): { block: number; index: number } {
    const { clusterSize, refcountBits, refcountTableOffset, refcountTableClusters } = this.layout;
    const perBlock = clusterSize * 8 / refcountBits;
    const tableIndex = Math.floor(cluster / perBlock);
    if (tableIndex >= refcountTableClusters * clusterSize / 8) {
      throw new RangeError(`cluster ${cluster} is beyond the refcount table`);
    }
    const block = Number(this.#u64(refcountTableOffset + tableIndex * 8) & ~0x1ffn);
    if (block === 0) throw new RangeError(`cluster ${cluster} has no refcount block`);
    return { block, index: cluster % perBlock };
  }

  /** The stored refcount of host cluster `cluster`. */
  refcount(cluster: number): number {
    const { block, index } = this.#refcountSlot(cluster);
    const bits = this.layout.refcountBits;
    if (bits < 8) {
      const bit = index * bits;
      const byte = this.read(block + Math.floor(bit / 8), 1)[0]!;
      return (byte >> (bit % 8)) & ((1 << bits) - 1);
    }
    const bytes = this.read(block + index * bits / 8, bits / 8);
    let value = 0n;
    for (const b of bytes) value = (value << 8n) | BigInt(b);
    return Number(value);
  }

  /** Store `value` as host cluster `cluster`'s refcount. */
  setRefcount(cluster: number, value: number): void {
    const { block, index } = this.#refcountSlot(cluster);
    const bits = this.layout.refcountBits;
    if (value < 0 || value >= 2 ** bits) {
      throw new RangeError(`refcount ${value} needs > ${bits} bits`);
    }
    if (bits < 8) {
      const bit = index * bits;
      const at = block + Math.floor(bit / 8);
      const mask = ((1 << bits) - 1) << (bit % 8);
      const byte = this.read(at, 1)[0]!;
      this.write(at, Uint8Array.of((byte & ~mask) | (value << (bit % 8))));
      return;
    }
    const bytes = new Uint8Array(bits / 8);
    let rest = BigInt(value);
    for (let i = bytes.length - 1; i >= 0; i--) {
      bytes[i] = Number(rest & 0xffn);
      rest >>= 8n;
    }
    this.write(block + index * bits / 8, bytes);
  }

  /** Entry `index` of the L1 table at `l1Offset` (the active one by default). */
  l1Entry(index: number, l1Offset = this.layout.l1TableOffset): bigint {
    return this.#u64(l1Offset + index * 8);
  }

  /** Overwrite entry `index` of the L1 table at `l1Offset` (the active one by default). */
  setL1Entry(index: number, value: bigint, l1Offset = this.layout.l1TableOffset): void {
    this.#setU64(l1Offset + index * 8, value);
  }

  /** The first 64 bits of entry `index` of the L2 table at `l2Offset`. */
  l2Entry(l2Offset: number, index: number): bigint {
    return this.#u64(l2Offset + index * this.layout.l2EntryBytes);
  }

  /** Overwrite the first 64 bits of entry `index` of the L2 table at `l2Offset`. */
  setL2Entry(l2Offset: number, index: number, value: bigint): void {
    this.#setU64(l2Offset + index * this.layout.l2EntryBytes, value);
  }

  /** The subcluster bitmap (second 64 bits) of extended L2 entry `index` of the table at `l2Offset`. */
  l2Bitmap(l2Offset: number, index: number): bigint {
    if (!this.layout.extendedL2) throw new Error("the image has no extended L2 entries");
    return this.#u64(l2Offset + index * 16 + 8);
  }

  /** Overwrite the subcluster bitmap of extended L2 entry `index` of the table at `l2Offset`. */
  setL2Bitmap(l2Offset: number, index: number, value: bigint): void {
    if (!this.layout.extendedL2) throw new Error("the image has no extended L2 entries");
    this.#setU64(l2Offset + index * 16 + 8, value);
  }

  /** The active L2 slot mapping guest byte `guestOffset`; undefined when its L1 entry is empty. */
  slotFor(guestOffset: number): L2Slot | undefined {
    const { clusterSize, l2Entries } = this.layout;
    const guestCluster = Math.floor(guestOffset / clusterSize);
    const l1Index = Math.floor(guestCluster / l2Entries);
    const l2Offset = Number(this.l1Entry(l1Index) & OFFSET_MASK);
    if (l2Offset === 0) return undefined;
    const l2Index = guestCluster % l2Entries;
    return { l1Index, l2Offset, l2Index, entry: this.l2Entry(l2Offset, l2Index) };
  }

  /** The host cluster index holding guest byte `guestOffset` (a normal, allocated cluster). */
  hostClusterOf(guestOffset: number): number {
    const slot = this.slotFor(guestOffset);
    if (slot === undefined) throw new Error(`guest offset ${guestOffset} has no L2 table`);
    if (slot.entry & COMPRESSED) throw new Error(`guest offset ${guestOffset} is compressed`);
    const host = Number(slot.entry & OFFSET_MASK);
    if (host === 0) throw new Error(`guest offset ${guestOffset} is not allocated`);
    return host / this.layout.clusterSize;
  }

  /** The snapshots' L1 tables, in table order. */
  snapshotL1s(): SnapshotL1[] {
    const out: SnapshotL1[] = [];
    let at = this.layout.snapshotsOffset;
    for (let i = 0; i < this.layout.nbSnapshots; i++) {
      const fixed = new DataView(this.read(at, 40).buffer);
      out.push({ l1TableOffset: Number(fixed.getBigUint64(0)), l1Size: fixed.getUint32(8) });
      const length = 40 + fixed.getUint32(36) + fixed.getUint16(12) + fixed.getUint16(14);
      at += Math.ceil(length / 8) * 8;
    }
    return out;
  }

  /** The lowest cluster at or after `from`, below the end of the file, whose refcount is 0. */
  freeClusterInFile(from = 1): number | undefined {
    const clusters = Math.floor(this.fileSize() / this.layout.clusterSize);
    for (let c = from; c < clusters; c++) if (this.refcount(c) === 0) return c;
    return undefined;
  }

  /** Flush to disk and close. */
  close(): void {
    this.#file.syncSync();
    this.#file.close();
  }
}

function readAt(file: Deno.FsFile, offset: number, dst: Uint8Array): void {
  file.seekSync(offset, Deno.SeekMode.Start);
  let done = 0;
  while (done < dst.length) {
    const n = file.readSync(dst.subarray(done));
    if (n === null) throw new RangeError(`read past the end of the file at ${offset + done}`);
    done += n;
  }
}

/** Open `path`, run `fn` on it, and close it even when `fn` throws. */
export function patchImage<T>(path: string, fn: (image: Qcow2Patcher) => T): T {
  const image = Qcow2Patcher.open(path);
  try {
    return fn(image);
  } finally {
    image.close();
  }
}
