/**
 * The virtio-pci modern (virtio 1.x, non-transitional) transport: one PCI function's configuration
 * space, its BARs and the virtio registers behind them, laid out as QEMU lays out
 * `virtio-*-pci,disable-legacy=on` on a conventional PCI bus.
 *
 * - Config space: vendor 0x1AF4, device 0x1040 + virtio id, revision 1, the model's class code and
 *   subsystem id, INTA, and a capability list (from 0x34): MSI-X @0x98 → PCI_CFG @0x84 →
 *   NOTIFY @0x70 → DEVICE @0x60 → ISR @0x50 → COMMON @0x40.
 * - BAR0 is not implemented (no legacy I/O BAR). BAR1: 32-bit memory, MSI-X table at 0 and PBA at
 *   0x800 (QEMU's `msix_init_exclusive_bar`, 4 KiB up to 128 vectors). BAR4+5: 64-bit prefetchable
 *   memory, 16 KiB: common cfg @0x0000, ISR @0x1000, device cfg @0x2000, notify @0x3000
 *   (notify_off_multiplier 4, queue_notify_off = queue index), each region 4 KiB.
 *
 * The VMM calls {@linkcode VirtioPciFunction.configRead}/{@linkcode VirtioPciFunction.configWrite}
 * for configuration cycles and {@linkcode VirtioPciFunction.mmioRead}/{@linkcode VirtioPciFunction.mmioWrite}
 * for memory accesses, after {@linkcode VirtioPciFunction.findBar} has mapped the guest address.
 *
 * Guests should not be able to terminate the VMM: every offset, size and value comes from the guest,
 * so nothing here throws for them. Accesses a device would not claim read all-ones and drop writes
 * (master abort): config accesses that are not 1, 2 or 4 bytes, naturally aligned, inside config
 * space; BAR accesses while memory space is disabled, or misaligned, or past the BAR. Inside a BAR,
 * holes and registers accessed with the wrong width read 0 and ignore writes, as QEMU's regions do.
 *
 * @module
 */

import {
  featureBit,
  hasFeature,
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VNDR,
  PCI_VENDOR_ID_REDHAT_QUMRANET,
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FAILED,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET,
  VIRTIO_F_ANY_LAYOUT,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  VIRTIO_F_VERSION_1,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_PCI_CAP_COMMON_CFG,
  VIRTIO_PCI_CAP_DEVICE_CFG,
  VIRTIO_PCI_CAP_ISR_CFG,
  VIRTIO_PCI_CAP_NOTIFY_CFG,
  VIRTIO_PCI_CAP_PCI_CFG,
  VIRTIO_PCI_DEVICE_ID_BASE,
  VIRTQ_MAX_SIZE,
} from "./features.ts";
import type { ActivatedQueue, VirtioDeviceModel } from "./device.ts";
import { type DoorbellMode, Doorbells } from "./doorbell.ts";
import {
  allOnes,
  InterruptState,
  MSIX_ENTRY_SIZE,
  MSIX_MAX_VECTORS,
  type VcpuInterrupts,
  VIRTIO_QUEUE_MAX,
} from "./interrupts.ts";

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

/** Width of each common-config register by offset (0: not a register start). */
const COMMON_WIDTH = (() => {
  const width = new Uint8Array(VIRTIO_PCI_COMMON_CFG_SIZE);
  for (const offset of [0, 4, 8, 12, 32, 36, 40, 44, 48, 52]) width[offset] = 4;
  for (const offset of [16, 18, 22, 24, 26, 28, 30, 56, 58]) width[offset] = 2;
  width[20] = 1;
  width[21] = 1;
  return width;
})();

// Where QEMU's pci_add_capability puts the caps on a conventional bus (each new one is linked at
// the head, so the walk from 0x34 meets them newest first).
const CAP_COMMON = 0x40;
const CAP_ISR = 0x50;
const CAP_DEVICE = 0x60;
const CAP_NOTIFY = 0x70;
const CAP_PCI_CFG = 0x84;
const CAP_MSIX = 0x98;
const VIRTIO_CAP_SIZE = 16;
const VIRTIO_NOTIFY_CAP_SIZE = 20;
const VIRTIO_CFG_CAP_SIZE = 20;

/** Transport features a modern-only transport never offers (see {@linkcode VirtioDeviceModel.deviceFeatures}). */
const NEVER_OFFERED = featureBit(VIRTIO_F_NOTIFY_ON_EMPTY) | featureBit(VIRTIO_F_ANY_LAYOUT) |
  featureBit(VIRTIO_F_NOTIFICATION_DATA);
const FEATURE_MASK_64 = (1n << 64n) - 1n;
const TWO_32 = 2 ** 32;

/** How the transport is built. */
export interface VirtioPciOptions {
  /** The device behind the transport. */
  readonly model: VirtioDeviceModel;
  /** Where interrupts go. */
  readonly vcpu: VcpuInterrupts;
  /** How doorbell writes reach the iothread (default `"ioeventfd"`). */
  readonly doorbellMode?: DoorbellMode;
  /** MSI-X table size, 1..2048 (default numQueues + 1: one per queue and one for config, as QEMU). */
  readonly msixVectors?: number;
  /** 256 (conventional, default) or 4096 (extended; 0x100.. reads 0: no extended capabilities). */
  readonly configSpaceSize?: 256 | 4096;
  /** INTx source bit of the vCPU this function drives, 0..31 (default 0). */
  readonly intxSource?: number;
}

