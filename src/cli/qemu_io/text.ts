/**
 * What qemu-io prints and parses: strerror texts, `cvtstr`/`timestr`, the pattern byte, C's
 * `strtol`, and GNU getopt (short options for commands, getopt_long for the command line).
 *
 * @module
 */
import { BlockError } from "../../errors.ts";
import { formatFixed } from "../text/human.ts";

/** glibc's strerror() texts for the errnos the block layer reports. */
const STRERROR: Readonly<Record<number, string>> = {
  1: "Operation not permitted",
  2: "No such file or directory",
  5: "Input/output error",
  6: "No such device or address",
  9: "Bad file descriptor",
  11: "Resource temporarily unavailable",
  12: "Cannot allocate memory",
  13: "Permission denied",
  16: "Device or resource busy",
  17: "File exists",
  19: "No such device",
  21: "Is a directory",
  22: "Invalid argument",
  27: "File too large",
  28: "No space left on device",
  30: "Read-only file system",
  34: "Numerical result out of range",
  95: "Operation not supported",
  122: "Disk quota exceeded",
};

/** errno values by the names Deno and node report (`code`). */
export const ERRNO_BY_NAME: Readonly<Record<string, number>> = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  ENXIO: 6,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  EISDIR: 21,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ERANGE: 34,
  EOPNOTSUPP: 95,
  ENOTSUP: 95,
  EDQUOT: 122,
};
export const EIO = 5;
export const EINVAL = 22;
export const EFBIG = 27;
export const ENOTSUP = 95;

/** glibc's strerror(). */
export function strerror(errno: number): string {
  return STRERROR[errno] ?? `Unknown error ${errno}`;
}

/** The errno QEMU would return for the same failure. */
export function errnoOf(e: unknown): number {
  if (e instanceof IoFailure) return e.errno;
  if (e instanceof BlockError) {
    if (e.context.errno !== undefined) return e.context.errno;
    switch (e.kind) {
      case "unsupported":
        return ENOTSUP;
      case "read-only":
        return 1; // EPERM, as for writes QEMU refuses (the probed-raw guard)
      case "invalid-argument":
      case "invalid-format":
        return EINVAL;
      case "busy":
        return 16;
      case "not-found":
        return 2;
      default: // io, out-of-range, corrupt
        return EIO;
    }
  }
  if (e instanceof RangeError || e instanceof TypeError) return EINVAL;
  return EIO;
}

/** A failure with a known errno, for checks `vstor io` makes itself. */
export class IoFailure extends Error {
  readonly errno: number;
  constructor(errno: number) {
    super(strerror(errno));
    this.errno = errno;
  }
}

/** strerror() of the errno QEMU would report for `e`. */
export function errnoText(e: unknown): string {
  return strerror(errnoOf(e));
}

export function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** What fopen/fread failures print through perror(). */
export function hostErrorText(e: unknown): string {
  const code = (e as { code?: unknown } | null)?.code;
  const errno = typeof code === "string" ? ERRNO_BY_NAME[code] : undefined;
  if (errno !== undefined) return strerror(errno);
  if (e instanceof Deno.errors.NotFound) return strerror(2);
  if (e instanceof Deno.errors.PermissionDenied) return strerror(13);
  if (e instanceof Deno.errors.IsADirectory) return strerror(21);
  return messageOf(e);
}

// ---------------------------------------------------------------------------------------------
// printf-compatible number formatting

const SIZE_UNITS: ReadonlyArray<readonly [number, string]> = [
  [2 ** 60, " EiB"],
  [2 ** 50, " PiB"],
  [2 ** 40, " TiB"],
  [2 ** 30, " GiB"],
  [2 ** 20, " MiB"],
  [2 ** 10, " KiB"],
];

/** qemu-io's `cvtstr`: `1 MiB`, `1.500 KiB`, `512 bytes`, `702.007109 bytes`. */
export function cvtstr(value: number): string {
  let text = formatFixed(value, 6);
  let suffix = " bytes";
  for (const [scale, name] of SIZE_UNITS) {
    if (value >= scale) {
      text = formatFixed(value / scale, 3);
      suffix = name;
      break;
    }
  }
  const trim = text.indexOf(".000");
  return (trim >= 0 ? text.slice(0, trim) : text) + suffix;
}

/** qemu-io's `timestr`: `00.00 sec`, or `H:MM:SS.ss` past a second or with `-C`. */
export function timestr(seconds: number, verbose: boolean): string {
  const whole = Math.floor(seconds);
  const secs = (whole % 60) + (seconds - whole);
  if (verbose || whole > 0) {
    const minutes = String(Math.floor((whole % 3600) / 60)).padStart(2, "0");
    return `${Math.floor(whole / 3600)}:${minutes}:${formatFixed(secs, 2).padStart(5, "0")}`;
  }
  return `${formatFixed(secs, 2).padStart(5, "0")} sec`;
}

export function hex2(b: number): string {
  return b.toString(16).padStart(2, "0");
}

