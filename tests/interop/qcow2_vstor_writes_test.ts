/**
 * qcow2 images vstor creates and writes must satisfy QEMU: `qemu-img check` finds no errors and no
 * leaks, and `qemu-img compare` finds the guest contents equal to a raw reference holding what the
 * same operations should leave. Creation options run through a pairwise selection of cluster size,
 * refcount width, compat level, extended L2, compression type and preallocation.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { openImage } from "../../formats/open.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import { isBlockError } from "../../src/errors.ts";
import { ignoreWithout } from "./qemu.ts";
import {
  applyToModel,
  assertCheckClean,
  assertCompareEqual,
  assertSameBytes,
  createOptions,
  describeOp,
  imageSizeFor,
  KiB,
  MiB,
  type Op,
  opData,
  pairwiseConfigs,
  type Qcow2Config,
  qemuIoCommands,
  readWithVstor,
  vstor,
  withTempDir,
  workload,
} from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img");

/** What became of the compressed writes of a run, and where vstor parted from QEMU. */
interface Outcome {
  compressed: number;
  /** Compressed writes refused with refcount_bits=1 (a refcount of 1 cannot share a cluster). */
  refused: string[];
  /** Compressed writes whose success or failure differs from what QEMU does. */
  divergences: string[];
}

/**
 * Apply `ops` to the image and to the model. Compressed writes follow QEMU: compression never
 * overwrites, so compressible data bound for a preallocated cluster fails (EIO), while data that
 * does not compress is written normally, wherever it goes. With refcount_bits=1 a compressed write
 * may be refused as unsupported. A compressed write that parts from QEMU is recorded, not thrown,
 * so the rest of the workload (and qemu-img check/compare) still runs.
 */
async function runOps(node: Qcow2Node, model: Uint8Array, ops: Op[], c: Qcow2Config) {
  const outcome: Outcome = { compressed: 0, refused: [], divergences: [] };
  for (const [index, op] of ops.entries()) {
    const what = `op #${index} ${describeOp(op)}`;
    try {
      switch (op.op) {
        case "write":
          await node.write(op.offset, opData(op));
          break;
        case "zero":
          await node.writeZeroes(op.offset, op.length, { unmap: op.unmap });
          break;
        case "discard":
          await node.discard(op.offset, op.length);
          break;
        case "flush":
          await node.flush();
          break;
        case "compress": {
          let error: unknown;
          try {
            await node.writeCompressed(op.offset, opData(op));
          } catch (e) {
            error = e;
          }
          const qemuSucceeds = c.preallocation === "off" || "seed" in op.fill;
          if (error === undefined) {
            if (!qemuSucceeds) {
              outcome.divergences.push(`${what}: succeeded; QEMU fails it (EIO)`);
            }
            outcome.compressed++;
            break;
          }
          if (!isBlockError(error)) throw error;
          if (qemuSucceeds) {
            const overflow = isBlockError(error, "unsupported") && /refcount/i.test(error.message);
            if (c.refcountBits === 1 && overflow) {
              outcome.refused.push(`${what}: ${error.message}`);
            } else {
              outcome.divergences.push(`${what}: failed (${error.message}); QEMU writes it`);
            }
          }
          await learnPartialCompressedWrite(node, model, op, c.clusterSize, what);
          continue;
        }
      }
    } catch (e) {
      throw new Error(`${what} failed: ${e instanceof Error ? e.message : String(e)}`, {
        cause: e,
      });
    }
    applyToModel(model, op, c.clusterSize);
    if (op.op !== "flush") {
      // The touched range (and a cluster either side) reads back as the model says.
      const from = Math.max(0, op.offset - c.clusterSize);
      const to = Math.min(node.size, op.offset + op.length + c.clusterSize);
      const got = new Uint8Array(to - from);
      await node.read(from, got);
      assertSameBytes(got, model.subarray(from, to), `read-back after ${what} (from ${from})`);
    }
  }
  return outcome;
}

/**
 * A refused multi-cluster compressed write may have stored its first clusters: each cluster must
 * read as either its old or its new contents, and the model learns which.
 */
