/**
 * What an AHCI port reads and writes in guest memory for one command (AHCI 1.3.1 §4.2): the
 * command header in the command list, the Register H2D FIS and the PRDT of the command table — read
 * into a {@linkcode CommandSlot} with every address checked — and the FISes the port posts back
 * into the FIS receive area (D2H Register, PIO Setup, Set Device Bits); the payload of DATA SET
 * MANAGEMENT (TRIM ranges) and the NCQ Command Error log page a drive returns for READ LOG EXT 10h.
 *
 * @module
 */

import type { BlockNode } from "../block/node.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import {
  AHCI_CMD_ATAPI,
  AHCI_CMD_CFL_MASK,
  AHCI_CMD_HDR_CTBA,
  AHCI_CMD_HDR_CTBAU,
  AHCI_CMD_HEADER_SIZE,
  AHCI_CMD_PRDTL_SHIFT,
  AHCI_CMD_TBL_CFIS,
  AHCI_CMD_TBL_PRDT,
  AHCI_PRDT_DBC_MASK,
  AHCI_PRDT_ENTRY_SIZE,
  H2D_COMMAND,
  H2D_CONTROL,
  H2D_COUNT,
  H2D_COUNT_EXP,
  H2D_DEVICE,
  H2D_FEATURES,
  H2D_FEATURES_EXP,
  H2D_FLAGS,
  H2D_LBA0,
  H2D_LBA1,
  H2D_LBA2,
  H2D_LBA3,
  H2D_LBA4,
  H2D_LBA5,
  H2D_TYPE,
  RX_FIS_D2H_REG,
  RX_FIS_PIO_SETUP,
  RX_FIS_SDB,
  SATA_FIS_I,
  SATA_FIS_PIO_D2H,
  SATA_FIS_REG_H2D_UPDATE_COMMAND,
  SATA_FIS_TYPE_PIO_SETUP,
  SATA_FIS_TYPE_REGISTER_D2H,
  SATA_FIS_TYPE_SDB,
} from "../ata/ahci_constants.ts";
import { ATA_DSM_RANGE_BYTES, ATA_LOG_NCQ_NQ, ATA_SECT_SIZE } from "../ata/constants.ts";

/** Largest byte count of one BlockNode call a command's DMA makes. */
export const AHCI_DMA_CHUNK = 1024 * 1024;
/**
 * Most distinct (physically discontiguous) PRD pieces one command may use: the device keeps a
 * snapshot of this many per slot. Linux's ahci uses at most 168 (AHCI_MAX_SG); more is an ABRT.
 */
export const AHCI_MAX_PRD_PIECES = 256;
/** Most 512-byte blocks of TRIM ranges one DATA SET MANAGEMENT command may carry. */
export const AHCI_MAX_DSM_BLOCKS = 8;
const TWO_32 = 0x1_0000_0000;

/** How a PRDT walk ended. */
export type PrdtResult =
  /** The PRDT covers the transfer; the pieces are in the slot. */
  | "ok"
  /** An entry, or the memory it names, lies outside guest RAM: a host bus fatal error. */
  | "host-bus"
  /** An odd byte count, or more pieces than {@linkcode AHCI_MAX_PRD_PIECES}: the command aborts. */
  | "abort"
  /** The PRDT holds fewer bytes than the transfer: an overflow, the command aborts. */
  | "overflow";

/**
 * One command slot of a port: the command as fetched from guest memory, and the PRD pieces of its
 * data, snapshotted once so that a guest rewriting its PRDT meanwhile cannot redirect the I/O.
 * Allocated once per slot; nothing here allocates per command.
 */
