import assert from "node:assert/strict";
import { MemoryFile } from "../../../src/host/memory.ts";
import { borrowFile } from "../../../src/host/host_file.ts";
import { isBlockError } from "../../../src/errors.ts";
import { createQcow2 } from "../../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../../formats/qcow2/qcow2.ts";
import { checkImage } from "../../../formats/qcow2/check.ts";

const open = (file: MemoryFile) => Qcow2Node.open(borrowFile(file), { cacheCleanInterval: 0 });

Deno.test("qcow2 grows past its L1 table: the L1 table moves, data stays, the image stays consistent", async () => {
  const file = new MemoryFile("grow.qcow2");
  // 512-byte clusters: one L2 table maps 32 KiB, so 1 MiB needs 32 L1 entries.
  await createQcow2(file, 64 << 10, { clusterSize: 512 });
  const node = await open(file);
  await node.write(1000, new Uint8Array(20_000).fill(9));
  const l1Before = node.header.l1TableOffset;
  await node.truncate(8 << 20);
  assert.equal(node.size, 8 << 20);
  assert.notEqual(node.header.l1TableOffset, l1Before);
  assert.ok(node.header.l1Size >= 256);
  await node.write((8 << 20) - 4096, new Uint8Array(4096).fill(5));
  const back = new Uint8Array(20_000);
  await node.read(1000, back);
  assert.ok(back.every((b) => b === 9));
  assert.deepEqual(checkImage(node).messages, []);
  await node.close();
  const again = await open(file);
  assert.equal(again.size, 8 << 20);
  const tail = new Uint8Array(4096);
  await again.read((8 << 20) - 4096, tail);
  assert.ok(tail.every((b) => b === 5));
  await again.close();
});

Deno.test("qcow2 shrinks over data as qemu-img resize --shrink does: the cut clusters are dropped", async () => {
  const file = new MemoryFile("shrink.qcow2");
  await createQcow2(file, 4 << 20, { clusterSize: 4096 });
  const node = await open(file);
  await node.write(0, new Uint8Array(8192).fill(1));
  await node.write(3 << 20, new Uint8Array(4096).fill(2));
  const before = file.size();
  await node.truncate(2 << 20);
  // The data cluster past the new end was the file's last: the host file is trimmed.
  assert.ok(file.size() < before, `file ${file.size()} not trimmed below ${before}`);
  assert.equal(node.size, 2 << 20);
  await assert.rejects(
    () => node.read(2 << 20, new Uint8Array(1)),
    (e) => isBlockError(e, "out-of-range"),
  );
  // Growing again shows zeroes where the old data was.
  await node.truncate(4 << 20);
  const old = new Uint8Array(4096);
  await node.read(3 << 20, old);
  assert.ok(old.every((b) => b === 0));
  assert.deepEqual(checkImage(node).messages, []);
  await assert.rejects(() => node.truncate(1000), (e) => isBlockError(e, "invalid-argument"));
  await node.close();
});

Deno.test("qcow2 caches stay within their byte budgets over a large sparse image", async () => {
  const file = new MemoryFile("budget.qcow2");
  await createQcow2(file, 2 ** 40, { clusterSize: 65536 });
  const node = await Qcow2Node.open(borrowFile(file), {
    cacheCleanInterval: 0,
    l2CacheSize: 256 * 1024,
    refcountCacheSize: 128 * 1024,
  });
  let seed = 7;
  const next = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31);
  const buf = new Uint8Array(4096).fill(1);
  for (let i = 0; i < 300; i++) {
    const off = (next() % (2 ** 40 / 4096)) * 4096;
    await node.write(off, buf);
    assert.ok(node.l2Cache.bytes <= 256 * 1024, `L2 cache at ${node.l2Cache.bytes} bytes`);
    assert.ok(node.refcounts.cache.bytes <= 128 * 1024);
  }
  assert.deepEqual(checkImage(node).messages, []);
  await node.close();
});
