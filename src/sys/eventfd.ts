/**
 * eventfd(2) counters and epoll(7) sets: the kick and call notifications of vhost-user, and the
 * waits of the Workers that serve them. See eventfd(2), epoll_create(2), epoll_ctl(2),
 * epoll_wait(2).
 *
 * Descriptors are plain numbers, process-wide: one made on the main thread may be written or
 * waited on from any Worker (each Worker loads libc itself through `libc.ts`; this module's
 * scratch buffers are per Worker too). Failures throw a `BlockError` naming the call and errno;
 * "would block" (EAGAIN) on a non-blocking eventfd is a result, not an error.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { EAGAIN, EINTR, errno, libc } from "./libc.ts";
import { errnoText } from "./uring.ts";

/** eventfd(2) flags. */
export const EFD_SEMAPHORE = 1;
export const EFD_NONBLOCK = 0o4000;
export const EFD_CLOEXEC = 0o2000000;
/** epoll_create1(2) flag. */
export const EPOLL_CLOEXEC = 0o2000000;
/** epoll_ctl(2) operations. */
const EPOLL_CTL_ADD = 1;
const EPOLL_CTL_DEL = 2;
const EPOLL_CTL_MOD = 3;
/** epoll event bits (<sys/epoll.h>). */
export const EPOLLIN = 0x1;
export const EPOLLOUT = 0x4;
export const EPOLLERR = 0x8;
export const EPOLLHUP = 0x10;
export const EPOLLRDHUP = 0x2000;
export const EPOLLET = 0x80000000;
/**
 * struct epoll_event is packed on x86_64: events u32 @0, data u64 @4; 12 bytes. This module
 * keeps the data's low 32 bits (the caller's u32 tag) and writes the high half as 0.
 */
export const EPOLL_EVENT_SIZE = 12;
export const EPOLL_EVENT_events = 0;
export const EPOLL_EVENT_data = 4;

const TWO_32 = 4294967296;
const EIGHT = 8n;

function failed(call: string, code: number): BlockError {
  return new BlockError("io", `${call}: ${errnoText(code)}`, { errno: code });
}

/** This thread's 8-byte counter buffer for read/write. */
const counter = new Uint8Array(8);
const counterWords = new Uint32Array(counter.buffer);

/**
 * A new eventfd counter starting at `initval`.
 *
 * @param flags `EFD_CLOEXEC` (default), `EFD_NONBLOCK`, `EFD_SEMAPHORE`, or'ed
 * @returns the fd
 */
export function eventfd(initval = 0, flags = EFD_CLOEXEC): number {
  if (!Number.isInteger(initval) || initval < 0 || initval >= TWO_32) {
    throw new RangeError(`An eventfd starts at 0 to 2^32-1, got ${initval}`);
  }
  const fd = libc().eventfd(initval, flags);
  if (fd < 0) throw failed("eventfd", errno());
  return fd;
}

/**
 * Reads and resets the counter (with EFD_SEMAPHORE: takes 1). A blocking eventfd waits for a
 * non-zero counter; a non-blocking one returns 0 when it is zero (a read never yields 0
 * otherwise). Counters above 2^53 lose precision (they never get there from writes of 1).
 *
 * @returns the counter's value before the read, or 0 for "nothing yet" on a non-blocking fd
 *
 * @example (needs `--allow-ffi`)
 * ```ts
 * import { EFD_CLOEXEC, EFD_NONBLOCK, eventfd, eventfdRead, eventfdWrite } from "./eventfd.ts";
 * import { close } from "./unix_socket.ts";
 * const fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
 * eventfdWrite(fd, 2);
 * eventfdWrite(fd, 3);
 * if (eventfdRead(fd) !== 5 || eventfdRead(fd) !== 0) throw new Error("counter");
 * close(fd);
 * ```
 */
export function eventfdRead(fd: number): number {
  const c = libc();
  for (;;) {
    if (c.read(fd, counter, EIGHT) === 8) {
      return counterWords[0]! + counterWords[1]! * TWO_32;
    }
    const code = errno();
    if (code === EAGAIN) return 0;
    if (code !== EINTR) throw failed("eventfd read", code);
  }
}

/**
 * Adds `n` (default 1) to the counter, waking its readers and pollers.
 *
 * @returns `true`, or `false` when the fd is non-blocking and the counter would overflow
 */
