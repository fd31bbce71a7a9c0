/**
 * virtio-scsi's request path on the iothread (queues 2..): per command request, its
 * header copied out of guest memory once, the CDB decoded by the addressed unit (or answered for
 * the target by the bus), the data phase checked against the driver's buffers, the command run
 * with its data moved straight between the block node and guest memory, and the response header
 * (status, sense, residual) written back, after QEMU's `virtio_scsi_handle_cmd_req_*`.
 *
 * Requests that do I/O stay in flight while later ones start, each with its own scratch slot
 * (headers, CDB view, data buffers), reused once it completes.
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

/** One request's scratch: headers, CDB view and data buffers, reused by later requests. */
class Slot {
  readonly req = new Uint8Array(MAX_REQ_HEADER);
  readonly resp = new Uint8Array(VIRTIO_SCSI_CMD_RESP_HEADER + SCSI_SENSE_LEN);
  readonly respView = new DataView(this.resp.buffer);
  readonly dataIn = new ScsiBuffer();
  readonly dataOut = new ScsiBuffer();
  readonly io: ScsiIo = { dataIn: this.dataIn, dataOut: this.dataOut };
  cdbView = this.req.subarray(VIRTIO_SCSI_CMD_REQ_HEADER, VIRTIO_SCSI_CMD_REQ_HEADER);
}

/**
 * What {@linkcode VirtioScsiCommands.run} gives for a command the unit's error policy holds
 * (werror/rerror `stop`): no response is written and the chain is not to be completed.
 */
export const HELD = -1;

/** A held command: the failed request, and the unit it was for. */
export interface HeldCommand {
  readonly error: unknown;
  readonly write: boolean;
  readonly target: number;
  readonly lun: number;
}

/** Spare slots kept for reuse (more requests in flight allocate, and the extras are dropped). */
const SPARE_SLOTS = 64;

/**
 * The command requests of a back-end: runs them on the bus's units. A request that does I/O is
 * in flight until its promise settles, and many can be at once (each with its own scratch slot):
 * {@linkcode run} returns the written length at once for requests answered without I/O, else its
 * promise.
 */
export class VirtioScsiCommands {
  readonly #bus: ScsiBus;
  readonly #config: VirtioScsiSharedConfig;
  readonly #stats: VirtioScsiStats;
  readonly #spare: Slot[] = [];
  /** Told of each command the error policy holds, before run gives {@linkcode HELD}. */
  onHeld: ((held: HeldCommand) => void) | null = null;

  /** `config` gives the sizes the driver last wrote; `stats.commands` counts the requests. */
  constructor(bus: ScsiBus, config: VirtioScsiSharedConfig, stats: VirtioScsiStats) {
    this.#bus = bus;
    this.#config = config;
    this.#stats = stats;
  }

