/**
 * qemu-io's synchronous I/O commands: read, readv, write, writev, discard, flush, truncate.
 *
 * @module
 */
import type { BlockNode } from "../../block/node.ts";
import { BlockError } from "../../errors.ts";
import { checkRange, copyOnRead, discardBytes, readInto, writeBytes, zeroBytes } from "./ranges.ts";
import type { Command, Session } from "./session.ts";
import {
  EFBIG,
  ENOTSUP,
  errnoText,
  getopt,
  hostErrorText,
  IoFailure,
  messageOf,
  type ParsedOpts,
  strerror,
} from "./text.ts";

/** Largest request qemu-io passes on: INT_MAX rounded down to a sector (BDRV_REQUEST_MAX_BYTES). */
export const MAX_REQUEST_BYTES = 2147483136;
export const SECTOR_SIZE = 512;

/** Capabilities `vstor io` uses when a node has them (they are not part of {@linkcode BlockNode}). */
export interface IoNodeExtras {
  /** `write -c`: write `src` compressed; nodes without it fail with "Operation not supported". */
  writeCompressed?(offset: number, src: Uint8Array): Promise<void>;
  /** `info`: cluster size in bytes (0 when absent, as qemu-io prints for raw). */
  readonly clusterSize?: number;
  /** `info`: where VM state would be saved (0 when absent). */
  readonly vmStateOffset?: number;
  /** `write -b`/`read -b`: the VM state area; nodes without it fail with "Operation not supported". */
  writeVmState?(pos: number, src: Uint8Array): Promise<void>;
  readVmState?(pos: number, dst: Uint8Array): Promise<void>;
}

/** qemu-io's sector checks for -b and -c. */
export function sectorAligned(s: Session, offset: bigint, count: bigint): boolean {
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

/** Whether discards reach the node (-d unmap, qemu-io's default) or are dropped (-d ignore). */
export function unmapAllowed(s: Session): boolean {
  return s.image?.request.discard !== "ignore";
}

export async function readRange(s: Session, offset: bigint, count: bigint): Promise<Uint8Array> {
  const [at, length] = checkRange(s.node, offset, count);
  const buf = new Uint8Array(length);
  await readInto(s.node, at, buf);
  if (s.image?.request.copyOnRead) await copyOnRead(s.node, at, buf);
  return buf;
}

async function writeRange(
  s: Session,
  offset: bigint,
  buf: Uint8Array,
  fua: boolean,
): Promise<void> {
  const [at] = checkRange(s.node, offset, BigInt(buf.length));
  await writeBytes(s.node, at, buf, fua || s.writethrough);
}

export const readCommand: Command = {
  name: "read",
  altname: "r",
  argmin: 2,
  argmax: -1,
  polls: true,
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
    const request = rangeRequest(s, this, parsed);
    if (request === undefined) return false;
    const { offset, count } = request;
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
      if (vmState) {
        const node = s.node as BlockNode & IoNodeExtras;
        if (node.readVmState === undefined) throw new IoFailure(ENOTSUP);
        buf = new Uint8Array(Number(count));
        await node.readVmState(Number(offset), buf);
      } else {
        buf = await readRange(s, offset, count);
      }
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
    if (verbose) s.dump(buf, offset);
    s.printReport("read", elapsed, offset, buf.length, machine);
    return ok;
  },
};

/**
 * The operands of read and discard: OFFSET and LENGTH, checked as qemu-io checks them (usage
 * after a getopt complaint or a wrong operand count, then each number, then the length limit);
 * undefined after a complaint.
 */
export function rangeRequest(
  s: Session,
  command: Command,
  parsed: ParsedOpts,
): { offset: bigint; count: bigint } | undefined {
  if (parsed.error !== undefined || parsed.operands.length !== 2) {
    if (parsed.error !== undefined) s.err(parsed.error);
    s.usage(command);
    return undefined;
  }
  const [offsetText = "", countText = ""] = parsed.operands;
  const offset = s.cvtnum(offsetText);
  if (offset === undefined) return undefined;
  const count = s.cvtnum(countText);
  if (count === undefined) return undefined;
  if (count > BigInt(MAX_REQUEST_BYTES)) {
    s.out(`length cannot exceed ${MAX_REQUEST_BYTES}, given ${countText}`);
    return undefined;
  }
  return { offset, count };
}

/**
 * The operands of readv/writev/aio_read/aio_write: OFFSET then one length per iovec, checked as
 * qemu-io checks them (usage after a getopt complaint or a missing operand); undefined after a
 * complaint.
 */
