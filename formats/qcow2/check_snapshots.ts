/**
 * The snapshot table part of the check (QEMU keeps it apart from the refcount part): the table read
 * from what the header says now (qcow2_check_read_snapshot_table), overhanging snapshots and
 * incomplete v3 entries counted, and with `-r all` the whole table written anew
 * (qcow2_check_fix_snapshot_table).
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import type { CheckFix, CheckHost, CheckReport } from "./check_host.ts";
import {
  MAX_SNAPSHOT_TABLE_BYTES,
  readSnapshotTable,
  serializeSnapshotTable,
  type SnapshotEntry,
} from "./snapshot.ts";

const MAX_SNAPSHOTS = 65536;
const SNAPSHOT_HEADER_BYTES = 40;
/** strerror of the errnos the snapshot table check fails with. */
const STRERROR: Record<number, string> = {
  5: "Input/output error",
  22: "Invalid argument",
  27: "File too large",
};

/** The snapshot table part of a check (QEMU keeps it apart from the refcount part). */
export interface SnapshotCheck {
  corruptions: number;
  corruptionsFixed: number;
  checkErrors: number;
}

function report(res: CheckReport, line: string): void {
  (res.reported ??= []).push(res.messages.length);
  res.messages.push(line);
}

/**
 * QEMU's qcow2_check_read_snapshot_table: read the table from what the header says now, in repair
 * mode with -r all (overhanging snapshots are cut off at once, with the header's count; too much
 * extra data is dropped when the table is rewritten after the refcount check), and count v3
 * entries without a disk size. Returns undefined when the table cannot be read: the check fails.
 */
export function readSnapshotsForCheck(
  node: CheckHost,
  res: CheckReport,
  fix: CheckFix,
): SnapshotCheck | undefined {
  const snap: SnapshotCheck = { corruptions: 0, corruptionsFixed: 0, checkErrors: 0 };
  const pointer = new Uint8Array(12);
  node.file.readAt(60, pointer);
  const pv = new DataView(pointer.buffer);
  let count = pv.getUint32(0);
  const offset = Number(pv.getBigUint64(4));
  const h = node.header;
  const fail = (errno: number): undefined => {
    snap.checkErrors++;
    res.checkErrors += snap.checkErrors;
    res.failed = STRERROR[errno] ?? `errno ${errno}`;
    // What was not read is not there.
    h.nbSnapshots = 0;
    h.snapshotsOffset = 0;
    node.setSnapshots({ entries: [], bytes: 0 });
    return undefined;
  };
  let reduced = 0;
  if (count > MAX_SNAPSHOTS && fix.errors) {
    res.messages.push(`Discarding ${count - MAX_SNAPSHOTS} overhanging snapshots`);
    reduced += count - MAX_SNAPSHOTS;
    count = MAX_SNAPSHOTS;
  }
  // qcow2_validate_table
  if (count > MAX_SNAPSHOTS) {
    report(res, "ERROR snapshot table too large");
    res.messages.push(
      `You can force-remove all ${
        count - MAX_SNAPSHOTS
      } overhanging snapshots with qemu-img check -r all`,
    );
    return fail(27);
  }
  if (
    offset % node.clusterSize !== 0 ||
    offset > Number.MAX_SAFE_INTEGER - count * SNAPSHOT_HEADER_BYTES
  ) {
    report(res, "ERROR snapshot table offset invalid");
    return fail(22);
  }
  let table;
  try {
    table = readSnapshotTable(node.file, offset, count, node.filename, {
      repair: fix.errors ?? false,
      say: (line) => res.messages.push(line),
    });
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    report(res, `ERROR failed to read the snapshot table: ${e.message}`);
    return fail(e.context.errno ?? 5);
  }
  h.nbSnapshots = table.entries.length;
  h.snapshotsOffset = offset;
  node.setSnapshots({ entries: table.entries, bytes: table.bytes });
  reduced += table.reduced;
  snap.corruptions += reduced + table.extraDropped;
  if (reduced > 0) {
    // The header's count first: the refcount check counts what the header describes (and frees
    // the rest as leaks).
    const nb = new Uint8Array(4);
    new DataView(nb.buffer).setUint32(0, table.entries.length);
    node.file.writeAt(60, nb);
    node.file.flush();
    snap.corruptionsFixed += reduced;
    snap.corruptions -= reduced;
  }
  // v3 entries need extra data through the disk size.
  if (h.version >= 3) {
    table.entries.forEach((e, i) => {
      if (e.extra.length < 16) {
        snap.corruptions++;
        res.messages.push(
          `${fix.errors ? "Repairing" : "ERROR"} snapshot table entry ${i} is incomplete`,
        );
      }
    });
  }
  return snap;
}

