import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";

const MOD = new URL("../../mod.ts", import.meta.url).pathname;
const dir = Deno.makeTempDirSync({ prefix: "vstor_create_errors_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

/**
 * Deno's own caches (module analysis, emitted code, V8's code cache) are SQLite files and directories
 * under DENO_DIR, several MiB each: a `deno run` that writes to them under `ulimit -f` is killed by
 * SIGXFSZ before vstor starts (it happened whenever a module changed, or under load when a WAL
 * checkpoint came due). So the same command runs once without the limit first, and the limited run
 * skips V8's code cache: then only vstor writes under the limit.
 */
let warmed: Promise<void> | undefined;
function warmDenoCache(): Promise<void> {
  warmed ??= (async () => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MOD, "create", "-q", "-f", "qcow2", join(dir, "warm.qcow2"), "1M"],
      stdout: "null",
      stderr: "piped",
    }).output();
    if (!out.success) throw new Error(`warm-up failed: ${new TextDecoder().decode(out.stderr)}`);
  })();
  return warmed;
}

/** The CLI in its own process under `ulimit -f BLOCKS` (1 KiB blocks), as a user's shell runs it. */
async function underFileLimit(blocks: number, args: string[]) {
  await warmDenoCache();
  const quoted = args.map((a) => `'${a}'`).join(" ");
  const deno = `'${Deno.execPath()}' run -A --no-code-cache '${MOD}'`;
  const out = await new Deno.Command("bash", {
    args: ["-c", `ulimit -f ${blocks}; exec ${deno} ${quoted}`],
    cwd: dir,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, signal: out.signal, stderr: dec.decode(out.stderr) };
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

for (
  const [format, options] of [
    ["raw", "preallocation=off"],
    ["raw", "preallocation=full"],
    ["qcow2", "preallocation=full"],
    ["qcow2", "preallocation=falloc"],
  ] as const
) {
  Deno.test(`vstor create -f ${format} -o ${options} past the file size limit says "File too large" and leaves no file`, async () => {
    const path = join(dir, `limit_${format}_${options.slice(15)}.img`);
    const r = await underFileLimit(1000, [
      "create",
      "-q",
      "-f",
      format,
      "-o",
      options,
      path,
      "10M",
    ]);
    assert.equal(r.signal, null, "SIGXFSZ must not kill the process");
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^vstor: .*: Could not create the image: File too large \(.*ulimit -f/);
    assert.match(r.stderr, /the unfinished image was removed\n$/);
    assert.equal(exists(path), false);
  });
}

Deno.test("vstor qemu-img create past the file size limit answers as qemu-img", async () => {
  const path = join(dir, "limit_dropin.qcow2");
  const r = await underFileLimit(1000, [
    "qemu-img",
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "preallocation=full",
    path,
    "10M",
  ]);
  assert.equal(r.code, 1);
  assert.equal(
    r.stderr,
    `qemu-img: ${path}: The image size is too large for file format 'qcow2' (try using a larger cluster size)\n`,
  );
  assert.equal(exists(path), false);
});

Deno.test("vstor create within the file size limit succeeds", async () => {
  const path = join(dir, "small.qcow2");
  const r = await underFileLimit(1000, ["create", "-q", "-f", "qcow2", path, "10M"]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(exists(path), true);
});

Deno.test("vstor create with a bad qcow2 option leaves an existing file untouched", async () => {
  const path = join(dir, "keep.img");
  for (
    const [option, message] of [
      ["cluster_size=3k", "Cluster size must be a power of two between 512 and 2048k"],
      ["refcount_bits=3", "Refcount width must be a power of two and may not exceed 64 bits"],
      ["compat=v2,lazy_refcounts=on", "Lazy refcounts only supported with compatibility level 1.1"],
    ] as const
  ) {
    Deno.writeTextFileSync(path, "precious");
    const r = await vstor("create", "-f", "qcow2", "-o", option, path, "1M");
    assert.equal(r.code, 1);
    assert.equal(r.stdout, "", "refused before the Formatting line");
    assert.ok(r.stderr.startsWith(`vstor: ${path}: ${message}`), r.stderr);
    assert.equal(Deno.readTextFileSync(path), "precious");
  }
});

Deno.test("vstor create with a bad option value names it and creates nothing", async () => {
  const path = join(dir, "bad_value.qcow2");
  const r = await vstor("create", "-f", "qcow2", "-o", "cluster_size=3x", path, "1M");
  assert.equal(r.code, 2);
  assert.match(r.stderr, /^vstor create: Invalid size '3x' for 'cluster_size'/);
  assert.equal(exists(path), false);
});

Deno.test("vstor create into a directory or a missing directory says so as qemu-img", async () => {
  const sub = join(dir, "sub");
  Deno.mkdirSync(sub);
  const r = await vstor("create", "-q", sub, "1M");
  assert.equal(r.code, 1);
  assert.equal(r.stderr, `vstor: ${sub}: Could not create '${sub}': Is a directory\n`);
  assert.equal(Deno.statSync(sub).isDirectory, true);
  const missing = join(dir, "nodir", "x.img");
  const m = await vstor("create", "-q", missing, "1M");
  assert.equal(
    m.stderr,
    `vstor: ${missing}: Could not create '${missing}': No such file or directory\n`,
  );
});

/** A 1 MiB tmpfs, where this test may mount one (root in a mount namespace that allows it). */
async function smallDisk(): Promise<string | undefined> {
  const mnt = join(dir, "tmpfs");
  Deno.mkdirSync(mnt, { recursive: true });
  try {
    const out = await new Deno.Command("mount", {
      args: ["-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt],
      stdout: "null",
      stderr: "null",
    }).output();
    return out.success ? mnt : undefined;
  } catch {
    return undefined;
  }
}

Deno.test("vstor create that fills the disk says 'No space left on device' and removes its partial file", async (t) => {
  const mnt = await smallDisk();
  if (mnt === undefined) {
    // Without a small file system to fill, the cleanup path is covered by the file size limit.
    await t.step({ name: "no tmpfs can be mounted here", ignore: true, fn: () => {} });
    return;
  }
  try {
    for (
      const [format, options] of [["raw", "preallocation=full"], ["qcow2", "preallocation=falloc"]]
    ) {
      const path = join(mnt, `full.${format}`);
      const r = await vstor("create", "-q", "-f", format!, "-o", options!, path, "10M");
      assert.equal(r.code, 1);
      assert.equal(
        r.stderr,
        `vstor: ${path}: Could not create the image: No space left on device; the unfinished image was removed\n`,
      );
      assert.equal(exists(path), false);
    }
  } finally {
    await new Deno.Command("umount", { args: [mnt] }).output();
  }
});
