/**
 * Requests in flight on one host file through a pool of Workers ({@linkcode ThreadPool}), QEMU's
 * `aio=threads`: each Worker runs synchronous pread/pwrite on the same file descriptor, so as
 * many requests reach the disk at once as there are Workers. Requests and results cross in a
 * SharedArrayBuffer (thread_pool_layout.ts): the main thread pushes slot numbers on a ring and
 * wakes one Worker with `Atomics.notify`; a Worker bumps a completion counter the main thread
 * waits on with `Atomics.waitAsync` (or `Atomics.wait` in {@linkcode ThreadPool.drainSync}).
 * Workers run at the caller's buffer address (zero copy); the request keeps the buffer referenced
 * until it settles.
 *
 * @module
 */
import { Worker } from "node:worker_threads";
import { BlockError } from "../errors.ts";
import { strerror } from "../sys/libc.ts";
import type { DioAlignment } from "../sys/direct.ts";
import {
  ALIGN,
  DONE,
  DONE_SEQ,
  FAILED,
  FD,
  FREE,
  MEM_ALIGN,
  OP_READ,
  OP_WRITE,
  type PoolMemory,
  poolMemory,
  QUEUED,
  ringIndex,
  SHUTDOWN,
  SLOTS,
  SQ_TAIL,
  STARTED,
} from "./thread_pool_layout.ts";

/** QEMU's thread pool grows on demand; ours stops at this many Workers unless told otherwise. */
export const DEFAULT_WORKERS = 4;
/** How long a blocking drain waits for the first Worker to start before failing the requests. */
const START_TIMEOUT_MS = 60_000;
/** The most Workers a pool may have (the slots bound it anyway). */
export const MAX_WORKERS = 16;

/** One read or write: a slot while it is in the ring or a Worker runs it. */
interface Op {
  readonly write: boolean;
  /** The caller's buffer: referenced here until the Worker is done with its memory. */
  readonly user: Uint8Array;
  /** File offset of `user[0]`. */
  readonly start: number;
  readonly promise: Promise<void>;
  readonly resolve: () => void;
  readonly reject: (e: unknown) => void;
}

/** Options of {@linkcode ThreadPool}. */
export interface ThreadPoolOptions {
  /** Named in errors. */
  readonly path: string;
  /** The file is open with O_DIRECT: requests must be aligned as this says. */
  readonly direct?: DioAlignment | undefined;
  /** The most Workers (default 4, at most 16); they start as requests need them. */
  readonly workers?: number;
}

/**
 * A pool of Workers doing positional I/O on one file descriptor (which it does not own).
 * {@linkcode read} takes any request; {@linkcode write} with O_DIRECT takes requests whose offset
 * and length are aligned (the caller read-modify-writes the rest; buffers not aligned in memory
 * bounce inside the Worker). At most 64 requests are in Workers' hands; the rest wait in order,
 * so memory stays bounded whatever the depth.
 *
 * Results as the synchronous calls give them: reads past the end of the file read as zeroes,
 * short transfers continue, EINTR and EAGAIN are retried, failures reject with
 * `BlockError("io")` carrying the errno.
 */
export class ThreadPool {
  readonly #path: string;
  readonly #memory: PoolMemory;
  readonly #maxWorkers: number;
  readonly #workers: Worker[] = [];
  /** The request in each slot, or undefined. */
  readonly #slotOp: (Op | undefined)[] = new Array<Op | undefined>(SLOTS).fill(undefined);
  readonly #freeSlots: number[] = [];
  /** Requests beyond the slots, in arrival order, from `#waitHead`. */
  #waiting: Op[] = [];
  #waitHead = 0;
  /** Writes not yet settled (for {@linkcode writeOverlapping}). */
  readonly #writes = new Set<Op>();
  #inFlight = 0;
  #tail = 0;
  /** DONE_SEQ as last reaped: a wait on it returns at once when a completion came since. */
  #seenSeq = 0;
  #armed = false;
  /** A timer that keeps the event loop alive while requests are in flight (waitAsync does not). */
  #keepAlive: ReturnType<typeof setTimeout> | undefined;
  #closed = false;

