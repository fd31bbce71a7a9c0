/**
 * The qcow2 BlockNode: the public face of a qcow2 image — opening, the request entry points with
 * their checks and locking, runtime options, backing file names, snapshots loaded for reading,
 * and close. What the requests do lives by concern beside it, each file taking the image's
 * `Qcow2State` (as QEMU's qcow2 files take its BDRVQcow2State): `mapping.ts` (guest → host),
 * `read.ts`, `allocation.ts` (allocating writes, copy-on-write, compressed writes), `zero.ts`
 * (zero writes, discards), `flush.ts` (update ordering: refcount → data → L2 → L1; frees only
 * after the L2 entry is cleared), `integrity.ts` (corruption, metadata overlap), `resize.ts` and
 * `vm_state.ts`.
 *
 * @module
 */
import { printCorruption } from "./corruption.ts";
import { BlockError } from "../../src/errors.ts";
import type {
  BlockNode,
  Extent,
  TruncateOptions,
  WriteOptions,
  WriteZeroesOptions,
} from "../../src/block/node.ts";
import { checkRequest, checkSize } from "../../src/block/request.ts";
import type { HostFile } from "../../src/host/host_file.ts";
import type { TableCache } from "./cache.ts";
import {
  AUTOCLEAR_BITMAPS,
  COMPAT_LAZY_REFCOUNTS,
  hasFeature,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  MAX_L1_BYTES,
  parseHeader,
  type Qcow2Header,
} from "./header.ts";
import type { Refcounts } from "./refcount.ts";
import {
  DEFAULT_CACHE_CLEAN_INTERVAL,
  DEFAULT_L2_CACHE_MAX,
  type Qcow2OptionContext,
  type Qcow2RuntimeSettings,
} from "./runtime_options.ts";
import { Qcow2Bitmaps } from "./bitmap.ts";
import { rebuildRefcounts } from "./check.ts";
import { readSnapshotTable, type SnapshotTable } from "./snapshot.ts";
import { ownedAt, writeCompressed, writeSlow } from "./allocation.ts";
import { flushAll, makeL2Cache, makeRefcounts } from "./flush.ts";
import { checkOverlap } from "./integrity.ts";
import { mapRun, runExtent } from "./mapping.ts";
import { IoGate } from "./io_gate.ts";
import { readAt, readAtAsync } from "./read.ts";
import {
  checkResizable,
  growImage,
  planResize,
  preallocateClusters,
  preallocateData,
  shrinkImage,
} from "./resize.ts";
import { barrier, Qcow2State, setL1, writeHeader } from "./state.ts";
import { mapVmState, vmStateOffset, vmStateRange } from "./vm_state.ts";
import { discardClusters, emptyActiveState, readsZero, zeroRange } from "./zero.ts";

/** Open options, with QEMU's names where QEMU has them. */
export interface Qcow2OpenOptions {
  /** Open read-only (default false). */
  readOnly?: boolean;
  /** L2 table cache budget in bytes (QEMU `l2-cache-size`); default covers the image up to 32 MiB. */
  l2CacheSize?: number;
  /** Refcount block cache budget in bytes (QEMU `refcount-cache-size`); default 256 KiB or 4 clusters. */
  refcountCacheSize?: number;
  /** Seconds after which unused clean cache entries are dropped (QEMU `cache-clean-interval`; 0 = never). */
  cacheCleanInterval?: number;
  /** `unsafe` skips the flushes that order metadata updates (as QEMU's cache=unsafe). */
  cache?: "writeback" | "unsafe";
  /** The node unallocated clusters read from (set by the opener for backing chains). */
  backing?: BlockNode;
  /**
   * Where the one-line corruption notices go, as QEMU prints them ("qcow2: Marking image as
   * corrupt: …"); default: standard error.
   */
  onCorruption?: (line: string) => void;
  /** Open-time warnings (a stale bitmaps extension), as formats/open.ts's `onWarning`. */
  onWarning?: (message: string, trailer?: string) => void;
  /**
   * Open for qemu-img check (QEMU's BDRV_O_CHECK): the snapshot table is neither validated nor
   * read (the check reads it, and repairs it with -r all), and a dirty or corrupt image is left
   * for the check to repair.
   */
  check?: boolean;
}

