/**
 * Command descriptor block decoding for the commands a SCSI disk emulates: one decoder per
 * operation code, each checking that the transport delivered the whole CDB, validating the fields
 * the command defines (SPC-4, SBC-3), and stating the data phase the command implies so the
 * transport can check it against the driver's buffers before anything runs.
 *
 * A CDB that cannot be executed decodes to `kind: "invalid"` with the sense code to report
 * (INVALID COMMAND OPERATION CODE or INVALID FIELD IN CDB) and no data phase.
 *
 * @module
 */
import {
  INQUIRY,
  MODE_SELECT,
  MODE_SELECT_10,
  MODE_SENSE,
  MODE_SENSE_10,
  READ_10,
  READ_12,
  READ_16,
  READ_6,
  READ_CAPACITY_10,
  REPORT_LUNS,
  REQUEST_SENSE,
  SAI_READ_CAPACITY_16,
  SERVICE_ACTION_IN_16,
  START_STOP,
  SYNCHRONIZE_CACHE,
  SYNCHRONIZE_CACHE_16,
  TEST_UNIT_READY,
  UNMAP,
  VERIFY_10,
  VERIFY_12,
  VERIFY_16,
  WRITE_10,
  WRITE_12,
  WRITE_16,
  WRITE_6,
  WRITE_SAME_10,
  WRITE_SAME_16,
} from "./constants.ts";
import { SENSE_CODE, type SenseCode } from "./sense.ts";

/** No data phase. */
export const DATA_NONE = 0;
/** Data-in: device to driver. */
export const DATA_IN = 1;
/** Data-out: driver to device. */
export const DATA_OUT = 2;
/** Direction of a command's data phase. */
export type DataDirection = typeof DATA_NONE | typeof DATA_IN | typeof DATA_OUT;

/** Bytes of the READ CAPACITY (10) parameter data. */
export const READ_CAPACITY_10_LEN = 8;
/** Bytes of the READ CAPACITY (16) parameter data. */
export const READ_CAPACITY_16_LEN = 32;

/** What the decoder needs to know about the logical unit. */
export interface CdbContext {
  /** Logical block size in bytes. */
  readonly blockSize: number;
  /** MAXIMUM TRANSFER LENGTH (VPD B0h), in blocks: longer READ/WRITE/WRITE SAME are invalid. */
  readonly maxTransferBlocks: number;
}

/** Fields every decoded CDB has. */
export interface CdbCommon {
  /** Operation code (byte 0). */
  readonly opcode: number;
  /** Direction of the data phase the CDB implies. */
  readonly direction: DataDirection;
  /**
   * Bytes of the data phase: exact for transfers (READ, WRITE, parameter lists), an upper bound
   * for allocation lengths (`lengthIsLimit`).
   */
  readonly length: number;
  /** True when `length` is an ALLOCATION LENGTH: the device may transfer less. */
  readonly lengthIsLimit: boolean;
}

/** A decoded logical-block transfer: READ, WRITE. */
export interface BlockTransfer {
  /** First logical block. */
  readonly lba: number;
  /** Logical blocks to transfer. */
  readonly blocks: number;
  /** Force unit access: the data is on stable storage before the command completes. */
  readonly fua: boolean;
}

