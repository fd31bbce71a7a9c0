/**
 * The guest's IDE driver against the real PIIX IDE controller on a PciBus, in one thread: the
 * platform's idle step lets the controller's block I/O settle, the controller's lines drive the
 * vCPU's INTx inputs 14 and 15. Data is checked against the image; exits are counted with a bus
 * wrapper, to pin what trap-and-emulate costs: ~256 data-port accesses per sector in PIO, a
 * handful per request in DMA.
 *
 * @module
 */

import { CountingBus } from "./counting_bus.ts";
import assert from "node:assert/strict";
import { IdeController } from "../../src/devices/ide.ts";
import type { BlockNode } from "../../src/block/node.ts";
import { GuestAllocator } from "../../src/guest/alloc.ts";
import { type BlockTarget, type IoRequest, runOne } from "../../src/guest/block_target.ts";
import { IdeDriver, IdeDriverError, type IdeDriverOptions } from "../../src/guest/ide_driver.ts";
import { GuestInterrupts } from "../../src/guest/irq.ts";
import { type PciFunctionInfo, probeSlot } from "../../src/guest/pci_probe.ts";
import type { GuestPlatform, IdleFn } from "../../src/guest/virtio_driver.ts";
import { PciBus } from "../../src/virtio/bus.ts";
import { VcpuInterrupts } from "../../src/virtio/interrupts.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import { CountingNode, memoryDisk, NullNode } from "../devices/blk_harness.ts";
import { mulberry32 } from "../prng.ts";

const MiB = 1024 * 1024;
const RAM = 32 * MiB;
const SLOT = 1;

/** A single-thread machine: RAM, a vCPU, the controller in slot 1, a counting bus. */
interface Machine {
  readonly mem: GuestMemory;
  readonly ide: IdeController;
  readonly bus: CountingBus;
  readonly platform: GuestPlatform;
  readonly fn: PciFunctionInfo;
}

function machine(drives: readonly (BlockNode | null)[], idle?: IdleFn): Machine {
  const mem = new GuestMemory([{ gpa: 0, size: RAM }]);
  const vcpu = new VcpuInterrupts();
  const ide = new IdeController({
    drives,
    memory: mem,
    irq: (channel, level) => vcpu.setIntx(14 + channel, level),
  });
  const pci = new PciBus<IdeController>();
  pci.plug(ide, SLOT);
  pci.assignBars({ base: 0xc000_0000, size: 0x1000_0000 });
  const bus = new CountingBus(pci);
  const platform: GuestPlatform = {
    bus,
    mem,
    interrupts: new GuestInterrupts(vcpu),
    alloc: new GuestAllocator(mem, { gpa: MiB, size: RAM - MiB }),
    // The guest halts; in one thread that is where the controller's block I/O settles.
    idle: idle ?? (() => ide.idle()),
  };
  const fn = probeSlot(bus, SLOT)!;
  return { mem, ide, bus, platform, fn };
}

async function disk(bytes = 8 * MiB, seed = 3) {
  return await memoryDisk(bytes, { fill: (i) => (i * 7 + seed + (i >>> 9) * 3) & 0xff });
}

function pattern(bytes: number, seed: number): Uint8Array {
  const out = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) out[i] = (i * 29 + seed * 11 + (i >>> 9)) & 0xff;
  return out;
}

/** Reads `length` bytes at `offset`; returns a copy of the data. */
async function read(target: BlockTarget, offset: number, length: number): Promise<Uint8Array> {
  let out = new Uint8Array(0);
  const status = await runOne(target, (r) => {
    r.op = "read";
    r.offset = offset;
    r.length = length;
  }, (r) => {
    out = r.data.slice(0, length);
  });
  assert.equal(status, "ok");
  return out;
}

async function write(target: BlockTarget, offset: number, data: Uint8Array): Promise<void> {
  const status = await runOne(target, (r) => {
    r.op = "write";
    r.offset = offset;
    r.length = data.length;
    r.data.set(data);
  });
  assert.equal(status, "ok");
}

async function open(m: Machine, options: IdeDriverOptions): Promise<IdeDriver> {
  return await IdeDriver.open(m.platform, m.fn, options);
}

