/**
 * The split virtqueue (virtio 1.2 §2.7): the device side a back-end pops chains from and pushes
 * completions to, and the driver side a simulated guest adds buffers to and reaps completions from.
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
  DriverBuffer,
  DriverQueue,
  QueueFeatures,
  QueueLayout,
  QueueStats,
  UsedElement,
  VirtqueueFault,
} from "./queue.ts";

/** Bytes of one descriptor (direct or indirect). */
const DESC_SIZE = 16;
/** Bytes of one used ring element: id u32, len u32. */
const USED_ELEM_SIZE = 8;
/** Largest indirect table the device walks, in entries: `next` is 16-bit, and a bound keeps work finite. */
const MAX_INDIRECT_ENTRIES = VIRTQ_MAX_SIZE;
/** QEMU's VIRTQUEUE_MAX_SIZE: the buffers per chain QEMU maps whatever the queue size. */
const QEMU_MAX_CHAIN = 1024;

/** Bytes of the descriptor table of a queue of `size` entries. */
function descBytes(size: number): number {
  return DESC_SIZE * size;
}
/** Bytes of the avail ring: flags, idx, ring[size], used_event. */
function availBytes(size: number): number {
  return 6 + 2 * size;
}
/** Bytes of the used ring: flags, idx, ring[size], avail_event. */
function usedBytes(size: number): number {
  return 6 + USED_ELEM_SIZE * size;
}

/**
 * Most buffers one chain may hold. The spec says no longer than the queue size (§2.7.5.3.1); QEMU
 * maps up to 1024 whatever the size, so guests that rely on that with small queues keep working.
 * The bound also caps the views one pop allocates.
 */
function maxChainBuffers(size: number): number {
  return Math.max(size, QEMU_MAX_CHAIN);
}

function isPowerOfTwoQueueSize(size: number): boolean {
  return Number.isInteger(size) && size >= 1 && size <= VIRTQ_MAX_SIZE && (size & (size - 1)) === 0;
}

/**
 * Lays out a split ring of `size` entries from guest address `base`, as a driver allocating one
 * contiguous block would: descriptor table (16-aligned), avail ring (2-aligned, with `used_event`),
 * used ring (4-aligned, with `avail_event`), back to back.
 *
 * @param size queue size: a power of 2 from 1 to 32768
 * @param base guest-physical address to start from (rounded up to 16)
 * @returns the layout and `bytes`, the span from `base` to the end of the used ring
 * @throws {RangeError} for a bad size or base
 *
 * @example
 * ```ts
 * import { splitRingLayout } from "./split_queue.ts";
 * const l = splitRingLayout(256, 0x1000);
 * if (l.desc !== 0x1000 || l.driver !== 0x2000 || l.device !== 0x2208) throw new Error("layout");
 * ```
 */
export function splitRingLayout(size: number, base: number): QueueLayout & { bytes: number } {
  if (!isPowerOfTwoQueueSize(size)) {
    throw new RangeError(
      `Split queue size ${size} is not a power of 2 from 1 to ${VIRTQ_MAX_SIZE}`,
    );
  }
  if (!Number.isSafeInteger(base) || base < 0) {
    throw new RangeError(`Split ring base ${base} is not a guest address`);
  }
  const desc = alignUp(base, 16);
  const driver = desc + descBytes(size); // a multiple of 16, so 2-aligned
  const device = alignUp(driver + availBytes(size), 4);
  return { size, desc, driver, device, bytes: device + usedBytes(size) - base };
}

function alignUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

/**
 * Why `layout` is not a usable split ring in `mem`, or `null` when it is: size a power of 2 up to
 * 32768, areas naturally aligned, each wholly inside one RAM region, no two overlapping.
 */
function splitLayoutProblem(mem: GuestMemory, layout: QueueLayout): string | null {
  const { size } = layout;
  if (!isPowerOfTwoQueueSize(size)) {
    return `queue size ${size} is not a power of 2 from 1 to ${VIRTQ_MAX_SIZE}`;
  }
  const areas = [
    { name: "descriptor table", gpa: layout.desc, bytes: descBytes(size), align: 16 },
    { name: "avail ring", gpa: layout.driver, bytes: availBytes(size), align: 2 },
    { name: "used ring", gpa: layout.device, bytes: usedBytes(size), align: 4 },
  ];
  for (const a of areas) {
    // The addresses come from the guest's queue_desc/driver/device registers: check before use.
    if (!Number.isSafeInteger(a.gpa) || a.gpa < 0) return `${a.name} address ${a.gpa} is invalid`;
    if (a.gpa % a.align !== 0) {
      return `${a.name} at 0x${a.gpa.toString(16)} is not ${a.align}-byte aligned`;
    }
    if (!mem.contains(a.gpa, a.bytes)) {
      return `${a.name} at 0x${a.gpa.toString(16)}+${a.bytes} is not inside one RAM region`;
    }
  }
  for (let i = 0; i < areas.length; i++) {
    for (let j = i + 1; j < areas.length; j++) {
      const a = areas[i]!;
      const b = areas[j]!;
      if (a.gpa < b.gpa + b.bytes && b.gpa < a.gpa + a.bytes) {
        return `${a.name} overlaps the ${b.name}`;
      }
    }
  }
  return null;
}

