/**
 * Node's sockets (node:net, and node:tls's TLSSocket over one) as an {@linkcode NbdStream}: the
 * server's TLS path, since only node:tls can turn an accepted plain connection into a TLS server
 * connection mid-stream (NBD's STARTTLS). Incoming data is queued as it arrives (the socket is
 * paused while the queue holds more than a bound, so a client cannot make it grow), and writes
 * resolve once node has handed the bytes on.
 *
 * @module
 */
import type { Duplex } from "node:stream";
import type { NbdStream } from "./stream.ts";

/** Bytes queued before the socket is paused. */
const HIGH_WATER = 1024 * 1024;

/** A node Duplex (net.Socket, tls.TLSSocket) read and written as an NbdStream. */
export class NodeStream implements NbdStream {
  readonly #socket: Duplex;
  readonly #queue: Uint8Array[] = [];
  #queued = 0;
  #ended = false;
  #error: Error | undefined;
  #wake: (() => void) | null = null;
  readonly #onData = (chunk: Uint8Array) => {
    this.#queue.push(chunk);
    this.#queued += chunk.length;
    if (this.#queued > HIGH_WATER) this.#socket.pause();
    this.#notify();
  };
  readonly #onEnd = () => {
    this.#ended = true;
    this.#notify();
  };
  readonly #onError = (e: Error) => {
    this.#error = e;
    this.#ended = true;
    this.#notify();
  };

  constructor(socket: Duplex) {
    this.#socket = socket;
    socket.on("data", this.#onData);
    socket.on("end", this.#onEnd);
    socket.on("close", this.#onEnd);
    socket.on("error", this.#onError);
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }

  async read(p: Uint8Array): Promise<number | null> {
    while (this.#queue.length === 0) {
      if (this.#error !== undefined) throw this.#error;
      if (this.#ended) return null;
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
    const head = this.#queue[0]!;
    const n = Math.min(head.length, p.length);
    p.set(head.subarray(0, n));
    if (n === head.length) this.#queue.shift();
    else this.#queue[0] = head.subarray(n);
    this.#queued -= n;
    if (this.#queued <= HIGH_WATER / 2 && this.#socket.isPaused()) this.#socket.resume();
    return n;
  }

  write(p: Uint8Array): Promise<number> {
    if (this.#error !== undefined) return Promise.reject(this.#error);
    // Settled once node has handed the bytes on: the caller's buffer is node's until then (no
    // copy), and a slow reader holds the writer back as the socket's buffer fills.
    return new Promise((resolve, reject) => {
      this.#socket.write(p, (e) => e ? reject(e) : resolve(p.length));
    });
  }

  /**
   * Hands the socket over (for a TLS layer on top): stops listening, and returns what arrived
   * but was not read (after STARTTLS's reply a client sends nothing before its TLS hello).
   */
  detach(): Uint8Array[] {
    this.#socket.off("data", this.#onData);
    this.#socket.off("end", this.#onEnd);
    this.#socket.off("close", this.#onEnd);
    this.#socket.off("error", this.#onError);
    const left = this.#queue.splice(0);
    this.#queued = 0;
    return left;
  }

  close(): void {
    this.#socket.destroy();
  }
}
