/**
 * io_uring by raw system calls (x86_64), without liburing: {@linkcode Uring} sets a ring up, maps
 * its submission and completion queues into the process and views them as typed arrays, so a
 * request costs stores into shared memory and completions are reaped without a system call. See
 * io_uring_setup(2), io_uring_enter(2), io_uring_register(2) and include/uapi/linux/io_uring.h,
 * whose names the layout constants keep.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { errno, libc, MAX_IO_CHUNK, strerror } from "./libc.ts";

/** System call numbers on x86_64. */
const SYS_io_uring_setup = 425n;
const SYS_io_uring_enter = 426n;
const SYS_io_uring_register = 427n;

/** struct io_uring_params: 120 bytes; the kernel fills in all but `sq_entries`' request. */
export const IO_URING_PARAMS_SIZE = 120;
export const PARAMS_sq_entries = 0;
export const PARAMS_cq_entries = 4;
export const PARAMS_flags = 8;
export const PARAMS_features = 20;
/** struct io_sqring_offsets (40 bytes) inside the params. */
export const PARAMS_sq_off = 40;
/** struct io_cqring_offsets (40 bytes) inside the params. */
export const PARAMS_cq_off = 80;
/** Fields of struct io_sqring_offsets, relative to `sq_off` (each a u32 naming a ring offset). */
export const SQ_OFF_head = 0;
export const SQ_OFF_tail = 4;
export const SQ_OFF_ring_mask = 8;
export const SQ_OFF_ring_entries = 12;
export const SQ_OFF_flags = 16;
export const SQ_OFF_dropped = 20;
export const SQ_OFF_array = 24;
/** Fields of struct io_cqring_offsets, relative to `cq_off`. */
export const CQ_OFF_head = 0;
export const CQ_OFF_tail = 4;
export const CQ_OFF_ring_mask = 8;
export const CQ_OFF_ring_entries = 12;
export const CQ_OFF_overflow = 16;
export const CQ_OFF_cqes = 20;
export const CQ_OFF_flags = 24;

/** struct io_uring_sqe: 64 bytes (without IORING_SETUP_SQE128). */
export const IO_URING_SQE_SIZE = 64;
export const SQE_opcode = 0; // u8, then flags u8 @1 and ioprio u16 @2 (0): one word
export const SQE_fd = 4; // i32
export const SQE_off = 8; // u64
export const SQE_addr = 16; // u64
export const SQE_len = 24; // u32
export const SQE_rw_flags = 28; // union: rw_flags, fsync_flags, ...
export const SQE_user_data = 32; // u64
export const SQE_buf_index = 40; // u16, then personality u16
/** struct io_uring_cqe: 16 bytes (without IORING_SETUP_CQE32). */
export const IO_URING_CQE_SIZE = 16;
export const CQE_user_data = 0; // u64
export const CQE_res = 8; // i32
export const CQE_flags = 12; // u32

/** The same fields as word (Int32Array) indices, which is how the ring is written and read. */
const W_opcode = SQE_opcode >> 2;
const W_fd = SQE_fd >> 2;
const W_off = SQE_off >> 2; // low half; the high half follows
const W_addr = SQE_addr >> 2;
const W_len = SQE_len >> 2;
const W_rw_flags = SQE_rw_flags >> 2;
const W_user_data = SQE_user_data >> 2;
const W_buf_index = SQE_buf_index >> 2;
const SQE_WORDS = IO_URING_SQE_SIZE >> 2;
const W_cqe_user_data = CQE_user_data >> 2;
const W_cqe_res = CQE_res >> 2;
const W_cqe_flags = CQE_flags >> 2;
const CQE_WORDS_LOG2 = 2; // 16 bytes = 4 words

/** mmap offsets of the rings (IORING_OFF_*). */
const IORING_OFF_SQ_RING = 0n;
const IORING_OFF_CQ_RING = 0x8000000n;
const IORING_OFF_SQES = 0x10000000n;

/** io_uring_params.features bits. */
export const IORING_FEAT_SINGLE_MMAP = 1 << 0;
export const IORING_FEAT_NODROP = 1 << 1;

