/**
 * An ATA hard disk as QEMU's `ide-hd` presents it: the task-file registers (with the LBA48
 * high-order bytes), IDENTIFY DEVICE data, and the command set a PC guest uses — PIO and DMA
 * reads and writes in LBA28 and LBA48, READ/WRITE MULTIPLE, FLUSH CACHE, SET FEATURES (write cache,
 * transfer mode), DATA SET MANAGEMENT TRIM and EXECUTE DEVICE DIAGNOSTIC. Anything else is
 * aborted (status ERR, error ABRT).
 *
 * The disk knows nothing of ports or PCI: its channel (`ide.ts`) routes register accesses to it,
 * carries its interrupt, and runs the bus master that walks the PRD table. Block I/O is async:
 * while a {@linkcode BlockNode} call is in flight the disk shows BSY, and the continuation sets
 * DRQ or the final status and raises INTRQ through {@linkcode AtaChannelPort.interrupt}. A reset
 * bumps the disk's epoch, so a continuation of a forgotten command changes nothing.
 *
 * Guest-given numbers are checked before use: a range past the end of the medium is IDNF, a
 * sector count past a bound is ABRT, and PIO data goes through one fixed buffer per disk
 * ({@linkcode ATA_PIO_BUFFER_BYTES}) — nothing is allocated in proportion to a guest count.
 *
 * @module
 */

import type { BlockNode } from "../block/node.ts";
import {
  ATA_ABORTED,
  ATA_BUSY,
  ATA_CMD_DATA_SET_MANAGEMENT,
  ATA_CMD_EXECUTE_DEVICE_DIAGNOSTIC,
  ATA_CMD_FLUSH_CACHE,
  ATA_CMD_FLUSH_CACHE_EXT,
  ATA_CMD_IDENTIFY_DEVICE,
  ATA_CMD_READ_DMA,
  ATA_CMD_READ_DMA_EXT,
  ATA_CMD_READ_MULTIPLE,
  ATA_CMD_READ_MULTIPLE_EXT,
  ATA_CMD_READ_SECTORS,
  ATA_CMD_READ_SECTORS_EXT,
  ATA_CMD_SET_FEATURES,
  ATA_CMD_SET_MULTIPLE_MODE,
  ATA_CMD_WRITE_DMA,
  ATA_CMD_WRITE_DMA_EXT,
  ATA_CMD_WRITE_MULTIPLE,
  ATA_CMD_WRITE_MULTIPLE_EXT,
  ATA_CMD_WRITE_SECTORS,
  ATA_CMD_WRITE_SECTORS_EXT,
  ATA_DEVICE_OBS,
  ATA_DIAG_PASSED,
  ATA_DRDY,
  ATA_DRQ,
  ATA_DSC,
  ATA_DSM_RANGE_BYTES,
  ATA_DSM_TRIM,
  ATA_ERR,
  ATA_ID_ADDITIONAL_SUPP,
  ATA_ID_CAPABILITY,
  ATA_ID_CFS_ENABLE_1,
  ATA_ID_CFS_ENABLE_2,
  ATA_ID_CFSSE,
  ATA_ID_COMMAND_SET_1,
  ATA_ID_COMMAND_SET_2,
  ATA_ID_CONFIG,
  ATA_ID_CSF_DEFAULT,
  ATA_ID_CUR_CAPACITY,
  ATA_ID_CUR_CYLS,
  ATA_ID_CUR_HEADS,
  ATA_ID_CUR_SECTORS,
  ATA_ID_CYLS,
  ATA_ID_DATA_SET_MGMT,
  ATA_ID_DSM_MAX_BLOCKS,
  ATA_ID_DWORD_IO,
  ATA_ID_EIDE_DMA_MIN,
  ATA_ID_EIDE_DMA_TIME,
  ATA_ID_EIDE_PIO,
  ATA_ID_EIDE_PIO_IORDY,
  ATA_ID_FIELD_VALID,
  ATA_ID_FW_REV,
  ATA_ID_FW_REV_LEN,
  ATA_ID_HEADS,
  ATA_ID_HW_CONFIG,
  ATA_ID_LBA_CAPACITY,
  ATA_ID_LBA_CAPACITY_2,
  ATA_ID_MAJOR_VER,
  ATA_ID_MAX_MULTSECT,
  ATA_ID_MINOR_VER,
  ATA_ID_MULTSECT,
  ATA_ID_MWDMA_MODES,
  ATA_ID_OLD_DMA_MODES,
  ATA_ID_OLD_PIO_MODES,
  ATA_ID_PIO_MODES,
  ATA_ID_PROD,
  ATA_ID_PROD_LEN,
  ATA_ID_SECTORS,
  ATA_ID_SERNO,
  ATA_ID_SERNO_LEN,
  ATA_ID_SWDMA_MODES,
  ATA_ID_UDMA_MODES,
  ATA_ID_WORDS,
  ATA_IDNF,
  ATA_LBA,
  ATA_LBA28_LIMIT,
  ATA_MAX_DSM_BLOCKS,
  ATA_MAX_MULT_SECTORS,
  ATA_MAX_SECTORS,
  ATA_MAX_SECTORS_LBA48,
  ATA_REG_DEVICE,
  ATA_REG_ERR,
  ATA_REG_FEATURE,
  ATA_REG_LBAH,
  ATA_REG_LBAL,
  ATA_REG_LBAM,
  ATA_REG_NSECT,
  ATA_SECT_SIZE,
  ATA_UNC,
  SETFEATURES_WC_OFF,
  SETFEATURES_WC_ON,
  SETFEATURES_XFER,
} from "../ata/constants.ts";

