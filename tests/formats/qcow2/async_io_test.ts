/**
 * qcow2 with host I/O in flight (issue #16): reads and in-place writes of data clusters go through
 * the file's asynchronous path, many at once; metadata changes that could move clusters (discard,
 * zero writes, shrinks, snapshots) wait until the transfers on them are done, and new transfers
 * wait for them; allocating writes are not held behind transfers. Then a seeded random mix through
 * a real io_uring on an O_DIRECT file, checked and compared by qemu-img.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { openImage } from "../../../formats/open.ts";
import { createQcow2 } from "../../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../../formats/qcow2/qcow2.ts";
import { borrowFile, type HostFile } from "../../../src/host/host_file.ts";
import { MemoryFile } from "../../../src/host/memory.ts";
import { mulberry32 } from "../../prng.ts";
import { ignoreWithoutUring } from "../../sys/uring_available.ts";
import { ignoreWithout, runTool } from "../../interop/qemu.ts";

const CLUSTER = 65536;

/** A host file whose asynchronous reads and writes wait until `open()`. */
function gatedFile(file: HostFile) {
  let gate = Promise.withResolvers<void>();
  const state = { inFlight: 0, maxInFlight: 0, asyncReads: 0, asyncWrites: 0 };
  const held = async (run: () => void) => {
    state.inFlight++;
    state.maxInFlight = Math.max(state.maxInFlight, state.inFlight);
    await gate.promise;
    state.inFlight--;
    run();
  };
  const host: HostFile = {
    ...borrowFile(file),
    readAtAsync(offset, dst) {
      state.asyncReads++;
      return held(() => file.readAt(offset, dst));
    },
    writeAtAsync(offset, src) {
      state.asyncWrites++;
      return held(() => file.writeAt(offset, src));
    },
  };
  return {
    host,
    state,
    open: () => gate.resolve(),
    close: () => gate = Promise.withResolvers<void>(),
  };
}

