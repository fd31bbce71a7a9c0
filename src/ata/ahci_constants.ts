/**
 * The AHCI register map and the SATA frames the HBA carries (Serial ATA AHCI 1.3.1, SATA 3.x FIS
 * layouts), with the names Linux's `drivers/ata/ahci.h` and QEMU's `hw/ide/ahci_internal.h` use
 * (the spec's own names in each comment: `PxIS` is {@linkcode PORT_IRQ_STAT}), plus QEMU's
 * ich9-ahci PCI identity and the MSI capability. Numbers only, spoken by both ends: the emulated HBA
 * (`src/devices/ahci.ts`, `ahci_port.ts`, `ahci_command.ts`) and the guest's driver
 * (`src/guest/ahci_hba.ts`, `ahci_driver.ts`) read the same map. The ATA inside the FISes (status
 * and error bits, commands, IDENTIFY words, the NCQ log) is in `constants.ts`.
 *
 * @module
 */

// ---- PCI identity of QEMU's ich9-ahci (hw/ide/ich.c) ---------------------------------------------

// The vendor is Intel: `PCI_VENDOR_ID_INTEL` of `constants.ts`.

/** 82801IR/IO/IH (ICH9R/DO/DH) 6-port SATA controller [AHCI mode]. */
export const AHCI_PCI_DEVICE_ID_ICH9 = 0x2922;
/** Revision QEMU gives the function. */
export const AHCI_PCI_REVISION = 0x02;
/** Base class 0x01 (mass storage) << 8 | subclass 0x06 (SATA). */
export const PCI_CLASS_STORAGE_SATA = 0x0106;
/** Programming interface 0x01: AHCI 1.0. */
export const PCI_CLASS_PROG_AHCI = 0x01;
/** BAR holding the HBA registers (ABAR): ICH9_MEM_BAR. */
export const AHCI_ABAR = 5;
/** Size of the ABAR: AHCI_MEM_BAR_SIZE. */
export const AHCI_ABAR_SIZE = 0x1000;
/** Config-space offset of the MSI capability: ICH9_MSI_CAP_OFFSET. */
export const AHCI_MSI_CAP_OFFSET = 0x80;
/** ICH9's Address Map register (MAP); QEMU sets bit 6: "SATA mode select = AHCI". */
export const ICH9_MAP = 0x90;
/** Most ports of an ICH9 HBA. */
export const AHCI_MAX_PORTS = 6;
/** Command slots per port (CAP.NCS + 1). */
export const AHCI_MAX_CMDS = 32;

// ---- MSI capability (PCI Local Bus 3.0, 6.8.1) ----------------------------------------------------

/** Capability id of MSI. */
export const PCI_CAP_ID_MSI = 0x05;
/** Message control (16 bits) at +2. */
export const PCI_MSI_FLAGS = 2;
/** Message control: MSI enable. */
export const PCI_MSI_FLAGS_ENABLE = 0x0001;
/** Message control: Multiple Message Capable (bits 1..3). */
export const PCI_MSI_FLAGS_QMASK = 0x000e;
/** Message control: Multiple Message Enable (bits 4..6). */
export const PCI_MSI_FLAGS_QSIZE = 0x0070;
/** Message control: 64-bit address capable. */
export const PCI_MSI_FLAGS_64BIT = 0x0080;
/** Message address, low dword, at +4. */
export const PCI_MSI_ADDRESS_LO = 4;
/** Message address, high dword, at +8 (64-bit capability). */
export const PCI_MSI_ADDRESS_HI = 8;
/** Message data at +8 of a 32-bit capability. */
export const PCI_MSI_DATA_32 = 8;
/** Message data at +12 of a 64-bit capability. */
export const PCI_MSI_DATA_64 = 12;
/** Bytes of a 64-bit MSI capability without per-vector masking. */
export const PCI_MSI_CAP_SIZE_64 = 14;
/** The x86 interrupt address window an MSI message writes into (0xFEE0_0000..0xFEEF_FFFF). */
export const MSI_ADDRESS_X86_BASE = 0xfee0_0000;

// ---- Generic host control (AHCI 1.3.1 §3.1) -------------------------------------------------------

