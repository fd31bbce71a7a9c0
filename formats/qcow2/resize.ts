/**
 * Resizing and preallocating a qcow2 image, as QEMU's qcow2_co_truncate and preallocate_co: the
 * checks made before the size changes, growing (in the header, or by moving the L1 table to a
 * larger copy), shrinking (clusters and L2 tables past the new end dropped, the file trimmed),
 * and preallocation of L2 tables and data clusters (metadata, falloc, full), with growth by
 * falloc/full laid out as QEMU lays it out.
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import type { TruncateOptions } from "../../src/block/node.ts";
import { slotForWrite } from "./allocation.ts";
import { allocateClusters, applyFrees, flushAll, markDirty, releaseEntry } from "./flush.ts";
import { MAX_L1_BYTES } from "./header.ts";
import { checkOverlap } from "./integrity.ts";
import type { CacheEntry } from "./cache.ts";
import { l1Entry, lookupSlot } from "./mapping.ts";
import { readAt } from "./read.ts";
import { barrier, type Qcow2State, setL1, writeHeader } from "./state.ts";
import { encodeEntry, entryOffset, HI_COMPRESSED } from "./tables.ts";

/**
 * What the image refuses before any resize: a size that is not whole sectors, and any new size
 * for a v2 image with snapshots.
 *
 * @throws {BlockError} `invalid-argument`, `unsupported`
 */
export function checkResizable(s: Qcow2State, size: number): void {
  if (size % 512 !== 0) {
    throw new BlockError("invalid-argument", "The new size must be a multiple of 512", {
      path: s.filename,
    });
  }
  // v2 snapshots carry no size of their own, so the image size cannot change under them.
  if (!s.v3 && s.header.nbSnapshots > 0) {
    throw new BlockError("unsupported", "Can't resize a v2 image which has snapshots", {
      path: s.filename,
      errno: 95,
    });
  }
}

/**
 * Refuse what QEMU refuses before the size changes for a resize to `size` with preallocation
 * `mode`; returns whether the new range must then be zeroed (a backing file longer than the old
 * end would show through it).
 *
 * @throws {BlockError} `unsupported` where the new range cannot be zeroed with flags,
 *   `invalid-argument` for preallocation while shrinking
 */
export function planResize(
  s: Qcow2State,
  size: number,
  mode: NonNullable<TruncateOptions["preallocation"]>,
): boolean {
  const old = s.size;
  // A backing file longer than the old end would show through the new range: it must read
  // as zeroes (QEMU's truncate with BDRV_REQ_ZERO_WRITE). v2 cannot express that with an
  // overlay, so QEMU refuses, before it changes the size.
  const zeroNewRange = size > old && s.backing !== undefined && s.backing.size > old;
  // falloc/full give zeroes from the file itself (QEMU's file-level BDRV_REQ_ZERO_WRITE).
  const hostData = mode === "falloc" || mode === "full";
  // QEMU zeroes [align_up(old, subcluster), size) with flags; what it cannot flag makes the
  // resize fail before the size changes: any such range on v2, or a partial compressed cluster.
  const zeroStart = Math.ceil(old / s.subclusterSize) * s.subclusterSize;
  const flagsNeeded = zeroNewRange && !hostData && zeroStart < size;
  if (
    flagsNeeded &&
    (!s.v3 || (zeroStart % s.clusterSize !== 0 && compressedAt(s, zeroStart)))
  ) {
    throw new BlockError(
      "unsupported",
      "Failed to zero out new clusters: Operation not supported",
      {
        path: s.filename,
        errno: 95,
      },
    );
  }
  if (size < old && mode !== "off") {
    throw new BlockError(
      "invalid-argument",
      "Preallocation can't be used for shrinking an image",
      {
        path: s.filename,
      },
    );
  }
  return zeroNewRange;
}

