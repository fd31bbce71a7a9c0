/**
 * A single-thread machine with the real device back-ends: any number of virtio-blk
 * (VirtioBlkModel + VirtioBlkBackend) and virtio-scsi (VirtioScsiModel + VirtioScsiBackend)
 * functions on PCI bus 0 over RAM-backed raw images, and an `idle` step that runs every active
 * queue of every back-end — the guest's halt, done by running the devices.
 *
 * virtio-scsi's back-end raises event interrupts outside `processQueue` (hotplug, unplug,
 * capacity changes); its hooks deliver them straight to the function, as the iothread would.
 *
 * @module
 */

import { RawNode } from "../../formats/raw.ts";
import {
  VirtioBlkBackend,
  VirtioBlkModel,
  type VirtioBlkOptions,
} from "../../src/devices/virtio_blk.ts";
import {
  VirtioScsiBackend,
  VirtioScsiModel,
  type VirtioScsiOptions,
} from "../../src/devices/virtio_scsi.ts";
import { GuestAllocator } from "../../src/guest/alloc.ts";
import type { GuestDevice, GuestEnv } from "../../src/guest/guest.ts";
import { GuestInterrupts } from "../../src/guest/irq.ts";
import type { GuestPlatform } from "../../src/guest/virtio_driver.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import type { ScsiDiskOptions } from "../../src/scsi/disk.ts";
import { PciBus } from "../../src/virtio/bus.ts";
import { type ActivatedQueue, isPackedRing, queueFeaturesOf } from "../../src/virtio/device.ts";
import { VcpuInterrupts } from "../../src/virtio/interrupts.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import { PackedDeviceQueue } from "../../src/virtio/packed_queue.ts";
import { VirtioPciFunction } from "../../src/virtio/pci.ts";
import { type DeviceQueue, type QueueLayout, VirtqueueError } from "../../src/virtio/queue.ts";
import { SplitDeviceQueue } from "../../src/virtio/split_queue.ts";
import { ALLOC_BASE, MMIO_WINDOW, RAM_BYTES } from "./harness.ts";

/** A RAM-backed raw image and its node. */
export interface MemDisk {
  readonly file: MemoryFile;
  readonly node: RawNode;
}

/** A raw image of `bytes` bytes in memory (filled with `fill`, default zeroes). */
export async function memDisk(name: string, bytes: number, fill = 0): Promise<MemDisk> {
  const file = new MemoryFile(name, new Uint8Array(bytes).fill(fill));
  return { file, node: await RawNode.open(file) };
}

/** A virtio-scsi model that tells the harness when the driver starts and resets it. */
class HookedScsiModel extends VirtioScsiModel {
  onActivate: (features: bigint, queues: readonly ActivatedQueue[]) => void = () => {};
  onReset: () => void = () => {};

  override activate(features: bigint, queues: readonly ActivatedQueue[], epoch: number): void {
    super.activate(features, queues, epoch);
    this.onActivate(features, queues);
  }

  override reset(): void {
    super.reset();
    this.onReset();
  }
}

/** A virtio-scsi function of the machine. */
export interface ScsiDevice {
  readonly id: string;
  readonly slot: number;
  readonly fn: VirtioPciFunction;
  readonly model: VirtioScsiModel;
  readonly backend: VirtioScsiBackend;
  /** Plugs a fresh RAM disk at `target`:`lun` (a hotplug once the driver is up). */
  plug(target: number, lun: number, bytes: number, options?: ScsiDiskOptions): Promise<MemDisk>;
}

/** A virtio-blk function of the machine. */
export interface BlkDevice {
  readonly id: string;
  readonly slot: number;
  readonly fn: VirtioPciFunction;
  readonly disk: MemDisk;
  readonly backend: VirtioBlkBackend;
}

function deviceQueues(
  mem: GuestMemory,
  features: bigint,
  queues: readonly { index: number; layout: QueueLayout }[],
): (DeviceQueue | undefined)[] {
  const qf = queueFeaturesOf(features);
  const active: (DeviceQueue | undefined)[] = [];
  for (const q of queues) {
    active[q.index] = isPackedRing(features)
      ? new PackedDeviceQueue(mem, q.index, q.layout, qf)
      : new SplitDeviceQueue(mem, q.index, q.layout, qf);
  }
  return active;
}

/** Guest RAM, a vCPU, bus 0, and the devices added; call {@linkcode RealMachine.ready} once built. */
export class RealMachine {
  readonly mem = new GuestMemory([{ gpa: 0, size: RAM_BYTES }]);
  readonly vcpu = new VcpuInterrupts();
  readonly bus = new PciBus();
  readonly devices: GuestDevice[] = [];
  /** Ring faults the back-ends reported (each also set DEVICE_NEEDS_RESET). */
  readonly faults: Error[] = [];
  /** Idle steps taken. */
  idles = 0;
  /** Runs at the start of each idle step: what happens on the host side while the guest halts. */
  onIdle: ((idles: number) => void | Promise<void>) | null = null;
  readonly #runners: Array<() => Promise<void>> = [];

