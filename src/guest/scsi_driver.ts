/**
 * The guest's virtio-scsi front-end (Linux's `drivers/scsi/virtio_scsi.c` with the bits of the SCSI
 * midlayer and `sd` a disk needs, simulated): negotiates features, reads the configuration, sets up
 * the control queue (0), the event queue (1) and the request queues (2..), scans for disks, and
 * serves a {@linkcode BlockTarget} per LUN and request queue — pre-allocated request slots in guest
 * RAM that a workload fills and submits.
 *
 * **Requests.** A command is a chain `request header → [data-out] → response header → [data-in]`
 * (virtio 1.2 §5.6.6.1): the header is {lun[8], tag u64, task_attr, prio, crn, cdb[cdb_size]}, the
 * response {sense_len, residual, status_qualifier, status, response, sense[sense_size]}. Reads are
 * READ(16), writes WRITE(16), flushes SYNCHRONIZE CACHE(16) (only with the write cache on, as sd
 * sends them), trims UNMAP with one block descriptor (only when the LUN reports LBPU). The data of a
 * request is one contiguous guest buffer: one descriptor, well inside `seg_max`.
 *
 * **Completions.** virtio response codes other than OK fail the request naming the code; CHECK
 * CONDITION fails it naming sense key, ASC and ASCQ — except UNIT ATTENTION, which is retried once
 * (the midlayer's NEEDS_RETRY), and whose CAPACITY DATA HAS CHANGED / REPORTED LUNS DATA HAS CHANGED
 * also schedule a capacity re-read or a rescan of the target.
 *
 * **Scan** (what `scsi_scan_host` does for virtio-scsi): targets 0..min(max_target, `scanTargets`)
 * one after the other (Linux scans every target up to max_target; we bound it — default 7, the
 * historical SCSI bus width — so that a device reporting 255 targets costs 8 REPORT LUNS, not 256).
 * Per target REPORT LUNS (a target without units answers BAD_TARGET), then per LUN: INQUIRY (only
 * peripheral qualifier 0, device type 0 — disks — are kept), TEST UNIT READY retried while it
 * reports a unit attention (a fresh LUN reports POWER ON, RESET 06/29/00 first), READ CAPACITY(16)
 * falling back to (10), the block limits and provisioning VPD pages, and MODE SENSE for the write
 * protect and write cache bits.
 *
 * **Events.** With HOTPLUG or CHANGE negotiated, `eventBuffers` 16-byte buffers sit in the event
 * queue. Its interrupt handler only takes the events in; the work they need (SCSI commands, which
 * wait) runs later in {@linkcode ScsiDriver.processEvents} — the guest's workqueue, as Linux's
 * `virtscsi_handle_event` runs from a work item. A target's `wait()` runs it when work is pending,
 * so a workload sees LUNs come and go. TRANSPORT_RESET/RESCAN probes that LUN (it appears in
 * {@linkcode ScsiDriver.luns}), TRANSPORT_RESET/REMOVED drops it (its targets then fail new
 * requests locally; requests in flight complete with whatever the device answers — BAD_TARGET or
 * LOGICAL UNIT NOT SUPPORTED — so they fail cleanly), PARAM_CHANGE with 2Ah/xx re-reads the
 * capacity, and EVENTS_MISSED rescans everything. A buffer is re-posted once its event was handled
 * (Linux does the same), so a driver that falls behind makes the device drop events and report
 * EVENTS_MISSED.
 *
 * Hot path: no allocation of our own per request — headers, CDBs, UNMAP parameter lists, indirect
 * tables, descriptor lists and request objects are per slot, made when the target opens.
 *
 * @module
 */

