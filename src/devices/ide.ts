/**
 * QEMU's `piix3-ide`: the PIIX3 IDE function with two channels in compatibility mode — the legacy
 * ports 0x1F0-0x1F7/0x3F6 (primary, IRQ 14) and 0x170-0x177/0x376 (secondary, IRQ 15) — each
 * with a master and a slave {@linkcode AtaDisk}, and the bus-master IDE engine in BAR 4 that moves
 * DMA commands' data through a table of physical region descriptors (PRDs) in guest RAM.
 *
 * This is the trap-and-emulate baseline: every register access of the guest is a VM exit, handled
 * here on the VMM thread; block I/O runs on the VMM's event loop between exits, and the disk shows
 * BSY until it settles. One command per channel is in flight; the guest learns of its end by the
 * channel's interrupt line ({@linkcode IdeControllerInit.irq}), which a status read lowers.
 *
 * What a guest controls is checked before it is used: the PRD table is walked and every region
 * checked against guest RAM before the first byte moves, so a bad table (outside RAM, an odd
 * address, an EOT before the transfer's end, no EOT within {@linkcode ATA_PRD_MAX_ENTRIES}
 * descriptors or before a 64 KiB boundary) ends the command with the bus master's error bit and
 * ATA ABRT and an interrupt, the image untouched. Port accesses never throw.
 *
 * @module
 */

import type { BlockNode } from "../block/node.ts";
import type { AccessSize, BarHit, PciFunction } from "../virtio/bus.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import {
  PCI_BASE_ADDRESS_0,
  PCI_CACHE_LINE_SIZE,
  PCI_CLASS_DEVICE,
  PCI_CLASS_PROG,
  PCI_COMMAND,
  PCI_COMMAND_IO,
  PCI_COMMAND_MASTER,
  PCI_CONFIG_SPACE_SIZE,
  PCI_DEVICE_ID,
  PCI_INTERRUPT_LINE,
  PCI_STATUS,
  PCI_SUBSYSTEM_ID,
  PCI_SUBSYSTEM_VENDOR_ID,
  PCI_VENDOR_ID,
} from "../virtio/pci_regs.ts";
import { type AtaChannelPort, type AtaCounters, AtaDisk, newAtaCounters } from "./ata.ts";
import {
  ATA_CMD_BLOCK_PORTS,
  ATA_DEV1,
  ATA_DEVICE_OBS,
  ATA_DMA_ACTIVE,
  ATA_DMA_BAR_SIZE,
  ATA_DMA_CHANNEL_SIZE,
  ATA_DMA_CMD,
  ATA_DMA_DRV0_CAPABLE,
  ATA_DMA_DRV1_CAPABLE,
  ATA_DMA_ERR,
  ATA_DMA_INTR,
  ATA_DMA_START,
  ATA_DMA_STATUS,
  ATA_DMA_TABLE_OFS,
  ATA_DMA_WR,
  ATA_HOB,
  ATA_ID_PROD_LEN,
  ATA_ID_SERNO_LEN,
  ATA_NIEN,
  ATA_PRD_BOUNDARY,
  ATA_PRD_EOT,
  ATA_PRD_MAX_ENTRIES,
  ATA_PRD_SZ,
  ATA_PRIMARY_CMD,
  ATA_PRIMARY_CTL,
  ATA_REG_CMD,
  ATA_REG_DATA,
  ATA_REG_DEVICE,
  ATA_REG_STATUS,
  ATA_SECONDARY_CMD,
  ATA_SECONDARY_CTL,
  ATA_SRST,
  PCI_CLASS_STORAGE_IDE,
  PCI_DEVICE_ID_INTEL_82371SB_1,
  PCI_PROG_IF_IDE_COMPAT_BM,
  PCI_VENDOR_ID_INTEL,
  PIIX_BMDMA_BAR,
  PIIX_IDETIM,
  PIIX_TIMING_END,
} from "../ata/constants.ts";

