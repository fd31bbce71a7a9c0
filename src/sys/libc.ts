/**
 * libc through Deno's FFI, once (Linux, x86_64 glibc): the project's single `Deno.dlopen`. Every
 * caller above `src/sys/` gets typed functions and errno; nothing there sees a raw symbol table.
 *
 * @module
 */
import { BlockError } from "../errors.ts";

const symbols = {
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  // Results declared i32: every call is capped at MAX_IO_CHUNK bytes, so counts fit.
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "i32" },
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "i32" },
  fdatasync: { parameters: ["i32"], result: "i32" },
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  fcntl: { parameters: ["i32", "i32", "buffer"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
  strerror: { parameters: ["i32"], result: "pointer" },
  signal: { parameters: ["i32", "pointer"], result: "pointer" },
  // statx(2) for STATX_DIOALIGN (O_DIRECT alignment); ioctl(2) for BLKSSZGET.
  statx: { parameters: ["i32", "buffer", "i32", "u32", "buffer"], result: "i32" },
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  // Aligned memory for O_DIRECT buffers and mapped rings.
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  // io_uring has no libc wrapper: syscall(2) with its number (x86_64: 425 setup, 426 enter,
  // 427 register). i32 arguments keep the call on the fast path (FFI costs in host-io.md).
  syscall6: {
    name: "syscall",
    // The last argument is a size_t the kernel reads whole (io_uring_enter's argsz): an i32 would
    // leave the register's upper half undefined, so it goes as a pointer-sized value.
    parameters: ["i64", "i32", "i32", "i32", "i32", "pointer", "pointer"],
    result: "i32",
  },
  // The same syscall(2) with the pointer where io_uring_setup(entries, params) and
  // io_uring_register(fd, opcode, arg, nr_args) take it.
  syscall2: { name: "syscall", parameters: ["i64", "i32", "buffer"], result: "i32" },
  syscall4: {
    name: "syscall",
    parameters: ["i64", "i32", "i32", "buffer", "i32"],
    result: "i32",
  },
  // AF_UNIX sockets with SCM_RIGHTS (unix_socket.ts). socklen_t is 32-bit; sendmsg/recvmsg
  // results are ssize_t read as i32 (messages are far below 2 GiB, and -1 survives).
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  socketpair: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  listen: { parameters: ["i32", "i32"], result: "i32" },
  accept4: { parameters: ["i32", "pointer", "pointer", "i32"], result: "i32" },
  connect: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  sendmsg: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  recvmsg: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  // TCP clients (inet_socket.ts): send/recv's size_t goes pointer-sized, their ssize_t results
  // are read as i32 (one call moves far less than 2 GiB).
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "i32" },
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "i32" },
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  getaddrinfo: { parameters: ["buffer", "buffer", "buffer", "buffer"], result: "i32" },
  freeaddrinfo: { parameters: ["pointer"], result: "void" },
  gai_strerror: { parameters: ["i32"], result: "pointer" },
  // nfds_t is unsigned long: passed pointer-sized (usize), never as an i32.
  poll: { parameters: ["buffer", "usize", "i32"], result: "i32" },
  // The same poll(2) on Deno's blocking pool, for the main thread: errno is not readable after it.
  poll_async: {
    name: "poll",
    parameters: ["buffer", "usize", "i32"],
    result: "i32",
    nonblocking: true,
  },
  // read(2)/write(2) of eventfd counters: the size_t count goes pointer-sized (usize).
  read: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  write: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  epoll_create1: { parameters: ["i32"], result: "i32" },
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  epoll_wait: { parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
  memfd_create: { parameters: ["buffer", "u32"], result: "i32" },
} as const;

/**
 * The symbols with the argument types we pass. 64-bit offsets go as bigint: Deno accepts numbers
 * too, but only bigint takes V8's fast-call path (measured: about 1.3x more 4 KiB preads/s).
 */
