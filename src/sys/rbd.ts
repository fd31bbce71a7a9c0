/**
 * Ceph's librados and librbd through FFI (`librados.so.2`, `librbd.so.1`, Debian's librados2 and
 * librbd1): a cluster handle, a pool's I/O context, images opened read-write or read-only (a
 * snapshot), synchronous reads, writes, discards, zero writes, flushes and resizes, image create
 * and remove, and asynchronous reads, writes and flushes whose completions librbd announces on a
 * doorbell in this thread's event loop ({@linkcode LoopDoorbell}; where librbd refuses, each is
 * waited for on Deno's blocking pool) — never a JS callback from librbd's threads, which blocks
 * them (measured: writes hang).
 *
 * Signatures from librados.h and librbd.h (Ceph 16.2): handles are pointers, sizes and offsets
 * u64, ssize_t results i64.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { strerror } from "./libc.ts";
import { LoopDoorbell } from "./unix_socket.ts";

const RADOS_SYMBOLS = {
  rados_create: { parameters: ["buffer", "buffer"], result: "i32" },
  rados_conf_read_file: { parameters: ["pointer", "buffer"], result: "i32" },
  rados_conf_set: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  rados_conf_get: { parameters: ["pointer", "buffer", "buffer", "usize"], result: "i32" },
  rados_connect: { parameters: ["pointer"], result: "i32", nonblocking: true },
  rados_shutdown: { parameters: ["pointer"], result: "void" },
  rados_ioctx_create: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  rados_ioctx_destroy: { parameters: ["pointer"], result: "void" },
} as const;

const RBD_SYMBOLS = {
  rbd_open: { parameters: ["pointer", "buffer", "buffer", "buffer"], result: "i32" },
  rbd_open_read_only: { parameters: ["pointer", "buffer", "buffer", "buffer"], result: "i32" },
  rbd_close: { parameters: ["pointer"], result: "i32" },
  rbd_get_size: { parameters: ["pointer", "buffer"], result: "i32" },
  rbd_read: { parameters: ["pointer", "u64", "usize", "buffer"], result: "i64" },
  rbd_write: { parameters: ["pointer", "u64", "usize", "buffer"], result: "i64" },
  rbd_discard: { parameters: ["pointer", "u64", "u64"], result: "i32" },
  rbd_write_zeroes: { parameters: ["pointer", "u64", "usize", "i32", "i32"], result: "i64" },
  rbd_flush: { parameters: ["pointer"], result: "i32" },
  rbd_resize: { parameters: ["pointer", "u64"], result: "i32" },
  rbd_get_features: { parameters: ["pointer", "buffer"], result: "i32" },
  rbd_get_flags: { parameters: ["pointer", "buffer"], result: "i32" },
  rbd_stat: { parameters: ["pointer", "buffer", "usize"], result: "i32" },
  rbd_get_parent_info2: {
    parameters: [
      "pointer",
      "buffer",
      "usize",
      "buffer",
      "usize",
      "buffer",
      "usize",
      "buffer",
      "usize",
    ],
    result: "i32",
  },
  // Its callback runs on the calling thread, during the call (measured): a plain UnsafeCallback.
  rbd_diff_iterate2: {
    parameters: ["pointer", "buffer", "u64", "u64", "u8", "u8", "function", "pointer"],
    result: "i32",
  },
  rbd_snap_create: { parameters: ["pointer", "buffer"], result: "i32" },
  rbd_snap_remove: { parameters: ["pointer", "buffer"], result: "i32" },
  rbd_snap_rollback: { parameters: ["pointer", "buffer"], result: "i32" },
  rbd_snap_list: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  rbd_snap_list_end: { parameters: ["buffer"], result: "void" },
  rbd_create2: { parameters: ["pointer", "buffer", "u64", "u64", "buffer"], result: "i32" },
  rbd_remove: { parameters: ["pointer", "buffer"], result: "i32" },
  rbd_aio_create_completion: { parameters: ["pointer", "pointer", "buffer"], result: "i32" },
  // Completions travel as their address (usize): no pointer object per request on the hot path.
  rbd_aio_read: {
    parameters: ["pointer", "u64", "usize", "buffer", "usize"],
    result: "i32",
  },
  rbd_aio_write: {
    parameters: ["pointer", "u64", "usize", "buffer", "usize"],
    result: "i32",
  },
  rbd_aio_flush: { parameters: ["pointer", "usize"], result: "i32" },
  rbd_aio_wait_for_complete: { parameters: ["usize"], result: "i32", nonblocking: true },
  rbd_aio_is_complete: { parameters: ["usize"], result: "i32" },
  // Completions announced on an eventfd, then collected without a thread per request.
  rbd_set_image_notification: { parameters: ["pointer", "i32", "i32"], result: "i32" },
  rbd_poll_io_events: { parameters: ["pointer", "buffer", "i32"], result: "i32" },
  rbd_aio_get_return_value: { parameters: ["usize"], result: "i64" },
  rbd_aio_release: { parameters: ["usize"], result: "void" },
} as const;

type Rados = Deno.DynamicLibrary<typeof RADOS_SYMBOLS>["symbols"];
type Rbd = Deno.DynamicLibrary<typeof RBD_SYMBOLS>["symbols"];

let libs: { rados: Rados; rbd: Rbd } | undefined;

/**
 * librados and librbd, loaded on first use.
 *
 * @throws {BlockError} `unsupported` naming the package when they cannot be loaded
 */
