import assert from "node:assert/strict";
import { join, resolve } from "node:path";
import { main } from "../../src/cli/main.ts";
import { ignoreWithout } from "../interop/qemu.ts";

const dir = Deno.makeTempDirSync({ prefix: "vstor_dropin_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

async function run(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

const TRY = "Try 'qemu-img --help' for more information\n";

Deno.test("vstor qemu-img usage mistakes say qemu-img: and exit 1, as qemu-img does", async () => {
  const cases: [string[], string][] = [
    [[], `qemu-img: Not enough arguments\n${TRY}`],
    [["frobnicate"], `qemu-img: Command not found: frobnicate\n${TRY}`],
    [["io", "x"], `qemu-img: Command not found: io\n${TRY}`],
    [["--bogus"], `qemu-img: unrecognized option '--bogus'\n${TRY}`],
    [["create"], `qemu-img: Expecting image file name\n${TRY}`],
    [["info", "--bogus", "x"], `qemu-img: unrecognized option '--bogus'\n${TRY}`],
    [["info", "-x", "x"], `qemu-img: unrecognized option '-x'\n${TRY}`],
    [["info", "-f"], `qemu-img: missing argument for option '-f'\n${TRY}`],
    [["info", "a", "b"], `qemu-img: Expecting one image file name\n${TRY}`],
    [["create", "-f", "qcow2", "x"], "qemu-img: x: Image creation needs a size parameter\n"],
    [["create", "-f", "bogus", "x", "1M"], "qemu-img: x: Unknown file format 'bogus'\n"],
    [
      ["check", "-r", "x", "a"],
      `qemu-img: Unknown option value for -r (expecting 'leaks' or 'all'): x\n${TRY}`,
    ],
    [["snapshot", "-l", "-c", "s", "a"], `qemu-img: Cannot mix '-l', '-a', '-c', '-d'\n${TRY}`],
    [["rebase", "a"], `qemu-img: Must specify backing file (-b) or use unsafe mode (-u)\n${TRY}`],
    [["dd", "if=a"], "qemu-img: Must specify both input and output files\n"],
    [["dd", "osize=1", "if=a", "of=b"], "qemu-img: unrecognized operand osize\n"],
    [
      ["bitmap", "a", "b"],
      "qemu-img: Need at least one of --add, --remove, --clear, --enable, --disable, or --merge\n",
    ],
  ];
  for (const [args, stderr] of cases) {
    const r = await run("qemu-img", ...args);
    assert.equal(r.code, 1, args.join(" "));
    assert.equal(r.stderr, stderr, args.join(" "));
    assert.equal(r.stdout, "", args.join(" "));
  }
});

Deno.test("vstor qemu-img open failures name the image as qemu-img's img_open does", async () => {
  const missing = join(dir, "missing.qcow2");
  const r = await run("qemu-img", "info", missing);
  assert.equal(r.code, 1);
  assert.equal(
    r.stderr,
    `qemu-img: Could not open '${missing}': Could not open '${missing}': No such file or directory\n`,
  );
  // Plain vstor keeps its own prefix and wording.
  const plain = await run("info", missing);
  assert.equal(plain.code, 1);
  assert.match(plain.stderr, /^vstor: /);
});

Deno.test("plain vstor keeps its prefix and exit 2 for the same usage mistakes", async () => {
  const r = await run("info", "--bogus", "x");
  assert.equal(r.code, 2);
  assert.match(r.stderr, /^vstor info: unrecognized option '--bogus'\nusage: vstor info/);
  assert.equal((await run("frobnicate")).code, 2);
});

Deno.test("vstor qemu-img --version, -V, --help and VERB --help answer as qemu-img", async () => {
  for (const flag of ["--version", "-V"]) {
    const r = await run("qemu-img", flag);
    assert.equal(r.code, 0);
    // The shape scripts parse: "qemu-img version X.Y.Z", then who we are.
    assert.match(r.stdout, /^qemu-img version 7\.2\.\d+ \(vstor[^)]*\)\n.+\n$/);
  }
  const help = await run("qemu-img", "--help");
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^qemu-img version 7\.2/);
  assert.match(help.stdout, /\nusage: qemu-img \[standard options\] command \[command options\]\n/);
  assert.match(help.stdout, /\n {2}convert \[--object objectdef\]/);
  assert.match(help.stdout, /\nSupported formats: .*qcow2.*\n/);
  for (const args of [["info", "--help"], ["check", "-h"], ["-h"]]) {
    const r = await run("qemu-img", ...args);
    assert.equal(r.code, 0, args.join(" "));
    assert.equal(r.stdout, help.stdout, args.join(" "));
  }
  // -T (tracing) is accepted and ignored before the command.
  const traced = await run("qemu-img", "-T", "foo", "create", "-q", join(dir, "t.raw"), "1M");
  assert.equal(traced.code, 0, traced.stderr);
});

Deno.test("vstor qemu-img -p prints qemu-img's progress lines even when stdout is a pipe", async () => {
  const src = join(dir, "p.raw"), dst = join(dir, "p.qcow2");
  Deno.writeFileSync(src, new Uint8Array(4 << 20).fill(7));
  const r = await run("qemu-img", "convert", "-p", "-O", "qcow2", src, dst);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^ {4}\(0\.00\/100%\)\r/);
  assert.match(r.stdout, / {4}\(100\.00\/100%\)\r\n$/);
  for (const step of r.stdout.split("\r").slice(0, -1)) {
    assert.match(step, /^ {4}\(\d{1,3}\.\d\d\/100%\)$/);
  }
  const cmp = await run("qemu-img", "compare", "-p", src, dst);
  assert.equal(cmp.code, 0);
  assert.match(cmp.stdout, /\(100\.00\/100%\)\rImages are identical\.\n\n$/);
  // -q wins over -p, as in qemu-img.
  assert.equal((await run("qemu-img", "convert", "-p", "-q", "-O", "raw", dst, src)).stdout, "");
});

