/**
 * The SCSI commands the guest's virtio-scsi driver sends, byte by byte: the CDBs of the request
 * path (READ(16), WRITE(16), SYNCHRONIZE CACHE(16), UNMAP with its parameter list) written straight
 * into guest RAM, the CDBs of the scan and probe (REPORT LUNS, INQUIRY and its VPD pages, TEST UNIT
 * READY, READ CAPACITY(16)/(10), MODE SENSE(6)), the virtio-scsi LUN field, and the decoding of the
 * data those commands return (SPC-4, SBC-3).
 *
 * The request-path writers take a `DataView` of all guest RAM and an offset already translated:
 * no allocation per request.
 *
 * @module
 */

import {
  INQUIRY,
  MODE_PAGE_CACHING,
  MODE_SENSE,
  READ_CAPACITY_10,
  REPORT_LUNS,
  SAI_READ_CAPACITY_16,
  SERVICE_ACTION_IN_16,
  SYNCHRONIZE_CACHE_16,
  TEST_UNIT_READY,
  TYPE_DISK,
  UNMAP,
} from "../scsi/constants.ts";

/** UNMAP parameter list with one block descriptor: 8-byte header + 16-byte descriptor. */
export const UNMAP_PARAM_BYTES = 24;

/** The outcome of one command the driver sends for itself (scan, probe). */
export interface CommandOutcome {
  readonly response: number;
  readonly status: number;
  /** Sense key, ASC, ASCQ; -1 without sense. */
  readonly key: number;
  readonly asc: number;
  readonly ascq: number;
  /** The data-in bytes received (the buffer minus the residual). */
  readonly data: Uint8Array;
}

// ---- Wire helpers ----------------------------------------------------------------------------------

/** Writes the virtio-scsi single-level LUN: 1, target, 40h | lun >> 8, lun & FFh, 0 × 4. */
export function writeLun(ram: DataView, at: number, target: number, lun: number): void {
  ram.setUint8(at, 1);
  ram.setUint8(at + 1, target);
  ram.setUint8(at + 2, 0x40 | (lun >>> 8));
  ram.setUint8(at + 3, lun & 0xff);
  ram.setUint32(at + 4, 0);
}

/** Big-endian u64 store of a safe integer. */
function setU64BE(ram: DataView, at: number, v: number): void {
  ram.setUint32(at, Math.floor(v / 2 ** 32));
  ram.setUint32(at + 4, v >>> 0);
}

