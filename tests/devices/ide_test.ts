/**
 * The PIIX IDE controller and its ATA disks, register by register, as a driver (or a hostile
 * guest) sees them: PCI identity, the task file, every command against the spec's status and
 * error bits, PIO and bus-master DMA data against what the image holds, and hostile PRD tables,
 * resets and busy channels — each ending in an ATA error, a bus-master error or a reset, never a
 * throw, with the image unharmed.
 *
 * @module
 */

import assert from "node:assert/strict";
import { createImage, openImage } from "../../formats/open.ts";
import { IdeController } from "../../src/devices/ide.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import { mulberry32 } from "../prng.ts";
import { ignoreWithout, runTool } from "../interop/qemu.ts";
import { CountingNode, memoryDisk, NullNode } from "./blk_harness.ts";
import {
  ABRT,
  bmSetup,
  bmStart,
  bmStop,
  BSY,
  type Channel,
  DRDY,
  DRQ,
  DSC,
  ERR,
  HOB,
  type IdeRig,
  IDNF,
  inb,
  issue,
  makeRig,
  NIEN,
  outb,
  pattern,
  prdFor,
  PRI,
  readWords,
  REG,
  RIG_SLOT,
  SEC,
  settle,
  SRST,
  UNC,
  writePrd,
  writeWords,
} from "./ide_harness.ts";

const MiB = 1024 * 1024;
const READY = DRDY | DSC;
/** Where the tests put PRD tables and DMA buffers in guest RAM. */
const TABLE = 0x1000;
const BUF = 0x10_0000;

async function disk(bytes = 4 * MiB, seed = 1) {
  const { node, file } = await memoryDisk(bytes, {
    fill: (i) => (i * 13 + seed + (i >>> 9)) & 0xff,
  });
  return { node, file };
}

function status(rig: IdeRig, ch: Channel = PRI): number {
  return inb(rig, ch.cmd + REG.status);
}

function altStatus(rig: IdeRig, ch: Channel = PRI): number {
  return inb(rig, ch.ctl);
}

function error(rig: IdeRig, ch: Channel = PRI): number {
  return inb(rig, ch.cmd + REG.err);
}

/** IDENTIFY DEVICE through the data port, as words. */
async function identify(rig: IdeRig, slave = false): Promise<Uint16Array> {
  issue(rig, 0xec, { slave });
  await settle(rig);
  assert.equal(status(rig) & (DRQ | ERR), DRQ);
  const bytes = readWords(rig);
  return new Uint16Array(bytes.buffer);
}

function ataString(id: Uint16Array, word: number, bytes: number): string {
  let s = "";
  for (let i = 0; i < bytes / 2; i++) {
    s += String.fromCharCode(id[word + i]! >> 8, id[word + i]! & 0xff);
  }
  return s.trimEnd();
}

/** Runs a DMA command on the primary channel with the bus master started after it. */
async function dma(
  rig: IdeRig,
  command: number,
  tf: Parameters<typeof issue>[2],
  toMemory: boolean,
): Promise<{ bm: number; status: number }> {
  bmSetup(rig, TABLE, toMemory);
  issue(rig, command, tf);
  bmStart(rig);
  await settle(rig);
  const bm = bmStop(rig);
  return { bm, status: status(rig) };
}

// ---- PCI identity -------------------------------------------------------------------------------

Deno.test("IdeController presents QEMU's piix3-ide identity and one 16-byte I/O BAR", async () => {
  const { node } = await disk();
  const rig = makeRig([node]);
  const cfg = (off: number, size: 1 | 2 | 4) => rig.bus.configRead(RIG_SLOT, off, size);
  assert.equal(cfg(0x00, 2), 0x8086);
  assert.equal(cfg(0x02, 2), 0x7010);
  assert.equal(cfg(0x09, 1), 0x80);
  assert.equal(cfg(0x0a, 2), 0x0101);
  assert.equal(cfg(0x0e, 1), 0);
  for (let bar = 0; bar < 4; bar++) assert.equal(cfg(0x10 + 4 * bar, 4), 0, `BAR ${bar}`);
  assert.equal(rig.bm, 0xc000);
  assert.equal(cfg(0x20, 4), 0xc001);
  // Sizing: all-ones reads back the size mask with the I/O bit.
  rig.bus.configWrite(RIG_SLOT, 0x20, 4, 0xffffffff);
  assert.equal(cfg(0x20, 4), 0xfff1);
  rig.bus.configWrite(RIG_SLOT, 0x20, 4, 0xc000);
  // Read-only registers ignore writes; command keeps only I/O and bus master.
  rig.bus.configWrite(RIG_SLOT, 0x00, 4, 0x12345678);
  assert.equal(cfg(0x00, 4), 0x70108086);
  rig.bus.configWrite(RIG_SLOT, 0x04, 2, 0xffff);
  assert.equal(cfg(0x04, 2), 0x0005);
  assert.equal(cfg(0x100, 4), 0xffffffff);
  await rig.ide.close();
});