/** A programmed, decoded BAR: `size` bytes at guest-physical `gpa`. */
export interface BarRegion {
  /** BAR index (1 or 4). */
  readonly bar: number;
  /** Guest-physical base address. */
  readonly gpa: number;
  /** Bytes the BAR decodes. */
  readonly size: number;
}

/** A guest address inside one of the function's BARs. */
export interface BarHit {
  /** BAR index (1 or 4). */
  readonly bar: number;
  /** Byte offset inside the BAR. */
  readonly offset: number;
}

/** One queue's transport registers, as the guest last wrote them. */
export interface QueueRegisters {
  /** `queue_size`. */
  readonly size: number;
  /** `queue_enable`. */
  readonly enabled: boolean;
  /** `queue_msix_vector`. */
  readonly msixVector: number;
  /** `queue_desc`. */
  readonly desc: number;
  /** `queue_driver`. */
  readonly driver: number;
  /** `queue_device`. */
  readonly device: number;
}

interface QueueRegs {
  size: number;
  enabled: boolean;
  descLo: number;
  descHi: number;
  driverLo: number;
  driverHi: number;
  deviceLo: number;
  deviceHi: number;
}

/** A guest-physical address from two 32-bit halves (beyond 2^53 it is inexact, and outside RAM anyway). */
function address64(lo: number, hi: number): number {
  return hi * TWO_32 + lo;
}

