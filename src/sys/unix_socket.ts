/**
 * AF_UNIX stream sockets through libc, for a vhost-user back-end and its tests: listen at a path,
 * accept, connect, and messages carrying file descriptors (`SCM_RIGHTS`), which
 * `Deno.listen({ transport: "unix" })` cannot receive. Also `poll(2)` for readability of several
 * fds. See unix(7), socket(2), bind(2), accept4(2), sendmsg(2), recvmsg(2), cmsg(3), poll(2).
 *
 * Descriptors are plain numbers (process-wide, usable from any Worker) and are always made
 * close-on-exec. Failures throw a `BlockError` naming the call and errno (`recvmsg: EBADF (...)`);
 * on a non-blocking socket "would block" (EAGAIN) is not an error: the call returns `null`.
 * Interrupted calls (EINTR) are retried.
 *
 * @module
 */
import net from "node:net";
import { BlockError } from "../errors.ts";
import { EAGAIN, EINTR, errno, libc } from "./libc.ts";
import { errnoText } from "./uring.ts";

export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SCM_RIGHTS = 1;
/** recvmsg/sendmsg flags (msg_flags on return). */
export const MSG_TRUNC = 0x20;
export const MSG_CTRUNC = 0x8;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_CMSG_CLOEXEC = 0x40000000;
const ECONNABORTED = 103;
/** connect(2) to a socket file nobody listens on. */
export const ECONNREFUSED = 111;
const EADDRINUSE = 98;
/** The most descriptors one message may carry (the kernel's SCM_MAX_FD). */
export const SCM_MAX_FD = 253;

/** struct sockaddr_un (<sys/un.h>): sun_family u16 @0, sun_path[108] @2; 110 bytes. */
export const SOCKADDR_UN_SIZE = 110;
const SUN_PATH = 2;
/** Longest socket path in bytes: sun_path less its terminating NUL. */
export const MAX_SOCKET_PATH = 107;
/** struct msghdr (<sys/socket.h>, x86_64): 56 bytes. */
export const MSGHDR_SIZE = 56;
export const MSGHDR_name = 0; // pointer
export const MSGHDR_namelen = 8; // u32
export const MSGHDR_iov = 16; // pointer
export const MSGHDR_iovlen = 24; // size_t
export const MSGHDR_control = 32; // pointer
export const MSGHDR_controllen = 40; // size_t
export const MSGHDR_flags = 48; // i32
/** struct iovec: base pointer @0, length size_t @8; 16 bytes. */
export const IOVEC_SIZE = 16;
/** struct cmsghdr: len size_t @0, level i32 @8, type i32 @12, data @16 (CMSG_DATA). */
export const CMSGHDR_SIZE = 16;
/** struct pollfd (<poll.h>): fd i32 @0, events i16 @4, revents i16 @6; 8 bytes. */
export const POLLFD_SIZE = 8;
export const POLLIN = 0x1;
export const POLLOUT = 0x4;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;
export const POLLNVAL = 0x20;

const TWO_32 = 4294967296;

/** CMSG_SPACE(n): a control message of n data bytes, padded to 8. */
function cmsgSpace(n: number): number {
  return CMSGHDR_SIZE + ((n + 7) & ~7);
}

/** `call: EXXX (text)` as a BlockError carrying the errno. */
function failed(call: string, code: number, path?: string): BlockError {
  const context = path === undefined ? { errno: code } : { errno: code, path };
  return new BlockError("io", `${call}: ${errnoText(code)}`, context);
}

/** The address of a pointer as a number (user-space addresses are below 2^47). */
function address(p: Deno.PointerValue): number {
  return p === null ? 0 : Number(Deno.UnsafePointer.value(p));
}

/** Writes a 64-bit address or length into a word array at word index `w`, without a BigInt. */
function setU64(words: Uint32Array, w: number, value: number): void {
  words[w] = value >>> 0;
  words[w + 1] = Math.floor(value / TWO_32);
}

/** The sockaddr_un for `path`, and its length. */
function sockaddr(path: string): { addr: Uint8Array<ArrayBuffer>; length: number } {
  const encoded = new TextEncoder().encode(path);
  if (encoded.length === 0 || encoded.includes(0)) {
    throw new RangeError(
      `A socket path must be non-empty without NUL bytes, got ${JSON.stringify(path)}`,
    );
  }
  if (encoded.length > MAX_SOCKET_PATH) {
    throw new BlockError(
      "invalid-argument",
      `Socket path is ${encoded.length} bytes, more than the ${MAX_SOCKET_PATH} a Unix socket ` +
        `address holds: ${path}`,
      { path },
    );
  }
  const addr = new Uint8Array(SOCKADDR_UN_SIZE);
  new DataView(addr.buffer).setUint16(0, AF_UNIX, true);
  addr.set(encoded, SUN_PATH);
  return { addr, length: SUN_PATH + encoded.length + 1 };
}

