/**
 * An NBD server over block nodes, as qemu-storage-daemon's NBD exports serve them: the fixed
 * newstyle handshake (EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT;
 * STARTTLS refused by policy while TLS is not configured), then the transmission phase with many
 * requests in flight per client (READ with holes as OFFSET_HOLE chunks, WRITE with FUA, FLUSH,
 * TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS for `base:allocation` and `qemu:allocation-depth`,
 * DISC). Replies go out in completion order. Clients on one export share its node, so a flush on
 * any connection covers writes completed on all of them (CAN_MULTI_CONN).
 *
 * Clients are untrusted: a bad magic, an option or request too large, data that ends early, a
 * request before the handshake is over or a handshake that takes too long close that connection
 * with a log line; a request the spec lets the server refuse gets its error. Nothing a client
 * sends makes the server allocate more than its request size limit per request in flight.
 *
 * @module
 */
import { isBlockError } from "../../errors.ts";
import type { BlockNode } from "../../block/node.ts";
import { entryAt, type MapEntry } from "../../../formats/map.ts";
import * as P from "../../host/nbd_protocol.ts";
import { type NbdStream, StreamEnded, StreamReader, StreamWriter } from "./stream.ts";

/** One export as the server serves it. */
export interface NbdExport {
  /** The name clients ask for (may be empty: qemu-nbd's default). */
  readonly name: string;
  readonly description?: string | undefined;
  readonly node: BlockNode;
  readonly writable: boolean;
  /** Offer `qemu:allocation-depth`. */
  readonly allocationDepth: boolean;
  /** Dirty bitmaps offered as `qemu:dirty-bitmap:NAME`. */
  readonly bitmaps?: readonly ExportedBitmap[];
}

/** A dirty bitmap as the server reads it (formats/qcow2/dirty_bitmap.ts's DirtyBitmap fits). */
export interface ExportedBitmap {
  readonly name: string;
  /** Guest bytes one bit covers. */
  readonly granularity: number;
  /** Whether bit `k` is set. */
  get(k: number): boolean;
}

/** Server options. */
export interface NbdServerOptions {
  /** Connections served at once; 0 for no limit (QEMU's default is 100). */
  readonly maxConnections: number;
  /** How long a client may take to finish the handshake (QEMU: 10 s). */
  readonly handshakeMs?: number;
  readonly log: (line: string) => void;
}

/** Requests in flight per connection (QEMU's MAX_NBD_REQUESTS). */
const MAX_REQUESTS = 16;
/** Payload and read buffers in flight per connection. */
const MAX_BUFFERED_BYTES = 64 * 1024 * 1024;
/** Option data beyond this closes the connection (names and queries are at most 4 KiB each). */
const MAX_OPTION_BYTES = 64 * 1024;
/** Extents one BLOCK_STATUS reply describes at most per context. */
const MAX_EXTENTS = 4096;
/** An extent's length is a u32: runs are cut below 4 GiB, on a 512-byte boundary. */
const MAX_EXTENT_BYTES = 2 ** 32 - 512;
/** CACHE reads ahead in pieces of this size. */
const CACHE_PIECE = 1024 * 1024;

const META_BASE = 0;
const META_DEPTH = 1;
/** Bitmap i of an export is context META_BITMAP + i. */
const META_BITMAP = 2;
const BITMAP_PREFIX = "qemu:dirty-bitmap:";
/** qemu:dirty-bitmap's flag. */
const NBD_STATE_DIRTY = 1;

/** Why a connection is being closed (a protocol breach, logged once). */
class Breach extends Error {}

/** The server: give it connections with {@linkcode serve}. */
export class NbdServer {
  readonly #exports: Map<string, NbdExport>;
  readonly #opts: NbdServerOptions;
  readonly #connections = new Set<Connection>();
  #stopping = false;

  constructor(exports: readonly NbdExport[], opts: NbdServerOptions) {
    this.#exports = new Map(exports.map((e) => [e.name, e]));
    this.#opts = opts;
  }

  /** Connections being served. */
  get connections(): number {
    return this.#connections.size;
  }