/**
 * An entry as QEMU writes it back (qcow2_write_snapshots): at least 24 bytes of extra data, the
 * 64-bit VM state size, the disk size (the image's when the entry had none) and icount (-1 when
 * it had none), then any unknown extra data.
 */
function completeEntry(e: SnapshotEntry, diskSize: number): SnapshotEntry {
  const old = new DataView(e.extra.buffer, e.extra.byteOffset, e.extra.byteLength);
  const vmState = e.extra.length >= 8 ? old.getBigUint64(0) : BigInt(e.vmStateSize);
  const size = e.extra.length >= 16 ? old.getBigUint64(8) : BigInt(diskSize);
  const icount = e.extra.length >= 24 ? old.getBigUint64(16) : 0xffffffffffffffffn;
  const extra = new Uint8Array(Math.max(24, e.extra.length));
  extra.set(e.extra);
  const v = new DataView(extra.buffer);
  v.setBigUint64(0, vmState);
  v.setBigUint64(8, size);
  v.setBigUint64(16, icount);
  return {
    ...e,
    vmStateSize: vmState <= 0xffffffffn ? Number(vmState) : 0,
    extra,
    diskSize: Number(size),
  };
}

/**
 * QEMU's qcow2_check_fix_snapshot_table: with -r all, snapshot table corruptions are repaired by
 * writing the whole table anew (qcow2_write_snapshots) — into newly allocated clusters, the
 * header switched to it, the old table freed.
 */
export function fixSnapshotTable(
  node: CheckHost,
  res: CheckReport,
  snap: SnapshotCheck,
  fix: CheckFix,
) {
  if (snap.corruptions === 0 || !fix.errors) return;
  const cs = node.clusterSize;
  const entries = node.snapshots.entries.map((e) => completeEntry(e, node.size));
  const padded = serializeSnapshotTable(entries);
  // QEMU's snapshots_size: each entry starts 8-aligned, the last one is not padded.
  const enc = new TextEncoder();
  let size = 0;
  for (const e of entries) {
    size = Math.ceil(size / 8) * 8 + SNAPSHOT_HEADER_BYTES + e.extra.length +
      enc.encode(e.id).length + enc.encode(e.name).length;
  }
  if (size > MAX_SNAPSHOT_TABLE_BYTES) {
    // qcow2_write_snapshots fails with EFBIG, and so does the whole check.
    snap.checkErrors++;
    res.messages.push("ERROR failed to update snapshot table: File too large");
    res.failed = STRERROR[27]!;
    return;
  }
  const rc = node.refcounts;
  const clusters = Math.ceil(size / cs);
  const offset = clusters === 0 ? 0 : rc.allocate(clusters);
  rc.flush();
  node.barrier();
  if (size > 0) node.file.writeAt(offset, padded.subarray(0, size));
  node.barrier();
  const h = node.header;
  const oldOffset = h.snapshotsOffset, oldBytes = node.snapshots.bytes;
  const pointer = new Uint8Array(12);
  const pv = new DataView(pointer.buffer);
  pv.setUint32(0, entries.length);
  pv.setBigUint64(4, BigInt(offset));
  node.file.writeAt(60, pointer);
  node.file.flush();
  h.nbSnapshots = entries.length;
  h.snapshotsOffset = offset;
  node.setSnapshots({ entries, bytes: size });
  if (oldBytes > 0) {
    const first = Math.floor(oldOffset / cs);
    const count = Math.ceil((oldOffset + oldBytes) / cs) - first;
    rc.change(first, count, -1);
    rc.flush();
    // QCOW2_DISCARD_SNAPSHOT passes the free down to the file.
    for (let c = first; c < first + count; c++) {
      if (rc.get(c) === 0) node.file.punchHole(c * cs, cs);
    }
  }
  node.barrier();
  snap.corruptionsFixed += snap.corruptions;
  snap.corruptions = 0;
}
