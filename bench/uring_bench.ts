/**
 * io_uring against synchronous pread: 4 KiB random O_DIRECT reads of a 256 MiB file in /var/tmp
 * (the disk, not the page cache), at queue depth 1 and 32. Every iteration is the same 1024 reads,
 * so the columns compare directly; IOPS are printed at the end. `deno bench -A bench/uring_bench.ts`.
 */
import { join } from "node:path";
import { AlignedBuffer } from "../src/sys/direct.ts";
import { cPath, libc, O_CLOEXEC, O_DIRECT, O_RDONLY } from "../src/sys/libc.ts";
import { Uring } from "../src/sys/uring.ts";

const FILE_SIZE = 256 << 20;
const BLOCK = 4096;
const BLOCKS = FILE_SIZE / BLOCK;
/** Reads per bench iteration. */
const BATCH = 1024;
const DEPTH = 32;

const dir = Deno.makeTempDirSync({ dir: "/var/tmp", prefix: "vstor_uring_bench_" });
const path = join(dir, "bench.img");
{
  // Random contents, so nothing along the way can shortcut zeroes.
  const f = Deno.openSync(path, { write: true, create: true });
  const chunk = new Uint8Array(1 << 20);
  for (let at = 0; at < FILE_SIZE; at += chunk.length) {
    for (let i = 0; i < chunk.length; i += 65536) {
      crypto.getRandomValues(chunk.subarray(i, i + 65536));
    }
    f.writeSync(chunk);
  }
  f.syncSync();
  f.close();
}
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

const c = libc();
const fd = c.open(cPath(path), O_RDONLY | O_DIRECT | O_CLOEXEC, 0);
if (fd < 0) throw new Error(`open ${path} with O_DIRECT failed`);
const memory = new AlignedBuffer(DEPTH * BLOCK);
const slots = Array.from(
  { length: DEPTH },
  (_, i) => memory.bytes.subarray(i * BLOCK, (i + 1) * BLOCK),
);
const ring = new Uring(DEPTH);
const fixedRing = new Uring(DEPTH);
fixedRing.registerBuffers([memory.bytes]);

// A fixed-seed xorshift so every run touches the same blocks.
let seed = 0x9e3779b9;
function nextOffset(): number {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return ((seed >>> 0) % BLOCKS) * BLOCK;
}

/** Reads and milliseconds spent, per case, for the IOPS printed at the end. */
const totals = new Map<string, { reads: number; ms: number }>();
function timed(name: string, run: () => void): () => void {
  totals.set(name, { reads: 0, ms: 0 });
  return () => {
    const t = performance.now();
    run();
    const total = totals.get(name)!;
    total.ms += performance.now() - t;
    total.reads += BATCH;
  };
}

function check(result: number): void {
  if (result !== BLOCK) throw new Error(`read returned ${result}`);
}

/** BATCH reads through `r`, at most `depth` in flight, each refilling the slot it finished. */
function ringBatch(r: Uring, depth: number, fixed: boolean): void {
  let issued = 0, done = 0;
  const issue = (slot: number) => {
    const buffer = slots[slot]!;
    if (fixed) r.prepReadFixed(fd, buffer, BLOCK, nextOffset(), 0, slot);
    else r.prepRead(fd, buffer, BLOCK, nextOffset(), slot);
    issued++;
  };
  const complete = (slot: number, result: number) => {
    check(result);
    done++;
    if (issued < BATCH) issue(slot);
  };
  for (let slot = 0; slot < depth; slot++) issue(slot);
  while (done < BATCH) {
    r.submit(1);
    r.reap(complete);
  }
}

const options = { group: "4k randread O_DIRECT, 1024 reads", n: 30, warmup: 3 };
const pread = c.pread;
const blockBig = BigInt(BLOCK);
Deno.bench({
  ...options,
  name: "pread QD1",
  baseline: true,
  fn: timed("pread QD1", () => {
    for (let i = 0; i < BATCH; i++) check(pread(fd, slots[0]!, blockBig, BigInt(nextOffset())));
  }),
});
Deno.bench({
  ...options,
  name: "io_uring QD1",
  fn: timed("io_uring QD1", () => ringBatch(ring, 1, false)),
});
Deno.bench({
  ...options,
  name: "io_uring QD32",
  fn: timed("io_uring QD32", () => ringBatch(ring, DEPTH, false)),
});
Deno.bench({
  ...options,
  name: "io_uring QD32, registered buffer",
  fn: timed("io_uring QD32, registered buffer", () => ringBatch(fixedRing, DEPTH, true)),
});

globalThis.addEventListener("unload", () => {
  ring.close();
  fixedRing.close();
  c.close(fd);
  memory.free();
  const load = Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
  console.log(`\nIOPS (4 KiB random O_DIRECT reads, 256 MiB file; load average ${load}):`);
  for (const [name, { reads, ms }] of totals) {
    if (ms > 0) console.log(`  ${name.padEnd(34)} ${Math.round(reads / ms * 1000)}`);
  }
});