async function learnPartialCompressedWrite(
  node: Qcow2Node,
  model: Uint8Array,
  op: Op & { op: "compress" },
  clusterSize: number,
  what: string,
): Promise<void> {
  const data = opData(op);
  for (let at = 0; at < op.length; at += clusterSize) {
    const got = new Uint8Array(Math.min(clusterSize, op.length - at));
    await node.read(op.offset + at, got);
    const fresh = data.subarray(at, at + got.length);
    if (got.every((b, i) => b === fresh[i])) {
      model.set(fresh, op.offset + at);
    } else {
      const old = model.subarray(op.offset + at, op.offset + at + got.length);
      assertSameBytes(got, old, `${what}: cluster at ${op.offset + at} after the refusal`);
    }
  }
}

/** Create with `vstor create`, run `ops` through the node, then check and compare with QEMU. */
async function writeAndVerify(
  c: Qcow2Config,
  size: number,
  ops: Op[],
  inspect?: (image: string) => Promise<void>,
): Promise<Outcome> {
  return await withTempDir("vstor_qcow2_writes_", async (dir) => {
    const image = join(dir, "image.qcow2");
    const reference = join(dir, "reference.raw");
    const created = await vstor(
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      createOptions(c),
      image,
      `${size}`,
    );
    assert.equal(created.code, 0, created.output);
    const node = await openImage(image, { format: "qcow2" });
    assert.ok(node instanceof Qcow2Node);
    const model = new Uint8Array(size);
    let outcome: Outcome;
    try {
      outcome = await runOps(node, model, ops, c);
    } finally {
      await node.close();
    }
    await assertCheckClean(image, `vstor's image (${createOptions(c)})`);
    await Deno.writeFile(reference, model);
    await assertCompareEqual(image, "qcow2", reference, "raw");
    assertSameBytes(await readWithVstor(image), model, "vstor's read of the closed image");
    await inspect?.(image);
    assert.deepEqual(outcome.divergences, [], "compressed writes that part from QEMU");
    return outcome;
  });
}

/** VSTOR_QCOW2_SEED replaces the fixed seeds (exploring); the seed is in each test name. */
const seedOverride = Deno.env.get("VSTOR_QCOW2_SEED");

for (const [index, config] of pairwiseConfigs().entries()) {
  const seed = seedOverride === undefined ? 0x51c0 + index : Number(seedOverride) + index;
  Deno.test({
    name: `a qcow2 image vstor writes passes qemu-img check and compare ` +
      `(${createOptions(config)}, seed ${seed})`,
    ignore,
    async fn() {
      const size = imageSizeFor(config.clusterSize);
      const outcome = await writeAndVerify(config, size, workload(config, size, seed));
      if (config.preallocation === "off" && config.refcountBits !== 1) {
        assert.equal(outcome.compressed, 4, "every compressed write went through");
      }
      assert.ok(outcome.compressed > 0 || config.preallocation !== "off", "no compressed write");
    },
  });
}

Deno.test({
  name: "compressed writes with refcount_bits=1 either take a fresh host cluster or are refused " +
    "as unsupported, leaving a clean image",
  ignore,
  async fn() {
    for (const clusterSize of [512, 64 * KiB]) {
      const config: Qcow2Config = {
        clusterSize,
        refcountBits: 1,
        compat: "1.1",
        extendedL2: false,
        compressionType: "zlib",
        preallocation: "off",
      };
      const ops: Op[] = [];
      for (let i = 0; i < 6; i++) {
        ops.push({
          op: "compress",
          offset: i * clusterSize,
          length: clusterSize,
          fill: { pattern: 0x10 + i },
        });
      }
      ops.push({ op: "write", offset: 0, length: 2 * clusterSize, fill: { pattern: 0x99 } });
      const outcome = await writeAndVerify(config, 4 * MiB, ops);
      // The first compressed cluster always fits a fresh host cluster.
      assert.ok(outcome.compressed >= 1, `cluster size ${clusterSize}: ${outcome.refused}`);
    }
  },
});

