/**
 * The AHCI HBA as the guest's driver knows it (AHCI 1.3.1, with the names of Linux's `ahci.h`): the
 * register map, register access (every access a VM exit, counted), the port's structures in guest
 * RAM, and the bring-up steps of libahci — HBA reset, port start, COMRESET, MSI — plus what
 * IDENTIFY DEVICE data says. The driver never imports the device, so it keeps its own copy of the
 * numbers.
 *
 * @module
 */

import type { GuestBus } from "../virtio/bus.ts";
import { PCI_COMMAND, PCI_COMMAND_MASTER } from "../virtio/pci_regs.ts";
import { type PciFunctionInfo, setIntxDisabled } from "./pci_probe.ts";
import type { GuestPlatform } from "./virtio_driver.ts";

/** PCI class of a SATA controller (base 0x01, subclass 0x06). */
export const PCI_CLASS_STORAGE_SATA = 0x0106;
/** Programming interface of an AHCI 1.0 HBA. */
export const PCI_CLASS_PROG_AHCI = 0x01;
/** The BAR holding the HBA's registers (ABAR). */
export const AHCI_ABAR = 5;
/** Capability id of MSI. */
export const PCI_CAP_ID_MSI = 0x05;
/** MSI message control, at +2. */
export const PCI_MSI_FLAGS = 2;
/** Message control: MSI enable. */
export const PCI_MSI_FLAGS_ENABLE = 0x0001;
/** Message control: Multiple Message Enable (bits 4..6). */
export const PCI_MSI_FLAGS_QSIZE = 0x0070;
/** Message control: 64-bit address capable. */
export const PCI_MSI_FLAGS_64BIT = 0x0080;
/** MSI message address, low dword. */
export const PCI_MSI_ADDRESS_LO = 4;
/** MSI message address, high dword (64-bit capability). */
export const PCI_MSI_ADDRESS_HI = 8;
/** MSI message data of a 32-bit capability. */
export const PCI_MSI_DATA_32 = 8;
/** MSI message data of a 64-bit capability. */
export const PCI_MSI_DATA_64 = 12;
/** Local APIC 0, fixed delivery: where an x86 MSI goes. */
export const MSI_ADDRESS = 0xfee0_0000;

/** CAP: HBA capabilities. */
export const HOST_CAP = 0x00;
/** GHC: global HBA control. */
export const HOST_CTL = 0x04;
/** IS: interrupt status, a bit per port (write 1 to clear). */
export const HOST_IRQ_STAT = 0x08;
/** PI: ports implemented. */
export const HOST_PORTS_IMPL = 0x0c;
/** CAP.SNCQ: native command queuing. */
export const HOST_CAP_NCQ = 1 << 30;
/** GHC.HR: HBA reset. */
export const HOST_RESET = 1 << 0;
/** GHC.IE: interrupt enable. */
export const HOST_IRQ_EN = 1 << 1;
/** GHC.AE: AHCI enable. */
export const HOST_AHCI_EN = 0x8000_0000;

/** Offset of port 0's registers. */
export const PORT_BASE = 0x100;
/** Bytes between two ports' registers. */
export const PORT_SIZE = 0x80;
/** PxCLB: command list base. */
export const PORT_LST_ADDR = 0x00;
/** PxCLBU. */
export const PORT_LST_ADDR_HI = 0x04;
/** PxFB: FIS receive area base. */
export const PORT_FIS_ADDR = 0x08;
/** PxFBU. */
export const PORT_FIS_ADDR_HI = 0x0c;
/** PxIS: port interrupt status (write 1 to clear). */
export const PORT_IRQ_STAT = 0x10;
/** PxIE: port interrupt enable. */
export const PORT_IRQ_MASK = 0x14;
/** PxCMD: command and status. */
export const PORT_CMD = 0x18;
/** PxTFD: task file data (status 7:0, error 15:8). */
export const PORT_TFDATA = 0x20;
/** PxSIG: device signature. */
export const PORT_SIG = 0x24;
/** PxSSTS: SStatus. */
export const PORT_SCR_STAT = 0x28;
/** PxSCTL: SControl. */
export const PORT_SCR_CTL = 0x2c;
/** PxSERR: SError (write 1 to clear). */
export const PORT_SCR_ERR = 0x30;
/** PxSACT: NCQ tags outstanding (write 1 to set). */
export const PORT_SCR_ACT = 0x34;
/** PxCI: command issue, the doorbell (write 1 to set). */
export const PORT_CMD_ISSUE = 0x38;

