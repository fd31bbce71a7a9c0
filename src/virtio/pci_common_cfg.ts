/**
 * The common configuration structure of a virtio-pci modern function (virtio 1.2 §4.1.4.3), as a
 * register file: device and driver feature windows, device_status and its state machine
 * (ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK, with the model's activation), the MSI-X vector
 * registers, and the selected queue's size, vector, enable, ring addresses and reset
 * (VIRTIO_F_RING_RESET). A virtio reset (device_status ← 0) starts here.
 *
 * Every offset, width and value comes from the guest: nothing here throws for them, and a model
 * that throws from `activate`/`queueEnable` becomes DEVICE_NEEDS_RESET.
 *
 * @module
 */

import type { ActivatedQueue, VirtioDeviceModel } from "./device.ts";
import type { Doorbells } from "./doorbell.ts";
import {
  hasFeature,
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FAILED,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  VIRTIO_F_VERSION_1,
  VIRTIO_MSI_NO_VECTOR,
} from "./features.ts";
import type { InterruptState } from "./interrupts.ts";
import {
  VIRTIO_PCI_COMMON_CFG_SIZE,
  VIRTIO_PCI_COMMON_CFGGENERATION,
  VIRTIO_PCI_COMMON_DF,
  VIRTIO_PCI_COMMON_DFSELECT,
  VIRTIO_PCI_COMMON_GF,
  VIRTIO_PCI_COMMON_GFSELECT,
  VIRTIO_PCI_COMMON_MSIX,
  VIRTIO_PCI_COMMON_NUMQ,
  VIRTIO_PCI_COMMON_Q_AVAILHI,
  VIRTIO_PCI_COMMON_Q_AVAILLO,
  VIRTIO_PCI_COMMON_Q_DESCHI,
  VIRTIO_PCI_COMMON_Q_DESCLO,
  VIRTIO_PCI_COMMON_Q_ENABLE,
  VIRTIO_PCI_COMMON_Q_MSIX,
  VIRTIO_PCI_COMMON_Q_NOFF,
  VIRTIO_PCI_COMMON_Q_RESET,
  VIRTIO_PCI_COMMON_Q_SELECT,
  VIRTIO_PCI_COMMON_Q_SIZE,
  VIRTIO_PCI_COMMON_Q_USEDHI,
  VIRTIO_PCI_COMMON_Q_USEDLO,
  VIRTIO_PCI_COMMON_STATUS,
} from "./pci_regs.ts";

const TWO_32 = 2 ** 32;

/** Width of each common-config register by offset (0: not a register start). */
const COMMON_WIDTH = (() => {
  const width = new Uint8Array(VIRTIO_PCI_COMMON_CFG_SIZE);
  for (const offset of [0, 4, 8, 12, 32, 36, 40, 44, 48, 52]) width[offset] = 4;
  for (const offset of [16, 18, 22, 24, 26, 28, 30, 56, 58]) width[offset] = 2;
  width[20] = 1;
  width[21] = 1;
  return width;
})();

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

/** One queue's registers as kept: the addresses in 32-bit halves, as written. */
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
export function address64(lo: number, hi: number): number {
  return hi * TWO_32 + lo;
}

/** How a {@linkcode CommonConfig} is built. */
export interface CommonConfigOptions {
  /** The device behind the transport. */
  readonly model: VirtioDeviceModel;
  /** Status, vectors and the device's epoch, shared with the iothread. */
  readonly interrupts: InterruptState;
  /** Woken on a virtio reset, so that the iothread sees the new epoch. */
  readonly doorbells: Doorbells;
  /** Features offered to the driver. */
  readonly offeredFeatures: bigint;
  /** Each queue's largest size (0: the queue does not exist), checked by the caller. */
  readonly maxSizes: readonly number[];
}

/** The common configuration registers of one function, and the device lifecycle they drive. */
export class CommonConfig {
  readonly #model: VirtioDeviceModel;
  readonly #interrupts: InterruptState;
  readonly #doorbells: Doorbells;
  readonly #offeredFeatures: bigint;
  readonly #maxSizes: readonly number[];
  readonly #queues: QueueRegs[] = [];
  #deviceFeatureSelect = 0;
  #driverFeatureSelect = 0;
  #driverFeatures = 0n;
  #queueSelect = 0;
  #modelError: unknown = undefined;

