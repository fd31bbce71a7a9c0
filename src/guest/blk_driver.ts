/**
 * The guest's virtio-blk front-end (Linux's `drivers/block/virtio_blk.c`, simulated): negotiates
 * features, reads and validates the device configuration, sets up one or more request queues, and
 * serves {@linkcode BlockTarget}s — pre-allocated request slots in guest RAM that a workload fills
 * and submits.
 *
 * A request is a descriptor chain `header → data → status` (virtio 1.2 §5.2.6): the 16-byte header
 * {type u32, reserved u32, sector u64} is device-readable, data is readable for writes and writable
 * for reads, and the status byte is the last writable byte. With INDIRECT_DESC the chain goes into
 * the slot's own indirect table and takes one ring descriptor. Data longer than `size_max` is split
 * into segments; a slot never needs more than `seg_max` of them (the target's maximum transfer is
 * bounded accordingly).
 *
 * Completion is by interrupt: each queue's handler reaps the used ring with Linux's
 * `do { disable_cb; while (get_buf) complete; } while (!enable_cb)` loop and hands completed slots
 * to their target. A workload that can submit nothing more calls `wait()`, which runs the platform's
 * `idle` step (halt in a Worker; run the device in a single-thread test) and then takes pending
 * interrupts.
 *
 * Hot path: no allocation of our own per request — headers, status bytes, indirect tables,
 * descriptor lists and request objects are all per slot, made when the target opens. (The virtqueue
 * driver API returns one small object per completion.)
 *
 * @module
 */

