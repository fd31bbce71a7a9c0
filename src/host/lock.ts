/**
 * Image locking that interoperates with QEMU (block/file-posix.c): open file description (OFD)
 * byte-range locks on the image file. For each permission bit i a holder takes a shared lock on
 * byte 100+i for a permission it uses and on byte 200+i for one it does not let others use.
 * A conflict is someone else's lock on the byte we would need free.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import {
  EACCES,
  EAGAIN,
  errno,
  F_OFD_GETLK,
  F_OFD_SETLK,
  F_RDLCK,
  F_UNLCK,
  F_WRLCK,
  libc,
  strerror,
} from "../sys/libc.ts";

const PERM_BASE = 100;
const SHARED_BASE = 200;

/** QEMU's BLK_PERM_* bits, in lock-byte order. */
export const PERM = {
  consistentRead: 0x01,
  write: 0x02,
  writeUnchanged: 0x04,
  resize: 0x08,
} as const;
const PERM_BITS = 4;
const PERM_ALL = 0x0f;
const PERM_NAMES = ["consistent read", "write", "write unchanged", "resize"];

/** Permissions held and shared by an opener. */
export interface LockPerms {
  /** Permissions this opener uses. */
  perm: number;
  /** Permissions this opener lets others use at the same time. */
  shared: number;
}

/** What an opener takes: a writer as qemu-system's rw drive, a reader as qemu-img's. */
export function permsFor(readOnly: boolean, forceShare: boolean): LockPerms {
  if (readOnly) {
    return {
      perm: PERM.consistentRead,
      // A reader will not have the image change under it, unless told to share (-U).
      shared: forceShare ? PERM_ALL : PERM_ALL & ~(PERM.write | PERM.resize),
    };
  }
  return {
    perm: PERM.consistentRead | PERM.write | PERM.resize,
    shared: PERM.consistentRead | PERM.writeUnchanged,
  };
}

// struct flock (x86_64 and aarch64): short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
const FLOCK_SIZE = 32;

function flock(type: number, start: number): Uint8Array<ArrayBuffer> {
  const buf = new Uint8Array(FLOCK_SIZE);
  const view = new DataView(buf.buffer);
  view.setInt16(0, type, true);
  view.setInt16(2, 0, true); // SEEK_SET
  view.setBigInt64(8, BigInt(start), true);
  view.setBigInt64(16, 1n, true);
  return buf;
}

function setLock(fd: number, path: string, type: number, byte: number): boolean {
  const buf = flock(type, byte);
  if (libc().fcntl(fd, F_OFD_SETLK, buf) === 0) return true;
  const code = errno();
  if (code === EAGAIN || code === EACCES) return false;
  throw new BlockError("io", `Failed to lock byte ${byte}: ${strerror(code)}`, {
    path,
    errno: code,
  });
}

/** True when another open file description holds a lock on `byte` that a write lock conflicts with. */
function lockedByOther(fd: number, path: string, byte: number): boolean {
  const buf = flock(F_WRLCK, byte);
  if (libc().fcntl(fd, F_OFD_GETLK, buf) !== 0) {
    const code = errno();
    throw new BlockError("io", `Failed to test lock byte ${byte}: ${strerror(code)}`, {
      path,
      errno: code,
    });
  }
  return new DataView(buf.buffer).getInt16(0, true) !== F_UNLCK;
}

/**
 * Take QEMU-compatible locks on `fd` for `perms`, or fail the way QEMU does when another process
 * (QEMU or vstor) holds the image incompatibly. Locks go away when the fd is closed.
 *
 * @throws {BlockError} `busy` with QEMU's "Failed to get "write" lock" wording
 */
export function applyImageLocks(fd: number, path: string, perms: LockPerms): void {
  for (let i = 0; i < PERM_BITS; i++) {
    const bit = 1 << i;
    if (perms.perm & bit) setLock(fd, path, F_RDLCK, PERM_BASE + i);
    if (!(perms.shared & bit)) setLock(fd, path, F_RDLCK, SHARED_BASE + i);
  }
  for (let i = 0; i < PERM_BITS; i++) {
    const bit = 1 << i;
    // Someone forbids a permission we use.
    if ((perms.perm & bit) && lockedByOther(fd, path, SHARED_BASE + i)) {
      throw busy(path, `Failed to get "${PERM_NAMES[i]}" lock`);
    }
    // Someone uses a permission we forbid.
    if (!(perms.shared & bit) && lockedByOther(fd, path, PERM_BASE + i)) {
      throw busy(path, `Failed to get shared "${PERM_NAMES[i]}" lock`);
    }
  }
}

/**
 * Drop every lock of this open file description. Closing the fd is not enough: a child process
 * forked at that moment (before its exec closes the inherited fd) keeps the description, and
 * with it the locks, alive for an instant; an explicit unlock releases them at once.
 */
export function releaseImageLocks(fd: number): void {
  const buf = flock(F_UNLCK, 0);
  new DataView(buf.buffer).setBigInt64(16, 0n, true); // length 0: to the end of the file
  libc().fcntl(fd, F_OFD_SETLK, buf);
}

function busy(path: string, what: string): BlockError {
  return new BlockError("busy", `${what}\nIs another process using the image [${path}]?`, { path });
}
