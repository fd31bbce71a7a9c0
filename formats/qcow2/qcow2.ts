/**
 * The qcow2 BlockNode: mapping guest ranges through L1/L2 tables, allocating writes with
 * copy-on-write, zero clusters, discard, compressed clusters, resize, and crash-safe update
 * ordering (refcount → data → L2 → L1; frees only after the L2 entry is cleared).
 *
 * @module
 */
import { printCorruption } from "./corruption.ts";
import { BlockError } from "../../src/errors.ts";
import type {
  BlockNode,
  Extent,
  ExtentKind,
  TruncateOptions,
  WriteOptions,
  WriteZeroesOptions,
} from "../../src/block/node.ts";
import { checkRequest, checkSize } from "../../src/block/request.ts";
import type { HostFile } from "../../src/host/host_file.ts";
import { type CacheEntry, TableCache } from "./cache.ts";
import { compressCluster, decompressCluster } from "./compress.ts";
import {
  AUTOCLEAR_BITMAPS,
  COMPAT_LAZY_REFCOUNTS,
  hasFeature,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  MAX_L1_BYTES,
  parseHeader,
  type Qcow2Header,
  serializeHeader,
} from "./header.ts";
import { Refcounts } from "./refcount.ts";
import {
  DEFAULT_CACHE_CLEAN_INTERVAL,
  DEFAULT_L2_CACHE_MAX,
  type Qcow2OptionContext,
  type Qcow2RuntimeSettings,
} from "./runtime_options.ts";
import { Qcow2Bitmaps } from "./bitmap.ts";
import { rebuildRefcounts } from "./check.ts";
import { readSnapshotTable, type SnapshotTable } from "./snapshot.ts";
import {
  classifyStandard,
  classifySubcluster,
  type ClusterKind,
  compressedClusters,
  compressedLocation,
  encodeCompressed,
  encodeEntry,
  entryOffset,
  HI_COMPRESSED,
  HI_COPIED,
  l1Reserved,
  SUBCLUSTERS,
} from "./tables.ts";

/** Compressed-write tasks QEMU keeps in flight (QCOW2_MAX_WORKERS). */
const COMPRESSED_WORKERS = 8;

