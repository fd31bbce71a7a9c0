/**
 * The guest's view of the platform bus: PCI configuration accesses (as through ECAM or ports
 * 0xCF8/0xCFC), MMIO to memory BARs, and port I/O (I/O BARs and the legacy ports of an emulated
 * IDE controller). {@linkcode GuestBus} is what guest drivers program against; in the
 * VMM, {@linkcode PciBus} implements it directly over the functions it holds, and the vCPU Worker
 * implements it by exiting to the VMM (or, for ioeventfd doorbells, by ringing them itself).
 *
 * @module
 */
import { PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MEMORY } from "./pci_regs.ts";

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
  /** Reads `size` bytes from I/O port `port` (0..0xffff); a port nobody decodes reads all-ones. */
  ioRead(port: number, size: AccessSize): number;
  /** Writes `value` (`size` bytes) to I/O port `port`; a port nobody decodes drops it. */
  ioWrite(port: number, size: AccessSize, value: number): void;
}

/** Where an access landed inside a function: a BAR (or a range the function names) and an offset. */
export interface BarHit {
  /** The BAR (0..5), or for port I/O a negative number naming one of the function's fixed ranges. */
  readonly bar: number;
  /** Offset inside it. */
  readonly offset: number;
}

/**
 * A function on bus 0 as the bus sees it: its configuration space, the memory BARs it decodes and,
 * optionally, I/O ports (I/O BARs, or fixed legacy ranges such as an IDE controller's in
 * compatibility mode). The virtio-pci function and the emulated disk controllers implement it.
 */
export interface PciFunction {
  /** Reads `size` bytes at `offset` of the configuration space. */
  configRead(offset: number, size: number): number;
  /** Writes `size` bytes at `offset` of the configuration space. */
  configWrite(offset: number, size: number, value: number): void;
  /** Bytes BAR `bar` decodes; 0 when the BAR is not implemented. */
  barSize(bar: number): number;
  /** The memory BAR that decodes `gpa` (memory decoding on), if any. */
  findBar(gpa: number): BarHit | null;
  /** Reads a memory BAR. */
  mmioRead(bar: number, offset: number, size: number): number;
  /** Writes a memory BAR. */
  mmioWrite(bar: number, offset: number, size: number, value: number): void;
  /** The I/O range that decodes `port` (I/O decoding on), if any. */
  findPort?(port: number): BarHit | null;
  /** Reads an I/O range {@linkcode findPort} returned. */
  ioRead?(bar: number, offset: number, size: AccessSize): number;
  /** Writes an I/O range {@linkcode findPort} returned. */
  ioWrite?(bar: number, offset: number, size: AccessSize, value: number): void;
}

/** Where the firmware places BARs: a window of guest-physical addresses outside RAM. */
export interface MmioWindow {
  /** First guest-physical address of the window. */
  readonly base: number;
  /** Bytes in the window. */
  readonly size: number;
}

/** Where the firmware places I/O BARs: ports 0xC000..0xFFFF, as SeaBIOS does. */
export const IO_WINDOW: MmioWindow = { base: 0xc000, size: 0x4000 };

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
export class PciBus<F extends PciFunction = PciFunction> implements GuestBus {
  readonly #slots: Array<F | undefined> = new Array(PCI_SLOTS);
  /** MMIO and port accesses that hit no function (reads give all-ones, writes are dropped). */
  unclaimed = 0;

