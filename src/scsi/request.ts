/**
 * What a logical unit is handed with a command and what it hands back: the data buffers of the
 * command, and its outcome (status, sense, bytes moved in each direction). The transport turns the
 * outcome into its own response (for virtio-scsi: status, sense, residual).
 *
 * @module
 */
import type { ScsiBuffer } from "./buffer.ts";
import { CHECK_CONDITION, GOOD } from "./constants.ts";
import type { SenseCode, SenseData } from "./sense.ts";

/** The data buffers of one command; either may be empty. */
export interface ScsiIo {
  /** Data-in: what the device sends the driver. */
  readonly dataIn: ScsiBuffer;
  /** Data-out: what the driver sends the device. */
  readonly dataOut: ScsiBuffer;
}

/** How a command ended. */
export interface ScsiOutcome {
  /** SAM status: GOOD or CHECK CONDITION (the disk reports no other). */
  readonly status: number;
  /** Sense data for CHECK CONDITION, else null. */
  readonly sense: SenseData | null;
  /** Bytes put into the data-in buffer. */
  readonly dataIn: number;
  /** Bytes taken from the data-out buffer. */
  readonly dataOut: number;
  /**
   * Set when the unit's error policy holds the command (QEMU's werror/rerror `stop`): the
   * transport must not complete it and stops taking commands; the rest of the outcome is what
   * `report` would have said.
   */
  readonly held?: { readonly error: unknown; readonly write: boolean };
}

/** What a unit does with a failed block-layer request (QEMU's werror/rerror, decided). */
export type IoErrorDecision = "report" | "ignore" | "stop";

/** Decides a failed request's fate: `write` is true for writes, flushes and discards. */
export type IoErrorPolicy = (error: unknown, write: boolean) => IoErrorDecision;

/** The outcome of a command that moved nothing. */
export const GOOD_NO_DATA: ScsiOutcome = Object.freeze({
  status: GOOD,
  sense: null,
  dataIn: 0,
  dataOut: 0,
});

/** A GOOD outcome that moved `dataIn` bytes in and `dataOut` bytes out. */
export function good(dataIn: number, dataOut = 0): ScsiOutcome {
  if (dataIn === 0 && dataOut === 0) return GOOD_NO_DATA;
  return { status: GOOD, sense: null, dataIn, dataOut };
}

/** Frozen sense data per code, so a CHECK CONDITION allocates only its outcome. */
const senseData = new Map<SenseCode, SenseData>();

/** A CHECK CONDITION outcome with `code` (and the INFORMATION field, when given). */
export function checkCondition(
  code: SenseCode,
  information?: number,
  moved: { dataIn?: number; dataOut?: number } = {},
): ScsiOutcome {
  let sense: SenseData;
  if (information !== undefined) {
    sense = { code, information };
  } else {
    sense = senseData.get(code) ?? Object.freeze({ code });
    senseData.set(code, sense);
  }
  return {
    status: CHECK_CONDITION,
    sense,
    dataIn: moved.dataIn ?? 0,
    dataOut: moved.dataOut ?? 0,
  };
}