function ticks(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

async function gatedImage() {
  const file = new MemoryFile("async.qcow2");
  await createQcow2(file, 8 << 20, {});
  const g = gatedFile(file);
  const node = await Qcow2Node.open(g.host, { cacheCleanInterval: 0 });
  return { file, node, ...g };
}

Deno.test("qcow2 reads of data clusters are in flight together; a discard waits for them, later reads for it", async () => {
  const { node, state, open, close } = await gatedImage();
  const data = new Uint8Array(4 * CLUSTER).map((_, i) => (i * 31 + 7) & 0xff);
  open();
  await node.write(0, data); // allocating: synchronous writes, no transfer held
  close();
  const reads = [0, 1, 2, 3].map(async (c) => {
    const dst = new Uint8Array(CLUSTER);
    await node.read(c * CLUSTER, dst);
    return dst;
  });
  await ticks();
  assert.equal(state.maxInFlight, 4, "four reads at the host at once");
  let discarded = false;
  const discard = node.discard(CLUSTER, CLUSTER).then(() => discarded = true);
  await ticks();
  assert.equal(discarded, false, "the discard waits for the reads of its cluster");
  // A read that comes after the discard waits behind it.
  const late = new Uint8Array(CLUSTER);
  const lateRead = node.read(CLUSTER, late);
  await ticks();
  assert.equal(state.inFlight, 4);
  open();
  const back = await Promise.all(reads);
  back.forEach((b, c) => assert.deepEqual(b, data.subarray(c * CLUSTER, (c + 1) * CLUSTER)));
  await discard;
  await lateRead;
  assert.deepEqual(late, new Uint8Array(CLUSTER), "read after the discard: zeroes");
  await node.close();
});

Deno.test("qcow2 in-place writes are in flight together; an allocating write is not held behind them", async () => {
  const { node, state, open, close } = await gatedImage();
  open();
  await node.write(0, new Uint8Array(8 * CLUSTER).fill(1)); // clusters 0..7 owned
  close();
  const writes = [0, 1, 2, 3, 4, 5, 6, 7].map((c) =>
    node.write(c * CLUSTER + 4096, new Uint8Array(4096).fill(10 + c))
  );
  await ticks();
  assert.equal(state.maxInFlight, 8);
  assert.equal(state.asyncWrites, 8);
  // Cluster 20 is unallocated: its write allocates and completes while the others are held.
  await node.write(20 * CLUSTER, new Uint8Array(4096).fill(0x55));
  assert.equal(state.inFlight, 8);
  open();
  await Promise.all(writes);
  for (let c = 0; c < 8; c++) {
    const got = new Uint8Array(8192);
    await node.read(c * CLUSTER, got);
    assert.deepEqual(got.subarray(0, 4096), new Uint8Array(4096).fill(1));
    assert.deepEqual(got.subarray(4096), new Uint8Array(4096).fill(10 + c));
  }
  const fresh = new Uint8Array(4096);
  await node.read(20 * CLUSTER, fresh);
  assert.deepEqual(fresh, new Uint8Array(4096).fill(0x55));
  await node.close();
});

Deno.test("qcow2 zero writes and shrinks wait for writes in flight on the clusters they free", async () => {
  const { node, state, open, close } = await gatedImage();
  open();
  await node.write(0, new Uint8Array(4 * CLUSTER).fill(3));
  close();
  const write = node.write(3 * CLUSTER, new Uint8Array(4096).fill(9));
  await ticks();
  assert.equal(state.inFlight, 1);
  let zeroed = false, shrunk = false;
  const zero = node.writeZeroes(2 * CLUSTER, CLUSTER, { unmap: true }).then(() => zeroed = true);
  const shrink = node.truncate(3 * CLUSTER).then(() => shrunk = true);
  await ticks();
  assert.deepEqual([zeroed, shrunk], [false, false]);
  open();
  await Promise.all([write, zero, shrink]);
  assert.equal(node.size, 3 * CLUSTER);
  const got = new Uint8Array(3 * CLUSTER);
  await node.read(0, got);
  assert.deepEqual(got.subarray(0, 2 * CLUSTER), new Uint8Array(2 * CLUSTER).fill(3));
  assert.deepEqual(got.subarray(2 * CLUSTER), new Uint8Array(CLUSTER));
  await node.close();
});

Deno.test({
  name:
    "qcow2 through io_uring on O_DIRECT: a seeded mix of concurrent reads and writes, then qemu-img check and compare",
  ignore: ignoreWithoutUring || ignoreWithout("qemu-img"),
  async fn() {
    const seed = 4242;
    console.log(`seed ${seed}`);
    const random = mulberry32(seed);
    const below = (n: number) => Math.floor(random() * n);
    const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "vstor_qcow2_async_" });
    try {
      const image = join(dir, "a.qcow2");
      const size = 16 << 20;
      assert.equal(
        (await runTool("qemu-img", ["create", "-q", "-f", "qcow2", image, "16M"])).code,
        0,
      );
      const model = new Uint8Array(size);
      const node = await openImage(image, { cache: "none", aio: "io_uring" });
      for (let round = 0; round < 40; round++) {
        // One batch: up to 32 requests at once on disjoint 4 KiB-aligned ranges (some unaligned
        // within), half reads, half writes; reads must see what the model held before the batch.
        const used = new Set<number>();
        const batch: Promise<void>[] = [];
        const checks: Array<() => void> = [];
        for (let i = 0; i < 32; i++) {
          const block = below(size / 4096);
          if (used.has(block)) continue;
          used.add(block);
          const offset = block * 4096 + (below(4) === 0 ? below(4096 - 512) : 0);
          const length = Math.min(1 + below(4096), block * 4096 + 4096 - offset);
          if (below(2) === 0) {
            const src = new Uint8Array(length).map(() => below(256));
            model.set(src, offset);
            batch.push(node.write(offset, src));
          } else {
            const dst = new Uint8Array(length);
            const want = model.slice(offset, offset + length);
            batch.push(node.read(offset, dst));
            checks.push(() => assert.deepEqual(dst, want, `round ${round} read at ${offset}`));
          }
        }
        await Promise.all(batch);
        for (const check of checks) check();
      }
      await node.flush();
      await node.close();
      const check = await runTool("qemu-img", ["check", image]);
      assert.equal(check.code, 0, check.stdout + check.stderr);
      const raw = join(dir, "model.raw");
      await Deno.writeFile(raw, model);
      const compare = await runTool("qemu-img", [
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        image,
        raw,
      ]);
      assert.equal(compare.code, 0, compare.stdout + compare.stderr);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
