/**
 * A bare-hands AHCI guest for the device tests: guest RAM, an {@linkcode AhciController} on PCI bus
 * 0 with its BAR assigned, MSI programmed, and helpers that lay out command headers, command
 * FISes and PRDTs in guest RAM exactly where a test wants them — good ones and hostile ones.
 *
 * Layout (per port p, `portArea(p)` = 0x10_0000 + p × 0x10_0000): command list at +0, FIS receive
 * area at +0x1000, command tables at +0x2000 + slot × 0x1000 (room for 248 PRDT entries), data
 * from {@linkcode DATA_BASE}.
 *
 * @module
 */

import { AhciController, type AhciControllerInit } from "../../src/devices/ahci.ts";
import {
  AHCI_PORT_BASE,
  AHCI_PORT_SIZE,
  HOST_CTL,
  HOST_IRQ_EN,
  PORT_CMD,
  PORT_CMD_FIS_RX,
  PORT_CMD_ISSUE,
  PORT_CMD_START,
  PORT_FIS_ADDR,
  PORT_FIS_ADDR_HI,
  PORT_IRQ_MASK,
  PORT_IRQ_STAT,
  PORT_LST_ADDR,
  PORT_LST_ADDR_HI,
  PORT_SCR_ACT,
  SATA_FIS_TYPE_REGISTER_H2D,
} from "../../src/ata/ahci_constants.ts";
import type { BlockNode } from "../../src/block/node.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import { RawNode } from "../../formats/raw.ts";
import { PciBus } from "../../src/virtio/bus.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import { PCI_COMMAND, PCI_COMMAND_MASTER } from "../../src/virtio/pci_regs.ts";

/** Guest RAM of the rig. */
export const RAM_BYTES = 64 * 1024 * 1024;
/** Where the firmware puts BARs. */
export const MMIO_WINDOW = { base: 0xc000_0000, size: 0x1000_0000 };
/** First byte of the data area tests use for buffers. */
export const DATA_BASE = 0x100_0000;
/** MSI data the rig programs. */
export const MSI_VECTOR = 0x41;
/** The PCI slot of the controller. */
export const AHCI_SLOT = 4;

/** Guest RAM of port `p`'s structures. */
export function portArea(p: number): number {
  return 0x10_0000 + p * 0x10_0000;
}
/** Command list of port `p`. */
export function clbOf(p: number): number {
  return portArea(p);
}
/** FIS receive area of port `p`. */
export function fbOf(p: number): number {
  return portArea(p) + 0x1000;
}
/** Command table of slot `slot` of port `p`. */
export function tableOf(p: number, slot: number): number {
  return portArea(p) + 0x2000 + slot * 0x1000;
}

/** A PRDT entry as a test writes it. */
export interface Prd {
  /** Guest address (DBA, DBAU). */
  readonly address: number;
  /** Bytes; the DBC field gets `bytes - 1` unless `rawDbc` is given. */
  readonly bytes: number;
  /** Write this DBC field verbatim (for odd counts). */
  readonly rawDbc?: number;
}

/** A Register H2D FIS. */
export interface H2d {
  readonly command: number;
  readonly lba?: number;
  readonly count?: number;
  readonly features?: number;
  readonly device?: number;
  readonly control?: number;
  /** The C bit (default true: a command). */
  readonly c?: boolean;
  /** FIS type (default 0x27). */
  readonly type?: number;
}

/** Options of {@linkcode AhciRig.command}. */
export interface CommandOptions {
  readonly write?: boolean;
  /** CFL in dwords (default 5). */
  readonly cfl?: number;
  /** PRDTL (default: the PRDs given). */
  readonly prdtl?: number;
  /** Command table address (default `tableOf(port, slot)`). */
  readonly table?: number;
  /** Set the ATAPI bit. */
  readonly atapi?: boolean;
}

/** Options of {@linkcode AhciRig.create}. */
export interface RigOptions {
  /** Disk bytes of each drive (default 4 MiB); ignored with `drives`. */
  readonly diskBytes?: number;
  /** Number of ports with a disk (default 1), each a RawNode over a MemoryFile. */
  readonly disks?: number;
  /** Ready-made drives (null = empty port). */
  readonly drives?: readonly (BlockNode | null)[];
  /** Program and enable MSI (default true); false leaves INTx. */
  readonly msi?: boolean;
  /** Extra controller options. */
  readonly init?: Partial<AhciControllerInit>;
}

