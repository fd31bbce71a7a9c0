/**
 * Stream sockets for network clients (the NBD client): a TCP connection to a host name or address
 * through getaddrinfo(3), or a unix socket, kept non-blocking, with calls that send or receive
 * whole messages and give up after a timeout instead of hanging on a peer that stopped answering.
 * struct addrinfo and the socket options are from <netdb.h>, <sys/socket.h>, <netinet/tcp.h>
 * (x86-64 and aarch64 Linux agree).
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { EAGAIN, EINTR, errno, libc, strerror } from "./libc.ts";
import { close, connectUnix, POLLERR, POLLHUP, POLLIN, POLLOUT } from "./unix_socket.ts";

export const AF_INET = 2;
export const AF_INET6 = 10;
const SOCK_STREAM = 1;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SO_ERROR = 4;
const IPPROTO_TCP = 6;
const TCP_NODELAY = 1;
const EINPROGRESS = 115;
const ECONNRESET = 104;
const EPIPE = 32;
const ENOTCONN = 107;

/** Whether `e` says the connection is gone (reset, closed by the peer, broken pipe). */
export function isConnectionLoss(e: unknown): boolean {
  if (!(e instanceof BlockError)) return false;
  const code = e.context.errno;
  return code === ECONNRESET || code === EPIPE || code === ENOTCONN;
}
const MSG_NOSIGNAL = 0x4000;
const AI_NUMERICSERV = 0x400;
const EAI_SYSTEM = -11;

/** struct addrinfo: 48 bytes. */
export const ADDRINFO_SIZE = 48;
export const ADDRINFO_flags = 0;
export const ADDRINFO_family = 4;
export const ADDRINFO_socktype = 8;
export const ADDRINFO_protocol = 12;
export const ADDRINFO_addrlen = 16; // socklen_t, then 4 bytes of padding
export const ADDRINFO_addr = 24; // struct sockaddr *
export const ADDRINFO_next = 40; // struct addrinfo *

function failed(call: string, code: number, what: string): BlockError {
  return new BlockError("io", `${what}: ${call} failed: ${strerror(code)}`, { errno: code });
}

/** One address getaddrinfo found. */
interface Address {
  readonly family: number;
  readonly sockaddr: Uint8Array<ArrayBuffer>;
}

/** The TCP addresses of `host` (a name or a numeric address) and `port`, in getaddrinfo's order. */
export function resolveTcp(host: string, port: number): Address[] {
  const hints = new Uint8Array(ADDRINFO_SIZE);
  const h = new DataView(hints.buffer);
  h.setInt32(ADDRINFO_flags, AI_NUMERICSERV, true);
  h.setInt32(ADDRINFO_socktype, SOCK_STREAM, true);
  const out = new Uint8Array(8);
  const enc = new TextEncoder();
  const c = libc();
  const rc = c.getaddrinfo(enc.encode(host + "\0"), enc.encode(`${port}\0`), hints, out);
  if (rc !== 0) {
    const why = rc === EAI_SYSTEM ? strerror(errno()) : cString(c.gai_strerror(rc));
    throw new BlockError("io", `Could not resolve '${host}': ${why}`);
  }
  const first = new DataView(out.buffer).getBigUint64(0, true);
  const list = Deno.UnsafePointer.create(first);
  const found: Address[] = [];
  try {
    // A list longer than this is not one getaddrinfo makes.
    for (let p = list, n = 0; p !== null && n < 64; n++) {
      const v = new Deno.UnsafePointerView(p);
      const family = v.getInt32(ADDRINFO_family);
      const length = v.getUint32(ADDRINFO_addrlen);
      const addr = v.getPointer(ADDRINFO_addr);
      if ((family === AF_INET || family === AF_INET6) && addr !== null && length <= 128) {
        const sockaddr = new Uint8Array(length);
        Deno.UnsafePointerView.copyInto(addr, sockaddr);
        found.push({ family, sockaddr });
      }
      p = v.getPointer(ADDRINFO_next);
    }
  } finally {
    if (list !== null) c.freeaddrinfo(list);
  }
  if (found.length === 0) throw new BlockError("io", `Could not resolve '${host}': no address`);
  return found;
}

function cString(p: Deno.PointerValue): string {
  return p === null ? "unknown error" : Deno.UnsafePointerView.getCString(p);
}

const pollfd = new Uint8Array(8);
const pollView = new DataView(pollfd.buffer);

/** Waits up to `timeoutMs` for `events` on `fd`: the events that came (0 on timeout). */
function pollOne(fd: number, events: number, timeoutMs: number): number {
  pollView.setInt32(0, fd, true);
  pollView.setInt16(4, events, true);
  pollView.setInt16(6, 0, true);
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const left = Math.max(0, Math.ceil(deadline - performance.now()));
    const n = libc().poll(pollfd, 1n, left);
    if (n > 0) return pollView.getInt16(6, true);
    if (n === 0) return 0;
    const code = errno();
    if (code !== EINTR) throw failed("poll", code, "socket");
  }
}

/**
 * A connected, non-blocking stream socket whose calls block the thread (in poll) for at most
 * `timeoutMs` each.
 */
export class StreamSocket {
  #fd: number;
  readonly #what: string;
  /** How long one send or receive may wait for the peer. */
  timeoutMs: number;

  private constructor(fd: number, what: string, timeoutMs: number) {
    this.#fd = fd;
    this.#what = what;
    this.timeoutMs = timeoutMs;
  }

