/**
 * A host file in memory, for tests and benches.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import type { HostExtent, HostFile } from "./host_file.ts";

/** Largest in-memory file: a bound so a bad size fails cleanly instead of exhausting memory. */
export const MAX_MEMORY_FILE = 4 * 1024 ** 3;

/**
 * A growable byte array that behaves like a host file (punched holes read back as zeroes).
 *
 * @example
 * ```ts
 * import { MemoryFile } from "./memory.ts";
 * const f = new MemoryFile("mem");
 * f.writeAt(10, new Uint8Array([1, 2, 3]));
 * if (f.size() !== 13) throw new Error("size");
 * ```
 */
export class MemoryFile implements HostFile {
  /** The name given at construction (used in error messages). */
  readonly path: string;
  /** True when writes, truncates and punches throw. */
  readonly readOnly: boolean;
  #bytes: Uint8Array;
  #size: number;
  #closed = false;

  /**
   * Makes a memory file holding a copy of `bytes` (empty by default).
   *
   * @param path a name for error messages
   * @param bytes initial contents (copied)
   * @param opts `readOnly` to refuse modification
   */
  constructor(path = "memory", bytes?: Uint8Array, opts: { readOnly?: boolean } = {}) {
    this.path = path;
    this.readOnly = opts.readOnly ?? false;
    this.#bytes = bytes ? bytes.slice() : new Uint8Array(0);
    this.#size = this.#bytes.length;
  }

  /** A copy of the contents. */
  contents(): Uint8Array {
    return this.#bytes.slice(0, this.#size);
  }

  #check(write: boolean): void {
    if (this.#closed) throw new BlockError("io", "File is closed", { path: this.path });
    if (write && this.readOnly) {
      throw new BlockError("read-only", "File is read-only", { path: this.path });
    }
  }

  #reserve(size: number): void {
    if (size > MAX_MEMORY_FILE) {
      throw new BlockError("io", `Memory file cannot grow to ${size} bytes`, { path: this.path });
    }
    if (size <= this.#bytes.length) return;
    const grown = new Uint8Array(Math.max(size, Math.min(MAX_MEMORY_FILE, this.#bytes.length * 2)));
    grown.set(this.#bytes.subarray(0, this.#size));
    this.#bytes = grown;
  }

  size(): number {
    this.#check(false);
    return this.#size;
  }

  readAt(offset: number, dst: Uint8Array): void {
    this.#check(false);
    const end = Math.min(this.#size, offset + dst.length);
    const n = Math.max(0, end - offset);
    if (n > 0) dst.set(this.#bytes.subarray(offset, end));
    if (n < dst.length) dst.fill(0, n);
  }

  writeAt(offset: number, src: Uint8Array): void {
    this.#check(true);
    const end = offset + src.length;
    this.#reserve(end);
    if (offset > this.#size) this.#bytes.fill(0, this.#size, offset);
    this.#bytes.set(src, offset);
    if (end > this.#size) this.#size = end;
  }

  /** {@linkcode readAt}, settled at once. */
  async readAtAsync(offset: number, dst: Uint8Array): Promise<void> {
    this.readAt(offset, dst);
  }

  /** {@linkcode writeAt}, settled at once. */
  async writeAtAsync(offset: number, src: Uint8Array): Promise<void> {
    this.writeAt(offset, src);
  }

  truncate(size: number): void {
    this.#check(true);
    this.#reserve(size);
    if (size > this.#size) this.#bytes.fill(0, this.#size, size);
    this.#size = size;
  }

  flush(): void {
    this.#check(false);
  }

  /** Memory has no data writes to save: zeroing it is what a punch is. */
  zeroWithoutData(offset: number, length: number, _unmap: boolean): boolean {
    this.punchHole(offset, length);
    return true;
  }

  punchHole(offset: number, length: number): void {
    this.#check(true);
    const end = Math.min(this.#size, offset + length);
    if (end > offset) this.#bytes.fill(0, offset, end);
  }

  preallocate(offset: number, length: number): void {
    this.#check(true);
    if (offset + length > this.#size) this.truncate(offset + length);
  }

  dataStatus(offset: number, max: number): HostExtent {
    this.#check(false);
    if (offset >= this.#size) return { data: false, length: max };
    return { data: true, length: Math.min(max, this.#size - offset) };
  }

  allocatedSize(): number {
    return this.#size;
  }

  close(): void {
    this.#closed = true;
  }
}
