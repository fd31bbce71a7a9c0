/**
 * The iothread half of virtio-blk (virtio 1.2 §5.2): the back-end that turns popped chains into
 * block I/O over a {@linkcode BlockNode}, with QEMU's validation, request merging and cache-mode
 * rules (`hw/block/virtio-blk.c`), and `createBackend`, the factory the machine's iothread calls.
 * This module imports nothing the Worker does not need (no zod, no model).
 *
 * @module
 */

import type { BlockNode, WriteOptions, WriteZeroesOptions } from "../block/node.ts";
import { BlockError } from "../errors.ts";
import { errorDecision, stopReason } from "./error_policy.ts";
import { hasFeature } from "../virtio/features.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import {
  type DescriptorChain,
  type DeviceQueue,
  ringFault,
  VirtqueueError,
} from "../virtio/queue.ts";
import type { BackendHooks, DeviceBackend } from "./backend.ts";
import {
  BlkQueue,
  dataView,
  gather,
  le32,
  newStats,
  scatter,
  slotAt,
  type VirtioBlkStats,
} from "./virtio_blk_queue.ts";
import {
  BDRV_REQUEST_MAX_SECTORS,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_MAX_MERGE_REQS,
  VIRTIO_BLK_OUTHDR_SIZE,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_SECTOR_SIZE,
  VIRTIO_BLK_SEGMENT_SIZE,
  VIRTIO_BLK_T_BARRIER,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from "../virtio/virtio_blk_constants.ts";
import {
  capacitySectors,
  type ResolvedVirtioBlkOptions,
  resolveVirtioBlkOptions,
  type VirtioBlkOptions,
  virtioBlkOptionsFromSpec,
  VirtioBlkShared,
} from "./virtio_blk_options.ts";
import type { BackendInit, BackendReady } from "./device_type.ts";

const TWO_32 = 0x1_0000_0000;
/** The largest used.len: a u32. */
const MAX_USED_LEN = 0xffff_ffff;
/** Sector high words from here up put the sector at or past 2^53: beyond any capacity. */
const SECTOR_HI_LIMIT = 0x20_0000;
/**
 * How many microtask turns a drain waits for the requests it started before it publishes: enough
 * for a node that completes at once (a page-cached file) to have its completions in the drain's
 * batch; requests still in flight after them complete later, published on their own.
 */
const SETTLE_TURNS = 8;

// Options objects handed to the node: frozen and shared, so no request allocates one.
const FUA: WriteOptions = Object.freeze({ fua: true });
const ZERO_OPTIONS: readonly WriteZeroesOptions[] = [
  Object.freeze({}),
  Object.freeze({ unmap: true }),
  Object.freeze({ fua: true }),
  Object.freeze({ unmap: true, fua: true }),
];

/** Not a status: the request is held (the device stopped on it). */
const HELD = -1;

export type { VirtioBlkStats } from "./virtio_blk_queue.ts";

/**
 * The virtio-blk back-end: pops requests, validates them as QEMU does, does the I/O straight
 * between guest-memory views and the node, and completes them in batches.
 *
 * Per request: bad framing (no 16-byte device-readable header, no device-writable status byte, a
 * discard/write-zeroes request without a whole segment) is a device error — a
 * {@linkcode VirtqueueError} with fault `bad-request` thrown from {@linkcode processQueue}, after
 * which the device stays stopped until {@linkcode reset} (QEMU's `virtio_error`). Everything else
 * becomes a status byte: out of range, misaligned or oversize → IOERR; writes, discards and write
 * zeroes to a read-only device → IOERR with nothing written; unknown type, unknown segment flags,
 * too many segments → UNSUPP; a node error → IOERR. used.len is the chain's whole writable length
 * (QEMU's `in_len`: data + status for reads, 1 for a status-only writable part).
 *
 * Batching (QEMU's virtio_blk_handle_vq and virtio_blk_submit_multireq): reads and writes popped
 * in one drain collect in a merge buffer of up to 32, flushed when the direction changes, when it
 * is full, before a flush/discard/write-zeroes, and at the end of the drain; there they are sorted
 * by sector and runs of adjacent ones (≤ maxMergeBytes) go to the node as one request — as one
 * view when their pieces are back to back in guest RAM, else through a per-queue bounce buffer.
 * Completions of a drain are published together, with one interrupt decision.
 *
 * Cache mode: writeback unless the driver cleared `writeback` (or negotiated neither CONFIG_WCE
 * nor FLUSH); in writethrough every write and write-zeroes carries FUA, and a write made of
 * several node calls is followed by a flush.
 *
 * @example
 * ```ts
 * import { VirtioBlkBackend } from "./virtio_blk_backend.ts";
 * import { VirtioBlkModel } from "./virtio_blk_model.ts";
 * import { MemoryFile } from "../host/memory.ts";
 * import { RawNode } from "../../formats/raw.ts";
 *
 * const node = await RawNode.open(new MemoryFile("disk", new Uint8Array(1 << 20)));
 * const model = new VirtioBlkModel({ serial: "disk0" }, node);
 * const backend = new VirtioBlkBackend(node, model.options, model.shared);
 * // At DRIVER_OK: backend.activate(mem, features, deviceQueues); on each kick:
 * // await backend.processQueue(q, () => irq.notifyQueue(q));
 * await backend.close();
 * await node.close();
 * ```
 */
export class VirtioBlkBackend implements DeviceBackend {
  /** Counters over all queues. */
  readonly stats: VirtioBlkStats = newStats();
  /** The resolved options the back-end runs with. */
  readonly options: ResolvedVirtioBlkOptions;
  readonly #node: BlockNode;
  readonly #shared: VirtioBlkShared;
  readonly #readOnly: boolean;
  readonly #blockSize: number;
  /** Logical block size in sectors − 1: a request's sector must be a multiple (QEMU's sector_mask). */
  readonly #sectorMask: number;
  readonly #serial: Uint8Array;
  #queues: (BlkQueue | undefined)[] = [];
  #discard = false;
  #writeZeroes = false;
  /** A driver broke the framing or ring rules: nothing more until reset (QEMU's vdev->broken). */
  #broken = false;
  // Read once per drain: the cache mode and the disk's size in sectors.
  #writeback = true;
  #totalSectors = 0;
  /** Why the device stopped (a failed request under `stop`/`enospc`), until reset. */
  #stopReason: string | null = null;
  /** The requests held since the stop: never completed (QEMU would retry them on `cont`). */
  #held: DescriptorChain[] = [];
  /** The last error a node threw (it became IOERR), for diagnostics. */
  lastError: unknown = undefined;
  /** Set by the iothread: `stop` tells the VMM why the device stopped. */
  hooks: BackendHooks | null = null;
  #inflight = 0;
  #idle: (() => void)[] = [];

  /**
   * Builds the back-end over `node`; it serves no queue until {@linkcode activate}.
   *
   * @param node the disk; the caller keeps ownership (the back-end never closes it)
   * @param options the same options the model was built with
   * @param shared the model's shared state (`model.shared`, or `new VirtioBlkShared(buffer)` in
   *   another Worker); a private one (writeback per the options) when absent
   * @throws {RangeError} for bad options
   */
  constructor(node: BlockNode, options: VirtioBlkOptions = {}, shared?: VirtioBlkShared) {
    const o = resolveVirtioBlkOptions(options);
    this.options = o;
    this.#node = node;
    if (shared === undefined) {
      shared = new VirtioBlkShared();
      shared.writeback = o.writeback;
      shared.capacity = capacitySectors(node.size);
    }
    this.#shared = shared;
    this.#readOnly = o.readOnly || node.readOnly;
    this.#blockSize = o.logicalBlockSize;
    this.#sectorMask = o.logicalBlockSize / VIRTIO_BLK_SECTOR_SIZE - 1;
    this.#serial = new TextEncoder().encode(o.serial);
  }

  /**
   * Why the device stopped taking requests — `io error on drive d0 (write): No space left on
   * device` — after a failed request under `werror`/`rerror` `stop` (or `enospc` on ENOSPC), until
   * {@linkcode reset}; else null. The failed request and any failing after it are held, never
   * completed, so the guest sees no acknowledgement of data that did not reach the image.
   */
  get stopReason(): string | null {
    return this.#stopReason;
  }

  /** Requests held since the stop (not completed). */
  get held(): number {
    return this.#held.length;
  }

  /** True after a device error, until {@linkcode reset}: the driver must reset the device. */
  get broken(): boolean {
    return this.#broken;
  }

  /**
   * DRIVER_OK: serve `queues` (index = queue number; `undefined` for a queue not enabled) with the
   * negotiated `features`. Forgets any earlier activation.
   */
  activate(
    _mem: GuestMemory,
    features: bigint,
    queues: ReadonlyArray<DeviceQueue | undefined>,
  ): void {
    this.reset();
    // A request type the driver did not negotiate is one the device does not support for it.
    this.#discard = this.options.discard && hasFeature(features, VIRTIO_BLK_F_DISCARD);
    this.#writeZeroes = this.options.writeZeroes && hasFeature(features, VIRTIO_BLK_F_WRITE_ZEROES);
    const maxSegments = Math.max(this.options.maxDiscardSeg, this.options.maxWriteZeroesSeg);
    const count = Math.min(queues.length, this.options.numQueues);
    const states: (BlkQueue | undefined)[] = [];
    for (let i = 0; i < count; i++) {
      const q = queues[i];
      states.push(q === undefined ? undefined : new BlkQueue(q, maxSegments));
    }
    this.#queues = states;
  }

  /**
   * Drains queue `index`: `do { disable notifications; pop and handle every chain; submit the
   * merge buffer; publish, interrupting if the driver wants it } while (re-enabling finds more)`.
   * Returns at once for an unknown or inactive queue, a broken device, or a drain already running
   * on this queue (its final re-check picks up what the kick announced).
   *
   * @throws {VirtqueueError} when the driver broke the ring or the request framing; the device is
   *   then broken until {@linkcode reset} and the caller must set DEVICE_NEEDS_RESET
   */
  async processQueue(index: number, interrupt: () => void): Promise<void> {
    const q = this.#queues[index];
    if (q === undefined || q.running || this.#broken || this.#stopReason !== null) return;
    q.running = true;
    q.interrupt = interrupt;
    const queue = q.queue;
    try {
      do {
        queue.disableNotifications();
        this.#writeback = this.#shared.writeback;
        this.#totalSectors = capacitySectors(this.#node.size);
        // A stopped device takes no new request; what it popped already still runs.
        for (
          let chain = queue.pop();
          chain !== null;
          chain = this.#stopReason === null ? queue.pop() : null
        ) {
          const pending = this.#handle(q, chain);
          if (pending !== null) {
            await pending;
            if (q.dead) return;
          }
        }
        if (q.mrbCount > 0) this.#submit(q);
        // Requests that complete at once join this batch; the rest complete on their own.
        for (let turn = 0; turn < SETTLE_TURNS && q.inflight > 0; turn++) await null;
        if (q.dead) return;
        if (queue.publish()) interrupt();
      } while (this.#stopReason === null && queue.enableNotifications());
    } catch (e) {
      // A GuestMemoryError is a ring fault too (outside-ram), whoever let it through.
      if (ringFault(e, index) !== null) {
        this.#broken = true;
        // As QEMU, what was already merged is still submitted; its completions go nowhere.
        if (!q.dead && q.mrbCount > 0) this.#submit(q);
      }
      throw e;
    } finally {
      q.running = false;
    }
  }

  /** Device reset: forget the queues and the merge buffers; I/O under way completes into nothing. */
  reset(): void {
    for (const q of this.#queues) {
      if (q === undefined) continue;
      q.dead = true;
      q.mrbCount = 0;
      q.mrbChains.fill(null);
    }
    this.#queues = [];
    this.#broken = false;
    this.#stopReason = null;
    this.#held = [];
  }

  /**
   * Node requests started and not yet completed, over all queues (including those of queues a
   * reset dropped): while there are any, the runtime must keep the event loop turning.
   */
  get inflight(): number {
    return this.#inflight;
  }

  /** Resolves when no node request is in flight. */
  drained(): Promise<void> {
    if (this.#inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idle.push(resolve));
  }

  #began(q: BlkQueue): void {
    q.inflight++;
    this.#inflight++;
  }

  /** A node request of `q` is over (its chains completed or held). */
  #ended(q: BlkQueue): void {
    q.inflight--;
    if (!q.running && !q.dead && !q.publishScheduled) {
      // Outside a drain: publish once, after the other completions of the same reap (their
      // callbacks are queued ahead of this one), and before whoever waits for `drained`.
      q.publishScheduled = true;
      queueMicrotask(() => {
        q.publishScheduled = false;
        // A broken device publishes nothing more (QEMU: vdev->broken).
        if (q.running || q.dead || this.#broken) return;
        if (q.queue.publish()) q.interrupt?.();
      });
    }
    if (--this.#inflight === 0 && this.#idle.length > 0) {
      const idle = this.#idle;
      this.#idle = [];
      for (const resolve of idle) resolve();
    }
  }

  /**
   * Resets and flushes the node. The node stays open: whoever opened it closes it (the machine's
   * iothread closes its drives after this; a caller that built the back-end itself does so too).
   */
  async close(): Promise<void> {
    this.reset();
    await this.drained();
    await this.#node.flush();
  }

  /**
   * Resizes the disk to `size` bytes and publishes the new capacity in the shared state. The VMM
   * must then call `model.setCapacity(size)` so the driver gets a config change notification.
   *
   * @throws {BlockError} `unsupported` when the node cannot be resized, or the node's error
   */
  async resize(size: number): Promise<void> {
    if (this.#node.truncate === undefined) {
      throw new BlockError("unsupported", "The disk cannot be resized", {
        path: this.#node.filename,
      });
    }
    await this.#node.truncate(size);
    this.#shared.capacity = capacitySectors(this.#node.size);
  }

  // ---- Requests ---------------------------------------------------------------------------------

  /**
   * Parses and dispatches one chain. Returns null when the request was completed or queued for
   * merging without I/O, else the promise of the I/O it started.
   */
  #handle(q: BlkQueue, chain: DescriptorChain): Promise<void> | null {
    const readable = chain.readable;
    // QEMU's virtio_blk_handle_request: framing faults are device errors, not statuses.
    if (chain.writable.length === 0) {
      throw this.#framingError(q, "virtio-blk request has no device-writable status byte");
    }
    if (chain.readableLength < VIRTIO_BLK_OUTHDR_SIZE) {
      throw this.#framingError(q, "virtio-blk request header is shorter than 16 bytes");
    }
    let header = readable[0]!;
    if (header.length < VIRTIO_BLK_OUTHDR_SIZE) {
      gather(readable, 0, q.scratch, 0, VIRTIO_BLK_OUTHDR_SIZE);
      header = q.scratch;
    }
    const type = le32(header, 0);
    // VIRTIO_BLK_T_OUT gives the direction and the legacy BARRIER flag is ignored (QEMU).
    switch ((type & ~(VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_BARRIER)) >>> 0) {
      case VIRTIO_BLK_T_IN:
        return this.#readWrite(q, chain, (type & VIRTIO_BLK_T_OUT) !== 0, header);
      case VIRTIO_BLK_T_FLUSH:
        return this.#flush(q, chain);
      case VIRTIO_BLK_T_GET_ID:
        this.#getId(chain);
        this.stats.getIds++;
        this.#complete(q, chain, VIRTIO_BLK_S_OK);
        return null;
      // DISCARD and WRITE_ZEROES carry the OUT bit; masked, DISCARD is GET_LIFETIME's number, which
      // lacks OUT and is therefore answered UNSUPP below (QEMU does the same).
      case VIRTIO_BLK_T_DISCARD & ~VIRTIO_BLK_T_OUT:
      case VIRTIO_BLK_T_WRITE_ZEROES & ~VIRTIO_BLK_T_OUT:
        return this.#discardOrZeroes(q, chain, type);
      default:
        this.#complete(q, chain, VIRTIO_BLK_S_UNSUPP);
        return null;
    }
  }

  #framingError(q: BlkQueue, detail: string): VirtqueueError {
    return new VirtqueueError("bad-request", q.queue.index, detail);
  }

  /**
   * QEMU's virtio_blk_sect_range_ok: at most BDRV_REQUEST_MAX_SECTORS, the sector a multiple of the
   * logical block, the length a multiple of it, and the range inside the disk. `lo`/`hi` are the
   * guest's u64 sector as two words.
   */
  #rangeOk(lo: number, hi: number, bytes: number): boolean {
    const sectors = Math.floor(bytes / VIRTIO_BLK_SECTOR_SIZE);
    if (sectors > BDRV_REQUEST_MAX_SECTORS) return false;
    if ((lo & this.#sectorMask) !== 0 || bytes % this.#blockSize !== 0) return false;
    if (hi >= SECTOR_HI_LIMIT) return false;
    const sector = hi * TWO_32 + lo;
    const total = this.#totalSectors;
    return sector <= total && sectors <= total - sector;
  }

  #readWrite(
    q: BlkQueue,
    chain: DescriptorChain,
    isWrite: boolean,
    header: Uint8Array,
  ): Promise<void> | null {
    if (isWrite) this.stats.writes++;
    else this.stats.reads++;
    const bytes = isWrite
      ? chain.readableLength - VIRTIO_BLK_OUTHDR_SIZE
      : chain.writableLength - 1;
    const lo = le32(header, 8);
    const hi = le32(header, 12);
    // Spec 5.2.6.2: a read-only device fails writes and writes nothing.
    if (!this.#rangeOk(lo, hi, bytes) || (isWrite && this.#readOnly)) {
      this.#complete(q, chain, VIRTIO_BLK_S_IOERR);
      return null;
    }
    const sector = hi * TWO_32 + lo;
    // QEMU submits the merge buffer when it is full, the direction changes, or merging is off.
    if (
      q.mrbCount > 0 &&
      (q.mrbCount === VIRTIO_BLK_MAX_MERGE_REQS || isWrite !== q.mrbWrite ||
        !this.options.requestMerging)
    ) {
      this.#submit(q);
    }
    this.#queueForMerge(q, chain, isWrite, sector, bytes);
    return null;
  }

  #queueForMerge(
    q: BlkQueue,
    chain: DescriptorChain,
    isWrite: boolean,
    sector: number,
    bytes: number,
  ): void {
    const slot = q.mrbCount++;
    q.mrbChains[slot] = chain;
    q.mrbSector[slot] = sector;
    q.mrbBytes[slot] = bytes;
    q.mrbWrite = isWrite;
  }

  /**
   * Submits the merge buffer: sorted by sector (insertion sort: at most 32), runs of adjacent
   * requests within maxMergeBytes go to the node as one request. Every run is started at once and
   * completes on its own (a node with requests in flight, such as io_uring, serves them
   * together); the merge buffer is free again when this returns. Never throws for I/O errors.
   */
  #submit(q: BlkQueue): void {
    const n = q.mrbCount;
    if (n === 0) return;
    const isWrite = q.mrbWrite;
    const order = q.order;
    const sectors = q.mrbSector;
    const sizes = q.mrbBytes;
    for (let i = 0; i < n; i++) {
      let j = i;
      const sector = sectors[i]!;
      // Stable: requests at the same sector keep their submission order.
      while (j > 0 && sectors[order[j - 1]!]! > sector) {
        order[j] = order[j - 1]!;
        j--;
      }
      order[j] = i;
    }
    const merging = this.options.requestMerging;
    const limit = this.options.maxMergeBytes;
    let start = 0;
    while (start < n) {
      const first = order[start]!;
      let total = sizes[first]!;
      let next = sectors[first]! + total / VIRTIO_BLK_SECTOR_SIZE;
      let end = start + 1;
      if (merging) {
        for (; end < n; end++) {
          const k = order[end]!;
          const size = sizes[k]!;
          if (sectors[k] !== next || total + size > limit) break;
          total += size;
          next += size / VIRTIO_BLK_SECTOR_SIZE;
        }
      }
      const slot = slotAt(q, start);
      const chain = q.mrbChains[slot]!;
      const offset = q.mrbSector[slot]! * VIRTIO_BLK_SECTOR_SIZE;
      const view = end - start === 1 ? dataView(chain, isWrite, total) : null;
      if (view !== null) {
        // The common case (Linux's layout: header, one data buffer, status) without the layers.
        this.#startOne(q, chain, offset, view, isWrite);
      } else {
        const chains: DescriptorChain[] = [];
        const lengths: number[] = [];
        for (let k = start; k < end; k++) {
          const at = slotAt(q, k);
          chains.push(q.mrbChains[at]!);
          lengths.push(q.mrbBytes[at]!);
        }
        this.#began(q);
        this.#run(q, chains, lengths, offset, total, isWrite).finally(() => this.#ended(q));
      }
      start = end;
    }
    q.mrbCount = 0;
    q.mrbChains.fill(null, 0, n);
  }

  /** One request whose data is one guest view: straight to the node, completed when it is done. */
  #startOne(
    q: BlkQueue,
    chain: DescriptorChain,
    offset: number,
    view: Uint8Array,
    isWrite: boolean,
  ): void {
    const node = this.#node;
    let io: Promise<void>;
    try {
      io = isWrite
        ? node.write(offset, view, this.#writeback ? undefined : FUA)
        : node.read(offset, view);
    } catch (e) {
      io = Promise.reject(e);
    }
    this.#began(q);
    io.then(
      () => this.#finishOne(q, chain, VIRTIO_BLK_S_OK),
      (e) => this.#finishOne(q, chain, this.#failed(e, isWrite)),
    );
  }

  #finishOne(q: BlkQueue, chain: DescriptorChain, status: number): void {
    if (!q.dead) this.#completeOrHold(q, chain, status);
    this.#ended(q);
  }

  /** One node request for a merged run of `chains` (or one chain in pieces), then completions. */
  async #run(
    q: BlkQueue,
    chains: readonly DescriptorChain[],
    lengths: readonly number[],
    offset: number,
    total: number,
    isWrite: boolean,
  ): Promise<void> {
    let status = VIRTIO_BLK_S_OK;
    try {
      if (chains.length === 1) {
        await this.#transfer(chains[0]!, isWrite, offset, total);
      } else {
        this.stats.merges++;
        this.stats.mergedRequests += chains.length;
        await this.#transferMerged(q, chains, lengths, offset, total, isWrite);
      }
    } catch (e) {
      status = this.#failed(e, isWrite);
    }
    if (q.dead) return;
    for (const chain of chains) this.#completeOrHold(q, chain, status);
  }

  /**
   * One request's data, piece by piece, straight between its guest views and the node. Writes
   * skip the 16-byte header; reads stop before the status byte.
   */
  async #transfer(chain: DescriptorChain, isWrite: boolean, offset: number, bytes: number) {
    const node = this.#node;
    const views = isWrite ? chain.readable : chain.writable;
    const writethrough = !this.#writeback;
    let skip = isWrite ? VIRTIO_BLK_OUTHDR_SIZE : 0;
    let pos = 0;
    let pieces = 0;
    for (let i = 0; pos < bytes; i++) {
      const v = views[i]!; // the lengths were summed from these views, so they cover `bytes`
      if (skip >= v.length) {
        skip -= v.length;
        continue;
      }
      const n = Math.min(v.length - skip, bytes - pos);
      const piece = skip === 0 && n === v.length ? v : v.subarray(skip, skip + n);
      skip = 0;
      if (isWrite) {
        // A write in one piece carries FUA itself; one in several is flushed once at the end.
        const fua = writethrough && pieces === 0 && pos + n === bytes;
        await node.write(offset + pos, piece, fua ? FUA : undefined);
      } else {
        await node.read(offset + pos, piece);
      }
      pieces++;
      pos += n;
    }
    if (isWrite && writethrough && pieces > 1) await node.flush();
  }

  /**
   * A merged run: one view when its pieces are back to back in guest RAM, else a bounce buffer
   * (the queue's own, or one of its own while that one serves another run in flight).
   */
  async #transferMerged(
    q: BlkQueue,
    chains: readonly DescriptorChain[],
    lengths: readonly number[],
    offset: number,
    total: number,
    isWrite: boolean,
  ): Promise<void> {
    const node = this.#node;
    const fua = isWrite && !this.#writeback ? FUA : undefined;
    const skip = isWrite ? VIRTIO_BLK_OUTHDR_SIZE : 0;
    q.spanBuffer = null;
    let contiguous = true;
    for (let k = 0; k < chains.length && contiguous; k++) {
      const chain = chains[k]!;
      contiguous = this.#extendSpan(
        q,
        isWrite ? chain.readable : chain.writable,
        skip,
        lengths[k]!,
      );
    }
    if (contiguous && q.spanBuffer !== null) {
      const view = new Uint8Array(q.spanBuffer, q.spanStart, total);
      q.spanBuffer = null;
      if (isWrite) await node.write(offset, view, fua);
      else await node.read(offset, view);
      return;
    }
    q.spanBuffer = null;
    const own = !q.bounceBusy;
    let buf: Uint8Array;
    if (own) {
      if (q.bounce.length < total) q.bounce = new Uint8Array(this.options.maxMergeBytes);
      buf = q.bounce.subarray(0, total);
      q.bounceBusy = true;
    } else {
      buf = new Uint8Array(total);
    }
    try {
      if (isWrite) {
        let at = 0;
        for (let k = 0; k < chains.length; k++) {
          gather(chains[k]!.readable, skip, buf, at, lengths[k]!);
          at += lengths[k]!;
        }
        await node.write(offset, buf, fua);
      } else {
        await node.read(offset, buf);
        if (q.dead) return;
        let at = 0;
        for (let k = 0; k < chains.length; k++) {
          scatter(chains[k]!.writable, 0, buf, at, lengths[k]!);
          at += lengths[k]!;
        }
      }
    } finally {
      if (own) q.bounceBusy = false;
    }
  }

  /** Extends the queue's span with a request's data pieces; false when one does not follow on. */
  #extendSpan(q: BlkQueue, views: readonly Uint8Array[], from: number, length: number): boolean {
    for (let i = 0; i < views.length && length > 0; i++) {
      const v = views[i]!;
      if (from >= v.length) {
        from -= v.length;
        continue;
      }
      const n = Math.min(v.length - from, length);
      const begin = v.byteOffset + from;
      if (q.spanBuffer === null) {
        q.spanBuffer = v.buffer;
        q.spanStart = begin;
        q.spanEnd = begin;
      }
      if (v.buffer !== q.spanBuffer || begin !== q.spanEnd) return false;
      q.spanEnd += n;
      length -= n;
      from = 0;
    }
    return true;
  }

  /**
   * VIRTIO_BLK_T_FLUSH: pending merged writes go first (QEMU), every request in flight completes,
   * then the node's flush.
   */
  async #flush(q: BlkQueue, chain: DescriptorChain): Promise<void> {
    this.stats.flushes++;
    if (q.mrbCount > 0 && q.mrbWrite) this.#submit(q);
    // Every write in flight (from any queue) is complete before the node syncs.
    await this.drained();
    if (q.dead) return;
    let status = VIRTIO_BLK_S_OK;
    try {
      await this.#node.flush();
    } catch (e) {
      // QEMU takes a failed flush for a failed write (werror).
      status = this.#failed(e, true);
    }
    if (!q.dead) this.#completeOrHold(q, chain, status);
  }

  /**
   * VIRTIO_BLK_T_GET_ID: the serial, NUL-padded to 20 bytes (no NUL when exactly 20), into the data
   * buffer — at most as much as it holds (QEMU copies MIN(strlen + 1, buffer, 20) bytes).
   */
  #getId(chain: DescriptorChain): void {
    const writable = chain.writable;
    const room = Math.min(chain.writableLength - 1, VIRTIO_BLK_ID_BYTES);
    const serial = this.#serial;
    let at = 0;
    for (let i = 0; i < writable.length && at < room; i++) {
      const v = writable[i]!;
      for (let j = 0; j < v.length && at < room; j++, at++) {
        v[j] = at < serial.length ? serial[at]! : 0;
      }
    }
  }

  /**
   * DISCARD and WRITE_ZEROES (QEMU's virtio_blk_handle_discard_write_zeroes, generalised to more
   * than one segment): every segment is checked before any I/O; per segment, more sectors than the
   * maximum or outside the disk → IOERR, unknown flags or UNMAP on a discard → UNSUPP.
   */
  #discardOrZeroes(q: BlkQueue, chain: DescriptorChain, type: number): Promise<void> | null {
    const isZeroes = ((type & ~VIRTIO_BLK_T_BARRIER) >>> 0) === VIRTIO_BLK_T_WRITE_ZEROES;
    if (isZeroes) this.stats.writeZeroes++;
    else this.stats.discards++;
    const supported = isZeroes ? this.#writeZeroes : this.#discard;
    if ((type & VIRTIO_BLK_T_OUT) === 0 || !supported) {
      this.#complete(q, chain, VIRTIO_BLK_S_UNSUPP);
      return null;
    }
    const dataBytes = chain.readableLength - VIRTIO_BLK_OUTHDR_SIZE;
    if (dataBytes < VIRTIO_BLK_SEGMENT_SIZE) {
      throw this.#framingError(q, "virtio-blk discard/write zeroes header too short");
    }
    const maxSegments = isZeroes ? this.options.maxWriteZeroesSeg : this.options.maxDiscardSeg;
    const segments = dataBytes / VIRTIO_BLK_SEGMENT_SIZE;
    // QEMU answers UNSUPP for more than its one segment; a partial segment is no better.
    if (!Number.isInteger(segments) || segments > maxSegments) {
      this.#complete(q, chain, VIRTIO_BLK_S_UNSUPP);
      return null;
    }
    // One copy, so the driver cannot change a segment between its check and its use.
    gather(chain.readable, VIRTIO_BLK_OUTHDR_SIZE, q.scratch, 0, dataBytes);
    const seg = q.scratch;
    const maxSectors = isZeroes
      ? this.options.maxWriteZeroesSectors
      : this.options.maxDiscardSectors;
    let status = VIRTIO_BLK_S_OK;
    for (let i = 0, at = 0; i < segments && status === VIRTIO_BLK_S_OK; i++, at += 16) {
      const sectors = le32(seg, at + 8);
      const flags = le32(seg, at + 12);
      if (
        sectors > maxSectors ||
        !this.#rangeOk(le32(seg, at), le32(seg, at + 4), sectors * VIRTIO_BLK_SECTOR_SIZE)
      ) {
        status = VIRTIO_BLK_S_IOERR;
      } else if (
        (flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0 ||
        (!isZeroes && (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0)
      ) {
        status = VIRTIO_BLK_S_UNSUPP;
      }
    }
    if (status === VIRTIO_BLK_S_OK && this.#readOnly) status = VIRTIO_BLK_S_IOERR;
    if (status !== VIRTIO_BLK_S_OK) {
      this.#complete(q, chain, status);
      return null;
    }
    return this.#discardOrZeroesIo(q, chain, isZeroes, segments);
  }

  async #discardOrZeroesIo(
    q: BlkQueue,
    chain: DescriptorChain,
    isZeroes: boolean,
    segments: number,
  ): Promise<void> {
    // Reads and writes popped before stay ahead of this request.
    if (q.mrbCount > 0) this.#submit(q);
    await this.drained();
    if (q.dead) return;
    const node = this.#node;
    const seg = q.scratch;
    const fua = this.#writeback ? 0 : 2;
    let status = VIRTIO_BLK_S_OK;
    try {
      for (let i = 0, at = 0; i < segments; i++, at += 16) {
        const offset = (le32(seg, at + 4) * TWO_32 + le32(seg, at)) * VIRTIO_BLK_SECTOR_SIZE;
        const length = le32(seg, at + 8) * VIRTIO_BLK_SECTOR_SIZE;
        if (length === 0) continue;
        if (isZeroes) {
          const unmap = le32(seg, at + 12) & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
          await node.writeZeroes(offset, length, ZERO_OPTIONS[unmap | fua]);
        } else {
          await node.discard(offset, length);
        }
      }
    } catch (e) {
      status = this.#failed(e, true);
    }
    if (!q.dead) this.#completeOrHold(q, chain, status);
  }

  /**
   * The status of a request the node failed, under the drive's policy (QEMU's
   * virtio_blk_handle_rw_error): IOERR (`report`), OK (`ignore`), or -1 when the request is to be
   * held and the device stops (`stop`, `enospc` on ENOSPC).
   */
  #failed(e: unknown, isWrite: boolean): number {
    this.lastError = e;
    const o = this.options;
    const decision = errorDecision(isWrite ? o.werror : o.rerror, e);
    if (decision === "report") return VIRTIO_BLK_S_IOERR;
    if (decision === "ignore") {
      this.stats.ignoredErrors++;
      return VIRTIO_BLK_S_OK;
    }
    if (this.#stopReason === null) {
      this.#stopReason = stopReason(o.driveName, isWrite, e);
      this.hooks?.stop?.(this.#stopReason);
    }
    return HELD;
  }

  #completeOrHold(q: BlkQueue, chain: DescriptorChain, status: number): void {
    if (status !== HELD) {
      this.#complete(q, chain, status);
      return;
    }
    this.#held.push(chain);
    this.stats.heldRequests++;
  }

  /** Writes the status byte (the chain's last writable byte) and stages the completion. */
  #complete(q: BlkQueue, chain: DescriptorChain, status: number): void {
    const writable = chain.writable;
    const last = writable[writable.length - 1]!;
    last[last.length - 1] = status;
    // used.len is a u32; aliased buffers can add up to more (QEMU truncates, we saturate).
    const written = chain.writableLength;
    q.queue.push(chain, written > MAX_USED_LEN ? MAX_USED_LEN : written);
    const stats = this.stats;
    stats.requests++;
    if (status === VIRTIO_BLK_S_IOERR) stats.ioErrors++;
    else if (status === VIRTIO_BLK_S_UNSUPP) stats.unsupported++;
  }
}

/** What `createBackend` reports to the VMM, where `createModel` builds the model from it. */
export interface VirtioBlkBackendInfo {
  /** The shared state (`writeback`, capacity): the model wraps it with `new VirtioBlkShared()`. */
  readonly shared: SharedArrayBuffer;
}

/**
 * The machine's back-end factory (see `DeviceType.backendModule`), run in the iothread: a
 * {@linkcode VirtioBlkBackend} over the device's one drive, with options from the spec, and the
 * shared state buffer for the model.
 *
 * @throws {RangeError} when the spec has no drive or bad options
 */
export function createBackend(init: BackendInit): BackendReady {
  const node = init.drives[0];
  if (node === undefined || init.drives.length !== 1) {
    throw new RangeError(`virtio-blk ${init.spec.id} needs exactly one drive`);
  }
  const options = virtioBlkOptionsFromSpec(init.spec);
  const shared = new VirtioBlkShared();
  shared.writeback = resolveVirtioBlkOptions(options).writeback;
  shared.capacity = capacitySectors(node.size);
  const backend = new VirtioBlkBackend(node, options, shared);
  const info: VirtioBlkBackendInfo = { shared: shared.buffer };
  return { backend, info };
}
