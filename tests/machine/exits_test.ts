import assert from "node:assert/strict";
import type { AccessSize } from "../../src/virtio/bus.ts";
import { Doorbells } from "../../src/virtio/doorbell.ts";
import {
  ExitBus,
  ExitChannel,
  ExitError,
  type ExitHandler,
  ExitServer,
  type VcpuBoot,
} from "../../src/virtio/exits.ts";
import { VcpuInterrupts } from "../../src/virtio/interrupts.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import { newQueueStats } from "../../src/virtio/queue.ts";
import { VcpuHandle } from "../../src/machine/vcpu_host.ts";
import type { Access, Outcome } from "./exit_worker.ts";

const WORKER = new URL("./exit_worker.ts", import.meta.url);

function bus(channel: ExitChannel, doorbells: Doorbells[] = [], timeoutMs = 50): ExitBus {
  return new ExitBus({
    channel: channel.buffer,
    doorbells: doorbells.map((d) => d.buffer),
    timeoutMs,
  });
}

Deno.test("ExitBus throws an ExitError naming the access when the VMM never answers, and stays failed", () => {
  const channel = new ExitChannel();
  const vcpu = bus(channel, [], 30);
  const started = performance.now();
  assert.throws(
    () => vcpu.configRead(3, 0x10, 4),
    (e: unknown) =>
      e instanceof ExitError &&
      e.message ===
        "Config read of slot 3 offset 0x10 size 4 got no answer from the VMM within 30 ms",
  );
  assert.ok(performance.now() - started >= 25);
  // Failed for good: the next access is refused with the first failure's words (it names the
  // config read), without a new exit or another wait (timing-free: a loaded machine cannot flake it).
  assert.throws(
    () => vcpu.mmioRead(0x1000, 4),
    (e: unknown) =>
      e instanceof ExitError &&
      e.message ===
        "Config read of slot 3 offset 0x10 size 4 got no answer from the VMM within 30 ms",
  );
});

Deno.test("ExitBus fails at once on a channel the VMM closed", () => {
  const channel = new ExitChannel();
  channel.close();
  assert.equal(channel.closed, true);
  // A minute's timeout: waiting for an answer would take that long, refusing takes none of it
  // (half of it is a bound no load reaches).
  const vcpu = bus(channel, [], 60_000);
  const started = performance.now();
  assert.throws(() => vcpu.mmioWrite(0x1000, 4, 1), /The VMM closed the exit channel/);
  assert.ok(performance.now() - started < 30_000, "refused without waiting for an answer");
});

Deno.test("ExitBus refuses access sizes other than 1, 2 and 4 bytes", () => {
  const vcpu = bus(new ExitChannel());
  assert.throws(() => vcpu.mmioRead(0x1000, 8 as AccessSize), RangeError);
  assert.throws(() => vcpu.configWrite(0, 0, 3 as AccessSize, 0), RangeError);
  assert.throws(() => vcpu.mmioWrite(-4, 4, 0), RangeError);
});

Deno.test("A doorbell write in the ioeventfd table rings the device's word without an exit", () => {
  const channel = new ExitChannel();
  const doorbells = [new Doorbells(1, "ioeventfd"), new Doorbells(2, "ioeventfd")];
  const base = 0x1_2345_6000; // above 4 GiB: both halves of the address matter
  assert.equal(channel.publishDoorbells([{ gpa: base, device: 1, queues: 2, stride: 4 }]), true);
  assert.equal(
    channel.publishDoorbells([{ gpa: base, device: 1, queues: 2, stride: 4 }]),
    false,
    "same table: nothing rewritten",
  );
  const vcpu = bus(channel, doorbells, 20);
  vcpu.mmioWrite(base + 4, 2, 1);
  vcpu.mmioWrite(base, 2, 0);
  vcpu.mmioWrite(base + 4, 4, 1);
  assert.deepEqual(doorbells[1]!.stats, { kicks: [1, 2], exits: [0, 0] });
  assert.deepEqual(channel.counters, { config: 0, mmio: 0, pio: 0, doorbell: 0, ioeventfd: 3 });

  // Moved (BAR reprogrammed): the old address is no longer an ioeventfd, so it exits (and times
  // out here, with no VMM), while the new one rings.
  channel.publishDoorbells([{ gpa: base + 0x10000, device: 1, queues: 2, stride: 4 }]);
  vcpu.mmioWrite(base + 0x10004, 2, 1);
  assert.equal(doorbells[1]!.kicks(1), 3);
  assert.throws(() => vcpu.mmioWrite(base + 4, 2, 1), ExitError);
});

Deno.test("Writes between doorbells or past the last queue are not ioeventfds", () => {
  const channel = new ExitChannel();
  const doorbells = [new Doorbells(2, "ioeventfd")];
  channel.publishDoorbells([{ gpa: 0xc000_3000, device: 0, queues: 2, stride: 4 }]);
  assert.throws(() => bus(channel, doorbells, 10).mmioWrite(0xc000_3002, 2, 0), ExitError);
  assert.throws(() => bus(channel, doorbells, 10).mmioWrite(0xc000_3008, 2, 0), ExitError);
  assert.deepEqual(doorbells[0]!.stats.kicks, [0, 0]);
  assert.deepEqual(channel.doorbellWindows(), [
    { gpa: 0xc000_3000, device: 0, queues: 2, stride: 4 },
  ]);
});

