import assert from "node:assert/strict";
import { Doorbells } from "../../src/virtio/doorbell.ts";
import {
  featureBit,
  PCI_CAP_ID_MSIX,
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_F_VERSION_1,
} from "../../src/virtio/features.ts";
import { VcpuInterrupts } from "../../src/virtio/interrupts.ts";
import {
  PCI_CAPABILITY_LIST,
  PCI_MSIX_FLAGS,
  PCI_MSIX_FLAGS_ENABLE,
  VIRTIO_PCI_COMMON_STATUS,
  VIRTIO_PCI_MSIX_BAR,
  VirtioPciFunction,
} from "../../src/virtio/pci.ts";
import { commonWrite, FakeModel, negotiate, programBars, setupQueue } from "./fake_model.ts";
import type { WorkerReply, WorkerRequest } from "./virtio_worker.ts";

Deno.test("Doorbells.ring bumps the queue word and the summary, and counts a kick", () => {
  const doorbells = new Doorbells(3, "ioeventfd");
  const summary = doorbells.summary;
  doorbells.ring(2);
  doorbells.ring(2);
  doorbells.ring(0);
  assert.equal(doorbells.value(2), 2);
  assert.equal(doorbells.kicks(0), 1);
  assert.equal(doorbells.exits(2), 0, "ioeventfd kicks do not exit");
  assert.equal(doorbells.summary, summary + 3);
  assert.deepEqual(doorbells.stats, { kicks: [1, 0, 2], exits: [0, 0, 0] });
});

Deno.test("Doorbells.trap counts an exit as well as the kick", () => {
  const doorbells = new Doorbells(2, "trap");
  doorbells.trap(1);
  assert.deepEqual(doorbells.stats, { kicks: [0, 1], exits: [0, 1] });
  assert.equal(doorbells.mode, "trap");
});

Deno.test("Doorbells.attach shares counters and mode with the creating view", () => {
  const vmm = new Doorbells(2, "trap");
  const iothread = Doorbells.attach(vmm.buffer);
  assert.equal(iothread.numQueues, 2);
  assert.equal(iothread.mode, "trap");
  vmm.trap(0);
  assert.equal(iothread.value(0), 1);
  assert.equal(iothread.exits(0), 1);
  assert.throws(() => new Doorbells(3, "trap", vmm.buffer), RangeError);
  assert.throws(() => new Doorbells(2, "ioeventfd", vmm.buffer), RangeError);
});

Deno.test("Doorbells.wait returns at once when the word moved and times out when it did not", () => {
  const doorbells = new Doorbells(1, "ioeventfd");
  const seen = doorbells.value(0);
  const started = performance.now();
  assert.equal(doorbells.wait(0, seen, 20), seen, "timed out");
  assert.ok(performance.now() - started >= 15, "slept until the timeout");
  doorbells.ring(0);
  assert.equal(doorbells.wait(0, seen, 10_000), seen + 1, "no sleep when already moved");
  const summary = doorbells.summary;
  doorbells.wake();
  assert.equal(doorbells.waitAny(summary, 10_000), summary + 1, "wake moves the summary");
  assert.equal(doorbells.wakes, 1);
  assert.equal(doorbells.value(0), seen + 1, "wake is not a kick");
});

Deno.test("Doorbells counters compare across 2^32 wrap-around", () => {
  const doorbells = new Doorbells(1, "ioeventfd");
  new Int32Array(doorbells.buffer)[4] = -1; // queue 0's word at 0xffffffff
  assert.equal(doorbells.value(0), 0xffffffff);
  assert.equal(doorbells.wait(0, 0xffffffff, 0), 0xffffffff);
  doorbells.ring(0);
  assert.equal(doorbells.wait(0, 0xffffffff, 0), 0);
});

Deno.test("Doorbells rejects a queue that does not exist", () => {
  const doorbells = new Doorbells(2, "ioeventfd");
  assert.throws(() => doorbells.ring(2), RangeError);
  assert.throws(() => doorbells.trap(-1), RangeError);
  assert.throws(() => doorbells.value(0.5), RangeError);
  assert.throws(() => new Doorbells(1025, "trap"), RangeError);
});

/** Receives the worker's next message, or rejects after `ms`. */
function nextReply(worker: Worker, ms: number): Promise<WorkerReply> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`No reply from the worker in ${ms} ms`)), ms);
    worker.onmessage = (event: MessageEvent<WorkerReply>) => {
      clearTimeout(timer);
      resolve(event.data);
    };
    worker.onerror = (event) => {
      clearTimeout(timer);
      event.preventDefault();
      reject(new Error(`Worker failed: ${event.message}`));
    };
  });
}

Deno.test("10000 trapped kicks round-trip through an iothread Worker as MSI-X interrupts without loss", async () => {
  const ROUNDS = 10_000;
  const model = new FakeModel({ numQueues: 1 });
  const vcpu = new VcpuInterrupts();
  const fn = new VirtioPciFunction({ model, vcpu, doorbellMode: "trap" });
  programBars(fn);
  fn.mmioWrite(VIRTIO_PCI_MSIX_BAR, 8, 4, 0x41); // entry 0: vector 0x41
  fn.mmioWrite(VIRTIO_PCI_MSIX_BAR, 12, 4, 0); // unmasked
  const msix = fn.configRead(PCI_CAPABILITY_LIST, 1);
  assert.equal(fn.configRead(msix, 1), PCI_CAP_ID_MSIX);
  fn.configWrite(msix + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE);
  negotiate(fn, featureBit(VIRTIO_F_VERSION_1));
  setupQueue(fn, 0, { size: 16, desc: 0x1000, driver: 0x2000, device: 0x3000, vector: 0 });
  commonWrite(
    fn,
    VIRTIO_PCI_COMMON_STATUS,
    1,
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK |
      VIRTIO_CONFIG_S_DRIVER_OK,
  );
  const doorbell = fn.findBar(fn.notifyAddress(0)!)!;

  const worker = new Worker(new URL("./virtio_worker.ts", import.meta.url), { type: "module" });
  try {
    const ready = nextReply(worker, 10_000);
    worker.postMessage(
      {
        kind: "echo",
        vcpu: vcpu.buffer,
        irq: fn.interrupts.buffer,
        doorbells: fn.doorbells.buffer,
        rounds: ROUNDS,
      } satisfies WorkerRequest,
    );
    assert.deepEqual(await ready, { kind: "ready" });
    const finished = nextReply(worker, 20_000);
    finished.catch(() => {}); // awaited below; a failed loop must not leave it unhandled

    let received = 0;
    for (let i = 0; i < ROUNDS; i++) {
      // The vCPU writes the doorbell; the write exits to the VMM, which decodes and forwards it.
      fn.mmioWrite(doorbell.bar, doorbell.offset, 2, 0);
      if (!vcpu.waitForInterrupt(5000)) break;
      assert.equal(vcpu.takeNext(), 0x41);
      received++;
    }
    assert.equal(received, ROUNDS, `interrupt ${received + 1} never came`);
    assert.deepEqual(await finished, { kind: "done", answered: ROUNDS });
    assert.equal(vcpu.pending, false, "no extra interrupt");
    assert.deepEqual(fn.doorbells.stats, { kicks: [ROUNDS], exits: [ROUNDS] });
    assert.deepEqual(fn.interrupts.stats, {
      delivered: ROUNDS,
      suppressed: 0,
      intx: 0,
      dropped: 0,
    });
    assert.equal(vcpu.delivered, ROUNDS);
  } finally {
    worker.terminate();
  }
});