function lib(): { rados: Rados; rbd: Rbd } {
  if (libs !== undefined) return libs;
  try {
    const rados = Deno.dlopen("librados.so.2", RADOS_SYMBOLS).symbols;
    const rbd = Deno.dlopen("librbd.so.1", RBD_SYMBOLS).symbols;
    libs = { rados, rbd };
    return libs;
  } catch (e) {
    throw new BlockError(
      "unsupported",
      `Ceph RBD needs librbd and librados: install librbd1 (${e instanceof Error ? e.message : e})`,
    );
  }
}

/** A scratch out-parameter for calls whose result is read at once (the aio hot path). */
const OUT = new BigUint64Array(1);
const OUT_BYTES = new Uint8Array(OUT.buffer);

function cstr(s: string): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(s + "\0");
}

/** The pointer an out-parameter received. */
function outPointer(out: BigUint64Array): Deno.PointerValue {
  return Deno.UnsafePointer.create(out[0]!);
}

function failed(call: string, rc: number | bigint, what: string): BlockError {
  const code = -Number(rc);
  const kind = code === 2 ? "not-found" : code === 13 || code === 1 ? "read-only" : "io";
  return new BlockError(kind, `${what}: ${call} failed: ${strerror(code)}`, { errno: code });
}

/** How to reach a cluster (QEMU's rbd options). */
export interface RadosOptions {
  /** A ceph.conf to read (default: librados's own search, /etc/ceph/ceph.conf). */
  readonly conf?: string;
  /** The client id (`admin` when absent). */
  readonly id?: string;
  /** Any other config options (`key`, `mon_host`, `keyring`, timeouts, …), set by name. */
  readonly settings?: Readonly<Record<string, string>>;
  /** Seconds a connect or an operation may take before it fails (never a hang). */
  readonly timeoutSeconds?: number;
}

/** A connected cluster and one pool's I/O context. */
export class RadosPool {
  readonly #cluster: Deno.PointerValue;
  readonly #ioctx: Deno.PointerValue;
  readonly pool: string;
  #closed = false;

  private constructor(cluster: Deno.PointerValue, ioctx: Deno.PointerValue, pool: string) {
    this.#cluster = cluster;
    this.#ioctx = ioctx;
    this.pool = pool;
  }

