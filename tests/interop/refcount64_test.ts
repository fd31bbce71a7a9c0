/**
 * 64-bit refcounts past 2^53: `check` and `check -r all` print the stored value exactly and
 * repair it as qemu-img does (JavaScript numbers stop being exact at 2^53).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ignoreWithout, runTool } from "./qemu.ts";
import { vstor, withTempDir } from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

Deno.test({
  name: "a 64-bit refcount of 2^60+3 is reported and repaired exactly as qemu-img check does",
  ignore,
  fn: () =>
    withTempDir("vstor-rc64-", async (dir) => {
      const q = join(dir, "q.qcow2"), v = join(dir, "v.qcow2");
      await runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "refcount_bits=64", q, "1M"]);
      await runTool("qemu-io", ["-c", "write -q -P 1 0 64k", q]);
      // The data cluster (host cluster 5) gets refcount 2^60 + 3 in the first refcount block.
      const bytes = await Deno.readFile(q);
      const view = new DataView(bytes.buffer);
      const block = Number(view.getBigUint64(Number(view.getBigUint64(48))));
      view.setBigUint64(block + 5 * 8, (1n << 60n) + 3n);
      await Deno.writeFile(q, bytes);
      await Deno.copyFile(q, v);
      for (const args of [["check"], ["check", "-r", "all"]]) {
        const theirs = await runTool("qemu-img", [...args, q]);
        const ours = await vstor("qemu-img", ...args, v);
        assert.equal(ours.code, theirs.code, ours.output);
        const sorted = (t: string) => t.split("\n").sort().join("\n");
        assert.equal(sorted(ours.output), sorted(theirs.stdout + theirs.stderr));
        assert.match(ours.output, /refcount=1152921504606846979 reference=1/);
      }
      assert.deepEqual(await Deno.readFile(v), await Deno.readFile(q));
    }),
});
