/**
 * An NBD export as a host file: the client side of the NBD protocol, so any image layer (raw,
 * qcow2, a backing file) and any verb opens `nbd://HOST[:PORT]/EXPORT`,
 * `nbd+unix:///EXPORT?socket=PATH` or QEMU's older `nbd:HOST:PORT[:exportname=NAME]` and
 * `nbd:unix:PATH[:exportname=NAME]` as it opens a file — qemu-img's nbd driver, in short.
 *
 * The handshake is fixed newstyle: structured replies and `base:allocation` when the server has
 * them (holes arrive as OFFSET_HOLE chunks, {@linkcode NbdFile.dataStatus} asks BLOCK_STATUS),
 * then GO (EXPORT_NAME with a server that lacks it) with the block sizes the server asks for
 * honoured: requests are split at its maximum and unaligned ones widened (reads) or read, patched
 * and written (writes). Calls are synchronous, as the other host files' are: each sends its
 * request and waits for the reply, at most `timeoutMs` at a time for a server that stopped
 * answering. Everything the server sends is checked before it is used.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { isConnectionLoss, StreamSocket } from "../sys/inet_socket.ts";
import { type HostExtent, type HostFile, zeroPastEnd } from "./host_file.ts";
import * as P from "./nbd_protocol.ts";

/** Where an NBD URI points. */
export type NbdTarget =
  | {
    readonly transport: "tcp";
    readonly host: string;
    readonly port: number;
    readonly name: string;
  }
  | { readonly transport: "unix"; readonly path: string; readonly name: string };

/** True for the names {@linkcode parseNbdUri} takes. */
export function isNbdUri(text: string): boolean {
  return /^nbd(\+tcp|\+unix)?:/.test(text);
}

function bad(uri: string, why: string): BlockError {
  return new BlockError("invalid-argument", `Invalid NBD URI '${uri}': ${why}`, { path: uri });
}

function port(uri: string, text: string): number {
  const n = Number(text);
  if (!/^[0-9]{1,5}$/.test(text) || n > 65535) throw bad(uri, `port '${text}'`);
  return n;
}

/**
 * Parses QEMU's NBD names: `nbd[+tcp]://HOST[:PORT][/EXPORT]`, `nbd+unix:///[EXPORT]?socket=PATH`,
 * `nbd:HOST:PORT[:exportname=NAME]`, `nbd:unix:PATH[:exportname=NAME]`.
 *
 * @throws {BlockError} `invalid-argument` naming what is wrong
 */