Deno.test("Driver counters the guest reports are read back by slot and queue, and cleared", () => {
  const channel = new ExitChannel();
  const guest = bus(channel);
  const stats = { ...newQueueStats(), kicks: 7, suppressedKicks: 3, chains: 100, largestBatch: 9 };
  guest.reportQueueStats(5, 1, stats);
  guest.reportQueueStats(99, 0, stats); // no such slot: ignored
  assert.deepEqual(channel.driverReport(5, 1), {
    kicks: 7,
    suppressedKicks: 3,
    chains: 100,
    largestBatch: 9,
  });
  assert.equal(channel.driverReport(5, 0), null);
  channel.clearReports();
  assert.equal(channel.driverReport(5, 1), null);
});

/** Boots the exit test vCPU with `accesses` on `channel`. */
function bootExitVcpu(channel: ExitChannel, accesses: Access[], timeoutMs: number): VcpuHandle {
  const mem = new GuestMemory([{ gpa: 0, size: 4096 }]);
  const boot: VcpuBoot = {
    kind: "boot",
    ram: { regions: mem.regions, buffer: mem.buffer },
    vcpu: new VcpuInterrupts().buffer,
    exits: { channel: channel.buffer, doorbells: [], timeoutMs },
    devices: [],
    payload: accesses,
  };
  return new VcpuHandle(WORKER, boot, { timeoutMs: 20_000 }, () => {});
}

Deno.test("ExitServer answers a vCPU Worker's exits (config, MMIO, port I/O), waits for async handlers, fails the exit a handler throws for, and splits 8-byte accesses", async () => {
  const writes: Array<[number, number, number]> = [];
  const handler: ExitHandler = {
    configRead: (slot, offset, size) => slot === 1 && offset === 0 && size === 4 ? 0x1042_1af4 : 0,
    configWrite: () => {},
    mmioRead: (gpa) => {
      if (gpa === 0xdead_0000) throw new Error("nothing decodes 0xdead0000");
      if (gpa === 0x2000) return new Promise((resolve) => setTimeout(() => resolve(7), 20));
      return gpa === 0x3000 ? 0x89abcdef : 0x01234567;
    },
    mmioWrite: (gpa, size, value) => {
      writes.push([gpa, size, value]);
    },
    ioRead: (port, size) => port === 0x1f7 && size === 1 ? 0x50 : 0xffff,
    ioWrite: (port, size, value) => {
      writes.push([port, size, value]);
    },
  };
  const channel = new ExitChannel();
  const errors: unknown[] = [];
  const server = new ExitServer(channel, handler, { onError: (e) => errors.push(e) });
  try {
    const vcpu = bootExitVcpu(channel, [
      { op: "configRead", slot: 1, offset: 0, size: 4 },
      { op: "mmioWrite64", gpa: 0x1000, value: 0x5_0000_0002n },
      { op: "mmioRead", gpa: 0xdead_0000, size: 4 },
      { op: "mmioRead", gpa: 0x2000, size: 4 },
      { op: "mmioRead64", gpa: 0x3000 },
      { op: "ioRead", port: 0x1f7, size: 1 },
      { op: "ioWrite", port: 0x1f0, size: 2, value: 0xbeef },
      { op: "ioRead", port: 0x10000, size: 1 },
    ], 5000);
    const out = await vcpu.result as Outcome[];
    assert.deepEqual(out, [
      0x1042_1af4,
      null,
      { error: "ExitError: MMIO read at 0xdead0000 size 4 failed: nothing decodes 0xdead0000" },
      7,
      0x01234567_89abcdefn,
      0x50,
      null,
      { error: "RangeError: Bad I/O port 65536" },
    ]);
    assert.deepEqual(
      writes,
      [[0x1000, 4, 2], [0x1004, 4, 5], [0x1f0, 2, 0xbeef]],
      "low half first",
    );
    assert.equal(errors.length, 1);
    assert.deepEqual(channel.counters, {
      config: 1,
      mmio: 6,
      pio: 2,
      doorbell: 0,
      ioeventfd: 0,
    });
  } finally {
    await server.close();
  }
});

Deno.test("Closing the ExitServer wakes a vCPU waiting on an exit that will never be answered", async () => {
  const handler: ExitHandler = {
    configRead: () => 0,
    configWrite: () => {},
    mmioRead: () => new Promise<number>(() => {}), // never answers
    mmioWrite: () => {},
  };
  const channel = new ExitChannel();
  const server = new ExitServer(channel, handler);
  const vcpu = bootExitVcpu(channel, [
    { op: "mmioRead", gpa: 0x1000, size: 4 },
    { op: "mmioRead", gpa: 0x1000, size: 4 },
  ], 10_000);
  try {
    await new Promise((resolve) => setTimeout(resolve, 100));
  } finally {
    await server.close();
  }
  const out = await vcpu.result as Outcome[];
  assert.deepEqual(out, [
    { error: "ExitError: The VMM closed the exit channel" },
    { error: "ExitError: The VMM closed the exit channel" },
  ]);
});
