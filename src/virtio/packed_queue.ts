/**
 * The packed virtqueue (VIRTIO_F_RING_PACKED, virtio 1.2 §2.8): one ring of 16-byte descriptors that
 * driver and device both write, plus two 4-byte event suppression structures.
 *
 * - {@linkcode PackedDeviceQueue}: the device side (an iothread pops chains, pushes completions).
 * - {@linkcode PackedDriverQueue}: the driver side (simulated guests and tests).
 * - {@linkcode packedRingLayout}: where the three areas go for a queue of a given size.
 *
 * Ownership of a slot is told by two flag bits and a wrap counter on each side (both start at 1):
 * a descriptor is available when AVAIL == the reader's wrap counter and USED != it, and used when
 * AVAIL == USED == the reader's wrap counter. The flags word is always written last, atomically, so
 * the reader that sees it also sees the rest of the descriptor.
 *
 * @example
 * ```ts
 * import { GuestMemory } from "./memory.ts";
 * import { packedRingLayout, PackedDeviceQueue, PackedDriverQueue } from "./packed_queue.ts";
 *
 * const mem = new GuestMemory([{ gpa: 0, size: 65536 }]);
 * const layout = packedRingLayout(8, 0x1000);
 * const features = { indirect: false, eventIdx: true };
 * const driver = new PackedDriverQueue<string>(mem, layout, features);
 * const device = new PackedDeviceQueue(mem, 0, layout, features);
 *
 * mem.write(0x4000, new TextEncoder().encode("ping"));
 * driver.add([{ addr: 0x4000, length: 4 }], [{ addr: 0x5000, length: 4 }], "req-1");
 * if (!driver.kick()) throw new Error("the first request must be kicked");
 *
 * const chain = device.pop()!;
 * chain.writable[0]!.set(chain.readable[0]!); // zero copy: views alias guest RAM
 * device.push(chain, 4);
 * if (!device.publish()) throw new Error("interrupts are enabled");
 *
 * const done = driver.getUsed()!;
 * if (done.token !== "req-1" || done.written !== 4) throw new Error("round trip");
 * ```
 *
 * @module
 */

import { GuestMemory, GuestMemoryError } from "./memory.ts";
import {
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_MAX_SIZE,
  vringNeedEvent,
} from "./features.ts";
import {
  type DescriptorChain,
  type DeviceQueue,
  type DriverBuffer,
  type DriverQueue,
  newQueueStats,
  type QueueFeatures,
  type QueueLayout,
  type QueueStats,
  type UsedElement,
  VirtqueueError,
  type VirtqueueFault,
} from "./queue.ts";

// struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }
const DESC_SIZE = 16;
const DESC_ADDR = 0;
const DESC_LEN = 8;
const DESC_ID = 12;
const DESC_FLAGS = 14;

// struct pvirtq_event_suppress { le16 off_wrap; le16 flags; }
const EVENT_SIZE = 4;
const EVENT_OFF_WRAP = 0;
const EVENT_FLAGS = 2;
/** Bit 15 of off_wrap: the wrap counter the event offset belongs to. */
const EVENT_WRAP = 1 << 15;
/** desc_event_flags is a 2-bit field; the other 14 bits are reserved. */
const EVENT_FLAGS_MASK = 3;

const AVAIL_USED = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED;
const U32_MAX = 0xffff_ffff;

/** Id states on the device side. */
const ID_FREE = 0;
const ID_POPPED = 1;
const ID_PUSHED = 2;

/** True when `flags` marks an available descriptor for a reader whose wrap counter is `wrap`. */
function isAvail(flags: number, wrap: boolean): boolean {
  return ((flags & VIRTQ_DESC_F_AVAIL) !== 0) === wrap &&
    ((flags & VIRTQ_DESC_F_USED) !== 0) !== wrap;
}

/** True when `flags` marks a used descriptor for a reader whose wrap counter is `wrap`. */
function isUsed(flags: number, wrap: boolean): boolean {
  return ((flags & VIRTQ_DESC_F_AVAIL) !== 0) === wrap &&
    ((flags & VIRTQ_DESC_F_USED) !== 0) === wrap;
}

/**
 * Whether an event suppression structure asks for a notification, after the writer moved its index
 * by `moved` slots to (`newIdx`, `newWrap`).
 *
 * In DESC mode the event offset is in ring coordinates (0..N-1) plus a wrap bit; like Linux's
 * `virtqueue_kick_prepare_packed`, an offset from the other lap is moved back by N so that the
 * 16-bit `vring_need_event` comparison sees one continuous index line.
 */
function eventWanted(
  flags: number,
  offWrap: number,
  eventIdx: boolean,
  size: number,
  newIdx: number,
  newWrap: boolean,
  moved: number,
): boolean {
  if (flags === RING_EVENT_FLAGS_DISABLE) return false;
  // DESC without EVENT_IDX, and the reserved value 3, are read as ENABLE: a spurious notification
  // costs little, a lost one hangs the other side.
  if (flags !== RING_EVENT_FLAGS_DESC || !eventIdx) return true;
  // Past a whole lap the one-lap adjustment below is ambiguous: notify rather than risk a lost one.
  if (moved > size) return true;
  let event = offWrap & ~EVENT_WRAP;
  if (((offWrap & EVENT_WRAP) !== 0) !== newWrap) event -= size;
  return vringNeedEvent(event, newIdx, newIdx - moved);
}

