/**
 * What the VMM and a device's iothread Worker say to each other, and the shared words they both
 * read: the control sequence word and the device's counters.
 *
 * Control messages travel by `postMessage` (they carry structures), but their order relative to
 * the guest's kicks matters: a kick right after DRIVER_OK must find the queues built. So the VMM
 * numbers every control message, stores the number in the control word after posting it and wakes
 * the iothread's doorbells; the iothread, before touching any queue, handles every message up to the
 * number it sees there. A doorbell write can therefore never overtake the activation it follows.
 *
 * @module
 */

import type { GuestRegion } from "../virtio/memory.ts";
import type { QueueLayout } from "../virtio/queue.ts";
import type { DeviceInfo, DeviceSpec } from "./device_type.ts";

/** First message: open the drives and build the back-end, then answer `ready` or `failed`. */
export interface IothreadInit {
  readonly kind: "init";
  readonly spec: DeviceSpec;
  /** Absolute URL of the module exporting `createBackend`. */
  readonly backendModule: string;
  readonly ram: { readonly regions: readonly GuestRegion[]; readonly buffer: SharedArrayBuffer };
}

/** Second message: the shared state of the PCI function; the iothread starts serving kicks. */
export interface IothreadAttach {
  readonly kind: "attach";
  /** `VcpuInterrupts.buffer`. */
  readonly vcpu: SharedArrayBuffer;
  /** `InterruptState.buffer` of the function. */
  readonly interrupts: SharedArrayBuffer;
  /** `Doorbells.buffer` of the function. */
  readonly doorbells: SharedArrayBuffer;
  /** {@linkcode ControlWord.buffer}. */
  readonly control: SharedArrayBuffer;
  /** {@linkcode DeviceCounters.buffer}. */
  readonly counters: SharedArrayBuffer;
}

/** An enabled queue as handed to the iothread at DRIVER_OK. */
export interface ActivateQueue {
  readonly index: number;
  readonly layout: QueueLayout;
}

/** Numbered control messages; each is answered with `ack`. */
export type ControlMessage =
  | {
    readonly kind: "activate";
    readonly seq: number;
    readonly features: bigint;
    readonly queues: readonly ActivateQueue[];
    readonly epoch: number;
  }
  | { readonly kind: "reset"; readonly seq: number }
  | { readonly kind: "pause"; readonly seq: number }
  | { readonly kind: "resume"; readonly seq: number }
  /** Acknowledged once the drain in progress is over and every counter is published. */
  | { readonly kind: "sync"; readonly seq: number }
  | { readonly kind: "shutdown"; readonly seq: number };

/** Everything the VMM posts. */
export type IothreadRequest = IothreadInit | IothreadAttach | ControlMessage;

/** Everything the iothread posts. */
export type IothreadReply =
  | { readonly kind: "ready"; readonly info: DeviceInfo }
  | { readonly kind: "attached" }
  /** Control message `seq` is done; `error` when it failed (the device is then NEEDS_RESET). */
  | { readonly kind: "ack"; readonly seq: number; readonly error?: string }
  /** The driver broke the ring rules (or the back-end failed a drain): NEEDS_RESET was signalled. */
  | {
    readonly kind: "fault";
    readonly queue: number;
    readonly fault: string;
    readonly message: string;
  }
  /** The device stopped on a failed request and holds it (`werror`/`rerror` `stop`). */
  | { readonly kind: "stopped"; readonly reason: string }
  /** The iothread cannot go on (startup failure, a bug); the VMM terminates it. */
  | { readonly kind: "failed"; readonly message: string; readonly stack?: string };

/**
 * The control sequence word: the number of the last control message the VMM posted.
 *
 * @example
 * ```ts
 * import { ControlWord } from "./iothread_protocol.ts";
 * const vmm = new ControlWord();
 * vmm.announce(3);
 * if (new ControlWord(vmm.buffer).posted !== 3) throw new Error("not shared");
 * ```
 */
export class ControlWord {
  /** The shared word. */
  readonly buffer: SharedArrayBuffer;
  readonly #w: Int32Array;

  /** @param buffer another thread's word; a new one when absent */
  constructor(buffer?: SharedArrayBuffer) {
    this.buffer = buffer ?? new SharedArrayBuffer(4);
    this.#w = new Int32Array(this.buffer, 0, 1);
  }

