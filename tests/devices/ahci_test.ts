/**
 * The emulated AHCI HBA (ich9-ahci) as a guest sees it through registers and guest RAM: identity,
 * reset values, IDENTIFY, DMA and NCQ data paths, interrupts, and what hostile command lists,
 * tables and PRDTs come to (an error status or an ignored command, never a throw, the image
 * unharmed).
 */

import { WrappedNode } from "../block/wrapped_node.ts";
import assert from "node:assert/strict";
import { join } from "node:path";
import { createImage, openImage } from "../../formats/open.ts";
import { AhciController } from "../../src/devices/ahci.ts";
import {
  AHCI_VERSION_1_0,
  HOST_AHCI_EN,
  HOST_CAP,
  HOST_CAP_64,
  HOST_CAP_NCQ,
  HOST_CTL,
  HOST_IRQ_EN,
  HOST_IRQ_STAT,
  HOST_PORTS_IMPL,
  HOST_RESET,
  HOST_VERSION,
  PORT_CMD,
  PORT_CMD_FIS_ON,
  PORT_CMD_FIS_RX,
  PORT_CMD_ISSUE,
  PORT_CMD_LIST_ON,
  PORT_CMD_START,
  PORT_IRQ_D2H_REG_FIS,
  PORT_IRQ_HBUS_ERR,
  PORT_IRQ_MASK,
  PORT_IRQ_OVERFLOW,
  PORT_IRQ_PIOS_FIS,
  PORT_IRQ_SDB_FIS,
  PORT_IRQ_STAT,
  PORT_IRQ_TF_ERR,
  PORT_LST_ADDR,
  PORT_SCR_ACT,
  PORT_SCR_CTL,
  PORT_SCR_STAT,
  PORT_SIG,
  PORT_TFDATA,
} from "../../src/ata/ahci_constants.ts";
import {
  ATA_ABORTED,
  ATA_ID_PROD,
  ATA_ID_SERNO,
  ATA_IDNF,
  ATA_UNC,
} from "../../src/ata/constants.ts";
import { readIdentifyString } from "../../src/devices/sata_identify.ts";
import type { BlockNode } from "../../src/block/node.ts";
import { BlockError } from "../../src/errors.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import { RawNode } from "../../formats/raw.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import { mulberry32 } from "../prng.ts";
import { ignoreWithout, runTool } from "../interop/qemu.ts";
import {
  AHCI_SLOT,
  AhciRig,
  clbOf,
  DATA_BASE,
  dmaExt,
  fbOf,
  fpdma,
  MSI_VECTOR,
  tableOf,
} from "./ahci_harness.ts";

const P0 = 0;

function u16(mem: GuestMemory, gpa: number, word: number): number {
  return mem.u16(gpa + word * 2);
}

/** Runs IDENTIFY DEVICE in slot `slot` into `DATA_BASE`. */
async function identify(rig: AhciRig, slot = 0): Promise<Uint8Array> {
  rig.command(P0, slot, { command: 0xec }, [{ address: DATA_BASE, bytes: 512 }]);
  rig.issue(P0, 1 << slot);
  await rig.settle();
  return rig.mem.slice(DATA_BASE, 512).slice();
}

/** Acknowledges everything, as a driver's interrupt handler would. */
function ack(rig: AhciRig, p = P0): number {
  const is = rig.port(p, PORT_IRQ_STAT);
  rig.setPort(p, PORT_IRQ_STAT, is);
  rig.setReg(HOST_IRQ_STAT, 1 << p);
  return is;
}

Deno.test("ich9-ahci shows QEMU's PCI identity, BAR5 and an MSI capability", async () => {
  const rig = await AhciRig.create({ msi: false });
  const bus = rig.bus;
  assert.equal(bus.configRead(AHCI_SLOT, 0, 2), 0x8086);
  assert.equal(bus.configRead(AHCI_SLOT, 2, 2), 0x2922);
  assert.equal(bus.configRead(AHCI_SLOT, 0x08, 1), 0x02, "revision");
  assert.equal(bus.configRead(AHCI_SLOT, 0x09, 1), 0x01, "prog-if AHCI");
  assert.equal(bus.configRead(AHCI_SLOT, 0x0a, 2), 0x0106, "class SATA");
  assert.equal(bus.configRead(AHCI_SLOT, 0x3d, 1), 1, "INTA#");
  assert.ok(rig.abar >= 0xc000_0000 && rig.abar % 4096 === 0, "BAR5 placed and aligned");
  for (const bar of [0, 1, 2, 3, 4]) assert.equal(rig.ctrl.barSize(bar), 0);
  assert.equal(rig.ctrl.barSize(5), 4096);
  // Sizing BAR5 as firmware does: all-ones reads back the size mask.
  const old = bus.configRead(AHCI_SLOT, 0x24, 4);
  bus.configWrite(AHCI_SLOT, 0x24, 4, 0xffffffff);
  assert.equal(bus.configRead(AHCI_SLOT, 0x24, 4) >>> 0, 0xfffff000);
  bus.configWrite(AHCI_SLOT, 0x24, 4, old);
  // Capability list: 0x34 → MSI at 0x80, the end.
  assert.equal(bus.configRead(AHCI_SLOT, 0x06, 2) & 0x10, 0x10);
  assert.equal(bus.configRead(AHCI_SLOT, 0x34, 1), 0x80);
  assert.equal(bus.configRead(AHCI_SLOT, 0x80, 1), 0x05);
  assert.equal(bus.configRead(AHCI_SLOT, 0x81, 1), 0x00);
  assert.equal(bus.configRead(AHCI_SLOT, 0x82, 2), 0x0080, "64-bit, one message, disabled");
  // Read-only bits stay: the vendor id and MSI's 64-bit flag ignore writes.
  bus.configWrite(AHCI_SLOT, 0, 4, 0);
  bus.configWrite(AHCI_SLOT, 0x82, 2, 0xffff);
  assert.equal(bus.configRead(AHCI_SLOT, 0, 4), 0x2922_8086);
  assert.equal(bus.configRead(AHCI_SLOT, 0x82, 2), 0x0081);
  assert.equal(rig.ctrl.msiEnabled, true);
  // Bad config accesses read all-ones and are dropped, never thrown.
  assert.equal(rig.ctrl.configRead(0x101, 2), 0xffff);
  assert.equal(rig.ctrl.configRead(3, 4), 0xffffffff);
  rig.ctrl.configWrite(255, 4, 0);
});

