/// <reference lib="deno.worker" />
/**
 * A stand-in iothread for the cross-Worker tests: it attaches to the shared doorbell, interrupt and
 * vCPU buffers exactly as a device Worker would.
 *
 * - `echo`: sleeps on the doorbells' summary word and answers every kick of queue 0 with a queue
 *   interrupt, `rounds` times.
 * - `raise`: `rounds` times, spins until `control[0]` (go) reaches the round number, raises MSI-X
 *   `vector` once, and publishes the round in `control[1]` (done): a race with the VMM's unmask.
 *
 * Every wait has a timeout, so a lost kick ends the worker with a message instead of a hang.
 *
 * @module
 */

import { Doorbells } from "../../src/virtio/doorbell.ts";
import { InterruptState, VcpuInterrupts } from "../../src/virtio/interrupts.ts";

/** What the tests send. */
export type WorkerRequest =
  | {
    kind: "echo";
    vcpu: SharedArrayBuffer;
    irq: SharedArrayBuffer;
    doorbells: SharedArrayBuffer;
    rounds: number;
  }
  | {
    kind: "raise";
    vcpu: SharedArrayBuffer;
    irq: SharedArrayBuffer;
    control: SharedArrayBuffer;
    vector: number;
    rounds: number;
  };

/** What the worker answers. */
export type WorkerReply =
  | { kind: "ready" }
  | { kind: "done"; answered: number }
  | { kind: "timeout"; answered: number };

const WAIT_MS = 5000;

self.onmessage = (event: MessageEvent<WorkerRequest>) => {
  const request = event.data;
  const irq = InterruptState.attach(new VcpuInterrupts(request.vcpu), request.irq);
  if (request.kind === "raise") {
    const control = new Int32Array(request.control);
    for (let round = 1; round <= request.rounds; round++) {
      // Spin rather than sleep: waking from Atomics.wait is slower than the race being tested.
      const deadline = performance.now() + WAIT_MS;
      for (let spins = 1; Atomics.load(control, 0) < round; spins++) {
        if ((spins & 0xfff) === 0 && performance.now() > deadline) {
          self.postMessage({ kind: "timeout", answered: round - 1 } satisfies WorkerReply);
          return;
        }
      }
      irq.raise(request.vector);
      Atomics.store(control, 1, round);
      Atomics.notify(control, 1);
    }
    self.postMessage({ kind: "done", answered: request.rounds } satisfies WorkerReply);
    return;
  }
  const doorbells = Doorbells.attach(request.doorbells);
  // Read both counters before saying ready: a kick after this point is never missed.
  let summary = doorbells.summary;
  let seen = doorbells.value(0);
  self.postMessage({ kind: "ready" } satisfies WorkerReply);
  let answered = 0;
  while (answered < request.rounds) {
    const now = doorbells.waitAny(summary, WAIT_MS);
    if (now === summary) {
      self.postMessage({ kind: "timeout", answered } satisfies WorkerReply);
      return;
    }
    summary = now;
    const value = doorbells.value(0);
    const kicks = (value - seen) >>> 0;
    seen = value;
    for (let k = 0; k < kicks; k++) {
      irq.notifyQueue(0);
      answered++;
    }
  }
  self.postMessage({ kind: "done", answered } satisfies WorkerReply);
};
