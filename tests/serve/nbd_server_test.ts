/**
 * The NBD server (src/serve/nbd/server.ts) as a client sees it on the wire: an in-process
 * {@linkcode NbdServer} behind a unix socket, driven byte by byte by `nbd_client.ts`. The fixed
 * newstyle handshake (LIST, INFO, GO, EXPORT_NAME, STARTTLS, STRUCTURED_REPLY, the metadata
 * contexts), the transmission phase (simple and structured replies, holes, block status, many
 * requests in flight), and hostile clients (bad magics, oversized options and requests, bad flags,
 * clients that vanish mid-request, idle clients, connection limits, shutdown with requests in
 * flight).
 *
 * Where the spec (doc/proto.md) leaves a choice, the server answers as QEMU 7.2's nbd/server.c
 * does (ENOSPC for a write past the end, EINVAL for a request over 32 MiB).
 *
 * @module
 */
import assert from "node:assert/strict";
import * as P from "../../src/host/nbd_protocol.ts";
import { type NbdExport, NbdServer } from "../../src/serve/nbd/server.ts";
import type { NbdStream } from "../../src/serve/nbd/stream.ts";
import type { BlockNode } from "../../src/block/node.ts";
import { BlockError } from "../../src/errors.ts";
import { openHostFile } from "../../src/host/file.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import { RawNode } from "../../formats/raw.ts";
import { createQcow2 } from "../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import { eventually, within } from "../timeout.ts";
import {
  type Chunk,
  infoData,
  metaData,
  NbdClient,
  openExport,
  parseBlockStatus,
  parseError,
  parseOffsetData,
  parseOffsetHole,
  type SimpleReply,
  utf8,
} from "./nbd_client.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const DONE = P.NBD_REPLY_FLAG_DONE;
const HOLE_ZERO = P.NBD_STATE_HOLE | P.NBD_STATE_ZERO;

// ---- fixtures ----

/** A fixed byte pattern: different for every seed, never all zeroes. */
function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = ((i * 7 + (i >> 9) + seed * 31) & 0xff) | 1;
  return out;
}

/** A raw node over a memory file of `size` bytes (zeroes, or `contents`). */
async function rawNode(size: number, contents?: Uint8Array): Promise<RawNode> {
  const bytes = new Uint8Array(size);
  if (contents !== undefined) bytes.set(contents);
  return await RawNode.open(new MemoryFile("raw.img", bytes));
}

/**
 * A 1 MiB qcow2 image (64 KiB clusters): data (pattern 1) in [64K, 128K), an allocated zero
 * cluster in [256K, 320K), the rest unallocated.
 */
async function qcow2Node(): Promise<Qcow2Node> {
  const file = new MemoryFile("disk.qcow2");
  await createQcow2(file, MiB);
  const node = await Qcow2Node.open(file);
  await node.write(64 * KiB, pattern(64 * KiB, 1));
  await node.writeZeroes(256 * KiB, 64 * KiB, { unmap: false });
  return node;
}

function exportOf(
  name: string,
  node: BlockNode,
  opts: { writable?: boolean; description?: string; allocationDepth?: boolean } = {},
): NbdExport {
  return {
    name,
    description: opts.description,
    node,
    writable: opts.writable ?? true,
    allocationDepth: opts.allocationDepth ?? false,
  };
}

/** "disk": 1 MiB raw, writable, described, with allocation depth; "ro": 64 KiB read-only. */
async function standardExports(): Promise<NbdExport[]> {
  return [
    exportOf("disk", await rawNode(MiB), { description: "a raw disk", allocationDepth: true }),
    exportOf("ro", await rawNode(64 * KiB, pattern(64 * KiB, 9)), { writable: false }),
  ];
}

/** Holds writes until opened, counting those that arrived while closed. */
class Gate {
  arrived = 0;
  #open = false;
  #waiters: Array<() => void> = [];

  async pass(): Promise<void> {
    if (this.#open) return;
    this.arrived++;
    await new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  open(): void {
    this.#open = true;
    for (const w of this.#waiters.splice(0)) w();
  }
}

/** Makes `node`'s writes wait for `gate`. */
function gateWrites(node: RawNode, gate: Gate): void {
  const write = node.write.bind(node);
  node.write = async (offset, src, opts) => {
    await gate.pass();
    await write(offset, src, opts);
  };
}

/** A server on a unix socket in a temp dir, its accept loop, its clients and its log. */
class Harness {
  readonly logs: string[] = [];
  readonly server: NbdServer;
  readonly path: string;
  readonly #dir: string;
  readonly #listener: Deno.Listener;
  readonly #accepting: Promise<void>;
  readonly #serving: Promise<void>[] = [];
  readonly #clients: NbdClient[] = [];
  readonly exports: readonly NbdExport[];

  private constructor(
    dir: string,
    exports: readonly NbdExport[],
    opts: { maxConnections?: number; handshakeMs?: number },
  ) {
    this.#dir = dir;
    this.exports = exports;
    this.path = `${dir}/nbd.sock`;
    this.server = new NbdServer(exports, {
      maxConnections: opts.maxConnections ?? 0,
      ...(opts.handshakeMs === undefined ? {} : { handshakeMs: opts.handshakeMs }),
      log: (line) => this.logs.push(line),
    });
    this.#listener = Deno.listen({ transport: "unix", path: this.path });
    this.#accepting = this.#accept();
  }

  static async start(
    exports: readonly NbdExport[],
    opts: { maxConnections?: number; handshakeMs?: number } = {},
  ): Promise<Harness> {
    const dir = await Deno.makeTempDir({ prefix: "vstor_nbd_" });
    return new Harness(dir, exports, opts);
  }

  async #accept(): Promise<void> {
    let n = 0;
    try {
      for await (const conn of this.#listener) {
        this.#serving.push(this.server.serve(conn, `client ${++n}`));
      }
    } catch (e) {
      if (!(e instanceof Deno.errors.BadResource || e instanceof Deno.errors.Interrupted)) throw e;
    }
  }

  async connect(): Promise<NbdClient> {
    const c = await NbdClient.connect(this.path);
    this.#clients.push(c);
    return c;
  }

  async open(
    name: string,
    opts: { structured?: boolean; contexts?: readonly string[] } = {},
  ): Promise<NbdClient & { size: number; flags: number; contexts: Map<string, number> }> {
    const { client, size, flags, contexts } = await openExport(this.path, name, opts);
    this.#clients.push(client);
    return Object.assign(client, { size, flags, contexts });
  }

  /** Waits for a log line matching `re` (the server logs a connection's end after it closes). */
  async logged(re: RegExp): Promise<string> {
    await eventually(
      () => this.logs.some((l) => re.test(l)),
      3_000,
      `a log line matching ${re} (log: ${JSON.stringify(this.logs)})`,
    );
    return this.logs.find((l) => re.test(l))!;
  }

  async stop(): Promise<void> {
    for (const c of this.#clients) c.close();
    await within(this.server.shutdown(), 5_000, "server.shutdown()");
    this.#listener.close();
    await this.#accepting;
    await within(Promise.all(this.#serving), 5_000, "every connection's serve()");
    for (const e of this.exports) await e.node.close();
    await Deno.remove(this.#dir, { recursive: true });
  }
}

async function withServer(
  exports: readonly NbdExport[],
  fn: (h: Harness) => Promise<void>,
  opts: { maxConnections?: number; handshakeMs?: number } = {},
): Promise<void> {
  const h = await Harness.start(exports, opts);
  try {
    await fn(h);
  } finally {
    await h.stop();
  }
}

function ok(r: SimpleReply, what = "request"): void {
  assert.equal(r.error, 0, `${what}: error ${r.error}`);
}

/** The one chunk of a structured reply that only says "done" or is one error. */
function onlyChunk(chunks: Chunk[]): Chunk {
  assert.equal(chunks.length, 1, `one chunk, got ${chunks.map((c) => c.type).join(", ")}`);
  assert.equal(chunks[0]!.flags & DONE, DONE);
  return chunks[0]!;
}

function structuredOk(chunks: Chunk[]): void {
  const c = onlyChunk(chunks);
  assert.equal(c.type, P.NBD_REPLY_TYPE_NONE, "a NONE chunk");
  assert.equal(c.payload.length, 0);
}

function structuredError(chunks: Chunk[], errno: number): string {
  const c = onlyChunk(chunks);
  const e = parseError(c);
  assert.equal(e.errno, errno, `errno ${e.errno} (${e.message}), expected ${errno}`);
  return e.message;
}

/**
 * Checks a structured READ reply the way a strict client would (only the last chunk DONE, every
 * content chunk inside the request, at least one byte, no overlap, full coverage) and returns the
 * bytes with the merged hole and data runs.
 */
function assembleRead(chunks: Chunk[], offset: number, length: number): {
  bytes: Uint8Array;
  holes: Array<[number, number]>;
  data: Array<[number, number]>;
} {
  const bytes = new Uint8Array(length);
  const runs: Array<{ start: number; length: number; hole: boolean }> = [];
  chunks.forEach((c, i) => {
    assert.equal((c.flags & DONE) !== 0, i === chunks.length - 1, "only the last chunk is DONE");
    if (c.type === P.NBD_REPLY_TYPE_NONE) return assert.equal(c.payload.length, 0);
    if (c.type === P.NBD_REPLY_TYPE_OFFSET_DATA) {
      const d = parseOffsetData(c);
      bytes.set(d.data, d.offset - offset);
      runs.push({ start: d.offset, length: d.data.length, hole: false });
    } else if (c.type === P.NBD_REPLY_TYPE_OFFSET_HOLE) {
      const h = parseOffsetHole(c);
      runs.push({ start: h.offset, length: h.length, hole: true });
    } else {
      assert.fail(`unexpected chunk type ${c.type}`);
    }
  });
  runs.sort((a, b) => a.start - b.start);
  let at = offset;
  const holes: Array<[number, number]> = [];
  const data: Array<[number, number]> = [];
  for (const r of runs) {
    assert.ok(r.length > 0, "a content chunk describes at least one byte");
    assert.equal(r.start, at, "content chunks cover the request without gaps or overlaps");
    at += r.length;
    const list = r.hole ? holes : data;
    const last = list[list.length - 1];
    if (last !== undefined && last[0] + last[1] === r.start) last[1] += r.length;
    else list.push([r.start, r.length]);
  }
  assert.equal(at, offset + length, "content chunks cover the whole request");
  return { bytes, holes, data };
}

// ---- handshake ----

Deno.test("nbd handshake: the greeting is NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    const g = await c.readGreeting();
    assert.equal(g.magic, 0x4e42444d41474943n);
    assert.equal(g.optsMagic, 0x49484156454f5054n);
    assert.equal(g.flags, P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
  });
});

Deno.test("nbd handshake: LIST gives every export with its description, then ACK", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    const replies = await c.option(P.NBD_OPT_LIST);
    assert.deepEqual(replies.map((r) => r.type), [
      P.NBD_REP_SERVER,
      P.NBD_REP_SERVER,
      P.NBD_REP_ACK,
    ]);
    const listed = replies.slice(0, -1).map((r) => {
      const n = new DataView(r.data.buffer, r.data.byteOffset).getUint32(0);
      assert.ok(n <= r.data.length - 4, "name length within the reply");
      const dec = new TextDecoder();
      return {
        name: dec.decode(r.data.subarray(4, 4 + n)),
        rest: dec.decode(r.data.subarray(4 + n)),
      };
    });
    assert.deepEqual(listed, [{ name: "disk", rest: "a raw disk" }, { name: "ro", rest: "" }]);
    assert.equal(replies[2]!.data.length, 0, "ACK has no data");
    // LIST takes no data.
    const bad = await c.option(P.NBD_OPT_LIST, new Uint8Array(4));
    assert.deepEqual(bad.map((r) => r.type), [P.NBD_REP_ERR_INVALID]);
    // Still in the option phase.
    assert.equal((await c.option(P.NBD_OPT_LIST)).length, 3);
  });
});

Deno.test("nbd handshake: INFO/GO of an unknown export → ERR_UNKNOWN, then GO works", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    for (const option of [P.NBD_OPT_INFO, P.NBD_OPT_GO]) {
      const r = await c.info("nope", [P.NBD_INFO_BLOCK_SIZE], option);
      assert.equal(r.replies.length, 1, "only the error");
      assert.equal(r.type, P.NBD_REP_ERR_UNKNOWN);
      assert.match(new TextDecoder().decode(r.replies[0]!.data), /nope/);
    }
    const go = await c.go("disk");
    assert.equal(go.type, P.NBD_REP_ACK);
    assert.equal(go.export?.size, MiB);
    const r = await c.simple(P.NBD_CMD_READ, 0, 0, 512);
    ok(r);
    assert.deepEqual(r.data, new Uint8Array(512));
  });
});

