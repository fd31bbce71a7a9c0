/**
 * The guest's virtio-scsi front-end (Linux's `drivers/scsi/virtio_scsi.c` with the bits of the SCSI
 * midlayer and `sd` a disk needs, simulated): negotiates features, reads the configuration, sets up
 * the control queue (0), the event queue (1) and the request queues (2..), scans for disks, and
 * serves a {@linkcode ScsiTarget} per LUN and request queue — pre-allocated request slots in guest
 * RAM that a workload fills and submits.
 *
 * This file is the driver's core and its one import point: bring-up, the request queues'
 * interrupts (decode each response, let its owner judge, retry unit attentions), the driver's own
 * command slot, and the calls that hold it. The parts, by concern:
 *
 * - `scsi_config.ts` — the device configuration and its checks;
 * - `scsi_slot.ts` — a command slot's layout in guest RAM, arming and decoding its response;
 * - `scsi_commands.ts` — the CDBs the driver sends and the data they return;
 * - `scsi_target.ts` — {@linkcode ScsiTarget}: requests as commands, completions as statuses;
 * - `scsi_scan.ts` — LUN discovery (REPORT LUNS, INQUIRY, READ CAPACITY, VPD, MODE SENSE);
 * - `scsi_events.ts` — the event queue and the work it leaves ({@linkcode ScsiDriver.processEvents});
 * - `scsi_tmf.ts` — the control queue and LOGICAL UNIT RESET;
 * - `scsi_names.ts` — responses, statuses and sense in words.
 *
 * **Unit attentions.** A command ending in UNIT ATTENTION is retried once (the midlayer's
 * NEEDS_RETRY); CAPACITY DATA HAS CHANGED and REPORTED LUNS DATA HAS CHANGED also schedule a
 * capacity re-read or a rescan of the target, which a target's `wait()` runs when the workload
 * would halt, so a workload sees LUNs come and go.
 *
 * Hot path: no allocation of our own per request — headers, CDBs, UNMAP parameter lists, indirect
 * tables, descriptor lists and request objects are per slot, made when the target opens.
 *
 * @module
 */

