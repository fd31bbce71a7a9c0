/**
 * vstor's NBD server and client as NBD peers outside QEMU see them: libnbd's nbdinfo and nbdcopy
 * and fio's nbd engine against `vstor serve` (an in-process daemon, its server in a Worker), and
 * vstor's verbs against nbdkit (another process: vstor's client blocks its thread). What they see
 * is checked against what they see through qemu-nbd on a copy of the same image, or against
 * what qemu-io leaves writing the image itself; what they write is checked in the image
 * afterwards by qemu-img check and compare.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Daemon } from "../../src/serve/daemon.ts";
import { parseServeArgs } from "../../src/serve/options.ts";
import {
  cmds,
  dataBytes,
  ignoreWithoutNbd,
  type MapEntry,
  type Result,
  show,
  vstor,
} from "./nbd_peers.ts";
import { ignoreWithout } from "./qemu.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io") ||
  ignoreWithoutNbd("qemu-nbd");
const ignoreFio = ignore || ignoreWithoutNbd("fio");

/** Runs a tool to completion (in `cwd`, for the files fio leaves). */
async function run(tool: string, args: string[], cwd?: string): Promise<Result> {
  const out = await new Deno.Command(tool, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    ...(cwd === undefined ? {} : { cwd }),
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

async function ok(tool: string, args: string[], cwd?: string): Promise<string> {
  const r = await run(tool, args, cwd);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_peers_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/**
 * `vstor serve` in-process with `args` while `fn` runs; it must stop cleanly (unless `fn`
 * failed, whose error then wins). Returns the daemon's log.
 */
async function withDaemon(
  args: string[],
  fn: (logs: string[]) => Promise<void>,
): Promise<string[]> {
  const logs: string[] = [];
  const daemon = await Daemon.start(parseServeArgs(args), { log: (line) => logs.push(line) });
  let failed = true;
  try {
    await fn(logs);
    failed = false;
  } finally {
    const left = await daemon.stop();
    if (!failed) assert.deepEqual(left, [], logs.join("\n"));
  }
  return logs;
}

/** The `--nbd-server` and `--blockdev`s serving `image` (qcow2) as export `disk`. */
function serveQcow2(image: string, socket: string, writable: boolean, extra = ""): string[] {
  const ro = writable ? "" : ",read-only=on";
  return [
    "--blockdev",
    `driver=file,node-name=f,filename=${image}${ro}`,
    "--blockdev",
    `driver=qcow2,node-name=n,file=f${ro}`,
    "--nbd-server",
    `addr.type=unix,addr.path=${socket}`,
    "--export",
    `type=nbd,id=e0,node-name=n,name=disk${writable ? ",writable=on" : ""}${extra}`,
  ];
}

/** A server process (nbdkit, qemu-nbd) listening on a unix socket until stopped. */
interface Peer {
  readonly pid: number;
  /** Stops it (SIGTERM) and returns what it wrote on stderr. */
  stop(): Promise<string>;
}

let sockets = 0;

/**
 * Spawns `tool args` and waits for `socket` to appear; `fn` runs with the peer, which is stopped
 * when `fn` ends, whatever happens. Returns the peer's stderr.
 */
async function withPeer(
  tool: string,
  args: string[],
  socket: string,
  fn: (peer: Peer) => Promise<void>,
): Promise<string> {
  const child = new Deno.Command(tool, {
    args,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let exited = false;
  const output = child.output().then((o) => {
    exited = true;
    return new TextDecoder().decode(o.stderr);
  });
  let stderr: string | undefined;
  const stop = async () => {
    if (!exited) {
      try {
        child.kill("SIGTERM");
      } catch {
        // Exited meanwhile.
      }
    }
    stderr ??= await output;
    return stderr;
  };
  try {
    for (let i = 0; i < 200 && !exited; i++) {
      try {
        if (Deno.statSync(socket).isSocket) break;
      } catch {
        // Not yet.
      }
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    if (exited) throw new Error(`${tool} ${args.join(" ")} exited early: ${await stop()}`);
    await fn({ pid: child.pid, stop });
  } finally {
    await stop();
  }
  return stderr!;
}

/** nbdkit in the foreground on a fresh unix socket in `dir`, with `args` (plugin and filters). */
function withNbdkit(
  dir: string,
  args: string[],
  fn: (uri: string, peer: Peer, socket: string) => Promise<void>,
  exportName = "",
): Promise<string> {
  const socket = join(dir, `nbdkit${sockets++}.sock`);
  return withPeer(
    "nbdkit",
    ["-f", "--exit-with-parent", "-U", socket, ...args],
    socket,
    (peer) => fn(`nbd+unix:///${exportName}?socket=${socket}`, peer, socket),
  );
}

/** qemu-nbd serving `image` as export `disk` with `args`. */
function withQemuNbd(
  dir: string,
  image: string,
  args: string[],
  fn: (uri: string) => Promise<void>,
): Promise<string> {
  const socket = join(dir, `qemu${sockets++}.sock`);
  return withPeer(
    "qemu-nbd",
    ["-t", ...args, "-x", "disk", "-k", socket, image],
    socket,
    () => fn(`nbd+unix:///disk?socket=${socket}`),
  );
}

/** A qcow2 over a raw backing file: backing data, overlay data, a zero cluster, holes. */
async function layeredImage(dir: string, name = "top.qcow2"): Promise<string> {
  const base = join(dir, `base-of-${name}.raw`);
  const top = join(dir, name);
  await ok("qemu-img", ["create", "-q", "-f", "raw", base, "16M"]);
  await ok("qemu-io", ["-f", "raw", ...cmds(["write -P 3 0 512k", "write -P 4 8M 64k"]), base]);
  await ok("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, "16M"]);
  await ok("qemu-io", [
    "-f",
    "qcow2",
    ...cmds(["write -P 7 1M 1M", "write -z 4M 1M", "write -P 8 256k 64k"]),
    top,
  ]);
  return top;
}

/** A 32 MiB raw input: data (one piece unaligned), zeroes written as data, holes. */
async function inputRaw(dir: string): Promise<string> {
  const input = join(dir, "in.raw");
  await ok("qemu-img", ["create", "-q", "-f", "raw", input, "32M"]);
  await ok("qemu-io", [
    "-f",
    "raw",
    ...cmds([
      "write -P 0x11 0 1M",
      "write -P 0x22 3M 12345",
      "write -P 0x33 20M 4M",
      "write -P 0 21M 512k",
      "write -P 0x44 31M 1M",
    ]),
    input,
  ]);
  return input;
}

/** The export list nbdinfo --json gives. */
interface NbdinfoExport {
  "export-name": string;
  description?: string;
  uri: string;
  contexts: string[];
  "export-size": number;
  is_read_only: boolean;
  can_trim: boolean;
  can_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_df: boolean;
  can_cache: boolean;
  [key: string]: unknown;
}

function nbdinfoExports(json: string): NbdinfoExport[] {
  return (JSON.parse(json) as { exports: NbdinfoExport[] }).exports;
}

/** The export without its URI (which names the socket) and nbdinfo's guess at its content. */
function withoutUri(e: NbdinfoExport): Omit<NbdinfoExport, "uri"> {
  const { uri: _, content: __, ...rest } = e;
  return rest;
}

// ---- 1. nbdinfo against vstor serve ----

Deno.test({
  name:
    "nbdinfo on vstor serve: size, flags and contexts as exported, both exports of a two-export server listed with their descriptions, as qemu-nbd shows them",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = await layeredImage(dir);
      const copy = join(dir, "copy.qcow2");
      await Deno.copyFile(image, copy);
      const scratch = join(dir, "scratch.raw");
      await ok("qemu-img", ["create", "-q", "-f", "raw", scratch, "4M"]);
      const socket = join(dir, "vstor.sock");
      const uri = (name: string) => `nbd+unix:///${name}?socket=${socket}`;
      await withDaemon([
        ...serveQcow2(image, socket, false, ",description=the disk,allocation-depth=on"),
        "--blockdev",
        `driver=file,node-name=s,filename=${scratch}`,
        "--export",
        "type=nbd,id=e1,node-name=s,name=scratch,writable=on,description=scratch space",
      ], async () => {
        const [disk] = nbdinfoExports(await ok("nbdinfo", ["--json", uri("disk")]));
        assert.ok(disk !== undefined);
        assert.equal(disk["export-name"], "disk");
        assert.equal(disk.description, "the disk");
        assert.equal(disk["export-size"], 16 << 20);
        assert.deepEqual(disk.contexts, ["base:allocation", "qemu:allocation-depth"]);
        assert.equal(disk.is_read_only, true);
        assert.equal(disk.can_trim, false);
        assert.equal(disk.can_zero, false);
        assert.equal(disk.can_flush, true);
        assert.equal(disk.can_fua, true);
        assert.equal(disk.can_df, true);
        assert.equal(disk.can_cache, true);

        const [s] = nbdinfoExports(await ok("nbdinfo", ["--json", uri("scratch")]));
        assert.ok(s !== undefined);
        assert.equal(s.description, "scratch space");
        assert.equal(s["export-size"], 4 << 20);
        assert.deepEqual(s.contexts, ["base:allocation"]);
        assert.equal(s.is_read_only, false);
        assert.equal(s.can_trim, true);
        assert.equal(s.can_zero, true);

        // The short forms: --size, --is, --can (exit 0 for yes, 2 for no).
        assert.equal(await ok("nbdinfo", ["--size", uri("disk")]), `${16 << 20}\n`);
        assert.equal((await run("nbdinfo", ["--is", "readonly", uri("disk")])).code, 0);
        assert.equal((await run("nbdinfo", ["--is", "readonly", uri("scratch")])).code, 2);
        assert.equal((await run("nbdinfo", ["--can", "trim", uri("scratch")])).code, 0);

        // --list: both exports, in order, with their descriptions, and each as asked alone.
        const listed = nbdinfoExports(await ok("nbdinfo", ["--list", "--json", uri("")]));
        assert.deepEqual(listed.map((e) => e["export-name"]), ["disk", "scratch"]);
        assert.deepEqual(listed.map((e) => e.description), ["the disk", "scratch space"]);
        assert.deepEqual(listed.map((e) => e.uri), [uri("disk"), uri("scratch")]);
        assert.deepEqual(withoutUri(listed[1]!), withoutUri(s));
        const human = await ok("nbdinfo", ["--list", uri("")]);
        assert.match(human, /^export="disk":\n\tdescription: the disk$/m);
        assert.match(human, /^export="scratch":\n\tdescription: scratch space$/m);

        // An export the server lacks.
        const missing = await run("nbdinfo", [uri("nope")]);
        assert.equal(missing.code, 1, show(missing));
        assert.match(missing.stderr, /for export: nope/);

        // qemu-nbd serving a copy read-only, shared (so multi-conn), with the same description.
        await withQemuNbd(
          dir,
          copy,
          ["-r", "-A", "-e", "2", "-D", "the disk", "-f", "qcow2"],
          async (q) => {
            const [theirs] = nbdinfoExports(await ok("nbdinfo", ["--json", q]));
            assert.deepEqual(withoutUri(disk), withoutUri(theirs!));
            const qMissing = await run("nbdinfo", [q.replace("/disk?", "/nope?")]);
            assert.equal(qMissing.code, missing.code);
            assert.equal(
              qMissing.stderr.replaceAll(q.slice(q.indexOf("socket=")), "S"),
              missing.stderr.replaceAll(uri("").slice(uri("").indexOf("socket=")), "S"),
            );
          },
        );
        // And writable, as the scratch export: the same but for the name, and for FAST_ZERO,
        // which QEMU's server offers on writable exports and vstor's does not.
        const scratchCopy = join(dir, "scratch-copy.raw");
        await Deno.copyFile(scratch, scratchCopy);
        const ws = ["-e", "2", "-D", "scratch space", "-f", "raw"];
        await withQemuNbd(dir, scratchCopy, ws, async (q) => {
          const [theirs] = nbdinfoExports(await ok("nbdinfo", ["--json", q]));
          const comparable = (e: NbdinfoExport) => {
            const { "export-name": _, can_fast_zero: __, ...rest } = withoutUri(e);
            return rest;
          };
          assert.deepEqual(comparable(s), comparable(theirs!));
        });
      });
    });
  },
});

Deno.test({
  name:
    "nbdinfo --map and --map=qemu:allocation-depth through vstor serve equal qemu-nbd's on a qcow2 with backing data, overlay data, a zero cluster and holes",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = await layeredImage(dir);
      const copy = join(dir, "copy.qcow2");
      await Deno.copyFile(image, copy);
      const socket = join(dir, "vstor.sock");
      const uri = `nbd+unix:///disk?socket=${socket}`;
      const queries = [
        ["--map"],
        ["--map", "--totals"],
        ["--map", "--json"],
        ["--map=qemu:allocation-depth"],
        ["--map=qemu:allocation-depth", "--totals"],
      ];
      const ask = async (u: string) => {
        const out: string[] = [];
        for (const q of queries) out.push(await ok("nbdinfo", [...q, u]));
        return out;
      };
      let ours: string[] = [];
      await withDaemon(serveQcow2(image, socket, false, ",allocation-depth=on"), async () => {
        ours = await ask(uri);
      });
      let theirs: string[] = [];
      await withQemuNbd(dir, copy, ["-r", "-A", "-f", "qcow2"], async (q) => {
        theirs = await ask(q);
      });
      for (let i = 0; i < queries.length; i++) {
        assert.equal(ours[i], theirs[i], `nbdinfo ${queries[i]!.join(" ")}`);
      }
      // What the extents should be, whoever serves them.
      const map = JSON.parse(ours[2]!) as { offset: number; length: number; type: number }[];
      const at = (off: number) => map.find((e) => e.offset <= off && off < e.offset + e.length);
      assert.equal(at(0)?.type, 0); // backing data (and overlay data at 256k)
      assert.equal(at(512 << 10)?.type, 3); // a hole in the backing file
      assert.equal(at(1 << 20)?.type, 0); // overlay data
      assert.equal(at(4 << 20)?.type, 3); // the zero cluster
      assert.equal(at(8 << 20)?.type, 0); // backing data at 8M
      assert.equal(at(12 << 20)?.type, 3); // holes
      const depth = ours[3]!.split("\n").filter((l) => l !== "").map((l) => l.trim().split(/\s+/));
      const depthAt = (off: number) =>
        depth.find(([o, n]) => Number(o) <= off && off < Number(o) + Number(n))?.[2];
      assert.equal(depthAt(0), "2"); // in the backing file
      assert.equal(depthAt(256 << 10), "1"); // the overlay's own
      assert.equal(depthAt(1 << 20), "1");
      assert.equal(depthAt(4 << 20), "1"); // a zero cluster is the overlay's too
      assert.equal(depthAt(12 << 20), "2");
    });
  },
});

// ---- 2. nbdcopy both ways ----

Deno.test({
  name:
    "nbdcopy from vstor serve (sparse and --allocated, to a file and to stdout) copies every byte of the qcow2 chain",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = await layeredImage(dir);
      const socket = join(dir, "vstor.sock");
      const uri = `nbd+unix:///disk?socket=${socket}`;
      const sparse = join(dir, "sparse.raw");
      const allocated = join(dir, "allocated.raw");
      const logs = await withDaemon(serveQcow2(image, socket, false), async () => {
        await ok("nbdcopy", [uri, sparse]);
        await ok("nbdcopy", ["--allocated", uri, allocated]);
        // To a pipe: every byte in order, holes as zeroes.
        const piped = await new Deno.Command("nbdcopy", {
          args: [uri, "-"],
          stdout: "piped",
          stderr: "piped",
        }).output();
        assert.equal(piped.code, 0, new TextDecoder().decode(piped.stderr));
        await Deno.writeFile(join(dir, "piped.raw"), piped.stdout);
      });
      assert.ok(!logs.some((l) => /error|breach|refused/i.test(l)), logs.join("\n"));
      for (const out of [sparse, allocated, join(dir, "piped.raw")]) {
        assert.equal(
          await ok("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", out, image]),
          "Images are identical.\n",
          out,
        );
      }
      // Sparse: the holes the export reports stay holes in the copy.
      const map = JSON.parse(await ok("qemu-img", ["map", "--output=json", sparse])) as MapEntry[];
      assert.ok(dataBytes(map) <= (1 << 20) + (512 << 10) + (64 << 10), JSON.stringify(map));
    });
  },
});

