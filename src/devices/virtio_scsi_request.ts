/**
 * virtio-scsi's request path on the iothread (queues 2..): one command request at a time — its
 * header copied out of guest memory once, the CDB decoded by the addressed unit (or answered for
 * the target by the bus), the data phase checked against the driver's buffers, the command run
 * with its data moved straight between the block node and guest memory, and the response header
 * (status, sense, residual) written back, after QEMU's `virtio_scsi_handle_cmd_req_*`.
 *
 * Hot path: the headers, CDB view and data buffers are scratch reused for every request.
 *
 * @module
 */

import type { ScsiBus } from "../scsi/bus.ts";
import { ScsiBuffer } from "../scsi/buffer.ts";
import { DATA_IN, DATA_OUT } from "../scsi/cdb.ts";
import { GOOD } from "../scsi/constants.ts";
import type { ScsiIo, ScsiOutcome } from "../scsi/request.ts";
import { SCSI_SENSE_LEN, writeFixedSense } from "../scsi/sense.ts";
import type { DescriptorChain } from "../virtio/queue.ts";
import {
  VIRTIO_SCSI_CDB_SIZE_LIMIT,
  VIRTIO_SCSI_CMD_REQ_HEADER,
  VIRTIO_SCSI_CMD_RESP_HEADER,
  VIRTIO_SCSI_RESP_RESIDUAL,
  VIRTIO_SCSI_RESP_RESPONSE,
  VIRTIO_SCSI_RESP_SENSE,
  VIRTIO_SCSI_RESP_SENSE_LEN,
  VIRTIO_SCSI_RESP_STATUS,
  VIRTIO_SCSI_S_BAD_TARGET,
  VIRTIO_SCSI_S_FAILURE,
  VIRTIO_SCSI_S_OK,
  VIRTIO_SCSI_S_OVERRUN,
} from "../virtio/virtio_scsi_constants.ts";
import {
  gather,
  parseLun,
  scatter,
  VirtioScsiError,
  type VirtioScsiStats,
} from "./virtio_scsi_framing.ts";
import type { VirtioScsiSharedConfig } from "./virtio_scsi_shared.ts";

/** Largest command request header: 19 bytes and a CDB of up to 255. */
const MAX_REQ_HEADER = VIRTIO_SCSI_CMD_REQ_HEADER + VIRTIO_SCSI_CDB_SIZE_LIMIT - 1;

/**
 * The command requests of a back-end: runs them on the bus's units. Requests are processed one at
 * a time (the back-end serializes), so the scratch is shared by all of them.
 */
export class VirtioScsiCommands {
  readonly #bus: ScsiBus;
  readonly #config: VirtioScsiSharedConfig;
  readonly #stats: VirtioScsiStats;
  // Per-request scratch, reused: requests are processed one at a time.
  readonly #req = new Uint8Array(MAX_REQ_HEADER);
  readonly #resp = new Uint8Array(VIRTIO_SCSI_CMD_RESP_HEADER + SCSI_SENSE_LEN);
  readonly #respView = new DataView(this.#resp.buffer);
  readonly #dataIn = new ScsiBuffer();
  readonly #dataOut = new ScsiBuffer();
  readonly #io: ScsiIo = { dataIn: this.#dataIn, dataOut: this.#dataOut };
  #cdbView = this.#req.subarray(VIRTIO_SCSI_CMD_REQ_HEADER, VIRTIO_SCSI_CMD_REQ_HEADER);

  /** `config` gives the sizes the driver last wrote; `stats.commands` counts the requests. */
  constructor(bus: ScsiBus, config: VirtioScsiSharedConfig, stats: VirtioScsiStats) {
    this.#bus = bus;
    this.#config = config;
    this.#stats = stats;
  }