import {
  featureBit,
  hasFeature,
  VIRTIO_F_RING_PACKED,
  VIRTIO_ID_BLOCK,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import type { DriverBuffer } from "../virtio/queue.ts";
import {
  VIRTIO_BLK_CFG_ALIGNMENT_OFFSET,
  VIRTIO_BLK_CFG_BLK_SIZE,
  VIRTIO_BLK_CFG_CAPACITY,
  VIRTIO_BLK_CFG_CYLINDERS,
  VIRTIO_BLK_CFG_DISCARD_SECTOR_ALIGNMENT,
  VIRTIO_BLK_CFG_HEADS,
  VIRTIO_BLK_CFG_MAX_DISCARD_SECTORS,
  VIRTIO_BLK_CFG_MAX_DISCARD_SEG,
  VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SECTORS,
  VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SEG,
  VIRTIO_BLK_CFG_MIN_IO_SIZE,
  VIRTIO_BLK_CFG_NUM_QUEUES,
  VIRTIO_BLK_CFG_OPT_IO_SIZE,
  VIRTIO_BLK_CFG_PHYSICAL_BLOCK_EXP,
  VIRTIO_BLK_CFG_SECTORS,
  VIRTIO_BLK_CFG_SEG_MAX,
  VIRTIO_BLK_CFG_SIZE_MAX,
  VIRTIO_BLK_CFG_WRITE_ZEROES_MAY_UNMAP,
  VIRTIO_BLK_CFG_WRITEBACK,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_GEOMETRY,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_TOPOLOGY,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_SECTOR_SIZE,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from "../virtio/virtio_blk_constants.ts";
import type { BlockTarget, IoRequest, IoStatus } from "./block_target.ts";
import { runOne } from "./block_target.ts";
import {
  COMPLETED,
  FREE,
  IN_DEVICE,
  localStatus,
  QueueTarget,
  SlotRequest,
} from "./queue_target.ts";
import { SlotQueue, type SlotQueueStats } from "./slot_queue.ts";
import type { PciFunctionInfo } from "./pci_probe.ts";
import {
  type GuestPlatform,
  type InterruptPreference,
  VirtioDriverError,
  VirtioPciDriver,
} from "./virtio_driver.ts";

const HEADER_BYTES = 16;
const SEGMENT_BYTES = 16;
const DESC_BYTES = 16;
const U32_MAX = 0xffff_ffff;
/** Linux's MAX_SG_ELEMS bound on seg_max. */
const MAX_SEGMENTS = 1024;

/** The device configuration, as read and validated at init. */
export interface BlkConfig {
  /** Capacity in 512-byte sectors. */
  readonly capacity: number;
  /** Largest data segment in bytes (SIZE_MAX), or null when not negotiated. */
  readonly sizeMax: number | null;
  /** Most data segments per request (SEG_MAX), or null. */
  readonly segMax: number | null;
  readonly geometry: { cylinders: number; heads: number; sectors: number } | null;
  /** Logical block size (BLK_SIZE), 512 when not negotiated. */
  readonly blkSize: number;
  readonly topology: {
    physicalBlockExp: number;
    alignmentOffset: number;
    minIoSize: number;
    optIoSize: number;
  } | null;
  /** Write-back cache (CONFIG_WCE), or null. */
  readonly writeback: boolean | null;
  /** Request queues the device has (MQ), 1 without MQ. */
  readonly numQueues: number;
  readonly discard: { maxSectors: number; maxSeg: number; sectorAlignment: number } | null;
  readonly writeZeroes: { maxSectors: number; maxSeg: number; mayUnmap: boolean } | null;
}

/** Options of {@linkcode BlkDriver.init}. */
export interface BlkDriverOptions {
  /** Request queues wanted (default 1); MQ is asked for when above 1. */
  readonly queues?: number;
  /** Queue size wanted (default 256; the device's maximum caps it). */
  readonly queueSize?: number;
  /** Ask for VIRTIO_F_RING_PACKED (default false). */
  readonly packed?: boolean;
  /** Ask for VIRTIO_RING_F_EVENT_IDX (default true). */
  readonly eventIdx?: boolean;
  /** Ask for VIRTIO_RING_F_INDIRECT_DESC (default true). */
  readonly indirect?: boolean;
  /** Interrupt setup preference (default "auto"). */
  readonly interrupts?: InterruptPreference;
  /** With CONFIG_WCE: switch the cache to write-back (true) or write-through (false). */
  readonly writeback?: boolean;
  /** Feature bits never to ask for (e.g. `featureBit(VIRTIO_BLK_F_DISCARD)`). */
  readonly exclude?: bigint;
  /** A target's requests stop completing for this long: `wait` throws (default 30 s, as blk-mq). */
  readonly timeoutMs?: number;
  /** Bound of the reset wait (default 1000 ms). */
  readonly resetTimeoutMs?: number;
}

/** Options of {@linkcode BlkDriver.openTarget}. */
export interface TargetOptions {
  /** Queue index (default 0). */
  readonly queue?: number;
  /** Requests (default 32). */
  readonly depth?: number;
  /** Largest read/write in bytes (default 128 KiB), a multiple of 512. */
  readonly maxTransfer?: number;
}

/** Counters of one request queue (the queue keeps them: {@linkcode SlotQueue.stats}). */
export type BlkQueueStats = SlotQueueStats;

/** One request slot: its guest memory, descriptor lists and state. */
interface Slot {
  /** Token in the ring: index in the queue's slot table. */
  readonly token: number;
  readonly request: SlotRequest;
  readonly target: BlkTarget;
  /** Buffer offsets (into guest RAM's buffer) of the header, segment and status bytes. */
  readonly headerAt: number;
  readonly segmentAt: number;
  readonly statusAt: number;
  readonly indirect: number;
  readonly dataAddress: number;
  readonly header: DriverBuffer;
  readonly segment: DriverBuffer;
  readonly status: DriverBuffer;
  readonly data: DriverBuffer[];
  readonly readable: DriverBuffer[];
  readonly writable: DriverBuffer[];
  state: number;
}

/**
 * The virtio-blk front-end of one PCI function.
 *
 * @example
 * ```ts ignore
 * const driver = BlkDriver.init(platform, fn, { queues: 2, packed: true });
 * const target = driver.openTarget({ queue: 0, depth: 32, maxTransfer: 65536 });
 * ```
 */
export class BlkDriver {
  /** The transport driver underneath. */
  readonly virtio: VirtioPciDriver;
  /** Device configuration as read at init. */
  config: BlkConfig;
  /** Negotiated features. */
  readonly features: bigint;
  /** Capacity in bytes. */
  readonly capacityBytes: number;
  /** Logical block size. */
  readonly blockSize: number;
  readonly readOnly: boolean;
  /** FLUSH negotiated (else flushes complete at once: the cache is write-through). */
  readonly canFlush: boolean;
  readonly #platform: GuestPlatform;
  readonly #queues: SlotQueue<Slot>[] = [];
  readonly #ram: DataView;
  readonly #timeoutMs: number;
  readonly #indirect: boolean;
  #completions = 0;

  private constructor(
    platform: GuestPlatform,
    virtio: VirtioPciDriver,
    features: bigint,
    config: BlkConfig,
    timeoutMs: number,
  ) {
    this.#platform = platform;
    this.virtio = virtio;
    this.features = features;
    this.config = config;
    this.capacityBytes = config.capacity * VIRTIO_BLK_SECTOR_SIZE;
    this.blockSize = config.blkSize;
    this.readOnly = hasFeature(features, VIRTIO_BLK_F_RO);
    this.canFlush = hasFeature(features, VIRTIO_BLK_F_FLUSH);
    this.#ram = new DataView(platform.mem.buffer);
    this.#timeoutMs = timeoutMs;
    this.#indirect = hasFeature(features, VIRTIO_RING_F_INDIRECT_DESC);
  }

  /**
   * Initialises the device in `fn`: negotiation, configuration, queues, DRIVER_OK.
   *
   * @throws {PciProbeError} for unusable virtio structures
   * @throws {VirtioDriverError} when the device refuses, misreports its config, or is not virtio-blk
   * @throws {GuestAllocError} when guest RAM for the rings runs out
   */
  static init(
    platform: GuestPlatform,
    fn: PciFunctionInfo,
    options: BlkDriverOptions = {},
  ): BlkDriver {
    const virtio = new VirtioPciDriver(platform, fn);
    if (virtio.structures.virtioId !== VIRTIO_ID_BLOCK) {
      throw new VirtioDriverError(
        "status",
        fn.slot,
        `virtio device id ${virtio.structures.virtioId} is not a block device`,
      );
    }
    virtio.begin(options.resetTimeoutMs ?? 1000);
    const wantQueues = Math.max(1, Math.floor(options.queues ?? 1));
    let wanted = [
      VIRTIO_BLK_F_SIZE_MAX,
      VIRTIO_BLK_F_SEG_MAX,
      VIRTIO_BLK_F_GEOMETRY,
      VIRTIO_BLK_F_RO,
      VIRTIO_BLK_F_BLK_SIZE,
      VIRTIO_BLK_F_FLUSH,
      VIRTIO_BLK_F_TOPOLOGY,
      VIRTIO_BLK_F_CONFIG_WCE,
      VIRTIO_BLK_F_DISCARD,
      VIRTIO_BLK_F_WRITE_ZEROES,
    ].reduce((acc, bit) => acc | featureBit(bit), 0n);
    if (wantQueues > 1) wanted |= featureBit(VIRTIO_BLK_F_MQ);
    if (options.indirect ?? true) wanted |= featureBit(VIRTIO_RING_F_INDIRECT_DESC);
    if (options.eventIdx ?? true) wanted |= featureBit(VIRTIO_RING_F_EVENT_IDX);
    if (options.packed ?? false) wanted |= featureBit(VIRTIO_F_RING_PACKED);
    wanted &= ~(options.exclude ?? 0n);
    const features = virtio.negotiate(wanted);
    try {
      if (options.writeback !== undefined && hasFeature(features, VIRTIO_BLK_F_CONFIG_WCE)) {
        virtio.writeConfig(VIRTIO_BLK_CFG_WRITEBACK, 1, options.writeback ? 1 : 0);
      }
      const config = readBlkConfig(virtio, features);
      const count = Math.min(wantQueues, config.numQueues);
      const driver = new BlkDriver(platform, virtio, features, config, options.timeoutMs ?? 30_000);
      const queues = virtio.setupQueues(
        Array.from({ length: count }, () => ({ size: options.queueSize ?? 256 })),
        {
          onQueue: (index) => driver.#harvest(index),
          onConfigChange: () => driver.#refreshConfig(),
        },
        options.interrupts === undefined ? {} : { interrupts: options.interrupts },
      );
      for (const vq of queues) driver.#queues.push(new SlotQueue(vq, driver.#indirect));
      virtio.driverOk();
      return driver;
    } catch (error) {
      // Linux's virtio core: a driver whose probe failed sets FAILED.
      virtio.fail();
      throw error;
    }
  }

  /** Request queues set up. */
  get numQueues(): number {
    return this.#queues.length;
  }

  /** Largest read/write the device accepts in one request, from seg_max × size_max. */
  get maxTransferLimit(): number {
    const { segMax, sizeMax } = this.config;
    if (segMax === null || sizeMax === null) return Number.MAX_SAFE_INTEGER;
    return segMax * sizeMax;
  }

  /**
   * Opens a target on queue `queue` with `depth` pre-allocated request slots (guest RAM for the
   * header, status byte, discard segment, indirect table and a `maxTransfer`-byte data buffer
   * each).
   *
   * @throws {RangeError} for a queue that does not exist, or sizes the device cannot take
   * @throws {GuestAllocError} when guest RAM runs out
   */
  openTarget(options: TargetOptions = {}): BlkTarget {
    const queueIndex = options.queue ?? 0;
    const queue = this.#queues[queueIndex];
    if (queue === undefined) {
      throw new RangeError(`Queue ${queueIndex} is not 0..${this.#queues.length - 1}`);
    }
    const depth = options.depth ?? 32;
    const maxTransfer = options.maxTransfer ?? 128 * 1024;
    if (!Number.isInteger(depth) || depth < 1 || depth > 65536) {
      throw new RangeError(`Target depth ${depth} is not 1..65536`);
    }
    if (
      !Number.isInteger(maxTransfer) || maxTransfer < VIRTIO_BLK_SECTOR_SIZE ||
      maxTransfer % VIRTIO_BLK_SECTOR_SIZE
    ) {
      throw new RangeError(`Target transfer size ${maxTransfer} is not a multiple of 512`);
    }
    if (maxTransfer > this.maxTransferLimit) {
      throw new RangeError(
        `Transfer size ${maxTransfer} exceeds the device's seg_max × size_max = ${this.maxTransferLimit}`,
      );
    }
    const segSize = this.config.sizeMax ?? maxTransfer;
    const segments = Math.ceil(maxTransfer / segSize);
    const chain = segments + 2;
    // Without indirect descriptors the whole chain must fit the ring at once.
    if (!this.#indirect && chain > queue.vq.size) {
      throw new RangeError(
        `A ${maxTransfer}-byte request needs ${chain} descriptors; queue ${queueIndex} has ${queue.vq.size}`,
      );
    }
    return new BlkTarget(this, queueIndex, depth, maxTransfer, segSize, segments);
  }

  /** @internal Slot memory and registration, for {@linkcode BlkTarget}'s constructor. */
  _allocSlots(target: BlkTarget, segSize: number, segments: number): {
    slots: Slot[];
    meta: number;
    data: number;
  } {
    const mem = this.#platform.mem;
    const alloc = this.#platform.alloc;
    const queue = this.#queues[target.queue]!;
    const depth = target.depth;
    // Per slot: header @0, discard/write-zeroes segment @16, status @32, indirect table @48.
    const metaStride = Math.ceil((48 + DESC_BYTES * (segments + 2)) / 64) * 64;
    const dataAlign = target.maxTransfer >= 4096 ? 4096 : VIRTIO_BLK_SECTOR_SIZE;
    const dataStride = Math.ceil(target.maxTransfer / dataAlign) * dataAlign;
    const meta = alloc.alloc(metaStride * depth, 64);
    let data: number;
    try {
      data = alloc.alloc(dataStride * depth, dataAlign);
    } catch (error) {
      alloc.free(meta);
      throw error;
    }
    const slots: Slot[] = [];
    for (let i = 0; i < depth; i++) {
      const base = meta + i * metaStride;
      const dataAddress = data + i * dataStride;
      const request = new SlotRequest(i, mem.slice(dataAddress, target.maxTransfer));
      const dataBuffers: DriverBuffer[] = [];
      for (let k = 0; k < segments; k++) {
        dataBuffers.push({ addr: dataAddress + k * segSize, length: segSize });
      }
      const slot: Slot = {
        token: queue.slots.length,
        request,
        target,
        headerAt: mem.translate(base, HEADER_BYTES),
        segmentAt: mem.translate(base + 16, SEGMENT_BYTES),
        statusAt: mem.translate(base + 32, 1),
        indirect: base + 48,
        dataAddress,
        header: { addr: base, length: HEADER_BYTES },
        segment: { addr: base + 16, length: SEGMENT_BYTES },
        status: { addr: base + 32, length: 1 },
        data: dataBuffers,
        readable: [],
        writable: [],
        state: FREE,
      };
      queue.slots.push(slot);
      slots.push(slot);
    }
    return { slots, meta, data };
  }

  /** @internal Forgets a closed target's slots and frees their memory. */
  _freeSlots(target: BlkTarget, slots: readonly Slot[], meta: number, data: number): void {
    const queue = this.#queues[target.queue]!;
    for (const slot of slots) queue.slots[slot.token] = undefined;
    this.#platform.alloc.free(meta);
    this.#platform.alloc.free(data);
  }

  /** @internal Puts a slot's chain in the ring, or behind the pending ones. */
  _enqueue(slot: Slot): void {
    this.#queues[slot.target.queue]!.enqueue(slot);
  }

  /** @internal Moves pending slots into the ring while it has room, publishes, notifies. */
  _kick(queueIndex: number): void {
    this.#queues[queueIndex]!.kick();
  }

  /**
   * The queue's interrupt handler: reaps every used element (Linux's virtblk_done loop), then
   * moves requests waiting for ring room into the freed space.
   */
  #harvest(index: number): void {
    const queue = this.#queues[index];
    if (queue === undefined || this.virtio.broken !== null) return;
    const ring = queue.vq.ring;
    const ram = this.#ram;
    try {
      do {
        ring.disableInterrupts();
        for (let used = ring.getUsed(); used !== null; used = ring.getUsed()) {
          const slot = queue.slots[used.token];
          if (slot === undefined || slot.state !== IN_DEVICE) {
            throw new RangeError(`Device completed request ${used.token}, which is not in flight`);
          }
          const request = slot.request;
          request.written = used.written;
          const status = ram.getUint8(slot.statusAt);
          if (status === VIRTIO_BLK_S_OK) request.status = "ok";
          else if (status === VIRTIO_BLK_S_UNSUPP) request.status = "unsupp";
          else {
            request.status = "ioerr";
            if (status !== VIRTIO_BLK_S_IOERR) {
              request.detail = `device returned status byte 0x${status.toString(16)}`;
            }
          }
          slot.state = COMPLETED;
          this.#completions++;
          slot.target._completed(request);
        }
      } while (ring.enableInterrupts());
    } catch (error) {
      // A device that breaks the ring rules is unusable: Linux marks the virtqueue broken.
      if (!(error instanceof RangeError)) throw error;
      this.virtio.markBroken(`queue ${index}: ${error.message}`);
      return;
    }
    if (queue.hasPending) this._kick(index);
  }

  #refreshConfig(): void {
    // Capacity may change (a resize); re-read under the generation loop.
    try {
      this.config = readBlkConfig(this.virtio, this.features);
    } catch (error) {
      // Runs in an interrupt handler: a device gone bad is reported through `broken`, not thrown.
      if (!(error instanceof VirtioDriverError)) throw error;
      this.virtio.markBroken(error.message);
    }
  }

  /** @internal The platform. */
  get _platform(): GuestPlatform {
    return this.#platform;
  }

  /** @internal Completions so far (all queues). */
  get _completions(): number {
    return this.#completions;
  }

  /** @internal The request timeout. */
  get _timeoutMs(): number {
    return this.#timeoutMs;
  }

  /** @internal A view of all guest RAM, for header and segment writes at translated offsets. */
  _ram(): DataView {
    return this.#ram;
  }

  /** Counters of every queue. */
  stats(): BlkQueueStats[] {
    return this.#queues.map((q) => q.stats());
  }

  /**
   * The device's serial number (GET_ID), or null when the device does not support it.
   *
   * @throws {VirtioDriverError} when the device breaks or stops answering
   */
  async getId(): Promise<string | null> {
    const target = this.openTarget({ depth: 1, maxTransfer: VIRTIO_BLK_SECTOR_SIZE });
    try {
      let id: string | null = null;
      const status = await runOne(target, (r) => {
        r.op = "get-id";
        r.offset = 0;
        r.length = VIRTIO_BLK_ID_BYTES;
      }, (r) => {
        const bytes = r.data.subarray(0, VIRTIO_BLK_ID_BYTES);
        const end = bytes.indexOf(0);
        id = new TextDecoder().decode(bytes.subarray(0, end < 0 ? bytes.length : end));
      });
      return status === "ok" ? id : null;
    } finally {
      target.close();
    }
  }

  /** Resets the device and releases its rings and vectors. Close targets first. */
  shutdown(): void {
    this.virtio.shutdown();
  }
}

