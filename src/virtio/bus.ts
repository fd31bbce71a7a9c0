/**
 * The guest's view of the platform bus: PCI configuration accesses (as through ECAM or ports
 * 0xCF8/0xCFC) and MMIO to BARs. {@linkcode GuestBus} is what guest drivers program against; in the
 * VMM, {@linkcode PciBus} implements it directly over the functions it holds, and the vCPU Worker
 * implements it by exiting to the VMM (or, for ioeventfd doorbells, by ringing them itself).
 *
 * @module
 */
import { PCI_COMMAND, PCI_COMMAND_MEMORY, type VirtioPciFunction } from "./pci.ts";

/** Access widths of config and MMIO accesses. */
export type AccessSize = 1 | 2 | 4;

/**
 * What a guest can do on the bus. Functions are addressed by device number on bus 0 (function 0):
 * `slot` 0..31. Reads of an empty slot return all-ones, as on real hardware.
 */
export interface GuestBus {
  /** Reads `size` bytes at `offset` of the config space of the function in `slot`. */
  configRead(slot: number, offset: number, size: AccessSize): number;
  /** Writes `value` (`size` bytes) at `offset` of the config space of the function in `slot`. */
  configWrite(slot: number, offset: number, size: AccessSize, value: number): void;
  /** Reads `size` bytes at guest-physical `gpa` (a BAR of some function). */
  mmioRead(gpa: number, size: AccessSize): number;
  /** Writes `value` (`size` bytes) at guest-physical `gpa` (a BAR of some function). */
  mmioWrite(gpa: number, size: AccessSize, value: number): void;
}

/** Where the firmware places BARs: a window of guest-physical addresses outside RAM. */
export interface MmioWindow {
  /** First guest-physical address of the window. */
  readonly base: number;
  /** Bytes in the window. */
  readonly size: number;
}

/** PCI slots on bus 0. */
export const PCI_SLOTS = 32;

/**
 * Bus 0 of the VMM: slots holding virtio-pci functions, config dispatch, MMIO dispatch by BAR
 * address, and a firmware-style BAR assignment.
 *
 * @example
 * ```ts
 * import { PciBus } from "./bus.ts";
 * const bus = new PciBus();
 * if (bus.configRead(3, 0, 4) !== 0xffffffff) throw new Error("an empty slot reads all-ones");
 * ```
 */
export class PciBus implements GuestBus {
  readonly #slots: Array<VirtioPciFunction | undefined> = new Array(PCI_SLOTS);
  /** MMIO accesses that hit no BAR (reads give all-ones, writes are dropped). */
  unclaimed = 0;

  /**
   * Plugs `fn` into `slot` (the first free one when absent) and returns the slot.
   *
   * @throws {RangeError} when the slot is taken or the bus is full
   */
  plug(fn: VirtioPciFunction, slot?: number): number {
    const at = slot ?? this.#slots.findIndex((s) => s === undefined);
    if (!Number.isInteger(at) || at < 0 || at >= PCI_SLOTS) {
      throw new RangeError(`No free PCI slot (${PCI_SLOTS} slots on bus 0)`);
    }
    if (this.#slots[at] !== undefined) throw new RangeError(`PCI slot ${at} is taken`);
    this.#slots[at] = fn;
    return at;
  }

  /** The function in `slot`, if any. */
  function(slot: number): VirtioPciFunction | undefined {
    return Number.isInteger(slot) && slot >= 0 && slot < PCI_SLOTS ? this.#slots[slot] : undefined;
  }

  /** Occupied slots, in order. */
  slots(): number[] {
    return this.#slots.flatMap((fn, slot) => fn === undefined ? [] : [slot]);
  }

  /** Reads the config space of the function in `slot`; an empty slot reads all-ones. */
  configRead(slot: number, offset: number, size: AccessSize): number {
    const fn = this.function(slot);
    return fn === undefined ? allOnes(size) : fn.configRead(offset, size);
  }

  /** Writes the config space of the function in `slot`; an empty slot drops the write. */
  configWrite(slot: number, offset: number, size: AccessSize, value: number): void {
    this.function(slot)?.configWrite(offset, size, value);
  }

  /** The function and BAR that decode `gpa`, if any. */
  route(gpa: number): { fn: VirtioPciFunction; bar: number; offset: number } | null {
    for (const fn of this.#slots) {
      if (fn === undefined) continue;
      const hit = fn.findBar(gpa);
      if (hit !== null) return { fn, bar: hit.bar, offset: hit.offset };
    }
    return null;
  }

  /** Reads the BAR that decodes `gpa`; unclaimed addresses read all-ones (and are counted). */
  mmioRead(gpa: number, size: AccessSize): number {
    const hit = this.route(gpa);
    if (hit === null) {
      this.unclaimed++;
      return allOnes(size);
    }
    return hit.fn.mmioRead(hit.bar, hit.offset, size);
  }

  /** Writes the BAR that decodes `gpa`; unclaimed writes are dropped (and counted). */
  mmioWrite(gpa: number, size: AccessSize, value: number): void {
    const hit = this.route(gpa);
    if (hit === null) {
      this.unclaimed++;
      return;
    }
    hit.fn.mmioWrite(hit.bar, hit.offset, size, value);
  }

  /**
   * Firmware's job: sizes every BAR of every function, places them naturally aligned in `window`
   * (largest first), programs the BAR registers and enables memory decoding.
   *
   * @throws {RangeError} when the BARs do not fit in the window
   */
  assignBars(window: MmioWindow): void {
    const bars: Array<{ slot: number; bar: number; size: number }> = [];
    for (const slot of this.slots()) {
      const fn = this.#slots[slot]!;
      for (let bar = 0; bar < 6; bar++) {
        const size = fn.barSize(bar);
        if (size > 0) bars.push({ slot, bar, size });
      }
    }
    bars.sort((a, b) => b.size - a.size);
    let next = window.base;
    for (const b of bars) {
      const at = Math.ceil(next / b.size) * b.size;
      if (at + b.size > window.base + window.size) {
        throw new RangeError(`PCI BARs do not fit in the MMIO window of ${window.size} bytes`);
      }
      const fn = this.#slots[b.slot]!;
      const reg = 0x10 + 4 * b.bar;
      const is64 = (fn.configRead(reg, 4) & 0x6) === 0x4;
      fn.configWrite(reg, 4, at % 0x1_0000_0000);
      if (is64) fn.configWrite(reg + 4, 4, Math.floor(at / 0x1_0000_0000));
      next = at + b.size;
    }
    for (const slot of this.slots()) {
      const fn = this.#slots[slot]!;
      fn.configWrite(PCI_COMMAND, 2, fn.configRead(PCI_COMMAND, 2) | PCI_COMMAND_MEMORY);
    }
  }
}

function allOnes(size: AccessSize): number {
  return size === 4 ? 0xffffffff : size === 2 ? 0xffff : 0xff;
}
