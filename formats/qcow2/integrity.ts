/**
 * Runtime integrity of a qcow2 image, as QEMU's qcow2_signal_corruption and
 * qcow2_check_metadata_overlap: an inconsistency found while serving a request marks the image
 * corrupt (v3 header bit) and makes a writable node unusable, and no write of data or of a new
 * table may land on existing metadata.
 *
 * @module
 */
import { BlockError } from "../../src/errors.ts";
import { INCOMPAT_CORRUPT } from "./header.ts";
import { type Qcow2State, writeHeader } from "./state.ts";

/** C's `%#x`: `0` for zero, else `0x` and lower-case hex digits. */
export function hexAlt(n: number): string {
  return n === 0 ? "0" : `0x${n.toString(16)}`;
}

/**
 * QEMU's qcow2_signal_corruption: on a writable node the corruption is fatal — one notice,
 * the header's corrupt bit (v3), and the node is unusable from then on; on a read-only node it
 * is reported once and reading goes on. Returns the error (EIO) for the request that found it.
 */
export function signalCorruption(s: Qcow2State, message: string, offset: number): BlockError {
  const fatal = !s.readOnly;
  const error = new BlockError("corrupt", message, { path: s.filename, offset, errno: 5 });
  if (s.signaled && (!fatal || s.corrupt)) return error;
  s.onCorruption(
    fatal
      ? `qcow2: Marking image as corrupt: ${message}; further corruption events will be suppressed`
      : `qcow2: Image is corrupt: ${message}; further non-fatal corruption events will be suppressed`,
  );
  s.signaled = true;
  if (fatal) {
    if (s.v3) {
      try {
        s.header.incompatibleFeatures |= BigInt(INCOMPAT_CORRUPT);
        writeHeader(s);
        s.file.flush();
      } catch {
        // The error we report matters more than the failed marking.
      }
    }
    s.corrupt = true;
    s.readOnly = true;
    s.unusable = true;
  }
  return error;
}

/** Refuse (and mark corrupt) a write of data or a new table onto existing metadata. */
export function checkOverlap(s: Qcow2State, host: number, length: number, isTable = false): void {
  const cs = s.clusterSize;
  const hit = (what: string) => {
    throw signalCorruption(s, `Preventing invalid write on metadata (overlaps with ${what})`, host);
  };
  if (host < cs) hit("qcow2_header");
  const end = host + length;
  const overlaps = (start: number, len: number) => start < end && host < start + len;
  const h = s.header;
  if (overlaps(h.l1TableOffset, h.l1Size * 8)) hit("active L1 table");
  if (overlaps(s.refcounts.tableOffset, s.refcounts.tableClusters * cs)) {
    hit("refcount table");
  }
  if (h.nbSnapshots > 0 && overlaps(h.snapshotsOffset, s.snapshots.bytes)) {
    hit("snapshot table");
  }
  for (const sn of s.snapshots.entries) {
    if (overlaps(sn.l1TableOffset, sn.l1Size * 8)) hit("inactive L1 table");
  }
  for (let c = Math.floor(host / cs); c * cs < end; c++) {
    if (s.refcounts.cache.peek(c * cs) !== undefined) hit("refcount block");
    if (!isTable && s.l2Cache.peek(c * cs) !== undefined) hit("active L2 table");
  }
}
