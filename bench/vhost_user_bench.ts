/**
 * vhost-user without a guest: the TypeScript front-end of the tests (tests/serve/frontend.ts)
 * drives `vstor serve`'s vhost-user-blk export at queue depth 32 with 4 KiB random reads of a
 * page-cached raw image, and the simulated guest runs the same job through the in-process
 * machine (`vstor run`). Prints requests per second of both, and the kicks and interrupts (call
 * eventfd signals) per request of the vhost-user path.
 *
 *   deno run -A bench/vhost_user_bench.ts [--seconds=3] [--size-mib=256]
 *
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { Daemon } from "../src/serve/daemon.ts";
import { parseServeArgs } from "../src/serve/options.ts";
import { eventfdRead } from "../src/sys/eventfd.ts";
import { waitReadable } from "../src/sys/unix_socket.ts";
import { VIRTIO_BLK_T_IN } from "../src/virtio/virtio_blk_constants.ts";
import { Frontend } from "../tests/serve/frontend.ts";
import { mulberry32 } from "../tests/prng.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    seconds: { type: "string", default: "3" },
    "size-mib": { type: "string", default: "256" },
  },
});
const seconds = Number(values.seconds);
const size = Number(values["size-mib"]) << 20;
if (!(seconds > 0) || !(size > 0)) {
  console.error("vhost_user_bench: --seconds and --size-mib must be positive");
  Deno.exit(2);
}
const DEPTH = 32;
const BLOCK = 4096;

const dir = Deno.makeTempDirSync({ prefix: "vstor_vhost_bench_" });
const image = join(dir, "disk.raw");
const socket = join(dir, "vhost.sock");
{
  const f = Deno.openSync(image, { write: true, create: true });
  const chunk = new Uint8Array(1 << 20).fill(7);
  for (let at = 0; at < size; at += chunk.length) f.writeSync(chunk);
  f.close();
}

/** 4 KiB random reads at depth 32 through vhost-user for `seconds`. */
async function vhostUser(): Promise<{ iops: number; kicks: number; calls: number }> {
  const daemon = await Daemon.start(
    parseServeArgs([image, "-f", "raw", "--vhost-user-blk", socket]),
    { log: () => {} },
  );
  const fe = new Frontend(socket);
  try {
    fe.start(1, 128);
    const random = mulberry32(1);
    const blocks = size / BLOCK;
    const slots = Array.from({ length: DEPTH }, () => ({
      hdr: fe.alloc(16),
      data: fe.alloc(BLOCK),
      status: fe.alloc(1),
    }));
    const ring = fe.rings[0]!;
    const submit = (slot: number) => {
      const s = slots[slot]!;
      fe.mem.setU32(s.hdr, VIRTIO_BLK_T_IN);
      fe.mem.setU32(s.hdr + 8, Math.floor(random() * blocks) * (BLOCK / 512));
      fe.add(0, [{ addr: s.hdr, length: 16 }], [{ addr: s.data, length: BLOCK }, {
        addr: s.status,
        length: 1,
      }], slot);
    };
    for (let i = 0; i < DEPTH; i++) submit(i);
    fe.kick(0);
    let kicks = 1, calls = 0, done = 0;
    const start = performance.now();
    const end = start + seconds * 1000;
    while (performance.now() < end) {
      let reaped = 0;
      for (let u = ring.driver.getUsed(); u !== null; u = ring.driver.getUsed()) {
        submit(u.token);
        reaped++;
      }
      if (reaped > 0) {
        done += reaped;
        // Publish and notify only when the device asked for it (EVENT_IDX), as Linux does.
        if (ring.driver.kick()) {
          fe.kick(0);
          kicks++;
        }
        continue;
      }
      if (waitReadable([ring.call], 100).length > 0) calls += eventfdRead(ring.call);
    }
    const elapsed = (performance.now() - start) / 1000;
    return { iops: done / elapsed, kicks: kicks / done, calls: calls / done };
  } finally {
    fe.close();
    await daemon.stop();
  }
}

/** The same job on the simulated guest (`vstor run`, fio's JSON). */
async function simulated(): Promise<number> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      new URL("../mod.ts", import.meta.url).pathname,
      "run",
      "-q",
      "--drive",
      `file=${image},format=raw,id=d0`,
      "--device",
      "virtio-blk,drive=d0",
      "--name=r",
      "--rw=randread",
      "--bs=4k",
      `--iodepth=${DEPTH}`,
      `--runtime=${seconds}`,
      "--time_based",
      "--output-format=json",
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) throw new Error(new TextDecoder().decode(out.stderr));
  return JSON.parse(new TextDecoder().decode(out.stdout)).jobs[0].read.iops;
}

try {
  const vu = await vhostUser();
  const sim = await simulated();
  const f = (n: number) => Math.round(n).toLocaleString("en-US");
  console.log(
    `4 KiB random reads, depth ${DEPTH}, ${size >> 20} MiB page-cached raw image, ${seconds} s`,
  );
  console.log(
    `  vhost-user (TypeScript front-end, vstor serve): ${f(vu.iops)} req/s, ` +
      `${vu.kicks.toFixed(3)} kicks/req, ${vu.calls.toFixed(3)} interrupts/req`,
  );
  console.log(`  simulated guest (vstor run, virtio-blk):        ${f(sim)} req/s`);
  console.log(`  vhost-user / simulated: ${(vu.iops / sim).toFixed(2)}`);
} finally {
  Deno.removeSync(dir, { recursive: true });
}
