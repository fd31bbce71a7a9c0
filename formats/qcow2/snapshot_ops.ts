/**
 * Internal snapshots: create, apply and delete, with the refcount updates and the ordering that
 * keep a crash from sharing clusters (refcounts up before anything points at the new state;
 * down only after nothing points at the old one).
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import { MAX_L1_BYTES, MAX_SNAPSHOTS } from "./header.ts";
import type { Qcow2Node } from "./qcow2.ts";
import {
  findSnapshot,
  MAX_SNAPSHOT_TABLE_BYTES,
  nextSnapshotId,
  serializeSnapshotTable,
  type SnapshotEntry,
} from "./snapshot.ts";
import {
  compressedClusters,
  compressedLocation,
  encodeEntry,
  entryOffset,
  HI_COMPRESSED,
  HI_COPIED,
} from "./tables.ts";

/** Longest snapshot name or ID (QEMU keeps both under 256 bytes in its snapshot info). */
export const MAX_SNAPSHOT_NAME = 255;

/** Every host cluster an L1 table reaches, once per reference: L2 tables, data, compressed extents. */
function forEachReference(node: Qcow2Node, l1: Uint8Array, fn: (cluster: number) => void): void {
  const cs = node.clusterSize;
  const entryBytes = node.extendedL2 ? 16 : 8;
  const view = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  const table = new Uint8Array(cs);
  const tv = new DataView(table.buffer);
  for (let i = 0; i < l1.length / 8; i++) {
    const l2 = entryOffset(view.getUint32(i * 8), view.getUint32(i * 8 + 4));
    if (l2 === 0) continue;
    if (l2 < 0 || l2 % cs !== 0) {
      throw new BlockError(
        "corrupt",
        `L1 entry ${i} points at an unaligned L2 table 0x${l2.toString(16)}`,
        {
          path: node.filename,
        },
      );
    }
    // Read through the cache when present: it holds the newest contents.
    const cached = node.l2Cache.peek(l2);
    if (cached) table.set(cached.data);
    else node.file.readAt(l2, table);
    for (let at = 0; at < cs; at += entryBytes) {
      const hi = tv.getUint32(at), lo = tv.getUint32(at + 4);
      if (hi & HI_COMPRESSED) {
        const [first, last] = compressedClusters(
          compressedLocation(hi, lo, node.clusterBits),
          node.clusterBits,
        );
        for (let c = first; c <= last; c++) fn(c);
        continue;
      }
      const host = entryOffset(hi, lo);
      if (host > 0) fn(host / cs);
    }
    fn(l2 / cs);
  }
}

/** Refuse before changing anything when +1 would overflow a refcount somewhere. */
function checkHeadroom(node: Qcow2Node, l1: Uint8Array): void {
  const max = node.refcounts.maxRefcount;
  const extra = new Map<number, number>();
  forEachReference(node, l1, (c) => extra.set(c, (extra.get(c) ?? 0) + 1));
  for (const [c, n] of extra) {
    if (node.refcounts.get(c) + n > max) {
      throw new BlockError(
        "unsupported",
        `Cluster ${c} would need a refcount above ${max} (refcount_bits=${
          Math.log2(max + 1)
        }); amend refcount_bits first`,
        { path: node.filename },
      );
    }
  }
}

/** Add `delta` to everything `l1` reaches; clusters that drop to zero are punched out of the file. */
function adjustReach(node: Qcow2Node, l1: Uint8Array, delta: 1 | -1): void {
  const freed: number[] = [];
  forEachReference(node, l1, (c) => {
    node.refcounts.change(c, 1, delta);
    if (delta < 0 && node.refcounts.get(c) === 0) freed.push(c);
  });
  node.refcounts.flush();
  node.barrier();
  for (const c of freed) {
    node.l2Cache.discard(c * node.clusterSize);
    node.file.punchHole(c * node.clusterSize, node.clusterSize);
  }
}

/**
 * Set COPIED exactly in the active L1 and the L2 tables it reaches: COPIED iff refcount is 1.
 * Shared tables are updated in place too: COPIED means nothing to a snapshot's view of them.
 */
