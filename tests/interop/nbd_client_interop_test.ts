/**
 * vstor's NBD client (src/host/nbd.ts) under what an outsider sees: vstor's verbs open exports
 * qemu-nbd serves and answer as qemu-img and qemu-io answer on the same URIs — info, map (with
 * and without allocation depth), convert, compare, check and io writes, checked afterwards in
 * the image by qemu-img; a qcow2 file served raw is probed as qcow2; errors name what is wrong.
 *
 * NbdFile blocks the calling thread on its socket, so the server is always another process.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ignoreWithout, runTool } from "./qemu.ts";
import { cmds, dataBytes, type MapEntry, show, vstor } from "./nbd_peers.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

async function ok(tool: string, args: string[]): Promise<string> {
  const r = await runTool(tool, args);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

let sockets = 0;

/** A TCP port nothing listens on at the moment. */
function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

async function listening(tcpPort: number | undefined, socket: string): Promise<boolean> {
  if (tcpPort === undefined) {
    try {
      return Deno.statSync(socket).isSocket === true;
    } catch {
      return false;
    }
  }
  try {
    (await Deno.connect({ hostname: "127.0.0.1", port: tcpPort })).close();
    return true;
  } catch {
    return false;
  }
}

/**
 * qemu-nbd (persistent, export `disk`) serving `image` with `args`, for `fn` to use through the
 * nbd+unix URI it gets (nbd://127.0.0.1:PORT/disk with `tcp`); qemu-nbd is stopped when `fn`
 * ends, whatever happens.
 */
async function withQemuNbd(
  dir: string,
  image: string,
  args: string[],
  fn: (uri: string, socket: string) => Promise<void>,
  opts: { tcp?: boolean } = {},
): Promise<void> {
  const socket = join(dir, `qnbd${sockets++}.sock`);
  const tcpPort = opts.tcp ? freePort() : undefined;
  const where = tcpPort === undefined
    ? ["-k", socket]
    : ["-b", "127.0.0.1", "-p", String(tcpPort), "-e", "4"];
  const child = new Deno.Command("qemu-nbd", {
    args: ["-t", ...args, "-x", "disk", ...where, image],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  const stop = async () => {
    if (!exited) {
      try {
        child.kill("SIGTERM");
      } catch {
        // Exited meanwhile.
      }
    }
    await status;
    return new TextDecoder().decode((await child.output()).stderr);
  };
  try {
    for (let i = 0; i < 200 && !exited && !(await listening(tcpPort, socket)); i++) {
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    if (exited) throw new Error(`qemu-nbd ${args.join(" ")} exited early: ${await stop()}`);
  } catch (e) {
    await stop();
    throw e;
  }
  const uri = tcpPort === undefined
    ? `nbd+unix:///disk?socket=${socket}`
    : `nbd://127.0.0.1:${tcpPort}/disk`;
  try {
    await fn(uri, socket);
  } finally {
    await stop();
  }
}

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_client_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/**
 * A 16 MiB qcow2 with data (0x11 over 1M, 0x22 at 8M, 0x33 at an unaligned 12345k), a zero
 * cluster written by `write -z`, a zero cluster over former data, and unallocated space.
 */
async function sampleImage(dir: string, name = "src.qcow2"): Promise<string> {
  const image = join(dir, name);
  await ok("qemu-img", ["create", "-q", "-f", "qcow2", image, "16M"]);
  await ok("qemu-io", [
    "-f",
    "qcow2",
    ...cmds([
      "write -P 0x11 0 1M",
      "write -z 4M 64k",
      "write -P 0x22 8M 64k",
      "write -P 0x44 10M 128k",
      "write -z 10M 64k",
      "write -P 0x33 12345k 3k",
    ]),
    image,
  ]);
  return image;
}

Deno.test({
  name: "vstor info on an NBD URI: qemu-img's virtual size, format raw, no disk size",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = await sampleImage(dir);
      await withQemuNbd(dir, image, ["-f", "qcow2"], async (uri) => {
        const theirs = JSON.parse(await ok("qemu-img", ["info", "--output=json", uri]));
        const r = await vstor("info", "--output=json", uri);
        assert.equal(r.code, 0, show(r));
        const ours = JSON.parse(r.stdout);
        assert.equal(ours["virtual-size"], theirs["virtual-size"]);
        assert.equal(ours["virtual-size"], 16 << 20);
        assert.equal(ours["format"], "raw");
        assert.equal(theirs["format"], "raw");
        assert.equal(ours["filename"], uri);
        assert.ok(!("actual-size" in theirs), JSON.stringify(theirs));
        assert.ok(!("actual-size" in ours), r.stdout);

        const human = await vstor("info", uri);
        assert.equal(human.code, 0, show(human));
        assert.match(human.stdout, /^disk size: unavailable$/m);
        assert.match(human.stdout, /^file format: raw$/m);
        assert.match(human.stdout, /^virtual size: 16 MiB \(16777216 bytes\)$/m);
        // Line for line what qemu-img prints.
        assert.equal(human.stdout, await ok("qemu-img", ["info", uri]));

        // The older syntax names the same export.
        const old = await vstor(
          "info",
          "--output=json",
          `nbd:unix:${uri.slice(uri.indexOf("socket=") + 7)}:exportname=disk`,
        );
        assert.equal(old.code, 0, show(old));
        assert.equal(JSON.parse(old.stdout)["virtual-size"], 16 << 20);
      });
    });
  },
});