/** A chain popped from a split ring. `slots` counts descriptor-table entries the chain occupies. */
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
    this.#ram = new DataView(mem.buffer);
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
    // No checks here: a jump shows as "available", and the pop that follows reports the fault.
    return this.#mem.atomicU16(this.#availIdx) !== this.#lastAvail;
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
  }

  /** Stops the queue and throws the fault. */
  #fail(fault: VirtqueueFault, detail: string): never {
    const error = new VirtqueueError(fault, this.index, detail);
    this.#fault = error;
    throw error;
  }
}

/** Marks a descriptor with no successor in the driver's free list. */
const NO_DESC = 0xffff;

/**
 * The driver side of a split virtqueue, for simulated guests and tests.
 *
 * Descriptors come from a free list kept in a `Uint16Array` (the guest-memory copy is never read
 * back, so a device cannot corrupt it); the successor links double as chain links, as in Linux.
 * `add` writes descriptors and the avail ring entry; `kick` publishes avail.idx for everything
 * added since the last kick and says whether the device wants a notification.
 *
 * Counters: `stats.kicks`/`suppressedKicks` per `kick` that published something, `stats.chains`
 * completions reaped, `stats.largestBatch` the most chains one kick published.
 */
export class SplitDriverQueue<T> implements DriverQueue<T> {
  /** Where the rings are. */
  readonly layout: QueueLayout;
  readonly stats: QueueStats = newQueueStats();
  readonly #mem: GuestMemory;
  readonly #size: number;
  readonly #mask: number;
  readonly #maxChain: number;
  readonly #indirect: boolean;
  readonly #eventIdx: boolean;
  readonly #ram: DataView;
  // Buffer offsets of the descriptor table, avail ring entries and used ring elements.
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
  /** Free-list successor of each descriptor; inside a chain, the next descriptor of the chain. */
  readonly #next: Uint16Array;
  /** Ring descriptors held by the chain whose head is the index; 0 when not a live head. */
  readonly #chainSlots: Uint16Array;
  readonly #tokens: (T | undefined)[];

  #freeHead = 0;
  #numFree = 0;
  /** avail.idx including chains added but not yet published by kick. */
  #avail = 0;
  /** avail.idx as last published. */
  #published = 0;
  #lastUsed = 0;
  #shadowUsed = 0;
  #interruptsEnabled = true;
  /** lastUsed when used_event was last parked behind it (interrupts off with EVENT_IDX). */
  #parkedAt = 0;

  /**
   * Zeroes the three ring areas (the driver owns them) and frees every descriptor.
   *
   * @param mem guest memory
   * @param layout where the rings go; see {@linkcode splitRingLayout}
   * @param features negotiated INDIRECT_DESC and EVENT_IDX
   * @throws {RangeError} for a layout the device would reject
   */
  constructor(mem: GuestMemory, layout: QueueLayout, features: QueueFeatures) {
    const problem = splitLayoutProblem(mem, layout);
    if (problem !== null) throw new RangeError(`Bad split ring layout: ${problem}`);
    const size = layout.size;
    this.layout = { size, desc: layout.desc, driver: layout.driver, device: layout.device };
    this.#mem = mem;
    this.#size = size;
    this.#mask = size - 1;
    this.#maxChain = maxChainBuffers(size);
    this.#indirect = features.indirect;
    this.#eventIdx = features.eventIdx;
    this.#ram = new DataView(mem.buffer);
    this.#descAt = mem.translate(layout.desc, descBytes(size));
    this.#availRingAt = mem.translate(layout.driver, availBytes(size)) + 4;
    this.#usedRingAt = mem.translate(layout.device, usedBytes(size)) + 4;
    this.#availFlags = layout.driver;
    this.#availIdx = layout.driver + 2;
    this.#usedEvent = layout.driver + 4 + 2 * size;
    this.#usedFlags = layout.device;
    this.#usedIdx = layout.device + 2;
    this.#availEvent = layout.device + 4 + USED_ELEM_SIZE * size;
    this.#next = new Uint16Array(size);
    this.#chainSlots = new Uint16Array(size);
    this.#tokens = new Array<T | undefined>(size).fill(undefined);
    this.reset();
  }

