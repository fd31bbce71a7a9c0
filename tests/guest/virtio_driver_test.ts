import assert from "node:assert/strict";
import { probeSlot } from "../../src/guest/pci_probe.ts";
import {
  haltIdle,
  MSI_ADDRESS,
  VirtioDriverError,
  VirtioPciDriver,
} from "../../src/guest/virtio_driver.ts";
import type { AccessSize, GuestBus } from "../../src/virtio/bus.ts";
import {
  featureBit,
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FAILED,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../src/virtio/features.ts";
import { VcpuInterrupts } from "../../src/virtio/interrupts.ts";
import {
  PCI_COMMAND,
  PCI_COMMAND_INTX_DISABLE,
  VIRTIO_PCI_COMMON_CFGGENERATION,
  VIRTIO_PCI_COMMON_STATUS,
} from "../../src/virtio/pci.ts";
import { SplitDeviceQueue } from "../../src/virtio/split_queue.ts";
import { PackedDeviceQueue } from "../../src/virtio/packed_queue.ts";
import { FakeModel } from "../virtio/fake_model.ts";
import { makeMachine, MMIO_WINDOW } from "./harness.ts";

const V1 = featureBit(VIRTIO_F_VERSION_1);
const EVENT_IDX = featureBit(VIRTIO_RING_F_EVENT_IDX);
const INDIRECT = featureBit(VIRTIO_RING_F_INDIRECT_DESC);
const PACKED = featureBit(VIRTIO_F_RING_PACKED);

function driverFor(model: FakeModel, msixVectors?: number) {
  const m = makeMachine(model, msixVectors === undefined ? {} : { msixVectors });
  const fn = probeSlot(m.bus, m.slot, { mmioWindow: MMIO_WINDOW })!;
  return { ...m, driver: new VirtioPciDriver(m.platform, fn) };
}

/** A bus wrapper that logs status writes. */
function statusLog(m: ReturnType<typeof driverFor>): number[] {
  const writes: number[] = [];
  const inner = m.bus;
  const common = m.driver.structures.commonAddress;
  const original = inner.mmioWrite.bind(inner);
  inner.mmioWrite = (gpa: number, size: AccessSize, value: number) => {
    if (gpa === common + VIRTIO_PCI_COMMON_STATUS) writes.push(value);
    original(gpa, size, value);
  };
  return writes;
}

Deno.test("VirtioPciDriver runs the full init sequence against a VirtioPciFunction", () => {
  const model = new FakeModel({ numQueues: 2, features: EVENT_IDX | INDIRECT, queueMax: 128 });
  const m = driverFor(model);
  const writes = statusLog(m);
  const offered = m.driver.begin();
  assert.equal(offered, EVENT_IDX | INDIRECT | V1);
  const features = m.driver.negotiate(EVENT_IDX | PACKED);
  assert.equal(features, EVENT_IDX | V1, "wanted ∩ offered, plus VERSION_1");
  const seen: number[] = [];
  const queues = m.driver.setupQueues([{ size: 256 }, { size: 64 }], {
    onQueue: (q) => seen.push(q),
  });
  m.driver.driverOk();

  assert.deepEqual(writes, [
    0,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK |
    VIRTIO_CONFIG_S_DRIVER_OK,
  ]);
  assert.equal(m.fn.driverFeatures, EVENT_IDX | V1);
  assert.equal(m.driver.interruptMode, "msix-per-queue");

  // Queue sizes: the device maximum caps 256; 64 is taken as asked.
  assert.deepEqual(queues.map((q) => q.size), [128, 64]);
  const activation = model.activations[0]!;
  assert.deepEqual(activation.queues.map((q) => q.layout), queues.map((q) => q.ring.layout));
  assert.deepEqual(activation.queues.map((q) => q.msixVector), [1, 2]);
  assert.equal(m.fn.interrupts.configVector, 0);
  // The rings are where the allocator put them: page-aligned, inside its region.
  for (const q of queues) {
    assert.equal(q.ringAddress % 4096, 0);
    assert.ok(m.platform.alloc.sizeOf(q.ringAddress)! > 0);
  }

  // MSI-X entries carry the x86 vectors the guest allocated, unmasked, at the LAPIC address.
  const vectors = [m.driver.configVector!, queues[0]!.vector!, queues[1]!.vector!];
  assert.equal(new Set(vectors).size, 3);
  for (let entry = 0; entry < 3; entry++) {
    const msg = m.fn.interrupts.message(entry)!;
    assert.equal(msg.address, BigInt(MSI_ADDRESS));
    assert.equal(msg.data, vectors[entry]);
    assert.equal(msg.masked, false);
  }
  assert.ok(m.fn.interrupts.msixEnabled);
  assert.ok((m.fn.configRead(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE) !== 0);

  // Interrupt dispatch: the device raising queue 1 runs the queue-1 handler.
  m.fn.interrupts.notifyQueue(1);
  m.platform.interrupts.dispatchPending();
  assert.deepEqual(seen, [1]);
  assert.equal(queues[1]!.interrupts, 1);

  // A kick reaches the doorbell of its queue (a trap exit here).
  const device = new SplitDeviceQueue(m.mem, 0, queues[0]!.ring.layout, {
    indirect: false,
    eventIdx: true,
  });
  queues[0]!.ring.add([{ addr: 0x10000, length: 16 }], [], 7);
  assert.equal(queues[0]!.kick(), true);
  assert.equal(m.fn.doorbells.kicks(0), 1);
  assert.equal(m.fn.doorbells.kicks(1), 0);
  assert.equal(device.pop()?.id, 0);
});

Deno.test("VirtioPciDriver sets up packed rings of a non-power-of-2 size when negotiated", () => {
  const model = new FakeModel({ numQueues: 1, features: PACKED, queueMax: 100 });
  const m = driverFor(model);
  m.driver.begin();
  m.driver.negotiate(PACKED);
  const [q] = m.driver.setupQueues([{ size: 1000 }], { onQueue: () => {} });
  m.driver.driverOk();
  assert.equal(q!.size, 100);
  const device = new PackedDeviceQueue(m.mem, 0, q!.ring.layout, {
    indirect: false,
    eventIdx: false,
  });
  q!.ring.add([{ addr: 0x10000, length: 8 }], [], 1);
  q!.kick();
  assert.equal(device.pop()?.readableLength, 8);
});

Deno.test("split rings are rounded down to a power of 2", () => {
  const model = new FakeModel({ numQueues: 1, queueMax: 256 });
  const m = driverFor(model);
  m.driver.begin();
  m.driver.negotiate(0n);
  const [q] = m.driver.setupQueues([{ size: 100 }], { onQueue: () => {} });
  assert.equal(q!.size, 64);
});

Deno.test("a refused FEATURES_OK sets FAILED and throws features-refused", () => {
  const model = new FakeModel({ features: EVENT_IDX });
  model.accept = () => false;
  const m = driverFor(model);
  m.driver.begin();
  assert.throws(() => m.driver.negotiate(EVENT_IDX), (e: unknown) => {
    assert.ok(e instanceof VirtioDriverError);
    assert.equal(e.kind, "features-refused");
    assert.match(e.message, /slot 3: the device refused features 0x120000000/);
    return true;
  });
  assert.ok((m.fn.deviceStatus & VIRTIO_CONFIG_S_FAILED) !== 0);
});

Deno.test("MSI-X falls back to one shared queue vector when the table is too small", () => {
  const model = new FakeModel({ numQueues: 3 });
  const m = driverFor(model, 2);
  m.driver.begin();
  m.driver.negotiate(0n);
  const seen: number[] = [];
  const queues = m.driver.setupQueues([{ size: 8 }, { size: 8 }, { size: 8 }], {
    onQueue: (q) => seen.push(q),
  });
  m.driver.driverOk();
  assert.equal(m.driver.interruptMode, "msix-shared");
  assert.deepEqual(queues.map((q) => q.msixEntry), [1, 1, 1]);
  assert.equal(new Set(queues.map((q) => q.vector)).size, 1);
  m.fn.interrupts.notifyQueue(2);
  m.platform.interrupts.dispatchPending();
  assert.deepEqual(seen, [0, 1, 2], "a shared vector looks at every queue");
});

Deno.test("with one MSI-X entry the driver falls back to INTx and reads the ISR", () => {
  const model = new FakeModel({ numQueues: 2 });
  const m = driverFor(model, 1);
  m.driver.begin();
  m.driver.negotiate(0n);
  const seen: number[] = [];
  let configChanges = 0;
  m.driver.setupQueues([{ size: 8 }, { size: 8 }], {
    onQueue: (q) => seen.push(q),
    onConfigChange: () => configChanges++,
  });
  m.driver.driverOk();
  assert.equal(m.driver.interruptMode, "intx");
  assert.equal(m.fn.interrupts.msixEnabled, false);
  assert.equal(m.fn.configRead(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE, 0);
  assert.equal(m.fn.interrupts.queueVector(0), VIRTIO_MSI_NO_VECTOR);

  m.fn.interrupts.notifyQueue(1);
  assert.ok(m.vcpu.intxAsserted);
  m.platform.interrupts.dispatchPending();
  assert.deepEqual(seen, [0, 1]);
  assert.equal(m.vcpu.intxAsserted, false, "reading the ISR deasserts the line");

  m.fn.configChanged();
  m.platform.interrupts.dispatchPending();
  assert.equal(configChanges, 1);
  assert.equal(m.driver.broken, null);
});

Deno.test("a vector the device refuses (NO_VECTOR read back) falls through to the next plan", () => {
  const model = new FakeModel({ numQueues: 1 });
  const m = driverFor(model);
  const common = m.driver.structures.commonAddress;
  const read = m.bus.mmioRead.bind(m.bus);
  // This device answers NO_VECTOR for every queue vector (as a device out of vectors would).
  m.bus.mmioRead = (gpa: number, size: AccessSize) =>
    gpa === common + 26 ? VIRTIO_MSI_NO_VECTOR : read(gpa, size);
  m.driver.begin();
  m.driver.negotiate(0n);
  m.driver.setupQueues([{ size: 8 }], { onQueue: () => {} });
  assert.equal(m.driver.interruptMode, "intx");
  assert.equal(m.fn.interrupts.configVector, VIRTIO_MSI_NO_VECTOR, "the failed plan was undone");
});

Deno.test("DEVICE_NEEDS_RESET arrives as a config interrupt and marks the driver broken", () => {
  const model = new FakeModel({ numQueues: 1 });
  const m = driverFor(model);
  m.driver.begin();
  m.driver.negotiate(0n);
  let reported = 0;
  m.driver.setupQueues([{ size: 8 }], { onQueue: () => {}, onNeedsReset: () => reported++ });
  m.driver.driverOk();
  m.fn.needsReset();
  m.platform.interrupts.dispatchPending();
  assert.equal(m.driver.broken, "the device set DEVICE_NEEDS_RESET");
  assert.equal(reported, 1);
  assert.equal(m.driver.configInterrupts, 1);
});

Deno.test("a device without VERSION_1 is refused as legacy-only", () => {
  const model = new FakeModel();
  const m = driverFor(model);
  const common = m.driver.structures.commonAddress;
  const read = m.bus.mmioRead.bind(m.bus);
  m.bus.mmioRead = (gpa: number, size: AccessSize) => gpa === common + 4 ? 0 : read(gpa, size);
  m.driver.begin();
  assert.throws(() => m.driver.negotiate(0n), /does not offer VIRTIO_F_VERSION_1/);
});

Deno.test("a device whose status never reads 0 after reset times out", () => {
  const model = new FakeModel();
  const m = driverFor(model);
  const common = m.driver.structures.commonAddress;
  const read = m.bus.mmioRead.bind(m.bus);
  m.bus.mmioRead = (gpa: number, size: AccessSize) =>
    gpa === common + VIRTIO_PCI_COMMON_STATUS ? 1 : read(gpa, size);
  assert.throws(() => m.driver.reset(20), (e: unknown) => {
    assert.ok(e instanceof VirtioDriverError);
    assert.equal(e.kind, "reset-timeout");
    return true;
  });
});

Deno.test("readConfig() retries while config_generation moves, and gives up on a device that never settles", () => {
  const model = new FakeModel();
  model.config.set([1, 2, 3, 4, 5, 6, 7, 8]);
  const m = driverFor(model);
  m.driver.begin();
  const common = m.driver.structures.commonAddress;
  const read = m.bus.mmioRead.bind(m.bus);
  let generation = 0;
  let bumps = 2;
  m.bus.mmioRead = (gpa: number, size: AccessSize) => {
    if (gpa === common + VIRTIO_PCI_COMMON_CFGGENERATION) {
      // Each read after the first `bumps` reads sees a change between the two.
      return bumps-- > 0 ? generation++ : generation;
    }
    return read(gpa, size);
  };
  let calls = 0;
  const value = m.driver.readConfig((c) => {
    calls++;
    return c.u64(0);
  });
  assert.equal(value, 0x0807060504030201);
  assert.equal(calls, 2, "one retry: the generation moved once across a read");
  bumps = Infinity;
  assert.throws(() => m.driver.readConfig((c) => c.u8(0)), /config_generation changed/);
  bumps = 0;
  assert.throws(() => m.driver.readConfig((c) => c.u32(4094)), /outside the 4096-byte structure/);
});

Deno.test("more queues than the device has are refused", () => {
  const model = new FakeModel({ numQueues: 1 });
  const m = driverFor(model);
  m.driver.begin();
  m.driver.negotiate(0n);
  assert.throws(
    () => m.driver.setupQueues([{ size: 8 }, { size: 8 }], { onQueue: () => {} }),
    /2 queues wanted, the device has 1/,
  );
});

Deno.test("shutdown() resets the device and frees vectors and ring memory", () => {
  const model = new FakeModel({ numQueues: 2 });
  const m = driverFor(model);
  const before = m.platform.alloc.stats.used;
  m.driver.begin();
  m.driver.negotiate(0n);
  m.driver.setupQueues([{ size: 8 }, { size: 8 }], { onQueue: () => {} });
  m.driver.driverOk();
  m.driver.shutdown();
  assert.equal(m.fn.deviceStatus, 0);
  assert.equal(m.platform.alloc.stats.used, before);
  // Vectors are free again: the same three come back.
  m.driver.begin();
  m.driver.negotiate(0n);
  m.driver.setupQueues([{ size: 8 }, { size: 8 }], { onQueue: () => {} });
  assert.equal(m.driver.configVector, 0x30);
});

Deno.test("haltIdle() waits for an interrupt at most one slice", () => {
  const vcpu = new VcpuInterrupts();
  const t0 = performance.now();
  haltIdle(vcpu, 20)();
  assert.ok(performance.now() - t0 >= 15);
  vcpu.deliver(0x41);
  const t1 = performance.now();
  haltIdle(vcpu, 5000)();
  assert.ok(performance.now() - t1 < 1000);
});

Deno.test("a bus that always reads all-ones (a vanished device) never hangs the driver", () => {
  const model = new FakeModel();
  const m = driverFor(model);
  const dead: GuestBus = {
    configRead: (_s, _o, size) => size === 4 ? 0xffffffff : size === 2 ? 0xffff : 0xff,
    configWrite: () => {},
    mmioRead: (_g, size) => size === 4 ? 0xffffffff : size === 2 ? 0xffff : 0xff,
    mmioWrite: () => {},
    ioRead: (_p, size) => size === 4 ? 0xffffffff : size === 2 ? 0xffff : 0xff,
    ioWrite: () => {},
  };
  const driver = new VirtioPciDriver({ ...m.platform, bus: dead }, m.driver.fn);
  assert.throws(() => driver.begin(20), /reset-timeout|device_status reads 0xff/);
});