function newSocket(nonBlocking: boolean): number {
  const fd = libc().socket(
    AF_UNIX,
    SOCK_STREAM | SOCK_CLOEXEC | (nonBlocking ? SOCK_NONBLOCK : 0),
    0,
  );
  if (fd < 0) throw failed("socket", errno());
  return fd;
}

/** Options of {@linkcode listenUnix}. */
export interface ListenOptions {
  /** listen(2)'s backlog (default 16). */
  backlog?: number;
  /**
   * Replace a socket file left at `path` by a process that is gone (nothing accepts on it). A
   * socket something still listens on, or a file that is not a socket, is never removed.
   */
  unlinkStale?: boolean;
  /** Make the listening socket non-blocking (accept then returns null when nobody waits). */
  nonBlocking?: boolean;
}

/**
 * A listening AF_UNIX stream socket bound at `path`: socket(2), bind(2), listen(2).
 *
 * @returns the listening fd (close-on-exec)
 * @throws {BlockError} `invalid-argument` for a path longer than {@linkcode MAX_SOCKET_PATH}
 *   bytes; `busy` when `path` exists (with `unlinkStale`: when it is in use or not a socket);
 *   `io` for other failures
 */
export function listenUnix(path: string, options: ListenOptions = {}): number {
  const { addr, length } = sockaddr(path);
  if (options.unlinkStale === true) removeStale(path);
  const c = libc();
  const fd = newSocket(options.nonBlocking === true);
  try {
    if (c.bind(fd, addr, length) < 0) {
      const code = errno();
      if (code === EADDRINUSE) {
        throw new BlockError(
          "busy",
          `bind: ${path} already exists` +
            (options.unlinkStale === true ? "" : " (unlinkStale replaces a stale socket)"),
          { errno: code, path },
        );
      }
      throw failed("bind", code, path);
    }
    if (c.listen(fd, options.backlog ?? 16) < 0) throw failed("listen", errno(), path);
  } catch (e) {
    c.close(fd);
    throw e;
  }
  return fd;
}

/** Unlinks `path` when it is a socket nobody accepts on; leaves a missing path alone. */
function removeStale(path: string): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return;
    throw e;
  }
  if (info.isSocket !== true) {
    throw new BlockError("busy", `${path} exists and is not a socket`, { path });
  }
  let peer: number;
  try {
    peer = connectUnix(path);
  } catch (e) {
    if (e instanceof BlockError && e.context.errno === ECONNREFUSED) {
      Deno.removeSync(path);
      return;
    }
    throw e;
  }
  libc().close(peer);
  throw new BlockError("busy", `${path} is in use: a process accepts connections on it`, { path });
}

/**
 * Accepts one connection: accept4(2) with SOCK_CLOEXEC, and SOCK_NONBLOCK when asked.
 *
 * @param fd a listening socket
 * @param nonBlocking make the accepted socket non-blocking
 * @returns the connection's fd, or `null` when `fd` is non-blocking and nobody is waiting
 */
export function accept(fd: number, nonBlocking = false): number | null {
  const c = libc();
  const flags = SOCK_CLOEXEC | (nonBlocking ? SOCK_NONBLOCK : 0);
  for (;;) {
    const conn = c.accept4(fd, null, null, flags);
    if (conn >= 0) return conn;
    const code = errno();
    if (code === EAGAIN) return null;
    if (code !== EINTR && code !== ECONNABORTED) throw failed("accept4", code);
  }
}

/**
 * Connects an AF_UNIX stream socket to `path`.
 *
 * @returns the connected fd (close-on-exec)
 * @throws {BlockError} `invalid-argument` for a path too long; `io` with the errno
 *   (ENOENT: no such socket, ECONNREFUSED: nobody listens)
 */
export function connectUnix(path: string, options: { nonBlocking?: boolean } = {}): number {
  const { addr, length } = sockaddr(path);
  const c = libc();
  const fd = newSocket(options.nonBlocking === true);
  if (c.connect(fd, addr, length) < 0) {
    const code = errno();
    c.close(fd);
    throw failed("connect", code, path);
  }
  return fd;
}

