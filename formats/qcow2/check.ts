/**
 * Consistency check and refcount rebuild: count every reference to every host cluster from the
 * structures themselves (header, L1/L2 of the active state and every snapshot, refcount table and
 * blocks, snapshot table, compressed extents), compare with the stored refcounts, and rebuild the
 * refcount structure from the counts when asked.
 *
 * @module
 */
import type { Qcow2Node } from "./qcow2.ts";
import { MAX_REFTABLE_BYTES } from "./header.ts";
import { refcountAccessors } from "./refcount.ts";
import {
  compressedClusters,
  compressedLocation,
  entryOffset,
  HI_COMPRESSED,
  HI_COPIED,
} from "./tables.ts";

/** What a check found. Counts follow qemu-img check's categories. */
export interface CheckReport {
  /** Structural errors and refcounts too low (a cluster could be reused while in use). */
  corruptions: number;
  /** Clusters with a refcount higher than their references (space lost, harmless). */
  leaks: number;
  /** Human-readable findings, qemu-img style ("ERROR …", "Leaked cluster …"). */
  messages: string[];
  /** Clusters referenced (by anything). */
  allocatedClusters: number;
  /** Guest clusters mapped by the active L1 (data or compressed) and how many are fragmented / compressed. */
  guestAllocated: number;
  fragmented: number;
  compressed: number;
  /** Clusters the virtual disk spans. */
  totalClusters: number;
  /** One past the last referenced host byte (cluster-rounded). */
  imageEndOffset: number;
  /** Active L2 entries whose COPIED flag disagrees with the refcount. */
  copiedMismatches: number;
}

/** Reference counts per host cluster, and what was wrong on the way. */
interface References {
  counts: Uint32Array;
  errors: string[];
  guestAllocated: number;
  fragmented: number;
  compressed: number;
}

function countReferences(node: Qcow2Node, countRefcountStructure = true): References {
  const cs = node.clusterSize;
  const file = node.file;
  const fileSize = file.size();
  const clusters = Math.ceil(fileSize / cs);
  const counts = new Uint32Array(clusters);
  const errors: string[] = [];
  let guestAllocated = 0, fragmented = 0, compressed = 0;
  const add = (offset: number, length: number, what: string) => {
    if (length <= 0) return;
    const first = Math.floor(offset / cs), last = Math.floor((offset + length - 1) / cs);
    if (last >= clusters) {
      errors.push(
        `ERROR ${what} at offset 0x${offset.toString(16)} is past the end of the image file`,
      );
      return;
    }
    for (let c = first; c <= last; c++) counts[c]! += 1;
  };
  const entryBytes = node.extendedL2 ? 16 : 8;
  const h = node.header;

  add(0, cs, "header");
  const walkL1 = (l1: Uint8Array, active: boolean) => {
    const view = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    let expectedNext = -1;
    for (let i = 0; i < l1.length / 8; i++) {
      const hi = view.getUint32(i * 8), lo = view.getUint32(i * 8 + 4);
      const l2 = entryOffset(hi, lo);
      if (l2 === 0) continue;
      if (l2 < 0 || l2 % cs !== 0) {
        errors.push(
          `ERROR l2_offset=${l2.toString(16)}: Table is not cluster aligned; L1 entry corrupted`,
        );
        continue;
      }
      add(l2, cs, "L2 table");
      if (l2 + cs > fileSize) continue;
      const table = new Uint8Array(cs);
      file.readAt(l2, table);
      const tv = new DataView(table.buffer);
      for (let at = 0; at < cs; at += entryBytes) {
        const ehi = tv.getUint32(at), elo = tv.getUint32(at + 4);
        if (ehi & HI_COMPRESSED) {
          const loc = compressedLocation(ehi, elo, node.clusterBits);
          const [firstC, lastC] = compressedClusters(loc, node.clusterBits);
          add(firstC * cs, (lastC - firstC + 1) * cs, "compressed cluster");
          if (active) {
            guestAllocated++;
            compressed++;
            expectedNext = -1;
          }
          continue;
        }
        const host = entryOffset(ehi, elo);
        if (host === 0) continue;
        if (host < 0 || host % cs !== 0) {
          errors.push(
            `ERROR offset=${
              host.toString(16)
            }: Cluster is not properly aligned; L2 entry corrupted`,
          );
          continue;
        }
        add(host, cs, "data cluster");
        if (active) {
          const zero = !node.extendedL2 && (elo & 1) !== 0;
          if (!zero) {
            guestAllocated++;
            if (expectedNext !== -1 && host !== expectedNext) fragmented++;
            expectedNext = host + cs;
          }
        }
      }
    }
  };
  add(h.l1TableOffset, h.l1Size * 8, "active L1 table");
  walkL1(node.l1Table, true);
  if (countRefcountStructure) {
    add(node.refcounts.tableOffset, node.refcounts.tableClusters * cs, "refcount table");
    for (const b of node.refcounts.blockOffsets()) add(b, cs, "refcount block");
  }
  if (h.nbSnapshots > 0) add(h.snapshotsOffset, node.snapshots.bytes, "snapshot table");
  for (const snap of node.snapshots.entries) {
    add(snap.l1TableOffset, snap.l1Size * 8, "snapshot L1 table");
    const l1 = new Uint8Array(snap.l1Size * 8);
    file.readAt(snap.l1TableOffset, l1);
    walkL1(l1, false);
  }
  return { counts, errors, guestAllocated, fragmented, compressed };
}

