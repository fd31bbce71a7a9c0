import assert from "node:assert/strict";
import { BlkDriver, type BlkDriverOptions } from "../../src/guest/blk_driver.ts";
import {
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from "../../src/virtio/virtio_blk_constants.ts";
import { type BlockTarget, type IoRequest, runOne } from "../../src/guest/block_target.ts";
import { probeSlot } from "../../src/guest/pci_probe.ts";
import { VirtioDriverError } from "../../src/guest/virtio_driver.ts";
import {
  featureBit,
  VIRTIO_F_RING_PACKED,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../src/virtio/features.ts";
import { FAKE_BLK_FEATURES, FakeBlk, type FakeBlkOptions, makeMachine } from "./harness.ts";

function boot(device: FakeBlkOptions = {}, options: BlkDriverOptions = {}, msixVectors?: number) {
  const model = new FakeBlk(device);
  const m = makeMachine(model, msixVectors === undefined ? {} : { msixVectors });
  const fn = probeSlot(m.bus, m.slot)!;
  const driver = BlkDriver.init(m.platform, fn, options);
  return { ...m, driver };
}

async function io(
  target: BlockTarget,
  op: IoRequest["op"],
  offset: number,
  length: number,
  fill?: number,
): Promise<{ status: string; data: Uint8Array; detail: string }> {
  let data = new Uint8Array(0);
  let detail = "";
  const status = await runOne(target, (r) => {
    r.op = op;
    r.offset = offset;
    r.length = length;
    if (fill !== undefined) r.data.fill(fill, 0, length);
  }, (r) => {
    data = r.data.slice(0, length);
    detail = r.detail;
  });
  return { status, data, detail };
}

Deno.test("BlkDriver reads the config and negotiates what both sides support", () => {
  const m = boot({ diskBytes: 2 * 1024 * 1024, blkSize: 4096, numQueues: 2 }, { queues: 4 });
  const d = m.driver;
  assert.equal(d.capacityBytes, 2 * 1024 * 1024);
  assert.equal(d.blockSize, 4096);
  assert.equal(d.numQueues, 2, "min(wanted, num_queues)");
  assert.equal(d.config.sizeMax, 65536);
  assert.equal(d.config.segMax, 128);
  assert.equal(d.config.writeback, true);
  assert.deepEqual(d.config.discard, { maxSectors: 0xffff, maxSeg: 1, sectorAlignment: 1 });
  assert.equal(d.canFlush, true);
  assert.equal(d.readOnly, false);
  assert.ok((d.features & featureBit(VIRTIO_RING_F_INDIRECT_DESC)) !== 0n);
  assert.ok((d.features & featureBit(VIRTIO_RING_F_EVENT_IDX)) !== 0n);
  assert.equal(d.features & featureBit(VIRTIO_F_RING_PACKED), 0n, "packed only when asked");
});

Deno.test("writes then reads through the ring return the data written", async () => {
  for (const options of [{}, { packed: true }, { indirect: false }, { eventIdx: false }]) {
    const m = boot({}, options);
    const t = m.driver.openTarget({ depth: 4, maxTransfer: 8192 });
    assert.equal((await io(t, "write", 4096, 8192, 0x5a)).status, "ok");
    assert.deepEqual(m.model.disk.subarray(4096, 4096 + 8192), new Uint8Array(8192).fill(0x5a));
    m.model.disk[4096 + 100] = 0x11;
    const read = await io(t, "read", 4096, 8192);
    assert.equal(read.status, "ok");
    assert.equal(read.data[100], 0x11);
    assert.equal(read.data[101], 0x5a);
    assert.deepEqual(
      m.model.requests,
      [VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_IN],
      JSON.stringify(options),
    );
    t.close();
  }
});

Deno.test("data beyond size_max is split into segments", async () => {
  const m = boot({ sizeMax: 4096, segMax: 8 });
  assert.throws(
    () => m.driver.openTarget({ maxTransfer: 64 * 1024 }),
    /seg_max × size_max = 32768/,
  );
  const t = m.driver.openTarget({ depth: 1, maxTransfer: 32768 });
  await io(t, "write", 0, 20480, 1);
  await io(t, "read", 0, 12288);
  assert.deepEqual(m.model.segments, [5, 3]);
});

Deno.test("flush, discard, write-zeroes and get-id reach the device", async () => {
  const m = boot();
  const t = m.driver.openTarget({ depth: 2, maxTransfer: 4096 });
  await io(t, "write", 0, 4096, 7);
  assert.equal((await io(t, "flush", 0, 0)).status, "ok");
  assert.equal(m.model.requests.at(-1), VIRTIO_BLK_T_FLUSH);
  assert.equal((await io(t, "discard", 0, 1024)).status, "ok");
  assert.deepEqual(m.model.disk.subarray(0, 1024), new Uint8Array(1024));
  assert.equal(m.model.disk[1024], 7);
  assert.equal((await io(t, "write-zeroes", 1024, 1024)).status, "ok");
  assert.equal(m.model.disk[2047], 0);
  assert.equal(m.model.disk[2048], 7);
  t.close();
  assert.equal(await m.driver.getId(), "fake-blk-0001");
});

Deno.test("requests the guest can answer never reach the device", async () => {
  const ro = boot({ readOnly: true });
  const t = ro.driver.openTarget({ depth: 1, maxTransfer: 4096 });
  assert.deepEqual(await io(t, "write", 0, 512, 1), {
    status: "ioerr",
    data: new Uint8Array(512).fill(1),
    detail: "read-only device",
  });
  assert.equal((await io(t, "read", 1024 * 1024, 512)).detail, "beyond the capacity");
  assert.deepEqual(ro.model.requests, []);
  assert.equal(ro.driver.readOnly, true);

  const plain = boot({
    features: FAKE_BLK_FEATURES & ~featureBit(VIRTIO_BLK_F_DISCARD) &
      ~featureBit(VIRTIO_BLK_F_FLUSH),
  });
  const p = plain.driver.openTarget({ depth: 1, maxTransfer: 4096 });
  assert.equal((await io(p, "discard", 0, 512)).status, "unsupp");
  assert.equal((await io(p, "flush", 0, 0)).status, "ok", "no FLUSH: write-through, nothing to do");
  assert.deepEqual(plain.model.requests, []);
  assert.throws(() => {
    const r = p.acquire()!;
    r.op = "read";
    r.offset = 100;
    r.length = 512;
    p.submit(r);
  }, /multiples of 512/);
});

Deno.test("a device status byte becomes the request's status", async () => {
  const m = boot();
  const t = m.driver.openTarget({ depth: 1, maxTransfer: 4096 });
  m.model.forceStatus = VIRTIO_BLK_S_IOERR;
  assert.equal((await io(t, "read", 0, 512)).status, "ioerr");
  m.model.forceStatus = 2;
  assert.equal((await io(t, "read", 0, 512)).status, "unsupp");
  m.model.forceStatus = 0x7f;
  const odd = await io(t, "read", 0, 512);
  assert.equal(odd.status, "ioerr");
  assert.equal(odd.detail, "device returned status byte 0x7f");
});

Deno.test("a batch of 48 requests takes one kick and one interrupt", async () => {
  const m = boot({ queueMax: 64 }, { queueSize: 64 });
  const t = m.driver.openTarget({ depth: 48, maxTransfer: 4096 });
  let done = 0;
  for (let i = 0; i < 48; i++) {
    const r = t.acquire()!;
    r.op = "write";
    r.offset = i * 4096;
    r.length = 4096;
    r.data.fill(i);
    t.submit(r);
  }
  t.commit();
  while (done < 48) {
    for (let r = t.reap(); r !== null; r = t.reap()) {
      assert.equal(r.status, "ok");
      t.release(r);
      done++;
    }
    if (done < 48) await t.wait();
  }
  for (let i = 0; i < 48; i++) assert.equal(m.model.disk[i * 4096 + 17], i);
  const [stats] = m.driver.stats();
  assert.equal(stats!.submitted, 48);
  assert.equal(stats!.completions, 48);
  assert.equal(stats!.kicks, 1, "one commit, one kick");
  assert.equal(stats!.largestBatch, 48);
  assert.equal(stats!.interrupts, 1, "one interrupt for the whole batch");
  assert.equal(m.idles.count, 1);
});

Deno.test("without indirect descriptors more requests than the ring holds wait for room", async () => {
  const m = boot({ queueMax: 8 }, { queueSize: 8, indirect: false });
  const t = m.driver.openTarget({ depth: 6, maxTransfer: 4096 });
  for (let i = 0; i < 6; i++) {
    const r = t.acquire()!;
    r.op = "read";
    r.offset = 0;
    r.length = 4096;
    t.submit(r);
  }
  t.commit();
  let done = 0;
  while (done < 6) {
    for (let r = t.reap(); r !== null; r = t.reap()) {
      assert.equal(r.status, "ok");
      t.release(r);
      done++;
    }
    if (done < 6) await t.wait();
  }
  // 3 descriptors per request in an 8-entry ring: at most 2 at a time.
  assert.equal(m.model.requests.length, 6);
  assert.ok(m.idles.count >= 3);
});

Deno.test("multiqueue: targets on two queues complete independently", async () => {
  const m = boot({ numQueues: 2 }, { queues: 2 });
  const a = m.driver.openTarget({ queue: 0, depth: 2, maxTransfer: 4096 });
  const b = m.driver.openTarget({ queue: 1, depth: 2, maxTransfer: 4096 });
  await io(a, "write", 0, 512, 0xaa);
  await io(b, "write", 512, 512, 0xbb);
  const stats = m.driver.stats();
  assert.deepEqual(stats.map((s) => s.completions), [1, 1]);
  assert.deepEqual(stats.map((s) => s.kicks), [1, 1]);
  assert.equal(m.model.disk[0], 0xaa);
  assert.equal(m.model.disk[512], 0xbb);
});

Deno.test("INTx mode: completions still arrive (ISR read per interrupt)", async () => {
  const m = boot({}, {}, 1);
  assert.equal(m.driver.virtio.interruptMode, "intx");
  const t = m.driver.openTarget({ depth: 1, maxTransfer: 4096 });
  await io(t, "write", 0, 512, 3);
  assert.equal((await io(t, "read", 0, 512)).data[0], 3);
});

Deno.test("DEVICE_NEEDS_RESET makes wait() throw instead of waiting for ever", async () => {
  const m = boot();
  const t = m.driver.openTarget({ depth: 1, maxTransfer: 4096 });
  m.model.stall = true;
  const r = t.acquire()!;
  r.op = "read";
  r.offset = 0;
  r.length = 512;
  t.submit(r);
  t.commit();
  await t.wait(); // the device pops and holds it
  m.fn.needsReset();
  await assert.rejects(async () => {
    for (;;) await t.wait();
  }, (e: unknown) => {
    assert.ok(e instanceof VirtioDriverError);
    assert.equal(e.kind, "needs-reset");
    assert.match(e.message, /DEVICE_NEEDS_RESET/);
    return true;
  });
});

Deno.test("a device that stops completing times out", async () => {
  const m = boot({}, { timeoutMs: 30 });
  const t = m.driver.openTarget({ depth: 1, maxTransfer: 4096 });
  m.model.stall = true;
  await assert.rejects(() => io(t, "read", 0, 512), (e: unknown) => {
    assert.ok(e instanceof VirtioDriverError);
    assert.equal(e.kind, "request-timeout");
    assert.match(e.message, /queue 0: 1 requests without a completion for 30 ms/);
    return true;
  });
});

Deno.test("a device completing a request that is not in flight breaks the driver", async () => {
  const m = boot({}, { indirect: false, eventIdx: false });
  const t = m.driver.openTarget({ depth: 1, maxTransfer: 4096 });
  await io(t, "read", 0, 512);
  // Replay the last used element: used.idx moves on, naming a chain that is free.
  const layout = m.driver.virtio.queues[0]!.ring.layout;
  const idx = m.mem.u16(layout.device + 2);
  m.mem.setU32(layout.device + 4 + 8 * (idx % layout.size), 0);
  m.mem.setU16(layout.device + 2, idx + 1);
  m.fn.interrupts.notifyQueue(0);
  m.platform.interrupts.dispatchPending();
  assert.match(
    m.driver.virtio.broken ?? "",
    /queue 0: Device returned chain 0, which is not in use/,
  );
});

Deno.test("closing a target returns its slot memory; open targets are refused beyond the device limits", () => {
  const m = boot({ queueMax: 4 }, { queueSize: 4, indirect: false });
  const used = m.platform.alloc.stats.used;
  const t = m.driver.openTarget({ depth: 8, maxTransfer: 4096 });
  assert.ok(m.platform.alloc.stats.used > used);
  t.close();
  assert.equal(m.platform.alloc.stats.used, used);
  assert.throws(() => m.driver.openTarget({ maxTransfer: 65536 * 3 }), /needs 5 descriptors/);
  assert.throws(() => m.driver.openTarget({ queue: 1 }), /Queue 1 is not 0\.\.0/);
});

Deno.test("a bad blk_size is refused at init", () => {
  assert.throws(() => boot({ blkSize: 1000 }), /blk_size 1000 is not a power of 2/);
});