Deno.test({
  name:
    "nbdcopy into a writable vstor export (sparse and --allocated): qemu-img check clean, identical to the input, mapped as qemu-nbd's copy",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const input = await inputRaw(dir);
      for (const mode of [[], ["--allocated"]]) {
        const what = `nbdcopy ${mode.join(" ")}`;
        const ours = join(dir, "ours.qcow2");
        const theirs = join(dir, "theirs.qcow2");
        for (const f of [ours, theirs]) {
          await Deno.remove(f).catch(() => {});
          await ok("qemu-img", ["create", "-q", "-f", "qcow2", f, "32M"]);
        }
        const socket = join(dir, `vstor${sockets++}.sock`);
        const logs = await withDaemon(serveQcow2(ours, socket, true), async () => {
          await ok("nbdcopy", [...mode, input, `nbd+unix:///disk?socket=${socket}`]);
        });
        assert.ok(!logs.some((l) => /error|breach|refused/i.test(l)), logs.join("\n"));
        await withQemuNbd(dir, theirs, ["-f", "qcow2"], async (q) => {
          await ok("nbdcopy", [...mode, input, q]);
        });
        await ok("qemu-img", ["check", ours]);
        assert.equal(
          await ok("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", input, ours]),
          "Images are identical.\n",
          what,
        );
        // Where data and zeroes lie (not where in the file: nbdcopy writes in any order).
        const shape = async (f: string) =>
          (JSON.parse(await ok("qemu-img", ["map", "--output=json", f])) as MapEntry[])
            .map(({ offset: _, ...e }) => e);
        assert.deepEqual(await shape(ours), await shape(theirs), what);
      }
    });
  },
});

