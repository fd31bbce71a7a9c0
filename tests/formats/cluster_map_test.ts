import assert from "node:assert/strict";
import { join } from "node:path";
import {
  addToCells,
  cellRange,
  imageClusterMap,
  majorityOf,
  newCellGrid,
} from "../../formats/cluster_map.ts";
import { createImage, openImage } from "../../formats/open.ts";
import { HOST_CLASSES, qcow2HostMap } from "../../formats/qcow2/host_map.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import { checkImage } from "../../formats/qcow2/check.ts";
import { main } from "../../src/cli/main.ts";

const dir = Deno.makeTempDirSync({ prefix: "vstor_cluster_map_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
const CS = 65536;

const count = (map: { classes: string[]; counts: number[] }, cls: string) =>
  map.counts[map.classes.indexOf(cls)] ?? 0;

Deno.test("cell grids split clusters evenly, count across cell edges and break ties to the first class", () => {
  const grid = newCellGrid(100, 3, 16);
  assert.deepEqual([grid.unit, grid.cells], [7, 15]);
  assert.deepEqual(cellRange(grid, 14), { first: 98, count: 2 });
  addToCells(grid, 5, 10, 2); // clusters 5–14: cells 0 (2), 1 (7), 2 (1)
  addToCells(grid, 0, 5, 1);
  assert.deepEqual([...grid.counts.subarray(0, 9)], [0, 5, 2, 0, 0, 7, 0, 0, 1]);
  assert.deepEqual([majorityOf(grid, 0), majorityOf(grid, 1), majorityOf(grid, 3)], [1, 2, 0]);
  assert.throws(() => newCellGrid(10, 3, 0), RangeError);
});

Deno.test("a cluster split between data and holes counts as the class with most of its bytes", async () => {
  const path = join(dir, "split.raw");
  await createImage(path, "raw", 4 * CS);
  const node = await openImage(path, { format: "raw" });
  await node.write(0, new Uint8Array(4096).fill(1)); // cluster 0: 4 KiB data, 60 KiB hole
  await node.write(CS, new Uint8Array(40960).fill(1)); // cluster 1: 40 KiB data, 24 KiB hole
  const { guest, host } = await imageClusterMap(node);
  await node.close();
  assert.equal(host, undefined);
  assert.deepEqual([count(guest, "data"), count(guest, "zero")], [1, 3]);
  assert.deepEqual([...guest.counts], [1, 3, 0, 0]);
  assert.equal(majorityOf(guest.cells, 0), guest.classes.indexOf("zero"));
  assert.equal(majorityOf(guest.cells, 1), guest.classes.indexOf("data"));
});

Deno.test("subclusters of an extended-L2 cluster count by bytes, and the top's data runs are fragmentation", async () => {
  const path = join(dir, "ext.qcow2");
  await createImage(path, "qcow2", 16 * CS, { extendedL2: true });
  const node = await openImage(path);
  await node.write(3 * CS, new Uint8Array(CS).fill(3)); // first host data cluster
  await node.write(0, new Uint8Array(2048).fill(1)); // 1 of 32 subclusters: mostly unallocated
  await node.write(CS, new Uint8Array(40960).fill(2)); // 20 of 32: data
  await node.write(2 * CS, new Uint8Array(CS).fill(2));
  const { guest, host } = await imageClusterMap(node);
  await node.close();
  assert.deepEqual(
    [count(guest, "data"), count(guest, "unallocated")],
    [3, 13],
  );
  // Guest clusters 0–3 on host clusters B, C, D, A: pairs (0,1), (1,2) are consecutive on the
  // host, (2,3) is not; cluster 0's data counts with its partial run.
  assert.equal(guest.fragmentation.discontiguousPairs, 1);
  assert.equal(guest.fragmentation.hostRuns, 2);
  assert.equal(host?.counts.data, 4);
});

Deno.test("the host map names snapshot, bitmap and leaked clusters, and agrees with check", async () => {
  const path = join(dir, "host.qcow2");
  const quiet = { stdout: () => {}, stderr: (s: string) => assert.fail(s) };
  assert.equal(await main(["create", "-q", "-f", "qcow2", path, "4M"], quiet), 0);
  let node = await openImage(path);
  await node.write(0, new Uint8Array(2 * CS).fill(1));
  await node.close();
  assert.equal(await main(["snapshot", "-c", "s1", path], quiet), 0);
  assert.equal(await main(["bitmap", "--add", path, "b0"], quiet), 0);
  node = await openImage(path);
  await node.write(0, new Uint8Array(CS).fill(2)); // copy-on-write away from the snapshot
  await node.close();
  node = await openImage(path);
  assert.ok(node instanceof Qcow2Node);
  let map = qcow2HostMap(node);
  assert.equal(map.classes.length, map.clusters);
  assert.equal(Object.values(map.counts).reduce((a, b) => a + b, 0), map.clusters);
  assert.equal(map.counts.header, 1);
  assert.equal(map.counts["snapshot-table"], 1);
  assert.equal(map.counts["snapshot-l1"], 1);
  assert.ok(map.counts.bitmap >= 1, "the bitmap directory");
  // Two L2 tables (the active one copied on write), three data clusters (one only the snapshot's).
  assert.deepEqual([map.counts.l2, map.counts.data, map.counts.leaked], [2, 3, 0]);
  assert.deepEqual([map.conflicts, map.corruptions], [0, 0]);
  await node.close();
  // A cluster with a refcount and no reference is a leak, as check says.
  node = await openImage(path);
  assert.ok(node instanceof Qcow2Node);
  // The file may end inside a cluster (the bitmap directory is not padded).
  const spare = Math.ceil(node.file.size() / CS);
  node.file.truncate((spare + 1) * CS);
  node.refcounts.change(spare, 1, 1);
  node.flushMetadata();
  map = qcow2HostMap(node);
  assert.equal(map.counts.leaked, 1);
  assert.equal(HOST_CLASSES[map.classes[spare]!], "leaked");
  assert.equal(checkImage(node).leaks, 1);
  await node.close();
});