  /**
   * Connects to `host`:`port` over TCP, trying each address in turn, each within `timeoutMs`.
   *
   * @throws {BlockError} `io` naming the host and why the last address failed
   */
  static tcp(host: string, port: number, timeoutMs: number): StreamSocket {
    const what = `${host.includes(":") ? `[${host}]` : host}:${port}`;
    let last: BlockError | undefined;
    for (const a of resolveTcp(host, port)) {
      const c = libc();
      const fd = c.socket(a.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) throw failed("socket", errno(), what);
      try {
        if (c.connect(fd, a.sockaddr, a.sockaddr.length) !== 0) {
          const code = errno();
          if (code !== EINPROGRESS && code !== EINTR) throw failed("connect", code, what);
          if (pollOne(fd, POLLOUT, timeoutMs) === 0) {
            throw new BlockError("io", `${what}: no answer to connect in ${timeoutMs / 1000} s`);
          }
          const value = new Uint8Array(4), length = new Uint8Array(4);
          new DataView(length.buffer).setUint32(0, 4, true);
          if (c.getsockopt(fd, SOL_SOCKET, SO_ERROR, value, length) !== 0) {
            throw failed("getsockopt", errno(), what);
          }
          const code2 = new DataView(value.buffer).getInt32(0, true);
          if (code2 !== 0) throw failed("connect", code2, what);
        }
        const one = new Uint8Array([1, 0, 0, 0]);
        c.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, one, 4);
        return new StreamSocket(fd, what, timeoutMs);
      } catch (e) {
        close(fd);
        if (!(e instanceof BlockError)) throw e;
        last = e;
      }
    }
    throw last!;
  }

  /** Connects to the unix socket at `path`. @throws {BlockError} naming the path */
  static unix(path: string, timeoutMs: number): StreamSocket {
    let fd: number;
    try {
      fd = connectUnix(path, { nonBlocking: true });
    } catch (e) {
      throw new BlockError("io", `${path}: ${e instanceof Error ? e.message : e}`, { cause: e });
    }
    return new StreamSocket(fd, path, timeoutMs);
  }

  /** Where it is connected (for messages). */
  get peer(): string {
    return this.#what;
  }

  #live(): number {
    if (this.#fd < 0) throw new BlockError("io", `${this.#what}: the connection is closed`);
    return this.#fd;
  }

  #wait(events: number, doing: string): void {
    const got = pollOne(this.#fd, events, this.timeoutMs);
    if (got === 0) {
      throw new BlockError(
        "io",
        `${this.#what}: no answer in ${this.timeoutMs / 1000} s while ${doing}`,
      );
    }
    if ((got & (events | POLLHUP | POLLERR)) === 0) {
      throw new BlockError("io", `${this.#what}: the socket failed while ${doing}`);
    }
  }

  /**
   * Sends every byte of each part, in order. While the peer is not taking more, `onReadable`
   * (when given) is called each time there is something to receive: a peer that answers earlier
   * requests before it reads on must have its answers read, or both sides would wait for ever.
   */
  sendAll(parts: readonly Uint8Array[], onReadable?: () => void): void {
    const fd = this.#live();
    const c = libc();
    for (const part of parts) {
      const bytes = part as Uint8Array<ArrayBuffer>;
      for (let at = 0; at < bytes.length;) {
        const piece = at === 0 ? bytes : bytes.subarray(at);
        const n = c.send(fd, piece, BigInt(piece.length), MSG_NOSIGNAL);
        if (n >= 0) {
          at += n;
          continue;
        }
        const code = errno();
        if (code === EINTR) continue;
        if (code !== EAGAIN) throw failed("send", code, this.#what);
        if (onReadable === undefined) {
          this.#wait(POLLOUT, "sending");
          continue;
        }
        const got = pollOne(fd, POLLOUT | POLLIN, this.timeoutMs);
        if (got === 0) {
          throw new BlockError(
            "io",
            `${this.#what}: no answer in ${this.timeoutMs / 1000} s while sending`,
          );
        }
        if ((got & POLLIN) !== 0) onReadable();
      }
    }
  }

  /** Whether something can be received now (or the peer closed: a receive says so). */
  readable(): boolean {
    return (pollOne(this.#live(), POLLIN, 0) & (POLLIN | POLLHUP | POLLERR)) !== 0;
  }

  /**
   * Whether something can be received within `ms`, found without holding the thread (poll on
   * Deno's blocking pool: tens of µs, so for waits, not per message).
   */
  async waitReadable(ms: number): Promise<boolean> {
    const table = new Uint8Array(8);
    const v = new DataView(table.buffer);
    v.setInt32(0, this.#live(), true);
    v.setInt16(4, POLLIN, true);
    return await libc().poll_async(table, 1n, ms) !== 0;
  }

  /**
   * Fills `dst`.
   *
   * @throws {BlockError} when the peer closes the connection first, or says nothing in time
   */
  recvExact(dst: Uint8Array): void {
    const fd = this.#live();
    const c = libc();
    const bytes = dst as Uint8Array<ArrayBuffer>;
    for (let at = 0; at < bytes.length;) {
      const piece = at === 0 ? bytes : bytes.subarray(at);
      const n = c.recv(fd, piece, BigInt(piece.length), 0);
      if (n > 0) {
        at += n;
        continue;
      }
      if (n === 0) {
        // As a reset: the connection is gone (errno lets callers tell it from other failures).
        throw new BlockError("io", `${this.#what}: the server closed the connection`, {
          errno: ECONNRESET,
        });
      }
      const code = errno();
      if (code === EAGAIN) this.#wait(POLLIN, "waiting for a reply");
      else if (code !== EINTR) throw failed("recv", code, this.#what);
    }
  }

  /** Closes it. Idempotent. */
  close(): void {
    if (this.#fd < 0) return;
    close(this.#fd);
    this.#fd = -1;
  }
}