/** Open options, with QEMU's names where QEMU has them. */
export interface Qcow2OpenOptions {
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

/** Whether a backing chain below an unallocated range reads it as zeroes (block status only). */
async function chainReadsZero(
  node: BlockNode | undefined,
  offset: number,
  length: number,
): Promise<boolean> {
  const end = offset + length;
  for (let pos = offset; pos < end;) {
    if (node === undefined || pos >= node.size) return true;
    const st = await node.blockStatus(pos, Math.min(end, node.size) - pos);
    if (st.kind === "eof") return true;
    if (st.kind === "data" || st.kind === "compressed") return false;
    if (st.kind === "unallocated" && !(await chainReadsZero(node.backing, pos, st.length))) {
      return false;
    }
    pos += st.length;
  }
  return true;
}

/** C's `%#x`: `0` for zero, else `0x` and lower-case hex digits. */
function hexAlt(n: number): string {
  return n === 0 ? "0" : `0x${n.toString(16)}`;
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

/** One run of guest bytes with the same mapping. */
interface Run {
  kind: ClusterKind;
  /** Host offset of the run's first byte (normal/zero-alloc), else 0. */
  hostOffset: number;
  length: number;
}

/** A cluster slot: which L2 table entry holds a guest cluster. */
interface Slot {
  table: CacheEntry;
  /** Byte offset of the entry in the table. */
  at: number;
}

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

/** A qcow2 image. */
export class Qcow2Node implements BlockNode {
  readonly format = "qcow2";
  readonly requestAlignment = 1;
  readonly file: HostFile;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly extendedL2: boolean;
  #backing: BlockNode | undefined;
  readonly #entryBytes: number;
  readonly #l2Entries: number;
  readonly #subclusterSize: number;
  readonly #v3: boolean;
  readonly #unsafe: boolean;
  #lazy: boolean;
  #readOnly: boolean;
  #corrupt = false;
  /** A corruption was signalled (QEMU's signaled_corruption): later notices are suppressed. */
  #signaled = false;
  /** Fatal corruption was found on a writable node: it is unusable from then on. */
  #unusable = false;
  readonly #onCorruption: (line: string) => void;
  #closed = false;
  #l1: Uint8Array;
  #l1View: DataView;
  l2Cache: TableCache;
  refcounts: Refcounts;
  #refcountCacheBytes: number;
  /** QEMU's pass-discard-request: a guest discard also frees the host file's space. */
  #passDiscardRequest = true;
  #snapshots: SnapshotTable;
  /** Clusters to free once the L2 tables that dropped them are on disk: [first cluster, count]. */
  /** Frees waiting for their L2 tables to reach the disk: cluster, count, punch a hole. */
  #pendingFrees: Array<[number, number, boolean]> = [];
  #dirtyMarked = false;
  #cleanTimer: ReturnType<typeof setInterval> | undefined;
  #lastCleanClock = [0, 0];
  readonly #mutex = new Mutex();
  /** The last decompressed cluster, by host descriptor (sequential reads of compressed data). */
  #compressedCache: { key: string; data: Uint8Array } | undefined;
  /** Persistent dirty bitmaps (formats/qcow2/bitmap.ts): writes mark them, close stores them. */
  #bitmaps: Qcow2Bitmaps | undefined;

  private constructor(file: HostFile, header: Qcow2Header, opts: Qcow2OpenOptions) {
    this.file = file;
    this.header = header;
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.extendedL2 = hasFeature(header.incompatibleFeatures, INCOMPAT_EXTL2);
    this.#entryBytes = this.extendedL2 ? 16 : 8;
    this.#l2Entries = this.clusterSize / this.#entryBytes;
    this.#subclusterSize = this.extendedL2 ? this.clusterSize / SUBCLUSTERS : this.clusterSize;
    this.#v3 = header.version === 3;
    this.#unsafe = opts.cache === "unsafe";
    this.#lazy = hasFeature(header.compatibleFeatures, COMPAT_LAZY_REFCOUNTS);
    this.#readOnly = (opts.readOnly ?? false) || file.readOnly;
    this.#backing = opts.backing;
    this.#onCorruption = opts.onCorruption ?? printCorruption;

    this.#l1 = new Uint8Array(header.l1Size * 8);
    file.readAt(header.l1TableOffset, this.#l1);
    this.#l1View = new DataView(this.#l1.buffer);

    const l2Needed = Math.ceil(header.size / (this.#l2Entries * this.clusterSize)) *
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
    this.l2Cache = this.#makeL2Cache(l2Budget);
    this.#refcountCacheBytes = rcBudget;
    this.refcounts = this.#makeRefcounts();
    // Check mode reads the snapshot table in the check itself (QEMU's BDRV_O_CHECK).
    this.#snapshots = opts.check
      ? { entries: [], bytes: 0 }
      : readSnapshotTable(file, header.snapshotsOffset, header.nbSnapshots, file.path, {
        validateL1: { clusterSize: this.clusterSize },
      });
    this.#startCleanTimer(opts.cacheCleanInterval ?? DEFAULT_CACHE_CLEAN_INTERVAL);
  }

  #makeL2Cache(budget: number): TableCache {
    return new TableCache(this.clusterSize, budget, {
      // Past the end of a truncated file a table reads as zeroes, as QEMU reads it.
      load: (offset, dst) => this.file.readAt(offset, dst),
      writeBack: (entries) => this.#writeL2Tables(entries),
    });
  }

  #startCleanTimer(seconds: number): void {
    if (this.#cleanTimer !== undefined) clearInterval(this.#cleanTimer);
    this.#cleanTimer = undefined;
    if (seconds <= 0) return;
    this.#cleanTimer = setInterval(() => this.#cleanCaches(), seconds * 1000);
    Deno.unrefTimer(this.#cleanTimer);
  }

  /** What resolveQcow2Options needs to know of this image. */
  optionContext(unmap: boolean): Qcow2OptionContext {
    return {
      clusterSize: this.clusterSize,
      size: this.size,
      l2EntryBytes: this.#entryBytes,
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
   */
  async applyRuntimeSettings(settings: Qcow2RuntimeSettings): Promise<void> {
    this.#live();
    await this.setLazyRefcounts(settings.lazyRefcounts);
    await this.#mutex.run(() => {
      // Refcounts kept in memory by lazy refcounts are written too: the new cache starts empty.
      if (!this.#readOnly) this.#flushAll(true);
      const cs = this.clusterSize;
      this.l2Cache = this.#makeL2Cache(Math.max(2 * cs, settings.l2CacheBytes));
      this.#refcountCacheBytes = Math.max(4 * cs, settings.refcountCacheBytes);
      this.refcounts = this.#makeRefcounts();
      this.#lastCleanClock = [0, 0];
      this.#startCleanTimer(settings.cacheCleanInterval);
      this.#passDiscardRequest = settings.passDiscard.request;
      return Promise.resolve();
    });
  }

  #makeRefcounts(): Refcounts {
    return new Refcounts(
      {
        file: this.file,
        path: this.file.path,
        clusterBits: this.header.clusterBits,
        refcountOrder: this.header.refcountOrder,
        barrier: () => this.#barrier(),
        switchRefcountTable: (offset, clusters) => {
          this.header.refcountTableOffset = offset;
          this.header.refcountTableClusters = clusters;
          this.#writeHeader();
        },
        corrupt: (message, offset) => this.#signalCorruption(message, offset),
      },
      this.header.refcountTableOffset,
      this.header.refcountTableClusters,
      this.#refcountCacheBytes,
    );
  }

  /**
   * QEMU's `lazy-refcounts` runtime option (reopen): on, refcount updates may stay in memory
   * while the image is marked dirty; off, they are written out and the image is marked clean.
   *
   * @throws {BlockError} `unsupported` on a v2 image, as QEMU refuses it
   */
  async setLazyRefcounts(on: boolean): Promise<void> {
    this.#live();
    if (on && !this.#v3) {
      throw new BlockError(
        "unsupported",
        "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
        { path: this.filename },
      );
    }
    if (on === this.#lazy) return;
    await this.#mutex.run(() => {
      if (!on && this.#dirtyMarked) {
        this.#flushAll(true);
        this.header.incompatibleFeatures &= ~BigInt(INCOMPAT_DIRTY);
        this.#writeHeader();
        this.#barrier();
        this.#dirtyMarked = false;
      }
      this.#lazy = on;
      return Promise.resolve();
    });
  }

  /** Reload the refcount structure after repair replaced it (header already points at it). */
  reloadRefcounts(): void {
    this.refcounts = this.#makeRefcounts();
  }

  /** Write every cached table and apply deferred frees (before check or repair reads the file). */
  flushMetadata(): void {
    this.#flushAll(true);
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
      this.#writeHeader();
      this.#barrier();
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
    return this.#backing;
  }

  get backingName(): { file: string; format?: string } | undefined {
    const file = this.header.backingFile;
    if (file === undefined || file === "") return undefined;
    const format = this.header.backingFormat;
    return format === undefined ? { file } : { file, format };
  }

  attachBacking(backing: BlockNode | undefined): void {
    this.#backing = backing;
    this.#compressedCache = undefined;
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
    if (this.#readOnly) {
      throw new BlockError("read-only", "Image is read-only", { path: this.filename });
    }
    await this.#mutex.run(() => {
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
        this.#writeHeader();
      } catch (e) {
        if (before.file === undefined) delete h.backingFile;
        else h.backingFile = before.file;
        if (before.format === undefined) delete h.backingFormat;
        else h.backingFormat = before.format;
        throw e;
      }
      this.#barrier();
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
    if (this.#readOnly) {
      throw new BlockError("read-only", "Image is read-only", { path: this.filename });
    }
    const cs = this.clusterSize;
    // Without snapshots or bitmaps QEMU empties the image completely (no L2 tables are left); it
    // rebuilds the image under the dirty bit, vstor drops each table after its L1 entry is gone
    // (a crash leaks, never corrupts). With them, it discards every cluster and keeps the tables.
    const dropTables = this.#v3 && this.header.nbSnapshots === 0 &&
      (this.#bitmaps?.list.length ?? 0) === 0;
    await this.#mutex.run(() => {
      for (let l1Index = 0; l1Index < this.header.l1Size; l1Index++) {
        const tableOffset = this.#l1Entry(l1Index);
        if (tableOffset === 0) continue;
        if (dropTables) {
          const table = this.#l2Table(l1Index)!;
          for (let at = 0; at < cs; at += this.#entryBytes) {
            this.#releaseEntry(table.view.getUint32(at), table.view.getUint32(at + 4));
          }
          this.#l1View.setUint32(l1Index * 8, 0);
          this.#l1View.setUint32(l1Index * 8 + 4, 0);
          this.file.writeAt(
            this.header.l1TableOffset + l1Index * 8,
            this.#l1.subarray(l1Index * 8, l1Index * 8 + 8),
          );
          this.#freeLater(tableOffset / cs, 1, true);
          continue;
        }
        const first = l1Index * this.#l2Entries;
        for (let i = 0; i < this.#l2Entries && (first + i) * cs < this.size; i++) {
          const existing = this.#slot((first + i) * cs, false)!;
          const view = existing.table.view;
          const hi = view.getUint32(existing.at), lo = view.getUint32(existing.at + 4);
          const ext = this.extendedL2
            ? view.getUint32(existing.at + 8) | view.getUint32(existing.at + 12)
            : 0;
          if (hi === 0 && lo === 0 && ext === 0) continue;
          const s = this.#slot((first + i) * cs, true);
          for (let b = 0; b < this.#entryBytes; b += 4) s.table.view.setUint32(s.at + b, 0);
          s.table.dirty = true;
          this.#releaseEntry(hi, lo);
        }
      }
      this.#flushAll();
      return Promise.resolve();
    });
  }

  get size(): number {
    return this.header.size;
  }

  get readOnly(): boolean {
    return this.#readOnly;
  }

  /** True once an inconsistency was found; the node refuses writes after that. */
  get corrupt(): boolean {
    return this.#corrupt;
  }

  /** The snapshot table as read at open. */
  get snapshots(): SnapshotTable {
    return this.#snapshots;
  }

  /** Guest offset where QEMU would keep VM state: just past what the L1 table maps (qemu-io `info`). */
  get vmStateOffset(): number {
    const span = this.clusterSize * this.#l2Entries;
    return Math.ceil(this.size / span) * span;
  }

  /**
   * Make this read-only node show an internal snapshot (found by ID or name) instead of the active
   * state, as QEMU's snapshot load for qemu-img convert -l: the snapshot's L1 and size, in memory.
   *
   * @throws {BlockError} `read-only` on a writable node, `not-found` without such a snapshot
   */
  loadSnapshotForReading(key: string | { id?: string; name?: string }): void {
    this.#live();
    if (!this.#readOnly) {
      throw new BlockError("read-only", "Snapshots can only be loaded into a read-only image", {
        path: this.filename,
      });
    }
    const entries = this.#snapshots.entries;
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
    this.#l1 = l1;
    this.#l1View = new DataView(l1.buffer);
    this.header.l1Size = sn.l1Size;
    this.header.size = sn.diskSize ?? this.header.size;
    this.#compressedCache = undefined;
  }

  /** Compressed write of whole clusters (qemu-io `write -c`). */
  writeCompressed(offset: number, src: Uint8Array): Promise<void> {
    return this.write(offset, src, { compressed: true });
  }

  /** Bytes of the active L1 table. */
  get l1Table(): Uint8Array {
    return this.#l1;
  }

  #live(): void {
    if (this.#closed) throw new BlockError("io", "Image is closed", { path: this.filename });
    if (this.#unusable) {
      throw new BlockError("io", "No medium found", { path: this.filename, errno: ENOMEDIUM });
    }
  }

  #writable(): void {
    if (this.#corrupt) {
      throw new BlockError("corrupt", "Image is marked corrupt; writes are refused", {
        path: this.filename,
      });
    }
  }

  #barrier(): void {
    if (!this.#unsafe) this.file.flush();
  }

  #writeHeader(): void {
    const bytes = serializeHeader(this.header, this.filename);
    this.file.writeAt(0, bytes);
  }

  /**
   * QEMU's qcow2_signal_corruption: on a writable node the corruption is fatal — one notice,
   * the header's corrupt bit (v3), and the node is unusable from then on; on a read-only node it
   * is reported once and reading goes on. Returns the error (EIO) for the request that found it.
   */
  #signalCorruption(message: string, offset: number): BlockError {
    const fatal = !this.#readOnly;
    const error = new BlockError("corrupt", message, { path: this.filename, offset, errno: 5 });
    if (this.#signaled && (!fatal || this.#corrupt)) return error;
    this.#onCorruption(
      fatal
        ? `qcow2: Marking image as corrupt: ${message}; further corruption events will be suppressed`
        : `qcow2: Image is corrupt: ${message}; further non-fatal corruption events will be suppressed`,
    );
    this.#signaled = true;
    if (fatal) {
      if (this.#v3) {
        try {
          this.header.incompatibleFeatures |= BigInt(INCOMPAT_CORRUPT);
          this.#writeHeader();
          this.file.flush();
        } catch {
          // The error we report matters more than the failed marking.
        }
      }
      this.#corrupt = true;
      this.#readOnly = true;
      this.#unusable = true;
    }
    return error;
  }

  // ---- mapping ----

