/**
 * Test helpers for virtqueues: guest memory with a hole, a driver/device pair over one split ring,
 * raw descriptor and avail-ring writers for playing a hostile driver, memory snapshots and a small
 * seeded PRNG.
 *
 * @module
 */
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/virtio/memory.ts";
import type { QueueFeatures, QueueLayout } from "../../src/virtio/queue.ts";
import {
  SplitDeviceQueue,
  SplitDriverQueue,
  splitRingLayout,
} from "../../src/virtio/split_queue.ts";

/** Rings live in region 0. */
export const RING_BASE = 0x1000;
/** Region 1 starts right where region 0 ends: a range across the two is not one region. */
export const REGION1 = 0x10_0000;
/** Between region 1 and region 2: not RAM. */
export const HOLE = 0x20_0000;
/** Buffers live in region 2. */
export const DATA_BASE = 0x40_0000;

/**
 * Guest RAM: [0, 1 MiB) for rings, [1 MiB, 2 MiB) adjacent to it, a hole, then `dataBytes` of
 * buffer space at 4 MiB.
 */
export function makeMemory(dataBytes = 0x10_0000): GuestMemory {
  const size = Math.ceil(dataBytes / 4096) * 4096;
  return new GuestMemory([
    { gpa: 0, size: REGION1 },
    { gpa: REGION1, size: REGION1 },
    { gpa: DATA_BASE, size },
  ]);
}

/** A driver and a device over one split ring, and a bump allocator for buffers. */
export interface Rig {
  mem: GuestMemory;
  layout: QueueLayout;
  features: QueueFeatures;
  driver: SplitDriverQueue<number>;
  device: SplitDeviceQueue;
  /** `bytes` of fresh buffer space in region 2 (16-aligned). */
  alloc(bytes: number): number;
}

export interface RigOptions {
  size?: number;
  indirect?: boolean;
  eventIdx?: boolean;
}

export function makeRig(opts: RigOptions = {}): Rig {
  const mem = makeMemory();
  const layout = splitRingLayout(opts.size ?? 8, RING_BASE);
  const features = { indirect: opts.indirect ?? true, eventIdx: opts.eventIdx ?? true };
  const driver = new SplitDriverQueue<number>(mem, layout, features);
  const device = new SplitDeviceQueue(mem, 0, layout, features);
  let next = DATA_BASE;
  const alloc = (bytes: number) => {
    const at = next;
    next += Math.ceil(bytes / 16) * 16;
    if (next > DATA_BASE + REGION1) throw new Error("Test buffer space exhausted");
    return at;
  };
  return { mem, layout, features, driver, device, alloc };
}

/** Byte `i` of the readable pattern for request `seq`. */
export function pattern(seq: number, i: number): number {
  return (seq * 31 + i * 7 + 1) & 0xff;
}

/**
 * `count` complete round trips through the rig: add (1 readable, 1 writable), kick, drain,
 * complete, publish, reap, each checked. Leaves the rings idle with both sides in step.
 */
export function roundTrips(rig: Rig, count: number, firstSeq = 1): void {
  const { mem, driver, device } = rig;
  const rd = rig.alloc(32);
  const wr = rig.alloc(32);
  for (let seq = firstSeq; seq < firstSeq + count; seq++) {
    for (let i = 0; i < 32; i++) mem.setU8(rd + i, pattern(seq, i));
    assert.ok(driver.add([{ addr: rd, length: 32 }], [{ addr: wr, length: 32 }], seq));
    driver.kick();
    let popped = 0;
    do {
      device.disableNotifications();
      for (let c = device.pop(); c !== null; c = device.pop()) {
        popped++;
        assert.equal(c.readableLength, 32);
        assert.equal(c.readable[0]![5], pattern(seq, 5));
        c.writable[0]!.fill(seq & 0xff);
        device.push(c, 32);
      }
    } while (device.enableNotifications());
    assert.equal(popped, 1);
    device.publish();
    const done = driver.getUsed();
    assert.deepEqual(done, { token: seq, written: 32 });
    assert.equal(mem.u8(wr + 31), seq & 0xff);
    assert.equal(driver.getUsed(), null);
  }
}

/** Writes descriptor `i` of the table at `table` as a hostile driver would: no checks. */
export function writeRawDesc(
  mem: GuestMemory,
  table: number,
  i: number,
  d: { addr: number | bigint; len: number; flags?: number; next?: number },
): void {
  const at = table + 16 * i;
  mem.setU64(at, BigInt(d.addr));
  mem.setU32(at + 8, d.len);
  mem.setU16(at + 12, d.flags ?? 0);
  mem.setU16(at + 14, d.next ?? 0);
}

/** Puts `head` in the next avail ring slot and publishes it, as a hostile driver would. */
export function offerRaw(mem: GuestMemory, layout: QueueLayout, head: number): void {
  const idx = mem.atomicU16(layout.driver + 2);
  mem.setU16(layout.driver + 4 + 2 * (idx % layout.size), head);
  mem.atomicSetU16(layout.driver + 2, (idx + 1) & 0xffff);
}

/** A copy of all of guest RAM. */
export function snapshot(mem: GuestMemory): Uint8Array {
  return new Uint8Array(mem.buffer).slice();
}

/** Asserts guest RAM still equals `before`, naming the first byte that changed. */
export function assertUnchanged(mem: GuestMemory, before: Uint8Array, what: string): void {
  const now = new Uint8Array(mem.buffer);
  for (let i = 0; i < now.length; i++) {
    if (now[i] !== before[i]) {
      assert.fail(
        `${what}: buffer byte 0x${i.toString(16)} changed from ${before[i]} to ${now[i]}`,
      );
    }
  }
}

export { mulberry32 } from "../prng.ts";