/** PxCMD.ST. */
export const PORT_CMD_START = 1 << 0;
/** PxCMD.SUD. */
export const PORT_CMD_SPIN_UP = 1 << 1;
/** PxCMD.POD. */
export const PORT_CMD_POWER_ON = 1 << 2;
/** PxCMD.FRE. */
export const PORT_CMD_FIS_RX = 1 << 4;
/** PxCMD.FR. */
export const PORT_CMD_FIS_ON = 1 << 14;
/** PxCMD.CR. */
export const PORT_CMD_LIST_ON = 1 << 15;
/** PxCMD.ICC = active. */
export const PORT_CMD_ICC_ACTIVE = 1 << 28;

/** PxIS.DHRS. */
export const PORT_IRQ_D2H_REG_FIS = 1 << 0;
/** PxIS.PSS. */
export const PORT_IRQ_PIOS_FIS = 1 << 1;
/** PxIS.SDBS. */
export const PORT_IRQ_SDB_FIS = 1 << 3;
/** PxIS.OFS. */
export const PORT_IRQ_OVERFLOW = 1 << 24;
/** PxIS.IFS. */
export const PORT_IRQ_IF_ERR = 1 << 27;
/** PxIS.HBDS. */
export const PORT_IRQ_HBUS_DATA_ERR = 1 << 28;
/** PxIS.HBFS. */
export const PORT_IRQ_HBUS_ERR = 1 << 29;
/** PxIS.TFES. */
export const PORT_IRQ_TF_ERR = 1 << 30;
/** Causes that stop the port (libahci's PORT_IRQ_FREEZE | PORT_IRQ_ERROR, as far as we enable). */
export const PORT_IRQ_FATAL = PORT_IRQ_TF_ERR | PORT_IRQ_HBUS_ERR | PORT_IRQ_HBUS_DATA_ERR |
  PORT_IRQ_IF_ERR;
/** What the driver enables in PxIE (libahci's DEF_PORT_IRQ, less hot-plug). */
export const PORT_IRQ_ENABLED = PORT_IRQ_D2H_REG_FIS | PORT_IRQ_PIOS_FIS | PORT_IRQ_SDB_FIS |
  PORT_IRQ_OVERFLOW | PORT_IRQ_FATAL;

/** SStatus.DET. */
export const SATA_SSTS_DET_MASK = 0xf;
/** SStatus.DET: device present, Phy communication established. */
export const SATA_SSTS_DET_PHY_UP = 0x3;
/** SControl.DET = 1: COMRESET. */
export const SATA_SCTL_DET_COMRESET = 0x1;
/** PxSIG of an ATA disk. */
export const SATA_SIGNATURE_DISK = 0x0000_0101;

/** Bytes of a command header. */
export const CMD_HEADER_SIZE = 32;
/** Bytes of a command list (32 headers). */
export const CMD_LIST_SIZE = 32 * CMD_HEADER_SIZE;
/** Bytes of a FIS receive area. */
export const RX_FIS_SIZE = 256;
/** Offset of the D2H Register FIS in the FIS receive area. */
export const RX_FIS_D2H_REG = 0x40;
/** Offset of the PRDT in a command table. */
export const CMD_TBL_PRDT = 0x80;
/** Bytes of a PRDT entry. */
export const PRDT_ENTRY_SIZE = 16;
/** Largest byte count of one PRDT entry. */
export const PRDT_MAX_BYTES = 4 * 1024 * 1024;
/** Command header W bit. */
export const CMD_WRITE = 1 << 6;
/** Register FIS, host to device. */
export const FIS_TYPE_REG_H2D = 0x27;
/** Register H2D byte 1, C bit: a command. */
export const FIS_C = 0x80;

