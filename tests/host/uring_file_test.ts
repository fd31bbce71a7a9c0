/**
 * Host files opened with `aio: "io_uring"`: many RawNode reads and writes in flight at once, with
 * and without O_DIRECT (aligned, unaligned, bounced and zero-copy buffers, requests past the
 * bounce slots), leave the same bytes as the same requests applied one by one to a page-cached
 * copy; reads past the end read as zeroes, failures carry the errno, flush covers writes in
 * flight, and a kernel that refuses io_uring makes the open fail with QEMU's words.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { isBlockError } from "../../src/errors.ts";
import { openHostFile } from "../../src/host/file.ts";
import type { HostFile } from "../../src/host/host_file.ts";
import { AlignedBuffer } from "../../src/sys/direct.ts";
import { RawNode } from "../../formats/raw.ts";
import { mulberry32 } from "../prng.ts";
import { ignoreWithoutUring } from "../sys/uring_available.ts";

const ignore = ignoreWithoutUring;

/** On the root ext4 disk: tmpfs may refuse O_DIRECT. */
const dir = Deno.makeTempDirSync({ dir: "/var/tmp", prefix: "vstor_uring_file_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

interface Request {
  write: boolean;
  offset: number;
  length: number;
}

/** Requests of one batch that touch nothing another write of the batch touches. */
function batch(random: () => number, size: number, count: number, direct: boolean): Request[] {
  const below = (n: number) => Math.floor(random() * n);
  const out: Request[] = [];
  // Claimed blocks: an unaligned O_DIRECT write rewrites whole 4 KiB-or-less blocks around it.
  const taken: Array<[number, number, boolean]> = [];
  for (let tries = 0; out.length < count && tries < count * 20; tries++) {
    const kind = below(10);
    const length = kind < 5
      ? 4096 * (1 + below(4)) // aligned, the common case
      : kind < 8
      ? 1 + below(3000) // unaligned
      : 65536 + below(200_000); // past a bounce slot
    const aligned = kind < 5 || kind === 9;
    const offset = aligned
      ? 4096 * below(Math.floor((size - length) / 4096))
      : below(size - length);
    const write = random() < 0.5;
    const start = direct ? offset - (offset % 4096) : offset;
    const end = direct ? Math.ceil((offset + length) / 4096) * 4096 : offset + length;
    if (taken.some(([s, e, w]) => s < end && e > start && (w || write))) continue;
    taken.push([start, end, write]);
    out.push({ write, offset, length });
  }
  return out;
}

async function concurrentAgainstCached(direct: boolean, seed: number): Promise<void> {
  console.log(`seed ${seed} (${direct ? "O_DIRECT" : "page cache"})`);
  const random = mulberry32(seed);
  const size = 8 << 20;
  const initial = new Uint8Array(size);
  for (let i = 0; i < size; i += 4) initial[i] = Math.floor(random() * 256);
  const ringPath = join(dir, `ring_${direct}.img`), cachedPath = join(dir, `cached_${direct}.img`);
  Deno.writeFileSync(ringPath, initial);
  Deno.writeFileSync(cachedPath, initial);
  const node = await RawNode.open(
    openHostFile(ringPath, { direct, aio: "io_uring", lock: false }),
  );
  const cached = openHostFile(cachedPath, { lock: false });
  const scratch = new AlignedBuffer(1 << 20); // page-aligned caller memory: the zero-copy path
  try {
    for (let round = 0; round < 12; round++) {
      const requests = batch(random, size, 96, direct);
      const expected: Uint8Array[] = [];
      const buffers: Uint8Array[] = [];
      let scratchUsed = 0;
      for (const r of requests) {
        const zeroCopy = r.length <= scratch.bytes.length - scratchUsed && random() < 0.3;
        const b = zeroCopy
          ? scratch.bytes.subarray(scratchUsed, scratchUsed + r.length)
          : new Uint8Array(r.length);
        if (zeroCopy) scratchUsed += Math.ceil(r.length / 4096) * 4096;
        if (r.write) { for (let i = 0; i < b.length; i += 7) b[i] = (round * 31 + i) & 0xff; }
        buffers.push(b);
        const want = new Uint8Array(r.length);
        if (!r.write) cached.readAt(r.offset, want);
        expected.push(want);
      }
      // All of them in flight at once; the cached copy takes them one by one (they are disjoint).
      await Promise.all(
        requests.map((r, i) =>
          r.write ? node.write(r.offset, buffers[i]!) : node.read(r.offset, buffers[i]!)
        ),
      );
      requests.forEach((r, i) => {
        if (r.write) cached.writeAt(r.offset, buffers[i]!);
        else {
          assert.deepEqual(buffers[i], expected[i], `round ${round}: read ${r.offset}+${r.length}`);
        }
      });
    }
    await node.flush();
  } finally {
    scratch.free();
    await node.close();
    cached.close();
  }
  const [a, b] = [Deno.readFileSync(ringPath), Deno.readFileSync(cachedPath)];
  assert.equal(a.length, b.length);
  assert.equal(a.findIndex((x, i) => x !== b[i]), -1, "file bytes differ");
}

Deno.test({
  name:
    "many RawNode reads and writes in flight through io_uring and O_DIRECT leave the bytes a page-cached copy has (seed 1616)",
  ignore,
  fn: () => concurrentAgainstCached(true, 1616),
});

Deno.test({
  name:
    "many RawNode reads and writes in flight through io_uring on the page cache leave the bytes a page-cached copy has (seed 1617)",
  ignore,
  fn: () => concurrentAgainstCached(false, 1617),
});

Deno.test({
  name: "io_uring reads past the end of the file read as zeroes, and writes there extend it",
  ignore,
  async fn() {
    for (const direct of [false, true]) {
      const path = join(dir, `eof_${direct}.img`);
      Deno.writeFileSync(path, new Uint8Array(5000).fill(9));
      const file = openHostFile(path, { direct, aio: "io_uring", lock: false });
      try {
        const got = new Uint8Array(16384).fill(1);
        await file.readAtAsync!(0, got);
        assert.equal(got.findIndex((x, i) => x !== (i < 5000 ? 9 : 0)), -1);
        await file.writeAtAsync!(16384, new Uint8Array(4096).fill(3));
        assert.equal(file.size(), 20480);
        const back = new Uint8Array(8192);
        await file.readAtAsync!(12288, back);
        assert.equal(back.findIndex((x, i) => x !== (i < 4096 ? 0 : 3)), -1);
        file.flush();
      } finally {
        file.close();
      }
      assert.equal(Deno.statSync(path).size, 20480);
    }
  },
});

Deno.test({
  name:
    "flushAsync syncs through the ring after the writes accepted before it, without blocking the thread",
  ignore,
  async fn() {
    const path = join(dir, "flush_async.img");
    Deno.writeFileSync(path, new Uint8Array(1 << 20));
    const file = openHostFile(path, { direct: true, aio: "io_uring", lock: false });
    try {
      const done = new Array<boolean>(64).fill(false);
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 64; i++) {
        writes.push(
          file.writeAtAsync!(i * 8192, new Uint8Array(8192).fill(i + 1)).then(() => {
            done[i] = true;
          }),
        );
      }
      await file.flushAsync!();
      assert.ok(done.every((d) => d), "every earlier write completed before the sync");
      const seen = Deno.readFileSync(path);
      for (let i = 0; i < 64; i++) assert.equal(seen[i * 8192 + 100], i + 1, `write ${i}`);
      await Promise.all(writes);
      // Through a raw node: its flush takes the same path.
      const node = await RawNode.open(file);
      await node.write(0, new Uint8Array(4096).fill(0xee));
      await node.flush();
      assert.equal(Deno.readFileSync(path)[10], 0xee);
    } finally {
      file.close();
    }
  },
});

Deno.test({
  name: "flush waits for the writes in flight before fdatasync",
  ignore,
  async fn() {
    const path = join(dir, "flush.img");
    Deno.writeFileSync(path, new Uint8Array(1 << 20));
    const file = openHostFile(path, { direct: true, aio: "io_uring", lock: false });
    try {
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 64; i++) {
        writes.push(file.writeAtAsync!(i * 8192, new Uint8Array(8192).fill(i + 1)));
      }
      file.flush(); // synchronous: every write above has completed when it returns
      const seen = Deno.readFileSync(path);
      for (let i = 0; i < 64; i++) assert.equal(seen[i * 8192 + 100], i + 1, `write ${i}`);
      await Promise.all(writes);
    } finally {
      file.close();
    }
  },
});

