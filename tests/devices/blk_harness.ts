/**
 * The driver side of virtio-blk for tests and benches: guest memory, driver queues (split or
 * packed) laid out for each of the model's queues, features negotiated directly with the model (no
 * PCI), and helpers that build header/data/status chains, kick, run the back-end and reap
 * completions. Also a counting wrapper node, to see what reaches the block layer.
 *
 * @module
 */

import { RawNode } from "../../formats/raw.ts";
import type {
  BlockNode,
  Extent,
  TruncateOptions,
  WriteOptions,
  WriteZeroesOptions,
} from "../../src/block/node.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import {
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from "../../src/virtio/virtio_blk_constants.ts";
import {
  VirtioBlkBackend,
  VirtioBlkModel,
  type VirtioBlkOptions,
} from "../../src/devices/virtio_blk.ts";
import { type ActivatedQueue, isPackedRing, queueFeaturesOf } from "../../src/virtio/device.ts";
import { VIRTIO_MSI_NO_VECTOR } from "../../src/virtio/features.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import {
  PackedDeviceQueue,
  PackedDriverQueue,
  packedRingLayout,
} from "../../src/virtio/packed_queue.ts";
import type {
  DeviceQueue,
  DriverBuffer,
  DriverQueue,
  QueueLayout,
} from "../../src/virtio/queue.ts";
import {
  SplitDeviceQueue,
  SplitDriverQueue,
  splitRingLayout,
} from "../../src/virtio/split_queue.ts";

/** Guest RAM below this holds the rings; buffers go above. */
export const RING_AREA = 0x10_0000;

/** An in-memory raw disk of `size` bytes (zeroes), optionally read-only. */
export async function memoryDisk(
  size: number,
  opts: { readOnly?: boolean; fill?: (i: number) => number } = {},
): Promise<{ node: BlockNode; file: MemoryFile }> {
  const bytes = new Uint8Array(size);
  if (opts.fill) { for (let i = 0; i < size; i++) bytes[i] = opts.fill(i); }
  const file = new MemoryFile("disk", bytes);
  const node = await RawNode.open(file, { readOnly: opts.readOnly ?? false });
  return { node, file };
}

/** One call that reached the node. */
export interface NodeCall {
  op: "read" | "write" | "writeZeroes" | "discard" | "flush";
  offset: number;
  length: number;
  fua: boolean;
  unmap: boolean;
}

/**
 * A filter node that counts and records every call, then passes it on. `failAt` makes reads and
 * writes touching that byte offset throw, to simulate a media error.
 */
export class CountingNode implements BlockNode {
  readonly inner: BlockNode;
  readonly calls: NodeCall[] = [];
  record = true;
  failAt: number | null = null;
  /** What an access over `failAt` throws (default a plain media error). */
  failWith: (() => Error) | null = null;
  reads = 0;
  writes = 0;
  fuaWrites = 0;
  flushes = 0;
  discards = 0;
  zeroWrites = 0;

  constructor(inner: BlockNode) {
    this.inner = inner;
  }

  get format(): string {
    return this.inner.format;
  }
  get filename(): string {
    return this.inner.filename;
  }
  get size(): number {
    return this.inner.size;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get requestAlignment(): number {
    return this.inner.requestAlignment;
  }

  /** Forgets the recorded calls and zeroes the counters. */
  clear(): void {
    this.calls.length = 0;
    this.reads =
      this.writes =
      this.fuaWrites =
      this.flushes =
      this.discards =
      this.zeroWrites =
        0;
  }

  #log(op: NodeCall["op"], offset: number, length: number, fua = false, unmap = false): void {
    if (this.record) this.calls.push({ op, offset, length, fua, unmap });
  }

