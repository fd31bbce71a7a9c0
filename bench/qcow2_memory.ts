/**
 * Memory over a large sparse image: random 4 KiB writes then reads across a 1 TiB qcow2, printing
 * the metadata cache budget and the process's peak RSS, sampled as it runs.
 *
 *   deno run -A bench/qcow2_memory.ts [--ops=100000] [--l2-cache-size=BYTES]
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { createImage, openImage } from "../formats/open.ts";
import type { Qcow2Node } from "../formats/qcow2/qcow2.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: { ops: { type: "string", default: "100000" }, "l2-cache-size": { type: "string" } },
});
const ops = Number(values.ops);
const l2 = values["l2-cache-size"] === undefined ? undefined : Number(values["l2-cache-size"]);
if (!Number.isSafeInteger(ops) || ops < 1 || (l2 !== undefined && !Number.isSafeInteger(l2))) {
  console.error("qcow2_memory: --ops and --l2-cache-size take whole numbers");
  Deno.exit(2);
}

const SIZE = 2 ** 40;
const dir = Deno.makeTempDirSync({ prefix: "vstor_mem_" });
const path = join(dir, "sparse.qcow2");
await createImage(path, "qcow2", SIZE);
const node = await openImage(path, {
  format: "qcow2",
  cache: "unsafe",
  ...(l2 === undefined ? {} : { l2CacheSize: l2 }),
}) as Qcow2Node;
const mib = (n: number) => (n / 1048576).toFixed(1);
const baseline = Deno.memoryUsage().rss;
let peak = baseline;
let seed = 0x1234567;
const next = () => {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return seed >>> 0;
};
const buf = new Uint8Array(4096).fill(0x5a);
const blocks = SIZE / 4096;
const t0 = performance.now();
for (let phase = 0; phase < 2; phase++) {
  seed = 0x1234567;
  for (let i = 0; i < ops; i++) {
    const off = ((next() * 65536 + (next() & 0xffff)) % blocks) * 4096;
    if (phase === 0) await node.write(off, buf);
    else await node.read(off, buf);
    if (i % 5000 === 0) peak = Math.max(peak, Deno.memoryUsage().rss);
  }
}
const seconds = (performance.now() - t0) / 1000;
peak = Math.max(peak, Deno.memoryUsage().rss);
console.log(`1 TiB qcow2, ${ops} random 4 KiB writes then ${ops} reads in ${seconds.toFixed(1)} s`);
console.log(
  `L2 cache budget ${mib(node.l2Cache.capacity * node.clusterSize)} MiB (holding ${
    mib(node.l2Cache.bytes)
  } MiB), ` +
    `refcount cache ${mib(node.refcounts.cache.capacity * node.clusterSize)} MiB`,
);
console.log(
  `RSS: ${mib(baseline)} MiB after open, peak ${mib(peak)} MiB (+${mib(peak - baseline)} MiB)`,
);
await node.close();
Deno.removeSync(dir, { recursive: true });
