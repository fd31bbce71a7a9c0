/**
 * A SCSI bus with one channel: targets 0..maxTarget, each with logical units 0..maxLun. It finds
 * the unit a command addresses and answers for the addresses where there is none, as QEMU's
 * `scsi-bus.c` target emulation does for a target that exists:
 *
 * - LUN 0 without a unit (the target has others): REPORT LUNS lists the target's units, INQUIRY
 *   reports peripheral qualifier 001b ("QEMU TARGET"), TEST UNIT READY succeeds, REQUEST SENSE
 *   returns NO SENSE, anything else is INVALID COMMAND OPERATION CODE.
 * - Any other LUN without a unit: INQUIRY reports peripheral qualifier 011b (no unit possible),
 *   REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED as data, anything else ends in CHECK
 *   CONDITION with LOGICAL UNIT NOT SUPPORTED.
 *
 * A target with no units at all does not exist: the transport reports that itself (virtio-scsi
 * BAD_TARGET).
 *
 * @module
 */
import type { Cdb } from "./cdb.ts";
import { decodeCdb } from "./cdb.ts";
import {
  SCSI_INQUIRY_LEN,
  SCSI_VERSION_SPC3,
  TYPE_INACTIVE,
  TYPE_NO_LUN,
  TYPE_NOT_PRESENT,
  VPD_SUPPORTED_PAGES,
} from "./constants.ts";
import { reportLunsData } from "./report_luns.ts";
import type { ScsiDisk } from "./disk.ts";
import { checkCondition, good, GOOD_NO_DATA, type ScsiIo, type ScsiOutcome } from "./request.ts";
import {
  SENSE_CODE,
  type SenseCode,
  type SenseData,
  writeDescriptorSense,
  writeFixedSense,
} from "./sense.ts";

/** Largest target number SAM's single-level LUN structure leaves a virtio-scsi device. */
export const SCSI_MAX_TARGET = 255;
/** Largest LUN of flat space addressing (14 bits). */
export const SCSI_MAX_LUN = 16383;

/** Decoding context for commands to an address without a unit (block size irrelevant). */
const NO_UNIT_CONTEXT = { blockSize: 512, maxTransferBlocks: 0xffff_ffff } as const;

/** Options of a {@linkcode ScsiBus}. */
export interface ScsiBusOptions {
  /** Largest target number (default 255). */
  maxTarget?: number;
  /** Largest LUN (default 16383). */
  maxLun?: number;
}

/** A single-channel SCSI bus of disks. */
export class ScsiBus {
  /** Largest target number. */
  readonly maxTarget: number;
  /** Largest LUN. */
  readonly maxLun: number;
  readonly #targets = new Map<number, Map<number, ScsiDisk>>();

  /**
   * Makes an empty bus with the given address limits.
   *
   * @throws {RangeError} for limits outside what the addressing allows
   */
  constructor(options: ScsiBusOptions = {}) {
    const maxTarget = options.maxTarget ?? SCSI_MAX_TARGET;
    const maxLun = options.maxLun ?? SCSI_MAX_LUN;
    if (!Number.isInteger(maxTarget) || maxTarget < 0 || maxTarget > SCSI_MAX_TARGET) {
      throw new RangeError(`Largest target ${maxTarget} is not 0..${SCSI_MAX_TARGET}`);
    }
    if (!Number.isInteger(maxLun) || maxLun < 0 || maxLun > SCSI_MAX_LUN) {
      throw new RangeError(`Largest LUN ${maxLun} is not 0..${SCSI_MAX_LUN}`);
    }
    this.maxTarget = maxTarget;
    this.maxLun = maxLun;
  }

