/**
 * `vstor serve`: exports images to real VMs over vhost-user-blk and vhost-user-scsi, and to NBD
 * clients, with
 * qemu-storage-daemon's command line (see `src/serve/options.ts`) and a short form.
 *
 * @module
 */
import { join } from "node:path";
import { Daemon } from "../serve/daemon.ts";
import { parseServeArgs, ServeUsageError } from "../serve/options.ts";
import { type CliIo, EXIT_ERROR, EXIT_OK, UsageError } from "./cli_io.ts";
import type { VerbHelp } from "./help.ts";

/** `vstor serve --help`. */
export const serveHelp: VerbHelp = {
  text:
    `usage: vstor serve [--blockdev SPEC]... --export SPEC... [--nbd-server SPEC] [--pidfile PATH]
       vstor serve IMAGE --vhost-user-blk SOCK [--vhost-user-scsi SOCK] [--writable] [-f FMT]
       vstor serve IMAGE --nbd unix:PATH|tcp:HOST:PORT [--export-name NAME] [--writable]

Exports images to running VMs (QEMU's vhost-user-blk-pci, vhost-user-scsi-pci) through the same
virtio-blk and virtio-scsi back-ends the simulated guest uses, and to NBD clients (qemu-img,
qemu-io, QEMU's nbd driver, nbdkit's and libnbd's tools, the kernel). Options as qemu-storage-daemon
takes them, in QEMU's key=value syntax (implied driver=/type=, dotted keys, ",," for a comma) or
as JSON objects:

  --blockdev driver=file,node-name=N,filename=PATH[,cache.direct=on|off][,cache.no-flush=on|off]
             [,aio=threads|io_uring|native][,read-only=on|off]
  --blockdev driver=qcow2|raw,node-name=N,file=FILE_NODE[,backing=null][,read-only=on|off]
                      a block node: a file, or a format over a file node (by name or nested)
  --export type=vhost-user-blk,id=ID,node-name=N,addr.type=unix,addr.path=SOCK
           [,writable=on|off][,num-queues=N][,logical-block-size=N]
  --export type=vhost-user-scsi,...
                      an export (read-only unless writable=on; for SCSI the node is LUN 0 of
                      target 0, and QEMU picks the request queues, up to 16)
  --export type=nbd,id=ID,node-name=N[,name=NAME][,description=TEXT][,writable=on|off]
           [,allocation-depth=on|off][,bitmaps.0=BITMAP]...
                      an NBD export named NAME (default: the node name) on the NBD server
  --nbd-server addr.type=inet,addr.host=HOST,addr.port=PORT[,max-connections=N][,tls-creds=T]
  --nbd-server addr.type=unix,addr.path=SOCK[,max-connections=N][,tls-creds=T]
                      the NBD server every NBD export is on (at most N clients at once,
                      default 100, 0 for no limit; 1 also withdraws multi-conn); with
                      tls-creds every client must STARTTLS
  --object tls-creds-x509,id=T,dir=DIR,endpoint=server[,verify-peer=on|off]
                      x509 credentials: DIR holds ca-cert.pem, server-cert.pem and
                      server-key.pem; verify-peer (default on) asks clients for a certificate
                      the CA signed
  --pidfile PATH      written once every export listens, removed at the end
  --daemonize         run in the background, detached (setsid); the command returns once every
                      export listens (exit 0), or with the daemon's error (exit 1)
The short form serves one image:
  IMAGE               the image (its format probed unless -f)
  --vhost-user-blk SOCK, --vhost-user-scsi SOCK
                      export it on this socket
  --nbd unix:PATH|tcp:HOST:PORT
                      export it over NBD, as qemu-nbd does (with qemu:allocation-depth)
  --export-name NAME  the NBD export's name (default: empty, as qemu-nbd)
  --writable          writable (default read-only)
  -f, --format FMT    raw or qcow2
  -h, --help          print this help

SIGTERM or SIGINT stop it: requests in flight finish, images are flushed and closed clean,
sockets and the pid file removed.

Example: vstor serve disk.qcow2 --vhost-user-blk /tmp/vhost.sock --writable
`,
  options: [
    "--blockdev",
    "--export",
    "--pidfile",
    "--daemonize",
    "--vhost-user-blk",
    "--vhost-user-scsi",
    "--nbd-server",
    "--object",
    "--nbd",
    "--export-name",
    "--writable",
    "-f",
    "-h",
  ],
};

/** Set in the daemon's environment by the parent of --daemonize. */
const DAEMON_ENV = "VSTOR_SERVE_DAEMONIZED";
/** What the daemon writes on stdout once every export listens (and the pid file is written). */
const READY_LINE = "vstor serve: ready\n";

/**
 * qemu-storage-daemon's --daemonize: the daemon runs in a new session (setsid), detached from the
 * terminal; the parent exits 0 once it says every export listens, or 1 with its error when it
 * could not start.
 */
async function daemonize(args: string[], io: CliIo): Promise<number> {
  // The repository's root, then its files by name (not module references: mod.ts imports this).
  const root = join(import.meta.dirname!, "..", "..");
  const mod = join(root, "mod.ts");
  const config = join(root, "deno.json");
  const child = new Deno.Command("setsid", {
    args: [
      Deno.execPath(),
      "run",
      "-A",
      "--config",
      config,
      mod,
      "serve",
      ...args.filter((a) => a !== "--daemonize"),
    ],
    env: { [DAEMON_ENV]: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const errors = new Response(child.stderr).text();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let seen = "";
  while (!seen.includes(READY_LINE)) {
    const { value, done } = await reader.read();
    if (done) break;
    seen += value;
  }
  if (seen.includes(READY_LINE)) {
    reader.releaseLock();
    child.unref();
    return EXIT_OK;
  }
  const status = await child.status;
  io.stderr(await errors);
  if (status.success) io.stderr("vstor serve: the daemon exited before it was ready\n");
  return EXIT_ERROR;
}

/**
 * Runs the daemon until SIGTERM/SIGINT.
 *
 * @returns 0 after a clean stop, 1 when an export could not start or close clean
 */
export async function serveMain(args: string[], io: CliIo): Promise<number> {
  if (args.includes("--help") || args.includes("-h")) {
    io.stdout(serveHelp.text);
    return EXIT_OK;
  }
  let config;
  try {
    config = parseServeArgs(args);
  } catch (e) {
    if (e instanceof ServeUsageError) throw new UsageError(e.message);
    throw e;
  }
  const inDaemon = Deno.env.get(DAEMON_ENV) === "1";
  if (config.daemonize && !inDaemon) return await daemonize(args, io);
  let quiet = false;
  const log = (line: string) => {
    if (!quiet) io.stderr(`vstor serve: ${line}\n`);
  };
  let daemon: Daemon;
  try {
    daemon = await Daemon.start(config, { log });
  } catch (e) {
    log(e instanceof Error ? e.message : String(e));
    return EXIT_ERROR;
  }
  if (inDaemon) {
    // The parent is waiting for this line; once it has exited nobody reads stdout or stderr.
    await Deno.stdout.write(new TextEncoder().encode(READY_LINE));
    quiet = true;
  }
  const stop = () => {
    log("stopping");
    daemon.stop();
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
  try {
    const errors = await daemon.closed;
    await daemon.stop();
    for (const e of errors) log(e);
    return errors.length === 0 ? EXIT_OK : EXIT_ERROR;
  } finally {
    Deno.removeSignalListener("SIGTERM", stop);
    Deno.removeSignalListener("SIGINT", stop);
  }
}
