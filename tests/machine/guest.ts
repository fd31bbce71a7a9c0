/**
 * A minimal guest for the machine tests, programmed only through a {@linkcode GuestBus}: PCI
 * enumeration and capability walk, the virtio-pci initialisation sequence, MSI-X, split or packed
 * rings in guest RAM, and a pipelined echo workload that checks every byte.
 *
 * @module
 */

import type { GuestBus } from "../../src/virtio/bus.ts";
import {
  featureBit,
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VNDR,
  PCI_VENDOR_ID_REDHAT_QUMRANET,
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_PCI_CAP_COMMON_CFG,
  VIRTIO_PCI_CAP_DEVICE_CFG,
  VIRTIO_PCI_CAP_ISR_CFG,
  VIRTIO_PCI_CAP_NOTIFY_CFG,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../src/virtio/features.ts";
import type { VcpuInterrupts } from "../../src/virtio/interrupts.ts";
import type { GuestMemory } from "../../src/virtio/memory.ts";
import { PackedDriverQueue, packedRingLayout } from "../../src/virtio/packed_queue.ts";
import type { DriverQueue, QueueLayout } from "../../src/virtio/queue.ts";
import { SplitDriverQueue, splitRingLayout } from "../../src/virtio/split_queue.ts";
import { queueFeaturesOf } from "../../src/virtio/device.ts";

const TWO_32 = 0x1_0000_0000;

/** What enumeration found of one virtio-pci function. */
export interface PciVirtio {
  slot: number;
  vendorId: number;
  deviceId: number;
  /** Guest-physical addresses of the virtio structures. */
  common: number;
  isr: number;
  deviceCfg: number;
  notify: number;
  notifyMultiplier: number;
  /** Config-space offset of the MSI-X capability. */
  msixCap: number;
  msixVectors: number;
  msixTable: number;
  /** Capability ids in walk order (for the test's assertions). */
  caps: number[];
}

/** Walks PCI bus 0 through config exits and returns every virtio-pci function. */
export function probePci(bus: GuestBus): PciVirtio[] {
  const found: PciVirtio[] = [];
  for (let slot = 0; slot < 32; slot++) {
    const id = bus.configRead(slot, 0, 4);
    if (id === 0xffffffff) continue;
    const vendorId = id & 0xffff;
    const deviceId = id >>> 16;
    if (vendorId !== PCI_VENDOR_ID_REDHAT_QUMRANET || deviceId < 0x1040 || deviceId > 0x107f) {
      continue;
    }
    const barAddr = (bar: number): number => {
      const lo = bus.configRead(slot, 0x10 + 4 * bar, 4);
      if ((lo & 0x6) === 0x4) {
        return ((lo & ~0xf) >>> 0) + bus.configRead(slot, 0x14 + 4 * bar, 4) * TWO_32;
      }
      return (lo & ~0xf) >>> 0;
    };
    const dev: PciVirtio = {
      slot,
      vendorId,
      deviceId,
      common: 0,
      isr: 0,
      deviceCfg: 0,
      notify: 0,
      notifyMultiplier: 0,
      msixCap: 0,
      msixVectors: 0,
      msixTable: 0,
      caps: [],
    };
    // Capabilities list present (status bit 4); walk it with a bound in case it loops.
    if ((bus.configRead(slot, 0x06, 2) & 0x10) === 0) throw new Error(`Slot ${slot}: no caps`);
    let cap = bus.configRead(slot, 0x34, 1) & ~3;
    for (let guard = 0; cap !== 0 && guard < 48; guard++) {
      const capId = bus.configRead(slot, cap, 1);
      dev.caps.push(capId);
      if (capId === PCI_CAP_ID_VNDR) {
        const type = bus.configRead(slot, cap + 3, 1);
        const base = barAddr(bus.configRead(slot, cap + 4, 1));
        const at = base + bus.configRead(slot, cap + 8, 4);
        if (type === VIRTIO_PCI_CAP_COMMON_CFG) dev.common = at;
        if (type === VIRTIO_PCI_CAP_ISR_CFG) dev.isr = at;
        if (type === VIRTIO_PCI_CAP_DEVICE_CFG) dev.deviceCfg = at;
        if (type === VIRTIO_PCI_CAP_NOTIFY_CFG) {
          dev.notify = at;
          dev.notifyMultiplier = bus.configRead(slot, cap + 16, 4);
        }
      } else if (capId === PCI_CAP_ID_MSIX) {
        dev.msixCap = cap;
        dev.msixVectors = (bus.configRead(slot, cap + 2, 2) & 0x7ff) + 1;
        const table = bus.configRead(slot, cap + 4, 4);
        dev.msixTable = barAddr(table & 7) + (table & ~7);
      }
      cap = bus.configRead(slot, cap + 1, 1) & ~3;
    }
    found.push(dev);
  }
  return found;
}

/** A bump allocator over a guest RAM range. */
export class GuestAllocator {
  #next: number;
  readonly #end: number;

  constructor(base: number, size: number) {
    this.#next = base;
    this.#end = base + size;
  }

  /** `bytes` at an address aligned to `align`. */
  alloc(bytes: number, align = 16): number {
    const at = Math.ceil(this.#next / align) * align;
    if (at + bytes > this.#end) throw new Error("Guest allocator is out of memory");
    this.#next = at + bytes;
    return at;
  }
}

// Common config offsets.
const DFSELECT = 0;
const DF = 4;
const GFSELECT = 8;
const GF = 12;
const MSIX_CONFIG = 16;
const STATUS = 20;
const Q_SELECT = 22;
const Q_SIZE = 24;
const Q_MSIX = 26;
const Q_ENABLE = 28;
const Q_NOFF = 30;
const Q_DESC = 32;
const Q_DRIVER = 40;
const Q_DEVICE = 48;

/** How the guest driver sets a device up. */
export interface DriverSetup {
  /** Queues to enable (from 0). */
  queues: number;
  /** Size of each queue (≤ the device's maximum). */
  queueSize: number;
  /** Use packed rings when offered. */
  packed: boolean;
  /** First x86 vector: config gets it, queue q gets vectorBase + 1 + q. */
  vectorBase: number;
  /** Device-specific feature bits the driver accepts when offered (default none). */
  features?: bigint;
  /** A hostile driver's queue_desc for every queue, instead of where it laid the ring out. */
  descOverride?: number;
}

/** A virtio device as the guest driver runs it. */
export class GuestVirtio {
  readonly info: PciVirtio;
  readonly queues: DriverQueue<number>[] = [];
  readonly layouts: QueueLayout[] = [];
  features = 0n;
  readonly #bus: GuestBus;
  readonly #mem: GuestMemory;
  readonly #alloc: GuestAllocator;
  readonly #notifyAt: number[] = [];
  #setup: DriverSetup | null = null;

  constructor(bus: GuestBus, mem: GuestMemory, alloc: GuestAllocator, info: PciVirtio) {
    this.#bus = bus;
    this.#mem = mem;
    this.#alloc = alloc;
    this.info = info;
  }

  get status(): number {
    return this.#bus.mmioRead(this.info.common + STATUS, 1);
  }

  set status(value: number) {
    this.#bus.mmioWrite(this.info.common + STATUS, 1, value);
  }

  /** x86 vector of the config interrupt. */
  get configVector(): number {
    return this.#setup!.vectorBase;
  }

  /** x86 vector of queue `q`. */
  queueVector(q: number): number {
    return this.#setup!.vectorBase + 1 + q;
  }

  /** Device reset: write 0, read back until 0 (the spec's wait for the reset to complete). */
  reset(): void {
    this.status = 0;
    for (let i = 0; this.status !== 0; i++) if (i > 1000) throw new Error("Reset never completed");
  }

  /**
   * The whole initialisation: reset, ACK, DRIVER, features, FEATURES_OK, MSI-X, queues, DRIVER_OK.
   * Rings (and queue objects) are rebuilt each time, as a driver re-probing after a reset does.
   */
  init(setup: DriverSetup): void {
    const bus = this.#bus;
    const common = this.info.common;
    this.#setup = setup;
    this.reset();
    this.status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    this.status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    bus.mmioWrite(common + DFSELECT, 4, 0);
    const lo = bus.mmioRead(common + DF, 4);
    bus.mmioWrite(common + DFSELECT, 4, 1);
    const hi = bus.mmioRead(common + DF, 4);
    const offered = (BigInt(hi) << 32n) | BigInt(lo);
    let wanted = featureBit(VIRTIO_F_VERSION_1) | featureBit(VIRTIO_RING_F_EVENT_IDX) |
      featureBit(VIRTIO_RING_F_INDIRECT_DESC);
    if (setup.packed) wanted |= featureBit(VIRTIO_F_RING_PACKED);
    wanted |= setup.features ?? 0n;
    this.features = offered & wanted;
    bus.mmioWrite(common + GFSELECT, 4, 0);
    bus.mmioWrite(common + GF, 4, Number(this.features & 0xffffffffn));
    bus.mmioWrite(common + GFSELECT, 4, 1);
    bus.mmioWrite(common + GF, 4, Number(this.features >> 32n));
    this.status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER |
      VIRTIO_CONFIG_S_FEATURES_OK;
    if ((this.status & VIRTIO_CONFIG_S_FEATURES_OK) === 0) throw new Error("FEATURES_OK refused");

    this.#setupMsix(setup);
    bus.mmioWrite(common + MSIX_CONFIG, 2, 0);
    if (bus.mmioRead(common + MSIX_CONFIG, 2) !== 0) throw new Error("Config vector refused");

    const packed = (this.features & featureBit(VIRTIO_F_RING_PACKED)) !== 0n;
    const qf = queueFeaturesOf(this.features);
    this.queues.length = 0;
    this.layouts.length = 0;
    this.#notifyAt.length = 0;
    for (let q = 0; q < setup.queues; q++) {
      bus.mmioWrite(common + Q_SELECT, 2, q);
      const max = bus.mmioRead(common + Q_SIZE, 2);
      if (max < setup.queueSize) throw new Error(`Queue ${q} holds only ${max}`);
      bus.mmioWrite(common + Q_SIZE, 2, setup.queueSize);
      bus.mmioWrite(common + Q_MSIX, 2, 1 + q);
      if (bus.mmioRead(common + Q_MSIX, 2) !== 1 + q) throw new Error(`Queue ${q} vector refused`);
      const bytes = packed
        ? packedRingLayout(setup.queueSize, 0).bytes
        : splitRingLayout(setup.queueSize, 0).bytes;
      const base = this.#alloc.alloc(bytes, 4096);
      const layout = packed
        ? packedRingLayout(setup.queueSize, base)
        : splitRingLayout(setup.queueSize, base);
      const queue = packed
        ? new PackedDriverQueue<number>(this.#mem, layout, qf)
        : new SplitDriverQueue<number>(this.#mem, layout, qf);
      // 8-byte registers as two 4-byte writes, low half first.
      for (
        const [reg, gpa] of [[Q_DESC, setup.descOverride ?? layout.desc], [
          Q_DRIVER,
          layout.driver,
        ], [
          Q_DEVICE,
          layout.device,
        ]] as const
      ) {
        bus.mmioWrite(common + reg, 4, gpa % TWO_32);
        bus.mmioWrite(common + reg + 4, 4, Math.floor(gpa / TWO_32));
      }
      const notifyOff = bus.mmioRead(common + Q_NOFF, 2);
      this.#notifyAt.push(this.info.notify + notifyOff * this.info.notifyMultiplier);
      bus.mmioWrite(common + Q_ENABLE, 2, 1);
      this.queues.push(queue);
      this.layouts.push(layout);
    }
    this.status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER |
      VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
    if ((this.status & VIRTIO_CONFIG_S_DRIVER_OK) === 0) throw new Error("DRIVER_OK refused");
  }

  /** MSI-X table entries 0..queues (address 0xFEE0_0000, data = x86 vector, unmasked), enabled. */
  #setupMsix(setup: DriverSetup): void {
    const bus = this.#bus;
    const { msixTable, msixCap, msixVectors, slot } = this.info;
    if (msixVectors < setup.queues + 1) throw new Error("Not enough MSI-X vectors");
    for (let v = 0; v <= setup.queues; v++) {
      const entry = msixTable + 16 * v;
      bus.mmioWrite(entry, 4, 0xfee0_0000);
      bus.mmioWrite(entry + 4, 4, 0);
      bus.mmioWrite(entry + 8, 4, setup.vectorBase + v);
      bus.mmioWrite(entry + 12, 4, 0);
    }
    const control = bus.configRead(slot, msixCap + 2, 2);
    bus.configWrite(slot, msixCap + 2, 2, (control | 0x8000) & ~0x4000);
  }

  /** Writes queue `q`'s doorbell. */
  notify(q: number): void {
    this.#bus.mmioWrite(this.#notifyAt[q]!, 2, q);
  }
}

/** What one echo run measured. */
export interface EchoResult {
  requests: number;
  kicks: number;
  suppressedKicks: number;
  interruptWaits: number;
  /** Wall time of the run. */
  ms: number;
}

/** Fills `dst` with request `n`'s pattern. */
function pattern(n: number, dst: Uint8Array): void {
  for (let k = 0; k < dst.length; k++) dst[k] = (n * 131 + k * 7 + 1) & 0xff;
}

function checkPattern(n: number, got: Uint8Array): void {
  for (let k = 0; k < got.length; k++) {
    if (got[k] !== ((n * 131 + k * 7 + 1) & 0xff)) {
      throw new Error(`Request ${n}: byte ${k} is ${got[k]}, not the one sent`);
    }
  }
}

/**
 * Sends `requests` echo requests of `bytes` each on queue `q`, keeping up to `depth` in flight,
 * and checks every echoed byte. Waits for interrupts (at most `timeoutMs` each) when nothing is
 * ready.
 */
export function runEcho(
  dev: GuestVirtio,
  vcpu: VcpuInterrupts,
  alloc: GuestAllocator,
  mem: GuestMemory,
  opts: {
    queue: number;
    requests: number;
    depth: number;
    bytes: number;
    timeoutMs: number;
    /** Buffers of `depth × bytes` each to reuse; allocated when absent. */
    buffers?: { in: number; out: number };
  },
): EchoResult {
  const queue = dev.queues[opts.queue]!;
  const { depth, bytes } = opts;
  const bufIn = opts.buffers?.in ?? alloc.alloc(depth * bytes, 4096);
  const bufOut = opts.buffers?.out ?? alloc.alloc(depth * bytes, 4096);
  const free: number[] = [];
  for (let s = depth - 1; s >= 0; s--) free.push(s);
  const requestOf = new Int32Array(depth);
  let submitted = 0;
  let completed = 0;
  let interruptWaits = 0;
  const started = performance.now();
  const kicksBefore = queue.stats.kicks;
  const suppressedBefore = queue.stats.suppressedKicks;
  while (completed < opts.requests) {
    while (submitted < opts.requests && free.length > 0) {
      const slot = free[free.length - 1]!;
      pattern(submitted, mem.slice(bufIn + slot * bytes, bytes));
      mem.fill(bufOut + slot * bytes, bytes, 0);
      if (
        !queue.add([{ addr: bufIn + slot * bytes, length: bytes }], [{
          addr: bufOut + slot * bytes,
          length: bytes,
        }], slot)
      ) {
        break;
      }
      free.pop();
      requestOf[slot] = submitted++;
    }
    if (queue.kick()) dev.notify(opts.queue);
    let reaped = 0;
    for (let used = queue.getUsed(); used !== null; used = queue.getUsed()) {
      const slot = used.token;
      if (used.written !== bytes) {
        throw new Error(`Request ${requestOf[slot]}: ${used.written} bytes echoed, not ${bytes}`);
      }
      checkPattern(requestOf[slot]!, mem.slice(bufOut + slot * bytes, bytes));
      free.push(slot);
      completed++;
      reaped++;
    }
    if (reaped === 0) {
      interruptWaits++;
      if (!vcpu.waitForInterrupt(opts.timeoutMs)) {
        throw new Error(
          `No interrupt within ${opts.timeoutMs} ms (${completed}/${opts.requests} done)`,
        );
      }
      while (vcpu.takeNext() !== null) { /* taken: the reap loop looks at the ring */ }
    }
  }
  return {
    requests: completed,
    kicks: queue.stats.kicks - kicksBefore,
    suppressedKicks: queue.stats.suppressedKicks - suppressedBefore,
    interruptWaits,
    ms: performance.now() - started,
  };
}
