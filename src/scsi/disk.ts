/**
 * A SCSI disk logical unit over a {@linkcode BlockNode}, emulating what QEMU's `scsi-hd` emulates:
 * the SPC/SBC command set a guest's disk driver uses, unit attention conditions, the sense data of
 * the last failed command for REQUEST SENSE, and the one mode parameter a guest may change (WCE).
 *
 * The unit is transport-neutral: it takes a decoded CDB and the command's data buffers and returns
 * the outcome. Unit attention follows SAM-5 5.14 as QEMU implements it for autosense HBAs: the
 * first command other than INQUIRY, REPORT LUNS and REQUEST SENSE ends in CHECK CONDITION with the
 * condition, which clears it; REQUEST SENSE returns it as parameter data and clears it; REPORT LUNS
 * clears only REPORTED LUNS DATA HAS CHANGED; INQUIRY neither reports nor clears.
 *
 * @module
 */
import type { BlockNode } from "../block/node.ts";
import { type Cdb, type CdbContext, decodeCdb, READ_CAPACITY_16_LEN } from "./cdb.ts";
import { CHECK_CONDITION, INQUIRY, REPORT_LUNS, REQUEST_SENSE } from "./constants.ts";
import { standardInquiry, VPD_MAX_LEN, vpdPage } from "./inquiry.ts";
import { read, synchronizeCache, unmap, verify, write, writeSame } from "./medium_access.ts";
import type { IoDisk } from "./medium_access.ts";
import { MODE_SENSE_MAX_LEN, modeSelect, modeSense } from "./mode.ts";
import { reportLunsData } from "./report_luns.ts";
import {
  checkCondition,
  good,
  GOOD_NO_DATA,
  type IoErrorPolicy,
  type ScsiIo,
  type ScsiOutcome,
} from "./request.ts";
import {
  SENSE_CODE,
  type SenseCode,
  type SenseData,
  uaPrecedence,
  UNIT_ATTENTION,
  writeDescriptorSense,
  writeFixedSense,
} from "./sense.ts";

/** Options of a {@linkcode ScsiDisk}. Identity defaults are QEMU scsi-hd's, so guests treat it alike. */
export interface ScsiDiskOptions {
  /** Logical block size: a power of 2 from 512 to 65536 (default 512). */
  blockSize?: number;
  /** Refuse writes (DATA PROTECT, WRITE PROTECTED) even on a writable node. */
  readOnly?: boolean;
  /** Report logical block provisioning and pass UNMAP to the node (default true). */
  discard?: boolean;
  /** Initial WCE bit of the caching mode page (default true: write-back). */
  writeCache?: boolean;
  /** VENDOR IDENTIFICATION (default "QEMU"). */
  vendor?: string;
  /** PRODUCT IDENTIFICATION (default "QEMU HARDDISK"). */
  product?: string;
  /** PRODUCT REVISION LEVEL (default "2.5+", QEMU's hardware version). */
  revision?: string;
  /** Unit serial number; VPD 80h exists only with one (as QEMU). */
  serial?: string;
  /** VPD 83h vendor-specific identifier (default: the serial's first 20 characters, else the node's filename). */
  deviceId?: string;
  /** VPD 83h NAA designator. */
  wwn?: bigint;
  /** VPD B1h MEDIUM ROTATION RATE (default 1: non-rotating). */
  rotationRate?: number;
  /** VPD B0h MAXIMUM TRANSFER LENGTH in blocks (default QEMU's: 2^31−1 bytes' worth). */
  maxTransferBlocks?: number;
  /**
   * What a failed node request does (QEMU's werror/rerror, decided per error): `report` (CHECK
   * CONDITION, the default), `ignore` (GOOD), or `stop` (the outcome is marked held).
   */
  errorPolicy?: IoErrorPolicy;
}

/** QEMU's DEFAULT_MAX_IO_SIZE: INT_MAX bytes. */
const DEFAULT_MAX_IO_BYTES = 0x7fff_ffff;
/** QEMU's DEFAULT_MAX_UNMAP_SIZE: 1 GiB. */
const DEFAULT_MAX_UNMAP_BYTES = 1024 ** 3;
/** QEMU: 255 descriptors fit in 4 KiB with an 8-byte header. */
const DEFAULT_MAX_UNMAP_DESCRIPTORS = 255;
/** QEMU's DEFAULT_DISCARD_GRANULARITY: 4 KiB. */
const DEFAULT_DISCARD_GRANULARITY = 4096;

