/**
 * The NBD protocol's wire format (the NBD project's doc/proto.md, as QEMU 7.2's
 * include/block/nbd.h names it): magics, the fixed newstyle handshake's options and replies, the
 * transmission phase's requests, simple and structured replies, and the metadata contexts. Every
 * number on the wire is big-endian. Pure encoding, shared by the server (`src/serve/nbd/`) and the
 * client (`nbd.ts`).
 *
 * @module
 */

/** "NBDMAGIC": the server's first 8 bytes. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": after NBD_MAGIC in newstyle, and before every option the client sends. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** Before every option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

/** Transmission flags of an export. */
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

/** Options. */
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;

/** Option reply types; errors have bit 31 set. */
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const REP_ERR = 2 ** 31;
export const NBD_REP_ERR_UNSUP = REP_ERR + 1;
export const NBD_REP_ERR_POLICY = REP_ERR + 2;
export const NBD_REP_ERR_INVALID = REP_ERR + 3;
export const NBD_REP_ERR_PLATFORM = REP_ERR + 4;
export const NBD_REP_ERR_TLS_REQD = REP_ERR + 5;
export const NBD_REP_ERR_UNKNOWN = REP_ERR + 6;
export const NBD_REP_ERR_SHUTDOWN = REP_ERR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8;
export const NBD_REP_ERR_TOO_BIG = REP_ERR + 9;

/** NBD_OPT_INFO/GO information types. */
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

/** Commands. */
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

/** Command flags. */
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

/** Structured reply chunk flags and types. */
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

/** base:allocation's flags. */
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

/** Errors on the wire (Linux's numbers, whatever the host's). */
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** The largest request payload (QEMU's NBD_MAX_BUFFER_SIZE): a bigger one is refused. */
export const NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024;
/** The longest string (an export name, a description, a query) the spec allows. */
export const NBD_MAX_STRING_SIZE = 4096;
export const NBD_DEFAULT_PORT = 10809;

/** The metadata contexts vstor serves. */
export const CONTEXT_BASE_ALLOCATION = "base:allocation";
export const CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth";

/** The 28-byte request header of the transmission phase. */
export const REQUEST_HEADER_SIZE = 28;
/** An option's header: IHAVEOPT, the option, its data's length. */
export const OPTION_HEADER_SIZE = 16;

/** One transmission-phase request header. */
export interface NbdRequest {
  readonly flags: number;
  readonly type: number;
  /** The client's cookie ("handle"), echoed in the reply: 8 bytes kept as they came. */
  readonly cookie: Uint8Array;
  readonly offset: number;
  readonly length: number;
}

/** Reads a request header, or null when its magic is wrong. */
export function decodeRequest(b: Uint8Array): NbdRequest | null {
  const v = new DataView(b.buffer, b.byteOffset, REQUEST_HEADER_SIZE);
  if (v.getUint32(0) !== NBD_REQUEST_MAGIC) return null;
  return {
    flags: v.getUint16(4),
    type: v.getUint16(6),
    cookie: b.slice(8, 16),
    // Offsets past 2^53 cannot be exact here; they are past any export's end anyway.
    offset: v.getUint32(16) * 2 ** 32 + v.getUint32(20),
    length: v.getUint32(24),
  };
}

/** Encodes a request header (for clients and tests). */
export function encodeRequest(
  type: number,
  flags: number,
  cookie: bigint,
  offset: number,
  length: number,
): Uint8Array {
  const b = new Uint8Array(REQUEST_HEADER_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, NBD_REQUEST_MAGIC);
  v.setUint16(4, flags);
  v.setUint16(6, type);
  v.setBigUint64(8, cookie);
  v.setBigUint64(16, BigInt(offset));
  v.setUint32(24, length);
  return b;
}

/** A simple reply's 16-byte header. */
export function simpleReply(cookie: Uint8Array, error: number): Uint8Array {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setUint32(0, NBD_SIMPLE_REPLY_MAGIC);
  v.setUint32(4, error);
  b.set(cookie, 8);
  return b;
}

/** A structured reply chunk's 20-byte header, for `length` payload bytes. */
export function chunkHeader(
  cookie: Uint8Array,
  flags: number,
  type: number,
  length: number,
): Uint8Array {
  const b = new Uint8Array(20);
  const v = new DataView(b.buffer);
  v.setUint32(0, NBD_STRUCTURED_REPLY_MAGIC);
  v.setUint16(4, flags);
  v.setUint16(6, type);
  b.set(cookie, 8);
  v.setUint32(16, length);
  return b;
}

/** A 64-bit big-endian offset (exact to 2^53). */
export function u64(n: number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(n));
  return b;
}