/** ATA status BSY. */
export const ATA_BUSY = 0x80;
/** ATA status DRQ. */
export const ATA_DRQ = 0x08;
/** ATA status ERR. */
export const ATA_ERR = 0x01;
/** Device register: LBA mode. */
export const ATA_LBA = 0x40;
/** DATA SET MANAGEMENT. */
export const ATA_CMD_DSM = 0x06;
/** READ DMA EXT. */
export const ATA_CMD_READ_EXT = 0x25;
/** READ LOG EXT. */
export const ATA_CMD_READ_LOG_EXT = 0x2f;
/** WRITE DMA EXT. */
export const ATA_CMD_WRITE_EXT = 0x35;
/** READ FPDMA QUEUED. */
export const ATA_CMD_FPDMA_READ = 0x60;
/** WRITE FPDMA QUEUED. */
export const ATA_CMD_FPDMA_WRITE = 0x61;
/** FLUSH CACHE EXT. */
export const ATA_CMD_FLUSH_EXT = 0xea;
/** IDENTIFY DEVICE. */
export const ATA_CMD_ID_ATA = 0xec;
/** DATA SET MANAGEMENT features bit 0: TRIM. */
export const ATA_DSM_TRIM = 0x01;
/** Log address of the NCQ Command Error log. */
export const ATA_LOG_SATA_NCQ = 0x10;
/** NCQ error log byte 0 bit 7: the failed command was not queued. */
export const ATA_LOG_NCQ_NQ = 0x80;
/** Bytes of a sector. */
export const SECTOR = 512;
/** Largest sector count of READ/WRITE (FPDMA or DMA EXT): 16 bits, 0 meaning 65536. */
export const MAX_SECTORS = 65536;
/** TRIM: one 512-byte block of 64 range entries, each up to 65535 sectors. */
export const DSM_RANGES = 64;
/** Largest sector count of one TRIM range entry. */
export const DSM_RANGE_SECTORS = 0xffff;

/** How long bring-up and recovery wait for a register to settle (libahci: 500 ms to 1 s). */
export const SETTLE_MS = 1000;
/** 2^32. */
export const TWO_32 = 0x1_0000_0000;

/** Why the driver gave up on the HBA or a port. */
export type AhciDriverErrorKind =
  | "not-ahci" // the function is not an AHCI HBA (class 01 06 01) with an ABAR
  | "no-port" // no implemented port with a disk, or the one asked for has none
  | "reset-timeout" // GHC.HR, PxCMD.CR/FR or the link did not settle
  | "identify-failed" // IDENTIFY DEVICE failed or described no usable disk
  | "request-timeout"; // requests stopped completing

/** The HBA or a port is unusable; `slot` says which PCI function. */
export class AhciDriverError extends Error {
  /** Always `AhciDriverError`. */
  override readonly name = "AhciDriverError";
  /** What went wrong. */
  readonly kind: AhciDriverErrorKind;
  /** PCI slot of the HBA. */
  readonly slot: number;

  /**
   * Makes the error.
   *
   * @param kind what went wrong
   * @param slot the HBA's PCI slot
   * @param detail the rest of the message
   */
  constructor(kind: AhciDriverErrorKind, slot: number, detail: string) {
    super(`AHCI HBA in slot ${slot}: ${detail}`);
    this.kind = kind;
    this.slot = slot;
  }
}

/** What IDENTIFY DEVICE said. */
export interface AhciIdentity {
  /** Capacity in 512-byte sectors (LBA48 words, else LBA28). */
  readonly sectors: number;
  /** Model number (words 27..46). */
  readonly model: string;
  /** Serial number (words 10..19). */
  readonly serial: string;
  /** Firmware revision (words 23..26). */
  readonly firmware: string;
  /** Word 76 bit 8. */
  readonly ncq: boolean;
  /** Word 75 + 1 (1 without NCQ). */
  readonly queueDepth: number;
  /** Word 169 bit 0. */
  readonly trim: boolean;
  /** Word 85 bit 5. */
  readonly writeCache: boolean;
}

// ---- register access -------------------------------------------------------------------------

/** The HBA's generic host control registers, every access an exit. */
export class HostRegisters {
  readonly #bus: GuestBus;
  /** Guest-physical address of the ABAR. */
  readonly abar: number;
  /** PCI slot of the HBA. */
  readonly slot: number;
  /** Where the accesses are counted. */
  readonly counter: { registerReads: number; registerWrites: number };

