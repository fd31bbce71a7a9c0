/**
 * The guest's driver of a PIIX-style IDE controller (Linux's `ata_piix` over `libata-sff` and
 * `libata-bmdma`, simulated): one ATA disk on one channel, served as a {@linkcode BlockTarget}.
 *
 * Bring-up ({@linkcode IdeDriver.open}): the function must be a mass-storage IDE controller (class
 * 0x0101); I/O decoding (and bus mastering for DMA) is turned on, the channel is reset (SRST, then
 * polling the alternate status until BSY clears), the disk is selected and checked (status 0 or
 * all-ones: nothing there; a non-ATA signature: not a disk), and IDENTIFY DEVICE is read through
 * the data port — polled, with the channel's interrupt masked, as firmware does; then the interrupt
 * is enabled. The capacity comes from the LBA48 words when the disk supports LBA48; DMA mode
 * selects the disk's fastest UDMA mode with SET FEATURES.
 *
 * Requests queue in software (`depth` of them, pre-allocated with their buffers in guest RAM): IDE
 * has no command queueing, so one command is on the wire at a time, and the interrupt handler
 * starts the next when one ends. The costs are those of the hardware:
 * - PIO read: the task file (6 register writes; 10 for LBA48), then for every sector an interrupt
 *   — alternate status, status (which acknowledges it) — and 256 reads of the 16-bit data port.
 * - PIO write: the task file, polling the alternate status for DRQ, 256 data-port writes per
 *   sector, and an interrupt after each.
 * - DMA: the PRD table (built in guest RAM, never crossing a 64 KiB boundary, as PIIX requires)
 *   is programmed, the task file written and the bus master started; at the interrupt: bus-master
 *   status, stop, ATA status, clear — about a dozen exits, whatever the size.
 *
 * Every port access is a VM exit in the vCPU Worker. Waiting goes through the platform's `idle`
 * step, as the virtio drivers do (see `virtio_driver.ts`). A failed command completes its request
 * with `ioerr` and a `detail` naming the ATA status and error bits; a disk that stops answering
 * makes `wait()` throw an {@linkcode IdeDriverError} naming the channel and disk.
 *
 * The guest cannot import the device layer; the ATA numbers come from the vocabulary both ends
 * share, `src/ata/constants.ts` (with the names of Linux's `include/linux/ata.h`).
 *
 * @module
 */

import {
  ATA_BUSY,
  ATA_CMD_DATA_SET_MANAGEMENT,
  ATA_CMD_FLUSH_CACHE,
  ATA_CMD_FLUSH_CACHE_EXT,
  ATA_CMD_IDENTIFY_DEVICE,
  ATA_CMD_READ_DMA,
  ATA_CMD_READ_DMA_EXT,
  ATA_CMD_READ_SECTORS,
  ATA_CMD_READ_SECTORS_EXT,
  ATA_CMD_SET_FEATURES,
  ATA_CMD_WRITE_DMA,
  ATA_CMD_WRITE_DMA_EXT,
  ATA_CMD_WRITE_SECTORS,
  ATA_CMD_WRITE_SECTORS_EXT,
  ATA_DEV1,
  ATA_DEVICE_OBS,
  ATA_DF,
  ATA_DMA_CMD,
  ATA_DMA_DRV0_CAPABLE,
  ATA_DMA_ERR,
  ATA_DMA_INTR,
  ATA_DMA_START,
  ATA_DMA_STATUS,
  ATA_DMA_TABLE_OFS,
  ATA_DMA_WR,
  ATA_DRDY,
  ATA_DRQ,
  ATA_DSM_RANGE_MAX,
  ATA_DSM_TRIM,
  ATA_ERR,
  ATA_ID_CFS_ENABLE_1,
  ATA_ID_COMMAND_SET_2,
  ATA_ID_DATA_SET_MGMT,
  ATA_ID_FW_REV,
  ATA_ID_FW_REV_LEN,
  ATA_ID_LBA_CAPACITY,
  ATA_ID_LBA_CAPACITY_2,
  ATA_ID_PROD,
  ATA_ID_PROD_LEN,
  ATA_ID_SERNO,
  ATA_ID_SERNO_LEN,
  ATA_ID_UDMA_MODES,
  ATA_LBA,
  ATA_MAX_TRIM_RNUM,
  ATA_NIEN,
  ATA_PRD_BOUNDARY,
  ATA_PRD_EOT,
  ATA_PRD_SZ,
  ATA_PRIMARY_CMD,
  ATA_PRIMARY_CTL,
  ATA_REG_CMD,
  ATA_REG_DATA,
  ATA_REG_DEVICE,
  ATA_REG_ERR,
  ATA_REG_FEATURE,
  ATA_REG_LBAH,
  ATA_REG_LBAL,
  ATA_REG_LBAM,
  ATA_REG_NSECT,
  ATA_REG_STATUS,
  ATA_SECONDARY_CMD,
  ATA_SECONDARY_CTL,
  ATA_SECT_SIZE,
  ATA_SRST,
  PCI_CLASS_STORAGE_IDE,
  SETFEATURES_XFER,
  XFER_UDMA_0,
} from "../ata/constants.ts";
import type { AccessSize, GuestBus } from "../virtio/bus.ts";
import { PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MASTER } from "../virtio/pci_regs.ts";
import type { BlockTarget, IoRequest, IoStatus } from "./block_target.ts";
import type { PciFunctionInfo } from "./pci_probe.ts";
import { ACQUIRED, COMPLETED, FREE, localStatus, QUEUED, SlotRequest } from "./queue_target.ts";
import type { GuestPlatform } from "./virtio_driver.ts";

