/**
 * An io_uring queue under an owner's eventfd (setUringEventfd), as `vstor serve`'s export loop
 * runs it: a completion signals the eventfd, the request settles only when the owner pumps, and
 * the queue pumps itself again while the owner is away or once the eventfd is withdrawn. The
 * "disk" is a blocking eventfd read through the ring, so each completion happens exactly when the
 * test writes that eventfd. (A queue that pumps itself waits in the kernel and holds the thread:
 * there the eventfd is written before the queue's pump runs.)
 */
import assert from "node:assert/strict";
import {
  pumpUringQueues,
  setUringEventfd,
  setUringOwnerAway,
  uringInFlight,
  UringQueue,
} from "../../src/host/uring_queue.ts";
import {
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  epollAdd,
  epollCreate,
  EPOLLIN,
  epollWaitInto,
  eventfd,
  eventfdRead,
  eventfdWrite,
} from "../../src/sys/eventfd.ts";
import { close } from "../../src/sys/unix_socket.ts";
import { ignoreWithoutUring as ignore } from "../sys/uring_available.ts";

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The eventfd's counter as read(2) gives it: 8 bytes, little-endian. */
function counter(bytes: Uint8Array): number {
  return new DataView(bytes.buffer, bytes.byteOffset, 8).getUint32(0, true);
}

Deno.test({
  name:
    "with the owner's eventfd a completion signals it and settles only when the owner pumps; away or withdrawn, the queue pumps itself",
  ignore,
  async fn() {
    const disk = eventfd(0, EFD_CLOEXEC); // blocking: a read waits for a write
    const notify = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    const epoll = epollCreate();
    epollAdd(epoll, notify, EPOLLIN, 7);
    const events = new Uint32Array(2 * 4);
    // A queue made before the eventfd is set follows it too.
    const queue = new UringQueue(disk, { path: "eventfd" });
    try {
      setUringEventfd(notify);
      const first = new Uint8Array(8);
      let settled = false;
      const io = queue.read(0, first).then(() => settled = true);
      await sleep(20);
      assert.equal(settled, false);
      assert.equal(uringInFlight(), true);
      assert.equal(epollWaitInto(epoll, events, 0), 0, "nothing completed, nothing signalled");

      eventfdWrite(disk, 41);
      assert.equal(epollWaitInto(epoll, events, 2000), 1, "the completion signals the eventfd");
      assert.equal(events[1], 7);
      await sleep(20);
      assert.equal(settled, false, "no pump but the owner's");
      assert.ok(eventfdRead(notify) >= 1);
      pumpUringQueues();
      await io;
      assert.equal(counter(first), 41);
      assert.equal(uringInFlight(), false);

      // The owner away (awaiting something that needs the completion): the queue reaps itself.
      const second = new Uint8Array(8);
      const io2 = queue.read(0, second);
      await sleep(10);
      eventfdWrite(disk, 42);
      setUringOwnerAway(true);
      await io2;
      setUringOwnerAway(false);
      assert.equal(counter(second), 42);
      eventfdRead(notify);

      // Withdrawn: the queue waits for itself again (in the kernel, holding the thread: the disk
      // is written first), and the eventfd hears nothing more.
      setUringEventfd(null);
      const third = new Uint8Array(8);
      eventfdWrite(disk, 43);
      await queue.read(0, third);
      assert.equal(counter(third), 43);
      assert.equal(epollWaitInto(epoll, events, 0), 0, "unregistered: no signal");
    } finally {
      setUringOwnerAway(false);
      setUringEventfd(null);
      queue.close();
      close(epoll);
      close(notify);
      close(disk);
    }
  },
});

Deno.test({
  name: "a queue opened while the owner's eventfd is set signals it from its first request",
  ignore,
  async fn() {
    const disk = eventfd(0, EFD_CLOEXEC);
    const notify = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    setUringEventfd(notify);
    const queue = new UringQueue(disk, { path: "eventfd" });
    try {
      const buf = new Uint8Array(8);
      let settled = false;
      const io = queue.read(0, buf).then(() => settled = true);
      await sleep(20); // the pump's turn after the submission found nothing to reap
      eventfdWrite(disk, 5);
      // Bounded: the signal must come, whoever waits.
      for (let i = 0; i < 200 && eventfdRead(notify) === 0; i++) await sleep(5);
      await sleep(10);
      assert.equal(settled, false);
      pumpUringQueues();
      await io;
      assert.equal(counter(buf), 5);
    } finally {
      setUringEventfd(null);
      queue.close();
      close(notify);
      close(disk);
    }
  },
});