Deno.test({
  name: "vstor serve over TCP (port chosen by the kernel): nbdinfo and nbdcopy by nbd://",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const input = await inputRaw(dir);
      const image = join(dir, "tcp.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", image, "32M"]);
      const out = join(dir, "out.raw");
      await withDaemon([
        "--blockdev",
        `driver=file,node-name=f,filename=${image}`,
        "--blockdev",
        "driver=qcow2,node-name=n,file=f",
        "--nbd-server",
        "addr.type=inet,addr.host=127.0.0.1,addr.port=0",
        "--export",
        "type=nbd,id=e0,node-name=n,name=disk,writable=on",
      ], async (logs) => {
        const port = Number(/NBD server on tcp:127\.0\.0\.1:([0-9]+)/.exec(logs.join("\n"))?.[1]);
        assert.ok(port > 0, logs.join("\n"));
        const uri = `nbd://127.0.0.1:${port}/disk`;
        assert.equal(await ok("nbdinfo", ["--size", uri]), `${32 << 20}\n`);
        await ok("nbdcopy", [input, uri]);
        await ok("nbdcopy", [uri, out]);
      });
      await ok("qemu-img", ["check", image]);
      await ok("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", input, image]);
      await ok("qemu-img", ["compare", "-f", "raw", "-F", "raw", input, out]);
    });
  },
});