Deno.test("HBA registers after reset: CAP, GHC, PI, VS and the ports' SIG, SSTS, TFD", async () => {
  const rig = await AhciRig.create({
    drives: [
      await RawNode.open(new MemoryFile("a", new Uint8Array(1 << 20))),
      null,
      await RawNode.open(new MemoryFile("c", new Uint8Array(1 << 20))),
    ],
  });
  const cap = rig.reg(HOST_CAP);
  assert.ok((cap & HOST_CAP_64) !== 0, "S64A");
  assert.ok((cap & HOST_CAP_NCQ) !== 0, "SNCQ");
  assert.equal((cap >>> 8) & 0x1f, 31, "NCS: 32 slots");
  assert.equal(cap & 0x1f, 2, "NP: 3 ports");
  assert.equal(cap & (1 << 27), 0, "no staggered spin-up");
  assert.equal(rig.reg(HOST_CTL) >>> 0, HOST_AHCI_EN);
  assert.equal(rig.reg(HOST_PORTS_IMPL), 0b111);
  assert.equal(rig.reg(HOST_VERSION), AHCI_VERSION_1_0);
  assert.equal(rig.reg(HOST_IRQ_STAT), 0);
  assert.equal(rig.port(0, PORT_SIG), 0x101, "a disk");
  assert.equal(rig.port(0, PORT_SCR_STAT), 0x113, "DET=3 SPD=1 IPM=1");
  assert.equal(rig.port(0, PORT_TFDATA) & 0xff, 0x50);
  assert.equal(rig.port(0, PORT_CMD) & 0b110, 0b110, "SUD and POD read 1");
  assert.equal(rig.port(1, PORT_SIG) >>> 0, 0xffffffff, "no device");
  assert.equal(rig.port(1, PORT_SCR_STAT), 0);
  assert.equal(rig.port(1, PORT_TFDATA), 0x7f);
  assert.equal(rig.port(2, PORT_SIG), 0x101);
  // A port past NP and the reserved host registers read 0.
  assert.equal(rig.reg(0x100 + 5 * 0x80 + 0x24), 0);
  assert.equal(rig.reg(0x2c), 0);
  assert.throws(() => new AhciController({ ...baseInit(rig.mem), drives: [] }), RangeError);
  assert.throws(
    () => new AhciController({ ...baseInit(rig.mem), drives: new Array(7).fill(null) }),
    RangeError,
  );
});

function baseInit(memory: GuestMemory) {
  return { memory, msi: () => {}, intx: () => {} };
}

Deno.test("byte and word accesses read and merge dword registers as hardware does", async () => {
  const rig = await AhciRig.create();
  const bus = rig.bus;
  const px = rig.abar + 0x100;
  // CAP's bytes one by one.
  const cap = rig.reg(HOST_CAP);
  for (let i = 0; i < 4; i++) assert.equal(bus.mmioRead(rig.abar + i, 1), (cap >>> (8 * i)) & 0xff);
  assert.equal(bus.mmioRead(rig.abar + 2, 2), cap >>> 16);
  // A byte write to PxCLB's byte 1 keeps the other bytes; bits 0..9 stay 0.
  rig.setPort(0, PORT_LST_ADDR, 0x1234_5400);
  bus.mmioWrite(px + PORT_LST_ADDR + 2, 1, 0xab);
  assert.equal(rig.port(0, PORT_LST_ADDR) >>> 0, 0x12ab_5400);
  bus.mmioWrite(px + PORT_LST_ADDR, 2, 0xffff);
  assert.equal(rig.port(0, PORT_LST_ADDR) >>> 0, 0x12ab_fc00);
  // PxIS is write-1-to-clear: a byte write clears only the bits of that byte.
  rig.setPort(0, PORT_CMD, PORT_CMD_FIS_RX); // posts the signature D2H: DHRS
  rig.setPort(0, PORT_IRQ_MASK, 0xffffffff);
  assert.equal(rig.port(0, PORT_IRQ_STAT), PORT_IRQ_D2H_REG_FIS);
  bus.mmioWrite(px + PORT_IRQ_STAT + 1, 1, 0xff);
  assert.equal(rig.port(0, PORT_IRQ_STAT), PORT_IRQ_D2H_REG_FIS, "byte 1 cleared nothing");
  bus.mmioWrite(px + PORT_IRQ_STAT, 1, 0x01);
  assert.equal(rig.port(0, PORT_IRQ_STAT), 0);
  // A misaligned dword read straddling two registers combines their bytes.
  const straddle = bus.mmioRead(rig.abar + 0x0e, 2);
  assert.equal(straddle, (rig.reg(0x0c) >>> 16) & 0xffff);
  // Out-of-range and bad-width accesses: all-ones, dropped.
  assert.equal(rig.ctrl.mmioRead(5, 4094, 4), 0xffffffff);
  assert.equal(rig.ctrl.mmioRead(5, 0, 3), 0xffffffff);
  assert.equal(rig.ctrl.mmioRead(0, 0, 4), 0xffffffff);
  rig.ctrl.mmioWrite(5, 4096, 4, 1);
  rig.ctrl.mmioWrite(5, -4, 4, 1);
});

