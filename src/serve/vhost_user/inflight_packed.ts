/**
 * vhost-user's inflight tracking for packed rings, as docs/interop/vhost-user.rst lays it out
 * (QueueRegionPacked; libvhost-user has none): the front-end keeps the region across a back-end
 * crash, and the next back-end resubmits exactly the chains that never completed. A packed ring
 * cannot say that itself — used descriptors overwrite the slots of chains still in flight — so
 * the region keeps a copy of every chain's ring descriptors in entries taken from a free list.
 * It also tells where the ring stands, which QEMU cannot after a crash (it has no used index in
 * guest memory to restore a packed ring's position from).
 *
 * Region layout (little-endian): features u64 @0, version u16 @8, desc_num u16 @10, free_head u16
 * @12, old_free_head u16 @14, used_idx u16 @16, old_used_idx u16 @18, used_wrap_counter u8 @20,
 * old_used_wrap_counter u8 @21, then desc_num DescStatePacked of 32 bytes from 32: inflight u8
 * @0, next u16 @2, last u16 @4, num u16 @6, counter u64 @8, id u16 @16, flags u16 @18, len u32
 * @20, addr u64 @24. The `old_` fields are the last committed state; a crash in the middle of an
 * update rolls back to them, or forward when the driver may already have seen the update.
 *
 * @module
 */
import type { PackedDescriptor, PackedInflightLog } from "../../virtio/packed_queue.ts";
import { regionView } from "./inflight.ts";

const INFLIGHT_VERSION = 1;
const INFLIGHT_ALIGNMENT = 64;
const HEADER = 32;
const DESC = 32;
const TWO_32 = 0x1_0000_0000;
/** Ring descriptor flags: AVAIL (bit 7) and USED (bit 15). */
const AVAIL = 1 << 7;
const USED = 1 << 15;

// Header fields.
const VERSION = 8, DESC_NUM = 10, FREE_HEAD = 12, OLD_FREE_HEAD = 14;
const USED_IDX = 16, OLD_USED_IDX = 18, USED_WRAP = 20, OLD_USED_WRAP = 21;
// Entry fields.
const E_INFLIGHT = 0, E_NEXT = 2, E_LAST = 4, E_NUM = 6, E_COUNTER = 8;
const E_ID = 16, E_FLAGS = 18, E_LEN = 20, E_ADDR = 24;

