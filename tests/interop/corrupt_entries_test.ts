/**
 * Corrupt L2 entries as QEMU handles them (the cases of qemu-iotests 271): the same image is
 * poked the same way, then read or written with qemu-io and with `vstor qemu-io` in a separate
 * process; what each prints (the corruption notice on stderr, the request's result; timing
 * figures masked) and the L2 bitmap left behind must be the same.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ignoreWithout } from "./qemu.ts";
import { vstor, withTempDir } from "./qcow2_matrix.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");
const MOD = new URL("../../mod.ts", import.meta.url).pathname;
/** The first L2 table of a fresh 1 MiB extended-L2 image with 64 KiB clusters. */
const L2 = 256 * 1024;

async function run(cmd: string, args: string[]): Promise<{ code: number; text: string }> {
  const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  const dec = new TextDecoder();
  // Both tools write the notice to stderr before the request's result line on stdout.
  const text = (dec.decode(out.stderr) + dec.decode(out.stdout))
    .replace(/\d+(\.\d+)? [KMGT]?i?B\/sec and [\d.]+ ops\/sec/g, "X/sec and X ops/sec")
    .replace(/\d\d\.\d\d sec/g, "X sec");
  return { code: out.code, text };
}

function qemuIo(tool: "qemu" | "vstor", args: string[]) {
  return tool === "qemu"
    ? run("qemu-io", args)
    : run(Deno.execPath(), ["run", "-A", MOD, "qemu-io", ...args]);
}

async function poke(path: string, offset: number, bytes: number[]): Promise<void> {
  using f = await Deno.open(path, { write: true });
  await f.seek(offset, Deno.SeekMode.Start);
  await f.write(new Uint8Array(bytes));
}

async function bitmap(path: string, entry: number): Promise<string> {
  using f = await Deno.open(path);
  await f.seek(L2 + entry * 16 + 8, Deno.SeekMode.Start);
  const b = new Uint8Array(8);
  await f.read(b);
  return [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
}

interface Case {
  name: string;
  /** qemu-io commands run (by QEMU) before the poke. */
  prepare: string;
  poke: Array<[number, number[]]>;
  /** The request under test: `read` or `write` is put in front. */
  request: string;
  entry: number;
}

const CASES: Case[] = [
  {
    name: "the standard descriptor's zero bit on an allocated cluster is ignored",
    prepare: "write -q -P 0x11 0 2k",
    poke: [[L2 + 7, [1]]],
    request: "-q -P 0x11 0 1k",
    entry: 0,
  },
  {
    name: "a subcluster both allocated and zero is corruption",
    prepare: "write -q 32k 128k",
    poke: [[L2 + 24, [0, 0, 0, 1]]],
    request: "0 192k",
    entry: 1,
  },
  {
    name: "the zero bit on an unallocated cluster is ignored",
    prepare: "write -q 256k 1k",
    poke: [[L2 + 7, [1]]],
    request: "-q 0 1k",
    entry: 0,
  },
  {
    name: "an allocated subcluster without a host cluster is corruption",
    prepare: "write -q 256k 1k",
    poke: [[L2 + 15, [1]]],
    request: "0 1k",
    entry: 0,
  },
  {
    name: "both bits on an unallocated cluster are corruption",
    prepare: "write -q 256k 1k",
    poke: [[L2 + 24, [0, 0, 0, 1, 0, 0, 0, 1]]],
    request: "0 192k",
    entry: 1,
  },
  {
    name: "a compressed cluster's subcluster bitmap is ignored",
    prepare: "write -q -P 11 -c 0 64k",
    poke: [[L2 + 11, [1, 0x80]]],
    request: "-P 11 0 64k",
    entry: 0,
  },
];

for (const verb of ["read", "write"]) {
  for (const c of CASES) {
    Deno.test({
      name: `corrupt L2 entries as QEMU: ${verb}: ${c.name}`,
      ignore,
      fn: () =>
        withTempDir("vstor-corrupt-", async (dir) => {
          const results: Array<{ code: number; text: string; bitmap: string }> = [];
          for (const tool of ["qemu", "vstor"] as const) {
            const image = join(dir, `${tool}.qcow2`);
            const made = await run("qemu-img", [
              "create",
              "-f",
              "qcow2",
              "-o",
              "extended_l2=on",
              image,
              "1M",
            ]);
            assert.equal(made.code, 0, made.text);
            assert.equal((await run("qemu-io", ["-c", c.prepare, image])).code, 0);
            for (const [offset, bytes] of c.poke) await poke(image, offset, bytes);
            const r = await qemuIo(tool, ["-c", `${verb} ${c.request}`, image]);
            results.push({ ...r, bitmap: await bitmap(image, c.entry) });
          }
          const [qemu, ours] = results;
          assert.equal(ours!.text, qemu!.text);
          assert.equal(ours!.code, qemu!.code);
          assert.equal(ours!.bitmap, qemu!.bitmap, "L2 bitmap afterwards");
        }),
    });
  }
}

Deno.test({
  name: "corrupt L2 entries: in-process, the notice goes to the command's own stderr",
  ignore,
  fn: () =>
    withTempDir("vstor-corrupt-", async (dir) => {
      const image = join(dir, "t.qcow2");
      await run("qemu-img", ["create", "-f", "qcow2", "-o", "extended_l2=on", image, "1M"]);
      await run("qemu-io", ["-c", "write -q 32k 128k", image]);
      await poke(image, L2 + 24, [0, 0, 0, 1]);
      const r = await vstor("qemu-io", "-c", "read 0 192k", image);
      assert.match(
        r.output,
        /^qcow2: Marking image as corrupt: Invalid cluster entry found {2}\(L2 offset: 0x40000, L2 index: 0x1\); further corruption events will be suppressed$/m,
      );
      assert.match(r.output, /read failed: Input\/output error/);
    }),
});
