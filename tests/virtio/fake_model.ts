/**
 * Test helpers for the virtio-pci transport: a fake device model that records what the transport
 * asks of it, and a minimal "guest driver" that programs the function through register accesses.
 *
 * @module
 */

import {
  type ActivatedQueue,
  PCI_CLASS_STORAGE_SCSI,
  PCI_SUBDEVICE_ID_QEMU,
  type VirtioDeviceModel,
} from "../../src/virtio/device.ts";
import {
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_ID_BLOCK,
} from "../../src/virtio/features.ts";
import {
  PCI_BASE_ADDRESS_0,
  PCI_COMMAND,
  PCI_COMMAND_MASTER,
  PCI_COMMAND_MEMORY,
  VIRTIO_PCI_COMMON_DF,
  VIRTIO_PCI_COMMON_DFSELECT,
  VIRTIO_PCI_COMMON_GF,
  VIRTIO_PCI_COMMON_GFSELECT,
  VIRTIO_PCI_COMMON_Q_AVAILLO,
  VIRTIO_PCI_COMMON_Q_DESCLO,
  VIRTIO_PCI_COMMON_Q_ENABLE,
  VIRTIO_PCI_COMMON_Q_MSIX,
  VIRTIO_PCI_COMMON_Q_SELECT,
  VIRTIO_PCI_COMMON_Q_SIZE,
  VIRTIO_PCI_COMMON_Q_USEDLO,
  VIRTIO_PCI_COMMON_STATUS,
  VIRTIO_PCI_MODERN_BAR,
  type VirtioPciFunction,
} from "../../src/virtio/pci.ts";

/** What {@linkcode FakeModel.activate} was called with. */
export interface Activation {
  features: bigint;
  queues: readonly ActivatedQueue[];
  epoch: number;
}

/** Options of a {@linkcode FakeModel}. */
export interface FakeModelOptions {
  numQueues?: number;
  features?: bigint;
  queueMax?: number;
}

/** A device model that records every call. */
export class FakeModel implements VirtioDeviceModel {
  readonly deviceId = VIRTIO_ID_BLOCK;
  readonly deviceFeatures: bigint;
  readonly numQueues: number;
  readonly configSize = 16;
  readonly pciClass = PCI_CLASS_STORAGE_SCSI;
  readonly subsystemId = PCI_SUBDEVICE_ID_QEMU;
  readonly config = new Uint8Array(16);
  readonly activations: Activation[] = [];
  readonly configWrites: { offset: number; bytes: number[] }[] = [];
  readonly queueMax: number;
  resets = 0;
  /** Device-specific feature check. */
  accept: (features: bigint) => boolean = () => true;
  /** When set, activate throws (the device refuses the rings). */
  failActivate = false;

  constructor(options: FakeModelOptions = {}) {
    this.numQueues = options.numQueues ?? 2;
    this.deviceFeatures = options.features ?? 0n;
    this.queueMax = options.queueMax ?? 256;
  }

  queueMaxSize(_index: number): number {
    return this.queueMax;
  }

  readConfig(offset: number, dst: Uint8Array): void {
    dst.set(this.config.subarray(offset, offset + dst.length));
  }

  writeConfig(offset: number, src: Uint8Array): void {
    this.config.set(src, offset);
    this.configWrites.push({ offset, bytes: [...src] });
  }

  validateFeatures(features: bigint): boolean {
    return this.accept(features);
  }

  activate(features: bigint, queues: readonly ActivatedQueue[], epoch: number): void {
    this.activations.push({ features, queues, epoch });
    if (this.failActivate) throw new Error("Rings outside RAM");
  }

  reset(): void {
    this.resets++;
  }
}

/** A model that also supports VIRTIO_F_RING_RESET. */
export class RingResetModel extends FakeModel {
  readonly queueResets: number[] = [];
  readonly queueEnables: ActivatedQueue[] = [];

  queueReset(index: number): void {
    this.queueResets.push(index);
  }

  queueEnable(queue: ActivatedQueue): void {
    this.queueEnables.push(queue);
  }
}