Deno.test("IDENTIFY DEVICE returns QEMU's strings, capacity, NCQ depth 32 and TRIM", async () => {
  const rig = await AhciRig.create({ diskBytes: 3 * 1024 * 1024 });
  rig.startPort(P0);
  assert.equal(rig.msis.length, 0, "the signature D2H came before PxIE: no interrupt");
  assert.equal(rig.reg(HOST_IRQ_STAT), 0);
  const data = await identify(rig);
  const mem = rig.mem;
  assert.equal(readIdentifyString(data, ATA_ID_PROD, 40), "QEMU HARDDISK");
  assert.equal(readIdentifyString(data, ATA_ID_SERNO, 20), "QM00001");
  assert.equal(readIdentifyString(data, 23, 8), "2.5+");
  assert.equal(u16(mem, DATA_BASE, 0), 0x0040);
  assert.equal(u16(mem, DATA_BASE, 60) + u16(mem, DATA_BASE, 61) * 65536, 6144);
  assert.equal(u16(mem, DATA_BASE, 100), 6144);
  assert.equal(u16(mem, DATA_BASE, 101), 0);
  assert.equal(u16(mem, DATA_BASE, 75), 31, "queue depth 32");
  assert.equal(u16(mem, DATA_BASE, 76) & 0x100, 0x100, "NCQ");
  assert.equal(u16(mem, DATA_BASE, 83) & 0x3400, 0x3400, "LBA48, FLUSH CACHE (EXT)");
  assert.equal(u16(mem, DATA_BASE, 85) & 0x20, 0x20, "write cache on");
  assert.equal(u16(mem, DATA_BASE, 169) & 1, 1, "TRIM");
  // PIO data-in: a PIO Setup FIS with I and E_Status, PRDBC = 512, PSS, one MSI.
  assert.equal(mem.u8(fbOf(P0) + 0x20), 0x5f);
  assert.equal(mem.u8(fbOf(P0) + 0x21), 0x60);
  assert.equal(mem.u8(fbOf(P0) + 0x2f), 0x50);
  assert.equal(mem.u16(fbOf(P0) + 0x30), 512);
  assert.equal(mem.u32(clbOf(P0) + 4), 512);
  assert.equal(rig.port(P0, PORT_CMD_ISSUE), 0);
  assert.equal(rig.port(P0, PORT_IRQ_STAT), PORT_IRQ_PIOS_FIS);
  assert.deepEqual(rig.msis, [MSI_VECTOR]);
  assert.equal(rig.reg(HOST_IRQ_STAT), 1);
  // The signature D2H FIS from the FRE edge is in the receive area too.
  assert.equal(mem.u8(fbOf(P0) + 0x40), 0x34);
});

Deno.test("SET FEATURES turns the write cache off and on; unknown subcommands abort", async () => {
  const rig = await AhciRig.create();
  rig.startPort(P0);
  rig.command(P0, 1, { command: 0xef, features: 0x82 }, []);
  rig.issue(P0, 2);
  await rig.settle();
  assert.equal(rig.port(P0, PORT_CMD_ISSUE), 0);
  assert.equal(u16(rig.mem, DATA_BASE, 85), 0, "nothing read yet");
  const off = await identify(rig, 2);
  assert.equal(new DataView(off.buffer).getUint16(85 * 2, true) & 0x20, 0);
  rig.command(P0, 1, { command: 0xef, features: 0x02 }, []);
  rig.issue(P0, 2);
  const on = await identify(rig, 2);
  assert.equal(new DataView(on.buffer).getUint16(85 * 2, true) & 0x20, 0x20);
  ack(rig);
  rig.command(P0, 3, { command: 0xef, features: 0x66 }, []);
  rig.issue(P0, 8);
  await rig.settle();
  assert.ok((rig.port(P0, PORT_IRQ_STAT) & PORT_IRQ_TF_ERR) !== 0);
  assert.equal(rig.port(P0, PORT_TFDATA), (ATA_ABORTED << 8) | 0x41);
});

Deno.test("READ and WRITE DMA EXT move the disk's bytes through a multi-entry PRDT", async () => {
  const rig = await AhciRig.create();
  rig.startPort(P0);
  ack(rig);
  // Read 8 sectors at LBA 10 through three scattered PRDs.
  const prds = [
    { address: DATA_BASE + 0x10000, bytes: 1024 },
    { address: DATA_BASE + 0x30000, bytes: 2048 },
    { address: DATA_BASE + 0x20000, bytes: 1024 },
  ];
  rig.command(P0, 0, dmaExt(false, 10, 8), prds);
  rig.issue(P0, 1);
  assert.equal(rig.port(P0, PORT_CMD_ISSUE), 1, "a non-queued command keeps its CI bit");
  await rig.settle();
  assert.equal(rig.port(P0, PORT_CMD_ISSUE), 0);
  const expect = rig.disk(0, 10 * 512, 4096);
  const got = new Uint8Array(4096);
  let at = 0;
  for (const prd of prds) {
    got.set(rig.mem.slice(prd.address, prd.bytes), at);
    at += prd.bytes;
  }
  assert.deepEqual(got, expect);
  assert.equal(rig.mem.u32(clbOf(P0) + 4), 4096, "PRDBC");
  assert.equal(ack(rig), PORT_IRQ_D2H_REG_FIS);
  assert.equal(rig.mem.u8(fbOf(P0) + 0x40), 0x34);
  assert.equal(rig.mem.u8(fbOf(P0) + 0x42), 0x50);
  // Write them back elsewhere (LBA 100) with a pattern.
  rig.mem.fill(DATA_BASE, 4096, 0xa5);
  rig.command(P0, 5, dmaExt(true, 100, 8), [{ address: DATA_BASE, bytes: 4096 }], { write: true });
  rig.issue(P0, 1 << 5);
  await rig.settle();
  assert.deepEqual(rig.disk(0, 100 * 512, 4096), new Uint8Array(4096).fill(0xa5));
  assert.equal(rig.disk(0, 108 * 512, 1)[0], (108 * 512 * 7) & 0xff, "nothing past the end");
  assert.equal(rig.ctrl.stats.sectorsRead, 8);
  assert.equal(rig.ctrl.stats.sectorsWritten, 8);
  // LBA28 READ DMA too.
  rig.command(P0, 6, { command: 0xc8, lba: 3, count: 1, device: 0x40 }, [
    { address: DATA_BASE + 0x40000, bytes: 512 },
  ]);
  rig.issue(P0, 1 << 6);
  await rig.settle();
  assert.deepEqual(rig.mem.slice(DATA_BASE + 0x40000, 512), rig.disk(0, 3 * 512, 512));
});

