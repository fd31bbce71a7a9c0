/**
 * A driver-side harness for virtio-scsi: guest memory, a model and a back-end sharing their
 * config, one driver queue per device queue (split or packed), and helpers that lay out command,
 * control and event requests the way a guest driver does, kick, run the back-end and parse what
 * comes back. The back-end's interrupts (from `processQueue` and from its hooks) are counted.
 *
 * @module
 */
import assert from "node:assert/strict";
import { RawNode } from "../../formats/raw.ts";
import type { BlockNode } from "../../src/block/node.ts";
import {
  VirtioScsiBackend,
  VirtioScsiModel,
  type VirtioScsiOptions,
} from "../../src/devices/virtio_scsi.ts";
import {
  VIRTIO_SCSI_CMD_REQ_HEADER,
  VIRTIO_SCSI_CMD_RESP_HEADER,
  VIRTIO_SCSI_EVENT_SIZE,
  VIRTIO_SCSI_T_AN_QUERY,
  VIRTIO_SCSI_T_TMF,
  VIRTIO_SCSI_VQ_CONTROL,
  VIRTIO_SCSI_VQ_EVENT,
  VIRTIO_SCSI_VQ_REQUEST,
} from "../../src/virtio/virtio_scsi_constants.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import type { ScsiDisk, ScsiDiskOptions } from "../../src/scsi/disk.ts";
import type { ActivatedQueue } from "../../src/virtio/device.ts";
import { queueFeaturesOf } from "../../src/virtio/device.ts";
import {
  featureBit,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_MSI_NO_VECTOR,
} from "../../src/virtio/features.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import {
  PackedDeviceQueue,
  PackedDriverQueue,
  packedRingLayout,
} from "../../src/virtio/packed_queue.ts";
import type { DeviceQueue, DriverBuffer, DriverQueue } from "../../src/virtio/queue.ts";
import {
  SplitDeviceQueue,
  SplitDriverQueue,
  splitRingLayout,
} from "../../src/virtio/split_queue.ts";

/** Rings live in [0, 1 MiB); buffers in [1 MiB, 1 MiB + DATA_BYTES). */
const RING_REGION = 0x10_0000;
const DATA_BASE = 0x10_0000;
/** Persistent buffers (event buffers) live at the end of the data region. */
const PERSISTENT_BYTES = 0x1_0000;

/** Options of a {@linkcode ScsiHarness}. */
export interface HarnessOptions extends VirtioScsiOptions {
  /** Feature bits the driver accepts (default: everything offered). */
  accept?: bigint;
  /** Ring size the driver uses (default 64). */
  ringSize?: number;
  /** Bytes of buffer space (default 4 MiB). */
  dataBytes?: number;
  /** Install hooks on the back-end (default true). */
  hooks?: boolean;
}

/** What a command request got back. */
export interface CommandResult {
  senseLen: number;
  residual: number;
  statusQualifier: number;
  status: number;
  response: number;
  /** The first `senseLen` bytes of the sense buffer. */
  sense: Uint8Array;
  /** The whole data-in buffer. */
  data: Uint8Array;
  /** used.len. */
  written: number;
}

/** Options of {@linkcode ScsiHarness.command}. */
export interface CommandOptions {
  /** Data-out bytes. */
  dataOut?: Uint8Array;
  /** Bytes of data-in buffer. */
  dataIn?: number;
  /** Request queue (default 2). */
  queue?: number;
  /** The 8 LUN bytes (default: the single-level encoding of target and lun). */
  lunBytes?: ArrayLike<number>;
  /** CDB bytes in the request (default: the device's cdb_size). */
  cdbSize?: number;
  /** Sense bytes in the response (default: the device's sense_size). */
  senseSize?: number;
  /** Split each data buffer into this many descriptors (default 1). */
  segments?: number;
  /** Put the header and the data in one descriptor on each side (default false). */
  merged?: boolean;
  /** Use an indirect table (default false). */
  indirect?: boolean;
  /** Tag (default the request number). */
  tag?: bigint;
}

/** A decoded event. */
export interface EventRecord {
  event: number;
  lun: number[];
  reason: number;
}

