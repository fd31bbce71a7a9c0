/**
 * `vstor bench`, as `qemu-img bench` (QEMU 7.2): `COUNT` requests of `BUFFER_SIZE` bytes, `DEPTH` in
 * flight, starting at `OFFSET` and walking by `STEP_SIZE`, with the same options, defaults and
 * output lines.
 *
 * @module
 */
import type { BlockNode, WriteOptions } from "../block/node.ts";
import { MAX_REQUEST_BYTE } from "../block/request.ts";
import { BlockError } from "../errors.ts";
import { openVerbImage } from "./args.ts";
import type { VerbHelp } from "./help.ts";
import { type CliIo, errorLine, EXIT_OK, UsageError } from "./cli_io.ts";
import { probedRawWarning } from "./messages.ts";
import { parseSize } from "./size.ts";

/** Cache modes qemu-img's `-t` accepts (`bdrv_parse_cache_mode`). */
export type CacheMode = "none" | "off" | "directsync" | "writeback" | "writethrough" | "unsafe";
/** Cache modes vstor runs: the page-cache synchronous adapter has no O_DIRECT. */
export type SupportedCacheMode = "writeback" | "writethrough" | "unsafe";
/** AIO engines qemu-img's `-i` accepts (`bdrv_parse_aio`). */
export type AioMode = "threads" | "native" | "io_uring";

const CACHE_MODES: readonly CacheMode[] = [
  "none",
  "off",
  "directsync",
  "writeback",
  "writethrough",
  "unsafe",
];
const AIO_MODES: readonly AioMode[] = ["threads", "native", "io_uring"];

/** qemu-img's bound for count, depth, buffer size, step and flush interval (INT_MAX). */
const INT_MAX = 2147483647;

/** The usage line, as `vstor help bench` prints it. */
export const BENCH_USAGE =
  "vstor bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N [--no-drain]] [-i aio] [-n] " +
  "[-o OFFSET] [--pattern=N] [-q] [-s BUFFER_SIZE] [-S STEP_SIZE] [-t CACHE] [-w] [-U] FILE";

const HELP = `usage: ${BENCH_USAGE}

Run a simple I/O benchmark on an image, as qemu-img bench: COUNT requests of BUFFER_SIZE bytes,
DEPTH at a time, reads unless -w.

  -c COUNT             requests to send (default 75000)
  -d DEPTH             requests in flight at once (default 64)
  -f FMT               image format (probed when absent)
  --flush-interval=N   write tests: flush every N requests (N >= DEPTH; 0 = never)
  --no-drain           with --flush-interval: flush without waiting for requests in flight
  -i AIO               threads (default); native and io_uring are not supported yet
  -n                   native AIO (-i native): not supported yet
  -o OFFSET            offset of the first request (default 0; k, M, G... suffixes)
  --pattern=N          byte written by write tests (default 0)
  -q                   quiet: no probing warning (the result lines are printed regardless)
  -s BUFFER_SIZE       bytes per request (default 4096)
  -S STEP_SIZE         bytes between request offsets (default: the buffer size)
  -t CACHE             writeback (default), writethrough (FUA writes) or unsafe (no flushes)
  -w                   write instead of read
  -U                   open read-only while others may write (force share)
  --image-opts         not supported (give the image file name)
  -h, --help           print this help

Example: vstor bench -w -c 10000 -d 32 -s 64k disk.qcow2
`;

/** `vstor help bench`: the options are getopt's tables below. */
export const benchHelp: VerbHelp = {
  text: HELP,
  get options() {
    return [
      ...[...SHORT_WITH_ARG, ...SHORT_FLAGS].map((c) => `-${c}`),
      ...LONG_OPTIONS.filter((o) => o.key.length > 1).map((o) => `--${o.name}`),
    ];
  },
};

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
  write: boolean;
  /** Flush after every this many requests (write tests); 0 never flushes. */
  flushInterval: number;
  /** Let the requests in flight finish before each flush (qemu-img's default; `--no-drain` off). */
  drainOnFlush: boolean;
  /** `writethrough` makes writes FUA; `unsafe` turns flushes into no-ops. */
  cache: SupportedCacheMode;
}

