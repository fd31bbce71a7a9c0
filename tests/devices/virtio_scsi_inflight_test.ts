/**
 * virtio-scsi with commands in flight (issue #16): every READ/WRITE a drain pops reaches the
 * unit's node at once, each with its own scratch, and completes on its own with its own status
 * and data; a TMF waits for the commands in flight.
 */
import assert from "node:assert/strict";
import type { BlockNode } from "../../src/block/node.ts";
import { GOOD } from "../../src/scsi/constants.ts";
import { VIRTIO_SCSI_VQ_REQUEST } from "../../src/virtio/virtio_scsi_constants.ts";
import { read10, write10 } from "../scsi/scsi_helpers.ts";
import { lunBytes, memoryNode, ScsiHarness } from "./scsi_harness.ts";

/** A node whose reads and writes wait for `open()`, counting how many wait at once. */
function gated(inner: BlockNode) {
  const gate = Promise.withResolvers<void>();
  const state = { inFlight: 0, max: 0 };
  const hold = async <T>(run: () => Promise<T>): Promise<T> => {
    state.inFlight++;
    state.max = Math.max(state.max, state.inFlight);
    await gate.promise;
    state.inFlight--;
    return await run();
  };
  const node: BlockNode = {
    format: inner.format,
    filename: inner.filename,
    get size() {
      return inner.size;
    },
    readOnly: false,
    requestAlignment: 1,
    read: (o, d) => hold(() => inner.read(o, d)),
    write: (o, s, opts) => hold(() => inner.write(o, s, opts)),
    writeZeroes: (o, l, opts) => inner.writeZeroes(o, l, opts),
    discard: (o, l) => inner.discard(o, l),
    flush: () => inner.flush(),
    blockStatus: (o, m) => inner.blockStatus(o, m),
    close: () => inner.close(),
  };
  return { node, state, open: () => gate.resolve() };
}

/** A command request (header, 32-byte CDB) for LUN 0:0 with tag `tag`. */
function request(cdb: ArrayLike<number>, tag: number): Uint8Array {
  const req = new Uint8Array(19 + 32);
  req.set(lunBytes(0, 0));
  new DataView(req.buffer).setBigUint64(8, BigInt(tag), true);
  req.set(cdb, 19);
  return req;
}

Deno.test("virtio-scsi: every command a drain pops is at the node at once, and each completes with its own data", async () => {
  const h = new ScsiHarness();
  const inner = await memoryNode(1 << 20);
  const fill = new Uint8Array(1 << 20).map((_, i) => (i * 11 + 5) & 0xff);
  await inner.write(0, fill);
  const g = gated(inner);
  await h.plug(0, 0, g.node);
  const driver = h.drivers[VIRTIO_SCSI_VQ_REQUEST]!;
  const reads: Array<{ token: number; lba: number; data: number }> = [];
  const writes: Array<{ token: number; lba: number }> = [];
  for (let i = 0; i < 12; i++) {
    const token = 100 + i;
    const resp = h.space(108);
    if (i % 3 === 2) {
      const lba = 1000 + i * 8;
      const payload = new Uint8Array(4096).fill(i);
      assert.ok(
        driver.add([h.buffer(request(write10(lba, 8), token)), h.buffer(payload)], [resp], token),
      );
      writes.push({ token, lba });
    } else {
      const lba = i * 16;
      const data = h.space(4096);
      assert.ok(driver.add([h.buffer(request(read10(lba, 8), token))], [resp, data], token));
      reads.push({ token, lba, data: data.addr });
    }
  }
  driver.kick();
  // The drain returns with the commands still at the node.
  await h.backend.processQueue(
    VIRTIO_SCSI_VQ_REQUEST,
    () => h.interrupts[VIRTIO_SCSI_VQ_REQUEST]!++,
  );
  assert.equal(g.state.max, 12, "all twelve at the node at once");
  assert.equal(h.backend.inflight, 12);
  assert.equal(driver.getUsed(), null, "nothing completes before the node does");
  g.open();
  await h.backend.drained();
  const done = new Map<number, number>();
  for (let u = driver.getUsed(); u !== null; u = driver.getUsed()) done.set(u.token, u.written);
  assert.equal(done.size, 12);
  for (const r of reads) {
    assert.equal(done.get(r.token), 108 + 4096);
    assert.deepEqual(h.mem.slice(r.data, 4096), fill.subarray(r.lba * 512, r.lba * 512 + 4096));
  }
  for (const w of writes) {
    assert.equal(done.get(w.token), 108);
    const back = new Uint8Array(4096);
    await inner.read(w.lba * 512, back);
    assert.deepEqual(back, new Uint8Array(4096).fill(w.token - 100));
  }
  // Every response says GOOD: status byte of each response header.
  const status = await h.command(0, 0, read10(0, 1), { dataIn: 512 });
  assert.equal(status.status, GOOD);
  assert.ok(h.interrupts[VIRTIO_SCSI_VQ_REQUEST]! >= 1);
});
