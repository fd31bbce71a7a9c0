import assert from "node:assert/strict";
import { join } from "node:path";
import { nodeSuite } from "../block/node_suite.ts";
import { RawNode } from "../../formats/raw.ts";
import { createImage, openImage } from "../../formats/open.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import { isBlockError } from "../../src/errors.ts";

const dir = Deno.makeTempDirSync({ prefix: "vstor_raw_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
let serial = 0;

nodeSuite({
  name: "raw over a memory file",
  make: (size) => RawNode.open(new MemoryFile("mem", new Uint8Array(size))),
});

const memories = new WeakMap<object, MemoryFile>();
nodeSuite({
  name: "raw over a memory file, window at offset 4096",
  async make(size) {
    const file = new MemoryFile("mem", new Uint8Array(size + 8192));
    const node = await RawNode.open(file, { offset: 4096, size });
    memories.set(node, file);
    return node;
  },
});

nodeSuite({
  name: "raw over a host file",
  async make(size) {
    const path = join(dir, `suite${serial++}.img`);
    await createImage(path, "raw", size);
    return openImage(path, { format: "raw" });
  },
  async reopenReadOnly(node) {
    await node.close();
    return openImage(node.filename, { format: "raw", readOnly: true });
  },
});

Deno.test("RawNode with a window reads and writes only inside it", async () => {
  const bytes = new Uint8Array(3000).fill(1);
  const file = new MemoryFile("mem", bytes);
  const node = await RawNode.open(file, { offset: 1000, size: 1000 });
  assert.equal(node.size, 1000);
  await node.write(0, new Uint8Array(1000).fill(2));
  const all = file.contents();
  assert.ok(all.subarray(0, 1000).every((b) => b === 1));
  assert.ok(all.subarray(1000, 2000).every((b) => b === 2));
  assert.ok(all.subarray(2000).every((b) => b === 1));
  await assert.rejects(() => node.truncate(10), (e) => isBlockError(e, "unsupported"));
});

Deno.test("RawNode refuses a window past the end of the file", async () => {
  const file = new MemoryFile("mem", new Uint8Array(100));
  await assert.rejects(
    () => RawNode.open(file, { offset: 50, size: 51 }),
    (e) => isBlockError(e, "invalid-argument") && /past the end/.test(e.message),
  );
  await assert.rejects(
    () => RawNode.open(file, { offset: 101 }),
    (e) => isBlockError(e, "invalid-argument"),
  );
});

Deno.test("a raw image whose file ends mid-sector is whole sectors long, the tail reading zeroes (as QEMU)", async () => {
  const file = new MemoryFile("mem", new Uint8Array(1000).fill(7));
  const node = await RawNode.open(file);
  assert.equal(node.size, 1024);
  const tail = new Uint8Array(34);
  await node.read(990, tail);
  assert.deepEqual([...tail], [...new Array(10).fill(7), ...new Array(24).fill(0)]);
  await node.write(1000, new Uint8Array(24).fill(1));
  assert.equal(file.size(), 1024);
  await node.truncate(1500);
  assert.equal(node.size, 1536);
  await node.close();
});

Deno.test("a probed raw image refuses a qcow2 signature in its first sector", async () => {
  const path = join(dir, "probed.img");
  await createImage(path, "raw", 1 << 16);
  const magic = new Uint8Array([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
  const probed = await openImage(path);
  try {
    await assert.rejects(
      () => probed.write(0, magic),
      (e) => isBlockError(e, "read-only") && /qcow2 signature/.test(e.message),
    );
    // Splitting the magic over two writes is caught too.
    await probed.write(0, magic.subarray(0, 3));
    await assert.rejects(
      () => probed.write(3, magic.subarray(3)),
      (e) => isBlockError(e, "read-only"),
    );
    // Past the first sector the bytes are just data.
    await probed.write(512, magic);
  } finally {
    await probed.close();
  }
  const head = new Uint8Array(8);
  const check = await openImage(path, { readOnly: true });
  await check.read(0, head);
  await check.close();
  assert.deepEqual(head, new Uint8Array([0x51, 0x46, 0x49, 0, 0, 0, 0, 0]));
  // With the format given, the write is the user's choice.
  const explicit = await openImage(path, { format: "raw" });
  await explicit.write(0, magic);
  await explicit.close();
  // Now the file probes as qcow2 (a broken one): exactly what the guard protects against.
  const reprobed = await openImage(path, { readOnly: true }).catch((e) => e);
  assert.ok(isBlockError(reprobed, "invalid-format"), String(reprobed));
});

Deno.test("raw blockStatus reports punched holes as zero and data as data", async () => {
  const path = join(dir, "holes.img");
  await createImage(path, "raw", 4 << 20);
  const node = await openImage(path, { format: "raw" });
  try {
    await node.write(1 << 20, new Uint8Array(1 << 20).fill(5));
    // The first block is allocated at creation, as QEMU's allocate_first_block does.
    const block0 = await node.blockStatus(0, node.size);
    assert.deepEqual(block0, { kind: "data", offset: 0, length: 4096, hostOffset: 0 });
    const first = await node.blockStatus(4096, node.size - 4096);
    assert.deepEqual(first, {
      kind: "zero",
      offset: 4096,
      length: (1 << 20) - 4096,
      hostOffset: 4096,
    });
    const second = await node.blockStatus(1 << 20, node.size - (1 << 20));
    assert.equal(second.kind, "data");
    assert.equal(second.length, 1 << 20);
    await node.discard(0, 2 << 20);
    const after = await node.blockStatus(0, node.size);
    assert.deepEqual(after, { kind: "zero", offset: 0, length: 4 << 20, hostOffset: 0 });
    assert.ok(node.allocatedSize!() < 1 << 20);
  } finally {
    await node.close();
  }
});

Deno.test("raw preallocation=full allocates every byte", async () => {
  const path = join(dir, "full.img");
  await createImage(path, "raw", 1 << 20, { preallocation: "full" });
  const node = await openImage(path, { readOnly: true });
  try {
    assert.equal(node.size, 1 << 20);
    assert.ok(node.allocatedSize!() >= 1 << 20);
    assert.equal((await node.blockStatus(0, node.size)).kind, "data");
  } finally {
    await node.close();
  }
});