/** Compatibility-mode ports of the two channels. */
const COMPAT_PORTS = [
  { cmd: ATA_PRIMARY_CMD, ctl: ATA_PRIMARY_CTL },
  { cmd: ATA_SECONDARY_CMD, ctl: ATA_SECONDARY_CTL },
] as const;
/** Alternate-status reads before a PIO write's first DRQ is waited for by halting instead. */
const DRQ_POLLS = 64;

/** Options of {@linkcode IdeDriver.open}. */
export interface IdeDriverOptions {
  /** How data moves: the 16-bit data port (`pio`) or the bus master (`dma`). */
  readonly mode: "pio" | "dma";
  /** Requests in the software queue (default 32). */
  readonly depth?: number;
  /** Largest read or write in bytes, a multiple of 512 (default 128 KiB). */
  readonly maxTransfer?: number;
  /** No interrupt for this long while a command is on the wire: `wait` throws (default 30 s). */
  readonly timeoutMs?: number;
  /** Channel: 0 primary (default), 1 secondary. */
  readonly channel?: 0 | 1;
  /** The slave (device 1) of the channel instead of the master. */
  readonly slave?: boolean;
}

/** Why the driver gave up. */
export type IdeDriverErrorKind = "not-ide" | "no-bus-master" | "no-device" | "identify" | "timeout";

/** A failure of bring-up, or a disk that stopped answering. */
export class IdeDriverError extends Error {
  /** Always `IdeDriverError`. */
  override readonly name = "IdeDriverError";
  /** What went wrong. */
  readonly kind: IdeDriverErrorKind;

  /**
   * Makes the error of `device`.
   *
   * @param kind what went wrong
   * @param device the disk, e.g. "IDE slot 1 primary master"
   * @param detail the rest of the message
   */
  constructor(kind: IdeDriverErrorKind, device: string, detail: string) {
    super(`${device}: ${detail}`);
    this.kind = kind;
  }
}

/** Counters of an {@linkcode IdeDriver}. */
export interface IdeDriverStats {
  /** ATA commands the requests issued. */
  readonly commands: number;
  /** Interrupts the handler claimed. */
  readonly interrupts: number;
  /** Data-port accesses (2 bytes each). */
  readonly dataPortAccesses: number;
  /** DMA commands started. */
  readonly dmaTransfers: number;
  /** Requests the device completed. */
  readonly completions: number;
  /** Requests that ended with `ioerr` from the device. */
  readonly errors: number;
  /** Alternate-status polls for a PIO write's first DRQ. */
  readonly polls: number;
}

// What is on the wire: nothing; PIO data-in (a block per interrupt); a PIO write polling for its
// first DRQ; a PIO write (an interrupt after each block); a DMA command; a command without data.
const PHASE_NONE = 0;
const PHASE_PIO_IN = 1;
const PHASE_PIO_FIRST = 2;
const PHASE_PIO_OUT = 3;
const PHASE_DMA = 4;
const PHASE_NODATA = 5;

/** Names the set bits of an ATA status byte. */
function statusBits(status: number): string {
  const names = ["ERR", "IDX", "CORR", "DRQ", "DSC", "DF", "DRDY", "BSY"];
  return names.filter((_, bit) => (status & (1 << bit)) !== 0).reverse().join(" ") || "none";
}

/** Names the set bits of an ATA error byte. */
function errorBits(error: number): string {
  const names = ["AMNF", "TRK0NF", "ABRT", "MCR", "IDNF", "MC", "UNC", "ICRC"];
  return names.filter((_, bit) => (error & (1 << bit)) !== 0).reverse().join(" ") || "none";
}

function hex2(n: number): string {
  return `0x${n.toString(16).padStart(2, "0")}`;
}

/** An ATA string of IDENTIFY data: `bytes` bytes from word `word`, pairs swapped, trimmed. */
function ataString(id: Uint16Array, word: number, bytes: number): string {
  let text = "";
  for (let i = 0; i < bytes / 2; i++) {
    const w = id[word + i]!;
    text += String.fromCharCode(w >>> 8, w & 0xff);
  }
  return text.replace(/[\0 ]+$/, "").replace(/^ +/, "");
}

/** Where a channel's registers are. */
interface ChannelPorts {
  readonly cmd: number;
  readonly ctl: number;
  /** The channel's half of the bus-master BAR, or -1. */
  readonly bm: number;
}

/** The ports of `channel`: compatibility or native mode (prog-if), and the bus master's half of BAR 4. */
function channelPorts(fn: PciFunctionInfo, channel: 0 | 1, device: string): ChannelPorts {
  const native = (fn.progIf & (channel === 0 ? 0x01 : 0x04)) !== 0;
  let cmd: number;
  let ctl: number;
  if (native) {
    const cmdBar = fn.bars[channel * 2];
    const ctlBar = fn.bars[channel * 2 + 1];
    if (cmdBar?.kind !== "io" || ctlBar?.kind !== "io" || cmdBar.address === 0) {
      throw new IdeDriverError("not-ide", device, "native-mode channel without its I/O BARs");
    }
    cmd = cmdBar.address;
    ctl = ctlBar.address + 2;
  } else {
    cmd = COMPAT_PORTS[channel].cmd;
    ctl = COMPAT_PORTS[channel].ctl;
  }
  const bmBar = fn.bars[4];
  const bm = bmBar?.kind === "io" && bmBar.address !== 0 && bmBar.size >= 16
    ? bmBar.address + 8 * channel
    : -1;
  return { cmd, ctl, bm };
}

