/**
 * The VMM-side half of virtio-blk: the feature bits offered, the device configuration space
 * (virtio 1.2 §5.2.4), the driver-writable `writeback` byte and the capacity, which it shares with
 * the back-end in the iothread Worker through {@linkcode VirtioBlkShared}.
 *
 * @module
 */

import {
  type ActivatedQueue,
  PCI_CLASS_STORAGE_SCSI,
  PCI_SUBDEVICE_ID_QEMU,
  type VirtioDeviceModel,
} from "../virtio/device.ts";
import { hasFeature, VIRTIO_ID_BLOCK } from "../virtio/features.ts";
import {
  VIRTIO_BLK_CFG_BLK_SIZE,
  VIRTIO_BLK_CFG_CAPACITY,
  VIRTIO_BLK_CFG_DISCARD_SECTOR_ALIGNMENT,
  VIRTIO_BLK_CFG_MAX_DISCARD_SECTORS,
  VIRTIO_BLK_CFG_MAX_DISCARD_SEG,
  VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SECTORS,
  VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SEG,
  VIRTIO_BLK_CFG_MIN_IO_SIZE,
  VIRTIO_BLK_CFG_NUM_QUEUES,
  VIRTIO_BLK_CFG_OPT_IO_SIZE,
  VIRTIO_BLK_CFG_PHYSICAL_BLOCK_EXP,
  VIRTIO_BLK_CFG_SEG_MAX,
  VIRTIO_BLK_CFG_SIZE_BASE,
  VIRTIO_BLK_CFG_SIZE_DISCARD,
  VIRTIO_BLK_CFG_SIZE_MAX,
  VIRTIO_BLK_CFG_SIZE_WRITE_ZEROES,
  VIRTIO_BLK_CFG_WRITE_ZEROES_MAY_UNMAP,
  VIRTIO_BLK_CFG_WRITEBACK,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_SECTOR_SIZE,
} from "../virtio/virtio_blk_constants.ts";
import {
  capacitySectors,
  type ResolvedVirtioBlkOptions,
  resolveVirtioBlkOptions,
  type VirtioBlkDisk,
  virtioBlkFeatures,
  type VirtioBlkOptions,
  VirtioBlkShared,
} from "./virtio_blk_options.ts";

/** What the model tells the machine; each hook runs on the VMM thread, inside a guest exit. */
export interface VirtioBlkModelHooks {
  /** DRIVER_OK: start the back-end with these features and queues (see `VirtioDeviceModel.activate`). */
  activate?: (features: bigint, queues: readonly ActivatedQueue[], epoch: number) => void;
  /** Device reset: stop the back-end and forget its queues. */
  reset?: () => void;
  /** The configuration changed (capacity): the transport must bump config_generation and interrupt. */
  configChange?: () => void;
}

/**
 * The VMM-side virtio-blk device model.
 *
 * It pairs with a `VirtioBlkBackend` in the iothread through the same options and one shared
 * buffer, built in either order:
 * - the machine's (`deviceType` in `virtio_blk.ts`): the iothread runs `createBackend`, which
 *   returns the buffer; `createModel` wraps it with `new VirtioBlkShared(buffer)` and passes it here;
 * - model first: send {@linkcode options} and {@linkcode shared}`.buffer` to the iothread, which
 *   builds `new VirtioBlkBackend(node, options, new VirtioBlkShared(buffer))`.
 *
 * {@linkcode hooks}: `activate`/`reset` start and stop the back-end (the machine forwards them
 * itself), `configChange` must call the transport's `configChanged()` (capacity changes).
 *
 * @example
 * ```ts
 * import { VirtioBlkModel } from "./virtio_blk_model.ts";
 * const model = new VirtioBlkModel({ serial: "vstor-0" }, { size: 1 << 20, readOnly: false });
 * const cfg = new Uint8Array(8);
 * model.readConfig(0, cfg);
 * if (new DataView(cfg.buffer).getBigUint64(0, true) !== 2048n) throw new Error("capacity");
 * ```
 */
