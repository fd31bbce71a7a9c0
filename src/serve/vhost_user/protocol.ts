/**
 * The vhost-user wire format (QEMU's docs/interop/vhost-user.rst): the 12-byte header, the request
 * numbers, the feature bits, and a decoder that turns a received message (header, payload, file
 * descriptors) into a typed request — or a {@linkcode VhostUserProtocolError} naming what is wrong —
 * plus encoders for the back-end's replies. Everything here is pure: no sockets, no mappings.
 *
 * All numbers are little-endian (x86_64's native order, which the protocol uses). 64-bit fields
 * are read as two 32-bit halves into JavaScript numbers where they must be exact below 2^53
 * (addresses and sizes beyond that are refused, not rounded), and as bigint for feature masks.
 *
 * @module
 */

/** Bytes of the header: request, flags, size (u32 each). */
export const HEADER_BYTES = 12;
/** The protocol version in the low two flag bits. */
export const VERSION = 0x1;
const VERSION_MASK = 0x3;
/** Set on every reply from the back-end. */
export const FLAG_REPLY = 0x4;
/** The front-end wants an acknowledgement (with REPLY_ACK). */
export const FLAG_NEED_REPLY = 0x8;
/** The largest payload a back-end takes: QEMU's largest message is a few KiB. */
export const MAX_PAYLOAD = 4096;
/** File descriptors one message may carry (the memory table's eight regions). */
export const MAX_FDS = 8;
/** Regions a SET_MEM_TABLE carries at most (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_TABLE_REGIONS = 8;
/** Memory slots with CONFIGURE_MEM_SLOTS (what GET_MAX_MEM_SLOTS answers; QEMU's own limit). */
export const MAX_MEM_SLOTS = 509;
/** sizeof(VhostUserInflight): u64, u64, u16, u16 and padding to 8. */
export const INFLIGHT_BYTES = 24;
/** The largest config space access (QEMU's VHOST_USER_MAX_CONFIG_SIZE). */
export const MAX_CONFIG_SIZE = 256;

/** Requests from the front-end. */
export const REQ = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

/** A request's name for messages and logs (`SET_MEM_TABLE`), or `request N`. */
export function requestName(request: number): string {
  for (const [name, value] of Object.entries(REQ)) if (value === request) return name;
  return `request ${request}`;
}

/** Feature bit 30: the back-end speaks protocol features (vhost-user's own, never the guest's). */
export const F_PROTOCOL_FEATURES = 30;
/** VHOST_F_LOG_ALL: dirty logging for migration (not offered). */
export const F_LOG_ALL = 26;

/** Protocol feature bits. */
export const PF = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/** SET_VRING_KICK/CALL/ERR: bits 0–7 the ring index; bit 8 set when no fd comes (polling). */
export const VRING_INDEX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;

/** SET_VRING_BASE's num for a packed ring: bit 15 the wrap counter (of avail and, above, used). */
export const PACKED_WRAP_BIT = 1 << 15;

/** A message that breaks the protocol: the connection is dropped with this as the log line. */
export class VhostUserProtocolError extends Error {
  /** Always `VhostUserProtocolError`. */
  override readonly name = "VhostUserProtocolError";
  /** The request the message carried (its number), or -1 for a bad header. */
  readonly request: number;

  /** @param request the request number, -1 when the header itself is bad */
  constructor(request: number, message: string) {
    super(request < 0 ? message : `${requestName(request)}: ${message}`);
    this.request = request;
  }
}

/** The header of one message. */
export interface Header {
  readonly request: number;
  readonly flags: number;
  readonly size: number;
}

/**
 * Reads and checks a header: the version, no reply bit from a front-end, a payload no larger than
 * {@linkcode MAX_PAYLOAD}.
 *
 * @throws {VhostUserProtocolError} naming what is wrong
 */
export function parseHeader(bytes: Uint8Array): Header {
  if (bytes.length < HEADER_BYTES) {
    throw new VhostUserProtocolError(-1, `short header: ${bytes.length} of 12 bytes`);
  }
  const v = new DataView(bytes.buffer, bytes.byteOffset, HEADER_BYTES);
  const request = v.getUint32(0, true);
  const flags = v.getUint32(4, true);
  const size = v.getUint32(8, true);
  if ((flags & VERSION_MASK) !== VERSION) {
    throw new VhostUserProtocolError(-1, `unsupported protocol version ${flags & VERSION_MASK}`);
  }
  if ((flags & FLAG_REPLY) !== 0) {
    throw new VhostUserProtocolError(request, "a front-end message has the reply flag set");
  }
  if (size > MAX_PAYLOAD) {
    throw new VhostUserProtocolError(request, `payload of ${size} bytes (at most ${MAX_PAYLOAD})`);
  }
  return { request, flags, size };
}

