/**
 * What `qemu-img bench` does to an image, without its command line: `count` requests of
 * `bufferSize` bytes, `depth` in flight, from `offset` by `step`, reads or writes, with flushes
 * every `flushInterval` requests, timed as qemu-img times them. The `bench` verb parses its
 * options into {@linkcode BenchParams} and prints what {@linkcode runBench} returns.
 *
 * @module
 */
import type { BlockNode, WriteOptions } from "../src/block/node.ts";
import { BlockError } from "../src/errors.ts";

/** Cache modes a bench runs: the page-cache synchronous adapter has no O_DIRECT. */
export type SupportedCacheMode = "writeback" | "writethrough" | "unsafe";

/** What one bench run does, as `qemu-img bench` takes it. */
export interface BenchParams {
  /** Requests to send, ≥ 1. */
  count: number;
  /** Requests in flight at once, ≥ 1. */
  depth: number;
  /** Bytes per request, ≥ 1. */
  bufferSize: number;
  /** Bytes between the offsets of consecutive requests; 0 means `bufferSize`, as qemu-img. */
  step: number;
  /** Guest offset of the first request. */
  offset: number;
  /** Byte the request buffers are filled with (what write tests write). */
  pattern: number;
  /** Write requests (qemu-img bench -w) instead of reads. */
  write: boolean;
  /** Flush after every this many requests (write tests); 0 never flushes. */
  flushInterval: number;
  /** Let the requests in flight finish before each flush (qemu-img's default; `--no-drain` off). */
  drainOnFlush: boolean;
  /** `writethrough` makes writes FUA; `unsafe` turns flushes into no-ops. */
  cache: SupportedCacheMode;
}

/** What a bench run measured. */
export interface BenchResult {
  /** From the first submission until the last request completed, as qemu-img times it. */
  seconds: number;
  /** Flush requests sent (by `--flush-interval`), including ones that had nothing to flush. */
  flushRequests: number;
}

/**
 * Why `params` cannot run on an image of `size` bytes, or `undefined` when they can. qemu-img 7.2
 * does not check: a first request past the end fails with EIO, and an empty image divides by zero.
 */
export function benchMisfit(size: number, params: BenchParams): string | undefined {
  if (params.bufferSize > size) {
    return `Buffer size ${params.bufferSize} is larger than the image (${size} bytes)`;
  }
  if (params.offset > size - params.bufferSize) {
    return `Offset ${params.offset} plus buffer size ${params.bufferSize} is past the end of the ` +
      `image (${size} bytes)`;
  }
  if (params.step > size) {
    return `Step size ${params.step} is larger than the image (${size} bytes)`;
  }
  return undefined;
}

const RESOLVED: Promise<void> = Promise.resolve();
const FUA: WriteOptions = { fua: true };

/**
 * One run: qemu-img's `bench_cb` state machine over promises. `#n` counts requests not yet
 * completed, `#inFlight` those submitted and not completed; every completion submits more until
 * `depth` are in flight, except while draining for a flush.
 */
class BenchRun {
  readonly #node: BlockNode;
  readonly #p: BenchParams;
  readonly #step: number;
  readonly #size: number;
  readonly #writeOpts: WriteOptions | undefined;
  /** One buffer per in-flight slot, reused for every request that slot carries. */
  readonly #buffers: Uint8Array[] = [];
  readonly #done: (() => void)[] = [];
  readonly #failed: ((e: unknown) => void)[] = [];
  readonly #freeSlots: Int32Array;
  #freeTop = 0;
  #n: number;
  #inFlight = 0;
  #offset: number;
  #inFlush = false;
  #pendingFlushes = 0;
  #flushRequests = 0;
  /** Completed writes, and the count the last flush covered: QEMU skips a flush with nothing new. */
  #writeGen = 0;
  #flushedGen = 0;
  #lastFlush: Promise<void> = RESOLVED;
  #error: { cause: unknown } | undefined;
  #start = 0;
  #end = 0;
  #settled = false;
  #resolve: (r: BenchResult) => void = () => {};
  #reject: (e: unknown) => void = () => {};

  constructor(node: BlockNode, p: BenchParams) {
    this.#node = node;
    this.#p = p;
    this.#size = node.size;
    this.#step = p.step === 0 ? p.bufferSize : p.step;
    this.#writeOpts = p.cache === "writethrough" ? FUA : undefined;
    this.#n = p.count;
    this.#offset = p.offset;
    // Never more than `count` requests are in flight, so no more slots than that.
    const slots = Math.min(p.depth, p.count);
    let memory: ArrayBuffer;
    try {
      memory = new ArrayBuffer(slots * p.bufferSize);
    } catch (e) {
      throw new BlockError(
        "invalid-argument",
        `Cannot allocate ${slots} buffers of ${p.bufferSize} bytes (lower -d or -s)`,
        { cause: e },
      );
    }
    new Uint8Array(memory).fill(p.pattern);
    this.#freeSlots = new Int32Array(slots);
    for (let slot = 0; slot < slots; slot++) {
      this.#buffers.push(new Uint8Array(memory, slot * p.bufferSize, p.bufferSize));
      this.#done.push(() => this.#complete(slot));
      this.#failed.push((e) => this.#requestFailed(slot, e));
      this.#freeSlots[this.#freeTop++] = slot;
    }
  }

