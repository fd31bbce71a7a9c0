/// <reference lib="deno.worker" />
/**
 * The NBD server of `vstor serve`, in its own Worker: it opens the nodes of every NBD export
 * (once per node), listens on `--nbd-server`'s address (TCP or a unix socket) and serves each
 * client that connects ({@linkcode NbdServer}), all on this thread's event loop.
 *
 * Protocol from the VMM thread: `init` → `ready` (with the address it listens on) or `failed`;
 * `stop` → no new clients, every client's requests in flight complete and its connection closes,
 * the nodes are flushed and closed, a unix socket file removed → `closed`.
 *
 * @module
 */
import { openImage } from "../../formats/open.ts";
import type { DirtyBitmap } from "../../formats/qcow2/dirty_bitmap.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import type { BlockNode } from "../block/node.ts";
import { setUringIdlePoll } from "../host/uring_queue.ts";
import type { NodeOpen } from "./blockdev.ts";
import { type NbdExport, NbdServer } from "./nbd/server.ts";
import type { NbdExportSpec, NbdServerSpec, TlsCredsSpec } from "./options.ts";
import net from "node:net";
import tls from "node:tls";
import { join } from "node:path";
import { NodeStream } from "./nbd/node_stream.ts";
import { concat } from "../host/nbd_protocol.ts";

/** From the VMM thread. */
export type NbdRequest =
  | {
    readonly kind: "init";
    readonly server: NbdServerSpec;
    readonly exports: readonly { readonly spec: NbdExportSpec; readonly open: NodeOpen }[];
  }
  | { readonly kind: "stop" };

/** To the VMM thread. */
export type NbdReply =
  | { readonly kind: "ready"; readonly address: string }
  | { readonly kind: "failed"; readonly message: string }
  | { readonly kind: "log"; readonly line: string }
  | { readonly kind: "closed"; readonly error?: string };

function post(reply: NbdReply): void {
  self.postMessage(reply);
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

let listener: Deno.Listener | null = null;
/** With tls-creds: node's listener (only node:tls can start TLS on an accepted connection). */
let nodeServer: net.Server | null = null;
let server: NbdServer | null = null;
const nodes = new Map<string, BlockNode>();
let socketPath: string | undefined;
let accepting: Promise<void> = Promise.resolve();

async function closeNodes(): Promise<string | undefined> {
  const errors: string[] = [];
  for (const [name, node] of nodes) {
    try {
      if (!node.readOnly) await node.flush();
      await node.close();
    } catch (e) {
      errors.push(`node '${name}': ${describe(e)}`);
    }
  }
  nodes.clear();
  return errors.length === 0 ? undefined : errors.join("; ");
}

function listen(spec: NbdServerSpec): { listener: Deno.Listener; address: string } {
  const a = spec.addr;
  if (a.type === "unix") {
    // A socket file left by a daemon that died is replaced; anything else is an error.
    try {
      if (Deno.lstatSync(a.path).isSocket) Deno.removeSync(a.path);
    } catch {
      // Not there.
    }
    socketPath = a.path;
    return {
      listener: Deno.listen({ transport: "unix", path: a.path }),
      address: `unix:${a.path}`,
    };
  }
  const l = Deno.listen({ hostname: a.host, port: a.port });
  const addr = l.addr as Deno.NetAddr;
  return { listener: l, address: `tcp:${addr.hostname}:${addr.port}` };
}

function peerName(conn: Deno.Conn, n: number): string {
  const a = conn.remoteAddr;
  return a.transport === "tcp" ? `nbd client ${n} (${a.hostname}:${a.port})` : `nbd client ${n}`;
}

async function accept(l: Deno.Listener, s: NbdServer): Promise<void> {
  let n = 0;
  try {
    for await (const conn of l) {
      if (conn.remoteAddr.transport === "tcp") (conn as Deno.TcpConn).setNoDelay(true);
      s.serve(conn, peerName(conn, ++n));
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.BadResource)) post({ kind: "log", line: `nbd: ${describe(e)}` });
  }
}

/**
 * Persistent bitmap `name` of the export's node or, as QEMU looks, of an image below it in the
 * chain; one that was found inconsistent (IN_USE at open) cannot be used.
 */
function findBitmap(node: BlockNode, name: string, exportId: string): DirtyBitmap {
  for (let n: BlockNode | undefined = node; n !== undefined; n = n.backing) {
    const found = n instanceof Qcow2Node ? n.bitmaps?.find(name) : undefined;
    if (found === undefined) continue;
    if (found.inconsistent) {
      throw new Error(`export '${exportId}': Bitmap '${name}' is inconsistent and cannot be used`);
    }
    return found;
  }
  throw new Error(`export '${exportId}': Bitmap '${name}' is not found`);
}