// Sizes stay multiples of 512 and the snapshotted image is only listed: see the report of issue #13
// for the differences that remain there (qemu rounds a raw file's size up to a sector; its
// snapshot create/delete/apply reuse and punch clusters, which "disk size" and check's "Image end
// offset" show).
const SCRIPT = `
set -u
run() { echo "\\$ $*"; "$@" 2>&1; echo "[exit $?]"; }
printf 'hello, world' > data.raw
truncate -s 1M data.raw
run qemu-img create -f qcow2 empty.qcow2 16M
run qemu-img create -f qcow2 -o cluster_size=4k,lazy_refcounts=on small.qcow2 1M
run qemu-img info empty.qcow2
run qemu-img info --output=json small.qcow2
run qemu-img check empty.qcow2
run qemu-img check --output=json small.qcow2
run qemu-img convert -O qcow2 data.raw data.qcow2
run qemu-img convert -c -O qcow2 data.raw packed.qcow2
run qemu-img compare data.raw data.qcow2
run qemu-img compare -f raw -F qcow2 data.raw packed.qcow2
run qemu-img compare empty.qcow2 data.qcow2
run qemu-img convert -O qcow2 data.raw snap.qcow2
run qemu-img snapshot -c first snap.qcow2
run qemu-img snapshot -c second snap.qcow2
run qemu-img snapshot -d first snap.qcow2
run qemu-img snapshot -l snap.qcow2
run qemu-img snapshot -a second snap.qcow2
run qemu-img snapshot -d nope snap.qcow2
run qemu-img create -f qcow2 -b data.qcow2 -F qcow2 top.qcow2
run qemu-img info --backing-chain top.qcow2
run qemu-img map --output=json top.qcow2
run qemu-img convert -O raw top.qcow2 flat.raw
run qemu-img compare flat.raw data.raw
run qemu-img resize top.qcow2 -1M
run qemu-img resize top.qcow2 +1M
run qemu-img check nosuch.qcow2
run qemu-img info
run qemu-img frobnicate
run qemu-img convert -p -O raw data.qcow2 p.raw
`;

/**
 * Dates in snapshot lists differ from run to run, and -p's intermediate steps follow each
 * program's own chunking; nothing else may differ.
 */
function mask(text: string): string {
  return text.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, "DATE")
    .replace(/"date-(sec|nsec)": \d+/g, '"date-$1": X')
    .replace(/ {4}\((?!0\.00\/|100\.00\/)\d+\.\d\d\/100%\)\r/g, "");
}

async function runScript(cwd: string, path: string): Promise<string> {
  Deno.writeTextFileSync(join(cwd, "script.sh"), SCRIPT);
  const out = await new Deno.Command("sh", {
    args: ["script.sh"],
    cwd,
    env: { PATH: path },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return dec.decode(out.stdout) + dec.decode(out.stderr);
}

Deno.test({
  name: "qemu-img wrappers on PATH run a qemu-img script unchanged, with qemu-img's output",
  ignore: ignoreWithout("qemu-img"),
  async fn() {
    const mod = resolve(import.meta.dirname!, "../../mod.ts");
    const bin = join(dir, "bin");
    Deno.mkdirSync(bin);
    // The wrappers the README's "Drop-in mode" section shows.
    for (const prog of ["qemu-img", "qemu-io"]) {
      Deno.writeTextFileSync(
        join(bin, prog),
        `#!/bin/sh\nexec "${Deno.execPath()}" run -A "${mod}" ${prog} "$@"\n`,
        { mode: 0o755 },
      );
    }
    const path = Deno.env.get("PATH") ?? "/usr/bin:/bin";
    const ours = join(dir, "ours"), theirs = join(dir, "theirs");
    Deno.mkdirSync(ours);
    Deno.mkdirSync(theirs);
    const which = await new Deno.Command("sh", {
      args: ["-c", "command -v qemu-img"],
      env: { PATH: `${bin}:${path}` },
      stdout: "piped",
    }).output();
    assert.equal(new TextDecoder().decode(which.stdout).trim(), join(bin, "qemu-img"));
    const expected = mask(await runScript(theirs, path));
    const actual = mask(await runScript(ours, `${bin}:${path}`));
    assert.equal(actual, expected);
  },
});
