/**
 * Backing chains against qemu-img: overlays made by one tool read by the other, commit and
 * rebase results compared with what qemu-img produces from the same start, and chain limits.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";
import { openImage } from "../../formats/open.ts";
import { isBlockError } from "../../src/errors.ts";
import { ignoreWithout, runTool } from "./qemu.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

async function ok(tool: string, ...args: string[]): Promise<string> {
  const r = await runTool(tool, args);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** A three-deep chain raw ← qcow2 ← qcow2, with distinct data in each layer; `tag` names files. */
async function chain(
  dir: string,
  tag: string,
): Promise<{ base: string; mid: string; top: string }> {
  const base = join(dir, `base.${tag}.raw`),
    mid = join(dir, `mid.${tag}.qcow2`),
    top = join(dir, `top.${tag}.qcow2`);
  await ok("qemu-img", "create", "-q", "-f", "raw", base, "4M");
  await ok("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", base);
  await ok(
    "qemu-img",
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "cluster_size=4096",
    "-b",
    `base.${tag}.raw`,
    "-F",
    "raw",
    mid,
  );
  await ok("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 1M", "-c", "write -z 3M 64k", mid);
  await ok("qemu-img", "create", "-q", "-f", "qcow2", "-b", `mid.${tag}.qcow2`, "-F", "qcow2", top);
  await ok(
    "qemu-io",
    "-f",
    "qcow2",
    "-c",
    "write -P 0x33 1536k 1M",
    "-c",
    "write -P 0x44 100 5000",
    top,
  );
  return { base, mid, top };
}

async function same(a: string, b: string): Promise<void> {
  const r = await runTool("qemu-img", ["compare", a, b]);
  assert.equal(r.code, 0, `${a} vs ${b}: ${r.stdout}${r.stderr}`);
}

async function clean(path: string): Promise<void> {
  const r = await runTool("qemu-img", ["check", path]);
  assert.equal(r.code, 0, `${path}: ${r.stdout}${r.stderr}`);
}

