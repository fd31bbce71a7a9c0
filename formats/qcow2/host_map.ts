/**
 * What every cluster of a qcow2 image's host file holds: the header, a table (L1, L2, refcount
 * table or block, snapshot table or inactive L1, bitmap structures), guest data, compressed
 * data — or nothing, free (refcount 0) or leaked (a refcount but no reference). The references are
 * found as `qemu-img check` finds them ({@linkcode visitReferences}), so a map and a check agree.
 *
 * @module
 */
import type { Qcow2Node } from "./qcow2.ts";
import { type HostReference, visitReferences } from "./check_references.ts";

/**
 * What a host cluster holds. Metadata first; a cluster met under several roles (a corrupt image)
 * keeps the first in this order.
 */
export const HOST_CLASSES = [
  "header",
  "refcount-table",
  "refcount-block",
  "l1",
  "snapshot-table",
  "snapshot-l1",
  "l2",
  "bitmap",
  "compressed",
  "data",
  "leaked",
  "free",
] as const;

/** One of {@linkcode HOST_CLASSES}. */
export type HostClass = typeof HOST_CLASSES[number];

/** The classes that are image metadata (everything but data, compressed, leaked and free). */
export const HOST_METADATA: readonly HostClass[] = HOST_CLASSES.slice(0, 8);

const CODE = Object.fromEntries(HOST_CLASSES.map((c, i) => [c, i])) as Record<HostClass, number>;
const UNSEEN = 255;

/** The host file of a qcow2 image, cluster by cluster. */
export interface HostClusterMap {
  clusterSize: number;
  /** Bytes of the host file. */
  fileSize: number;
  /** Host clusters (the last one may be partial). */
  clusters: number;
  /** Per host cluster, the index of its class in {@linkcode HOST_CLASSES}. */
  classes: Uint8Array;
  /** Host clusters per class. */
  counts: Record<HostClass, number>;
  /** Host clusters met under more than one role (corruption: metadata over data, …). */
  conflicts: number;
  /** Corruptions the counting pass met (as qemu-img check counts them before comparing). */
  corruptions: number;
}

/**
 * Classify every cluster of `node`'s host file (the top layer only; backing files have their own).
 *
 * @example
 * ```ts
 * import { createImage, openImage } from "../open.ts";
 * import { Qcow2Node } from "./qcow2.ts";
 * import { qcow2HostMap } from "./host_map.ts";
 * const path = Deno.makeTempFileSync({ suffix: ".qcow2" });
 * await createImage(path, "qcow2", 1 << 20);
 * const node = await openImage(path);
 * await node.write(0, new Uint8Array(65536).fill(1));
 * const map = qcow2HostMap(node as Qcow2Node);
 * await node.close();
 * Deno.removeSync(path);
 * if (map.counts.header !== 1 || map.counts.data !== 1 || map.counts.l2 !== 1) {
 *   throw new Error("host map");
 * }
 * ```
 */
export function qcow2HostMap(node: Qcow2Node): HostClusterMap {
  const cs = node.clusterSize;
  const fileSize = node.file.size();
  const clusters = Math.ceil(fileSize / cs);
  const classes = new Uint8Array(clusters).fill(UNSEEN);
  let conflicts = 0;
  const report = visitReferences(node, (offset, bytes, what: HostReference) => {
    const code = CODE[what];
    const first = Math.floor(offset / cs);
    const last = Math.min(clusters - 1, Math.floor((offset + bytes - 1) / cs));
    for (let c = first; c <= last; c++) {
      const seen = classes[c]!;
      if (seen === UNSEEN) {
        classes[c] = code;
        continue;
      }
      // Met twice in one role is normal (data and L2 tables shared with snapshots, compressed
      // clusters packed into one host cluster); in two roles it is not.
      if (seen === code) continue;
      conflicts++;
      if (code < seen) classes[c] = code;
    }
  });
  for (let c = 0; c < clusters; c++) {
    if (classes[c] !== UNSEEN) continue;
    let refcount = 0;
    try {
      refcount = node.refcounts.get(c);
    } catch {
      // A broken refcount block: the cluster's refcount is unknown; shown as free.
    }
    classes[c] = refcount > 0 ? CODE.leaked : CODE.free;
  }
  const counts = Object.fromEntries(HOST_CLASSES.map((c) => [c, 0])) as Record<HostClass, number>;
  for (const code of classes) counts[HOST_CLASSES[code]!]++;
  return {
    clusterSize: cs,
    fileSize,
    clusters,
    classes,
    counts,
    conflicts,
    corruptions: report.corruptions,
  };
}
