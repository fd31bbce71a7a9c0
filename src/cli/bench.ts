/**
 * `vstor bench`, as `qemu-img bench` (QEMU 7.2): `COUNT` requests of `BUFFER_SIZE` bytes, `DEPTH` in
 * flight, starting at `OFFSET` and walking by `STEP_SIZE`, with the same options, defaults and
 * output lines. The run itself is `runBench` in formats/bench.ts.
 *
 * @module
 */
import {
  benchMisfit,
  type BenchParams,
  runBench,
  type SupportedCacheMode,
} from "../../formats/bench.ts";
import { MAX_REQUEST_BYTE } from "../block/request.ts";
import { BlockError } from "../errors.ts";
import { openVerbImage } from "./args.ts";
import type { VerbHelp } from "./help.ts";
import { type CliIo, errorLine, EXIT_OK, programName, UsageError } from "./cli_io.ts";
import { probedRawWarning } from "./text/messages.ts";
import { parseSize } from "./text/size.ts";

/** Cache modes qemu-img's `-t` accepts (`bdrv_parse_cache_mode`). */
export type CacheMode = "none" | "off" | "directsync" | "writeback" | "writethrough" | "unsafe";
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
  -i AIO               threads (default: one request at a time, synchronously; -i threads
                       given: a pool of 4 Workers, 4 requests at the disk at once), io_uring
                       (raw images: DEPTH requests in flight through io_uring), or native
                       (QEMU's linux-aio, which vstor maps to io_uring; needs -t none or
                       directsync, as QEMU's aio=native needs cache.direct=on)
  -n                   native AIO (-i native)
  -o OFFSET            offset of the first request (default 0; k, M, G... suffixes)
  --pattern=N          byte written by write tests (default 0)
  -q                   quiet: no probing warning (the result lines are printed regardless)
  -s BUFFER_SIZE       bytes per request (default 4096)
  -S STEP_SIZE         bytes between request offsets (default: the buffer size)
  -t CACHE             writeback (default), writethrough (FUA writes), unsafe (no flushes),
                       none (O_DIRECT) or directsync (O_DIRECT and FUA writes)
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

/** The parsed command line of `vstor bench`. */
export interface BenchOptions extends Omit<BenchParams, "cache"> {
  filename: string;
  /** Image format; probed when absent. */
  format?: string;
  cache: CacheMode;
  aio: AioMode;
  /** `-i` was given: `-i threads` runs on a pool of Workers, the default on synchronous calls. */
  aioGiven?: boolean;
  quiet: boolean;
  forceShare: boolean;
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
        o.aioGiven = true;
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
 * How the bench runs (FUA writes, skipped flushes) and whether the file is opened with O_DIRECT.
 */
function benchCache(opts: BenchOptions): { cache: SupportedCacheMode; direct: boolean } {
  switch (opts.cache) {
    case "none":
    case "off":
      return { cache: "writeback", direct: true };
    case "directsync":
      return { cache: "writethrough", direct: true };
    default:
      return { cache: opts.cache, direct: false };
  }
}

/** QEMU's raw_open_common refuses linux-aio on the page cache. */
const NATIVE_NEEDS_DIRECT =
  "aio=native was specified, but it requires cache.direct=on, which was not specified.";

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
  const { cache, direct } = benchCache(opts);
  if (opts.aio === "native" && !direct) {
    throw new BlockError(
      "invalid-argument",
      programName(io) === "vstor"
        ? NATIVE_NEEDS_DIRECT
        : `Could not open '${opts.filename}': ${NATIVE_NEEDS_DIRECT}`,
    );
  }
  const node = await openVerbImage(io, opts.filename, {
    ...(opts.format === undefined ? {} : { format: opts.format }),
    readOnly: !opts.write,
    forceShare: opts.forceShare,
    ...(direct ? { cache: "none" as const } : {}),
    // vstor has no linux-aio: native runs on io_uring, as the kernel's newer interface.
    ...(opts.aio !== "threads"
      ? { aio: "io_uring" as const }
      : opts.aioGiven
      ? { aio: "threads" as const }
      : {}),
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
