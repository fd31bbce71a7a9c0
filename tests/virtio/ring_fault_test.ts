import assert from "node:assert/strict";
import { GuestMemory, GuestMemoryError } from "../../src/virtio/memory.ts";
import { ringFault, VirtqueueError } from "../../src/virtio/queue.ts";

Deno.test("ringFault() keeps a VirtqueueError and takes a GuestMemoryError as outside-ram on the queue served", () => {
  const jump = new VirtqueueError("avail-idx-jump", 2, "avail.idx moved");
  assert.equal(ringFault(jump, 5), jump, "a VirtqueueError names its own queue");

  const mem = new GuestMemory([{ gpa: 0, size: 4096 }]);
  let outside: unknown;
  try {
    mem.slice(0x8000_0000, 16);
  } catch (e) {
    outside = e;
  }
  assert.ok(outside instanceof GuestMemoryError);
  const fault = ringFault(outside, 3);
  assert.ok(fault instanceof VirtqueueError);
  assert.equal(fault.fault, "outside-ram");
  assert.equal(fault.queue, 3);
  assert.match(fault.message, /outside guest RAM/);

  assert.equal(ringFault(new RangeError("a device bug"), 0), null);
  assert.equal(ringFault("not even an error", 0), null);
});
