/**
 * The shared memory between {@linkcode ThreadPool} and its Workers (`thread_pool_worker.ts`): one
 * SharedArrayBuffer holding a header, a submission ring of slot numbers, and per-slot request
 * words. The main thread is the only producer; Workers claim ring entries with a compare-exchange
 * on the head, run the request at the caller's memory address and publish the result.
 *
 * @module
 */

/** Request slots (a power of two): requests beyond them wait on the main thread. */
export const SLOTS = 64;
const MASK = SLOTS - 1;

/** Header words (Int32): */
/** Entries the main thread has pushed (wraps; compared for equality only). */
export const SQ_TAIL = 0;
/** Entries Workers have claimed. */
export const SQ_HEAD = 1;
/** Bumped by a Worker after each completion; the main thread waits on it. */
export const DONE_SEQ = 2;
/** Non-zero: Workers leave their loop. */
export const SHUTDOWN = 3;
/** The file descriptor every request goes to. */
export const FD = 4;
/** O_DIRECT offset/length alignment, 0 for a page-cached file. */
export const ALIGN = 5;
/** O_DIRECT memory alignment, 0 for a page-cached file. */
export const MEM_ALIGN = 6;
/** Set by a Worker that could not start (FFI refused, no memory): the errno, or -1. */
export const FAILED = 7;
/** Workers that have loaded libc and entered their loop. */
export const STARTED = 8;
const HEADER_WORDS = 16;

/** Slot states (Int32, one per slot). */
export const FREE = 0;
export const QUEUED = 1;
export const DONE = 2;

export const OP_READ = 0;
export const OP_WRITE = 1;

/** The typed views over one pool's SharedArrayBuffer. */
export interface PoolMemory {
  readonly sab: SharedArrayBuffer;
  readonly header: Int32Array;
  /** The submission ring: slot numbers, indexed by (position & MASK). */
  readonly ring: Int32Array;
  readonly state: Int32Array;
  readonly op: Int32Array;
  /** 0 on success, else the errno. */
  readonly error: Int32Array;
  /** Caller memory address (exact below 2^53; user-space addresses are below 2^47). */
  readonly address: Float64Array;
  readonly offset: Float64Array;
  readonly length: Float64Array;
  /** File offset where a failed request failed. */
  readonly errorOffset: Float64Array;
}

/** Views over `sab`, or over a new one when none is given. */
export function poolMemory(sab = new SharedArrayBuffer(byteLength())): PoolMemory {
  const i32 = (word: number, n: number) => new Int32Array(sab, word * 4, n);
  const f64Base = (HEADER_WORDS + SLOTS * 4) * 4;
  const f64 = (i: number) => new Float64Array(sab, f64Base + i * SLOTS * 8, SLOTS);
  return {
    sab,
    header: i32(0, HEADER_WORDS),
    ring: i32(HEADER_WORDS, SLOTS),
    state: i32(HEADER_WORDS + SLOTS, SLOTS),
    op: i32(HEADER_WORDS + SLOTS * 2, SLOTS),
    error: i32(HEADER_WORDS + SLOTS * 3, SLOTS),
    address: f64(0),
    offset: f64(1),
    length: f64(2),
    errorOffset: f64(3),
  };
}

function byteLength(): number {
  return (HEADER_WORDS + SLOTS * 4) * 4 + 4 * SLOTS * 8;
}

/** The ring index of queue position `position`. */
export function ringIndex(position: number): number {
  return position & MASK;
}
