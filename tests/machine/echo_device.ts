/**
 * A tiny device type for the machine tests: "echo". Its back-end copies each chain's readable
 * bytes into its writable buffers; with a drive it also writes the first 512 bytes of each request
 * to the drive, so shutdown's flush-and-close can be checked.
 *
 * Options (validated by the type's schema): `crashOnActivate` makes the iothread throw an uncaught
 * error right after DRIVER_OK (a dead Worker), `failDrain` makes every drain reject (a back-end
 * bug the iothread must contain).
 *
 * @module
 */

import { z } from "zod";
import type { DeviceInfo, DeviceSpec, DeviceType } from "../../src/devices/device_type.ts";
import { transportFeatures } from "../../src/devices/device_type.ts";
import {
  type ActivatedQueue,
  PCI_CLASS_OTHERS,
  PCI_SUBDEVICE_ID_QEMU,
  type VirtioDeviceModel,
} from "../../src/virtio/device.ts";

/** The virtio device id the echo device claims (PCI device id 0x1040 + 0x3f). */
export const VIRTIO_ID_ECHO = 0x3f;

/** The echo device's options. */
export const echoOptions = z.strictObject({
  crashOnActivate: z.boolean().default(false),
  failDrain: z.boolean().default(false),
});

/**
 * Device config (8 bytes): number of queues u32 @0, drives u32 @4. Read-only.
 */
export class EchoModel implements VirtioDeviceModel {
  readonly deviceId = VIRTIO_ID_ECHO;
  readonly deviceFeatures: bigint;
  readonly numQueues: number;
  readonly configSize = 8;
  readonly pciClass = PCI_CLASS_OTHERS;
  readonly subsystemId = PCI_SUBDEVICE_ID_QEMU;
  readonly #config = new Uint8Array(8);
  readonly #queueSize: number;
  activations = 0;
  resets = 0;

  constructor(spec: DeviceSpec, info: DeviceInfo) {
    this.deviceFeatures = transportFeatures(spec);
    this.numQueues = spec.numQueues;
    this.#queueSize = spec.queueSize;
    const view = new DataView(this.#config.buffer);
    view.setUint32(0, spec.numQueues, true);
    view.setUint32(4, info.drives.length, true);
  }

  queueMaxSize(_index: number): number {
    return this.#queueSize;
  }
  readConfig(offset: number, dst: Uint8Array): void {
    dst.set(this.#config.subarray(offset, offset + dst.length));
  }
  writeConfig(_offset: number, _src: Uint8Array): void {}
  validateFeatures(_features: bigint): boolean {
    return true;
  }
  activate(_features: bigint, _queues: readonly ActivatedQueue[], _epoch: number): void {
    this.activations++;
  }
  reset(): void {
    this.resets++;
  }
}

/** The "echo" device type. */
export const echoDeviceType: DeviceType = {
  name: "echo",
  backendModule: new URL("./echo_backend.ts", import.meta.url),
  drives: { min: 0, max: 1 },
  optionsSchema: echoOptions,
  createModel: (spec, info) => new EchoModel(spec, info),
};
