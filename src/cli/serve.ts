/**
 * `vstor serve`: exports images to real VMs over vhost-user-blk and vhost-user-scsi, with
 * qemu-storage-daemon's command line (see `src/serve/options.ts`) and a short form.
 *
 * @module
 */
import { Daemon } from "../serve/daemon.ts";
import { parseServeArgs, ServeUsageError } from "../serve/options.ts";
import { type CliIo, EXIT_ERROR, EXIT_OK, UsageError } from "./cli_io.ts";

/** `vstor serve --help`. */
export const serveHelp = {
  summary: "serve images to VMs over vhost-user-blk/-scsi, as qemu-storage-daemon",
  text: `usage: vstor serve [--blockdev SPEC]... [--export SPEC]... [--pidfile PATH]
       vstor serve IMAGE --vhost-user-blk SOCK [--vhost-user-scsi SOCK] [--writable] [-f FMT]

Exports block nodes to a running VM (QEMU's vhost-user-blk-pci, vhost-user-scsi-pci) through the
same virtio-blk and virtio-scsi back-ends the simulated guest uses. Options as qemu-storage-daemon
takes them, in QEMU's key=value syntax or as JSON:

  --blockdev driver=file,node-name=N,filename=PATH[,cache.direct=on|off][,cache.no-flush=on|off]
             [,aio=threads|io_uring|native][,read-only=on|off]
  --blockdev driver=qcow2|raw,node-name=N,file=FILE_NODE[,backing=null][,read-only=on|off]
  --export type=vhost-user-blk,id=ID,node-name=N,addr.type=unix,addr.path=SOCK
           [,writable=on|off][,num-queues=N][,logical-block-size=N]
  --export type=vhost-user-scsi,...   (as vhost-user-blk; the node is LUN 0 of target 0)
  --pidfile PATH    written once every export listens, removed at the end

SIGTERM or SIGINT stop it: requests in flight finish, images are flushed and closed clean, sockets
removed. Exports are read-only unless writable=on (--writable in the short form).

Example:
  vstor serve --blockdev driver=file,node-name=f,filename=disk.qcow2 \\
    --blockdev driver=qcow2,node-name=d,file=f \\
    --export type=vhost-user-blk,id=e0,node-name=d,addr.type=unix,addr.path=/tmp/vhost.sock,writable=on
  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\
    -chardev socket,id=c0,path=/tmp/vhost.sock -device vhost-user-blk-pci,chardev=c0
`,
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
