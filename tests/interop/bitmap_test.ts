/**
 * Persistent dirty bitmaps against QEMU 7.2: images whose bitmaps qemu-img made are read by vstor
 * (info, check agree), `vstor qemu-img bitmap` answers and writes as `qemu-img bitmap` does
 * (messages, exit codes, byte-identical files), vstor's writes mark the bits QEMU then reads
 * (byte-identical to qemu-io's writes; the dirty extents through qemu-nbd when it is installed),
 * and resize with bitmaps matches qemu-img resize.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";
import { openImage } from "../../formats/open.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import { ignoreWithout, runTool, type ToolResult } from "./qemu.ts";
import { mulberry32 } from "../prng.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");
const dir = Deno.makeTempDirSync({ prefix: "vstor_bitmap_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
const p = (name: string) => join(dir, name);

async function vstor(...args: string[]): Promise<ToolResult> {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

async function ok(tool: string, ...args: string[]): Promise<void> {
  const r = await runTool(tool, args);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")}:\n${r.stdout}${r.stderr}`);
}

function same(a: string, b: string): void {
  const x = Deno.readFileSync(a), y = Deno.readFileSync(b);
  assert.equal(x.length, y.length, `${a} and ${b} differ in size`);
  const at = x.findIndex((v, i) => v !== y[i]);
  assert.equal(at, -1, `${a} and ${b} differ at byte ${at}`);
}

/** Two copies of a fresh qcow2 image: one for vstor, one for QEMU. */
async function pair(name: string, size = "64M", ...setup: string[][]): Promise<[string, string]> {
  const v = p(`${name}.v.qcow2`), q = p(`${name}.q.qcow2`);
  await ok("qemu-img", "create", "-f", "qcow2", v, size);
  for (const args of setup) await ok("qemu-img", ...args.map((a) => a === "@" ? v : a));
  Deno.copyFileSync(v, q);
  return [v, q];
}

/** Flip the IN_USE flag of the first bitmap directory entry (a crash while QEMU had it open). */
function markInUse(path: string): void {
  const f = Deno.openSync(path, { read: true, write: true });
  try {
    const head = new Uint8Array(65536);
    f.readSync(head);
    const v = new DataView(head.buffer);
    let at = v.getUint32(100);
    for (;;) {
      const type = v.getUint32(at), len = v.getUint32(at + 4);
      assert.notEqual(type, 0, "no bitmaps extension");
      if (type === 0x23852875) break;
      at += 8 + Math.ceil(len / 8) * 8;
    }
    const dirOffset = Number(v.getBigUint64(at + 8 + 16));
    const flags = new Uint8Array(4);
    f.seekSync(dirOffset + 12, Deno.SeekMode.Start);
    f.readSync(flags);
    flags[3]! |= 1;
    f.seekSync(dirOffset + 12, Deno.SeekMode.Start);
    f.writeSync(flags);
  } finally {
    f.close();
  }
}

Deno.test({
  name: "vstor info and check read bitmaps qemu-img bitmap made, as qemu-img does",
  ignore,
  fn: async () => {
    const [img] = await pair("read", "64M", ["bitmap", "--add", "@", "b0"], [
      "bitmap",
      "--add",
      "-g",
      "128k",
      "--disable",
      "@",
      "b1",
    ]);
    await ok("qemu-io", "-c", "write 0 1M", "-c", "write 40M 64k", img);
    const inUse = p("read.inuse.qcow2");
    Deno.copyFileSync(img, inUse);
    markInUse(inUse);
    // A program without bitmap support cleared the autoclear bit: QEMU warns and ignores them.
    const stale = p("read.stale.qcow2");
    Deno.copyFileSync(img, stale);
    const f = Deno.openSync(stale, { write: true });
    f.seekSync(95, Deno.SeekMode.Start);
    f.writeSync(new Uint8Array([0]));
    f.close();
    for (const file of [img, inUse, stale]) {
      for (const verb of [["info"], ["check"]]) {
        for (const out of ["--output=human", "--output=json"]) {
          const q = await runTool("qemu-img", [...verb, out, file]);
          const v = await vstor("qemu-img", ...verb, out, file);
          const label = `${verb} ${out} ${file}`;
          // (check's JSON key order for a leaks-only image is src/cli/check.ts's, not compared)
          if (!(file === stale && verb[0] === "check" && out.endsWith("json"))) {
            assert.equal(v.stdout, q.stdout, label);
          }
          assert.equal(v.stderr, q.stderr, label);
          assert.equal(v.code, q.code, label);
        }
      }
    }
  },
});