/** CAP: HBA capabilities. */
export const HOST_CAP = 0x00;
/** GHC: global HBA control. */
export const HOST_CTL = 0x04;
/** IS: interrupt status, one bit per port (write 1 to clear). */
export const HOST_IRQ_STAT = 0x08;
/** PI: ports implemented. */
export const HOST_PORTS_IMPL = 0x0c;
/** VS: AHCI version. */
export const HOST_VERSION = 0x10;
/** CCC_CTL: command completion coalescing control (not implemented: reads 0). */
export const HOST_CCC_CTL = 0x14;
/** CCC_PORTS. */
export const HOST_CCC_PORTS = 0x18;
/** EM_LOC: enclosure management location. */
export const HOST_EM_LOC = 0x1c;
/** EM_CTL. */
export const HOST_EM_CTL = 0x20;
/** CAP2: extended capabilities. */
export const HOST_CAP2 = 0x24;
/** BOHC: BIOS/OS handoff. */
export const HOST_BOHC = 0x28;

// CAP bits.
/** CAP.S64A: 64-bit addressing. */
export const HOST_CAP_64 = 0x8000_0000;
/** CAP.SNCQ: native command queuing. */
export const HOST_CAP_NCQ = 1 << 30;
/** CAP.SSNTF: SNotification register. */
export const HOST_CAP_SNTF = 1 << 29;
/** CAP.SMPS: mechanical presence switch. */
export const HOST_CAP_MPS = 1 << 28;
/** CAP.SSS: staggered spin-up. */
export const HOST_CAP_SSS = 1 << 27;
/** CAP.SALP: aggressive link power management. */
export const HOST_CAP_ALPM = 1 << 26;
/** CAP.SAL: activity LED. */
export const HOST_CAP_LED = 1 << 25;
/** CAP.SCLO: command list override. */
export const HOST_CAP_CLO = 1 << 24;
/** CAP.ISS field shift: interface speed support (1 = Gen1, 1.5 Gbps). */
export const HOST_CAP_ISS_SHIFT = 20;
/** CAP.SAM: AHCI mode only (GHC.AE reads 1). */
export const HOST_CAP_ONLY = 1 << 18;
/** CAP.SPM: port multiplier. */
export const HOST_CAP_PMP = 1 << 17;
/** CAP.NCS field shift: command slots minus one (bits 8..12). */
export const HOST_CAP_NCS_SHIFT = 8;
/** CAP.NP field: ports minus one (bits 0..4). */
export const HOST_CAP_NP_MASK = 0x1f;

// GHC bits.
/** GHC.HR: HBA reset (self-clearing). */
export const HOST_RESET = 1 << 0;
/** GHC.IE: interrupt enable. */
export const HOST_IRQ_EN = 1 << 1;
/** GHC.MRSM: MSI revert to single message. */
export const HOST_MRSM = 1 << 2;
/** GHC.AE: AHCI enable. */
export const HOST_AHCI_EN = 0x8000_0000;

/** VS: AHCI 1.0, as QEMU's AHCI_VERSION_1_0. */
export const AHCI_VERSION_1_0 = 0x0001_0000;
/** VS: AHCI 1.3. */
export const AHCI_VERSION_1_3 = 0x0001_0300;

// ---- Port registers (AHCI 1.3.1 §3.3): port p at 0x100 + 0x80 × p ---------------------------------

/** Offset of port 0's registers. */
export const AHCI_PORT_BASE = 0x100;
/** Bytes between two ports' registers. */
export const AHCI_PORT_SIZE = 0x80;