/** A connected pair of AF_UNIX stream sockets (socketpair(2)), close-on-exec. */
export function socketPair(options: { nonBlocking?: boolean } = {}): [number, number] {
  const sv = new Uint8Array(8);
  const type = SOCK_STREAM | SOCK_CLOEXEC | (options.nonBlocking === true ? SOCK_NONBLOCK : 0);
  if (libc().socketpair(AF_UNIX, type, 0, sv) < 0) throw failed("socketpair", errno());
  const view = new DataView(sv.buffer);
  return [view.getInt32(0, true), view.getInt32(4, true)];
}

/**
 * A doorbell this thread's own event loop hears, for a C library's threads to ring: the write end
 * of a nonblocking socketpair ({@linkcode writeFd}) goes to the library, which writes a byte per
 * event; the read end sits in Deno's reactor (node:net over the fd), and `onRing` runs on this
 * thread once per batch of bytes read. No thread of Deno's blocking pool waits for it: a wake costs
 * a few microseconds instead of a blocking-pool round trip (about 40 µs of CPU measured here).
 * While unreferenced ({@linkcode unref}) it does not keep the process alive.
 */
export class LoopDoorbell {
  /** The end to ring: write(2) any byte. Owned by the doorbell; closed by {@linkcode close}. */
  readonly writeFd: number;
  readonly #socket: net.Socket;
  #closed = false;

  constructor(onRing: () => void) {
    const [readFd, writeFd] = socketPair({ nonBlocking: true });
    this.writeFd = writeFd;
    try {
      this.#socket = new net.Socket({ fd: readFd, readable: true, writable: false });
    } catch (e) {
      close(readFd);
      close(writeFd);
      throw e;
    }
    this.#socket.on("data", () => onRing());
    // A read error on a private socketpair cannot happen short of a bug; ringing once more lets
    // the owner look at its state rather than wait for an event that will not come.
    this.#socket.on("error", () => onRing());
    this.#socket.unref();
  }

