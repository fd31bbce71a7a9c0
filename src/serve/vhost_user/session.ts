/**
 * One vhost-user connection, back-end side: the state a front-end (QEMU) builds with its messages —
 * features, memory table, rings, notification fds — and the device that serves the rings. Pure
 * logic over a {@linkcode SessionPlatform} (what maps memory, watches kick fds, signals call fds,
 * closes fds), so that it runs the same under the real socket loop and in tests.
 *
 * The device is vstor's own: a {@linkcode VirtioDeviceModel} (features, config space) and the
 * {@linkcode DeviceBackend} that serves its queues (VirtioBlkBackend, VirtioScsiBackend), as the
 * simulated machine uses them; here the rings live in the front-end's memory.
 *
 * Rings follow the spec's states: stopped until their kick fd arrives (SET_VRING_KICK), started
 * then, stopped again by GET_VRING_BASE (which answers once the requests of the ring in flight
 * have completed, with the next avail index). With protocol features negotiated a ring also waits
 * for SET_VRING_ENABLE 1 before it is served.
 *
 * @module
 */
import type { DeviceBackend } from "../../devices/backend.ts";
import { isPackedRing, queueFeaturesOf } from "../../virtio/device.ts";
import type { VirtioDeviceModel } from "../../virtio/device.ts";
import { hasFeature, VIRTIO_F_VERSION_1 } from "../../virtio/features.ts";
import { PackedDeviceQueue } from "../../virtio/packed_queue.ts";
import type { GuestMemory } from "../../virtio/memory.ts";
import type { DeviceQueue } from "../../virtio/queue.ts";
import { SplitDeviceQueue } from "../../virtio/split_queue.ts";
import { inflightQueueBytes, InflightRegion } from "./inflight.ts";
import { inflightPackedQueueBytes, PackedInflightRegion } from "./inflight_packed.ts";

/** The largest ring inflight tracking takes (QEMU's queue-size limit). */
const MAX_INFLIGHT_QUEUE = 1024;
import {
  F_PROTOCOL_FEATURES,
  FLAG_NEED_REPLY,
  type Header,
  MAX_MEM_SLOTS,
  type MemoryRegion,
  PF,
  replyConfig,
  replyInflight,
  replyState,
  replyU64,
  REQ,
  type Request,
  VhostUserProtocolError,
} from "./protocol.ts";

/** A memory region with the fd it is mapped from. */
export interface MappedRegion extends MemoryRegion {
  readonly fd: number;
}

/** What the session needs from its surroundings. */
export interface SessionPlatform {
  /**
   * Guest memory over `regions` (each mapped from its fd at its mmap offset), laid out by guest
   * address. Called for every change of the table; the previous memory is released afterwards.
   *
   * @throws when a region cannot be mapped (the message fails)
   */
  mapMemory(regions: readonly MappedRegion[]): GuestMemory;
  /** Releases memory a new table replaced (or the session's end). */
  unmapMemory(mem: GuestMemory): void;
  /** Starts (fd ≥ 0) or stops (-1) watching ring `index`'s kick fd. */
  watchKick(index: number, fd: number): void;
  /** Signals an eventfd (a ring's call fd). */
  signal(fd: number): void;
  /**
   * Ring `index` became served: drain it soon, as after a kick (the driver may have queued work
   * and kicked while it was still disabled — SeaBIOS does, while QEMU is still enabling rings).
   */
  drainSoon(index: number): void;
  /** Closes an fd the session no longer needs. */
  closeFd(fd: number): void;
  /**
   * Shared memory for inflight tracking: a new memfd of `size` bytes (fd absent), or `size` bytes
   * of `fd` from `offset` (the front-end's, after a reconnect). Its `fd` is the session's to close.
   *
   * @throws when it cannot be made or mapped
   */
  inflightMemory(size: number, fd?: number, offset?: number): SharedRegion;
  /** A line for the log. */
  log(line: string): void;
}

/** Shared memory the session maps: its bytes, the fd behind them, and how to unmap them. */
export interface SharedRegion {
  readonly fd: number;
  readonly bytes: Uint8Array;
  release(): void;
}