/** {@linkcode BarHit.bar} of the primary channel's command block (0x1F0-0x1F7). */
export const IDE_PRIMARY_CMD_RANGE: number = -1;
/** {@linkcode BarHit.bar} of the primary channel's control block (0x3F6). */
export const IDE_PRIMARY_CTL_RANGE: number = -2;
/** {@linkcode BarHit.bar} of the secondary channel's command block (0x170-0x177). */
export const IDE_SECONDARY_CMD_RANGE: number = -3;
/** {@linkcode BarHit.bar} of the secondary channel's control block (0x376). */
export const IDE_SECONDARY_CTL_RANGE: number = -4;
/** Largest piece of guest memory one block-layer call of a DMA transfer covers. */
export const IDE_DMA_PIECE_BYTES = 1024 * 1024;
/** Disks a controller holds: master and slave on two channels. */
export const IDE_MAX_DRIVES = 4;

/** What an {@linkcode IdeController} is built from. */
export interface IdeControllerInit {
  /** [primary master, primary slave, secondary master, secondary slave]; null (or absent) = no disk. */
  readonly drives: readonly (BlockNode | null)[];
  /** Guest RAM, for bus-master DMA. */
  readonly memory: GuestMemory;
  /** Drives the channel's interrupt line (0: primary/IRQ14, 1: secondary/IRQ15). */
  readonly irq: (channel: 0 | 1, level: boolean) => void;
  /** IDENTIFY model number, 40 characters at most (default QEMU's "QEMU HARDDISK"). */
  readonly model?: string;
  /** IDENTIFY serial number of every disk, 20 characters at most (default QEMU's "QM0000N"). */
  readonly serial?: string;
  /** Initial write cache (SET FEATURES 0x02/0x82 switches it); default true. */
  readonly writeCache?: boolean;
}

/** Counters of an {@linkcode IdeController}: its disks' and its own. */
export type IdeStats =
  & {
    readonly [K in keyof AtaCounters]: number;
  }
  & {
    /** Commands the disks accepted (every kind, aborted ones included). */
    readonly commands: number;
    /** Commands and register writes dropped: the channel was BSY or DRQ, or no disk was selected. */
    readonly ignored: number;
    /** Port accesses other than the data port (task file, control block, bus master). */
    readonly registerAccesses: number;
    /** INTRQ assertions that reached an interrupt line. */
    readonly interrupts: number;
    /** DMA transfers the bus master started. */
    readonly dmaTransfers: number;
    /** PRD tables the bus master refused (bus-master status ERR). */
    readonly dmaErrors: number;
  };

type Counters = { -readonly [K in keyof IdeStats]: number };

/** What a channel needs of its controller. */
interface ChannelHost {
  readonly memory: GuestMemory;
  readonly counters: Counters;
  irq(channel: 0 | 1, level: boolean): void;
  /** Bus mastering is enabled in the command register. */
  busMaster(): boolean;
  /** The controller was closed: commands are dropped. */
  closed(): boolean;
  track(work: Promise<void>): void;
}

/** One channel: two disk positions, the device control register, INTRQ, the bus-master registers. */
class IdeChannel implements AtaChannelPort {
  readonly index: 0 | 1;
  disks: readonly (AtaDisk | null)[] = [null, null];
  /** Bus-master registers. */
  bmCmd = 0;
  bmStatus = 0;
  bmTable = 0;
  /** Why the last PRD table was refused. */
  lastDmaError = "";
  readonly #host: ChannelHost;
  #unit = 0;
  #control = 0;
  /** The device register as last written, for reads while an absent disk is selected. */
  #deviceReg = ATA_DEVICE_OBS;
  #intrq = false;
  #line = false;
  #epoch = 0;
  #inflight = 0;
  #whenSettled: (() => void)[] = [];
  #pending: AtaDisk | null = null;
  #running = false;

  constructor(index: 0 | 1, host: ChannelHost) {
    this.index = index;
    this.#host = host;
  }

  // ---- AtaChannelPort ------------------------------------------------------------------------------