/** The parsed command line of `vstor bench`. */
export interface BenchOptions extends Omit<BenchParams, "cache"> {
  filename: string;
  /** Image format; probed when absent. */
  format?: string;
  cache: CacheMode;
  aio: AioMode;
  quiet: boolean;
  forceShare: boolean;
}

/** What a bench run measured. */
export interface BenchResult {
  /** From the first submission until the last request completed, as qemu-img times it. */
  seconds: number;
  /** Flush requests sent (by `--flush-interval`), including ones that had nothing to flush. */
  flushRequests: number;
}

interface LongOption {
  readonly name: string;
  readonly key: string;
  readonly hasArg: boolean;
}

const LONG_OPTIONS: readonly LongOption[] = [
  { name: "help", key: "h", hasArg: false },
  { name: "flush-interval", key: "flush-interval", hasArg: true },
  { name: "image-opts", key: "image-opts", hasArg: false },
  { name: "pattern", key: "pattern", hasArg: true },
  { name: "no-drain", key: "no-drain", hasArg: false },
  { name: "force-share", key: "U", hasArg: false },
];
/** qemu-img bench's short options: `hc:d:f:ni:o:qs:S:t:wU`. */
const SHORT_WITH_ARG = new Set(["c", "d", "f", "i", "o", "s", "S", "t"]);
const SHORT_FLAGS = new Set(["h", "n", "q", "w", "U"]);

function findLong(name: string, arg: string): LongOption {
  const exact = LONG_OPTIONS.find((o) => o.name === name);
  if (exact) return exact;
  // getopt_long accepts an unambiguous prefix of a long option.
  const prefixed = name === "" ? [] : LONG_OPTIONS.filter((o) => o.name.startsWith(name));
  const [only, ...more] = prefixed;
  if (only === undefined) {
    throw new UsageError(`Unrecognized option '${arg}'`, {
      qemu: `unrecognized option '${arg}'`,
    });
  }
  if (more.length > 0) throw new UsageError(`Option '${arg}' is ambiguous`);
  return only;
}

/**
 * GNU getopt_long over qemu-img bench's options: short options cluster (`-wq`), an option's
 * argument is the rest of the word or the next word even when it starts with `-` (`-o -5`), long
 * options take `=VALUE` or the next word, options and operands mix, `--` ends the options.
 */
function getopt(
  args: readonly string[],
  onOption: (key: string, value: string | undefined) => boolean,
): string[] {
  const positionals: string[] = [];
  const take = (i: number, shown: string): string => {
    const value = args[i];
    if (value === undefined) {
      throw new UsageError(`Missing argument for option '${shown}'`, {
        qemu: `missing argument for option '${shown}'`,
      });
    }
    return value;
  };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] ?? "";
    if (arg === "--") {
      positionals.push(...args.slice(i + 1));
      break;
    }
    if (arg.startsWith("--")) {
      const eq = arg.indexOf("=");
      const opt = findLong(eq < 0 ? arg.slice(2) : arg.slice(2, eq), arg);
      let value: string | undefined;
      if (opt.hasArg) value = eq < 0 ? take(++i, `--${opt.name}`) : arg.slice(eq + 1);
      else if (eq >= 0) throw new UsageError(`Option '--${opt.name}' does not take an argument`);
      if (!onOption(opt.key, value)) return positionals;
    } else if (arg.length > 1 && arg.startsWith("-")) {
      for (let j = 1; j < arg.length; j++) {
        const c = arg[j] ?? "";
        if (SHORT_WITH_ARG.has(c)) {
          const value = j + 1 < arg.length ? arg.slice(j + 1) : take(++i, `-${c}`);
          if (!onOption(c, value)) return positionals;
          break;
        }
        if (!SHORT_FLAGS.has(c)) {
          throw new UsageError(`Unrecognized option '-${c}'`, {
            qemu: `unrecognized option '-${c}'`,
          });
        }
        if (!onOption(c, undefined)) return positionals;
      }
    } else {
      positionals.push(arg);
    }
  }
  return positionals;
}

const U64 = 1n << 64n;

/**
 * `qemu_strtoul(text, NULL, 0, &res)`: C strtoul with base 0 (`0x` hex, leading-0 octal) over the
 * whole text; leading blanks and a sign are allowed, and a minus wraps modulo 2^64 as strtoul does.
 */
