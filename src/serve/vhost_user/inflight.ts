/**
 * vhost-user's inflight tracking for split rings (INFLIGHT_SHMFD; docs/interop/vhost-user.rst,
 * "Inflight I/O tracking"): a shared-memory region per queue, which the front-end keeps across a
 * back-end crash or restart, records which descriptor heads are in flight and in which order they
 * were taken. A back-end that starts a ring over a region in use resubmits exactly the heads that
 * never completed — nothing twice, nothing lost.
 *
 * Region layout (QueueRegionSplit, little-endian): features u64 @0, version u16 @8, desc_num u16
 * @10, last_batch_head u16 @12, used_idx u16 @14, then desc_num DescStateSplit of 16 bytes at
 * 16 + 16·i: inflight u8 @0, next u16 @6, counter u64 @8. Each queue's region is
 * {@linkcode inflightQueueBytes} long, as libvhost-user sizes it.
 *
 * @module
 */
import type { InflightLog } from "../../virtio/split_queue.ts";

/** The region version this back-end writes (and the one it understands). */
const INFLIGHT_VERSION = 1;
/** Each queue's region is aligned to a cache line. */
const INFLIGHT_ALIGNMENT = 64;
const HEADER = 16;
const DESC = 16;
const TWO_32 = 0x1_0000_0000;

/** Bytes of one queue's region for `queueSize` descriptors (libvhost-user's size). */
export function inflightQueueBytes(queueSize: number): number {
  return Math.ceil((DESC * queueSize + 2) / INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT;
}

/**
 * A view of one queue's region of the inflight area, which must hold `need` bytes.
 *
 * @throws {RangeError} when the region is too small for `queueSize` descriptors
 */
export function regionView(bytes: Uint8Array, need: number, queueSize: number): DataView {
  if (bytes.length < need) {
    throw new RangeError(
      `An inflight region of ${bytes.length} bytes is too small for ${queueSize} descriptors`,
    );
  }
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** What a ring resumes with after a crash. */
export interface Recovery {
  /** The avail index to read next: the chains in flight plus used.idx. */
  readonly lastAvail: number;
  /** Heads in flight when the old back-end stopped, oldest first. */
  readonly resubmit: readonly number[];
}

/** One queue's region: the split ring's {@linkcode InflightLog}, and its recovery at start. */
export class InflightRegion implements InflightLog {
  readonly #view: DataView;
  readonly #size: number;
  #counter = 0;
  /** Heads pushed since the last publish. */
  #batch: number[] = [];

  /**
   * @param bytes the queue's region (at least {@linkcode inflightQueueBytes} of `queueSize`)
   * @param queueSize descriptors of the ring
   * @throws {RangeError} when the region is too small
   */
  constructor(bytes: Uint8Array, queueSize: number) {
    this.#view = regionView(bytes, HEADER + DESC * queueSize, queueSize);
    this.#size = queueSize;
  }

  #desc(head: number): number {
    return HEADER + DESC * head;
  }

  popped(head: number): void {
    const v = this.#view, at = this.#desc(head);
    const counter = this.#counter++;
    v.setUint32(at + 8, counter % TWO_32, true);
    v.setUint32(at + 12, Math.floor(counter / TWO_32), true);
    v.setUint8(at, 1);
  }

  pushed(head: number): void {
    const v = this.#view;
    // The batch about to be published, as a list: recovery clears it when used.idx moved on.
    v.setUint16(this.#desc(head) + 6, v.getUint16(12, true), true);
    v.setUint16(12, head, true);
    this.#batch.push(head);
  }

  published(usedIdx: number): void {
    const v = this.#view;
    for (const head of this.#batch) v.setUint8(this.#desc(head), 0);
    this.#batch = [];
    v.setUint16(14, usedIdx, true);
  }

  /**
   * Takes over the region when a ring starts: a fresh one (version 0) is initialized and needs
   * nothing; one in use says what was in flight. `usedIdx` is the ring's used.idx now.
   *
   * @returns the recovery, or null for a fresh region
   */
  recover(usedIdx: number): Recovery | null {
    const v = this.#view;
    this.#batch = [];
    v.setUint16(10, this.#size, true);
    if (v.getUint16(8, true) === 0) {
      v.setUint16(8, INFLIGHT_VERSION, true);
      this.#counter = 0;
      return null;
    }
    // used.idx moved past what the region recorded: the last batch was published, but the old
    // back-end died before it cleared the batch's entries.
    const recorded = v.getUint16(14, true);
    if (recorded !== usedIdx) {
      // The batch's length is what used.idx moved by; its heads are a list from last_batch_head.
      const count = Math.min((usedIdx - recorded) & 0xffff, this.#size);
      let head = v.getUint16(12, true);
      for (let n = 0; n < count && head < this.#size; n++) {
        v.setUint8(this.#desc(head), 0);
        head = v.getUint16(this.#desc(head) + 6, true);
      }
      v.setUint16(14, usedIdx, true);
    }
    const inflight: Array<{ head: number; counter: number }> = [];
    for (let head = 0; head < this.#size; head++) {
      const at = this.#desc(head);
      if (v.getUint8(at) !== 1) continue;
      const counter = v.getUint32(at + 8, true) + v.getUint32(at + 12, true) * TWO_32;
      inflight.push({ head, counter });
    }
    inflight.sort((a, b) => a.counter - b.counter);
    this.#counter = inflight.length === 0 ? 0 : inflight[inflight.length - 1]!.counter + 1;
    return {
      lastAvail: (usedIdx + inflight.length) & 0xffff,
      resubmit: inflight.map((e) => e.head),
    };
  }
}
