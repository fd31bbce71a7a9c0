/**
 * Every cache mode (writeback, writethrough, unsafe, none, directsync) × every aio engine (the
 * default synchronous calls, `threads` given explicitly, `io_uring`), raw and qcow2: `vstor io`
 * writes a seeded mix of aligned and unaligned requests (many `aio_write`s in flight at once,
 * some sharing a 512-byte block), flushes and reads them back with `read -P`; qemu-io then reads
 * the same patterns from vstor's image, and `qemu-img compare` finds it identical to an image
 * qemu-io wrote with the same script.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ioMain } from "../../src/cli/io.ts";
import { mulberry32 } from "../prng.ts";
import { ignoreWithoutUring } from "../sys/uring_available.ts";
import { ignoreWithout, runTool } from "./qemu.ts";

const ignore = ignoreWithout("qemu-io") || ignoreWithout("qemu-img");
const CACHES = ["writeback", "writethrough", "unsafe", "none", "directsync"] as const;
const AIOS = ["default", "threads", "io_uring"] as const;
const SIZE = 4 << 20;
const SEED = 1620;

/** A write: its pattern byte and range; the ranges of one script are disjoint. */
interface Write {
  pattern: number;
  offset: number;
  length: number;
}

/** Disjoint writes: aligned, unaligned, some sharing a block with a neighbour, some long. */
function writes(seed: number): Write[] {
  const random = mulberry32(seed);
  const below = (n: number) => Math.floor(random() * n);
  const out: Write[] = [];
  for (let tries = 0; out.length < 48 && tries < 2000; tries++) {
    const kind = below(4);
    const length = kind === 0
      ? 4096 * (1 + below(8))
      : kind === 1
      ? 1 + below(1500)
      : kind === 2
      ? 1 + below(200)
      : 65536 + below(300_000);
    const offset = kind === 0 ? 4096 * below((SIZE - length) / 4096) : below(SIZE - length);
    if (out.some((w) => w.offset < offset + length && offset < w.offset + w.length)) continue;
    out.push({ pattern: 1 + (out.length * 37) % 254, offset, length });
  }
  // Two unaligned writes in one block, neither touching the other's bytes.
  const block = 4096 * below(SIZE / 4096);
  for (const w of [{ offset: block + 10, length: 100 }, { offset: block + 300, length: 50 }]) {
    if (!out.some((o) => o.offset < w.offset + w.length && w.offset < o.offset + o.length)) {
      out.push({ pattern: 0xaa + out.length % 16, ...w });
    }
  }
  return out;
}

/** The script: every write in flight at once (aio_write), then a flush, then sync writes. */
function writeScript(ws: Write[]): string[] {
  const half = Math.floor(ws.length * 3 / 4);
  return [
    ...ws.slice(0, half).map((w) => `aio_write -q -P ${w.pattern} ${w.offset} ${w.length}`),
    "aio_flush",
    ...ws.slice(half).map((w) => `write -q -P ${w.pattern} ${w.offset} ${w.length}`),
    "flush",
  ];
}

function readScript(ws: Write[]): string[] {
  return ws.map((w) => `read -q -P ${w.pattern} ${w.offset} ${w.length}`);
}

async function vstorIo(args: string[]): Promise<{ code: number; out: string }> {
  let out = "";
  const code = await ioMain(args, { stdout: (s) => out += s, stderr: (s) => out += s });
  return { code, out };
}

const cArgs = (commands: string[]) => commands.flatMap((c) => ["-c", c]);

Deno.test({
  name:
    `vstor io writes, flushes and reads back what qemu-io and qemu-img compare see, for every cache mode and aio engine (seed ${SEED})`,
  ignore,
  async fn() {
    console.log(`seed ${SEED}`);
    // On the root disk: tmpfs may refuse O_DIRECT.
    const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "vstor_cache_aio_" });
    try {
      const ws = writes(SEED);
      const script = cArgs([...writeScript(ws), ...readScript(ws)]);
      const verify = cArgs(readScript(ws));
      for (const format of ["raw", "qcow2"] as const) {
        // The reference: qemu-io's own bytes for the same script (its default engine).
        const reference = join(dir, `qemu.${format}`);
        assert.equal(
          (await runTool("qemu-img", ["create", "-q", "-f", format, reference, `${SIZE}`])).code,
          0,
        );
        const qemu = await runTool("qemu-io", ["-f", format, ...script, reference]);
        assert.deepEqual([qemu.code, qemu.stdout + qemu.stderr], [0, ""]);
        for (const cache of CACHES) {
          for (const aio of AIOS) {
            if (aio === "io_uring" && ignoreWithoutUring) continue;
            const what = `${format}, cache=${cache}, aio=${aio}`;
            const image = join(dir, `vstor.${format}`);
            await Deno.remove(image).catch(() => {});
            const created = await runTool("qemu-img", [
              "create",
              "-q",
              "-f",
              format,
              image,
              `${SIZE}`,
            ]);
            assert.equal(created.code, 0, created.stderr);
            const aioArgs = aio === "default" ? [] : ["-i", aio];
            const vstor = await vstorIo(["-f", format, "-t", cache, ...aioArgs, ...script, image]);
            assert.deepEqual([vstor.code, vstor.out], [0, ""], `vstor io, ${what}`);
            const read = await runTool("qemu-io", ["-r", "-f", format, ...verify, image]);
            assert.deepEqual([read.code, read.stdout + read.stderr], [0, ""], `qemu-io, ${what}`);
            const cmp = await runTool("qemu-img", [
              "compare",
              "-f",
              format,
              "-F",
              format,
              image,
              reference,
            ]);
            assert.equal(cmp.code, 0, `qemu-img compare, ${what}: ${cmp.stdout}${cmp.stderr}`);
            if (format === "raw") {
              const [a, b] = [await Deno.readFile(image), await Deno.readFile(reference)];
              assert.equal(a.length, b.length, `size, ${what}`);
            }
            const check = format === "qcow2"
              ? await runTool("qemu-img", ["check", "-q", image])
              : { code: 0, stdout: "", stderr: "" };
            assert.equal(check.code, 0, `qemu-img check, ${what}: ${check.stdout}${check.stderr}`);
          }
        }
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