export class VirtioBlkModel implements VirtioDeviceModel {
  /** Virtio device id: `VIRTIO_ID_BLOCK`. */
  readonly deviceId: number = VIRTIO_ID_BLOCK;
  readonly deviceFeatures: bigint;
  readonly numQueues: number;
  readonly configSize: number;
  /** PCI class: mass storage, SCSI (as QEMU gives virtio-blk and virtio-scsi). */
  readonly pciClass: number = PCI_CLASS_STORAGE_SCSI;
  /** PCI subsystem id: QEMU's. */
  readonly subsystemId: number = PCI_SUBDEVICE_ID_QEMU;
  /** The resolved options; send the original options object (or this one) to the iothread. */
  readonly options: ResolvedVirtioBlkOptions;
  /** Shared with the back-end: `writeback` and the capacity. */
  readonly shared: VirtioBlkShared;
  /** Calls into the machine; set them before the guest runs. */
  hooks: VirtioBlkModelHooks = {};

  /** The whole config structure, through secure erase; `configSize` bytes of it are visible. */
  readonly #config = new Uint8Array(72);
  readonly #view = new DataView(this.#config.buffer);
  #driverFeatures = 0n;

  /**
   * Builds the model for a disk of `disk.size` bytes.
   *
   * @param options device options (validated; see {@linkcode resolveVirtioBlkOptions})
   * @param disk the disk's size in bytes and whether it is read-only
   * @param shared the back-end's shared state when it was built first (the machine's order); a
   *   fresh one otherwise. Either way the model sets its capacity and cache mode.
   * @throws {RangeError} for a bad option or disk size
   */
  constructor(options: VirtioBlkOptions, disk: VirtioBlkDisk, shared?: VirtioBlkShared) {
    if (!Number.isSafeInteger(disk.size) || disk.size < 0) {
      throw new RangeError(`virtio-blk disk size ${disk.size} is not a byte count`);
    }
    const o = resolveVirtioBlkOptions(options);
    this.options = o;
    this.numQueues = o.numQueues;
    this.deviceFeatures = virtioBlkFeatures(o, disk.readOnly);
    this.configSize = o.writeZeroes
      ? VIRTIO_BLK_CFG_SIZE_WRITE_ZEROES
      : o.discard
      ? VIRTIO_BLK_CFG_SIZE_DISCARD
      : VIRTIO_BLK_CFG_SIZE_BASE;
    this.shared = shared ?? new VirtioBlkShared();
    this.shared.capacity = capacitySectors(disk.size);
    this.shared.writeback = o.writeback;

    const v = this.#view;
    v.setUint32(VIRTIO_BLK_CFG_SIZE_MAX, o.sizeMax, true);
    v.setUint32(VIRTIO_BLK_CFG_SEG_MAX, o.segMax, true);
    // Geometry (cylinders, heads, sectors) stays 0: VIRTIO_BLK_F_GEOMETRY is not offered.
    v.setUint32(VIRTIO_BLK_CFG_BLK_SIZE, o.logicalBlockSize, true);
    v.setUint8(
      VIRTIO_BLK_CFG_PHYSICAL_BLOCK_EXP,
      Math.log2(o.physicalBlockSize / o.logicalBlockSize),
    );
    v.setUint16(VIRTIO_BLK_CFG_MIN_IO_SIZE, o.minIoSize / o.logicalBlockSize, true);
    v.setUint32(VIRTIO_BLK_CFG_OPT_IO_SIZE, o.optIoSize / o.logicalBlockSize, true);
    v.setUint16(VIRTIO_BLK_CFG_NUM_QUEUES, o.numQueues, true);
    if (o.discard) {
      v.setUint32(VIRTIO_BLK_CFG_MAX_DISCARD_SECTORS, o.maxDiscardSectors, true);
      v.setUint32(VIRTIO_BLK_CFG_MAX_DISCARD_SEG, o.maxDiscardSeg, true);
      v.setUint32(
        VIRTIO_BLK_CFG_DISCARD_SECTOR_ALIGNMENT,
        o.logicalBlockSize / VIRTIO_BLK_SECTOR_SIZE,
        true,
      );
    }
    if (o.writeZeroes) {
      v.setUint32(VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SECTORS, o.maxWriteZeroesSectors, true);
      v.setUint32(VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SEG, o.maxWriteZeroesSeg, true);
      v.setUint8(VIRTIO_BLK_CFG_WRITE_ZEROES_MAY_UNMAP, 1);
    }
  }