  /** Free descriptors in the table. */
  get free(): number {
    return this.#numFree;
  }

  /** Chains added and not yet reaped. */
  get outstanding(): number {
    return (this.#avail - this.#lastUsed) & 0xffff;
  }

  /**
   * Zeroes the rings and forgets every chain, as a driver re-initialising a queue after a device
   * reset. Tokens of outstanding chains are dropped.
   */
  reset(): void {
    const mem = this.#mem;
    const size = this.#size;
    mem.fill(this.layout.desc, descBytes(size));
    mem.fill(this.layout.driver, availBytes(size));
    mem.fill(this.layout.device, usedBytes(size));
    for (let i = 0; i < size; i++) this.#next[i] = i + 1 < size ? i + 1 : NO_DESC;
    this.#chainSlots.fill(0);
    this.#tokens.fill(undefined);
    this.#freeHead = 0;
    this.#numFree = size;
    this.#avail = 0;
    this.#published = 0;
    this.#lastUsed = 0;
    this.#shadowUsed = 0;
    this.#interruptsEnabled = true;
    this.#parkedAt = 0;
  }

  /**
   * Offers a chain: `readable` buffers then `writable` ones. With `indirectTable` (and
   * INDIRECT_DESC negotiated) the buffers go into a table of 16 bytes per buffer at that guest
   * address and the chain takes one ring descriptor; otherwise one descriptor per buffer.
   * Nothing is visible to the device until {@linkcode kick}.
   *
   * @returns false when there are not enough free descriptors
   * @throws {RangeError} for an empty chain, one longer than the device accepts, or a buffer whose
   *   address or length does not fit a descriptor
   * @throws {GuestMemoryError} when the indirect table is not inside one RAM region
   */
  add(
    readable: readonly DriverBuffer[],
    writable: readonly DriverBuffer[],
    token: T,
    indirectTable?: number,
  ): boolean {
    const total = readable.length + writable.length;
    if (total === 0) throw new RangeError("A chain needs at least one buffer");
    if (total > this.#maxChain) {
      throw new RangeError(`A chain of ${total} buffers exceeds the limit of ${this.#maxChain}`);
    }
    const ram = this.#ram;
    const indirect = indirectTable !== undefined && this.#indirect;
    const need = indirect ? 1 : total;
    if (need > this.#numFree) return false;
    const head = this.#freeHead;
    if (indirect) {
      const tableAt = this.#mem.translate(indirectTable, DESC_SIZE * total);
      for (let k = 0; k < total; k++) {
        const b = k < readable.length ? readable[k]! : writable[k - readable.length]!;
        const flags = (k < readable.length ? 0 : VIRTQ_DESC_F_WRITE) |
          (k + 1 < total ? VIRTQ_DESC_F_NEXT : 0);
        writeDesc(ram, tableAt + DESC_SIZE * k, b.addr, b.length, flags, k + 1 < total ? k + 1 : 0);
      }
      const at = this.#descAt + DESC_SIZE * head;
      writeDesc(ram, at, indirectTable, DESC_SIZE * total, VIRTQ_DESC_F_INDIRECT, 0);
      this.#freeHead = this.#next[head]!;
    } else {
      let d = head;
      for (let k = 0; k < total; k++) {
        const b = k < readable.length ? readable[k]! : writable[k - readable.length]!;
        const last = k + 1 === total;
        const flags = (k < readable.length ? 0 : VIRTQ_DESC_F_WRITE) |
          (last ? 0 : VIRTQ_DESC_F_NEXT);
        const next = this.#next[d]!;
        writeDesc(ram, this.#descAt + DESC_SIZE * d, b.addr, b.length, flags, last ? 0 : next);
        d = next;
      }
      this.#freeHead = d;
    }
    this.#numFree -= need;
    this.#chainSlots[head] = need;
    this.#tokens[head] = token;
    ram.setUint16(this.#availRingAt + 2 * (this.#avail & this.#mask), head, true);
    this.#avail = (this.#avail + 1) & 0xffff;
    return true;
  }

  /**
   * Publishes every chain added since the last kick (one store of avail.idx, after the ring
   * entries), then reads avail_event (EVENT_IDX) or used.flags to see whether the device wants
   * a notification.
   *
   * @returns true when the caller should write the doorbell; false also when nothing was added
   */
  kick(): boolean {
    const mem = this.#mem;
    const old = this.#published;
    const now = this.#avail;
    if (now === old) return false;
    mem.atomicSetU16(this.#availIdx, now);
    this.#published = now;
    // avail.idx must be visible before we read the device's suppression word, or a kick is lost.
    mem.fence();
    const added = (now - old) & 0xffff;
    if (added > this.stats.largestBatch) this.stats.largestBatch = added;
    const wanted = this.#eventIdx
      ? vringNeedEvent(mem.atomicU16(this.#availEvent), now, old)
      : (mem.atomicU16(this.#usedFlags) & VIRTQ_USED_F_NO_NOTIFY) === 0;
    if (wanted) this.stats.kicks++;
    else this.stats.suppressedKicks++;
    return wanted;
  }

  /**
   * The next completion, or `null`. Frees the chain's descriptors.
   *
   * @throws {RangeError} when the device moved used.idx too far or returned a chain not in use
   */
  getUsed(): UsedElement<T> | null {
    const mem = this.#mem;
    if (this.#lastUsed === this.#shadowUsed) {
      const idx = mem.atomicU16(this.#usedIdx);
      if (((idx - this.#lastUsed) & 0xffff) > this.#size) {
        throw new RangeError(`Device moved used.idx from ${this.#lastUsed} to ${idx}`);
      }
      this.#shadowUsed = idx;
      if (idx === this.#lastUsed) return null;
    }
    const at = this.#usedRingAt + USED_ELEM_SIZE * (this.#lastUsed & this.#mask);
    const id = this.#ram.getUint32(at, true);
    const written = this.#ram.getUint32(at + 4, true);
    if (id >= this.#size || this.#chainSlots[id] === 0) {
      throw new RangeError(`Device returned chain ${id}, which is not in use`);
    }
    const token = this.#tokens[id] as T;
    this.#tokens[id] = undefined;
    this.#freeChain(id);
    this.#lastUsed = (this.#lastUsed + 1) & 0xffff;
    this.stats.chains++;
    if (this.#eventIdx) {
      if (this.#interruptsEnabled) {
        // Interrupt me when you pass what I have reaped (Linux's virtqueue_get_buf does the same).
        mem.atomicSetU16(this.#usedEvent, this.#lastUsed);
      } else if (((this.#lastUsed - this.#parkedAt) & 0xffff) >= 0x4000) {
        // Keep the parked used_event from drifting a whole u16 lap behind while we poll.
        this.#parkUsedEvent();
      }
    }
    return { token, written };
  }

  #freeChain(head: number): void {
    const slots = this.#chainSlots[head]!;
    let tail = head;
    for (let k = 1; k < slots; k++) tail = this.#next[tail]!;
    this.#next[tail] = this.#freeHead;
    this.#freeHead = head;
    this.#numFree += slots;
    this.#chainSlots[head] = 0;
  }

  /**
   * Asks the device not to interrupt: NO_INTERRUPT without EVENT_IDX; with it (where the flag must
   * stay 0) used_event is parked one behind last_used_idx, which the device passes only after
   * 65536 more completions.
   */
  disableInterrupts(): void {
    this.#interruptsEnabled = false;
    if (this.#eventIdx) this.#parkUsedEvent();
    else this.#mem.atomicSetU16(this.#availFlags, VIRTQ_AVAIL_F_NO_INTERRUPT);
  }

  #parkUsedEvent(): void {
    this.#parkedAt = this.#lastUsed;
    this.#mem.atomicSetU16(this.#usedEvent, (this.#lastUsed - 1) & 0xffff);
  }

  /**
   * Asks for interrupts again (used_event = last_used_idx, or clears NO_INTERRUPT), then re-checks.
   *
   * @returns true when completions are waiting: poll again
   */
  enableInterrupts(): boolean {
    const mem = this.#mem;
    this.#interruptsEnabled = true;
    if (this.#eventIdx) mem.atomicSetU16(this.#usedEvent, this.#lastUsed);
    else mem.atomicSetU16(this.#availFlags, 0);
    // The event word must be visible before we re-read used.idx, or an interrupt can be lost.
    mem.fence();
    return mem.atomicU16(this.#usedIdx) !== this.#lastUsed;
  }
}

/** Writes a descriptor at buffer offset `at`, checking the driver's numbers fit its fields. */
function writeDesc(
  ram: DataView,
  at: number,
  addr: number,
  length: number,
  flags: number,
  next: number,
): void {
  if (!Number.isSafeInteger(addr) || addr < 0) {
    throw new RangeError(`Buffer address ${addr} is not a guest address`);
  }
  if (!Number.isInteger(length) || length < 0 || length > 0xffffffff) {
    throw new RangeError(`Buffer length ${length} does not fit a descriptor`);
  }
  ram.setUint32(at, addr >>> 0, true);
  ram.setUint32(at + 4, Math.floor(addr / 0x1_0000_0000), true);
  ram.setUint32(at + 8, length, true);
  ram.setUint16(at + 12, flags, true);
  ram.setUint16(at + 14, next, true);
}
