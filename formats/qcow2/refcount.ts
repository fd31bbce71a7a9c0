/**
 * Reference counts: the in-memory refcount table, refcount blocks through a cache, the cluster
 * allocator, and refcount table growth (new blocks describe themselves).
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import type { HostFile } from "../../src/host/host_file.ts";
import { type CacheEntry, TableCache } from "./cache.ts";
import { MAX_REFTABLE_BYTES } from "./header.ts";

/** What the refcount store needs from the image. */
export interface RefcountContext {
  readonly file: HostFile;
  readonly path: string;
  readonly clusterBits: number;
  readonly refcountOrder: number;
  /** Make everything written so far durable before what follows (fdatasync unless cache=unsafe). */
  barrier(): void;
  /** Point the header at a new refcount table (one header write). */
  switchRefcountTable(offset: number, clusters: number): void;
  /** Called with a structure and host offset when an inconsistency is found: marks the image corrupt. */
  corrupt(message: string, offset: number): BlockError;
}

export type Getter = (view: DataView, data: Uint8Array, index: number) => number;
export type Setter = (view: DataView, data: Uint8Array, index: number, value: number) => void;

/** Get and set refcount entry `index` of a block, for a refcount order (width 2^order bits). */
export function refcountAccessors(order: number): [Getter, Setter] {
  const bits = 1 << order;
  if (order < 3) {
    const mask = (1 << bits) - 1;
    const perByte = 8 / bits;
    return [
      (_v, d, i) => (d[Math.floor(i / perByte)]! >> ((i % perByte) * bits)) & mask,
      (_v, d, i, value) => {
        const at = Math.floor(i / perByte), shift = (i % perByte) * bits;
        d[at] = (d[at]! & ~(mask << shift)) | (value << shift);
      },
    ];
  }
  switch (order) {
    case 3:
      return [(_v, d, i) => d[i]!, (_v, d, i, value) => d[i] = value];
    case 4:
      return [(v, _d, i) => v.getUint16(i * 2), (v, _d, i, value) => v.setUint16(i * 2, value)];
    case 5:
      return [(v, _d, i) => v.getUint32(i * 4), (v, _d, i, value) => v.setUint32(i * 4, value)];
    default:
      return [
        (v, _d, i) => {
          const value = v.getBigUint64(i * 8);
          return value > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(value);
        },
        (v, _d, i, value) => v.setBigUint64(i * 8, BigInt(value)),
      ];
  }
}

/**
 * Refcount blocks and refcount-table clusters needed to count `clusters` clusters and themselves
 * (QEMU's `qcow2_refcount_metadata_size`): the fixed point where counting the refcount metadata
 * needs no further blocks. `generousIncrease` leaves room for the table to grow by half.
 */
export function refcountMetadataClusters(
  clusters: bigint,
  clusterSize: number,
  refcountOrder: number,
  generousIncrease = false,
): { blocks: bigint; table: bigint } {
  const cs = BigInt(clusterSize);
  const blocksPerTableCluster = cs / 8n;
  const refcountsPerBlock = cs * 8n / (1n << BigInt(refcountOrder));
  const divRoundUp = (a: bigint, b: bigint) => (a + b - 1n) / b;
  let table = 0n, blocks = 0n, n = 0n, last: bigint;
  let generous = generousIncrease;
  do {
    last = n;
    blocks = divRoundUp(clusters + table + blocks, refcountsPerBlock);
    table = divRoundUp(blocks, blocksPerTableCluster);
    n = clusters + blocks + table;
    if (n === last && generous) {
      clusters += divRoundUp(table, 2n);
      n = 0n; // one more round with the extra clusters
      generous = false;
    }
  } while (n !== last);
  return { blocks, table };
}

/** The refcount structure of one image. */
export class Refcounts {
  readonly maxRefcount: number;
  /** Entries per refcount block, as a power of two. */
  readonly blockBits: number;
  readonly #ctx: RefcountContext;
  readonly #clusterSize: number;
  readonly #get: Getter;
  readonly #set: Setter;
  readonly cache: TableCache;
  #table: Uint8Array;
  #tableView: DataView;
  #tableOffset: number;
  #tableClusters: number;
  /** Lowest cluster index that may be free. */
  #freeHint = 0;
  /** Partially filled cluster for compressed data (QEMU's free_byte_offset); 0 for none. */
  #freeByteOffset = 0;