// ---- 3. vstor as a client of nbdkit ----

/** What vstor io and qemu-io write: aligned, unaligned, zeroes, discards, vectors, FUA, big. */
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
  "write -f -P 0xa8 7M 4k",
  "write -z -u 7340032 64k",
  "flush",
];

/** Reads of what WRITES leaves. */
const READS = [
  "read -P 0xa1 0 3000",
  "read -P 0 3000 1000",
  "read -P 0xa1 4000 97",
  "read -P 0xa2 4097 5000",
  "read -P 0xa3 1M 64k",
  "read -P 0 1114112 64k",
  "read -P 0xa3 1179648 64k",
  "read -P 0xa4 2M 64k",
  "read -P 0 2162688 128k",
  "read -P 0xa4 2293760 64k",
  "read -P 0xa5 3145628 300",
  "read -P 0 5M 4k",
  "readv -P 0xa7 6M 4k 512 7k",
  "read -P 0 7M 64k",
];

/** The requests nbdkit's log filter saw (no flushes: qemu-io uses FUA where vstor flushes). */
async function loggedRequests(logfile: string): Promise<string[]> {
  const text = await Deno.readTextFile(logfile);
  return [...text.matchAll(
    /(Read|Write|Zero|Trim|Cache) id=[0-9]+ (offset=0x[0-9a-f]+ count=0x[0-9a-f]+(?: trim=[01])?)/g,
  )].map((m) => `${m[1]} ${m[2]}`);
}

Deno.test({
  name:
    "vstor io through nbdkit's memory plugin sends the requests qemu-io sends and reads back what it wrote",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const big = ["write -P 0xa9 8M 40M", "read -P 0xa9 8M 40M"];
      const requests: string[][] = [];
      for (const who of ["qemu-io", "vstor"]) {
        const logfile = join(dir, `${who}.log`);
        const stderr = await withNbdkit(
          dir,
          ["--filter=log", "memory", "64M", `logfile=${logfile}`],
          async (uri) => {
            const args = ["-f", "raw", ...cmds([...WRITES, ...big]), uri];
            if (who === "qemu-io") await ok("qemu-io", args);
            else {
              const r = await vstor("io", ...args);
              assert.equal(r.code, 0, show(r));
              assert.doesNotMatch(r.stdout + r.stderr, /failed|error/i, show(r));
              assert.match(r.stdout, /wrote 5000\/5000 bytes at offset 4097/);
              assert.match(r.stdout, /discard 131072\/131072 bytes at offset 2162688/);
            }
          },
        );
        assert.doesNotMatch(stderr, /error/, `${who}: nbdkit says ${stderr}`);
        requests.push(await loggedRequests(logfile));
      }
      assert.ok(requests[0]!.length > 10, requests[0]!.join("\n"));
      // The same requests; nbdkit's threads may log ones in flight together in either order.
      assert.deepEqual([...requests[1]!].sort(), [...requests[0]!].sort());

      // The other direction: vstor reads back what it wrote, on a new connection; qemu-io too.
      await withNbdkit(dir, ["memory", "64M"], async (uri) => {
        const w = await vstor("io", "-f", "raw", ...cmds(WRITES), uri);
        assert.equal(w.code, 0, show(w));
        const r = await vstor("io", "-r", "-f", "raw", ...cmds(READS), uri);
        assert.equal(r.code, 0, show(r));
        assert.doesNotMatch(r.stdout + r.stderr, /verification failed|error/i, show(r));
        assert.equal(r.stdout.match(/^read(v)? [0-9]+\/[0-9]+ bytes/gm)?.length, READS.length);
        const q = await run("qemu-io", ["-r", "-f", "raw", ...cmds(READS), uri]);
        assert.equal(q.code, 0, q.stderr);
        assert.doesNotMatch(q.stdout, /verification failed/, q.stdout);
      });
    });
  },
});

Deno.test({
  name:
    "vstor io writes into nbdkit's file plugin leave the file qemu-io leaves writing it directly",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const served = join(dir, "served.raw");
      const direct = join(dir, "direct.raw");
      for (const f of [served, direct]) {
        await ok("qemu-img", ["create", "-q", "-f", "raw", f, "8M"]);
        await ok("qemu-io", ["-f", "raw", "-c", "write -P 0x5c 2M 1M", f]);
      }
      await ok("qemu-io", ["-f", "raw", ...cmds(WRITES), direct]);
      const stderr = await withNbdkit(dir, ["file", served], async (uri) => {
        const r = await vstor("io", "-f", "raw", ...cmds(WRITES), uri);
        assert.equal(r.code, 0, show(r));
        // qemu's own client sees the export as the file qemu-io wrote.
        assert.equal(
          await ok("qemu-img", ["compare", "-f", "raw", "-F", "raw", uri, direct]),
          "Images are identical.\n",
        );
        const back = await vstor("io", "-r", "-f", "raw", ...cmds(READS), uri);
        assert.equal(back.code, 0, show(back));
        assert.doesNotMatch(back.stdout + back.stderr, /verification failed|error/i, show(back));
      });
      assert.doesNotMatch(stderr, /error/, stderr);
      assert.equal(
        await ok("qemu-img", ["compare", "-f", "raw", "-F", "raw", served, direct]),
        "Images are identical.\n",
      );
      // Zeroes and discards made the same holes.
      assert.deepEqual(
        JSON.parse(await ok("qemu-img", ["map", "--output=json", served])),
        JSON.parse(await ok("qemu-img", ["map", "--output=json", direct])),
      );
    });
  },
});

