/**
 * A virtio-scsi command slot in guest RAM: the request header (LUN, tag, task attribute, CDB), the
 * response header (sense length, residual, status, response, sense), the UNMAP parameter list, an
 * indirect table and a data buffer, laid out once when a target opens (virtio 1.2 §5.6.6.1); and
 * the two ends of a command's life in it — arming the response before the device answers, decoding
 * it after (sense in fixed or descriptor format).
 *
 * A command is a chain `request header → [data-out] → response header → [data-in]`; the data is
 * one contiguous guest buffer, so one descriptor, well inside `seg_max`. No allocation per request:
 * the descriptor lists and the request object are the slot's.
 *
 * @module
 */

import {
  VIRTIO_SCSI_CMD_REQ_HEADER,
  VIRTIO_SCSI_CMD_RESP_HEADER,
  VIRTIO_SCSI_REQ_TAG,
  VIRTIO_SCSI_REQ_TASK_ATTR,
  VIRTIO_SCSI_RESP_RESIDUAL,
  VIRTIO_SCSI_RESP_RESPONSE,
  VIRTIO_SCSI_RESP_SENSE,
  VIRTIO_SCSI_RESP_SENSE_LEN,
  VIRTIO_SCSI_RESP_STATUS,
  VIRTIO_SCSI_S_OK,
  VIRTIO_SCSI_S_SIMPLE,
} from "../virtio/virtio_scsi_constants.ts";
import { CHECK_CONDITION } from "../scsi/constants.ts";
import type { DriverBuffer } from "../virtio/queue.ts";
import { FREE, SlotRequest } from "./queue_target.ts";
import { UNMAP_PARAM_BYTES } from "./scsi_commands.ts";
import type { SlotQueue } from "./slot_queue.ts";
import type { GuestPlatform } from "./virtio_driver.ts";

const DESC_BYTES = 16;
const SECTOR = 512;

