/// <reference lib="deno.worker" />
/**
 * A hostile guest for the fault-containment tests (issue #13 §6): a vCPU that only serves requests
 * from the test, one at a time, so the test can look at the machine between steps. It sets devices
 * up with {@linkcode GuestVirtio}, runs virtio-blk and virtio-scsi I/O with every byte checked, and
 * breaks a ring in a named way ({@linkcode Breakage}), with or without ringing the doorbell.
 *
 * Every wait has a deadline: a lost interrupt fails the request instead of hanging the test.
 *
 * @module
 */

import { runVcpu, type VcpuContext } from "../../src/virtio/exits.ts";
import { GuestAllocator, GuestVirtio, type PciVirtio, probePci } from "./guest.ts";

/**
 * How the guest breaks a ring:
 * - `avail-jump` (split only): avail.idx moves N + 1 past what the device has seen;
 * - `outside-ram`: a chain whose first buffer lies beyond guest RAM;
 * - `zero-length`: a chain with a buffer of length 0.
 */
export type Breakage = "avail-jump" | "outside-ram" | "zero-length";

/** Requests the hostile vCPU serves. */
export type HostileRequest =
  | {
    op: "init";
    slot: number;
    queues: number;
    queueSize: number;
    packed: boolean;
    /** Device-specific feature bits to accept too. */
    features?: bigint;
    /** Program this queue_desc for every queue (a ring the driver says is elsewhere). */
    descOverride?: number;
  }
  | { op: "status"; slot: number }
  /** One virtio-blk request on queue 0; a read checks the bytes against `seed`'s pattern. */
  | { op: "blk"; slot: number; write: boolean; sector: number; bytes: number; seed: number }
  /** One WRITE(10)/READ(10) of 512-byte blocks to target 0 LUN 0 on request queue 2. */
  | { op: "scsi"; slot: number; write: boolean; lba: number; blocks: number; seed: number }
  /** An ABORT TASK for target 0 LUN 0 on the control queue; returns the response code. */
  | { op: "tmf"; slot: number }
  /** Posts `count` 16-byte event buffers on the event queue and rings its doorbell. */
  | { op: "post-events"; slot: number; count: number }
  | { op: "break"; slot: number; queue: number; how: Breakage; kick: boolean }
  /** Rings queue `queue`'s doorbell, nothing else. */
  | { op: "kick"; slot: number; queue: number }
  /** Waits until `min` event buffers came back; returns the event codes reaped. */
  | { op: "reap-events"; slot: number; min: number; timeoutMs: number }
  /** Waits for the device's config interrupt; true when it came within `timeoutMs`. */
  | { op: "wait-config"; slot: number; timeoutMs: number };

/** What `blk` and `scsi` return. */
export interface IoResult {
  /** virtio-blk status byte, or virtio-scsi response code. */
  status: number;
  /** SCSI status (scsi only). */
  scsiStatus?: number;
  /** A read found the pattern it expected (writes: true). */
  match: boolean;
}

const RAM_BASE = 1 << 20;
/** Past the end of any test machine's RAM and below the PCI hole's BARs. */
const OUTSIDE_RAM = 0x8000_0000;
const IO_TIMEOUT_MS = 10_000;
const MAX_IO = 64 * 1024;

interface Device {
  readonly dev: GuestVirtio;
  /** Scratch: request header at +0, response/status at +256, data at +4096. */
  readonly scratch: number;
  readonly events: number;
}

const devices = new Map<number, Device>();
/** Interrupts taken and not yet consumed, by x86 vector. */
const taken = new Map<number, number>();
let functions: PciVirtio[] | null = null;
let alloc: GuestAllocator | null = null;
let nextToken = 1;
/** Where each posted event buffer is, by token. */
const eventBuffers = new Map<number, number>();

function takeAll(ctx: VcpuContext): void {
  for (let v = ctx.interrupts.takeNext(); v !== null; v = ctx.interrupts.takeNext()) {
    taken.set(v, (taken.get(v) ?? 0) + 1);
  }
}

