/**
 * The configuration space of a virtio-pci modern function (PCI Local Bus 3.0, 6.1; virtio 1.2
 * §4.1.4): the type-0 header with its writable bits, the BAR registers, and the capability list
 * laid out as QEMU lays out `virtio-*-pci,disable-legacy=on` on a conventional bus — from 0x34:
 * MSI-X @0x98 → PCI_CFG @0x84 → NOTIFY @0x70 → DEVICE @0x60 → ISR @0x50 → COMMON @0x40.
 *
 * The bytes and the write mask live here; what a write sets off (INTx disable, MSI-X enable, the
 * PCI_CFG window reaching into a BAR) is the function's (`pci.ts`) to do.
 *
 * @module
 */

import {
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VNDR,
  PCI_VENDOR_ID_REDHAT_QUMRANET,
  VIRTIO_PCI_CAP_COMMON_CFG,
  VIRTIO_PCI_CAP_DEVICE_CFG,
  VIRTIO_PCI_CAP_ISR_CFG,
  VIRTIO_PCI_CAP_NOTIFY_CFG,
  VIRTIO_PCI_CAP_PCI_CFG,
  VIRTIO_PCI_DEVICE_ID_BASE,
} from "./features.ts";
import {
  PCI_BASE_ADDRESS_0,
  PCI_BASE_ADDRESS_MEM_MASK,
  PCI_BASE_ADDRESS_MEM_PREFETCH,
  PCI_BASE_ADDRESS_MEM_TYPE_64,
  PCI_CACHE_LINE_SIZE,
  PCI_CAPABILITY_LIST,
  PCI_CLASS_DEVICE,
  PCI_CLASS_PROG,
  PCI_COMMAND,
  PCI_COMMAND_INTX_DISABLE,
  PCI_COMMAND_MASTER,
  PCI_COMMAND_MEMORY,
  PCI_COMMAND_PARITY,
  PCI_COMMAND_SERR,
  PCI_DEVICE_ID,
  PCI_HEADER_TYPE,
  PCI_INTERRUPT_LINE,
  PCI_INTERRUPT_PIN,
  PCI_MSIX_FLAGS,
  PCI_MSIX_FLAGS_ENABLE,
  PCI_MSIX_FLAGS_MASKALL,
  PCI_MSIX_FLAGS_QSIZE,
  PCI_MSIX_PBA,
  PCI_MSIX_TABLE,
  PCI_REVISION_ID,
  PCI_STATUS,
  PCI_STATUS_CAP_LIST,
  PCI_SUBSYSTEM_ID,
  PCI_SUBSYSTEM_VENDOR_ID,
  PCI_VENDOR_ID,
  VIRTIO_PCI_CAP_BAR,
  VIRTIO_PCI_CAP_CFG_TYPE,
  VIRTIO_PCI_CAP_LEN,
  VIRTIO_PCI_CAP_LENGTH,
  VIRTIO_PCI_CAP_NEXT,
  VIRTIO_PCI_CAP_OFFSET,
  VIRTIO_PCI_CAP_VNDR,
  VIRTIO_PCI_CFG_CAP_DATA,
  VIRTIO_PCI_COMMON_CFG_OFFSET,
  VIRTIO_PCI_DEVICE_CFG_OFFSET,
  VIRTIO_PCI_ISR_CFG_OFFSET,
  VIRTIO_PCI_MODERN_BAR,
  VIRTIO_PCI_MODERN_BAR_SIZE,
  VIRTIO_PCI_MSIX_BAR,
  VIRTIO_PCI_MSIX_TABLE_OFFSET,
  VIRTIO_PCI_NOTIFY_CAP_MULT,
  VIRTIO_PCI_NOTIFY_CFG_OFFSET,
  VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER,
  VIRTIO_PCI_REGION_SIZE,
} from "./pci_regs.ts";

