/**
 * ATA numbers, named as the specifications do: the task-file registers and their bits (ATA/ATAPI-6
 * §7), the commands an `ide-hd` or a SATA disk answers (ACS-2 names, e.g. READ DMA EXT →
 * `ATA_CMD_READ_DMA_EXT`, with Linux's name in the comment where it differs), IDENTIFY DEVICE word
 * numbers (Linux's `ATA_ID_*`), the NCQ error log, and the PIIX bus-master IDE registers and
 * physical region descriptors (Intel 82371SB datasheet §2.7; Linux's `ATA_DMA_*`, `ATA_PRD_*`).
 * Numbers only, spoken by both ends: the emulated controllers and disks (`src/devices/ide.ts`,
 * `ata.ts`, the AHCI port) and the guest's drivers (`src/guest/ide_driver.ts`, `ahci_hba.ts`) read
 * the same map. The AHCI register map and the FIS layouts are in `ahci_constants.ts`.
 *
 * @module
 */

// ---- Sizes ------------------------------------------------------------------------------------------

/** Bytes of a logical sector. */
export const ATA_SECT_SIZE = 512;
/** 16-bit words of IDENTIFY DEVICE data. */
export const ATA_ID_WORDS = 256;
/** Bytes of IDENTIFY DEVICE data. */
export const ATA_ID_BYTES = ATA_ID_WORDS * 2;
/** Most sectors an LBA28 command moves (a sector count of 0). */
export const ATA_MAX_SECTORS = 256;
/** Most sectors an LBA48 command moves (a sector count of 0). */
export const ATA_MAX_SECTORS_LBA48 = 65536;
/** Sectors an LBA28 address reaches. */
export const ATA_LBA28_LIMIT = 1 << 28;
/** Largest DRQ block of READ/WRITE MULTIPLE, in sectors (QEMU's MAX_MULT_SECTORS). */
export const ATA_MAX_MULT_SECTORS = 16;
/** 512-byte blocks of LBA range entries one DATA SET MANAGEMENT command may carry (word 105). */
export const ATA_MAX_DSM_BLOCKS = 8;
/** Bytes of one DSM LBA range entry: 48-bit LBA and 16-bit sector count. */
export const ATA_DSM_RANGE_BYTES = 8;
/** Largest sector count of one DSM LBA range entry. */
export const ATA_DSM_RANGE_MAX = 0xffff;
/** LBA range entries one 512-byte block of DSM data holds. */
export const ATA_MAX_TRIM_RNUM = ATA_SECT_SIZE / ATA_DSM_RANGE_BYTES;

// ---- Legacy ports (compatibility mode) ---------------------------------------------------------------

/** Primary channel command block. */
export const ATA_PRIMARY_CMD = 0x1f0;
/** Primary channel control block (alternate status / device control). */
export const ATA_PRIMARY_CTL = 0x3f6;
/** Secondary channel command block. */
export const ATA_SECONDARY_CMD = 0x170;
/** Secondary channel control block. */
export const ATA_SECONDARY_CTL = 0x376;
/** Ports of a command block. */
export const ATA_CMD_BLOCK_PORTS = 8;

// ---- Command block register offsets --------------------------------------------------------------------

/** Command-block offset of the data register (16-bit PIO transfers). */
export const ATA_REG_DATA = 0;
/** Command-block offset of the error register (read). */
export const ATA_REG_ERR = 1;
/** Command-block offset of the features register (write). */
export const ATA_REG_FEATURE = 1;
/** Command-block offset of the sector count register. */
export const ATA_REG_NSECT = 2;
/** Command-block offset of LBA low (sector number). */
export const ATA_REG_LBAL = 3;
/** Command-block offset of LBA mid (cylinder low). */
export const ATA_REG_LBAM = 4;
/** Command-block offset of LBA high (cylinder high). */
export const ATA_REG_LBAH = 5;
/** Command-block offset of the device (drive/head) register. */
export const ATA_REG_DEVICE = 6;
/** Command-block offset of the status register (read; acknowledges INTRQ). */
export const ATA_REG_STATUS = 7;
/** Command-block offset of the command register (write). */
export const ATA_REG_CMD = 7;

// ---- Status register ---------------------------------------------------------------------------------