Deno.test("nbd handshake: INFO gives EXPORT (size, flags), BLOCK_SIZE, NAME, DESCRIPTION", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    const common = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA |
      P.NBD_FLAG_SEND_CACHE | P.NBD_FLAG_CAN_MULTI_CONN;

    const disk = await c.info("disk", [
      P.NBD_INFO_NAME,
      P.NBD_INFO_DESCRIPTION,
      P.NBD_INFO_BLOCK_SIZE,
    ]);
    assert.equal(disk.type, P.NBD_REP_ACK);
    assert.ok(disk.replies.slice(0, -1).every((r) => r.type === P.NBD_REP_INFO));
    assert.deepEqual(disk.export, {
      size: MiB,
      flags: common | P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES |
        P.NBD_FLAG_SEND_FAST_ZERO,
    });
    assert.deepEqual(disk.blockSize, { min: 1, preferred: 4096, max: 32 * MiB });
    assert.equal(disk.name, "disk");
    assert.equal(disk.description, "a raw disk");

    // Read-only: READ_ONLY, no TRIM or WRITE_ZEROES; no description to give; BLOCK_SIZE anyway.
    const ro = await c.info("ro");
    assert.equal(ro.type, P.NBD_REP_ACK);
    assert.deepEqual(ro.export, { size: 64 * KiB, flags: common | P.NBD_FLAG_READ_ONLY });
    assert.equal(ro.description, undefined);
    assert.ok(ro.blockSize !== undefined, "BLOCK_SIZE is always sent");
    assert.equal((await c.info("ro", [P.NBD_INFO_DESCRIPTION])).description, undefined);

    // SEND_DF only once structured replies are negotiated.
    assert.equal(disk.export.flags & P.NBD_FLAG_SEND_DF, 0);
    await c.structuredReply();
    const after = await c.info("disk");
    assert.equal(after.export?.flags, disk.export.flags | P.NBD_FLAG_SEND_DF);

    // A node with an alignment: the minimum block size is it, for a client that asked only.
    Object.defineProperty(h.exports[0]!.node, "requestAlignment", { value: 4096 });
    const aligned = await c.info("disk", [P.NBD_INFO_BLOCK_SIZE]);
    assert.deepEqual(aligned.blockSize, { min: 4096, preferred: 4096, max: 32 * MiB });
    assert.equal((await c.info("disk")).blockSize?.min, 1);

    // INFO does not end the handshake.
    assert.equal((await c.option(P.NBD_OPT_LIST)).at(-1)!.type, P.NBD_REP_ACK);
  });
});

Deno.test("nbd handshake: STARTTLS → ERR_POLICY, unknown option → ERR_UNSUP, STRUCTURED_REPLY twice → ERR_INVALID", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    assert.deepEqual((await c.option(P.NBD_OPT_STARTTLS)).map((r) => r.type), [
      P.NBD_REP_ERR_POLICY,
    ]);
    for (const option of [4, 11, 99, 0x7fffffff]) {
      assert.deepEqual((await c.option(option, pattern(100, 2))).map((r) => r.type), [
        P.NBD_REP_ERR_UNSUP,
      ], `option ${option}`);
    }
    await c.structuredReply();
    assert.deepEqual((await c.option(P.NBD_OPT_STRUCTURED_REPLY)).map((r) => r.type), [
      P.NBD_REP_ERR_INVALID,
    ]);
    assert.equal((await c.go("disk")).type, P.NBD_REP_ACK);
    structuredOk(await c.structuredCall(P.NBD_CMD_FLUSH, 0, 0, 0));
  });
});

Deno.test("nbd handshake: malformed INFO/GO data → ERR_INVALID, the connection goes on", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    const good = infoData("disk", [P.NBD_INFO_BLOCK_SIZE]);
    const cases: Array<[string, Uint8Array]> = [
      ["no data", new Uint8Array(0)],
      ["a name cut short", good.subarray(0, 6)],
      ["no request count", good.subarray(0, 8)],
      ["a request cut short", good.subarray(0, good.length - 1)],
      [
        "two requests announced, one sent",
        new P.WireWriter().string32("disk").u16(2).u16(P.NBD_INFO_BLOCK_SIZE).done(),
      ],
      ["trailing bytes", P.concat([good, new Uint8Array([1, 2, 3])])],
      ["a name over 4096 bytes", infoData("d".repeat(5000))],
    ];
    for (const option of [P.NBD_OPT_INFO, P.NBD_OPT_GO]) {
      for (const [what, data] of cases) {
        const replies = await c.option(option, data);
        assert.deepEqual(
          replies.map((r) => r.type),
          [P.NBD_REP_ERR_INVALID],
          `${what} (${option})`,
        );
      }
    }
    assert.equal((await c.go("disk")).type, P.NBD_REP_ACK);
    ok(await c.simple(P.NBD_CMD_FLUSH, 0, 0, 0));
  });
});

Deno.test("nbd handshake: SET_META_CONTEXT before STRUCTURED_REPLY → ERR_INVALID", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    const before = await c.setMetaContext("disk", [P.CONTEXT_BASE_ALLOCATION]);
    assert.equal(before.type, P.NBD_REP_ERR_INVALID);
    assert.equal(before.contexts.size, 0);
    await c.structuredReply();
    const after = await c.setMetaContext("disk", [P.CONTEXT_BASE_ALLOCATION]);
    assert.equal(after.type, P.NBD_REP_ACK);
    assert.deepEqual([...after.contexts], [[P.CONTEXT_BASE_ALLOCATION, 0]]);
  });
});

