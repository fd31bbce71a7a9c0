/**
 * Seeded random operations on qcow2 images against a byte-array model: every read must match,
 * and the image must stay consistent (refcounts equal references, COPIED exact) across reopens.
 */
import assert from "node:assert/strict";
import { MemoryFile } from "../../../src/host/memory.ts";
import { borrowFile } from "../../../src/host/host_file.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../../formats/qcow2/qcow2.ts";
import { checkImage } from "../../../formats/qcow2/check.ts";

const SEED = 0xc0ffee;

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
}

const configs: Array<[string, Qcow2CreateOptions, number]> = [
  ["v3 64 KiB", {}, 8 << 20],
  ["v2 64 KiB", { compat: "0.10" }, 8 << 20],
  [
    "v3 512 B refcount_bits=64 (refcount table growth)",
    { clusterSize: 512, refcountBits: 64 },
    4 << 20,
  ],
  ["v3 4 KiB refcount_bits=2", { clusterSize: 4096, refcountBits: 2 }, 4 << 20],
  ["v3 extended L2 16 KiB", { clusterSize: 16384, extendedL2: true }, 8 << 20],
  ["v3 extended L2 64 KiB zstd", { extendedL2: true, compressionType: "zstd" }, 8 << 20],
  ["v3 4 KiB lazy refcounts", { clusterSize: 4096, lazyRefcounts: true }, 4 << 20],
];

for (const [name, opts, size] of configs) {
  Deno.test(`qcow2 (${name}) matches a byte model over 400 random operations (seed 0x${SEED.toString(16)})`, async () => {
    const random = rng(SEED);
    const cs = opts.clusterSize ?? 65536;
    const file = new MemoryFile("model.qcow2");
    await createQcow2(file, size, opts);
    const model = new Uint8Array(size);
    // Clusters never written: compressed writes need them.
    const touched = new Set<number>();
    const open = () =>
      Qcow2Node.open(borrowFile(file), {
        cacheCleanInterval: 0,
        l2CacheSize: 2 * cs,
        refcountCacheSize: 2 * cs,
      });
    let node = await open();
    const int = (n: number) => Math.floor(random() * n);
    const markTouched = (off: number, len: number) => {
      for (let c = Math.floor(off / cs); c * cs < off + len; c++) touched.add(c);
    };
    for (let op = 0; op < 400; op++) {
      const choice = random();
      const off = int(size);
      const len = Math.min(size - off, 1 + int(random() < 0.7 ? 3 * cs : 300_000));
      if (choice < 0.45) {
        const data = new Uint8Array(len);
        const fill = int(256);
        for (let i = 0; i < len; i++) data[i] = (fill + i) & 0xff;
        await node.write(off, data);
        model.set(data, off);
        markTouched(off, len);
      } else if (choice < 0.6) {
        const unmap = random() < 0.5;
        await node.writeZeroes(off, len, { unmap });
        model.fill(0, off, off + len);
        markTouched(off, len);
      } else if (choice < 0.7) {
        await node.discard(off, len);
        // Whole clusters inside the range read as zeroes afterwards (no backing file).
        const start = Math.ceil(off / cs) * cs;
        const end = off + len === size ? size : Math.floor((off + len) / cs) * cs;
        if (end > start) model.fill(0, start, end);
      } else if (choice < 0.8) {
        const c = int(size / cs);
        if (!touched.has(c)) {
          const data = new Uint8Array(cs);
          // Half compressible, half noise (stored uncompressed).
          if (random() < 0.5) data.fill(c & 0xff, 0, cs / 2);
          else for (let i = 0; i < cs; i++) data[i] = int(256);
          await node.write(c * cs, data, { compressed: true });
          model.set(data, c * cs);
          touched.add(c);
        }
      } else if (choice < 0.85) {
        await node.flush();
      } else if (choice < 0.9) {
        await node.close();
        node = await open();
      } else {
        const got = new Uint8Array(len);
        await node.read(off, got);
        const want = model.subarray(off, off + len);
        if (!got.every((b, i) => b === want[i])) {
          const at = got.findIndex((b, i) => b !== want[i]);
          assert.fail(
            `op ${op}: read ${off}+${len} differs at byte ${off + at}: ${got[at]} != ${want[at]}`,
          );
        }
      }
    }
    const all = new Uint8Array(size);
    await node.read(0, all);
    assert.ok(all.every((b, i) => b === model[i]), "final contents");
    const report = checkImage(node);
    assert.deepEqual(report.messages, []);
    await node.close();
    // And once more from a fresh open.
    const again = await open();
    await again.read(0, all);
    assert.ok(all.every((b, i) => b === model[i]), "contents after reopen");
    assert.deepEqual(checkImage(again).messages, []);
    await again.close();
  });
}
