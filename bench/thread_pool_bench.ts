/**
 * aio=threads (the pool of Workers) against the synchronous pread and aio=io_uring, through the
 * host file's readAtAsync: 4 KiB random O_DIRECT reads of a 256 MiB file in /var/tmp (the disk,
 * not the page cache), at queue depth 1 and 32. Every iteration is the same 1024 reads, so the
 * columns compare directly; IOPS are printed at the end.
 * `deno bench -A bench/thread_pool_bench.ts`.
 */
import { join } from "node:path";
import { openHostFile } from "../src/host/file.ts";
import type { HostFile } from "../src/host/host_file.ts";
import { AlignedBuffer } from "../src/sys/direct.ts";

const FILE_SIZE = 256 << 20;
const BLOCK = 4096;
const BLOCKS = FILE_SIZE / BLOCK;
/** Reads per bench iteration. */
const BATCH = 1024;
const DEPTH = 32;

const dir = Deno.makeTempDirSync({ dir: "/var/tmp", prefix: "vstor_pool_bench_" });
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

const open = (aio?: "threads" | "io_uring") =>
  openHostFile(path, { readOnly: true, direct: true, lock: false, ...(aio ? { aio } : {}) });
const sync = open();
const pool = open("threads");
let uring: HostFile | undefined;
try {
  uring = open("io_uring");
} catch {
  // No io_uring here: its rows are left out.
}
const memory = new AlignedBuffer(DEPTH * BLOCK);
const slots = Array.from(
  { length: DEPTH },
  (_, i) => memory.bytes.subarray(i * BLOCK, (i + 1) * BLOCK),
);

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
function timed(name: string, run: () => Promise<void>): () => Promise<void> {
  totals.set(name, { reads: 0, ms: 0 });
  return async () => {
    const t = performance.now();
    await run();
    const total = totals.get(name)!;
    total.ms += performance.now() - t;
    total.reads += BATCH;
  };
}

/** BATCH reads through `file.readAtAsync`, `depth` lanes each issuing its next when one ends. */
async function batch(file: HostFile, depth: number): Promise<void> {
  let issued = 0;
  const lane = async (slot: number) => {
    while (issued < BATCH) {
      issued++;
      await file.readAtAsync!(nextOffset(), slots[slot]!);
    }
  };
  await Promise.all(Array.from({ length: depth }, (_, i) => lane(i)));
}

const options = { group: "4k randread O_DIRECT, 1024 reads", n: 30, warmup: 3 };
Deno.bench({
  ...options,
  name: "sync pread QD1",
  baseline: true,
  fn: timed("sync pread QD1", () => batch(sync, 1)),
});
for (const depth of [1, DEPTH]) {
  const name = `aio=threads QD${depth}`;
  Deno.bench({ ...options, name, fn: timed(name, () => batch(pool, depth)) });
}
if (uring !== undefined) {
  for (const depth of [1, DEPTH]) {
    const name = `aio=io_uring QD${depth}`;
    Deno.bench({ ...options, name, fn: timed(name, () => batch(uring, depth)) });
  }
}

globalThis.addEventListener("unload", () => {
  sync.close();
  pool.close();
  uring?.close();
  memory.free();
  const load = Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
  console.log(`\nIOPS (4 KiB random O_DIRECT reads, 256 MiB file; load average ${load}):`);
  for (const [name, { reads, ms }] of totals) {
    if (ms > 0) console.log(`  ${name.padEnd(34)} ${Math.round(reads / ms * 1000)}`);
  }
});
