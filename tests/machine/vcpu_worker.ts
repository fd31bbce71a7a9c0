/// <reference lib="deno.worker" />
/**
 * The test vCPU: runs a guest program from `guest.ts` against the exit bus, chosen by the boot
 * payload's `kind`. Every wait in the guest has a timeout, so a lost interrupt fails the program
 * instead of hanging it.
 *
 * - `echo`: enumerates PCI, initialises the devices named in `runs` and sends each run's echo
 *   requests, checking every byte; reports the driver counters to the VMM.
 * - `hostile`: breaks a descriptor of one device, expects NEEDS_RESET and a config interrupt there,
 *   checks another device keeps working, then resets and re-initialises the broken one.
 * - `wait-needs-reset`: initialises one device, sends one request, waits for the config interrupt.
 * - `serve`: no main; answers requests `init` and `pingpong` (for the benchmark).
 *
 * @module
 */

import { runVcpu, type VcpuContext } from "../../src/virtio/exits.ts";
import { VIRTIO_CONFIG_S_NEEDS_RESET } from "../../src/virtio/features.ts";
import {
  type EchoResult,
  GuestAllocator,
  GuestVirtio,
  type PciVirtio,
  probePci,
  runEcho,
} from "./guest.ts";

/** One echo run of the `echo` program. */
export interface EchoRun {
  slot: number;
  queue: number;
  requests: number;
  depth: number;
  bytes: number;
}

/** Per-device driver setup of the `echo` program. */
export interface EchoDevice {
  slot: number;
  queues: number;
  queueSize: number;
  packed: boolean;
}

/** Boot payloads. */
export type GuestPayload =
  | { kind: "echo"; devices: EchoDevice[]; runs: EchoRun[]; timeoutMs: number }
  | { kind: "hostile"; victim: number; bystander: number; timeoutMs: number }
  | { kind: "wait-needs-reset"; slot: number; timeoutMs: number }
  | { kind: "serve" };

/** What the `echo` program returns. */
export interface EchoReport {
  functions: PciVirtio[];
  results: EchoResult[];
}

/** What the `hostile` program returns. */
export interface HostileReport {
  statusAfterFault: number;
  generationBefore: number;
  generationAfter: number;
  configInterrupt: boolean;
  bystanderAfterFault: EchoResult;
  victimAfterReset: EchoResult;
  statusAfterReset: number;
}

/** Requests of the `serve` program. */
export type ServeRequest =
  | { op: "init"; slot: number; queueSize: number; packed: boolean }
  | { op: "pingpong"; slot: number; rounds: number; bytes: number };

const RAM_BASE = 1 << 20;

function allocatorFor(ctx: VcpuContext): GuestAllocator {
  const region = ctx.mem.regions[0]!;
  return new GuestAllocator(RAM_BASE, region.size - RAM_BASE);
}

/** Guest RAM each device of the `serve` program lays its rings and buffers out in. */
const SERVE_WINDOW = 1 << 20;

/**
 * The `serve` program's allocator for the device in `slot`: a window of its own, the same at each
 * `init`. Its rings then replace its own old ones, never those of another device that is still
 * running (whose iothread would find its avail.idx jump and stop the device).
 */
function serveAllocator(ctx: VcpuContext, slot: number): GuestAllocator {
  const base = RAM_BASE + slot * SERVE_WINDOW;
  if (base + SERVE_WINDOW > ctx.mem.regions[0]!.size) throw new Error(`No RAM for slot ${slot}`);
  return new GuestAllocator(base, SERVE_WINDOW);
}

function find(functions: PciVirtio[], slot: number): PciVirtio {
  const f = functions.find((x) => x.slot === slot);
  if (f === undefined) throw new Error(`No virtio function in slot ${slot}`);
  return f;
}

function echoProgram(ctx: VcpuContext, p: Extract<GuestPayload, { kind: "echo" }>): EchoReport {
  const alloc = allocatorFor(ctx);
  const functions = probePci(ctx.bus);
  const devs = new Map<number, GuestVirtio>();
  for (const [i, d] of p.devices.entries()) {
    const dev = new GuestVirtio(ctx.bus, ctx.mem, alloc, find(functions, d.slot));
    dev.init({
      queues: d.queues,
      queueSize: d.queueSize,
      packed: d.packed,
      vectorBase: 0x40 + 16 * i,
    });
    devs.set(d.slot, dev);
  }
  const results: EchoResult[] = [];
  for (const run of p.runs) {
    const dev = devs.get(run.slot)!;
    results.push(runEcho(dev, ctx.interrupts, alloc, ctx.mem, { ...run, timeoutMs: p.timeoutMs }));
    ctx.bus.reportQueueStats(run.slot, run.queue, dev.queues[run.queue]!.stats);
  }
  return { functions, results };
}

/** Waits until `vector` is taken; other vectors are taken and dropped. */
function waitForVector(ctx: VcpuContext, vector: number, timeoutMs: number): boolean {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    for (let v = ctx.interrupts.takeNext(); v !== null; v = ctx.interrupts.takeNext()) {
      if (v === vector) return true;
    }
    const left = deadline - performance.now();
    if (left <= 0 || !ctx.interrupts.waitForInterrupt(left)) return false;
  }
}

