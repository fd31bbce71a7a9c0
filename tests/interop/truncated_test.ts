/**
 * A qcow2 file cut short (a failed copy, a full disk): vstor opens it as QEMU does (what lies
 * past the end reads as zeroes), and `check`, `check -r all` and `info` print and exit as
 * qemu-img does, whether the cut falls in the data, in an L2 table, in the refcount block or
 * inside the L1 table.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ignoreWithout, runTool } from "./qemu.ts";
import { vstor, withTempDir } from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

/** Cut points in a 4 MiB image written whole (64 KiB clusters: header, reftable, refblock, L1, L2, data). */
const CUTS = [400_000, 300_000, 200_000, 140_000, 70_000, 1000];
/** Where `check -r all` agrees too (QEMU's repair of the worst cuts fails on its own overlap checks). */
const REPAIRABLE = new Set([400_000, 300_000, 200_000, 140_000]);

for (const cut of CUTS) {
  Deno.test({
    name: `a qcow2 cut at ${cut} bytes: check, check -r all and info as qemu-img`,
    ignore,
    fn: () =>
      withTempDir("vstor-truncated-", async (dir) => {
        const whole = join(dir, "whole.qcow2");
        assert.equal(
          (await runTool("qemu-img", ["create", "-q", "-f", "qcow2", whole, "4M"])).code,
          0,
        );
        assert.equal((await runTool("qemu-io", ["-c", "write -q -P 1 0 4M", whole])).code, 0);
        const q = join(dir, "q.qcow2"), v = join(dir, "v.qcow2");
        for (const path of [q, v]) {
          await Deno.copyFile(whole, path);
          await Deno.truncate(path, cut);
        }
        const verbs: string[][] = [["check"], ["info"]];
        if (REPAIRABLE.has(cut)) verbs.push(["check", "-r", "all"]);
        for (const verb of verbs) {
          const theirs = await runTool("qemu-img", [...verb, q]);
          const ours = await vstor("qemu-img", ...verb, v);
          const text = (theirs.stdout + theirs.stderr).replaceAll(q, v);
          assert.equal(ours.code, theirs.code, `${verb.join(" ")}: ${ours.output}\nQEMU: ${text}`);
          assert.equal(
            ours.output.split("\n").sort().join("\n"),
            text.split("\n").sort().join("\n"),
            verb.join(" "),
          );
        }
      }),
  });
}