function u32BE(v: number): number[] {
  return [v >>> 24, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
}

function ascii(bytes: Uint8Array, from: number, to: number): string {
  let s = "";
  for (let i = from; i < to && i < bytes.length; i++) s += String.fromCharCode(bytes[i]!);
  return s.trimEnd();
}

// ---- The request path's CDBs (in guest RAM) --------------------------------------------------------

/** READ(16) or WRITE(16) (`opcode`) of `blocks` blocks at `lba`, into the CDB at `cdb`. */
export function writeRw16Cdb(
  ram: DataView,
  cdb: number,
  opcode: number,
  lba: number,
  blocks: number,
): void {
  ram.setUint8(cdb, opcode);
  ram.setUint8(cdb + 1, 0);
  setU64BE(ram, cdb + 2, lba);
  ram.setUint32(cdb + 10, blocks);
  ram.setUint16(cdb + 14, 0);
}

/** SYNCHRONIZE CACHE(16) of the whole medium, into the CDB at `cdb`. */
export function writeSyncCache16Cdb(ram: DataView, cdb: number): void {
  ram.setUint8(cdb, SYNCHRONIZE_CACHE_16);
  ram.setUint8(cdb + 1, 0);
  setU64BE(ram, cdb + 2, 0);
  ram.setUint32(cdb + 10, 0); // 0 blocks: to the end of the medium
  ram.setUint16(cdb + 14, 0);
}

/**
 * UNMAP of `blocks` blocks at `lba`: the CDB at `cdb` and its parameter list (one block
 * descriptor, {@linkcode UNMAP_PARAM_BYTES}) at `param`.
 */
export function writeUnmap(
  ram: DataView,
  cdb: number,
  param: number,
  lba: number,
  blocks: number,
): void {
  ram.setUint8(cdb, UNMAP);
  for (let i = 1; i < 7; i++) ram.setUint8(cdb + i, 0);
  ram.setUint16(cdb + 7, UNMAP_PARAM_BYTES);
  ram.setUint8(cdb + 9, 0);
  ram.setUint32(cdb + 10, 0);
  ram.setUint16(cdb + 14, 0);
  // Parameter list: UNMAP DATA LENGTH, BLOCK DESCRIPTOR DATA LENGTH, one descriptor.
  ram.setUint16(param, UNMAP_PARAM_BYTES - 2);
  ram.setUint16(param + 2, 16);
  ram.setUint32(param + 4, 0);
  setU64BE(ram, param + 8, lba);
  ram.setUint32(param + 16, blocks);
  ram.setUint32(param + 20, 0);
}

// ---- The scan's and probe's CDBs ---------------------------------------------------------------------

/** REPORT LUNS, SELECT REPORT 0 (all LUNs), ALLOCATION LENGTH big-endian in bytes 6..9. */
export function reportLunsCdb(allocationLength: number): number[] {
  return [REPORT_LUNS, 0, 0, 0, 0, 0, ...u32BE(allocationLength), 0, 0];
}

/** Standard INQUIRY data, up to `allocationLength` (< 256) bytes. */
export function inquiryCdb(allocationLength: number): number[] {
  return [INQUIRY, 0, 0, 0, allocationLength, 0];
}

/** INQUIRY with EVPD: VPD page `page`, up to `allocationLength` (< 256) bytes. */
export function vpdCdb(page: number, allocationLength: number): number[] {
  return [INQUIRY, 1, page, 0, allocationLength, 0];
}

/** TEST UNIT READY. */
export function testUnitReadyCdb(): number[] {
  return [TEST_UNIT_READY, 0, 0, 0, 0, 0];
}

/** READ CAPACITY(16): SERVICE ACTION IN(16), up to `allocationLength` (< 256) bytes. */
export function readCapacity16Cdb(allocationLength: number): number[] {
  return [
    SERVICE_ACTION_IN_16,
    SAI_READ_CAPACITY_16,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    allocationLength,
    0,
    0,
  ];
}

/** READ CAPACITY(10). */
export function readCapacity10Cdb(): number[] {
  return [READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
}

/** MODE SENSE(6) of the caching page, no block descriptors, up to 255 bytes. */
export function modeSenseCachingCdb(): number[] {
  return [MODE_SENSE, 0x08, MODE_PAGE_CACHING, 0, 0xff, 0];
}

// ---- What comes back ----------------------------------------------------------------------------------

/**
 * REPORT LUNS parameter data: the LUNs listed, in order, without duplicates or LUNs above
 * `maxLun`. Peripheral device addressing (bus 0) below 256, flat space addressing above (SAM-5
 * 4.7); other methods are skipped.
 */
export function parseReportLuns(d: Uint8Array, maxLun: number): number[] {
  if (d.length < 8) return [];
  const listLength = ((d[0]! << 24) | (d[1]! << 16) | (d[2]! << 8) | d[3]!) >>> 0;
  const end = Math.min(8 + listLength, d.length);
  const luns: number[] = [];
  for (let at = 8; at + 8 <= end; at += 8) {
    const method = d[at]! >> 6;
    const lun = method === 0 && (d[at]! & 0x3f) === 0
      ? d[at + 1]!
      : method === 1
      ? ((d[at]! & 0x3f) << 8) | d[at + 1]!
      : -1;
    if (lun >= 0 && lun <= maxLun && !luns.includes(lun)) luns.push(lun);
  }
  return luns;
}

/** Standard INQUIRY data of a connected disk: peripheral qualifier 000b, device type 00h. */
export function isConnectedDisk(d: Uint8Array): boolean {
  return d.length >= 36 && (d[0]! >> 5) === 0 && (d[0]! & 0x1f) === TYPE_DISK;
}

/** The identification strings of standard INQUIRY data. */
export function inquiryIdentity(d: Uint8Array): {
  vendor: string;
  product: string;
  revision: string;
} {
  return { vendor: ascii(d, 8, 16), product: ascii(d, 16, 32), revision: ascii(d, 32, 36) };
}

/** VPD B0h (at least 28 bytes): MAXIMUM TRANSFER LENGTH and MAXIMUM UNMAP LBA COUNT, in blocks. */
export function parseBlockLimits(d: Uint8Array): {
  maxTransferBlocks: number;
  maxUnmapBlocks: number;
} {
  const v = new DataView(d.buffer, d.byteOffset, d.length);
  return { maxTransferBlocks: v.getUint32(8), maxUnmapBlocks: v.getUint32(20) };
}

/** VPD B2h's LBPU bit: UNMAP deallocates. */
export function hasLbpu(d: Uint8Array): boolean {
  return d.length >= 6 && (d[5]! & 0x80) !== 0;
}

/**
 * READ CAPACITY(16) data (at least 12 bytes): the last LBA, the block size and LBPME; null past
 * 2^53 bytes, where no offset is exact (such a disk is not usable here).
 */
export function parseReadCapacity16(
  d: Uint8Array,
): { last: number; blockSize: number; lbpme: boolean } | null {
  const v = new DataView(d.buffer, d.byteOffset, d.length);
  const hi = v.getUint32(0);
  if (hi >= 0x20_0000) return null;
  return {
    last: hi * 2 ** 32 + v.getUint32(4),
    blockSize: v.getUint32(8),
    lbpme: d.length > 14 && (d[14]! & 0x80) !== 0,
  };
}

/** READ CAPACITY(10) data (at least 8 bytes): the last LBA (FFFFFFFFh: too big) and block size. */
export function parseReadCapacity10(d: Uint8Array): { last: number; blockSize: number } {
  const v = new DataView(d.buffer, d.byteOffset, 8);
  return { last: v.getUint32(0), blockSize: v.getUint32(4) };
}

/**
 * MODE SENSE(6) data of the caching page (at least the 4-byte header): WP from the header, WCE
 * from the page when it is there (false otherwise: sd's "Assuming drive cache: write through").
 */
export function parseModeSenseCaching(m: Uint8Array): { readOnly: boolean; writeCache: boolean } {
  const readOnly = (m[2]! & 0x80) !== 0;
  let writeCache = false;
  const page = 4 + m[3]!;
  if (m.length >= page + 3 && (m[page]! & 0x3f) === MODE_PAGE_CACHING) {
    writeCache = (m[page + 2]! & 0x04) !== 0;
  }
  return { readOnly, writeCache };
}