/** The LUN bytes virtio-scsi uses for `target`:`lun`. */
export function lunBytes(target: number, lun: number): number[] {
  return [1, target, lun >= 256 ? 0x40 | (lun >> 8) : 0, lun & 0xff, 0, 0, 0, 0];
}

/** A raw node over `size` bytes of memory (byte i = (i * 7 + 3) & 0xff). */
export async function memoryNode(size: number, readOnly = false): Promise<RawNode> {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i++) bytes[i] = (i * 7 + 3) & 0xff;
  return await RawNode.open(new MemoryFile("mem.img", bytes, { readOnly }));
}

/** A guest driver for one virtio-scsi device and the device itself. */
export class ScsiHarness {
  readonly mem: GuestMemory;
  readonly model: VirtioScsiModel;
  readonly backend: VirtioScsiBackend;
  /** Interrupts raised per queue (processQueue's callback and the hooks). */
  readonly interrupts: number[];
  /** Errors the back-end reported through `hooks.needsReset`. */
  readonly needsReset: Error[] = [];
  drivers: Array<DriverQueue<number>> = [];
  devices: DeviceQueue[] = [];
  features = 0n;
  readonly #opts: HarnessOptions;
  readonly #dataBytes: number;
  #next = DATA_BASE;
  #persistent: number;
  #tokens = 0;
  #epoch = 0;
  /** Event buffers by token. */
  readonly #eventBuffers = new Map<number, number>();

