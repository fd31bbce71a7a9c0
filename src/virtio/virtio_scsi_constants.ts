/**
 * virtio-scsi constants with the spec's names (OASIS virtio 1.2 §5.6, Linux
 * `include/uapi/linux/virtio_scsi.h`): feature bits, request/response layouts, response codes,
 * control request types and TMF subtypes, events and their reasons, and the config-space layout.
 *
 * They live with the transport because both sides use them: the device back-ends in `src/devices/`
 * and the guest's drivers in `src/guest/`, as both sides of Linux and QEMU include the same header.
 *
 * @module
 */

// Feature bits (5.6.3).
export const VIRTIO_SCSI_F_INOUT = 0;
export const VIRTIO_SCSI_F_HOTPLUG = 1;
export const VIRTIO_SCSI_F_CHANGE = 2;
export const VIRTIO_SCSI_F_T10_PI = 3;

// Default and largest driver-writable sizes (5.6.4; QEMU's set_config bounds).
export const VIRTIO_SCSI_SENSE_DEFAULT_SIZE = 96;
export const VIRTIO_SCSI_CDB_DEFAULT_SIZE = 32;
/** sense_size must be below this (QEMU: a larger write is a device error; here it is ignored). */
export const VIRTIO_SCSI_SENSE_SIZE_LIMIT = 65536;
/** cdb_size must be below this. */
export const VIRTIO_SCSI_CDB_SIZE_LIMIT = 256;

// Limits of the addressing (5.6.4).
export const VIRTIO_SCSI_MAX_CHANNEL = 0;
export const VIRTIO_SCSI_MAX_TARGET = 255;
export const VIRTIO_SCSI_MAX_LUN = 16383;

// Queue indexes (5.6.2).
export const VIRTIO_SCSI_VQ_CONTROL = 0;
export const VIRTIO_SCSI_VQ_EVENT = 1;
/** The first request queue. */
export const VIRTIO_SCSI_VQ_REQUEST = 2;

// Command request: lun[8] @0, tag u64 @8, task_attr u8 @16, prio u8 @17, crn u8 @18, cdb @19.
export const VIRTIO_SCSI_REQ_LUN = 0;
export const VIRTIO_SCSI_REQ_TAG = 8;
export const VIRTIO_SCSI_REQ_TASK_ATTR = 16;
export const VIRTIO_SCSI_REQ_CDB = 19;
/** Bytes of the command request header before the CDB. */
export const VIRTIO_SCSI_CMD_REQ_HEADER = 19;

// Command response: sense_len u32 @0, residual u32 @4, status_qualifier u16 @8, status u8 @10,
// response u8 @11, sense[sense_size] @12.
export const VIRTIO_SCSI_RESP_SENSE_LEN = 0;
export const VIRTIO_SCSI_RESP_RESIDUAL = 4;
export const VIRTIO_SCSI_RESP_STATUS_QUALIFIER = 8;
export const VIRTIO_SCSI_RESP_STATUS = 10;
export const VIRTIO_SCSI_RESP_RESPONSE = 11;
export const VIRTIO_SCSI_RESP_SENSE = 12;
/** Bytes of the command response header before the sense buffer. */
export const VIRTIO_SCSI_CMD_RESP_HEADER = 12;

// Response codes (5.6.6.1).
export const VIRTIO_SCSI_S_OK = 0;
export const VIRTIO_SCSI_S_OVERRUN = 1;
export const VIRTIO_SCSI_S_ABORTED = 2;
export const VIRTIO_SCSI_S_BAD_TARGET = 3;
export const VIRTIO_SCSI_S_RESET = 4;
export const VIRTIO_SCSI_S_BUSY = 5;
export const VIRTIO_SCSI_S_TRANSPORT_FAILURE = 6;
export const VIRTIO_SCSI_S_TARGET_FAILURE = 7;
export const VIRTIO_SCSI_S_NEXUS_FAILURE = 8;
export const VIRTIO_SCSI_S_FAILURE = 9;
export const VIRTIO_SCSI_S_FUNCTION_SUCCEEDED = 10;
export const VIRTIO_SCSI_S_FUNCTION_REJECTED = 11;
export const VIRTIO_SCSI_S_INCORRECT_LUN = 12;