  #check(offset: number, length: number): void {
    if (this.failAt !== null && offset <= this.failAt && this.failAt < offset + length) {
      throw this.failWith?.() ?? new Error(`Simulated media error at ${this.failAt}`);
    }
  }

  read(offset: number, dst: Uint8Array): Promise<void> {
    this.reads++;
    this.#log("read", offset, dst.length);
    this.#check(offset, dst.length);
    return this.inner.read(offset, dst);
  }
  write(offset: number, src: Uint8Array, opts?: WriteOptions): Promise<void> {
    this.writes++;
    if (opts?.fua) this.fuaWrites++;
    this.#log("write", offset, src.length, opts?.fua ?? false);
    this.#check(offset, src.length);
    return this.inner.write(offset, src, opts);
  }
  writeZeroes(offset: number, length: number, opts?: WriteZeroesOptions): Promise<void> {
    this.zeroWrites++;
    this.#log("writeZeroes", offset, length, opts?.fua ?? false, opts?.unmap ?? false);
    return this.inner.writeZeroes(offset, length, opts);
  }
  discard(offset: number, length: number): Promise<void> {
    this.discards++;
    this.#log("discard", offset, length);
    return this.inner.discard(offset, length);
  }
  flush(): Promise<void> {
    this.flushes++;
    this.#log("flush", 0, 0);
    return this.inner.flush();
  }
  blockStatus(offset: number, max: number): Promise<Extent> {
    return this.inner.blockStatus(offset, max);
  }
  truncate(size: number, opts?: TruncateOptions): Promise<void> {
    if (this.inner.truncate === undefined) return Promise.reject(new Error("No truncate"));
    return this.inner.truncate(size, opts);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/** A node of any size that stores nothing: reads return zeroes, writes vanish. */
export class NullNode implements BlockNode {
  readonly format = "null";
  readonly filename = "null";
  readonly requestAlignment = 1;
  readonly readOnly = false;
  readonly size: number;

  constructor(size: number) {
    this.size = size;
  }

  read(_offset: number, dst: Uint8Array): Promise<void> {
    dst.fill(0);
    return Promise.resolve();
  }
  write(): Promise<void> {
    return Promise.resolve();
  }
  writeZeroes(): Promise<void> {
    return Promise.resolve();
  }
  discard(): Promise<void> {
    return Promise.resolve();
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  blockStatus(offset: number, max: number): Promise<Extent> {
    return Promise.resolve({ kind: "zero", offset, length: Math.max(1, max) });
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** A discard / write-zeroes segment as the driver writes it. */
export interface Segment {
  sector: number;
  sectors: number;
  flags?: number;
}

/**
 * A request as a test describes it; the harness lays it out in guest memory.
 *
 * Default layout (Linux's): header in its own 16-byte buffer, each data piece in its own buffer,
 * status in a 1-byte buffer.
 */
export interface BlkRequest {
  type: number;
  sector?: number | bigint;
  /** OUT: the bytes to write. */
  data?: Uint8Array;
  /** IN, GET_ID: the bytes to read (the data buffer's size). */
  readBytes?: number;
  /** DISCARD, WRITE_ZEROES: segments (or use `data` for raw bytes). */
  segments?: readonly Segment[];
  /** Split the data into buffers of this many bytes. */
  pieceBytes?: number;
  /** Split the header into two 8-byte buffers. */
  splitHeader?: boolean;
  /** Put the header and the data (OUT) in one buffer. */
  headerWithData?: boolean;
  /** Put the status byte at the end of the last data buffer (IN). */
  statusWithData?: boolean;
  /** Size of the status buffer (the status is its last byte). Default 1. */
  statusBytes?: number;
  /** Use an indirect table (when INDIRECT_DESC was negotiated). */
  indirect?: boolean;
  /** Place the buffers exactly so: skips all layout above (for framing tests). */
  raw?: { readable: DriverBuffer[]; writable: DriverBuffer[] };
}

/** What the driver keeps of a submitted request. */
export interface Submitted {
  seq: number;
  statusAddr: number;
  /** Where the read data lands: buffers in order. */
  dataIn: DriverBuffer[];
}

/** A reaped completion. */
export interface BlkCompletion {
  seq: number;
  written: number;
  status: number;
  /** For reads: the data read (copied out of guest memory). */
  data: Uint8Array;
}

/** How {@linkcode BlkRig.create} builds the rig. */
export interface BlkRigOptions {
  /** Device options (shared by model and back-end). */
  options?: VirtioBlkOptions;
  /** The node the back-end drives; default a fresh 4 MiB in-memory raw disk. */
  node?: BlockNode;
  /** Drop features from what the driver accepts. */
  refuse?: bigint;
  /** Guest RAM for buffers, bytes. Default 8 MiB. */
  bufferBytes?: number;
  /** Use this queue size instead of the model's maximum. */
  queueSize?: number;
}

/** A driver, model and back-end wired together in one thread. */
export class BlkRig {
  readonly mem: GuestMemory;
  readonly model: VirtioBlkModel;
  readonly backend: VirtioBlkBackend;
  readonly node: BlockNode;
  readonly features: bigint;
  readonly drivers: DriverQueue<Submitted>[] = [];
  readonly deviceQueues: DeviceQueue[] = [];
  readonly layouts: QueueLayout[] = [];
  /** Interrupts the back-end asked for, per queue. */
  readonly interrupts: number[] = [];
  /** Kicks the driver would have sent, per queue. */
  readonly kicks: number[] = [];
  readonly #bufferEnd: number;
  #next = RING_AREA;
  #seq = 0;
  #outstanding = 0;

  private constructor(
    mem: GuestMemory,
    model: VirtioBlkModel,
    backend: VirtioBlkBackend,
    node: BlockNode,
    features: bigint,
  ) {
    this.mem = mem;
    this.model = model;
    this.backend = backend;
    this.node = node;
    this.features = features;
    this.#bufferEnd = mem.regions[1]!.gpa + mem.regions[1]!.size;
  }

  /**
   * Builds guest RAM, the model (from the options and the node), negotiates every offered feature
   * (minus `refuse`), lays out and activates each queue, and builds the back-end.
   */
  static async create(opts: BlkRigOptions = {}): Promise<BlkRig> {
    const node = opts.node ?? (await memoryDisk(4 << 20)).node;
    const options = opts.options ?? {};
    const model = new VirtioBlkModel(options, node);
    const features = model.deviceFeatures & ~(opts.refuse ?? 0n);
    if (!model.validateFeatures(features)) throw new Error("Model refused the features");
    const bufferBytes = opts.bufferBytes ?? 8 << 20;
    const mem = new GuestMemory([
      { gpa: 0, size: RING_AREA },
      { gpa: RING_AREA, size: Math.ceil(bufferBytes / 4096) * 4096 },
    ]);
    const backend = new VirtioBlkBackend(node, options, model.shared);
    const rig = new BlkRig(mem, model, backend, node, features);
    rig.#setupQueues(opts.queueSize ?? model.options.queueSize);
    return rig;
  }

  #setupQueues(size: number): void {
    const qf = queueFeaturesOf(this.features);
    const packed = isPackedRing(this.features);
    const activated: ActivatedQueue[] = [];
    let base = 0x1000;
    for (let i = 0; i < this.model.numQueues; i++) {
      const layout = packed ? packedRingLayout(size, base) : splitRingLayout(size, base);
      base = Math.ceil((base + layout.bytes) / 4096) * 4096;
      if (base > RING_AREA) throw new Error("Rings do not fit the ring area");
      this.layouts.push(layout);
      this.drivers.push(
        packed
          ? new PackedDriverQueue<Submitted>(this.mem, layout, qf)
          : new SplitDriverQueue<Submitted>(this.mem, layout, qf),
      );
      this.deviceQueues.push(
        packed
          ? new PackedDeviceQueue(this.mem, i, layout, qf)
          : new SplitDeviceQueue(this.mem, i, layout, qf),
      );
      activated.push({ index: i, layout, msixVector: VIRTIO_MSI_NO_VECTOR, notifyOff: i });
      this.interrupts.push(0);
      this.kicks.push(0);
    }
    this.model.activate(this.features, activated, 0);
    this.backend.activate(this.mem, this.features, this.deviceQueues);
  }

  /** Device reset and re-activation with fresh rings, as a driver recovering from NEEDS_RESET. */
  reactivate(): void {
    this.model.reset();
    this.backend.reset();
    const qf = queueFeaturesOf(this.features);
    const packed = isPackedRing(this.features);
    for (let i = 0; i < this.layouts.length; i++) {
      const layout = this.layouts[i]!;
      this.drivers[i] = packed
        ? new PackedDriverQueue<Submitted>(this.mem, layout, qf)
        : new SplitDriverQueue<Submitted>(this.mem, layout, qf);
      this.deviceQueues[i]!.reset();
    }
    this.#outstanding = 0;
    this.#next = RING_AREA;
    this.model.validateFeatures(this.features);
    this.model.activate(this.features, [], 1);
    this.backend.activate(this.mem, this.features, this.deviceQueues);
  }

  /** `bytes` of buffer space (16-aligned); recycled whenever nothing is outstanding. */
  alloc(bytes: number): number {
    const at = this.#next;
    this.#next += Math.ceil(Math.max(bytes, 1) / 16) * 16;
    if (this.#next > this.#bufferEnd) throw new Error("Test buffer space exhausted");
    return at;
  }

  /** Writes `bytes` into a fresh buffer; returns its address. */
  put(bytes: Uint8Array): number {
    const at = this.alloc(bytes.length);
    this.mem.write(at, bytes);
    return at;
  }

  /** Lays out `req` in guest memory and adds it to queue `q` (not yet kicked). */
  submit(req: BlkRequest, q = 0): Submitted {
    if (this.#outstanding === 0) this.#next = RING_AREA;
    const seq = ++this.#seq;
    let readable: DriverBuffer[];
    let writable: DriverBuffer[];
    let statusAddr = -1;
    const dataIn: DriverBuffer[] = [];
    if (req.raw !== undefined) {
      readable = req.raw.readable;
      writable = req.raw.writable;
      const last = writable[writable.length - 1];
      statusAddr = last === undefined ? -1 : last.addr + last.length - 1;
    } else {
      const header = new Uint8Array(16);
      const hv = new DataView(header.buffer);
      hv.setUint32(0, req.type, true);
      hv.setBigUint64(8, BigInt(req.sector ?? 0), true);
      let payload = req.data;
      if (req.segments !== undefined) {
        payload = new Uint8Array(16 * req.segments.length);
        const sv = new DataView(payload.buffer);
        req.segments.forEach((s, i) => {
          sv.setBigUint64(16 * i, BigInt(s.sector), true);
          sv.setUint32(16 * i + 8, s.sectors, true);
          sv.setUint32(16 * i + 12, s.flags ?? 0, true);
        });
      }
      readable = [];
      writable = [];
      const pieces = (total: number): number[] => {
        const size = req.pieceBytes ?? total;
        const out: number[] = [];
        for (let at = 0; at < total; at += size) out.push(Math.min(size, total - at));
        return out;
      };
      if (req.headerWithData && payload !== undefined) {
        const both = new Uint8Array(16 + payload.length);
        both.set(header);
        both.set(payload, 16);
        readable.push({ addr: this.put(both), length: both.length });
      } else {
        if (req.splitHeader) {
          readable.push({ addr: this.put(header.subarray(0, 8)), length: 8 });
          readable.push({ addr: this.put(header.subarray(8)), length: 8 });
        } else {
          readable.push({ addr: this.put(header), length: 16 });
        }
        if (payload !== undefined) {
          let at = 0;
          for (const n of pieces(payload.length)) {
            readable.push({ addr: this.put(payload.subarray(at, at + n)), length: n });
            at += n;
          }
        }
      }
      const readBytes = req.readBytes ?? 0;
      const statusBytes = req.statusBytes ?? 1;
      const sizes = pieces(readBytes);
      for (const [i, n] of sizes.entries()) {
        const lastPiece = i === sizes.length - 1;
        const withStatus = lastPiece && req.statusWithData === true;
        const addr = this.alloc(n + (withStatus ? 1 : 0));
        this.mem.fill(addr, n, 0xee);
        dataIn.push({ addr, length: n });
        writable.push({ addr, length: n + (withStatus ? 1 : 0) });
        if (withStatus) statusAddr = addr + n;
      }
      if (req.statusWithData !== true || readBytes === 0) {
        const addr = this.alloc(statusBytes);
        this.mem.fill(addr, statusBytes, 0xff);
        writable.push({ addr, length: statusBytes });
        statusAddr = addr + statusBytes - 1;
      }
    }
    const total = readable.length + writable.length;
    const table = req.indirect ? this.alloc(16 * total) : undefined;
    const sub: Submitted = { seq, statusAddr, dataIn };
    if (statusAddr >= 0) this.mem.setU8(statusAddr, 0xff);
    if (!this.drivers[q]!.add(readable, writable, sub, table)) {
      throw new Error("Ring full");
    }
    this.#outstanding++;
    return sub;
  }

  /** Publishes what was added to queue `q`; counts the kick when the device wants one. */
  kick(q = 0): boolean {
    const wanted = this.drivers[q]!.kick();
    if (wanted) this.kicks[q]!++;
    return wanted;
  }

  /**
   * Runs the back-end on queue `q` once, counting the interrupts it asks for, and waits until the
   * requests it started have completed (they may complete after the drain, published on their own).
   */
  async process(q = 0): Promise<void> {
    await this.backend.processQueue(q, () => this.interrupts[q]!++);
    await this.backend.drained();
  }

  /** Every completion waiting on queue `q`, in used-ring order. */
  reap(q = 0): BlkCompletion[] {
    const out: BlkCompletion[] = [];
    for (let u = this.drivers[q]!.getUsed(); u !== null; u = this.drivers[q]!.getUsed()) {
      const sub = u.token;
      this.#outstanding--;
      const size = sub.dataIn.reduce((s, b) => s + b.length, 0);
      const data = new Uint8Array(size);
      let at = 0;
      for (const b of sub.dataIn) {
        data.set(this.mem.slice(b.addr, b.length), at);
        at += b.length;
      }
      const status = sub.statusAddr >= 0 ? this.mem.u8(sub.statusAddr) : -1;
      out.push({ seq: sub.seq, written: u.written, status, data });
    }
    return out;
  }

  /** Submits `reqs` on queue `q`, kicks once, processes, and reaps them (in submission order). */
  async batch(reqs: readonly BlkRequest[], q = 0): Promise<BlkCompletion[]> {
    const subs = reqs.map((r) => this.submit(r, q));
    this.kick(q);
    await this.process(q);
    const done = this.reap(q);
    if (done.length !== subs.length) {
      throw new Error(`Expected ${subs.length} completions, got ${done.length}`);
    }
    const bySeq = new Map(done.map((c) => [c.seq, c]));
    return subs.map((s) => bySeq.get(s.seq)!);
  }

  /** One request, start to finish. */
  async one(req: BlkRequest, q = 0): Promise<BlkCompletion> {
    const [done] = await this.batch([req], q);
    return done!;
  }

  /** Reads `bytes` at `sector`; throws unless the status is OK. */
  async read(sector: number, bytes: number, q = 0): Promise<Uint8Array> {
    const c = await this.one({ type: VIRTIO_BLK_T_IN, sector, readBytes: bytes }, q);
    if (c.status !== 0) throw new Error(`Read at sector ${sector} failed with status ${c.status}`);
    return c.data;
  }

  /** Writes `data` at `sector`; returns the status. */
  async write(sector: number, data: Uint8Array, q = 0): Promise<number> {
    return (await this.one({ type: VIRTIO_BLK_T_OUT, sector, data }, q)).status;
  }

  /** GET_ID with a `bytes` buffer. */
  async getId(bytes = 20): Promise<BlkCompletion> {
    return await this.one({ type: VIRTIO_BLK_T_GET_ID, readBytes: bytes });
  }

  /** DISCARD or WRITE_ZEROES of `segments`; returns the status. */
  async segments(zeroes: boolean, segments: readonly Segment[]): Promise<number> {
    const type = zeroes ? VIRTIO_BLK_T_WRITE_ZEROES : VIRTIO_BLK_T_DISCARD;
    return (await this.one({ type, segments })).status;
  }
}

/** Deterministic bytes for (seed, i). */
export function patternBytes(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** True when no status byte says anything but OK. */
export function allOk(done: readonly BlkCompletion[]): boolean {
  return done.every((c) => c.status === 0);
}