function device(slot: number): Device {
  const d = devices.get(slot);
  if (d === undefined) throw new Error(`Slot ${slot} is not initialised`);
  return d;
}

/** Byte k of pattern `seed`. */
function patternByte(seed: number, k: number): number {
  return (seed * 131 + k * 7 + 1) & 0xff;
}

function fillPattern(dst: Uint8Array, seed: number): void {
  for (let k = 0; k < dst.length; k++) dst[k] = patternByte(seed, k);
}

function matches(got: Uint8Array, seed: number): boolean {
  for (let k = 0; k < got.length; k++) if (got[k] !== patternByte(seed, k)) return false;
  return true;
}

/** Submits one chain on `queue`, rings the doorbell and waits for its completion. */
function roundTrip(
  ctx: VcpuContext,
  d: Device,
  queue: number,
  readable: { addr: number; length: number }[],
  writable: { addr: number; length: number }[],
): number {
  const q = d.dev.queues[queue];
  if (q === undefined) throw new Error(`Queue ${queue} is not set up`);
  const token = nextToken++;
  if (!q.add(readable, writable, token)) throw new Error(`Queue ${queue} is full`);
  if (q.kick()) d.dev.notify(queue);
  const deadline = performance.now() + IO_TIMEOUT_MS;
  for (;;) {
    const used = q.getUsed();
    if (used !== null) {
      if (used.token !== token) throw new Error(`Completion of ${used.token}, not ${token}`);
      return used.written;
    }
    const left = deadline - performance.now();
    if (left <= 0 || !ctx.interrupts.waitForInterrupt(left)) {
      throw new Error(`No completion on queue ${queue} within ${IO_TIMEOUT_MS} ms`);
    }
    takeAll(ctx);
  }
}

function blk(ctx: VcpuContext, r: Extract<HostileRequest, { op: "blk" }>): IoResult {
  const d = device(r.slot);
  const { mem } = ctx;
  if (r.bytes > MAX_IO) throw new Error(`At most ${MAX_IO} bytes`);
  const header = d.scratch;
  const status = d.scratch + 256;
  const data = d.scratch + 4096;
  mem.setU32(header, r.write ? 1 : 0); // VIRTIO_BLK_T_OUT / IN
  mem.setU32(header + 4, 0);
  mem.setU64Number(header + 8, r.sector);
  mem.setU8(status, 0xff);
  const view = mem.slice(data, r.bytes);
  if (r.write) fillPattern(view, r.seed);
  else view.fill(0);
  const buf = { addr: data, length: r.bytes };
  roundTrip(
    ctx,
    d,
    0,
    r.write ? [{ addr: header, length: 16 }, buf] : [{ addr: header, length: 16 }],
    r.write ? [{ addr: status, length: 1 }] : [buf, { addr: status, length: 1 }],
  );
  return { status: mem.u8(status), match: r.write || matches(view, r.seed) };
}

const SCSI_REQ = 19 + 32; // header + default cdb_size
const SCSI_RESP = 12 + 96; // header + default sense_size