Deno.test("IdeController decodes the legacy ports only with PCI_COMMAND_IO set", async () => {
  const { node } = await disk();
  const rig = makeRig([node]);
  assert.equal(status(rig), READY);
  rig.bus.configWrite(RIG_SLOT, 0x04, 2, 0);
  const before = rig.bus.unclaimed;
  assert.equal(status(rig), 0xff);
  assert.equal(inb(rig, rig.bm + 2), 0xff);
  assert.equal(rig.bus.unclaimed, before + 2);
  assert.equal(rig.ide.findPort(0x1f7), null);
  rig.bus.configWrite(RIG_SLOT, 0x04, 2, 1);
  assert.deepEqual(rig.ide.findPort(0x3f6), { bar: -2, offset: 0 });
  assert.deepEqual(rig.ide.findPort(0x172), { bar: -3, offset: 2 });
  assert.equal(rig.ide.findPort(0x3f7), null);
  await rig.ide.close();
});

// ---- Task file, reset state, absent devices ---------------------------------------------------

Deno.test("a disk powers up ready with the ATA signature; a channel without disks reads zero", async () => {
  const { node } = await disk();
  const rig = makeRig([node]);
  assert.equal(status(rig), DRDY | DSC);
  assert.equal(error(rig), 0x01);
  assert.equal(inb(rig, PRI.cmd + REG.nsect), 1);
  assert.equal(inb(rig, PRI.cmd + REG.lbal), 1);
  assert.equal(inb(rig, PRI.cmd + REG.lbam), 0);
  assert.equal(inb(rig, PRI.cmd + REG.lbah), 0);
  assert.equal(status(rig, SEC), 0);
  assert.equal(altStatus(rig, SEC), 0);
  await rig.ide.close();
});

Deno.test("an absent slave reads status 0 and ignores commands; the master is untouched", async () => {
  const { node } = await disk();
  const rig = makeRig([node, null]);
  outb(rig, PRI.cmd + REG.device, 0xb0);
  assert.equal(status(rig), 0);
  assert.equal(altStatus(rig), 0);
  assert.equal(inb(rig, PRI.cmd + REG.device), 0xb0);
  const ignored = rig.ide.stats.ignored;
  outb(rig, PRI.cmd + REG.cmd, 0xec);
  await settle(rig);
  assert.equal(status(rig), 0);
  assert.equal(rig.ide.stats.ignored, ignored + 1);
  assert.equal(rig.raised[0], 0);
  outb(rig, PRI.cmd + REG.device, 0xa0);
  assert.equal(status(rig), READY);
  const id = await identify(rig);
  assert.equal(id[0], 0x0040);
  await rig.ide.close();
});

Deno.test("LBA48 registers keep the previous write, read back with HOB set", async () => {
  const { node } = await disk();
  const rig = makeRig([node]);
  for (
    const [reg, a, b] of [[REG.nsect, 0x12, 0x34], [REG.lbal, 0x56, 0x78], [REG.lbam, 0x9a, 0xbc], [
      REG.lbah,
      0xde,
      0xf0,
    ]]
  ) {
    outb(rig, PRI.cmd + reg!, a!);
    outb(rig, PRI.cmd + reg!, b!);
  }
  assert.equal(inb(rig, PRI.cmd + REG.lbal), 0x78);
  outb(rig, PRI.ctl, HOB);
  assert.equal(inb(rig, PRI.cmd + REG.nsect), 0x12);
  assert.equal(inb(rig, PRI.cmd + REG.lbal), 0x56);
  assert.equal(inb(rig, PRI.cmd + REG.lbam), 0x9a);
  assert.equal(inb(rig, PRI.cmd + REG.lbah), 0xde);
  // Any command-block write clears HOB.
  outb(rig, PRI.cmd + REG.feature, 0);
  assert.equal(inb(rig, PRI.cmd + REG.lbah), 0xf0);
  await rig.ide.close();
});

// ---- IDENTIFY ----------------------------------------------------------------------------------

Deno.test("IDENTIFY DEVICE: 256 words with capacity, LBA48, strings, DMA modes, cache, TRIM", async () => {
  const { node } = await disk(4 * MiB);
  const rig = makeRig([node, node], { model: "VSTOR TEST DISK" });
  issue(rig, 0xec);
  assert.equal(rig.lines[0], true, "INTRQ with the data");
  assert.equal(altStatus(rig), READY | DRQ);
  assert.equal(rig.lines[0], true, "alternate status does not acknowledge");
  assert.equal(status(rig), READY | DRQ);
  assert.equal(rig.lines[0], false, "status acknowledges");
  const id = new Uint16Array(readWords(rig).buffer);
  assert.equal(status(rig), READY, "DRQ drops after the 256th word");
  assert.equal(rig.ide.stats.dataPortAccesses, 256);
  const sectors = (4 * MiB) / 512;
  assert.equal(id[60]! | (id[61]! << 16), sectors);
  assert.equal(id[100]! + id[101]! * 65536, sectors);
  assert.equal(id[102], 0);
  assert.equal(id[83]! & 0xc400, 0x4400, "LBA48 supported, word valid");
  assert.equal(id[86]! & 0x0400, 0x0400, "LBA48 enabled");
  assert.equal(ataString(id, 27, 40), "VSTOR TEST DISK");
  assert.equal(ataString(id, 10, 20), "QM00001");
  assert.equal(ataString(id, 23, 8), "2.5+");
  assert.equal(id[47], 0x8010);
  assert.equal(id[49]! & 0x0300, 0x0300, "DMA and LBA");
  assert.equal(id[63]! & 0x07, 0x07);
  assert.equal(id[88], 0x203f, "UDMA 0-5 supported, 5 selected");
  assert.equal(id[82]! & 0x20, 0x20);
  assert.equal(id[85]! & 0x20, 0x20, "write cache on");
  assert.equal(id[169]! & 1, 1);
  assert.equal(id[105], 8);
  // The slave is a disk of its own: serial QM00002.
  const slave = await identify(rig, true);
  assert.equal(ataString(slave, 10, 20), "QM00002");
  await rig.ide.close();
});