function pow2ceil(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/**
 * One virtio-pci modern function.
 *
 * State the iothread must see lives in shared buffers: {@linkcode interrupts} (MSI-X, ISR, status,
 * vectors) and {@linkcode doorbells}; pass their `buffer`s (and the vCPU's) to the device's Worker.
 * Everything else (config space, queue registers, features) is VMM-thread state.
 *
 * @example
 * ```ts
 * import { VirtioPciFunction, PCI_DEVICE_ID } from "./pci.ts";
 * import { VcpuInterrupts } from "./interrupts.ts";
 * import type { VirtioDeviceModel } from "./device.ts";
 * const model: VirtioDeviceModel = {
 *   deviceId: 2, deviceFeatures: 0n, numQueues: 1, queueMaxSize: () => 256, configSize: 8,
 *   readConfig: (_o, dst) => dst.fill(0), writeConfig: () => {}, validateFeatures: () => true,
 *   activate: () => {}, reset: () => {}, pciClass: 0x0100, subsystemId: 0x1100,
 * };
 * const fn = new VirtioPciFunction({ model, vcpu: new VcpuInterrupts() });
 * if (fn.configRead(PCI_DEVICE_ID, 2) !== 0x1042) throw new Error("not virtio-blk");
 * ```
 */
export class VirtioPciFunction {
  /** The device behind the transport. */
  readonly model: VirtioDeviceModel;
  /** MSI-X, ISR/INTx, device status and vectors, shared with the iothread. */
  readonly interrupts: InterruptState;
  /** The queues' doorbells, shared with the iothread. */
  readonly doorbells: Doorbells;
  /** 256 or 4096. */
  readonly configSpaceSize: number;
  /** MSI-X table size. */
  readonly msixVectors: number;
  /** Features offered to the driver (the model's, plus VERSION_1, minus what the transport cannot offer). */
  readonly offeredFeatures: bigint;
  /** Size of BAR1 (MSI-X table and PBA). */
  readonly msixBarSize: number;
  /** Offset of the PBA in BAR1. */
  readonly msixPbaOffset: number;

  readonly #cfg: Uint8Array;
  readonly #cfgView: DataView;
  readonly #wmask: Uint8Array;
  readonly #maxSizes: number[];
  readonly #queues: QueueRegs[];
  #deviceFeatureSelect = 0;
  #driverFeatureSelect = 0;
  #driverFeatures = 0n;
  #queueSelect = 0;
  #modelError: unknown = undefined;

  /**
   * Builds the function in its power-on state: BARs unprogrammed, memory space disabled, MSI-X off.
   * @throws {RangeError} when the model or options are out of range (a programming error, never a
   *   guest one)
   */
  constructor(options: VirtioPciOptions) {
    const { model, vcpu } = options;
    if (!Number.isInteger(model.deviceId) || model.deviceId < 0 || model.deviceId > 0x3f) {
      throw new RangeError(`Virtio device id ${model.deviceId} is not 0..63`);
    }
    if (
      !Number.isInteger(model.numQueues) || model.numQueues < 0 ||
      model.numQueues > VIRTIO_QUEUE_MAX
    ) {
      throw new RangeError(`Queue count ${model.numQueues} is not 0..${VIRTIO_QUEUE_MAX}`);
    }
    if (
      !Number.isInteger(model.configSize) || model.configSize < 0 ||
      model.configSize > VIRTIO_PCI_REGION_SIZE
    ) {
      throw new RangeError(`Device config size ${model.configSize} is not 0..4096`);
    }
    const configSpaceSize = options.configSpaceSize ?? PCI_CONFIG_SPACE_SIZE;
    if (configSpaceSize !== PCI_CONFIG_SPACE_SIZE && configSpaceSize !== PCIE_CONFIG_SPACE_SIZE) {
      throw new RangeError(`Config space size ${configSpaceSize} is not 256 or 4096`);
    }
    const msixVectors = options.msixVectors ?? Math.min(model.numQueues + 1, MSIX_MAX_VECTORS);
    this.model = model;
    this.configSpaceSize = configSpaceSize;
    this.msixVectors = msixVectors;
    this.#maxSizes = [];
    for (let q = 0; q < model.numQueues; q++) {
      const max = model.queueMaxSize(q);
      if (!Number.isInteger(max) || max < 0 || max > VIRTQ_MAX_SIZE) {
        throw new RangeError(`Queue ${q} maximum size ${max} is not 0..${VIRTQ_MAX_SIZE}`);
      }
      this.#maxSizes.push(max);
    }
    this.interrupts = new InterruptState(vcpu, {
      numVectors: msixVectors,
      numQueues: model.numQueues,
      ...(options.intxSource === undefined ? {} : { intxSource: options.intxSource }),
    });
    this.doorbells = new Doorbells(model.numQueues, options.doorbellMode ?? "ioeventfd");

    let offered = (model.deviceFeatures | featureBit(VIRTIO_F_VERSION_1)) & ~NEVER_OFFERED;
    // RING_RESET needs the model to stop and restart one queue while the others run.
    if (model.queueReset === undefined || model.queueEnable === undefined) {
      offered &= ~featureBit(VIRTIO_F_RING_RESET);
    }
    this.offeredFeatures = offered & FEATURE_MASK_64;

    // QEMU's msix_init_exclusive_bar: table in the lower half of a 4 KiB BAR, PBA in the upper.
    this.msixPbaOffset = Math.max(2048, msixVectors * MSIX_ENTRY_SIZE);
    this.msixBarSize = pow2ceil(
      Math.max(4096, this.msixPbaOffset + this.interrupts.pbaBytes),
    );

    this.#cfg = new Uint8Array(configSpaceSize);
    this.#cfgView = new DataView(this.#cfg.buffer);
    this.#wmask = new Uint8Array(configSpaceSize);
    this.#queues = [];
    for (let q = 0; q < model.numQueues; q++) this.#queues.push(this.#freshQueue(q));
    this.#initConfigSpace();
  }

  // ---- Configuration space ----------------------------------------------------------------------

  /**
   * A configuration read of `size` bytes at `offset`. Not 1, 2 or 4 bytes, not naturally aligned,
   * or outside config space: all-ones, as a configuration cycle nobody claims.
   */
  configRead(offset: number, size: number): number {
    if (!this.#validConfigAccess(offset, size)) return allOnes(size);
    // Interrupt Status follows the ISR live (the iothread sets it).
    const status = PCI_STATUS_CAP_LIST |
      (this.interrupts.intxStatus ? PCI_STATUS_INTERRUPT : 0);
    this.#cfgView.setUint16(PCI_STATUS, status, true);
    const data = CAP_PCI_CFG + VIRTIO_PCI_CFG_CAP_DATA;
    if (offset < data + 4 && offset + size > data) this.#cfgWindowRead();
    return this.#cfgGet(offset, size);
  }

  /**
   * A configuration write of `size` bytes at `offset`: only writable bits change (BAR address bits,
   * command, cache line size, interrupt line, MSI-X enable/mask, the PCI_CFG window fields); the
   * rest is read-only. Invalid accesses are ignored.
   */
  configWrite(offset: number, size: number, value: number): void {
    if (!this.#validConfigAccess(offset, size)) return;
    const v = value >>> 0;
    for (let i = 0; i < size; i++) {
      const at = offset + i;
      const mask = this.#wmask[at] ?? 0;
      const old = this.#cfg[at] ?? 0;
      this.#cfg[at] = (old & ~mask) | ((v >>> (8 * i)) & mask);
    }
    const end = offset + size;
    const touches = (start: number, length: number) => offset < start + length && end > start;
    if (touches(PCI_COMMAND, 2)) {
      const command = this.#cfgView.getUint16(PCI_COMMAND, true);
      this.interrupts.setIntxDisabled((command & PCI_COMMAND_INTX_DISABLE) !== 0);
    }
    if (touches(CAP_MSIX + PCI_MSIX_FLAGS, 2)) {
      const control = this.#cfgView.getUint16(CAP_MSIX + PCI_MSIX_FLAGS, true);
      this.interrupts.setMsixControl(
        (control & PCI_MSIX_FLAGS_ENABLE) !== 0,
        (control & PCI_MSIX_FLAGS_MASKALL) !== 0,
      );
    }
    if (touches(CAP_PCI_CFG + VIRTIO_PCI_CFG_CAP_DATA, 4)) this.#cfgWindowWrite();
  }

  #validConfigAccess(offset: number, size: number): boolean {
    return (size === 1 || size === 2 || size === 4) && Number.isInteger(offset) && offset >= 0 &&
      offset % size === 0 && offset + size <= this.configSpaceSize;
  }

  #cfgGet(offset: number, size: number): number {
    if (size === 1) return this.#cfgView.getUint8(offset);
    if (size === 2) return this.#cfgView.getUint16(offset, true);
    return this.#cfgView.getUint32(offset, true);
  }

  /** The PCI_CFG window (spec 4.1.4.9): `cap.length` bytes at `cap.offset` of BAR `cap.bar`, or null. */
  #cfgWindow(): { bar: number; offset: number; length: number } | null {
    const bar = this.#cfgView.getUint8(CAP_PCI_CFG + VIRTIO_PCI_CAP_BAR);
    const offset = this.#cfgView.getUint32(CAP_PCI_CFG + VIRTIO_PCI_CAP_OFFSET, true);
    const length = this.#cfgView.getUint32(CAP_PCI_CFG + VIRTIO_PCI_CAP_LENGTH, true);
    if (length !== 1 && length !== 2 && length !== 4) return null;
    if (offset % length !== 0 || offset + length > this.barSize(bar)) return null;
    return { bar, offset, length };
  }

  #cfgWindowRead(): void {
    const window = this.#cfgWindow();
    if (window === null) return;
    // The window reaches the BAR whether or not memory space is enabled: that is its purpose.
    const value = this.#barRead(window.bar, window.offset, window.length);
    this.#cfgView.setUint32(CAP_PCI_CFG + VIRTIO_PCI_CFG_CAP_DATA, value >>> 0, true);
  }

  #cfgWindowWrite(): void {
    const window = this.#cfgWindow();
    if (window === null) return;
    const data = this.#cfgView.getUint32(CAP_PCI_CFG + VIRTIO_PCI_CFG_CAP_DATA, true);
    this.#barWrite(window.bar, window.offset, window.length, data);
  }

  #initConfigSpace(): void {
    const cfg = this.#cfgView;
    this.#cfg.fill(0);
    this.#wmask.fill(0);
    cfg.setUint16(PCI_VENDOR_ID, PCI_VENDOR_ID_REDHAT_QUMRANET, true);
    cfg.setUint16(PCI_DEVICE_ID, VIRTIO_PCI_DEVICE_ID_BASE + this.model.deviceId, true);
    cfg.setUint16(PCI_STATUS, PCI_STATUS_CAP_LIST, true);
    cfg.setUint8(PCI_REVISION_ID, 1); // non-transitional: revision ≥ 1
    cfg.setUint8(PCI_CLASS_PROG, 0);
    cfg.setUint16(PCI_CLASS_DEVICE, this.model.pciClass & 0xffff, true);
    cfg.setUint8(PCI_HEADER_TYPE, 0);
    cfg.setUint16(PCI_SUBSYSTEM_VENDOR_ID, PCI_VENDOR_ID_REDHAT_QUMRANET, true);
    cfg.setUint16(PCI_SUBSYSTEM_ID, this.model.subsystemId & 0xffff, true);
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
    this.#setWmask(bar1, 4, ~(this.msixBarSize - 1) & PCI_BASE_ADDRESS_MEM_MASK);
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
    cfg.setUint16(CAP_MSIX + PCI_MSIX_FLAGS, (this.msixVectors - 1) & PCI_MSIX_FLAGS_QSIZE, true);
    this.#setWmask(CAP_MSIX + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
    cfg.setUint32(
      CAP_MSIX + PCI_MSIX_TABLE,
      VIRTIO_PCI_MSIX_TABLE_OFFSET | VIRTIO_PCI_MSIX_BAR,
      true,
    );
    cfg.setUint32(CAP_MSIX + PCI_MSIX_PBA, this.msixPbaOffset | VIRTIO_PCI_MSIX_BAR, true);
  }

  #virtioCap(at: number, next: number, length: number, type: number, offset: number): void {
    const cfg = this.#cfgView;
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

  // ---- BARs -------------------------------------------------------------------------------------

  /** Size of BAR `bar` (0 for one not implemented; BAR5 is BAR4's high half). */
  barSize(bar: number): number {
    if (bar === VIRTIO_PCI_MSIX_BAR) return this.msixBarSize;
    if (bar === VIRTIO_PCI_MODERN_BAR) return VIRTIO_PCI_MODERN_BAR_SIZE;
    return 0;
  }

  /** True when the command register enables memory space decoding. */
  get memoryEnabled(): boolean {
    return (this.#cfgView.getUint16(PCI_COMMAND, true) & PCI_COMMAND_MEMORY) !== 0;
  }

  /**
   * Where BAR `bar` decodes now, or null: memory space disabled, BAR not implemented, address 0,
   * or an address the BAR cannot hold (a sizing pattern left in it, a 32-bit BAR reaching 4 GiB,
   * or beyond 2^53), as QEMU's `pci_bar_address` treats them.
   */
  barAddress(bar: number): number | null {
    const size = this.barSize(bar);
    if (size === 0 || !this.memoryEnabled) return null;
    const at = PCI_BASE_ADDRESS_0 + 4 * bar;
    const lo = (this.#cfgView.getUint32(at, true) & PCI_BASE_ADDRESS_MEM_MASK) >>> 0;
    const is64 = bar === VIRTIO_PCI_MODERN_BAR;
    const hi = is64 ? this.#cfgView.getUint32(at + 4, true) : 0;
    const gpa = address64(lo, hi);
    if (gpa === 0) return null;
    const limit = is64 ? Number.MAX_SAFE_INTEGER : TWO_32 - 1;
    if (gpa + size > limit) return null;
    return gpa;
  }

  /** The BARs decoding now, for the VMM's address map. */
  barRegions(): BarRegion[] {
    const regions: BarRegion[] = [];
    for (const bar of [VIRTIO_PCI_MSIX_BAR, VIRTIO_PCI_MODERN_BAR]) {
      const gpa = this.barAddress(bar);
      if (gpa !== null) regions.push({ bar, gpa, size: this.barSize(bar) });
    }
    return regions;
  }

  /** Which BAR (and offset in it) guest-physical `gpa` falls in, or null. */
  findBar(gpa: number): BarHit | null {
    for (const bar of [VIRTIO_PCI_MODERN_BAR, VIRTIO_PCI_MSIX_BAR]) {
      const base = this.barAddress(bar);
      if (base !== null && gpa >= base && gpa < base + this.barSize(bar)) {
        return { bar, offset: gpa - base };
      }
    }
    return null;
  }

  /**
   * Guest-physical address of queue `queue`'s doorbell, or null when BAR4 is not decoding or the
   * queue does not exist: what the VMM registers as an ioeventfd for the vCPU's fast path.
   */
  notifyAddress(queue: number): number | null {
    const base = this.barAddress(VIRTIO_PCI_MODERN_BAR);
    if (base === null || !this.#queueExists(queue)) return null;
    return base + VIRTIO_PCI_NOTIFY_CFG_OFFSET + queue * VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER;
  }

  /**
   * A memory read of `size` bytes at `offset` in BAR `bar`. All-ones when memory space is disabled,
   * the BAR is not implemented, or the access is not 1, 2 or 4 bytes, naturally aligned, inside it.
   */
  mmioRead(bar: number, offset: number, size: number): number {
    if (!this.memoryEnabled) return allOnes(size);
    return this.#barRead(bar, offset, size);
  }

  /** A memory write to BAR `bar`; ignored where {@linkcode mmioRead} would read all-ones. */
  mmioWrite(bar: number, offset: number, size: number, value: number): void {
    if (!this.memoryEnabled) return;
    this.#barWrite(bar, offset, size, value);
  }

  #validBarAccess(bar: number, offset: number, size: number): boolean {
    return (size === 1 || size === 2 || size === 4) && Number.isInteger(offset) && offset >= 0 &&
      offset % size === 0 && offset + size <= this.barSize(bar);
  }

  #barRead(bar: number, offset: number, size: number): number {
    if (!this.#validBarAccess(bar, offset, size)) return allOnes(size);
    if (bar === VIRTIO_PCI_MSIX_BAR) {
      if (offset < this.interrupts.tableBytes) return this.interrupts.msixTableRead(offset, size);
      const pba = offset - this.msixPbaOffset;
      if (pba >= 0 && pba < this.interrupts.pbaBytes) return this.interrupts.msixPbaRead(pba, size);
      return 0;
    }
    const region = offset & ~(VIRTIO_PCI_REGION_SIZE - 1);
    const at = offset - region;
    switch (region) {
      case VIRTIO_PCI_COMMON_CFG_OFFSET:
        return this.#commonRead(at, size);
      case VIRTIO_PCI_ISR_CFG_OFFSET:
        // Read-to-clear; other bytes of the region are a hole.
        return at === 0 ? this.interrupts.readIsr() : 0;
      case VIRTIO_PCI_DEVICE_CFG_OFFSET:
        return this.#deviceConfigRead(at, size);
      default:
        return 0; // notify region: write-only, reads 0 as in QEMU
    }
  }

  #barWrite(bar: number, offset: number, size: number, value: number): void {
    if (!this.#validBarAccess(bar, offset, size)) return;
    const v = size === 4 ? value >>> 0 : (value >>> 0) & allOnes(size);
    if (bar === VIRTIO_PCI_MSIX_BAR) {
      // The PBA is read-only.
      if (offset < this.interrupts.tableBytes) this.interrupts.msixTableWrite(offset, size, v);
      return;
    }
    const region = offset & ~(VIRTIO_PCI_REGION_SIZE - 1);
    const at = offset - region;
    switch (region) {
      case VIRTIO_PCI_COMMON_CFG_OFFSET:
        this.#commonWrite(at, size, v);
        return;
      case VIRTIO_PCI_DEVICE_CFG_OFFSET:
        this.#deviceConfigWrite(at, size, v);
        return;
      case VIRTIO_PCI_NOTIFY_CFG_OFFSET:
        this.#notifyWrite(at);
        return;
      default:
        return; // ISR is read-only
    }
  }

  /**
   * A doorbell write that reached the VMM: the queue is the one whose doorbell address was written
   * (QEMU decodes the address too; without NOTIFICATION_DATA the value is that same index). A write
   * between doorbells or past the last queue is ignored.
   */
  #notifyWrite(at: number): void {
    if (at % VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER !== 0) return;
    const queue = at / VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER;
    if (!this.#queueExists(queue)) return;
    this.doorbells.trap(queue);
  }

  // ---- Device-specific config -------------------------------------------------------------------

  #deviceConfigRead(at: number, size: number): number {
    if (at + size > this.model.configSize) return 0;
    const bytes = new Uint8Array(size);
    this.model.readConfig(at, bytes);
    let value = 0;
    for (let i = size - 1; i >= 0; i--) value = value * 256 + (bytes[i] ?? 0);
    return value;
  }

  #deviceConfigWrite(at: number, size: number, value: number): void {
    if (at + size > this.model.configSize) return;
    const bytes = new Uint8Array(size);
    for (let i = 0; i < size; i++) bytes[i] = (value >>> (8 * i)) & 0xff;
    this.model.writeConfig(at, bytes);
  }

  // ---- Common config ----------------------------------------------------------------------------

  #commonRead(at: number, size: number): number {
    if (at >= VIRTIO_PCI_COMMON_CFG_SIZE || COMMON_WIDTH[at] !== size) return 0;
    const irq = this.interrupts;
    const q = this.#selected();
    switch (at) {
      case VIRTIO_PCI_COMMON_DFSELECT:
        return this.#deviceFeatureSelect;
      case VIRTIO_PCI_COMMON_DF:
        return this.#featureWindow(this.offeredFeatures, this.#deviceFeatureSelect);
      case VIRTIO_PCI_COMMON_GFSELECT:
        return this.#driverFeatureSelect;
      case VIRTIO_PCI_COMMON_GF:
        return this.#featureWindow(this.#driverFeatures, this.#driverFeatureSelect);
      case VIRTIO_PCI_COMMON_MSIX:
        return irq.configVector;
      case VIRTIO_PCI_COMMON_NUMQ:
        return this.model.numQueues;
      case VIRTIO_PCI_COMMON_STATUS:
        return irq.deviceStatus;
      case VIRTIO_PCI_COMMON_CFGGENERATION:
        return irq.configGeneration;
      case VIRTIO_PCI_COMMON_Q_SELECT:
        return this.#queueSelect;
      case VIRTIO_PCI_COMMON_Q_SIZE:
        return q?.size ?? 0;
      case VIRTIO_PCI_COMMON_Q_MSIX:
        return irq.queueVector(this.#queueSelect);
      case VIRTIO_PCI_COMMON_Q_ENABLE:
        return q?.enabled ? 1 : 0;
      case VIRTIO_PCI_COMMON_Q_NOFF:
        return q === undefined ? 0 : this.#queueSelect; // queues' doorbells in index order
      case VIRTIO_PCI_COMMON_Q_DESCLO:
        return q?.descLo ?? 0;
      case VIRTIO_PCI_COMMON_Q_DESCHI:
        return q?.descHi ?? 0;
      case VIRTIO_PCI_COMMON_Q_AVAILLO:
        return q?.driverLo ?? 0;
      case VIRTIO_PCI_COMMON_Q_AVAILHI:
        return q?.driverHi ?? 0;
      case VIRTIO_PCI_COMMON_Q_USEDLO:
        return q?.deviceLo ?? 0;
      case VIRTIO_PCI_COMMON_Q_USEDHI:
        return q?.deviceHi ?? 0;
      default:
        // queue_notify_data (NOTIF_CONFIG_DATA is never offered); queue_reset completes at once.
        return 0;
    }
  }

  #commonWrite(at: number, size: number, value: number): void {
    if (at >= VIRTIO_PCI_COMMON_CFG_SIZE || COMMON_WIDTH[at] !== size) return;
    const irq = this.interrupts;
    const q = this.#selected();
    // The driver must configure a queue before enabling it; later writes are ignored so the rings
    // the device runs never change under it.
    const configurable = q !== undefined && !q.enabled;
    switch (at) {
      case VIRTIO_PCI_COMMON_DFSELECT:
        this.#deviceFeatureSelect = value;
        return;
      case VIRTIO_PCI_COMMON_GFSELECT:
        this.#driverFeatureSelect = value;
        return;
      case VIRTIO_PCI_COMMON_GF:
        this.#writeDriverFeatures(value);
        return;
      case VIRTIO_PCI_COMMON_MSIX:
        irq.setConfigVector(value);
        return;
      case VIRTIO_PCI_COMMON_STATUS:
        this.#writeStatus(value & 0xff);
        return;
      case VIRTIO_PCI_COMMON_Q_SELECT:
        this.#queueSelect = value;
        return;
      case VIRTIO_PCI_COMMON_Q_SIZE:
        if (configurable && this.#validQueueSize(this.#queueSelect, value)) q.size = value;
        return;
      case VIRTIO_PCI_COMMON_Q_MSIX:
        if (q !== undefined) irq.setQueueVector(this.#queueSelect, value);
        return;
      case VIRTIO_PCI_COMMON_Q_ENABLE:
        if (configurable && value === 1) this.#enableQueue(this.#queueSelect, q);
        return;
      case VIRTIO_PCI_COMMON_Q_DESCLO:
        if (configurable) q.descLo = value;
        return;
      case VIRTIO_PCI_COMMON_Q_DESCHI:
        if (configurable) q.descHi = value;
        return;
      case VIRTIO_PCI_COMMON_Q_AVAILLO:
        if (configurable) q.driverLo = value;
        return;
      case VIRTIO_PCI_COMMON_Q_AVAILHI:
        if (configurable) q.driverHi = value;
        return;
      case VIRTIO_PCI_COMMON_Q_USEDLO:
        if (configurable) q.deviceLo = value;
        return;
      case VIRTIO_PCI_COMMON_Q_USEDHI:
        if (configurable) q.deviceHi = value;
        return;
      case VIRTIO_PCI_COMMON_Q_RESET:
        if (
          value === 1 && q !== undefined && hasFeature(this.#driverFeatures, VIRTIO_F_RING_RESET)
        ) {
          this.#resetQueue(this.#queueSelect);
        }
        return;
      default:
        return; // read-only: device_feature, num_queues, config_generation, queue_notify_off/data
    }
  }

  #featureWindow(features: bigint, select: number): number {
    if (select > 1) return 0; // no feature bit above 63 exists
    return Number((features >> BigInt(32 * select)) & 0xffffffffn);
  }

  #writeDriverFeatures(value: number): void {
    // Features are fixed once FEATURES_OK is accepted (QEMU's virtio_set_features refuses too).
    if ((this.interrupts.deviceStatus & VIRTIO_CONFIG_S_FEATURES_OK) !== 0) return;
    if (this.#driverFeatureSelect > 1) return;
    const shift = BigInt(32 * this.#driverFeatureSelect);
    this.#driverFeatures = (this.#driverFeatures & ~(0xffffffffn << shift)) |
      (BigInt(value >>> 0) << shift);
  }

  #validQueueSize(queue: number, size: number): boolean {
    if (size === 0 || size > (this.#maxSizes[queue] ?? 0)) return false;
    // Split rings need a power of 2; packed rings take any size.
    return hasFeature(this.#driverFeatures, VIRTIO_F_RING_PACKED) || (size & (size - 1)) === 0;
  }

  /**
   * device_status write. 0 resets. Otherwise bits are only added, each only after its predecessor
   * (ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK); the driver may not clear a bit, so a write
   * without one keeps it. FEATURES_OK is kept only for acceptable features; DRIVER_OK activates the
   * model. FAILED may be set any time; DEVICE_NEEDS_RESET only by the device.
   */
  #writeStatus(value: number): void {
    if (value === 0) {
      this.#resetDevice();
      return;
    }
    const old = this.interrupts.deviceStatus;
    let next = old | (value & VIRTIO_CONFIG_S_FAILED);
    const dead = (next & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET)) !== 0;
    if ((value & VIRTIO_CONFIG_S_ACKNOWLEDGE) !== 0) next |= VIRTIO_CONFIG_S_ACKNOWLEDGE;
    if ((value & VIRTIO_CONFIG_S_DRIVER) !== 0 && (next & VIRTIO_CONFIG_S_ACKNOWLEDGE) !== 0) {
      next |= VIRTIO_CONFIG_S_DRIVER;
    }
    if (
      (value & VIRTIO_CONFIG_S_FEATURES_OK) !== 0 && (old & VIRTIO_CONFIG_S_FEATURES_OK) === 0 &&
      (next & VIRTIO_CONFIG_S_DRIVER) !== 0 && !dead && this.#featuresAcceptable()
    ) {
      next |= VIRTIO_CONFIG_S_FEATURES_OK;
    }
    const activating = (value & VIRTIO_CONFIG_S_DRIVER_OK) !== 0 &&
      (old & VIRTIO_CONFIG_S_DRIVER_OK) === 0 && (next & VIRTIO_CONFIG_S_FEATURES_OK) !== 0 &&
      !dead;
    if (activating) next |= VIRTIO_CONFIG_S_DRIVER_OK;
    this.interrupts.addDeviceStatus(next & ~old);
    if (activating) this.#activate();
  }

  #featuresAcceptable(): boolean {
    const features = this.#driverFeatures;
    if ((features & ~this.offeredFeatures) !== 0n) return false;
    if (!hasFeature(features, VIRTIO_F_VERSION_1)) return false;
    return this.model.validateFeatures(features);
  }

  #activate(): void {
    const queues: ActivatedQueue[] = [];
    for (let index = 0; index < this.#queues.length; index++) {
      const q = this.#queues[index];
      if (q !== undefined && q.enabled) queues.push(this.#activated(index, q));
    }
    try {
      this.model.activate(this.#driverFeatures, queues, this.interrupts.epoch);
    } catch (error) {
      this.#modelFailed(error);
    }
  }

  #enableQueue(index: number, q: QueueRegs): void {
    if (q.size === 0) return;
    const status = this.interrupts.deviceStatus;
    if ((status & VIRTIO_CONFIG_S_DRIVER_OK) === 0) {
      q.enabled = true;
      return;
    }
    // After DRIVER_OK a queue comes back only through VIRTIO_F_RING_RESET.
    const enable = this.model.queueEnable;
    if (!hasFeature(this.#driverFeatures, VIRTIO_F_RING_RESET) || enable === undefined) return;
    q.enabled = true;
    try {
      enable.call(this.model, this.#activated(index, q));
    } catch (error) {
      this.#modelFailed(error);
    }
  }

  #resetQueue(index: number): void {
    const q = this.#queues[index];
    if (q === undefined) return;
    const status = this.interrupts.deviceStatus;
    if (q.enabled && (status & VIRTIO_CONFIG_S_DRIVER_OK) !== 0) this.model.queueReset?.(index);
    this.#queues[index] = this.#freshQueue(index);
    this.interrupts.setQueueVector(index, VIRTIO_MSI_NO_VECTOR);
  }

  #modelFailed(error: unknown): void {
    this.#modelError = error;
    this.interrupts.signalNeedsReset();
  }

  #activated(index: number, q: QueueRegs): ActivatedQueue {
    return {
      index,
      layout: {
        size: q.size,
        desc: address64(q.descLo, q.descHi),
        driver: address64(q.driverLo, q.driverHi),
        device: address64(q.deviceLo, q.deviceHi),
      },
      msixVector: this.interrupts.queueVector(index),
      notifyOff: index,
    };
  }

  #freshQueue(index: number): QueueRegs {
    return {
      size: this.#maxSizes[index] ?? 0,
      enabled: false,
      descLo: 0,
      descHi: 0,
      driverLo: 0,
      driverHi: 0,
      deviceLo: 0,
      deviceHi: 0,
    };
  }

  #selected(): QueueRegs | undefined {
    return this.#queues[this.#queueSelect];
  }

  #queueExists(queue: number): boolean {
    return Number.isInteger(queue) && queue >= 0 && queue < this.model.numQueues &&
      (this.#maxSizes[queue] ?? 0) > 0;
  }

  // ---- Device lifecycle -------------------------------------------------------------------------

  /**
   * Virtio reset (device_status ← 0): a new epoch with status 0, vectors unmapped, ISR and PBA
   * cleared, feature and queue registers back to their reset values, then the model's reset, then a
   * wake-up of the iothread so it sees the new epoch.
   */
  #resetDevice(): void {
    this.interrupts.resetDevice();
    this.#deviceFeatureSelect = 0;
    this.#driverFeatureSelect = 0;
    this.#driverFeatures = 0n;
    this.#queueSelect = 0;
    for (let q = 0; q < this.#queues.length; q++) this.#queues[q] = this.#freshQueue(q);
    this.model.reset();
    this.doorbells.wake();
  }

  /** PCI function reset (power-on, bus reset): config space, BARs, MSI-X, and the virtio device. */
  reset(): void {
    this.#initConfigSpace();
    this.interrupts.resetFunction();
    this.#resetDevice();
  }

  /**
   * The device hit an error the driver must reset it for (QEMU's `virtio_error`): sets
   * DEVICE_NEEDS_RESET, bumps config_generation and raises the config interrupt. The iothread does
   * the same with `InterruptState.signalNeedsReset` directly.
   */
  needsReset(): void {
    this.interrupts.signalNeedsReset();
  }

  /**
   * The device configuration changed (e.g. a resize): bumps config_generation and, once DRIVER_OK,
   * raises the config interrupt.
   */
  configChanged(): void {
    this.interrupts.bumpConfigGeneration();
    if ((this.interrupts.deviceStatus & VIRTIO_CONFIG_S_DRIVER_OK) !== 0) {
      this.interrupts.notifyConfig();
    }
  }

  // ---- Inspection -------------------------------------------------------------------------------

  /** `device_status` now. */
  get deviceStatus(): number {
    return this.interrupts.deviceStatus;
  }

  /** The features the driver has written (accepted once FEATURES_OK is set). */
  get driverFeatures(): bigint {
    return this.#driverFeatures;
  }

  /** Queue `queue`'s registers, or null for a queue that does not exist. */
  queueRegisters(queue: number): QueueRegisters | null {
    if (!Number.isInteger(queue)) return null;
    const q = this.#queues[queue];
    if (q === undefined) return null;
    return {
      size: q.size,
      enabled: q.enabled,
      msixVector: this.interrupts.queueVector(queue),
      desc: address64(q.descLo, q.descHi),
      driver: address64(q.driverLo, q.driverHi),
      device: address64(q.deviceLo, q.deviceHi),
    };
  }

  /** The last exception the model threw from `activate`/`queueEnable` (it became NEEDS_RESET). */
  get modelError(): unknown {
    return this.#modelError;
  }
}
