/**
 * A small NBD client for the NBD server's tests: raw bytes over a unix socket (exact reads that
 * fail after a time limit instead of hanging, an end-of-stream check), the fixed newstyle
 * handshake's options and replies, and transmission requests with their simple or structured
 * replies. It checks magics and framing and leaves what the replies mean to the tests.
 *
 * @module
 */
import assert from "node:assert/strict";
import * as P from "../../src/host/nbd_protocol.ts";

/** How long a read waits for the server by default. */
export const WAIT_MS = 5_000;

const text = new TextEncoder();
const untext = new TextDecoder();

/** One option reply: which option it answers, its type, its data. */
export interface OptionReply {
  readonly option: number;
  readonly type: number;
  readonly data: Uint8Array;
}

/** The 18-byte greeting of the newstyle handshake. */
export interface Greeting {
  readonly magic: bigint;
  readonly optsMagic: bigint;
  readonly flags: number;
}

/** What INFO or GO answered. */
export interface InfoResult {
  /** Every reply, the final one (ACK or an error) last. */
  readonly replies: OptionReply[];
  /** The final reply's type. */
  readonly type: number;
  readonly export?: { size: number; flags: number };
  readonly blockSize?: { min: number; preferred: number; max: number };
  readonly name?: string;
  readonly description?: string;
}

/** What LIST/SET_META_CONTEXT answered. */
export interface MetaResult {
  /** The final reply's type. */
  readonly type: number;
  /** Context name → id, in the order the server sent them. */
  readonly contexts: Map<string, number>;
}

/** A simple reply; `data` is the READ payload when one was expected and no error came. */
export interface SimpleReply {
  readonly error: number;
  readonly cookie: bigint;
  readonly data: Uint8Array;
}

/** One structured reply chunk. */
export interface Chunk {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly payload: Uint8Array;
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** True for the errors a socket gives once the peer has closed it. */
export function isClosedError(e: unknown): boolean {
  return e instanceof Deno.errors.BrokenPipe || e instanceof Deno.errors.ConnectionReset ||
    e instanceof Deno.errors.NotConnected || e instanceof Deno.errors.BadResource;
}

/** Option data of INFO and GO: the export name and the information requests. */
export function infoData(name: string, requests: readonly number[] = []): Uint8Array {
  const w = new P.WireWriter().string32(name).u16(requests.length);
  for (const r of requests) w.u16(r);
  return w.done();
}

/** Option data of LIST/SET_META_CONTEXT: the export name and the queries. */
export function metaData(name: string, queries: readonly string[]): Uint8Array {
  const w = new P.WireWriter().string32(name).u32(queries.length);
  for (const q of queries) w.string32(q);
  return w.done();
}

/** An error chunk's errno and message. */
export function parseError(c: Chunk): { errno: number; message: string } {
  assert.ok(
    c.type === P.NBD_REPLY_TYPE_ERROR || c.type === P.NBD_REPLY_TYPE_ERROR_OFFSET,
    `chunk type ${c.type} is not an error`,
  );
  const v = view(c.payload);
  const n = v.getUint16(4);
  return { errno: v.getUint32(0), message: untext.decode(c.payload.subarray(6, 6 + n)) };
}

/** An OFFSET_DATA chunk's offset and data. */
export function parseOffsetData(c: Chunk): { offset: number; data: Uint8Array } {
  assert.equal(c.type, P.NBD_REPLY_TYPE_OFFSET_DATA);
  assert.ok(c.payload.length >= 8, "OFFSET_DATA shorter than its offset");
  return { offset: Number(view(c.payload).getBigUint64(0)), data: c.payload.subarray(8) };
}

/** An OFFSET_HOLE chunk's offset and length. */
export function parseOffsetHole(c: Chunk): { offset: number; length: number } {
  assert.equal(c.type, P.NBD_REPLY_TYPE_OFFSET_HOLE);
  assert.equal(c.payload.length, 12, "OFFSET_HOLE is 12 bytes");
  const v = view(c.payload);
  return { offset: Number(v.getBigUint64(0)), length: v.getUint32(8) };
}

/** A BLOCK_STATUS chunk's context id and extents as [length, flags] pairs. */
export function parseBlockStatus(c: Chunk): { id: number; extents: Array<[number, number]> } {
  assert.equal(c.type, P.NBD_REPLY_TYPE_BLOCK_STATUS);
  assert.equal((c.payload.length - 4) % 8, 0, "BLOCK_STATUS is an id and 8-byte extents");
  const v = view(c.payload);
  const extents: Array<[number, number]> = [];
  for (let at = 4; at < c.payload.length; at += 8) {
    extents.push([v.getUint32(at), v.getUint32(at + 4)]);
  }
  return { id: v.getUint32(0), extents };
}

/** One client connection. Every read fails the test after its time limit. */
export class NbdClient {
  readonly conn: Deno.Conn;
  /** Structured replies were negotiated (set by {@linkcode structuredReply}). */
  structured = false;
  #closed = false;
  #cookie = 0n;

