/**
 * Consistency check and repair as qemu-img check does it (QEMU's qcow2_check_refcounts): count
 * every reference to every host cluster from the structures themselves into an in-memory refcount
 * table, check entries on the way, compare with the stored refcounts, check COPIED flags, and
 * repair what the mode allows — leaks, refcount errors, COPIED flags, unaligned preallocated
 * clusters, and a refcount structure rebuilt from the counts when a cluster in use has refcount 0.
 *
 * This file runs the parts in QEMU's order; each lives beside it: `check_host.ts` (what the check
 * needs, may repair and answers), `check_references.ts` (the reference walk),
 * `check_refcounts.ts` (the comparison, the repairs, COPIED flags), `check_rebuild.ts` (the
 * refcount structure rebuilt) and `check_snapshots.ts` (the snapshot table read and repaired).
 *
 * @module
 */
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from "./header.ts";
import { type CheckFix, type CheckHost, type CheckReport, newReport } from "./check_host.ts";
import { checkRefcounts } from "./check_refcounts.ts";
import { fixSnapshotTable, readSnapshotsForCheck } from "./check_snapshots.ts";

export type { CheckFix, CheckHost, CheckReport } from "./check_host.ts";
export { type HostReference, visitReferences } from "./check_references.ts";

/**
 * Check the image as qemu-img check does, repairing what `fix` allows. Caches are written out
 * first. With a repair, qemu-img then checks again without one; so do callers.
 *
 * @param node the image: a {@linkcode Qcow2Node}
 * @param fix what to repair (nothing by default)
 * @returns the counts and messages of qemu-img check
 *
 * @example
 * ```ts
 * import { MemoryFile } from "../../src/host/memory.ts";
 * import { checkImage } from "./check.ts";
 * import { createQcow2 } from "./create.ts";
 * import { Qcow2Node } from "./qcow2.ts";
 *
 * const file = new MemoryFile("disk.qcow2");
 * await createQcow2(file, 1 << 20);
 * const node = await Qcow2Node.open(file);
 * await node.write(0, new Uint8Array(4096).fill(1));
 * const report = checkImage(node);
 * if (report.corruptions + report.leaks + report.checkErrors !== 0) throw new Error("clean");
 * if (report.allocatedClusters !== 1) throw new Error("one cluster");
 * await node.close();
 * ```
 */
export function checkImage(node: CheckHost, fix: CheckFix = {}): CheckReport {
  node.flushMetadata();
  const res = newReport(node);
  const snap = readSnapshotsForCheck(node, res, fix);
  if (snap === undefined) return res;
  checkRefcounts(node, res, fix);
  if (res.failed === undefined) fixSnapshotTable(node, res, snap, fix);
  res.corruptions += snap.corruptions;
  res.corruptionsFixed += snap.corruptionsFixed;
  res.checkErrors += snap.checkErrors;
  if (
    (fix.leaks || fix.errors) && res.failed === undefined && res.checkErrors === 0 &&
    res.corruptions === 0
  ) {
    markClean(node);
  }
  return res;
}

/** After a successful repair the image is consistent: clear the dirty and corrupt bits. */
function markClean(node: CheckHost): void {
  const h = node.header;
  const bits = BigInt(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
  if ((h.incompatibleFeatures & bits) === 0n) return;
  h.incompatibleFeatures &= ~bits;
  node.writeHeader();
}

/**
 * Repair after a crash with lazy refcounts (QEMU runs check with both repairs on open): refcounts
 * are made to match the references, the structure rebuilt where a cluster in use has none.
 *
 * @returns the check's report (its lines are what QEMU prints while it repairs)
 * @throws {Error} when the image cannot be made consistent
 */
export function rebuildRefcounts(node: CheckHost): CheckReport {
  const report = checkImage(node, { leaks: true, errors: true });
  if (report.failed !== undefined || report.corruptions > 0 || report.checkErrors > 0) {
    throw new Error(
      `Could not repair the image's refcounts: ${report.messages.slice(-3).join("; ")}`,
    );
  }
  return report;
}