  #checkAddress(target: number, lun: number): void {
    if (!Number.isInteger(target) || target < 0 || target > this.maxTarget) {
      throw new RangeError(`Target ${target} is not 0..${this.maxTarget}`);
    }
    if (!Number.isInteger(lun) || lun < 0 || lun > this.maxLun) {
      throw new RangeError(`LUN ${lun} is not 0..${this.maxLun}`);
    }
  }

  /**
   * Plugs `disk` in at `target`:`lun`. The target's other units get REPORTED LUNS DATA HAS CHANGED
   * (SPC-4 6.33); the new unit keeps its power-on unit attention.
   *
   * @throws {RangeError} for an address out of range or already taken
   */
  attach(target: number, lun: number, disk: ScsiDisk): void {
    this.#checkAddress(target, lun);
    const existing = this.#targets.get(target);
    if (existing?.has(lun)) throw new RangeError(`Target ${target} LUN ${lun} is already in use`);
    const luns = existing ?? new Map<number, ScsiDisk>();
    this.#targets.set(target, luns);
    this.#lunsChanged(luns);
    luns.set(lun, disk);
    disk.targetLuns = () => luns.keys();
  }

  /**
   * Unplugs the unit at `target`:`lun`; the target's remaining units get REPORTED LUNS DATA HAS
   * CHANGED. The target disappears with its last unit.
   *
   * @throws {RangeError} when there is no unit there
   */
  detach(target: number, lun: number): ScsiDisk {
    const luns = this.#targets.get(target);
    const disk = luns?.get(lun);
    if (luns === undefined || disk === undefined) {
      throw new RangeError(`Target ${target} LUN ${lun} has no logical unit`);
    }
    luns.delete(lun);
    disk.targetLuns = () => [0];
    if (luns.size === 0) this.#targets.delete(target);
    else this.#lunsChanged(luns);
    return disk;
  }

  #lunsChanged(luns: Map<number, ScsiDisk>): void {
    for (const d of luns.values()) d.setUnitAttention(SENSE_CODE.REPORTED_LUNS_CHANGED);
  }

  /** The unit at `target`:`lun`. */
  find(target: number, lun: number): ScsiDisk | undefined {
    return this.#targets.get(target)?.get(lun);
  }

  /** True when `target` has at least one unit. */
  hasTarget(target: number): boolean {
    return this.#targets.has(target);
  }

  /** The units of `target`, in LUN order. */
  units(target: number): Array<{ lun: number; disk: ScsiDisk }> {
    const luns = this.#targets.get(target);
    if (luns === undefined) return [];
    return [...luns].sort((a, b) => a[0] - b[0]).map(([lun, disk]) => ({ lun, disk }));
  }

  /** Every unit on the bus, with its address. */
  *all(): Generator<{ target: number; lun: number; disk: ScsiDisk }> {
    for (const [target, luns] of this.#targets) {
      for (const [lun, disk] of luns) yield { target, lun, disk };
    }
  }

  /** Resets every unit (a bus or device reset). */
  reset(): void {
    for (const { disk } of this.all()) disk.reset();
  }

  /** Resets every unit of `target` (I_T NEXUS RESET). */
  resetTarget(target: number): void {
    for (const disk of this.#targets.get(target)?.values() ?? []) disk.reset();
  }

  /** Decodes `cdb` for the unit at the address, or generically where there is none. */
  decode(target: number, lun: number, cdb: Uint8Array): Cdb {
    const disk = this.find(target, lun);
    return disk !== undefined ? disk.decode(cdb) : decodeCdb(cdb, NO_UNIT_CONTEXT);
  }

  /**
   * Executes a decoded command for `target`:`lun`: on its unit, or as the target answers for a
   * LUN without one. The target must exist ({@linkcode hasTarget}).
   */
  execute(target: number, lun: number, cmd: Cdb, io: ScsiIo): Promise<ScsiOutcome> {
    const disk = this.find(target, lun);
    if (disk !== undefined) return disk.execute(cmd, io);
    return Promise.resolve(this.#noUnit(target, lun, cmd, io));
  }

  #noUnit(target: number, lun: number, cmd: Cdb, io: ScsiIo): ScsiOutcome {
    if (cmd.kind === "invalid") return checkCondition(cmd.sense);
    if (cmd.kind === "inquiry") return noUnitInquiry(lun, cmd, io);
    if (cmd.kind === "request-sense") {
      const data: SenseData = lun === 0 ? { code: SENSE_CODE.NO_SENSE } : LUN_NOT_SUPPORTED;
      const out = new Uint8Array(32);
      const n = cmd.desc ? writeDescriptorSense(out, data) : writeFixedSense(out, data);
      return good(io.dataIn.copyIn(out.subarray(0, Math.min(n, cmd.allocationLength))));
    }
    if (lun !== 0) return checkCondition(SENSE_CODE.LUN_NOT_SUPPORTED);
    switch (cmd.kind) {
      case "report-luns": {
        const data = reportLunsData(this.#targets.get(target)?.keys() ?? []);
        return good(
          io.dataIn.copyIn(data.subarray(0, Math.min(data.length, cmd.allocationLength))),
        );
      }
      case "test-unit-ready":
        return GOOD_NO_DATA;
      default:
        return checkCondition(SENSE_CODE.INVALID_OPCODE);
    }
  }
}

const LUN_NOT_SUPPORTED: SenseData = Object.freeze({ code: SENSE_CODE.LUN_NOT_SUPPORTED });

function noUnitInquiry(
  lun: number,
  cmd: Extract<Cdb, { kind: "inquiry" }>,
  io: ScsiIo,
): ScsiOutcome {
  const peripheral = lun === 0 ? TYPE_NOT_PRESENT | TYPE_INACTIVE : TYPE_NO_LUN;
  const out = new Uint8Array(SCSI_INQUIRY_LEN);
  let n: number;
  if (cmd.evpd) {
    // Only the mandatory supported-pages page, listing itself.
    if (cmd.pageCode !== VPD_SUPPORTED_PAGES) return checkCondition(INVALID_FIELD);
    out[0] = peripheral;
    out[1] = VPD_SUPPORTED_PAGES;
    out[3] = 1; // PAGE LENGTH
    out[4] = VPD_SUPPORTED_PAGES;
    n = 5;
  } else {
    out[0] = peripheral;
    if (lun === 0) {
      out[2] = SCSI_VERSION_SPC3;
      out[3] = 0x10 | 0x02; // HISUP, RESPONSE DATA FORMAT 2
      out[4] = SCSI_INQUIRY_LEN - 5;
      out[7] = 0x10 | 0x02; // SYNC, CMDQUE
      out.set(ascii("QEMU    "), 8);
      out.set(ascii("QEMU TARGET     "), 16);
      out.set(ascii("2.5+"), 32);
    }
    n = SCSI_INQUIRY_LEN;
  }
  return good(io.dataIn.copyIn(out.subarray(0, Math.min(n, cmd.allocationLength))));
}

const INVALID_FIELD: SenseCode = SENSE_CODE.INVALID_FIELD;

function ascii(text: string): Uint8Array {
  return Uint8Array.from(text, (c) => c.charCodeAt(0));
}
