/**
 * What a workload drives: a guest block device queue with pre-allocated requests. The virtio-blk
 * front-end (`blk_driver.ts`) implements it over a virtqueue; tests implement it over a byte array.
 *
 * The life of a request, with no allocation on the way:
 * `acquire()` a free one → fill `op`/`offset`/`length` (and `data` for writes) → `submit()` →
 * `commit()` (publishes, and notifies the device if it asked) → `reap()` returns it completed, with
 * `status` set (and `data` filled for reads) → `release()` it.
 * When nothing can be reaped, `wait()` until something may have completed.
 *
 * @module
 */

/** Operations a target accepts. */
export type IoOp = "read" | "write" | "flush" | "discard" | "write-zeroes" | "get-id";

/**
 * A request's outcome: `ok`, `ioerr` (the device failed it, or answered nonsense), `unsupp` (the
 * device or the negotiated features do not support it), or `pending` while in flight.
 */
export type IoStatus = "pending" | "ok" | "ioerr" | "unsupp";

/** One pre-allocated request of a target. */
export interface IoRequest {
  /** Index among the target's requests, 0..depth-1: stable, usable to index per-request state. */
  readonly index: number;
  /** What the request does. */
  op: IoOp;
  /** Byte offset on the device (a multiple of 512). */
  offset: number;
  /** Bytes (a multiple of 512; 0 for flush). */
  length: number;
  /** The request's buffer, `maxTransfer` bytes; `data.subarray(0, length)` is transferred. */
  readonly data: Uint8Array;
  /** Outcome, set on completion. */
  status: IoStatus;
  /** Bytes the device said it wrote into the request (virtio used.len). */
  written: number;
  /** Why, for a failure the guest diagnosed itself (empty otherwise). */
  detail: string;
  /** The workload's: e.g. the submit timestamp. */
  startedAt: number;
  /** The workload's: anything. */
  tag: number;
}

/** A queue of a guest block device, as a workload sees it. */
export interface BlockTarget {
  /** Device size in bytes. */
  readonly capacity: number;
  /** Logical block size: offsets and lengths of reads and writes should be multiples of it. */
  readonly blockSize: number;
  /** Writes, discards and write-zeroes fail with `ioerr`. */
  readonly readOnly: boolean;
  /** Requests this target owns (the most in flight at once). */
  readonly depth: number;
  /** Largest read or write, bytes. */
  readonly maxTransfer: number;
  /** Largest discard in bytes; 0 when discard is not supported. */
  readonly maxDiscard: number;
  /** Largest write-zeroes in bytes; 0 when not supported. */
  readonly maxWriteZeroes: number;
  /** Requests submitted and not yet reaped. */
  readonly inFlight: number;
  /** A free request, or null when all `depth` are in use. */
  acquire(): IoRequest | null;
  /** Queues a filled request (not yet visible to the device before {@linkcode commit}). */
  submit(request: IoRequest): void;
  /** Makes submitted requests visible and notifies the device if it wants to be. */
  commit(): void;
  /** A completed request, or null. Takes interrupts that arrived meanwhile first. */
  reap(): IoRequest | null;
  /** Gives a reaped request back. */
  release(request: IoRequest): void;
  /**
   * Waits until a completion may be available (the guest halts, or in a single-thread test the
   * device runs). May return with nothing completed; callers loop.
   *
   * @throws when the device is broken or requests stopped completing (a timeout)
   */
  wait(): void | Promise<void>;
}

/**
 * Runs one request to completion: acquire, fill, submit, commit, wait, reap, release. For control
 * operations and tests on a target with nothing else in flight; workloads keep many in flight.
 *
 * @param prepare fills the request (op, offset, length, data) before submission
 * @param inspect sees the completed request before it is released (e.g. copies read data out)
 * @returns the request's final status
 * @throws {Error} when the target has no free request
 */
export async function runOne(
  target: BlockTarget,
  prepare: (request: IoRequest) => void,
  inspect?: (request: IoRequest) => void,
): Promise<IoStatus> {
  const request = target.acquire();
  if (request === null) throw new Error("No free request on the target");
  prepare(request);
  target.submit(request);
  target.commit();
  for (;;) {
    const done = target.reap();
    if (done !== null) {
      if (done !== request) throw new Error("runOne reaped a request it did not submit");
      const status = done.status;
      inspect?.(done);
      target.release(done);
      return status;
    }
    const waiting = target.wait();
    if (waiting !== undefined) await waiting;
  }
}
