/**
 * virtio-scsi (device id 8): the VMM-side model ({@linkcode VirtioScsiModel}: features, config
 * space) and the iothread back-end ({@linkcode VirtioScsiBackend}: control, event and request
 * queues over a {@linkcode ScsiBus} of {@linkcode ScsiDisk}s), after QEMU's `hw/scsi/virtio-scsi.c`;
 * and {@linkcode deviceType}, how the machine plugs it in (this module is also the back-end module
 * the iothread imports for {@linkcode createBackend}).
 *
 * Across threads: the model lives in the VMM, the back-end in the device's iothread Worker. They
 * share one small `SharedArrayBuffer` ({@linkcode VirtioScsiSharedConfig}) holding the
 * driver-writable `sense_size` and `cdb_size` (and the address limits), so the back-end reads the
 * sizes the driver last wrote for every request, as QEMU does, without a message round trip.
 * `createBackend` makes it and returns its buffer as the back-end info; `createModel` wraps it:
 *
 * ```ts ignore
 * // iothread: createBackend({ spec, drives }) → { backend, info: { shared } }
 * backend.hooks = {
 *   interrupt: (q) => { if (irq.epoch === epoch) irq.notifyQueue(q); },
 *   needsReset: (e) => fault(epoch, 1, e),
 * };
 * // VMM: createModel(spec, { drives, backend: info }) → a model over the same words
 * ```
 *
 * Events (hotplug, unplug, capacity change) happen outside any kick, so the back-end raises the
 * event queue's interrupt through {@linkcode VirtioScsiHooks.interrupt}, and reports a malformed
 * event buffer found there through {@linkcode VirtioScsiHooks.needsReset}. Without hooks the event
 * is still delivered into the buffer, but no interrupt announces it.
 *
 * Requests are processed one at a time per back-end, in ring order, and complete before the next
 * is popped; {@linkcode VirtioScsiBackend.processQueue} calls are serialized with each other and
 * with {@linkcode VirtioScsiBackend.unplug}. So a task management function always finds no
 * command in flight: the "affected commands" completed before it was even popped, and ABORT TASK
 * and friends answer FUNCTION COMPLETE.
 *
 * @module
 */