export function parseNbdUri(uri: string): NbdTarget {
  if (uri.startsWith("nbd:") && !uri.startsWith("nbd://")) {
    // The pre-URI syntax.
    const rest = uri.slice(4);
    const at = rest.indexOf(":exportname=");
    const name = at < 0 ? "" : rest.slice(at + 12);
    const where = at < 0 ? rest : rest.slice(0, at);
    if (where.startsWith("unix:")) {
      if (where.length === 5) throw bad(uri, "no socket path");
      return { transport: "unix", path: where.slice(5), name };
    }
    const colon = where.lastIndexOf(":");
    if (colon <= 0) throw bad(uri, "expected nbd:HOST:PORT or nbd:unix:PATH");
    return {
      transport: "tcp",
      host: where.slice(0, colon).replace(/^\[(.*)\]$/, "$1"),
      port: port(uri, where.slice(colon + 1)),
      name,
    };
  }
  // The URL parser's own error for a bad port says only "invalid URL".
  const portText = /^[a-z+]+:\/\/(?:\[[^\]]*\]|[^/?#:]*):([^/?#]*)/.exec(uri)?.[1];
  if (portText !== undefined && portText !== "") port(uri, portText);
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    throw bad(uri, "not a URI");
  }
  const name = decodeURIComponent(url.pathname.replace(/^\//, ""));
  const params = [...url.searchParams.keys()];
  if (url.protocol === "nbd+unix:") {
    const socket = url.searchParams.get("socket");
    if (url.host !== "") throw bad(uri, "a unix socket URI has no host");
    if (socket === null || socket === "") throw bad(uri, "no ?socket=PATH");
    const other = params.find((k) => k !== "socket");
    if (other !== undefined) throw bad(uri, `unsupported parameter '${other}'`);
    return { transport: "unix", path: socket, name };
  }
  if (url.protocol !== "nbd:" && url.protocol !== "nbd+tcp:") {
    throw bad(uri, `unknown transport '${url.protocol.slice(0, -1)}'`);
  }
  if (params.length > 0) throw bad(uri, `unsupported parameter '${params[0]}'`);
  if (url.hostname === "") throw bad(uri, "no host");
  return {
    transport: "tcp",
    host: url.hostname.replace(/^\[(.*)\]$/, "$1"),
    port: url.port === "" ? P.NBD_DEFAULT_PORT : port(uri, url.port),
    name,
  };
}

/**
 * The name QEMU gives an NBD node (block/nbd.c's nbd_refresh_filename), which qemu-img info
 * prints whatever form the user wrote: `nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT`,
 * without the `/EXPORT` for the empty name.
 */
export function canonicalNbdName(target: NbdTarget): string {
  const name = target.name === "" ? undefined : target.name;
  if (target.transport === "unix") {
    return name === undefined
      ? `nbd+unix://?socket=${target.path}`
      : `nbd+unix:///${name}?socket=${target.path}`;
  }
  const base = `nbd://${target.host}:${target.port}`;
  return name === undefined ? base : `${base}/${name}`;
}

/** Options of {@linkcode NbdFile.open}. */
export interface NbdOpenOptions {
  readonly readOnly?: boolean;
  /** The longest wait for the server at any one point (default 60 s). */
  readonly timeoutMs?: number;
  /**
   * QEMU's `reconnect-delay` in ms: a connection lost while in use is made again (the export
   * must be the same size) for up to this long, and the requests it carried are sent again;
   * callers wait meanwhile. 0 (the default): a lost connection fails its requests.
   */
  readonly reconnectDelayMs?: number;
  /** QEMU's `open-timeout` in ms: the first connection is retried for up to this long. */
  readonly openTimeoutMs?: number;
}

/** Waits `ms` on this thread (the client's calls are synchronous). */
function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/** Time between attempts to connect while a reconnect or open timeout runs. */
const RETRY_MS = 200;

/** A request sent and not yet answered in full. */
interface Pending {
  readonly what: string;
  readonly offset: number;
  /** A READ's buffer. */
  readonly into: Uint8Array | undefined;
  /** A BLOCK_STATUS's extents of base:allocation. */
  readonly extent: ((length: number, flags: number) => void) | undefined;
  /** Bytes of `into` the reply has filled. */
  covered: number;
  failure: BlockError | undefined;
  done: boolean;
  /** An async request's waiter. */
  settle: (() => void) | undefined;
  /** What was sent (header and payload), to send again after a reconnect. */
  readonly parts: Uint8Array[];
}

/** How long the async reply pump looks at the socket at a time. */
const PUMP_LOOK_MS = 200;
/** Requests outstanding at once (QEMU's client and server both keep to 16). */
const MAX_IN_FLIGHT = 16;
/** Replies larger than this are a broken server (the largest request is 32 MiB). */
const MAX_CHUNK_PAYLOAD = P.NBD_MAX_BUFFER_SIZE + 1024;
/** Option replies larger than this are a broken server. */
const MAX_OPTION_REPLY = 64 * 1024;
const OLDSTYLE_MAGIC = 0x00420281861253n;

/** An NBD export opened as a host file. */
export class NbdFile implements HostFile {
  readonly path: string;
  readonly readOnly: boolean;
  /** The server's storage is its own business: allocatedSize() cannot say. */
  readonly knowsAllocation = false;
  #socket: StreamSocket;
  readonly #target: NbdTarget;
  readonly #timeoutMs: number;
  readonly #reconnectMs: number;
  #size = 0;
  #flags = 0;
  #structured = false;
  /** The id of base:allocation, or -1 when the server has no such context. */
  #allocationId = -1;
  #minBlock = 1;
  #maxBlock = P.NBD_MAX_BUFFER_SIZE;
  #cookie = 1n;
  #closed = false;
  /** Requests sent and not yet answered in full, by cookie. */
  readonly #pending = new Map<bigint, Pending>();
  /** Async requests waiting for room (MAX_IN_FLIGHT). */
  #roomWaiters: (() => void)[] = [];
  /** A reader of replies for async requests is running. */
  #pumping = false;
  /** Why the connection can no longer be used. */
  #broken: BlockError | undefined;
  /** Async writes not yet answered (flushAsync waits for them). */
  readonly #writesInFlight = new Set<Promise<void>>();

  private constructor(
    path: string,
    target: NbdTarget,
    socket: StreamSocket,
    readOnly: boolean,
    timeoutMs: number,
    reconnectMs: number,
  ) {
    this.path = path;
    this.#target = target;
    this.#socket = socket;
    this.readOnly = readOnly;
    this.#timeoutMs = timeoutMs;
    this.#reconnectMs = reconnectMs;
  }

  static #connect(target: NbdTarget, timeoutMs: number): StreamSocket {
    return target.transport === "tcp"
      ? StreamSocket.tcp(target.host, target.port, timeoutMs)
      : StreamSocket.unix(target.path, timeoutMs);
  }

  /**
   * Connects to the export `uri` names and negotiates.
   *
   * @throws {BlockError} `invalid-argument` for a bad URI, `not-found` for an export the server
   *   does not have, `read-only` for a writable open of a read-only export, `io` for anything
   *   that goes wrong on the way (each naming the server)
   */
  static open(uri: string, opts: NbdOpenOptions = {}): NbdFile {
    const target = parseNbdUri(uri);
    const timeout = opts.timeoutMs ?? 60_000;
    const deadline = performance.now() + (opts.openTimeoutMs ?? 0);
    let socket: StreamSocket;
    for (;;) {
      try {
        socket = NbdFile.#connect(target, timeout);
        break;
      } catch (e) {
        if (performance.now() >= deadline) throw e;
        sleepSync(RETRY_MS);
      }
    }
    const file = new NbdFile(
      uri,
      target,
      socket,
      opts.readOnly ?? false,
      timeout,
      opts.reconnectDelayMs ?? 0,
    );
    try {
      file.#negotiate(target.name);
    } catch (e) {
      file.#goodbye();
      socket.close();
      throw e;
    }
    return file;
  }

  #fail(message: string, kind: "io" | "not-found" | "read-only" | "unsupported" = "io") {
    return new BlockError(kind, `${this.#socket.peer}: ${message}`, { path: this.path });
  }

  #recv(n: number): Uint8Array {
    const b = new Uint8Array(n);
    this.#socket.recvExact(b);
    return b;
  }

  // ---- handshake ----

  /** Where the handshake is: what a polite goodbye is depends on it. */
  #phase: "greeting" | "options" | "transmission" = "greeting";

  /**
   * Leaves a connection that will not be used, as the phase wants: nothing before the client
   * flags went out, ABORT among the options, DISC once transmission began.
   */
  #goodbye(): void {
    try {
      if (this.#phase === "options") {
        const header = new Uint8Array(P.OPTION_HEADER_SIZE);
        const h = new DataView(header.buffer);
        h.setBigUint64(0, P.NBD_OPTS_MAGIC);
        h.setUint32(8, P.NBD_OPT_ABORT);
        this.#socket.sendAll([header]);
      } else if (this.#phase === "transmission") {
        this.#socket.sendAll([P.encodeRequest(P.NBD_CMD_DISC, 0, this.#cookie++, 0, 0)]);
      }
    } catch {
      // The server is gone or never was: nothing to be polite to.
    }
  }

  #negotiate(name: string): void {
    const hello = new DataView(this.#recv(18).buffer);
    if (hello.getBigUint64(0) !== P.NBD_MAGIC) throw this.#fail("not an NBD server (bad magic)");
    const second = hello.getBigUint64(8);
    if (second === OLDSTYLE_MAGIC) {
      throw this.#fail("the server speaks oldstyle NBD, which is not supported");
    }
    if (second !== P.NBD_OPTS_MAGIC) throw this.#fail("bad handshake magic");
    const serverFlags = hello.getUint16(16);
    if ((serverFlags & P.NBD_FLAG_FIXED_NEWSTYLE) === 0) {
      throw this.#fail("the server lacks fixed newstyle negotiation");
    }
    const noZeroes = (serverFlags & P.NBD_FLAG_NO_ZEROES) !== 0;
    this.#socket.sendAll([
      new P.WireWriter().u32(
        P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0),
      ).done(),
    ]);
    this.#phase = "options";
    this.#structured = this.#option(P.NBD_OPT_STRUCTURED_REPLY, new Uint8Array(0), () => {})
      .type === P.NBD_REP_ACK;
    if (this.#structured) this.#setMetaContext(name);
    this.#go(name, noZeroes);
    this.#phase = "transmission";
    if (!this.readOnly && (this.#flags & P.NBD_FLAG_READ_ONLY) !== 0) {
      throw this.#fail(`export '${name}' is read-only`, "read-only");
    }
  }

  /**
   * Sends an option and reads its replies up to the final one (ACK or an error), handing the
   * others to `each`. Returns the final reply's type and data.
   */
  #option(
    option: number,
    data: Uint8Array,
    each: (type: number, data: Uint8Array) => void,
  ): { type: number; data: Uint8Array } {
    const header = new Uint8Array(P.OPTION_HEADER_SIZE);
    const h = new DataView(header.buffer);
    h.setBigUint64(0, P.NBD_OPTS_MAGIC);
    h.setUint32(8, option);
    h.setUint32(12, data.length);
    this.#socket.sendAll([header, data]);
    for (let replies = 0; replies < 100_000; replies++) {
      const r = new DataView(this.#recv(20).buffer);
      if (r.getBigUint64(0) !== P.NBD_REP_MAGIC) throw this.#fail("bad option reply magic");
      if (r.getUint32(8) !== option) {
        throw this.#fail(`a reply to option ${r.getUint32(8)} while ${option} was asked`);
      }
      const type = r.getUint32(12);
      const length = r.getUint32(16);
      if (length > MAX_OPTION_REPLY) throw this.#fail(`an option reply of ${length} bytes`);
      const body = this.#recv(length);
      if (type === P.NBD_REP_ACK || type >= 2 ** 31) return { type, data: body };
      each(type, body);
    }
    throw this.#fail("endless option replies");
  }

  #setMetaContext(name: string): void {
    const query = new P.WireWriter().string32(name).u32(1).string32(P.CONTEXT_BASE_ALLOCATION)
      .done();
    const end = this.#option(P.NBD_OPT_SET_META_CONTEXT, query, (type, body) => {
      if (type !== P.NBD_REP_META_CONTEXT || body.length < 4) return;
      const ctx = new TextDecoder().decode(body.subarray(4));
      if (ctx === P.CONTEXT_BASE_ALLOCATION) {
        this.#allocationId = new DataView(body.buffer, body.byteOffset).getUint32(0);
      }
    });
    // An error here (an unknown export among them) is reported by GO next.
    if (end.type !== P.NBD_REP_ACK) this.#allocationId = -1;
  }

  #go(name: string, noZeroes: boolean): void {
    const request = new P.WireWriter().string32(name).u16(1).u16(P.NBD_INFO_BLOCK_SIZE).done();
    let gotExport = false;
    const end = this.#option(P.NBD_OPT_GO, request, (type, body) => {
      if (type !== P.NBD_REP_INFO || body.length < 2) return;
      const v = new DataView(body.buffer, body.byteOffset, body.length);
      const info = v.getUint16(0);
      if (info === P.NBD_INFO_EXPORT) {
        if (body.length !== 12) throw this.#fail("a malformed NBD_INFO_EXPORT");
        this.#setExport(Number(v.getBigUint64(2)), v.getUint16(10));
        gotExport = true;
      } else if (info === P.NBD_INFO_BLOCK_SIZE) {
        if (body.length !== 14) throw this.#fail("a malformed NBD_INFO_BLOCK_SIZE");
        this.#setBlockSizes(v.getUint32(2), v.getUint32(6), v.getUint32(10));
      }
    });
    if (end.type === P.NBD_REP_ACK) {
      if (!gotExport) throw this.#fail("GO ended without the export's size");
      return;
    }
    const message = new TextDecoder().decode(end.data);
    if (end.type === P.NBD_REP_ERR_UNKNOWN) {
      throw this.#fail(
        `export '${name}' not available${message === "" ? "" : ` (the server says: ${message})`}`,
        "not-found",
      );
    }
    if (end.type !== P.NBD_REP_ERR_UNSUP) {
      throw this.#fail(`GO refused (${end.type - 2 ** 31}): ${message}`);
    }
    // A server without GO: the old way, which has no error reply (it closes on a bad name).
    const header = new Uint8Array(P.OPTION_HEADER_SIZE);
    const h = new DataView(header.buffer);
    h.setBigUint64(0, P.NBD_OPTS_MAGIC);
    h.setUint32(8, P.NBD_OPT_EXPORT_NAME);
    const nameBytes = new TextEncoder().encode(name);
    h.setUint32(12, nameBytes.length);
    this.#socket.sendAll([header, nameBytes]);
    const r = new DataView(this.#recv(10).buffer);
    this.#setExport(Number(r.getBigUint64(0)), r.getUint16(8));
    if (!noZeroes) this.#recv(124);
    this.#structured = false;
    this.#allocationId = -1;
  }

  #setExport(size: number, flags: number): void {
    if (!Number.isSafeInteger(size)) throw this.#fail(`an export size of ${size} bytes`);
    this.#size = size;
    this.#flags = flags;
  }

  #setBlockSizes(min: number, preferred: number, max: number): void {
    const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
    if (!pow2(min) || min > 65536 || preferred < min || max < min) {
      throw this.#fail(`block sizes ${min}/${preferred}/${max} that make no sense`);
    }
    this.#minBlock = min;
    // The largest request: the server's, within what this side buffers.
    this.#maxBlock = Math.max(min, Math.min(max, P.NBD_MAX_BUFFER_SIZE) - (max % min));
  }

  // ---- transmission ----

  #live(): void {
    if (this.#closed) throw this.#fail("the export is closed");
    if (this.#broken !== undefined) throw this.#broken;
  }

  /** Reads replies until nothing is in flight (what a synchronous call that writes waits for). */
  #drain(): void {
    while (this.#pending.size > 0) this.#readMessage();
  }

  /**
   * Sends one request, registered by its cookie so that whoever reads the socket next can hand
   * its reply over (replies come in any order, chunks of different replies interleaved). At most
   * MAX_IN_FLIGHT are outstanding: a synchronous caller reads replies until there is room.
   */
  #start(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Uint8Array,
    into?: Uint8Array,
    extent?: (length: number, flags: number) => void,
  ): Pending {
    this.#live();
    while (this.#pending.size >= MAX_IN_FLIGHT) this.#readMessage();
    const cookie = this.#cookie++;
    const p: Pending = {
      what: `${P.commandName(type)} of ${length} bytes at ${offset}`,
      offset,
      into,
      extent,
      covered: 0,
      failure: undefined,
      done: false,
      settle: undefined,
      parts: [],
    };
    this.#pending.set(cookie, p);
    const header = P.encodeRequest(type, flags, cookie, offset, length);
    p.parts.push(header);
    if (payload !== undefined) p.parts.push(payload);
    try {
      this.#socket.sendAll(p.parts, () => this.#readMessage());
    } catch (e) {
      // A lost connection made again sends every request in flight, this one included.
      if (!this.#lost(e)) {
        this.#breakAll(e);
        throw e;
      }
    }
    return p;
  }

  /** A request, its reply read before this returns. */
  #request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Uint8Array,
    into?: Uint8Array,
    extent?: (length: number, flags: number) => void,
  ): void {
    const p = this.#start(type, flags, offset, length, payload, into, extent);
    while (!p.done) this.#readMessage();
    this.#finish(p);
  }

  /** A request whose reply the socket's pump hands over, many in flight at once. */
  async #requestAsync(
    type: number,
    offset: number,
    length: number,
    payload?: Uint8Array,
    into?: Uint8Array,
  ): Promise<void> {
    while (this.#pending.size >= MAX_IN_FLIGHT) {
      await new Promise<void>((resolve) => this.#roomWaiters.push(resolve));
      this.#live();
    }
    const p = this.#start(type, 0, offset, length, payload, into);
    const settled = new Promise<void>((resolve, reject) => {
      p.settle = () => {
        try {
          this.#finish(p);
          resolve();
        } catch (e) {
          reject(e);
        }
      };
    });
    if (p.done) p.settle!();
    else this.#pump();
    return await settled;
  }

  /** While async requests wait, reads replies as they come, without holding the thread. */
  #pump(): void {
    if (this.#pumping) return;
    this.#pumping = true;
    (async () => {
      try {
        // Short looks, so a pump with nothing left to wait for ends soon (a synchronous call may
        // have read the replies meanwhile); a server silent for the whole timeout is dead.
        let heard = performance.now();
        while (this.#pending.size > 0 && !this.#closed) {
          if (!await this.#socket.waitReadable(PUMP_LOOK_MS)) {
            if (this.#pending.size > 0 && performance.now() - heard > this.#socket.timeoutMs) {
              throw this.#fail(
                `no answer in ${this.#socket.timeoutMs / 1000} s while waiting for a reply`,
              );
            }
            continue;
          }
          heard = performance.now();
          while (this.#pending.size > 0 && !this.#closed && this.#socket.readable()) {
            this.#readMessage();
          }
        }
      } catch (e) {
        this.#breakAll(e);
      } finally {
        this.#pumping = false;
      }
    })();
  }

  /** The request's outcome: its error, or a READ the reply did not cover. */
  #finish(p: Pending): void {
    if (p.failure !== undefined) throw p.failure;
    if (p.into !== undefined && p.covered !== p.into.length) {
      throw this.#fail(`a READ reply covering ${p.covered} of ${p.into.length} bytes`);
    }
  }

  /** Request `p` is answered: off the books, its waiter told, room made. */
  #done(cookie: bigint, p: Pending): void {
    p.done = true;
    this.#pending.delete(cookie);
    p.settle?.();
    const waiters = this.#roomWaiters;
    this.#roomWaiters = [];
    for (const wake of waiters) wake();
  }

  /** The connection cannot go on (a broken reply, a dead socket): every request fails with `e`. */
  #breakAll(e: unknown): void {
    const error = e instanceof BlockError ? e : this.#fail(String(e));
    this.#broken ??= error;
    for (const [cookie, p] of [...this.#pending]) {
      p.failure ??= error;
      this.#done(cookie, p);
    }
  }

  /** Reads one simple reply or one structured chunk and hands it to its request. */
  #readMessage(): void {
    if (this.#broken !== undefined) throw this.#broken;
    try {
      this.#dispatch();
    } catch (e) {
      if (this.#lost(e)) return;
      this.#breakAll(e);
      throw e;
    }
  }

  /**
   * With a reconnect delay, a lost connection is made again and every request in flight sent
   * again: true when that worked (the caller goes on), false when `e` is something else. When
   * the delay runs out every request fails with the loss.
   */
  #lost(e: unknown): boolean {
    if (this.#reconnectMs <= 0 || !isConnectionLoss(e) || this.#closed) return false;
    const deadline = performance.now() + this.#reconnectMs;
    const size = this.#size;
    this.#socket.close();
    for (;;) {
      try {
        this.#socket = NbdFile.#connect(this.#target, this.#timeoutMs);
        this.#phase = "greeting";
        this.#negotiate(this.#target.name);
        if (this.#size !== size) {
          throw this.#fail(`the export is ${this.#size} bytes after a reconnect, was ${size}`);
        }
        break;
      } catch (again) {
        this.#socket.close();
        if (performance.now() >= deadline) {
          const error = this.#fail(
            `the connection was lost and not made again in ${this.#reconnectMs / 1000} s: ${
              (again as Error).message
            }`,
          );
          this.#breakAll(error);
          throw error;
        }
        sleepSync(RETRY_MS);
      }
    }
    // Everything in flight goes again (a READ refills its buffer from the start).
    for (const p of this.#pending.values()) {
      p.covered = 0;
      p.failure = undefined;
      this.#socket.sendAll(p.parts, () => this.#readMessage());
    }
    return true;
  }

  #dispatch(): void {
    const magic = new DataView(this.#recv(4).buffer).getUint32(0);
    if (magic === P.NBD_SIMPLE_REPLY_MAGIC) {
      const rest = new DataView(this.#recv(12).buffer);
      const cookie = rest.getBigUint64(4);
      const p = this.#pending.get(cookie);
      if (p === undefined) throw this.#fail("a reply for no request in flight");
      const error = rest.getUint32(0);
      if (error !== 0) p.failure = this.#requestFailed(p.what, error, "");
      else if (p.into !== undefined) {
        this.#socket.recvExact(p.into);
        p.covered = p.into.length;
      }
      return this.#done(cookie, p);
    }
    if (magic !== P.NBD_STRUCTURED_REPLY_MAGIC || !this.#structured) {
      throw this.#fail(`bad reply magic 0x${magic.toString(16)}`);
    }
    const h = new DataView(this.#recv(16).buffer);
    const chunkFlags = h.getUint16(0);
    const chunkType = h.getUint16(2);
    const cookie = h.getBigUint64(4);
    const p = this.#pending.get(cookie);
    if (p === undefined) throw this.#fail("a reply chunk for no request in flight");
    const size = h.getUint32(12);
    if (size > MAX_CHUNK_PAYLOAD) throw this.#fail(`a reply chunk of ${size} bytes`);
    const done = (chunkFlags & P.NBD_REPLY_FLAG_DONE) !== 0;
    const into = p.into;
    if (chunkType === P.NBD_REPLY_TYPE_OFFSET_DATA && into !== undefined) {
      if (size < 8) throw this.#fail("a short OFFSET_DATA chunk");
      const at = Number(new DataView(this.#recv(8).buffer).getBigUint64(0)) - p.offset;
      const n = size - 8;
      if (at < 0 || at + n > into.length) throw this.#fail("data outside the read");
      this.#socket.recvExact(into.subarray(at, at + n));
      p.covered += n;
    } else if (chunkType === P.NBD_REPLY_TYPE_OFFSET_HOLE && into !== undefined) {
      if (size !== 12) throw this.#fail("a malformed OFFSET_HOLE chunk");
      const v = new DataView(this.#recv(12).buffer);
      const at = Number(v.getBigUint64(0)) - p.offset;
      const n = v.getUint32(8);
      if (at < 0 || at + n > into.length) throw this.#fail("a hole outside the read");
      into.fill(0, at, at + n);
      p.covered += n;
    } else if (chunkType === P.NBD_REPLY_TYPE_BLOCK_STATUS && p.extent !== undefined) {
      if (size < 4 || (size - 4) % 8 !== 0) throw this.#fail("a malformed BLOCK_STATUS chunk");
      const v = new DataView(this.#recv(size).buffer);
      if (v.getUint32(0) === this.#allocationId) {
        for (let at = 4; at < size; at += 8) p.extent(v.getUint32(at), v.getUint32(at + 4));
      }
    } else if ((chunkType & (1 << 15)) !== 0) {
      if (size < 6) throw this.#fail("a malformed error chunk");
      const v = new DataView(this.#recv(size).buffer);
      const textLength = v.getUint16(4);
      if (6 + textLength > size) throw this.#fail("a malformed error chunk");
      const text = new TextDecoder().decode(new Uint8Array(v.buffer, 6, textLength));
      p.failure ??= this.#requestFailed(p.what, v.getUint32(0), text);
    } else if (chunkType === P.NBD_REPLY_TYPE_NONE) {
      if (size !== 0 || !done) throw this.#fail("a malformed NONE chunk");
    } else {
      throw this.#fail(`an unexpected reply chunk of type ${chunkType} for a ${p.what}`);
    }
    if (done) this.#done(cookie, p);
  }

  #requestFailed(what: string, error: number, text: string): BlockError {
    const names: Record<number, string> = {
      [P.NBD_EPERM]: "Operation not permitted",
      [P.NBD_EIO]: "Input/output error",
      [P.NBD_ENOMEM]: "Cannot allocate memory",
      [P.NBD_EINVAL]: "Invalid argument",
      [P.NBD_ENOSPC]: "No space left on device",
      [P.NBD_EOVERFLOW]: "Value too large",
      [P.NBD_ENOTSUP]: "Operation not supported",
      [P.NBD_ESHUTDOWN]: "The server is shutting down",
    };
    const kind = error === P.NBD_EPERM ? "read-only" : "io";
    return new BlockError(
      kind,
      `${this.#socket.peer}: ${what} failed: ${names[error] ?? `error ${error}`}${
        text === "" ? "" : ` (${text})`
      }`,
      { path: this.path, errno: error },
    );
  }

  size(): number {
    this.#live();
    return this.#size;
  }

  readAt(offset: number, dst: Uint8Array): void {
    this.#live();
    const inside = zeroPastEnd(dst, offset, this.#size);
    if (inside === 0) return;
    const min = this.#minBlock;
    const start = offset - (offset % min);
    const end = Math.min(this.#size, Math.ceil((offset + inside) / min) * min);
    if (start === offset && end === offset + inside) {
      return this.#readAligned(offset, dst.subarray(0, inside));
    }
    const wide = new Uint8Array(end - start);
    this.#readAligned(start, wide);
    dst.set(wide.subarray(offset - start, offset - start + inside));
  }

  /** As readAt, with the request's pieces in flight at once and the thread free meanwhile. */
  async readAtAsync(offset: number, dst: Uint8Array): Promise<void> {
    this.#live();
    const inside = zeroPastEnd(dst, offset, this.#size);
    const min = this.#minBlock;
    if (
      inside > 0 && (offset % min !== 0 || (inside % min !== 0 && offset + inside < this.#size))
    ) {
      return this.readAt(offset, dst);
    }
    const parts: Promise<void>[] = [];
    for (let pos = 0; pos < inside;) {
      const n = Math.min(this.#maxBlock, inside - pos);
      parts.push(
        this.#requestAsync(P.NBD_CMD_READ, offset + pos, n, undefined, dst.subarray(pos, pos + n)),
      );
      pos += n;
    }
    await settleAll(parts);
  }

  /** As writeAt, with the request's pieces in flight at once; flushAsync waits for it. */
  async writeAtAsync(offset: number, src: Uint8Array): Promise<void> {
    this.#writable(offset, src.length);
    const min = this.#minBlock;
    if (src.length > 0 && (offset % min !== 0 || src.length % min !== 0)) {
      return this.writeAt(offset, src);
    }
    const parts: Promise<void>[] = [];
    for (let pos = 0; pos < src.length;) {
      const n = Math.min(this.#maxBlock, src.length - pos);
      parts.push(this.#requestAsync(P.NBD_CMD_WRITE, offset + pos, n, src.subarray(pos, pos + n)));
      pos += n;
    }
    const all = settleAll(parts);
    const tracked = all.catch(() => {});
    this.#writesInFlight.add(tracked);
    try {
      await all;
    } finally {
      this.#writesInFlight.delete(tracked);
    }
  }

  /** FLUSH once the writes accepted before it are answered (the spec: it covers completed ones). */
  async flushAsync(): Promise<void> {
    this.#live();
    if (this.readOnly || (this.#flags & P.NBD_FLAG_SEND_FLUSH) === 0) return;
    await Promise.all([...this.#writesInFlight]);
    await this.#requestAsync(P.NBD_CMD_FLUSH, 0, 0);
  }

  #readAligned(offset: number, dst: Uint8Array): void {
    for (let pos = 0; pos < dst.length;) {
      const n = Math.min(this.#maxBlock, dst.length - pos);
      this.#request(P.NBD_CMD_READ, 0, offset + pos, n, undefined, dst.subarray(pos, pos + n));
      pos += n;
    }
  }

  #writable(offset: number, length: number): void {
    this.#live();
    // Synchronous calls that write come after the async ones already sent.
    this.#drain();
    if (this.readOnly) throw this.#fail("opened read-only", "read-only");
    if (offset + length > this.#size) {
      throw this.#fail(
        `cannot write past the end of the export (${length} bytes at ${offset}, size ${this.#size})`,
        "unsupported",
      );
    }
  }

  writeAt(offset: number, src: Uint8Array): void {
    this.#writable(offset, src.length);
    if (src.length === 0) return;
    const min = this.#minBlock;
    const start = offset - (offset % min);
    const end = Math.min(this.#size, Math.ceil((offset + src.length) / min) * min);
    if (start === offset && end === offset + src.length) return this.#writeAligned(offset, src);
    // Read, patch, write: the server takes only whole blocks.
    const wide = new Uint8Array(end - start);
    this.#readAligned(start, wide);
    wide.set(src, offset - start);
    this.#writeAligned(start, wide);
  }

  #writeAligned(offset: number, src: Uint8Array): void {
    for (let pos = 0; pos < src.length;) {
      const n = Math.min(this.#maxBlock, src.length - pos);
      this.#request(P.NBD_CMD_WRITE, 0, offset + pos, n, src.subarray(pos, pos + n));
      pos += n;
    }
  }

  truncate(size: number): void {
    this.#live();
    if (size === this.#size) return;
    throw this.#fail(
      `an NBD export cannot be resized (${this.#size} to ${size} bytes)`,
      "unsupported",
    );
  }

  flush(): void {
    this.#live();
    this.#drain();
    if (this.readOnly || (this.#flags & P.NBD_FLAG_SEND_FLUSH) === 0) return;
    this.#request(P.NBD_CMD_FLUSH, 0, 0, 0);
  }

  punchHole(offset: number, length: number): void {
    this.#writable(offset, length);
    // Zeroes the server may unmap.
    if ((this.#flags & P.NBD_FLAG_SEND_WRITE_ZEROES) === 0) {
      return this.#writeZeroBytes(offset, length);
    }
    this.#zeroes(offset, length, 0);
  }

  zeroRange(offset: number, length: number): void {
    this.#writable(offset, length);
    if ((this.#flags & P.NBD_FLAG_SEND_WRITE_ZEROES) === 0) {
      return this.#writeZeroBytes(offset, length);
    }
    this.#zeroes(offset, length, P.NBD_CMD_FLAG_NO_HOLE);
  }

  /**
   * WRITE_ZEROES with FAST_ZERO where the server offers it: false (nothing changed) when it
   * does not, when the range is not whole blocks, or when the server says it cannot be fast.
   */
  zeroWithoutData(offset: number, length: number, unmap: boolean): boolean {
    this.#writable(offset, length);
    const fast = P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO;
    const min = this.#minBlock;
    if ((this.#flags & fast) !== fast || offset % min !== 0) return false;
    if (length % min !== 0 && offset + length !== this.#size) return false;
    const flags = P.NBD_CMD_FLAG_FAST_ZERO | (unmap ? 0 : P.NBD_CMD_FLAG_NO_HOLE);
    for (let pos = 0; pos < length;) {
      const n = Math.min(length - pos, 2 ** 31);
      try {
        this.#request(P.NBD_CMD_WRITE_ZEROES, flags, offset + pos, n);
      } catch (e) {
        // Only the first piece can say so before anything changed.
        if (pos === 0 && e instanceof BlockError && e.context.errno === P.NBD_ENOTSUP) return false;
        throw e;
      }
      pos += n;
    }
    return true;
  }

  discard(offset: number, length: number): void {
    this.#writable(offset, length);
    // Without TRIM nothing needs doing: a discard is only a hint.
    if ((this.#flags & P.NBD_FLAG_SEND_TRIM) === 0) return;
    const min = this.#minBlock;
    const start = Math.ceil(offset / min) * min;
    const end = Math.floor((offset + length) / min) * min;
    for (let pos = start; pos < end;) {
      const n = Math.min(end - pos, 2 ** 31);
      this.#request(P.NBD_CMD_TRIM, 0, pos, n);
      pos += n;
    }
  }

  /** WRITE_ZEROES over whole blocks, the partial ones around them written as zero bytes. */
  #zeroes(offset: number, length: number, flags: number): void {
    const min = this.#minBlock;
    const start = Math.ceil(offset / min) * min;
    const end = Math.floor((offset + length) / min) * min;
    if (end <= start) return this.#writeZeroBytes(offset, length);
    if (start > offset) this.#writeZeroBytes(offset, start - offset);
    for (let pos = start; pos < end;) {
      const n = Math.min(end - pos, 2 ** 31);
      this.#request(P.NBD_CMD_WRITE_ZEROES, flags, pos, n);
      pos += n;
    }
    if (end < offset + length) this.#writeZeroBytes(end, offset + length - end);
  }

  #writeZeroBytes(offset: number, length: number): void {
    const zeroes = new Uint8Array(Math.min(length, 1 << 20));
    for (let pos = 0; pos < length; pos += zeroes.length) {
      this.writeAt(offset + pos, zeroes.subarray(0, Math.min(zeroes.length, length - pos)));
    }
  }

  preallocate(offset: number, length: number): void {
    // NBD has no fallocate: the export's storage is the server's business.
    this.#writable(offset, length);
  }

  dataStatus(offset: number, max: number): HostExtent {
    this.#live();
    if (offset >= this.#size) return { data: false, length: max };
    if (this.#allocationId < 0) return { data: true, length: max };
    const length = Math.min(max, this.#size - offset, 2 ** 32 - this.#minBlock);
    let first: HostExtent | undefined;
    this.#request(P.NBD_CMD_BLOCK_STATUS, 0, offset, length, undefined, undefined, (n, flags) => {
      if (first === undefined && n > 0) {
        const data = (flags & P.NBD_STATE_HOLE) === 0;
        const zero = (flags & P.NBD_STATE_ZERO) !== 0;
        first = { data, length: Math.min(n, length), ...(data && zero ? { zero } : {}) };
      }
    });
    if (first === undefined) throw this.#fail("BLOCK_STATUS answered without an extent");
    return first;
  }

  /** Not known through NBD (qemu-img says "unavailable"): -1. */
  allocatedSize(): number {
    return -1;
  }

  close(): void {
    if (this.#closed) return;
    try {
      // Requests in flight are answered first (their callers are told).
      this.#drain();
    } catch {
      // Broken: they have failed already.
    }
    this.#closed = true;
    try {
      // DISC has no reply; the server closes its side.
      this.#socket.sendAll([P.encodeRequest(P.NBD_CMD_DISC, 0, this.#cookie++, 0, 0)]);
    } catch {
      // Gone already.
    } finally {
      this.#socket.close();
    }
  }
}

/** Waits for every piece; the first failure is thrown once none is still running. */
async function settleAll(parts: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(parts);
  for (const r of results) if (r.status === "rejected") throw r.reason;
}