function hostileProgram(
  ctx: VcpuContext,
  p: Extract<GuestPayload, { kind: "hostile" }>,
): HostileReport {
  const { bus, mem } = ctx;
  const alloc = allocatorFor(ctx);
  const functions = probePci(bus);
  const setup = { queues: 1, queueSize: 64, packed: false };
  const victim = new GuestVirtio(bus, mem, alloc, find(functions, p.victim));
  const bystander = new GuestVirtio(bus, mem, alloc, find(functions, p.bystander));
  victim.init({ ...setup, vectorBase: 0x40 });
  bystander.init({ ...setup, vectorBase: 0x50 });
  const echo = (dev: GuestVirtio, requests: number) =>
    runEcho(dev, ctx.interrupts, alloc, mem, {
      queue: 0,
      requests,
      depth: 8,
      bytes: 64,
      timeoutMs: p.timeoutMs,
    });
  echo(victim, 100);
  echo(bystander, 100);

  // Offer one more request on the victim, then point its head descriptor's next past the table.
  const generationBefore = bus.mmioRead(victim.info.common + 21, 1);
  const queue = victim.queues[0]!;
  const layout = victim.layouts[0]!;
  const buf = alloc.alloc(128);
  queue.add([{ addr: buf, length: 64 }], [{ addr: buf + 64, length: 64 }], 0);
  const published = mem.u16(layout.driver + 2); // the new entry sits at the published index
  const head = mem.u16(layout.driver + 4 + 2 * (published % layout.size));
  const desc = layout.desc + 16 * head;
  mem.setU16(desc + 12, mem.u16(desc + 12) | 1); // VIRTQ_DESC_F_NEXT
  mem.setU16(desc + 14, layout.size + 3);
  queue.kick();
  victim.notify(0); // whatever the suppression says

  const configInterrupt = waitForVector(ctx, victim.configVector, p.timeoutMs);
  const statusAfterFault = victim.status;
  const generationAfter = bus.mmioRead(victim.info.common + 21, 1);

  const bystanderAfterFault = echo(bystander, 200);

  victim.init({ ...setup, vectorBase: 0x40 });
  const victimAfterReset = echo(victim, 100);
  return {
    statusAfterFault,
    generationBefore,
    generationAfter,
    configInterrupt,
    bystanderAfterFault,
    victimAfterReset,
    statusAfterReset: victim.status,
  };
}

function waitNeedsReset(
  ctx: VcpuContext,
  p: Extract<GuestPayload, { kind: "wait-needs-reset" }>,
): { status: number; configInterrupt: boolean } {
  const alloc = allocatorFor(ctx);
  const dev = new GuestVirtio(ctx.bus, ctx.mem, alloc, find(probePci(ctx.bus), p.slot));
  dev.init({ queues: 1, queueSize: 16, packed: false, vectorBase: 0x40 });
  const buf = alloc.alloc(128);
  dev.queues[0]!.add([{ addr: buf, length: 64 }], [{ addr: buf + 64, length: 64 }], 0);
  dev.queues[0]!.kick();
  dev.notify(0);
  const configInterrupt = waitForVector(ctx, dev.configVector, p.timeoutMs);
  const status = dev.status;
  if ((status & VIRTIO_CONFIG_S_NEEDS_RESET) === 0) {
    // Keep the vCPU busy so that a test expecting the machine to kill it can see that happen.
    waitForVector(ctx, -1, p.timeoutMs);
  }
  return { status, configInterrupt };
}

/** Largest request of the `serve` program. */
const SERVE_MAX_BYTES = 64 * 1024;

let served:
  | { dev: GuestVirtio; alloc: GuestAllocator; buffers: { in: number; out: number } }
  | null = null;

runVcpu(self, {
  main(ctx) {
    const p = ctx.payload as GuestPayload;
    switch (p.kind) {
      case "echo":
        return echoProgram(ctx, p);
      case "hostile":
        return hostileProgram(ctx, p);
      case "wait-needs-reset":
        return waitNeedsReset(ctx, p);
      case "serve":
        return new Promise(() => {}); // requests only; never "done"
    }
  },
  onRequest(ctx, body) {
    const r = body as ServeRequest;
    if (r.op === "init") {
      const alloc = serveAllocator(ctx, r.slot);
      const dev = new GuestVirtio(ctx.bus, ctx.mem, alloc, find(probePci(ctx.bus), r.slot));
      dev.init({ queues: 1, queueSize: r.queueSize, packed: r.packed, vectorBase: 0x40 });
      const buffers = { in: alloc.alloc(SERVE_MAX_BYTES), out: alloc.alloc(SERVE_MAX_BYTES) };
      served = { dev, alloc, buffers };
      return null;
    }
    if (served === null) throw new Error("init first");
    if (r.bytes > SERVE_MAX_BYTES) throw new Error(`At most ${SERVE_MAX_BYTES} bytes`);
    const started = performance.now();
    const result = runEcho(served.dev, ctx.interrupts, served.alloc, ctx.mem, {
      queue: 0,
      requests: r.rounds,
      depth: 1,
      bytes: r.bytes,
      timeoutMs: 5000,
      buffers: served.buffers,
    });
    return { ...result, ms: performance.now() - started };
  },
});