Deno.test("nbd handshake: LIST/SET_META_CONTEXT offer qemu:allocation-depth only when enabled", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    await c.structuredReply();
    const names = async (name: string, queries: string[]) => {
      const r = await c.listMetaContext(name, queries);
      assert.equal(r.type, P.NBD_REP_ACK, `LIST_META_CONTEXT ${name} ${queries}`);
      return [...r.contexts.keys()].sort();
    };
    assert.deepEqual(await names("disk", ["qemu:"]), [P.CONTEXT_ALLOCATION_DEPTH]);
    assert.deepEqual(await names("ro", ["qemu:"]), []);
    assert.deepEqual(await names("disk", []), [
      P.CONTEXT_BASE_ALLOCATION,
      P.CONTEXT_ALLOCATION_DEPTH,
    ]);
    assert.deepEqual(await names("ro", []), [P.CONTEXT_BASE_ALLOCATION]);
    assert.deepEqual(await names("disk", ["base:"]), [P.CONTEXT_BASE_ALLOCATION]);
    assert.deepEqual(await names("disk", ["x-unknown:thing", "qemu:nothing"]), []);
    assert.equal((await c.listMetaContext("nope", [])).type, P.NBD_REP_ERR_UNKNOWN);
    // Malformed: a query longer than the data.
    const bad = await c.option(
      P.NBD_OPT_LIST_META_CONTEXT,
      metaData("disk", ["base:"]).subarray(0, 12),
    );
    assert.deepEqual(bad.map((r) => r.type), [P.NBD_REP_ERR_INVALID]);

    const both = await c.setMetaContext("disk", [
      P.CONTEXT_BASE_ALLOCATION,
      P.CONTEXT_ALLOCATION_DEPTH,
    ]);
    assert.equal(both.type, P.NBD_REP_ACK);
    assert.deepEqual([...both.contexts.keys()].sort(), [
      P.CONTEXT_BASE_ALLOCATION,
      P.CONTEXT_ALLOCATION_DEPTH,
    ]);
    assert.notEqual(
      both.contexts.get(P.CONTEXT_BASE_ALLOCATION),
      both.contexts.get(P.CONTEXT_ALLOCATION_DEPTH),
    );
    // SET takes exact names only, and nothing the export does not offer.
    assert.equal((await c.setMetaContext("disk", ["qemu:"])).contexts.size, 0);
    assert.equal((await c.setMetaContext("ro", [P.CONTEXT_ALLOCATION_DEPTH])).contexts.size, 0);
  });
});

Deno.test("LIST_META_CONTEXT replies carry context id 0 (the spec: ids mean something only for SET)", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    await c.structuredReply();
    const r = await c.listMetaContext("disk", []);
    assert.equal(r.type, P.NBD_REP_ACK);
    // proto.md, NBD_OPT_LIST_META_CONTEXT: "The metadata context ID in these replies is reserved
    // and SHOULD be set to zero"; QEMU's nbd_negotiate_send_meta_context sends 0 for LIST.
    assert.deepEqual([...r.contexts], [
      [P.CONTEXT_BASE_ALLOCATION, 0],
      [P.CONTEXT_ALLOCATION_DEPTH, 0],
    ]);
  });
});

Deno.test("a failed SET_META_CONTEXT clears the earlier selection (the spec: it replaces it, even failing)", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    await c.structuredReply();
    assert.equal((await c.setMetaContext("disk", [P.CONTEXT_BASE_ALLOCATION])).type, P.NBD_REP_ACK);
    assert.equal(
      (await c.setMetaContext("nope", [P.CONTEXT_BASE_ALLOCATION])).type,
      P.NBD_REP_ERR_UNKNOWN,
    );
    assert.equal((await c.go("disk")).type, P.NBD_REP_ACK);
    // proto.md, NBD_OPT_SET_META_CONTEXT: "Issuing this command replaces all previously-set
    // metadata contexts (including when this command fails)"; QEMU clears its selection before
    // parsing the export name. No context is selected now: BLOCK_STATUS must fail.
    structuredError(await c.structuredCall(P.NBD_CMD_BLOCK_STATUS, 0, 0, 4096), P.NBD_EINVAL);
  });
});

Deno.test("nbd handshake: EXPORT_NAME ends the handshake with size, flags and 124 zeroes unless NO_ZEROES", async () => {
  await withServer(await standardExports(), async (h) => {
    // Without NO_ZEROES (and without fixed newstyle, as the oldest newstyle clients).
    for (const clientFlags of [P.NBD_FLAG_C_FIXED_NEWSTYLE, 0]) {
      const c = await h.connect();
      await c.handshake(clientFlags);
      await c.sendOption(P.NBD_OPT_EXPORT_NAME, utf8("disk"));
      const b = await c.readExact(8 + 2 + 124);
      const v = new DataView(b.buffer);
      assert.equal(v.getBigUint64(0), BigInt(MiB));
      const flags = v.getUint16(8);
      assert.equal(flags & P.NBD_FLAG_HAS_FLAGS, P.NBD_FLAG_HAS_FLAGS);
      assert.equal(flags & (P.NBD_FLAG_READ_ONLY | P.NBD_FLAG_SEND_DF), 0);
      assert.deepEqual(b.subarray(10), new Uint8Array(124));
      // The next bytes are the reply to the first request: nothing else came in between.
      ok(await c.simple(P.NBD_CMD_WRITE, 0, 0, 512, pattern(512, 3)));
      assert.deepEqual((await c.simple(P.NBD_CMD_READ, 0, 0, 512)).data, pattern(512, 3));
    }
    // With NO_ZEROES, after STRUCTURED_REPLY: 10 bytes, SEND_DF set.
    const c = await h.connect();
    await c.handshake(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES);
    await c.structuredReply();
    await c.sendOption(P.NBD_OPT_EXPORT_NAME, utf8("ro"));
    const b = await c.readExact(10);
    const v = new DataView(b.buffer);
    assert.equal(v.getBigUint64(0), BigInt(64 * KiB));
    assert.equal(
      v.getUint16(8) & (P.NBD_FLAG_READ_ONLY | P.NBD_FLAG_SEND_DF),
      P.NBD_FLAG_READ_ONLY | P.NBD_FLAG_SEND_DF,
    );
    const chunks = await c.structuredCall(P.NBD_CMD_READ, 0, 0, 4096);
    assert.deepEqual(assembleRead(chunks, 0, 4096).bytes, pattern(64 * KiB, 9).subarray(0, 4096));
  });
});

Deno.test("nbd handshake: EXPORT_NAME of an unknown export, or another option from a non-fixed client, closes", async () => {
  await withServer(await standardExports(), async (h) => {
    const a = await h.connect();
    await a.handshake();
    await a.sendOption(P.NBD_OPT_EXPORT_NAME, utf8("nope"));
    await a.expectClosed();
    await h.logged(/EXPORT_NAME 'nope'/);

    const b = await h.connect();
    await b.handshake(0);
    await b.sendOption(P.NBD_OPT_LIST);
    await b.expectClosed();
  });
});

Deno.test("nbd handshake: ABORT is acknowledged, then the connection closes", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    assert.deepEqual((await c.option(P.NBD_OPT_ABORT)).map((r) => r.type), [P.NBD_REP_ACK]);
    await c.expectClosed();
  });
});

// ---- data ----

Deno.test("nbd data: simple replies — WRITE, READ back, FUA, FLUSH, WRITE_ZEROES, TRIM, CACHE, DISC", async () => {
  const node = await rawNode(MiB);
  await withServer([exportOf("disk", node)], async (h) => {
    const c = await h.open("disk");
    const a = pattern(8 * KiB, 1);
    ok(await c.simple(P.NBD_CMD_WRITE, 0, 4 * KiB, a.length, a), "WRITE");
    const back = await c.simple(P.NBD_CMD_READ, 0, 0, 16 * KiB);
    ok(back, "READ");
    assert.deepEqual(back.data, P.concat([new Uint8Array(4 * KiB), a, new Uint8Array(4 * KiB)]));

    const b = pattern(64 * KiB, 2);
    ok(await c.simple(P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FUA, 64 * KiB, b.length, b), "WRITE+FUA");
    ok(await c.simple(P.NBD_CMD_FLUSH, 0, 0, 0), "FLUSH");
    assert.deepEqual((await c.simple(P.NBD_CMD_READ, 0, 64 * KiB, b.length)).data, b);

    ok(await c.simple(P.NBD_CMD_WRITE_ZEROES, 0, 5 * KiB, 2 * KiB), "WRITE_ZEROES");
    ok(
      await c.simple(
        P.NBD_CMD_WRITE_ZEROES,
        P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FUA,
        66 * KiB,
        1000,
      ),
      "WRITE_ZEROES+NO_HOLE+FUA",
    );
    const z = await c.simple(P.NBD_CMD_READ, 0, 4 * KiB, 8 * KiB);
    assert.deepEqual(
      z.data,
      P.concat([a.subarray(0, KiB), new Uint8Array(2 * KiB), a.subarray(3 * KiB)]),
    );
    const bz = b.slice();
    bz.fill(0, 2 * KiB, 2 * KiB + 1000);
    assert.deepEqual((await c.simple(P.NBD_CMD_READ, 0, 64 * KiB, b.length)).data, bz);

    ok(await c.simple(P.NBD_CMD_TRIM, 0, 512 * KiB, 64 * KiB), "TRIM");
    ok(await c.simple(P.NBD_CMD_TRIM, P.NBD_CMD_FLAG_FUA, 576 * KiB, 4 * KiB), "TRIM+FUA");
    ok(await c.simple(P.NBD_CMD_CACHE, 0, 0, MiB), "CACHE");
    ok(await c.simple(P.NBD_CMD_READ, 0, MiB, 0), "READ of 0 bytes at the end");

    // The node holds what the client wrote.
    const direct = new Uint8Array(b.length);
    await node.read(64 * KiB, direct);
    assert.deepEqual(direct, bz);

    // DISC: the server closes once what came before is answered.
    const cookie = c.nextCookie();
    await c.request(P.NBD_CMD_WRITE, 0, cookie, 0, 512, pattern(512, 4));
    await c.disconnect();
    const r = await c.readSimpleReply();
    assert.equal(r.cookie, cookie);
    ok(r);
    await c.expectClosed();
    await h.logged(/sent DISC/);
  });
});

