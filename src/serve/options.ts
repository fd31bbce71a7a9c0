/**
 * `vstor serve`'s command line, as qemu-storage-daemon takes it: `--blockdev` and `--export` in
 * QEMU's keyval syntax (`key=value,...` with `,,` for a comma, dotted keys for nested options, an
 * implied first key — `driver` for blockdevs, `type` for exports — or a JSON object), `--object
 * iothread,…` (its polling parameters), `--pidfile`, `--daemonize`; plus the short form for people (`vstor serve IMAGE --vhost-user-blk SOCK`).
 * Parsing only: the daemon opens what it describes.
 *
 * @module
 */

import { DEFAULT_POLL, type PollParams } from "./adaptive_poll.ts";

/** A command line that cannot be served: the message names the option and the key. */
export class ServeUsageError extends Error {
  /** Always `ServeUsageError`. */
  override readonly name = "ServeUsageError";
}

/** A nested option tree as keyval or JSON gives it (leaves are strings, numbers or booleans). */
export type OptionTree = { [key: string]: OptionValue };
type OptionValue = string | number | boolean | null | OptionTree;

/**
 * QEMU's keyval_parse: `a=1,b.c=2` → `{ a: "1", b: { c: "2" } }`; a first item without `=` is the
 * value of `implied` (when given); `,,` is a literal comma.
 *
 * @throws {ServeUsageError} for an empty key, a key given twice, a missing value, or a key that is
 *   both a value and a group
 */
export function parseKeyval(text: string, implied: string | null, what: string): OptionTree {
  const root: OptionTree = {};
  const items: string[] = [];
  let current = "";
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === ",") {
      if (text[i + 1] === ",") {
        current += ",";
        i++;
        continue;
      }
      items.push(current);
      current = "";
      continue;
    }
    current += c;
  }
  items.push(current);
  items.forEach((item, index) => {
    const eq = item.indexOf("=");
    let key: string, value: string;
    if (eq < 0) {
      if (index !== 0 || implied === null) {
        throw new ServeUsageError(`${what}: expected key=value, got '${item}'`);
      }
      key = implied;
      value = item;
    } else {
      key = item.slice(0, eq);
      value = item.slice(eq + 1);
    }
    const parts = key.split(".");
    if (parts.some((p) => p === "")) throw new ServeUsageError(`${what}: invalid key '${key}'`);
    let node = root;
    for (let p = 0; p < parts.length - 1; p++) {
      const part = parts[p]!;
      const next = node[part];
      if (next === undefined) node = node[part] = {};
      else if (typeof next === "object" && next !== null) node = next;
      else {
        throw new ServeUsageError(
          `${what}: '${parts.slice(0, p + 1).join(".")}' is both a value and a group`,
        );
      }
    }
    const leaf = parts[parts.length - 1]!;
    if (node[leaf] !== undefined) {
      throw new ServeUsageError(`${what}: parameter '${key}' is set more than once`);
    }
    node[leaf] = value;
  });
  return root;
}

/** An option given as keyval or as a JSON object (`{...}`), as qsd's visitors take them. */
export function parseOptionArg(text: string, implied: string | null, what: string): OptionTree {
  if (text.trimStart().startsWith("{")) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (e) {
      throw new ServeUsageError(`${what}: ${e instanceof Error ? e.message : String(e)}`);
    }
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
      throw new ServeUsageError(`${what}: JSON must be an object`);
    }
    return parsed as OptionTree;
  }
  return parseKeyval(text, implied, what);
}

/** Reads typed values out of one option tree, and names what is left over. */
class Fields {
  readonly #tree: OptionTree;
  readonly #what: string;
  readonly #prefix: string;
  readonly #used = new Set<string>();

  constructor(tree: OptionTree, what: string, prefix = "") {
    this.#tree = tree;
    this.#what = what;
    this.#prefix = prefix;
  }