Deno.test("32 NCQ tags on one doorbell complete with PxSACT clear, one SDB FIS and the right data", async () => {
  const rig = await AhciRig.create();
  rig.startPort(P0);
  ack(rig);
  rig.msis.length = 0;
  // Even tags write, odd tags read, each 4 KiB at its own LBA.
  for (let tag = 0; tag < 32; tag++) {
    const write = tag % 2 === 0;
    const buf = DATA_BASE + tag * 0x1000;
    if (write) rig.mem.fill(buf, 4096, 0x80 + tag);
    rig.command(P0, tag, fpdma(write, tag, tag * 16, 8), [{ address: buf, bytes: 4096 }], {
      write,
    });
  }
  rig.issueQueued(P0, 0xffffffff);
  assert.equal(rig.port(P0, PORT_CMD_ISSUE), 0, "queued commands leave PxCI at once");
  assert.equal(rig.port(P0, PORT_SCR_ACT) >>> 0, 0xffffffff);
  await rig.settle();
  assert.equal(rig.port(P0, PORT_SCR_ACT), 0);
  assert.equal(rig.ctrl.stats.ncqCommands, 32);
  assert.equal(rig.ctrl.stats.sdbFises, 1, "one Set Device Bits FIS for the batch");
  assert.deepEqual(rig.msis, [MSI_VECTOR], "one interrupt for the batch");
  assert.equal(rig.mem.u8(fbOf(P0) + 0x58), 0xa1);
  assert.equal(rig.mem.u32(fbOf(P0) + 0x5c) >>> 0, 0xffffffff, "SActive field: every tag");
  assert.equal(ack(rig) & PORT_IRQ_SDB_FIS, PORT_IRQ_SDB_FIS);
  for (let tag = 0; tag < 32; tag++) {
    const buf = DATA_BASE + tag * 0x1000;
    if (tag % 2 === 0) {
      assert.deepEqual(rig.disk(0, tag * 16 * 512, 4096), new Uint8Array(4096).fill(0x80 + tag));
    } else {
      assert.deepEqual(rig.mem.slice(buf, 4096), rig.disk(0, tag * 16 * 512, 4096));
    }
  }
  assert.equal(rig.ctrl.stats.doorbells, 1);
});

/** A node that finishes each I/O after a random number of event-loop turns (fixed seed). */
class ShuffledNode extends WrappedNode {
  readonly order: number[] = [];
  readonly #random: () => number;
  constructor(inner: BlockNode, seed: number) {
    super(inner, "shuffled");
    this.#random = mulberry32(seed);
  }
  async #delay(): Promise<void> {
    const turns = Math.floor(this.#random() * 4);
    for (let i = 0; i < turns; i++) await new Promise((r) => setTimeout(r, 0));
  }
  override async read(offset: number, dst: Uint8Array): Promise<void> {
    await this.#delay();
    await this.inner.read(offset, dst);
    this.order.push(offset);
  }
  override async write(offset: number, src: Uint8Array): Promise<void> {
    await this.#delay();
    await this.inner.write(offset, src);
    this.order.push(offset);
  }
}

Deno.test("NCQ completions may come out of order and in several SDB FISes (seed 0x5eed01)", async () => {
  const file = new MemoryFile("d", new Uint8Array(1 << 20).map((_, i) => i & 0xff));
  const node = new ShuffledNode(await RawNode.open(file), 0x5eed01);
  const rig = await AhciRig.create({ drives: [node] });
  rig.startPort(P0);
  ack(rig);
  for (let tag = 0; tag < 16; tag++) {
    rig.command(P0, tag, fpdma(false, tag, tag, 1), [{
      address: DATA_BASE + tag * 512,
      bytes: 512,
    }]);
  }
  rig.issueQueued(P0, 0xffff);
  await rig.settle();
  assert.equal(rig.port(P0, PORT_SCR_ACT), 0);
  assert.notDeepEqual(node.order, node.order.toSorted((a, b) => a - b), "completion order differs");
  assert.ok(rig.ctrl.stats.sdbFises > 1 && rig.ctrl.stats.sdbFises <= 16);
  for (let tag = 0; tag < 16; tag++) {
    assert.deepEqual(
      rig.mem.slice(DATA_BASE + tag * 512, 512),
      file.contents().subarray(tag * 512, tag * 512 + 512),
    );
  }
});

Deno.test("FLUSH CACHE EXT and DATA SET MANAGEMENT TRIM complete with a D2H FIS", async () => {
  const rig = await AhciRig.create();
  rig.startPort(P0);
  ack(rig);
  rig.command(P0, 0, { command: 0xea }, []);
  rig.issue(P0, 1);
  await rig.settle();
  assert.equal(ack(rig), PORT_IRQ_D2H_REG_FIS);
  // TRIM two ranges: LBA 8 × 4 sectors and LBA 2048 × 16.
  const ranges = DATA_BASE;
  rig.mem.fill(ranges, 512, 0);
  rig.mem.setU32(ranges, 8);
  rig.mem.setU32(ranges + 4, 4 << 16);
  rig.mem.setU32(ranges + 8, 2048);
  rig.mem.setU32(ranges + 12, 16 << 16);
  rig.command(P0, 1, { command: 0x06, features: 1, count: 1 }, [{ address: ranges, bytes: 512 }], {
    write: true,
  });
  rig.issue(P0, 2);
  await rig.settle();
  assert.equal(ack(rig), PORT_IRQ_D2H_REG_FIS);
  assert.deepEqual(rig.disk(0, 8 * 512, 2048), new Uint8Array(2048), "trimmed reads zero");
  assert.deepEqual(rig.disk(0, 2048 * 512, 8192), new Uint8Array(8192));
  assert.equal(rig.disk(0, 12 * 512, 1)[0], (12 * 512 * 7) & 0xff, "the neighbour is untouched");
  // A range past the end: IDNF, and nothing trimmed.
  rig.mem.setU32(ranges, 100);
  rig.mem.setU32(ranges + 4, 1 << 16);
  rig.mem.setU32(ranges + 8, 8191);
  rig.mem.setU32(ranges + 12, 2 << 16);
  rig.issue(P0, 2);
  await rig.settle();
  assert.ok((ack(rig) & PORT_IRQ_TF_ERR) !== 0);
  assert.equal(rig.port(P0, PORT_TFDATA) >>> 8, ATA_IDNF);
  assert.notDeepEqual(rig.disk(0, 100 * 512, 512), new Uint8Array(512));
});