  /** Sets up the shared memory; Workers start with the first requests. */
  constructor(fd: number, opts: ThreadPoolOptions) {
    this.#path = opts.path;
    const workers = opts.workers ?? DEFAULT_WORKERS;
    if (!Number.isInteger(workers) || workers < 1 || workers > MAX_WORKERS) {
      throw new RangeError(`A thread pool needs 1 to ${MAX_WORKERS} workers, got ${workers}`);
    }
    this.#maxWorkers = workers;
    this.#memory = poolMemory();
    const header = this.#memory.header;
    header[FD] = fd;
    header[ALIGN] = opts.direct?.offset ?? 0;
    header[MEM_ALIGN] = opts.direct?.memory ?? 0;
    for (let i = SLOTS - 1; i >= 0; i--) this.#freeSlots.push(i);
  }

  /** Workers started so far. */
  get workers(): number {
    return this.#workers.length;
  }

  /** Requests accepted and not yet settled. */
  get busy(): boolean {
    return this.#inFlight > 0 || this.#waitHead < this.#waiting.length;
  }

  /** Fill `dst` from file `offset` (past the end of the file: zeroes). */
  read(offset: number, dst: Uint8Array): Promise<void> {
    return this.#submit(false, offset, dst);
  }

  /** Write all of `src` at file `offset`. */
  write(offset: number, src: Uint8Array): Promise<void> {
    return this.#submit(true, offset, src);
  }

  /**
   * A write not yet settled that touches `[start, end)`, as its promise (never rejecting), or
   * undefined when there is none: what a read-modify-write must wait for.
   */
  writeOverlapping(start: number, end: number): Promise<void> | undefined {
    for (const op of this.#writes) {
      if (op.start < end && op.start + op.user.length > start) {
        return op.promise.then(() => {}, () => {});
      }
    }
    return undefined;
  }