Deno.test({
  name: "vstor info --output=json on an NBD URI has the keys qemu-img's has (no dirty-flag)",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = await sampleImage(dir);
      await withQemuNbd(dir, image, ["-f", "qcow2"], async (uri) => {
        const theirs = JSON.parse(await ok("qemu-img", ["info", "--output=json", uri]));
        const r = await vstor("info", "--output=json", uri);
        assert.equal(r.code, 0, show(r));
        // qemu-img: no "dirty-flag" for raw over NBD (the nbd driver has no bdrv_get_info).
        assert.deepEqual(JSON.parse(r.stdout), theirs);
      });
    });
  },
});

Deno.test({
  name: "vstor map --output=json on an NBD URI equals qemu-img map, with and without -A",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = await sampleImage(dir);
      for (const extra of [[], ["-A"]]) {
        await withQemuNbd(dir, image, ["-r", ...extra, "-f", "qcow2"], async (uri) => {
          const theirs = JSON.parse(await ok("qemu-img", ["map", "--output=json", uri]));
          const r = await vstor("map", "--output=json", uri);
          assert.equal(r.code, 0, show(r));
          const ours = JSON.parse(r.stdout) as MapEntry[];
          assert.deepEqual(ours, theirs, `qemu-nbd ${extra.join(" ")}`);
          // Sanity: data where written, the zero cluster and the holes are not data.
          const at = (off: number) => ours.find((e) => e.start <= off && off < e.start + e.length);
          assert.ok(at(0)?.data && !at(0)?.zero);
          assert.ok(at(4 << 20)?.zero && !at(4 << 20)?.data);
          assert.ok(at(10 << 20)?.zero && !at(10 << 20)?.data);
          assert.ok(at(6 << 20)?.zero && !at(6 << 20)?.data);
          assert.ok(at(8 << 20)?.data);
          // A window of the map, as qemu-img gives it.
          const window = ["--start-offset=1M", "--max-length=8M"];
          const w = await vstor("map", "--output=json", ...window, uri);
          assert.equal(w.code, 0, show(w));
          assert.deepEqual(
            JSON.parse(w.stdout),
            JSON.parse(await ok("qemu-img", ["map", "--output=json", ...window, uri])),
          );
          // The human map too.
          const h = await vstor("map", uri);
          assert.equal(h.code, 0, show(h));
          assert.equal(h.stdout, await ok("qemu-img", ["map", uri]));
        });
      }
    });
  },
});

Deno.test({
  name: "vstor map on an NBD URI reports NBD_STATE_ZERO data as zero, as qemu-img map does",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      // Metadata preallocation: allocated clusters over host holes, which qemu-nbd reports as
      // data that reads as zeroes (NBD_STATE_ZERO without NBD_STATE_HOLE).
      const image = join(dir, "prealloc.qcow2");
      await ok("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        image,
        "4M",
      ]);
      await ok("qemu-io", ["-f", "qcow2", "-c", "write -P 5 0 64k", image]);
      await withQemuNbd(dir, image, ["-r", "-f", "qcow2"], async (uri) => {
        const theirs = JSON.parse(await ok("qemu-img", ["map", "--output=json", uri]));
        assert.ok(theirs.some((e: MapEntry) => e.data && e.zero), JSON.stringify(theirs));
        const r = await vstor("map", "--output=json", uri);
        assert.equal(r.code, 0, show(r));
        assert.deepEqual(JSON.parse(r.stdout), theirs);
      });
    });
  },
});

