/**
 * virtio-scsi's iothread half ({@linkcode VirtioScsiBackend}): the device's life (activation,
 * reset, close), its units (cold plug, hotplug, unplug, lent drives) and the queue loop that hands
 * each popped request to its queue's handler — `virtio_scsi_request.ts` (commands, queues 2..),
 * `virtio_scsi_control.ts` (task management, queue 0), `virtio_scsi_events.ts` (events, queue 1) —
 * after QEMU's `hw/scsi/virtio-scsi.c`.
 *
 * Events (hotplug, unplug, capacity change) happen outside any kick, so the back-end raises the
 * event queue's interrupt through {@linkcode VirtioScsiHooks.interrupt}, and reports a malformed
 * event buffer found there through {@linkcode VirtioScsiHooks.needsReset}. Without hooks the event
 * is still delivered into the buffer, but no interrupt announces it.
 *
 * Requests are processed one at a time per back-end, in ring order, and complete before the next
 * is popped; {@linkcode VirtioScsiBackend.processQueue} calls are serialized with each other and
 * with {@linkcode VirtioScsiBackend.unplug}. So a task management function always finds no
 * command in flight: the "affected commands" completed before it was even popped, and ABORT TASK
 * and friends answer FUNCTION COMPLETE.
 *
 * @module
 */

import type { BlockNode } from "../block/node.ts";
import { ScsiBus } from "../scsi/bus.ts";
import { ScsiDisk, type ScsiDiskOptions } from "../scsi/disk.ts";
import type { SenseCode } from "../scsi/sense.ts";
import { hasFeature } from "../virtio/features.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import type { DescriptorChain, DeviceQueue } from "../virtio/queue.ts";
import {
  VIRTIO_SCSI_EVT_RESET_REMOVED,
  VIRTIO_SCSI_EVT_RESET_RESCAN,
  VIRTIO_SCSI_F_CHANGE,
  VIRTIO_SCSI_F_HOTPLUG,
  VIRTIO_SCSI_T_NO_EVENT,
  VIRTIO_SCSI_T_PARAM_CHANGE,
  VIRTIO_SCSI_T_TRANSPORT_RESET,
  VIRTIO_SCSI_VQ_CONTROL,
  VIRTIO_SCSI_VQ_EVENT,
} from "../virtio/virtio_scsi_constants.ts";
import type { DeviceBackend } from "./backend.ts";
import { VirtioScsiControl } from "./virtio_scsi_control.ts";
import { VirtioScsiEvents } from "./virtio_scsi_events.ts";
import type { VirtioScsiStats } from "./virtio_scsi_framing.ts";
import { HELD, type HeldCommand, VirtioScsiCommands } from "./virtio_scsi_request.ts";
import { stopReason } from "./error_policy.ts";
import { VirtioScsiSharedConfig } from "./virtio_scsi_shared.ts";

/** Microtask turns a drain waits for its requests before publishing (see virtio-blk's). */
const SETTLE_TURNS = 8;

/**
 * How the back-end reaches the machine outside {@linkcode VirtioScsiBackend.processQueue}: events
 * (hotplug, unplug, capacity change) complete buffers on the event queue at any time.
 */
export interface VirtioScsiHooks {
  /** Raise queue `queue`'s used-buffer interrupt (the event queue, 1). */
  interrupt(queue: number): void;
  /** The device must be reset (a malformed event buffer or ring met while delivering an event). */
  needsReset(error: Error): void;
  /**
   * A command failed under a `stop` policy (werror/rerror): the device holds it and takes no more
   * commands until reset; the VMM learns `reason` (QEMU's BLOCK_IO_ERROR and `io-error` state).
   */
  stop?(reason: string): void;
}

/** Options of {@linkcode VirtioScsiBackend}. */
export interface VirtioScsiBackendOptions {
  /** The model's shared config (or its buffer); a standalone back-end gets its own defaults. */
  shared?: VirtioScsiSharedConfig | SharedArrayBuffer;
  /** See {@linkcode VirtioScsiHooks}; may also be set later through `hooks`. */
  hooks?: VirtioScsiHooks;
}

