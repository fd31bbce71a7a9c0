/**
 * Atomic metadata switches for snapshot create, apply and delete. A COPIED flag in the active
 * tables and the refcount it describes live in different clusters, so no order of in-place writes
 * keeps `qemu-img check` clean at every cut: COPIED set with refcount 2 and COPIED clear with
 * refcount 1 are both counted as corruptions by qemu-img 7.2. Their only common ancestor is the
 * header, so the new state is written beside the old one — a new active L1 table, copies of the
 * active L2 tables whose COPIED flags change, the new snapshot table, copies of every refcount
 * block that changes and a new refcount table, all in clusters the old state counts as free — and
 * one header write (its first sector holds every field that changes) switches from one to the
 * other. A crash before it leaves the old image (the new clusters are free space past its end), a
 * crash after it the new one; what the old state owned is freed (and punched) once the header is
 * durable.
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import { MAX_REFTABLE_BYTES } from "./header.ts";
import type { Qcow2Node } from "./qcow2.ts";
import { refcountAccessors } from "./refcount.ts";
import { serializeSnapshotTable, type SnapshotEntry } from "./snapshot.ts";
import {
  compressedClusters,
  compressedLocation,
  encodeEntry,
  entryOffset,
  HI_COMPRESSED,
  HI_COPIED,
} from "./tables.ts";

/** Read L2 table `offset` (through the cache, which holds the newest contents). */
function readTable(node: Qcow2Node, offset: number): Uint8Array {
  const table = new Uint8Array(node.clusterSize);
  const cached = node.l2Cache.peek(offset);
  if (cached) table.set(cached.data);
  else node.file.readAt(offset, table);
  return table;
}

function corrupt(node: Qcow2Node, message: string, offset: number): BlockError {
  return new BlockError("corrupt", message, { path: node.filename, offset });
}

/** The L2 table offsets of an L1 table, by index (0 for none); validated. */
function l2Offsets(node: Qcow2Node, l1: Uint8Array): number[] {
  const cs = node.clusterSize;
  const view = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  const out: number[] = [];
  for (let i = 0; i < l1.length / 8; i++) {
    const l2 = entryOffset(view.getUint32(i * 8), view.getUint32(i * 8 + 4));
    if (l2 !== 0 && (l2 < 0 || l2 % cs !== 0 || l2 < cs)) {
      throw corrupt(node, `L1 entry ${i} points at an invalid L2 table 0x${l2.toString(16)}`, l2);
    }
    out.push(l2);
  }
  return out;
}

/**
 * The refcount changes of one transition, as references gained and lost: whole L1 trees walked
 * with a sign, single clusters added.
 */
export class Transition {
  readonly delta = new Map<number, number>();

  constructor(readonly node: Qcow2Node) {}

  add(cluster: number, count: number, d: number): void {
    for (let c = cluster; c < cluster + count; c++) {
      const v = (this.delta.get(c) ?? 0) + d;
      if (v === 0) this.delta.delete(c);
      else this.delta.set(c, v);
    }
  }

  /** Every L2 table an L1 table reaches and every host cluster those reach, once per reference. */
  walk(l1: Uint8Array, sign: 1 | -1): void {
    const node = this.node;
    const cs = node.clusterSize;
    const entryBytes = node.extendedL2 ? 16 : 8;
    for (const l2 of l2Offsets(node, l1)) {
      if (l2 === 0) continue;
      this.add(l2 / cs, 1, sign);
      const table = readTable(node, l2);
      const view = new DataView(table.buffer);
      for (let at = 0; at < cs; at += entryBytes) {
        const hi = view.getUint32(at), lo = view.getUint32(at + 4);
        if (hi & HI_COMPRESSED) {
          const [first, last] = compressedClusters(
            compressedLocation(hi, lo, node.clusterBits),
            node.clusterBits,
          );
          this.add(first, last - first + 1, sign);
          continue;
        }
        const host = entryOffset(hi, lo);
        if (host < 0 || host % cs !== 0) {
          throw corrupt(
            node,
            `Cluster allocation offset 0x${(host < 0 ? 0 : host).toString(16)} unaligned ` +
              `(L2 offset: 0x${l2.toString(16)}, L2 index: 0x${(at / entryBytes).toString(16)})`,
            l2 + at,
          );
        }
        if (host > 0) this.add(host / cs, 1, sign);
      }
    }
  }

