/**
 * One request virtqueue of a front-end, as the virtio-blk and virtio-scsi drivers keep it: the
 * slots by ring token, the submitted ones waiting for ring room (in order), and the counters.
 *
 * @module
 */

import type { DriverBuffer } from "../virtio/queue.ts";
import { IN_DEVICE, QUEUED, type QueueSlot } from "./queue_target.ts";
import type { VirtioQueue } from "./virtio_driver.ts";

/** Counters of one request queue: what the report's virtio section shows. */
export interface SlotQueueStats {
  readonly queue: number;
  readonly size: number;
  /** Doorbell writes. */
  readonly kicks: number;
  /** Kicks the device's event index / NO_NOTIFY flag made unnecessary. */
  readonly suppressedKicks: number;
  /** Interrupts taken for this queue. */
  readonly interrupts: number;
  /** Requests the device completed. */
  readonly completions: number;
  /** Requests handed to the ring. */
  readonly submitted: number;
  /** Most requests one kick published. */
  readonly largestBatch: number;
}

/** What {@linkcode SlotQueue} needs of a slot: its token and chain. */
export interface RingSlot extends QueueSlot {
  /** Token in the ring: index in the queue's slot table. */
  readonly token: number;
  /** Guest-physical address of the slot's indirect descriptor table. */
  readonly indirect: number;
  readonly readable: DriverBuffer[];
  readonly writable: DriverBuffer[];
}

/** A request queue of a driver: slots by token, and those waiting for ring room. */
export class SlotQueue<S extends RingSlot> {
  readonly vq: VirtioQueue;
  /** Slots by token; closed targets leave holes. */
  readonly slots: (S | undefined)[] = [];
  /** Submitted slots waiting for ring room, in order; `#pendingHead` is the first live one. */
  readonly #pending: S[] = [];
  #pendingHead = 0;
  /** Chains added to the ring. */
  #submitted = 0;
  readonly #indirect: boolean;

  /** `indirect`: chains go through the slots' indirect tables (VIRTIO_RING_F_INDIRECT_DESC). */
  constructor(vq: VirtioQueue, indirect: boolean) {
    this.vq = vq;
    this.#indirect = indirect;
  }

  /** True while submitted slots wait for ring room. */
  get hasPending(): boolean {
    return this.#pendingHead < this.#pending.length;
  }

  /** Puts a slot's chain in the ring, or behind the pending ones. */
  enqueue(slot: S): void {
    if (this.hasPending || !this.#add(slot)) this.requeue(slot);
  }

  /** Puts a slot behind the pending ones (a retry: never while the used ring is being walked). */
  requeue(slot: S): void {
    slot.state = QUEUED;
    this.#pending.push(slot);
  }

  #add(slot: S): boolean {
    const indirect = this.#indirect ? slot.indirect : undefined;
    if (!this.vq.ring.add(slot.readable, slot.writable, slot.token, indirect)) return false;
    slot.state = IN_DEVICE;
    this.#submitted++;
    return true;
  }

  /** Moves pending slots into the ring while it has room, publishes, notifies. */
  kick(): void {
    while (this.#pendingHead < this.#pending.length) {
      const slot = this.#pending[this.#pendingHead]!;
      if (!this.#add(slot)) break;
      this.#pendingHead++;
    }
    if (this.#pendingHead === this.#pending.length) {
      // Empty again: reuse the array from the start (no garbage in steady state).
      this.#pending.length = 0;
      this.#pendingHead = 0;
    }
    this.vq.kick();
  }

  /** The queue's counters. */
  stats(): SlotQueueStats {
    const vq = this.vq;
    return {
      queue: vq.index,
      size: vq.size,
      kicks: vq.ring.stats.kicks,
      suppressedKicks: vq.ring.stats.suppressedKicks,
      interrupts: vq.interrupts,
      completions: vq.ring.stats.chains,
      submitted: this.#submitted,
      largestBatch: vq.ring.stats.largestBatch,
    };
  }
}