  #l1Entry(index: number): number {
    if (index >= this.header.l1Size) return 0;
    const hi = this.#l1View.getUint32(index * 8), lo = this.#l1View.getUint32(index * 8 + 4);
    if (hi === 0 && lo === 0) return 0;
    if (l1Reserved(hi, lo)) {
      throw this.#signalCorruption(
        `L1 entry ${index} has reserved bits set`,
        this.header.l1TableOffset + index * 8,
      );
    }
    return entryOffset(hi, lo);
  }

  #l1Copied(index: number): boolean {
    return (this.#l1View.getUint32(index * 8) & HI_COPIED) !== 0;
  }

  /** The L2 table of L1 entry `index`, or undefined when there is none. */
  #l2Table(index: number): CacheEntry | undefined {
    const offset = this.#l1Entry(index);
    if (offset === 0) return undefined;
    if (offset < 0 || offset % this.clusterSize !== 0 || offset < this.clusterSize) {
      throw this.#signalCorruption(
        `L2 table offset 0x${offset.toString(16)} unaligned or in the header (L1 index 0x${
          index.toString(16)
        })`,
        offset,
      );
    }
    return this.l2Cache.get(offset);
  }

  /** Classify one unit (cluster, or subcluster with extended L2) of an L2 table entry. */
  #kindAt(table: CacheEntry, at: number, subcluster: number): ClusterKind {
    const hi = table.view.getUint32(at), lo = table.view.getUint32(at + 4);
    if (this.extendedL2) {
      return classifySubcluster(
        hi,
        lo,
        table.view.getUint32(at + 12),
        table.view.getUint32(at + 8),
        subcluster,
      );
    }
    return classifyStandard(hi, lo, this.#v3);
  }

  /**
   * The run of guest bytes from `guestOffset` (at most `max`) with one mapping, within one L2
   * table. Normal runs are contiguous on the host.
   */
  #mapRun(guestOffset: number, max: number, path: "read" | "write" = "read"): Run {
    const cs = this.clusterSize;
    const clusterIndex = Math.floor(guestOffset / cs);
    const l1Index = Math.floor(clusterIndex / this.#l2Entries);
    let l2Index = clusterIndex % this.#l2Entries;
    const tableEnd = (l1Index + 1) * this.#l2Entries * cs - guestOffset;
    const limit = Math.min(max, tableEnd);
    const table = this.#l2Table(l1Index);
    if (table === undefined) return { kind: "unallocated", hostOffset: 0, length: limit };
    const unit = this.#subclusterSize;
    let within = guestOffset % cs;
    let sc = Math.floor(within / unit);
    let at = l2Index * this.#entryBytes;
    const kind = this.#kindAt(table, at, sc);
    if (kind === "invalid") throw this.#invalidEntry(table, l2Index, path);
    const hi0 = table.view.getUint32(at), lo0 = table.view.getUint32(at + 4);
    let hostOffset = 0;
    if (kind === "normal" || kind === "zero-alloc" || kind === "unallocated-alloc") {
      const clusterHost = entryOffset(hi0, lo0);
      this.#checkDataCluster(clusterHost, table, l2Index);
      hostOffset = clusterHost + within;
    }
    if (kind === "compressed") {
      // A compressed cluster is its own run.
      return { kind, hostOffset: 0, length: Math.min(limit, cs - within) };
    }
    // Extend over following units with the same kind (and contiguous host offsets for data).
    let length = Math.min(limit, (sc + 1) * unit - within);
    let expectHost = hostOffset + length;
    within += length;
    while (length < limit) {
      if (within === cs) {
        within = 0;
        l2Index++;
        at += this.#entryBytes;
      }
      sc = Math.floor(within / unit);
      const k = this.#kindAt(table, at, sc);
      if (k !== kind) break;
      if (kind === "normal" || kind === "zero-alloc" || kind === "unallocated-alloc") {
        const hi = table.view.getUint32(at), lo = table.view.getUint32(at + 4);
        const host = entryOffset(hi, lo) + within;
        if (host !== expectHost) break;
        if (within === 0) this.#checkDataCluster(host, table, l2Index);
      }
      const step = Math.min(limit - length, unit);
      length += step;
      expectHost += step;
      within += step;
    }
    return { kind, hostOffset, length };
  }

  #checkDataCluster(host: number, table: CacheEntry, l2Index: number): void {
    if (host < 0 || host % this.clusterSize !== 0) {
      throw this.#signalCorruption(
        `Cluster allocation offset ${hexAlt(Math.max(0, host))} unaligned (L2 offset: ${
          hexAlt(table.offset)
        }, L2 index: ${hexAlt(l2Index)})`,
        table.offset + l2Index * this.#entryBytes,
      );
    }
  }

  /**
   * The corruption QEMU reports for an invalid L2 entry: a zero flag in a v2 image, or an
   * inconsistent subcluster bitmap. Its read and write paths word the message differently.
   */
  #invalidEntry(table: CacheEntry, l2Index: number, path: "read" | "write"): BlockError {
    const where = `(L2 offset: ${hexAlt(table.offset)}, L2 index: ${hexAlt(l2Index)})`;
    const message = !this.#v3 && !this.extendedL2
      ? `Zero cluster entry found in pre-v3 image ${where}`
      : `Invalid cluster entry found ${path === "read" ? " " : ""}${where}`;
    return this.#signalCorruption(message, table.offset + l2Index * this.#entryBytes);
  }

  // ---- read ----

  async read(offset: number, dst: Uint8Array): Promise<void> {
    this.#live();
    checkRequest(this, "read", offset, dst.length);
    await this.#readAt(offset, dst);
  }

  /** Read guest bytes without the disk-size check (copy-on-write reads, the VM state area). */
  async #readAt(offset: number, dst: Uint8Array): Promise<void> {
    let pos = 0;
    while (pos < dst.length) {
      const run = this.#mapRun(offset + pos, dst.length - pos);
      const part = dst.subarray(pos, pos + run.length);
      switch (run.kind) {
        case "normal":
          this.file.readAt(run.hostOffset, part);
          break;
        case "zero-plain":
        case "zero-alloc":
          part.fill(0);
          break;
        case "unallocated":
        case "unallocated-alloc":
          await this.#readBacking(offset + pos, part);
          break;
        case "compressed":
          this.#readCompressed(offset + pos, part);
          break;
        default:
          throw this.#signalCorruption(
            `Invalid mapping at guest offset ${offset + pos}`,
            offset + pos,
          );
      }
      pos += run.length;
    }
  }

  async #readBacking(guestOffset: number, dst: Uint8Array): Promise<void> {
    const backing = this.backing;
    if (backing === undefined || guestOffset >= backing.size) {
      dst.fill(0);
      return;
    }
    const inside = Math.min(dst.length, backing.size - guestOffset);
    await backing.read(guestOffset, dst.subarray(0, inside));
    if (inside < dst.length) dst.fill(0, inside);
  }

  #readCompressed(guestOffset: number, dst: Uint8Array): void {
    const cs = this.clusterSize;
    const clusterIndex = Math.floor(guestOffset / cs);
    const table = this.#l2Table(Math.floor(clusterIndex / this.#l2Entries))!;
    const at = (clusterIndex % this.#l2Entries) * this.#entryBytes;
    const hi = table.view.getUint32(at), lo = table.view.getUint32(at + 4);
    const key = `${hi}:${lo}`;
    let data = this.#compressedCache?.key === key ? this.#compressedCache.data : undefined;
    if (data === undefined) {
      const loc = compressedLocation(hi, lo, this.clusterBits);
      const fileSize = this.file.size();
      if (loc.hostOffset < cs || loc.hostOffset >= fileSize) {
        throw this.#signalCorruption(
          `Compressed cluster at 0x${
            loc.hostOffset.toString(16)
          } is in the header or past the end of the file`,
          table.offset + at,
        );
      }
      const src = new Uint8Array(Math.min(loc.length, fileSize - loc.hostOffset));
      this.file.readAt(loc.hostOffset, src);
      data = new Uint8Array(cs);
      decompressCluster(this.header.compressionType, src, data, {
        path: this.filename,
        offset: loc.hostOffset,
      });
      this.#compressedCache = { key, data };
    }
    const within = guestOffset % cs;
    dst.set(data.subarray(within, within + dst.length));
  }

  // ---- status ----

  async blockStatus(offset: number, max: number): Promise<Extent> {
    this.#live();
    checkRequest(this, "block-status", offset, max);
    if (offset >= this.size || max === 0) return { kind: "eof", offset, length: 0 };
    const run = this.#mapRun(offset, Math.min(max, this.size - offset));
    const kinds: Record<ClusterKind, ExtentKind> = {
      "normal": "data",
      "zero-plain": "zero",
      "zero-alloc": "zero",
      "unallocated": "unallocated",
      "unallocated-alloc": "unallocated",
      "compressed": "compressed",
      "invalid": "unallocated",
    };
    const kind = kinds[run.kind];
    // Host offsets are known for unallocated subclusters of an allocated cluster too (QEMU reports them).
    if (run.kind === "normal" || run.kind === "zero-alloc" || run.kind === "unallocated-alloc") {
      return { kind, offset, length: run.length, hostOffset: run.hostOffset };
    }
    return { kind, offset, length: run.length };
  }

  allocatedSize(): number {
    return this.file.allocatedSize();
  }

  // ---- write ----

  async write(offset: number, src: Uint8Array, opts?: Qcow2WriteOptions): Promise<void> {
    this.#live();
    checkRequest(this, "write", offset, src.length);
    this.#writable();
    if (src.length === 0) return;
    this.#bitmaps?.mark(offset, src.length);
    if (opts?.compressed) {
      await this.#mutex.run(() => this.#writeCompressed(offset, src, opts.precompressed));
    } else {
      // Fast path: the whole request lands in clusters this image owns (COPIED) and whose units
      // already hold data: write in place, no metadata change.
      const run = this.#mapRun(offset, src.length, "write");
      if (run.length === src.length && run.kind === "normal" && this.#ownedAt(offset)) {
        this.#checkOverlap(run.hostOffset, src.length);
        this.file.writeAt(run.hostOffset, src);
      } else {
        await this.#mutex.run(() => this.#writeSlow(offset, src));
      }
    }
    if (opts?.fua) await this.flush();
  }

  /** True when the cluster holding `guestOffset` has the COPIED flag (refcount 1, writable in place). */
  #ownedAt(guestOffset: number): boolean {
    const slot = this.#slot(guestOffset, false);
    if (slot === undefined) return false;
    // Both the L2 table and the cluster must be this image's alone.
    const l1Index = Math.floor(guestOffset / this.clusterSize / this.#l2Entries);
    return (slot.table.view.getUint32(slot.at) & HI_COPIED) !== 0 && this.#l1Copied(l1Index);
  }

  /** The L2 slot of the cluster at `guestOffset`; with `forWrite`, an owned (COPIED) table is ensured. */
  #slot(guestOffset: number, forWrite: true): Slot;
  #slot(guestOffset: number, forWrite: false): Slot | undefined;
  #slot(guestOffset: number, forWrite: boolean): Slot | undefined {
    const clusterIndex = Math.floor(guestOffset / this.clusterSize);
    const l1Index = Math.floor(clusterIndex / this.#l2Entries);
    const at = (clusterIndex % this.#l2Entries) * this.#entryBytes;
    let table = this.#l2Table(l1Index);
    if (!forWrite) return table === undefined ? undefined : { table, at };
    if (table === undefined || !this.#l1Copied(l1Index)) table = this.#allocateL2(l1Index, table);
    return { table, at };
  }

  /**
   * Give L1 entry `l1Index` an L2 table this image owns: a new zeroed one, or a copy of a shared
   * one (snapshot). Ordering: refcount, then the table on disk, then the L1 entry.
   */
  #allocateL2(l1Index: number, shared: CacheEntry | undefined): CacheEntry {
    if (l1Index >= this.header.l1Size) {
      throw new BlockError("out-of-range", `L1 index ${l1Index} is past the L1 table`, {
        path: this.filename,
      });
    }
    this.#markDirty();
    const offset = this.#allocate(1);
    if (offset === 0) {
      throw this.#signalCorruption("Preventing invalid allocation of L2 table at offset 0", -1);
    }
    this.#checkOverlap(offset, this.clusterSize, true);
    const table = this.l2Cache.create(offset, shared?.data);
    if (shared) {
      // Entries of a copied table are owned by the snapshot too: none is COPIED any more.
      for (let at = 0; at < this.clusterSize; at += this.#entryBytes) {
        const hi = table.view.getUint32(at);
        if (hi & HI_COPIED) table.view.setUint32(at, (hi & ~HI_COPIED) >>> 0);
      }
    }
    // As QEMU's l2_allocate: the new table's refcount reaches the disk first, lazy or not.
    this.refcounts.flush();
    this.#barrier();
    this.#writeL2Tables([table]);
    this.#barrier();
    const [hi, lo] = encodeEntry(offset, true, false);
    this.#l1View.setUint32(l1Index * 8, hi);
    this.#l1View.setUint32(l1Index * 8 + 4, lo);
    this.file.writeAt(
      this.header.l1TableOffset + l1Index * 8,
      this.#l1.subarray(l1Index * 8, l1Index * 8 + 8),
    );
    if (shared) this.#freeLater(shared.offset / this.clusterSize, 1, false);
    return table;
  }

  /** Mark the image dirty (lazy refcounts) before its first metadata change. */
  #markDirty(): void {
    if (!this.#lazy || this.#dirtyMarked) return;
    this.header.incompatibleFeatures |= BigInt(INCOMPAT_DIRTY);
    this.#writeHeader();
    this.#barrier();
    this.#dirtyMarked = true;
  }

  /** A write that allocates or changes metadata, one cluster run at a time. */
  async #writeSlow(offset: number, src: Uint8Array): Promise<void> {
    if (this.extendedL2) this.#checkEntriesForWrite(offset, src.length);
    let pos = 0;
    while (pos < src.length) {
      pos += await this.#writeClusters(offset + pos, src.subarray(pos));
    }
  }

  /**
   * Before an allocating or metadata-changing write, every extended L2 entry it touches must be
   * consistent (QEMU's calculate_l2_meta): nothing is written when one is not.
   */
  #checkEntriesForWrite(offset: number, length: number): void {
    const cs = this.clusterSize;
    const last = Math.floor((offset + length - 1) / cs);
    for (let c = Math.floor(offset / cs); c <= last; c++) {
      const slot = this.#slot(c * cs, false);
      if (slot === undefined) {
        c = (Math.floor(c / this.#l2Entries) + 1) * this.#l2Entries - 1; // no table: next one
        continue;
      }
      if (this.#kindAt(slot.table, slot.at, 0) === "invalid") {
        throw this.#invalidEntry(slot.table, slot.at / this.#entryBytes, "write");
      }
    }
  }

  /** Units (subclusters) of cluster-relative range [from, to) as a bitmask. */
  #unitMask(from: number, to: number): number {
    if (!this.extendedL2) return 0;
    const first = Math.floor(from / this.#subclusterSize),
      last = Math.floor((to - 1) / this.#subclusterSize);
    let mask = 0;
    for (let sc = first; sc <= last; sc++) mask |= 1 << sc;
    return mask >>> 0;
  }

  /** True when the guest range reads as zeroes without reading data (zero clusters, or holes without backing). */
  #knownZero(guestOffset: number, length: number): boolean {
    let pos = 0;
    while (pos < length) {
      const run = this.#mapRun(guestOffset + pos, length - pos);
      const zero = run.kind === "zero-plain" || run.kind === "zero-alloc" ||
        ((run.kind === "unallocated" || run.kind === "unallocated-alloc") &&
          (this.backing === undefined || guestOffset + pos >= this.backing.size));
      if (!zero) return false;
      pos += run.length;
    }
    return true;
  }

  /**
   * Write from the start of `src` at `guestOffset` into clusters of one L2 table: either in place
   * in one owned cluster (updating subcluster or zero state), or into newly allocated contiguous
   * clusters with copy-on-write of the unwritten head and tail. Returns the bytes consumed.
   */
  async #writeClusters(guestOffset: number, src: Uint8Array): Promise<number> {
    const cs = this.clusterSize;
    const first = Math.floor(guestOffset / cs);
    // Owned cluster: write in place.
    if (this.#ownsHostCluster(first)) return await this.#writeInPlace(guestOffset, src);
    // How many clusters (within this L2 table) this write covers that need new host clusters.
    const tableFirst = Math.floor(first / this.#l2Entries) * this.#l2Entries;
    const end = guestOffset + src.length;
    let last = Math.floor((end - 1) / cs);
    last = Math.min(last, tableFirst + this.#l2Entries - 1);
    for (let c = first + 1; c <= last; c++) {
      if (this.#ownsHostCluster(c)) {
        last = c - 1;
        break;
      }
    }
    const count = last - first + 1;
    const writeEnd = Math.min(end, (last + 1) * cs);
    const consumed = writeEnd - guestOffset;

    // What the first and last clusters hold now decides how much to copy.
    const old = (c: number) => this.#oldState(c);
    const head = old(first);
    const tail = count === 1 ? head : old(last);
    const unit = this.#subclusterSize;
    // Extended L2 with no data in the cluster: copy only within the touched subclusters.
    const headStart = head.hasData || !this.extendedL2
      ? first * cs
      : Math.floor(guestOffset / unit) * unit;
    // Past the disk (the VM state area) a new cluster is filled whole, as QEMU fills it.
    const tailEndLimit = guestOffset >= this.size
      ? (last + 1) * cs
      : Math.min((last + 1) * cs, this.size);
    const tailEnd = tail.hasData || !this.extendedL2
      ? tailEndLimit
      : Math.min(Math.ceil(writeEnd / unit) * unit, tailEndLimit);
    const headLen = guestOffset - headStart;
    const tailLen = Math.max(0, tailEnd - writeEnd);
    // Read what the unwritten parts show now (backing, zeroes, shared or compressed data).
    const headZero = headLen === 0 || this.#knownZero(headStart, headLen);
    const tailZero = tailLen === 0 || this.#knownZero(writeEnd, tailLen);
    const headBytes = headZero ? undefined : new Uint8Array(headLen);
    if (headBytes) await this.#readAt(headStart, headBytes);
    const tailBytes = tailZero ? undefined : new Uint8Array(tailLen);
    if (tailBytes) await this.#readAt(writeEnd, tailBytes);

    // From here on nothing awaits: allocation, data and L2 update happen together.
    this.#markDirty();
    // The L2 table first (as QEMU), so a new table sits before the data it maps.
    this.#slot(first * cs, true);
    const fileEnd = this.file.size();
    const host = this.#allocate(count);
    this.#checkOverlap(host, count * cs);
    // Past the end of the file the new clusters read as zeroes already: zero COW is not written.
    const fresh = host >= fileEnd;
    const writeHead = headLen > 0 && !(fresh && headZero);
    const writeTail = tailLen > 0 && !(fresh && tailZero);
    const hostData = host + (guestOffset - first * cs);
    const data = src.subarray(0, consumed);
    if ((headLen > 0 && !writeHead) || (tailLen > 0 && !writeTail)) {
      // As QEMU's handle_alloc_space: new clusters whose copied parts would be zeroes are
      // allocated whole on the host (no holes inside them), then only the data is written.
      this.file.preallocate(host, count * cs);
    }
    if (!writeHead && !writeTail) {
      this.file.writeAt(hostData, data);
    } else {
      // One host write: COW head, data, COW tail.
      const from = writeHead ? headLen : 0, to = writeTail ? tailLen : 0;
      const merged = new Uint8Array(from + consumed + to);
      if (headBytes && writeHead) merged.set(headBytes);
      merged.set(data, from);
      if (tailBytes && writeTail) merged.set(tailBytes, from + consumed);
      this.file.writeAt(hostData - from, merged);
    }

    // L2 entries, then frees of what they pointed at.
    for (let c = first; c <= last; c++) {
      const slot = this.#slot(c * cs, true);
      const view = slot.table.view;
      const oldHi = view.getUint32(slot.at), oldLo = view.getUint32(slot.at + 4);
      const [hi, lo] = encodeEntry(host + (c - first) * cs, true, false);
      if (this.extendedL2) {
        const from = Math.max(guestOffset, c * cs) - c * cs;
        const to = Math.min(writeEnd, (c + 1) * cs) - c * cs;
        const touched = this.#unitMask(from, to);
        const state = c === first ? head : c === last ? tail : old(c);
        const alloc = state.compressed ? 0xffffffff : (state.alloc | touched) >>> 0;
        const zero = state.compressed ? 0 : (state.zero & ~touched) >>> 0;
        view.setUint32(slot.at + 8, zero);
        view.setUint32(slot.at + 12, alloc);
      }
      view.setUint32(slot.at, hi);
      view.setUint32(slot.at + 4, lo);
      slot.table.dirty = true;
      this.#releaseEntry(oldHi, oldLo, false);
    }
    return consumed;
  }

  /** True when guest cluster `c` has a host cluster this image alone owns (writable in place). */
  #ownsHostCluster(c: number): boolean {
    const slot = this.#slot(c * this.clusterSize, false);
    if (slot === undefined || !this.#l1Copied(Math.floor(c / this.#l2Entries))) return false;
    const hi = slot.table.view.getUint32(slot.at), lo = slot.table.view.getUint32(slot.at + 4);
    return (hi & HI_COPIED) !== 0 && (hi & HI_COMPRESSED) === 0 && entryOffset(hi, lo) > 0;
  }

  /** What cluster `c` holds before an allocating write replaces it. */
  #oldState(c: number): { hasData: boolean; compressed: boolean; alloc: number; zero: number } {
    const slot = this.#slot(c * this.clusterSize, false);
    if (slot === undefined) return { hasData: false, compressed: false, alloc: 0, zero: 0 };
    const view = slot.table.view;
    const hi = view.getUint32(slot.at), lo = view.getUint32(slot.at + 4);
    if (hi & HI_COMPRESSED) return { hasData: true, compressed: true, alloc: 0, zero: 0 };
    const hasHost = entryOffset(hi, lo) > 0;
    if (!this.extendedL2) {
      const kind = classifyStandard(hi, lo, this.#v3);
      return {
        hasData: kind === "normal" || (kind === "unallocated" && this.backing !== undefined),
        compressed: false,
        alloc: 0,
        zero: 0,
      };
    }
    const alloc = hasHost ? view.getUint32(slot.at + 12) : 0;
    const zero = view.getUint32(slot.at + 8);
    return { hasData: hasHost && alloc !== 0, compressed: false, alloc, zero };
  }

  /**
   * Allocate host clusters as QEMU does, reusing clusters freed earlier in the session: frees
   * still pending are applied first (their L2 tables reach the disk before the refcounts drop),
   * so a reused cluster is never referenced by an old table on disk.
   */
  #allocate(count: number): number {
    if (this.#pendingFrees.length > 0) this.#applyFrees();
    return this.refcounts.allocate(count);
  }

  #allocateBytes(size: number): number {
    if (this.#pendingFrees.length > 0) this.#applyFrees();
    return this.refcounts.allocateBytes(size);
  }

  /** Drop what an L2 entry pointed at (after the entry itself changed). */
  #releaseEntry(hi: number, lo: number, punch = true): void {
    if (hi & HI_COMPRESSED) {
      const loc = compressedLocation(hi, lo, this.clusterBits);
      const [firstCluster, lastCluster] = compressedClusters(loc, this.clusterBits);
      this.#freeLater(firstCluster, lastCluster - firstCluster + 1, punch);
      return;
    }
    const host = entryOffset(hi, lo);
    if (host > 0) this.#freeLater(host / this.clusterSize, 1, punch);
  }

  /**
   * Free clusters once the tables that dropped them are written. `punch` releases the host space
   * too, as QEMU passes discards down for requests, snapshots and shrinking but not for clusters
   * a write or a table copy replaced (its QCOW2_DISCARD_OTHER).
   */
  #freeLater(cluster: number, count: number, punch: boolean): void {
    this.#pendingFrees.push([cluster, count, punch]);
    this.#compressedCache = undefined;
    // Keep the list bounded: a long run of frees is applied through a flush of the L2 tables.
    if (this.#pendingFrees.length > 4096) this.#applyFrees();
  }

  /** Write into an owned cluster: data in place, copying partial subclusters, updating zero/alloc state. */
  async #writeInPlace(guestOffset: number, src: Uint8Array): Promise<number> {
    const cs = this.clusterSize;
    const c = Math.floor(guestOffset / cs);
    const within = guestOffset % cs;
    const consumed = Math.min(src.length, cs - within);
    const slot = this.#slot(guestOffset, false)!;
    const view = slot.table.view;
    const hi = view.getUint32(slot.at), lo = view.getUint32(slot.at + 4);
    const host = entryOffset(hi, lo);
    const unit = this.#subclusterSize;
    let start = within, end = within + consumed;
    let needsUpdate: boolean;
    if (this.extendedL2) {
      const touched = this.#unitMask(within, end);
      const alloc = view.getUint32(slot.at + 12), zero = view.getUint32(slot.at + 8);
      needsUpdate = (alloc & touched) >>> 0 !== touched || (zero & touched) !== 0;
      // Partial subclusters that held no data get their other bytes from what they showed.
      if (
        (alloc & (1 << Math.floor(within / unit))) === 0 ||
        (zero & (1 << Math.floor(within / unit)))
      ) {
        start = Math.floor(within / unit) * unit;
      }
      const lastSc = Math.floor((end - 1) / unit);
      if ((alloc & (1 << lastSc)) === 0 || (zero & (1 << lastSc))) {
        end = Math.min((lastSc + 1) * unit, cs, this.size - c * cs);
      }
    } else {
      // A zero-alloc cluster: the rest of the cluster becomes explicit zeroes.
      needsUpdate = classifyStandard(hi, lo, this.#v3) === "zero-alloc";
      if (needsUpdate) {
        start = 0;
        end = Math.min(cs, this.size - c * cs);
      }
    }
    const buf = start === within && end === within + consumed
      ? src.subarray(0, consumed)
      : new Uint8Array(end - start);
    if (buf.length !== consumed) {
      if (start < within) await this.#readAt(c * cs + start, buf.subarray(0, within - start));
      buf.set(src.subarray(0, consumed), within - start);
      if (end > within + consumed) {
        await this.#readAt(c * cs + within + consumed, buf.subarray(within + consumed - start));
      }
    }
    this.#checkOverlap(host + start, buf.length);
    this.file.writeAt(host + start, buf);
    if (needsUpdate) {
      // Re-read the entry: it cannot have changed (we hold the mutex), but the table may have been evicted.
      const s = this.#slot(guestOffset, false)!;
      if (this.extendedL2) {
        const touched = this.#unitMask(start, end);
        s.table.view.setUint32(s.at + 12, (s.table.view.getUint32(s.at + 12) | touched) >>> 0);
        s.table.view.setUint32(s.at + 8, (s.table.view.getUint32(s.at + 8) & ~touched) >>> 0);
      } else {
        s.table.view.setUint32(s.at + 4, (s.table.view.getUint32(s.at + 4) & ~1) >>> 0);
      }
      s.table.dirty = true;
    }
    return consumed;
  }

  /** Compressed write: whole clusters into unallocated clusters only. */
  async #writeCompressed(
    offset: number,
    src: Uint8Array,
    precompressed?: ReadonlyArray<Uint8Array | null | undefined>,
  ): Promise<void> {
    const cs = this.clusterSize;
    if (offset % cs !== 0 || (src.length % cs !== 0 && offset + src.length !== this.size)) {
      throw new BlockError("invalid-argument", "Compressed writes must cover whole clusters", {
        path: this.filename,
        offset,
      });
    }
    // QEMU runs one task per cluster, eight at a time, and stops starting tasks once it has
    // seen a failure: cluster i is still written unless one of clusters 0..i-9 failed.
    let firstError: BlockError | undefined;
    let failedAt = Infinity;
    for (let pos = 0; pos < src.length; pos += cs) {
      const index = pos / cs;
      if (index - COMPRESSED_WORKERS - 1 >= failedAt) break;
      const guest = offset + pos;
      let data = src.subarray(pos, Math.min(src.length, pos + cs));
      if (data.length < cs) {
        const padded = new Uint8Array(cs);
        padded.set(data);
        data = padded;
      }
      // As QEMU: compress first; data that does not shrink is an ordinary write wherever it goes.
      const given = precompressed?.[pos / cs];
      const packed = given === undefined
        ? compressCluster(this.header.compressionType, data)
        : given === null || given.length >= cs
        ? undefined
        : given;
      if (packed === undefined) {
        await this.#writeSlow(guest, data.subarray(0, Math.min(cs, this.size - guest)));
        continue;
      }
      // Only a cluster without a host cluster (unallocated or zero-flagged) takes compressed data.
      const slot = this.#slot(guest, false);
      if (slot !== undefined) {
        const hi = slot.table.view.getUint32(slot.at), lo = slot.table.view.getUint32(slot.at + 4);
        if ((hi & HI_COMPRESSED) !== 0 || entryOffset(hi, lo) !== 0) {
          firstError ??= new BlockError(
            "io",
            "Compressed writes are only possible to unallocated clusters",
            { path: this.filename, offset: guest },
          );
          failedAt = Math.min(failedAt, index);
          continue;
        }
      }
      this.#markDirty();
      const s = this.#slot(guest, true);
      const host = this.#allocateBytes(packed.length);
      // Compressed data may run on into the next host cluster: check every cluster it touches.
      const firstHost = Math.floor(host / cs) * cs;
      this.#checkOverlap(firstHost, Math.ceil((host + packed.length) / cs) * cs - firstHost);
      this.file.writeAt(host, packed);
      const [hi, lo] = encodeCompressed(host, packed.length, this.clusterBits);
      s.table.view.setUint32(s.at, hi);
      s.table.view.setUint32(s.at + 4, lo);
      if (this.extendedL2) {
        // A compressed entry has no subcluster bitmap.
        s.table.view.setUint32(s.at + 8, 0);
        s.table.view.setUint32(s.at + 12, 0);
      }
      s.table.dirty = true;
    }
    if (firstError !== undefined) throw firstError;
  }

  // ---- zeroes and discard ----

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
    this.#bitmaps?.mark(offset, length);
    // v2 takes no flags (QEMU's supported_zero_flags): zeroes never unmap there.
    const unmap = (opts?.unmap ?? false) && this.#v3;
    await this.#mutex.run(async () => {
      const unit = this.#subclusterSize;
      const end = offset + length;
      const tail = end % unit;
      let head = offset % unit;
      for (let pos = offset; pos < end;) {
        let num = end - pos;
        if (head) {
          num = Math.min(num, unit - head);
          head = (head + num) % unit;
        } else if (tail && num > unit) {
          num -= tail;
        }
        if (!(await this.#zeroPiece(pos, num, unmap))) {
          // The bounce-buffer fallback: zero data, in bounded pieces.
          const zeroes = new Uint8Array(Math.min(num, 1 << 20));
          for (let at = pos; at < pos + num; at += zeroes.length) {
            await this.#writeSlow(at, zeroes.subarray(0, Math.min(zeroes.length, pos + num - at)));
          }
        }
        pos += num;
      }
    });
    if (opts?.fua) await this.flush();
  }

  /**
   * QEMU's qcow2_co_pwrite_zeroes for one piece: false (its -ENOTSUP) when flags cannot do it.
   * A piece that is not subcluster-aligned is widened to its subcluster when the rest of that
   * subcluster reads as zeroes through the whole chain and has no data in this layer.
   */
  async #zeroPiece(offset: number, bytes: number, unmap: boolean): Promise<boolean> {
    const unit = this.#subclusterSize;
    const head = offset % unit;
    const tail = offset + bytes === this.size ? 0 : (unit - (offset + bytes) % unit) % unit;
    if (head || tail) {
      if (
        !(await this.#readsZero(offset - head, head)) ||
        !(await this.#readsZero(offset + bytes, tail))
      ) return false;
      offset -= head;
      bytes = Math.min(unit, this.size - offset);
      const kind = this.#mapRun(offset, bytes, "write").kind;
      if (kind === "normal" || kind === "compressed") return false;
    }
    return this.#zeroize(offset, bytes, unmap);
  }

  /**
   * QEMU's qcow2_subcluster_zeroize: v2 can only discard (and only without a backing file);
   * v3 sets zero flags on whole clusters and zero bits on the subclusters of partial ones.
   */
  #zeroize(offset: number, bytes: number, unmap: boolean): boolean {
    const cs = this.clusterSize;
    const end = Math.min(offset + bytes, this.size);
    if (!this.#v3) {
      if (this.backing !== undefined) return false;
      for (let c = Math.floor(offset / cs) * cs; c < end; c += cs) this.#discardCluster(c);
      return true;
    }
    const head = Math.min(end, Math.ceil(offset / cs) * cs) - offset;
    const start = offset + head;
    const tail = end >= this.size ? 0 : end - Math.max(start, Math.floor(end / cs) * cs);
    const alignedEnd = end - tail;
    if (head > 0 && !this.#zeroUnits(offset, offset + head, false)) return false;
    for (let pos = start; pos < alignedEnd; pos += cs) {
      this.#zeroUnits(pos, Math.min(pos + cs, this.size), unmap);
    }
    if (tail > 0 && !this.#zeroUnits(alignedEnd, end, false)) return false;
    return true;
  }

  /** Whether [offset, offset+length) reads as zeroes through the chain without reading data. */
  async #readsZero(offset: number, length: number): Promise<boolean> {
    const end = Math.min(offset + length, this.size);
    for (let pos = offset; pos < end;) {
      const run = this.#mapRun(pos, end - pos);
      if (run.kind === "normal" || run.kind === "compressed") return false;
      if (
        (run.kind === "unallocated" || run.kind === "unallocated-alloc") &&
        !(await chainReadsZero(this.backing, pos, run.length))
      ) return false;
      pos += run.length;
    }
    return true;
  }

  /**
   * Give whole units [from, to) of one cluster the zero flag (QEMU's zero_in_l2_slice): the host
   * cluster is kept unless `unmap` (or it is compressed). False when flags cannot do it (part of
   * a compressed cluster).
   */
  #zeroUnits(from: number, to: number, unmap: boolean): boolean {
    const cs = this.clusterSize;
    const c = Math.floor(from / cs);
    const wholeCluster = from === c * cs && (to === (c + 1) * cs || to === this.size);
    const existing = this.#slot(from, false);
    if (existing !== undefined) {
      const hi = existing.table.view.getUint32(existing.at);
      if ((hi & HI_COMPRESSED) && !wholeCluster) return false;
    }
    const slot = this.#slot(from, true);
    const view = slot.table.view;
    const hi = view.getUint32(slot.at), lo = view.getUint32(slot.at + 4);
    const compressed = (hi & HI_COMPRESSED) !== 0;
    const host = compressed ? 0 : entryOffset(hi, lo);
    const drop = compressed || (unmap && host > 0 && wholeCluster);
    if (this.extendedL2) {
      const touched = wholeCluster ? 0xffffffff : this.#unitMask(from - c * cs, to - c * cs);
      const alloc = view.getUint32(slot.at + 12), zero = view.getUint32(slot.at + 8);
      if (drop) {
        view.setUint32(slot.at, 0);
        view.setUint32(slot.at + 4, 0);
      }
      view.setUint32(slot.at + 8, (zero | touched) >>> 0);
      view.setUint32(slot.at + 12, drop ? 0 : (alloc & ~touched) >>> 0);
    } else {
      const [nhi, nlo] = drop ? encodeEntry(0, false, true) : [hi, (lo | 1) >>> 0];
      view.setUint32(slot.at, nhi);
      view.setUint32(slot.at + 4, nlo);
    }
    slot.table.dirty = true;
    if (drop) this.#releaseEntry(hi, lo);
    return true;
  }

  async discard(offset: number, length: number): Promise<void> {
    this.#live();
    checkRequest(this, "discard", offset, length);
    this.#writable();
    this.#bitmaps?.mark(offset, length);
    // v2 has no zero flag: dropping a cluster would expose the backing file's older data, so the
    // hint is ignored (as QEMU's -ENOTSUP, which its block layer turns into success).
    if (!this.#v3 && this.backing !== undefined) return;
    const cs = this.clusterSize;
    // Only whole clusters are discarded (the tail cluster counts when the request reaches the end).
    const start = Math.ceil(offset / cs) * cs;
    const end = offset + length === this.size ? this.size : Math.floor((offset + length) / cs) * cs;
    if (end <= start) return;
    await this.#mutex.run(() => {
      for (let pos = start; pos < end; pos += cs) this.#discardCluster(pos);
      return Promise.resolve();
    });
  }

  /**
   * Discard one cluster as QEMU does: with a backing file or a host cluster it must read as
   * zeroes afterwards (zero flag on v3, unallocated on v2), and its host cluster is released.
   */
  #discardCluster(pos: number): void {
    const existing = this.#slot(pos, false);
    if (existing === undefined && this.backing === undefined) return;
    let hi = 0, lo = 0;
    if (existing !== undefined) {
      hi = existing.table.view.getUint32(existing.at);
      lo = existing.table.view.getUint32(existing.at + 4);
    }
    const allocated = (hi & HI_COMPRESSED) !== 0 || entryOffset(hi, lo) > 0;
    if (!allocated && this.backing === undefined) return;
    const s = this.#slot(pos, true);
    const view = s.table.view;
    if (this.extendedL2) {
      view.setUint32(s.at, 0);
      view.setUint32(s.at + 4, 0);
      view.setUint32(s.at + 8, 0xffffffff);
      view.setUint32(s.at + 12, 0);
    } else {
      const [nhi, nlo] = encodeEntry(0, false, this.#v3);
      view.setUint32(s.at, nhi);
      view.setUint32(s.at + 4, nlo);
    }
    s.table.dirty = true;
    this.#releaseEntry(hi, lo, this.#passDiscardRequest);
  }

  // ---- flush, ordering, frees ----

  /** L2 tables reach the disk only after the refcounts (and data) they depend on. */
  #writeL2Tables(entries: CacheEntry[]): void {
    // Lazy refcounts skip only the refcount ordering (repaired on open): data still goes first.
    if (!this.#lazy) this.refcounts.flush();
    this.#barrier();
    for (const e of entries) {
      this.#checkOverlap(e.offset, this.clusterSize, true);
      this.file.writeAt(e.offset, e.data);
      e.dirty = false;
    }
  }

  /** Write L2 tables, then apply deferred frees: a crash leaks, never shares. */
  #applyFrees(): void {
    this.l2Cache.flush();
    if (this.#pendingFrees.length === 0) return;
    this.#barrier();
    const frees = this.#pendingFrees;
    this.#pendingFrees = [];
    for (const [cluster, count, punch] of frees) {
      this.refcounts.change(cluster, count, -1);
      for (let c = cluster; c < cluster + count; c++) {
        if (this.refcounts.get(c) === 0) {
          this.l2Cache.discard(c * this.clusterSize);
          if (punch) this.file.punchHole(c * this.clusterSize, this.clusterSize);
        }
      }
    }
  }

  /**
   * Grows the file to a multiple of `alignment` bytes, as QEMU does after compressed writes (its
   * zero-length compressed write) so that sector-based readers see whole sectors.
   */
  async alignFileEnd(alignment: number): Promise<void> {
    this.#live();
    this.#writable();
    await this.#mutex.run(async () => {
      const size = this.file.size();
      const aligned = Math.ceil(size / alignment) * alignment;
      if (aligned !== size) await this.file.truncate(aligned);
    });
  }

  async flush(): Promise<void> {
    this.#live();
    if (this.#readOnly && !this.#corrupt) return;
    await this.#mutex.run(() => {
      this.#flushAll();
      return Promise.resolve();
    });
  }

  /**
   * Write the cached tables and apply deferred frees. While lazy refcounts have the image marked
   * dirty, refcount blocks stay in memory unless `all` (QEMU's qcow2_need_accurate_refcounts):
   * a crash then leaves refcounts that the next open repairs.
   */
  #flushAll(all = false): void {
    if (this.#corrupt) return;
    const refcounts = all || !(this.#lazy && this.#dirtyMarked);
    if (refcounts) this.refcounts.flush();
    this.#barrier();
    this.#applyFrees();
    if (refcounts) this.refcounts.flush();
    this.#barrier();
  }

  // ---- overlap checks ----

  /** Refuse (and mark corrupt) a write of data or a new table onto existing metadata. */
  #checkOverlap(host: number, length: number, isTable = false): void {
    const cs = this.clusterSize;
    const hit = (what: string) => {
      throw this.#signalCorruption(
        `Preventing invalid write on metadata (overlaps with ${what})`,
        host,
      );
    };
    if (host < cs) hit("qcow2_header");
    const end = host + length;
    const overlaps = (start: number, len: number) => start < end && host < start + len;
    const h = this.header;
    if (overlaps(h.l1TableOffset, h.l1Size * 8)) hit("active L1 table");
    if (overlaps(this.refcounts.tableOffset, this.refcounts.tableClusters * cs)) {
      hit("refcount table");
    }
    if (h.nbSnapshots > 0 && overlaps(h.snapshotsOffset, this.#snapshots.bytes)) {
      hit("snapshot table");
    }
    for (const s of this.#snapshots.entries) {
      if (overlaps(s.l1TableOffset, s.l1Size * 8)) hit("inactive L1 table");
    }
    for (let c = Math.floor(host / cs); c * cs < end; c++) {
      if (this.refcounts.cache.peek(c * cs) !== undefined) hit("refcount block");
      if (!isTable && this.l2Cache.peek(c * cs) !== undefined) hit("active L2 table");
    }
  }

  // ---- resize ----

  async truncate(size: number, opts?: TruncateOptions): Promise<void> {
    this.#live();
    checkSize(size);
    if (this.#readOnly) {
      throw new BlockError("read-only", "Image is read-only", { path: this.filename });
    }
    this.#writable();
    if (size % 512 !== 0) {
      throw new BlockError("invalid-argument", "The new size must be a multiple of 512", {
        path: this.filename,
      });
    }
    // v2 snapshots carry no size of their own, so the image size cannot change under them.
    if (!this.#v3 && this.header.nbSnapshots > 0) {
      throw new BlockError("unsupported", "Can't resize a v2 image which has snapshots", {
        path: this.filename,
        errno: 95,
      });
    }
    this.#bitmaps?.checkResize();
    const old = this.size;
    const mode = opts?.preallocation ?? "off";
    // A backing file longer than the old end would show through the new range: it must read
    // as zeroes (QEMU's truncate with BDRV_REQ_ZERO_WRITE). v2 cannot express that with an
    // overlay, so QEMU refuses, before it changes the size.
    const zeroNewRange = size > old && this.backing !== undefined && this.backing.size > old;
    // falloc/full give zeroes from the file itself (QEMU's file-level BDRV_REQ_ZERO_WRITE).
    const hostData = mode === "falloc" || mode === "full";
    // QEMU zeroes [align_up(old, subcluster), size) with flags; what it cannot flag makes the
    // resize fail before the size changes: any such range on v2, or a partial compressed cluster.
    const zeroStart = Math.ceil(old / this.#subclusterSize) * this.#subclusterSize;
    const flagsNeeded = zeroNewRange && !hostData && zeroStart < size;
    if (
      flagsNeeded &&
      (!this.#v3 || (zeroStart % this.clusterSize !== 0 && this.#compressedAt(zeroStart)))
    ) {
      throw new BlockError(
        "unsupported",
        "Failed to zero out new clusters: Operation not supported",
        {
          path: this.filename,
          errno: 95,
        },
      );
    }
    if (size < old && mode !== "off") {
      throw new BlockError(
        "invalid-argument",
        "Preallocation can't be used for shrinking an image",
        {
          path: this.filename,
        },
      );
    }
    await this.#mutex.run(async () => {
      if (size > this.size) this.#grow(size);
      else if (size < this.size) await this.#shrink(size);
    });
    this.#bitmaps?.resize(size);
    // What truncate writes into the new range is no guest write: QEMU's truncate marks no bitmap.
    using _unmarked = this.#bitmaps?.quiet();
    if (size <= old) return;
    if (hostData) {
      // New data clusters hold the new range (the old last cluster copied into one of them).
      await this.#mutex.run(() => this.#preallocateData(mode, old, size, zeroNewRange));
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
    if (tailEnd > old && !(await this.#readsZero(old, tailEnd - old))) {
      await this.writeZeroes(old, tailEnd - old);
    }
  }

  /** Whether the cluster holding guest offset `guestOffset` is a compressed cluster. */
  #compressedAt(guestOffset: number): boolean {
    const slot = this.#slot(guestOffset, false);
    return slot !== undefined && (slot.table.view.getUint32(slot.at) & HI_COMPRESSED) !== 0;
  }

  /**
   * Growing with falloc/full preallocation, laid out as QEMU's qcow2_co_truncate does: new
   * refcount structures right after the last cluster in use, then one contiguous run of data
   * clusters for every guest cluster from the one holding the old end (its old bytes are copied
   * over) to the new end, host space reserved (falloc) or written (full), then the L2 entries;
   * L2 tables come from wherever the allocator finds room. With subclusters and a backing file
   * to hide, the new clusters' subclusters are marked allocated (they read the file's zeroes).
   */
  async #preallocateData(
    mode: "falloc" | "full",
    oldLength: number,
    newLength: number,
    hideBacking: boolean,
  ): Promise<void> {
    const cs = this.clusterSize;
    this.#applyFrees();
    const fileSize = this.file.size();
    let last = Math.ceil(fileSize / cs) - 1;
    while (last >= 0 && this.refcounts.get(last) === 0) last--;
    const fileClusters = last >= 0 ? last + 1 : Math.ceil(fileSize / cs);
    const firstGuest = Math.floor(oldLength / cs);
    const count = Math.ceil(newLength / cs) - firstGuest;
    const tables = Math.ceil(count / this.#l2Entries) + 1;
    const start = this.refcounts.refcountArea(fileClusters, count + tables, true);
    this.refcounts.change(start, count, 1);
    this.#checkOverlap(start * cs, count * cs);
    const end = (start + count) * cs;
    const have = this.file.size();
    if (mode === "full") {
      const zeroes = new Uint8Array(Math.min(end - have, 1 << 20));
      for (let at = have; at < end; at += zeroes.length) {
        this.file.writeAt(at, zeroes.subarray(0, Math.min(zeroes.length, end - at)));
      }
    } else if (end > have) {
      this.file.preallocate(have, end - have);
    }
    // The old last cluster's bytes before the old end move into the first new cluster.
    const head = oldLength - firstGuest * cs;
    if (head > 0) {
      const bytes = new Uint8Array(head);
      await this.read(firstGuest * cs, bytes);
      this.file.writeAt(start * cs, bytes);
    }
    this.#markDirty();
    for (let i = 0; i < count; i++) {
      const slot = this.#slot((firstGuest + i) * cs, true);
      const view = slot.table.view;
      const oldHi = view.getUint32(slot.at), oldLo = view.getUint32(slot.at + 4);
      const [hi, lo] = encodeEntry((start + i) * cs, true, false);
      view.setUint32(slot.at, hi);
      view.setUint32(slot.at + 4, lo);
      if (this.extendedL2 && hideBacking) {
        view.setUint32(slot.at + 8, 0);
        view.setUint32(slot.at + 12, 0xffffffff);
      }
      slot.table.dirty = true;
      this.#releaseEntry(oldHi, oldLo, false);
    }
    this.#flushAll();
  }

  #grow(size: number): void {
    const cs = this.clusterSize;
    const needed = Math.ceil(size / (cs * this.#l2Entries));
    if (needed * 8 > MAX_L1_BYTES) {
      throw new BlockError(
        "invalid-argument",
        `Image size ${size} is too large for this cluster size (L1 table limit)`,
        {
          path: this.filename,
        },
      );
    }
    if (needed > this.header.l1Size) {
      this.#growL1(needed, size);
    } else {
      this.header.size = size;
      this.#writeHeader();
    }
    this.#barrier();
  }

  /**
   * Move the active L1 table to a larger copy of `entries` entries; the header switches to it
   * (and to `size`) in one write, then the old table is freed.
   */
  #growL1(entries: number, size: number): void {
    const cs = this.clusterSize;
    this.#flushAll();
    const newL1 = new Uint8Array(entries * 8);
    newL1.set(this.#l1);
    const clusters = Math.ceil(newL1.length / cs);
    const offset = this.#allocate(clusters);
    this.refcounts.flush();
    this.#barrier();
    this.file.writeAt(offset, newL1);
    this.#barrier();
    const oldOffset = this.header.l1TableOffset, oldSize = this.header.l1Size;
    this.header.l1TableOffset = offset;
    this.header.l1Size = entries;
    this.header.size = size;
    this.#writeHeader();
    this.#barrier();
    this.#l1 = newL1;
    this.#l1View = new DataView(newL1.buffer);
    if (oldSize > 0) this.refcounts.change(oldOffset / cs, Math.ceil(oldSize * 8 / cs), -1);
    this.refcounts.flush();
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
    if (this.#readOnly) {
      throw new BlockError("read-only", "Image is read-only", { path: this.filename });
    }
    this.#writable();
    const offset = this.#vmStateRange(pos, src.length);
    if (src.length === 0) return;
    await this.#mutex.run(async () => {
      const needed = Math.ceil((offset + src.length) / (this.clusterSize * this.#l2Entries));
      if (needed > this.header.l1Size) {
        let entries = Math.max(1, this.header.l1Size);
        while (needed > entries) entries = Math.floor((entries * 3 + 1) / 2);
        this.#growL1(entries, this.header.size);
        this.#barrier();
      }
      await this.#writeSlow(offset, src);
    });
  }

  /** Read QEMU's VM state area (qcow2_load_vmstate); what was never written reads as zeroes. */
  async readVmState(pos: number, dst: Uint8Array): Promise<void> {
    this.#live();
    await this.#readAt(this.#vmStateRange(pos, dst.length), dst);
  }

  #vmStateRange(pos: number, length: number): number {
    const offset = this.vmStateOffset + pos;
    const limit = (MAX_L1_BYTES / 8) * this.clusterSize * this.#l2Entries;
    if (!Number.isSafeInteger(pos) || pos < 0 || offset + length > limit) {
      throw new BlockError("out-of-range", `VM state range ${pos}+${length} is out of range`, {
        path: this.filename,
        errno: 22,
      });
    }
    return offset;
  }

  async #shrink(size: number): Promise<void> {
    // Whole clusters past the new end are dropped with whatever they hold (QEMU's full discard);
    // the partial last cluster keeps its bytes, zeroed on a later grow. Snapshots keep their
    // own references (v3 records each snapshot's size; v2 was refused before).
    const cs = this.clusterSize;
    const firstCut = Math.ceil(size / cs);
    // QEMU's discard of the cut range takes the L2 table that maps its start even when it has
    // none yet (and then frees the tables past the new end): the kept one is allocated here too.
    const keepTables = Math.ceil(size / (cs * this.#l2Entries));
    if (firstCut * cs < this.size && Math.floor(firstCut / this.#l2Entries) < keepTables) {
      this.#slot(firstCut * cs, true);
    }
    for (let c = firstCut; c * cs < this.size; c++) {
      const slot = this.#slot(c * cs, false);
      if (slot === undefined) continue;
      const view = slot.table.view;
      const hi = view.getUint32(slot.at), lo = view.getUint32(slot.at + 4);
      const bitmap = this.extendedL2
        ? view.getUint32(slot.at + 8) | view.getUint32(slot.at + 12)
        : 0;
      if (hi !== 0 || lo !== 0 || bitmap !== 0) {
        const s = this.#slot(c * cs, true);
        s.table.view.setUint32(s.at, 0);
        s.table.view.setUint32(s.at + 4, 0);
        if (this.extendedL2) {
          s.table.view.setUint32(s.at + 8, 0);
          s.table.view.setUint32(s.at + 12, 0);
        }
        s.table.dirty = true;
        this.#releaseEntry(hi, lo);
      }
    }
    this.#flushAll();
    for (let i = keepTables; i < this.header.l1Size; i++) {
      const offset = this.#l1Entry(i);
      if (offset === 0) continue;
      this.#l1View.setUint32(i * 8, 0);
      this.#l1View.setUint32(i * 8 + 4, 0);
      this.file.writeAt(this.header.l1TableOffset + i * 8, this.#l1.subarray(i * 8, i * 8 + 8));
      this.#barrier();
      this.l2Cache.discard(offset);
      this.refcounts.change(offset / cs, 1, -1);
    }
    this.header.size = size;
    this.#writeHeader();
    this.refcounts.flush();
    this.#barrier();
    // Trim the host file after its last cluster in use (QEMU's qcow2_get_last_cluster).
    const fileSize = this.file.size();
    let last = Math.ceil(fileSize / cs) - 1;
    while (last >= 0 && this.refcounts.get(last) === 0) last--;
    if ((last + 1) * cs < fileSize) this.file.truncate((last + 1) * cs);
  }

  /**
   * Allocate every cluster of the image (QEMU's preallocation): L2 tables and data clusters, data
   * reading as zeroes; `falloc` also reserves the host space, `full` writes the zeroes.
   */
  async preallocate(mode: "metadata" | "falloc" | "full", from = 0): Promise<void> {
    this.#live();
    this.#writable();
    const cs = this.clusterSize;
    const span = cs * this.#l2Entries;
    await this.#mutex.run(() => {
      for (
        let tableStart = Math.floor(from / span) * span;
        tableStart < this.size;
        tableStart += span
      ) {
        const first = tableStart / cs;
        const clusters = Math.ceil(Math.min(span, this.size - tableStart) / cs);
        const table = this.#slot(tableStart, true).table;
        // Clusters of this table (from `from` on) that have no data cluster yet, in runs.
        let c = Math.max(0, Math.floor(from / cs) - first);
        while (c < clusters) {
          if (this.#hasHost(table, c * this.#entryBytes)) {
            c++;
            continue;
          }
          let n = 1;
          while (c + n < clusters && !this.#hasHost(table, (c + n) * this.#entryBytes)) n++;
          const host = this.#allocate(n);
          this.#checkOverlap(host, n * cs);
          for (let i = 0; i < n; i++) {
            const at = (c + i) * this.#entryBytes;
            const [hi, lo] = encodeEntry(host + i * cs, true, false);
            // Subcluster bitmaps stay as they are (QEMU's prealloc L2 meta): unallocated
            // subclusters keep reading from the backing file, zero ones keep reading zeroes.
            table.view.setUint32(at, hi);
            table.view.setUint32(at + 4, lo);
          }
          table.dirty = true;
          const end = host + n * cs;
          if (mode === "full") {
            const zeroes = new Uint8Array(Math.min(n * cs, 1 << 20));
            for (let at = host; at < end; at += zeroes.length) {
              this.file.writeAt(at, zeroes.subarray(0, Math.min(zeroes.length, end - at)));
            }
          } else if (mode === "falloc") {
            this.file.preallocate(host, n * cs);
          } else if (this.file.size() < end) {
            this.file.truncate(end);
          }
          c += n;
        }
      }
      this.#flushAll();
      return Promise.resolve();
    });
  }

  #hasHost(table: CacheEntry, at: number): boolean {
    const hi = table.view.getUint32(at), lo = table.view.getUint32(at + 4);
    return (hi & HI_COMPRESSED) !== 0 || entryOffset(hi, lo) > 0;
  }

  // ---- housekeeping ----

  #cleanCaches(): void {
    if (this.#closed) return;
    this.l2Cache.dropIdle(this.#lastCleanClock[0]!);
    this.refcounts.cache.dropIdle(this.#lastCleanClock[1]!);
    this.#lastCleanClock = [this.l2Cache.clock, this.refcounts.cache.clock];
  }

  /** Make completed writes durable unless opened with cache=unsafe (snapshot and repair code). */
  barrier(): void {
    this.#barrier();
  }

  /** Replace the in-memory snapshot table after the header was switched to a new one. */
  setSnapshots(table: SnapshotTable): void {
    this.#snapshots = table;
  }

  /** Run `fn` with the node's metadata lock held (snapshot operations). */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    this.#live();
    this.#writable();
    if (this.#readOnly) {
      return Promise.reject(
        new BlockError("read-only", "Image is read-only", { path: this.filename }),
      );
    }
    return this.#mutex.run(fn);
  }

  /** Replace the in-memory active L1 table (its contents are already on disk). */
  replaceL1(l1: Uint8Array): void {
    this.#l1 = l1;
    this.#l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  }

  /** Write the header as it is now (used by repair). */
  writeHeader(): void {
    this.#writeHeader();
    this.#barrier();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    try {
      if (!this.#readOnly && !this.#corrupt) {
        // Bitmaps are stored first, as QEMU's qcow2_inactivate does.
        const bitmaps = this.#bitmaps;
        if (bitmaps !== undefined) await this.#mutex.run(() => Promise.resolve(bitmaps.store()));
        await this.#mutex.run(() => Promise.resolve(this.#flushAll(true)));
        if (this.#dirtyMarked) {
          this.header.incompatibleFeatures &= ~BigInt(INCOMPAT_DIRTY);
          this.#writeHeader();
          this.#barrier();
        }
      }
    } finally {
      this.#closed = true;
      if (this.#cleanTimer !== undefined) clearInterval(this.#cleanTimer);
      this.file.close();
      await this.#backing?.close();
    }
  }
}