  /** The L1 table's own clusters. */
  addTable(offset: number, bytes: number, d: number): void {
    if (bytes > 0) {
      this.add(offset / this.node.clusterSize, Math.ceil(bytes / this.node.clusterSize), d);
    }
  }
}

/** What the switch makes of the image. */
export interface SwitchTarget {
  /** Entries of the active L1 table afterwards (COPIED flags are recomputed here). */
  l1: Uint8Array;
  /**
   * The active L1 table moves to new clusters even when its contents stay. `keep`: the old
   * table lives on (as a snapshot's); `free`: it is dropped. Without `move`, it moves only when
   * its contents change, and the old one is dropped.
   */
  move?: "keep" | "free";
  /** The snapshot table afterwards; undefined: unchanged. */
  snapshots?: SnapshotEntry[];
  /** Virtual size afterwards. */
  size: number;
  /** Called once the header is durable, before the frees (e.g. tidy a table that became inactive). */
  after?: () => void;
}

/** An L2 table with COPIED set exactly where `refcount` says 1; undefined when nothing changes. */
function withCopied(
  node: Qcow2Node,
  table: Uint8Array,
  refcount: (cluster: number) => number,
): Uint8Array | undefined {
  const cs = node.clusterSize;
  const entryBytes = node.extendedL2 ? 16 : 8;
  let out: Uint8Array | undefined;
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  for (let at = 0; at < cs; at += entryBytes) {
    const hi = view.getUint32(at), lo = view.getUint32(at + 4);
    let want = hi;
    if (hi & HI_COMPRESSED) {
      want = (hi & ~HI_COPIED) >>> 0;
    } else {
      const host = entryOffset(hi, lo);
      if (host <= 0) continue;
      want = refcount(host / cs) === 1 ? (hi | HI_COPIED) >>> 0 : (hi & ~HI_COPIED) >>> 0;
    }
    if (want === hi) continue;
    out ??= table.slice();
    new DataView(out.buffer).setUint32(at, want);
  }
  return out;
}

/**
 * Switch `node` to `target` with one header write; see the module comment for the order.
 * `transition` holds the refcount changes of the references gained and lost (not of the clusters
 * this function allocates and frees itself: L1 and L2 copies, the snapshot and refcount tables).
 *
 * @throws {BlockError} `unsupported` when a refcount would exceed refcount_bits (nothing written)
 */
