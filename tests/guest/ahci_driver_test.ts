/**
 * The guest's AHCI driver against the emulated ich9-ahci HBA, in one thread: bring-up, data,
 * NCQ at depth 32 with its exit count, errors and recovery, and the guest's own answers.
 */

import { CountingBus } from "./counting_bus.ts";
import { WrappedNode } from "../block/wrapped_node.ts";
import assert from "node:assert/strict";
import { AhciDriver, type AhciDriverOptions } from "../../src/guest/ahci_driver.ts";
import { AhciController } from "../../src/devices/ahci.ts";
import type { BlockNode } from "../../src/block/node.ts";
import { BlockError } from "../../src/errors.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import { RawNode } from "../../formats/raw.ts";
import { GuestAllocator } from "../../src/guest/alloc.ts";
import { type BlockTarget, type IoRequest, runOne } from "../../src/guest/block_target.ts";
import { GuestInterrupts } from "../../src/guest/irq.ts";
import { parseJobArgs } from "../../src/guest/job.ts";
import { type PciFunctionInfo, scanBus } from "../../src/guest/pci_probe.ts";
import type { GuestPlatform } from "../../src/guest/virtio_driver.ts";
import { runWorkload } from "../../src/guest/workload.ts";
import { PciBus } from "../../src/virtio/bus.ts";
import { VcpuInterrupts } from "../../src/virtio/interrupts.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import { mulberry32 } from "../prng.ts";

const RAM_BYTES = 64 * 1024 * 1024;
const ALLOC_BASE = 0x10_0000;
const MMIO_WINDOW = { base: 0xc000_0000, size: 0x1000_0000 };

interface Machine {
  readonly mem: GuestMemory;
  readonly vcpu: VcpuInterrupts;
  readonly ctrl: AhciController;
  readonly bus: CountingBus;
  readonly platform: GuestPlatform;
  readonly fn: PciFunctionInfo;
  readonly file: MemoryFile | null;
}

/**
 * RAM, a vCPU, the HBA on bus 0 (slot 5) with `drive` on port `port`, and a platform whose idle
 * step lets the event loop run until an interrupt is pending, the HBA has nothing in flight, or
 * a 20 ms slice has passed (as a halt is bounded, so that timeouts are noticed).
 */
async function machine(
  options: { diskBytes?: number; drive?: BlockNode; port?: number } = {},
): Promise<Machine> {
  const mem = new GuestMemory([{ gpa: 0, size: RAM_BYTES }]);
  const vcpu = new VcpuInterrupts();
  let file: MemoryFile | null = null;
  let drive = options.drive;
  if (drive === undefined) {
    const bytes = options.diskBytes ?? 8 * 1024 * 1024;
    file = new MemoryFile("disk", new Uint8Array(bytes).map((_, i) => (i * 13) & 0xff));
    drive = await RawNode.open(file);
  }
  const drives: (BlockNode | null)[] = new Array((options.port ?? 0) + 1).fill(null);
  drives[options.port ?? 0] = drive;
  const ctrl = new AhciController({
    drives,
    memory: mem,
    msi: (vector) => vcpu.deliver(vector),
    intx: (level) => vcpu.setIntx(0, level),
  });
  const pci = new PciBus();
  pci.plug(ctrl, 5);
  pci.assignBars(MMIO_WINDOW);
  const bus = new CountingBus(pci);
  const platform: GuestPlatform = {
    bus,
    mem,
    interrupts: new GuestInterrupts(vcpu),
    alloc: new GuestAllocator(mem, { gpa: ALLOC_BASE, size: RAM_BYTES - ALLOC_BASE }),
    idle: async () => {
      let drained = false;
      const idle = ctrl.idle().then(() => {
        drained = true;
      });
      await Promise.race([idle, Promise.resolve()]);
      const until = performance.now() + 20;
      while (!drained && !vcpu.pending && performance.now() < until) {
        await new Promise((r) => setTimeout(r, 0));
      }
    },
  };
  const fn = scanBus(bus).functions.find((f) => f.classCode === 0x0106);
  assert.ok(fn !== undefined, "the HBA is found by its class");
  return { mem, vcpu, ctrl, bus, platform, fn, file };
}