export class CommandSlot {
  /** Slot number, 0..31 (for NCQ commands also the tag). */
  readonly index: number;
  /** PRD pieces: guest address and byte count, in pairs; contiguous entries merged. */
  readonly prd: Float64Array = new Float64Array(AHCI_MAX_PRD_PIECES * 2);
  /** Pieces in {@linkcode prd}. */
  prdPieces = 0;
  /** Guest address of the slot's command header. */
  header = 0;
  /** Guest address of its command table. */
  table = 0;
  /** Command header DW0. */
  dw0 = 0;
  /** FIS type byte. */
  fisType = 0;
  /** The FIS's C bit: a command (else a Device Control update). */
  isCommand = false;
  /** ATA command. */
  command = 0;
  /** Features 15:0. */
  features = 0;
  /** Count 15:0. */
  count = 0;
  /** Device register. */
  device = 0;
  /** Device Control register. */
  control = 0;
  /** LBA 47:0 as the FIS gives it. */
  lba48 = 0;
  /** The LBA the command works on (set by the port: LBA28 or LBA48). */
  lba = 0;
  /** Sectors the command moves (set by the port). */
  sectors = 0;
  /** Force unit access for a write. */
  fua = false;
  /** READ/WRITE FPDMA QUEUED. */
  ncq = false;
  /** I/O of this slot is running (of whatever engine epoch). */
  busy = false;

  /** Makes slot `index`. */
  constructor(index: number) {
    this.index = index;
  }

  /** CFL: the command FIS's length in dwords. */
  get cfl(): number {
    return this.dw0 & AHCI_CMD_CFL_MASK;
  }

  /** The header's A bit. */
  get atapi(): boolean {
    return (this.dw0 & AHCI_CMD_ATAPI) !== 0;
  }

  /** PRDTL: PRDT entries. */
  get prdtl(): number {
    return this.dw0 >>> AHCI_CMD_PRDTL_SHIFT;
  }

  /**
   * Reads the slot's command header from the command list at `commandList` and the command FIS of
   * its table.
   *
   * @returns false when the header or the table's first 128 bytes lie outside guest RAM
   */
  fetch(mem: GuestMemory, commandList: number): boolean {
    const header = commandList + this.index * AHCI_CMD_HEADER_SIZE;
    if (!mem.contains(header, AHCI_CMD_HEADER_SIZE)) return false;
    this.header = header;
    this.dw0 = mem.u32(header);
    // CTBA bits 0..6 are reserved: the table is 128-byte aligned.
    const table = mem.u32(header + AHCI_CMD_HDR_CTBAU) * TWO_32 +
      ((mem.u32(header + AHCI_CMD_HDR_CTBA) & ~0x7f) >>> 0);
    if (!mem.contains(table, AHCI_CMD_TBL_PRDT)) return false;
    this.table = table;
    const fis = table + AHCI_CMD_TBL_CFIS;
    this.fisType = mem.u8(fis + H2D_TYPE);
    this.isCommand = (mem.u8(fis + H2D_FLAGS) & SATA_FIS_REG_H2D_UPDATE_COMMAND) !== 0;
    this.command = mem.u8(fis + H2D_COMMAND);
    this.features = mem.u8(fis + H2D_FEATURES) | (mem.u8(fis + H2D_FEATURES_EXP) << 8);
    this.count = mem.u8(fis + H2D_COUNT) | (mem.u8(fis + H2D_COUNT_EXP) << 8);
    this.device = mem.u8(fis + H2D_DEVICE);
    this.control = mem.u8(fis + H2D_CONTROL);
    this.lba48 = mem.u8(fis + H2D_LBA0) + mem.u8(fis + H2D_LBA1) * 0x100 +
      mem.u8(fis + H2D_LBA2) * 0x1_0000 + mem.u8(fis + H2D_LBA3) * 0x100_0000 +
      mem.u8(fis + H2D_LBA4) * TWO_32 + mem.u8(fis + H2D_LBA5) * 0x100_0000_0000;
    return true;
  }

