/**
 * `vstor run`: QEMU-style attachment options, usage errors, and real runs of the simulated guest
 * whose images qemu-img then checks and compares.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { machineFromArgs, parseKeyValues } from "../../src/cli/run_args.ts";
import { EXIT_ERROR, EXIT_OK, EXIT_USAGE, main, UsageError } from "../../src/cli/main.ts";
import { ignoreWithout, runTool } from "../interop/qemu.ts";

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (t) => stdout += t, stderr: (t) => stderr += t });
  return { code, stdout, stderr };
}

Deno.test("parseKeyValues reads QEMU's key=value lists, with ,, as a literal comma", () => {
  const m = parseKeyValues("virtio-blk,drive=d0,serial=a,,b", "--device");
  assert.deepEqual([...m], [["driver", "virtio-blk"], ["drive", "d0"], ["serial", "a,b"]]);
  assert.throws(() => parseKeyValues("file=a,,,", "--drive"), UsageError);
  assert.throws(() => parseKeyValues("a=1,b", "--drive"), /needs a value/);
  assert.throws(() => parseKeyValues("a=1,a=2", "--drive"), /given twice/);
});

Deno.test("machineFromArgs maps --drive/--device to a machine: blk, scsi with two LUNs", () => {
  const config = machineFromArgs(
    [
      "file=clone.qcow2,format=qcow2,id=d0",
      "file=base.qcow2,id=d1,readonly=on",
      "file=data.raw,id=d2,cache=writethrough",
    ],
    [
      "virtio-blk-pci,drive=d0,num-queues=2,event-idx=off,packed=on,ioeventfd=off,serial=s1",
      "virtio-scsi,id=s0",
      "scsi-hd,bus=s0.0,drive=d1,lun=0",
      "scsi-hd,bus=s0,drive=d2,lun=3,scsi-id=1",
    ],
    512,
  );
  assert.deepEqual(config, {
    memoryMiB: 512,
    devices: [
      {
        type: "virtio-blk",
        id: "blk0",
        drive: {
          id: "d0",
          file: "clone.qcow2",
          format: "qcow2",
          readOnly: false,
          cache: "writeback",
        },
        numQueues: 2,
        eventIdx: false,
        packed: true,
        ioeventfd: false,
        options: { serial: "s1" },
      },
      {
        type: "virtio-scsi",
        id: "s0",
        drives: [
          { id: "d1", file: "base.qcow2", readOnly: true, cache: "writeback" },
          { id: "d2", file: "data.raw", readOnly: false, cache: "writethrough" },
        ],
        options: { luns: [{ target: 0, lun: 0 }, { target: 1, lun: 3 }] },
      },
    ],
  });
});

Deno.test("machineFromArgs names what is wrong", () => {
  const cases: Array<[string[], string[], RegExp]> = [
    [["format=raw"], [], /--drive 1: file= is required/],
    [["file=a,id=x", "file=b,id=x"], [], /drive id 'x' is used twice/],
    [["file=a,cache=nocache"], ["virtio-blk,drive=drive0"], /cache must be/],
    [["file=a,readonly=maybe"], [], /'maybe' is not on or off/],
    [["file=a,id=d"], ["virtio-blk,drive=e"], /no --drive with id 'e'/],
    [["file=a,id=d"], ["virtio-blk,drive=d", "virtio-blk,drive=d"], /attached twice/],
    [["file=a,id=d"], [], /--drive d is not attached/],
    [["file=a,id=d"], ["virtio-net,drive=d"], /unknown device 'virtio-net'/],
    [["file=a,id=d"], ["virtio-blk,drive=d,bogus=1"], /unknown option 'bogus'/],
    [["file=a,id=d"], ["virtio-blk,drive=d,num-queues=two"], /'two' is not a whole number/],
    [["file=a,id=d"], ["scsi-hd,bus=s0,drive=d"], /no virtio-scsi with id 's0'/],
  ];
  for (const [drives, devices, message] of cases) {
    assert.throws(() => machineFromArgs(drives, devices), message);
  }
});

Deno.test("vstor run refuses bad options with exit 2 and a bad machine with exit 1", async () => {
  assert.equal((await vstor("run", "--rw=randread")).code, EXIT_USAGE);
  assert.equal((await vstor("run", "--drive")).code, EXIT_USAGE);
  assert.equal((await vstor("run", "--output=xml")).code, EXIT_USAGE);
  const dir = await Deno.makeTempDir({ prefix: "vstor_run_cli_" });
  try {
    const file = join(dir, "m.json");
    await Deno.writeTextFile(file, JSON.stringify({ devices: [{ type: "virtio-blk", id: "d" }] }));
    const r = await vstor("run", "--machine", file);
    assert.equal(r.code, EXIT_ERROR);
    assert.match(r.stderr, /devices\[0\]/);
    await Deno.writeTextFile(file, JSON.stringify({ memoryMiB: 0, devices: [] }));
    const r2 = await vstor("run", "--machine", file);
    assert.equal(r2.code, EXIT_ERROR);
    assert.match(r2.stderr, /memoryMiB: must be ≥ 1/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name:
    "vstor run writes through virtio-blk into a qcow2 that qemu-img then finds clean and equal to a raw copy",
  ignore: ignoreWithout("qemu-img"),
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_run_cli_" });
    try {
      const disk = join(dir, "disk.qcow2"), copy = join(dir, "copy.raw");
      assert.equal(
        (await runTool("qemu-img", ["create", "-q", "-f", "qcow2", disk, "16M"])).code,
        0,
      );
      const r = await vstor(
        "run",
        "--drive",
        `file=${disk},format=qcow2,id=d0`,
        "--device",
        "virtio-blk,drive=d0,num-queues=2",
        "--name=w",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--numjobs=2",
        "--size=4m",
        "--offset_increment=4m",
        "--verify=crc32c",
        "--seed=7",
        "-q",
      );
      assert.equal(r.code, EXIT_OK, r.stderr + r.stdout);
      assert.match(r.stdout, /kicks/);
      const check = await runTool("qemu-img", ["check", disk]);
      assert.equal(check.code, 0, check.stdout + check.stderr);
      // The data the guest wrote survives a conversion and reads back the same: verify_only.
      assert.equal(
        (await runTool("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", disk, copy])).code,
        0,
      );
      assert.equal((await runTool("qemu-img", ["compare", disk, copy])).code, 0);
      const again = await vstor(
        "run",
        "--drive",
        `file=${copy},format=raw,id=d0,readonly=on`,
        "--device",
        "virtio-blk,drive=d0,num-queues=2",
        "--name=w",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--numjobs=2",
        "--size=4m",
        "--offset_increment=4m",
        "--verify=crc32c",
        "--verify_only",
        "--seed=7",
        "--output=json",
      );
      assert.equal(again.code, EXIT_OK, again.stderr + again.stdout);
      const json = JSON.parse(again.stdout);
      assert.ok(Array.isArray(json.jobs));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "the main job passes, and qemu-img finds both images clean with the clone holding what the guest wrote",
  ignore: ignoreWithout("qemu-img"),
  async fn() {
    const { mainJob, CLONE_JOB } = await import("../../src/cli/main_job.ts");
    const dir = await Deno.makeTempDir({ prefix: "vstor_main_job_" });
    try {
      let stdout = "", stderr = "";
      const code = await mainJob(
        { stdout: (t) => stdout += t, stderr: (t) => stderr += t },
        { output: "json", quiet: true, dir },
      );
      assert.equal(code, EXIT_OK, stderr + stdout);
      const report = JSON.parse(stdout);
      assert.equal(report.vstor.ok, true);
      // fio's JSON: the clone's two clones, with fio's fields and integers where fio has them.
      assert.equal(report.jobs.length, 3);
      for (const job of report.jobs) {
        for (const key of ["io_bytes", "io_kbytes", "bw", "bw_bytes", "runtime", "total_ios"]) {
          assert.ok(Number.isInteger(job.read[key]), `${key} is an integer`);
        }
      }
      for (const image of ["base.qcow2", "clone.qcow2"]) {
        const check = await runTool("qemu-img", ["check", join(dir, image)]);
        assert.equal(check.code, 0, `${image}: ${check.stdout}${check.stderr}`);
      }
      const info = await runTool("qemu-img", ["snapshot", "-l", join(dir, "base.qcow2")]);
      assert.match(info.stdout, /installed/);
      // Flattened by qemu-img, the clone still holds every block the guest wrote: verify_only.
      const flat = join(dir, "flat.raw");
      const conv = await runTool("qemu-img", [
        "convert",
        "-O",
        "raw",
        join(dir, "clone.qcow2"),
        flat,
      ]);
      assert.equal(conv.code, 0, conv.stderr);
      const again = await vstor(
        "run",
        "--drive",
        `file=${flat},format=raw,id=d0,readonly=on`,
        "--device",
        "virtio-blk,drive=d0,num-queues=2",
        ...CLONE_JOB,
        "--verify_only",
        "--output=json",
      );
      assert.equal(again.code, EXIT_OK, again.stderr + again.stdout);
      const checked = JSON.parse(again.stdout).jobs.reduce(
        (n: number, j: { vstor: { verify?: { checked: number } } }) =>
          n + (j.vstor.verify?.checked ?? 0),
        0,
      );
      assert.ok(checked > 0, "verify_only checked the blocks the guest wrote");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
