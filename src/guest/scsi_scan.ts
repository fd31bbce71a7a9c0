/**
 * LUN discovery for the guest's virtio-scsi driver (what `scsi_scan_host` and sd's revalidation do
 * for virtio-scsi): the disks the driver knows, how a scan finds them, and how one LUN is probed,
 * updated or dropped.
 *
 * **Scan.** Targets 0..min(max_target, `scanTargets`) one after the other (Linux scans every
 * target up to max_target; we bound it — default 7, the historical SCSI bus width — so that a
 * device reporting 255 targets costs 8 REPORT LUNS, not 256). Per target REPORT LUNS (a target
 * without units answers BAD_TARGET), then per LUN: INQUIRY (only peripheral qualifier 0, device
 * type 0 — disks — are kept), TEST UNIT READY retried while it reports a unit attention (a fresh
 * LUN reports POWER ON, RESET 06/29/00 first), READ CAPACITY(16) falling back to (10), the block
 * limits and provisioning VPD pages, and MODE SENSE for the write protect and write cache bits.
 *
 * The commands go through the driver's own command slot ({@linkcode ProbeCommand}); every change
 * to a LUN is reported as a {@linkcode ScsiLunEvent}.
 *
 * @module
 */

import { VIRTIO_SCSI_MAX_LUN, VIRTIO_SCSI_S_OK } from "../virtio/virtio_scsi_constants.ts";
import { GOOD, VPD_BLOCK_LIMITS, VPD_LOGICAL_BLOCK_PROVISIONING } from "../scsi/constants.ts";
import { ILLEGAL_REQUEST } from "../scsi/sense.ts";
import {
  type CommandOutcome,
  hasLbpu,
  inquiryCdb,
  inquiryIdentity,
  isConnectedDisk,
  modeSenseCachingCdb,
  parseBlockLimits,
  parseModeSenseCaching,
  parseReadCapacity10,
  parseReadCapacity16,
  parseReportLuns,
  readCapacity10Cdb,
  readCapacity16Cdb,
  reportLunsCdb,
  testUnitReadyCdb,
  vpdCdb,
} from "./scsi_commands.ts";

/** Buffer of the driver's command slot: REPORT LUNS for up to 2047 LUNs, VPD pages, INQUIRY. */
export const COMMAND_BUFFER_BYTES = 16384;

/** A target:LUN address. */
export interface ScsiAddress {
  /** SCSI target number. */
  readonly target: number;
  /** Logical unit number. */
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

/**
 * Sends one CDB to `target`:`lun` with `dataIn` bytes of data-in buffer and waits for it, retrying
 * while it ends in a unit attention (scsi_test_unit_ready's way).
 */
export type ProbeCommand = (
  target: number,
  lun: number,
  cdb: readonly number[],
  dataIn: number,
) => Promise<CommandOutcome>;

/** How a {@linkcode LunScanner} is built. */
export interface LunScannerOptions {
  readonly command: ProbeCommand;
  /** The device's max_lun (clamped): LUNs above it are not reported. */
  readonly maxLun: number;
  /** Highest target a full scan visits. */
  readonly scanLimit: number;
  /** Called for every change to a LUN, in order. */
  readonly emit: (event: ScsiLunEvent) => void;
}

function lunKey(target: number, lun: number): number {
  return target * (VIRTIO_SCSI_MAX_LUN + 1) + lun;
}

/**
 * The LUNs a driver knows, and the scan that keeps them. One command at a time: the caller holds
 * the driver's command slot for the whole of each call.
 */
export class LunScanner {
  readonly #command: ProbeCommand;
  readonly #maxLun: number;
  readonly #scanLimit: number;
  readonly #emit: (event: ScsiLunEvent) => void;
  readonly #luns = new Map<number, LunState>();
  #sortedLuns: LunState[] = [];

  constructor(options: LunScannerOptions) {
    this.#command = options.command;
    this.#maxLun = options.maxLun;
    this.#scanLimit = options.scanLimit;
    this.#emit = options.emit;
  }

  /** The disks found, by target then LUN. */
  get luns(): readonly ScsiLun[] {
    return this.#sortedLuns;
  }

  /** The disk at `target`:`lun`, if one is known there. */
  find(target: number, lun: number): ScsiLun | undefined {
    return this.#luns.get(lunKey(target, lun));
  }

