/**
 * A real Linux guest on `vstor serve` (issue #17): QEMU 7.2 (`qemu-system-x86_64 -accel tcg`)
 * boots a Debian cloud kernel with a busybox initramfs (../shared/guest/recipe.sh) whose disks are
 * vhost-user-blk-pci (a qcow2 with two packed queues through O_DIRECT and io_uring) and
 * vhost-user-scsi-pci (a qcow2 over a raw backing file) served by vstor, and a virtio-blk-pci disk
 * whose drive is QEMU's NBD client on vstor's NBD export of a third qcow2 (issue #18). One boot
 * runs every check: block data written and read back with dd on each disk, fio with crc32c
 * verification at depth 16 on the vhost-user and NBD qcow2s; afterwards `qemu-img check` finds
 * the qcow2 images clean and `qemu-img compare` finds the SCSI overlay equal to its backing
 * file's bytes with what the guest wrote on top. Skipped without QEMU's system emulator, a cloud kernel and busybox, unless
 * VSTOR_REQUIRE_GUEST=1 (which .ci/run sets after installing them).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Daemon } from "../../src/serve/daemon.ts";
import { parseServeArgs } from "../../src/serve/options.ts";
import { runTool } from "./qemu.ts";

const RECIPE = new URL("../../../shared/guest/recipe.sh", import.meta.url).pathname;

function guestMissing(): string | null {
  const missing: string[] = [];
  const which = (cmd: string) =>
    new Deno.Command("sh", { args: ["-c", `command -v ${cmd}`], stdout: "null", stderr: "null" })
      .outputSync().success;
  if (!which("qemu-system-x86_64")) missing.push("qemu-system-x86_64 (qemu-system-x86)");
  try {
    if (![...Deno.readDirSync("/boot")].some((e) => /^vmlinuz-.*-cloud-amd64$/.test(e.name))) {
      missing.push("a cloud kernel (linux-image-cloud-amd64)");
    }
  } catch {
    missing.push("/boot");
  }
  try {
    Deno.statSync("/bin/busybox");
  } catch {
    missing.push("busybox (busybox-static)");
  }
  try {
    Deno.statSync(RECIPE);
  } catch {
    missing.push(RECIPE);
  }
  return missing.length === 0 ? null : missing.join(", ");
}

const missing = guestMissing();
if (missing !== null && Deno.env.get("VSTOR_REQUIRE_GUEST") === "1") {
  throw new Error(`VSTOR_REQUIRE_GUEST=1 but the guest needs: ${missing}`);
}

/** The line the guest repeats (with `yes`) into the SCSI disk: the host rebuilds the same bytes. */
const PATTERN_LINE = "vstor-guest-pattern-0123456789";

/** What the guest runs (busybox sh): each check prints CHECK <name> OK, or something else. */
const GUEST_SCRIPT = `
check() { if "$@" >/tmp/out 2>&1; then echo "CHECK $NAME OK"; else echo "CHECK $NAME FAIL"; cat /tmp/out; fi; }
ls /sys/block
NAME=blk-queues; check test "$(ls /sys/block/vda/mq | wc -l)" = 2
NAME=scsi-model; check grep -q "QEMU HARDDISK" /sys/block/sda/device/model
dd if=/dev/urandom of=/tmp/pat bs=4k count=512 2>/dev/null
NAME=blk-dd; check sh -c 'dd if=/tmp/pat of=/dev/vda bs=4k count=512 oflag=direct && dd if=/dev/vda of=/tmp/b bs=4k count=512 iflag=direct && cmp /tmp/pat /tmp/b'
printf 'vstor-scsi-%04d' 7 | dd of=/tmp/s bs=512 conv=sync 2>/dev/null
yes ${PATTERN_LINE} | head -c 2097152 > /tmp/det
NAME=scsi-dd; check sh -c 'dd if=/tmp/det of=/dev/sda bs=4k count=512 oflag=direct seek=1 && dd if=/tmp/s of=/dev/sda bs=512 count=1 oflag=direct && dd if=/dev/sda of=/tmp/c bs=4k count=512 skip=1 iflag=direct && cmp /tmp/det /tmp/c'
NAME=blk-fio; check fio --name=v --filename=/dev/vda --direct=1 --rw=randwrite --bs=4k --offset=4m --size=16m --iodepth=16 --ioengine=libaio --verify=crc32c --do_verify=1
NAME=nbd-dd; check sh -c 'dd if=/tmp/pat of=/dev/vdb bs=4k count=512 oflag=direct && dd if=/dev/vdb of=/tmp/n bs=4k count=512 iflag=direct && cmp /tmp/pat /tmp/n'
NAME=nbd-fio; check fio --name=n --filename=/dev/vdb --direct=1 --rw=randrw --bs=4k --offset=4m --size=16m --iodepth=16 --ioengine=libaio --verify=crc32c --do_verify=1
NAME=nbd-fio-1m; check fio --name=m --filename=/dev/vdb --direct=1 --rw=write --bs=1m --offset=24m --size=16m --iodepth=4 --ioengine=libaio --verify=crc32c --do_verify=1
sync
`;

