/**
 * One conformance suite for every BlockNode: only the constructor differs between runs.
 *
 * @module
 */
import assert from "node:assert/strict";
import type { BlockNode } from "../../src/block/node.ts";
import { isBlockError } from "../../src/errors.ts";

/** Builds a fresh, writable node of `size` bytes (zero-filled) and, optionally, a read-only view of it. */
export interface SuiteSubject {
  /** Name used in test names, e.g. "raw over a host file". */
  name: string;
  make(size: number): Promise<BlockNode>;
  /** Reopen what `make` built read-only (after the writable node is closed). */
  reopenReadOnly?(node: BlockNode): Promise<BlockNode>;
}

const SIZE = 1 << 20;

/** A deterministic pattern: byte i of the image holds (i * 7 + seed) & 0xff. */
function pattern(offset: number, length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = ((offset + i) * 7 + seed) & 0xff;
  return out;
}

async function rejectsWith(p: () => Promise<unknown>, kind: string): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(isBlockError(e), `expected a BlockError, got ${e}`);
    assert.equal(e.kind, kind, e.message);
    return true;
  });
}

/** Register the suite's tests for `subject`. */
export function nodeSuite(subject: SuiteSubject): void {
  const t = (what: string, fn: (node: BlockNode) => Promise<void>) =>
    Deno.test(`${subject.name}: ${what}`, async () => {
      const node = await subject.make(SIZE);
      try {
        await fn(node);
      } finally {
        await node.close();
      }
    });

  t("a fresh node reads as zeroes and reports its size", async (node) => {
    assert.equal(node.size, SIZE);
    const buf = new Uint8Array(SIZE).fill(0xaa);
    await node.read(0, buf);
    assert.ok(buf.every((b) => b === 0));
  });

  t("writes read back at aligned and unaligned offsets", async (node) => {
    const cases: Array<[number, number]> = [
      [0, 4096],
      [65536, 65536],
      [200_001, 1000],
      [266_239, 3],
      [SIZE - 7, 7],
    ];
    for (const [offset, length] of cases) {
      await node.write(offset, pattern(offset, length, 1));
    }
    for (const [offset, length] of cases) {
      const got = new Uint8Array(length);
      await node.read(offset, got);
      assert.deepEqual(got, pattern(offset, length, 1), `at ${offset}+${length}`);
    }
    // The bytes around an unaligned write are untouched.
    const around = new Uint8Array(2);
    await node.read(200_000, around.subarray(0, 1));
    await node.read(201_001, around.subarray(1, 2));
    assert.deepEqual(around, new Uint8Array(2));
  });

  t("zero-length requests at the end succeed and change nothing", async (node) => {
    await node.write(SIZE, new Uint8Array(0));
    await node.read(SIZE, new Uint8Array(0));
    await node.writeZeroes(SIZE, 0);
    await node.discard(0, 0);
    assert.equal(node.size, SIZE);
  });

  t("requests past the end fail with out-of-range and write nothing", async (node) => {
    await rejectsWith(() => node.read(SIZE - 1, new Uint8Array(2)), "out-of-range");
    await rejectsWith(() => node.write(SIZE, new Uint8Array(1).fill(9)), "out-of-range");
    await rejectsWith(() => node.writeZeroes(SIZE - 10, 11), "out-of-range");
    await rejectsWith(() => node.discard(SIZE + 1, 0), "out-of-range");
    await rejectsWith(() => node.read(2 ** 53 - 1, new Uint8Array(2)), "out-of-range");
    const tail = new Uint8Array(16);
    await node.read(SIZE - 16, tail);
    assert.ok(tail.every((b) => b === 0));
  });

  t("non-integer and negative offsets fail with invalid-argument", async (node) => {
    await rejectsWith(() => node.read(-1, new Uint8Array(1)), "invalid-argument");
    await rejectsWith(() => node.read(0.5, new Uint8Array(1)), "invalid-argument");
    await rejectsWith(() => node.write(NaN, new Uint8Array(1)), "invalid-argument");
    await rejectsWith(() => node.writeZeroes(0, -5), "invalid-argument");
    await rejectsWith(() => node.blockStatus(Infinity, 1), "invalid-argument");
  });

  t("writeZeroes and discard leave zeroes and keep neighbours", async (node) => {
    await node.write(0, pattern(0, 3 * 65536, 3));
    await node.writeZeroes(1000, 5000);
    await node.writeZeroes(65536, 65536, { unmap: true });
    const buf = new Uint8Array(3 * 65536);
    await node.read(0, buf);
    const want = pattern(0, 3 * 65536, 3);
    want.fill(0, 1000, 6000);
    want.fill(0, 65536, 131072);
    assert.deepEqual(buf, want);
    await node.discard(131072, 65536);
    // Discarded contents are unspecified but must be stable and neighbours untouched.
    const a = new Uint8Array(65536), b = new Uint8Array(65536);
    await node.read(131072, a);
    await node.read(131072, b);
    assert.deepEqual(a, b);
    const head = new Uint8Array(131072);
    await node.read(0, head);
    assert.deepEqual(head, want.subarray(0, 131072));
  });

  t("FUA writes and flush succeed", async (node) => {
    await node.write(4096, pattern(4096, 4096, 5), { fua: true });
    await node.flush();
    const got = new Uint8Array(4096);
    await node.read(4096, got);
    assert.deepEqual(got, pattern(4096, 4096, 5));
  });

  t("blockStatus covers the node with well-formed extents and ends in eof", async (node) => {
    await node.write(65536, pattern(0, 65536, 7));
    let offset = 0;
    let sawData = false;
    while (offset < SIZE) {
      const e = await node.blockStatus(offset, SIZE - offset);
      assert.equal(e.offset, offset);
      assert.ok(e.length >= 1 && e.length <= SIZE - offset, `length ${e.length}`);
      assert.notEqual(e.kind, "eof");
      if (e.kind === "data" && offset <= 65536 && 65536 < offset + e.length) sawData = true;
      offset += e.length;
    }
    assert.ok(sawData, "the written range reports data");
    assert.equal((await node.blockStatus(SIZE, 4096)).kind, "eof");
    assert.equal((await node.blockStatus(SIZE + 100, 4096)).kind, "eof");
  });

  if (subject.reopenReadOnly) {
    const reopen = subject.reopenReadOnly.bind(subject);
    Deno.test(`${subject.name}: a read-only node refuses every change and keeps the data`, async () => {
      const node = await subject.make(SIZE);
      await node.write(0, pattern(0, 4096, 9));
      const ro = await reopen(node);
      try {
        assert.equal(ro.readOnly, true);
        await rejectsWith(() => ro.write(0, new Uint8Array(1)), "read-only");
        await rejectsWith(() => ro.writeZeroes(0, 512), "read-only");
        await rejectsWith(() => ro.discard(0, 512), "read-only");
        const got = new Uint8Array(4096);
        await ro.read(0, got);
        assert.deepEqual(got, pattern(0, 4096, 9));
      } finally {
        await ro.close();
      }
    });
  }
}