/** One region of guest memory as the front-end maps it. */
export interface MemoryRegion {
  /** Guest-physical address of its first byte. */
  readonly guestAddress: number;
  /** Bytes in the region. */
  readonly size: number;
  /** The front-end's virtual address of its first byte (what ring addresses use). */
  readonly userAddress: number;
  /** Where the region starts in its fd's mapping. */
  readonly mmapOffset: number;
}

/** A vring address description. */
export interface VringAddress {
  readonly index: number;
  readonly flags: number;
  readonly descriptor: number;
  readonly used: number;
  readonly available: number;
  readonly log: number;
}

/** A decoded request. Fds arrive with it where the request carries any. */
export type Request =
  | { readonly kind: "u64"; readonly request: number; readonly value: bigint }
  | { readonly kind: "none"; readonly request: number }
  | {
    readonly kind: "state";
    readonly request: number;
    readonly index: number;
    readonly num: number;
  }
  | ({ readonly kind: "addr"; readonly request: number } & VringAddress)
  | {
    readonly kind: "vring-fd";
    readonly request: number;
    readonly index: number;
    /** The eventfd, or -1 with the no-fd bit (the ring is polled / in-band). */
    readonly fd: number;
  }
  | {
    readonly kind: "mem-table";
    readonly request: number;
    readonly regions: readonly MemoryRegion[];
    readonly fds: readonly number[];
  }
  | {
    readonly kind: "mem-reg";
    readonly request: number;
    readonly region: MemoryRegion;
    /** The region's fd (ADD_MEM_REG), or -1 (REM_MEM_REG may carry none). */
    readonly fd: number;
  }
  | {
    readonly kind: "config";
    readonly request: number;
    readonly offset: number;
    readonly size: number;
    readonly flags: number;
    readonly payload: Uint8Array;
  }
  | {
    readonly kind: "inflight";
    readonly request: number;
    readonly mmapSize: number;
    readonly mmapOffset: number;
    readonly numQueues: number;
    readonly queueSize: number;
    /** SET_INFLIGHT_FD's fd; -1 for GET_INFLIGHT_FD. */
    readonly fd: number;
  };

const TWO_32 = 0x1_0000_0000;

/** An exact u64 below 2^53 at `at`, or a protocol error naming `what`. */
function u64(v: DataView, at: number, request: number, what: string): number {
  const lo = v.getUint32(at, true);
  const hi = v.getUint32(at + 4, true);
  if (hi >= 0x20_0000) {
    throw new VhostUserProtocolError(
      request,
      `${what} 0x${hi.toString(16)}${lo.toString(16).padStart(8, "0")} is past 2^53`,
    );
  }
  return hi * TWO_32 + lo;
}

function region(v: DataView, at: number, request: number): MemoryRegion {
  const r = {
    guestAddress: u64(v, at, request, "guest address"),
    size: u64(v, at + 8, request, "region size"),
    userAddress: u64(v, at + 16, request, "user address"),
    mmapOffset: u64(v, at + 24, request, "mmap offset"),
  };
  if (r.size === 0) throw new VhostUserProtocolError(request, "a memory region of 0 bytes");
  if (r.guestAddress + r.size > 2 ** 53 || r.userAddress + r.size > 2 ** 53) {
    throw new VhostUserProtocolError(request, "a memory region that ends past 2^53");
  }
  return r;
}

function needSize(request: number, size: number, want: number, what: string): void {
  if (size < want) {
    throw new VhostUserProtocolError(request, `${what} needs ${want} bytes, got ${size}`);
  }
}

function noFds(request: number, fds: readonly number[]): void {
  if (fds.length > 0) {
    throw new VhostUserProtocolError(
      request,
      `carries ${fds.length} unexpected file descriptor(s)`,
    );
  }
}

/**
 * Decodes a request's payload. The caller owns `fds` and closes them when this throws, or when the
 * request (as decoded) does not keep them.
 *
 * @throws {VhostUserProtocolError} for a payload too short for its request, the wrong number of
 *   fds, values past what the protocol allows, or an unknown request
 */
