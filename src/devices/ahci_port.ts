/**
 * One AHCI port and the SATA disk behind it (AHCI 1.3.1 §3.3, §5): the port registers, the command
 * engine that fetches command headers from the command list at PxCLB and command tables at CTBA,
 * the FIS receive area at PxFB, and the ATA device — IDENTIFY, DMA reads and writes, NCQ (READ /
 * WRITE FPDMA QUEUED), FLUSH CACHE (EXT), SET FEATURES, DATA SET MANAGEMENT (TRIM) and READ LOG
 * EXT page 10h — over a {@linkcode BlockNode}.
 *
 * The engine, as hardware runs it:
 * - A PxCI write with PxCMD.ST set is the doorbell. The port takes newly issued slots lowest
 *   first. A queued command (FPDMA) is checked, accepted (its PxCI bit clears at once, a D2H
 *   Register FIS without the I bit goes to the receive area) and its I/O starts; many run on the
 *   node together. A non-queued command keeps its PxCI bit until it completes; the port starts the
 *   next slot only then.
 * - Queued commands complete through a Set Device Bits FIS whose SActive field clears their PxSACT
 *   bits. Completions that land close together (within a few microtask turns, while other queued
 *   commands are still finishing) share one SDB FIS and one interrupt.
 * - Any error halts the port (PxIS.TFES, HBFS or OFS; PxTFD.ERR; PxCMD.CCS names the slot) until
 *   the driver clears PxCMD.ST. A device error on a queued command is also recorded for READ LOG
 *   EXT page 10h (the NCQ Command Error log), as a drive does; queued commands still running then
 *   finish their I/O but are never reported (the drive aborted them).
 * - PxCMD.CR reads 1 while ST is set and for as long as I/O of a stopped engine is still running:
 *   a driver that clears ST waits for CR to clear before reusing its memory.
 *
 * Everything the guest controls is checked before use: addresses through {@linkcode GuestMemory}
 * (outside RAM is a host bus fatal error), PRDTs walked and validated in full before any byte
 * moves (a write never reaches the image from a bad PRDT), sector ranges against the capacity
 * (IDNF). The I/O goes straight between guest-memory views and the node, at most
 * `AHCI_DMA_CHUNK` bytes per call; per-slot state is allocated once.
 *
 * @module
 */

import type { BlockNode } from "../block/node.ts";
import type { GuestMemory } from "../virtio/memory.ts";
import {
  AHCI_CMD_HDR_PRDBC,
  AHCI_CMD_HEADER_SIZE,
  AHCI_MAX_CMDS,
  AHCI_RX_FIS_SIZE,
  PORT_CMD,
  PORT_CMD_ALPE,
  PORT_CMD_APSTE,
  PORT_CMD_ASP,
  PORT_CMD_ATAPI,
  PORT_CMD_CCS_MASK,
  PORT_CMD_CCS_SHIFT,
  PORT_CMD_CLO,
  PORT_CMD_DLAE,
  PORT_CMD_FIS_ON,
  PORT_CMD_FIS_RX,
  PORT_CMD_ICC_MASK,
  PORT_CMD_ISSUE,
  PORT_CMD_LIST_ON,
  PORT_CMD_POWER_ON,
  PORT_CMD_SPIN_UP,
  PORT_CMD_START,
  PORT_FIS_ADDR,
  PORT_FIS_ADDR_HI,
  PORT_IRQ_D2H_REG_FIS,
  PORT_IRQ_HBUS_ERR,
  PORT_IRQ_MASK,
  PORT_IRQ_MASK_VALID,
  PORT_IRQ_OVERFLOW,
  PORT_IRQ_PIOS_FIS,
  PORT_IRQ_SDB_FIS,
  PORT_IRQ_STAT,
  PORT_IRQ_TF_ERR,
  PORT_LST_ADDR,
  PORT_LST_ADDR_HI,
  PORT_SCR_ACT,
  PORT_SCR_CTL,
  PORT_SCR_ERR,
  PORT_SCR_NTF,
  PORT_SCR_STAT,
  PORT_SIG,
  PORT_TFDATA,
  PORT_TFDATA_EMPTY,
  SATA_FIS_TYPE_REGISTER_H2D,
  SATA_SCTL_DET_COMRESET,
  SATA_SCTL_DET_MASK,
  SATA_SIGNATURE_DISK,
  SATA_SIGNATURE_NONE,
  SATA_SSTS_DET_PHY_UP,
  SATA_SSTS_IPM_ACTIVE,
  SATA_SSTS_SPD_GEN1,
} from "../ata/ahci_constants.ts";
import {
  ATA_ABORTED,
  ATA_BUSY,
  ATA_CMD_CHECK_POWER_MODE,
  ATA_CMD_DATA_SET_MANAGEMENT,
  ATA_CMD_FLUSH_CACHE,
  ATA_CMD_FLUSH_CACHE_EXT,
  ATA_CMD_IDENTIFY_DEVICE,
  ATA_CMD_READ_DMA,
  ATA_CMD_READ_DMA_EXT,
  ATA_CMD_READ_FPDMA_QUEUED,
  ATA_CMD_READ_LOG_DMA_EXT,
  ATA_CMD_READ_LOG_EXT,
  ATA_CMD_SET_FEATURES,
  ATA_CMD_WRITE_DMA,
  ATA_CMD_WRITE_DMA_EXT,
  ATA_CMD_WRITE_DMA_FUA_EXT,
  ATA_CMD_WRITE_FPDMA_QUEUED,
  ATA_DRDY,
  ATA_DRQ,
  ATA_DSC,
  ATA_DSM_TRIM,
  ATA_ERR,
  ATA_FPDMA_FUA,
  ATA_ID_BYTES,
  ATA_IDNF,
  ATA_LOG_SATA_NCQ,
  ATA_MAX_SECTORS,
  ATA_MAX_SECTORS_LBA48,
  ATA_SECT_SIZE,
  ATA_SRST,
  ATA_UNC,
  SETFEATURES_RA_OFF,
  SETFEATURES_RA_ON,
  SETFEATURES_WC_OFF,
  SETFEATURES_WC_ON,
  SETFEATURES_XFER,
} from "../ata/constants.ts";
import {
  AHCI_DMA_CHUNK,
  AHCI_MAX_DSM_BLOCKS,
  buildNcqErrorLog,
  CommandSlot,
  DsmRanges,
  writeD2hFis,
  writePioSetupFis,
  writeSdbFis,
} from "./ahci_command.ts";
import { buildIdentify } from "./sata_identify.ts";

