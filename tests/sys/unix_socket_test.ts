/**
 * AF_UNIX sockets with SCM_RIGHTS (src/sys/unix_socket.ts): descriptors sent with a message work
 * in the receiver; a control buffer too small is reported as truncated; paths too long, sockets in
 * use and stale socket files are told apart; non-blocking calls return null instead of throwing.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { BlockError, isBlockError } from "../../src/errors.ts";
import {
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  eventfd,
  eventfdRead,
  eventfdWrite,
} from "../../src/sys/eventfd.ts";
import { ftruncate, memfdCreate, mmapShared } from "../../src/sys/shared_memory.ts";
import {
  accept,
  close,
  connectUnix,
  ECONNREFUSED,
  listenUnix,
  MAX_SOCKET_PATH,
  recvMsg,
  sendMsg,
  shutdown,
  socketPair,
  waitReadable,
  waitReadableAsync,
} from "../../src/sys/unix_socket.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function closeAll(...fds: number[]): void {
  for (const fd of fds) close(fd);
}

/** A listening socket at a fresh path and a connection to it, accepted. */
function connectedPair(dir: string): { server: number; client: number; listener: number } {
  const path = join(dir, "vhost.sock");
  const listener = listenUnix(path);
  const client = connectUnix(path);
  const server = accept(listener);
  assert.ok(server !== null);
  return { server, client, listener };
}

