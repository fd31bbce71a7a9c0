/**
 * A block node that forwards every call to another: tests extend it and override only what they
 * change — a delay before I/O, an injected failure, a record of the order of completions.
 */
import type { BlockNode, Extent, WriteOptions, WriteZeroesOptions } from "../../src/block/node.ts";

/** Forwards to `inner`; the raw format, as tests present their disks. */
export class WrappedNode implements BlockNode {
  readonly format = "raw";
  readonly filename: string;
  readonly readOnly: boolean;
  readonly requestAlignment: number;
  readonly size: number;
  protected readonly inner: BlockNode;

  constructor(inner: BlockNode, filename = "wrapped") {
    this.inner = inner;
    this.filename = filename;
    this.readOnly = inner.readOnly;
    this.requestAlignment = inner.requestAlignment;
    this.size = inner.size;
  }

  read(offset: number, dst: Uint8Array): Promise<void> {
    return this.inner.read(offset, dst);
  }

  write(offset: number, src: Uint8Array, opts?: WriteOptions): Promise<void> {
    return this.inner.write(offset, src, opts);
  }

  writeZeroes(offset: number, length: number, opts?: WriteZeroesOptions): Promise<void> {
    return this.inner.writeZeroes(offset, length, opts);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(offset, length);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  blockStatus(offset: number, max: number): Promise<Extent> {
    return this.inner.blockStatus(offset, max);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