  #name(key: string): string {
    return this.#prefix + key;
  }

  has(key: string): boolean {
    return this.#tree[key] !== undefined;
  }

  raw(key: string): OptionValue | undefined {
    this.#used.add(key);
    return this.#tree[key];
  }

  string(key: string): string | undefined {
    const v = this.raw(key);
    if (v === undefined) return undefined;
    if (typeof v === "string") return v;
    if (typeof v === "number") return String(v);
    throw new ServeUsageError(
      `${this.#what}: parameter '${this.#name(key)}' expects a string`,
    );
  }

  required(key: string): string {
    const v = this.string(key);
    if (v === undefined || v === "") {
      throw new ServeUsageError(`${this.#what}: parameter '${this.#name(key)}' is missing`);
    }
    return v;
  }

  bool(key: string, fallback: boolean): boolean {
    const v = this.raw(key);
    if (v === undefined) return fallback;
    if (v === true || v === "on" || v === "true" || v === "yes") return true;
    if (v === false || v === "off" || v === "false" || v === "no") return false;
    throw new ServeUsageError(
      `${this.#what}: parameter '${this.#name(key)}' expects 'on' or 'off'`,
    );
  }

  int(key: string, fallback: number, min: number, max: number): number {
    const v = this.raw(key);
    if (v === undefined) return fallback;
    const n = typeof v === "number"
      ? v
      : typeof v === "string" && /^\d+$/.test(v)
      ? Number(v)
      : NaN;
    if (!Number.isSafeInteger(n) || n < min || n > max) {
      throw new ServeUsageError(
        `${this.#what}: parameter '${this.#name(key)}' expects a number from ${min} to ${max}`,
      );
    }
    return n;
  }

  oneOf<T extends string>(key: string, choices: readonly T[], fallback: T): T {
    const v = this.string(key);
    if (v === undefined) return fallback;
    if (!(choices as readonly string[]).includes(v)) {
      throw new ServeUsageError(
        `${this.#what}: parameter '${this.#name(key)}' expects ${choices.join(", ")}`,
      );
    }
    return v as T;
  }

  group(key: string): Fields | undefined {
    const v = this.raw(key);
    if (v === undefined) return undefined;
    if (typeof v !== "object" || v === null) {
      throw new ServeUsageError(`${this.#what}: parameter '${this.#name(key)}' expects options`);
    }
    return new Fields(v, this.#what, `${this.#name(key)}.`);
  }

  /** Every key must have been read: QEMU's "Invalid parameter". */
  done(): void {
    for (const key of Object.keys(this.#tree)) {
      if (!this.#used.has(key)) {
        throw new ServeUsageError(`${this.#what}: invalid parameter '${this.#name(key)}'`);
      }
    }
  }
}

/** One `--blockdev`: a format node over a file, or a file node. */
export interface BlockdevSpec {
  readonly nodeName: string;
  readonly driver: "file" | "nbd" | "rbd" | "raw" | "qcow2";
  /** driver=file: the path; driver=nbd: the export's URI (built from server.* and export). */
  readonly filename?: string;
  /** Format drivers: the file under them, nested or by node name. */
  readonly file?: BlockdevSpec | string;
  /** qcow2: the backing node by name, null for none, absent to open the image's own. */
  readonly backing?: string | null;
  readonly readOnly: boolean;
  /** cache.direct: O_DIRECT. */
  readonly cacheDirect: boolean;
  /** cache.no-flush: flushes are dropped (cache=unsafe). */
  readonly cacheNoFlush: boolean;
  readonly aio?: "threads" | "io_uring" | "native";
  readonly discard: "ignore" | "unmap";
  readonly detectZeroes: "off" | "on" | "unmap";
  /** The short form without -f: the image's format is probed (qsd never probes). */
  readonly probe?: boolean;
  /** driver=nbd: QEMU's reconnect-delay and open-timeout, in seconds. */
  readonly reconnectDelay?: number;
  readonly openTimeout?: number;
}

/** One `--export`. */
export interface ExportSpec {
  readonly type: "vhost-user-blk" | "vhost-user-scsi";
  readonly id: string;
  readonly nodeName: string;
  readonly writable: boolean;
  /** The unix socket path to listen on. */
  readonly socket: string;
  readonly numQueues: number;
  readonly logicalBlockSize: number;
  /** How the export's thread polls its rings (its iothread's parameters, or the defaults). */
  readonly poll: PollParams;
}

/** One `--export type=nbd`: a node served by the NBD server under a name. */
export interface NbdExportSpec {
  readonly type: "nbd";
  readonly id: string;
  readonly nodeName: string;
  /** The export name clients ask for (default: the node name, as QEMU). */
  readonly name: string;
  readonly description?: string;
  readonly writable: boolean;
  /** Offer the `qemu:allocation-depth` metadata context. */
  readonly allocationDepth: boolean;
  /** Persistent dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts. */
  readonly bitmaps?: readonly string[];
}

/** Where `--nbd-server` listens. */
export type NbdAddress =
  | { readonly type: "unix"; readonly path: string }
  | { readonly type: "inet"; readonly host: string; readonly port: number };

/** `--nbd-server`: the one NBD server all NBD exports are served by. */
export interface NbdServerSpec {
  readonly addr: NbdAddress;
  /** Clients at once; 0 for no limit (QEMU's default: 100). */
  readonly maxConnections: number;
  /** tls-creds: every client must STARTTLS with these x509 credentials. */
  readonly tls?: TlsCredsSpec;
}

/** `--object tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]`. */
export interface TlsCredsSpec {
  readonly id: string;
  /** Holds ca-cert.pem, server-cert.pem and server-key.pem (QEMU's names). */
  readonly dir: string;
  /** Clients must show a certificate the CA signed (QEMU's default: on). */
  readonly verifyPeer: boolean;
}

/** One `--object iothread,id=ID,…`: an export's thread and how it polls. */
interface IothreadSpec {
  readonly id: string;
  readonly poll: PollParams;
}

/** What `vstor serve` was asked to do. */
export interface ServeConfig {
  readonly blockdevs: readonly BlockdevSpec[];
  readonly exports: readonly ExportSpec[];
  readonly nbdExports: readonly NbdExportSpec[];
  readonly nbdServer?: NbdServerSpec;
  readonly pidfile?: string;
  readonly daemonize: boolean;
}

let anonymous = 0;

/**
 * driver=rbd's `pool`, `image`, `snapshot`, `conf`, `user` and `key-secret`-free options as the
 * `rbd:` name vstor opens (QEMU's own two spellings of one image).
 */
function rbdName(f: Fields, what: string): string {
  const esc = (v: string) => v.replace(/[\\:@/]/g, (c) => `\\${c}`);
  const escValue = (v: string) => v.replace(/[\\:]/g, (c) => `\\${c}`);
  let name = `rbd:${esc(f.required("pool"))}/${esc(f.required("image"))}`;
  const snap = f.string("snapshot");
  if (snap !== undefined) name += `@${esc(snap)}`;
  const conf = f.string("conf");
  if (conf !== undefined) name += `:conf=${escValue(conf)}`;
  const user = f.string("user");
  if (user !== undefined) name += `:id=${escValue(user)}`;
  if (f.has("key-secret") || f.has("encrypt") || f.has("auth-client-required")) {
    throw new ServeUsageError(
      `${what}: key-secret, encrypt and auth-client-required are not supported`,
    );
  }
  if (f.raw("namespace") !== undefined) {
    throw new ServeUsageError(`${what}: RBD namespaces are not supported`);
  }
  return name;
}

/** driver=nbd's `server.*` and `export` as the NBD URI vstor opens. */
function nbdUri(f: Fields, what: string): string {
  const server = f.group("server");
  if (server === undefined) throw new ServeUsageError(`${what}: parameter 'server' is missing`);
  const type = server.oneOf("type", ["unix", "inet"] as const, "inet");
  const name = encodeURIComponent(f.string("export") ?? "");
  let uri: string;
  if (type === "unix") {
    uri = `nbd+unix:///${name}?socket=${encodeURIComponent(server.required("path"))}`;
  } else {
    const host = server.required("host");
    const port = server.string("port") ?? "10809";
    if (!/^[0-9]+$/.test(port) || Number(port) > 65535) {
      throw new ServeUsageError(`${what}: server.port '${port}' is not a port number`);
    }
    uri = `nbd://${host.includes(":") ? `[${host}]` : host}:${port}/${name}`;
  }
  server.done();
  if (f.has("tls-creds")) throw new ServeUsageError(`${what}: TLS is not supported yet`);
  return uri;
}

function blockdev(f: Fields, what: string, nested: boolean): BlockdevSpec {
  const driver = f.oneOf("driver", ["file", "nbd", "rbd", "raw", "qcow2"] as const, "raw");
  if (!f.has("driver")) f.required("driver");
  const nodeName = nested
    ? (f.string("node-name") ?? `#node${anonymous++}`)
    : f.required("node-name");
  const cache = f.group("cache");
  const spec: {
    -readonly [K in keyof BlockdevSpec]: BlockdevSpec[K];
  } = {
    nodeName,
    driver,
    readOnly: f.bool("read-only", false),
    cacheDirect: cache?.bool("direct", false) ?? false,
    cacheNoFlush: cache?.bool("no-flush", false) ?? false,
    discard: f.oneOf("discard", ["ignore", "unmap"] as const, "ignore"),
    detectZeroes: f.oneOf("detect-zeroes", ["off", "on", "unmap"] as const, "off"),
  };
  cache?.done();
  const aio = f.string("aio");
  if (aio !== undefined) {
    if (aio !== "threads" && aio !== "io_uring" && aio !== "native") {
      throw new ServeUsageError(`${what}: parameter 'aio' expects threads, native, io_uring`);
    }
    if (driver !== "file") {
      throw new ServeUsageError(`${what}: invalid parameter 'aio' (driver '${driver}')`);
    }
    if (aio === "native" && !spec.cacheDirect) {
      throw new ServeUsageError(
        `${what}: aio=native was specified, but it requires cache.direct=on`,
      );
    }
    spec.aio = aio;
  }
  if (driver === "file") {
    spec.filename = f.required("filename");
    f.raw("locking"); // accepted and ignored: vstor always takes QEMU's image locks
  } else if (driver === "rbd") {
    if (spec.cacheDirect || aio !== undefined) {
      throw new ServeUsageError(`${what}: an RBD node has no cache.direct or aio (librbd's)`);
    }
    spec.filename = rbdName(f, what);
  } else if (driver === "nbd") {
    if (spec.cacheDirect || aio !== undefined) {
      throw new ServeUsageError(`${what}: an NBD node has no cache.direct or aio (the server's)`);
    }
    spec.filename = nbdUri(f, what);
    const delay = f.int("reconnect-delay", 0, 0, 3600);
    const open = f.int("open-timeout", 0, 0, 3600);
    if (delay > 0) spec.reconnectDelay = delay;
    if (open > 0) spec.openTimeout = open;
  } else {
    const file = f.raw("file");
    if (file === undefined) throw new ServeUsageError(`${what}: parameter 'file' is missing`);
    spec.file = typeof file === "string"
      ? file
      : blockdev(new Fields(file as OptionTree, what, "file."), what, true);
    if (driver === "qcow2") {
      const backing = f.raw("backing");
      if (backing === null || backing === "null" || backing === "") spec.backing = null;
      else if (typeof backing === "string") spec.backing = backing;
      else if (backing !== undefined) {
        throw new ServeUsageError(`${what}: parameter 'backing' expects a node name or null`);
      }
    }
  }
  f.done();
  return spec;
}

function tlsCredsSpec(f: Fields, what: string): TlsCredsSpec {
  const id = f.required("id");
  const dir = f.required("dir");
  const endpoint = f.oneOf("endpoint", ["server", "client"] as const, "client");
  if (endpoint !== "server") {
    throw new ServeUsageError(`${what}: tls-creds '${id}' must have endpoint=server for a server`);
  }
  const spec = { id, dir, verifyPeer: f.bool("verify-peer", true) };
  f.raw("priority"); // GnuTLS's priority string: node's defaults apply
  f.done();
  return spec;
}

function iothreadSpec(f: Fields, what: string): IothreadSpec {
  const type = f.string("qom-type");
  if (type !== "iothread") {
    throw new ServeUsageError(
      type === undefined
        ? `${what}: parameter 'qom-type' is missing`
        : `${what}: object type '${type}' is not supported (iothread, tls-creds-x509)`,
    );
  }
  const id = f.required("id");
  const limit = 2 ** 31 - 1;
  const poll = {
    maxNs: f.int("poll-max-ns", DEFAULT_POLL.maxNs, 0, limit),
    grow: f.int("poll-grow", DEFAULT_POLL.grow, 0, limit),
    shrink: f.int("poll-shrink", DEFAULT_POLL.shrink, 0, limit),
  };
  // Accepted for qsd's command lines: submissions are not batched by count here.
  f.int("aio-max-batch", 0, 0, limit);
  f.done();
  return { id, poll };
}

function nbdExportSpec(f: Fields, what: string): NbdExportSpec {
  const id = f.required("id");
  const nodeName = f.required("node-name");
  const name = f.string("name") ?? nodeName;
  const description = f.string("description");
  const utf8 = (s: string) => new TextEncoder().encode(s).length;
  if (utf8(name) > 4096) throw new ServeUsageError(`${what}: name is longer than 4096 bytes`);
  if (description !== undefined && utf8(description) > 4096) {
    throw new ServeUsageError(`${what}: description is longer than 4096 bytes`);
  }
  const bitmaps = bitmapList(f.raw("bitmaps"), what);
  const spec: NbdExportSpec = {
    type: "nbd",
    id,
    nodeName,
    name,
    ...(description === undefined ? {} : { description }),
    writable: f.bool("writable", false),
    allocationDepth: f.bool("allocation-depth", false),
    ...(bitmaps.length === 0 ? {} : { bitmaps }),
  };
  f.done();
  return spec;
}

/**
 * `bitmaps`: QEMU's list of bitmap names, as keyval (`bitmaps.0=a,bitmaps.1=b`) or JSON
 * (`"bitmaps": ["a", "b"]`); the `{node, name}` form is not taken (vstor looks down the export's
 * own chain, as QEMU does for a name).
 */
function bitmapList(value: OptionValue | undefined, what: string): string[] {
  if (value === undefined) return [];
  const items = Array.isArray(value)
    ? value
    : typeof value === "object" && value !== null
    ? Object.keys(value).sort((a, b) => Number(a) - Number(b)).map((k) => {
      if (!/^[0-9]+$/.test(k)) {
        throw new ServeUsageError(`${what}: parameter 'bitmaps.${k}' is not a list index`);
      }
      return (value as OptionTree)[k];
    })
    : [value];
  const names = items.map((v) => {
    if (typeof v !== "string" || v === "") {
      throw new ServeUsageError(`${what}: parameter 'bitmaps' expects bitmap names`);
    }
    return v;
  });
  if (new Set(names).size !== names.length) {
    throw new ServeUsageError(`${what}: a bitmap is named twice in 'bitmaps'`);
  }
  return names;
}

function nbdServerSpec(
  f: Fields,
  what: string,
  creds: ReadonlyMap<string, TlsCredsSpec>,
): NbdServerSpec {
  const addr = f.group("addr");
  if (addr === undefined) throw new ServeUsageError(`${what}: parameter 'addr' is missing`);
  const type = addr.oneOf("type", ["unix", "inet", "fd"] as const, "inet");
  let address: NbdAddress;
  if (type === "unix") {
    address = { type, path: addr.required("path") };
  } else if (type === "inet") {
    const host = addr.required("host");
    const portText = addr.required("port");
    const port = Number(portText);
    if (!/^[0-9]+$/.test(portText) || port > 65535) {
      throw new ServeUsageError(`${what}: addr.port '${portText}' is not a port number`);
    }
    // QEMU's inet keys that change nothing here.
    for (const key of ["ipv4", "ipv6", "numeric", "keep-alive"]) addr.raw(key);
    address = { type, host, port };
  } else {
    throw new ServeUsageError(`${what}: addr.type=fd is not supported (use unix or inet)`);
  }
  addr.done();
  if (f.has("tls-authz")) throw new ServeUsageError(`${what}: tls-authz is not supported`);
  const credsId = f.string("tls-creds");
  const tls = credsId === undefined ? undefined : creds.get(credsId);
  if (credsId !== undefined && tls === undefined) {
    throw new ServeUsageError(
      `${what}: no tls-creds object named '${credsId}' (give --object first)`,
    );
  }
  const spec: NbdServerSpec = {
    addr: address,
    maxConnections: f.int("max-connections", 100, 0, 2 ** 32 - 1),
    ...(tls === undefined ? {} : { tls }),
  };
  f.done();
  return spec;
}

function exportSpec(
  f: Fields,
  what: string,
  iothreads: ReadonlyMap<string, IothreadSpec>,
): ExportSpec | NbdExportSpec {
  const type = f.string("type");
  if (type === undefined) throw new ServeUsageError(`${what}: parameter 'type' is missing`);
  if (type === "nbd") return nbdExportSpec(f, what);
  if (type !== "vhost-user-blk" && type !== "vhost-user-scsi") {
    throw new ServeUsageError(
      `${what}: export type '${type}' is not supported (vhost-user-blk, vhost-user-scsi, nbd)`,
    );
  }
  const id = f.required("id");
  const nodeName = f.required("node-name");
  const addr = f.group("addr");
  if (addr === undefined) throw new ServeUsageError(`${what}: parameter 'addr' is missing`);
  const addrType = addr.oneOf("type", ["unix", "fd"] as const, "unix");
  if (addrType !== "unix") {
    throw new ServeUsageError(`${what}: addr.type=fd is not supported (use addr.type=unix)`);
  }
  const socket = addr.required("path");
  addr.done();
  // qsd's iothread: the export's Worker polls as it says (each export has its own Worker here).
  const iothread = f.string("iothread");
  const thread = iothread === undefined ? undefined : iothreads.get(iothread);
  if (iothread !== undefined && thread === undefined) {
    throw new ServeUsageError(`${what}: no iothread named '${iothread}' (give --object first)`);
  }
  const spec: ExportSpec = {
    type,
    id,
    nodeName,
    writable: f.bool("writable", false),
    socket,
    numQueues: f.int("num-queues", 1, 1, 256),
    logicalBlockSize: f.int("logical-block-size", 512, 512, 65536),
    poll: thread?.poll ?? DEFAULT_POLL,
  };
  if ((spec.logicalBlockSize & (spec.logicalBlockSize - 1)) !== 0) {
    throw new ServeUsageError(`${what}: parameter 'logical-block-size' must be a power of 2`);
  }
  f.done();
  return spec;
}

/**
 * Parses `vstor serve`'s arguments (after `serve`).
 *
 * @throws {ServeUsageError} naming the option and what is wrong
 */
export function parseServeArgs(args: readonly string[]): ServeConfig {
  const blockdevs: BlockdevSpec[] = [];
  const exports: ExportSpec[] = [];
  const nbdExports: NbdExportSpec[] = [];
  let nbdServer: NbdServerSpec | undefined;
  const iothreads = new Map<string, IothreadSpec>();
  const creds = new Map<string, TlsCredsSpec>();
  let pidfile: string | undefined;
  let daemonize = false;
  const positional: string[] = [];
  const short: ShortForm = {};
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    const eq = arg.startsWith("--") ? arg.indexOf("=") : -1;
    const name = eq > 0 ? arg.slice(0, eq) : arg;
    const value = (): string => {
      if (eq > 0) return arg.slice(eq + 1);
      const next = args[++i];
      if (next === undefined) throw new ServeUsageError(`${name} needs an argument`);
      return next;
    };
    switch (name) {
      case "--blockdev": {
        const what = `--blockdev ${blockdevs.length + 1}`;
        blockdevs.push(
          blockdev(new Fields(parseOptionArg(value(), "driver", what), what), what, false),
        );
        break;
      }
      case "--export": {
        const what = `--export ${exports.length + nbdExports.length + 1}`;
        const spec = exportSpec(
          new Fields(parseOptionArg(value(), "type", what), what),
          what,
          iothreads,
        );
        if (spec.type === "nbd") nbdExports.push(spec);
        else exports.push(spec);
        break;
      }
      case "--nbd-server": {
        if (nbdServer !== undefined) {
          throw new ServeUsageError("--nbd-server: an NBD server is already given");
        }
        nbdServer = nbdServerSpec(
          new Fields(parseOptionArg(value(), null, "--nbd-server"), "--nbd-server"),
          "--nbd-server",
          creds,
        );
        break;
      }
      case "--nbd":
        short.nbd = value();
        break;
      case "--export-name":
        short.exportName = value();
        break;
      case "--object": {
        const what = `--object ${iothreads.size + creds.size + 1}`;
        const fields = new Fields(parseOptionArg(value(), "qom-type", what), what);
        const object = fields.string("qom-type") === "tls-creds-x509"
          ? tlsCredsSpec(fields, what)
          : iothreadSpec(fields, what);
        if (iothreads.has(object.id) || creds.has(object.id)) {
          throw new ServeUsageError(`${what}: duplicate object id '${object.id}'`);
        }
        if ("dir" in object) creds.set(object.id, object);
        else iothreads.set(object.id, object);
        break;
      }
      case "--pidfile":
        pidfile = value();
        break;
      case "--daemonize":
        daemonize = true;
        break;
      case "--vhost-user-blk":
        short.blk = value();
        break;
      case "--vhost-user-scsi":
        short.scsi = value();
        break;
      case "--writable":
        short.writable = true;
        break;
      case "-f":
      case "--format":
        short.format = value();
        break;
      default:
        if (arg.startsWith("-")) throw new ServeUsageError(`unknown option '${arg}'`);
        positional.push(arg);
    }
  }
  if (
    positional.length > 0 || short.blk !== undefined || short.scsi !== undefined ||
    short.nbd !== undefined
  ) {
    if (short.nbd !== undefined) {
      if (nbdServer !== undefined) {
        throw new ServeUsageError("--nbd: an NBD server is already given (--nbd-server)");
      }
      nbdServer = { addr: shortNbdAddress(short.nbd), maxConnections: 100 };
    }
    shortForm(positional, short, blockdevs, exports, nbdExports);
  }
  checkGraph(blockdevs, exports, nbdExports);
  if (nbdExports.length > 0 && nbdServer === undefined) {
    throw new ServeUsageError(
      `export '${nbdExports[0]!.id}': the NBD server is not running (give --nbd-server)`,
    );
  }
  if (exports.length === 0 && nbdExports.length === 0) {
    throw new ServeUsageError(
      "nothing to serve: give --export (or IMAGE --vhost-user-blk SOCK or IMAGE --nbd ADDR)",
    );
  }
  return {
    blockdevs,
    exports,
    nbdExports,
    ...(nbdServer === undefined ? {} : { nbdServer }),
    ...(pidfile === undefined ? {} : { pidfile }),
    daemonize,
  };
}

