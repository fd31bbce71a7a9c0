/// <reference lib="deno.worker" />
/**
 * One vhost-user export, in its own Worker (its iothread): it opens the export's node, listens on
 * the export's unix socket, and serves one front-end at a time — the socket's messages, the rings'
 * kick eventfds and a control eventfd in one epoll set. Kicks drain the rings through the device's
 * back-end (virtio-blk or virtio-scsi, the same code the simulated machine runs) and completions
 * signal the call eventfds. The thread's io_uring rings signal one more eventfd in the set when they
 * post a completion (QEMU's AioContext does the same), so the loop sleeps in epoll_wait whether
 * the disk works or not and wakes for whichever comes first.
 *
 * Protocol from the VMM thread: `init` → `ready` (or `failed`); to stop, the VMM sets the shared
 * stop word and writes the control eventfd → the client is dropped once its requests in flight
 * complete, the node is flushed and closed, the socket file removed → `closed`.
 *
 * @module
 */
import { setImmediate } from "node:timers";
import { openImage } from "../../formats/open.ts";
import type { BlockNode } from "../block/node.ts";
import type { DeviceBackend } from "../devices/backend.ts";
import { VirtioBlkBackend } from "../devices/virtio_blk_backend.ts";
import { VirtioBlkModel } from "../devices/virtio_blk_model.ts";
import { VirtioScsiBackend } from "../devices/virtio_scsi_backend.ts";
import { VirtioScsiModel } from "../devices/virtio_scsi_model.ts";
import {
  pumpUringQueues,
  setUringEventfd,
  setUringOwnerAway,
  uringInFlight,
} from "../host/uring_queue.ts";
import { AdaptivePoll } from "./adaptive_poll.ts";
import {
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  epollAdd,
  epollCreate,
  epollDel,
  EPOLLIN,
  epollWaitInto,
  eventfd,
  eventfdRead,
  eventfdWrite,
} from "../sys/eventfd.ts";
import {
  fdSize,
  ftruncate,
  memfdCreate,
  mmapShared,
  sharedBufferOverFds,
  type SharedFdBuffer,
} from "../sys/shared_memory.ts";
import { accept, close, listenUnix } from "../sys/unix_socket.ts";
import type { VirtioDeviceModel } from "../virtio/device.ts";
import { GuestMemory } from "../virtio/memory.ts";
import type { NodeOpen } from "./blockdev.ts";
import type { ExportSpec } from "./options.ts";
import { VhostUserConnection } from "./vhost_user/connection.ts";
import { type MappedRegion, type SessionPlatform, VhostUserSession } from "./vhost_user/session.ts";
import { requestName, VhostUserProtocolError } from "./vhost_user/protocol.ts";

/** VSTOR_SERVE_DEBUG=1 logs every message the front-end sends. */
const DEBUG = Deno.env.get("VSTOR_SERVE_DEBUG") === "1";

/** From the VMM thread. */
export type ExportRequest = {
  readonly kind: "init";
  readonly spec: ExportSpec;
  readonly open: NodeOpen;
  /**
   * One Int32 the VMM thread sets to 1 to stop the export (then it writes the control eventfd):
   * read after every wake-up, so a Worker asleep in epoll_wait stops without its event loop.
   */
  readonly stop: SharedArrayBuffer;
};

/** To the VMM thread. */
export type ExportReply =
  | { readonly kind: "ready"; readonly controlFd: number; readonly format: string }
  | { readonly kind: "failed"; readonly message: string }
  | { readonly kind: "log"; readonly line: string }
  | { readonly kind: "closed"; readonly error?: string };

// epoll data words: what became readable.
const TAG_CONTROL = 0x1_0000;
const TAG_LISTEN = 0x2_0000;
const TAG_CLIENT = 0x3_0000;
const TAG_URING = 0x5_0000;
const TAG_KICK = 0x4_0000; // + ring index
/** Longest sleep in epoll_wait (the control eventfd wakes it sooner). */
const IDLE_WAIT_MS = 1000;
/**
 * Longest sleep in epoll_wait while requests are in flight and some are on io_uring (its
 * completions wake the loop sooner): a bound for whatever else they may wait for.
 */