function scsi(ctx: VcpuContext, r: Extract<HostileRequest, { op: "scsi" }>): IoResult {
  const d = device(r.slot);
  const { mem } = ctx;
  const bytes = r.blocks * 512;
  if (bytes > MAX_IO) throw new Error(`At most ${MAX_IO} bytes`);
  const req = d.scratch;
  const resp = d.scratch + 256;
  const data = d.scratch + 4096;
  const view = mem.slice(data, bytes);
  if (r.write) fillPattern(view, r.seed);
  // A unit attention (power on, reset) fails the first command after a reset: retry it.
  for (let attempt = 0; attempt < 4; attempt++) {
    mem.fill(req, SCSI_REQ);
    mem.setU8(req, 1); // LUN: target 0, LUN 0
    const cdb = req + 19;
    mem.setU8(cdb, r.write ? 0x2a : 0x28); // WRITE(10) / READ(10)
    mem.setU8(cdb + 2, (r.lba >>> 24) & 0xff);
    mem.setU8(cdb + 3, (r.lba >>> 16) & 0xff);
    mem.setU8(cdb + 4, (r.lba >>> 8) & 0xff);
    mem.setU8(cdb + 5, r.lba & 0xff);
    mem.setU8(cdb + 7, (r.blocks >>> 8) & 0xff);
    mem.setU8(cdb + 8, r.blocks & 0xff);
    mem.fill(resp, SCSI_RESP, 0xff);
    if (!r.write) view.fill(0);
    const buf = { addr: data, length: bytes };
    roundTrip(
      ctx,
      d,
      2,
      r.write ? [{ addr: req, length: SCSI_REQ }, buf] : [{ addr: req, length: SCSI_REQ }],
      r.write ? [{ addr: resp, length: SCSI_RESP }] : [{ addr: resp, length: SCSI_RESP }, buf],
    );
    const response = mem.u8(resp + 11);
    const status = mem.u8(resp + 10);
    if (response === 0 && status === 0x02) continue; // CHECK CONDITION
    return {
      status: response,
      scsiStatus: status,
      match: r.write || matches(view, r.seed),
    };
  }
  throw new Error("SCSI command still failing with CHECK CONDITION after 4 attempts");
}

function tmf(ctx: VcpuContext, r: Extract<HostileRequest, { op: "tmf" }>): number {
  const d = device(r.slot);
  const { mem } = ctx;
  const req = d.scratch;
  const resp = d.scratch + 256;
  mem.fill(req, 24);
  mem.setU32(req, 0); // VIRTIO_SCSI_T_TMF
  mem.setU32(req + 4, 0); // ABORT TASK
  mem.setU8(req + 8, 1); // LUN: target 0, LUN 0
  mem.setU8(resp, 0xff);
  roundTrip(ctx, d, 0, [{ addr: req, length: 24 }], [{ addr: resp, length: 1 }]);
  return mem.u8(resp);
}

function postEvents(ctx: VcpuContext, r: Extract<HostileRequest, { op: "post-events" }>): void {
  const d = device(r.slot);
  const q = d.dev.queues[1];
  if (q === undefined) throw new Error("No event queue");
  for (let i = 0; i < r.count; i++) {
    const addr = d.events + 16 * (eventBuffers.size % 64);
    ctx.mem.fill(addr, 16, 0xff);
    eventBuffers.set(nextToken, addr);
    if (!q.add([], [{ addr, length: 16 }], nextToken++)) throw new Error("Event queue is full");
  }
  if (q.kick()) d.dev.notify(1);
}

function breakRing(ctx: VcpuContext, r: Extract<HostileRequest, { op: "break" }>): void {
  const d = device(r.slot);
  const { mem } = ctx;
  const q = d.dev.queues[r.queue];
  const layout = d.dev.layouts[r.queue];
  if (q === undefined || layout === undefined) throw new Error(`Queue ${r.queue} is not set up`);
  switch (r.how) {
    case "avail-jump": {
      if ((d.dev.features & (1n << 34n)) !== 0n) throw new Error("avail-jump needs a split ring");
      // avail.idx is the u16 at driver + 2: move it one lap of the ring and one more ahead.
      const idx = mem.atomicU16(layout.driver + 2);
      mem.atomicSetU16(layout.driver + 2, (idx + layout.size + 1) & 0xffff);
      break;
    }
    case "outside-ram":
    case "zero-length": {
      const status = d.scratch + 256;
      const first = r.how === "outside-ram"
        ? { addr: OUTSIDE_RAM, length: 16 }
        : { addr: d.scratch, length: 0 };
      if (!q.add([first], [{ addr: status, length: 1 }], nextToken++)) {
        throw new Error(`Queue ${r.queue} is full`);
      }
      q.kick(); // publishes; whether the device wants a doorbell is for `r.kick` to decide
      break;
    }
  }
  if (r.kick) d.dev.notify(r.queue);
}