Deno.test({
  name:
    "a Linux guest under QEMU reads and writes through vstor serve's vhost-user-blk, vhost-user-scsi and NBD exports",
  ignore: missing !== null,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_guest_" });
    // The SCSI disk is a qcow2 over a raw backing file full of 0x5a.
    const qcow2 = join(dir, "blk.qcow2"), base = join(dir, "base.raw");
    const overlay = join(dir, "scsi.qcow2");
    const tool = async (name: string, args: string[]) => {
      const r = await runTool(name, args);
      assert.equal(r.code, 0, `${name} ${args.join(" ")}: ${r.stdout}${r.stderr}`);
    };
    await tool("qemu-img", ["create", "-q", "-f", "qcow2", qcow2, "64M"]);
    await tool("qemu-img", ["create", "-q", "-f", "raw", base, "32M"]);
    await tool("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 32M", base]);
    await tool("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay]);
    const nbdImage = join(dir, "nbd.qcow2");
    await tool("qemu-img", ["create", "-q", "-f", "qcow2", nbdImage, "64M"]);
    const blkSock = join(dir, "blk.sock"), scsiSock = join(dir, "scsi.sock");
    const nbdSock = join(dir, "nbd.sock");
    const logs: string[] = [];
    const daemon = await Daemon.start(
      parseServeArgs([
        "--blockdev",
        `driver=file,node-name=f0,filename=${qcow2},cache.direct=on,aio=io_uring`,
        "--blockdev",
        "driver=qcow2,node-name=q0,file=f0",
        "--blockdev",
        `driver=file,node-name=f1,filename=${overlay}`,
        "--blockdev",
        "driver=qcow2,node-name=r1,file=f1",
        "--export",
        `type=vhost-user-blk,id=blk,node-name=q0,addr.type=unix,addr.path=${blkSock},writable=on,num-queues=2`,
        "--export",
        `type=vhost-user-scsi,id=scsi,node-name=r1,addr.type=unix,addr.path=${scsiSock},writable=on`,
        "--blockdev",
        `driver=file,node-name=f2,filename=${nbdImage}`,
        "--blockdev",
        "driver=qcow2,node-name=n2,file=f2",
        "--nbd-server",
        `addr.type=unix,addr.path=${nbdSock}`,
        "--export",
        "type=nbd,id=nbd,node-name=n2,name=disk,writable=on",
      ]),
      { log: (line) => logs.push(line) },
    );
    let output = "";
    try {
      const script = join(dir, "test.sh");
      await Deno.writeTextFile(script, GUEST_SCRIPT);
      const work = join(dir, "guest");
      const env = {
        W: work,
        ACCEL: "tcg",
        VHOST: "1",
        SMP: "2",
        MEM: "512",
        INITRD: "initramfs-fio.img",
      };
      const build = await new Deno.Command("bash", {
        args: [RECIPE, "build"],
        env,
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.ok(build.success, new TextDecoder().decode(build.stderr));
      const boot = await new Deno.Command("timeout", {
        args: [
          "240",
          "bash",
          RECIPE,
          "boot",
          script,
          "-chardev",
          `socket,id=c0,path=${blkSock}`,
          "-device",
          "vhost-user-blk-pci,chardev=c0,num-queues=2,packed=on",
          "-chardev",
          `socket,id=c1,path=${scsiSock}`,
          "-device",
          "vhost-user-scsi-pci,chardev=c1",
          "-drive",
          `file=nbd+unix:///disk?socket=${nbdSock},format=raw,if=none,id=n0,cache=none`,
          "-device",
          "virtio-blk-pci,drive=n0",
        ],
        env,
        stdout: "piped",
        stderr: "piped",
      }).output();
      output = new TextDecoder().decode(boot.stdout) + new TextDecoder().decode(boot.stderr);
      assert.match(output, /GUEST-EXIT=0/, output);
    } finally {
      const errors = await daemon.stop();
      assert.deepEqual(errors, [], logs.join("\n"));
    }
    for (
      const name of [
        "blk-queues",
        "scsi-model",
        "blk-dd",
        "scsi-dd",
        "blk-fio",
        "nbd-dd",
        "nbd-fio",
        "nbd-fio-1m",
      ]
    ) {
      assert.match(
        output,
        new RegExp(`CHECK ${name} OK`),
        `${name}:\n${output}\n${logs.join("\n")}`,
      );
    }
    await tool("qemu-img", ["check", qcow2]);
    await tool("qemu-img", ["check", overlay]);
    await tool("qemu-img", ["check", nbdImage]);
    // What the guest wrote on the SCSI disk, over the backing file's bytes: qemu-img compares.
    const expected = new Uint8Array(32 << 20).fill(0x5a);
    const marker = new TextEncoder().encode("vstor-scsi-0007");
    expected.fill(0, 0, 512);
    expected.set(marker, 0);
    const line = new TextEncoder().encode(PATTERN_LINE + "\n");
    for (let i = 0; i < 2 << 20; i++) expected[4096 + i] = line[i % line.length]!;
    const wanted = join(dir, "expected.raw");
    await Deno.writeFile(wanted, expected);
    await tool("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", overlay, wanted]);
    await Deno.remove(dir, { recursive: true });
  },
});