/** PxCLB: command list base address (1 KiB aligned). */
export const PORT_LST_ADDR = 0x00;
/** PxCLBU: its upper 32 bits. */
export const PORT_LST_ADDR_HI = 0x04;
/** PxFB: FIS receive area base (256 B aligned). */
export const PORT_FIS_ADDR = 0x08;
/** PxFBU: its upper 32 bits. */
export const PORT_FIS_ADDR_HI = 0x0c;
/** PxIS: port interrupt status (write 1 to clear). */
export const PORT_IRQ_STAT = 0x10;
/** PxIE: port interrupt enable. */
export const PORT_IRQ_MASK = 0x14;
/** PxCMD: command and status. */
export const PORT_CMD = 0x18;
/** PxTFD: task file data (status in bits 0..7, error in 8..15). */
export const PORT_TFDATA = 0x20;
/** PxSIG: the device signature from its first D2H FIS. */
export const PORT_SIG = 0x24;
/** PxSSTS (SCR0: SStatus). */
export const PORT_SCR_STAT = 0x28;
/** PxSCTL (SCR2: SControl). */
export const PORT_SCR_CTL = 0x2c;
/** PxSERR (SCR1: SError), write 1 to clear. */
export const PORT_SCR_ERR = 0x30;
/** PxSACT (SCR3: SActive): NCQ tags outstanding, write 1 to set. */
export const PORT_SCR_ACT = 0x34;
/** PxCI: command issue, write 1 to set: the doorbell. */
export const PORT_CMD_ISSUE = 0x38;
/** PxSNTF (SCR4: SNotification). */
export const PORT_SCR_NTF = 0x3c;
/** PxFBS: FIS-based switching control. */
export const PORT_FBS = 0x40;
/** PxDEVSLP. */
export const PORT_DEVSLP = 0x44;

// PxIS / PxIE bits.
/** DHRS: a D2H Register FIS with the I bit arrived. */
export const PORT_IRQ_D2H_REG_FIS = 1 << 0;
/** PSS: a PIO Setup FIS with the I bit arrived. */
export const PORT_IRQ_PIOS_FIS = 1 << 1;
/** DSS: a DMA Setup FIS with the I bit arrived. */
export const PORT_IRQ_DMAS_FIS = 1 << 2;
/** SDBS: a Set Device Bits FIS with the I bit arrived. */
export const PORT_IRQ_SDB_FIS = 1 << 3;
/** UFS: unknown FIS. */
export const PORT_IRQ_UNK_FIS = 1 << 4;
/** DPS: a PRD with the I bit was transferred. */
export const PORT_IRQ_SG_DONE = 1 << 5;
/** PCS: port connect change. */
export const PORT_IRQ_CONNECT = 1 << 6;
/** DMPS: device mechanical presence. */
export const PORT_IRQ_DEV_ILCK = 1 << 7;
/** PRCS: PhyRdy change. */
export const PORT_IRQ_PHYRDY = 1 << 22;
/** IPMS: incorrect port multiplier status. */
export const PORT_IRQ_BAD_PMP = 1 << 23;
/** OFS: overflow (more data than the PRDT holds). */
export const PORT_IRQ_OVERFLOW = 1 << 24;
/** INFS: interface non-fatal error. */
export const PORT_IRQ_IF_NONFATAL = 1 << 26;
/** IFS: interface fatal error. */
export const PORT_IRQ_IF_ERR = 1 << 27;
/** HBDS: host bus data error. */
export const PORT_IRQ_HBUS_DATA_ERR = 1 << 28;
/** HBFS: host bus fatal error (a bad pointer: memory outside RAM). */
export const PORT_IRQ_HBUS_ERR = 1 << 29;
/** TFES: task file error (the device reported ERR). */
export const PORT_IRQ_TF_ERR = 1 << 30;
/** CPDS: cold port detect. */
export const PORT_IRQ_COLD_PRES = 0x8000_0000;
/** PxIE bits that exist (the others are reserved and read 0). */
export const PORT_IRQ_MASK_VALID = 0xfdc0_00ff;
/** The errors after which the HBA stops processing the command list (AHCI 1.3.1 §6.1.2). */
export const PORT_IRQ_FATAL = (PORT_IRQ_TF_ERR | PORT_IRQ_HBUS_ERR | PORT_IRQ_HBUS_DATA_ERR |
  PORT_IRQ_IF_ERR) >>> 0;

