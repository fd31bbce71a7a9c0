/**
 * The VMM-side half of a virtio device, as the virtio-pci transport ({@linkcode VirtioPciFunction}
 * in `pci.ts`) talks to it: identity, offered features, queue limits, the device-specific config
 * window, and the lifecycle calls (activate at DRIVER_OK, reset).
 *
 * The model never sees a guest register access: the transport decodes, bounds-checks and keeps the
 * common configuration state; the model answers only for what is device-specific. The data path
 * (queues, requests) runs in the device's iothread, which builds its queues from the layouts handed
 * to {@linkcode VirtioDeviceModel.activate}.
 *
 * @module
 */

import {
  hasFeature,
  VIRTIO_F_RING_PACKED,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "./features.ts";
import type { QueueFeatures, QueueLayout } from "./queue.ts";

/** PCI class code (base class << 8 | subclass) of a SCSI controller: QEMU's for virtio-blk and -scsi. */
export const PCI_CLASS_STORAGE_SCSI = 0x0100;
/** PCI class code of "other mass storage". */
export const PCI_CLASS_STORAGE_OTHER = 0x0180;
/** PCI class code of an unclassified device (QEMU's default for virtio-pci). */
export const PCI_CLASS_OTHERS = 0xff00;
/** The subsystem device id QEMU gives every modern virtio-pci function (≥ 0x40, as the spec asks). */
export const PCI_SUBDEVICE_ID_QEMU = 0x1100;

/** A virtqueue the driver enabled, as the transport hands it to the model. */
export interface ActivatedQueue {
  /** Queue index (0-based). */
  readonly index: number;
  /** Size and the three guest-physical areas, as the driver wrote them (not validated). */
  readonly layout: QueueLayout;
  /** MSI-X table entry for this queue, or `VIRTIO_MSI_NO_VECTOR`; it may change later. */
  readonly msixVector: number;
  /** `queue_notify_off`: the doorbell is at notify offset + notifyOff × multiplier. */
  readonly notifyOff: number;
}

/**
 * What a virtio device model must provide to the virtio-pci transport.
 *
 * All methods run on the VMM thread, synchronously, from inside a guest exit. None may throw for
 * guest-controlled values: the transport has checked bounds before calling. An exception from
 * {@linkcode activate} or {@linkcode queueEnable} is taken as the device refusing the rings: the
 * transport sets DEVICE_NEEDS_RESET (as QEMU's `virtio_error` does) instead of propagating it.
 */
export interface VirtioDeviceModel {
  /** Virtio device id (`VIRTIO_ID_BLOCK` = 2, `VIRTIO_ID_SCSI` = 8); PCI device id = 0x1040 + id. */
  readonly deviceId: number;
  /**
   * Feature bits the device offers, device-specific and transport ones it implements
   * (INDIRECT_DESC, EVENT_IDX, RING_PACKED, RING_RESET …). The transport always adds VERSION_1 and
   * removes what a modern-only transport must not or cannot offer (NOTIFY_ON_EMPTY, ANY_LAYOUT,
   * NOTIFICATION_DATA; RING_RESET unless {@linkcode queueReset} and {@linkcode queueEnable} exist).
   */
  readonly deviceFeatures: bigint;
  /** Number of virtqueues (`num_queues`), at most 1024. */
  readonly numQueues: number;
  /** Largest size of queue `index` (`queue_size` after reset), 1..32768; 0 means the queue is absent. */
  queueMaxSize(index: number): number;
  /** Bytes of device-specific configuration (the DEVICE_CFG window), at most 4096. */
  readonly configSize: number;
  /** Fills `dst` from device config at `offset`; `offset + dst.length <= configSize` holds. */
  readConfig(offset: number, dst: Uint8Array): void;
  /** A driver write of `src` at `offset`; `offset + src.length <= configSize` holds. */
  writeConfig(offset: number, src: Uint8Array): void;
  /**
   * Device-specific acceptance of the driver's features at FEATURES_OK. The transport has already
   * checked that they are a subset of the offered ones and include VERSION_1.
   */
  validateFeatures(driverFeatures: bigint): boolean;
  /**
   * DRIVER_OK: start the device with the negotiated `features` and the enabled queues.
   * `epoch` counts device resets; the iothread compares it with `InterruptState.epoch` to notice a
   * reset that overtook it.
   */
  activate(features: bigint, queues: readonly ActivatedQueue[], epoch: number): void;
  /** The driver wrote 0 to device_status, or the function was reset: stop and forget everything. */
  reset(): void;
  /** VIRTIO_F_RING_RESET: stop and forget queue `index` (the transport then shows it disabled). */
  queueReset?(index: number): void;
  /** VIRTIO_F_RING_RESET: the driver re-enabled a queue after resetting it, while DRIVER_OK. */
  queueEnable?(queue: ActivatedQueue): void;
  /** PCI class code, base class << 8 | subclass (e.g. {@linkcode PCI_CLASS_STORAGE_SCSI}). */
  readonly pciClass: number;
  /** PCI subsystem device id (subsystem vendor is 0x1AF4), e.g. {@linkcode PCI_SUBDEVICE_ID_QEMU}. */
  readonly subsystemId: number;
}

/** The ring behaviour a set of negotiated features asks of every queue. */
export function queueFeaturesOf(features: bigint): QueueFeatures {
  return {
    indirect: hasFeature(features, VIRTIO_RING_F_INDIRECT_DESC),
    eventIdx: hasFeature(features, VIRTIO_RING_F_EVENT_IDX),
  };
}

/** True when the negotiated features select packed rings (else split rings). */
export function isPackedRing(features: bigint): boolean {
  return hasFeature(features, VIRTIO_F_RING_PACKED);
}
