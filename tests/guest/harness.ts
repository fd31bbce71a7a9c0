/**
 * A single-thread machine for guest-side tests: guest RAM, a vCPU's interrupt words, PCI bus 0 with
 * one virtio-pci function over a device model, firmware BAR assignment, and a guest platform whose
 * `idle` step runs the device synchronously — the hook that makes the guest drivers testable
 * without Workers.
 *
 * {@linkcode FakeBlk} is a small virtio-blk device written for these tests (an in-memory disk,
 * split or packed rings, QEMU's status rules), with knobs to misbehave.
 *
 * @module
 */

import { GuestAllocator } from "../../src/guest/alloc.ts";
import { GuestInterrupts } from "../../src/guest/irq.ts";
import type { GuestPlatform, IdleFn } from "../../src/guest/virtio_driver.ts";
import { PciBus } from "../../src/virtio/bus.ts";
import {
  type ActivatedQueue,
  isPackedRing,
  PCI_CLASS_STORAGE_SCSI,
  PCI_SUBDEVICE_ID_QEMU,
  queueFeaturesOf,
  type VirtioDeviceModel,
} from "../../src/virtio/device.ts";
import { featureBit, VIRTIO_ID_BLOCK } from "../../src/virtio/features.ts";
import { VcpuInterrupts } from "../../src/virtio/interrupts.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import { PackedDeviceQueue } from "../../src/virtio/packed_queue.ts";
import { VirtioPciFunction } from "../../src/virtio/pci.ts";
import type { DescriptorChain, DeviceQueue } from "../../src/virtio/queue.ts";
import { SplitDeviceQueue } from "../../src/virtio/split_queue.ts";
import {
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from "../../src/virtio/virtio_blk_constants.ts";
import {
  VIRTIO_F_RING_PACKED,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../src/virtio/features.ts";

/** Guest RAM size of the test machine. */
export const RAM_BYTES = 32 * 1024 * 1024;
/** Where the guest allocator's region starts (the first MiB stays out, as a PC's low memory). */
export const ALLOC_BASE = 0x10_0000;
/** The PCI hole's MMIO window the test firmware assigns BARs in. */
export const MMIO_WINDOW = { base: 0xc000_0000, size: 0x1000_0000 };

/** Options of {@linkcode FakeBlk}. */
export interface FakeBlkOptions {
  /** Disk bytes (a multiple of 512; default 1 MiB). */
  readonly diskBytes?: number;
  readonly numQueues?: number;
  readonly queueMax?: number;
  /** Feature bits offered (default: a QEMU-like set). */
  readonly features?: bigint;
  readonly blkSize?: number;
  readonly sizeMax?: number;
  readonly segMax?: number;
  readonly readOnly?: boolean;
}

/** Every feature FakeBlk can offer. */
export const FAKE_BLK_FEATURES = [
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_RING_F_INDIRECT_DESC,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_F_RING_PACKED,
].reduce((acc, bit) => acc | featureBit(bit), 0n);

/**
 * A virtio-blk device model and back-end in one, run synchronously by {@linkcode FakeBlk.process}.
 * Config layout per the spec; the writeback byte is writable.
 */
export class FakeBlk implements VirtioDeviceModel {
  readonly deviceId = VIRTIO_ID_BLOCK;
  readonly deviceFeatures: bigint;
  readonly numQueues: number;
  readonly configSize = 60;
  readonly pciClass = PCI_CLASS_STORAGE_SCSI;
  readonly subsystemId = PCI_SUBDEVICE_ID_QEMU;
  readonly disk: Uint8Array;
  readonly config = new Uint8Array(60);
  readonly queueMax: number;
  /** Requests seen, by type. */
  readonly requests: number[] = [];
  /** Data segments per request seen (IN/OUT). */
  readonly segments: number[] = [];
  /** Set by the test: stop completing requests (they stay popped). */
  stall = false;
  /** Set by the test: answer every request with this status byte. */
  forceStatus: number | null = null;
  /** Set by the test: flip a byte of read data at this disk offset. */
  corruptReadAt: number | null = null;
  queues: (DeviceQueue | undefined)[] = [];
  mem: GuestMemory | null = null;
  fn: VirtioPciFunction | null = null;
  #held: { queue: DeviceQueue; chain: DescriptorChain }[] = [];

  constructor(options: FakeBlkOptions = {}) {
    const diskBytes = options.diskBytes ?? 1024 * 1024;
    this.disk = new Uint8Array(diskBytes);
    this.numQueues = options.numQueues ?? 1;
    this.queueMax = options.queueMax ?? 256;
    let features = options.features ?? FAKE_BLK_FEATURES;
    if (options.readOnly === true) features |= featureBit(VIRTIO_BLK_F_RO);
    this.deviceFeatures = features;
    const v = new DataView(this.config.buffer);
    v.setUint32(0, (diskBytes / 512) >>> 0, true);
    v.setUint32(4, Math.floor(diskBytes / 512 / 2 ** 32), true);
    v.setUint32(8, options.sizeMax ?? 65536, true);
    v.setUint32(12, options.segMax ?? 128, true);
    v.setUint32(20, options.blkSize ?? 512, true);
    v.setUint8(32, 1); // writeback
    v.setUint16(34, this.numQueues, true);
    v.setUint32(36, 0xffff, true); // max_discard_sectors
    v.setUint32(40, 1, true);
    v.setUint32(44, 1, true);
    v.setUint32(48, 0xffff, true); // max_write_zeroes_sectors
    v.setUint32(52, 1, true);
    v.setUint8(56, 1);
  }

  queueMaxSize(): number {
    return this.queueMax;
  }
  readConfig(offset: number, dst: Uint8Array): void {
    dst.set(this.config.subarray(offset, offset + dst.length));
  }
  writeConfig(offset: number, src: Uint8Array): void {
    if (offset === 32 && src.length === 1) this.config[32] = src[0]! & 1;
  }
  validateFeatures(): boolean {
    return true;
  }
  activate(features: bigint, queues: readonly ActivatedQueue[]): void {
    const mem = this.mem!;
    const qf = queueFeaturesOf(features);
    this.queues = [];
    for (const q of queues) {
      this.queues[q.index] = isPackedRing(features)
        ? new PackedDeviceQueue(mem, q.index, q.layout, qf)
        : new SplitDeviceQueue(mem, q.index, q.layout, qf);
    }
  }
  reset(): void {
    this.queues = [];
    this.#held = [];
  }

  /** Drains every queue the QEMU way and interrupts as the rings say. */
  processAll(): void {
    for (let q = 0; q < this.queues.length; q++) this.process(q);
  }

  /** Drains queue `index`; a ring fault becomes DEVICE_NEEDS_RESET. */
  process(index: number): void {
    const queue = this.queues[index];
    const fn = this.fn!;
    if (queue === undefined || queue.broken) return;
    try {
      do {
        queue.disableNotifications();
        for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
          if (this.stall) {
            this.#held.push({ queue, chain });
            continue;
          }
          queue.push(chain, this.#handle(chain));
        }
      } while (queue.enableNotifications());
    } catch {
      fn.needsReset();
      return;
    }
    if (queue.publish()) fn.interrupts.notifyQueue(index);
  }

  #handle(chain: DescriptorChain): number {
    const header = chain.readable[0];
    const lastW = chain.writable.at(-1);
    if (header === undefined || header.length < 16 || lastW === undefined) return 0;
    const hv = new DataView(header.buffer, header.byteOffset, 16);
    const type = hv.getUint32(0, true);
    const sector = hv.getUint32(8, true) + hv.getUint32(12, true) * 2 ** 32;
    this.requests.push(type);
    const statusAt = lastW.length - 1;
    let status = VIRTIO_BLK_S_OK;
    let written = 1;
    const offset = sector * 512;
    const ro = (this.deviceFeatures & featureBit(VIRTIO_BLK_F_RO)) !== 0n;
    switch (type) {
      case VIRTIO_BLK_T_IN: {
        const dst = [...chain.writable.slice(0, -1), lastW.subarray(0, statusAt)];
        this.segments.push(dst.filter((b) => b.length > 0).length);
        const len = dst.reduce((n, b) => n + b.length, 0);
        if (offset + len > this.disk.length) {
          status = VIRTIO_BLK_S_IOERR;
          break;
        }
        let at = offset;
        for (const b of dst) {
          b.set(this.disk.subarray(at, at + b.length));
          at += b.length;
        }
        if (
          this.corruptReadAt !== null && this.corruptReadAt >= offset &&
          this.corruptReadAt < offset + len
        ) {
          let rel = this.corruptReadAt - offset;
          for (const b of dst) {
            if (rel < b.length) {
              b[rel]! ^= 0x01;
              break;
            }
            rel -= b.length;
          }
        }
        written += len;
        break;
      }
      case VIRTIO_BLK_T_OUT: {
        const src = chain.readable.slice(1);
        this.segments.push(src.length);
        const len = src.reduce((n, b) => n + b.length, 0);
        if (ro || offset + len > this.disk.length) {
          status = VIRTIO_BLK_S_IOERR;
          break;
        }
        let at = offset;
        for (const b of src) {
          this.disk.set(b, at);
          at += b.length;
        }
        break;
      }
      case VIRTIO_BLK_T_FLUSH:
        break;
      case VIRTIO_BLK_T_GET_ID: {
        const id = new TextEncoder().encode("fake-blk-0001");
        const dst = chain.writable[0]!;
        dst.fill(0, 0, Math.min(20, dst.length - (chain.writable.length === 1 ? 1 : 0)));
        dst.set(id.subarray(0, Math.min(id.length, 20)));
        written += 20;
        break;
      }
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES: {
        const seg = chain.readable[1];
        if (seg === undefined || seg.length < 16) {
          status = VIRTIO_BLK_S_IOERR;
          break;
        }
        const sv = new DataView(seg.buffer, seg.byteOffset, 16);
        const first = (sv.getUint32(0, true) + sv.getUint32(4, true) * 2 ** 32) * 512;
        const bytes = sv.getUint32(8, true) * 512;
        if (ro || first + bytes > this.disk.length) {
          status = VIRTIO_BLK_S_IOERR;
          break;
        }
        this.disk.fill(0, first, first + bytes);
        break;
      }
      default:
        status = VIRTIO_BLK_S_UNSUPP;
    }
    lastW[statusAt] = this.forceStatus ?? status;
    return written;
  }
}

/** A single-thread machine around one device model. */
export interface TestMachine<M extends VirtioDeviceModel> {
  readonly mem: GuestMemory;
  readonly vcpu: VcpuInterrupts;
  readonly bus: PciBus;
  readonly fn: VirtioPciFunction;
  readonly slot: number;
  readonly model: M;
  readonly platform: GuestPlatform;
  /** Calls of the platform's idle step. */
  readonly idles: { count: number };
}

/** Options of {@linkcode makeMachine}. */
export interface MachineOptions {
  readonly msixVectors?: number;
  readonly slot?: number;
  readonly doorbellMode?: "trap" | "ioeventfd";
  /** Replaces the default idle step (which runs FakeBlk's processAll when the model has one). */
  readonly idle?: IdleFn;
}

/**
 * Builds guest RAM, a vCPU, bus 0 with `model` in slot 3, assigns BARs, and a guest platform whose
 * idle step runs the device (for a {@linkcode FakeBlk}) — the single-thread mode.
 */
export function makeMachine<M extends VirtioDeviceModel>(
  model: M,
  options: MachineOptions = {},
): TestMachine<M> {
  const mem = new GuestMemory([{ gpa: 0, size: RAM_BYTES }]);
  const vcpu = new VcpuInterrupts();
  const fn = new VirtioPciFunction({
    model,
    vcpu,
    doorbellMode: options.doorbellMode ?? "trap",
    ...(options.msixVectors === undefined ? {} : { msixVectors: options.msixVectors }),
  });
  const bus = new PciBus();
  const slot = bus.plug(fn, options.slot ?? 3);
  bus.assignBars(MMIO_WINDOW);
  if (model instanceof FakeBlk) {
    model.mem = mem;
    model.fn = fn;
  }
  const idles = { count: 0 };
  const idle: IdleFn = options.idle ?? (() => {
    idles.count++;
    if (model instanceof FakeBlk) model.processAll();
  });
  const platform: GuestPlatform = {
    bus,
    mem,
    interrupts: new GuestInterrupts(vcpu),
    alloc: new GuestAllocator(mem, { gpa: ALLOC_BASE, size: RAM_BYTES - ALLOC_BASE }),
    idle,
  };
  return { mem, vcpu, bus, fn, slot, model, platform, idles };
}
