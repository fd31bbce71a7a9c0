/** Runs one request of tests/sys/sys_worker.ts on a fresh Worker. */
import type { SysWorkerRequest } from "./sys_worker.ts";

/** Starts a Worker, sends it `request`, and resolves with its one answer (then ends it). */
export function onWorker<T>(request: SysWorkerRequest): Promise<T> {
  const worker = new Worker(new URL("./sys_worker.ts", import.meta.url), { type: "module" });
  return new Promise<T>((resolve, reject) => {
    worker.onmessage = (e: MessageEvent<T>) => {
      worker.terminate();
      resolve(e.data);
    };
    worker.onerror = (e) => {
      e.preventDefault();
      worker.terminate();
      reject(new Error(e.message));
    };
    worker.postMessage(request);
  });
}
