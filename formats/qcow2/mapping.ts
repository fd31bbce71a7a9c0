/**
 * Where a guest range lives in a qcow2 image (QEMU's qcow2_get_host_offset): the L1 entry, the L2
 * table through the cache, the entry's classification (cluster or subcluster), and runs of guest
 * bytes with one mapping, contiguous on the host for data. Entries that cannot be right are
 * reported as corruption here, before anything reads or writes through them.
 *
 * @module
 */
import type { BlockError } from "../../src/errors.ts";
import type { Extent, ExtentKind } from "../../src/block/node.ts";
import type { CacheEntry } from "./cache.ts";
import { hexAlt, signalCorruption } from "./integrity.ts";
import type { Qcow2State } from "./state.ts";
import {
  classifyStandard,
  classifySubcluster,
  type ClusterKind,
  entryOffset,
  HI_COPIED,
  l1Reserved,
} from "./tables.ts";

/** One run of guest bytes with the same mapping. */
export interface Run {
  kind: ClusterKind;
  /** Host offset of the run's first byte (normal/zero-alloc), else 0. */
  hostOffset: number;
  length: number;
}

/** A cluster slot: which L2 table entry holds a guest cluster. */
export interface Slot {
  table: CacheEntry;
  /** Byte offset of the entry in the table. */
  at: number;
}

/** The L2 table offset in L1 entry `index` (0 when there is none). */
export function l1Entry(s: Qcow2State, index: number): number {
  if (index >= s.header.l1Size) return 0;
  const hi = s.l1View.getUint32(index * 8), lo = s.l1View.getUint32(index * 8 + 4);
  if (hi === 0 && lo === 0) return 0;
  if (l1Reserved(hi, lo)) {
    throw signalCorruption(
      s,
      `L1 entry ${index} has reserved bits set`,
      s.header.l1TableOffset + index * 8,
    );
  }
  return entryOffset(hi, lo);
}

/** Whether L1 entry `index` has the COPIED flag (its L2 table is this image's alone). */
export function l1Copied(s: Qcow2State, index: number): boolean {
  return (s.l1View.getUint32(index * 8) & HI_COPIED) !== 0;
}

/** The L2 table of L1 entry `index`, or undefined when there is none. */
export function l2Table(s: Qcow2State, index: number): CacheEntry | undefined {
  const offset = l1Entry(s, index);
  if (offset === 0) return undefined;
  if (offset < 0 || offset % s.clusterSize !== 0 || offset < s.clusterSize) {
    throw signalCorruption(
      s,
      `L2 table offset 0x${offset.toString(16)} unaligned or in the header (L1 index 0x${
        index.toString(16)
      })`,
      offset,
    );
  }
  return s.l2Cache.get(offset);
}

/** The L2 slot of the cluster at `guestOffset`, or undefined when its L1 entry has no table. */
export function lookupSlot(s: Qcow2State, guestOffset: number): Slot | undefined {
  const clusterIndex = Math.floor(guestOffset / s.clusterSize);
  const l1Index = Math.floor(clusterIndex / s.l2Entries);
  const at = (clusterIndex % s.l2Entries) * s.entryBytes;
  const table = l2Table(s, l1Index);
  return table === undefined ? undefined : { table, at };
}

/** Classify one unit (cluster, or subcluster with extended L2) of an L2 table entry. */
export function kindAt(
  s: Qcow2State,
  table: CacheEntry,
  at: number,
  subcluster: number,
): ClusterKind {
  const hi = table.view.getUint32(at), lo = table.view.getUint32(at + 4);
  if (s.extendedL2) {
    return classifySubcluster(
      hi,
      lo,
      table.view.getUint32(at + 12),
      table.view.getUint32(at + 8),
      subcluster,
    );
  }
  return classifyStandard(hi, lo, s.v3);
}

/**
 * The run of guest bytes from `guestOffset` (at most `max`) with one mapping, within one L2
 * table. Normal runs are contiguous on the host.
 */