  constructor(
    ctx: RefcountContext,
    tableOffset: number,
    tableClusters: number,
    cacheBytes: number,
  ) {
    this.#ctx = ctx;
    this.#clusterSize = 2 ** ctx.clusterBits;
    this.blockBits = ctx.clusterBits + 3 - ctx.refcountOrder;
    this.maxRefcount = ctx.refcountOrder === 6
      ? Number.MAX_SAFE_INTEGER
      : 2 ** (1 << ctx.refcountOrder) - 1;
    [this.#get, this.#set] = refcountAccessors(ctx.refcountOrder);
    this.#tableOffset = tableOffset;
    this.#tableClusters = tableClusters;
    this.#table = new Uint8Array(tableClusters * this.#clusterSize);
    ctx.file.readAt(tableOffset, this.#table);
    this.#tableView = new DataView(this.#table.buffer);
    this.cache = new TableCache(this.#clusterSize, cacheBytes, {
      // Past the end of a truncated file a block reads as zeroes, as QEMU reads it (check
      // reports the block as outside the image).
      load: (offset, dst) => ctx.file.readAt(offset, dst),
      writeBack: (entries) => this.#writeBlocks(entries),
    });
  }

  /** Refcount table entries. */
  get tableEntries(): number {
    return this.#table.length / 8;
  }

  get tableOffset(): number {
    return this.#tableOffset;
  }

  get tableClusters(): number {
    return this.#tableClusters;
  }

  /** Host offset of refcount block `index` (0 when none); validated. */
  blockOffset(index: number): number {
    if (index >= this.tableEntries) return 0;
    const hi = this.#tableView.getUint32(index * 8);
    const lo = this.#tableView.getUint32(index * 8 + 4);
    if (hi === 0 && lo === 0) return 0;
    const offset = hi * 0x100000000 + (lo >>> 0);
    if (offset % this.#clusterSize !== 0 || hi >= 0x200000) {
      throw this.#ctx.corrupt(
        `Refblock offset 0x${offset.toString(16)} unaligned (reftable index: ${
          index === 0 ? "0" : `0x${index.toString(16)}`
        })`,
        offset,
      );
    }
    return offset;
  }

  /** All refcount block offsets (for overlap checks and check). */
  *blockOffsets(): IterableIterator<number> {
    for (let i = 0; i < this.tableEntries; i++) {
      const off = this.blockOffset(i);
      if (off !== 0) yield off;
    }
  }

