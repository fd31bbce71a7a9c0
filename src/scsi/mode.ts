/**
 * MODE SENSE (6)/(10) and MODE SELECT (6)/(10) (SPC-4 6.11–6.14) over QEMU scsi-hd's set of mode
 * pages: read-write error recovery (01h), rigid disk geometry (04h), flexible disk (05h) and caching
 * (08h), where only the caching page's WCE bit is changeable. Saved values are not supported.
 *
 * Offsets inside a page below count from the page's first parameter byte (after the 2-byte page
 * header), as QEMU's do, so MODE SENSE and MODE SELECT share them.
 *
 * @module
 */
import {
  MODE_PAGE_ALLS,
  MODE_PAGE_CACHING,
  MODE_PAGE_FLEXIBLE_DISK_GEOMETRY,
  MODE_PAGE_HD_GEOMETRY,
  MODE_PAGE_R_W_ERROR,
  MODE_PC_CHANGEABLE,
  MODE_PC_CURRENT,
  MODE_PC_DEFAULT,
  MODE_PC_SAVED,
} from "./constants.ts";
import { SENSE_CODE, type SenseCode } from "./sense.ts";
import type { DiskProfile } from "./profile.ts";

/** Pages in the order MODE SENSE "all pages" returns them. */
const PAGES = [
  MODE_PAGE_R_W_ERROR,
  MODE_PAGE_HD_GEOMETRY,
  MODE_PAGE_FLEXIBLE_DISK_GEOMETRY,
  MODE_PAGE_CACHING,
] as const;

/** Parameter bytes of each page (the PAGE LENGTH field). */
function pageLength(page: number): number {
  switch (page) {
    case MODE_PAGE_R_W_ERROR:
      return 0x0a;
    case MODE_PAGE_HD_GEOMETRY:
      return 0x16;
    case MODE_PAGE_FLEXIBLE_DISK_GEOMETRY:
      return 0x1e;
    case MODE_PAGE_CACHING:
      return 0x12;
    default:
      return -1;
  }
}

/** Room MODE SENSE needs at most: an 8-byte header, an 8-byte block descriptor and all pages. */
export const MODE_SENSE_MAX_LEN = 8 + 8 + PAGES.reduce((n, p) => n + 2 + pageLength(p), 0);

/** Caching page byte 0 (after the header): WCE, write cache enable. */
const CACHING_WCE = 0x04;
/** Read-write error recovery byte 0: AWRE, automatic write reallocation enabled. */
const RW_ERROR_AWRE = 0x80;
/** Device-specific parameter of a direct-access device: WP, write protected. */
const DSP_WP = 0x80;
/** Device-specific parameter: DPOFUA, the DPO and FUA bits are supported. */
const DSP_DPOFUA = 0x10;
/** Rotation rate the geometry pages report (QEMU's constant). */
const GEOMETRY_RPM = 5400;

/**
 * The CHS geometry a disk without a partition table gets (QEMU's `guess_chs_for_size`): 16 heads,
 * 63 sectors, cylinders from the size, clamped to 2..16383.
 */
export function guessGeometry(
  capacity: number,
  blockSize: number,
): { cylinders: number; heads: number; sectors: number } {
  const sectors512 = Math.floor((capacity * blockSize) / 512);
  const cylinders = Math.min(16383, Math.max(2, Math.floor(sectors512 / (16 * 63))));
  return { cylinders, heads: 16, sectors: 63 };
}

/**
 * Writes mode page `page` for page control `pc` at `out[at]`.
 *
 * @returns the bytes written (header included), or -1 for a page the disk does not have
 */