Deno.test("IDENTIFY caps the LBA28 capacity and reports the full one in the LBA48 words", async () => {
  const sectors = 2 ** 33 + 5;
  const rig = makeRig([new NullNode(sectors * 512)]);
  const id = await identify(rig);
  assert.equal(id[60]! | (id[61]! << 16), 0x0fffffff);
  assert.equal(id[100]! + id[101]! * 2 ** 16 + id[102]! * 2 ** 32 + id[103]! * 2 ** 48, sectors);
  await rig.ide.close();
});

// ---- PIO ---------------------------------------------------------------------------------------

Deno.test("READ SECTORS: BSY while the image reads, then DRQ and INTRQ per sector; data matches", async () => {
  const { node, file } = await disk();
  const rig = makeRig([node]);
  issue(rig, 0x20, { lba: 100, count: 3 });
  assert.equal(altStatus(rig) & BSY, BSY);
  const image = file.contents();
  for (let s = 0; s < 3; s++) {
    await settle(rig);
    assert.equal(rig.lines[0], true, `INTRQ for sector ${s}`);
    assert.equal(status(rig), READY | DRQ);
    assert.deepEqual(readWords(rig), image.subarray((100 + s) * 512, (101 + s) * 512));
  }
  assert.equal(status(rig), READY);
  assert.equal(rig.raised[0], 3);
  assert.equal(rig.ide.stats.sectorsRead, 3);
  assert.equal(rig.ide.stats.dataPortAccesses, 3 * 256);
  await rig.ide.close();
});

Deno.test("READ SECTORS with count 0 moves 256 sectors; READ SECTORS EXT reaches past LBA28", async () => {
  const { node, file } = await disk();
  const rig = makeRig([node]);
  issue(rig, 0x20, { lba: 8, count: 0 });
  const got = new Uint8Array(256 * 512);
  for (let s = 0; s < 256; s++) {
    await settle(rig);
    assert.equal(status(rig), READY | DRQ);
    got.set(readWords(rig), s * 512);
  }
  assert.equal(status(rig), READY);
  assert.deepEqual(got, file.contents().subarray(8 * 512, 264 * 512));
  await rig.ide.close();

  // A disk of 2^29 sectors: LBA 2^28 + 7 is only reachable with READ SECTORS EXT.
  const big = new CountingNode(new NullNode(2 ** 29 * 512));
  const rig48 = makeRig([big]);
  issue(rig48, 0x24, { lba: 2 ** 28 + 7, count: 2, ext: true });
  await settle(rig48);
  assert.equal(status(rig48), READY | DRQ);
  assert.equal(big.calls[0]?.offset, (2 ** 28 + 7) * 512);
  assert.equal(big.calls[0]?.length, 1024);
  await rig48.ide.close();
});

Deno.test("WRITE SECTORS: DRQ without INTRQ for the first block, INTRQ after each; the image holds it", async () => {
  const { node, file } = await disk();
  const rig = makeRig([node]);
  const data = pattern(3 * 512, 9);
  issue(rig, 0x30, { lba: 40, count: 3 });
  assert.equal(altStatus(rig), READY | DRQ);
  assert.equal(rig.lines[0], false);
  for (let s = 0; s < 3; s++) {
    writeWords(rig, data.subarray(s * 512, (s + 1) * 512));
    assert.equal(altStatus(rig) & BSY, BSY, "BSY while the block is written");
    await settle(rig);
    assert.equal(rig.lines[0], true);
    assert.equal(status(rig), s < 2 ? READY | DRQ : READY);
  }
  assert.deepEqual(file.contents().subarray(40 * 512, 43 * 512), data);
  assert.equal(rig.ide.stats.sectorsWritten, 3);
  await rig.ide.close();
});

Deno.test("WRITE SECTORS EXT and READ SECTORS EXT round-trip through 32-bit data-port accesses", async () => {
  const { node } = await disk();
  const rig = makeRig([node]);
  const data = pattern(1024, 3);
  issue(rig, 0x34, { lba: 5000, count: 2, ext: true });
  for (let s = 0; s < 2; s++) {
    for (let i = 0; i < 512; i += 4) {
      const at = s * 512 + i;
      rig.bus.ioWrite(
        PRI.cmd,
        4,
        (data[at]! | data[at + 1]! << 8 | data[at + 2]! << 16 | data[at + 3]! << 24) >>> 0,
      );
    }
    await settle(rig);
    status(rig);
  }
  issue(rig, 0x24, { lba: 5000, count: 2, ext: true });
  const got = new Uint8Array(1024);
  for (let s = 0; s < 2; s++) {
    await settle(rig);
    assert.equal(status(rig), READY | DRQ);
    for (let i = 0; i < 512; i += 4) {
      new DataView(got.buffer).setUint32(s * 512 + i, rig.bus.ioRead(PRI.cmd, 4), true);
    }
  }
  assert.deepEqual(got, data);
  assert.equal(rig.ide.stats.dataPortAccesses, 512);
  await rig.ide.close();
});

