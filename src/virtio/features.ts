/**
 * Spec constants of the virtio transport layer, with the spec's names (OASIS virtio 1.2):
 * device status bits, transport feature bits, ring flags, virtio-pci capability types and device ids.
 * Device-specific bits live with their device.
 *
 * @module
 */

// Device status (2.1).
/** Device status: the guest noticed the device. */
export const VIRTIO_CONFIG_S_ACKNOWLEDGE = 1;
/** Device status: the guest knows how to drive the device. */
export const VIRTIO_CONFIG_S_DRIVER = 2;
/** Device status: the driver is set up and ready to drive the device. */
export const VIRTIO_CONFIG_S_DRIVER_OK = 4;
/** Device status: the driver acknowledged the features it understands; negotiation is done. */
export const VIRTIO_CONFIG_S_FEATURES_OK = 8;
export const VIRTIO_CONFIG_S_SUSPEND = 16;
/** Device status: the device hit an error it cannot recover from until reset. */
export const VIRTIO_CONFIG_S_NEEDS_RESET = 64;
/** Device status: the guest gave up on the device. */
export const VIRTIO_CONFIG_S_FAILED = 128;

// Transport feature bits (6).
export const VIRTIO_F_NOTIFY_ON_EMPTY = 24;
export const VIRTIO_F_ANY_LAYOUT = 27;
/** Feature bit: descriptors may point at indirect descriptor tables. */
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
/** Feature bit: notifications are suppressed through the used_event/avail_event indexes. */
export const VIRTIO_RING_F_EVENT_IDX = 29;
/** Feature bit: the device follows virtio 1.x (modern; every vstor device offers it). */
export const VIRTIO_F_VERSION_1 = 32;
export const VIRTIO_F_ACCESS_PLATFORM = 33;
/** Feature bit: the queues are packed rings instead of split ones. */
export const VIRTIO_F_RING_PACKED = 34;
export const VIRTIO_F_IN_ORDER = 35;
export const VIRTIO_F_ORDER_PLATFORM = 36;
export const VIRTIO_F_NOTIFICATION_DATA = 38;
export const VIRTIO_F_RING_RESET = 40;

/** The bit for feature number `n`, as a bigint mask. */
export function featureBit(n: number): bigint {
  return 1n << BigInt(n);
}

/** True when `features` has feature number `n`. */
export function hasFeature(features: bigint, n: number): boolean {
  return (features & (1n << BigInt(n))) !== 0n;
}

// Split ring (2.7).
/** Descriptor flag: the chain continues at `next`. */
export const VIRTQ_DESC_F_NEXT = 1;
/** Descriptor flag: the buffer is device-writable (else device-readable). */
export const VIRTQ_DESC_F_WRITE = 2;
/** Descriptor flag: the buffer holds an indirect descriptor table. */
export const VIRTQ_DESC_F_INDIRECT = 4;
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
export const VIRTQ_USED_F_NO_NOTIFY = 1;
/** Largest queue size the spec allows. */
export const VIRTQ_MAX_SIZE = 32768;

// Packed ring (2.8).
export const VIRTQ_DESC_F_AVAIL = 1 << 7;
export const VIRTQ_DESC_F_USED = 1 << 15;
export const RING_EVENT_FLAGS_ENABLE = 0;
export const RING_EVENT_FLAGS_DISABLE = 1;
export const RING_EVENT_FLAGS_DESC = 2;

/** `vring_need_event`: true when moving the index from `oldIdx` to `newIdx` passes `eventIdx`. */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

// virtio-pci (4.1).
export const PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1af4;
export const VIRTIO_PCI_DEVICE_ID_BASE = 0x1040;
export const PCI_CAP_ID_VNDR = 0x09;
export const PCI_CAP_ID_MSIX = 0x11;
export const VIRTIO_PCI_CAP_COMMON_CFG = 1;
export const VIRTIO_PCI_CAP_NOTIFY_CFG = 2;
export const VIRTIO_PCI_CAP_ISR_CFG = 3;
export const VIRTIO_PCI_CAP_DEVICE_CFG = 4;
export const VIRTIO_PCI_CAP_PCI_CFG = 5;
/** MSI-X vector value meaning "no vector" (the queue or config change raises no MSI-X message). */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;
export const VIRTIO_PCI_ISR_QUEUE = 1;
export const VIRTIO_PCI_ISR_CONFIG = 2;

// Device ids (5).
/** Virtio device id of a block device (virtio-blk). */
export const VIRTIO_ID_BLOCK = 2;
/** Virtio device id of a SCSI host (virtio-scsi). */
export const VIRTIO_ID_SCSI = 8;