/** Status: the device is busy; no other bit is valid. */
export const ATA_BUSY = 0x80;
/** Status: the device is ready to accept commands. */
export const ATA_DRDY = 0x40;
/** Status: device fault. */
export const ATA_DF = 0x20;
/** Status: device seek complete (obsolete; QEMU still sets it). */
export const ATA_DSC = 0x10;
/** Status: the device is ready to transfer data. */
export const ATA_DRQ = 0x08;
/** Status: corrected data (obsolete). */
export const ATA_CORR = 0x04;
/** Status: index (obsolete). */
export const ATA_IDX = 0x02;
/** Status: the command ended in error; see the error register. */
export const ATA_ERR = 0x01;

// ---- Error register ------------------------------------------------------------------------------------

/** Error: interface CRC error. */
export const ATA_ICRC = 0x80;
/** Error: uncorrectable data (a failed read). */
export const ATA_UNC = 0x40;
/** Error: media changed. */
export const ATA_MC = 0x20;
/** Error: ID not found (an address past the end of the medium). */
export const ATA_IDNF = 0x10;
/** Error: media change requested. */
export const ATA_MCR = 0x08;
/** Error: command aborted. */
export const ATA_ABORTED = 0x04;
/** Error: track 0 not found (obsolete). */
export const ATA_TRK0NF = 0x02;
/** Error: address mark not found (obsolete). */
export const ATA_AMNF = 0x01;
/** Error register after reset or diagnostics: device 0 passed (device 1 passed or absent). */
export const ATA_DIAG_PASSED = 0x01;

// ---- Device register -----------------------------------------------------------------------------------

/** Bits 7 and 5, obsolete, always written as ones. */
export const ATA_DEVICE_OBS = 0xa0;
/** Device 1 (slave) selected. */
export const ATA_DEV1 = 0x10;
/** LBA addressing (else CHS). */
export const ATA_LBA = 0x40;
/** FPDMA QUEUED commands: bit 7, force unit access. */
export const ATA_FPDMA_FUA = 0x80;

// ---- Device control register ---------------------------------------------------------------------------

/** Interrupts disabled (INTRQ masked). */
export const ATA_NIEN = 0x02;
/** Software reset of both devices of the channel. */
export const ATA_SRST = 0x04;
/** High-order byte: reads return the previous (HOB) register values. */
export const ATA_HOB = 0x80;

// ---- Commands (ACS-2 names) ------------------------------------------------------------------------------