/**
 * The iothread half of virtio-scsi.
 *
 * Queue 0 (control) answers task management functions and asynchronous-notification queries;
 * queue 1 (event) holds the driver's event buffers; queues 2.. carry SCSI commands, which run on
 * the {@linkcode bus}'s logical units with their data moved straight between the block node and
 * guest memory.
 */
export class VirtioScsiBackend implements DeviceBackend {
  /** The logical units, by target and LUN. */
  readonly bus: ScsiBus;
  /** The config words the model shares (sense and CDB sizes, address limits). */
  readonly config: VirtioScsiSharedConfig;
  /** Hooks for work outside `processQueue`; set them before the device is activated. */
  hooks: VirtioScsiHooks | null;
  /** What the device has done: commands, control requests, events. */
  readonly stats: VirtioScsiStats = { commands: 0, controls: 0, events: 0, eventsDropped: 0 };
  readonly #lent = new WeakSet<BlockNode>();

  #queues: ReadonlyArray<DeviceQueue | undefined> = [];
  #features = 0n;
  #activated = false;
  /** Bumped on reset: work that was awaiting when the device reset must not touch the rings. */
  #epoch = 0;
  /** Set when the driver broke the framing rules; cleared by reset. */
  #broken: Error | null = null;
  #busy = false;
  /** Inside processQueue: a broken event ring is thrown from there, not sent to the hooks. */
  #inProcessQueue = false;
  readonly #waiters: Array<() => void> = [];
  /** Command requests in flight, and who waits for none. */
  #inflight = 0;
  #idle: Array<() => void> = [];
  /** Queues being drained, queues with a publish scheduled, each queue's interrupt callback. */
  readonly #draining = new Set<number>();
  readonly #publishing = new Set<number>();
  readonly #interrupts = new Map<number, () => void>();
  /** Why the device stopped (a command held under a `stop` policy), until reset. */
  #stopReason: string | null = null;
  /** Commands held since the stop: never completed. */
  #held: DescriptorChain[] = [];
  /** Drive names by `target:lun`, for the stop reason. */
  readonly #names = new Map<string, string>();
  // The three kinds of queue: requests (2..), control (0), events (1).
  readonly #commands: VirtioScsiCommands;
  readonly #control: VirtioScsiControl;
  readonly #events: VirtioScsiEvents;
  /** The event queue's interrupt outside processQueue: through the hooks. */
  readonly #hookInterrupt = () => this.hooks?.interrupt(VIRTIO_SCSI_VQ_EVENT);

  /** Builds the back-end with an empty bus; add disks to {@linkcode bus}. */
  constructor(options: VirtioScsiBackendOptions = {}) {
    const shared = options.shared;
    this.config = shared instanceof VirtioScsiSharedConfig
      ? shared
      : new VirtioScsiSharedConfig(shared);
    this.bus = new ScsiBus({ maxTarget: this.config.maxTarget, maxLun: this.config.maxLun });
    this.hooks = options.hooks ?? null;
    this.#commands = new VirtioScsiCommands(this.bus, this.config, this.stats);
    this.#commands.onHeld = (held) => this.#stopOn(held);
    this.#control = new VirtioScsiControl(this.bus, this.stats);
    this.#events = new VirtioScsiEvents(this.stats);
  }

  /** Features negotiated at activation (0 before and after a reset). */
  get features(): bigint {
    return this.#features;
  }

  /** The error that stopped the device, until reset. */
  get broken(): Error | null {
    return this.#broken;
  }

  activate(
    _mem: GuestMemory,
    features: bigint,
    queues: ReadonlyArray<DeviceQueue | undefined>,
  ): void {
    // The queues hand out views of guest memory already: the back-end needs no other access.
    this.#features = features;
    this.#queues = queues;
    this.#activated = true;
  }

