/**
 * End to end on one thread: the guest's BlkDriver → PciBus → VirtioPciFunction(VirtioBlkModel),
 * with the real VirtioBlkBackend run synchronously by the guest's idle step over an in-memory raw
 * node. What the guest writes is what the block node holds and what the guest reads back.
 */
import assert from "node:assert/strict";
import { RawNode } from "../../formats/raw.ts";
import {
  VirtioBlkBackend,
  VirtioBlkModel,
  type VirtioBlkOptions,
} from "../../src/devices/virtio_blk.ts";
import { BlkDriver, type BlkDriverOptions } from "../../src/guest/blk_driver.ts";
import { runOne } from "../../src/guest/block_target.ts";
import { runGuest } from "../../src/guest/guest.ts";
import { probeSlot } from "../../src/guest/pci_probe.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import { isPackedRing, queueFeaturesOf } from "../../src/virtio/device.ts";
import { PackedDeviceQueue } from "../../src/virtio/packed_queue.ts";
import { type DeviceQueue, VirtqueueError } from "../../src/virtio/queue.ts";
import { SplitDeviceQueue } from "../../src/virtio/split_queue.ts";
import { makeMachine } from "./harness.ts";

/** A machine with a real virtio-blk over a RAM-backed raw image, the back-end run by `idle`. */
async function blkMachine(diskBytes: number, options: VirtioBlkOptions = {}) {
  const file = new MemoryFile("disk.raw", new Uint8Array(diskBytes));
  const node = await RawNode.open(file);
  const model = new VirtioBlkModel({ serial: "vstor-e2e", ...options }, node);
  const backend = new VirtioBlkBackend(node, model.options, model.shared);
  let active: (DeviceQueue | undefined)[] = [];
  let broken = 0;
  const m = makeMachine(model, {
    idle: async () => {
      for (let q = 0; q < active.length; q++) {
        if (active[q] === undefined) continue;
        try {
          await backend.processQueue(q, () => m.fn.interrupts.notifyQueue(q));
        } catch (error) {
          if (!(error instanceof VirtqueueError)) throw error;
          broken++;
          m.fn.needsReset();
        }
      }
    },
  });
  model.hooks = {
    activate: (features, queues) => {
      const qf = queueFeaturesOf(features);
      active = [];
      for (const q of queues) {
        active[q.index] = isPackedRing(features)
          ? new PackedDeviceQueue(m.mem, q.index, q.layout, qf)
          : new SplitDeviceQueue(m.mem, q.index, q.layout, qf);
      }
      backend.activate(m.mem, features, active);
    },
    reset: () => {
      active = [];
      backend.reset();
    },
    configChange: () => m.fn.configChanged(),
  };
  return { ...m, file, node, backend, brokenCount: () => broken };
}

/** Where two byte ranges first differ, or -1 (assert.deepEqual's diff of large arrays is slow). */
function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

for (
  const [name, options] of [
    ["split", {}],
    ["packed", { packed: true }],
    ["split without indirect or event idx", { indirect: false, eventIdx: false }],
  ] as [string, BlkDriverOptions][]
) {
  Deno.test(`e2e (${name}): data the guest writes is in the image and reads back equal`, async () => {
    const m = await blkMachine(1024 * 1024, { packed: true }); // offered; the driver chooses
    const driver = BlkDriver.init(m.platform, probeSlot(m.bus, m.slot)!, options);
    assert.equal(isPackedRing(driver.features), options.packed === true);
    const t = driver.openTarget({ depth: 4, maxTransfer: 65536 });
    const pattern = new Uint8Array(65536).map((_, i) => (i * 31 + 7) & 0xff);
    const status = await runOne(t, (r) => {
      r.op = "write";
      r.offset = 131072;
      r.length = 65536;
      r.data.set(pattern);
    });
    assert.equal(status, "ok");
    assert.equal(firstDifference(m.file.contents().subarray(131072, 131072 + 65536), pattern), -1);
    let back = new Uint8Array(0);
    await runOne(t, (r) => {
      r.op = "read";
      r.offset = 131072 + 4096;
      r.length = 8192;
      r.data.fill(0);
    }, (r) => {
      back = r.data.slice(0, 8192);
    });
    assert.equal(firstDifference(back, pattern.subarray(4096, 4096 + 8192)), -1);
    assert.equal(
      await runOne(t, (r) => {
        r.op = "flush";
        r.offset = 0;
        r.length = 0;
      }),
      "ok",
    );
    t.close();
    assert.equal(await driver.getId(), "vstor-e2e");
    assert.equal(m.brokenCount(), 0);
    driver.shutdown();
  });
}

Deno.test("e2e: a verified random-write job, then verify_only, through the real back-end", async () => {
  const m = await blkMachine(4 * 1024 * 1024, { numQueues: 2 });
  const env = { bus: m.bus, mem: m.mem, vcpu: m.vcpu, idle: m.platform.idle };
  const job = ["--rw=randwrite", "--bs=16k", "--iodepth=16", "--verify=crc32c", "--randseed=3"];
  const first = await runGuest(env, {
    args: ["--name=a", ...job, "--numjobs=2", "--size=2m", "--offset_increment=2m"],
  });
  for (const j of first.result.jobs) {
    assert.equal(j.error, null);
    assert.deepEqual(j.verify, { checked: 128, failed: 0, failures: [] });
  }
  assert.equal(first.device.queues, 2);
  assert.deepEqual(first.virtio.queues.map((q) => q.requests), [256, 256]);
  assert.ok(first.virtio.queues.every((q) => q.kicks < q.requests), "EVENT_IDX suppressed kicks");

  const again = await runGuest(env, {
    args: [
      "--name=a",
      ...job,
      "--numjobs=2",
      "--size=2m",
      "--offset_increment=2m",
      "--verify_only",
    ],
  });
  assert.ok(again.result.jobs.every((j) => j.verify?.failed === 0 && j.write.ops === 0));

  // Damage the image behind the guest's back: the next check names the byte.
  const at = 2 * 1024 * 1024 + 12345;
  const byte = new Uint8Array(1);
  m.file.readAt(at, byte);
  byte[0]! ^= 0x80;
  m.file.writeAt(at, byte);
  const damaged = await runGuest(env, {
    args: [
      "--name=a",
      ...job,
      "--numjobs=2",
      "--size=2m",
      "--offset_increment=2m",
      "--verify_only",
    ],
  });
  const f = damaged.result.jobs[1]!.verify!.failures[0]!;
  assert.equal(damaged.result.jobs[1]!.verify!.failed, 1);
  assert.equal(f.offset, 2 * 1024 * 1024 + 12345);
  assert.equal(f.foundByte ^ f.expectedByte, 0x80);
  assert.equal(damaged.result.jobs[0]!.verify!.failed, 0);
});
