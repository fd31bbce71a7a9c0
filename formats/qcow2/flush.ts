/**
 * Update ordering of a qcow2 image, so a crash leaks clusters but never shares or loses them:
 * refcounts reach the disk before the L2 tables that use them, L2 tables before the frees of
 * what they dropped (deferred frees), and lazy refcounts mark the image dirty before their first
 * change. Also the table caches wired to that order, and host allocation, which applies pending
 * frees first so a reused cluster is never referenced by an old table on disk.
 *
 * @module
 */
import { type CacheEntry, TableCache } from "./cache.ts";
import { INCOMPAT_DIRTY } from "./header.ts";
import { checkOverlap, signalCorruption } from "./integrity.ts";
import { Refcounts } from "./refcount.ts";
import { barrier, type Qcow2State, writeHeader } from "./state.ts";
import { compressedClusters, compressedLocation, entryOffset, HI_COMPRESSED } from "./tables.ts";

/** An L2 table cache of `budget` bytes whose write-back keeps the update order. */
export function makeL2Cache(s: Qcow2State, budget: number): TableCache {
  return new TableCache(s.clusterSize, budget, {
    // Past the end of a truncated file a table reads as zeroes, as QEMU reads it.
    load: (offset, dst) => s.file.readAt(offset, dst),
    writeBack: (entries) => writeL2Tables(s, entries),
  });
}

/** The refcount structure as the header points at it, with `s.refcountCacheBytes` of cache. */
export function makeRefcounts(s: Qcow2State): Refcounts {
  return new Refcounts(
    {
      file: s.file,
      path: s.file.path,
      clusterBits: s.header.clusterBits,
      refcountOrder: s.header.refcountOrder,
      barrier: () => barrier(s),
      switchRefcountTable: (offset, clusters) => {
        s.header.refcountTableOffset = offset;
        s.header.refcountTableClusters = clusters;
        writeHeader(s);
      },
      corrupt: (message, offset) => signalCorruption(s, message, offset),
    },
    s.header.refcountTableOffset,
    s.header.refcountTableClusters,
    s.refcountCacheBytes,
  );
}

/** Mark the image dirty (lazy refcounts) before its first metadata change. */
export function markDirty(s: Qcow2State): void {
  if (!s.lazy || s.dirtyMarked) return;
  s.header.incompatibleFeatures |= BigInt(INCOMPAT_DIRTY);
  writeHeader(s);
  barrier(s);
  s.dirtyMarked = true;
}

/** L2 tables reach the disk only after the refcounts (and data) they depend on. */
export function writeL2Tables(s: Qcow2State, entries: CacheEntry[]): void {
  // Lazy refcounts skip only the refcount ordering (repaired on open): data still goes first.
  if (!s.lazy) s.refcounts.flush();
  barrier(s);
  for (const e of entries) {
    checkOverlap(s, e.offset, s.clusterSize, true);
    s.file.writeAt(e.offset, e.data);
    e.dirty = false;
  }
}

/** Write L2 tables, then apply deferred frees: a crash leaks, never shares. */
export function applyFrees(s: Qcow2State): void {
  s.l2Cache.flush();
  if (s.pendingFrees.length === 0) return;
  barrier(s);
  const frees = s.pendingFrees;
  s.pendingFrees = [];
  for (const [cluster, count, punch] of frees) {
    s.refcounts.change(cluster, count, -1);
    for (let c = cluster; c < cluster + count; c++) {
      if (s.refcounts.get(c) === 0) {
        s.l2Cache.discard(c * s.clusterSize);
        if (punch) s.file.punchHole(c * s.clusterSize, s.clusterSize);
      }
    }
  }
}

/**
 * Free clusters once the tables that dropped them are written. `punch` releases the host space
 * too, as QEMU passes discards down for requests, snapshots and shrinking but not for clusters
 * a write or a table copy replaced (its QCOW2_DISCARD_OTHER).
 */
export function freeLater(s: Qcow2State, cluster: number, count: number, punch: boolean): void {
  s.pendingFrees.push([cluster, count, punch]);
  s.compressedCache = undefined;
  // Keep the list bounded: a long run of frees is applied through a flush of the L2 tables.
  if (s.pendingFrees.length > 4096) applyFrees(s);
}

/** Drop what an L2 entry pointed at (after the entry itself changed). */
export function releaseEntry(s: Qcow2State, hi: number, lo: number, punch = true): void {
  if (hi & HI_COMPRESSED) {
    const loc = compressedLocation(hi, lo, s.clusterBits);
    const [firstCluster, lastCluster] = compressedClusters(loc, s.clusterBits);
    freeLater(s, firstCluster, lastCluster - firstCluster + 1, punch);
    return;
  }
  const host = entryOffset(hi, lo);
  if (host > 0) freeLater(s, host / s.clusterSize, 1, punch);
}

/**
 * Allocate host clusters as QEMU does, reusing clusters freed earlier in the session: frees
 * still pending are applied first (their L2 tables reach the disk before the refcounts drop),
 * so a reused cluster is never referenced by an old table on disk.
 */
export function allocateClusters(s: Qcow2State, count: number): number {
  if (s.pendingFrees.length > 0) applyFrees(s);
  return s.refcounts.allocate(count);
}

/** Allocate `size` bytes for compressed data, as {@linkcode allocateClusters}. */
export function allocateBytes(s: Qcow2State, size: number): number {
  if (s.pendingFrees.length > 0) applyFrees(s);
  return s.refcounts.allocateBytes(size);
}

/**
 * Write the cached tables and apply deferred frees. While lazy refcounts have the image marked
 * dirty, refcount blocks stay in memory unless `all` (QEMU's qcow2_need_accurate_refcounts):
 * a crash then leaves refcounts that the next open repairs.
 */
export function flushAll(s: Qcow2State, all = false): void {
  if (s.corrupt) return;
  const refcounts = all || !(s.lazy && s.dirtyMarked);
  if (refcounts) s.refcounts.flush();
  barrier(s);
  applyFrees(s);
  if (refcounts) s.refcounts.flush();
  barrier(s);
}
