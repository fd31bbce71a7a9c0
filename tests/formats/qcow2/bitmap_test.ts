/**
 * Persistent bitmaps in vstor alone: a bitmap added and dirtied survives close and reopen, the
 * directory is IN_USE while open read-write, check counts the bitmap clusters (no leaks), and
 * every untrusted field of the extension, directory and table is refused with QEMU's message.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { createImage, openImage } from "../../../formats/open.ts";
import { Qcow2Node } from "../../../formats/qcow2/qcow2.ts";
import { checkImage } from "../../../formats/qcow2/check.ts";
import { DirtyBitmap } from "../../../formats/qcow2/bitmap.ts";

const dir = Deno.makeTempDirSync({ prefix: "vstor_bitmap_unit_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

async function open(path: string, readOnly = false): Promise<Qcow2Node> {
  return await openImage(path, { readOnly }) as Qcow2Node;
}

/** An image with bitmaps b0 (64 KiB, enabled, bits 0..15 set) and b1 (4 KiB, disabled). */
async function image(name: string): Promise<string> {
  const path = join(dir, name);
  await createImage(path, "qcow2", 64 << 20);
  // One session each: bitmaps added together are stored newest first, as QEMU does.
  let node = await open(path);
  node.bitmaps!.add("b0", 65536, false);
  await node.close();
  node = await open(path);
  node.bitmaps!.add("b1", 4096, true);
  await node.write(0, new Uint8Array(1 << 20));
  await node.close();
  return path;
}

/** Where the bitmaps extension's data and the directory are. */
function locate(path: string): { ext: number; dir: number } {
  const head = Deno.readFileSync(path).subarray(0, 65536);
  const v = new DataView(head.buffer, head.byteOffset);
  let at = v.getUint32(100);
  for (;;) {
    const type = v.getUint32(at), len = v.getUint32(at + 4);
    if (type === 0x23852875) return { ext: at + 8, dir: Number(v.getBigUint64(at + 8 + 16)) };
    if (type === 0) throw new Error("no bitmaps extension");
    at += 8 + Math.ceil(len / 8) * 8;
  }
}

function patch(path: string, offset: number, bytes: number[]): void {
  const f = Deno.openSync(path, { read: true, write: true });
  f.seekSync(offset, Deno.SeekMode.Start);
  f.writeSync(new Uint8Array(bytes));
  f.close();
}

Deno.test("a bitmap added and dirtied by vstor is stored on close and read back", async () => {
  const path = await image("roundtrip.qcow2");
  const node = await open(path, true);
  const [b0, b1] = node.bitmaps!.list;
  assert.equal(b0!.name, "b0");
  assert.equal(b0!.count(), 16);
  assert.equal(b0!.enabled, true);
  assert.equal(b1!.name, "b1");
  assert.equal(b1!.count(), 0);
  assert.equal(b1!.enabled, false);
  assert.equal(checkImage(node).leaks, 0);
  await node.close();
});

Deno.test("the directory says IN_USE while the image is open read-write, not after close", async () => {
  const path = await image("inuse.qcow2");
  const flags = () => Deno.readFileSync(path)[locate(path).dir + 15]!;
  assert.equal(flags() & 1, 0);
  const node = await open(path);
  assert.equal(flags() & 1, 1);
  const report = checkImage(node);
  assert.equal(report.leaks + report.corruptions, 0, report.messages.join("\n"));
  await node.close();
  assert.equal(flags() & 1, 0);
});

Deno.test("a bitmap found IN_USE at open is inconsistent: not stored, resize refused", async () => {
  const path = await image("crashed.qcow2");
  const { dir: d } = locate(path);
  patch(path, d + 15, [0x03]); // IN_USE | AUTO
  const node = await open(path);
  const b0 = node.bitmaps!.find("b0")!;
  assert.equal(b0.inconsistent, true);
  await assert.rejects(() => node.truncate(128 << 20), /Bitmap 'b0' is inconsistent/);
  await node.write(0, new Uint8Array(512));
  await node.close();
  assert.equal(Deno.readFileSync(path)[locate(path).dir + 15]! & 1, 1);
});