  /**
   * Plugs `fn` into `slot` (the first free one when absent) and returns the slot.
   *
   * @throws {RangeError} when the slot is taken or the bus is full
   */
  plug(fn: F, slot?: number): number {
    const at = slot ?? this.#slots.findIndex((s) => s === undefined);
    if (!Number.isInteger(at) || at < 0 || at >= PCI_SLOTS) {
      throw new RangeError(`No free PCI slot (${PCI_SLOTS} slots on bus 0)`);
    }
    if (this.#slots[at] !== undefined) throw new RangeError(`PCI slot ${at} is taken`);
    this.#slots[at] = fn;
    return at;
  }

  /** The function in `slot`, if any. */
  function(slot: number): F | undefined {
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
  route(gpa: number): { fn: F; bar: number; offset: number } | null {
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

  /** The function and I/O range that decode `port`, if any. */
  routePort(port: number): { fn: F; bar: number; offset: number } | null {
    for (const fn of this.#slots) {
      if (fn === undefined || fn.findPort === undefined) continue;
      const hit = fn.findPort(port);
      if (hit !== null) return { fn, bar: hit.bar, offset: hit.offset };
    }
    return null;
  }

  /** Reads the I/O port `port`; ports nobody decodes read all-ones (and are counted). */
  ioRead(port: number, size: AccessSize): number {
    const hit = this.routePort(port);
    if (hit === null || hit.fn.ioRead === undefined) {
      this.unclaimed++;
      return allOnes(size);
    }
    return hit.fn.ioRead(hit.bar, hit.offset, size);
  }

  /** Writes the I/O port `port`; writes nobody decodes are dropped (and counted). */
  ioWrite(port: number, size: AccessSize, value: number): void {
    const hit = this.routePort(port);
    if (hit === null || hit.fn.ioWrite === undefined) {
      this.unclaimed++;
      return;
    }
    hit.fn.ioWrite(hit.bar, hit.offset, size, value);
  }

  /**
   * Firmware's job: sizes every BAR of every function, places memory BARs naturally aligned in
   * `window` and I/O BARs in `ioWindow` (largest first), programs the BAR registers and enables
   * memory decoding, and I/O decoding on functions that have I/O BARs or fixed ports.
   *
   * @throws {RangeError} when the BARs do not fit in their window
   */
  assignBars(window: MmioWindow, ioWindow: MmioWindow = IO_WINDOW): void {
    const bars: Array<{ slot: number; bar: number; size: number; io: boolean }> = [];
    for (const slot of this.slots()) {
      const fn = this.#slots[slot]!;
      for (let bar = 0; bar < 6; bar++) {
        const size = fn.barSize(bar);
        if (size <= 0) continue;
        const io = (fn.configRead(0x10 + 4 * bar, 4) & 0x1) === 0x1;
        bars.push({ slot, bar, size, io });
        // A 64-bit memory BAR takes the next register as its upper half.
        if (!io && (fn.configRead(0x10 + 4 * bar, 4) & 0x6) === 0x4) bar++;
      }
    }
    bars.sort((a, b) => b.size - a.size);
    const next = { mem: window.base, io: ioWindow.base };
    for (const b of bars) {
      const w = b.io ? ioWindow : window;
      const from = b.io ? next.io : next.mem;
      const at = Math.ceil(from / b.size) * b.size;
      if (at + b.size > w.base + w.size) {
        throw new RangeError(
          `PCI BARs do not fit in the ${b.io ? "I/O" : "MMIO"} window of ${w.size} bytes`,
        );
      }
      const fn = this.#slots[b.slot]!;
      const reg = 0x10 + 4 * b.bar;
      const is64 = !b.io && (fn.configRead(reg, 4) & 0x6) === 0x4;
      fn.configWrite(reg, 4, at % 0x1_0000_0000);
      if (is64) fn.configWrite(reg + 4, 4, Math.floor(at / 0x1_0000_0000));
      if (b.io) next.io = at + b.size;
      else next.mem = at + b.size;
    }
    for (const slot of this.slots()) {
      const fn = this.#slots[slot]!;
      const decodesPorts = fn.findPort !== undefined;
      const bits = PCI_COMMAND_MEMORY | (decodesPorts ? PCI_COMMAND_IO : 0);
      fn.configWrite(PCI_COMMAND, 2, fn.configRead(PCI_COMMAND, 2) | bits);
    }
  }
}

function allOnes(size: AccessSize): number {
  return size === 4 ? 0xffffffff : size === 2 ? 0xffff : 0xff;
}