/** How a failed command's status (and error register, when ERR is set) reads in messages. */
function describe(status: number, readError: () => number): string {
  let detail = `ATA status ${hex2(status)} (${statusBits(status)})`;
  if ((status & ATA_ERR) !== 0) {
    const error = readError();
    detail += `, error ${hex2(error)} (${errorBits(error)})`;
  }
  return detail;
}

/**
 * Bring-up, polled with the channel's interrupt masked: SRST and BSY's end, the disk's presence
 * and ATA signature, IDENTIFY DEVICE through the data port, and for DMA the fastest UDMA mode.
 *
 * @returns the IDENTIFY data
 * @throws {IdeDriverError} for no disk, a non-ATA signature, a failed command, or a timeout
 */
async function bringUp(
  platform: GuestPlatform,
  ports: ChannelPorts,
  device: number,
  dma: boolean,
  name: string,
  timeoutMs: number,
): Promise<Uint16Array> {
  const bus = platform.bus;
  const inb = (port: number) => bus.ioRead(port, 1) & 0xff;
  const outb = (port: number, value: number) => bus.ioWrite(port, 1, value);
  const until = async (ready: (status: number) => boolean, what: string) => {
    const start = performance.now();
    for (let status = inb(ports.ctl); !ready(status); status = inb(ports.ctl)) {
      if (performance.now() - start > timeoutMs) {
        throw new IdeDriverError(
          "timeout",
          name,
          `${what}: not ready after ${timeoutMs} ms (status ${hex2(status)})`,
        );
      }
      const idle = platform.idle();
      if (idle !== undefined) await idle;
    }
  };
  const command = async (code: number, feature: number, count: number, what: string) => {
    outb(ports.cmd + ATA_REG_FEATURE, feature);
    outb(ports.cmd + ATA_REG_NSECT, count);
    outb(ports.cmd + ATA_REG_DEVICE, device);
    outb(ports.cmd + ATA_REG_CMD, code);
    await until((status) => (status & ATA_BUSY) === 0, what);
    const status = inb(ports.cmd + ATA_REG_STATUS);
    if ((status & (ATA_ERR | ATA_DF)) !== 0) {
      const why = describe(status, () => inb(ports.cmd + ATA_REG_ERR));
      throw new IdeDriverError("identify", name, `${what} failed: ${why}`);
    }
    return status;
  };
  outb(ports.ctl, ATA_SRST | ATA_NIEN);
  outb(ports.ctl, ATA_NIEN);
  await until((status) => (status & ATA_BUSY) === 0, "after reset");
  outb(ports.cmd + ATA_REG_DEVICE, device);
  const present = inb(ports.cmd + ATA_REG_STATUS);
  if (present === 0 || present === 0xff) {
    throw new IdeDriverError("no-device", name, `no disk (status ${hex2(present)})`);
  }
  const lbam = inb(ports.cmd + ATA_REG_LBAM);
  const lbah = inb(ports.cmd + ATA_REG_LBAH);
  if (lbam !== 0 || lbah !== 0) {
    throw new IdeDriverError(
      "no-device",
      name,
      `signature ${hex2(lbam)}/${hex2(lbah)} is not an ATA disk (ATAPI is 0x14/0xeb)`,
    );
  }
  await until((status) => (status & (ATA_BUSY | ATA_DRDY)) === ATA_DRDY, "DRDY");
  const status = await command(ATA_CMD_IDENTIFY_DEVICE, 0, 0, "IDENTIFY DEVICE");
  if ((status & ATA_DRQ) === 0) {
    throw new IdeDriverError(
      "identify",
      name,
      `IDENTIFY DEVICE: no data (${describe(status, () => 0)})`,
    );
  }
  const id = new Uint16Array(256);
  for (let i = 0; i < id.length; i++) id[i] = bus.ioRead(ports.cmd + ATA_REG_DATA, 2);
  if (dma) {
    // The fastest UDMA mode the disk offers (word 88 bits 0-6), as libata picks it.
    const udma = id[ATA_ID_UDMA_MODES]! & 0x7f;
    if (udma !== 0) {
      const mode = XFER_UDMA_0 | (31 - Math.clz32(udma));
      await command(ATA_CMD_SET_FEATURES, SETFEATURES_XFER, mode, "SET FEATURES XFER");
    }
    // Firmware's habit: tell the bus master this drive is DMA capable.
    const bm = inb(ports.bm + ATA_DMA_STATUS);
    const capable = ATA_DMA_DRV0_CAPABLE << ((device & ATA_DEV1) !== 0 ? 1 : 0);
    outb(ports.bm + ATA_DMA_STATUS, (bm & 0x60) | capable);
  }
  return id;
}

/**
 * One ATA disk behind an IDE channel, as a {@linkcode BlockTarget}. One driver per channel: SRST at
 * bring-up resets both disks of the channel, and the wire carries one command at a time.
 *
 * @example
 * ```ts ignore
 * const disk = await IdeDriver.open(platform, fn, { mode: "dma" });
 * await runOne(disk, (r) => { r.op = "read"; r.offset = 0; r.length = 4096; });
 * ```
 */
