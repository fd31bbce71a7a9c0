/**
 * INQUIRY (SPC-4 6.6): standard data and the vital product data pages a disk reports — supported
 * pages (00h), unit serial number (80h), device identification (83h), block limits (B0h), block
 * device characteristics (B1h) and logical block provisioning (B2h) — laid out as QEMU's scsi-hd
 * lays them out.
 *
 * @module
 */
import {
  SCSI_INQUIRY_LEN,
  SCSI_VERSION_SPC3,
  TYPE_DISK,
  VPD_BLOCK_DEVICE_CHARACTERISTICS,
  VPD_BLOCK_LIMITS,
  VPD_DEVICE_IDENTIFICATION,
  VPD_LOGICAL_BLOCK_PROVISIONING,
  VPD_SUPPORTED_PAGES,
  VPD_UNIT_SERIAL_NUMBER,
} from "./constants.ts";
import type { DiskProfile } from "./profile.ts";

/** Room a VPD page may need: a 4-byte header and at most 255 page bytes as built here. */
export const VPD_MAX_LEN = 4 + 255;
/** Longest serial number reported in VPD 80h (QEMU's limit). */
const MAX_SERIAL = 36;
/** Longest ASCII device identifier in VPD 83h: the designator must fit the 255-byte page. */
const MAX_DEVICE_ID = 255 - 8;
/** BLOCK LIMITS page length (SBC-3 6.6.4), with the unmap fields. */
const BLOCK_LIMITS_LEN = 0x3c;
/** BLOCK DEVICE CHARACTERISTICS page length (SBC-3 6.6.2). */
const BLOCK_CHARACTERISTICS_LEN = 0x3c;
/** LOGICAL BLOCK PROVISIONING page length without a provisioning group descriptor. */
const PROVISIONING_LEN = 4;

/** Writes `text` as a space-padded ASCII field of `width` bytes at `at` (SPC-4 4.4.1). */
function putAscii(out: Uint8Array, at: number, width: number, text: string): void {
  for (let i = 0; i < width; i++) {
    const c = i < text.length ? text.charCodeAt(i) : 0x20;
    // Only printable ASCII is allowed in these fields; anything else becomes a space.
    out[at + i] = c >= 0x20 && c < 0x7f ? c : 0x20;
  }
}

function putU16(out: Uint8Array, at: number, v: number): void {
  out[at] = (v >>> 8) & 0xff;
  out[at + 1] = v & 0xff;
}

function putU32(out: Uint8Array, at: number, v: number): void {
  out[at] = (v >>> 24) & 0xff;
  out[at + 1] = (v >>> 16) & 0xff;
  out[at + 2] = (v >>> 8) & 0xff;
  out[at + 3] = v & 0xff;
}

/**
 * Standard INQUIRY data (36 bytes) into `out`: a direct-access device, not removable, SPC-3,
 * response data format 2 with HISUP, SYNC and CMDQUE, then vendor, product and revision.
 *
 * @returns the bytes of standard data (36)
 */
export function standardInquiry(profile: DiskProfile, out: Uint8Array): number {
  out.fill(0, 0, SCSI_INQUIRY_LEN);
  out[0] = TYPE_DISK; // peripheral qualifier 000b: connected
  out[1] = 0; // RMB 0: not removable
  // QEMU claims SPC-3: guests then use READ CAPACITY (16) and the block VPD pages.
  out[2] = SCSI_VERSION_SPC3;
  out[3] = 0x10 | 0x02; // HISUP, RESPONSE DATA FORMAT 2
  out[4] = SCSI_INQUIRY_LEN - 5; // ADDITIONAL LENGTH: bytes after byte 4
  out[7] = 0x10 | 0x02; // SYNC, CMDQUE (tagged queueing)
  putAscii(out, 8, 8, profile.vendor);
  putAscii(out, 16, 16, profile.product);
  putAscii(out, 32, 4, profile.revision);
  return SCSI_INQUIRY_LEN;
}