import {
  VIRTIO_SCSI_CDB_DEFAULT_SIZE,
  VIRTIO_SCSI_CONFIG_CDB_SIZE,
  VIRTIO_SCSI_CONFIG_SENSE_SIZE,
  VIRTIO_SCSI_F_CHANGE,
  VIRTIO_SCSI_F_HOTPLUG,
  VIRTIO_SCSI_REQ_CDB,
  VIRTIO_SCSI_S_OK,
  VIRTIO_SCSI_SENSE_DEFAULT_SIZE,
  VIRTIO_SCSI_VQ_CONTROL,
  VIRTIO_SCSI_VQ_EVENT,
  VIRTIO_SCSI_VQ_REQUEST,
} from "../virtio/virtio_scsi_constants.ts";
import { UNIT_ATTENTION } from "../scsi/sense.ts";
import {
  featureBit,
  hasFeature,
  VIRTIO_F_RING_PACKED,
  VIRTIO_ID_SCSI,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import type { PciFunctionInfo } from "./pci_probe.ts";
import { COMPLETED, FREE, IN_DEVICE } from "./queue_target.ts";
import { type CommandOutcome, writeLun } from "./scsi_commands.ts";
import { readScsiConfig, type ScsiConfig } from "./scsi_config.ts";
import { ScsiEventQueue, type ScsiEventStats } from "./scsi_events.ts";
import {
  COMMAND_BUFFER_BYTES,
  LunScanner,
  type ScsiAddress,
  type ScsiLun,
  type ScsiLunEvent,
} from "./scsi_scan.ts";
import { allocSlots, armResponse, readResponse, type Slot, type SlotOwner } from "./scsi_slot.ts";
import { ScsiTarget } from "./scsi_target.ts";
import { ScsiControlQueue } from "./scsi_tmf.ts";
import { SlotQueue, type SlotQueueStats } from "./slot_queue.ts";
import {
  type GuestPlatform,
  type InterruptPreference,
  VirtioDriverError,
  VirtioPciDriver,
} from "./virtio_driver.ts";

export { readScsiConfig, type ScsiConfig } from "./scsi_config.ts";
export type { ScsiEventStats } from "./scsi_events.ts";
export { describeSense, scsiResponseName } from "./scsi_names.ts";
export type { ScsiAddress, ScsiLun, ScsiLunEvent } from "./scsi_scan.ts";
export { ScsiTarget } from "./scsi_target.ts";

/** Counters of one request queue (the same shape as virtio-blk's). */
export type ScsiQueueStats = SlotQueueStats;

/** Options of {@linkcode ScsiDriver.init}. */
export interface ScsiDriverOptions {
  /** Request queues wanted (default 1; the device's num_queues caps it). */
  readonly queues?: number;
  /** Request queue size wanted (default 256; the device's maximum caps it). */
  readonly queueSize?: number;
  /** Ask for VIRTIO_F_RING_PACKED (default false). */
  readonly packed?: boolean;
  /** Ask for VIRTIO_RING_F_EVENT_IDX (default true). */
  readonly eventIdx?: boolean;
  /** Ask for VIRTIO_RING_F_INDIRECT_DESC (default true). */
  readonly indirect?: boolean;
  /** Ask for VIRTIO_SCSI_F_HOTPLUG (default true). */
  readonly hotplug?: boolean;
  /** Ask for VIRTIO_SCSI_F_CHANGE (default true). */
  readonly change?: boolean;
  /** Interrupt setup preference (default "auto"). */
  readonly interrupts?: InterruptPreference;
  /** Feature bits never to ask for. */
  readonly exclude?: bigint;
  /** Event buffers kept posted (default 8, Linux's VIRTIO_SCSI_EVENT_LEN; 1..64). */
  readonly eventBuffers?: number;
  /** Highest target scanned: min(max_target, this) (default 7; see `scsi_scan.ts`). */
  readonly scanTargets?: number;
  /** sense_size written to the device (default 96). */
  readonly senseSize?: number;
  /** cdb_size written to the device (default 32; at least 16 for the 16-byte CDBs used here). */
  readonly cdbSize?: number;
  /** Commands stop completing for this long: waits throw (default 30 s). */
  readonly timeoutMs?: number;
  /** Bound of the reset wait (default 1000 ms). */
  readonly resetTimeoutMs?: number;
}

/** Unit attentions a probe command absorbs before giving up (several may be queued). */
const PROBE_UA_TRIES = 5;
/** Linux's VIRTIO_SCSI_EVENT_LEN. */
const DEFAULT_EVENT_BUFFERS = 8;
const MAX_EVENT_BUFFERS = 64;
/** Default bound of the target scan (see `scsi_scan.ts`). */
const DEFAULT_SCAN_TARGETS = 7;
const SECTOR = 512;

/**
 * The virtio-scsi front-end of one PCI function.
 *
 * @example
 * ```ts ignore
 * const driver = await ScsiDriver.init(platform, fn, { queues: 2 });
 * const lun = driver.luns[0]!;
 * const target = driver.openTarget({ lun, queue: 0, depth: 32, maxTransfer: 65536 });
 * ```
 */
export class ScsiDriver {
  /** The transport driver underneath. */
  readonly virtio: VirtioPciDriver;
  /** Negotiated features. */
  readonly features: bigint;
  /** Device configuration as read at init. */
  readonly config: ScsiConfig;
  /** Everything that happened to LUNs, in order (the initial scan's additions first). */
  readonly lunEvents: ScsiLunEvent[] = [];
  /** Called for each entry added to {@linkcode lunEvents}. */
  onLunEvent: ((event: ScsiLunEvent) => void) | null = null;
  /** Event queue counters. */
  readonly eventStats: ScsiEventStats = {
    received: 0,
    missed: 0,
    transportResets: 0,
    paramChanges: 0,
    ignored: 0,
    unitAttentions: 0,
    retries: 0,
  };
  readonly #platform: GuestPlatform;
  readonly #ram: DataView;
  readonly #timeoutMs: number;
  readonly #indirect: boolean;
  readonly #queues: SlotQueue<Slot>[] = [];
  readonly #scanner: LunScanner;
  #completions = 0;
  #events: ScsiEventQueue | null = null;
  #control: ScsiControlQueue | null = null;
  // The driver's own command slot (scan, probe), on request queue 0; one command at a time.
  #commandSlot: Slot | null = null;
  #commandMem: number[] = [];
  #commandLock: Promise<void> = Promise.resolve();

  private constructor(
    platform: GuestPlatform,
    virtio: VirtioPciDriver,
    features: bigint,
    config: ScsiConfig,
    options: ScsiDriverOptions,
  ) {
    this.#platform = platform;
    this.virtio = virtio;
    this.features = features;
    this.config = config;
    this.#ram = new DataView(platform.mem.buffer);
    this.#timeoutMs = options.timeoutMs ?? 30_000;
    this.#indirect = hasFeature(features, VIRTIO_RING_F_INDIRECT_DESC);
    const scan = options.scanTargets ?? DEFAULT_SCAN_TARGETS;
    this.#scanner = new LunScanner({
      command: (target, lun, cdb, dataIn) => this.#probeCommand(target, lun, cdb, dataIn),
      maxLun: config.maxLun,
      scanLimit: Math.min(config.maxTarget, Math.max(0, Math.floor(scan))),
      emit: (event) => this.#emit(event),
    });
  }

  /**
   * Initialises the device in `fn` (negotiation, configuration, queues, DRIVER_OK, event buffers)
   * and scans for disks.
   *
   * @throws {PciProbeError} for unusable virtio structures
   * @throws {VirtioDriverError} when the device refuses, misreports its config, is not
   *   virtio-scsi, or stops answering during the scan (the device is reset and FAILED set)
   * @throws {GuestAllocError} when guest RAM for the rings runs out
   * @throws {RangeError} for options out of range
   */
  static async init(
    platform: GuestPlatform,
    fn: PciFunctionInfo,
    options: ScsiDriverOptions = {},
  ): Promise<ScsiDriver> {
    const eventBuffers = options.eventBuffers ?? DEFAULT_EVENT_BUFFERS;
    if (!Number.isInteger(eventBuffers) || eventBuffers < 1 || eventBuffers > MAX_EVENT_BUFFERS) {
      throw new RangeError(`eventBuffers ${eventBuffers} is not 1..${MAX_EVENT_BUFFERS}`);
    }
    const senseSize = options.senseSize ?? VIRTIO_SCSI_SENSE_DEFAULT_SIZE;
    const cdbSize = options.cdbSize ?? VIRTIO_SCSI_CDB_DEFAULT_SIZE;
    if (!Number.isInteger(senseSize) || senseSize < 0 || senseSize > 4096) {
      throw new RangeError(`senseSize ${senseSize} is not 0..4096`);
    }
    if (!Number.isInteger(cdbSize) || cdbSize < 16 || cdbSize > 255) {
      throw new RangeError(`cdbSize ${cdbSize} is not 16..255`);
    }
    const virtio = new VirtioPciDriver(platform, fn);
    if (virtio.structures.virtioId !== VIRTIO_ID_SCSI) {
      throw new VirtioDriverError(
        "status",
        fn.slot,
        `virtio device id ${virtio.structures.virtioId} is not a SCSI host`,
      );
    }
    virtio.begin(options.resetTimeoutMs ?? 1000);
    let wanted = 0n;
    if (options.hotplug ?? true) wanted |= featureBit(VIRTIO_SCSI_F_HOTPLUG);
    if (options.change ?? true) wanted |= featureBit(VIRTIO_SCSI_F_CHANGE);
    if (options.indirect ?? true) wanted |= featureBit(VIRTIO_RING_F_INDIRECT_DESC);
    if (options.eventIdx ?? true) wanted |= featureBit(VIRTIO_RING_F_EVENT_IDX);
    if (options.packed ?? false) wanted |= featureBit(VIRTIO_F_RING_PACKED);
    wanted &= ~(options.exclude ?? 0n);
    const features = virtio.negotiate(wanted);
    let driver: ScsiDriver | null = null;
    try {
      // Linux writes its fixed sizes (96, 32) before reading the config; we read back what stuck.
      virtio.writeConfig(VIRTIO_SCSI_CONFIG_SENSE_SIZE, 4, senseSize);
      virtio.writeConfig(VIRTIO_SCSI_CONFIG_CDB_SIZE, 4, cdbSize);
      const config = readScsiConfig(virtio);
      driver = new ScsiDriver(platform, virtio, features, config, options);
      const self = driver;
      const requestQueues = Math.min(
        Math.max(1, Math.floor(options.queues ?? 1)),
        config.numQueues,
      );
      const eventRing = 2 ** Math.ceil(Math.log2(eventBuffers));
      const queues = virtio.setupQueues(
        [
          { size: 16 },
          { size: eventRing },
          ...Array.from({ length: requestQueues }, () => ({ size: options.queueSize ?? 256 })),
        ],
        { onQueue: (index) => self.#harvest(index) },
        options.interrupts === undefined ? {} : { interrupts: options.interrupts },
      );
      const control = new ScsiControlQueue(platform, queues[VIRTIO_SCSI_VQ_CONTROL]!);
      driver.#control = control;
      const events = new ScsiEventQueue({
        platform,
        virtio,
        vq: queues[VIRTIO_SCSI_VQ_EVENT]!,
        stats: driver.eventStats,
        scanner: driver.#scanner,
      });
      driver.#events = events;
      if (events.vq.size < eventBuffers) {
        throw new VirtioDriverError(
          "queue-size-refused",
          fn.slot,
          `event queue of ${events.vq.size} cannot hold ${eventBuffers} event buffers`,
        );
      }
      for (const vq of queues.slice(VIRTIO_SCSI_VQ_REQUEST)) {
        driver.#queues.push(new SlotQueue(vq, driver.#indirect));
      }
      control.alloc();
      driver.#allocCommandSlot();
      virtio.driverOk();
      // As virtscsi_probe: event buffers go in once the device is live, and only for events
      // the device may send.
      if (
        hasFeature(features, VIRTIO_SCSI_F_HOTPLUG) || hasFeature(features, VIRTIO_SCSI_F_CHANGE)
      ) {
        events.post(eventBuffers);
      }
      await driver.#exclusive(() => self.#scanner.scanAll("scan"));
      return driver;
    } catch (error) {
      // virtscsi_probe's error path resets and frees the queues; the core then sets FAILED.
      if (driver !== null) driver.shutdown();
      else virtio.shutdown();
      virtio.fail();
      throw error;
    }
  }

  /** Request queues set up. */
  get numQueues(): number {
    return this.#queues.length;
  }

  /** The disks found, by target then LUN. */
  get luns(): readonly ScsiLun[] {
    return this.#scanner.luns;
  }

  /** The disk at `target`:`lun`, if the driver knows one there. */
  findLun(target: number, lun: number): ScsiLun | undefined {
    return this.#scanner.find(target, lun);
  }

  /** Largest read/write in one command the device allows (max_sectors; 0 means no hint). */
  get maxTransferLimit(): number {
    const sectors = this.config.maxSectors;
    return sectors === 0 ? Number.MAX_SAFE_INTEGER : sectors * SECTOR;
  }

  /** Largest read/write in one command for `lun`: the device's and the LUN's limits. */
  maxTransferFor(lun: ScsiLun): number {
    const lunLimit = lun.maxTransferBlocks === 0
      ? Number.MAX_SAFE_INTEGER
      : lun.maxTransferBlocks * lun.blockSize;
    const limit = Math.min(this.maxTransferLimit, lunLimit);
    return Math.floor(limit / lun.blockSize) * lun.blockSize;
  }

  /**
   * Opens a target for `lun` on request queue `queue` with `depth` pre-allocated command slots.
   * The depth is capped at the device's cmd_per_lun (the midlayer's queue depth limit).
   *
   * @throws {RangeError} for an unknown or removed LUN, a queue that does not exist, or sizes the
   *   device cannot take
   * @throws {GuestAllocError} when guest RAM runs out
   */
  openTarget(options: {
    readonly lun: ScsiAddress;
    readonly queue?: number;
    readonly depth?: number;
    readonly maxTransfer?: number;
  }): ScsiTarget {
    const state = this.#scanner.find(options.lun.target, options.lun.lun);
    if (state === undefined || state.removed) {
      throw new RangeError(
        `No disk at target ${options.lun.target} LUN ${options.lun.lun} (found: ${
          this.#scanner.luns.map((l) => `${l.target}:${l.lun}`).join(", ") || "none"
        })`,
      );
    }
    const queueIndex = options.queue ?? 0;
    if (this.#queues[queueIndex] === undefined) {
      throw new RangeError(`Queue ${queueIndex} is not 0..${this.#queues.length - 1}`);
    }
    const wantDepth = options.depth ?? 32;
    if (!Number.isInteger(wantDepth) || wantDepth < 1 || wantDepth > 65536) {
      throw new RangeError(`Target depth ${wantDepth} is not 1..65536`);
    }
    const depth = this.config.cmdPerLun > 0
      ? Math.min(wantDepth, this.config.cmdPerLun)
      : wantDepth;
    const maxTransfer = options.maxTransfer ?? 128 * 1024;
    const bs = state.blockSize;
    if (!Number.isInteger(maxTransfer) || maxTransfer < bs || maxTransfer % bs !== 0) {
      throw new RangeError(`Target transfer size ${maxTransfer} is not a multiple of ${bs}`);
    }
    if (maxTransfer > this.maxTransferFor(state)) {
      throw new RangeError(
        `Transfer size ${maxTransfer} exceeds the LUN's limit of ${this.maxTransferFor(state)}`,
      );
    }
    return new ScsiTarget(this, state, queueIndex, depth, maxTransfer);
  }

  // ---- Slots ----------------------------------------------------------------------------------------

  /** @internal Slot memory and registration, for the targets and the driver's own slot. */
  _allocSlots(owner: SlotOwner, queueIndex: number, depth: number, dataBytes: number): {
    slots: Slot[];
    memory: number[];
  } {
    return allocSlots({
      platform: this.#platform,
      ram: this.#ram,
      queue: this.#queues[queueIndex]!,
      queueIndex,
      cdbSize: this.config.cdbSize,
      senseSize: this.config.senseSize,
      owner,
      depth,
      dataBytes,
    });
  }

  /** @internal Forgets closed slots and frees their memory. */
  _freeSlots(slots: readonly Slot[], memory: readonly number[]): void {
    for (const slot of slots) this.#queues[slot.queue]!.slots[slot.token] = undefined;
    for (const at of memory) this.#platform.alloc.free(at);
  }

  /** @internal Puts a slot's chain in the ring, or behind the pending ones. */
  _enqueue(slot: Slot): void {
    this.#queues[slot.queue]!.enqueue(slot);
  }

  /** @internal Moves pending slots into the ring while it has room, publishes, notifies. */
  _kick(queueIndex: number): void {
    this.#queues[queueIndex]!.kick();
  }

  // ---- Interrupts ----------------------------------------------------------------------------------

  #harvest(index: number): void {
    if (this.virtio.broken !== null) return;
    try {
      if (index === VIRTIO_SCSI_VQ_CONTROL) this.#control?.harvest(() => this.#completions++);
      else if (index === VIRTIO_SCSI_VQ_EVENT) this.#events?.harvest();
      else this.#harvestRequests(index - VIRTIO_SCSI_VQ_REQUEST);
    } catch (error) {
      // A device that breaks the ring rules is unusable: Linux marks the virtqueue broken.
      if (!(error instanceof RangeError)) throw error;
      this.virtio.markBroken(`queue ${index}: ${error.message}`);
    }
  }

  /** Linux's virtscsi_vq_done loop over a request queue: decode each response, let its owner judge. */
  #harvestRequests(queueIndex: number): void {
    const queue = this.#queues[queueIndex];
    if (queue === undefined) return;
    const ring = queue.vq.ring;
    const ram = this.#ram;
    const senseSize = this.config.senseSize;
    let again = false;
    do {
      ring.disableInterrupts();
      for (let used = ring.getUsed(); used !== null; used = ring.getUsed()) {
        const slot = queue.slots[used.token];
        if (slot === undefined || slot.state !== IN_DEVICE) {
          throw new RangeError(`Device completed request ${used.token}, which is not in flight`);
        }
        readResponse(ram, slot, used.written, senseSize);
        if (slot.response === VIRTIO_SCSI_S_OK && slot.key === UNIT_ATTENTION) {
          this.#unitAttention(slot);
        }
        if (slot.owner._finish(slot)) {
          // A retry: the same chain again, behind what waits for ring room. It goes into the
          // ring after this loop (never while the used ring is being walked).
          this.eventStats.retries++;
          queue.requeue(slot);
          again = true;
        } else {
          this.#completions++;
        }
      }
    } while (ring.enableInterrupts());
    if (again || queue.hasPending) this._kick(queueIndex);
  }

  /** A unit attention on any command: what scsi_check_sense reacts to besides the retry. */
  #unitAttention(slot: Slot): void {
    this.eventStats.unitAttentions++;
    const owner = slot.owner;
    if (!(owner instanceof ScsiTarget)) return;
    const { target, lun } = owner.lun;
    if (slot.asc === 0x2a && slot.ascq === 0x09) {
      this.#events?.queue({ kind: "capacity", target, lun });
    } else if (slot.asc === 0x3f && slot.ascq === 0x0e) {
      this.#events?.queue({ kind: "rescan-target", target });
    }
  }

  // ---- Events ----------------------------------------------------------------------------------------

  /**
   * True when events or unit attentions left work for {@linkcode processEvents} (takes pending
   * interrupts first, so that events already delivered count).
   */
  hasPendingWork(): boolean {
    this.#platform.interrupts.dispatchPending();
    return this.#events?.hasWork ?? false;
  }

  /**
   * Runs the work events left (see `scsi_events.ts`), in order: probes, removals, capacity
   * re-reads, rescans; re-posts each event buffer once its event is handled.
   *
   * @returns the work items done
   * @throws {VirtioDriverError} when the device breaks or stops answering
   */
  processEvents(): Promise<number> {
    return this.#exclusive(() => {
      this.#platform.interrupts.dispatchPending();
      return this.#events!.runAll();
    });
  }

  /**
   * Waits (idling the guest) until the event queue delivers something or `timeoutMs` passes,
   * then runs {@linkcode processEvents}.
   *
   * @returns the work items done (0 after a timeout)
   */
  async waitForEvents(timeoutMs = 1000): Promise<number> {
    const until = performance.now() + timeoutMs;
    while (!this.hasPendingWork() && performance.now() < until) {
      this.#checkBroken();
      const idle = this.#platform.idle();
      if (idle instanceof Promise) await idle;
    }
    return await this.processEvents();
  }

  /** @internal Whether a target's wait should run processEvents now. */
  get _eventWorkDue(): boolean {
    return this.#events?.due ?? false;
  }

  /** Runs `fn` with the driver's command slot to itself. */
  #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#commandLock.then(fn);
    this.#commandLock = run.then(() => {}, () => {});
    return run;
  }

  // ---- Scanning --------------------------------------------------------------------------------------

  /**
   * Scans every target again: new disks are added, disks no longer reported are removed, known
   * ones get their capacity re-read.
   *
   * @throws {VirtioDriverError} when the device breaks or stops answering
   */
  rescan(): Promise<void> {
    return this.#exclusive(() => this.#scanner.scanAll("scan"));
  }

  #emit(event: ScsiLunEvent): void {
    this.lunEvents.push(event);
    this.onLunEvent?.(event);
  }

  // ---- The driver's own commands ---------------------------------------------------------------------

  #allocCommandSlot(): void {
    const owner: SlotOwner = {
      _finish: (slot) => {
        slot.state = COMPLETED;
        return false;
      },
    };
    const { slots, memory } = this._allocSlots(owner, 0, 1, COMMAND_BUFFER_BYTES);
    this.#commandSlot = slots[0]!;
    this.#commandMem = memory;
  }

  /** A probe command, retried while it ends in a unit attention (scsi_test_unit_ready's way). */
  async #probeCommand(
    target: number,
    lun: number,
    cdb: readonly number[],
    dataIn: number,
  ): Promise<CommandOutcome> {
    let out = await this.#command(target, lun, cdb, dataIn);
    for (let tries = 1; tries < PROBE_UA_TRIES; tries++) {
      if (out.response !== VIRTIO_SCSI_S_OK || out.key !== UNIT_ATTENTION) break;
      this.eventStats.retries++;
      out = await this.#command(target, lun, cdb, dataIn);
    }
    return out;
  }

  /** Sends one CDB to `target`:`lun` from the driver's command slot and waits for it. */
  async #command(
    target: number,
    lun: number,
    cdb: readonly number[],
    dataIn: number,
  ): Promise<CommandOutcome> {
    const slot = this.#commandSlot!;
    const ram = this.#ram;
    writeLun(ram, slot.reqOff, target, lun);
    const cdbAt = slot.reqOff + VIRTIO_SCSI_REQ_CDB;
    for (let i = 0; i < this.config.cdbSize; i++) ram.setUint8(cdbAt + i, cdb[i] ?? 0);
    armResponse(ram, slot);
    slot.readable.length = 0;
    slot.writable.length = 0;
    slot.readable.push(slot.req);
    slot.writable.push(slot.resp);
    if (dataIn > 0) {
      slot.data.length = dataIn;
      slot.writable.push(slot.data);
    }
    slot.retries = 0;
    this._enqueue(slot);
    this._kick(slot.queue);
    await this.#waitFor(() => slot.state === COMPLETED);
    slot.state = FREE;
    const got = Math.max(0, Math.min(dataIn, dataIn - slot.residual));
    return {
      response: slot.response,
      status: slot.status,
      key: slot.key,
      asc: slot.asc,
      ascq: slot.ascq,
      data: slot.request.data.slice(0, got),
    };
  }

  /** Idles until `done()` holds, with the request timeout. */
  async #waitFor(done: () => boolean): Promise<void> {
    const interrupts = this.#platform.interrupts;
    let seen = this.#completions;
    let progressAt = performance.now();
    for (;;) {
      interrupts.dispatchPending();
      if (done()) return;
      this.#checkBroken();
      const idle = this.#platform.idle();
      if (idle instanceof Promise) await idle;
      interrupts.dispatchPending();
      if (done()) return;
      this.#checkBroken();
      const now = performance.now();
      if (this.#completions !== seen) {
        seen = this.#completions;
        progressAt = now;
      } else if (now - progressAt >= this.#timeoutMs) {
        const why = this.virtio.checkStatus();
        if (why !== null) throw new VirtioDriverError("needs-reset", this.virtio.slot, why);
        throw new VirtioDriverError(
          "request-timeout",
          this.virtio.slot,
          `a driver command got no completion for ${this.#timeoutMs} ms`,
        );
      }
    }
  }

  #checkBroken(): void {
    const why = this.virtio.broken;
    if (why !== null) throw new VirtioDriverError("needs-reset", this.virtio.slot, why);
  }

  // ---- Task management -------------------------------------------------------------------------------

  /**
   * LOGICAL UNIT RESET through the control queue (what Linux's eh_device_reset_handler sends).
   * The unit then reports POWER ON, RESET to its next command, which the targets retry.
   *
   * @returns the TMF response code (0, FUNCTION COMPLETE, on success)
   * @throws {VirtioDriverError} when the device breaks or stops answering
   */
  resetLun(target: number, lun: number): Promise<number> {
    return this.#exclusive(() =>
      this.#control!.resetLun(target, lun, (done) => this.#waitFor(done))
    );
  }

  // ---- Internals for the targets ---------------------------------------------------------------------

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

  /** @internal A view of all guest RAM, for header writes at translated offsets. */
  _ram(): DataView {
    return this.#ram;
  }

  /** Counters of every request queue (virtqueue index in `queue`). */
  stats(): ScsiQueueStats[] {
    return this.#queues.map((q) => q.stats());
  }

  /** Resets the device and releases its rings, vectors and the driver's buffers. Close targets first. */
  shutdown(): void {
    try {
      this.virtio.shutdown();
    } finally {
      const alloc = this.#platform.alloc;
      if (this.#commandSlot !== null) {
        for (const at of this.#commandMem) alloc.free(at);
        this.#commandSlot = null;
      }
      this.#events?.free();
      this.#control?.free();
    }
  }
}