export function switchState(node: Qcow2Node, transition: Transition, target: SwitchTarget): void {
  const cs = node.clusterSize;
  const rc = node.refcounts;
  const h = node.header;
  const t = transition;
  const oldL1 = node.l1Table;
  const oldL1Offset = h.l1TableOffset, oldL1Bytes = h.l1Size * 8;

  // The new active tables: COPIED from the final refcounts; a table the old active state reaches
  // is copied when its flags change (it is live until the switch), any other changed in place.
  const finalOf = (c: number) => rc.get(c) + (t.delta.get(c) ?? 0);
  const oldActive = new Set(l2Offsets(node, oldL1).filter((o) => o !== 0));
  const l1 = target.l1.slice();
  const l1View = new DataView(l1.buffer);
  const targets = l2Offsets(node, l1);
  const copies: Array<{ index: number; data: Uint8Array; offset: number }> = [];
  const inPlace: Array<{ offset: number; data: Uint8Array }> = [];
  for (const [i, l2] of targets.entries()) {
    if (l2 === 0) continue;
    const changed = withCopied(node, readTable(node, l2), finalOf);
    if (changed === undefined) continue;
    if (oldActive.has(l2)) {
      copies.push({ index: i, data: changed, offset: 0 });
      t.add(l2 / cs, 1, -1);
    } else {
      inPlace.push({ offset: l2, data: changed });
    }
  }
  const move = target.move ??
    (sameBytes(l1WithFlags(node, l1, targets, copies, finalOf), oldL1) ? undefined : "free");
  if (move === "free" && oldL1Bytes > 0) t.addTable(oldL1Offset, oldL1Bytes, -1);
  const snapshotBytes = target.snapshots === undefined
    ? undefined
    : serializeSnapshotTable(target.snapshots);
  if (target.snapshots !== undefined && h.nbSnapshots > 0 && node.snapshots.bytes > 0) {
    t.addTable(h.snapshotsOffset, node.snapshots.bytes, -1);
  }

  // Final refcounts of existing clusters; refuse before writing anything.
  const values = new Map<number, number>();
  for (const [c, d] of t.delta) {
    const v = rc.get(c) + d;
    if (v < 0) throw corrupt(node, `Refcount of cluster ${c} would drop below zero`, c * cs);
    if (v > rc.maxRefcount) {
      throw new BlockError(
        "unsupported",
        `Cluster ${c} would need a refcount above ${rc.maxRefcount} (refcount_bits=${
          Math.log2(rc.maxRefcount + 1)
        }); amend refcount_bits first`,
        { path: node.filename },
      );
    }
    values.set(c, v);
  }

  // The new clusters: [L1][L2 copies][snapshot table][refcount blocks][refcount table], past the
  // end of the file and free in the old state. Blocks and table size depend on each other.
  const l1Clusters = move ? Math.ceil(l1.length / cs) : 0;
  const snapClusters = snapshotBytes && target.snapshots!.length > 0
    ? Math.ceil(snapshotBytes.length / cs)
    : 0;
  const fixed = l1Clusters + copies.length + snapClusters;
  const per = 2 ** rc.blockBits;
  const oldEntries = rc.tableEntries;
  const oldTableClusters = rc.tableClusters;
  let start = Math.ceil(node.file.size() / cs);
  let blocks: number[] = [];
  let tableClusters = oldTableClusters;
  for (let guessBlocks = 0, guessTable = oldTableClusters;;) {
    const n = fixed + guessBlocks + guessTable;
    const busy = firstUsed(rc, start, n);
    if (busy >= 0) {
      start = busy + 1;
      continue;
    }
    const changed = new Set<number>();
    for (const c of values.keys()) changed.add(Math.floor(c / per));
    for (let c = start; c < start + n; c++) changed.add(Math.floor(c / per));
    for (let i = 0; i < oldTableClusters; i++) {
      changed.add(Math.floor((rc.tableOffset / cs + i) / per));
    }
    // Replacing a block frees its cluster, which changes the block that counts it.
    for (let grew = true; grew;) {
      grew = false;
      for (const b of [...changed]) {
        const off = rc.blockOffset(b);
        if (off === 0) continue;
        const home = Math.floor(off / cs / per);
        if (!changed.has(home)) {
          changed.add(home);
          grew = true;
        }
      }
    }
    blocks = [...changed].sort((a, b) => a - b);
    const entries = Math.max(oldEntries, blocks[blocks.length - 1]! + 1);
    tableClusters = Math.max(oldTableClusters, Math.ceil(entries * 8 / cs));
    if (blocks.length <= guessBlocks && tableClusters <= guessTable) break;
    guessBlocks = Math.max(guessBlocks, blocks.length);
    guessTable = Math.max(guessTable, tableClusters);
  }
  if (tableClusters * cs > MAX_REFTABLE_BYTES) {
    throw new BlockError(
      "unsupported",
      "Image is too large: the refcount table would exceed 8 MiB",
      {
        path: node.filename,
      },
    );
  }
  let next = start;
  const take = (n: number) => {
    const at = next;
    next += n;
    return at * cs;
  };
  const l1Offset = move ? take(l1Clusters) : oldL1Offset;
  for (const copy of copies) {
    const offset = take(1);
    const [hi, lo] = encodeEntry(offset, true, false);
    l1View.setUint32(copy.index * 8, hi);
    l1View.setUint32(copy.index * 8 + 4, lo);
    copy.offset = offset;
  }
  // COPIED in the L1 entries that were not copied: from the final refcount of their table.
  for (const [i, l2] of targets.entries()) {
    if (l2 === 0 || copies.some((c) => c.index === i)) continue;
    const [hi, lo] = encodeEntry(l2, finalOf(l2 / cs) === 1, false);
    l1View.setUint32(i * 8, hi);
    l1View.setUint32(i * 8 + 4, lo);
  }
  const snapOffset = snapClusters > 0 ? take(snapClusters) : 0;
  const blockAt = new Map<number, number>();
  for (const b of blocks) blockAt.set(b, take(1));
  const tableOffset = take(tableClusters);
  for (let c = start; c < next; c++) values.set(c, 1);
  for (const b of blocks) {
    const off = rc.blockOffset(b);
    if (off !== 0) values.set(off / cs, 0);
  }
  for (let i = 0; i < oldTableClusters; i++) values.set(rc.tableOffset / cs + i, 0);

  // Everything new, then one header write.
  for (const p of inPlace) node.file.writeAt(p.offset, p.data);
  for (const copy of copies) node.file.writeAt(copy.offset, copy.data);
  if (move) node.file.writeAt(l1Offset, padded(l1, cs));
  if (snapClusters > 0) node.file.writeAt(snapOffset, padded(snapshotBytes!, cs));
  const [, setRefcount] = refcountAccessors(h.refcountOrder);
  const byBlock = new Map<number, Array<[number, number]>>();
  for (const [c, v] of values) {
    const b = Math.floor(c / per);
    let list = byBlock.get(b);
    if (list === undefined) byBlock.set(b, list = []);
    list.push([c - b * per, v]);
  }
  const block = new Uint8Array(cs);
  const blockView = new DataView(block.buffer);
  for (const b of blocks) {
    const off = rc.blockOffset(b);
    if (off !== 0) node.file.readAt(off, block);
    else block.fill(0);
    for (const [i, v] of byBlock.get(b) ?? []) setRefcount(blockView, block, i, v);
    node.file.writeAt(blockAt.get(b)!, block);
  }
  const table = new Uint8Array(tableClusters * cs);
  table.set(rc.table);
  const tableView = new DataView(table.buffer);
  for (const [b, off] of blockAt) tableView.setBigUint64(b * 8, BigInt(off));
  node.file.writeAt(tableOffset, table);
  node.barrier();

  const freed: number[] = [];
  for (const [c, v] of values) if (v === 0 && c < start) freed.push(c);
  h.l1TableOffset = l1Offset;
  h.l1Size = l1.length / 8;
  h.size = target.size;
  h.refcountTableOffset = tableOffset;
  h.refcountTableClusters = tableClusters;
  if (target.snapshots !== undefined) {
    h.snapshotsOffset = snapOffset;
    h.nbSnapshots = target.snapshots.length;
  }
  node.writeHeader();
  node.replaceL1(l1);
  node.l2Cache.clear();
  // Re-attaching drops the decompressed-cluster cache, keyed by L2 entry: a freed compressed
  // cluster's entry could come back for other data.
  node.attachBacking(node.backing);
  node.reloadRefcounts();
  if (target.snapshots !== undefined) {
    node.setSnapshots({
      entries: target.snapshots,
      bytes: snapClusters > 0 ? snapshotBytes!.length : 0,
    });
  }
  target.after?.();
  for (const c of freed) node.file.punchHole(c * cs, cs);
  node.barrier();
}