/** Microtask turns a batch of NCQ completions waits for companions before its SDB FIS goes out. */
const SDB_COALESCE_TURNS = 16;
/** Status after a successful command: DRDY | DSC. */
const STATUS_OK = ATA_DRDY | ATA_DSC;
/** Status of a failed command: DRDY | ERR. */
const STATUS_ERR = ATA_DRDY | ATA_ERR;
/** PxTFD after a reset: DRDY | DSC and error 0x01 ("diagnostics passed"). */
const TFD_AFTER_RESET = 0x0100 | STATUS_OK;
/** PxCMD bits the guest may set (ST, FRE and the link power bits the HBA only stores). */
const PORT_CMD_WRITABLE = PORT_CMD_START | PORT_CMD_FIS_RX | PORT_CMD_ATAPI | PORT_CMD_DLAE |
  PORT_CMD_ALPE | PORT_CMD_ASP | PORT_CMD_APSTE | PORT_CMD_ICC_MASK;
const TWO_32 = 0x1_0000_0000;

/** Counters of an AHCI controller (all ports). */
export interface AhciStats {
  /** ATA commands started (every kind). */
  commands: number;
  /** Of them, READ/WRITE FPDMA QUEUED. */
  ncqCommands: number;
  /** PxCI writes: the doorbell. */
  doorbells: number;
  /** Interrupts raised: MSI messages sent plus INTx assertions. */
  interrupts: number;
  /** Set Device Bits FISes posted (each may complete many queued commands). */
  sdbFises: number;
  /** Commands that ended in an error (TFES, HBFS, OFS). */
  errors: number;
  /** Sectors read from the disks. */
  sectorsRead: number;
  /** Sectors written to the disks. */
  sectorsWritten: number;
  /** Register reads of the guest (ABAR). */
  registerReads: number;
  /** Register writes of the guest (ABAR). */
  registerWrites: number;
  /** Writes the HBA ignored: PxCI or PxSACT with ST clear, doorbells on a port without a disk. */
  ignored: number;
  /** MSI messages not sent: bus mastering off, or an address outside the x86 interrupt window. */
  msiDropped: number;
}

/** A fresh {@linkcode AhciStats}, all zero. */
export function emptyAhciStats(): AhciStats {
  return {
    commands: 0,
    ncqCommands: 0,
    doorbells: 0,
    interrupts: 0,
    sdbFises: 0,
    errors: 0,
    sectorsRead: 0,
    sectorsWritten: 0,
    registerReads: 0,
    registerWrites: 0,
    ignored: 0,
    msiDropped: 0,
  };
}

/** What a port needs of its HBA. */
export interface AhciPortHost {
  /** Guest RAM: command lists, FIS areas, command tables, data. */
  readonly memory: GuestMemory;
  /** The controller's counters. */
  readonly stats: AhciStats;
  /** Bus mastering is on: the port may fetch commands, post FISes and move data. */
  busMaster(): boolean;
  /** The port's PxIS or PxIE changed (a device event, or the guest's write): re-evaluate IS. */
  portInterrupt(port: number): void;
  /** Work began that {@linkcode AhciPortHost.workEnded} will end (I/O, a pending SDB FIS). */
  workStarted(): void;
  /** Work {@linkcode AhciPortHost.workStarted} announced ended. */
  workEnded(): void;
}

/** What a port is built from. */
export interface AhciPortOptions {
  /** Port number, 0..31. */
  readonly index: number;
  /** The disk, or null for an empty port. */
  readonly drive: BlockNode | null;
  /** IDENTIFY model number. */
  readonly model: string;
  /** IDENTIFY serial number. */
  readonly serial: string;
  /** IDENTIFY firmware revision. */
  readonly firmware: string;
  /** The write cache's state at power-on (SET FEATURES changes it). */
  readonly writeCache: boolean;
  /** Offer DATA SET MANAGEMENT TRIM. */
  readonly trim: boolean;
}

