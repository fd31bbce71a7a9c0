/**
 * The NBD client (src/host/nbd.ts) as a host file: QEMU's NBD names parsed or refused, reads,
 * writes (aligned or not), zeroes, flush and data status against vstor's own NBD server (in its
 * Worker: the client blocks its thread), and servers that misbehave — silent, not NBD, oldstyle,
 * replies that do not fit the request — each ending in a BlockError naming the server, never a
 * hang or a huge allocation.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { isBlockError } from "../../src/errors.ts";
import { isNbdUri, NbdFile, parseNbdUri } from "../../src/host/nbd.ts";
import * as P from "../../src/host/nbd_protocol.ts";
import { Daemon } from "../../src/serve/daemon.ts";
import { parseServeArgs } from "../../src/serve/options.ts";

Deno.test("parseNbdUri takes QEMU's NBD names and refuses the rest naming why", () => {
  assert.deepEqual(parseNbdUri("nbd://example.org/disk"), {
    transport: "tcp",
    host: "example.org",
    port: 10809,
    name: "disk",
  });
  assert.deepEqual(parseNbdUri("nbd+tcp://10.0.0.1:10810/a%20b"), {
    transport: "tcp",
    host: "10.0.0.1",
    port: 10810,
    name: "a b",
  });
  assert.deepEqual(parseNbdUri("nbd://[::1]:10811"), {
    transport: "tcp",
    host: "::1",
    port: 10811,
    name: "",
  });
  assert.deepEqual(parseNbdUri("nbd+unix:///exp?socket=/run/n.sock"), {
    transport: "unix",
    path: "/run/n.sock",
    name: "exp",
  });
  assert.deepEqual(parseNbdUri("nbd:unix:/tmp/s:exportname=e1"), {
    transport: "unix",
    path: "/tmp/s",
    name: "e1",
  });
  assert.deepEqual(parseNbdUri("nbd:localhost:10809"), {
    transport: "tcp",
    host: "localhost",
    port: 10809,
    name: "",
  });
  assert.ok(isNbdUri("nbd+unix:///?socket=x"));
  assert.ok(!isNbdUri("/images/nbd.qcow2"));
  for (
    const [uri, why] of [
      ["nbd+unix:///e", /no \?socket=PATH/],
      ["nbd+unix://host/e?socket=/s", /no host/],
      ["nbd://h:99999/e", /port '99999'/],
      ["nbd://h/e?tls-creds=x", /unsupported parameter 'tls-creds'/],
      ["nbd+ssh://h/e", /unknown transport 'nbd\+ssh'/],
      ["nbd:unix:", /no socket path/],
      ["nbd:justahost", /expected nbd:HOST:PORT/],
    ] as const
  ) {
    assert.throws(() => parseNbdUri(uri), (e: unknown) => {
      assert.ok(isBlockError(e, "invalid-argument"), String(e));
      assert.match(e.message, why);
      assert.match(e.message, /Invalid NBD URI/);
      return true;
    }, uri);
  }
});

/** vstor serve (its NBD Worker) exporting `image` writable as `disk` and read-only as `ro`. */
async function withServer(
  fn: (uri: (name: string) => string, image: string) => Promise<void>,
  size = 4 << 20,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_client_" });
  const image = join(dir, "disk.raw");
  const other = join(dir, "other.raw");
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i += 4096) bytes.fill((i / 4096) & 0xff, i, i + 2048);
  await Deno.writeFile(image, bytes);
  await Deno.writeFile(other, bytes.subarray(0, 1 << 20));
  const socket = join(dir, "nbd.sock");
  const daemon = await Daemon.start(
    parseServeArgs([
      "--blockdev",
      `driver=file,node-name=f,filename=${image}`,
      "--blockdev",
      `driver=file,node-name=g,filename=${other},read-only=on`,
      "--nbd-server",
      `addr.type=unix,addr.path=${socket}`,
      "--export",
      "type=nbd,id=e0,node-name=f,name=disk,writable=on",
      "--export",
      "type=nbd,id=e1,node-name=g,name=ro",
    ]),
    { log: () => {} },
  );
  try {
    await fn((name) => `nbd+unix:///${name}?socket=${socket}`, image);
  } finally {
    assert.deepEqual(await daemon.stop(), []);
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("an NBD export as a host file: size, reads, unaligned writes, zeroes, flush, data status", async () => {
  await withServer(async (uri, image) => {
    const f = NbdFile.open(uri("disk"));
    try {
      assert.equal(f.size(), 4 << 20);
      assert.equal(f.readOnly, false);
      const block5 = new Uint8Array(4096);
      f.readAt(5 * 4096, block5);
      assert.deepEqual(block5.subarray(0, 2048), new Uint8Array(2048).fill(5));
      assert.deepEqual(block5.subarray(2048), new Uint8Array(2048));
      // Past the end reads as zeroes, as a file does.
      const tail = new Uint8Array(8192).fill(7);
      f.readAt((4 << 20) - 4096, tail);
      assert.deepEqual(tail.subarray(4096), new Uint8Array(4096));
      // Unaligned, and larger than one request.
      const big = new Uint8Array((33 << 20) / 16).fill(0x5a);
      f.writeAt(12345, big);
      const back = new Uint8Array(big.length + 2);
      f.readAt(12344, back);
      assert.equal(back[0], 3); // block 3's first half, untouched
      assert.deepEqual(back.subarray(1, 1 + big.length), big);
      f.punchHole(1 << 20, 65536 + 100);
      const zero = new Uint8Array(65536 + 100).fill(1);
      f.readAt(1 << 20, zero);
      assert.deepEqual(zero, new Uint8Array(65536 + 100));
      f.flush();
      assert.equal(f.dataStatus(0, 4096).data, true);
      assert.ok(f.dataStatus((4 << 20) + 512, 4096).data === false);
      assert.throws(() => f.truncate(8 << 20), /cannot be resized/);
      assert.throws(() => f.writeAt((4 << 20) - 10, new Uint8Array(20)), /past the end/);
      assert.equal(f.allocatedSize(), -1);
    } finally {
      f.close();
    }
    // What the server's file holds now.
    const disk = await Deno.readFile(image);
    assert.equal(disk[12345], 0x5a);
    assert.equal(disk[12344], 3);
    assert.deepEqual(disk.subarray(1 << 20, (1 << 20) + 65636), new Uint8Array(65636));
  });
});

Deno.test("NbdFile refuses a writable open of a read-only export and names a missing export", async () => {
  await withServer(async (uri) => {
    assert.throws(() => NbdFile.open(uri("ro")), (e: unknown) => {
      assert.ok(isBlockError(e, "read-only"), String(e));
      assert.match(e.message, /export 'ro' is read-only/);
      return true;
    });
    const ro = NbdFile.open(uri("ro"), { readOnly: true });
    try {
      assert.equal(ro.size(), 1 << 20);
      assert.throws(() => ro.writeAt(0, new Uint8Array(1)), /read-only/);
    } finally {
      ro.close();
    }
    assert.throws(() => NbdFile.open(uri("nope")), (e: unknown) => {
      assert.ok(isBlockError(e, "not-found"), String(e));
      assert.match(e.message, /export 'nope' not available/);
      return true;
    });
  });
});

Deno.test("NbdFile: nothing listening is an error naming the socket", () => {
  const path = join(Deno.makeTempDirSync(), "none.sock");
  assert.throws(() => NbdFile.open(`nbd+unix:///?socket=${path}`), (e: unknown) => {
    assert.ok(isBlockError(e), String(e));
    assert.match(e.message, /none\.sock/);
    return true;
  });
});

/**
 * A scripted server in a Worker: it accepts one client on `path`, then for each step reads that
 * many bytes (a number) or writes the bytes given, and keeps the connection open until told.
 */
function scriptedServer(path: string, steps: (number | number[])[]): {
  ready: Promise<void>;
  stop: () => void;
} {
  const code = `
    self.onmessage = async (e) => {
      const { path, steps } = e.data;
      const l = Deno.listen({ transport: "unix", path });
      self.postMessage("listening");
      const conn = await l.accept();
      for (const s of steps) {
        if (typeof s === "number") {
          const b = new Uint8Array(s);
          for (let at = 0; at < s;) {
            const n = await conn.read(b.subarray(at));
            if (n === null) return;
            at += n;
          }
        } else {
          await conn.write(new Uint8Array(s));
        }
      }
    };`;
  const worker = new Worker(`data:application/javascript,${encodeURIComponent(code)}`, {
    type: "module",
  });
  const ready = new Promise<void>((resolve) => worker.onmessage = () => resolve());
  worker.postMessage({ path, steps });
  return { ready, stop: () => worker.terminate() };
}

function bytes(...parts: (bigint | [number, number])[]): number[] {
  const out: number[] = [];
  for (const p of parts) {
    const b = new Uint8Array(typeof p === "bigint" ? 8 : p[1]);
    const v = new DataView(b.buffer);
    if (typeof p === "bigint") v.setBigUint64(0, p);
    else if (p[1] === 2) v.setUint16(0, p[0]);
    else v.setUint32(0, p[0]);
    out.push(...b);
  }
  return out;
}

Deno.test("NbdFile against servers that misbehave: each a BlockError naming the server, no hang", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "vstor_nbd_bad_" });
  const greeting = bytes(P.NBD_MAGIC, P.NBD_OPTS_MAGIC, [P.NBD_FLAG_FIXED_NEWSTYLE, 2]);
  const cases: Array<[string, (number | number[])[], RegExp]> = [
    ["silent", [], /no answer in 0.3 s/],
    ["not NBD", [[...new TextEncoder().encode("SSH-2.0-OpenSSH_9\r\n")]], /not an NBD server/],
    ["oldstyle", [bytes(P.NBD_MAGIC, 0x00420281861253n)], /oldstyle/],
    ["no fixed newstyle", [bytes(P.NBD_MAGIC, P.NBD_OPTS_MAGIC, [0, 2])], /fixed newstyle/],
    [
      "an option reply of 16 MiB",
      [
        greeting,
        4,
        16,
        bytes(P.NBD_REP_MAGIC, [P.NBD_OPT_STRUCTURED_REPLY, 4], [
          P.NBD_REP_ACK,
          4,
        ], [16 << 20, 4]),
      ],
      /an option reply of 16777216 bytes/,
    ],
    ["closed mid-handshake", [greeting, 4, 16, [1, 2, 3]], /no answer|closed the connection/],
  ];
  try {
    for (const [what, steps, message] of cases) {
      const path = join(dir, `${what.replaceAll(" ", "_")}.sock`);
      const server = scriptedServer(path, steps);
      await server.ready;
      try {
        assert.throws(
          () => NbdFile.open(`nbd+unix:///?socket=${path}`, { timeoutMs: 300 }),
          (e: unknown) => {
            assert.ok(isBlockError(e, "io"), `${what}: ${e}`);
            assert.match(e.message, message, what);
            assert.match(e.message, new RegExp(path.replaceAll(".", "\\.")), what);
            return true;
          },
        );
      } finally {
        server.stop();
      }
    }
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("NbdFile's async reads and writes: many in flight, replies in any order, sync calls between them", async () => {
  await withServer(async (uri, image) => {
    const f = NbdFile.open(uri("disk"));
    try {
      // 48 writes of 64 KiB at once (more than the 16 in flight: the rest wait their turn).
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 48; i++) {
        writes.push(f.writeAtAsync!(i * 65536, new Uint8Array(65536).fill(100 + i)));
      }
      // A synchronous read in the middle: it hands over the replies it meets.
      const mid = new Uint8Array(512);
      f.readAt(3 << 20, mid);
      await Promise.all(writes);
      await f.flushAsync!();
      const reads = Array.from({ length: 48 }, () => new Uint8Array(65536));
      await Promise.all(reads.map((b, i) => f.readAtAsync!(i * 65536, b)));
      reads.forEach((b, i) =>
        assert.deepEqual(b, new Uint8Array(65536).fill(100 + i), `block ${i}`)
      );
      // One read past the end: the part inside from the server, the rest zeroes.
      const tail = new Uint8Array(4096).fill(9);
      await f.readAtAsync!((4 << 20) - 2048, tail);
      assert.deepEqual(tail.subarray(2048), new Uint8Array(2048));
      // A failed async request (past the end) fails alone; the connection goes on.
      await assert.rejects(
        () => f.writeAtAsync!((4 << 20) - 512, new Uint8Array(1024)),
        /past the end/,
      );
      const again = new Uint8Array(65536);
      await f.readAtAsync!(0, again);
      assert.equal(again[0], 100);
    } finally {
      f.close();
    }
    const disk = await Deno.readFile(image);
    for (let i = 0; i < 48; i++) assert.equal(disk[i * 65536 + 100], 100 + i, `block ${i} on disk`);
  });
});