/** The L1 entries with COPIED as {@linkcode switchState} will set them (to see whether they change). */
function l1WithFlags(
  node: Qcow2Node,
  l1: Uint8Array,
  targets: number[],
  copies: Array<{ index: number }>,
  finalOf: (c: number) => number,
): Uint8Array {
  if (copies.length > 0) return new Uint8Array(0);
  const out = l1.slice();
  const view = new DataView(out.buffer);
  for (const [i, l2] of targets.entries()) {
    if (l2 === 0) continue;
    const [hi, lo] = encodeEntry(l2, finalOf(l2 / node.clusterSize) === 1, false);
    view.setUint32(i * 8, hi);
    view.setUint32(i * 8 + 4, lo);
  }
  return out;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** `bytes` padded to whole clusters (the rest of a new cluster is written as zeroes). */
function padded(bytes: Uint8Array, cs: number): Uint8Array {
  const size = Math.ceil(bytes.length / cs) * cs;
  if (size === bytes.length) return bytes;
  const out = new Uint8Array(size);
  out.set(bytes);
  return out;
}

/** The first cluster in [start, start+n) with a non-zero refcount in the current state, or -1. */
function firstUsed(rc: Qcow2Node["refcounts"], start: number, n: number): number {
  for (let c = start + n - 1; c >= start; c--) if (rc.get(c) !== 0) return c;
  return -1;
}