Deno.test({
  name: "vstor convert from an NBD URI: the same content, holes stay holes",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = await sampleImage(dir);
      const out = join(dir, "out.qcow2");
      const raw = join(dir, "out.raw");
      await withQemuNbd(dir, image, ["-r", "-f", "qcow2"], async (uri) => {
        const r = await vstor("convert", "-O", "qcow2", uri, out);
        assert.equal(r.code, 0, show(r));
        const r2 = await vstor("convert", "-f", "raw", "-O", "raw", uri, raw);
        assert.equal(r2.code, 0, show(r2));
      });
      assert.equal(
        await ok("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", out, image]),
        "Images are identical.\n",
      );
      await ok("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", raw, image]);
      await ok("qemu-img", ["check", out]);
      const source = JSON.parse(await ok("qemu-img", ["map", "--output=json", image]));
      const converted = JSON.parse(await ok("qemu-img", ["map", "--output=json", out]));
      assert.ok(
        dataBytes(converted) <= dataBytes(source),
        `${dataBytes(converted)} data bytes in the copy, ${dataBytes(source)} in the source`,
      );
    });
  },
});

Deno.test({
  name: "vstor compare on an NBD URI: exit 0 when identical, 1 when different, as qemu-img",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = await sampleImage(dir);
      const same = join(dir, "same.qcow2");
      await Deno.copyFile(image, same);
      const other = join(dir, "other.qcow2");
      await Deno.copyFile(image, other);
      await ok("qemu-io", ["-f", "qcow2", "-c", "write -P 0x99 9M 512", other]);
      await withQemuNbd(dir, image, ["-r", "-f", "qcow2"], async (uri) => {
        const s = await vstor("compare", uri, same);
        const q0 = await runTool("qemu-img", ["compare", uri, same]);
        assert.equal(q0.code, 0, q0.stderr);
        assert.equal(s.code, 0, show(s));
        assert.equal(s.stdout, q0.stdout);

        const d = await vstor("compare", uri, other);
        const q1 = await runTool("qemu-img", ["compare", uri, other]);
        assert.equal(q1.code, 1, q1.stderr);
        assert.equal(d.code, 1, show(d));
        assert.equal(d.stdout, q1.stdout); // Content mismatch at offset 9437184!

        // The other way round, and quiet.
        const rev = await vstor("compare", "-q", other, uri);
        assert.equal(rev.code, 1, show(rev));
        assert.equal(rev.stdout, "");
      });
    });
  },
});

/** What test 5 writes: patterns, unaligned offsets, zeroes, a discard, flushes. */
const WRITES = [
  "write -P 0xa1 0 64k",
  "write -P 0xa2 4097 5000",
  "write -P 0xa3 1M 192k",
  "write -z 1114112 64k",
  "write -z 3000 1000",
  "write -P 0xa4 2M 256k",
  "discard 2162688 128k",
  "flush",
  "write -P 0xa5 3145628 300",
  "write -P 0xa6 5M 4k",
  "write -z 5M 4k",
  "writev -P 0xa7 6M 4k 512 7k",
  "flush",
];

Deno.test({
  name: "vstor io writes through an NBD URI land in the image as qemu-io's direct writes",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = join(dir, "served.qcow2");
      const direct = join(dir, "direct.qcow2");
      for (const f of [image, direct]) {
        await ok("qemu-img", ["create", "-q", "-f", "qcow2", f, "8M"]);
        await ok("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5c 2M 1M", f]);
      }
      await ok("qemu-io", ["-f", "qcow2", "-d", "unmap", ...cmds(WRITES), direct]);
      await withQemuNbd(dir, image, ["-f", "qcow2", "--discard=unmap"], async (uri) => {
        const r = await vstor("io", "-f", "raw", ...cmds(WRITES), uri);
        assert.equal(r.code, 0, show(r));
        assert.doesNotMatch(r.stdout + r.stderr, /failed|error/i, show(r));
        assert.match(r.stdout, /wrote 5000\/5000 bytes at offset 4097/);
        assert.match(r.stdout, /discard 131072\/131072 bytes at offset 2162688/);
        // Read back through the export (a new connection).
        const back = await vstor(
          "io",
          "-r",
          "-f",
          "raw",
          ...cmds([
            "read -P 0xa1 0 3000",
            "read -P 0 3000 1000",
            "read -P 0xa2 4097 5000",
            "read -P 0xa3 1M 64k",
            "read -P 0 1114112 64k",
            "read -P 0xa4 2M 64k",
            "read -P 0 2162688 128k",
            "read -P 0xa5 3145628 300",
            "read -P 0 5M 4k",
          ]),
          uri,
        );
        assert.equal(back.code, 0, show(back));
        assert.doesNotMatch(back.stdout + back.stderr, /verification failed|error/i, show(back));
      });
      // qemu-nbd has exited: the image is consistent and holds what qemu-io wrote directly.
      await ok("qemu-img", ["check", image]);
      assert.equal(
        await ok("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", image, direct]),
        "Images are identical.\n",
      );
    });
  },
});

