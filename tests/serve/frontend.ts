/**
 * A vhost-user front-end in TypeScript for the tests: it plays QEMU against `vstor serve` — guest
 * RAM in a memfd shared with the back-end, split rings laid out by the project's driver-side
 * queue, kick and call eventfds — over a real unix socket, message by message.
 */
import assert from "node:assert/strict";
import {
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  eventfd,
  eventfdRead,
  eventfdWrite,
} from "../../src/sys/eventfd.ts";
import {
  ftruncate,
  memfdCreate,
  sharedBufferOverFds,
  type SharedFdBuffer,
} from "../../src/sys/shared_memory.ts";
import { close, connectUnix, recvMsg, sendMsg, waitReadable } from "../../src/sys/unix_socket.ts";
import { queueFeaturesOf } from "../../src/virtio/device.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import type { DriverBuffer } from "../../src/virtio/queue.ts";
import { SplitDriverQueue, splitRingLayout } from "../../src/virtio/split_queue.ts";
import { encodeRequest, HEADER_BYTES, REQ } from "../../src/serve/vhost_user/protocol.ts";
import { memTable, state, u64, vringAddr } from "./payloads.ts";

export { memTable, state, u64 } from "./payloads.ts";

/** QEMU's address for guest RAM in its own space (ring addresses are given in it). */
export const FRONTEND_VA = 0x7f00_1000_0000;
/** Guest RAM: 16 MiB at guest-physical 0; rings in the first MiB, buffers above. */
export const RAM_BYTES = 16 << 20;
export const BUFFERS = 1 << 20;

/** One ring as the front-end drives it. */
export interface FrontRing {
  readonly driver: SplitDriverQueue<number>;
  readonly kick: number;
  readonly call: number;
}

/** A connected front-end with its guest RAM. */
export class Frontend {
  readonly socket: number;
  readonly ramFd: number;
  readonly shared: SharedFdBuffer;
  readonly mem: GuestMemory;
  readonly rings: FrontRing[] = [];
  features = 0n;
  #next = BUFFERS;

  constructor(path: string) {
    this.socket = connectUnix(path);
    this.ramFd = memfdCreate("vstor-test-ram");
    ftruncate(this.ramFd, RAM_BYTES);
    this.shared = sharedBufferOverFds(RAM_BYTES, [{
      fd: this.ramFd,
      offset: 0,
      length: RAM_BYTES,
      at: 0,
    }]);
    this.mem = new GuestMemory([{ gpa: 0, size: RAM_BYTES }], this.shared.buffer);
  }

  /** Sends a request; with `reply`, waits (bounded) for the reply and returns its payload. */
  request(
    request: number,
    payload: Uint8Array = new Uint8Array(0),
    fds: number[] = [],
    reply = false,
  ): Uint8Array | undefined {
    sendMsg(this.socket, encodeRequest(request, payload), fds);
    if (!reply) return undefined;
    return this.reply(request);
  }

  /** Reads one reply to `request`, waiting at most 10 s. */
  reply(request: number): Uint8Array {
    const header = this.#read(HEADER_BYTES);
    const v = new DataView(header.buffer);
    assert.equal(v.getUint32(0, true), request, "the reply is for the request");
    assert.equal(v.getUint32(4, true) & 0x7, 0x5, "version 1, reply flag");
    return this.#read(v.getUint32(8, true));
  }

