/**
 * Memory shared through fds (src/sys/shared_memory.ts): two shared mappings of a memfd see each
 * other's writes; a SharedArrayBuffer with memfds mapped over it aliases them — bytes written
 * through an fd mapping show in the buffer and in a Worker given the buffer, and the reverse — and
 * stops aliasing them once released.
 */
import assert from "node:assert/strict";
import { isBlockError } from "../../src/errors.ts";
import {
  ftruncate,
  memfdCreate,
  mmapShared,
  PAGE_SIZE,
  sharedBufferAliasWorks,
  sharedBufferOverFds,
} from "../../src/sys/shared_memory.ts";
import { close } from "../../src/sys/unix_socket.ts";
import { onWorker } from "./on_worker.ts";

/** A memfd of `pages` pages. */
function memfd(pages: number): number {
  const fd = memfdCreate("vstor-test");
  ftruncate(fd, pages * PAGE_SIZE);
  return fd;
}

Deno.test("mmapShared() maps a memfd: two mappings, at different offsets, share its bytes", () => {
  const fd = memfd(4);
  try {
    const whole = mmapShared(fd, 4 * PAGE_SIZE);
    const tail = mmapShared(fd, 2 * PAGE_SIZE, BigInt(2 * PAGE_SIZE));
    assert.equal(whole.bytes.length, 4 * PAGE_SIZE);
    assert.equal(Number(Deno.UnsafePointer.value(whole.pointer)) % PAGE_SIZE, 0);
    whole.bytes[2 * PAGE_SIZE + 5] = 0xab;
    assert.equal(tail.bytes[5], 0xab);
    tail.bytes[PAGE_SIZE] = 0xcd;
    assert.equal(whole.bytes[3 * PAGE_SIZE], 0xcd);
    tail.unmap();
    tail.unmap(); // idempotent
    // The mapping outlives the fd.
    close(fd);
    whole.bytes[0] = 1;
    assert.equal(whole.bytes[2 * PAGE_SIZE + 5], 0xab);
    whole.unmap();
  } catch (e) {
    close(fd);
    throw e;
  }
});

Deno.test("mmapShared() refuses an unaligned offset and names mmap's errno on failure", () => {
  const fd = memfd(1);
  try {
    assert.throws(() => mmapShared(fd, PAGE_SIZE, 100), RangeError);
    assert.throws(() => mmapShared(fd, 0), RangeError);
    assert.throws(
      () => mmapShared(1 << 20, PAGE_SIZE),
      (e) =>
        isBlockError(e, "io") && e.context.errno === 9 &&
        /^mmap of 4096 bytes of fd/.test(e.message),
    );
  } finally {
    close(fd);
  }
});

Deno.test("a SharedArrayBuffer with maxByteLength is page-aligned on this Deno, and the alias self-test passes", () => {
  const sab = new SharedArrayBuffer(3 * PAGE_SIZE, { maxByteLength: 3 * PAGE_SIZE });
  const address = Deno.UnsafePointer.value(Deno.UnsafePointer.of(new Uint8Array(sab)));
  assert.equal(Number(address) % PAGE_SIZE, 0);
  assert.equal(sharedBufferAliasWorks(), true);
});

Deno.test("sharedBufferOverFds(): fd mappings, the buffer and a Worker given it see the same bytes", async () => {
  const low = memfd(4);
  const high = memfd(2);
  const fdsOpen = [low, high];
  const lowMap = mmapShared(low, 4 * PAGE_SIZE);
  const highMap = mmapShared(high, 2 * PAGE_SIZE);
  try {
    // Guest RAM as two regions: low's pages 1..3 at 0, high's pages 0..1 at 5 pages (a hole between).
    const shared = sharedBufferOverFds(8 * PAGE_SIZE, [
      { fd: high, offset: 0, length: 2 * PAGE_SIZE, at: 5 * PAGE_SIZE },
      { fd: low, offset: BigInt(PAGE_SIZE), length: 3 * PAGE_SIZE, at: 0 },
    ]);
    assert.equal(shared.offset, 0);
    assert.equal(shared.buffer.byteLength, 8 * PAGE_SIZE);
    // The fds may go: the mappings hold the memory.
    close(low);
    close(high);
    fdsOpen.length = 0;
    const ram = new Uint8Array(shared.buffer, 0, 8 * PAGE_SIZE);
    lowMap.bytes[PAGE_SIZE + 3] = 0x11; // file page 1 = buffer page 0
    highMap.bytes[PAGE_SIZE + 9] = 0x22; // file page 1 = buffer page 6
    assert.equal(ram[3], 0x11);
    assert.equal(ram[6 * PAGE_SIZE + 9], 0x22);
    ram[3 * PAGE_SIZE - 1] = 0x33; // buffer page 2 = low's file page 3
    assert.equal(lowMap.bytes[4 * PAGE_SIZE - 1], 0x33);
    ram[4 * PAGE_SIZE] = 0x44; // the hole: private memory, in no file
    assert.equal(lowMap.bytes.includes(0x44) || highMap.bytes.includes(0x44), false);

    const seen = await onWorker<number[]>({
      op: "sab",
      buffer: shared.buffer,
      read: [3, 6 * PAGE_SIZE + 9, 3 * PAGE_SIZE - 1, 4 * PAGE_SIZE],
      write: [[5 * PAGE_SIZE, 0x55], [PAGE_SIZE, 0x66]],
    });
    assert.deepEqual(seen, [0x11, 0x22, 0x33, 0x44]);
    assert.equal(highMap.bytes[0], 0x55);
    assert.equal(lowMap.bytes[2 * PAGE_SIZE], 0x66);

    // Released, the buffer is private zeros and the files keep their bytes.
    shared.release();
    shared.release();
    assert.equal(ram[3], 0);
    assert.equal(ram[5 * PAGE_SIZE], 0);
    ram[3] = 0x77;
    assert.equal(lowMap.bytes[PAGE_SIZE + 3], 0x11);
    assert.equal(highMap.bytes[0], 0x55);
  } finally {
    lowMap.unmap();
    highMap.unmap();
    for (const fd of fdsOpen) close(fd);
  }
});

Deno.test("sharedBufferOverFds() refuses regions unaligned, overlapping or past the end", () => {
  const fd = memfd(2);
  try {
    const region = { fd, offset: 0, length: PAGE_SIZE, at: 0 };
    assert.throws(() => sharedBufferOverFds(PAGE_SIZE + 1, [region]), RangeError);
    assert.throws(() => sharedBufferOverFds(2 * PAGE_SIZE, [{ ...region, at: 512 }]), RangeError);
    assert.throws(
      () => sharedBufferOverFds(2 * PAGE_SIZE, [{ ...region, offset: 512 }]),
      RangeError,
    );
    assert.throws(
      () => sharedBufferOverFds(2 * PAGE_SIZE, [region, { ...region, length: 2 * PAGE_SIZE }]),
      /overlap/,
    );
    assert.throws(() => sharedBufferOverFds(PAGE_SIZE, [{ ...region, at: PAGE_SIZE }]), /past/);
    assert.throws(
      () => sharedBufferOverFds(PAGE_SIZE, [{ ...region, fd: 1 << 20 }]),
      (e) => isBlockError(e, "io") && e.context.errno === 9,
    );
  } finally {
    close(fd);
  }
});
