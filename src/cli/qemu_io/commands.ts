/**
 * qemu-io 7.2's commands, with its options, checks, messages and help texts.
 *
 * @module
 */
import type { BlockNode } from "../../block/node.ts";
import { BlockError } from "../../errors.ts";
import { imageInfo } from "../info.ts";
import { probedRawWarning } from "../messages.ts";
import {
  allocationAt,
  checkRange,
  copyOnRead,
  discardBytes,
  readInto,
  writeBytes,
  zeroBytes,
} from "./ranges.ts";
import {
  defaultRequest,
  OpenError,
  type OpenRequest,
  openRequest,
  parseAioMode,
  parseCacheMode,
  parseDiscardMode,
  parseOptionString,
} from "./open.ts";
import type { Command, Session } from "./session.ts";
import {
  cvtstr,
  EFBIG,
  EIO,
  ENOTSUP,
  errnoText,
  getopt,
  hostErrorText,
  IoFailure,
  messageOf,
  strerror,
  strtol,
} from "./text.ts";

/** Largest request qemu-io passes on: INT_MAX rounded down to a sector (BDRV_REQUEST_MAX_BYTES). */
export const MAX_REQUEST_BYTES = 2147483136;
const SECTOR_SIZE = 512;
/** NSIG on Linux: signals are 1..64, raise(65) fails quietly. */
const NSIG = 65;

/** Capabilities `vstor io` uses when a node has them (they are not part of {@linkcode BlockNode}). */
export interface IoNodeExtras {
  /** `write -c`: write `src` compressed; nodes without it fail with "Operation not supported". */
  writeCompressed?(offset: number, src: Uint8Array): Promise<void>;
  /** `info`: cluster size in bytes (0 when absent, as qemu-io prints for raw). */
  readonly clusterSize?: number;
  /** `info`: where VM state would be saved (0 when absent). */
  readonly vmStateOffset?: number;
}

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

/** Whether discards reach the node (-d unmap, qemu-io's default) or are dropped (-d ignore). */
function unmapAllowed(s: Session): boolean {
  return s.image?.request.discard !== "ignore";
}