/**
 * Where the parts of a packed queue of `size` entries go when laid out from guest address `base`:
 * the descriptor ring (16-aligned, 16·N bytes), then the driver event suppression structure
 * (4 bytes), then the device event suppression structure (4 bytes).
 *
 * @param size queue size N, 1..32768 (packed queues need not be a power of 2)
 * @param base guest-physical address to start from; rounded up to 16
 * @returns the layout, and `bytes` from `base` to the end of the device area
 * @throws {RangeError} for a size outside 1..32768 or a negative or unsafe base
 */
export function packedRingLayout(size: number, base: number): QueueLayout & { bytes: number } {
  if (!Number.isInteger(size) || size < 1 || size > VIRTQ_MAX_SIZE) {
    throw new RangeError(`Packed queue size must be an integer from 1 to ${VIRTQ_MAX_SIZE}`);
  }
  if (!Number.isSafeInteger(base) || base < 0) {
    throw new RangeError("Packed queue base must be a non-negative safe integer");
  }
  const desc = base + ((16 - (base % 16)) % 16);
  // 16·N is a multiple of 4, so both event structures land 4-aligned.
  const driver = desc + DESC_SIZE * size;
  const device = driver + EVENT_SIZE;
  return { size, desc, driver, device, bytes: device + EVENT_SIZE - base };
}

/** Checks a layout the driver gave us; every guest number is checked before use. */
function checkLayout(mem: GuestMemory, index: number, layout: QueueLayout): void {
  const bad = (why: string): never => {
    throw new VirtqueueError("bad-ring-layout", index, why);
  };
  const { size, desc, driver, device } = layout;
  if (!Number.isInteger(size) || size < 1 || size > VIRTQ_MAX_SIZE) {
    bad(`queue size ${size} is outside 1..${VIRTQ_MAX_SIZE}`);
  }
  const areas = [["descriptor ring", desc, 16], ["driver area", driver, 4], [
    "device area",
    device,
    4,
  ]] as const;
  for (const [name, gpa, align] of areas) {
    if (!Number.isSafeInteger(gpa) || gpa < 0) bad(`${name} address ${gpa} is not valid`);
    if (gpa % align !== 0) bad(`${name} at 0x${gpa.toString(16)} is not ${align}-byte aligned`);
  }
  const descBytes = DESC_SIZE * size;
  if (!mem.contains(desc, descBytes)) bad("descriptor ring is not inside one RAM region");
  if (!mem.contains(driver, EVENT_SIZE)) bad("driver area is not inside one RAM region");
  if (!mem.contains(device, EVENT_SIZE)) bad("device area is not inside one RAM region");
  const overlap = (a: number, alen: number, b: number, blen: number) =>
    a < b + blen && b < a + alen;
  if (
    overlap(desc, descBytes, driver, EVENT_SIZE) || overlap(desc, descBytes, device, EVENT_SIZE) ||
    overlap(driver, EVENT_SIZE, device, EVENT_SIZE)
  ) {
    bad("ring areas overlap");
  }
}

/** A ring descriptor as the driver wrote it (what inflight tracking keeps of a chain). */
export interface PackedDescriptor {
  /** The buffer's guest address. */
  readonly addr: number;
  /** Its length in bytes. */
  readonly len: number;
  /** NEXT, WRITE, INDIRECT (and the AVAIL/USED bits as written). */
  readonly flags: number;
  /** The buffer id. */
  readonly id: number;
}

/**
 * Where a packed device queue records which chains are in flight (vhost-user's inflight tracking,
 * QueueRegionPacked), so that another process can resubmit them: the ring's own slots cannot say,
 * since used descriptors overwrite them out of order.
 */
export interface PackedInflightLog {
  /** A chain left the ring: its ring descriptors in order (one for an indirect chain). */
  popped(descs: readonly PackedDescriptor[]): void;
  /**
   * The used descriptors of buffers `ids[0..count)` are about to be written; the used slot and
   * wrap counter will be `usedIdx`/`usedWrap` after them.
   */
  publishing(ids: Uint16Array, count: number, usedIdx: number, usedWrap: boolean): void;
  /** They are visible to the driver now. */
  published(): void;
}

/**
 * The device side of a packed virtqueue.
 *
 * Drain loop: `do { q.disableNotifications(); while ((c = q.pop())) …; } while (q.enableNotifications())`.
 * Completions are staged with {@linkcode push} and written to the ring by {@linkcode publish}, one
 * used descriptor per chain, in push order, the first descriptor's flags last.
 *
 * A driver that breaks the ring rules earns a {@linkcode VirtqueueError} from {@linkcode pop}; the
 * queue is then broken (pop returns `null`, push and publish do nothing) until {@linkcode reset}.
 * An id stays reserved from pop until its used descriptor is published: a driver that offers an id
 * still in flight, or more ring slots than N in flight, faults with `too-many-in-flight`.
 */
