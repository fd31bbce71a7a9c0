/**
 * The guest's side of the fully emulated disks: brings up an `ide-hd` (PIIX IDE, PIO or DMA) or
 * an `ahci` disk (NCQ) with its driver, and gives the guest program what it needs of either — a
 * {@linkcode BlockTarget} for the jobs, the ports to attribute exits by, and counters in the terms
 * of a virtqueue's (requests, notifications, interrupts), so the report compares them with virtio.
 *
 * @module
 */

import type { BlockTarget } from "./block_target.ts";
import { AhciDriver } from "./ahci_driver.ts";
import { IdeDriver } from "./ide_driver.ts";
import type { PciFunctionInfo } from "./pci_probe.ts";
import type { GuestPlatform } from "./virtio_driver.ts";

/** An emulated disk's counters, cumulative since bring-up. */
export interface EmulatedDiskCounters {
  /** Requests completed. */
  readonly completions: number;
  /**
   * Times the driver told the controller to start work: IDE command-register writes, AHCI
   * PxCI doorbell writes (many NCQ commands can share one).
   */
  readonly notifications: number;
  /** Interrupts the driver took for the disk. */
  readonly interrupts: number;
  /** Most requests started by one notification. */
  readonly largestBatch: number;
}

/** A disk brought up on an emulated controller. */
export interface EmulatedDisk {
  /** What jobs drive. `close` does nothing: the disk stays up until {@linkcode shutdown}. */
  readonly target: BlockTarget & { close(): void };
  /** I/O port ranges [start, end) the disk is reached through besides the controller's BARs. */
  readonly ports: readonly (readonly [number, number])[];
  /** How its interrupts arrive (`intx`, `msi`). */
  readonly interruptMode: string;
  /** Counters now. */
  counters(): EmulatedDiskCounters;
  /** Stops the disk's driver (nothing may be in flight). */
  shutdown(): void;
}

/** Which disk and how, from the firmware's device entry. */
export interface EmulatedDiskWant {
  /** `ide-hd` or `ahci`. */
  readonly type: string;
  /** IDE: 0 the primary channel's master, 1 the secondary channel's master. */
  readonly unit?: number;
  /** The device's options (IDE `mode`, AHCI `ncq`). */
  readonly options?: Readonly<Record<string, unknown>>;
}

/**
 * Brings up the disk `want` names on the controller `fn`, with `depth` requests the jobs may keep
 * in flight (IDE runs them one at a time on the wire; AHCI with NCQ up to 32 at once).
 *
 * @throws {Error} naming the controller when the disk is absent or does not answer
 */
export async function openEmulatedDisk(
  platform: GuestPlatform,
  fn: PciFunctionInfo,
  want: EmulatedDiskWant,
  options: { readonly depth: number },
): Promise<EmulatedDisk> {
  if (want.type === "ide-hd") {
    const unit = want.unit ?? 0;
    const mode = want.options?.mode === "pio" ? "pio" : "dma";
    const driver = await IdeDriver.open(platform, fn, {
      mode,
      depth: options.depth,
      channel: unit === 1 ? 1 : 0,
      slave: false,
    });
    return {
      target: Object.assign(driver, { close() {} }),
      ports: driver.ports,
      interruptMode: "intx",
      counters: () => {
        const s = driver.stats;
        return {
          completions: s.completions,
          notifications: s.commands,
          interrupts: s.interrupts,
          largestBatch: 1,
        };
      },
      shutdown: () => driver.shutdown(),
    };
  }
  const driver = await AhciDriver.open(platform, fn, {
    depth: Math.min(32, options.depth),
    ncq: want.options?.ncq !== false,
  });
  return {
    target: Object.assign(driver, { close() {} }),
    ports: [],
    interruptMode: driver.interruptMode,
    counters: () => {
      const s = driver.stats;
      return {
        completions: s.completions,
        notifications: s.doorbells,
        interrupts: s.interrupts,
        largestBatch: s.largestBatch,
      };
    },
    shutdown: () => driver.shutdown(),
  };
}
