import assert from "node:assert/strict";
import { GuestMemory } from "../../src/virtio/memory.ts";
import {
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "../../src/virtio/features.ts";
import { PackedDeviceQueue, packedRingLayout } from "../../src/virtio/packed_queue.ts";
import {
  type DescriptorChain,
  type QueueStats,
  type UsedElement,
  VirtqueueError,
} from "../../src/virtio/queue.ts";
import {
  assertFaultThenRecover,
  CTL_DOORBELL,
  CTL_IRQ,
  CTL_STOP,
  type DeviceWorkerReport,
  type DeviceWorkerSetup,
  HIGH_RAM,
  LOST_WAKEUP_MS,
  makeRig,
  mulberry32,
  randInt,
  RawDriver,
  readDesc,
  READY,
  type Rig,
  usedBits,
  writeTable,
} from "./packed_harness.ts";

const NO_FEATURES = { indirect: false, eventIdx: false };

/** Completes every available chain with `written` = its writable length; returns them. */
function serveAll(device: PackedDeviceQueue): DescriptorChain[] {
  const out: DescriptorChain[] = [];
  for (let c = device.pop(); c; c = device.pop()) {
    device.push(c, c.writableLength);
    out.push(c);
  }
  device.publish();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Layout

Deno.test("packedRingLayout() places the ring 16-aligned and both event structures after it", () => {
  const l = packedRingLayout(5, 0x1003);
  assert.deepEqual(l, { size: 5, desc: 0x1010, driver: 0x1060, device: 0x1064, bytes: 0x65 });
  assert.equal(packedRingLayout(32768, 0).bytes, 16 * 32768 + 8);
  assert.throws(() => packedRingLayout(0, 0), RangeError);
  assert.throws(() => packedRingLayout(32769, 0), RangeError);
  assert.throws(() => packedRingLayout(3.5, 0), RangeError);
  assert.throws(() => packedRingLayout(4, -16), RangeError);
});

Deno.test("PackedDeviceQueue accepts sizes that are not powers of 2", () => {
  const mem = new GuestMemory([{ gpa: 0, size: 8192 }]);
  for (const size of [1, 3, 100, 255]) {
    const q = new PackedDeviceQueue(mem, 0, packedRingLayout(size, 0), NO_FEATURES);
    assert.equal(q.layout.size, size);
  }
});

Deno.test("PackedDeviceQueue rejects a bad ring layout (bad-ring-layout)", () => {
  const mem = new GuestMemory([{ gpa: 0, size: 8192 }, { gpa: 0x10000, size: 4096 }]);
  const good = packedRingLayout(16, 0x100);
  const cases: [string, typeof good][] = [
    ["size 0", { ...good, size: 0 }],
    ["size 32769", { ...good, size: 32769 }],
    ["fractional size", { ...good, size: 2.5 }],
    ["ring not 16-aligned", { ...good, desc: 0x108 }],
    ["driver area not 4-aligned", { ...good, driver: good.driver + 2 }],
    ["device area not 4-aligned", { ...good, device: good.device + 1 }],
    ["negative address", { ...good, desc: -16 }],
    ["ring in the hole", { ...good, desc: 0x4000 }],
    ["ring across the end of a region", { ...good, desc: 8192 - 128 }],
    ["ring past the end of RAM", { ...good, desc: 0x10000 + 4096 - 16 * 8 }],
    ["device area outside RAM", { ...good, device: 0x20000 }],
    ["driver area inside the ring", { ...good, driver: good.desc + 32 }],
    ["both event structures at one address", { ...good, device: good.driver }],
  ];
  for (const [why, layout] of cases) {
    assert.throws(
      () => new PackedDeviceQueue(mem, 7, layout, NO_FEATURES),
      (e: unknown) => e instanceof VirtqueueError && e.fault === "bad-ring-layout" && e.queue === 7,
      why,
    );
  }
});

// ---------------------------------------------------------------------------------------------
// Round trips

Deno.test("PackedDriverQueue and PackedDeviceQueue round-trip a chain with zero-copy views", () => {
  const rig = makeRig({ size: 8 });
  const { mem, driver, device } = rig;
  const h = rig.high;
  mem.write(h, new Uint8Array([1, 2, 3, 4]));
  mem.write(h + 0x100, new Uint8Array([5, 6]));
  assert.ok(
    driver.add(
      [{ addr: h, length: 4 }, { addr: h + 0x100, length: 2 }],
      [{ addr: h + 0x200, length: 16 }, { addr: h + 0x300, length: 1 }],
      42,
    ),
  );
  assert.equal(driver.free, 4);
  assert.equal(driver.kick(), true);
  assert.equal(driver.stats.kicks, 1);

  const c = device.pop();
  assert.ok(c);
  assert.equal(c.id, 0);
  assert.equal(c.slots, 4);
  assert.equal(c.readableLength, 6);
  assert.equal(c.writableLength, 17);
  assert.deepEqual(c.readable.map((v) => [...v]), [[1, 2, 3, 4], [5, 6]]);
  assert.deepEqual(c.writable.map((v) => v.length), [16, 1]);
  // The views are guest memory, not copies: both directions are seen at once.
  assert.equal(c.readable[0]!.buffer, mem.buffer);
  mem.setU8(h + 1, 99);
  assert.equal(c.readable[0]![1], 99);
  c.writable[0]!.fill(0xab);
  c.writable[1]![0] = 0xcd;
  assert.equal(mem.u8(h + 0x20f), 0xab);
  assert.equal(device.inFlight, 1);
  assert.equal(device.pop(), null);

  device.push(c, 17);
  assert.equal(device.inFlight, 0);
  assert.equal(driver.getUsed(), null, "a pushed completion is invisible until publish");
  assert.equal(device.publish(), true);
  assert.equal(device.stats.interrupts, 1);
  assert.equal(device.stats.chains, 1);
  assert.equal(mem.u8(h + 0x300), 0xcd);

  // One used descriptor for the chain, written over its first slot.
  const used = readDesc(mem, rig.layout, 0);
  assert.equal(used.id, 0);
  assert.equal(used.len, 17);
  assert.equal(used.flags, usedBits(true, true));

  assert.deepEqual(driver.getUsed(), { token: 42, written: 17 });
  assert.equal(driver.getUsed(), null);
  assert.equal(driver.free, 8);
  assert.equal(driver.stats.chains, 1);
});

Deno.test("PackedDriverQueue reports 0 bytes written when the used descriptor has no WRITE flag", () => {
  const rig = makeRig({ size: 4 });
  const { driver, device } = rig;
  assert.ok(driver.add([{ addr: rig.high, length: 8 }], [], 1));
  const c = device.pop()!;
  device.push(c, 0);
  device.publish();
  assert.equal(readDesc(rig.mem, rig.layout, 0).flags, usedBits(true, false));
  assert.deepEqual(driver.getUsed(), { token: 1, written: 0 });
});

Deno.test("PackedDeviceQueue walks chains that wrap around the end of the ring", () => {
  const rig = makeRig({ size: 5 });
  const { mem, driver, device } = rig;
  for (let i = 0; i < 8; i++) mem.setU8(rig.high + i * 16, 10 + i);
  const bufs = (from: number, n: number) =>
    Array.from({ length: n }, (_, k) => ({ addr: rig.high + (from + k) * 16, length: 1 }));
  // 3 slots, then a chain of 4 that takes slots 3, 4, 0, 1 — across the end.
  assert.ok(driver.add(bufs(0, 3), [], 100));
  assert.equal(serveAll(device).length, 1);
  assert.equal(driver.getUsed()?.token, 100);
  assert.ok(driver.add(bufs(3, 3), bufs(6, 1), 101));
  const c = device.pop();
  assert.ok(c);
  assert.equal(c.slots, 4);
  assert.deepEqual(c.readable.map((v) => v[0]), [13, 14, 15]);
  assert.deepEqual(c.writable.map((v) => v[0]), [16]);
  device.push(c, 1);
  device.publish();
  assert.deepEqual(driver.getUsed(), { token: 101, written: 1 });
  // The used descriptor went to slot 3 with the wrap counter still 1; the next lap starts at 2.
  assert.equal(readDesc(mem, rig.layout, 3).flags, usedBits(true, true));
  assert.ok(driver.add(bufs(7, 1), [], 102));
  const next = device.pop();
  assert.deepEqual(next?.readable.map((v) => v[0]), [17]);
  assert.equal(readDesc(mem, rig.layout, 2).addr, rig.high + 7 * 16);
});

Deno.test("PackedDeviceQueue takes the buffer id from the last descriptor of a chain", () => {
  const rig = makeRig({ size: 4 });
  const raw = new RawDriver(rig.mem, rig.layout);
  raw.offer([
    { addr: rig.high, len: 4, id: 3, flags: VIRTQ_DESC_F_NEXT },
    { addr: rig.high + 16, len: 4, id: 1, flags: VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE },
    { addr: rig.high + 32, len: 4, id: 2, flags: VIRTQ_DESC_F_WRITE },
  ]);
  const c = rig.device.pop();
  assert.ok(c);
  assert.equal(c.id, 2);
  assert.equal(c.slots, 3);
  rig.device.push(c, 8);
  rig.device.publish();
  assert.deepEqual(readDesc(rig.mem, rig.layout, 0), {
    addr: rig.high,
    len: 8,
    id: 2,
    flags: usedBits(true, true),
  });
});

Deno.test("Packed wrap counters flip correctly over many laps of rings of size 1, 2 and 3", () => {
  for (const size of [1, 2, 3]) {
    const rig = makeRig({ size });
    const { mem, driver, device } = rig;
    for (let lap = 0; lap < 2000; lap++) {
      const n = 1 + (lap % size);
      const bufs = Array.from({ length: n }, (_, k) => ({ addr: rig.high + k * 64, length: 8 }));
      mem.setU32(rig.high, lap);
      assert.ok(driver.add(bufs.slice(0, 1), bufs.slice(1), lap), `size ${size} lap ${lap}`);
      const c = device.pop();
      assert.ok(c, `size ${size} lap ${lap}`);
      assert.equal(c.slots, n);
      assert.equal(
        new DataView(c.readable[0]!.buffer, c.readable[0]!.byteOffset).getUint32(0, true),
        lap,
      );
      assert.equal(device.pop(), null);
      device.push(c, c.writableLength);
      device.publish();
      assert.deepEqual(driver.getUsed(), { token: lap, written: 8 * (n - 1) });
      assert.equal(driver.getUsed(), null);
      assert.equal(driver.free, size);
    }
    assert.equal(device.stats.chains, 2000);
  }
});

Deno.test("PackedDeviceQueue completes chains out of order, skipping ahead by each chain's slots", () => {
  const rig = makeRig({ size: 8 });
  const { driver, device } = rig;
  const b = (k: number) => ({ addr: rig.high + k * 64, length: 64 });
  assert.ok(driver.add([b(0)], [b(1), b(2)], 10)); // 3 slots
  assert.ok(driver.add([b(3)], [], 11)); // 1 slot
  assert.ok(driver.add([b(4)], [b(5)], 12)); // 2 slots
  const [a, bb, c] = [device.pop()!, device.pop()!, device.pop()!];
  assert.deepEqual([a.id, bb.id, c.id], [0, 1, 2]);
  device.push(c, 64);
  device.push(a, 128);
  assert.equal(device.publish(), true);
  device.push(bb, 0);
  assert.equal(device.publish(), true);
  assert.deepEqual(driver.getUsed(), { token: 12, written: 64 });
  assert.deepEqual(driver.getUsed(), { token: 10, written: 128 });
  assert.deepEqual(driver.getUsed(), { token: 11, written: 0 });
  assert.equal(driver.getUsed(), null);
  assert.equal(driver.free, 8);
  // Used descriptors went to slots 0 (id 2, 2 slots), 2 (id 0, 3 slots), 5 (id 1).
  assert.deepEqual([0, 2, 5].map((s) => readDesc(rig.mem, rig.layout, s).id), [2, 0, 1]);
  // Ids freed out of order are reused: the ring keeps working past the wrap.
  for (let i = 0; i < 20; i++) {
    assert.ok(driver.add([b(0)], [b(1)], 100 + i));
    serveAll(device);
    assert.equal(driver.getUsed()?.token, 100 + i);
  }
});

Deno.test("PackedDeviceQueue rejects a push of a chain that is not in flight", () => {
  const rig = makeRig({ size: 4 });
  assert.ok(
    rig.driver.add([{ addr: rig.high, length: 4 }], [{ addr: rig.high + 8, length: 4 }], 1),
  );
  const c = rig.device.pop()!;
  assert.throws(() => rig.device.push(c, 5), RangeError, "more than the writable length");
  assert.throws(() => rig.device.push(c, -1), RangeError);
  rig.device.push(c, 4);
  assert.throws(() => rig.device.push(c, 4), RangeError, "pushed twice");
  assert.throws(() => rig.device.push({ ...c, id: 3 }, 0), RangeError, "never popped");
  assert.equal(rig.device.publish(), true);
  assert.equal(rig.device.publish(), false, "nothing staged: no interrupt, nothing counted");
  assert.equal(rig.device.stats.interrupts, 1);
});

Deno.test("PackedDriverQueue refuses a chain when the ring has no room and accepts it after a completion", () => {
  const rig = makeRig({ size: 3 });
  const { driver, device } = rig;
  const b = { addr: rig.high, length: 4 };
  assert.ok(driver.add([b, b], [], 1));
  assert.equal(driver.add([b, b], [], 2), false);
  assert.ok(driver.add([b], [], 3));
  assert.equal(driver.add([b], [], 4), false);
  assert.throws(() => driver.add([b, b, b, b], [], 5), RangeError, "longer than the ring");
  assert.throws(() => driver.add([], [], 6), RangeError);
  serveAll(device);
  assert.equal(driver.getUsed()?.token, 1);
  assert.ok(driver.add([b, b], [], 2));
});

// ---------------------------------------------------------------------------------------------
// Ordering: the flags that expose a batch are written last

class SpyMemory extends GuestMemory {
  flagStores: number[] = [];
  override atomicSetU16(gpa: number, v: number): void {
    this.flagStores.push(gpa);
    super.atomicSetU16(gpa, v);
  }
}

Deno.test("PackedDriverQueue writes the head descriptor's flags last so the chain appears at once", () => {
  let spy: SpyMemory | undefined;
  const rig = makeRig({
    size: 4,
    memory: (r) => (spy = new SpyMemory(r)),
  });
  const b = { addr: rig.high, length: 4 };
  assert.ok(rig.driver.add([b], [], 0));
  serveAll(rig.device);
  assert.equal(rig.driver.getUsed()?.token, 0);
  spy!.flagStores = [];
  // Slots 1, 2, 3, 0: the head is slot 1.
  assert.ok(rig.driver.add([b, b], [b, b], 1));
  const flagsAt = (slot: number) => rig.layout.desc + slot * 16 + 14;
  assert.deepEqual(spy!.flagStores, [flagsAt(2), flagsAt(3), flagsAt(0), flagsAt(1)]);
});

Deno.test("PackedDeviceQueue.publish() writes the first used descriptor's flags last", () => {
  let spy: SpyMemory | undefined;
  const rig = makeRig({ size: 8, memory: (r) => (spy = new SpyMemory(r)) });
  const b = { addr: rig.high, length: 4 };
  assert.ok(rig.driver.add([b], [b], 0));
  assert.ok(rig.driver.add([b], [], 1));
  assert.ok(rig.driver.add([b], [b, b], 2));
  const chains = [rig.device.pop()!, rig.device.pop()!, rig.device.pop()!];
  rig.device.push(chains[1]!, 0);
  rig.device.push(chains[2]!, 8);
  rig.device.push(chains[0]!, 4);
  spy!.flagStores = [];
  rig.device.publish();
  const flagsAt = (slot: number) => rig.layout.desc + slot * 16 + 14;
  // id 1 (1 slot) at 0, id 2 (3 slots) at 1, id 0 (2 slots) at 4; slot 0 is exposed last.
  assert.deepEqual(spy!.flagStores, [flagsAt(1), flagsAt(4), flagsAt(0)]);
  assert.deepEqual([0, 1, 4].map((s) => readDesc(rig.mem, rig.layout, s).id), [1, 2, 0]);
});

// ---------------------------------------------------------------------------------------------
// Indirect descriptors

Deno.test("PackedDeviceQueue reads an indirect table as one ring slot", () => {
  const rig = makeRig({ size: 2, indirect: true });
  const { mem, driver, device } = rig;
  const table = rig.lowFree;
  const bufs = Array.from({ length: 2 }, (_, k) => ({ addr: rig.high + k * 32, length: 32 }));
  mem.fill(rig.high, 32, 7);
  // Two buffers in one ring slot: the table holds them.
  assert.ok(driver.add([bufs[0]!], [bufs[1]!], 5, table));
  assert.equal(driver.free, 1);
  assert.equal(readDesc(mem, rig.layout, 0).flags & VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_INDIRECT);
  assert.equal(readDesc(mem, rig.layout, 0).len, 32);
  const c = device.pop();
  assert.ok(c);
  assert.equal(c.slots, 1);
  assert.deepEqual(c.readable.map((v) => v.length), [32]);
  assert.equal(c.readable[0]![31], 7);
  assert.equal(c.writableLength, 32);
  device.push(c, 32);
  device.publish();
  assert.deepEqual(driver.getUsed(), { token: 5, written: 32 });
  assert.equal(driver.free, 2);
});

Deno.test("PackedDeviceQueue ignores NEXT and the id inside an indirect table", () => {
  const rig = makeRig({ size: 4, indirect: true });
  const table = rig.lowFree;
  writeTable(rig.mem, table, [
    { addr: rig.high, len: 4, id: 9, flags: VIRTQ_DESC_F_NEXT },
    { addr: rig.high + 16, len: 4, id: 9, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT },
  ]);
  new RawDriver(rig.mem, rig.layout).offer([
    { addr: table, len: 32, id: 1, flags: VIRTQ_DESC_F_INDIRECT },
  ]);
  const c = rig.device.pop();
  assert.ok(c);
  assert.equal(c.id, 1);
  assert.deepEqual([c.readable.length, c.writable.length], [1, 1]);
});

Deno.test("PackedDriverQueue falls back to direct descriptors when INDIRECT_DESC is not negotiated", () => {
  const rig = makeRig({ size: 4, indirect: false });
  const b = { addr: rig.high, length: 4 };
  assert.ok(rig.driver.add([b, b], [b], 1, rig.lowFree));
  assert.equal(rig.driver.free, 1);
  const c = rig.device.pop();
  assert.equal(c?.slots, 3);
});

// ---------------------------------------------------------------------------------------------
// Event suppression

Deno.test("PackedDriverQueue.kick() follows the device's ENABLE and DISABLE flags without EVENT_IDX", () => {
  const rig = makeRig({ size: 8 });
  const { driver, device, mem } = rig;
  const b = { addr: rig.high, length: 4 };
  assert.equal(driver.kick(), false, "nothing added: no kick, nothing counted");
  assert.ok(driver.add([b], [], 1));
  assert.equal(driver.kick(), true);
  device.disableNotifications();
  assert.equal(mem.u16(rig.layout.device + 2), RING_EVENT_FLAGS_DISABLE);
  assert.ok(driver.add([b], [], 2));
  assert.equal(driver.kick(), false);
  assert.ok(driver.add([b], [], 3));
  assert.equal(driver.kick(), false);
  assert.equal(device.pop()?.id, 0);
  assert.equal(device.pop()?.id, 1);
  assert.equal(device.pop()?.id, 2);
  assert.equal(device.enableNotifications(), false);
  assert.equal(mem.u16(rig.layout.device + 2), RING_EVENT_FLAGS_ENABLE);
  assert.ok(driver.add([b], [], 4));
  assert.equal(driver.kick(), true);
  assert.deepEqual([driver.stats.kicks, driver.stats.suppressedKicks], [2, 2]);
});

Deno.test("PackedDriverQueue.kick() with EVENT_IDX kicks only when it passes the device's event slot", () => {
  const rig = makeRig({ size: 4, eventIdx: true });
  const { driver, device, mem } = rig;
  const b = { addr: rig.high, length: 4 };
  // Device idle and waiting: event at slot 0, wrap 1.
  assert.equal(device.enableNotifications(), false);
  assert.equal(mem.u16(rig.layout.device + 2), RING_EVENT_FLAGS_DESC);
  assert.equal(mem.u16(rig.layout.device), 0x8000);
  assert.ok(driver.add([b], [], 1));
  assert.equal(driver.kick(), true, "slot 0 made available: the device asked for it");
  assert.ok(driver.add([b], [], 2));
  assert.equal(driver.kick(), false, "the device has not caught up: no new kick");
  // The device drains with notifications off, then waits at slot 2.
  device.disableNotifications();
  serveAll(device);
  assert.equal(device.enableNotifications(), false);
  assert.equal(mem.u16(rig.layout.device), 0x8002);
  driver.getUsed();
  driver.getUsed();
  // Chains at slots 2,3 and then 0 of the next lap: the event (2, wrap 1) lies one lap back.
  assert.ok(driver.add([b, b], [], 3));
  assert.ok(driver.add([b], [], 4));
  assert.equal(driver.kick(), true);
  device.disableNotifications();
  assert.equal(serveAll(device).length, 2);
  // Waiting at slot 1 of lap 2: off_wrap carries wrap bit 0 now.
  assert.equal(device.enableNotifications(), false);
  assert.equal(mem.u16(rig.layout.device), 0x0001);
  driver.getUsed();
  driver.getUsed();
  assert.ok(driver.add([b], [], 5));
  assert.equal(driver.kick(), true);
  assert.deepEqual([driver.stats.kicks, driver.stats.suppressedKicks], [3, 1]);
});

Deno.test("PackedDeviceQueue.publish() follows the driver's ENABLE and DISABLE flags without EVENT_IDX", () => {
  const rig = makeRig({ size: 4 });
  const { driver, device, mem } = rig;
  const b = { addr: rig.high, length: 4 };
  const one = () => {
    assert.ok(driver.add([b], [], 0));
    const c = device.pop()!;
    device.push(c, 0);
    return device.publish();
  };
  assert.equal(one(), true);
  driver.disableInterrupts();
  assert.equal(mem.u16(rig.layout.driver + 2), RING_EVENT_FLAGS_DISABLE);
  assert.equal(one(), false);
  assert.equal(one(), false);
  assert.equal(driver.enableInterrupts(), true, "completions arrived while disabled");
  while (driver.getUsed());
  assert.equal(driver.enableInterrupts(), false);
  assert.equal(mem.u16(rig.layout.driver + 2), RING_EVENT_FLAGS_ENABLE);
  assert.equal(one(), true);
  assert.deepEqual([device.stats.interrupts, device.stats.suppressedInterrupts], [2, 2]);
});

Deno.test("PackedDeviceQueue.publish() with EVENT_IDX interrupts only when it passes the driver's event slot", () => {
  const rig = makeRig({ size: 4, eventIdx: true });
  const { driver, device, mem } = rig;
  const b = { addr: rig.high, length: 4 };
  assert.equal(driver.enableInterrupts(), false);
  assert.equal(mem.u16(rig.layout.driver + 2), RING_EVENT_FLAGS_DESC);
  assert.equal(mem.u16(rig.layout.driver), 0x8000);
  for (let i = 0; i < 3; i++) assert.ok(driver.add([b], [], i));
  const cs = [device.pop()!, device.pop()!, device.pop()!];
  device.push(cs[0]!, 0);
  assert.equal(device.publish(), true, "slot 0 used: the driver asked for it");
  device.push(cs[1]!, 0);
  assert.equal(device.publish(), false, "the driver has not reaped yet");
  // Reaping moves the event (as Linux's get_buf does): the next completion interrupts.
  assert.equal(driver.getUsed()?.token, 0);
  assert.equal(driver.getUsed()?.token, 1);
  assert.equal(mem.u16(rig.layout.driver), 0x8002);
  device.push(cs[2]!, 0);
  assert.equal(device.publish(), true);
  assert.equal(driver.getUsed()?.token, 2);
  // Across the wrap: the event (3, wrap 1); the device publishes slots 3 and 0 (wrap 0) at once.
  assert.ok(driver.add([b], [], 3));
  assert.ok(driver.add([b], [], 4));
  const d = [device.pop()!, device.pop()!];
  device.push(d[0]!, 0);
  device.push(d[1]!, 0);
  assert.equal(device.publish(), true);
  assert.equal(driver.getUsed()?.token, 3);
  assert.equal(driver.getUsed()?.token, 4);
  assert.equal(mem.u16(rig.layout.driver), 0x0001);
  // An event further ahead in this lap (slot 3, wrap 0) is not passed by one completion.
  driver.disableInterrupts();
  mem.setU16(rig.layout.driver, 0x0003);
  mem.setU16(rig.layout.driver + 2, RING_EVENT_FLAGS_DESC);
  assert.ok(driver.add([b], [], 5));
  device.push(device.pop()!, 0);
  assert.equal(device.publish(), false);
  assert.deepEqual([device.stats.interrupts, device.stats.suppressedInterrupts], [3, 2]);
});

Deno.test("PackedDeviceQueue treats DESC without EVENT_IDX, and the reserved flag value, as ENABLE", () => {
  const rig = makeRig({ size: 4, eventIdx: false });
  const { driver, device, mem } = rig;
  for (const flags of [RING_EVENT_FLAGS_DESC, 3]) {
    mem.setU16(rig.layout.driver + 2, flags);
    mem.setU16(rig.layout.driver, 0x7fff);
    assert.ok(driver.add([{ addr: rig.high, length: 4 }], [], flags));
    device.push(device.pop()!, 0);
    assert.equal(device.publish(), true);
    driver.getUsed();
  }
});

Deno.test("PackedDeviceQueue.enableNotifications() reports chains that arrived during the drain", () => {
  for (const eventIdx of [false, true]) {
    const rig = makeRig({ size: 8, eventIdx });
    const { driver, device } = rig;
    const b = { addr: rig.high, length: 4 };
    assert.ok(driver.add([b], [], 1));
    assert.equal(driver.kick(), true);
    // The iothread wakes: disable, drain…
    device.disableNotifications();
    assert.ok(device.pop());
    assert.equal(device.pop(), null);
    // …and the driver adds just before the device re-enables: its kick is suppressed.
    assert.ok(driver.add([b], [], 2));
    assert.equal(driver.kick(), false);
    // The re-check catches it, so the device drains again instead of sleeping on a lost kick.
    assert.equal(device.enableNotifications(), true, `eventIdx ${eventIdx}`);
    device.disableNotifications();
    assert.equal(device.pop()?.id, 1);
    assert.equal(device.pop(), null);
    assert.equal(device.enableNotifications(), false);
    // Now asleep with kicks on: the next chain kicks.
    assert.ok(driver.add([b], [], 3));
    assert.equal(driver.kick(), true);
    assert.equal(device.stats.largestBatch, 1);
  }
});

Deno.test("PackedDriverQueue.enableInterrupts() reports completions that arrived while disabled", () => {
  for (const eventIdx of [false, true]) {
    const rig = makeRig({ size: 8, eventIdx });
    const { driver, device } = rig;
    const b = { addr: rig.high, length: 4 };
    assert.ok(driver.add([b], [], 1));
    assert.ok(driver.add([b], [], 2));
    device.push(device.pop()!, 0);
    assert.equal(device.publish(), true);
    // The interrupt handler: disable, reap…
    driver.disableInterrupts();
    assert.equal(driver.getUsed()?.token, 1);
    assert.equal(driver.getUsed(), null);
    // …the device completes another just before interrupts come back: suppressed.
    device.push(device.pop()!, 0);
    assert.equal(device.publish(), false);
    // The re-check catches it.
    assert.equal(driver.enableInterrupts(), true, `eventIdx ${eventIdx}`);
    driver.disableInterrupts();
    assert.equal(driver.getUsed()?.token, 2);
    assert.equal(driver.enableInterrupts(), false);
  }
});

Deno.test("PackedDeviceQueue keeps the EVENT_IDX kick event on the next slot when it pops with kicks on", () => {
  const rig = makeRig({ size: 8, eventIdx: true });
  const { driver, device, mem } = rig;
  const b = { addr: rig.high, length: 4 };
  assert.equal(device.enableNotifications(), false);
  assert.ok(driver.add([b, b], [], 1));
  assert.equal(driver.kick(), true);
  // A device that pops without disabling kicks first must still be kicked for the next chain.
  assert.ok(device.pop());
  assert.equal(mem.u16(rig.layout.device), 0x8002);
  assert.ok(driver.add([b], [], 2));
  assert.equal(driver.kick(), true);
});

Deno.test("PackedDriverQueue.kick() kicks after more than a lap was added without a kick", () => {
  const rig = makeRig({ size: 2, eventIdx: true });
  const { driver, device, mem } = rig;
  const b = { addr: rig.high, length: 4 };
  assert.ok(driver.add([b], [], 0));
  assert.equal(driver.kick(), true);
  // A polling device serves 5 more slots (positions 1..5) while the driver never kicks.
  device.disableNotifications();
  serveAll(device);
  driver.getUsed();
  for (let i = 1; i <= 5; i++) {
    assert.ok(driver.add([b], [], i));
    serveAll(device);
    assert.equal(driver.getUsed()?.token, i);
  }
  // The device's event (slot 1, wrap 0) was passed at position 3; one-lap arithmetic alone would
  // take it for a slot still ahead (the driver is at slot 0, wrap 0) and skip the kick.
  mem.setU16(rig.layout.device, 0x0001);
  mem.setU16(rig.layout.device + 2, RING_EVENT_FLAGS_DESC);
  assert.equal(driver.kick(), true);
});

Deno.test("PackedDeviceQueue counts the largest batch popped in one drain", () => {
  const rig = makeRig({ size: 16 });
  const b = { addr: rig.high, length: 4 };
  for (let i = 0; i < 5; i++) assert.ok(rig.driver.add([b], [], i));
  assert.equal(serveAll(rig.device).length, 5);
  for (let i = 0; i < 2; i++) assert.ok(rig.driver.add([b], [], i));
  serveAll(rig.device);
  assert.equal(rig.device.stats.largestBatch, 5);
  assert.equal(rig.device.stats.chains, 7);
});

// ---------------------------------------------------------------------------------------------
// Property test: both sides agree under random orders, with only kicks and interrupts to wake them

const SEED = 0x5eed_2024;

interface Pending {
  token: number;
  blocks: number[];
  lengths: number[];
  table: number;
  readable: number;
  writable: number;
}

/**
 * A driver and a device that each sleep until notified: the device drains only after a kick (with
 * the disable → drain → enable → re-check loop, one step at a time), the driver reaps only after
 * an interrupt (same loop). Submissions, pops, completions (in random order) and reaps interleave
 * randomly. Any lost notification leaves work stranded and fails the final drain.
 */
function simulate(
  size: number,
  seed: number,
  targetSlots: number,
  features: { indirect: boolean; eventIdx: boolean },
): QueueStats[] {
  const rng = mulberry32(seed);
  const { indirect, eventIdx } = features;
  const BLOCK = 16;
  const maxBufs = Math.min(size, 4);
  const blocks = size * maxBufs;
  const rig = makeRig({
    size,
    indirect,
    eventIdx,
    lowExtra: size * 64,
    highSize: blocks * BLOCK,
  });
  const { mem, driver, device } = rig;
  const where = `size ${size} seed 0x${
    seed.toString(16)
  } indirect ${indirect} eventIdx ${eventIdx}`;

  const freeBlocks = Array.from({ length: blocks }, (_, i) => i);
  const freeTables = Array.from({ length: size }, (_, i) => i);
  const outstanding = new Map<number, Pending>();
  let nextToken = 0;
  let slotsDone = 0;

  // Device state.
  let kickPending = false;
  let draining = false;
  let devDisabled = false;
  let devEmpty = false;
  const popped: DescriptorChain[] = [];
  let staged = 0;
  // Driver state.
  let irqPending = false;
  let handling = false;
  let drvDisabled = false;
  let drvEmpty = false;
  let simpleHandler = false;

  const pattern = (token: number, k: number, i: number) => (token * 7 + k * 13 + i) & 0xff;

  /** The driver reaps a few completions on its submit path, interrupts left as they are. */
  function poll(): void {
    for (let k = randInt(rng, 1, 4); k > 0 && reap(); k--);
  }

  function submit(): void {
    // Opportunistic reaping before submitting (virtio-net's xmit path does this); with interrupts
    // on in DESC mode it must move the driver's event along, or the device stops interrupting.
    if (rng() < 0.15) poll();
    const n = randInt(rng, 1, 4);
    let added = 0;
    for (let i = 0; i < n; i++) {
      const bufs = randInt(rng, 1, maxBufs);
      const readable = randInt(rng, 1, bufs);
      const useTable = indirect && rng() < 0.5;
      if (freeBlocks.length < bufs) {
        if (rng() < 0.5) poll();
        break;
      }
      const token = nextToken;
      const taken = freeBlocks.splice(freeBlocks.length - bufs, bufs);
      const list = taken.map((blk, k) => {
        const length = randInt(rng, k === 0 ? 4 : 1, BLOCK);
        const addr = rig.high + blk * BLOCK;
        if (k < readable) {
          for (let j = 0; j < length; j++) mem.setU8(addr + j, pattern(token, k, j));
          if (k === 0) mem.setU32(addr, token);
        }
        return { addr, length };
      });
      const table = useTable ? freeTables.pop()! : -1;
      const ok = driver.add(
        list.slice(0, readable),
        list.slice(readable),
        token,
        useTable ? rig.lowFree + table * 64 : undefined,
      );
      if (!ok) {
        freeBlocks.push(...taken);
        if (useTable) freeTables.push(table);
        if (rng() < 0.5) poll();
        break;
      }
      outstanding.set(token, {
        token,
        blocks: taken,
        lengths: list.map((l) => l.length),
        table,
        readable,
        writable: bufs - readable,
      });
      nextToken++;
      added++;
    }
    if (added > 0 && driver.kick()) kickPending = true;
  }

  function deviceStep(): void {
    if (!draining) {
      if (!kickPending) return;
      kickPending = false;
      draining = true;
      devDisabled = false;
    }
    if (devEmpty) {
      // The race window: the driver may have added since pop() saw the ring empty.
      devEmpty = false;
      devDisabled = false;
      if (!device.enableNotifications()) draining = false;
      return;
    }
    if (!devDisabled) {
      device.disableNotifications();
      devDisabled = true;
    }
    const n = randInt(rng, 1, 8);
    for (let i = 0; i < n; i++) {
      const c = device.pop();
      if (!c) {
        devEmpty = true;
        return;
      }
      const v = c.readable[0]!;
      const token = new DataView(v.buffer, v.byteOffset, 4).getUint32(0, true);
      const p = outstanding.get(token);
      assert.ok(p, `${where}: popped unknown token ${token}`);
      assert.equal(c.readable.length, p.readable, where);
      assert.equal(c.writable.length, p.writable, where);
      for (const [k, view] of c.readable.entries()) {
        for (let j = k === 0 ? 4 : 0; j < view.length; j++) {
          if (view[j] !== pattern(token, k, j)) assert.fail(`${where}: token ${token} byte ${j}`);
        }
      }
      popped.push(c);
    }
  }

  function complete(publishAlways: boolean): void {
    const n = randInt(rng, 0, popped.length);
    for (let i = 0; i < n; i++) {
      const at = randInt(rng, 0, popped.length - 1);
      const c = popped[at]!;
      popped[at] = popped[popped.length - 1]!;
      popped.pop();
      const written = randInt(rng, 0, c.writableLength);
      let left = written;
      const v = c.readable[0]!;
      const token = new DataView(v.buffer, v.byteOffset, 4).getUint32(0, true);
      for (const w of c.writable) {
        const k = Math.min(left, w.length);
        w.fill(token & 0xff, 0, k);
        left -= k;
      }
      device.push(c, written);
      staged++;
    }
    if (staged > 0 && (publishAlways || rng() < 0.6)) {
      staged = 0;
      if (device.publish()) irqPending = true;
    }
  }

  function driverStep(): void {
    if (!handling) {
      if (!irqPending) return;
      irqPending = false;
      handling = true;
      drvDisabled = false;
      simpleHandler = rng() < 0.3;
    }
    if (simpleHandler) {
      // A handler that reaps with interrupts left on and no re-check: correct only because each
      // getUsed() moves the DESC event to the next completion.
      for (let k = randInt(rng, 1, 8); k > 0; k--) {
        if (!reap()) {
          handling = false;
          return;
        }
      }
      return;
    }
    if (drvEmpty) {
      drvEmpty = false;
      drvDisabled = false;
      if (!driver.enableInterrupts()) handling = false;
      return;
    }
    if (!drvDisabled) {
      driver.disableInterrupts();
      drvDisabled = true;
    }
    const n = randInt(rng, 1, 8);
    for (let i = 0; i < n; i++) {
      const u = reap();
      if (!u) {
        drvEmpty = true;
        return;
      }
    }
  }

  /** The driver reaps one completion and checks it; null when there is none. */
  function reap(): UsedElement<number> | null {
    const u = driver.getUsed();
    if (u) {
      const p = outstanding.get(u.token);
      assert.ok(p, `${where}: reaped unknown token ${u.token}`);
      outstanding.delete(u.token);
      // The written bytes landed in the writable blocks, in order.
      let left = u.written;
      for (let w = p.readable; w < p.blocks.length; w++) {
        const addr: number = rig.high + p.blocks[w]! * BLOCK;
        const k = Math.min(left, p.lengths[w]!);
        if (k > 0) {
          assert.equal(mem.u8(addr), u.token & 0xff, where);
          assert.equal(mem.u8(addr + k - 1), u.token & 0xff, where);
        }
        left -= k;
      }
      freeBlocks.push(...p.blocks);
      if (p.table >= 0) freeTables.push(p.table);
      slotsDone += p.table >= 0 ? 1 : p.blocks.length;
    }
    return u;
  }

  for (let guard = 0; slotsDone < targetSlots; guard++) {
    assert.ok(guard < 50_000_000, `${where}: no progress`);
    const r = rng();
    if (r < 0.3) submit();
    else if (r < 0.55) deviceStep();
    else if (r < 0.8) complete(false);
    else driverStep();
  }

  // Final drain: nobody submits; progress must come from notifications alone.
  for (let guard = 0; outstanding.size > 0; guard++) {
    assert.ok(guard < 10_000_000, `${where}: no progress`);
    const can: (() => void)[] = [];
    if (draining || kickPending) can.push(deviceStep);
    if (popped.length > 0 || staged > 0) can.push(() => complete(true));
    if (handling || irqPending) can.push(driverStep);
    if (can.length === 0) {
      assert.fail(`${where}: ${outstanding.size} requests stranded: a notification was lost`);
    }
    can[randInt(rng, 0, can.length - 1)]!();
  }

  assert.equal(driver.free, size, where);
  assert.equal(device.inFlight, 0, where);
  assert.equal(device.stats.chains, nextToken, where);
  assert.equal(driver.stats.chains, nextToken, where);
  assert.equal(device.broken, false, where);
  return [driver.stats, device.stats];
}

Deno.test(`PackedDriverQueue and PackedDeviceQueue agree over random submission and completion orders (seed 0x${SEED.toString(16)})`, () => {
  console.log(`packed queue property seed: 0x${SEED.toString(16)}`);
  for (const [i, size] of [1, 2, 3, 256, 32768].entries()) {
    // Many laps for the small rings; a few for the largest (each lap is 32768 slots).
    const laps = size >= 32768 ? 4 : size >= 256 ? 200 : 3000;
    // Every combination of INDIRECT_DESC and EVENT_IDX, each with its own seed.
    for (let run = 0; run < 4; run++) {
      const features = { indirect: (run & 1) !== 0, eventIdx: (run & 2) !== 0 };
      const [drv, dev] = simulate(size, SEED + i * 1000 + run, size * laps, features);
      if (size >= 256 && features.eventIdx) {
        // EVENT_IDX must actually save notifications, not just stay correct.
        assert.ok(drv!.suppressedKicks > 0 && dev!.suppressedInterrupts > 0, `size ${size}`);
      }
    }
  }
});

// ---------------------------------------------------------------------------------------------
// Across threads: the device in a Worker, the driver here, sharing only guest RAM and two words

async function crossThread(eventIdx: boolean, total: number) {
  const size = 256;
  const rig = makeRig({ size, eventIdx, highSize: size * 16 });
  const { mem, driver } = rig;
  const control = new SharedArrayBuffer(16);
  const ctl = new Int32Array(control);
  const worker = new Worker(new URL("./packed_harness.ts", import.meta.url), { type: "module" });
  let ready: () => void = () => {};
  const running = new Promise<void>((resolve) => (ready = resolve));
  const report = new Promise<DeviceWorkerReport>((resolve, reject) => {
    worker.onmessage = (e: MessageEvent<DeviceWorkerReport | typeof READY>) => {
      if (e.data === READY) ready();
      else resolve(e.data);
    };
    worker.onerror = (e) => reject(e);
  });
  const setup: DeviceWorkerSetup = {
    buffer: mem.buffer,
    regions: [...mem.regions],
    layout: rig.layout,
    features: rig.features,
    control,
    batch: 16,
  };
  worker.postMessage(setup);
  // Block on Atomics.wait below only once the worker runs, or a cold start reads as lost interrupts.
  await running;

  // Buffer pairs: 8 readable bytes (token, token * 3) then 8 writable ones, one pair per request.
  const freePairs = Array.from({ length: size }, (_, i) => i);
  const pairOf = new Map<number, number>();
  let submitted = 0;
  let completed = 0;
  let lostInterrupts = 0;
  try {
    while (completed < total) {
      let added = 0;
      while (submitted < total && driver.free >= 2 && freePairs.length > 0) {
        const pair = freePairs.pop()!;
        const at = rig.high + pair * 16;
        mem.setU32(at, submitted);
        mem.setU32(at + 4, (submitted * 3) >>> 0);
        mem.setU32(at + 8, 0xffff_ffff);
        assert.ok(driver.add([{ addr: at, length: 8 }], [{ addr: at + 8, length: 8 }], submitted));
        pairOf.set(submitted, pair);
        submitted++;
        added++;
      }
      if (added > 0 && driver.kick()) {
        Atomics.add(ctl, CTL_DOORBELL, 1);
        Atomics.notify(ctl, CTL_DOORBELL);
      }
      const seen = Atomics.load(ctl, CTL_IRQ);
      let reaped = 0;
      driver.disableInterrupts();
      do {
        for (let u = driver.getUsed(); u; u = driver.getUsed()) {
          const pair = pairOf.get(u.token);
          assert.ok(pair !== undefined);
          const at = rig.high + pair * 16;
          assert.equal(u.written, 8);
          assert.equal(mem.u32(at + 8), u.token);
          assert.equal(mem.u32(at + 12), (u.token * 3) >>> 0);
          pairOf.delete(u.token);
          freePairs.push(pair);
          completed++;
          reaped++;
        }
      } while (driver.enableInterrupts());
      const canSubmit = submitted < total && driver.free >= 2;
      if (reaped === 0 && !canSubmit && completed < total) {
        // Sleep until the device interrupts; a timeout is an interrupt it owed us.
        if (Atomics.wait(ctl, CTL_IRQ, seen, LOST_WAKEUP_MS) === "timed-out") lostInterrupts++;
      }
    }
  } finally {
    Atomics.store(ctl, CTL_STOP, 1);
    Atomics.add(ctl, CTL_DOORBELL, 1);
    Atomics.notify(ctl, CTL_DOORBELL);
  }
  const dev = await report;
  worker.terminate();
  assert.equal(dev.error, undefined);
  assert.equal(dev.chains, total);
  assert.equal(dev.lostKicks, 0, "the device slept through a kick it asked for");
  assert.equal(lostInterrupts, 0, "the driver slept through an interrupt it asked for");
  assert.equal(driver.free, size);
  return { driver: driver.stats, device: dev };
}

Deno.test("PackedDeviceQueue in a Worker and PackedDriverQueue exchange requests with no lost notification", async () => {
  for (const eventIdx of [false, true]) {
    const { driver, device } = await crossThread(eventIdx, 50_000);
    assert.equal(driver.chains, 50_000);
    assert.ok(driver.kicks > 0 && device.interrupts > 0, `eventIdx ${eventIdx}`);
  }
});

// ---------------------------------------------------------------------------------------------
// Hostile drivers: one named test per fault

function hostile(opts: { size?: number; indirect?: boolean } = {}): { rig: Rig; raw: RawDriver } {
  const rig = makeRig({ size: opts.size ?? 4, indirect: opts.indirect ?? false });
  return { rig, raw: new RawDriver(rig.mem, rig.layout) };
}

Deno.test("PackedDeviceQueue faults on a buffer id beyond the queue size (head-out-of-range)", () => {
  const { rig, raw } = hostile({ size: 4 });
  raw.offer([{ addr: rig.high, len: 8, id: 4 }]);
  assertFaultThenRecover(rig, "head-out-of-range");
});

Deno.test("PackedDeviceQueue faults on a chain longer than the ring (chain-too-long)", () => {
  const { rig, raw } = hostile({ size: 4 });
  // A driver that marks every slot available with NEXT, forever: the walk comes round again.
  raw.offer(
    Array.from(
      { length: 4 },
      (_, k) => ({ addr: rig.high + k * 8, len: 8, flags: VIRTQ_DESC_F_NEXT }),
    ),
  );
  assertFaultThenRecover(rig, "chain-too-long");
});

Deno.test("PackedDeviceQueue faults on an indirect table with more entries than the queue size (chain-too-long)", () => {
  const { rig, raw } = hostile({ size: 2, indirect: true });
  writeTable(rig.mem, rig.lowFree, Array.from({ length: 3 }, () => ({ addr: rig.high, len: 4 })));
  raw.offer([{ addr: rig.lowFree, len: 48, flags: VIRTQ_DESC_F_INDIRECT }]);
  assertFaultThenRecover(rig, "chain-too-long");
});

Deno.test("PackedDeviceQueue faults on an empty indirect table (indirect-bad-length)", () => {
  const { rig, raw } = hostile({ indirect: true });
  raw.offer([{ addr: rig.lowFree, len: 0, flags: VIRTQ_DESC_F_INDIRECT }]);
  assertFaultThenRecover(rig, "indirect-bad-length");
});

Deno.test("PackedDeviceQueue faults on an indirect table length that is not a multiple of 16 (indirect-bad-length)", () => {
  const { rig, raw } = hostile({ indirect: true });
  raw.offer([{ addr: rig.lowFree, len: 24, flags: VIRTQ_DESC_F_INDIRECT }]);
  assertFaultThenRecover(rig, "indirect-bad-length");
});

Deno.test("PackedDeviceQueue faults on an indirect descriptor inside an indirect table (indirect-nested)", () => {
  const { rig, raw } = hostile({ indirect: true });
  writeTable(rig.mem, rig.lowFree, [
    { addr: rig.high, len: 4 },
    { addr: rig.lowFree + 64, len: 16, flags: VIRTQ_DESC_F_INDIRECT },
  ]);
  raw.offer([{ addr: rig.lowFree, len: 32, flags: VIRTQ_DESC_F_INDIRECT }]);
  assertFaultThenRecover(rig, "indirect-nested");
});

Deno.test("PackedDeviceQueue faults on an indirect descriptor without INDIRECT_DESC (indirect-not-negotiated)", () => {
  const { rig, raw } = hostile({ indirect: false });
  writeTable(rig.mem, rig.lowFree, [{ addr: rig.high, len: 4 }]);
  raw.offer([{ addr: rig.lowFree, len: 16, flags: VIRTQ_DESC_F_INDIRECT }]);
  assertFaultThenRecover(rig, "indirect-not-negotiated");
});

Deno.test("PackedDeviceQueue faults on INDIRECT together with NEXT (indirect-with-next)", () => {
  const { rig, raw } = hostile({ indirect: true });
  writeTable(rig.mem, rig.lowFree, [{ addr: rig.high, len: 4 }]);
  raw.offer([
    { addr: rig.lowFree, len: 16, flags: VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT },
    { addr: rig.high, len: 4 },
  ]);
  assertFaultThenRecover(rig, "indirect-with-next");
});

Deno.test("PackedDeviceQueue faults on an indirect descriptor later in a NEXT-linked list (indirect-with-next)", () => {
  const { rig, raw } = hostile({ indirect: true });
  writeTable(rig.mem, rig.lowFree, [{ addr: rig.high, len: 4 }]);
  raw.offer([
    { addr: rig.high, len: 4, flags: VIRTQ_DESC_F_NEXT },
    { addr: rig.lowFree, len: 16, flags: VIRTQ_DESC_F_INDIRECT },
  ]);
  assertFaultThenRecover(rig, "indirect-with-next");
});

Deno.test("PackedDeviceQueue faults on a readable descriptor after a writable one (readable-after-writable)", () => {
  const { rig, raw } = hostile();
  raw.offer([
    { addr: rig.high, len: 4, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT },
    { addr: rig.high + 16, len: 4 },
  ]);
  assertFaultThenRecover(rig, "readable-after-writable");
});

Deno.test("PackedDeviceQueue faults on a readable entry after a writable one in an indirect table (readable-after-writable)", () => {
  const { rig, raw } = hostile({ indirect: true });
  writeTable(rig.mem, rig.lowFree, [
    { addr: rig.high, len: 4, flags: VIRTQ_DESC_F_WRITE },
    { addr: rig.high + 16, len: 4 },
  ]);
  raw.offer([{ addr: rig.lowFree, len: 32, flags: VIRTQ_DESC_F_INDIRECT }]);
  assertFaultThenRecover(rig, "readable-after-writable");
});

Deno.test("PackedDeviceQueue faults on a zero-length buffer (zero-length)", () => {
  const { rig, raw } = hostile();
  raw.offer([
    { addr: rig.high, len: 4, flags: VIRTQ_DESC_F_NEXT },
    { addr: rig.high + 16, len: 0, flags: VIRTQ_DESC_F_WRITE },
  ]);
  assertFaultThenRecover(rig, "zero-length");
});

Deno.test("PackedDeviceQueue faults on a buffer in the hole between RAM regions (outside-ram)", () => {
  const { rig, raw } = hostile();
  raw.offer([{ addr: rig.lowEnd + 0x1000, len: 4 }]);
  assertFaultThenRecover(rig, "outside-ram");
});

Deno.test("PackedDeviceQueue faults on a buffer that crosses the end of a RAM region (outside-ram)", () => {
  const { rig, raw } = hostile();
  raw.offer([{ addr: rig.lowEnd - 8, len: 16, flags: VIRTQ_DESC_F_WRITE }]);
  assertFaultThenRecover(rig, "outside-ram");
});

Deno.test("PackedDeviceQueue faults on a buffer address above 2^53 (outside-ram)", () => {
  const { rig, raw } = hostile();
  raw.offer([{ addr: 0, len: 4 }]);
  rig.mem.setU64(rig.layout.desc, 0xffff_ffff_ffff_f000n);
  assertFaultThenRecover(rig, "outside-ram");
});

Deno.test("PackedDeviceQueue faults on an indirect table outside guest RAM (outside-ram)", () => {
  const { rig, raw } = hostile({ indirect: true });
  raw.offer([{ addr: HIGH_RAM - 0x1000, len: 32, flags: VIRTQ_DESC_F_INDIRECT }]);
  assertFaultThenRecover(rig, "outside-ram");
});

Deno.test("PackedDeviceQueue faults on a buffer id offered again while still in flight (too-many-in-flight)", () => {
  const { rig, raw } = hostile({ size: 4 });
  raw.offer([{ addr: rig.high, len: 4, id: 1 }]);
  assert.equal(rig.device.pop()?.id, 1);
  raw.offer([{ addr: rig.high, len: 4, id: 1 }]);
  assertFaultThenRecover(rig, "too-many-in-flight");
});

Deno.test("PackedDeviceQueue faults on an id reused after push but before publish (too-many-in-flight)", () => {
  const { rig, raw } = hostile({ size: 4 });
  raw.offer([{ addr: rig.high, len: 4, id: 0 }]);
  rig.device.push(rig.device.pop()!, 0);
  raw.offer([{ addr: rig.high, len: 4, id: 0 }]);
  assertFaultThenRecover(rig, "too-many-in-flight");
});

Deno.test("PackedDeviceQueue faults on more ring slots in flight than the queue size (too-many-in-flight)", () => {
  const { rig, raw } = hostile({ size: 2 });
  raw.offer([
    { addr: rig.high, len: 4, id: 0, flags: VIRTQ_DESC_F_NEXT },
    { addr: rig.high, len: 4, id: 0 },
  ]);
  assert.equal(rig.device.pop()?.slots, 2);
  // The driver re-offers slot 0 on the next lap while both slots are still the device's.
  raw.offer([{ addr: rig.high, len: 4, id: 1 }]);
  assertFaultThenRecover(rig, "too-many-in-flight");
});

Deno.test("PackedDeviceQueue leaves a queue broken until reset, ignoring pushes and notification calls", () => {
  const { rig, raw } = hostile({ size: 4 });
  raw.offer([{ addr: rig.high, len: 4, id: 0 }]);
  const good = rig.device.pop()!;
  raw.offer([{ addr: rig.high, len: 0, id: 1 }]);
  assert.throws(() => rig.device.pop(), VirtqueueError);
  rig.device.push(good, 0);
  rig.device.disableNotifications();
  assert.equal(rig.device.publish(), false);
  assert.equal(rig.device.stats.chains, 0);
  assert.equal(rig.device.broken, true);
  rig.device.reset();
  assert.equal(rig.device.broken, false);
});

Deno.test("PackedDeviceQueue.hasAvailable() sees a published chain until it is popped", () => {
  const rig = makeRig({ size: 4 });
  const { driver, device } = rig;
  assert.equal(device.hasAvailable(), false);
  assert.ok(driver.add([{ addr: rig.high, length: 8 }], [], 7));
  driver.kick();
  assert.equal(device.hasAvailable(), true);
  assert.ok(device.pop());
  assert.equal(device.hasAvailable(), false);
});