/** Bytes of a disk's PIO buffer: the read-ahead of PIO reads, and the largest DRQ block. */
export const ATA_PIO_BUFFER_BYTES = 64 * 1024;
const BUFFER_SECTORS = ATA_PIO_BUFFER_BYTES / ATA_SECT_SIZE;
/** The CHS geometry QEMU reports for a disk with no geometry given: 16 heads, 63 sectors. */
const HEADS = 16;
const SECTORS_PER_TRACK = 63;
const MAX_CYLINDERS = 16383;
/** QEMU's firmware revision string (`qemu_hw_version()` for new machine types). */
const FIRMWARE = "2.5+";

/** Counters the disks of one controller share; the controller reports them as its stats. */
export interface AtaCounters {
  /** IDENTIFY DEVICE commands. */
  identify: number;
  /** READ SECTORS / READ MULTIPLE (EXT) commands. */
  readPio: number;
  /** WRITE SECTORS / WRITE MULTIPLE (EXT) commands. */
  writePio: number;
  /** READ DMA (EXT) commands. */
  readDma: number;
  /** WRITE DMA (EXT) commands. */
  writeDma: number;
  /** FLUSH CACHE (EXT) commands. */
  flush: number;
  /** DATA SET MANAGEMENT commands. */
  trim: number;
  /** SET FEATURES commands. */
  setFeatures: number;
  /** Other commands carried out (SET MULTIPLE MODE, EXECUTE DEVICE DIAGNOSTIC). */
  otherCommands: number;
  /** Commands refused with ABRT at once (unknown opcodes, bad parameters). */
  aborted: number;
  /** Sectors the guest read (PIO and DMA). */
  sectorsRead: number;
  /** Sectors the guest wrote (PIO and DMA). */
  sectorsWritten: number;
  /** Data-port accesses (PIO transfers, 2 or 4 bytes each); the channel counts them. */
  dataPortAccesses: number;
  /** Commands that ended with ERR set. */
  errors: number;
}

/** A fresh set of zeroed counters. */
export function newAtaCounters(): AtaCounters {
  return {
    identify: 0,
    readPio: 0,
    writePio: 0,
    readDma: 0,
    writeDma: 0,
    flush: 0,
    trim: 0,
    setFeatures: 0,
    otherCommands: 0,
    aborted: 0,
    sectorsRead: 0,
    sectorsWritten: 0,
    dataPortAccesses: 0,
    errors: 0,
  };
}

/** What a disk needs of the channel it sits on. */
export interface AtaChannelPort {
  /** The disk asserts INTRQ (the channel masks it with nIEN and clears it on a status read). */
  interrupt(): void;
  /** The disk has a DMA command waiting: the bus master runs it once the guest starts it. */
  dmaReady(disk: AtaDisk): void;
  /** Block I/O of the disk started; the channel waits for it before a reset completes. */
  track(work: Promise<void>): void;
}

/** Options of an {@linkcode AtaDisk}. */
export interface AtaDiskOptions {
  /** The medium. */
  readonly node: BlockNode;
  /** The channel. */
  readonly channel: AtaChannelPort;
  /** Counters to add to (shared by the controller's disks). */
  readonly counters: AtaCounters;
  /** IDENTIFY model number (40 characters at most). */
  readonly model: string;
  /** IDENTIFY serial number (20 characters at most). */
  readonly serial: string;
  /** Write cache on at power-up; off makes every write durable (a flush) before it completes. */
  readonly writeCache: boolean;
}

/** The data movement a waiting DMA command asks of the bus master. */
export interface AtaDmaRequest {
  /** True when the transfer writes guest memory (a read from the disk). */
  readonly toMemory: boolean;
  /** Bytes to move. */
  readonly bytes: number;
}

/** What a PIO transfer does when the guest has moved the current DRQ block. */
const PIO_NONE = 0;
const PIO_IN = 1;
const PIO_OUT = 2;
const PIO_IDENTIFY = 3;

const DMA_READ = 0;
const DMA_WRITE = 1;
const DMA_TRIM = 2;

/** A DMA command waiting for, or in, its transfer. */
interface DmaCommand {
  kind: number;
  lba: number;
  sectors: number;
  request: AtaDmaRequest;
}

/**
 * Writes `text` as an ATA string at word `word` of `id`: `bytes` bytes, space padded, each pair of
 * characters swapped (the first character is the high byte of the word).
 */
function putAtaString(id: Uint16Array, word: number, text: string, bytes: number): void {
  const padded = text.padEnd(bytes, " ");
  for (let i = 0; i < bytes / 2; i++) {
    const hi = padded.charCodeAt(2 * i) & 0xff;
    const lo = padded.charCodeAt(2 * i + 1) & 0xff;
    id[word + i] = (hi << 8) | lo;
  }
}