export class PackedDeviceQueue implements DeviceQueue {
  /** The queue's index on its device. */
  readonly index: number;
  /** Where the driver put the ring and event structures. */
  readonly layout: QueueLayout;
  /** Device-side counters. */
  readonly stats: QueueStats = newQueueStats();

  readonly #mem: GuestMemory;
  readonly #size: number;
  readonly #desc: number;
  readonly #driverEvent: number;
  readonly #deviceEvent: number;
  readonly #indirect: boolean;
  readonly #eventIdx: boolean;

  /** Next slot to read, and the device's copy of the driver wrap counter for it. */
  #availIdx = 0;
  #availWrap = true;
  /** Next slot to write a used descriptor to, and the Device Ring Wrap Counter. */
  #usedIdx = 0;
  #usedWrap = true;

  /** Per buffer id: ID_FREE, ID_POPPED or ID_PUSHED; and how many ring slots its chain took. */
  readonly #idState: Uint8Array;
  readonly #idSlots: Uint16Array;
  /** Completions pushed and not yet published, in push order. At most N: ids are unique. */
  readonly #stagedId: Uint16Array;
  readonly #stagedLen: Uint32Array;
  #staged = 0;
  #inFlight = 0;
  /** Ring slots popped whose used descriptors are not yet published; never more than N. */
  #heldSlots = 0;

  #broken = false;
  /** Whether we last asked the driver for kicks (mirrors the device event structure). */
  #notify = true;
  /** Chains popped since the ring was last found empty. */
  #batch = 0;

  /** Where chains in flight are recorded (vhost-user), or null. */
  inflightLog: PackedInflightLog | null = null;
  /** Chains to pop again before the ring (resume after a crash), as their descriptors. */
  #resubmit: PackedDescriptor[][] = [];
  /** The chain's ring descriptors, kept while a log is set. */
  #copies: PackedDescriptor[] = [];

  // Scratch for the chain being walked: pop() is not re-entrant.
  #readable: Uint8Array[] = [];
  #writable: Uint8Array[] = [];
  #readableLength = 0;
  #writableLength = 0;

  /**
   * Takes over a packed ring the driver laid out (device side), checking its layout.
   *
   * @param mem guest RAM
   * @param index the queue's index on its device (for errors)
   * @param layout where the driver put the ring (from the transport's queue_desc/driver/device)
   * @param features negotiated INDIRECT_DESC and EVENT_IDX
   * @throws {VirtqueueError} `bad-ring-layout` for a size outside 1..32768, misaligned or
   *   overlapping areas, or an area not inside one RAM region
   */
  constructor(mem: GuestMemory, index: number, layout: QueueLayout, features: QueueFeatures) {
    if (!Number.isInteger(index) || index < 0 || index > 0xffff) {
      throw new RangeError(`Queue index ${index} is not a u16`);
    }
    checkLayout(mem, index, layout);
    this.index = index;
    this.layout = {
      size: layout.size,
      desc: layout.desc,
      driver: layout.driver,
      device: layout.device,
    };
    this.#mem = mem;
    this.#size = layout.size;
    this.#desc = layout.desc;
    this.#driverEvent = layout.driver;
    this.#deviceEvent = layout.device;
    this.#indirect = features.indirect;
    this.#eventIdx = features.eventIdx;
    this.#idState = new Uint8Array(layout.size);
    this.#idSlots = new Uint16Array(layout.size);
    this.#stagedId = new Uint16Array(layout.size);
    this.#stagedLen = new Uint32Array(layout.size);
  }

  /** Chains popped and not yet pushed. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** True after a fault, until {@linkcode reset}. */
  get broken(): boolean {
    return this.#broken;
  }

