/**
 * The part of virtio-scsi's configuration both halves need across threads: one small
 * `SharedArrayBuffer` ({@linkcode VirtioScsiSharedConfig}) holding the driver-writable `sense_size`
 * and `cdb_size` (and the address limits), so the iothread's back-end reads the sizes the driver
 * last wrote for every request, as QEMU does, without a message round trip. Plain data and no
 * VMM imports: the iothread Worker imports this.
 *
 * @module
 */

import {
  VIRTIO_SCSI_CDB_DEFAULT_SIZE,
  VIRTIO_SCSI_CDB_SIZE_LIMIT,
  VIRTIO_SCSI_MAX_LUN,
  VIRTIO_SCSI_MAX_TARGET,
  VIRTIO_SCSI_SENSE_DEFAULT_SIZE,
  VIRTIO_SCSI_SENSE_SIZE_LIMIT,
} from "../virtio/virtio_scsi_constants.ts";

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
  /** The shared words: pass it to the other thread's instance. */
  readonly buffer: SharedArrayBuffer;
  readonly #w: Int32Array;

  /**
   * Wraps the words of `buffer`, or makes fresh ones with the defaults and `limits`.
   *
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

  /** `max_target`: the largest target number. */
  get maxTarget(): number {
    return Atomics.load(this.#w, W_MAX_TARGET);
  }

  /** `max_lun`: the largest LUN. */
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