/** C's isalnum() in the C locale. */
export function isalnum(b: number): boolean {
  return (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a);
}

/**
 * C's strtol(text, &end, 0) on a 64-bit long: the value (clamped as strtol clamps) and whether the
 * whole string was consumed.
 */
export function strtol(text: string): { value: bigint; whole: boolean } {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)/.exec(text);
  if (m === null) return { value: 0n, whole: text === "" };
  const digits = m[2] ?? "";
  let magnitude = /^0[xX]/.test(digits)
    ? BigInt(digits)
    : digits.startsWith("0")
    ? BigInt(`0o${digits.slice(1) || "0"}`)
    : BigInt(digits);
  const LONG_MAX = (1n << 63n) - 1n;
  if (m[1] === "-") {
    magnitude = -magnitude;
    if (magnitude < -LONG_MAX - 1n) magnitude = -LONG_MAX - 1n;
  } else if (magnitude > LONG_MAX) magnitude = LONG_MAX;
  return { value: magnitude, whole: m[0].length === text.length };
}

/** qemu-io's parse_pattern: a whole-string strtol value from 0 to 255. */
export function parsePattern(arg: string): number | undefined {
  const { value, whole } = strtol(arg);
  return whole && value >= 0n && value <= 255n ? Number(value) : undefined;
}

// ---------------------------------------------------------------------------------------------
// GNU getopt

/** What getopt found: options in order, operands, and the complaint that stopped it. */
export interface ParsedOpts {
  readonly opts: ReadonlyArray<{ readonly c: string; readonly arg: string }>;
  readonly operands: readonly string[];
  /** getopt's complaint; the options before it were parsed (and are acted on first). */
  readonly error?: string;
}

/** A long option of {@linkcode getoptLong}: its name, whether it takes an argument, its key. */
export interface LongOption {
  readonly name: string;
  readonly hasArg: boolean;
  readonly key: string;
}

/**
 * GNU getopt_long over `argv` (argv[0] is the program or command): clusters, attached arguments,
 * permutation, `--`, `--name=value`, unambiguous prefixes of long names. `prefix` starts each
 * complaint, as glibc prints `argv[0]: ...`.
 */
export function getoptLong(
  argv: readonly string[],
  optstring: string,
  longs: readonly LongOption[],
  prefix = argv[0] ?? "",
): ParsedOpts {
  const opts: Array<{ c: string; arg: string }> = [];
  const operands: string[] = [];
  for (let i = 1; i < argv.length; i++) {
    const word = argv[i] ?? "";
    if (word === "--") {
      operands.push(...argv.slice(i + 1));
      break;
    }
    if (word.startsWith("--") && longs.length > 0) {
      const eq = word.indexOf("=");
      const name = word.slice(2, eq < 0 ? undefined : eq);
      const exact = longs.find((o) => o.name === name);
      const matches = exact ? [exact] : longs.filter((o) => o.name.startsWith(name));
      const distinct = matches.filter((o, n) =>
        matches.findIndex((p) => p.key === o.key && p.hasArg === o.hasArg) === n
      );
      if (distinct.length === 0) {
        return { opts, operands, error: `${prefix}: unrecognized option '${word}'` };
      }
      if (distinct.length > 1) {
        const names = distinct.map((o) => ` '--${o.name}'`).join("");
        return {
          opts,
          operands,
          error: `${prefix}: option '--${name}' is ambiguous; possibilities:${names}`,
        };
      }
      const option = distinct[0]!;
      if (!option.hasArg) {
        if (eq >= 0) {
          return {
            opts,
            operands,
            error: `${prefix}: option '--${option.name}' doesn't allow an argument`,
          };
        }
        opts.push({ c: option.key, arg: "" });
        continue;
      }
      if (eq >= 0) {
        opts.push({ c: option.key, arg: word.slice(eq + 1) });
        continue;
      }
      if (i + 1 >= argv.length) {
        return {
          opts,
          operands,
          error: `${prefix}: option '--${option.name}' requires an argument`,
        };
      }
      opts.push({ c: option.key, arg: argv[++i] ?? "" });
      continue;
    }
    if (word.length < 2 || word[0] !== "-") {
      operands.push(word);
      continue;
    }
    for (let j = 1; j < word.length; j++) {
      const c = word[j] ?? "";
      const at = c === ":" ? -1 : optstring.indexOf(c);
      if (at < 0) return { opts, operands, error: `${prefix}: invalid option -- '${c}'` };
      if (optstring[at + 1] !== ":") {
        opts.push({ c, arg: "" });
        continue;
      }
      let arg = word.slice(j + 1);
      if (arg === "") {
        if (i + 1 >= argv.length) {
          return { opts, operands, error: `${prefix}: option requires an argument -- '${c}'` };
        }
        arg = argv[++i] ?? "";
      }
      opts.push({ c, arg });
      break;
    }
  }
  return { opts, operands };
}

/** GNU getopt (short options only) over a command's argv. */
export function getopt(argv: readonly string[], optstring: string): ParsedOpts {
  return getoptLong(argv, optstring, []);
}