  /**
   * Serves one client until it leaves or breaks the protocol; never throws. With `startTls` (the
   * server has TLS credentials) the client must STARTTLS before anything but ABORT, and
   * `startTls` turns the connection into its TLS stream.
   */
  async serve(
    stream: NbdStream,
    peer: string,
    startTls?: () => Promise<NbdStream>,
  ): Promise<void> {
    const limit = this.#opts.maxConnections;
    if (this.#stopping || (limit > 0 && this.#connections.size >= limit)) {
      this.#opts.log(
        `${peer}: refused: ${this.#stopping ? "shutting down" : `${limit} connections already`}`,
      );
      try {
        stream.close();
      } catch {
        // Gone already.
      }
      return;
    }
    const c = new Connection(stream, peer, this.#exports, this.#opts, limit !== 1, startTls);
    this.#connections.add(c);
    try {
      await c.run();
    } finally {
      this.#connections.delete(c);
    }
  }

  /**
   * Stops: new connections are refused, every client's requests in flight complete (no new ones
   * are read) and its connection closes.
   */
  async shutdown(): Promise<void> {
    this.#stopping = true;
    await Promise.all([...this.#connections].map((c) => c.stop()));
  }
}

/** What SET_META_CONTEXT selected, for which export. */
interface MetaSelection {
  readonly exportName: string;
  readonly ids: number[];
}

class Connection {
  #stream: NbdStream;
  /** The TLS upgrade when the server requires TLS, until it happened. */
  #startTls: (() => Promise<NbdStream>) | undefined;
  readonly #tlsRequired: boolean;
  readonly #peer: string;
  readonly #exports: Map<string, NbdExport>;
  readonly #opts: NbdServerOptions;
  readonly #multiConn: boolean;
  #reader: StreamReader;
  #writer: StreamWriter;
  #structured = false;
  #noZeroes = false;
  #meta: MetaSelection | null = null;
  #export: NbdExport | null = null;
  #size = 0;
  #inflight = 0;
  #inflightBytes = 0;
  /** Whoever waits for a request to end: the reader (room), run() and stop() (the last one). */
  #waiters: (() => void)[] = [];
  #closed = false;
  #stopped: Promise<void>;
  #stopResolve!: () => void;
  #requests = 0;

  constructor(
    stream: NbdStream,
    peer: string,
    exports: Map<string, NbdExport>,
    opts: NbdServerOptions,
    multiConn: boolean,
    startTls: (() => Promise<NbdStream>) | undefined,
  ) {
    this.#stream = stream;
    this.#startTls = startTls;
    this.#tlsRequired = startTls !== undefined;
    this.#peer = peer;
    this.#exports = exports;
    this.#opts = opts;
    this.#multiConn = multiConn;
    this.#reader = new StreamReader(stream);
    this.#writer = new StreamWriter(stream);
    this.#stopped = new Promise((resolve) => this.#stopResolve = resolve);
  }

  #log(line: string): void {
    this.#opts.log(`${this.#peer}: ${line}`);
  }

  async run(): Promise<void> {
    let why = "the client disconnected";
    try {
      const timeout = this.#opts.handshakeMs ?? 10_000;
      const timer = setTimeout(() => {
        if (this.#export === null) {
          this.#log(`handshake not finished in ${timeout / 1000} s: closed`);
          this.#close();
        }
      }, timeout);
      let ready: boolean;
      try {
        ready = await this.#handshake();
      } finally {
        clearTimeout(timer);
      }
      if (ready) why = await this.#transmission();
      else why = "the client left during the handshake";
    } catch (e) {
      why = e instanceof Breach
        ? e.message
        : e instanceof StreamEnded
        ? e.message
        : this.#closed
        ? "closed"
        : e instanceof Deno.errors.BrokenPipe || e instanceof Deno.errors.ConnectionReset
        ? "the client went away"
        : `connection error: ${e instanceof Error ? e.message : e}`;
    }
    // Requests in flight finish (their replies may still go out) before the connection closes.
    await this.#drained();
    await this.#writer.flushed();
    this.#close();
    const name = this.#export === null ? "" : ` of export '${this.#export.name}'`;
    this.#log(`${why}${name} (${this.#requests} requests)`);
    this.#stopResolve();
  }

  /** Stops reading requests; resolves once the connection is closed. */
  stop(): Promise<void> {
    if (this.#export === null) this.#close();
    else this.#stopReading = true;
    this.#wakeAll();
    // A reader blocked on the socket wakes when the socket closes: close once drained.
    this.#drained().then(() => this.#writer.flushed()).then(() => this.#close());
    return this.#stopped;
  }

  #stopReading = false;

  #close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#stream.close();
    } catch {
      // Closed already.
    }
  }

