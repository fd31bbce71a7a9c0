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
 * Files: `pci_regs.ts` (the register map), `pci_config_space.ts` (config space and capabilities),
 * `pci_common_cfg.ts` (the common configuration registers and device status); this file is the
 * function itself: the BAR layout and the regions behind it (common, ISR, device config, notify,
 * MSI-X table and PBA), and the lifecycle.
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
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_F_ANY_LAYOUT,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_F_RING_RESET,
  VIRTIO_F_VERSION_1,
  VIRTQ_MAX_SIZE,
} from "./features.ts";
import type { BarHit, PciFunction } from "./bus.ts";
import type { VirtioDeviceModel } from "./device.ts";
import { type DoorbellMode, Doorbells } from "./doorbell.ts";
import {
  allOnes,
  InterruptState,
  MSIX_ENTRY_SIZE,
  MSIX_MAX_VECTORS,
  type VcpuInterrupts,
  VIRTIO_QUEUE_MAX,
} from "./interrupts.ts";
import { address64, CommonConfig, type QueueRegisters } from "./pci_common_cfg.ts";
import { CAP_MSIX, CAP_PCI_CFG, PciConfigSpace } from "./pci_config_space.ts";
import {
  PCI_BASE_ADDRESS_0,
  PCI_BASE_ADDRESS_MEM_MASK,
  PCI_COMMAND,
  PCI_COMMAND_INTX_DISABLE,
  PCI_COMMAND_MEMORY,
  PCI_CONFIG_SPACE_SIZE,
  PCI_MSIX_FLAGS,
  PCI_MSIX_FLAGS_ENABLE,
  PCI_MSIX_FLAGS_MASKALL,
  PCI_STATUS_CAP_LIST,
  PCI_STATUS_INTERRUPT,
  PCIE_CONFIG_SPACE_SIZE,
  VIRTIO_PCI_CFG_CAP_DATA,
  VIRTIO_PCI_COMMON_CFG_OFFSET,
  VIRTIO_PCI_DEVICE_CFG_OFFSET,
  VIRTIO_PCI_ISR_CFG_OFFSET,
  VIRTIO_PCI_MODERN_BAR,
  VIRTIO_PCI_MODERN_BAR_SIZE,
  VIRTIO_PCI_MSIX_BAR,
  VIRTIO_PCI_NOTIFY_CFG_OFFSET,
  VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER,
  VIRTIO_PCI_REGION_SIZE,
} from "./pci_regs.ts";

export * from "./pci_regs.ts";
export type { QueueRegisters } from "./pci_common_cfg.ts";

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
export type { BarHit } from "./bus.ts";

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
export class VirtioPciFunction implements PciFunction {
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

  readonly #space: PciConfigSpace;
  readonly #common: CommonConfig;

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
    const maxSizes: number[] = [];
    for (let q = 0; q < model.numQueues; q++) {
      const max = model.queueMaxSize(q);
      if (!Number.isInteger(max) || max < 0 || max > VIRTQ_MAX_SIZE) {
        throw new RangeError(`Queue ${q} maximum size ${max} is not 0..${VIRTQ_MAX_SIZE}`);
      }
      maxSizes.push(max);
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

    this.#common = new CommonConfig({
      model,
      interrupts: this.interrupts,
      doorbells: this.doorbells,
      offeredFeatures: this.offeredFeatures,
      maxSizes,
    });
    this.#space = new PciConfigSpace(configSpaceSize, {
      deviceId: model.deviceId,
      pciClass: model.pciClass,
      subsystemId: model.subsystemId,
      msixVectors,
      msixBarSize: this.msixBarSize,
      msixPbaOffset: this.msixPbaOffset,
    });
  }

  // ---- Configuration space ----------------------------------------------------------------------

  /**
   * A configuration read of `size` bytes at `offset`. Not 1, 2 or 4 bytes, not naturally aligned,
   * or outside config space: all-ones, as a configuration cycle nobody claims.
   */
  configRead(offset: number, size: number): number {
    const space = this.#space;
    if (!space.valid(offset, size)) return allOnes(size);
    // Interrupt Status follows the ISR live (the iothread sets it).
    space.setStatus(PCI_STATUS_CAP_LIST | (this.interrupts.intxStatus ? PCI_STATUS_INTERRUPT : 0));
    const data = CAP_PCI_CFG + VIRTIO_PCI_CFG_CAP_DATA;
    if (offset < data + 4 && offset + size > data) this.#cfgWindowRead();
    return space.read(offset, size);
  }

  /**
   * A configuration write of `size` bytes at `offset`: only writable bits change (BAR address bits,
   * command, cache line size, interrupt line, MSI-X enable/mask, the PCI_CFG window fields); the
   * rest is read-only. Invalid accesses are ignored.
   */
  configWrite(offset: number, size: number, value: number): void {
    const space = this.#space;
    if (!space.valid(offset, size)) return;
    space.write(offset, size, value);
    const end = offset + size;
    const touches = (start: number, length: number) => offset < start + length && end > start;
    if (touches(PCI_COMMAND, 2)) {
      const command = space.u16(PCI_COMMAND);
      this.interrupts.setIntxDisabled((command & PCI_COMMAND_INTX_DISABLE) !== 0);
    }
    if (touches(CAP_MSIX + PCI_MSIX_FLAGS, 2)) {
      const control = space.u16(CAP_MSIX + PCI_MSIX_FLAGS);
      this.interrupts.setMsixControl(
        (control & PCI_MSIX_FLAGS_ENABLE) !== 0,
        (control & PCI_MSIX_FLAGS_MASKALL) !== 0,
      );
    }
    if (touches(CAP_PCI_CFG + VIRTIO_PCI_CFG_CAP_DATA, 4)) this.#cfgWindowWrite();
  }

  #cfgWindowRead(): void {
    const window = this.#space.cfgWindow(this);
    if (window === null) return;
    // The window reaches the BAR whether or not memory space is enabled: that is its purpose.
    const value = this.#barRead(window.bar, window.offset, window.length);
    this.#space.cfgData = value >>> 0;
  }

  #cfgWindowWrite(): void {
    const window = this.#space.cfgWindow(this);
    if (window === null) return;
    this.#barWrite(window.bar, window.offset, window.length, this.#space.cfgData);
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
    return (this.#space.u16(PCI_COMMAND) & PCI_COMMAND_MEMORY) !== 0;
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
    const lo = (this.#space.u32(at) & PCI_BASE_ADDRESS_MEM_MASK) >>> 0;
    const is64 = bar === VIRTIO_PCI_MODERN_BAR;
    const hi = is64 ? this.#space.u32(at + 4) : 0;
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
    if (base === null || !this.#common.queueExists(queue)) return null;
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
        return this.#common.read(at, size);
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
        this.#common.write(at, size, v);
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
    if (!this.#common.queueExists(queue)) return;
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

  // ---- Device lifecycle -------------------------------------------------------------------------

  /** PCI function reset (power-on, bus reset): config space, BARs, MSI-X, and the virtio device. */
  reset(): void {
    this.#space.reset();
    this.interrupts.resetFunction();
    this.#common.resetDevice();
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
    return this.#common.driverFeatures;
  }

  /** Queue `queue`'s registers, or null for a queue that does not exist. */
  queueRegisters(queue: number): QueueRegisters | null {
    return this.#common.queueRegisters(queue);
  }

  /** The last exception the model threw from `activate`/`queueEnable` (it became NEEDS_RESET). */
  get modelError(): unknown {
    return this.#common.modelError;
  }
}
