/**
 * Helpers for the packed virtqueue tests: a guest with two RAM regions and a hole, a ring laid out
 * in the low region, a raw descriptor writer for hostile drivers, and a seeded PRNG.
 *
 * @module
 */

import assert from "node:assert/strict";
import { GuestMemory } from "../../src/virtio/memory.ts";
import {
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
} from "../../src/virtio/features.ts";
import {
  PackedDeviceQueue,
  PackedDriverQueue,
  packedRingLayout,
} from "../../src/virtio/packed_queue.ts";
import {
  type QueueFeatures,
  type QueueLayout,
  VirtqueueError,
  type VirtqueueFault,
} from "../../src/virtio/queue.ts";

/** Where the high RAM region starts; below it, after the low region, is a hole. */
export const HIGH_RAM = 0x1000_0000;
/** Where rings start in the low region. */
export const RING_BASE = 0x1000;

export { mulberry32 } from "../prng.ts";

/** An integer in `[lo, hi]` from `rng`. */
export function randInt(rng: () => number, lo: number, hi: number): number {
  return lo + Math.floor(rng() * (hi - lo + 1));
}

function pageAlign(n: number): number {
  return Math.ceil(n / 4096) * 4096;
}

/** A queue under test: memory, layout, both sides, and free RAM in the high region. */
export interface Rig {
  mem: GuestMemory;
  layout: QueueLayout;
  features: QueueFeatures;
  device: PackedDeviceQueue;
  driver: PackedDriverQueue<number>;
  /** First free byte in the low region after the ring (for indirect tables). */
  lowFree: number;
  /** End of the low region (the hole starts here). */
  lowEnd: number;
  /** Start and size of the high region (for data buffers). */
  high: number;
  highSize: number;
}

/** Options for {@linkcode makeRig}. */
export interface RigOptions {
  size: number;
  indirect?: boolean;
  eventIdx?: boolean;
  /** Extra bytes in the low region after the ring; default 64 KiB. */
  lowExtra?: number;
  /** Bytes of the high region; default 64 KiB. */
  highSize?: number;
  /** Build over this memory class (to spy on accesses). */
  memory?: (regions: { gpa: number; size: number }[]) => GuestMemory;
}

/** Builds RAM (low region with the ring, a hole, a high region), a layout and both queue sides. */
export function makeRig(opts: RigOptions): Rig {
  const features = { indirect: opts.indirect ?? false, eventIdx: opts.eventIdx ?? false };
  const layout = packedRingLayout(opts.size, RING_BASE);
  const lowFree = pageAlign(RING_BASE + layout.bytes);
  const lowEnd = pageAlign(lowFree + (opts.lowExtra ?? 65536));
  const highSize = pageAlign(opts.highSize ?? 65536);
  const regions = [{ gpa: 0, size: lowEnd }, { gpa: HIGH_RAM, size: highSize }];
  const mem = opts.memory ? opts.memory(regions) : new GuestMemory(regions);
  const driver = new PackedDriverQueue<number>(mem, layout, features);
  const device = new PackedDeviceQueue(mem, 3, layout, features);
  return { mem, layout, features, device, driver, lowFree, lowEnd, high: HIGH_RAM, highSize };
}

/** One descriptor as a hostile driver writes it; `flags` without the AVAIL/USED bits. */
export interface RawDesc {
  addr: number;
  len: number;
  id?: number;
  flags?: number;
}

/** AVAIL/USED bits that make a descriptor available under driver wrap counter `wrap`. */
export function availBits(wrap: boolean): number {
  return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
}

/**
 * A driver that writes whatever it is told: descriptors in ring order from its own index and wrap
 * counter, the head's flags last. It knows nothing of ids or free slots.
 */
export class RawDriver {
  readonly mem: GuestMemory;
  readonly layout: QueueLayout;
  next = 0;
  wrap = true;

  constructor(mem: GuestMemory, layout: QueueLayout) {
    this.mem = mem;
    this.layout = layout;
  }

  /** Writes `descs` as one list (the caller sets NEXT where it wants it). */
  offer(descs: readonly RawDesc[]): void {
    const { desc, size } = this.layout;
    let slot = this.next;
    let wrap = this.wrap;
    let headFlags = 0;
    for (const [k, d] of descs.entries()) {
      const at = desc + slot * 16;
      this.mem.setU64Number(at, d.addr);
      this.mem.setU32(at + 8, d.len);
      this.mem.setU16(at + 12, d.id ?? 0);
      const flags = (d.flags ?? 0) | availBits(wrap);
      if (k === 0) headFlags = flags;
      else this.mem.atomicSetU16(at + 14, flags);
      if (++slot === size) {
        slot = 0;
        wrap = !wrap;
      }
    }
    this.mem.atomicSetU16(desc + this.next * 16 + 14, headFlags);
    this.next = slot;
    this.wrap = wrap;
  }
}

/** Writes an indirect table of `descs` at `gpa` (flags as given, no AVAIL/USED bits). */
export function writeTable(mem: GuestMemory, gpa: number, descs: readonly RawDesc[]): void {
  for (const [k, d] of descs.entries()) {
    mem.setU64Number(gpa + 16 * k, d.addr);
    mem.setU32(gpa + 16 * k + 8, d.len);
    mem.setU16(gpa + 16 * k + 12, d.id ?? 0);
    mem.setU16(gpa + 16 * k + 14, d.flags ?? 0);
  }
}

/** Reads descriptor `slot` of the ring. */
export function readDesc(
  mem: GuestMemory,
  layout: QueueLayout,
  slot: number,
): { addr: number; len: number; id: number; flags: number } {
  const at = layout.desc + slot * 16;
  return {
    addr: mem.u64Number(at),
    len: mem.u32(at + 8),
    id: mem.u16(at + 12),
    flags: mem.u16(at + 14),
  };
}