export function vectoredRequest(
  s: Session,
  command: Command,
  parsed: ParsedOpts,
): { offset: bigint; size: number } | undefined {
  if (parsed.error !== undefined || parsed.operands.length < 2) {
    if (parsed.error !== undefined) s.err(parsed.error);
    s.usage(command);
    return undefined;
  }
  const offset = s.cvtnum(parsed.operands[0] ?? "");
  if (offset === undefined) return undefined;
  const lengths = iovecLengths(s, parsed.operands.slice(1));
  if (lengths === undefined) return undefined;
  return { offset, size: sum(lengths) };
}

/** create_iovec(): the lengths of a vectored request, checked; undefined after a complaint. */
export function iovecLengths(s: Session, args: readonly string[]): number[] | undefined {
  const lengths: number[] = [];
  let total = 0;
  for (const arg of args) {
    const len = s.cvtnum(arg);
    if (len === undefined) return undefined;
    if (len > BigInt(MAX_REQUEST_BYTES)) {
      s.out(`Argument '${arg}' exceeds maximum size ${MAX_REQUEST_BYTES}`);
      return undefined;
    }
    if (total > MAX_REQUEST_BYTES - Number(len)) {
      s.out(`The total number of bytes exceed the maximum size ${MAX_REQUEST_BYTES}`);
      return undefined;
    }
    lengths.push(Number(len));
    total += Number(len);
  }
  return lengths;
}

export function sum(lengths: readonly number[]): number {
  return lengths.reduce((a, b) => a + b, 0);
}

export const readvCommand: Command = {
  name: "readv",
  argmin: 2,
  argmax: -1,
  polls: true,
  args: "[-Cqv] [-P pattern] off len [len..]",
  oneline: "reads a number of bytes at a specified offset",
  help: [
    "",
    " reads a range of bytes from the given offset into multiple buffers",
    "",
    " Example:",
    " 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file",
    "",
    " Reads a segment of the currently open file, optionally dumping it to the",
    " standard output stream (with -v option) for subsequent inspection.",
    " Uses multiple iovec buffers if more than one byte range is specified.",
    " -C, -- report statistics in a machine parsable format",
    " -P, -- use a pattern to verify read data",
    " -v, -- dump buffer to standard output",
    " -q, -- quiet mode, do not show I/O statistics",
    "",
  ],
  async run(s, argv) {
    let machine = false, quiet = false, verbose = false, verify = false;
    let pattern = 0;
    const parsed = getopt(argv, "CP:qv");
    for (const { c, arg } of parsed.opts) {
      if (c === "C") machine = true;
      else if (c === "q") quiet = true;
      else if (c === "v") verbose = true;
      else if (c === "P") {
        verify = true;
        const p = s.pattern(arg);
        if (p === undefined) return false;
        pattern = p;
      }
    }
    const request = vectoredRequest(s, this, parsed);
    if (request === undefined) return false;
    const { offset, size } = request;
    let buf: Uint8Array;
    const t0 = performance.now();
    try {
      buf = await readRange(s, offset, BigInt(size));
    } catch (e) {
      s.out(`readv failed: ${errnoText(e)}`);
      return false;
    }
    const elapsed = performance.now() - t0;
    let ok = true;
    if (verify && !buf.every((b) => b === pattern)) {
      s.out(`Pattern verification failed at offset ${offset}, ${size} bytes`);
      ok = false;
    }
    if (quiet) return ok;
    if (verbose) s.dump(buf, offset);
    s.printReport("read", elapsed, offset, size, machine);
    return ok;
  },
};

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

export const writeCommand: Command = {
  name: "write",
  altname: "w",
  argmin: 2,
  argmax: -1,
  polls: true,
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

    const node = s.node as BlockNode & IoNodeExtras;
    // A request past the end fails before any buffer is made (qemu-io makes it first; the
    // output is the same, without allocating what an untrusted length asks for).
    let inside = true;
    try {
      checkRange(node, offset, count);
    } catch {
      inside = false;
    }
    let buf: Uint8Array | undefined;
    if (!zeroes) {
      // The VM state area lies past the disk: its requests are not limited by the disk's size.
      const length = inside || vmState ? Number(count) : Math.min(Number(count), SECTOR_SIZE);
      if (sourceFile !== undefined) {
        buf = bufferFromFile(s, sourceFile, length);
        if (buf === undefined) return false;
      } else if (inside || vmState) {
        buf = new Uint8Array(length).fill(pattern);
      }
    }
    const t0 = performance.now();
    try {
      if (vmState) {
        if (node.writeVmState === undefined) throw new IoFailure(ENOTSUP);
        await node.writeVmState(Number(offset), buf!);
        if (s.writethrough) await node.flush();
        const elapsed = performance.now() - t0;
        if (!quiet) s.printReport("wrote", elapsed, offset, Number(count), machine);
        return true;
      }
      const [at, length] = checkRange(node, offset, count);
      if (zeroes) {
        await zeroBytes(node, at, length, unmap && unmapAllowed(s), fua || s.writethrough);
      } else if (compressed) {
        if (node.writeCompressed === undefined) throw new IoFailure(ENOTSUP);
        await node.writeCompressed(at, buf!);
        if (s.writethrough) await node.flush();
      } else {
        await writeBytes(node, at, buf!, fua || s.writethrough);
      }
    } catch (e) {
      s.out(`write failed: ${errnoText(e)}`);
      return false;
    }
    const elapsed = performance.now() - t0;
    if (!quiet) s.printReport("wrote", elapsed, offset, Number(count), machine);
    return true;
  },
};