/** The protocol features this back-end implements. */
export const SUPPORTED_PROTOCOL_FEATURES = (1n << BigInt(PF.MQ)) |
  (1n << BigInt(PF.REPLY_ACK)) |
  (1n << BigInt(PF.CONFIG)) |
  (1n << BigInt(PF.RESET_DEVICE)) |
  (1n << BigInt(PF.CONFIGURE_MEM_SLOTS)) |
  (1n << BigInt(PF.STATUS)) |
  (1n << BigInt(PF.INFLIGHT_SHMFD));

/** One ring's state as the front-end set it. */
interface Ring {
  num: number;
  /** Front-end virtual addresses (SET_VRING_ADDR); -1 until given. */
  desc: number;
  avail: number;
  used: number;
  base: number;
  kick: number;
  call: number;
  err: number;
  enabled: boolean;
  started: boolean;
  queue: SplitDeviceQueue | PackedDeviceQueue | null;
  /**
   * The call fd is from before a reset: QEMU usually sends a new one once the ring runs again
   * (after SET_VRING_ENABLE), and may have stopped reading the old one.
   */
  callStale: boolean;
  /** An interrupt was due while the ring had no (current) call fd: signalled when one comes. */
  missed: boolean;
  /** The ring's inflight tracking, while it runs over the front-end's inflight area. */
  log: InflightRegion | PackedInflightRegion | null;
}

function newRing(): Ring {
  return {
    num: 0,
    desc: -1,
    avail: -1,
    used: -1,
    base: 0,
    kick: -1,
    call: -1,
    err: -1,
    enabled: false,
    started: false,
    queue: null,
    callStale: false,
    missed: false,
    log: null,
  };
}

/** What a handled message sends back: a reply message (and fds with it), or nothing. */
export interface Outcome {
  readonly reply?: Uint8Array;
  /** Fds that go with the reply (the session keeps its own: sending duplicates them). */
  readonly fds?: readonly number[];
}

/**
 * A vhost-user connection's state machine. {@linkcode handle} takes each decoded request (and the
 * header, for NEED_REPLY) and resolves with what to send back; {@linkcode kick} serves a ring whose
 * kick fd became readable; {@linkcode close} releases everything when the connection ends.
 */
export class VhostUserSession {
  readonly #model: VirtioDeviceModel;
  readonly #backend: DeviceBackend;
  readonly #platform: SessionPlatform;
  readonly #rings: Ring[] = [];
  /** Virtio features the device offers here. */
  readonly #offered: bigint;
  #features = 0n;
  #protocolFeatures = 0n;
  #regions: MappedRegion[] = [];
  #mem: GuestMemory | null = null;
  #status = 0;
  /** The inflight tracking memory and its per-queue regions, once the front-end set it up. */
  #inflight: { region: SharedRegion; queues: Uint8Array[]; queueSize: number } | null = null;
  /** The reply fds of the request being handled. */
  #replyFds: number[] | undefined;
  /** The set of started rings the back-end was activated with (to re-activate on change). */
  #active = "";
  #closed = false;

  constructor(model: VirtioDeviceModel, backend: DeviceBackend, platform: SessionPlatform) {
    this.#model = model;
    this.#backend = backend;
    this.#platform = platform;
    this.#offered = model.deviceFeatures | (1n << BigInt(VIRTIO_F_VERSION_1));
    for (let i = 0; i < model.numQueues; i++) this.#rings.push(newRing());
  }

  /** Features negotiated with SET_FEATURES (the guest's and vhost-user's). */
  get features(): bigint {
    return this.#features;
  }

  /** Rings served now (started, and enabled where that applies). */
  get servedRings(): number[] {
    return this.#rings.flatMap((r, i) => this.#served(r) ? [i] : []);
  }

  #has(pf: number): boolean {
    return (this.#protocolFeatures & (1n << BigInt(pf))) !== 0n;
  }