async function io(
  target: BlockTarget,
  op: IoRequest["op"],
  offset: number,
  length: number,
  fill?: number,
): Promise<{ status: string; data: Uint8Array; detail: string }> {
  let data = new Uint8Array(0);
  let detail = "";
  const status = await runOne(target, (r) => {
    r.op = op;
    r.offset = offset;
    r.length = length;
    if (fill !== undefined) r.data.fill(fill, 0, length);
  }, (r) => {
    data = r.data.slice(0, length);
    detail = r.detail;
  });
  return { status, data, detail };
}

Deno.test("AhciDriver.open brings the port up with MSI and reads the disk's identity", async () => {
  const m = await machine({ diskBytes: 6 * 1024 * 1024 });
  const disk = await AhciDriver.open(m.platform, m.fn);
  assert.equal(disk.model, "QEMU HARDDISK");
  assert.equal(disk.serial, "QM00001");
  assert.equal(disk.identity.firmware, "2.5+");
  assert.equal(disk.capacity, 6 * 1024 * 1024);
  assert.equal(disk.blockSize, 512);
  assert.equal(disk.ncq, true);
  assert.equal(disk.depth, 32);
  assert.equal(disk.identity.queueDepth, 32);
  assert.equal(disk.interruptMode, "msi");
  assert.ok(disk.maxDiscard > 0, "TRIM");
  assert.equal(disk.maxWriteZeroes, 0);
  assert.equal(m.ctrl.msiEnabled, true);
  assert.equal(m.ctrl.stats.commands, 1, "IDENTIFY");
  await disk.close();
  await m.ctrl.close();
});

Deno.test("reads, writes, flush and discard through NCQ and DMA EXT reach the disk", async () => {
  for (const ncq of [true, false]) {
    const m = await machine();
    const disk = await AhciDriver.open(m.platform, m.fn, { ncq, depth: 4, maxTransfer: 64 * 1024 });
    assert.equal(disk.ncq, ncq);
    const file = m.file!;
    const read = await io(disk, "read", 4096, 65536);
    assert.equal(read.status, "ok");
    assert.deepEqual(read.data, file.contents().subarray(4096, 4096 + 65536));
    assert.equal((await io(disk, "write", 8192, 8192, 0x3c)).status, "ok");
    assert.deepEqual(file.contents().subarray(8192, 16384), new Uint8Array(8192).fill(0x3c));
    assert.equal((await io(disk, "flush", 0, 0)).status, "ok");
    assert.equal((await io(disk, "discard", 8192, 4096)).status, "ok");
    assert.deepEqual(file.contents().subarray(8192, 12288), new Uint8Array(4096));
    assert.equal(file.contents()[12288], 0x3c);
    assert.equal(m.ctrl.stats.ncqCommands, ncq ? 2 : 0, `ncq ${ncq}`);
    await disk.close();
    await m.ctrl.close();
  }
});

Deno.test("the guest answers what it can: past the capacity, write-zeroes, get-id, bad lengths", async () => {
  const m = await machine({ diskBytes: 1024 * 1024 });
  const disk = await AhciDriver.open(m.platform, m.fn, { depth: 2, maxTransfer: 8192 });
  const before = m.ctrl.stats.commands;
  assert.deepEqual(await io(disk, "read", 1024 * 1024, 512), {
    status: "ioerr",
    data: (await io(disk, "read", 1024 * 1024, 512)).data,
    detail: "beyond the capacity",
  });
  assert.equal((await io(disk, "write-zeroes", 0, 512)).status, "unsupp");
  const id = await io(disk, "get-id", 0, 20);
  assert.equal(id.status, "ok");
  assert.equal(new TextDecoder().decode(id.data.subarray(0, 7)), "QM00001");
  assert.equal(m.ctrl.stats.commands, before, "none of them reached the HBA");
  const r = disk.acquire()!;
  r.op = "read";
  r.offset = 100;
  r.length = 512;
  assert.throws(() => disk.submit(r), RangeError);
  r.offset = 0;
  r.length = 16384;
  assert.throws(() => disk.submit(r), RangeError);
  await disk.close();
  await m.ctrl.close();
});