Deno.test({
  name: "vstor qemu-img bitmap answers and writes as qemu-img bitmap does (byte-identical files)",
  ignore,
  fn: async () => {
    const [v, q] = await pair("ops");
    const steps = [
      ["--add", "X", "b0"],
      ["--add", "-g", "128k", "--disable", "X", "b1"],
      ["--add", "X", "b0"],
      ["--remove", "X", "nope"],
      ["--clear", "X", "b1"],
      ["--enable", "X", "b1"],
      ["--merge", "b0", "X", "b1"],
      ["--add", "-g", "1000", "X", "z"],
      ["--add", "-g", "0", "X", "dflt"],
      ["--add", "-g", "1x", "X", "z"],
      ["X", "z"],
      ["--add", "X"],
      ["-g", "1k", "--clear", "X", "b0"],
      ["-F", "qcow2", "--merge", "b0", "X", "b1"],
      ["--add", "X", ""],
      ["--frob", "X", "b1"],
      ["--merge"],
      ["--remove", "X", "b1"],
      ["--disable", "--enable", "X", "b0"],
    ];
    for (const step of steps) {
      const r1 = await vstor("qemu-img", "bitmap", ...step.map((a) => a === "X" ? v : a));
      const r2 = await runTool("qemu-img", ["bitmap", ...step.map((a) => a === "X" ? q : a)]);
      const label = step.join(" ");
      assert.equal(r1.code, r2.code, label);
      assert.equal(r1.stderr.replaceAll(v, q), r2.stderr, label);
      same(v, q);
    }
    const info = await runTool("qemu-img", ["info", "--output=json", v]);
    assert.match(info.stdout, /"name": "dflt"/);
    await ok("qemu-img", "check", v);
  },
});

Deno.test({
  name: "vstor writes, zero writes and discards mark the bitmaps QEMU then reads",
  ignore,
  fn: async () => {
    const [v, q] = await pair(
      "writes",
      "64M",
      ["bitmap", "--add", "@", "b0"],
      ["bitmap", "--add", "-g", "512", "@", "fine"],
      ["bitmap", "--add", "--disable", "@", "off"],
    );
    const cmds = ["write 0 1M", "write -z 8M 64k", "discard 16M 128k", "write 40000 1000"];
    const io = (file: string) => cmds.flatMap((c) => ["-c", c]).concat(file);
    const r = await vstor("qemu-io", ...io(v));
    assert.equal(r.code, 0, r.stderr);
    await ok("qemu-io", ...io(q));
    same(v, q);

    // Through the node API too: the bits of a write past 32 MiB.
    const node = await openImage(v) as Qcow2Node;
    await node.write(32 << 20, new Uint8Array(4096).fill(1));
    assert.equal(node.bitmaps?.find("b0")?.get(512), true);
    assert.equal(node.bitmaps?.find("off")?.count(), 0);
    await node.close();
    await ok("qemu-io", "-c", "write -P 1 32M 4k", q);
    same(v, q);
    const check = await runTool("qemu-img", ["check", v]);
    assert.equal(check.code, 0, check.stdout + check.stderr);

    if (ignoreWithout("qemu-io") || !haveNbd()) return;
    const sock = p("nbd.sock");
    const nbd = new Deno.Command("qemu-nbd", {
      args: ["-r", "-t", "-k", sock, "-f", "qcow2", "-B", "b0", v],
      stdout: "null",
      stderr: "null",
    }).spawn();
    try {
      for (let i = 0; i < 50 && !exists(sock); i++) await new Promise((f) => setTimeout(f, 50));
      const map = await runTool("qemu-img", [
        "map",
        "--output=json",
        "--image-opts",
        `driver=nbd,server.type=unix,server.path=${sock},x-dirty-bitmap=qemu:dirty-bitmap:b0`,
      ]);
      assert.equal(map.code, 0, map.stderr);
      // With x-dirty-bitmap, dirty ranges are the ones reported as not data.
      const dirty =
        (JSON.parse(map.stdout) as Array<{ start: number; length: number; data: boolean }>)
          .filter((e) => !e.data).map((e) => [e.start, e.length]);
      assert.deepEqual(dirty, [[0, 1 << 20], [8 << 20, 65536], [16 << 20, 131072], [
        32 << 20,
        65536,
      ]]);
    } finally {
      nbd.kill();
      await nbd.status;
    }
  },
});

