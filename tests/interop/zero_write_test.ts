/**
 * `write -z` lays out an image as QEMU does: the request is cut at subcluster boundaries, an
 * unaligned piece is widened to its whole subcluster when the rest of it already reads as
 * zeroes (and zero-flagged), and v2 or a piece over data falls back to writing zero data. The
 * same commands run through qemu-io and through vstor's qemu-io must leave images with the same
 * `qemu-img map` (allocation, not only contents), the same contents, and a clean check.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ignoreWithout, runTool } from "./qemu.ts";
import { assertCheckClean, vstor, withTempDir } from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

const CASES: Array<{ options: string; backing?: boolean; commands: string[] }> = [
  { options: "compat=1.1", commands: ["write -z 0 512"] },
  { options: "compat=1.1", commands: ["write -z 512 512"] },
  { options: "compat=1.1", commands: ["write -P 1 0 4k", "write -z 512 512"] },
  { options: "compat=0.10", commands: ["write -z 0 512"] },
  { options: "compat=0.10", commands: ["write -P 1 0 64k", "write -z 0 100k"] },
  { options: "extended_l2=on", commands: ["write -z 1000 7000"] },
  { options: "extended_l2=on", commands: ["write -P 1 0 4k", "write -z 1000 70000"] },
  { options: "compat=1.1", backing: true, commands: ["write -z 1000 70000"] },
  { options: "compat=1.1", backing: true, commands: ["write -z 64k 1000"] },
  { options: "extended_l2=on", backing: true, commands: ["write -z 66k 1000"] },
  { options: "compat=1.1", commands: ["write -c -P 1 0 64k", "write -z -u 0 512"] },
  { options: "compat=1.1", commands: ["write -P 1 0 128k", "write -z -u 0 128k"] },
  { options: "cluster_size=4096", commands: ["write -P 1 0 128k", "write -z -u 1000 128k"] },
];

async function qemuOk(args: string[]): Promise<string> {
  const r = await runTool(args[0]!, args.slice(1));
  assert.equal(r.code, 0, `${args.join(" ")}: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

for (const c of CASES) {
  const what = `${c.options}${c.backing ? " over a backing file" : ""}: ${c.commands.join("; ")}`;
  Deno.test({
    name: `write -z allocates as QEMU does (${what})`,
    ignore,
    fn: () =>
      withTempDir("vstor-zero-", async (dir) => {
        let options = c.options;
        if (c.backing) {
          const base = join(dir, "base.qcow2");
          await qemuOk(["qemu-img", "create", "-f", "qcow2", base, "1M"]);
          await qemuOk(["qemu-io", "-c", "write -P 0xaa 0 1M", "-c", "write -z 64k 64k", base]);
          options += `,backing_file=${base},backing_fmt=qcow2`;
        }
        const q = join(dir, "q.qcow2"), v = join(dir, "v.qcow2");
        await qemuOk(["qemu-img", "create", "-f", "qcow2", "-o", options, q, "1M"]);
        await Deno.copyFile(q, v);
        const args = c.commands.flatMap((cmd) => ["-c", cmd]);
        await qemuOk(["qemu-io", ...args, q]);
        const ours = await vstor("qemu-io", ...args, v);
        assert.equal(ours.code, 0, ours.output);
        const map = (path: string) => qemuOk(["qemu-img", "map", "--output=json", path]);
        assert.equal(await map(v), await map(q), "qemu-img map");
        await qemuOk(["qemu-img", "compare", q, v]);
        await assertCheckClean(v);
      }),
  });
}