function align(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** Who completes a slot: a target (I/O) or the driver (its own commands). */
export interface SlotOwner {
  /** The device answered `slot` (fields decoded); true: send it again (a unit attention retry). */
  _finish(slot: Slot): boolean;
}

/** One command slot: its guest memory, descriptor lists, state and decoded response. */
export interface Slot {
  /** Token in the ring: index in the queue's slot table. */
  readonly token: number;
  /** Request queue number (virtqueue 2 + queue). */
  readonly queue: number;
  readonly owner: SlotOwner;
  readonly request: SlotRequest;
  /** RAM buffer offsets of the request header, response header and UNMAP parameter list. */
  readonly reqOff: number;
  readonly respOff: number;
  readonly paramOff: number;
  readonly indirect: number;
  readonly req: DriverBuffer;
  readonly resp: DriverBuffer;
  readonly param: DriverBuffer;
  readonly data: DriverBuffer;
  readonly readable: DriverBuffer[];
  readonly writable: DriverBuffer[];
  state: number;
  /** Unit attention retries of the current request. */
  retries: number;
  // Decoded on completion.
  response: number;
  status: number;
  key: number;
  asc: number;
  ascq: number;
  residual: number;
  written: number;
}

/** What {@linkcode allocSlots} lays out. */
export interface SlotLayout {
  readonly platform: GuestPlatform;
  /** A view of all guest RAM, for header writes at translated offsets. */
  readonly ram: DataView;
  /** The request queue the slots are registered in (they take the next tokens). */
  readonly queue: SlotQueue<Slot>;
  /** Its request queue number. */
  readonly queueIndex: number;
  /** The device's cdb_size and sense_size, which size the headers. */
  readonly cdbSize: number;
  readonly senseSize: number;
  readonly owner: SlotOwner;
  readonly depth: number;
  /** Data buffer bytes per slot. */
  readonly dataBytes: number;
}

/**
 * Allocates `depth` slots' guest memory (headers, parameter list, indirect table in one block;
 * data buffers in another), writes the parts of the request header that never change (tag, task
 * attribute SIMPLE) and registers the slots in their queue.
 *
 * @returns the slots and the guest memory to free when they close
 * @throws {GuestAllocError} when guest RAM runs out
 */
export function allocSlots(layout: SlotLayout): { slots: Slot[]; memory: number[] } {
  const { platform, ram, queue, queueIndex, owner, depth, dataBytes } = layout;
  const mem = platform.mem;
  const alloc = platform.alloc;
  const reqLen = VIRTIO_SCSI_CMD_REQ_HEADER + layout.cdbSize;
  const respLen = VIRTIO_SCSI_CMD_RESP_HEADER + layout.senseSize;
  // Per slot: request header, response header, UNMAP parameter list, indirect table (4 entries).
  const respAt = align(reqLen, 16);
  const paramAt = respAt + align(respLen, 16);
  const indirectAt = paramAt + align(UNMAP_PARAM_BYTES, 16);
  const metaStride = align(indirectAt + 4 * DESC_BYTES, 64);
  const dataAlign = dataBytes >= 4096 ? 4096 : SECTOR;
  const dataStride = align(dataBytes, dataAlign);
  const meta = alloc.alloc(metaStride * depth, 64);
  let data: number;
  try {
    data = alloc.alloc(dataStride * depth, dataAlign);
  } catch (error) {
    alloc.free(meta);
    throw error;
  }
  const slots: Slot[] = [];
  for (let i = 0; i < depth; i++) {
    const base = meta + i * metaStride;
    const dataAddress = data + i * dataStride;
    const token = queue.slots.length;
    const slot: Slot = {
      token,
      queue: queueIndex,
      owner,
      request: new SlotRequest(i, mem.slice(dataAddress, dataBytes)),
      reqOff: mem.translate(base, reqLen),
      respOff: mem.translate(base + respAt, respLen),
      paramOff: mem.translate(base + paramAt, UNMAP_PARAM_BYTES),
      indirect: base + indirectAt,
      req: { addr: base, length: reqLen },
      resp: { addr: base + respAt, length: respLen },
      param: { addr: base + paramAt, length: UNMAP_PARAM_BYTES },
      data: { addr: dataAddress, length: dataBytes },
      readable: [],
      writable: [],
      state: FREE,
      retries: 0,
      response: 0,
      status: 0,
      key: -1,
      asc: 0,
      ascq: 0,
      residual: 0,
      written: 0,
    };
    // The tag names the slot in the device's task set; the task attribute is SIMPLE.
    ram.setUint32(slot.reqOff + VIRTIO_SCSI_REQ_TAG, (queueIndex << 16 | token) >>> 0, true);
    ram.setUint32(slot.reqOff + VIRTIO_SCSI_REQ_TAG + 4, 0, true);
    ram.setUint8(slot.reqOff + VIRTIO_SCSI_REQ_TASK_ATTR, VIRTIO_SCSI_S_SIMPLE);
    queue.slots.push(slot);
    slots.push(slot);
  }
  return { slots, memory: [meta, data] };
}

/** Readies the response header: values the device never wrote must not read as GOOD. */
export function armResponse(ram: DataView, slot: Slot): void {
  ram.setUint32(slot.respOff + VIRTIO_SCSI_RESP_SENSE_LEN, 0, true);
  ram.setUint32(slot.respOff + VIRTIO_SCSI_RESP_RESIDUAL, 0, true);
  ram.setUint8(slot.respOff + VIRTIO_SCSI_RESP_STATUS, 0xff);
  ram.setUint8(slot.respOff + VIRTIO_SCSI_RESP_RESPONSE, 0xff);
}

/**
 * Decodes the response header the device wrote into the slot's fields: response, status,
 * residual, and for CHECK CONDITION the sense key, ASC and ASCQ (key -1 without sense).
 * `written` is the used element's length; `senseSize` the sense bytes the slot owns.
 */
export function readResponse(ram: DataView, slot: Slot, written: number, senseSize: number): void {
  const r = slot.respOff;
  slot.written = written;
  slot.response = ram.getUint8(r + VIRTIO_SCSI_RESP_RESPONSE);
  slot.status = ram.getUint8(r + VIRTIO_SCSI_RESP_STATUS);
  slot.residual = ram.getUint32(r + VIRTIO_SCSI_RESP_RESIDUAL, true);
  slot.key = -1;
  slot.asc = 0;
  slot.ascq = 0;
  if (slot.response === VIRTIO_SCSI_S_OK && slot.status === CHECK_CONDITION) {
    // sense_len is the device's word: never read past the sense_size bytes we own.
    const len = Math.min(ram.getUint32(r + VIRTIO_SCSI_RESP_SENSE_LEN, true), senseSize);
    decodeSense(ram, slot, r + VIRTIO_SCSI_RESP_SENSE, len);
  }
}

/** Fixed (70h/71h) or descriptor (72h/73h) sense: key, ASC, ASCQ into the slot. */
function decodeSense(ram: DataView, slot: Slot, at: number, len: number): void {
  if (len < 1) return;
  const code = ram.getUint8(at) & 0x7f;
  if ((code === 0x70 || code === 0x71) && len >= 3) {
    slot.key = ram.getUint8(at + 2) & 0x0f;
    slot.asc = len > 12 ? ram.getUint8(at + 12) : 0;
    slot.ascq = len > 13 ? ram.getUint8(at + 13) : 0;
  } else if ((code === 0x72 || code === 0x73) && len >= 2) {
    slot.key = ram.getUint8(at + 1) & 0x0f;
    slot.asc = len > 2 ? ram.getUint8(at + 2) : 0;
    slot.ascq = len > 3 ? ram.getUint8(at + 3) : 0;
  }
}
