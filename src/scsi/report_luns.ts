/**
 * REPORT LUNS parameter data (SPC-4 6.33), as QEMU's target emulation builds it: LUN 0 always
 * first (a target answers at LUN 0 even without a logical unit there), then the others, with
 * peripheral device addressing below 256 and flat space addressing above (SAM-5 4.7).
 *
 * @module
 */

/** Bytes of the REPORT LUNS header (LUN LIST LENGTH and reserved). */
const HEADER_LEN = 8;
/** Bytes of one LUN entry. */
const ENTRY_LEN = 8;

/**
 * The parameter data for a target whose logical units are `luns`.
 *
 * @example
 * ```ts
 * import { reportLunsData } from "./report_luns.ts";
 * const d = reportLunsData([3, 300]);
 * // header (list length 24), LUN 0, LUN 3, LUN 300 (flat space: 41h 2Ch)
 * if (d.length !== 32 || d[3] !== 24 || d[17] !== 3 || d[24] !== 0x41 || d[25] !== 0x2c) {
 *   throw new Error("report luns");
 * }
 * ```
 */
export function reportLunsData(luns: Iterable<number>): Uint8Array {
  const others = [...new Set(luns)].filter((l) => l !== 0).sort((a, b) => a - b);
  const listLength = ENTRY_LEN * (1 + others.length);
  const out = new Uint8Array(HEADER_LEN + listLength);
  new DataView(out.buffer).setUint32(0, listLength);
  let at = HEADER_LEN + ENTRY_LEN; // LUN 0 is the all-zero entry
  for (const lun of others) {
    if (lun < 256) {
      out[at + 1] = lun; // peripheral device addressing, bus 0
    } else {
      out[at] = 0x40 | ((lun >>> 8) & 0x3f); // flat space addressing
      out[at + 1] = lun & 0xff;
    }
    at += ENTRY_LEN;
  }
  return out;
}
