/**
 * Zero writes and discards of a qcow2 image, as QEMU's qcow2_co_pwrite_zeroes,
 * qcow2_subcluster_zeroize and qcow2_cluster_discard: zero flags on whole clusters and zero bits
 * on subclusters where the format can say "reads as zeroes", zero data where it cannot; discard
 * of whole clusters (reading as zeroes afterwards when a backing file or a host cluster would
 * show otherwise); and emptying the whole active state after a commit. Host clusters dropped go
 * through the deferred frees of flush.ts.
 *
 * @module
 */
import type { BlockNode } from "../../src/block/node.ts";
import { slotForWrite, unitMask, writeSlow } from "./allocation.ts";
import { flushAll, freeLater, releaseEntry } from "./flush.ts";
import { l1Entry, l2Table, lookupSlot, mapRun } from "./mapping.ts";
import type { Qcow2State } from "./state.ts";
import { encodeEntry, entryOffset, HI_COMPRESSED } from "./tables.ts";

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

/**
 * Zero a guest range as QEMU's block layer and qcow2 driver do together: the request is cut at
 * (sub)cluster boundaries; each piece is zeroed with L2 flags where the driver can (an
 * unaligned piece widens to its whole subcluster when the rest of it already reads as zeroes
 * and holds no data), and written as zero data where it cannot. Runs with the node's lock held.
 */
export async function zeroRange(
  s: Qcow2State,
  offset: number,
  length: number,
  unmap: boolean,
): Promise<void> {
  const unit = s.subclusterSize;
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
    if (!(await zeroPiece(s, pos, num, unmap))) {
      // The bounce-buffer fallback: zero data, in bounded pieces.
      const zeroes = new Uint8Array(Math.min(num, 1 << 20));
      for (let at = pos; at < pos + num; at += zeroes.length) {
        await writeSlow(s, at, zeroes.subarray(0, Math.min(zeroes.length, pos + num - at)));
      }
    }
    pos += num;
  }
}

/**
 * QEMU's qcow2_co_pwrite_zeroes for one piece: false (its -ENOTSUP) when flags cannot do it.
 * A piece that is not subcluster-aligned is widened to its subcluster when the rest of that
 * subcluster reads as zeroes through the whole chain and has no data in this layer.
 */
async function zeroPiece(
  s: Qcow2State,
  offset: number,
  bytes: number,
  unmap: boolean,
): Promise<boolean> {
  const unit = s.subclusterSize;
  const head = offset % unit;
  const tail = offset + bytes === s.size ? 0 : (unit - (offset + bytes) % unit) % unit;
  if (head || tail) {
    if (
      !(await readsZero(s, offset - head, head)) ||
      !(await readsZero(s, offset + bytes, tail))
    ) return false;
    offset -= head;
    bytes = Math.min(unit, s.size - offset);
    const kind = mapRun(s, offset, bytes, "write").kind;
    if (kind === "normal" || kind === "compressed") return false;
  }
  return zeroize(s, offset, bytes, unmap);
}

/**
 * QEMU's qcow2_subcluster_zeroize: v2 can only discard (and only without a backing file);
 * v3 sets zero flags on whole clusters and zero bits on the subclusters of partial ones.
 */
function zeroize(s: Qcow2State, offset: number, bytes: number, unmap: boolean): boolean {
  const cs = s.clusterSize;
  const end = Math.min(offset + bytes, s.size);
  if (!s.v3) {
    if (s.backing !== undefined) return false;
    for (let c = Math.floor(offset / cs) * cs; c < end; c += cs) discardCluster(s, c);
    return true;
  }
  const head = Math.min(end, Math.ceil(offset / cs) * cs) - offset;
  const start = offset + head;
  const tail = end >= s.size ? 0 : end - Math.max(start, Math.floor(end / cs) * cs);
  const alignedEnd = end - tail;
  if (head > 0 && !zeroUnits(s, offset, offset + head, false)) return false;
  for (let pos = start; pos < alignedEnd; pos += cs) {
    zeroUnits(s, pos, Math.min(pos + cs, s.size), unmap);
  }
  if (tail > 0 && !zeroUnits(s, alignedEnd, end, false)) return false;
  return true;
}

