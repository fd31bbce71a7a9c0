/**
 * The driver side of a split virtqueue (virtio 1.2 §2.7), for simulated guests and tests: buffers
 * added as descriptor chains, avail.idx published by a kick, completions reaped from the used ring.
 *
 * @module
 */

import type { GuestMemory } from "./memory.ts";
import {
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_USED_F_NO_NOTIFY,
  vringNeedEvent,
} from "./features.ts";
import { newQueueStats } from "./queue.ts";
import type {
  DriverBuffer,
  DriverQueue,
  QueueFeatures,
  QueueLayout,
  QueueStats,
  UsedElement,
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