export function decodeRequest(
  header: Header,
  payload: Uint8Array,
  fds: readonly number[],
): Request {
  const request = header.request;
  const size = payload.length;
  const v = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  switch (request) {
    case REQ.GET_FEATURES:
    case REQ.GET_PROTOCOL_FEATURES:
    case REQ.SET_OWNER:
    case REQ.RESET_OWNER:
    case REQ.GET_QUEUE_NUM:
    case REQ.RESET_DEVICE:
    case REQ.GET_MAX_MEM_SLOTS:
    case REQ.GET_STATUS:
      noFds(request, fds);
      return { kind: "none", request };
    case REQ.SET_FEATURES:
    case REQ.SET_PROTOCOL_FEATURES:
    case REQ.SET_STATUS: {
      needSize(request, size, 8, "its u64");
      noFds(request, fds);
      return { kind: "u64", request, value: v.getBigUint64(0, true) };
    }
    case REQ.SET_VRING_NUM:
    case REQ.SET_VRING_BASE:
    case REQ.GET_VRING_BASE:
    case REQ.SET_VRING_ENABLE:
    case REQ.VRING_KICK: {
      needSize(request, size, 8, "a vring state");
      noFds(request, fds);
      return { kind: "state", request, index: v.getUint32(0, true), num: v.getUint32(4, true) };
    }
    case REQ.SET_VRING_ADDR: {
      needSize(request, size, 40, "a vring address");
      noFds(request, fds);
      return {
        kind: "addr",
        request,
        index: v.getUint32(0, true),
        flags: v.getUint32(4, true),
        descriptor: u64(v, 8, request, "descriptor address"),
        used: u64(v, 16, request, "used ring address"),
        available: u64(v, 24, request, "available ring address"),
        log: u64(v, 32, request, "log address"),
      };
    }
    case REQ.SET_VRING_KICK:
    case REQ.SET_VRING_CALL:
    case REQ.SET_VRING_ERR: {
      needSize(request, size, 8, "its u64");
      const lo = v.getUint32(0, true);
      const index = lo & VRING_INDEX_MASK;
      if ((lo & VRING_NOFD_MASK) !== 0) {
        noFds(request, fds);
        return { kind: "vring-fd", request, index, fd: -1 };
      }
      if (fds.length !== 1) {
        throw new VhostUserProtocolError(
          request,
          `needs one file descriptor, got ${fds.length}`,
        );
      }
      return { kind: "vring-fd", request, index, fd: fds[0]! };
    }
    case REQ.SET_MEM_TABLE: {
      needSize(request, size, 8, "a memory table");
      const count = v.getUint32(0, true);
      if (count === 0 || count > MAX_TABLE_REGIONS) {
        throw new VhostUserProtocolError(request, `${count} regions (1 to 8)`);
      }
      needSize(request, size, 8 + count * 32, `a table of ${count} regions`);
      if (fds.length !== count) {
        throw new VhostUserProtocolError(
          request,
          `${count} regions but ${fds.length} file descriptor(s)`,
        );
      }
      const regions: MemoryRegion[] = [];
      for (let i = 0; i < count; i++) regions.push(region(v, 8 + i * 32, request));
      return { kind: "mem-table", request, regions, fds: [...fds] };
    }
    case REQ.ADD_MEM_REG:
    case REQ.REM_MEM_REG: {
      needSize(request, size, 40, "a memory region");
      const r = region(v, 8, request);
      if (request === REQ.ADD_MEM_REG && fds.length !== 1) {
        throw new VhostUserProtocolError(request, `needs one file descriptor, got ${fds.length}`);
      }
      if (fds.length > 1) {
        throw new VhostUserProtocolError(request, `carries ${fds.length} file descriptors`);
      }
      return { kind: "mem-reg", request, region: r, fd: fds[0] ?? -1 };
    }
    case REQ.GET_CONFIG:
    case REQ.SET_CONFIG: {
      needSize(request, size, 12, "a config header");
      noFds(request, fds);
      const offset = v.getUint32(0, true);
      const length = v.getUint32(4, true);
      const flags = v.getUint32(8, true);
      if (length > MAX_CONFIG_SIZE || offset > MAX_CONFIG_SIZE - length) {
        throw new VhostUserProtocolError(
          request,
          `config access of ${length} bytes at ${offset} (the space is ${MAX_CONFIG_SIZE})`,
        );
      }
      needSize(request, size, 12 + length, `a config access of ${length} bytes`);
      return {
        kind: "config",
        request,
        offset,
        size: length,
        flags,
        payload: payload.slice(12, 12 + length),
      };
    }
    case REQ.GET_INFLIGHT_FD:
    case REQ.SET_INFLIGHT_FD: {
      needSize(request, size, 20, "an inflight description");
      const want = request === REQ.SET_INFLIGHT_FD ? 1 : 0;
      if (fds.length !== want) {
        throw new VhostUserProtocolError(
          request,
          `needs ${want} file descriptor(s), got ${fds.length}`,
        );
      }
      return {
        kind: "inflight",
        request,
        mmapSize: u64(v, 0, request, "inflight size"),
        mmapOffset: u64(v, 8, request, "inflight offset"),
        numQueues: v.getUint16(16, true),
        queueSize: v.getUint16(18, true),
        fd: fds[0] ?? -1,
      };
    }
    default:
      throw new VhostUserProtocolError(request, "not supported by this back-end");
  }
}