  #block(index: number): CacheEntry | undefined {
    const offset = this.blockOffset(index);
    if (offset === 0) return undefined;
    return this.cache.get(offset);
  }

  /** The refcount of host cluster `cluster`. */
  get(cluster: number): number {
    const index = Math.floor(cluster / 2 ** this.blockBits);
    const block = this.#block(index);
    if (block === undefined) return 0;
    return this.#get(block.view, block.data, cluster % 2 ** this.blockBits);
  }

  /**
   * Add `delta` to the refcount of `count` clusters from `cluster`, allocating refcount blocks as
   * needed. Dropping to zero makes clusters reusable.
   *
   * @throws {BlockError} `corrupt` on underflow, `unsupported` on overflow
   */
  change(cluster: number, count: number, delta: number): void {
    for (let c = cluster; c < cluster + count; c++) {
      const index = Math.floor(c / 2 ** this.blockBits);
      let block = this.#block(index);
      if (block === undefined) {
        if (delta < 0) {
          throw this.#ctx.corrupt(
            `Refcount of cluster ${c} would drop below zero`,
            c * this.#clusterSize,
          );
        }
        this.#allocateBlock(index);
        block = this.#block(index)!;
      }
      const i = c % 2 ** this.blockBits;
      const old = this.#get(block.view, block.data, i);
      const value = old + delta;
      if (value < 0) {
        throw this.#ctx.corrupt(
          `Refcount of cluster ${c} would drop below zero`,
          c * this.#clusterSize,
        );
      }
      if (value > this.maxRefcount) {
        throw new BlockError(
          "unsupported",
          `Refcount of cluster ${c} would exceed ${this.maxRefcount} (refcount_bits too small)`,
          {
            path: this.#ctx.path,
          },
        );
      }
      this.#set(block.view, block.data, i, value);
      block.dirty = true;
      if (value === 0) {
        if (c < this.#freeHint) this.#freeHint = c;
        // A freed cluster may be reused for anything: compressed data no longer packs into it.
        if (Math.floor(this.#freeByteOffset / this.#clusterSize) === c) this.#freeByteOffset = 0;
      }
    }
  }

  /**
   * The stored refcount of `cluster` as decimal text, exact even past 2^53 (64-bit refcounts,
   * which {@linkcode get} caps at Number.MAX_SAFE_INTEGER), for messages such as check's.
   */
  text(cluster: number): string {
    const value = this.get(cluster);
    if (value < Number.MAX_SAFE_INTEGER || this.#ctx.refcountOrder !== 6) return String(value);
    const block = this.#block(Math.floor(cluster / 2 ** this.blockBits))!;
    return block.view.getBigUint64((cluster % 2 ** this.blockBits) * 8).toString();
  }

  /** Set the refcount of one cluster outright (repair). */
  set(cluster: number, value: number): void {
    const old = this.get(cluster);
    if (old !== value) this.change(cluster, 1, value - old);
  }

  /**
   * Allocate `count` contiguous clusters (refcount 1 each) and return the host offset of the first.
   * Clusters at or past the end of the file are free and read as zeroes.
   */
  allocate(count: number): number {
    for (;;) {
      const start = this.#findFree(count);
      // As QEMU: the data run first, then any refcount block it needs after it (the search for
      // the block starts past the run), so a fresh image keeps its data contiguous.
      if (this.#freeHint < start + count) this.#freeHint = start + count;
      // Make sure every block covering the run exists; a new block may land in the run: retry.
      let moved = false;
      const first = Math.floor(start / 2 ** this.blockBits),
        last = Math.floor((start + count - 1) / 2 ** this.blockBits);
      for (let b = first; b <= last; b++) {
        if (this.blockOffset(b) === 0) {
          this.#allocateBlock(b);
          moved = true;
        }
      }
      if (moved && this.#anyUsed(start, count)) continue;
      this.change(start, count, 1);
      this.#freeHint = Math.max(this.#freeHint, start + count);
      return start * this.#clusterSize;
    }
  }

  /**
   * Allocate `size` bytes (at most a cluster) for compressed data, packed after the previous
   * compressed data: in the same host cluster when it fits, across into the next cluster when that
   * one is the next free cluster (as QEMU's qcow2_alloc_bytes), else at the start of a new cluster.
   * Every host cluster touched gains one reference.
   */
  allocateBytes(size: number): number {
    const cs = this.#clusterSize;
    if (size <= 0 || size > cs) throw new RangeError(`Compressed allocation of ${size} bytes`);
    let offset = this.#freeByteOffset;
    // A cluster whose refcount is at the maximum (refcount_bits=1) takes no more sharers.
    if (offset !== 0 && this.get(Math.floor(offset / cs)) >= this.maxRefcount) offset = 0;
    if (offset !== 0 && cs - (offset % cs) >= size) {
      this.change(Math.floor(offset / cs), 1, 1);
    } else {
      const fresh = this.allocate(1);
      if (offset !== 0 && Math.ceil(offset / cs) * cs === fresh) {
        // Spans the partly filled cluster and the fresh one, which has its reference already.
        this.change(Math.floor(offset / cs), 1, 1);
      } else {
        offset = fresh;
      }
    }
    this.#freeByteOffset = (offset + size) % cs === 0 ? 0 : offset + size;
    return offset;
  }

  #anyUsed(start: number, count: number): boolean {
    for (let c = start; c < start + count; c++) if (this.get(c) !== 0) return true;
    return false;
  }

  #findFree(count: number): number {
    const per = 2 ** this.blockBits;
    let run = 0;
    let c = this.#freeHint;
    for (;;) {
      const index = Math.floor(c / per);
      if (index >= this.tableEntries || this.blockOffset(index) === 0) {
        // A whole uncovered range is free.
        const rangeEnd = (index + 1) * per;
        if (run + (rangeEnd - c) >= count) return c - run;
        run += rangeEnd - c;
        c = rangeEnd;
        continue;
      }
      if (this.get(c) === 0) {
        run++;
        if (run === count) return c - count + 1;
      } else {
        run = 0;
      }
      c++;
    }
  }

  /**
   * Create refcount block `index` at the lowest free cluster. When that cluster is in the range the
   * block covers, the block counts itself; when it is in a covered range, that range's block counts
   * it; when it is in another uncovered range, that range's block is made first (there, it counts
   * itself). Ordering: the count, then the block, then the table entry that points at it.
   */
  #allocateBlock(index: number): void {
    if (index >= this.tableEntries) this.#growTable(index);
    if (this.blockOffset(index) !== 0) return;
    const per = 2 ** this.blockBits;
    const cluster = this.#findFree(1);
    const home = Math.floor(cluster / per);
    if (home !== index && this.blockOffset(home) === 0) {
      this.#allocateBlock(home);
      this.#allocateBlock(index);
      return;
    }
    const offset = cluster * this.#clusterSize;
    if (home !== index) {
      this.change(cluster, 1, 1);
      this.flush();
    }
    const entry = this.cache.create(offset);
    if (home === index) this.#set(entry.view, entry.data, cluster - index * per, 1);
    this.#writeBlocks([entry]);
    this.#ctx.barrier();
    this.#setTableEntry(index, offset);
    this.#writeTableEntry(index);
    if (cluster >= this.#freeHint) this.#freeHint = cluster + 1;
  }

  #setTableEntry(index: number, offset: number): void {
    this.#tableView.setUint32(index * 8, Math.floor(offset / 0x100000000));
    this.#tableView.setUint32(index * 8 + 4, offset % 0x100000000);
  }

  #writeTableEntry(index: number): void {
    this.#ctx.file.writeAt(
      this.#tableOffset + index * 8,
      this.#table.subarray(index * 8, index * 8 + 8),
    );
  }

  /**
   * Grow the refcount table so entry `needed` exists: new blocks and the new table go at the end
   * of the image, described by the new blocks themselves; then one header write switches over.
   */
  #growTable(needed: number): void {
    const cs = this.#clusterSize;
    const per = 2 ** this.blockBits;
    const oldEntries = this.tableEntries;
    // Start past everything the old table covers and past the end of the file.
    const fileClusters = Math.ceil(this.#ctx.file.size() / cs);
    const areaStart = Math.max(oldEntries * per, fileClusters);
    let entries = Math.max(needed + 1, Math.ceil(oldEntries * 1.5));
    let tableClusters = 0, blocks = 0;
    for (;;) {
      tableClusters = Math.ceil(entries * 8 / cs);
      const areaEnd = areaStart + blocks + tableClusters;
      const firstBlock = Math.floor(areaStart / per), lastBlock = Math.floor((areaEnd - 1) / per);
      const wantBlocks = lastBlock - firstBlock + 1;
      const wantEntries = Math.max(entries, lastBlock + 1);
      if (wantBlocks === blocks && wantEntries === entries) break;
      blocks = wantBlocks;
      entries = wantEntries;
    }
    if (tableClusters * cs > MAX_REFTABLE_BYTES) {
      throw new BlockError(
        "unsupported",
        "Image is too large: the refcount table would exceed 8 MiB",
        {
          path: this.#ctx.path,
        },
      );
    }
    const firstBlock = Math.floor(areaStart / per);
    const areaEnd = areaStart + blocks + tableClusters;
    // Blocks first (at areaStart..), then the table.
    const written: CacheEntry[] = [];
    for (let b = 0; b < blocks; b++) {
      const blockIndex = firstBlock + b;
      const blockOffset = (areaStart + b) * cs;
      const entry = this.cache.create(blockOffset);
      const lo = Math.max(areaStart, blockIndex * per),
        hi = Math.min(areaEnd, (blockIndex + 1) * per);
      for (let c = lo; c < hi; c++) this.#set(entry.view, entry.data, c - blockIndex * per, 1);
      written.push(entry);
    }
    this.#writeBlocks(written);
    const table = new Uint8Array(tableClusters * cs);
    table.set(this.#table);
    const oldOffset = this.#tableOffset, oldClusters = this.#tableClusters;
    this.#table = table;
    this.#tableView = new DataView(table.buffer);
    for (let b = 0; b < blocks; b++) this.#setTableEntry(firstBlock + b, (areaStart + b) * cs);
    const tableOffset = (areaStart + blocks) * cs;
    this.#ctx.file.writeAt(tableOffset, table);
    this.#ctx.barrier();
    this.#tableOffset = tableOffset;
    this.#tableClusters = tableClusters;
    this.#ctx.switchRefcountTable(tableOffset, tableClusters);
    this.#ctx.barrier();
    this.change(oldOffset / cs, oldClusters, -1);
  }

  /**
   * QEMU's qcow2_refcount_area: make refcount structures that cover `additional` more clusters
   * past `startCluster` (the first cluster after everything in use) — any missing refcount
   * blocks at `startCluster`, then a new refcount table after them, all counted — switch the
   * header to the new table and free the old one. Returns the first cluster after the new
   * structures, where the caller's area begins.
   */
  refcountArea(startCluster: number, additional: number, exact: boolean): number {
    const cs = this.#clusterSize;
    const per = 2 ** this.blockBits;
    const order = this.#ctx.refcountOrder;
    const total = Number(
      refcountMetadataClusters(BigInt(startCluster + additional), cs, order, !exact).blocks,
    );
    const areaIndex = Math.floor(startCluster / per);
    const perTableCluster = cs / 8;
    const entries = Math.ceil((exact ? total : total + Math.ceil(total / 2)) / perTableCluster) *
      perTableCluster;
    const tableClusters = entries * 8 / cs;
    if (tableClusters * cs > MAX_REFTABLE_BYTES) {
      throw new BlockError(
        "unsupported",
        "Image is too large: the refcount table would exceed 8 MiB",
        {
          path: this.#ctx.path,
          errno: 27,
        },
      );
    }
    const table = new Uint8Array(entries * 8);
    table.set(this.#table.subarray(0, Math.min(this.#table.length, table.length)));
    const view = new DataView(table.buffer);
    const entryAt = (i: number) => view.getUint32(i * 8) * 0x100000000 + view.getUint32(i * 8 + 4);
    let missing = 0;
    for (let i = areaIndex; i < total; i++) if (entryAt(i) === 0) missing++;
    const tableStart = startCluster + missing;
    const end = tableStart + tableClusters;
    let nextBlock = startCluster;
    for (let i = areaIndex; i < total; i++) {
      let block: CacheEntry;
      const existing = entryAt(i);
      if (existing !== 0) {
        block = this.cache.get(existing);
      } else {
        block = this.cache.create(nextBlock * cs);
        view.setUint32(i * 8, Math.floor(nextBlock * cs / 0x100000000));
        view.setUint32(i * 8 + 4, (nextBlock * cs) % 0x100000000);
        nextBlock++;
      }
      const firstCovered = i * per;
      if (firstCovered < end) {
        const from = Math.max(0, startCluster - firstCovered);
        const to = Math.min(end - firstCovered, per);
        for (let j = from; j < to; j++) this.#set(block.view, block.data, j, 1);
        block.dirty = true;
      }
    }
    this.cache.flush();
    this.#ctx.file.writeAt(tableStart * cs, table);
    this.#ctx.barrier();
    const oldOffset = this.#tableOffset, oldClusters = this.#tableClusters;
    this.#ctx.switchRefcountTable(tableStart * cs, tableClusters);
    this.#ctx.barrier();
    this.#table = table;
    this.#tableView = view;
    this.#tableOffset = tableStart * cs;
    this.#tableClusters = tableClusters;
    this.change(oldOffset / cs, oldClusters, -1);
    return end;
  }

  /** Write refcount blocks back and mark them clean. */
  #writeBlocks(entries: CacheEntry[]): void {
    for (const e of entries) {
      if (!e.dirty && entries.length > 1) continue;
      this.#ctx.file.writeAt(e.offset, e.data);
      e.dirty = false;
    }
  }

  /** Write every dirty refcount block. */
  flush(): void {
    this.cache.flush();
  }

  /** Replace the whole table in memory and on disk (repair, amend). */
  get table(): Uint8Array {
    return this.#table;
  }
}
