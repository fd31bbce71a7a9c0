/**
 * The split virtqueue (virtio 1.2 §2.7): the device side a back-end pops chains from and pushes
 * completions to. The driver side a simulated guest adds buffers to and reaps completions from is
 * `split_driver.ts`, the ring layout both share `split_ring.ts`; this module exports all three.
 *
 * The device side treats every number it reads from guest memory as hostile: a driver that breaks
 * the ring rules earns a {@linkcode VirtqueueError} naming the fault, the queue stops (it reads and
 * writes nothing more) and stays stopped until {@linkcode SplitDeviceQueue.reset}.
 *
 * @module
 */

import { GuestMemoryError } from "./memory.ts";
import type { GuestMemory } from "./memory.ts";
import {
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_MAX_SIZE,
  VIRTQ_USED_F_NO_NOTIFY,
  vringNeedEvent,
} from "./features.ts";
import { newQueueStats, VirtqueueError } from "./queue.ts";
import type {
  DescriptorChain,
  DeviceQueue,
  QueueFeatures,
  QueueLayout,
  QueueStats,
  VirtqueueFault,
} from "./queue.ts";
import {
  availBytes,
  DESC_SIZE,
  descBytes,
  maxChainBuffers,
  splitLayoutProblem,
  USED_ELEM_SIZE,
  usedBytes,
} from "./split_ring.ts";

export { splitRingLayout } from "./split_ring.ts";
export { SplitDriverQueue } from "./split_driver.ts";

/** Largest indirect table the device walks, in entries: `next` is 16-bit, and a bound keeps work finite. */
const MAX_INDIRECT_ENTRIES = VIRTQ_MAX_SIZE;

/** A chain popped from a split ring. `slots` counts descriptor-table entries the chain occupies. */
/**
 * Where a device records which chains are in flight, so that another process can resubmit them
 * after a crash (vhost-user's INFLIGHT_SHMFD): told of each head popped, each head pushed, and
 * each used.idx published.
 */
export interface InflightLog {
  /** Chain `head` was popped (it is in flight now). */
  popped(head: number): void;
  /** Chain `head`'s used element was written (staged). */
  pushed(head: number): void;
  /** used.idx is `usedIdx` now: the chains pushed since the last publish are done. */
  published(usedIdx: number): void;
}

class SplitChain implements DescriptorChain {
  readonly id: number;
  readonly slots: number;
  readonly readable: Uint8Array[];
  readonly writable: Uint8Array[];
  readonly readableLength: number;
  readonly writableLength: number;

  constructor(
    id: number,
    slots: number,
    readable: Uint8Array[],
    writable: Uint8Array[],
    readableLength: number,
    writableLength: number,
  ) {
    this.id = id;
    this.slots = slots;
    this.readable = readable;
    this.writable = writable;
    this.readableLength = readableLength;
    this.writableLength = writableLength;
  }
}

/**
 * The device side of a split virtqueue.
 *
 * `pop` hands out chains whose buffers are zero-copy views of guest memory; `push` stages a
 * completion in the used ring; `publish` makes a batch of completions visible with one store of
 * `used.idx` and says whether the driver wants an interrupt. Notification suppression follows the
 * negotiated features: `avail_event`/`used_event` with EVENT_IDX, else the NO_NOTIFY and
 * NO_INTERRUPT flags.
 *
 * Counters: `stats.chains` counts completions (pushes), `stats.largestBatch` the most chains popped
 * in one drain — from a {@linkcode disableNotifications} to the {@linkcode enableNotifications}
 * that returns false (without those calls, until `pop` returns null).
 *
 * In-flight limit: chains popped and not yet published (QEMU's `inuse`) never exceed N; a driver
 * that offers one more can only do so by reusing descriptors the device holds:
 * `too-many-in-flight`. Pushing a chain that is not in flight is a device bug (`RangeError`).
 *
 * Faults: `pop` (and the re-check in `enableNotifications`) throw {@linkcode VirtqueueError} and
 * stop the queue; from then on `pop` returns null, `publish` and `enableNotifications` return
 * false, and nothing is written to guest memory until {@linkcode reset}.
 *
 * @example
 * ```ts
 * import { GuestMemory } from "./memory.ts";
 * import { SplitDeviceQueue, SplitDriverQueue, splitRingLayout } from "./split_queue.ts";
 *
 * const mem = new GuestMemory([{ gpa: 0, size: 1 << 16 }]);
 * const layout = splitRingLayout(8, 0);
 * const features = { indirect: false, eventIdx: true };
 * const driver = new SplitDriverQueue<string>(mem, layout, features);
 * const device = new SplitDeviceQueue(mem, 0, layout, features);
 *
 * mem.write(0x8000, new TextEncoder().encode("ping"));
 * driver.add([{ addr: 0x8000, length: 4 }], [{ addr: 0x9000, length: 4 }], "req-1");
 * if (!driver.kick()) throw new Error("the first kick is always wanted");
 *
 * let chain;
 * do {
 *   device.disableNotifications();
 *   while ((chain = device.pop()) !== null) {
 *     chain.writable[0]!.set(chain.readable[0]!.map((b) => b - 32)); // "PING", straight into guest RAM
 *     device.push(chain, 4);
 *   }
 * } while (device.enableNotifications());
 * device.publish();
 *
 * const done = driver.getUsed();
 * if (done?.token !== "req-1" || done.written !== 4) throw new Error("completion");
 * if (new TextDecoder().decode(mem.slice(0x9000, 4)) !== "PING") throw new Error("data");
 * ```
 */
