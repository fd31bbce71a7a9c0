/**
 * The state one open qcow2 image shares between the files of its driver, as QEMU's
 * `BDRVQcow2State`: geometry, the active L1 table, the table caches, the frees waiting for their
 * L2 tables, and the flags corruption and lazy refcounts set. `Qcow2Node` owns one; the mapping,
 * allocation, zero/discard, flush, integrity, resize and VM state files take it as their first
 * parameter, so the node's private state is shared by name and by nothing else. Also the two
 * primitive writes every piece orders itself by: the header and the barrier.
 *
 * @module
 */
import type { BlockNode } from "../../src/block/node.ts";
import type { HostFile } from "../../src/host/host_file.ts";
import type { TableCache } from "./cache.ts";
import {
  COMPAT_LAZY_REFCOUNTS,
  hasFeature,
  INCOMPAT_EXTL2,
  type Qcow2Header,
  serializeHeader,
} from "./header.ts";
import type { Refcounts } from "./refcount.ts";
import type { SnapshotTable } from "./snapshot.ts";
import { SUBCLUSTERS } from "./tables.ts";

/** How a node sets up its state (the rest comes from the header). */
export interface Qcow2StateInit {
  readOnly: boolean;
  /** cache=unsafe: barriers are skipped. */
  unsafe: boolean;
  backing: BlockNode | undefined;
  onCorruption: (line: string) => void;
}

/** One open image's driver state; fields are read and written by the driver's files directly. */
export class Qcow2State {
  readonly file: HostFile;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly extendedL2: boolean;
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  readonly entryBytes: number;
  /** Entries per L2 table. */
  readonly l2Entries: number;
  /** The unit of allocation state: a subcluster with extended L2, else a cluster. */
  readonly subclusterSize: number;
  readonly v3: boolean;
  readonly unsafe: boolean;
  readonly onCorruption: (line: string) => void;
  backing: BlockNode | undefined;
  lazy: boolean;
  readOnly: boolean;
  corrupt = false;
  /** A corruption was signalled (QEMU's signaled_corruption): later notices are suppressed. */
  signaled = false;
  /** Fatal corruption was found on a writable node: it is unusable from then on. */
  unusable = false;
  /** The active L1 table (or a snapshot's, loaded for reading), as in memory. */
  l1: Uint8Array;
  l1View: DataView;
  /** Set by the node right after construction (flush.ts's makeL2Cache). */
  l2Cache!: TableCache;
  /** Set by the node right after construction (flush.ts's makeRefcounts). */
  refcounts!: Refcounts;
  refcountCacheBytes = 0;
  /** QEMU's pass-discard-request: a guest discard also frees the host file's space. */
  passDiscardRequest = true;
  snapshots: SnapshotTable = { entries: [], bytes: 0 };
  /** Frees waiting for their L2 tables to reach the disk: cluster, count, punch a hole. */
  pendingFrees: Array<[number, number, boolean]> = [];
  /** The header's dirty bit was set by this node (lazy refcounts). */
  dirtyMarked = false;
  /** The last decompressed cluster, by host descriptor (sequential reads of compressed data). */
  compressedCache: { key: string; data: Uint8Array } | undefined = undefined;

  /** Geometry from the header; the active L1 table is read from the file. */
  constructor(file: HostFile, header: Qcow2Header, init: Qcow2StateInit) {
    this.file = file;
    this.header = header;
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.extendedL2 = hasFeature(header.incompatibleFeatures, INCOMPAT_EXTL2);
    this.entryBytes = this.extendedL2 ? 16 : 8;
    this.l2Entries = this.clusterSize / this.entryBytes;
    this.subclusterSize = this.extendedL2 ? this.clusterSize / SUBCLUSTERS : this.clusterSize;
    this.v3 = header.version === 3;
    this.unsafe = init.unsafe;
    this.lazy = hasFeature(header.compatibleFeatures, COMPAT_LAZY_REFCOUNTS);
    this.readOnly = init.readOnly;
    this.backing = init.backing;
    this.onCorruption = init.onCorruption;
    this.l1 = new Uint8Array(header.l1Size * 8);
    file.readAt(header.l1TableOffset, this.l1);
    this.l1View = new DataView(this.l1.buffer);
  }

  /** The image's guest size. */
  get size(): number {
    return this.header.size;
  }

  /** Path of the image file, for messages. */
  get filename(): string {
    return this.file.path;
  }
}

/** Make completed writes durable unless opened with cache=unsafe. */
export function barrier(s: Qcow2State): void {
  if (!s.unsafe) s.file.flush();
}

/** Write the header (with its extensions) as it is in memory. */
export function writeHeader(s: Qcow2State): void {
  const bytes = serializeHeader(s.header, s.filename);
  s.file.writeAt(0, bytes);
}

/** Point the state at another L1 table (its bytes are already on disk, or only read). */
export function setL1(s: Qcow2State, l1: Uint8Array): void {
  s.l1 = l1;
  s.l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
}
