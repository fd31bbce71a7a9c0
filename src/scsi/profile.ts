/**
 * What the emulated commands need to know of a disk: geometry, identity and limits. The
 * {@linkcode ScsiDisk} implements it; the command builders take it as a parameter so each one is a
 * pure function of the profile and the CDB.
 *
 * @module
 */

/** The properties of a disk that INQUIRY, READ CAPACITY and MODE SENSE report. */
export interface DiskProfile {
  /** Logical block size in bytes (512 or 4096). */
  readonly blockSize: number;
  /** Logical blocks on the medium. */
  readonly capacity: number;
  /** Writes are refused with DATA PROTECT. */
  readonly readOnly: boolean;
  /** UNMAP and WRITE SAME with UNMAP discard (logical block provisioning is reported). */
  readonly discard: boolean;
  /** The caching mode page's WCE bit (write-back cache enabled). */
  readonly writeCache: boolean;
  /** T10 VENDOR IDENTIFICATION (8 characters). */
  readonly vendor: string;
  /** PRODUCT IDENTIFICATION (16 characters). */
  readonly product: string;
  /** PRODUCT REVISION LEVEL (4 characters). */
  readonly revision: string;
  /** Unit serial number (VPD 80h), when there is one. */
  readonly serial: string | undefined;
  /** Vendor-specific device identifier (VPD 83h, ASCII), when there is one. */
  readonly deviceId: string | undefined;
  /** NAA world wide name (VPD 83h, binary), when there is one. */
  readonly wwn: bigint | undefined;
  /** MEDIUM ROTATION RATE (VPD B1h): 1 = non-rotating (solid state), 0 = not reported. */
  readonly rotationRate: number;
  /** MAXIMUM TRANSFER LENGTH, in blocks (VPD B0h), also the maximum WRITE SAME length. */
  readonly maxTransferBlocks: number;
  /** MAXIMUM UNMAP LBA COUNT (VPD B0h). */
  readonly maxUnmapBlocks: number;
  /** MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (VPD B0h). */
  readonly maxUnmapDescriptors: number;
  /** OPTIMAL UNMAP GRANULARITY, in blocks (VPD B0h). */
  readonly unmapGranularity: number;
}
