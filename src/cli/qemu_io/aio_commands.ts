/**
 * qemu-io's aio commands: requests run when submitted; what qemu-io prints when they complete
 * waits for the session's event loop (`Session.drain`).
 *
 * @module
 */

import { checkRange, writeBytes, zeroBytes } from "./ranges.ts";
import type { Command } from "./session.ts";
import { EIO, errnoText, getopt, IoFailure } from "./text.ts";
import { iovecLengths, readRange, sum, unmapAllowed, vectoredRequest } from "./io_commands.ts";

export const aioReadCommand: Command = {
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
    const request = vectoredRequest(s, this, parsed);
    if (request === undefined) return false;
    const { offset, size } = request;
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

export const aioWriteCommand: Command = {
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

export const aioFlushCommand: Command = {
  name: "aio_flush",
  argmin: 0,
  argmax: 0,
  oneline: "completes all outstanding aio requests",
  run(s) {
    s.drain();
    return Promise.resolve(true);
  },
};
