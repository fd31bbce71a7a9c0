/**
 * A Ceph RBD image as a host file, through librbd (`src/sys/rbd.ts`): QEMU's names
 * `rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=ID][:key=…][:mon_host=…][:OPTION=VALUE…]` (a `\:` is a
 * literal colon), so any image layer and verb opens one as it opens a file: raw or qcow2 on RBD,
 * RBD as a backing file. Writes past the end grow the image (rbd_resize), as a file grows;
 * discards and hole punches are rbd_discard (the range reads as zeroes afterwards); reads and
 * writes may be in flight together (librbd's aio). A cluster that does not answer fails the call
 * after the timeout (30 s) instead of hanging.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { RadosPool, RbdImage } from "../sys/rbd.ts";
import { type HostExtent, type HostFile, type HostSnapshots, zeroPastEnd } from "./host_file.ts";

/** What an `rbd:` name says. */
export interface RbdTarget {
  readonly pool: string;
  readonly image: string;
  readonly snap?: string;
  readonly conf?: string;
  readonly id?: string;
  /** Every other `key=value` (key, mon_host, keyring, …), handed to librados by name. */
  readonly settings: Readonly<Record<string, string>>;
}

/**
 * The name QEMU gives an RBD node in qemu-img info (its json: filename), for the names it was
 * seen to print here: pool, image and conf; other names are shown as given.
 */
export function qemuRbdFilename(name: string): string {
  const t = parseRbdName(name);
  if (t.snap !== undefined || t.id !== undefined || Object.keys(t.settings).length > 0) {
    return name;
  }
  const file: Record<string, string> = { pool: t.pool, image: t.image };
  if (t.conf !== undefined) file["conf"] = t.conf;
  file["driver"] = "rbd";
  file["namespace"] = "";
  // QEMU's own JSON spacing: `"key": value` separated by ", ".
  const obj = (o: Record<string, string | Record<string, string>>): string =>
    "{" + Object.entries(o).map(([k, v]) =>
      `${JSON.stringify(k)}: ${typeof v === "string" ? JSON.stringify(v) : obj(v)}`
    ).join(", ") + "}";
  return `json:${obj({ driver: "raw", file })}`;
}

/** True for QEMU's `rbd:` names. */
export function isRbdName(text: string): boolean {
  return text.startsWith("rbd:");
}

/** Splits at unescaped `sep`, turning `\X` into `X`. */
function split(text: string, sep: string): string[] {
  const parts: string[] = [];
  let cur = "";
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!;
    if (ch === "\\" && i + 1 < text.length) {
      cur += text[++i];
    } else if (ch === sep) {
      parts.push(cur);
      cur = "";
    } else cur += ch;
  }
  parts.push(cur);
  return parts;
}

/**
 * Parses `rbd:POOL/IMAGE[@SNAP][:KEY=VALUE]…` as QEMU's rbd driver does.
 *
 * @throws {BlockError} `invalid-argument` naming what is wrong
 */
export function parseRbdName(name: string): RbdTarget {
  const bad = (why: string) =>
    new BlockError("invalid-argument", `Invalid rbd name '${name}': ${why}`, { path: name });
  if (!isRbdName(name)) throw bad("it does not start with rbd:");
  const [spec, ...opts] = split(name.slice(4), ":");
  const slash = spec!.indexOf("/");
  if (slash <= 0) throw bad("expected POOL/IMAGE");
  const pool = spec!.slice(0, slash);
  let image = spec!.slice(slash + 1);
  let snap: string | undefined;
  const at = image.indexOf("@");
  if (at >= 0) {
    snap = image.slice(at + 1);
    image = image.slice(0, at);
    if (snap === "") throw bad("an empty snapshot name");
  }
  if (image === "") throw bad("no image name");
  const settings: Record<string, string> = {};
  let conf: string | undefined, id: string | undefined;
  for (const o of opts) {
    const eq = o.indexOf("=");
    if (eq <= 0) throw bad(`option '${o}' is not KEY=VALUE`);
    const key = o.slice(0, eq), value = o.slice(eq + 1);
    if (key === "conf") conf = value;
    else if (key === "id") id = value;
    else settings[key] = value;
  }
  return {
    pool,
    image,
    ...(snap === undefined ? {} : { snap }),
    ...(conf === undefined ? {} : { conf }),
    ...(id === undefined ? {} : { id }),
    settings,
  };
}

