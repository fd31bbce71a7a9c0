/**
 * `vstor serve` over a real unix socket, driven by the TypeScript front-end in frontend.ts (it
 * plays QEMU: memfd RAM, rings, eventfds): a qcow2 and a raw export written and read through
 * virtio-blk, data checked in the image afterwards with qemu-img; hostile front-ends — a broken
 * header, a ring outside memory, a front-end that vanishes with requests in flight — each dropped
 * with a log line while the daemon goes on serving the next one; a clean stop removes the sockets.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Daemon } from "../../src/serve/daemon.ts";
import { parseServeArgs } from "../../src/serve/options.ts";
import { REQ } from "../../src/serve/vhost_user/protocol.ts";
import { sendMsg } from "../../src/sys/unix_socket.ts";
import {
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from "../../src/virtio/virtio_blk_constants.ts";
import { ignoreWithout, runTool } from "../interop/qemu.ts";
import { Frontend, FRONTEND_VA, memTable, state, u64 } from "./frontend.ts";

async function withDaemon(
  format: "raw" | "qcow2",
  fn: (ctx: { socket: string; image: string; logs: string[]; daemon: Daemon }) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vstor_serve_" });
  const image = join(dir, `disk.${format}`);
  assert.equal((await runTool("qemu-img", ["create", "-q", "-f", format, image, "8M"])).code, 0);
  const socket = join(dir, "vhost.sock");
  const logs: string[] = [];
  const daemon = await Daemon.start(
    parseServeArgs([
      "--blockdev",
      `driver=file,node-name=f,filename=${image}`,
      "--blockdev",
      `driver=${format},node-name=n,file=f`,
      "--export",
      `type=vhost-user-blk,id=e0,node-name=n,addr.type=unix,addr.path=${socket},writable=on`,
    ]),
    { log: (line) => logs.push(line) },
  );
  try {
    await fn({ socket, image, logs, daemon });
  } finally {
    const errors = await daemon.stop();
    assert.deepEqual(errors, []);
    assert.throws(() => Deno.statSync(socket), "the socket is removed at the end");
    await Deno.remove(dir, { recursive: true });
  }
}

/** Writes `blocks` 4 KiB blocks (block i filled with i+1) then reads them back through ring 0. */
function writeAndRead(fe: Frontend, blocks: number): void {
  const status = fe.alloc(2 * blocks);
  for (let i = 0; i < blocks; i++) {
    const hdr = fe.alloc(16), data = fe.alloc(4096);
    fe.mem.setU32(hdr, VIRTIO_BLK_T_OUT);
    fe.mem.setU32(hdr + 8, i * 8);
    fe.mem.fill(data, 4096, i + 1);
    fe.add(0, [{ addr: hdr, length: 16 }, { addr: data, length: 4096 }], [{
      addr: status + i,
      length: 1,
    }], i);
  }
  fe.kick(0);
  assert.equal(fe.waitUsed(0, blocks).length, blocks);
  const reads: number[] = [];
  for (let i = 0; i < blocks; i++) {
    const hdr = fe.alloc(16), data = fe.alloc(4096);
    fe.mem.setU32(hdr, VIRTIO_BLK_T_IN);
    fe.mem.setU32(hdr + 8, i * 8);
    fe.add(0, [{ addr: hdr, length: 16 }], [{ addr: data, length: 4096 }, {
      addr: status + blocks + i,
      length: 1,
    }], 1000 + i);
    reads.push(data);
  }
  fe.kick(0);
  assert.equal(fe.waitUsed(0, blocks).length, blocks);
  for (let i = 0; i < 2 * blocks; i++) assert.equal(fe.mem.u8(status + i), VIRTIO_BLK_S_OK);
  reads.forEach((data, i) => {
    assert.deepEqual(fe.mem.slice(data, 4096), new Uint8Array(4096).fill(i + 1), `block ${i}`);
  });
}

const ignore = ignoreWithout("qemu-img");

for (const format of ["qcow2", "raw"] as const) {
  Deno.test({
    name: `vstor serve: a front-end writes and reads a ${format} image through vhost-user-blk`,
    ignore,
    async fn() {
      await withDaemon(format, async ({ socket, image, daemon }) => {
        const fe = new Frontend(socket);
        try {
          fe.start(1, 128);
          writeAndRead(fe, 32);
          // GET_VRING_BASE stops the ring at the next avail index.
          const base = fe.request(REQ.GET_VRING_BASE, state(0, 0), [], true)!;
          assert.equal(new DataView(base.slice().buffer).getUint32(4, true), 64);
        } finally {
          fe.close();
        }
        await daemon.stop();
        const check = await runTool("qemu-img", ["check", image]);
        if (format === "qcow2") assert.equal(check.code, 0, check.stdout + check.stderr);
        const raw = await runTool("qemu-io", [
          "-f",
          format,
          "-r",
          "-c",
          "read -P 1 0 4k",
          "-c",
          "read -P 32 124k 4k",
          image,
        ]);
        assert.equal(raw.code, 0, raw.stdout + raw.stderr);
        assert.doesNotMatch(raw.stdout, /Pattern verification failed/);
      });
    },
  });
}

