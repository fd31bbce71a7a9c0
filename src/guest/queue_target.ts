/**
 * What the virtio-blk and virtio-scsi targets share: request slots in guest RAM handed out from a
 * free stack, completions kept in a ring until reaped, and a `wait()` that idles the vCPU and turns
 * a device that stops answering into a {@linkcode VirtioDriverError}. The drivers say how a request
 * becomes a chain ({@linkcode QueueTarget._prepare}) and how slot memory is freed.
 *
 * @module
 */

import type { IoOp, IoRequest, IoStatus } from "./block_target.ts";
import { type GuestPlatform, VirtioDriverError, type VirtioPciDriver } from "./virtio_driver.ts";

// Slot states.
export const FREE = 0;
export const ACQUIRED = 1;
export const QUEUED = 2; // submitted, waiting for ring room
export const IN_DEVICE = 3;
export const COMPLETED = 4;

/** A request object of a target; the slot behind it lives in guest RAM. */
export class SlotRequest implements IoRequest {
  readonly index: number;
  op: IoOp = "read";
  offset = 0;
  length = 0;
  readonly data: Uint8Array;
  status: IoStatus = "ok";
  written = 0;
  detail = "";
  startedAt = 0;
  tag = 0;
  constructor(index: number, data: Uint8Array) {
    this.index = index;
    this.data = data;
  }
}

/** What {@linkcode QueueTarget} needs of a slot. */
export interface QueueSlot {
  readonly request: SlotRequest;
  state: number;
}

/** What {@linkcode QueueTarget} needs of its driver. */
export interface QueueDriver<S extends QueueSlot> {
  readonly virtio: VirtioPciDriver;
  readonly _platform: GuestPlatform;
  /** Completions so far (all queues): progress, for the request timeout. */
  readonly _completions: number;
  readonly _timeoutMs: number;
  /** Puts a slot's chain in the ring, or behind the pending ones. */
  _enqueue(slot: S): void;
  /** Publishes what was added to queue `queue` and notifies the device if it asked. */
  _kick(queue: number): void;
}

/** Options of {@linkcode QueueTarget}'s constructor. */
export interface QueueTargetOptions {
  queue: number;
  depth: number;
  maxTransfer: number;
  /** What the timeout message calls the requests: "requests", "commands". */
  unit: string;
}

/** Completes a request without the device: sets its detail and returns `status`. */
export function localStatus(r: IoRequest, status: IoStatus, detail: string): IoStatus {
  r.detail = detail;
  return status;
}

/**
 * The slot bookkeeping of a target on one queue: `depth` slots, of which the subclass gives the
 * guest-memory side once allocated ({@linkcode QueueTarget._useSlots}).
 */
export abstract class QueueTarget<S extends QueueSlot, D extends QueueDriver<S>> {
  readonly driver: D;
  /** Queue index (virtio-scsi: the request queue number, virtqueue 2 + queue). */
  readonly queue: number;
  readonly depth: number;
  readonly maxTransfer: number;
  readonly #unit: string;
  #slots: readonly S[] = [];
  /** Free slot indexes, a stack. */
  readonly #free: Int32Array;
  #freeCount: number;
  /** Completed requests, a ring of `depth`. */
  readonly #done: (SlotRequest | undefined)[];
  #doneHead = 0;
  #doneCount = 0;
  #inFlight = 0;
  #closed = false;
  #dirty = false;
  #seenCompletions = -1;
  #progressAt = 0;

  constructor(driver: D, options: QueueTargetOptions) {
    const { queue, depth, maxTransfer, unit } = options;
    this.driver = driver;
    this.queue = queue;
    this.depth = depth;
    this.maxTransfer = maxTransfer;
    this.#unit = unit;
    this.#free = new Int32Array(depth);
    for (let i = 0; i < depth; i++) this.#free[i] = depth - 1 - i;
    this.#freeCount = depth;
    this.#done = new Array<SlotRequest | undefined>(depth).fill(undefined);
  }

  /** @internal The target's slots, `depth` of them, by request index; once, from the constructor. */
  protected _useSlots(slots: readonly S[]): void {
    this.#slots = slots;
  }

  /**
   * Writes the request into its slot's guest memory and descriptor lists.
   *
   * @returns a status when the guest answers the request itself, null to send it to the device
   * @throws {RangeError} for a request the target cannot take (before any state changes)
   */
  protected abstract _prepare(slot: S): IoStatus | null;

  /** Frees the slots' guest memory and forgets them; the target is closed. */
  protected abstract _releaseSlots(slots: readonly S[]): void;