/** How a failing command is reported. */
const enum Fail {
  /** The device aborted it: TFES, error ABRT. */
  Abort,
  /** The LBA range is past the end: TFES, error IDNF. */
  Idnf,
  /** The medium failed a read: TFES, error UNC. */
  Unc,
  /** The PRDT holds less than the transfer: OFS | TFES, error ABRT. */
  Overflow,
  /** A pointer outside guest RAM (or DMA with bus mastering off): HBFS. */
  HostBus,
}

/**
 * One port of an AHCI HBA with an optional SATA disk. The controller routes register accesses
 * (as dwords with a byte mask) and reads the port's interrupt state; everything else happens here.
 */
export class AhciPort {
  /** Port number. */
  readonly index: number;
  /** The disk, or null. */
  readonly drive: BlockNode | null;
  /** PxIS. */
  is = 0;
  /** PxIE. */
  ie = 0;
  readonly #host: AhciPortHost;
  readonly #mem: GuestMemory;
  readonly #options: AhciPortOptions;
  readonly #sectors: number;
  readonly #slots: CommandSlot[] = [];
  /** IDENTIFY data, READ LOG pages: one 512-byte buffer, used synchronously. */
  readonly #pio = new Uint8Array(ATA_ID_BYTES);
  /** TRIM ranges of the running DSM command. */
  readonly #dsm = new DsmRanges();
  /** The NCQ Command Error log (page 10h) as the drive would return it; all zero when clear. */
  readonly #ncqLog = new Uint8Array(ATA_SECT_SIZE);
  #clb = 0;
  #clbu = 0;
  #fb = 0;
  #fbu = 0;
  /** PxCMD bits the guest wrote (see PORT_CMD_WRITABLE). */
  #cmd = 0;
  #tfd = PORT_TFDATA_EMPTY;
  #sig = SATA_SIGNATURE_NONE;
  #ssts = 0;
  #sctl = 0;
  #serr = 0;
  #sact = 0;
  #ci = 0;
  #ccs = 0;
  /** Bumped whenever the engine stops or the device resets: older I/O is no longer reported. */
  #epoch = 0;
  /** An error stopped the engine: nothing starts until ST is cleared. */
  #halted = false;
  /** Queued commands accepted and not yet completed (this epoch). */
  #ncqActive = 0;
  /** Queued commands completed, waiting for their SDB FIS. */
  #sdbPending = 0;
  /** The running non-queued command's slot, or -1. */
  #running = -1;
  /** I/O calls running on the node (any epoch): PxCMD.CR stays set while > 0. */
  #inFlight = 0;
  #flushScheduled = false;
  #flushTurns = 0;
  #completions = 0;
  #seenCompletions = 0;
  /** New PxIS bits since the last interrupt evaluation. */
  #raise = false;
  #initD2hSent = false;
  #srst = false;
  #writeCache: boolean;

  /** Builds the port in its power-on state. */
  constructor(host: AhciPortHost, options: AhciPortOptions) {
    this.#host = host;
    this.#mem = host.memory;
    this.#options = options;
    this.index = options.index;
    this.drive = options.drive;
    this.#writeCache = options.writeCache;
    this.#sectors = options.drive === null ? 0 : Math.floor(options.drive.size / ATA_SECT_SIZE);
    if (options.drive !== null) {
      for (let i = 0; i < AHCI_MAX_CMDS; i++) this.#slots.push(new CommandSlot(i));
    }
    this.hbaReset();
  }

  /** Capacity in sectors. */
  get sectors(): number {
    return this.#sectors;
  }

  /** The write cache is on (SET FEATURES 02h/82h). */
  get writeCache(): boolean {
    return this.#writeCache;
  }

  /** I/O calls still running on the node (any epoch). */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Pending interrupt causes the guest enabled: PxIS & PxIE. */
  get pending(): number {
    return (this.is & this.ie) >>> 0;
  }

  /** Power-on (PCI reset): HBA reset, and the command list and FIS pointers cleared too. */
  powerOn(): void {
    this.#clb =
      this.#clbu =
      this.#fb =
      this.#fbu =
        0;
    this.hbaReset();
  }

  /**
   * GHC.HR (AHCI 1.3.1 §10.4.3): every port register back to its reset value except PxCLB(U) and
   * PxFB(U); the link comes up again with the device's signature. I/O in flight is forgotten.
   */
  hbaReset(): void {
    this.is = 0;
    this.ie = 0;
    this.#cmd = 0;
    this.#sctl = 0;
    this.#writeCache = this.#options.writeCache;
    this.#portReset();
  }