  /** Registers at `abar` on `bus`, accesses counted in `counter`. */
  constructor(
    bus: GuestBus,
    abar: number,
    slot: number,
    counter: { registerReads: number; registerWrites: number },
  ) {
    this.#bus = bus;
    this.abar = abar;
    this.slot = slot;
    this.counter = counter;
  }

  /** Reads the dword register at ABAR + `reg` (an exit). */
  read(reg: number): number {
    this.counter.registerReads++;
    return this.#bus.mmioRead(this.abar + reg, 4) >>> 0;
  }

  /** Writes the dword register at ABAR + `reg` (an exit). */
  write(reg: number, value: number): void {
    this.counter.registerWrites++;
    this.#bus.mmioWrite(this.abar + reg, 4, value >>> 0);
  }
}

/** One port's registers. */
export class PortRegisters {
  /** The HBA's registers. */
  readonly host: HostRegisters;
  /** Port number. */
  readonly port: number;
  /** PCI slot of the HBA. */
  readonly slot: number;
  readonly #base: number;

  /** Port `port`'s registers of `host`. */
  constructor(host: HostRegisters, port: number) {
    this.host = host;
    this.port = port;
    this.slot = host.slot;
    this.#base = PORT_BASE + port * PORT_SIZE;
  }

  /** Reads port register `reg` (an exit). */
  read(reg: number): number {
    return this.host.read(this.#base + reg);
  }

  /** Writes port register `reg` (an exit). */
  write(reg: number, value: number): void {
    this.host.write(this.#base + reg, value);
  }
}

// ---- guest memory of a port ----------------------------------------------------------------------

/**
 * The port's structures in guest RAM: command list, FIS receive area, one command table per slot
 * (CFIS, PRDT, then a 512-byte TRIM range block), one data buffer per slot, and a 512-byte buffer
 * for IDENTIFY and log pages. `*At` fields are offsets into the RAM buffer, for writes without
 * translation on the hot path.
 */
export class PortMemory {
  /** Guest address of the command list. */
  readonly commandList: number;
  /** Guest address of the FIS receive area. */
  readonly fis: number;
  /** RAM-buffer offset of the FIS receive area. */
  readonly fisAt: number;
  /** Guest address of the 512-byte buffer for IDENTIFY and log pages. */
  readonly internal: number;
  /** RAM-buffer offsets of the command headers, by slot. */
  readonly headerAt: number[];
  /** RAM-buffer offsets of the command tables, by slot. */
  readonly tableAt: number[];
  /** RAM-buffer offsets of the TRIM range blocks, by slot. */
  readonly dsmAt: number[];
  readonly #tables: number;
  readonly #tableStride: number;
  readonly #dataBase: number;
  readonly #dataStride: number;
  readonly #dsmOffset: number;
  readonly #allocations: number[];
  readonly #platform: GuestPlatform;
  readonly #ram: DataView;

  private constructor(
    platform: GuestPlatform,
    layout: {
      commandList: number;
      fis: number;
      internal: number;
      tables: number;
      tableStride: number;
      dsmOffset: number;
      data: number;
      dataStride: number;
      slots: number;
    },
  ) {
    const mem = platform.mem;
    this.#platform = platform;
    this.#ram = new DataView(mem.buffer);
    this.commandList = layout.commandList;
    this.fis = layout.fis;
    this.fisAt = mem.translate(layout.fis, RX_FIS_SIZE);
    this.internal = layout.internal;
    this.#tables = layout.tables;
    this.#tableStride = layout.tableStride;
    this.#dsmOffset = layout.dsmOffset;
    this.#dataBase = layout.data;
    this.#dataStride = layout.dataStride;
    this.#allocations = [
      layout.commandList,
      layout.fis,
      layout.internal,
      layout.tables,
      layout.data,
    ];
    this.headerAt = [];
    this.tableAt = [];
    this.dsmAt = [];
    for (let i = 0; i < layout.slots; i++) {
      this.headerAt.push(mem.translate(layout.commandList + i * CMD_HEADER_SIZE, CMD_HEADER_SIZE));
      this.tableAt.push(mem.translate(this.table(i), layout.tableStride));
      this.dsmAt.push(mem.translate(this.dsm(i), SECTOR));
    }
  }

  /** Allocates everything for `slots` slots of `maxTransfer` bytes each. */
  static allocate(platform: GuestPlatform, slots: number, maxTransfer: number): PortMemory {
    const alloc = platform.alloc;
    const entries = Math.ceil(maxTransfer / PRDT_MAX_BYTES);
    const dsmOffset = CMD_TBL_PRDT + entries * PRDT_ENTRY_SIZE;
    const tableStride = Math.ceil((dsmOffset + SECTOR) / 128) * 128;
    const dataAlign = maxTransfer >= 4096 ? 4096 : SECTOR;
    const dataStride = Math.ceil(maxTransfer / dataAlign) * dataAlign;
    const done: number[] = [];
    try {
      const take = (size: number, align: number) => {
        const gpa = alloc.alloc(size, align);
        done.push(gpa);
        return gpa;
      };
      return new PortMemory(platform, {
        commandList: take(CMD_LIST_SIZE, 1024),
        fis: take(RX_FIS_SIZE, 256),
        internal: take(SECTOR, SECTOR),
        tables: take(tableStride * slots, 128),
        tableStride,
        dsmOffset,
        data: take(dataStride * slots, dataAlign),
        dataStride,
        slots,
      });
    } catch (error) {
      for (const gpa of done) alloc.free(gpa);
      throw error;
    }
  }

  /**
   * Writes slot `index`'s command header (CFL 5, W, PRDTL) and the PRDT entries covering `bytes`
   * at guest address `address` (4 MiB per entry at most).
   */
  writeHeader(index: number, write: boolean, address: number, bytes: number): void {
    const ram = this.#ram;
    const table = this.tableAt[index]!;
    let entries = 0;
    for (let done = 0; done < bytes; done += PRDT_MAX_BYTES, entries++) {
      const n = Math.min(PRDT_MAX_BYTES, bytes - done);
      const at = table + CMD_TBL_PRDT + entries * PRDT_ENTRY_SIZE;
      const gpa = address + done;
      ram.setUint32(at, gpa % TWO_32, true);
      ram.setUint32(at + 4, Math.floor(gpa / TWO_32), true);
      ram.setUint32(at + 8, 0, true);
      ram.setUint32(at + 12, n - 1, true); // DBC: bytes minus one
    }
    const header = this.headerAt[index]!;
    ram.setUint32(header, 5 | (write ? CMD_WRITE : 0) | (entries << 16), true);
    ram.setUint32(header + 4, 0, true); // PRDBC
    const tableGpa = this.table(index);
    ram.setUint32(header + 8, tableGpa % TWO_32, true);
    ram.setUint32(header + 12, Math.floor(tableGpa / TWO_32), true);
  }

  /** Guest address of slot `i`'s command table. */
  table(i: number): number {
    return this.#tables + i * this.#tableStride;
  }

  /** Guest address of slot `i`'s TRIM range block. */
  dsm(i: number): number {
    return this.table(i) + this.#dsmOffset;
  }

  /** Guest address of slot `i`'s data buffer. */
  data(i: number): number {
    return this.#dataBase + i * this.#dataStride;
  }

  /** Gives everything back to the guest allocator. */
  free(): void {
    for (const gpa of this.#allocations) this.#platform.alloc.free(gpa);
    this.#allocations.length = 0;
  }
}

// ---- helpers ---------------------------------------------------------------------------------------

/** Zeroes the 20 bytes of a Register H2D FIS at buffer offset `at`. */
export function clearFis(ram: DataView, at: number): void {
  for (let i = 0; i < 20; i += 4) ram.setUint32(at + i, 0, true);
}

/** LBA bytes 7:0, 15:8, 23:16 at FIS +4..6 and 31:24, 39:32, 47:40 at +8..10. */
export function setLba(ram: DataView, fis: number, lba: number): void {
  let rest = lba;
  for (const at of [4, 5, 6, 8, 9, 10]) {
    ram.setUint8(fis + at, rest % 256);
    rest = Math.floor(rest / 256);
  }
}

/** `n` as unsigned hexadecimal, for messages. */
export function hex(n: number): string {
  return (n >>> 0).toString(16);
}

/**
 * Polls `done` until it holds: between polls the guest idles (the device runs; in a Worker, a
 * bounded halt). After `ms` it calls `timedOut` (which throws, or returns to give up quietly).
 */
export async function settle(
  platform: GuestPlatform,
  done: () => boolean,
  timedOut: () => void,
  ms = SETTLE_MS,
): Promise<void> {
  const deadline = performance.now() + ms;
  for (;;) {
    if (done()) return;
    if (performance.now() > deadline) return timedOut();
    const idle = platform.idle();
    if (idle instanceof Promise) await idle;
    else await Promise.resolve();
  }
}

/**
 * libahci's `ahci_reset_controller`: GHC.AE first (some HBAs need it), then, when `reset`, GHC.HR,
 * which clears itself once the HBA has reset.
 *
 * @throws {AhciDriverError} when HR stays set
 */
export async function resetHba(
  platform: GuestPlatform,
  host: HostRegisters,
  reset: boolean,
): Promise<void> {
  host.write(HOST_CTL, host.read(HOST_CTL) | HOST_AHCI_EN);
  if (!reset) return;
  host.write(HOST_CTL, HOST_AHCI_EN | HOST_RESET);
  await settle(platform, () => (host.read(HOST_CTL) & HOST_RESET) === 0, () => {
    throw new AhciDriverError("reset-timeout", host.slot, "GHC.HR did not clear");
  });
  host.write(HOST_CTL, HOST_AHCI_EN);
}

/** The port to drive: the one asked for, else the first implemented port with a disk's signature. */
export function choosePort(host: HostRegisters, pi: number, wanted: number | undefined): number {
  const hasDisk = (port: number) => {
    const hw = new PortRegisters(host, port);
    const det = hw.read(PORT_SCR_STAT) & SATA_SSTS_DET_MASK;
    return det === SATA_SSTS_DET_PHY_UP && hw.read(PORT_SIG) === SATA_SIGNATURE_DISK;
  };
  if (wanted !== undefined) {
    if (!Number.isInteger(wanted) || wanted < 0 || wanted > 31 || ((pi >>> wanted) & 1) === 0) {
      throw new AhciDriverError("no-port", host.slot, `port ${wanted} is not implemented`);
    }
    return wanted;
  }
  for (let port = 0; port < 32; port++) {
    if (((pi >>> port) & 1) !== 0 && hasDisk(port)) return port;
  }
  throw new AhciDriverError("no-port", host.slot, "no implemented port has a disk");
}

/**
 * libahci's `ahci_start_port` for a stopped port: engine off, command list and FIS area in, FRE,
 * errors cleared, the link checked (COMRESET when down), the device ready, PxIE.
 */
export async function startPort(
  platform: GuestPlatform,
  hw: PortRegisters,
  memory: PortMemory,
): Promise<void> {
  const slot = hw.slot;
  const fail = (what: string) => () => {
    throw new AhciDriverError("reset-timeout", slot, `port ${hw.port}: ${what}`);
  };
  hw.write(PORT_CMD, hw.read(PORT_CMD) & ~PORT_CMD_START);
  await settle(platform, () => (hw.read(PORT_CMD) & PORT_CMD_LIST_ON) === 0, fail("CR stays set"));
  hw.write(PORT_CMD, hw.read(PORT_CMD) & ~PORT_CMD_FIS_RX);
  await settle(platform, () => (hw.read(PORT_CMD) & PORT_CMD_FIS_ON) === 0, fail("FR stays set"));
  hw.write(PORT_LST_ADDR, memory.commandList % TWO_32);
  hw.write(PORT_LST_ADDR_HI, Math.floor(memory.commandList / TWO_32));
  hw.write(PORT_FIS_ADDR, memory.fis % TWO_32);
  hw.write(PORT_FIS_ADDR_HI, Math.floor(memory.fis / TWO_32));
  hw.write(
    PORT_CMD,
    hw.read(PORT_CMD) | PORT_CMD_SPIN_UP | PORT_CMD_POWER_ON | PORT_CMD_ICC_ACTIVE |
      PORT_CMD_FIS_RX,
  );
  hw.write(PORT_SCR_ERR, 0xffffffff);
  if ((hw.read(PORT_SCR_STAT) & SATA_SSTS_DET_MASK) !== SATA_SSTS_DET_PHY_UP) {
    await comReset(platform, hw);
  }
  await settle(
    platform,
    () => (hw.read(PORT_TFDATA) & (ATA_BUSY | ATA_DRQ)) === 0,
    fail("the device stays busy"),
  );
  hw.write(PORT_SCR_ERR, 0xffffffff);
  hw.write(PORT_IRQ_STAT, 0xffffffff);
  hw.host.write(HOST_IRQ_STAT, 1 << hw.port);
  hw.write(PORT_IRQ_MASK, PORT_IRQ_ENABLED);
}

/** COMRESET through PxSCTL.DET, then wait for the link and the device (libata's hardreset). */
export async function comReset(platform: GuestPlatform, hw: PortRegisters): Promise<void> {
  const sctl = hw.read(PORT_SCR_CTL) & ~0xf;
  hw.write(PORT_SCR_CTL, sctl | SATA_SCTL_DET_COMRESET);
  hw.write(PORT_SCR_CTL, sctl);
  await settle(
    platform,
    () =>
      (hw.read(PORT_SCR_STAT) & SATA_SSTS_DET_MASK) === SATA_SSTS_DET_PHY_UP &&
      (hw.read(PORT_TFDATA) & ATA_BUSY) === 0,
    () => {
      throw new AhciDriverError(
        "reset-timeout",
        hw.slot,
        `port ${hw.port}: link down after COMRESET`,
      );
    },
  );
  hw.write(PORT_SCR_ERR, 0xffffffff);
}

/**
 * The ABAR's guest-physical address of an AHCI function (class 01 06, prog-if 01).
 *
 * @throws {AhciDriverError} when the function is not AHCI or BAR5 is not an assigned memory BAR
 */
export function abarOf(fn: PciFunctionInfo): number {
  const abar = fn.bars[AHCI_ABAR];
  if (fn.classCode !== PCI_CLASS_STORAGE_SATA || fn.progIf !== PCI_CLASS_PROG_AHCI) {
    throw new AhciDriverError(
      "not-ahci",
      fn.slot,
      `class 0x${fn.classCode.toString(16)} prog-if 0x${fn.progIf.toString(16)} is not AHCI`,
    );
  }
  if (abar === null || abar === undefined || abar.kind === "io" || abar.address === 0) {
    throw new AhciDriverError("not-ahci", fn.slot, "BAR5 (ABAR) is not an assigned memory BAR");
  }
  return abar.address;
}

/**
 * Routes the HBA's interrupt to `handler`: MSI with a vector of its own (INTx Disable set), or,
 * with `intx` or when no vector is free, the shared INTx line (INTx Disable clear). `release`
 * undoes it.
 */
export function setupInterrupts(
  platform: GuestPlatform,
  fn: PciFunctionInfo,
  handler: () => boolean,
  intx: boolean,
): { mode: "msi" | "intx"; release: () => void } {
  const bus = platform.bus;
  if (intx) {
    const remove = platform.interrupts.addIntxHandler(handler);
    setIntxDisabled(bus, fn.slot, false);
    return { mode: "intx", release: remove };
  }
  let vector: number;
  try {
    vector = platform.interrupts.allocateVector(handler);
  } catch (error) {
    // No vector left: share the INTx line, as Linux falls back from MSI.
    if (!(error instanceof RangeError)) throw error;
    return setupInterrupts(platform, fn, handler, true);
  }
  enableMsi(bus, fn.slot, fn, vector);
  setIntxDisabled(bus, fn.slot, true);
  return {
    mode: "msi",
    release: () => {
      disableMsi(bus, fn.slot, fn);
      platform.interrupts.freeVector(vector);
    },
  };
}

/** Programs the MSI capability: local APIC 0, `vector`, one message; enables it. */
export function enableMsi(bus: GuestBus, slot: number, fn: PciFunctionInfo, vector: number): void {
  const cap = fn.capabilities.find((c) => c.id === PCI_CAP_ID_MSI)!.offset;
  const flags = bus.configRead(slot, cap + PCI_MSI_FLAGS, 2) & 0xffff;
  const is64 = (flags & PCI_MSI_FLAGS_64BIT) !== 0;
  bus.configWrite(slot, cap + PCI_MSI_ADDRESS_LO, 4, MSI_ADDRESS);
  if (is64) bus.configWrite(slot, cap + PCI_MSI_ADDRESS_HI, 4, 0);
  bus.configWrite(slot, cap + (is64 ? PCI_MSI_DATA_64 : PCI_MSI_DATA_32), 2, vector);
  bus.configWrite(
    slot,
    cap + PCI_MSI_FLAGS,
    2,
    (flags & ~PCI_MSI_FLAGS_QSIZE) | PCI_MSI_FLAGS_ENABLE,
  );
  // MSI is a memory write of the device: bus mastering must be on (enableFunction set it).
  const command = bus.configRead(slot, PCI_COMMAND, 2);
  if ((command & PCI_COMMAND_MASTER) === 0) {
    bus.configWrite(slot, PCI_COMMAND, 2, command | PCI_COMMAND_MASTER);
  }
}

/** Turns the MSI capability off again. */
export function disableMsi(bus: GuestBus, slot: number, fn: PciFunctionInfo): void {
  const cap = fn.capabilities.find((c) => c.id === PCI_CAP_ID_MSI)?.offset;
  if (cap === undefined) return;
  const flags = bus.configRead(slot, cap + PCI_MSI_FLAGS, 2) & 0xffff;
  bus.configWrite(slot, cap + PCI_MSI_FLAGS, 2, flags & ~PCI_MSI_FLAGS_ENABLE);
}

/** What IDENTIFY DEVICE data says (ATA8-ACS table 22). */
export function parseIdentify(data: Uint8Array): AhciIdentity {
  const view = new DataView(data.buffer, data.byteOffset, 512);
  const word = (w: number) => view.getUint16(w * 2, true);
  const text = (w: number, length: number) => {
    let s = "";
    for (let i = 0; i < length; i++) s += String.fromCharCode(data[w * 2 + (i ^ 1)]!);
    return s.trim();
  };
  const lba48 = (word(83) & (1 << 10)) !== 0;
  const sectors = lba48
    ? word(100) + word(101) * 0x1_0000 + word(102) * TWO_32 + word(103) * 0x1_0000_0000_0000
    : word(60) + word(61) * 0x1_0000;
  const ncq = (word(76) & (1 << 8)) !== 0 && word(76) !== 0xffff;
  return {
    sectors: Number.isSafeInteger(sectors * SECTOR) ? sectors : 0,
    model: text(27, 40),
    serial: text(10, 20),
    firmware: text(23, 8),
    ncq,
    queueDepth: ncq ? (word(75) & 0x1f) + 1 : 1,
    trim: (word(169) & 1) !== 0,
    writeCache: (word(85) & (1 << 5)) !== 0,
  };
}

/** A request's error detail: the PxIS causes and the ATA status and error bits. */
export function describeError(cause: number, status: number, error: number): string {
  const causes: string[] = [];
  if ((cause & PORT_IRQ_TF_ERR) !== 0) causes.push("TFES");
  if ((cause & PORT_IRQ_HBUS_ERR) !== 0) causes.push("HBFS");
  if ((cause & PORT_IRQ_HBUS_DATA_ERR) !== 0) causes.push("HBDS");
  if ((cause & PORT_IRQ_IF_ERR) !== 0) causes.push("IFS");
  const bits: string[] = [];
  if ((error & 0x80) !== 0) bits.push("ICRC");
  if ((error & 0x40) !== 0) bits.push("UNC");
  if ((error & 0x10) !== 0) bits.push("IDNF");
  if ((error & 0x04) !== 0) bits.push("ABRT");
  return `AHCI ${causes.join("|") || "error"}: ATA status 0x${hex(status)} error 0x${hex(error)}` +
    (bits.length > 0 ? ` (${bits.join("|")})` : "");
}