function modePage(
  profile: DiskProfile,
  page: number,
  pc: number,
  out: Uint8Array,
  at: number,
): number {
  const length = pageLength(page);
  if (length < 0) return -1;
  out.fill(0, at, at + 2 + length);
  out[at] = page;
  out[at + 1] = length;
  const p = at + 2;
  const changeable = pc === MODE_PC_CHANGEABLE;
  switch (page) {
    case MODE_PAGE_R_W_ERROR:
      if (!changeable) out[p] = RW_ERROR_AWRE;
      break;
    case MODE_PAGE_HD_GEOMETRY: {
      if (changeable) break;
      const g = guessGeometry(profile.capacity, profile.blockSize);
      put24(out, p, g.cylinders);
      out[p + 3] = g.heads;
      put24(out, p + 4, g.cylinders); // write precompensation start: disabled
      put24(out, p + 7, g.cylinders); // reduced current start: disabled
      put16(out, p + 10, 200); // device step rate
      put24(out, p + 12, 0xffffff); // landing zone cylinder
      put16(out, p + 18, GEOMETRY_RPM);
      break;
    }
    case MODE_PAGE_FLEXIBLE_DISK_GEOMETRY: {
      if (changeable) break;
      const g = guessGeometry(profile.capacity, profile.blockSize);
      put16(out, p, 5000); // transfer rate, kbit/s
      out[p + 2] = g.heads;
      out[p + 3] = g.sectors;
      put16(out, p + 4, profile.blockSize); // data bytes per sector
      put16(out, p + 6, g.cylinders);
      put16(out, p + 8, g.cylinders); // write precompensation start: disabled
      put16(out, p + 10, g.cylinders); // reduced current start: disabled
      put16(out, p + 12, 1); // device step rate, 100 µs
      out[p + 14] = 1; // step pulse width, µs
      put16(out, p + 15, 1); // head settle delay, 100 µs
      out[p + 17] = 1; // motor on delay, 0.1 s
      out[p + 18] = 1; // motor off delay, 0.1 s
      put16(out, p + 26, GEOMETRY_RPM);
      break;
    }
    case MODE_PAGE_CACHING: {
      const wce = pc === MODE_PC_CHANGEABLE || pc === MODE_PC_DEFAULT ||
        (pc === MODE_PC_CURRENT && profile.writeCache);
      if (wce) out[p] = CACHING_WCE;
      break;
    }
  }
  return 2 + length;
}

function put16(out: Uint8Array, at: number, v: number): void {
  out[at] = (v >>> 8) & 0xff;
  out[at + 1] = v & 0xff;
}

function put24(out: Uint8Array, at: number, v: number): void {
  out[at] = (v >>> 16) & 0xff;
  out[at + 1] = (v >>> 8) & 0xff;
  out[at + 2] = v & 0xff;
}

function put32(out: Uint8Array, at: number, v: number): void {
  out[at] = (v >>> 24) & 0xff;
  out[at + 1] = (v >>> 16) & 0xff;
  out[at + 2] = (v >>> 8) & 0xff;
  out[at + 3] = v & 0xff;
}

/** What MODE SENSE asks for. */
export interface ModeSenseRequest {
  /** MODE SENSE (10) (8-byte header) rather than (6). */
  readonly ten: boolean;
  /** DBD: no block descriptor. */
  readonly dbd: boolean;
  readonly pageControl: number;
  readonly pageCode: number;
  readonly subpageCode: number;
}

/**
 * MODE SENSE parameter data into `out` (at least {@linkcode MODE_SENSE_MAX_LEN} bytes): header,
 * a short-LBA block descriptor unless DBD (or the disk is empty), and the page(s).
 *
 * @returns the bytes of parameter data, or the sense code to report
 */
export function modeSense(
  profile: DiskProfile,
  req: ModeSenseRequest,
  out: Uint8Array,
): number | SenseCode {
  if (req.pageControl === MODE_PC_SAVED) return SENSE_CODE.SAVING_PARAMS_NOT_SUPPORTED;
  // No page has subpages; "all pages and subpages" (3Fh/FFh) is "all pages" then.
  const allPages = req.pageCode === MODE_PAGE_ALLS;
  if (req.subpageCode !== 0 && !(allPages && req.subpageCode === 0xff)) {
    return SENSE_CODE.INVALID_FIELD;
  }
  if (!allPages && pageLength(req.pageCode) < 0) return SENSE_CODE.INVALID_FIELD;

  out.fill(0, 0, MODE_SENSE_MAX_LEN);
  const hdr = req.ten ? 8 : 4;
  const dsp = (profile.readOnly ? DSP_WP : 0) | DSP_DPOFUA;
  out[req.ten ? 3 : 2] = dsp;
  let len = hdr;
  if (!req.dbd && profile.capacity > 0) {
    // Short LBA block descriptor (SBC-3 6.4.2): block count, clamped to FFFFFFFFh, then length.
    put32(out, len, Math.min(profile.capacity, 0xffffffff));
    put24(out, len + 5, profile.blockSize);
    len += 8;
    if (req.ten) put16(out, 6, 8);
    else out[3] = 8;
  }
  if (allPages) {
    for (const page of PAGES) len += modePage(profile, page, req.pageControl, out, len);
  } else {
    len += modePage(profile, req.pageCode, req.pageControl, out, len);
  }
  // MODE DATA LENGTH counts the bytes after itself.
  if (req.ten) put16(out, 0, len - 2);
  else out[0] = len - 1;
  return len;
}