function rebuildCopied(node: Qcow2Node): void {
  const cs = node.clusterSize;
  const entryBytes = node.extendedL2 ? 16 : 8;
  const l1 = node.l1Table;
  const view = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  for (let i = 0; i < l1.length / 8; i++) {
    const hi = view.getUint32(i * 8), lo = view.getUint32(i * 8 + 4);
    const l2 = entryOffset(hi, lo);
    if (l2 <= 0) continue;
    const owned = node.refcounts.get(l2 / cs) === 1;
    const [nhi, nlo] = encodeEntry(l2, owned, false);
    view.setUint32(i * 8, nhi);
    view.setUint32(i * 8 + 4, nlo);
    const table = node.l2Cache.get(l2);
    for (let at = 0; at < cs; at += entryBytes) {
      const ehi = table.view.getUint32(at), elo = table.view.getUint32(at + 4);
      if (ehi & HI_COMPRESSED) continue;
      const host = entryOffset(ehi, elo);
      if (host <= 0) continue;
      const copied = node.refcounts.get(host / cs) === 1;
      const want = copied ? (ehi | HI_COPIED) >>> 0 : (ehi & ~HI_COPIED) >>> 0;
      if (want !== ehi) {
        table.view.setUint32(at, want);
        table.dirty = true;
      }
    }
  }
  node.flushMetadata();
  node.file.writeAt(node.header.l1TableOffset, l1);
  node.barrier();
}

/** The L1 table with every COPIED flag cleared (inactive tables carry none). */
function withoutCopied(l1: Uint8Array): Uint8Array {
  const copy = l1.slice();
  const view = new DataView(copy.buffer);
  for (let i = 0; i < copy.length / 8; i++) {
    view.setUint32(i * 8, (view.getUint32(i * 8) & ~HI_COPIED) >>> 0);
  }
  return copy;
}

/** Write `entries` as the new snapshot table, switch the header to it, free the old one. */
function writeSnapshotTable(node: Qcow2Node, entries: SnapshotEntry[]): void {
  const cs = node.clusterSize;
  const bytes = serializeSnapshotTable(entries);
  if (bytes.length > MAX_SNAPSHOT_TABLE_BYTES) {
    throw new BlockError("unsupported", "Snapshot table would exceed 64 MiB", {
      path: node.filename,
    });
  }
  const h = node.header;
  const oldOffset = h.snapshotsOffset,
    oldBytes = node.snapshots.bytes,
    hadTable = h.nbSnapshots > 0;
  let offset = 0;
  if (entries.length > 0) {
    offset = node.refcounts.allocate(Math.ceil(bytes.length / cs));
    node.refcounts.flush();
    node.file.writeAt(offset, bytes);
    node.barrier();
  }
  h.snapshotsOffset = offset;
  h.nbSnapshots = entries.length;
  node.writeHeader();
  node.setSnapshots({ entries, bytes: bytes.length });
  if (hadTable && oldBytes > 0) {
    node.refcounts.change(oldOffset / cs, Math.ceil(oldBytes / cs), -1);
    node.refcounts.flush();
    node.barrier();
  }
}

function checkName(node: Qcow2Node, name: string): void {
  const bytes = new TextEncoder().encode(name).length;
  if (bytes === 0) {
    throw new BlockError("invalid-argument", "Snapshot name must not be empty", {
      path: node.filename,
    });
  }
  if (bytes > MAX_SNAPSHOT_NAME) {
    throw new BlockError(
      "invalid-argument",
      `Snapshot name is longer than ${MAX_SNAPSHOT_NAME} bytes`,
      {
        path: node.filename,
      },
    );
  }
}

/**
 * Create an internal snapshot of the current state.
 *
 * @throws {BlockError} `invalid-argument` for a bad or duplicate name, `unsupported` at limits
 */
export function createSnapshot(
  node: Qcow2Node,
  name: string,
  now = Date.now(),
): Promise<SnapshotEntry> {
  return node.exclusive(() => {
    checkName(node, name);
    const entries = node.snapshots.entries;
    if (entries.some((e) => e.name === name)) {
      throw new BlockError("invalid-argument", `Snapshot with name '${name}' already exists`, {
        path: node.filename,
      });
    }
    if (entries.length >= MAX_SNAPSHOTS) {
      throw new BlockError("unsupported", `Too many snapshots (at most ${MAX_SNAPSHOTS})`, {
        path: node.filename,
      });
    }
    node.flushMetadata();
    const cs = node.clusterSize;
    const active = node.l1Table;
    checkHeadroom(node, active);
    // The snapshot's own L1 copy, then +1 on all it reaches, then the table and the header.
    const l1Copy = withoutCopied(active);
    let l1Offset = 0;
    if (l1Copy.length > 0) {
      l1Offset = node.refcounts.allocate(Math.ceil(l1Copy.length / cs));
      node.file.writeAt(l1Offset, l1Copy);
    }
    adjustReach(node, active, 1);
    const extra = new Uint8Array(24);
    const ev = new DataView(extra.buffer);
    ev.setBigUint64(8, BigInt(node.size));
    const entry: SnapshotEntry = {
      l1TableOffset: l1Offset,
      l1Size: node.header.l1Size,
      id: nextSnapshotId(entries),
      name,
      dateSec: Math.floor(now / 1000),
      dateNsec: (now % 1000) * 1_000_000,
      vmClockNsec: 0n,
      vmStateSize: 0,
      extra,
      diskSize: node.size,
    };
    // Everything the active L1 reaches is now shared: COPIED goes before the snapshot exists,
    // so no cut leaves an in-place-writable cluster that a snapshot also owns.
    rebuildCopied(node);
    writeSnapshotTable(node, [...entries, entry]);
    return Promise.resolve(entry);
  });
}

