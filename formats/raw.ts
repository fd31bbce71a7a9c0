/**
 * The raw format: guest bytes are host bytes, optionally a window (`offset`, `size`) into the file.
 *
 * @module
 */
import { BlockError } from "../src/errors.ts";
import type {
  BlockNode,
  Extent,
  TruncateOptions,
  WriteOptions,
  WriteZeroesOptions,
} from "../src/block/node.ts";
import { checkRequest, checkSize } from "../src/block/request.ts";
import type { HostFile, HostSnapshots } from "../src/host/host_file.ts";
import { PROBE_BYTES, probeFormat } from "./probe.ts";

/** Options of {@linkcode RawNode.open}. */
export interface RawOptions {
  /** Refuse writes (default false). */
  readOnly?: boolean;
  /** The format was guessed, not given: refuse writes that would make sector 0 look like another format. */
  probed?: boolean;
  /** Start of the window in the file (QEMU's raw `offset`). */
  offset?: number;
  /** Length of the window (QEMU's raw `size`); default: to the end of the file. */
  size?: number;
  /** `unsafe` never flushes (QEMU's cache=unsafe, qemu-img convert's default for its target). */
  cache?: "writeback" | "unsafe";
}

const ZERO_CHUNK = 1 << 20;

/** A raw image over a host file. */
export class RawNode implements BlockNode {
  readonly format = "raw";
  readonly requestAlignment = 1;
  /** True when the node refuses modification. */
  readonly readOnly: boolean;
  readonly #file: HostFile;
  readonly #probed: boolean;
  readonly #base: number;
  readonly #fixedSize: boolean;
  readonly #unsafe: boolean;
  #size: number;
  #closed = false;
  /** Something was written since the last flush (QEMU flushes only then: write_gen). */
  #unflushed = false;

  private constructor(file: HostFile, opts: RawOptions, size: number) {
    this.#file = file;
    this.readOnly = (opts.readOnly ?? false) || file.readOnly;
    this.#probed = opts.probed ?? false;
    this.#base = opts.offset ?? 0;
    this.#fixedSize = opts.size !== undefined;
    this.#unsafe = opts.cache === "unsafe";
    this.#size = size;
  }

  /**
   * A raw node over `file`.
   *
   * @throws {BlockError} `invalid-argument` when the window is not inside the file
   */
  static async open(file: HostFile, opts: RawOptions = {}): Promise<RawNode> {
    const offset = opts.offset ?? 0;
    checkSize(offset, "raw offset");
    const fileSize = file.size();
    if (offset > fileSize) {
      throw new BlockError(
        "invalid-argument",
        `The raw offset ${offset} is past the end of the file (${fileSize} bytes)`,
        { path: file.path },
      );
    }
    // Without a window the size is whole sectors, as QEMU's bdrv_getlength reports it: the
    // tail of a file that ends mid-sector reads as zeroes and writing there extends the file.
    let size = Math.ceil((fileSize - offset) / 512) * 512;
    if (opts.size !== undefined) {
      checkSize(opts.size, "raw size");
      if (opts.size > fileSize - offset) {
        throw new BlockError(
          "invalid-argument",
          `The raw window [${offset}, ${
            offset + opts.size
          }) is past the end of the file (${fileSize} bytes)`,
          { path: file.path },
        );
      }
      size = opts.size;
    }
    return new RawNode(file, opts, size);
  }

  /** The host's allocation unit, when it has one (an RBD image's object size). */
  get hostClusterSize(): number | undefined {
    return this.#file.clusterSize;
  }

  /** The host's own snapshots, when it keeps some (an RBD image's), passed through. */
  get hostSnapshots(): HostSnapshots | undefined {
    return this.#file.snapshots;
  }

  get filename(): string {
    return this.#file.path;
  }

  get size(): number {
    return this.#size;
  }

