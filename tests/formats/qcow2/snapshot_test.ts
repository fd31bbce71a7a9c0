/**
 * Internal snapshots against a byte model: take snapshots between random writes, apply and delete
 * them in a seeded order, and check contents and consistency at every step.
 */
import assert from "node:assert/strict";
import { MemoryFile } from "../../../src/host/memory.ts";
import { borrowFile } from "../../../src/host/host_file.ts";
import { isBlockError } from "../../../src/errors.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../../formats/qcow2/qcow2.ts";
import { checkImage } from "../../../formats/qcow2/check.ts";
import {
  applySnapshot,
  createSnapshot,
  deleteSnapshot,
} from "../../../formats/qcow2/snapshot_ops.ts";

const SEED = 0x5a5a17;

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
}

const open = (file: MemoryFile) => Qcow2Node.open(borrowFile(file), { cacheCleanInterval: 0 });

async function contents(node: Qcow2Node): Promise<Uint8Array> {
  const all = new Uint8Array(node.size);
  await node.read(0, all);
  return all;
}

const configs: Array<[string, Qcow2CreateOptions]> = [
  ["v3 4 KiB", { clusterSize: 4096 }],
  ["v2 64 KiB", { compat: "0.10" }],
  ["v3 extended L2 32 KiB, refcount_bits=4", {
    clusterSize: 32768,
    extendedL2: true,
    refcountBits: 4,
  }],
];

for (const [name, opts] of configs) {
  Deno.test(`qcow2 (${name}) snapshots keep their contents through writes, applies and deletes (seed 0x${SEED.toString(16)})`, async () => {
    const random = rng(SEED);
    const size = 2 << 20;
    const file = new MemoryFile("snap.qcow2");
    await createQcow2(file, size, opts);
    let node = await open(file);
    const model = new Uint8Array(size);
    const saved = new Map<string, Uint8Array>();
    const int = (n: number) => Math.floor(random() * n);
    for (let step = 0; step < 60; step++) {
      const r = random();
      if (r < 0.55) {
        const off = int(size), len = Math.min(size - off, 1 + int(100_000));
        const v = 1 + int(255);
        const data = new Uint8Array(len).fill(v);
        if (random() < 0.2) {
          await node.writeZeroes(off, len, { unmap: random() < 0.5 });
          data.fill(0);
        } else {
          await node.write(off, data);
        }
        model.set(data, off);
      } else if (r < 0.7 && saved.size < 6) {
        const tag = `s${step}`;
        await createSnapshot(node, tag);
        saved.set(tag, model.slice());
      } else if (r < 0.85 && saved.size > 0) {
        const tags = [...saved.keys()];
        const tag = tags[int(tags.length)]!;
        await applySnapshot(node, tag);
        model.set(saved.get(tag)!);
        assert.deepEqual(await contents(node), model, `after applying ${tag}`);
      } else if (saved.size > 0) {
        const tags = [...saved.keys()];
        const tag = tags[int(tags.length)]!;
        await deleteSnapshot(node, tag);
        saved.delete(tag);
      } else {
        await node.close();
        node = await open(file);
      }
      assert.deepEqual(checkImage(node).messages, [], `step ${step}`);
    }
    assert.deepEqual(await contents(node), model);
    // Every snapshot still holds what it held when taken.
    for (const [tag, data] of saved) {
      await applySnapshot(node, tag);
      assert.deepEqual(await contents(node), data, `snapshot ${tag}`);
    }
    for (const tag of saved.keys()) await deleteSnapshot(node, tag);
    assert.deepEqual(checkImage(node).messages, []);
    assert.equal(node.snapshots.entries.length, 0);
    await node.close();
  });
}

Deno.test("snapshot names are unique, IDs count up from 1, and missing snapshots are named", async () => {
  const file = new MemoryFile("names.qcow2");
  await createQcow2(file, 1 << 20, {});
  const node = await open(file);
  const a = await createSnapshot(node, "a");
  const b = await createSnapshot(node, "b");
  assert.deepEqual([a.id, b.id], ["1", "2"]);
  await assert.rejects(
    () => createSnapshot(node, "a"),
    (e) => isBlockError(e, "invalid-argument") && /already exists/.test(e.message),
  );
  await assert.rejects(() => createSnapshot(node, ""), (e) => isBlockError(e, "invalid-argument"));
  await assert.rejects(
    () => createSnapshot(node, "x".repeat(300)),
    (e) => isBlockError(e, "invalid-argument"),
  );
  await assert.rejects(() => applySnapshot(node, "zzz"), (e) => isBlockError(e, "not-found"));
  await assert.rejects(() => deleteSnapshot(node, "zzz"), (e) => isBlockError(e, "not-found"));
  // Apply finds by ID too; delete by name only, as qemu-img.
  await applySnapshot(node, "2");
  await assert.rejects(() => deleteSnapshot(node, "2"), (e) => isBlockError(e, "not-found"));
  await deleteSnapshot(node, "a");
  const c = await createSnapshot(node, "c");
  assert.equal(c.id, "3");
  await node.close();
});

Deno.test("a snapshot that would overflow refcount_bits=1 is refused before anything changes", async () => {
  const file = new MemoryFile("rc1.qcow2");
  await createQcow2(file, 1 << 20, { refcountBits: 1 });
  const node = await open(file);
  await node.write(0, new Uint8Array(65536).fill(1));
  const before = file.contents();
  await assert.rejects(
    () => createSnapshot(node, "s"),
    (e) => isBlockError(e, "unsupported") && /refcount/.test(e.message),
  );
  assert.deepEqual(checkImage(node).messages, []);
  assert.equal(node.snapshots.entries.length, 0);
  await node.close();
  assert.equal(file.contents().length, before.length);
});

Deno.test("applying a snapshot taken at another size restores that size", async () => {
  const file = new MemoryFile("size.qcow2");
  await createQcow2(file, 1 << 20, { clusterSize: 512 });
  const node = await open(file);
  await node.write(0, new Uint8Array(4096).fill(7));
  await createSnapshot(node, "small");
  await node.truncate(4 << 20);
  await node.write((4 << 20) - 512, new Uint8Array(512).fill(8));
  assert.equal(node.size, 4 << 20);
  await applySnapshot(node, "small");
  assert.equal(node.size, 1 << 20);
  const head = new Uint8Array(4096);
  await node.read(0, head);
  assert.ok(head.every((b) => b === 7));
  assert.deepEqual(checkImage(node).messages, []);
  await node.close();
});