Deno.test("nbd data: structured replies — WRITE, READ back as one OFFSET_DATA, errors as ERROR chunks", async () => {
  await withServer([exportOf("disk", await rawNode(MiB))], async (h) => {
    const c = await h.open("disk", { structured: true });
    assert.equal(c.flags & P.NBD_FLAG_SEND_DF, P.NBD_FLAG_SEND_DF);
    const a = pattern(12 * KiB, 5);
    structuredOk(await c.structuredCall(P.NBD_CMD_WRITE, 0, 8 * KiB, a.length, a));
    structuredOk(
      await c.structuredCall(P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FUA, 32 * KiB, a.length, a),
    );
    structuredOk(await c.structuredCall(P.NBD_CMD_FLUSH, 0, 0, 0));
    structuredOk(await c.structuredCall(P.NBD_CMD_WRITE_ZEROES, 0, 40 * KiB, 512));
    structuredOk(await c.structuredCall(P.NBD_CMD_TRIM, 0, 128 * KiB, 4 * KiB));
    structuredOk(await c.structuredCall(P.NBD_CMD_CACHE, 0, 0, 64 * KiB));

    const chunks = await c.structuredCall(P.NBD_CMD_READ, 0, 8 * KiB, a.length);
    const d = parseOffsetData(onlyChunk(chunks));
    assert.equal(d.offset, 8 * KiB);
    assert.deepEqual(d.data, a);

    const withZeroes = a.slice();
    withZeroes.fill(0, 8 * KiB, 8 * KiB + 512);
    const df = await c.structuredCall(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 32 * KiB, a.length);
    assert.deepEqual(assembleRead(df, 32 * KiB, a.length).bytes, withZeroes);

    const message = structuredError(
      await c.structuredCall(P.NBD_CMD_READ, 0, MiB - 512, 1024),
      P.NBD_EINVAL,
    );
    assert.ok(message.length > 0, "the error chunk carries a message");
  });
});

Deno.test("nbd data: structured READ over qcow2 — OFFSET_HOLE for holes, OFFSET_DATA for data, one OFFSET_DATA with DF", async () => {
  const node = await qcow2Node();
  await withServer([exportOf("disk", node)], async (h) => {
    const c = await h.open("disk", { structured: true });
    const length = 384 * KiB;
    const expected = new Uint8Array(length);
    expected.set(pattern(64 * KiB, 1), 64 * KiB);

    const sparse = assembleRead(await c.structuredCall(P.NBD_CMD_READ, 0, 0, length), 0, length);
    assert.deepEqual(sparse.bytes, expected);
    assert.deepEqual(sparse.data, [[64 * KiB, 64 * KiB]]);
    // Unallocated [0, 64K) and [128K, 256K), the zero cluster [256K, 320K), unallocated after.
    assert.deepEqual(sparse.holes, [[0, 64 * KiB], [128 * KiB, 256 * KiB]]);

    const whole = await c.structuredCall(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 0, length);
    const d = parseOffsetData(onlyChunk(whole));
    assert.equal(d.offset, 0);
    assert.deepEqual(d.data, expected);

    // A range that is all data, or all hole.
    const inData = await c.structuredCall(P.NBD_CMD_READ, 0, 80 * KiB, 4 * KiB);
    assert.deepEqual(
      parseOffsetData(onlyChunk(inData)).data,
      pattern(64 * KiB, 1).subarray(16 * KiB, 20 * KiB),
    );
    const inHole = await c.structuredCall(P.NBD_CMD_READ, 0, 512 * KiB, 4 * KiB);
    assert.deepEqual(parseOffsetHole(onlyChunk(inHole)), { offset: 512 * KiB, length: 4 * KiB });

    // Simple replies give the same bytes.
    const s = await h.open("disk");
    assert.deepEqual((await s.simple(P.NBD_CMD_READ, 0, 0, length)).data, expected);
  });
});

Deno.test("nbd data: BLOCK_STATUS — base:allocation and qemu:allocation-depth, REQ_ONE", async () => {
  const node = await qcow2Node();
  await withServer([exportOf("disk", node, { allocationDepth: true })], async (h) => {
    const c = await h.open("disk", {
      contexts: [P.CONTEXT_BASE_ALLOCATION, P.CONTEXT_ALLOCATION_DEPTH],
    });
    const base = c.contexts.get(P.CONTEXT_BASE_ALLOCATION)!;
    const depth = c.contexts.get(P.CONTEXT_ALLOCATION_DEPTH)!;
    assert.ok(base !== undefined && depth !== undefined, "both contexts selected");

    const status = async (flags: number, offset: number, length: number) => {
      const chunks = await c.structuredCall(P.NBD_CMD_BLOCK_STATUS, flags, offset, length);
      assert.equal(chunks.length, 2, "one chunk per context");
      chunks.forEach((ch, i) => assert.equal((ch.flags & DONE) !== 0, i === 1, "DONE on the last"));
      const byId = new Map(chunks.map((ch) => {
        const s = parseBlockStatus(ch);
        return [s.id, s.extents] as const;
      }));
      assert.equal(byId.size, 2);
      return { base: byId.get(base)!, depth: byId.get(depth)! };
    };

    const all = await status(0, 0, 384 * KiB);
    assert.deepEqual(all.base, [[64 * KiB, HOLE_ZERO], [64 * KiB, 0], [256 * KiB, HOLE_ZERO]]);
    assert.deepEqual(all.depth, [
      [64 * KiB, 0],
      [64 * KiB, 1],
      [128 * KiB, 0],
      [64 * KiB, 1],
      [64 * KiB, 0],
    ]);

    const one = await status(P.NBD_CMD_FLAG_REQ_ONE, 0, 384 * KiB);
    assert.deepEqual(one.base, [[64 * KiB, HOLE_ZERO]]);
    assert.deepEqual(one.depth, [[64 * KiB, 0]]);
    const inside = await status(P.NBD_CMD_FLAG_REQ_ONE, 68 * KiB, 8 * KiB);
    assert.deepEqual(inside.base, [[8 * KiB, 0]], "REQ_ONE: no longer than the request");
    assert.deepEqual(inside.depth, [[8 * KiB, 1]]);

    // After a write the data shows up; to the end of the image.
    ok(await h.open("disk").then((w) => w.simple(P.NBD_CMD_WRITE, 0, 0, 4096, pattern(4096, 6))));
    const tail = await status(0, 0, MiB);
    // (qcow2 allocates the whole 64 KiB cluster, so [0, 128K) is data now.)
    assert.deepEqual(tail.base, [[128 * KiB, 0], [896 * KiB, HOLE_ZERO]]);
    assert.deepEqual(tail.depth, [[128 * KiB, 1], [128 * KiB, 0], [64 * KiB, 1], [704 * KiB, 0]]);

    structuredError(
      await c.structuredCall(P.NBD_CMD_BLOCK_STATUS, 0, MiB - 512, 1024),
      P.NBD_EINVAL,
    );
    structuredError(await c.structuredCall(P.NBD_CMD_BLOCK_STATUS, 0, 0, 0), P.NBD_EINVAL);

    // One context selected: one chunk.
    const only = await h.open("disk", { contexts: [P.CONTEXT_BASE_ALLOCATION] });
    const ch = onlyChunk(await only.structuredCall(P.NBD_CMD_BLOCK_STATUS, 0, 64 * KiB, 64 * KiB));
    assert.deepEqual(parseBlockStatus(ch), {
      id: only.contexts.get(P.CONTEXT_BASE_ALLOCATION),
      extents: [[64 * KiB, 0]],
    });
  });
});