  constructor(conn: Deno.Conn) {
    this.conn = conn;
  }

  static async connect(path: string): Promise<NbdClient> {
    return new NbdClient(await Deno.connect({ transport: "unix", path }));
  }

  /** A fresh cookie (1, 2, 3, …). */
  nextCookie(): bigint {
    return ++this.#cookie;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.conn.close();
    } catch {
      // Closed already.
    }
  }

  // ---- raw bytes ----

  /** Writes all of `parts`, in order. */
  async send(...parts: Uint8Array[]): Promise<void> {
    const b = P.concat(parts);
    for (let at = 0; at < b.length;) at += await this.conn.write(b.subarray(at));
  }

  /** {@linkcode send}, false instead of an error when the server has closed the connection. */
  async trySend(...parts: Uint8Array[]): Promise<boolean> {
    try {
      await this.send(...parts);
      return true;
    } catch (e) {
      if (isClosedError(e)) return false;
      throw e;
    }
  }

  /**
   * One read into `p` that gives up after `ms` (closing the connection, so that no read stays
   * pending): the count, or null at the end of the stream (a reset counts as an end).
   */
  async #readSome(p: Uint8Array, ms: number, what: string): Promise<number | null> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), Math.max(0, ms));
    });
    try {
      const n = await Promise.race([this.conn.read(p), timeout]);
      if (n === "timeout") {
        this.close();
        throw new Error(`no ${what} from the server within ${ms} ms`);
      }
      return n;
    } catch (e) {
      if (e instanceof Deno.errors.ConnectionReset) return null;
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Exactly `n` bytes; fails on a timeout or an early end of the stream. */
  async readExact(n: number, ms = WAIT_MS, what = `${n} bytes`): Promise<Uint8Array> {
    const out = new Uint8Array(n);
    const deadline = performance.now() + ms;
    for (let at = 0; at < n;) {
      const got = await this.#readSome(out.subarray(at), deadline - performance.now(), what);
      if (got === null) {
        assert.fail(`the server closed the connection after ${at} of the ${n} bytes of ${what}`);
      }
      at += got;
    }
    return out;
  }

  /** Asserts that the server closes the connection within `ms` without sending anything more. */
  async expectClosed(ms = WAIT_MS): Promise<void> {
    const scratch = new Uint8Array(4096);
    const got = await this.#readSome(scratch, ms, "end of the stream");
    if (got !== null) {
      assert.fail(
        `expected the connection closed, got ${got} more bytes: ${
          [...scratch.subarray(0, Math.min(got, 32))].map((b) => b.toString(16).padStart(2, "0"))
            .join(" ")
        }`,
      );
    }
  }

  // ---- handshake ----

  async readGreeting(): Promise<Greeting> {
    const b = await this.readExact(18, WAIT_MS, "the greeting");
    const v = view(b);
    return { magic: v.getBigUint64(0), optsMagic: v.getBigUint64(8), flags: v.getUint16(16) };
  }

  /** Reads and checks the greeting, then sends the client flags. */
  async handshake(
    clientFlags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES,
  ): Promise<Greeting> {
    const g = await this.readGreeting();
    assert.equal(g.magic, P.NBD_MAGIC, "NBDMAGIC");
    assert.equal(g.optsMagic, P.NBD_OPTS_MAGIC, "IHAVEOPT");
    await this.send(new P.WireWriter().u32(clientFlags).done());
    return g;
  }

  /** Sends one option: IHAVEOPT, the option, the data's length, the data. */
  async sendOption(option: number, data: Uint8Array = new Uint8Array(0)): Promise<void> {
    const h = new Uint8Array(P.OPTION_HEADER_SIZE);
    const v = view(h);
    v.setBigUint64(0, P.NBD_OPTS_MAGIC);
    v.setUint32(8, option);
    v.setUint32(12, data.length);
    await this.send(h, data);
  }

  async readOptionReply(): Promise<OptionReply> {
    const h = await this.readExact(20, WAIT_MS, "an option reply header");
    const v = view(h);
    assert.equal(v.getBigUint64(0), P.NBD_REP_MAGIC, "option reply magic");
    const length = v.getUint32(16);
    const data = await this.readExact(length, WAIT_MS, "an option reply's data");
    return { option: v.getUint32(8), type: v.getUint32(12), data };
  }

  /** Sends an option and reads its replies up to the final one (ACK or an error), which is last. */
  async option(option: number, data?: Uint8Array): Promise<OptionReply[]> {
    await this.sendOption(option, data);
    const replies: OptionReply[] = [];
    for (;;) {
      const r = await this.readOptionReply();
      assert.equal(r.option, option, "the reply names the option it answers");
      replies.push(r);
      if (r.type === P.NBD_REP_ACK || r.type >= 2 ** 31) return replies;
    }
  }

  /** INFO (or GO with `option`): the replies, parsed. */
  async info(
    name: string,
    requests: readonly number[] = [],
    option = P.NBD_OPT_INFO,
  ): Promise<InfoResult> {
    const replies = await this.option(option, infoData(name, requests));
    const result: {
      -readonly [K in keyof InfoResult]: InfoResult[K];
    } = { replies, type: replies[replies.length - 1]!.type };
    for (const r of replies) {
      if (r.type !== P.NBD_REP_INFO) continue;
      const v = view(r.data);
      const kind = v.getUint16(0);
      if (kind === P.NBD_INFO_EXPORT) {
        assert.equal(r.data.length, 12, "NBD_INFO_EXPORT is 12 bytes");
        result.export = { size: Number(v.getBigUint64(2)), flags: v.getUint16(10) };
      } else if (kind === P.NBD_INFO_BLOCK_SIZE) {
        assert.equal(r.data.length, 14, "NBD_INFO_BLOCK_SIZE is 14 bytes");
        result.blockSize = { min: v.getUint32(2), preferred: v.getUint32(6), max: v.getUint32(10) };
      } else if (kind === P.NBD_INFO_NAME) {
        result.name = untext.decode(r.data.subarray(2));
      } else if (kind === P.NBD_INFO_DESCRIPTION) {
        result.description = untext.decode(r.data.subarray(2));
      }
    }
    return result;
  }

  /** GO: on success the connection is in the transmission phase. */
  go(name: string, requests: readonly number[] = []): Promise<InfoResult> {
    return this.info(name, requests, P.NBD_OPT_GO);
  }

  /** STRUCTURED_REPLY, which must be acknowledged. */
  async structuredReply(): Promise<void> {
    const replies = await this.option(P.NBD_OPT_STRUCTURED_REPLY);
    assert.equal(replies.length, 1);
    assert.equal(replies[0]!.type, P.NBD_REP_ACK, "STRUCTURED_REPLY acknowledged");
    this.structured = true;
  }

  /** LIST_META_CONTEXT or SET_META_CONTEXT (`option`). */
  async metaContext(option: number, name: string, queries: readonly string[]): Promise<MetaResult> {
    const replies = await this.option(option, metaData(name, queries));
    const contexts = new Map<string, number>();
    for (const r of replies.slice(0, -1)) {
      assert.equal(r.type, P.NBD_REP_META_CONTEXT);
      contexts.set(untext.decode(r.data.subarray(4)), view(r.data).getUint32(0));
    }
    return { type: replies[replies.length - 1]!.type, contexts };
  }

  setMetaContext(name: string, queries: readonly string[]): Promise<MetaResult> {
    return this.metaContext(P.NBD_OPT_SET_META_CONTEXT, name, queries);
  }

  listMetaContext(name: string, queries: readonly string[]): Promise<MetaResult> {
    return this.metaContext(P.NBD_OPT_LIST_META_CONTEXT, name, queries);
  }

  // ---- transmission ----

  /** Sends a request header (and a WRITE's payload). */
  async request(
    type: number,
    flags: number,
    cookie: bigint,
    offset: number,
    length: number,
    payload?: Uint8Array,
  ): Promise<void> {
    const header = P.encodeRequest(type, flags, cookie, offset, length);
    await this.send(header, ...(payload === undefined ? [] : [payload]));
  }

  /** A simple reply, with `dataLength` bytes of READ data after it unless it is an error. */
  async readSimpleReply(dataLength = 0, ms = WAIT_MS): Promise<SimpleReply> {
    const h = await this.readExact(16, ms, "a simple reply");
    const v = view(h);
    assert.equal(v.getUint32(0), P.NBD_SIMPLE_REPLY_MAGIC, "simple reply magic");
    const error = v.getUint32(4);
    const data = error === 0 && dataLength > 0
      ? await this.readExact(dataLength, ms, "a READ's data")
      : new Uint8Array(0);
    return { error, cookie: v.getBigUint64(8), data };
  }

  /** One structured reply chunk, whatever its cookie. */
  async readChunk(ms = WAIT_MS): Promise<Chunk> {
    const h = await this.readExact(20, ms, "a structured reply chunk");
    const v = view(h);
    assert.equal(v.getUint32(0), P.NBD_STRUCTURED_REPLY_MAGIC, "structured reply magic");
    const length = v.getUint32(16);
    const payload = await this.readExact(length, ms, "a chunk's payload");
    return { flags: v.getUint16(4), type: v.getUint16(6), cookie: v.getBigUint64(8), payload };
  }

  /** The chunks of one reply, up to the one flagged DONE; all must carry `cookie`. */
  async readReply(cookie: bigint, ms = WAIT_MS): Promise<Chunk[]> {
    const chunks: Chunk[] = [];
    for (;;) {
      const c = await this.readChunk(ms);
      assert.equal(c.cookie, cookie, "chunk of another request");
      chunks.push(c);
      if ((c.flags & P.NBD_REPLY_FLAG_DONE) !== 0) return chunks;
    }
  }

  /** Sends a request and reads its simple reply (checking the cookie). */
  async simple(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Uint8Array,
  ): Promise<SimpleReply> {
    const cookie = this.nextCookie();
    await this.request(type, flags, cookie, offset, length, payload);
    const r = await this.readSimpleReply(type === P.NBD_CMD_READ ? length : 0);
    assert.equal(r.cookie, cookie, "reply cookie");
    return r;
  }

  /** Sends a request and reads its structured reply's chunks. */
  async structuredCall(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Uint8Array,
  ): Promise<Chunk[]> {
    const cookie = this.nextCookie();
    await this.request(type, flags, cookie, offset, length, payload);
    return await this.readReply(cookie);
  }

  /** Sends DISC (no reply comes). */
  async disconnect(): Promise<void> {
    await this.request(P.NBD_CMD_DISC, 0, this.nextCookie(), 0, 0);
  }
}

/** Connects, negotiates (structured replies and contexts when asked) and selects `name` by GO. */
export async function openExport(
  path: string,
  name: string,
  opts: { structured?: boolean; contexts?: readonly string[] } = {},
): Promise<{ client: NbdClient; size: number; flags: number; contexts: Map<string, number> }> {
  const client = await NbdClient.connect(path);
  try {
    await client.handshake();
    let contexts = new Map<string, number>();
    if (opts.structured || opts.contexts !== undefined) await client.structuredReply();
    if (opts.contexts !== undefined) {
      const m = await client.setMetaContext(name, opts.contexts);
      assert.equal(m.type, P.NBD_REP_ACK, "SET_META_CONTEXT acknowledged");
      contexts = m.contexts;
    }
    const go = await client.go(name);
    assert.equal(go.type, P.NBD_REP_ACK, `GO '${name}' acknowledged`);
    assert.ok(go.export !== undefined, "GO sent NBD_INFO_EXPORT");
    return { client, size: go.export.size, flags: go.export.flags, contexts };
  } catch (e) {
    client.close();
    throw e;
  }
}

/** UTF-8 of `s` (for option data). */
export function utf8(s: string): Uint8Array {
  return text.encode(s);
}
