/**
 * The 512 bytes of IDENTIFY DEVICE data of an emulated SATA disk (ATA8-ACS §7.16, table 22), laid
 * out as QEMU's `ide_identify` lays them out for `ide-hd` behind an AHCI port: "QEMU HARDDISK",
 * serial `QM0000N`, firmware "2.5+", LBA48, NCQ with 32 tags, FLUSH CACHE (EXT), a volatile write
 * cache whose state word 85 reports, and TRIM (words 169 and 105) when discard is on.
 *
 * @module
 */

import {
  ATA_ID_BYTES,
  ATA_ID_CFS_ENABLE_1,
  ATA_ID_COMMAND_SET_2,
  ATA_ID_DATA_SET_MGMT,
  ATA_ID_DSM_MAX_BLOCKS,
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
  ATA_LBA28_LIMIT,
  ATA_SECT_SIZE,
} from "../ata/constants.ts";

/** What the disk says about itself. */
export interface SataIdentity {
  /** Capacity in 512-byte sectors. */
  readonly sectors: number;
  /** Model number, at most 40 characters (QEMU: "QEMU HARDDISK"). */
  readonly model: string;
  /** Serial number, at most 20 characters (QEMU: "QM00001"...). */
  readonly serial: string;
  /** Firmware revision, at most 8 characters (QEMU: "2.5+"). */
  readonly firmware: string;
  /** The volatile write cache is enabled (word 85 bit 5). */
  readonly writeCache: boolean;
  /** TRIM is supported (words 69, 105, 169). */
  readonly trim: boolean;
  /** NCQ queue depth, 1..32 (word 75 holds it minus one). */
  readonly queueDepth: number;
}

/**
 * Writes the IDENTIFY DEVICE data of `id` into `dst` (512 bytes, little-endian words, strings
 * byte-swapped within each word and padded with spaces as ATA strings are).
 *
 * @example
 * ```ts
 * import { buildIdentify } from "./sata_identify.ts";
 * const data = new Uint8Array(512);
 * buildIdentify(data, {
 *   sectors: 2048, model: "QEMU HARDDISK", serial: "QM00001", firmware: "2.5+",
 *   writeCache: true, trim: true, queueDepth: 32,
 * });
 * if (new DataView(data.buffer).getUint16(2 * 100, true) !== 2048) throw new Error("capacity");
 * ```
 *
 * @throws {RangeError} when `dst` is shorter than 512 bytes or the capacity is not a safe integer
 */