Deno.test("nbd data: 32 pipelined WRITEs and READs, replies in any order, each cookie answered once", async () => {
  const node = await rawNode(MiB);
  await withServer([exportOf("disk", node)], async (h) => {
    const n = 32;
    const piece = 4 * KiB;
    const w = await h.open("disk");
    const cookies = Array.from({ length: n }, (_, i) => 0x1000_0000_0000n + BigInt(i) * 7919n);
    const writes = P.concat(cookies.flatMap((cookie, i) => [
      P.encodeRequest(
        P.NBD_CMD_WRITE,
        i % 3 === 0 ? P.NBD_CMD_FLAG_FUA : 0,
        cookie,
        i * piece,
        piece,
      ),
      pattern(piece, 100 + i),
    ]));
    const sending = w.send(writes);
    const answered: bigint[] = [];
    for (let i = 0; i < n; i++) {
      const r = await w.readSimpleReply();
      ok(r, `write reply ${i}`);
      answered.push(r.cookie);
    }
    await sending;
    assert.deepEqual([...answered].sort(), [...cookies].sort(), "every cookie answered once");

    // READs in flight on another connection, with structured replies.
    const r = await h.open("disk", { structured: true });
    const reads = P.concat(
      cookies.map((cookie, i) => P.encodeRequest(P.NBD_CMD_READ, 0, cookie, i * piece, piece)),
    );
    const sendingReads = r.send(reads);
    const byCookie = new Map<bigint, Chunk[]>();
    let done = 0;
    while (done < n) {
      const ch = await r.readChunk();
      assert.ok(cookies.includes(ch.cookie), `unknown cookie ${ch.cookie}`);
      const list = byCookie.get(ch.cookie) ?? [];
      assert.ok(list.every((x) => (x.flags & DONE) === 0), "no chunk after DONE");
      list.push(ch);
      byCookie.set(ch.cookie, list);
      if ((ch.flags & DONE) !== 0) done++;
    }
    await sendingReads;
    cookies.forEach((cookie, i) => {
      const got = assembleRead(byCookie.get(cookie)!, i * piece, piece).bytes;
      assert.deepEqual(got, pattern(piece, 100 + i), `piece ${i}`);
    });
  });
});

Deno.test("nbd data: at most 16 requests in flight per connection", async () => {
  const node = await rawNode(MiB);
  const gate = new Gate();
  gateWrites(node, gate);
  await withServer([exportOf("disk", node)], async (h) => {
    try {
      const c = await h.open("disk");
      const n = 20;
      await c.send(
        ...Array.from({ length: n }, (_, i) => [
          P.encodeRequest(P.NBD_CMD_WRITE, 0, BigInt(i + 1), i * 512, 512),
          pattern(512, i),
        ]).flat(),
      );
      await eventually(() => gate.arrived === 16, 3_000, "16 writes in flight");
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.equal(gate.arrived, 16, "no 17th request taken while 16 are in flight");
      gate.open();
      const cookies = [];
      for (let i = 0; i < n; i++) {
        const r = await c.readSimpleReply();
        ok(r);
        cookies.push(Number(r.cookie));
      }
      assert.deepEqual(cookies.sort((a, b) => a - b), Array.from({ length: n }, (_, i) => i + 1));
      const back = await c.simple(P.NBD_CMD_READ, 0, 0, n * 512);
      assert.deepEqual(back.data, P.concat(Array.from({ length: n }, (_, i) => pattern(512, i))));
    } finally {
      gate.open();
    }
  });
});

Deno.test("nbd data: 32 pipelined simple READs — each reply's data follows its header", async () => {
  const contents = pattern(MiB, 12);
  await withServer([exportOf("disk", await rawNode(MiB, contents))], async (h) => {
    const c = await h.open("disk");
    // Lengths differ, so a reply cut into another's data would misparse.
    const reads = Array.from({ length: 32 }, (_, i) => ({
      cookie: BigInt(i + 1),
      offset: i * 16 * KiB,
      length: 512 * (1 + (i % 7)),
    }));
    const sending = c.send(
      ...reads.map((r) => P.encodeRequest(P.NBD_CMD_READ, 0, r.cookie, r.offset, r.length)),
    );
    const seen = new Set<bigint>();
    for (let i = 0; i < reads.length; i++) {
      const header = await c.readExact(16);
      const v = new DataView(header.buffer);
      assert.equal(v.getUint32(0), P.NBD_SIMPLE_REPLY_MAGIC);
      assert.equal(v.getUint32(4), 0);
      const cookie = v.getBigUint64(8);
      const r = reads.find((x) => x.cookie === cookie);
      assert.ok(r !== undefined && !seen.has(cookie), `cookie ${cookie} once`);
      seen.add(cookie);
      assert.deepEqual(
        await c.readExact(r.length),
        contents.subarray(r.offset, r.offset + r.length),
      );
    }
    await sending;
  });
});

Deno.test("nbd data: a 32 MiB WRITE and READ (the limit) are served; large payloads stay in step", async () => {
  const size = 40 * MiB;
  await withServer([exportOf("disk", await rawNode(size))], async (h) => {
    const c = await h.open("disk");
    const big = pattern(P.NBD_MAX_BUFFER_SIZE, 13);
    const small = pattern(700, 14);
    // The big WRITE and a small one right behind it, in one burst.
    const sending = c.send(
      P.encodeRequest(P.NBD_CMD_WRITE, 0, 1n, 4 * MiB, big.length),
      big,
      P.encodeRequest(P.NBD_CMD_WRITE, 0, 2n, 300, small.length),
      small,
    );
    const replies = [await c.readSimpleReply(0, 20_000), await c.readSimpleReply(0, 20_000)];
    await sending;
    assert.deepEqual(replies.map((r) => [r.cookie, r.error]).sort(), [[1n, 0], [2n, 0]]);
    const back = await c.simple(P.NBD_CMD_READ, 0, 4 * MiB, big.length);
    ok(back);
    assert.ok(back.data.every((b, i) => b === big[i]), "32 MiB read back");
    assert.deepEqual((await c.simple(P.NBD_CMD_READ, 0, 300, small.length)).data, small);
  });
});

Deno.test("nbd data: the client's EOF after its requests — every request is still answered", async () => {
  const node = await rawNode(MiB);
  await withServer([exportOf("disk", node)], async (h) => {
    const c = await h.open("disk");
    for (let i = 0; i < 8; i++) {
      await c.request(P.NBD_CMD_WRITE, 0, BigInt(i + 1), i * 4096, 4096, pattern(4096, 30 + i));
    }
    await c.conn.closeWrite();
    const cookies: number[] = [];
    for (let i = 0; i < 8; i++) {
      const r = await c.readSimpleReply();
      ok(r);
      cookies.push(Number(r.cookie));
    }
    assert.deepEqual(cookies.sort((a, b) => a - b), [1, 2, 3, 4, 5, 6, 7, 8]);
    await c.expectClosed();
    const back = new Uint8Array(8 * 4096);
    await node.read(0, back);
    assert.deepEqual(back, P.concat(Array.from({ length: 8 }, (_, i) => pattern(4096, 30 + i))));
  });
});

Deno.test("nbd data: node errors become replies (EIO, ENOSPC), and the connection goes on", async () => {
  const node = await rawNode(MiB, pattern(MiB, 15));
  const fail = { read: false, write: false, status: false };
  const read = node.read.bind(node);
  const write = node.write.bind(node);
  const blockStatus = node.blockStatus.bind(node);
  node.read = async (offset, dst) => {
    if (fail.read) throw new BlockError("io", "Injected read error", { path: "raw.img" });
    await read(offset, dst);
  };
  node.write = async (offset, src, opts) => {
    if (fail.write) throw new BlockError("io", "No space", { path: "raw.img", errno: 28 });
    await write(offset, src, opts);
  };
  node.blockStatus = async (offset, max) => {
    if (fail.status) throw new Error("Injected status error");
    return await blockStatus(offset, max);
  };
  await withServer([exportOf("disk", node)], async (h) => {
    const c = await h.open("disk");
    const s = await h.open("disk", { contexts: [P.CONTEXT_BASE_ALLOCATION] });
    fail.read = true;
    assert.equal((await c.simple(P.NBD_CMD_READ, 0, 0, 4096)).error, P.NBD_EIO);
    assert.match(
      structuredError(await s.structuredCall(P.NBD_CMD_READ, 0, 0, 4096), P.NBD_EIO),
      /Injected/,
    );
    structuredError(await s.structuredCall(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 0, 4096), P.NBD_EIO);
    assert.equal((await c.simple(P.NBD_CMD_CACHE, 0, 0, 4096)).error, P.NBD_EIO);
    fail.read = false;
    fail.write = true;
    assert.equal(
      (await c.simple(P.NBD_CMD_WRITE, 0, 0, 4096, pattern(4096, 16))).error,
      P.NBD_ENOSPC,
    );
    fail.write = false;
    fail.status = true;
    structuredError(await s.structuredCall(P.NBD_CMD_BLOCK_STATUS, 0, 0, 4096), P.NBD_EIO);
    structuredError(await s.structuredCall(P.NBD_CMD_READ, 0, 0, 4096), P.NBD_EIO);
    fail.status = false;
    assert.deepEqual(
      (await c.simple(P.NBD_CMD_READ, 0, 0, 4096)).data,
      pattern(MiB, 15).subarray(0, 4096),
    );
    assert.deepEqual(
      assembleRead(await s.structuredCall(P.NBD_CMD_READ, 0, 0, 4096), 0, 4096).bytes,
      pattern(MiB, 15).subarray(0, 4096),
    );
  });
});

// ---- hostile clients ----

