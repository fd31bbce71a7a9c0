/**
 * What split and packed virtqueues have in common: the device-side and driver-side interfaces,
 * the descriptor chain a device pops, the error a hostile driver earns, and the counters.
 *
 * Guest memory is always passed in, never owned by a queue.
 *
 * @module
 */

import { GuestMemoryError } from "./memory.ts";

/**
 * Why a queue stopped: the driver broke the ring rules. Each reason has a named test.
 * The device answers with DEVICE_NEEDS_RESET and a config interrupt, never by throwing into the VMM.
 */
export type VirtqueueFault =
  | "avail-idx-jump" // avail.idx moved more than N past the last seen index
  | "head-out-of-range" // an avail ring entry (or packed id) ≥ N
  | "next-out-of-range" // a descriptor's next ≥ table size
  | "chain-too-long" // more descriptors than the table holds: also catches loops
  | "indirect-bad-length" // indirect table length 0 or not a multiple of 16
  | "indirect-nested" // an indirect descriptor inside an indirect table
  | "indirect-with-next" // NEXT and INDIRECT on the same descriptor
  | "indirect-not-negotiated" // INDIRECT flag without VIRTIO_RING_F_INDIRECT_DESC
  | "readable-after-writable" // a device-readable descriptor after a device-writable one
  | "zero-length" // a buffer of length 0
  | "outside-ram" // a buffer or ring outside guest RAM or across a region boundary
  | "too-many-in-flight" // more chains popped and not yet returned than N
  | "bad-ring-layout" // ring areas misaligned, outside RAM or overlapping
  | "bad-request"; // a device's request framing broken (virtio-blk: no 16-byte header, no status byte)

/** A driver broke the virtqueue rules; the device must stop the queue and ask for a reset. */
export class VirtqueueError extends Error {
  /** Always `VirtqueueError`. */
  override readonly name = "VirtqueueError";
  /** Which rule the driver broke. */
  readonly fault: VirtqueueFault;
  /** The queue index (-1 when not tied to one queue). */
  readonly queue: number;

  /**
   * Makes the error for `fault` on `queue`.
   *
   * @param fault which rule the driver broke
   * @param queue the queue index
   * @param detail what was found, for the message
   */
  constructor(fault: VirtqueueFault, queue: number, detail: string) {
    super(`Virtqueue ${queue}: ${detail} (${fault})`);
    this.fault = fault;
    this.queue = queue;
  }
}

/**
 * The ring fault `error` stands for, or `null` when it is not one: a {@linkcode VirtqueueError}
 * as it is, and a {@linkcode GuestMemoryError} (a ring or buffer the driver placed outside guest
 * RAM) as `outside-ram` on `queue`. Whoever serves queues turns both into DEVICE_NEEDS_RESET the
 * same way; anything else is the device's own failure.
 *
 * @param error what a queue method or a back-end threw
 * @param queue the queue being served, for a `GuestMemoryError` (-1 when not tied to one)
 * @returns the fault to report and answer with DEVICE_NEEDS_RESET, or `null`
 *
 * @example
 * ```ts
 * import { GuestMemoryError } from "./memory.ts";
 * import { ringFault } from "./queue.ts";
 * const fault = ringFault(new GuestMemoryError(1 << 40, 16, "is outside guest RAM"), 2);
 * if (fault?.fault !== "outside-ram" || fault.queue !== 2) throw new Error("classified");
 * if (ringFault(new RangeError("a device bug"), 2) !== null) throw new Error("not a ring fault");
 * ```
 */
export function ringFault(error: unknown, queue: number): VirtqueueError | null {
  if (error instanceof VirtqueueError) return error;
  if (error instanceof GuestMemoryError) {
    return new VirtqueueError("outside-ram", queue, error.message);
  }
  return null;
}

/**
 * One request as the device sees it: the driver's buffers as zero-copy views of guest memory,
 * readable ones first, then writable ones.
 */
export interface DescriptorChain {
  /** The id the device returns in the used ring (split: head index; packed: buffer id). */
  readonly id: number;
  /** Ring slots the chain took (packed rings skip ahead by this many; split: descriptors walked). */
  readonly slots: number;
  /** The device-readable buffers, as views of guest memory. */
  readonly readable: Uint8Array[];
  /** The device-writable buffers, as views of guest memory. */
  readonly writable: Uint8Array[];
  /** Bytes in all readable buffers. */
  readonly readableLength: number;
  /** Bytes in all writable buffers. */
  readonly writableLength: number;
}

/** Where the driver put a queue's three areas, and how big the queue is. */
export interface QueueLayout {
  /** Queue size N: a power of 2 from 1 to 32768 (split), any 1..32768 (packed). */
  readonly size: number;
  /** Descriptor table (split) or descriptor ring (packed). */
  readonly desc: number;
  /** Avail ring (split) or driver event suppression structure (packed). */
  readonly driver: number;
  /** Used ring (split) or device event suppression structure (packed). */
  readonly device: number;
}