import { z } from "zod";
import type { BlockNode } from "../block/node.ts";
import { ScsiBuffer } from "../scsi/buffer.ts";
import { ScsiBus } from "../scsi/bus.ts";
import { DATA_IN, DATA_OUT } from "../scsi/cdb.ts";
import { GOOD } from "../scsi/constants.ts";
import { ScsiDisk, type ScsiDiskOptions } from "../scsi/disk.ts";
import type { ScsiIo, ScsiOutcome } from "../scsi/request.ts";
import { SCSI_SENSE_LEN, type SenseCode, writeFixedSense } from "../scsi/sense.ts";
import {
  type ActivatedQueue,
  PCI_CLASS_STORAGE_SCSI,
  PCI_SUBDEVICE_ID_QEMU,
  type VirtioDeviceModel,
} from "../virtio/device.ts";
import {
  featureBit,
  hasFeature,
  VIRTIO_F_RING_PACKED,
  VIRTIO_ID_SCSI,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import { type DescriptorChain, type DeviceQueue, VirtqueueError } from "../virtio/queue.ts";
import type { DeviceBackend } from "./backend.ts";
import type {
  BackendInit,
  BackendReady,
  DeviceInfo,
  DeviceSpec,
  DeviceType,
} from "./device_type.ts";
import {
  VIRTIO_SCSI_AN_REQ_SIZE,
  VIRTIO_SCSI_AN_RESP_SIZE,
  VIRTIO_SCSI_CDB_DEFAULT_SIZE,
  VIRTIO_SCSI_CDB_SIZE_LIMIT,
  VIRTIO_SCSI_CMD_REQ_HEADER,
  VIRTIO_SCSI_CMD_RESP_HEADER,
  VIRTIO_SCSI_CONFIG_CDB_SIZE,
  VIRTIO_SCSI_CONFIG_CMD_PER_LUN,
  VIRTIO_SCSI_CONFIG_EVENT_INFO_SIZE,
  VIRTIO_SCSI_CONFIG_MAX_CHANNEL,
  VIRTIO_SCSI_CONFIG_MAX_LUN,
  VIRTIO_SCSI_CONFIG_MAX_SECTORS,
  VIRTIO_SCSI_CONFIG_MAX_TARGET,
  VIRTIO_SCSI_CONFIG_NUM_QUEUES,
  VIRTIO_SCSI_CONFIG_SEG_MAX,
  VIRTIO_SCSI_CONFIG_SENSE_SIZE,
  VIRTIO_SCSI_CONFIG_SIZE,
  VIRTIO_SCSI_EVENT_SIZE,
  VIRTIO_SCSI_EVT_RESET_REMOVED,
  VIRTIO_SCSI_EVT_RESET_RESCAN,
  VIRTIO_SCSI_F_CHANGE,
  VIRTIO_SCSI_F_HOTPLUG,
  VIRTIO_SCSI_MAX_CHANNEL,
  VIRTIO_SCSI_MAX_LUN,
  VIRTIO_SCSI_MAX_TARGET,
  VIRTIO_SCSI_RESP_RESIDUAL,
  VIRTIO_SCSI_RESP_RESPONSE,
  VIRTIO_SCSI_RESP_SENSE,
  VIRTIO_SCSI_RESP_SENSE_LEN,
  VIRTIO_SCSI_RESP_STATUS,
  VIRTIO_SCSI_S_BAD_TARGET,
  VIRTIO_SCSI_S_FAILURE,
  VIRTIO_SCSI_S_FUNCTION_REJECTED,
  VIRTIO_SCSI_S_INCORRECT_LUN,
  VIRTIO_SCSI_S_OK,
  VIRTIO_SCSI_S_OVERRUN,
  VIRTIO_SCSI_SENSE_DEFAULT_SIZE,
  VIRTIO_SCSI_SENSE_SIZE_LIMIT,
  VIRTIO_SCSI_T_AN_QUERY,
  VIRTIO_SCSI_T_AN_SUBSCRIBE,
  VIRTIO_SCSI_T_EVENTS_MISSED,
  VIRTIO_SCSI_T_NO_EVENT,
  VIRTIO_SCSI_T_PARAM_CHANGE,
  VIRTIO_SCSI_T_TMF,
  VIRTIO_SCSI_T_TMF_ABORT_TASK,
  VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
  VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
  VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
  VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
  VIRTIO_SCSI_T_TMF_QUERY_TASK,
  VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
  VIRTIO_SCSI_T_TRANSPORT_RESET,
  VIRTIO_SCSI_TMF_REQ_SIZE,
  VIRTIO_SCSI_TMF_RESP_SIZE,
  VIRTIO_SCSI_VQ_CONTROL,
  VIRTIO_SCSI_VQ_EVENT,
  VIRTIO_SCSI_VQ_REQUEST,
} from "../virtio/virtio_scsi_constants.ts";

// ---- Shared configuration ------------------------------------------------------------------------

const W_SENSE_SIZE = 0;
const W_CDB_SIZE = 1;
const W_MAX_TARGET = 2;
const W_MAX_LUN = 3;
const SHARED_WORDS = 4;

/**
 * The part of the device configuration both halves need, in a `SharedArrayBuffer`: the
 * driver-writable `sense_size` and `cdb_size` (the model writes, the back-end reads per request)
 * and the address limits (fixed at creation).
 */
export class VirtioScsiSharedConfig {
  /** Bytes the shared buffer needs. */
  static readonly BYTES = SHARED_WORDS * 4;
  readonly buffer: SharedArrayBuffer;
  readonly #w: Int32Array;

  /**
   * @param buffer an existing buffer (from the other thread's instance); a fresh one holds the
   *   defaults (sense 96, CDB 32, target 255, LUN 16383)
   * @throws {RangeError} for a buffer of the wrong size
   */
  constructor(buffer?: SharedArrayBuffer, limits: { maxTarget?: number; maxLun?: number } = {}) {
    if (buffer !== undefined && buffer.byteLength !== VirtioScsiSharedConfig.BYTES) {
      throw new RangeError(
        `virtio-scsi shared config needs ${VirtioScsiSharedConfig.BYTES} bytes, got ${buffer.byteLength}`,
      );
    }
    this.buffer = buffer ?? new SharedArrayBuffer(VirtioScsiSharedConfig.BYTES);
    this.#w = new Int32Array(this.buffer);
    if (buffer === undefined) {
      const maxTarget = limits.maxTarget ?? VIRTIO_SCSI_MAX_TARGET;
      const maxLun = limits.maxLun ?? VIRTIO_SCSI_MAX_LUN;
      if (!Number.isInteger(maxTarget) || maxTarget < 0 || maxTarget > VIRTIO_SCSI_MAX_TARGET) {
        throw new RangeError(`max_target ${maxTarget} is not 0..${VIRTIO_SCSI_MAX_TARGET}`);
      }
      if (!Number.isInteger(maxLun) || maxLun < 0 || maxLun > VIRTIO_SCSI_MAX_LUN) {
        throw new RangeError(`max_lun ${maxLun} is not 0..${VIRTIO_SCSI_MAX_LUN}`);
      }
      Atomics.store(this.#w, W_MAX_TARGET, maxTarget);
      Atomics.store(this.#w, W_MAX_LUN, maxLun);
      this.reset();
    }
  }

  /** `sense_size`: bytes of sense buffer in each command response. */
  get senseSize(): number {
    return Atomics.load(this.#w, W_SENSE_SIZE);
  }

  /** `cdb_size`: bytes of CDB in each command request. */
  get cdbSize(): number {
    return Atomics.load(this.#w, W_CDB_SIZE);
  }

  get maxTarget(): number {
    return Atomics.load(this.#w, W_MAX_TARGET);
  }

  get maxLun(): number {
    return Atomics.load(this.#w, W_MAX_LUN);
  }

  /**
   * Stores driver-written sizes. Values the device cannot use (sense ≥ 65536, CDB ≥ 256, QEMU's
   * bounds) leave both unchanged.
   *
   * @returns false when the values were refused
   */
  setSizes(senseSize: number, cdbSize: number): boolean {
    if (
      !Number.isInteger(senseSize) || senseSize < 0 || senseSize >= VIRTIO_SCSI_SENSE_SIZE_LIMIT ||
      !Number.isInteger(cdbSize) || cdbSize < 0 || cdbSize >= VIRTIO_SCSI_CDB_SIZE_LIMIT
    ) {
      return false;
    }
    Atomics.store(this.#w, W_SENSE_SIZE, senseSize);
    Atomics.store(this.#w, W_CDB_SIZE, cdbSize);
    return true;
  }

  /** Device reset: the sizes go back to 96 and 32. */
  reset(): void {
    Atomics.store(this.#w, W_SENSE_SIZE, VIRTIO_SCSI_SENSE_DEFAULT_SIZE);
    Atomics.store(this.#w, W_CDB_SIZE, VIRTIO_SCSI_CDB_DEFAULT_SIZE);
  }
}

// ---- The model (VMM thread) ----------------------------------------------------------------------

/** Options of {@linkcode VirtioScsiModel}. Defaults are QEMU's `virtio-scsi-pci`. */
export interface VirtioScsiOptions {
  /** Request queues (`num_queues`), 1..1022 (default 1). */
  numQueues?: number;
  /** Largest size of every virtqueue (default 256, QEMU's `virtqueue_size`). */
  queueSize?: number;
  /** `max_sectors` (default 0xFFFF). */
  maxSectors?: number;
  /** `cmd_per_lun` (default 128). */
  cmdPerLun?: number;
  /** `max_target`, at most 255 (default 255). */
  maxTarget?: number;
  /** `max_lun`, at most 16383 (default 16383). */
  maxLun?: number;
  /** Offer VIRTIO_SCSI_F_HOTPLUG (default true). */
  hotplug?: boolean;
  /** Offer VIRTIO_SCSI_F_CHANGE (default true). */
  change?: boolean;
  /** Offer VIRTIO_RING_F_INDIRECT_DESC (default true). */
  indirectDesc?: boolean;
  /** Offer VIRTIO_RING_F_EVENT_IDX (default true). */
  eventIdx?: boolean;
  /** Offer VIRTIO_F_RING_PACKED (default false, as QEMU). */
  packed?: boolean;
  /**
   * The back-end's shared config buffer (see {@linkcode VirtioScsiSharedConfig}); its address
   * limits then win over `maxTarget`/`maxLun`. Without it the model makes one.
   */
  shared?: SharedArrayBuffer;
}

/** QEMU's VIRTIO_QUEUE_MAX: the transport allows at most 1024 queues. */
const MAX_QUEUES = 1024;

/**
 * The VMM half of virtio-scsi: identity, features (HOTPLUG, CHANGE and the ring features the
 * options select; never INOUT or T10_PI, like QEMU), the 36-byte config space with its two
 * driver-writable fields, and the lifecycle calls. It keeps no data-path state.
 */
export class VirtioScsiModel implements VirtioDeviceModel {
  readonly deviceId = VIRTIO_ID_SCSI;
  readonly deviceFeatures: bigint;
  readonly numQueues: number;
  readonly configSize = VIRTIO_SCSI_CONFIG_SIZE;
  readonly pciClass = PCI_CLASS_STORAGE_SCSI;
  readonly subsystemId = PCI_SUBDEVICE_ID_QEMU;
  /** Hand `shared.buffer` to the iothread's {@linkcode VirtioScsiBackend}. */
  readonly shared: VirtioScsiSharedConfig;
  /** Request queues (`num_queues`). */
  readonly requestQueues: number;
  readonly queueSize: number;
  readonly maxSectors: number;
  readonly cmdPerLun: number;
  #features = 0n;
  #epoch = 0;

  /** @throws {RangeError} for options outside what the spec or the transport allow */
  constructor(options: VirtioScsiOptions = {}) {
    const requestQueues = options.numQueues ?? 1;
    if (!Number.isInteger(requestQueues) || requestQueues < 1 || requestQueues > MAX_QUEUES - 2) {
      throw new RangeError(`virtio-scsi num_queues ${requestQueues} is not 1..${MAX_QUEUES - 2}`);
    }
    const queueSize = options.queueSize ?? 256;
    if (!Number.isInteger(queueSize) || queueSize < 2 || queueSize > 32768) {
      throw new RangeError(`virtio-scsi queue size ${queueSize} is not 2..32768`);
    }
    this.requestQueues = requestQueues;
    this.numQueues = VIRTIO_SCSI_VQ_REQUEST + requestQueues;
    this.queueSize = queueSize;
    this.maxSectors = u32Option(options.maxSectors ?? 0xffff, "max_sectors");
    this.cmdPerLun = u32Option(options.cmdPerLun ?? 128, "cmd_per_lun");
    const limits: { maxTarget?: number; maxLun?: number } = {};
    if (options.maxTarget !== undefined) limits.maxTarget = options.maxTarget;
    if (options.maxLun !== undefined) limits.maxLun = options.maxLun;
    this.shared = new VirtioScsiSharedConfig(options.shared, limits);
    let f = 0n;
    if (options.hotplug ?? true) f |= featureBit(VIRTIO_SCSI_F_HOTPLUG);
    if (options.change ?? true) f |= featureBit(VIRTIO_SCSI_F_CHANGE);
    if (options.indirectDesc ?? true) f |= featureBit(VIRTIO_RING_F_INDIRECT_DESC);
    if (options.eventIdx ?? true) f |= featureBit(VIRTIO_RING_F_EVENT_IDX);
    if (options.packed ?? false) f |= featureBit(VIRTIO_F_RING_PACKED);
    this.deviceFeatures = f;
  }

  /** `seg_max`: QEMU's `virtqueue_size - 2` (one descriptor each for the headers). */
  get segMax(): number {
    return this.queueSize - 2;
  }

  /** Features accepted at the last FEATURES_OK … DRIVER_OK (0 after reset). */
  get features(): bigint {
    return this.#features;
  }

  /** Resets seen (the `epoch` of the last activation). */
  get epoch(): number {
    return this.#epoch;
  }

  queueMaxSize(index: number): number {
    return Number.isInteger(index) && index >= 0 && index < this.numQueues ? this.queueSize : 0;
  }

  /** The config space as the driver sees it now. */
  configBytes(): Uint8Array {
    const bytes = new Uint8Array(VIRTIO_SCSI_CONFIG_SIZE);
    const v = new DataView(bytes.buffer);
    v.setUint32(VIRTIO_SCSI_CONFIG_NUM_QUEUES, this.requestQueues, true);
    v.setUint32(VIRTIO_SCSI_CONFIG_SEG_MAX, this.segMax, true);
    v.setUint32(VIRTIO_SCSI_CONFIG_MAX_SECTORS, this.maxSectors, true);
    v.setUint32(VIRTIO_SCSI_CONFIG_CMD_PER_LUN, this.cmdPerLun, true);
    v.setUint32(VIRTIO_SCSI_CONFIG_EVENT_INFO_SIZE, VIRTIO_SCSI_EVENT_SIZE, true);
    v.setUint32(VIRTIO_SCSI_CONFIG_SENSE_SIZE, this.shared.senseSize, true);
    v.setUint32(VIRTIO_SCSI_CONFIG_CDB_SIZE, this.shared.cdbSize, true);
    v.setUint16(VIRTIO_SCSI_CONFIG_MAX_CHANNEL, VIRTIO_SCSI_MAX_CHANNEL, true);
    v.setUint16(VIRTIO_SCSI_CONFIG_MAX_TARGET, this.shared.maxTarget, true);
    v.setUint32(VIRTIO_SCSI_CONFIG_MAX_LUN, this.shared.maxLun, true);
    return bytes;
  }

  readConfig(offset: number, dst: Uint8Array): void {
    dst.set(this.configBytes().subarray(offset, offset + dst.length));
  }

  /**
   * A driver write: only `sense_size` and `cdb_size` are writable, and a write may cover part of
   * a field (the bytes land in the current value). Sizes the device cannot use are ignored.
   */
  writeConfig(offset: number, src: Uint8Array): void {
    const bytes = this.configBytes();
    bytes.set(src.subarray(0, Math.max(0, VIRTIO_SCSI_CONFIG_SIZE - offset)), offset);
    const v = new DataView(bytes.buffer);
    this.shared.setSizes(
      v.getUint32(VIRTIO_SCSI_CONFIG_SENSE_SIZE, true),
      v.getUint32(VIRTIO_SCSI_CONFIG_CDB_SIZE, true),
    );
  }

  validateFeatures(_driverFeatures: bigint): boolean {
    // No combination of the offered features is invalid for virtio-scsi.
    return true;
  }

  activate(features: bigint, _queues: readonly ActivatedQueue[], epoch: number): void {
    this.#features = features;
    this.#epoch = epoch;
  }

  reset(): void {
    this.#features = 0n;
    this.shared.reset();
  }
}

function u32Option(v: number, name: string): number {
  if (!Number.isInteger(v) || v < 0 || v > 0xffff_ffff) {
    throw new RangeError(`virtio-scsi ${name} ${v} is not a 32-bit number`);
  }
  return v;
}

// ---- The back-end (iothread) ---------------------------------------------------------------------

/** Which virtio-scsi framing rule the driver broke. */
export type VirtioScsiFault =
  | "short-request" // readable part shorter than the request header
  | "short-response" // writable part shorter than the response header
  | "short-event-buffer"; // an event buffer with fewer than 16 writable bytes

/**
 * The driver broke the virtio-scsi framing rules (QEMU's `virtio_scsi_bad_req`: "wrong size for
 * virtio-scsi headers"): a {@linkcode VirtqueueError} with fault `bad-request`, as the back-end
 * contract names, so the iothread turns it into DEVICE_NEEDS_RESET. It is thrown from
 * {@linkcode VirtioScsiBackend.processQueue} (or passed to {@linkcode VirtioScsiHooks.needsReset}
 * when met outside it); the back-end then ignores its queues until reset.
 */
export class VirtioScsiError extends VirtqueueError {
  /** The rule broken. */
  readonly reason: VirtioScsiFault;

  constructor(reason: VirtioScsiFault, queue: number, detail: string) {
    super("bad-request", queue, `virtio-scsi ${detail} [${reason}]`);
    this.reason = reason;
  }
}

/**
 * How the back-end reaches the machine outside {@linkcode VirtioScsiBackend.processQueue}: events
 * (hotplug, unplug, capacity change) complete buffers on the event queue at any time.
 */
export interface VirtioScsiHooks {
  /** Raise queue `queue`'s used-buffer interrupt (the event queue, 1). */
  interrupt(queue: number): void;
  /** The device must be reset (a malformed event buffer or ring met while delivering an event). */
  needsReset(error: Error): void;
}

/** Options of {@linkcode VirtioScsiBackend}. */
export interface VirtioScsiBackendOptions {
  /** The model's shared config (or its buffer); a standalone back-end gets its own defaults. */
  shared?: VirtioScsiSharedConfig | SharedArrayBuffer;
  /** See {@linkcode VirtioScsiHooks}; may also be set later through `hooks`. */
  hooks?: VirtioScsiHooks;
}

/** Counters of the back-end. */
export interface VirtioScsiStats {
  /** Command requests completed (any response). */
  commands: number;
  /** Control requests completed. */
  controls: number;
  /** Events delivered. */
  events: number;
  /** Events dropped because the driver had posted no event buffer. */
  eventsDropped: number;
}

/** A parsed 8-byte virtio-scsi LUN. */
interface LunAddress {
  target: number;
  lun: number;
}

/**
 * The single-level LUN structure of virtio-scsi, checked as QEMU's `virtio_scsi_device_find`:
 * byte 0 must be 1, byte 2 either 0 or a flat-space byte (40h–7Fh). Bytes 4–7 are not checked.
 */
function parseLun(b: Uint8Array, at: number): LunAddress | null {
  if (b[at] !== 1) return null;
  const hi = b[at + 2]!;
  if (hi !== 0 && (hi < 0x40 || hi >= 0x80)) return null;
  return { target: b[at + 1]!, lun: ((hi << 8) | b[at + 3]!) & 0x3fff };
}

/**
 * Copies the first `length` bytes of `buffers` into `dst`; returns the bytes copied. Headers are a
 * few dozen bytes: a byte loop beats allocating views to `set` them.
 */
function gather(buffers: readonly Uint8Array[], dst: Uint8Array, length: number): number {
  let done = 0;
  for (const b of buffers) {
    const n = Math.min(b.length, length - done);
    for (let i = 0; i < n; i++) dst[done + i] = b[i]!;
    done += n;
    if (done >= length) break;
  }
  return done;
}

/** Copies the first `length` bytes of `src` into `buffers` from their start; returns the bytes copied. */
function scatter(buffers: readonly Uint8Array[], src: Uint8Array, length: number): number {
  let done = 0;
  for (const b of buffers) {
    const n = Math.min(b.length, length - done);
    for (let i = 0; i < n; i++) b[i] = src[done + i]!;
    done += n;
    if (done >= length) break;
  }
  return done;
}

/** Largest command request header: 19 bytes and a CDB of up to 255. */
const MAX_REQ_HEADER = VIRTIO_SCSI_CMD_REQ_HEADER + VIRTIO_SCSI_CDB_SIZE_LIMIT - 1;

/**
 * The iothread half of virtio-scsi.
 *
 * Queue 0 (control) answers task management functions and asynchronous-notification queries;
 * queue 1 (event) holds the driver's event buffers; queues 2.. carry SCSI commands, which run on
 * the {@linkcode bus}'s logical units with their data moved straight between the block node and
 * guest memory.
 */
export class VirtioScsiBackend implements DeviceBackend {
  /** The logical units, by target and LUN. */
  readonly bus: ScsiBus;
  readonly config: VirtioScsiSharedConfig;
  /** Hooks for work outside `processQueue`; set them before the device is activated. */
  hooks: VirtioScsiHooks | null;
  readonly stats: VirtioScsiStats = { commands: 0, controls: 0, events: 0, eventsDropped: 0 };
  readonly #lent = new WeakSet<BlockNode>();

  #queues: ReadonlyArray<DeviceQueue | undefined> = [];
  #features = 0n;
  #activated = false;
  /** Bumped on reset: work that was awaiting when the device reset must not touch the rings. */
  #epoch = 0;
  /** Set when the driver broke the framing rules; cleared by reset. */
  #broken: Error | null = null;
  /** An event was dropped for want of a buffer: flag the next one EVENTS_MISSED. */
  #eventsDropped = false;
  #busy = false;
  /** Inside processQueue: a broken event ring is thrown from there, not sent to the hooks. */
  #inProcessQueue = false;
  readonly #waiters: Array<() => void> = [];
  // Per-request scratch, reused: requests are processed one at a time.
  readonly #req = new Uint8Array(MAX_REQ_HEADER);
  readonly #resp = new Uint8Array(VIRTIO_SCSI_CMD_RESP_HEADER + SCSI_SENSE_LEN);
  readonly #respView = new DataView(this.#resp.buffer);
  readonly #ctl = new Uint8Array(VIRTIO_SCSI_TMF_REQ_SIZE);
  readonly #ctlView = new DataView(this.#ctl.buffer);
  readonly #event = new Uint8Array(VIRTIO_SCSI_EVENT_SIZE);
  readonly #eventView = new DataView(this.#event.buffer);
  readonly #dataIn = new ScsiBuffer();
  readonly #dataOut = new ScsiBuffer();
  readonly #io: ScsiIo = { dataIn: this.#dataIn, dataOut: this.#dataOut };
  #cdbView = this.#req.subarray(VIRTIO_SCSI_CMD_REQ_HEADER, VIRTIO_SCSI_CMD_REQ_HEADER);

  constructor(options: VirtioScsiBackendOptions = {}) {
    const shared = options.shared;
    this.config = shared instanceof VirtioScsiSharedConfig
      ? shared
      : new VirtioScsiSharedConfig(shared);
    this.bus = new ScsiBus({ maxTarget: this.config.maxTarget, maxLun: this.config.maxLun });
    this.hooks = options.hooks ?? null;
  }

  /** Features negotiated at activation (0 before and after a reset). */
  get features(): bigint {
    return this.#features;
  }

  /** The error that stopped the device, until reset. */
  get broken(): Error | null {
    return this.#broken;
  }

  activate(
    _mem: GuestMemory,
    features: bigint,
    queues: ReadonlyArray<DeviceQueue | undefined>,
  ): void {
    // The queues hand out views of guest memory already: the back-end needs no other access.
    this.#features = features;
    this.#queues = queues;
    this.#activated = true;
  }

  /**
   * Device reset: the queues are forgotten, every unit is reset (POWER ON, RESET unit attention)
   * and the EVENTS_MISSED state cleared. Units stay plugged. A request awaiting block I/O when the
   * reset comes completes into nothing.
   */
  reset(): void {
    this.#epoch++;
    this.#queues = [];
    this.#features = 0n;
    this.#activated = false;
    this.#broken = null;
    this.#eventsDropped = false;
    this.bus.reset();
  }

  /** Waits for in-flight work, then flushes and closes every plugged unit's node. */
  async close(): Promise<void> {
    await this.#lock();
    try {
      this.#epoch++;
      this.#activated = false;
      const units = [...this.bus.all()];
      for (const { target, lun } of units) this.bus.detach(target, lun);
      // Nodes lent by the runtime (the iothread's drives) are its to flush and close.
      for (const { disk } of units) if (!this.#lent.has(disk.node)) await disk.node.close();
    } finally {
      this.#unlock();
    }
  }

  /**
   * Like {@linkcode hotplug}, for a node the caller keeps owning: {@linkcode close} leaves it open
   * (the iothread flushes and closes its drives itself).
   */
  lend(target: number, lun: number, node: BlockNode, options?: ScsiDiskOptions): ScsiDisk {
    const disk = this.hotplug(target, lun, node, options);
    this.#lent.add(node);
    return disk;
  }

  /**
   * Plugs `node` in as a disk at `target`:`lun`. Once the driver is running and negotiated
   * VIRTIO_SCSI_F_HOTPLUG, a TRANSPORT_RESET/RESCAN event tells it; the target's other units get
   * REPORTED LUNS DATA HAS CHANGED. Before activation this is a cold plug. The back-end owns the
   * node until {@linkcode unplug} hands it back (or {@linkcode close} closes it).
   *
   * @throws {RangeError} for an address beyond max_target/max_lun or already in use
   */
  hotplug(target: number, lun: number, node: BlockNode, options?: ScsiDiskOptions): ScsiDisk {
    const disk = new ScsiDisk(node, options);
    this.bus.attach(target, lun, disk);
    disk.onChange = (code) => this.#reportChange(target, lun, code);
    if (this.#activated && hasFeature(this.#features, VIRTIO_SCSI_F_HOTPLUG)) {
      this.#pushEvent(VIRTIO_SCSI_T_TRANSPORT_RESET, target, lun, VIRTIO_SCSI_EVT_RESET_RESCAN);
    }
    return disk;
  }

  /**
   * Unplugs the unit at `target`:`lun` once no request is being processed, tells the driver
   * (TRANSPORT_RESET/REMOVED, with HOTPLUG) and hands the node back to the caller.
   *
   * @throws {RangeError} when there is no unit there
   */
  async unplug(target: number, lun: number): Promise<BlockNode> {
    await this.#lock();
    try {
      const disk = this.bus.detach(target, lun);
      disk.onChange = null;
      if (this.#activated && hasFeature(this.#features, VIRTIO_SCSI_F_HOTPLUG)) {
        this.#pushEvent(VIRTIO_SCSI_T_TRANSPORT_RESET, target, lun, VIRTIO_SCSI_EVT_RESET_REMOVED);
      }
      return disk.node;
    } finally {
      this.#unlock();
    }
  }

  /** The unit at `target`:`lun`. */
  find(target: number, lun: number): ScsiDisk | undefined {
    return this.bus.find(target, lun);
  }

  /** A unit reported a change (capacity): PARAM_CHANGE with the sense code, with CHANGE. */
  #reportChange(target: number, lun: number, code: SenseCode): void {
    if (!this.#activated || !hasFeature(this.#features, VIRTIO_SCSI_F_CHANGE)) return;
    this.#pushEvent(VIRTIO_SCSI_T_PARAM_CHANGE, target, lun, code.asc | (code.ascq << 8));
  }

  // A mutex with a synchronous fast path: processQueue, unplug and close never interleave.
  #lock(): Promise<void> | undefined {
    if (!this.#busy) {
      this.#busy = true;
      return undefined;
    }
    return new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  #unlock(): void {
    const next = this.#waiters.shift();
    if (next !== undefined) next();
    else this.#busy = false;
  }

  /**
   * The event queue is not for polling: the driver's buffers wait there until the device has an
   * event, so polling would find "work" for ever (QEMU does not poll it either). It is drained on
   * kicks.
   */
  pollable(queue: number): boolean {
    return queue !== VIRTIO_SCSI_VQ_EVENT;
  }

  /**
   * Drains queue `queue` after a kick.
   *
   * @throws {VirtqueueError} when the driver broke the ring rules
   * @throws {VirtioScsiError} (a `VirtqueueError`, fault `bad-request`) when a request's headers
   *   do not fit its buffers
   */
  async processQueue(queue: number, interrupt: () => void): Promise<void> {
    const wait = this.#lock();
    if (wait !== undefined) await wait;
    this.#inProcessQueue = true;
    try {
      if (this.#broken !== null || !this.#activated) return;
      const dq = this.#queues[queue];
      if (dq === undefined) return;
      if (queue === VIRTIO_SCSI_VQ_EVENT) {
        // New event buffers: report the drop QEMU-style, with a NO_EVENT flagged EVENTS_MISSED.
        if (this.#eventsDropped) this.#pushEvent(VIRTIO_SCSI_T_NO_EVENT, -1, 0, 0, interrupt);
        if (this.#broken !== null) throw this.#broken;
        return;
      }
      await this.#drain(dq, queue, interrupt);
    } finally {
      this.#inProcessQueue = false;
      this.#unlock();
    }
  }

  async #drain(dq: DeviceQueue, queue: number, interrupt: () => void): Promise<void> {
    const epoch = this.#epoch;
    const control = queue === VIRTIO_SCSI_VQ_CONTROL;
    do {
      dq.disableNotifications();
      let chain: DescriptorChain | null;
      while ((chain = dq.pop()) !== null) {
        let written: number;
        try {
          written = control ? this.#control(chain, queue) : await this.#command(chain, queue);
        } catch (e) {
          // A framing error: QEMU drops the element and marks the device broken; what completed
          // before it is still published (unless a reset took the ring away meanwhile).
          if (epoch === this.#epoch) {
            this.#broken = e instanceof Error ? e : new Error(String(e));
            if (dq.publish()) interrupt();
          }
          throw e;
        }
        // The device was reset while this request awaited its I/O: the ring is gone.
        if (epoch !== this.#epoch) return;
        dq.push(chain, written);
        // An event delivery inside the command (capacity change) may have broken the device.
        if (this.#broken !== null) {
          if (dq.publish()) interrupt();
          throw this.#broken;
        }
      }
      if (dq.publish()) interrupt();
    } while (dq.enableNotifications());
  }

  /** One command request; returns the bytes written to its writable part. */
  async #command(chain: DescriptorChain, queue: number): Promise<number> {
    const cdbSize = this.config.cdbSize;
    const senseSize = this.config.senseSize;
    const reqSize = VIRTIO_SCSI_CMD_REQ_HEADER + cdbSize;
    const respSize = VIRTIO_SCSI_CMD_RESP_HEADER + senseSize;
    // Guest-controlled lengths: a header that does not fit is a device error, as in QEMU.
    if (chain.readableLength < reqSize) {
      throw new VirtioScsiError(
        "short-request",
        queue,
        `command request of ${chain.readableLength} bytes, header needs ${reqSize}`,
      );
    }
    if (chain.writableLength < respSize) {
      throw new VirtioScsiError(
        "short-response",
        queue,
        `command response of ${chain.writableLength} bytes, header needs ${respSize}`,
      );
    }
    this.stats.commands++;
    // Copy the header once: the driver may rewrite guest memory while we work.
    const req = this.#req;
    gather(chain.readable, req, reqSize);
    if (this.#cdbView.length !== cdbSize) {
      this.#cdbView = req.subarray(VIRTIO_SCSI_CMD_REQ_HEADER, reqSize);
    }
    const dataOut = this.#dataOut.set(chain.readable, reqSize);
    const dataIn = this.#dataIn.set(chain.writable, respSize);
    try {
      // Data in both directions needs VIRTIO_SCSI_F_INOUT, which is not offered (QEMU: FAILURE).
      if (dataOut.length > 0 && dataIn.length > 0) {
        return this.#respond(chain, respSize, VIRTIO_SCSI_S_FAILURE);
      }
      const addr = parseLun(req, 0);
      if (addr === null || !this.bus.hasTarget(addr.target)) {
        return this.#respond(chain, respSize, VIRTIO_SCSI_S_BAD_TARGET);
      }
      // One lookup for decode and execute; without a unit there the bus answers for the target.
      const disk = this.bus.find(addr.target, addr.lun);
      const cdb = this.#cdbView;
      const cmd = disk !== undefined
        ? disk.decode(cdb)
        : this.bus.decode(addr.target, addr.lun, cdb);
      // The CDB's data phase must fit the driver's buffers (QEMU's OVERRUN check), except that an
      // allocation length is only an upper bound: a shorter data-in buffer gets what fits.
      if (cmd.direction === DATA_IN) {
        if (dataOut.length > 0 || (!cmd.lengthIsLimit && dataIn.length < cmd.length)) {
          return this.#respond(chain, respSize, VIRTIO_SCSI_S_OVERRUN);
        }
      } else if (cmd.direction === DATA_OUT) {
        if (dataIn.length > 0 || dataOut.length < cmd.length) {
          return this.#respond(chain, respSize, VIRTIO_SCSI_S_OVERRUN);
        }
      }
      let outcome: ScsiOutcome;
      if (disk !== undefined) {
        // The unit's two halves rather than execute(): one promise hop less per request.
        const started = disk.begin(cmd, this.#io);
        outcome = started instanceof Promise ? await started : started;
        disk.complete(cmd, outcome);
      } else {
        outcome = await this.bus.execute(addr.target, addr.lun, cmd, this.#io);
      }
      const resp = this.#resp;
      const view = this.#respView;
      let senseLen = 0;
      let residual = 0;
      if (outcome.status === GOOD) {
        // residual = data_length − bytes transferred (virtio 1.2 5.6.6.1), in either direction.
        residual = Math.max(0, dataIn.length - outcome.dataIn) +
          Math.max(0, dataOut.length - outcome.dataOut);
      } else if (outcome.sense !== null) {
        // Autosense in fixed format, cut to the driver's sense_size (QEMU).
        senseLen = Math.min(
          writeFixedSense(resp, outcome.sense, VIRTIO_SCSI_RESP_SENSE),
          senseSize,
        );
      }
      view.setUint32(VIRTIO_SCSI_RESP_SENSE_LEN, senseLen, true);
      view.setUint32(VIRTIO_SCSI_RESP_RESIDUAL, residual, true);
      view.setUint16(8, 0, true); // status_qualifier
      resp[VIRTIO_SCSI_RESP_STATUS] = outcome.status;
      resp[VIRTIO_SCSI_RESP_RESPONSE] = VIRTIO_SCSI_S_OK;
      scatter(chain.writable, resp, VIRTIO_SCSI_RESP_SENSE + senseLen);
      return respSize + outcome.dataIn;
    } finally {
      // Keep no views of guest memory past the request.
      this.#dataIn.clear();
      this.#dataOut.clear();
    }
  }

  /** A response with only a response code (no status, sense or residual). */
  #respond(chain: DescriptorChain, respSize: number, response: number): number {
    const resp = this.#resp;
    resp.fill(0, 0, VIRTIO_SCSI_CMD_RESP_HEADER);
    resp[VIRTIO_SCSI_RESP_RESPONSE] = response;
    scatter(chain.writable, resp, VIRTIO_SCSI_CMD_RESP_HEADER);
    return respSize;
  }

  /** One control request; returns the bytes written to its writable part. */
  #control(chain: DescriptorChain, queue: number): number {
    const ctl = this.#ctl;
    const view = this.#ctlView;
    ctl.fill(0);
    const got = gather(chain.readable, ctl, ctl.length);
    if (got < 4) {
      throw new VirtioScsiError("short-request", queue, `control request of ${got} bytes`);
    }
    this.stats.controls++;
    const type = view.getUint32(0, true);
    if (type === VIRTIO_SCSI_T_TMF) {
      if (got < VIRTIO_SCSI_TMF_REQ_SIZE) {
        throw new VirtioScsiError("short-request", queue, `TMF request of ${got} bytes`);
      }
      if (chain.writableLength < VIRTIO_SCSI_TMF_RESP_SIZE) {
        throw new VirtioScsiError("short-response", queue, "TMF without a response byte");
      }
      const response = this.#tmf(view.getUint32(4, true), ctl);
      const out = Uint8Array.of(response);
      scatter(chain.writable, out, out.length);
      return VIRTIO_SCSI_TMF_RESP_SIZE;
    }
    if (type === VIRTIO_SCSI_T_AN_QUERY || type === VIRTIO_SCSI_T_AN_SUBSCRIBE) {
      if (got < VIRTIO_SCSI_AN_REQ_SIZE) {
        throw new VirtioScsiError("short-request", queue, `AN request of ${got} bytes`);
      }
      if (chain.writableLength < VIRTIO_SCSI_AN_RESP_SIZE) {
        throw new VirtioScsiError(
          "short-response",
          queue,
          `AN response of ${chain.writableLength} bytes`,
        );
      }
      // No asynchronous notification class is supported: event_actual 0 (QEMU).
      const out = Uint8Array.of(0, 0, 0, 0, VIRTIO_SCSI_S_OK);
      scatter(chain.writable, out, out.length);
      return VIRTIO_SCSI_AN_RESP_SIZE;
    }
    // An unknown type is completed untouched (QEMU), not treated as a framing error.
    return 0;
  }

  /** A task management function (QEMU's `virtio_scsi_do_tmf`); returns the response code. */
  #tmf(subtype: number, req: Uint8Array): number {
    switch (subtype) {
      case VIRTIO_SCSI_T_TMF_ABORT_TASK:
      case VIRTIO_SCSI_T_TMF_QUERY_TASK:
      case VIRTIO_SCSI_T_TMF_ABORT_TASK_SET:
      case VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET:
      case VIRTIO_SCSI_T_TMF_QUERY_TASK_SET:
      case VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET: {
        const addr = parseLun(req, 8);
        if (addr === null || !this.bus.hasTarget(addr.target)) return VIRTIO_SCSI_S_BAD_TARGET;
        const disk = this.bus.find(addr.target, addr.lun);
        if (disk === undefined) return VIRTIO_SCSI_S_INCORRECT_LUN;
        if (subtype === VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET) disk.reset();
        // Commands complete before the next request is popped: the task set is always empty,
        // so an abort has nothing left to abort and a query finds nothing (FUNCTION COMPLETE).
        return VIRTIO_SCSI_S_OK;
      }
      case VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET:
        this.bus.resetTarget(req[8 + 1]!);
        return VIRTIO_SCSI_S_OK;
      default:
        // CLEAR ACA (ACA is not supported) and unknown functions.
        return VIRTIO_SCSI_S_FUNCTION_REJECTED;
    }
  }

  /**
   * Delivers an event into the next event buffer, or remembers that one was dropped. Never
   * throws: a broken event ring marks the device broken; inside `processQueue` that call then
   * throws it, elsewhere it goes to `hooks.needsReset`.
   *
   * @param target -1 for an event without a LUN (NO_EVENT)
   */
  #pushEvent(
    event: number,
    target: number,
    lun: number,
    reason: number,
    interrupt?: () => void,
  ): void {
    if (!this.#activated || this.#broken !== null) return;
    const eq = this.#queues[VIRTIO_SCSI_VQ_EVENT];
    try {
      const chain = eq?.pop() ?? null;
      if (eq === undefined || chain === null) {
        this.#eventsDropped = true;
        this.stats.eventsDropped++;
        return;
      }
      if (chain.writableLength < VIRTIO_SCSI_EVENT_SIZE) {
        throw new VirtioScsiError(
          "short-event-buffer",
          VIRTIO_SCSI_VQ_EVENT,
          `event buffer of ${chain.writableLength} writable bytes`,
        );
      }
      if (this.#eventsDropped) {
        event |= VIRTIO_SCSI_T_EVENTS_MISSED;
        this.#eventsDropped = false;
      }
      const ev = this.#event;
      const view = this.#eventView;
      ev.fill(0);
      view.setUint32(0, event >>> 0, true);
      if (target >= 0) {
        // Linux wants the REPORT LUNS encoding: flat space only from LUN 256 (QEMU).
        ev[4] = 1;
        ev[5] = target;
        ev[6] = lun >= 256 ? 0x40 | (lun >>> 8) : 0;
        ev[7] = lun & 0xff;
      }
      view.setUint32(12, reason >>> 0, true);
      scatter(chain.writable, ev, ev.length);
      eq.push(chain, VIRTIO_SCSI_EVENT_SIZE);
      this.stats.events++;
      if (eq.publish()) (interrupt ?? (() => this.hooks?.interrupt(VIRTIO_SCSI_VQ_EVENT)))();
      // Nothing polls the event queue: ask for a kick when the driver posts past this buffer, as
      // QEMU's pop does (avail_event), so that a later drop is reported when buffers come back.
      eq.enableNotifications();
    } catch (e) {
      this.#broken = e instanceof Error ? e : new Error(String(e));
      if (!this.#inProcessQueue) this.hooks?.needsReset(this.#broken);
    }
  }
}

// ---- The device type (machine integration) -------------------------------------------------------

const u32 = z.number().int().min(0).max(0xffff_ffff);

/** Where one drive is plugged and how its disk looks (`devices[].options.luns[i]`). */
const lunSchema = z.strictObject({
  target: z.number().int().min(0).max(VIRTIO_SCSI_MAX_TARGET),
  lun: z.number().int().min(0).max(VIRTIO_SCSI_MAX_LUN),
  serial: z.string().max(255).optional(),
  blockSize: z.union([z.literal(512), z.literal(4096)]).optional(),
  discard: z.boolean().optional(),
  rotationRate: z.number().int().min(0).max(0xfffe).optional(),
});

/**
 * The device options of a configured virtio-scsi (`devices[].options`): the queue, ring and
 * read-only settings come from the device and its drives. `luns` places drive i (default:
 * target 0, LUN i); it must have one entry per drive when given.
 */
export const virtioScsiOptionsSchema = z.strictObject({
  hotplug: z.boolean().optional(),
  change: z.boolean().optional(),
  maxSectors: u32.optional(),
  cmdPerLun: u32.optional(),
  maxTarget: z.number().int().min(0).max(VIRTIO_SCSI_MAX_TARGET).optional(),
  maxLun: z.number().int().min(0).max(VIRTIO_SCSI_MAX_LUN).optional(),
  luns: z.array(lunSchema).optional(),
});

/** The validated `devices[].options` of a virtio-scsi. */
export type VirtioScsiDeviceOptions = z.infer<typeof virtioScsiOptionsSchema>;

function deviceOptions(spec: DeviceSpec): VirtioScsiDeviceOptions {
  const parsed = virtioScsiOptionsSchema.safeParse(spec.options);
  if (!parsed.success) {
    throw new RangeError(`virtio-scsi ${spec.id}: bad options: ${parsed.error.message}`);
  }
  return parsed.data;
}

/** What `createBackend` reports to the VMM, where `createModel` builds the model from it. */
export interface VirtioScsiBackendInfo {
  /** {@linkcode VirtioScsiSharedConfig}'s buffer: the model wraps the same words. */
  readonly shared: SharedArrayBuffer;
}

/**
 * The machine's back-end factory (`DeviceType.backendModule` is this module), run in the iothread:
 * a {@linkcode VirtioScsiBackend} with drive i plugged in as a disk at `options.luns[i]` (default
 * target 0, LUN i), read-only as its drive, WCE off for `cache: writethrough` (as QEMU).
 *
 * The iothread should also set `backend.hooks` so that events delivered outside a kick
 * (capacity changes, run-time hotplug) raise the event queue's interrupt.
 *
 * @throws {RangeError} for bad options, or `luns` not matching the drives
 */
export function createBackend(init: BackendInit): BackendReady {
  const { spec, drives } = init;
  const options = deviceOptions(spec);
  if (options.luns !== undefined && options.luns.length !== drives.length) {
    throw new RangeError(
      `virtio-scsi ${spec.id}: ${options.luns.length} luns for ${drives.length} drives`,
    );
  }
  const limits: { maxTarget?: number; maxLun?: number } = {};
  if (options.maxTarget !== undefined) limits.maxTarget = options.maxTarget;
  if (options.maxLun !== undefined) limits.maxLun = options.maxLun;
  const shared = new VirtioScsiSharedConfig(undefined, limits);
  const backend = new VirtioScsiBackend({ shared });
  drives.forEach((node, i) => {
    const place = options.luns?.[i] ?? { target: 0, lun: i };
    const drive = spec.drives[i];
    const disk: ScsiDiskOptions = {
      readOnly: drive?.readOnly ?? node.readOnly,
      writeCache: drive?.cache !== "writethrough",
    };
    if (place.serial !== undefined) disk.serial = place.serial;
    if (place.blockSize !== undefined) disk.blockSize = place.blockSize;
    if (place.discard !== undefined) disk.discard = place.discard;
    if (place.rotationRate !== undefined) disk.rotationRate = place.rotationRate;
    backend.lend(place.target, place.lun, node, disk);
  });
  const info: VirtioScsiBackendInfo = { shared: shared.buffer };
  return { backend, info };
}

/**
 * Builds the model on the VMM thread once the iothread is up, sharing the back-end's config words.
 *
 * @throws {RangeError} when the back-end sent no shared config
 */
export function createModel(spec: DeviceSpec, info: DeviceInfo): VirtioScsiModel {
  const backend = info.backend as Partial<VirtioScsiBackendInfo> | null;
  if (!(backend?.shared instanceof SharedArrayBuffer)) {
    throw new RangeError(`virtio-scsi ${spec.id}: the back-end sent no shared config`);
  }
  const options = deviceOptions(spec);
  const model: VirtioScsiOptions = {
    numQueues: spec.numQueues,
    queueSize: spec.queueSize,
    indirectDesc: spec.indirect,
    eventIdx: spec.eventIdx,
    packed: spec.packed,
    shared: backend.shared,
  };
  if (options.hotplug !== undefined) model.hotplug = options.hotplug;
  if (options.change !== undefined) model.change = options.change;
  if (options.maxSectors !== undefined) model.maxSectors = options.maxSectors;
  if (options.cmdPerLun !== undefined) model.cmdPerLun = options.cmdPerLun;
  return new VirtioScsiModel(model);
}

/**
 * The "virtio-scsi" device type: 0 to 256 drives, each a disk LUN; the iothread imports this
 * module (`createBackend`), the VMM calls {@linkcode createModel}.
 */
export const deviceType: DeviceType = {
  name: "virtio-scsi",
  backendModule: new URL(import.meta.url),
  drives: { min: 0, max: 256 },
  optionsSchema: virtioScsiOptionsSchema,
  createModel,
};
