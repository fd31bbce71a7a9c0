/**
 * Allocating writes of a qcow2 image (QEMU's qcow2_alloc_host_offset with handle_copied,
 * handle_alloc and perform_cow): owned L2 tables (a new one, or a copy of one a snapshot shares),
 * writes in place into clusters this image alone owns (subcluster and zero state updated), new
 * contiguous clusters with copy-on-write of the unwritten head and tail, and compressed writes of
 * whole clusters. Order: refcount, data, L2 entry, then the frees of what the entry pointed at.
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import type { CacheEntry } from "./cache.ts";
import { compressCluster } from "./compress.ts";
import {
  allocateBytes,
  allocateClusters,
  freeLater,
  markDirty,
  releaseEntry,
  writeL2Tables,
} from "./flush.ts";
import { checkOverlap, signalCorruption } from "./integrity.ts";
import {
  invalidEntry,
  kindAt,
  l1Copied,
  l2Table,
  lookupSlot,
  mapRun,
  type Slot,
} from "./mapping.ts";
import { readAt } from "./read.ts";
import { barrier, type Qcow2State } from "./state.ts";
import {
  classifyStandard,
  encodeCompressed,
  encodeEntry,
  entryOffset,
  HI_COMPRESSED,
  HI_COPIED,
} from "./tables.ts";

/** Compressed-write tasks QEMU keeps in flight (QCOW2_MAX_WORKERS). */
const COMPRESSED_WORKERS = 8;

/** The L2 slot of the cluster at `guestOffset` in a table this image owns (COPIED), made so. */
export function slotForWrite(s: Qcow2State, guestOffset: number): Slot {
  const clusterIndex = Math.floor(guestOffset / s.clusterSize);
  const l1Index = Math.floor(clusterIndex / s.l2Entries);
  const at = (clusterIndex % s.l2Entries) * s.entryBytes;
  let table = l2Table(s, l1Index);
  if (table === undefined || !l1Copied(s, l1Index)) table = allocateL2(s, l1Index, table);
  return { table, at };
}

/**
 * Give L1 entry `l1Index` an L2 table this image owns: a new zeroed one, or a copy of a shared
 * one (snapshot). Ordering: refcount, then the table on disk, then the L1 entry.
 */
function allocateL2(s: Qcow2State, l1Index: number, shared: CacheEntry | undefined): CacheEntry {
  if (l1Index >= s.header.l1Size) {
    throw new BlockError("out-of-range", `L1 index ${l1Index} is past the L1 table`, {
      path: s.filename,
    });
  }
  markDirty(s);
  const offset = allocateClusters(s, 1);
  if (offset === 0) {
    throw signalCorruption(s, "Preventing invalid allocation of L2 table at offset 0", -1);
  }
  checkOverlap(s, offset, s.clusterSize, true);
  const table = s.l2Cache.create(offset, shared?.data);
  if (shared) {
    // Entries of a copied table are owned by the snapshot too: none is COPIED any more.
    for (let at = 0; at < s.clusterSize; at += s.entryBytes) {
      const hi = table.view.getUint32(at);
      if (hi & HI_COPIED) table.view.setUint32(at, (hi & ~HI_COPIED) >>> 0);
    }
  }
  // As QEMU's l2_allocate: the new table's refcount reaches the disk first, lazy or not.
  s.refcounts.flush();
  barrier(s);
  writeL2Tables(s, [table]);
  barrier(s);
  const [hi, lo] = encodeEntry(offset, true, false);
  s.l1View.setUint32(l1Index * 8, hi);
  s.l1View.setUint32(l1Index * 8 + 4, lo);
  s.file.writeAt(
    s.header.l1TableOffset + l1Index * 8,
    s.l1.subarray(l1Index * 8, l1Index * 8 + 8),
  );
  if (shared) freeLater(s, shared.offset / s.clusterSize, 1, false);
  return table;
}

/** True when the cluster holding `guestOffset` has the COPIED flag (refcount 1, writable in place). */
export function ownedAt(s: Qcow2State, guestOffset: number): boolean {
  const slot = lookupSlot(s, guestOffset);
  if (slot === undefined) return false;
  // Both the L2 table and the cluster must be this image's alone.
  const l1Index = Math.floor(guestOffset / s.clusterSize / s.l2Entries);
  return (slot.table.view.getUint32(slot.at) & HI_COPIED) !== 0 && l1Copied(s, l1Index);
}

