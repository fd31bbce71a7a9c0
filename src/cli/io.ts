/**
 * `vstor io`: qemu-io's command language over a {@linkcode BlockNode}, printing what qemu-io 7.2
 * prints, byte for byte (timing lines aside).
 *
 * Commands: `alloc`, `discard`, `flush`, `help`, `info`, `length`, `map`, `quit`, `read`,
 * `truncate`, `write`, with qemu-io's one-letter aliases (`a d f ? i l q r t w`). Arguments are split
 * on spaces only and options parsed like GNU getopt (clustered, permuted, `--`). Numbers follow
 * `cvtnum` ({@linkcode parseSize}). Ordinary output goes to `out`; what qemu-io writes to stderr
 * (unknown commands, bad argument counts, getopt complaints, `error_report` lines, which here start
 * with `vstor: ` instead of `qemu-io: `) goes to `err`.
 *
 * Differences from qemu-io 7.2: sizes are exact bytes (QEMU rounds a raw image's length up to a
 * multiple of 512 and reads zeroes in that tail); VM state (`-b`) is never supported; `truncate -m
 * falloc|full` grows by writing zeroes; a failing `flush` prints nothing, as in qemu-io, but still
 * fails the run.
 *
 * @module
 */
import { parseArgs } from "node:util";
import type { BlockNode, Extent } from "../block/node.ts";
import { BlockError } from "../errors.ts";
import { openImage, type OpenOptions } from "../../formats/open.ts";
import { parseSize } from "./size.ts";
import { probedRawWarning } from "./messages.ts";
import { formatFixed } from "./human.ts";

/**
 * Capabilities `vstor io` uses when a node has them (they are not part of {@linkcode BlockNode}).
 */
export interface IoNodeExtras {
  /** `write -c`: write `src` compressed; nodes without it fail with "Operation not supported". */
  writeCompressed?(offset: number, src: Uint8Array): Promise<void>;
  /** `info`: cluster size in bytes (0 when absent, as qemu-io prints for raw). */
  readonly clusterSize?: number;
  /** `info`: where VM state would be saved (0 when absent). */
  readonly vmStateOffset?: number;
}

/** Options of {@linkcode runIoCommands}. */
export interface RunIoOptions {
  /** Where lines qemu-io writes to stderr go; default: `out`. */
  err?: (line: string) => void;
}

