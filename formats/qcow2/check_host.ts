/**
 * The check's vocabulary: what it needs from the image it checks (`CheckHost`, which a `Qcow2Node`
 * is), what it may repair (`CheckFix`, qemu-img check's `-r leaks` / `-r all`) and what it answers
 * (`CheckReport`, qemu-img check's fields and lines).
 *
 * @module
 */
import type { HostFile } from "../../src/host/host_file.ts";
import type { TableCache } from "./cache.ts";
import type { Qcow2Header } from "./header.ts";
import type { Refcounts } from "./refcount.ts";
import type { SnapshotTable } from "./snapshot.ts";

/**
 * What the check needs from the image it checks and repairs: its structures as the open node holds
 * them, and the node's own ways to write them. A `Qcow2Node` is one; the node runs the check itself
 * when it opens a dirty image, so the check names this shape instead of the node's class.
 */
export interface CheckHost {
  /** The image file the check reads and repairs. */
  readonly file: HostFile;
  /** Named in the report lines. */
  readonly filename: string;
  /**
   * The parsed header.
   *
   * @internal
   */
  readonly header: Qcow2Header;
  /** Cluster size in bytes. */
  readonly clusterSize: number;
  /** log2 of the cluster size. */
  readonly clusterBits: number;
  /** True with extended L2 entries. */
  readonly extendedL2: boolean;
  /** True when opened read-only (repairs need a writable image). */
  readonly readOnly: boolean;
  /** Guest size of the image. */
  readonly size: number;
  /**
   * The active L1 table as cached in memory.
   *
   * @internal
   */
  readonly l1Table: Uint8Array;
  /**
   * The L2 table cache.
   *
   * @internal
   */
  readonly l2Cache: TableCache;
  /**
   * The refcount structure as loaded.
   *
   * @internal
   */
  readonly refcounts: Refcounts;
  /** The internal snapshots (their L1 tables are counted too). */
  readonly snapshots: SnapshotTable;
  /**
   * Adopt a snapshot table the check rewrote or dropped.
   *
   * @internal
   */
  setSnapshots(table: SnapshotTable): void;
  /**
   * Read the refcount structure again after the check rebuilt it.
   *
   * @internal
   */
  reloadRefcounts(): void;
  /**
   * Write the header (with its extensions) as it is now, and make it durable.
   *
   * @internal
   */
  writeHeader(): void;
  /**
   * Write cached tables and apply deferred frees.
   *
   * @internal
   */
  flushMetadata(): void;
  /**
   * Make what was written durable (fdatasync unless cache=unsafe).
   *
   * @internal
   */
  barrier(): void;
}

/** What to repair (qemu-img check -r leaks / -r all). */
export interface CheckFix {
  /** Free leaked clusters (`-r leaks`). */
  leaks?: boolean;
  /** Also fix refcount and COPIED-flag errors (`-r all`, with `leaks`). */
  errors?: boolean;
}

/** What a check found, with qemu-img check's fields. */
export interface CheckReport {
  /** Errors found that are corruptions (refcount too low, bad tables), before fixing. */
  corruptions: number;
  /** Leaked clusters found (refcount above the references), before fixing. */
  leaks: number;
  /** Errors that stopped part of the check (e.g. unreadable tables). */
  checkErrors: number;
  /** Corruptions the repair fixed. */
  corruptionsFixed: number;
  /** Leaks the repair freed. */
  leaksFixed: number;
  /** Guest clusters of the virtual disk. */
  totalClusters: number;
  /** Guest clusters the active L1 maps to host clusters (normal, preallocated zero, compressed). */
  allocatedClusters: number;
  /** Allocated guest clusters not host-contiguous with the previous one. */
  fragmentedClusters: number;
  /** Allocated guest clusters stored compressed. */
  compressedClusters: number;
  /** One past the highest cluster in use or counted. */
  imageEndOffset: number;
  /** Lines qemu-img prints to stderr while checking ("ERROR …", "Leaked cluster …", "Repairing …"). */
  messages: string[];
  /** The check itself failed (qemu-img: "Check failed: …"); the counts are incomplete. */
  failed?: string;
  /**
   * Indexes of `messages` qemu-img prints through error_report, after its program name
   * ("qemu-img: ERROR failed to read the snapshot table: …"); the others it prints bare.
   */
  reported?: number[];
}

/** An empty report for `node`: nothing found yet, its guest clusters counted. */
export function newReport(node: CheckHost): CheckReport {
  return {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    totalClusters: Math.ceil(node.size / node.clusterSize),
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    imageEndOffset: 0,
    messages: [],
  };
}
