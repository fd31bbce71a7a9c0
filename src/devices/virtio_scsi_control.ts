/**
 * virtio-scsi's control queue on the iothread (queue 0): task management functions and
 * asynchronous-notification queries and subscriptions (virtio 1.2 §5.6.6.2), after QEMU's
 * `virtio_scsi_handle_ctrl_req` and `virtio_scsi_do_tmf`.
 *
 * Commands complete before the next request is popped, so a task management function always finds
 * no command in flight: ABORT TASK and friends answer FUNCTION COMPLETE; LOGICAL UNIT RESET and
 * I_T NEXUS RESET reset the units. No asynchronous notification class is supported.
 *
 * @module
 */

import type { ScsiBus } from "../scsi/bus.ts";
import type { DescriptorChain } from "../virtio/queue.ts";
import {
  VIRTIO_SCSI_AN_REQ_SIZE,
  VIRTIO_SCSI_AN_RESP_SIZE,
  VIRTIO_SCSI_S_BAD_TARGET,
  VIRTIO_SCSI_S_FUNCTION_REJECTED,
  VIRTIO_SCSI_S_INCORRECT_LUN,
  VIRTIO_SCSI_S_OK,
  VIRTIO_SCSI_T_AN_QUERY,
  VIRTIO_SCSI_T_AN_SUBSCRIBE,
  VIRTIO_SCSI_T_TMF,
  VIRTIO_SCSI_T_TMF_ABORT_TASK,
  VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
  VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
  VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
  VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
  VIRTIO_SCSI_T_TMF_QUERY_TASK,
  VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
  VIRTIO_SCSI_TMF_REQ_SIZE,
  VIRTIO_SCSI_TMF_RESP_SIZE,
} from "../virtio/virtio_scsi_constants.ts";
import {
  gather,
  parseLun,
  scatter,
  VirtioScsiError,
  type VirtioScsiStats,
} from "./virtio_scsi_framing.ts";

/** The control requests of a back-end, on the bus's units. */
export class VirtioScsiControl {
  readonly #bus: ScsiBus;
  readonly #stats: VirtioScsiStats;
  readonly #ctl = new Uint8Array(VIRTIO_SCSI_TMF_REQ_SIZE);
  readonly #ctlView = new DataView(this.#ctl.buffer);

  /** `stats.controls` counts the requests. */
  constructor(bus: ScsiBus, stats: VirtioScsiStats) {
    this.#bus = bus;
    this.#stats = stats;
  }

  /**
   * One control request; returns the bytes written to its writable part.
   *
   * @throws {VirtioScsiError} when a request or its response does not fit the chain's buffers
   */
  handle(chain: DescriptorChain, queue: number): number {
    const ctl = this.#ctl;
    const view = this.#ctlView;
    ctl.fill(0);
    const got = gather(chain.readable, ctl, ctl.length);
    if (got < 4) {
      throw new VirtioScsiError("short-request", queue, `control request of ${got} bytes`);
    }
    this.#stats.controls++;
    const type = view.getUint32(0, true);
    if (type === VIRTIO_SCSI_T_TMF) {
      if (got < VIRTIO_SCSI_TMF_REQ_SIZE) {
        throw new VirtioScsiError("short-request", queue, `TMF request of ${got} bytes`);
      }
      if (chain.writableLength < VIRTIO_SCSI_TMF_RESP_SIZE) {
        throw new VirtioScsiError("short-response", queue, "TMF without a response byte");
      }
      const response = this.#tmf(view.getUint32(4, true), ctl);
      const out = Uint8Array.of(response);
      scatter(chain.writable, out, out.length);
      return VIRTIO_SCSI_TMF_RESP_SIZE;
    }
    if (type === VIRTIO_SCSI_T_AN_QUERY || type === VIRTIO_SCSI_T_AN_SUBSCRIBE) {
      if (got < VIRTIO_SCSI_AN_REQ_SIZE) {
        throw new VirtioScsiError("short-request", queue, `AN request of ${got} bytes`);
      }
      if (chain.writableLength < VIRTIO_SCSI_AN_RESP_SIZE) {
        throw new VirtioScsiError(
          "short-response",
          queue,
          `AN response of ${chain.writableLength} bytes`,
        );
      }
      // No asynchronous notification class is supported: event_actual 0 (QEMU).
      const out = Uint8Array.of(0, 0, 0, 0, VIRTIO_SCSI_S_OK);
      scatter(chain.writable, out, out.length);
      return VIRTIO_SCSI_AN_RESP_SIZE;
    }
    // An unknown type is completed untouched (QEMU), not treated as a framing error.
    return 0;
  }

  /** A task management function (QEMU's `virtio_scsi_do_tmf`); returns the response code. */
  #tmf(subtype: number, req: Uint8Array): number {
    switch (subtype) {
      case VIRTIO_SCSI_T_TMF_ABORT_TASK:
      case VIRTIO_SCSI_T_TMF_QUERY_TASK:
      case VIRTIO_SCSI_T_TMF_ABORT_TASK_SET:
      case VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET:
      case VIRTIO_SCSI_T_TMF_QUERY_TASK_SET:
      case VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET: {
        const addr = parseLun(req, 8);
        if (addr === null || !this.#bus.hasTarget(addr.target)) return VIRTIO_SCSI_S_BAD_TARGET;
        const disk = this.#bus.find(addr.target, addr.lun);
        if (disk === undefined) return VIRTIO_SCSI_S_INCORRECT_LUN;
        if (subtype === VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET) disk.reset();
        // Commands complete before the next request is popped: the task set is always empty,
        // so an abort has nothing left to abort and a query finds nothing (FUNCTION COMPLETE).
        return VIRTIO_SCSI_S_OK;
      }
      case VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET:
        this.#bus.resetTarget(req[8 + 1]!);
        return VIRTIO_SCSI_S_OK;
      default:
        // CLEAR ACA (ACA is not supported) and unknown functions.
        return VIRTIO_SCSI_S_FUNCTION_REJECTED;
    }
  }
}