/**
 * Check the image's refcounts against its structures. Caches are written out first.
 */
export function checkImage(node: Qcow2Node): CheckReport {
  node.flushMetadata();
  const cs = node.clusterSize;
  const refs = countReferences(node);
  const messages = [...refs.errors];
  let corruptions = refs.errors.length, leaks = 0, allocated = 0, end = 0;
  const rc = node.refcounts;
  const fileClusters = refs.counts.length;
  const storedLimit = rc.tableEntries * 2 ** rc.blockBits;
  for (let c = 0; c < Math.max(fileClusters, 0); c++) {
    const want = refs.counts[c]!;
    const have = c < storedLimit ? rc.get(c) : 0;
    if (want > 0) {
      allocated++;
      end = (c + 1) * cs;
    }
    if (have === want) continue;
    if (have > want) {
      leaks++;
      messages.push(`Leaked cluster ${c} refcount=${have} reference=${want}`);
    } else {
      corruptions++;
      messages.push(`ERROR cluster ${c} refcount=${have} reference=${want}`);
    }
  }
  // COPIED flags of the active tables must say refcount == 1.
  let copiedMismatches = 0;
  const entryBytes = node.extendedL2 ? 16 : 8;
  const l1 = new DataView(node.l1Table.buffer, node.l1Table.byteOffset, node.l1Table.byteLength);
  for (let i = 0; i < node.l1Table.length / 8; i++) {
    const hi = l1.getUint32(i * 8), lo = l1.getUint32(i * 8 + 4);
    const l2 = entryOffset(hi, lo);
    if (l2 <= 0 || l2 % cs !== 0 || l2 + cs > node.file.size()) continue;
    const copied = (hi & HI_COPIED) !== 0;
    if (copied !== (rc.get(l2 / cs) === 1)) {
      copiedMismatches++;
      messages.push(
        `ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${l2.toString(16)} refcount=${
          rc.get(l2 / cs)
        }`,
      );
    }
    const table = new Uint8Array(cs);
    node.file.readAt(l2, table);
    const tv = new DataView(table.buffer);
    for (let at = 0; at < cs; at += entryBytes) {
      const ehi = tv.getUint32(at), elo = tv.getUint32(at + 4);
      if (ehi & HI_COMPRESSED) continue;
      const host = entryOffset(ehi, elo);
      if (host <= 0 || host % cs !== 0) continue;
      if (((ehi & HI_COPIED) !== 0) !== (rc.get(host / cs) === 1)) {
        copiedMismatches++;
        messages.push(
          `ERROR OFLAG_COPIED data cluster: l2_entry=${ehi.toString(16)}${
            (elo >>> 0).toString(16).padStart(8, "0")
          } refcount=${rc.get(host / cs)}`,
        );
      }
    }
  }
  return {
    corruptions: corruptions + copiedMismatches,
    leaks,
    messages,
    allocatedClusters: allocated,
    guestAllocated: refs.guestAllocated,
    fragmented: refs.fragmented,
    compressed: refs.compressed,
    totalClusters: Math.ceil(node.size / cs),
    imageEndOffset: end,
    copiedMismatches,
  };
}

/**
 * Replace the refcount structure with one built from the references (QEMU's rebuild): new blocks
 * and table at the end of the file, describing themselves; one header write switches over. Old
 * refcount clusters become free.
 */
export function rebuildRefcounts(node: Qcow2Node): void {
  node.flushMetadata();
  const cs = node.clusterSize;
  // The old refcount structure is replaced: its clusters become free.
  const refs = countReferences(node, false);
  const order = node.header.refcountOrder;
  const perBlock = 2 ** (node.clusterBits + 3 - order);
  const [, setRefcount] = refcountAccessors(order);
  const max = order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
  // Trim to the last referenced cluster: nothing past it needs covering.
  let used = refs.counts.length;
  while (used > 0 && refs.counts[used - 1] === 0) used--;
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
  // Blocks cover [0, total); the new structure sits at areaStart.. (blocks, then table).
  const total = areaStart + blocks + tableClusters;
  const table = new Uint8Array(tableClusters * cs);
  const tableView = new DataView(table.buffer);
  const blockAt = (b: number) => (areaStart + b) * cs;
  for (let b = 0; b < blocks; b++) {
    const block = new Uint8Array(cs);
    const view = new DataView(block.buffer);
    for (let i = 0; i < perBlock; i++) {
      const c = b * perBlock + i;
      if (c >= total) break;
      let value = c < refs.counts.length && c < areaStart ? refs.counts[c]! : 0;
      if (c >= areaStart) value = 1;
      if (value === 0) continue;
      value = Math.min(value, max);
      setRefcount(view, block, i, value);
    }
    node.file.writeAt(blockAt(b), block);
    tableView.setBigUint64(b * 8, BigInt(blockAt(b)));
  }
  const tableOffset = (areaStart + blocks) * cs;
  node.file.writeAt(tableOffset, table);
  node.file.flush();
  node.header.refcountTableOffset = tableOffset;
  node.header.refcountTableClusters = tableClusters;
  node.writeHeader();
  node.reloadRefcounts();
}
