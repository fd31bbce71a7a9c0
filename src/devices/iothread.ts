/// <reference lib="deno.worker" />
/**
 * A device's iothread: the Worker entry that owns the device's back-end and drives and serves its
 * queues.
 *
 * Start-up: `init` (open the drives, import the type's back-end module, `createBackend`) → `ready`
 * with what the model needs; then `attach` (the function's shared interrupt, doorbell, control and
 * counter words) → `attached`, and the loop runs:
 *
 * ```
 * seen = doorbells.summary                  // before draining: a kick after this wakes the wait
 * if control word moved: handle control messages up to it (activate, reset, pause, resume, shutdown)
 * else if active: for each queue whose doorbell moved: epoch check → processQueue → counters
 * seen = doorbells.waitAny(seen, 2 ms), then idle in Atomics.waitAsync (event loop free)
 * ```
 *
 * Ring faults have one way out: every ring access of the loop (the drains, with the back-end's
 * `processQueue`, and the polling) runs inside one `try` of the run loop (`#contain`), activation
 * inside its own, and the back-end reports faults outside a kick through `hooks.needsReset`. All
 * three end in `#fault`: a `VirtqueueError` or `GuestMemoryError` (`ringFault`), or any other
 * back-end failure, becomes DEVICE_NEEDS_RESET with a config interrupt
 * (`InterruptState.signalNeedsReset`) in the epoch the queues were activated in; the device then
 * touches none of its queues until a reset, and the iothread, the machine and the other devices
 * carry on. A guest cannot end the iothread. Before touching any queue the iothread
 * compares its activation epoch with `InterruptState.epoch`: a reset that overtook it (the VMM
 * bumps the epoch before posting `reset`) makes it drop its queues without writing guest memory.
 *
 * @module
 */

import { setImmediate } from "node:timers";
import type { BlockNode } from "../block/node.ts";
import { setUringIdlePoll } from "../host/uring_queue.ts";
import { isPackedRing, queueFeaturesOf } from "../virtio/device.ts";
import { Doorbells } from "../virtio/doorbell.ts";
import { InterruptState, VcpuInterrupts } from "../virtio/interrupts.ts";
import { GuestMemory } from "../virtio/memory.ts";
import { PackedDeviceQueue } from "../virtio/packed_queue.ts";
import { type DeviceQueue, ringFault } from "../virtio/queue.ts";
import { SplitDeviceQueue } from "../virtio/split_queue.ts";
import type { DeviceBackend } from "./backend.ts";
import type { CreateBackend, DeviceSpec } from "./device_type.ts";
import { driveInfo, openDrive } from "./drive.ts";
import {
  type ControlMessage,
  ControlWord,
  DeviceCounters,
  type DeviceQueueCounters,
  type IothreadAttach,
  type IothreadInit,
  type IothreadReply,
  type IothreadRequest,
} from "./iothread_protocol.ts";

/**
 * How long the iothread sleeps in a blocking `Atomics.wait` for the next kick (a few µs to wake)
 * before it goes idle in the event loop with `Atomics.waitAsync` (tens of µs to wake, but timers
 * and I/O callbacks of the back-end run).
 */
const BUSY_WAIT_MS = 2;
/** Longest idle sleep before looking around again. */
const IDLE_WAIT_MS = 1000;
/** Under constant load, let the event loop run at least this often. */
const YIELD_EVERY_MS = 20;
/**
 * How many times an iothread looks at its rings after a drain before it sleeps on the doorbells
 * (about 100 µs; counted, not timed, since reading the clock costs more than a look). As QEMU's
 * iothread polling: with kicks suppressed meanwhile, a driver that submits again soon needs no
 * kick, and the device no wake-up.
 */
const POLL_ROUNDS = 4096;
/**
 * With requests in flight, how long the iothread watches its doorbells and the completion rings
 * (without a system call) before it blocks in the kernel until a completion: QEMU's poll-max-ns
 * is 32 µs; a guest refilling its queue answers an interrupt within about this.
 */
const IO_POLL_MS = 0.05;
/** A control message announced in the control word must arrive within this. */
const CONTROL_ARRIVAL_MS = 10_000;