/** io_uring_enter flags. */
const IORING_ENTER_GETEVENTS = 1 << 0;
const IORING_ENTER_EXT_ARG = 1 << 3;
/** struct io_uring_getevents_arg: sigmask u64, sigmask_sz u32, pad u32, ts u64 (a pointer). */
const GETEVENTS_ARG_BYTES = 24;
const ETIME = 62;
/** The argument's size as io_uring_enter's size_t argument (a pointer-sized FFI value). */
const GETEVENTS_ARG_SIZE = Deno.UnsafePointer.create(BigInt(GETEVENTS_ARG_BYTES));

/** Opcodes (enum io_uring_op). */
export const IORING_OP_NOP = 0;
export const IORING_OP_FSYNC = 3;
export const IORING_OP_READ_FIXED = 4;
export const IORING_OP_WRITE_FIXED = 5;
export const IORING_OP_READ = 22;
export const IORING_OP_WRITE = 23;
/** fsync_flags: data only, as fdatasync(2). */
export const IORING_FSYNC_DATASYNC = 1 << 0;

/** io_uring_register opcodes. */
const IORING_REGISTER_BUFFERS = 0;
const IORING_REGISTER_EVENTFD = 4;
const IORING_UNREGISTER_EVENTFD = 5;
const IORING_UNREGISTER_BUFFERS = 1;

const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 0x01;
const MAP_POPULATE = 0x08000;

/** The errno values this module names or that callers match on. */
export const EPERM = 1;
export const EINTR = 4;
export const EBADF = 9;
export const EACCES = 13;
export const ENOSYS = 38;
const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM",
  2: "ENOENT",
  4: "EINTR",
  5: "EIO",
  9: "EBADF",
  11: "EAGAIN",
  12: "ENOMEM",
  13: "EACCES",
  14: "EFAULT",
  16: "EBUSY",
  22: "EINVAL",
  24: "EMFILE",
  38: "ENOSYS",
  95: "EOPNOTSUPP",
};

/** `EPERM (Operation not permitted)`: the errno's name where known, and the C library's text. */
export function errnoText(code: number): string {
  const name = ERRNO_NAMES[code];
  return name === undefined ? strerror(code) : `${name} (${strerror(code)})`;
}

/** `call: EXXX (text)` as a BlockError carrying the errno. */
function callFailed(call: string, code: number): BlockError {
  const unsupported = code === ENOSYS || code === EPERM || code === EACCES;
  return new BlockError(unsupported ? "unsupported" : "io", `${call}: ${errnoText(code)}`, {
    errno: code,
  });
}

const TWO_32 = 4294967296;
const MAP_FAILED = 0xffff_ffff_ffff_ffffn;

/** Where the kernel put each ring field, as it reported in io_uring_params (byte offsets). */
export interface UringOffsets {
  readonly sq: {
    readonly head: number;
    readonly tail: number;
    readonly ringMask: number;
    readonly ringEntries: number;
    readonly flags: number;
    readonly dropped: number;
    readonly array: number;
  };
  readonly cq: {
    readonly head: number;
    readonly tail: number;
    readonly ringMask: number;
    readonly ringEntries: number;
    readonly overflow: number;
    readonly cqes: number;
    readonly flags: number;
  };
  /** Bytes mapped for the SQ ring and the CQ ring (one mapping when they are equal objects). */
  readonly sqRingBytes: number;
  readonly cqRingBytes: number;
}

/** One mapping: its pointer and length, to unmap once. */
interface Mapping {
  readonly pointer: Deno.PointerObject;
  readonly length: number;
}

/**
 * Called once per completion by {@linkcode Uring.reap}: the request's `userData`, and its result —
 * a byte count or 0 on success, `-errno` on failure (never thrown) — and the CQE flags.
 */
export type UringCompletion = (userData: number, result: number, flags: number) => void;