  /**
   * Connects to the cluster and opens `pool`.
   *
   * @throws {BlockError} `unsupported` without librbd, `not-found` for a missing conf or pool,
   *   `io` for a cluster that does not answer within the timeout (errno 110)
   */
  static async connect(pool: string, opts: RadosOptions = {}): Promise<RadosPool> {
    const { rados } = lib();
    const out = new BigUint64Array(1);
    const what = `rbd pool '${pool}'`;
    let rc = rados.rados_create(
      new Uint8Array(out.buffer),
      opts.id === undefined ? null : cstr(opts.id),
    );
    if (rc < 0) throw failed("rados_create", rc, what);
    const cluster = outPointer(out);
    try {
      rc = rados.rados_conf_read_file(cluster, opts.conf === undefined ? null : cstr(opts.conf));
      if (rc < 0 && opts.conf !== undefined) {
        throw failed(`reading ${opts.conf} (rados_conf_read_file)`, rc, what);
      }
      const timeout = String(opts.timeoutSeconds ?? 30);
      const settings: Record<string, string> = {
        client_mount_timeout: timeout,
        rados_osd_op_timeout: timeout,
        rados_mon_op_timeout: timeout,
        ...opts.settings,
      };
      for (const [key, value] of Object.entries(settings)) {
        rc = rados.rados_conf_set(cluster, cstr(key), cstr(value));
        if (rc < 0) throw failed(`setting ${key} (rados_conf_set)`, rc, what);
      }
      rc = await rados.rados_connect(cluster);
      if (rc < 0) {
        throw -rc === 110
          ? new BlockError(
            "io",
            `${what}: the cluster did not answer within ${settings.client_mount_timeout} s`,
            {
              errno: 110,
            },
          )
          : failed("rados_connect", rc, what);
      }
      rc = rados.rados_ioctx_create(cluster, cstr(pool), new Uint8Array(out.buffer));
      if (rc < 0) throw failed("rados_ioctx_create", rc, what);
      return new RadosPool(cluster, outPointer(out), pool);
    } catch (e) {
      rados.rados_shutdown(cluster);
      throw e;
    }
  }

