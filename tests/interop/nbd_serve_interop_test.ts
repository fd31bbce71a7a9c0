/**
 * `vstor serve`'s NBD exports under QEMU's own NBD client: qemu-img info, map, compare and convert
 * and qemu-io against a daemon started in-process. What QEMU sees through vstor is checked against
 * what it sees through qemu-nbd serving a copy of the same image (map, with allocation depth), and
 * what QEMU writes through vstor is checked in the image afterwards (qemu-img check, and compare
 * with an image qemu-io wrote directly with the same commands).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Daemon } from "../../src/serve/daemon.ts";
import { parseServeArgs } from "../../src/serve/options.ts";
import { ignoreWithout, runTool } from "./qemu.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");

async function ok(tool: string, args: string[]): Promise<string> {
  const r = await runTool(tool, args);
  assert.equal(r.code, 0, `${tool} ${args.join(" ")}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** A qcow2 over a raw backing file: backing data, overlay data, a zero cluster, holes. */
async function layeredImage(dir: string): Promise<string> {
  const base = join(dir, "base.raw");
  const top = join(dir, "top.qcow2");
  await ok("qemu-img", ["create", "-q", "-f", "raw", base, "16M"]);
  await ok("qemu-io", ["-f", "raw", "-c", "write -P 3 0 512k", "-c", "write -P 4 8M 64k", base]);
  await ok("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, "16M"]);
  await ok("qemu-io", [
    "-f",
    "qcow2",
    "-c",
    "write -P 7 1M 1M",
    "-c",
    "write -z 4M 1M",
    "-c",
    "write -P 8 256k 64k",
    top,
  ]);
  return top;
}

/** qemu-nbd serving `image` read-only with allocation depth, until the returned stop is called. */
async function qemuNbd(image: string, socket: string): Promise<() => Promise<void>> {
  const child = new Deno.Command("qemu-nbd", {
    args: ["-t", "-r", "-A", "-f", "qcow2", "-x", "disk", "-k", socket, image],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  for (let i = 0; i < 100; i++) {
    try {
      if (Deno.statSync(socket).isSocket) break;
    } catch {
      // Not yet.
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return async () => {
    child.kill("SIGTERM");
    await child.output();
  };
}

async function withDaemon(
  args: string[],
  fn: (logs: string[]) => Promise<void>,
): Promise<string[]> {
  const logs: string[] = [];
  const daemon = await Daemon.start(parseServeArgs(args), { log: (line) => logs.push(line) });
  try {
    await fn(logs);
  } finally {
    assert.deepEqual(await daemon.stop(), []);
  }
  return logs;
}

Deno.test({
  name:
    "qemu-img info, map, compare and convert through vstor serve's NBD export see what they see through qemu-nbd",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_interop_" });
    try {
      const image = await layeredImage(dir);
      const copy = join(dir, "copy.qcow2");
      await Deno.copyFile(image, copy);
      const socket = join(dir, "vstor.sock");
      const uri = `nbd+unix:///disk?socket=${socket}`;
      const logs = await withDaemon([
        "--blockdev",
        `driver=file,node-name=f,filename=${image},read-only=on`,
        "--blockdev",
        "driver=qcow2,node-name=n,file=f,read-only=on",
        "--nbd-server",
        `addr.type=unix,addr.path=${socket}`,
        "--export",
        "type=nbd,id=e0,node-name=n,name=disk,description=the disk,allocation-depth=on",
      ], async () => {
        const info = JSON.parse(await ok("qemu-img", ["info", "--output=json", uri]));
        assert.equal(info["virtual-size"], 16 << 20);

        const qsock = join(dir, "qemu.sock");
        const stop = await qemuNbd(copy, qsock);
        let theirs: string;
        try {
          theirs = await ok("qemu-img", [
            "map",
            "--output=json",
            `nbd+unix:///disk?socket=${qsock}`,
          ]);
        } finally {
          await stop();
        }
        const ours = await ok("qemu-img", ["map", "--output=json", uri]);
        assert.deepEqual(JSON.parse(ours), JSON.parse(theirs));
        // The map says where data is: the zero cluster and the holes are not data.
        const entries = JSON.parse(ours) as {
          start: number;
          length: number;
          data: boolean;
          zero: boolean;
        }[];
        const at4M = entries.find((e) => e.start <= 4 << 20 && e.start + e.length > 4 << 20);
        assert.ok(at4M !== undefined && at4M.zero && !at4M.data, JSON.stringify(at4M));
        const at1M = entries.find((e) => e.start <= 1 << 20 && e.start + e.length > 1 << 20);
        assert.ok(at1M !== undefined && at1M.data && !at1M.zero, JSON.stringify(at1M));

        // Every byte as QEMU reads the image itself.
        await ok("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", uri, copy]);
        const out = join(dir, "out.qcow2");
        await ok("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", uri, out]);
        await ok("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", out, copy]);
        // Holes travel as holes: the converted image has no more data than the source chain.
        const converted = JSON.parse(await ok("qemu-img", ["map", "--output=json", out])) as {
          length: number;
          data: boolean;
        }[];
        const dataBytes = converted.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
        assert.ok(dataBytes <= (512 << 10) + (64 << 10) + (1 << 20), `${dataBytes} data bytes`);

        // A read-only export: QEMU sees the flag and will not open it for writing.
        const w = await runTool("qemu-io", ["-f", "raw", "-c", "write 0 4k", uri]);
        assert.notEqual(w.code, 0);
        assert.match(w.stderr, /Permission denied/);
      });
      assert.ok(logs.some((l) => l.includes("NBD server on unix:")), logs.join("\n"));
      assert.ok(!logs.some((l) => l.includes("connection error")), logs.join("\n"));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "qemu-io's writes through a writable NBD export (FUA, zeroes, discard, two clients at once) leave the image qemu-io leaves writing it directly",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_interop_" });
    try {
      const served = join(dir, "served.qcow2");
      const direct = join(dir, "direct.qcow2");
      for (const f of [served, direct]) {
        await ok("qemu-img", ["create", "-q", "-f", "qcow2", f, "32M"]);
      }
      const first = [
        "write -P 1 0 1M",
        "write -P 2 -f 1536k 8k",
        "write -P 3 3M 100k",
        "write -z 512k 64k",
        "discard 3M 64k",
        "write -P 4 5000 3000",
        "flush",
      ];
      const second = ["write -P 5 16M 2M", "write -z -u 17M 64k", "write -P 6 20M 4k", "flush"];
      const socket = join(dir, "vstor.sock");
      const uri = `nbd+unix:///?socket=${socket}`;
      await withDaemon(
        [served, "--nbd", `unix:${socket}`, "--writable", "-f", "qcow2"],
        async () => {
          const cmd = (cmds: string[]) => ["-f", "raw", ...cmds.flatMap((c) => ["-c", c]), uri];
          // Two clients at once on one export (multi-conn).
          const [a, b] = await Promise.all([
            runTool("qemu-io", cmd(first)),
            runTool("qemu-io", cmd(second)),
          ]);
          assert.equal(a.code, 0, a.stderr + a.stdout);
          assert.equal(b.code, 0, b.stderr + b.stdout);
          assert.doesNotMatch(a.stdout + b.stdout, /failed/);
          // Read back through the export.
          await ok("qemu-io", [
            "-f",
            "raw",
            "-c",
            "read -P 2 1536k 8k",
            "-c",
            "read -P 0 512k 64k",
            uri,
          ]);
        },
      );
      const directArgs = [
        "-f",
        "qcow2",
        "-d",
        "unmap",
        ...[...first, ...second].flatMap((c) => ["-c", c]),
        direct,
      ];
      await ok("qemu-io", directArgs);
      await ok("qemu-img", ["check", served]);
      await ok("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", served, direct]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "an NBD export over TCP (port chosen by the kernel) serves qemu-img by nbd://",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_interop_" });
    try {
      const image = join(dir, "disk.raw");
      await ok("qemu-img", ["create", "-q", "-f", "raw", image, "4M"]);
      await ok("qemu-io", ["-f", "raw", "-c", "write -P 9 1M 4k", image]);
      await withDaemon([
        "--blockdev",
        `driver=file,node-name=f,filename=${image}`,
        "--nbd-server",
        "addr.type=inet,addr.host=127.0.0.1,addr.port=0",
        "--export",
        "type=nbd,id=e0,node-name=f,name=d",
      ], async (logs) => {
        const line = logs.find((l) => l.includes("NBD server on tcp:"));
        const port = Number(/tcp:127\.0\.0\.1:([0-9]+)/.exec(line ?? "")?.[1]);
        assert.ok(port > 0, logs.join("\n"));
        const uri = `nbd://127.0.0.1:${port}/d`;
        const info = JSON.parse(await ok("qemu-img", ["info", "--output=json", uri]));
        assert.equal(info["virtual-size"], 4 << 20);
        await ok("qemu-io", ["-r", "-f", "raw", "-c", "read -P 9 1M 4k", uri]);
        const missing = await runTool("qemu-img", ["info", `nbd://127.0.0.1:${port}/nope`]);
        assert.notEqual(missing.code, 0);
        assert.match(missing.stderr, /nope/);
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "vstor serve re-exports another server's NBD export (--blockdev driver=nbd): writes reach the source, qemu-img sees the same bytes through both",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_interop_" });
    try {
      const image = join(dir, "src.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", image, "16M"]);
      await ok("qemu-io", ["-f", "qcow2", "-c", "write -P 6 1M 1M", image]);
      const srcSock = join(dir, "src.sock");
      const child = new Deno.Command("qemu-nbd", {
        // Two clients at once: vstor and qemu-img compare.
        args: ["-t", "-e", "2", "-f", "qcow2", "-x", "src", "-k", srcSock, image],
        stdout: "null",
        stderr: "null",
      }).spawn();
      try {
        for (let i = 0; i < 100; i++) {
          try {
            if (Deno.statSync(srcSock).isSocket) break;
          } catch {
            // Not yet.
          }
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
        const socket = join(dir, "re.sock");
        const re = `nbd+unix:///re?socket=${socket}`;
        const src = `nbd+unix:///src?socket=${srcSock}`;
        await withDaemon([
          "--blockdev",
          `driver=nbd,node-name=n,server.type=unix,server.path=${srcSock},export=src`,
          "--nbd-server",
          `addr.type=unix,addr.path=${socket}`,
          "--export",
          "type=nbd,id=e0,node-name=n,name=re,writable=on",
        ], async () => {
          await ok("qemu-io", [
            "-f",
            "raw",
            "-c",
            "write -P 9 4M 64k",
            "-c",
            "read -P 6 1M 1M",
            re,
          ]);
          await ok("qemu-img", ["compare", "-f", "raw", "-F", "raw", re, src]);
          await ok("qemu-io", ["-r", "-f", "raw", "-c", "read -P 9 4M 64k", src]);
        });
      } finally {
        child.kill("SIGTERM");
        await child.status;
      }
      await ok("qemu-img", ["check", image]);
      await ok("qemu-io", ["-r", "-f", "qcow2", "-c", "read -P 9 4M 64k", image]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** A CA, a server certificate for localhost/127.0.0.1 and a client certificate, in QEMU's names. */
async function makeCerts(dir: string): Promise<{ server: string; client: string; bare: string }> {
  const openssl = async (...args: string[]) => {
    const r = await runTool("openssl", args);
    assert.equal(r.code, 0, `openssl ${args.join(" ")}: ${r.stderr}`);
  };
  const p = (name: string) => join(dir, name);
  await openssl(
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-keyout",
    p("ca-key.pem"),
    "-out",
    p("ca-cert.pem"),
    "-days",
    "2",
    "-subj",
    "/CN=vstor test CA",
  );
  await Deno.writeTextFile(p("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n");
  for (const who of ["server", "client"]) {
    await openssl(
      "req",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-keyout",
      p(`${who}-key.pem`),
      "-out",
      p(`${who}.csr`),
      "-subj",
      `/CN=${who === "server" ? "localhost" : "vstor client"}`,
    );
    await openssl(
      "x509",
      "-req",
      "-in",
      p(`${who}.csr`),
      "-CA",
      p("ca-cert.pem"),
      "-CAkey",
      p("ca-key.pem"),
      "-CAcreateserial",
      "-out",
      p(`${who}-cert.pem`),
      "-days",
      "2",
      ...(who === "server" ? ["-extfile", p("server.ext")] : []),
    );
  }
  const server = p("srv"), client = p("cli"), bare = p("bare");
  for (const d of [server, client, bare]) await Deno.mkdir(d);
  for (const f of ["ca-cert.pem", "server-cert.pem", "server-key.pem"]) {
    await Deno.copyFile(p(f), join(server, f));
  }
  for (const f of ["ca-cert.pem", "client-cert.pem", "client-key.pem"]) {
    await Deno.copyFile(p(f), join(client, f));
  }
  await Deno.copyFile(p("ca-cert.pem"), join(bare, "ca-cert.pem"));
  return { server, client, bare };
}

const noOpenssl = (() => {
  try {
    return !new Deno.Command("openssl", { args: ["version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return true;
  }
})();

Deno.test({
  name:
    "an NBD server with tls-creds (x509, verify-peer): qemu-io and qemu-img over TLS with a client certificate; without TLS, or without a certificate, refused",
  ignore: ignore || noOpenssl,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_tls_" });
    try {
      const certs = await makeCerts(dir);
      const image = join(dir, "disk.qcow2");
      await ok("qemu-img", ["create", "-q", "-f", "qcow2", image, "16M"]);
      const logs = await withDaemon([
        "--object",
        `tls-creds-x509,id=t0,dir=${certs.server},endpoint=server,verify-peer=on`,
        "--blockdev",
        `driver=file,node-name=f,filename=${image}`,
        "--blockdev",
        "driver=qcow2,node-name=n,file=f",
        "--nbd-server",
        "addr.type=inet,addr.host=127.0.0.1,addr.port=0,tls-creds=t0",
        "--export",
        "type=nbd,id=e0,node-name=n,name=disk,writable=on",
      ], async (logs) => {
        const port = Number(/tcp:127\.0\.0\.1:([0-9]+) \(TLS\)/.exec(logs.join("\n"))?.[1]);
        assert.ok(port > 0, logs.join("\n"));
        const opts = (creds: string) => [
          "--object",
          `tls-creds-x509,id=tls0,dir=${creds},endpoint=client`,
          "--image-opts",
          `driver=nbd,server.type=inet,server.host=localhost,server.port=${port},export=disk,tls-creds=tls0`,
        ];
        await ok("qemu-io", [
          ...opts(certs.client),
          "-c",
          "write -P 0x5c 1M 256k",
          "-c",
          "read -P 0x5c 1M 256k",
          "-c",
          "write -z 2M 64k",
        ]);
        const info = await ok("qemu-img", ["info", ...opts(certs.client)]);
        assert.match(info, /virtual size: 16 MiB/);
        // In the clear: QEMU's client is told TLS is required.
        const plain = await runTool("qemu-img", ["info", `nbd://127.0.0.1:${port}/disk`]);
        assert.notEqual(plain.code, 0);
        assert.match(plain.stderr, /TLS negotiation required/);
        // TLS without a client certificate: verify-peer refuses it.
        const bare = await runTool("qemu-img", ["info", ...opts(certs.bare)]);
        assert.notEqual(bare.code, 0, bare.stdout);
      });
      assert.ok(logs.some((l) => /TLS handshake failed/.test(l)), logs.join("\n"));
      await ok("qemu-img", ["check", image]);
      await ok("qemu-io", [
        "-r",
        "-f",
        "qcow2",
        "-c",
        "read -P 0x5c 1M 256k",
        "-c",
        "read -P 0 2M 64k",
        image,
      ]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
