import assert from "node:assert/strict";
import { join } from "node:path";
import { openHostFile } from "../../src/host/file.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import type { HostFile } from "../../src/host/host_file.ts";
import { isBlockError } from "../../src/errors.ts";

const dir = Deno.makeTempDirSync({ prefix: "vstor_host_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
let serial = 0;

function subjects(): Array<[string, () => HostFile]> {
  return [
    ["file", () => openHostFile(join(dir, `f${serial++}`), { create: true })],
    ["direct file", () => openHostFile(join(dir, `f${serial++}`), { create: true, direct: true })],
    ["memory", () => new MemoryFile("mem")],
  ];
}

for (const [name, make] of subjects()) {
  Deno.test(`${name} adapter: writes extend the file and read back; past the end reads zeroes`, () => {
    const f = make();
    try {
      assert.equal(f.size(), 0);
      f.writeAt(10_000, new Uint8Array([1, 2, 3]));
      assert.equal(f.size(), 10_003);
      const buf = new Uint8Array(20).fill(0xee);
      f.readAt(9_995, buf);
      assert.deepEqual([...buf.subarray(0, 5)], [0, 0, 0, 0, 0]);
      assert.deepEqual([...buf.subarray(5, 8)], [1, 2, 3]);
      assert.ok(buf.subarray(8).every((b) => b === 0), "bytes past the end read as zeroes");
    } finally {
      f.close();
    }
  });

  Deno.test(`${name} adapter: truncate grows with zeroes and shrinks`, () => {
    const f = make();
    try {
      f.writeAt(0, new Uint8Array(100).fill(7));
      f.truncate(50);
      f.truncate(200);
      const buf = new Uint8Array(200);
      f.readAt(0, buf);
      assert.ok(buf.subarray(0, 50).every((b) => b === 7));
      assert.ok(buf.subarray(50).every((b) => b === 0));
      assert.equal(f.size(), 200);
    } finally {
      f.close();
    }
  });

  Deno.test(`${name} adapter: punchHole zeroes a range and keeps the size`, () => {
    const f = make();
    try {
      f.writeAt(0, new Uint8Array(3 << 16).fill(9));
      f.punchHole(1 << 16, 1 << 16);
      const buf = new Uint8Array(3 << 16);
      f.readAt(0, buf);
      assert.equal(f.size(), 3 << 16);
      assert.ok(buf.subarray(0, 1 << 16).every((b) => b === 9));
      assert.ok(buf.subarray(1 << 16, 2 << 16).every((b) => b === 0));
      assert.ok(buf.subarray(2 << 16).every((b) => b === 9));
    } finally {
      f.close();
    }
  });

  Deno.test(`${name} adapter: a closed file refuses I/O with an error`, () => {
    const f = make();
    f.close();
    f.close();
    assert.throws(() => f.readAt(0, new Uint8Array(1)), (e) => isBlockError(e, "io"));
  });
}

Deno.test("file adapter: dataStatus finds data and holes (SEEK_DATA/SEEK_HOLE)", () => {
  const f = openHostFile(join(dir, "sparse"), { create: true });
  try {
    f.truncate(8 << 20);
    f.writeAt(4 << 20, new Uint8Array(1 << 20).fill(1));
    assert.deepEqual(f.dataStatus(0, 8 << 20), { data: false, length: 4 << 20 });
    assert.deepEqual(f.dataStatus(4 << 20, 4 << 20), { data: true, length: 1 << 20 });
    assert.deepEqual(f.dataStatus(5 << 20, 3 << 20), { data: false, length: 3 << 20 });
    assert.deepEqual(f.dataStatus(4 << 20, 100), { data: true, length: 100 });
    assert.ok(f.allocatedSize() >= 1 << 20 && f.allocatedSize() < 2 << 20);
  } finally {
    f.close();
  }
});

Deno.test("file adapter: a large write and read are never short", () => {
  const f = openHostFile(join(dir, "large"), { create: true });
  try {
    const big = new Uint8Array(48 << 20);
    for (let i = 0; i < big.length; i += 4096) big[i] = (i >> 12) & 0xff;
    f.writeAt(1, big);
    const back = new Uint8Array(big.length);
    f.readAt(1, back);
    assert.deepEqual(back, big);
  } finally {
    f.close();
  }
});

Deno.test("file adapter: opening a missing file names it and says not-found", () => {
  assert.throws(() => openHostFile(join(dir, "nope", "missing.img")), (e) => {
    assert.ok(isBlockError(e, "not-found"));
    assert.match(e.message, /missing\.img.*No such file or directory/);
    return true;
  });
});

Deno.test("file adapter: a read-only file refuses writes, truncation and holes", () => {
  const path = join(dir, "ro");
  Deno.writeFileSync(path, new Uint8Array(10));
  const f = openHostFile(path, { readOnly: true });
  try {
    assert.throws(() => f.writeAt(0, new Uint8Array(1)), (e) => isBlockError(e, "read-only"));
    assert.throws(() => f.truncate(0), (e) => isBlockError(e, "read-only"));
    assert.throws(() => f.punchHole(0, 1), (e) => isBlockError(e, "read-only"));
  } finally {
    f.close();
  }
});

Deno.test("memory adapter: growth past its bound is refused, not attempted", () => {
  const f = new MemoryFile("mem");
  assert.throws(() => f.truncate(2 ** 40), (e) => isBlockError(e, "io"));
  assert.equal(f.size(), 0);
});