Deno.test({
  name:
    "an io_uring write that fails rejects with BlockError io and the errno (ENOSPC on /dev/full)",
  ignore,
  async fn() {
    let file: HostFile;
    try {
      file = openHostFile("/dev/full", { aio: "io_uring", lock: false });
    } catch {
      return; // no /dev/full here
    }
    try {
      await assert.rejects(file.writeAtAsync!(0, new Uint8Array(512)), (e) => {
        assert.ok(isBlockError(e, "io"));
        assert.equal(e.context.errno, 28);
        assert.match(e.message, /^Write failed: No space left on device$/);
        return true;
      });
    } finally {
      file.close();
    }
  },
});

Deno.test({
  name:
    "opening with aio=io_uring where io_uring_setup fails says 'Unable to use io_uring' and why",
  ignore,
  async fn() {
    const path = join(dir, "emfile.img");
    Deno.writeFileSync(path, new Uint8Array(4096));
    const script = join(dir, "emfile.ts");
    const module = new URL("../../src/host/file.ts", import.meta.url).href;
    Deno.writeTextFileSync(
      script,
      `import { openHostFile } from ${JSON.stringify(module)};
openHostFile(${JSON.stringify(path)}, { aio: "io_uring", lock: false }).close();
const held = [];
try { for (;;) held.push(Deno.openSync("/dev/null")); } catch { /* EMFILE: none left */ }
held.pop()?.close(); // one left for the image, none for the ring
try {
  openHostFile(${JSON.stringify(path)}, { aio: "io_uring", lock: false });
  console.log("no error");
} catch (e) {
  console.log(JSON.stringify({ kind: e.kind, errno: e.context.errno, message: e.message }));
}
`,
    );
    const out = await new Deno.Command("bash", {
      args: ["-c", 'ulimit -n 64 && exec "$0" run -A --no-lock "$1"', Deno.execPath(), script],
    }).output();
    assert.ok(out.success, new TextDecoder().decode(out.stderr));
    assert.deepEqual(JSON.parse(new TextDecoder().decode(out.stdout).trim()), {
      kind: "io",
      errno: 24,
      message: "Unable to use io_uring: io_uring_setup: EMFILE (Too many open files)",
    });
  },
});