  /** VMM side: message `seq` has been posted. */
  announce(seq: number): void {
    Atomics.store(this.#w, 0, seq);
  }

  /** The last message number posted. */
  get posted(): number {
    return Atomics.load(this.#w, 0);
  }
}

// Device header words.
const D_WAKEUPS = 0; // iothread wake-ups with something to do
const D_DRAINS = 1; // processQueue calls
const D_FAULTS = 2; // NEEDS_RESET signalled by the iothread
const D_ACTIVATIONS = 3;
const D_RESETS = 4;
const D_HEADER = 8;
// Per-queue words.
const Q_CHAINS = 0;
const Q_INTERRUPTS = 1;
const Q_SUPPRESSED = 2;
const Q_LARGEST_BATCH = 3;
const Q_DRAINS = 4;
const Q_WORDS = 8;

/** Device-side counters of one queue, cumulative across resets. */
export interface DeviceQueueCounters {
  /** Chains completed. */
  chains: number;
  /** Interrupts the queue asked for (the used-buffer notifications raised). */
  interrupts: number;
  /** Interrupts suppressed by the driver's NO_INTERRUPT / used_event. */
  suppressedInterrupts: number;
  /** Most chains popped in one drain. */
  largestBatch: number;
  /** Drains (processQueue calls). */
  drains: number;
}

/** Device-wide iothread counters. */
export interface DeviceThreadCounters {
  /** Wake-ups of the iothread with work (kicks, control messages). */
  wakeups: number;
  /** processQueue calls. */
  drains: number;
  /** DEVICE_NEEDS_RESET signalled by the iothread (broken rings, failed drains). */
  faults: number;
  /** Activations (DRIVER_OK) the iothread carried out. */
  activations: number;
  /** Device resets the iothread carried out. */
  resets: number;
}

/**
 * A device's counters in a `SharedArrayBuffer`: the iothread writes, the VMM reads.
 *
 * Layout (Int32 words, unsigned, wrapping): header 0 wake-ups, 1 drains, 2 faults, 3 activations,
 * 4 resets, 5–7 reserved; then 8 words per queue: chains, interrupts, suppressed interrupts,
 * largest batch, drains, 3 reserved.
 */
export class DeviceCounters {
  /** The shared words. */
  readonly buffer: SharedArrayBuffer;
  readonly numQueues: number;
  readonly #w: Int32Array;

  /**
   * @param numQueues queues of the device
   * @param buffer another thread's counters of the same shape; new zeroed ones when absent
   * @throws {RangeError} when `buffer` is too small
   */
  constructor(numQueues: number, buffer?: SharedArrayBuffer) {
    const words = D_HEADER + numQueues * Q_WORDS;
    if (buffer !== undefined && buffer.byteLength < words * 4) {
      throw new RangeError(`Device counter buffer needs ${words * 4} bytes`);
    }
    this.numQueues = numQueues;
    this.buffer = buffer ?? new SharedArrayBuffer(words * 4);
    this.#w = new Int32Array(this.buffer, 0, words);
  }

  /** Iothread side: one more of `what`. */
  bump(what: "wakeups" | "drains" | "faults" | "activations" | "resets"): void {
    const index = what === "wakeups"
      ? D_WAKEUPS
      : what === "drains"
      ? D_DRAINS
      : what === "faults"
      ? D_FAULTS
      : what === "activations"
      ? D_ACTIVATIONS
      : D_RESETS;
    Atomics.add(this.#w, index, 1);
  }

  /** Iothread side: publishes queue `queue`'s cumulative counters. */
  setQueue(queue: number, c: Readonly<DeviceQueueCounters>): void {
    if (!Number.isInteger(queue) || queue < 0 || queue >= this.numQueues) return;
    const at = D_HEADER + queue * Q_WORDS;
    const w = this.#w;
    Atomics.store(w, at + Q_CHAINS, c.chains | 0);
    Atomics.store(w, at + Q_INTERRUPTS, c.interrupts | 0);
    Atomics.store(w, at + Q_SUPPRESSED, c.suppressedInterrupts | 0);
    Atomics.store(w, at + Q_LARGEST_BATCH, c.largestBatch | 0);
    Atomics.store(w, at + Q_DRAINS, c.drains | 0);
  }

  /** Queue `queue`'s counters (zeroes for a queue that does not exist). */
  queue(queue: number): DeviceQueueCounters {
    if (!Number.isInteger(queue) || queue < 0 || queue >= this.numQueues) {
      return { chains: 0, interrupts: 0, suppressedInterrupts: 0, largestBatch: 0, drains: 0 };
    }
    const at = D_HEADER + queue * Q_WORDS;
    const w = this.#w;
    return {
      chains: Atomics.load(w, at + Q_CHAINS) >>> 0,
      interrupts: Atomics.load(w, at + Q_INTERRUPTS) >>> 0,
      suppressedInterrupts: Atomics.load(w, at + Q_SUPPRESSED) >>> 0,
      largestBatch: Atomics.load(w, at + Q_LARGEST_BATCH) >>> 0,
      drains: Atomics.load(w, at + Q_DRAINS) >>> 0,
    };
  }

  /** Device-wide counters. */
  get thread(): DeviceThreadCounters {
    const w = this.#w;
    return {
      wakeups: Atomics.load(w, D_WAKEUPS) >>> 0,
      drains: Atomics.load(w, D_DRAINS) >>> 0,
      faults: Atomics.load(w, D_FAULTS) >>> 0,
      activations: Atomics.load(w, D_ACTIVATIONS) >>> 0,
      resets: Atomics.load(w, D_RESETS) >>> 0,
    };
  }
}
