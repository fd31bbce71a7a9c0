/**
 * The AHCI HBA as the guest's driver knows it (AHCI 1.3.1, with the names of Linux's `ahci.h`):
 * register access (every access a VM exit, counted), the port's structures in guest RAM, and the
 * bring-up steps of libahci — HBA reset, port start, COMRESET, MSI — plus what IDENTIFY DEVICE data
 * says. The driver never imports the device: the register map and the ATA numbers come from the
 * vocabulary both ends share, `src/ata/ahci_constants.ts` and `src/ata/constants.ts`.
 *
 * @module
 */

import {
  AHCI_ABAR,
  AHCI_CMD_HEADER_SIZE,
  AHCI_CMD_LIST_ALIGN,
  AHCI_CMD_LIST_SIZE,
  AHCI_CMD_PRDTL_SHIFT,
  AHCI_CMD_TABLE_ALIGN,
  AHCI_CMD_TBL_PRDT,
  AHCI_CMD_WRITE,
  AHCI_PORT_BASE,
  AHCI_PORT_SIZE,
  AHCI_PRDT_ENTRY_SIZE,
  AHCI_PRDT_MAX_BYTES,
  AHCI_RX_FIS_SIZE,
  H2D_LBA0,
  H2D_LBA1,
  H2D_LBA2,
  H2D_LBA3,
  H2D_LBA4,
  H2D_LBA5,
  HOST_AHCI_EN,
  HOST_CTL,
  HOST_IRQ_STAT,
  HOST_RESET,
  MSI_ADDRESS_X86_BASE,
  PCI_CAP_ID_MSI,
  PCI_CLASS_PROG_AHCI,
  PCI_CLASS_STORAGE_SATA,
  PCI_MSI_ADDRESS_HI,
  PCI_MSI_ADDRESS_LO,
  PCI_MSI_DATA_32,
  PCI_MSI_DATA_64,
  PCI_MSI_FLAGS,
  PCI_MSI_FLAGS_64BIT,
  PCI_MSI_FLAGS_ENABLE,
  PCI_MSI_FLAGS_QSIZE,
  PORT_CMD,
  PORT_CMD_FIS_ON,
  PORT_CMD_FIS_RX,
  PORT_CMD_ICC_ACTIVE,
  PORT_CMD_LIST_ON,
  PORT_CMD_POWER_ON,
  PORT_CMD_SPIN_UP,
  PORT_CMD_START,
  PORT_FIS_ADDR,
  PORT_FIS_ADDR_HI,
  PORT_IRQ_D2H_REG_FIS,
  PORT_IRQ_FATAL,
  PORT_IRQ_HBUS_DATA_ERR,
  PORT_IRQ_HBUS_ERR,
  PORT_IRQ_IF_ERR,
  PORT_IRQ_MASK,
  PORT_IRQ_OVERFLOW,
  PORT_IRQ_PIOS_FIS,
  PORT_IRQ_SDB_FIS,
  PORT_IRQ_STAT,
  PORT_IRQ_TF_ERR,
  PORT_LST_ADDR,
  PORT_LST_ADDR_HI,
  PORT_SCR_CTL,
  PORT_SCR_ERR,
  PORT_SCR_STAT,
  PORT_SIG,
  PORT_TFDATA,
  SATA_FIS_REG_H2D_SIZE,
  SATA_SCTL_DET_COMRESET,
  SATA_SIGNATURE_DISK,
  SATA_SSTS_DET_MASK,
  SATA_SSTS_DET_PHY_UP,
} from "../ata/ahci_constants.ts";
import {
  ATA_ABORTED,
  ATA_BUSY,
  ATA_DRQ,
  ATA_ICRC,
  ATA_ID_BYTES,
  ATA_ID_CFS_ENABLE_1,
  ATA_ID_COMMAND_SET_2,
  ATA_ID_DATA_SET_MGMT,
  ATA_ID_FW_REV,
  ATA_ID_FW_REV_LEN,
  ATA_ID_LBA_CAPACITY,
  ATA_ID_LBA_CAPACITY_2,
  ATA_ID_PROD,
  ATA_ID_PROD_LEN,
  ATA_ID_QUEUE_DEPTH,
  ATA_ID_SATA_CAPABILITY,
  ATA_ID_SERNO,
  ATA_ID_SERNO_LEN,
  ATA_IDNF,
  ATA_SECT_SIZE,
  ATA_UNC,
} from "../ata/constants.ts";
import type { GuestBus } from "../virtio/bus.ts";
import { PCI_COMMAND, PCI_COMMAND_MASTER } from "../virtio/pci_regs.ts";
import { type PciFunctionInfo, setIntxDisabled } from "./pci_probe.ts";
import type { GuestPlatform } from "./virtio_driver.ts";