  #ring(request: number, index: number): Ring {
    const ring = this.#rings[index];
    if (ring === undefined) {
      throw new VhostUserProtocolError(
        request,
        `ring ${index} does not exist (the device has ${this.#rings.length})`,
      );
    }
    return ring;
  }

  #served(r: Ring): boolean {
    return r.started && (r.enabled || !hasFeature(this.#features, F_PROTOCOL_FEATURES));
  }

  /**
   * Handles one request. Fds the request carries become the session's (it closes them when they
   * are replaced or at the end), unless it throws: then they are the caller's to close, and the
   * caller drops the connection.
   *
   * @throws {VhostUserProtocolError} for a request that breaks the protocol or this back-end's limits
   */
  async handle(header: Header, req: Request): Promise<Outcome> {
    if (this.#closed) throw new VhostUserProtocolError(req.request, "the session is closed");
    this.#replyFds = undefined;
    const reply = await this.#dispatch(req);
    if (reply !== undefined) {
      return this.#replyFds === undefined ? { reply } : { reply, fds: this.#replyFds };
    }
    // REPLY_ACK: a request that has no reply of its own is acknowledged when asked to be.
    if ((header.flags & FLAG_NEED_REPLY) !== 0 && this.#has(PF.REPLY_ACK)) {
      return { reply: replyU64(req.request, 0) };
    }
    return {};
  }

  async #dispatch(req: Request): Promise<Uint8Array | undefined> {
    switch (req.kind) {
      case "none":
        return this.#plain(req.request);
      case "u64":
        return this.#u64(req.request, req.value);
      case "state":
        return await this.#state(req.request, req.index, req.num);
      case "addr": {
        const ring = this.#ring(req.request, req.index);
        ring.desc = req.descriptor;
        ring.avail = req.available;
        ring.used = req.used;
        return undefined;
      }
      case "vring-fd":
        // A ring that starts changes what the back-end serves: requests in flight finish first.
        if (req.request === REQ.SET_VRING_KICK) await this.#quiesce();
        this.#vringFd(req.request, req.index, req.fd);
        return undefined;
      case "mem-table":
        await this.#quiesce();
        this.#setTable(req.regions.map((r, i) => ({ ...r, fd: req.fds[i]! })));
        return undefined;
      case "mem-reg":
        await this.#quiesce();
        if (req.request === REQ.ADD_MEM_REG) this.#addRegion({ ...req.region, fd: req.fd });
        else this.#removeRegion(req.region, req.fd);
        return undefined;
      case "config":
        return this.#config(req.request, req.offset, req.size, req.flags, req.payload);
      case "inflight":
        return this.#inflightFd(req);
    }
  }

  /** GET_INFLIGHT_FD makes the tracking memory; SET_INFLIGHT_FD takes the front-end's back. */
  #inflightFd(req: Request & { kind: "inflight" }): Uint8Array | undefined {
    const request = req.request;
    if (!this.#has(PF.INFLIGHT_SHMFD)) {
      throw new VhostUserProtocolError(request, "INFLIGHT_SHMFD was not negotiated");
    }
    const { numQueues, queueSize } = req;
    if (numQueues === 0 || numQueues > this.#rings.length) {
      throw new VhostUserProtocolError(
        request,
        `${numQueues} queues (the device has ${this.#rings.length})`,
      );
    }
    if (queueSize === 0 || queueSize > MAX_INFLIGHT_QUEUE) {
      throw new VhostUserProtocolError(request, `queue size ${queueSize}`);
    }
    // Room for either ring layout: QEMU may ask before SET_FEATURES says which one it is.
    const per = Math.max(inflightQueueBytes(queueSize), inflightPackedQueueBytes(queueSize));
    const size = per * numQueues;
    let region: SharedRegion;
    if (request === REQ.GET_INFLIGHT_FD) {
      region = this.#platform.inflightMemory(size);
      this.#replyFds = [region.fd];
    } else {
      if (req.mmapSize < size) {
        throw new VhostUserProtocolError(
          request,
          `an inflight area of ${req.mmapSize} bytes for ${numQueues} queues of ${queueSize}`,
        );
      }
      try {
        region = this.#platform.inflightMemory(size, req.fd, req.mmapOffset);
      } catch (e) {
        throw new VhostUserProtocolError(request, e instanceof Error ? e.message : String(e));
      }
    }
    this.#dropInflight();
    const queues: Uint8Array[] = [];
    for (let i = 0; i < numQueues; i++) queues.push(region.bytes.subarray(i * per, (i + 1) * per));
    this.#inflight = { region, queues, queueSize };
    return request === REQ.GET_INFLIGHT_FD
      ? replyInflight(request, size, 0, numQueues, queueSize)
      : undefined;
  }

  #dropInflight(): void {
    const old = this.#inflight;
    if (old === null) return;
    this.#inflight = null;
    old.region.release();
    this.#platform.closeFd(old.region.fd);
  }

  #plain(request: number): Uint8Array | undefined {
    switch (request) {
      case REQ.GET_FEATURES:
        return replyU64(request, this.#offered | (1n << BigInt(F_PROTOCOL_FEATURES)));
      case REQ.GET_PROTOCOL_FEATURES:
        return replyU64(request, SUPPORTED_PROTOCOL_FEATURES);
      case REQ.GET_QUEUE_NUM:
        return replyU64(request, this.#rings.length);
      case REQ.GET_MAX_MEM_SLOTS:
        return replyU64(request, MAX_MEM_SLOTS);
      case REQ.GET_STATUS:
        return replyU64(request, this.#status);
      case REQ.SET_OWNER:
        return undefined;
      case REQ.RESET_OWNER:
      case REQ.RESET_DEVICE:
        this.#resetDevice();
        return undefined;
    }
    throw new VhostUserProtocolError(request, "not expected without a payload");
  }

  #u64(request: number, value: bigint): Uint8Array | undefined {
    switch (request) {
      case REQ.SET_FEATURES: {
        const allowed = this.#offered | (1n << BigInt(F_PROTOCOL_FEATURES));
        const extra = value & ~allowed;
        if (extra !== 0n) {
          throw new VhostUserProtocolError(request, `features 0x${extra.toString(16)} not offered`);
        }
        this.#features = value;
        // The model sees the guest's features as at FEATURES_OK (cache mode and the like).
        this.#model.validateFeatures(value & ~(1n << BigInt(F_PROTOCOL_FEATURES)));
        return undefined;
      }
      case REQ.SET_PROTOCOL_FEATURES: {
        const extra = value & ~SUPPORTED_PROTOCOL_FEATURES;
        if (extra !== 0n) {
          throw new VhostUserProtocolError(
            request,
            `protocol features 0x${extra.toString(16)} not offered`,
          );
        }
        this.#protocolFeatures = value;
        return undefined;
      }
      case REQ.SET_STATUS: {
        if (value > 0xffn) throw new VhostUserProtocolError(request, `status ${value} past 8 bits`);
        this.#status = Number(value);
        if (this.#status === 0) this.#resetDevice();
        return undefined;
      }
    }
    throw new VhostUserProtocolError(request, "unexpected u64 request");
  }

  async #state(request: number, index: number, num: number): Promise<Uint8Array | undefined> {
    const ring = this.#ring(request, index);
    switch (request) {
      case REQ.SET_VRING_NUM: {
        const max = this.#model.queueMaxSize(index);
        if (num === 0 || num > max || (num & (num - 1)) !== 0) {
          throw new VhostUserProtocolError(
            request,
            `ring ${index} size ${num} (a power of 2 up to ${max})`,
          );
        }
        ring.num = num;
        return undefined;
      }
      case REQ.SET_VRING_BASE:
        // Split rings: the next avail index. Packed: that with its wrap counter in bit 15, and
        // the used index and counter in the high half (QEMU's last_avail_idx encoding).
        if (!isPackedRing(this.#features) && num > 0xffff) {
          throw new VhostUserProtocolError(request, `ring ${index} base ${num} past 16 bits`);
        }
        ring.base = num;
        return undefined;
      case REQ.GET_VRING_BASE: {
        // Stop the ring: what it has in flight completes first, then the next avail index.
        const base = await this.#stopRing(index);
        return replyState(request, index, base);
      }
      case REQ.SET_VRING_ENABLE:
        if (num > 1) throw new VhostUserProtocolError(request, `enable value ${num}`);
        await this.#quiesce();
        ring.enabled = num === 1;
        this.#reactivate();
        return undefined;
      case REQ.VRING_KICK:
        throw new VhostUserProtocolError(request, "in-band notifications were not offered");
    }
    throw new VhostUserProtocolError(request, "unexpected vring state request");
  }

  #vringFd(request: number, index: number, fd: number): void {
    const ring = this.#ring(request, index);
    if (request === REQ.SET_VRING_CALL) {
      if (ring.call >= 0) this.#platform.closeFd(ring.call);
      ring.call = fd;
      ring.callStale = false;
      // QEMU may send the call fd after the ring is served (after a reset, after enabling): an
      // interrupt due meanwhile is delivered now (a spurious one is harmless to a driver).
      if (fd >= 0 && ring.missed) {
        ring.missed = false;
        this.#platform.signal(fd);
      }
      return;
    }
    if (request === REQ.SET_VRING_ERR) {
      if (ring.err >= 0) this.#platform.closeFd(ring.err);
      ring.err = fd;
      return;
    }
    // SET_VRING_KICK: the ring starts (QEMU sends it after NUM, BASE and ADDR). On a failure the
    // new fd stays the caller's to close.
    if (fd < 0) throw new VhostUserProtocolError(request, "polled rings were not offered");
    if (ring.kick >= 0) {
      this.#platform.watchKick(index, -1);
      this.#platform.closeFd(ring.kick);
      ring.kick = -1;
    }
    this.#startRing(index);
    ring.kick = fd;
    this.#platform.watchKick(index, fd);
  }

  #startRing(index: number): void {
    const ring = this.#rings[index]!;
    const request = REQ.SET_VRING_KICK;
    if (this.#mem === null) {
      throw new VhostUserProtocolError(request, `ring ${index} started before SET_MEM_TABLE`);
    }
    if (ring.num === 0 || ring.desc < 0) {
      throw new VhostUserProtocolError(request, `ring ${index} started without a size or address`);
    }
    ring.log = this.#newLog(index, ring.num);
    const queue = this.#makeQueue(index, ring, this.#mem);
    // Inflight tracking: what an earlier back-end left in flight goes first.
    const resubmitted = this.#recoverInflight(index, ring, queue);
    if (resubmitted > 0) {
      this.#platform.log(`ring ${index}: resubmitting ${resubmitted} request(s)`);
    }
    ring.queue = queue;
    ring.started = true;
    this.#reactivate();
    // As libvhost-user after recovery: drain at once (the front-end kicked the old back-end).
    if (ring.log !== null && this.#served(ring)) this.#platform.drainSoon(index);
  }

  /** Ring `index`'s inflight tracking over the front-end's area, for its negotiated layout. */
  #newLog(index: number, num: number): InflightRegion | PackedInflightRegion | null {
    const area = this.#inflight;
    const bytes = area?.queues[index];
    if (area === null || bytes === undefined) return null;
    if (num > area.queueSize) {
      this.#platform.log(
        `ring ${index}: ${num} entries, more than the inflight area's ${area.queueSize}: untracked`,
      );
      return null;
    }
    return isPackedRing(this.#features)
      ? new PackedInflightRegion(bytes, num)
      : new InflightRegion(bytes, num);
  }

  /** Takes the inflight area over for a starting ring: the number of chains resubmitted. */
  #recoverInflight(index: number, ring: Ring, queue: SplitDeviceQueue | PackedDeviceQueue): number {
    const log = ring.log;
    if (log instanceof InflightRegion && queue instanceof SplitDeviceQueue) {
      const recovery = log.recover(queue.usedIndex);
      if (recovery === null) return 0;
      queue.resume(recovery.lastAvail, recovery.resubmit);
      return recovery.resubmit.length;
    }
    if (log instanceof PackedInflightRegion && queue instanceof PackedDeviceQueue) {
      const mem = this.#mem!, desc = queue.layout.desc;
      try {
        // QEMU cannot tell a packed ring's position after a crash: the area can.
        const recovery = log.recover(ring.base, (slot) => mem.u16(desc + 16 * slot + 14));
        if (recovery === null) return 0;
        queue.resume(recovery.state, recovery.resubmit);
        return recovery.resubmit.length;
      } catch (e) {
        this.#platform.log(
          `ring ${index}: the inflight area cannot be right (${
            e instanceof Error ? e.message : String(e)
          }): started afresh, nothing resubmitted`,
        );
      }
    }
    return 0;
  }

  /** The device queue over ring `index`, its addresses translated to guest-physical. */
  #makeQueue(index: number, ring: Ring, mem: GuestMemory): SplitDeviceQueue | PackedDeviceQueue {
    const layout = {
      size: ring.num,
      desc: this.#translate(index, "descriptor table", ring.desc),
      driver: this.#translate(index, "available ring", ring.avail),
      device: this.#translate(index, "used ring", ring.used),
    };
    const packed = isPackedRing(this.#features);
    let queue: SplitDeviceQueue | PackedDeviceQueue;
    try {
      const qf = queueFeaturesOf(this.#features);
      queue = packed
        ? new PackedDeviceQueue(mem, index, layout, qf)
        : new SplitDeviceQueue(mem, index, layout, qf);
      if (queue instanceof PackedDeviceQueue) queue.resume(ring.base);
    } catch (e) {
      throw new VhostUserProtocolError(
        REQ.SET_VRING_KICK,
        `ring ${index}: ${e instanceof Error ? e.message : String(e)}`,
      );
    }
    if (queue instanceof SplitDeviceQueue) {
      queue.resume(ring.base);
      queue.inflightLog = ring.log instanceof InflightRegion ? ring.log : null;
    } else {
      queue.inflightLog = ring.log instanceof PackedInflightRegion ? ring.log : null;
    }
    return queue;
  }

  /** A front-end virtual address as a guest-physical one, through the region that holds it. */
  #translate(index: number, what: string, va: number): number {
    for (const r of this.#regions) {
      if (va >= r.userAddress && va < r.userAddress + r.size) {
        return r.guestAddress + (va - r.userAddress);
      }
    }
    throw new VhostUserProtocolError(
      REQ.SET_VRING_KICK,
      `ring ${index}'s ${what} at 0x${va.toString(16)} is in no memory region`,
    );
  }

  async #stopRing(index: number): Promise<number> {
    const ring = this.#rings[index]!;
    if (ring.kick >= 0) {
      this.#platform.watchKick(index, -1);
      this.#platform.closeFd(ring.kick);
      ring.kick = -1;
    }
    const queue = ring.queue;
    if (!ring.started || queue === null) return ring.base;
    await this.#quiesce();
    const base = queue instanceof SplitDeviceQueue ? queue.lastAvailIndex : queue.ringState;
    ring.started = false;
    ring.queue = null;
    ring.base = base;
    this.#reactivate();
    return base;
  }

  /**
   * Waits until no request is in flight anywhere in the device (and stays so up to the caller's
   * next synchronous step): re-activating the back-end resets its queues, and requests still in
   * flight on them would complete into nothing — a guest (SeaBIOS between two SET_VRING_ENABLEs)
   * would wait for them for ever.
   */
  async #quiesce(): Promise<void> {
    while ((this.#backend.inflight ?? 0) > 0) await this.#backend.drained?.();
  }

  /** Hands the back-end the rings served now, when that set changed. */
  #reactivate(): void {
    const served = this.#rings.map((r) => this.#served(r) ? "1" : "0").join("");
    if (served === this.#active) return;
    const previous = this.#active;
    this.#active = served;
    if (!served.includes("1")) {
      this.#backend.reset();
      return;
    }
    const before = previous;
    const queues = this.#rings.map((r) => this.#served(r) ? r.queue! : undefined);
    this.#backend.activate(this.#mem!, this.#features, queues);
    for (let i = 0; i < served.length; i++) {
      if (served[i] === "1" && before[i] !== "1") this.#platform.drainSoon(i);
    }
  }

  /**
   * Looks at the served rings until `until` (a `performance.now()` time) with their notifications
   * off (the front-end need not kick meanwhile), as QEMU's iothread polling, or until `done` says
   * the thread has other work: the indices of rings with work, which the caller drains.
   * Notifications are on again when it returns (that re-check finds late work too).
   */
  poll(until: number, done?: () => boolean): number[] {
    const served: Array<[number, DeviceQueue]> = [];
    for (const [i, r] of this.#rings.entries()) {
      if (this.#served(r) && r.queue !== null && this.#backend.pollable?.(i) !== false) {
        served.push([i, r.queue]);
      }
    }
    if (served.length === 0) return [];
    for (const [, q] of served) q.disableNotifications();
    const found = new Set<number>();
    for (let round = 0; found.size === 0; round++) {
      for (const [i, q] of served) if (q.hasAvailable()) found.add(i);
      // The clock is read every few rounds (a look at a ring is cheaper than a clock read).
      if ((round & 15) === 15 && (performance.now() >= until || done?.() === true)) break;
    }
    for (const [i, q] of served) if (q.enableNotifications()) found.add(i);
    return [...found];
  }

  /** A kick on ring `index`: serve it (a stopped or disabled ring's kick is consumed and ignored). */
  async kick(index: number): Promise<void> {
    const ring = this.#rings[index];
    if (ring === undefined || !this.#served(ring)) return;
    await this.#backend.processQueue(index, () => this.#signal(ring));
  }

  /**
   * The ring's interrupt: its call fd; remembered until the next SET_VRING_CALL when it has none
   * or only one from before a reset (signalled too, in case the front-end keeps it).
   */
  #signal(ring: Ring): void {
    if (ring.call >= 0) this.#platform.signal(ring.call);
    if (ring.call < 0 || ring.callStale) ring.missed = true;
  }

  #setTable(regions: MappedRegion[]): void {
    this.#replaceRegions(regions, REQ.SET_MEM_TABLE);
  }

  #addRegion(region: MappedRegion): void {
    if (!this.#has(PF.CONFIGURE_MEM_SLOTS)) {
      throw new VhostUserProtocolError(REQ.ADD_MEM_REG, "CONFIGURE_MEM_SLOTS was not negotiated");
    }
    if (this.#regions.length >= MAX_MEM_SLOTS) {
      throw new VhostUserProtocolError(REQ.ADD_MEM_REG, `more than ${MAX_MEM_SLOTS} regions`);
    }
    this.#replaceRegions([...this.#regions, region], REQ.ADD_MEM_REG);
  }

  #removeRegion(region: MemoryRegion, fd: number): void {
    const at = this.#regions.findIndex((r) =>
      r.guestAddress === region.guestAddress && r.size === region.size &&
      r.userAddress === region.userAddress
    );
    if (at < 0) {
      throw new VhostUserProtocolError(
        REQ.REM_MEM_REG,
        `no region at guest address 0x${region.guestAddress.toString(16)}`,
      );
    }
    const removed = this.#regions[at]!;
    this.#replaceRegions(this.#regions.filter((_, i) => i !== at), REQ.REM_MEM_REG);
    this.#platform.closeFd(removed.fd);
    // QEMU may send the region's fd along: the session keeps none of it.
    if (fd >= 0) this.#platform.closeFd(fd);
  }

  /**
   * A new memory layout: checked (no overlap in guest or front-end addresses), mapped, and the
   * started rings rebuilt over it. The old regions' fds are closed, except those kept. On a failure
   * nothing changes.
   */
  #replaceRegions(regions: MappedRegion[], request: number): void {
    let mem: GuestMemory;
    try {
      checkOverlaps(regions, request);
      mem = this.#platform.mapMemory(regions);
    } catch (e) {
      // The request's fds stay the caller's to close.
      if (e instanceof VhostUserProtocolError) throw e;
      throw new VhostUserProtocolError(request, e instanceof Error ? e.message : String(e));
    }
    const old = this.#mem;
    const oldRegions = this.#regions;
    this.#mem = mem;
    this.#regions = regions;
    if (request === REQ.SET_MEM_TABLE) {
      for (const r of oldRegions) this.#platform.closeFd(r.fd);
    }
    // Started rings move to the new memory at the index they reached.
    for (const [i, ring] of this.#rings.entries()) {
      if (!ring.started || ring.queue === null) continue;
      ring.base = ring.queue instanceof SplitDeviceQueue
        ? ring.queue.lastAvailIndex
        : ring.queue.ringState;
      ring.queue = this.#makeQueue(i, ring, mem);
    }
    if (this.#active.includes("1")) {
      this.#active = "";
      this.#reactivate();
    }
    if (old !== null) this.#platform.unmapMemory(old);
  }

  #config(
    request: number,
    offset: number,
    size: number,
    flags: number,
    payload: Uint8Array,
  ): Uint8Array | undefined {
    if (!this.#has(PF.CONFIG)) {
      throw new VhostUserProtocolError(request, "CONFIG was not negotiated");
    }
    const space = this.#model.configSize;
    if (request === REQ.GET_CONFIG) {
      // Past the device's config the bytes read as zero (QEMU fills its buffer the same way).
      const out = new Uint8Array(size);
      const inside = Math.max(0, Math.min(size, space - offset));
      if (inside > 0) this.#model.readConfig(offset, out.subarray(0, inside));
      return replyConfig(request, offset, flags, out);
    }
    const inside = Math.max(0, Math.min(size, space - offset));
    if (inside > 0) this.#model.writeConfig(offset, payload.subarray(0, inside));
    return undefined;
  }

  /**
   * A device reset (RESET_DEVICE, RESET_OWNER, status 0): rings stop and forget their layout.
   * Their call and err fds stay, as libvhost-user keeps them, but a call fd is stale until the
   * front-end sends one again: QEMU sends it only after enabling the rings, and the guest may
   * have a request done before it comes (interrupts meanwhile go to both). `close` drops them. Ring objects stay the same
   * ones: completions still under way hold them.
   */
  #resetDevice(notifiers: "keep" | "close" = "keep"): void {
    for (const [i, ring] of this.#rings.entries()) {
      if (ring.kick >= 0) {
        this.#platform.watchKick(i, -1);
        this.#platform.closeFd(ring.kick);
      }
      const fresh = newRing();
      if (notifiers === "close") {
        if (ring.call >= 0) this.#platform.closeFd(ring.call);
        if (ring.err >= 0) this.#platform.closeFd(ring.err);
      } else {
        fresh.call = ring.call;
        fresh.err = ring.err;
        fresh.callStale = ring.call >= 0;
        fresh.missed = ring.missed;
      }
      Object.assign(ring, fresh);
    }
    this.#active = "";
    this.#backend.reset();
    this.#model.reset();
    this.#features &= 1n << BigInt(F_PROTOCOL_FEATURES);
  }

  /**
   * The connection ended: rings stop (what is in flight completes first), fds are closed and the
   * memory released. The device's node stays open for the next connection.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#backend.drained?.();
    this.#resetDevice("close");
    for (const r of this.#regions) this.#platform.closeFd(r.fd);
    this.#regions = [];
    this.#dropInflight();
    if (this.#mem !== null) this.#platform.unmapMemory(this.#mem);
    this.#mem = null;
  }
}

function checkOverlaps(regions: readonly MappedRegion[], request: number): void {
  const by = (key: "guestAddress" | "userAddress") =>
    [...regions].sort((a, b) => a[key] - b[key]).forEach((r, i, all) => {
      const next = all[i + 1];
      if (next !== undefined && r[key] + r.size > next[key]) {
        throw new VhostUserProtocolError(
          request,
          `regions overlap at ${key === "guestAddress" ? "guest" : "user"} address 0x${
            next[key].toString(16)
          }`,
        );
      }
    });
  by("guestAddress");
  by("userAddress");
}