/** The credentials' files, as QEMU names them in its `dir`. */
function readCreds(t: TlsCredsSpec): { key: string; cert: string; ca?: string } {
  const read = (name: string, required: boolean): string | undefined => {
    try {
      return Deno.readTextFileSync(join(t.dir, name));
    } catch (e) {
      if (!required && e instanceof Deno.errors.NotFound) return undefined;
      throw new Error(`tls-creds '${t.id}': cannot read ${join(t.dir, name)}: ${describe(e)}`);
    }
  };
  const ca = read("ca-cert.pem", t.verifyPeer);
  return {
    key: read("server-key.pem", true)!,
    cert: read("server-cert.pem", true)!,
    ...(ca === undefined ? {} : { ca }),
  };
}

/** How long a client's TLS handshake may take. */
const TLS_HANDSHAKE_MS = 10_000;

/** Listens through node:net and serves each client with STARTTLS required. */
function listenTls(spec: NbdServerSpec, s: NbdServer): Promise<string> {
  const t = spec.tls!;
  const creds = readCreds(t);
  const context = tls.createSecureContext(creds);
  let n = 0;
  const srv = net.createServer((socket) => {
    socket.setNoDelay?.(true);
    const plain = new NodeStream(socket);
    const peer = `nbd client ${++n}`;
    const startTls = () =>
      new Promise<NodeStream>((resolve, reject) => {
        const left = plain.detach();
        if (left.length > 0) socket.unshift(concat(left));
        const secure = new tls.TLSSocket(socket, {
          isServer: true,
          secureContext: context,
          requestCert: t.verifyPeer,
          rejectUnauthorized: t.verifyPeer,
        });
        const timer = setTimeout(() => {
          secure.destroy();
          reject(new Error(`no TLS handshake in ${TLS_HANDSHAKE_MS / 1000} s`));
        }, TLS_HANDSHAKE_MS);
        secure.once("secure", () => {
          clearTimeout(timer);
          resolve(new NodeStream(secure));
        });
        secure.once("error", (e: Error) => {
          clearTimeout(timer);
          reject(e);
        });
      });
    s.serve(plain, peer, startTls);
  });
  nodeServer = srv;
  const a = spec.addr;
  return new Promise((resolve, reject) => {
    srv.once("error", reject);
    if (a.type === "unix") {
      try {
        if (Deno.lstatSync(a.path).isSocket) Deno.removeSync(a.path);
      } catch {
        // Not there.
      }
      socketPath = a.path;
      srv.listen(a.path, () => resolve(`unix:${a.path} (TLS)`));
    } else {
      srv.listen(a.port, a.host, () => {
        const bound = srv.address() as net.AddressInfo;
        resolve(`tcp:${bound.address}:${bound.port} (TLS)`);
      });
    }
  });
}

async function init(msg: Extract<NbdRequest, { kind: "init" }>): Promise<void> {
  // An io_uring ring's pump waits in the kernel at most 100 µs at a time, then lets the event
  // loop turn: the sockets are served while the disk works.
  setUringIdlePoll(() => false);
  const exports: NbdExport[] = [];
  try {
    for (const { spec, open } of msg.exports) {
      let node = nodes.get(spec.nodeName);
      if (node === undefined) {
        node = await openImage(open.path, open.options);
        nodes.set(spec.nodeName, node);
      }
      exports.push({
        name: spec.name,
        description: spec.description,
        node,
        writable: spec.writable,
        allocationDepth: spec.allocationDepth,
        bitmaps: (spec.bitmaps ?? []).map((name) => findBitmap(node, name, spec.id)),
      });
    }
    server = new NbdServer(exports, {
      maxConnections: msg.server.maxConnections,
      log: (line) => post({ kind: "log", line }),
    });
    if (msg.server.tls !== undefined) {
      post({ kind: "ready", address: await listenTls(msg.server, server) });
      return;
    }
    const bound = listen(msg.server);
    listener = bound.listener;
    accepting = accept(listener, server);
    post({ kind: "ready", address: bound.address });
  } catch (e) {
    await closeNodes();
    post({ kind: "failed", message: `nbd server: ${describe(e)}` });
  }
}

async function stop(): Promise<void> {
  try {
    listener?.close();
  } catch {
    // Closed already.
  }
  nodeServer?.close();
  await accepting;
  await server?.shutdown();
  const error = await closeNodes();
  if (socketPath !== undefined) {
    try {
      Deno.removeSync(socketPath);
    } catch {
      // Gone already.
    }
  }
  post({ kind: "closed", ...(error === undefined ? {} : { error }) });
}

self.onmessage = (event: MessageEvent<NbdRequest>) => {
  const msg = event.data;
  if (msg.kind === "init") init(msg);
  else stop();
};