/**
 * One io_uring instance: owns its fd and the three mappings, released once by
 * {@linkcode Uring.close}. Requests are prepared (`prepRead`, `prepWrite`, `prepFsync`,
 * `prepNop`), handed to the kernel by {@linkcode Uring.submit}, and their completions read by
 * {@linkcode Uring.reap}, which makes no system call. At most {@linkcode Uring.cqEntries} requests
 * are in flight, so the completion queue never overflows; the ring keeps each request's buffer
 * referenced until its completion is reaped.
 *
 * Not for concurrent use from several Workers: one ring per thread, as the kernel intends.
 *
 * @example (needs `--allow-ffi` and io_uring)
 * ```ts
 * import { Uring } from "./uring.ts";
 * const ring = new Uring(8);
 * try {
 *   ring.prepNop(42);
 *   ring.submit(1);
 *   let seen = -1;
 *   ring.reap((userData, result) => {
 *     if (result === 0) seen = userData;
 *   });
 *   if (seen !== 42) throw new Error("no completion");
 * } finally {
 *   ring.close();
 * }
 * ```
 */
export class Uring {
  /** Submission queue entries (the request rounded up to a power of two by the kernel). */
  readonly entries: number;
  /** Completion queue entries (twice {@linkcode entries} by default). */
  readonly cqEntries: number;
  /** io_uring_params.features as the kernel reported them (IORING_FEAT_*). */
  readonly features: number;
  /** Ring field offsets as the kernel reported them. */
  readonly offsets: UringOffsets;

  #fd: number;
  readonly #mappings: Mapping[] = [];
  /** The SQ ring, the CQ ring (the same buffer with SINGLE_MMAP) and the SQE array as words. */
  readonly #sq: Int32Array;
  readonly #cq: Int32Array;
  readonly #sqes: Int32Array;
  /** Word indices of the ring fields. */
  readonly #sqHead: number;
  readonly #sqTail: number;
  readonly #sqMask: number;
  readonly #cqHead: number;
  readonly #cqTail: number;
  readonly #cqMask: number;
  readonly #cqes: number;
  /** Local copies: the next SQ tail to publish and the next CQ head to consume. */
  #sqTailLocal = 0;
  #cqHeadLocal = 0;
  /** Request ids free for use (a stack) and, per id, the caller's user data and buffer. */
  readonly #freeIds: Int32Array;
  #freeCount: number;
  readonly #userData: Float64Array;
  readonly #buffers: (Uint8Array | undefined)[];
  /** The last buffer's memory and its address split in halves: a one-entry cache before the map. */
  #lastMemory: ArrayBuffer | undefined;
  #lastLo = 0;
  #lastHi = 0;
  readonly #addresses = new WeakMap<ArrayBuffer, [number, number]>();
  /** Registered buffers (IORING_REGISTER_BUFFERS), kept referenced while registered. */
  #registered: Uint8Array[] = [];
  #eventfd = -1;
  #closed = false;
  /** The io_uring_getevents_arg and timespec of timed waits (made on first use). */
  #waitArg:
    | { bytes: Uint8Array; view: DataView; pointer: Deno.PointerValue; micros: number }
    | undefined;

