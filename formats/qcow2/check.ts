/**
 * Consistency check and repair, following qemu-img check: count every reference to every host
 * cluster from the structures themselves (header, L1/L2 of the active state and every snapshot,
 * refcount table and blocks, snapshot table, compressed extents), compare with the stored
 * refcounts, check COPIED flags, and repair on request (leaks, refcount errors, COPIED flags, and
 * a rebuilt refcount structure where a cluster in use has refcount 0).
 *
 * @module
 */
import type { Qcow2Node } from "./qcow2.ts";
import { MAX_REFTABLE_BYTES } from "./header.ts";
import { refcountAccessors } from "./refcount.ts";
import {
  compressedLocation,
  encodeEntry,
  entryOffset,
  HI_COMPRESSED,
  HI_COPIED,
} from "./tables.ts";

/** What to repair (qemu-img check -r leaks / -r all). */
export interface CheckFix {
  leaks?: boolean;
  errors?: boolean;
}

/** What a check found, with qemu-img check's fields. */
export interface CheckReport {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  /** Guest clusters of the virtual disk. */
  totalClusters: number;
  /** Guest clusters the active L1 maps to host clusters (normal, preallocated zero, compressed). */
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** One past the last cluster in use or counted (0 when none). */
  imageEndOffset: number;
  /** Lines qemu-img prints to stderr while checking ("ERROR …", "Leaked cluster …", "Repairing …"). */
  messages: string[];
}

/** In-memory reference counts, grown as references past the end of the file appear. */
class Counts {
  data: Uint32Array;
  constructor(clusters: number) {
    this.data = new Uint32Array(clusters);
  }
  get length(): number {
    return this.data.length;
  }
  get(c: number): number {
    return c < this.data.length ? this.data[c]! : 0;
  }
  add(c: number): void {
    if (c >= this.data.length) {
      const grown = new Uint32Array(Math.max(c + 1, this.data.length * 2));
      grown.set(this.data);
      this.data = grown;
    }
    this.data[c]! += 1;
  }
}

interface Pass {
  report: CheckReport;
  counts: Counts;
  /** A cluster in use has refcount 0, or a refcount block is damaged: rebuild the structure. */
  rebuild: boolean;
  fileClusters: number;
}

function newReport(node: Qcow2Node): CheckReport {
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

/** Count references the way QEMU's calculate_refcounts does. */
function calculate(node: Qcow2Node, report: CheckReport, countRefcountStructure: boolean): Pass {
  const cs = node.clusterSize;
  const file = node.file;
  const fileSize = file.size();
  const fileClusters = Math.ceil(fileSize / cs);
  const counts = new Counts(fileClusters);
  const pass: Pass = { report, counts, rebuild: false, fileClusters };
  const hex = (n: number) => n.toString(16);
  const inc = (offset: number, length: number) => {
    if (length <= 0) return;
    if (offset + length - fileSize > cs) {
      report.messages.push(
        `ERROR: counting reference for region exceeding the end of the file by one cluster or more: ` +
          `offset 0x${hex(offset)} size 0x${hex(length)}`,
      );
      report.corruptions++;
      return;
    }
    const first = Math.floor(offset / cs), last = Math.floor((offset + length - 1) / cs);
    for (let c = first; c <= last; c++) counts.add(c);
  };
  const entryBytes = node.extendedL2 ? 16 : 8;
  const h = node.header;

  const walkL2 = (l2: number, active: boolean) => {
    const table = new Uint8Array(cs);
    file.readAt(l2, table);
    const tv = new DataView(table.buffer);
    let nextContiguous = 0;
    for (let at = 0; at < cs; at += entryBytes) {
      const hi = tv.getUint32(at), lo = tv.getUint32(at + 4);
      if (hi & HI_COMPRESSED) {
        if (hi & HI_COPIED) {
          report.messages.push(
            `ERROR: cluster ${
              Math.floor(entryOffset(hi & 0x3fffffff, lo) / cs)
            }: copied flag must never be set for compressed clusters`,
          );
          report.corruptions++;
        }
        const loc = compressedLocation(hi, lo, node.clusterBits);
        const start = loc.hostOffset - (loc.hostOffset % 512);
        inc(start, loc.hostOffset + loc.length - start);
        if (active) {
          report.allocatedClusters++;
          report.compressedClusters++;
          report.fragmentedClusters++;
        }
        continue;
      }
      const host = entryOffset(hi, lo);
      if (host === 0) continue;
      if (host < 0) {
        report.messages.push(`ERROR: L2 entry at 0x${hex(l2 + at)} points past 2^53`);
        report.corruptions++;
        continue;
      }
      if (active) {
        report.allocatedClusters++;
        if (nextContiguous !== 0 && host !== nextContiguous) report.fragmentedClusters++;
        nextContiguous = host + cs;
      }
      inc(host, cs);
      if (host % cs !== 0) {
        report.messages.push(
          `ERROR offset=${hex(host)}: Data cluster is not properly aligned; L2 entry corrupted.`,
        );
        report.corruptions++;
      }
    }
  };
  const walkL1 = (l1Offset: number, l1: Uint8Array, active: boolean) => {
    inc(l1Offset, l1.length);
    const view = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let i = 0; i < l1.length / 8; i++) {
      const l2 = entryOffset(view.getUint32(i * 8), view.getUint32(i * 8 + 4));
      if (l2 === 0) continue;
      if (l2 < 0) {
        report.messages.push(`ERROR: L1 entry ${i} points past 2^53`);
        report.corruptions++;
        continue;
      }
      inc(l2, cs);
      if (l2 % cs !== 0) {
        report.messages.push(
          `ERROR l2_offset=${hex(l2)}: Table is not cluster aligned; L1 entry corrupted`,
        );
        report.corruptions++;
        continue;
      }
      if (l2 + cs > fileSize) continue;
      walkL2(l2, active);
    }
  };

  inc(0, cs);
  walkL1(h.l1TableOffset, node.l1Table, true);
  for (const snap of node.snapshots.entries) {
    const l1 = new Uint8Array(snap.l1Size * 8);
    file.readAt(snap.l1TableOffset, l1);
    walkL1(snap.l1TableOffset, l1, false);
  }
  if (h.nbSnapshots > 0) inc(h.snapshotsOffset, node.snapshots.bytes);
  if (countRefcountStructure) {
    const rc = node.refcounts;
    inc(rc.tableOffset, rc.tableEntries * 8);
    for (let i = 0; i < rc.tableEntries; i++) {
      const view = new DataView(rc.table.buffer);
      const offset = Number(view.getBigUint64(i * 8));
      if (offset === 0) continue;
      if (offset % cs !== 0) {
        report.messages.push(
          `ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`,
        );
        report.corruptions++;
        pass.rebuild = true;
        continue;
      }
      if (offset / cs >= counts.length) {
        report.messages.push(`ERROR refcount block ${i} is outside image`);
        report.corruptions++;
        pass.rebuild = true;
        continue;
      }
      inc(offset, cs);
      if (counts.get(offset / cs) !== 1) {
        report.messages.push(`ERROR refcount block ${i} refcount=${counts.get(offset / cs)}`);
        report.corruptions++;
        pass.rebuild = true;
      }
    }
  }
  return pass;
}