// Task attributes (5.6.6.1).
export const VIRTIO_SCSI_S_SIMPLE = 0;
export const VIRTIO_SCSI_S_ORDERED = 1;
export const VIRTIO_SCSI_S_HEAD = 2;
export const VIRTIO_SCSI_S_ACA = 3;

// Control queue request types (5.6.6.2).
export const VIRTIO_SCSI_T_TMF = 0;
export const VIRTIO_SCSI_T_AN_QUERY = 1;
export const VIRTIO_SCSI_T_AN_SUBSCRIBE = 2;

// Task management function subtypes.
export const VIRTIO_SCSI_T_TMF_ABORT_TASK = 0;
export const VIRTIO_SCSI_T_TMF_ABORT_TASK_SET = 1;
export const VIRTIO_SCSI_T_TMF_CLEAR_ACA = 2;
export const VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET = 3;
export const VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET = 4;
export const VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET = 5;
export const VIRTIO_SCSI_T_TMF_QUERY_TASK = 6;
export const VIRTIO_SCSI_T_TMF_QUERY_TASK_SET = 7;

/** TMF request: type u32 @0, subtype u32 @4, lun[8] @8, tag u64 @16. */
export const VIRTIO_SCSI_TMF_REQ_SIZE = 24;
/** TMF response: response u8. */
export const VIRTIO_SCSI_TMF_RESP_SIZE = 1;
/** AN request: type u32 @0, lun[8] @4, event_requested u32 @12. */
export const VIRTIO_SCSI_AN_REQ_SIZE = 16;
/** AN response: event_actual u32 @0, response u8 @4. */
export const VIRTIO_SCSI_AN_RESP_SIZE = 5;

// Asynchronous notification classes (5.6.6.2.2), for AN_QUERY/AN_SUBSCRIBE masks.
export const VIRTIO_SCSI_EVT_ASYNC_OPERATIONAL_CHANGE = 2;
export const VIRTIO_SCSI_EVT_ASYNC_POWER_MGMT = 4;
export const VIRTIO_SCSI_EVT_ASYNC_EXTERNAL_REQUEST = 8;
export const VIRTIO_SCSI_EVT_ASYNC_MEDIA_CHANGE = 16;
export const VIRTIO_SCSI_EVT_ASYNC_MULTI_HOST = 32;
export const VIRTIO_SCSI_EVT_ASYNC_DEVICE_BUSY = 64;

// Events (5.6.6.3).
export const VIRTIO_SCSI_T_NO_EVENT = 0;
export const VIRTIO_SCSI_T_TRANSPORT_RESET = 1;
export const VIRTIO_SCSI_T_ASYNC_NOTIFY = 2;
export const VIRTIO_SCSI_T_PARAM_CHANGE = 3;
/** Set in `event` when the device dropped events for want of buffers. */
export const VIRTIO_SCSI_T_EVENTS_MISSED = 0x8000_0000;

// TRANSPORT_RESET reasons.
export const VIRTIO_SCSI_EVT_RESET_HARD = 0;
export const VIRTIO_SCSI_EVT_RESET_RESCAN = 1;
export const VIRTIO_SCSI_EVT_RESET_REMOVED = 2;

/** Event: event u32 @0, lun[8] @4, reason u32 @12. */
export const VIRTIO_SCSI_EVENT_SIZE = 16;

// Device configuration layout (5.6.4).
export const VIRTIO_SCSI_CONFIG_NUM_QUEUES = 0;
export const VIRTIO_SCSI_CONFIG_SEG_MAX = 4;
export const VIRTIO_SCSI_CONFIG_MAX_SECTORS = 8;
export const VIRTIO_SCSI_CONFIG_CMD_PER_LUN = 12;
export const VIRTIO_SCSI_CONFIG_EVENT_INFO_SIZE = 16;
export const VIRTIO_SCSI_CONFIG_SENSE_SIZE = 20;
export const VIRTIO_SCSI_CONFIG_CDB_SIZE = 24;
export const VIRTIO_SCSI_CONFIG_MAX_CHANNEL = 28;
export const VIRTIO_SCSI_CONFIG_MAX_TARGET = 30;
export const VIRTIO_SCSI_CONFIG_MAX_LUN = 32;
/** Bytes of the device configuration. */
export const VIRTIO_SCSI_CONFIG_SIZE = 36;
