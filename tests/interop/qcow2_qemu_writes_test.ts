/**
 * qcow2 images QEMU makes (qemu-img create / convert -c) and writes (qemu-io) must read back in
 * vstor byte for byte: every guest byte vstor reads is compared with `qemu-img convert -O raw`.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { openImage } from "../../formats/open.ts";
import { ignoreWithout, runTool } from "./qemu.ts";
import {
  applyToModel,
  assertCheckClean,
  assertSameBytes,
  createOptions,
  imageSizeFor,
  KiB,
  MiB,
  pairwiseConfigs,
  prng,
  qemuIoCommands,
  randomBytes,
  readWithVstor,
  withTempDir,
  workload,
} from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

async function qemuImg(...args: string[]): Promise<string> {
  const r = await runTool("qemu-img", args);
  assert.equal(r.code, 0, `qemu-img ${args.join(" ")}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** Run qemu-io commands on an image; returns its exit code and output. */
async function qemuIo(image: string, commands: string[]): Promise<{ code: number; out: string }> {
  const r = await runTool("qemu-io", ["-f", "qcow2", ...commands.flatMap((c) => ["-c", c]), image]);
  return { code: r.code, out: r.stdout + r.stderr };
}

/** The guest bytes as QEMU sees them: `qemu-img convert -O raw`. */
async function qemuBytes(image: string, dir: string): Promise<Uint8Array> {
  const raw = join(dir, "converted.raw");
  await qemuImg("convert", "-f", "qcow2", "-O", "raw", image, raw);
  return await Deno.readFile(raw);
}

/** Assert vstor reads exactly what qemu-img convert produces. */
async function assertVstorReadsAsQemu(image: string, dir: string): Promise<Uint8Array> {
  const expected = await qemuBytes(image, dir);
  assertSameBytes(await readWithVstor(image), expected, `vstor's read of ${image}`);
  return expected;
}

/** Guest clusters `qemu-img map` reports as compressed (data with no host offset). */
async function qemuCompressedClusters(image: string, clusterSize: number): Promise<number[]> {
  const map = JSON.parse(await qemuImg("map", "--output=json", "-f", "qcow2", image)) as Array<
    { start: number; length: number; data: boolean; offset?: number }
  >;
  const clusters: number[] = [];
  for (const e of map) {
    if (!e.data || e.offset !== undefined) continue;
    for (let at = e.start; at < e.start + e.length; at += clusterSize) {
      clusters.push(Math.floor(at / clusterSize));
    }
  }
  return clusters;
}

/** Guest clusters vstor's blockStatus reports as compressed. */
async function vstorCompressedClusters(image: string, clusterSize: number): Promise<number[]> {
  const node = await openImage(image, { format: "qcow2", readOnly: true });
  try {
    const clusters: number[] = [];
    for (let at = 0; at < node.size;) {
      const extent = await node.blockStatus(at, node.size - at);
      assert.ok(extent.length > 0, `blockStatus(${at}) made no progress`);
      if (extent.kind === "compressed") {
        for (let c = at; c < at + extent.length; c += clusterSize) {
          clusters.push(Math.floor(c / clusterSize));
        }
      }
      at += extent.length;
    }
    return clusters;
  } finally {
    await node.close();
  }
}

/** VSTOR_QCOW2_SEED replaces the fixed seeds (exploring); the seed is in each test name. */
const seedOverride = Deno.env.get("VSTOR_QCOW2_SEED");

