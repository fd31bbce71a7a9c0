/**
 * Host files and block devices through positional synchronous libc calls.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import type { HostExtent, HostFile } from "./host_file.ts";
import {
  cPath,
  EINTR,
  ENXIO,
  EOPNOTSUPP,
  errno,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  libc,
  MAX_IO_CHUNK,
  O_CLOEXEC,
  O_CREAT,
  O_DIRECT,
  O_DSYNC,
  O_EXCL,
  O_RDONLY,
  O_RDWR,
  SEEK_DATA,
  SEEK_END,
  SEEK_HOLE,
  strerror,
} from "../sys/libc.ts";
import { AlignedBuffer, type DioAlignment, dioAlignment } from "../sys/direct.ts";
import { applyImageLocks, permsFor, releaseImageLocks } from "./lock.ts";
import { UringQueue } from "./uring_queue.ts";
import { ThreadPool } from "./thread_pool.ts";

/** Options of {@linkcode openHostFile}. */
export interface HostFileOptions {
  /** Open for reading only (default false). */
  readOnly?: boolean;
  /** Create the file (it must not exist when `exclusive`). */
  create?: boolean;
  /** With `create`: fail when the file exists (O_EXCL). */
  exclusive?: boolean;
  /** Take QEMU-compatible image locks (default true). */
  lock?: boolean;
  /** Read-only opens share the write permission with others (qemu-img -U). */
  forceShare?: boolean;
  /**
   * Bypass the page cache (O_DIRECT, QEMU's `cache.direct=on`): requests that are not aligned to
   * what the file needs go through a page-aligned bounce buffer, partial blocks read-modify-write.
   */
  direct?: boolean;
  /** Every write durable when it returns (O_DSYNC; QEMU's cache=directsync with `direct`). */
  dsync?: boolean;
  /**
   * How `readAtAsync`/`writeAtAsync` run (QEMU's `aio`). Not given: as the synchronous calls, one
   * request at a time (fastest on the page cache). `threads` given explicitly: a pool of Workers
   * (4 at most, started as requests need them) runs synchronous pread/pwrite on this file, so as
   * many requests as Workers reach the disk at once. `io_uring`: many requests in flight through
   * one io_uring per file. With either, unaligned O_DIRECT writes still go the synchronous
   * read-modify-write way (unaligned O_DIRECT reads go through the pool, not the ring).
   */
  aio?: "threads" | "io_uring";
}

const ZERO_CHUNK = 1 << 20;
/** Bytes of the O_DIRECT bounce buffer: longer requests go through it in windows. */
const DIRECT_BOUNCE = 1 << 20;

/** A file or block device on the host. */
class FileHost implements HostFile {
  readonly path: string;
  readonly readOnly: boolean;
  #fd: number;
  #punchHoleWorks = true;
  /** Size as we last set or saw it: a writable file is ours alone (we hold the write lock). */
  #cachedSize = -1;

  /** O_DIRECT: the alignment the file needs, and the bounce buffer (made on first use). */
  readonly #direct: DioAlignment | undefined;
  #bounce: AlignedBuffer | undefined;
  /**
   * What `readAtAsync`/`writeAtAsync` go through: the ring (aio=io_uring), the Workers (aio=threads
   * given explicitly), or nothing (the synchronous calls).
   */
  readonly #engine: UringQueue | ThreadPool | undefined;

  constructor(
    path: string,
    fd: number,
    readOnly: boolean,
    direct: DioAlignment | undefined,
    uring: UringQueue | ThreadPool | undefined,
  ) {
    this.path = path;
    this.#fd = fd;
    this.readOnly = readOnly;
    this.#direct = direct;
    this.#engine = uring;
  }

  /** The alignment O_DIRECT requests need here, or undefined for a page-cached file. */
  get directAlignment(): DioAlignment | undefined {
    return this.#direct;
  }

