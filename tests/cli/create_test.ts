import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";
import { ignoreWithout, runTool } from "../interop/qemu.ts";

const dir = Deno.makeTempDirSync({ prefix: "vstor_cli_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

Deno.test("vstor create makes a sparse raw image of the given size and says so like qemu-img", async () => {
  const path = join(dir, "a.img");
  const r = await vstor("create", "-f", "raw", path, "1.5M");
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, `Formatting '${path}', fmt=raw size=1572864\n`);
  assert.equal(Deno.statSync(path).size, 1572864);
  const quiet = await vstor("create", "-q", path, "64k");
  assert.equal(quiet.stdout, "");
  assert.equal(Deno.statSync(path).size, 65536);
});

Deno.test("vstor create -o preallocation=full writes every byte", async () => {
  const path = join(dir, "full.img");
  const r = await vstor("create", "-o", "preallocation=full", path, "1M");
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, `Formatting '${path}', fmt=raw size=1048576 preallocation=full\n`);
  assert.ok((Deno.statSync(path).blocks ?? 0) * 512 >= 1 << 20);
});

Deno.test("vstor create usage mistakes exit 2 with the verb's usage", async () => {
  for (
    const args of [
      ["create"],
      ["create", join(dir, "b.img")],
      ["create", join(dir, "b.img"), "12x"],
      ["create", join(dir, "b.img"), "-5"],
      ["create", "-o", "preallocation=bogus", join(dir, "b.img"), "1M"],
      ["create", "-o", "foo=1", join(dir, "b.img"), "1M"],
      ["create", "-f", "vmdk", join(dir, "b.img"), "1M"],
      ["create", "--bogus", join(dir, "b.img"), "1M"],
    ]
  ) {
    const r = await vstor(...args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, /^vstor create: .+\nusage: vstor create/);
  }
  assert.throws(() => Deno.statSync(join(dir, "b.img")));
});

Deno.test("vstor create into a missing directory is a one-line error, exit 1", async () => {
  const r = await vstor("create", join(dir, "no", "such", "c.img"), "1M");
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^vstor: .*c\.img.*No such file or directory\n$/);
});

Deno.test("vstor help and unknown verbs", async () => {
  const h = await vstor("help");
  assert.equal(h.code, 0);
  assert.match(h.stdout, /create/);
  assert.match(h.stdout, /\bio\b/);
  assert.equal((await vstor("help", "create")).code, 0);
  assert.equal((await vstor("frobnicate")).code, 2);
  assert.equal((await vstor()).code, 2);
});

Deno.test({
  name: "an image made by vstor create is what qemu-img create makes",
  ignore: ignoreWithout("qemu-img"),
  async fn() {
    const ours = join(dir, "ours.img"), theirs = join(dir, "theirs.img");
    assert.equal((await vstor("create", "-q", ours, "3M")).code, 0);
    assert.equal((await runTool("qemu-img", ["create", "-q", "-f", "raw", theirs, "3M"])).code, 0);
    const cmp = await runTool("qemu-img", ["compare", "-f", "raw", "-F", "raw", ours, theirs]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    const info = JSON.parse((await runTool("qemu-img", ["info", "--output=json", ours])).stdout);
    assert.equal(info["virtual-size"], 3 << 20);
    assert.equal(info.format, "raw");
  },
});