Deno.test("nbd hostile: a bad option magic closes the connection", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    const bad = new Uint8Array(16);
    new DataView(bad.buffer).setBigUint64(0, 0x1122334455667788n);
    await c.send(bad);
    await c.expectClosed();
    await h.logged(/client 1: bad option magic/);
  });
});

Deno.test("nbd hostile: a transmission request during the option phase closes the connection", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    await c.send(P.encodeRequest(P.NBD_CMD_READ, 0, 1n, 0, 512));
    await c.expectClosed();
  });
});

Deno.test("nbd hostile: an option over 64 KiB closes the connection; 64 KiB exactly is answered", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake();
    assert.deepEqual((await c.option(99, new Uint8Array(64 * KiB))).map((r) => r.type), [
      P.NBD_REP_ERR_UNSUP,
    ]);
    const header = new Uint8Array(16);
    const v = new DataView(header.buffer);
    v.setBigUint64(0, P.NBD_OPTS_MAGIC);
    v.setUint32(8, P.NBD_OPT_INFO);
    v.setUint32(12, MiB);
    await c.send(header);
    await c.expectClosed();
    await h.logged(/carries 1048576 bytes/);
  });
});

Deno.test("nbd hostile: unknown client flags close the connection", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.connect();
    await c.handshake(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES | (1 << 5));
    await c.expectClosed();
    await h.logged(/unknown client flags 0x23/);
  });
});

Deno.test("nbd hostile: unknown commands → EINVAL, and the connection goes on", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.open("disk");
    for (const type of [8, 9, 42, 0xffff]) {
      assert.equal((await c.simple(type, 0, 0, 4096)).error, P.NBD_EINVAL, `command ${type}`);
    }
    ok(await c.simple(P.NBD_CMD_READ, 0, 0, 4096));
    const s = await h.open("disk", { structured: true });
    assert.match(structuredError(await s.structuredCall(42, 0, 0, 0), P.NBD_EINVAL), /42/);
    structuredOk(await s.structuredCall(P.NBD_CMD_FLUSH, 0, 0, 0));
  });
});

Deno.test("nbd hostile: flags a command does not take → EINVAL (a WRITE's payload still consumed)", async () => {
  const node = await rawNode(MiB);
  await withServer([exportOf("disk", node)], async (h) => {
    const c = await h.open("disk");
    const cases: Array<[string, number, number, Uint8Array?]> = [
      ["READ+DF without structured replies", P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF],
      ["READ+REQ_ONE", P.NBD_CMD_READ, P.NBD_CMD_FLAG_REQ_ONE],
      ["WRITE+NO_HOLE", P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_NO_HOLE, pattern(4096, 7)],
      ["WRITE+unknown bit", P.NBD_CMD_WRITE, 1 << 12, pattern(4096, 8)],
      ["FLUSH+NO_HOLE", P.NBD_CMD_FLUSH, P.NBD_CMD_FLAG_NO_HOLE],
      ["TRIM+DF", P.NBD_CMD_TRIM, P.NBD_CMD_FLAG_DF],
      ["WRITE_ZEROES+bit 15", P.NBD_CMD_WRITE_ZEROES, 1 << 15],
      ["CACHE+DF", P.NBD_CMD_CACHE, P.NBD_CMD_FLAG_DF],
    ];
    ok(await c.simple(P.NBD_CMD_WRITE, 0, 0, 4096, pattern(4096, 1)));
    for (const [what, type, flags, payload] of cases) {
      const r = await c.simple(type, flags, 0, 4096, payload);
      assert.equal(r.error, P.NBD_EINVAL, what);
    }
    // Nothing was written or zeroed, and the stream is still in step.
    assert.deepEqual((await c.simple(P.NBD_CMD_READ, 0, 0, 4096)).data, pattern(4096, 1));
  });
});

Deno.test("nbd hostile: requests past the end → EINVAL (writes: ENOSPC, as QEMU), the connection goes on", async () => {
  const node = await rawNode(MiB);
  await withServer([exportOf("disk", node)], async (h) => {
    const c = await h.open("disk");
    const cases: Array<[string, number, number, number]> = [
      ["READ across the end", P.NBD_CMD_READ, MiB - 512, 1024],
      ["READ after the end", P.NBD_CMD_READ, MiB + 512, 512],
      ["READ at 2^53", P.NBD_CMD_READ, 2 ** 53, 512],
      ["CACHE after the end", P.NBD_CMD_CACHE, 2 * MiB, 4096],
    ];
    for (const [what, type, offset, length] of cases) {
      assert.equal((await c.simple(type, 0, offset, length)).error, P.NBD_EINVAL, what);
    }
    for (
      const [what, type, offset, length] of [
        ["TRIM across the end", P.NBD_CMD_TRIM, MiB - 512, 0xffffffff],
        ["WRITE_ZEROES across the end", P.NBD_CMD_WRITE_ZEROES, MiB - 512, 1024],
      ] as const
    ) {
      assert.equal((await c.simple(type, 0, offset, length)).error, P.NBD_ENOSPC, what);
    }
    // A WRITE across the end: refused, its payload consumed, nothing written.
    assert.equal(
      (await c.simple(P.NBD_CMD_WRITE, 0, MiB - 512, 1024, pattern(1024, 2))).error,
      P.NBD_ENOSPC,
    );
    // An offset of 2^64 - 1 (not a JS number: the header by hand).
    const header = P.encodeRequest(P.NBD_CMD_READ, 0, 77n, 0, 512);
    new DataView(header.buffer).setBigUint64(16, 0xffff_ffff_ffff_ffffn);
    await c.send(header);
    const r = await c.readSimpleReply(512);
    assert.equal(r.cookie, 77n);
    assert.equal(r.error, P.NBD_EINVAL);
    ok(await c.simple(P.NBD_CMD_READ, 0, MiB - 512, 512));
    const tail = new Uint8Array(512);
    await node.read(MiB - 512, tail);
    assert.deepEqual(tail, new Uint8Array(512));
  });
});

Deno.test("nbd hostile: writes to a read-only export → EPERM, the payload consumed", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.open("ro");
    assert.equal(c.flags & P.NBD_FLAG_READ_ONLY, P.NBD_FLAG_READ_ONLY);
    assert.equal(
      (await c.simple(P.NBD_CMD_WRITE, 0, 0, 4096, pattern(4096, 3))).error,
      P.NBD_EPERM,
    );
    assert.equal(
      (await c.simple(P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FUA, 4096, 4096, pattern(4096, 3))).error,
      P.NBD_EPERM,
    );
    assert.equal((await c.simple(P.NBD_CMD_TRIM, 0, 0, 4096)).error, P.NBD_EPERM);
    assert.equal((await c.simple(P.NBD_CMD_WRITE_ZEROES, 0, 0, 4096)).error, P.NBD_EPERM);
    ok(await c.simple(P.NBD_CMD_FLUSH, 0, 0, 0), "FLUSH on a read-only export");
    ok(await c.simple(P.NBD_CMD_CACHE, 0, 0, 4096), "CACHE on a read-only export");
    const r = await c.simple(P.NBD_CMD_READ, 0, 0, 8192);
    ok(r);
    assert.deepEqual(r.data, pattern(64 * KiB, 9).subarray(0, 8192), "unchanged");
  });
});

Deno.test("nbd hostile: READ of 33 MiB → EINVAL (as QEMU), the connection goes on", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.open("disk");
    const r = await c.simple(P.NBD_CMD_READ, 0, 0, 33 * MiB);
    assert.equal(r.error, P.NBD_EINVAL);
    assert.equal(r.data.length, 0);
    ok(await c.simple(P.NBD_CMD_READ, 0, 0, 4096));
    const s = await h.open("disk", { structured: true });
    structuredError(await s.structuredCall(P.NBD_CMD_READ, 0, 0, 33 * MiB), P.NBD_EINVAL);
    structuredOk(await s.structuredCall(P.NBD_CMD_FLUSH, 0, 0, 0));
  });
});

Deno.test("nbd hostile: a WRITE header announcing 64 MiB → EINVAL, then the connection closes", async () => {
  const node = await rawNode(MiB, pattern(MiB, 4));
  await withServer([exportOf("disk", node)], async (h) => {
    const c = await h.open("disk");
    await c.request(P.NBD_CMD_WRITE, 0, 5n, 0, 64 * MiB);
    await c.trySend(new Uint8Array(64 * KiB));
    const r = await c.readSimpleReply();
    assert.equal(r.cookie, 5n);
    assert.equal(r.error, P.NBD_EINVAL);
    await c.expectClosed();
    const head = new Uint8Array(64 * KiB);
    await node.read(0, head);
    assert.deepEqual(head, pattern(MiB, 4).subarray(0, 64 * KiB));
  });
});

Deno.test("nbd hostile: a bad request magic in transmission closes the connection", async () => {
  await withServer(await standardExports(), async (h) => {
    const c = await h.open("disk");
    const header = P.encodeRequest(P.NBD_CMD_READ, 0, 1n, 0, 512);
    header[0] = 0x12;
    await c.send(header);
    await c.expectClosed();
    await h.logged(/bad request magic/);
  });
});