/** The short form's options. */
interface ShortForm {
  blk?: string;
  scsi?: string;
  nbd?: string;
  exportName?: string;
  writable?: boolean;
  format?: string;
}

/** `--nbd unix:PATH` or `--nbd tcp:HOST:PORT` (`tcp::PORT` for every address). */
function shortNbdAddress(text: string): NbdAddress {
  if (text.startsWith("unix:") && text.length > 5) return { type: "unix", path: text.slice(5) };
  const m = /^tcp:(.*):([0-9]+)$/.exec(text);
  if (m !== null && Number(m[2]) <= 65535) {
    const host = m[1]!.replace(/^\[(.*)\]$/, "$1");
    return { type: "inet", host: host === "" ? "0.0.0.0" : host, port: Number(m[2]) };
  }
  throw new ServeUsageError(`--nbd: '${text}' is neither unix:PATH nor tcp:HOST:PORT`);
}

function shortForm(
  positional: readonly string[],
  short: ShortForm,
  blockdevs: BlockdevSpec[],
  exports: ExportSpec[],
  nbdExports: NbdExportSpec[],
): void {
  if (positional.length !== 1) {
    throw new ServeUsageError(`the short form serves one IMAGE (got ${positional.length})`);
  }
  if (short.blk === undefined && short.scsi === undefined && short.nbd === undefined) {
    throw new ServeUsageError(
      "IMAGE needs --vhost-user-blk SOCK, --vhost-user-scsi SOCK or --nbd ADDR",
    );
  }
  const format = short.format;
  if (format !== undefined && format !== "raw" && format !== "qcow2") {
    throw new ServeUsageError(`-f: format '${format}' is not raw or qcow2`);
  }
  const image = positional[0]!;
  const base = {
    readOnly: !short.writable,
    cacheDirect: false,
    cacheNoFlush: false,
    discard: "unmap",
    detectZeroes: "off",
  } as const;
  blockdevs.push({
    ...base,
    nodeName: "image",
    driver: format === "qcow2" ? "qcow2" : "raw",
    file: { ...base, nodeName: "image-file", driver: "file", filename: image },
    // The format is probed when not given, as qemu-img's verbs do.
    ...(format === undefined ? { probe: true } : {}),
  });
  for (
    const [type, socket] of [["vhost-user-blk", short.blk], [
      "vhost-user-scsi",
      short.scsi,
    ]] as const
  ) {
    if (socket === undefined) continue;
    exports.push({
      type,
      id: type,
      nodeName: "image",
      writable: short.writable === true,
      socket,
      numQueues: 1,
      logicalBlockSize: 512,
      poll: DEFAULT_POLL,
    });
  }
  if (short.nbd !== undefined) {
    // qemu-nbd's default export name is the empty one.
    nbdExports.push({
      type: "nbd",
      id: "nbd",
      nodeName: "image",
      name: short.exportName ?? "",
      writable: short.writable === true,
      allocationDepth: true,
    });
  }
}

