/**
 * SCSI constants with the names SPC-4, SBC-3 and SAM-5 give them (and Linux `scsi_proto.h` /
 * QEMU `scsi/constants.h` use): operation codes, status codes, VPD and mode page codes,
 * peripheral device types.
 *
 * @module
 */

// ---- Operation codes (SPC-4 Annex D, SBC-3 5) ---------------------------------------------------

export const TEST_UNIT_READY = 0x00;
export const REQUEST_SENSE = 0x03;
export const READ_6 = 0x08;
export const WRITE_6 = 0x0a;
export const INQUIRY = 0x12;
export const MODE_SELECT = 0x15;
export const MODE_SENSE = 0x1a;
export const START_STOP = 0x1b;
export const READ_CAPACITY_10 = 0x25;
export const READ_10 = 0x28;
export const WRITE_10 = 0x2a;
export const VERIFY_10 = 0x2f;
export const SYNCHRONIZE_CACHE = 0x35;
export const WRITE_SAME_10 = 0x41;
export const UNMAP = 0x42;
export const MODE_SELECT_10 = 0x55;
export const MODE_SENSE_10 = 0x5a;
export const READ_16 = 0x88;
export const WRITE_16 = 0x8a;
export const VERIFY_16 = 0x8f;
export const SYNCHRONIZE_CACHE_16 = 0x91;
export const WRITE_SAME_16 = 0x93;
export const SERVICE_ACTION_IN_16 = 0x9e;
export const REPORT_LUNS = 0xa0;
export const READ_12 = 0xa8;
export const WRITE_12 = 0xaa;
export const VERIFY_12 = 0xaf;

/** SERVICE ACTION IN (16) service action of READ CAPACITY (16). */
export const SAI_READ_CAPACITY_16 = 0x10;

// ---- Status codes (SAM-5 5.3) -------------------------------------------------------------------

export const GOOD = 0x00;
export const CHECK_CONDITION = 0x02;
export const CONDITION_GOOD = 0x04;
export const BUSY = 0x08;
export const RESERVATION_CONFLICT = 0x18;
export const TASK_SET_FULL = 0x28;
export const ACA_ACTIVE = 0x30;
export const TASK_ABORTED = 0x40;

// ---- Peripheral qualifier and device type (SPC-4 6.6.2) -----------------------------------------

/** Direct-access block device (a disk). */
export const TYPE_DISK = 0x00;
/** Device type "unknown or no device type". */
export const TYPE_NOT_PRESENT = 0x1f;
/** Peripheral qualifier 001b: the device server supports a LU here but none is connected. */
export const TYPE_INACTIVE = 0x20;
/** Qualifier 011b, type 1Fh: the device server cannot support a logical unit at this LUN. */
export const TYPE_NO_LUN = 0x7f;

/** Standard INQUIRY data length without vendor-specific extras. */
export const SCSI_INQUIRY_LEN = 36;
/** VERSION field value claiming conformance to SPC-3 (as QEMU's scsi-hd does). */
export const SCSI_VERSION_SPC3 = 5;

// ---- Vital product data pages (SPC-4 7.8, SBC-3 6.6) --------------------------------------------

export const VPD_SUPPORTED_PAGES = 0x00;
export const VPD_UNIT_SERIAL_NUMBER = 0x80;
export const VPD_DEVICE_IDENTIFICATION = 0x83;
export const VPD_BLOCK_LIMITS = 0xb0;
export const VPD_BLOCK_DEVICE_CHARACTERISTICS = 0xb1;
export const VPD_LOGICAL_BLOCK_PROVISIONING = 0xb2;

// ---- Mode pages (SPC-4 7.5, SBC-3 6.5) ----------------------------------------------------------

export const MODE_PAGE_R_W_ERROR = 0x01;
export const MODE_PAGE_HD_GEOMETRY = 0x04;
export const MODE_PAGE_FLEXIBLE_DISK_GEOMETRY = 0x05;
export const MODE_PAGE_CACHING = 0x08;
/** "Return all pages" in MODE SENSE. */
export const MODE_PAGE_ALLS = 0x3f;

/** MODE SENSE page control: current, changeable, default and saved values. */
export const MODE_PC_CURRENT = 0;
export const MODE_PC_CHANGEABLE = 1;
export const MODE_PC_DEFAULT = 2;
export const MODE_PC_SAVED = 3;