Deno.test("READ/WRITE MULTIPLE move SET MULTIPLE MODE's block per interrupt; a bad count is aborted", async () => {
  const { node, file } = await disk();
  const rig = makeRig([node]);
  issue(rig, 0xc6, { count: 4 });
  assert.equal(status(rig), READY);
  assert.equal((await identify(rig))[59], 0x104);
  issue(rig, 0xc6, { count: 3 });
  assert.equal(status(rig), DRDY | ERR);
  assert.equal(error(rig), ABRT);
  const data = pattern(8 * 512, 4);
  const raised = rig.raised[0];
  issue(rig, 0xc5, { lba: 64, count: 8 });
  writeWords(rig, data.subarray(0, 2048));
  await settle(rig);
  assert.equal(status(rig), READY | DRQ);
  writeWords(rig, data.subarray(2048));
  await settle(rig);
  assert.equal(status(rig), READY);
  assert.equal(rig.raised[0] - raised, 2);
  issue(rig, 0xc4, { lba: 64, count: 8 });
  await settle(rig);
  assert.equal(status(rig), READY | DRQ);
  const first = readWords(rig, 1024);
  await settle(rig);
  assert.equal(status(rig), READY | DRQ);
  const second = readWords(rig, 1024);
  assert.equal(status(rig), READY);
  assert.deepEqual([...first, ...second], [...data]);
  assert.deepEqual(file.contents().subarray(64 * 512, 72 * 512), data);
  // Multiple mode off: READ MULTIPLE is aborted.
  issue(rig, 0xc6, { count: 0 });
  status(rig);
  issue(rig, 0xc4, { lba: 0, count: 1 });
  assert.equal(status(rig), DRDY | ERR);
  await rig.ide.close();
});

Deno.test("CHS addressing reads the sector LBA addressing names; sector 0 is IDNF", async () => {
  const { node, file } = await disk();
  const rig = makeRig([node]);
  // Cylinder 1, head 2, sector 3 → LBA (1 × 16 + 2) × 63 + 2.
  issue(rig, 0x20, { lba: 3 | (1 << 8), count: 1, device: 2 });
  await settle(rig);
  assert.equal(status(rig), READY | DRQ);
  const lba = (16 + 2) * 63 + 2;
  assert.deepEqual(readWords(rig), file.contents().subarray(lba * 512, (lba + 1) * 512));
  issue(rig, 0x20, { lba: 0, count: 1, device: 0 });
  assert.equal(status(rig), DRDY | ERR);
  assert.equal(error(rig), IDNF);
  await rig.ide.close();
});

// ---- Bus-master DMA --------------------------------------------------------------------------------

Deno.test("READ DMA over several PRDs fills guest RAM; BM status INTR, not active; ATA ready", async () => {
  const { node, file } = await disk();
  const rig = makeRig([node]);
  writePrd(rig, TABLE, [[BUF, 1024, false], [BUF + 0x8000, 3072, true]]);
  const { bm, status: st } = await dma(rig, 0xc8, { lba: 10, count: 8 }, true);
  assert.equal(bm & 0x07, 0x04, "INTR set, ERR and ACTIVE clear");
  assert.equal(st, READY);
  const image = file.contents();
  assert.deepEqual(rig.mem.slice(BUF, 1024), image.subarray(10 * 512, 12 * 512));
  assert.deepEqual(rig.mem.slice(BUF + 0x8000, 3072), image.subarray(12 * 512, 18 * 512));
  assert.equal(rig.ide.stats.dmaTransfers, 1);
  assert.equal(rig.ide.stats.dataPortAccesses, 0);
  await rig.ide.close();
});

Deno.test("WRITE DMA EXT with the bus master started first; the image holds the data", async () => {
  const { node, file } = await disk();
  const rig = makeRig([node]);
  const data = pattern(20 * 512, 5);
  rig.mem.write(BUF, data);
  writePrd(rig, TABLE, prdFor(BUF, data.length, 4096));
  bmSetup(rig, TABLE, false);
  bmStart(rig);
  assert.equal(inb(rig, rig.bm + 2) & 0x01, 0x01, "active, waiting for the disk");
  issue(rig, 0x35, { lba: 300, count: 20, ext: true });
  await settle(rig);
  assert.equal(rig.lines[0], true);
  const bm = bmStop(rig);
  assert.equal(bm & 0x07, 0x04);
  assert.equal(status(rig), READY);
  assert.deepEqual(file.contents().subarray(300 * 512, 320 * 512), data);
  await rig.ide.close();
});

Deno.test("a 2 MiB DMA read reaches the image in pieces of at most 1 MiB; a zero PRD count is 64 KiB", async () => {
  const { node, file } = await disk(8 * MiB);
  const counting = new CountingNode(node);
  const rig = makeRig([counting]);
  writePrd(rig, TABLE, prdFor(BUF, 2 * MiB).map(([a, _c, eot]) => [a, 0, eot] as const));
  const { bm } = await dma(rig, 0x25, { lba: 1000, count: 4096, ext: true }, true);
  assert.equal(bm & 0x07, 0x04);
  const reads = counting.calls.filter((c) => c.op === "read");
  assert.ok(reads.every((c) => c.length <= MiB), JSON.stringify(reads));
  assert.equal(reads.reduce((n, c) => n + c.length, 0), 2 * MiB);
  assert.deepEqual(
    rig.mem.slice(BUF, 2 * MiB),
    file.contents().subarray(1000 * 512, 1000 * 512 + 2 * MiB),
  );
  await rig.ide.close();
});

