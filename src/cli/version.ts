/**
 * Versions, in one place: vstor's own, and the QEMU release whose tools it answers as.
 *
 * @module
 */

/** vstor's version (deno.json carries none). */
export const VSTOR_VERSION = "0.1.0";

/** The QEMU release whose qemu-img and qemu-io the drop-in mode answers as. */
export const QEMU_VERSION = "7.2.0";

/**
 * What `vstor --version` prints: vstor's version, the Deno running it, the QEMU it matches.
 *
 * @example
 * ```ts
 * import { versionText } from "./version.ts";
 * if (!versionText().startsWith("vstor 0.")) throw new Error(versionText());
 * ```
 */
export function versionText(): string {
  return `vstor ${VSTOR_VERSION}\n` +
    `Deno ${Deno.version.deno} (V8 ${Deno.version.v8}, TypeScript ${Deno.version.typescript})\n` +
    `matches QEMU ${QEMU_VERSION} (qemu-img and qemu-io; drop-in mode: vstor qemu-img, vstor qemu-io)\n`;
}