/**
 * Revert the active state to a snapshot (found by ID or name); the virtual size follows it.
 *
 * @throws {BlockError} `not-found` when no snapshot matches
 */
export function applySnapshot(node: Qcow2Node, key: string): Promise<void> {
  return node.exclusive(() => {
    const entries = node.snapshots.entries;
    const index = findSnapshot(entries, key, "id-or-name");
    const sn = entries[index];
    if (sn === undefined) {
      throw new BlockError("not-found", `Failed to load snapshot: No such file or directory`, {
        path: node.filename,
      });
    }
    if (sn.l1Size * 8 > MAX_L1_BYTES) {
      throw new BlockError("invalid-format", "Snapshot L1 table too large", {
        path: node.filename,
      });
    }
    node.flushMetadata();
    const cs = node.clusterSize;
    const snL1 = new Uint8Array(sn.l1Size * 8);
    node.file.readAt(sn.l1TableOffset, snL1);
    checkHeadroom(node, snL1);
    adjustReach(node, snL1, 1);
    const old = node.l1Table.slice();
    const h = node.header;
    const size = sn.diskSize ?? h.size;
    const needed = Math.max(sn.l1Size, Math.ceil(size / (cs * (cs / (node.extendedL2 ? 16 : 8)))));
    if (needed <= h.l1Size) {
      // Same place and size: entries past the snapshot's table become unallocated.
      const active = new Uint8Array(h.l1Size * 8);
      active.set(snL1);
      node.file.writeAt(h.l1TableOffset, active);
      node.barrier();
      h.size = size;
      node.writeHeader();
      node.replaceL1(active);
    } else {
      // A larger table than the current one: new clusters, then the header, then free the old.
      const active = new Uint8Array(needed * 8);
      active.set(snL1);
      const offset = node.refcounts.allocate(Math.ceil(active.length / cs));
      node.refcounts.flush();
      node.file.writeAt(offset, active);
      node.barrier();
      const oldOffset = h.l1TableOffset, oldClusters = Math.ceil(h.l1Size * 8 / cs);
      h.l1TableOffset = offset;
      h.l1Size = needed;
      h.size = size;
      node.writeHeader();
      if (oldClusters > 0) node.refcounts.change(oldOffset / cs, oldClusters, -1);
      node.replaceL1(active);
    }
    node.l2Cache.clear();
    adjustReach(node, old, -1);
    rebuildCopied(node);
    return Promise.resolve();
  });
}

/**
 * Delete a snapshot (found by name, as qemu-img does): the table first, then its references.
 *
 * @throws {BlockError} `not-found` when no snapshot has that name
 */
export function deleteSnapshot(node: Qcow2Node, name: string): Promise<void> {
  return node.exclusive(() => {
    const entries = node.snapshots.entries;
    const index = findSnapshot(entries, name, "name");
    const sn = entries[index];
    if (sn === undefined) {
      throw new BlockError("not-found", "snapshot not found", { path: node.filename });
    }
    node.flushMetadata();
    const cs = node.clusterSize;
    const l1 = new Uint8Array(sn.l1Size * 8);
    node.file.readAt(sn.l1TableOffset, l1);
    writeSnapshotTable(node, entries.filter((_, i) => i !== index));
    adjustReach(node, l1, -1);
    if (sn.l1Size > 0) {
      node.refcounts.change(sn.l1TableOffset / cs, Math.ceil(sn.l1Size * 8 / cs), -1);
      node.refcounts.flush();
    }
    rebuildCopied(node);
    return Promise.resolve();
  });
}