/** An open RBD image as a host file. */
export class RbdFile implements HostFile {
  readonly path: string;
  readonly readOnly: boolean;
  /** The cluster's storage is its own business: allocatedSize() cannot say. */
  readonly knowsAllocation = false;
  readonly #pool: RadosPool;
  readonly #image: RbdImage;
  #size: number;
  #closed = false;
  /**
   * Async writes not yet settled: flushAsync and growing wait for them (a synchronous rbd_flush
   * covers them by itself: librbd flushes what was submitted before it).
   */
  readonly #writes = new Set<Promise<unknown>>();

  /** RBD's own snapshots, as QEMU's rbd driver offers them. */
  readonly snapshots: HostSnapshots = {
    list: () => {
      this.#live();
      return this.#image.snapshots();
    },
    create: (name) => {
      this.#writable();
      this.#image.snapshot("create", name);
    },
    remove: (name) => {
      this.#writable();
      this.#image.snapshot("remove", name);
    },
    rollback: (name) => {
      this.#writable();
      this.#image.snapshot("rollback", name);
      this.#size = this.#image.size();
    },
  };

  /** RBD's object size (QEMU shows it as the cluster_size of a raw image on RBD). */
  readonly clusterSize: number;

  private constructor(path: string, pool: RadosPool, image: RbdImage, readOnly: boolean) {
    this.path = path;
    this.#pool = pool;
    this.#image = image;
    this.readOnly = readOnly;
    this.#size = image.size();
    this.clusterSize = image.objectSize();
  }

  /**
   * Connects and opens the image `name` says; a snapshot opens read-only. `cache` sets librbd's
   * `rbd_cache` as QEMU does for its cache modes (false for `none` and `directsync`), over what
   * the name or the conf file say; left out, librbd's own setting stands.
   *
   * @throws {BlockError} naming the image: `not-found` for a missing pool or image, `unsupported`
   *   without librbd, `io` for a cluster that does not answer
   */
  static async open(
    name: string,
    opts: { readOnly?: boolean; cache?: boolean } = {},
  ): Promise<RbdFile> {
    const t = parseRbdName(name);
    const pool = await RadosPool.connect(t.pool, {
      ...(t.conf === undefined ? {} : { conf: t.conf }),
      ...(t.id === undefined ? {} : { id: t.id }),
      settings: opts.cache === undefined
        ? t.settings
        : { ...t.settings, rbd_cache: opts.cache ? "true" : "false" },
    });
    try {
      const readOnly = (opts.readOnly ?? false) || t.snap !== undefined;
      const image = RbdImage.open(pool, t.image, {
        readOnly,
        ...(t.snap === undefined ? {} : { snap: t.snap }),
      });
      return new RbdFile(name, pool, image, readOnly);
    } catch (e) {
      pool.close();
      throw e;
    }
  }

  /** Creates the image `name` says, of `size` bytes (layering only, as QEMU creates them). */
  static async create(name: string, size: number): Promise<void> {
    const t = parseRbdName(name);
    if (t.snap !== undefined) {
      throw new BlockError("invalid-argument", "Cannot create an image at a snapshot", {
        path: name,
      });
    }
    const pool = await RadosPool.connect(t.pool, {
      ...(t.conf === undefined ? {} : { conf: t.conf }),
      ...(t.id === undefined ? {} : { id: t.id }),
      settings: t.settings,
    });
    try {
      pool.createImage(t.image, size);
    } finally {
      pool.close();
    }
  }

  #live(): void {
    if (this.#closed) throw new BlockError("io", "File is closed", { path: this.path });
  }

  /** The value the client's librados holds for option `key` (e.g. `rbd_cache`), as text. */
  setting(key: string): string {
    this.#live();
    return this.#pool.setting(key);
  }