  #fail(what: string, offset?: number, code = errno()): BlockError {
    return new BlockError("io", `${what} failed: ${strerror(code)}`, {
      path: this.path,
      errno: code,
      ...(offset === undefined ? {} : { offset }),
    });
  }

  #checkOpen(): number {
    if (this.#fd < 0) throw new BlockError("io", "File is closed", { path: this.path });
    return this.#fd;
  }

  size(): number {
    const fd = this.#checkOpen();
    if (this.#cachedSize >= 0) return this.#cachedSize;
    const end = Number(libc().lseek(fd, 0n, SEEK_END));
    if (end < 0) throw this.#fail("Seek to end");
    // Read-only opens may share the file with a writer (-U): ask every time.
    if (!this.readOnly) this.#cachedSize = end;
    return end;
  }

  #grew(end: number): void {
    if (this.#cachedSize >= 0 && end > this.#cachedSize) this.#cachedSize = end;
  }

  readAt(offset: number, dst: Uint8Array): void {
    const fd = this.#checkOpen();
    // A synchronous read sees the writes in flight that it overlaps, as it would after them.
    if (this.#engine?.writeOverlapping(offset, offset + dst.length) !== undefined) {
      this.#engine.drainSync();
    }
    if (this.#direct !== undefined) return this.#directRead(fd, offset, dst);
    const c = libc();
    let done = 0;
    while (done < dst.length) {
      const want = Math.min(dst.length - done, MAX_IO_CHUNK);
      const part = done === 0 && want === dst.length ? dst : dst.subarray(done, done + want);
      const n = c.pread(fd, part, BigInt(want), BigInt(offset + done));
      if (n < 0) {
        const code = errno();
        if (code === EINTR) continue;
        throw this.#fail("Read", offset + done, code);
      }
      if (n === 0) {
        dst.fill(0, done); // past end of file: zeroes
        return;
      }
      done += n;
    }
  }

  writeAt(offset: number, src: Uint8Array): void {
    const fd = this.#checkOpen();
    if (this.readOnly) throw new BlockError("read-only", "File is read-only", { path: this.path });
    this.#engine?.drainSync(); // a synchronous write never overtakes requests in flight
    if (this.#direct !== undefined) return this.#directWrite(fd, offset, src);
    const c = libc();
    let done = 0;
    while (done < src.length) {
      const want = Math.min(src.length - done, MAX_IO_CHUNK);
      const part = done === 0 && want === src.length ? src : src.subarray(done, done + want);
      const n = c.pwrite(fd, part, BigInt(want), BigInt(offset + done));
      if (n < 0) {
        const code = errno();
        if (code === EINTR) continue;
        throw this.#fail("Write", offset + done, code);
      }
      if (n === 0) throw this.#fail("Write (no progress)", offset + done, 5);
      done += n;
    }
    this.#grew(offset + src.length);
  }

  // ---- aio=io_uring and aio=threads: requests in flight ----

  /** True when `[offset, offset+length)` suits the ring or pool as it is (O_DIRECT: aligned). */
  #ringFits(offset: number, length: number): boolean {
    const align = this.#direct?.offset;
    return align === undefined || (offset % align === 0 && length % align === 0);
  }

  async readAtAsync(offset: number, dst: Uint8Array): Promise<void> {
    this.#checkOpen();
    const uring = this.#engine;
    if (uring === undefined) return this.readAt(offset, dst);
    // The pool's Workers read unaligned O_DIRECT ranges through their own bounce windows.
    if (!(uring instanceof ThreadPool) && !this.#ringFits(offset, dst.length)) {
      return this.readAt(offset, dst);
    }
    await uring.read(offset, dst);
  }

  async writeAtAsync(offset: number, src: Uint8Array): Promise<void> {
    this.#checkOpen();
    if (this.readOnly) throw new BlockError("read-only", "File is read-only", { path: this.path });
    const uring = this.#engine;
    if (uring === undefined) return this.writeAt(offset, src);
    if (!this.#ringFits(offset, src.length)) {
      // Read-modify-write of partial blocks: no write in flight may touch those blocks meanwhile.
      const align = this.#direct!.offset;
      const start = offset - (offset % align);
      const stop = Math.ceil((offset + src.length) / align) * align;
      for (;;) {
        const busy = uring.writeOverlapping(start, stop);
        if (busy === undefined) break;
        await busy;
      }
      return this.#directWrite(this.#checkOpen(), offset, src);
    }
    // The size counts the write from now on, so a read-modify-write's truncation spares it.
    this.size();
    this.#grew(offset + src.length);
    try {
      await uring.write(offset, src);
    } catch (e) {
      this.#cachedSize = -1;
      throw e;
    }
  }

  // ---- O_DIRECT: aligned windows through the bounce buffer ----

  #bounceBuffer(): Uint8Array<ArrayBuffer> {
    this.#bounce ??= new AlignedBuffer(DIRECT_BOUNCE);
    return this.#bounce.bytes;
  }

  /**
   * Read aligned `[start, start+length)` into the bounce buffer at `into`; what lies past the end
   * of the file reads as zeroes (a direct read there comes back short).
   */
  #readAligned(fd: number, start: number, length: number, into: number, what: string): void {
    const bounce = this.#bounceBuffer();
    const c = libc();
    let done = 0;
    while (done < length) {
      const n = c.pread(
        fd,
        bounce.subarray(into + done, into + length),
        BigInt(length - done),
        BigInt(start + done),
      );
      if (n < 0) {
        const code = errno();
        if (code === EINTR) continue;
        throw this.#fail(what, start + done, code);
      }
      // Short: the end of the file (a direct read cannot go on from an unaligned offset).
      if (n < length - done) {
        bounce.fill(0, into + done + n, into + length);
        return;
      }
      done += n;
    }
  }

  #directRead(fd: number, offset: number, dst: Uint8Array): void {
    const align = this.#direct!.offset;
    const bounce = this.#bounceBuffer();
    const end = offset + dst.length;
    for (let pos = offset; pos < end;) {
      const start = pos - (pos % align);
      const stop = Math.min(Math.ceil(end / align) * align, start + DIRECT_BOUNCE);
      this.#readAligned(fd, start, stop - start, 0, "Read");
      const upto = Math.min(stop, end);
      dst.set(bounce.subarray(pos - start, upto - start), pos - offset);
      pos = upto;
    }
  }

  /**
   * Write through aligned windows: a partial first or last block is read first (read-modify-write).
   * One thread does it all, so no other write can land between the read and the write. A write
   * that ends past the end of the file in a partial block leaves the file as long as a cached
   * write would (the padding is cut off again).
   */
  #directWrite(fd: number, offset: number, src: Uint8Array): void {
    const align = this.#direct!.offset;
    const bounce = this.#bounceBuffer();
    const c = libc();
    const end = offset + src.length;
    const sizeBefore = this.size();
    for (let pos = offset; pos < end;) {
      const start = pos - (pos % align);
      const stop = Math.min(Math.ceil(end / align) * align, start + DIRECT_BOUNCE);
      const upto = Math.min(stop, end);
      const head = pos > start, tail = upto < stop;
      const rmw = "Read (read-modify-write)";
      if (head) this.#readAligned(fd, start, align, 0, rmw);
      if (tail && (stop - align > start || !head)) {
        this.#readAligned(fd, stop - align, align, stop - align - start, rmw);
      }
      bounce.set(src.subarray(pos - offset, upto - offset), pos - start);
      let done = 0;
      const length = stop - start;
      while (done < length) {
        const n = c.pwrite(
          fd,
          bounce.subarray(done, length),
          BigInt(length - done),
          BigInt(start + done),
        );
        if (n < 0) {
          const code = errno();
          if (code === EINTR) continue;
          throw this.#fail("Write", start + done, code);
        }
        // A short direct write cannot be continued from an unaligned offset: the disk is full.
        if (n === 0 || (n < length - done && n % align !== 0)) {
          throw this.#fail("Write", start + done + n, n === 0 ? 5 : 28);
        }
        done += n;
      }
      pos = upto;
    }
    const newSize = Math.max(sizeBefore, end);
    const padded = Math.ceil(end / align) * align;
    if (padded > newSize) {
      // The last block was written whole: cut the file back to where a cached write ends it.
      this.#cachedSize = -1;
      if (libc().ftruncate(fd, BigInt(newSize)) !== 0) throw this.#fail("Truncate", newSize);
    }
    this.#cachedSize = this.readOnly ? -1 : newSize;
  }

  truncate(size: number): void {
    const fd = this.#checkOpen();
    if (this.readOnly) throw new BlockError("read-only", "File is read-only", { path: this.path });
    this.#engine?.drainSync();
    this.#cachedSize = -1;
    if (libc().ftruncate(fd, BigInt(size)) !== 0) throw this.#fail("Truncate", size);
  }

  flush(): void {
    const fd = this.#checkOpen();
    this.#engine?.drainSync(); // every write in flight completes before the fdatasync
    if (libc().fdatasync(fd) !== 0) throw this.#fail("Flush");
  }

  async flushAsync(): Promise<void> {
    this.#checkOpen();
    const engine = this.#engine;
    // Through the ring: the thread serves other requests while the disk flushes.
    if (engine instanceof UringQueue) return await engine.datasync();
    this.flush();
  }

  zeroWithoutData(offset: number, length: number, unmap: boolean): boolean {
    const fd = this.#checkOpen();
    if (this.readOnly) throw new BlockError("read-only", "File is read-only", { path: this.path });
    if (length === 0) return true;
    this.#engine?.drainSync();
    const mode = (unmap ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE;
    if (libc().fallocate(fd, mode, BigInt(offset), BigInt(length)) === 0) return true;
    const code = errno();
    if (code === EOPNOTSUPP || code === 25 /* ENOTTY */ || code === 19 /* ENODEV */) return false;
    throw this.#fail(unmap ? "Punch hole" : "Zero range", offset, code);
  }

  punchHole(offset: number, length: number): void {
    const fd = this.#checkOpen();
    if (this.readOnly) throw new BlockError("read-only", "File is read-only", { path: this.path });
    if (length === 0) return;
    this.#engine?.drainSync();
    if (this.#punchHoleWorks) {
      const mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
      if (libc().fallocate(fd, mode, BigInt(offset), BigInt(length)) === 0) return;
      const code = errno();
      // Block devices and some file systems refuse; write zeroes instead.
      if (code !== EOPNOTSUPP && code !== 25 /* ENOTTY */ && code !== 19 /* ENODEV */) {
        throw this.#fail("Punch hole", offset, code);
      }
      this.#punchHoleWorks = false;
    }
    const end = Math.min(offset + length, this.size());
    const zeroes = new Uint8Array(Math.min(ZERO_CHUNK, Math.max(0, end - offset)));
    for (let at = offset; at < end; at += zeroes.length) {
      this.writeAt(at, zeroes.subarray(0, Math.min(zeroes.length, end - at)));
    }
  }

  preallocate(offset: number, length: number): void {
    const fd = this.#checkOpen();
    if (this.readOnly) throw new BlockError("read-only", "File is read-only", { path: this.path });
    if (length === 0) return;
    this.#engine?.drainSync();
    if (libc().fallocate(fd, 0, BigInt(offset), BigInt(length)) === 0) {
      this.#grew(offset + length);
      return;
    }
    const code = errno();
    if (code !== EOPNOTSUPP) throw this.#fail("Preallocate", offset, code);
    const zeroes = new Uint8Array(Math.min(ZERO_CHUNK, length));
    for (let at = offset; at < offset + length; at += zeroes.length) {
      this.writeAt(at, zeroes.subarray(0, Math.min(zeroes.length, offset + length - at)));
    }
  }

  dataStatus(offset: number, max: number): HostExtent {
    const fd = this.#checkOpen();
    const c = libc();
    const data = Number(c.lseek(fd, BigInt(offset), SEEK_DATA));
    if (data < 0) {
      const code = errno();
      // ENXIO: no data at or after offset, the rest is a hole.
      if (code === ENXIO) return { data: false, length: max };
      // No SEEK_DATA support: report everything as data.
      return { data: true, length: max };
    }
    if (data > offset) return { data: false, length: Math.min(max, data - offset) };
    const hole = Number(c.lseek(fd, BigInt(offset), SEEK_HOLE));
    if (hole < 0) return { data: true, length: max };
    return { data: true, length: Math.max(1, Math.min(max, hole - offset)) };
  }

  allocatedSize(): number {
    this.#checkOpen();
    try {
      const st = Deno.statSync(this.path);
      return st.blocks === null ? st.size : st.blocks * 512;
    } catch {
      return this.size();
    }
  }

  close(): void {
    if (this.#fd < 0) return;
    try {
      this.#engine?.close();
    } catch {
      // Requests in flight fail with the error; the file closes regardless.
    }
    releaseImageLocks(this.#fd);
    libc().close(this.#fd);
    this.#fd = -1;
    this.#bounce?.free();
    this.#bounce = undefined;
  }
}

/**
 * Open a host file or block device, taking QEMU-compatible locks unless `lock` is false.
 *
 * @throws {BlockError} `not-found`, `busy` (locked by another process), `io`
 *
 * @example (needs `--allow-read --allow-write --allow-ffi`)
 * ```ts
 * import { openHostFile } from "./file.ts";
 *
 * const path = await Deno.makeTempFile();
 * const file = openHostFile(path);
 * file.writeAt(4096, new Uint8Array([1, 2, 3]));
 * if (file.size() !== 4099) throw new Error("size");
 * if (file.dataStatus(0, 4096).data) throw new Error("the first block is a hole (on most file systems)");
 * file.close();
 * await Deno.remove(path);
 * ```
 */
export function openHostFile(path: string, opts: HostFileOptions = {}): HostFile {
  const readOnly = opts.readOnly ?? false;
  let flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (opts.create) flags |= O_CREAT | (opts.exclusive ? O_EXCL : 0);
  if (opts.direct) flags |= O_DIRECT;
  if (opts.dsync) flags |= O_DSYNC;
  const fd = libc().open(cPath(path), flags, 0o644);
  if (fd < 0) {
    const code = errno();
    const kind = code === 2 ? "not-found" : "io";
    throw new BlockError(kind, `Could not open '${path}': ${strerror(code)}`, {
      path,
      errno: code,
    });
  }
  try {
    if (opts.lock ?? true) applyImageLocks(fd, path, permsFor(readOnly, opts.forceShare ?? false));
  } catch (e) {
    releaseImageLocks(fd);
    libc().close(fd);
    throw e;
  }
  const direct = opts.direct ? dioAlignment(fd) : undefined;
  if (direct !== undefined && !validAlignment(direct)) {
    // The bounce windows are whole multiples of the alignment: refuse what they cannot serve.
    releaseImageLocks(fd);
    libc().close(fd);
    throw new BlockError(
      "unsupported",
      `Could not open '${path}': O_DIRECT alignment ${direct.offset} (memory ${direct.memory}) ` +
        `is not a power of two up to ${DIRECT_BOUNCE} bytes`,
      { path },
    );
  }
  let uring: UringQueue | ThreadPool | undefined;
  try {
    if (opts.aio === "io_uring") uring = new UringQueue(fd, { path, direct });
    else if (opts.aio === "threads") uring = new ThreadPool(fd, { path, direct });
  } catch (e) {
    releaseImageLocks(fd);
    libc().close(fd);
    if (!(e instanceof BlockError)) throw e;
    // QEMU's words: "Unable to use io_uring: failed to init linux io_uring ring".
    throw new BlockError(e.kind, `Unable to use io_uring: ${e.message}`, {
      path,
      cause: e,
      ...(e.context.errno === undefined ? {} : { errno: e.context.errno }),
    });
  }
  return new FileHost(path, fd, readOnly, direct, uring);
}

/** An alignment the page-aligned bounce windows serve: powers of two up to the window size. */
function validAlignment(a: { readonly offset: number; readonly memory: number }): boolean {
  const pow2 = (n: number) => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
  return pow2(a.offset) && pow2(a.memory) && a.offset <= DIRECT_BOUNCE && a.memory <= 4096;
}