  /** COMRESET completion (QEMU's ahci_reset_port): device reset, link up, signature. */
  #portReset(): void {
    this.#stopEngine();
    this.#serr = 0;
    this.#initD2hSent = false;
    this.#srst = false;
    this.#ncqLog.fill(0);
    if (this.drive === null) {
      this.#ssts = 0;
      this.#sig = SATA_SIGNATURE_NONE;
      this.#tfd = PORT_TFDATA_EMPTY;
      return;
    }
    this.#ssts = SATA_SSTS_DET_PHY_UP | SATA_SSTS_SPD_GEN1 | SATA_SSTS_IPM_ACTIVE;
    this.#sig = SATA_SIGNATURE_DISK;
    this.#tfd = TFD_AFTER_RESET;
    if ((this.#cmd & PORT_CMD_FIS_RX) !== 0) this.#postInitD2h();
  }

  /** The engine stops (ST cleared, or a reset): PxCI, PxSACT, CCS cleared; older I/O forgotten. */
  #stopEngine(): void {
    this.#epoch++;
    this.#ci = 0;
    this.#sact = 0;
    this.#ccs = 0;
    this.#ncqActive = 0;
    this.#sdbPending = 0;
    this.#running = -1;
    this.#halted = false;
  }

  // ---- registers ------------------------------------------------------------------------------

  /** Reads the port register at `reg` (a dword offset inside the port's 0x80 bytes). */
  read(reg: number): number {
    switch (reg) {
      case PORT_LST_ADDR:
        return this.#clb;
      case PORT_LST_ADDR_HI:
        return this.#clbu;
      case PORT_FIS_ADDR:
        return this.#fb;
      case PORT_FIS_ADDR_HI:
        return this.#fbu;
      case PORT_IRQ_STAT:
        return this.is >>> 0;
      case PORT_IRQ_MASK:
        return this.ie >>> 0;
      case PORT_CMD:
        return this.#cmdValue();
      case PORT_TFDATA:
        return this.#tfd;
      case PORT_SIG:
        return this.#sig >>> 0;
      case PORT_SCR_STAT:
        return this.#ssts;
      case PORT_SCR_CTL:
        return this.#sctl;
      case PORT_SCR_ERR:
        return this.#serr >>> 0;
      case PORT_SCR_ACT:
        return this.#sact >>> 0;
      case PORT_CMD_ISSUE:
        return this.#ci >>> 0;
      default:
        return 0; // PxSNTF, PxFBS, PxDEVSLP, reserved and vendor registers
    }
  }