import {
  VIRTIO_SCSI_CDB_DEFAULT_SIZE,
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
  VIRTIO_SCSI_EVENT_SIZE,
  VIRTIO_SCSI_EVT_RESET_REMOVED,
  VIRTIO_SCSI_EVT_RESET_RESCAN,
  VIRTIO_SCSI_F_CHANGE,
  VIRTIO_SCSI_F_HOTPLUG,
  VIRTIO_SCSI_MAX_LUN,
  VIRTIO_SCSI_MAX_TARGET,
  VIRTIO_SCSI_REQ_CDB,
  VIRTIO_SCSI_REQ_TAG,
  VIRTIO_SCSI_REQ_TASK_ATTR,
  VIRTIO_SCSI_RESP_RESIDUAL,
  VIRTIO_SCSI_RESP_RESPONSE,
  VIRTIO_SCSI_RESP_SENSE,
  VIRTIO_SCSI_RESP_SENSE_LEN,
  VIRTIO_SCSI_RESP_STATUS,
  VIRTIO_SCSI_S_OK,
  VIRTIO_SCSI_S_SIMPLE,
  VIRTIO_SCSI_SENSE_DEFAULT_SIZE,
  VIRTIO_SCSI_T_EVENTS_MISSED,
  VIRTIO_SCSI_T_PARAM_CHANGE,
  VIRTIO_SCSI_T_TMF,
  VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
  VIRTIO_SCSI_T_TRANSPORT_RESET,
  VIRTIO_SCSI_TMF_REQ_SIZE,
  VIRTIO_SCSI_TMF_RESP_SIZE,
  VIRTIO_SCSI_VQ_CONTROL,
  VIRTIO_SCSI_VQ_EVENT,
  VIRTIO_SCSI_VQ_REQUEST,
} from "../virtio/virtio_scsi_constants.ts";
import {
  CHECK_CONDITION,
  GOOD,
  INQUIRY,
  MODE_PAGE_CACHING,
  MODE_SENSE,
  READ_16,
  READ_CAPACITY_10,
  REPORT_LUNS,
  SAI_READ_CAPACITY_16,
  SERVICE_ACTION_IN_16,
  SYNCHRONIZE_CACHE_16,
  TEST_UNIT_READY,
  TYPE_DISK,
  UNMAP,
  VPD_BLOCK_LIMITS,
  VPD_LOGICAL_BLOCK_PROVISIONING,
  WRITE_16,
} from "../scsi/constants.ts";
import { ILLEGAL_REQUEST, UNIT_ATTENTION } from "../scsi/sense.ts";
import {
  featureBit,
  hasFeature,
  VIRTIO_F_RING_PACKED,
  VIRTIO_ID_SCSI,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import type { DriverBuffer } from "../virtio/queue.ts";
import type { BlockTarget, IoRequest, IoStatus } from "./block_target.ts";
import type { PciFunctionInfo } from "./pci_probe.ts";
import {
  COMPLETED,
  FREE,
  IN_DEVICE,
  localStatus,
  QueueTarget,
  SlotRequest,
} from "./queue_target.ts";
import { SlotQueue, type SlotQueueStats } from "./slot_queue.ts";
import {
  type GuestPlatform,
  type InterruptPreference,
  VirtioDriverError,
  VirtioPciDriver,
  type VirtioQueue,
} from "./virtio_driver.ts";

/** Counters of one request queue (the same shape as virtio-blk's). */
export type ScsiQueueStats = SlotQueueStats;

/** The device configuration (virtio 1.2 §5.6.4) as read after the driver wrote its sizes. */
export interface ScsiConfig {
  /** Request queues the device has. */
  readonly numQueues: number;
  /** Most data segments per command (0: no limit given). */
  readonly segMax: number;
  /** Largest transfer hint, 512-byte sectors. */
  readonly maxSectors: number;
  /** Most commands in flight per LUN the device wants. */
  readonly cmdPerLun: number;
  readonly eventInfoSize: number;
  /** Bytes of sense in each response, as the device reads it back. */
  readonly senseSize: number;
  /** Bytes of CDB in each request, as the device reads it back. */
  readonly cdbSize: number;
  readonly maxChannel: number;
  readonly maxTarget: number;
  readonly maxLun: number;
}

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
  /** Highest target scanned: min(max_target, this) (default 7; see the module documentation). */
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

/** A target:LUN address. */
export interface ScsiAddress {
  readonly target: number;
  readonly lun: number;
}

/** A disk the driver found. Fields change on a capacity re-read; `removed` once it is gone. */
export interface ScsiLun extends ScsiAddress {
  readonly vendor: string;
  readonly product: string;
  readonly revision: string;
  /** Logical block size, bytes. */
  readonly blockSize: number;
  /** Logical blocks. */
  readonly blocks: number;
  /** Capacity in bytes. */
  readonly capacity: number;
  /** MODE SENSE's WP bit. Writes are still sent (the device answers DATA PROTECT), as Linux does. */
  readonly readOnly: boolean;
  /** The caching page's WCE bit: SYNCHRONIZE CACHE is sent only when it is set. */
  readonly writeCache: boolean;
  /** READ CAPACITY(16)'s LBPME. */
  readonly lbpme: boolean;
  /** VPD B2h LBPU: UNMAP deallocates (trims are sent). */
  readonly unmap: boolean;
  /** VPD B0h MAXIMUM UNMAP LBA COUNT (0 without UNMAP). */
  readonly maxUnmapBlocks: number;
  /** VPD B0h MAXIMUM TRANSFER LENGTH in blocks (0: no limit given). */
  readonly maxTransferBlocks: number;
  readonly removed: boolean;
}

/** What happened to a LUN, and why. */
export interface ScsiLunEvent extends ScsiAddress {
  readonly kind: "added" | "removed" | "capacity-changed";
  /** Capacity in bytes afterwards (0 for a removal). */
  readonly capacity: number;
  readonly cause:
    | "scan" // the initial scan or rescan()
    | "rescan-event" // TRANSPORT_RESET / RESCAN
    | "removed-event" // TRANSPORT_RESET / REMOVED
    | "param-change" // PARAM_CHANGE
    | "events-missed" // EVENTS_MISSED: a full rescan
    | "unit-attention"; // a command's CAPACITY / REPORTED LUNS DATA HAS CHANGED
}

/** Counters of the event queue and the work it caused. */
export interface ScsiEventStats {
  /** Event buffers the device completed. */
  received: number;
  /** Of them, with EVENTS_MISSED set. */
  missed: number;
  /** TRANSPORT_RESET events (rescan and removal). */
  transportResets: number;
  /** PARAM_CHANGE events. */
  paramChanges: number;
  /** Events of a kind or reason the driver ignores. */
  ignored: number;
  /** Unit attentions seen on any command. */
  unitAttentions: number;
  /** Commands retried after a unit attention. */
  retries: number;
}

/** The outcome of one internal command (scan, probe). */
interface CommandOutcome {
  readonly response: number;
  readonly status: number;
  /** Sense key, ASC, ASCQ; -1 without sense. */
  readonly key: number;
  readonly asc: number;
  readonly ascq: number;
  /** The data-in bytes received (the buffer minus the residual). */
  readonly data: Uint8Array;
}

// ---- Names of what the device answers -------------------------------------------------------------

const RESPONSE_NAMES = [
  "OK",
  "OVERRUN",
  "ABORTED",
  "BAD_TARGET",
  "RESET",
  "BUSY",
  "TRANSPORT_FAILURE",
  "TARGET_FAILURE",
  "NEXUS_FAILURE",
  "FAILURE",
  "FUNCTION_SUCCEEDED",
  "FUNCTION_REJECTED",
  "INCORRECT_LUN",
];

const SENSE_KEY_NAMES = [
  "NO SENSE",
  "RECOVERED ERROR",
  "NOT READY",
  "MEDIUM ERROR",
  "HARDWARE ERROR",
  "ILLEGAL REQUEST",
  "UNIT ATTENTION",
  "DATA PROTECT",
  "BLANK CHECK",
  "VENDOR SPECIFIC",
  "COPY ABORTED",
  "ABORTED COMMAND",
  "RESERVED (0Ch)",
  "VOLUME OVERFLOW",
  "MISCOMPARE",
  "COMPLETED",
];

/** ASC/ASCQ descriptions of the conditions a disk reports (SPC-4 Annex D.2), by asc << 8 | ascq. */
const ASC_NAMES = new Map<number, string>([
  [0x0403, "logical unit not ready, manual intervention required"],
  [0x0c00, "write error"],
  [0x1100, "unrecovered read error"],
  [0x1a00, "parameter list length error"],
  [0x1d00, "miscompare during verify operation"],
  [0x2000, "invalid command operation code"],
  [0x2100, "logical block address out of range"],
  [0x2400, "invalid field in CDB"],
  [0x2500, "logical unit not supported"],
  [0x2600, "invalid field in parameter list"],
  [0x2700, "write protected"],
  [0x2900, "power on, reset, or bus device reset occurred"],
  [0x2a09, "capacity data has changed"],
  [0x3900, "saving parameters not supported"],
  [0x3f0e, "reported luns data has changed"],
  [0x4400, "internal target failure"],
]);

function hex2(n: number): string {
  return n.toString(16).toUpperCase().padStart(2, "0");
}

/** A virtio-scsi response code by name: `BAD_TARGET`, or `response 0x2A` for an unknown one. */
export function scsiResponseName(code: number): string {
  return RESPONSE_NAMES[code] ?? `response 0x${hex2(code)}`;
}

/**
 * Sense data in words: `DATA PROTECT 07/27/00 (write protected)`.
 *
 * @example
 * ```ts
 * import { describeSense } from "./scsi_driver.ts";
 * if (describeSense(5, 0x21, 0) !== "ILLEGAL REQUEST 05/21/00 (logical block address out of range)") {
 *   throw new Error("sense");
 * }
 * ```
 */
export function describeSense(key: number, asc: number, ascq: number): string {
  const name = SENSE_KEY_NAMES[key & 0xf]!;
  const what = ASC_NAMES.get((asc << 8) | ascq);
  return `${name} ${hex2(key)}/${hex2(asc)}/${hex2(ascq)}${what === undefined ? "" : ` (${what})`}`;
}

const STATUS_NAMES = new Map<number, string>([
  [0x00, "GOOD"],
  [0x02, "CHECK CONDITION"],
  [0x04, "CONDITION MET"],
  [0x08, "BUSY"],
  [0x18, "RESERVATION CONFLICT"],
  [0x28, "TASK SET FULL"],
  [0x30, "ACA ACTIVE"],
  [0x40, "TASK ABORTED"],
]);

function statusName(status: number): string {
  return STATUS_NAMES.get(status) ?? `status 0x${hex2(status)}`;
}

// ---- Layout ---------------------------------------------------------------------------------------

const DESC_BYTES = 16;
/** UNMAP parameter list with one block descriptor: 8-byte header + 16-byte descriptor. */
const UNMAP_PARAM_BYTES = 24;
/** Buffer of the internal command slot: REPORT LUNS for up to 2047 LUNs, VPD pages, INQUIRY. */
const COMMAND_BUFFER_BYTES = 16384;
/** Unit attentions a probe command absorbs before giving up (several may be queued). */
const PROBE_UA_TRIES = 5;
/** Linux's VIRTIO_SCSI_EVENT_LEN. */
const DEFAULT_EVENT_BUFFERS = 8;
const MAX_EVENT_BUFFERS = 64;
/** Default bound of the target scan (see the module documentation). */
const DEFAULT_SCAN_TARGETS = 7;
const SECTOR = 512;

function align(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** Who completes a slot: a target (I/O) or the driver (its own commands). */
interface SlotOwner {
  /** The device answered `slot` (fields decoded); true: send it again (a unit attention retry). */
  _finish(slot: Slot): boolean;
}

/** One command slot: its guest memory, descriptor lists, state and decoded response. */
interface Slot {
  /** Token in the ring: index in the queue's slot table. */
  readonly token: number;
  /** Request queue number (virtqueue 2 + queue). */
  readonly queue: number;
  readonly owner: SlotOwner;
  readonly request: SlotRequest;
  /** RAM buffer offsets of the request header, response header and UNMAP parameter list. */
  readonly reqOff: number;
  readonly respOff: number;
  readonly paramOff: number;
  readonly indirect: number;
  readonly req: DriverBuffer;
  readonly resp: DriverBuffer;
  readonly param: DriverBuffer;
  readonly data: DriverBuffer;
  readonly readable: DriverBuffer[];
  readonly writable: DriverBuffer[];
  state: number;
  /** Unit attention retries of the current request. */
  retries: number;
  // Decoded on completion.
  response: number;
  status: number;
  key: number;
  asc: number;
  ascq: number;
  residual: number;
  written: number;
}

/** A LUN as the driver keeps it (the public {@linkcode ScsiLun} is its read-only face). */
interface LunState {
  target: number;
  lun: number;
  vendor: string;
  product: string;
  revision: string;
  blockSize: number;
  blocks: number;
  capacity: number;
  readOnly: boolean;
  writeCache: boolean;
  lbpme: boolean;
  unmap: boolean;
  maxUnmapBlocks: number;
  maxTransferBlocks: number;
  removed: boolean;
}

/** Work the event queue or a unit attention left for {@linkcode ScsiDriver.processEvents}. */
type Work =
  | {
    readonly kind: "event";
    readonly token: number;
    readonly event: number;
    readonly target: number;
    readonly lun: number;
    readonly reason: number;
  }
  | { readonly kind: "capacity"; readonly target: number; readonly lun: number }
  | { readonly kind: "rescan-target"; readonly target: number };

function lunKey(target: number, lun: number): number {
  return target * (VIRTIO_SCSI_MAX_LUN + 1) + lun;
}

/** Writes the virtio-scsi single-level LUN: 1, target, 40h | lun >> 8, lun & FFh, 0 × 4. */
function writeLun(ram: DataView, at: number, target: number, lun: number): void {
  ram.setUint8(at, 1);
  ram.setUint8(at + 1, target);
  ram.setUint8(at + 2, 0x40 | (lun >>> 8));
  ram.setUint8(at + 3, lun & 0xff);
  ram.setUint32(at + 4, 0);
}

/** Big-endian u64 store of a safe integer. */
function setU64BE(ram: DataView, at: number, v: number): void {
  ram.setUint32(at, Math.floor(v / 2 ** 32));
  ram.setUint32(at + 4, v >>> 0);
}

function u32BE(v: number): number[] {
  return [v >>> 24, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
}

function ascii(bytes: Uint8Array, from: number, to: number): string {
  let s = "";
  for (let i = from; i < to && i < bytes.length; i++) s += String.fromCharCode(bytes[i]!);
  return s.trimEnd();
}

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
  readonly #scanLimit: number;
  readonly #queues: SlotQueue<Slot>[] = [];
  readonly #luns = new Map<number, LunState>();
  #sortedLuns: LunState[] = [];
  #completions = 0;
  // Event queue: buffers by token, and the work waiting for processEvents.
  #eventVq: VirtioQueue | null = null;
  #eventBase = 0;
  #eventCount = 0;
  readonly #work: Work[] = [];
  #working = false;
  // Control queue: one TMF slot.
  #controlVq: VirtioQueue | null = null;
  #tmfAt = 0;
  #tmfState = FREE;
  // The driver's own command slot (scan, probe), on request queue 0; one command at a time.
  #commandSlot: Slot | null = null;
  #commandMem: number[] = [];
  #commandLock: Promise<void> = Promise.resolve();
  #tag = 0;

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
    this.#scanLimit = Math.min(config.maxTarget, Math.max(0, Math.floor(scan)));
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
      driver.#controlVq = queues[VIRTIO_SCSI_VQ_CONTROL]!;
      driver.#eventVq = queues[VIRTIO_SCSI_VQ_EVENT]!;
      if (driver.#eventVq.size < eventBuffers) {
        throw new VirtioDriverError(
          "queue-size-refused",
          fn.slot,
          `event queue of ${driver.#eventVq.size} cannot hold ${eventBuffers} event buffers`,
        );
      }
      for (const vq of queues.slice(VIRTIO_SCSI_VQ_REQUEST)) {
        driver.#queues.push(new SlotQueue(vq, driver.#indirect));
      }
      driver.#allocControl();
      driver.#allocCommandSlot();
      virtio.driverOk();
      // As virtscsi_probe: event buffers go in once the device is live, and only for events
      // the device may send.
      if (
        hasFeature(features, VIRTIO_SCSI_F_HOTPLUG) || hasFeature(features, VIRTIO_SCSI_F_CHANGE)
      ) {
        driver.#postEvents(eventBuffers);
      }
      await driver.#exclusive(() => driver!.#scanAll("scan"));
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
    return this.#sortedLuns;
  }

  /** The disk at `target`:`lun`, if the driver knows one there. */
  findLun(target: number, lun: number): ScsiLun | undefined {
    return this.#luns.get(lunKey(target, lun));
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
    const state = this.#luns.get(lunKey(options.lun.target, options.lun.lun));
    if (state === undefined || state.removed) {
      throw new RangeError(
        `No disk at target ${options.lun.target} LUN ${options.lun.lun} (found: ${
          this.#sortedLuns.map((l) => `${l.target}:${l.lun}`).join(", ") || "none"
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
    const mem = this.#platform.mem;
    const alloc = this.#platform.alloc;
    const queue = this.#queues[queueIndex]!;
    const reqLen = VIRTIO_SCSI_CMD_REQ_HEADER + this.config.cdbSize;
    const respLen = VIRTIO_SCSI_CMD_RESP_HEADER + this.config.senseSize;
    // Per slot: request header, response header, UNMAP parameter list, indirect table (4 entries).
    const respAt = align(reqLen, 16);
    const paramAt = respAt + align(respLen, 16);
    const indirectAt = paramAt + align(UNMAP_PARAM_BYTES, 16);
    const metaStride = align(indirectAt + 4 * DESC_BYTES, 64);
    const dataAlign = dataBytes >= 4096 ? 4096 : SECTOR;
    const dataStride = align(dataBytes, dataAlign);
    const meta = alloc.alloc(metaStride * depth, 64);
    let data: number;
    try {
      data = alloc.alloc(dataStride * depth, dataAlign);
    } catch (error) {
      alloc.free(meta);
      throw error;
    }
    const ram = this.#ram;
    const slots: Slot[] = [];
    for (let i = 0; i < depth; i++) {
      const base = meta + i * metaStride;
      const dataAddress = data + i * dataStride;
      const token = queue.slots.length;
      const slot: Slot = {
        token,
        queue: queueIndex,
        owner,
        request: new SlotRequest(i, mem.slice(dataAddress, dataBytes)),
        reqOff: mem.translate(base, reqLen),
        respOff: mem.translate(base + respAt, respLen),
        paramOff: mem.translate(base + paramAt, UNMAP_PARAM_BYTES),
        indirect: base + indirectAt,
        req: { addr: base, length: reqLen },
        resp: { addr: base + respAt, length: respLen },
        param: { addr: base + paramAt, length: UNMAP_PARAM_BYTES },
        data: { addr: dataAddress, length: dataBytes },
        readable: [],
        writable: [],
        state: FREE,
        retries: 0,
        response: 0,
        status: 0,
        key: -1,
        asc: 0,
        ascq: 0,
        residual: 0,
        written: 0,
      };
      // The tag names the slot in the device's task set; the task attribute is SIMPLE.
      ram.setUint32(slot.reqOff + VIRTIO_SCSI_REQ_TAG, (queueIndex << 16 | token) >>> 0, true);
      ram.setUint32(slot.reqOff + VIRTIO_SCSI_REQ_TAG + 4, 0, true);
      ram.setUint8(slot.reqOff + VIRTIO_SCSI_REQ_TASK_ATTR, VIRTIO_SCSI_S_SIMPLE);
      queue.slots.push(slot);
      slots.push(slot);
    }
    return { slots, memory: [meta, data] };
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

  /** @internal Readies the response header: values the device never wrote must not read as GOOD. */
  _armResponse(slot: Slot): void {
    const ram = this.#ram;
    ram.setUint32(slot.respOff + VIRTIO_SCSI_RESP_SENSE_LEN, 0, true);
    ram.setUint32(slot.respOff + VIRTIO_SCSI_RESP_RESIDUAL, 0, true);
    ram.setUint8(slot.respOff + VIRTIO_SCSI_RESP_STATUS, 0xff);
    ram.setUint8(slot.respOff + VIRTIO_SCSI_RESP_RESPONSE, 0xff);
  }

  // ---- Interrupts ----------------------------------------------------------------------------------

  #harvest(index: number): void {
    if (this.virtio.broken !== null) return;
    try {
      if (index === VIRTIO_SCSI_VQ_CONTROL) this.#harvestControl();
      else if (index === VIRTIO_SCSI_VQ_EVENT) this.#harvestEvents();
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
        const r = slot.respOff;
        slot.written = used.written;
        slot.response = ram.getUint8(r + VIRTIO_SCSI_RESP_RESPONSE);
        slot.status = ram.getUint8(r + VIRTIO_SCSI_RESP_STATUS);
        slot.residual = ram.getUint32(r + VIRTIO_SCSI_RESP_RESIDUAL, true);
        slot.key = -1;
        slot.asc = 0;
        slot.ascq = 0;
        if (slot.response === VIRTIO_SCSI_S_OK && slot.status === CHECK_CONDITION) {
          // sense_len is the device's word: never read past the sense_size bytes we own.
          const len = Math.min(ram.getUint32(r + VIRTIO_SCSI_RESP_SENSE_LEN, true), senseSize);
          this.#decodeSense(slot, r + VIRTIO_SCSI_RESP_SENSE, len);
        }
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

  /** Fixed (70h/71h) or descriptor (72h/73h) sense: key, ASC, ASCQ into the slot. */
  #decodeSense(slot: Slot, at: number, len: number): void {
    if (len < 1) return;
    const ram = this.#ram;
    const code = ram.getUint8(at) & 0x7f;
    if ((code === 0x70 || code === 0x71) && len >= 3) {
      slot.key = ram.getUint8(at + 2) & 0x0f;
      slot.asc = len > 12 ? ram.getUint8(at + 12) : 0;
      slot.ascq = len > 13 ? ram.getUint8(at + 13) : 0;
    } else if ((code === 0x72 || code === 0x73) && len >= 2) {
      slot.key = ram.getUint8(at + 1) & 0x0f;
      slot.asc = len > 2 ? ram.getUint8(at + 2) : 0;
      slot.ascq = len > 3 ? ram.getUint8(at + 3) : 0;
    }
  }

  /** A unit attention on any command: what scsi_check_sense reacts to besides the retry. */
  #unitAttention(slot: Slot): void {
    this.eventStats.unitAttentions++;
    const owner = slot.owner;
    if (!(owner instanceof ScsiTarget)) return;
    const { target, lun } = owner.lun;
    if (slot.asc === 0x2a && slot.ascq === 0x09) {
      this.#work.push({ kind: "capacity", target, lun });
    } else if (slot.asc === 0x3f && slot.ascq === 0x0e) {
      this.#work.push({ kind: "rescan-target", target });
    }
  }

  #harvestControl(): void {
    const ring = this.#controlVq?.ring;
    if (ring === undefined) return;
    do {
      ring.disableInterrupts();
      for (let used = ring.getUsed(); used !== null; used = ring.getUsed()) {
        if (used.token !== 0 || this.#tmfState !== IN_DEVICE) {
          throw new RangeError(`Device completed control request ${used.token}, not in flight`);
        }
        this.#tmfState = COMPLETED;
        this.#completions++;
      }
    } while (ring.enableInterrupts());
  }

  /** Takes events in; the work they need runs in processEvents (an interrupt cannot wait). */
  #harvestEvents(): void {
    const vq = this.#eventVq;
    if (vq === null) return;
    const ring = vq.ring;
    const ram = this.#ram;
    const mem = this.#platform.mem;
    do {
      ring.disableInterrupts();
      for (let used = ring.getUsed(); used !== null; used = ring.getUsed()) {
        if (used.token < 0 || used.token >= this.#eventCount) {
          throw new RangeError(
            `Device completed event buffer ${used.token}, which it does not have`,
          );
        }
        const at = mem.translate(this.#eventBase + used.token * VIRTIO_SCSI_EVENT_SIZE, 16);
        const b1 = ram.getUint8(at + 5);
        const b2 = ram.getUint8(at + 6);
        const b3 = ram.getUint8(at + 7);
        this.eventStats.received++;
        this.#work.push({
          kind: "event",
          token: used.token,
          event: ram.getUint32(at, true),
          target: b1,
          // REPORT LUNS encoding: peripheral below 256, flat space (40h) above.
          lun: ((b2 & 0x3f) << 8) | b3,
          reason: ram.getUint32(at + 12, true),
        });
      }
    } while (ring.enableInterrupts());
  }

  // ---- Events ----------------------------------------------------------------------------------------

  #postEvents(count: number): void {
    this.#eventBase = this.#platform.alloc.alloc(count * VIRTIO_SCSI_EVENT_SIZE, 16);
    this.#eventCount = count;
    for (let token = 0; token < count; token++) this.#postEvent(token);
    this.#eventVq!.kick();
  }

  #postEvent(token: number): void {
    const addr = this.#eventBase + token * VIRTIO_SCSI_EVENT_SIZE;
    this.#platform.mem.fill(addr, VIRTIO_SCSI_EVENT_SIZE, 0);
    // The ring holds every buffer at once (checked at init): add cannot run out of room.
    this.#eventVq!.ring.add([], [{ addr, length: VIRTIO_SCSI_EVENT_SIZE }], token);
  }

  /**
   * True when events or unit attentions left work for {@linkcode processEvents} (takes pending
   * interrupts first, so that events already delivered count).
   */
  hasPendingWork(): boolean {
    this.#platform.interrupts.dispatchPending();
    return this.#work.length > 0;
  }

  /**
   * Runs the work events left (see the module documentation), in order: probes, removals,
   * capacity re-reads, rescans; re-posts each event buffer once its event is handled.
   *
   * @returns the work items done
   * @throws {VirtioDriverError} when the device breaks or stops answering
   */
  processEvents(): Promise<number> {
    return this.#exclusive(async () => {
      this.#platform.interrupts.dispatchPending();
      let done = 0;
      this.#working = true;
      try {
        while (this.#work.length > 0) {
          const work = this.#work.shift()!;
          await this.#doWork(work);
          done++;
        }
      } finally {
        this.#working = false;
      }
      return done;
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
    return this.#work.length > 0 && !this.#working;
  }

  async #doWork(work: Work): Promise<void> {
    switch (work.kind) {
      case "capacity":
        await this.#probeLun(work.target, work.lun, "unit-attention");
        return;
      case "rescan-target":
        await this.#scanTarget(work.target, "unit-attention");
        return;
      case "event":
        break;
    }
    try {
      const missed = (work.event & VIRTIO_SCSI_T_EVENTS_MISSED) !== 0;
      const event = (work.event & ~VIRTIO_SCSI_T_EVENTS_MISSED) >>> 0;
      if (missed) {
        this.eventStats.missed++;
        // virtscsi_handle_event: events were lost, so look at everything again.
        await this.#scanAll("events-missed");
      }
      if (event === VIRTIO_SCSI_T_TRANSPORT_RESET) {
        this.eventStats.transportResets++;
        if (work.reason === VIRTIO_SCSI_EVT_RESET_RESCAN) {
          await this.#probeLun(work.target, work.lun, "rescan-event");
        } else if (work.reason === VIRTIO_SCSI_EVT_RESET_REMOVED) {
          this.#remove(work.target, work.lun, "removed-event");
        } else {
          this.eventStats.ignored++;
        }
      } else if (event === VIRTIO_SCSI_T_PARAM_CHANGE) {
        this.eventStats.paramChanges++;
        const asc = work.reason & 0xff;
        const ascq = (work.reason >>> 8) & 0xff;
        // virtscsi_handle_param_change: capacity data changed (2Ah/00, /01, /09) → rescan device.
        if (asc === 0x2a && (ascq === 0x00 || ascq === 0x01 || ascq === 0x09)) {
          await this.#probeLun(work.target, work.lun, "param-change");
        } else if (asc === 0x3f && ascq === 0x0e) {
          await this.#scanTarget(work.target, "param-change");
        } else {
          this.eventStats.ignored++;
        }
      } else if (event !== 0 || !missed) {
        // NO_EVENT carries only EVENTS_MISSED; ASYNC_NOTIFY is not subscribed to.
        this.eventStats.ignored++;
      }
    } finally {
      if (this.virtio.broken === null) {
        this.#postEvent(work.token);
        this.#eventVq!.kick();
      }
    }
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
    return this.#exclusive(() => this.#scanAll("scan"));
  }

  async #scanAll(cause: ScsiLunEvent["cause"]): Promise<void> {
    for (let target = 0; target <= this.#scanLimit; target++) {
      await this.#scanTarget(target, cause);
    }
    // Known LUNs beyond the scanned targets (hotplugged there) are checked one by one.
    for (const l of [...this.#sortedLuns]) {
      if (l.target > this.#scanLimit) await this.#probeLun(l.target, l.lun, cause);
    }
  }

  async #scanTarget(target: number, cause: ScsiLunEvent["cause"]): Promise<void> {
    const reported = await this.#reportLuns(target);
    const found = new Set(reported);
    for (const l of [...this.#sortedLuns]) {
      if (l.target === target && !found.has(l.lun)) this.#remove(target, l.lun, cause);
    }
    for (const lun of reported) await this.#probeLun(target, lun, cause);
  }

  /** REPORT LUNS on LUN 0 of `target`: its LUNs, or none when the target does not exist. */
  async #reportLuns(target: number): Promise<number[]> {
    const length = COMMAND_BUFFER_BYTES;
    // SELECT REPORT 0 (all LUNs), ALLOCATION LENGTH big-endian in bytes 6..9.
    const cdb = [REPORT_LUNS, 0, 0, 0, 0, 0, ...u32BE(length), 0, 0];
    const out = await this.#probeCommand(target, 0, cdb, length);
    if (out.response !== VIRTIO_SCSI_S_OK) return [];
    if (out.status !== GOOD) {
      // A target that cannot REPORT LUNS: Linux falls back to a sequential scan; LUN 0 it is.
      return out.key === ILLEGAL_REQUEST ? [0] : [];
    }
    const d = out.data;
    if (d.length < 8) return [];
    const listLength = ((d[0]! << 24) | (d[1]! << 16) | (d[2]! << 8) | d[3]!) >>> 0;
    const end = Math.min(8 + listLength, d.length);
    const luns: number[] = [];
    for (let at = 8; at + 8 <= end; at += 8) {
      const method = d[at]! >> 6;
      // Peripheral device addressing (bus 0) below 256, flat space addressing above (SAM-5 4.7).
      const lun = method === 0 && (d[at]! & 0x3f) === 0
        ? d[at + 1]!
        : method === 1
        ? ((d[at]! & 0x3f) << 8) | d[at + 1]!
        : -1;
      if (lun >= 0 && lun <= this.config.maxLun && !luns.includes(lun)) luns.push(lun);
    }
    return luns;
  }

  /**
   * Probes `target`:`lun` and adds, updates or removes it (scsi_probe_and_add_lun + sd's
   * revalidate): INQUIRY, TEST UNIT READY, READ CAPACITY, VPD B0h/B2h, MODE SENSE.
   */
  async #probeLun(target: number, lun: number, cause: ScsiLunEvent["cause"]): Promise<void> {
    const inquiry = await this.#probeCommand(target, lun, [INQUIRY, 0, 0, 0, 96, 0], 96);
    const d = inquiry.data;
    // Peripheral qualifier 000b and device type 00h only: a connected disk.
    if (
      inquiry.response !== VIRTIO_SCSI_S_OK || inquiry.status !== GOOD || d.length < 36 ||
      (d[0]! >> 5) !== 0 || (d[0]! & 0x1f) !== TYPE_DISK
    ) {
      this.#remove(target, lun, cause);
      return;
    }
    const tur = await this.#probeCommand(target, lun, [TEST_UNIT_READY, 0, 0, 0, 0, 0], 0);
    if (tur.response !== VIRTIO_SCSI_S_OK || tur.status !== GOOD) {
      this.#remove(target, lun, cause);
      return;
    }
    const capacity = await this.#readCapacity(target, lun);
    if (capacity === null) {
      this.#remove(target, lun, cause);
      return;
    }
    let maxTransferBlocks = 0;
    let maxUnmapBlocks = 0;
    const limits = await this.#probeCommand(
      target,
      lun,
      [INQUIRY, 1, VPD_BLOCK_LIMITS, 0, 64, 0],
      64,
    );
    if (
      limits.status === GOOD && limits.response === VIRTIO_SCSI_S_OK && limits.data.length >= 28
    ) {
      const v = new DataView(limits.data.buffer, limits.data.byteOffset, limits.data.length);
      maxTransferBlocks = v.getUint32(8);
      maxUnmapBlocks = v.getUint32(20);
    }
    let unmap = false;
    if (capacity.lbpme) {
      const lbp = await this.#probeCommand(
        target,
        lun,
        [INQUIRY, 1, VPD_LOGICAL_BLOCK_PROVISIONING, 0, 8, 0],
        8,
      );
      unmap = lbp.status === GOOD && lbp.response === VIRTIO_SCSI_S_OK && lbp.data.length >= 6 &&
        (lbp.data[5]! & 0x80) !== 0 && maxUnmapBlocks > 0;
    }
    // MODE SENSE(6), caching page, no block descriptors: WP in the header, WCE in the page.
    let readOnly = false;
    let writeCache = false; // sd: "Assuming drive cache: write through" when it cannot tell
    const mode = await this.#probeCommand(
      target,
      lun,
      [MODE_SENSE, 0x08, MODE_PAGE_CACHING, 0, 0xff, 0],
      0xff,
    );
    if (mode.status === GOOD && mode.response === VIRTIO_SCSI_S_OK && mode.data.length >= 4) {
      const m = mode.data;
      readOnly = (m[2]! & 0x80) !== 0;
      const page = 4 + m[3]!;
      if (m.length >= page + 3 && (m[page]! & 0x3f) === MODE_PAGE_CACHING) {
        writeCache = (m[page + 2]! & 0x04) !== 0;
      }
    }
    const fresh: LunState = {
      target,
      lun,
      vendor: ascii(d, 8, 16),
      product: ascii(d, 16, 32),
      revision: ascii(d, 32, 36),
      blockSize: capacity.blockSize,
      blocks: capacity.blocks,
      capacity: capacity.blocks * capacity.blockSize,
      readOnly,
      writeCache,
      lbpme: capacity.lbpme,
      unmap,
      maxUnmapBlocks: unmap ? maxUnmapBlocks : 0,
      maxTransferBlocks,
      removed: false,
    };
    const key = lunKey(target, lun);
    const known = this.#luns.get(key);
    if (known === undefined) {
      this.#luns.set(key, fresh);
      this.#sortLuns();
      this.#emit({ kind: "added", target, lun, capacity: fresh.capacity, cause });
      return;
    }
    // Revalidate in place: open targets see the new capacity and flags.
    const before = known.capacity;
    Object.assign(known, fresh);
    if (known.capacity !== before) {
      this.#emit({ kind: "capacity-changed", target, lun, capacity: known.capacity, cause });
    }
  }

  async #readCapacity(
    target: number,
    lun: number,
  ): Promise<{ blocks: number; blockSize: number; lbpme: boolean } | null> {
    const rc16 = await this.#probeCommand(
      target,
      lun,
      [SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
      32,
    );
    let last: number;
    let blockSize: number;
    let lbpme = false;
    if (rc16.response === VIRTIO_SCSI_S_OK && rc16.status === GOOD && rc16.data.length >= 12) {
      const v = new DataView(rc16.data.buffer, rc16.data.byteOffset, rc16.data.length);
      const hi = v.getUint32(0);
      // Past 2^53 bytes no offset is exact; such a disk is not usable here.
      if (hi >= 0x20_0000) return null;
      last = hi * 2 ** 32 + v.getUint32(4);
      blockSize = v.getUint32(8);
      lbpme = rc16.data.length > 14 && (rc16.data[14]! & 0x80) !== 0;
    } else if (rc16.response === VIRTIO_SCSI_S_OK && rc16.key === ILLEGAL_REQUEST) {
      // sd_read_capacity: a device without READ CAPACITY(16) gets (10).
      const rc10 = await this.#probeCommand(
        target,
        lun,
        [READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        8,
      );
      if (rc10.response !== VIRTIO_SCSI_S_OK || rc10.status !== GOOD || rc10.data.length < 8) {
        return null;
      }
      const v = new DataView(rc10.data.buffer, rc10.data.byteOffset, 8);
      last = v.getUint32(0);
      blockSize = v.getUint32(4);
      // FFFFFFFFh means "too big for (10)", and (16) did not work.
      if (last === 0xffff_ffff) return null;
    } else {
      return null;
    }
    if (blockSize < 512 || blockSize > 65536 || (blockSize & (blockSize - 1)) !== 0) return null;
    const blocks = last + 1;
    if (!Number.isSafeInteger(blocks * blockSize)) return null;
    return { blocks, blockSize, lbpme };
  }

  #remove(target: number, lun: number, cause: ScsiLunEvent["cause"]): void {
    const key = lunKey(target, lun);
    const known = this.#luns.get(key);
    if (known === undefined) return;
    known.removed = true;
    this.#luns.delete(key);
    this.#sortLuns();
    this.#emit({ kind: "removed", target, lun, capacity: 0, cause });
  }

  #sortLuns(): void {
    this.#sortedLuns = [...this.#luns.values()].sort((a, b) =>
      a.target - b.target || a.lun - b.lun
    );
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
    this._armResponse(slot);
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

  #allocControl(): void {
    this.#tmfAt = this.#platform.alloc.alloc(VIRTIO_SCSI_TMF_REQ_SIZE + 8, 16);
  }

  /**
   * LOGICAL UNIT RESET through the control queue (what Linux's eh_device_reset_handler sends).
   * The unit then reports POWER ON, RESET to its next command, which the targets retry.
   *
   * @returns the TMF response code (0, FUNCTION COMPLETE, on success)
   * @throws {VirtioDriverError} when the device breaks or stops answering
   */
  resetLun(target: number, lun: number): Promise<number> {
    return this.#exclusive(async () => {
      const mem = this.#platform.mem;
      const ram = this.#ram;
      const at = mem.translate(this.#tmfAt, VIRTIO_SCSI_TMF_REQ_SIZE + 1);
      ram.setUint32(at, VIRTIO_SCSI_T_TMF, true);
      ram.setUint32(at + 4, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, true);
      writeLun(ram, at + 8, target, lun);
      ram.setUint32(at + 16, ++this.#tag, true);
      ram.setUint32(at + 20, 0, true);
      const respAt = at + VIRTIO_SCSI_TMF_REQ_SIZE;
      ram.setUint8(respAt, 0xff);
      const vq = this.#controlVq!;
      const added = vq.ring.add(
        [{ addr: this.#tmfAt, length: VIRTIO_SCSI_TMF_REQ_SIZE }],
        [{ addr: this.#tmfAt + VIRTIO_SCSI_TMF_REQ_SIZE, length: VIRTIO_SCSI_TMF_RESP_SIZE }],
        0,
      );
      if (!added) throw new Error("The control queue has no room for a TMF");
      this.#tmfState = IN_DEVICE;
      vq.kick();
      await this.#waitFor(() => this.#tmfState === COMPLETED);
      this.#tmfState = FREE;
      return ram.getUint8(respAt);
    });
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
      if (this.#eventCount > 0) alloc.free(this.#eventBase);
      this.#eventCount = 0;
      if (this.#tmfAt !== 0) alloc.free(this.#tmfAt);
      this.#tmfAt = 0;
    }
  }
}

/**
 * A {@linkcode BlockTarget} for one LUN on one request queue of a {@linkcode ScsiDriver}: `depth`
 * command slots in guest RAM. Capacity, block size and the read-only flag follow the LUN (a
 * capacity change shows at once). Requests the guest answers itself complete at once: anything to
 * a removed LUN (ioerr), ranges past the capacity (ioerr), trims without LBPU and
 * write-zeroes/get-id (unsupp), flushes with the write cache off (ok). Writes to a write-protected
 * LUN are sent: the device answers DATA PROTECT. `submit()` throws a RangeError for an offset or
 * length that is not a multiple of the block size, or a length past the target's maximum.
 */
export class ScsiTarget extends QueueTarget<Slot, ScsiDriver> implements BlockTarget, SlotOwner {
  /** The disk. */
  readonly lun: ScsiLun;
  readonly maxWriteZeroes = 0;
  readonly #memory: number[];

  /** Use {@linkcode ScsiDriver.openTarget}. */
  constructor(driver: ScsiDriver, lun: ScsiLun, queue: number, depth: number, maxTransfer: number) {
    super(driver, { queue, depth, maxTransfer, unit: "commands" });
    this.lun = lun;
    const { slots, memory } = driver._allocSlots(this, queue, depth, maxTransfer);
    this._useSlots(slots);
    this.#memory = memory;
    // The LUN is the target's for life: written once.
    const ram = driver._ram();
    for (const slot of slots) writeLun(ram, slot.reqOff, lun.target, lun.lun);
  }

  get capacity(): number {
    return this.lun.removed ? 0 : this.lun.capacity;
  }

  get blockSize(): number {
    return this.lun.blockSize;
  }

  get readOnly(): boolean {
    return this.lun.readOnly;
  }

  get maxDiscard(): number {
    const l = this.lun;
    return l.unmap ? Math.min(l.maxUnmapBlocks, 0xffff_ffff) * l.blockSize : 0;
  }

  /** Writes the CDB and descriptor lists; returns a status when the guest answers itself. */
  protected _prepare(slot: Slot): IoStatus | null {
    const r = slot.request;
    const l = this.lun;
    const ram = this.driver._ram();
    const readable = slot.readable;
    const writable = slot.writable;
    readable.length = 0;
    writable.length = 0;
    const cdb = slot.reqOff + VIRTIO_SCSI_REQ_CDB;
    switch (r.op) {
      case "read":
      case "write": {
        this.#checkLength(r, this.maxTransfer);
        if (l.removed) return localStatus(r, "ioerr", `LUN ${l.target}:${l.lun} was removed`);
        if (r.offset + r.length > l.capacity) return localStatus(r, "ioerr", "beyond the capacity");
        const bs = l.blockSize;
        ram.setUint8(cdb, r.op === "read" ? READ_16 : WRITE_16);
        ram.setUint8(cdb + 1, 0);
        setU64BE(ram, cdb + 2, r.offset / bs);
        ram.setUint32(cdb + 10, r.length / bs);
        ram.setUint16(cdb + 14, 0);
        slot.data.length = r.length;
        readable.push(slot.req);
        if (r.op === "write") readable.push(slot.data);
        writable.push(slot.resp);
        if (r.op === "read") writable.push(slot.data);
        break;
      }
      case "flush":
        if (l.removed) return localStatus(r, "ioerr", `LUN ${l.target}:${l.lun} was removed`);
        // sd sends SYNCHRONIZE CACHE only when the disk says it caches writes.
        if (!l.writeCache) return "ok";
        ram.setUint8(cdb, SYNCHRONIZE_CACHE_16);
        ram.setUint8(cdb + 1, 0);
        setU64BE(ram, cdb + 2, 0);
        ram.setUint32(cdb + 10, 0); // 0 blocks: to the end of the medium
        ram.setUint16(cdb + 14, 0);
        readable.push(slot.req);
        writable.push(slot.resp);
        break;
      case "discard": {
        if (this.maxDiscard === 0) return localStatus(r, "unsupp", "the LUN does not report LBPU");
        this.#checkLength(r, this.maxDiscard);
        if (l.removed) return localStatus(r, "ioerr", `LUN ${l.target}:${l.lun} was removed`);
        if (r.offset + r.length > l.capacity) return localStatus(r, "ioerr", "beyond the capacity");
        const bs = l.blockSize;
        ram.setUint8(cdb, UNMAP);
        for (let i = 1; i < 7; i++) ram.setUint8(cdb + i, 0);
        ram.setUint16(cdb + 7, UNMAP_PARAM_BYTES);
        ram.setUint8(cdb + 9, 0);
        ram.setUint32(cdb + 10, 0);
        ram.setUint16(cdb + 14, 0);
        // Parameter list: UNMAP DATA LENGTH, BLOCK DESCRIPTOR DATA LENGTH, one descriptor.
        const p = slot.paramOff;
        ram.setUint16(p, UNMAP_PARAM_BYTES - 2);
        ram.setUint16(p + 2, 16);
        ram.setUint32(p + 4, 0);
        setU64BE(ram, p + 8, r.offset / bs);
        ram.setUint32(p + 16, r.length / bs);
        ram.setUint32(p + 20, 0);
        readable.push(slot.req, slot.param);
        writable.push(slot.resp);
        break;
      }
      case "write-zeroes":
        return localStatus(r, "unsupp", "write-zeroes is not implemented for SCSI");
      case "get-id":
        return localStatus(r, "unsupp", "get-id is a virtio-blk request");
      default:
        throw new RangeError(`Unknown operation ${String(r.op)}`);
    }
    slot.retries = 0;
    this.driver._armResponse(slot);
    return null;
  }

  #checkLength(r: IoRequest, limit: number): void {
    const { offset, length } = r;
    const bs = this.lun.blockSize;
    if (
      !Number.isSafeInteger(offset) || offset < 0 || offset % bs !== 0 ||
      !Number.isSafeInteger(length) || length <= 0 || length % bs !== 0 || length > limit
    ) {
      throw new RangeError(
        `${r.op} at ${offset}+${length}: offset and length must be multiples of ${bs}, length 1..${limit}`,
      );
    }
  }

  /** @internal The device answered one of our commands (decoded into the slot). */
  _finish(slot: Slot): boolean {
    const r = slot.request;
    r.written = slot.written;
    if (slot.response !== VIRTIO_SCSI_S_OK) {
      r.status = "ioerr";
      r.detail = `virtio-scsi response ${scsiResponseName(slot.response)}`;
    } else if (slot.status === GOOD) {
      if (slot.residual !== 0 && (r.op === "read" || r.op === "write")) {
        r.status = "ioerr";
        r.detail = `short transfer: residual ${slot.residual} of ${r.length} bytes`;
      } else {
        r.status = "ok";
      }
    } else if (slot.status === CHECK_CONDITION && slot.key >= 0) {
      // The midlayer retries a unit attention (the condition is cleared by reporting it).
      if (slot.key === UNIT_ATTENTION && slot.retries === 0) {
        slot.retries++;
        return true;
      }
      r.status = slot.key === ILLEGAL_REQUEST && slot.asc === 0x20 ? "unsupp" : "ioerr";
      r.detail = `CHECK CONDITION: ${describeSense(slot.key, slot.asc, slot.ascq)}`;
    } else {
      r.status = "ioerr";
      r.detail = `SCSI status ${statusName(slot.status)}`;
    }
    slot.state = COMPLETED;
    this._completed(r);
    return false;
  }

  /** Runs pending event work first: the guest's workqueue gets the CPU when the workload would halt. */
  protected override _pendingWork(): Promise<void> | undefined {
    return this.driver._eventWorkDue ? this.driver.processEvents().then(() => {}) : undefined;
  }

  protected _releaseSlots(slots: readonly Slot[]): void {
    this.driver._freeSlots(slots, this.#memory);
  }
}

/**
 * Reads `struct virtio_scsi_config` under the config_generation loop and checks what the driver
 * relies on.
 *
 * @throws {VirtioDriverError} for a field past the DEVICE structure or an unusable value
 */
export function readScsiConfig(virtio: VirtioPciDriver): ScsiConfig {
  const raw = virtio.readConfig((c) => ({
    numQueues: c.u32(VIRTIO_SCSI_CONFIG_NUM_QUEUES),
    segMax: c.u32(VIRTIO_SCSI_CONFIG_SEG_MAX),
    maxSectors: c.u32(VIRTIO_SCSI_CONFIG_MAX_SECTORS),
    cmdPerLun: c.u32(VIRTIO_SCSI_CONFIG_CMD_PER_LUN),
    eventInfoSize: c.u32(VIRTIO_SCSI_CONFIG_EVENT_INFO_SIZE),
    senseSize: c.u32(VIRTIO_SCSI_CONFIG_SENSE_SIZE),
    cdbSize: c.u32(VIRTIO_SCSI_CONFIG_CDB_SIZE),
    maxChannel: c.u16(VIRTIO_SCSI_CONFIG_MAX_CHANNEL),
    maxTarget: c.u16(VIRTIO_SCSI_CONFIG_MAX_TARGET),
    maxLun: c.u32(VIRTIO_SCSI_CONFIG_MAX_LUN),
  }));
  const bad = (what: string): never => {
    throw new VirtioDriverError("status", virtio.slot, `virtio-scsi config: ${what}`);
  };
  if (raw.numQueues === 0) bad("num_queues is 0");
  // The request header carries 16-byte CDBs; a smaller cdb_size cannot hold READ(16).
  if (raw.cdbSize < 16 || raw.cdbSize > 255) bad(`cdb_size ${raw.cdbSize} is not 16..255`);
  // Sense beyond 4 KiB is nonsense and would make every slot huge.
  if (raw.senseSize > 4096) bad(`sense_size ${raw.senseSize} is above 4096`);
  return {
    ...raw,
    // Guest-controlled bounds for loops and addressing: clamp to what the LUN format can say.
    maxTarget: Math.min(raw.maxTarget, VIRTIO_SCSI_MAX_TARGET),
    maxLun: Math.min(raw.maxLun, VIRTIO_SCSI_MAX_LUN),
  };
}
