/**
 * A Worker for the tests of src/sys/: it loads libc through src/sys/ itself and acts on
 * descriptors and SharedArrayBuffers the test thread hands it, answering with one message.
 */
import { eventfdWrite } from "../../src/sys/eventfd.ts";

/** What the test thread asks. */
export type SysWorkerRequest =
  | { op: "eventfd-write"; fd: number; value: number; delayMs: number }
  | { op: "sab"; buffer: SharedArrayBuffer; read: number[]; write: [number, number][] };

const self = globalThis as unknown as {
  onmessage: ((e: MessageEvent<SysWorkerRequest>) => void) | null;
  postMessage(message: unknown): void;
};

self.onmessage = (e) => {
  const request = e.data;
  if (request.op === "eventfd-write") {
    setTimeout(() => {
      eventfdWrite(request.fd, request.value);
      self.postMessage("written");
    }, request.delayMs);
  } else {
    const bytes = new Uint8Array(request.buffer, 0, request.buffer.byteLength);
    const seen = request.read.map((at) => Atomics.load(bytes, at));
    for (const [at, value] of request.write) Atomics.store(bytes, at, value);
    self.postMessage(seen);
  }
};