  #live(): void {
    if (this.#closed) throw new BlockError("io", "Image is closed", { path: this.filename });
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    this.#live();
    checkRequest(this, "read", offset, dst.length);
    const file = this.#file;
    // With aio=io_uring many reads are in flight at once; otherwise this finishes synchronously.
    if (file.readAtAsync !== undefined) return await file.readAtAsync(this.#base + offset, dst);
    file.readAt(this.#base + offset, dst);
  }

  async write(offset: number, src: Uint8Array, opts?: WriteOptions): Promise<void> {
    this.#live();
    checkRequest(this, "write", offset, src.length);
    if (this.#probed && offset < PROBE_BYTES && src.length > 0) this.#guardFirstSector(offset, src);
    this.#unflushed = true;
    const file = this.#file;
    if (file.writeAtAsync !== undefined) await file.writeAtAsync(this.#base + offset, src);
    else file.writeAt(this.#base + offset, src);
    if (opts?.fua) this.#flushFile();
  }

  /** QEMU's probed-raw guard: the guest may not give its disk another format's signature. */
  #guardFirstSector(offset: number, src: Uint8Array): void {
    const head = new Uint8Array(PROBE_BYTES);
    this.#file.readAt(this.#base, head);
    head.set(src.subarray(0, PROBE_BYTES - offset), offset);
    const looksLike = probeFormat(head);
    if (looksLike !== "raw") {
      throw new BlockError(
        "read-only",
        `Refusing to write a ${looksLike} signature into the first sector of an image probed as raw ` +
          `(give the format explicitly, e.g. -f raw, to allow it)`,
        { path: this.filename, offset },
      );
    }
  }

  async writeZeroes(offset: number, length: number, opts?: WriteZeroesOptions): Promise<void> {
    this.#live();
    checkRequest(this, "write-zeroes", offset, length);
    if (opts?.noFallback) {
      // Zeroes that cost no data writes, or nothing at all.
      const file = this.#file;
      const inside = this.#base + offset + length <= file.size();
      if (!inside || !file.zeroWithoutData?.(this.#base + offset, length, opts.unmap === true)) {
        throw new BlockError("unsupported", "Zeroing this range would write data", {
          path: this.filename,
          offset,
        });
      }
      this.#unflushed = true;
      if (opts.fua) this.#flushFile();
      return;
    }
    this.#unflushed = true;
    if (opts?.unmap && this.#base + offset + length <= this.#file.size()) {
      this.#file.punchHole(this.#base + offset, length);
    } else if (this.#file.zeroRange !== undefined) {
      this.#file.zeroRange(this.#base + offset, length);
    } else {
      const zeroes = new Uint8Array(Math.min(ZERO_CHUNK, length));
      for (let at = 0; at < length; at += zeroes.length) {
        const n = Math.min(zeroes.length, length - at);
        this.#file.writeAt(this.#base + offset + at, zeroes.subarray(0, n));
      }
    }
    if (opts?.fua) this.#flushFile();
  }

  async discard(offset: number, length: number): Promise<void> {
    this.#live();
    checkRequest(this, "discard", offset, length);
    const fileSize = this.#file.size();
    const end = Math.min(this.#base + offset + length, fileSize);
    if (end > this.#base + offset) {
      this.#unflushed = true;
      const file = this.#file;
      if (file.discard !== undefined) file.discard(this.#base + offset, end - this.#base - offset);
      else file.punchHole(this.#base + offset, end - this.#base - offset);
    }
  }

  #flushFile(): void {
    this.#unflushed = false;
    this.#file.flush();
  }

  async flush(): Promise<void> {
    this.#live();
    if (this.readOnly || this.#unsafe || !this.#unflushed) return;
    const file = this.#file;
    if (file.flushAsync === undefined) return this.#flushFile();
    this.#unflushed = false;
    try {
      await file.flushAsync();
    } catch (e) {
      this.#unflushed = true;
      throw e;
    }
  }

  async blockStatus(offset: number, max: number): Promise<Extent> {
    this.#live();
    checkRequest(this, "block-status", offset, max);
    if (offset >= this.#size || max === 0) {
      return { kind: "eof", offset, length: 0 };
    }
    const want = Math.min(max, this.#size - offset);
    const hostOffset = this.#base + offset;
    const st = this.#file.dataStatus(hostOffset, want);
    const length = Math.max(1, Math.min(want, st.length));
    // Past the end of a file on a server (an NBD export rounded up to whole sectors) there is no
    // host offset to give, as QEMU's nbd driver says; a local file's tail keeps its own.
    const beyond = this.#file.knowsAllocation === false && hostOffset >= this.#file.size();
    return {
      kind: st.data ? "data" : "zero",
      offset,
      length,
      ...(beyond ? {} : { hostOffset }),
      ...(st.data && st.zero === true ? { readsZero: true } : {}),
    };
  }

  async truncate(size: number, opts?: TruncateOptions): Promise<void> {
    this.#live();
    checkSize(size);
    if (this.readOnly) {
      throw new BlockError("read-only", "Image is read-only", { path: this.filename });
    }
    if (this.#fixedSize || this.#base !== 0) {
      throw new BlockError(
        "unsupported",
        "Cannot resize a raw image opened with offset or size options",
        { path: this.filename },
      );
    }
    const old = this.#size;
    const mode = opts?.preallocation ?? "off";
    if (mode === "metadata") {
      throw new BlockError("unsupported", "Preallocation mode 'metadata' is not supported by raw", {
        path: this.filename,
      });
    }
    if (size > old && mode === "falloc") this.#file.preallocate(old, size - old);
    if (size > old && mode === "full") {
      const zeroes = new Uint8Array(Math.min(ZERO_CHUNK, size - old));
      for (let at = old; at < size; at += zeroes.length) {
        this.#file.writeAt(at, zeroes.subarray(0, Math.min(zeroes.length, size - at)));
      }
    }
    this.#unflushed = true;
    this.#file.truncate(size);
    this.#size = Math.ceil(size / 512) * 512; // whole sectors, as at open
  }

  allocatedSize(): number {
    return this.#file.allocatedSize();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      if (!this.readOnly && !this.#unsafe && this.#unflushed) this.#flushFile();
    } finally {
      this.#file.close();
    }
  }
}
