/**
 * Sense data: the sense keys and the key/ASC/ASCQ table a disk reports (SPC-4 4.5, Annex D.2),
 * fixed-format (70h) and descriptor-format (72h) builders, unit-attention precedence, and the
 * mapping of block-layer errors to sense codes.
 *
 * @module
 */
import { isBlockError } from "../errors.ts";

// Sense keys (SPC-4 Table 28).
export const NO_SENSE = 0x0;
export const RECOVERED_ERROR = 0x1;
export const NOT_READY = 0x2;
export const MEDIUM_ERROR = 0x3;
export const HARDWARE_ERROR = 0x4;
export const ILLEGAL_REQUEST = 0x5;
export const UNIT_ATTENTION = 0x6;
export const DATA_PROTECT = 0x7;
export const ABORTED_COMMAND = 0xb;
export const MISCOMPARE = 0xe;

/** Response code of current fixed-format sense data. */
export const SENSE_FIXED_CURRENT = 0x70;
/** Response code of current descriptor-format sense data. */
export const SENSE_DESCRIPTOR_CURRENT = 0x72;
/** Bytes of fixed-format sense data without additional bytes (additional length 10). */
export const SCSI_SENSE_LEN = 18;

/** Linux's ENOSPC (the host errno a full file system fails a write with). */
const ENOSPC = 28;
/** Bytes of descriptor-format sense data with one information descriptor. */
export const SCSI_SENSE_DESC_INFO_LEN = 20;

/** A sense key with its additional sense code and qualifier. */
export interface SenseCode {
  /** Sense key (SPC-4 4.5.6). */
  readonly key: number;
  /** Additional sense code. */
  readonly asc: number;
  /** Additional sense code qualifier. */
  readonly ascq: number;
}

/** Sense data to report: a code, and the INFORMATION field where the command defines one. */
export interface SenseData {
  /** Key, code and qualifier. */
  readonly code: SenseCode;
  /** INFORMATION field (VALID bit set), e.g. the offset of the first miscompared byte. */
  readonly information?: number;
}

function code(key: number, asc: number, ascq: number): SenseCode {
  return Object.freeze({ key, asc, ascq });
}

/**
 * The sense codes the disk emulation reports, named as QEMU's `SENSE_CODE(...)` table. Each object
 * is frozen and shared, so completions carry a reference and allocate nothing.
 */
export const SENSE_CODE = Object.freeze({
  NO_SENSE: code(NO_SENSE, 0x00, 0x00),
  /** LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED (a disk with no blocks). */
  LUN_NOT_READY: code(NOT_READY, 0x04, 0x03),
  /** WRITE ERROR. */
  WRITE_ERROR: code(MEDIUM_ERROR, 0x0c, 0x00),
  /** SPACE ALLOCATION FAILED WRITE PROTECT (QEMU's sense for ENOSPC). */
  SPACE_ALLOC_FAILED: code(DATA_PROTECT, 0x27, 0x07),
  /** UNRECOVERED READ ERROR. */
  READ_ERROR: code(MEDIUM_ERROR, 0x11, 0x00),
  /** INTERNAL TARGET FAILURE. */
  TARGET_FAILURE: code(HARDWARE_ERROR, 0x44, 0x00),
  /** PARAMETER LIST LENGTH ERROR. */
  INVALID_PARAM_LEN: code(ILLEGAL_REQUEST, 0x1a, 0x00),
  /** INVALID COMMAND OPERATION CODE. */
  INVALID_OPCODE: code(ILLEGAL_REQUEST, 0x20, 0x00),
  /** LOGICAL BLOCK ADDRESS OUT OF RANGE. */
  LBA_OUT_OF_RANGE: code(ILLEGAL_REQUEST, 0x21, 0x00),
  /** INVALID FIELD IN CDB. */
  INVALID_FIELD: code(ILLEGAL_REQUEST, 0x24, 0x00),
  /** LOGICAL UNIT NOT SUPPORTED. */
  LUN_NOT_SUPPORTED: code(ILLEGAL_REQUEST, 0x25, 0x00),
  /** INVALID FIELD IN PARAMETER LIST. */
  INVALID_PARAM: code(ILLEGAL_REQUEST, 0x26, 0x00),
  /** SAVING PARAMETERS NOT SUPPORTED. */
  SAVING_PARAMS_NOT_SUPPORTED: code(ILLEGAL_REQUEST, 0x39, 0x00),
  /** POWER ON, RESET, OR BUS DEVICE RESET OCCURRED. */
  RESET: code(UNIT_ATTENTION, 0x29, 0x00),
  /** CAPACITY DATA HAS CHANGED. */
  CAPACITY_CHANGED: code(UNIT_ATTENTION, 0x2a, 0x09),
  /** REPORTED LUNS DATA HAS CHANGED. */
  REPORTED_LUNS_CHANGED: code(UNIT_ATTENTION, 0x3f, 0x0e),
  /** WRITE PROTECTED. */
  WRITE_PROTECTED: code(DATA_PROTECT, 0x27, 0x00),
  /** MISCOMPARE DURING VERIFY OPERATION. */
  MISCOMPARE: code(MISCOMPARE, 0x1d, 0x00),
});

/** True when `a` and `b` name the same key, ASC and ASCQ. */
export function sameSense(a: SenseCode, b: SenseCode): boolean {
  return a.key === b.key && a.asc === b.asc && a.ascq === b.ascq;
}