/** ENOMEDIUM: what every request on a node that found fatal corruption fails with (as QEMU). */
const ENOMEDIUM = 123;

/** Write options a qcow2 node understands beyond FUA. */
export interface Qcow2WriteOptions extends WriteOptions {
  /** Store whole unallocated clusters compressed (qemu-io `write -c`). */
  compressed?: boolean;
  /**
   * With `compressed`: each cluster's compressed form, already made (by a worker pool), in the
   * image's compression type; null where compression did not shrink it, undefined where it is
   * still to be compressed.
   */
  precompressed?: ReadonlyArray<Uint8Array | null | undefined>;
}

const DEFAULT_REFCOUNT_CACHE = 256 * 1024;

/** A minimal mutex: metadata updates that span an await run one at a time. */
class Mutex {
  #tail: Promise<void> | undefined;
  async run<T>(fn: () => Promise<T>): Promise<T> {
    while (this.#tail) await this.#tail;
    let release!: () => void;
    this.#tail = new Promise((r) => release = r);
    try {
      return await fn();
    } finally {
      this.#tail = undefined;
      release();
    }
  }
}

/**
 * A qcow2 image: a {@linkcode BlockNode} over a host file, bit-compatible with QEMU's.
 *
 * @example Create an image in memory, write, and see where the data lives
 * ```ts
 * import { MemoryFile } from "../../src/host/memory.ts";
 * import { createQcow2 } from "./create.ts";
 * import { Qcow2Node } from "./qcow2.ts";
 *
 * const file = new MemoryFile("disk.qcow2");
 * await createQcow2(file, 16 << 20, { clusterSize: 65536 });
 * const node = await Qcow2Node.open(file);
 * await node.write(1 << 20, new Uint8Array(65536).fill(7));
 * const extent = await node.blockStatus(1 << 20, 1 << 20);
 * if (extent.kind !== "data" || extent.length !== 65536) throw new Error("one data cluster");
 * if ((await node.blockStatus(0, 1 << 20)).kind !== "unallocated") throw new Error("a hole");
 * await node.close();
 * ```
 */
export class Qcow2Node implements BlockNode {
  readonly format = "qcow2";
  readonly requestAlignment = 1;
  /** The host file the image lives in. */
  readonly file: HostFile;
  /**
   * The parsed header as it is now (the check, snapshot and amend code update it).
   *
   * @internal
   */
  readonly header: Qcow2Header;
  /** Cluster size in bytes (512 to 2 MiB). */
  readonly clusterSize: number;
  /** log2 of the cluster size. */
  readonly clusterBits: number;
  /** True for an image with extended L2 entries (32 subclusters per cluster). */
  readonly extendedL2: boolean;
  /** The driver state the concern files share (mapping.ts, allocation.ts, …). */
  readonly #s: Qcow2State;
  #closed = false;
  #cleanTimer: ReturnType<typeof setInterval> | undefined;
  #lastCleanClock = [0, 0];
  readonly #mutex = new Mutex();
  /** Data transfers in flight (async host I/O) against metadata changes that move clusters. */
  readonly #gate = new IoGate();
  /** Persistent dirty bitmaps (formats/qcow2/bitmap.ts): writes mark them, close stores them. */
  #bitmaps: Qcow2Bitmaps | undefined;

  private constructor(file: HostFile, header: Qcow2Header, opts: Qcow2OpenOptions) {
    this.file = file;
    this.header = header;
    const s = new Qcow2State(file, header, {
      readOnly: (opts.readOnly ?? false) || file.readOnly,
      unsafe: opts.cache === "unsafe",
      backing: opts.backing,
      onCorruption: opts.onCorruption ?? printCorruption,
    });
    this.#s = s;
    this.clusterBits = s.clusterBits;
    this.clusterSize = s.clusterSize;
    this.extendedL2 = s.extendedL2;

    const l2Needed = Math.ceil(header.size / (s.l2Entries * this.clusterSize)) *
      this.clusterSize;
    // As QEMU's read_cache_sizes: at least two L2 tables and four refcount blocks, whatever
    // was asked for (0 included).
    const l2Budget = Math.max(
      2 * this.clusterSize,
      opts.l2CacheSize ?? Math.min(DEFAULT_L2_CACHE_MAX, l2Needed),
    );
    const rcBudget = Math.max(
      4 * this.clusterSize,
      opts.refcountCacheSize ?? DEFAULT_REFCOUNT_CACHE,
    );
    s.l2Cache = makeL2Cache(s, l2Budget);
    s.refcountCacheBytes = rcBudget;
    s.refcounts = makeRefcounts(s);
    // Check mode reads the snapshot table in the check itself (QEMU's BDRV_O_CHECK).
    s.snapshots = opts.check
      ? { entries: [], bytes: 0 }
      : readSnapshotTable(file, header.snapshotsOffset, header.nbSnapshots, file.path, {
        validateL1: { clusterSize: this.clusterSize },
      });
    this.#startCleanTimer(opts.cacheCleanInterval ?? DEFAULT_CACHE_CLEAN_INTERVAL);
  }