export class IdeDriver implements BlockTarget {
  /** What the driver calls the disk in errors: "IDE slot N primary master". */
  readonly name: string;
  /** How data moves. */
  readonly mode: "pio" | "dma";
  /** IDENTIFY model number. */
  readonly model: string;
  /** IDENTIFY serial number. */
  readonly serial: string;
  /** IDENTIFY firmware revision. */
  readonly firmware: string;
  /** Device size in bytes. */
  readonly capacity: number;
  /** Always 512. */
  readonly blockSize: number = ATA_SECT_SIZE;
  /** IDE disks are not read-only to the guest (a refused write fails with ABRT). */
  readonly readOnly = false;
  /** Requests of the software queue. */
  readonly depth: number;
  /** Largest read or write in bytes. */
  readonly maxTransfer: number;
  /** Largest discard (DSM TRIM, DMA mode only); 0 without TRIM. */
  readonly maxDiscard: number;
  /** Always 0: ATA has no write-zeroes command here. */
  readonly maxWriteZeroes = 0;
  /** The disk supports LBA48 (EXT commands are used for ranges LBA28 cannot address). */
  readonly lba48: boolean;
  /** The disk's write cache was on at IDENTIFY (flushes are sent only then). */
  readonly writeCache: boolean;
  /** IDENTIFY DEVICE data as read. */
  readonly identify: Uint16Array;
  /** Port ranges [start, end) the driver uses, for `DeviceExitBus.watchEmulated`. */
  readonly ports: readonly (readonly [number, number])[];