Deno.test({
  name: "compressed writes after the last compressed host cluster was freed never land in the " +
    "cluster it was reused as",
  ignore,
  async fn() {
    // QEMU 7.2 gets this wrong: it keeps appending compressed data at its old position after the
    // host cluster there was freed and reused (here as an L2 table, then as a data cluster).
    for (const clusterSize of [512, 64 * KiB]) {
      const config: Qcow2Config = {
        clusterSize,
        refcountBits: 16,
        compat: "1.1",
        extendedL2: false,
        compressionType: "zlib",
        preallocation: "off",
      };
      // With 512-byte clusters `far` has its own L2 table, so cluster 0 needs a new one.
      const far = clusterSize === 512 ? 192 * KiB : 32 * clusterSize;
      const ops: Op[] = [
        { op: "compress", offset: far, length: 2 * clusterSize, fill: { pattern: 0xd4 } },
        { op: "zero", offset: far, length: 2 * clusterSize, unmap: false },
        { op: "write", offset: 0, length: clusterSize, fill: { pattern: 0xa1 } },
        { op: "compress", offset: 9 * clusterSize, length: clusterSize, fill: { pattern: 0x3d } },
        { op: "discard", offset: 9 * clusterSize, length: clusterSize },
        { op: "write", offset: 3 * clusterSize, length: clusterSize, fill: { seed: 7 } },
        { op: "compress", offset: 10 * clusterSize, length: clusterSize, fill: { pattern: 0x3e } },
        { op: "compress", offset: 11 * clusterSize, length: clusterSize, fill: { pattern: 0x3f } },
      ];
      const outcome = await writeAndVerify(config, 4 * MiB, ops);
      assert.equal(outcome.compressed, 4);
    }
  },
});

Deno.test({
  name: "vstor grows the refcount table past its first cluster and qemu-img check agrees",
  ignore,
  async fn() {
    // 512-byte clusters: one table cluster holds 64 block offsets. With 64-bit refcounts a block
    // counts 64 clusters, so the first table cluster covers 2 MiB of host file; with 16-bit ones
    // 256 clusters, so 8 MiB. Writing past that makes the table move and grow.
    for (const refcountBits of [64, 16]) {
      const config: Qcow2Config = {
        clusterSize: 512,
        refcountBits,
        compat: "1.1",
        extendedL2: false,
        compressionType: "zlib",
        preallocation: "off",
      };
      const size = refcountBits === 64 ? 8 * MiB : 16 * MiB;
      const written = refcountBits === 64 ? 3 * MiB : 9 * MiB;
      const ops: Op[] = [];
      for (let at = 0, i = 0; at < written; at += 64 * KiB, i++) {
        ops.push({ op: "write", offset: at + 7, length: 64 * KiB - 7, fill: { seed: i } });
      }
      ops.push({ op: "discard", offset: 512 * KiB, length: 256 * KiB });
      ops.push({ op: "write", offset: size - 64 * KiB, length: 64 * KiB, fill: { pattern: 3 } });
      await writeAndVerify(config, size, ops, async (image) => {
        const header = new Uint8Array(64);
        const file = await Deno.open(image);
        try {
          await file.read(header);
        } finally {
          file.close();
        }
        const tableClusters = new DataView(header.buffer).getUint32(56);
        assert.ok(tableClusters > 1, `refcount_table_clusters is ${tableClusters}`);
      });
    }
  },
});

Deno.test({
  name: "a qcow2 image written through vstor io commands passes qemu-img check and compare",
  ignore,
  async fn() {
    const configs: Qcow2Config[] = [
      {
        clusterSize: 64 * KiB,
        refcountBits: 16,
        compat: "1.1",
        extendedL2: true,
        compressionType: "zstd",
        preallocation: "off",
      },
      {
        clusterSize: 512,
        refcountBits: 16,
        compat: "0.10",
        extendedL2: false,
        compressionType: "zlib",
        preallocation: "off",
      },
    ];
    for (const [index, config] of configs.entries()) {
      await withTempDir("vstor_qcow2_io_", async (dir) => {
        const image = join(dir, "image.qcow2");
        const reference = join(dir, "reference.raw");
        const size = imageSizeFor(config.clusterSize);
        const ops = workload(config, size, 0xc1 + index);
        let sources = 0;
        const commands = await qemuIoCommands(ops, async (data) => {
          const path = join(dir, `source${sources++}`);
          await Deno.writeFile(path, data);
          return path;
        });
        const opts = createOptions(config);
        const created = await vstor("create", "-q", "-f", "qcow2", "-o", opts, image, `${size}`);
        assert.equal(created.code, 0, created.output);
        const io = await vstor("io", "-f", "qcow2", ...commands.flatMap((c) => ["-c", c]), image);
        assert.equal(io.code, 0, `${opts}: vstor io failed:\n${io.output}`);
        const model = new Uint8Array(size);
        for (const op of ops) applyToModel(model, op, config.clusterSize);
        await assertCheckClean(image, opts);
        await Deno.writeFile(reference, model);
        await assertCompareEqual(image, "qcow2", reference, "raw");
      });
    }
  },
});