for (const [index, config] of pairwiseConfigs().entries()) {
  const seed = seedOverride === undefined ? 0x9e30 + index : Number(seedOverride) + index;
  Deno.test({
    name: `vstor reads a qcow2 image qemu-io wrote exactly as qemu-img convert does ` +
      `(${createOptions(config)}, seed ${seed})`,
    ignore,
    async fn() {
      await withTempDir("vstor_qcow2_qemu_", async (dir) => {
        const image = join(dir, "image.qcow2");
        const size = imageSizeFor(config.clusterSize);
        await qemuImg("create", "-q", "-f", "qcow2", "-o", createOptions(config), image, `${size}`);
        const ops = workload(config, size, seed);
        let sources = 0;
        const commands = await qemuIoCommands(ops, async (data) => {
          const path = join(dir, `source${sources++}`);
          await Deno.writeFile(path, data);
          return path;
        });
        const io = await qemuIo(image, commands);
        // Compression never overwrites: QEMU fails compressed writes to preallocated clusters,
        // except of data that does not compress, which it writes normally.
        const refused = ops.filter((op) => op.op === "compress" && "pattern" in op.fill).length;
        const failures = io.out.match(/write failed: Input\/output error/g)?.length ?? 0;
        assert.equal(failures, config.preallocation === "off" ? 0 : refused, io.out);
        assert.equal(io.code, failures === 0 ? 0 : 1, io.out);
        await assertCheckClean(image, `qemu's image (${createOptions(config)})`);

        const qemu = await assertVstorReadsAsQemu(image, dir);
        // The workload's model must agree with QEMU too (it is what the vstor-writes test uses).
        const model = new Uint8Array(size);
        for (const op of ops) {
          if (op.op !== "compress" || config.preallocation === "off" || "seed" in op.fill) {
            applyToModel(model, op, config.clusterSize);
          }
        }
        assertSameBytes(qemu, model, "qemu-img convert vs the workload model");
        assert.deepEqual(
          await vstorCompressedClusters(image, config.clusterSize),
          await qemuCompressedClusters(image, config.clusterSize),
          "compressed clusters per vstor blockStatus vs qemu-img map",
        );
      });
    },
  });
}

/** A raw source with runs compression likes and runs it cannot shrink. */
function mixedContent(size: number, clusterSize: number, seed: number): Uint8Array {
  const data = new Uint8Array(size);
  const next = prng(seed);
  const text = new TextEncoder().encode("qcow2 compressed cluster test line, repeated. ");
  for (let at = 0; at < size; at += clusterSize) {
    const end = Math.min(size, at + clusterSize);
    switch (Math.floor(next() * 5)) {
      case 0: // zeroes: convert leaves these unallocated
        break;
      case 1:
        data.fill(1 + Math.floor(next() * 255), at, end);
        break;
      case 2:
        for (let i = at; i < end; i++) data[i] = text[(i - at) % text.length]!;
        break;
      case 3:
        data.set(randomBytes(seed + at, end - at), at);
        break;
      default: // half random, half zero: compresses a little
        data.set(randomBytes(seed + at + 1, Math.floor((end - at) / 2)), at);
    }
  }
  return data;
}

Deno.test({
  name: "vstor reads images qemu-img convert -c compressed with deflate and zstd",
  ignore,
  async fn() {
    const cases: Array<{ type: "zlib" | "zstd"; clusterSize: number; extendedL2: boolean }> = [
      { type: "zlib", clusterSize: 4 * KiB, extendedL2: false },
      { type: "zlib", clusterSize: 64 * KiB, extendedL2: false },
      { type: "zlib", clusterSize: 2 * MiB, extendedL2: false },
      { type: "zlib", clusterSize: 512, extendedL2: false },
      { type: "zstd", clusterSize: 4 * KiB, extendedL2: false },
      { type: "zstd", clusterSize: 64 * KiB, extendedL2: true },
      { type: "zstd", clusterSize: 2 * MiB, extendedL2: false },
      { type: "zstd", clusterSize: 512, extendedL2: false },
    ];
    for (const [index, c] of cases.entries()) {
      await withTempDir("vstor_qcow2_convert_", async (dir) => {
        const source = join(dir, "source.raw");
        const image = join(dir, "image.qcow2");
        // Not a whole number of clusters: the last compressed cluster is a partial one.
        const size = Math.max(2 * MiB, 4 * c.clusterSize) + 3 * 512;
        const data = mixedContent(size, c.clusterSize, 0xc0 + index);
        await Deno.writeFile(source, data);
        const opts = `compression_type=${c.type},cluster_size=${c.clusterSize},` +
          `extended_l2=${c.extendedL2 ? "on" : "off"}`;
        await qemuImg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, source, image);
        const compressed = await qemuCompressedClusters(image, c.clusterSize);
        assert.ok(compressed.length > 0, `${opts}: nothing was compressed`);
        const bytes = await readWithVstor(image);
        assertSameBytes(bytes, data, `${opts}: vstor's read vs the source`);
        assert.deepEqual(
          await vstorCompressedClusters(image, c.clusterSize),
          compressed,
          `${opts}: compressed clusters per vstor blockStatus vs qemu-img map`,
        );
      });
    }
  },
});