  /**
   * Device reset: the queues are forgotten, every unit is reset (POWER ON, RESET unit attention)
   * and the EVENTS_MISSED state cleared. Units stay plugged. A request awaiting block I/O when the
   * reset comes completes into nothing.
   */
  reset(): void {
    this.#epoch++;
    this.#stopReason = null;
    this.#held = [];
    this.#queues = [];
    this.#features = 0n;
    this.#activated = false;
    this.#broken = null;
    this.#events.dropped = false;
    this.bus.reset();
  }

  /** Waits for in-flight work, then flushes and closes every plugged unit's node. */
  async close(): Promise<void> {
    await this.#lock();
    try {
      await this.drained();
      this.#epoch++;
      this.#activated = false;
      const units = [...this.bus.all()];
      for (const { target, lun } of units) this.bus.detach(target, lun);
      // Nodes lent by the runtime (the iothread's drives) are its to flush and close.
      for (const { disk } of units) if (!this.#lent.has(disk.node)) await disk.node.close();
    } finally {
      this.#unlock();
    }
  }

  /**
   * Like {@linkcode hotplug}, for a node the caller keeps owning: {@linkcode close} leaves it open
   * (the iothread flushes and closes its drives itself).
   */
  lend(
    target: number,
    lun: number,
    node: BlockNode,
    options?: ScsiDiskOptions,
    driveName?: string,
  ): ScsiDisk {
    const disk = this.hotplug(target, lun, node, options);
    this.#lent.add(node);
    if (driveName !== undefined) this.#names.set(`${target}:${lun}`, driveName);
    return disk;
  }

  /**
   * Why the device stopped taking commands — `io error on drive d1 (write): No space left on
   * device` — after one failed under its drive's `stop` policy (werror/rerror), until reset; else
   * null. The command is held, never completed.
   */
  get stopReason(): string | null {
    return this.#stopReason;
  }

  /** Commands held since the stop. */
  get held(): number {
    return this.#held.length;
  }

  #stopOn(held: HeldCommand): void {
    if (this.#stopReason !== null) return;
    const name = this.#names.get(`${held.target}:${held.lun}`) ?? `${held.target}:${held.lun}`;
    this.#stopReason = stopReason(name, held.write, held.error);
    this.hooks?.stop?.(this.#stopReason);
  }

  /**
   * Plugs `node` in as a disk at `target`:`lun`. Once the driver is running and negotiated
   * VIRTIO_SCSI_F_HOTPLUG, a TRANSPORT_RESET/RESCAN event tells it; the target's other units get
   * REPORTED LUNS DATA HAS CHANGED. Before activation this is a cold plug. The back-end owns the
   * node until {@linkcode unplug} hands it back (or {@linkcode close} closes it).
   *
   * @throws {RangeError} for an address beyond max_target/max_lun or already in use
   */
  hotplug(target: number, lun: number, node: BlockNode, options?: ScsiDiskOptions): ScsiDisk {
    const disk = new ScsiDisk(node, options);
    this.bus.attach(target, lun, disk);
    disk.onChange = (code) => this.#reportChange(target, lun, code);
    if (this.#activated && hasFeature(this.#features, VIRTIO_SCSI_F_HOTPLUG)) {
      this.#pushEvent(VIRTIO_SCSI_T_TRANSPORT_RESET, target, lun, VIRTIO_SCSI_EVT_RESET_RESCAN);
    }
    return disk;
  }

  /**
   * Unplugs the unit at `target`:`lun` once no request is being processed, tells the driver
   * (TRANSPORT_RESET/REMOVED, with HOTPLUG) and hands the node back to the caller.
   *
   * @throws {RangeError} when there is no unit there
   */
  async unplug(target: number, lun: number): Promise<BlockNode> {
    await this.#lock();
    try {
      // Its requests in flight finish first: the node goes back to the caller idle.
      await this.drained();
      const disk = this.bus.detach(target, lun);
      disk.onChange = null;
      if (this.#activated && hasFeature(this.#features, VIRTIO_SCSI_F_HOTPLUG)) {
        this.#pushEvent(VIRTIO_SCSI_T_TRANSPORT_RESET, target, lun, VIRTIO_SCSI_EVT_RESET_REMOVED);
      }
      return disk.node;
    } finally {
      this.#unlock();
    }
  }

  /** The unit at `target`:`lun`. */
  find(target: number, lun: number): ScsiDisk | undefined {
    return this.bus.find(target, lun);
  }

  /** A unit reported a change (capacity): PARAM_CHANGE with the sense code, with CHANGE. */
  #reportChange(target: number, lun: number, code: SenseCode): void {
    if (!this.#activated || !hasFeature(this.#features, VIRTIO_SCSI_F_CHANGE)) return;
    this.#pushEvent(VIRTIO_SCSI_T_PARAM_CHANGE, target, lun, code.asc | (code.ascq << 8));
  }

  // A mutex with a synchronous fast path: processQueue, unplug and close never interleave.
  #lock(): Promise<void> | undefined {
    if (!this.#busy) {
      this.#busy = true;
      return undefined;
    }
    return new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  #unlock(): void {
    const next = this.#waiters.shift();
    if (next !== undefined) next();
    else this.#busy = false;
  }

  /**
   * The event queue is not for polling: the driver's buffers wait there until the device has an
   * event, so polling would find "work" for ever (QEMU does not poll it either). It is drained on
   * kicks.
   */
  pollable(queue: number): boolean {
    return queue !== VIRTIO_SCSI_VQ_EVENT;
  }

  /**
   * Drains queue `queue` after a kick.
   *
   * @throws {VirtqueueError} when the driver broke the ring rules
   * @throws {VirtioScsiError} (a `VirtqueueError`, fault `bad-request`) when a request's headers
   *   do not fit its buffers
   */
  async processQueue(queue: number, interrupt: () => void): Promise<void> {
    const wait = this.#lock();
    if (wait !== undefined) await wait;
    this.#inProcessQueue = true;
    try {
      if (this.#broken !== null || !this.#activated) return;
      const dq = this.#queues[queue];
      if (dq === undefined) return;
      if (queue === VIRTIO_SCSI_VQ_EVENT) {
        // New event buffers: report the drop QEMU-style, with a NO_EVENT flagged EVENTS_MISSED.
        if (this.#events.dropped) this.#pushEvent(VIRTIO_SCSI_T_NO_EVENT, -1, 0, 0, interrupt);
        if (this.#broken !== null) throw this.#broken;
        return;
      }
      await this.#drain(dq, queue, interrupt);
    } finally {
      this.#inProcessQueue = false;
      this.#unlock();
    }
  }

  async #drain(dq: DeviceQueue, queue: number, interrupt: () => void): Promise<void> {
    const epoch = this.#epoch;
    const control = queue === VIRTIO_SCSI_VQ_CONTROL;
    this.#interrupts.set(queue, interrupt);
    // Task management sees no command in flight (QEMU drains before a TMF takes effect).
    if (control && this.#inflight > 0) {
      await this.drained();
      if (epoch !== this.#epoch) return;
    }
    await this.#drainLoop(dq, queue, interrupt, epoch, control);
  }

  async #drainLoop(
    dq: DeviceQueue,
    queue: number,
    interrupt: () => void,
    epoch: number,
    control: boolean,
  ): Promise<void> {
    // Cleared in this function's own finally, with no await after the last publish: a completion
    // that comes once the drain is over must see it gone and publish itself.
    this.#draining.add(queue);
    try {
      do {
        dq.disableNotifications();
        let chain: DescriptorChain | null;
        // A stopped device takes no new command; the control queue still answers.
        while ((control || this.#stopReason === null) && (chain = dq.pop()) !== null) {
          let written: number | Promise<number>;
          try {
            written = control
              ? this.#control.handle(chain, queue)
              : this.#commands.run(chain, queue);
          } catch (e) {
            // A framing error: QEMU drops the element and marks the device broken; what completed
            // before it is still published (unless a reset took the ring away meanwhile).
            if (epoch === this.#epoch) {
              this.#broken = e instanceof Error ? e : new Error(String(e));
              if (dq.publish()) interrupt();
            }
            throw e;
          }
          if (typeof written !== "number") {
            // I/O: in flight while the drain goes on; it completes (and publishes) on its own.
            this.#track(dq, queue, chain, written, epoch);
            continue;
          }
          if (written === HELD) {
            this.#held.push(chain);
            continue;
          }
          dq.push(chain, written);
          // An event delivery inside the command (capacity change) may have broken the device.
          if (this.#broken !== null) {
            if (dq.publish()) interrupt();
            throw this.#broken;
          }
        }
        // Requests that complete at once join this batch; the rest complete on their own.
        for (let turn = 0; turn < SETTLE_TURNS && this.#inflight > 0; turn++) await null;
        // The device was reset meanwhile: the ring is gone.
        if (epoch !== this.#epoch) return;
        if (dq.publish()) interrupt();
      } while (dq.enableNotifications() && (control || this.#stopReason === null));
    } finally {
      this.#draining.delete(queue);
    }
  }

  /** Command requests in flight (over all queues): the runtime keeps its event loop turning. */
  get inflight(): number {
    return this.#inflight;
  }

  /** Resolves when no command request is in flight. */
  drained(): Promise<void> {
    if (this.#inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idle.push(resolve));
  }

  /** A command doing I/O: completed into its ring when done, unless a reset came first. */
  #track(
    dq: DeviceQueue,
    queue: number,
    chain: DescriptorChain,
    written: Promise<number>,
    epoch: number,
  ): void {
    this.#inflight++;
    written.then((n) => {
      if (epoch === this.#epoch && this.#broken === null) {
        if (n === HELD) {
          this.#held.push(chain);
        } else {
          dq.push(chain, n);
          this.#publishLater(dq, queue, epoch);
        }
      }
      this.#ended();
    }, (e) => {
      // Not a guest's doing (units turn I/O errors into sense data): the device needs a reset.
      if (epoch === this.#epoch && this.#broken === null) {
        this.#broken = e instanceof Error ? e : new Error(String(e));
        this.hooks?.needsReset(this.#broken);
      }
      this.#ended();
    });
  }

  #ended(): void {
    if (--this.#inflight === 0 && this.#idle.length > 0) {
      const idle = this.#idle;
      this.#idle = [];
      for (const resolve of idle) resolve();
    }
  }

  /**
   * Outside a drain, completions are published once per batch: a microtask queued behind the
   * other completions of the same reap. Inside one, the drain publishes them.
   */
  #publishLater(dq: DeviceQueue, queue: number, epoch: number): void {
    if (this.#draining.has(queue) || this.#publishing.has(queue)) return;
    this.#publishing.add(queue);
    queueMicrotask(() => {
      this.#publishing.delete(queue);
      if (this.#draining.has(queue) || epoch !== this.#epoch || this.#broken !== null) return;
      if (dq.publish()) this.#interrupts.get(queue)?.();
    });
  }

  /**
   * Delivers an event into the next event buffer, or remembers that one was dropped. Never
   * throws: a broken event ring marks the device broken; inside `processQueue` that call then
   * throws it, elsewhere it goes to `hooks.needsReset`.
   *
   * @param target -1 for an event without a LUN (NO_EVENT)
   */
  #pushEvent(
    event: number,
    target: number,
    lun: number,
    reason: number,
    interrupt?: () => void,
  ): void {
    if (!this.#activated || this.#broken !== null) return;
    try {
      const eq = this.#queues[VIRTIO_SCSI_VQ_EVENT];
      this.#events.deliver(eq, event, target, lun, reason, interrupt ?? this.#hookInterrupt);
    } catch (e) {
      this.#broken = e instanceof Error ? e : new Error(String(e));
      if (!this.#inProcessQueue) this.hooks?.needsReset(this.#broken);
    }
  }
}