Deno.test({
  name: "vstor reads a three-deep chain exactly as qemu-img converts it",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_chain_" });
    try {
      const { top } = await chain(dir, "r");
      const flat = join(dir, "flat.raw");
      await ok("qemu-img", "convert", "-O", "raw", top, flat);
      const node = await openImage(top, { readOnly: true });
      const got = new Uint8Array(node.size);
      await node.read(0, got);
      await node.close();
      assert.deepEqual(got, await Deno.readFile(flat));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "an overlay vstor creates over a qemu-img base, written by vstor, is what qemu-img reads",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_chain_" });
    try {
      const base = join(dir, "base.qcow2");
      await ok("qemu-img", "create", "-q", "-f", "qcow2", base, "2M");
      await ok("qemu-io", "-c", "write -P 0x5a 0 2M", base);
      const overlay = join(dir, "sub", "ov.qcow2");
      await Deno.mkdir(join(dir, "sub"));
      const r = await vstor(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../base.qcow2",
        "-F",
        "qcow2",
        overlay,
      );
      assert.equal(r.code, 0, r.stderr);
      const io = await vstor(
        "io",
        "-c",
        "write -P 0x66 4096 1000",
        "-c",
        "write -z 64k 64k",
        "-c",
        "discard 128k 64k",
        overlay,
      );
      assert.equal(io.code, 0, io.stderr);
      await clean(overlay);
      const q = await runTool("qemu-io", [
        "-c",
        "read -P 0x5a 0 4096",
        "-c",
        "read -P 0x66 4096 1000",
        "-c",
        "read -P 0x5a 5096 60440",
        "-c",
        "read -P 0 64k 128k",
        "-c",
        "read -P 0x5a 192k 1856k",
        overlay,
      ]);
      assert.doesNotMatch(q.stdout + q.stderr, /fail|error/i, q.stdout);
      const info = JSON.parse(await ok("qemu-img", "info", "--output=json", overlay));
      assert.equal(info["backing-filename"], "../base.qcow2");
      assert.equal(info["backing-filename-format"], "qcow2");
      assert.equal(info["virtual-size"], 2 << 20);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "vstor commit gives the same base and overlay as qemu-img commit, with and without -b and -d",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_chain_" });
    try {
      for (
        const [label, args] of [["default", []], ["-d", ["-d"]], ["-b base", [
          "-b",
          "BASE",
        ]]] as const
      ) {
        const q = await chain(dir, `q${label.length}`), v = await chain(dir, `v${label.length}`);
        const qArgs = args.map((a) => a === "BASE" ? q.base : a),
          vArgs = args.map((a) => a === "BASE" ? v.base : a);
        await ok("qemu-img", "commit", "-q", ...qArgs, q.top);
        const r = await vstor("commit", "-q", ...vArgs, v.top);
        assert.equal(r.code, 0, r.stderr);
        const target = label === "-b base" ? "base" : "mid";
        await same(q[target], v[target]);
        await same(q.top, v.top);
        for (const img of [v.top, v.mid]) await clean(img);
        const qm = await ok("qemu-img", "map", "--output=json", q.top);
        const vm = await ok("qemu-img", "map", "--output=json", v.top);
        assert.deepEqual(
          JSON.parse(vm).map((e: { depth: number }) => e.depth),
          JSON.parse(qm).map((e: { depth: number }) => e.depth),
          label,
        );
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "vstor rebase (safe, unsafe, flatten) gives what qemu-img rebase gives",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_chain_" });
    try {
      const cases: Array<[string, string[]]> = [
        ["onto the base", ["-b", "BASE", "-F", "raw"]],
        ["flatten", ["-b", ""]],
        ["unsafe", ["-u", "-b", "BASE", "-F", "raw"]],
      ];
      for (const [label, args] of cases) {
        const q = await chain(dir, `q${label.length}`), v = await chain(dir, `v${label.length}`);
        const fix = (c: { base: string }, list: string[]) =>
          list.map((a) => a === "BASE" ? c.base.split("/").pop()! : a);
        await ok("qemu-img", "rebase", ...fix(q, args), q.top);
        const r = await vstor("rebase", ...fix(v, args), v.top);
        assert.equal(r.code, 0, `${label}: ${r.stderr}`);
        await same(q.top, v.top);
        await clean(v.top);
        const qi = JSON.parse(await ok("qemu-img", "info", "--output=json", q.top));
        const vi = JSON.parse(await ok("qemu-img", "info", "--output=json", v.top));
        assert.equal(vi["backing-filename"]?.replace(/^base\.v/, "base.q"), qi["backing-filename"]);
        const qm = JSON.parse(await ok("qemu-img", "map", "--output=json", q.top));
        const vm = JSON.parse(await ok("qemu-img", "map", "--output=json", v.top));
        const shape = (m: Array<Record<string, unknown>>) =>
          m.map(({ start, length, depth, zero, data }) => ({ start, length, depth, zero, data }));
        assert.deepEqual(shape(vm), shape(qm), label);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "a backing chain that loops or is missing fails with a clear error",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_chain_" });
    try {
      const a = join(dir, "a.qcow2"), b = join(dir, "b.qcow2");
      await ok(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        a,
        "1M",
      );
      await ok(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        b,
        "1M",
      );
      await assert.rejects(
        () => openImage(a, { readOnly: true }),
        (e) => isBlockError(e) && /loop/.test(e.message),
      );
      const self = join(dir, "self.qcow2");
      await ok(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "x.qcow2",
        "-F",
        "qcow2",
        self,
        "1M",
      );
      await ok("qemu-img", "rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", self);
      await assert.rejects(
        () => openImage(self, { readOnly: true }),
        (e) => isBlockError(e) && /loop/.test(e.message),
      );
      const orphan = join(dir, "orphan.qcow2");
      await ok(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.raw",
        "-F",
        "raw",
        orphan,
        "1M",
      );
      const r = await vstor("io", "-c", "read 0 512", orphan);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /Could not open backing file: .*gone\.raw/);
      // info does not need the backing file, as with qemu-img.
      const info = await vstor("info", "--output=json", orphan);
      assert.equal(info.code, 0, info.stderr);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("a chain deeper than the limit is refused, not followed into a stack overflow", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vstor_chain_" });
  try {
    let below = "";
    for (let i = 0; i < 70; i++) {
      const name = `l${i}.qcow2`;
      const args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        ...(below ? ["-u", "-b", below, "-F", "qcow2"] : []),
        join(dir, name),
        "64k",
      ];
      const r = await vstor(...args);
      assert.equal(r.code, 0, r.stderr);
      below = name;
    }
    await assert.rejects(
      () => openImage(join(dir, below), { readOnly: true }),
      (e) => isBlockError(e) && /deeper than 64/.test(e.message),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