/** An option reply: magic, option, type, length, then `data`. */
export function optionReply(option: number, type: number, data?: Uint8Array): Uint8Array {
  const n = data?.length ?? 0;
  const b = new Uint8Array(20 + n);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, NBD_REP_MAGIC);
  v.setUint32(8, option);
  v.setUint32(12, type);
  v.setUint32(16, n);
  if (data !== undefined) b.set(data, 20);
  return b;
}

/** Concatenates byte strings. */
export function concat(parts: readonly Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Writes big-endian numbers and strings into a growing buffer. */
export class WireWriter {
  #parts: Uint8Array[] = [];

  u16(n: number): this {
    const b = new Uint8Array(2);
    new DataView(b.buffer).setUint16(0, n);
    this.#parts.push(b);
    return this;
  }

  u32(n: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, n);
    this.#parts.push(b);
    return this;
  }

  u64(n: number): this {
    this.#parts.push(u64(n));
    return this;
  }

  bytes(b: Uint8Array): this {
    this.#parts.push(b);
    return this;
  }

  /** A string's UTF-8 bytes preceded by their u32 length. */
  string32(s: string): this {
    const b = new TextEncoder().encode(s);
    return this.u32(b.length).bytes(b);
  }

  done(): Uint8Array {
    return concat(this.#parts);
  }
}

/** Why an option's data cannot be read as its option says. */
export class OptionDataError extends Error {}

/** Reads an option's data, failing with {@linkcode OptionDataError} when it is short. */
export class WireReader {
  readonly #view: DataView;
  readonly #bytes: Uint8Array;
  #at = 0;

  constructor(bytes: Uint8Array) {
    this.#bytes = bytes;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get left(): number {
    return this.#bytes.length - this.#at;
  }

  #need(n: number, what: string): void {
    if (this.left < n) {
      throw new OptionDataError(`the option's data ends inside ${what}`);
    }
  }

  u16(what: string): number {
    this.#need(2, what);
    const n = this.#view.getUint16(this.#at);
    this.#at += 2;
    return n;
  }

  u32(what: string): number {
    this.#need(4, what);
    const n = this.#view.getUint32(this.#at);
    this.#at += 4;
    return n;
  }

  /** A u32-length-prefixed UTF-8 string of at most NBD_MAX_STRING_SIZE bytes. */
  string32(what: string): string {
    const n = this.u32(`${what}'s length`);
    if (n > NBD_MAX_STRING_SIZE) {
      throw new OptionDataError(`${what} is ${n} bytes, over ${NBD_MAX_STRING_SIZE}`);
    }
    this.#need(n, what);
    const s = this.#bytes.subarray(this.#at, this.#at + n);
    this.#at += n;
    try {
      return new TextDecoder("utf-8", { fatal: true }).decode(s);
    } catch {
      throw new OptionDataError(`${what} is not UTF-8`);
    }
  }
}

/** A command's name for logs. */
export function commandName(type: number): string {
  return [
    "READ",
    "WRITE",
    "DISC",
    "FLUSH",
    "TRIM",
    "CACHE",
    "WRITE_ZEROES",
    "BLOCK_STATUS",
  ][type] ?? `command ${type}`;
}