/** The machine: RAM, bus, controller, disks, and the interrupts it raised. */
export class AhciRig {
  readonly mem: GuestMemory;
  readonly bus: PciBus;
  readonly ctrl: AhciController;
  readonly abar: number;
  /** The memory files behind the RawNode disks (null for given drives). */
  readonly files: (MemoryFile | null)[];
  readonly drives: readonly (BlockNode | null)[];
  /** MSI vectors delivered, in order. */
  readonly msis: number[] = [];
  /** The INTx line. */
  intx = false;
  /** INTx rising edges. */
  intxEdges = 0;

  private constructor(
    mem: GuestMemory,
    drives: readonly (BlockNode | null)[],
    files: (MemoryFile | null)[],
    init: Partial<AhciControllerInit>,
  ) {
    this.mem = mem;
    this.drives = drives;
    this.files = files;
    this.ctrl = new AhciController({
      drives,
      memory: mem,
      msi: (v) => this.msis.push(v),
      intx: (level) => {
        if (level && !this.intx) this.intxEdges++;
        this.intx = level;
      },
      ...init,
    });
    this.bus = new PciBus();
    this.bus.plug(this.ctrl, AHCI_SLOT);
    this.bus.assignBars(MMIO_WINDOW);
    this.abar = (this.bus.configRead(AHCI_SLOT, 0x24, 4) & ~0xf) >>> 0;
  }

  /** Builds the rig: disks filled with a byte pattern (byte i = i * 7 + disk), bus mastering on. */
  static async create(options: RigOptions = {}): Promise<AhciRig> {
    const mem = new GuestMemory([{ gpa: 0, size: RAM_BYTES }]);
    let drives: (BlockNode | null)[];
    const files: (MemoryFile | null)[] = [];
    if (options.drives !== undefined) {
      drives = [...options.drives];
      for (let i = 0; i < drives.length; i++) files.push(null);
    } else {
      drives = [];
      const bytes = options.diskBytes ?? 4 * 1024 * 1024;
      for (let d = 0; d < (options.disks ?? 1); d++) {
        const content = new Uint8Array(bytes);
        for (let i = 0; i < bytes; i++) content[i] = (i * 7 + d) & 0xff;
        const file = new MemoryFile(`disk${d}`, content);
        files.push(file);
        drives.push(await RawNode.open(file));
      }
    }
    const rig = new AhciRig(mem, drives, files, options.init ?? {});
    const bus = rig.bus;
    bus.configWrite(
      AHCI_SLOT,
      PCI_COMMAND,
      2,
      bus.configRead(AHCI_SLOT, PCI_COMMAND, 2) | PCI_COMMAND_MASTER,
    );
    if (options.msi ?? true) {
      bus.configWrite(AHCI_SLOT, 0x84, 4, 0xfee0_0000);
      bus.configWrite(AHCI_SLOT, 0x88, 4, 0);
      bus.configWrite(AHCI_SLOT, 0x8c, 2, MSI_VECTOR);
      bus.configWrite(AHCI_SLOT, 0x82, 2, 1);
    }
    return rig;
  }

  /** Reads the ABAR dword at `reg`. */
  reg(reg: number): number {
    return this.bus.mmioRead(this.abar + reg, 4) >>> 0;
  }

  /** Writes the ABAR dword at `reg`. */
  setReg(reg: number, value: number): void {
    this.bus.mmioWrite(this.abar + reg, 4, value >>> 0);
  }

  /** Reads port `p`'s register `reg`. */
  port(p: number, reg: number): number {
    return this.reg(AHCI_PORT_BASE + p * AHCI_PORT_SIZE + reg);
  }

  /** Writes port `p`'s register `reg`. */
  setPort(p: number, reg: number, value: number): void {
    this.setReg(AHCI_PORT_BASE + p * AHCI_PORT_SIZE + reg, value);
  }

  /** Points port `p` at its command list and FIS area, FRE, ST, every interrupt, GHC.IE. */
  startPort(p: number, options: { clb?: number; fb?: number } = {}): void {
    this.setPort(p, PORT_LST_ADDR, options.clb ?? clbOf(p));
    this.setPort(p, PORT_LST_ADDR_HI, 0);
    this.setPort(p, PORT_FIS_ADDR, options.fb ?? fbOf(p));
    this.setPort(p, PORT_FIS_ADDR_HI, 0);
    this.setPort(p, PORT_CMD, PORT_CMD_FIS_RX);
    this.setPort(p, PORT_IRQ_STAT, 0xffffffff);
    this.setPort(p, PORT_IRQ_MASK, 0xffffffff);
    this.setReg(HOST_CTL, this.reg(HOST_CTL) | HOST_IRQ_EN);
    this.setPort(p, PORT_CMD, PORT_CMD_FIS_RX | PORT_CMD_START);
  }