export class SplitDeviceQueue implements DeviceQueue {
  /** The queue's index on its device. */
  readonly index: number;
  /** Where the driver put the rings. */
  readonly layout: QueueLayout;
  /** Device-side counters. */
  readonly stats: QueueStats = newQueueStats();
  readonly #mem: GuestMemory;
  readonly #size: number;
  readonly #mask: number;
  readonly #maxChain: number;
  readonly #indirect: boolean;
  readonly #eventIdx: boolean;
  /** All of guest RAM, for descriptor, avail-entry and used-element access by buffer offset. */
  readonly #ram: DataView;
  // Buffer offsets of the descriptor table, avail ring entries and used ring elements: the
  // constructor checked each area lies inside one region, so they hold for the queue's life and
  // the hot path skips a translation per field.
  readonly #descAt: number;
  readonly #availRingAt: number;
  readonly #usedRingAt: number;
  // Guest addresses of the index, flags and event words, accessed atomically through GuestMemory.
  readonly #availFlags: number;
  readonly #availIdx: number;
  readonly #usedEvent: number;
  readonly #usedFlags: number;
  readonly #usedIdx: number;
  readonly #availEvent: number;
  /** Times each head is in flight: a duplicate head from a buggy driver must still balance. */
  readonly #headInFlight: Uint16Array;

  #lastAvail = 0;
  /** Last avail.idx read: chains up to it are known to be available without another atomic load. */
  #shadowAvail = 0;
  #used = 0;
  /** Pushed, not yet published. */
  #staged = 0;
  /** Popped, not yet pushed. */
  #inFlight = 0;
  #signalledUsed = 0;
  #signalledUsedValid = false;
  #draining = false;
  #batch = 0;
  #fault: VirtqueueError | null = null;
  /** Heads to pop again before the avail ring (resume after a crash), in order. */
  #resubmit: number[] = [];
  /** Set by the device's runtime: records what is in flight (vhost-user INFLIGHT_SHMFD). */
  inflightLog: InflightLog | null = null;

  /**
   * Takes over a split ring the driver laid out (device side), checking its layout.
   *
   * @param mem guest memory holding the rings and buffers
   * @param index the queue's index on its device (for error messages)
   * @param layout where the driver placed the three areas
   * @param features negotiated INDIRECT_DESC and EVENT_IDX
   * @throws {VirtqueueError} `bad-ring-layout` when the size is not a power of 2 up to 32768, or an
   *   area is misaligned, not wholly inside one RAM region, or overlaps another
   */
  constructor(mem: GuestMemory, index: number, layout: QueueLayout, features: QueueFeatures) {
    if (!Number.isInteger(index) || index < 0 || index > 0xffff) {
      throw new RangeError(`Queue index ${index} is not a 16-bit number`);
    }
    const problem = splitLayoutProblem(mem, layout);
    if (problem !== null) throw new VirtqueueError("bad-ring-layout", index, problem);
    const size = layout.size;
    this.index = index;
    this.layout = { size, desc: layout.desc, driver: layout.driver, device: layout.device };
    this.#mem = mem;
    this.#size = size;
    this.#mask = size - 1;
    this.#maxChain = maxChainBuffers(size);
    this.#indirect = features.indirect;
    this.#eventIdx = features.eventIdx;
    // A fixed length: over a growable buffer a length-tracking view is ~20× slower per access.
    this.#ram = new DataView(mem.buffer, 0, mem.buffer.byteLength);
    this.#descAt = mem.translate(layout.desc, descBytes(size));
    this.#availRingAt = mem.translate(layout.driver, availBytes(size)) + 4;
    this.#usedRingAt = mem.translate(layout.device, usedBytes(size)) + 4;
    this.#availFlags = layout.driver;
    this.#availIdx = layout.driver + 2;
    this.#usedEvent = layout.driver + 4 + 2 * size;
    this.#usedFlags = layout.device;
    this.#usedIdx = layout.device + 2;
    this.#availEvent = layout.device + 4 + USED_ELEM_SIZE * size;
    this.#headInFlight = new Uint16Array(size);
  }