/**
 * A SCSI disk logical unit over a block node, as QEMU's `scsi-hd`: commands are decoded with
 * {@linkcode ScsiDisk.decode} and run with {@linkcode ScsiDisk.execute}, which never throws for
 * anything the initiator controls.
 *
 * @example READ CAPACITY (10) after the power-on unit attention
 * ```ts
 * import { RawNode } from "../../formats/raw.ts";
 * import { MemoryFile } from "../host/memory.ts";
 * import { ScsiBuffer } from "./buffer.ts";
 * import { CHECK_CONDITION, GOOD } from "./constants.ts";
 * import { ScsiDisk } from "./disk.ts";
 *
 * const node = await RawNode.open(new MemoryFile("disk", new Uint8Array(1 << 20)));
 * const disk = new ScsiDisk(node);
 * const readCapacity = new Uint8Array([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
 * const data = new Uint8Array(8);
 * const io = { dataIn: ScsiBuffer.of(data), dataOut: new ScsiBuffer() };
 * const first = await disk.execute(disk.decode(readCapacity), io);
 * if (first.status !== CHECK_CONDITION) throw new Error("unit attention first");
 * const second = await disk.execute(disk.decode(readCapacity), io);
 * const view = new DataView(data.buffer);
 * if (second.status !== GOOD || view.getUint32(0) !== 2047 || view.getUint32(4) !== 512) {
 *   throw new Error("last LBA 2047, 512-byte blocks");
 * }
 * ```
 */
export class ScsiDisk implements IoDisk, CdbContext {
  /** The block node holding the medium (the disk never closes it). */
  readonly node: BlockNode;
  readonly blockSize: number;
  readonly readOnly: boolean;
  readonly discard: boolean;
  readonly vendor: string;
  readonly product: string;
  readonly revision: string;
  readonly serial: string | undefined;
  readonly deviceId: string | undefined;
  readonly wwn: bigint | undefined;
  readonly rotationRate: number;
  /** The failed-request policy (see {@linkcode ScsiDiskOptions.errorPolicy}). */
  readonly errorPolicy: IoErrorPolicy | undefined;
  readonly maxTransferBlocks: number;
  readonly maxUnmapBlocks: number;
  readonly maxUnmapDescriptors: number;
  readonly unmapGranularity: number;

  /**
   * Called when the unit reports a change to its HBA (QEMU's `scsi_device_report_change`): today
   * CAPACITY DATA HAS CHANGED. virtio-scsi turns it into a PARAM_CHANGE event.
   */
  onChange: ((code: SenseCode) => void) | null = null;
  /** The LUNs of this unit's target, for REPORT LUNS; the bus sets it (alone: just LUN 0). */
  targetLuns: () => Iterable<number> = () => [0];