  #read(length: number): Uint8Array {
    const out = new Uint8Array(length);
    let have = 0;
    while (have < length) {
      assert.ok(waitReadable([this.socket], 10_000).length > 0, "the back-end answers");
      const got = recvMsg(this.socket, out.subarray(have), 0);
      assert.ok(got !== null && got.bytes > 0, "the back-end closed the connection");
      have += got.bytes;
    }
    return out;
  }

  /** True when the back-end closed the connection (waits at most `ms`). */
  closedByPeer(ms = 5000): boolean {
    if (waitReadable([this.socket], ms).length === 0) return false;
    const got = recvMsg(this.socket, new Uint8Array(64), 0);
    return got !== null && got.bytes === 0;
  }

  /** QEMU's start-up: features, protocol features, owner, memory, then `rings` rings of `size`. */
  start(rings: number, size: number, features?: bigint): void {
    const offered = new DataView(
      this.request(REQ.GET_FEATURES, undefined, [], true)!.slice().buffer,
    )
      .getBigUint64(0, true);
    // Split rings (the driver queue this front-end builds) unless the caller says otherwise.
    this.features = features ?? (offered & ~(1n << 34n));
    this.request(REQ.SET_FEATURES, u64(this.features));
    const pf = new DataView(
      this.request(REQ.GET_PROTOCOL_FEATURES, undefined, [], true)!.slice().buffer,
    )
      .getBigUint64(0, true);
    this.request(REQ.SET_PROTOCOL_FEATURES, u64(pf));
    this.request(REQ.SET_OWNER);
    this.request(
      REQ.SET_MEM_TABLE,
      memTable([{ guestAddress: 0, size: RAM_BYTES, userAddress: FRONTEND_VA, mmapOffset: 0 }]),
      [this.ramFd],
    );
    let base = 0x1000;
    for (let i = 0; i < rings; i++) {
      const layout = splitRingLayout(size, base);
      base = Math.ceil((base + layout.bytes) / 4096) * 4096;
      const kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      const call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      this.request(REQ.SET_VRING_NUM, state(i, size));
      this.request(REQ.SET_VRING_BASE, state(i, 0));
      this.request(
        REQ.SET_VRING_ADDR,
        vringAddr(
          i,
          FRONTEND_VA + layout.desc,
          FRONTEND_VA + layout.device,
          FRONTEND_VA + layout.driver,
        ),
      );
      this.request(REQ.SET_VRING_CALL, u64(i), [call]);
      this.request(REQ.SET_VRING_KICK, u64(i), [kick]);
      this.request(REQ.SET_VRING_ENABLE, state(i, 1));
      this.rings.push({
        driver: new SplitDriverQueue<number>(this.mem, layout, queueFeaturesOf(this.features)),
        kick,
        call,
      });
    }
  }

  /** Guest memory for a buffer of `length` bytes (bump allocation above the rings). */
  alloc(length: number): number {
    const at = this.#next;
    this.#next = Math.ceil((at + length) / 16) * 16;
    assert.ok(this.#next <= RAM_BYTES, "test guest RAM exhausted");
    return at;
  }

  /** Adds a chain to ring `q` (published at the next {@linkcode kick}). */
  add(q: number, readable: DriverBuffer[], writable: DriverBuffer[], token: number): void {
    assert.ok(this.rings[q]!.driver.add(readable, writable, token), "ring has room");
  }

  /** Publishes ring `q`'s new chains and writes its kick eventfd. */
  kick(q: number): void {
    this.rings[q]!.driver.kick();
    eventfdWrite(this.rings[q]!.kick, 1);
  }

  /** Waits (at most 10 s) until `count` chains of ring `q` are used; returns their tokens. */
  waitUsed(q: number, count: number): number[] {
    const ring = this.rings[q]!;
    const out: number[] = [];
    const deadline = Date.now() + 10_000;
    while (out.length < count) {
      for (let u = ring.driver.getUsed(); u !== null; u = ring.driver.getUsed()) out.push(u.token);
      if (out.length >= count) break;
      const left = deadline - Date.now();
      assert.ok(left > 0, `only ${out.length} of ${count} requests completed`);
      if (waitReadable([ring.call], Math.min(left, 100)).length > 0) eventfdRead(ring.call);
    }
    return out;
  }

  close(): void {
    for (const r of this.rings) {
      close(r.kick);
      close(r.call);
    }
    close(this.socket);
    close(this.ramFd);
    this.shared.release();
  }
}