Deno.test({
  name: "vstor reads extended-L2 images qemu-io wrote subcluster by subcluster",
  ignore,
  async fn() {
    for (const clusterSize of [32 * KiB, 64 * KiB, 2 * MiB]) {
      await withTempDir("vstor_qcow2_subcluster_", async (dir) => {
        const image = join(dir, "image.qcow2");
        const sc = clusterSize / 32;
        const size = 8 * clusterSize;
        const opts = `extended_l2=on,cluster_size=${clusterSize},compression_type=zstd`;
        await qemuImg("create", "-q", "-f", "qcow2", "-o", opts, image, `${size}`);
        const c = (n: number) => n * clusterSize;
        const commands = [
          // Cluster 0: single subclusters, a partial one, a run crossing subclusters.
          `write -P 0x11 ${c(0)} ${sc}`,
          `write -P 0x12 ${c(0) + 5 * sc} ${sc}`,
          `write -P 0x13 ${c(0) + 9 * sc + 100} 300`,
          `write -P 0x14 ${c(0) + 12 * sc - 7} ${3 * sc + 14}`,
          `write -P 0x15 ${c(0) + 31 * sc} ${sc}`,
          // Cluster 1: all data, then zero subclusters with and without unmap.
          `write -P 0x21 ${c(1)} ${clusterSize}`,
          `write -z ${c(1) + 2 * sc} ${sc}`,
          `write -z -u ${c(1) + 4 * sc} ${2 * sc}`,
          `write -z ${c(1) + 10 * sc + 10} 20`,
          // Cluster 2: zero subclusters on nothing, then data inside a zeroed one.
          `write -z ${c(2) + 3 * sc} ${4 * sc}`,
          `write -P 0x22 ${c(2) + 4 * sc + 8} 16`,
          // Clusters 3-4: a write across the cluster boundary, mid-subcluster at both ends.
          `write -P 0x33 ${c(4) - 3 * sc - 99} ${6 * sc + 200}`,
          // Cluster 5: compressed, then one subcluster rewritten (the cluster becomes normal).
          `write -c -P 0x55 ${c(5)} ${clusterSize}`,
          `write -P 0x56 ${c(5) + 17 * sc} ${sc}`,
          // Cluster 6: compressed and left so; cluster 7: written, then discarded.
          `write -c -P 0x66 ${c(6)} ${clusterSize}`,
          `write -P 0x77 ${c(7)} ${clusterSize}`,
          `discard ${c(7)} ${clusterSize}`,
          `write -P 0x78 ${c(7) + sc} ${sc}`,
        ];
        const io = await qemuIo(image, commands);
        assert.equal(io.code, 0, io.out);
        await assertCheckClean(image, `qemu's image (${opts})`);
        await assertVstorReadsAsQemu(image, dir);
        assert.deepEqual(
          await vstorCompressedClusters(image, clusterSize),
          await qemuCompressedClusters(image, clusterSize),
          `${opts}: compressed clusters per vstor blockStatus vs qemu-img map`,
        );
      });
    }
  },
});
