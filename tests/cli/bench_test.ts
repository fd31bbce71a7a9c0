import assert from "node:assert/strict";
import { join } from "node:path";
import { main, qemuImgMain } from "../../src/cli/main.ts";
import { parseBenchArgs } from "../../src/cli/bench.ts";
import { type BenchParams, runBench } from "../../formats/bench.ts";
import type { BlockNode, Extent, WriteOptions } from "../../src/block/node.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import { RawNode } from "../../formats/raw.ts";
import { openImage } from "../../formats/open.ts";
import { ignoreWithout, runTool } from "../interop/qemu.ts";

const dir = Deno.makeTempDirSync({ prefix: "vstor_bench_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

function makeImage(name: string, size: number, fill?: (bytes: Uint8Array) => void): string {
  const path = join(dir, name);
  const bytes = new Uint8Array(size);
  fill?.(bytes);
  Deno.writeFileSync(path, bytes);
  return path;
}

async function readImage(path: string): Promise<Uint8Array> {
  const node = await openImage(path, { format: "raw", readOnly: true });
  try {
    const bytes = new Uint8Array(node.size);
    await node.read(0, bytes);
    return bytes;
  } finally {
    await node.close();
  }
}

/** Byte ranges `[start, end)` holding `value`; everything else must be zero. */
function assertPattern(bytes: Uint8Array, ranges: [number, number][], value: number): void {
  const expected = new Uint8Array(bytes.length);
  for (const [start, end] of ranges) expected.fill(value, start, end);
  for (let i = 0; i < bytes.length; i++) {
    if (bytes[i] !== expected[i]) {
      assert.fail(`byte ${i} is ${bytes[i]}, expected ${expected[i]}`);
    }
  }
}

/** The result lines with the time taken out, for comparing runs. */
function untimed(stdout: string): string {
  return stdout.replace(/^Run completed in \d+\.\d{3} seconds\.$/m, "Run completed in T seconds.");
}

Deno.test("vstor bench takes qemu-img bench's defaults", () => {
  const opts = parseBenchArgs(["disk.img"]);
  assert.notEqual(opts, "help");
  if (opts === "help") return;
  assert.deepEqual(
    {
      count: opts.count,
      depth: opts.depth,
      bufferSize: opts.bufferSize,
      step: opts.step,
      offset: opts.offset,
      pattern: opts.pattern,
      write: opts.write,
      flushInterval: opts.flushInterval,
      drainOnFlush: opts.drainOnFlush,
      cache: opts.cache,
      aio: opts.aio,
    },
    {
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
    },
  );
});

Deno.test("vstor bench parses numbers as qemu-img does (strtoul base 0, size suffixes)", () => {
  const opts = parseBenchArgs([
    "-c0x10",
    "-d",
    "010",
    "-s",
    "1.5k",
    "-S",
    "2k",
    "-o",
    "0x0",
    "--pattern",
    "0xff",
    "--flush=8",
    "-wq",
    "disk.img",
  ]);
  if (opts === "help") return assert.fail("not help");
  assert.equal(opts.count, 16);
  assert.equal(opts.depth, 8);
  assert.equal(opts.bufferSize, 1536);
  assert.equal(opts.step, 2048);
  assert.equal(opts.offset, 0);
  assert.equal(opts.pattern, 0xff);
  assert.equal(opts.flushInterval, 8);
  assert.ok(opts.write && opts.quiet);
  assert.equal(parseBenchArgs(["-h"]), "help");
  assert.throws(() => parseBenchArgs(["-o", "-0", "disk.img"]), /Invalid offset specified/);
});

Deno.test("vstor bench usage mistakes exit 2 with qemu-img's message and the usage", async () => {
  const img = makeImage("usage.img", 1 << 20);
  const cases: [string[], RegExp][] = [
    [[], /Expecting one image file name/],
    [[img, img], /Expecting one image file name/],
    [["-c", "0", img], /Invalid request count specified/],
    [["-c", "-1", img], /Invalid request count specified/],
    [["-c", "5k", img], /Invalid request count specified/],
    [["-c", "2147483648", img], /Invalid request count specified/],
    [["-d", "0", img], /Invalid queue depth specified/],
    [["-d", "x", img], /Invalid queue depth specified/],
    [["-s", "0", img], /Invalid buffer size specified\. Must be between 1 and 2147483647/],
    [["-s", "abc", img], /Invalid buffer size specified\. You may use k, M, G, T, P or E suffixes/],
    [["-s", "2G", img], /Invalid buffer size specified\. Must be between/],
    [["-S", "-1", img], /Invalid step_size specified/],
    [["-o", "x", img], /Invalid offset specified/],
    [["--pattern=256", "-w", img], /Invalid pattern byte specified/],
    [["-w", "--flush-interval=x", img], /Invalid flush interval specified/],
    [["--flush-interval=64", img], /--flush-interval is only available in write tests/],
    [["-w", "--flush-interval=10", img], /Flush interval can't be smaller than depth/],
    [["-t", "bogus", img], /Invalid cache mode 'bogus'/],
    [["-i", "bogus", img], /Invalid aio option: bogus/],
    [["-c"], /Missing argument for option '-c'/],
    [["--bogus", img], /Unrecognized option '--bogus'/],
    [["-x", img], /Unrecognized option '-x'/],
    [
      ["-c", "1", "-s", "2M", img],
      /Buffer size 2097152 is larger than the image \(1048576 bytes\)/,
    ],
    [["-c", "1", "-o", "1020k", "-s", "8k", img], /Offset 1044480 plus buffer size 8192 is past/],
    [["-c", "1", "-S", "2M", img], /Step size 2097152 is larger than the image/],
  ];
  for (const [args, message] of cases) {
    const r = await vstor("bench", ...args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, /^vstor bench: .+\nusage: vstor bench/, args.join(" "));
    assert.match(r.stderr, message, args.join(" "));
    assert.equal(r.stdout, "", args.join(" "));
  }
});

Deno.test("vstor bench runs the O_DIRECT cache modes", async () => {
  const img = makeImage("modes.img", 1 << 20);
  for (const [i, mode] of ["none", "off", "directsync"].entries()) {
    const pattern = 0xa0 + i;
    const r = await vstor(
      "bench",
      "-w",
      "-c",
      "16",
      "-s",
      "4096",
      "-f",
      "raw",
      `--pattern=${pattern}`,
      "-t",
      mode,
      img,
    );
    assert.equal(r.code, 0, `${mode}: ${r.stderr}`);
    const bytes = Deno.readFileSync(img).subarray(0, 16 * 4096);
    assert.ok(bytes.every((b) => b === pattern), `${mode}: the written pattern reads back`);
  }
  for (const mode of ["writeback", "writethrough", "unsafe"]) {
    const r = await vstor("bench", "-c", "4", "-w", "-f", "raw", "-t", mode, img);
    assert.equal(r.code, 0, `${mode}: ${r.stderr}`);
  }
  assert.equal((await vstor("bench", "-c", "4", "-i", "threads", img)).code, 0);
});

Deno.test("vstor bench on a missing image is a one-line error, exit 1", async () => {
  const r = await vstor("bench", "-c", "1", join(dir, "missing.img"));
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^vstor: .*missing\.img.*No such file or directory\n$/);
});

Deno.test("vstor bench -w puts the pattern where offset and step say", async () => {
  const img = makeImage("pattern.img", 64 * 1024);
  const r = await vstor(
    "bench",
    "-f",
    "raw",
    "-w",
    "-c",
    "10",
    "-s",
    "512",
    "-S",
    "1024",
    "-o",
    "4096",
    "--pattern=0xab",
    img,
  );
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stderr, "");
  assert.equal(
    untimed(r.stdout),
    "Sending 10 write requests, 512 bytes each, 64 in parallel (starting at offset 4096, step size 1024)\n" +
      "Run completed in T seconds.\n",
  );
  const ranges: [number, number][] = [];
  for (let k = 0; k < 10; k++) ranges.push([4096 + k * 1024, 4096 + k * 1024 + 512]);
  assertPattern(await readImage(img), ranges, 0xab);
});

Deno.test("vstor bench wraps offsets modulo the image size, as qemu-img 7.2", async () => {
  // 0, 4096, 8192, then 12288 % 10240 = 2048.
  const img = makeImage("wrap.img", 10240);
  const r = await vstor(
    "bench",
    ..."-f raw -w -c 4 -d 1 -s 1024 -S 4096 --pattern=0x5a".split(" "),
    img,
  );
  assert.equal(r.code, 0, r.stderr);
  assertPattern(await readImage(img), [[0, 1024], [2048, 3072], [4096, 5120], [8192, 9216]], 0x5a);
});

Deno.test("vstor bench wraps to the start where qemu-img 7.2 would run past the end", async () => {
  // 0, 4096, then 8192 + 4096 > 10000: qemu-img 7.2 fails with EIO, vstor goes back to 0.
  const img = makeImage("tail.img", 10000);
  const r = await vstor("bench", ..."-f raw -w -c 4 -d 2 --pattern=7".split(" "), img);
  assert.equal(r.code, 0, r.stderr);
  assertPattern(await readImage(img), [[0, 8192]], 7);
});

Deno.test("vstor bench without -w leaves the image unchanged", async () => {
  const img = makeImage("read.img", 256 * 1024, (b) => {
    for (let i = 0; i < b.length; i++) b[i] = (i * 7 + 3) & 0xff;
  });
  const before = Deno.readFileSync(img);
  const mtime = Deno.statSync(img).mtime;
  const r = await vstor("bench", "-c", "1000", "-d", "16", "--pattern=0xee", img);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(
    untimed(r.stdout),
    "Sending 1000 read requests, 4096 bytes each, 16 in parallel (starting at offset 0, step size 4096)\n" +
      "Run completed in T seconds.\n",
  );
  assert.deepEqual(Deno.readFileSync(img), before);
  assert.deepEqual(Deno.statSync(img).mtime, mtime);
});

Deno.test("vstor bench -U reads an image another process holds for writing", async () => {
  const img = makeImage("shared.img", 64 * 1024);
  const writer = await openImage(img, { format: "raw" });
  try {
    const r = await vstor("bench", "-U", "-f", "raw", "-c", "8", img);
    assert.equal(r.code, 0, r.stderr);
    const w = await vstor("bench", "-U", "-w", "-f", "raw", "-c", "8", img);
    assert.equal(w.code, 1);
    assert.match(w.stderr, /force-share=on can only be used with read-only images/);
  } finally {
    await writer.close();
  }
});

/** A raw node over memory whose requests complete a timer tick later, recording what happens. */
class SlowNode implements BlockNode {
  readonly format = "raw";
  readonly filename = "slow";
  readonly readOnly = false;
  readonly requestAlignment = 1;
  readonly inner: RawNode;
  inFlight = 0;
  maxInFlight = 0;
  readonly log: string[] = [];

  constructor(inner: RawNode) {
    this.inner = inner;
  }

  static async create(size: number): Promise<SlowNode> {
    return new SlowNode(await RawNode.open(new MemoryFile("slow", new Uint8Array(size))));
  }

  get size(): number {
    return this.inner.size;
  }

  async #slow<T>(what: string, op: () => Promise<T>): Promise<T> {
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    await new Promise((resolve) => setTimeout(resolve, 0));
    try {
      return await op();
    } finally {
      this.inFlight--;
      this.log.push(what);
    }
  }

  read(offset: number, dst: Uint8Array): Promise<void> {
    return this.#slow(`r${offset}`, () => this.inner.read(offset, dst));
  }
  write(offset: number, src: Uint8Array, opts?: WriteOptions): Promise<void> {
    return this.#slow(`w${offset}${opts?.fua ? "!" : ""}`, () => this.inner.write(offset, src));
  }
  writeZeroes(offset: number, length: number): Promise<void> {
    return this.inner.writeZeroes(offset, length);
  }
  discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(offset, length);
  }
  flush(): Promise<void> {
    this.log.push(`flush@${this.inFlight}`);
    return this.inner.flush();
  }
  blockStatus(offset: number, max: number): Promise<Extent> {
    return this.inner.blockStatus(offset, max);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

const params = (over: Partial<BenchParams>): BenchParams => ({
  count: 30,
  depth: 8,
  bufferSize: 512,
  step: 0,
  offset: 0,
  pattern: 0,
  write: true,
  flushInterval: 0,
  drainOnFlush: true,
  cache: "writeback",
  ...over,
});

Deno.test("runBench keeps DEPTH requests in flight, never more", async () => {
  const node = await SlowNode.create(64 * 1024);
  await runBench(node, params({ count: 100, depth: 8, write: false }));
  assert.equal(node.maxInFlight, 8);
  assert.equal(node.log.length, 100);
  const few = await SlowNode.create(64 * 1024);
  await runBench(few, params({ count: 3, depth: 64 }));
  assert.equal(few.maxInFlight, 3);
});

Deno.test("runBench drains and flushes on qemu-img's cadence: when the requests left are a multiple of the interval", async () => {
  const node = await SlowNode.create(64 * 1024);
  const r = await runBench(node, params({ flushInterval: 8 }));
  assert.equal(r.flushRequests, 3);
  // 30 requests, 8 at a time: flush once 16, 8 and 0 are left to send, each with nothing in flight.
  const writesBefore = node.log.flatMap((e, i) =>
    e.startsWith("flush") ? [node.log.slice(0, i).filter((x) => x.startsWith("w")).length] : []
  );
  assert.deepEqual(writesBefore, [14, 22, 30]);
  assert.ok(node.log.filter((e) => e.startsWith("flush")).every((e) => e === "flush@0"));
});

Deno.test("runBench --no-drain flushes without waiting, and after each of the last completions", async () => {
  const node = await SlowNode.create(64 * 1024);
  const r = await runBench(node, params({ flushInterval: 8, drainOnFlush: false }));
  // 16 and 8 left to send, then 0 left at each of the last 8 completions (qemu-img's bench_cb).
  assert.equal(r.flushRequests, 10);
  assert.ok(node.log.some((e) => e.startsWith("flush@") && e !== "flush@0"));
});

Deno.test("runBench: writethrough sends FUA writes, unsafe sends no flushes", async () => {
  const wt = await SlowNode.create(64 * 1024);
  await runBench(wt, params({ count: 5, cache: "writethrough" }));
  assert.deepEqual(wt.log, ["w0!", "w512!", "w1024!", "w1536!", "w2048!"]);
  const unsafe = await SlowNode.create(64 * 1024);
  const r = await runBench(unsafe, params({ flushInterval: 8, cache: "unsafe" }));
  assert.equal(r.flushRequests, 3);
  assert.ok(!unsafe.log.some((e) => e.startsWith("flush")));
});

Deno.test("runBench reports a failed request after the others finish", async () => {
  const node = await SlowNode.create(64 * 1024);
  const inner = node.inner;
  let calls = 0;
  node.inner.read = (offset, dst) => {
    if (++calls === 5) return Promise.reject(new Error("injected failure"));
    return RawNode.prototype.read.call(inner, offset, dst);
  };
  await assert.rejects(runBench(node, params({ write: false })), /injected failure/);
  assert.equal(node.inFlight, 0);
  assert.throws(() => runBench(node, params({ bufferSize: 1 << 20 })), RangeError);
});

for (
  const args of [
    ["-c", "2000"],
    ["-w", "-c", "100", "-d", "8", "--flush-interval=16", "-o", "1k", "-S", "8k", "-s", "512"],
    ["-w", "-c", "64", "-d", "4", "--flush-interval=4", "--no-drain", "--pattern=0x5a", "-q"],
    ["-w", "-c", "9", "-d", "3", "-s", "1024", "-S", "4096", "-o", "512", "--pattern=0xc3"],
    ["-c", "7", "-d", "1", "-s", "1.5k", "-S", "0", "-t", "writethrough", "-w"],
  ]
) {
  Deno.test({
    name: `vstor bench ${args.join(" ")} prints and writes what qemu-img bench does`,
    ignore: ignoreWithout("qemu-img"),
    async fn() {
      const size = 100 * 1024; // 8 KiB steps wrap unevenly here (102400 % 8192 = 4096)
      const ours = makeImage(`ours_${args.length}.img`, size);
      const theirs = makeImage(`theirs_${args.length}.img`, size);
      const q = await runTool("qemu-img", ["bench", "-f", "raw", ...args, theirs]);
      assert.equal(q.code, 0, q.stderr);
      const v = await vstor("bench", "-f", "raw", ...args, ours);
      assert.equal(v.code, 0, v.stderr);
      assert.equal(untimed(v.stdout), untimed(q.stdout));
      assert.match(v.stdout, /\nRun completed in \d+\.\d{3} seconds\.\n$/);
      assert.deepEqual(Deno.readFileSync(ours), Deno.readFileSync(theirs));
    },
  });
}

Deno.test("vstor bench -i io_uring and -i native write a pattern that reads back, with and without O_DIRECT", async () => {
  const img = makeImage("uring.img", 4 << 20);
  const runs: [string[], number][] = [
    [["-i", "io_uring", "-t", "none"], 0x31],
    [["-i", "io_uring", "-t", "directsync", "--flush-interval=64"], 0x32],
    [["-i", "io_uring"], 0x33],
    [["-i", "io_uring", "-t", "writethrough"], 0x34],
    [["-i", "native", "-t", "none"], 0x35],
    [["-n", "-t", "none", "-s", "1000", "-S", "1000"], 0x36], // unaligned: read-modify-write
  ];
  for (const [args, pattern] of runs) {
    const r = await vstor(
      "bench",
      ..."-w -f raw -c 1024 -d 32".split(" "),
      `--pattern=${pattern}`,
      ...args,
      img,
    );
    assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}`);
    const unaligned = args.includes("1000");
    const end = unaligned ? 1024 * 1000 : 1024 * 4096;
    assertPattern((await readImage(img)).subarray(0, end), [[0, end]], pattern);
    const readArgs = args.filter((a) => !a.startsWith("--flush-interval"));
    const back = await vstor("bench", "-f", "raw", "-c", "1024", "-d", "32", ...readArgs, img);
    assert.equal(back.code, 0, `reading with ${args.join(" ")}: ${back.stderr}`);
  }
});

Deno.test("vstor bench -i native needs O_DIRECT, as QEMU's aio=native needs cache.direct=on", async () => {
  const img = makeImage("native.img", 1 << 20);
  for (const args of [["-i", "native"], ["-n"], ["-n", "-t", "writeback"]]) {
    const r = await vstor("bench", "-c", "1", ...args, img);
    assert.equal(r.code, 1, args.join(" "));
    assert.equal(
      r.stderr,
      "vstor: aio=native was specified, but it requires cache.direct=on, which was not specified.\n",
    );
  }
});

Deno.test({
  name: "vstor bench -i native without O_DIRECT fails as qemu-img bench does",
  ignore: ignoreWithout("qemu-img"),
  async fn() {
    const img = makeImage("native_qemu.img", 1 << 20);
    const qemu = await runTool("qemu-img", ["bench", "-c", "1", "-i", "native", img]);
    let stderr = "";
    const code = await qemuImgMain(["bench", "-c", "1", "-i", "native", img], {
      stdout: () => {},
      stderr: (s) => stderr += s,
    });
    assert.equal(code, qemu.code);
    assert.equal(stderr, qemu.stderr);
  },
});