  #cmdValue(): number {
    let v = this.#cmd | PORT_CMD_SPIN_UP | PORT_CMD_POWER_ON;
    if ((this.#cmd & PORT_CMD_START) !== 0 || this.#inFlight > 0) v |= PORT_CMD_LIST_ON;
    if ((this.#cmd & PORT_CMD_FIS_RX) !== 0) v |= PORT_CMD_FIS_ON;
    v |= (this.#ccs & PORT_CMD_CCS_MASK) << PORT_CMD_CCS_SHIFT;
    return v >>> 0;
  }

  /**
   * Writes the port register at `reg`: `value` holds the dword, `mask` the bytes the access covered
   * (a byte or word write changes only those bytes; write-1-to-clear/set bits only where written).
   */
  write(reg: number, value: number, mask: number): void {
    const bits = (value & mask) >>> 0;
    const merge = (old: number) => ((old & ~mask) | bits) >>> 0;
    switch (reg) {
      case PORT_LST_ADDR:
        this.#clb = merge(this.#clb) & ~0x3ff; // 1 KiB aligned: bits 0..9 read-only 0
        break;
      case PORT_LST_ADDR_HI:
        this.#clbu = merge(this.#clbu);
        break;
      case PORT_FIS_ADDR:
        this.#fb = merge(this.#fb) & ~0xff; // 256-byte aligned
        break;
      case PORT_FIS_ADDR_HI:
        this.#fbu = merge(this.#fbu);
        break;
      case PORT_IRQ_STAT:
        this.is = (this.is & ~bits) >>> 0;
        this.#host.portInterrupt(this.index);
        break;
      case PORT_IRQ_MASK:
        this.ie = merge(this.ie) & PORT_IRQ_MASK_VALID;
        this.#host.portInterrupt(this.index);
        break;
      case PORT_CMD:
        this.#writeCmd(merge(this.#cmdValue()));
        break;
      case PORT_SCR_CTL:
        this.#writeSctl(merge(this.#sctl) & 0xfff);
        break;
      case PORT_SCR_ERR:
        this.#serr = (this.#serr & ~bits) >>> 0;
        break;
      case PORT_SCR_ACT:
        if ((this.#cmd & PORT_CMD_START) === 0 || this.drive === null) {
          this.#host.stats.ignored++;
          break;
        }
        this.#sact = (this.#sact | bits) >>> 0;
        break;
      case PORT_CMD_ISSUE:
        this.#host.stats.doorbells++;
        if ((this.#cmd & PORT_CMD_START) === 0 || this.drive === null) {
          // The spec leaves PxCI writes with ST clear undefined: the HBA drops them.
          this.#host.stats.ignored++;
          break;
        }
        this.#ci = (this.#ci | bits) >>> 0;
        this.#issue();
        this.#raiseIfNew();
        break;
      case PORT_SCR_NTF:
      default:
        break; // read-only, reserved, or not implemented (PxSNTF, PxFBS, PxDEVSLP)
    }
  }

  #writeCmd(value: number): void {
    const old = this.#cmd;
    const next = (value & PORT_CMD_WRITABLE) >>> 0;
    this.#cmd = next;
    if ((value & PORT_CMD_CLO) !== 0) this.#tfd &= ~(ATA_BUSY | ATA_DRQ);
    const started = (old & PORT_CMD_START) === 0 && (next & PORT_CMD_START) !== 0;
    const stopped = (old & PORT_CMD_START) !== 0 && (next & PORT_CMD_START) === 0;
    if (stopped) this.#stopEngine();
    if ((old & PORT_CMD_FIS_RX) === 0 && (next & PORT_CMD_FIS_RX) !== 0 && this.drive !== null) {
      // QEMU posts the device's first D2H FIS (the signature) once FIS receive is on.
      if (!this.#initD2hSent) this.#postInitD2h();
    }
    if (started) this.#issue();
    this.#raiseIfNew();
  }

  #writeSctl(value: number): void {
    const oldDet = this.#sctl & SATA_SCTL_DET_MASK;
    const det = value & SATA_SCTL_DET_MASK;
    this.#sctl = value;
    if (det === SATA_SCTL_DET_COMRESET && oldDet !== SATA_SCTL_DET_COMRESET) {
      // COMRESET asserted: the link drops and the device stops answering until it is released.
      this.#stopEngine();
      this.#ssts = this.drive === null ? 0 : 1; // DET=1: presence detected, no communication
      this.#tfd = this.drive === null ? PORT_TFDATA_EMPTY : ATA_BUSY;
    } else if (oldDet === SATA_SCTL_DET_COMRESET && det !== SATA_SCTL_DET_COMRESET) {
      this.#portReset();
      this.#raiseIfNew();
    }
  }

  // ---- the command engine -----------------------------------------------------------------------

  /** Starts issued commands, lowest slot first, until a non-queued one runs or the port halts. */
  #issue(): void {
    for (;;) {
      if ((this.#cmd & PORT_CMD_START) === 0 || this.#halted || this.#running >= 0) return;
      const waiting = this.#ci;
      if (waiting === 0) return;
      const slot = 31 - Math.clz32(waiting & -waiting);
      this.#ccs = slot;
      try {
        this.#start(this.#slots[slot]!);
      } catch {
        // Every guest pointer is checked before use; anything else is still the guest's doing
        // as far as the VMM is concerned: the port stops, the VMM goes on.
        this.#fail(this.#slots[slot]!, Fail.HostBus, false);
      }
    }
  }

  /** Fetches slot `s`'s command header and FIS and starts the command. */
  #start(s: CommandSlot): void {
    const mem = this.#mem;
    const bit = 1 << s.index;
    if (!this.#host.busMaster() || !s.fetch(mem, this.#clbu * TWO_32 + this.#clb)) {
      return this.#fail(s, Fail.HostBus, false);
    }
    this.#host.stats.commands++;
    const command = s.command;
    const queued = command === ATA_CMD_READ_FPDMA_QUEUED || command === ATA_CMD_WRITE_FPDMA_QUEUED;
    s.ncq = queued;
    if (s.cfl < 5 || s.fisType !== SATA_FIS_TYPE_REGISTER_H2D || s.atapi) {
      return this.#fail(s, Fail.Abort, false);
    }
    if (!s.isCommand) return this.#control(s, s.control);
    if (s.busy) return this.#fail(s, Fail.Abort, queued); // its earlier I/O still runs
    const { features, count, device, lba48 } = s;
    s.lba = lba48;
    s.sectors = 0;
    s.fua = false;
    if (queued) {
      this.#host.stats.ncqCommands++;
      // AHCI: an NCQ command's tag is its slot; the driver set its PxSACT bit before PxCI.
      const tag = (count >>> 3) & 0x1f;
      const inUse = ((this.#ncqActive | this.#sdbPending) & bit) !== 0;
      if (tag !== s.index || (this.#sact & bit) === 0 || inUse) {
        return this.#fail(s, Fail.Abort, true);
      }
      s.sectors = features === 0 ? ATA_MAX_SECTORS_LBA48 : features;
      s.fua = (device & ATA_FPDMA_FUA) !== 0;
      return this.#startData(s, command === ATA_CMD_WRITE_FPDMA_QUEUED);
    }
    // A non-queued command while queued ones are outstanding: the drive aborts it (ATA8-ACS).
    if (this.#ncqActive !== 0 || this.#sdbPending !== 0) return this.#fail(s, Fail.Abort, false);
    switch (command) {
      case ATA_CMD_READ_DMA_EXT:
      case ATA_CMD_WRITE_DMA_EXT:
      case ATA_CMD_WRITE_DMA_FUA_EXT:
        s.sectors = count === 0 ? ATA_MAX_SECTORS_LBA48 : count;
        s.fua = command === ATA_CMD_WRITE_DMA_FUA_EXT;
        return this.#startData(s, command !== ATA_CMD_READ_DMA_EXT);
      case ATA_CMD_READ_DMA:
      case ATA_CMD_WRITE_DMA:
        s.lba = lba48 % 0x100_0000 + (device & 0xf) * 0x100_0000;
        s.sectors = (count & 0xff) === 0 ? ATA_MAX_SECTORS : count & 0xff;
        return this.#startData(s, command === ATA_CMD_WRITE_DMA);
      case ATA_CMD_IDENTIFY_DEVICE:
        buildIdentify(this.#pio, {
          sectors: this.#sectors,
          model: this.#options.model,
          serial: this.#options.serial,
          firmware: this.#options.firmware,
          writeCache: this.#writeCache,
          trim: this.#trimOn,
          queueDepth: AHCI_MAX_CMDS,
        });
        return this.#dataIn(s, true);
      case ATA_CMD_READ_LOG_EXT:
      case ATA_CMD_READ_LOG_DMA_EXT: {
        // Log address in LBA 7:0, page count in the count field; only page 10h, one page.
        if ((lba48 & 0xff) !== ATA_LOG_SATA_NCQ || count !== 1 || lba48 > 0xff) {
          return this.#fail(s, Fail.Abort, false);
        }
        this.#pio.set(this.#ncqLog);
        this.#ncqLog.fill(0); // reading the log ends the error condition
        return this.#dataIn(s, command === ATA_CMD_READ_LOG_EXT);
      }
      case ATA_CMD_FLUSH_CACHE:
      case ATA_CMD_FLUSH_CACHE_EXT:
        this.#begin(s);
        void this.#flushCache(s, this.#epoch);
        return;
      case ATA_CMD_DATA_SET_MANAGEMENT:
        if (!this.#trimOn || (features & ATA_DSM_TRIM) === 0 || this.drive!.readOnly) {
          return this.#fail(s, Fail.Abort, false);
        }
        if (count === 0 || count > AHCI_MAX_DSM_BLOCKS || this.#dsm.busy) {
          return this.#fail(s, Fail.Abort, false);
        }
        return this.#startTrim(s, count);
      case ATA_CMD_SET_FEATURES:
        return this.#setFeatures(s, features & 0xff);
      case ATA_CMD_CHECK_POWER_MODE:
        // Count FFh: active or idle.
        return this.#completeNonData(s, 0xff);
      default:
        return this.#fail(s, Fail.Abort, false);
    }
  }

  get #trimOn(): boolean {
    return this.#options.trim && this.drive !== null && !this.drive.readOnly;
  }

  /** A Register H2D FIS with C clear: a Device Control update (software reset when SRST falls). */
  #control(s: CommandSlot, control: number): void {
    const srst = (control & ATA_SRST) !== 0;
    const release = this.#srst && !srst;
    this.#srst = srst;
    this.#ci &= ~(1 << s.index);
    if (!release) return;
    // The device resets: queued commands are gone, the signature comes again.
    this.#ncqActive = 0;
    this.#sdbPending = 0;
    this.#sact = 0;
    this.#ncqLog.fill(0);
    this.#tfd = TFD_AFTER_RESET;
    this.#postD2h(STATUS_OK, 0x01, true, 1, 1);
    this.is |= PORT_IRQ_D2H_REG_FIS;
    this.#raise = true;
  }

  #setFeatures(s: CommandSlot, subcommand: number): void {
    switch (subcommand) {
      case SETFEATURES_WC_ON:
        this.#writeCache = true;
        break;
      case SETFEATURES_WC_OFF:
        this.#writeCache = false;
        break;
      case SETFEATURES_XFER:
      case SETFEATURES_RA_ON:
      case SETFEATURES_RA_OFF:
        break;
      default:
        return this.#fail(s, Fail.Abort, false);
    }
    this.#completeNonData(s, 0);
  }

  /** Snapshots slot `s`'s PRDT for `bytes`; false after failing the command. */
  #snapshotPrdt(s: CommandSlot, bytes: number): boolean {
    const result = s.snapshotPrdt(this.#mem, bytes);
    if (result === "ok") return true;
    const kind = result === "host-bus"
      ? Fail.HostBus
      : result === "overflow"
      ? Fail.Overflow
      : Fail.Abort;
    this.#fail(s, kind, s.ncq);
    return false;
  }

  /** Checks and starts a DMA read or write of `s.sectors` at `s.lba`. */
  #startData(s: CommandSlot, write: boolean): void {
    const drive = this.drive!;
    if (s.lba + s.sectors > this.#sectors) return this.#fail(s, Fail.Idnf, s.ncq);
    if (write && drive.readOnly) return this.#fail(s, Fail.Abort, s.ncq);
    if (!this.#snapshotPrdt(s, s.sectors * ATA_SECT_SIZE)) return;
    if (!write && !this.#writeCache) s.fua = false;
    if (write && !this.#writeCache) s.fua = true;
    const bit = 1 << s.index;
    if (s.ncq) {
      // Accepted: PxCI clears now, the drive answers with a D2H FIS (BSY clear, no interrupt).
      this.#ncqActive |= bit;
      this.#ci &= ~bit;
      this.#tfd = (this.#tfd & 0xff00) | STATUS_OK;
      this.#postD2h(STATUS_OK, 0, false, 0, 0);
    }
    this.#begin(s);
    void this.#dma(s, write, this.#epoch);
  }

  /**
   * Marks slot `s` busy before its I/O starts (the I/O may end before the call that starts it
   * returns); a non-queued command becomes the running one. Its I/O reports through #ioDone and
   * never rejects.
   */
  #begin(s: CommandSlot): void {
    s.busy = true;
    this.#inFlight++;
    this.#host.workStarted();
    if (!s.ncq) this.#running = s.index;
  }

  async #dma(s: CommandSlot, write: boolean, epoch: number): Promise<void> {
    let error = 0;
    try {
      const drive = this.drive!;
      const mem = this.#mem;
      let offset = s.lba * ATA_SECT_SIZE;
      const fua = s.fua;
      const prd = s.prd;
      for (let i = 0; i < s.prdPieces; i++) {
        const address = prd[i * 2]!;
        const length = prd[i * 2 + 1]!;
        for (let done = 0; done < length; done += AHCI_DMA_CHUNK) {
          const n = Math.min(AHCI_DMA_CHUNK, length - done);
          const view = mem.slice(address + done, n);
          if (write) await drive.write(offset, view, fua ? { fua: true } : undefined);
          else await drive.read(offset, view);
          offset += n;
        }
      }
    } catch {
      error = write ? ATA_ABORTED : ATA_UNC;
    }
    this.#ioDone(s, epoch, error, write ? 0 : s.sectors, write ? s.sectors : 0);
  }

  async #flushCache(s: CommandSlot, epoch: number): Promise<void> {
    let error = 0;
    try {
      await this.drive!.flush();
    } catch {
      error = ATA_ABORTED;
    }
    this.#ioDone(s, epoch, error, 0, 0);
  }

  /** Copies the TRIM ranges out of the PRDT, checks them all, then discards them one by one. */
  #startTrim(s: CommandSlot, blocks: number): void {
    if (!this.#snapshotPrdt(s, blocks * ATA_SECT_SIZE)) return;
    this.#dsm.load(this.#mem, s, blocks);
    if (!this.#dsm.inside(this.#sectors)) return this.#fail(s, Fail.Idnf, false);
    this.#begin(s);
    void this.#trimRanges(s, this.#epoch);
  }

  async #trimRanges(s: CommandSlot, epoch: number): Promise<void> {
    let error = 0;
    try {
      await this.#dsm.discard(this.drive!);
    } catch {
      error = ATA_ABORTED;
    }
    this.#ioDone(s, epoch, error, 0, 0);
  }

  /** I/O of slot `s` ended (after its last node call); reports it unless its epoch is gone. */
  #ioDone(s: CommandSlot, epoch: number, error: number, read: number, written: number): void {
    s.busy = false;
    this.#inFlight--;
    try {
      if (epoch !== this.#epoch || this.#halted) return; // stopped or aborted meanwhile: dropped
      const bit = 1 << s.index;
      if (s.ncq) {
        this.#ncqActive &= ~bit;
        if (error !== 0) {
          this.#fail(s, error === ATA_UNC ? Fail.Unc : Fail.Abort, true);
        } else {
          this.#countSectors(read, written);
          this.#setPrdbc(s, s.sectors * ATA_SECT_SIZE);
          this.#sdbPending |= bit;
          this.#completions++;
          this.#scheduleSdb();
        }
      } else {
        this.#running = -1;
        if (error !== 0) {
          this.#fail(s, error === ATA_UNC ? Fail.Unc : Fail.Abort, false);
        } else {
          this.#countSectors(read, written);
          this.#setPrdbc(s, (read + written) * ATA_SECT_SIZE);
          this.#completeNonData(s, 0);
          this.#issue();
        }
      }
      this.#raiseIfNew();
    } catch {
      // A FIS area that vanished from RAM mid-command (impossible: RAM never shrinks) or a bug:
      // never let it escape into the event loop as an unhandled rejection.
    } finally {
      this.#host.workEnded();
    }
  }

  #countSectors(read: number, written: number): void {
    this.#host.stats.sectorsRead += read;
    this.#host.stats.sectorsWritten += written;
  }

  #setPrdbc(s: CommandSlot, bytes: number): void {
    if (this.#mem.contains(s.header, AHCI_CMD_HEADER_SIZE)) {
      this.#mem.setU32(s.header + AHCI_CMD_HDR_PRDBC, bytes);
    }
  }

  /** Copies the 512-byte PIO buffer to the PRDT: PIO Setup FIS (`pio`) or a DMA-style D2H FIS. */
  #dataIn(s: CommandSlot, pio: boolean): void {
    if (!this.#snapshotPrdt(s, ATA_ID_BYTES)) return;
    s.scatter(this.#mem, this.#pio);
    this.#setPrdbc(s, ATA_ID_BYTES);
    if (!pio) return this.#completeNonData(s, 0);
    this.#ci &= ~(1 << s.index);
    this.#tfd = STATUS_OK;
    this.#postPioSetup(ATA_ID_BYTES);
    this.is |= PORT_IRQ_PIOS_FIS;
    this.#raise = true;
  }

  /** A non-queued command ends well: D2H FIS with the I bit, PxCI bit cleared. */
  #completeNonData(s: CommandSlot, count: number): void {
    this.#ci &= ~(1 << s.index);
    this.#tfd = STATUS_OK;
    this.#postD2h(STATUS_OK, 0, true, count, 0);
    this.is |= PORT_IRQ_D2H_REG_FIS;
    this.#raise = true;
  }

  // ---- NCQ completion -------------------------------------------------------------------------

  #scheduleSdb(): void {
    if (this.#flushScheduled) return;
    this.#flushScheduled = true;
    this.#flushTurns = 0;
    this.#seenCompletions = this.#completions;
    this.#host.workStarted();
    queueMicrotask(this.#sdbTurn);
  }

  /**
   * One microtask turn of the SDB batch: while queued commands are still finishing and another
   * completed during the last turn, wait one more (bounded); then post the SDB FIS.
   */
  readonly #sdbTurn = (): void => {
    const moving = this.#completions !== this.#seenCompletions;
    if (this.#ncqActive !== 0 && moving && this.#flushTurns < SDB_COALESCE_TURNS) {
      this.#flushTurns++;
      this.#seenCompletions = this.#completions;
      queueMicrotask(this.#sdbTurn);
      return;
    }
    this.#flushScheduled = false;
    try {
      this.#postSdbBatch();
      this.#raiseIfNew();
    } catch {
      // See #ioDone: nothing escapes into the event loop.
    } finally {
      this.#host.workEnded();
    }
  };

  /** Completes every queued command waiting for its SDB FIS in one FIS. */
  #postSdbBatch(): void {
    const done = this.#sdbPending;
    if (done === 0 || this.#halted) return;
    this.#sdbPending = 0;
    this.#sact = (this.#sact & ~done) >>> 0;
    this.#tfd = (this.#tfd & 0xff00) | STATUS_OK;
    this.#postSdb(STATUS_OK, 0, done);
    this.is |= PORT_IRQ_SDB_FIS;
    this.#raise = true;
  }

  // ---- errors ---------------------------------------------------------------------------------

  /**
   * Fails slot `s` and halts the port. Device errors on a queued command (`queued`) go out in an
   * SDB FIS with ERR and into the NCQ error log; on a non-queued one in a D2H FIS with ERR. A host
   * bus error is the HBA's own: no FIS. PxCI keeps the slot's bit; PxCMD.CCS names it.
   */
  #fail(s: CommandSlot, kind: Fail, queued: boolean): void {
    this.#host.stats.errors++;
    this.#halted = true;
    this.#ccs = s.index;
    const error = kind === Fail.Idnf ? ATA_IDNF : kind === Fail.Unc ? ATA_UNC : ATA_ABORTED;
    this.#tfd = (error << 8) | STATUS_ERR;
    this.#raise = true;
    if (kind === Fail.HostBus) {
      this.is |= PORT_IRQ_HBUS_ERR;
      return;
    }
    this.is |= PORT_IRQ_TF_ERR | (kind === Fail.Overflow ? PORT_IRQ_OVERFLOW : 0);
    buildNcqErrorLog(this.#ncqLog, {
      tag: queued ? s.index : null,
      status: STATUS_ERR,
      error,
      lba: s.lba,
      sectors: s.sectors,
    });
    if (queued) {
      // Completions already in hand go out first; the error SDB clears no SActive bit.
      const done = this.#sdbPending;
      if (done !== 0) {
        this.#sdbPending = 0;
        this.#sact = (this.#sact & ~done) >>> 0;
        this.#postSdb(STATUS_OK, 0, done);
      }
      this.#postSdb(STATUS_ERR, error, 0);
      this.is |= PORT_IRQ_SDB_FIS;
    } else {
      this.#postD2h(STATUS_ERR, error, true, 0, 0);
      this.is |= PORT_IRQ_D2H_REG_FIS;
    }
  }

  // ---- FIS receive area -----------------------------------------------------------------------

  /** The FIS receive area's base, or -1 when FIS receive is off or it cannot be written. */
  #fisBase(): number {
    if ((this.#cmd & PORT_CMD_FIS_RX) === 0 || !this.#host.busMaster()) return -1;
    const base = this.#fbu * TWO_32 + this.#fb;
    return this.#mem.contains(base, AHCI_RX_FIS_SIZE) ? base : -1;
  }

  #postD2h(status: number, error: number, irq: boolean, count: number, lba: number): void {
    const base = this.#fisBase();
    if (base >= 0) writeD2hFis(this.#mem, base, { status, error, irq, count, lba });
  }

  #postPioSetup(bytes: number): void {
    const base = this.#fisBase();
    if (base >= 0) writePioSetupFis(this.#mem, base, STATUS_OK | ATA_DRQ, STATUS_OK, bytes);
  }

  #postSdb(status: number, error: number, done: number): void {
    this.#host.stats.sdbFises++;
    if (status !== STATUS_OK) this.#tfd = (error << 8) | status;
    const base = this.#fisBase();
    if (base >= 0) writeSdbFis(this.#mem, base, status, error, done);
  }

  /** The device's first D2H FIS after a reset: its signature (count 1, LBA 1). */
  #postInitD2h(): void {
    if (this.#fisBase() < 0) return;
    this.#initD2hSent = true;
    this.#postD2h(STATUS_OK, 0x01, true, 1, 1);
    this.is |= PORT_IRQ_D2H_REG_FIS;
    this.#raise = true;
  }

  #raiseIfNew(): void {
    if (!this.#raise) return;
    this.#raise = false;
    this.#host.portInterrupt(this.index);
  }
}