function parseUlong(text: string): bigint | undefined {
  const m = /^[ \t\n\v\f\r]*([+-]?)(?:0[xX]([0-9a-fA-F]+)|0([0-7]*)|([1-9][0-9]*))$/.exec(text);
  if (m === null) return undefined;
  const [, sign, hex, octal, decimal] = m;
  const magnitude = hex !== undefined
    ? BigInt(`0x${hex}`)
    : decimal !== undefined
    ? BigInt(decimal)
    : BigInt(`0o${octal === "" || octal === undefined ? "0" : octal}`);
  if (magnitude >= U64) return undefined; // ERANGE
  return sign === "-" ? (U64 - magnitude) % U64 : magnitude;
}

/** An integer option as qemu-img bench reads `-c`, `-d`, `--pattern`, `--flush-interval`. */
function intOption(text: string, what: string, min: number, max: number): number {
  const value = parseUlong(text);
  if (value === undefined || value < BigInt(min) || value > BigInt(max)) {
    throw new UsageError(`Invalid ${what} specified. Must be between ${min} and ${max}`);
  }
  return Number(value);
}

/** A size option as qemu-img's `cvtnum_full` reads it (k, M, G, T, P, E suffixes). */
function sizeOption(
  text: string,
  what: string,
  min: number,
  max: number,
  warn: (message: string) => void,
): number {
  const parsed = parseSize(text);
  if (!parsed.ok && parsed.reason === "invalid") {
    throw new UsageError(
      `Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for kilobytes, ` +
        "megabytes, gigabytes, terabytes, petabytes and exabytes",
    );
  }
  if (!parsed.ok || parsed.value < BigInt(min) || parsed.value > BigInt(max)) {
    throw new UsageError(`Invalid ${what} specified. Must be between ${min} and ${max}`);
  }
  if (parsed.deprecatedHexSuffix) {
    warn(`Using a multiplier suffix on hex numbers is deprecated: ${text}`);
  }
  return Number(parsed.value);
}

/**
 * Parse `vstor bench` arguments with qemu-img bench's option names and defaults. Each option is
 * checked as it is met, as qemu-img does, so the first bad one is reported.
 *
 * @param args The arguments after the verb.
 * @param warn Receives deprecation warnings (a hex number with a size suffix).
 * @returns The options, or `"help"` when `-h`/`--help` was given.
 * @throws {UsageError} for an unknown option, a missing argument or value out of range, or
 *   not exactly one FILE
 * @example
 * ```ts
 * import { parseBenchArgs } from "./bench.ts";
 * const opts = parseBenchArgs(["-w", "-c", "10", "disk.img"]);
 * if (opts === "help" || opts.depth !== 64 || opts.step !== 0) throw new Error("qemu-img defaults");
 * ```
 */