  /** Clears ST and starts again (after an error), acking PxIS and IS. */
  async restartPort(p: number): Promise<void> {
    this.setPort(p, PORT_CMD, PORT_CMD_FIS_RX);
    await this.ctrl.idle();
    this.setPort(p, PORT_IRQ_STAT, 0xffffffff);
    this.setReg(0x08, 1 << p);
    this.setPort(p, PORT_CMD, PORT_CMD_FIS_RX | PORT_CMD_START);
  }

  /** Writes slot `slot`'s command header, FIS and PRDT on port `p`. */
  command(p: number, slot: number, fis: H2d, prds: readonly Prd[], options: CommandOptions = {}) {
    const mem = this.mem;
    const table = options.table ?? tableOf(p, slot);
    const prdtl = options.prdtl ?? prds.length;
    const header = clbOf(p) + slot * 32;
    const dw0 = (options.cfl ?? 5) | (options.atapi ? 1 << 5 : 0) | (options.write ? 1 << 6 : 0) |
      (prdtl << 16);
    mem.setU32(header, dw0 >>> 0);
    mem.setU32(header + 4, 0);
    mem.setU32(header + 8, table % 0x1_0000_0000);
    mem.setU32(header + 12, Math.floor(table / 0x1_0000_0000));
    if (!mem.contains(table, 0x80)) return;
    mem.fill(table, 0x80, 0);
    mem.setU8(table, fis.type ?? SATA_FIS_TYPE_REGISTER_H2D);
    mem.setU8(table + 1, fis.c === false ? 0 : 0x80);
    mem.setU8(table + 2, fis.command);
    const features = fis.features ?? 0;
    mem.setU8(table + 3, features & 0xff);
    mem.setU8(table + 11, features >>> 8);
    let lba = fis.lba ?? 0;
    for (const at of [4, 5, 6, 8, 9, 10]) {
      mem.setU8(table + at, lba % 256);
      lba = Math.floor(lba / 256);
    }
    mem.setU8(table + 7, fis.device ?? 0x40);
    const count = fis.count ?? 0;
    mem.setU8(table + 12, count & 0xff);
    mem.setU8(table + 13, count >>> 8);
    mem.setU8(table + 15, fis.control ?? 0);
    for (const [i, prd] of prds.entries()) {
      const at = table + 0x80 + i * 16;
      if (!mem.contains(at, 16)) break;
      mem.setU32(at, prd.address % 0x1_0000_0000);
      mem.setU32(at + 4, Math.floor(prd.address / 0x1_0000_0000));
      mem.setU32(at + 8, 0);
      mem.setU32(at + 12, prd.rawDbc ?? prd.bytes - 1);
    }
  }

  /** NCQ: sets PxSACT then PxCI for `mask`. */
  issueQueued(p: number, mask: number): void {
    this.setPort(p, PORT_SCR_ACT, mask);
    this.setPort(p, PORT_CMD_ISSUE, mask);
  }

  /** Rings PxCI for `mask`. */
  issue(p: number, mask: number): void {
    this.setPort(p, PORT_CMD_ISSUE, mask);
  }

  /** Waits until the controller has no I/O in flight and no completion waiting. */
  async settle(): Promise<void> {
    await this.ctrl.idle();
  }

  /** The disk bytes `[offset, offset + length)` of disk `d` (a RawNode over a MemoryFile). */
  disk(d: number, offset: number, length: number): Uint8Array {
    return this.files[d]!.contents().subarray(offset, offset + length);
  }
}

/** A FIS of READ/WRITE FPDMA QUEUED for `tag`. */
export function fpdma(write: boolean, tag: number, lba: number, sectors: number): H2d {
  return {
    command: write ? 0x61 : 0x60,
    lba,
    features: sectors === 65536 ? 0 : sectors,
    count: tag << 3,
    device: 0x40,
  };
}

/** A FIS of READ/WRITE DMA EXT. */
export function dmaExt(write: boolean, lba: number, sectors: number): H2d {
  return { command: write ? 0x35 : 0x25, lba, count: sectors === 65536 ? 0 : sectors };
}