// PxCMD bits.
/** ST: start processing the command list. */
export const PORT_CMD_START = 1 << 0;
/** SUD: spin-up device (read-only 1 without staggered spin-up). */
export const PORT_CMD_SPIN_UP = 1 << 1;
/** POD: power on device (read-only 1 without cold presence detection). */
export const PORT_CMD_POWER_ON = 1 << 2;
/** CLO: command list override (clears PxTFD BSY and DRQ; self-clearing). */
export const PORT_CMD_CLO = 1 << 3;
/** FRE: FIS receive enable. */
export const PORT_CMD_FIS_RX = 1 << 4;
/** CCS: current command slot (bits 8..12), read-only. */
export const PORT_CMD_CCS_SHIFT = 8;
/** CCS field mask (after the shift). */
export const PORT_CMD_CCS_MASK = 0x1f;
/** FR: FIS receive running. */
export const PORT_CMD_FIS_ON = 1 << 14;
/** CR: command list running. */
export const PORT_CMD_LIST_ON = 1 << 15;
/** ATAPI: the device is an ATAPI device. */
export const PORT_CMD_ATAPI = 1 << 24;
/** DLAE: drive LED on ATAPI enable. */
export const PORT_CMD_DLAE = 1 << 25;
/** ALPE: aggressive link power management enable. */
export const PORT_CMD_ALPE = 1 << 26;
/** ASP: aggressive slumber / partial. */
export const PORT_CMD_ASP = 1 << 27;
/** APSTE: automatic partial to slumber transitions. */
export const PORT_CMD_APSTE = 1 << 23;
/** ICC field (bits 28..31): interface communication control. */
export const PORT_CMD_ICC_MASK = 0xf000_0000;
/** ICC = 1: active. */
export const PORT_CMD_ICC_ACTIVE = 0x1000_0000;

// PxSSTS / PxSCTL fields.
/** SStatus.DET: device present and Phy communication established. */
export const SATA_SSTS_DET_PHY_UP = 0x3;
/** SStatus.DET mask. */
export const SATA_SSTS_DET_MASK = 0xf;
/** SStatus.SPD = Gen1 (bits 4..7). */
export const SATA_SSTS_SPD_GEN1 = 0x1 << 4;
/** SStatus.IPM = active (bits 8..11). */
export const SATA_SSTS_IPM_ACTIVE = 0x1 << 8;
/** SControl.DET mask; 1 = perform interface initialisation (COMRESET). */
export const SATA_SCTL_DET_MASK = 0xf;
/** SControl.DET = 1: COMRESET. */
export const SATA_SCTL_DET_COMRESET = 0x1;

/** PxSIG of an ATA disk (sector count 1, LBA low 1, mid 0, high 0). */
export const SATA_SIGNATURE_DISK = 0x0000_0101;
/** PxSIG before any device signature arrived. */
export const SATA_SIGNATURE_NONE = 0xffff_ffff;
/** PxTFD of a port with nothing attached (QEMU's reset value). */
export const PORT_TFDATA_EMPTY = 0x7f;

// ---- Memory structures (AHCI 1.3.1 §4) ------------------------------------------------------------

/** Bytes of a command header in the command list. */
export const AHCI_CMD_HEADER_SIZE = 32;
/** Bytes of a command list (32 headers). */
export const AHCI_CMD_LIST_SIZE = AHCI_CMD_HEADER_SIZE * AHCI_MAX_CMDS;
/** Command list alignment (PxCLB bits 0..9 are reserved). */
export const AHCI_CMD_LIST_ALIGN = 1024;
/** FIS receive area size and alignment without FIS-based switching. */
export const AHCI_RX_FIS_SIZE = 256;
/** Command table alignment (CTBA bits 0..6 are reserved). */
export const AHCI_CMD_TABLE_ALIGN = 128;

// Command header DW0.
/** CFL: command FIS length in dwords (bits 0..4). */
export const AHCI_CMD_CFL_MASK = 0x1f;
/** A: ATAPI command. */
export const AHCI_CMD_ATAPI = 1 << 5;
/** W: write (host to device). */
export const AHCI_CMD_WRITE = 1 << 6;
/** P: prefetchable. */
export const AHCI_CMD_PREFETCH = 1 << 7;
/** R: reset (part of a software reset sequence). */
export const AHCI_CMD_RESET = 1 << 8;
/** C: clear busy upon R_OK. */
export const AHCI_CMD_CLR_BUSY = 1 << 10;
/** PRDTL: PRDT entries (bits 16..31). */
export const AHCI_CMD_PRDTL_SHIFT = 16;
/** Offset of PRDBC (bytes transferred) in a command header. */
export const AHCI_CMD_HDR_PRDBC = 4;
/** Offset of CTBA in a command header. */
export const AHCI_CMD_HDR_CTBA = 8;
/** Offset of CTBAU in a command header. */
export const AHCI_CMD_HDR_CTBAU = 12;