  /** Scans every target again, then probes the known LUNs beyond the scanned targets. */
  async scanAll(cause: ScsiLunEvent["cause"]): Promise<void> {
    for (let target = 0; target <= this.#scanLimit; target++) {
      await this.scanTarget(target, cause);
    }
    // Known LUNs beyond the scanned targets (hotplugged there) are checked one by one.
    for (const l of [...this.#sortedLuns]) {
      if (l.target > this.#scanLimit) await this.probeLun(l.target, l.lun, cause);
    }
  }

  /** REPORT LUNS on `target`: LUNs no longer reported are removed, the others probed. */
  async scanTarget(target: number, cause: ScsiLunEvent["cause"]): Promise<void> {
    const reported = await this.#reportLuns(target);
    const found = new Set(reported);
    for (const l of [...this.#sortedLuns]) {
      if (l.target === target && !found.has(l.lun)) this.remove(target, l.lun, cause);
    }
    for (const lun of reported) await this.probeLun(target, lun, cause);
  }

  /** REPORT LUNS on LUN 0 of `target`: its LUNs, or none when the target does not exist. */
  async #reportLuns(target: number): Promise<number[]> {
    const length = COMMAND_BUFFER_BYTES;
    const out = await this.#command(target, 0, reportLunsCdb(length), length);
    if (out.response !== VIRTIO_SCSI_S_OK) return [];
    if (out.status !== GOOD) {
      // A target that cannot REPORT LUNS: Linux falls back to a sequential scan; LUN 0 it is.
      return out.key === ILLEGAL_REQUEST ? [0] : [];
    }
    return parseReportLuns(out.data, this.#maxLun);
  }

  /**
   * Probes `target`:`lun` and adds, updates or removes it (scsi_probe_and_add_lun + sd's
   * revalidate): INQUIRY, TEST UNIT READY, READ CAPACITY, VPD B0h/B2h, MODE SENSE.
   */
  async probeLun(target: number, lun: number, cause: ScsiLunEvent["cause"]): Promise<void> {
    const inquiry = await this.#command(target, lun, inquiryCdb(96), 96);
    const d = inquiry.data;
    if (inquiry.response !== VIRTIO_SCSI_S_OK || inquiry.status !== GOOD || !isConnectedDisk(d)) {
      this.remove(target, lun, cause);
      return;
    }
    const tur = await this.#command(target, lun, testUnitReadyCdb(), 0);
    if (tur.response !== VIRTIO_SCSI_S_OK || tur.status !== GOOD) {
      this.remove(target, lun, cause);
      return;
    }
    const capacity = await this.#readCapacity(target, lun);
    if (capacity === null) {
      this.remove(target, lun, cause);
      return;
    }
    let maxTransferBlocks = 0;
    let maxUnmapBlocks = 0;
    const limits = await this.#command(target, lun, vpdCdb(VPD_BLOCK_LIMITS, 64), 64);
    if (
      limits.status === GOOD && limits.response === VIRTIO_SCSI_S_OK && limits.data.length >= 28
    ) {
      ({ maxTransferBlocks, maxUnmapBlocks } = parseBlockLimits(limits.data));
    }
    let unmap = false;
    if (capacity.lbpme) {
      const lbp = await this.#command(target, lun, vpdCdb(VPD_LOGICAL_BLOCK_PROVISIONING, 8), 8);
      unmap = lbp.status === GOOD && lbp.response === VIRTIO_SCSI_S_OK && hasLbpu(lbp.data) &&
        maxUnmapBlocks > 0;
    }
    // MODE SENSE(6), caching page, no block descriptors: WP in the header, WCE in the page.
    let readOnly = false;
    let writeCache = false; // sd: "Assuming drive cache: write through" when it cannot tell
    const mode = await this.#command(target, lun, modeSenseCachingCdb(), 0xff);
    if (mode.status === GOOD && mode.response === VIRTIO_SCSI_S_OK && mode.data.length >= 4) {
      ({ readOnly, writeCache } = parseModeSenseCaching(mode.data));
    }
    const fresh: LunState = {
      target,
      lun,
      ...inquiryIdentity(d),
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
    const rc16 = await this.#command(target, lun, readCapacity16Cdb(32), 32);
    let last: number;
    let blockSize: number;
    let lbpme = false;
    if (rc16.response === VIRTIO_SCSI_S_OK && rc16.status === GOOD && rc16.data.length >= 12) {
      const parsed = parseReadCapacity16(rc16.data);
      if (parsed === null) return null;
      ({ last, blockSize, lbpme } = parsed);
    } else if (rc16.response === VIRTIO_SCSI_S_OK && rc16.key === ILLEGAL_REQUEST) {
      // sd_read_capacity: a device without READ CAPACITY(16) gets (10).
      const rc10 = await this.#command(target, lun, readCapacity10Cdb(), 8);
      if (rc10.response !== VIRTIO_SCSI_S_OK || rc10.status !== GOOD || rc10.data.length < 8) {
        return null;
      }
      ({ last, blockSize } = parseReadCapacity10(rc10.data));
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

  /** Drops `target`:`lun` (marked removed, so its open targets fail new requests). */
  remove(target: number, lun: number, cause: ScsiLunEvent["cause"]): void {
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
}