  /**
   * The next available chain, or `null` when the ring is empty (or the queue is broken).
   *
   * @throws {VirtqueueError} when the driver broke the ring rules; the queue is then broken
   */
  pop(): DescriptorChain | null {
    if (this.#broken) return null;
    if (this.#resubmit.length > 0) return this.#popResubmitted(this.#resubmit.shift()!);
    const mem = this.#mem;
    const headFlags = mem.atomicU16(this.#desc + this.#availIdx * DESC_SIZE + DESC_FLAGS);
    if (!isAvail(headFlags, this.#availWrap)) {
      this.#batch = 0;
      return null;
    }
    try {
      return this.#walk(headFlags);
    } catch (e) {
      if (e instanceof GuestMemoryError) {
        throw this.#fault("outside-ram", `buffer ${e.message.toLowerCase()}`);
      }
      throw e;
    }
  }

  /** Reads the chain starting at #availIdx, whose head flags are `headFlags`. */
  #walk(headFlags: number): DescriptorChain {
    const mem = this.#mem;
    const size = this.#size;
    this.#readable = [];
    this.#writable = [];
    this.#readableLength = 0;
    this.#writableLength = 0;

    let slot = this.#availIdx;
    let flags = headFlags;
    let count = 0;
    let id = 0;
    const log = this.inflightLog;
    if (log !== null) this.#copies = [];
    for (;;) {
      // A chain may not be longer than the ring: this also stops a driver that sets NEXT everywhere.
      if (++count > size) {
        throw this.#fault("chain-too-long", `chain is longer than the queue size ${size}`);
      }
      const at = this.#desc + slot * DESC_SIZE;
      if (count > 1) flags = mem.atomicU16(at + DESC_FLAGS);
      const addr = mem.u64Number(at + DESC_ADDR);
      const len = mem.u32(at + DESC_LEN);
      // Spec 2.8.6: the buffer id is in the last descriptor of the list.
      id = mem.u16(at + DESC_ID);
      if (++slot === size) slot = 0;
      if (log !== null) this.#copies.push({ addr, len, flags, id });

      if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
        if (!this.#indirect) {
          throw this.#fault("indirect-not-negotiated", "INDIRECT flag without INDIRECT_DESC");
        }
        // Spec 2.8.8: no INDIRECT descriptor inside a list linked by NEXT, nor with NEXT itself.
        if (count > 1 || (flags & VIRTQ_DESC_F_NEXT) !== 0) {
          throw this.#fault("indirect-with-next", "indirect descriptor in a NEXT-linked list");
        }
        this.#walkIndirect(addr, len);
        break;
      }
      this.#take(addr, len, (flags & VIRTQ_DESC_F_WRITE) !== 0);
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
    }

    const chain = this.#account(id, count);
    if (slot < this.#availIdx || count === size) this.#availWrap = !this.#availWrap;
    this.#availIdx = slot;
    if (++this.#batch > this.stats.largestBatch) this.stats.largestBatch = this.#batch;
    // With kicks enabled in DESC mode, keep the event at the next slot (QEMU does so for split
    // rings on every pop) so that a driver adding there now still kicks.
    if (this.#notify && this.#eventIdx) this.#writeKickEvent();
    log?.popped(this.#copies);
    return chain;
  }

  /** Checks buffer `id` of `count` slots out and returns the walked chain as in flight. */
  #account(id: number, count: number): DescriptorChain {
    const size = this.#size;
    if (id >= size) {
      throw this.#fault("head-out-of-range", `buffer id ${id} is not below the queue size ${size}`);
    }
    if (this.#idState[id] !== ID_FREE) {
      throw this.#fault("too-many-in-flight", `buffer id ${id} is offered while still in flight`);
    }
    if (this.#heldSlots + count > size) {
      throw this.#fault("too-many-in-flight", `more than ${size} ring slots in flight`);
    }
    this.#idState[id] = ID_POPPED;
    this.#idSlots[id] = count;
    this.#inFlight++;
    this.#heldSlots += count;
    return {
      id,
      slots: count,
      readable: this.#readable,
      writable: this.#writable,
      readableLength: this.#readableLength,
      writableLength: this.#writableLength,
    };
  }

  /**
   * A chain resubmitted from its recorded descriptors (the ring's slots may hold other things by
   * now), checked as a chain from the ring is; its slots were consumed before the crash.
   */
  #popResubmitted(descs: PackedDescriptor[]): DescriptorChain {
    this.#readable = [];
    this.#writable = [];
    this.#readableLength = 0;
    this.#writableLength = 0;
    try {
      if (descs.length === 0 || descs.length > this.#size) {
        throw this.#fault("chain-too-long", `a resubmitted chain of ${descs.length} descriptors`);
      }
      for (const [i, d] of descs.entries()) {
        const last = i === descs.length - 1;
        if ((d.flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
          if (!this.#indirect) {
            throw this.#fault("indirect-not-negotiated", "INDIRECT flag without INDIRECT_DESC");
          }
          if (i > 0 || !last) {
            throw this.#fault("indirect-with-next", "indirect descriptor in a NEXT-linked list");
          }
          this.#walkIndirect(d.addr, d.len);
          break;
        }
        if (((d.flags & VIRTQ_DESC_F_NEXT) === 0) !== last) {
          throw this.#fault("chain-too-long", "a resubmitted chain's NEXT flags do not match it");
        }
        this.#take(d.addr, d.len, (d.flags & VIRTQ_DESC_F_WRITE) !== 0);
      }
    } catch (e) {
      if (e instanceof GuestMemoryError) {
        throw this.#fault("outside-ram", `buffer ${e.message.toLowerCase()}`);
      }
      throw e;
    }
    return this.#account(descs[descs.length - 1]!.id, descs.length);
  }

  /** Collects the buffers of an indirect table: `len / 16` descriptors at `addr`. */
  #walkIndirect(addr: number, len: number): void {
    if (len === 0 || len % DESC_SIZE !== 0) {
      throw this.#fault("indirect-bad-length", `indirect table length ${len}`);
    }
    const entries = len / DESC_SIZE;
    // The list limit is the queue size unless the device says otherwise (spec 2.8.5); it also
    // bounds what a guest can make us allocate.
    if (entries > this.#size) {
      throw this.#fault("chain-too-long", `indirect table of ${entries} entries`);
    }
    const mem = this.#mem;
    // The whole table must be RAM before we read any of it (GuestMemoryError → outside-ram).
    mem.translate(addr, len);
    for (let j = 0; j < entries; j++) {
      const at = addr + j * DESC_SIZE;
      const flags = mem.u16(at + DESC_FLAGS);
      if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
        throw this.#fault("indirect-nested", `indirect descriptor ${j} inside an indirect table`);
      }
      // NEXT and the id are reserved in a table: the table length alone says how many there are.
      this.#take(
        mem.u64Number(at + DESC_ADDR),
        mem.u32(at + DESC_LEN),
        (flags & VIRTQ_DESC_F_WRITE) !== 0,
      );
    }
  }

  /** Maps one buffer into the chain being walked. */
  #take(addr: number, len: number, writable: boolean): void {
    if (len === 0) {
      throw this.#fault("zero-length", `a buffer at 0x${addr.toString(16)} has length 0`);
    }
    if (writable) {
      this.#writable.push(this.#mem.slice(addr, len));
      this.#writableLength += len;
    } else {
      if (this.#writable.length !== 0) {
        throw this.#fault("readable-after-writable", "device-readable buffer after a writable one");
      }
      this.#readable.push(this.#mem.slice(addr, len));
      this.#readableLength += len;
    }
  }

  /**
   * Stages the completion of `chain` with `written` bytes put in its writable part; nothing is
   * visible to the driver until {@linkcode publish}. Does nothing on a broken queue.
   *
   * @throws {RangeError} when `chain` is not in flight on this queue, or `written` is not an integer
   *   from 0 to the chain's writable length
   */
  push(chain: DescriptorChain, written: number): void {
    if (this.#broken) return;
    const id = chain.id;
    if (!Number.isInteger(id) || id < 0 || id >= this.#size || this.#idState[id] !== ID_POPPED) {
      throw new RangeError(`Virtqueue ${this.index}: chain ${id} is not in flight`);
    }
    if (
      !Number.isInteger(written) || written < 0 || written > chain.writableLength ||
      written > U32_MAX
    ) {
      throw new RangeError(
        `Virtqueue ${this.index}: ${written} bytes written exceeds the chain's ${chain.writableLength}`,
      );
    }
    this.#idState[id] = ID_PUSHED;
    this.#stagedId[this.#staged] = id;
    this.#stagedLen[this.#staged] = written;
    this.#staged++;
    this.#inFlight--;
    this.stats.chains++;
  }

  /**
   * Writes the staged completions as used descriptors and says whether to interrupt the driver,
   * counting `interrupts` or `suppressedInterrupts`. Returns false (and counts nothing) when
   * nothing was staged or the queue is broken.
   *
   * The descriptors after the first are written first and the first one's flags last: the driver
   * polls only the first slot, so it never sees part of a batch (QEMU's virtqueue_packed_flush).
   */
  publish(): boolean {
    const n = this.#staged;
    if (this.#broken || n === 0) return false;
    const size = this.#size;
    let slot = this.#usedIdx;
    let wrap = this.#usedWrap;
    let total = 0;
    const log = this.inflightLog;
    if (log !== null) {
      for (let i = 0; i < n; i++) total += this.#idSlots[this.#stagedId[i]!]!;
      const end = this.#usedIdx + total;
      log.publishing(this.#stagedId, n, end % size, end >= size ? !wrap : wrap);
      total = 0;
    }
    for (let i = 0; i < n; i++) {
      const id = this.#stagedId[i]!;
      if (i > 0) this.#writeUsed(slot, wrap, id, this.#stagedLen[i]!);
      const slots = this.#idSlots[id]!;
      this.#idState[id] = ID_FREE;
      total += slots;
      slot += slots;
      if (slot >= size) {
        slot -= size;
        wrap = !wrap;
      }
    }
    this.#writeUsed(this.#usedIdx, this.#usedWrap, this.#stagedId[0]!, this.#stagedLen[0]!);
    log?.published();
    this.#usedIdx = slot;
    this.#usedWrap = wrap;
    this.#heldSlots -= total;
    this.#staged = 0;

    // Used flags visible before we read the driver's event structure (spec 2.8.21).
    const mem = this.#mem;
    mem.fence();
    const flags = mem.atomicU16(this.#driverEvent + EVENT_FLAGS) & EVENT_FLAGS_MASK;
    const offWrap = mem.atomicU16(this.#driverEvent + EVENT_OFF_WRAP);
    const wanted = eventWanted(flags, offWrap, this.#eventIdx, size, slot, wrap, total);
    if (wanted) this.stats.interrupts++;
    else this.stats.suppressedInterrupts++;
    return wanted;
  }

  /** One used descriptor: id and len first, then the flags with AVAIL = USED = wrap. */
  #writeUsed(slot: number, wrap: boolean, id: number, len: number): void {
    const mem = this.#mem;
    const at = this.#desc + slot * DESC_SIZE;
    mem.setU16(at + DESC_ID, id);
    mem.setU32(at + DESC_LEN, len);
    // WRITE on a used descriptor says the device wrote data; len is reserved without it (2.8.4).
    mem.atomicSetU16(at + DESC_FLAGS, (wrap ? AVAIL_USED : 0) | (len > 0 ? VIRTQ_DESC_F_WRITE : 0));
  }

  /** Asks the driver not to kick (device event flags = DISABLE). */
  disableNotifications(): void {
    if (this.#broken) return;
    this.#notify = false;
    this.#mem.atomicSetU16(this.#deviceEvent + EVENT_FLAGS, RING_EVENT_FLAGS_DISABLE);
  }

  /**
   * Asks the driver to kick again — with EVENT_IDX for the next slot we will read (DESC mode),
   * else for everything (ENABLE) — then re-checks the ring.
   *
   * @returns true when a chain became available meanwhile: the caller must drain again
   */
  enableNotifications(): boolean {
    if (this.#broken) return false;
    const mem = this.#mem;
    this.#notify = true;
    if (this.#eventIdx) {
      this.#writeKickEvent();
      mem.atomicSetU16(this.#deviceEvent + EVENT_FLAGS, RING_EVENT_FLAGS_DESC);
    } else {
      mem.atomicSetU16(this.#deviceEvent + EVENT_FLAGS, RING_EVENT_FLAGS_ENABLE);
    }
    // The event store must be visible before we look at the ring again, or a driver that added
    // just before it and read the old DISABLE would never kick.
    mem.fence();
    if (this.#resubmit.length > 0) return true;
    const flags = mem.atomicU16(this.#desc + this.#availIdx * DESC_SIZE + DESC_FLAGS);
    return isAvail(flags, this.#availWrap);
  }

  hasAvailable(): boolean {
    if (this.#broken) return false;
    if (this.#resubmit.length > 0) return true;
    const flags = this.#mem.atomicU16(this.#desc + this.#availIdx * DESC_SIZE + DESC_FLAGS);
    return isAvail(flags, this.#availWrap);
  }

  #writeKickEvent(): void {
    this.#mem.atomicSetU16(
      this.#deviceEvent + EVENT_OFF_WRAP,
      this.#availIdx | (this.#availWrap ? EVENT_WRAP : 0),
    );
  }

  /**
   * Where the ring stands, as vhost-user's GET_VRING_BASE gives it for a packed ring (QEMU's
   * virtio_queue_get_last_avail_idx): the next avail slot with its wrap counter in bit 15, and in
   * the high 16 bits the next used slot with its wrap counter.
   */
  get ringState(): number {
    const avail = this.#availIdx | (this.#availWrap ? 0x8000 : 0);
    const used = this.#usedIdx | (this.#usedWrap ? 0x8000 : 0);
    return (used * 0x1_0000 + avail) >>> 0;
  }

  /**
   * Takes over a ring already in use from `state` ({@linkcode ringState}'s format, vhost-user's
   * SET_VRING_BASE): nothing is in flight, except `resubmit` — chains whose slots were consumed
   * before a crash, popped again first (as recorded by a {@linkcode PackedInflightLog}).
   *
   * @throws {RangeError} for an index past the ring
   */
  resume(state: number, resubmit: readonly (readonly PackedDescriptor[])[] = []): void {
    const availIdx = state & 0x7fff, usedIdx = (state >>> 16) & 0x7fff;
    if (availIdx >= this.#size || usedIdx >= this.#size) {
      throw new RangeError(
        `Packed ring state 0x${state.toString(16)} names a slot past the ring of ${this.#size}`,
      );
    }
    this.reset();
    this.#availIdx = availIdx;
    this.#availWrap = (state & 0x8000) !== 0;
    this.#usedIdx = usedIdx;
    this.#usedWrap = (state & 0x8000_0000) !== 0;
    this.#resubmit = resubmit.map((chain) => [...chain]);
  }

  /**
   * Forgets the ring state (after a device or queue reset): indexes to 0, wrap counters to 1, no
   * chain in flight, not broken. Counters in {@linkcode stats} are kept; guest memory is not touched.
   */
  reset(): void {
    this.#availIdx = 0;
    this.#availWrap = true;
    this.#usedIdx = 0;
    this.#usedWrap = true;
    this.#idState.fill(ID_FREE);
    this.#staged = 0;
    this.#inFlight = 0;
    this.#heldSlots = 0;
    this.#broken = false;
    this.#notify = true;
    this.#batch = 0;
    this.#readable = [];
    this.#writable = [];
    this.#resubmit = [];
  }

  /** Marks the queue broken and returns the error to throw. */
  #fault(fault: VirtqueueFault, detail: string): VirtqueueError {
    this.#broken = true;
    return new VirtqueueError(fault, this.index, detail);
  }
}

/**
 * The driver side of a packed virtqueue, as a guest's virtio driver would run it (Linux's
 * virtio_ring.c packed functions are the model).
 *
 * Buffer ids come from a free list of N; each id remembers how many ring slots its chain took so
 * {@linkcode getUsed} can skip ahead. The constructor zeroes the ring and both event structures,
 * as the spec requires of a fresh queue.
 */
export class PackedDriverQueue<T> implements DriverQueue<T> {
  /** Where the ring and event structures are. */
  readonly layout: QueueLayout;
  readonly stats: QueueStats = newQueueStats();

  readonly #mem: GuestMemory;
  readonly #size: number;
  readonly #desc: number;
  readonly #driverEvent: number;
  readonly #deviceEvent: number;
  readonly #indirect: boolean;
  readonly #eventIdx: boolean;

  /** Next slot to fill, and the Driver Ring Wrap Counter. */
  #nextAvail = 0;
  #availWrap = true;
  /** Next slot to poll for a used descriptor, and the driver's copy of the device wrap counter. */
  #nextUsed = 0;
  #usedWrap = true;
  #freeSlots: number;
  /** Slots made available since the last kick. */
  #added = 0;

  readonly #freeIds: Uint16Array;
  #freeIdCount: number;
  readonly #idSlots: Uint16Array;
  readonly #idBusy: Uint8Array;
  readonly #tokens: (T | undefined)[];
  /** Whether we last asked for interrupts (mirrors the driver event structure). */
  #interrupts = true;

  /**
   * Initialises a packed ring in guest memory (driver side).
   *
   * @param mem guest RAM
   * @param layout where to put the ring (see {@linkcode packedRingLayout})
   * @param features negotiated INDIRECT_DESC and EVENT_IDX
   * @throws {RangeError} for a size outside 1..32768
   * @throws {GuestMemoryError} when the ring areas are not in RAM
   */
  constructor(mem: GuestMemory, layout: QueueLayout, features: QueueFeatures) {
    const size = layout.size;
    if (!Number.isInteger(size) || size < 1 || size > VIRTQ_MAX_SIZE) {
      throw new RangeError(`Packed queue size must be an integer from 1 to ${VIRTQ_MAX_SIZE}`);
    }
    this.layout = { size, desc: layout.desc, driver: layout.driver, device: layout.device };
    this.#mem = mem;
    this.#size = size;
    this.#desc = layout.desc;
    this.#driverEvent = layout.driver;
    this.#deviceEvent = layout.device;
    this.#indirect = features.indirect;
    this.#eventIdx = features.eventIdx;
    this.#freeSlots = size;
    this.#freeIds = new Uint16Array(size);
    // A stack popped from the end: ids come out 0, 1, 2, … on a fresh queue.
    for (let i = 0; i < size; i++) this.#freeIds[i] = size - 1 - i;
    this.#freeIdCount = size;
    this.#idSlots = new Uint16Array(size);
    this.#idBusy = new Uint8Array(size);
    this.#tokens = new Array<T | undefined>(size);
    mem.fill(layout.desc, DESC_SIZE * size);
    mem.fill(layout.driver, EVENT_SIZE);
    mem.fill(layout.device, EVENT_SIZE);
  }

  /** Free ring slots. */
  get free(): number {
    return this.#freeSlots;
  }

  /**
   * Offers a chain: `readable` buffers, then `writable` ones. With `indirectTable` (and INDIRECT_DESC
   * negotiated) the buffers go in a table of 16 bytes each at that guest address and the chain takes
   * one ring slot; otherwise one slot per buffer. The head descriptor's flags are written last, so
   * the device sees the whole chain at once or not at all. Does not notify: see {@linkcode kick}.
   *
   * @returns false when the ring has no room for the chain
   * @throws {RangeError} for an empty chain, or an address or length that is not a guest u64 / u32
   */
  add(
    readable: readonly DriverBuffer[],
    writable: readonly DriverBuffer[],
    token: T,
    indirectTable?: number,
  ): boolean {
    const n = readable.length + writable.length;
    if (n === 0) throw new RangeError("A chain needs at least one buffer");
    const useIndirect = indirectTable !== undefined && this.#indirect;
    const slots = useIndirect ? 1 : n;
    if (slots > this.#size) {
      throw new RangeError(`A chain of ${n} buffers cannot fit a ring of ${this.#size} slots`);
    }
    if (slots > this.#freeSlots || this.#freeIdCount === 0) return false;
    for (const b of readable) checkBuffer(b);
    for (const b of writable) checkBuffer(b);
    if (useIndirect && (!Number.isSafeInteger(indirectTable) || indirectTable < 0)) {
      throw new RangeError(`Indirect table address ${indirectTable} is not valid`);
    }

    const mem = this.#mem;
    const size = this.#size;
    const id = this.#freeIds[--this.#freeIdCount]!;
    const head = this.#nextAvail;
    // AVAIL = the driver wrap counter, USED = its inverse.
    let wrapBits = this.#availWrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
    let headFlags: number;

    if (useIndirect) {
      for (let k = 0; k < n; k++) {
        const w = k >= readable.length;
        const b = w ? writable[k - readable.length]! : readable[k]!;
        const at = indirectTable + k * DESC_SIZE;
        mem.setU64Number(at + DESC_ADDR, b.addr);
        mem.setU32(at + DESC_LEN, b.length);
        mem.setU16(at + DESC_ID, 0);
        mem.setU16(at + DESC_FLAGS, w ? VIRTQ_DESC_F_WRITE : 0);
      }
      const at = this.#desc + head * DESC_SIZE;
      mem.setU64Number(at + DESC_ADDR, indirectTable);
      mem.setU32(at + DESC_LEN, n * DESC_SIZE);
      mem.setU16(at + DESC_ID, id);
      headFlags = wrapBits | VIRTQ_DESC_F_INDIRECT;
    } else {
      headFlags = 0;
      let slot = head;
      for (let k = 0; k < n; k++) {
        const w = k >= readable.length;
        const b = w ? writable[k - readable.length]! : readable[k]!;
        const at = this.#desc + slot * DESC_SIZE;
        mem.setU64Number(at + DESC_ADDR, b.addr);
        mem.setU32(at + DESC_LEN, b.length);
        // The spec reads the id from the last descriptor, QEMU from the first: write it in all, as
        // Linux does.
        mem.setU16(at + DESC_ID, id);
        const flags = wrapBits | (k < n - 1 ? VIRTQ_DESC_F_NEXT : 0) | (w ? VIRTQ_DESC_F_WRITE : 0);
        if (k === 0) headFlags = flags;
        else mem.atomicSetU16(at + DESC_FLAGS, flags);
        if (++slot === size) {
          slot = 0;
          wrapBits ^= AVAIL_USED;
        }
      }
    }
    // Exposes the whole chain: the atomic store orders every write above before it.
    mem.atomicSetU16(this.#desc + head * DESC_SIZE + DESC_FLAGS, headFlags);

    let next = head + slots;
    if (next >= size) {
      next -= size;
      this.#availWrap = !this.#availWrap;
    }
    this.#nextAvail = next;
    this.#freeSlots -= slots;
    this.#added += slots;
    this.#idSlots[id] = slots;
    this.#idBusy[id] = 1;
    this.#tokens[id] = token;
    return true;
  }

  /**
   * Decides whether to notify the device of the chains added since the last kick, from the device
   * event structure (DISABLE, ENABLE, or DESC with its offset and wrap). Counts `kicks` or
   * `suppressedKicks`; returns false and counts nothing when nothing was added.
   */
  kick(): boolean {
    const added = this.#added;
    if (added === 0) return false;
    this.#added = 0;
    const mem = this.#mem;
    // New flags visible before we read the device's event structure (spec 2.8.21.2).
    mem.fence();
    const flags = mem.atomicU16(this.#deviceEvent + EVENT_FLAGS) & EVENT_FLAGS_MASK;
    const offWrap = mem.atomicU16(this.#deviceEvent + EVENT_OFF_WRAP);
    const wanted = eventWanted(
      flags,
      offWrap,
      this.#eventIdx,
      this.#size,
      this.#nextAvail,
      this.#availWrap,
      added,
    );
    if (wanted) this.stats.kicks++;
    else this.stats.suppressedKicks++;
    return wanted;
  }

  /**
   * The next completion, or `null`. Frees the chain's id and ring slots.
   *
   * @throws {RangeError} when the device returned an id that is not in flight (a device bug)
   */
  getUsed(): UsedElement<T> | null {
    const mem = this.#mem;
    const at = this.#desc + this.#nextUsed * DESC_SIZE;
    const flags = mem.atomicU16(at + DESC_FLAGS);
    if (!isUsed(flags, this.#usedWrap)) return null;
    const id = mem.u16(at + DESC_ID);
    if (id >= this.#size || this.#idBusy[id] !== 1) {
      throw new RangeError(`Device used buffer id ${id}, which is not in flight`);
    }
    const len = mem.u32(at + DESC_LEN);
    const slots = this.#idSlots[id]!;
    let next = this.#nextUsed + slots;
    if (next >= this.#size) {
      next -= this.#size;
      this.#usedWrap = !this.#usedWrap;
    }
    this.#nextUsed = next;
    this.#freeSlots += slots;
    this.#idBusy[id] = 0;
    this.#freeIds[this.#freeIdCount++] = id;
    const token = this.#tokens[id] as T;
    this.#tokens[id] = undefined;
    this.stats.chains++;
    // In DESC mode keep the event on the next completion we expect (Linux does so in get_buf).
    if (this.#interrupts && this.#eventIdx) this.#writeInterruptEvent();
    return { token, written: (flags & VIRTQ_DESC_F_WRITE) !== 0 ? len : 0 };
  }

  /** Asks the device not to interrupt (driver event flags = DISABLE). */
  disableInterrupts(): void {
    this.#interrupts = false;
    this.#mem.atomicSetU16(this.#driverEvent + EVENT_FLAGS, RING_EVENT_FLAGS_DISABLE);
  }

  /**
   * Asks for interrupts again — with EVENT_IDX for the next completion (DESC mode), else for all
   * (ENABLE) — then re-checks the ring.
   *
   * @returns true when a completion arrived meanwhile: poll again
   */
  enableInterrupts(): boolean {
    const mem = this.#mem;
    this.#interrupts = true;
    if (this.#eventIdx) {
      this.#writeInterruptEvent();
      mem.atomicSetU16(this.#driverEvent + EVENT_FLAGS, RING_EVENT_FLAGS_DESC);
    } else {
      mem.atomicSetU16(this.#driverEvent + EVENT_FLAGS, RING_EVENT_FLAGS_ENABLE);
    }
    mem.fence();
    const flags = mem.atomicU16(this.#desc + this.#nextUsed * DESC_SIZE + DESC_FLAGS);
    return isUsed(flags, this.#usedWrap);
  }

  #writeInterruptEvent(): void {
    this.#mem.atomicSetU16(
      this.#driverEvent + EVENT_OFF_WRAP,
      this.#nextUsed | (this.#usedWrap ? EVENT_WRAP : 0),
    );
  }
}

function checkBuffer(b: DriverBuffer): void {
  if (!Number.isSafeInteger(b.addr) || b.addr < 0) {
    throw new RangeError(`Buffer address ${b.addr} is not valid`);
  }
  if (!Number.isInteger(b.length) || b.length < 0 || b.length > U32_MAX) {
    throw new RangeError(`Buffer length ${b.length} is not a u32`);
  }
}