  readonly #platform: GuestPlatform;
  readonly #bus: GuestBus;
  readonly #cmd: number;
  readonly #ctl: number;
  readonly #bm: number;
  readonly #deviceBits: number;
  readonly #timeoutMs: number;
  readonly #requests: SlotRequest[] = [];
  /** Per request: its state (queue_target's FREE … COMPLETED), buffer address and 16-bit view. */
  readonly #states: Uint8Array;
  readonly #addresses: number[] = [];
  readonly #wordViews: Uint16Array[] = [];
  readonly #free: number[] = [];
  /** Submitted requests not yet on the wire, FIFO (a ring of `depth`). */
  readonly #queue: (SlotRequest | undefined)[];
  #queueHead = 0;
  #queueCount = 0;
  /** Completed requests not yet reaped, FIFO. */
  readonly #done: (SlotRequest | undefined)[];
  #doneHead = 0;
  #doneCount = 0;
  #inFlight = 0;
  #closed = false;
  #removeHandler: () => void = () => {};
  readonly #allocations: number[] = [];
  #prdTable = 0;
  #dsmBlock = 0;
  #dsmWords: Uint16Array | null = null;
  // The command on the wire.
  #current: SlotRequest | null = null;
  #phase = PHASE_NONE;
  #words: Uint16Array = new Uint16Array(0);
  #wordPos = 0;
  #sectorsLeft = 0;
  // Progress, for the timeout.
  #progress = 0;
  #seenProgress = -1;
  #progressAt = 0;
  #broken: IdeDriverError | null = null;
  #stats = {
    commands: 0,
    interrupts: 0,
    dataPortAccesses: 0,
    dmaTransfers: 0,
    completions: 0,
    errors: 0,
    polls: 0,
  };

  private constructor(
    platform: GuestPlatform,
    options: IdeDriverOptions,
    ports: ChannelPorts,
    name: string,
    id: Uint16Array,
  ) {
    this.#platform = platform;
    this.#bus = platform.bus;
    this.name = name;
    this.mode = options.mode;
    this.#cmd = ports.cmd;
    this.#ctl = ports.ctl;
    this.#bm = ports.bm;
    this.#deviceBits = ATA_DEVICE_OBS | ATA_LBA | (options.slave === true ? ATA_DEV1 : 0);
    this.#timeoutMs = options.timeoutMs ?? 30_000;
    this.identify = id;
    const lba48 = (id[ATA_ID_COMMAND_SET_2]! & 0xc400) === 0x4400;
    const sectors48 = id[ATA_ID_LBA_CAPACITY_2]! + id[ATA_ID_LBA_CAPACITY_2 + 1]! * 2 ** 16 +
      id[ATA_ID_LBA_CAPACITY_2 + 2]! * 2 ** 32 + id[ATA_ID_LBA_CAPACITY_2 + 3]! * 2 ** 48;
    const sectors28 = id[ATA_ID_LBA_CAPACITY]! + id[ATA_ID_LBA_CAPACITY + 1]! * 2 ** 16;
    this.lba48 = lba48 && sectors48 !== 0;
    const sectors = this.lba48 ? sectors48 : sectors28;
    if (sectors === 0 || !Number.isSafeInteger(sectors * ATA_SECT_SIZE)) {
      throw new IdeDriverError("identify", name, `IDENTIFY reports ${sectors} sectors`);
    }
    this.capacity = sectors * ATA_SECT_SIZE;
    this.model = ataString(id, ATA_ID_PROD, ATA_ID_PROD_LEN);
    this.serial = ataString(id, ATA_ID_SERNO, ATA_ID_SERNO_LEN);
    this.firmware = ataString(id, ATA_ID_FW_REV, ATA_ID_FW_REV_LEN);
    this.writeCache = (id[ATA_ID_CFS_ENABLE_1]! & (1 << 5)) !== 0;
    const depth = Math.floor(options.depth ?? 32);
    if (!(depth >= 1 && depth <= 1024)) {
      throw new RangeError(`IDE queue depth ${depth} is not 1..1024`);
    }
    this.depth = depth;
    const limit = (this.lba48 ? 65536 : 256) * ATA_SECT_SIZE;
    const maxTransfer = options.maxTransfer ?? 128 * 1024;
    if (
      !Number.isSafeInteger(maxTransfer) || maxTransfer <= 0 || maxTransfer % ATA_SECT_SIZE !== 0 ||
      maxTransfer > limit
    ) {
      throw new RangeError(
        `IDE maxTransfer ${maxTransfer} is not a multiple of 512 up to ${limit}`,
      );
    }
    this.maxTransfer = maxTransfer;
    const trim = (id[ATA_ID_DATA_SET_MGMT]! & 1) !== 0 && this.mode === "dma";
    this.maxDiscard = trim ? ATA_MAX_TRIM_RNUM * ATA_DSM_RANGE_MAX * ATA_SECT_SIZE : 0;
    this.#states = new Uint8Array(depth);
    this.#queue = new Array<SlotRequest | undefined>(depth).fill(undefined);
    this.#done = new Array<SlotRequest | undefined>(depth).fill(undefined);
    const ranges: (readonly [number, number])[] = [
      [ports.cmd, ports.cmd + 8],
      [ports.ctl, ports.ctl + 1],
    ];
    if (ports.bm >= 0) ranges.push([ports.bm, ports.bm + 8]);
    this.ports = ranges;
    try {
      this.#allocate(trim);
    } catch (error) {
      this.#release();
      throw error;
    }
    this.#removeHandler = platform.interrupts.addIntxHandler(() => this.#onInterrupt());
    this.#out(this.#ctl, 0); // the channel's interrupt on
  }

  /**
   * Brings up the disk at `options.channel`/`options.slave` of the IDE controller `fn`.
   *
   * @throws {IdeDriverError} when `fn` is not an IDE controller, DMA is asked without a bus
   *   master, no ATA disk answers there, or the disk fails IDENTIFY (or does not answer in time)
   * @throws {RangeError} for a bad depth or maximum transfer
   * @throws {GuestAllocError} when guest RAM for the buffers runs out
   */
  static async open(
    platform: GuestPlatform,
    fn: PciFunctionInfo,
    options: IdeDriverOptions,
  ): Promise<IdeDriver> {
    const channel = options.channel ?? 0;
    const slave = options.slave === true;
    const name = `IDE slot ${fn.slot} ${channel === 0 ? "primary" : "secondary"} ${
      slave ? "slave" : "master"
    }`;
    if (fn.classCode !== PCI_CLASS_STORAGE_IDE) {
      throw new IdeDriverError(
        "not-ide",
        name,
        `class 0x${fn.classCode.toString(16).padStart(4, "0")} is not an IDE controller (0x0101)`,
      );
    }
    const ports = channelPorts(fn, channel, name);
    const dma = options.mode === "dma";
    if (dma && ports.bm < 0) {
      throw new IdeDriverError("no-bus-master", name, "DMA needs the bus-master I/O BAR 4");
    }
    // Decode our ports; bus mastering for DMA.
    const bus = platform.bus;
    const command = bus.configRead(fn.slot, PCI_COMMAND, 2) & 0xffff;
    const want = PCI_COMMAND_IO | (dma ? PCI_COMMAND_MASTER : 0);
    bus.configWrite(fn.slot, PCI_COMMAND, 2, command | want);
    const device = ATA_DEVICE_OBS | ATA_LBA | (slave ? ATA_DEV1 : 0);
    const id = await bringUp(platform, ports, device, dma, name, options.timeoutMs ?? 30_000);
    return new IdeDriver(platform, options, ports, name, id);
  }

  #allocate(trim: boolean): void {
    const { alloc, mem } = this.#platform;
    const stride = this.maxTransfer;
    const data = alloc.alloc(stride * this.depth, 4096);
    this.#allocations.push(data);
    // Entries for the worst case: a buffer split at every 64 KiB boundary it crosses.
    const entries = Math.ceil(stride / ATA_PRD_BOUNDARY) + 1;
    // Aligned to its own size (a power of 2): the table cannot cross a 64 KiB boundary.
    const tableBytes = 2 ** Math.ceil(Math.log2(Math.max(16, entries * ATA_PRD_SZ)));
    this.#prdTable = alloc.alloc(tableBytes, tableBytes);
    this.#allocations.push(this.#prdTable);
    if (trim) {
      this.#dsmBlock = alloc.alloc(ATA_SECT_SIZE, ATA_SECT_SIZE);
      this.#allocations.push(this.#dsmBlock);
      const at = mem.translate(this.#dsmBlock, ATA_SECT_SIZE);
      this.#dsmWords = new Uint16Array(mem.buffer, at, ATA_SECT_SIZE / 2);
    }
    for (let i = 0; i < this.depth; i++) {
      const address = data + i * stride;
      const words = new Uint16Array(mem.buffer, mem.translate(address, stride), stride / 2);
      this.#requests.push(new SlotRequest(i, mem.slice(address, stride)));
      this.#addresses.push(address);
      this.#wordViews.push(words);
      this.#free.push(this.depth - 1 - i);
    }
  }

  #release(): void {
    this.#removeHandler();
    this.#removeHandler = () => {};
    for (const gpa of this.#allocations.splice(0)) this.#platform.alloc.free(gpa);
  }

  // ---- Port access ----------------------------------------------------------------------------------

  #in(port: number, size: AccessSize = 1): number {
    return this.#bus.ioRead(port, size);
  }

  #out(port: number, value: number, size: AccessSize = 1): void {
    this.#bus.ioWrite(port, size, value);
  }

  /** Writes the task file of an LBA28 or LBA48 command (not the command register). */
  #taskFile(lba: number, count: number, ext: boolean): void {
    const cmd = this.#cmd;
    if (ext) {
      const hi = Math.floor(lba / 0x100_0000);
      this.#out(cmd + ATA_REG_NSECT, (count >>> 8) & 0xff);
      this.#out(cmd + ATA_REG_LBAL, hi & 0xff);
      this.#out(cmd + ATA_REG_LBAM, (hi >>> 8) & 0xff);
      this.#out(cmd + ATA_REG_LBAH, (hi >>> 16) & 0xff);
    }
    this.#out(cmd + ATA_REG_NSECT, count & 0xff);
    this.#out(cmd + ATA_REG_LBAL, lba & 0xff);
    this.#out(cmd + ATA_REG_LBAM, (lba >>> 8) & 0xff);
    this.#out(cmd + ATA_REG_LBAH, (lba >>> 16) & 0xff);
    const head = ext ? 0 : (lba >>> 24) & 0x0f;
    this.#out(cmd + ATA_REG_DEVICE, this.#deviceBits | head);
  }

  #issue(command: number): void {
    this.#stats.commands++;
    this.#out(this.#cmd + ATA_REG_CMD, command);
  }

  // ---- BlockTarget ------------------------------------------------------------------------------------

  /** Requests submitted and not yet reaped. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Counters so far (a snapshot). */
  get stats(): IdeDriverStats {
    return { ...this.#stats };
  }

  /** A free request, or null when all `depth` are in use. */
  acquire(): IoRequest | null {
    if (this.#free.length === 0 || this.#closed) return null;
    const request = this.#requests[this.#free.pop()!]!;
    this.#states[request.index] = ACQUIRED;
    return request;
  }

  /**
   * Queues a filled request. Requests the guest answers itself complete at once: ranges past the
   * capacity (ioerr), write-zeroes (unsupp), discard without TRIM (unsupp), flush with the write
   * cache off (ok), get-id (the IDENTIFY serial, as virtio-blk's GET_ID).
   *
   * @throws {RangeError} for a request not acquired here, an unknown op, or an offset or length
   *   that is not a multiple of 512 or exceeds the maximum
   */
  submit(request: IoRequest): void {
    const r = this.#requests[request.index];
    if (r === undefined || r !== request || this.#states[r.index] !== ACQUIRED) {
      throw new RangeError(`Request ${request.index} was not acquired from this IDE disk`);
    }
    r.written = 0;
    r.detail = "";
    const local = this.#local(r);
    this.#states[r.index] = QUEUED;
    r.status = "pending";
    this.#inFlight++;
    if (local !== null) {
      r.status = local;
      this.#completed(r);
      return;
    }
    this.#queue[(this.#queueHead + this.#queueCount) % this.depth] = r;
    this.#queueCount++;
  }

  /** Validates `r`; returns a status when the guest answers it without the disk. */
  #local(r: SlotRequest): IoStatus | null {
    switch (r.op) {
      case "read":
      case "write":
        this.#checkRange(r, this.maxTransfer);
        return r.offset + r.length > this.capacity
          ? localStatus(r, "ioerr", "beyond the capacity")
          : null;
      case "flush":
        return this.writeCache ? null : "ok";
      case "discard":
        if (this.maxDiscard === 0) return localStatus(r, "unsupp", "no DSM TRIM");
        this.#checkRange(r, this.maxDiscard);
        return r.offset + r.length > this.capacity
          ? localStatus(r, "ioerr", "beyond the capacity")
          : null;
      case "write-zeroes":
        return localStatus(r, "unsupp", "ATA has no write-zeroes command");
      case "get-id": {
        const id = new TextEncoder().encode(this.serial);
        const n = Math.min(20, id.length, r.data.length);
        r.data.fill(0, 0, Math.min(20, r.data.length));
        r.data.set(id.subarray(0, n));
        r.written = 20;
        return "ok";
      }
      default:
        throw new RangeError(`Unknown operation ${String(r.op)}`);
    }
  }

  #checkRange(r: IoRequest, limit: number): void {
    const { offset, length } = r;
    if (
      !Number.isSafeInteger(offset) || offset < 0 || offset % ATA_SECT_SIZE !== 0 ||
      !Number.isSafeInteger(length) || length <= 0 || length % ATA_SECT_SIZE !== 0 ||
      length > limit
    ) {
      throw new RangeError(
        `${r.op} at ${offset}+${length}: offset and length must be multiples of 512, length 1..${limit}`,
      );
    }
  }

  /** Starts the first queued request when the wire is free. */
  commit(): void {
    if (this.#current === null && this.#broken === null) this.#startNext();
  }

  /** A completed request, or null; takes pending interrupts first. */
  reap(): IoRequest | null {
    if (this.#doneCount === 0) {
      this.#platform.interrupts.dispatchPending();
      if (this.#doneCount === 0) return null;
    }
    const r = this.#done[this.#doneHead]!;
    this.#done[this.#doneHead] = undefined;
    this.#doneHead = (this.#doneHead + 1) % this.depth;
    this.#doneCount--;
    this.#inFlight--;
    return r;
  }

  /** Gives a reaped request back. */
  release(request: IoRequest): void {
    const r = this.#requests[request.index];
    if (r === undefined || r !== request || this.#states[r.index] !== COMPLETED) {
      throw new RangeError(`Request ${request.index} is not a reaped request of this IDE disk`);
    }
    this.#states[r.index] = FREE;
    this.#free.push(r.index);
  }

  /**
   * Waits for a completion: halts (the platform's idle step), takes interrupts, and polls a PIO
   * write's first DRQ.
   *
   * @throws {IdeDriverError} when the command on the wire made no progress for the timeout
   */
  wait(): void | Promise<void> {
    if (this.#doneCount > 0) return;
    if (this.#broken !== null) throw this.#broken;
    if (this.#inFlight === 0) return;
    const idle = this.#platform.idle();
    if (idle instanceof Promise) return idle.then(() => this.#afterIdle());
    this.#afterIdle();
  }

  #afterIdle(): void {
    this.#platform.interrupts.dispatchPending();
    if (this.#phase === PHASE_PIO_FIRST) this.#pollFirstBlock();
    const now = performance.now();
    if (this.#progress !== this.#seenProgress || this.#doneCount > 0 || this.#current === null) {
      this.#seenProgress = this.#progress;
      this.#progressAt = now;
      return;
    }
    if (now - this.#progressAt < this.#timeoutMs) return;
    const status = this.#in(this.#ctl);
    this.#broken = new IdeDriverError(
      "timeout",
      this.name,
      `no interrupt for ${this.#timeoutMs} ms with ${this.#inFlight} requests in flight ` +
        `(status ${hex2(status)}: ${statusBits(status)})`,
    );
    throw this.#broken;
  }

  /**
   * Releases the requests' guest memory and the interrupt handler.
   *
   * @throws {RangeError} while requests are in flight (unless the driver gave up on the disk)
   */
  close(): void {
    this.#shutdown();
  }

  /** The same as {@linkcode close}, for callers that keep `close` for the target's own use. */
  shutdown(): void {
    this.#shutdown();
  }

  #shutdown(): void {
    if (this.#closed) return;
    if (this.#inFlight !== 0 && this.#broken === null) {
      throw new RangeError(`Cannot close ${this.name} with ${this.#inFlight} requests in flight`);
    }
    this.#closed = true;
    this.#release();
  }

  // ---- The wire ------------------------------------------------------------------------------------

  #startNext(): void {
    while (this.#current === null && this.#queueCount > 0) {
      const r = this.#queue[this.#queueHead]!;
      this.#queue[this.#queueHead] = undefined;
      this.#queueHead = (this.#queueHead + 1) % this.depth;
      this.#queueCount--;
      this.#current = r;
      this.#start(r);
    }
  }

  #start(r: SlotRequest): void {
    const lba = r.offset / ATA_SECT_SIZE;
    const count = r.length / ATA_SECT_SIZE;
    // LBA28 when it reaches (as Linux's lba_28_ok): fewer register writes.
    const ext = this.lba48 && (lba + count >= 2 ** 28 || count > 256);
    switch (r.op) {
      case "flush":
        this.#phase = PHASE_NODATA;
        this.#taskFile(0, 0, false);
        return this.#issue(this.lba48 ? ATA_CMD_FLUSH_CACHE_EXT : ATA_CMD_FLUSH_CACHE);
      case "discard":
        return this.#startTrim(lba, count);
    }
    // Only reads and writes are left: #local answered every other operation.
    const read = r.op === "read";
    this.#sectorsLeft = count;
    if (this.mode === "dma") {
      this.#dma(this.#addresses[r.index]!, r.length, lba, count, ext);
      return this.#issueDmaCommand(
        read
          ? (ext ? ATA_CMD_READ_DMA_EXT : ATA_CMD_READ_DMA)
          : (ext ? ATA_CMD_WRITE_DMA_EXT : ATA_CMD_WRITE_DMA),
        read,
      );
    }
    this.#words = this.#wordViews[r.index]!;
    this.#wordPos = 0;
    this.#taskFile(lba, count & (ext ? 0xffff : 0xff), ext);
    if (read) {
      this.#phase = PHASE_PIO_IN;
      return this.#issue(ext ? ATA_CMD_READ_SECTORS_EXT : ATA_CMD_READ_SECTORS);
    }
    this.#phase = PHASE_PIO_FIRST;
    this.#issue(ext ? ATA_CMD_WRITE_SECTORS_EXT : ATA_CMD_WRITE_SECTORS);
    this.#pollFirstBlock();
  }

  /** Builds the PRD table for `[address, address + length)` and loads the task file. */
  #dma(address: number, length: number, lba: number, count: number, ext: boolean): void {
    const mem = this.#platform.mem;
    let at = address;
    let left = length;
    let entry = this.#prdTable;
    while (left > 0) {
      // A region may not cross a 64 KiB boundary (PIIX).
      const chunk = Math.min(left, ATA_PRD_BOUNDARY - (at % ATA_PRD_BOUNDARY));
      left -= chunk;
      mem.setU32(entry, at);
      mem.setU16(entry + 4, chunk & 0xffff); // 0 means 64 KiB
      mem.setU16(entry + 6, left === 0 ? ATA_PRD_EOT : 0);
      at += chunk;
      entry += ATA_PRD_SZ;
    }
    this.#out(this.#bm + ATA_DMA_TABLE_OFS, this.#prdTable, 4);
    this.#taskFile(lba, count & (ext ? 0xffff : 0xff), ext);
  }

  #issueDmaCommand(command: number, read: boolean): void {
    this.#phase = PHASE_DMA;
    this.#stats.dmaTransfers++;
    this.#issue(command);
    this.#out(this.#bm + ATA_DMA_CMD, (read ? ATA_DMA_WR : 0) | ATA_DMA_START);
  }

  /** DATA SET MANAGEMENT TRIM of `[lba, lba + count)`: one 512-byte block of range entries. */
  #startTrim(lba: number, count: number): void {
    const words = this.#dsmWords!;
    words.fill(0);
    let at = lba;
    let left = count;
    for (let i = 0; left > 0 && i < ATA_MAX_TRIM_RNUM; i++) {
      const n = Math.min(left, ATA_DSM_RANGE_MAX);
      words[4 * i] = at & 0xffff;
      words[4 * i + 1] = Math.floor(at / 0x10000) & 0xffff;
      words[4 * i + 2] = Math.floor(at / 0x1_0000_0000) & 0xffff;
      words[4 * i + 3] = n;
      at += n;
      left -= n;
    }
    this.#dma(this.#dsmBlock, ATA_SECT_SIZE, 0, 1, true);
    // DSM is an LBA48 command: the feature register selects TRIM.
    this.#out(this.#cmd + ATA_REG_FEATURE, ATA_DSM_TRIM);
    this.#issueDmaCommand(ATA_CMD_DATA_SET_MANAGEMENT, false);
  }

  /** A PIO write waits for DRQ by polling the alternate status, then sends the first block. */
  #pollFirstBlock(): void {
    for (let i = 0; i < DRQ_POLLS; i++) {
      this.#stats.polls++;
      const status = this.#in(this.#ctl);
      if ((status & ATA_BUSY) !== 0) continue;
      if ((status & (ATA_ERR | ATA_DF)) !== 0) {
        this.#in(this.#cmd + ATA_REG_STATUS);
        return this.#failWith(status);
      }
      if ((status & ATA_DRQ) === 0) return this.#failWith(status, "no DRQ for the first block");
      this.#phase = PHASE_PIO_OUT;
      this.#progress++;
      return this.#transferBlock(true);
    }
  }

  /** Moves one sector through the data port: 256 16-bit accesses, each an exit. */
  #transferBlock(write: boolean): void {
    const data = this.#cmd + ATA_REG_DATA;
    const words = this.#words;
    const end = this.#wordPos + ATA_SECT_SIZE / 2;
    if (write) { for (let i = this.#wordPos; i < end; i++) this.#out(data, words[i]!, 2); }
    else for (let i = this.#wordPos; i < end; i++) words[i] = this.#in(data, 2);
    this.#stats.dataPortAccesses += ATA_SECT_SIZE / 2;
    this.#wordPos = end;
    this.#sectorsLeft--;
  }

  /** The INTx handler: claims the interrupt when the channel has a command waiting for one. */
  #onInterrupt(): boolean {
    const phase = this.#phase;
    if (phase === PHASE_NONE || phase === PHASE_PIO_FIRST) return false;
    if (phase === PHASE_DMA) {
      const bm = this.#in(this.#bm + ATA_DMA_STATUS);
      if ((bm & ATA_DMA_INTR) === 0) return false;
      this.#out(this.#bm + ATA_DMA_CMD, 0); // stop the bus master
      const status = this.#in(this.#cmd + ATA_REG_STATUS); // acknowledges INTRQ
      this.#out(this.#bm + ATA_DMA_STATUS, (bm & 0x60) | ATA_DMA_INTR | ATA_DMA_ERR);
      this.#claimed();
      if ((bm & ATA_DMA_ERR) !== 0) this.#failWith(status, `bus master error (status ${hex2(bm)})`);
      else if ((status & (ATA_ERR | ATA_DF)) !== 0) this.#failWith(status);
      else this.#finish(true, "");
      return true;
    }
    // Not ours while the disk is busy; else the status read acknowledges INTRQ.
    if ((this.#in(this.#ctl) & ATA_BUSY) !== 0) return false;
    const status = this.#in(this.#cmd + ATA_REG_STATUS);
    this.#claimed();
    if ((status & (ATA_ERR | ATA_DF)) !== 0) this.#failWith(status);
    else if (phase === PHASE_NODATA) this.#finish(true, "");
    else if (phase === PHASE_PIO_IN) this.#dataIn(status);
    else if (phase === PHASE_PIO_OUT) this.#dataOut(status);
    return true;
  }

  /** A PIO data-in interrupt: read the block; after the last, check how the command ended. */
  #dataIn(status: number): void {
    if ((status & ATA_DRQ) === 0) return this.#failWith(status, "no DRQ for a data block");
    this.#transferBlock(false);
    if (this.#sectorsLeft > 0) return;
    const after = this.#in(this.#ctl);
    if ((after & (ATA_ERR | ATA_DF | ATA_DRQ)) !== 0) return this.#failWith(after);
    this.#finish(true, "");
  }

  /** A PIO data-out interrupt: the next block, or the end of the command. */
  #dataOut(status: number): void {
    if (this.#sectorsLeft === 0) return this.#finish(true, "");
    if ((status & ATA_DRQ) === 0) return this.#failWith(status, "no DRQ for a data block");
    this.#transferBlock(true);
  }

  #claimed(): void {
    this.#stats.interrupts++;
    this.#progress++;
  }

  /** Ends the command with an error naming the status (and error register when ERR is set). */
  #failWith(status: number, why?: string): void {
    const detail = describe(status, () => this.#in(this.#cmd + ATA_REG_ERR));
    this.#finish(false, why === undefined ? detail : `${why}: ${detail}`);
  }

  /** The command on the wire ended: complete its request, start the next. */
  #finish(ok: boolean, detail: string): void {
    this.#phase = PHASE_NONE;
    const r = this.#current;
    this.#current = null;
    if (r === null) return;
    this.#stats.completions++;
    if (ok) {
      r.status = "ok";
      if (r.op === "read") r.written = r.length;
    } else {
      this.#stats.errors++;
      r.status = "ioerr";
      r.detail = detail;
    }
    this.#completed(r);
    this.#startNext();
  }

  #completed(r: SlotRequest): void {
    this.#states[r.index] = COMPLETED;
    this.#done[(this.#doneHead + this.#doneCount) % this.depth] = r;
    this.#doneCount++;
  }
}
