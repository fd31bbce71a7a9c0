/**
 * What a workload drives on a virtio-scsi disk: a {@linkcode BlockTarget} for one LUN on one
 * request queue, whose requests become SCSI commands in pre-allocated slots — reads READ(16),
 * writes WRITE(16), flushes SYNCHRONIZE CACHE(16) (only with the write cache on, as sd sends them),
 * trims UNMAP with one block descriptor (only when the LUN reports LBPU) — and whose completions
 * turn responses into statuses.
 *
 * **Completions.** virtio response codes other than OK fail the request naming the code; CHECK
 * CONDITION fails it naming sense key, ASC and ASCQ — except UNIT ATTENTION, which is retried once
 * (the midlayer's NEEDS_RETRY).
 *
 * Hot path: no allocation of our own per request — headers, CDBs, UNMAP parameter lists, indirect
 * tables, descriptor lists and request objects are per slot, made when the target opens.
 *
 * @module
 */

import { VIRTIO_SCSI_REQ_CDB, VIRTIO_SCSI_S_OK } from "../virtio/virtio_scsi_constants.ts";
import { CHECK_CONDITION, GOOD, READ_16, WRITE_16 } from "../scsi/constants.ts";
import { ILLEGAL_REQUEST, UNIT_ATTENTION } from "../scsi/sense.ts";
import type { BlockTarget, IoRequest, IoStatus } from "./block_target.ts";
import { COMPLETED, localStatus, type QueueDriver, QueueTarget } from "./queue_target.ts";
import { writeLun, writeRw16Cdb, writeSyncCache16Cdb, writeUnmap } from "./scsi_commands.ts";
import { describeSense, scsiResponseName, scsiStatusName } from "./scsi_names.ts";
import type { ScsiLun } from "./scsi_scan.ts";
import { armResponse, type Slot, type SlotOwner } from "./scsi_slot.ts";

/** What a {@linkcode ScsiTarget} needs of its driver (the `ScsiDriver`). */
export interface ScsiTargetDriver extends QueueDriver<Slot> {
  /** Slot memory and registration in request queue `queueIndex`. */
  _allocSlots(owner: SlotOwner, queueIndex: number, depth: number, dataBytes: number): {
    slots: Slot[];
    memory: number[];
  };
  /** Forgets closed slots and frees their memory. */
  _freeSlots(slots: readonly Slot[], memory: readonly number[]): void;
  /** A view of all guest RAM, for header writes at translated offsets. */
  _ram(): DataView;
  /** Whether a target's wait should run `processEvents` now. */
  readonly _eventWorkDue: boolean;
  /** Runs the work events left. */
  processEvents(): Promise<number>;
}

/**
 * A {@linkcode BlockTarget} for one LUN on one request queue of a `ScsiDriver`: `depth` command
 * slots in guest RAM. Capacity, block size and the read-only flag follow the LUN (a capacity
 * change shows at once). Requests the guest answers itself complete at once: anything to a removed
 * LUN (ioerr), ranges past the capacity (ioerr), trims without LBPU and write-zeroes/get-id
 * (unsupp), flushes with the write cache off (ok). Writes to a write-protected LUN are sent: the
 * device answers DATA PROTECT. `submit()` throws a RangeError for an offset or length that is not
 * a multiple of the block size, or a length past the target's maximum.
 */
export class ScsiTarget extends QueueTarget<Slot, ScsiTargetDriver>
  implements BlockTarget, SlotOwner {
  /** The disk. */
  readonly lun: ScsiLun;
  readonly maxWriteZeroes = 0;
  readonly #memory: number[];

  /** Use `ScsiDriver.openTarget`. */
  constructor(
    driver: ScsiTargetDriver,
    lun: ScsiLun,
    queue: number,
    depth: number,
    maxTransfer: number,
  ) {
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
        writeRw16Cdb(ram, cdb, r.op === "read" ? READ_16 : WRITE_16, r.offset / bs, r.length / bs);
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
        writeSyncCache16Cdb(ram, cdb);
        readable.push(slot.req);
        writable.push(slot.resp);
        break;
      case "discard": {
        if (this.maxDiscard === 0) return localStatus(r, "unsupp", "the LUN does not report LBPU");
        this.#checkLength(r, this.maxDiscard);
        if (l.removed) return localStatus(r, "ioerr", `LUN ${l.target}:${l.lun} was removed`);
        if (r.offset + r.length > l.capacity) return localStatus(r, "ioerr", "beyond the capacity");
        const bs = l.blockSize;
        writeUnmap(ram, cdb, slot.paramOff, r.offset / bs, r.length / bs);
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
    armResponse(ram, slot);
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
      r.detail = `SCSI status ${scsiStatusName(slot.status)}`;
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
