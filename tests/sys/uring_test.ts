/**
 * io_uring by raw syscalls (src/sys/uring.ts): the layout constants agree with what the kernel
 * reports at setup (and with <linux/io_uring.h> where a C compiler is at hand); files written
 * through the ring, with and without O_DIRECT, read back through it at queue depth 32 as
 * Deno.readFileSync sees them; failures come back as -errno in the completion. Skipped, with the
 * reason printed, only when io_uring_setup itself fails with ENOSYS or EPERM.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { AlignedBuffer } from "../../src/sys/direct.ts";
import { cPath, libc, O_CLOEXEC, O_CREAT, O_DIRECT, O_RDONLY, O_RDWR } from "../../src/sys/libc.ts";
import {
  CQ_OFF_cqes,
  CQ_OFF_flags,
  CQ_OFF_head,
  CQ_OFF_overflow,
  CQ_OFF_ring_entries,
  CQ_OFF_ring_mask,
  CQ_OFF_tail,
  CQE_flags,
  CQE_res,
  CQE_user_data,
  EBADF,
  errnoText,
  IO_URING_CQE_SIZE,
  IO_URING_PARAMS_SIZE,
  IO_URING_SQE_SIZE,
  IORING_FEAT_SINGLE_MMAP,
  PARAMS_cq_entries,
  PARAMS_cq_off,
  PARAMS_features,
  PARAMS_flags,
  PARAMS_sq_entries,
  PARAMS_sq_off,
  SQ_OFF_array,
  SQ_OFF_dropped,
  SQ_OFF_flags,
  SQ_OFF_head,
  SQ_OFF_ring_entries,
  SQ_OFF_ring_mask,
  SQ_OFF_tail,
  SQE_addr,
  SQE_buf_index,
  SQE_fd,
  SQE_len,
  SQE_off,
  SQE_opcode,
  SQE_rw_flags,
  SQE_user_data,
  Uring,
} from "../../src/sys/uring.ts";
import { mulberry32 } from "../prng.ts";
import { ignoreWithoutUring } from "./uring_available.ts";

const ignore = ignoreWithoutUring;

function isFile(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/** On the root ext4 disk: tmpfs may refuse O_DIRECT. */
const dir = Deno.makeTempDirSync({ dir: "/var/tmp", prefix: "vstor_uring_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

function openFd(path: string, flags: number): number {
  const fd = libc().open(cPath(path), flags | O_CLOEXEC, 0o644);
  assert.ok(fd >= 0, `open ${path}`);
  return fd;
}

/** Completions as [userData, result] pairs, reaped after waiting for `count` of them. */
function waitAll(ring: Uring, count: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  while (out.length < count) {
    ring.submit(Math.min(1, ring.inFlight));
    ring.reap((userData, result) => out.push([userData, result]));
  }
  return out;
}

/**
 * Runs `count` requests through `ring` keeping up to `depth` in flight: `prep(i)` prepares request
 * i with user data i, `done(i, result)` checks its completion. Returns the largest depth seen.
 */
function pump(
  ring: Uring,
  count: number,
  depth: number,
  prep: (i: number) => void,
  done: (i: number, result: number) => void,
): number {
  let next = 0, finished = 0, deepest = 0;
  while (finished < count) {
    while (next < count && ring.inFlight < depth && ring.space > 0) prep(next++);
    deepest = Math.max(deepest, ring.inFlight);
    ring.submit(1);
    finished += ring.reap((i, result) => done(i, result));
  }
  return deepest;
}

function shuffled(n: number, random: () => number): number[] {
  const order = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  return order;
}

Deno.test({
  name: "the layout constants agree with what the kernel reports in io_uring_params at setup",
  ignore,
  fn() {
    assert.equal(IO_URING_PARAMS_SIZE, 120);
    assert.equal(IO_URING_SQE_SIZE, 64);
    assert.equal(IO_URING_CQE_SIZE, 16);
    const ring = new Uring(64);
    try {
      // sq_entries/cq_entries read at PARAMS_sq_entries/cq_entries; the ring's own copies read at
      // the offsets found at PARAMS_sq_off/cq_off + SQ_OFF_*/CQ_OFF_*: a wrong constant disagrees.
      assert.equal(ring.entries, 64);
      assert.equal(ring.cqEntries, 128);
      assert.deepEqual(ring.mapped, {
        sqRingEntries: 64,
        sqRingMask: 63,
        cqRingEntries: 128,
        cqRingMask: 127,
      });
      assert.notEqual(ring.features & IORING_FEAT_SINGLE_MMAP, 0, "IORING_FEAT_SINGLE_MMAP");
      const { sq, cq } = ring.offsets;
      for (const [name, at] of [...Object.entries(sq), ...Object.entries(cq)]) {
        assert.equal(at % 4, 0, `${name} offset ${at} is word-aligned`);
        assert.ok(at < ring.offsets.sqRingBytes, `${name} offset ${at} inside the ring`);
      }
      assert.equal(new Set(Object.values(sq)).size, 7, "seven distinct sq_off fields");
      assert.equal(new Set(Object.values(cq)).size, 7, "seven distinct cq_off fields");
      // The kernel lays the SQ index array after the CQEs, cache-line aligned (io_uring.c
      // rings_size): this pins the CQE size against the kernel's.
      assert.equal(cq.cqes % IO_URING_CQE_SIZE, 0);
      assert.equal(sq.array, Math.ceil((cq.cqes + 128 * IO_URING_CQE_SIZE) / 64) * 64);
    } finally {
      ring.close();
    }
  },
});

Deno.test({
  name: "the layout constants agree with <linux/io_uring.h> compiled by gcc",
  ignore: ignore || !isFile("/usr/include/linux/io_uring.h"),
  async fn() {
    const program = `#include <stdio.h>
#include <stddef.h>
#include <linux/io_uring.h>
#define P(x) printf("%s %zu\\n", #x, (size_t)(x))
int main(void) {
  P(sizeof(struct io_uring_params)); P(offsetof(struct io_uring_params, sq_entries));
  P(offsetof(struct io_uring_params, cq_entries)); P(offsetof(struct io_uring_params, flags));
  P(offsetof(struct io_uring_params, features)); P(offsetof(struct io_uring_params, sq_off));
  P(offsetof(struct io_uring_params, cq_off));
  P(offsetof(struct io_sqring_offsets, head)); P(offsetof(struct io_sqring_offsets, tail));
  P(offsetof(struct io_sqring_offsets, ring_mask));
  P(offsetof(struct io_sqring_offsets, ring_entries));
  P(offsetof(struct io_sqring_offsets, flags)); P(offsetof(struct io_sqring_offsets, dropped));
  P(offsetof(struct io_sqring_offsets, array));
  P(offsetof(struct io_cqring_offsets, head)); P(offsetof(struct io_cqring_offsets, tail));
  P(offsetof(struct io_cqring_offsets, ring_mask));
  P(offsetof(struct io_cqring_offsets, ring_entries));
  P(offsetof(struct io_cqring_offsets, overflow)); P(offsetof(struct io_cqring_offsets, cqes));
  P(offsetof(struct io_cqring_offsets, flags));
  P(sizeof(struct io_uring_sqe)); P(offsetof(struct io_uring_sqe, opcode));
  P(offsetof(struct io_uring_sqe, fd)); P(offsetof(struct io_uring_sqe, off));
  P(offsetof(struct io_uring_sqe, addr)); P(offsetof(struct io_uring_sqe, len));
  P(offsetof(struct io_uring_sqe, rw_flags)); P(offsetof(struct io_uring_sqe, fsync_flags));
  P(offsetof(struct io_uring_sqe, user_data)); P(offsetof(struct io_uring_sqe, buf_index));
  P(sizeof(struct io_uring_cqe)); P(offsetof(struct io_uring_cqe, user_data));
  P(offsetof(struct io_uring_cqe, res)); P(offsetof(struct io_uring_cqe, flags));
  P(IORING_OP_NOP); P(IORING_OP_FSYNC); P(IORING_OP_READ_FIXED); P(IORING_OP_WRITE_FIXED);
  P(IORING_OP_READ); P(IORING_OP_WRITE); P(IORING_FSYNC_DATASYNC);
  P(IORING_FEAT_SINGLE_MMAP); P(IORING_OFF_SQES); P(IORING_ENTER_GETEVENTS);
  return 0;
}
`;
    const source = join(dir, "layout.c"), binary = join(dir, "layout");
    Deno.writeTextFileSync(source, program);
    let compiled;
    try {
      compiled = await new Deno.Command("gcc", { args: ["-o", binary, source] }).output();
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) {
        console.log("skipped: no gcc");
        return;
      }
      throw e;
    }
    assert.ok(compiled.success, new TextDecoder().decode(compiled.stderr));
    const out = await new Deno.Command(binary).output();
    const values = new TextDecoder().decode(out.stdout).trim().split("\n").map((line) =>
      Number(line.split(" ").at(-1))
    );
    assert.deepEqual(values, [
      IO_URING_PARAMS_SIZE,
      PARAMS_sq_entries,
      PARAMS_cq_entries,
      PARAMS_flags,
      PARAMS_features,
      PARAMS_sq_off,
      PARAMS_cq_off,
      SQ_OFF_head,
      SQ_OFF_tail,
      SQ_OFF_ring_mask,
      SQ_OFF_ring_entries,
      SQ_OFF_flags,
      SQ_OFF_dropped,
      SQ_OFF_array,
      CQ_OFF_head,
      CQ_OFF_tail,
      CQ_OFF_ring_mask,
      CQ_OFF_ring_entries,
      CQ_OFF_overflow,
      CQ_OFF_cqes,
      CQ_OFF_flags,
      IO_URING_SQE_SIZE,
      SQE_opcode,
      SQE_fd,
      SQE_off,
      SQE_addr,
      SQE_len,
      SQE_rw_flags,
      SQE_rw_flags,
      SQE_user_data,
      SQE_buf_index,
      IO_URING_CQE_SIZE,
      CQE_user_data,
      CQE_res,
      CQE_flags,
      0,
      3,
      4,
      5,
      22,
      23,
      1,
      1,
      0x10000000,
      1,
    ]);
  },
});

Deno.test({
  name: "a NOP makes the round trip and brings back any number as user data",
  ignore,
  fn() {
    const ring = new Uring(8);
    try {
      const sent = [0, 42, -1, 2 ** 40 + 3, 0.5, Number.MAX_SAFE_INTEGER];
      for (const u of sent) ring.prepNop(u);
      assert.equal(ring.pending, sent.length);
      assert.equal(ring.submit(sent.length), sent.length);
      assert.equal(ring.pending, 0);
      assert.equal(ring.ready, sent.length);
      const got: number[] = [];
      assert.equal(
        ring.reap((u, result, flags) => {
          assert.equal(result, 0);
          assert.equal(flags, 0);
          got.push(u);
        }),
        sent.length,
      );
      assert.deepEqual(got, sent);
      assert.equal(ring.inFlight, 0);
      assert.equal(ring.reap(() => assert.fail("no completion left")), 0);
    } finally {
      ring.close();
    }
  },
});

Deno.test({
  name:
    "a file written with O_DIRECT through the ring reads back at queue depth 32 as Deno reads it",
  ignore,
  fn() {
    const seed = 1616;
    console.log(`seed ${seed}`);
    const random = mulberry32(seed);
    const block = 4096, blocks = 1024;
    const path = join(dir, "direct.img");
    const source = new AlignedBuffer(block * blocks);
    const target = new AlignedBuffer(block * blocks);
    for (let i = 0; i < source.bytes.length; i++) source.bytes[i] = Math.floor(random() * 256);
    const fd = openFd(path, O_RDWR | O_CREAT | O_DIRECT);
    const ring = new Uring(32);
    try {
      // Each block from its own view of the one aligned buffer, in random order.
      const views = Array.from(
        { length: blocks },
        (_, i) => source.bytes.subarray(i * block, (i + 1) * block),
      );
      const writeOrder = shuffled(blocks, random);
      const wrote = pump(ring, blocks, 32, (i) => {
        const b = writeOrder[i]!;
        ring.prepWrite(fd, views[b]!, block, b * block, i);
      }, (_, result) => assert.equal(result, block));
      assert.equal(wrote, 32);
      ring.prepFsync(fd, false, 7);
      assert.deepEqual(waitAll(ring, 1), [[7, 0]]);
      assert.deepEqual(Deno.readFileSync(path), source.bytes);

      const readOrder = shuffled(blocks, random);
      const targets = Array.from(
        { length: blocks },
        (_, i) => target.bytes.subarray(i * block, (i + 1) * block),
      );
      const read = pump(ring, blocks, 32, (i) => {
        const b = readOrder[i]!;
        ring.prepRead(fd, targets[b]!, block, b * block, b);
      }, (_, result) => assert.equal(result, block));
      assert.equal(read, 32);
      assert.deepEqual(target.bytes, Deno.readFileSync(path));
    } finally {
      ring.close();
      libc().close(fd);
      source.free();
      target.free();
    }
  },
});

Deno.test({
  name: "a page-cached file takes unaligned writes from JS memory and reads them back at depth 32",
  ignore,
  fn() {
    const seed = 1617;
    console.log(`seed ${seed}`);
    const random = mulberry32(seed);
    const path = join(dir, "cached.img");
    const size = 3 * 1024 * 1024 + 333;
    const expected = new Uint8Array(size);
    for (let i = 0; i < size; i++) expected[i] = Math.floor(random() * 256);
    // Cut the file into pieces of 1 to 20000 bytes at odd offsets.
    const pieces: Array<[number, number]> = [];
    for (let at = 0; at < size;) {
      const length = Math.min(size - at, 1 + Math.floor(random() * 20000));
      pieces.push([at, length]);
      at += length;
    }
    const fd = openFd(path, O_RDWR | O_CREAT);
    const ring = new Uring(64);
    try {
      const order = shuffled(pieces.length, random);
      pump(ring, pieces.length, 32, (i) => {
        const [at, length] = pieces[order[i]!]!;
        // A fresh heap copy with a margin, so the length is not the whole view.
        const copy = new Uint8Array(length + 5);
        copy.set(expected.subarray(at, at + length));
        ring.prepWrite(fd, copy, length, at, i);
      }, (i, result) => assert.equal(result, pieces[order[i]!]![1]));
      ring.prepFsync(fd, true, 1);
      assert.deepEqual(waitAll(ring, 1), [[1, 0]]);
      assert.deepEqual(Deno.readFileSync(path), expected);

      const back = new Uint8Array(size);
      const deepest = pump(ring, pieces.length, 32, (i) => {
        const [at, length] = pieces[i]!;
        ring.prepRead(fd, back.subarray(at, at + length), length, at, i);
      }, (i, result) => assert.equal(result, pieces[i]![1]));
      assert.equal(deepest, 32);
      assert.deepEqual(back, Deno.readFileSync(path));
    } finally {
      ring.close();
      libc().close(fd);
    }
  },
});

Deno.test({
  name: "a read past the end of the file completes short, and at the end with 0",
  ignore,
  fn() {
    const path = join(dir, "short.img");
    const data = new Uint8Array(10000).map((_, i) => i * 7);
    Deno.writeFileSync(path, data);
    const fd = openFd(path, O_RDONLY);
    const ring = new Uring(4);
    try {
      const tail = new Uint8Array(8192).fill(0xee);
      const none = new Uint8Array(4096);
      ring.prepRead(fd, tail, 8192, 8192, 1);
      ring.prepRead(fd, none, 4096, 20000, 2);
      const results = new Map(waitAll(ring, 2));
      assert.equal(results.get(1), 10000 - 8192);
      assert.equal(results.get(2), 0);
      assert.deepEqual(tail.subarray(0, 1808), data.subarray(8192));
      assert.equal(tail[1808], 0xee, "nothing written past the short result");
    } finally {
      ring.close();
      libc().close(fd);
    }
  },
});

Deno.test({
  name: "an invalid fd completes with -EBADF instead of throwing",
  ignore,
  fn() {
    const ring = new Uring(4);
    const buffer = new Uint8Array(512);
    try {
      ring.prepRead(987654, buffer, 512, 0, 1);
      ring.prepWrite(-1, buffer, 512, 0, 2);
      ring.prepFsync(987654, false, 3);
      const results = new Map(waitAll(ring, 3));
      assert.deepEqual([...results.entries()].sort(), [[1, -EBADF], [2, -EBADF], [3, -EBADF]]);
      assert.equal(errnoText(EBADF), "EBADF (Bad file descriptor)");
    } finally {
      ring.close();
    }
  },
});

Deno.test({
  name: "the ring wraps around: 5000 requests through 4 entries, each completed once, data checked",
  ignore,
  fn() {
    const path = join(dir, "wrap.img");
    const data = new Uint8Array(64 * 1024).map((_, i) => (i * 31 + (i >> 8)) & 0xff);
    Deno.writeFileSync(path, data);
    const fd = openFd(path, O_RDONLY);
    const ring = new Uring(4);
    try {
      assert.equal(ring.entries, 4);
      // A buffer per request in flight, given back when its completion is checked.
      const pool = Array.from({ length: ring.cqEntries }, () => new Uint8Array(100));
      const lent = new Map<number, Uint8Array>();
      const total = 5000;
      const completed = new Uint8Array(total);
      let next = 0, seen = 0;
      while (seen < total) {
        while (next < total && ring.space > 0) {
          // Reads of 100 bytes at a moving offset, and a NOP every third request.
          if (next % 3 === 2) ring.prepNop(next);
          else {
            const buffer = pool.pop()!;
            buffer.fill(0);
            lent.set(next, buffer);
            ring.prepRead(fd, buffer, 100, (next * 97) % 60000, next);
          }
          next++;
        }
        ring.submit(1);
        seen += ring.reap((u, result) => {
          completed[u]!++;
          if (u % 3 === 2) return assert.equal(result, 0);
          assert.equal(result, 100);
          const at = (u * 97) % 60000;
          const buffer = lent.get(u)!;
          assert.deepEqual(buffer, data.subarray(at, at + 100));
          lent.delete(u);
          pool.push(buffer);
        });
      }
      assert.ok(completed.every((n) => n === 1));
      assert.equal(ring.inFlight, 0);
    } finally {
      ring.close();
      libc().close(fd);
    }
  },
});

Deno.test({
  name: "a full ring refuses another request, and waiting for more than in flight is refused",
  ignore,
  fn() {
    const ring = new Uring(2);
    try {
      assert.equal(ring.space, 2);
      ring.prepNop(1);
      ring.prepNop(2);
      assert.equal(ring.space, 0);
      assert.throws(() => ring.prepNop(3), RangeError);
      assert.throws(() => ring.submit(3), RangeError);
      ring.submit(0);
      // SQ slots are free again once the kernel took them; the in-flight limit is the CQ size.
      ring.prepNop(3);
      ring.prepNop(4);
      assert.equal(ring.inFlight, 4);
      assert.equal(ring.space, 0);
      assert.throws(() => ring.prepNop(5), RangeError);
      assert.equal(waitAll(ring, 4).length, 4);
      assert.throws(() => ring.prepRead(0, new Uint8Array(10), 11, 0, 0), RangeError);
    } finally {
      ring.close();
    }
  },
});

Deno.test({
  name: "registered buffers serve READ_FIXED and WRITE_FIXED",
  ignore,
  fn() {
    const path = join(dir, "fixed.img");
    const fd = openFd(path, O_RDWR | O_CREAT | O_DIRECT);
    const memory = new AlignedBuffer(65536);
    const ring = new Uring(8);
    try {
      ring.registerBuffers([memory.bytes]);
      memory.bytes.subarray(0, 32768).forEach((_, i, a) => (a[i] = i % 251));
      ring.prepWriteFixed(fd, memory.bytes.subarray(0, 32768), 32768, 0, 0, 1);
      assert.deepEqual(waitAll(ring, 1), [[1, 32768]]);
      ring.prepReadFixed(fd, memory.bytes.subarray(32768), 32768, 0, 0, 2);
      assert.deepEqual(waitAll(ring, 1), [[2, 32768]]);
      assert.deepEqual(memory.bytes.subarray(32768), memory.bytes.subarray(0, 32768));
      ring.unregisterBuffers();
    } finally {
      ring.close();
      libc().close(fd);
      memory.free();
    }
  },
});

Deno.test({
  name: "close waits for requests in flight, refuses later requests, and is harmless twice",
  ignore,
  fn() {
    const ring = new Uring(4);
    ring.prepNop(1);
    ring.submit();
    ring.prepNop(2); // prepared, never submitted: close submits it too
    ring.close();
    ring.close();
    assert.throws(() => ring.prepNop(3), /closed/);
    assert.throws(() => ring.submit(), /closed/);
    assert.equal(ring.reap(() => assert.fail("closed")), 0);
  },
});

Deno.test("an impossible ring size is refused before the kernel sees it", () => {
  assert.throws(() => new Uring(0), RangeError);
  assert.throws(() => new Uring(65536), RangeError);
});

Deno.test({
  name: "a failed io_uring_setup throws naming the call and the errno (EMFILE under ulimit -n 64)",
  ignore,
  async fn() {
    const script = join(dir, "emfile.ts");
    const module = new URL("../../src/sys/uring.ts", import.meta.url).href;
    Deno.writeTextFileSync(
      script,
      `import { Uring } from ${JSON.stringify(module)};
new Uring(1).close(); // libc loaded while descriptors are left
const held = [];
try { for (;;) held.push(Deno.openSync("/dev/null")); } catch { /* EMFILE: none left */ }
try {
  new Uring(4);
  console.log("no error");
} catch (e) {
  console.log(JSON.stringify({ kind: e.kind, errno: e.context.errno, message: e.message }));
}
`,
    );
    const out = await new Deno.Command("bash", {
      args: ["-c", 'ulimit -n 64 && exec "$0" run -A --no-lock "$1"', Deno.execPath(), script],
    }).output();
    const text = new TextDecoder().decode(out.stdout).trim();
    assert.ok(out.success, new TextDecoder().decode(out.stderr));
    assert.deepEqual(JSON.parse(text), {
      kind: "io",
      errno: 24,
      message: "io_uring_setup: EMFILE (Too many open files)",
    });
  },
});

Deno.test({
  name: "a timed wait returns when its time is up with nothing complete, and when requests are",
  ignore,
  fn() {
    // A FIFO opened for reading and writing: a read of it completes only once a byte is written.
    const fifo = join(dir, "timed.fifo");
    const made = new Deno.Command("mkfifo", { args: [fifo] }).outputSync();
    assert.ok(made.success, "mkfifo");
    const fd = openFd(fifo, O_RDWR);
    const ring = new Uring(64);
    const byte = new Uint8Array(new ArrayBuffer(1));
    try {
      ring.prepRead(fd, byte, 1, 0, 9);
      // Several waits in a row, each bounded: the ring is never hung on the pending read.
      for (let i = 0; i < 3; i++) {
        assert.equal(ring.submit(1, 200), i === 0 ? 1 : 0);
        assert.equal(ring.ready, 0);
        assert.equal(ring.inFlight, 1);
      }
      Deno.writeFileSync(fifo, new Uint8Array([42]));
      for (let i = 0; i < 10_000 && ring.ready === 0; i++) ring.submit(1, 1000);
      const got: number[][] = [];
      ring.reap((userData, result) => got.push([userData, result]));
      assert.deepEqual(got, [[9, 1]]);
      assert.equal(byte[0], 42);
      // With many O_DIRECT reads in flight the same timed wait takes them (the size of its
      // argument goes to the kernel whole: an i32 there left garbage in the register's upper half
      // and the kernel answered EINVAL).
      const path = join(dir, "timed.img");
      const file = openFd(path, O_RDWR | O_CREAT | O_DIRECT);
      const memory = new AlignedBuffer(32 * 4096);
      try {
        assert.equal(libc().ftruncate(file, BigInt(32 * 4096)), 0);
        for (let i = 0; i < 32; i++) {
          ring.prepRead(file, memory.bytes.subarray(i * 4096, (i + 1) * 4096), 4096, i * 4096, i);
        }
        const results: number[] = [];
        while (results.length < 32) {
          ring.submit(1, 100);
          ring.reap((_, result) => results.push(result));
        }
        assert.deepEqual(results, new Array(32).fill(4096));
      } finally {
        libc().close(file);
        memory.free();
      }
    } finally {
      ring.close();
      libc().close(fd);
    }
  },
});