/** A decoded CDB, by kind. */
export type Cdb =
  | CdbCommon & { readonly kind: "invalid"; readonly sense: SenseCode }
  | CdbCommon & { readonly kind: "test-unit-ready" }
  | CdbCommon & {
    readonly kind: "request-sense";
    readonly desc: boolean;
    readonly allocationLength: number;
  }
  | CdbCommon & {
    readonly kind: "inquiry";
    readonly evpd: boolean;
    readonly pageCode: number;
    readonly allocationLength: number;
  }
  | CdbCommon & {
    readonly kind: "mode-sense";
    /** MODE SENSE (10): 8-byte header. */
    readonly ten: boolean;
    readonly dbd: boolean;
    readonly pageControl: number;
    readonly pageCode: number;
    readonly subpageCode: number;
    readonly allocationLength: number;
  }
  | CdbCommon & {
    readonly kind: "mode-select";
    readonly ten: boolean;
    readonly pf: boolean;
    readonly sp: boolean;
    readonly parameterListLength: number;
  }
  | CdbCommon & {
    readonly kind: "start-stop-unit";
    readonly immed: boolean;
    readonly powerCondition: number;
    readonly loej: boolean;
    readonly start: boolean;
  }
  | CdbCommon & { readonly kind: "read-capacity-10"; readonly lba: number; readonly pmi: boolean }
  | CdbCommon & {
    readonly kind: "read-capacity-16";
    readonly lba: number;
    readonly pmi: boolean;
    readonly allocationLength: number;
  }
  | CdbCommon & BlockTransfer & { readonly kind: "read" }
  | CdbCommon & BlockTransfer & { readonly kind: "write" }
  | CdbCommon & {
    readonly kind: "verify";
    readonly lba: number;
    readonly blocks: number;
    /** 0: medium check only; 1: compare with data-out; 3: compare one block with each. */
    readonly bytchk: number;
  }
  | CdbCommon & {
    readonly kind: "synchronize-cache";
    readonly lba: number;
    readonly blocks: number;
    readonly immed: boolean;
  }
  | CdbCommon & {
    readonly kind: "write-same";
    readonly lba: number;
    readonly blocks: number;
    readonly unmap: boolean;
    /** NO DATA-OUT BUFFER (WRITE SAME (16)): write zeroes. */
    readonly ndob: boolean;
  }
  | CdbCommon & { readonly kind: "unmap"; readonly parameterListLength: number }
  | CdbCommon & {
    readonly kind: "report-luns";
    readonly selectReport: number;
    readonly allocationLength: number;
  };

/** The kinds of {@linkcode Cdb}. */
export type CdbKind = Cdb["kind"];

/**
 * CDB length from the operation code's group (SAM-5 5.2): 6, 10, 12 or 16 bytes, or -1 for the
 * reserved and vendor-specific groups.
 */
export function cdbLength(opcode: number): number {
  switch (opcode >>> 5) {
    case 0:
      return 6;
    case 1:
    case 2:
      return 10;
    case 4:
      return 16;
    case 5:
      return 12;
    default:
      return -1;
  }
}

function u16(b: Uint8Array, at: number): number {
  return (b[at]! << 8) | b[at + 1]!;
}