  #startCleanTimer(seconds: number): void {
    if (this.#cleanTimer !== undefined) clearInterval(this.#cleanTimer);
    this.#cleanTimer = undefined;
    if (seconds <= 0) return;
    this.#cleanTimer = setInterval(() => this.#cleanCaches(), seconds * 1000);
    Deno.unrefTimer(this.#cleanTimer);
  }

  /**
   * The L2 table cache (check and snapshot code read and drop tables through it).
   *
   * @internal
   */
  get l2Cache(): TableCache {
    return this.#s.l2Cache;
  }

  /**
   * The refcount structure as loaded (replaced by runtime settings and repair).
   *
   * @internal
   */
  get refcounts(): Refcounts {
    return this.#s.refcounts;
  }

  /**
   * What resolveQcow2Options needs to know of this image.
   *
   * @internal
   */
  optionContext(unmap: boolean): Qcow2OptionContext {
    return {
      clusterSize: this.clusterSize,
      size: this.size,
      l2EntryBytes: this.#s.entryBytes,
      version: this.header.version,
      lazyRefcountsBit: hasFeature(this.header.compatibleFeatures, COMPAT_LAZY_REFCOUNTS),
      unmap,
      path: this.filename,
    };
  }

  /**
   * Run with new runtime settings (QEMU's qcow2_update_options_commit): the caches are written
   * out and rebuilt with the new budgets, the cleaning interval restarts, lazy refcounts and
   * discard passthrough change. Settings come from resolveQcow2Options, which did the checks.
   *
   * @internal
   */
  async applyRuntimeSettings(settings: Qcow2RuntimeSettings): Promise<void> {
    this.#live();
    await this.setLazyRefcounts(settings.lazyRefcounts);
    await this.#locked(() => {
      const s = this.#s;
      // Refcounts kept in memory by lazy refcounts are written too: the new cache starts empty.
      if (!s.readOnly) flushAll(s, true);
      const cs = this.clusterSize;
      s.l2Cache = makeL2Cache(s, Math.max(2 * cs, settings.l2CacheBytes));
      s.refcountCacheBytes = Math.max(4 * cs, settings.refcountCacheBytes);
      s.refcounts = makeRefcounts(s);
      this.#lastCleanClock = [0, 0];
      this.#startCleanTimer(settings.cacheCleanInterval);
      s.passDiscardRequest = settings.passDiscard.request;
      return Promise.resolve();
    });
  }

