/**
 * Virtqueue doorbells over a `SharedArrayBuffer`: the driver's "available buffer" notifications as
 * counters the device's iothread sleeps on with `Atomics.wait`.
 *
 * Two modes, as QEMU's `ioeventfd=on|off`:
 * - `"ioeventfd"`: the vCPU side rings the queue's word itself ({@linkcode Doorbells.ring}); no exit.
 * - `"trap"`: the doorbell write exits to the VMM, whose transport decodes it and forwards it
 *   ({@linkcode Doorbells.trap}), counting an exit.
 *
 * Every ring also bumps a per-device summary word, so one iothread sleeps on all its queues at once
 * ({@linkcode Doorbells.waitAny}) and then looks at which queue words moved.
 *
 * @module
 */

/** How the guest's doorbell writes reach the device. */
export type DoorbellMode = "ioeventfd" | "trap";

// Header words.
const H_SUMMARY = 0; // bumped by every ring and wake; the iothread waits on it
const H_NUM_QUEUES = 1;
const H_MODE = 2; // 0 ioeventfd, 1 trap
const H_WAKES = 3; // wake() calls (control-path wake-ups that are not kicks)
const HEADER_WORDS = 4;
// Per-queue words.
const Q_DOORBELL = 0; // kicks so far: the word the driver bumps and the iothread compares
const Q_EXITS = 1; // kicks that exited to the VMM (trap mode)
const QUEUE_WORDS = 2;

/** Largest queue count (QEMU's VIRTIO_QUEUE_MAX). */
const MAX_QUEUES = 1024;

/** Counters of all queues of a device, indexed by queue. */
export interface DoorbellStats {
  /** Kicks per queue. */
  kicks: number[];
  /** Exits per queue (trap mode). */
  exits: number[];
}

/**
 * One device's doorbells.
 *
 * Buffer layout (Int32 words): header 0 summary sequence, 1 numQueues, 2 mode (0 ioeventfd,
 * 1 trap), 3 wake count; then per queue q two words at 4 + 2q: doorbell counter (= kicks, mod 2^32)
 * and exits. Counters are unsigned 32-bit and wrap; compare them only for equality.
 *
 * The iothread's loop, which cannot miss a kick:
 * ```ts ignore
 * let seen = doorbells.summary; // read BEFORE draining
 * for (;;) {
 *   drainAllQueues();
 *   seen = doorbells.waitAny(seen, 1000);
 * }
 * ```
 *
 * @example
 * ```ts
 * import { Doorbells } from "./doorbell.ts";
 * const vmm = new Doorbells(2, "trap");
 * const iothread = Doorbells.attach(vmm.buffer);
 * const seen = iothread.summary;
 * vmm.trap(1); // the VMM decoded a notify write for queue 1
 * if (iothread.waitAny(seen, 0) === seen || iothread.exits(1) !== 1) throw new Error("lost");
 * ```
 */
export class Doorbells {
  /** The shared words; pass it to {@linkcode Doorbells.attach} in another Worker. */
  readonly buffer: SharedArrayBuffer;
  /** Queues of the device. */
  readonly numQueues: number;
  /** How doorbell writes arrive. */
  readonly mode: DoorbellMode;
  readonly #w: Int32Array;

  /** Bytes of buffer for `numQueues` queues. */
  static bytesFor(numQueues: number): number {
    return (HEADER_WORDS + numQueues * QUEUE_WORDS) * 4;
  }

  /**
   * Another thread's view of existing doorbells (count and mode read from the buffer).
   * @throws {RangeError} when the buffer is not a doorbell buffer
   */
  static attach(buffer: SharedArrayBuffer): Doorbells {
    if (buffer.byteLength < HEADER_WORDS * 4) throw new RangeError("Not a doorbell buffer");
    const header = new Int32Array(buffer, 0, HEADER_WORDS);
    const mode = Atomics.load(header, H_MODE) === 1 ? "trap" : "ioeventfd";
    return new Doorbells(Atomics.load(header, H_NUM_QUEUES), mode, buffer);
  }