/** A 16 MiB raw file with data, an unaligned piece, zeroes written as data and holes. */
async function sampleRaw(dir: string, name: string): Promise<string> {
  const file = join(dir, name);
  await ok("qemu-img", ["create", "-q", "-f", "raw", file, "16M"]);
  await ok("qemu-io", [
    "-f",
    "raw",
    ...cmds([
      "write -P 0x11 0 1M",
      "write -P 0x22 8M 64k",
      "write -P 0 10M 128k",
      "write -P 0x33 12345k 3k",
    ]),
    file,
  ]);
  return file;
}

Deno.test({
  name:
    "vstor info, map, compare and convert on nbdkit exports answer as qemu-img does on the same URIs",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const file = await sampleRaw(dir, "sample.raw");
      const out = join(dir, "out.qcow2");
      // nbdkit serves any export name: a named one, for filename to read the same.
      await withNbdkit(dir, ["-r", "file", file], async (uri) => {
        const info = await vstor("info", "--output=json", uri);
        assert.equal(info.code, 0, show(info));
        assert.deepEqual(
          JSON.parse(info.stdout),
          JSON.parse(await ok("qemu-img", ["info", "--output=json", uri])),
        );
        const human = await vstor("info", uri);
        assert.equal(human.code, 0, show(human));
        assert.equal(human.stdout, await ok("qemu-img", ["info", uri]));

        for (const window of [[], ["--start-offset=1M", "--max-length=9M"]]) {
          const m = await vstor("map", "--output=json", ...window, uri);
          assert.equal(m.code, 0, show(m));
          assert.deepEqual(
            JSON.parse(m.stdout),
            JSON.parse(await ok("qemu-img", ["map", "--output=json", ...window, uri])),
            window.join(" "),
          );
        }
        const hm = await vstor("map", uri);
        assert.equal(hm.code, 0, show(hm));
        assert.equal(hm.stdout, await ok("qemu-img", ["map", uri]));

        const c = await vstor("convert", "-O", "qcow2", uri, out);
        assert.equal(c.code, 0, show(c));
        const same = await vstor("compare", "-f", "raw", "-F", "raw", uri, file);
        assert.equal(same.code, 0, show(same));
        assert.equal(same.stdout, "Images are identical.\n");
      }, "disk");
      await ok("qemu-img", ["check", out]);
      assert.equal(
        await ok("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", out, file]),
        "Images are identical.\n",
      );
      const source = JSON.parse(await ok("qemu-img", ["map", "--output=json", file]));
      const converted = JSON.parse(await ok("qemu-img", ["map", "--output=json", out]));
      assert.ok(dataBytes(converted) <= dataBytes(source), JSON.stringify(converted));

      // And into an export: convert -n onto nbdkit's memory plugin.
      const qcow2 = join(dir, "src.qcow2");
      await ok("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", file, qcow2]);
      await withNbdkit(dir, ["memory", "16M"], async (uri) => {
        const n = await vstor("convert", "-n", "-f", "qcow2", "-O", "raw", qcow2, uri);
        assert.equal(n.code, 0, show(n));
        assert.equal(
          await ok("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", uri, qcow2]),
          "Images are identical.\n",
        );
      });
    });
  },
});

Deno.test({
  name:
    "vstor keeps nbdkit's block size constraints (blocksize-policy, errors on) and works without structured replies",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const policy = [
        "--filter=blocksize-policy",
        "memory",
        "8M",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=262144",
        "blocksize-error-policy=error",
      ];
      const stderr = await withNbdkit(dir, policy, async (uri) => {
        const info = JSON.parse(await ok("nbdinfo", ["--json", uri])).exports[0];
        assert.equal(info.block_size_minimum, 4096);
        // Unaligned writes (read, patched, written whole) and writes over the maximum (split).
        const r = await vstor("io", "-f", "raw", ...cmds(WRITES), uri);
        assert.equal(r.code, 0, show(r));
        assert.doesNotMatch(r.stdout + r.stderr, /failed|error/i, show(r));
        const back = await vstor("io", "-r", "-f", "raw", ...cmds(READS), uri);
        assert.equal(back.code, 0, show(back));
        assert.doesNotMatch(back.stdout + back.stderr, /verification failed|error/i, show(back));
        const q = await run("qemu-io", ["-r", "-f", "raw", ...cmds(READS), uri]);
        assert.equal(q.code, 0, q.stderr);
        assert.doesNotMatch(q.stdout, /verification failed|failed/, q.stdout);
      });
      // No request broke the policy (nbdkit reports each one it refuses).
      assert.doesNotMatch(stderr, /error/, stderr);

      await withNbdkit(dir, ["--no-sr", "memory", "8M"], async (uri) => {
        const [e] = nbdinfoExports(await ok("nbdinfo", ["--json", uri]));
        assert.deepEqual(e?.contexts ?? [], []);
        const r = await vstor("io", "-f", "raw", ...cmds(WRITES), uri);
        assert.equal(r.code, 0, show(r));
        const back = await vstor("io", "-r", "-f", "raw", ...cmds(READS), uri);
        assert.equal(back.code, 0, show(back));
        assert.doesNotMatch(back.stdout + back.stderr, /verification failed|error/i, show(back));
        const m = await vstor("map", "--output=json", uri);
        assert.equal(m.code, 0, show(m));
        assert.deepEqual(
          JSON.parse(m.stdout),
          JSON.parse(await ok("qemu-img", ["map", "--output=json", uri])),
        );
      });
    });
  },
});