Deno.test({
  name: "a qcow2 served raw: vstor probes qcow2 over NBD, check finds no errors, io reads its data",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = join(dir, "inner.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=32k", image, "8M"]);
      await ok("qemu-io", [
        "-f",
        "qcow2",
        ...cmds(["write -P 0x5a 0 100k", "write -z 1M 64k", "write -P 0x6b 3M 32k"]),
        image,
      ]);
      await withQemuNbd(dir, image, ["-r", "-f", "raw"], async (uri) => {
        const theirs = JSON.parse(await ok("qemu-img", ["info", "--output=json", uri]));
        const r = await vstor("info", "--output=json", uri);
        assert.equal(r.code, 0, show(r));
        const ours = JSON.parse(r.stdout);
        assert.equal(ours["format"], "qcow2");
        assert.equal(ours["cluster-size"], 32768);
        assert.equal(ours["virtual-size"], 8 << 20);
        assert.deepEqual(ours, theirs);

        const c = await vstor("check", uri);
        assert.equal(c.code, 0, show(c));
        assert.match(c.stdout, /No errors were found on the image\./);
        const cj = await vstor("check", "--output=json", uri);
        assert.equal(cj.code, 0, show(cj));
        assert.deepEqual(
          JSON.parse(cj.stdout),
          JSON.parse(await ok("qemu-img", ["check", "--output=json", uri])),
        );

        // Reads inside single data runs of the host file.
        const io = await vstor(
          "io",
          "-r",
          ...cmds(["read -P 0x5a 0 100k", "read -P 0x6b 3M 32k", "read -P 0 1M 64k"]),
          uri,
        );
        assert.equal(io.code, 0, show(io));
        assert.doesNotMatch(io.stdout + io.stderr, /verification failed|error/i, show(io));
        assert.match(io.stdout, /read 102400\/102400 bytes at offset 0/);
      });
    });
  },
});

Deno.test({
  name: "vstor reads an NBD range that spans data and a hole (a reply of several chunks)",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = await sampleImage(dir);
      await withQemuNbd(dir, image, ["-r", "-f", "qcow2"], async (uri) => {
        // 8M..8M+64k is data, then unallocated: qemu-nbd answers with OFFSET_DATA then
        // OFFSET_HOLE chunks. qemu-io reads it fine.
        const commands = cmds(["read -P 0x22 8M 64k", "read -P 0 8454144 4k", "read 8M 128k"]);
        const q = await runTool("qemu-io", ["-r", "-f", "raw", ...commands, uri]);
        assert.equal(q.code, 0, q.stderr);
        const r = await vstor("io", "-r", "-f", "raw", ...commands, uri);
        assert.equal(r.code, 0, show(r));
        assert.match(r.stdout, /read 131072\/131072 bytes at offset 8388608/);
      });
    });
  },
});

