/**
 * The register map of a virtio-pci modern function: the PCI type-0 header and MSI-X capability
 * (PCI Local Bus 3.0), QEMU's placement of the virtio structures in the BARs, and the fields of
 * `struct virtio_pci_cap` and `struct virtio_pci_common_cfg` (virtio 1.2 §4.1.4), with Linux's
 * names. Numbers only: the VMM side (`pci.ts`) and the guest's driver read the same map.
 *
 * @module
 */

// ---- PCI type-0 header (PCI Local Bus 3.0, 6.1) ---------------------------------------------------

/** Conventional PCI configuration space size. */
export const PCI_CONFIG_SPACE_SIZE = 256;
/** PCI Express (extended) configuration space size. */
export const PCIE_CONFIG_SPACE_SIZE = 4096;

export const PCI_VENDOR_ID = 0x00;
export const PCI_DEVICE_ID = 0x02;
export const PCI_COMMAND = 0x04;
export const PCI_STATUS = 0x06;
export const PCI_REVISION_ID = 0x08;
export const PCI_CLASS_PROG = 0x09;
export const PCI_CLASS_DEVICE = 0x0a;
export const PCI_CACHE_LINE_SIZE = 0x0c;
export const PCI_HEADER_TYPE = 0x0e;
export const PCI_BASE_ADDRESS_0 = 0x10;
export const PCI_SUBSYSTEM_VENDOR_ID = 0x2c;
export const PCI_SUBSYSTEM_ID = 0x2e;
export const PCI_ROM_ADDRESS = 0x30;
export const PCI_CAPABILITY_LIST = 0x34;
export const PCI_INTERRUPT_LINE = 0x3c;
export const PCI_INTERRUPT_PIN = 0x3d;

export const PCI_COMMAND_IO = 0x1;
export const PCI_COMMAND_MEMORY = 0x2;
export const PCI_COMMAND_MASTER = 0x4;
export const PCI_COMMAND_PARITY = 0x40;
export const PCI_COMMAND_SERR = 0x100;
export const PCI_COMMAND_INTX_DISABLE = 0x400;
export const PCI_STATUS_INTERRUPT = 0x8;
export const PCI_STATUS_CAP_LIST = 0x10;

export const PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4;
export const PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8;
/** Low bits of a memory BAR that are type flags, not address. */
export const PCI_BASE_ADDRESS_MEM_MASK: number = ~0xf;

/** MSI-X capability: message control @2 (table size N-1 in bits 0..10), table @4, PBA @8. */
export const PCI_MSIX_FLAGS = 2;
export const PCI_MSIX_FLAGS_QSIZE = 0x07ff;
export const PCI_MSIX_FLAGS_MASKALL = 0x4000;
export const PCI_MSIX_FLAGS_ENABLE = 0x8000;
export const PCI_MSIX_TABLE = 4;
export const PCI_MSIX_PBA = 8;
export const PCI_MSIX_BIR_MASK = 0x7;

// ---- virtio-pci layout (QEMU's) -------------------------------------------------------------------

/** BAR holding the MSI-X table and PBA. */
export const VIRTIO_PCI_MSIX_BAR = 1;
/** BAR (64-bit, with BAR5 as its high half) holding the virtio structures. */
export const VIRTIO_PCI_MODERN_BAR = 4;
/** Size of the modern BAR: the four regions below, rounded to a power of 2. */
export const VIRTIO_PCI_MODERN_BAR_SIZE = 0x4000;
/** Size of each virtio region in the modern BAR. */
export const VIRTIO_PCI_REGION_SIZE = 0x1000;
export const VIRTIO_PCI_COMMON_CFG_OFFSET = 0x0000;
export const VIRTIO_PCI_ISR_CFG_OFFSET = 0x1000;
export const VIRTIO_PCI_DEVICE_CFG_OFFSET = 0x2000;
export const VIRTIO_PCI_NOTIFY_CFG_OFFSET = 0x3000;
/** Bytes between two queues' doorbells. */
export const VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER = 4;
/** Offset of the MSI-X table in its BAR. */
export const VIRTIO_PCI_MSIX_TABLE_OFFSET = 0;

// struct virtio_pci_cap fields.
export const VIRTIO_PCI_CAP_VNDR = 0;
export const VIRTIO_PCI_CAP_NEXT = 1;
export const VIRTIO_PCI_CAP_LEN = 2;
export const VIRTIO_PCI_CAP_CFG_TYPE = 3;
export const VIRTIO_PCI_CAP_BAR = 4;
export const VIRTIO_PCI_CAP_ID = 5;
export const VIRTIO_PCI_CAP_OFFSET = 8;
export const VIRTIO_PCI_CAP_LENGTH = 12;
/** virtio_pci_notify_cap.notify_off_multiplier. */
export const VIRTIO_PCI_NOTIFY_CAP_MULT = 16;
/** virtio_pci_cfg_cap.pci_cfg_data. */
export const VIRTIO_PCI_CFG_CAP_DATA = 16;

// struct virtio_pci_common_cfg (Linux's names).
export const VIRTIO_PCI_COMMON_DFSELECT = 0;
export const VIRTIO_PCI_COMMON_DF = 4;
export const VIRTIO_PCI_COMMON_GFSELECT = 8;
export const VIRTIO_PCI_COMMON_GF = 12;
export const VIRTIO_PCI_COMMON_MSIX = 16;
export const VIRTIO_PCI_COMMON_NUMQ = 18;
export const VIRTIO_PCI_COMMON_STATUS = 20;
export const VIRTIO_PCI_COMMON_CFGGENERATION = 21;
export const VIRTIO_PCI_COMMON_Q_SELECT = 22;
export const VIRTIO_PCI_COMMON_Q_SIZE = 24;
export const VIRTIO_PCI_COMMON_Q_MSIX = 26;
export const VIRTIO_PCI_COMMON_Q_ENABLE = 28;
export const VIRTIO_PCI_COMMON_Q_NOFF = 30;
export const VIRTIO_PCI_COMMON_Q_DESCLO = 32;
export const VIRTIO_PCI_COMMON_Q_DESCHI = 36;
export const VIRTIO_PCI_COMMON_Q_AVAILLO = 40;
export const VIRTIO_PCI_COMMON_Q_AVAILHI = 44;
export const VIRTIO_PCI_COMMON_Q_USEDLO = 48;
export const VIRTIO_PCI_COMMON_Q_USEDHI = 52;
export const VIRTIO_PCI_COMMON_Q_NDATA = 56;
export const VIRTIO_PCI_COMMON_Q_RESET = 58;
/** Bytes of the common configuration structure that hold registers. */
export const VIRTIO_PCI_COMMON_CFG_SIZE = 60;