  /**
   * Walks the PRDT until it covers `bytes` and snapshots the pieces: each entry and the memory it
   * names inside RAM, an even byte count, at most {@linkcode AHCI_MAX_PRD_PIECES} discontiguous
   * pieces, enough bytes within PRDTL entries. Entries past the transfer are not read.
   */
  snapshotPrdt(mem: GuestMemory, bytes: number): PrdtResult {
    const prd = this.prd;
    const prdtl = this.prdtl;
    let covered = 0;
    let pieces = 0;
    for (let i = 0; i < prdtl && covered < bytes; i++) {
      const entry = this.table + AHCI_CMD_TBL_PRDT + i * AHCI_PRDT_ENTRY_SIZE;
      if (!mem.contains(entry, AHCI_PRDT_ENTRY_SIZE)) return "host-bus";
      const dbc = mem.u32(entry + 12) & AHCI_PRDT_DBC_MASK;
      // DBC is the count minus one, and its bit 0 must be 1: counts are even.
      if ((dbc & 1) === 0) return "abort";
      // DBA bit 0 is reserved (word alignment).
      const address = mem.u32(entry + 4) * TWO_32 + ((mem.u32(entry) & ~1) >>> 0);
      const length = Math.min(dbc + 1, bytes - covered);
      if (!mem.contains(address, length)) return "host-bus";
      covered += length;
      // Physically contiguous entries become one piece (one node call) while it stays small and
      // inside one RAM region.
      const last = pieces - 1;
      if (last >= 0) {
        const start = prd[last * 2]!;
        const merged = prd[last * 2 + 1]! + length;
        if (
          start + prd[last * 2 + 1]! === address && merged <= AHCI_DMA_CHUNK &&
          mem.contains(start, merged)
        ) {
          prd[last * 2 + 1] = merged;
          continue;
        }
      }
      if (pieces === AHCI_MAX_PRD_PIECES) return "abort";
      prd[pieces * 2] = address;
      prd[pieces * 2 + 1] = length;
      pieces++;
    }
    if (covered < bytes) return "overflow";
    this.prdPieces = pieces;
    return "ok";
  }

  /** Copies `src` into the snapshotted pieces (a PIO data-in or a small DMA read). */
  scatter(mem: GuestMemory, src: Uint8Array): void {
    let at = 0;
    for (let i = 0; i < this.prdPieces && at < src.length; i++) {
      const length = Math.min(this.prd[i * 2 + 1]!, src.length - at);
      mem.write(this.prd[i * 2]!, src.subarray(at, at + length));
      at += length;
    }
  }

  /** Copies the snapshotted pieces into `dst` (a small DMA write, such as TRIM ranges). */
  gather(mem: GuestMemory, dst: Uint8Array): void {
    let at = 0;
    for (let i = 0; i < this.prdPieces && at < dst.length; i++) {
      const length = Math.min(this.prd[i * 2 + 1]!, dst.length - at);
      mem.read(this.prd[i * 2]!, dst.subarray(at, at + length));
      at += length;
    }
  }
}

/** Writes a D2H Register FIS at `fis` + 0x40 of a FIS receive area. */
export function writeD2hFis(
  mem: GuestMemory,
  fis: number,
  fields: { status: number; error: number; irq: boolean; count: number; lba: number },
): void {
  const at = fis + RX_FIS_D2H_REG;
  mem.fill(at, 20, 0);
  mem.setU8(at, SATA_FIS_TYPE_REGISTER_D2H);
  mem.setU8(at + 1, fields.irq ? SATA_FIS_I : 0);
  mem.setU8(at + 2, fields.status);
  mem.setU8(at + 3, fields.error);
  mem.setU8(at + 4, fields.lba & 0xff);
  mem.setU8(at + 12, fields.count & 0xff);
}

/**
 * Writes a PIO Setup FIS (device to host, I bit) at `fis` + 0x20: `status` at the start,
 * `endStatus` (E_Status) once the `bytes` have moved.
 */
export function writePioSetupFis(
  mem: GuestMemory,
  fis: number,
  status: number,
  endStatus: number,
  bytes: number,
): void {
  const at = fis + RX_FIS_PIO_SETUP;
  mem.fill(at, 20, 0);
  mem.setU8(at, SATA_FIS_TYPE_PIO_SETUP);
  mem.setU8(at + 1, SATA_FIS_PIO_D2H | SATA_FIS_I);
  mem.setU8(at + 2, status);
  mem.setU8(at + 15, endStatus);
  mem.setU16(at + 16, bytes);
}

