/**
 * What O_DIRECT needs from the kernel: the alignment a file's direct I/O requires, asked as QEMU's
 * file-posix asks it (statx `STATX_DIOALIGN`, a block device's `BLKSSZGET`, else probing reads),
 * and page-aligned memory for bounce buffers (an anonymous `mmap`, viewed as an ArrayBuffer
 * without a copy). See statx(2), ioctl_list(2) BLKSSZGET, mmap(2).
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { EINTR, EINVAL, errno, libc, strerror } from "./libc.ts";

/** statx(2): `AT_EMPTY_PATH` (stat the fd itself) and the `STATX_DIOALIGN` mask bit. */
const AT_EMPTY_PATH = 0x1000;
const STATX_DIOALIGN = 0x2000;
/** struct statx is 256 bytes; `stx_mask` @0, `stx_mode` @28 (u16), dio alignments @152/@156. */
const STATX_SIZE = 256;
const STX_MASK = 0;
const STX_MODE = 28;
const STX_DIO_MEM_ALIGN = 152;
const STX_DIO_OFFSET_ALIGN = 156;
const S_IFMT = 0o170000;
const S_IFBLK = 0o060000;
/** ioctl BLKSSZGET: the logical block size of a block device (an int). */
const BLKSSZGET = 0x1268n;
/** The largest alignment probed and assumed (QEMU's MAX_BLOCKSIZE is 4096). */
export const MAX_DIO_ALIGN = 4096;

/** The alignment direct I/O on one file needs. */
export interface DioAlignment {
  /** Buffers must start at a multiple of this (bytes). */
  readonly memory: number;
  /** Offsets and lengths must be multiples of this (bytes). */
  readonly offset: number;
  /** How it was found: `statx`, `BLKSSZGET`, `probe`, or `default` (every probe failed). */
  readonly source: "statx" | "BLKSSZGET" | "probe" | "default";
}

const EMPTY_PATH = new Uint8Array([0]);

/**
 * The direct-I/O alignment of `fd` (opened with O_DIRECT): statx's `STATX_DIOALIGN` where the
 * kernel and file system report it, `BLKSSZGET` for a block device, else the smallest size a
 * probing read at offset 0 accepts (QEMU's raw_probe_alignment), else 4096.
 */
export function dioAlignment(fd: number): DioAlignment {
  const c = libc();
  const buf = new Uint8Array(STATX_SIZE);
  const view = new DataView(buf.buffer);
  let blockDevice = false;
  if (c.statx(fd, EMPTY_PATH, AT_EMPTY_PATH, STATX_DIOALIGN, buf) === 0) {
    blockDevice = (view.getUint16(STX_MODE, true) & S_IFMT) === S_IFBLK;
    const mask = view.getUint32(STX_MASK, true);
    const memory = view.getUint32(STX_DIO_MEM_ALIGN, true);
    const offset = view.getUint32(STX_DIO_OFFSET_ALIGN, true);
    if ((mask & STATX_DIOALIGN) !== 0 && memory > 0 && offset > 0) {
      return { memory, offset, source: "statx" };
    }
  }
  if (blockDevice) {
    const size = new Uint8Array(4);
    if (c.ioctl(fd, BLKSSZGET, size) === 0) {
      const block = new DataView(size.buffer).getInt32(0, true);
      if (block > 0) return { memory: block, offset: block, source: "BLKSSZGET" };
    }
  }
  // Probe as QEMU does: the smallest read length that an aligned buffer accepts at offset 0.
  const page = new AlignedBuffer(MAX_DIO_ALIGN);
  try {
    for (let size = 512; size <= MAX_DIO_ALIGN; size *= 2) {
      const n = c.pread(fd, page.bytes.subarray(0, size), BigInt(size), 0n);
      if (n >= 0) return { memory: size, offset: size, source: "probe" };
      const code = errno();
      if (code !== EINVAL && code !== EINTR) break;
    }
  } finally {
    page.free();
  }
  return { memory: MAX_DIO_ALIGN, offset: MAX_DIO_ALIGN, source: "default" };
}

const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const PAGE = 4096;

/**
 * Page-aligned memory outside the JS heap (an anonymous private mapping), usable as an O_DIRECT
 * buffer: `bytes` views it without a copy. Freed exactly once by {@linkcode free}.
 *
 * @example (needs `--allow-ffi`)
 * ```ts
 * import { AlignedBuffer } from "./direct.ts";
 * const b = new AlignedBuffer(8192);
 * b.bytes[8191] = 7;
 * if (b.bytes.length !== 8192 || b.address % 4096n !== 0n) throw new Error("not page-aligned");
 * b.free();
 * ```
 */
export class AlignedBuffer {
  /** The memory, `length` bytes (rounded up to whole pages). */
  readonly bytes: Uint8Array<ArrayBuffer>;
  readonly #pointer: Deno.PointerObject;
  readonly #length: number;
  #freed = false;

  /**
   * @param length bytes wanted (rounded up to a multiple of 4096)
   * @throws {BlockError} `io` when the kernel refuses the mapping
   */
  constructor(length: number) {
    if (!Number.isSafeInteger(length) || length <= 0) {
      throw new RangeError(`An aligned buffer needs a positive length, got ${length}`);
    }
    this.#length = Math.ceil(length / PAGE) * PAGE;
    const p = libc().mmap(
      null,
      BigInt(this.#length),
      PROT_READ | PROT_WRITE,
      MAP_PRIVATE | MAP_ANONYMOUS,
      -1,
      0n,
    );
    // MAP_FAILED is (void *)-1.
    if (p === null || BigInt(Deno.UnsafePointer.value(p)) === 0xffff_ffff_ffff_ffffn) {
      const code = errno();
      throw new BlockError("io", `mmap of ${this.#length} bytes failed: ${strerror(code)}`, {
        errno: code,
      });
    }
    this.#pointer = p;
    this.bytes = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(p, this.#length));
  }

  /** The buffer's address (page-aligned). */
  get address(): bigint {
    return BigInt(Deno.UnsafePointer.value(this.#pointer));
  }

  /** Unmap the memory; `bytes` must not be used afterwards. Idempotent. */
  free(): void {
    if (this.#freed) return;
    this.#freed = true;
    libc().munmap(this.#pointer, BigInt(this.#length));
  }
}