/**
 * A {@linkcode BlockTarget} on one queue of a {@linkcode BlkDriver}: `depth` request slots in
 * guest RAM. Requests the guest can answer itself complete at once, never reaching the device:
 * writes to a read-only device (ioerr), ranges past the capacity (ioerr), discard or write-zeroes
 * without the feature (unsupp), flush without FLUSH (ok: the cache is write-through). `submit()`
 * throws a RangeError for a length that is not a multiple of 512 or exceeds the target's maximum.
 */
export class BlkTarget extends QueueTarget<Slot, BlkDriver> implements BlockTarget {
  readonly capacity: number;
  readonly blockSize: number;
  readonly readOnly: boolean;
  readonly maxDiscard: number;
  readonly maxWriteZeroes: number;
  readonly #meta: number;
  readonly #data: number;
  readonly #segSize: number;

  /** Use {@linkcode BlkDriver.openTarget}. */
  constructor(
    driver: BlkDriver,
    queue: number,
    depth: number,
    maxTransfer: number,
    segSize: number,
    segments: number,
  ) {
    super(driver, { queue, depth, maxTransfer, unit: "requests" });
    this.#segSize = segSize;
    this.capacity = driver.capacityBytes;
    this.blockSize = driver.blockSize;
    this.readOnly = driver.readOnly;
    const cfg = driver.config;
    this.maxDiscard = cfg.discard === null ? 0 : cfg.discard.maxSectors * VIRTIO_BLK_SECTOR_SIZE;
    this.maxWriteZeroes = cfg.writeZeroes === null
      ? 0
      : cfg.writeZeroes.maxSectors * VIRTIO_BLK_SECTOR_SIZE;
    const { slots, meta, data } = driver._allocSlots(this, segSize, segments);
    this._useSlots(slots);
    this.#meta = meta;
    this.#data = data;
  }