  #writeCache: boolean;
  #size: number;
  #capacity: number;
  /** The pending unit attention condition. A new unit starts with POWER ON, RESET. */
  #ua: SenseCode | null = SENSE_CODE.RESET;
  /** Sense of the last command that ended in CHECK CONDITION (not a UA), for REQUEST SENSE. */
  #sense: SenseData | null = null;
  readonly #scratch = new Uint8Array(
    Math.max(VPD_MAX_LEN, MODE_SENSE_MAX_LEN, READ_CAPACITY_16_LEN),
  );

  /**
   * Makes a unit over `node`; it starts with a power-on unit attention, as a real disk.
   *
   * @throws {RangeError} for a block size that is not a power of 2 from 512 to 65536, or a bad
   *   maximum transfer length
   */
  constructor(node: BlockNode, options: ScsiDiskOptions = {}) {
    const bs = options.blockSize ?? 512;
    if (!Number.isInteger(bs) || bs < 512 || bs > 65536 || (bs & (bs - 1)) !== 0) {
      throw new RangeError(`SCSI block size ${bs} is not a power of 2 from 512 to 65536`);
    }
    const maxTransfer = options.maxTransferBlocks ?? Math.floor(DEFAULT_MAX_IO_BYTES / bs);
    if (!Number.isInteger(maxTransfer) || maxTransfer < 1 || maxTransfer > 0xffff_ffff) {
      throw new RangeError(`Maximum transfer length ${maxTransfer} is not 1..2^32-1 blocks`);
    }
    this.node = node;
    this.blockSize = bs;
    this.readOnly = (options.readOnly ?? false) || node.readOnly;
    this.discard = options.discard ?? true;
    this.vendor = options.vendor ?? "QEMU";
    this.product = options.product ?? "QEMU HARDDISK";
    this.revision = options.revision ?? "2.5+";
    this.serial = options.serial;
    this.deviceId = options.deviceId ?? options.serial?.slice(0, 20) ??
      (node.filename.length > 0 ? node.filename : undefined);
    this.wwn = options.wwn;
    this.rotationRate = options.rotationRate ?? 1;
    this.errorPolicy = options.errorPolicy;
    this.maxTransferBlocks = maxTransfer;
    this.maxUnmapBlocks = Math.floor(DEFAULT_MAX_UNMAP_BYTES / bs);
    this.maxUnmapDescriptors = DEFAULT_MAX_UNMAP_DESCRIPTORS;
    this.unmapGranularity = Math.max(bs, DEFAULT_DISCARD_GRANULARITY) / bs;
    this.#writeCache = options.writeCache ?? true;
    this.#size = node.size;
    this.#capacity = Math.floor(node.size / bs);
  }

  /** Logical blocks on the medium. */
  get capacity(): number {
    return this.#capacity;
  }

  /** The WCE bit: writes may sit in a volatile cache until SYNCHRONIZE CACHE. */
  get writeCache(): boolean {
    return this.#writeCache;
  }

  /** The pending unit attention condition, if any. */
  get unitAttention(): SenseCode | null {
    return this.#ua;
  }

  /**
   * Establishes unit attention condition `code` unless a more important one is pending (a reset
   * outranks everything: QEMU's `scsi_device_set_ua`). Non-UA codes are ignored.
   */
  setUnitAttention(code: SenseCode): void {
    if (uaPrecedence(code) < uaPrecedence(this.#ua)) this.#ua = code;
  }

  /**
   * Logical unit reset (LOGICAL UNIT RESET, I_T NEXUS RESET, device reset): POWER ON, RESET unit
   * attention, no pending sense. WCE keeps its value, as in QEMU where it is back-end state.
   */
  reset(): void {
    this.#sense = null;
    this.setUnitAttention(SENSE_CODE.RESET);
    this.#refreshCapacity();
  }

  /**
   * The backing node was resized: CAPACITY DATA HAS CHANGED unit attention, and a report to the
   * HBA. Commands also notice a changed `node.size` by themselves; this call forces the report.
   */
  capacityChanged(): void {
    this.#refreshCapacity();
    this.#reportChange(SENSE_CODE.CAPACITY_CHANGED);
  }

  #refreshCapacity(): boolean {
    const size = this.node.size;
    if (size === this.#size) return false;
    this.#size = size;
    this.#capacity = Math.floor(size / this.blockSize);
    return true;
  }

  #reportChange(code: SenseCode): void {
    this.setUnitAttention(code);
    this.onChange?.(code);
  }

  /** Decodes a CDB for this unit's geometry (see {@linkcode decodeCdb}). */
  decode(cdb: Uint8Array): Cdb {
    return decodeCdb(cdb, this);
  }

  /**
   * Executes a decoded command. Never throws for anything the guest controls: failures are
   * CHECK CONDITION outcomes with sense data.
   *
   * @param cmd from {@linkcode decode}; an `invalid` CDB reports its sense code (after any unit
   *   attention, which takes precedence)
   * @param io the data buffers; the transport has checked their direction and size against
   *   `cmd.direction` and `cmd.length`
   */
  async execute(cmd: Cdb, io: ScsiIo): Promise<ScsiOutcome> {
    const outcome = await this.begin(cmd, io);
    this.complete(cmd, outcome);
    return outcome;
  }

  /**
   * {@linkcode execute} in two halves, for a transport's hot path: `begin` runs the command and
   * returns its outcome, or a promise of it when it does I/O (no promise at all for the emulated
   * commands); the caller then passes the outcome to {@linkcode complete} before the unit's next
   * command.
   */
  begin(cmd: Cdb, io: ScsiIo): ScsiOutcome | Promise<ScsiOutcome> {
    if (this.#refreshCapacity()) this.#reportChange(SENSE_CODE.CAPACITY_CHANGED);
    const ua = this.#ua;
    if (ua !== null) {
      const op = cmd.opcode;
      if (op !== INQUIRY && op !== REPORT_LUNS && op !== REQUEST_SENSE) {
        // Reported through autosense, so cleared now (UA_INTLCK_CTRL 00b, as QEMU assumes).
        this.#ua = null;
        return checkCondition(ua);
      }
    }
    return this.#dispatch(cmd, io);
  }

  /** The second half of {@linkcode execute}: bookkeeping once `cmd` ended with `outcome`. */
  complete(cmd: Cdb, outcome: ScsiOutcome): void {
    // SPC-4 6.33: REPORT LUNS clears a REPORTED LUNS DATA HAS CHANGED condition.
    if (cmd.kind === "report-luns" && this.#ua === SENSE_CODE.REPORTED_LUNS_CHANGED) {
      this.#ua = null;
    }
    // Kept for REQUEST SENSE until the next command completes; a unit attention reported
    // through autosense is gone already (QEMU's sense_is_ua).
    const sense = outcome.sense;
    this.#sense = outcome.status === CHECK_CONDITION && sense !== null &&
        sense.code.key !== UNIT_ATTENTION
      ? sense
      : null;
  }

  /** Sends the first `length` bytes of the scratch buffer, truncated to `allocation`. */
  #send(io: ScsiIo, data: Uint8Array, length: number, allocation: number): ScsiOutcome {
    return good(io.dataIn.copyIn(data.subarray(0, Math.min(length, allocation))));
  }

  /** Runs the command; synchronous outcomes are returned as such (no promise hop on that path). */
  #dispatch(cmd: Cdb, io: ScsiIo): ScsiOutcome | Promise<ScsiOutcome> {
    const out = this.#scratch;
    switch (cmd.kind) {
      case "invalid":
        return checkCondition(cmd.sense);
      case "test-unit-ready":
      case "start-stop-unit":
        // A fixed disk is always ready; there is no medium to load or eject and no power states.
        return GOOD_NO_DATA;
      case "inquiry": {
        const n = cmd.evpd ? vpdPage(this, cmd.pageCode, out) : standardInquiry(this, out);
        if (n < 0) return checkCondition(SENSE_CODE.INVALID_FIELD);
        return this.#send(io, out, n, cmd.allocationLength);
      }
      case "request-sense": {
        // SPC-4 5.11.2 b): a pending unit attention is reported as the sense data and cleared.
        let data: SenseData = this.#sense ?? NO_SENSE_DATA;
        if (this.#ua !== null) {
          data = { code: this.#ua };
          this.#ua = null;
        }
        const n = cmd.desc ? writeDescriptorSense(out, data) : writeFixedSense(out, data);
        return this.#send(io, out, n, cmd.allocationLength);
      }
      case "report-luns": {
        const data = reportLunsData(this.targetLuns());
        return this.#send(io, data, data.length, cmd.allocationLength);
      }
      case "read-capacity-10":
      case "read-capacity-16":
        return this.#readCapacity(cmd, io);
      case "mode-sense": {
        const n = modeSense(this, cmd, out);
        if (typeof n !== "number") return checkCondition(n);
        return this.#send(io, out, n, cmd.allocationLength);
      }
      case "mode-select":
        return this.#modeSelect(cmd, io);
      case "read":
        return read(this, cmd, io);
      case "write":
        return write(this, cmd, io);
      case "verify":
        return verify(this, cmd, io);
      case "write-same":
        return writeSame(this, cmd, io);
      case "unmap":
        return unmap(this, cmd, io);
      case "synchronize-cache":
        return synchronizeCache(this, cmd);
    }
  }

  async #modeSelect(
    cmd: Extract<Cdb, { kind: "mode-select" }>,
    io: ScsiIo,
  ): Promise<ScsiOutcome> {
    const params = new Uint8Array(cmd.parameterListLength);
    io.dataOut.copyOut(params, 0);
    const changes = modeSelect(this, cmd, params);
    if ("key" in changes) return checkCondition(changes);
    if (changes.writeCache !== undefined) {
      const wasOn = this.#writeCache;
      this.#writeCache = changes.writeCache;
      // Turning the cache off must not leave dirty data behind it (QEMU flushes too).
      if (wasOn && !changes.writeCache) {
        try {
          await this.node.flush();
        } catch {
          return checkCondition(SENSE_CODE.WRITE_ERROR);
        }
      }
    }
    return good(0, params.length);
  }

  #readCapacity(
    cmd: Extract<Cdb, { kind: "read-capacity-10" | "read-capacity-16" }>,
    io: ScsiIo,
  ): ScsiOutcome {
    const capacity = this.#capacity;
    // An empty medium has no last LBA to report (QEMU: LOGICAL UNIT NOT READY).
    if (capacity === 0) return checkCondition(SENSE_CODE.LUN_NOT_READY);
    const out = this.#scratch;
    const last = capacity - 1;
    const view = new DataView(out.buffer, out.byteOffset, READ_CAPACITY_16_LEN);
    out.fill(0, 0, READ_CAPACITY_16_LEN);
    if (cmd.kind === "read-capacity-10") {
      // Capacity beyond 2^32 blocks reads FFFFFFFFh: the guest must use READ CAPACITY (16).
      view.setUint32(0, Math.min(last, 0xffff_ffff));
      view.setUint32(4, this.blockSize);
      return this.#send(io, out, 8, 8);
    }
    view.setUint32(0, Math.floor(last / 0x1_0000_0000));
    view.setUint32(4, last % 0x1_0000_0000);
    view.setUint32(8, this.blockSize);
    // Byte 14: LBPME when UNMAP deallocates (SBC-3 5.16.2); LBPRZ is not promised.
    out[14] = this.discard ? 0x80 : 0;
    return this.#send(io, out, READ_CAPACITY_16_LEN, cmd.allocationLength);
  }
}

const NO_SENSE_DATA: SenseData = Object.freeze({ code: SENSE_CODE.NO_SENSE });
