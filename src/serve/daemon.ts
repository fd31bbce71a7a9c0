/**
 * `vstor serve`'s process: one Worker per export (see `export_worker.ts`), the pid
 * file once every export listens, and a clean end on SIGTERM/SIGINT (or {@linkcode Daemon.stop}):
 * each export stops taking requests, lets the ones in flight finish, flushes and closes its image
 * and removes its socket.
 *
 * @module
 */
import { eventfdWrite } from "../sys/eventfd.ts";
import { resolveNode } from "./blockdev.ts";
import type { ServeConfig } from "./options.ts";
import type { ExportReply, ExportRequest } from "./export_worker.ts";
import type { NbdReply, NbdRequest } from "./nbd_worker.ts";

const EXPORT_WORKER = new URL("./export_worker.ts", import.meta.url);
const NBD_WORKER = new URL("./nbd_worker.ts", import.meta.url);
/** How long an export may take to open its image and listen. */
const START_TIMEOUT_MS = 30_000;
/** How long an export may take to finish its requests and close its image at shutdown. */
const STOP_TIMEOUT_MS = 30_000;

/** What the daemon tells its user. */
export interface DaemonIo {
  log(line: string): void;
}

interface Running {
  readonly id: string;
  readonly worker: Worker;
  /** Asks the Worker to stop (it answers `closed`). */
  signalStop(): void;
  closed: Promise<string | undefined>;
}

/** The running daemon. */
export class Daemon {
  readonly #exports: Running[];
  readonly #pidfile: string | undefined;
  #stopping: Promise<string[]> | null = null;

  private constructor(exports: Running[], pidfile: string | undefined) {
    this.#exports = exports;
    this.#pidfile = pidfile;
  }

  /**
   * Starts every export and writes the pid file.
   *
   * @throws {Error} naming the export that could not start (the others are stopped first)
   */
  static async start(config: ServeConfig, io: DaemonIo): Promise<Daemon> {
    const started: Running[] = [];
    try {
      for (const spec of config.exports) {
        const open = resolveNode(config.blockdevs, spec.nodeName, spec.writable);
        const stop = new SharedArrayBuffer(4);
        started.push(await startExport({ kind: "init", spec, open, stop }, io));
        io.log(`export ${spec.id}: ${spec.type} on ${spec.socket}`);
      }
      if (config.nbdServer !== undefined && config.nbdExports.length > 0) {
        const exports = config.nbdExports.map((spec) => ({
          spec,
          open: resolveNode(config.blockdevs, spec.nodeName, spec.writable),
        }));
        const nbd = await startNbd({ kind: "init", server: config.nbdServer, exports }, io);
        started.push(nbd.running);
        io.log(`NBD server on ${nbd.address}`);
        for (const e of config.nbdExports) {
          io.log(`export ${e.id}: nbd export '${e.name}'${e.writable ? " (writable)" : ""}`);
        }
      }
    } catch (e) {
      await new Daemon(started, undefined).stop();
      throw e;
    }
    const daemon = new Daemon(started, config.pidfile);
    if (config.pidfile !== undefined) {
      try {
        Deno.writeTextFileSync(config.pidfile, `${Deno.pid}\n`);
      } catch (e) {
        await daemon.stop();
        throw new Error(
          `Cannot write pid file ${config.pidfile}: ${e instanceof Error ? e.message : e}`,
        );
      }
    }
    return daemon;
  }

  /** Resolves when every export has closed (after {@linkcode stop}). */
  get closed(): Promise<string[]> {
    return Promise.all(this.#exports.map((e) => e.closed)).then((errors) =>
      errors.filter((e): e is string => e !== undefined)
    );
  }