async function readRange(s: Session, offset: bigint, count: bigint): Promise<Uint8Array> {
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

const readCommand: Command = {
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
      buf = await readRange(s, offset, count);
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

/** create_iovec(): the lengths of a vectored request, checked; undefined after a complaint. */
function iovecLengths(s: Session, args: readonly string[]): number[] | undefined {
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

function sum(lengths: readonly number[]): number {
  return lengths.reduce((a, b) => a + b, 0);
}

const readvCommand: Command = {
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
    if (parsed.error !== undefined || parsed.operands.length < 2) {
      if (parsed.error !== undefined) s.err(parsed.error);
      s.usage(this);
      return false;
    }
    const offset = s.cvtnum(parsed.operands[0] ?? "");
    if (offset === undefined) return false;
    const lengths = iovecLengths(s, parsed.operands.slice(1));
    if (lengths === undefined) return false;
    const size = sum(lengths);
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

const writeCommand: Command = {
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
      const length = inside ? Number(count) : Math.min(Number(count), SECTOR_SIZE);
      if (sourceFile !== undefined) {
        buf = bufferFromFile(s, sourceFile, length);
        if (buf === undefined) return false;
      } else if (inside) {
        buf = new Uint8Array(length).fill(pattern);
      }
    }
    const t0 = performance.now();
    try {
      if (vmState) throw new IoFailure(ENOTSUP);
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

const writevCommand: Command = {
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
    if (parsed.error !== undefined || parsed.operands.length < 2) {
      if (parsed.error !== undefined) s.err(parsed.error);
      s.usage(this);
      return false;
    }
    const offset = s.cvtnum(parsed.operands[0] ?? "");
    if (offset === undefined) return false;
    const lengths = iovecLengths(s, parsed.operands.slice(1));
    if (lengths === undefined) return false;
    const size = sum(lengths);
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

const aioReadCommand: Command = {
  name: "aio_read",
  argmin: 2,
  argmax: -1,
  args: "[-Ciqv] [-P pattern] off len [len..]",
  oneline: "asynchronously reads a number of bytes",
  help: [
    "",
    " asynchronously reads a range of bytes from the given offset",
    "",
    " Example:",
    " 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file",
    "",
    " Reads a segment of the currently open file, optionally dumping it to the",
    " standard output stream (with -v option) for subsequent inspection.",
    " The read is performed asynchronously and the aio_flush command must be",
    " used to ensure all outstanding aio requests have been completed.",
    " Note that due to its asynchronous nature, this command will be",
    " considered successful once the request is submitted, independently",
    " of potential I/O errors or pattern mismatches.",
    " -C, -- report statistics in a machine parsable format",
    " -P, -- use a pattern to verify read data",
    " -i, -- treat request as invalid, for exercising stats",
    " -v, -- dump buffer to standard output",
    " -q, -- quiet mode, do not show I/O statistics",
    "",
  ],
  async run(s, argv) {
    let machine = false, quiet = false, verbose = false, verify = false;
    let pattern = 0;
    const parsed = getopt(argv, "CiP:qv");
    for (const { c, arg } of parsed.opts) {
      if (c === "C") machine = true;
      else if (c === "q") quiet = true;
      else if (c === "v") verbose = true;
      else if (c === "i") {
        s.out("injecting invalid read request");
        return true;
      } else if (c === "P") {
        verify = true;
        const p = s.pattern(arg);
        if (p === undefined) return false;
        pattern = p;
      }
    }
    if (parsed.error !== undefined || parsed.operands.length < 2) {
      if (parsed.error !== undefined) s.err(parsed.error);
      s.usage(this);
      return false;
    }
    const offset = s.cvtnum(parsed.operands[0] ?? "");
    if (offset === undefined) return false;
    const lengths = iovecLengths(s, parsed.operands.slice(1));
    if (lengths === undefined) return false;
    const size = sum(lengths);
    // The request runs now; what qemu-io prints when it completes waits for the event loop.
    const t0 = performance.now();
    let buf: Uint8Array | undefined;
    let failure: unknown;
    try {
      buf = await readRange(s, offset, BigInt(size));
    } catch (e) {
      failure = e;
    }
    const elapsed = performance.now() - t0;
    s.complete(() => {
      if (buf === undefined) {
        s.out(`readv failed: ${errnoText(failure)}`);
        return;
      }
      if (verify && !buf.every((b) => b === pattern)) {
        s.out(`Pattern verification failed at offset ${offset}, ${size} bytes`);
      }
      if (quiet) return;
      if (verbose) s.dump(buf, offset);
      s.printReport("read", elapsed, offset, size, machine);
    });
    return true;
  },
};

const aioWriteCommand: Command = {
  name: "aio_write",
  argmin: 2,
  argmax: -1,
  args: "[-Cfiquz] [-P pattern] off len [len..]",
  oneline: "asynchronously writes a number of bytes",
  write: true,
  help: [
    "",
    " asynchronously writes a range of bytes from the given offset source",
    " from multiple buffers",
    "",
    " Example:",
    " 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file",
    "",
    " Writes into a segment of the currently open file, using a buffer",
    " filled with a set pattern (0xcdcdcdcd).",
    " The write is performed asynchronously and the aio_flush command must be",
    " used to ensure all outstanding aio requests have been completed.",
    " Note that due to its asynchronous nature, this command will be",
    " considered successful once the request is submitted, independently",
    " of potential I/O errors or pattern mismatches.",
    " -P, -- use different pattern to fill file",
    " -C, -- report statistics in a machine parsable format",
    " -f, -- use Force Unit Access semantics",
    " -i, -- treat request as invalid, for exercising stats",
    " -q, -- quiet mode, do not show I/O statistics",
    " -u, -- with -z, allow unmapping",
    " -z, -- write zeroes using blk_aio_pwrite_zeroes",
    "",
  ],
  async run(s, argv) {
    let machine = false, quiet = false, fua = false, unmap = false, zeroes = false;
    let pattern = 0xcd;
    const parsed = getopt(argv, "CfiP:quz");
    for (const { c, arg } of parsed.opts) {
      if (c === "C") machine = true;
      else if (c === "f") fua = true;
      else if (c === "q") quiet = true;
      else if (c === "u") unmap = true;
      else if (c === "z") zeroes = true;
      else if (c === "i") {
        s.out("injecting invalid write request");
        return true;
      } else if (c === "P") {
        // qemu-io 7.2 never marks -P as given here, so its "-z and -P" check cannot fire.
        const p = s.pattern(arg);
        if (p === undefined) return false;
        pattern = p;
      }
    }
    if (parsed.error !== undefined || parsed.operands.length < 2) {
      if (parsed.error !== undefined) s.err(parsed.error);
      s.usage(this);
      return false;
    }
    if (zeroes && parsed.operands.length !== 2) {
      s.out("-z supports only a single length parameter");
      return false;
    }
    if (unmap && !zeroes) {
      s.out("-u requires -z to be specified");
      return false;
    }
    const offset = s.cvtnum(parsed.operands[0] ?? "");
    if (offset === undefined) return false;
    let size: bigint;
    if (zeroes) {
      const count = s.cvtnum(parsed.operands[1] ?? "");
      if (count === undefined) return false;
      size = count;
    } else {
      const lengths = iovecLengths(s, parsed.operands.slice(1));
      if (lengths === undefined) return false;
      size = BigInt(sum(lengths));
    }
    const t0 = performance.now();
    let failure: unknown;
    try {
      const [at, length] = checkRange(s.node, offset, size);
      if (zeroes) {
        await zeroBytes(s.node, at, length, unmap && unmapAllowed(s), fua || s.writethrough);
      } else {
        await writeBytes(s.node, at, new Uint8Array(length).fill(pattern), fua || s.writethrough);
      }
    } catch (e) {
      failure = e ?? new IoFailure(EIO);
    }
    const elapsed = performance.now() - t0;
    s.complete(() => {
      if (failure !== undefined) {
        s.out(`aio_write failed: ${errnoText(failure)}`);
        return;
      }
      if (!quiet) s.printReport("wrote", elapsed, offset, Number(size), machine);
    });
    return true;
  },
};

const aioFlushCommand: Command = {
  name: "aio_flush",
  argmin: 0,
  argmax: 0,
  oneline: "completes all outstanding aio requests",
  run(s) {
    s.drain();
    return Promise.resolve(true);
  },
};

const discardCommand: Command = {
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

const flushCommand: Command = {
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

const truncateCommand: Command = {
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
    if (node.format === "qcow2") {
      const info = imageInfo(node, node.filename);
      const specific = info["format-specific"] as { data: Record<string, unknown> } | undefined;
      if (specific !== undefined) {
        s.out("Format specific information:");
        for (const [key, value] of Object.entries(specific.data)) {
          s.out(`    ${key.replaceAll("-", " ")}: ${value}`);
        }
      }
    }
    return Promise.resolve(true);
  },
};

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

// ---------------------------------------------------------------------------------------------
// Opening, closing, reopening

/** Close the session's image: outstanding aio completes first (blk_unref drains). */
export async function closeImage(s: Session): Promise<boolean> {
  s.drain();
  const image = s.image;
  if (image === undefined) return true;
  s.image = undefined;
  try {
    await image.node.close();
    return true;
  } catch (e) {
    s.report(`${image.name}: ${messageOf(e)}`);
    return false;
  }
}

/**
 * qemu-io's openfile(): open `request` as the session's image, with its messages. `name` is what
 * `can't open device NAME` says (undefined: `can't open`).
 */
export async function openImageInto(
  s: Session,
  request: OpenRequest,
  name: string | undefined,
): Promise<boolean> {
  if (s.image !== undefined) {
    s.report("file open already, try 'help close'");
    return false;
  }
  try {
    const opened = await openRequest(request);
    if (opened.probedRaw) {
      for (const line of probedRawWarning(opened.name).trimEnd().split("\n")) s.err(line);
    }
    s.image = {
      node: opened.node,
      request: opened.request,
      name: opened.name,
      readOnly: opened.request.readOnly || opened.node.readOnly,
    };
    return true;
  } catch (e) {
    s.report(`can't open${name === undefined ? "" : ` device ${name}`}: ${messageOf(e)}`);
    return false;
  }
}

/** Parse `-o` option strings, printing QEMU's warnings; undefined never (errors are values). */
function parseOptions(s: Session, text: string): Array<[string, string]> {
  return parseOptionString(text, (message) => {
    const [first = "", ...rest] = message.split("\n");
    s.report(`warning: ${first}`);
    for (const line of rest) s.err(line);
  });
}

const openCommand: Command = {
  name: "open",
  altname: "o",
  argmin: 1,
  argmax: -1,
  noFile: true,
  args: "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
  oneline: "open the file specified by path",
  help: [
    "",
    " opens a new file in the requested mode",
    "",
    " Example:",
    " 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached",
    "",
    " Opens a file for subsequent use by all of the other qemu-io commands.",
    " -r, -- open file read-only",
    " -s, -- use snapshot file",
    " -C, -- use copy-on-read",
    " -n, -- disable host cache, short for -t none",
    " -U, -- force shared permissions",
    " -k, -- use kernel AIO implementation (Linux only, prefer use of -i)",
    " -i, -- use AIO mode (threads, native or io_uring)",
    " -t, -- use the given cache mode for the image",
    " -d, -- use the given discard mode for the image",
    " -o, -- options to be given to the block driver",
  ],
  async run(s, argv) {
    const request = defaultRequest();
    const parsed = getopt(argv, "snCro:ki:t:d:U");
    for (const { c, arg } of parsed.opts) {
      if (c === "s") request.snapshot = true;
      else if (c === "n") request.cache = { ...request.cache, direct: true, writethrough: false };
      else if (c === "C") request.copyOnRead = true;
      else if (c === "r") request.readOnly = true;
      else if (c === "k") request.aio = "native";
      else if (c === "U") request.forceShare = true;
      else if (c === "t") {
        const mode = parseCacheMode(arg);
        if (mode === undefined) {
          s.report(`Invalid cache option: ${arg}`);
          return false;
        }
        request.cache = mode;
      } else if (c === "d") {
        const mode = parseDiscardMode(arg);
        if (mode === undefined) {
          s.report(`Invalid discard option: ${arg}`);
          return false;
        }
        request.discard = mode;
      } else if (c === "i") {
        const mode = parseAioMode(arg);
        if (mode === undefined) {
          s.report(`Invalid aio option: ${arg}`);
          return false;
        }
        request.aio = mode;
      } else if (c === "o") {
        if (s.imageOpts) {
          s.out("--image-opts and 'open -o' are mutually exclusive");
          return false;
        }
        request.options.push(...parseOptions(s, arg));
      }
    }
    if (parsed.error !== undefined) {
      s.err(parsed.error);
      s.usage(this);
      return false;
    }
    const operands = [...parsed.operands];
    if (s.imageOpts && operands.length === 1) {
      request.options.push(...parseOptions(s, operands.shift() ?? ""));
    }
    if (operands.length > 1) {
      s.usage(this);
      return false;
    }
    const path = operands[0];
    if (request.forceShare) {
      const given = request.options.findLast(([key]) => key === "force-share");
      if (given !== undefined && given[1] !== "on") {
        s.report("-U conflicts with image options");
        return false;
      }
    }
    request.path = path;
    return await openImageInto(s, request, path);
  },
};

const closeCommand: Command = {
  name: "close",
  altname: "c",
  argmin: 0,
  argmax: 0,
  oneline: "close the current open file",
  run(s) {
    return closeImage(s);
  },
};

const REOPEN_KEYS = new Set(["read-only", "cache.direct", "cache.no-flush"]);

const reopenCommand: Command = {
  name: "reopen",
  argmin: 0,
  argmax: -1,
  args: "[(-r|-w)] [-c cache] [-o options]",
  oneline: "reopens an image with new options",
  help: [
    "",
    " Changes the open options of an already opened image",
    "",
    " Example:",
    " 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image",
    "",
    " -r, -- Reopen the image read-only",
    " -w, -- Reopen the image read-write",
    " -c, -- Change the cache mode to the given value",
    " -o, -- Changes block driver options (cf. 'open' command)",
    "",
  ],
  async run(s, argv) {
    const image = s.image!;
    let readOnly = image.readOnly;
    let cache = image.request.cache;
    let hasRw = false, hasCache = false;
    const options: Array<[string, string]> = [];
    const parsed = getopt(argv, "c:o:rw");
    for (const { c, arg } of parsed.opts) {
      if (c === "c") {
        const mode = parseCacheMode(arg);
        if (mode === undefined) {
          s.report(`Invalid cache option: ${arg}`);
          return false;
        }
        cache = mode;
        hasCache = true;
      } else if (c === "o") {
        options.push(...parseOptions(s, arg));
      } else if (c === "r" || c === "w") {
        if (hasRw) {
          s.report("Only one -r/-w option may be given");
          return false;
        }
        readOnly = c === "r";
        hasRw = true;
      }
    }
    if (parsed.error !== undefined || parsed.operands.length > 0) {
      if (parsed.error !== undefined) s.err(parsed.error);
      s.usage(this);
      return false;
    }
    const keys = new Set(options.map(([key]) => key));
    if (keys.has("read-only") && hasRw) {
      s.report("Cannot set both -r/-w and 'read-only'");
      return false;
    }
    if ((keys.has("cache.direct") || keys.has("cache.no-flush")) && hasCache) {
      s.report("Cannot set both -c and the cache options");
      return false;
    }
    for (const key of keys) {
      if (!REOPEN_KEYS.has(key)) {
        s.report(`Cannot change the option '${key}'`);
        return false;
      }
    }
    for (const [key, value] of options) {
      const on = value === "on" || value === "true" || value === "yes";
      if (key === "read-only" && on && !image.readOnly) {
        // QEMU keeps the BlockBackend's write permission (only -r drops it), so the node refuses;
        // its name is QEMU's automatic one, whose number vstor cannot know.
        s.report("Read-only block node '#block000' cannot support read-write users");
        return false;
      }
      if (!on && value !== "off" && value !== "false" && value !== "no") {
        s.report(`Parameter '${key}' expects 'on' or 'off'`);
        return false;
      }
      if (key === "read-only") readOnly = on;
      else if (key === "cache.direct") cache = { ...cache, direct: on };
      else cache = { ...cache, noFlush: on };
    }
    if (cache.direct) {
      s.report("Cannot reopen with cache.direct=on: vstor does not support O_DIRECT yet");
      return false;
    }
    s.drain();
    const request: OpenRequest = { ...image.request, cache, readOnly, options: [] };
    if (readOnly === image.readOnly || image.request.snapshot) {
      // Same node: the temporary overlay of -s stays (it is writable underneath).
      if (!readOnly && image.node.readOnly) {
        s.report(`Cannot make '${image.name}' writable: it was opened read-only`);
        return false;
      }
      if (readOnly && !image.readOnly) await image.node.flush();
      s.image = { ...image, readOnly, request };
      return true;
    }
    // The read-only flag of an image file changes by opening it again (QEMU reopens its fd).
    await image.node.close();
    s.image = undefined;
    try {
      const opened = await openRequest({ ...request, path: image.name, format: image.node.format });
      s.image = {
        node: opened.node,
        request,
        name: image.name,
        readOnly: readOnly || opened.node.readOnly,
      };
      return true;
    } catch (e) {
      s.report(messageOf(e));
      try {
        const back = await openRequest({ ...image.request, path: image.name });
        s.image = { ...image, node: back.node };
      } catch {
        // The image stays closed; later commands say "no file open".
      }
      return false;
    }
  },
};

// ---------------------------------------------------------------------------------------------
// Process-level commands

const sigraiseCommand: Command = {
  name: "sigraise",
  argmin: 1,
  argmax: 1,
  noFile: true,
  args: "signal",
  oneline: "raises a signal",
  help: [
    "",
    " raises the given signal",
    "",
    " Example:",
    " 'sigraise 15' - raises SIGTERM",
    "",
    ' Invokes raise(signal), where "signal" is the mandatory integer argument',
    " given to sigraise.",
    "",
  ],
  run(s, argv) {
    const text = argv[1] ?? "";
    const sig = s.cvtnum(text);
    if (sig === undefined) return Promise.resolve(false);
    if (sig > BigInt(NSIG)) {
      s.out(`signal argument '${text}' is too large to be a valid signal`);
      return Promise.resolve(false);
    }
    if (sig > 0n && sig < BigInt(NSIG)) s.raise?.(Number(sig));
    return Promise.resolve(true);
  },
};

const sleepCommand: Command = {
  name: "sleep",
  argmin: 1,
  argmax: 1,
  noFile: true,
  oneline: "waits for the given value in milliseconds",
  async run(s, argv) {
    const text = argv[1] ?? "";
    const { value, whole } = strtol(text);
    if (value < 0n || !whole) {
      s.out(`${text} is not a valid number`);
      return false;
    }
    s.drain(); // the main loop runs while qemu-io sleeps
    let ms = Number(value);
    while (ms > 0) {
      const step = Math.min(ms, 2 ** 31 - 1);
      await new Promise((resolve) => setTimeout(resolve, step));
      ms -= step;
    }
    return true;
  },
};

const abortCommand: Command = {
  name: "abort",
  argmin: 0,
  argmax: 0,
  noFile: true,
  oneline: "simulate a program crash using abort(3)",
  run(s) {
    s.raise?.(6);
    return Promise.resolve(false);
  },
};

/** blkdebug's commands: vstor has no blkdebug node, so they fail as QEMU's do on other nodes. */
const breakCommand: Command = {
  name: "break",
  argmin: 2,
  argmax: 2,
  args: "event tag",
  oneline: "sets a breakpoint on event and tags the stopped request as tag",
  run(s) {
    s.out(`Could not set breakpoint: ${strerror(ENOTSUP)}`);
    return Promise.resolve(false);
  },
};

const removeBreakCommand: Command = {
  name: "remove_break",
  argmin: 1,
  argmax: 1,
  args: "tag",
  oneline: "remove a breakpoint by tag",
  run(s, argv) {
    s.out(`Could not remove breakpoint ${argv[1]}: ${strerror(ENOTSUP)}`);
    return Promise.resolve(false);
  },
};

const resumeCommand: Command = {
  name: "resume",
  argmin: 1,
  argmax: 1,
  args: "tag",
  oneline: "resumes the request tagged as tag",
  run(s) {
    s.out(`Could not resume request: ${strerror(ENOTSUP)}`);
    return Promise.resolve(false);
  },
};

const waitBreakCommand: Command = {
  name: "wait_break",
  argmin: 1,
  argmax: 1,
  args: "tag",
  oneline: "waits for the suspension of a request",
  run(s, argv) {
    // qemu-io waits forever here when no blkdebug node exists; never hang.
    s.report(`wait_break ${argv[1]}: no blkdebug node, so no request can be suspended`);
    return Promise.resolve(false);
  },
};

// ---------------------------------------------------------------------------------------------
// help and quit

function helpLine(typed: string, cmd: Command): string {
  return `${typed} ${cmd.args === undefined ? "" : `${cmd.args} `}-- ${cmd.oneline}`;
}

const helpCommand: Command = {
  name: "help",
  altname: "?",
  argmin: 0,
  argmax: 1,
  global: true,
  args: "[command]",
  oneline: "help for one or all commands",
  run(s, argv) {
    const topic = argv[1];
    if (topic === undefined) {
      for (const cmd of s.commands) s.out(helpLine(cmd.name, cmd));
      s.out("");
      s.out("Use 'help commandname' for extended help.");
      return Promise.resolve(true);
    }
    const cmd = s.find(topic);
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
  argmin: -1,
  argmax: -1,
  global: true,
  oneline: "exit the program",
  run(s) {
    s.quit = true;
    return Promise.resolve(true);
  },
};

/** qemu-io 7.2's command table, sorted by name as qemu-io keeps it. */
export const COMMANDS: readonly Command[] = [
  abortCommand,
  aioFlushCommand,
  aioReadCommand,
  aioWriteCommand,
  allocCommand,
  breakCommand,
  closeCommand,
  discardCommand,
  flushCommand,
  helpCommand,
  infoCommand,
  lengthCommand,
  mapCommand,
  openCommand,
  quitCommand,
  readCommand,
  readvCommand,
  removeBreakCommand,
  reopenCommand,
  resumeCommand,
  sigraiseCommand,
  sleepCommand,
  truncateCommand,
  waitBreakCommand,
  writeCommand,
  writevCommand,
];

export { OpenError };