  /** Runs every active queue of every device once: the guest's halt in a single thread. */
  readonly idle = async (): Promise<void> => {
    this.idles++;
    await this.onIdle?.(this.idles);
    for (const run of this.#runners) await run();
  };

  #fn(model: VirtioBlkModel | VirtioScsiModel, slot: number, msixVectors?: number) {
    const fn = new VirtioPciFunction({
      model,
      vcpu: this.vcpu,
      doorbellMode: "trap",
      ...(msixVectors === undefined ? {} : { msixVectors }),
    });
    this.bus.plug(fn, slot);
    return fn;
  }

  #runner(
    fn: VirtioPciFunction,
    queues: () => (DeviceQueue | undefined)[],
    process: (q: number, interrupt: () => void) => Promise<void>,
  ): void {
    this.#runners.push(async () => {
      const active = queues();
      for (let q = 0; q < active.length; q++) {
        if (active[q] === undefined) continue;
        try {
          await process(q, () => fn.interrupts.notifyQueue(q));
        } catch (error) {
          if (!(error instanceof VirtqueueError)) throw error;
          this.faults.push(error);
          fn.needsReset();
        }
      }
    });
  }

  /** Adds a virtio-blk over a fresh RAM disk in `slot`. */
  async addBlk(
    id: string,
    slot: number,
    diskBytes: number,
    options: VirtioBlkOptions = {},
  ): Promise<BlkDevice> {
    const disk = await memDisk(`${id}.raw`, diskBytes);
    const model = new VirtioBlkModel({ serial: id, ...options }, disk.node);
    const backend = new VirtioBlkBackend(disk.node, model.options, model.shared);
    const fn = this.#fn(model, slot);
    let active: (DeviceQueue | undefined)[] = [];
    model.hooks = {
      activate: (features, queues) => {
        active = deviceQueues(this.mem, features, queues);
        backend.activate(this.mem, features, active);
      },
      reset: () => {
        active = [];
        backend.reset();
      },
      configChange: () => fn.configChanged(),
    };
    this.#runner(fn, () => active, (q, irq) => backend.processQueue(q, irq));
    this.devices.push({ id, type: "virtio-blk", slot });
    return { id, slot, fn, disk, backend };
  }

  /** Adds a virtio-scsi (no LUNs yet: {@linkcode ScsiDevice.plug} them) in `slot`. */
  addScsi(id: string, slot: number, options: VirtioScsiOptions = {}): ScsiDevice {
    const model = new HookedScsiModel(options);
    const backend = new VirtioScsiBackend({ shared: model.shared });
    const fn = this.#fn(model, slot);
    let active: (DeviceQueue | undefined)[] = [];
    model.onActivate = (features, queues) => {
      active = deviceQueues(this.mem, features, queues);
      backend.activate(this.mem, features, active);
    };
    model.onReset = () => {
      active = [];
      backend.reset();
    };
    backend.hooks = {
      interrupt: (q) => fn.interrupts.notifyQueue(q),
      needsReset: (error) => {
        this.faults.push(error);
        fn.needsReset();
      },
    };
    this.#runner(fn, () => active, (q, irq) => backend.processQueue(q, irq));
    this.devices.push({ id, type: "virtio-scsi", slot });
    return {
      id,
      slot,
      fn,
      model,
      backend,
      plug: async (target, lun, bytes, diskOptions) => {
        const disk = await memDisk(`${id}-${target}-${lun}.raw`, bytes);
        backend.hotplug(target, lun, disk.node, diskOptions);
        return disk;
      },
    };
  }

  /** Assigns BARs: call after adding devices, before the guest probes. */
  ready(): this {
    this.bus.assignBars(MMIO_WINDOW);
    return this;
  }

  /** A guest platform over this machine (a fresh interrupt controller and allocator). */
  platform(): GuestPlatform {
    return {
      bus: this.bus,
      mem: this.mem,
      interrupts: new GuestInterrupts(this.vcpu),
      alloc: new GuestAllocator(this.mem, { gpa: ALLOC_BASE, size: RAM_BYTES - ALLOC_BASE }),
      idle: this.idle,
    };
  }

  /** The guest program's environment over this machine. */
  env(extra: Partial<GuestEnv> = {}): GuestEnv {
    return {
      bus: this.bus,
      mem: this.mem,
      vcpu: this.vcpu,
      idle: this.idle,
      devices: this.devices,
      mmioWindow: MMIO_WINDOW,
      ...extra,
    };
  }
}