Deno.test("nbd hostile: BLOCK_STATUS without a negotiated context → EINVAL", async () => {
  await withServer(await standardExports(), async (h) => {
    const simple = await h.open("disk");
    assert.equal((await simple.simple(P.NBD_CMD_BLOCK_STATUS, 0, 0, 4096)).error, P.NBD_EINVAL);
    ok(await simple.simple(P.NBD_CMD_FLUSH, 0, 0, 0));
    const structured = await h.open("disk", { structured: true });
    structuredError(
      await structured.structuredCall(P.NBD_CMD_BLOCK_STATUS, 0, 0, 4096),
      P.NBD_EINVAL,
    );
    // A SET_META_CONTEXT that selected nothing.
    const none = await h.open("ro", { contexts: [P.CONTEXT_ALLOCATION_DEPTH] });
    assert.equal(none.contexts.size, 0);
    structuredError(await none.structuredCall(P.NBD_CMD_BLOCK_STATUS, 0, 0, 4096), P.NBD_EINVAL);
    // Contexts chosen for another export do not carry over to the one GO selects.
    const other = await h.connect();
    await other.handshake();
    await other.structuredReply();
    assert.equal((await other.setMetaContext("ro", [P.CONTEXT_BASE_ALLOCATION])).contexts.size, 1);
    assert.equal((await other.go("disk")).type, P.NBD_REP_ACK);
    structuredError(await other.structuredCall(P.NBD_CMD_BLOCK_STATUS, 0, 0, 4096), P.NBD_EINVAL);
  });
});

Deno.test("nbd hostile: a client gone mid-WRITE payload is logged; other clients and the node are intact", async () => {
  const before = pattern(64 * KiB, 5);
  const node = await rawNode(MiB, before);
  await withServer([exportOf("disk", node)], async (h) => {
    const other = await h.open("disk");
    const quitter = await h.open("disk");
    await quitter.request(P.NBD_CMD_WRITE, 0, 1n, 0, 64 * KiB, pattern(1000, 6));
    quitter.close();
    const line = await h.logged(/client 2: .*ended/);
    assert.match(line, /after 1000 bytes/);
    assert.equal(h.server.connections, 1);
    assert.deepEqual((await other.simple(P.NBD_CMD_READ, 0, 0, 64 * KiB)).data, before);
    ok(await other.simple(P.NBD_CMD_WRITE, 0, 128 * KiB, 4096, pattern(4096, 7)));
    assert.deepEqual(
      (await other.simple(P.NBD_CMD_READ, 0, 128 * KiB, 4096)).data,
      pattern(4096, 7),
    );
    const direct = new Uint8Array(64 * KiB);
    await node.read(0, direct);
    assert.deepEqual(direct, before);
  });
});

Deno.test("nbd hostile: the handshake timeout closes an idle client, not one that finished", async () => {
  await withServer(await standardExports(), async (h) => {
    const finished = await h.open("disk");
    const idle = await h.connect();
    const t0 = performance.now();
    await idle.readGreeting();
    await idle.expectClosed(3_000);
    const waited = performance.now() - t0;
    assert.ok(waited >= 150, `closed after ${waited.toFixed(0)} ms, before the 200 ms limit`);
    await h.logged(/handshake not finished/);
    // One half-way through its options is closed too.
    const slow = await h.connect();
    await slow.handshake();
    await slow.structuredReply();
    await slow.expectClosed(3_000);
    // The client that finished in time is still served.
    await new Promise((resolve) => setTimeout(resolve, 250));
    ok(await finished.simple(P.NBD_CMD_READ, 0, 0, 512));
  }, { handshakeMs: 200 });
});

Deno.test("nbd hostile: maxConnections 2 — a third client is closed at once, the first two work", async () => {
  await withServer(await standardExports(), async (h) => {
    const a = await h.open("disk");
    const b = await h.open("disk");
    assert.equal(a.flags & P.NBD_FLAG_CAN_MULTI_CONN, P.NBD_FLAG_CAN_MULTI_CONN);
    const c = await h.connect();
    await c.expectClosed(2_000);
    await h.logged(/client 3: refused: 2 connections already/);
    ok(await a.simple(P.NBD_CMD_WRITE, 0, 0, 4096, pattern(4096, 8)));
    assert.deepEqual((await b.simple(P.NBD_CMD_READ, 0, 0, 4096)).data, pattern(4096, 8));
    // Once one leaves, a new client gets in.
    a.close();
    await eventually(() => h.server.connections === 1, 3_000, "the first client's end");
    const d = await h.open("disk");
    assert.deepEqual((await d.simple(P.NBD_CMD_READ, 0, 0, 4096)).data, pattern(4096, 8));
  }, { maxConnections: 2 });
});

Deno.test("nbd hostile: maxConnections 1 does not advertise CAN_MULTI_CONN", async () => {
  await withServer(await standardExports(), async (h) => {
    const a = await h.open("disk");
    assert.equal(a.flags & P.NBD_FLAG_CAN_MULTI_CONN, 0);
  }, { maxConnections: 1 });
});

Deno.test("nbd hostile: 100 idle clients do not stop a 101st (maxConnections 0)", async () => {
  await withServer(await standardExports(), async (h) => {
    const idle: NbdClient[] = [];
    for (let i = 0; i < 100; i++) idle.push(await h.connect());
    await Promise.all(idle.map((c) => c.readGreeting()));
    const c = await h.open("disk");
    assert.equal(h.server.connections, 101);
    ok(await c.simple(P.NBD_CMD_WRITE, 0, 0, 4096, pattern(4096, 9)));
    assert.deepEqual((await c.simple(P.NBD_CMD_READ, 0, 0, 4096)).data, pattern(4096, 9));
  });
});

Deno.test("nbd hostile: shutdown() completes the requests in flight, then closes; new clients are refused", async () => {
  const node = await rawNode(MiB);
  const gate = new Gate();
  gateWrites(node, gate);
  await withServer([exportOf("disk", node)], async (h) => {
    try {
      const c = await h.open("disk");
      const idle = await h.connect();
      await idle.readGreeting();
      const n = 4;
      for (let i = 0; i < n; i++) {
        await c.request(P.NBD_CMD_WRITE, 0, BigInt(i + 1), i * 4096, 4096, pattern(4096, 20 + i));
      }
      await eventually(() => gate.arrived === n, 3_000, "the writes in flight");
      let stopped = false;
      const stopping = h.server.shutdown().then(() => stopped = true);
      await idle.expectClosed(2_000);
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.equal(stopped, false, "shutdown() waits for the requests in flight");
      const late = await h.connect();
      await late.expectClosed(2_000);
      gate.open();
      const cookies: number[] = [];
      for (let i = 0; i < n; i++) {
        const r = await c.readSimpleReply();
        ok(r);
        cookies.push(Number(r.cookie));
      }
      assert.deepEqual(cookies.sort(), [1, 2, 3, 4]);
      await c.expectClosed();
      await within(stopping, 3_000, "shutdown()");
      const back = new Uint8Array(n * 4096);
      await node.read(0, back);
      assert.deepEqual(back, P.concat(Array.from({ length: n }, (_, i) => pattern(4096, 20 + i))));
    } finally {
      gate.open();
    }
  });
});

// ---- departures from the spec ----

Deno.test("FUA is accepted on READ, FLUSH, CACHE and BLOCK_STATUS (the spec: valid on every command)", async () => {
  const node = await qcow2Node();
  await withServer([exportOf("disk", node)], async (h) => {
    // proto.md, NBD_CMD_FLAG_FUA: "This flag is valid for all commands, provided
    // NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST accept all commands
    // with this bit set (even by ignoring the bit)". QEMU's nbd_co_receive_request starts every
    // command's valid flags with NBD_CMD_FLAG_FUA (and flushes before a READ with it).
    const c = await h.open("disk", { contexts: [P.CONTEXT_BASE_ALLOCATION] });
    assert.equal(c.flags & P.NBD_FLAG_SEND_FUA, P.NBD_FLAG_SEND_FUA);
    const errors: string[] = [];
    for (
      const [what, type] of [
        ["READ", P.NBD_CMD_READ],
        ["FLUSH", P.NBD_CMD_FLUSH],
        ["CACHE", P.NBD_CMD_CACHE],
        ["BLOCK_STATUS", P.NBD_CMD_BLOCK_STATUS],
      ] as const
    ) {
      const chunks = await c.structuredCall(
        type,
        P.NBD_CMD_FLAG_FUA,
        0,
        type === P.NBD_CMD_FLUSH ? 0 : 4096,
      );
      const e = chunks.find((ch) => ch.type === P.NBD_REPLY_TYPE_ERROR);
      if (e !== undefined) errors.push(`${what}+FUA: errno ${parseError(e).errno}`);
    }
    assert.deepEqual(errors, []);
  });
});