  interrupt(): void {
    if ((this.#control & ATA_NIEN) === 0) {
      this.bmStatus |= ATA_DMA_INTR;
      this.#host.counters.interrupts++;
    }
    this.#intrq = true;
    this.#updateLine();
  }

  dmaReady(disk: AtaDisk): void {
    this.#pending = disk;
    this.tryStartDma();
  }

  track(work: Promise<void>): void {
    this.#inflight++;
    const settled = work.catch(() => {}).then(() => {
      this.#inflight--;
      if (this.#inflight > 0) return;
      for (const run of this.#whenSettled.splice(0)) run();
    });
    this.#host.track(settled);
  }

  // ---- Interrupt line -------------------------------------------------------------------------------

  #updateLine(): void {
    const level = this.#intrq && (this.#control & ATA_NIEN) === 0;
    if (level === this.#line) return;
    this.#line = level;
    this.#host.irq(this.index, level);
  }

  #ack(): void {
    this.#intrq = false;
    this.#updateLine();
  }

  // ---- Command and control blocks ------------------------------------------------------------------

  #selected(): AtaDisk | null {
    return this.disks[this.#unit] ?? null;
  }

  /** Reads `size` bytes of the command block at `offset`; wide accesses of registers go byte by byte. */
  readCommandBlock(offset: number, size: AccessSize): number {
    if (offset === ATA_REG_DATA && size !== 1) return this.#readData(size);
    this.#host.counters.registerAccesses++;
    let value = 0;
    for (let i = 0; i < size; i++) value += this.#readRegister(offset + i) * 2 ** (8 * i);
    return value;
  }

  #readRegister(reg: number): number {
    // A byte access to the data port, or past the block: nothing answers.
    if (reg === ATA_REG_DATA || reg >= ATA_CMD_BLOCK_PORTS) return 0xff;
    const disk = this.#selected();
    if (reg === ATA_REG_STATUS) {
      const status = disk?.status ?? 0;
      this.#ack();
      return status;
    }
    if (disk === null) return reg === ATA_REG_DEVICE ? this.#deviceReg : 0;
    return disk.readRegister(reg, (this.#control & ATA_HOB) !== 0);
  }

  #readData(size: AccessSize): number {
    this.#host.counters.dataPortAccesses++;
    const disk = this.#selected();
    if (disk === null) return 0;
    if (size === 2) return disk.readData();
    const lo = disk.readData();
    return (lo + disk.readData() * 0x10000) >>> 0;
  }

  /** Writes `size` bytes of the command block at `offset`. */
  writeCommandBlock(offset: number, size: AccessSize, value: number): void {
    if (offset === ATA_REG_DATA && size !== 1) return this.#writeData(size, value);
    this.#host.counters.registerAccesses++;
    for (let i = 0; i < size; i++) this.#writeRegister(offset + i, (value >>> (8 * i)) & 0xff);
  }

  #writeRegister(reg: number, value: number): void {
    if (reg === ATA_REG_DATA || reg >= ATA_CMD_BLOCK_PORTS) return;
    // While a disk owns the channel (BSY or DRQ) the task file is not the guest's to change.
    if (this.disks.some((d) => d !== null && d.busy)) {
      this.#host.counters.ignored++;
      return;
    }
    // A write to any command-block register clears HOB.
    this.#control &= ~ATA_HOB;
    if (reg === ATA_REG_CMD) {
      const disk = this.#selected();
      if (disk === null || this.#host.closed()) {
        this.#host.counters.ignored++;
        return;
      }
      this.#ack();
      this.#host.counters.commands++;
      disk.execute(value);
      return;
    }
    if (reg === ATA_REG_DEVICE) {
      this.#deviceReg = value | ATA_DEVICE_OBS;
      this.#unit = (value & ATA_DEV1) !== 0 ? 1 : 0;
    }
    for (const disk of this.disks) disk?.writeRegister(reg, value);
  }

  #writeData(size: AccessSize, value: number): void {
    this.#host.counters.dataPortAccesses++;
    const disk = this.#selected();
    if (disk === null) return;
    disk.writeData(value & 0xffff);
    if (size === 4) disk.writeData(value >>> 16);
  }

  /** Reads the control block: alternate status (no INTRQ acknowledge). */
  readControlBlock(offset: number, size: AccessSize): number {
    this.#host.counters.registerAccesses++;
    let value = 0;
    for (let i = 0; i < size; i++) {
      const byte = offset + i === 0 ? (this.#selected()?.status ?? 0) : 0xff;
      value += byte * 2 ** (8 * i);
    }
    return value;
  }

  /** Writes the control block: device control (nIEN, SRST, HOB). */
  writeControlBlock(offset: number, size: AccessSize, value: number): void {
    this.#host.counters.registerAccesses++;
    for (let i = 0; i < size; i++) {
      if (offset + i === 0) this.#writeControl((value >>> (8 * i)) & 0xff);
    }
  }

  #writeControl(value: number): void {
    const old = this.#control;
    this.#control = value;
    if ((old & ATA_SRST) === 0 && (value & ATA_SRST) !== 0) {
      this.beginReset();
    } else if ((old & ATA_SRST) !== 0 && (value & ATA_SRST) === 0) {
      this.endResetWhenSettled();
    }
    this.#updateLine();
  }

