/**
 * Format probing from an image's first bytes, shared by the opener and the raw driver's guard.
 *
 * @module
 */

/** Bytes the probe looks at. */
export const PROBE_BYTES = 512;

/** The qcow2 magic `QFI\xfb`. */
export const QCOW2_MAGIC = 0x514649fb;

/** Formats a signature in the first sector identifies (raw has none). */
export type ProbedFormat = "qcow2" | "raw";

/** The format the first bytes of an image announce; raw when none matches. */
export function probeFormat(head: Uint8Array): ProbedFormat {
  if (head.length >= 8) {
    const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
    const version = view.getUint32(4);
    // QEMU's qcow2 probe: magic and a version it knows.
    if (view.getUint32(0) === QCOW2_MAGIC && version >= 2) return "qcow2";
  }
  return "raw";
}