Deno.test({
  name:
    "vstor ends a connection it gives up during the handshake with what the protocol has for that point (DISC after GO, nothing before the client flags), as qemu-io does",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      /** What nbdkit (with `args`) says while `who` opens its export for writing. */
      const nbdkitSays = (args: string[], who: "qemu-io" | "vstor", why: RegExp) =>
        withNbdkit(dir, [...args, "memory", "1M"], async (uri) => {
          const io = ["-f", "raw", "-c", "write 0 4k", uri];
          const r = who === "vstor" ? await vstor("io", ...io) : await run("qemu-io", io);
          assert.equal(r.code, 1, show(r));
          assert.match(r.stderr, why);
          // Time for nbdkit to read what was sent before it is stopped.
          await new Promise((resolve) => setTimeout(resolve, 300));
        });
      const said = {
        // A read-only export opened for writing: refused after GO.
        "qemu-io, read-only export": await nbdkitSays(["-r"], "qemu-io", /Permission denied/),
        "vstor, read-only export": await nbdkitSays(["-r"], "vstor", /read-only/),
        // A server without fixed newstyle, which vstor refuses (by design) before it sends its
        // client flags.
        "vstor, no fixed newstyle": await nbdkitSays(
          ["--mask-handshake=0"],
          "vstor",
          /fixed newstyle/,
        ),
      };
      // vstor sends NBD_OPT_ABORT ("IHAVEOPT", an option) wherever it gives up: after GO nbdkit
      // reads it as a request ("error: read request: Bad message"), before the client flags as
      // the flags ("error: client requested unexpected flags 0x49484156").
      assert.deepEqual(said, {
        "qemu-io, read-only export": "",
        "vstor, read-only export": "",
        "vstor, no fixed newstyle": "",
      });
    });
  },
});

Deno.test({
  name:
    "vstor info names an NBD image as qemu-img info does (the default export nbd+unix:///?socket=…, the older nbd:unix:…:exportname=…)",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      await withNbdkit(dir, ["memory", "1M"], async (uri, _peer, socket) => {
        assert.match(uri, /^nbd\+unix:\/\/\/\?socket=/);
        const names = [uri, `nbd:unix:${socket}:exportname=disk`, `nbd:unix:${socket}`];
        const ours: Record<string, unknown> = {};
        const theirs: Record<string, unknown> = {};
        for (const name of names) {
          theirs[name] = JSON.parse(await ok("qemu-img", ["info", "--output=json", name]));
          const r = await vstor("info", "--output=json", name);
          assert.equal(r.code, 0, show(r));
          ours[name] = JSON.parse(r.stdout);
        }
        // qemu-img rebuilds the name from the options it parsed ("nbd+unix://?socket=…" for the
        // empty export name, "nbd+unix:///disk?socket=…" for the older syntax); vstor echoes
        // the name as given.
        assert.deepEqual(ours, theirs);
      });
    });
  },
});

Deno.test({
  name:
    "vstor map of an nbdkit export whose size is not a multiple of 512 reports the tail past its end as qemu-img map does",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      await withNbdkit(dir, ["memory", "1000000"], async (uri) => {
        await ok("qemu-io", ["-f", "raw", "-c", "write -P 0x66 999000 1000", uri]);
        const theirs = JSON.parse(await ok("qemu-img", ["map", "--output=json", uri]));
        const info = await vstor("info", "--output=json", uri);
        assert.equal(JSON.parse(info.stdout)["virtual-size"], 1000448);
        const io = await vstor("io", "-r", "-f", "raw", "-c", "read -P 0x66 999000 1000", uri);
        assert.equal(io.code, 0, show(io));
        const r = await vstor("map", "--output=json", uri);
        assert.equal(r.code, 0, show(r));
        // The 448 bytes past the server's 1000000: qemu-img has no "offset" there (QEMU's nbd
        // driver answers BDRV_BLOCK_ZERO alone past the export's end), vstor has one.
        assert.deepEqual(JSON.parse(r.stdout), theirs);
      });
    });
  },
});

Deno.test({
  name:
    "vstor bench -w through nbdkit (requests in flight, wrapping at the end, unaligned, writethrough) leaves the export qemu-img bench leaves",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const runs = [
        ["-w", "-c", "4000", "-d", "32", "-s", "4k", "-S", "8k", "--pattern=0x5a"],
        // Past the end the offsets wrap to the start, as qemu-img bench's.
        [
          "-w",
          "-c",
          "1000",
          "-d",
          "16",
          "-s",
          "64k",
          "-o",
          "32M",
          "--pattern=0x6b",
          "-t",
          "writethrough",
        ],
        ["-w", "-c", "300", "-d", "8", "-s", "1000", "-S", "3000", "-o", "100", "--pattern=0x7c"],
        ["-c", "2000", "-d", "32", "-s", "4k"],
      ];
      await withNbdkit(dir, ["memory", "64M"], async (ours) => {
        await withNbdkit(dir, ["memory", "64M"], async (theirs) => {
          for (const args of runs) {
            const r = await vstor("bench", "-q", "-f", "raw", ...args, ours);
            assert.equal(r.code, 0, show(r));
            assert.match(r.stdout, /^Run completed in /m, show(r));
            await ok("qemu-img", ["bench", "-q", "-f", "raw", ...args, theirs]);
          }
          assert.equal(
            await ok("qemu-img", ["compare", "-f", "raw", "-F", "raw", ours, theirs]),
            "Images are identical.\n",
          );
          // What each run left where the later ones did not write over it.
          await ok("qemu-io", [
            "-r",
            "-f",
            "raw",
            ...cmds([
              "read -P 0x7c 100 1000",
              "read -P 0x6b 1100 2000",
              "read -P 0x6b 1M 29M",
              "read -P 0x5a 31232k 4k",
              "read -P 0 31236k 4k",
              "read -P 0x6b 32M 32M",
            ]),
            ours,
          ]);
        });
      });
    });
  },
});