  /**
   * Starts a reset of the channel: both disks show BSY and forget their commands (I/O in flight
   * finishes unseen), the bus master stops, INTRQ drops, device 0 is selected.
   */
  beginReset(): void {
    this.#epoch++;
    this.#pending = null;
    this.#running = false;
    this.bmCmd = 0;
    this.bmStatus &= ATA_DMA_DRV0_CAPABLE | ATA_DMA_DRV1_CAPABLE;
    this.#unit = 0;
    this.#deviceReg = ATA_DEVICE_OBS;
    for (const disk of this.disks) disk?.beginReset();
    this.#ack();
  }

  /** Ends the reset once the forgotten I/O has settled (at once when there is none). */
  endResetWhenSettled(): void {
    const epoch = this.#epoch;
    const end = () => {
      if (epoch !== this.#epoch || (this.#control & ATA_SRST) !== 0) return;
      for (const disk of this.disks) disk?.endReset();
    };
    if (this.#inflight === 0) end();
    else this.#whenSettled.push(end);
  }

  /** The function-level reset of the channel: registers to power-on values. */
  powerOnReset(): void {
    this.#control = 0;
    this.beginReset();
    this.bmStatus = 0;
    this.bmTable = 0;
    this.lastDmaError = "";
    this.endResetWhenSettled();
  }

  // ---- Bus master ---------------------------------------------------------------------------------

  /** Reads bus-master register byte `reg` (0..7) of this channel. */
  readBusMaster(reg: number): number {
    switch (reg) {
      case ATA_DMA_CMD:
        return this.bmCmd;
      case ATA_DMA_STATUS:
        return this.bmStatus;
      case ATA_DMA_TABLE_OFS:
      case ATA_DMA_TABLE_OFS + 1:
      case ATA_DMA_TABLE_OFS + 2:
      case ATA_DMA_TABLE_OFS + 3:
        return (this.bmTable >>> (8 * (reg - ATA_DMA_TABLE_OFS))) & 0xff;
      default:
        return 0xff;
    }
  }

  /** Writes bus-master register byte `reg` (0..7) of this channel. */
  writeBusMaster(reg: number, value: number): void {
    switch (reg) {
      case ATA_DMA_CMD: {
        const was = this.bmCmd & ATA_DMA_START;
        this.bmCmd = value & (ATA_DMA_START | ATA_DMA_WR);
        if ((value & ATA_DMA_START) !== 0 && was === 0) {
          this.bmStatus |= ATA_DMA_ACTIVE;
          this.tryStartDma();
        } else if ((value & ATA_DMA_START) === 0 && was !== 0) {
          // A transfer already handed to the block layer finishes; the guest stopped watching.
          this.bmStatus &= ~ATA_DMA_ACTIVE;
        }
        return;
      }
      case ATA_DMA_STATUS:
        // Bits 5-6 are the guest's; ERR and INTR clear when written with 1.
        this.bmStatus = (value & (ATA_DMA_DRV0_CAPABLE | ATA_DMA_DRV1_CAPABLE)) |
          (this.bmStatus & ATA_DMA_ACTIVE) |
          (this.bmStatus & ~value & (ATA_DMA_ERR | ATA_DMA_INTR));
        return;
      case ATA_DMA_TABLE_OFS:
      case ATA_DMA_TABLE_OFS + 1:
      case ATA_DMA_TABLE_OFS + 2:
      case ATA_DMA_TABLE_OFS + 3: {
        const shift = 8 * (reg - ATA_DMA_TABLE_OFS);
        const table = (this.bmTable & ~(0xff << shift)) | ((value & 0xff) << shift);
        // The table is dword aligned: the low two bits read as zero.
        this.bmTable = (table & ~3) >>> 0;
        return;
      }
    }
  }

  /** Runs the waiting DMA command when the bus master is started and bus mastering enabled. */
  tryStartDma(): void {
    if (this.#running || this.#pending === null) return;
    if ((this.bmStatus & ATA_DMA_ACTIVE) === 0 || !this.#host.busMaster()) return;
    const disk = this.#pending;
    this.#pending = null;
    const request = disk.dmaRequest;
    if (request === null) return;
    const pieces = this.#walk(request.bytes);
    if (typeof pieces === "string") {
      this.lastDmaError = pieces;
      this.#host.counters.dmaErrors++;
      this.bmStatus = (this.bmStatus & ~ATA_DMA_ACTIVE) | ATA_DMA_ERR;
      disk.dmaAborted();
      return;
    }
    this.#running = true;
    this.#host.counters.dmaTransfers++;
    const epoch = this.#epoch;
    this.track(
      disk.runDma(pieces).then((error) => {
        if (epoch !== this.#epoch) return;
        this.#running = false;
        this.bmStatus &= ~ATA_DMA_ACTIVE;
        disk.finishDma(error);
      }),
    );
  }

  /**
   * Walks the PRD table for a transfer of `bytes`: the regions, merged where contiguous into pieces
   * of at most {@linkcode IDE_DMA_PIECE_BYTES}, as views of guest RAM; or why the table is refused.
   * Nothing is touched before the whole walk succeeded.
   */
  #walk(bytes: number): Uint8Array[] | string {
    const memory = this.#host.memory;
    const table = this.bmTable;
    const boundary = (Math.floor(table / ATA_PRD_BOUNDARY) + 1) * ATA_PRD_BOUNDARY;
    // (address, length) pairs: at most one per descriptor, so bounded by ATA_PRD_MAX_ENTRIES.
    const regions: number[] = [];
    let start = 0;
    let length = 0;
    let need = bytes;
    for (let i = 0; need > 0; i++) {
      if (i >= ATA_PRD_MAX_ENTRIES) {
        return `PRD table at 0x${hex(table)} has no EOT within ${ATA_PRD_MAX_ENTRIES} descriptors`;
      }
      const at = table + i * ATA_PRD_SZ;
      if (at + ATA_PRD_SZ > boundary) {
        return `PRD table at 0x${hex(table)} crosses a 64 KiB boundary before its EOT`;
      }
      if (!memory.contains(at, ATA_PRD_SZ)) {
        return `PRD descriptor at 0x${hex(at)} is outside guest RAM`;
      }
      const address = memory.u32(at);
      // Byte count bit 0 is zero and 0 means 64 KiB (PIIX; QEMU reads it the same way).
      const count = (memory.u16(at + 4) & 0xfffe) || 0x10000;
      const flags = memory.u16(at + 6);
      if ((address & 1) !== 0) return `PRD descriptor ${i} has an odd address 0x${hex(address)}`;
      const take = Math.min(count, need);
      if (!memory.contains(address, take)) {
        return `PRD descriptor ${i} region 0x${hex(address)}+${take} is outside guest RAM`;
      }
      need -= take;
      if (
        length > 0 && start + length === address && length + take <= IDE_DMA_PIECE_BYTES &&
        memory.contains(start, length + take)
      ) {
        length += take;
      } else {
        if (length > 0) regions.push(start, length);
        start = address;
        length = take;
      }
      if (need > 0 && (flags & ATA_PRD_EOT) !== 0) {
        return `PRD table at 0x${hex(table)} ends (EOT) ${need} bytes short of the transfer`;
      }
    }
    if (length > 0) regions.push(start, length);
    const pieces: Uint8Array[] = [];
    for (let i = 0; i < regions.length; i += 2) {
      pieces.push(memory.slice(regions[i]!, regions[i + 1]!));
    }
    return pieces;
  }
}

function hex(n: number): string {
  return n.toString(16);
}

function allOnes(size: number): number {
  return size === 4 ? 0xffffffff : size === 2 ? 0xffff : 0xff;
}

/** Bytes of config space the guest may write, with the bits it may change (all others read-only). */
const WRITABLE: ReadonlyMap<number, number> = new Map([
  [PCI_COMMAND, PCI_COMMAND_IO | PCI_COMMAND_MASTER],
  [PCI_CACHE_LINE_SIZE + 1, 0xf0], // latency timer
  [PCI_BASE_ADDRESS_0 + 4 * PIIX_BMDMA_BAR, 0xf0],
  [PCI_BASE_ADDRESS_0 + 4 * PIIX_BMDMA_BAR + 1, 0xff],
  [PCI_INTERRUPT_LINE, 0xff],
  ...Array.from(
    { length: PIIX_TIMING_END - PIIX_IDETIM },
    (_, i) => [PIIX_IDETIM + i, 0xff] as [number, number],
  ),
]);

/**
 * The PIIX3 IDE PCI function with up to four ATA disks.
 *
 * @example
 * ```ts
 * import { RawNode } from "../../formats/raw.ts";
 * import { MemoryFile } from "../host/memory.ts";
 * import { GuestMemory } from "../virtio/memory.ts";
 * import { IdeController } from "./ide.ts";
 * const node = await RawNode.open(new MemoryFile("disk", new Uint8Array(1 << 20)));
 * const ide = new IdeController({
 *   drives: [node],
 *   memory: new GuestMemory([{ gpa: 0, size: 1 << 20 }]),
 *   irq: () => {},
 * });
 * ide.configWrite(0x04, 2, 0x1); // I/O decoding on
 * const hit = ide.findPort(0x1f7)!; // primary status
 * if ((ide.ioRead(hit.bar, hit.offset, 1) & 0x40) === 0) throw new Error("not ready");
 * await ide.close();
 * ```
 */
export class IdeController implements PciFunction {
  readonly #config = new Uint8Array(PCI_CONFIG_SPACE_SIZE);
  readonly #channels: readonly [IdeChannel, IdeChannel];
  readonly #counters: Counters;
  readonly #inflight = new Set<Promise<void>>();
  #closed = false;

  /**
   * Builds the function and its disks, in their power-on state (I/O decoding and bus mastering
   * off until the firmware turns them on).
   *
   * @throws {RangeError} for more than four drives, or a model or serial too long for IDENTIFY
   */
  constructor(init: IdeControllerInit) {
    if (init.drives.length > IDE_MAX_DRIVES) {
      throw new RangeError(
        `An IDE controller holds ${IDE_MAX_DRIVES} drives, not ${init.drives.length}`,
      );
    }
    const model = init.model ?? "QEMU HARDDISK";
    if (model.length > ATA_ID_PROD_LEN) {
      throw new RangeError(`IDE model "${model}" is longer than ${ATA_ID_PROD_LEN} characters`);
    }
    if (init.serial !== undefined && init.serial.length > ATA_ID_SERNO_LEN) {
      throw new RangeError(
        `IDE serial "${init.serial}" is longer than ${ATA_ID_SERNO_LEN} characters`,
      );
    }
    this.#counters = {
      ...newAtaCounters(),
      commands: 0,
      ignored: 0,
      registerAccesses: 0,
      interrupts: 0,
      dmaTransfers: 0,
      dmaErrors: 0,
    };
    const host: ChannelHost = {
      memory: init.memory,
      counters: this.#counters,
      irq: init.irq,
      busMaster: () => (this.#command() & PCI_COMMAND_MASTER) !== 0,
      closed: () => this.#closed,
      track: (work) => {
        this.#inflight.add(work);
        work.then(() => this.#inflight.delete(work));
      },
    };
    const channels = [new IdeChannel(0, host), new IdeChannel(1, host)] as const;
    for (const channel of channels) {
      channel.disks = [0, 1].map((unit) => {
        const position = channel.index * 2 + unit;
        const node = init.drives[position] ?? null;
        if (node === null) return null;
        return new AtaDisk({
          node,
          channel,
          counters: this.#counters,
          model,
          serial: init.serial ?? `QM${String(position + 1).padStart(5, "0")}`,
          writeCache: init.writeCache ?? true,
        });
      });
    }
    this.#channels = channels;
    this.#initConfig();
  }

  #initConfig(): void {
    const c = new DataView(this.#config.buffer);
    c.setUint16(PCI_VENDOR_ID, PCI_VENDOR_ID_INTEL, true);
    c.setUint16(PCI_DEVICE_ID, PCI_DEVICE_ID_INTEL_82371SB_1, true);
    c.setUint16(PCI_COMMAND, 0, true);
    c.setUint16(PCI_STATUS, 0x0280, true); // fast back-to-back, medium DEVSEL
    c.setUint8(PCI_CLASS_PROG, PCI_PROG_IF_IDE_COMPAT_BM);
    c.setUint16(PCI_CLASS_DEVICE, PCI_CLASS_STORAGE_IDE, true);
    c.setUint32(PCI_BASE_ADDRESS_0 + 4 * PIIX_BMDMA_BAR, 0x1, true); // an I/O BAR
    c.setUint16(PCI_SUBSYSTEM_VENDOR_ID, 0x1af4, true); // QEMU's default subsystem ids
    c.setUint16(PCI_SUBSYSTEM_ID, 0x1100, true);
  }

  #command(): number {
    return this.#config[PCI_COMMAND]! | (this.#config[PCI_COMMAND + 1]! << 8);
  }

  #busMasterBase(): number {
    const reg = PCI_BASE_ADDRESS_0 + 4 * PIIX_BMDMA_BAR;
    return (this.#config[reg]! | (this.#config[reg + 1]! << 8)) & 0xfff0;
  }

  /** Counters so far (a snapshot). */
  get stats(): IdeStats {
    return { ...this.#counters };
  }

  /** The disk at `position` (0 primary master … 3 secondary slave), or null. */
  disk(position: number): AtaDisk | null {
    if (!Number.isInteger(position) || position < 0 || position >= IDE_MAX_DRIVES) return null;
    return this.#channels[position >> 1]!.disks[position & 1] ?? null;
  }

  /** Why the bus master of `channel` last refused a PRD table ("" when it never did). */
  lastDmaError(channel: 0 | 1): string {
    return this.#channels[channel].lastDmaError;
  }

  // ---- PciFunction -----------------------------------------------------------------------------------

  /** Reads config space; outside it, or with a bad size, all-ones. */
  configRead(offset: number, size: number): number {
    if (!validAccess(offset, size, PCI_CONFIG_SPACE_SIZE)) return allOnes(size);
    let value = 0;
    for (let i = 0; i < size; i++) value += this.#config[offset + i]! * 2 ** (8 * i);
    return value;
  }

  /** Writes config space; read-only bits keep their value. */
  configWrite(offset: number, size: number, value: number): void {
    if (!validAccess(offset, size, PCI_CONFIG_SPACE_SIZE)) return;
    for (let i = 0; i < size; i++) {
      const mask = WRITABLE.get(offset + i);
      if (mask === undefined) continue;
      const byte = Math.floor(value / 2 ** (8 * i)) & 0xff;
      this.#config[offset + i] = (this.#config[offset + i]! & ~mask) | (byte & mask);
    }
    // Bus mastering may just have been enabled under a started bus master.
    for (const channel of this.#channels) channel.tryStartDma();
  }

  /** BAR 4 (the bus master) decodes 16 ports; BARs 0-3 are not implemented in compatibility mode. */
  barSize(bar: number): number {
    return bar === PIIX_BMDMA_BAR ? ATA_DMA_BAR_SIZE : 0;
  }

  /** No memory BARs. */
  findBar(_gpa: number): BarHit | null {
    return null;
  }

  /** No memory BARs: reads all-ones. */
  mmioRead(_bar: number, _offset: number, size: number): number {
    return allOnes(size);
  }

  /** No memory BARs: writes are dropped. */
  mmioWrite(_bar: number, _offset: number, _size: number, _value: number): void {}

  /** The legacy ranges and BAR 4, while I/O decoding is on. */
  findPort(port: number): BarHit | null {
    if ((this.#command() & PCI_COMMAND_IO) === 0) return null;
    if (port >= ATA_PRIMARY_CMD && port < ATA_PRIMARY_CMD + ATA_CMD_BLOCK_PORTS) {
      return { bar: IDE_PRIMARY_CMD_RANGE, offset: port - ATA_PRIMARY_CMD };
    }
    if (port === ATA_PRIMARY_CTL) return { bar: IDE_PRIMARY_CTL_RANGE, offset: 0 };
    if (port >= ATA_SECONDARY_CMD && port < ATA_SECONDARY_CMD + ATA_CMD_BLOCK_PORTS) {
      return { bar: IDE_SECONDARY_CMD_RANGE, offset: port - ATA_SECONDARY_CMD };
    }
    if (port === ATA_SECONDARY_CTL) return { bar: IDE_SECONDARY_CTL_RANGE, offset: 0 };
    const bm = this.#busMasterBase();
    if (bm !== 0 && port >= bm && port < bm + ATA_DMA_BAR_SIZE) {
      return { bar: PIIX_BMDMA_BAR, offset: port - bm };
    }
    return null;
  }

  /** Reads a range {@linkcode findPort} returned; never throws. */
  ioRead(bar: number, offset: number, size: AccessSize): number {
    if (size !== 1 && size !== 2 && size !== 4) return allOnes(size);
    switch (bar) {
      case IDE_PRIMARY_CMD_RANGE:
      case IDE_SECONDARY_CMD_RANGE:
        return this.#channels[bar === IDE_PRIMARY_CMD_RANGE ? 0 : 1].readCommandBlock(offset, size);
      case IDE_PRIMARY_CTL_RANGE:
      case IDE_SECONDARY_CTL_RANGE:
        return this.#channels[bar === IDE_PRIMARY_CTL_RANGE ? 0 : 1].readControlBlock(offset, size);
      case PIIX_BMDMA_BAR: {
        this.#counters.registerAccesses++;
        let value = 0;
        for (let i = 0; i < size; i++) {
          const at = offset + i;
          const byte = at >= 0 && at < ATA_DMA_BAR_SIZE
            ? this.#channels[at >= ATA_DMA_CHANNEL_SIZE ? 1 : 0].readBusMaster(
              at % ATA_DMA_CHANNEL_SIZE,
            )
            : 0xff;
          value += byte * 2 ** (8 * i);
        }
        return value;
      }
      default:
        return allOnes(size);
    }
  }

  /** Writes a range {@linkcode findPort} returned; never throws. */
  ioWrite(bar: number, offset: number, size: AccessSize, value: number): void {
    if (size !== 1 && size !== 2 && size !== 4) return;
    const v = value >>> 0;
    switch (bar) {
      case IDE_PRIMARY_CMD_RANGE:
      case IDE_SECONDARY_CMD_RANGE:
        return this.#channels[bar === IDE_PRIMARY_CMD_RANGE ? 0 : 1].writeCommandBlock(
          offset,
          size,
          v,
        );
      case IDE_PRIMARY_CTL_RANGE:
      case IDE_SECONDARY_CTL_RANGE:
        return this.#channels[bar === IDE_PRIMARY_CTL_RANGE ? 0 : 1].writeControlBlock(
          offset,
          size,
          v,
        );
      case PIIX_BMDMA_BAR:
        this.#counters.registerAccesses++;
        for (let i = 0; i < size; i++) {
          const at = offset + i;
          if (at < 0 || at >= ATA_DMA_BAR_SIZE) continue;
          this.#channels[at >= ATA_DMA_CHANNEL_SIZE ? 1 : 0].writeBusMaster(
            at % ATA_DMA_CHANNEL_SIZE,
            (v >>> (8 * i)) & 0xff,
          );
        }
        return;
    }
  }

  // ---- Life ------------------------------------------------------------------------------------------

  /**
   * Function-level reset (a machine reset): config registers and both channels to power-on values.
   * Block I/O in flight is left to finish and forgotten; the disks show BSY until it has.
   */
  reset(): void {
    this.#config.fill(0);
    this.#initConfig();
    for (const channel of this.#channels) channel.powerOnReset();
  }

  /** Resolves once no block I/O is in flight. */
  async idle(): Promise<void> {
    while (this.#inflight.size > 0) await Promise.all(this.#inflight);
  }

  /** Drops further commands and waits for the I/O in flight; the caller closes the drives. */
  async close(): Promise<void> {
    this.#closed = true;
    await this.idle();
  }
}

function validAccess(offset: number, size: number, limit: number): boolean {
  return (size === 1 || size === 2 || size === 4) && Number.isInteger(offset) && offset >= 0 &&
    offset + size <= limit;
}