Deno.test("without MSI the HBA drives INTx from GHC.IE and IS, and the acks lower it", async () => {
  const rig = await AhciRig.create({ msi: false });
  assert.equal(rig.ctrl.msiEnabled, false);
  rig.setPort(P0, PORT_LST_ADDR, clbOf(P0));
  rig.setPort(P0, 0x08, fbOf(P0));
  rig.setPort(P0, PORT_IRQ_MASK, 0xffffffff);
  rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX | PORT_CMD_START);
  assert.equal(rig.intx, false, "GHC.IE is off");
  assert.equal(rig.reg(HOST_IRQ_STAT), 1, "IS is set all the same");
  rig.setReg(HOST_CTL, HOST_IRQ_EN);
  assert.equal(rig.intx, true);
  assert.equal(rig.bus.configRead(AHCI_SLOT, 0x06, 2) & 0x08, 0x08, "PCI interrupt status");
  // INTx Disable lowers the line; clearing it raises it again.
  rig.bus.configWrite(AHCI_SLOT, 0x04, 2, rig.bus.configRead(AHCI_SLOT, 0x04, 2) | 0x400);
  assert.equal(rig.intx, false);
  rig.bus.configWrite(AHCI_SLOT, 0x04, 2, rig.bus.configRead(AHCI_SLOT, 0x04, 2) & ~0x400);
  assert.equal(rig.intx, true);
  // PxIS first, then IS: the line drops only when both are clear.
  rig.setPort(P0, PORT_IRQ_STAT, 0xffffffff);
  assert.equal(rig.intx, true);
  rig.setReg(HOST_IRQ_STAT, 1);
  assert.equal(rig.intx, false);
  await identify(rig);
  assert.equal(rig.intx, true);
  ack(rig);
  assert.equal(rig.intx, false);
  assert.deepEqual(rig.msis, []);
});

Deno.test("an IS ack with causes still pending asks again: no interrupt is lost", async () => {
  const rig = await AhciRig.create();
  rig.startPort(P0);
  ack(rig);
  rig.msis.length = 0;
  await identify(rig);
  assert.equal(rig.msis.length, 1);
  // The driver read PxIS, and a second command completed before it acknowledged IS.
  const seen = rig.port(P0, PORT_IRQ_STAT);
  rig.setPort(P0, PORT_IRQ_STAT, seen);
  await identify(rig, 1);
  assert.equal(rig.msis.length, 1, "IS was still set: no new message yet");
  rig.setReg(HOST_IRQ_STAT, 1);
  assert.equal(rig.msis.length, 2, "clearing IS with PxIS pending sends another");
  assert.equal(rig.reg(HOST_IRQ_STAT), 1);
});

Deno.test("GHC.HR resets the HBA and ports; COMRESET through PxSCTL resets one port", async () => {
  const rig = await AhciRig.create();
  rig.startPort(P0);
  rig.setPort(P0, PORT_SCR_ACT, 0xf);
  rig.setReg(HOST_CTL, HOST_RESET | HOST_AHCI_EN);
  assert.equal(rig.reg(HOST_CTL) >>> 0, HOST_AHCI_EN, "HR clears itself; IE off");
  assert.equal(rig.port(P0, PORT_CMD) & (PORT_CMD_START | PORT_CMD_FIS_RX), 0);
  assert.equal(rig.port(P0, PORT_IRQ_MASK), 0);
  assert.equal(rig.port(P0, PORT_SCR_ACT), 0);
  assert.equal(rig.port(P0, PORT_LST_ADDR), clbOf(P0), "PxCLB survives an HBA reset");
  assert.equal(rig.port(P0, PORT_SIG), 0x101);
  rig.startPort(P0);
  rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX);
  rig.setPort(P0, PORT_IRQ_STAT, 0xffffffff);
  rig.setPort(P0, PORT_SCR_CTL, 1);
  assert.equal(rig.port(P0, PORT_SCR_STAT) & 0xf, 1, "link down during COMRESET");
  assert.equal(rig.port(P0, PORT_TFDATA) & 0x80, 0x80, "BSY");
  rig.setPort(P0, PORT_SCR_CTL, 0);
  assert.equal(rig.port(P0, PORT_SCR_STAT), 0x113);
  assert.equal(rig.port(P0, PORT_TFDATA) & 0xff, 0x50);
  assert.equal(rig.port(P0, PORT_IRQ_STAT), PORT_IRQ_D2H_REG_FIS, "signature FIS again");
  assert.equal(rig.mem.u8(fbOf(P0) + 0x44), 1, "LBA low 1");
  // A PCI reset goes further: configuration space and the port's pointers too.
  rig.ctrl.reset();
  assert.equal(rig.bus.configRead(AHCI_SLOT, 0x24, 4), 0, "BAR5 unprogrammed");
  assert.equal(rig.ctrl.msiEnabled, false);
  assert.equal(rig.ctrl.findBar(rig.abar), null, "memory decoding off");
  assert.equal(rig.ctrl.mmioRead(5, 0x100 + PORT_LST_ADDR, 4), 0);
});

// ---- hostile drivers ----------------------------------------------------------------------------

/** Runs `hostile` on a started port and checks the outcome and that the port recovers. */
async function hostileCase(
  name: string,
  hostile: (rig: AhciRig) => void | Promise<void>,
  expect: { is: number; error?: number },
): Promise<AhciRig> {
  const rig = await AhciRig.create();
  rig.startPort(P0);
  ack(rig);
  const before = rig.files[0]!.contents();
  await hostile(rig);
  await rig.settle();
  const is = rig.port(P0, PORT_IRQ_STAT);
  assert.ok((is & expect.is) === expect.is, `${name}: PxIS 0x${is.toString(16)}`);
  assert.equal(rig.port(P0, PORT_TFDATA) & 1, 1, `${name}: PxTFD.ERR`);
  if (expect.error !== undefined) {
    assert.equal(rig.port(P0, PORT_TFDATA) >>> 8, expect.error, `${name}: error register`);
  }
  assert.ok(rig.ctrl.stats.errors >= 1, name);
  assert.deepEqual(rig.files[0]!.contents(), before, `${name}: the image is unharmed`);
  // Halted: a new command waits for the restart.
  rig.command(P0, 7, dmaExt(false, 0, 1), [{ address: DATA_BASE, bytes: 512 }]);
  rig.issue(P0, 1 << 7);
  await rig.settle();
  assert.ok((rig.port(P0, PORT_CMD_ISSUE) & (1 << 7)) !== 0, `${name}: halted until restarted`);
  await rig.restartPort(P0);
  rig.command(P0, 7, dmaExt(false, 0, 1), [{ address: DATA_BASE, bytes: 512 }]);
  rig.issue(P0, 1 << 7);
  await rig.settle();
  assert.equal(rig.port(P0, PORT_CMD_ISSUE), 0, `${name}: works after the restart`);
  assert.deepEqual(rig.mem.slice(DATA_BASE, 512), rig.disk(0, 0, 512), name);
  return rig;
}