// Command table.
/** Offset of the command FIS in a command table. */
export const AHCI_CMD_TBL_CFIS = 0x00;
/** Offset of the ATAPI command. */
export const AHCI_CMD_TBL_ACMD = 0x40;
/** Offset of the PRDT. */
export const AHCI_CMD_TBL_PRDT = 0x80;
/** Bytes of a PRDT entry: DBA, DBAU, reserved, DBC|I. */
export const AHCI_PRDT_ENTRY_SIZE = 16;
/** DBC: data byte count minus one (bits 0..21); bit 0 must be 1 (even counts). */
export const AHCI_PRDT_DBC_MASK = 0x3f_ffff;
/** I: interrupt on completion of this entry. */
export const AHCI_PRDT_IRQ = 0x8000_0000;
/** Largest byte count of one PRDT entry (4 MiB). */
export const AHCI_PRDT_MAX_BYTES = 0x40_0000;

// FIS receive area offsets.
/** DMA Setup FIS. */
export const RX_FIS_DMA_SETUP = 0x00;
/** PIO Setup FIS. */
export const RX_FIS_PIO_SETUP = 0x20;
/** D2H Register FIS. */
export const RX_FIS_D2H_REG = 0x40;
/** Set Device Bits FIS. */
export const RX_FIS_SDB = 0x58;
/** Unknown FIS. */
export const RX_FIS_UNK = 0x60;

// ---- FIS types and layouts (SATA 3.x §10.5) -------------------------------------------------------

/** Register FIS, host to device. */
export const SATA_FIS_TYPE_REGISTER_H2D = 0x27;
/** Register FIS, device to host. */
export const SATA_FIS_TYPE_REGISTER_D2H = 0x34;
/** DMA Activate. */
export const SATA_FIS_TYPE_DMA_ACTIVATE = 0x39;
/** DMA Setup (first-party DMA). */
export const SATA_FIS_TYPE_DMA_SETUP = 0x41;
/** Data. */
export const SATA_FIS_TYPE_DATA = 0x46;
/** BIST Activate. */
export const SATA_FIS_TYPE_BIST = 0x58;
/** PIO Setup. */
export const SATA_FIS_TYPE_PIO_SETUP = 0x5f;
/** Set Device Bits. */
export const SATA_FIS_TYPE_SDB = 0xa1;

/** Bytes of a Register H2D FIS (CFL 5). */
export const SATA_FIS_REG_H2D_SIZE = 20;
/** H2D byte 1, bit 7 (C): the FIS updates the Command register (else the Device Control one). */
export const SATA_FIS_REG_H2D_UPDATE_COMMAND = 0x80;
/** Byte 1 of D2H, PIO Setup and SDB FISes, bit 6: interrupt. */
export const SATA_FIS_I = 0x40;
/** PIO Setup byte 1, bit 5 (D): data moves device to host. */
export const SATA_FIS_PIO_D2H = 0x20;
/** SDB byte 1, bit 7 (N): notification. */
export const SATA_FIS_SDB_N = 0x80;

// Register H2D FIS byte offsets.
/** FIS type. */
export const H2D_TYPE = 0;
/** PM port and C bit. */
export const H2D_FLAGS = 1;
/** ATA command. */
export const H2D_COMMAND = 2;
/** Features 7:0. */
export const H2D_FEATURES = 3;
/** LBA 7:0. */
export const H2D_LBA0 = 4;
/** LBA 15:8. */
export const H2D_LBA1 = 5;
/** LBA 23:16. */
export const H2D_LBA2 = 6;
/** Device register. */
export const H2D_DEVICE = 7;
/** LBA 31:24. */
export const H2D_LBA3 = 8;
/** LBA 39:32. */
export const H2D_LBA4 = 9;
/** LBA 47:40. */
export const H2D_LBA5 = 10;
/** Features 15:8. */
export const H2D_FEATURES_EXP = 11;
/** Count 7:0 (for FPDMA QUEUED: the tag in bits 7:3). */
export const H2D_COUNT = 12;
/** Count 15:8. */
export const H2D_COUNT_EXP = 13;
/** Isochronous command completion. */
export const H2D_ICC = 14;
/** Device Control register. */
export const H2D_CONTROL = 15;