  /** Writes the header and descriptor lists; returns a status when the guest answers itself. */
  protected _prepare(slot: Slot): IoStatus | null {
    const r = slot.request;
    const driver = this.driver;
    const { offset, length } = r;
    const readable = slot.readable;
    const writable = slot.writable;
    readable.length = 0;
    writable.length = 0;
    let type: number;
    let sector = 0;
    switch (r.op) {
      case "read":
      case "write": {
        this.#checkLength(r, this.maxTransfer);
        if (r.op === "write" && this.readOnly) return localStatus(r, "ioerr", "read-only device");
        if (!this.#inRange(offset, length)) return localStatus(r, "ioerr", "beyond the capacity");
        type = r.op === "read" ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
        sector = offset / VIRTIO_BLK_SECTOR_SIZE;
        readable.push(slot.header);
        const dataList = r.op === "read" ? writable : readable;
        for (let k = 0, done = 0; done < length; k++) {
          const buffer = slot.data[k]!;
          buffer.length = Math.min(this.#segSize, length - done);
          dataList.push(buffer);
          done += buffer.length;
        }
        writable.push(slot.status);
        break;
      }
      case "flush":
        if (!driver.canFlush) return "ok";
        type = VIRTIO_BLK_T_FLUSH;
        readable.push(slot.header);
        writable.push(slot.status);
        break;
      case "get-id": {
        type = VIRTIO_BLK_T_GET_ID;
        readable.push(slot.header);
        const buffer = slot.data[0]!;
        buffer.length = VIRTIO_BLK_ID_BYTES;
        writable.push(buffer);
        writable.push(slot.status);
        break;
      }
      case "discard":
      case "write-zeroes": {
        const discard = r.op === "discard";
        const limit = discard ? this.maxDiscard : this.maxWriteZeroes;
        if (limit === 0) return localStatus(r, "unsupp", `${r.op} not negotiated`);
        this.#checkLength(r, limit);
        if (this.readOnly) return localStatus(r, "ioerr", "read-only device");
        if (!this.#inRange(offset, length)) return localStatus(r, "ioerr", "beyond the capacity");
        type = discard ? VIRTIO_BLK_T_DISCARD : VIRTIO_BLK_T_WRITE_ZEROES;
        const ram = driver._ram();
        const at = slot.segmentAt;
        const first = offset / VIRTIO_BLK_SECTOR_SIZE;
        ram.setUint32(at, first % 2 ** 32, true);
        ram.setUint32(at + 4, Math.floor(first / 2 ** 32), true);
        ram.setUint32(at + 8, length / VIRTIO_BLK_SECTOR_SIZE, true);
        const unmap = !discard && driver.config.writeZeroes?.mayUnmap === true;
        ram.setUint32(at + 12, unmap ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0, true);
        readable.push(slot.header, slot.segment);
        writable.push(slot.status);
        break;
      }
      default:
        throw new RangeError(`Unknown operation ${String(r.op)}`);
    }
    const ram = driver._ram();
    const h = slot.headerAt;
    ram.setUint32(h, type, true);
    ram.setUint32(h + 4, 0, true);
    ram.setUint32(h + 8, sector % 2 ** 32, true);
    ram.setUint32(h + 12, Math.floor(sector / 2 ** 32), true);
    // A status the device never wrote must not read as OK.
    ram.setUint8(slot.statusAt, 0xff);
    return null;
  }

  #checkLength(r: IoRequest, limit: number): void {
    const { offset, length } = r;
    if (
      !Number.isSafeInteger(offset) || offset < 0 || offset % VIRTIO_BLK_SECTOR_SIZE !== 0 ||
      !Number.isSafeInteger(length) || length <= 0 || length % VIRTIO_BLK_SECTOR_SIZE !== 0 ||
      length > limit
    ) {
      throw new RangeError(
        `${r.op} at ${offset}+${length}: offset and length must be multiples of 512, length 1..${limit}`,
      );
    }
  }

  #inRange(offset: number, length: number): boolean {
    return offset + length <= this.capacity;
  }

  protected _releaseSlots(slots: readonly Slot[]): void {
    this.driver._freeSlots(this, slots, this.#meta, this.#data);
  }
}

/**
 * Reads and validates `struct virtio_blk_config` for the negotiated features, under the
 * config_generation loop. Values a sane device never reports are errors, as in `virtblk_probe`.
 *
 * @throws {VirtioDriverError} for a field past the DEVICE structure or an impossible value
 */
export function readBlkConfig(virtio: VirtioPciDriver, features: bigint): BlkConfig {
  const has = (bit: number) => hasFeature(features, bit);
  const raw = virtio.readConfig((c) => ({
    capacity: c.u64(VIRTIO_BLK_CFG_CAPACITY),
    sizeMax: has(VIRTIO_BLK_F_SIZE_MAX) ? c.u32(VIRTIO_BLK_CFG_SIZE_MAX) : null,
    segMax: has(VIRTIO_BLK_F_SEG_MAX) ? c.u32(VIRTIO_BLK_CFG_SEG_MAX) : null,
    geometry: has(VIRTIO_BLK_F_GEOMETRY)
      ? {
        cylinders: c.u16(VIRTIO_BLK_CFG_CYLINDERS),
        heads: c.u8(VIRTIO_BLK_CFG_HEADS),
        sectors: c.u8(VIRTIO_BLK_CFG_SECTORS),
      }
      : null,
    blkSize: has(VIRTIO_BLK_F_BLK_SIZE) ? c.u32(VIRTIO_BLK_CFG_BLK_SIZE) : VIRTIO_BLK_SECTOR_SIZE,
    topology: has(VIRTIO_BLK_F_TOPOLOGY)
      ? {
        physicalBlockExp: c.u8(VIRTIO_BLK_CFG_PHYSICAL_BLOCK_EXP),
        alignmentOffset: c.u8(VIRTIO_BLK_CFG_ALIGNMENT_OFFSET),
        minIoSize: c.u16(VIRTIO_BLK_CFG_MIN_IO_SIZE),
        optIoSize: c.u32(VIRTIO_BLK_CFG_OPT_IO_SIZE),
      }
      : null,
    writeback: has(VIRTIO_BLK_F_CONFIG_WCE) ? c.u8(VIRTIO_BLK_CFG_WRITEBACK) !== 0 : null,
    numQueues: has(VIRTIO_BLK_F_MQ) ? c.u16(VIRTIO_BLK_CFG_NUM_QUEUES) : 1,
    discard: has(VIRTIO_BLK_F_DISCARD)
      ? {
        maxSectors: c.u32(VIRTIO_BLK_CFG_MAX_DISCARD_SECTORS),
        maxSeg: c.u32(VIRTIO_BLK_CFG_MAX_DISCARD_SEG),
        sectorAlignment: c.u32(VIRTIO_BLK_CFG_DISCARD_SECTOR_ALIGNMENT),
      }
      : null,
    writeZeroes: has(VIRTIO_BLK_F_WRITE_ZEROES)
      ? {
        maxSectors: c.u32(VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SECTORS),
        maxSeg: c.u32(VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SEG),
        mayUnmap: c.u8(VIRTIO_BLK_CFG_WRITE_ZEROES_MAY_UNMAP) !== 0,
      }
      : null,
  }));
  const bad = (what: string): never => {
    throw new VirtioDriverError("status", virtio.slot, `virtio-blk config: ${what}`);
  };
  // capacity × 512 must stay an exact byte offset.
  if (!Number.isSafeInteger(raw.capacity * VIRTIO_BLK_SECTOR_SIZE)) {
    bad(`capacity ${raw.capacity} sectors is beyond 2^53 bytes`);
  }
  const blk = raw.blkSize;
  if (blk < VIRTIO_BLK_SECTOR_SIZE || blk > 65536 || (blk & (blk - 1)) !== 0) {
    bad(`blk_size ${blk} is not a power of 2 from 512 to 65536`);
  }
  if (raw.numQueues === 0) bad("MQ negotiated but num_queues is 0");
  // size_max 0 and seg_max 0 mean "no limit given" in QEMU's and Linux's reading.
  const sizeMax = raw.sizeMax === null || raw.sizeMax === 0 ? null : raw.sizeMax;
  if (sizeMax !== null && sizeMax < 4096) bad(`size_max ${sizeMax} is below a page`);
  const segMax = raw.segMax === null || raw.segMax === 0
    ? null
    : Math.min(raw.segMax, MAX_SEGMENTS);
  // Sizes must be whole sectors for the segment arithmetic of a request.
  const sizeMaxSectors = sizeMax === null
    ? null
    : Math.floor(sizeMax / VIRTIO_BLK_SECTOR_SIZE) * VIRTIO_BLK_SECTOR_SIZE;
  const unlimited = (v: number) => (v === 0 ? U32_MAX : v);
  return {
    capacity: raw.capacity,
    sizeMax: sizeMaxSectors,
    segMax,
    geometry: raw.geometry,
    blkSize: blk,
    topology: raw.topology,
    writeback: raw.writeback,
    numQueues: raw.numQueues,
    discard: raw.discard === null ? null : {
      maxSectors: unlimited(raw.discard.maxSectors),
      maxSeg: Math.max(1, raw.discard.maxSeg),
      sectorAlignment: raw.discard.sectorAlignment,
    },
    writeZeroes: raw.writeZeroes === null ? null : {
      maxSectors: unlimited(raw.writeZeroes.maxSectors),
      maxSeg: Math.max(1, raw.writeZeroes.maxSeg),
      mayUnmap: raw.writeZeroes.mayUnmap,
    },
  };
}