Deno.test("hostile command lists, tables and PRDTs end in an error status, the image unharmed", async () => {
  const outside = 0x7000_0000; // past the 64 MiB of RAM
  const write = (lba: number, sectors: number, prds: { address: number; bytes: number }[]) =>
  (
    rig: AhciRig,
  ) => {
    rig.command(P0, 0, dmaExt(true, lba, sectors), prds, { write: true });
    rig.issue(P0, 1);
  };
  await hostileCase("command list outside RAM", (rig) => {
    rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX);
    rig.setPort(P0, PORT_LST_ADDR, outside);
    rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX | PORT_CMD_START);
    rig.issue(P0, 1);
    rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX);
    rig.setPort(P0, PORT_LST_ADDR, clbOf(P0));
    rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX | PORT_CMD_START);
    rig.setPort(P0, PORT_LST_ADDR, outside);
    rig.issue(P0, 1);
    rig.setPort(P0, PORT_LST_ADDR, clbOf(P0));
  }, { is: PORT_IRQ_HBUS_ERR });
  await hostileCase("command table outside RAM", (rig) => {
    rig.command(P0, 0, dmaExt(true, 0, 1), [], { table: outside });
    rig.issue(P0, 1);
  }, { is: PORT_IRQ_HBUS_ERR });
  await hostileCase(
    "PRD outside RAM",
    write(0, 8, [{ address: DATA_BASE, bytes: 2048 }, { address: outside, bytes: 2048 }]),
    { is: PORT_IRQ_HBUS_ERR },
  );
  await hostileCase(
    "PRD crossing the end of RAM",
    write(0, 2, [{ address: 64 * 1024 * 1024 - 512, bytes: 1024 }]),
    { is: PORT_IRQ_HBUS_ERR },
  );
  await hostileCase("PRDTL 0 with a data command", write(0, 1, []), {
    is: PORT_IRQ_TF_ERR | PORT_IRQ_OVERFLOW,
    error: ATA_ABORTED,
  });
  await hostileCase(
    "a PRDT shorter than the transfer",
    write(0, 8, [{ address: DATA_BASE, bytes: 4094 }]),
    { is: PORT_IRQ_TF_ERR | PORT_IRQ_OVERFLOW, error: ATA_ABORTED },
  );
  await hostileCase("an odd PRD byte count", (rig) => {
    rig.command(P0, 0, dmaExt(true, 0, 1), [{ address: DATA_BASE, bytes: 0, rawDbc: 510 }], {
      write: true,
    });
    rig.issue(P0, 1);
  }, { is: PORT_IRQ_TF_ERR, error: ATA_ABORTED });
  await hostileCase(
    "a sector range past the end",
    write(8191, 2, [{ address: DATA_BASE, bytes: 1024 }]),
    {
      is: PORT_IRQ_TF_ERR,
      error: ATA_IDNF,
    },
  );
  await hostileCase(
    "LBA48 far past the end",
    write(2 ** 47, 1, [{ address: DATA_BASE, bytes: 512 }]),
    {
      is: PORT_IRQ_TF_ERR,
      error: ATA_IDNF,
    },
  );
  await hostileCase("an unknown command", (rig) => {
    rig.command(P0, 0, { command: 0x42 }, []);
    rig.issue(P0, 1);
  }, { is: PORT_IRQ_TF_ERR, error: ATA_ABORTED });
  await hostileCase("a FIS that is not Register H2D", (rig) => {
    rig.command(P0, 0, { command: 0x25, type: 0x46 }, []);
    rig.issue(P0, 1);
  }, { is: PORT_IRQ_TF_ERR, error: ATA_ABORTED });
  await hostileCase("a CFL too short for a Register FIS", (rig) => {
    rig.command(P0, 0, dmaExt(false, 0, 1), [{ address: DATA_BASE, bytes: 512 }], { cfl: 2 });
    rig.issue(P0, 1);
  }, { is: PORT_IRQ_TF_ERR });
  await hostileCase("an ATAPI command to a disk", (rig) => {
    rig.command(P0, 0, { command: 0xa0 }, [], { atapi: true });
    rig.issue(P0, 1);
  }, { is: PORT_IRQ_TF_ERR });
});

Deno.test("hostile NCQ: tag mismatch, reused tag, missing SACT bit, mixed queued and not", async () => {
  const prd = (tag: number) => [{ address: DATA_BASE + tag * 4096, bytes: 4096 }];
  await hostileCase("NCQ tag in the FIS not matching the slot", (rig) => {
    rig.command(P0, 3, fpdma(true, 4, 0, 8), prd(3), { write: true });
    rig.issueQueued(P0, 1 << 3);
  }, { is: PORT_IRQ_TF_ERR | PORT_IRQ_SDB_FIS, error: ATA_ABORTED });
  await hostileCase("a tag reused while its command is in flight", async (rig) => {
    rig.command(P0, 2, fpdma(false, 2, 0, 8), prd(2));
    rig.issueQueued(P0, 1 << 2);
    rig.command(P0, 2, fpdma(true, 2, 64, 8), prd(2), { write: true });
    rig.issue(P0, 1 << 2); // PxSACT bit 2 still set: the drive has tag 2 outstanding
  }, { is: PORT_IRQ_TF_ERR, error: ATA_ABORTED });
  await hostileCase("an NCQ command without its PxSACT bit", (rig) => {
    rig.command(P0, 1, fpdma(true, 1, 0, 8), prd(1), { write: true });
    rig.issue(P0, 1 << 1);
  }, { is: PORT_IRQ_TF_ERR, error: ATA_ABORTED });
  await hostileCase("a non-queued command while queued ones are outstanding", (rig) => {
    rig.command(P0, 0, fpdma(false, 0, 0, 8), prd(0));
    rig.command(P0, 1, dmaExt(true, 0, 8), prd(1), { write: true });
    rig.issueQueued(P0, 1);
    rig.issue(P0, 2);
  }, { is: PORT_IRQ_TF_ERR, error: ATA_ABORTED });
  await hostileCase(
    "an NCQ write past the end",
    (rig) => {
      rig.command(P0, 5, fpdma(true, 5, 8190, 8), prd(5), { write: true });
      rig.issueQueued(P0, 1 << 5);
    },
    { is: PORT_IRQ_TF_ERR | PORT_IRQ_SDB_FIS, error: ATA_IDNF },
  );
});