  #writable(): void {
    this.#live();
    if (this.readOnly) throw new BlockError("read-only", "File is read-only", { path: this.path });
  }

  size(): number {
    this.#live();
    return this.#size;
  }

  readAt(offset: number, dst: Uint8Array): void {
    this.#live();
    const inside = zeroPastEnd(dst, offset, this.#size);
    if (inside === 0) return;
    const n = this.#image.read(offset, dst.subarray(0, inside));
    if (n < inside) dst.fill(0, n, inside);
  }

  #grow(end: number): void {
    if (end > this.#size) {
      this.#image.resize(end);
      this.#size = end;
    }
  }

  writeAt(offset: number, src: Uint8Array): void {
    this.#writable();
    if (src.length === 0) return;
    this.#grow(offset + src.length);
    this.#image.write(offset, src);
  }

  async readAtAsync(offset: number, dst: Uint8Array): Promise<void> {
    this.#live();
    const inside = zeroPastEnd(dst, offset, this.#size);
    if (inside === 0) return;
    const n = await this.#image.aio("read", offset, dst.subarray(0, inside));
    if (n < inside) dst.fill(0, n, inside);
  }

  async writeAtAsync(offset: number, src: Uint8Array): Promise<void> {
    this.#writable();
    if (src.length === 0) return;
    // Growing is a metadata change: done before the write goes out, synchronously.
    if (offset + src.length > this.#size) {
      await Promise.allSettled([...this.#writes]);
      this.#grow(offset + src.length);
    }
    const io = this.#image.aio("write", offset, src);
    this.#writes.add(io);
    try {
      await io;
    } finally {
      this.#writes.delete(io);
    }
  }

  async flushAsync(): Promise<void> {
    this.#live();
    if (this.readOnly) return;
    await Promise.allSettled([...this.#writes]);
    await this.#image.aio("flush", 0);
  }

  truncate(size: number): void {
    this.#writable();
    this.#image.resize(size);
    this.#size = size;
  }

  flush(): void {
    this.#live();
    if (this.readOnly) return;
    this.#image.flush();
  }

  punchHole(offset: number, length: number): void {
    this.#writable();
    const end = Math.min(offset + length, this.#size);
    if (end > offset) this.#image.discard(offset, end - offset);
  }

  zeroRange(offset: number, length: number): void {
    this.#writable();
    this.#grow(offset + length);
    this.#image.writeZeroes(offset, length);
  }

  preallocate(offset: number, length: number): void {
    this.#writable();
    // RBD allocates as it is written; reserving is only growing.
    this.#grow(offset + length);
  }

  /**
   * As QEMU's rbd driver answers block status: with fast-diff (and a valid object map),
   * rbd_diff_iterate2 over whole objects tells data from never-written ranges (which read as
   * zeroes); otherwise, or for clones and non-default striping (librbd before 1.17 reports
   * offsets wrongly there, Ceph issue 53784), every byte is data.
   */
  dataStatus(offset: number, max: number): HostExtent {
    this.#live();
    if (offset >= this.#size) return { data: false, length: max };
    const want = Math.min(max, this.#size - offset);
    if (!this.#diffUsable()) return { data: true, length: want };
    // From the start of the object, as QEMU does for librbd < 1.17.
    const head = offset % this.#objectSize!;
    const found = this.#image.firstAllocated(offset - head, want + head);
    if (found === null) return { data: false, length: want };
    const start = Math.max(found.offset, offset);
    const end = found.offset + found.length;
    if (start > offset) return { data: false, length: Math.min(want, start - offset) };
    return { data: true, length: Math.max(1, Math.min(want, end - offset)) };
  }

  #objectSize: number | undefined;
  #diff: boolean | undefined;

  #diffUsable(): boolean {
    if (this.#diff === undefined) {
      const FAST_DIFF = 1n << 4n, STRIPINGV2 = 1n << 1n, FAST_DIFF_INVALID = 1n << 1n;
      const features = this.#image.features();
      this.#diff = (features & FAST_DIFF) !== 0n && (features & STRIPINGV2) === 0n &&
        (this.#image.flags() & FAST_DIFF_INVALID) === 0n && !this.#image.hasParent();
      if (this.#diff) this.#objectSize = this.#image.objectSize();
    }
    return this.#diff;
  }

  /** Not known without walking the image (qemu-img says "unavailable"): -1. */
  allocatedSize(): number {
    return -1;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#image.close();
    } finally {
      this.#pool.close();
    }
  }
}
