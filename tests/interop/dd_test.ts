/**
 * `vstor qemu-img dd` against qemu-img 7.2's dd: for raw and qcow2 inputs and outputs, block
 * sizes, count, skip (past the end too), a short last block and the operand and option mistakes,
 * the exit code and messages must be qemu-img's and the output files equal (raw byte for byte,
 * qcow2 byte for byte as well: dd writes every block as data).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";
import { ignoreWithout, runTool, type ToolResult } from "./qemu.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");
const dir = Deno.makeTempDirSync({ prefix: "vstor_dd_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
const p = (name: string) => join(dir, name);

async function vstor(...args: string[]): Promise<ToolResult> {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

Deno.test({
  name: "vstor qemu-img dd copies, counts, skips and refuses as qemu-img dd does",
  ignore,
  fn: async () => {
    const random = new Uint8Array(3_000_000);
    for (let i = 0; i < random.length; i += 65536) {
      crypto.getRandomValues(random.subarray(i, Math.min(i + 65536, random.length)));
    }
    Deno.writeFileSync(p("in.raw"), random);
    Deno.writeFileSync(p("odd.raw"), random.subarray(0, 1000));
    assert.equal(
      (await runTool("qemu-img", ["create", "-f", "qcow2", p("in.qcow2"), "5M"])).code,
      0,
    );
    const io = await runTool("qemu-io", [
      "-c",
      "write -P 7 0 1M",
      "-c",
      "write -P 9 3M 100k",
      p("in.qcow2"),
    ]);
    assert.equal(io.code, 0, io.stderr);
    const cases = [
      "-f raw if=in.raw of=OUT",
      "-f raw -O qcow2 if=in.raw of=OUT bs=4k",
      "if=in.qcow2 of=OUT bs=1M count=2",
      "-O qcow2 if=in.qcow2 of=OUT bs=1M skip=1",
      "if=in.qcow2 of=OUT bs=1M skip=5",
      "if=in.qcow2 of=OUT bs=1M skip=6",
      "-f raw if=in.raw of=OUT bs=300k skip=3 count=7",
      "-f raw if=odd.raw of=OUT bs=300",
      "-O qcow2 -f raw if=odd.raw of=OUT bs=300 skip=1 count=3",
      "if=in.qcow2 of=OUT bs=0",
      "if=in.qcow2 of=OUT bs=1x",
      "if=in.qcow2 of=OUT count=-1",
      "-O foo if=in.qcow2 of=OUT",
      "if=nonexist of=OUT",
      "junk if=in.qcow2 of=OUT",
      "osize=1M if=in.qcow2 of=OUT",
      "if=in.qcow2",
      "if=in.qcow2 of=OUT skip=99999999999999999",
      "bs=2G if=in.qcow2 of=OUT",
      "if=in.qcow2 of=OUT bs=64k skip=9223372036854775807",
      "-O qcow2 if=in.qcow2 of=OUT bs=1M count=0",
      "-x if=in.qcow2 of=OUT",
      "if=in.qcow2 of=OUT -O",
    ];
    let n = 0;
    for (const c of cases) {
      n++;
      const args = (out: string) =>
        c.split(" ").map((a) => a.replace("OUT", p(out)).replace(/^if=(?!$)/, `if=${dir}/`));
      const v = await vstor("qemu-img", "dd", ...args(`v${n}`));
      const q = await runTool("qemu-img", ["dd", ...args(`q${n}`)]);
      assert.equal(v.code, q.code, c);
      assert.equal(v.stderr.replaceAll(`v${n}`, `q${n}`), q.stderr, c);
      assert.equal(v.stdout, q.stdout, c);
      assert.equal(exists(p(`v${n}`)), exists(p(`q${n}`)), c);
      if (!exists(p(`q${n}`))) continue;
      const a = Deno.readFileSync(p(`v${n}`)), b = Deno.readFileSync(p(`q${n}`));
      assert.equal(a.length, b.length, c);
      assert.equal(a.findIndex((x, i) => x !== b[i]), -1, c);
    }
  },
});