for (const mode of ["pio", "dma"] as const) {
  Deno.test(`IdeDriver (${mode}) brings the disk up from IDENTIFY: capacity, strings, limits`, async () => {
    const { node } = await disk();
    const m = machine([node]);
    const d = await open(m, { mode });
    assert.equal(d.capacity, 8 * MiB);
    assert.equal(d.blockSize, 512);
    assert.equal(d.model, "QEMU HARDDISK");
    assert.equal(d.serial, "QM00001");
    assert.equal(d.firmware, "2.5+");
    assert.equal(d.lba48, true);
    assert.equal(d.writeCache, true);
    assert.equal(d.maxTransfer, 128 * 1024);
    assert.equal(d.maxWriteZeroes, 0);
    assert.equal(d.maxDiscard > 0, mode === "dma");
    assert.deepEqual(d.ports, [[0x1f0, 0x1f8], [0x3f6, 0x3f7], [0xc000, 0xc008]]);
    assert.equal(m.ide.stats.identify, 1);
    if (mode === "dma") {
      assert.equal(m.ide.disk(0)!.identify[88], 0x3f | (1 << 13), "UDMA 5 selected");
      assert.equal(m.ide.stats.setFeatures, 1);
    }
    d.close();
    await m.ide.close();
  });

  Deno.test(`IdeDriver (${mode}) reads and writes of 512 B to 128 KiB match the image`, async () => {
    const { node, file } = await disk();
    const m = machine([node]);
    const d = await open(m, { mode });
    const sizes = [512, 1024, 4096, 12 * 1024, 64 * 1024, 128 * 1024];
    let offset = 0;
    for (const [i, size] of sizes.entries()) {
      assert.deepEqual(
        await read(d, offset, size),
        file.contents().subarray(offset, offset + size),
      );
      const data = pattern(size, i);
      await write(d, offset + 3 * MiB, data);
      assert.deepEqual(file.contents().subarray(offset + 3 * MiB, offset + 3 * MiB + size), data);
      assert.deepEqual(await read(d, offset + 3 * MiB, size), data);
      offset += size + 512;
    }
    d.close();
    await m.ide.close();
  });

  Deno.test(`IdeDriver (${mode}) keeps a software queue: 24 requests in flight, completed in order`, async () => {
    const { node, file } = await disk();
    const m = machine([node]);
    const d = await open(m, { mode, depth: 24 });
    const requests: IoRequest[] = [];
    for (let i = 0; i < 24; i++) {
      const r = d.acquire()!;
      r.op = i % 3 === 0 ? "write" : "read";
      r.offset = i * 8192;
      r.length = 4096;
      if (r.op === "write") r.data.set(pattern(4096, 100 + i));
      d.submit(r);
      requests.push(r);
    }
    assert.equal(d.acquire(), null);
    d.commit();
    const done: IoRequest[] = [];
    while (done.length < 24) {
      const r = d.reap();
      if (r === null) {
        await d.wait();
        continue;
      }
      assert.equal(r.status, "ok", r.detail);
      done.push(r);
    }
    assert.deepEqual(done.map((r) => r.index), requests.map((r) => r.index));
    const image = file.contents();
    for (const [i, r] of requests.entries()) {
      const at = i * 8192;
      if (i % 3 === 0) assert.deepEqual(image.subarray(at, at + 4096), pattern(4096, 100 + i));
      else assert.deepEqual(r.data.subarray(0, 4096), image.subarray(at, at + 4096));
      d.release(r);
    }
    assert.equal(d.inFlight, 0);
    assert.equal(d.stats.completions, 24);
    d.close();
    await m.ide.close();
  });
}

Deno.test("PIO costs about 256 data-port exits per sector; DMA a handful per request", async () => {
  const { node } = await disk();
  const m = machine([node]);
  const pio = await open(m, { mode: "pio" });
  m.bus.reset();
  await read(pio, 0, 4096);
  const readExits = m.bus.pio;
  assert.equal(m.bus.ports.get(0x1f0), 8 * 256);
  assert.ok(readExits >= 2048 && readExits < 2100, `PIO 4 KiB read: ${readExits} exits`);
  m.bus.reset();
  await write(pio, 0, pattern(4096, 1));
  assert.ok(m.bus.pio >= 2048 && m.bus.pio < 2100, `PIO 4 KiB write: ${m.bus.pio} exits`);
  console.log(`PIO 4 KiB: read ${readExits} exits, write ${m.bus.pio} exits`);
  pio.close();

  const dma = await open(m, { mode: "dma" });
  for (const size of [4096, 128 * 1024]) {
    m.bus.reset();
    await read(dma, 8192, size);
    const r = m.bus.pio;
    m.bus.reset();
    await write(dma, 8192, pattern(size, 2));
    const w = m.bus.pio;
    console.log(`DMA ${size / 1024} KiB: read ${r} exits, write ${w} exits`);
    assert.ok(r < 20 && w < 20, `DMA ${size}: ${r}/${w}`);
    assert.equal(m.bus.ports.get(0x1f0) ?? 0, 0);
    assert.equal(m.bus.config, 0);
  }
  dma.close();
  await m.ide.close();
});