/** What the driver enables in PxIE (libahci's DEF_PORT_IRQ, less hot-plug). */
export const PORT_IRQ_ENABLED = PORT_IRQ_D2H_REG_FIS | PORT_IRQ_PIOS_FIS | PORT_IRQ_SDB_FIS |
  PORT_IRQ_OVERFLOW | PORT_IRQ_FATAL;

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
    this.#base = AHCI_PORT_BASE + port * AHCI_PORT_SIZE;
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
    this.fisAt = mem.translate(layout.fis, AHCI_RX_FIS_SIZE);
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
      this.headerAt.push(
        mem.translate(layout.commandList + i * AHCI_CMD_HEADER_SIZE, AHCI_CMD_HEADER_SIZE),
      );
      this.tableAt.push(mem.translate(this.table(i), layout.tableStride));
      this.dsmAt.push(mem.translate(this.dsm(i), ATA_SECT_SIZE));
    }
  }

  /** Allocates everything for `slots` slots of `maxTransfer` bytes each. */
  static allocate(platform: GuestPlatform, slots: number, maxTransfer: number): PortMemory {
    const alloc = platform.alloc;
    const entries = Math.ceil(maxTransfer / AHCI_PRDT_MAX_BYTES);
    const dsmOffset = AHCI_CMD_TBL_PRDT + entries * AHCI_PRDT_ENTRY_SIZE;
    const tableStride = Math.ceil((dsmOffset + ATA_SECT_SIZE) / AHCI_CMD_TABLE_ALIGN) *
      AHCI_CMD_TABLE_ALIGN;
    const dataAlign = maxTransfer >= 4096 ? 4096 : ATA_SECT_SIZE;
    const dataStride = Math.ceil(maxTransfer / dataAlign) * dataAlign;
    const done: number[] = [];
    try {
      const take = (size: number, align: number) => {
        const gpa = alloc.alloc(size, align);
        done.push(gpa);
        return gpa;
      };
      return new PortMemory(platform, {
        commandList: take(AHCI_CMD_LIST_SIZE, AHCI_CMD_LIST_ALIGN),
        fis: take(AHCI_RX_FIS_SIZE, AHCI_RX_FIS_SIZE),
        internal: take(ATA_SECT_SIZE, ATA_SECT_SIZE),
        tables: take(tableStride * slots, AHCI_CMD_TABLE_ALIGN),
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
    for (let done = 0; done < bytes; done += AHCI_PRDT_MAX_BYTES, entries++) {
      const n = Math.min(AHCI_PRDT_MAX_BYTES, bytes - done);
      const at = table + AHCI_CMD_TBL_PRDT + entries * AHCI_PRDT_ENTRY_SIZE;
      const gpa = address + done;
      ram.setUint32(at, gpa % TWO_32, true);
      ram.setUint32(at + 4, Math.floor(gpa / TWO_32), true);
      ram.setUint32(at + 8, 0, true);
      ram.setUint32(at + 12, n - 1, true); // DBC: bytes minus one
    }
    const header = this.headerAt[index]!;
    const cfl = SATA_FIS_REG_H2D_SIZE / 4;
    const prdtl = entries << AHCI_CMD_PRDTL_SHIFT;
    ram.setUint32(header, cfl | (write ? AHCI_CMD_WRITE : 0) | prdtl, true);
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
  for (let i = 0; i < SATA_FIS_REG_H2D_SIZE; i += 4) ram.setUint32(at + i, 0, true);
}

/** LBA bytes 7:0, 15:8, 23:16 at FIS +4..6 and 31:24, 39:32, 47:40 at +8..10. */
export function setLba(ram: DataView, fis: number, lba: number): void {
  let rest = lba;
  for (const at of [H2D_LBA0, H2D_LBA1, H2D_LBA2, H2D_LBA3, H2D_LBA4, H2D_LBA5]) {
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
  bus.configWrite(slot, cap + PCI_MSI_ADDRESS_LO, 4, MSI_ADDRESS_X86_BASE);
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
  const view = new DataView(data.buffer, data.byteOffset, ATA_ID_BYTES);
  const word = (w: number) => view.getUint16(w * 2, true);
  const text = (w: number, length: number) => {
    let s = "";
    for (let i = 0; i < length; i++) s += String.fromCharCode(data[w * 2 + (i ^ 1)]!);
    return s.trim();
  };
  const lba48 = (word(ATA_ID_COMMAND_SET_2) & (1 << 10)) !== 0;
  const lba = lba48 ? ATA_ID_LBA_CAPACITY_2 : ATA_ID_LBA_CAPACITY;
  const sectors = lba48
    ? word(lba) + word(lba + 1) * 0x1_0000 + word(lba + 2) * TWO_32 +
      word(lba + 3) * 0x1_0000_0000_0000
    : word(lba) + word(lba + 1) * 0x1_0000;
  const sata = word(ATA_ID_SATA_CAPABILITY);
  const ncq = (sata & (1 << 8)) !== 0 && sata !== 0xffff;
  return {
    sectors: Number.isSafeInteger(sectors * ATA_SECT_SIZE) ? sectors : 0,
    model: text(ATA_ID_PROD, ATA_ID_PROD_LEN),
    serial: text(ATA_ID_SERNO, ATA_ID_SERNO_LEN),
    firmware: text(ATA_ID_FW_REV, ATA_ID_FW_REV_LEN),
    ncq,
    queueDepth: ncq ? (word(ATA_ID_QUEUE_DEPTH) & 0x1f) + 1 : 1,
    trim: (word(ATA_ID_DATA_SET_MGMT) & 1) !== 0,
    writeCache: (word(ATA_ID_CFS_ENABLE_1) & (1 << 5)) !== 0,
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
  if ((error & ATA_ICRC) !== 0) bits.push("ICRC");
  if ((error & ATA_UNC) !== 0) bits.push("UNC");
  if ((error & ATA_IDNF) !== 0) bits.push("IDNF");
  if ((error & ATA_ABORTED) !== 0) bits.push("ABRT");
  return `AHCI ${causes.join("|") || "error"}: ATA status 0x${hex(status)} error 0x${hex(error)}` +
    (bits.length > 0 ? ` (${bits.join("|")})` : "");
}
