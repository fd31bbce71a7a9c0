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

const EXPORT_WORKER = new URL("./export_worker.ts", import.meta.url);
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
  /** The export's stop word (see ExportRequest). */
  readonly stop: Int32Array;
  controlFd: number;
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
      for (const e of this.#exports) {
        Atomics.store(e.stop, 0, 1);
        // The Worker may be asleep in epoll_wait: its control eventfd wakes it (unless the export
        // ended on its own and closed it).
        if (e.controlFd >= 0) {
          try {
            eventfdWrite(e.controlFd, 1);
          } catch {
            // Closed already: the export is over.
          }
        }
      }
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

function startExport(init: ExportRequest, io: DaemonIo): Promise<Running> {
  const worker = new Worker(EXPORT_WORKER, { type: "module", name: `export ${init.spec.id}` });
  let closedResolve!: (error: string | undefined) => void;
  const closed = new Promise<string | undefined>((resolve) => closedResolve = resolve);
  return new Promise<Running>((resolve, reject) => {
    const timer = setTimeout(() => {
      worker.terminate();
      reject(new Error(`export ${init.spec.id} did not start in ${START_TIMEOUT_MS / 1000} s`));
    }, START_TIMEOUT_MS);
    const running: Running = {
      id: init.spec.id,
      worker,
      stop: new Int32Array(init.stop),
      controlFd: -1,
      closed,
    };
    worker.onmessage = (event: MessageEvent<ExportReply>) => {
      const msg = event.data;
      switch (msg.kind) {
        case "ready":
          clearTimeout(timer);
          running.controlFd = msg.controlFd;
          resolve(running);
          break;
        case "failed":
          clearTimeout(timer);
          worker.terminate();
          closedResolve(msg.message);
          reject(new Error(msg.message));
          break;
        case "log":
          io.log(msg.line);
          break;
        case "closed":
          closedResolve(msg.error);
          break;
      }
    };
    worker.onerror = (event) => {
      event.preventDefault();
      clearTimeout(timer);
      const message = `export ${init.spec.id}: ${event.message}`;
      closedResolve(message);
      reject(new Error(message));
    };
    worker.postMessage(init);
  });
}