Deno.test({
  name:
    "errors nbdkit injects (EIO on reads, ENOSPC on writes) reach vstor io, convert and compare as they reach qemu-io and qemu-img",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const trigger = join(dir, "trigger");
      const args = [
        "--filter=error",
        "memory",
        "8M",
        "error-pread=EIO",
        "error-pread-rate=100%",
        `error-pread-file=${trigger}`,
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
        `error-pwrite-file=${trigger}`,
      ];
      await withNbdkit(dir, args, async (uri) => {
        await ok("qemu-io", ["-f", "raw", "-c", "write -P 1 0 64k", uri]);
        await Deno.writeTextFile(trigger, "");
        const commands = cmds(["read 0 4k", "write -P 2 0 4k", "write -z 0 4k", "read 8k 4k"]);
        const ours = await vstor("io", "-f", "raw", ...commands, uri);
        const theirs = await run("qemu-io", ["-f", "raw", ...commands, uri]);
        assert.equal(ours.code, theirs.code, show(ours));
        const lines = (out: string) => out.split("\n").filter((l) => !/ops\/sec|^$/.test(l));
        assert.deepEqual(lines(ours.stdout), lines(theirs.stdout));
        assert.deepEqual(lines(ours.stdout), [
          "read failed: Input/output error",
          "write failed: No space left on device",
          "wrote 4096/4096 bytes at offset 0",
          "read failed: Input/output error",
        ]);
        const c = await vstor("convert", "-f", "raw", "-O", "raw", uri, join(dir, "out.raw"));
        assert.equal(c.code, 1, show(c));
        assert.match(c.stderr, /Input\/output error/);
        const q = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", uri, uri]);
        const v = await vstor("compare", "-f", "raw", "-F", "raw", uri, uri);
        assert.equal(v.code, q.code, show(v));
        assert.equal(v.code, 4);
        await Deno.remove(trigger);
        // The export is fine again.
        const back = await vstor("io", "-r", "-f", "raw", "-c", "read -P 1 4k 60k", uri);
        assert.equal(back.code, 0, show(back));
      });
    });
  },
});

Deno.test({
  name:
    "nbdkit stopping in the middle of vstor convert: the convert fails naming the read, and does not hang",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const out = join(dir, "out.raw");
      // Each read takes 400 ms: the convert is under way when nbdkit is told to stop.
      const args = ["--filter=delay", "memory", "64M", "rdelay=400ms"];
      await withNbdkit(dir, args, async (uri, peer) => {
        await ok("qemu-io", ["-f", "raw", "-c", "write -P 1 0 64M", uri]);
        // vstor's client blocks this thread: the stop comes from another process.
        const killer = new Deno.Command("sh", {
          args: ["-c", `sleep 1; kill ${peer.pid}`],
          stdin: "null",
          stdout: "null",
          stderr: "null",
        }).spawn();
        const started = performance.now();
        try {
          const r = await vstor("convert", "-f", "raw", "-O", "raw", uri, out);
          assert.equal(r.code, 1, show(r));
          assert.match(r.stderr, /READ of [0-9]+ bytes at [0-9]+ failed/);
          assert.ok(performance.now() - started < 20_000);
        } finally {
          await killer.status;
        }
      });
    });
  },
});

// ---- 4. fio's nbd engine against vstor serve ----

interface FioJob {
  error: number;
  read: { io_bytes: number };
  write: { io_bytes: number };
}

/** Runs fio (in `dir`) and returns its one job's report; fio must exit 0 without errors. */
async function fio(dir: string, uri: string, args: string[]): Promise<FioJob> {
  const r = await run("fio", [
    "--ioengine=nbd",
    `--uri=${uri}`,
    "--verify_state_save=0",
    "--output-format=json",
    ...args,
  ], dir);
  assert.equal(r.code, 0, `fio ${args.join(" ")}: ${show(r)}`);
  assert.doesNotMatch(r.stderr, /verify|error|bad/i, r.stderr);
  // "fio: connected to NBD server" comes first.
  const report = JSON.parse(r.stdout.slice(r.stdout.indexOf("{"))) as { jobs: FioJob[] };
  const job = report.jobs[0]!;
  assert.equal(job.error, 0, JSON.stringify(job));
  return job;
}

Deno.test({
  name:
    "fio's nbd engine writes and verifies through vstor serve (4k randwrite qd32, randrw, 1M sequential, four jobs at once); the image checks clean",
  ignore: ignoreFio,
  async fn() {
    await withDir(async (dir) => {
      const image = join(dir, "fio.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", image, "64M"]);
      const socket = join(dir, "vstor.sock");
      const uri = `nbd+unix:///disk?socket=${socket}`;
      const logs = await withDaemon(serveQcow2(image, socket, true), async () => {
        const a = await fio(dir, uri, [
          "--name=randwrite",
          "--rw=randwrite",
          "--bs=4k",
          "--iodepth=32",
          "--size=32M",
          "--verify=crc32c",
          "--do_verify=1",
          "--randseed=1234",
        ]);
        assert.equal(a.write.io_bytes, 32 << 20);
        assert.equal(a.read.io_bytes, 32 << 20); // all of it read back and verified
        const b = await fio(dir, uri, [
          "--name=randrw",
          "--rw=randrw",
          "--bs=4k",
          "--iodepth=16",
          "--offset=32M",
          "--size=16M",
          "--verify=crc32c",
          "--do_verify=1",
          "--randseed=4321",
        ]);
        assert.ok(b.write.io_bytes > 0 && b.read.io_bytes > 0, JSON.stringify(b));
        const c = await fio(dir, uri, [
          "--name=seq",
          "--rw=write",
          "--bs=1M",
          "--iodepth=8",
          "--size=64M",
          "--verify=crc32c",
          "--do_verify=1",
        ]);
        assert.equal(c.write.io_bytes, 64 << 20);
        assert.equal(c.read.io_bytes, 64 << 20);
        // Four jobs, four connections, allocating clusters of one image at once.
        const d = await fio(dir, uri, [
          "--name=four",
          "--rw=randwrite",
          "--bs=4k",
          "--iodepth=32",
          "--numjobs=4",
          "--offset_increment=16M",
          "--size=16M",
          "--group_reporting",
          "--verify=crc32c",
          "--do_verify=1",
          "--randseed=77",
        ]);
        assert.equal(d.write.io_bytes, 64 << 20);
        assert.equal(d.read.io_bytes, 64 << 20);
      });
      assert.ok(!logs.some((l) => /error|breach|refused/i.test(l)), logs.join("\n"));
      // fio left nothing behind in its working directory but what it was given.
      assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name).sort(), ["fio.qcow2"]);
      await ok("qemu-img", ["check", image]);
    });
  },
});

// ---- 5. multi-conn ----

/** The 32 MiB image both halves make: what the two writers below write. */
async function expectedHalves(dir: string, lo: string[], hi: string[]): Promise<string> {
  const expected = join(dir, "expected.qcow2");
  await ok("qemu-img", ["create", "-q", "-f", "qcow2", expected, "32M"]);
  await ok("qemu-io", ["-f", "qcow2", ...cmds([...lo, ...hi]), expected]);
  return expected;
}