  run(): Promise<BenchResult> {
    return new Promise((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
      this.#start = performance.now();
      this.#submit();
      this.#maybeFinish();
    });
  }

  #submit(): void {
    const p = this.#p;
    while (this.#error === undefined && this.#n > this.#inFlight && this.#inFlight < p.depth) {
      const offset = this.#offset;
      this.#inFlight++;
      // qemu-img 7.2 wraps modulo the image size; where its next request would then run past the
      // end (and die with EIO), wrap to the start instead.
      let next = offset + this.#step;
      if (next >= this.#size) next %= this.#size;
      if (next > this.#size - p.bufferSize) next = 0;
      this.#offset = next;
      const slot = this.#freeSlots[--this.#freeTop]!;
      let request: Promise<void>;
      try {
        request = p.write
          ? this.#node.write(offset, this.#buffers[slot]!, this.#writeOpts)
          : this.#node.read(offset, this.#buffers[slot]!);
      } catch (e) {
        request = Promise.reject(e);
      }
      request.then(this.#done[slot], this.#failed[slot]);
    }
  }

  #complete(slot: number): void {
    this.#freeSlots[this.#freeTop++] = slot;
    const remaining = this.#n - this.#inFlight; // requests not yet submitted
    this.#n--;
    this.#inFlight--;
    if (this.#p.write) this.#writeGen++;
    if (this.#n === 0) this.#end = performance.now();
    if (this.#error !== undefined) return this.#maybeFinish();
    const interval = this.#p.flushInterval;
    if (interval !== 0 && remaining % interval === 0) {
      const drain = this.#p.drainOnFlush;
      if (this.#inFlight === 0 || !drain) {
        this.#flushRequests++;
        if (drain) {
          this.#inFlush = true;
          this.#flush().then(this.#afterDrainedFlush, this.#drainedFlushFailed);
        } else {
          this.#pendingFlushes++;
          this.#flush().then(this.#afterUndrainedFlush, this.#undrainedFlushFailed);
        }
      }
      // Draining: submit nothing until the flush after the last completion is done.
      if (drain) return this.#maybeFinish();
    }
    this.#submit();
    this.#maybeFinish();
  }

  #flush(): Promise<void> {
    if (this.#p.cache === "unsafe") return RESOLVED;
    // As QEMU's bdrv_co_flush: nothing written since the last flush, nothing to do.
    if (this.#writeGen === this.#flushedGen) return this.#lastFlush;
    this.#flushedGen = this.#writeGen;
    try {
      this.#lastFlush = this.#node.flush();
    } catch (e) {
      this.#lastFlush = Promise.reject(e);
    }
    return this.#lastFlush;
  }

  readonly #afterDrainedFlush = (): void => {
    this.#inFlush = false;
    this.#submit();
    this.#maybeFinish();
  };

  readonly #drainedFlushFailed = (e: unknown): void => {
    this.#inFlush = false;
    this.#fail(e);
  };

  readonly #afterUndrainedFlush = (): void => {
    this.#pendingFlushes--;
    this.#maybeFinish();
  };

  readonly #undrainedFlushFailed = (e: unknown): void => {
    this.#pendingFlushes--;
    this.#fail(e);
  };

  #requestFailed(slot: number, e: unknown): void {
    this.#freeSlots[this.#freeTop++] = slot;
    this.#inFlight--;
    this.#fail(e);
  }

  #fail(e: unknown): void {
    this.#error ??= { cause: e };
    this.#maybeFinish();
  }

  /** Settle once nothing is outstanding: every request done (or one failed) and no flush pending. */
  #maybeFinish(): void {
    if (this.#settled || this.#inFlight > 0 || this.#inFlush || this.#pendingFlushes > 0) return;
    if (this.#error !== undefined) {
      this.#settled = true;
      this.#reject(this.#error.cause);
    } else if (this.#n === 0) {
      this.#settled = true;
      this.#resolve({
        seconds: (this.#end - this.#start) / 1000,
        flushRequests: this.#flushRequests,
      });
    }
  }
}

/**
 * Run a bench on an open node: `count` requests of `bufferSize` bytes from `offset` by `step`,
 * keeping up to `depth` in flight, flushing every `flushInterval` requests, as qemu-img bench does.
 * No allocation per request beyond the promises: each in-flight slot reuses its buffer.
 *
 * @param node An open node; writable for write runs.
 * @param params What to run; see {@linkcode BenchParams}.
 * @returns The time the requests took and the flushes sent.
 * @throws {RangeError} when the requests do not fit the node
 * @throws {BlockError} the first request or flush that failed, after the rest have finished
 * @example
 * ```ts
 * import { runBench } from "./bench.ts";
 * import { RawNode } from "./raw.ts";
 * import { MemoryFile } from "../src/host/memory.ts";
 * const node = await RawNode.open(new MemoryFile("m", new Uint8Array(65536)));
 * const r = await runBench(node, {
 *   count: 32, depth: 4, bufferSize: 4096, step: 0, offset: 0, pattern: 0xab,
 *   write: true, flushInterval: 0, drainOnFlush: true, cache: "writeback",
 * });
 * if (!(r.seconds >= 0)) throw new Error("timed");
 * ```
 */
export function runBench(node: BlockNode, params: BenchParams): Promise<BenchResult> {
  const misfit = benchMisfit(node.size, params);
  if (misfit !== undefined) throw new RangeError(misfit);
  return new BenchRun(node, params).run();
}