function post(reply: IothreadReply): void {
  self.postMessage(reply);
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** One queue the iothread serves. */
interface Served {
  readonly index: number;
  readonly queue: DeviceQueue;
  /** The doorbell value last drained for. */
  seen: number;
  /** Drain even if the doorbell did not move (after activation or resume). */
  pending: boolean;
  drains: number;
  /** The back-end's interrupt callback for this queue. */
  interrupt: () => void;
}

class Iothread {
  readonly #spec: DeviceSpec;
  readonly #mem: GuestMemory;
  readonly #backend: DeviceBackend;
  readonly #drives: readonly BlockNode[];
  #irq: InterruptState | null = null;
  #doorbells: Doorbells | null = null;
  #control: ControlWord | null = null;
  #counters: DeviceCounters | null = null;

  readonly #inbox: ControlMessage[] = [];
  #waiter: ((msg: ControlMessage) => void) | null = null;
  #handled = 0;

  #served: Served[] = [];
  /** The served queues the back-end lets the iothread poll. */
  #polled: Served[] = [];
  /** The queue a drain is in (for a failure that does not name one); -1 outside drains. */
  #draining = -1;
  readonly #scratch: DeviceQueueCounters = {
    chains: 0,
    interrupts: 0,
    suppressedInterrupts: 0,
    largestBatch: 0,
    drains: 0,
  };
  /** Counters of queues from earlier activations, by queue index. */
  #base: DeviceQueueCounters[] = [];
  #active = false;
  #backendActive = false;
  #broken = false;
  #paused = false;
  #epoch = -1;
  #stopped = false;
  #closed = false;

  constructor(spec: DeviceSpec, mem: GuestMemory, backend: DeviceBackend, drives: BlockNode[]) {
    this.#spec = spec;
    this.#mem = mem;
    this.#backend = backend;
    this.#drives = drives;
  }

  attach(msg: IothreadAttach): void {
    const vcpu = new VcpuInterrupts(msg.vcpu);
    this.#irq = InterruptState.attach(vcpu, msg.interrupts);
    this.#doorbells = Doorbells.attach(msg.doorbells);
    this.#control = new ControlWord(msg.control);
    this.#counters = new DeviceCounters(this.#doorbells.numQueues, msg.counters);
    for (let q = 0; q < this.#doorbells.numQueues; q++) {
      this.#base.push({
        chains: 0,
        interrupts: 0,
        suppressedInterrupts: 0,
        largestBatch: 0,
        drains: 0,
      });
    }
  }

  /** A control message arrived (it may be handled only once announced, or earlier). */
  deliver(msg: ControlMessage): void {
    const waiter = this.#waiter;
    if (waiter !== null) {
      this.#waiter = null;
      waiter(msg);
    } else {
      this.#inbox.push(msg);
    }
  }

  /** Before `attach`, only a shutdown can come: close and acknowledge it. */
  async shutdownUnattached(seq: number): Promise<void> {
    const error = await this.#close();
    post({ kind: "ack", seq, ...(error === undefined ? {} : { error }) });
  }

  async run(): Promise<void> {
    const doorbells = this.#doorbells!;
    const control = this.#control!;
    const counters = this.#counters!;
    // The summary is word 0 of the doorbell buffer (Doorbells' documented layout).
    const summary = new Int32Array(doorbells.buffer, 0, 1);
    let lastYield = performance.now();
    let seen = doorbells.summary;
    setUringIdlePoll((ready) => {
      // Counted rounds between clock reads: a look costs less than reading the clock.
      const end = performance.now() + IO_POLL_MS;
      for (;;) {
        for (let i = 0; i < 64; i++) {
          if (doorbells.summary !== seen || control.posted > this.#handled || ready()) return true;
        }
        if (performance.now() >= end) return false;
      }
    });
    while (!this.#stopped) {
      seen = doorbells.summary;
      if (control.posted > this.#handled) {
        await this.#handleControl(control.posted);
        continue;
      }
      if (this.#active && !this.#paused && !this.#broken) {
        // The one place the loop touches rings (drains with the back-end's processQueue, then
        // polling), so the one place it catches: see #contain. Inline, not a helper, so that a
        // turn awaits one promise.
        try {
          await this.#drain();
          if ((this.#backend.inflight ?? 0) > 0) {
            // Requests in flight: their completions come through the event loop (an io_uring
            // reaped from a macrotask), so the loop turns instead of sleeping on the doorbells.
            await new Promise((resolve) => setImmediate(resolve));
            lastYield = performance.now();
            if (doorbells.summary !== seen) counters.bump("wakeups");
            continue;
          }
          if (this.#spec.poll !== false && !this.#broken && this.#poll()) continue;
        } catch (error) {
          this.#contain(error);
        }
      }
      if (performance.now() - lastYield > YIELD_EVERY_MS) {
        // A back-end's timers and callbacks must not starve while kicks keep coming; the next
        // turn drains any queue whose doorbell moved meanwhile.
        await new Promise((resolve) => setTimeout(resolve, 0));
        lastYield = performance.now();
        continue;
      }
      let now = doorbells.waitAny(seen, BUSY_WAIT_MS);
      if (now === seen) {
        const idle = Atomics.waitAsync(summary, 0, seen | 0, IDLE_WAIT_MS);
        if (idle.async) await idle.value;
        lastYield = performance.now();
        now = doorbells.summary;
      }
      if (now !== seen) counters.bump("wakeups");
    }
    setUringIdlePoll(null);
  }

  async #handleControl(upTo: number): Promise<void> {
    while (this.#handled < upTo && !this.#stopped) {
      const msg = await this.#nextControl();
      this.#handled = msg.seq;
      let error: string | undefined;
      try {
        error = await this.#apply(msg);
      } catch (e) {
        error = describe(e);
      }
      post({ kind: "ack", seq: msg.seq, ...(error === undefined ? {} : { error }) });
    }
  }

  #nextControl(): Promise<ControlMessage> {
    const queued = this.#inbox.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiter = null;
        reject(new Error(`Control message ${this.#handled + 1} never arrived`));
      }, CONTROL_ARRIVAL_MS);
      this.#waiter = (msg) => {
        clearTimeout(timer);
        resolve(msg);
      };
    });
  }

  /** Carries out a control message; returns an error message for the VMM, if any. */
  async #apply(msg: ControlMessage): Promise<string | undefined> {
    switch (msg.kind) {
      case "activate":
        return this.#activate(msg.features, msg.queues, msg.epoch);
      case "reset":
        this.#deactivate();
        this.#broken = false;
        this.#counters!.bump("resets");
        return undefined;
      case "pause":
        this.#paused = true;
        // Paused means quiet: what was started completes first (QEMU drains on pause).
        await this.#backend.drained?.();
        for (const s of this.#served) this.#publish(s);
        return undefined;
      case "resume":
        this.#paused = false;
        for (const s of this.#served) s.pending = true;
        return undefined;
      case "sync":
        // Control messages are handled between drains: every completion so far is counted.
        for (const s of this.#served) this.#publish(s);
        return undefined;
      case "shutdown":
        this.#stopped = true;
        return await this.#close();
    }
  }

  #activate(
    features: bigint,
    queues: readonly { index: number; layout: DeviceQueue["layout"] }[],
    epoch: number,
  ): string | undefined {
    const irq = this.#irq!;
    // A reset since DRIVER_OK: the driver is starting over; this activation is stale.
    if (irq.epoch !== epoch) return undefined;
    this.#deactivate();
    this.#broken = false;
    const packed = isPackedRing(features);
    const qf = queueFeaturesOf(features);
    const byIndex: Array<DeviceQueue | undefined> = new Array(this.#doorbells!.numQueues);
    const served: Served[] = [];
    try {
      for (const q of queues) {
        // The transport only enables queues that exist; a bad index is a VMM bug, not a guest one.
        if (q.index < 0 || q.index >= byIndex.length) {
          throw new RangeError(`Queue ${q.index} does not exist`);
        }
        const queue = packed
          ? new PackedDeviceQueue(this.#mem, q.index, q.layout, qf)
          : new SplitDeviceQueue(this.#mem, q.index, q.layout, qf);
        byIndex[q.index] = queue;
        const index = q.index;
        const s: Served = {
          index,
          queue,
          seen: this.#doorbells!.value(index),
          pending: true, // kicks that came before activation are in the word already: drain once
          drains: 0,
          interrupt: () => {},
        };
        // Counters first, so that a guest woken by the interrupt finds them up to date; and no
        // interrupt into a new epoch: the driver would take it for its new rings.
        s.interrupt = () => {
          this.#publish(s);
          if (irq.epoch === epoch) irq.notifyQueue(index);
        };
        served.push(s);
      }
      this.#backend.activate(this.#mem, features, byIndex);
      // Events the back-end raises on its own (hotplug, capacity change) interrupt through the
      // same path as completions, and only within this epoch.
      this.#backend.hooks = {
        interrupt: (queue) => served.find((s) => s.index === queue)?.interrupt(),
        needsReset: (error) => this.#fault(epoch, -1, error),
        stop: (reason) => post({ kind: "stopped", reason }),
      };
    } catch (error) {
      this.#fault(epoch, -1, error);
      return describe(error);
    }
    this.#served = served;
    this.#polled = served.filter((s) => this.#backend.pollable?.(s.index) ?? true);
    this.#epoch = epoch;
    this.#active = true;
    this.#backendActive = true;
    this.#counters!.bump("activations");
    return undefined;
  }

  /** Drops the queues (keeping their counters) and resets the back-end. Writes no guest memory. */
  #deactivate(): void {
    for (const s of this.#served) {
      const c = this.#queueCounters(s);
      this.#base[s.index] = c;
    }
    this.#served = [];
    this.#polled = [];
    this.#active = false;
    this.#backend.hooks = null;
    if (this.#backendActive) {
      this.#backendActive = false;
      this.#backend.reset();
    }
  }

  /**
   * What the run loop does with anything a drain or the polling threw (a guest's broken ring, a
   * back-end failure): counters published, DEVICE_NEEDS_RESET for this device (`#fault`), and the
   * loop goes on serving the control word. The device touches its queues again after a reset.
   */
  #contain(error: unknown): void {
    const queue = this.#draining;
    this.#draining = -1;
    for (const s of this.#served) this.#publish(s);
    this.#fault(this.#epoch, queue, error);
  }

  /**
   * Polls the rings the back-end lets it poll ({@linkcode DeviceBackend.pollable})
   * {@linkcode POLL_ROUNDS} times with kicks suppressed; true when a queue has work (marked pending
   * for the next drain). Notifications are enabled again before it returns.
   */
  #poll(): boolean {
    const served = this.#polled;
    if (served.length === 0) return false;
    for (const s of served) s.queue.disableNotifications();
    let found = false;
    for (let round = 0; round < POLL_ROUNDS && !found; round++) {
      for (const s of served) {
        if (s.queue.hasAvailable()) {
          s.pending = true;
          found = true;
        }
      }
    }
    for (const s of served) {
      // Enabling re-checks the ring: work that came meanwhile is not lost.
      if (s.queue.enableNotifications()) {
        s.pending = true;
        found = true;
      }
    }
    return found;
  }

  async #drain(): Promise<void> {
    const doorbells = this.#doorbells!;
    const irq = this.#irq!;
    const counters = this.#counters!;
    for (const s of this.#served) {
      if (irq.epoch !== this.#epoch) {
        // Reset overtook us: quiesce now; the reset message follows.
        this.#deactivate();
        return;
      }
      // A fault the back-end reported through its hooks meanwhile stops the device at once.
      if (this.#broken) return;
      const value = doorbells.value(s.index);
      if (value === s.seen && !s.pending) continue;
      s.seen = value;
      s.pending = false;
      s.drains++;
      counters.bump("drains");
      this.#draining = s.index;
      await this.#backend.processQueue(s.index, s.interrupt);
      this.#draining = -1;
      this.#publish(s);
    }
  }

  /** Publishes queue `s`'s cumulative counters (no allocation: a scratch record is reused). */
  #publish(s: Served): void {
    const base = this.#base[s.index]!;
    const st = s.queue.stats;
    const out = this.#scratch;
    out.chains = base.chains + st.chains;
    out.interrupts = base.interrupts + st.interrupts;
    out.suppressedInterrupts = base.suppressedInterrupts + st.suppressedInterrupts;
    out.largestBatch = Math.max(base.largestBatch, st.largestBatch);
    out.drains = base.drains + s.drains;
    this.#counters!.setQueue(s.index, out);
  }

  #queueCounters(s: Served): DeviceQueueCounters {
    const base = this.#base[s.index]!;
    const st = s.queue.stats;
    return {
      chains: base.chains + st.chains,
      interrupts: base.interrupts + st.interrupts,
      suppressedInterrupts: base.suppressedInterrupts + st.suppressedInterrupts,
      largestBatch: Math.max(base.largestBatch, st.largestBatch),
      drains: base.drains + s.drains,
    };
  }

  /**
   * QEMU's `virtio_error`: DEVICE_NEEDS_RESET and a config interrupt (in `epoch` only), and the
   * device stops until reset. A ring fault (`VirtqueueError`, or `GuestMemoryError` as
   * `outside-ram`) names its queue; a back-end failure that is not one is treated the same way,
   * reported as `backend` on `queue`: the guest must not be able to take the iothread down.
   */
  #fault(epoch: number, queue: number, error: unknown): void {
    this.#broken = true;
    const ring = ringFault(error, queue);
    // Counted and reported before the guest can see NEEDS_RESET, so statistics never lag it.
    this.#counters!.bump("faults");
    post({
      kind: "fault",
      queue: ring?.queue ?? queue,
      fault: ring?.fault ?? "backend",
      message: describe(ring ?? error),
    });
    this.#irq!.signalNeedsReset(epoch);
  }

  /** Closes the back-end, then flushes and closes the drives. Returns the first error, if any. */
  async #close(): Promise<string | undefined> {
    if (this.#closed) return undefined;
    this.#closed = true;
    this.#served = [];
    this.#polled = [];
    this.#active = false;
    let first: string | undefined;
    try {
      await this.#backend.close();
    } catch (error) {
      first = `Device ${this.#spec.id}: closing the back-end failed: ${describe(error)}`;
    }
    for (const [i, node] of this.#drives.entries()) {
      try {
        if (!node.readOnly) await node.flush();
        await node.close();
      } catch (error) {
        first ??= `Device ${this.#spec.id}: closing drive ${i} failed: ${describe(error)}`;
      }
    }
    return first;
  }
}