function u32(b: Uint8Array, at: number): number {
  return ((b[at]! << 24) >>> 0) + ((b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!);
}

/**
 * A 64-bit big-endian LBA as a number. Values past 2^53 cannot name a block of any node (sizes are
 * safe integers of bytes), so they clamp to `Number.MAX_SAFE_INTEGER`, which the range check then
 * rejects as LBA OUT OF RANGE instead of silently losing precision.
 */
function u64(b: Uint8Array, at: number): number {
  const hi = u32(b, at);
  if (hi >= 0x20_0000) return Number.MAX_SAFE_INTEGER;
  return hi * 0x1_0000_0000 + u32(b, at + 4);
}

function invalid(opcode: number, sense: SenseCode): Cdb {
  return { kind: "invalid", opcode, direction: DATA_NONE, length: 0, lengthIsLimit: false, sense };
}

function dataIn(length: number, lengthIsLimit: boolean) {
  return { direction: length > 0 ? DATA_IN : DATA_NONE, length, lengthIsLimit } as const;
}

function dataOut(length: number) {
  return { direction: length > 0 ? DATA_OUT : DATA_NONE, length, lengthIsLimit: false } as const;
}

const NONE = { direction: DATA_NONE, length: 0, lengthIsLimit: false } as const;

/** RDPROTECT/WRPROTECT/VRPROTECT (byte 1 bits 7–5): protection information is not supported. */
const PROTECT_MASK = 0xe0;
/** NACA bit of the CONTROL byte (SAM-5 5.2): ACA is not supported. */
const CONTROL_NACA = 0x04;

/**
 * Decodes `cdb` (the bytes the transport delivered, possibly fewer than the CDB needs) for a disk
 * with `ctx`'s geometry.
 *
 * @returns the decoded command, or `kind: "invalid"` with INVALID COMMAND OPERATION CODE (unknown
 *   opcode, or a CDB longer than the bytes delivered) or INVALID FIELD IN CDB
 *
 * @example
 * ```ts
 * import { decodeCdb } from "./cdb.ts";
 * const cdb = new Uint8Array([0x28, 0, 0, 0, 0, 8, 0, 0, 4, 0]); // READ (10) LBA 8, 4 blocks
 * const c = decodeCdb(cdb, { blockSize: 512, maxTransferBlocks: 65535 });
 * if (c.kind !== "read" || c.lba !== 8 || c.length !== 2048) throw new Error("decode");
 * ```
 */
export function decodeCdb(cdb: Uint8Array, ctx: CdbContext): Cdb {
  if (cdb.length === 0) return invalid(0, SENSE_CODE.INVALID_OPCODE);
  const op = cdb[0]!;
  const need = cdbLength(op);
  // The driver's cdb_size may be smaller than the command: QEMU treats that as an invalid opcode.
  if (need < 0 || need > cdb.length) return invalid(op, SENSE_CODE.INVALID_OPCODE);
  const known = decodeKnown(op, cdb, ctx);
  if (known === null) return invalid(op, SENSE_CODE.INVALID_OPCODE);
  if (known.kind !== "invalid" && (cdb[need - 1]! & CONTROL_NACA) !== 0) {
    return invalid(op, SENSE_CODE.INVALID_FIELD);
  }
  return known;
}

function decodeKnown(op: number, b: Uint8Array, ctx: CdbContext): Cdb | null {
  switch (op) {
    case TEST_UNIT_READY:
      return { kind: "test-unit-ready", opcode: op, ...NONE };
    case REQUEST_SENSE: {
      const allocationLength = b[4]!;
      return {
        kind: "request-sense",
        opcode: op,
        desc: (b[1]! & 1) !== 0,
        allocationLength,
        ...dataIn(allocationLength, true),
      };
    }
    case INQUIRY: {
      const evpd = (b[1]! & 1) !== 0;
      const pageCode = b[2]!;
      // Standard data has no page: a page code without EVPD is invalid (SPC-4 6.6.1).
      if (!evpd && pageCode !== 0) return invalid(op, SENSE_CODE.INVALID_FIELD);
      const allocationLength = u16(b, 3);
      return {
        kind: "inquiry",
        opcode: op,
        evpd,
        pageCode,
        allocationLength,
        ...dataIn(allocationLength, true),
      };
    }
    case MODE_SENSE:
    case MODE_SENSE_10: {
      const ten = op === MODE_SENSE_10;
      const allocationLength = ten ? u16(b, 7) : b[4]!;
      return {
        kind: "mode-sense",
        opcode: op,
        ten,
        dbd: (b[1]! & 0x08) !== 0,
        pageControl: b[2]! >>> 6,
        pageCode: b[2]! & 0x3f,
        subpageCode: b[3]!,
        allocationLength,
        ...dataIn(allocationLength, true),
      };
    }
    case MODE_SELECT:
    case MODE_SELECT_10: {
      const ten = op === MODE_SELECT_10;
      const parameterListLength = ten ? u16(b, 7) : b[4]!;
      return {
        kind: "mode-select",
        opcode: op,
        ten,
        pf: (b[1]! & 0x10) !== 0,
        sp: (b[1]! & 0x01) !== 0,
        parameterListLength,
        ...dataOut(parameterListLength),
      };
    }
    case START_STOP:
      return {
        kind: "start-stop-unit",
        opcode: op,
        immed: (b[1]! & 1) !== 0,
        powerCondition: b[4]! >>> 4,
        loej: (b[4]! & 2) !== 0,
        start: (b[4]! & 1) !== 0,
        ...NONE,
      };
    case READ_CAPACITY_10: {
      const lba = u32(b, 2);
      const pmi = (b[8]! & 1) !== 0;
      // Without PMI the LBA field must be zero (SBC-3 5.15.1; QEMU checks it too).
      if (!pmi && lba !== 0) return invalid(op, SENSE_CODE.INVALID_FIELD);
      return {
        kind: "read-capacity-10",
        opcode: op,
        lba,
        pmi,
        ...dataIn(READ_CAPACITY_10_LEN, false),
      };
    }
    case SERVICE_ACTION_IN_16: {
      // Only READ CAPACITY (16) is implemented among the service actions (QEMU: INVALID FIELD).
      if ((b[1]! & 0x1f) !== SAI_READ_CAPACITY_16) return invalid(op, SENSE_CODE.INVALID_FIELD);
      const lba = u64(b, 2);
      const pmi = (b[14]! & 1) !== 0;
      if (!pmi && lba !== 0) return invalid(op, SENSE_CODE.INVALID_FIELD);
      const allocationLength = u32(b, 10);
      return {
        kind: "read-capacity-16",
        opcode: op,
        lba,
        pmi,
        allocationLength,
        ...dataIn(allocationLength, true),
      };
    }
    case READ_6:
    case WRITE_6: {
      // Byte 1 bits 7–5 are reserved (once the LUN): QEMU rejects them as protection bits.
      if ((b[1]! & PROTECT_MASK) !== 0) return invalid(op, SENSE_CODE.INVALID_FIELD);
      const lba = ((b[1]! & 0x1f) << 16) | (b[2]! << 8) | b[3]!;
      // A TRANSFER LENGTH of 0 means 256 blocks in the 6-byte commands (SBC-3 5.10).
      const blocks = b[4]! === 0 ? 256 : b[4]!;
      return transfer(op, op === READ_6 ? "read" : "write", lba, blocks, false, ctx);
    }
    case READ_10:
    case WRITE_10:
      if ((b[1]! & PROTECT_MASK) !== 0) return invalid(op, SENSE_CODE.INVALID_FIELD);
      return transfer(op, op === READ_10 ? "read" : "write", u32(b, 2), u16(b, 7), fua(b), ctx);
    case READ_12:
    case WRITE_12:
      if ((b[1]! & PROTECT_MASK) !== 0) return invalid(op, SENSE_CODE.INVALID_FIELD);
      return transfer(op, op === READ_12 ? "read" : "write", u32(b, 2), u32(b, 6), fua(b), ctx);
    case READ_16:
    case WRITE_16:
      if ((b[1]! & PROTECT_MASK) !== 0) return invalid(op, SENSE_CODE.INVALID_FIELD);
      return transfer(op, op === READ_16 ? "read" : "write", u64(b, 2), u32(b, 10), fua(b), ctx);
    case VERIFY_10:
      return verify(op, b, u32(b, 2), u16(b, 7), ctx);
    case VERIFY_12:
      return verify(op, b, u32(b, 2), u32(b, 6), ctx);
    case VERIFY_16:
      return verify(op, b, u64(b, 2), u32(b, 10), ctx);
    case SYNCHRONIZE_CACHE:
      return syncCache(op, b, u32(b, 2), u16(b, 7));
    case SYNCHRONIZE_CACHE_16:
      return syncCache(op, b, u64(b, 2), u32(b, 10));
    case WRITE_SAME_10:
      return writeSame(op, b, u32(b, 2), u16(b, 7), ctx);
    case WRITE_SAME_16:
      return writeSame(op, b, u64(b, 2), u32(b, 10), ctx);
    case UNMAP: {
      // ANCHOR is not supported (QEMU rejects it as well).
      if ((b[1]! & 0x01) !== 0) return invalid(op, SENSE_CODE.INVALID_FIELD);
      const parameterListLength = u16(b, 7);
      return { kind: "unmap", opcode: op, parameterListLength, ...dataOut(parameterListLength) };
    }
    case REPORT_LUNS: {
      const selectReport = b[2]!;
      const allocationLength = u32(b, 6);
      // SPC-4 6.33: an allocation length under 16 is invalid; select reports 0–2 are defined.
      if (selectReport > 2 || allocationLength < 16) {
        return invalid(op, SENSE_CODE.INVALID_FIELD);
      }
      return {
        kind: "report-luns",
        opcode: op,
        selectReport,
        allocationLength,
        ...dataIn(allocationLength, true),
      };
    }
    default:
      return null;
  }
}

function fua(b: Uint8Array): boolean {
  return (b[1]! & 0x08) !== 0;
}

function transfer(
  op: number,
  kind: "read" | "write",
  lba: number,
  blocks: number,
  fua: boolean,
  ctx: CdbContext,
): Cdb {
  // SBC-3 6.6.3: a TRANSFER LENGTH above MAXIMUM TRANSFER LENGTH is an invalid field.
  if (blocks > ctx.maxTransferBlocks) return invalid(op, SENSE_CODE.INVALID_FIELD);
  const length = blocks * ctx.blockSize;
  // The hot path: one object literal, no spreads.
  const direction = length === 0 ? DATA_NONE : kind === "read" ? DATA_IN : DATA_OUT;
  return { kind, opcode: op, lba, blocks, fua, direction, length, lengthIsLimit: false };
}

function verify(op: number, b: Uint8Array, lba: number, blocks: number, ctx: CdbContext): Cdb {
  if ((b[1]! & PROTECT_MASK) !== 0) return invalid(op, SENSE_CODE.INVALID_FIELD);
  const bytchk = (b[1]! >>> 1) & 3;
  // BYTCHK 10b is reserved (SBC-3 5.28).
  if (bytchk === 2) return invalid(op, SENSE_CODE.INVALID_FIELD);
  if (bytchk !== 0 && blocks > ctx.maxTransferBlocks) {
    return invalid(op, SENSE_CODE.INVALID_FIELD);
  }
  const length = bytchk === 0 ? 0 : bytchk === 1 ? blocks * ctx.blockSize : ctx.blockSize;
  // BYTCHK 11b with no blocks transfers nothing either (SBC-3: no data is transferred).
  return {
    kind: "verify",
    opcode: op,
    lba,
    blocks,
    bytchk,
    ...dataOut(blocks === 0 ? 0 : length),
  };
}

function syncCache(op: number, b: Uint8Array, lba: number, blocks: number): Cdb {
  return {
    kind: "synchronize-cache",
    opcode: op,
    lba,
    blocks,
    immed: (b[1]! & 0x02) !== 0,
    ...NONE,
  };
}

function writeSame(op: number, b: Uint8Array, lba: number, blocks: number, ctx: CdbContext): Cdb {
  const flags = b[1]!;
  // WRPROTECT, ANCHOR (10h), PBDATA (04h) and LBDATA (02h) are not supported (as QEMU); in
  // WRITE SAME (10) bit 0 is reserved, in WRITE SAME (16) it is NDOB.
  const reserved = PROTECT_MASK | 0x16 | (op === WRITE_SAME_10 ? 0x01 : 0);
  if ((flags & reserved) !== 0) return invalid(op, SENSE_CODE.INVALID_FIELD);
  // NUMBER OF LOGICAL BLOCKS 0 means "to the end" unless WSNZ, which we report (VPD B0h).
  if (blocks === 0 || blocks > ctx.maxTransferBlocks) {
    return invalid(op, SENSE_CODE.INVALID_FIELD);
  }
  const ndob = (flags & 0x01) !== 0;
  return {
    kind: "write-same",
    opcode: op,
    lba,
    blocks,
    unmap: (flags & 0x08) !== 0,
    ndob,
    ...dataOut(ndob ? 0 : ctx.blockSize),
  };
}
