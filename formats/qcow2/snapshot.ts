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
  /** Host offset of the snapshot's L1 table. */
  l1TableOffset: number;
  /** Entries in the snapshot's L1 table. */
  l1Size: number;
  /** The snapshot's ID (qemu-img snapshot -l's first column; `1`, `2`, …). */
  id: string;
  /** The snapshot's name (tag). */
  name: string;
  /** When it was taken: seconds since the epoch. */
  dateSec: number;
  /** Nanoseconds within `dateSec`. */
  dateNsec: number;
  /** The guest clock when it was taken, in nanoseconds (0 for disk-only snapshots). */
  vmClockNsec: bigint;
  /** Bytes of VM state saved with it (0 for disk-only snapshots). */
  vmStateSize: number;
  /** Extra data as stored (QEMU 7.2 writes 24 bytes: vm_state_size_large, disk_size, icount). */
  extra: Uint8Array;
  /** Guest disk size recorded in the extra data, when present. */
  diskSize?: number;
}

/** The table's entries and its on-disk size. */
export interface SnapshotTable {
  /** The entries in table order. */
  entries: SnapshotEntry[];
  /**
   * Bytes from the table's offset to the end of its last entry, as QEMU counts them
   * (`snapshots_size`): the last entry unpadded, oversized extra data counted as stored.
   */
  bytes: number;
}

/** How {@linkcode readSnapshotTable} reads; the default is QEMU's qcow2_read_snapshots. */
export interface SnapshotReadOptions {
  /**
   * QEMU's repair mode (qemu-img check -r all): extra data past 1024 bytes is dropped and
   * snapshots past the 64 MiB limit are cut off instead of failing; each is announced through
   * `say` as qemu-img does.
   */
  repair?: boolean;
  /** Lines qemu-img prints while repairing ("Discarding …"). */
  say?: (line: string) => void;
  /**
   * Refuse a snapshot whose L1 table is too large or unaligned. QEMU checks that where it uses
   * the table (load, apply, delete); vstor refuses at open unless checking, where the check
   * reports it as a corruption.
   */
  validateL1?: { clusterSize: number };
}

/** What a repairing read dropped. */
export interface SnapshotTableRead extends SnapshotTable {
  /** Snapshots cut off the end because the table was too big (QEMU's nb_clusters_reduced). */
  reduced: number;
  /** Entries whose extra data was cut to 1024 bytes (QEMU's extra_data_dropped). */
  extraDropped: number;
}

const EFBIG = 27;

/** A string as QEMU holds it: C strings end at the first NUL byte. */
function cString(dec: TextDecoder, bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return dec.decode(nul < 0 ? bytes : bytes.subarray(0, nul));
}

/**
 * Read `count` snapshot entries at `offset` as QEMU's qcow2_do_read_snapshots does, with its
 * messages and hints (a hint is the second line of the message).
 *
 * Past the end of the file the table reads as zeroes, as QEMU reads it; every length is bounded
 * (an entry by 16-bit name lengths and 1024 bytes of extra data, the table by 64 MiB).
 *
 * @throws {BlockError} `invalid-format` with `errno` EFBIG for too much extra data or a table
 *   past 64 MiB (without `repair`)
 */
export function readSnapshotTable(
  file: HostFile,
  offset: number,
  count: number,
  path: string,
  opts: SnapshotReadOptions = {},
): SnapshotTableRead {
  const result: SnapshotTableRead = { entries: [], bytes: 0, reduced: 0, extraDropped: 0 };
  if (count === 0) return result;
  if (count > MAX_SNAPSHOTS) {
    throw new BlockError("invalid-format", "Snapshot table too large", { path, errno: EFBIG });
  }
  const repair = opts.repair ?? false;
  const entries = result.entries;
  let at = offset;
  // QEMU's table_length: what the entries take with oversized extra data cut to 1024 bytes.
  let tableLength = 0;
  const fixed = new Uint8Array(40);
  const view = new DataView(fixed.buffer);
  const dec = new TextDecoder();
  for (let i = 0; i < count; i++) {
    const entryStart = at;
    tableLength = Math.ceil(tableLength / 8) * 8;
    at = Math.ceil(at / 8) * 8;
    file.readAt(at, fixed);
    at += 40;
    const idLen = view.getUint16(12), nameLen = view.getUint16(14);
    let extraSize = view.getUint32(36);
    const storedExtra = extraSize;
    if (extraSize > MAX_EXTRA_DATA) {
      if (!repair) {
        throw new BlockError(
          "invalid-format",
          `Too much extra metadata in snapshot table entry ${i}\n` +
            "You can force-remove this extra metadata with qemu-img check -r all",
          { path, errno: EFBIG },
        );
      }
      opts.say?.(
        `Discarding too much extra metadata in snapshot table entry ${i} (${extraSize} > ${MAX_EXTRA_DATA})`,
      );
      result.extraDropped++;
      extraSize = MAX_EXTRA_DATA;
    }
    const extra = new Uint8Array(extraSize);
    file.readAt(at, extra);
    at += storedExtra;
    const names = new Uint8Array(idLen + nameLen);
    file.readAt(at, names);
    at += idLen + nameLen;
    const entry: SnapshotEntry = {
      l1TableOffset: Number(view.getBigUint64(0)),
      l1Size: view.getUint32(8),
      id: cString(dec, names.subarray(0, idLen)),
      name: cString(dec, names.subarray(idLen)),
      dateSec: view.getUint32(16),
      dateNsec: view.getUint32(20),
      vmClockNsec: view.getBigUint64(24),
      vmStateSize: view.getUint32(32),
      extra,
    };
    if (opts.validateL1 !== undefined) {
      if (entry.l1Size * 8 > MAX_L1_BYTES) {
        throw new BlockError("invalid-format", "Snapshot L1 table too large", { path });
      }
      if (entry.l1TableOffset % opts.validateL1.clusterSize !== 0) {
        throw new BlockError("invalid-format", "Snapshot L1 table offset invalid", { path });
      }
    }
    if (extraSize >= 16) entry.diskSize = Number(new DataView(extra.buffer).getBigUint64(8));
    tableLength += 40 + extraSize + idLen + nameLen;
    if (tableLength > MAX_SNAPSHOT_TABLE_BYTES || at - offset > 0x7fffffff) {
      const over = count - i;
      if (!repair) {
        throw new BlockError(
          "invalid-format",
          "Snapshot table is too big\n" +
            `You can force-remove all ${over} overhanging snapshots with qemu-img check -r all`,
          { path, errno: EFBIG },
        );
      }
      opts.say?.(`Discarding ${over} overhanging snapshots (snapshot table is too big)`);
      result.reduced += over;
      // The rest of the table leaks; check -r all frees it.
      at = entryStart;
      break;
    }
    entries.push(entry);
  }
  result.bytes = at - offset;
  return result;
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

/** Bytes of `text` that fit a C buffer of `size` bytes with its NUL (QEMU's pstrcpy). */
function pstrcpy(text: string, size: number): string {
  const bytes = new TextEncoder().encode(text);
  return bytes.length < size ? text : new TextDecoder().decode(bytes.subarray(0, size - 1));
}

/**
 * A snapshot's ID and name as qemu-img lists them: copied into QEMUSnapshotInfo's `id_str[128]`
 * and `name[256]`, so cut to 127 and 255 bytes.
 */
export function listedNames(e: SnapshotEntry): { id: string; name: string } {
  return { id: pstrcpy(e.id, 128), name: pstrcpy(e.name, 256) };
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
