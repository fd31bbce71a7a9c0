/**
 * Images on a real (one-node, throwaway) Ceph cluster through librbd, checked from both sides:
 * what qemu-img and qemu-io make on RBD, vstor reads; what vstor makes and writes, qemu-img checks
 * and compares — raw on RBD, qcow2 on RBD, RBD as a local qcow2's backing file, convert both
 * ways; and the errors a user can act on (a missing image or pool, a bad name, a cluster that
 * does not answer) each as one line. One cluster serves the whole file (tests/ceph/cluster.ts).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { cephCluster, ignoreWithoutCeph, rbd } from "../ceph/cluster.ts";
import { cmds, show, vstor } from "./nbd_peers.ts";
import { ignoreWithout, runTool } from "./qemu.ts";

const ignore = ignoreWithoutCeph || ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

async function ok(tool: string, args: string[]): Promise<string> {
  const r = await runTool(tool, args);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

let images = 0;

/** A fresh image name on the cluster, as QEMU names it, and the conf it needs. */
async function name(): Promise<{ uri: string; image: string; conf: string }> {
  const c = await cephCluster();
  assert.ok(c !== null, "the cluster is up");
  const image = `vstor-test-${Deno.pid}-${images++}`;
  return {
    uri: `rbd:${c.pool}/${image}:conf=${c.conf}`,
    image: `${c.pool}/${image}`,
    conf: c.conf,
  };
}

Deno.test({
  name:
    "raw on RBD: what qemu-img and qemu-io make, vstor reads; what vstor writes, qemu-io reads (sync and in flight)",
  ignore,
  async fn() {
    const { uri, image } = await name();
    await ok("qemu-img", ["create", "-f", "raw", uri, "64M"]);
    await ok("qemu-io", ["-f", "raw", ...cmds(["write -P 7 1M 64k", "write -P 8 63M 1M"]), uri]);
    const info = await vstor("info", "--output=json", uri);
    assert.equal(info.code, 0, show(info));
    assert.equal(JSON.parse(info.stdout)["virtual-size"], 64 << 20);
    const io = await vstor(
      "io",
      "-f",
      "raw",
      ...cmds([
        "read -P 7 1M 64k",
        "read -P 8 63M 1M",
        "write -P 9 2M 4k",
        "write -P 10 5000 3000",
        "aio_write -P 11 8M 1M",
        "aio_flush",
      ]),
      uri,
    );
    assert.equal(io.code, 0, show(io));
    assert.doesNotMatch(io.stdout, /verification failed|failed/i, show(io));
    await ok("qemu-io", [
      "-r",
      "-f",
      "raw",
      ...cmds(["read -P 9 2M 4k", "read -P 10 5000 3000", "read -P 11 8M 1M"]),
      uri,
    ]);
    const human = await vstor("info", uri);
    assert.match(human.stdout, /disk size: unavailable/);
    assert.equal((await rbd("rm", image)).code, 0);
  },
});

