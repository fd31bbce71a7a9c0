/**
 * `vstor serve`: exports images to real VMs over vhost-user-blk and vhost-user-scsi, with
 * qemu-storage-daemon's command line (see `src/serve/options.ts`) and a short form.
 *
 * @module
 */
import { Daemon } from "../serve/daemon.ts";
import { parseServeArgs, ServeUsageError } from "../serve/options.ts";
import { type CliIo, EXIT_ERROR, EXIT_OK, UsageError } from "./cli_io.ts";
import type { VerbHelp } from "./help.ts";

/** `vstor serve --help`. */
export const serveHelp: VerbHelp = {
  text: `usage: vstor serve [--blockdev SPEC]... --export SPEC... [--pidfile PATH]
       vstor serve IMAGE --vhost-user-blk SOCK [--vhost-user-scsi SOCK] [--writable] [-f FMT]

Exports images to running VMs (QEMU's vhost-user-blk-pci, vhost-user-scsi-pci) through the same
virtio-blk and virtio-scsi back-ends the simulated guest uses. Options as qemu-storage-daemon
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
  --pidfile PATH      written once every export listens, removed at the end
  --daemonize         not supported yet (run vstor serve under a service manager)
The short form serves one image:
  IMAGE               the image (its format probed unless -f)
  --vhost-user-blk SOCK, --vhost-user-scsi SOCK
                      export it on this socket
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
    "--writable",
    "-f",
    "-h",
  ],
};

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
  if (config.daemonize) {
    throw new UsageError("--daemonize is not supported yet: run it under your service manager");
  }
  const log = (line: string) => io.stderr(`vstor serve: ${line}\n`);
  let daemon: Daemon;
  try {
    daemon = await Daemon.start(config, { log });
  } catch (e) {
    log(e instanceof Error ? e.message : String(e));
    return EXIT_ERROR;
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