Deno.test("DMA waits for bus mastering to be enabled", async () => {
  const { node } = await disk();
  const rig = makeRig([node], { busMaster: false });
  writePrd(rig, TABLE, [[BUF, 512, true]]);
  bmSetup(rig, TABLE, true);
  issue(rig, 0xc8, { lba: 1, count: 1 });
  bmStart(rig);
  await settle(rig);
  assert.equal(rig.lines[0], false);
  assert.equal(altStatus(rig), READY | DRQ);
  assert.equal(rig.ide.stats.dmaTransfers, 0);
  rig.bus.configWrite(RIG_SLOT, 0x04, 2, 0x05);
  await settle(rig);
  assert.equal(rig.lines[0], true);
  assert.equal(bmStop(rig) & 0x07, 0x04);
  await rig.ide.close();
});

// ---- Other commands ------------------------------------------------------------------------------

Deno.test("FLUSH CACHE flushes the image; with the write cache off every write is flushed", async () => {
  const { node } = await disk();
  const counting = new CountingNode(node);
  const rig = makeRig([counting]);
  issue(rig, 0xe7);
  assert.equal(altStatus(rig) & BSY, BSY);
  await settle(rig);
  assert.equal(status(rig), READY);
  assert.equal(counting.flushes, 1);
  issue(rig, 0xea);
  await settle(rig);
  assert.equal(counting.flushes, 2);
  issue(rig, 0xef, { feature: 0x82 });
  assert.equal(status(rig), READY);
  assert.equal((await identify(rig))[85]! & 0x20, 0);
  issue(rig, 0x30, { lba: 0, count: 2 });
  for (let s = 0; s < 2; s++) {
    writeWords(rig, pattern(512, s));
    await settle(rig);
    status(rig);
  }
  assert.equal(counting.flushes, 4);
  rig.mem.write(BUF, pattern(512, 1));
  writePrd(rig, TABLE, [[BUF, 512, true]]);
  await dma(rig, 0xca, { lba: 3, count: 1 }, false);
  assert.equal(counting.flushes, 5);
  issue(rig, 0xef, { feature: 0x02 });
  status(rig);
  assert.equal((await identify(rig))[85]! & 0x20, 0x20);
  await rig.ide.close();
});

Deno.test("SET FEATURES transfer mode updates words 62/63/88; bad modes and subcommands abort", async () => {
  const { node } = await disk();
  const rig = makeRig([node]);
  issue(rig, 0xef, { feature: 0x03, count: 0x42 });
  assert.equal(status(rig), READY);
  const id = await identify(rig);
  assert.equal(id[88], 0x3f | (1 << 10));
  assert.equal(id[63], 0x07);
  issue(rig, 0xef, { feature: 0x03, count: 0x22 });
  status(rig);
  assert.equal((await identify(rig))[63], 0x07 | (1 << 10));
  for (const [feature, count] of [[0x03, 0x47], [0x03, 0x23], [0x55, 0]]) {
    issue(rig, 0xef, { feature: feature!, count: count! });
    assert.equal(status(rig), DRDY | ERR, `feature ${feature} count ${count}`);
    assert.equal(error(rig), ABRT);
  }
  await rig.ide.close();
});

Deno.test("DATA SET MANAGEMENT TRIM discards the listed ranges; a range past the end changes nothing", async () => {
  const { node } = await disk();
  const counting = new CountingNode(node);
  const rig = makeRig([counting]);
  const ranges = new DataView(new ArrayBuffer(512));
  const entry = (i: number, lba: number, count: number) => {
    ranges.setUint32(8 * i, lba, true);
    ranges.setUint16(8 * i + 4, 0, true);
    ranges.setUint16(8 * i + 6, count, true);
  };
  entry(0, 16, 8);
  entry(2, 100, 1);
  rig.mem.write(BUF, new Uint8Array(ranges.buffer));
  writePrd(rig, TABLE, [[BUF, 512, true]]);
  const ok = await dma(rig, 0x06, { feature: 0x01, count: 1, ext: true }, false);
  assert.equal(ok.status, READY);
  assert.deepEqual(
    counting.calls.filter((c) => c.op === "discard").map((c) => [c.offset, c.length]),
    [[16 * 512, 8 * 512], [100 * 512, 512]],
  );
  counting.clear();
  entry(1, 8191, 2);
  rig.mem.write(BUF, new Uint8Array(ranges.buffer));
  const bad = await dma(rig, 0x06, { feature: 0x01, count: 1, ext: true }, false);
  assert.equal(bad.status, DRDY | ERR);
  assert.equal(error(rig), IDNF);
  assert.equal(counting.discards, 0);
  // Without the TRIM bit, or with more blocks than word 105 allows: aborted at once.
  for (const tf of [{ feature: 0, count: 1 }, { feature: 1, count: 9 }, { feature: 1, count: 0 }]) {
    issue(rig, 0x06, { ...tf, ext: true });
    assert.equal(status(rig), DRDY | ERR);
    assert.equal(error(rig), ABRT);
  }
  await rig.ide.close();
});

Deno.test("EXECUTE DEVICE DIAGNOSTIC restores the signature; unknown commands and NOP abort", async () => {
  const { node } = await disk();
  const rig = makeRig([node]);
  issue(rig, 0x90, { lba: 0x123456, count: 9 });
  assert.equal(rig.lines[0], true);
  assert.equal(status(rig), READY);
  assert.equal(error(rig), 0x01);
  assert.deepEqual([2, 3, 4, 5].map((r) => inb(rig, PRI.cmd + r)), [1, 1, 0, 0]);
  for (const command of [0x00, 0xff, 0xa0, 0xb0]) {
    issue(rig, command);
    assert.equal(rig.lines[0], true);
    assert.equal(status(rig), DRDY | ERR, `command ${command}`);
    assert.equal(error(rig), ABRT);
  }
  assert.equal(rig.ide.stats.aborted, 4);
  await rig.ide.close();
});