export function eventfdWrite(fd: number, n = 1): boolean {
  if (!Number.isSafeInteger(n) || n <= 0) {
    throw new RangeError(`An eventfd write adds a positive integer, got ${n}`);
  }
  counterWords[0] = n >>> 0;
  counterWords[1] = Math.floor(n / TWO_32);
  const c = libc();
  for (;;) {
    if (c.write(fd, counter, EIGHT) === 8) return true;
    const code = errno();
    if (code === EAGAIN) return false;
    if (code !== EINTR) throw failed("eventfd write", code);
  }
}

/** A new epoll set (close-on-exec). */
export function epollCreate(flags = EPOLL_CLOEXEC): number {
  const fd = libc().epoll_create1(flags);
  if (fd < 0) throw failed("epoll_create1", errno());
  return fd;
}

const ctlEvent = new Uint8Array(EPOLL_EVENT_SIZE);
const ctlWords = new Uint32Array(ctlEvent.buffer);

function ctl(call: string, epfd: number, op: number, fd: number, events: number, data: number) {
  ctlWords[0] = events >>> 0;
  ctlWords[1] = data >>> 0;
  ctlWords[2] = 0;
  if (libc().epoll_ctl(epfd, op, fd, ctlEvent) < 0) throw failed(call, errno());
}

/**
 * Watches `fd` in the set for `events` (EPOLLIN, ...); {@linkcode epollWait} reports it with
 * `data`, a u32 the caller chooses (a queue index, say).
 */
export function epollAdd(epfd: number, fd: number, events: number, data: number): void {
  ctl("epoll_ctl ADD", epfd, EPOLL_CTL_ADD, fd, events, data);
}

/** Changes the events and data of a watched `fd`. */
export function epollMod(epfd: number, fd: number, events: number, data: number): void {
  ctl("epoll_ctl MOD", epfd, EPOLL_CTL_MOD, fd, events, data);
}

/** Stops watching `fd` (closing `fd` does that too, once no other fd refers to its file). */
export function epollDel(epfd: number, fd: number): void {
  ctl("epoll_ctl DEL", epfd, EPOLL_CTL_DEL, fd, 0, 0);
}

/** One ready descriptor: what happened (EPOLL* bits) and the data given to epollAdd. */
export interface EpollEvent {
  readonly events: number;
  readonly data: number;
}

/** This thread's epoll_event array, grown to the largest maxEvents asked. */
let waitEvents = new Uint8Array(EPOLL_EVENT_SIZE * 16);
let waitWords = new Uint32Array(waitEvents.buffer);

/**
 * Waits up to `timeoutMs` (-1: no limit, 0: just look) for events into `out`, without allocating:
 * event i is `out[2i]` (EPOLL* bits) and `out[2i+1]` (its data); at most `out.length / 2` events.
 * An interrupted wait (EINTR) returns 0, like a timeout.
 *
 * @returns how many events were stored
 */
export function epollWaitInto(epfd: number, out: Uint32Array, timeoutMs: number): number {
  const maxEvents = out.length >> 1;
  if (maxEvents === 0) throw new RangeError("epollWaitInto needs room for one event");
  if (maxEvents * EPOLL_EVENT_SIZE > waitEvents.length) {
    waitEvents = new Uint8Array(maxEvents * EPOLL_EVENT_SIZE);
    waitWords = new Uint32Array(waitEvents.buffer);
  }
  const n = libc().epoll_wait(epfd, waitEvents, maxEvents, timeoutMs);
  if (n < 0) {
    const code = errno();
    if (code === EINTR) return 0;
    throw failed("epoll_wait", code);
  }
  for (let i = 0; i < n; i++) {
    out[2 * i] = waitWords[3 * i]!;
    out[2 * i + 1] = waitWords[3 * i + 1]!;
  }
  return n;
}

/** The pairs epollWait reads into (remade only when maxEvents changes). */
let waitOut = new Uint32Array(2);

/**
 * {@linkcode epollWaitInto} returning the events as objects (the only allocation is the result).
 *
 * @returns the ready events; `[]` on timeout or interruption
 */
export function epollWait(epfd: number, maxEvents: number, timeoutMs: number): EpollEvent[] {
  if (!Number.isInteger(maxEvents) || maxEvents <= 0) {
    throw new RangeError(`epollWait needs a positive maxEvents, got ${maxEvents}`);
  }
  if (waitOut.length !== 2 * maxEvents) waitOut = new Uint32Array(2 * maxEvents);
  const out = waitOut;
  const n = epollWaitInto(epfd, out, timeoutMs);
  const events: EpollEvent[] = [];
  for (let i = 0; i < n; i++) events.push({ events: out[2 * i]!, data: out[2 * i + 1]! });
  return events;
}