interface Libc {
  open(path: Uint8Array<ArrayBuffer>, flags: number, mode: number): number;
  close(fd: number): number;
  pread(fd: number, buf: Uint8Array, count: bigint, offset: bigint): number;
  pwrite(fd: number, buf: Uint8Array, count: bigint, offset: bigint): number;
  fdatasync(fd: number): number;
  ftruncate(fd: number, length: bigint): number;
  fallocate(fd: number, mode: number, offset: bigint, length: bigint): number;
  lseek(fd: number, offset: bigint, whence: number): bigint;
  fcntl(fd: number, cmd: number, arg: Uint8Array<ArrayBuffer>): number;
  __errno_location(): Deno.PointerValue;
  strerror(code: number): Deno.PointerValue;
  signal(signum: number, handler: Deno.PointerValue): Deno.PointerValue;
  statx(
    dirfd: number,
    path: Uint8Array<ArrayBuffer>,
    flags: number,
    mask: number,
    buf: Uint8Array<ArrayBuffer>,
  ): number;
  ioctl(fd: number, request: bigint, arg: Uint8Array<ArrayBuffer>): number;
  mmap(
    addr: Deno.PointerValue,
    length: bigint,
    prot: number,
    flags: number,
    fd: number,
    offset: bigint,
  ): Deno.PointerValue;
  munmap(addr: Deno.PointerValue, length: bigint): number;
  /** syscall(2) with up to six arguments, the fifth a pointer (io_uring_enter's sigset, NULL). */
  syscall6(
    number: bigint,
    a: number,
    b: number,
    c: number,
    d: number,
    e: Deno.PointerValue,
    f: Deno.PointerValue,
  ): number;
  /** syscall(2) with an int and a pointer (io_uring_setup). */
  syscall2(number: bigint, a: number, b: Uint8Array<ArrayBuffer>): number;
  /** syscall(2) with two ints, a pointer and an int (io_uring_register). */
  syscall4(
    number: bigint,
    a: number,
    b: number,
    c: Uint8Array<ArrayBuffer>,
    d: number,
  ): number;
  socket(domain: number, type: number, protocol: number): number;
  socketpair(domain: number, type: number, protocol: number, sv: Uint8Array<ArrayBuffer>): number;
  bind(fd: number, addr: Uint8Array<ArrayBuffer>, addrlen: number): number;
  listen(fd: number, backlog: number): number;
  accept4(fd: number, addr: null, addrlen: null, flags: number): number;
  connect(fd: number, addr: Uint8Array<ArrayBuffer>, addrlen: number): number;
  sendmsg(fd: number, msg: Uint8Array<ArrayBuffer>, flags: number): number;
  recvmsg(fd: number, msg: Uint8Array<ArrayBuffer>, flags: number): number;
  shutdown(fd: number, how: number): number;
  send(fd: number, buf: Uint8Array<ArrayBuffer>, len: bigint, flags: number): number;
  recv(fd: number, buf: Uint8Array<ArrayBuffer>, len: bigint, flags: number): number;
  getsockopt(
    fd: number,
    level: number,
    name: number,
    value: Uint8Array<ArrayBuffer>,
    length: Uint8Array<ArrayBuffer>,
  ): number;
  setsockopt(
    fd: number,
    level: number,
    name: number,
    value: Uint8Array<ArrayBuffer>,
    length: number,
  ): number;
  getaddrinfo(
    node: Uint8Array<ArrayBuffer>,
    service: Uint8Array<ArrayBuffer>,
    hints: Uint8Array<ArrayBuffer>,
    result: Uint8Array<ArrayBuffer>,
  ): number;
  freeaddrinfo(list: Deno.PointerValue): void;
  gai_strerror(code: number): Deno.PointerValue;
  poll(fds: Uint8Array<ArrayBuffer>, nfds: bigint, timeout: number): number;
  poll_async(fds: Uint8Array<ArrayBuffer>, nfds: bigint, timeout: number): Promise<number>;
  read(fd: number, buf: Uint8Array<ArrayBuffer>, count: bigint): number;
  write(fd: number, buf: Uint8Array<ArrayBuffer>, count: bigint): number;
  eventfd(initval: number, flags: number): number;
  epoll_create1(flags: number): number;
  epoll_ctl(epfd: number, op: number, fd: number, event: Uint8Array<ArrayBuffer>): number;
  epoll_wait(
    epfd: number,
    events: Uint8Array<ArrayBuffer>,
    maxevents: number,
    timeout: number,
  ): number;
  memfd_create(name: Uint8Array<ArrayBuffer>, flags: number): number;
}

/** Largest single pread/pwrite; longer transfers loop. */
export const MAX_IO_CHUNK = 1 << 30;

export const O_RDONLY = 0;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_DIRECT = 0o40000;
/** O_DSYNC: each write is durable (data and what is needed to read it back) when it returns. */
export const O_DSYNC = 0o10000;
export const EINVAL = 22;
export const O_CLOEXEC = 0o2000000;
export const SEEK_SET = 0;
export const SEEK_END = 2;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
export const FALLOC_FL_KEEP_SIZE = 1;
export const FALLOC_FL_PUNCH_HOLE = 2;
/** fallocate(2): the range reads as zeroes and stays allocated (no data written). */
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const F_OFD_GETLK = 36;
export const F_OFD_SETLK = 37;
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;
export const EINTR = 4;
export const EFBIG = 27;
export const ENOSPC = 28;
/** signal(7): sent for a write past RLIMIT_FSIZE (`ulimit -f`); by default it kills the process. */
const SIGXFSZ = 25;
/** signal(2)'s SIG_IGN handler value. */
const SIG_IGN = 1n;
export const ENXIO = 6;
export const EAGAIN = 11;
export const EACCES = 13;
export const EOPNOTSUPP = 95;

let lib: Libc | undefined;

/**
 * The libc symbols, loaded on first use.
 *
 * @throws {BlockError} `unsupported` when FFI is not permitted or libc cannot be loaded
 */
export function libc(): Libc {
  if (lib) return lib;
  if (Deno.build.os !== "linux") {
    throw new BlockError("unsupported", `Host files need Linux; this is ${Deno.build.os}`);
  }
  try {
    lib = Deno.dlopen("libc.so.6", symbols).symbols as unknown as Libc;
    // A write past the file size limit then fails with EFBIG, which callers report, instead of
    // SIGXFSZ killing the process halfway through (QEMU's I/O threads block it for the same end).
    lib.signal(SIGXFSZ, Deno.UnsafePointer.create(SIG_IGN));
  } catch (e) {
    throw new BlockError(
      "unsupported",
      `Cannot load libc through FFI (run with --allow-ffi or -A): ${(e as Error).message}`,
      { cause: e },
    );
  }
  return lib;
}

/** The calling thread's errno after a failed call. */
export function errno(): number {
  const p = libc().__errno_location();
  return p === null ? 0 : new Deno.UnsafePointerView(p).getInt32();
}

/** The C library's text for an errno value. */
export function strerror(code: number): string {
  const p = libc().strerror(code);
  return p === null ? `errno ${code}` : Deno.UnsafePointerView.getCString(p);
}

/** A NUL-terminated copy of a path for C. */
export function cPath(path: string): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(path + "\0");
}
