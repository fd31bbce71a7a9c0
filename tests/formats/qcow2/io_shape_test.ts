/**
 * What reaches the host: contiguous clusters are read in one host I/O, and extended-L2 writes
 * touch only the subclusters they cover.
 */
import assert from "node:assert/strict";
import { MemoryFile } from "../../../src/host/memory.ts";
import { borrowFile, type HostFile } from "../../../src/host/host_file.ts";
import { createQcow2 } from "../../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../../formats/qcow2/qcow2.ts";
import { checkImage } from "../../../formats/qcow2/check.ts";

/** A host file that records every data read and write. */
function recording(file: HostFile) {
  const reads: Array<[number, number]> = [];
  const writes: Array<[number, number]> = [];
  const host: HostFile = {
    ...borrowFile(file),
    readAt: (offset, dst) => {
      reads.push([offset, dst.length]);
      file.readAt(offset, dst);
    },
    writeAt: (offset, src) => {
      writes.push([offset, src.length]);
      file.writeAt(offset, src);
    },
    // Data through the asynchronous path is recorded the same way.
    readAtAsync: (offset, dst) => {
      reads.push([offset, dst.length]);
      file.readAt(offset, dst);
      return Promise.resolve();
    },
    writeAtAsync: (offset, src) => {
      writes.push([offset, src.length]);
      file.writeAt(offset, src);
      return Promise.resolve();
    },
  };
  return { host, reads, writes };
}

Deno.test("qcow2 reads a run of host-contiguous clusters with one host read", async () => {
  const file = new MemoryFile("contig.qcow2");
  await createQcow2(file, 8 << 20, { clusterSize: 4096 });
  const writer = await Qcow2Node.open(borrowFile(file), { cacheCleanInterval: 0 });
  const data = new Uint8Array(1 << 20).map((_, i) => i & 0xff);
  await writer.write(0, data);
  await writer.close();
  const { host, reads } = recording(file);
  const node = await Qcow2Node.open(host, { cacheCleanInterval: 0 });
  const back = new Uint8Array(1 << 20);
  await node.read(0, back); // loads the L2 table, then one data read
  reads.length = 0;
  await node.read(0, back);
  assert.deepEqual(back, data);
  assert.equal(reads.length, 1, `host reads: ${JSON.stringify(reads)}`);
  assert.equal(reads[0]![1], 1 << 20);
  await node.close();
});

Deno.test("an extended-L2 write into a fresh cluster writes only its subclusters and leaves the rest unallocated", async () => {
  const file = new MemoryFile("sub.qcow2");
  await createQcow2(file, 4 << 20, { clusterSize: 65536, extendedL2: true });
  const { host, writes } = recording(file);
  const node = await Qcow2Node.open(host, { cacheCleanInterval: 0 });
  // 2 KiB subclusters: write 1 KiB inside subcluster 3 of cluster 5.
  const guest = 5 * 65536 + 3 * 2048 + 512;
  await node.write(guest, new Uint8Array(1024).fill(0xab));
  const dataWrites = writes.filter(([, len]) => len !== 65536 && len !== 8 && len > 16);
  assert.deepEqual(dataWrites.map(([, len]) => len), [1024], JSON.stringify(writes));
  const st = await node.blockStatus(5 * 65536, 65536);
  assert.deepEqual([st.kind, st.length], ["unallocated", 3 * 2048]);
  const mid = await node.blockStatus(5 * 65536 + 3 * 2048, 65536);
  assert.deepEqual([mid.kind, mid.length], ["data", 2048]);
  const after = await node.blockStatus(5 * 65536 + 4 * 2048, 65536);
  assert.deepEqual([after.kind, after.length], ["unallocated", 65536 - 4 * 2048]);
  // A second write into an untouched subcluster of the same cluster goes in place.
  writes.length = 0;
  await node.write(5 * 65536 + 10 * 2048, new Uint8Array(2048).fill(0xcd));
  assert.deepEqual(writes.map(([, len]) => len), [2048]);
  const back = new Uint8Array(65536);
  await node.read(5 * 65536, back);
  const want = new Uint8Array(65536);
  want.fill(0xab, 3 * 2048 + 512, 3 * 2048 + 1536);
  want.fill(0xcd, 10 * 2048, 11 * 2048);
  assert.deepEqual(back, want);
  assert.deepEqual(checkImage(node).messages, []);
  await node.close();
});