/** Largest request qemu-io passes on: INT_MAX rounded down to a sector (BDRV_REQUEST_MAX_BYTES). */
const MAX_REQUEST_BYTES = 2147483136;
const SECTOR_SIZE = 512;
const INT64_MAX = (1n << 63n) - 1n;
const PROGRAM = "vstor";
const USAGE = "vstor io [-f FMT] [-r] [-U] [-c CMD]... FILE   (commands from stdin without -c)";

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
const ERRNO_BY_NAME: Readonly<Record<string, number>> = {
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
const EIO = 5;
const EINVAL = 22;
const EFBIG = 27;
const ENOTSUP = 95;

function strerror(errno: number): string {
  return STRERROR[errno] ?? `Unknown error ${errno}`;
}

/** The errno QEMU would return for the same failure. */
function errnoOf(e: unknown): number {
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
class IoFailure extends Error {
  readonly errno: number;
  constructor(errno: number) {
    super(strerror(errno));
    this.errno = errno;
  }
}

function errnoText(e: unknown): string {
  return strerror(e instanceof IoFailure ? e.errno : errnoOf(e));
}

function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
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
function cvtstr(value: number): string {
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
function timestr(seconds: number, verbose: boolean): string {
  const whole = Math.floor(seconds);
  const secs = (whole % 60) + (seconds - whole);
  if (verbose || whole > 0) {
    const minutes = String(Math.floor((whole % 3600) / 60)).padStart(2, "0");
    return `${Math.floor(whole / 3600)}:${minutes}:${formatFixed(secs, 2).padStart(5, "0")}`;
  }
  return `${formatFixed(secs, 2).padStart(5, "0")} sec`;
}

function hex2(b: number): string {
  return b.toString(16).padStart(2, "0");
}

/** C's isalnum() in the C locale. */
function isalnum(b: number): boolean {
  return (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a);
}

// ---------------------------------------------------------------------------------------------
// Argument parsing

interface ParsedOpts {
  readonly opts: ReadonlyArray<{ readonly c: string; readonly arg: string }>;
  readonly operands: readonly string[];
  /** getopt's complaint; the options before it were parsed (and are acted on first). */
  readonly error?: string;
}

/** GNU getopt over `argv` (argv[0] is the command): clusters, attached arguments, permutation, `--`. */
function getopt(argv: readonly string[], optstring: string): ParsedOpts {
  const opts: Array<{ c: string; arg: string }> = [];
  const operands: string[] = [];
  const name = argv[0] ?? "";
  for (let i = 1; i < argv.length; i++) {
    const word = argv[i] ?? "";
    if (word === "--") {
      operands.push(...argv.slice(i + 1));
      break;
    }
    if (word.length < 2 || word[0] !== "-") {
      operands.push(word);
      continue;
    }
    for (let j = 1; j < word.length; j++) {
      const c = word[j] ?? "";
      const at = c === ":" ? -1 : optstring.indexOf(c);
      if (at < 0) return { opts, operands, error: `${name}: invalid option -- '${c}'` };
      if (optstring[at + 1] !== ":") {
        opts.push({ c, arg: "" });
        continue;
      }
      let arg = word.slice(j + 1);
      if (arg === "") {
        if (i + 1 >= argv.length) {
          return { opts, operands, error: `${name}: option requires an argument -- '${c}'` };
        }
        arg = argv[++i] ?? "";
      }
      opts.push({ c, arg });
      break;
    }
  }
  return { opts, operands };
}

/** C's strtol(arg, &end, 0) with qemu-io's check: a whole-string byte value. */
function parsePattern(arg: string): number | undefined {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)/.exec(arg);
  if (m === null) return arg === "" ? 0 : undefined; // no conversion: fine only when nothing follows
  if (m[0].length !== arg.length) return undefined;
  const digits = m[2] ?? "";
  const magnitude = /^0[xX]/.test(digits)
    ? parseInt(digits.slice(2), 16)
    : digits.startsWith("0")
    ? parseInt(digits, 8)
    : parseInt(digits, 10);
  const value = m[1] === "-" ? -magnitude : magnitude;
  return value >= 0 && value <= 255 ? value : undefined;
}

// ---------------------------------------------------------------------------------------------
// I/O with read-modify-write for nodes that need aligned requests

function alignDown(n: number, align: number): number {
  return n - (n % align);
}

function isAligned(node: BlockNode, offset: number, length: number): boolean {
  const align = node.requestAlignment;
  return align <= 1 || (offset % align === 0 && length % align === 0);
}

/** The aligned range covering `[offset, offset+length)`, clipped to the node. */
function covering(node: BlockNode, offset: number, length: number): [number, number] {
  const align = node.requestAlignment;
  const start = alignDown(offset, align);
  const end = Math.min(node.size, alignDown(offset + length + align - 1, align));
  return [start, end];
}

async function readBytes(node: BlockNode, offset: number, length: number): Promise<Uint8Array> {
  if (isAligned(node, offset, length) || length === 0) {
    const buf = new Uint8Array(length);
    await node.read(offset, buf);
    return buf;
  }
  const [start, end] = covering(node, offset, length);
  const bounce = new Uint8Array(end - start);
  await node.read(start, bounce);
  return bounce.subarray(offset - start, offset - start + length);
}

async function writeBytes(
  node: BlockNode,
  offset: number,
  src: Uint8Array,
  fua: boolean,
): Promise<void> {
  const opts = fua ? { fua } : {};
  if (isAligned(node, offset, src.length) || src.length === 0) {
    return await node.write(offset, src, opts);
  }
  const [start, end] = covering(node, offset, src.length);
  const bounce = new Uint8Array(end - start);
  await node.read(start, bounce);
  bounce.set(src, offset - start);
  await node.write(start, bounce, opts);
}

async function zeroBytes(
  node: BlockNode,
  offset: number,
  length: number,
  unmap: boolean,
  fua: boolean,
): Promise<void> {
  const opts = { ...(unmap ? { unmap } : {}), ...(fua ? { fua } : {}) };
  if (isAligned(node, offset, length) || length === 0) {
    return await node.writeZeroes(offset, length, opts);
  }
  const align = node.requestAlignment;
  const end = offset + length;
  const middleStart = alignDown(offset + align - 1, align);
  const middleEnd = alignDown(end, align);
  if (middleStart >= middleEnd) {
    return await writeBytes(node, offset, new Uint8Array(length), fua);
  }
  if (middleStart > offset) {
    await writeBytes(node, offset, new Uint8Array(middleStart - offset), fua);
  }
  await node.writeZeroes(middleStart, middleEnd - middleStart, opts);
  if (end > middleEnd) await writeBytes(node, middleEnd, new Uint8Array(end - middleEnd), fua);
}

/** Discard is a hint: an unaligned head or tail is left alone, as QEMU does. */
async function discardBytes(node: BlockNode, offset: number, length: number): Promise<void> {
  if (isAligned(node, offset, length)) return await node.discard(offset, length);
  const align = node.requestAlignment;
  const start = alignDown(offset + align - 1, align);
  const end = alignDown(offset + length, align);
  if (end > start) await node.discard(start, end - start);
}

/** QEMU's request check: inside the node, else EIO. Returns the range as numbers. */
function checkRange(node: BlockNode, offset: bigint, length: bigint): [number, number] {
  const size = BigInt(node.size);
  if (offset > size || length > size - offset) throw new IoFailure(EIO);
  return [Number(offset), Number(length)];
}

function isAllocated(extent: Extent): boolean {
  return extent.kind === "data" || extent.kind === "zero" || extent.kind === "compressed";
}

// ---------------------------------------------------------------------------------------------
// Commands

interface Command {
  readonly name: string;
  readonly altname?: string;
  readonly argmin: number;
  /** -1: no limit. */
  readonly argmax: number;
  readonly args?: string;
  readonly oneline: string;
  readonly help?: readonly string[];
  /** Needs write permission: refused up front on a read-only node. */
  readonly write?: boolean;
  run(s: Session, argv: string[]): Promise<boolean>;
}

class Session {
  readonly node: BlockNode;
  readonly out: (line: string) => void;
  readonly err: (line: string) => void;
  quit = false;

  constructor(node: BlockNode, out: (line: string) => void, err: (line: string) => void) {
    this.node = node;
    this.out = out;
    this.err = err;
  }

  /** QEMU's error_report(). */
  report(message: string): void {
    this.err(`${PROGRAM}: ${message}`);
  }

  usage(cmd: Command): void {
    this.out(`${cmd.name} ${cmd.args ?? ""} -- ${cmd.oneline}`);
  }

  /** qemu-io's cvtnum plus print_cvtnum_err; `shown` is the text the error names. */
  cvtnum(text: string, shown = text): bigint | undefined {
    const r = parseSize(text);
    if (r.ok && r.deprecatedHexSuffix) {
      this.err(
        `${PROGRAM}: warning: Using a multiplier suffix on hex numbers is deprecated: ${text}`,
      );
    }
    if (r.ok && r.value <= INT64_MAX) return r.value;
    if (!r.ok && r.reason === "invalid") {
      this.out(
        `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${shown}`,
      );
    } else {
      this.out(`Parsing error: argument too large -- ${shown}`);
    }
    return undefined;
  }

  pattern(arg: string): number | undefined {
    const p = parsePattern(arg);
    if (p === undefined) this.out(`${arg} is not a valid pattern byte`);
    return p;
  }

  /** print_report(): the result line and the timing line (or the -C line). */
  printReport(
    op: string,
    elapsedMs: number,
    offset: number,
    count: number,
    machine: boolean,
  ): void {
    // clock_gettime never reads 0 ns for a request; keep the rates finite as it does.
    const seconds = Math.max(elapsedMs / 1000, 1e-9);
    const time = timestr(seconds, machine);
    if (machine) {
      this.out(
        `${count},1,${time},${formatFixed(count / seconds, 3)},${formatFixed(1 / seconds, 3)}`,
      );
      return;
    }
    this.out(`${op} ${count}/${count} bytes at offset ${offset}`);
    this.out(
      `${cvtstr(count)}, 1 ops; ${time} (${cvtstr(count / seconds)}/sec and ${
        formatFixed(1 / seconds, 4)
      } ops/sec)`,
    );
  }

  dump(buf: Uint8Array, offset: number): void {
    for (let i = 0; i < buf.length; i += 16) {
      const row = buf.subarray(i, i + 16);
      let hex = "";
      let text = "";
      for (const b of row) {
        hex += `${hex2(b)} `;
        text += isalnum(b) ? String.fromCharCode(b) : ".";
      }
      this.out(`${(offset + i).toString(16).padStart(8, "0")}:  ${hex} ${text}`);
    }
  }

  /** Run one command line; false when it failed. */
  async run(line: string): Promise<boolean> {
    const argv = line.split(" ").filter((word) => word !== "");
    const name = argv[0];
    if (name === undefined) return true;
    const cmd = findCommand(name);
    if (cmd === undefined) {
      this.err(`command "${name}" not found`);
      return false;
    }
    const argc = argv.length - 1;
    if (argc < cmd.argmin || (cmd.argmax !== -1 && argc > cmd.argmax)) {
      const expected = cmd.argmax === -1
        ? `at least ${cmd.argmin} arguments`
        : cmd.argmin === cmd.argmax
        ? `${cmd.argmin} arguments`
        : `between ${cmd.argmin} and ${cmd.argmax} arguments`;
      this.err(`bad argument count ${argc} to ${name}, expected ${expected}`);
      return false;
    }
    if (cmd.write && this.node.readOnly) {
      this.report("Block node is read-only");
      return false;
    }
    try {
      return await cmd.run(this, argv);
    } catch (e) {
      this.report(messageOf(e));
      return false;
    }
  }
}

const readCommand: Command = {
  name: "read",
  altname: "r",
  argmin: 2,
  argmax: -1,
  args: "[-abCqv] [-P pattern [-s off] [-l len]] off len",
  oneline: "reads a number of bytes at a specified offset",
  help: [
    "",
    " reads a range of bytes from the given offset",
    "",
    " Example:",
    " 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file",
    "",
    " Reads a segment of the currently open file, optionally dumping it to the",
    " standard output stream (with -v option) for subsequent inspection.",
    " -b, -- read from the VM state rather than the virtual disk",
    " -C, -- report statistics in a machine parsable format",
    " -l, -- length for pattern verification (only with -P)",
    " -p, -- ignored for backwards compatibility",
    " -P, -- use a pattern to verify read data",
    " -q, -- quiet mode, do not show I/O statistics",
    " -s, -- start offset for pattern verification (only with -P)",
    " -v, -- dump buffer to standard output",
    "",
  ],
  async run(s, argv) {
    let vmState = false, machine = false, quiet = false, verbose = false;
    let verify = false, hasStart = false, hasLength = false;
    let pattern = 0;
    let patternStart = 0n;
    let patternLength = 0n;
    const parsed = getopt(argv, "bCl:pP:qs:v");
    for (const { c, arg } of parsed.opts) {
      if (c === "b") vmState = true;
      else if (c === "C") machine = true;
      else if (c === "q") quiet = true;
      else if (c === "v") verbose = true;
      else if (c === "l") {
        hasLength = true;
        const n = s.cvtnum(arg);
        if (n === undefined) return false;
        patternLength = n;
      } else if (c === "s") {
        hasStart = true;
        const n = s.cvtnum(arg);
        if (n === undefined) return false;
        patternStart = n;
      } else if (c === "P") {
        verify = true;
        const p = s.pattern(arg);
        if (p === undefined) return false;
        pattern = p;
      }
    }
    if (parsed.error !== undefined || parsed.operands.length !== 2) {
      if (parsed.error !== undefined) s.err(parsed.error);
      s.usage(this);
      return false;
    }
    const [offsetText = "", countText = ""] = parsed.operands;
    const offset = s.cvtnum(offsetText);
    if (offset === undefined) return false;
    const count = s.cvtnum(countText);
    if (count === undefined) return false;
    if (count > BigInt(MAX_REQUEST_BYTES)) {
      s.out(`length cannot exceed ${MAX_REQUEST_BYTES}, given ${countText}`);
      return false;
    }
    if (!verify && (hasLength || hasStart)) {
      s.usage(this);
      return false;
    }
    if (!hasLength) patternLength = count - patternStart;
    if (patternLength < 0n || patternLength + patternStart > count) {
      s.out("pattern verification range exceeds end of read data");
      return false;
    }
    if (vmState && !sectorAligned(s, offset, count)) return false;

    let buf: Uint8Array;
    const t0 = performance.now();
    try {
      if (vmState) throw new IoFailure(ENOTSUP);
      const [at, length] = checkRange(s.node, offset, count);
      buf = await readBytes(s.node, at, length);
    } catch (e) {
      s.out(`read failed: ${errnoText(e)}`);
      return false;
    }
    const elapsed = performance.now() - t0;
    let ok = true;
    if (verify) {
      const from = Number(patternStart);
      const region = buf.subarray(from, from + Number(patternLength));
      if (!region.every((b) => b === pattern)) {
        s.out(
          `Pattern verification failed at offset ${offset + patternStart}, ${patternLength} bytes`,
        );
        ok = false;
      }
    }
    if (quiet) return ok;
    if (verbose) s.dump(buf, Number(offset));
    s.printReport("read", elapsed, Number(offset), buf.length, machine);
    return ok;
  },
};

/** qemu-io's sector checks for -b and -c. */
function sectorAligned(s: Session, offset: bigint, count: bigint): boolean {
  if (offset % BigInt(SECTOR_SIZE) !== 0n) {
    s.out(`${offset} is not a sector-aligned value for 'offset'`);
    return false;
  }
  if (count % BigInt(SECTOR_SIZE) !== 0n) {
    s.out(`${count} is not a sector-aligned value for 'count'`);
    return false;
  }
  return true;
}

/** What fopen/fread failures print through perror(). */
function hostErrorText(e: unknown): string {
  const code = (e as { code?: unknown } | null)?.code;
  const errno = typeof code === "string" ? ERRNO_BY_NAME[code] : undefined;
  if (errno !== undefined) return strerror(errno);
  if (e instanceof Deno.errors.NotFound) return strerror(2);
  if (e instanceof Deno.errors.PermissionDenied) return strerror(13);
  if (e instanceof Deno.errors.IsADirectory) return strerror(21);
  return messageOf(e);
}

/** `write -s`: the file's first `length` bytes, repeated to fill the buffer. */
function bufferFromFile(s: Session, path: string, length: number): Uint8Array | undefined {
  const buf = new Uint8Array(length);
  let got = 0;
  try {
    using file = Deno.openSync(path, { read: true });
    while (got < length) {
      const n = file.readSync(buf.subarray(got));
      if (n === null || n === 0) break;
      got += n;
    }
  } catch (e) {
    s.err(`${path}: ${hostErrorText(e)}`);
    return undefined;
  }
  if (got === 0) {
    s.err(`${path}: file is empty`);
    return undefined;
  }
  for (let at = got; at < length; at += got) buf.copyWithin(at, 0, Math.min(got, length - at));
  return buf;
}

const writeCommand: Command = {
  name: "write",
  altname: "w",
  argmin: 2,
  argmax: -1,
  args: "[-bcCfnquz] [-P pattern | -s source_file] off len",
  oneline: "writes a number of bytes at a specified offset",
  write: true,
  help: [
    "",
    " writes a range of bytes from the given offset",
    "",
    " Example:",
    " 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file",
    "",
    " Writes into a segment of the currently open file, using a buffer",
    " filled with a set pattern (0xcdcdcdcd).",
    " -b, -- write to the VM state rather than the virtual disk",
    " -c, -- write compressed data with blk_write_compressed",
    " -f, -- use Force Unit Access semantics",
    " -n, -- with -z, don't allow slow fallback",
    " -p, -- ignored for backwards compatibility",
    " -P, -- use different pattern to fill file",
    " -s, -- use a pattern file to fill the write buffer",
    " -C, -- report statistics in a machine parsable format",
    " -q, -- quiet mode, do not show I/O statistics",
    " -u, -- with -z, allow unmapping",
    " -z, -- write zeroes using blk_co_pwrite_zeroes",
    "",
  ],
  async run(s, argv) {
    let vmState = false, compressed = false, machine = false, fua = false, noFallback = false;
    let quiet = false, unmap = false, zeroes = false, hasPattern = false;
    let pattern = 0xcd;
    let sourceFile: string | undefined;
    const parsed = getopt(argv, "bcCfnpP:qs:uz");
    for (const { c, arg } of parsed.opts) {
      if (c === "b") vmState = true;
      else if (c === "c") compressed = true;
      else if (c === "C") machine = true;
      else if (c === "f") fua = true;
      else if (c === "n") noFallback = true;
      else if (c === "q") quiet = true;
      else if (c === "s") sourceFile = arg;
      else if (c === "u") unmap = true;
      else if (c === "z") zeroes = true;
      else if (c === "P") {
        hasPattern = true;
        const p = s.pattern(arg);
        if (p === undefined) return false;
        pattern = p;
      }
    }
    if (parsed.error !== undefined || parsed.operands.length !== 2) {
      if (parsed.error !== undefined) s.err(parsed.error);
      s.usage(this);
      return false;
    }
    if (vmState && zeroes) {
      s.out("-b and -z cannot be specified at the same time");
      return false;
    }
    if (fua && (vmState || compressed)) {
      s.out("-f and -b or -c cannot be specified at the same time");
      return false;
    }
    if (noFallback && !zeroes) {
      s.out("-n requires -z to be specified");
      return false;
    }
    if (unmap && !zeroes) {
      s.out("-u requires -z to be specified");
      return false;
    }
    if (Number(zeroes) + Number(hasPattern) + Number(sourceFile !== undefined) > 1) {
      s.out("Only one of -z, -P, and -s can be specified at the same time");
      return false;
    }
    const [offsetText = "", countText = ""] = parsed.operands;
    const offset = s.cvtnum(offsetText);
    if (offset === undefined) return false;
    const count = s.cvtnum(countText);
    if (count === undefined) return false;
    if (count > BigInt(MAX_REQUEST_BYTES) && !noFallback) {
      s.out(`length cannot exceed ${MAX_REQUEST_BYTES} without -n, given ${countText}`);
      return false;
    }
    if ((vmState || compressed) && !sectorAligned(s, offset, count)) return false;

    let buf: Uint8Array | undefined;
    if (!zeroes) {
      // Only -z may go past MAX_REQUEST_BYTES, so the buffer size is a safe number.
      if (sourceFile !== undefined) {
        buf = bufferFromFile(s, sourceFile, Number(count));
        if (buf === undefined) return false;
      } else {
        buf = new Uint8Array(Number(count)).fill(pattern);
      }
    }
    const node = s.node as BlockNode & IoNodeExtras;
    const t0 = performance.now();
    try {
      if (vmState) throw new IoFailure(ENOTSUP);
      const [at, length] = checkRange(node, offset, count);
      if (buf === undefined) {
        await zeroBytes(node, at, length, unmap, fua);
      } else if (compressed) {
        if (node.writeCompressed === undefined) throw new IoFailure(ENOTSUP);
        await node.writeCompressed(at, buf);
      } else {
        await writeBytes(node, at, buf, fua);
      }
    } catch (e) {
      s.out(`write failed: ${errnoText(e)}`);
      return false;
    }
    const elapsed = performance.now() - t0;
    if (!quiet) s.printReport("wrote", elapsed, Number(offset), Number(count), machine);
    return true;
  },
};

const discardCommand: Command = {
  name: "discard",
  altname: "d",
  argmin: 2,
  argmax: -1,
  args: "[-Cq] off len",
  oneline: "discards a number of bytes at a specified offset",
  write: true,
  help: [
    "",
    " discards a range of bytes from the given offset",
    "",
    " Example:",
    " 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file",
    "",
    " Discards a segment of the currently open file.",
    " -C, -- report statistics in a machine parsable format",
    " -q, -- quiet mode, do not show I/O statistics",
    "",
  ],
  async run(s, argv) {
    let machine = false, quiet = false;
    const parsed = getopt(argv, "Cq");
    for (const { c } of parsed.opts) {
      if (c === "C") machine = true;
      else if (c === "q") quiet = true;
    }
    if (parsed.error !== undefined || parsed.operands.length !== 2) {
      if (parsed.error !== undefined) s.err(parsed.error);
      s.usage(this);
      return false;
    }
    const [offsetText = "", countText = ""] = parsed.operands;
    const offset = s.cvtnum(offsetText);
    if (offset === undefined) return false;
    const count = s.cvtnum(countText);
    if (count === undefined) return false;
    if (count > BigInt(MAX_REQUEST_BYTES)) {
      s.out(`length cannot exceed ${MAX_REQUEST_BYTES}, given ${countText}`);
      return false;
    }
    const t0 = performance.now();
    try {
      const [at, length] = checkRange(s.node, offset, count);
      await discardBytes(s.node, at, length);
    } catch (e) {
      s.out(`discard failed: ${errnoText(e)}`);
      return false;
    }
    const elapsed = performance.now() - t0;
    if (!quiet) s.printReport("discard", elapsed, Number(offset), Number(count), machine);
    return true;
  },
};

const flushCommand: Command = {
  name: "flush",
  altname: "f",
  argmin: 0,
  argmax: 0,
  oneline: "flush all in-core file state to disk",
  async run(s) {
    try {
      await s.node.flush();
      return true;
    } catch {
      return false; // qemu-io prints nothing for a failed flush, only its exit status tells
    }
  },
};

const PREALLOC_MODES = new Set(["off", "metadata", "falloc", "full"]);

const truncateCommand: Command = {
  name: "truncate",
  altname: "t",
  argmin: 1,
  argmax: 3,
  args: "[-m prealloc_mode] off",
  oneline: "truncates the current file at the given offset",
  write: true,
  async run(s, argv) {
    let mode = "off";
    const parsed = getopt(argv, "m:");
    for (const { c, arg } of parsed.opts) {
      if (c !== "m") continue;
      if (!PREALLOC_MODES.has(arg)) {
        s.report(`Invalid preallocation mode '${arg}'`);
        return false;
      }
      mode = arg;
    }
    const sizeText = parsed.operands[0];
    if (parsed.error !== undefined || sizeText === undefined) {
      // qemu-io 7.2 crashes on `truncate -m off` without a size; a usage line is kinder.
      if (parsed.error !== undefined) s.err(parsed.error);
      s.usage(this);
      return false;
    }
    // qemu-io names argv[1] in the error, even when that is "-m".
    const size = s.cvtnum(sizeText, argv[1]);
    if (size === undefined) return false;
    const node = s.node;
    if (node.truncate === undefined) {
      s.report("Image format driver does not support resize");
      return false;
    }
    if (mode === "metadata") {
      s.report("Unsupported preallocation mode: metadata");
      return false;
    }
    if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
      s.report(`Could not resize file: ${strerror(EFBIG)}`);
      return false;
    }
    const oldSize = node.size;
    const newSize = Number(size);
    try {
      await node.truncate(newSize);
      if (mode !== "off" && newSize > oldSize) {
        await node.writeZeroes(oldSize, newSize - oldSize);
      }
    } catch (e) {
      const errno = e instanceof BlockError ? e.context.errno : undefined;
      s.report(errno === undefined ? messageOf(e) : `Could not resize file: ${strerror(errno)}`);
      return false;
    }
    return true;
  },
};

const lengthCommand: Command = {
  name: "length",
  altname: "l",
  argmin: 0,
  argmax: 0,
  oneline: "gets the length of the current file",
  run(s) {
    s.out(cvtstr(s.node.size));
    return Promise.resolve(true);
  },
};

const infoCommand: Command = {
  name: "info",
  altname: "i",
  argmin: 0,
  argmax: 0,
  oneline: "prints information about the current file",
  run(s) {
    const node = s.node as BlockNode & IoNodeExtras;
    s.out(`format name: ${node.format}`);
    s.out(`cluster size: ${cvtstr(node.clusterSize ?? 0)}`);
    s.out(`vm state offset: ${cvtstr(node.vmStateOffset ?? 0)}`);
    return Promise.resolve(true);
  },
};

/** bdrv_is_allocated(): whether `offset` is allocated in this layer, and for how many bytes. */
async function allocationAt(
  node: BlockNode,
  offset: number,
  bytes: number,
): Promise<{ allocated: boolean; length: number }> {
  if (offset >= node.size || bytes === 0) return { allocated: false, length: 0 };
  const extent = await node.blockStatus(offset, Math.min(bytes, node.size - offset));
  if (extent.kind === "eof") return { allocated: false, length: 0 };
  return { allocated: isAllocated(extent), length: extent.length };
}

const allocCommand: Command = {
  name: "alloc",
  altname: "a",
  argmin: 1,
  argmax: 2,
  args: "offset [count]",
  oneline: "checks if offset is allocated in the file",
  async run(s, argv) {
    const start = s.cvtnum(argv[1] ?? "");
    if (start === undefined) return false;
    let count = BigInt(SECTOR_SIZE);
    if (argv.length === 3) {
      const n = s.cvtnum(argv[2] ?? "");
      if (n === undefined) return false;
      count = n;
    }
    // Past the end, nothing is allocated and the count shrinks to what the image holds.
    const size = BigInt(s.node.size);
    const inside = start >= size ? 0n : count < size - start ? count : size - start;
    let offset = Number(start);
    let remaining = Number(inside);
    let allocated = 0;
    try {
      while (remaining > 0) {
        const run = await allocationAt(s.node, offset, remaining);
        if (run.length === 0) break;
        if (run.allocated) allocated += run.length;
        offset += run.length;
        remaining -= run.length;
      }
    } catch (e) {
      s.out(`is_allocated failed: ${errnoText(e)}`);
      return false;
    }
    s.out(`${allocated}/${inside} bytes allocated at offset ${cvtstr(Number(start))}`);
    return true;
  },
};

const mapCommand: Command = {
  name: "map",
  argmin: 0,
  argmax: 0,
  args: "",
  oneline: "prints the allocated areas of a file",
  async run(s) {
    let offset = 0;
    let bytes = s.node.size;
    while (bytes > 0) {
      let allocated: boolean;
      let length: number;
      try {
        const first = await allocationAt(s.node, offset, bytes);
        allocated = first.allocated;
        length = first.length;
        // Merge following runs of the same status into one line, as map_is_allocated() does.
        while (first.length > 0 && length < bytes) {
          const next = await allocationAt(s.node, offset + length, bytes - length);
          if (next.length === 0 || next.allocated !== allocated) break;
          length += next.length;
        }
      } catch (e) {
        s.report(`Failed to get allocation status: ${errnoText(e)}`);
        return false;
      }
      if (length === 0) {
        s.report("Unexpected end of image");
        return false;
      }
      const status = allocated ? "    allocated" : "not allocated";
      s.out(
        `${cvtstr(length)} (0x${length.toString(16)}) bytes ${status} at offset ${
          cvtstr(offset)
        } (0x${offset.toString(16)})`,
      );
      offset += length;
      bytes -= length;
    }
    return true;
  },
};

const helpCommand: Command = {
  name: "help",
  altname: "?",
  argmin: 0,
  argmax: 1,
  args: "[command]",
  oneline: "help for one or all commands",
  run(s, argv) {
    const topic = argv[1];
    if (topic === undefined) {
      for (const cmd of COMMANDS) s.out(helpLine(cmd.name, cmd));
      s.out("");
      s.out("Use 'help commandname' for extended help.");
      return Promise.resolve(true);
    }
    const cmd = findCommand(topic);
    if (cmd === undefined) {
      s.out(`command ${topic} not found`);
      return Promise.resolve(false);
    }
    s.out(helpLine(topic, cmd));
    for (const line of cmd.help ?? []) s.out(line);
    return Promise.resolve(true);
  },
};

const quitCommand: Command = {
  name: "quit",
  altname: "q",
  argmin: 0,
  argmax: -1,
  oneline: "exit the program",
  run(s) {
    s.quit = true;
    return Promise.resolve(true);
  },
};

function helpLine(typed: string, cmd: Command): string {
  return `${typed} ${cmd.args === undefined ? "" : `${cmd.args} `}-- ${cmd.oneline}`;
}

/** Sorted by name, as qemu-io keeps its table. */
const COMMANDS: readonly Command[] = [
  allocCommand,
  discardCommand,
  flushCommand,
  helpCommand,
  infoCommand,
  lengthCommand,
  mapCommand,
  quitCommand,
  readCommand,
  truncateCommand,
  writeCommand,
];

function findCommand(name: string): Command | undefined {
  return COMMANDS.find((cmd) => cmd.name === name || cmd.altname === name);
}

// ---------------------------------------------------------------------------------------------
// Entry points

/**
 * Run qemu-io commands against an open node, one command per string, stopping after `quit`.
 *
 * @param node The node the commands act on (left open).
 * @param commands Command lines, e.g. `"write -P 0xab 0 64k"`.
 * @param out Receives each output line, without its newline.
 * @param options Where stderr lines go (default: `out`).
 * @returns Whether every command succeeded (qemu-io's exit status 0).
 * @example
 * ```ts
 * import { runIoCommands } from "./io.ts";
 * import { RawNode } from "../../formats/raw.ts";
 * import { MemoryFile } from "../host/memory.ts";
 * const node = await RawNode.open(new MemoryFile("mem", new Uint8Array(4096)));
 * const lines: string[] = [];
 * const ok = await runIoCommands(node, ["write -q -P 0xab 0 512", "read -q -P 0xab 0 512"], (l) => lines.push(l));
 * if (!ok || lines.length !== 0) throw new Error(lines.join("\n"));
 * ```
 */
export async function runIoCommands(
  node: BlockNode,
  commands: Iterable<string> | AsyncIterable<string>,
  out: (line: string) => void,
  options: RunIoOptions = {},
): Promise<boolean> {
  const session = new Session(node, out, options.err ?? out);
  let ok = true;
  for await (const line of commands) {
    if (!(await session.run(line))) ok = false;
    if (session.quit) break;
  }
  return ok;
}

const HELP = `usage: ${USAGE}

Run qemu-io commands on an image: each -c CMD in order, or one command per line from stdin.

Options:
  -f, --format FMT     image format (probed when absent)
  -r, --read-only      open the image read-only
  -U, --force-share    share the image with writers (needs -r)
  -c, --cmd CMD        run CMD; may be repeated
  -h, --help           show this help

Commands (see -c help): alloc, discard, flush, help, info, length, map, quit, read, truncate, write
Exit status: 0 when every command succeeded, 1 when one failed or FILE could not be opened,
2 for a usage error.
`;

const encoder = new TextEncoder();

function writeAllSync(target: { writeSync(p: Uint8Array): number }, text: string): void {
  let bytes = encoder.encode(text);
  while (bytes.length > 0) bytes = bytes.subarray(target.writeSync(bytes));
}

async function* lines(
  stream: ReadableStream<Uint8Array>,
  beforeEach: () => void,
): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let pending = "";
  beforeEach();
  for await (const chunk of stream) {
    pending += decoder.decode(chunk, { stream: true });
    let newline: number;
    while ((newline = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      yield line;
      beforeEach();
    }
  }
  pending += decoder.decode();
  if (pending !== "") yield pending;
}

function* each(commands: readonly string[], beforeEach: () => void): Generator<string> {
  for (const command of commands) {
    beforeEach();
    yield command;
  }
}

/**
 * The `vstor io` command line: `[-f FMT] [-r] [-U] [-c CMD]... FILE`, commands from stdin (one per
 * line) when no `-c` is given.
 *
 * @param args The arguments after the verb `io`.
 * @param io Output and input streams; default the process's.
 * @returns The exit code: 0 ok, 1 a command failed or FILE did not open, 2 usage.
 * @example
 * ```ts
 * import { ioMain } from "./io.ts";
 * let err = "";
 * const code = await ioMain([], { stderr: (s) => err += s });
 * if (code !== 2 || !err.includes("usage")) throw new Error("expected a usage error");
 * ```
 */
export async function ioMain(
  args: string[],
  io: {
    stdout?: (s: string) => void;
    stderr?: (s: string) => void;
    stdin?: ReadableStream<Uint8Array>;
  } = {},
): Promise<number> {
  const stdout = io.stdout ?? ((text: string) => writeAllSync(Deno.stdout, text));
  const stderr = io.stderr ?? ((text: string) => writeAllSync(Deno.stderr, text));
  const usageError = (message: string): number => {
    stderr(`vstor io: ${message}\nusage: ${USAGE}\n`);
    return 2;
  };

  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        format: { type: "string", short: "f" },
        "read-only": { type: "boolean", short: "r" },
        "force-share": { type: "boolean", short: "U" },
        cmd: { type: "string", short: "c", multiple: true },
        help: { type: "boolean", short: "h" },
      },
      allowPositionals: true,
      strict: true,
    });
  } catch (e) {
    // node:util's messages run on with advice; the first sentence names the problem.
    return usageError(messageOf(e).split(". ")[0]?.replace(/\.$/, "") ?? "bad arguments");
  }
  const { values, positionals } = parsed;
  if (values.help) {
    stdout(HELP);
    return 0;
  }
  if (positionals.length !== 1) {
    return usageError(positionals.length === 0 ? "missing FILE" : "expected one FILE");
  }
  const path = positionals[0] ?? "";
  const format = values.format;
  const openOptions: OpenOptions = {
    readOnly: values["read-only"] ?? false,
    forceShare: values["force-share"] ?? false,
    ...(format === undefined ? {} : { format }),
  };

  let node: BlockNode;
  try {
    node = await openImage(path, openOptions);
  } catch (e) {
    const message = messageOf(e);
    stderr(`${PROGRAM}: ${message.includes(path) ? message : `${path}: ${message}`}\n`);
    return 1;
  }
  if (format === undefined && node.format === "raw" && !node.readOnly) {
    stderr(probedRawWarning(path));
  }

  // Output is batched per command (and per 64 KiB); stderr lines flush it first to keep order.
  let pending: string[] = [];
  let pendingBytes = 0;
  const flushOut = () => {
    if (pending.length === 0) return;
    stdout(pending.join(""));
    pending = [];
    pendingBytes = 0;
  };
  const outLine = (line: string) => {
    pending.push(`${line}\n`);
    pendingBytes += line.length + 1;
    if (pendingBytes >= 1 << 16) flushOut();
  };
  const errLine = (line: string) => {
    flushOut();
    stderr(`${line}\n`);
  };
  const interactive = io.stdin === undefined && Deno.stdin.isTerminal();
  const beforeEach = () => {
    flushOut();
    if (interactive) stdout(`${PROGRAM}> `);
  };
  const commands = values.cmd === undefined
    ? lines(io.stdin ?? Deno.stdin.readable, beforeEach)
    : each(values.cmd, flushOut);

  let ok = false;
  try {
    ok = await runIoCommands(node, commands, outLine, { err: errLine });
  } finally {
    flushOut();
    try {
      await node.close();
    } catch (e) {
      stderr(`${PROGRAM}: ${path}: ${messageOf(e)}\n`);
      ok = false;
    }
  }
  return ok ? 0 : 1;
}
