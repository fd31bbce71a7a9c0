/**
 * The packed ring's inflight area (vhost-user.rst, QueueRegionPacked) on its own: what a back-end
 * that died at each step of an update leaves, and what the next one makes of it.
 */
import assert from "node:assert/strict";
import { PackedInflightRegion } from "../../src/serve/vhost_user/inflight_packed.ts";
import type { PackedDescriptor } from "../../src/virtio/packed_queue.ts";

const SIZE = 8;
const AVAIL = 1 << 7, USED = 1 << 15, NEXT = 1;
/** The ring at the start: avail and used at slot 0, both wrap counters 1. */
const START = 0x8000_8000;

/** A chain of `n` ring descriptors for buffer `id` (NEXT on all but the last). */
function chain(id: number, n: number): PackedDescriptor[] {
  return Array.from({ length: n }, (_, i) => ({
    addr: 0x1_0000_0000 * id + 0x1000 * i,
    len: 512 * (i + 1),
    flags: AVAIL | (i < n - 1 ? NEXT : 0),
    id,
  }));
}

/** A region with chains A (id 5, 2 slots) and B (id 2, 1 slot) popped at slots 0–2. */
function twoInFlight(bytes: Uint8Array) {
  const region = new PackedInflightRegion(bytes, SIZE);
  assert.equal(region.recover(START, () => 0), null, "a fresh area needs nothing");
  region.popped(chain(5, 2));
  region.popped(chain(2, 1));
  return region;
}

const state = (avail: number, availWrap: boolean, used: number, usedWrap: boolean) =>
  ((avail | (availWrap ? 0x8000 : 0)) + (used | (usedWrap ? 0x8000 : 0)) * 0x1_0000) >>> 0;

Deno.test("packed inflight area: chains in flight come back in pop order, the ring past them", () => {
  const bytes = new Uint8Array(32 + 32 * SIZE);
  twoInFlight(bytes);
  const next = new PackedInflightRegion(bytes, SIZE);
  const r = next.recover(START, () => AVAIL)!;
  assert.deepEqual(r.resubmit, [chain(5, 2), chain(2, 1)]);
  assert.equal(r.state, state(3, true, 0, true));
});

Deno.test("packed inflight area: a publish cut short before the driver could see it is rolled back", () => {
  const bytes = new Uint8Array(32 + 32 * SIZE);
  const region = twoInFlight(bytes);
  // B completes first: its used descriptor would go to slot 0; the back-end dies before writing it.
  region.publishing(Uint16Array.of(2), 1, 1, true);
  const r = new PackedInflightRegion(bytes, SIZE).recover(START, () => AVAIL | NEXT)!;
  assert.deepEqual(r.resubmit.map((c) => c.at(-1)!.id), [5, 2], "both again");
  assert.equal(r.state, state(3, true, 0, true));
});

Deno.test("packed inflight area: a publish the driver may have seen is committed", () => {
  const bytes = new Uint8Array(32 + 32 * SIZE);
  const region = twoInFlight(bytes);
  region.publishing(Uint16Array.of(2), 1, 1, true);
  // Slot 0 holds B's used descriptor (AVAIL = USED = wrap 1): the driver may have it already.
  const r = new PackedInflightRegion(bytes, SIZE).recover(
    START,
    (slot) => slot === 0 ? AVAIL | USED : AVAIL,
  )!;
  assert.deepEqual(r.resubmit, [chain(5, 2)], "only A");
  assert.equal(r.state, state(3, true, 1, true), "used moved past B's one slot");
});

Deno.test("packed inflight area: entries freed and taken again keep the order; the ring wraps", () => {
  const bytes = new Uint8Array(32 + 32 * SIZE);
  const region = twoInFlight(bytes);
  region.publishing(Uint16Array.of(5), 1, 2, true);
  region.published();
  // Slots 3..7 and 0 (wrapping) for C (id 1, 6 descriptors), taking A's freed entries too.
  region.popped(chain(1, 6));
  const r = new PackedInflightRegion(bytes, SIZE).recover(START, () => 0)!;
  assert.deepEqual(r.resubmit, [chain(2, 1), chain(1, 6)]);
  // Used at slot 2; B (1) and C (6) hold 7 slots: avail at slot 1 of the next lap.
  assert.equal(r.state, state(1, false, 2, true));
});

Deno.test("packed inflight area: one that cannot be right is named and started afresh", () => {
  const bytes = new Uint8Array(32 + 32 * SIZE);
  twoInFlight(bytes);
  const v = new DataView(bytes.buffer);
  // Entry 3 (on the free list) points back at itself.
  v.setUint16(32 + 32 * 3 + 2, 3, true);
  assert.throws(
    () => new PackedInflightRegion(bytes, SIZE).recover(START, () => 0),
    /free list loops/,
  );
  const again = new PackedInflightRegion(bytes, SIZE).recover(START, () => 0)!;
  assert.deepEqual(again.resubmit, [], "reset: nothing in flight");
  v.setUint16(10, 16, true);
  assert.throws(
    () => new PackedInflightRegion(bytes, SIZE).recover(START, () => 0),
    /for 16 descriptors, the ring has 8/,
  );
});
