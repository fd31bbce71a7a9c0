import assert from "node:assert/strict";
import { GuestAllocator, GuestAllocError } from "../../src/guest/alloc.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";

function make(size = 0x10000) {
  const mem = new GuestMemory([{ gpa: 0, size: 0x10_0000 }, { gpa: 0x20_0000, size: 0x10_0000 }]);
  return { mem, alloc: new GuestAllocator(mem, { gpa: 0x1000, size }) };
}

Deno.test("GuestAllocator aligns, zeroes and stays inside its region", () => {
  const { mem, alloc } = make();
  mem.fill(0x1000, 0x10000, 0xee);
  const a = alloc.alloc(10, 16);
  const b = alloc.alloc(100, 4096);
  const c = alloc.alloc(1);
  assert.equal(a, 0x1000);
  assert.equal(b, 0x2000);
  assert.equal(c, 0x1010, "first fit reuses the padding before the page-aligned block");
  assert.deepEqual([...mem.slice(b, 100)], new Array(100).fill(0));
  assert.equal(alloc.stats.used, 111);
  assert.equal(alloc.stats.allocations, 3);
  for (const x of [a, b, c]) assert.ok(x >= 0x1000 && x < 0x11000);
});

Deno.test("GuestAllocator coalesces freed neighbours back into one extent", () => {
  const { alloc } = make(0x4000);
  const blocks = [0, 1, 2, 3].map(() => alloc.alloc(0x1000, 0x1000));
  assert.throws(() => alloc.alloc(1), GuestAllocError);
  alloc.free(blocks[1]!);
  alloc.free(blocks[3]!);
  alloc.free(blocks[2]!);
  alloc.free(blocks[0]!);
  assert.deepEqual(alloc.stats, { total: 0x4000, used: 0, largestFree: 0x4000, allocations: 0 });
  assert.equal(alloc.alloc(0x4000), 0x1000);
});

Deno.test("GuestAllocator says how much is free when it cannot allocate", () => {
  const { alloc } = make(0x2000);
  alloc.alloc(0x1800);
  assert.throws(() => alloc.alloc(0x1000), (e: unknown) => {
    assert.ok(e instanceof GuestAllocError);
    assert.equal(e.size, 0x1000);
    assert.match(e.message, /2048 of 8192 bytes free, largest free extent 2048/);
    return true;
  });
});

Deno.test("GuestAllocator refuses bad arguments, double frees and regions outside RAM", () => {
  const { mem, alloc } = make();
  assert.throws(() => alloc.alloc(0), RangeError);
  assert.throws(() => alloc.alloc(16, 3), RangeError);
  const a = alloc.alloc(16);
  alloc.free(a);
  assert.throws(() => alloc.free(a), /not a live allocation/);
  assert.throws(() => alloc.free(0x1234), /not a live allocation/);
  assert.throws(
    () => new GuestAllocator(mem, { gpa: 0xf_0000, size: 0x2_0000 }),
    /not inside one RAM region/,
  );
  assert.throws(() => new GuestAllocator(mem, { gpa: 0x10_0000, size: 0x1000 }), /not inside/);
});
