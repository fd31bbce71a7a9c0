/**
 * eventfd counters and epoll sets (src/sys/eventfd.ts): writes add up and a read resets; a
 * non-blocking read of zero says so without throwing; epoll_wait wakes when a Worker writes an
 * eventfd made on this thread, and returns with nothing when nobody does.
 */
import assert from "node:assert/strict";
import { isBlockError } from "../../src/errors.ts";
import {
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  EFD_SEMAPHORE,
  epollAdd,
  epollCreate,
  epollDel,
  EPOLLIN,
  epollMod,
  EPOLLOUT,
  epollWait,
  epollWaitInto,
  eventfd,
  eventfdRead,
  eventfdWrite,
} from "../../src/sys/eventfd.ts";
import { close } from "../../src/sys/unix_socket.ts";
import { onWorker } from "./on_worker.ts";

Deno.test("eventfd writes add up, a read returns the sum and resets the counter", () => {
  const fd = eventfd(2, EFD_CLOEXEC | EFD_NONBLOCK);
  try {
    eventfdWrite(fd, 3);
    eventfdWrite(fd);
    eventfdWrite(fd, 2 ** 40);
    assert.equal(eventfdRead(fd), 2 + 3 + 1 + 2 ** 40);
    assert.equal(eventfdRead(fd), 0, "non-blocking read of a zero counter");
    eventfdWrite(fd, 7);
    assert.equal(eventfdRead(fd), 7);
  } finally {
    close(fd);
  }
});

Deno.test("an EFD_SEMAPHORE eventfd is taken one at a time", () => {
  const fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK | EFD_SEMAPHORE);
  try {
    eventfdWrite(fd, 2);
    assert.equal(eventfdRead(fd), 1);
    assert.equal(eventfdRead(fd), 1);
    assert.equal(eventfdRead(fd), 0);
  } finally {
    close(fd);
  }
});

Deno.test("eventfd arguments out of range are RangeErrors; a bad fd names the call", () => {
  assert.throws(() => eventfd(-1), RangeError);
  assert.throws(() => eventfdWrite(0, 0), RangeError);
  assert.throws(
    () => eventfdRead(1 << 20),
    (e) => isBlockError(e, "io") && e.context.errno === 9 && /^eventfd read: EBADF/.test(e.message),
  );
});

Deno.test("epollWait() wakes when a Worker writes an eventfd made on this thread", async () => {
  const epfd = epollCreate();
  const kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  const idle = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  try {
    epollAdd(epfd, kick, EPOLLIN, 7);
    epollAdd(epfd, idle, EPOLLIN, 8);
    const written = onWorker<string>({ op: "eventfd-write", fd: kick, value: 5, delayMs: 30 });
    // Blocks this thread until the Worker's write (or 20 s, which would fail the test).
    const events = epollWait(epfd, 4, 20_000);
    assert.deepEqual(events, [{ events: EPOLLIN, data: 7 }]);
    assert.equal(await written, "written");
    assert.equal(eventfdRead(kick), 5);
    // Level-triggered: once read, nothing is ready and a short wait returns empty.
    assert.deepEqual(epollWait(epfd, 4, 10), []);
  } finally {
    close(kick);
    close(idle);
    close(epfd);
  }
});

Deno.test("epollWait() returns with nothing when the timeout passes", () => {
  const epfd = epollCreate();
  const fd = eventfd();
  try {
    epollAdd(epfd, fd, EPOLLIN, 1);
    assert.deepEqual(epollWait(epfd, 8, 0), []);
    assert.deepEqual(epollWait(epfd, 8, 25), []);
  } finally {
    close(fd);
    close(epfd);
  }
});

Deno.test("epollWaitInto() fills event/data pairs; epollMod and epollDel change the set", () => {
  const epfd = epollCreate();
  const a = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  const b = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  const out = new Uint32Array(8);
  try {
    epollAdd(epfd, a, EPOLLIN, 0xfffffffe);
    epollAdd(epfd, b, EPOLLIN, 2);
    eventfdWrite(a);
    eventfdWrite(b);
    assert.equal(epollWaitInto(epfd, out, 1000), 2);
    const pairs = [[out[0], out[1]], [out[2], out[3]]].sort((x, y) => x[1]! - y[1]!);
    assert.deepEqual(pairs, [[EPOLLIN, 2], [EPOLLIN, 0xfffffffe]]);
    // A writable eventfd reports EPOLLOUT once asked for it, with the new data.
    epollMod(epfd, b, EPOLLOUT, 3);
    epollDel(epfd, a);
    assert.deepEqual(epollWait(epfd, 4, 1000), [{ events: EPOLLOUT, data: 3 }]);
    assert.throws(
      () => epollDel(epfd, a),
      (e) => isBlockError(e, "io") && /^epoll_ctl DEL: ENOENT/.test(e.message),
    );
  } finally {
    close(a);
    close(b);
    close(epfd);
  }
});
