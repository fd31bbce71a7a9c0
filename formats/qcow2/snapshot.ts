/**
 * The internal snapshot table: read with bounds (QEMU's limits), so the driver knows which
 * clusters snapshots hold (overlap checks, refcount rebuilds).
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import type { HostFile } from "../../src/host/host_file.ts";
import { MAX_L1_BYTES, MAX_SNAPSHOTS } from "./header.ts";

/** Snapshot table at most 64 MiB (QEMU's QCOW_MAX_SNAPSHOTS_SIZE). */
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
export const MAX_EXTRA_DATA = 1024;

/** One snapshot table entry. */
export interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  vmStateSize: number;
  /** Extra data as stored (QEMU 7.2 writes 24 bytes: vm_state_size_large, disk_size, icount). */
  extra: Uint8Array;
  /** Guest disk size recorded in the extra data, when present. */
  diskSize?: number;
}

/** The table's entries and its on-disk size. */
export interface SnapshotTable {
  entries: SnapshotEntry[];
  bytes: number;
}

/**
 * Read `count` snapshot entries at `offset`, checking every length and offset against the file.
 *
 * @throws {BlockError} `invalid-format` naming what is out of bounds
 */
export function readSnapshotTable(
  file: HostFile,
  offset: number,
  count: number,
  clusterSize: number,
  path: string,
): SnapshotTable {
  if (count === 0) return { entries: [], bytes: 0 };
  if (count > MAX_SNAPSHOTS) throw new BlockError("invalid-format", "Too many snapshots", { path });
  const fileSize = file.size();
  const entries: SnapshotEntry[] = [];
  let at = offset;
  const fixed = new Uint8Array(40);
  const view = new DataView(fixed.buffer);
  const dec = new TextDecoder();
  for (let i = 0; i < count; i++) {
    if (at + 40 > fileSize || at - offset + 40 > MAX_SNAPSHOT_TABLE_BYTES) {
      throw new BlockError(
        "invalid-format",
        "Snapshot table is past the end of the file or too large",
        { path },
      );
    }
    file.readAt(at, fixed);
    const l1TableOffset = Number(view.getBigUint64(0));
    const l1Size = view.getUint32(8);
    const idLen = view.getUint16(12), nameLen = view.getUint16(14);
    const extraSize = view.getUint32(36);
    if (extraSize > MAX_EXTRA_DATA) {
      throw new BlockError(
        "invalid-format",
        `Snapshot ${i + 1} has too much extra data (${extraSize} bytes)`,
        { path },
      );
    }
    const varLen = extraSize + idLen + nameLen;
    if (at + 40 + varLen > fileSize) {
      throw new BlockError("invalid-format", "Snapshot table is past the end of the file", {
        path,
      });
    }
    const rest = new Uint8Array(varLen);
    file.readAt(at + 40, rest);
    if (l1Size * 8 > MAX_L1_BYTES) {
      throw new BlockError("invalid-format", `Snapshot L1 table too large`, { path });
    }
    if (
      l1TableOffset % clusterSize !== 0 || (l1Size > 0 && l1TableOffset + l1Size * 8 > fileSize)
    ) {
      throw new BlockError("invalid-format", `Snapshot L1 table offset invalid`, { path });
    }
    const extra = rest.slice(0, extraSize);
    const ev = new DataView(extra.buffer);
    const entry: SnapshotEntry = {
      l1TableOffset,
      l1Size,
      id: dec.decode(rest.subarray(extraSize, extraSize + idLen)),
      name: dec.decode(rest.subarray(extraSize + idLen)),
      dateSec: view.getUint32(16),
      dateNsec: view.getUint32(20),
      vmClockNsec: view.getBigUint64(24),
      vmStateSize: view.getUint32(32),
      extra,
    };
    if (extraSize >= 16) entry.diskSize = Number(ev.getBigUint64(8));
    entries.push(entry);
    at += 40 + varLen;
    at = Math.ceil(at / 8) * 8;
  }
  const bytes = at - offset;
  if (bytes > MAX_SNAPSHOT_TABLE_BYTES) {
    throw new BlockError("invalid-format", "Snapshot table too large", { path });
  }
  return { entries, bytes };
}

/** Serialize snapshot entries as QEMU lays them out (each entry padded to 8 bytes). */
export function serializeSnapshotTable(entries: SnapshotEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const parts = entries.map((e) => {
    const id = enc.encode(e.id), name = enc.encode(e.name);
    const len = Math.ceil((40 + e.extra.length + id.length + name.length) / 8) * 8;
    const out = new Uint8Array(len);
    const v = new DataView(out.buffer);
    v.setBigUint64(0, BigInt(e.l1TableOffset));
    v.setUint32(8, e.l1Size);
    v.setUint16(12, id.length);
    v.setUint16(14, name.length);
    v.setUint32(16, e.dateSec);
    v.setUint32(20, e.dateNsec);
    v.setBigUint64(24, e.vmClockNsec);
    v.setUint32(32, e.vmStateSize);
    v.setUint32(36, e.extra.length);
    out.set(e.extra, 40);
    out.set(id, 40 + e.extra.length);
    out.set(name, 40 + e.extra.length + id.length);
    return out;
  });
  const table = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    table.set(p, at);
    at += p.length;
  }
  return table;
}

/** The next snapshot ID QEMU would pick: one past the largest numeric ID. */
export function nextSnapshotId(entries: SnapshotEntry[]): string {
  let max = 0;
  for (const e of entries) {
    const n = /^[0-9]+$/.test(e.id) ? Number(e.id) : 0;
    if (n > max) max = n;
  }
  return String(max + 1);
}

/** Find a snapshot by ID or name (QEMU's lookup for apply), or by name only (for delete). */
export function findSnapshot(
  entries: SnapshotEntry[],
  key: string,
  by: "id-or-name" | "name",
): number {
  if (by === "id-or-name") {
    const byId = entries.findIndex((e) => e.id === key);
    if (byId >= 0) return byId;
  }
  return entries.findIndex((e) => e.name === key);
}
