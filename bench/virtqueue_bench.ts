/**
 * Virtqueue throughput and the cost of a kick.
 *
 * - `virtqueue`: chains per second through one queue in one thread — the driver adds and kicks a
 *   batch, the device pops, pushes and publishes it, the driver reaps it (split and packed rings,
 *   256 chains of two 4 KiB buffers per iteration).
 * - `kick→interrupt`: one request's round trip across Workers — the guest on the vCPU Worker kicks,
 *   the device's iothread wakes, echoes and raises MSI-X, the vCPU wakes and reaps — with the
 *   doorbell as an ioeventfd (the vCPU rings the iothread directly) or trapped (an exit to the VMM
 *   thread, which rings it). 200 round trips per iteration, one request in flight.
 *
 * Run: `deno bench -A bench/virtqueue_bench.ts`.
 *
 * @module
 */

import { GuestMemory } from "../src/virtio/memory.ts";
import {
  PackedDeviceQueue,
  PackedDriverQueue,
  packedRingLayout,
} from "../src/virtio/packed_queue.ts";
import type { DeviceQueue, DriverQueue, QueueLayout } from "../src/virtio/queue.ts";
import { SplitDeviceQueue, SplitDriverQueue, splitRingLayout } from "../src/virtio/split_queue.ts";
import { Machine } from "../src/machine/machine.ts";
import { registerDeviceType } from "../src/machine/registry.ts";
import { echoDeviceType } from "../tests/machine/echo_device.ts";
import type { GuestPayload, ServeRequest } from "../tests/machine/vcpu_worker.ts";

/** Chains per iteration; each takes two descriptors of a 256-entry ring. */
const BATCH = 128;
const QUEUE_SIZE = 256;
const BUFFER = 4096;
const features = { indirect: false, eventIdx: true };

interface Pair {
  driver: DriverQueue<number>;
  device: DeviceQueue;
}

function makePair(packed: boolean): Pair {
  const mem = new GuestMemory([{ gpa: 0, size: 4 << 20 }]);
  const layout: QueueLayout = packed
    ? packedRingLayout(QUEUE_SIZE, 0x1000)
    : splitRingLayout(QUEUE_SIZE, 0x1000);
  return packed
    ? {
      driver: new PackedDriverQueue<number>(mem, layout, features),
      device: new PackedDeviceQueue(mem, 0, layout, features),
    }
    : {
      driver: new SplitDriverQueue<number>(mem, layout, features),
      device: new SplitDeviceQueue(mem, 0, layout, features),
    };
}

/** Buffers at 64 KiB..: request i reads at 2i, writes at 2i+1 (4 KiB each). */
const readable = Array.from(
  { length: BATCH },
  (_, i) => [{ addr: 0x1_0000 + 2 * i * BUFFER, length: BUFFER }],
);
const writable = Array.from(
  { length: BATCH },
  (_, i) => [{ addr: 0x1_0000 + (2 * i + 1) * BUFFER, length: BUFFER }],
);

function cycle({ driver, device }: Pair): void {
  for (let i = 0; i < BATCH; i++) driver.add(readable[i]!, writable[i]!, i);
  driver.kick();
  do {
    device.disableNotifications();
    for (let chain = device.pop(); chain !== null; chain = device.pop()) {
      device.push(chain, BUFFER);
    }
  } while (device.enableNotifications());
  device.publish();
  let reaped = 0;
  while (driver.getUsed() !== null) reaped++;
  if (reaped !== BATCH) throw new Error(`Reaped ${reaped} of ${BATCH}`);
}

const split = makePair(false);
const packed = makePair(true);

Deno.bench({
  name: `split: ${BATCH} chains add→pop→push→publish→reap`,
  group: "virtqueue",
  baseline: true,
  fn: () => cycle(split),
});

Deno.bench({
  name: `packed: ${BATCH} chains add→pop→push→publish→reap`,
  group: "virtqueue",
  fn: () => cycle(packed),
});

// ---- Across Workers -------------------------------------------------------------------------------

const ROUNDS = 200;
registerDeviceType(echoDeviceType);
const machine = await Machine.create({
  memoryMiB: 32,
  devices: [
    { type: "echo", id: "ioeventfd", ioeventfd: true, queueSize: 64 },
    { type: "echo", id: "trap", ioeventfd: false, queueSize: 64 },
  ],
});
const vcpu = await machine.startVcpu(
  new URL("../tests/machine/vcpu_worker.ts", import.meta.url),
  { kind: "serve" } satisfies GuestPayload,
);

async function roundTrips(slot: number, b: Deno.BenchContext): Promise<void> {
  // The device is (re)initialised outside the measurement.
  await vcpu.request({ op: "init", slot, queueSize: 64, packed: false } satisfies ServeRequest);
  b.start();
  const r = await vcpu.request(
    { op: "pingpong", slot, rounds: ROUNDS, bytes: 64 } satisfies ServeRequest,
  );
  b.end();
  if ((r as { requests: number }).requests !== ROUNDS) throw new Error("Lost round trips");
}

const [ioeventfdSlot, trapSlot] = machine.devices.map((d) => d.slot);

Deno.bench({
  name: `ioeventfd: ${ROUNDS} kick→interrupt round trips`,
  group: "kick→interrupt",
  baseline: true,
  n: 50,
  // An async function: the runner awaits only those.
  fn: async (b) => await roundTrips(ioeventfdSlot!, b),
});

Deno.bench({
  name: `trap: ${ROUNDS} kick→interrupt round trips`,
  group: "kick→interrupt",
  n: 50,
  fn: async (b) => await roundTrips(trapSlot!, b),
});

// The bench runner has no teardown hook: stop the Workers when the process unloads.
globalThis.addEventListener("unload", () => {
  vcpu.terminate();
  void machine.shutdown();
});
