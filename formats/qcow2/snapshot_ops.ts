/**
 * Internal snapshots: create, apply and delete. Each is one atomic switch (./switch.ts): the new
 * state — active L1 and the L2 copies whose COPIED flags change, refcount blocks, refcount and
 * snapshot tables — is written beside the old one and one header write changes over, so a crash
 * at any write leaves the old or the new image, never a COPIED flag that disagrees with its
 * refcount (which qemu-img check counts as corruption either way round).
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
import { switchState, Transition } from "./switch.ts";
import { HI_COPIED } from "./tables.ts";

/** Longest snapshot name or ID (QEMU keeps both under 256 bytes in its snapshot info). */
export const MAX_SNAPSHOT_NAME = 255;

/** The L1 table with every COPIED flag cleared (inactive tables carry none). */
function withoutCopied(l1: Uint8Array): Uint8Array {
  const copy = l1.slice();
  const view = new DataView(copy.buffer);
  for (let i = 0; i < copy.length / 8; i++) {
    view.setUint32(i * 8, (view.getUint32(i * 8) & ~HI_COPIED) >>> 0);
  }
  return copy;
}

/** Refuse a snapshot table past QEMU's limit before anything is written. */
function checkTableSize(node: Qcow2Node, entries: SnapshotEntry[]): void {
  if (serializeSnapshotTable(entries).length > MAX_SNAPSHOT_TABLE_BYTES) {
    throw new BlockError("unsupported", "Snapshot table would exceed 64 MiB", {
      path: node.filename,
    });
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
    const h = node.header;
    const active = node.l1Table.slice();
    const extra = new Uint8Array(24);
    const ev = new DataView(extra.buffer);
    ev.setBigUint64(8, BigInt(node.size));
    // The snapshot keeps the current L1 table (and the L2 tables it reaches); the active state
    // moves to a new L1 table and copies of the tables whose COPIED flags clear, in one switch.
    const entry: SnapshotEntry = {
      l1TableOffset: h.l1TableOffset,
      l1Size: h.l1Size,
      id: nextSnapshotId(entries),
      name,
      dateSec: Math.floor(now / 1000),
      dateNsec: (now % 1000) * 1_000_000,
      vmClockNsec: 0n,
      vmStateSize: 0,
      extra,
      diskSize: node.size,
    };
    const next = [...entries, entry];
    checkTableSize(node, next);
    const t = new Transition(node);
    t.walk(active, 1);
    const oldOffset = h.l1TableOffset;
    const stripped = withoutCopied(active);
    switchState(node, t, {
      l1: stripped,
      move: "keep",
      snapshots: next,
      size: node.size,
      // Now the snapshot's: inactive tables carry no COPIED flags (harmless either way).
      after: () => {
        if (stripped.length > 0) node.file.writeAt(oldOffset, stripped);
      },
    });
    return Promise.resolve(entry);
  });
}

/**
 * A snapshot's L1 table as QEMU validates it before use (qcow2_validate_table, "Snapshot L1
 * table"): at most 32 MiB, cluster-aligned, inside what a host offset can be.
 */
function checkSnapshotL1(node: Qcow2Node, sn: SnapshotEntry): void {
  if (sn.l1Size * 8 > MAX_L1_BYTES) {
    throw new BlockError("invalid-format", "Snapshot L1 table too large", { path: node.filename });
  }
  if (sn.l1TableOffset % node.clusterSize !== 0 || !Number.isSafeInteger(sn.l1TableOffset)) {
    throw new BlockError("invalid-format", "Snapshot L1 table offset invalid", {
      path: node.filename,
    });
  }
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
    checkSnapshotL1(node, sn);
    node.flushMetadata();
    const cs = node.clusterSize;
    const snL1 = new Uint8Array(sn.l1Size * 8);
    node.file.readAt(sn.l1TableOffset, snL1);
    const h = node.header;
    const size = sn.diskSize ?? h.size;
    const needed = Math.max(sn.l1Size, Math.ceil(size / (cs * (cs / (node.extendedL2 ? 16 : 8)))));
    // Entries past the snapshot's table become unallocated; the table keeps at least its size.
    const l1 = new Uint8Array(Math.max(needed, h.l1Size) * 8);
    l1.set(withoutCopied(snL1));
    const t = new Transition(node);
    t.walk(snL1, 1);
    t.walk(node.l1Table, -1);
    switchState(node, t, { l1, move: "free", size });
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
    checkSnapshotL1(node, sn);
    node.flushMetadata();
    const l1 = new Uint8Array(sn.l1Size * 8);
    node.file.readAt(sn.l1TableOffset, l1);
    const t = new Transition(node);
    t.walk(l1, -1);
    t.addTable(sn.l1TableOffset, sn.l1Size * 8, -1);
    switchState(node, t, {
      l1: node.l1Table.slice(),
      snapshots: entries.filter((_, i) => i !== index),
      size: node.size,
    });
    return Promise.resolve();
  });
}
