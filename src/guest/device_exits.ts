/**
 * Exits per device: a {@linkcode GuestBus} wrapper that attributes every access the guest makes to
 * the PCI function it addresses — config accesses by slot, MMIO by the function's BARs — and
 * counts the ones that left the vCPU.
 *
 * On the vCPU's exit bus every config access and every MMIO read exits; an MMIO write exits unless
 * it hit a doorbell in the ioeventfd table, which the vCPU rings itself. So only doorbell writes
 * need a look at the global exit counters (before and after the write) to tell a trapped kick
 * from an ioeventfd ring; kicks are per batch, not per request, so that look is off the per-request
 * path. Without global exit counters (a single-thread bus with no notion of exits) nothing is
 * attributed and {@linkcode DeviceExitBus.exitsOf} answers null.
 *
 * @module
 */

import type { AccessSize, GuestBus } from "../virtio/bus.ts";
import type { PciFunctionInfo, VirtioStructures } from "./pci_probe.ts";
import type { ExitNumbers } from "./report.ts";

/** Running exit counts of one function. */
interface Tally {
  config: number;
  mmio: number;
  pio: number;
  doorbell: number;
  ioeventfd: number;
}

/** One watched function: where its BARs and doorbells are. */
interface Watched {
  readonly slot: number;
  readonly tally: Tally;
  /** [start, end) of each memory BAR. */
  readonly ranges: readonly (readonly [number, number])[];
  /** [start, end) of each I/O range (I/O BARs and fixed legacy ports). */
  readonly ports: readonly (readonly [number, number])[];
  readonly notifyStart: number;
  readonly notifyEnd: number;
}

/**
 * A bus that attributes exits to the functions it watches. Pass it to the drivers in place of the
 * bus it wraps.
 *
 * @example
 * ```ts
 * import { DeviceExitBus } from "./device_exits.ts";
 * const inner = {
 *   configRead: () => 0,
 *   configWrite() {},
 *   mmioRead: () => 0,
 *   mmioWrite() {},
 *   ioRead: () => 0,
 *   ioWrite() {},
 * };
 * let exits = 0;
 * const bus = new DeviceExitBus(inner, () => ({ config: exits, mmio: 0, doorbell: 0 }));
 * bus.configRead(3, 0, 4);
 * if (bus.exitsOf(3) !== null) throw new Error("slot 3 is not watched");
 * ```
 */
export class DeviceExitBus implements GuestBus {
  readonly #inner: GuestBus;
  readonly #counters: (() => ExitNumbers) | null;
  readonly #bySlot = new Map<number, Watched>();
  #watched: Watched[] = [];

  /**
   * @param inner the bus accesses go to
   * @param counters the global exit counters now (the vCPU's exit channel); without them nothing
   *   is attributed
   */
  constructor(inner: GuestBus, counters?: () => ExitNumbers) {
    this.#inner = inner;
    this.#counters = counters ?? null;
  }

  /** Starts attributing accesses to `fn` (its memory BARs; its doorbells from `structures`). */
  watch(fn: PciFunctionInfo, structures: VirtioStructures): void {
    const ranges: (readonly [number, number])[] = [];
    for (const bar of fn.bars) {
      if (bar !== null && bar.kind !== "io" && bar.address !== 0) {
        ranges.push([bar.address, bar.address + bar.size]);
      }
    }
    const watched: Watched = {
      slot: fn.slot,
      tally: { config: 0, mmio: 0, pio: 0, doorbell: 0, ioeventfd: 0 },
      ranges,
      ports: [],
      notifyStart: structures.notifyAddress,
      notifyEnd: structures.notifyAddress + structures.notify.length,
    };
    this.#bySlot.set(fn.slot, watched);
    this.#watched = [...this.#bySlot.values()];
  }