// Where QEMU's pci_add_capability puts the caps on a conventional bus (each new one is linked at
// the head, so the walk from 0x34 meets them newest first).
const CAP_COMMON = 0x40;
const CAP_ISR = 0x50;
const CAP_DEVICE = 0x60;
const CAP_NOTIFY = 0x70;
/** Offset of the PCI_CFG capability (the config-space window into the BARs). */
export const CAP_PCI_CFG = 0x84;
/** Offset of the MSI-X capability. */
export const CAP_MSIX = 0x98;
const VIRTIO_CAP_SIZE = 16;
const VIRTIO_NOTIFY_CAP_SIZE = 20;
const VIRTIO_CFG_CAP_SIZE = 20;

/** What the header and capabilities say about the function. */
export interface ConfigSpaceIdentity {
  /** Virtio device id (the PCI device id is 0x1040 + it). */
  readonly deviceId: number;
  readonly pciClass: number;
  readonly subsystemId: number;
  /** MSI-X table size. */
  readonly msixVectors: number;
  /** Size of BAR1 (MSI-X table and PBA). */
  readonly msixBarSize: number;
  /** Offset of the PBA in BAR1. */
  readonly msixPbaOffset: number;
}

/** The PCI_CFG window (virtio 1.2 §4.1.4.9): `length` bytes at `offset` of BAR `bar`. */
export interface CfgWindow {
  readonly bar: number;
  readonly offset: number;
  readonly length: number;
}

/** One function's configuration space: its bytes, and which bits of them the guest may write. */
export class PciConfigSpace {
  /** 256 or 4096. */
  readonly size: number;
  readonly #identity: ConfigSpaceIdentity;
  readonly #cfg: Uint8Array;
  readonly #view: DataView;
  readonly #wmask: Uint8Array;

  /** Builds the space in its power-on state (see {@linkcode reset}). */
  constructor(size: number, identity: ConfigSpaceIdentity) {
    this.size = size;
    this.#identity = identity;
    this.#cfg = new Uint8Array(size);
    this.#view = new DataView(this.#cfg.buffer);
    this.#wmask = new Uint8Array(size);
    this.reset();
  }

  /** A 1-, 2- or 4-byte access, naturally aligned, inside the space. */
  valid(offset: number, size: number): boolean {
    return (size === 1 || size === 2 || size === 4) && Number.isInteger(offset) && offset >= 0 &&
      offset % size === 0 && offset + size <= this.size;
  }

  /** `size` bytes at `offset` (a {@linkcode valid} access), little-endian. */
  read(offset: number, size: number): number {
    if (size === 1) return this.#view.getUint8(offset);
    if (size === 2) return this.#view.getUint16(offset, true);
    return this.#view.getUint32(offset, true);
  }

  /** A guest write of a {@linkcode valid} access: only the writable bits change. */
  write(offset: number, size: number, value: number): void {
    const v = value >>> 0;
    for (let i = 0; i < size; i++) {
      const at = offset + i;
      const mask = this.#wmask[at] ?? 0;
      const old = this.#cfg[at] ?? 0;
      this.#cfg[at] = (old & ~mask) | ((v >>> (8 * i)) & mask);
    }
  }

  /** The 16-bit register at `offset`. */
  u16(offset: number): number {
    return this.#view.getUint16(offset, true);
  }

  /** The 32-bit register at `offset`. */
  u32(offset: number): number {
    return this.#view.getUint32(offset, true);
  }

  /** Sets the Status register (the function keeps Interrupt Status live). */
  setStatus(status: number): void {
    this.#view.setUint16(PCI_STATUS, status, true);
  }

  /** The PCI_CFG window as the driver set it, or null when it cannot be used in `barSize`'s BARs. */
  cfgWindow(bars: { barSize(bar: number): number }): CfgWindow | null {
    const bar = this.#view.getUint8(CAP_PCI_CFG + VIRTIO_PCI_CAP_BAR);
    const offset = this.#view.getUint32(CAP_PCI_CFG + VIRTIO_PCI_CAP_OFFSET, true);
    const length = this.#view.getUint32(CAP_PCI_CFG + VIRTIO_PCI_CAP_LENGTH, true);
    if (length !== 1 && length !== 2 && length !== 4) return null;
    if (offset % length !== 0 || offset + length > bars.barSize(bar)) return null;
    return { bar, offset, length };
  }

