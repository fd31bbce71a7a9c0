/**
 * The main job until simulated guests exist: create a raw image, write a verified pattern through
 * the block layer, read it back, discard part of it, and show where the data lives.
 *
 * @module
 */
import { join } from "node:path";
import { createImage, openImage } from "../../formats/open.ts";
import { type CliIo, EXIT_ERROR, EXIT_OK, main } from "./main.ts";

const IMAGE_SIZE = 64 << 20;
const BLOCK = 4096;
const OPS = 16384;

/** A fixed-seed xorshift32, printed so a run can be repeated. */
function xorshift(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return s >>> 0;
  };
}

/** Fill `buf` with a pattern that names its block, so a misplaced block is caught. */
function stamp(buf: Uint8Array, block: number): void {
  for (let i = 0; i < buf.length; i += 4) {
    const v = (block * 2654435761 + i) >>> 0;
    buf[i] = v & 0xff;
    buf[i + 1] = (v >>> 8) & 0xff;
    buf[i + 2] = (v >>> 16) & 0xff;
    buf[i + 3] = v >>> 24;
  }
}

/** qcow2: a base with a snapshot, a clone over it, writes in the clone, a check of both. */
async function qcow2Part(dir: string, io: CliIo): Promise<number> {
  const base = join(dir, "base.qcow2"), clone = join(dir, "clone.qcow2");
  await createImage(base, "qcow2", IMAGE_SIZE);
  let node = await openImage(base);
  const buf = new Uint8Array(1 << 20);
  for (let mib = 0; mib < 8; mib++) {
    stamp(buf, mib);
    await node.write(mib << 20, buf);
  }
  await node.close();
  const snap = await main(["snapshot", "-c", "installed", base], quiet);
  await createImage(clone, "qcow2", IMAGE_SIZE, {
    backingFile: "base.qcow2",
    backingFormat: "qcow2",
  });
  node = await openImage(clone);
  stamp(buf, 100);
  await node.write(3 << 20, buf.subarray(0, 4096));
  const back = new Uint8Array(4096), want = new Uint8Array(4096);
  let bad = 0;
  await node.read(3 << 20, back);
  stamp(want, 100);
  if (!back.every((b, i) => b === want[i])) bad++;
  await node.read(5 << 20, back);
  stamp(buf, 5);
  if (!back.every((b, i) => b === buf[i])) bad++;
  await node.close();
  let report = "";
  const checks = await Promise.all(
    [base, clone].map((f) => main(["check", f], { stdout: (t) => report += t, stderr: () => {} })),
  );
  io.stdout(
    `qcow2: base with 8 MiB written and snapshot 'installed' (exit ${snap}), clone over it with ` +
      `4 KiB rewritten: reads ${bad === 0 ? "verified" : "MISMATCHED"}; check: ${
        checks.every((c) => c === 0) ? "both clean" : "PROBLEMS"
      }\n`,
  );
  return bad + checks.filter((c) => c !== 0).length + (snap === 0 ? 0 : 1);
}

const quiet: CliIo = { stdout: () => {}, stderr: () => {} };

/** The demo verb: `vstor demo [DIR]`; returns the exit code. */
export async function demoMain(args: string[], io: CliIo): Promise<number> {
  const seed = 0x5eed;
  const dir = args[0] ?? await Deno.makeTempDir({ prefix: "vstor_demo_" });
  const keep = args[0] !== undefined;
  const path = join(dir, "demo.raw");
  try {
    await createImage(path, "raw", IMAGE_SIZE);
    io.stdout(`Created ${path}: raw, ${IMAGE_SIZE >> 20} MiB (sparse)\n`);
    const node = await openImage(path, { format: "raw" });
    const rand = xorshift(seed);
    const blocks = IMAGE_SIZE / BLOCK;
    const written = new Set<number>();
    const buf = new Uint8Array(BLOCK);
    let t = performance.now();
    for (let i = 0; i < OPS; i++) {
      const block = rand() % blocks;
      stamp(buf, block);
      await node.write(block * BLOCK, buf);
      written.add(block);
    }
    await node.flush();
    const writeMs = performance.now() - t;
    io.stdout(
      `Wrote ${OPS} random 4 KiB blocks (seed 0x${seed.toString(16)}) in ${
        writeMs.toFixed(0)
      } ms: ` +
        `${Math.round(OPS / writeMs * 1000).toLocaleString("en-US")} IOPS\n`,
    );
    const want = new Uint8Array(BLOCK);
    let bad = 0;
    t = performance.now();
    for (const block of written) {
      await node.read(block * BLOCK, buf);
      stamp(want, block);
      for (let i = 0; i < BLOCK; i++) {
        if (buf[i] !== want[i]) {
          bad++;
          break;
        }
      }
    }
    const readMs = performance.now() - t;
    io.stdout(
      `Read back ${written.size} distinct blocks in ${readMs.toFixed(0)} ms: ` +
        `${Math.round(written.size / readMs * 1000).toLocaleString("en-US")} IOPS, ` +
        `${bad === 0 ? "all verified" : `${bad} MISMATCHED`}\n`,
    );
    await node.discard(0, IMAGE_SIZE / 2);
    let data = 0, holes = 0;
    for (let at = 0; at < IMAGE_SIZE;) {
      const e = await node.blockStatus(at, IMAGE_SIZE - at);
      if (e.kind === "data") data += e.length;
      else holes += e.length;
      at += e.length;
    }
    io.stdout(
      `Discarded the first half: ${(data / 1048576).toFixed(1)} MiB data, ` +
        `${(holes / 1048576).toFixed(1)} MiB holes; ${
          (node.allocatedSize!() / 1048576).toFixed(1)
        } MiB allocated on the host\n`,
    );
    await node.close();
    const qcow2Bad = await qcow2Part(dir, io);
    return bad === 0 && qcow2Bad === 0 ? EXIT_OK : EXIT_ERROR;
  } finally {
    if (!keep) await Deno.remove(dir, { recursive: true });
  }
}