/** A write that allocates or changes metadata, one cluster run at a time. */
export async function writeSlow(s: Qcow2State, offset: number, src: Uint8Array): Promise<void> {
  if (s.extendedL2) checkEntriesForWrite(s, offset, src.length);
  let pos = 0;
  while (pos < src.length) {
    pos += await writeClusters(s, offset + pos, src.subarray(pos));
  }
}

/**
 * Before an allocating or metadata-changing write, every extended L2 entry it touches must be
 * consistent (QEMU's calculate_l2_meta): nothing is written when one is not.
 */
function checkEntriesForWrite(s: Qcow2State, offset: number, length: number): void {
  const cs = s.clusterSize;
  const last = Math.floor((offset + length - 1) / cs);
  for (let c = Math.floor(offset / cs); c <= last; c++) {
    const slot = lookupSlot(s, c * cs);
    if (slot === undefined) {
      c = (Math.floor(c / s.l2Entries) + 1) * s.l2Entries - 1; // no table: next one
      continue;
    }
    if (kindAt(s, slot.table, slot.at, 0) === "invalid") {
      throw invalidEntry(s, slot.table, slot.at / s.entryBytes, "write");
    }
  }
}

/** Units (subclusters) of cluster-relative range [from, to) as a bitmask. */
export function unitMask(s: Qcow2State, from: number, to: number): number {
  if (!s.extendedL2) return 0;
  const first = Math.floor(from / s.subclusterSize),
    last = Math.floor((to - 1) / s.subclusterSize);
  let mask = 0;
  for (let sc = first; sc <= last; sc++) mask |= 1 << sc;
  return mask >>> 0;
}

