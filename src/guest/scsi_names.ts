/**
 * What a virtio-scsi device answers, in words: virtio response codes, SCSI status bytes, and sense
 * data (key, ASC, ASCQ) as the guest's driver puts them in a request's `detail`.
 *
 * @module
 */

const RESPONSE_NAMES = [
  "OK",
  "OVERRUN",
  "ABORTED",
  "BAD_TARGET",
  "RESET",
  "BUSY",
  "TRANSPORT_FAILURE",
  "TARGET_FAILURE",
  "NEXUS_FAILURE",
  "FAILURE",
  "FUNCTION_SUCCEEDED",
  "FUNCTION_REJECTED",
  "INCORRECT_LUN",
];

const SENSE_KEY_NAMES = [
  "NO SENSE",
  "RECOVERED ERROR",
  "NOT READY",
  "MEDIUM ERROR",
  "HARDWARE ERROR",
  "ILLEGAL REQUEST",
  "UNIT ATTENTION",
  "DATA PROTECT",
  "BLANK CHECK",
  "VENDOR SPECIFIC",
  "COPY ABORTED",
  "ABORTED COMMAND",
  "RESERVED (0Ch)",
  "VOLUME OVERFLOW",
  "MISCOMPARE",
  "COMPLETED",
];

/** ASC/ASCQ descriptions of the conditions a disk reports (SPC-4 Annex D.2), by asc << 8 | ascq. */
const ASC_NAMES = new Map<number, string>([
  [0x0403, "logical unit not ready, manual intervention required"],
  [0x0c00, "write error"],
  [0x1100, "unrecovered read error"],
  [0x1a00, "parameter list length error"],
  [0x1d00, "miscompare during verify operation"],
  [0x2000, "invalid command operation code"],
  [0x2100, "logical block address out of range"],
  [0x2400, "invalid field in CDB"],
  [0x2500, "logical unit not supported"],
  [0x2600, "invalid field in parameter list"],
  [0x2700, "write protected"],
  [0x2900, "power on, reset, or bus device reset occurred"],
  [0x2a09, "capacity data has changed"],
  [0x3900, "saving parameters not supported"],
  [0x3f0e, "reported luns data has changed"],
  [0x4400, "internal target failure"],
]);

function hex2(n: number): string {
  return n.toString(16).toUpperCase().padStart(2, "0");
}

/** A virtio-scsi response code by name: `BAD_TARGET`, or `response 0x2A` for an unknown one. */
export function scsiResponseName(code: number): string {
  return RESPONSE_NAMES[code] ?? `response 0x${hex2(code)}`;
}

/**
 * Sense data in words: `DATA PROTECT 07/27/00 (write protected)`.
 *
 * @example
 * ```ts
 * import { describeSense } from "./scsi_names.ts";
 * if (describeSense(5, 0x21, 0) !== "ILLEGAL REQUEST 05/21/00 (logical block address out of range)") {
 *   throw new Error("sense");
 * }
 * ```
 */
export function describeSense(key: number, asc: number, ascq: number): string {
  const name = SENSE_KEY_NAMES[key & 0xf]!;
  const what = ASC_NAMES.get((asc << 8) | ascq);
  return `${name} ${hex2(key)}/${hex2(asc)}/${hex2(ascq)}${what === undefined ? "" : ` (${what})`}`;
}

const STATUS_NAMES = new Map<number, string>([
  [0x00, "GOOD"],
  [0x02, "CHECK CONDITION"],
  [0x04, "CONDITION MET"],
  [0x08, "BUSY"],
  [0x18, "RESERVATION CONFLICT"],
  [0x28, "TASK SET FULL"],
  [0x30, "ACA ACTIVE"],
  [0x40, "TASK ABORTED"],
]);

/** A SCSI status byte by name: `CHECK CONDITION`, or `status 0x2A` for an unknown one. */
export function scsiStatusName(status: number): string {
  return STATUS_NAMES.get(status) ?? `status 0x${hex2(status)}`;
}