/** Negotiated features that change ring behaviour. */
export interface QueueFeatures {
  /** VIRTIO_RING_F_INDIRECT_DESC was negotiated: chains may use indirect tables. */
  readonly indirect: boolean;
  /** VIRTIO_RING_F_EVENT_IDX was negotiated: notifications use the event indexes. */
  readonly eventIdx: boolean;
}

/** Per-queue counters: what the simulated guests report. */
export interface QueueStats {
  /** Notifications the driver sent (doorbell writes). */
  kicks: number;
  /** Kicks the driver skipped because the device asked not to be notified. */
  suppressedKicks: number;
  /** Interrupts the device raised for this queue. */
  interrupts: number;
  /** Interrupts the device skipped because the driver asked not to be interrupted. */
  suppressedInterrupts: number;
  /** Doorbell writes that exited to the VMM (trap mode). */
  exits: number;
  /** Chains popped and completed. */
  chains: number;
  /** Most chains popped in one drain. */
  largestBatch: number;
}

/** Fresh zeroed counters. */
export function newQueueStats(): QueueStats {
  return {
    kicks: 0,
    suppressedKicks: 0,
    interrupts: 0,
    suppressedInterrupts: 0,
    exits: 0,
    chains: 0,
    largestBatch: 0,
  };
}

/**
 * The device side of a virtqueue.
 *
 * Drain loop (QEMU's): `do { disableNotifications(); while ((c = pop())) …; } while (enableNotifications())`;
 * completions are staged with {@linkcode push} and made visible with {@linkcode publish}, which says
 * whether to interrupt. Any method that reads the ring may throw {@linkcode VirtqueueError}; after
 * that the queue is broken until {@linkcode reset}.
 */
export interface DeviceQueue {
  /** The queue's index in its device. */
  readonly index: number;
  /** Where the rings are in guest memory. */
  readonly layout: QueueLayout;
  /** Device-side counters: chains, interrupts raised and suppressed, batches. */
  readonly stats: QueueStats;
  /** Chains popped and not yet pushed. */
  readonly inFlight: number;
  /** True after a fault, until reset. */
  readonly broken: boolean;
  /** The next available chain, or `null` when the ring is empty. */
  pop(): DescriptorChain | null;
  /** Stages the completion of `chain` with `written` bytes put in its writable part. */
  push(chain: DescriptorChain, written: number): void;
  /**
   * Makes staged completions visible to the driver (element stores, then the index) and answers
   * whether the driver wants an interrupt now (NO_INTERRUPT / used_event / packed event rules).
   * Counts interrupts and suppressed interrupts accordingly.
   */
  publish(): boolean;
  /** Asks the driver not to kick (NO_NOTIFY or the event structure). */
  disableNotifications(): void;
  /**
   * Asks the driver to kick again (with EVENT_IDX: avail_event = the next index), then re-checks:
   * true when more chains arrived meanwhile and the caller must drain again.
   *
   * @throws {VirtqueueError} when the re-check finds the ring broken (split: avail.idx more than N
   *   ahead): a caller that polls must catch it as it catches `pop`'s
   */
  enableNotifications(): boolean;
  /**
   * True when the driver has made a chain available that {@linkcode pop} has not taken: a cheap
   * look at the ring, for a device that polls before it sleeps. A ring that breaks the rules answers
   * true, so the next pop reports the fault; a queue already broken answers false.
   */
  hasAvailable(): boolean;
  /** Forgets all state (after a device or queue reset). */
  reset(): void;
}

/** A buffer the driver offers: `length` bytes at guest-physical `addr`. */
export interface DriverBuffer {
  /** Guest-physical address of the buffer. */
  addr: number;
  /** Bytes in the buffer (≥ 1). */
  length: number;
}

/** A completion the driver reaps: the token given to `add`, and the bytes the device wrote. */
export interface UsedElement<T> {
  /** What the driver passed to `add` with the chain. */
  token: T;
  /** Bytes the device wrote into the chain's writable buffers. */
  written: number;
}

/**
 * The driver side of a virtqueue, for simulated guests and for tests.
 *
 * `add` writes descriptors and makes them available but does not notify; `kick` publishes and answers
 * whether the device asked to be notified (the caller then writes the doorbell).
 */
export interface DriverQueue<T> {
  /** Where the rings are in guest memory. */
  readonly layout: QueueLayout;
  /** Driver-side counters: kicks sent and suppressed, completions reaped. */
  readonly stats: QueueStats;
  /** Free descriptor slots. */
  readonly free: number;
  /**
   * Offers a chain: `readable` buffers then `writable` ones. Uses an indirect table at
   * `indirectTable` (guest address with room for 16 bytes per buffer) when given and negotiated.
   * Returns false when the ring has no room.
   */
  add(
    readable: readonly DriverBuffer[],
    writable: readonly DriverBuffer[],
    token: T,
    indirectTable?: number,
  ): boolean;
  /** Publishes added chains; true when the device wants a notification. Counts suppressed kicks. */
  kick(): boolean;
  /** The next completion, or `null`. */
  getUsed(): UsedElement<T> | null;
  /** Asks the device not to interrupt. */
  disableInterrupts(): void;
  /** Asks for interrupts again; true when completions arrived meanwhile (poll again). */
  enableInterrupts(): boolean;
}
