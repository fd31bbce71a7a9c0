/**
 * Side by side with fio on the same file: 4 KiB random read/write and 64 KiB sequential
 * read/write, synchronous positional I/O (fio's psync engine) on a file in the page cache.
 * Prints IOPS for both and the ratio vstor/fio.
 *
 *   deno run -A bench/compare_fio.ts [--seconds=3] [--size-mib=256]
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { openHostFile } from "../src/host/file.ts";
import { RawNode } from "../formats/raw.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    seconds: { type: "string", default: "3" },
    "size-mib": { type: "string", default: "256" },
  },
});
const seconds = Number(values.seconds);
const size = Number(values["size-mib"]) * 1024 * 1024;
if (!(seconds > 0) || !(size > 0) || size % 65536 !== 0) {
  console.error("compare_fio: --seconds must be > 0 and --size-mib a positive whole number");
  Deno.exit(2);
}

const dir = Deno.makeTempDirSync({ prefix: "vstor_fio_" });
const path = join(dir, "fio.img");
{
  const f = openHostFile(path, { create: true, lock: false });
  const chunk = new Uint8Array(1 << 20).fill(0x5a);
  for (let at = 0; at < size; at += chunk.length) f.writeAt(at, chunk);
  f.close();
}

type Rw = "randread" | "randwrite" | "read" | "write";

async function vstorIops(rw: Rw, bs: number): Promise<number> {
  const node = await RawNode.open(openHostFile(path, { lock: false }));
  const buf = new Uint8Array(bs).fill(0xa5);
  const blocks = size / bs;
  let seed = 0x2545f491;
  let seq = 0;
  let ops = 0;
  const random = rw.startsWith("rand");
  const write = rw.endsWith("write");
  const start = performance.now();
  const deadline = start + seconds * 1000;
  let now = start;
  while (now < deadline) {
    for (let i = 0; i < 1024; i++) {
      let block: number;
      if (random) {
        seed ^= seed << 13;
        seed ^= seed >>> 17;
        seed ^= seed << 5;
        block = (seed >>> 0) % blocks;
      } else {
        block = seq;
        seq = (seq + 1) % blocks;
      }
      if (write) await node.write(block * bs, buf);
      else await node.read(block * bs, buf);
    }
    ops += 1024;
    now = performance.now();
  }
  await node.close();
  return ops / ((now - start) / 1000);
}

function fioIops(rw: Rw, bs: number): number | undefined {
  try {
    const out = new Deno.Command("fio", {
      args: [
        "--name=vstor-compare",
        `--filename=${path}`,
        `--rw=${rw}`,
        `--bs=${bs}`,
        "--ioengine=psync",
        "--invalidate=0",
        `--size=${size}`,
        `--runtime=${seconds}`,
        "--time_based",
        "--output-format=json",
      ],
      stdout: "piped",
      stderr: "null",
    }).outputSync();
    if (!out.success) return undefined;
    const job = JSON.parse(new TextDecoder().decode(out.stdout)).jobs[0];
    return rw.endsWith("write") ? job.write.iops : job.read.iops;
  } catch {
    return undefined;
  }
}

const fmt = (n: number) => Math.round(n).toLocaleString("en-US");
console.log(`file ${size >> 20} MiB in the page cache, ${seconds} s per run, psync`);
console.log("workload        vstor IOPS     fio IOPS   vstor/fio");
for (
  const [rw, bs] of [["randread", 4096], ["randwrite", 4096], ["read", 65536], [
    "write",
    65536,
  ]] as const
) {
  const ours = await vstorIops(rw, bs);
  const theirs = fioIops(rw, bs);
  const name = `${rw} ${bs / 1024}k`.padEnd(14);
  const ratio = theirs === undefined ? "(no fio)" : (ours / theirs).toFixed(2);
  console.log(
    `${name} ${fmt(ours).padStart(11)}  ${
      theirs === undefined ? "-".padStart(11) : fmt(theirs).padStart(11)
    }   ${ratio}`,
  );
}
Deno.removeSync(dir, { recursive: true });