/** Where the tests program BAR1 (below 4 GiB) and BAR4 (above 4 GiB, so the high half matters). */
export const BAR1_GPA = 0xfebf_0000;
export const BAR4_GPA = 0x8_0000_0000;

/** Programs BAR1 and BAR4 and enables memory space and bus mastering, as firmware would. */
export function programBars(fn: VirtioPciFunction): void {
  fn.configWrite(PCI_BASE_ADDRESS_0 + 4, 4, BAR1_GPA);
  fn.configWrite(PCI_BASE_ADDRESS_0 + 16, 4, BAR4_GPA % 2 ** 32);
  fn.configWrite(PCI_BASE_ADDRESS_0 + 20, 4, Math.floor(BAR4_GPA / 2 ** 32));
  fn.configWrite(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
}

/** A common-config read, through BAR4. */
export function commonRead(fn: VirtioPciFunction, offset: number, size: number): number {
  return fn.mmioRead(VIRTIO_PCI_MODERN_BAR, offset, size);
}

/** A common-config write, through BAR4. */
export function commonWrite(
  fn: VirtioPciFunction,
  offset: number,
  size: number,
  value: number,
): void {
  fn.mmioWrite(VIRTIO_PCI_MODERN_BAR, offset, size, value);
}

/** The 64-bit device feature set, read through the two 32-bit windows. */
export function readDeviceFeatures(fn: VirtioPciFunction): bigint {
  commonWrite(fn, VIRTIO_PCI_COMMON_DFSELECT, 4, 0);
  const lo = BigInt(commonRead(fn, VIRTIO_PCI_COMMON_DF, 4));
  commonWrite(fn, VIRTIO_PCI_COMMON_DFSELECT, 4, 1);
  const hi = BigInt(commonRead(fn, VIRTIO_PCI_COMMON_DF, 4));
  return (hi << 32n) | lo;
}

/** Writes the driver features through the two 32-bit windows. */
export function writeDriverFeatures(fn: VirtioPciFunction, features: bigint): void {
  commonWrite(fn, VIRTIO_PCI_COMMON_GFSELECT, 4, 0);
  commonWrite(fn, VIRTIO_PCI_COMMON_GF, 4, Number(features & 0xffffffffn));
  commonWrite(fn, VIRTIO_PCI_COMMON_GFSELECT, 4, 1);
  commonWrite(fn, VIRTIO_PCI_COMMON_GF, 4, Number((features >> 32n) & 0xffffffffn));
}

/** Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns device_status as read back. */
export function negotiate(fn: VirtioPciFunction, features: bigint): number {
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, 0);
  commonWrite(fn, VIRTIO_PCI_COMMON_STATUS, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE);
  commonWrite(
    fn,
    VIRTIO_PCI_COMMON_STATUS,
    1,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
  );
  writeDriverFeatures(fn, features);
  commonWrite(
    fn,
    VIRTIO_PCI_COMMON_STATUS,
    1,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
  );
  return commonRead(fn, VIRTIO_PCI_COMMON_STATUS, 1);
}

/** A queue as the test driver lays it out. */
export interface QueueSetup {
  size: number;
  desc: number;
  driver: number;
  device: number;
  vector: number;
}

function writeAddress(fn: VirtioPciFunction, lo: number, address: number): void {
  commonWrite(fn, lo, 4, address % 2 ** 32);
  commonWrite(fn, lo + 4, 4, Math.floor(address / 2 ** 32));
}

/** Selects queue `queue`, writes its size, vector and areas, and enables it. */
export function setupQueue(fn: VirtioPciFunction, queue: number, setup: QueueSetup): void {
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SELECT, 2, queue);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_SIZE, 2, setup.size);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_MSIX, 2, setup.vector);
  writeAddress(fn, VIRTIO_PCI_COMMON_Q_DESCLO, setup.desc);
  writeAddress(fn, VIRTIO_PCI_COMMON_Q_AVAILLO, setup.driver);
  writeAddress(fn, VIRTIO_PCI_COMMON_Q_USEDLO, setup.device);
  commonWrite(fn, VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
}
