/**
 * virtio-blk's `werror`/`rerror` policies on one thread: a node that fails with EIO or ENOSPC at
 * an offset, and what the guest sees under `report`, `ignore`, `stop` and `enospc`.
 */
import assert from "node:assert/strict";
import { BlockError } from "../../src/errors.ts";
import type { BackendHooks } from "../../src/devices/backend.ts";
import { errorDecision, isNoSpace } from "../../src/devices/error_policy.ts";
import type { VirtioBlkOptions } from "../../src/devices/virtio_blk.ts";
import {
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from "../../src/virtio/virtio_blk_constants.ts";
import { BlkRig, CountingNode, memoryDisk, patternBytes } from "./blk_harness.ts";

const EIO = 5;
const ENOSPC = 28;

function hostError(errno: number): () => Error {
  const text = errno === ENOSPC ? "No space left on device" : "Input/output error";
  return () => new BlockError("io", `write failed: ${text}`, { path: "disk", errno });
}

/** A rig whose node fails accesses covering byte 4096·3 with `errno`. */
async function failingRig(options: VirtioBlkOptions, errno = EIO) {
  const { node: inner } = await memoryDisk(1 << 20, { fill: (i) => (i * 7 + 3) & 0xff });
  const node = new CountingNode(inner);
  node.failAt = 4096 * 3;
  node.failWith = hostError(errno);
  const rig = await BlkRig.create({ node, options: { requestMerging: false, ...options } });
  const stops: string[] = [];
  const hooks: BackendHooks = {
    interrupt: () => {},
    needsReset: (e) => {
      throw e;
    },
    stop: (reason) => stops.push(reason),
  };
  rig.backend.hooks = hooks;
  return { rig, node, stops };
}

Deno.test("errorDecision follows QEMU: enospc stops on ENOSPC only, the others as named", () => {
  const eio = hostError(EIO)(), enospc = hostError(ENOSPC)();
  assert.equal(isNoSpace(enospc), true);
  assert.equal(isNoSpace(new Error("x", { cause: enospc })), true);
  assert.equal(isNoSpace(eio), false);
  assert.equal(errorDecision("enospc", enospc), "stop");
  assert.equal(errorDecision("enospc", eio), "report");
  assert.equal(errorDecision("stop", eio), "stop");
  assert.equal(errorDecision("ignore", eio), "ignore");
  assert.equal(errorDecision("report", enospc), "report");
});

Deno.test("rerror=report gives a failed read IOERR; rerror=ignore completes it OK", async () => {
  const reads = [
    { type: VIRTIO_BLK_T_IN, sector: 0, readBytes: 4096 },
    { type: VIRTIO_BLK_T_IN, sector: 24, readBytes: 4096 },
    { type: VIRTIO_BLK_T_IN, sector: 64, readBytes: 4096 },
  ];
  const report = await failingRig({ rerror: "report" });
  const r = await report.rig.batch(reads);
  assert.deepEqual(r.map((c) => c.status), [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]);
  assert.equal(report.rig.backend.stats.ioErrors, 1);
  const ignore = await failingRig({ rerror: "ignore" });
  const i = await ignore.rig.batch(reads);
  assert.deepEqual(i.map((c) => c.status), [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK]);
  assert.equal(ignore.rig.backend.stats.ioErrors, 0);
  assert.equal(ignore.rig.backend.stats.ignoredErrors, 1);
  // werror does not apply to reads.
  const werror = await failingRig({ werror: "ignore", rerror: "report" });
  assert.equal((await werror.rig.one(reads[1]!)).status, VIRTIO_BLK_S_IOERR);
  for (const x of [report, ignore, werror]) assert.deepEqual(x.stops, []);
});

Deno.test("werror=ignore completes a failed write OK; werror=report gives IOERR", async () => {
  const data = patternBytes(4096, 1);
  const ignore = await failingRig({ werror: "ignore" });
  assert.equal(await ignore.rig.write(24, data), VIRTIO_BLK_S_OK);
  const report = await failingRig({ werror: "report" });
  assert.equal(await report.rig.write(24, data), VIRTIO_BLK_S_IOERR);
  // The default (enospc) reports an EIO.
  const byDefault = await failingRig({});
  assert.equal(await byDefault.rig.write(24, data), VIRTIO_BLK_S_IOERR);
  assert.equal(byDefault.rig.backend.stopReason, null);
});

for (const [werror, errno] of [["stop", EIO], ["enospc", ENOSPC]] as const) {
  Deno.test(
    `werror=${werror} on ${
      errno === EIO ? "EIO" : "ENOSPC"
    } holds the write, stops the device and says why, until reset`,
    async () => {
      const { rig, node, stops } = await failingRig({ werror, driveName: "d0" }, errno);
      const data = patternBytes(4096, 2);
      const subs = [0, 24, 64, 128].map((sector) =>
        rig.submit({ type: VIRTIO_BLK_T_OUT, sector, data })
      );
      rig.kick();
      await rig.process();
      // The failed write is held; the others, in flight together with it, still complete.
      const done = rig.reap();
      assert.deepEqual(done.map((c) => [c.seq, c.status]).sort((a, b) => a[0]! - b[0]!), [
        [subs[0]!.seq, VIRTIO_BLK_S_OK],
        [subs[2]!.seq, VIRTIO_BLK_S_OK],
        [subs[3]!.seq, VIRTIO_BLK_S_OK],
      ]);
      assert.equal(rig.backend.held, 1);
      assert.equal(rig.backend.stats.heldRequests, 1);
      const detail = errno === ENOSPC
        ? "No space left on device"
        : "write failed: Input/output error";
      assert.equal(rig.backend.stopReason, `io error on drive d0 (write): ${detail}`);
      assert.deepEqual(stops, [rig.backend.stopReason]);
      // A stopped device takes no request, even after a kick.
      const writes = node.writes;
      rig.submit({ type: VIRTIO_BLK_T_FLUSH });
      rig.kick();
      await rig.process();
      assert.deepEqual(rig.reap(), []);
      assert.equal(node.writes, writes);
      assert.equal(node.flushes, 0);
      rig.backend.reset();
      assert.equal(rig.backend.stopReason, null);
      assert.equal(rig.backend.held, 0);
    },
  );
}

Deno.test("werror=enospc reports an EIO write and keeps going", async () => {
  const { rig, stops } = await failingRig({ werror: "enospc" }, EIO);
  assert.equal(await rig.write(24, patternBytes(4096, 3)), VIRTIO_BLK_S_IOERR);
  assert.equal(await rig.write(0, patternBytes(4096, 3)), VIRTIO_BLK_S_OK);
  assert.deepEqual(stops, []);
});