/** Whether the cluster holding guest offset `guestOffset` is a compressed cluster. */
function compressedAt(s: Qcow2State, guestOffset: number): boolean {
  const slot = lookupSlot(s, guestOffset);
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
export async function preallocateData(
  s: Qcow2State,
  mode: "falloc" | "full",
  oldLength: number,
  newLength: number,
  hideBacking: boolean,
): Promise<void> {
  const cs = s.clusterSize;
  applyFrees(s);
  const fileSize = s.file.size();
  let last = Math.ceil(fileSize / cs) - 1;
  while (last >= 0 && s.refcounts.get(last) === 0) last--;
  const fileClusters = last >= 0 ? last + 1 : Math.ceil(fileSize / cs);
  const firstGuest = Math.floor(oldLength / cs);
  const count = Math.ceil(newLength / cs) - firstGuest;
  const tables = Math.ceil(count / s.l2Entries) + 1;
  const start = s.refcounts.refcountArea(fileClusters, count + tables, true);
  s.refcounts.change(start, count, 1);
  checkOverlap(s, start * cs, count * cs);
  const end = (start + count) * cs;
  const have = s.file.size();
  if (mode === "full") {
    const zeroes = new Uint8Array(Math.min(end - have, 1 << 20));
    for (let at = have; at < end; at += zeroes.length) {
      s.file.writeAt(at, zeroes.subarray(0, Math.min(zeroes.length, end - at)));
    }
  } else if (end > have) {
    s.file.preallocate(have, end - have);
  }
  // The old last cluster's bytes before the old end move into the first new cluster.
  const head = oldLength - firstGuest * cs;
  if (head > 0) {
    const bytes = new Uint8Array(head);
    await readAt(s, firstGuest * cs, bytes);
    s.file.writeAt(start * cs, bytes);
  }
  markDirty(s);
  for (let i = 0; i < count; i++) {
    const slot = slotForWrite(s, (firstGuest + i) * cs);
    const view = slot.table.view;
    const oldHi = view.getUint32(slot.at), oldLo = view.getUint32(slot.at + 4);
    const [hi, lo] = encodeEntry((start + i) * cs, true, false);
    view.setUint32(slot.at, hi);
    view.setUint32(slot.at + 4, lo);
    if (s.extendedL2 && hideBacking) {
      view.setUint32(slot.at + 8, 0);
      view.setUint32(slot.at + 12, 0xffffffff);
    }
    slot.table.dirty = true;
    releaseEntry(s, oldHi, oldLo, false);
  }
  flushAll(s);
}

/** Grow the guest size to `size`: in the header, or with a larger L1 table when needed. */
export function growImage(s: Qcow2State, size: number): void {
  const cs = s.clusterSize;
  const needed = Math.ceil(size / (cs * s.l2Entries));
  if (needed * 8 > MAX_L1_BYTES) {
    throw new BlockError(
      "invalid-argument",
      `Image size ${size} is too large for this cluster size (L1 table limit)`,
      {
        path: s.filename,
      },
    );
  }
  if (needed > s.header.l1Size) {
    growL1(s, needed, size);
  } else {
    s.header.size = size;
    writeHeader(s);
  }
  barrier(s);
}

/**
 * Move the active L1 table to a larger copy of `entries` entries; the header switches to it
 * (and to `size`) in one write, then the old table is freed.
 */
export function growL1(s: Qcow2State, entries: number, size: number): void {
  const cs = s.clusterSize;
  flushAll(s);
  const newL1 = new Uint8Array(entries * 8);
  newL1.set(s.l1);
  const clusters = Math.ceil(newL1.length / cs);
  const offset = allocateClusters(s, clusters);
  s.refcounts.flush();
  barrier(s);
  s.file.writeAt(offset, newL1);
  barrier(s);
  const oldOffset = s.header.l1TableOffset, oldSize = s.header.l1Size;
  s.header.l1TableOffset = offset;
  s.header.l1Size = entries;
  s.header.size = size;
  writeHeader(s);
  barrier(s);
  setL1(s, newL1);
  if (oldSize > 0) s.refcounts.change(oldOffset / cs, Math.ceil(oldSize * 8 / cs), -1);
  s.refcounts.flush();
}

/** Shrink the guest size to `size`, dropping what lies past it and trimming the file. */
export function shrinkImage(s: Qcow2State, size: number): void {
  // Whole clusters past the new end are dropped with whatever they hold (QEMU's full discard);
  // the partial last cluster keeps its bytes, zeroed on a later grow. Snapshots keep their
  // own references (v3 records each snapshot's size; v2 was refused before).
  const cs = s.clusterSize;
  const firstCut = Math.ceil(size / cs);
  // QEMU's discard of the cut range takes the L2 table that maps its start even when it has
  // none yet (and then frees the tables past the new end): the kept one is allocated here too.
  const keepTables = Math.ceil(size / (cs * s.l2Entries));
  if (firstCut * cs < s.size && Math.floor(firstCut / s.l2Entries) < keepTables) {
    slotForWrite(s, firstCut * cs);
  }
  for (let c = firstCut; c * cs < s.size; c++) {
    const slot = lookupSlot(s, c * cs);
    if (slot === undefined) continue;
    const view = slot.table.view;
    const hi = view.getUint32(slot.at), lo = view.getUint32(slot.at + 4);
    const bitmap = s.extendedL2 ? view.getUint32(slot.at + 8) | view.getUint32(slot.at + 12) : 0;
    if (hi !== 0 || lo !== 0 || bitmap !== 0) {
      const e = slotForWrite(s, c * cs);
      e.table.view.setUint32(e.at, 0);
      e.table.view.setUint32(e.at + 4, 0);
      if (s.extendedL2) {
        e.table.view.setUint32(e.at + 8, 0);
        e.table.view.setUint32(e.at + 12, 0);
      }
      e.table.dirty = true;
      releaseEntry(s, hi, lo);
    }
  }
  flushAll(s);
  for (let i = keepTables; i < s.header.l1Size; i++) {
    const offset = l1Entry(s, i);
    if (offset === 0) continue;
    s.l1View.setUint32(i * 8, 0);
    s.l1View.setUint32(i * 8 + 4, 0);
    s.file.writeAt(s.header.l1TableOffset + i * 8, s.l1.subarray(i * 8, i * 8 + 8));
    barrier(s);
    s.l2Cache.discard(offset);
    s.refcounts.change(offset / cs, 1, -1);
  }
  s.header.size = size;
  writeHeader(s);
  s.refcounts.flush();
  barrier(s);
  // Trim the host file after its last cluster in use (QEMU's qcow2_get_last_cluster).
  const fileSize = s.file.size();
  let last = Math.ceil(fileSize / cs) - 1;
  while (last >= 0 && s.refcounts.get(last) === 0) last--;
  if ((last + 1) * cs < fileSize) s.file.truncate((last + 1) * cs);
}

/**
 * Allocate every cluster of the image from guest offset `from` on (QEMU's preallocation): L2
 * tables and data clusters, data reading as zeroes; `falloc` also reserves the host space,
 * `full` writes the zeroes. The caller holds the node's lock.
 */
export function preallocateClusters(
  s: Qcow2State,
  mode: "metadata" | "falloc" | "full",
  from: number,
): void {
  const cs = s.clusterSize;
  const span = cs * s.l2Entries;
  for (
    let tableStart = Math.floor(from / span) * span;
    tableStart < s.size;
    tableStart += span
  ) {
    const first = tableStart / cs;
    const clusters = Math.ceil(Math.min(span, s.size - tableStart) / cs);
    const table = slotForWrite(s, tableStart).table;
    // Clusters of this table (from `from` on) that have no data cluster yet, in runs.
    let c = Math.max(0, Math.floor(from / cs) - first);
    while (c < clusters) {
      if (hasHost(table, c * s.entryBytes)) {
        c++;
        continue;
      }
      let n = 1;
      while (c + n < clusters && !hasHost(table, (c + n) * s.entryBytes)) n++;
      const host = allocateClusters(s, n);
      checkOverlap(s, host, n * cs);
      for (let i = 0; i < n; i++) {
        const at = (c + i) * s.entryBytes;
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
          s.file.writeAt(at, zeroes.subarray(0, Math.min(zeroes.length, end - at)));
        }
      } else if (mode === "falloc") {
        s.file.preallocate(host, n * cs);
      } else if (s.file.size() < end) {
        s.file.truncate(end);
      }
      c += n;
    }
  }
  flushAll(s);
}

function hasHost(table: CacheEntry, at: number): boolean {
  const hi = table.view.getUint32(at), lo = table.view.getUint32(at + 4);
  return (hi & HI_COMPRESSED) !== 0 || entryOffset(hi, lo) > 0;
}