  /** `pci_cfg_data` of the PCI_CFG capability. */
  get cfgData(): number {
    return this.#view.getUint32(CAP_PCI_CFG + VIRTIO_PCI_CFG_CAP_DATA, true);
  }

  set cfgData(value: number) {
    this.#view.setUint32(CAP_PCI_CFG + VIRTIO_PCI_CFG_CAP_DATA, value, true);
  }

  /** Power-on state: identity, BARs unprogrammed, command 0, MSI-X off, capabilities linked. */
  reset(): void {
    const cfg = this.#view;
    const id = this.#identity;
    this.#cfg.fill(0);
    this.#wmask.fill(0);
    cfg.setUint16(PCI_VENDOR_ID, PCI_VENDOR_ID_REDHAT_QUMRANET, true);
    cfg.setUint16(PCI_DEVICE_ID, VIRTIO_PCI_DEVICE_ID_BASE + id.deviceId, true);
    cfg.setUint16(PCI_STATUS, PCI_STATUS_CAP_LIST, true);
    cfg.setUint8(PCI_REVISION_ID, 1); // non-transitional: revision ≥ 1
    cfg.setUint8(PCI_CLASS_PROG, 0);
    cfg.setUint16(PCI_CLASS_DEVICE, id.pciClass & 0xffff, true);
    cfg.setUint8(PCI_HEADER_TYPE, 0);
    cfg.setUint16(PCI_SUBSYSTEM_VENDOR_ID, PCI_VENDOR_ID_REDHAT_QUMRANET, true);
    cfg.setUint16(PCI_SUBSYSTEM_ID, id.subsystemId & 0xffff, true);
    cfg.setUint8(PCI_CAPABILITY_LIST, CAP_MSIX);
    cfg.setUint8(PCI_INTERRUPT_PIN, 1); // INTA#

    // No I/O BAR, so I/O space enable is hardwired 0.
    this.#setWmask(
      PCI_COMMAND,
      2,
      PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY | PCI_COMMAND_SERR |
        PCI_COMMAND_INTX_DISABLE,
    );
    this.#setWmask(PCI_CACHE_LINE_SIZE, 1, 0xff);
    this.#setWmask(PCI_INTERRUPT_LINE, 1, 0xff);

    // BAR1: 32-bit memory. BAR4/5: 64-bit prefetchable memory. Writable bits are the address bits
    // above the size, so writing all-ones reads back the size mask.
    const bar1 = PCI_BASE_ADDRESS_0 + 4 * VIRTIO_PCI_MSIX_BAR;
    this.#setWmask(bar1, 4, ~(id.msixBarSize - 1) & PCI_BASE_ADDRESS_MEM_MASK);
    const bar4 = PCI_BASE_ADDRESS_0 + 4 * VIRTIO_PCI_MODERN_BAR;
    cfg.setUint32(bar4, PCI_BASE_ADDRESS_MEM_TYPE_64 | PCI_BASE_ADDRESS_MEM_PREFETCH, true);
    this.#setWmask(bar4, 4, ~(VIRTIO_PCI_MODERN_BAR_SIZE - 1) & PCI_BASE_ADDRESS_MEM_MASK);
    this.#setWmask(bar4 + 4, 4, 0xffffffff);

