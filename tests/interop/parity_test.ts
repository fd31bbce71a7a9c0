/**
 * qemu-img parity over a corpus of images qemu-img and qemu-io make: `vstor info`, `map` and
 * `check` print what qemu-img prints, human and JSON (JSON compared as objects).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";
import { ignoreWithout, runTool } from "./qemu.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

async function vstor(args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

async function q(tool: string, ...args: string[]): Promise<void> {
  const r = await runTool(tool, args);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")}: ${r.stderr}`);
}

/** The corpus: name → how to make it (in `dir`, with relative backing names). */
const corpus: Array<[string, (dir: string) => Promise<string>]> = [
  ["raw with holes", async (dir) => {
    const p = join(dir, "a.raw");
    await q("qemu-img", "create", "-q", "-f", "raw", p, "4M");
    await q("qemu-io", "-f", "raw", "-c", "write -P 1 64k 64k", "-c", "write -P 0 1M 64k", p);
    return p;
  }],
  ...[512, 4096, 65536, 2097152].flatMap((cs) =>
    (["0.10", "1.1"] as const).map((compat): [string, (dir: string) => Promise<string>] => [
      `qcow2 compat=${compat} cluster_size=${cs}`,
      async (dir) => {
        const p = join(dir, `c${cs}_${compat}.qcow2`);
        await q(
          "qemu-img",
          "create",
          "-q",
          "-f",
          "qcow2",
          "-o",
          `cluster_size=${cs},compat=${compat}`,
          p,
          "8M",
        );
        await q(
          "qemu-io",
          "-c",
          "write -P 7 0 100k",
          "-c",
          "write -P 8 3M 1k",
          "-c",
          "write -z 5M 1M",
          "-c",
          "write -P 9 6M 64k",
          "-c",
          "write -z 6M 64k",
          p,
        );
        return p;
      },
    ])
  ),
  ["qcow2 compressed (zlib)", async (dir) => {
    const src = join(dir, "src.raw"), p = join(dir, "z.qcow2");
    await q("qemu-img", "create", "-q", "-f", "raw", src, "4M");
    await q("qemu-io", "-f", "raw", "-c", "write -P 3 0 1M", "-c", "write -P 4 2M 512k", src);
    await q("qemu-img", "convert", "-c", "-O", "qcow2", src, p);
    return p;
  }],
  ["qcow2 compressed (zstd) with a normal cluster after", async (dir) => {
    const p = join(dir, "zs.qcow2");
    await q("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", p, "4M");
    await q("qemu-io", "-c", "write -c -P 5 0 128k", "-c", "write -P 6 1M 64k", p);
    return p;
  }],
  ["qcow2 with metadata preallocation (data clusters over host holes)", async (dir) => {
    const p = join(dir, "m.qcow2");
    await q("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", p, "4M");
    await q("qemu-io", "-c", "write -P 3 64k 4k", p);
    return p;
  }],
  ["qcow2 extended L2", async (dir) => {
    const p = join(dir, "x.qcow2");
    await q("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", p, "4M");
    await q(
      "qemu-io",
      "-c",
      "write -P 1 0 4k",
      "-c",
      "write -P 2 70k 2k",
      "-c",
      "write -z 1M 64k",
      p,
    );
    return p;
  }],
  ["qcow2 lazy refcounts, refcount_bits=1", async (dir) => {
    const p = join(dir, "l.qcow2");
    await q(
      "qemu-img",
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "lazy_refcounts=on,refcount_bits=1",
      p,
      "2M",
    );
    await q("qemu-io", "-c", "write -P 1 0 200k", p);
    return p;
  }],
  ["qcow2 with snapshots", async (dir) => {
    const p = join(dir, "s.qcow2");
    await q("qemu-img", "create", "-q", "-f", "qcow2", p, "2M");
    await q("qemu-io", "-c", "write -P 1 0 128k", p);
    await q("qemu-img", "snapshot", "-c", "first", p);
    await q("qemu-io", "-c", "write -P 2 64k 128k", p);
    await q("qemu-img", "snapshot", "-c", "second", p);
    return p;
  }],
  ["3-deep chain", async (dir) => {
    await q("qemu-img", "create", "-q", "-f", "raw", join(dir, "base.raw"), "4M");
    await q("qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", join(dir, "base.raw"));
    await q(
      "qemu-img",
      "create",
      "-q",
      "-f",
      "qcow2",
      "-b",
      "base.raw",
      "-F",
      "raw",
      join(dir, "mid.qcow2"),
    );
    await q("qemu-io", "-c", "write -P 2 512k 1M", join(dir, "mid.qcow2"));
    await q(
      "qemu-img",
      "create",
      "-q",
      "-f",
      "qcow2",
      "-b",
      "mid.qcow2",
      "-F",
      "qcow2",
      join(dir, "top.qcow2"),
      "6M",
    );
    await q("qemu-io", "-c", "write -P 3 1M 64k", "-c", "write -z 0 64k", join(dir, "top.qcow2"));
    return join(dir, "top.qcow2");
  }],
];

/** Snapshot dates are printed in local time by both; nothing else may differ. */
const views: Array<[string, string[]]> = [
  ["info", ["info"]],
  ["info JSON", ["info", "--output=json"]],
  ["info --backing-chain JSON", ["info", "--backing-chain", "--output=json"]],
  ["map", ["map"]],
  ["map JSON", ["map", "--output=json"]],
  ["check", ["check"]],
  ["check JSON", ["check", "--output=json"]],
];

for (const [name, make] of corpus) {
  Deno.test({
    name: `vstor info, map and check print what qemu-img prints for ${name}`,
    ignore,
    async fn() {
      const dir = await Deno.makeTempDir({ prefix: "vstor_parity_" });
      try {
        const path = await make(dir);
        for (const [view, args] of views) {
          const theirs = await runTool("qemu-img", [...args, path]);
          const ours = await vstor([...args, path]);
          assert.equal(ours.code, theirs.code, `${view}: exit code (${ours.stderr})`);
          if (args.includes("--output=json") && theirs.stdout.trim() !== "") {
            assert.deepEqual(JSON.parse(ours.stdout), JSON.parse(theirs.stdout), view);
          } else {
            assert.equal(ours.stdout, theirs.stdout, view);
            const strip = (s: string) => s.replace(/^(qemu-img|vstor): /gm, "");
            assert.equal(strip(ours.stderr), strip(theirs.stderr), `${view} (stderr)`);
          }
        }
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}