  constructor(options: CommonConfigOptions) {
    this.#model = options.model;
    this.#interrupts = options.interrupts;
    this.#doorbells = options.doorbells;
    this.#offeredFeatures = options.offeredFeatures;
    this.#maxSizes = options.maxSizes;
    for (let q = 0; q < this.#model.numQueues; q++) this.#queues.push(this.#freshQueue(q));
  }

  /** A read of `size` bytes at `at`: registers read at their own width only, the rest reads 0. */
  read(at: number, size: number): number {
    if (at >= VIRTIO_PCI_COMMON_CFG_SIZE || COMMON_WIDTH[at] !== size) return 0;
    const irq = this.#interrupts;
    const q = this.#selected();
    switch (at) {
      case VIRTIO_PCI_COMMON_DFSELECT:
        return this.#deviceFeatureSelect;
      case VIRTIO_PCI_COMMON_DF:
        return this.#featureWindow(this.#offeredFeatures, this.#deviceFeatureSelect);
      case VIRTIO_PCI_COMMON_GFSELECT:
        return this.#driverFeatureSelect;
      case VIRTIO_PCI_COMMON_GF:
        return this.#featureWindow(this.#driverFeatures, this.#driverFeatureSelect);
      case VIRTIO_PCI_COMMON_MSIX:
        return irq.configVector;
      case VIRTIO_PCI_COMMON_NUMQ:
        return this.#model.numQueues;
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

  /** A write of `size` bytes at `at`; wrong widths, read-only registers and holes are ignored. */
  write(at: number, size: number, value: number): void {
    if (at >= VIRTIO_PCI_COMMON_CFG_SIZE || COMMON_WIDTH[at] !== size) return;
    const irq = this.#interrupts;
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
    if ((this.#interrupts.deviceStatus & VIRTIO_CONFIG_S_FEATURES_OK) !== 0) return;
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
      this.resetDevice();
      return;
    }
    const old = this.#interrupts.deviceStatus;
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
    this.#interrupts.addDeviceStatus(next & ~old);
    if (activating) this.#activate();
  }

  #featuresAcceptable(): boolean {
    const features = this.#driverFeatures;
    if ((features & ~this.#offeredFeatures) !== 0n) return false;
    if (!hasFeature(features, VIRTIO_F_VERSION_1)) return false;
    return this.#model.validateFeatures(features);
  }

  #activate(): void {
    const queues: ActivatedQueue[] = [];
    for (let index = 0; index < this.#queues.length; index++) {
      const q = this.#queues[index];
      if (q !== undefined && q.enabled) queues.push(this.#activated(index, q));
    }
    try {
      this.#model.activate(this.#driverFeatures, queues, this.#interrupts.epoch);
    } catch (error) {
      this.#modelFailed(error);
    }
  }

  #enableQueue(index: number, q: QueueRegs): void {
    if (q.size === 0) return;
    const status = this.#interrupts.deviceStatus;
    if ((status & VIRTIO_CONFIG_S_DRIVER_OK) === 0) {
      q.enabled = true;
      return;
    }
    // After DRIVER_OK a queue comes back only through VIRTIO_F_RING_RESET.
    const enable = this.#model.queueEnable;
    if (!hasFeature(this.#driverFeatures, VIRTIO_F_RING_RESET) || enable === undefined) return;
    q.enabled = true;
    try {
      enable.call(this.#model, this.#activated(index, q));
    } catch (error) {
      this.#modelFailed(error);
    }
  }

  #resetQueue(index: number): void {
    const q = this.#queues[index];
    if (q === undefined) return;
    const status = this.#interrupts.deviceStatus;
    if (q.enabled && (status & VIRTIO_CONFIG_S_DRIVER_OK) !== 0) this.#model.queueReset?.(index);
    this.#queues[index] = this.#freshQueue(index);
    this.#interrupts.setQueueVector(index, VIRTIO_MSI_NO_VECTOR);
  }

  #modelFailed(error: unknown): void {
    this.#modelError = error;
    this.#interrupts.signalNeedsReset();
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
      msixVector: this.#interrupts.queueVector(index),
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

  /**
   * Virtio reset (device_status ← 0): a new epoch with status 0, vectors unmapped, ISR and PBA
   * cleared, feature and queue registers back to their reset values, then the model's reset, then a
   * wake-up of the iothread so it sees the new epoch.
   */
  resetDevice(): void {
    this.#interrupts.resetDevice();
    this.#deviceFeatureSelect = 0;
    this.#driverFeatureSelect = 0;
    this.#driverFeatures = 0n;
    this.#queueSelect = 0;
    for (let q = 0; q < this.#queues.length; q++) this.#queues[q] = this.#freshQueue(q);
    this.#model.reset();
    this.#doorbells.wake();
  }

  /** True for a queue that exists (a size above 0): only those have doorbells. */
  queueExists(queue: number): boolean {
    return Number.isInteger(queue) && queue >= 0 && queue < this.#model.numQueues &&
      (this.#maxSizes[queue] ?? 0) > 0;
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
      msixVector: this.#interrupts.queueVector(queue),
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