/**
 * Asserts that `device.pop()` throws the given fault, that the queue is then broken and stays
 * quiet, and that `reset()` plus a fresh driver over the same ring gives a working queue again.
 */
export function assertFaultThenRecover(rig: Rig, fault: VirtqueueFault): void {
  const { device, mem, layout, features } = rig;
  assert.throws(
    () => device.pop(),
    (e: unknown) => e instanceof VirtqueueError && e.fault === fault && e.queue === 3,
    `expected fault ${fault}`,
  );
  assert.equal(device.broken, true);
  assert.equal(device.pop(), null, "a broken queue pops nothing");
  assert.equal(device.publish(), false, "a broken queue publishes nothing");
  assert.equal(device.enableNotifications(), false);

  device.reset();
  assert.equal(device.broken, false);
  assert.equal(device.inFlight, 0);
  // The driver re-initialises the ring after the reset, as a guest does.
  const driver = new PackedDriverQueue<string>(mem, layout, features);
  const buf = rig.high + rig.highSize - 64;
  mem.fill(buf, 64, 0x11);
  assert.ok(driver.add([{ addr: buf, length: 8 }], [{ addr: buf + 32, length: 8 }], "after"));
  const chain = device.pop();
  assert.ok(chain, "a reset queue pops again");
  assert.deepEqual([...chain.readable[0]!], new Array(8).fill(0x11));
  chain.writable[0]!.fill(0x22);
  device.push(chain, 8);
  device.publish();
  assert.deepEqual(driver.getUsed(), { token: "after", written: 8 });
  assert.equal(mem.u8(buf + 39), 0x22);
}

/** Flags of a used descriptor under device wrap counter `wrap`, with WRITE when data was written. */
export function usedBits(wrap: boolean, wrote: boolean): number {
  return (wrap ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0) | (wrote ? VIRTQ_DESC_F_WRITE : 0);
}

// ---------------------------------------------------------------------------------------------
// A device in a Worker, as an iothread runs it: the worker entry of this module.

/** Control words shared with the device worker. */
export const CTL_DOORBELL = 0;
export const CTL_IRQ = 1;
export const CTL_STOP = 2;
/** How long either side sleeps before it counts a lost notification. */
export const LOST_WAKEUP_MS = 2000;

/** What the main thread sends the device worker. */
export interface DeviceWorkerSetup {
  buffer: SharedArrayBuffer;
  regions: { gpa: number; size: number }[];
  layout: QueueLayout;
  features: QueueFeatures;
  control: SharedArrayBuffer;
  /** Publish after this many completions (and at the end of each drain). */
  batch: number;
}

/** The device worker's first message: it is running (module loading can take seconds, cold). */
export const READY = "ready";

/** What the device worker reports when told to stop. */
export interface DeviceWorkerReport {
  chains: number;
  interrupts: number;
  suppressedInterrupts: number;
  largestBatch: number;
  lostKicks: number;
  error?: string;
}

/**
 * The device loop: QEMU's `do { disable; pop all; } while (enable())`, then sleep on the doorbell.
 * Each chain's first readable buffer is copied into its first writable buffer.
 */
function runDeviceWorker(setup: DeviceWorkerSetup): DeviceWorkerReport {
  const mem = new GuestMemory(setup.regions, setup.buffer);
  const ctl = new Int32Array(setup.control);
  const dev = new PackedDeviceQueue(mem, 0, setup.layout, setup.features);
  const irq = () => {
    Atomics.add(ctl, CTL_IRQ, 1);
    Atomics.notify(ctl, CTL_IRQ);
  };
  let lostKicks = 0;
  try {
    for (;;) {
      const bell = Atomics.load(ctl, CTL_DOORBELL);
      do {
        dev.disableNotifications();
        let n = 0;
        for (let c = dev.pop(); c; c = dev.pop()) {
          const r = c.readable[0]!;
          const w = c.writable[0]!;
          const k = Math.min(r.length, w.length);
          w.set(r.subarray(0, k));
          dev.push(c, k);
          if (++n % setup.batch === 0 && dev.publish()) irq();
        }
        if (dev.publish()) irq();
      } while (dev.enableNotifications());
      if (Atomics.load(ctl, CTL_STOP) !== 0) break;
      // Sleep until the doorbell moves; a timeout means a kick the driver owed us never came.
      if (Atomics.wait(ctl, CTL_DOORBELL, bell, LOST_WAKEUP_MS) === "timed-out") {
        if (Atomics.load(ctl, CTL_STOP) !== 0) break;
        lostKicks++;
      }
    }
  } catch (e) {
    return { ...statsOf(dev), lostKicks, error: String(e) };
  }
  return { ...statsOf(dev), lostKicks };
}

function statsOf(dev: PackedDeviceQueue) {
  const s = dev.stats;
  return {
    chains: s.chains,
    interrupts: s.interrupts,
    suppressedInterrupts: s.suppressedInterrupts,
    largestBatch: s.largestBatch,
  };
}

if (
  import.meta.main &&
  typeof (globalThis as { WorkerGlobalScope?: unknown }).WorkerGlobalScope !== "undefined"
) {
  const scope = self as unknown as {
    onmessage: ((e: MessageEvent<DeviceWorkerSetup>) => void) | null;
    postMessage(m: DeviceWorkerReport | typeof READY): void;
    close(): void;
  };
  scope.onmessage = (e) => {
    // Loaded and running: only now may the main thread block on the interrupt word.
    scope.postMessage(READY);
    scope.postMessage(runDeviceWorker(e.data));
    scope.close();
  };
}