/**
 * A vital product data page into `out` (at least {@linkcode VPD_MAX_LEN} bytes).
 *
 * @returns the page's bytes including the header, or -1 for a page the disk does not have
 */
export function vpdPage(profile: DiskProfile, pageCode: number, out: Uint8Array): number {
  out.fill(0, 0, VPD_MAX_LEN);
  out[0] = TYPE_DISK;
  out[1] = pageCode;
  let len = 4;
  switch (pageCode) {
    case VPD_SUPPORTED_PAGES:
      out[len++] = VPD_SUPPORTED_PAGES;
      if (profile.serial !== undefined) out[len++] = VPD_UNIT_SERIAL_NUMBER;
      out[len++] = VPD_DEVICE_IDENTIFICATION;
      out[len++] = VPD_BLOCK_LIMITS;
      out[len++] = VPD_BLOCK_DEVICE_CHARACTERISTICS;
      out[len++] = VPD_LOGICAL_BLOCK_PROVISIONING;
      break;
    case VPD_UNIT_SERIAL_NUMBER: {
      const serial = profile.serial;
      if (serial === undefined) return -1;
      const n = Math.min(serial.length, MAX_SERIAL);
      putAscii(out, len, n, serial);
      len += n;
      break;
    }
    case VPD_DEVICE_IDENTIFICATION: {
      const id = profile.deviceId;
      if (id !== undefined && id.length > 0) {
        const n = Math.min(id.length, MAX_DEVICE_ID);
        out[len++] = 0x02; // CODE SET: ASCII
        out[len++] = 0x00; // ASSOCIATION: logical unit; DESIGNATOR TYPE: vendor specific
        out[len++] = 0;
        out[len++] = n;
        putAscii(out, len, n, id);
        len += n;
      }
      if (profile.wwn !== undefined) {
        out[len++] = 0x01; // CODE SET: binary
        out[len++] = 0x03; // DESIGNATOR TYPE: NAA
        out[len++] = 0;
        out[len++] = 8;
        const wwn = profile.wwn & 0xffff_ffff_ffff_ffffn;
        putU32(out, len, Number(wwn >> 32n));
        putU32(out, len + 4, Number(wwn & 0xffff_ffffn));
        len += 8;
      }
      break;
    }
    case VPD_BLOCK_LIMITS: {
      const max = profile.maxTransferBlocks;
      out[4] = 0x01; // WSNZ: a WRITE SAME of 0 blocks is invalid
      putU16(out, 6, 0); // OPTIMAL TRANSFER LENGTH GRANULARITY: none
      putU32(out, 8, max); // MAXIMUM TRANSFER LENGTH
      putU32(out, 12, 0); // OPTIMAL TRANSFER LENGTH: none
      if (profile.discard) {
        putU32(out, 20, profile.maxUnmapBlocks); // MAXIMUM UNMAP LBA COUNT
        putU32(out, 24, profile.maxUnmapDescriptors); // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
        putU32(out, 28, profile.unmapGranularity); // OPTIMAL UNMAP GRANULARITY
      }
      putU32(out, 40, max); // MAXIMUM WRITE SAME LENGTH (low half of the 8-byte field)
      len = 4 + BLOCK_LIMITS_LEN;
      break;
    }
    case VPD_BLOCK_DEVICE_CHARACTERISTICS:
      putU16(out, 4, profile.rotationRate); // MEDIUM ROTATION RATE
      len = 4 + BLOCK_CHARACTERISTICS_LEN;
      break;
    case VPD_LOGICAL_BLOCK_PROVISIONING:
      out[4] = 0; // THRESHOLD EXPONENT
      // LBPU, LBPWS, LBPWS10: UNMAP and both WRITE SAMEs with UNMAP deallocate.
      out[5] = profile.discard ? 0xe0 : 0;
      out[6] = profile.discard ? 0x02 : 0x00; // PROVISIONING TYPE: thin, else fully provisioned
      len = 4 + PROVISIONING_LEN;
      break;
    default:
      return -1;
  }
  putU16(out, 2, len - 4); // PAGE LENGTH
  return len;
}