  /**
   * One command request; returns the bytes written to its writable part.
   *
   * @throws {VirtioScsiError} when the headers do not fit the chain's buffers
   */
  async run(chain: DescriptorChain, queue: number): Promise<number> {
    const cdbSize = this.#config.cdbSize;
    const senseSize = this.#config.senseSize;
    const reqSize = VIRTIO_SCSI_CMD_REQ_HEADER + cdbSize;
    const respSize = VIRTIO_SCSI_CMD_RESP_HEADER + senseSize;
    // Guest-controlled lengths: a header that does not fit is a device error, as in QEMU.
    if (chain.readableLength < reqSize) {
      throw new VirtioScsiError(
        "short-request",
        queue,
        `command request of ${chain.readableLength} bytes, header needs ${reqSize}`,
      );
    }
    if (chain.writableLength < respSize) {
      throw new VirtioScsiError(
        "short-response",
        queue,
        `command response of ${chain.writableLength} bytes, header needs ${respSize}`,
      );
    }
    this.#stats.commands++;
    // Copy the header once: the driver may rewrite guest memory while we work.
    const req = this.#req;
    gather(chain.readable, req, reqSize);
    if (this.#cdbView.length !== cdbSize) {
      this.#cdbView = req.subarray(VIRTIO_SCSI_CMD_REQ_HEADER, reqSize);
    }
    const dataOut = this.#dataOut.set(chain.readable, reqSize);
    const dataIn = this.#dataIn.set(chain.writable, respSize);
    try {
      // Data in both directions needs VIRTIO_SCSI_F_INOUT, which is not offered (QEMU: FAILURE).
      if (dataOut.length > 0 && dataIn.length > 0) {
        return this.#respond(chain, respSize, VIRTIO_SCSI_S_FAILURE);
      }
      const addr = parseLun(req, 0);
      if (addr === null || !this.#bus.hasTarget(addr.target)) {
        return this.#respond(chain, respSize, VIRTIO_SCSI_S_BAD_TARGET);
      }
      // One lookup for decode and execute; without a unit there the bus answers for the target.
      const disk = this.#bus.find(addr.target, addr.lun);
      const cdb = this.#cdbView;
      const cmd = disk !== undefined
        ? disk.decode(cdb)
        : this.#bus.decode(addr.target, addr.lun, cdb);
      // The CDB's data phase must fit the driver's buffers (QEMU's OVERRUN check), except that an
      // allocation length is only an upper bound: a shorter data-in buffer gets what fits.
      if (cmd.direction === DATA_IN) {
        if (dataOut.length > 0 || (!cmd.lengthIsLimit && dataIn.length < cmd.length)) {
          return this.#respond(chain, respSize, VIRTIO_SCSI_S_OVERRUN);
        }
      } else if (cmd.direction === DATA_OUT) {
        if (dataIn.length > 0 || dataOut.length < cmd.length) {
          return this.#respond(chain, respSize, VIRTIO_SCSI_S_OVERRUN);
        }
      }
      let outcome: ScsiOutcome;
      if (disk !== undefined) {
        // The unit's two halves rather than execute(): one promise hop less per request.
        const started = disk.begin(cmd, this.#io);
        outcome = started instanceof Promise ? await started : started;
        disk.complete(cmd, outcome);
      } else {
        outcome = await this.#bus.execute(addr.target, addr.lun, cmd, this.#io);
      }
      const resp = this.#resp;
      const view = this.#respView;
      let senseLen = 0;
      let residual = 0;
      if (outcome.status === GOOD) {
        // residual = data_length − bytes transferred (virtio 1.2 5.6.6.1), in either direction.
        residual = Math.max(0, dataIn.length - outcome.dataIn) +
          Math.max(0, dataOut.length - outcome.dataOut);
      } else if (outcome.sense !== null) {
        // Autosense in fixed format, cut to the driver's sense_size (QEMU).
        senseLen = Math.min(
          writeFixedSense(resp, outcome.sense, VIRTIO_SCSI_RESP_SENSE),
          senseSize,
        );
      }
      view.setUint32(VIRTIO_SCSI_RESP_SENSE_LEN, senseLen, true);
      view.setUint32(VIRTIO_SCSI_RESP_RESIDUAL, residual, true);
      view.setUint16(8, 0, true); // status_qualifier
      resp[VIRTIO_SCSI_RESP_STATUS] = outcome.status;
      resp[VIRTIO_SCSI_RESP_RESPONSE] = VIRTIO_SCSI_S_OK;
      scatter(chain.writable, resp, VIRTIO_SCSI_RESP_SENSE + senseLen);
      return respSize + outcome.dataIn;
    } finally {
      // Keep no views of guest memory past the request.
      this.#dataIn.clear();
      this.#dataOut.clear();
    }
  }

  /** A response with only a response code (no status, sense or residual). */
  #respond(chain: DescriptorChain, respSize: number, response: number): number {
    const resp = this.#resp;
    resp.fill(0, 0, VIRTIO_SCSI_CMD_RESP_HEADER);
    resp[VIRTIO_SCSI_RESP_RESPONSE] = response;
    scatter(chain.writable, resp, VIRTIO_SCSI_CMD_RESP_HEADER);
    return respSize;
  }
}