/** Opens the drives and builds the back-end; closes what it opened when that fails. */
async function boot(init: IothreadInit): Promise<Iothread> {
  const spec = init.spec;
  const mem = new GuestMemory(init.ram.regions, init.ram.buffer);
  const nodes: BlockNode[] = [];
  try {
    for (const [i, drive] of spec.drives.entries()) {
      try {
        nodes.push(await openDrive(drive));
      } catch (error) {
        throw new Error(`Drive ${i} (${drive.file}): ${describe(error)}`, { cause: error });
      }
    }
    const module = await import(init.backendModule) as { createBackend?: unknown };
    if (typeof module.createBackend !== "function") {
      throw new Error(`${init.backendModule} does not export createBackend`);
    }
    const ready = await (module.createBackend as CreateBackend)({ spec, drives: nodes });
    post({
      kind: "ready",
      info: {
        drives: spec.drives.map((d, i) => driveInfo(d, nodes[i]!)),
        backend: ready.info ?? null,
      },
    });
    return new Iothread(spec, mem, ready.backend, nodes);
  } catch (error) {
    for (const node of nodes) await node.close().catch(() => {});
    throw error;
  }
}

function fail(error: unknown): void {
  post({
    kind: "failed",
    message: describe(error),
    ...(error instanceof Error && error.stack !== undefined ? { stack: error.stack } : {}),
  });
}

let booting: Promise<Iothread> | null = null;
let attached = false;

self.onmessage = (event: MessageEvent<IothreadRequest>) => {
  const msg = event.data;
  if (msg.kind === "init") {
    booting = boot(msg);
    booting.catch(fail);
    return;
  }
  if (booting === null) {
    fail(new Error(`Iothread got ${msg.kind} before init`));
    return;
  }
  // Chained on the boot promise: handlers run in arrival order.
  if (msg.kind === "attach") {
    attached = true;
    booting.then((thread) => {
      thread.attach(msg);
      post({ kind: "attached" });
      return thread.run();
    }).catch(fail);
  } else if (msg.kind === "shutdown" && !attached) {
    // Before attach nobody announces it in a control word: close straight away.
    booting.then((thread) => thread.shutdownUnattached(msg.seq)).catch(fail);
  } else {
    booting.then((thread) => thread.deliver(msg)).catch(fail);
  }
};

self.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  fail(event.reason);
});