  /**
   * One command request: the bytes written to its writable part, or the promise of them when
   * the command does I/O; {@linkcode HELD} when the unit's error policy holds it.
   *
   * @throws {VirtioScsiError} (synchronously) when the headers do not fit the chain's buffers
   */
  run(chain: DescriptorChain, queue: number): number | Promise<number> {
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
    const slot = this.#spare.pop() ?? new Slot();
    let pending = false;
    try {
      // Copy the header once: the driver may rewrite guest memory while we work.
      const req = slot.req;
      gather(chain.readable, req, reqSize);
      if (slot.cdbView.length !== cdbSize) {
        slot.cdbView = req.subarray(VIRTIO_SCSI_CMD_REQ_HEADER, reqSize);
      }
      const dataOut = slot.dataOut.set(chain.readable, reqSize);
      const dataIn = slot.dataIn.set(chain.writable, respSize);
      // Data in both directions needs VIRTIO_SCSI_F_INOUT, which is not offered (QEMU: FAILURE).
      if (dataOut.length > 0 && dataIn.length > 0) {
        return respond(slot, chain, respSize, VIRTIO_SCSI_S_FAILURE);
      }
      const addr = parseLun(req, 0);
      if (addr === null || !this.#bus.hasTarget(addr.target)) {
        return respond(slot, chain, respSize, VIRTIO_SCSI_S_BAD_TARGET);
      }
      // One lookup for decode and execute; without a unit there the bus answers for the target.
      const disk = this.#bus.find(addr.target, addr.lun);
      const cdb = slot.cdbView;
      const cmd = disk !== undefined
        ? disk.decode(cdb)
        : this.#bus.decode(addr.target, addr.lun, cdb);
      // The CDB's data phase must fit the driver's buffers (QEMU's OVERRUN check), except that an
      // allocation length is only an upper bound: a shorter data-in buffer gets what fits.
      if (cmd.direction === DATA_IN) {
        if (dataOut.length > 0 || (!cmd.lengthIsLimit && dataIn.length < cmd.length)) {
          return respond(slot, chain, respSize, VIRTIO_SCSI_S_OVERRUN);
        }
      } else if (cmd.direction === DATA_OUT) {
        if (dataIn.length > 0 || dataOut.length < cmd.length) {
          return respond(slot, chain, respSize, VIRTIO_SCSI_S_OVERRUN);
        }
      }
      if (disk === undefined) {
        pending = true;
        const outcome = this.#bus.execute(addr.target, addr.lun, cmd, slot.io);
        return this.#later(slot, chain, respSize, senseSize, addr, outcome);
      }
      // The unit's two halves rather than execute(): no promise at all for emulated commands.
      const started = disk.begin(cmd, slot.io);
      if (started instanceof Promise) {
        pending = true;
        return this.#later(
          slot,
          chain,
          respSize,
          senseSize,
          addr,
          started.then((outcome) => {
            disk.complete(cmd, outcome);
            return outcome;
          }),
        );
      }
      disk.complete(cmd, started);
      if (started.held !== undefined) return this.#held(started.held, addr);
      return finish(slot, chain, respSize, senseSize, started);
    } finally {
      if (!pending) this.#release(slot);
    }
  }

  /** Completes a request whose command does I/O; sizes as the request was checked with. */
  async #later(
    slot: Slot,
    chain: DescriptorChain,
    respSize: number,
    senseSize: number,
    addr: { target: number; lun: number },
    outcome: Promise<ScsiOutcome>,
  ): Promise<number> {
    try {
      const done = await outcome;
      if (done.held !== undefined) return this.#held(done.held, addr);
      return finish(slot, chain, respSize, senseSize, done);
    } finally {
      this.#release(slot);
    }
  }

  #held(held: { error: unknown; write: boolean }, addr: { target: number; lun: number }): number {
    this.onHeld?.({ error: held.error, write: held.write, target: addr.target, lun: addr.lun });
    return HELD;
  }

  #release(slot: Slot): void {
    // Keep no views of guest memory past the request.
    slot.dataIn.clear();
    slot.dataOut.clear();
    if (this.#spare.length < SPARE_SLOTS) this.#spare.push(slot);
  }
}

/** Writes the response header (status, sense, residual) of a command that ran. */
function finish(
  slot: Slot,
  chain: DescriptorChain,
  respSize: number,
  senseSize: number,
  outcome: ScsiOutcome,
): number {
  const resp = slot.resp;
  const view = slot.respView;
  let senseLen = 0;
  let residual = 0;
  if (outcome.status === GOOD) {
    // residual = data_length − bytes transferred (virtio 1.2 5.6.6.1), in either direction.
    residual = Math.max(0, slot.dataIn.length - outcome.dataIn) +
      Math.max(0, slot.dataOut.length - outcome.dataOut);
  } else if (outcome.sense !== null) {
    // Autosense in fixed format, cut to the driver's sense_size (QEMU).
    senseLen = Math.min(writeFixedSense(resp, outcome.sense, VIRTIO_SCSI_RESP_SENSE), senseSize);
  }
  view.setUint32(VIRTIO_SCSI_RESP_SENSE_LEN, senseLen, true);
  view.setUint32(VIRTIO_SCSI_RESP_RESIDUAL, residual, true);
  view.setUint16(8, 0, true); // status_qualifier
  resp[VIRTIO_SCSI_RESP_STATUS] = outcome.status;
  resp[VIRTIO_SCSI_RESP_RESPONSE] = VIRTIO_SCSI_S_OK;
  scatter(chain.writable, resp, VIRTIO_SCSI_RESP_SENSE + senseLen);
  return respSize + outcome.dataIn;
}

/** A response with only a response code (no status, sense or residual). */
function respond(slot: Slot, chain: DescriptorChain, respSize: number, response: number): number {
  const resp = slot.resp;
  resp.fill(0, 0, VIRTIO_SCSI_CMD_RESP_HEADER);
  resp[VIRTIO_SCSI_RESP_RESPONSE] = response;
  scatter(chain.writable, resp, VIRTIO_SCSI_CMD_RESP_HEADER);
  return respSize;
}