/** A reply header and payload, ready to send. */
export function encodeReply(request: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_BYTES + payload.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, request, true);
  v.setUint32(4, VERSION | FLAG_REPLY, true);
  v.setUint32(8, payload.length, true);
  out.set(payload, HEADER_BYTES);
  return out;
}

/** A u64 reply (features, protocol features, queue count, memory slots, status, REPLY_ACK). */
export function replyU64(request: number, value: bigint | number): Uint8Array {
  const payload = new Uint8Array(8);
  new DataView(payload.buffer).setBigUint64(0, BigInt(value), true);
  return encodeReply(request, payload);
}

/** A vring state reply (GET_VRING_BASE). */
export function replyState(request: number, index: number, num: number): Uint8Array {
  const payload = new Uint8Array(8);
  const v = new DataView(payload.buffer);
  v.setUint32(0, index, true);
  v.setUint32(4, num, true);
  return encodeReply(request, payload);
}

/** A config reply (GET_CONFIG): the header fields echoed and `bytes` as the payload. */
export function replyConfig(
  request: number,
  offset: number,
  flags: number,
  bytes: Uint8Array,
): Uint8Array {
  const payload = new Uint8Array(12 + bytes.length);
  const v = new DataView(payload.buffer);
  v.setUint32(0, offset, true);
  v.setUint32(4, bytes.length, true);
  v.setUint32(8, flags, true);
  payload.set(bytes, 12);
  return encodeReply(request, payload);
}

/** An inflight description reply (GET_INFLIGHT_FD; the fd goes with it). */
export function replyInflight(
  request: number,
  mmapSize: number,
  mmapOffset: number,
  numQueues: number,
  queueSize: number,
): Uint8Array {
  // struct VhostUserInflight is 24 bytes in C (two u64 and two u16, padded to 8): QEMU checks it.
  const payload = new Uint8Array(INFLIGHT_BYTES);
  const v = new DataView(payload.buffer);
  v.setBigUint64(0, BigInt(mmapSize), true);
  v.setBigUint64(8, BigInt(mmapOffset), true);
  v.setUint16(16, numQueues, true);
  v.setUint16(18, queueSize, true);
  return encodeReply(request, payload);
}

/** A single memory region payload (ADD/REM_MEM_REG), for front-ends (tests). */
export function encodeRegion(r: MemoryRegion): Uint8Array {
  const payload = new Uint8Array(40);
  const v = new DataView(payload.buffer);
  v.setBigUint64(8, BigInt(r.guestAddress), true);
  v.setBigUint64(16, BigInt(r.size), true);
  v.setBigUint64(24, BigInt(r.userAddress), true);
  v.setBigUint64(32, BigInt(r.mmapOffset), true);
  return payload;
}

/** A front-end's request message (header and payload), for front-ends (tests, a client). */
export function encodeRequest(request: number, payload: Uint8Array, needReply = false): Uint8Array {
  const out = new Uint8Array(HEADER_BYTES + payload.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, request, true);
  v.setUint32(4, VERSION | (needReply ? FLAG_NEED_REPLY : 0), true);
  v.setUint32(8, payload.length, true);
  out.set(payload, HEADER_BYTES);
  return out;
}