Deno.test("IdeDriver uses LBA48 commands for sectors past 2^28 and for more than 256 sectors", async () => {
  const big = new CountingNode(new NullNode(2 ** 29 * 512));
  const m = machine([big]);
  const d = await open(m, { mode: "dma", maxTransfer: 256 * 1024 });
  assert.equal(d.capacity, 2 ** 29 * 512);
  big.clear();
  await read(d, (2 ** 28 + 3) * 512, 4096);
  assert.deepEqual(big.calls.map((c) => [c.op, c.offset, c.length]), [[
    "read",
    (2 ** 28 + 3) * 512,
    4096,
  ]]);
  const before = m.ide.stats.readDma;
  await read(d, 0, 256 * 1024);
  assert.equal(m.ide.stats.readDma, before + 1);
  d.close();
  await m.ide.close();
});

Deno.test("flush reaches the image; discard is DSM TRIM; write-zeroes is unsupported; get-id is the serial", async () => {
  const counting = new CountingNode(new NullNode(64 * MiB));
  const m = machine([counting]);
  const d = await open(m, { mode: "dma" });
  counting.clear();
  assert.equal(
    await runOne(d, (r) => {
      r.op = "flush";
      r.offset = 0;
      r.length = 0;
    }),
    "ok",
  );
  assert.equal(counting.flushes, 1);
  // More than one DSM range entry holds (65535 sectors each).
  assert.equal(
    await runOne(d, (r) => {
      r.op = "discard";
      r.offset = 4096;
      r.length = 40 * MiB;
    }),
    "ok",
  );
  assert.deepEqual(
    counting.calls.filter((c) => c.op === "discard").map((c) => [c.offset, c.length]),
    [
      [4096, 0xffff * 512],
      [4096 + 0xffff * 512, 40 * MiB - 0xffff * 512],
    ],
  );
  assert.equal(d.maxDiscard, 64 * 0xffff * 512);
  let detail = "";
  assert.equal(
    await runOne(d, (r) => {
      r.op = "write-zeroes";
      r.offset = 0;
      r.length = 512;
    }, (r) => (detail = r.detail)),
    "unsupp",
  );
  assert.match(detail, /write-zeroes/);
  let id = "";
  assert.equal(
    await runOne(d, (r) => {
      r.op = "get-id";
      r.offset = 0;
      r.length = 20;
    }, (r) => (id = new TextDecoder().decode(r.data.subarray(0, 20)).replace(/\0+$/, ""))),
    "ok",
  );
  assert.equal(id, "QM00001");
  assert.equal(
    await runOne(d, (r) => {
      r.op = "read";
      r.offset = 64 * MiB;
      r.length = 512;
    }),
    "ioerr",
  );
  assert.throws(
    () => d.submit(Object.assign(d.acquire()!, { op: "read", offset: 100, length: 512 })),
    RangeError,
  );
  d.close();
  await m.ide.close();
});

Deno.test("a failed read or write completes with ioerr naming the ATA status and error bits", async () => {
  const { node } = await disk();
  const counting = new CountingNode(node);
  counting.failAt = 100 * 512;
  const m = machine([counting]);
  for (const mode of ["pio", "dma"] as const) {
    const d = await open(m, { mode });
    for (const op of ["read", "write"] as const) {
      let detail = "";
      const status = await runOne(d, (r) => {
        r.op = op;
        r.offset = 96 * 512;
        r.length = 8192;
      }, (r) => (detail = r.detail));
      assert.equal(status, "ioerr", `${mode} ${op}`);
      assert.match(
        detail,
        op === "read" ? /ATA status 0x41 \(DRDY ERR\), error 0x40 \(UNC\)/ : /error 0x04 \(ABRT\)/,
      );
    }
    // The disk still works.
    await read(d, 0, 4096);
    assert.equal(d.stats.errors, 2);
    d.close();
  }
  await m.ide.close();
});