/** Depth-32 random reads and writes against a shadow copy; returns exits per request. */
async function randomWorkload(
  options: AhciDriverOptions,
  seed: number,
  requests: number,
  drive?: (inner: BlockNode) => BlockNode,
): Promise<{ exitsPerRequest: number; interruptsPerRequest: number; doorbells: number }> {
  const diskBytes = 4 * 1024 * 1024;
  const file = new MemoryFile("disk", new Uint8Array(diskBytes).map((_, i) => (i * 13) & 0xff));
  const raw = await RawNode.open(file);
  const m = await machine({ drive: drive === undefined ? raw : drive(raw) });
  const disk = await AhciDriver.open(m.platform, m.fn, { depth: 32, ...options });
  const shadow = file.contents();
  const random = mulberry32(seed);
  const stamps = new Uint32Array(32);
  let stamp = 0;
  let issued = 0;
  let completed = 0;
  const exitsBefore = m.bus.exits;
  const interruptsBefore = disk.stats.interrupts;
  const doorbellsBefore = disk.stats.doorbells;
  // Writes never overlap requests in flight (their order on the disk is not defined).
  const busy = new Uint8Array(diskBytes / 4096);
  const fill = () => {
    for (let r = disk.acquire(); r !== null && issued < requests; r = disk.acquire()) {
      const blocks = 1 + Math.floor(random() * 8);
      let first = Math.floor(random() * (diskBytes / 4096 - blocks));
      while (busy.subarray(first, first + blocks).some((b) => b !== 0)) {
        first = Math.floor(random() * (diskBytes / 4096 - blocks));
      }
      busy.fill(1, first, first + blocks);
      r.op = random() < 0.5 ? "write" : "read";
      r.offset = first * 4096;
      r.length = blocks * 4096;
      r.tag = ++stamp;
      stamps[r.index] = stamp;
      if (r.op === "write") {
        for (let i = 0; i < r.length; i += 512) r.data.fill((stamp + i / 512) & 0xff, i, i + 512);
      }
      disk.submit(r);
      issued++;
    }
    disk.commit();
  };
  fill();
  while (completed < requests) {
    for (let r = disk.reap(); r !== null; r = disk.reap()) {
      assert.equal(r.status, "ok", `seed ${seed}: ${r.op} at ${r.offset}: ${r.detail}`);
      const range = shadow.subarray(r.offset, r.offset + r.length);
      if (r.op === "write") range.set(r.data.subarray(0, r.length));
      else assert.deepEqual(r.data.subarray(0, r.length), range, `seed ${seed}: read ${r.offset}`);
      busy.fill(0, r.offset / 4096, (r.offset + r.length) / 4096);
      disk.release(r);
      completed++;
    }
    if (completed >= requests) break;
    fill();
    if (disk.inFlight > 0) await disk.wait();
  }
  const exits = m.bus.exits - exitsBefore;
  assert.deepEqual(file.contents(), shadow, `seed ${seed}: the disk holds what was written`);
  const result = {
    exitsPerRequest: exits / requests,
    interruptsPerRequest: (disk.stats.interrupts - interruptsBefore) / requests,
    doorbells: disk.stats.doorbells - doorbellsBefore,
  };
  await disk.close();
  await m.ctrl.close();
  return result;
}

/** Each I/O finishes after 0..3 timer turns (fixed seed): completions spread out and reorder. */
class DelayedNode extends WrappedNode {
  readonly #random: () => number;
  constructor(inner: BlockNode, seed: number) {
    super(inner, "delayed");
    this.#random = mulberry32(seed);
  }
  async #delay(): Promise<void> {
    const turns = Math.floor(this.#random() * 4);
    for (let i = 0; i < turns; i++) await new Promise((r) => setTimeout(r, 0));
  }
  override async read(offset: number, dst: Uint8Array): Promise<void> {
    await this.#delay();
    await this.inner.read(offset, dst);
  }
  override async write(offset: number, src: Uint8Array): Promise<void> {
    await this.#delay();
    await this.inner.write(offset, src);
  }
}