Deno.test({
  name:
    "qcow2 on RBD made and written by vstor is clean for qemu-img check and equals what qemu-io writes locally; convert both ways",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_rbd_" });
    const { uri, image } = await name();
    try {
      const writes = [
        "write -P 3 0 1M",
        "write -z 4M 1M",
        "write -P 4 10M 100k",
        "discard 10M 64k",
      ];
      const c = await vstor("create", "-f", "qcow2", uri, "32M");
      assert.equal(c.code, 0, show(c));
      const w = await vstor("io", ...cmds(writes), uri);
      assert.equal(w.code, 0, show(w));
      await ok("qemu-img", ["check", uri]);
      const local = join(dir, "local.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", local, "32M"]);
      await ok("qemu-io", ["-d", "unmap", ...cmds(writes), local]);
      await ok("qemu-img", ["compare", uri, local]);
      // Out of RBD and back in, through vstor; QEMU compares.
      const out = join(dir, "out.qcow2");
      const c1 = await vstor("convert", "-O", "qcow2", uri, out);
      assert.equal(c1.code, 0, show(c1));
      await ok("qemu-img", ["compare", out, local]);
      const { uri: back, image: backImage } = await name();
      const c2 = await vstor("convert", "-O", "raw", local, back);
      assert.equal(c2.code, 0, show(c2));
      await ok("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", back, local]);
      assert.equal((await rbd("rm", backImage)).code, 0);
    } finally {
      await rbd("rm", image);
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "an RBD image as a local qcow2's backing file: vstor reads through it, writes stay local",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_rbd_" });
    const { uri, image } = await name();
    try {
      await ok("qemu-img", ["create", "-f", "raw", uri, "16M"]);
      await ok("qemu-io", ["-f", "raw", "-c", "write -P 0x42 0 16M", uri]);
      const overlay = join(dir, "overlay.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", overlay]);
      const io = await vstor("io", ...cmds(["read -P 0x42 0 1M", "write -P 0x43 1M 64k"]), overlay);
      assert.equal(io.code, 0, show(io));
      assert.doesNotMatch(io.stdout, /verification failed/);
      await ok("qemu-img", ["check", overlay]);
      await ok("qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x42 1M 64k", uri]);
      await ok("qemu-io", ["-r", "-c", "read -P 0x43 1M 64k", overlay]);
    } finally {
      await rbd("rm", image);
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "RBD errors a user can act on: a missing image or pool, a bad name, a cluster that does not answer",
  ignore,
  async fn() {
    const c = await cephCluster();
    assert.ok(c !== null);
    const missing = await vstor("info", `rbd:${c.pool}/no-such-image:conf=${c.conf}`);
    assert.equal(missing.code, 1, show(missing));
    assert.match(missing.stderr, /no-such-image/);
    assert.match(missing.stderr, /No such file or directory/);
    assert.equal(missing.stderr.trim().split("\n").length, 1, show(missing));
    const pool = await vstor("info", `rbd:no-such-pool/x:conf=${c.conf}`);
    assert.equal(pool.code, 1, show(pool));
    assert.match(pool.stderr, /no-such-pool/);
    const bad = await vstor("info", "rbd:justaname");
    assert.equal(bad.code, 1, show(bad));
    assert.match(bad.stderr, /expected POOL\/IMAGE/);
    // A monitor address nobody answers on: an error within the timeout, not a hang.
    const start = performance.now();
    const down = await vstor(
      "info",
      `rbd:${c.pool}/x:mon_host=127.0.0.1\\:1:client_mount_timeout=3:key=AQBwz5xlAAAAABAAmZuM9y0nY5n7nqY0n3Y3Zw==`,
    );
    assert.equal(down.code, 1, show(down));
    assert.ok(performance.now() - start < 30_000, "it gave up in time");
    assert.match(down.stderr, /did not answer|timed out|Connection/i, show(down));
  },
});

Deno.test({
  name:
    "vstor map of an RBD image equals qemu-img map: fast-diff images by rbd_diff_iterate2 (whole objects), others all data",
  ignore,
  async fn() {
    for (const features of ["layering,exclusive-lock,object-map,fast-diff", "layering"]) {
      const { uri, image } = await name();
      try {
        assert.equal(
          (await rbd("create", "--size", "64M", "--image-feature", features, image)).code,
          0,
        );
        await ok("qemu-io", [
          "-f",
          "raw",
          ...cmds(["write -P 1 1M 64k", "write -P 2 40M 5M"]),
          uri,
        ]);
        const theirs = JSON.parse(await ok("qemu-img", ["map", "--output=json", uri]));
        const ours = await vstor("map", "--output=json", uri);
        assert.equal(ours.code, 0, show(ours));
        assert.deepEqual(JSON.parse(ours.stdout), theirs, features);
        if (features.includes("fast-diff")) {
          assert.ok(theirs.length > 1, "fast-diff finds the unwritten objects");
        }
      } finally {
        await rbd("rm", image);
      }
    }
  },
});