Deno.test({
  name: "vstor io -f qcow2 writes into a qcow2 served raw (opening it reads whole clusters)",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = join(dir, "inner.qcow2");
      const direct = join(dir, "direct.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", image, "8M"]);
      // The clusters written below are allocated already: no room is needed past the export's
      // end (the export cannot grow).
      await ok("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 0 100k", image]);
      await Deno.copyFile(image, direct);
      const writes = ["write -P 0x78 0 4k", "write -P 0x79 70000 1000"];
      await ok("qemu-io", ["-f", "qcow2", ...cmds(writes), direct]);
      await withQemuNbd(dir, image, ["-f", "raw"], async (uri) => {
        const r = await vstor("io", "-f", "qcow2", ...cmds(writes), uri);
        assert.equal(r.code, 0, show(r));
        // A new cluster would lie past the export's end: the write fails (as qemu-io's does,
        // "write failed: Invalid argument"), the next one still works.
        const grow = await vstor(
          "io",
          "-f",
          "qcow2",
          ...cmds(["write -P 0x77 5M 64k", "read -P 0x78 0 4k"]),
          uri,
        );
        assert.equal(grow.code, 1, show(grow));
        assert.match(grow.stdout + grow.stderr, /write failed/);
        assert.match(grow.stdout, /read 4096\/4096 bytes at offset 0/);
      });
      await ok("qemu-img", ["check", image]);
      await ok("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", image, direct]);
    });
  },
});

Deno.test({
  name: "vstor map on a qcow2 served raw equals qemu-img map (no metadata preallocation guess)",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      // 100k written into 32k clusters: the fourth cluster is partly data, partly a host hole.
      const image = join(dir, "inner.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=32k", image, "8M"]);
      await ok("qemu-io", [
        "-f",
        "qcow2",
        ...cmds(["write -P 0x5a 0 100k", "write -z 1M 64k", "write -P 0x6b 3M 32k"]),
        image,
      ]);
      const local = JSON.parse(await ok("qemu-img", ["map", "--output=json", image]));
      await withQemuNbd(dir, image, ["-r", "-f", "raw"], async (uri) => {
        const theirs = JSON.parse(await ok("qemu-img", ["map", "--output=json", uri]));
        // QEMU asks the host file about zeroes only for metadata-preallocated images, which it
        // cannot tell through NBD (no allocated size): the map is the local one.
        assert.deepEqual(theirs, local);
        const r = await vstor("map", "--output=json", uri);
        assert.equal(r.code, 0, show(r));
        assert.deepEqual(JSON.parse(r.stdout), theirs);
      });
    });
  },
});

Deno.test({
  name: "vstor io write -z through NBD sends WRITE_ZEROES, leaving no data, as qemu-io does",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const commands = cmds(["write -P 3 3M 64k", "write -z 1M 1M", "write -z 3M 64k"]);
      /** The map of a new image after `write` ran the commands through qemu-nbd. */
      const through = async (name: string, write: (uri: string) => Promise<void>) => {
        const image = join(dir, name);
        await ok("qemu-img", ["create", "-q", "-f", "qcow2", image, "8M"]);
        await withQemuNbd(dir, image, ["-f", "qcow2"], write);
        return JSON.parse(await ok("qemu-img", ["map", "--output=json", image])) as MapEntry[];
      };
      const viaQemu = await through("qemu.qcow2", async (uri) => {
        await ok("qemu-io", ["-f", "raw", ...commands, uri]);
      });
      const viaVstor = await through("vstor.qcow2", async (uri) => {
        const r = await vstor("io", "-f", "raw", ...commands, uri);
        assert.equal(r.code, 0, show(r));
      });
      // qemu-io: zero clusters only. vstor: 1M + 64k of zero bytes sent and stored as data.
      assert.equal(dataBytes(viaQemu), 0, JSON.stringify(viaQemu));
      assert.equal(dataBytes(viaVstor), dataBytes(viaQemu), JSON.stringify(viaVstor));
    });
  },
});

Deno.test({
  name: "vstor over TCP: nbd:// and nbd:HOST:PORT URIs, convert -n into an export, compare",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const source = await sampleImage(dir);
      const target = join(dir, "target.raw");
      await ok("qemu-img", ["create", "-q", "-f", "raw", target, "16M"]);
      await ok("qemu-io", ["-f", "raw", "-c", "write -P 0xee 0 16M", target]);
      await withQemuNbd(dir, target, ["-f", "raw"], async (uri) => {
        assert.match(uri, /^nbd:\/\/127\.0\.0\.1:[0-9]+\/disk$/);
        const old = `nbd:127.0.0.1:${new URL(uri).port}:exportname=disk`;
        const i = await vstor("info", "--output=json", old);
        assert.equal(i.code, 0, show(i));
        assert.equal(JSON.parse(i.stdout)["virtual-size"], 16 << 20);
        // Writing into an existing export (create is not possible), every byte overwritten.
        const c = await vstor("convert", "-n", "-f", "qcow2", "-O", "raw", source, uri);
        assert.equal(c.code, 0, show(c));
        const d = await vstor("compare", "-f", "raw", "-F", "qcow2", uri, source);
        assert.equal(d.code, 0, show(d));
        assert.equal(d.stdout, "Images are identical.\n");
        assert.deepEqual(
          JSON.parse((await vstor("map", "--output=json", old)).stdout),
          JSON.parse(await ok("qemu-img", ["map", "--output=json", uri])),
        );
      }, { tcp: true });
      assert.equal(
        await ok("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", target, source]),
        "Images are identical.\n",
      );
    });
  },
});

