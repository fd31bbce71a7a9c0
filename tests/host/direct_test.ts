/**
 * O_DIRECT host files (`openHostFile(path, { direct: true })`): the alignment is found as QEMU
 * finds it, and any request — unaligned offsets and lengths, windows past the bounce buffer, writes
 * that extend the file — leaves the same bytes and the same size as a page-cached file.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { openHostFile } from "../../src/host/file.ts";
import { AlignedBuffer, dioAlignment } from "../../src/sys/direct.ts";
import { libc, O_CLOEXEC, O_DIRECT, O_RDONLY } from "../../src/sys/libc.ts";
import { mulberry32 } from "../prng.ts";

/** ext4 here: /tmp is on the root disk (tmpfs may refuse O_DIRECT on older kernels). */
const dir = Deno.makeTempDirSync({ prefix: "vstor_direct_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

Deno.test("an aligned buffer is page-aligned memory the program can use", () => {
  const b = new AlignedBuffer(5000);
  try {
    assert.equal(b.bytes.length, 8192);
    assert.equal(b.address % 4096n, 0n);
    b.bytes.fill(0xab);
    assert.equal(b.bytes[8191], 0xab);
  } finally {
    b.free();
  }
});

Deno.test("the direct-I/O alignment of a file on this disk comes from statx (512 bytes here)", () => {
  const path = join(dir, "align.img");
  Deno.writeFileSync(path, new Uint8Array(65536));
  const fd = libc().open(new TextEncoder().encode(path + "\0"), O_RDONLY | O_DIRECT | O_CLOEXEC, 0);
  assert.ok(fd >= 0);
  try {
    const a = dioAlignment(fd);
    assert.ok([512, 1024, 2048, 4096].includes(a.offset), `offset alignment ${a.offset}`);
    assert.ok(a.memory >= 1 && a.memory <= 4096);
    assert.notEqual(a.source, "default");
  } finally {
    libc().close(fd);
  }
});

Deno.test("random unaligned reads and writes through O_DIRECT match a page-cached file byte for byte (seed 1606)", () => {
  const seed = 1606;
  console.log(`seed ${seed}`);
  const random = mulberry32(seed);
  const below = (n: number) => Math.floor(random() * n);
  const directPath = join(dir, "direct.img"), cachedPath = join(dir, "cached.img");
  const initial = new Uint8Array(3 * 1024 * 1024 + 777);
  for (let i = 0; i < initial.length; i++) initial[i] = below(256);
  Deno.writeFileSync(directPath, initial);
  Deno.writeFileSync(cachedPath, initial);
  const direct = openHostFile(directPath, { direct: true, lock: false });
  const cached = openHostFile(cachedPath, { lock: false });
  try {
    for (let step = 0; step < 400; step++) {
      const size = cached.size();
      // Mostly small unaligned requests; some span several MiB (past the 1 MiB bounce window);
      // some start or end past the end of the file.
      const big = below(10) === 0;
      const length = big ? 1 + below(2_500_000) : 1 + below(9000);
      const offset = below(size + 8192);
      if (below(2) === 0) {
        const data = new Uint8Array(length);
        for (let i = 0; i < length; i += 97) data[i] = below(256);
        direct.writeAt(offset, data);
        cached.writeAt(offset, data);
        assert.equal(direct.size(), cached.size(), `step ${step}: size after write`);
      } else {
        const a = new Uint8Array(length), b = new Uint8Array(length);
        direct.readAt(offset, a);
        cached.readAt(offset, b);
        assert.ok(a.every((x, i) => x === b[i]), `step ${step}: read ${length} at ${offset}`);
      }
    }
    direct.flush();
  } finally {
    direct.close();
    cached.close();
  }
  const x = Deno.readFileSync(directPath), y = Deno.readFileSync(cachedPath);
  assert.equal(x.length, y.length);
  assert.ok(x.every((v, i) => v === y[i]), "files differ");
});

Deno.test("O_DIRECT with O_DSYNC (directsync) writes and reads back; truncate, punch and preallocate work", () => {
  const path = join(dir, "dsync.img");
  const file = openHostFile(path, { create: true, direct: true, dsync: true, lock: false });
  try {
    file.writeAt(100, new Uint8Array([1, 2, 3]));
    assert.equal(file.size(), 103);
    file.truncate(8192);
    file.preallocate(8192, 4096);
    assert.equal(file.size(), 12288);
    file.punchHole(0, 4096);
    const back = new Uint8Array(200);
    file.readAt(0, back);
    assert.ok(back.every((v) => v === 0), "the hole reads as zeroes");
  } finally {
    file.close();
  }
});