  /** Resolves after the next request ends (or a stop). */
  #requestEnded(): Promise<void> {
    return new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  #wakeAll(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }

  async #drained(): Promise<void> {
    while (this.#inflight > 0) await this.#requestEnded();
  }

  // ---- handshake ----

  async #send(...parts: Uint8Array[]): Promise<void> {
    await this.#writer.send(parts);
  }

  /** True once an export is chosen; false when the client left (ABORT or end of stream). */
  async #handshake(): Promise<boolean> {
    const hello = new Uint8Array(18);
    const v = new DataView(hello.buffer);
    v.setBigUint64(0, P.NBD_MAGIC);
    v.setBigUint64(8, P.NBD_OPTS_MAGIC);
    v.setUint16(16, P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
    await this.#send(hello);
    return await this.#options();
  }

  async #options(): Promise<boolean> {
    const flagsBytes = await this.#reader.read(4);
    if (flagsBytes === null) return false;
    const clientFlags = new DataView(flagsBytes.buffer).getUint32(0);
    if ((clientFlags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)) !== 0) {
      throw new Breach(`unknown client flags 0x${clientFlags.toString(16)}`);
    }
    const fixed = (clientFlags & P.NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.#noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;
    for (;;) {
      const header = await this.#reader.read(P.OPTION_HEADER_SIZE);
      if (header === null) return false;
      const v = new DataView(header.buffer);
      if (v.getBigUint64(0) !== P.NBD_OPTS_MAGIC) {
        throw new Breach("bad option magic (a request before the handshake ended?)");
      }
      const option = v.getUint32(8);
      const length = v.getUint32(12);
      if (length > MAX_OPTION_BYTES) {
        throw new Breach(`option ${option} carries ${length} bytes, over ${MAX_OPTION_BYTES}`);
      }
      const data = (await this.#reader.read(length)) ?? new Uint8Array(0);
      if (data.length !== length) throw new StreamEnded("the stream ended inside an option");
      if (!fixed && option !== P.NBD_OPT_EXPORT_NAME) {
        throw new Breach(`option ${option} from a client without fixed newstyle`);
      }
      // With TLS required, nothing but STARTTLS and ABORT before it (QEMU: TLS_REQD).
      if (this.#startTls !== undefined && option !== P.NBD_OPT_STARTTLS) {
        if (option === P.NBD_OPT_ABORT) return await this.#option(option, data) ?? false;
        if (option === P.NBD_OPT_EXPORT_NAME) throw new Breach("EXPORT_NAME before STARTTLS");
        await this.#refuse(option, P.NBD_REP_ERR_TLS_REQD, "TLS is required: STARTTLS first");
        continue;
      }
      const done = await this.#option(option, data);
      if (done !== null) return done;
    }
  }

  /** Handles one option: true when transmission starts, false to end, null to go on. */
  async #option(option: number, data: Uint8Array): Promise<boolean | null> {
    try {
      switch (option) {
        case P.NBD_OPT_EXPORT_NAME:
          return await this.#exportName(data);
        case P.NBD_OPT_ABORT:
          await this.#send(P.optionReply(option, P.NBD_REP_ACK)).catch(() => {});
          return false;
        case P.NBD_OPT_LIST:
          if (data.length !== 0) {
            return await this.#refuse(option, P.NBD_REP_ERR_INVALID, "LIST takes no data");
          }
          for (const e of this.#exports.values()) {
            const w = new P.WireWriter().string32(e.name);
            if (e.description !== undefined) w.bytes(new TextEncoder().encode(e.description));
            await this.#send(P.optionReply(option, P.NBD_REP_SERVER, w.done()));
          }
          await this.#send(P.optionReply(option, P.NBD_REP_ACK));
          return null;
        case P.NBD_OPT_STARTTLS:
          return await this.#starttls(option, data);
        case P.NBD_OPT_INFO:
        case P.NBD_OPT_GO:
          return await this.#infoOrGo(option, data);
        case P.NBD_OPT_STRUCTURED_REPLY:
          if (data.length !== 0) {
            return await this.#refuse(
              option,
              P.NBD_REP_ERR_INVALID,
              "STRUCTURED_REPLY takes no data",
            );
          }
          if (this.#structured) {
            return await this.#refuse(
              option,
              P.NBD_REP_ERR_INVALID,
              "structured replies already negotiated",
            );
          }
          this.#structured = true;
          await this.#send(P.optionReply(option, P.NBD_REP_ACK));
          return null;
        case P.NBD_OPT_LIST_META_CONTEXT:
        case P.NBD_OPT_SET_META_CONTEXT:
          return await this.#metaContext(option, data);
        default:
          return await this.#refuse(
            option,
            P.NBD_REP_ERR_UNSUP,
            `option ${option} is not supported`,
          );
      }
    } catch (e) {
      if (e instanceof P.OptionDataError) {
        return await this.#refuse(option, P.NBD_REP_ERR_INVALID, e.message);
      }
      throw e;
    }
  }

  /**
   * STARTTLS: ACK, then the TLS handshake on the same connection, then the options start over
   * (nothing negotiated in the clear carries over, as the spec says).
   */
  async #starttls(option: number, data: Uint8Array): Promise<null> {
    if (!this.#tlsRequired) {
      return await this.#refuse(option, P.NBD_REP_ERR_POLICY, "TLS is not configured");
    }
    const startTls = this.#startTls;
    if (startTls === undefined) {
      return await this.#refuse(option, P.NBD_REP_ERR_INVALID, "TLS is already on");
    }
    if (data.length !== 0) {
      return await this.#refuse(option, P.NBD_REP_ERR_INVALID, "STARTTLS takes no data");
    }
    await this.#send(P.optionReply(option, P.NBD_REP_ACK));
    await this.#writer.flushed();
    if (this.#reader.buffered > 0) throw new Breach("data after STARTTLS before the TLS handshake");
    this.#startTls = undefined;
    let secure: NbdStream;
    try {
      secure = await startTls();
    } catch (e) {
      throw new Breach(`TLS handshake failed: ${e instanceof Error ? e.message : e}`);
    }
    this.#stream = secure;
    this.#reader = new StreamReader(secure);
    this.#writer = new StreamWriter(secure);
    this.#structured = false;
    this.#meta = null;
    return null;
  }

  async #refuse(option: number, type: number, message: string): Promise<null> {
    await this.#send(P.optionReply(option, type, new TextEncoder().encode(message)));
    return null;
  }

  async #exportName(data: Uint8Array): Promise<boolean> {
    const name = new TextDecoder().decode(data);
    const e = this.#exports.get(name);
    // No error reply exists for this option: the connection closes.
    if (e === undefined) throw new Breach(`EXPORT_NAME '${name}': no such export`);
    this.#choose(e);
    const parts = [P.u64(this.#size), new P.WireWriter().u16(this.#flags(e)).done()];
    if (!this.#noZeroes) parts.push(new Uint8Array(124));
    await this.#send(...parts);
    return true;
  }

  async #infoOrGo(option: number, data: Uint8Array): Promise<boolean | null> {
    const r = new P.WireReader(data);
    const name = r.string32("the export name");
    const count = r.u16("the number of information requests");
    const asked = new Set<number>();
    for (let i = 0; i < count; i++) asked.add(r.u16("an information request"));
    const e = await this.#exportFor(option, r, name);
    if (e === null) return null;
    const info = (type: number, body: Uint8Array) =>
      this.#send(
        P.optionReply(option, P.NBD_REP_INFO, new P.WireWriter().u16(type).bytes(body).done()),
      );
    const text = (s: string) => new TextEncoder().encode(s);
    if (asked.has(P.NBD_INFO_NAME)) await info(P.NBD_INFO_NAME, text(e.name));
    if (asked.has(P.NBD_INFO_DESCRIPTION) && e.description !== undefined) {
      await info(P.NBD_INFO_DESCRIPTION, text(e.description));
    }
    // Always sent, as QEMU does: the minimum is the node's alignment only for a client that asked
    // (it promises to obey it); others may send any byte range.
    const min = asked.has(P.NBD_INFO_BLOCK_SIZE) ? Math.max(1, e.node.requestAlignment) : 1;
    await info(
      P.NBD_INFO_BLOCK_SIZE,
      new P.WireWriter().u32(min).u32(Math.max(4096, min)).u32(P.NBD_MAX_BUFFER_SIZE).done(),
    );
    await info(P.NBD_INFO_EXPORT, new P.WireWriter().u64(exportSize(e)).u16(this.#flags(e)).done());
    await this.#send(P.optionReply(option, P.NBD_REP_ACK));
    if (option === P.NBD_OPT_INFO) return null;
    this.#choose(e);
    return true;
  }

  /**
   * The export an option names, once its data was read to the end; null after refusing the
   * option (trailing bytes: INVALID; no such export: UNKNOWN).
   */
  async #exportFor(option: number, r: P.WireReader, name: string): Promise<NbdExport | null> {
    if (r.left !== 0) {
      await this.#refuse(option, P.NBD_REP_ERR_INVALID, `${r.left} bytes past the option's data`);
      return null;
    }
    const e = this.#exports.get(name);
    if (e === undefined) {
      await this.#refuse(option, P.NBD_REP_ERR_UNKNOWN, `export '${name}' not present`);
      return null;
    }
    return e;
  }

  #choose(e: NbdExport): void {
    this.#export = e;
    this.#size = exportSize(e);
    // Contexts selected for another export do not carry over.
    if (this.#meta !== null && this.#meta.exportName !== e.name) this.#meta = null;
  }

  #flags(e: NbdExport): number {
    let f = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA |
      P.NBD_FLAG_SEND_CACHE;
    if (this.#multiConn) f |= P.NBD_FLAG_CAN_MULTI_CONN;
    if (this.#structured) f |= P.NBD_FLAG_SEND_DF;
    if (e.writable) {
      f |= P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO;
    } else f |= P.NBD_FLAG_READ_ONLY;
    return f;
  }

  async #metaContext(option: number, data: Uint8Array): Promise<null> {
    const set = option === P.NBD_OPT_SET_META_CONTEXT;
    // SET replaces the selection even when it fails.
    if (set) this.#meta = null;
    if (set && !this.#structured) {
      return await this.#refuse(option, P.NBD_REP_ERR_INVALID, "structured replies not negotiated");
    }
    const r = new P.WireReader(data);
    const name = r.string32("the export name");
    const count = r.u32("the number of queries");
    const queries: string[] = [];
    for (let i = 0; i < count; i++) queries.push(r.string32("a query"));
    const e = await this.#exportFor(option, r, name);
    if (e === null) return null;
    const offered: Array<[number, string]> = [[META_BASE, P.CONTEXT_BASE_ALLOCATION]];
    if (e.allocationDepth) offered.push([META_DEPTH, P.CONTEXT_ALLOCATION_DEPTH]);
    (e.bitmaps ?? []).forEach((b, i) => offered.push([META_BITMAP + i, BITMAP_PREFIX + b.name]));
    const chosen = new Map<number, string>();
    if (count === 0 && !set) {
      for (const [id, ctx] of offered) chosen.set(id, ctx);
    }
    for (const q of queries) {
      for (const [id, ctx] of offered) {
        // An exact name, or (listing) a namespace ("base:", "qemu:") or every bitmap
        // ("qemu:dirty-bitmap:").
        const namespace = ctx.slice(0, ctx.indexOf(":") + 1);
        const listed = q === namespace || (q === BITMAP_PREFIX && ctx.startsWith(BITMAP_PREFIX));
        if (q === ctx || (!set && listed)) chosen.set(id, ctx);
      }
    }
    for (const [id, ctx] of chosen) {
      // Ids mean something only for SET: a LIST reply carries 0.
      const w = new P.WireWriter().u32(set ? id : 0).bytes(new TextEncoder().encode(ctx));
      await this.#send(P.optionReply(option, P.NBD_REP_META_CONTEXT, w.done()));
    }
    if (set) this.#meta = { exportName: name, ids: [...chosen.keys()] };
    await this.#send(P.optionReply(option, P.NBD_REP_ACK));
    return null;
  }

  // ---- transmission ----

  /** Reads requests until DISC, the end of the stream or a breach; returns why it ended. */
  async #transmission(): Promise<string> {
    const header = new Uint8Array(P.REQUEST_HEADER_SIZE);
    while (!this.#closed && !this.#stopReading) {
      if (!await this.#reader.readInto(header)) return "the client disconnected";
      const req = P.decodeRequest(header);
      if (req === null) throw new Breach("bad request magic");
      this.#requests++;
      if (req.type === P.NBD_CMD_DISC) return "the client sent DISC";
      let payload: Uint8Array | undefined;
      const buffered = req.type === P.NBD_CMD_WRITE || req.type === P.NBD_CMD_READ ? req.length : 0;
      if (buffered > P.NBD_MAX_BUFFER_SIZE) {
        // A write's payload cannot be skipped safely at that size: the reply, then the end.
        await this.#replyError(
          req,
          P.NBD_EINVAL,
          `length ${req.length} over ${P.NBD_MAX_BUFFER_SIZE}`,
        );
        if (req.type === P.NBD_CMD_WRITE) {
          throw new Breach(`a WRITE of ${req.length} bytes, over ${P.NBD_MAX_BUFFER_SIZE}`);
        }
        continue;
      }
      // Room for it first: requests in flight and their buffers are bounded per connection.
      while (
        this.#inflight >= MAX_REQUESTS ||
        (this.#inflight > 0 && this.#inflightBytes + buffered > MAX_BUFFERED_BYTES)
      ) {
        await this.#requestEnded();
      }
      if (req.type === P.NBD_CMD_WRITE) {
        payload = new Uint8Array(req.length);
        if (!await this.#reader.readInto(payload) && req.length > 0) {
          throw new StreamEnded("the stream ended before a WRITE's data");
        }
      }
      this.#inflight++;
      this.#inflightBytes += buffered;
      this.#handle(req, payload).catch((e) => {
        if (!this.#closed) this.#log(`reply failed: ${e instanceof Error ? e.message : e}`);
        this.#close();
      }).finally(() => {
        this.#inflight--;
        this.#inflightBytes -= buffered;
        this.#wakeAll();
      });
    }
    return this.#stopReading ? "the server is stopping" : "closed";
  }

  /** Serves one request and sends its reply. */
  async #handle(req: P.NbdRequest, payload: Uint8Array | undefined): Promise<void> {
    const e = this.#export!;
    const problem = this.#check(req, e);
    if (problem !== null) return await this.#replyError(req, problem[0], problem[1]);
    try {
      const fua = (req.flags & P.NBD_CMD_FLAG_FUA) !== 0;
      switch (req.type) {
        case P.NBD_CMD_READ:
          // As QEMU: a READ with FUA reads what is on stable storage.
          if (fua) await e.node.flush();
          return await this.#read(req, e);
        case P.NBD_CMD_WRITE:
          await e.node.write(req.offset, payload!, fua ? { fua } : undefined);
          break;
        case P.NBD_CMD_FLUSH:
          await e.node.flush();
          break;
        case P.NBD_CMD_TRIM:
          await e.node.discard(req.offset, req.length);
          if (fua) await e.node.flush();
          break;
        case P.NBD_CMD_WRITE_ZEROES:
          // FAST_ZERO: zeroes that cost no data writes, or ENOTSUP at once (the node's
          // `unsupported`), so the client can choose to skip them.
          await e.node.writeZeroes(req.offset, req.length, {
            unmap: (req.flags & P.NBD_CMD_FLAG_NO_HOLE) === 0,
            ...(fua ? { fua } : {}),
            ...((req.flags & P.NBD_CMD_FLAG_FAST_ZERO) !== 0 ? { noFallback: true } : {}),
          });
          break;
        case P.NBD_CMD_CACHE:
          await this.#cache(req, e);
          break;
        case P.NBD_CMD_BLOCK_STATUS:
          return await this.#blockStatus(req, e);
      }
    } catch (err) {
      return await this.#replyError(
        req,
        errnoOf(err),
        err instanceof Error ? err.message : String(err),
      );
    }
    await this.#replyOk(req);
  }

  /** The spec's error for a request that cannot be served as asked, or null. */
  #check(req: P.NbdRequest, e: NbdExport): [number, string] | null {
    // FUA is valid on every command (the spec: accepted, even if ignored).
    const allowed = ({
      [P.NBD_CMD_READ]: this.#structured ? P.NBD_CMD_FLAG_DF : 0,
      [P.NBD_CMD_WRITE]: 0,
      [P.NBD_CMD_FLUSH]: 0,
      [P.NBD_CMD_TRIM]: 0,
      [P.NBD_CMD_WRITE_ZEROES]: P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO,
      [P.NBD_CMD_CACHE]: 0,
      [P.NBD_CMD_BLOCK_STATUS]: P.NBD_CMD_FLAG_REQ_ONE,
    } as Record<number, number>)[req.type];
    if (allowed === undefined) return [P.NBD_EINVAL, `unknown command ${req.type}`];
    if ((req.flags & ~(allowed | P.NBD_CMD_FLAG_FUA)) !== 0) {
      return [P.NBD_EINVAL, `flags 0x${req.flags.toString(16)} on ${P.commandName(req.type)}`];
    }
    const writes = req.type === P.NBD_CMD_WRITE || req.type === P.NBD_CMD_TRIM ||
      req.type === P.NBD_CMD_WRITE_ZEROES;
    if (writes && !e.writable) return [P.NBD_EPERM, "the export is read-only"];
    if (req.type === P.NBD_CMD_FLUSH) return null;
    if (req.offset > this.#size || req.length > this.#size - req.offset) {
      // As QEMU: a write past the end is out of space, anything else a bad request.
      return [
        writes ? P.NBD_ENOSPC : P.NBD_EINVAL,
        `${req.length} bytes at ${req.offset} past the export's ${this.#size}`,
      ];
    }
    if (req.type === P.NBD_CMD_BLOCK_STATUS) {
      if (req.length === 0) return [P.NBD_EINVAL, "BLOCK_STATUS of 0 bytes"];
      if (!this.#structured || this.#meta === null || this.#meta.ids.length === 0) {
        return [P.NBD_EINVAL, "BLOCK_STATUS without a metadata context"];
      }
    }
    return null;
  }

  async #replyOk(req: P.NbdRequest): Promise<void> {
    if (this.#structured) {
      await this.#send(P.chunkHeader(req.cookie, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, 0));
    } else {
      await this.#send(P.simpleReply(req.cookie, 0));
    }
  }

  async #replyError(req: P.NbdRequest, errno: number, message: string): Promise<void> {
    if (!this.#structured) return await this.#send(P.simpleReply(req.cookie, errno));
    const text = new TextEncoder().encode(message.slice(0, 1024));
    const body = new P.WireWriter().u32(errno).u16(text.length).bytes(text).done();
    await this.#send(
      P.chunkHeader(req.cookie, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, body.length),
      body,
    );
  }

  async #read(req: P.NbdRequest, e: NbdExport): Promise<void> {
    const data = new Uint8Array(req.length);
    if (!this.#structured) {
      await e.node.read(req.offset, data);
      return await this.#send(P.simpleReply(req.cookie, 0), data);
    }
    // Structured: a chunk describes at least one byte, so nothing to read is a bare NONE.
    if (req.length === 0) return await this.#replyOk(req);
    // Zero runs as holes unless the client wants one piece (DF).
    const runs: MapEntry[] = [];
    if ((req.flags & P.NBD_CMD_FLAG_DF) === 0 && req.length > 0) {
      for (let pos = req.offset; pos < req.offset + req.length;) {
        const run = await entryAt(e.node, pos, req.offset + req.length - pos);
        runs.push(run);
        pos += run.length;
      }
    }
    if (runs.length === 0 || runs.every((r) => !r.zero)) {
      await e.node.read(req.offset, data);
      return await this.#send(
        P.chunkHeader(
          req.cookie,
          P.NBD_REPLY_FLAG_DONE,
          P.NBD_REPLY_TYPE_OFFSET_DATA,
          8 + req.length,
        ),
        P.u64(req.offset),
        data,
      );
    }
    // Read every data run first, so that an error is the only reply.
    for (const r of runs) {
      if (!r.zero) {
        await e.node.read(
          r.start,
          data.subarray(r.start - req.offset, r.start - req.offset + r.length),
        );
      }
    }
    const parts: Uint8Array[] = [];
    runs.forEach((r, i) => {
      const flags = i === runs.length - 1 ? P.NBD_REPLY_FLAG_DONE : 0;
      if (r.zero) {
        parts.push(
          P.chunkHeader(req.cookie, flags, P.NBD_REPLY_TYPE_OFFSET_HOLE, 12),
          new P.WireWriter().u64(r.start).u32(r.length).done(),
        );
      } else {
        parts.push(
          P.chunkHeader(req.cookie, flags, P.NBD_REPLY_TYPE_OFFSET_DATA, 8 + r.length),
          P.u64(r.start),
          data.subarray(r.start - req.offset, r.start - req.offset + r.length),
        );
      }
    });
    await this.#send(...parts);
  }

  /** CACHE: the range is read (into the host's cache) in bounded pieces and dropped. */
  async #cache(req: P.NbdRequest, e: NbdExport): Promise<void> {
    const scratch = new Uint8Array(Math.min(CACHE_PIECE, req.length));
    for (let pos = 0; pos < req.length; pos += scratch.length) {
      const n = Math.min(scratch.length, req.length - pos);
      await e.node.read(req.offset + pos, scratch.subarray(0, n));
    }
  }

  async #blockStatus(req: P.NbdRequest, e: NbdExport): Promise<void> {
    const one = (req.flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0;
    const end = req.offset + req.length;
    const ids = this.#meta!.ids;
    // Walk the chain once, when a context needs it; each folds the same runs its own way.
    const runs: MapEntry[] = [];
    if (ids.some((id) => id < META_BITMAP)) {
      for (let pos = req.offset; pos < end && runs.length < MAX_EXTENTS;) {
        const run = await entryAt(e.node, pos, Math.min(end - pos, MAX_EXTENT_BYTES));
        runs.push(run);
        pos += run.length;
        if (one) break;
      }
    }
    const parts: Uint8Array[] = [];
    ids.forEach((id, i) => {
      let extents: Array<[number, number]>;
      if (id >= META_BITMAP) {
        extents = bitmapExtents(e.bitmaps![id - META_BITMAP]!, req.offset, end, one);
      } else {
        const value = (r: MapEntry) =>
          id === META_BASE
            ? (r.data ? 0 : P.NBD_STATE_HOLE) | (r.zero ? P.NBD_STATE_ZERO : 0)
            : r.present
            ? r.depth + 1
            : 0;
        extents = [];
        for (const r of runs) {
          const last = extents[extents.length - 1];
          const v = value(r);
          if (last !== undefined && last[1] === v && last[0] + r.length <= MAX_EXTENT_BYTES) {
            last[0] += r.length;
          } else extents.push([r.length, v]);
        }
      }
      const w = new P.WireWriter().u32(id);
      for (const [length, flags] of one ? extents.slice(0, 1) : extents) w.u32(length).u32(flags);
      const body = w.done();
      parts.push(
        P.chunkHeader(
          req.cookie,
          i === ids.length - 1 ? P.NBD_REPLY_FLAG_DONE : 0,
          P.NBD_REPLY_TYPE_BLOCK_STATUS,
          body.length,
        ),
        body,
      );
    });
    await this.#send(...parts);
  }
}

