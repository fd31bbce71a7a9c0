/**
 * Memory shared through file descriptors: memfd_create(2), shared mmap(2) of a region fd (guest
 * RAM a vhost-user front-end sends), and a true `SharedArrayBuffer` aliasing such fds, so Workers
 * share guest RAM with plain typed arrays and `Atomics` and no FFI. See memfd_create(2), mmap(2).
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { cPath, errno, libc } from "./libc.ts";
import { errnoText } from "./uring.ts";

/** memfd_create(2) flags. */
export const MFD_CLOEXEC = 1;
export const MFD_ALLOW_SEALING = 2;
const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 0x01;
const MAP_PRIVATE = 0x02;
const MAP_FIXED = 0x10;
const MAP_ANONYMOUS = 0x20;
const MAP_NORESERVE = 0x4000;
/** The page size mappings are aligned to (x86_64). */
export const PAGE_SIZE = 4096;
const MAP_FAILED = 0xffff_ffff_ffff_ffffn;

function failed(call: string, code: number): BlockError {
  return new BlockError("io", `${call}: ${errnoText(code)}`, { errno: code });
}

function mapFailed(p: Deno.PointerValue): boolean {
  return p === null || BigInt(Deno.UnsafePointer.value(p)) === MAP_FAILED;
}

function checkPages(what: string, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0 || value % PAGE_SIZE !== 0) {
    throw new RangeError(`${what} must be a multiple of ${PAGE_SIZE} bytes, got ${value}`);
  }
}

/**
 * An anonymous file in memory (memfd_create(2)), empty until {@linkcode ftruncate} sizes it.
 *
 * @param name shown in /proc/self/fd (at most 249 bytes)
 * @param flags `MFD_CLOEXEC` (default), `MFD_ALLOW_SEALING`
 * @returns the fd
 */
export function memfdCreate(name: string, flags = MFD_CLOEXEC): number {
  const fd = libc().memfd_create(cPath(name), flags);
  if (fd < 0) throw failed("memfd_create", errno());
  return fd;
}

/** Sets the size of the file behind `fd` (ftruncate(2)). */
export function ftruncate(fd: number, length: number): void {
  if (!Number.isSafeInteger(length) || length < 0) {
    throw new RangeError(`A file size must be a non-negative integer, got ${length}`);
  }
  if (libc().ftruncate(fd, BigInt(length)) < 0) throw failed("ftruncate", errno());
}

/** A shared mapping of a file: its memory as bytes, unmapped once by {@linkcode unmap}. */
export interface SharedMapping {
  /** Where it is mapped (for code in `src/sys/` only). */
  readonly pointer: Deno.PointerObject;
  /** The mapping without a copy (a non-shared ArrayBuffer: `Atomics.wait` does not work on it). */
  readonly bytes: Uint8Array<ArrayBuffer>;
  readonly length: number;
  /** munmap(2); `bytes` must not be touched afterwards. Idempotent. */
  unmap(): void;
}

/**
 * Maps `length` bytes of `fd` from `offset` read-write and shared (writes reach the file and
 * every other mapping of it). The mapping keeps the file alive: `fd` may be closed after.
 *
 * @param offset a multiple of {@linkcode PAGE_SIZE}
 * @throws {BlockError} `io` naming mmap's errno (EACCES: fd not open read-write; EINVAL; ENOMEM)
 */
export function mmapShared(fd: number, length: number, offset: number | bigint = 0): SharedMapping {
  if (!Number.isSafeInteger(length) || length <= 0) {
    throw new RangeError(`A mapping needs a positive length, got ${length}`);
  }
  const off = BigInt(offset);
  if (off < 0n || off % BigInt(PAGE_SIZE) !== 0n) {
    throw new RangeError(
      `A mapping's file offset must be a multiple of ${PAGE_SIZE}, got ${offset}`,
    );
  }
  const c = libc();
  const p = c.mmap(null, BigInt(length), PROT_READ | PROT_WRITE, MAP_SHARED, fd, off);
  if (mapFailed(p)) {
    const code = errno();
    throw new BlockError(
      "io",
      `mmap of ${length} bytes of fd ${fd} at ${offset}: ${errnoText(code)}`,
      { errno: code, offset: Number(off), length },
    );
  }
  const pointer = p as Deno.PointerObject;
  let mapped = true;
  return {
    pointer,
    bytes: new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(pointer, length)),
    length,
    unmap() {
      if (!mapped) return;
      mapped = false;
      if (c.munmap(pointer, BigInt(length)) < 0) throw failed("munmap", errno());
    },
  };
}