/** Writes a Set Device Bits FIS (I bit) at `fis` + 0x58 completing the tags in `done`. */
export function writeSdbFis(
  mem: GuestMemory,
  fis: number,
  status: number,
  error: number,
  done: number,
): void {
  const at = fis + RX_FIS_SDB;
  mem.setU8(at, SATA_FIS_TYPE_SDB);
  mem.setU8(at + 1, SATA_FIS_I);
  mem.setU8(at + 2, status & 0x77); // status bits 6:4 and 2:0
  mem.setU8(at + 3, error);
  mem.setU32(at + 4, done >>> 0);
}

/**
 * Fills `log` (512 bytes) as the NCQ Command Error log (SATA 3.x §13.7.4): the failed tag, or NQ
 * for a non-queued command; its status, error, LBA and count; the checksum in byte 511.
 */
export function buildNcqErrorLog(
  log: Uint8Array,
  failed: { tag: number | null; status: number; error: number; lba: number; sectors: number },
): void {
  log.fill(0, 0, ATA_SECT_SIZE);
  log[0] = failed.tag === null ? ATA_LOG_NCQ_NQ : failed.tag & 0x1f;
  log[2] = failed.status;
  log[3] = failed.error;
  let lba = failed.lba;
  for (const at of [4, 5, 6, 8, 9, 10]) {
    log[at] = lba % 256;
    lba = Math.floor(lba / 256);
  }
  log[7] = 0x40;
  log[12] = failed.sectors & 0xff;
  log[13] = (failed.sectors >>> 8) & 0xff;
  let sum = 0;
  for (let i = 0; i < ATA_SECT_SIZE - 1; i++) sum += log[i]!;
  log[ATA_SECT_SIZE - 1] = (256 - (sum & 0xff)) & 0xff;
}

/**
 * The LBA range entries of a DATA SET MANAGEMENT TRIM command (ATA8-ACS §7.10.3.2): up to
 * {@linkcode AHCI_MAX_DSM_BLOCKS} blocks of 64 entries, each a 48-bit LBA and a 16-bit sector
 * count (0: unused). One per port; a port runs one non-queued command at a time.
 */
export class DsmRanges {
  readonly #bytes = new Uint8Array(AHCI_MAX_DSM_BLOCKS * ATA_SECT_SIZE);
  readonly #view = new DataView(this.#bytes.buffer);
  #ranges = 0;
  /** Discards are running (a stopped engine's command may still be). */
  busy = false;

  /** Copies `blocks` blocks of entries out of slot `s`'s snapshotted PRD pieces. */
  load(mem: GuestMemory, s: CommandSlot, blocks: number): void {
    const bytes = Math.min(blocks, AHCI_MAX_DSM_BLOCKS) * ATA_SECT_SIZE;
    s.gather(mem, this.#bytes.subarray(0, bytes));
    this.#ranges = bytes / ATA_DSM_RANGE_BYTES;
  }

  /** Every used entry ends within `sectors`. */
  inside(sectors: number): boolean {
    for (let r = 0; r < this.#ranges; r++) {
      const count = this.#count(r);
      if (count !== 0 && this.#lba(r) + count > sectors) return false;
    }
    return true;
  }

  /** Discards every used entry's range on `node`, one after another. */
  async discard(node: BlockNode): Promise<void> {
    this.busy = true;
    try {
      for (let r = 0; r < this.#ranges; r++) {
        const count = this.#count(r);
        if (count === 0) continue;
        await node.discard(this.#lba(r) * ATA_SECT_SIZE, count * ATA_SECT_SIZE);
      }
    } finally {
      this.busy = false;
    }
  }

  #lba(r: number): number {
    const at = r * ATA_DSM_RANGE_BYTES;
    return (this.#view.getUint32(at + 4, true) & 0xffff) * TWO_32 +
      this.#view.getUint32(at, true);
  }

  #count(r: number): number {
    return this.#view.getUint32(r * ATA_DSM_RANGE_BYTES + 4, true) >>> 16;
  }
}