Deno.test({
  name: "vstor serve: hostile front-ends are dropped with a log line, and the next one is served",
  ignore,
  async fn() {
    await withDaemon("raw", async ({ socket, logs }) => {
      // A header with a bad version.
      const bad = new Frontend(socket);
      const wire = new Uint8Array(12);
      new DataView(wire.buffer).setUint32(0, REQ.GET_FEATURES, true);
      new DataView(wire.buffer).setUint32(4, 0x2, true);
      sendMsg(bad.socket, wire);
      assert.ok(bad.closedByPeer(), "dropped");
      bad.close();
      // A ring whose descriptor table lies outside guest memory.
      const outside = new Frontend(socket);
      outside.request(REQ.GET_FEATURES, undefined, [], true);
      outside.request(REQ.SET_FEATURES, u64(0));
      outside.request(REQ.SET_VRING_NUM, state(0, 64));
      outside.request(REQ.SET_VRING_KICK, u64(0), [outside.ramFd]);
      assert.ok(outside.closedByPeer(), "dropped");
      outside.close();
      // A memory region larger than its memfd (mapping it would SIGBUS the daemon on access).
      const past = new Frontend(socket);
      past.request(REQ.GET_FEATURES, undefined, [], true);
      past.request(
        REQ.SET_MEM_TABLE,
        memTable([{ guestAddress: 0, size: 64 << 20, userAddress: FRONTEND_VA, mmapOffset: 0 }]),
        [past.ramFd],
      );
      assert.ok(past.closedByPeer(), "dropped");
      past.close();
      // A front-end that vanishes with requests in flight.
      const gone = new Frontend(socket);
      gone.start(1, 64);
      const hdr = gone.alloc(16), data = gone.alloc(65536), status = gone.alloc(1);
      gone.mem.setU32(hdr, VIRTIO_BLK_T_OUT);
      gone.add(0, [{ addr: hdr, length: 16 }, { addr: data, length: 65536 }], [{
        addr: status,
        length: 1,
      }], 1);
      gone.kick(0);
      gone.close();
      // The next front-end is served as if nothing happened (once the daemon noticed the last
      // one leave: until then a second connection is refused, as qsd refuses it).
      let next: Frontend | null = null;
      for (let i = 0; i < 100 && next === null; i++) {
        const fe = new Frontend(socket);
        try {
          fe.start(1, 128);
          next = fe;
        } catch {
          fe.close();
          await new Promise((r) => setTimeout(r, 20));
        }
      }
      assert.ok(next !== null, "a new front-end is served");
      try {
        writeAndRead(next, 8);
      } finally {
        next.close();
      }
      // The export's log lines come through the Worker's messages: give them time to arrive.
      for (
        let i = 0;
        i < 100 && !/front-end dropped: the front-end disconnected/.test(logs.join("\n"));
        i++
      ) {
        await new Promise((r) => setTimeout(r, 20));
      }
      const joined = logs.join("\n");
      assert.match(joined, /unsupported protocol version 2/);
      assert.match(joined, /started before SET_MEM_TABLE|in no memory region/);
      assert.match(joined, /front-end dropped: the front-end disconnected/);
      assert.match(joined, /goes past the fd's 16777216 bytes/);
    });
  },
});

Deno.test({
  name: "vstor serve: a front-end dropped on one export leaves the daemon's other exports serving",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_serve_two_" });
    const logs: string[] = [];
    const a = join(dir, "a.raw"), b = join(dir, "b.raw");
    for (const image of [a, b]) {
      assert.equal((await runTool("qemu-img", ["create", "-q", "-f", "raw", image, "8M"])).code, 0);
    }
    const sockA = join(dir, "a.sock"), sockB = join(dir, "b.sock");
    const daemon = await Daemon.start(
      parseServeArgs([
        "--blockdev",
        `driver=file,node-name=fa,filename=${a}`,
        "--blockdev",
        `driver=file,node-name=fb,filename=${b}`,
        "--export",
        `type=vhost-user-blk,id=ea,node-name=fa,addr.type=unix,addr.path=${sockA},writable=on`,
        "--export",
        `type=vhost-user-blk,id=eb,node-name=fb,addr.type=unix,addr.path=${sockB},writable=on`,
      ]),
      { log: (line) => logs.push(line) },
    );
    const good = new Frontend(sockB);
    try {
      good.start(1, 128);
      writeAndRead(good, 4);
      // An oversized message on the other export: its front-end is dropped.
      const bad = new Frontend(sockA);
      const wire = new Uint8Array(12);
      const v = new DataView(wire.buffer);
      v.setUint32(0, REQ.SET_MEM_TABLE, true);
      v.setUint32(4, 0x1, true);
      v.setUint32(8, 1 << 20, true);
      sendMsg(bad.socket, wire);
      assert.ok(bad.closedByPeer(), "dropped");
      bad.close();
      // The good one goes on.
      writeAndRead(good, 4);
    } finally {
      good.close();
      assert.deepEqual(await daemon.stop(), []);
      await Deno.remove(dir, { recursive: true });
    }
    const joined = logs.join("\n");
    assert.match(joined, /ea: front-end dropped: SET_MEM_TABLE: payload of 1048576 bytes/);
    assert.match(
      joined,
      /eb: front-end dropped: .*\(16 requests, [0-9.]+ kicks and [0-9.]+ interrupts per request\)/,
    );
  },
});