Deno.test("PxCI written with ST clear is ignored; so is a doorbell on an empty port", async () => {
  const rig = await AhciRig.create({
    drives: [await RawNode.open(new MemoryFile("a", new Uint8Array(1 << 20))), null],
  });
  rig.setPort(P0, PORT_LST_ADDR, clbOf(P0));
  rig.command(P0, 0, dmaExt(false, 0, 1), [{ address: DATA_BASE, bytes: 512 }]);
  rig.issue(P0, 1);
  rig.setPort(P0, PORT_SCR_ACT, 1);
  await rig.settle();
  assert.equal(rig.port(P0, PORT_CMD_ISSUE), 0);
  assert.equal(rig.port(P0, PORT_SCR_ACT), 0);
  assert.equal(rig.ctrl.stats.commands, 0);
  rig.startPort(1);
  rig.issue(1, 1);
  assert.equal(rig.port(1, PORT_CMD_ISSUE), 0);
  assert.equal(rig.ctrl.stats.ignored, 3);
  assert.equal(rig.ctrl.stats.errors, 0);
});

/** A node whose reads fail in one sector range. */
class FailingNode extends WrappedNode {
  readonly #bad: number;
  constructor(inner: BlockNode, badOffset: number) {
    super(inner, "failing");
    this.#bad = badOffset;
  }
  override async read(offset: number, dst: Uint8Array): Promise<void> {
    await Promise.resolve();
    if (offset <= this.#bad && this.#bad < offset + dst.length) {
      throw new BlockError("io", "Injected read error", { offset });
    }
    await this.inner.read(offset, dst);
  }
}

Deno.test("a failed NCQ read is UNC in an error SDB FIS and in READ LOG EXT page 10h", async () => {
  const inner = await RawNode.open(new MemoryFile("d", new Uint8Array(1 << 20)));
  const rig = await AhciRig.create({ drives: [new FailingNode(inner, 40 * 512)] });
  rig.startPort(P0);
  ack(rig);
  for (let tag = 0; tag < 8; tag++) {
    rig.command(P0, tag, fpdma(false, tag, tag * 8, 8), [{
      address: DATA_BASE + tag * 4096,
      bytes: 4096,
    }]);
  }
  rig.issueQueued(P0, 0xff);
  await rig.settle();
  const is = ack(rig);
  assert.ok((is & PORT_IRQ_TF_ERR) !== 0);
  assert.equal(rig.port(P0, PORT_TFDATA), (ATA_UNC << 8) | 0x41);
  const sact = rig.port(P0, PORT_SCR_ACT);
  assert.ok((sact & (1 << 5)) !== 0, "the failed tag stays active");
  // The driver's recovery: stop, wait for CR, start, read the log.
  rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX);
  await rig.settle();
  assert.equal(rig.port(P0, PORT_CMD) & PORT_CMD_LIST_ON, 0);
  assert.equal(rig.port(P0, PORT_CMD) & PORT_CMD_FIS_ON, PORT_CMD_FIS_ON);
  assert.equal(rig.port(P0, PORT_SCR_ACT), 0, "clearing ST clears PxSACT");
  rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX | PORT_CMD_START);
  const log = DATA_BASE + 0x10_0000;
  rig.command(P0, 0, { command: 0x2f, lba: 0x10, count: 1 }, [{ address: log, bytes: 512 }]);
  rig.issue(P0, 1);
  await rig.settle();
  assert.equal(rig.port(P0, PORT_CMD_ISSUE), 0);
  assert.equal(rig.mem.u8(log), 5, "tag 5, NQ clear");
  assert.equal(rig.mem.u8(log + 2), 0x41);
  assert.equal(rig.mem.u8(log + 3), ATA_UNC);
  assert.equal(rig.mem.u8(log + 4), 40, "its LBA");
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += rig.mem.u8(log + i);
  assert.equal(sum & 0xff, 0, "checksum");
  // Reading the log cleared it.
  rig.issue(P0, 1);
  await rig.settle();
  assert.equal(rig.mem.u8(log + 3), 0);
});

Deno.test("clearing ST while NCQ I/O runs keeps CR set until it drains, and drops its completions", async () => {
  const file = new MemoryFile("d", new Uint8Array(1 << 20));
  const node = new ShuffledNode(await RawNode.open(file), 7);
  const rig = await AhciRig.create({ drives: [node] });
  rig.startPort(P0);
  ack(rig);
  rig.msis.length = 0;
  for (let tag = 0; tag < 4; tag++) {
    rig.command(P0, tag, fpdma(false, tag, tag, 1), [{
      address: DATA_BASE + tag * 512,
      bytes: 512,
    }]);
  }
  rig.issueQueued(P0, 0xf);
  rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX);
  assert.equal(
    rig.port(P0, PORT_CMD) & PORT_CMD_LIST_ON,
    PORT_CMD_LIST_ON,
    "CR: I/O still running",
  );
  assert.equal(rig.port(P0, PORT_SCR_ACT), 0);
  await rig.settle();
  assert.equal(rig.port(P0, PORT_CMD) & PORT_CMD_LIST_ON, 0);
  assert.deepEqual(rig.msis, [], "no completion of a stopped engine is reported");
  assert.equal(rig.ctrl.stats.sdbFises, 0);
  await rig.ctrl.close();
});