// ---- Errors ------------------------------------------------------------------------------------

Deno.test("a range past the end of the disk is IDNF, PIO and DMA, and the image is untouched", async () => {
  const { node, file } = await disk(MiB);
  const rig = makeRig([node]);
  const before = file.contents();
  for (
    const [command, ext] of [[0x20, false], [0x30, false], [0x24, true], [0xc8, false], [
      0x35,
      true,
    ]] as const
  ) {
    issue(rig, command, { lba: 2047, count: 2, ext });
    assert.equal(rig.lines[0], true);
    assert.equal(status(rig), DRDY | ERR, `command ${command}`);
    assert.equal(error(rig), IDNF);
  }
  // The LBA28 range ends at sector 2048 exactly: fine.
  issue(rig, 0x20, { lba: 2047, count: 1 });
  await settle(rig);
  assert.equal(status(rig), READY | DRQ);
  readWords(rig);
  assert.deepEqual(file.contents(), before);
  assert.equal(rig.ide.stats.errors, 5);
  await rig.ide.close();
});

Deno.test("a failed image read is UNC with the sector in the LBA registers; a failed write is ABRT", async () => {
  const { node } = await disk();
  const counting = new CountingNode(node);
  counting.failAt = 77 * 512;
  const rig = makeRig([counting]);
  issue(rig, 0x20, { lba: 77, count: 1 });
  await settle(rig);
  assert.equal(status(rig), DRDY | ERR);
  assert.equal(error(rig), UNC);
  assert.equal(inb(rig, PRI.cmd + REG.lbal), 77);
  // The sectors before the bad one still come, then the error names the bad one.
  issue(rig, 0x20, { lba: 75, count: 4 });
  for (let s = 0; s < 2; s++) {
    await settle(rig);
    assert.equal(status(rig), READY | DRQ);
    readWords(rig);
  }
  await settle(rig);
  assert.equal(status(rig), DRDY | ERR);
  assert.equal(error(rig), UNC);
  assert.equal(inb(rig, PRI.cmd + REG.lbal), 77);
  writePrd(rig, TABLE, [[BUF, 4096, true]]);
  const read = await dma(rig, 0xc8, { lba: 72, count: 8 }, true);
  assert.equal(read.status, DRDY | ERR);
  assert.equal(error(rig), UNC);
  const write = await dma(rig, 0xca, { lba: 72, count: 8 }, false);
  assert.equal(write.status, DRDY | ERR);
  assert.equal(error(rig), ABRT);
  issue(rig, 0x30, { lba: 77, count: 1 });
  writeWords(rig, pattern(512, 1));
  await settle(rig);
  assert.equal(status(rig), DRDY | ERR);
  assert.equal(error(rig), ABRT);
  await rig.ide.close();
});

// ---- Hostile bus-master programming -----------------------------------------------------------------

/** A DMA write with `entries` at TABLE (or `table`) must fail cleanly, the image unchanged. */
async function refusedWrite(
  entries: readonly (readonly [number, number, boolean])[],
  why: RegExp,
  table = TABLE,
) {
  const { node, file } = await disk();
  const rig = makeRig([node]);
  const before = file.contents();
  rig.mem.fill(BUF, 256 * 1024, 0xee);
  writePrd(rig, table, entries);
  bmSetup(rig, table, false);
  issue(rig, 0xca, { lba: 0, count: 64 });
  bmStart(rig);
  await settle(rig);
  assert.equal(rig.lines[0], true, "interrupt");
  const bm = inb(rig, rig.bm + 2);
  assert.equal(bm & 0x07, 0x06, "ERR and INTR, not active");
  assert.equal(status(rig), DRDY | ERR);
  assert.equal(error(rig), ABRT);
  assert.match(rig.ide.lastDmaError(0), why);
  assert.deepEqual(file.contents(), before);
  assert.equal(rig.ide.stats.dmaErrors, 1);
  // The channel works afterwards.
  bmStop(rig);
  assert.equal((await identify(rig))[0], 0x40);
  await rig.ide.close();
}

Deno.test("a PRD table outside guest RAM is a bus-master error", async () => {
  await refusedWrite([], /outside guest RAM/, 0x7fff_fff0);
});

Deno.test("a PRD region outside guest RAM is a bus-master error", async () => {
  await refusedWrite(
    [[BUF, 16384, false], [0x7ff0_0000, 16384, true]],
    /region 0x7ff00000.*outside/,
  );
});

Deno.test("a PRD table whose EOT comes before the transfer's end is a bus-master error", async () => {
  await refusedWrite([[BUF, 16384, true]], /EOT\) 16384 bytes short/);
});

Deno.test("a PRD table without EOT that runs on is refused after 4096 descriptors", async () => {
  const entries = Array.from({ length: 4200 }, (_, i) => [BUF + 8 * i, 2, false] as const);
  await refusedWrite(entries, /no EOT within 4096/);
});

Deno.test("a PRD table that reaches a 64 KiB boundary without EOT is refused", async () => {
  const entries = Array.from({ length: 8 }, (_, i) => [BUF + 512 * i, 512, false] as const);
  await refusedWrite(entries, /crosses a 64 KiB boundary/, 0x1_0000 - 32);
});