export function parseBenchArgs(
  args: readonly string[],
  warn: (message: string) => void = () => {},
): BenchOptions | "help" {
  let help = false;
  const o: Omit<BenchOptions, "filename" | "format"> & { format?: string } = {
    count: 75000,
    depth: 64,
    bufferSize: 4096,
    step: 0,
    offset: 0,
    pattern: 0,
    write: false,
    flushInterval: 0,
    drainOnFlush: true,
    cache: "writeback",
    aio: "threads",
    quiet: false,
    forceShare: false,
  };
  const positionals = getopt(args, (key, value = "") => {
    switch (key) {
      case "h":
        help = true;
        return false;
      case "c":
        o.count = intOption(value, "request count", 1, INT_MAX);
        break;
      case "d":
        o.depth = intOption(value, "queue depth", 1, INT_MAX);
        break;
      case "f":
        o.format = value;
        break;
      case "n":
        o.aio = "native";
        break;
      case "i": {
        const aio = AIO_MODES.find((m) => m === value);
        if (aio === undefined) {
          throw new UsageError(`Invalid aio option: ${value} (use ${AIO_MODES.join(", ")})`, {
            qemu: `Invalid aio option: ${value}`,
            tryHelp: false,
          });
        }
        o.aio = aio;
        break;
      }
      case "o":
        o.offset = sizeOption(value, "offset", 0, MAX_REQUEST_BYTE, warn);
        break;
      case "q":
        o.quiet = true;
        break;
      case "s":
        o.bufferSize = sizeOption(value, "buffer size", 1, INT_MAX, warn);
        break;
      case "S":
        o.step = sizeOption(value, "step_size", 0, INT_MAX, warn);
        break;
      case "t": {
        const cache = CACHE_MODES.find((m) => m === value);
        if (cache === undefined) {
          throw new UsageError(`Invalid cache mode '${value}' (use ${CACHE_MODES.join(", ")})`, {
            qemu: "Invalid cache mode",
            tryHelp: false,
          });
        }
        o.cache = cache;
        break;
      }
      case "w":
        o.write = true;
        break;
      case "U":
        o.forceShare = true;
        break;
      case "pattern":
        o.pattern = intOption(value, "pattern byte", 0, 0xff);
        break;
      case "flush-interval":
        o.flushInterval = intOption(value, "flush interval", 0, INT_MAX);
        break;
      case "no-drain":
        o.drainOnFlush = false;
        break;
      case "image-opts":
        throw new UsageError("--image-opts is not supported; give the image file name");
    }
    return true;
  });
  if (help) return "help";
  const [filename, ...extra] = positionals;
  if (filename === undefined || extra.length > 0) {
    throw new UsageError("Expecting one image file name");
  }
  if (!o.write && o.flushInterval !== 0) {
    throw new UsageError("--flush-interval is only available in write tests");
  }
  if (o.flushInterval !== 0 && o.flushInterval < o.depth) {
    throw new UsageError("Flush interval can't be smaller than depth");
  }
  return { ...o, filename };
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
 * import { RawNode } from "../../formats/raw.ts";
 * import { MemoryFile } from "../host/memory.ts";
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

/** Refuse what qemu-img accepts but vstor cannot do yet, before opening anything. */
function checkSupported(opts: BenchOptions): SupportedCacheMode {
  if (opts.aio !== "threads") {
    throw new BlockError(
      "unsupported",
      `aio=${opts.aio} is not supported yet: vstor has only the synchronous page-cache adapter ` +
        "(use -i threads)",
    );
  }
  const cache = opts.cache;
  if (cache === "writeback" || cache === "writethrough" || cache === "unsafe") return cache;
  throw new BlockError(
    "unsupported",
    `Cache mode '${cache}' needs O_DIRECT, which vstor does not support yet ` +
      "(use writeback, writethrough or unsafe)",
  );
}

/**
 * The bench verb: prints qemu-img bench's lines and returns the exit code.
 *
 * @throws {UsageError} for usage mistakes (exit 2)
 * @throws {BlockError} when the image cannot be opened or a request fails (exit 1)
 */
export async function benchMain(args: string[], io: CliIo): Promise<number> {
  const opts = parseBenchArgs(args, (message) => errorLine(io, `warning: ${message}`));
  if (opts === "help") {
    io.stdout(benchHelp.text);
    return EXIT_OK;
  }
  const cache = checkSupported(opts);
  const node = await openVerbImage(io, opts.filename, {
    ...(opts.format === undefined ? {} : { format: opts.format }),
    readOnly: !opts.write,
    forceShare: opts.forceShare,
  });
  try {
    if (opts.write && opts.format === undefined && node.format === "raw" && !opts.quiet) {
      io.stderr(probedRawWarning(opts.filename));
    }
    const params: BenchParams = {
      count: opts.count,
      depth: opts.depth,
      bufferSize: opts.bufferSize,
      step: opts.step,
      offset: opts.offset,
      pattern: opts.pattern,
      write: opts.write,
      flushInterval: opts.flushInterval,
      drainOnFlush: opts.drainOnFlush,
      cache,
    };
    const misfit = benchMisfit(node.size, params);
    if (misfit !== undefined) throw new UsageError(misfit);
    const step = opts.step === 0 ? opts.bufferSize : opts.step;
    io.stdout(
      `Sending ${opts.count} ${opts.write ? "write" : "read"} requests, ${opts.bufferSize} bytes ` +
        `each, ${opts.depth} in parallel (starting at offset ${opts.offset}, step size ${step})\n`,
    );
    if (opts.flushInterval !== 0) {
      io.stdout(`Sending flush every ${opts.flushInterval} requests\n`);
    }
    const result = await runBench(node, params);
    io.stdout(`Run completed in ${result.seconds.toFixed(3)} seconds.\n`);
  } finally {
    await node.close();
  }
  return EXIT_OK;
}
