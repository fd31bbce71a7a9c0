/// <reference lib="deno.worker" />
/**
 * The vCPU Worker entry of the simulated guest: `machine.startVcpu(new URL("./vcpu.ts", …),
 * payload)` boots it, and it runs {@linkcode runGuest} against the machine:
 *
 * - bus: the exit bus (config and MMIO accesses exit to the VMM; doorbells in the ioeventfd table
 *   ring the device's words directly, without an exit);
 * - memory: guest RAM over the machine's `SharedArrayBuffer`;
 * - interrupts: the vCPU's shared interrupt words, which the iothreads' MSI-X messages set;
 * - idle: {@linkcode haltIdle}, a bounded `Atomics.wait` until an interrupt is pending;
 * - exit counters and driver reports: the exit channel's, so the report shows exits per request
 *   and `machine.stats()` shows the driver's kicks and suppressed kicks per queue.
 *
 * Payload ({@linkcode VcpuPayload}): a {@linkcode GuestRequest} — one run inline
 * (`{ args: ["--rw=randread", …], device: "d0" }` or `{ jobFile }`), or several devices at once
 * (`{ runs: [{ device: "d0", args }, { device: "s0", lun: { target: 0, lun: 0 }, args }] }`) — runs
 * once and ends the vCPU with a {@linkcode GuestRunResult}; `{ serve: true }` keeps the vCPU up to
 * answer `vcpu.request(guestRequest)` calls, one request each.
 *
 * @module
 */

import { runVcpu, type VcpuContext } from "../virtio/exits.ts";
import { type GuestEnv, type GuestRequest, runGuest } from "./guest.ts";
import { haltIdle } from "./virtio_driver.ts";

export type { GuestRequest, GuestRunResult } from "./guest.ts";

/** What `startVcpu` passes: one run, or serve requests. */
export type VcpuPayload = GuestRequest | { readonly serve: true };

/** The guest environment of a vCPU Worker, from what `runVcpu` built at boot. */
export function guestEnv(ctx: VcpuContext): GuestEnv {
  return {
    bus: ctx.bus,
    mem: ctx.mem,
    vcpu: ctx.interrupts,
    idle: haltIdle(ctx.interrupts),
    devices: ctx.devices,
    exitCounters: () => ctx.bus.channel.counters,
    reportQueueStats: (slot, queue, stats) => ctx.bus.reportQueueStats(slot, queue, stats),
  };
}

function isServe(payload: unknown): boolean {
  return typeof payload === "object" && payload !== null && "serve" in payload &&
    payload.serve === true;
}

// Only as a Worker's entry module: importing this file elsewhere (for its types) starts nothing.
if (typeof WorkerGlobalScope !== "undefined" && self instanceof WorkerGlobalScope) {
  runVcpu(self, {
    main(ctx) {
      // Requests only: main never settles, so the VMM's `result` stays pending until shutdown.
      if (isServe(ctx.payload)) return new Promise(() => {});
      return runGuest(guestEnv(ctx), ctx.payload as GuestRequest);
    },
    onRequest(ctx, body) {
      return runGuest(guestEnv(ctx), body as GuestRequest);
    },
  });
}