export function buildIdentify(dst: Uint8Array, id: SataIdentity): void {
  if (dst.length < ATA_ID_BYTES) throw new RangeError("IDENTIFY data needs 512 bytes");
  if (!Number.isSafeInteger(id.sectors) || id.sectors < 0) {
    throw new RangeError(`Capacity ${id.sectors} sectors is not a valid sector count`);
  }
  dst.fill(0, 0, ATA_ID_BYTES);
  const view = new DataView(dst.buffer, dst.byteOffset, ATA_ID_BYTES);
  const put = (word: number, value: number) => view.setUint16(word * 2, value & 0xffff, true);
  const sectors = id.sectors;
  // QEMU's guess_chs_for_size: 16 heads, 63 sectors per track, cylinders clamped to 2..16383.
  const heads = 16;
  const perTrack = 63;
  const cylinders = Math.min(16383, Math.max(2, Math.floor(sectors / (heads * perTrack))));
  put(0, 0x0040); // fixed, non-removable ATA device
  put(1, cylinders);
  put(3, heads);
  put(4, ATA_SECT_SIZE * perTrack);
  put(5, ATA_SECT_SIZE);
  put(6, perTrack);
  putString(view, ATA_ID_SERNO, id.serial, ATA_ID_SERNO_LEN);
  put(20, 3);
  put(21, 512); // cache size in sectors
  put(22, 4);
  putString(view, ATA_ID_FW_REV, id.firmware, ATA_ID_FW_REV_LEN);
  putString(view, ATA_ID_PROD, id.model, ATA_ID_PROD_LEN);
  put(47, 0x8000 | 16); // READ/WRITE MULTIPLE: 16 sectors
  put(48, 1); // dword I/O
  put(49, (1 << 11) | (1 << 9) | (1 << 8)); // IORDY, LBA, DMA
  put(51, 0x200);
  put(52, 0x200);
  put(53, 1 | (1 << 1) | (1 << 2)); // words 54..58, 64..70 and 88 are valid
  put(54, cylinders);
  put(55, heads);
  put(56, perTrack);
  const chs = cylinders * heads * perTrack;
  put(57, chs);
  put(58, chs >>> 16);
  put(59, 0x100 | 16); // multiple sector setting valid: 16
  const lba28 = Math.min(sectors, ATA_LBA28_LIMIT - 1);
  put(ATA_ID_LBA_CAPACITY, lba28);
  put(ATA_ID_LBA_CAPACITY + 1, lba28 >>> 16);
  put(62, 0x07);
  put(63, 0x07); // multiword DMA 0..2
  put(64, 0x03); // PIO 3..4
  put(65, 120);
  put(66, 120);
  put(67, 120);
  put(68, 120);
  if (id.trim) put(69, 1 << 14); // deterministic read after TRIM
  put(ATA_ID_QUEUE_DEPTH, Math.max(1, Math.min(32, id.queueDepth)) - 1);
  put(ATA_ID_SATA_CAPABILITY, 1 << 8); // NCQ
  put(80, 0xf0); // ATA-4 .. ATA-7
  put(81, 0x16);
  put(82, (1 << 14) | (1 << 5) | 1); // NOP, write cache, SMART
  put(ATA_ID_COMMAND_SET_2, (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10));
  put(84, 1 << 14);
  put(ATA_ID_CFS_ENABLE_1, (1 << 14) | (id.writeCache ? 1 << 5 : 0) | 1);
  put(86, (1 << 13) | (1 << 12) | (1 << 10));
  put(87, 1 << 14);
  put(88, 0x3f | (1 << 13)); // UDMA 0..5 supported, UDMA 5 selected
  put(93, 1 | (1 << 14) | 0x2000);
  // LBA48 capacity: four words, low first; a safe integer has at most 53 bits.
  put(ATA_ID_LBA_CAPACITY_2, sectors % 0x10000);
  put(ATA_ID_LBA_CAPACITY_2 + 1, Math.floor(sectors / 0x10000) % 0x10000);
  put(ATA_ID_LBA_CAPACITY_2 + 2, Math.floor(sectors / 0x1_0000_0000) % 0x10000);
  put(ATA_ID_LBA_CAPACITY_2 + 3, Math.floor(sectors / 0x1_0000_0000_0000) % 0x10000);
  if (id.trim) {
    put(ATA_ID_DSM_MAX_BLOCKS, 1);
    put(ATA_ID_DATA_SET_MGMT, 1);
  }
  put(217, 0); // rotation rate not reported
}

/** An ATA string: characters swapped within each word, space-padded (QEMU's padstr). */
function putString(view: DataView, word: number, text: string, length: number): void {
  const base = word * 2;
  for (let i = 0; i < length; i++) {
    const code = i < text.length ? text.charCodeAt(i) : 0x20;
    view.setUint8(base + (i ^ 1), code < 0x20 || code > 0x7e ? 0x20 : code);
  }
}

/**
 * Reads an ATA string of `length` characters at `word` of IDENTIFY data, trailing spaces removed.
 *
 * @example
 * ```ts
 * import { ATA_ID_PROD, ATA_ID_PROD_LEN } from "../ata/constants.ts";
 * import { buildIdentify, readIdentifyString } from "./sata_identify.ts";
 * const data = new Uint8Array(512);
 * buildIdentify(data, {
 *   sectors: 8, model: "QEMU HARDDISK", serial: "QM00001", firmware: "2.5+",
 *   writeCache: true, trim: false, queueDepth: 32,
 * });
 * if (readIdentifyString(data, ATA_ID_PROD, ATA_ID_PROD_LEN) !== "QEMU HARDDISK") throw new Error("model");
 * ```
 */
export function readIdentifyString(data: Uint8Array, word: number, length: number): string {
  let text = "";
  for (let i = 0; i < length; i++) text += String.fromCharCode(data[word * 2 + (i ^ 1)] ?? 0x20);
  return text.trimEnd();
}
