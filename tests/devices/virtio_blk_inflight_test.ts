/**
 * virtio-blk with requests in flight (issue #16): every request a drain pops is handed to the node
 * at once, so the guest's queue depth reaches the disk; completions arrive in any order and are
 * published on their own; FLUSH waits for every write in flight; a reset lets what is in flight
 * complete into nothing. The node here holds each request until the test opens its gate.
 */
import assert from "node:assert/strict";
import type { WriteOptions } from "../../src/block/node.ts";
import {
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from "../../src/virtio/virtio_blk_constants.ts";
import { BlkRig, CountingNode, memoryDisk, patternBytes } from "./blk_harness.ts";

/** A node whose reads and writes wait for `open()`; it records what finished, in order. */
class GatedNode extends CountingNode {
  inFlight = 0;
  maxInFlight = 0;
  readonly events: string[] = [];
  #gate = Promise.withResolvers<void>();

  open(): void {
    this.#gate.resolve();
  }

  async #held<T>(what: string, run: () => Promise<T>): Promise<T> {
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    await this.#gate.promise;
    try {
      return await run();
    } finally {
      this.inFlight--;
      this.events.push(what);
    }
  }

  override read(offset: number, dst: Uint8Array): Promise<void> {
    return this.#held(`read ${offset}`, () => super.read(offset, dst));
  }

  override write(offset: number, src: Uint8Array, opts?: WriteOptions): Promise<void> {
    return this.#held(`write ${offset}`, () => super.write(offset, src, opts));
  }

  override flush(): Promise<void> {
    this.events.push(`flush (${this.inFlight} in flight)`);
    return super.flush();
  }
}

async function gatedRig() {
  const { node: inner } = await memoryDisk(1 << 20, { fill: (i) => (i * 13 + 1) & 0xff });
  const node = new GatedNode(inner);
  const rig = await BlkRig.create({ node, options: { requestMerging: false } });
  return { rig, node };
}

/** Lets the microtasks and a macrotask run (completions publish in microtasks). */
function settle(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

Deno.test("every request a drain pops is in flight at the node at once; completions publish when they come", async () => {
  const { rig, node } = await gatedRig();
  const sectors = Array.from({ length: 16 }, (_, i) => i * 64);
  const subs = sectors.map((sector) =>
    rig.submit({ type: VIRTIO_BLK_T_IN, sector, readBytes: 4096 })
  );
  rig.kick();
  // The drain returns with the requests still at the node: it does not wait for them.
  await rig.backend.processQueue(0, () => rig.interrupts[0]!++);
  assert.equal(node.maxInFlight, 16);
  assert.equal(rig.backend.inflight, 16);
  assert.deepEqual(rig.reap(), [], "nothing completes before the node does");
  const interruptsBefore = rig.interrupts[0]!;
  node.open();
  await rig.backend.drained();
  await settle();
  assert.equal(rig.backend.inflight, 0);
  const done = rig.reap();
  assert.deepEqual(done.map((c) => c.seq).sort((a, b) => a - b), subs.map((s) => s.seq));
  const inner = node.inner;
  for (const c of done) {
    assert.equal(c.status, VIRTIO_BLK_S_OK);
    const sector = sectors[subs.findIndex((s) => s.seq === c.seq)]!;
    const want = new Uint8Array(4096);
    await inner.read(sector * 512, want);
    assert.deepEqual(c.data.subarray(0, 4096), want, `data of sector ${sector}`);
  }
  assert.ok(rig.interrupts[0]! > interruptsBefore, "completions after the drain interrupt too");
});

Deno.test("FLUSH waits until every write in flight has completed before the node flushes", async () => {
  const { rig, node } = await gatedRig();
  const writes = [0, 100, 200, 300].map((sector) =>
    rig.submit({ type: VIRTIO_BLK_T_OUT, sector, data: patternBytes(4096, sector) })
  );
  const flush = rig.submit({ type: VIRTIO_BLK_T_FLUSH });
  rig.kick();
  const drain = rig.backend.processQueue(0, () => rig.interrupts[0]!++);
  await settle();
  assert.equal(node.maxInFlight, 4);
  assert.equal(node.flushes, 0, "the flush waits for the writes");
  node.open();
  await drain;
  await rig.backend.drained();
  await settle();
  assert.deepEqual(node.events.slice(4), ["flush (0 in flight)"]);
  assert.deepEqual(node.events.slice(0, 4).sort(), [
    "write 0",
    "write 102400",
    "write 153600",
    "write 51200",
  ]);
  const done = rig.reap();
  assert.deepEqual(
    done.map((c) => c.seq).sort((a, b) => a - b),
    [...writes, flush].map((s) => s.seq),
  );
  for (const c of done) assert.equal(c.status, VIRTIO_BLK_S_OK);
  for (const sector of [0, 100, 200, 300]) {
    const got = new Uint8Array(4096);
    await node.inner.read(sector * 512, got);
    assert.deepEqual(got, patternBytes(4096, sector));
  }
});

Deno.test("a reset with requests in flight: they complete into nothing, and drained() still resolves", async () => {
  const { rig, node } = await gatedRig();
  for (const sector of [0, 8, 16]) rig.submit({ type: VIRTIO_BLK_T_IN, sector, readBytes: 4096 });
  rig.kick();
  await rig.backend.processQueue(0, () => rig.interrupts[0]!++);
  assert.equal(rig.backend.inflight, 3);
  rig.backend.reset();
  node.open();
  await rig.backend.drained();
  await settle();
  assert.equal(rig.backend.inflight, 0);
  assert.deepEqual(rig.reap(), [], "a reset device publishes nothing");
  assert.equal(rig.backend.stats.requests, 0);
});