  /**
   * Starts attributing accesses to an emulated controller in `fn`'s slot: its memory BARs, its
   * I/O BARs and the fixed `ports` ranges ([start, end)) it decodes besides them.
   */
  watchEmulated(fn: PciFunctionInfo, ports: readonly (readonly [number, number])[] = []): void {
    const ranges: (readonly [number, number])[] = [];
    const io: (readonly [number, number])[] = [...ports];
    for (const bar of fn.bars) {
      if (bar === null || bar.address === 0) continue;
      (bar.kind === "io" ? io : ranges).push([bar.address, bar.address + bar.size]);
    }
    this.#bySlot.set(fn.slot, {
      slot: fn.slot,
      tally: { config: 0, mmio: 0, pio: 0, doorbell: 0, ioeventfd: 0 },
      ranges,
      ports: io,
      notifyStart: 0,
      notifyEnd: 0,
    });
    this.#watched = [...this.#bySlot.values()];
  }

  /**
   * The exits attributed to the function in `slot` so far (counters wrap at 2^32, as the VMM's),
   * or null when the slot is not watched or there are no exit counters.
   */
  exitsOf(slot: number): ExitNumbers | null {
    const w = this.#bySlot.get(slot);
    if (w === undefined || this.#counters === null) return null;
    return { ...w.tally };
  }

  #atPort(port: number): Watched | undefined {
    for (const w of this.#watched) {
      for (const [start, end] of w.ports) if (port >= start && port < end) return w;
    }
    return undefined;
  }

  ioRead(port: number, size: AccessSize): number {
    if (this.#counters !== null) {
      const w = this.#atPort(port);
      if (w !== undefined) w.tally.pio++;
    }
    return this.#inner.ioRead(port, size);
  }

  ioWrite(port: number, size: AccessSize, value: number): void {
    if (this.#counters !== null) {
      const w = this.#atPort(port);
      if (w !== undefined) w.tally.pio++;
    }
    this.#inner.ioWrite(port, size, value);
  }

  #at(gpa: number): Watched | undefined {
    for (const w of this.#watched) {
      for (const [start, end] of w.ranges) if (gpa >= start && gpa < end) return w;
    }
    return undefined;
  }

  configRead(slot: number, offset: number, size: AccessSize): number {
    if (this.#counters !== null) {
      const w = this.#bySlot.get(slot);
      if (w !== undefined) w.tally.config++;
    }
    return this.#inner.configRead(slot, offset, size);
  }

  configWrite(slot: number, offset: number, size: AccessSize, value: number): void {
    if (this.#counters !== null) {
      const w = this.#bySlot.get(slot);
      if (w !== undefined) w.tally.config++;
    }
    this.#inner.configWrite(slot, offset, size, value);
  }

  mmioRead(gpa: number, size: AccessSize): number {
    if (this.#counters !== null) {
      const w = this.#at(gpa);
      if (w !== undefined) w.tally.mmio++;
    }
    return this.#inner.mmioRead(gpa, size);
  }

  mmioWrite(gpa: number, size: AccessSize, value: number): void {
    const counters = this.#counters;
    const w = counters === null ? undefined : this.#at(gpa);
    if (w === undefined || counters === null) {
      this.#inner.mmioWrite(gpa, size, value);
      return;
    }
    if (gpa < w.notifyStart || gpa >= w.notifyEnd) {
      w.tally.mmio++;
      this.#inner.mmioWrite(gpa, size, value);
      return;
    }
    // A doorbell: it exited (trap) or rang an ioeventfd; only the global MMIO count can tell.
    const before = counters().mmio;
    this.#inner.mmioWrite(gpa, size, value);
    if (counters().mmio !== before) {
      w.tally.mmio++;
      w.tally.doorbell++;
    } else {
      w.tally.ioeventfd++;
    }
  }
}

/** `b − a` of two exit snapshots, per counter, modulo 2^32. */
export function exitDelta(a: ExitNumbers, b: ExitNumbers): ExitNumbers {
  const d = (x: number, y: number) => (y - x) >>> 0;
  return {
    config: d(a.config, b.config),
    mmio: d(a.mmio, b.mmio),
    ...(a.pio !== undefined && b.pio !== undefined ? { pio: d(a.pio, b.pio) } : {}),
    doorbell: d(a.doorbell, b.doorbell),
    ...(a.ioeventfd !== undefined && b.ioeventfd !== undefined
      ? { ioeventfd: d(a.ioeventfd, b.ioeventfd) }
      : {}),
  };
}