Deno.test("IdeDriver drives the slave and the secondary channel", async () => {
  const a = await disk(2 * MiB, 1);
  const b = await disk(4 * MiB, 2);
  const c = await disk(1 * MiB, 3);
  const m = machine([a.node, b.node, null, c.node]);
  const slave = await open(m, { mode: "pio", slave: true });
  assert.equal(slave.capacity, 4 * MiB);
  assert.equal(slave.serial, "QM00002");
  assert.deepEqual(await read(slave, 512, 1024), b.file.contents().subarray(512, 1536));
  slave.close();
  const secondary = await open(m, { mode: "dma", channel: 1, slave: true });
  assert.equal(secondary.capacity, MiB);
  assert.deepEqual(secondary.ports, [[0x170, 0x178], [0x376, 0x377], [0xc008, 0xc010]]);
  const data = pattern(8192, 9);
  await write(secondary, 4096, data);
  assert.deepEqual(c.file.contents().subarray(4096, 4096 + 8192), data);
  secondary.close();
  await assert.rejects(
    open(m, { mode: "pio", channel: 1 }),
    (e: unknown) =>
      e instanceof IdeDriverError && e.kind === "no-device" &&
      /secondary master: no disk/.test(e.message),
  );
  await m.ide.close();
});

Deno.test("IdeDriver.open refuses a function that is not an IDE controller", async () => {
  const { node } = await disk();
  const m = machine([node]);
  const notIde = { ...m.fn, classCode: 0x0100 };
  await assert.rejects(
    IdeDriver.open(m.platform, notIde, { mode: "pio" }),
    (e: unknown) => e instanceof IdeDriverError && e.kind === "not-ide",
  );
  const noBm = { ...m.fn, bars: m.fn.bars.map(() => null) };
  await assert.rejects(
    IdeDriver.open(m.platform, noBm, { mode: "dma" }),
    (e: unknown) => e instanceof IdeDriverError && e.kind === "no-bus-master",
  );
  await m.ide.close();
});

for (const mode of ["pio", "dma"] as const) {
  Deno.test(`a disk that stops answering makes wait() throw an error naming it (${mode})`, async () => {
    const { node } = await disk();
    let stall = false;
    const stalling = new CountingNode(node);
    const read0 = stalling.read.bind(stalling);
    stalling.read = (offset, dst) => stall ? new Promise<void>(() => {}) : read0(offset, dst);
    // Halting never waits for the controller here: the stalled read would never settle.
    const m = machine([stalling], () => new Promise<void>((resolve) => setTimeout(resolve, 2)));
    const d = await open(m, { mode, timeoutMs: 60 });
    stall = true;
    await assert.rejects(
      runOne(d, (r) => {
        r.op = "read";
        r.offset = 0;
        r.length = 4096;
      }),
      (e: unknown) =>
        e instanceof IdeDriverError && e.kind === "timeout" &&
        /IDE slot 1 primary master: no interrupt for 60 ms/.test(e.message),
    );
    // Broken: later waits throw too, and the driver can still be closed.
    assert.throws(() => d.wait(), IdeDriverError);
    d.close();
  });
}

Deno.test("random mixed PIO and DMA requests agree with a model of the disk (seed 11)", async () => {
  const seed = 11;
  console.log(`seed ${seed}`);
  const rand = mulberry32(seed);
  const { node, file } = await disk(4 * MiB);
  const model = file.contents();
  const m = machine([node]);
  for (const mode of ["pio", "dma"] as const) {
    const d = await open(m, { mode, depth: 8 });
    for (let round = 0; round < 6; round++) {
      const batch: { r: IoRequest; data: Uint8Array | null }[] = [];
      for (let i = 0; i < 8; i++) {
        const r = d.acquire()!;
        const sectors = 1 + Math.floor(rand() * (mode === "pio" ? 16 : 256));
        r.length = sectors * 512;
        // Non-overlapping slots per batch so the order of completion does not matter to the model.
        r.offset = (i * 512 + Math.floor(rand() * (512 - sectors))) * 512;
        r.op = rand() < 0.5 ? "write" : "read";
        let data: Uint8Array | null = null;
        if (r.op === "write") {
          data = pattern(r.length, round * 8 + i);
          r.data.set(data);
        }
        d.submit(r);
        batch.push({ r, data });
      }
      d.commit();
      let left = batch.length;
      while (left > 0) {
        const r = d.reap();
        if (r === null) {
          await d.wait();
          continue;
        }
        left--;
        assert.equal(r.status, "ok", r.detail);
        const entry = batch.find((b) => b.r === r)!;
        if (entry.data !== null) model.set(entry.data, r.offset);
        else {assert.deepEqual(
            r.data.subarray(0, r.length),
            model.subarray(r.offset, r.offset + r.length),
          );}
        d.release(r);
      }
    }
    d.close();
  }
  assert.deepEqual(file.contents(), model);
  await m.ide.close();
});