/** True when the guest range reads as zeroes without reading data (zero clusters, or holes without backing). */
function knownZero(s: Qcow2State, guestOffset: number, length: number): boolean {
  let pos = 0;
  while (pos < length) {
    const run = mapRun(s, guestOffset + pos, length - pos);
    const zero = run.kind === "zero-plain" || run.kind === "zero-alloc" ||
      ((run.kind === "unallocated" || run.kind === "unallocated-alloc") &&
        (s.backing === undefined || guestOffset + pos >= s.backing.size));
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
async function writeClusters(s: Qcow2State, guestOffset: number, src: Uint8Array): Promise<number> {
  const cs = s.clusterSize;
  const first = Math.floor(guestOffset / cs);
  // Owned cluster: write in place.
  if (ownsHostCluster(s, first)) return await writeInPlace(s, guestOffset, src);
  // How many clusters (within this L2 table) this write covers that need new host clusters.
  const tableFirst = Math.floor(first / s.l2Entries) * s.l2Entries;
  const end = guestOffset + src.length;
  let last = Math.floor((end - 1) / cs);
  last = Math.min(last, tableFirst + s.l2Entries - 1);
  for (let c = first + 1; c <= last; c++) {
    if (ownsHostCluster(s, c)) {
      last = c - 1;
      break;
    }
  }
  const count = last - first + 1;
  const writeEnd = Math.min(end, (last + 1) * cs);
  const consumed = writeEnd - guestOffset;

  // What the first and last clusters hold now decides how much to copy.
  const old = (c: number) => oldState(s, c);
  const head = old(first);
  const tail = count === 1 ? head : old(last);
  const unit = s.subclusterSize;
  // Extended L2 with no data in the cluster: copy only within the touched subclusters.
  const headStart = head.hasData || !s.extendedL2
    ? first * cs
    : Math.floor(guestOffset / unit) * unit;
  // Past the disk (the VM state area) a new cluster is filled whole, as QEMU fills it.
  const tailEndLimit = guestOffset >= s.size ? (last + 1) * cs : Math.min((last + 1) * cs, s.size);
  const tailEnd = tail.hasData || !s.extendedL2
    ? tailEndLimit
    : Math.min(Math.ceil(writeEnd / unit) * unit, tailEndLimit);
  const headLen = guestOffset - headStart;
  const tailLen = Math.max(0, tailEnd - writeEnd);
  // Read what the unwritten parts show now (backing, zeroes, shared or compressed data).
  const headZero = headLen === 0 || knownZero(s, headStart, headLen);
  const tailZero = tailLen === 0 || knownZero(s, writeEnd, tailLen);
  const headBytes = headZero ? undefined : new Uint8Array(headLen);
  if (headBytes) await readAt(s, headStart, headBytes);
  const tailBytes = tailZero ? undefined : new Uint8Array(tailLen);
  if (tailBytes) await readAt(s, writeEnd, tailBytes);

  // From here on nothing awaits: allocation, data and L2 update happen together.
  markDirty(s);
  // The L2 table first (as QEMU), so a new table sits before the data it maps.
  slotForWrite(s, first * cs);
  const fileEnd = s.file.size();
  const host = allocateClusters(s, count);
  checkOverlap(s, host, count * cs);
  // Past the end of the file the new clusters read as zeroes already: zero COW is not written.
  const fresh = host >= fileEnd;
  const writeHead = headLen > 0 && !(fresh && headZero);
  const writeTail = tailLen > 0 && !(fresh && tailZero);
  const hostData = host + (guestOffset - first * cs);
  const data = src.subarray(0, consumed);
  if ((headLen > 0 && !writeHead) || (tailLen > 0 && !writeTail)) {
    // As QEMU's handle_alloc_space: new clusters whose copied parts would be zeroes are
    // allocated on the host (no holes inside them), then only the data is written. It zeroes
    // the copy-on-write span: whole clusters, or with extended L2 just the touched subclusters
    // (so a fresh file ends where they end, as QEMU's does).
    if (s.extendedL2) {
      s.file.preallocate(host + (headStart - first * cs), tailEnd - headStart);
    } else {
      s.file.preallocate(host, count * cs);
    }
  }
  if (!writeHead && !writeTail) {
    s.file.writeAt(hostData, data);
  } else {
    // One host write: COW head, data, COW tail.
    const from = writeHead ? headLen : 0, to = writeTail ? tailLen : 0;
    const merged = new Uint8Array(from + consumed + to);
    if (headBytes && writeHead) merged.set(headBytes);
    merged.set(data, from);
    if (tailBytes && writeTail) merged.set(tailBytes, from + consumed);
    s.file.writeAt(hostData - from, merged);
  }

  // L2 entries, then frees of what they pointed at.
  for (let c = first; c <= last; c++) {
    const slot = slotForWrite(s, c * cs);
    const view = slot.table.view;
    const oldHi = view.getUint32(slot.at), oldLo = view.getUint32(slot.at + 4);
    const [hi, lo] = encodeEntry(host + (c - first) * cs, true, false);
    if (s.extendedL2) {
      const from = Math.max(guestOffset, c * cs) - c * cs;
      const to = Math.min(writeEnd, (c + 1) * cs) - c * cs;
      const touched = unitMask(s, from, to);
      const state = c === first ? head : c === last ? tail : old(c);
      const alloc = state.compressed ? 0xffffffff : (state.alloc | touched) >>> 0;
      const zero = state.compressed ? 0 : (state.zero & ~touched) >>> 0;
      view.setUint32(slot.at + 8, zero);
      view.setUint32(slot.at + 12, alloc);
    }
    view.setUint32(slot.at, hi);
    view.setUint32(slot.at + 4, lo);
    slot.table.dirty = true;
    releaseEntry(s, oldHi, oldLo, false);
  }
  return consumed;
}

/** True when guest cluster `c` has a host cluster this image alone owns (writable in place). */
function ownsHostCluster(s: Qcow2State, c: number): boolean {
  const slot = lookupSlot(s, c * s.clusterSize);
  if (slot === undefined || !l1Copied(s, Math.floor(c / s.l2Entries))) return false;
  const hi = slot.table.view.getUint32(slot.at), lo = slot.table.view.getUint32(slot.at + 4);
  return (hi & HI_COPIED) !== 0 && (hi & HI_COMPRESSED) === 0 && entryOffset(hi, lo) > 0;
}

/** What cluster `c` holds before an allocating write replaces it. */
function oldState(
  s: Qcow2State,
  c: number,
): { hasData: boolean; compressed: boolean; alloc: number; zero: number } {
  const slot = lookupSlot(s, c * s.clusterSize);
  if (slot === undefined) return { hasData: false, compressed: false, alloc: 0, zero: 0 };
  const view = slot.table.view;
  const hi = view.getUint32(slot.at), lo = view.getUint32(slot.at + 4);
  if (hi & HI_COMPRESSED) return { hasData: true, compressed: true, alloc: 0, zero: 0 };
  const hasHost = entryOffset(hi, lo) > 0;
  if (!s.extendedL2) {
    const kind = classifyStandard(hi, lo, s.v3);
    return {
      hasData: kind === "normal" || (kind === "unallocated" && s.backing !== undefined),
      compressed: false,
      alloc: 0,
      zero: 0,
    };
  }
  const alloc = hasHost ? view.getUint32(slot.at + 12) : 0;
  const zero = view.getUint32(slot.at + 8);
  return { hasData: hasHost && alloc !== 0, compressed: false, alloc, zero };
}

/** Write into an owned cluster: data in place, copying partial subclusters, updating zero/alloc state. */
async function writeInPlace(s: Qcow2State, guestOffset: number, src: Uint8Array): Promise<number> {
  const cs = s.clusterSize;
  const c = Math.floor(guestOffset / cs);
  const within = guestOffset % cs;
  const consumed = Math.min(src.length, cs - within);
  const slot = lookupSlot(s, guestOffset)!;
  const view = slot.table.view;
  const hi = view.getUint32(slot.at), lo = view.getUint32(slot.at + 4);
  const host = entryOffset(hi, lo);
  const unit = s.subclusterSize;
  let start = within, end = within + consumed;
  let needsUpdate: boolean;
  if (s.extendedL2) {
    const touched = unitMask(s, within, end);
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
      end = Math.min((lastSc + 1) * unit, cs, s.size - c * cs);
    }
  } else {
    // A zero-alloc cluster: the rest of the cluster becomes explicit zeroes.
    needsUpdate = classifyStandard(hi, lo, s.v3) === "zero-alloc";
    if (needsUpdate) {
      start = 0;
      end = Math.min(cs, s.size - c * cs);
    }
  }
  const buf = start === within && end === within + consumed
    ? src.subarray(0, consumed)
    : new Uint8Array(end - start);
  if (buf.length !== consumed) {
    if (start < within) await readAt(s, c * cs + start, buf.subarray(0, within - start));
    buf.set(src.subarray(0, consumed), within - start);
    if (end > within + consumed) {
      await readAt(s, c * cs + within + consumed, buf.subarray(within + consumed - start));
    }
  }
  checkOverlap(s, host + start, buf.length);
  s.file.writeAt(host + start, buf);
  if (needsUpdate) {
    // Re-read the entry: it cannot have changed (we hold the mutex), but the table may have been evicted.
    const e = lookupSlot(s, guestOffset)!;
    if (s.extendedL2) {
      const touched = unitMask(s, start, end);
      e.table.view.setUint32(e.at + 12, (e.table.view.getUint32(e.at + 12) | touched) >>> 0);
      e.table.view.setUint32(e.at + 8, (e.table.view.getUint32(e.at + 8) & ~touched) >>> 0);
    } else {
      e.table.view.setUint32(e.at + 4, (e.table.view.getUint32(e.at + 4) & ~1) >>> 0);
    }
    e.table.dirty = true;
  }
  return consumed;
}

/** Compressed write: whole clusters into unallocated clusters only. */
export async function writeCompressed(
  s: Qcow2State,
  offset: number,
  src: Uint8Array,
  precompressed?: ReadonlyArray<Uint8Array | null | undefined>,
): Promise<void> {
  const cs = s.clusterSize;
  if (offset % cs !== 0 || (src.length % cs !== 0 && offset + src.length !== s.size)) {
    throw new BlockError("invalid-argument", "Compressed writes must cover whole clusters", {
      path: s.filename,
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
      ? compressCluster(s.header.compressionType, data)
      : given === null || given.length >= cs
      ? undefined
      : given;
    if (packed === undefined) {
      await writeSlow(s, guest, data.subarray(0, Math.min(cs, s.size - guest)));
      continue;
    }
    // Only a cluster without a host cluster (unallocated or zero-flagged) takes compressed data.
    const slot = lookupSlot(s, guest);
    if (slot !== undefined) {
      const hi = slot.table.view.getUint32(slot.at), lo = slot.table.view.getUint32(slot.at + 4);
      if ((hi & HI_COMPRESSED) !== 0 || entryOffset(hi, lo) !== 0) {
        firstError ??= new BlockError(
          "io",
          "Compressed writes are only possible to unallocated clusters",
          { path: s.filename, offset: guest },
        );
        failedAt = Math.min(failedAt, index);
        continue;
      }
    }
    markDirty(s);
    const e = slotForWrite(s, guest);
    const host = allocateBytes(s, packed.length);
    // Compressed data may run on into the next host cluster: check every cluster it touches.
    const firstHost = Math.floor(host / cs) * cs;
    checkOverlap(s, firstHost, Math.ceil((host + packed.length) / cs) * cs - firstHost);
    s.file.writeAt(host, packed);
    const [hi, lo] = encodeCompressed(host, packed.length, s.clusterBits);
    e.table.view.setUint32(e.at, hi);
    e.table.view.setUint32(e.at + 4, lo);
    if (s.extendedL2) {
      // A compressed entry has no subcluster bitmap.
      e.table.view.setUint32(e.at + 8, 0);
      e.table.view.setUint32(e.at + 12, 0);
    }
    e.table.dirty = true;
  }
  if (firstError !== undefined) throw firstError;
}
