/**
 * The words a running guest and whoever started it share: a stop request (Ctrl-C in `vstor run`)
 * and the guest's progress (requests and bytes completed so far), in one `SharedArrayBuffer` that
 * travels in the guest request.
 *
 * Layout: Int32 word 0 is the stop flag (0 run, 1 stop); Float64 words 1 and 2 (bytes 8–23) are
 * the completed requests and bytes, written by the guest only.
 *
 * @module
 */

const BYTES = 24;

/**
 * A stop flag and progress counters shared between a guest and its host.
 *
 * @example
 * ```ts
 * import { RunControl } from "./run_control.ts";
 * const control = new RunControl();
 * const guestSide = new RunControl(control.buffer); // the same words, e.g. in a Worker
 * guestSide.publish(10, 40960);
 * control.stop();
 * if (!guestSide.stopped || control.progress().ops !== 10) throw new Error("not shared");
 * ```
 */
export class RunControl {
  /** The shared words (pass this to the guest). */
  readonly buffer: SharedArrayBuffer;
  readonly #flag: Int32Array;
  readonly #counts: Float64Array;

  /**
   * Wraps the words of another control's `buffer`, or makes fresh ones.
   *
   * @param buffer an existing control's buffer, or none for a new one
   */
  constructor(buffer?: SharedArrayBuffer) {
    if (buffer !== undefined && buffer.byteLength < BYTES) {
      throw new RangeError(`A run control needs ${BYTES} bytes, got ${buffer.byteLength}`);
    }
    this.buffer = buffer ?? new SharedArrayBuffer(BYTES);
    this.#flag = new Int32Array(this.buffer, 0, 1);
    this.#counts = new Float64Array(this.buffer, 8, 2);
  }

  /** Ask the guest to stop: jobs finish what is in flight and report what they did. */
  stop(): void {
    Atomics.store(this.#flag, 0, 1);
  }

  /** Whether a stop was asked for. */
  get stopped(): boolean {
    return Atomics.load(this.#flag, 0) !== 0;
  }

  /** The guest's side: requests and bytes completed so far. */
  publish(ops: number, bytes: number): void {
    this.#counts[0] = ops;
    this.#counts[1] = bytes;
  }

  /** What the guest last published. */
  progress(): { ops: number; bytes: number } {
    return { ops: this.#counts[0]!, bytes: this.#counts[1]! };
  }
}
