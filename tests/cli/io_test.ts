import assert from "node:assert/strict";
import { join } from "node:path";
import {
  ioMain,
  type IoMainIo,
  type IoNodeExtras,
  qemuIoMain,
  runIoCommands,
} from "../../src/cli/io.ts";
import { createImage } from "../../formats/open.ts";
import { parseSize } from "../../src/cli/text/size.ts";
import type { BlockNode, Extent, WriteZeroesOptions } from "../../src/block/node.ts";
import { checkRequest } from "../../src/block/request.ts";
import { BlockError } from "../../src/errors.ts";
import { RawNode } from "../../formats/raw.ts";
import { MemoryFile } from "../../src/host/memory.ts";

/** qemu-io's timing line after each read, write and discard. */
const TIMING =
  /^\d+(\.\d+)? (bytes|KiB|MiB|GiB|TiB|PiB|EiB), 1 ops; (\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) \(\d+(\.\d+)? (bytes|KiB|MiB|GiB|TiB|PiB|EiB)\/sec and \d+\.\d{4} ops\/sec\)$/;
/** The same with -C: bytes,ops,time,bytes/sec,ops/sec. */
const MACHINE = /^\d+,1,\d+:\d\d:\d\d\.\d\d,\d+\.\d{3},\d+\.\d{3}$/;

/** `qemu-io -c help` of qemu-io 7.2, before its last two lines. */
const QEMU_IO_HELP = [
  "abort -- simulate a program crash using abort(3)",
  "aio_flush -- completes all outstanding aio requests",
  "aio_read [-Ciqv] [-P pattern] off len [len..] -- asynchronously reads a number of bytes",
  "aio_write [-Cfiquz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes",
  "alloc offset [count] -- checks if offset is allocated in the file",
  "break event tag -- sets a breakpoint on event and tags the stopped request as tag",
  "close -- close the current open file",
  "discard [-Cq] off len -- discards a number of bytes at a specified offset",
  "flush -- flush all in-core file state to disk",
  "help [command] -- help for one or all commands",
  "info -- prints information about the current file",
  "length -- gets the length of the current file",
  "map  -- prints the allocated areas of a file",
  "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path",
  "quit -- exit the program",
  "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
  "readv [-Cqv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset",
  "remove_break tag -- remove a breakpoint by tag",
  "reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options",
  "resume tag -- resumes the request tagged as tag",
  "sigraise signal -- raises a signal",
  "sleep -- waits for the given value in milliseconds",
  "truncate [-m prealloc_mode] off -- truncates the current file at the given offset",
  "wait_break tag -- waits for the suspension of a request",
  "write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset",
  "writev [-Cfq] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset",
];

interface Run {
  ok: boolean;
  out: string[];
  err: string[];
}

/** Run commands; stdout lines come back with timing lines removed (after checking their shape). */
async function run(node: BlockNode, ...commands: string[]): Promise<Run> {
  const out: string[] = [];
  const err: string[] = [];
  const ok = await runIoCommands(node, commands, (l) => out.push(l), { err: (l) => err.push(l) });
  const filtered: string[] = [];
  for (const [i, line] of out.entries()) {
    if (TIMING.test(line)) {
      assert.match(out[i - 1] ?? "", /^(read|wrote|discard) \d+\/\d+ bytes at offset \d+$/);
      continue;
    }
    filtered.push(line);
  }
  return { ok, out: filtered, err };
}

function memoryRaw(size: number, fill = 0): Promise<RawNode> {
  return RawNode.open(new MemoryFile("mem", new Uint8Array(size).fill(fill)));
}

async function bytesOf(node: BlockNode, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await node.read(offset, buf);
  return buf;
}

/**
 * A node over memory that insists on aligned requests and keeps a per-block allocation map, so
 * read-modify-write and `map`/`alloc` can be checked.
 */
class StrictNode implements BlockNode, IoNodeExtras {
  readonly format = "strict";
  readonly filename = "strict";
  readonly readOnly: boolean;
  readonly requestAlignment: number;
  readonly clusterSize = 65536;
  readonly bytes: Uint8Array;
  /** One flag per `requestAlignment` block. */
  readonly allocated: boolean[];
  readonly requests: string[] = [];
  compressed: Array<[number, number]> = [];

  constructor(size: number, opts: { alignment?: number; readOnly?: boolean } = {}) {
    this.requestAlignment = opts.alignment ?? 512;
    this.readOnly = opts.readOnly ?? false;
    this.bytes = new Uint8Array(size);
    this.allocated = new Array(Math.ceil(size / this.requestAlignment)).fill(false);
  }

  get size(): number {
    return this.bytes.length;
  }