  /**
   * A view of one device's doorbells, new or shared.
   * @param numQueues queues of the device, 0..1024
   * @param mode how doorbell writes arrive
   * @param buffer an existing buffer of the same shape (see {@linkcode attach}); when absent a zeroed
   *   one is allocated
   * @throws {RangeError} for a bad count or a buffer that does not match
   */
  constructor(numQueues: number, mode: DoorbellMode, buffer?: SharedArrayBuffer) {
    if (!Number.isInteger(numQueues) || numQueues < 0 || numQueues > MAX_QUEUES) {
      throw new RangeError(`Queue count ${numQueues} is not 0..${MAX_QUEUES}`);
    }
    const bytes = Doorbells.bytesFor(numQueues);
    if (buffer !== undefined && buffer.byteLength < bytes) {
      throw new RangeError(`Doorbell buffer needs ${bytes} bytes`);
    }
    this.numQueues = numQueues;
    this.mode = mode;
    this.buffer = buffer ?? new SharedArrayBuffer(bytes);
    this.#w = new Int32Array(this.buffer, 0, bytes / 4);
    const modeWord = mode === "trap" ? 1 : 0;
    if (buffer === undefined) {
      Atomics.store(this.#w, H_NUM_QUEUES, numQueues);
      Atomics.store(this.#w, H_MODE, modeWord);
    } else if (
      Atomics.load(this.#w, H_NUM_QUEUES) !== numQueues ||
      Atomics.load(this.#w, H_MODE) !== modeWord
    ) {
      throw new RangeError("Doorbell buffer has a different shape");
    }
  }

  /**
   * A kick of queue `queue`: bumps its word and the summary, wakes waiters. Any thread.
   * @throws {RangeError} for a queue that does not exist (decode guest values before calling)
   */
  ring(queue: number): void {
    const index = this.#index(queue);
    Atomics.add(this.#w, index + Q_DOORBELL, 1);
    Atomics.add(this.#w, H_SUMMARY, 1);
    Atomics.notify(this.#w, index + Q_DOORBELL);
    Atomics.notify(this.#w, H_SUMMARY);
  }

  /**
   * A kick that exited to the VMM (trap mode): counts the exit, then {@linkcode ring}s.
   * @throws {RangeError} for a queue that does not exist
   */
  trap(queue: number): void {
    const index = this.#index(queue);
    Atomics.add(this.#w, index + Q_EXITS, 1);
    this.ring(queue);
  }

  /** Wakes the iothread's {@linkcode waitAny} without a kick (reset, stop, reconfiguration). */
  wake(): void {
    Atomics.add(this.#w, H_WAKES, 1);
    Atomics.add(this.#w, H_SUMMARY, 1);
    Atomics.notify(this.#w, H_SUMMARY);
  }

  /** Queue `queue`'s doorbell counter now (unsigned). */
  value(queue: number): number {
    return Atomics.load(this.#w, this.#index(queue) + Q_DOORBELL) >>> 0;
  }

  /** The summary counter now (unsigned): moves on every ring and wake. */
  get summary(): number {
    return Atomics.load(this.#w, H_SUMMARY) >>> 0;
  }

  /**
   * Sleeps until queue `queue`'s counter differs from `seen` or `timeoutMs` passes; returns the
   * counter (equal to `seen` on timeout). Only kicks of this queue wake it.
   */
  wait(queue: number, seen: number, timeoutMs: number): number {
    return this.#waitWord(this.#index(queue) + Q_DOORBELL, seen, timeoutMs);
  }

  /**
   * Sleeps until the summary differs from `seen` (any queue rang, or {@linkcode wake}) or
   * `timeoutMs` passes; returns the summary (equal to `seen` on timeout).
   */
  waitAny(seen: number, timeoutMs: number): number {
    return this.#waitWord(H_SUMMARY, seen, timeoutMs);
  }

  /** Kicks of queue `queue` so far (mod 2^32). */
  kicks(queue: number): number {
    return this.value(queue);
  }

  /** Kicks of queue `queue` that exited to the VMM (mod 2^32). */
  exits(queue: number): number {
    return Atomics.load(this.#w, this.#index(queue) + Q_EXITS) >>> 0;
  }

  /** {@linkcode wake} calls so far. */
  get wakes(): number {
    return Atomics.load(this.#w, H_WAKES) >>> 0;
  }

  /** Kicks and exits of every queue. */
  get stats(): DoorbellStats {
    const kicks: number[] = [];
    const exits: number[] = [];
    for (let q = 0; q < this.numQueues; q++) {
      kicks.push(this.kicks(q));
      exits.push(this.exits(q));
    }
    return { kicks, exits };
  }

  #index(queue: number): number {
    if (!Number.isInteger(queue) || queue < 0 || queue >= this.numQueues) {
      throw new RangeError(`Queue ${queue} is not 0..${this.numQueues - 1}`);
    }
    return HEADER_WORDS + queue * QUEUE_WORDS;
  }

  #waitWord(index: number, seen: number, timeoutMs: number): number {
    const expected = seen | 0; // Atomics.wait compares Int32 values
    const deadline = performance.now() + Math.max(0, timeoutMs);
    for (;;) {
      const now = Atomics.load(this.#w, index);
      if (now !== expected) return now >>> 0;
      const left = deadline - performance.now();
      if (!(left > 0)) return now >>> 0;
      Atomics.wait(this.#w, index, expected, left === Infinity ? undefined : left);
    }
  }
}