Deno.test({
  name: "vstor on bad NBD names: missing export, nothing listening, bad URI, create",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = await sampleImage(dir);
      await withQemuNbd(dir, image, ["-r", "-f", "qcow2"], async (uri, socket) => {
        // An export the server lacks.
        const missing = `nbd+unix:///nosuchexport?socket=${socket}`;
        const m = await vstor("info", missing);
        assert.equal(m.code, 1, show(m));
        assert.match(m.stderr, /nosuchexport/);
        assert.match(m.stderr, /not available|not present/);

        // Writing to a read-only export: refused at open, as qemu-io refuses it.
        const w = await vstor("io", "-f", "raw", "-c", "write 0 4k", uri);
        assert.equal(w.code, 1, show(w));
        assert.match(w.stdout + w.stderr, /read-only/);

        // Creating an image on an export.
        const c = await vstor("create", "-f", "raw", `nbd+unix:///?socket=${socket}`, "1M");
        assert.equal(c.code, 1, show(c));
        assert.match(c.stderr, /does not support image creation/);
      });

      // A socket path with nothing listening.
      const none = join(dir, "nobody.sock");
      const n = await vstor("info", `nbd+unix:///disk?socket=${none}`);
      assert.equal(n.code, 1, show(n));
      assert.ok(n.stderr.includes(none), n.stderr);
      // A TCP port with nothing listening (port 1 on loopback).
      const t = await vstor("info", "nbd://127.0.0.1:1/disk");
      assert.equal(t.code, 1, show(t));
      assert.match(t.stderr, /127\.0\.0\.1/);

      // Bad URIs.
      for (
        const [bad, why] of [
          ["nbd+unix:///x", /socket/],
          ["nbd://", /host/],
          ["nbd://localhost:99999/x", /port/],
          ["nbd+unix://host/x?socket=/s", /host/],
          ["nbd+unix:///x?socket=/s&foo=1", /foo/],
          ["nbd:unix:", /socket path/],
          ["nbd+ssh://h/x", /transport|ssh/],
        ] as const
      ) {
        const b = await vstor("info", bad);
        assert.ok(b.code === 1 || b.code === 2, `${bad}: ${show(b)}`);
        assert.ok(b.stderr.includes(bad), `${bad}: ${b.stderr}`);
        assert.match(b.stderr, why, bad);
        assert.doesNotMatch(b.stderr, /\n\s+at /, `${bad}: a stack trace`);
      }
    });
  },
});

Deno.test({
  name: "vstor create on an existing NBD export succeeds as qemu-img create does",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = join(dir, "target.raw");
      const copy = join(dir, "copy.raw");
      await ok("qemu-img", ["create", "-q", "-f", "raw", image, "4M"]);
      await ok("qemu-io", ["-f", "raw", "-c", "write -P 0x42 0 1M", image]);
      await Deno.copyFile(image, copy);
      // qemu-img falls back to opening the export: a size within it is fine, and the first
      // sector is zeroed (so a stale header cannot be probed).
      await withQemuNbd(dir, copy, ["-f", "raw"], async (uri) => {
        await ok("qemu-img", ["create", "-f", "raw", uri, "1M"]);
      });
      await ok("qemu-io", [
        "-f",
        "raw",
        "-c",
        "read -P 0 0 512",
        "-c",
        "read -P 0x42 512 4k",
        copy,
      ]);
      await withQemuNbd(dir, image, ["-f", "raw"], async (uri) => {
        const r = await vstor("create", "-f", "raw", uri, "1M");
        assert.equal(r.code, 0, show(r));
      });
      await ok("qemu-img", ["compare", "-f", "raw", "-F", "raw", image, copy]);
    });
  },
});