/** Compare stored refcounts with the counted references; fix leaks or errors when asked. */
function compare(node: Qcow2Node, pass: Pass, fix: CheckFix): number {
  const { report, counts } = pass;
  const rc = node.refcounts;
  const storedLimit = rc.tableEntries * 2 ** rc.blockBits;
  let highest = -1;
  for (let c = 0; c < counts.length; c++) {
    let stored: number;
    try {
      stored = c < storedLimit ? rc.get(c) : 0;
    } catch (e) {
      report.messages.push(`Can't get refcount for cluster ${c}: ${(e as Error).message}`);
      report.checkErrors++;
      continue;
    }
    const counted = counts.get(c);
    if (stored > 0 || counted > 0) highest = c;
    if (stored === counted) continue;
    let fixing: "leaks" | "errors" | undefined;
    if (stored === 0) pass.rebuild = true;
    else if (stored > counted && fix.leaks) fixing = "leaks";
    else if (stored < counted && fix.errors) fixing = "errors";
    const label = fixing ? "Repairing" : stored < counted ? "ERROR" : "Leaked";
    report.messages.push(`${label} cluster ${c} refcount=${stored} reference=${counted}`);
    if (fixing) {
      try {
        rc.set(c, Math.min(counted, rc.maxRefcount));
        if (fixing === "leaks") report.leaksFixed++;
        else report.corruptionsFixed++;
        continue;
      } catch {
        // Fall through: counted as not fixed.
      }
    }
    if (stored < counted) report.corruptions++;
    else report.leaks++;
  }
  rc.flush();
  node.barrier();
  return highest;
}