  /**
   * Sets up a ring of `entries` submission slots and maps it.
   *
   * @param entries submission queue size, 1 to 32768 (rounded up to a power of two)
   * @throws {RangeError} for a size outside 1..32768
   * @throws {BlockError} `unsupported` when io_uring_setup fails with ENOSYS, EPERM or EACCES
   *   (no io_uring in this kernel, `kernel.io_uring_disabled`, a container's seccomp profile);
   *   `io` for any other failed setup or mapping. The message names the call and the errno.
   */
  constructor(entries: number) {
    if (!Number.isInteger(entries) || entries < 1 || entries > 32768) {
      throw new RangeError(`An io_uring needs 1 to 32768 entries, got ${entries}`);
    }
    const c = libc();
    const params = new Uint8Array(IO_URING_PARAMS_SIZE);
    const fd = c.syscall2(SYS_io_uring_setup, entries, params);
    if (fd < 0) throw callFailed("io_uring_setup", errno());
    this.#fd = fd;
    try {
      const p = new DataView(params.buffer);
      const u32 = (at: number) => p.getUint32(at, true);
      this.entries = u32(PARAMS_sq_entries);
      this.cqEntries = u32(PARAMS_cq_entries);
      this.features = u32(PARAMS_features);
      const sq = {
        head: u32(PARAMS_sq_off + SQ_OFF_head),
        tail: u32(PARAMS_sq_off + SQ_OFF_tail),
        ringMask: u32(PARAMS_sq_off + SQ_OFF_ring_mask),
        ringEntries: u32(PARAMS_sq_off + SQ_OFF_ring_entries),
        flags: u32(PARAMS_sq_off + SQ_OFF_flags),
        dropped: u32(PARAMS_sq_off + SQ_OFF_dropped),
        array: u32(PARAMS_sq_off + SQ_OFF_array),
      };
      const cq = {
        head: u32(PARAMS_cq_off + CQ_OFF_head),
        tail: u32(PARAMS_cq_off + CQ_OFF_tail),
        ringMask: u32(PARAMS_cq_off + CQ_OFF_ring_mask),
        ringEntries: u32(PARAMS_cq_off + CQ_OFF_ring_entries),
        overflow: u32(PARAMS_cq_off + CQ_OFF_overflow),
        cqes: u32(PARAMS_cq_off + CQ_OFF_cqes),
        flags: u32(PARAMS_cq_off + CQ_OFF_flags),
      };
      let sqRingBytes = sq.array + this.entries * 4;
      let cqRingBytes = cq.cqes + this.cqEntries * IO_URING_CQE_SIZE;
      const single = (this.features & IORING_FEAT_SINGLE_MMAP) !== 0;
      if (single) sqRingBytes = cqRingBytes = Math.max(sqRingBytes, cqRingBytes);
      this.offsets = { sq, cq, sqRingBytes, cqRingBytes };

      const sqRing = this.#map(sqRingBytes, IORING_OFF_SQ_RING, "SQ ring");
      const cqRing = single ? sqRing : this.#map(cqRingBytes, IORING_OFF_CQ_RING, "CQ ring");
      this.#sq = new Int32Array(sqRing);
      this.#cq = new Int32Array(cqRing);
      this.#sqes = new Int32Array(
        this.#map(this.entries * IO_URING_SQE_SIZE, IORING_OFF_SQES, "SQE array"),
      );
      this.#sqHead = sq.head >> 2;
      this.#sqTail = sq.tail >> 2;
      this.#sqMask = this.#sq[sq.ringMask >> 2]!;
      this.#cqHead = cq.head >> 2;
      this.#cqTail = cq.tail >> 2;
      this.#cqMask = this.#cq[cq.ringMask >> 2]!;
      this.#cqes = cq.cqes >> 2;
      // Slot i of the SQE array is always index i of the SQ: the array is filled once.
      const array = sq.array >> 2;
      for (let i = 0; i < this.entries; i++) this.#sq[array + i] = i;
      this.#sqTailLocal = this.#sq[this.#sqTail]! >>> 0;
      this.#cqHeadLocal = this.#cq[this.#cqHead]! >>> 0;
    } catch (e) {
      this.#release();
      throw e;
    }
    this.#freeIds = new Int32Array(this.cqEntries);
    for (let i = 0; i < this.cqEntries; i++) this.#freeIds[i] = this.cqEntries - 1 - i;
    this.#freeCount = this.cqEntries;
    this.#userData = new Float64Array(this.cqEntries);
    this.#buffers = new Array<Uint8Array | undefined>(this.cqEntries).fill(undefined);
  }

  /** Maps `length` bytes of the ring at `offset` and views them without a copy. */
  #map(length: number, offset: bigint, what: string): ArrayBuffer {
    const p = libc().mmap(
      null,
      BigInt(length),
      PROT_READ | PROT_WRITE,
      MAP_SHARED | MAP_POPULATE,
      this.#fd,
      offset,
    );
    if (p === null || BigInt(Deno.UnsafePointer.value(p)) === MAP_FAILED) {
      throw callFailed(`mmap of the io_uring ${what}`, errno());
    }
    this.#mappings.push({ pointer: p, length });
    return Deno.UnsafePointerView.getArrayBuffer(p, length);
  }

  /**
   * What the mapped rings hold at the kernel's offsets: each ring's entries and mask (the kernel
   * writes them at setup; they must agree with io_uring_params, else a layout constant is wrong).
   */
  get mapped(): {
    sqRingEntries: number;
    sqRingMask: number;
    cqRingEntries: number;
    cqRingMask: number;
  } {
    if (this.#closed) throw new BlockError("io", "io_uring is closed");
    const { sq, cq } = this.offsets;
    return {
      sqRingEntries: this.#sq[sq.ringEntries >> 2]!,
      sqRingMask: this.#sq[sq.ringMask >> 2]!,
      cqRingEntries: this.#cq[cq.ringEntries >> 2]!,
      cqRingMask: this.#cq[cq.ringMask >> 2]!,
    };
  }

  /** Requests that may be prepared now: free SQ slots, within the in-flight limit. */
  get space(): number {
    const sqFree = this.entries -
      ((this.#sqTailLocal - Atomics.load(this.#sq, this.#sqHead)) >>> 0);
    return Math.min(sqFree, this.#freeCount);
  }

  /** Requests prepared or submitted whose completions have not been reaped. */
  get inFlight(): number {
    return this.cqEntries - this.#freeCount;
  }

  /** Requests prepared and not yet handed to the kernel by {@linkcode submit}. */
  get pending(): number {
    return (this.#sqTailLocal - Atomics.load(this.#sq, this.#sqHead)) >>> 0;
  }

  /** Completions waiting in the CQ, readable by {@linkcode reap} without a system call. */
  get ready(): number {
    return (Atomics.load(this.#cq, this.#cqTail) - this.#cqHeadLocal) >>> 0;
  }

  /**
   * Prepares a read of `length` bytes at file `offset` into the start of `buffer`.
   *
   * @param fd an open file descriptor (O_DIRECT needs `buffer`, `length` and `offset` aligned)
   * @param buffer memory outside V8's moving heap: an {@linkcode AlignedBuffer}'s bytes or a view
   *   of any ArrayBuffer; kept referenced until the completion is reaped
   * @param length bytes to read, at most `buffer.byteLength` and 1 GiB
   * @param offset byte offset in the file (-1: the file position, as read(2))
   * @param userData any number, handed back with the completion
   * @throws {RangeError} when the ring is full ({@linkcode space} is 0) or `length` does not fit
   */
  prepRead(
    fd: number,
    buffer: Uint8Array,
    length: number,
    offset: number,
    userData: number,
  ): void {
    this.#prepIo(IORING_OP_READ, fd, buffer, length, offset, userData, 0);
  }

  /** Prepares a write of the first `length` bytes of `buffer` at file `offset`; as {@linkcode prepRead}. */
  prepWrite(
    fd: number,
    buffer: Uint8Array,
    length: number,
    offset: number,
    userData: number,
  ): void {
    this.#prepIo(IORING_OP_WRITE, fd, buffer, length, offset, userData, 0);
  }

  /**
   * Prepares a read into registered buffer `bufIndex` ({@linkcode registerBuffers}): `buffer` must
   * lie inside it. Saves the kernel pinning the pages per request.
   */
  prepReadFixed(
    fd: number,
    buffer: Uint8Array,
    length: number,
    offset: number,
    bufIndex: number,
    userData: number,
  ): void {
    this.#prepIo(IORING_OP_READ_FIXED, fd, buffer, length, offset, userData, bufIndex);
  }

  /** Prepares a write from registered buffer `bufIndex`; as {@linkcode prepReadFixed}. */
  prepWriteFixed(
    fd: number,
    buffer: Uint8Array,
    length: number,
    offset: number,
    bufIndex: number,
    userData: number,
  ): void {
    this.#prepIo(IORING_OP_WRITE_FIXED, fd, buffer, length, offset, userData, bufIndex);
  }

  /**
   * Prepares an fsync of `fd`: all data and metadata, or with `datasync` only what reading the
   * data back needs (fdatasync(2)). It orders nothing: requests in flight may complete after it.
   */
  prepFsync(fd: number, datasync: boolean, userData: number): void {
    const w = this.#sqe(userData, undefined);
    const s = this.#sqes;
    s[w + W_opcode] = IORING_OP_FSYNC;
    s[w + W_fd] = fd;
    s[w + W_rw_flags] = datasync ? IORING_FSYNC_DATASYNC : 0;
  }

  /** Prepares a request that does nothing and completes with 0. */
  prepNop(userData: number): void {
    this.#sqe(userData, undefined);
  }

  #prepIo(
    opcode: number,
    fd: number,
    buffer: Uint8Array,
    length: number,
    offset: number,
    userData: number,
    bufIndex: number,
  ): void {
    // The kernel would read or write past the view's end: refuse before it sees the request.
    if (!(length >= 0 && length <= buffer.byteLength && length <= MAX_IO_CHUNK)) {
      throw new RangeError(
        `An io_uring request of ${length} bytes does not fit its ${buffer.byteLength}-byte buffer`,
      );
    }
    const memory = buffer.buffer as ArrayBuffer;
    if (memory !== this.#lastMemory) this.#address(memory);
    let lo = this.#lastLo + buffer.byteOffset;
    let hi = this.#lastHi;
    if (lo >= TWO_32) {
      lo -= TWO_32;
      hi++;
    }
    const w = this.#sqe(userData, buffer);
    const s = this.#sqes;
    s[w + W_opcode] = opcode;
    s[w + W_fd] = fd;
    s[w + W_off] = offset; // ToInt32 keeps the low 32 bits
    s[w + W_off + 1] = Math.floor(offset / TWO_32);
    s[w + W_addr] = lo;
    s[w + W_addr + 1] = hi;
    s[w + W_len] = length;
    s[w + W_buf_index] = bufIndex;
  }

  /** Makes `memory` the cached buffer, finding its address once per ArrayBuffer. */
  #address(memory: ArrayBuffer): void {
    let halves = this.#addresses.get(memory);
    if (halves === undefined) {
      const address = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(memory)));
      halves = [Number(address & 0xffff_ffffn), Number(address >> 32n)];
      this.#addresses.set(memory, halves);
    }
    this.#lastMemory = memory;
    this.#lastLo = halves[0];
    this.#lastHi = halves[1];
  }

  /**
   * Takes the next SQ slot and a request id, zeroes the SQE and stores the id as its user_data;
   * returns the SQE's first word index.
   */
  #sqe(userData: number, buffer: Uint8Array | undefined): number {
    if (this.#closed) throw new BlockError("io", "io_uring is closed");
    if (this.space === 0) {
      throw new RangeError(
        `io_uring full: ${this.inFlight} requests in flight, ${this.pending} not submitted`,
      );
    }
    const id = this.#freeIds[--this.#freeCount]!;
    this.#userData[id] = userData;
    this.#buffers[id] = buffer;
    const w = (this.#sqTailLocal & this.#sqMask) * SQE_WORDS;
    this.#sqTailLocal = (this.#sqTailLocal + 1) >>> 0;
    this.#sqes.fill(0, w, w + SQE_WORDS);
    this.#sqes[w + W_user_data] = id;
    return w;
  }

  /** The getevents argument with a timespec of `micros`, in memory kept for the ring's life. */
  #timeoutArg(micros: number): Deno.PointerValue {
    if (this.#waitArg === undefined) {
      // An ArrayBuffer of its own lives outside V8's heap and never moves (a small typed array
      // made by length may live in the heap, where a GC moves it): the ts pointer stays valid.
      const bytes = new Uint8Array(new ArrayBuffer(GETEVENTS_ARG_BYTES + 16));
      const view = new DataView(bytes.buffer);
      const base = Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes));
      view.setBigUint64(16, BigInt(base) + BigInt(GETEVENTS_ARG_BYTES), true);
      this.#waitArg = { bytes, view, pointer: Deno.UnsafePointer.of(bytes), micros: -1 };
    }
    const w = this.#waitArg;
    if (w.micros !== micros) {
      const whole = Math.max(0, Math.floor(micros));
      w.view.setBigInt64(GETEVENTS_ARG_BYTES, BigInt(Math.floor(whole / 1e6)), true);
      w.view.setBigInt64(GETEVENTS_ARG_BYTES + 8, BigInt((whole % 1e6) * 1000), true);
      w.micros = micros;
    }
    return w.pointer;
  }

  /**
   * Hands prepared requests to the kernel and, with `waitFor`, blocks the calling thread until that
   * many completions are ready, or `timeoutMicros` passed when given (IORING_ENTER_EXT_ARG: then
   * fewer may be ready on return). Makes no system call when nothing is prepared and enough
   * completions are already there.
   *
   * @param waitFor completions to wait for, at most {@linkcode inFlight}
   * @param timeoutMicros the longest wait, when waiting
   * @returns how many requests the kernel took
   * @throws {RangeError} when waiting for more than are in flight (it would never return)
   * @throws {BlockError} when io_uring_enter fails, naming the errno
   */
  submit(waitFor = 0, timeoutMicros?: number): number {
    if (this.#closed) throw new BlockError("io", "io_uring is closed");
    if (waitFor > this.inFlight) {
      throw new RangeError(`Waiting for ${waitFor} completions with ${this.inFlight} in flight`);
    }
    // Publish the prepared SQEs (the SQE stores happen before this store).
    Atomics.store(this.#sq, this.#sqTail, this.#sqTailLocal);
    const toSubmit = this.pending;
    if (toSubmit === 0 && this.ready >= waitFor) return 0;
    let flags = waitFor > 0 ? IORING_ENTER_GETEVENTS : 0;
    let arg: Deno.PointerValue = null;
    let argBytes: Deno.PointerValue = null;
    if (waitFor > 0 && timeoutMicros !== undefined) {
      arg = this.#timeoutArg(timeoutMicros);
      argBytes = GETEVENTS_ARG_SIZE;
      flags |= IORING_ENTER_EXT_ARG;
    }
    const c = libc();
    for (;;) {
      const n = c.syscall6(SYS_io_uring_enter, this.#fd, toSubmit, waitFor, flags, arg, argBytes);
      if (n >= 0) return n;
      const code = errno();
      // The timeout passed: the submissions were made (the kernel counts them before waiting).
      if (code === ETIME) return toSubmit - this.pending;
      // Interrupted while waiting: the submissions (if any) were made; wait again.
      if (code !== EINTR) throw callFailed("io_uring_enter", code);
      if (this.pending !== toSubmit || this.ready >= waitFor) return toSubmit - this.pending;
    }
  }

  /**
   * Calls `onComplete` for each completion in the CQ, oldest first, without a system call. The
   * request's slot and buffer are released before the call, so `onComplete` may prepare more.
   *
   * @param onComplete receives user data, result (`-errno` on failure) and CQE flags
   * @param max reap at most this many
   * @returns how many completions were reaped
   */
  reap(onComplete: UringCompletion, max = Infinity): number {
    if (this.#closed) return 0;
    const cq = this.#cq;
    let head = this.#cqHeadLocal;
    const tail = Atomics.load(cq, this.#cqTail) >>> 0;
    let count = 0;
    while (head !== tail && count < max) {
      const w = this.#cqes + ((head & this.#cqMask) << CQE_WORDS_LOG2);
      const id = cq[w + W_cqe_user_data]!;
      const result = cq[w + W_cqe_res]!;
      const flags = cq[w + W_cqe_flags]!;
      head = (head + 1) >>> 0;
      count++;
      const userData = this.#userData[id]!;
      this.#buffers[id] = undefined;
      this.#freeIds[this.#freeCount++] = id;
      // Give the slot back before the callback, which may submit and wait on this ring.
      this.#cqHeadLocal = head;
      Atomics.store(cq, this.#cqHead, head);
      onComplete(userData, result, flags);
    }
    return count;
  }

  /**
   * Registers `buffers` with the kernel (IORING_REGISTER_BUFFERS) for `prepReadFixed` and
   * `prepWriteFixed`, index by index; replaces nothing — unregister first.
   *
   * @throws {BlockError} when io_uring_register fails, naming the errno
   */
  registerBuffers(buffers: readonly Uint8Array[]): void {
    if (this.#closed) throw new BlockError("io", "io_uring is closed");
    const iovecs = new Uint8Array(16 * buffers.length);
    const v = new DataView(iovecs.buffer);
    buffers.forEach((b, i) => {
      const base = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(b.buffer as ArrayBuffer)));
      v.setBigUint64(16 * i, base + BigInt(b.byteOffset), true);
      v.setBigUint64(16 * i + 8, BigInt(b.byteLength), true);
    });
    const r = libc().syscall4(
      SYS_io_uring_register,
      this.#fd,
      IORING_REGISTER_BUFFERS,
      iovecs,
      buffers.length,
    );
    if (r < 0) throw callFailed("io_uring_register IORING_REGISTER_BUFFERS", errno());
    this.#registered = [...buffers];
  }

  /** Unregisters the buffers registered by {@linkcode registerBuffers}. */
  unregisterBuffers(): void {
    if (this.#closed || this.#registered.length === 0) return;
    const r = libc().syscall4(
      SYS_io_uring_register,
      this.#fd,
      IORING_UNREGISTER_BUFFERS,
      new Uint8Array(0),
      0,
    );
    if (r < 0) throw callFailed("io_uring_register IORING_UNREGISTER_BUFFERS", errno());
    this.#registered = [];
  }

  /**
   * Has the kernel signal eventfd `fd` each time it posts a completion (IORING_REGISTER_EVENTFD),
   * so a thread can wait for completions with the rest of its fds in one epoll set, as QEMU's
   * AioContext does. Completions posted while the eventfd is read are still in the ring: read the
   * eventfd before reaping, never after, and no completion goes unnoticed.
   *
   * @throws {BlockError} when io_uring_register fails (EBUSY: one is registered already)
   */
  registerEventfd(fd: number): void {
    if (this.#closed) throw new BlockError("io", "io_uring is closed");
    const arg = new Uint8Array(4);
    new DataView(arg.buffer).setInt32(0, fd, true);
    const r = libc().syscall4(SYS_io_uring_register, this.#fd, IORING_REGISTER_EVENTFD, arg, 1);
    if (r < 0) throw callFailed("io_uring_register IORING_REGISTER_EVENTFD", errno());
    this.#eventfd = fd;
  }

  /** Stops signalling the eventfd of {@linkcode registerEventfd}; nothing when none is. */
  unregisterEventfd(): void {
    if (this.#closed || this.#eventfd < 0) return;
    const r = libc().syscall4(
      SYS_io_uring_register,
      this.#fd,
      IORING_UNREGISTER_EVENTFD,
      new Uint8Array(0),
      0,
    );
    if (r < 0) throw callFailed("io_uring_register IORING_UNREGISTER_EVENTFD", errno());
    this.#eventfd = -1;
  }

  /** The eventfd completions signal ({@linkcode registerEventfd}), or -1. */
  get eventfd(): number {
    return this.#eventfd;
  }

  /**
   * Waits for the requests in flight (their completions are dropped: the kernel may still be
   * writing into their buffers), then unmaps the rings and closes the fd. Idempotent.
   */
  close(): void {
    if (this.#closed) return;
    try {
      // Prepared but unsubmitted requests go in too, so every id comes back.
      while (this.inFlight > 0) {
        this.submit(this.inFlight);
        this.reap(() => {});
      }
    } finally {
      this.#closed = true;
      this.#release();
    }
  }

  #release(): void {
    const c = libc();
    for (const m of this.#mappings.splice(0)) c.munmap(m.pointer, BigInt(m.length));
    if (this.#fd >= 0) c.close(this.#fd);
    this.#fd = -1;
    this.#registered = [];
  }
}