  get ioctx(): Deno.PointerValue {
    if (this.#closed) throw new BlockError("io", `rbd pool '${this.pool}' is closed`);
    return this.#ioctx;
  }

  /**
   * The value librados holds for option `key` (rados_conf_get), as text.
   *
   * @throws {BlockError} for an option librados does not know
   */
  setting(key: string): string {
    if (this.#closed) throw new BlockError("io", `rbd pool '${this.pool}' is closed`);
    const buffer = new Uint8Array(4096);
    const rc = lib().rados.rados_conf_get(this.#cluster, cstr(key), buffer, BigInt(buffer.length));
    if (rc < 0) throw failed(`reading ${key} (rados_conf_get)`, rc, `rbd pool '${this.pool}'`);
    const end = buffer.indexOf(0);
    return new TextDecoder().decode(buffer.subarray(0, end < 0 ? buffer.length : end));
  }

  /** Creates image `name` of `size` bytes with the layering feature only (no exclusive lock). */
  createImage(name: string, size: number): void {
    const order = new Int32Array(1);
    const LAYERING = 1n;
    const rc = lib().rbd.rbd_create2(
      this.ioctx,
      cstr(name),
      BigInt(size),
      LAYERING,
      new Uint8Array(order.buffer),
    );
    if (rc < 0) throw failed("rbd_create2", rc, `rbd image '${this.pool}/${name}'`);
  }

  /** Removes image `name`. */
  removeImage(name: string): void {
    const rc = lib().rbd.rbd_remove(this.ioctx, cstr(name));
    if (rc < 0) throw failed("rbd_remove", rc, `rbd image '${this.pool}/${name}'`);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const { rados } = lib();
    rados.rados_ioctx_destroy(this.#ioctx);
    rados.rados_shutdown(this.#cluster);
  }
}

/** An open RBD image. */
export class RbdImage {
  readonly #image: Deno.PointerValue;
  readonly what: string;
  #closed = false;

  private constructor(image: Deno.PointerValue, what: string) {
    this.#image = image;
    this.what = what;
  }

  /** Opens image `name` (at snapshot `snap`, read-only). */
  static open(pool: RadosPool, name: string, opts: { readOnly: boolean; snap?: string }): RbdImage {
    const { rbd } = lib();
    const out = new BigUint64Array(1);
    const what = `rbd image '${pool.pool}/${name}${
      opts.snap === undefined ? "" : `@${opts.snap}`
    }'`;
    const open = opts.readOnly || opts.snap !== undefined ? rbd.rbd_open_read_only : rbd.rbd_open;
    const rc = open(
      pool.ioctx,
      cstr(name),
      new Uint8Array(out.buffer),
      opts.snap === undefined ? null : cstr(opts.snap),
    );
    if (rc < 0) throw failed("rbd_open", rc, what);
    return new RbdImage(outPointer(out), what);
  }

  #live(): Deno.PointerValue {
    if (this.#closed) throw new BlockError("io", `${this.what} is closed`);
    return this.#image;
  }

  size(): number {
    const out = new BigUint64Array(1);
    const rc = lib().rbd.rbd_get_size(this.#live(), new Uint8Array(out.buffer));
    if (rc < 0) throw failed("rbd_get_size", rc, this.what);
    return Number(out[0]!);
  }

  /** Reads into `dst` at `offset`; returns the bytes read (short at the end of the image). */
  read(offset: number, dst: Uint8Array): number {
    const n = lib().rbd.rbd_read(
      this.#live(),
      BigInt(offset),
      BigInt(dst.length),
      dst as Uint8Array<ArrayBuffer>,
    );
    if (n < 0n) throw failed("rbd_read", n, this.what);
    return Number(n);
  }

  write(offset: number, src: Uint8Array): void {
    const n = lib().rbd.rbd_write(
      this.#live(),
      BigInt(offset),
      BigInt(src.length),
      src as Uint8Array<ArrayBuffer>,
    );
    if (n < 0n) throw failed("rbd_write", n, this.what);
    if (Number(n) !== src.length) {
      throw new BlockError("io", `${this.what}: rbd_write wrote ${n} of ${src.length} bytes`);
    }
  }

  discard(offset: number, length: number): void {
    const rc = lib().rbd.rbd_discard(this.#live(), BigInt(offset), BigInt(length));
    if (rc < 0) throw failed("rbd_discard", rc, this.what);
  }

  writeZeroes(offset: number, length: number): void {
    const n = lib().rbd.rbd_write_zeroes(this.#live(), BigInt(offset), BigInt(length), 0, 0);
    if (n < 0n) throw failed("rbd_write_zeroes", n, this.what);
  }

  flush(): void {
    const rc = lib().rbd.rbd_flush(this.#live());
    if (rc < 0) throw failed("rbd_flush", rc, this.what);
  }

  resize(size: number): void {
    const rc = lib().rbd.rbd_resize(this.#live(), BigInt(size));
    if (rc < 0) throw failed("rbd_resize", rc, this.what);
  }

  /** The image's feature bits (RBD_FEATURE_*). */
  features(): bigint {
    const out = new BigUint64Array(1);
    const rc = lib().rbd.rbd_get_features(this.#live(), new Uint8Array(out.buffer));
    if (rc < 0) throw failed("rbd_get_features", rc, this.what);
    return out[0]!;
  }

  /** The image's flags (RBD_FLAG_*). */
  flags(): bigint {
    const out = new BigUint64Array(1);
    const rc = lib().rbd.rbd_get_flags(this.#live(), new Uint8Array(out.buffer));
    if (rc < 0) throw failed("rbd_get_flags", rc, this.what);
    return out[0]!;
  }

  /** Bytes per RADOS object (rbd_stat's obj_size). */
  objectSize(): number {
    // rbd_image_info_t: size u64, obj_size u64, num_objs u64, order i32, then name strings.
    const info = new BigUint64Array(64);
    const rc = lib().rbd.rbd_stat(
      this.#live(),
      new Uint8Array(info.buffer),
      BigInt(info.byteLength),
    );
    if (rc < 0) throw failed("rbd_stat", rc, this.what);
    return Number(info[1]!);
  }

  /** Whether the image is a clone (has a parent). */
  hasParent(): boolean {
    const b = () => new Uint8Array(256);
    const rc = lib().rbd.rbd_get_parent_info2(
      this.#live(),
      b(),
      256n,
      b(),
      256n,
      b(),
      256n,
      b(),
      256n,
    );
    if (rc === -2) return false; // ENOENT: no parent
    if (rc < 0) throw failed("rbd_get_parent_info2", rc, this.what);
    return true;
  }

  /**
   * The first allocated extent in `[offset, offset+length)` (whole objects, the parent included),
   * or null when there is none: rbd_diff_iterate2 stopped at its first extent.
   */
  firstAllocated(offset: number, length: number): { offset: number; length: number } | null {
    let found: { offset: number; length: number } | null = null;
    const STOP = -9000;
    const cb = new Deno.UnsafeCallback(
      { parameters: ["u64", "usize", "i32", "pointer"], result: "i32" } as const,
      (off: number | bigint, len: number | bigint, exists: number) => {
        if (exists === 0) return 0;
        found = { offset: Number(off), length: Number(len) };
        return STOP;
      },
    );
    try {
      const rc = lib().rbd.rbd_diff_iterate2(
        this.#live(),
        null,
        BigInt(offset),
        BigInt(length),
        1,
        1,
        cb.pointer,
        null,
      );
      if (rc < 0 && rc !== STOP) throw failed("rbd_diff_iterate2", rc, this.what);
    } finally {
      cb.close();
    }
    return found;
  }

  /** The image's snapshots, oldest first: name, id and the image's size when it was taken. */
  snapshots(): { name: string; id: number; size: number }[] {
    const { rbd } = lib();
    // rbd_snap_info_t: id u64, size u64, name char* — 24 bytes; -ERANGE says how many.
    for (let max = 16; max <= 1 << 16; max *= 4) {
      const table = new BigUint64Array(3 * max);
      const count = new Int32Array([max]);
      const rc = rbd.rbd_snap_list(
        this.#live(),
        new Uint8Array(table.buffer),
        new Uint8Array(count.buffer),
      );
      if (rc === -34) continue; // ERANGE: more than max
      if (rc < 0) throw failed("rbd_snap_list", rc, this.what);
      const out: { name: string; id: number; size: number }[] = [];
      try {
        for (let i = 0; i < rc; i++) {
          const name = Deno.UnsafePointer.create(table[3 * i + 2]!);
          out.push({
            id: Number(table[3 * i]!),
            size: Number(table[3 * i + 1]!),
            name: name === null ? "" : Deno.UnsafePointerView.getCString(name),
          });
        }
      } finally {
        rbd.rbd_snap_list_end(new Uint8Array(table.buffer));
      }
      return out.sort((a, b) => a.id - b.id);
    }
    throw new BlockError("io", `${this.what}: too many snapshots`);
  }

  /** Takes, removes or rolls back to snapshot `name`. */
  snapshot(op: "create" | "remove" | "rollback", name: string): void {
    const { rbd } = lib();
    const call = op === "create"
      ? rbd.rbd_snap_create
      : op === "remove"
      ? rbd.rbd_snap_remove
      : rbd.rbd_snap_rollback;
    const rc = call(this.#live(), cstr(name));
    if (rc < 0) throw failed(`rbd_snap_${op}`, rc, this.what);
  }

  /** Where librbd announces completions: undefined before the first request, null if refused. */
  #doorbell: LoopDoorbell | null | undefined;
  /** Requests in flight by completion address, in event mode. */
  readonly #inflight = new Map<bigint, () => void>();
  /** While requests are in flight: asks each one directly every second (see #sweep). */
  #sweepTimer: ReturnType<typeof setInterval> | undefined;
  readonly #done = new BigUint64Array(64);
  readonly #doneBytes = new Uint8Array(this.#done.buffer);

  /**
   * Sets up completion events once: librbd writes a byte to a doorbell in this thread's event loop
   * when a request completes (EVENT_TYPE_PIPE on a socketpair), and {@linkcode #reap} collects.
   */
  #eventMode(): boolean {
    if (this.#doorbell === undefined) {
      const EVENT_TYPE_PIPE = 1; // librbd.h: EVENT_TYPE_PIPE = 1, EVENT_TYPE_EVENTFD = 2
      const bell = new LoopDoorbell(() => this.#reap());
      if (lib().rbd.rbd_set_image_notification(this.#live(), bell.writeFd, EVENT_TYPE_PIPE) < 0) {
        bell.close();
        this.#doorbell = null;
      } else this.#doorbell = bell;
    }
    return this.#doorbell !== null;
  }

  /** Settles every request rbd_poll_io_events reports complete. */
  #reap(): void {
    if (this.#closed) return;
    const { rbd } = lib();
    const done = this.#done;
    for (;;) {
      const n = rbd.rbd_poll_io_events(this.#image, this.#doneBytes, done.length);
      if (n <= 0) break;
      for (let i = 0; i < n; i++) this.#settle(done[i]!);
      if (n < done.length) break;
    }
  }

  /**
   * A safety net under the doorbell, every second while requests are in flight: a request that
   * completed without an announcement cannot leave its caller waiting.
   */
  #sweep(): void {
    const { rbd } = lib();
    this.#reap();
    for (const address of [...this.#inflight.keys()]) {
      if (rbd.rbd_aio_is_complete(address) !== 0) this.#settle(address);
    }
  }

  /** Resolves the request whose completion is at `address`, if it is still in flight. */
  #settle(address: bigint): void {
    const resolve = this.#inflight.get(address);
    if (resolve === undefined) return;
    this.#untrack(address);
    resolve();
  }

  #track(address: bigint, settle: () => void): void {
    if (this.#inflight.size === 0) {
      this.#doorbell!.ref();
      this.#sweepTimer = setInterval(() => this.#sweep(), 1000);
    }
    this.#inflight.set(address, settle);
  }

  #untrack(address: bigint): void {
    if (!this.#inflight.delete(address) || this.#inflight.size > 0) return;
    this.#doorbell?.unref();
    clearInterval(this.#sweepTimer);
    this.#sweepTimer = undefined;
  }

  /**
   * One asynchronous read, write (`src`) or flush: submitted at once; its completion collected by
   * the image's event pump (or, where librbd refuses events, waited for on Deno's blocking pool).
   * `buffer` must stay untouched until it settles.
   */
  async aio(
    kind: "read" | "write" | "flush",
    offset: number,
    buffer?: Uint8Array,
  ): Promise<number> {
    const { rbd } = lib();
    const image = this.#live();
    const events = this.#eventMode();
    // The out-parameter is read right after the call: one scratch word serves every request.
    let rc = rbd.rbd_aio_create_completion(null, null, OUT_BYTES);
    if (rc < 0) throw failed("rbd_aio_create_completion", rc, this.what);
    const c = OUT[0]!;
    let settled: Promise<void> | undefined;
    if (events) {
      const waiter = Promise.withResolvers<void>();
      this.#track(c, waiter.resolve);
      settled = waiter.promise;
    }
    try {
      const len = BigInt(buffer?.length ?? 0);
      const data = buffer === undefined || buffer.length === 0
        ? null
        : buffer as Uint8Array<ArrayBuffer>;
      rc = kind === "read"
        ? rbd.rbd_aio_read(image, BigInt(offset), len, data, c)
        : kind === "write"
        ? rbd.rbd_aio_write(image, BigInt(offset), len, data, c)
        : rbd.rbd_aio_flush(image, c);
      if (rc < 0) {
        this.#untrack(c);
        throw failed(`rbd_aio_${kind}`, rc, this.what);
      }
      if (settled !== undefined) {
        await settled;
      } else {
        await rbd.rbd_aio_wait_for_complete(c);
      }
      const n = rbd.rbd_aio_get_return_value(c);
      if (n < 0) throw failed(`rbd_aio_${kind}`, n, this.what);
      return Number(n);
    } finally {
      rbd.rbd_aio_release(c);
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    lib().rbd.rbd_close(this.#image);
    // librbd's threads are gone with the image: nothing rings the doorbell any more.
    this.#doorbell?.close();
    clearInterval(this.#sweepTimer);
  }
}