/** COPIED must say refcount == 1 in the active L1 and L2 tables (QEMU's check_oflag_copied). */
function checkCopied(node: Qcow2Node, report: CheckReport, fix: CheckFix): void {
  const cs = node.clusterSize;
  const entryBytes = node.extendedL2 ? 16 : 8;
  const rc = node.refcounts;
  const l1 = node.l1Table;
  const view = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  const hex64 = (hi: number, lo: number) =>
    (hi === 0 ? "" : hi.toString(16)) +
    (hi === 0 ? lo.toString(16) : (lo >>> 0).toString(16).padStart(8, "0"));
  let l1Dirty = false;
  for (let i = 0; i < l1.length / 8; i++) {
    const hi = view.getUint32(i * 8), lo = view.getUint32(i * 8 + 4);
    const l2 = entryOffset(hi, lo);
    if (l2 <= 0 || l2 % cs !== 0 || l2 + cs > node.file.size()) continue;
    const refcount = rc.get(l2 / cs);
    if ((refcount === 1) !== ((hi & HI_COPIED) !== 0)) {
      report.messages.push(
        `${fix.errors ? "Repairing" : "ERROR"} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${
          hex64(hi, lo)
        } refcount=${refcount}`,
      );
      if (fix.errors) {
        const [nhi, nlo] = encodeEntry(l2, refcount === 1, false);
        view.setUint32(i * 8, nhi);
        view.setUint32(i * 8 + 4, nlo);
        l1Dirty = true;
        report.corruptionsFixed++;
      } else {
        report.corruptions++;
      }
    }
    const table = new Uint8Array(cs);
    node.file.readAt(l2, table);
    const tv = new DataView(table.buffer);
    let dirty = false;
    for (let at = 0; at < cs; at += entryBytes) {
      const ehi = tv.getUint32(at), elo = tv.getUint32(at + 4);
      if (ehi & HI_COMPRESSED) continue;
      const host = entryOffset(ehi, elo);
      if (host <= 0 || host % cs !== 0) continue;
      const count = rc.get(host / cs);
      if ((count === 1) !== ((ehi & HI_COPIED) !== 0)) {
        report.messages.push(
          `${fix.errors ? "Repairing" : "ERROR"} OFLAG_COPIED data cluster: l2_entry=${
            hex64(ehi, elo)
          } refcount=${count}`,
        );
        if (fix.errors) {
          tv.setUint32(at, count === 1 ? (ehi | HI_COPIED) >>> 0 : (ehi & ~HI_COPIED) >>> 0);
          dirty = true;
          report.corruptionsFixed++;
        } else {
          report.corruptions++;
        }
      }
    }
    if (dirty) {
      node.l2Cache.discard(l2);
      node.file.writeAt(l2, table);
    }
  }
  if (l1Dirty) node.file.writeAt(node.header.l1TableOffset, l1);
  if (l1Dirty) node.barrier();
}

/**
 * Check the image as qemu-img check does, repairing what `fix` allows. Caches are written out
 * first; the report describes the image after any repair's own pass (qemu-img then checks again).
 */
export function checkImage(node: Qcow2Node, fix: CheckFix = {}): CheckReport {
  node.flushMetadata();
  const report = newReport(node);
  let pass = calculate(node, report, true);
  let highest = compare(node, pass, {});
  if (pass.rebuild && fix.errors) {
    report.messages.push("Rebuilding refcount structure");
    const old = { ...report, messages: report.messages };
    rebuildRefcounts(node);
    // Recount against the new structure; what the rebuild repaired counts as fixed.
    const again = newReport(node);
    again.messages = old.messages;
    pass = calculate(node, again, true);
    highest = compare(node, pass, { leaks: true });
    again.corruptionsFixed += old.corruptions;
    again.leaksFixed += old.leaks;
    Object.assign(report, again);
  } else if (fix.leaks || fix.errors) {
    // Fix in a second comparison, as QEMU does once it knows no rebuild is needed.
    const fixing = newReport(node);
    fixing.messages = report.messages.splice(0);
    pass = calculate(node, fixing, true);
    highest = compare(node, pass, fix);
    Object.assign(report, fixing);
  }
  checkCopied(node, report, fix);
  report.imageEndOffset = highest < 0 ? 0 : (highest + 1) * node.clusterSize;
  return report;
}

/**
 * Replace the refcount structure with one built from the references (QEMU's rebuild): new blocks
 * and table past the last cluster in use, describing themselves; one header write switches over.
 * The old refcount clusters are not referenced any more and become free.
 */
export function rebuildRefcounts(node: Qcow2Node): void {
  node.flushMetadata();
  const cs = node.clusterSize;
  const counted = calculate(node, newReport(node), false).counts;
  const order = node.header.refcountOrder;
  const perBlock = 2 ** (node.clusterBits + 3 - order);
  const max = order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
  const [, setRefcount] = refcountAccessors(order);
  let used = counted.length;
  while (used > 0 && counted.get(used - 1) === 0) used--;
  const areaStart = used;
  let blocks = 0, tableClusters = 0;
  for (;;) {
    const total = areaStart + blocks + tableClusters;
    const wantBlocks = Math.ceil(total / perBlock);
    const wantTable = Math.ceil(wantBlocks * 8 / cs);
    if (wantBlocks === blocks && wantTable === tableClusters) break;
    blocks = wantBlocks;
    tableClusters = wantTable;
  }
  if (tableClusters * cs > MAX_REFTABLE_BYTES) throw new Error("refcount table would exceed 8 MiB");
  const total = areaStart + blocks + tableClusters;
  const table = new Uint8Array(tableClusters * cs);
  const tableView = new DataView(table.buffer);
  for (let b = 0; b < blocks; b++) {
    const block = new Uint8Array(cs);
    const view = new DataView(block.buffer);
    for (let i = 0; i < perBlock; i++) {
      const c = b * perBlock + i;
      if (c >= total) break;
      const value = c >= areaStart ? 1 : counted.get(c);
      if (value !== 0) setRefcount(view, block, i, Math.min(value, max));
    }
    const at = (areaStart + b) * cs;
    node.file.writeAt(at, block);
    tableView.setBigUint64(b * 8, BigInt(at));
  }
  const tableOffset = (areaStart + blocks) * cs;
  node.file.writeAt(tableOffset, table);
  node.file.flush();
  node.header.refcountTableOffset = tableOffset;
  node.header.refcountTableClusters = tableClusters;
  node.writeHeader();
  node.reloadRefcounts();
}