  /** Stops every export; resolves with the errors of those that did not close clean. */
  stop(): Promise<string[]> {
    if (this.#stopping !== null) return this.#stopping;
    this.#stopping = (async () => {
      for (const e of this.#exports) e.signalStop();
      const errors: string[] = [];
      for (const e of this.#exports) {
        const timeout = new Promise<string>((resolve) =>
          setTimeout(() => resolve(`export ${e.id} did not stop in time`), STOP_TIMEOUT_MS)
        );
        const error = await Promise.race([e.closed, timeout]);
        if (error !== undefined) errors.push(error);
        e.worker.terminate();
      }
      if (this.#pidfile !== undefined) {
        try {
          Deno.removeSync(this.#pidfile);
        } catch {
          // Gone already.
        }
      }
      return errors;
    })();
    return this.#stopping;
  }
}

/** What a serve Worker tells the VMM thread (the export and NBD Workers share these). */
type WorkerReply =
  | { readonly kind: "failed"; readonly message: string }
  | { readonly kind: "log"; readonly line: string }
  | { readonly kind: "closed"; readonly error?: string };

/**
 * Starts a serve Worker: `init` goes to it; it answers `ready` (resolving with what `ready`
 * returns for it) or `failed`, logs, and `closed` when it ends.
 */
function startWorker<R extends { readonly kind: string }, T>(
  url: URL,
  name: string,
  init: unknown,
  io: DaemonIo,
  ready: (msg: R, worker: Worker, closed: Promise<string | undefined>) => T,
): Promise<T> {
  const worker = new Worker(url, { type: "module", name });
  let closedResolve!: (error: string | undefined) => void;
  const closed = new Promise<string | undefined>((resolve) => closedResolve = resolve);
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => {
      worker.terminate();
      reject(new Error(`${name} did not start in ${START_TIMEOUT_MS / 1000} s`));
    }, START_TIMEOUT_MS);
    worker.onmessage = (event: MessageEvent<R | WorkerReply>) => {
      const msg = event.data;
      switch (msg.kind) {
        case "ready":
          clearTimeout(timer);
          resolve(ready(msg as R, worker, closed));
          break;
        case "failed":
          clearTimeout(timer);
          worker.terminate();
          closedResolve((msg as WorkerReply & { kind: "failed" }).message);
          reject(new Error((msg as WorkerReply & { kind: "failed" }).message));
          break;
        case "log":
          io.log((msg as WorkerReply & { kind: "log" }).line);
          break;
        case "closed":
          closedResolve((msg as WorkerReply & { kind: "closed" }).error);
          break;
      }
    };
    worker.onerror = (event) => {
      event.preventDefault();
      clearTimeout(timer);
      const message = `${name}: ${event.message}`;
      closedResolve(message);
      reject(new Error(message));
    };
    worker.postMessage(init);
  });
}

function startExport(init: ExportRequest, io: DaemonIo): Promise<Running> {
  const stop = new Int32Array(init.stop);
  return startWorker<ExportReply, Running>(
    EXPORT_WORKER,
    `export ${init.spec.id}`,
    init,
    io,
    (msg, worker, closed) => {
      const controlFd = msg.kind === "ready" ? msg.controlFd : -1;
      return {
        id: init.spec.id,
        worker,
        signalStop: () => {
          Atomics.store(stop, 0, 1);
          // The Worker may be asleep in epoll_wait: its control eventfd wakes it (unless the
          // export ended on its own and closed it).
          if (controlFd < 0) return;
          try {
            eventfdWrite(controlFd, 1);
          } catch {
            // Closed already: the export is over.
          }
        },
        closed,
      };
    },
  );
}

function startNbd(
  init: Extract<NbdRequest, { kind: "init" }>,
  io: DaemonIo,
): Promise<{ running: Running; address: string }> {
  return startWorker<NbdReply, { running: Running; address: string }>(
    NBD_WORKER,
    "nbd server",
    init,
    io,
    (msg, worker, closed) => ({
      running: {
        id: "nbd server",
        worker,
        signalStop: () => worker.postMessage({ kind: "stop" } satisfies NbdRequest),
        closed,
      },
      address: msg.kind === "ready" ? msg.address : "",
    }),
  );
}