Deno.test("a PRD region at an odd address is a bus-master error", async () => {
  await refusedWrite([[BUF + 1, 0, true]], /odd address/);
});

// ---- Busy channels and resets ----------------------------------------------------------------------

Deno.test("commands and task-file writes while BSY or DRQ are ignored; the first command completes", async () => {
  const { node, file } = await disk();
  const rig = makeRig([node]);
  issue(rig, 0x20, { lba: 5, count: 1 });
  assert.equal(altStatus(rig) & BSY, BSY);
  const ignored = rig.ide.stats.ignored;
  outb(rig, PRI.cmd + REG.lbal, 99);
  outb(rig, PRI.cmd + REG.cmd, 0xec);
  assert.equal(rig.ide.stats.ignored, ignored + 2);
  await settle(rig);
  assert.equal(status(rig), READY | DRQ);
  outb(rig, PRI.cmd + REG.cmd, 0x30);
  assert.deepEqual(readWords(rig), file.contents().subarray(5 * 512, 6 * 512));
  assert.equal(status(rig), READY);
  assert.equal(rig.ide.stats.commands, 1);
  await rig.ide.close();
});

Deno.test("SRST in the middle of a PIO read resets the channel: signature, no DRQ, ready again", async () => {
  const { node } = await disk();
  const rig = makeRig([node]);
  issue(rig, 0x20, { lba: 0, count: 4 });
  await settle(rig);
  status(rig);
  readWords(rig, 100);
  outb(rig, PRI.ctl, SRST | NIEN);
  assert.equal(altStatus(rig) & BSY, BSY);
  outb(rig, PRI.ctl, NIEN);
  await settle(rig);
  assert.equal(altStatus(rig), READY);
  assert.equal(error(rig), 0x01);
  assert.deepEqual([2, 3, 4, 5].map((r) => inb(rig, PRI.cmd + r)), [1, 1, 0, 0]);
  assert.equal(rig.bus.ioRead(PRI.cmd, 2), 0, "no data after the reset");
  outb(rig, PRI.ctl, 0);
  assert.equal((await identify(rig))[0], 0x40);
  await rig.ide.close();
});

Deno.test("SRST during a DMA transfer forgets it: no interrupt, bus master idle, channel ready", async () => {
  const { node, file } = await disk();
  const rig = makeRig([node]);
  const before = file.contents();
  writePrd(rig, TABLE, [[BUF, 4096, true]]);
  bmSetup(rig, TABLE, true);
  issue(rig, 0xc8, { lba: 0, count: 8 });
  bmStart(rig);
  outb(rig, PRI.ctl, SRST);
  outb(rig, PRI.ctl, 0);
  assert.equal(altStatus(rig) & BSY, BSY, "busy until the forgotten read settles");
  await settle(rig);
  assert.equal(altStatus(rig), READY);
  assert.equal(rig.lines[0], false);
  assert.equal(inb(rig, rig.bm + 2) & 0x07, 0);
  assert.equal(inb(rig, rig.bm), 0);
  assert.deepEqual(file.contents(), before);
  await rig.ide.close();
});

Deno.test("nIEN masks INTRQ; clearing it lets a pending interrupt through", async () => {
  const { node } = await disk();
  const rig = makeRig([node]);
  outb(rig, PRI.ctl, NIEN);
  issue(rig, 0xe7);
  await settle(rig);
  assert.equal(rig.lines[0], false);
  outb(rig, PRI.ctl, 0);
  assert.equal(rig.lines[0], true);
  status(rig);
  assert.equal(rig.lines[0], false);
  await rig.ide.close();
});

Deno.test("the secondary channel has its own disks, registers, line and bus master", async () => {
  const a = await disk(MiB, 1);
  const b = await disk(MiB, 2);
  const rig = makeRig([a.node, null, null, b.node]);
  outb(rig, SEC.cmd + REG.device, 0xb0);
  issue(rig, 0x20, { lba: 3, count: 1, slave: true }, SEC);
  await settle(rig);
  assert.deepEqual(rig.lines, [false, true]);
  assert.equal(status(rig, SEC), READY | DRQ);
  assert.deepEqual(readWords(rig, 256, SEC), b.file.contents().subarray(1536, 2048));
  writePrd(rig, TABLE, [[BUF, 512, true]]);
  bmSetup(rig, TABLE, true, 1);
  issue(rig, 0xc8, { lba: 4, count: 1, slave: true }, SEC);
  bmStart(rig, 1);
  await settle(rig);
  assert.equal(bmStop(rig, 1) & 0x07, 0x04);
  assert.equal(inb(rig, rig.bm + 2) & 0x07, 0, "the primary bus master saw nothing");
  assert.deepEqual(rig.mem.slice(BUF, 512), b.file.contents().subarray(2048, 2560));
  await rig.ide.close();
});

Deno.test("reset() returns config and channels to power-on values, forgetting I/O in flight", async () => {
  const { node } = await disk();
  const rig = makeRig([node]);
  issue(rig, 0x20, { lba: 0, count: 1 });
  rig.ide.reset();
  assert.equal(rig.bus.configRead(RIG_SLOT, 0x04, 2), 0);
  assert.equal(rig.bus.configRead(RIG_SLOT, 0x20, 4), 1);
  await settle(rig);
  rig.bus.assignBars({ base: 0xc000_0000, size: 0x1000_0000 });
  assert.equal(status(rig), READY);
  assert.equal(rig.lines[0], false);
  await rig.ide.close();
});