/** NOP: always aborted. */
export const ATA_CMD_NOP = 0x00;
/** DATA SET MANAGEMENT (TRIM), DMA data-out of LBA range entries. */
export const ATA_CMD_DATA_SET_MANAGEMENT = 0x06;
/** READ SECTORS: PIO data-in, LBA28. */
export const ATA_CMD_READ_SECTORS = 0x20;
/** READ SECTORS EXT: PIO data-in, LBA48. */
export const ATA_CMD_READ_SECTORS_EXT = 0x24;
/** READ DMA EXT: DMA data-in, LBA48. */
export const ATA_CMD_READ_DMA_EXT = 0x25;
/** READ MULTIPLE EXT: PIO data-in in multi-sector blocks, LBA48. */
export const ATA_CMD_READ_MULTIPLE_EXT = 0x29;
/** WRITE SECTORS: PIO data-out, LBA28. */
export const ATA_CMD_WRITE_SECTORS = 0x30;
/** WRITE SECTORS EXT: PIO data-out, LBA48. */
export const ATA_CMD_WRITE_SECTORS_EXT = 0x34;
/** WRITE DMA EXT: DMA data-out, LBA48. */
export const ATA_CMD_WRITE_DMA_EXT = 0x35;
/** READ LOG EXT: a log page, PIO data-in. */
export const ATA_CMD_READ_LOG_EXT = 0x2f;
/** WRITE MULTIPLE EXT: PIO data-out in multi-sector blocks, LBA48. */
export const ATA_CMD_WRITE_MULTIPLE_EXT = 0x39;
/** WRITE DMA FUA EXT: DMA data-out, LBA48, forced unit access (Linux: `ATA_CMD_WRITE_FUA_EXT`). */
export const ATA_CMD_WRITE_DMA_FUA_EXT = 0x3d;
/** READ LOG DMA EXT: a log page, DMA data-in. */
export const ATA_CMD_READ_LOG_DMA_EXT = 0x47;
/** READ FPDMA QUEUED: an NCQ read, tag in the count field (Linux: `ATA_CMD_FPDMA_READ`). */
export const ATA_CMD_READ_FPDMA_QUEUED = 0x60;
/** WRITE FPDMA QUEUED: an NCQ write, tag in the count field (Linux: `ATA_CMD_FPDMA_WRITE`). */
export const ATA_CMD_WRITE_FPDMA_QUEUED = 0x61;
/** EXECUTE DEVICE DIAGNOSTIC: the signature and a diagnostic code. */
export const ATA_CMD_EXECUTE_DEVICE_DIAGNOSTIC = 0x90;
/** IDENTIFY PACKET DEVICE: an ATAPI device's IDENTIFY (Linux: `ATA_CMD_ID_ATAPI`). */
export const ATA_CMD_IDENTIFY_PACKET_DEVICE = 0xa1;
/** READ MULTIPLE: PIO data-in in multi-sector blocks, LBA28. */
export const ATA_CMD_READ_MULTIPLE = 0xc4;
/** WRITE MULTIPLE: PIO data-out in multi-sector blocks, LBA28. */
export const ATA_CMD_WRITE_MULTIPLE = 0xc5;
/** SET MULTIPLE MODE: sectors per DRQ block of READ/WRITE MULTIPLE. */
export const ATA_CMD_SET_MULTIPLE_MODE = 0xc6;
/** READ DMA: DMA data-in, LBA28. */
export const ATA_CMD_READ_DMA = 0xc8;
/** WRITE DMA: DMA data-out, LBA28. */
export const ATA_CMD_WRITE_DMA = 0xca;
/** CHECK POWER MODE: the power state in the count register (Linux: `ATA_CMD_CHK_POWER`). */
export const ATA_CMD_CHECK_POWER_MODE = 0xe5;
/** FLUSH CACHE: the write cache to the medium. */
export const ATA_CMD_FLUSH_CACHE = 0xe7;
/** IDENTIFY DEVICE: 256 words of PIO data-in. */
export const ATA_CMD_IDENTIFY_DEVICE = 0xec;
/** FLUSH CACHE EXT: the write cache to the medium (LBA48 disks). */
export const ATA_CMD_FLUSH_CACHE_EXT = 0xea;
/** SET FEATURES: the features register names the subcommand. */
export const ATA_CMD_SET_FEATURES = 0xef;

/** DATA SET MANAGEMENT feature bit 0: the ranges are to be trimmed. */
export const ATA_DSM_TRIM = 0x01;

/** SET FEATURES: enable the write cache. */
export const SETFEATURES_WC_ON = 0x02;
/** SET FEATURES: set the transfer mode (sector count register). */
export const SETFEATURES_XFER = 0x03;
/** SET FEATURES: disable read look-ahead. */
export const SETFEATURES_RA_OFF = 0x55;
/** SET FEATURES: disable the write cache. */
export const SETFEATURES_WC_OFF = 0x82;
/** SET FEATURES: enable read look-ahead. */
export const SETFEATURES_RA_ON = 0xaa;
/** Transfer mode: PIO default mode. */
export const XFER_PIO_DEFAULT = 0x00;
/** Transfer mode: PIO mode 0 (+ n for mode n). */
export const XFER_PIO_0 = 0x08;
/** Transfer mode: single-word DMA mode 0 (+ n). */
export const XFER_SW_DMA_0 = 0x10;
/** Transfer mode: multiword DMA mode 0 (+ n). */
export const XFER_MW_DMA_0 = 0x20;
/** Transfer mode: Ultra DMA mode 0 (+ n). */
export const XFER_UDMA_0 = 0x40;

/** Log address of the NCQ Command Error log (READ LOG EXT page 10h). */
export const ATA_LOG_SATA_NCQ = 0x10;
/** NCQ error log byte 0, bit 7 (NQ): the failed command was not queued. */
export const ATA_LOG_NCQ_NQ = 0x80;

// ---- IDENTIFY DEVICE words -----------------------------------------------------------------------------