Deno.test("a structured READ of 0 bytes is answered by a lone NONE chunk (no chunk describes 0 bytes)", async () => {
  await withServer([exportOf("disk", await rawNode(MiB))], async (h) => {
    // proto.md: a structured READ's content chunks "MUST describe at least one byte", and
    // NBD_REPLY_TYPE_OFFSET_DATA's "length MUST be at least 9". QEMU's nbd_do_cmd_read answers a
    // zero-length structured READ with a lone NBD_REPLY_TYPE_NONE chunk.
    const c = await h.open("disk", { structured: true });
    const chunks = await c.structuredCall(P.NBD_CMD_READ, 0, 4096, 0);
    assert.deepEqual(chunks.map((ch) => [ch.type, ch.payload.length]), [[
      P.NBD_REPLY_TYPE_NONE,
      0,
    ]]);
  });
});

/** An option as a client sends it: IHAVEOPT, the option, the data's length, the data. */
function optionBytes(option: number, data: Uint8Array): Uint8Array {
  const header = new Uint8Array(P.OPTION_HEADER_SIZE);
  const v = new DataView(header.buffer);
  v.setBigUint64(0, P.NBD_OPTS_MAGIC);
  v.setUint32(8, option);
  v.setUint32(12, data.length);
  return P.concat([header, data]);
}

/**
 * An in-memory {@linkcode NbdStream} whose reads and writes the test times to the microtask: the
 * server reads what {@linkcode push} supplied, waiting when there is none; writes complete at once.
 */
class MemoryStream implements NbdStream {
  closed = false;
  #inbox: Uint8Array = new Uint8Array(0);
  #pending: { p: Uint8Array; resolve: (n: number | null) => void } | null = null;

  push(bytes: Uint8Array): void {
    this.#inbox = P.concat([this.#inbox, bytes]);
    const pending = this.#pending;
    this.#pending = null;
    pending?.resolve(this.#take(pending.p));
  }

  #take(p: Uint8Array): number {
    const n = Math.min(p.length, this.#inbox.length);
    p.set(this.#inbox.subarray(0, n));
    this.#inbox = this.#inbox.slice(n);
    return n;
  }

  read(p: Uint8Array): Promise<number | null> {
    if (this.closed) return Promise.reject(new Deno.errors.BadResource("closed"));
    if (this.#inbox.length > 0) return Promise.resolve(this.#take(p));
    return new Promise((resolve) => this.#pending = { p, resolve });
  }

  write(p: Uint8Array): Promise<number> {
    if (this.closed) return Promise.reject(new Deno.errors.BadResource("closed"));
    return Promise.resolve(p.length);
  }

  close(): void {
    this.closed = true;
    const pending = this.#pending;
    this.#pending = null;
    pending?.resolve(null);
  }
}

Deno.test("shutdown() ends when a request completes just as a new one arrives (every waiter is woken)", async () => {
  // Three parties wait for requests to end: the reader (for room), run()'s drain and stop()'s
  // drain. When they shared one waiter slot, stop()'s drain re-parking after a completion could
  // overwrite run()'s (the client had sent one more request meanwhile): run() waited for ever,
  // the socket closed but serve() and shutdown() never resolved.
  // Two gated WRITEs in flight, shutdown(), then WRITE 1 completes and a FLUSH (or DISC) arrives
  // `k` microtasks apart; every spacing must let shutdown() finish.
  const settle = async () => {
    for (let i = 0; i < 5; i++) await new Promise((resolve) => setTimeout(resolve, 0));
  };
  const hung: string[] = [];
  for (const order of ["completion first", "request first"] as const) {
    for (let k = 0; k < 16; k++) {
      const node = await rawNode(MiB);
      const gates: Array<() => void> = [];
      const write = node.write.bind(node);
      node.write = async (offset, src, opts) => {
        await new Promise<void>((resolve) => gates.push(resolve));
        await write(offset, src, opts);
      };
      const server = new NbdServer([exportOf("disk", node)], { maxConnections: 0, log: () => {} });
      const stream = new MemoryStream();
      const serving = server.serve(stream, "memory client");
      stream.push(new P.WireWriter().u32(P.NBD_FLAG_C_FIXED_NEWSTYLE).done());
      stream.push(optionBytes(P.NBD_OPT_GO, infoData("disk")));
      await settle();
      for (const i of [0, 1]) {
        stream.push(P.encodeRequest(P.NBD_CMD_WRITE, 0, BigInt(i + 1), i * 512, 512));
        stream.push(pattern(512, i));
      }
      await settle();
      assert.equal(gates.length, 2, "two WRITEs in flight");
      let stopped = false;
      const stopping = server.shutdown().then(() => stopped = true);
      const last = P.encodeRequest(P.NBD_CMD_FLUSH, 0, 3n, 0, 0);
      if (order === "completion first") {
        gates[0]!();
        for (let i = 0; i < k; i++) await null;
        stream.push(last);
      } else {
        stream.push(last);
        for (let i = 0; i < k; i++) await null;
        gates[0]!();
      }
      await settle();
      gates[1]!();
      await settle();
      if (!stopped) hung.push(`${order}, k=${k} (stream closed: ${stream.closed})`);
      else await serving;
      void stopping;
      await node.close();
    }
  }
  assert.deepEqual(hung, [], "shutdown() never resolved");
});

Deno.test("nbd hostile: a client that sends 256 READs of 1 MiB and never reads a reply holds at most its budget; others are served", async () => {
  const node = await rawNode(8 * MiB, pattern(8 * MiB, 5));
  await withServer([exportOf("disk", node)], async (h) => {
    const greedy = await h.open("disk");
    const before = Deno.memoryUsage().rss;
    // Sent as fast as the socket takes them (headers: they all fit in its buffer); the server
    // stops reading them once its budget is full.
    const flood = (async () => {
      for (let i = 0; i < 256; i++) {
        if (!await greedy.trySend(P.encodeRequest(P.NBD_CMD_READ, 0, BigInt(i + 1), 0, MiB))) {
          return;
        }
      }
    })();
    await new Promise((resolve) => setTimeout(resolve, 500));
    // Another client is served meanwhile.
    const other = await h.open("disk");
    ok(await other.simple(P.NBD_CMD_WRITE, 0, 0, 4096, pattern(4096, 9)));
    const r = await other.simple(P.NBD_CMD_READ, 0, 0, 4096);
    ok(r);
    assert.deepEqual(r.data, pattern(4096, 9));
    const grown = Deno.memoryUsage().rss - before;
    // Unbounded, the server would hold 256 MiB of replies (measured: 242 MiB); within its
    // 16 requests and 64 MiB per connection it grows by about 16 MiB here.
    assert.ok(grown < 128 * MiB, `memory grew by ${Math.round(grown / MiB)} MiB`);
    // The greedy client leaves; its requests in flight end with it and nothing is left behind.
    greedy.close();
    await flood;
  });
});

Deno.test("WRITE_ZEROES with FAST_ZERO: whole qcow2 clusters are zeroed by flag, anything that would write data gets ENOTSUP at once and is left alone", async () => {
  const node = await qcow2Node();
  await withServer([exportOf("disk", node)], async (h) => {
    const c = await h.open("disk", { structured: true });
    assert.equal(c.flags & P.NBD_FLAG_SEND_FAST_ZERO, P.NBD_FLAG_SEND_FAST_ZERO);
    const cs = 65536;
    structuredOk(
      await c.structuredCall(P.NBD_CMD_WRITE, 0, 0, 2 * cs, pattern(2 * cs, 3)),
    );
    // Half a cluster: zeroing it means writing zero data, so it is refused and nothing changes.
    structuredError(
      await c.structuredCall(P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_FAST_ZERO, 0, cs / 2),
      P.NBD_ENOTSUP,
    );
    const kept = new Uint8Array(cs / 2);
    await node.read(0, kept);
    assert.deepEqual(kept, pattern(2 * cs, 3).subarray(0, cs / 2));
    // A whole cluster, with and without NO_HOLE: a zero flag.
    for (
      const flags of [P.NBD_CMD_FLAG_FAST_ZERO, P.NBD_CMD_FLAG_FAST_ZERO | P.NBD_CMD_FLAG_NO_HOLE]
    ) {
      structuredOk(await c.structuredCall(P.NBD_CMD_WRITE_ZEROES, flags, cs, cs));
      const z = new Uint8Array(cs).fill(1);
      await node.read(cs, z);
      assert.deepEqual(z, new Uint8Array(cs));
    }
  });
});

Deno.test("WRITE_ZEROES with FAST_ZERO on a raw file: a punched or zeroed range (fallocate), no data written", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vstor_fastzero_", dir: "/var/tmp" });
  try {
    const path = `${dir}/disk.raw`;
    await Deno.writeFile(path, pattern(MiB, 4));
    const node = await RawNode.open(openHostFile(path, {}));
    await withServer([exportOf("disk", node)], async (h) => {
      const c = await h.open("disk");
      for (
        const flags of [P.NBD_CMD_FLAG_FAST_ZERO, P.NBD_CMD_FLAG_FAST_ZERO | P.NBD_CMD_FLAG_NO_HOLE]
      ) {
        ok(await c.simple(P.NBD_CMD_WRITE_ZEROES, flags, 65536, 65536));
      }
      const r = await c.simple(P.NBD_CMD_READ, 0, 0, 3 * 65536);
      ok(r);
      assert.deepEqual(r.data.subarray(65536, 2 * 65536), new Uint8Array(65536));
      assert.deepEqual(r.data.subarray(0, 65536), pattern(MiB, 4).subarray(0, 65536));
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
