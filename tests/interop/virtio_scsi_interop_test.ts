/**
 * virtio-scsi writes into images qemu-img made: the same guest I/O through two LUNs, one over a
 * qcow2 and one over a raw image created by `qemu-img create`, must leave images that
 * `qemu-img check` accepts and `qemu-img compare` finds identical, holding what the guest wrote.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { openImage } from "../../formats/open.ts";
import { ScsiHarness } from "../devices/scsi_harness.ts";
import {
  read16,
  sync10,
  unmapCdb,
  unmapParams,
  write10,
  write16,
  writeSame10,
  writeSame16,
} from "../scsi/scsi_helpers.ts";
import { ignoreWithout, runTool } from "./qemu.ts";

const SIZE = 16 << 20;
const BLOCKS = SIZE / 512;
/** qcow2's default cluster, in blocks: UNMAP ranges are whole clusters so both formats zero them. */
const CLUSTER_BLOCKS = 128;

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 0x1_0000_0000;
  };
}

Deno.test({
  name: "virtio-scsi writes to a qcow2 and a raw image that qemu-img checks and compares equal",
  ignore: ignoreWithout("qemu-img"),
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_scsi_interop_" });
    try {
      const qcow2 = join(dir, "disk.qcow2");
      const raw = join(dir, "disk.raw");
      for (const [fmt, path] of [["qcow2", qcow2], ["raw", raw]] as const) {
        const made = await runTool("qemu-img", ["create", "-q", "-f", fmt, path, String(SIZE)]);
        assert.equal(made.code, 0, made.stderr);
      }
      const h = new ScsiHarness({ dataBytes: 8 << 20 });
      await h.plug(0, 0, await openImage(qcow2, { format: "qcow2" }));
      await h.plug(1, 0, await openImage(raw, { format: "raw" }));
      const expected = new Uint8Array(SIZE);
      const random = rng(2024);
      const both = async (cdb: number[], opts: { dataOut?: Uint8Array; segments?: number }) => {
        for (const target of [0, 1]) {
          const r = await h.command(target, 0, cdb, opts);
          assert.equal(r.response, 0);
          assert.equal(r.status, 0, `target ${target} cdb ${cdb[0]}: sense ${[...r.sense]}`);
        }
      };

      for (let i = 0; i < 60; i++) {
        const kind = i % 6;
        const blocks = 1 + Math.floor(random() * 64);
        const lba = Math.floor(random() * (BLOCKS - blocks));
        if (kind <= 2) {
          const data = new Uint8Array(blocks * 512);
          for (let j = 0; j < data.length; j++) data[j] = (j * 31 + i * 17 + 1) & 0xff;
          const cdb = kind === 0 ? write10(lba, blocks) : write16(lba, blocks, kind === 2 ? 8 : 0);
          await both(cdb, { dataOut: data, segments: 1 + (i % 4) });
          expected.set(data, lba * 512);
        } else if (kind === 3) {
          const block = new Uint8Array(512).fill(0x40 + i);
          await both(writeSame10(lba, blocks), { dataOut: block });
          for (let b = 0; b < blocks; b++) expected.set(block, (lba + b) * 512);
        } else if (kind === 4) {
          await both(writeSame16(lba, blocks, 0x08), { dataOut: new Uint8Array(512) });
          expected.fill(0, lba * 512, (lba + blocks) * 512);
        } else {
          const cluster = Math.floor(random() * (BLOCKS / CLUSTER_BLOCKS - 2));
          const count = 1 + Math.floor(random() * 2);
          const params = unmapParams([[cluster * CLUSTER_BLOCKS, count * CLUSTER_BLOCKS]]);
          await both(unmapCdb(params.length), { dataOut: params });
          expected.fill(
            0,
            cluster * CLUSTER_BLOCKS * 512,
            (cluster + count) * CLUSTER_BLOCKS * 512,
          );
        }
      }
      await both(sync10(), {});

      // Read back through the device, a megabyte at a time.
      for (const target of [0, 1]) {
        for (let lba = 0; lba < BLOCKS; lba += 2048) {
          const r = await h.command(target, 0, read16(lba, 2048), { dataIn: 2048 * 512 });
          assert.equal(r.status, 0);
          assert.deepEqual(
            r.data,
            expected.subarray(lba * 512, (lba + 2048) * 512),
            `${target}@${lba}`,
          );
        }
      }
      await h.backend.close();

      const check = await runTool("qemu-img", ["check", "-f", "qcow2", qcow2]);
      assert.equal(check.code, 0, check.stdout + check.stderr);
      const compare = await runTool("qemu-img", [
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        qcow2,
        raw,
      ]);
      assert.equal(compare.code, 0, compare.stdout + compare.stderr);
      assert.deepEqual(await Deno.readFile(raw), expected);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
