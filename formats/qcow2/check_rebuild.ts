/**
 * The refcount structure rebuilt from the check's counts (QEMU's rebuild_refcount_structure), for
 * `-r all` when a cluster in use has refcount 0 or a refcount block is unusable.
 *
 * @module
 */
import { MAX_REFTABLE_BYTES } from "./header.ts";
import { refcountAccessors } from "./refcount.ts";
import type { CheckHost } from "./check_host.ts";
import type { Imrt } from "./check_references.ts";

/** QEMU's alloc_clusters_imrt: `count` free clusters from `*from` on, marked used; returns the first. */
function allocImrt(imrt: Imrt, count: number, from: { cluster: number }): number {
  let cluster = from.cluster, run = 0, firstGap = true;
  for (; cluster < imrt.length && run < count; cluster++) {
    if (imrt.get(cluster) === 0) {
      run++;
      if (firstGap) {
        from.cluster = cluster;
        firstGap = false;
      }
    } else {
      run = 0;
    }
  }
  if (run < count) imrt.grow(cluster + count - run);
  cluster -= run;
  for (let i = 0; i < count; i++) imrt.set(cluster + i, 1);
  return cluster;
}

/**
 * Write a new refcount structure built from `imrt` (QEMU's rebuild_refcount_structure): each
 * refblock at the first free cluster from its own range on, the table at the first free place;
 * one header write switches over. The old structure is leaked (a leak repair frees it).
 */
export function rebuildStructure(node: CheckHost, imrt: Imrt): void {
  const cs = node.clusterSize;
  const order = node.header.refcountOrder;
  const perBlock = 2 ** (node.clusterBits + 3 - order);
  const [, setRefcount] = refcountAccessors(order);
  const reftable: number[] = [];
  const writeBlocks = (first: number, endCluster: number): boolean => {
    let grown = false;
    const from = { cluster: 0 };
    let end = endCluster;
    for (let cluster = first; cluster < end; cluster++) {
      if (imrt.get(cluster) === 0) continue;
      const index = Math.floor(cluster / perBlock);
      const start = index * perBlock;
      let blockCluster = reftable[index] ?? 0;
      if (blockCluster === 0) {
        if (from.cluster < start) from.cluster = start;
        blockCluster = allocImrt(imrt, 1, from);
        if (blockCluster >= end) end = blockCluster + 1;
        if (reftable.length <= index) {
          const entries = Math.ceil((index + 1) * 8 / cs) * cs / 8;
          while (reftable.length < entries) reftable.push(0);
          grown = true;
        }
        reftable[index] = blockCluster;
      }
      const block = new Uint8Array(cs);
      const view = new DataView(block.buffer);
      for (let k = 0; k < perBlock; k++) {
        const v = imrt.get(start + k);
        if (v !== 0) setRefcount(view, block, k, v);
      }
      node.file.writeAt(blockCluster * cs, block);
      cluster = start + perBlock - 1;
    }
    return grown;
  };
  writeBlocks(0, imrt.length);
  let tableCluster = 0, tableClusters = 0;
  for (let grown = true; grown;) {
    tableClusters = Math.ceil(reftable.length * 8 / cs);
    if (tableClusters * cs > MAX_REFTABLE_BYTES) {
      throw new Error("refcount table would exceed 8 MiB");
    }
    tableCluster = allocImrt(imrt, tableClusters, { cluster: 0 });
    grown = writeBlocks(tableCluster, tableCluster + tableClusters);
  }
  const table = new Uint8Array(reftable.length * 8);
  const tv = new DataView(table.buffer);
  reftable.forEach((c, i) => tv.setBigUint64(i * 8, BigInt(c * cs)));
  node.file.writeAt(tableCluster * cs, table);
  node.file.flush();
  node.header.refcountTableOffset = tableCluster * cs;
  node.header.refcountTableClusters = tableClusters;
  node.writeHeader();
  node.reloadRefcounts();
}