  /** Work to run instead of idling in `wait()`, or undefined. */
  protected _pendingWork(): Promise<void> | undefined {
    return undefined;
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  acquire(): IoRequest | null {
    if (this.#freeCount === 0 || this.#closed) return null;
    const slot = this.#slots[this.#free[--this.#freeCount]!]!;
    slot.state = ACQUIRED;
    return slot.request;
  }

  /**
   * Builds the request's chain and adds it to the ring (or queues it until the ring has room).
   * Requests the guest answers itself complete at once (see the target's class).
   *
   * @throws {RangeError} for a request not acquired from this target, or one the target cannot
   *   take (an offset or length that is not a multiple of the block size, a length past the
   *   target's maximum)
   */
  submit(request: IoRequest): void {
    const slot = this.#slots[request.index];
    if (slot === undefined || slot.request !== request || slot.state !== ACQUIRED) {
      throw new RangeError(`Request ${request.index} was not acquired from this target`);
    }
    request.written = 0;
    request.detail = "";
    // Validation may throw: before any state changes.
    const local = this._prepare(slot);
    request.status = "pending";
    this.#inFlight++;
    if (local !== null) {
      request.status = local;
      slot.state = COMPLETED;
      this._completed(slot.request);
      return;
    }
    this.#dirty = true;
    this.driver._enqueue(slot);
  }

  commit(): void {
    if (!this.#dirty) return;
    this.#dirty = false;
    this.driver._kick(this.queue);
  }

  /** @internal A request of this target completed. */
  _completed(request: SlotRequest): void {
    const at = (this.#doneHead + this.#doneCount) % this.depth;
    this.#done[at] = request;
    this.#doneCount++;
  }

  reap(): IoRequest | null {
    if (this.#doneCount === 0) {
      // Interrupts that arrived while we were busy: what the CPU would have taken already.
      this.driver._platform.interrupts.dispatchPending();
      if (this.#doneCount === 0) return null;
    }
    const request = this.#done[this.#doneHead]!;
    this.#done[this.#doneHead] = undefined;
    this.#doneHead = (this.#doneHead + 1) % this.depth;
    this.#doneCount--;
    this.#inFlight--;
    return request;
  }

  release(request: IoRequest): void {
    const slot = this.#slots[request.index];
    if (slot === undefined || slot.request !== request || slot.state !== COMPLETED) {
      throw new RangeError(`Request ${request.index} is not a reaped request of this target`);
    }
    slot.state = FREE;
    this.#free[this.#freeCount++] = request.index;
  }

  /**
   * Waits for a completion: runs the target's pending work if it has any, else idles.
   *
   * @throws {VirtioDriverError} when the device needs a reset, or nothing completed for the
   *   driver's request timeout
   */
  wait(): void | Promise<void> {
    if (this.#doneCount > 0) return;
    this.#checkBroken();
    const work = this._pendingWork();
    if (work !== undefined) return work;
    if (this.#inFlight === 0) return;
    const idle = this.driver._platform.idle();
    if (idle instanceof Promise) return idle.then(() => this.#afterIdle());
    this.#afterIdle();
  }

  #afterIdle(): void {
    const driver = this.driver;
    driver._platform.interrupts.dispatchPending();
    this.#checkBroken();
    const completions = driver._completions;
    const now = performance.now();
    if (completions !== this.#seenCompletions || this.#doneCount > 0) {
      this.#seenCompletions = completions;
      this.#progressAt = now;
      return;
    }
    if (now - this.#progressAt < driver._timeoutMs) return;
    // No progress for the whole timeout: a missed config interrupt, or a device that stopped.
    const why = driver.virtio.checkStatus();
    if (why !== null) throw new VirtioDriverError("needs-reset", driver.virtio.slot, why);
    throw new VirtioDriverError(
      "request-timeout",
      driver.virtio.slot,
      `queue ${this.queue}: ${this.#inFlight} ${this.#unit} without a completion for ${driver._timeoutMs} ms`,
    );
  }

  #checkBroken(): void {
    const why = this.driver.virtio.broken;
    if (why !== null) throw new VirtioDriverError("needs-reset", this.driver.virtio.slot, why);
  }

  /**
   * Releases the target's slots and guest memory.
   *
   * @throws {RangeError} while requests are in flight
   */
  close(): void {
    if (this.#closed) return;
    if (this.#inFlight !== 0) {
      throw new RangeError(`Cannot close a target with ${this.#inFlight} requests in flight`);
    }
    this.#closed = true;
    this._releaseSlots(this.#slots);
  }
}