  /**
   * QEMU's `lazy-refcounts` runtime option (reopen): on, refcount updates may stay in memory
   * while the image is marked dirty; off, they are written out and the image is marked clean.
   *
   * @throws {BlockError} `unsupported` on a v2 image, as QEMU refuses it
   */
  async setLazyRefcounts(on: boolean): Promise<void> {
    this.#live();
    const s = this.#s;
    if (on && !s.v3) {
      throw new BlockError(
        "unsupported",
        "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
        { path: this.filename },
      );
    }
    if (on === s.lazy) return;
    await this.#locked(() => {
      if (!on && s.dirtyMarked) {
        flushAll(s, true);
        this.header.incompatibleFeatures &= ~BigInt(INCOMPAT_DIRTY);
        writeHeader(s);
        barrier(s);
        s.dirtyMarked = false;
      }
      s.lazy = on;
      return Promise.resolve();
    });
  }

  /**
   * Reload the refcount structure after repair replaced it (header already points at it).
   *
   * @internal
   */
  reloadRefcounts(): void {
    this.#s.refcounts = makeRefcounts(this.#s);
  }

  /**
   * Write every cached table and apply deferred frees (before check or repair reads the file).
   *
   * @internal
   */
  flushMetadata(): void {
    flushAll(this.#s, true);
  }

  /**
   * Open a qcow2 image over `file`.
   *
   * @throws {BlockError} `invalid-format`, `unsupported` (naming the feature), `corrupt` for a
   *   read-write open of an image marked corrupt
   */
  static async open(file: HostFile, opts: Qcow2OpenOptions = {}): Promise<Qcow2Node> {
    const fileSize = file.size();
    // The fixed header first, then exactly the header cluster: reading more would pull data
    // clusters into the page cache (and change what SEEK_DATA reports for preallocated space).
    const fixed = new Uint8Array(Math.min(fileSize, 512));
    file.readAt(0, fixed);
    const bits = fixed.length >= 24 ? new DataView(fixed.buffer).getUint32(20) : 0;
    let head = fixed;
    if (bits >= 9 && bits <= 21 && fileSize > 512) {
      head = new Uint8Array(Math.min(fileSize, 2 ** bits));
      file.readAt(0, head);
    }
    const header = parseHeader(head, fileSize, file.path, { check: opts.check ?? false });
    for (
      const [what, value] of [["l2-cache-size", opts.l2CacheSize], [
        "refcount-cache-size",
        opts.refcountCacheSize,
      ], [
        "cache-clean-interval",
        opts.cacheCleanInterval,
      ]] as const
    ) {
      if (value !== undefined && (!Number.isSafeInteger(value) || value < 0)) {
        throw new BlockError("invalid-argument", `Invalid ${what} ${value}`, { path: file.path });
      }
    }
    const readOnly = (opts.readOnly ?? false) || file.readOnly;
    if (!readOnly && !opts.check && hasFeature(header.incompatibleFeatures, INCOMPAT_CORRUPT)) {
      throw new BlockError(
        "corrupt",
        "qcow2: Image is corrupt; cannot be opened read/write (run 'vstor check -r all' or open read-only)",
        { path: file.path },
      );
    }
    const node = new Qcow2Node(file, header, opts);
    try {
      if (!readOnly) await node.#prepareForWriting(opts.check ?? false);
      node.#bitmaps = Qcow2Bitmaps.load(node, !readOnly, opts.onWarning);
    } catch (e) {
      node.#closed = true;
      if (node.#cleanTimer !== undefined) clearInterval(node.#cleanTimer);
      throw e;
    }
    return node;
  }

  /** Read-write open: clear autoclear bits we do not maintain; repair after a lazy-refcount crash. */
  async #prepareForWriting(check: boolean): Promise<void> {
    const h = this.header;
    let rewrite = false;
    // A writer that does not maintain an autoclear feature clears its bit (bitmaps: bitmap.ts).
    const keep = h.autoclearFeatures & BigInt(AUTOCLEAR_BITMAPS);
    if (h.autoclearFeatures !== keep) {
      h.autoclearFeatures = keep;
      rewrite = true;
    }
    if (!check && hasFeature(h.incompatibleFeatures, INCOMPAT_DIRTY)) {
      // QEMU runs its check with both repairs here, and its lines go to stderr.
      for (const line of rebuildRefcounts(this).messages) printCorruption(line);
      h.incompatibleFeatures &= ~BigInt(INCOMPAT_DIRTY);
      rewrite = true;
    }
    if (rewrite) {
      writeHeader(this.#s);
      barrier(this.#s);
    }
  }

  get filename(): string {
    return this.file.path;
  }

  /** The image's persistent dirty bitmaps (none for an image without the bitmaps extension). */
  get bitmaps(): Qcow2Bitmaps | undefined {
    return this.#bitmaps;
  }

  get backing(): BlockNode | undefined {
    return this.#s.backing;
  }

  get backingName(): { file: string; format?: string } | undefined {
    const file = this.header.backingFile;
    if (file === undefined || file === "") return undefined;
    const format = this.header.backingFormat;
    return format === undefined ? { file } : { file, format };
  }

  attachBacking(backing: BlockNode | undefined): void {
    this.#s.backing = backing;
    this.#s.compressedCache = undefined;
  }

  /**
   * Record a new backing file name and format in the header (one header write); an empty name
   * removes the backing file. The attached backing node is not changed.
   *
   * @throws {BlockError} `invalid-argument` when the name does not fit in the header cluster
   */
  async setBackingName(file: string, format: string | undefined): Promise<void> {
    this.#live();
    this.#writable();
    if (this.#s.readOnly) {
      throw new BlockError("read-only", "Image is read-only", { path: this.filename });
    }
    await this.#locked(() => {
      const h = this.header;
      const before = { file: h.backingFile, format: h.backingFormat };
      if (file === "") {
        delete h.backingFile;
        delete h.backingFormat;
      } else {
        h.backingFile = file;
        if (format === undefined) delete h.backingFormat;
        else h.backingFormat = format;
      }
      try {
        writeHeader(this.#s);
      } catch (e) {
        if (before.file === undefined) delete h.backingFile;
        else h.backingFile = before.file;
        if (before.format === undefined) delete h.backingFormat;
        else h.backingFormat = before.format;
        throw e;
      }
      barrier(this.#s);
      return Promise.resolve();
    });
  }

  /**
   * Drop every cluster of the active state (QEMU's make_empty after a commit): all entries become
   * unallocated, so reads go to the backing file; host clusters are released.
   */
  async makeEmpty(): Promise<void> {
    this.#live();
    this.#writable();
    if (this.#s.readOnly) {
      throw new BlockError("read-only", "Image is read-only", { path: this.filename });
    }
    // Without snapshots or bitmaps QEMU empties the image completely (no L2 tables are left); it
    // rebuilds the image under the dirty bit, vstor drops each table after its L1 entry is gone
    // (a crash leaks, never corrupts). With them, it discards every cluster and keeps the tables.
    const dropTables = this.#s.v3 && this.header.nbSnapshots === 0 &&
      (this.#bitmaps?.list.length ?? 0) === 0;
    await this.#locked(() => {
      emptyActiveState(this.#s, dropTables);
      return Promise.resolve();
    });
  }

  get size(): number {
    return this.header.size;
  }

  /** True when opened read-only (a corrupt image also refuses writes: see `corrupt`). */
  get readOnly(): boolean {
    return this.#s.readOnly;
  }

  /** True once an inconsistency was found; the node refuses writes after that. */
  get corrupt(): boolean {
    return this.#s.corrupt;
  }

  /** The snapshot table as read at open. */
  get snapshots(): SnapshotTable {
    return this.#s.snapshots;
  }

  /** Guest offset where QEMU would keep VM state: just past what the L1 table maps (qemu-io `info`). */
  get vmStateOffset(): number {
    return vmStateOffset(this.#s);
  }

  /**
   * Make this read-only node show an internal snapshot (found by ID or name) instead of the active
   * state, as QEMU's snapshot load for qemu-img convert -l: the snapshot's L1 and size, in memory.
   *
   * @throws {BlockError} `read-only` on a writable node, `not-found` without such a snapshot
   */
  loadSnapshotForReading(key: string | { id?: string; name?: string }): void {
    this.#live();
    if (!this.#s.readOnly) {
      throw new BlockError("read-only", "Snapshots can only be loaded into a read-only image", {
        path: this.filename,
      });
    }
    const entries = this.#s.snapshots.entries;
    // A bare key is an ID, else a name (bdrv_snapshot_load_tmp_by_id_or_name); snapshot.id= and
    // snapshot.name= match only what they name, both when both are given.
    const sn = typeof key === "string"
      ? entries.find((e) => e.id === key) ?? entries.find((e) => e.name === key)
      : entries.find((e) =>
        (key.id === undefined || e.id === key.id) && (key.name === undefined || e.name === key.name)
      );
    const shown = typeof key === "string"
      ? key
      : [key.id && `id ${key.id}`, key.name && `name ${key.name}`].filter(Boolean).join(", ");
    if (sn === undefined) {
      throw new BlockError("not-found", `Failed to load snapshot '${shown}': no such snapshot`, {
        path: this.filename,
      });
    }
    if (sn.l1Size * 8 > MAX_L1_BYTES) {
      throw new BlockError("invalid-format", "Snapshot L1 table too large", {
        path: this.filename,
      });
    }
    const l1 = new Uint8Array(sn.l1Size * 8);
    this.file.readAt(sn.l1TableOffset, l1);
    setL1(this.#s, l1);
    this.header.l1Size = sn.l1Size;
    this.header.size = sn.diskSize ?? this.header.size;
    this.#s.compressedCache = undefined;
  }

  /** Compressed write of whole clusters (qemu-io `write -c`). */
  writeCompressed(offset: number, src: Uint8Array): Promise<void> {
    return this.write(offset, src, { compressed: true });
  }

  /**
   * Bytes of the active L1 table.
   *
   * @internal
   */
  get l1Table(): Uint8Array {
    return this.#s.l1;
  }

  /**
   * Runs `fn` under the metadata lock with no data transfer in flight (see {@linkcode IoGate}):
   * every metadata change but allocating writes and flushes, since it may free or move clusters.
   */
  #locked<T>(fn: () => Promise<T>): Promise<T> {
    return this.#mutex.run(() => this.#gate.exclusive(fn));
  }

  #live(): void {
    if (this.#closed) throw new BlockError("io", "Image is closed", { path: this.filename });
    if (this.#s.unusable) {
      throw new BlockError("io", "No medium found", { path: this.filename, errno: ENOMEDIUM });
    }
  }

  #writable(): void {
    if (this.#s.corrupt) {
      throw new BlockError("corrupt", "Image is marked corrupt; writes are refused", {
        path: this.filename,
      });
    }
  }

  // ---- requests (what they do: read.ts, allocation.ts, zero.ts, flush.ts) ----

  async read(offset: number, dst: Uint8Array): Promise<void> {
    this.#live();
    checkRequest(this, "read", offset, dst.length);
    if (this.file.readAtAsync === undefined) return await readAt(this.#s, offset, dst);
    // Host reads in flight: the clusters they read must stay put until they are done.
    const gate = this.#gate;
    if (!gate.tryEnter()) await gate.enter();
    try {
      this.#live();
      await readAtAsync(this.#s, offset, dst);
    } finally {
      gate.leave();
    }
  }

  async blockStatus(offset: number, max: number): Promise<Extent> {
    this.#live();
    checkRequest(this, "block-status", offset, max);
    if (offset >= this.size || max === 0) return { kind: "eof", offset, length: 0 };
    return runExtent(mapRun(this.#s, offset, Math.min(max, this.size - offset)), offset);
  }

  allocatedSize(): number {
    return this.file.allocatedSize();
  }

  async write(offset: number, src: Uint8Array, opts?: Qcow2WriteOptions): Promise<void> {
    this.#live();
    checkRequest(this, "write", offset, src.length);
    this.#writable();
    if (src.length === 0) return;
    this.#bitmaps?.mark(offset, src.length);
    const s = this.#s;
    if (opts?.compressed) {
      await this.#locked(() => writeCompressed(s, offset, src, opts.precompressed));
    } else {
      // Fast path: the whole request lands in clusters this image owns (COPIED) and whose units
      // already hold data: write in place, no metadata change.
      const file = this.file;
      if (file.writeAtAsync === undefined) {
        const run = mapRun(s, offset, src.length, "write");
        if (run.length === src.length && run.kind === "normal" && ownedAt(s, offset)) {
          checkOverlap(s, run.hostOffset, src.length);
          file.writeAt(run.hostOffset, src);
        } else {
          await this.#mutex.run(() => writeSlow(s, offset, src));
        }
      } else if (!(await this.#writeInPlaceAsync(offset, src))) {
        await this.#mutex.run(() => writeSlow(s, offset, src));
      }
    }
    if (opts?.fua) await this.flush();
  }

  /**
   * The fast path with host writes in flight: the whole request lands in clusters this image owns
   * and whose units hold data, written in place while the gate keeps them there. False when the
   * request needs the allocating path.
   */
  async #writeInPlaceAsync(offset: number, src: Uint8Array): Promise<boolean> {
    const gate = this.#gate;
    if (!gate.tryEnter()) await gate.enter();
    try {
      this.#live();
      this.#writable();
      const s = this.#s;
      const run = mapRun(s, offset, src.length, "write");
      if (run.length !== src.length || run.kind !== "normal" || !ownedAt(s, offset)) return false;
      checkOverlap(s, run.hostOffset, src.length);
      await this.file.writeAtAsync!(run.hostOffset, src);
      return true;
    } finally {
      gate.leave();
    }
  }

  /**
   * Zero a guest range as QEMU's block layer and qcow2 driver do together: the request is cut at
   * (sub)cluster boundaries; each piece is zeroed with L2 flags where the driver can (an
   * unaligned piece widens to its whole subcluster when the rest of it already reads as zeroes
   * and holds no data), and written as zero data where it cannot.
   */
  async writeZeroes(offset: number, length: number, opts?: WriteZeroesOptions): Promise<void> {
    this.#live();
    checkRequest(this, "write-zeroes", offset, length);
    this.#writable();
    if (length === 0) return;
    if (opts?.noFallback) {
      // Only cluster flags surely cost no data writes: v3 and whole clusters (the image's end
      // counts as a boundary), as QEMU's qcow2 answers BDRV_REQ_NO_FALLBACK for them.
      const sub = this.clusterSize;
      const end = offset + length;
      if (!this.#s.v3 || offset % sub !== 0 || (end % sub !== 0 && end !== this.size)) {
        throw new BlockError("unsupported", "Zeroing this range would write data", {
          path: this.filename,
          offset,
        });
      }
    }
    this.#bitmaps?.mark(offset, length);
    // v2 takes no flags (QEMU's supported_zero_flags): zeroes never unmap there.
    const unmap = (opts?.unmap ?? false) && this.#s.v3;
    await this.#locked(() => zeroRange(this.#s, offset, length, unmap));
    if (opts?.fua) await this.flush();
  }

  async discard(offset: number, length: number): Promise<void> {
    this.#live();
    checkRequest(this, "discard", offset, length);
    this.#writable();
    this.#bitmaps?.mark(offset, length);
    // v2 has no zero flag: dropping a cluster would expose the backing file's older data, so the
    // hint is ignored (as QEMU's -ENOTSUP, which its block layer turns into success).
    if (!this.#s.v3 && this.backing !== undefined) return;
    const cs = this.clusterSize;
    // Only whole clusters are discarded (the tail cluster counts when the request reaches the end).
    const start = Math.ceil(offset / cs) * cs;
    const end = offset + length === this.size ? this.size : Math.floor((offset + length) / cs) * cs;
    if (end <= start) return;
    await this.#locked(() => {
      discardClusters(this.#s, start, end);
      return Promise.resolve();
    });
  }

  /**
   * Grows the file to a multiple of `alignment` bytes, as QEMU does after compressed writes (its
   * zero-length compressed write) so that sector-based readers see whole sectors.
   */
  async alignFileEnd(alignment: number): Promise<void> {
    this.#live();
    this.#writable();
    await this.#locked(async () => {
      const size = this.file.size();
      const aligned = Math.ceil(size / alignment) * alignment;
      if (aligned !== size) await this.file.truncate(aligned);
    });
  }

  async flush(): Promise<void> {
    this.#live();
    if (this.#s.readOnly && !this.#s.corrupt) return;
    await this.#mutex.run(() => {
      flushAll(this.#s);
      return Promise.resolve();
    });
  }

  // ---- resize (resize.ts, vm_state.ts) ----

  async truncate(size: number, opts?: TruncateOptions): Promise<void> {
    this.#live();
    checkSize(size);
    const s = this.#s;
    if (s.readOnly) {
      throw new BlockError("read-only", "Image is read-only", { path: this.filename });
    }
    this.#writable();
    checkResizable(s, size);
    this.#bitmaps?.checkResize();
    const old = this.size;
    const mode = opts?.preallocation ?? "off";
    const zeroNewRange = planResize(s, size, mode);
    await this.#locked(() => {
      if (size > this.size) growImage(s, size);
      else if (size < this.size) shrinkImage(s, size);
      return Promise.resolve();
    });
    this.#bitmaps?.resize(size);
    // What truncate writes into the new range is no guest write: QEMU's truncate marks no bitmap.
    using _unmarked = this.#bitmaps?.quiet();
    if (size <= old) return;
    if (mode === "falloc" || mode === "full") {
      // New data clusters hold the new range (the old last cluster copied into one of them).
      await this.#locked(() => preallocateData(s, mode, old, size, zeroNewRange));
      return;
    }
    if (mode === "metadata") await this.preallocate(mode, old);
    // Bytes of the old last cluster past the old end may hold data from before a shrink, and
    // with a longer backing file the whole new range must hide it.
    if (zeroNewRange) {
      await this.writeZeroes(old, size - old);
      return;
    }
    // Stale bytes there are the only thing QEMU would show and vstor hides: where the tail
    // already reads as zeroes, nothing is written (the layout stays QEMU's).
    const tailEnd = Math.min(size, Math.ceil(old / this.clusterSize) * this.clusterSize);
    if (tailEnd > old && !(await readsZero(s, old, tailEnd - old))) {
      await this.writeZeroes(old, tailEnd - old);
    }
  }

  /**
   * Write QEMU's VM state area (qcow2_save_vmstate): guest bytes from {@linkcode vmStateOffset}
   * on, past the disk, mapped by L1 entries past the disk's; the L1 table grows as QEMU grows
   * it for them (by half again each time).
   *
   * @throws {BlockError} `out-of-range` past what an L1 table can map
   */
  async writeVmState(pos: number, src: Uint8Array): Promise<void> {
    this.#live();
    if (this.#s.readOnly) {
      throw new BlockError("read-only", "Image is read-only", { path: this.filename });
    }
    this.#writable();
    const offset = vmStateRange(this.#s, pos, src.length);
    if (src.length === 0) return;
    await this.#mutex.run(async () => {
      mapVmState(this.#s, offset, src.length);
      await writeSlow(this.#s, offset, src);
    });
  }

  /** Read QEMU's VM state area (qcow2_load_vmstate); what was never written reads as zeroes. */
  async readVmState(pos: number, dst: Uint8Array): Promise<void> {
    this.#live();
    await readAt(this.#s, vmStateRange(this.#s, pos, dst.length), dst);
  }

  /**
   * Allocate every cluster of the image (QEMU's preallocation): L2 tables and data clusters, data
   * reading as zeroes; `falloc` also reserves the host space, `full` writes the zeroes.
   */
  async preallocate(mode: "metadata" | "falloc" | "full", from = 0): Promise<void> {
    this.#live();
    this.#writable();
    await this.#locked(() => {
      preallocateClusters(this.#s, mode, from);
      return Promise.resolve();
    });
  }

  // ---- housekeeping ----

  #cleanCaches(): void {
    if (this.#closed) return;
    const s = this.#s;
    s.l2Cache.dropIdle(this.#lastCleanClock[0]!);
    s.refcounts.cache.dropIdle(this.#lastCleanClock[1]!);
    this.#lastCleanClock = [s.l2Cache.clock, s.refcounts.cache.clock];
  }

  /**
   * Make completed writes durable unless opened with cache=unsafe (snapshot and repair code).
   *
   * @internal
   */
  barrier(): void {
    barrier(this.#s);
  }

  /**
   * Replace the in-memory snapshot table after the header was switched to a new one.
   *
   * @internal
   */
  setSnapshots(table: SnapshotTable): void {
    this.#s.snapshots = table;
  }

  /**
   * Run `fn` with the node's metadata lock held (snapshot operations).
   *
   * @internal
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    this.#live();
    this.#writable();
    if (this.#s.readOnly) {
      return Promise.reject(
        new BlockError("read-only", "Image is read-only", { path: this.filename }),
      );
    }
    return this.#locked(fn);
  }

  /**
   * Replace the in-memory active L1 table (its contents are already on disk).
   *
   * @internal
   */
  replaceL1(l1: Uint8Array): void {
    setL1(this.#s, l1);
  }

  /**
   * Write the header as it is now (used by repair).
   *
   * @internal
   */
  writeHeader(): void {
    writeHeader(this.#s);
    barrier(this.#s);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    const s = this.#s;
    try {
      if (!s.readOnly && !s.corrupt) {
        // Bitmaps are stored first, as QEMU's qcow2_inactivate does.
        const bitmaps = this.#bitmaps;
        if (bitmaps !== undefined) await this.#locked(() => Promise.resolve(bitmaps.store()));
        await this.#locked(() => Promise.resolve(flushAll(s, true)));
        if (s.dirtyMarked) {
          this.header.incompatibleFeatures &= ~BigInt(INCOMPAT_DIRTY);
          writeHeader(s);
          barrier(s);
        }
      }
    } finally {
      this.#closed = true;
      if (this.#cleanTimer !== undefined) clearInterval(this.#cleanTimer);
      this.file.close();
      await s.backing?.close();
    }
  }
}