function reapEvents(
  ctx: VcpuContext,
  r: Extract<HostileRequest, { op: "reap-events" }>,
): number[] {
  const d = device(r.slot);
  const q = d.dev.queues[1];
  if (q === undefined) throw new Error("No event queue");
  const codes: number[] = [];
  const deadline = performance.now() + r.timeoutMs;
  for (;;) {
    for (let used = q.getUsed(); used !== null; used = q.getUsed()) {
      if (used.written < 16) throw new Error(`An event of ${used.written} bytes`);
      // The buffer of the n-th post is at events + 16 × (token order); the code is its first u32.
      codes.push(used.token);
    }
    if (codes.length >= r.min) break;
    const left = deadline - performance.now();
    if (left <= 0 || !ctx.interrupts.waitForInterrupt(left)) {
      throw new Error(`${codes.length} of ${r.min} events within ${r.timeoutMs} ms`);
    }
    takeAll(ctx);
  }
  return codes.map((token) => ctx.mem.u32(eventBuffers.get(token)!));
}

function waitConfig(ctx: VcpuContext, r: Extract<HostileRequest, { op: "wait-config" }>): boolean {
  const vector = device(r.slot).dev.configVector;
  const deadline = performance.now() + r.timeoutMs;
  for (;;) {
    takeAll(ctx);
    const n = taken.get(vector) ?? 0;
    if (n > 0) {
      taken.set(vector, n - 1);
      return true;
    }
    const left = deadline - performance.now();
    if (left <= 0 || !ctx.interrupts.waitForInterrupt(left)) return false;
  }
}

function init(ctx: VcpuContext, r: Extract<HostileRequest, { op: "init" }>): { status: number } {
  functions ??= probePci(ctx.bus);
  alloc ??= new GuestAllocator(RAM_BASE, ctx.mem.regions[0]!.size - RAM_BASE);
  let d = devices.get(r.slot);
  if (d === undefined) {
    const info = functions.find((f) => f.slot === r.slot);
    if (info === undefined) throw new Error(`No virtio function in slot ${r.slot}`);
    d = {
      dev: new GuestVirtio(ctx.bus, ctx.mem, alloc, info),
      scratch: alloc.alloc(4096 + MAX_IO, 4096),
      events: alloc.alloc(16 * 64, 16),
    };
    devices.set(r.slot, d);
  }
  // One block of 16 vectors per device, in order of first initialisation.
  const vectorBase = 0x40 + 16 * [...devices.keys()].indexOf(r.slot);
  // Interrupts of the device's earlier life are stale once it has reset (the reset waits for the
  // iothread to quiesce); those of the new life, from DRIVER_OK on, must be kept.
  d.dev.reset();
  takeAll(ctx);
  for (let v = vectorBase; v < vectorBase + 16; v++) taken.delete(v);
  d.dev.init({
    queues: r.queues,
    queueSize: r.queueSize,
    packed: r.packed,
    vectorBase,
    ...(r.features === undefined ? {} : { features: r.features }),
    ...(r.descOverride === undefined ? {} : { descOverride: r.descOverride }),
  });
  return { status: d.dev.status };
}

runVcpu(self, {
  onRequest(ctx, body) {
    const r = body as HostileRequest;
    switch (r.op) {
      case "init":
        return init(ctx, r);
      case "status":
        return device(r.slot).dev.status;
      case "blk":
        return blk(ctx, r);
      case "scsi":
        return scsi(ctx, r);
      case "tmf":
        return tmf(ctx, r);
      case "post-events":
        return postEvents(ctx, r);
      case "reap-events":
        return reapEvents(ctx, r);
      case "break":
        return breakRing(ctx, r);
      case "kick":
        return device(r.slot).dev.notify(r.queue);
      case "wait-config":
        return waitConfig(ctx, r);
    }
  },
});
