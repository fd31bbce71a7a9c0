/**
 * `vstor run` with a drive's `aio=` (issue #16): the guest's verified writes go through io_uring
 * (and `native`) with many requests in flight, on O_DIRECT and page-cached images, and read back
 * the same through the synchronous path; bad combinations are usage errors with QEMU's words.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { machineFromArgs } from "../../src/cli/run_args.ts";
import { EXIT_OK, main, UsageError } from "../../src/cli/main.ts";
import { ignoreWithoutUring } from "../sys/uring_available.ts";

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (t) => stdout += t, stderr: (t) => stderr += t });
  return { code, stdout, stderr };
}

Deno.test("--drive aio= takes threads, io_uring and native (native only with O_DIRECT)", () => {
  const config = machineFromArgs(
    ["file=a.raw,id=a,cache=none,aio=native", "file=b.raw,id=b,aio=io_uring", "file=c,id=c"],
    ["virtio-blk,drive=a", "virtio-blk,drive=b", "virtio-blk,drive=c"],
  );
  const drives = config.devices!.map((d) => d.drive!);
  assert.equal(drives[0]!.aio, "native");
  assert.equal(drives[1]!.aio, "io_uring");
  assert.equal(drives[2]!.aio, undefined);
  assert.throws(
    () => machineFromArgs(["file=a,id=a,aio=posix"], ["virtio-blk,drive=a"]),
    (e) => e instanceof UsageError && /aio must be threads, io_uring or native/.test(e.message),
  );
  assert.throws(
    () => machineFromArgs(["file=a,id=a,aio=native"], ["virtio-blk,drive=a"]),
    /aio=native was specified, but it requires cache=none or directsync/,
  );
});

for (
  const [cache, aio] of [["none", "io_uring"], ["directsync", "native"], ["writeback", "io_uring"]]
) {
  Deno.test({
    name:
      `a guest's verified random writes at depth 32 through cache=${cache},aio=${aio} read back`,
    ignore: ignoreWithoutUring,
    async fn() {
      // /var/tmp: a disk file system that takes O_DIRECT (tmpfs would refuse it).
      const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "vstor_run_aio_" });
      try {
        const disk = join(dir, "disk.raw");
        await Deno.writeFile(disk, new Uint8Array(8 << 20));
        const job = [
          "--name=w",
          "--rw=randwrite",
          "--bs=4k",
          "--iodepth=32",
          "--size=8m",
          "--verify=crc32c",
          "--seed=11",
        ];
        const r = await vstor(
          "run",
          "-q",
          "--drive",
          `file=${disk},format=raw,id=d0,cache=${cache},aio=${aio}`,
          "--device",
          "virtio-blk,drive=d0",
          ...job,
        );
        assert.equal(r.code, EXIT_OK, r.stderr + r.stdout);
        // The same blocks, read through the synchronous page-cached path.
        const again = await vstor(
          "run",
          "-q",
          "--drive",
          `file=${disk},format=raw,id=d0,readonly=on`,
          "--device",
          "virtio-blk,drive=d0",
          ...job,
          "--verify_only",
          "--output-format=json",
        );
        assert.equal(again.code, EXIT_OK, again.stderr + again.stdout);
        const checked = JSON.parse(again.stdout).jobs[0].vstor.verify.checked;
        assert.equal(checked, 2048, "every 4 KiB block of the 8 MiB verified");
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}
