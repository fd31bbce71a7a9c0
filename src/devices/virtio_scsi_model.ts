/**
 * virtio-scsi's VMM half ({@linkcode VirtioScsiModel}): identity, the features the options offer,
 * the 36-byte config space (virtio 1.2 §5.6.4) with its two driver-writable fields, and the
 * lifecycle calls, after QEMU's `hw/scsi/virtio-scsi.c`. The driver-writable sizes live in the
 * {@linkcode VirtioScsiSharedConfig} the iothread's back-end reads.
 *
 * @module
 */

import {
  type ActivatedQueue,
  PCI_CLASS_STORAGE_SCSI,
  PCI_SUBDEVICE_ID_QEMU,
  type VirtioDeviceModel,
} from "../virtio/device.ts";
import {
  featureBit,
  VIRTIO_F_RING_PACKED,
  VIRTIO_ID_SCSI,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../virtio/features.ts";
import {
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
  VIRTIO_SCSI_F_CHANGE,
  VIRTIO_SCSI_F_HOTPLUG,
  VIRTIO_SCSI_MAX_CHANNEL,
  VIRTIO_SCSI_VQ_REQUEST,
} from "../virtio/virtio_scsi_constants.ts";
import { VirtioScsiSharedConfig } from "./virtio_scsi_shared.ts";

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
  /** Virtio device id: `VIRTIO_ID_SCSI`. */
  readonly deviceId: number = VIRTIO_ID_SCSI;
  readonly deviceFeatures: bigint;
  readonly numQueues: number;
  /** Bytes of the device configuration (`struct virtio_scsi_config`). */
  readonly configSize: number = VIRTIO_SCSI_CONFIG_SIZE;
  /** PCI class: mass storage, SCSI (as QEMU gives virtio-blk and virtio-scsi). */
  readonly pciClass: number = PCI_CLASS_STORAGE_SCSI;
  /** PCI subsystem id: QEMU's. */
  readonly subsystemId: number = PCI_SUBDEVICE_ID_QEMU;
  /** Hand `shared.buffer` to the iothread's {@linkcode VirtioScsiBackend}. */
  readonly shared: VirtioScsiSharedConfig;
  /** Request queues (`num_queues`). */
  readonly requestQueues: number;
  /** Largest size of every virtqueue. */
  readonly queueSize: number;
  /** `max_sectors` in the config space. */
  readonly maxSectors: number;
  /** `cmd_per_lun` in the config space. */
  readonly cmdPerLun: number;
  #features = 0n;
  #epoch = 0;

  /**
   * Builds the model from `options` (defaults as QEMU's).
   *
   * @throws {RangeError} for options outside what the spec or the transport allow
   */
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