/** Bytes of one packed queue's region for `queueSize` descriptors. */
export function inflightPackedQueueBytes(queueSize: number): number {
  return Math.ceil((HEADER + DESC * queueSize) / INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT;
}

/** What a packed ring resumes with after a crash. */
export interface PackedRecovery {
  /** The ring's position, in SET_VRING_BASE's packed encoding (avail | used << 16, wrap bits 15). */
  readonly state: number;
  /** Chains in flight when the old back-end stopped, oldest first, as their ring descriptors. */
  readonly resubmit: readonly (readonly PackedDescriptor[])[];
}

/** One packed queue's region: the ring's {@linkcode PackedInflightLog}, and recovery at start. */
export class PackedInflightRegion implements PackedInflightLog {
  readonly #view: DataView;
  readonly #size: number;
  #counter = 0;
  /** The head entry of each buffer id in flight. */
  readonly #headOf: Uint16Array;
  /** The batch between `publishing` and `published`. */
  readonly #batch: Uint16Array;
  #batchSize = 0;

  /**
   * @param bytes the queue's region (at least {@linkcode inflightPackedQueueBytes} of `queueSize`)
   * @param queueSize descriptors of the ring
   * @throws {RangeError} when the region is too small
   */
  constructor(bytes: Uint8Array, queueSize: number) {
    this.#view = regionView(bytes, HEADER + DESC * queueSize, queueSize);
    this.#size = queueSize;
    this.#headOf = new Uint16Array(queueSize);
    this.#batch = new Uint16Array(queueSize);
  }

  #u16(at: number): number {
    return this.#view.getUint16(at, true);
  }

  #set16(at: number, v: number): void {
    this.#view.setUint16(at, v, true);
  }

  #e(entry: number): number {
    return HEADER + DESC * entry;
  }

  popped(descs: readonly PackedDescriptor[]): void {
    const v = this.#view;
    const head = this.#u16(OLD_FREE_HEAD);
    let free = this.#u16(FREE_HEAD);
    // The queue never holds more slots than the ring has entries: the list cannot run out.
    if (head >= this.#size || free >= this.#size) return;
    const h = this.#e(head);
    v.setUint16(h + E_NUM, 0, true);
    const counter = this.#counter++;
    v.setUint32(h + E_COUNTER, counter % TWO_32, true);
    v.setUint32(h + E_COUNTER + 4, Math.floor(counter / TWO_32), true);
    v.setUint8(h + E_INFLIGHT, 1);
    for (let i = 0; i < descs.length && free < this.#size; i++) {
      const d = descs[i]!;
      if (i === descs.length - 1) v.setUint16(h + E_LAST, free, true);
      v.setUint16(h + E_NUM, v.getUint16(h + E_NUM, true) + 1, true);
      const at = this.#e(free);
      v.setUint16(at + E_ID, d.id, true);
      v.setUint16(at + E_FLAGS, d.flags, true);
      v.setUint32(at + E_LEN, d.len, true);
      v.setUint32(at + E_ADDR, d.addr % TWO_32, true);
      v.setUint32(at + E_ADDR + 4, Math.floor(d.addr / TWO_32), true);
      free = v.getUint16(at + E_NEXT, true);
      this.#set16(FREE_HEAD, free);
    }
    this.#set16(OLD_FREE_HEAD, free);
    this.#headOf[descs[descs.length - 1]!.id % this.#size] = head;
  }

  publishing(ids: Uint16Array, count: number, usedIdx: number, usedWrap: boolean): void {
    const v = this.#view;
    let free = this.#u16(FREE_HEAD);
    for (let i = 0; i < count; i++) {
      const head = this.#headOf[ids[i]! % this.#size]!;
      this.#batch[i] = head;
      // The chain's entries go back to the front of the free list.
      v.setUint16(this.#e(v.getUint16(this.#e(head) + E_LAST, true)) + E_NEXT, free, true);
      free = head;
    }
    this.#batchSize = count;
    this.#set16(FREE_HEAD, free);
    this.#set16(USED_IDX, usedIdx);
    v.setUint8(USED_WRAP, usedWrap ? 1 : 0);
  }

  published(): void {
    const v = this.#view;
    for (let i = 0; i < this.#batchSize; i++) v.setUint8(this.#e(this.#batch[i]!) + E_INFLIGHT, 0);
    this.#batchSize = 0;
    this.#set16(OLD_FREE_HEAD, this.#u16(FREE_HEAD));
    this.#set16(OLD_USED_IDX, this.#u16(USED_IDX));
    v.setUint8(OLD_USED_WRAP, v.getUint8(USED_WRAP));
  }

  /** A fresh region: every entry free, the ring at `state` (SET_VRING_BASE's encoding). */
  #init(state: number): void {
    const v = this.#view;
    for (let i = 0; i < this.#size; i++) {
      const at = this.#e(i);
      v.setUint8(at + E_INFLIGHT, 0);
      v.setUint16(at + E_NEXT, i + 1, true);
    }
    this.#set16(VERSION, INFLIGHT_VERSION);
    this.#set16(DESC_NUM, this.#size);
    this.#set16(FREE_HEAD, 0);
    this.#set16(OLD_FREE_HEAD, 0);
    const used = (state >>> 16) & 0x7fff, wrap = (state & 0x8000_0000) !== 0 ? 1 : 0;
    this.#set16(USED_IDX, used);
    this.#set16(OLD_USED_IDX, used);
    v.setUint8(USED_WRAP, wrap);
    v.setUint8(OLD_USED_WRAP, wrap);
    this.#counter = 0;
  }

  /**
   * Takes over the region when a ring starts. A fresh one (version 0) is set up at `state`, the
   * position the front-end gave, and needs nothing. One in use says where the ring stands and
   * what was in flight: an update cut short is rolled back, or committed when the driver may have
   * seen it (the first used descriptor it wrote is in the ring). `flagsAt(slot)` reads a ring
   * descriptor's flags.
   *
   * @returns the recovery, or null for a fresh region
   * @throws {RangeError} naming what is wrong with a region in use that cannot be right (the
   *   caller starts it afresh)
   */
  recover(state: number, flagsAt: (slot: number) => number): PackedRecovery | null {
    const v = this.#view, size = this.#size;
    this.#batchSize = 0;
    if (this.#u16(VERSION) === 0) {
      this.#init(state);
      return null;
    }
    try {
      return this.#recover(v, size, flagsAt);
    } catch (e) {
      this.#init(state);
      throw e;
    }
  }

  #recover(v: DataView, size: number, flagsAt: (slot: number) => number): PackedRecovery {
    if (this.#u16(DESC_NUM) !== size) {
      throw new RangeError(`it is for ${this.#u16(DESC_NUM)} descriptors, the ring has ${size}`);
    }
    const oldUsed = this.#u16(OLD_USED_IDX), oldWrap = v.getUint8(OLD_USED_WRAP) !== 0;
    if (oldUsed >= size) throw new RangeError(`its used index ${oldUsed} is past the ring`);
    if (this.#u16(USED_IDX) !== oldUsed || v.getUint8(USED_WRAP) !== v.getUint8(OLD_USED_WRAP)) {
      // A publish was cut short: committed if the batch's first used descriptor is in the ring.
      const flags = flagsAt(oldUsed) & (AVAIL | USED);
      if (flags === (oldWrap ? AVAIL | USED : 0)) {
        this.#set16(OLD_FREE_HEAD, this.#u16(FREE_HEAD));
        this.#set16(OLD_USED_IDX, this.#u16(USED_IDX));
        v.setUint8(OLD_USED_WRAP, v.getUint8(USED_WRAP));
      }
    }
    // Roll back whatever was in progress.
    const free = this.#u16(OLD_FREE_HEAD);
    const used = this.#u16(OLD_USED_IDX), usedWrap = v.getUint8(OLD_USED_WRAP) !== 0;
    if (used >= size) throw new RangeError(`its used index ${used} is past the ring`);
    this.#set16(FREE_HEAD, free);
    this.#set16(USED_IDX, used);
    v.setUint8(USED_WRAP, usedWrap ? 1 : 0);
    // Entries on the free list are not in flight (a pop cut short left its head there).
    const onFreeList = new Uint8Array(size);
    for (let e = free, n = 0; e < size; e = v.getUint16(this.#e(e) + E_NEXT, true)) {
      if (onFreeList[e] === 1 || ++n > size) throw new RangeError("its free list loops");
      onFreeList[e] = 1;
      v.setUint8(this.#e(e) + E_INFLIGHT, 0);
    }
    const heads: Array<{ head: number; counter: number }> = [];
    for (let e = 0; e < size; e++) {
      const at = this.#e(e);
      if (onFreeList[e] === 1 || v.getUint8(at + E_INFLIGHT) !== 1) continue;
      heads.push({
        head: e,
        counter: v.getUint32(at + E_COUNTER, true) + v.getUint32(at + E_COUNTER + 4, true) * TWO_32,
      });
    }
    heads.sort((a, b) => a.counter - b.counter);
    const resubmit: PackedDescriptor[][] = [];
    let held = 0;
    for (const { head } of heads) {
      const chain = this.#chain(v, head, size);
      held += chain.length;
      if (held > size) throw new RangeError(`more than ${size} ring slots are in flight`);
      this.#headOf[chain[chain.length - 1]!.id % size] = head;
      resubmit.push(chain);
    }
    this.#counter = heads.length === 0 ? 0 : heads[heads.length - 1]!.counter + 1;
    // The chains in flight hold the slots from the used position on: the ring's avail position
    // is past them.
    const end = used + held;
    const avail = end % size, availWrap = end >= size ? !usedWrap : usedWrap;
    const packed = (avail | (availWrap ? 0x8000 : 0)) +
      (used | (usedWrap ? 0x8000 : 0)) * 0x1_0000;
    return { state: packed >>> 0, resubmit };
  }

  /** The ring descriptors recorded for the chain whose head entry is `head`. */
  #chain(v: DataView, head: number, size: number): PackedDescriptor[] {
    const num = v.getUint16(this.#e(head) + E_NUM, true);
    if (num === 0 || num > size) throw new RangeError(`entry ${head} has a chain of ${num}`);
    const chain: PackedDescriptor[] = [];
    for (let e = head, i = 0; i < num; i++) {
      if (e >= size) throw new RangeError(`entry ${head}'s chain leaves the region`);
      const at = this.#e(e);
      chain.push({
        addr: v.getUint32(at + E_ADDR, true) + v.getUint32(at + E_ADDR + 4, true) * TWO_32,
        len: v.getUint32(at + E_LEN, true),
        flags: v.getUint16(at + E_FLAGS, true),
        id: v.getUint16(at + E_ID, true),
      });
      e = v.getUint16(at + E_NEXT, true);
    }
    return chain;
  }
}