Deno.test({
  name:
    "raw on RBD takes RBD's own snapshots: vstor snapshot -c/-l/-a/-d as qemu-img snapshot does, each seeing the other's",
  ignore,
  async fn() {
    const { uri, image } = await name();
    try {
      await ok("qemu-img", ["create", "-f", "raw", uri, "16M"]);
      await ok("qemu-io", ["-f", "raw", "-c", "write -P 1 0 64k", uri]);
      const c1 = await vstor("snapshot", "-c", "before", uri);
      assert.equal(c1.code, 0, show(c1));
      await ok("qemu-io", ["-f", "raw", "-c", "write -P 2 0 64k", uri]);
      await ok("qemu-img", ["snapshot", "-c", "after", uri]);
      const ours = await vstor("snapshot", "-l", uri);
      assert.equal(ours.code, 0, show(ours));
      assert.equal(ours.stdout, await ok("qemu-img", ["snapshot", "-l", uri]));
      assert.match(ours.stdout, /^before\s+before\s+16 MiB/m);
      // Back to the first: the data written after it is gone.
      const a = await vstor("snapshot", "-a", "before", uri);
      assert.equal(a.code, 0, show(a));
      await ok("qemu-io", ["-r", "-f", "raw", "-c", "read -P 1 0 64k", uri]);
      const d = await vstor("snapshot", "-d", "after", uri);
      assert.equal(d.code, 0, show(d));
      assert.doesNotMatch(await ok("qemu-img", ["snapshot", "-l", uri]), /after/);
      // QEMU's words for the mistakes.
      const again = await vstor("snapshot", "-c", "before", uri);
      assert.equal(again.code, 1);
      assert.match(again.stderr, /Could not create snapshot 'before': -17 \(File exists\)/);
      const missing = await vstor("snapshot", "-d", "nope", uri);
      assert.match(missing.stderr, /Could not delete snapshot 'nope': snapshot not found/);
      // A snapshot opens read-only, as rbd:POOL/IMAGE@SNAP.
      const at = await vstor(
        "io",
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 1 0 64k",
        `${uri.replace(/:conf=/, "@before:conf=")}`,
      );
      assert.equal(at.code, 0, show(at));
      assert.doesNotMatch(at.stdout, /verification failed/);
      await ok("qemu-img", ["snapshot", "-d", "before", uri]);
    } finally {
      await rbd("rm", image);
    }
  },
});

Deno.test({
  name:
    "a simulated guest's verified job on an RBD disk (vstor run), and vstor serve exporting an RBD image (--blockdev driver=rbd) over NBD to qemu-io",
  ignore,
  async fn() {
    const c = await cephCluster();
    assert.ok(c !== null);
    const { uri, image } = await name();
    const dir = await Deno.makeTempDir({ prefix: "vstor_rbd_" });
    try {
      await ok("qemu-img", ["create", "-f", "raw", uri, "16M"]);
      const run = await vstor(
        "run",
        "--drive",
        `file=${uri},format=raw,id=d0`,
        "--device",
        "virtio-blk,drive=d0",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=8M",
        "--verify=crc32c",
      );
      assert.equal(run.code, 0, show(run));
      assert.match(run.stdout, /write: IOPS=/);
      assert.match(run.stdout, /verify: \d+ blocks checked, 0 failed/);
      // The same image through vstor serve's NBD export.
      const { Daemon } = await import("../../src/serve/daemon.ts");
      const { parseServeArgs } = await import("../../src/serve/options.ts");
      const socket = join(dir, "nbd.sock");
      const pool = c.pool, img = image.slice(pool.length + 1);
      const daemon = await Daemon.start(
        parseServeArgs([
          "--blockdev",
          `driver=rbd,node-name=r,pool=${pool},image=${img},conf=${c.conf}`,
          "--nbd-server",
          `addr.type=unix,addr.path=${socket}`,
          "--export",
          "type=nbd,id=e0,node-name=r,name=disk,writable=on",
        ]),
        { log: () => {} },
      );
      try {
        const nbd = `nbd+unix:///disk?socket=${socket}`;
        await ok("qemu-io", [
          "-f",
          "raw",
          "-c",
          "write -P 0x77 12M 1M",
          "-c",
          "read -P 0x77 12M 1M",
          nbd,
        ]);
      } finally {
        assert.deepEqual(await daemon.stop(), []);
      }
      await ok("qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x77 12M 1M", uri]);
    } finally {
      await rbd("rm", image);
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "a cluster stopped under a guest's writes: werror=report fails the job with its errors counted, werror=stop stops the VM saying why — no hang",
  ignore,
  async fn() {
    const script = new URL("../ceph/one_node.sh", import.meta.url).pathname;
    for (const policy of ["report", "stop"]) {
      // A cluster of its own: this test kills it.
      const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "vstor-ceph-stop-" });
      const start = await new Deno.Command(script, { args: ["start", dir], stderr: "piped" })
        .output();
      assert.equal(start.code, 0, new TextDecoder().decode(start.stderr));
      const conf = new TextDecoder().decode(start.stdout).trim();
      try {
        // Operations give up after 3 s here, so the test does not wait the default 30.
        const uri = `rbd:rbd/victim:conf=${conf}:rados_osd_op_timeout=3:rados_mon_op_timeout=3`;
        await ok("qemu-img", ["create", "-f", "raw", uri, "16M"]);
        const job = vstor(
          "run",
          "--drive",
          `file=${uri},format=raw,id=d0,werror=${policy}`,
          "--device",
          "virtio-blk,drive=d0",
          "--rw=randwrite",
          "--bs=4k",
          "--iodepth=4",
          "--size=16M",
          "--runtime=20",
          "--time_based",
        );
        await new Promise((resolve) => setTimeout(resolve, 1500));
        const t0 = performance.now();
        for (const daemon of ["osd.0", "mon.a"]) {
          try {
            Deno.kill(Number(Deno.readTextFileSync(join(dir, `${daemon}.pid`)).trim()), "SIGKILL");
          } catch {
            // Gone already.
          }
        }
        const r = await job;
        assert.ok(performance.now() - t0 < 60_000, "the job ended in time");
        assert.equal(r.code, 1, show(r));
        if (policy === "report") {
          assert.match(r.stdout, /write: IOPS=.*errors=[1-9]/, show(r));
        } else {
          assert.match(
            r.stderr,
            /the VM stopped: io error on drive d0 \(write\): .*Connection timed out/,
            show(r),
          );
        }
      } finally {
        new Deno.Command(script, { args: ["stop", dir], stderr: "null" }).outputSync();
        await Deno.remove(dir, { recursive: true }).catch(() => {});
      }
    }
  },
});

