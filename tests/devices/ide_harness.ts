/**
 * A single-thread rig around the PIIX IDE controller: guest RAM, bus 0 with the controller in slot
 * 1 (BARs assigned, I/O decoding on, as firmware leaves it), the two interrupt lines as booleans,
 * and the register-level steps a test plays the driver with: task-file loads, PIO blocks, PRD
 * tables, and settling the controller's block I/O.
 *
 * @module
 */

import { IdeController, type IdeControllerInit } from "../../src/devices/ide.ts";
import type { BlockNode } from "../../src/block/node.ts";
import { PciBus } from "../../src/virtio/bus.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";

/** Guest RAM of the rig. */
export const RIG_RAM = 8 * 1024 * 1024;
/** The MMIO window (unused by IDE, needed by assignBars). */
export const RIG_MMIO = { base: 0xc000_0000, size: 0x1000_0000 };
/** Slot of the controller. */
export const RIG_SLOT = 1;

/** Where a channel's registers are. */
export interface Channel {
  readonly cmd: number;
  readonly ctl: number;
}
/** Ports of the primary channel. */
export const PRI: Channel = { cmd: 0x1f0, ctl: 0x3f6 };
/** Ports of the secondary channel. */
export const SEC: Channel = { cmd: 0x170, ctl: 0x376 };

/** Task-file register offsets and bits the tests use (ATA names). */
export const REG = {
  data: 0,
  err: 1,
  feature: 1,
  nsect: 2,
  lbal: 3,
  lbam: 4,
  lbah: 5,
  device: 6,
  status: 7,
  cmd: 7,
};
export const BSY = 0x80;
export const DRDY = 0x40;
export const DSC = 0x10;
export const DRQ = 0x08;
export const ERR = 0x01;
export const ABRT = 0x04;
export const IDNF = 0x10;
export const UNC = 0x40;
export const NIEN = 0x02;
export const SRST = 0x04;
export const HOB = 0x80;

/** A controller on a bus, its RAM and its lines. */
export interface IdeRig {
  readonly mem: GuestMemory;
  readonly bus: PciBus<IdeController>;
  readonly ide: IdeController;
  /** Level of each channel's interrupt line. */
  readonly lines: [boolean, boolean];
  /** Rising edges per channel. */
  readonly raised: [number, number];
  /** Base port of the bus-master BAR. */
  readonly bm: number;
}

/** Options of {@linkcode makeRig}. */
export interface RigOptions {
  readonly ramBytes?: number;
  readonly writeCache?: boolean;
  readonly model?: string;
  readonly serial?: string;
  /** Turn on bus mastering (default true). */
  readonly busMaster?: boolean;
}

/** Builds the rig with `drives` ([primary master, primary slave, …]). */
export function makeRig(drives: readonly (BlockNode | null)[], options: RigOptions = {}): IdeRig {
  const mem = new GuestMemory([{ gpa: 0, size: options.ramBytes ?? RIG_RAM }]);
  const lines: [boolean, boolean] = [false, false];
  const raised: [number, number] = [0, 0];
  const init: IdeControllerInit = {
    drives,
    memory: mem,
    irq: (channel, level) => {
      if (level && !lines[channel]) raised[channel]++;
      lines[channel] = level;
    },
    ...(options.writeCache === undefined ? {} : { writeCache: options.writeCache }),
    ...(options.model === undefined ? {} : { model: options.model }),
    ...(options.serial === undefined ? {} : { serial: options.serial }),
  };
  const ide = new IdeController(init);
  const bus = new PciBus<IdeController>();
  bus.plug(ide, RIG_SLOT);
  bus.assignBars(RIG_MMIO);
  if (options.busMaster ?? true) {
    bus.configWrite(RIG_SLOT, 0x04, 2, bus.configRead(RIG_SLOT, 0x04, 2) | 0x4);
  }
  const bm = bus.configRead(RIG_SLOT, 0x20, 4) & 0xfff0;
  return { mem, bus, ide, lines, raised, bm };
}

/** Reads a byte port. */
export function inb(rig: IdeRig, port: number): number {
  return rig.bus.ioRead(port, 1);
}

/** Writes a byte port. */
export function outb(rig: IdeRig, port: number, value: number): void {
  rig.bus.ioWrite(port, 1, value);
}

/** Lets the controller's block I/O settle (the VMM's event loop between exits). */
export async function settle(rig: IdeRig): Promise<void> {
  await rig.ide.idle();
}

/** What a test command loads into the task file. */
export interface TaskFile {
  readonly lba?: number;
  readonly count?: number;
  readonly feature?: number;
  /** Load the HOB bytes too (an LBA48 command). */
  readonly ext?: boolean;
  readonly slave?: boolean;
  /** Device register bits 0..3 and LBA bit as given (default LBA addressing). */
  readonly device?: number;
}