/** The guest of the restart test: a verified random write on vda, long enough to be cut. */
const RESTART_SCRIPT = `
echo START
fio --name=v --filename=/dev/vda --direct=1 --rw=randwrite --bs=4k --size=96m --iodepth=8 --ioengine=libaio --verify=crc32c --do_verify=1 --verify_fatal=1 2>&1 | grep -E "err=|verify:" | head -5
`;

for (const ring of ["split", "packed"] as const) {
  Deno.test({
    name:
      `vstor serve killed mid-I/O and started again: QEMU reconnects and the guest's verified writes all land (${ring} ring)`,
    ignore: missing !== null,
    async fn() {
      const dir = await Deno.makeTempDir({ prefix: "vstor_restart_" });
      const raw = join(dir, "disk.raw"), sock = join(dir, "blk.sock");
      assert.equal((await runTool("qemu-img", ["create", "-q", "-f", "raw", raw, "64M"])).code, 0);
      const mod = new URL("../../mod.ts", import.meta.url).pathname;
      // O_DIRECT through io_uring: requests stay at the disk long enough to be in flight at the kill.
      const serve = () =>
        new Deno.Command(Deno.execPath(), {
          args: [
            "run",
            "-A",
            mod,
            "serve",
            "--blockdev",
            `driver=file,node-name=f,filename=${raw},cache.direct=on,aio=io_uring`,
            "--blockdev",
            "driver=raw,node-name=r,file=f",
            "--export",
            `type=vhost-user-blk,id=e0,node-name=r,addr.type=unix,addr.path=${sock},writable=on`,
          ],
          stdout: "null",
          stderr: "piped",
        }).spawn();
      const listening = async () => {
        for (let i = 0; i < 200; i++) {
          try {
            if (Deno.statSync(sock).isSocket) return;
          } catch {
            // Not yet.
          }
          await new Promise((r) => setTimeout(r, 50));
        }
        throw new Error("vstor serve did not listen");
      };
      let daemon = serve();
      await listening();
      const script = join(dir, "test.sh");
      await Deno.writeTextFile(script, RESTART_SCRIPT);
      const env = { W: join(dir, "guest"), ACCEL: "tcg", VHOST: "1", INITRD: "initramfs-fio.img" };
      const build = await new Deno.Command("bash", { args: [RECIPE, "build"], env }).output();
      assert.ok(build.success);
      const guest = new Deno.Command("timeout", {
        args: [
          "180",
          "bash",
          RECIPE,
          "boot",
          script,
          "-chardev",
          `socket,id=c0,path=${sock},reconnect=1`,
          "-device",
          `vhost-user-blk-pci,chardev=c0${ring === "packed" ? ",packed=on" : ""}`,
        ],
        env,
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      // Watch the console for fio's start, then kill the daemon outright and start another.
      const out: string[] = [];
      const reader = guest.stdout.pipeThrough(new TextDecoderStream()).getReader();
      const readAll = (async () => {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return;
          out.push(value);
        }
      })();
      for (let i = 0; i < 600 && !out.join("").includes("START"); i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      await new Promise((r) => setTimeout(r, 1500));
      daemon.kill("SIGKILL");
      await daemon.status;
      await daemon.stderr.cancel();
      Deno.removeSync(sock);
      daemon = serve();
      const [status] = await Promise.all([guest.status, readAll]);
      await guest.stderr.cancel();
      daemon.kill("SIGTERM");
      await daemon.status;
      const log = new TextDecoder().decode(await new Response(daemon.stderr).arrayBuffer());
      assert.match(log, /front-end connected/, "QEMU reconnected to the new daemon");
      const text = out.join("");
      assert.ok(status.success, text);
      assert.match(text, /err= 0/, text);
      assert.doesNotMatch(text, /verify:/, text);
      await Deno.remove(dir, { recursive: true });
    },
  });
}
