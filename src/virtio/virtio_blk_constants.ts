/**
 * Spec constants of the virtio block device (OASIS virtio 1.2 §5.2), with the spec's names, and the
 * QEMU limits (`hw/block/virtio-blk.c`, `include/block/block.h`) the device follows.
 *
 * They live with the transport because both sides use them: the device back-ends in `src/devices/`
 * and the guest's drivers in `src/guest/`, as both sides of Linux and QEMU include the same header.
 *
 * @module
 */

// Feature bits (5.2.3).
export const VIRTIO_BLK_F_SIZE_MAX = 1;
export const VIRTIO_BLK_F_SEG_MAX = 2;
export const VIRTIO_BLK_F_GEOMETRY = 4;
export const VIRTIO_BLK_F_RO = 5;
export const VIRTIO_BLK_F_BLK_SIZE = 6;
/** Also the legacy VIRTIO_BLK_F_WCE: the same bit. */
export const VIRTIO_BLK_F_FLUSH = 9;
export const VIRTIO_BLK_F_TOPOLOGY = 10;
export const VIRTIO_BLK_F_CONFIG_WCE = 11;
export const VIRTIO_BLK_F_MQ = 12;
export const VIRTIO_BLK_F_DISCARD = 13;
export const VIRTIO_BLK_F_WRITE_ZEROES = 14;
export const VIRTIO_BLK_F_LIFETIME = 15;
export const VIRTIO_BLK_F_SECURE_ERASE = 16;
export const VIRTIO_BLK_F_ZONED = 17;
// Legacy feature bits (5.2.3.1): never offered by a modern device.
export const VIRTIO_BLK_F_BARRIER = 0;
export const VIRTIO_BLK_F_SCSI = 7;

// Request types (5.2.6).
/** Request type: read sectors into the writable buffers. */
export const VIRTIO_BLK_T_IN = 0;
/** Request type: write the readable buffers' sectors. */
export const VIRTIO_BLK_T_OUT = 1;
/** Legacy SCSI passthrough; a VERSION_1 device answers UNSUPP. */
export const VIRTIO_BLK_T_SCSI_CMD = 2;
/** Request type: make completed writes durable. */
export const VIRTIO_BLK_T_FLUSH = 4;
/** Legacy synonym of VIRTIO_BLK_T_FLUSH. */
export const VIRTIO_BLK_T_FLUSH_OUT = 5;
/** Request type: read the device's serial number (20 bytes, NUL-padded). */
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_T_GET_LIFETIME = 10;
/** Request type: discard the ranges of 16-byte segments. */
export const VIRTIO_BLK_T_DISCARD = 11;
/** Request type: write zeroes to the ranges of 16-byte segments. */
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;
export const VIRTIO_BLK_T_SECURE_ERASE = 14;
/** Legacy barrier flag in the type's top bit; QEMU ignores it, and so does vstor. */
export const VIRTIO_BLK_T_BARRIER = 0x8000_0000;

// Status byte values (5.2.6).
/** Status byte: the request succeeded. */
export const VIRTIO_BLK_S_OK = 0;
/** Status byte: the request failed (I/O error or an invalid request). */
export const VIRTIO_BLK_S_IOERR = 1;
/** Status byte: the request type is not supported. */
export const VIRTIO_BLK_S_UNSUPP = 2;

/** `flags.unmap` of a discard / write-zeroes segment. */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;
/** Length of the GET_ID string: NUL-padded, no terminator when exactly this long. */
export const VIRTIO_BLK_ID_BYTES = 20;

/** `struct virtio_blk_outhdr`: type u32, reserved u32, sector u64 (device-readable). */
export const VIRTIO_BLK_OUTHDR_SIZE = 16;
/** `struct virtio_blk_inhdr`: the status byte, the last device-writable byte. */
export const VIRTIO_BLK_INHDR_SIZE = 1;
/** `struct virtio_blk_discard_write_zeroes`: sector u64, num_sectors u32, flags u32. */
export const VIRTIO_BLK_SEGMENT_SIZE = 16;

/** The protocol's sector: capacity, `sector` and segment fields count 512-byte units. */
export const VIRTIO_BLK_SECTOR_SIZE = 512;
export const VIRTIO_BLK_SECTOR_BITS = 9;

/**
 * QEMU's BDRV_REQUEST_MAX_SECTORS, `MIN(SIZE_MAX, INT_MAX) >> BDRV_SECTOR_BITS`: the largest
 * request (and the default max_discard_sectors / max_write_zeroes_sectors) in sectors.
 */
export const BDRV_REQUEST_MAX_SECTORS = Math.floor(0x7fff_ffff / VIRTIO_BLK_SECTOR_SIZE);
/** QEMU's VIRTIO_BLK_MAX_MERGE_REQS: the most requests one merge buffer holds. */
export const VIRTIO_BLK_MAX_MERGE_REQS = 32;

// struct virtio_blk_config field offsets (5.2.4).
export const VIRTIO_BLK_CFG_CAPACITY = 0;
export const VIRTIO_BLK_CFG_SIZE_MAX = 8;
export const VIRTIO_BLK_CFG_SEG_MAX = 12;
export const VIRTIO_BLK_CFG_CYLINDERS = 16;
export const VIRTIO_BLK_CFG_HEADS = 18;
export const VIRTIO_BLK_CFG_SECTORS = 19;
export const VIRTIO_BLK_CFG_BLK_SIZE = 20;
export const VIRTIO_BLK_CFG_PHYSICAL_BLOCK_EXP = 24;
export const VIRTIO_BLK_CFG_ALIGNMENT_OFFSET = 25;
export const VIRTIO_BLK_CFG_MIN_IO_SIZE = 26;
export const VIRTIO_BLK_CFG_OPT_IO_SIZE = 28;
export const VIRTIO_BLK_CFG_WRITEBACK = 32;
export const VIRTIO_BLK_CFG_NUM_QUEUES = 34;
export const VIRTIO_BLK_CFG_MAX_DISCARD_SECTORS = 36;
export const VIRTIO_BLK_CFG_MAX_DISCARD_SEG = 40;
export const VIRTIO_BLK_CFG_DISCARD_SECTOR_ALIGNMENT = 44;
export const VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SECTORS = 48;
export const VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SEG = 52;
export const VIRTIO_BLK_CFG_WRITE_ZEROES_MAY_UNMAP = 56;
export const VIRTIO_BLK_CFG_MAX_SECURE_ERASE_SECTORS = 60;
export const VIRTIO_BLK_CFG_MAX_SECURE_ERASE_SEG = 64;
export const VIRTIO_BLK_CFG_SECURE_ERASE_SECTOR_ALIGNMENT = 68;

/**
 * Config sizes as QEMU's virtio_blk_cfg_size_params computes them: everything before
 * max_discard_sectors always, then up to the end of the last field a offered feature needs.
 */
export const VIRTIO_BLK_CFG_SIZE_BASE = VIRTIO_BLK_CFG_MAX_DISCARD_SECTORS;
/** With DISCARD: through discard_sector_alignment. */
export const VIRTIO_BLK_CFG_SIZE_DISCARD = VIRTIO_BLK_CFG_DISCARD_SECTOR_ALIGNMENT + 4;
/** With WRITE_ZEROES: through write_zeroes_may_unmap. */
export const VIRTIO_BLK_CFG_SIZE_WRITE_ZEROES = VIRTIO_BLK_CFG_WRITE_ZEROES_MAY_UNMAP + 1;