Deno.test({
  name:
    "multi-conn: two fio processes write disjoint halves at once through one writable export; the image has both and checks clean",
  ignore: ignoreFio,
  async fn() {
    await withDir(async (dir) => {
      const image = join(dir, "mc.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", image, "32M"]);
      const socket = join(dir, "vstor.sock");
      const uri = `nbd+unix:///disk?socket=${socket}`;
      // verify=pattern: the data is the pattern alone (no header), so the result is known.
      const half = (name: string, offset: string, pattern: string, seed: number) =>
        fio(dir, uri, [
          `--name=${name}`,
          "--rw=randwrite",
          "--bs=64k",
          "--iodepth=16",
          `--offset=${offset}`,
          "--size=16M",
          "--verify=pattern",
          `--verify_pattern=${pattern}`,
          "--do_verify=1",
          `--randseed=${seed}`,
        ]);
      const logs = await withDaemon(serveQcow2(image, socket, true), async () => {
        const [a, b] = await Promise.all([
          half("lo", "0", "0x5a", 11),
          half("hi", "16M", "0xa5", 22),
        ]);
        assert.equal(a.write.io_bytes, 16 << 20);
        assert.equal(b.write.io_bytes, 16 << 20);
      });
      assert.ok(!logs.some((l) => /error|breach|refused/i.test(l)), logs.join("\n"));
      await ok("qemu-img", ["check", image]);
      const expected = await expectedHalves(dir, ["write -P 0x5a 0 16M"], [
        "write -P 0xa5 16M 16M",
      ]);
      assert.equal(
        await ok("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", image, expected]),
        "Images are identical.\n",
      );
    });
  },
});

Deno.test({
  name:
    "multi-conn: two nbdcopy processes (through nbdkit's nbd plugin with the offset filter) write disjoint halves at once; the image has both and checks clean",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = join(dir, "mc.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", image, "32M"]);
      const lo = ["write -P 0x5a 0 5M", "write -P 0x6b 9M 3M", "write -P 0x7c 13M 12345"];
      const hi = ["write -P 0xa5 1M 6M", "write -P 0xb6 12M 4M"];
      const halves = [join(dir, "lo.raw"), join(dir, "hi.raw")];
      for (const [i, f] of halves.entries()) {
        await ok("qemu-img", ["create", "-q", "-f", "raw", f, "16M"]);
        await ok("qemu-io", ["-f", "raw", ...cmds(i === 0 ? lo : hi), f]);
      }
      const socket = join(dir, "vstor.sock");
      const logs = await withDaemon(serveQcow2(image, socket, true), async () => {
        // nbdcopy runs nbdkit (a client of vstor's, one connection per its own client) as its
        // destination, a window of the export.
        const copy = (src: string, offset: string) =>
          ok("nbdcopy", [
            src,
            "--",
            "[",
            "nbdkit",
            "--exit-with-parent",
            "--filter=offset",
            "nbd",
            `socket=${socket}`,
            "export=disk",
            `offset=${offset}`,
            "range=16M",
            "]",
          ]);
        await Promise.all([copy(halves[0]!, "0"), copy(halves[1]!, "16M")]);
      });
      assert.ok(!logs.some((l) => /error|breach|refused/i.test(l)), logs.join("\n"));
      assert.ok(logs.filter((l) => /^nbd client [0-9]+: /.test(l)).length >= 2, logs.join("\n"));
      await ok("qemu-img", ["check", image]);
      const shifted = hi.map((c) =>
        c.replace(/ ([0-9]+)M ([0-9]+)M$/, (_, o, n) => ` ${Number(o) + 16}M ${n}M`)
      );
      const expected = await expectedHalves(dir, lo, shifted);
      assert.equal(
        await ok("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", image, expected]),
        "Images are identical.\n",
      );
    });
  },
});

Deno.test({
  name:
    "nbdinfo --map=qemu:dirty-bitmap:NAME on vstor serve (bitmaps=…) equals qemu-nbd -B NAME's; a missing bitmap stops the start naming it",
  ignore,
  async fn() {
    await withDir(async (dir) => {
      const image = join(dir, "bm.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", image, "64M"]);
      // b0 tracks writes (it sees both), b1 was added between them; b2 is in the backing file.
      await ok("qemu-img", ["bitmap", "--add", image, "b0"]);
      await ok("qemu-io", ["-f", "qcow2", "-c", "write -P 1 1M 64k", image]);
      await ok("qemu-img", ["bitmap", "--add", "-g", "128k", image, "b1"]);
      await ok("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        "write -P 2 10M 200k",
        "-c",
        "write 63M 1M",
        image,
      ]);
      const copy = join(dir, "copy.qcow2");
      await Deno.copyFile(image, copy);
      const socket = join(dir, "vstor.sock");
      const ours: Record<string, string> = {};
      await withDaemon(
        serveQcow2(image, socket, false, ",bitmaps.0=b0,bitmaps.1=b1"),
        async () => {
          const uri = `nbd+unix:///disk?socket=${socket}`;
          for (const b of ["b0", "b1"]) {
            ours[b] = await ok("nbdinfo", [`--map=qemu:dirty-bitmap:${b}`, uri]);
          }
          const list = await ok("nbdinfo", ["--list", "--json", uri]);
          assert.match(list, /qemu:dirty-bitmap:b0/);
          assert.match(list, /qemu:dirty-bitmap:b1/);
        },
      );
      for (const b of ["b0", "b1"]) {
        await withQemuNbd(dir, copy, ["-r", "-f", "qcow2", "-B", b], async (uri) => {
          assert.equal(ours[b], await ok("nbdinfo", [`--map=qemu:dirty-bitmap:${b}`, uri]), b);
        });
      }
      assert.match(ours["b0"]!, /1048576\s+65536\s+1\s+dirty/);
      assert.doesNotMatch(ours["b1"]!, /^\s*1048576\s+\S+\s+1/m, "b1 came after the first write");
      await assert.rejects(
        () => withDaemon(serveQcow2(image, socket, false, ",bitmaps.0=nope"), async () => {}),
        /Bitmap 'nope' is not found/,
      );
    });
  },
});