Deno.test("sendMsg() passes three fds that work in the receiver: two eventfds and a memfd", () => {
  const dir = Deno.makeTempDirSync({ prefix: "vstor-sock-" });
  const { server, client, listener } = connectedPair(dir);
  const kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  const call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  const memfd = memfdCreate("vstor-test-region");
  ftruncate(memfd, 8192);
  try {
    assert.equal(sendMsg(client, encoder.encode("SET_MEM_TABLE"), [kick, call, memfd]), 13);
    const buffer = new Uint8Array(64);
    const got = recvMsg(server, buffer, 8);
    assert.ok(got !== null);
    assert.equal(decoder.decode(buffer.subarray(0, got.bytes)), "SET_MEM_TABLE");
    assert.equal(got.truncated, false);
    assert.equal(got.fds.length, 3);
    const [kick2, call2, memfd2] = got.fds as [number, number, number];
    assert.ok(![kick, call, memfd].includes(kick2), "received fds are new descriptors");
    // The received kick is the sender's kick: a write through one is read through the other.
    eventfdWrite(kick, 3);
    assert.equal(eventfdRead(kick2), 3);
    eventfdWrite(call2, 5);
    assert.equal(eventfdRead(call), 5);
    // The received memfd maps the same memory.
    const mine = mmapShared(memfd, 8192);
    const theirs = mmapShared(memfd2, 8192, 4096);
    theirs.bytes[10] = 0x77;
    assert.equal(mine.bytes[4096 + 10], 0x77);
    mine.unmap();
    theirs.unmap();
    closeAll(kick2, call2, memfd2);
  } finally {
    closeAll(kick, call, memfd, server, client, listener);
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("recvMsg() reports truncated when more fds come than maxFds allows", () => {
  const [a, b] = socketPair();
  const fds = [eventfd(), eventfd(), eventfd()];
  try {
    assert.equal(sendMsg(a, encoder.encode("x"), fds), 1);
    const got = recvMsg(b, new Uint8Array(16), 1);
    assert.ok(got !== null);
    assert.equal(got.bytes, 1);
    assert.equal(got.truncated, true);
    assert.equal(got.fds.length, 1);
    closeAll(...got.fds);
    // Without room for any fd at all, the message still arrives, marked truncated.
    sendMsg(a, encoder.encode("y"), fds);
    const none = recvMsg(b, new Uint8Array(16), 0);
    assert.deepEqual(none, { bytes: 1, fds: [], truncated: true });
  } finally {
    closeAll(...fds, a, b);
  }
});

Deno.test("listenUnix() refuses a path longer than 107 bytes with a clear error", () => {
  const dir = Deno.makeTempDirSync({ prefix: "vstor-sock-" });
  try {
    const fits = join(dir, "s".repeat(MAX_SOCKET_PATH - dir.length - 1));
    assert.equal(encoder.encode(fits).length, 107);
    const fd = listenUnix(fits);
    close(fd);
    const tooLong = fits + "x";
    assert.throws(
      () => listenUnix(tooLong),
      (e) =>
        isBlockError(e, "invalid-argument") &&
        /Socket path is 108 bytes, more than the 107/.test(e.message),
    );
    assert.throws(() => connectUnix(tooLong), (e) => isBlockError(e, "invalid-argument"));
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("listenUnix() replaces a stale socket file only when asked, never a live one", () => {
  const dir = Deno.makeTempDirSync({ prefix: "vstor-sock-" });
  const path = join(dir, "s.sock");
  try {
    close(listenUnix(path)); // leaves the socket file behind, nobody listening
    assert.throws(
      () => connectUnix(path),
      (e) => isBlockError(e) && e.context.errno === ECONNREFUSED,
    );
    assert.throws(
      () => listenUnix(path),
      (e) => isBlockError(e, "busy") && /unlinkStale/.test(e.message),
    );
    const live = listenUnix(path, { unlinkStale: true });
    try {
      assert.throws(
        () => listenUnix(path, { unlinkStale: true }),
        (e) => isBlockError(e, "busy") && /in use/.test(e.message),
      );
    } finally {
      close(live);
    }
    Deno.writeTextFileSync(join(dir, "plain"), "not a socket");
    assert.throws(
      () => listenUnix(join(dir, "plain"), { unlinkStale: true }),
      (e) => isBlockError(e, "busy") && /not a socket/.test(e.message),
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("non-blocking accept, recvMsg and sendMsg return null instead of waiting", () => {
  const dir = Deno.makeTempDirSync({ prefix: "vstor-sock-" });
  const path = join(dir, "nb.sock");
  const listener = listenUnix(path, { nonBlocking: true });
  try {
    assert.equal(accept(listener), null);
    const client = connectUnix(path, { nonBlocking: true });
    assert.deepEqual(waitReadable([listener], 5000), [listener]);
    const server = accept(listener, true);
    assert.ok(server !== null);
    try {
      assert.equal(recvMsg(server, new Uint8Array(8)), null);
      // Fill the client's send buffer a byte at a time: the first send that cannot start returns
      // null (one that stopped midway would wait for room instead).
      const chunk = new Uint8Array(1);
      let last: number | null = 0;
      for (let i = 0; i < 1_000_000 && last !== null; i++) last = sendMsg(client, chunk);
      assert.equal(last, null);
      shutdown(client, "both");
      // The server drains what was sent, then sees end of stream: 0 bytes.
      const buffer = new Uint8Array(65536);
      for (;;) {
        const got = recvMsg(server, buffer);
        assert.ok(got !== null);
        if (got.bytes === 0) break;
      }
    } finally {
      closeAll(client, server);
    }
  } finally {
    close(listener);
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("waitReadable() returns nothing when nothing is readable, and the ready fds otherwise", () => {
  const [a, b] = socketPair();
  const [c, d] = socketPair();
  try {
    assert.deepEqual(waitReadable([b, d], 0), []);
    assert.deepEqual(waitReadable([b, d], 20), []);
    sendMsg(c, encoder.encode("!"));
    assert.deepEqual(waitReadable([b, d], 5000), [d]);
    close(a); // a hang-up is readable too: the read then sees end of stream
    assert.deepEqual(waitReadable([b, d], 5000), [b, d]);
    assert.deepEqual(recvMsg(b, new Uint8Array(1)), { bytes: 0, fds: [], truncated: false });
  } finally {
    closeAll(b, c, d);
  }
});

Deno.test("waitReadableAsync() resolves when the peer sends, without blocking the event loop", async () => {
  const [a, b] = socketPair();
  try {
    const waiting = waitReadableAsync([b], 10000);
    await new Promise((resolve) => setTimeout(resolve, 10));
    sendMsg(a, encoder.encode("go"));
    assert.deepEqual(await waiting, [b]);
    assert.deepEqual(await waitReadableAsync([b, a], 0), [b]);
  } finally {
    closeAll(a, b);
  }
});

Deno.test("a failing call throws a BlockError naming the call and errno", () => {
  assert.throws(
    () => recvMsg(1 << 20, new Uint8Array(4)),
    (e) =>
      e instanceof BlockError && e.kind === "io" && e.context.errno === 9 &&
      /^recvmsg: EBADF/.test(e.message),
  );
  assert.throws(
    () => connectUnix("/nonexistent-dir/vstor.sock"),
    (e) => isBlockError(e, "io") && /^connect: ENOENT/.test(e.message),
  );
});