Deno.test({
  name:
    "vstor info of a raw image on RBD (with a snapshot) says what qemu-img info says, human and JSON",
  ignore,
  async fn() {
    const { uri, image } = await name();
    try {
      await ok("qemu-img", ["create", "-f", "raw", uri, "16M"]);
      await ok("qemu-img", ["snapshot", "-c", "s1", uri]);
      for (const output of ["human", "json"]) {
        const ours = await vstor("info", "-f", "raw", `--output=${output}`, uri);
        assert.equal(ours.code, 0, show(ours));
        const theirs = await ok("qemu-img", ["info", "-f", "raw", `--output=${output}`, uri]);
        if (output === "json") assert.deepEqual(JSON.parse(ours.stdout), JSON.parse(theirs));
        else assert.equal(ours.stdout, theirs);
      }
    } finally {
      await rbd("snap", "purge", image);
      await rbd("rm", image);
    }
  },
});

Deno.test({
  name:
    "a qcow2 on RBD over a backing file (vstor create -b): reads fall through, writes land on RBD",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_rbd_" });
    const { uri, image } = await name();
    try {
      const base = join(dir, "base.raw");
      await ok("qemu-img", ["create", "-q", "-f", "raw", base, "16M"]);
      await ok("qemu-io", ["-f", "raw", "-c", "write -P 0x21 0 16M", base]);
      const c = await vstor("create", "-f", "qcow2", "-b", base, "-F", "raw", uri);
      assert.equal(c.code, 0, show(c));
      const io = await vstor("io", ...cmds(["write -P 0x22 1M 64k", "read -P 0x21 0 1M"]), uri);
      assert.equal(io.code, 0, show(io));
      assert.doesNotMatch(io.stdout, /verification failed/);
      await ok("qemu-img", ["check", uri]);
      await ok("qemu-io", ["-r", ...cmds(["read -P 0x22 1M 64k", "read -P 0x21 2M 1M"]), uri]);
      assert.match(await ok("qemu-img", ["info", uri]), new RegExp(`backing file: ${base}`));
    } finally {
      await rbd("rm", image);
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "cache=none and directsync turn librbd's cache off, as QEMU's do; writeback leaves it on",
  ignore,
  async fn() {
    const { uri, image } = await name();
    try {
      await ok("qemu-img", ["create", "-f", "raw", uri, "1M"]);
      const { RbdFile } = await import("../../src/host/rbd.ts");
      const { cacheFlags } = await import("../../formats/open.ts");
      for (
        const [mode, want] of [["none", "false"], ["directsync", "false"], ["writeback", "true"]]
      ) {
        const file = await RbdFile.open(uri, { cache: !cacheFlags(mode as "none").direct });
        try {
          assert.equal(file.setting("rbd_cache"), want, mode);
        } finally {
          file.close();
        }
      }
      // A name's own rbd_cache loses to the cache mode, as in QEMU.
      const file = await RbdFile.open(`${uri}:rbd_cache=true`, { cache: false });
      try {
        assert.equal(file.setting("rbd_cache"), "false");
      } finally {
        file.close();
      }
    } finally {
      await rbd("rm", image);
    }
  },
});