Deno.test("random I/O at depth 32 verifies, and NCQ costs well under one exit per request (seed 0xc0ffee)", async () => {
  const seed = 0xc0ffee;
  const ncq = await randomWorkload({}, seed, 2048);
  const spread = await randomWorkload({}, seed + 1, 1024, (n) => new DelayedNode(n, seed));
  const single = await randomWorkload({ ncq: false }, seed + 2, 512);
  console.log(
    `AHCI exits per request, depth 32: NCQ ${ncq.exitsPerRequest.toFixed(3)} ` +
      `(interrupts/request ${ncq.interruptsPerRequest.toFixed(3)}), NCQ with spread-out ` +
      `completions ${spread.exitsPerRequest.toFixed(3)} (interrupts/request ` +
      `${spread.interruptsPerRequest.toFixed(3)}), DMA EXT one at a time ` +
      `${single.exitsPerRequest.toFixed(3)}`,
  );
  assert.ok(ncq.exitsPerRequest < 1, `NCQ: ${ncq.exitsPerRequest} exits per request`);
  assert.ok(spread.exitsPerRequest < 2, `NCQ, spread: ${spread.exitsPerRequest}`);
  assert.ok(single.exitsPerRequest >= 5, `non-NCQ: ${single.exitsPerRequest} exits per request`);
  assert.ok(single.exitsPerRequest > 4 * spread.exitsPerRequest);
});

Deno.test("a fio-style randrw job with crc32c verify runs on the AHCI target", async () => {
  const m = await machine({ diskBytes: 2 * 1024 * 1024 });
  const disk = await AhciDriver.open(m.platform, m.fn);
  const [spec] = parseJobArgs([
    "--name=ahci",
    "--rw=randrw",
    "--bs=4k",
    "--iodepth=32",
    "--size=1m",
    "--verify=crc32c",
    "--randseed=7",
  ]);
  const result = await runWorkload([spec!], { openTarget: () => disk });
  const job = result.jobs[0]!;
  assert.equal(job.error, null);
  assert.equal(job.verify?.failed, 0);
  assert.ok(job.write.ops > 0 && job.read.ops > 0);
  assert.ok(m.ctrl.stats.ncqCommands >= job.write.ops + job.read.ops);
  await disk.close();
  await m.ctrl.close();
});

Deno.test("with INTx instead of MSI the driver works the same", async () => {
  const m = await machine();
  const disk = await AhciDriver.open(m.platform, m.fn, { interrupts: "intx", depth: 8 });
  assert.equal(disk.interruptMode, "intx");
  assert.equal(m.ctrl.msiEnabled, false);
  const w = await io(disk, "write", 0, 4096, 0x77);
  assert.equal(w.status, "ok");
  assert.deepEqual((await io(disk, "read", 0, 4096)).data, new Uint8Array(4096).fill(0x77));
  assert.ok(m.platform.interrupts.stats.intx > 0);
  assert.equal(m.vcpu.intxAsserted, false, "the line is low once acknowledged");
  await disk.close();
  await m.ctrl.close();
});

/** A node whose reads of one byte offset fail. */
class FailingNode extends WrappedNode {
  bad: number;
  constructor(inner: BlockNode, bad: number) {
    super(inner, "failing");
    this.bad = bad;
  }
  override async read(offset: number, dst: Uint8Array): Promise<void> {
    await new Promise((r) => setTimeout(r, 0));
    if (offset <= this.bad && this.bad < offset + dst.length) {
      throw new BlockError("io", "Injected read error", { offset });
    }
    await this.inner.read(offset, dst);
  }
}