  /** Keeps the process alive while events are expected. */
  ref(): void {
    if (!this.#closed) this.#socket.ref();
  }

  /** Lets the process end although the doorbell is open. */
  unref(): void {
    if (!this.#closed) this.#socket.unref();
  }

  /** Closes both ends. Whoever rings {@linkcode writeFd} must have stopped. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#socket.destroy();
    close(this.writeFd);
  }
}

/** shutdown(2): stop reading, writing or both on a connected socket. */
export function shutdown(fd: number, how: "read" | "write" | "both"): void {
  const code = how === "read" ? 0 : how === "write" ? 1 : 2;
  if (libc().shutdown(fd, code) < 0) throw failed("shutdown", errno());
}

/** close(2). The fd is gone afterwards even when this throws (Linux never retries a close). */
export function close(fd: number): void {
  if (libc().close(fd) < 0) {
    const code = errno();
    if (code !== EINTR) throw failed("close", code);
  }
}

/**
 * This thread's msghdr, iovec and control buffer, with the pointers between them written once
 * (the control buffer's when it grows). Module state is per Worker, as libc's errno is.
 */
const msg = new Uint8Array(MSGHDR_SIZE);
const msgWords = new Uint32Array(msg.buffer);
const msgView = new DataView(msg.buffer);
const iov = new Uint8Array(IOVEC_SIZE);
const iovWords = new Uint32Array(iov.buffer);
let control = new Uint8Array(cmsgSpace(4 * 8));
let controlView = new DataView(control.buffer);
let controlAddress = 0;
let iovAddress = 0;
/** Addresses of the caller buffers' memory (Deno.UnsafePointer.of costs about 300 ns). */
const addresses = new WeakMap<ArrayBufferLike, number>();

function prepare(bytes: Uint8Array, controlBytes: number): void {
  if (iovAddress === 0) {
    iovAddress = address(Deno.UnsafePointer.of(iov));
    setU64(msgWords, MSGHDR_iov >> 2, iovAddress);
    setU64(msgWords, MSGHDR_iovlen >> 2, 1);
  }
  if (controlBytes > control.length) {
    control = new Uint8Array(cmsgSpace(controlBytes));
    controlView = new DataView(control.buffer);
    controlAddress = 0;
  }
  if (controlAddress === 0) controlAddress = address(Deno.UnsafePointer.of(control));
  let base = addresses.get(bytes.buffer);
  if (base === undefined) {
    base = address(Deno.UnsafePointer.of(new Uint8Array(bytes.buffer)));
    addresses.set(bytes.buffer, base);
  }
  setU64(iovWords, 0, base + bytes.byteOffset);
  setU64(iovWords, 2, bytes.length);
  setU64(msgWords, MSGHDR_control >> 2, controlBytes === 0 ? 0 : controlAddress);
  setU64(msgWords, MSGHDR_controllen >> 2, controlBytes);
  msgView.setInt32(MSGHDR_flags, 0, true);
}

/**
 * Sends all of `bytes` with `fds` attached to the first byte (one SCM_RIGHTS control message);
 * sendmsg(2) with MSG_NOSIGNAL, so a closed peer is an EPIPE error, not a signal. A short send
 * continues without the fds, waiting with poll(2) if a non-blocking socket fills up midway.
 *
 * @example (needs `--allow-ffi`)
 * ```ts
 * import { close, recvMsg, sendMsg, socketPair } from "./unix_socket.ts";
 * import { eventfd } from "./eventfd.ts";
 * const [a, b] = socketPair();
 * const kick = eventfd();
 * sendMsg(a, new Uint8Array([1, 2, 3]), [kick]);
 * const got = recvMsg(b, new Uint8Array(64), 8);
 * if (got === null || got.bytes !== 3 || got.fds.length !== 1 || got.truncated) throw new Error();
 * for (const fd of [...got.fds, kick, a, b]) close(fd);
 * ```
 *
 * @returns `bytes.length`, or `null` when `fd` is non-blocking and nothing could be sent
 * @throws {BlockError} `io` with the errno (EPIPE/ECONNRESET: the peer is gone)
 */
export function sendMsg(fd: number, bytes: Uint8Array, fds: readonly number[] = []): number | null {
  if (bytes.length === 0) throw new RangeError("A message needs at least one byte to carry fds");
  if (fds.length > SCM_MAX_FD) {
    throw new RangeError(`At most ${SCM_MAX_FD} fds go in one message, got ${fds.length}`);
  }
  const c = libc();
  let sent = 0;
  let withFds = fds.length > 0;
  while (sent < bytes.length) {
    const rest = bytes.subarray(sent);
    if (withFds) {
      const dataBytes = 4 * fds.length;
      prepare(rest, cmsgSpace(dataBytes));
      control.fill(0, 0, cmsgSpace(dataBytes));
      controlView.setUint32(0, CMSGHDR_SIZE + dataBytes, true); // cmsg_len (size_t, high half 0)
      controlView.setInt32(8, SOL_SOCKET, true);
      controlView.setInt32(12, SCM_RIGHTS, true);
      for (let i = 0; i < fds.length; i++) {
        controlView.setInt32(CMSGHDR_SIZE + 4 * i, fds[i]!, true);
      }
    } else {
      prepare(rest, 0);
    }
    const n = c.sendmsg(fd, msg, MSG_NOSIGNAL);
    if (n >= 0) {
      sent += n;
      withFds = false;
      continue;
    }
    const code = errno();
    if (code === EINTR) continue;
    if (code !== EAGAIN) throw failed("sendmsg", code);
    if (sent === 0) return null;
    pollOne(fd, POLLOUT, -1);
  }
  return sent;
}

/** What {@linkcode recvMsg} received. */
export interface Received {
  /** Bytes stored at the start of the buffer; 0 with no fds means the peer closed. */
  readonly bytes: number;
  /** Descriptors that came with them (close-on-exec), in the order sent. */
  readonly fds: number[];
  /**
   * The kernel dropped some of it (MSG_CTRUNC: more fds than `maxFds`; MSG_TRUNC). The caller
   * should close `fds` and drop the connection: the stream is no longer in step.
   */
  readonly truncated: boolean;
}

/**
 * Receives into `buffer` (up to its length) and up to `maxFds` descriptors: recvmsg(2) with
 * MSG_CMSG_CLOEXEC. A stream socket may return fewer bytes than a message: the caller loops.
 *
 * @returns what arrived, or `null` when `fd` is non-blocking and nothing is there yet
 * @throws {BlockError} `io` with the errno
 */
export function recvMsg(fd: number, buffer: Uint8Array, maxFds = 0): Received | null {
  if (!Number.isInteger(maxFds) || maxFds < 0 || maxFds > SCM_MAX_FD) {
    throw new RangeError(`maxFds must be 0 to ${SCM_MAX_FD}, got ${maxFds}`);
  }
  if (buffer.length === 0) throw new RangeError("recvMsg needs a buffer of at least one byte");
  const c = libc();
  // CMSG_LEN, not CMSG_SPACE: the kernel installs as many fds as the length holds, and CMSG_SPACE
  // of an odd count has room for one more.
  const space = maxFds === 0 ? 0 : CMSGHDR_SIZE + 4 * maxFds;
  let n: number;
  for (;;) {
    prepare(buffer, space);
    n = c.recvmsg(fd, msg, MSG_CMSG_CLOEXEC);
    if (n >= 0) break;
    const code = errno();
    if (code === EAGAIN) return null;
    if (code !== EINTR) throw failed("recvmsg", code);
  }
  const flags = msgView.getInt32(MSGHDR_flags, true);
  const controlLength = msgView.getUint32(MSGHDR_controllen, true);
  const fds: number[] = [];
  let at = 0;
  while (at + CMSGHDR_SIZE <= controlLength) {
    const length = controlView.getUint32(at, true);
    if (length < CMSGHDR_SIZE) break;
    if (
      controlView.getInt32(at + 8, true) === SOL_SOCKET &&
      controlView.getInt32(at + 12, true) === SCM_RIGHTS
    ) {
      const count = (Math.min(length, controlLength - at) - CMSGHDR_SIZE) >> 2;
      for (let i = 0; i < count; i++) {
        fds.push(controlView.getInt32(at + CMSGHDR_SIZE + 4 * i, true));
      }
    }
    at += (length + 7) & ~7;
  }
  return { bytes: n, fds, truncated: (flags & (MSG_CTRUNC | MSG_TRUNC)) !== 0 };
}

let pollfds = new Uint8Array(POLLFD_SIZE * 8);
let pollView = new DataView(pollfds.buffer);

function fillPollfds(fds: readonly number[], events: number): void {
  if (fds.length * POLLFD_SIZE > pollfds.length) {
    pollfds = new Uint8Array(fds.length * POLLFD_SIZE);
    pollView = new DataView(pollfds.buffer);
  }
  for (let i = 0; i < fds.length; i++) {
    pollView.setInt32(i * POLLFD_SIZE, fds[i]!, true);
    pollView.setInt16(i * POLLFD_SIZE + 4, events, true);
    pollView.setInt16(i * POLLFD_SIZE + 6, 0, true);
  }
}

function readyFds(fds: readonly number[], view: DataView): number[] {
  const ready: number[] = [];
  for (let i = 0; i < fds.length; i++) {
    if (view.getInt16(i * POLLFD_SIZE + 6, true) !== 0) ready.push(fds[i]!);
  }
  return ready;
}

function pollOne(fd: number, events: number, timeoutMs: number): void {
  fillPollfds([fd], events);
  while (libc().poll(pollfds, 1n, timeoutMs) < 0) {
    const code = errno();
    if (code !== EINTR) throw failed("poll", code);
  }
}

/**
 * Waits until some of `fds` are readable — or hung up, in error, or not open, which a read then
 * reports — or `timeoutMs` passes (-1: no limit; 0: just look). poll(2); blocks this thread, so
 * the main thread should use {@linkcode waitReadableAsync}. An interrupted wait returns `[]`.
 *
 * @returns the fds that are ready, in the order given; `[]` on timeout
 */
export function waitReadable(fds: readonly number[], timeoutMs: number): number[] {
  fillPollfds(fds, POLLIN);
  const n = libc().poll(pollfds, BigInt(fds.length), timeoutMs);
  if (n < 0) {
    const code = errno();
    if (code === EINTR) return [];
    throw failed("poll", code);
  }
  return n === 0 ? [] : readyFds(fds, pollView);
}

/**
 * {@linkcode waitReadable} on Deno's blocking pool, leaving this thread's event loop free (costs
 * tens of µs: for accepting connections, not per request). errno of a failure is not readable
 * from here, so a failed poll(2) throws without one.
 */
export async function waitReadableAsync(
  fds: readonly number[],
  timeoutMs: number,
): Promise<number[]> {
  const table = new Uint8Array(Math.max(1, fds.length) * POLLFD_SIZE);
  const view = new DataView(table.buffer);
  for (let i = 0; i < fds.length; i++) {
    view.setInt32(i * POLLFD_SIZE, fds[i]!, true);
    view.setInt16(i * POLLFD_SIZE + 4, POLLIN, true);
  }
  const n = await libc().poll_async(table, BigInt(fds.length), timeoutMs);
  if (n < 0) throw new BlockError("io", "poll failed (errno unknown on the blocking pool)");
  return n === 0 ? [] : readyFds(fds, view);
}