function haveNbd(): boolean {
  try {
    return new Deno.Command("qemu-nbd", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
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
  name: "an IN_USE bitmap is inconsistent: clear, enable and resize refuse as QEMU; remove works",
  ignore,
  fn: async () => {
    const [v, q] = await pair("inuse", "64M", ["bitmap", "--add", "@", "b0"], [
      "bitmap",
      "--add",
      "@",
      "b1",
    ]);
    markInUse(v);
    markInUse(q);
    for (
      const args of [
        ["bitmap", "--clear", "X", "b0"],
        ["bitmap", "--enable", "X", "b0"],
        ["bitmap", "--merge", "b0", "X", "b1"],
        ["resize", "X", "128M"],
        ["bitmap", "--remove", "X", "b0"],
        ["resize", "X", "128M"],
      ]
    ) {
      const r1 = await vstor("qemu-img", ...args.map((a) => a === "X" ? v : a));
      const r2 = await runTool("qemu-img", args.map((a) => a === "X" ? q : a));
      assert.equal(r1.code, r2.code, args.join(" "));
      assert.equal(r1.stderr.replaceAll(v, q), r2.stderr, args.join(" "));
      same(v, q);
    }
  },
});

Deno.test({
  name: "resize with bitmaps grows and shrinks them as qemu-img resize does (byte-identical)",
  ignore,
  fn: async () => {
    const [v, q] = await pair("resize", "64M", ["bitmap", "--add", "@", "b0"], [
      "bitmap",
      "--add",
      "-g",
      "4k",
      "@",
      "b1",
    ]);
    await ok("qemu-io", "-c", "write 60M 4M", v);
    await ok("qemu-io", "-c", "write 60M 4M", q);
    for (const args of [["128M"], ["--shrink", "32M"], ["64M"]]) {
      const r = await vstor("qemu-img", "resize", v, ...args);
      assert.equal(r.code, 0, r.stderr);
      await ok("qemu-img", "resize", q, ...args);
      same(v, q);
    }
  },
});

/** Write `flags` into the directory entry of bitmap `index` (0 = first). */
function setFlags(path: string, index: number, flags: number): void {
  const f = Deno.openSync(path, { read: true, write: true });
  try {
    const head = new Uint8Array(65536);
    f.readSync(head);
    const v = new DataView(head.buffer);
    let at = v.getUint32(100);
    while (v.getUint32(at) !== 0x23852875) at += 8 + Math.ceil(v.getUint32(at + 4) / 8) * 8;
    const dirOffset = Number(v.getBigUint64(at + 8 + 16));
    const dir = new Uint8Array(Number(v.getBigUint64(at + 8 + 8)));
    f.seekSync(dirOffset, Deno.SeekMode.Start);
    f.readSync(dir);
    const dv = new DataView(dir.buffer);
    let e = 0;
    for (let i = 0; i < index; i++) e += Math.ceil((24 + dv.getUint16(e + 18)) / 8) * 8;
    dv.setUint32(e + 12, flags);
    f.seekSync(dirOffset + e + 12, Deno.SeekMode.Start);
    f.writeSync(dir.subarray(e + 12, e + 16));
  } finally {
    f.close();
  }
}

Deno.test({
  name: "convert --bitmaps copies bitmaps and refuses as qemu-img convert does (byte-identical)",
  ignore,
  fn: async () => {
    const src = p("convert.src.qcow2");
    await ok("qemu-img", "create", "-f", "qcow2", src, "64M");
    await ok("qemu-img", "bitmap", "--add", src, "b0");
    await ok("qemu-img", "bitmap", "--add", "-g", "4k", "--disable", src, "b1");
    await ok("qemu-img", "bitmap", "--add", src, "b2");
    await ok("qemu-io", "-c", "write 0 1M", "-c", "write 20M 64k", src);
    await ok("qemu-img", "bitmap", "--disable", src, "b0");
    await ok("qemu-img", "bitmap", "--add", src, "b3");
    await ok("qemu-io", "-c", "write 30M 4k", src);
    const wide = p("convert.wide.qcow2");
    await ok("qemu-img", "create", "-f", "qcow2", wide, "1G");
    await ok("qemu-img", "bitmap", "--add", "-g", "512", wide, "b0");
    await ok("qemu-img", "bitmap", "--add", wide, "b1");
    await ok("qemu-io", "-c", "write 0 1M", "-c", "write 500M 64k", "-c", "write 1000M 4k", wide);
    const broken = p("convert.broken.qcow2");
    Deno.copyFileSync(src, broken);
    setFlags(broken, 1, 1); // b1 IN_USE
    const existing = (tag: string) => {
      const path = p(`convert.n.${tag}.qcow2`);
      return path;
    };
    for (const tag of ["v", "q"]) {
      await ok("qemu-img", "create", "-f", "qcow2", existing(tag), "64M");
      await ok("qemu-img", "bitmap", "--add", existing(tag), "b1");
    }
    const cases = [
      ["--bitmaps", "-O", "qcow2", src, "OUT"],
      ["--bitmaps", src, "OUT"],
      ["--bitmaps", "-O", "qcow2", "-o", "compat=0.10", src, "OUT"],
      ["--skip-broken-bitmaps", "-O", "qcow2", src, "OUT"],
      ["--bitmaps", "-O", "qcow2", broken, "OUT"],
      ["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", broken, "OUT"],
      ["--bitmaps", "-O", "qcow2", src, src, "OUT"],
      ["--bitmaps", "-O", "qcow2", "-f", "raw", src, "OUT"],
      ["--bitmaps", "-O", "qcow2", "-c", src, "OUT"],
      ["--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", src, "OUT"],
      ["--bitmaps", "-n", "-O", "qcow2", src, "EXISTING"],
      // Bits far past the first bitmap cluster, into targets with other cluster sizes.
      ["--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", wide, "OUT"],
      ["--bitmaps", "-O", "qcow2", "-o", "cluster_size=2M", wide, "OUT"],
    ];
    let n = 0;
    for (const c of cases) {
      n++;
      const out = (tag: string) =>
        c.map((a) => a === "OUT" ? p(`convert.${n}.${tag}`) : a === "EXISTING" ? existing(tag) : a);
      const v = await vstor("qemu-img", "convert", ...out("v"));
      const q = await runTool("qemu-img", ["convert", ...out("q")]);
      const label = c.join(" ");
      assert.equal(v.code, q.code, label);
      assert.equal(v.stderr.replaceAll(".v", ".q"), q.stderr, label);
      const target = out("q").at(-1)!;
      if (exists(target)) same(out("v").at(-1)!, target);
      else assert.equal(exists(out("v").at(-1)!), false, label);
    }
  },
});

Deno.test({
  name: "amend with bitmaps: compat=0.10 leaves them stale as QEMU does; other options keep them",
  ignore,
  fn: async () => {
    for (const o of ["compat=0.10", "refcount_bits=1", "lazy_refcounts=on", "size=128M"]) {
      const [v, q] = await pair(`amend-${o.replace("=", "-")}`, "64M", [
        "bitmap",
        "--add",
        "@",
        "b0",
      ]);
      await ok("qemu-io", "-c", "write 0 1M", v);
      Deno.copyFileSync(v, q);
      const r = await vstor("qemu-img", "amend", "-o", o, v);
      assert.equal(r.code, 0, r.stderr);
      await ok("qemu-img", "amend", "-o", o, q);
      same(v, q);
      const check = await runTool("qemu-img", ["check", "--output=json", v]);
      const qcheck = await runTool("qemu-img", ["check", "--output=json", q]);
      assert.equal(check.code, qcheck.code, o);
    }
  },
});

Deno.test({
  name:
    "dropping the bitmaps extension (last bitmap removed, stale extension) leaves the header as QEMU's",
  ignore,
  fn: async () => {
    const [v, q] = await pair("drop", "64M", ["bitmap", "--add", "@", "b0"]);
    await ok("qemu-io", "-c", "write 0 1M", v);
    Deno.copyFileSync(v, q);
    const r = await vstor("qemu-img", "bitmap", "--remove", v, "b0");
    assert.equal(r.code, 0, r.stderr);
    await ok("qemu-img", "bitmap", "--remove", q, "b0");
    same(v, q);

    const [sv, sq] = await pair("stale", "64M", ["bitmap", "--add", "@", "b0"]);
    await ok("qemu-io", "-c", "write 0 1M", sv);
    for (const file of [sv]) {
      const f = Deno.openSync(file, { write: true });
      f.seekSync(95, Deno.SeekMode.Start);
      f.writeSync(new Uint8Array([0]));
      f.close();
    }
    Deno.copyFileSync(sv, sq);
    const v1 = await vstor("qemu-img", "check", "-r", "all", sv);
    const q1 = await runTool("qemu-img", ["check", "-r", "all", sq]);
    assert.equal(v1.code, q1.code);
    assert.equal(v1.stdout, q1.stdout);
    assert.equal(v1.stderr, q1.stderr);
    same(sv, sq);
  },
});

Deno.test({
  name:
    "growing an overlay over a longer backing file zeroes the new range without marking bitmaps",
  ignore,
  fn: async () => {
    const base = p("grow.base.qcow2");
    await ok("qemu-img", "create", "-f", "qcow2", base, "4M");
    await ok("qemu-io", "-c", "write -P 1 0 4M", base);
    const [v, q] = await pair("grow", "1M");
    for (const f of [v, q]) {
      await ok("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", base, f);
      await ok("qemu-img", "bitmap", "--add", "-g", "512", f, "b0");
    }
    const r = await vstor("qemu-img", "resize", v, "3M");
    assert.equal(r.code, 0, r.stderr);
    await ok("qemu-img", "resize", q, "3M");
    same(v, q);
  },
});

let sockets = 0;

/** The dirty extents of bitmap `name` as QEMU reads them (qemu-nbd -B, qemu-img map). */
async function dirtyExtents(image: string, name: string): Promise<Array<[number, number]>> {
  const sock = p(`n${sockets++}.sock`); // short: a socket path has at most 107 bytes
  const nbd = new Deno.Command("qemu-nbd", {
    args: ["-r", "-t", "-k", sock, "-f", "qcow2", "-B", name, image],
    stdout: "null",
    stderr: "null",
  }).spawn();
  try {
    const args = [
      "map",
      "--output=json",
      "--image-opts",
      `driver=nbd,server.type=unix,server.path=${sock},x-dirty-bitmap=qemu:dirty-bitmap:${name}`,
    ];
    // The socket file appears before qemu-nbd listens on it: retry a refused connection.
    let map = await runTool("qemu-img", args);
    for (let i = 0; i < 100 && map.code !== 0; i++) {
      await new Promise((f) => setTimeout(f, 20));
      map = await runTool("qemu-img", args);
    }
    assert.equal(map.code, 0, map.stderr);
    return (JSON.parse(map.stdout) as Array<{ start: number; length: number; data: boolean }>)
      .filter((e) => !e.data).map((e) => [e.start, e.length]);
  } finally {
    try {
      nbd.kill();
    } catch {
      // Already gone: its status says why.
    }
    await nbd.status;
  }
}

Deno.test({
  name: "random writes, zero writes, discards and compressed writes dirty the bits QEMU's do",
  ignore: ignore || !haveNbd(),
  fn: async () => {
    const size = 32 << 20;
    // (not 512-byte clusters: there QEMU's own compressed writes trip its overlap check)
    for (const [seed, cs] of [[1, 4096], [4, 4096], [5, 65536]] as const) {
      const [v, q] = [p(`random${seed}.v.qcow2`), p(`random${seed}.q.qcow2`)];
      for (const f of [v, q]) {
        await ok("qemu-img", "create", "-f", "qcow2", "-o", `cluster_size=${cs}`, f, "32M");
        await ok("qemu-img", "bitmap", "--add", "-g", "512", f, "a");
        await ok("qemu-img", "bitmap", "--add", "-g", "64k", f, "b");
        await ok("qemu-img", "bitmap", "--add", "-g", "1M", "--disable", f, "c");
      }
      const rand = mulberry32(seed);
      const below = (n: number) => Math.floor(rand() * n);
      const cmds: string[] = [];
      for (let i = 0; i < 30; i++) {
        const kind = ["write", "write -z", "discard", "write -c"][below(4)]!;
        if (kind === "write -c") {
          cmds.push(`${kind} ${below(size / cs) * cs} ${cs}`);
        } else {
          const offset = below(size - 1);
          cmds.push(`${kind} ${offset} ${1 + below(Math.min(3 << 20, size - offset))}`);
        }
      }
      const io = (file: string) => cmds.flatMap((c) => ["-c", c]).concat(file);
      // (a compressed write over an allocated cluster fails in both: same exit code)
      const r = await vstor("qemu-io", ...io(v));
      const rq = await runTool("qemu-io", io(q));
      assert.equal(r.code, rq.code, r.stderr + rq.stderr);
      for (const name of ["a", "b", "c"]) {
        assert.deepEqual(
          await dirtyExtents(v, name),
          await dirtyExtents(q, name),
          `${seed} ${name}`,
        );
      }
      const check = await runTool("qemu-img", ["check", v]);
      assert.equal(check.code, 0, check.stdout);
    }
  },
});