/**
 * One ATA disk: registers, IDENTIFY data, the command in progress. Its channel calls the
 * register methods; the bus master calls {@linkcode AtaDisk.runDma} and
 * {@linkcode AtaDisk.finishDma}.
 */
export class AtaDisk {
  /** The medium. */
  readonly node: BlockNode;
  /** Capacity in sectors. */
  readonly sectors: number;
  /** Whether DATA SET MANAGEMENT TRIM is offered (a writable medium). */
  readonly trim: boolean;
  /** IDENTIFY DEVICE data, as words. */
  readonly identify: Uint16Array = new Uint16Array(ATA_ID_WORDS);

  // Task file; `hob*` hold the previous write of each register (LBA48 high-order bytes).
  /** Features register. */
  feature = 0;
  /** Features register, previous write. */
  hobFeature = 0;
  /** Sector count register. */
  nsector = 0;
  /** Sector count register, previous write. */
  hobNsector = 0;
  /** LBA low register. */
  lbal = 0;
  /** LBA low register, previous write. */
  hobLbal = 0;
  /** LBA mid register. */
  lbam = 0;
  /** LBA mid register, previous write. */
  hobLbam = 0;
  /** LBA high register. */
  lbah = 0;
  /** LBA high register, previous write. */
  hobLbah = 0;
  /** Device register (bits 7 and 5 always set). */
  device: number = ATA_DEVICE_OBS;
  /** Status register. */
  status: number = ATA_DRDY | ATA_DSC;
  /** Error register. */
  error: number = ATA_DIAG_PASSED;

  readonly #channel: AtaChannelPort;
  readonly #counters: AtaCounters;
  readonly #cylinders: number;
  readonly #buffer = new Uint8Array(ATA_PIO_BUFFER_BYTES);
  readonly #scratch = new Uint8Array(ATA_DSM_RANGE_BYTES);
  #writeCache: boolean;
  #multiple = ATA_MAX_MULT_SECTORS;
  #epoch = 0;
  // The PIO transfer: the guest moves buffer bytes [#pos, #end).
  #pio = PIO_NONE;
  #pos = 0;
  #end = 0;
  // The read or write in progress: next sector, sectors left, sectors per DRQ block, LBA48.
  #lba = 0;
  #remaining = 0;
  #block = 1;
  #lba48 = false;
  // Sectors held in the buffer by a PIO read: [#bufLba, #bufLba + #bufSectors).
  #bufLba = 0;
  #bufSectors = 0;
  #dma: DmaCommand | null = null;

  /** A disk over `options.node`, in its power-on state. */
  constructor(options: AtaDiskOptions) {
    this.node = options.node;
    this.#channel = options.channel;
    this.#counters = options.counters;
    this.#writeCache = options.writeCache;
    this.sectors = Math.floor(options.node.size / ATA_SECT_SIZE);
    this.trim = !options.node.readOnly;
    const cylinders = Math.floor(this.sectors / (HEADS * SECTORS_PER_TRACK));
    this.#cylinders = Math.max(1, Math.min(cylinders, MAX_CYLINDERS));
    this.#buildIdentify(options.model, options.serial);
    this.#signature();
  }

  /** Whether the write cache is on (SET FEATURES switches it). */
  get writeCache(): boolean {
    return this.#writeCache;
  }

  /** The current READ/WRITE MULTIPLE block size in sectors (0: disabled). */
  get multiple(): number {
    return this.#multiple;
  }

  /** The DMA command waiting for the bus master, or null. */
  get dmaRequest(): AtaDmaRequest | null {
    return this.#dma?.request ?? null;
  }

  /** True while the disk owns the bus: BSY or DRQ. */
  get busy(): boolean {
    return (this.status & (ATA_BUSY | ATA_DRQ)) !== 0;
  }