  /** The features the driver accepted at FEATURES_OK (0 before, and after a reset). */
  get driverFeatures(): bigint {
    return this.#driverFeatures;
  }

  /** The cache mode the back-end applies: true writeback, false writethrough. */
  get writeback(): boolean {
    return this.shared.writeback;
  }

  /** Capacity in 512-byte sectors, as the driver reads it. */
  get capacity(): number {
    return this.shared.capacity;
  }

  /**
   * The disk now has `size` bytes (a resize done by the back-end or the machine): the capacity field
   * changes and the driver gets a configuration change notification (spec 5.2.6.3; QEMU's
   * virtio_blk_resize → virtio_notify_config).
   *
   * @throws {RangeError} for a size that is not a byte count
   */
  setCapacity(size: number): void {
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new RangeError(`virtio-blk disk size ${size} is not a byte count`);
    }
    this.shared.capacity = capacitySectors(size);
    this.hooks.configChange?.();
  }

  /** Every request queue has the configured size; queues past `numQueues` are absent (0). */
  queueMaxSize(index: number): number {
    return index >= 0 && index < this.numQueues ? this.options.queueSize : 0;
  }

  /** Fills `dst` from the config structure at `offset`, with the live capacity and writeback. */
  readConfig(offset: number, dst: Uint8Array): void {
    const v = this.#view;
    v.setBigUint64(VIRTIO_BLK_CFG_CAPACITY, BigInt(this.shared.capacity), true);
    v.setUint8(VIRTIO_BLK_CFG_WRITEBACK, this.shared.writeback ? 1 : 0);
    dst.set(this.#config.subarray(offset, offset + dst.length));
  }

  /**
   * Only `writeback` is driver-writable, and only when CONFIG_WCE is offered; every other byte is
   * ignored (QEMU rebuilds the config from device state, so writes elsewhere do not stick either).
   */
  writeConfig(offset: number, src: Uint8Array): void {
    if (!this.options.configWce) return;
    const at = VIRTIO_BLK_CFG_WRITEBACK - offset;
    if (at < 0 || at >= src.length) return;
    this.shared.writeback = src[at] !== 0;
  }

  /**
   * Accepts any subset the transport let through. Spec 5.2.5.2: with CONFIG_WCE negotiated but not
   * FLUSH the device must start writethrough, and the driver reads `writeback` after FEATURES_OK.
   */
  validateFeatures(driverFeatures: bigint): boolean {
    this.#driverFeatures = driverFeatures;
    if (
      hasFeature(driverFeatures, VIRTIO_BLK_F_CONFIG_WCE) &&
      !hasFeature(driverFeatures, VIRTIO_BLK_F_FLUSH)
    ) {
      this.shared.writeback = false;
    }
    return true;
  }

  /**
   * DRIVER_OK. A driver without CONFIG_WCE gets writeback exactly when it negotiated FLUSH (it can
   * then send flushes), else writethrough: QEMU's virtio_blk_set_status, and spec 5.2.6.3 case 1.
   */
  activate(features: bigint, queues: readonly ActivatedQueue[], epoch: number): void {
    this.#driverFeatures = features;
    if (!hasFeature(features, VIRTIO_BLK_F_CONFIG_WCE)) {
      this.shared.writeback = hasFeature(features, VIRTIO_BLK_F_FLUSH);
    }
    this.hooks.activate?.(features, queues, epoch);
  }

  /** Back to the cache mode of the options (QEMU restores `original_wce`), then the hook. */
  reset(): void {
    this.#driverFeatures = 0n;
    this.shared.writeback = this.options.writeback;
    this.hooks.reset?.();
  }
}