/** IDENTIFY word: general configuration (0x0040: fixed device). */
export const ATA_ID_CONFIG = 0;
/** IDENTIFY word: default cylinders. */
export const ATA_ID_CYLS = 1;
/** IDENTIFY word: default heads. */
export const ATA_ID_HEADS = 3;
/** IDENTIFY word: default sectors per track. */
export const ATA_ID_SECTORS = 6;
/** IDENTIFY words 10-19: serial number, an ATA string. */
export const ATA_ID_SERNO = 10;
/** Bytes of the serial number. */
export const ATA_ID_SERNO_LEN = 20;
/** IDENTIFY words 23-26: firmware revision, an ATA string. */
export const ATA_ID_FW_REV = 23;
/** Bytes of the firmware revision. */
export const ATA_ID_FW_REV_LEN = 8;
/** IDENTIFY words 27-46: model number, an ATA string. */
export const ATA_ID_PROD = 27;
/** Bytes of the model number. */
export const ATA_ID_PROD_LEN = 40;
/** Bits 0..7: most sectors per DRQ block of READ/WRITE MULTIPLE (bit 15 set). */
export const ATA_ID_MAX_MULTSECT = 47;
/** IDENTIFY word: 32-bit I/O supported (QEMU sets 1). */
export const ATA_ID_DWORD_IO = 48;
/** Bit 8 DMA, bit 9 LBA supported. */
export const ATA_ID_CAPABILITY = 49;
/** IDENTIFY word: PIO timing mode (obsolete). */
export const ATA_ID_OLD_PIO_MODES = 51;
/** IDENTIFY word: DMA timing mode (obsolete). */
export const ATA_ID_OLD_DMA_MODES = 52;
/** IDENTIFY word: words 54-58, 64-70 and 88 are valid. */
export const ATA_ID_FIELD_VALID = 53;
/** IDENTIFY word: current cylinders. */
export const ATA_ID_CUR_CYLS = 54;
/** IDENTIFY word: current heads. */
export const ATA_ID_CUR_HEADS = 55;
/** IDENTIFY word: current sectors per track. */
export const ATA_ID_CUR_SECTORS = 56;
/** IDENTIFY words 57-58: current CHS capacity in sectors. */
export const ATA_ID_CUR_CAPACITY = 57;
/** Bit 8: bits 0..7 hold the current multiple count. */
export const ATA_ID_MULTSECT = 59;
/** LBA28 capacity in sectors, words 60-61. */
export const ATA_ID_LBA_CAPACITY = 60;
/** IDENTIFY word: single-word DMA modes supported (low byte) and selected (high). */
export const ATA_ID_SWDMA_MODES = 62;
/** IDENTIFY word: multiword DMA modes supported (low byte) and selected (high). */
export const ATA_ID_MWDMA_MODES = 63;
/** IDENTIFY word: advanced PIO modes supported. */
export const ATA_ID_PIO_MODES = 64;
/** IDENTIFY word: minimum multiword DMA cycle time (ns). */
export const ATA_ID_EIDE_DMA_MIN = 65;
/** IDENTIFY word: recommended multiword DMA cycle time (ns). */
export const ATA_ID_EIDE_DMA_TIME = 66;
/** IDENTIFY word: minimum PIO cycle time without IORDY (ns). */
export const ATA_ID_EIDE_PIO = 67;
/** IDENTIFY word: minimum PIO cycle time with IORDY (ns). */
export const ATA_ID_EIDE_PIO_IORDY = 68;
/** Bit 14: deterministic read after TRIM. */
export const ATA_ID_ADDITIONAL_SUPP = 69;
/** Bits 0..4: NCQ queue depth minus one. */
export const ATA_ID_QUEUE_DEPTH = 75;
/** SATA capabilities; bit 8: NCQ supported. */
export const ATA_ID_SATA_CAPABILITY = 76;
/** IDENTIFY word: major version (one bit per ATA standard). */
export const ATA_ID_MAJOR_VER = 80;
/** IDENTIFY word: minor version. */
export const ATA_ID_MINOR_VER = 81;
/** Bit 5: write cache supported; bit 14 NOP. */
export const ATA_ID_COMMAND_SET_1 = 82;
/** Bit 10 LBA48, 12 FLUSH CACHE, 13 FLUSH CACHE EXT; bit 14 set, 15 clear. */
export const ATA_ID_COMMAND_SET_2 = 83;
/** IDENTIFY word: command set/feature supported extension. */
export const ATA_ID_CFSSE = 84;
/** Bit 5: write cache enabled. */
export const ATA_ID_CFS_ENABLE_1 = 85;
/** Bit 10: LBA48 enabled. */
export const ATA_ID_CFS_ENABLE_2 = 86;
/** IDENTIFY word: command set/feature default. */
export const ATA_ID_CSF_DEFAULT = 87;
/** IDENTIFY word: Ultra DMA modes supported (low byte) and selected (high). */
export const ATA_ID_UDMA_MODES = 88;
/** IDENTIFY word: hardware reset result. */
export const ATA_ID_HW_CONFIG = 93;
/** LBA48 capacity in sectors, words 100-103. */
export const ATA_ID_LBA_CAPACITY_2 = 100;
/** Most 512-byte blocks of DSM ranges per command. */
export const ATA_ID_DSM_MAX_BLOCKS = 105;
/** Bit 0: DATA SET MANAGEMENT TRIM supported. */
export const ATA_ID_DATA_SET_MGMT = 169;