Deno.test("a random register and memory storm never throws out of the HBA (seed 0xa1c1)", async () => {
  const seed = 0xa1c1;
  const random = mulberry32(seed);
  const rig = await AhciRig.create({ diskBytes: 1 << 20 });
  rig.startPort(P0);
  const regs = [0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x18, 0x20, 0x28, 0x2c, 0x30, 0x34, 0x38];
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)]!;
  const int = (n: number) => Math.floor(random() * n);
  for (let round = 0; round < 4000; round++) {
    const r = random();
    if (r < 0.05) {
      // Garbage in the command structures.
      const area = pick([clbOf(P0), tableOf(P0, int(32)), fbOf(P0)]);
      rig.mem.setU32(area + int(64) * 4, int(2 ** 32));
    } else if (r < 0.45) {
      // A plausible command with random fields, issued queued or not.
      const slot = int(32);
      const sectors = 1 + int(8);
      rig.command(
        P0,
        slot,
        {
          command: pick([0x25, 0x35, 0x60, 0x61, 0xec, 0xea, 0x06, 0x2f, 0xef, 0xc8, 0xe5, 0x00]),
          lba: int(2200),
          count: random() < 0.5 ? slot << 3 : int(65536),
          features: random() < 0.5 ? sectors : int(65536),
        },
        [{ address: DATA_BASE + int(64) * 512, bytes: 512 * sectors - (random() < 0.05 ? 1 : 0) }],
        {
          write: random() < 0.5,
        },
      );
      if ((rig.port(P0, PORT_TFDATA) & 1) !== 0 && random() < 0.8) {
        // Halted by an earlier error: recover first, as a driver would.
        rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX);
        rig.setPort(P0, PORT_IRQ_STAT, 0xffffffff);
        rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX | PORT_CMD_START);
      }
      if (random() < 0.5) rig.setPort(P0, PORT_SCR_ACT, 1 << slot);
      rig.issue(P0, 1 << slot);
    } else if (r < 0.5) {
      // The driver's recovery: stop, ack, start.
      rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX);
      if (random() < 0.5) await rig.settle();
      rig.setPort(P0, PORT_IRQ_STAT, 0xffffffff);
      rig.setReg(HOST_IRQ_STAT, 0xffffffff);
      rig.setPort(P0, PORT_CMD, PORT_CMD_FIS_RX | PORT_CMD_START);
    } else if (r < 0.95) {
      const size = pick([1, 2, 4] as const);
      const offset = 0x100 + pick(regs) + (size === 4 ? 0 : int(4 / size) * size);
      const value = int(2 ** 32);
      const reg = offset & ~3;
      if (reg === 0x100 || reg === 0x104 || reg === 0x108 || reg === 0x10c) {
        // Pointers: mostly left alone, sometimes anything.
        if (random() < 0.1) rig.bus.mmioWrite(rig.abar + offset, size, value);
      } else if (reg === 0x118 && random() < 0.7) {
        rig.bus.mmioWrite(rig.abar + 0x118, 4, (value | PORT_CMD_START | PORT_CMD_FIS_RX) & ~8);
      } else if (reg === 0x12c && random() < 0.7) {
        // COMRESET only now and then.
      } else {
        rig.bus.mmioWrite(rig.abar + offset, size, value);
      }
      rig.bus.mmioRead(rig.abar + pick([0, 4, 8, 0x0c, 0x110, 0x118, 0x120, 0x134, 0x138]), 4);
      if (random() < 0.02) rig.setReg(HOST_CTL, random() < 0.5 ? HOST_RESET : HOST_IRQ_EN);
      if (random() < 0.05) rig.startPort(P0);
    } else {
      await rig.settle();
    }
  }
  await rig.settle();
  const stats = rig.ctrl.stats;
  assert.ok(
    stats.commands > 300 && stats.errors > 0 && stats.sectorsRead > 0,
    `seed ${seed}: ${JSON.stringify(stats)}`,
  );
  // Still a working HBA: reset it and read.
  rig.setReg(HOST_CTL, HOST_RESET);
  rig.startPort(P0);
  rig.command(P0, 0, dmaExt(false, 0, 2), [{ address: DATA_BASE, bytes: 1024 }]);
  rig.issue(P0, 1);
  await rig.settle();
  assert.equal(rig.port(P0, PORT_CMD_ISSUE), 0, `seed ${seed}`);
  assert.deepEqual(rig.mem.slice(DATA_BASE, 1024), rig.disk(0, 0, 1024));
  await rig.ctrl.close();
});

Deno.test({
  name: "writes through AHCI NCQ into a qcow2 image read back in qemu-io and pass qemu-img check",
  ignore: ignoreWithout("qemu-img") || ignoreWithout("qemu-io"),
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor-ahci-" });
    try {
      const path = join(dir, "disk.qcow2");
      await createImage(path, "qcow2", 8 * 1024 * 1024);
      const node = await openImage(path, { format: "qcow2" });
      const rig = await AhciRig.create({ drives: [node] });
      rig.startPort(P0);
      ack(rig);
      // 16 tags, each 64 KiB with pattern 0x10 + tag, at 256 KiB strides (some clusters sparse).
      for (let tag = 0; tag < 16; tag++) {
        const buf = DATA_BASE + tag * 0x10000;
        rig.mem.fill(buf, 0x10000, 0x10 + tag);
        rig.command(P0, tag, fpdma(true, tag, tag * 512, 128), [{ address: buf, bytes: 0x10000 }], {
          write: true,
        });
      }
      rig.issueQueued(P0, 0xffff);
      await rig.settle();
      assert.equal(rig.port(P0, PORT_SCR_ACT), 0);
      assert.equal(rig.port(P0, PORT_IRQ_STAT) & PORT_IRQ_TF_ERR, 0);
      rig.command(P0, 0, { command: 0xea }, []);
      rig.issue(P0, 1);
      await rig.settle();
      await rig.ctrl.close();
      await node.close();
      const commands = [];
      for (let tag = 0; tag < 16; tag++) {
        commands.push("-c", `read -P 0x${(0x10 + tag).toString(16)} ${tag * 256 * 1024} 64k`);
        commands.push("-c", `read -P 0 ${tag * 256 * 1024 + 64 * 1024} 64k`);
      }
      const io = await runTool("qemu-io", ["-f", "qcow2", ...commands, path]);
      assert.equal(io.code, 0, io.stderr);
      assert.doesNotMatch(io.stdout + io.stderr, /Pattern verification failed/);
      const check = await runTool("qemu-img", ["check", "-f", "qcow2", path]);
      assert.equal(check.code, 0, check.stdout + check.stderr);
      assert.match(check.stdout, /No errors were found/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