const AT_EMPTY_PATH = 0x1000;
/** statx's STATX_SIZE mask bit; `stx_size` is the u64 at byte 40 of the 256-byte struct statx. */
const STATX_SIZE_BIT = 0x200;
const STX_SIZE = 40;
const EMPTY_PATH = new Uint8Array(1);

/**
 * The size in bytes of what `fd` refers to (statx on the fd): a mapping must stay inside it, since
 * touching a page past the end of a file is a SIGBUS, not an error.
 *
 * @throws {BlockError} `io` naming statx's errno
 */
export function fdSize(fd: number): number {
  const buf = new Uint8Array(256);
  if (libc().statx(fd, EMPTY_PATH, AT_EMPTY_PATH, STATX_SIZE_BIT, buf) !== 0) {
    const code = errno();
    throw new BlockError("io", `statx of fd ${fd}: ${errnoText(code)}`, { errno: code });
  }
  return Number(new DataView(buf.buffer).getBigUint64(STX_SIZE, true));
}

/** One fd mapped into a {@linkcode sharedBufferOverFds} buffer. */
export interface FdRegion {
  readonly fd: number;
  /** Offset in the file (mmap_offset), a multiple of {@linkcode PAGE_SIZE}. */
  readonly offset: number | bigint;
  /** Bytes, a multiple of {@linkcode PAGE_SIZE}. */
  readonly length: number;
  /** Where in the buffer (from {@linkcode SharedFdBuffer.offset}), a multiple of the page size. */
  readonly at: number;
}

/** A SharedArrayBuffer whose pages alias file descriptors' memory. */
export interface SharedFdBuffer {
  /**
   * The buffer: post it to Workers like any SharedArrayBuffer. It is growable (that is how its
   * memory is page-aligned) but already at its maximum; use fixed-length views over it.
   */
  readonly buffer: SharedArrayBuffer;
  /** Where byte 0 of the layout is in `buffer` (region `at` is relative to it); 0 on Deno 2.9. */
  readonly offset: number;
  /**
   * Maps fresh anonymous memory (zeros) over each region, so the buffer stops aliasing the fds
   * and their memory can go (when the front-end drops a memory table). Idempotent. Without it the
   * aliases last as long as the buffer, and end when V8 frees it: this object holds the buffer, so
   * release is never called on an address V8 has given back.
   */
  release(): void;
}

/** The address of a SharedArrayBuffer's first byte. */
function sabAddress(buffer: SharedArrayBuffer): number {
  return Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(new Uint8Array(buffer, 0, 1))));
}

/** A growable SAB of `total` bytes whose memory starts on a page, and the offset of that page. */
function pageAlignedSab(
  total: number,
): { buffer: SharedArrayBuffer; offset: number; base: number } {
  // V8 reserves a growable buffer's pages with the page allocator: page-aligned as measured here.
  let buffer = new SharedArrayBuffer(total, { maxByteLength: total });
  let base = sabAddress(buffer);
  if (base % PAGE_SIZE === 0) return { buffer, offset: 0, base };
  // Not on this V8: over-allocate by a page and align inside.
  buffer = new SharedArrayBuffer(total + PAGE_SIZE, { maxByteLength: total + PAGE_SIZE });
  base = sabAddress(buffer);
  const offset = (PAGE_SIZE - (base % PAGE_SIZE)) % PAGE_SIZE;
  return { buffer, offset, base: base + offset };
}

function mapFixed(
  base: number,
  length: number,
  flags: number,
  fd: number,
  offset: bigint,
): void {
  const c = libc();
  const want = Deno.UnsafePointer.create(BigInt(base));
  const p = c.mmap(want, BigInt(length), PROT_READ | PROT_WRITE, MAP_FIXED | flags, fd, offset);
  if (mapFailed(p)) {
    const code = errno();
    throw new BlockError(
      "io",
      `mmap (MAP_FIXED) of ${length} bytes of fd ${fd} at ${offset}: ${errnoText(code)}`,
      { errno: code, length },
    );
  }
  if (Number(Deno.UnsafePointer.value(p)) !== base) {
    throw new BlockError("io", "mmap with MAP_FIXED returned another address");
  }
}

/** Without checks: the mapping itself, used by the self-test and by sharedBufferOverFds. */
function overFds(total: number, regions: readonly FdRegion[]): SharedFdBuffer {
  const { buffer, offset, base } = pageAlignedSab(total);
  const mapped: FdRegion[] = [];
  const release = () => {
    while (mapped.length > 0) {
      const r = mapped.pop()!;
      // As V8 reserved it: private, anonymous, no swap reserved (no commit charge for GiBs of RAM).
      mapFixed(base + r.at, r.length, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0n);
    }
  };
  try {
    for (const r of regions) {
      mapFixed(base + r.at, r.length, MAP_SHARED, r.fd, BigInt(r.offset));
      mapped.push(r);
    }
  } catch (e) {
    release();
    throw e;
  }
  return { buffer, offset, release };
}