export function mapRun(
  s: Qcow2State,
  guestOffset: number,
  max: number,
  path: "read" | "write" = "read",
): Run {
  const cs = s.clusterSize;
  const clusterIndex = Math.floor(guestOffset / cs);
  const l1Index = Math.floor(clusterIndex / s.l2Entries);
  let l2Index = clusterIndex % s.l2Entries;
  const tableEnd = (l1Index + 1) * s.l2Entries * cs - guestOffset;
  const limit = Math.min(max, tableEnd);
  const table = l2Table(s, l1Index);
  if (table === undefined) return { kind: "unallocated", hostOffset: 0, length: limit };
  const unit = s.subclusterSize;
  let within = guestOffset % cs;
  let sc = Math.floor(within / unit);
  let at = l2Index * s.entryBytes;
  const kind = kindAt(s, table, at, sc);
  if (kind === "invalid") throw invalidEntry(s, table, l2Index, path);
  const hi0 = table.view.getUint32(at), lo0 = table.view.getUint32(at + 4);
  let hostOffset = 0;
  if (kind === "normal" || kind === "zero-alloc" || kind === "unallocated-alloc") {
    const clusterHost = entryOffset(hi0, lo0);
    checkDataCluster(s, clusterHost, table, l2Index);
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
      at += s.entryBytes;
    }
    sc = Math.floor(within / unit);
    const k = kindAt(s, table, at, sc);
    if (k !== kind) break;
    if (kind === "normal" || kind === "zero-alloc" || kind === "unallocated-alloc") {
      const hi = table.view.getUint32(at), lo = table.view.getUint32(at + 4);
      const host = entryOffset(hi, lo) + within;
      if (host !== expectHost) break;
      if (within === 0) checkDataCluster(s, host, table, l2Index);
    }
    const step = Math.min(limit - length, unit);
    length += step;
    expectHost += step;
    within += step;
  }
  return { kind, hostOffset, length };
}

function checkDataCluster(s: Qcow2State, host: number, table: CacheEntry, l2Index: number): void {
  if (host < 0 || host % s.clusterSize !== 0) {
    throw signalCorruption(
      s,
      `Cluster allocation offset ${hexAlt(Math.max(0, host))} unaligned (L2 offset: ${
        hexAlt(table.offset)
      }, L2 index: ${hexAlt(l2Index)})`,
      table.offset + l2Index * s.entryBytes,
    );
  }
}

/**
 * The corruption QEMU reports for an invalid L2 entry: a zero flag in a v2 image, or an
 * inconsistent subcluster bitmap. Its read and write paths word the message differently.
 */
export function invalidEntry(
  s: Qcow2State,
  table: CacheEntry,
  l2Index: number,
  path: "read" | "write",
): BlockError {
  const where = `(L2 offset: ${hexAlt(table.offset)}, L2 index: ${hexAlt(l2Index)})`;
  const message = !s.v3 && !s.extendedL2
    ? `Zero cluster entry found in pre-v3 image ${where}`
    : `Invalid cluster entry found ${path === "read" ? " " : ""}${where}`;
  return signalCorruption(s, message, table.offset + l2Index * s.entryBytes);
}

/** What block status reports for each kind of L2 entry. */
const EXTENT_KINDS: Readonly<Record<ClusterKind, ExtentKind>> = {
  "normal": "data",
  "zero-plain": "zero",
  "zero-alloc": "zero",
  "unallocated": "unallocated",
  "unallocated-alloc": "unallocated",
  "compressed": "compressed",
  "invalid": "unallocated",
};

/** The block status extent of a run found at guest offset `offset`. */
export function runExtent(run: Run, offset: number): Extent {
  const kind = EXTENT_KINDS[run.kind];
  // Host offsets are known for unallocated subclusters of an allocated cluster too (QEMU reports them).
  if (run.kind === "normal" || run.kind === "zero-alloc" || run.kind === "unallocated-alloc") {
    return { kind, offset, length: run.length, hostOffset: run.hostOffset };
  }
  return { kind, offset, length: run.length };
}