const INFLIGHT_WAIT_MS = 5;
/** Request queues a vhost-user-scsi export accepts (libvhost-user's scsi example has 8). */
const SCSI_MAX_REQUEST_QUEUES = 16;
/** Queue size the devices accept (QEMU's vhost-user-blk-pci default is 128, its limit 1024). */
const MAX_QUEUE_SIZE = 1024;

function post(reply: ExportReply): void {
  self.postMessage(reply);
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** The device an export serves, over its node. */
function makeDevice(spec: ExportSpec, node: BlockNode): {
  model: VirtioDeviceModel;
  backend: DeviceBackend;
} {
  if (spec.type === "vhost-user-blk") {
    const model = new VirtioBlkModel({
      numQueues: spec.numQueues,
      queueSize: MAX_QUEUE_SIZE,
      logicalBlockSize: spec.logicalBlockSize,
      readOnly: !spec.writable,
      serial: spec.id.slice(0, 20),
      driveName: spec.id,
      // Offered; the front-end keeps it only when its device says packed=on.
      packed: true,
    }, node);
    return { model, backend: new VirtioBlkBackend(node, model.options, model.shared) };
  }
  // QEMU's vhost-user-scsi picks its request queues itself (one per vCPU by default) and reads
  // no config from the back-end: accept up to SCSI_MAX_REQUEST_QUEUES whatever num-queues says.
  const model = new VirtioScsiModel({
    numQueues: Math.max(spec.numQueues, SCSI_MAX_REQUEST_QUEUES),
    queueSize: MAX_QUEUE_SIZE,
    packed: true,
  });
  const backend = new VirtioScsiBackend({ shared: model.shared });
  backend.lend(0, 0, node, { readOnly: !spec.writable, serial: spec.id.slice(0, 20) }, spec.id);
  return { model, backend };
}

class ExportServer {
  readonly #spec: ExportSpec;
  readonly #node: BlockNode;
  readonly #epoll: number;
  readonly #control: number;
  readonly #listen: number;
  /** Signalled by the thread's io_uring rings when they post a completion. */
  readonly #uring: number;
  readonly #events = new Uint32Array(2 * 64);
  #client: VhostUserConnection | null = null;
  #session: VhostUserSession | null = null;
  #device: { model: VirtioDeviceModel; backend: DeviceBackend } | null = null;
  readonly #buffers = new Map<GuestMemory, SharedFdBuffer>();
  readonly #kicks = new Map<number, number>();
  readonly #stop: Int32Array;
  /** This front-end's kicks received and interrupts (call signals) sent. */
  #kicksSeen = 0;
  /** How long the loop polls its rings before sleeping. */
  readonly #poll: AdaptivePoll;
  /** Counts kick fd changes (a wake-up's kick events are stale once it moved). */
  #kickChanges = 0;
  #callsSent = 0;
  /** Messages are handled one at a time, in order (a GET_VRING_BASE waits for its ring). */
  #busy: Promise<void> = Promise.resolve();

  constructor(spec: ExportSpec, node: BlockNode, stop: SharedArrayBuffer) {
    this.#spec = spec;
    this.#node = node;
    this.#stop = new Int32Array(stop);
    this.#poll = new AdaptivePoll(spec.poll);
    this.#epoll = epollCreate();
    this.#control = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    this.#listen = listenUnix(spec.socket, { unlinkStale: true, nonBlocking: true });
    epollAdd(this.#epoll, this.#control, EPOLLIN, TAG_CONTROL);
    epollAdd(this.#epoll, this.#listen, EPOLLIN, TAG_LISTEN);
    this.#uring = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    epollAdd(this.#epoll, this.#uring, EPOLLIN, TAG_URING);
  }

  get controlFd(): number {
    return this.#control;
  }

  get #stopping(): boolean {
    return Atomics.load(this.#stop, 0) !== 0;
  }

  #log(line: string): void {
    post({ kind: "log", line: `${this.#spec.id}: ${line}` });
  }

  async run(): Promise<void> {
    // One wait for everything, as QEMU's iothread: the rings' completions signal an eventfd in
    // this epoll set, so a kick or a message is seen while the disk works, and a completion ends
    // the wait without polling. (Before, the ring's pump waited in the kernel up to 100 µs at a
    // time and this loop looked at epoll between its waits.) No polling while requests are in
    // flight: under a guest in QEMU TCG, looking at the rings while the disk worked found a
    // request in 22% of the windows and cost 1.6 µs of CPU per request.
    setUringEventfd(this.#uring);
    const events = this.#events;
    let worked = false;
    while (!this.#stopping) {
      const inflight = (this.#device?.backend.inflight ?? 0) > 0;
      const from = performance.now();
      // Before sleeping, look at the rings a while with kicks off (QEMU's iothread polling): a
      // front-end that submits again soon needs no kick, the loop no wake-up.
      if (worked && !inflight && this.#poll.windowNs > 0 && this.#session !== null) {
        const found = this.#session.poll(from + this.#poll.windowNs / 1e6);
        if (found.length > 0) {
          this.#poll.record((performance.now() - from) * 1e6);
          for (const index of found) this.#drain(index);
          await new Promise((resolve) => setImmediate(resolve));
          continue;
        }
      }
      // In flight on io_uring: its eventfd ends the wait. In flight elsewhere (a thread pool's
      // Workers answer by message): the event loop must turn, so no wait.
      const timeout = !inflight ? IDLE_WAIT_MS : uringInFlight() ? INFLIGHT_WAIT_MS : 0;
      const n = epollWaitInto(this.#epoll, events, timeout);
      worked = false;
      // Messages before kicks: QEMU does not wait for an answer to SET_VRING_CALL before the
      // guest runs on, so a kick may be seen in the same wake-up as the call fd its completion
      // is for — the message goes first, then the ring.
      const kicksBefore = this.#kickChanges;
      for (let i = 0; i < n && !this.#stopping; i++) {
        const data = events[2 * i + 1]!;
        if (data === TAG_CONTROL) eventfdRead(this.#control);
        else if (data === TAG_LISTEN) this.#accept();
        else if (data === TAG_CLIENT) await this.#away(() => this.#onMessages());
        else if (data === TAG_URING) {
          // Read before reaping: a completion posted meanwhile signals again.
          eventfdRead(this.#uring);
          pumpUringQueues();
        }
      }
      for (let i = 0; i < n && !this.#stopping; i++) {
        const data = events[2 * i + 1]!;
        if (data < TAG_KICK || data >= TAG_URING) continue;
        worked = true;
        // A message replaced kick fds meanwhile: the event may be the old fd's (reading the new
        // one could block), so the ring is drained without reading; epoll reports the new fd.
        if (this.#kickChanges === kicksBefore) this.#onKick(data - TAG_KICK);
        else this.#drain(data - TAG_KICK);
      }
      if (worked && !inflight) this.#poll.record((performance.now() - from) * 1e6);
      // Let promises and the rings' pumps run (completions, their interrupts).
      await new Promise((resolve) => setImmediate(resolve));
    }
    setUringEventfd(null);
    await this.#dropClient("the daemon is shutting down");
    close(this.#listen);
    close(this.#uring);
    close(this.#control);
    close(this.#epoll);
    try {
      Deno.removeSync(this.#spec.socket);
    } catch {
      // Gone already.
    }
  }

  /**
   * Runs `work` out of the wait loop: a message may wait for the rings' requests in flight
   * (GET_VRING_BASE, a dropped front-end), so their pumps reap by themselves meanwhile.
   */
  async #away(work: () => Promise<void>): Promise<void> {
    setUringOwnerAway(true);
    try {
      await work();
    } finally {
      setUringOwnerAway(false);
    }
  }

  #accept(): void {
    const fd = accept(this.#listen, false);
    if (fd === null) return;
    if (this.#client !== null) {
      // One front-end at a time, as qemu-storage-daemon's vhost-user-blk export.
      this.#log("a second front-end connected while one is served: refused");
      close(fd);
      return;
    }
    this.#client = new VhostUserConnection(fd);
    this.#device = makeDevice(this.#spec, this.#node);
    this.#session = new VhostUserSession(this.#device.model, this.#device.backend, this.#platform);
    epollAdd(this.#epoll, fd, EPOLLIN, TAG_CLIENT);
    this.#log("front-end connected");
  }

  /** Every message the socket holds now, in order. */
  async #onMessages(): Promise<void> {
    while (await this.#onMessage() && this.#client?.pending() === true);
  }

  /** One message; false when there was none (or the front-end was dropped). */
  async #onMessage(): Promise<boolean> {
    const client = this.#client, session = this.#session;
    if (client === null || session === null) return false;
    let incoming;
    try {
      incoming = client.receive();
    } catch (e) {
      await this.#dropClient(describe(e));
      return false;
    }
    if (incoming === null) return false;
    if (incoming.kind === "closed") {
      await this.#dropClient("the front-end disconnected");
      return false;
    }
    const { header, request } = incoming;
    if (DEBUG) {
      this.#log(
        `<- ${requestName(request.request)} ${
          JSON.stringify(request, (_, v) =>
            typeof v === "bigint"
              ? `0x${v.toString(16)}`
              : v instanceof Uint8Array
              ? `[${v.length} bytes]`
              : v)
        }`,
      );
    }
    try {
      const out = await session.handle(header, request);
      if (out.reply !== undefined) client.send(out.reply, out.fds ?? []);
    } catch (e) {
      // The request's fds were not taken over by the session.
      if (request.kind === "vring-fd" && request.fd >= 0) close(request.fd);
      if (request.kind === "mem-table") { for (const fd of request.fds) close(fd); }
      if (request.kind === "mem-reg" && request.fd >= 0) close(request.fd);
      await this.#dropClient(e instanceof VhostUserProtocolError ? e.message : describe(e));
      return false;
    }
    return true;
  }

  #onKick(index: number): void {
    const fd = this.#kicks.get(index);
    if (fd === undefined) return;
    eventfdRead(fd);
    this.#kicksSeen++;
    if (DEBUG) this.#log(`kick ring ${index}`);
    this.#drain(index);
  }

  #drain(index: number): void {
    const session = this.#session;
    if (session === null) return;
    session.kick(index).catch((e) => {
      // The driver broke the ring rules: as libvhost-user's vu_panic, the connection goes.
      this.#dropClient(`ring ${index}: ${describe(e)}`);
    });
  }

  /** ` (N requests, K kicks and I interrupts per request)` for the log, or nothing. */
  #served(): string {
    const backend = this.#device?.backend;
    const requests = backend instanceof VirtioBlkBackend
      ? backend.stats.requests
      : backend instanceof VirtioScsiBackend
      ? backend.stats.commands
      : 0;
    const kicks = this.#kicksSeen, calls = this.#callsSent;
    this.#kicksSeen = this.#callsSent = 0;
    if (requests === 0) return "";
    return ` (${requests} requests, ${(kicks / requests).toFixed(3)} kicks and ` +
      `${(calls / requests).toFixed(3)} interrupts per request)`;
  }

  async #dropClient(why: string): Promise<void> {
    const client = this.#client;
    if (client === null) return;
    this.#client = null;
    this.#log(`front-end dropped: ${why}${this.#served()}`);
    try {
      epollDel(this.#epoll, client.fd);
    } catch {
      // Closed already.
    }
    client.close();
    const session = this.#session;
    this.#session = null;
    // Requests in flight complete first; the image is flushed so that what was acknowledged is
    // on disk whatever the front-end does next.
    await session?.close();
    this.#device = null;
    await this.#node.flush().catch((e) => this.#log(`flush failed: ${describe(e)}`));
  }

  readonly #platform: SessionPlatform = {
    mapMemory: (regions: readonly MappedRegion[]) => {
      const sorted = [...regions].sort((a, b) => a.guestAddress - b.guestAddress);
      for (const r of sorted) {
        // A mapping past the end of its file would SIGBUS the daemon on the first access.
        const size = fdSize(r.fd);
        if (r.mmapOffset + r.size > size) {
          throw new Error(
            `a memory region of ${r.size} bytes at offset ${r.mmapOffset} of its fd goes past ` +
              `the fd's ${size} bytes`,
          );
        }
      }
      let total = 0;
      const layout = sorted.map((r) => {
        const at = total;
        total += r.size;
        return { fd: r.fd, offset: r.mmapOffset, length: r.size, at };
      });
      const shared = sharedBufferOverFds(total, layout);
      if (shared.offset !== 0) {
        shared.release();
        throw new Error("guest memory could not be mapped at the start of a buffer");
      }
      const mem = new GuestMemory(
        sorted.map((r) => ({ gpa: r.guestAddress, size: r.size })),
        shared.buffer,
      );
      this.#buffers.set(mem, shared);
      return mem;
    },
    unmapMemory: (mem: GuestMemory) => {
      this.#buffers.get(mem)?.release();
      this.#buffers.delete(mem);
    },
    watchKick: (index: number, fd: number) => {
      this.#kickChanges++;
      const old = this.#kicks.get(index);
      if (old !== undefined) {
        try {
          epollDel(this.#epoll, old);
        } catch {
          // Closed already.
        }
        this.#kicks.delete(index);
      }
      if (fd >= 0) {
        epollAdd(this.#epoll, fd, EPOLLIN, TAG_KICK + index);
        this.#kicks.set(index, fd);
      }
    },
    signal: (fd: number) => {
      this.#callsSent++;
      if (DEBUG) this.#log(`call fd ${fd}`);
      eventfdWrite(fd, 1);
    },
    drainSoon: (index: number) => {
      // After the message that enabled the ring has been answered.
      if (DEBUG) this.#log(`drain soon ${index}`);
      queueMicrotask(() => this.#drain(index));
    },
    closeFd: (fd: number) => close(fd),
    inflightMemory: (size: number, fd?: number, offset = 0) => {
      if (fd === undefined) {
        const made = memfdCreate("vstor-inflight");
        try {
          ftruncate(made, size);
          const map = mmapShared(made, size, 0);
          return { fd: made, bytes: map.bytes, release: () => map.unmap() };
        } catch (e) {
          close(made);
          throw e;
        }
      }
      // The front-end's area: it must hold what is mapped (a page past its end would SIGBUS).
      const have = fdSize(fd);
      if (offset + size > have) {
        throw new Error(
          `an inflight area of ${size} bytes at ${offset} past the fd's ${have} bytes`,
        );
      }
      const map = mmapShared(fd, size, offset);
      return { fd, bytes: map.bytes, release: () => map.unmap() };
    },
    log: (line: string) => this.#log(line),
  };

  async close(): Promise<string | undefined> {
    try {
      await this.#node.flush();
      await this.#node.close();
      return undefined;
    } catch (e) {
      return describe(e);
    }
  }
}

let server: ExportServer | null = null;

self.onmessage = async (event: MessageEvent<ExportRequest>) => {
  const msg = event.data;
  let node: BlockNode;
  try {
    node = await openImage(msg.open.path, msg.open.options);
  } catch (e) {
    post({ kind: "failed", message: `${msg.spec.id}: ${describe(e)}` });
    return;
  }
  try {
    server = new ExportServer(msg.spec, node, msg.stop);
  } catch (e) {
    await node.close().catch(() => {});
    post({ kind: "failed", message: `${msg.spec.id}: ${describe(e)}` });
    return;
  }
  post({ kind: "ready", controlFd: server.controlFd, format: node.format });
  try {
    await server.run();
  } catch (e) {
    post({ kind: "log", line: `${msg.spec.id}: ${describe(e)}` });
  }
  const error = await server.close();
  post({ kind: "closed", ...(error === undefined ? {} : { error }) });
};