let aliasWorks: boolean | undefined;

/**
 * Whether mapping an fd over a SharedArrayBuffer's memory makes the buffer alias it on this
 * Deno (it relies on V8 keeping a growable buffer's memory where it reserved it): a memfd is
 * mapped into the middle page of a three-page buffer, and bytes written through a separate
 * mapping of the memfd must show in the buffer, and the reverse, the pages around untouched; after
 * release the buffer reads zeros while the memfd keeps its bytes. Cached after the first call.
 */
export function sharedBufferAliasWorks(): boolean {
  if (aliasWorks !== undefined) return aliasWorks;
  let fd = -1;
  let mapping: SharedMapping | undefined;
  try {
    fd = memfdCreate("vstor-sab-selftest");
    ftruncate(fd, PAGE_SIZE);
    mapping = mmapShared(fd, PAGE_SIZE, 0);
    const shared = overFds(3 * PAGE_SIZE, [{ fd, offset: 0, length: PAGE_SIZE, at: PAGE_SIZE }]);
    const view = new Uint8Array(shared.buffer, shared.offset, 3 * PAGE_SIZE);
    mapping.bytes[0] = 0x5a;
    mapping.bytes[PAGE_SIZE - 1] = 0xa5;
    view[PAGE_SIZE + 1] = 0x3c;
    const ok = view[PAGE_SIZE] === 0x5a && view[2 * PAGE_SIZE - 1] === 0xa5 &&
      mapping.bytes[1] === 0x3c && view[0] === 0 && view[2 * PAGE_SIZE] === 0 &&
      Atomics.load(view, PAGE_SIZE) === 0x5a;
    shared.release();
    aliasWorks = ok && view[PAGE_SIZE] === 0 && mapping.bytes[0] === 0x5a;
  } catch {
    aliasWorks = false;
  } finally {
    mapping?.unmap();
    if (fd >= 0) libc().close(fd);
  }
  return aliasWorks;
}

/**
 * A SharedArrayBuffer of `total` bytes in which each region's fd is mapped (MAP_SHARED|MAP_FIXED)
 * at `at`: guest RAM a vhost-user front-end shares becomes a buffer Workers can be given, with
 * `Atomics.wait` working on it. The fds may be closed afterwards (the mappings hold the files).
 * Bytes outside the regions are private zeros.
 *
 * @throws {BlockError} `unsupported` when {@linkcode sharedBufferAliasWorks} is false here;
 *   `io` naming mmap's errno when a region cannot be mapped (none stays mapped then)
 * @throws {RangeError} for sizes or offsets not page-aligned, or regions outside or overlapping
 *
 * @example (needs `--allow-ffi`)
 * ```ts
 * import { ftruncate, memfdCreate, mmapShared, sharedBufferOverFds } from "./shared_memory.ts";
 * import { close } from "./unix_socket.ts";
 * const fd = memfdCreate("guest-ram");
 * ftruncate(fd, 65536);
 * const ram = sharedBufferOverFds(65536, [{ fd, offset: 0, length: 65536, at: 0 }]);
 * const other = mmapShared(fd, 4096);
 * other.bytes[0] = 42;
 * if (new Uint8Array(ram.buffer, ram.offset, 65536)[0] !== 42) throw new Error("no alias");
 * ram.release();
 * other.unmap();
 * close(fd);
 * ```
 */
export function sharedBufferOverFds(total: number, regions: readonly FdRegion[]): SharedFdBuffer {
  checkPages("A shared buffer's size", total);
  if (total === 0) throw new RangeError("A shared buffer needs a positive size");
  const sorted = [...regions].sort((a, b) => a.at - b.at);
  let end = 0;
  for (const r of sorted) {
    checkPages("A region's position", r.at);
    checkPages("A region's length", r.length);
    if (r.length === 0) throw new RangeError("A region needs a positive length");
    if (BigInt(r.offset) < 0n || BigInt(r.offset) % BigInt(PAGE_SIZE) !== 0n) {
      throw new RangeError(`A region's file offset must be page-aligned, got ${r.offset}`);
    }
    if (r.at < end) throw new RangeError(`Regions overlap at ${r.at}`);
    end = r.at + r.length;
    if (end > total) {
      throw new RangeError(`A region ends at ${end}, past the buffer's ${total} bytes`);
    }
  }
  if (!sharedBufferAliasWorks()) {
    throw new BlockError(
      "unsupported",
      "A SharedArrayBuffer cannot alias mapped fds on this Deno (the start-up self-test failed): " +
        "map each region with mmapShared instead",
    );
  }
  return overFds(total, sorted);
}
