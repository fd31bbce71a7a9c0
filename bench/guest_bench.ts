/**
 * The simulated guest against the ceiling: 4 KiB random reads at iodepth 32 through virtio-blk
 * from a page-cached raw image, the guest in its vCPU Worker and the device in its iothread
 * Worker, in each notification mode — EVENT_IDX on/off × ioeventfd on/off (trap) — and trap mode
 * at iodepth 1 without the iothread's polling (a notification per request both ways). Prints IOPS, the ratio against a direct
 * `BlockNode.read` loop over the same file in one thread (the ceiling), and kicks + interrupts
 * and exits per request.
 *
 *   deno run -A bench/guest_bench.ts [--size-mib=256] [--runtime=3] [--seed=1]
 *
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { openImage } from "../formats/open.ts";
import { runMachine } from "../src/cli/run_machine.ts";
import { summarizeVirtio } from "../src/guest/report.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    "size-mib": { type: "string", default: "256" },
    runtime: { type: "string", default: "3" },
    seed: { type: "string", default: "1" },
  },
});
const sizeMib = Number(values["size-mib"]), runtime = Number(values.runtime);
const seed = Number(values.seed);
if (![sizeMib, runtime, seed].every((n) => Number.isSafeInteger(n) && n > 0)) {
  console.error("guest_bench: --size-mib, --runtime and --seed must be whole numbers > 0");
  Deno.exit(2);
}
const MiB = 1024 * 1024, BLOCK = 4096;

/** Direct reads: the same random 4 KiB blocks through a raw BlockNode, one thread. */
async function direct(path: string, seconds: number): Promise<number> {
  const node = await openImage(path, { format: "raw", readOnly: true });
  try {
    const blocks = node.size / BLOCK;
    const buf = new Uint8Array(new SharedArrayBuffer(BLOCK));
    let x = seed >>> 0 || 1, ops = 0;
    const end = performance.now() + seconds * 1000;
    const start = performance.now();
    while (performance.now() < end) {
      for (let i = 0; i < 1024; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        await node.read(((x >>> 0) % blocks) * BLOCK, buf);
      }
      ops += 1024;
    }
    return ops / ((performance.now() - start) / 1000);
  } finally {
    await node.close();
  }
}

const dir = await Deno.makeTempDir({ prefix: "vstor_guest_bench_" });
try {
  const image = join(dir, "disk.raw");
  {
    // Real data, so reads come from the page cache rather than holes.
    const f = await Deno.open(image, { create: true, write: true });
    const chunk = new Uint8Array(MiB);
    for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131 + 7) & 0xff;
    for (let m = 0; m < sizeMib; m++) await f.write(chunk);
    f.close();
  }
  const ceiling = await direct(image, Math.min(runtime, 3));
  const job = (depth: number) => ({
    args: [
      "--name=randread",
      "--rw=randread",
      "--bs=4k",
      `--iodepth=${depth}`,
      `--runtime=${runtime}`,
      "--time_based",
      `--seed=${seed}`,
    ],
  });
  const modes = [
    { label: "event-idx on, ioeventfd", eventIdx: true, ioeventfd: true, depth: 32 },
    { label: "event-idx off, ioeventfd", eventIdx: false, ioeventfd: true, depth: 32 },
    { label: "event-idx on, trap", eventIdx: true, ioeventfd: false, depth: 32 },
    { label: "event-idx off, trap", eventIdx: false, ioeventfd: false, depth: 32 },
    {
      label: "trap, no polling, iodepth 1 (notify per request)",
      eventIdx: false,
      ioeventfd: false,
      depth: 1,
      poll: false,
    },
  ];
  const rows = [["mode", "IOPS", "of ceiling", "kicks+irqs/req", "exits/req", "req/kick"]];
  for (const m of modes) {
    const { run } = await runMachine({
      memoryMiB: 128,
      devices: [{
        type: "virtio-blk",
        id: "disk",
        eventIdx: m.eventIdx,
        ioeventfd: m.ioeventfd,
        poll: "poll" in m ? m.poll : true,
        drive: { file: image, format: "raw", readOnly: true },
      }],
    }, job(m.depth));
    const v = summarizeVirtio(run.virtio);
    const iops = run.result.total.read.iops;
    rows.push([
      m.label,
      Math.round(iops).toLocaleString("en-US"),
      (iops / ceiling).toFixed(2),
      (v.kicksPerRequest + v.interruptsPerRequest).toFixed(3),
      v.exitsPerRequest === null ? "-" : v.exitsPerRequest.toFixed(3),
      v.averageBatch.toFixed(1),
    ]);
  }
  console.log(
    `4 KiB random reads, ${sizeMib} MiB page-cached raw image, ${runtime} s per mode, seed ${seed}; ` +
      `deno ${Deno.version.deno}, ${navigator.hardwareConcurrency} CPUs\n` +
      `ceiling (direct BlockNode.read loop, one thread): ${
        Math.round(ceiling).toLocaleString("en-US")
      } IOPS\n`,
  );
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  for (const r of rows) {
    console.log(
      r.map((cell, c) => c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!)).join("  "),
    );
  }
} finally {
  await Deno.remove(dir, { recursive: true });
}