// ---- Bus-master IDE (PIIX) ------------------------------------------------------------------------------

/** Bytes of the bus-master BAR: 8 per channel. */
export const ATA_DMA_BAR_SIZE = 16;
/** Bytes of one channel's bus-master registers. */
export const ATA_DMA_CHANNEL_SIZE = 8;
/** Command register offset. */
export const ATA_DMA_CMD = 0;
/** Status register offset. */
export const ATA_DMA_STATUS = 2;
/** PRD table address register offset (dword, 4-byte aligned). */
export const ATA_DMA_TABLE_OFS = 4;
/** Bus-master command bit 0: start (1) or stop (0). */
export const ATA_DMA_START = 0x01;
/** Command bit 3: the transfer writes memory (device → memory, a read). */
export const ATA_DMA_WR = 0x08;
/** Bus-master status bit 0: active. */
export const ATA_DMA_ACTIVE = 0x01;
/** Bus-master status bit 1: a PRD or bus error (write 1 to clear). */
export const ATA_DMA_ERR = 0x02;
/** Bus-master status bit 2: the device raised its interrupt (write 1 to clear). */
export const ATA_DMA_INTR = 0x04;
/** Bus-master status bit 5: drive 0 DMA capable (software-set). */
export const ATA_DMA_DRV0_CAPABLE = 0x20;
/** Bus-master status bit 6: drive 1 DMA capable (software-set). */
export const ATA_DMA_DRV1_CAPABLE = 0x40;
/** Bytes of a physical region descriptor: u32 address, u16 byte count, u16 flags. */
export const ATA_PRD_SZ = 8;
/** Flags bit 15 (bit 31 of the second dword): last descriptor of the table. */
export const ATA_PRD_EOT = 0x8000;
/** Most descriptors the controller walks before it calls a table endless. */
export const ATA_PRD_MAX_ENTRIES = 4096;
/** Neither a PRD table nor the region one descriptor covers may cross this boundary (PIIX). */
export const ATA_PRD_BOUNDARY = 0x10000;

// ---- PCI identity (QEMU's piix3-ide) ---------------------------------------------------------------

/** Intel's PCI vendor id. */
export const PCI_VENDOR_ID_INTEL = 0x8086;
/** The PIIX3 IDE function's device id. */
export const PCI_DEVICE_ID_INTEL_82371SB_1 = 0x7010;
/** Base class 0x01 (mass storage) << 8 | subclass 0x01 (IDE interface), as Linux's pci_ids.h. */
export const PCI_CLASS_STORAGE_IDE = 0x0101;
/** Programming interface: both channels in compatibility mode, bus-master capable. */
export const PCI_PROG_IF_IDE_COMPAT_BM = 0x80;
/** The bus-master BAR. */
export const PIIX_BMDMA_BAR = 4;
/** Start of the PIIX timing registers (IDETIM, SIDETIM…): plain storage here. */
export const PIIX_IDETIM = 0x40;
/** End (exclusive) of the PIIX timing registers. */
export const PIIX_TIMING_END = 0x50;
