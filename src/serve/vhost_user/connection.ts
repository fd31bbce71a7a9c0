/**
 * Reading and writing whole vhost-user messages on a connected unix socket (blocking, read once
 * the loop saw it readable): the 12-byte header with the fds that come with it, then exactly its
 * payload. A front-end that sends half a message and stops gets a bounded wait, then a protocol
 * error (the connection is dropped), never a hung back-end.
 *
 * @module
 */
import { BlockError } from "../../errors.ts";
import { close, recvMsg, sendMsg, waitReadable } from "../../sys/unix_socket.ts";
import {
  decodeRequest,
  type Header,
  HEADER_BYTES,
  MAX_FDS,
  MAX_PAYLOAD,
  parseHeader,
  type Request,
  VhostUserProtocolError,
} from "./protocol.ts";

/** How long the rest of a message may take to arrive once its first byte did. */
const MESSAGE_TIMEOUT_MS = 2000;

/** One received message, decoded; or the peer's goodbye. */
export type Incoming =
  | { readonly kind: "message"; readonly header: Header; readonly request: Request }
  | { readonly kind: "closed" };

/** The unix socket of one front-end. */
export class VhostUserConnection {
  readonly fd: number;
  readonly #header = new Uint8Array(HEADER_BYTES);
  readonly #payload = new Uint8Array(MAX_PAYLOAD);
  #open = true;

  constructor(fd: number) {
    this.fd = fd;
  }

  /** Whether the socket has something to read now (a message, or the peer's hang-up). */
  pending(): boolean {
    return waitReadable([this.fd], 0).length > 0;
  }

  /**
   * Reads the next message once the socket is readable. Fds that came with a message that fails
   * to decode are closed here.
   *
   * @returns the message, `closed` when the peer hung up, or null when nothing was there after all
   * @throws {VhostUserProtocolError} for a broken message (the caller drops the connection)
   * @throws {BlockError} for a socket error
   */
  receive(): Incoming | null {
    const first = recvMsg(this.fd, this.#header, MAX_FDS);
    if (first === null) return null;
    if (first.bytes === 0 && first.fds.length === 0) return { kind: "closed" };
    const fds = first.fds;
    try {
      if (first.truncated) {
        throw new VhostUserProtocolError(-1, "a message carried more file descriptors than 8");
      }
      this.#fill(this.#header, first.bytes, "header");
      const header = parseHeader(this.#header);
      const payload = this.#payload.subarray(0, header.size);
      this.#fill(payload, 0, "payload");
      return { kind: "message", header, request: decodeRequest(header, payload, fds) };
    } catch (e) {
      for (const fd of fds) close(fd);
      throw e;
    }
  }

  /** Reads until `buf` is full (from `have` bytes on), waiting a bounded time for the rest. */
  #fill(buf: Uint8Array, have: number, what: string): void {
    const deadline = performance.now() + MESSAGE_TIMEOUT_MS;
    while (have < buf.length) {
      // The socket blocks: read only what poll says is there, within the message's time.
      const left = deadline - performance.now();
      if (left <= 0 || waitReadable([this.fd], Math.ceil(left)).length === 0) {
        throw new VhostUserProtocolError(
          -1,
          `the front-end sent ${have} of ${buf.length} bytes of a message ${what} and stopped`,
        );
      }
      const got = recvMsg(this.fd, buf.subarray(have), 0);
      if (got === null) continue;
      if (got.fds.length > 0) {
        for (const fd of got.fds) close(fd);
        throw new VhostUserProtocolError(-1, `file descriptors in the middle of a message ${what}`);
      }
      if (got.bytes === 0) {
        throw new VhostUserProtocolError(
          -1,
          `the front-end hung up in the middle of a message ${what}`,
        );
      }
      have += got.bytes;
    }
  }

  /**
   * Sends a reply, whole (replies are a few bytes: the socket has room unless the front-end never
   * reads them).
   *
   * @throws {BlockError} when the peer is gone
   */
  send(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (sendMsg(this.fd, bytes, fds) === null) {
      throw new BlockError("io", "The front-end does not read its replies");
    }
  }

  close(): void {
    if (!this.#open) return;
    this.#open = false;
    close(this.fd);
  }
}