/** Whether [offset, offset+length) reads as zeroes through the chain without reading data. */
export async function readsZero(s: Qcow2State, offset: number, length: number): Promise<boolean> {
  const end = Math.min(offset + length, s.size);
  for (let pos = offset; pos < end;) {
    const run = mapRun(s, pos, end - pos);
    if (run.kind === "normal" || run.kind === "compressed") return false;
    if (
      (run.kind === "unallocated" || run.kind === "unallocated-alloc") &&
      !(await chainReadsZero(s.backing, pos, run.length))
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
function zeroUnits(s: Qcow2State, from: number, to: number, unmap: boolean): boolean {
  const cs = s.clusterSize;
  const c = Math.floor(from / cs);
  const wholeCluster = from === c * cs && (to === (c + 1) * cs || to === s.size);
  const existing = lookupSlot(s, from);
  if (existing !== undefined) {
    const hi = existing.table.view.getUint32(existing.at);
    if ((hi & HI_COMPRESSED) && !wholeCluster) return false;
  }
  const slot = slotForWrite(s, from);
  const view = slot.table.view;
  const hi = view.getUint32(slot.at), lo = view.getUint32(slot.at + 4);
  const compressed = (hi & HI_COMPRESSED) !== 0;
  const host = compressed ? 0 : entryOffset(hi, lo);
  const drop = compressed || (unmap && host > 0 && wholeCluster);
  if (s.extendedL2) {
    const touched = wholeCluster ? 0xffffffff : unitMask(s, from - c * cs, to - c * cs);
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
  if (drop) releaseEntry(s, hi, lo);
  return true;
}

/** Discard the whole clusters in [start, end) (cluster-aligned); the caller holds the node's lock. */
export function discardClusters(s: Qcow2State, start: number, end: number): void {
  for (let pos = start; pos < end; pos += s.clusterSize) discardCluster(s, pos);
}

/**
 * Discard one cluster as QEMU does: with a backing file or a host cluster it must read as
 * zeroes afterwards (zero flag on v3, unallocated on v2), and its host cluster is released.
 */
function discardCluster(s: Qcow2State, pos: number): void {
  const existing = lookupSlot(s, pos);
  if (existing === undefined && s.backing === undefined) return;
  let hi = 0, lo = 0;
  if (existing !== undefined) {
    hi = existing.table.view.getUint32(existing.at);
    lo = existing.table.view.getUint32(existing.at + 4);
  }
  const allocated = (hi & HI_COMPRESSED) !== 0 || entryOffset(hi, lo) > 0;
  if (!allocated && s.backing === undefined) return;
  const e = slotForWrite(s, pos);
  const view = e.table.view;
  if (s.extendedL2) {
    view.setUint32(e.at, 0);
    view.setUint32(e.at + 4, 0);
    view.setUint32(e.at + 8, 0xffffffff);
    view.setUint32(e.at + 12, 0);
  } else {
    const [nhi, nlo] = encodeEntry(0, false, s.v3);
    view.setUint32(e.at, nhi);
    view.setUint32(e.at + 4, nlo);
  }
  e.table.dirty = true;
  releaseEntry(s, hi, lo, s.passDiscardRequest);
}

/**
 * Drop every cluster of the active state (QEMU's make_empty): with `dropTables` each L2 table
 * goes after its L1 entry is cleared (a crash leaks, never corrupts), else every entry becomes
 * unallocated and the tables stay. The caller holds the node's lock.
 */
export function emptyActiveState(s: Qcow2State, dropTables: boolean): void {
  const cs = s.clusterSize;
  for (let l1Index = 0; l1Index < s.header.l1Size; l1Index++) {
    const tableOffset = l1Entry(s, l1Index);
    if (tableOffset === 0) continue;
    if (dropTables) {
      const table = l2Table(s, l1Index)!;
      for (let at = 0; at < cs; at += s.entryBytes) {
        releaseEntry(s, table.view.getUint32(at), table.view.getUint32(at + 4));
      }
      s.l1View.setUint32(l1Index * 8, 0);
      s.l1View.setUint32(l1Index * 8 + 4, 0);
      s.file.writeAt(
        s.header.l1TableOffset + l1Index * 8,
        s.l1.subarray(l1Index * 8, l1Index * 8 + 8),
      );
      freeLater(s, tableOffset / cs, 1, true);
      continue;
    }
    const first = l1Index * s.l2Entries;
    for (let i = 0; i < s.l2Entries && (first + i) * cs < s.size; i++) {
      const existing = lookupSlot(s, (first + i) * cs)!;
      const view = existing.table.view;
      const hi = view.getUint32(existing.at), lo = view.getUint32(existing.at + 4);
      const ext = s.extendedL2
        ? view.getUint32(existing.at + 8) | view.getUint32(existing.at + 12)
        : 0;
      if (hi === 0 && lo === 0 && ext === 0) continue;
      const e = slotForWrite(s, (first + i) * cs);
      for (let b = 0; b < s.entryBytes; b += 4) e.table.view.setUint32(e.at + b, 0);
      e.table.dirty = true;
      releaseEntry(s, hi, lo);
    }
  }
  flushAll(s);
}