Deno.test("untrusted bitmap fields are refused with QEMU's words", async () => {
  const cases: Array<[string, (path: string) => void, RegExp]> = [
    ["reserved", (f) => patch(f, locate(f).ext + 4, [0, 0, 0, 1]), /Reserved field is not zero/],
    ["zero count", (f) => patch(f, locate(f).ext, [0, 0, 0, 0]), /zero bitmaps/],
    ["too many", (f) => patch(f, locate(f).ext, [0, 1, 0, 0]), /exceeding the QEMU supported/],
    ["count high", (f) => patch(f, locate(f).ext, [0, 0, 0, 3]), /Less bitmaps found/],
    ["count low", (f) => patch(f, locate(f).ext, [0, 0, 0, 1]), /More bitmaps found/],
    ["dir size", (f) => patch(f, locate(f).ext + 8, [0, 0, 0, 0, 0x10, 0, 0, 0]), /exceeds/],
    ["dir offset", (f) => patch(f, locate(f).ext + 23, [0x08]), /invalid bitmap directory offset/],
    [
      "dir past eof",
      (f) => patch(f, locate(f).ext + 16, [0, 0, 0, 1, 0, 0, 0, 0]),
      /bitmap directory/,
    ],
    ["granularity", (f) => patch(f, locate(f).dir + 17, [40]), /doesn't satisfy the constraints/],
    ["type", (f) => patch(f, locate(f).dir + 16, [2]), /doesn't satisfy the constraints/],
    ["flags", (f) => patch(f, locate(f).dir + 12, [0x80]), /doesn't satisfy the constraints/],
    ["empty table", (f) => patch(f, locate(f).dir + 8, [0, 0, 0, 0]), /doesn't satisfy/],
    ["huge table", (f) => patch(f, locate(f).dir + 8, [0x08, 0, 0, 1]), /doesn't satisfy/],
    ["name size", (f) => patch(f, locate(f).dir + 18, [0xff, 0xff]), /Broken bitmap directory/],
    ["extra data", (f) => patch(f, locate(f).dir + 20, [0, 0, 0, 8]), /extra data/],
    ["table offset", (f) => patch(f, locate(f).dir + 7, [0x08]), /doesn't satisfy/],
    [
      "table past eof",
      (f) => patch(f, locate(f).dir, [0, 0, 0, 1, 0, 0, 0, 0]),
      /bitmap_table .*past the end/,
    ],
    ["table size", (f) => patch(f, locate(f).dir + 11, [2]), /Could not read bitmap 'b0'/],
  ];
  for (const [what, damage, message] of cases) {
    const path = await image(`bad-${what.replaceAll(" ", "-")}.qcow2`);
    damage(path);
    await assert.rejects(() => open(path, true), message, what);
  }
  // A bad table entry: reserved bits set in the first entry of b0's table.
  const path = await image("bad-entry.qcow2");
  const d = locate(path).dir;
  const table = Number(new DataView(Deno.readFileSync(path).buffer).getBigUint64(d));
  patch(path, table, [0x80]);
  await assert.rejects(() => open(path, true), /Could not read bitmap_table/);
});

Deno.test("a stale bitmaps extension (autoclear bit cleared) is ignored, and dropped on write", async () => {
  const path = await image("stale.qcow2");
  patch(path, 95, [0]); // autoclear_features low byte
  const ro = await open(path, true);
  assert.equal(ro.bitmaps!.list.length, 0);
  await ro.close();
  const rw = await open(path);
  await rw.close();
  assert.throws(() => locate(path), /no bitmaps extension/);
});

Deno.test("DirtyBitmap.mark sets exactly the granules a range touches", () => {
  const bm = new DirtyBitmap("x", {
    granularityBits: 9,
    enabled: true,
    clusterSize: 512,
    size: 32 << 20,
  });
  bm.mark(1000, 1);
  bm.mark(4096 * 512 - 1, 2); // across a chunk (one 512-byte cluster: 4096 bits) boundary
  bm.mark(1 << 20, 64 << 10); // whole bytes
  assert.equal(bm.get(1), true);
  assert.equal(bm.get(0), false);
  assert.equal(bm.get(4095), true);
  assert.equal(bm.get(4096), true);
  assert.equal(bm.get(4097), false);
  assert.equal(bm.count(), 1 + 2 + 128);
  bm.resize(1 << 20);
  assert.equal(bm.count(), 1);
  bm.mark(0, 32 << 20); // past the new end: clamped
  assert.equal(bm.count(), 2048);
});

Deno.test("all-ones table entries load without memory per entry and store as data clusters", async () => {
  const path = join(dir, "ones.qcow2");
  await createImage(path, "qcow2", 100 << 20);
  let node = await open(path);
  node.bitmaps!.add("b0", 512, false);
  await node.write(0, new Uint8Array(512));
  await node.close();
  // Point b0's only table entry at nothing with the all-ones flag; its data cluster leaks.
  const d = locate(path).dir;
  const table = Number(new DataView(Deno.readFileSync(path).buffer).getBigUint64(d));
  patch(path, table, [0, 0, 0, 0, 0, 0, 0, 1]);
  node = await open(path);
  const b0 = node.bitmaps!.find("b0")!;
  assert.equal(b0.count(), b0.bits);
  await node.write(4096, new Uint8Array(512)); // marking an all-ones chunk changes nothing
  assert.equal(b0.count(), b0.bits);
  await node.truncate(50 << 20);
  assert.equal(b0.count(), b0.bits);
  await node.close();
  node = await open(path, true);
  assert.equal(node.bitmaps!.find("b0")!.count(), (50 << 20) / 512);
  const report = checkImage(node);
  assert.equal(report.corruptions, 0);
  assert.equal(report.leaks, 1, report.messages.join("\n"));
  await node.close();
});

Deno.test("merge between bitmaps of different granularities and cluster sizes keeps every bit", () => {
  const size = 1 << 30;
  const src = new DirtyBitmap("s", { granularityBits: 9, enabled: true, clusterSize: 65536, size });
  const dst = new DirtyBitmap("d", { granularityBits: 9, enabled: true, clusterSize: 4096, size });
  const coarse = new DirtyBitmap("c", {
    granularityBits: 16,
    enabled: true,
    clusterSize: 512,
    size,
  });
  src.mark(0, 1);
  src.mark(500 << 20, 4096);
  src.mark(size - 512, 512);
  dst.merge(src);
  coarse.merge(src);
  assert.equal(dst.count(), src.count());
  assert.equal(dst.get((500 << 20) / 512 + 7), true);
  assert.equal(dst.get(size / 512 - 1), true);
  assert.equal(coarse.count(), 3);
  assert.equal(coarse.get((500 << 20) / 65536), true);
});