/** Loads the task file on `ch` and writes `command`. */
export function issue(rig: IdeRig, command: number, tf: TaskFile = {}, ch: Channel = PRI): void {
  const lba = tf.lba ?? 0;
  const count = tf.count ?? 1;
  if (tf.ext === true) {
    const hi = Math.floor(lba / 0x100_0000);
    outb(rig, ch.cmd + REG.feature, 0);
    outb(rig, ch.cmd + REG.nsect, (count >>> 8) & 0xff);
    outb(rig, ch.cmd + REG.lbal, hi & 0xff);
    outb(rig, ch.cmd + REG.lbam, (hi >>> 8) & 0xff);
    outb(rig, ch.cmd + REG.lbah, (hi >>> 16) & 0xff);
  }
  outb(rig, ch.cmd + REG.feature, tf.feature ?? 0);
  outb(rig, ch.cmd + REG.nsect, count & 0xff);
  outb(rig, ch.cmd + REG.lbal, lba & 0xff);
  outb(rig, ch.cmd + REG.lbam, (lba >>> 8) & 0xff);
  outb(rig, ch.cmd + REG.lbah, (lba >>> 16) & 0xff);
  const device = tf.device ??
    (0x40 | (tf.ext === true ? 0 : Math.floor(lba / 0x100_0000) & 0x0f));
  outb(rig, ch.cmd + REG.device, 0xa0 | device | (tf.slave === true ? 0x10 : 0));
  outb(rig, ch.cmd + REG.cmd, command);
}

/** Reads `words` 16-bit words from the data port as bytes. */
export function readWords(rig: IdeRig, words = 256, ch: Channel = PRI): Uint8Array {
  const out = new Uint8Array(words * 2);
  for (let i = 0; i < words; i++) {
    const w = rig.bus.ioRead(ch.cmd, 2);
    out[2 * i] = w & 0xff;
    out[2 * i + 1] = w >>> 8;
  }
  return out;
}

/** Writes `bytes` (an even count) to the data port, 16 bits at a time. */
export function writeWords(rig: IdeRig, bytes: Uint8Array, ch: Channel = PRI): void {
  for (let i = 0; i < bytes.length; i += 2) {
    rig.bus.ioWrite(ch.cmd, 2, bytes[i]! | (bytes[i + 1]! << 8));
  }
}

/** One PRD entry: address, byte count field (0 = 64 KiB), EOT. */
export type Prd = readonly [address: number, count: number, eot: boolean];

/** Writes a PRD table at `table`. */
export function writePrd(rig: IdeRig, table: number, entries: readonly Prd[]): void {
  entries.forEach(([address, count, eot], i) => {
    rig.mem.setU32(table + 8 * i, address >>> 0);
    rig.mem.setU16(table + 8 * i + 4, count & 0xffff);
    rig.mem.setU16(table + 8 * i + 6, eot ? 0x8000 : 0);
  });
}

/** PRD entries covering `[address, address + bytes)` in pieces of at most 64 KiB. */
export function prdFor(address: number, bytes: number, piece = 0x10000): Prd[] {
  const entries: Prd[] = [];
  for (let at = 0; at < bytes; at += piece) {
    const n = Math.min(piece, bytes - at);
    entries.push([address + at, n & 0xffff, at + n >= bytes]);
  }
  return entries;
}

/** Programs the primary bus master (table, direction) without starting it. */
export function bmSetup(rig: IdeRig, table: number, toMemory: boolean, channel = 0): void {
  rig.bus.ioWrite(rig.bm + 8 * channel + 4, 4, table);
  outb(rig, rig.bm + 8 * channel, toMemory ? 0x08 : 0);
}

/** Starts the bus master of `channel` (keeping the direction). */
export function bmStart(rig: IdeRig, channel = 0): void {
  const cmd = inb(rig, rig.bm + 8 * channel);
  outb(rig, rig.bm + 8 * channel, cmd | 0x01);
}

/** Stops the bus master and clears its INTR and ERR bits; returns the status before. */
export function bmStop(rig: IdeRig, channel = 0): number {
  const status = inb(rig, rig.bm + 8 * channel + 2);
  outb(rig, rig.bm + 8 * channel, inb(rig, rig.bm + 8 * channel) & ~0x01);
  outb(rig, rig.bm + 8 * channel + 2, status | 0x06);
  return status;
}

/** A byte pattern: `seed` mixed with the index, so misplaced sectors show. */
export function pattern(bytes: number, seed: number): Uint8Array {
  const out = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) out[i] = (i * 31 + seed * 7 + (i >>> 9)) & 0xff;
  return out;
}