  #aligned(op: string, offset: number, length: number): void {
    this.requests.push(`${op} ${offset} ${length}`);
    if (offset % this.requestAlignment !== 0 || length % this.requestAlignment !== 0) {
      throw new Error(`unaligned ${op} ${offset}+${length}`);
    }
  }

  #mark(offset: number, length: number, value: boolean): void {
    for (let at = offset; at < offset + length; at += this.requestAlignment) {
      this.allocated[at / this.requestAlignment] = value;
    }
  }

  read(offset: number, dst: Uint8Array): Promise<void> {
    checkRequest(this, "read", offset, dst.length);
    this.#aligned("read", offset, dst.length);
    dst.set(this.bytes.subarray(offset, offset + dst.length));
    return Promise.resolve();
  }

  write(offset: number, src: Uint8Array): Promise<void> {
    checkRequest(this, "write", offset, src.length);
    this.#aligned("write", offset, src.length);
    this.bytes.set(src, offset);
    this.#mark(offset, src.length, true);
    return Promise.resolve();
  }

  writeZeroes(offset: number, length: number, opts?: WriteZeroesOptions): Promise<void> {
    checkRequest(this, "write-zeroes", offset, length);
    this.#aligned(opts?.unmap ? "zero-unmap" : "zero", offset, length);
    this.bytes.fill(0, offset, offset + length);
    this.#mark(offset, length, !opts?.unmap);
    return Promise.resolve();
  }

  discard(offset: number, length: number): Promise<void> {
    checkRequest(this, "discard", offset, length);
    this.#aligned("discard", offset, length);
    this.bytes.fill(0, offset, offset + length);
    this.#mark(offset, length, false);
    return Promise.resolve();
  }

  writeCompressed(offset: number, src: Uint8Array): Promise<void> {
    this.compressed.push([offset, src.length]);
    this.bytes.set(src, offset);
    return Promise.resolve();
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  blockStatus(offset: number, max: number): Promise<Extent> {
    if (offset >= this.size || max === 0) {
      return Promise.resolve({ kind: "eof", offset, length: 0 });
    }
    const block = this.requestAlignment;
    const status = this.allocated[Math.floor(offset / block)] ?? false;
    let end = (Math.floor(offset / block) + 1) * block;
    while (end < this.size && end < offset + max && this.allocated[end / block] === status) {
      end += block;
    }
    const length = Math.min(end, offset + max, this.size) - offset;
    return Promise.resolve({ kind: status ? "data" : "unallocated", offset, length });
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** A node whose every operation throws the given error. */
function failingNode(error: Error): BlockNode {
  const fail = () => Promise.reject(error);
  return {
    format: "raw",
    filename: "failing",
    size: 1 << 20,
    readOnly: false,
    requestAlignment: 1,
    read: fail,
    write: fail,
    writeZeroes: fail,
    discard: fail,
    flush: fail,
    blockStatus: fail,
    truncate: fail,
    close: () => Promise.resolve(),
  };
}

Deno.test("runIoCommands writes a pattern and reads it back with verification", async () => {
  const node = await memoryRaw(1 << 20);
  const r = await run(node, "write -P 0xab 0 64k", "read -P 0xab 0 64k", "read -P 171 0 1k");
  assert.deepEqual(r, {
    ok: true,
    out: [
      "wrote 65536/65536 bytes at offset 0",
      "read 65536/65536 bytes at offset 0",
      "read 1024/1024 bytes at offset 0",
    ],
    err: [],
  });
  assert.ok((await bytesOf(node, 0, 65536)).every((b) => b === 0xab));
  assert.equal((await bytesOf(node, 65536, 1))[0], 0);
});

Deno.test("write fills with 0xcd by default and read has no verification without -P", async () => {
  const node = await memoryRaw(4096, 7);
  const r = await run(node, "write 512 512", "read 0 4k");
  assert.deepEqual(r.out, [
    "wrote 512/512 bytes at offset 512",
    "read 4096/4096 bytes at offset 0",
  ]);
  assert.ok(r.ok);
  const bytes = await bytesOf(node, 0, 1536);
  assert.equal(bytes[511], 7);
  assert.ok(bytes.subarray(512, 1024).every((b) => b === 0xcd));
  assert.equal(bytes[1024], 7);
});

Deno.test("read -P reports a mismatch with qemu-io's message and fails the run", async () => {
  const node = await memoryRaw(4096);
  const r = await run(node, "write -q -P 1 0 512", "read -P 1 0 1024", "read -q -P 1 0 512");
  assert.deepEqual(r, {
    ok: false,
    out: [
      "Pattern verification failed at offset 0, 1024 bytes",
      "read 1024/1024 bytes at offset 0",
    ],
    err: [],
  });
});

Deno.test("read -s and -l verify a sub-range and reject one past the data", async () => {
  const node = await memoryRaw(4096);
  const r = await run(
    node,
    "write -q -P 0x11 3 5",
    "read -q -P 0x11 -s 1 -l 2 2 5",
    "read -q -P 0 -s 1 0 5",
    "read -P 0 -l 9 0 5",
    "read -l 2 0 5",
  );
  assert.deepEqual(r.out, [
    "Pattern verification failed at offset 1, 4 bytes",
    "pattern verification range exceeds end of read data",
    "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
  ]);
  assert.equal(r.ok, false);
});

Deno.test("read -v dumps the buffer as qemu-io does, partial last row included", async () => {
  const file = new MemoryFile("mem", new Uint8Array(65536 + 64));
  file.writeAt(
    65530,
    Uint8Array.from([0x41, 0x7a, 0x30, 0x39, 0x2e, 0x2d, 0, 0xff, 0x78, 0x79, 0x7a]),
  );
  const node = await RawNode.open(file);
  const r = await run(node, "read -v 65530 20", "read -v -q 0 16");
  assert.deepEqual(r.out, [
    "0000fffa:  41 7a 30 39 2e 2d 00 ff 78 79 7a 00 00 00 00 00  Az09....xyz.....",
    "0001000a:  00 00 00 00  ....",
    "read 20/20 bytes at offset 65530",
  ]);
});

Deno.test("write -z zeroes the range, with -u unmapping, and qemu-io's flag rules hold", async () => {
  const node = new StrictNode(8192);
  const r = await run(
    node,
    "write -q -P 0xcd 0 8k",
    "write -z 0 4k",
    "write -z -u -q 4k 4k",
    "write -u 0 512",
    "write -z -P 1 0 512",
    "write -n 0 512",
    "write -z -b 0 512",
  );
  assert.deepEqual(r.out, [
    "wrote 4096/4096 bytes at offset 0",
    "-u requires -z to be specified",
    "Only one of -z, -P, and -s can be specified at the same time",
    "-n requires -z to be specified",
    "-b and -z cannot be specified at the same time",
  ]);
  assert.ok(node.bytes.every((b) => b === 0));
  assert.deepEqual(node.requests.slice(1), ["zero 0 4096", "zero-unmap 4096 4096"]);
});

Deno.test("discard reports like qemu-io and frees the range", async () => {
  const node = await memoryRaw(1 << 20, 0xcd);
  const r = await run(node, "discard 0 64k", "discard -q 64k 1", "read -q -P 0 0 65537");
  assert.deepEqual(r, { ok: true, out: ["discard 65536/65536 bytes at offset 0"], err: [] });
});

Deno.test("unaligned reads and writes are byte-granular via read-modify-write", async () => {
  const node = new StrictNode(4096);
  node.bytes.fill(0x11);
  const r = await run(
    node,
    "write -P 0x22 510 4",
    "read -P 0x22 510 4",
    "read -q -P 0x11 0 510",
    "read -q -P 0x11 514 3582",
    "write -z 1000 100",
    "read -q -P 0 1000 100",
    "write -q -z 100 1500",
    "read -q -P 0 100 1500",
    "read -q -P 0x11 1600 2496",
  );
  assert.deepEqual(r, {
    ok: true,
    out: [
      "wrote 4/4 bytes at offset 510",
      "read 4/4 bytes at offset 510",
      "wrote 100/100 bytes at offset 1000",
    ],
    err: [],
  });
  assert.equal(node.bytes[99], 0x11);
  // StrictNode throws on unaligned requests, so the run succeeding proves the read-modify-write;
  // the aligned middle of the zeroed range went through writeZeroes.
  assert.ok(node.requests.includes("zero 512 1024"));
});

Deno.test("unaligned discard leaves the partial head and tail blocks alone", async () => {
  const node = new StrictNode(4096);
  node.bytes.fill(0x11);
  const r = await run(node, "discard -q 100 2000", "discard -q 10 20");
  assert.deepEqual(r, { ok: true, out: [], err: [] });
  assert.deepEqual(node.requests, ["discard 512 1536"]);
  assert.equal(node.bytes[511], 0x11);
  assert.equal(node.bytes[512], 0);
  assert.equal(node.bytes[2047], 0);
  assert.equal(node.bytes[2048], 0x11);
});

Deno.test("requests past the end fail with Input/output error, as in qemu-io", async () => {
  const node = await memoryRaw(1 << 20);
  const r = await run(
    node,
    "read 1048320 512",
    "write 1048320 512",
    "write -z 1M 1",
    "discard 2M 0",
    "read 2M 0",
    "read 0x7fffffffffffffff 1",
    "read 1M 0",
  );
  assert.deepEqual(r.out, [
    "read failed: Input/output error",
    "write failed: Input/output error",
    "write failed: Input/output error",
    "discard failed: Input/output error",
    "read failed: Input/output error",
    "read failed: Input/output error",
    "read 0/0 bytes at offset 1048576",
  ]);
  assert.equal(r.ok, false);
});

Deno.test("an unknown command goes to stderr and fails the run", async () => {
  const node = await memoryRaw(4096);
  const r = await run(node, "foo 1 2", "", "   ", "length");
  assert.deepEqual(r, { ok: false, out: ["4 KiB"], err: ['command "foo" not found'] });
});

Deno.test("bad numbers and patterns print qemu-io's parsing errors", async () => {
  const node = await memoryRaw(4096);
  const r = await run(
    node,
    "read 0 x",
    "read x 1",
    "read 0 8E",
    "read 0 2G",
    "write 0 2G",
    "discard 0 2G",
    "read -P 300 0 1",
    "write -P 0xcdx 0 1",
    "write -P -1 0 1",
    "alloc -1",
    "read 1.5 1",
    "read 0 1KiB",
  );
  assert.deepEqual(r.out, [
    "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x",
    "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x",
    "Parsing error: argument too large -- 8E",
    "length cannot exceed 2147483136, given 2G",
    "length cannot exceed 2147483136 without -n, given 2G",
    "length cannot exceed 2147483136, given 2G",
    "300 is not a valid pattern byte",
    "0xcdx is not a valid pattern byte",
    "-1 is not a valid pattern byte",
    "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- -1",
    "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1.5",
    "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1KiB",
  ]);
  assert.deepEqual(r.err, []);
  assert.equal(r.ok, false);
});

Deno.test("patterns parse like strtol with base 0: hex, octal and decimal", async () => {
  const node = await memoryRaw(4096);
  const r = await run(
    node,
    "write -q -P 0x0A 0 1",
    "write -q -P 012 1 1",
    "write -q -P +255 2 1",
    "write -q -P 08 3 1",
  );
  assert.deepEqual(r.out, ["08 is not a valid pattern byte"]);
  assert.deepEqual([...await bytesOf(node, 0, 4)], [10, 10, 255, 0]);
});

Deno.test("a hex size with a suffix works but warns that it is deprecated", async () => {
  const node = await memoryRaw(1 << 20);
  const r = await run(node, "alloc 0x10k");
  assert.deepEqual(r, {
    ok: true,
    out: ["512/512 bytes allocated at offset 16 KiB"],
    err: ["vstor: warning: Using a multiplier suffix on hex numbers is deprecated: 0x10k"],
  });
});

Deno.test("options parse like GNU getopt: clusters, permutation, -- and complaints", async () => {
  const node = await memoryRaw(4096);
  const r = await run(
    node,
    "read 0 512 -q",
    "read -qv 0 2",
    "read -P0 -q -- 0 1",
    "read -q -- -1 1",
    "r -Q 0 1",
    "read 0 1 -P",
    "read 0 -1",
    "discard -x 0 1",
  );
  const readUsage =
    "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset";
  assert.deepEqual(r.out, [
    "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- -1",
    readUsage,
    readUsage,
    readUsage,
    "discard [-Cq] off len -- discards a number of bytes at a specified offset",
  ]);
  assert.deepEqual(r.err, [
    "r: invalid option -- 'Q'",
    "read: option requires an argument -- 'P'",
    "read: invalid option -- '1'",
    "discard: invalid option -- 'x'",
  ]);
});

Deno.test("argument counts are checked with qemu-io's three messages", async () => {
  const node = await memoryRaw(4096);
  const r = await run(node, "read 0", "length 1", "alloc", "alloc 1 2 3", "help a b");
  assert.deepEqual(r.err, [
    "bad argument count 1 to read, expected at least 2 arguments",
    "bad argument count 1 to length, expected 0 arguments",
    "bad argument count 0 to alloc, expected between 1 and 2 arguments",
    "bad argument count 3 to alloc, expected between 1 and 2 arguments",
    "bad argument count 2 to help, expected between 0 and 1 arguments",
  ]);
  assert.deepEqual(r.out, []);
  assert.equal(r.ok, false);
});

Deno.test("a read-only node refuses write, discard and truncate up front", async () => {
  const node = new StrictNode(4096, { readOnly: true });
  const r = await run(
    node,
    "write 0 x",
    "write -z 0 512",
    "discard 0 512",
    "truncate 8k",
    "flush",
    "read -q 0 512",
  );
  assert.deepEqual(r.err, Array(4).fill("vstor: Block node is read-only"));
  assert.deepEqual(r.out, []);
  assert.equal(r.ok, false);
  assert.deepEqual(node.requests, ["read 0 512"]);
});

Deno.test("length, truncate and info print as qemu-io does for raw", async () => {
  const node = await memoryRaw(1 << 20);
  const r = await run(
    node,
    "length",
    "truncate 1536",
    "length",
    "truncate 3000",
    "length",
    "truncate 1088",
    "length",
    "truncate -m bogus 1M",
    "truncate -m metadata 1M",
    "truncate -m off x",
    "t 2M",
    "l",
    "info",
  );
  assert.deepEqual(r.out, [
    "1 MiB",
    "1.500 KiB",
    "3 KiB", // a raw image's length is whole sectors, as QEMU reports it
    "1.500 KiB",
    "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- -m",
    "2 MiB",
    "format name: raw",
    "cluster size: 0 bytes",
    "vm state offset: 0 bytes",
  ]);
  assert.deepEqual(r.err, [
    "vstor: Invalid preallocation mode 'bogus'",
    "vstor: Unsupported preallocation mode: metadata",
  ]);
  assert.equal(node.size, 2 << 20);
});

Deno.test("truncate reports a node that cannot resize", async () => {
  const node = new StrictNode(4096);
  const r = await run(node, "truncate 8k", "info");
  assert.deepEqual(r.err, ["vstor: Image format driver does not support resize"]);
  assert.deepEqual(r.out, [
    "format name: strict",
    "cluster size: 64 KiB",
    "vm state offset: 0 bytes",
  ]);
});

Deno.test("map and alloc report allocated and unallocated runs", async () => {
  const node = new StrictNode(4 << 20, { alignment: 64 << 10 });
  const r = await run(
    node,
    "write -q 64k 64k",
    "write -q 128k 64k",
    "write -q -z 1M 64k",
    "map",
    "alloc 0",
    "alloc 0 4M",
    "alloc 60k 8k",
    "alloc 5M",
    "alloc 4095k 8k",
  );
  assert.deepEqual(r.out, [
    "64 KiB (0x10000) bytes not allocated at offset 0 bytes (0x0)",
    "128 KiB (0x20000) bytes     allocated at offset 64 KiB (0x10000)",
    "832 KiB (0xd0000) bytes not allocated at offset 192 KiB (0x30000)",
    "64 KiB (0x10000) bytes     allocated at offset 1 MiB (0x100000)",
    "2.938 MiB (0x2f0000) bytes not allocated at offset 1.062 MiB (0x110000)",
    "0/512 bytes allocated at offset 0 bytes",
    "196608/4194304 bytes allocated at offset 0 bytes",
    "4096/8192 bytes allocated at offset 60 KiB",
    "0/0 bytes allocated at offset 5 MiB",
    "0/1024 bytes allocated at offset 3.999 MiB",
  ]);
  assert.ok(r.ok);
});

Deno.test("map on raw reports everything allocated, holes included", async () => {
  const node = await memoryRaw(1 << 20);
  const r = await run(node, "discard -q 0 64k", "map");
  assert.deepEqual(r.out, ["1 MiB (0x100000) bytes     allocated at offset 0 bytes (0x0)"]);
});

Deno.test("write -c needs sector alignment and a node that compresses", async () => {
  const raw = await memoryRaw(1 << 20);
  const r1 = await run(
    raw,
    "write -c 0 64k",
    "write -c 1 512",
    "write -c 0 511",
    "write -f -c 0 1",
  );
  assert.deepEqual(r1.out, [
    "write failed: Operation not supported",
    "1 is not a sector-aligned value for 'offset'",
    "511 is not a sector-aligned value for 'count'",
    "-f and -b or -c cannot be specified at the same time",
  ]);
  const strict = new StrictNode(1 << 20);
  const r2 = await run(strict, "write -c -P 7 64k 64k");
  assert.deepEqual(r2, { ok: true, out: ["wrote 65536/65536 bytes at offset 65536"], err: [] });
  assert.deepEqual(strict.compressed, [[65536, 65536]]);
});

Deno.test("VM state reads and writes are not supported", async () => {
  const node = await memoryRaw(4096);
  const r = await run(node, "write -b 0 512", "read -b 0 512", "read -b 1 512");
  assert.deepEqual(r.out, [
    "write failed: Operation not supported",
    "read failed: Operation not supported",
    "1 is not a sector-aligned value for 'offset'",
  ]);
});

Deno.test("block errors map to the strerror text qemu-io would print", async () => {
  const cases: Array<[Error, string]> = [
    [new BlockError("unsupported", "No"), "Operation not supported"],
    [new BlockError("read-only", "No"), "Operation not permitted"],
    [new BlockError("out-of-range", "No"), "Input/output error"],
    [new BlockError("corrupt", "No"), "Input/output error"],
    [new BlockError("invalid-argument", "No"), "Invalid argument"],
    [new BlockError("io", "No", { errno: 28 }), "No space left on device"],
    [new BlockError("io", "No", { errno: 4242 }), "Unknown error 4242"],
    [new RangeError("No"), "Invalid argument"],
  ];
  for (const [error, text] of cases) {
    const r = await run(failingNode(error), "read 0 1", "write 0 1", "discard 0 1", "alloc 0");
    assert.deepEqual(r.out, [
      `read failed: ${text}`,
      `write failed: ${text}`,
      `discard failed: ${text}`,
      `is_allocated failed: ${text}`,
    ]);
  }
  const r = await run(
    failingNode(new BlockError("io", "Truncate failed", { errno: 27 })),
    "truncate 1",
    "flush",
    "map",
  );
  assert.deepEqual(r.out, []);
  assert.deepEqual(r.err, [
    "vstor: Could not resize file: File too large",
    "vstor: Failed to get allocation status: File too large",
  ]);
  assert.equal(r.ok, false);
});

Deno.test("-C prints the machine-readable statistics line", async () => {
  const node = await memoryRaw(4096);
  const out: string[] = [];
  const ok = await runIoCommands(
    node,
    ["write -C 0 512", "read -C -v 0 1", "discard -C 0 512"],
    (l) => out.push(l),
  );
  assert.ok(ok);
  assert.equal(out.length, 4);
  assert.match(out[0] ?? "", MACHINE);
  assert.match(out[0] ?? "", /^512,/);
  assert.equal(out[1], "00000000:  cd  .");
  assert.match(out[2] ?? "", /^1,/);
  assert.match(out[3] ?? "", MACHINE);
});

Deno.test("help prints qemu-io's texts for the commands vstor implements", async () => {
  const node = await memoryRaw(4096);
  const r = await run(node, "help discard", "? flush", "help map", "help r", "help foo");
  assert.deepEqual(r.out.slice(0, 14), [
    "discard [-Cq] off len -- discards a number of bytes at a specified offset",
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
    "flush -- flush all in-core file state to disk",
    "map  -- prints the allocated areas of a file",
    "r [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
  ]);
  assert.equal(r.out.at(-1), "command foo not found");
  assert.equal(r.ok, false);
  const all = await run(node, "help");
  assert.deepEqual(all.out, [...QEMU_IO_HELP, "", "Use 'help commandname' for extended help."]);
});

Deno.test("quit stops the run and earlier failures still count", async () => {
  const node = await memoryRaw(4096);
  assert.deepEqual(await run(node, "read 8k 1", "quit", "read 0 1"), {
    ok: false,
    out: ["read failed: Input/output error"],
    err: [],
  });
  assert.deepEqual(await run(node, "q now", "read 8k 1"), { ok: true, out: [], err: [] });
});

Deno.test("runIoCommands takes commands from an async iterable", async () => {
  const node = await memoryRaw(4096);
  async function* commands() {
    yield "write -q -P 5 0 1";
    yield "read -q -P 5 0 1";
  }
  const out: string[] = [];
  assert.ok(await runIoCommands(node, commands(), (l) => out.push(l)));
  assert.deepEqual(out, []);
});

Deno.test("write -s fills the buffer from a file, repeating it", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vstor_io_" });
  try {
    const source = join(dir, "source");
    await Deno.writeTextFile(source, "abc");
    await Deno.writeTextFile(join(dir, "empty"), "");
    const node = await memoryRaw(4096);
    const r = await run(
      node,
      `write -s ${source} 1 8`,
      `write -s ${join(dir, "missing")} 0 1`,
      `write -s ${join(dir, "empty")} 0 1`,
      `write -s ${dir} 0 1`,
      `write -s ${source} -P 1 0 1`,
    );
    assert.deepEqual(r.out, [
      "wrote 8/8 bytes at offset 1",
      "Only one of -z, -P, and -s can be specified at the same time",
    ]);
    assert.deepEqual(r.err, [
      `${join(dir, "missing")}: No such file or directory`,
      `${join(dir, "empty")}: file is empty`,
      `${dir}: Is a directory`,
    ]);
    assert.equal(new TextDecoder().decode(await bytesOf(node, 0, 10)), "\0abcabcab\0");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("parseSize follows QEMU 7.2's qemu_strtosz, quirks included", () => {
  const cases: Array<[string, bigint | "invalid" | "too-large"]> = [
    ["0", 0n],
    ["512", 512n],
    ["1k", 1024n],
    ["1K", 1024n],
    ["1.5k", 1536n],
    ["1.7k", 1741n],
    ["1.0005k", 1025n],
    ["0.00048828125k", 1n],
    ["1.k", 1024n],
    ["1.", 1n],
    ["1b", 1n],
    ["2.5M", 2621440n],
    ["1g", 1n << 30n],
    ["1T", 1n << 40n],
    ["1p", 1n << 50n],
    ["1e", 1n << 60n],
    ["1.5e", 3n << 59n],
    ["0x10", 16n],
    ["0X1e", 30n],
    ["0x10b", 267n],
    ["+1", 1n],
    ["\t1", 1n],
    ["010", 10n],
    ["1.9999999999999999999k", 1024n],
    ["18446744073709551615", 18446744073709551615n],
    ["1.5", "invalid"],
    [".5k", "invalid"],
    ["1e3", "invalid"],
    ["1.5e3", "invalid"],
    ["1kB", "invalid"],
    ["0x", "invalid"],
    ["00x10", "invalid"],
    ["0x1.k", "invalid"],
    ["-1", "invalid"],
    ["-0", "invalid"],
    ["", "invalid"],
    ["k", "invalid"],
    ["18446744073709551616", "too-large"],
    ["16E", "too-large"],
    ["0x10000000000000000", "too-large"],
  ];
  for (const [text, want] of cases) {
    const r = parseSize(text);
    const got = r.ok ? r.value : r.reason;
    assert.equal(got, want, `parseSize(${JSON.stringify(text)})`);
  }
  const hex = parseSize("0x1g");
  assert.ok(hex.ok && hex.value === 1n << 30n && hex.deprecatedHexSuffix);
  const metric = parseSize("2", { defaultSuffix: "M", unit: 1000 });
  assert.ok(metric.ok && metric.value === 2000000n);
});

// ---------------------------------------------------------------------------------------------
// ioMain

async function withImage(size: number, fn: (path: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vstor_io_" });
  try {
    const path = join(dir, "disk.raw");
    const file = await Deno.open(path, { create: true, write: true });
    await file.truncate(size);
    file.close();
    await fn(path);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

interface MainResult {
  code: number;
  out: string[];
  err: string[];
}

async function main(args: string[], stdin?: string): Promise<MainResult> {
  let out = "";
  let err = "";
  const io = {
    stdout: (s: string) => out += s,
    stderr: (s: string) => err += s,
    ...(stdin === undefined
      ? {}
      : { stdin: ReadableStream.from([new TextEncoder().encode(stdin)]) }),
  };
  const code = await ioMain(args, io);
  const lines = (s: string) => s.split("\n").filter((l) => l !== "" && !TIMING.test(l));
  return { code, out: lines(out), err: lines(err) };
}

Deno.test("ioMain runs each -c command in order and exits 0", async () => {
  await withImage(1 << 20, async (path) => {
    const r = await main([
      "-f",
      "raw",
      "-c",
      "write -P 0x5a 0 4k",
      "--cmd",
      "read -P 0x5a 0 4k",
      path,
    ]);
    assert.deepEqual(r, {
      code: 0,
      out: ["wrote 4096/4096 bytes at offset 0", "read 4096/4096 bytes at offset 0"],
      err: [],
    });
    const bytes = await Deno.readFile(path);
    assert.ok(bytes.subarray(0, 4096).every((b) => b === 0x5a));
  });
});

Deno.test("ioMain reads commands from stdin, one per line, until quit", async () => {
  await withImage(1 << 20, async (path) => {
    const r = await main(
      ["--format", "raw", path],
      "write 0 512\nread -P 0xcd 0 512\nfoo\n\nread 0 x\nquit\nread 0 512\n",
    );
    assert.deepEqual(r, {
      code: 1,
      out: [
        "wrote 512/512 bytes at offset 0",
        "read 512/512 bytes at offset 0",
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x",
      ],
      err: ['command "foo" not found'],
    });
    const last = await main(["-f", "raw", path], "read -q -P 0xcd 0 512");
    assert.deepEqual(last, { code: 0, out: [], err: [] });
  });
});

Deno.test("ioMain exits 1 when a command fails and 2 on usage errors", async () => {
  await withImage(4096, async (path) => {
    assert.equal((await main(["-f", "raw", "-c", "read 8k 1", "-c", "read 0 1", path])).code, 1);
    const usage =
      "usage: vstor io [-f FMT] [-r] [-s] [-U] [-t CACHE] [-i AIO] [-d DISCARD] [-o OPTIONS] [-c CMD]... [FILE]";
    // Without FILE, -c commands still run (open may come first); they find no file open.
    assert.deepEqual(await main(["-c", "read 0 1"]), {
      code: 1,
      out: [],
      err: ["no file open, try 'help open'"],
    });
    assert.deepEqual(await main([]), { code: 2, out: [], err: ["vstor io: missing FILE", usage] });
    assert.deepEqual(await main([path, path]), {
      code: 2,
      out: [],
      err: ["vstor io: expected one FILE", usage],
    });
    assert.deepEqual(await main(["--bogus", path]), {
      code: 2,
      out: [],
      err: ["vstor io: unrecognized option '--bogus'", usage],
    });
    const help = await main(["-h"]);
    assert.equal(help.code, 0);
    assert.equal(help.out[0], usage);
  });
});

Deno.test("ioMain reports an image it cannot open on one line and exits 1", async () => {
  await withImage(4096, async (path) => {
    const missing = `${path}.missing`;
    const r = await main(["-f", "raw", "-c", "read 0 1", missing]);
    assert.equal(r.code, 1);
    assert.deepEqual(r.out, []);
    assert.equal(r.err.length, 1);
    assert.match(r.err[0] ?? "", /^vstor: .*disk\.raw\.missing.*: /);
    const bad = await main(["-f", "bogus", "-c", "read 0 1", path]);
    assert.equal(bad.code, 1);
    assert.equal(bad.err.length, 1);
    assert.match(bad.err[0] ?? "", /^vstor: .*disk\.raw: .*bogus/);
  });
});

Deno.test("ioMain -r opens read-only and refuses writes", async () => {
  await withImage(4096, async (path) => {
    const r = await main(["-f", "raw", "-r", "-c", "write 0 1", "-c", "read -q 0 1", path]);
    assert.deepEqual(r, { code: 1, out: [], err: ["vstor: Block node is read-only"] });
  });
});

Deno.test("ioMain warns, like QEMU, when it had to probe a writable raw image", async () => {
  await withImage(4096, async (path) => {
    const r = await main(["-c", "read -q 0 1", path]);
    assert.equal(r.code, 0);
    assert.deepEqual(r.err, [
      `WARNING: Image format was not specified for '${path}' and probing guessed raw.`,
      "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.",
      "         Specify the 'raw' format explicitly to remove the restrictions.",
    ]);
    assert.deepEqual((await main(["-r", "-c", "read -q 0 1", path])).err, []);
  });
});

// ---------------------------------------------------------------------------------------------
// The rest of qemu-io 7.2: vectored and aio requests, open/close/reopen, modes, the drop-in

interface FullRun extends MainResult {
  signals: number[];
}

/** Run an entry with captured streams; timing lines are dropped after checking their shape. */
async function entry(
  which: "vstor" | "qemu-io",
  args: string[],
  stdin?: string,
): Promise<FullRun> {
  let out = "";
  let err = "";
  const signals: number[] = [];
  const io: IoMainIo = {
    stdout: (s: string) => out += s,
    stderr: (s: string) => err += s,
    raise: (signal) => signals.push(signal),
    ...(stdin === undefined
      ? {}
      : { stdin: ReadableStream.from([new TextEncoder().encode(stdin)]) }),
  };
  const code = which === "vstor"
    ? await ioMain(args, io)
    : await qemuIoMain(args, { stdout: io.stdout!, stderr: io.stderr!, ...io });
  const lines = (s: string) => s.split("\n").filter((l) => l !== "" && !TIMING.test(l));
  return { code, out: lines(out), err: lines(err), signals };
}

Deno.test("writev and readv move several iovecs as one request, as qemu-io prints them", async () => {
  const node = await memoryRaw(1 << 20);
  const r = await run(
    node,
    "writev -P 3 512 1k 100 3",
    "readv -P 3 512 1k 103",
    "readv -v 510 4 4",
    "readv -P 4 512 1k",
    "writev -q -P 5 0 0",
  );
  assert.deepEqual(r.out, [
    "wrote 1127/1127 bytes at offset 512",
    "read 1127/1127 bytes at offset 512",
    "000001fe:  00 00 03 03 03 03 03 03  ........",
    "read 8/8 bytes at offset 510",
    "Pattern verification failed at offset 512, 1024 bytes",
    "read 1024/1024 bytes at offset 512",
  ]);
  assert.equal(r.ok, false);
  const bad = await run(
    node,
    "readv 0 x",
    "readv 0 3G",
    "readv 0 1G 1G 1G",
    "writev 2M 512",
    "readv 1M 1",
    "readv -x 0 1",
  );
  assert.deepEqual(bad.out, [
    "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x",
    "Argument '3G' exceeds maximum size 2147483136",
    "The total number of bytes exceed the maximum size 2147483136",
    "writev failed: Input/output error",
    "readv failed: Input/output error",
    "readv [-Cqv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset",
  ]);
  assert.deepEqual(bad.err, ["readv: invalid option -- 'x'"]);
});

Deno.test("aio requests complete at aio_flush, in submission order, with qemu-io's lines", async () => {
  const node = await memoryRaw(1 << 20);
  const r = await run(
    node,
    "aio_write -P 1 0 4k",
    "aio_write -P 2 4k 4k 4k",
    "length",
    "aio_read -P 1 0 4k",
    "aio_read -v -P 9 4k 16",
    "aio_write -P 1 2M 4k",
    "aio_read 2M 4k",
    "aio_flush",
    "read -q -P 2 4k 8k",
  );
  assert.deepEqual(r.out, [
    "1 MiB", // length does not run the event loop
    "wrote 4096/4096 bytes at offset 0",
    "wrote 8192/8192 bytes at offset 4096",
    "read 4096/4096 bytes at offset 0",
    "Pattern verification failed at offset 4096, 16 bytes",
    "00001000:  02 02 02 02 02 02 02 02 02 02 02 02 02 02 02 02  ................",
    "read 16/16 bytes at offset 4096",
    "aio_write failed: Input/output error",
    "readv failed: Input/output error",
  ]);
  // Submitted requests succeed: only what the completions print tells of errors.
  assert.equal(r.ok, true);
});

Deno.test("aio_write checks its flags as qemu-io 7.2 and -i injects an invalid request", async () => {
  const node = await memoryRaw(1 << 20, 0xff);
  const r = await run(
    node,
    "aio_write -z 0 4k 4k",
    "aio_write -u 0 4k",
    "aio_read -i 0 1",
    "aio_write -i 0 1",
    "aio_write -z -u 0 4k",
    "aio_write -q -P 7 4k 512",
    "aio_flush",
  );
  assert.deepEqual(r.out, [
    "-z supports only a single length parameter",
    "-u requires -z to be specified",
    "injecting invalid read request",
    "injecting invalid write request",
    "wrote 4096/4096 bytes at offset 0",
  ]);
  assert.ok((await bytesOf(node, 0, 4096)).every((b) => b === 0));
  assert.ok((await bytesOf(node, 4096, 512)).every((b) => b === 7));
});

Deno.test("synchronous I/O prints due aio completions after its own output", async () => {
  const node = await memoryRaw(1 << 20);
  const r = await run(node, "aio_write -P 1 0 4k", "read -P 1 0 512", "alloc 0", "sleep 0");
  assert.deepEqual(r.out, [
    "read 512/512 bytes at offset 0",
    "wrote 4096/4096 bytes at offset 0",
    "512/512 bytes allocated at offset 0 bytes",
  ]);
  const pending = await run(node, "aio_write -P 1 0 512", "alloc 0");
  assert.deepEqual(pending.out, [
    "512/512 bytes allocated at offset 0 bytes",
    "wrote 512/512 bytes at offset 0", // at the end of the run, as qemu-io drains at exit
  ]);
});

Deno.test("commands without an open file, open, close and open's errors", async () => {
  await withImage(1 << 20, async (path) => {
    const r = await entry("qemu-io", [
      "-c",
      "read 0 1",
      "-c",
      `open -r -o driver=raw ${path}`,
      "-c",
      "read -q 0 1",
      "-c",
      "write 0 1",
      "-c",
      `open ${path}`,
      "-c",
      "close",
      "-c",
      "close",
      "-c",
      `open -o driver=raw,file.filename=${path}`,
      "-c",
      "length",
      "-c",
      "close",
      "-c",
      `open -o driver=raw,foo=bar ${path}`,
      "-c",
      "open -o driver=raw",
      "-c",
      "open -o size",
      "-c",
      `open -f raw ${path}`,
      "-c",
      `open ${path} ${path}`,
      "-c",
      "open",
      "-c",
      `open -t bogus ${path}`,
    ]);
    assert.deepEqual(r.out, [
      "1 MiB",
      "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path",
      "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path",
    ]);
    assert.deepEqual(r.err, [
      "no file open, try 'help open'",
      "qemu-io: Block node is read-only",
      "qemu-io: file open already, try 'help close'",
      "no file open, try 'help open'",
      `qemu-io: can't open device ${path}: Block format 'raw' does not support the option 'foo'`,
      `qemu-io: can't open: A block device must be specified for "file"`,
      "qemu-io: warning: short-form boolean option 'size' deprecated",
      "Please use size=on instead",
      "qemu-io: can't open: Must specify either driver or file",
      "open: invalid option -- 'f'",
      "bad argument count 0 to open, expected at least 1 arguments",
      "qemu-io: Invalid cache option: bogus",
    ]);
    assert.equal(r.code, 1);
  });
});

Deno.test("reopen switches between read-only and read-write and refuses what qemu-io refuses", async () => {
  await withImage(1 << 20, async (path) => {
    const r = await entry("qemu-io", [
      "-f",
      "raw",
      path,
      "-c",
      "reopen -r",
      "-c",
      "write 0 1",
      "-c",
      "reopen -w",
      "-c",
      "write -q -P 0x11 0 1",
      "-c",
      "reopen -r -w",
      "-c",
      "reopen -c bogus",
      "-c",
      "reopen -r -o read-only=on",
      "-c",
      "reopen -o foo=bar",
      "-c",
      "reopen x",
      "-c",
      "reopen -c writeback",
      "-c",
      "reopen -c unsafe -o cache.no-flush=on",
      "-c",
      "reopen -c none",
      "-c",
      "reopen -o read-only=on",
      "-c",
      "write -q -P 0x11 0 1",
      "-c",
      "read -q -P 0x11 0 1",
    ]);
    assert.deepEqual(r.err, [
      "qemu-io: Block node is read-only",
      "qemu-io: Only one -r/-w option may be given",
      "qemu-io: Invalid cache option: bogus",
      "qemu-io: Cannot set both -r/-w and 'read-only'",
      "qemu-io: Cannot change the option 'foo'",
      "qemu-io: Cannot set both -c and the cache options",
      "qemu-io: Read-only block node '#block000' cannot support read-write users",
    ]);
    assert.deepEqual(r.out, [
      "reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options",
    ]);
    assert.equal((await Deno.readFile(path))[0], 0x11);
  });
});

Deno.test("-s writes to a temporary qcow2 overlay and leaves the image file as it was", async () => {
  await withImage(1 << 20, async (path) => {
    const before = await Deno.readFile(path);
    const r = await entry("vstor", [
      "-s",
      "-f",
      "raw",
      path,
      "-c",
      "write -P 5 0 4k",
      "-c",
      "read -P 5 0 4k",
      "-c",
      "info",
      "-c",
      "map",
      "-c",
      "truncate 2M",
      "-c",
      "length",
    ]);
    assert.deepEqual(r.out, [
      "wrote 4096/4096 bytes at offset 0",
      "read 4096/4096 bytes at offset 0",
      "format name: qcow2",
      "cluster size: 64 KiB",
      "vm state offset: 512 MiB",
      "Format specific information:",
      "    compat: 1.1",
      "    compression type: zlib",
      "    lazy refcounts: false",
      "    refcount bits: 16",
      "    corrupt: false",
      "    extended l2: false",
      "64 KiB (0x10000) bytes     allocated at offset 0 bytes (0x0)",
      "960 KiB (0xf0000) bytes not allocated at offset 64 KiB (0x10000)",
      "2 MiB",
    ]);
    assert.equal(r.code, 0);
    assert.deepEqual(await Deno.readFile(path), before);
    const ro = await entry("vstor", ["-s", "-r", "-f", "raw", path, "-c", "write 0 1"]);
    assert.deepEqual(ro.err, ["vstor: Block node is read-only"]);
  });
});

Deno.test("info prints qcow2's format specific block", async () => {
  await withImage(0, async (path) => {
    await createImage(path, "qcow2", 1 << 20, { compat: "0.10" });
    const r = await entry("vstor", ["-r", path, "-c", "info"]);
    assert.deepEqual(r.out, [
      "format name: qcow2",
      "cluster size: 64 KiB",
      "vm state offset: 512 MiB",
      "Format specific information:",
      "    compat: 0.10",
      "    compression type: zlib",
      "    refcount bits: 16",
    ]);
  });
});

Deno.test("cache, aio and discard modes: checked as qemu-io; O_DIRECT, io_uring and native (as io_uring) work", async () => {
  await withImage(1 << 20, async (path) => {
    const runs = [
      ["-t", "none"],
      ["-t", "directsync"],
      ["-n"],
      ["-i", "io_uring"],
      ["-t", "none", "-i", "native"],
      ["-n", "-k"],
    ];
    for (const flags of runs) {
      const r = await entry("qemu-io", [
        ...flags,
        "-f",
        "raw",
        path,
        "-c",
        "write -q 1 3",
        "-c",
        "length",
      ]);
      assert.deepEqual({ code: r.code, out: r.out, err: r.err }, {
        code: 0,
        out: ["1 MiB"],
        err: [],
      }, flags.join(" "));
    }
    const cases: Array<[string[], string]> = [
      [["-i", "native"], "aio=native was specified, but it requires cache.direct=on"],
      [["-k"], "aio=native was specified, but it requires cache.direct=on"],
    ];
    for (const [flags, message] of cases) {
      const r = await entry("qemu-io", [...flags, "-f", "raw", path, "-c", "length"]);
      assert.equal(r.code, 1, flags.join(" "));
      assert.deepEqual(r.out, []);
      assert.equal(r.err.length, 1);
      assert.ok(r.err[0]!.startsWith(`qemu-io: can't open device ${path}: ${message}`), r.err[0]);
    }
    for (
      const [flag, value, what] of [["-t", "bogus", "cache"], ["-i", "x", "aio"], [
        "-d",
        "y",
        "discard",
      ]]
    ) {
      const r = await entry("qemu-io", [flag!, value!, "-f", "raw", path, "-c", "length"]);
      assert.deepEqual({ code: r.code, err: r.err }, {
        code: 1,
        err: [`qemu-io: Invalid ${what} option: ${value}`],
      });
    }
    for (const mode of ["writeback", "writethrough", "unsafe"]) {
      const r = await entry("vstor", [
        "-t",
        mode,
        "-i",
        "threads",
        "-f",
        "raw",
        path,
        "-c",
        "write -q 0 1",
        "-c",
        "flush",
      ]);
      assert.equal(r.code, 0, mode);
    }
    // -d ignore drops discards (after their range check); -d unmap passes them on.
    await entry("vstor", ["-f", "raw", path, "-c", "write -q -P 0x22 0 64k"]);
    const ignored = await entry("vstor", [
      "-d",
      "ignore",
      "-f",
      "raw",
      path,
      "-c",
      "discard 0 64k",
      "-c",
      "discard 2M 1",
    ]);
    assert.deepEqual(ignored.out, [
      "discard 65536/65536 bytes at offset 0",
      "discard failed: Input/output error",
    ]);
    assert.equal((await Deno.readFile(path))[100], 0x22);
  });
});

Deno.test("sigraise and abort raise the signal; the run ends with 128 + signal", async () => {
  await withImage(4096, async (path) => {
    const r = await entry("qemu-io", [
      "-f",
      "raw",
      path,
      "-c",
      "sigraise 0",
      "-c",
      "sigraise 17",
      "-c",
      "length",
      "-c",
      "sigraise 15",
      "-c",
      "length",
    ]);
    assert.deepEqual({ code: r.code, out: r.out, signals: r.signals }, {
      code: 143,
      out: ["4 KiB"],
      signals: [15],
    });
    const abort = await entry("qemu-io", ["-c", "abort", "-c", "help quit"]);
    assert.deepEqual({ code: abort.code, out: abort.out, signals: abort.signals }, {
      code: 134,
      out: [],
      signals: [6],
    });
    const bad = await entry("qemu-io", [
      "-c",
      "sigraise 66",
      "-c",
      "sigraise x",
      "-c",
      "sleep -1",
      "-c",
      "sleep x",
      "-c",
      "sleep 1",
      "-c",
      "sigraise 65",
    ]);
    assert.deepEqual(bad.out, [
      "signal argument '66' is too large to be a valid signal",
      "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x",
      "-1 is not a valid number",
      "x is not a valid number",
    ]);
    assert.equal(bad.code, 1);
  });
});

Deno.test("blkdebug commands fail as on a node without blkdebug, and wait_break never hangs", async () => {
  const node = await memoryRaw(4096);
  const r = await run(node, "break a b", "remove_break b", "resume b", "wait_break b");
  assert.deepEqual(r.out, [
    "Could not set breakpoint: Operation not supported",
    "Could not remove breakpoint b: Operation not supported",
    "Could not resume request: Operation not supported",
  ]);
  assert.equal(r.err.length, 1);
  assert.equal(r.ok, false);
});

Deno.test("qemuIoMain answers as qemu-io: usage on stdout, qemu-io: messages, prompt, exit 1", async () => {
  const bad = await entry("qemu-io", ["-x"]);
  assert.equal(bad.code, 1);
  assert.deepEqual(bad.err, ["qemu-io: invalid option -- 'x'"]);
  assert.equal(bad.out[0], "Usage: qemu-io [OPTIONS]... [-c STRING]... [file]");
  assert.equal(bad.out.at(-1), "More information on the QEMU project at <https://qemu.org>.");
  assert.equal((await entry("qemu-io", ["-o", "x"])).err[0], "qemu-io: invalid option -- 'o'");
  assert.equal((await entry("qemu-io", ["a", "b"])).code, 1);
  const help = await entry("qemu-io", ["--help"]);
  assert.equal(help.code, 0);
  assert.equal(help.out[1], "QEMU Disk exerciser");
  const version = await entry("qemu-io", ["-V"]);
  assert.match(version.out[0] ?? "", /^qemu-io version 7\.2\.0 /);
  const all = await entry("qemu-io", ["-c", "help"]);
  assert.deepEqual(all.out, [...QEMU_IO_HELP, "Use 'help commandname' for extended help."]);
  assert.equal(
    (await entry("qemu-io", ["--image-opts", "-f", "raw", "x"])).err[0],
    "qemu-io: --image-opts and -f are mutually exclusive",
  );
  await withImage(4096, async (path) => {
    const missing = await entry("qemu-io", ["-f", "raw", `${path}.no`, "-c", "length"]);
    assert.deepEqual(missing, {
      code: 1,
      out: [],
      err: [
        `qemu-io: can't open device ${path}.no: Could not open '${path}.no': No such file or directory`,
      ],
      signals: [],
    });
    const stdin = await entry("qemu-io", ["-f", "raw", path], "length\nbogus\n");
    assert.deepEqual(stdin.out, ["qemu-io> 4 KiB", "qemu-io> qemu-io> "]);
    assert.deepEqual(stdin.err, ['command "bogus" not found']);
    assert.equal(stdin.code, 1);
    const opts = await entry("qemu-io", [
      "--image-opts",
      `driver=raw,file.filename=${path}`,
      "-c",
      "length",
    ]);
    assert.deepEqual({ code: opts.code, out: opts.out }, { code: 0, out: ["4 KiB"] });
    const vstorOpts = await entry("vstor", [
      "-o",
      `driver=raw,file.filename=${path}`,
      "-c",
      "length",
    ]);
    assert.deepEqual({ code: vstorOpts.code, out: vstorOpts.out }, { code: 0, out: ["4 KiB"] });
  });
});

Deno.test("-C copies what reads fetch from the backing file into the overlay", async () => {
  await withImage(1 << 20, async (base) => {
    await entry("vstor", ["-f", "raw", base, "-c", "write -q -P 0x44 0 64k"]);
    const overlay = `${base}.qcow2`;
    await createImage(overlay, "qcow2", 1 << 20, { backingFile: base, backingFormat: "raw" });
    const r = await entry("vstor", [
      "-C",
      overlay,
      "-c",
      "alloc 0 64k",
      "-c",
      "read -q -P 0x44 0 4k",
      "-c",
      "alloc 0 64k",
    ]);
    assert.deepEqual(r.out, [
      "0/65536 bytes allocated at offset 0 bytes",
      "65536/65536 bytes allocated at offset 0 bytes",
    ]);
    const ro = await entry("vstor", ["-C", "-r", overlay, "-c", "length"]);
    assert.deepEqual({ code: ro.code, err: ro.err }, {
      code: 1,
      err: [`vstor: can't open device ${overlay}: Can't use copy-on-read on read-only device`],
    });
  });
});