  constructor(opts: HarnessOptions = {}) {
    this.#opts = opts;
    this.#dataBytes = opts.dataBytes ?? 4 << 20;
    this.mem = new GuestMemory([{ gpa: 0, size: RING_REGION + this.#dataBytes }]);
    this.model = new VirtioScsiModel(opts);
    this.backend = new VirtioScsiBackend({ shared: this.model.shared.buffer });
    this.interrupts = new Array(this.model.numQueues).fill(0);
    if (opts.hooks ?? true) {
      this.backend.hooks = {
        interrupt: (q) => this.interrupts[q]!++,
        needsReset: (e) => this.needsReset.push(e),
      };
    }
    this.#persistent = DATA_BASE + this.#dataBytes - PERSISTENT_BYTES;
    this.activate();
  }

  /** Negotiates features, lays out every queue and activates model and back-end (DRIVER_OK). */
  activate(): void {
    const accept = this.#opts.accept ?? this.model.deviceFeatures;
    this.features = (this.model.deviceFeatures & accept) | featureBit(VIRTIO_F_VERSION_1);
    assert.ok(this.model.validateFeatures(this.features));
    const qf = queueFeaturesOf(this.features);
    const packed = (this.features & featureBit(VIRTIO_F_RING_PACKED)) !== 0n;
    const size = this.#opts.ringSize ?? 64;
    this.drivers = [];
    this.devices = [];
    const activated: ActivatedQueue[] = [];
    let base = 0x1000;
    for (let q = 0; q < this.model.numQueues; q++) {
      const layout = packed ? packedRingLayout(size, base) : splitRingLayout(size, base);
      base = Math.ceil((base + layout.bytes) / 4096) * 4096;
      assert.ok(base <= RING_REGION, "rings fit");
      if (packed) {
        this.drivers.push(new PackedDriverQueue<number>(this.mem, layout, qf));
        this.devices.push(new PackedDeviceQueue(this.mem, q, layout, qf));
      } else {
        this.drivers.push(new SplitDriverQueue<number>(this.mem, layout, qf));
        this.devices.push(new SplitDeviceQueue(this.mem, q, layout, qf));
      }
      activated.push({ index: q, layout, msixVector: VIRTIO_MSI_NO_VECTOR, notifyOff: q });
    }
    this.model.activate(this.features, activated, this.#epoch);
    this.backend.activate(this.mem, this.features, this.devices);
    this.#eventBuffers.clear();
    this.#persistent = DATA_BASE + this.#dataBytes - PERSISTENT_BYTES;
  }

  /** Device reset (status 0) and a fresh driver initialisation. */
  reset(): void {
    this.model.reset();
    this.backend.reset();
    this.#epoch++;
    this.activate();
  }

  /** Plugs a memory disk (or `node`) at `target`:`lun` and consumes its power-on unit attention. */
  async plug(
    target: number,
    lun: number,
    node: BlockNode | number = 1 << 20,
    options?: ScsiDiskOptions,
  ): Promise<{ node: BlockNode; disk: ScsiDisk }> {
    const n = typeof node === "number" ? await memoryNode(node) : node;
    const disk = this.backend.hotplug(target, lun, n, options);
    await this.command(target, lun, [0, 0, 0, 0, 0, 0]);
    return { node: n, disk };
  }

  #alloc(bytes: number): number {
    const at = Math.ceil(this.#next / 16) * 16;
    this.#next = at + Math.max(bytes, 1);
    assert.ok(this.#next <= DATA_BASE + this.#dataBytes - PERSISTENT_BYTES, "buffer space");
    return at;
  }

  /** Splits `length` bytes at `addr` into `parts` buffers. */
  static #split(addr: number, length: number, parts: number): DriverBuffer[] {
    if (length === 0) return [];
    const out: DriverBuffer[] = [];
    const n = Math.min(parts, length);
    const step = Math.ceil(length / n);
    for (let at = 0; at < length; at += step) {
      out.push({ addr: addr + at, length: Math.min(step, length - at) });
    }
    return out;
  }

  /**
   * Offers a chain on `queue`, kicks, runs the back-end and reaps the completion.
   *
   * @returns used.len, or throws when the back-end threw
   */
  async submit(
    queue: number,
    readable: DriverBuffer[],
    writable: DriverBuffer[],
    indirect = false,
  ): Promise<number> {
    const driver = this.drivers[queue]!;
    const token = ++this.#tokens;
    const table = indirect ? this.#alloc(16 * (readable.length + writable.length)) : undefined;
    assert.ok(driver.add(readable, writable, token, table), "ring has room");
    driver.kick();
    await this.backend.processQueue(queue, () => this.interrupts[queue]!++);
    // A command doing I/O completes after the drain, published on its own.
    await this.backend.drained();
    const used = driver.getUsed();
    assert.ok(used !== null, "the request completed");
    assert.equal(used.token, token);
    return used.written;
  }

  /** Writes `bytes` into fresh guest memory and returns a buffer for it. */
  buffer(bytes: ArrayLike<number>): DriverBuffer {
    const addr = this.#alloc(bytes.length);
    this.mem.write(addr, Uint8Array.from(bytes));
    return { addr, length: bytes.length };
  }

  /** Fresh zeroed guest memory of `length` bytes (filled with 0xcc so writes show). */
  space(length: number): DriverBuffer {
    const addr = this.#alloc(length);
    this.mem.fill(addr, length, 0xcc);
    return { addr, length };
  }

  /** Sends a SCSI command to `target`:`lun` and parses the response. */
  async command(
    target: number,
    lun: number,
    cdb: ArrayLike<number>,
    opts: CommandOptions = {},
  ): Promise<CommandResult> {
    this.#next = DATA_BASE;
    const cdbSize = opts.cdbSize ?? this.model.shared.cdbSize;
    const senseSize = opts.senseSize ?? this.model.shared.senseSize;
    const reqLen = VIRTIO_SCSI_CMD_REQ_HEADER + cdbSize;
    const respLen = VIRTIO_SCSI_CMD_RESP_HEADER + senseSize;
    const dataOut = opts.dataOut ?? new Uint8Array(0);
    const dataInLen = opts.dataIn ?? 0;
    const req = new Uint8Array(reqLen + (opts.merged ? dataOut.length : 0));
    req.set(opts.lunBytes ?? lunBytes(target, lun), 0);
    new DataView(req.buffer).setBigUint64(8, opts.tag ?? BigInt(this.#tokens + 1), true);
    req.set(Array.from(cdb).slice(0, cdbSize), VIRTIO_SCSI_CMD_REQ_HEADER);
    const segments = opts.segments ?? 1;
    const readable: DriverBuffer[] = [];
    const writable: DriverBuffer[] = [];
    let respAt: number;
    let dataInAt: number;
    if (opts.merged) {
      req.set(dataOut, reqLen);
      readable.push(this.buffer(req));
      const w = this.space(respLen + dataInLen);
      writable.push(w);
      respAt = w.addr;
      dataInAt = w.addr + respLen;
    } else {
      readable.push(this.buffer(req));
      if (dataOut.length > 0) {
        const d = this.buffer(dataOut);
        readable.push(...ScsiHarness.#split(d.addr, d.length, segments));
      }
      const r = this.space(respLen);
      writable.push(r);
      respAt = r.addr;
      const d = this.space(dataInLen);
      dataInAt = d.addr;
      writable.push(...ScsiHarness.#split(d.addr, dataInLen, segments));
    }
    const written = await this.submit(
      opts.queue ?? VIRTIO_SCSI_VQ_REQUEST,
      readable,
      writable,
      opts.indirect,
    );
    const resp = this.mem.slice(respAt, respLen);
    const v = new DataView(resp.buffer, resp.byteOffset, resp.byteLength);
    const senseLen = v.getUint32(0, true);
    return {
      senseLen,
      residual: v.getUint32(4, true),
      statusQualifier: v.getUint16(8, true),
      status: resp[10]!,
      response: resp[11]!,
      sense: resp.slice(12, 12 + Math.min(senseLen, senseSize)),
      data: this.mem.slice(dataInAt, dataInLen).slice(),
      written,
    };
  }

  /** Sends a task management function; returns the response byte. */
  async tmf(subtype: number, lun: ArrayLike<number>, tag = 0n): Promise<number> {
    this.#next = DATA_BASE;
    const req = new Uint8Array(24);
    const v = new DataView(req.buffer);
    v.setUint32(0, VIRTIO_SCSI_T_TMF, true);
    v.setUint32(4, subtype, true);
    req.set(lun, 8);
    v.setBigUint64(16, tag, true);
    const resp = this.space(1);
    const written = await this.submit(VIRTIO_SCSI_VQ_CONTROL, [this.buffer(req)], [resp]);
    assert.equal(written, 1);
    return this.mem.u8(resp.addr);
  }

  /** Sends AN_QUERY (or AN_SUBSCRIBE); returns event_actual and the response. */
  async an(
    lun: ArrayLike<number>,
    requested: number,
    type = VIRTIO_SCSI_T_AN_QUERY,
  ): Promise<{ eventActual: number; response: number; written: number }> {
    this.#next = DATA_BASE;
    const req = new Uint8Array(16);
    const v = new DataView(req.buffer);
    v.setUint32(0, type, true);
    req.set(lun, 4);
    v.setUint32(12, requested, true);
    const resp = this.space(5);
    const written = await this.submit(VIRTIO_SCSI_VQ_CONTROL, [this.buffer(req)], [resp]);
    return { eventActual: this.mem.u32(resp.addr), response: this.mem.u8(resp.addr + 4), written };
  }

  /**
   * Posts `count` event buffers of `size` bytes and kicks the event queue (with `notify` false
   * the back-end is not run: as if the device had suppressed the kick).
   */
  async postEvents(count: number, size = VIRTIO_SCSI_EVENT_SIZE, notify = true): Promise<void> {
    const driver = this.drivers[VIRTIO_SCSI_VQ_EVENT]!;
    for (let i = 0; i < count; i++) {
      const addr = this.#persistent;
      this.#persistent += Math.ceil(size / 16) * 16;
      this.mem.fill(addr, size, 0xcc);
      const token = ++this.#tokens;
      this.#eventBuffers.set(token, addr);
      assert.ok(driver.add([], [{ addr, length: size }], token));
    }
    driver.kick();
    if (!notify) return;
    await this.backend.processQueue(
      VIRTIO_SCSI_VQ_EVENT,
      () => this.interrupts[VIRTIO_SCSI_VQ_EVENT]!++,
    );
  }

  /** Reaps the completed event buffers. */
  events(): EventRecord[] {
    const driver = this.drivers[VIRTIO_SCSI_VQ_EVENT]!;
    const out: EventRecord[] = [];
    for (let used = driver.getUsed(); used !== null; used = driver.getUsed()) {
      assert.equal(used.written, VIRTIO_SCSI_EVENT_SIZE);
      const addr = this.#eventBuffers.get(used.token)!;
      this.#eventBuffers.delete(used.token);
      out.push({
        event: this.mem.u32(addr),
        lun: [...this.mem.slice(addr + 4, 8)],
        reason: this.mem.u32(addr + 12),
      });
    }
    return out;
  }
}