/** What MODE SELECT changes. */
export interface ModeSelectChanges {
  /** New WCE bit, when the caching page was sent. */
  writeCache?: boolean;
}

/** What MODE SELECT asks for. */
export interface ModeSelectRequest {
  readonly ten: boolean;
  readonly pf: boolean;
  readonly sp: boolean;
}

/**
 * Validates a MODE SELECT parameter list (`params`, exactly the PARAMETER LIST LENGTH bytes) and
 * returns the changes to apply. Nothing is applied by this function: a list with any bad page
 * changes nothing (QEMU's two passes).
 *
 * @returns the changes, or the sense code to report
 */
export function modeSelect(
  profile: DiskProfile,
  req: ModeSelectRequest,
  params: Uint8Array,
): ModeSelectChanges | SenseCode {
  // Only page-format parameters, never saved (QEMU: PF=1, SP=0).
  if (!req.pf || req.sp) return SENSE_CODE.INVALID_FIELD;
  const changes: ModeSelectChanges = {};
  let len = params.length;
  if (len === 0) return changes;
  const hdr = req.ten ? 8 : 4;
  if (len < hdr) return SENSE_CODE.INVALID_PARAM_LEN;
  const bdLen = req.ten ? (params[6]! << 8) | params[7]! : params[3]!;
  len -= hdr;
  let p = hdr;
  if (len < bdLen) return SENSE_CODE.INVALID_PARAM_LEN;
  if (bdLen !== 0 && bdLen !== 8) return SENSE_CODE.INVALID_PARAM;
  if (bdLen === 8) {
    // The block size cannot change: a descriptor must name the current one (or 0, "no change").
    const blockLength = (params[p + 5]! << 16) | (params[p + 6]! << 8) | params[p + 7]!;
    if (blockLength !== 0 && blockLength !== profile.blockSize) return SENSE_CODE.INVALID_PARAM;
  }
  len -= bdLen;
  p += bdLen;

  const current = new Uint8Array(2 + 0xff);
  const changeable = new Uint8Array(2 + 0xff);
  while (len > 0) {
    const page = params[p]! & 0x3f;
    let subpage = 0;
    let pageLen: number;
    if ((params[p]! & 0x40) !== 0) {
      // SPF: sub-page format, a 4-byte page header.
      if (len < 4) return SENSE_CODE.INVALID_PARAM_LEN;
      subpage = params[p + 1]!;
      pageLen = (params[p + 2]! << 8) | params[p + 3]!;
      p += 4;
      len -= 4;
    } else {
      if (len < 2) return SENSE_CODE.INVALID_PARAM_LEN;
      pageLen = params[p + 1]!;
      p += 2;
      len -= 2;
    }
    if (subpage !== 0) return SENSE_CODE.INVALID_PARAM;
    if (pageLen > len) return SENSE_CODE.INVALID_PARAM_LEN;
    // "All pages" is for MODE SENSE only; an unknown page or a wrong length is invalid.
    if (page === MODE_PAGE_ALLS || pageLength(page) !== pageLen) return SENSE_CODE.INVALID_PARAM;
    modePage(profile, page, MODE_PC_CURRENT, current, 0);
    modePage(profile, page, MODE_PC_CHANGEABLE, changeable, 0);
    // Every bit that is not changeable must equal what MODE SENSE reports.
    for (let i = 0; i < pageLen; i++) {
      if (((current[2 + i]! ^ params[p + i]!) & ~changeable[2 + i]!) !== 0) {
        return SENSE_CODE.INVALID_PARAM;
      }
    }
    if (page === MODE_PAGE_CACHING) changes.writeCache = (params[p]! & CACHING_WCE) !== 0;
    p += pageLen;
    len -= pageLen;
  }
  return changes;
}
