import assert from "node:assert/strict";
import { loadMeasureSnapshot } from "../../formats/measure.ts";
import { createQcow2 } from "../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import { createSnapshot } from "../../formats/qcow2/snapshot_ops.ts";
import { RawNode } from "../../formats/raw.ts";
import { isBlockError } from "../../src/errors.ts";
import { borrowFile } from "../../src/host/host_file.ts";
import { MemoryFile } from "../../src/host/memory.ts";

/** A qcow2 image with snapshot "one" (ID 1) holding 0x11 and "two" (ID 2) holding 0x22. */
async function imageWithSnapshots(): Promise<MemoryFile> {
  const file = new MemoryFile("snap.qcow2");
  await createQcow2(file, 1 << 20, {});
  const node = await Qcow2Node.open(borrowFile(file));
  await node.write(0, new Uint8Array(512).fill(0x11));
  await createSnapshot(node, "one");
  await node.write(0, new Uint8Array(512).fill(0x22));
  await createSnapshot(node, "two");
  await node.write(0, new Uint8Array(512).fill(0x33));
  await node.close();
  return file;
}

async function firstByteAfterLoading(
  file: MemoryFile,
  spec: Parameters<typeof loadMeasureSnapshot>[1],
): Promise<number> {
  const node = await Qcow2Node.open(borrowFile(file), { readOnly: true });
  try {
    loadMeasureSnapshot(node, spec);
    const byte = new Uint8Array(1);
    await node.read(0, byte);
    return byte[0]!;
  } finally {
    await node.close();
  }
}

Deno.test("loadMeasureSnapshot() finds a snapshot by ID, then by name, or by snapshot.id/name", async () => {
  const file = await imageWithSnapshots();
  assert.equal(await firstByteAfterLoading(file, { key: "1" }), 0x11);
  assert.equal(await firstByteAfterLoading(file, { key: "two" }), 0x22);
  assert.equal(await firstByteAfterLoading(file, { id: "2" }), 0x22);
  assert.equal(await firstByteAfterLoading(file, { id: "1", name: "one" }), 0x11);
});

Deno.test("loadMeasureSnapshot() refuses what matches nothing, and formats without snapshots", async () => {
  const file = await imageWithSnapshots();
  for (const spec of [{ key: "three" }, { id: "1", name: "two" }, {}]) {
    await assert.rejects(
      () => firstByteAfterLoading(file, spec),
      (e) => isBlockError(e, "not-found") && /Can't find snapshot/.test(e.message),
    );
  }
  const raw = await RawNode.open(new MemoryFile("r", new Uint8Array(512)));
  assert.throws(
    () => loadMeasureSnapshot(raw, { key: "1" }),
    (e) => isBlockError(e, "unsupported") && /does not support temporarily loading/.test(e.message),
  );
  await raw.close();
});