/** Node names are unique, exports name existing nodes, sockets are not shared. */
function checkGraph(
  blockdevs: readonly BlockdevSpec[],
  exports: readonly ExportSpec[],
  nbdExports: readonly NbdExportSpec[],
): void {
  const names = new Set<string>();
  const add = (b: BlockdevSpec) => {
    if (names.has(b.nodeName)) {
      throw new ServeUsageError(`duplicate node name '${b.nodeName}'`);
    }
    names.add(b.nodeName);
    if (typeof b.file === "object") add(b.file);
  };
  blockdevs.forEach(add);
  for (const b of blockdevs) {
    if (typeof b.file === "string" && !names.has(b.file)) {
      throw new ServeUsageError(`node '${b.nodeName}': no node named '${b.file}' for its file`);
    }
    if (typeof b.backing === "string" && !names.has(b.backing)) {
      throw new ServeUsageError(
        `node '${b.nodeName}': no node named '${b.backing}' for its backing`,
      );
    }
  }
  const ids = new Set<string>(), sockets = new Set<string>();
  for (const e of exports) {
    if (!names.has(e.nodeName)) {
      throw new ServeUsageError(`export '${e.id}': no node named '${e.nodeName}'`);
    }
    if (ids.has(e.id)) throw new ServeUsageError(`duplicate export id '${e.id}'`);
    if (sockets.has(e.socket)) throw new ServeUsageError(`two exports on socket '${e.socket}'`);
    ids.add(e.id);
    sockets.add(e.socket);
  }
  const exportNames = new Set<string>();
  for (const e of nbdExports) {
    if (!names.has(e.nodeName)) {
      throw new ServeUsageError(`export '${e.id}': no node named '${e.nodeName}'`);
    }
    if (ids.has(e.id)) throw new ServeUsageError(`duplicate export id '${e.id}'`);
    if (exportNames.has(e.name)) throw new ServeUsageError(`two NBD exports named '${e.name}'`);
    ids.add(e.id);
    exportNames.add(e.name);
  }
}