/**
 * Writes fixed-format sense data (response code 70h, additional length 10) into `dst` from offset
 * `at`, truncated to the room there, and returns the bytes written. With `information` the VALID
 * bit is set and the INFORMATION field (bytes 3–6) holds it.
 *
 * @example
 * ```ts
 * import { SENSE_CODE, writeFixedSense } from "./sense.ts";
 * const buf = new Uint8Array(18);
 * writeFixedSense(buf, { code: SENSE_CODE.LBA_OUT_OF_RANGE });
 * if (buf[0] !== 0x70 || buf[2] !== 5 || buf[12] !== 0x21 || buf[7] !== 10) throw new Error("sense");
 * ```
 */
export function writeFixedSense(dst: Uint8Array, sense: SenseData, at = 0): number {
  const n = Math.max(0, Math.min(SCSI_SENSE_LEN, dst.length - at));
  // Build in a local 18-byte image first so a short destination gets a clean prefix.
  const b = FIXED_SCRATCH;
  b.fill(0);
  const info = sense.information;
  b[0] = SENSE_FIXED_CURRENT | (info !== undefined ? 0x80 : 0);
  b[2] = sense.code.key & 0x0f;
  if (info !== undefined) {
    b[3] = (info >>> 24) & 0xff;
    b[4] = (info >>> 16) & 0xff;
    b[5] = (info >>> 8) & 0xff;
    b[6] = info & 0xff;
  }
  b[7] = SCSI_SENSE_LEN - 8;
  b[12] = sense.code.asc;
  b[13] = sense.code.ascq;
  dst.set(b.subarray(0, n), at);
  return n;
}

const FIXED_SCRATCH = new Uint8Array(SCSI_SENSE_LEN);
const DESC_SCRATCH = new Uint8Array(SCSI_SENSE_DESC_INFO_LEN);

/**
 * Writes descriptor-format sense data (response code 72h) into `dst` from offset `at`, with an
 * information descriptor when `sense.information` is set; returns the bytes written (truncated).
 */
export function writeDescriptorSense(dst: Uint8Array, sense: SenseData, at = 0): number {
  const b = DESC_SCRATCH;
  b.fill(0);
  b[0] = SENSE_DESCRIPTOR_CURRENT;
  b[1] = sense.code.key & 0x0f;
  b[2] = sense.code.asc;
  b[3] = sense.code.ascq;
  let len = 8;
  const info = sense.information;
  if (info !== undefined) {
    // Information descriptor (SPC-4 4.5.2.2): type 0, length 0Ah, VALID, 8-byte INFORMATION.
    b[8] = 0x00;
    b[9] = 0x0a;
    b[10] = 0x80;
    b[16] = (info >>> 24) & 0xff;
    b[17] = (info >>> 16) & 0xff;
    b[18] = (info >>> 8) & 0xff;
    b[19] = info & 0xff;
    len = SCSI_SENSE_DESC_INFO_LEN;
  }
  b[7] = len - 8;
  const n = Math.max(0, Math.min(len, dst.length - at));
  dst.set(b.subarray(0, n), at);
  return n;
}

/**
 * Precedence of a unit attention condition, lower first (QEMU's `scsi_ua_precedence`, after
 * SAM-5 5.14): the reset family outranks everything, then by ASC/ASCQ. A non-UA code never wins.
 */
export function uaPrecedence(sense: SenseCode | null): number {
  if (sense === null || sense.key !== UNIT_ATTENTION) return Number.MAX_SAFE_INTEGER;
  const { asc, ascq } = sense;
  if (asc === 0x29 && ascq === 0x04) return 1; // DEVICE INTERNAL RESET goes with POWER ON
  if (asc === 0x3f && ascq === 0x01) return 2; // MICROCODE CHANGED goes with BUS RESET
  if (asc === 0x29 && ascq !== 0x05 && ascq !== 0x06 && ascq <= 0x07) return ascq;
  if (asc === 0x2f && ascq === 0x01) return 8; // COMMANDS CLEARED BY POWER LOSS NOTIFICATION
  return (asc << 8) | ascq;
}

/** The sense code a failed block-layer read becomes (SBC-3 4.18: unrecovered read error). */
export function senseForReadError(e: unknown): SenseCode {
  if (isBlockError(e, "out-of-range")) return SENSE_CODE.LBA_OUT_OF_RANGE;
  return SENSE_CODE.READ_ERROR;
}

/**
 * The sense code a failed block-layer write, zero-write, discard or flush becomes: a read-only (or
 * corrupt, hence read-only) node is WRITE PROTECTED, a host out of space (ENOSPC) SPACE ALLOCATION
 * FAILED as QEMU's `scsi_sense_from_errno`, everything else a WRITE ERROR.
 */
export function senseForWriteError(e: unknown): SenseCode {
  if (isBlockError(e) && e.context.errno === ENOSPC) return SENSE_CODE.SPACE_ALLOC_FAILED;
  if (isBlockError(e, "read-only") || isBlockError(e, "corrupt")) {
    return SENSE_CODE.WRITE_PROTECTED;
  }
  if (isBlockError(e, "out-of-range")) return SENSE_CODE.LBA_OUT_OF_RANGE;
  return SENSE_CODE.WRITE_ERROR;
}