/**
 * A bitmap's runs of dirty and clean granules over `[start, end)`, clipped to it (QEMU's
 * bitmap_to_extents): at most MAX_EXTENTS, each under 4 GiB, one with `one`.
 */
function bitmapExtents(
  bitmap: ExportedBitmap,
  start: number,
  end: number,
  one: boolean,
): Array<[number, number]> {
  const g = bitmap.granularity;
  const extents: Array<[number, number]> = [];
  let pos = start;
  while (pos < end && extents.length < MAX_EXTENTS) {
    const dirty = bitmap.get(Math.floor(pos / g));
    let next = (Math.floor(pos / g) + 1) * g;
    while (next < end && next - pos < MAX_EXTENT_BYTES && bitmap.get(next / g) === dirty) next += g;
    const stop = Math.min(next, end, pos + MAX_EXTENT_BYTES);
    extents.push([stop - pos, dirty ? NBD_STATE_DIRTY : 0]);
    pos = stop;
    if (one) break;
  }
  return extents;
}

/** The size clients see: QEMU's, whole 512-byte sectors. */
function exportSize(e: NbdExport): number {
  return e.node.size - (e.node.size % 512);
}

/** The NBD error for a failed node request. */
function errnoOf(e: unknown): number {
  if (!isBlockError(e)) return P.NBD_EIO;
  if (e.kind === "read-only") return P.NBD_EPERM;
  if (e.kind === "out-of-range" || e.kind === "invalid-argument") return P.NBD_EINVAL;
  if (e.kind === "unsupported") return P.NBD_ENOTSUP;
  if (e.context.errno === 28) return P.NBD_ENOSPC;
  return P.NBD_EIO;
}
