/**
 * Host adapter and raw node I/O paths: 4 KiB random reads and writes, 64 KiB sequential, on a
 * 256 MiB file in the page cache. `deno task bench` (or `deno bench -A bench/host_bench.ts`).
 */
import { join } from "node:path";
import { openHostFile } from "../src/host/file.ts";
import { MemoryFile } from "../src/host/memory.ts";
import { RawNode } from "../formats/raw.ts";

const FILE_SIZE = 256 << 20;
const dir = Deno.makeTempDirSync({ prefix: "vstor_bench_" });
const path = join(dir, "bench.img");
{
  const f = openHostFile(path, { create: true, lock: false });
  const chunk = new Uint8Array(1 << 20).fill(0x5a);
  for (let at = 0; at < FILE_SIZE; at += chunk.length) f.writeAt(at, chunk);
  f.close();
}
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

const file = openHostFile(path, { lock: false });
const node = await RawNode.open(openHostFile(path, { lock: false }));
const mem = new MemoryFile("mem", new Uint8Array(FILE_SIZE));

// A fixed-seed xorshift so every run touches the same blocks.
let seed = 0x9e3779b9;
function nextBlock(blocks: number): number {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) % blocks;
}
const blocks4k = FILE_SIZE / 4096;
const buf4k = new Uint8Array(4096);
const buf64k = new Uint8Array(65536);
let seq = 0;

Deno.bench({ group: "4k randread", name: "file adapter pread", baseline: true }, () => {
  file.readAt(nextBlock(blocks4k) * 4096, buf4k);
});
Deno.bench({ group: "4k randread", name: "raw node over file" }, async () => {
  await node.read(nextBlock(blocks4k) * 4096, buf4k);
});
Deno.bench({ group: "4k randread", name: "memory adapter" }, () => {
  mem.readAt(nextBlock(blocks4k) * 4096, buf4k);
});

Deno.bench({ group: "4k randwrite", name: "file adapter pwrite", baseline: true }, () => {
  file.writeAt(nextBlock(blocks4k) * 4096, buf4k);
});
Deno.bench({ group: "4k randwrite", name: "raw node over file" }, async () => {
  await node.write(nextBlock(blocks4k) * 4096, buf4k);
});

Deno.bench({ group: "64k seqread", name: "file adapter pread", baseline: true }, () => {
  file.readAt(seq, buf64k);
  seq = (seq + 65536) % FILE_SIZE;
});
Deno.bench({ group: "64k seqread", name: "raw node over file" }, async () => {
  await node.read(seq, buf64k);
  seq = (seq + 65536) % FILE_SIZE;
});
Deno.bench({ group: "64k seqwrite", name: "file adapter pwrite", baseline: true }, () => {
  file.writeAt(seq, buf64k);
  seq = (seq + 65536) % FILE_SIZE;
});