  #buildIdentify(model: string, serial: string): void {
    const id = this.identify;
    const chs = this.#cylinders * HEADS * SECTORS_PER_TRACK;
    id[ATA_ID_CONFIG] = 0x0040; // fixed device
    id[ATA_ID_CYLS] = this.#cylinders;
    id[ATA_ID_HEADS] = HEADS;
    id[4] = ATA_SECT_SIZE * SECTORS_PER_TRACK; // retired: unformatted bytes per track
    id[5] = ATA_SECT_SIZE; // retired: unformatted bytes per sector
    id[ATA_ID_SECTORS] = SECTORS_PER_TRACK;
    putAtaString(id, ATA_ID_SERNO, serial, ATA_ID_SERNO_LEN);
    id[20] = 3; // retired: buffer type
    id[21] = 512; // retired: buffer size in sectors
    id[22] = 4; // obsolete: ECC bytes
    putAtaString(id, ATA_ID_FW_REV, FIRMWARE, ATA_ID_FW_REV_LEN);
    putAtaString(id, ATA_ID_PROD, model, ATA_ID_PROD_LEN);
    id[ATA_ID_MAX_MULTSECT] = 0x8000 | ATA_MAX_MULT_SECTORS;
    id[ATA_ID_DWORD_IO] = 1;
    id[ATA_ID_CAPABILITY] = (1 << 11) | (1 << 9) | (1 << 8); // IORDY, LBA, DMA
    id[ATA_ID_OLD_PIO_MODES] = 0x200;
    id[ATA_ID_OLD_DMA_MODES] = 0x200;
    id[ATA_ID_FIELD_VALID] = 1 | (1 << 1) | (1 << 2); // words 54-58, 64-70, 88 valid
    id[ATA_ID_CUR_CYLS] = this.#cylinders;
    id[ATA_ID_CUR_HEADS] = HEADS;
    id[ATA_ID_CUR_SECTORS] = SECTORS_PER_TRACK;
    id[ATA_ID_CUR_CAPACITY] = chs & 0xffff;
    id[ATA_ID_CUR_CAPACITY + 1] = chs >>> 16;
    const lba28 = Math.min(this.sectors, ATA_LBA28_LIMIT - 1);
    id[ATA_ID_LBA_CAPACITY] = lba28 & 0xffff;
    id[ATA_ID_LBA_CAPACITY + 1] = lba28 >>> 16;
    id[ATA_ID_PIO_MODES] = 0x03; // PIO 3-4
    id[ATA_ID_EIDE_DMA_MIN] = 120;
    id[ATA_ID_EIDE_DMA_TIME] = 120;
    id[ATA_ID_EIDE_PIO] = 120;
    id[ATA_ID_EIDE_PIO_IORDY] = 120;
    id[ATA_ID_MAJOR_VER] = 0xf0; // ATA-4 .. ATA-7
    id[ATA_ID_MINOR_VER] = 0x16;
    id[ATA_ID_COMMAND_SET_1] = (1 << 14) | (1 << 5); // NOP, write cache
    id[ATA_ID_COMMAND_SET_2] = (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10); // FLUSH EXT, FLUSH, LBA48
    id[ATA_ID_CFSSE] = 1 << 14;
    id[ATA_ID_CFS_ENABLE_2] = (1 << 13) | (1 << 12) | (1 << 10);
    id[ATA_ID_CSF_DEFAULT] = 1 << 14;
    this.#setTransferMode(0x08, 5); // UDMA 5 selected, as QEMU powers up
    id[ATA_ID_HW_CONFIG] = 1 | (1 << 14) | 0x2000;
    let left = this.sectors;
    for (let w = 0; w < 4; w++) {
      id[ATA_ID_LBA_CAPACITY_2 + w] = left % 0x10000;
      left = Math.floor(left / 0x10000);
    }
    if (this.trim) {
      id[ATA_ID_ADDITIONAL_SUPP] = 1 << 14; // deterministic read after TRIM
      id[ATA_ID_DSM_MAX_BLOCKS] = ATA_MAX_DSM_BLOCKS;
      id[ATA_ID_DATA_SET_MGMT] = 1;
    }
    this.#identifyVolatile();
  }

  /** The IDENTIFY words that follow settings: multiple count and write cache. */
  #identifyVolatile(): void {
    const id = this.identify;
    id[ATA_ID_MULTSECT] = this.#multiple === 0 ? 0 : 0x100 | this.#multiple;
    id[ATA_ID_CFS_ENABLE_1] = (1 << 14) | (this.#writeCache ? 1 << 5 : 0);
  }

  /** Marks transfer mode `mode` of class `klass` (SET FEATURES XFER's bits 3..7) as selected. */
  #setTransferMode(klass: number, mode: number): void {
    const id = this.identify;
    id[ATA_ID_SWDMA_MODES] = 0x07 | (klass === 0x02 ? 1 << (mode + 8) : 0);
    id[ATA_ID_MWDMA_MODES] = 0x07 | (klass === 0x04 ? 1 << (mode + 8) : 0);
    id[ATA_ID_UDMA_MODES] = 0x3f | (klass === 0x08 ? 1 << (mode + 8) : 0);
  }

  /** The register values an ATA disk shows after reset or diagnostics. */
  #signature(): void {
    this.device = (this.device & ~0x0f) | ATA_DEVICE_OBS;
    this.nsector = 1;
    this.lbal = 1;
    this.lbam = 0;
    this.lbah = 0;
    this.hobNsector =
      this.hobLbal =
      this.hobLbam =
      this.hobLbah =
        0;
  }

  // ---- Registers ---------------------------------------------------------------------------------

  /** A write of command-block register `reg` (1..6); the previous value moves to the HOB copy. */
  writeRegister(reg: number, value: number): void {
    const v = value & 0xff;
    switch (reg) {
      case ATA_REG_FEATURE:
        this.hobFeature = this.feature;
        this.feature = v;
        break;
      case ATA_REG_NSECT:
        this.hobNsector = this.nsector;
        this.nsector = v;
        break;
      case ATA_REG_LBAL:
        this.hobLbal = this.lbal;
        this.lbal = v;
        break;
      case ATA_REG_LBAM:
        this.hobLbam = this.lbam;
        this.lbam = v;
        break;
      case ATA_REG_LBAH:
        this.hobLbah = this.lbah;
        this.lbah = v;
        break;
      case ATA_REG_DEVICE:
        this.device = v | ATA_DEVICE_OBS;
        break;
    }
  }

  /** A read of command-block register `reg` (1..6); `hob` reads the high-order bytes. */
  readRegister(reg: number, hob: boolean): number {
    switch (reg) {
      case ATA_REG_ERR:
        return hob ? this.hobFeature : this.error;
      case ATA_REG_NSECT:
        return hob ? this.hobNsector : this.nsector;
      case ATA_REG_LBAL:
        return hob ? this.hobLbal : this.lbal;
      case ATA_REG_LBAM:
        return hob ? this.hobLbam : this.lbam;
      case ATA_REG_LBAH:
        return hob ? this.hobLbah : this.lbah;
      case ATA_REG_DEVICE:
        return this.device;
      default:
        return 0xff;
    }
  }

  // ---- Data port ---------------------------------------------------------------------------------

  /** A 16-bit read of the data port: the next two bytes of a PIO data-in block (0 without DRQ). */
  readData(): number {
    if ((this.status & ATA_DRQ) === 0 || (this.#pio !== PIO_IN && this.#pio !== PIO_IDENTIFY)) {
      return 0;
    }
    const at = this.#pos;
    const word = this.#buffer[at]! | (this.#buffer[at + 1]! << 8);
    this.#pos = at + 2;
    if (this.#pos >= this.#end) this.#blockDone();
    return word;
  }

  /** A 16-bit write of the data port: the next two bytes of a PIO data-out block. */
  writeData(value: number): void {
    if ((this.status & ATA_DRQ) === 0 || this.#pio !== PIO_OUT) return;
    const at = this.#pos;
    this.#buffer[at] = value & 0xff;
    this.#buffer[at + 1] = (value >>> 8) & 0xff;
    this.#pos = at + 2;
    if (this.#pos >= this.#end) this.#blockDone();
  }

  #blockDone(): void {
    const pio = this.#pio;
    this.#pio = PIO_NONE;
    if (pio === PIO_IDENTIFY) {
      this.#complete(false);
    } else if (pio === PIO_IN) {
      const n = (this.#end - (this.#lba - this.#bufLba) * ATA_SECT_SIZE) / ATA_SECT_SIZE;
      this.#counters.sectorsRead += n;
      this.#lba += n;
      this.#remaining -= n;
      // No interrupt after the last block of a PIO read: the command ends when it is read.
      if (this.#remaining === 0) this.#complete(false);
      else this.#fetch();
    } else if (pio === PIO_OUT) {
      this.status = ATA_DRDY | ATA_BUSY;
      this.#channel.track(this.#writeBlock(this.#end / ATA_SECT_SIZE, this.#epoch));
    }
  }

  // ---- Commands ------------------------------------------------------------------------------------

  /**
   * Executes command `command`; the channel has checked the disk is not BSY or DRQ.
   * Ends at once (status, INTRQ) or starts a transfer or block I/O.
   */
  execute(command: number): void {
    this.status = ATA_DRDY | ATA_BUSY;
    this.error = 0;
    this.#pio = PIO_NONE;
    const c = this.#counters;
    switch (command) {
      case ATA_CMD_IDENTIFY_DEVICE: {
        c.identify++;
        const id = this.identify;
        for (let w = 0; w < ATA_ID_WORDS; w++) {
          this.#buffer[2 * w] = id[w]! & 0xff;
          this.#buffer[2 * w + 1] = id[w]! >>> 8;
        }
        this.#startPio(PIO_IDENTIFY, 0, ATA_SECT_SIZE);
        this.status = ATA_DRDY | ATA_DSC | ATA_DRQ;
        this.#channel.interrupt();
        return;
      }
      case ATA_CMD_READ_SECTORS:
      case ATA_CMD_READ_SECTORS_EXT:
      case ATA_CMD_READ_MULTIPLE:
      case ATA_CMD_READ_MULTIPLE_EXT:
      case ATA_CMD_WRITE_SECTORS:
      case ATA_CMD_WRITE_SECTORS_EXT:
      case ATA_CMD_WRITE_MULTIPLE:
      case ATA_CMD_WRITE_MULTIPLE_EXT:
        return this.#startPioCommand(command);
      case ATA_CMD_READ_DMA:
      case ATA_CMD_READ_DMA_EXT:
      case ATA_CMD_WRITE_DMA:
      case ATA_CMD_WRITE_DMA_EXT: {
        const read = command === ATA_CMD_READ_DMA || command === ATA_CMD_READ_DMA_EXT;
        const lba48 = command === ATA_CMD_READ_DMA_EXT || command === ATA_CMD_WRITE_DMA_EXT;
        if (read) c.readDma++;
        else c.writeDma++;
        const range = this.#range(lba48);
        if (range === null) return;
        this.#startDma(read ? DMA_READ : DMA_WRITE, range.lba, range.count, range.count);
        return;
      }
      case ATA_CMD_FLUSH_CACHE:
      case ATA_CMD_FLUSH_CACHE_EXT:
        c.flush++;
        this.#channel.track(this.#flush(this.#epoch));
        return;
      case ATA_CMD_SET_FEATURES:
        c.setFeatures++;
        return this.#setFeatures();
      case ATA_CMD_SET_MULTIPLE_MODE: {
        const n = this.nsector;
        // A power of 2 up to the maximum, or 0 to disable (QEMU's rule).
        if (n > ATA_MAX_MULT_SECTORS || (n & (n - 1)) !== 0) return this.#abort(true);
        c.otherCommands++;
        this.#multiple = n;
        this.#identifyVolatile();
        return this.#complete(true);
      }
      case ATA_CMD_DATA_SET_MANAGEMENT: {
        c.trim++;
        const blocks = (this.hobNsector << 8) | this.nsector;
        if (!this.trim || (this.feature & ATA_DSM_TRIM) === 0) return this.#abort(false);
        // Bounded by IDENTIFY word 105: a guest cannot make us walk more.
        if (blocks === 0 || blocks > ATA_MAX_DSM_BLOCKS) return this.#abort(false);
        this.#startDma(DMA_TRIM, 0, blocks, 0);
        return;
      }
      case ATA_CMD_EXECUTE_DEVICE_DIAGNOSTIC:
        c.otherCommands++;
        this.#signature();
        this.error = ATA_DIAG_PASSED;
        this.status = ATA_DRDY | ATA_DSC;
        this.#channel.interrupt();
        return;
      default:
        return this.#abort(true);
    }
  }

  #startPioCommand(command: number): void {
    const read = command === ATA_CMD_READ_SECTORS || command === ATA_CMD_READ_SECTORS_EXT ||
      command === ATA_CMD_READ_MULTIPLE || command === ATA_CMD_READ_MULTIPLE_EXT;
    const lba48 = command === ATA_CMD_READ_SECTORS_EXT || command === ATA_CMD_READ_MULTIPLE_EXT ||
      command === ATA_CMD_WRITE_SECTORS_EXT || command === ATA_CMD_WRITE_MULTIPLE_EXT;
    const multiple = command === ATA_CMD_READ_MULTIPLE || command === ATA_CMD_READ_MULTIPLE_EXT ||
      command === ATA_CMD_WRITE_MULTIPLE || command === ATA_CMD_WRITE_MULTIPLE_EXT;
    if (read) this.#counters.readPio++;
    else this.#counters.writePio++;
    // READ/WRITE MULTIPLE before SET MULTIPLE MODE enabled it: aborted.
    if (multiple && this.#multiple === 0) return this.#abort(false);
    const range = this.#range(lba48);
    if (range === null) return;
    this.#lba = range.lba;
    this.#remaining = range.count;
    this.#block = multiple ? this.#multiple : 1;
    if (read) {
      this.#bufSectors = 0;
      this.#fetch();
    } else {
      // The first DRQ block of a PIO write comes without an interrupt.
      this.#nextWriteBlock();
    }
  }

  /**
   * The command's starting sector and count from the task file; null (after aborting with IDNF)
   * when the range leaves the medium.
   */
  #range(lba48: boolean): { lba: number; count: number } | null {
    this.#lba48 = lba48;
    let lba: number;
    let count: number;
    if (lba48) {
      lba = ((this.hobLbah << 16) | (this.hobLbam << 8) | this.hobLbal) * 0x100_0000 +
        ((this.lbah << 16) | (this.lbam << 8) | this.lbal);
      count = (this.hobNsector << 8) | this.nsector;
      if (count === 0) count = ATA_MAX_SECTORS_LBA48;
    } else {
      count = this.nsector === 0 ? ATA_MAX_SECTORS : this.nsector;
      if ((this.device & ATA_LBA) !== 0) {
        lba = ((this.device & 0x0f) << 24 | this.lbah << 16 | this.lbam << 8 | this.lbal) >>> 0;
      } else {
        const cylinder = (this.lbah << 8) | this.lbam;
        const head = this.device & 0x0f;
        const sector = this.lbal;
        if (sector === 0 || sector > SECTORS_PER_TRACK || head >= HEADS) {
          this.#fail(ATA_IDNF, -1);
          return null;
        }
        lba = (cylinder * HEADS + head) * SECTORS_PER_TRACK + sector - 1;
      }
    }
    if (lba + count > this.sectors) {
      this.#fail(ATA_IDNF, -1);
      return null;
    }
    return { lba, count };
  }

  #setFeatures(): void {
    switch (this.feature) {
      case SETFEATURES_WC_ON:
      case SETFEATURES_WC_OFF:
        this.#writeCache = this.feature === SETFEATURES_WC_ON;
        this.#identifyVolatile();
        return this.#complete(true);
      case SETFEATURES_XFER: {
        const klass = this.nsector >> 3;
        const mode = this.nsector & 0x07;
        // PIO default/PIO n, single-word DMA 0-2, multiword DMA 0-2, UDMA 0-5 (what word 88 offers).
        const ok = klass === 0x00 || (klass === 0x01 && mode <= 4) ||
          ((klass === 0x02 || klass === 0x04) && mode <= 2) || (klass === 0x08 && mode <= 5);
        if (!ok) return this.#abort(false);
        this.#setTransferMode(klass, mode);
        return this.#complete(true);
      }
      default:
        return this.#abort(false);
    }
  }

  // ---- PIO -------------------------------------------------------------------------------------------

  #startPio(kind: number, from: number, to: number): void {
    this.#pio = kind;
    this.#pos = from;
    this.#end = to;
  }

  /** Presents the next DRQ block of a PIO read, reading ahead into the buffer when it is not there. */
  #fetch(): void {
    const n = Math.min(this.#block, this.#remaining);
    const lba = this.#lba;
    if (lba >= this.#bufLba && lba + n <= this.#bufLba + this.#bufSectors) {
      const from = (lba - this.#bufLba) * ATA_SECT_SIZE;
      this.#startPio(PIO_IN, from, from + n * ATA_SECT_SIZE);
      this.status = ATA_DRDY | ATA_DSC | ATA_DRQ;
      this.#channel.interrupt();
      return;
    }
    this.status = ATA_DRDY | ATA_BUSY;
    // Read ahead as much of the command as fits, in whole DRQ blocks.
    let count = Math.min(this.#remaining, BUFFER_SECTORS);
    if (count > n) count -= count % this.#block;
    this.#channel.track(this.#readAhead(lba, count, this.#epoch));
  }

  async #readAhead(lba: number, count: number, epoch: number): Promise<void> {
    let ok = true;
    try {
      await this.node.read(lba * ATA_SECT_SIZE, this.#buffer.subarray(0, count * ATA_SECT_SIZE));
    } catch {
      ok = false;
    }
    if (epoch !== this.#epoch) return;
    if (!ok) {
      this.#bufSectors = 0;
      // The read-ahead may have failed past the block asked for: read just that block first.
      const n = Math.min(this.#block, this.#remaining);
      if (count > n) return await this.#readAhead(lba, n, epoch);
      return this.#fail(ATA_UNC, lba);
    }
    this.#bufLba = lba;
    this.#bufSectors = count;
    this.#fetch();
  }

  #nextWriteBlock(): void {
    const n = Math.min(this.#block, this.#remaining);
    this.#startPio(PIO_OUT, 0, n * ATA_SECT_SIZE);
    this.status = ATA_DRDY | ATA_DSC | ATA_DRQ;
  }

  async #writeBlock(n: number, epoch: number): Promise<void> {
    const lba = this.#lba;
    let ok = true;
    try {
      await this.node.write(lba * ATA_SECT_SIZE, this.#buffer.subarray(0, n * ATA_SECT_SIZE));
      if (!this.#writeCache) await this.node.flush();
    } catch {
      ok = false;
    }
    if (epoch !== this.#epoch) return;
    if (!ok) return this.#fail(ATA_ABORTED, lba);
    this.#counters.sectorsWritten += n;
    this.#lba += n;
    this.#remaining -= n;
    if (this.#remaining === 0) return this.#complete(true);
    this.#nextWriteBlock();
    this.#channel.interrupt();
  }

  async #flush(epoch: number): Promise<void> {
    let ok = true;
    try {
      await this.node.flush();
    } catch {
      ok = false;
    }
    if (epoch !== this.#epoch) return;
    if (!ok) return this.#fail(ATA_ABORTED, -1);
    this.#complete(true);
  }

  // ---- DMA -------------------------------------------------------------------------------------------

  #startDma(kind: number, lba: number, blocks: number, sectors: number): void {
    this.#dma = {
      kind,
      lba,
      sectors,
      request: { toMemory: kind === DMA_READ, bytes: blocks * ATA_SECT_SIZE },
    };
    this.status = ATA_DRDY | ATA_DSC | ATA_DRQ;
    this.#channel.dmaReady(this);
  }

  /**
   * The transfer of the waiting DMA command between the medium and `pieces` (guest-memory views
   * the bus master validated, in order, totalling the request's bytes).
   *
   * @returns the error register value the command ends with (0 when it succeeded); never rejects
   */
  async runDma(pieces: readonly Uint8Array[]): Promise<number> {
    const dma = this.#dma;
    if (dma === null) return ATA_ABORTED;
    try {
      if (dma.kind === DMA_TRIM) return await this.#trim(pieces);
      let offset = dma.lba * ATA_SECT_SIZE;
      for (const piece of pieces) {
        if (dma.kind === DMA_READ) await this.node.read(offset, piece);
        else await this.node.write(offset, piece);
        offset += piece.length;
      }
      if (dma.kind === DMA_WRITE && !this.#writeCache) await this.node.flush();
    } catch {
      return dma.kind === DMA_READ ? ATA_UNC : ATA_ABORTED;
    }
    return 0;
  }

  /**
   * DATA SET MANAGEMENT TRIM: every range entry is checked against the medium first, so a bad
   * list changes nothing; then each is discarded.
   */
  async #trim(pieces: readonly Uint8Array[]): Promise<number> {
    let bad = 0;
    this.#forEachRange(pieces, (lba, count) => {
      if (lba + count > this.sectors) bad = ATA_IDNF;
    });
    if (bad !== 0) return bad;
    const ranges: number[] = [];
    // At most ATA_MAX_DSM_BLOCKS × 64 entries: a bounded list.
    this.#forEachRange(pieces, (lba, count) => ranges.push(lba, count));
    for (let i = 0; i < ranges.length; i += 2) {
      const lba = ranges[i]!;
      const count = ranges[i + 1]!;
      // Guest RAM may have changed under us since the check: the medium bound holds regardless.
      if (lba + count > this.sectors) return ATA_IDNF;
      await this.node.discard(lba * ATA_SECT_SIZE, count * ATA_SECT_SIZE);
    }
    return 0;
  }

  /** Calls `range` for each non-empty LBA range entry in `pieces`. */
  #forEachRange(pieces: readonly Uint8Array[], range: (lba: number, count: number) => void): void {
    const entry = this.#scratch;
    let have = 0;
    for (const piece of pieces) {
      for (let i = 0; i < piece.length; i++) {
        entry[have++] = piece[i]!;
        if (have < ATA_DSM_RANGE_BYTES) continue;
        have = 0;
        const count = entry[6]! | (entry[7]! << 8);
        if (count === 0) continue;
        const lba = (entry[0]! | entry[1]! << 8 | entry[2]! << 16) +
          (entry[3]! | entry[4]! << 8 | entry[5]! << 16) * 0x100_0000;
        range(lba, count);
      }
    }
  }

  /** Ends the DMA command with `error` (0: success) and raises INTRQ; after {@linkcode runDma}. */
  finishDma(error: number): void {
    const dma = this.#dma;
    this.#dma = null;
    if (dma === null) return;
    if (error !== 0) return this.#fail(error, dma.kind === DMA_TRIM ? -1 : dma.lba);
    if (dma.kind === DMA_READ) this.#counters.sectorsRead += dma.sectors;
    else if (dma.kind === DMA_WRITE) this.#counters.sectorsWritten += dma.sectors;
    this.#complete(true);
  }

  /** The bus master refused the PRD table: the command ends with ABRT, nothing transferred. */
  dmaAborted(): void {
    if (this.#dma === null) return;
    this.#dma = null;
    this.#fail(ATA_ABORTED, -1);
  }

  // ---- Endings and resets -------------------------------------------------------------------------

  /** The command succeeded: DRDY and DSC, and INTRQ unless it was the end of a PIO read. */
  #complete(interrupt: boolean): void {
    this.#pio = PIO_NONE;
    this.status = ATA_DRDY | ATA_DSC;
    if (interrupt) this.#channel.interrupt();
  }

  /** Aborts the command at once (ABRT); `unknown` counts it as an unsupported opcode. */
  #abort(unknown: boolean): void {
    if (unknown) this.#counters.aborted++;
    this.#fail(ATA_ABORTED, -1);
  }

  /** Ends the command with ERR and `error`; `lba` ≥ 0 goes to the address registers. */
  #fail(error: number, lba: number): void {
    this.#pio = PIO_NONE;
    this.#dma = null;
    this.#counters.errors++;
    if (lba >= 0) this.#setAddress(lba);
    this.error = error;
    this.status = ATA_DRDY | ATA_ERR;
    this.#channel.interrupt();
  }

  /** Puts `lba` in the address registers (the first sector in error), in the command's format. */
  #setAddress(lba: number): void {
    if (this.#lba48) {
      const hi = Math.floor(lba / 0x100_0000);
      this.lbal = lba & 0xff;
      this.lbam = (lba >>> 8) & 0xff;
      this.lbah = (lba >>> 16) & 0xff;
      this.hobLbal = hi & 0xff;
      this.hobLbam = (hi >>> 8) & 0xff;
      this.hobLbah = (hi >>> 16) & 0xff;
    } else if ((this.device & ATA_LBA) !== 0) {
      this.lbal = lba & 0xff;
      this.lbam = (lba >>> 8) & 0xff;
      this.lbah = (lba >>> 16) & 0xff;
      this.device = (this.device & ~0x0f) | ((lba >>> 24) & 0x0f);
    } else {
      const cylinder = Math.floor(lba / (HEADS * SECTORS_PER_TRACK));
      const rest = lba % (HEADS * SECTORS_PER_TRACK);
      this.lbam = cylinder & 0xff;
      this.lbah = (cylinder >>> 8) & 0xff;
      this.device = (this.device & ~0x0f) | Math.floor(rest / SECTORS_PER_TRACK);
      this.lbal = (rest % SECTORS_PER_TRACK) + 1;
    }
  }

  /**
   * The start of a reset (SRST, or the controller's): the command in progress is forgotten (its
   * block I/O may still finish, to no effect) and the disk shows BSY until {@linkcode endReset}.
   */
  beginReset(): void {
    this.#epoch++;
    this.#pio = PIO_NONE;
    this.#dma = null;
    this.#bufSectors = 0;
    this.status = ATA_BUSY;
  }

  /** The end of a reset: power-on register values, the ATA signature, DRDY. */
  endReset(): void {
    this.feature = this.hobFeature = 0;
    this.device = ATA_DEVICE_OBS;
    this.#multiple = ATA_MAX_MULT_SECTORS;
    this.#identifyVolatile();
    this.#signature();
    this.error = ATA_DIAG_PASSED;
    this.status = ATA_DRDY | ATA_DSC;
  }
}
