/**
 * Fully emulated storage controllers (IDE, AHCI): device types whose every register lives on the
 * VMM thread, as QEMU's `ide-hd` and `ich9-ahci` live in its main loop. There is no iothread and no
 * virtqueue: the guest reaches the controller only through exits (port I/O, MMIO, config), and the
 * controller does its block I/O on the VMM thread's event loop, between exits.
 *
 * An {@linkcode EmulatedDeviceType} builds one {@linkcode EmulatedController} (a PCI function) for
 * a group of configured devices: every `ide-hd` of a machine shares one PIIX IDE function (two
 * channels, master and slave: four disks at most), while each `ahci` is an HBA of its own.
 *
 * @module
 */

import type { BlockNode } from "../block/node.ts";
import type { PciFunction } from "../virtio/bus.ts";
import type { VcpuInterrupts } from "../virtio/interrupts.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import type { DeviceSpec, OptionsSchema } from "./device_type.ts";

/** One configured device of a controller's group, with its drives opened. */
export interface EmulatedMember {
  /** The device as configured (after defaults and its options schema). */
  readonly spec: DeviceSpec;
  /** Its drives, opened on the VMM thread, one per {@linkcode DeviceSpec.drives} entry. */
  readonly drives: readonly BlockNode[];
}

/** What an emulated controller is built from. */
export interface EmulatedInit {
  /** The devices it serves, in configuration order (one unless the type groups them). */
  readonly members: readonly EmulatedMember[];
  /** Guest RAM, for DMA. */
  readonly memory: GuestMemory;
  /** The vCPU's interrupt inputs: MSI delivery (`deliver`) and INTx lines (`setIntx`). */
  readonly vcpu: VcpuInterrupts;
  /** INTx sources (0..31) reserved for it, as many as {@linkcode EmulatedDeviceType.intxLines}. */
  readonly intxSources: readonly number[];
}

/** A controller on bus 0, driven only through exits. */
export interface EmulatedController extends PciFunction {
  /** Counters by name (commands, sectors, interrupts, errors …), for reports. */
  readonly stats: Readonly<Record<string, number>>;
  /** Function-level reset (a machine reset): in-flight I/O is left to finish and forgotten. */
  reset(): void;
  /** Resolves once no block I/O is in flight. */
  idle(): Promise<void>;
  /** Waits for I/O in flight; the machine closes the drives afterwards. */
  close(): Promise<void>;
}

/** A device type whose controller is emulated on the VMM thread. */
export interface EmulatedDeviceType {
  /** Tells it from a virtio {@linkcode DeviceType}. */
  readonly kind: "emulated";
  /** The `type` of a device in the machine configuration. */
  readonly name: string;
  /** Drives each configured device takes. */
  readonly drives: { readonly min: number; readonly max: number };
  /** Validates {@linkcode DeviceSpec.options}; its output replaces them. */
  readonly optionsSchema?: OptionsSchema;
  /**
   * Devices of this type that share one controller (IDE: 4, master and slave on two channels);
   * 1 gives each device its own.
   */
  readonly perController: number;
  /**
   * Controllers of this type a machine may hold (IDE: 1, its legacy ports are fixed); absent:
   * no limit but the bus's.
   */
  readonly maxControllers?: number;
  /** INTx lines one controller drives (IDE: one per channel). */
  readonly intxLines: number;
  /** Builds the controller of a group of at most {@linkcode perController} devices. */
  create(init: EmulatedInit): EmulatedController;
}

/** Whether a loaded device type is an emulated one. */
export function isEmulatedType(type: unknown): type is EmulatedDeviceType {
  return typeof type === "object" && type !== null &&
    (type as { kind?: unknown }).kind === "emulated" &&
    typeof (type as { create?: unknown }).create === "function";
}
