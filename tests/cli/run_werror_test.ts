/**
 * `vstor run` with `werror=`: a guest fills a raw image on a 2 MiB tmpfs. `report` fails the job,
 * `ignore` lets it complete, `stop` (and the default, `enospc`) stops the VM, which `vstor run`
 * says, exiting 1 with the image closed and every acknowledged write in it. Needs root (mount).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { EXIT_ERROR, EXIT_OK, main, UsageError } from "../../src/cli/main.ts";
import { machineFromArgs } from "../../src/cli/run_args.ts";
import { parseMachineConfig } from "../../src/machine/config.ts";
import { ignoreWithout, runTool } from "../interop/qemu.ts";

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (t) => stdout += t, stderr: (t) => stderr += t });
  return { code, stdout, stderr };
}

async function sh(cmd: string, ...args: string[]): Promise<void> {
  const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
}

/** Runs `fn` with a directory on a fresh 2 MiB tmpfs holding an 8 MiB (sparse) raw image. */
async function onSmallTmpfs(
  format: "raw" | "qcow2",
  fn: (image: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vstor_werror_" });
  await sh("mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", dir);
  try {
    const image = join(dir, `disk.${format}`);
    assert.equal((await runTool("qemu-img", ["create", "-q", "-f", format, image, "8M"])).code, 0);
    await fn(image);
  } finally {
    await sh("umount", dir);
    await Deno.remove(dir, { recursive: true });
  }
}

/** A sequential writer over the whole disk, one request at a time: it fills the tmpfs. */
function fill(image: string, format: string, driveOptions: string, scsi = false): string[] {
  return [
    "run",
    "--drive",
    `file=${image},format=${format},id=d0${driveOptions}`,
    ...(scsi
      ? ["--device", "virtio-scsi,id=s0", "--device", "scsi-hd,bus=s0,drive=d0"]
      : ["--device", "virtio-blk,drive=d0"]),
    "--name=fill",
    "--rw=write",
    "--bs=64k",
    "--iodepth=1",
    "--verify=crc32c",
    "--seed=5",
    "-q",
  ];
}

Deno.test("--drive werror=/rerror= reach the machine's drive; QEMU's defaults otherwise", () => {
  const config = machineFromArgs(
    ["file=a.raw,id=d0,werror=stop,rerror=ignore", "file=b.raw,id=d1"],
    ["virtio-blk,drive=d0", "virtio-blk,drive=d1"],
  );
  const drives = parseMachineConfig(config).devices.map((d) => d.drives[0]!);
  assert.deepEqual(drives.map((d) => [d.id, d.werror, d.rerror]), [
    ["d0", "stop", "ignore"],
    ["d1", "enospc", "report"],
  ]);
  assert.throws(
    () => machineFromArgs(["file=a.raw,id=d0,werror=halt"], ["virtio-blk,drive=d0"]),
    (e) =>
      e instanceof UsageError &&
      /werror: 'halt' is not report, ignore, stop or enospc/.test(e.message),
  );
});

const canMount = Deno.build.os === "linux" && Deno.uid() === 0;
const ignore = ignoreWithout("qemu-img") || !canMount;

Deno.test({
  name: "vstor run werror=report: the guest gets the error and the job reports it (exit 1)",
  ignore,
  async fn() {
    await onSmallTmpfs("raw", async (image) => {
      const r = await vstor(...fill(image, "raw", ",werror=report"));
      assert.equal(r.code, EXIT_ERROR, r.stderr + r.stdout);
      assert.doesNotMatch(r.stderr, /the VM stopped/);
      assert.match(r.stdout, /errors=[1-9]/);
    });
  },
});

Deno.test({
  name:
    "vstor run werror=ignore: the failed writes complete as successes and the job ends (exit 0)",
  ignore,
  async fn() {
    await onSmallTmpfs("raw", async (image) => {
      // Verify off: the blocks that did not fit read back as zeroes.
      const args = fill(image, "raw", ",werror=ignore").filter((a) => !a.startsWith("--verify"));
      const r = await vstor(...args);
      assert.equal(r.code, EXIT_OK, r.stderr + r.stdout);
      assert.match(r.stdout, /8MiB/);
    });
  },
});

for (const werror of ["stop", "enospc (the default)"]) {
  Deno.test({
    name:
      `vstor run werror=${werror}: the VM stops, vstor says why and exits 1; the image is closed and holds every acknowledged write`,
    ignore,
    async fn() {
      await onSmallTmpfs("raw", async (image) => {
        const opt = werror === "stop" ? ",werror=stop" : "";
        const r = await vstor(...fill(image, "raw", opt));
        assert.equal(r.code, EXIT_ERROR, r.stderr + r.stdout);
        assert.match(
          r.stderr,
          /the VM stopped: io error on drive d0 \(write\): No space left on device/,
        );
        // Closed (a read-only open would conflict with a writer's lock), and the first MiB —
        // acknowledged long before the tmpfs filled at 2 MiB — verifies.
        const again = await vstor(
          ...fill(image, "raw", ",readonly=on"),
          "--verify_only",
          "--size=1m",
        );
        assert.equal(again.code, EXIT_OK, again.stderr + again.stdout);
        assert.match(again.stdout, /16 blocks checked, 0 failed/);
      });
    },
  });
}

Deno.test({
  name: "vstor run werror=stop on a qcow2 that fills: qemu-img check finds no corruption",
  ignore,
  async fn() {
    await onSmallTmpfs("qcow2", async (image) => {
      const r = await vstor(...fill(image, "qcow2", ",werror=stop"));
      assert.equal(r.code, EXIT_ERROR, r.stderr + r.stdout);
      assert.match(r.stderr, /the VM stopped: io error on drive d0/);
      const check = await runTool("qemu-img", ["check", image]);
      // 0: clean; 3: leaked clusters only (QEMU leaves them too when a write fails on ENOSPC).
      assert.ok(check.code === 0 || check.code === 3, check.stdout + check.stderr);
      assert.doesNotMatch(check.stdout + check.stderr, /ERROR|corrupt/i);
    });
  },
});

Deno.test({
  name:
    "vstor run on a virtio-scsi disk: werror=report gives the guest CHECK CONDITION, werror=stop stops the VM and says why",
  ignore,
  async fn() {
    await onSmallTmpfs("raw", async (image) => {
      const report = await vstor(...fill(image, "raw", ",werror=report", true));
      assert.equal(report.code, EXIT_ERROR, report.stderr + report.stdout);
      assert.doesNotMatch(report.stderr, /the VM stopped/);
      assert.match(report.stdout, /errors=[1-9]/);
    });
    await onSmallTmpfs("raw", async (image) => {
      const r = await vstor(...fill(image, "raw", ",werror=stop", true));
      assert.equal(r.code, EXIT_ERROR, r.stderr + r.stdout);
      assert.match(
        r.stderr,
        /the VM stopped: io error on drive d0 \(write\): No space left on device/,
      );
      const again = await vstor(
        ...fill(image, "raw", ",readonly=on", true),
        "--verify_only",
        "--size=1m",
      );
      assert.equal(again.code, EXIT_OK, again.stderr + again.stdout);
      assert.match(again.stdout, /16 blocks checked, 0 failed/);
    });
  },
});
