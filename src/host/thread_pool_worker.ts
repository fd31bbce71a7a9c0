/**
 * A Worker of {@linkcode ThreadPool} (QEMU's `aio=threads` worker thread): claims requests from
 * the shared submission ring, runs each as synchronous pread/pwrite on the pool's file descriptor
 * (descriptors are process-wide) at the caller's memory address, and publishes the result.
 * Short transfers continue, EINTR/EAGAIN are retried, reads past the end of the file read as
 * zeroes. With O_DIRECT, memory that is not aligned and reads at unaligned offsets go through
 * this Worker's own aligned bounce window; the main thread never sends unaligned writes.
 *
 * @module
 */
import { workerData } from "node:worker_threads";
import { EAGAIN, EINTR, errno, libc, MAX_IO_CHUNK } from "../sys/libc.ts";
import { AlignedBuffer } from "../sys/direct.ts";
import {
  ALIGN,
  DONE,
  DONE_SEQ,
  FAILED,
  FD,
  MEM_ALIGN,
  OP_WRITE,
  type PoolMemory,
  poolMemory,
  ringIndex,
  SHUTDOWN,
  SQ_HEAD,
  SQ_TAIL,
  STARTED,
} from "./thread_pool_layout.ts";

const EIO = 5;
const ENOMEM = 12;
const EINVAL = 22;
const ENOSPC = 28;
/** Bytes of the bounce window (whole multiples of any alignment the file accepts). */
const WINDOW = 1 << 20;

const memory: PoolMemory = poolMemory((workerData as { sab: SharedArrayBuffer }).sab);
const { header } = memory;

/** Set by a failed transfer: where it failed. */
let failedAt = 0;
let bounce: Uint8Array | undefined;

/** Bytes transferred at `offset` from/into `buffer` (full unless EOF), or -errno. */
function transfer(
  write: boolean,
  fd: number,
  buffer: Uint8Array,
  offset: number,
  align: number,
): number {
  const c = libc();
  const length = buffer.length;
  let done = 0;
  while (done < length) {
    const want = Math.min(length - done, MAX_IO_CHUNK);
    const part = done === 0 && want === length ? buffer : buffer.subarray(done, done + want);
    const at = BigInt(offset + done);
    const n = write ? c.pwrite(fd, part, BigInt(want), at) : c.pread(fd, part, BigInt(want), at);
    if (n < 0) {
      const code = errno();
      if (code === EINTR || code === EAGAIN) continue;
      failedAt = offset + done;
      return -code;
    }
    if (write) {
      // A short direct write cannot go on from an unaligned offset: the disk is full.
      if (n === 0 || (align !== 0 && n < want && (done + n) % align !== 0)) {
        failedAt = offset + done + n;
        return -(n === 0 ? EIO : ENOSPC);
      }
    } else if (n === 0 || (align !== 0 && n < want && (done + n) % align !== 0)) {
      buffer.fill(0, done + n); // the end of the file: the rest reads as zeroes
      return length;
    }
    done += n;
  }
  return done;
}

/** A request that needs the bounce window (O_DIRECT, unaligned memory or read range). */
function bounced(write: boolean, fd: number, user: Uint8Array, offset: number, align: number) {
  bounce ??= new AlignedBuffer(WINDOW).bytes;
  const end = offset + user.length;
  for (let pos = offset; pos < end;) {
    const start = pos - (pos % align);
    const stop = Math.min(Math.ceil(end / align) * align, start + WINDOW);
    const upto = Math.min(stop, end);
    const window = bounce.subarray(0, stop - start);
    if (write) {
      // Only memory is unaligned here: the main thread read-modify-writes partial blocks.
      if (pos !== start || upto !== stop) return -EINVAL;
      window.set(user.subarray(pos - offset, upto - offset));
      const r = transfer(true, fd, window, start, align);
      if (r < 0) return r;
    } else {
      const r = transfer(false, fd, window, start, align);
      if (r < 0) return r;
      user.set(window.subarray(pos - start, upto - start), pos - offset);
    }
    pos = upto;
  }
  return 0;
}

function run(slot: number): void {
  const write = memory.op[slot] === OP_WRITE;
  const fd = header[FD]!;
  const align = header[ALIGN]!;
  const memAlign = header[MEM_ALIGN]!;
  const address = memory.address[slot]!;
  const offset = memory.offset[slot]!;
  const length = memory.length[slot]!;
  let r: number;
  try {
    const pointer = Deno.UnsafePointer.create(BigInt(address))!;
    const user = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(pointer, length));
    const direct = align !== 0 &&
      (address % memAlign !== 0 || offset % align !== 0 || length % align !== 0);
    r = direct ? bounced(write, fd, user, offset, align) : transfer(write, fd, user, offset, align);
  } catch {
    // No memory for the bounce window (mmap failed): the request fails, the Worker goes on.
    failedAt = offset;
    r = -ENOMEM;
  }
  memory.error[slot] = r < 0 ? -r : 0;
  memory.errorOffset[slot] = r < 0 ? failedAt : 0;
  Atomics.store(memory.state, slot, DONE);
  Atomics.add(header, DONE_SEQ, 1);
  Atomics.notify(header, DONE_SEQ);
}

function loop(): void {
  for (;;) {
    if (Atomics.load(header, SHUTDOWN) !== 0) return;
    const head = Atomics.load(header, SQ_HEAD);
    const tail = Atomics.load(header, SQ_TAIL);
    if (head === tail) {
      Atomics.wait(header, SQ_TAIL, tail); // until the main thread pushes (or shuts down)
      continue;
    }
    // Read the entry before claiming it: once claimed, the main thread may lap the ring and reuse
    // the entry before this Worker gets to read it; while unclaimed, it cannot (its slot is busy).
    const slot = Atomics.load(memory.ring, ringIndex(head));
    if (Atomics.compareExchange(header, SQ_HEAD, head, (head + 1) | 0) !== head) continue;
    run(slot);
  }
}

try {
  libc();
} catch {
  Atomics.store(header, FAILED, -1);
  Atomics.add(header, DONE_SEQ, 1);
  Atomics.notify(header, DONE_SEQ);
}
if (Atomics.load(header, FAILED) === 0) {
  Atomics.add(header, STARTED, 1);
  loop();
}
