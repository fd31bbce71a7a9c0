/**
 * What a device does when the block layer fails a request, as QEMU's `-drive werror=,rerror=`:
 * tell the guest (`report`), pretend it worked (`ignore`), hold the request and stop the VM
 * (`stop`), or stop only when the host is out of space and tell the guest otherwise (`enospc`).
 *
 * @module
 */

import { BlockError } from "../errors.ts";

/** A drive's policy for failed writes (`werror`) or reads (`rerror`), as QEMU's. */
export type BlockErrorAction = "report" | "ignore" | "stop" | "enospc";

/** Every {@linkcode BlockErrorAction}, in QEMU's order. */
export const BLOCK_ERROR_ACTIONS: readonly BlockErrorAction[] = [
  "report",
  "ignore",
  "stop",
  "enospc",
];

/** QEMU's default `werror`: stop when the host runs out of space, report anything else. */
export const DEFAULT_WERROR: BlockErrorAction = "enospc";
/** QEMU's default `rerror`. */
export const DEFAULT_RERROR: BlockErrorAction = "report";

/** What to do with one failed request. */
export type ErrorDecision = "report" | "ignore" | "stop";

/** Linux's ENOSPC (devices do not import `src/sys/`). */
const ENOSPC = 28;

/** True when `error` (or an error it wraps) is the host's ENOSPC. */
export function isNoSpace(error: unknown): boolean {
  for (let e = error, depth = 0; e !== undefined && e !== null && depth < 8; depth++) {
    if (e instanceof BlockError && e.context.errno === ENOSPC) return true;
    e = e instanceof Error ? e.cause : undefined;
  }
  return false;
}

/**
 * QEMU's `blk_get_error_action`: `enospc` stops on ENOSPC and reports the rest; the others are
 * what they say.
 */
export function errorDecision(action: BlockErrorAction, error: unknown): ErrorDecision {
  if (action === "enospc") return isNoSpace(error) ? "stop" : "report";
  return action;
}

/**
 * Why a device stopped, as the VMM shows it: `io error on drive d0 (write): No space left on
 * device`.
 */
export function stopReason(drive: string, isWrite: boolean, error: unknown): string {
  const what = isWrite ? "write" : "read";
  const detail = isNoSpace(error)
    ? "No space left on device"
    : error instanceof Error
    ? error.message
    : String(error);
  return `io error on drive ${drive} (${what}): ${detail}`;
}
