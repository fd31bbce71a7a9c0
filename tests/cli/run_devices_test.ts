/**
 * `vstor run` on the fully emulated disks (`ide-hd` in PIO and DMA mode, `ahci`) and
 * `--compare-devices`: verified jobs whose images qemu-img then checks and reads, the exits each
 * device costs per request, and the errors a bad attachment gets.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { machineFromArgs } from "../../src/cli/run_args.ts";
import { EXIT_OK, EXIT_USAGE, main } from "../../src/cli/main.ts";
import { Machine, MachineConfigError } from "../../mod.ts";
import { ignoreWithout, runTool } from "../interop/qemu.ts";

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (t) => stdout += t, stderr: (t) => stderr += t });
  return { code, stdout, stderr };
}

Deno.test("machineFromArgs maps --device ide-hd and ahci with their options; bad values are usage errors", () => {
  const config = machineFromArgs(
    ["file=a.qcow2,id=a", "file=b.raw,id=b"],
    ["ide-hd,drive=a,mode=pio,serial=S1", "ahci,drive=b,ncq=off,id=sata0"],
  );
  assert.deepEqual(config.devices, [
    {
      type: "ide-hd",
      id: "ide0",
      drive: { id: "a", file: "a.qcow2", readOnly: false, cache: "writeback" },
      options: { mode: "pio", serial: "S1" },
    },
    {
      type: "ahci",
      id: "sata0",
      drive: { id: "b", file: "b.raw", readOnly: false, cache: "writeback" },
      options: { ncq: false },
    },
  ]);
  assert.throws(
    () => machineFromArgs(["file=a,id=a"], ["ide-hd,drive=a,mode=udma"]),
    /mode: 'udma' is not pio or dma/,
  );
  assert.throws(
    () => machineFromArgs(["file=a,id=a"], ["ahci,drive=a,queue-size=8"]),
    /queue-size/,
  );
});

Deno.test("a machine refuses a third ide-hd (two channels, one master each) and a bad mode, naming the field", async () => {
  const drive = { file: "/nonexistent.qcow2" };
  await assert.rejects(
    () =>
      Machine.create({
        devices: [
          { type: "ide-hd", id: "a", drive },
          { type: "ide-hd", id: "b", drive },
          { type: "ide-hd", id: "c", drive, options: { mode: "fast" } },
        ],
      }),
    (e: unknown) => {
      assert.ok(e instanceof MachineConfigError);
      assert.match(e.message, /devices\[2\]\.options\.mode/);
      return true;
    },
  );
  await assert.rejects(
    () =>
      Machine.create({
        devices: [
          { type: "ide-hd", id: "a", drive },
          { type: "ide-hd", id: "b", drive },
          { type: "ide-hd", id: "c", drive },
        ],
      }),
    /devices\[2\]\.type: a machine holds at most 2 ide-hd devices \(two IDE channels/,
  );
});

for (
  const [device, expect] of [
    ["ide-hd,drive=d0,mode=pio", { minExits: 2000, maxExits: 2200 }],
    ["ide-hd,drive=d0,mode=dma", { minExits: 5, maxExits: 20 }],
    ["ahci,drive=d0", { minExits: 0, maxExits: 5 }],
  ] as const
) {
  Deno.test({
    name:
      `vstor run on ${device}: a verified job, the exits it cost, and an image qemu-img finds clean`,
    ignore: ignoreWithout("qemu-img"),
    async fn() {
      const dir = await Deno.makeTempDir({ prefix: "vstor-emulated-" });
      try {
        const image = join(dir, "disk.qcow2");
        assert.equal((await vstor("create", "-q", "-f", "qcow2", image, "8M")).code, EXIT_OK);
        const r = await vstor(
          "run",
          "--drive",
          `file=${image},id=d0`,
          "--device",
          device,
          "--name=w",
          "--rw=randwrite",
          "--bs=4k",
          "--size=256k",
          "--iodepth=8",
          "--verify=crc32c",
          "--output-format=json",
          "-q",
        );
        assert.equal(r.code, EXIT_OK, r.stderr);
        const json = JSON.parse(r.stdout);
        const job = json.jobs[0];
        assert.equal(job.error, 0);
        assert.equal(job.write.total_ios, 64);
        const vstorDevice = json.vstor.devices[0];
        assert.equal(vstorDevice.kind, device.split(",")[0]);
        const perRequest = vstorDevice.virtio.exitsPerRequest as number;
        assert.ok(
          perRequest >= expect.minExits && perRequest <= expect.maxExits,
          `${device}: ${perRequest} exits per request`,
        );
        const check = await runTool("qemu-img", ["check", "-f", "qcow2", image]);
        assert.equal(check.code, 0, check.stdout + check.stderr);
        // Every 4 KiB block the job wrote holds data (crc32c verify headers), and none is a hole.
        const map = await runTool("qemu-img", ["map", "--output=json", "-f", "qcow2", image]);
        const extents = JSON.parse(map.stdout) as Array<
          { start: number; length: number; data: boolean }
        >;
        const data = extents.filter((e) => e.data && e.start < 256 * 1024)
          .reduce((n, e) => n + Math.min(e.length, 256 * 1024 - e.start), 0);
        assert.equal(data, 256 * 1024);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}

Deno.test("vstor run --compare-devices prints one row per device; exits per request fall from IDE PIO to virtio", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vstor-compare-" });
  try {
    const image = join(dir, "disk.raw");
    assert.equal((await vstor("create", "-q", "-f", "raw", image, "4M")).code, EXIT_OK);
    const r = await vstor(
      "run",
      "--drive",
      `file=${image},format=raw,id=d0`,
      "--device",
      "virtio-blk,drive=d0",
      "--name=r",
      "--rw=randread",
      "--bs=4k",
      "--size=512k",
      "--iodepth=16",
      "--compare-devices",
      "--html",
      join(dir, "compare.html"),
      "-q",
    );
    assert.equal(r.code, EXIT_OK, r.stderr);
    // The page opens with the same table, then one section per device.
    const html = await Deno.readTextFile(join(dir, "compare.html"));
    const summary = html.slice(html.indexOf("<table"), html.indexOf("</table>"));
    assert.equal(summary.match(/<tr>/g)?.length, 7, "a header and six devices");
    assert.match(summary, /IDE \(PIO\)[\s\S]*virtio-scsi/);
    const lines = r.stdout.trimEnd().split("\n");
    assert.match(lines[0]!, /^device\s+IOPS\s+requests\s+exits\/req\s+interrupts\/req/);
    const labels = lines.slice(1).map((l) => l.split(/\s{2,}/)[0]);
    assert.deepEqual(labels, [
      "IDE (PIO)",
      "IDE (DMA)",
      "AHCI (NCQ)",
      "virtio-blk, trapped doorbells",
      "virtio-blk, ioeventfd + event-idx",
      "virtio-scsi",
    ]);
    const exits = lines.slice(1).map((l) => Number(l.trim().split(/\s{2,}/)[3]!.replace(/,/g, "")));
    assert.ok(exits[0]! > 2000, `IDE PIO ${exits[0]}`);
    assert.ok(exits[1]! < exits[0]! && exits[1]! >= 5, `IDE DMA ${exits[1]}`);
    assert.ok(exits[2]! < exits[1]!, `AHCI ${exits[2]}`);
    assert.ok(exits[4]! < 0.1, `virtio-blk ioeventfd ${exits[4]}`);
    for (const line of lines.slice(1)) {
      assert.equal(line.trim().split(/\s{2,}/)[2], "128", `every device ran 128 requests: ${line}`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("vstor run --compare-devices needs exactly one drive, and not --compare-notifications too", async () => {
  const two = await vstor(
    "run",
    "--drive",
    "file=a.raw,format=raw,id=a",
    "--drive",
    "file=b.raw,format=raw,id=b",
    "--device",
    "virtio-blk,drive=a",
    "--device",
    "virtio-blk,drive=b",
    "--compare-devices",
  );
  assert.equal(two.code, EXIT_USAGE);
  assert.match(two.stderr, /attach exactly one drive \(got 2\)/);
  const both = await vstor(
    "run",
    "--drive",
    "file=a.raw,format=raw,id=a",
    "--device",
    "virtio-blk,drive=a",
    "--compare-devices",
    "--compare-notifications",
  );
  assert.equal(both.code, EXIT_USAGE);
  assert.match(both.stderr, /either --compare-notifications or --compare-devices/);
});
