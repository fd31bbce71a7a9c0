/**
 * The machine's error type: what failed, and which device, when one did.
 *
 * @module
 */

/**
 * A machine-level failure: a Worker that crashed or did not answer in time, a device that could not
 * start, a shutdown that could not flush. `deviceId` names the device, when one is at fault.
 *
 * @example
 * ```ts
 * import { MachineError } from "./errors.ts";
 * const e = new MachineError("disk0", "iothread did not start within 5000 ms");
 * if (e.message !== 'Device "disk0": iothread did not start within 5000 ms') throw new Error();
 * ```
 */
export class MachineError extends Error {
  /** Always `MachineError`. */
  override readonly name = "MachineError";
  /** The device at fault, if any. */
  readonly deviceId: string | undefined;

  /** Makes the error; the message names the device when there is one. */
  constructor(deviceId: string | undefined, message: string, options?: { cause?: unknown }) {
    super(deviceId === undefined ? message : `Device "${deviceId}": ${message}`, options);
    this.deviceId = deviceId;
  }
}