Deno.test({
  name:
    "NbdFile with a reconnect delay rides out a server restart (requests wait, then go through); without one the loss fails at once",
  ignore,
  async fn() {
    const { NbdFile } = await import("../../src/host/nbd.ts");
    const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_reconnect_" });
    const image = join(dir, "disk.raw");
    const socket = join(dir, "q.sock");
    const uri = `nbd+unix:///?socket=${socket}`;
    const serve = (delay: number) =>
      new Deno.Command("sh", {
        args: ["-c", `sleep ${delay}; exec qemu-nbd -t -e 2 -f raw -k ${socket} ${image}`],
        stdout: "null",
        stderr: "null",
      }).spawn();
    const waitSocket = async () => {
      for (let i = 0; i < 100; i++) {
        try {
          if (Deno.statSync(socket).isSocket) return;
        } catch {
          // Not yet.
        }
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    };
    let server = serve(0);
    const children = [server];
    try {
      await Deno.writeFile(image, new Uint8Array(1 << 20));
      await waitSocket();
      const f = NbdFile.open(uri, { reconnectDelayMs: 10_000 });
      const plain = NbdFile.open(uri, { readOnly: true });
      try {
        f.writeAt(4096, new Uint8Array(4096).fill(7));
        f.flush();
        server.kill("SIGKILL");
        await server.status;
        Deno.removeSync(socket);
        // Back in a second: the synchronous read below waits for it.
        server = serve(1);
        children.push(server);
        const back = new Uint8Array(4096);
        f.readAt(4096, back);
        assert.deepEqual(back, new Uint8Array(4096).fill(7));
        f.writeAt(8192, new Uint8Array(512).fill(8));
        f.flush();
        // The connection without a delay was lost with the first server.
        assert.throws(
          () => plain.readAt(0, new Uint8Array(512)),
          /closed the connection|reset|Broken pipe/i,
        );
      } finally {
        f.close();
        plain.close();
      }
      const bytes = await Deno.readFile(image);
      assert.equal(bytes[8192], 8);
      // The first connection never comes: open-timeout retries it until the server is up.
      server.kill("SIGKILL");
      await server.status;
      Deno.removeSync(socket);
      server = serve(1);
      children.push(server);
      const late = NbdFile.open(uri, { readOnly: true, openTimeoutMs: 10_000 });
      try {
        assert.equal(late.size(), 1 << 20);
      } finally {
        late.close();
      }
    } finally {
      for (const c of children) {
        try {
          c.kill("SIGKILL");
        } catch {
          // Gone already.
        }
        await c.status;
      }
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "an NBD export as a qcow2's backing file and as a simulated guest's disk (vstor run): reads come through, writes land in the overlay",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_backing_" });
    try {
      const base = join(dir, "base.raw");
      await ok("qemu-img", ["create", "-q", "-f", "raw", base, "16M"]);
      await ok("qemu-io", ["-f", "raw", "-c", "write -P 0x31 0 16M", base]);
      await withQemuNbd(dir, base, ["-r", "-e", "4", "-f", "raw"], async (uri) => {
        const overlay = join(dir, "overlay.qcow2");
        await ok("qemu-img", ["create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", overlay]);
        const w = await vstor("io", "-c", "write -P 0x32 1M 64k", overlay);
        assert.equal(w.code, 0, show(w));
        const r = await vstor(
          "io",
          "-r",
          "-c",
          "read -P 0x31 0 1M",
          "-c",
          "read -P 0x32 1M 64k",
          overlay,
        );
        assert.equal(r.code, 0, show(r));
        assert.doesNotMatch(r.stdout, /Pattern verification failed/);
        await ok("qemu-img", ["check", overlay]);
        // QEMU reads the same through the same chain.
        await ok("qemu-io", [
          "-r",
          "-c",
          "read -P 0x31 0 1M",
          "-c",
          "read -P 0x32 1M 64k",
          overlay,
        ]);
        // The export as a guest's disk: a random-read job through virtio-blk.
        const run = await vstor(
          "run",
          "--drive",
          `file=${uri},format=raw,id=d0,readonly=on`,
          "--device",
          "virtio-blk,drive=d0",
          "--rw=randread",
          "--bs=4k",
          "--size=4M",
          "--runtime=1",
        );
        assert.equal(run.code, 0, show(run));
        assert.match(run.stdout, /read: IOPS=/);
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