Deno.test("port accesses of every width at every controller port never throw", async () => {
  const { node } = await disk();
  const rig = makeRig([node, null, node]);
  const ports = [
    ...Array.from({ length: 8 }, (_, i) => PRI.cmd + i),
    ...Array.from({ length: 8 }, (_, i) => SEC.cmd + i),
    PRI.ctl,
    SEC.ctl,
    ...Array.from({ length: 16 }, (_, i) => rig.bm + i),
  ];
  const rand = mulberry32(20);
  console.log("seed 20");
  for (let i = 0; i < 5000; i++) {
    const port = ports[Math.floor(rand() * ports.length)]!;
    const size = ([1, 2, 4] as const)[Math.floor(rand() * 3)]!;
    if (rand() < 0.5) rig.bus.ioRead(port, size);
    else rig.bus.ioWrite(port, size, Math.floor(rand() * 2 ** 32));
    if (i % 100 === 0) await settle(rig);
  }
  await rig.ide.close();
});

Deno.test("random PIO and DMA reads and writes agree with a model of the disk (seed 7)", async () => {
  const seed = 7;
  console.log(`seed ${seed}`);
  const rand = mulberry32(seed);
  const { node, file } = await disk(MiB);
  const model = file.contents();
  const rig = makeRig([node]);
  for (let i = 0; i < 60; i++) {
    const count = 1 + Math.floor(rand() * 16);
    const lba = Math.floor(rand() * (2048 - count));
    const useDma = rand() < 0.5;
    if (rand() < 0.5) {
      const data = pattern(count * 512, i);
      if (useDma) {
        rig.mem.write(BUF, data);
        writePrd(rig, TABLE, prdFor(BUF, data.length, 1024 * (1 + Math.floor(rand() * 8))));
        assert.equal((await dma(rig, 0xca, { lba, count }, false)).status, READY);
      } else {
        issue(rig, 0x30, { lba, count });
        for (let s = 0; s < count; s++) {
          writeWords(rig, data.subarray(s * 512, (s + 1) * 512));
          await settle(rig);
          status(rig);
        }
      }
      model.set(data, lba * 512);
    } else {
      let got: Uint8Array;
      if (useDma) {
        writePrd(rig, TABLE, prdFor(BUF, count * 512, 2048));
        assert.equal((await dma(rig, 0xc8, { lba, count }, true)).status, READY);
        got = rig.mem.slice(BUF, count * 512).slice();
      } else {
        issue(rig, 0x20, { lba, count });
        got = new Uint8Array(count * 512);
        for (let s = 0; s < count; s++) {
          await settle(rig);
          status(rig);
          got.set(readWords(rig), s * 512);
        }
      }
      assert.deepEqual(got, model.subarray(lba * 512, (lba + count) * 512), `step ${i}`);
    }
  }
  assert.deepEqual(file.contents(), model);
  await rig.ide.close();
});

// ---- Interop -------------------------------------------------------------------------------------

Deno.test({
  name: "writes through IDE into a qcow2 image read back with qemu-io, and qemu-img check is clean",
  ignore: ignoreWithout("qemu-img") || ignoreWithout("qemu-io"),
  fn: async () => {
    const dir = await Deno.makeTempDir();
    try {
      const path = `${dir}/ide.qcow2`;
      await createImage(path, "qcow2", 16 * MiB);
      const node = await openImage(path, { format: "qcow2" });
      const rig = makeRig([node]);
      rig.mem.fill(BUF, 192 * 1024, 0xab);
      writePrd(rig, TABLE, prdFor(BUF, 192 * 1024));
      const done = await dma(rig, 0x35, { lba: 2048, count: 384, ext: true }, false);
      assert.equal(done.status, READY);
      issue(rig, 0x30, { lba: 10000, count: 2 });
      for (let s = 0; s < 2; s++) {
        writeWords(rig, new Uint8Array(512).fill(0xcd));
        await settle(rig);
        status(rig);
      }
      issue(rig, 0xe7);
      await settle(rig);
      assert.equal(status(rig), READY);
      await rig.ide.close();
      await node.close();
      const io = await runTool("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        `read -P 0xab ${2048 * 512} ${192 * 1024}`,
        "-c",
        `read -P 0xcd ${10000 * 512} 1024`,
        "-c",
        `read -P 0 ${10002 * 512} 512`,
        path,
      ]);
      assert.equal(io.code, 0, io.stderr);
      assert.doesNotMatch(io.stdout, /Pattern verification failed/);
      const check = await runTool("qemu-img", ["check", "-f", "qcow2", path]);
      assert.equal(check.code, 0, check.stdout + check.stderr);
      assert.match(check.stdout, /No errors were found/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("IdeController refuses more than four drives and over-long IDENTIFY strings", () => {
  const memory = new GuestMemory([{ gpa: 0, size: 4096 }]);
  const irq = () => {};
  assert.throws(
    () => new IdeController({ drives: [null, null, null, null, null], memory, irq }),
    RangeError,
  );
  assert.throws(
    () => new IdeController({ drives: [], memory, irq, model: "x".repeat(41) }),
    RangeError,
  );
  assert.throws(
    () => new IdeController({ drives: [], memory, irq, serial: "x".repeat(21) }),
    RangeError,
  );
});