  /** Chains popped and not yet pushed. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** True after a fault, until {@linkcode reset}. */
  get broken(): boolean {
    return this.#fault !== null;
  }

  /** The error that stopped the queue, or `null`. */
  get fault(): VirtqueueError | null {
    return this.#fault;
  }

  /**
   * The next available chain, or `null` when the ring is empty or the queue is broken.
   *
   * @throws {VirtqueueError} when the driver broke the ring rules; the queue is then broken
   */
  pop(): DescriptorChain | null {
    if (this.#fault !== null) return null;
    if (this.#resubmit.length > 0) return this.#popResubmitted(this.#resubmit.shift()!);
    if (this.#lastAvail === this.#shadowAvail && !this.#refreshAvail()) {
      if (!this.#draining) this.#batch = 0;
      return null;
    }
    // A well-behaved driver cannot offer chain N+1 while N are held: it would reuse descriptors.
    if (this.#inFlight + this.#staged >= this.#size) {
      this.#fail("too-many-in-flight", `more than ${this.#size} chains in flight`);
    }
    const head = this.#ram.getUint16(this.#availRingAt + 2 * (this.#lastAvail & this.#mask), true);
    if (head >= this.#size) {
      this.#fail("head-out-of-range", `avail ring names head ${head} of ${this.#size}`);
    }
    let chain: SplitChain;
    try {
      chain = this.#walk(head);
    } catch (e) {
      if (e instanceof GuestMemoryError) this.#fail("outside-ram", e.message);
      throw e;
    }
    this.#lastAvail = (this.#lastAvail + 1) & 0xffff;
    this.#headInFlight[head]!++;
    this.#inFlight++;
    if (++this.#batch > this.stats.largestBatch) this.stats.largestBatch = this.#batch;
    this.inflightLog?.popped(head);
    return chain;
  }

  /** A chain from the resubmit list (its avail entry was consumed before the crash). */
  #popResubmitted(head: number): DescriptorChain {
    if (head >= this.#size) {
      this.#fail("head-out-of-range", `resubmitted head ${head} of ${this.#size}`);
    }
    let chain: SplitChain;
    try {
      chain = this.#walk(head);
    } catch (e) {
      if (e instanceof GuestMemoryError) this.#fail("outside-ram", e.message);
      throw e;
    }
    this.#headInFlight[head]!++;
    this.#inFlight++;
    this.inflightLog?.popped(head);
    return chain;
  }

  /**
   * Reads avail.idx; true when it is ahead of the last chain popped.
   *
   * @throws {VirtqueueError} `avail-idx-jump` when it is more than N ahead
   */
  #refreshAvail(): boolean {
    const idx = this.#mem.atomicU16(this.#availIdx);
    // u16 distance: the index wraps at 65536, and a driver can offer at most N chains at once.
    const ahead = (idx - this.#lastAvail) & 0xffff;
    if (ahead > this.#size) {
      this.#fail(
        "avail-idx-jump",
        `avail.idx moved from ${this.#lastAvail} to ${idx}, more than ${this.#size} ahead`,
      );
    }
    this.#shadowAvail = idx;
    return ahead !== 0;
  }

  /**
   * Walks the chain at `head`: direct descriptors, then at most one indirect table, which ends the
   * direct part (INDIRECT with NEXT is forbidden). Writes nothing; throws before committing anything.
   * Each descriptor field is read once into a local, so a driver rewriting the table meanwhile
   * cannot make the value checked differ from the value used.
   */
  #walk(head: number): SplitChain {
    const mem = this.#mem;
    const ram = this.#ram;
    const readable: Uint8Array[] = [];
    const writable: Uint8Array[] = [];
    let readableLength = 0;
    let writableLength = 0;
    /** Buffer offset of the table being walked: the ring's, then possibly an indirect one. */
    let table = this.#descAt;
    let tableSize = this.#size;
    let inIndirect = false;
    let slots = 0;
    let walked = 0;
    let buffers = 0;
    let i = head;
    for (;;) {
      // More steps than the table has entries means the chain revisits one: a loop.
      if (++walked > tableSize) {
        this.#fail(
          "chain-too-long",
          `chain at head ${head} has more than ${tableSize} descriptors`,
        );
      }
      const at = table + DESC_SIZE * i;
      const lo = ram.getUint32(at, true);
      const hi = ram.getUint32(at + 4, true);
      // GuestMemory.u64Number's rule: from 2^53 up, an address no bounds check accepts.
      const addr = hi >= 0x200000 ? Number.MAX_SAFE_INTEGER + 1 : hi * 0x1_0000_0000 + lo;
      const len = ram.getUint32(at + 8, true);
      const flags = ram.getUint16(at + 12, true);
      if (!inIndirect) slots++;
      if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
        if (!this.#indirect) {
          this.#fail(
            "indirect-not-negotiated",
            `descriptor ${i} is indirect without INDIRECT_DESC`,
          );
        }
        if (inIndirect) this.#fail("indirect-nested", `indirect descriptor ${i} inside a table`);
        if ((flags & VIRTQ_DESC_F_NEXT) !== 0) {
          this.#fail("indirect-with-next", `descriptor ${i} has both INDIRECT and NEXT`);
        }
        if (len === 0 || len % DESC_SIZE !== 0 || len > DESC_SIZE * MAX_INDIRECT_ENTRIES) {
          this.#fail("indirect-bad-length", `indirect table of ${len} bytes at descriptor ${i}`);
        }
        table = mem.translate(addr, len); // the whole table inside one region, or GuestMemoryError
        tableSize = len / DESC_SIZE;
        inIndirect = true;
        walked = 0;
        i = 0;
        continue;
      }
      if (len === 0) this.#fail("zero-length", `descriptor ${i} of chain ${head} has length 0`);
      const writableDesc = (flags & VIRTQ_DESC_F_WRITE) !== 0;
      if (!writableDesc && writable.length !== 0) {
        this.#fail("readable-after-writable", `descriptor ${i} of chain ${head} is readable`);
      }
      if (++buffers > this.#maxChain) {
        this.#fail(
          "chain-too-long",
          `chain at head ${head} has more than ${this.#maxChain} buffers`,
        );
      }
      const view = mem.slice(addr, len);
      if (writableDesc) {
        writable.push(view);
        writableLength += len;
      } else {
        readable.push(view);
        readableLength += len;
      }
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
      const next = ram.getUint16(at + 14, true);
      if (next >= tableSize) {
        this.#fail("next-out-of-range", `descriptor ${i} points at ${next} of ${tableSize}`);
      }
      i = next;
    }
    return new SplitChain(head, slots, readable, writable, readableLength, writableLength);
  }

  /**
   * Stages the completion of `chain`: writes its used element, not used.idx.
   *
   * @param chain a chain this queue popped and has not completed
   * @param written bytes put in the chain's writable part (used.len)
   * @throws {RangeError} when `chain` is not in flight or `written` is out of range: a device bug
   */
  push(chain: DescriptorChain, written: number): void {
    const id = chain.id;
    if (!Number.isInteger(id) || id < 0 || id >= this.#size || this.#headInFlight[id] === 0) {
      throw new RangeError(`Queue ${this.index}: chain ${id} is not in flight`);
    }
    if (
      !Number.isInteger(written) || written < 0 || written > chain.writableLength ||
      written > 0xffffffff
    ) {
      throw new RangeError(
        `Queue ${this.index}: ${written} bytes written to a chain of ${chain.writableLength}`,
      );
    }
    this.#headInFlight[id]!--;
    this.#inFlight--;
    this.stats.chains++;
    // A stopped queue writes nothing more; the completion is only accounted for.
    if (this.#fault !== null) return;
    const at = this.#usedRingAt + USED_ELEM_SIZE * ((this.#used + this.#staged) & this.#mask);
    this.#ram.setUint32(at, id, true);
    this.#ram.setUint32(at + 4, written, true);
    this.#staged++;
    this.inflightLog?.pushed(id);
  }

  /**
   * Publishes the staged completions with one store of used.idx, then decides on an interrupt.
   *
   * @returns true when the driver wants an interrupt now
   */
  publish(): boolean {
    const staged = this.#staged;
    if (staged === 0 || this.#fault !== null) {
      this.#staged = 0;
      return false;
    }
    const mem = this.#mem;
    const old = this.#used;
    const now = (old + staged) & 0xffff;
    // The atomic store orders the element writes before it (release for the driver's atomic load).
    mem.atomicSetU16(this.#usedIdx, now);
    this.#used = now;
    this.#staged = 0;
    this.inflightLog?.published(now);
    // QEMU: a last-signalled index inside the window just published (or ahead of it) is from an
    // earlier lap of the u16 index and cannot stand for "old" in vring_need_event: notify.
    if (((now - this.#signalledUsed) << 16 >> 16) < ((now - old) & 0xffff)) {
      this.#signalledUsedValid = false;
    }
    // used.idx must be visible before we read used_event / flags, or an interrupt can be lost.
    mem.fence();
    let notify: boolean;
    if (this.#eventIdx) {
      const valid = this.#signalledUsedValid;
      const prev = this.#signalledUsed;
      this.#signalledUsedValid = true;
      this.#signalledUsed = now;
      // The first time there is no previous index to compare with: always notify (QEMU).
      notify = !valid || vringNeedEvent(mem.atomicU16(this.#usedEvent), now, prev);
    } else {
      notify = (mem.atomicU16(this.#availFlags) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
    }
    if (notify) this.stats.interrupts++;
    else this.stats.suppressedInterrupts++;
    return notify;
  }

  /**
   * Asks the driver not to kick. Without EVENT_IDX this sets NO_NOTIFY; with it, nothing is
   * written: avail_event stays behind the chains the device is about to drain, so the driver does
   * not cross it (vhost's approach).
   */
  disableNotifications(): void {
    if (!this.#draining) {
      this.#draining = true;
      this.#batch = 0;
    }
    if (this.#fault !== null) return;
    if (this.#eventIdx) {
      // avail_event half the index space ahead: no publish the driver can make crosses it, so it
      // does not kick until enableNotifications() brings the event back (the flag's EVENT_IDX form).
      this.#mem.atomicSetU16(this.#availEvent, (this.#lastAvail + 0x8000) & 0xffff);
      return;
    }
    this.#mem.atomicSetU16(this.#usedFlags, VIRTQ_USED_F_NO_NOTIFY);
  }

  /**
   * Asks the driver to kick again, then re-checks avail.idx.
   *
   * @returns true when chains are waiting (they arrived while notifications were off): drain again
   * @throws {VirtqueueError} `avail-idx-jump` when avail.idx moved more than N ahead
   */
  enableNotifications(): boolean {
    if (this.#fault !== null) {
      this.#draining = false;
      return false;
    }
    const mem = this.#mem;
    if (this.#eventIdx) {
      // Kick me when you make the entry at last_avail_idx available.
      mem.atomicSetU16(this.#availEvent, this.#lastAvail);
    } else {
      mem.atomicSetU16(this.#usedFlags, 0);
    }
    // The event word must be visible before we re-read avail.idx, or a kick can be lost.
    mem.fence();
    const more = this.#refreshAvail();
    if (!more) this.#draining = false;
    return more;
  }

  hasAvailable(): boolean {
    if (this.#fault !== null) return false;
    if (this.#resubmit.length > 0) return true;
    // No checks here: a jump shows as "available", and the pop that follows reports the fault.
    return this.#mem.atomicU16(this.#availIdx) !== this.#lastAvail;
  }

  /**
   * The index of the next avail entry the device will read (vhost-user's GET_VRING_BASE answer).
   */
  get lastAvailIndex(): number {
    return this.#lastAvail;
  }

  /**
   * Takes over a ring already in use (vhost-user's SET_VRING_BASE after a stop or a reconnect):
   * the next avail entry to read is `lastAvail`, and the used index continues from what the ring
   * shows. Nothing is in flight, except `resubmit`: heads whose avail entries were consumed before
   * a crash and that were never completed (vhost-user's inflight tracking); they are popped first,
   * in this order.
   */
  resume(lastAvail: number, resubmit: readonly number[] = []): void {
    this.reset();
    this.#lastAvail = lastAvail & 0xffff;
    this.#shadowAvail = this.#lastAvail;
    this.#used = this.#mem.atomicU16(this.#usedIdx);
    this.#resubmit = [...resubmit];
  }

  /** The ring's used.idx as it is in guest memory now. */
  get usedIndex(): number {
    return this.#mem.atomicU16(this.#usedIdx);
  }

  /** Forgets all ring state (device or queue reset); keeps the counters. Writes no guest memory. */
  reset(): void {
    this.#lastAvail = 0;
    this.#shadowAvail = 0;
    this.#used = 0;
    this.#staged = 0;
    this.#inFlight = 0;
    this.#headInFlight.fill(0);
    this.#signalledUsed = 0;
    this.#signalledUsedValid = false;
    this.#draining = false;
    this.#batch = 0;
    this.#fault = null;
    this.#resubmit = [];
  }

  /** Stops the queue and throws the fault. */
  #fail(fault: VirtqueueFault, detail: string): never {
    const error = new VirtqueueError(fault, this.index, detail);
    this.#fault = error;
    throw error;
  }
}