Deno.test("a failed read ends in ioerr naming UNC; the others complete and later requests work", async () => {
  for (const ncq of [true, false]) {
    const file = new MemoryFile("d", new Uint8Array(1024 * 1024).map((_, i) => i & 0xff));
    const failing = new FailingNode(await RawNode.open(file), 20 * 4096 + 100);
    const m = await machine({ drive: failing });
    const disk = await AhciDriver.open(m.platform, m.fn, { ncq, depth: 16, maxTransfer: 4096 });
    for (let i = 0; i < 16; i++) {
      const r = disk.acquire()!;
      r.op = "read";
      r.offset = (10 + i) * 4096;
      r.length = 4096;
      disk.submit(r);
    }
    disk.commit();
    const outcomes = new Map<number, { status: string; detail: string }>();
    while (outcomes.size < 16) {
      for (let r = disk.reap(); r !== null; r = disk.reap()) {
        outcomes.set(r.offset / 4096, { status: r.status, detail: r.detail });
        if (r.status === "ok") {
          assert.deepEqual(
            r.data.subarray(0, 4096),
            file.contents().subarray(r.offset, r.offset + 4096),
          );
        }
        disk.release(r);
      }
      if (outcomes.size < 16) await disk.wait();
    }
    const failed = [...outcomes].filter(([, o]) => o.status !== "ok");
    assert.equal(failed.length, 1, `ncq ${ncq}: ${JSON.stringify(failed)}`);
    assert.equal(failed[0]![0], 20);
    assert.match(failed[0]![1].detail, /TFES: ATA status 0x41 error 0x40 \(UNC\)/);
    assert.equal(disk.stats.recoveries, 1);
    assert.equal(disk.stats.errors, 1);
    // NCQ: READ LOG EXT 10h named the failed tag; the tags still queued were issued again.
    if (ncq) assert.ok(disk.stats.retries > 0, `retries ${disk.stats.retries}`);
    // The port works again.
    failing.bad = -1;
    const again = await io(disk, "read", 20 * 4096, 4096);
    assert.equal(again.status, "ok");
    assert.deepEqual(again.data, file.contents().subarray(20 * 4096, 21 * 4096));
    await disk.close();
    await m.ctrl.close();
  }
});

/** A node whose reads hang until released. */
class HangingNode implements BlockNode {
  readonly format = "raw";
  readonly filename = "hanging";
  readonly readOnly = false;
  readonly requestAlignment = 1;
  readonly size = 1024 * 1024;
  #release: (() => void)[] = [];
  read(): Promise<void> {
    return new Promise((resolve) => this.#release.push(resolve));
  }
  release(): void {
    for (const r of this.#release) r();
    this.#release = [];
  }
  write(): Promise<void> {
    return Promise.resolve();
  }
  writeZeroes(): Promise<void> {
    return Promise.resolve();
  }
  discard(): Promise<void> {
    return Promise.resolve();
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  blockStatus(offset: number) {
    return Promise.resolve({ kind: "data" as const, offset, length: 512 });
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

Deno.test("requests that stop completing make wait() throw after the timeout", async () => {
  const node = new HangingNode();
  const m = await machine({ drive: node });
  const disk = await AhciDriver.open(m.platform, m.fn, { timeoutMs: 60, depth: 2 });
  await assert.rejects(
    () =>
      runOne(disk, (r) => {
        r.op = "read";
        r.offset = 0;
        r.length = 512;
      }),
    /requests without a completion for 60 ms/,
  );
  node.release();
  await m.ctrl.close();
});

Deno.test("open refuses a function that is not AHCI, and a port without a disk", async () => {
  const m = await machine({ port: 1 });
  await assert.rejects(
    () => AhciDriver.open(m.platform, { ...m.fn, classCode: 0x0100 }),
    /is not AHCI/,
  );
  await assert.rejects(() => AhciDriver.open(m.platform, m.fn, { port: 3 }), /not implemented/);
  const disk = await AhciDriver.open(m.platform, m.fn);
  assert.equal(disk.port, 1, "the first port with a disk");
  await disk.close();
  await m.ctrl.close();
});