  /**
   * Blocks the thread until every accepted request has completed (their promises settle as
   * microtasks afterwards): for the synchronous calls that must not overtake them.
   */
  drainSync(): void {
    const header = this.#memory.header;
    let idle = 0;
    for (;;) {
      this.#reap();
      if (!this.busy || this.#closed) return;
      if (Atomics.wait(header, DONE_SEQ, this.#seenSeq, 1000) !== "timed-out") continue;
      // A Worker that died before its loop cannot say so while this thread blocks: give up.
      if (Atomics.load(header, STARTED) === 0 && ++idle * 1000 >= START_TIMEOUT_MS) {
        return this.#failStart();
      }
    }
  }

  /** Waits for every request, then ends the Workers. Idempotent. */
  close(): void {
    if (this.#closed) return;
    try {
      this.drainSync();
    } finally {
      this.#closed = true;
      this.#stopKeepAlive();
      const header = this.#memory.header;
      Atomics.store(header, SHUTDOWN, 1);
      Atomics.notify(header, SQ_TAIL);
      for (const w of this.#workers) w.terminate().catch(() => {});
      this.#workers.length = 0;
    }
  }

  #submit(write: boolean, start: number, user: Uint8Array): Promise<void> {
    if (this.#closed) {
      return Promise.reject(new BlockError("io", "File is closed", { path: this.#path }));
    }
    if (user.length === 0) return Promise.resolve();
    const { promise, resolve, reject } = Promise.withResolvers<void>();
    const op: Op = { write, user, start, promise, resolve, reject };
    if (write) this.#writes.add(op);
    const slot = this.#freeSlots.pop();
    if (slot === undefined || this.#waitHead < this.#waiting.length) {
      if (slot !== undefined) this.#freeSlots.push(slot);
      this.#waiting.push(op);
    } else {
      this.#start(op, slot);
    }
    this.#arm();
    return promise;
  }

  /** Hands `op` to the Workers in `slot`, starting one more Worker when all are busy. */
  #start(op: Op, slot: number): void {
    const m = this.#memory;
    const pointer = Deno.UnsafePointer.of(op.user as Uint8Array<ArrayBuffer>);
    this.#slotOp[slot] = op;
    m.op[slot] = op.write ? OP_WRITE : OP_READ;
    m.address[slot] = pointer === null ? 0 : Number(Deno.UnsafePointer.value(pointer));
    m.offset[slot] = op.start;
    m.length[slot] = op.user.length;
    m.state[slot] = QUEUED;
    m.ring[ringIndex(this.#tail)] = slot;
    this.#tail = (this.#tail + 1) | 0;
    Atomics.store(m.header, SQ_TAIL, this.#tail);
    Atomics.notify(m.header, SQ_TAIL, 1);
    this.#inFlight++;
    if (this.#workers.length < Math.min(this.#maxWorkers, this.#inFlight)) this.#spawn();
  }

  #spawn(): void {
    const worker = new Worker(new URL("./thread_pool_worker.ts", import.meta.url), {
      workerData: { sab: this.#memory.sab },
    });
    // Requests in flight keep the process alive through #keepAlive, not through the Workers.
    worker.unref();
    worker.on("error", () => this.#failStart());
    this.#workers.push(worker);
  }

  /** Waits (without blocking) for the next completion while requests are in flight. */
  #arm(): void {
    if (this.#inFlight === 0) return this.#stopKeepAlive();
    this.#keepAlive ??= setTimeout(() => {}, 2 ** 31 - 1);
    if (this.#armed) return;
    this.#armed = true;
    const wait = Atomics.waitAsync(this.#memory.header, DONE_SEQ, this.#seenSeq);
    if (wait.async) wait.value.then(this.#wake);
    else queueMicrotask(this.#wake);
  }

  readonly #wake = (): void => {
    this.#armed = false;
    if (this.#closed) return;
    this.#reap();
    this.#arm();
  };

  #stopKeepAlive(): void {
    if (this.#keepAlive === undefined) return;
    clearTimeout(this.#keepAlive);
    this.#keepAlive = undefined;
  }

  /** Settles every completed request and hands waiting ones the freed slots. */
  #reap(): void {
    const m = this.#memory;
    // Read before looking at the slots: a completion after this read changes it again.
    this.#seenSeq = Atomics.load(m.header, DONE_SEQ);
    if (Atomics.load(m.header, FAILED) !== 0) return this.#failStart();
    if (this.#inFlight === 0) return;
    for (let slot = 0; slot < SLOTS; slot++) {
      const op = this.#slotOp[slot];
      if (op === undefined || Atomics.load(m.state, slot) !== DONE) continue;
      const code = m.error[slot]!;
      const at = m.errorOffset[slot]!;
      m.state[slot] = FREE;
      this.#slotOp[slot] = undefined;
      this.#inFlight--;
      this.#settle(op, code === 0 ? undefined : this.#fail(op, at, code));
      const next = this.#nextWaiting();
      if (next === undefined) this.#freeSlots.push(slot);
      else this.#start(next, slot);
    }
  }

  #nextWaiting(): Op | undefined {
    if (this.#waitHead >= this.#waiting.length) return undefined;
    const op = this.#waiting[this.#waitHead++]!;
    if (this.#waitHead === this.#waiting.length) {
      this.#waiting = [];
      this.#waitHead = 0;
    } else if (this.#waitHead > 1024) {
      this.#waiting = this.#waiting.slice(this.#waitHead);
      this.#waitHead = 0;
    }
    return op;
  }

  #settle(op: Op, error: BlockError | undefined): void {
    if (op.write) this.#writes.delete(op);
    if (error === undefined) op.resolve();
    else op.reject(error);
  }

  /** A Worker could not start: nothing will run the requests, so every one of them fails. */
  #failStart(): void {
    const error = new BlockError("io", "Unable to use the thread pool: a worker failed to start", {
      path: this.#path,
    });
    const ops = [...this.#slotOp, ...this.#waiting.slice(this.#waitHead)];
    this.#slotOp.fill(undefined);
    this.#waiting = [];
    this.#waitHead = 0;
    this.#inFlight = 0;
    this.#closed = true;
    this.#stopKeepAlive();
    Atomics.store(this.#memory.header, SHUTDOWN, 1);
    Atomics.notify(this.#memory.header, SQ_TAIL);
    for (const op of ops) if (op !== undefined) this.#settle(op, error);
  }

  #fail(op: Op, offset: number, code: number): BlockError {
    return new BlockError("io", `${op.write ? "Write" : "Read"} failed: ${strerror(code)}`, {
      path: this.#path,
      errno: code,
      offset,
    });
  }
}