export const writevCommand: Command = {
  name: "writev",
  argmin: 2,
  argmax: -1,
  polls: true,
  args: "[-Cfq] [-P pattern] off len [len..]",
  oneline: "writes a number of bytes at a specified offset",
  write: true,
  help: [
    "",
    " writes a range of bytes from the given offset source from multiple buffers",
    "",
    " Example:",
    " 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file",
    "",
    " Writes into a segment of the currently open file, using a buffer",
    " filled with a set pattern (0xcdcdcdcd).",
    " -P, -- use different pattern to fill file",
    " -C, -- report statistics in a machine parsable format",
    " -f, -- use Force Unit Access semantics",
    " -q, -- quiet mode, do not show I/O statistics",
    "",
  ],
  async run(s, argv) {
    let machine = false, quiet = false, fua = false;
    let pattern = 0xcd;
    const parsed = getopt(argv, "CfP:q");
    for (const { c, arg } of parsed.opts) {
      if (c === "C") machine = true;
      else if (c === "f") fua = true;
      else if (c === "q") quiet = true;
      else if (c === "P") {
        const p = s.pattern(arg);
        if (p === undefined) return false;
        pattern = p;
      }
    }
    const request = vectoredRequest(s, this, parsed);
    if (request === undefined) return false;
    const { offset, size } = request;
    const t0 = performance.now();
    try {
      checkRange(s.node, offset, BigInt(size));
      await writeRange(s, offset, new Uint8Array(size).fill(pattern), fua);
    } catch (e) {
      s.out(`writev failed: ${errnoText(e)}`);
      return false;
    }
    const elapsed = performance.now() - t0;
    if (!quiet) s.printReport("wrote", elapsed, offset, size, machine);
    return true;
  },
};

export const discardCommand: Command = {
  name: "discard",
  altname: "d",
  argmin: 2,
  argmax: -1,
  polls: true,
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
    const request = rangeRequest(s, this, parsed);
    if (request === undefined) return false;
    const { offset, count } = request;
    const t0 = performance.now();
    try {
      const [at, length] = checkRange(s.node, offset, count);
      // -d ignore: QEMU drops the request once it has passed the range check.
      if (unmapAllowed(s)) await discardBytes(s.node, at, length);
    } catch (e) {
      s.out(`discard failed: ${errnoText(e)}`);
      return false;
    }
    const elapsed = performance.now() - t0;
    if (!quiet) s.printReport("discard", elapsed, offset, Number(count), machine);
    return true;
  },
};

export const flushCommand: Command = {
  name: "flush",
  altname: "f",
  argmin: 0,
  argmax: 0,
  polls: true,
  oneline: "flush all in-core file state to disk",
  async run(s) {
    if (s.image?.request.cache.noFlush) return true; // cache=unsafe ignores flushes
    try {
      await s.node.flush();
      return true;
    } catch {
      return false; // qemu-io prints nothing for a failed flush, only its exit status tells
    }
  },
};

const PREALLOC_MODES = new Set(["off", "metadata", "falloc", "full"]);

export const truncateCommand: Command = {
  name: "truncate",
  altname: "t",
  argmin: 1,
  argmax: 3,
  polls: true,
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
    if (mode === "metadata" && node.format !== "qcow2") {
      s.report("Unsupported preallocation mode: metadata");
      return false;
    }
    if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
      s.report(`Could not resize file: ${strerror(EFBIG)}`);
      return false;
    }
    try {
      await node.truncate(Number(size), {
        preallocation: mode as "off" | "metadata" | "falloc" | "full",
      });
    } catch (e) {
      const errno = e instanceof BlockError ? e.context.errno : undefined;
      s.report(errno === undefined ? messageOf(e) : `Could not resize file: ${strerror(errno)}`);
      return false;
    }
    return true;
  },
};