    // Capabilities, linked newest first as QEMU does.
    this.#virtioCap(
      CAP_COMMON,
      0,
      VIRTIO_CAP_SIZE,
      VIRTIO_PCI_CAP_COMMON_CFG,
      VIRTIO_PCI_COMMON_CFG_OFFSET,
    );
    this.#virtioCap(
      CAP_ISR,
      CAP_COMMON,
      VIRTIO_CAP_SIZE,
      VIRTIO_PCI_CAP_ISR_CFG,
      VIRTIO_PCI_ISR_CFG_OFFSET,
    );
    this.#virtioCap(
      CAP_DEVICE,
      CAP_ISR,
      VIRTIO_CAP_SIZE,
      VIRTIO_PCI_CAP_DEVICE_CFG,
      VIRTIO_PCI_DEVICE_CFG_OFFSET,
    );
    this.#virtioCap(
      CAP_NOTIFY,
      CAP_DEVICE,
      VIRTIO_NOTIFY_CAP_SIZE,
      VIRTIO_PCI_CAP_NOTIFY_CFG,
      VIRTIO_PCI_NOTIFY_CFG_OFFSET,
    );
    cfg.setUint32(CAP_NOTIFY + VIRTIO_PCI_NOTIFY_CAP_MULT, VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER, true);

    // PCI_CFG: bar, offset, length and data are the driver's to write; the window starts closed.
    cfg.setUint8(CAP_PCI_CFG + VIRTIO_PCI_CAP_VNDR, PCI_CAP_ID_VNDR);
    cfg.setUint8(CAP_PCI_CFG + VIRTIO_PCI_CAP_NEXT, CAP_NOTIFY);
    cfg.setUint8(CAP_PCI_CFG + VIRTIO_PCI_CAP_LEN, VIRTIO_CFG_CAP_SIZE);
    cfg.setUint8(CAP_PCI_CFG + VIRTIO_PCI_CAP_CFG_TYPE, VIRTIO_PCI_CAP_PCI_CFG);
    this.#setWmask(CAP_PCI_CFG + VIRTIO_PCI_CAP_BAR, 1, 0xff);
    this.#setWmask(CAP_PCI_CFG + VIRTIO_PCI_CAP_OFFSET, 4, 0xffffffff);
    this.#setWmask(CAP_PCI_CFG + VIRTIO_PCI_CAP_LENGTH, 4, 0xffffffff);
    this.#setWmask(CAP_PCI_CFG + VIRTIO_PCI_CFG_CAP_DATA, 4, 0xffffffff);

    cfg.setUint8(CAP_MSIX, PCI_CAP_ID_MSIX);
    cfg.setUint8(CAP_MSIX + 1, CAP_PCI_CFG);
    cfg.setUint16(CAP_MSIX + PCI_MSIX_FLAGS, (id.msixVectors - 1) & PCI_MSIX_FLAGS_QSIZE, true);
    this.#setWmask(CAP_MSIX + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
    cfg.setUint32(
      CAP_MSIX + PCI_MSIX_TABLE,
      VIRTIO_PCI_MSIX_TABLE_OFFSET | VIRTIO_PCI_MSIX_BAR,
      true,
    );
    cfg.setUint32(CAP_MSIX + PCI_MSIX_PBA, id.msixPbaOffset | VIRTIO_PCI_MSIX_BAR, true);
  }

  #virtioCap(at: number, next: number, length: number, type: number, offset: number): void {
    const cfg = this.#view;
    cfg.setUint8(at + VIRTIO_PCI_CAP_VNDR, PCI_CAP_ID_VNDR);
    cfg.setUint8(at + VIRTIO_PCI_CAP_NEXT, next);
    cfg.setUint8(at + VIRTIO_PCI_CAP_LEN, length);
    cfg.setUint8(at + VIRTIO_PCI_CAP_CFG_TYPE, type);
    cfg.setUint8(at + VIRTIO_PCI_CAP_BAR, VIRTIO_PCI_MODERN_BAR);
    cfg.setUint32(at + VIRTIO_PCI_CAP_OFFSET, offset, true);
    cfg.setUint32(at + VIRTIO_PCI_CAP_LENGTH, VIRTIO_PCI_REGION_SIZE, true);
  }

  #setWmask(offset: number, size: number, mask: number): void {
    for (let i = 0; i < size; i++) this.#wmask[offset + i] = (mask >>> (8 * i)) & 0xff;
  }
}
