/**
 * The vhost-user session (src/serve/vhost_user/session.ts) driven message by message as QEMU
 * drives it, through the wire codec (encode → parseHeader → decodeRequest), with a platform that
 * hands the session the test's own guest memory: feature and protocol-feature negotiation, the
 * memory table with front-end virtual addresses, ring setup, GET_CONFIG, I/O through virtio-blk
 * with the call fd signalled, GET_VRING_BASE, a new memory table under started rings, reset; and
 * the hostile cases — short payloads, wrong fd counts, unknown requests, features not offered,
 * rings outside memory, overlapping regions — each a VhostUserProtocolError naming the request.
 */
import assert from "node:assert/strict";
import { RawNode } from "../../formats/raw.ts";
import type { WriteOptions } from "../../src/block/node.ts";
import { CountingNode } from "../devices/blk_harness.ts";
import { VirtioBlkBackend } from "../../src/devices/virtio_blk_backend.ts";
import { VirtioBlkModel } from "../../src/devices/virtio_blk_model.ts";
import { MemoryFile } from "../../src/host/memory.ts";
import {
  decodeRequest,
  encodeRegion,
  encodeRequest,
  F_PROTOCOL_FEATURES,
  HEADER_BYTES,
  type MemoryRegion,
  parseHeader,
  PF,
  REQ,
  VhostUserProtocolError,
} from "../../src/serve/vhost_user/protocol.ts";
import {
  type MappedRegion,
  SUPPORTED_PROTOCOL_FEATURES,
  VhostUserSession,
} from "../../src/serve/vhost_user/session.ts";
import {
  hasFeature,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
} from "../../src/virtio/features.ts";
import { queueFeaturesOf } from "../../src/virtio/device.ts";
import { GuestMemory } from "../../src/virtio/memory.ts";
import { SplitDriverQueue, splitRingLayout } from "../../src/virtio/split_queue.ts";
import { PackedDriverQueue, packedRingLayout } from "../../src/virtio/packed_queue.ts";
import { config, memTable, state, u64, vringAddr } from "./payloads.ts";
import {
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from "../../src/virtio/virtio_blk_constants.ts";

/** QEMU maps guest RAM somewhere high in its own address space. */
const VA = 0x7f12_3400_0000;
const RAM: MemoryRegion[] = [
  { guestAddress: 0, size: 1 << 20, userAddress: VA, mmapOffset: 0 },
  { guestAddress: 1 << 20, size: 4 << 20, userAddress: VA + (8 << 20), mmapOffset: 1 << 20 },
];

/** A platform over the test's own memory: records what the session asks of it. */
class FakePlatform {
  readonly mem = new GuestMemory(RAM.map((r) => ({ gpa: r.guestAddress, size: r.size })));
  readonly mapped: MappedRegion[][] = [];
  readonly unmapped: GuestMemory[] = [];
  readonly closed: number[] = [];
  readonly watched = new Map<number, number>();
  readonly signals: number[] = [];
  readonly logs: string[] = [];
  mapMemory(regions: readonly MappedRegion[]): GuestMemory {
    this.mapped.push([...regions]);
    return this.mem;
  }
  unmapMemory(mem: GuestMemory): void {
    this.unmapped.push(mem);
  }
  watchKick(index: number, fd: number): void {
    if (fd < 0) this.watched.delete(index);
    else this.watched.set(index, fd);
  }
  signal(fd: number): void {
    this.signals.push(fd);
  }
  readonly drains: number[] = [];
  drainSoon(index: number): void {
    this.drains.push(index);
  }
  /** Inflight areas by fd (the fake fds start at 500). */
  readonly areas = new Map<number, Uint8Array>();
  #nextFd = 500;
  inflightMemory(size: number, fd?: number, offset = 0) {
    let bytes: Uint8Array;
    if (fd === undefined) {
      fd = this.#nextFd++;
      bytes = new Uint8Array(size);
      this.areas.set(fd, bytes);
    } else {
      const area = this.areas.get(fd);
      if (area === undefined || offset + size > area.length) throw new Error(`no area ${fd}`);
      bytes = area.subarray(offset, offset + size);
    }
    return { fd, bytes, release: () => {} };
  }
  closeFd(fd: number): void {
    this.closed.push(fd);
  }
  log(line: string): void {
    this.logs.push(line);
  }
}

/** Sends one request through the codec; the reply payload (after its header), if any. */
async function send(
  s: VhostUserSession,
  request: number,
  payload: Uint8Array = new Uint8Array(0),
  fds: number[] = [],
  needReply = false,
): Promise<Uint8Array | undefined> {
  const wire = encodeRequest(request, payload, needReply);
  const header = parseHeader(wire);
  const req = decodeRequest(header, wire.subarray(HEADER_BYTES, HEADER_BYTES + header.size), fds);
  const out = await s.handle(header, req);
  if (out.reply === undefined) return undefined;
  const back = new DataView(out.reply.buffer);
  assert.equal(back.getUint32(0, true), request, "the reply names the request");
  assert.equal(back.getUint32(4, true), 0x5, "version 1 with the reply flag");
  return out.reply.subarray(HEADER_BYTES);
}

async function blkSession(numQueues = 1) {
  const bytes = new Uint8Array(1 << 20).map((_, i) => (i * 7 + 1) & 0xff);
  const node = await RawNode.open(new MemoryFile("disk", bytes));
  const model = new VirtioBlkModel({ numQueues }, node);
  const backend = new VirtioBlkBackend(node, model.options, model.shared);
  const platform = new FakePlatform();
  const session = new VhostUserSession(model, backend, platform);
  return { session, platform, node, bytes };
}

/** QEMU's start sequence for ring 0 (size 128) at guest address 0x1000; the driver side. */
async function startRing(s: VhostUserSession, p: FakePlatform, features: bigint) {
  const layout = splitRingLayout(128, 0x1000);
  await send(s, REQ.SET_VRING_NUM, state(0, 128));
  await send(s, REQ.SET_VRING_BASE, state(0, 0));
  await send(
    s,
    REQ.SET_VRING_ADDR,
    vringAddr(0, VA + layout.desc, VA + layout.device, VA + layout.driver),
  );
  await send(s, REQ.SET_VRING_CALL, u64(0), [21]);
  await send(s, REQ.SET_VRING_KICK, u64(0), [20]);
  await send(s, REQ.SET_VRING_ENABLE, state(0, 1));
  return new SplitDriverQueue<number>(p.mem, layout, queueFeaturesOf(features));
}

async function negotiate(s: VhostUserSession): Promise<bigint> {
  const offered = new DataView((await send(s, REQ.GET_FEATURES))!.slice().buffer).getBigUint64(
    0,
    true,
  );
  assert.ok(hasFeature(offered, F_PROTOCOL_FEATURES));
  assert.ok(hasFeature(offered, VIRTIO_F_VERSION_1));
  await send(s, REQ.SET_FEATURES, u64(offered));
  const pf = new DataView((await send(s, REQ.GET_PROTOCOL_FEATURES))!.slice().buffer).getBigUint64(
    0,
    true,
  );
  assert.equal(pf, SUPPORTED_PROTOCOL_FEATURES);
  await send(s, REQ.SET_PROTOCOL_FEATURES, u64(pf));
  await send(s, REQ.SET_OWNER);
  await send(s, REQ.SET_MEM_TABLE, memTable(RAM), [10, 11]);
  return offered;
}

Deno.test("vhost-user session: QEMU's start sequence, a write and a read through virtio-blk, GET_VRING_BASE", async () => {
  const { session, platform, bytes, node } = await blkSession();
  const features = await negotiate(session);
  assert.deepEqual(platform.mapped[0]!.map((r) => r.fd), [10, 11]);
  // GET_CONFIG: virtio-blk's capacity in sectors.
  const cfg = (await send(session, REQ.GET_CONFIG, config(0, 8)))!;
  assert.equal(new DataView(cfg.buffer, cfg.byteOffset).getBigUint64(12, true), 2048n);
  const driver = await startRing(session, platform, features);
  assert.equal(platform.watched.get(0), 20);
  assert.deepEqual(session.servedRings, [0]);
  assert.deepEqual(platform.drains, [0], "a ring that becomes served is drained once");
  const mem = platform.mem;
  // A write of 4 KiB at sector 8, then a read of it back, at guest addresses above 1 MiB.
  const hdr = 0x10_0000, data = 0x10_1000, status = 0x10_3000, readBuf = 0x10_4000;
  mem.setU32(hdr, VIRTIO_BLK_T_OUT);
  mem.setU32(hdr + 8, 8);
  mem.write(data, new Uint8Array(4096).fill(0x5a));
  driver.add([{ addr: hdr, length: 16 }, { addr: data, length: 4096 }], [{
    addr: status,
    length: 1,
  }], 1);
  mem.setU32(hdr + 16, VIRTIO_BLK_T_IN);
  mem.setU32(hdr + 24, 8);
  driver.add([{ addr: hdr + 16, length: 16 }], [{ addr: readBuf, length: 4096 }, {
    addr: status + 1,
    length: 1,
  }], 2);
  driver.kick();
  await session.kick(0);
  const used: number[] = [];
  for (let u = driver.getUsed(); u !== null; u = driver.getUsed()) used.push(u.token);
  assert.deepEqual(used.sort(), [1, 2]);
  assert.equal(mem.u8(status), VIRTIO_BLK_S_OK);
  assert.equal(mem.u8(status + 1), VIRTIO_BLK_S_OK);
  assert.deepEqual(mem.slice(readBuf, 4096), new Uint8Array(4096).fill(0x5a));
  assert.ok(platform.signals.length >= 1 && platform.signals.every((fd) => fd === 21));
  const onDisk = new Uint8Array(4096);
  await node.read(8 * 512, onDisk);
  assert.deepEqual(onDisk, new Uint8Array(4096).fill(0x5a), "the write reached the image");
  // Stopping the ring answers the next avail index, closes the kick fd and stops serving.
  const base = (await send(session, REQ.GET_VRING_BASE, state(0, 0)))!;
  assert.deepEqual([...base], [...state(0, 2)]);
  assert.ok(platform.closed.includes(20));
  assert.equal(platform.watched.has(0), false);
  assert.deepEqual(session.servedRings, []);
  // Restarted from that base (SeaBIOS → Linux does this), the ring serves the next request.
  await send(session, REQ.SET_VRING_BASE, state(0, 2));
  await send(session, REQ.SET_VRING_KICK, u64(0), [22]);
  mem.setU32(hdr + 32, VIRTIO_BLK_T_IN);
  mem.setU32(hdr + 40, 0);
  driver.add([{ addr: hdr + 32, length: 16 }], [{ addr: readBuf, length: 512 }, {
    addr: status + 2,
    length: 1,
  }], 3);
  driver.kick();
  await session.kick(0);
  assert.equal(driver.getUsed()?.token, 3);
  assert.deepEqual(mem.slice(readBuf, 512), bytes.subarray(0, 512));
  await session.close();
  assert.ok(
    platform.closed.includes(10) && platform.closed.includes(11) && platform.closed.includes(21),
  );
});

Deno.test("vhost-user session: REPLY_ACK acknowledges requests that asked for it", async () => {
  const { session } = await blkSession();
  await negotiate(session);
  const ack = await send(session, REQ.SET_VRING_NUM, state(0, 64), [], true);
  assert.deepEqual([...ack!], [...u64(0)]);
  assert.equal(await send(session, REQ.SET_VRING_NUM, state(0, 64)), undefined);
});

Deno.test("vhost-user session: GET_QUEUE_NUM, GET_MAX_MEM_SLOTS and ADD/REM_MEM_REG", async () => {
  const { session, platform } = await blkSession(2);
  await negotiate(session);
  const queues = (await send(session, REQ.GET_QUEUE_NUM))!;
  assert.equal(new DataView(queues.slice().buffer).getBigUint64(0, true), 2n);
  const slots = (await send(session, REQ.GET_MAX_MEM_SLOTS))!;
  assert.ok(new DataView(slots.slice().buffer).getBigUint64(0, true) >= 8n);
  const extra = {
    guestAddress: 16 << 20,
    size: 1 << 20,
    userAddress: VA + (64 << 20),
    mmapOffset: 0,
  };
  await send(session, REQ.ADD_MEM_REG, encodeRegion(extra), [30]);
  assert.deepEqual(platform.mapped.at(-1)!.map((r) => r.fd), [10, 11, 30]);
  await send(session, REQ.REM_MEM_REG, encodeRegion(extra));
  assert.deepEqual(platform.mapped.at(-1)!.map((r) => r.fd), [10, 11]);
  assert.ok(platform.closed.includes(30));
  await assert.rejects(
    send(session, REQ.REM_MEM_REG, encodeRegion(extra)),
    /REM_MEM_REG: no region at guest address 0x1000000/,
  );
});

Deno.test("vhost-user session: hostile front-ends get a protocol error naming the request", async () => {
  const { session, platform } = await blkSession();
  const bad = (p: Promise<unknown>, re: RegExp) =>
    assert.rejects(p, (e) => e instanceof VhostUserProtocolError && re.test(e.message));
  // Codec: short payloads, fd counts, unknown requests, a reply flag, a huge size.
  await bad(
    send(session, REQ.SET_FEATURES, new Uint8Array(4)),
    /SET_FEATURES: its u64 needs 8 bytes, got 4/,
  );
  await bad(
    send(session, REQ.SET_VRING_KICK, u64(0)),
    /SET_VRING_KICK: needs one file descriptor, got 0/,
  );
  await bad(
    send(session, REQ.SET_MEM_TABLE, memTable(RAM), [10]),
    /2 regions but 1 file descriptor/,
  );
  await bad(send(session, REQ.SET_MEM_TABLE, memTable([]), []), /0 regions \(1 to 8\)/);
  await bad(send(session, 99), /request 99: not supported/);
  await bad(send(session, REQ.GET_FEATURES, new Uint8Array(0), [5]), /unexpected file descriptor/);
  const reply = encodeRequest(REQ.GET_FEATURES, new Uint8Array(0));
  reply[4] = 0x5;
  assert.throws(() => parseHeader(reply), /reply flag/);
  const huge = encodeRequest(REQ.GET_FEATURES, new Uint8Array(0));
  new DataView(huge.buffer).setUint32(8, 1 << 20, true);
  assert.throws(() => parseHeader(huge), /payload of 1048576 bytes/);
  const badVersion = encodeRequest(REQ.GET_FEATURES, new Uint8Array(0));
  badVersion[4] = 0x2;
  assert.throws(() => parseHeader(badVersion), /unsupported protocol version 2/);
  // Session: features not offered, rings that do not exist or sit outside memory, overlaps.
  await bad(
    send(session, REQ.SET_FEATURES, u64(1n << 60n)),
    /features 0x1000000000000000 not offered/,
  );
  await bad(
    send(session, REQ.SET_PROTOCOL_FEATURES, u64(1n << BigInt(PF.PAGEFAULT))),
    /protocol features 0x100 not offered/,
  );
  await bad(send(session, REQ.SET_VRING_NUM, state(3, 64)), /ring 3 does not exist/);
  await bad(send(session, REQ.SET_VRING_NUM, state(0, 100)), /size 100 \(a power of 2 up to/);
  await bad(send(session, REQ.SET_VRING_KICK, u64(0), [40]), /started before SET_MEM_TABLE/);
  assert.equal(platform.closed.includes(40), false, "a refused request's fd is the caller's");
  await bad(
    send(session, REQ.SET_MEM_TABLE, memTable([RAM[0]!, { ...RAM[1]!, guestAddress: 4096 }]), [
      1,
      2,
    ]),
    /regions overlap at guest address 0x1000/,
  );
  assert.ok(!platform.closed.includes(1) && !platform.closed.includes(2), "the caller's to close");
  await send(session, REQ.SET_MEM_TABLE, memTable(RAM), [10, 11]);
  await send(session, REQ.SET_VRING_NUM, state(0, 64));
  await send(session, REQ.SET_VRING_ADDR, vringAddr(0, 0x1000, 0x3000, 0x2000));
  await bad(
    send(session, REQ.SET_VRING_KICK, u64(0), [41]),
    /ring 0's descriptor table at 0x1000 is in no memory region/,
  );
  // A ring that straddles two regions (guest-physically adjacent, apart in the front-end).
  await send(
    session,
    REQ.SET_VRING_ADDR,
    vringAddr(0, VA + (1 << 20) - 512, VA + 0x3000, VA + 0x2000),
  );
  await bad(send(session, REQ.SET_VRING_KICK, u64(0), [42]), /ring 0/);
  await bad(send(session, REQ.GET_CONFIG, config(0, 8)), /CONFIG was not negotiated/);
  await bad(send(session, REQ.GET_CONFIG, config(250, 10)), /config access of 10 bytes at 250/);
  assert.equal(hasFeature(session.features, VIRTIO_RING_F_EVENT_IDX), false);
});

/** A node whose writes hang for ever while `hold` is set (a back-end that dies mid-request). */
class HoldingNode extends CountingNode {
  hold = false;
  started = 0;
  /** Sectors whose writes hang even while `hold` is off. */
  readonly holdSectors = new Set<number>();
  override write(offset: number, src: Uint8Array, opts?: WriteOptions): Promise<void> {
    this.started++;
    if (this.hold || this.holdSectors.has(offset / 512)) return new Promise<void>(() => {});
    return super.write(offset, src, opts);
  }
}

function holdingNode(inner: RawNode) {
  const node = new HoldingNode(inner);
  return { node, control: node };
}

function inflightDesc(numQueues: number, queueSize: number): Uint8Array {
  const b = new Uint8Array(20);
  const v = new DataView(b.buffer);
  v.setUint16(16, numQueues, true);
  v.setUint16(18, queueSize, true);
  return b;
}

/**
 * QEMU starting ring 0 with inflight tracking: a new area (GET_INFLIGHT_FD: its fd and size) or
 * the one it kept from an earlier back-end (SET_INFLIGHT_FD), then the ring at `base`.
 */
async function startTracked(s: VhostUserSession, o: {
  features: bigint;
  size: number;
  base: number;
  layout: { desc: number; driver: number; device: number };
  inflightFd: number | null;
}): Promise<{ fd: number; mmapSize?: number }> {
  await send(s, REQ.GET_FEATURES);
  await send(s, REQ.SET_FEATURES, u64(o.features));
  await send(s, REQ.SET_PROTOCOL_FEATURES, u64(SUPPORTED_PROTOCOL_FEATURES));
  const desc = inflightDesc(1, o.size);
  let fd: number, mmapSize: number | undefined;
  if (o.inflightFd === null) {
    const header = parseHeader(encodeRequest(REQ.GET_INFLIGHT_FD, desc));
    const reply = await s.handle(header, decodeRequest(header, desc, []));
    fd = reply.fds![0]!;
    const v = new DataView(reply.reply!.buffer, reply.reply!.byteOffset + HEADER_BYTES);
    mmapSize = Number(v.getBigUint64(0, true));
  } else {
    fd = o.inflightFd;
    new DataView(desc.buffer).setBigUint64(0, BigInt(32 + o.size * 32 + 32), true);
    await send(s, REQ.SET_INFLIGHT_FD, desc, [fd]);
  }
  await send(s, REQ.SET_MEM_TABLE, memTable(RAM), [10, 11]);
  await send(s, REQ.SET_VRING_NUM, state(0, o.size));
  await send(s, REQ.SET_VRING_BASE, state(0, o.base));
  const { layout } = o;
  await send(
    s,
    REQ.SET_VRING_ADDR,
    vringAddr(0, VA + layout.desc, VA + layout.device, VA + layout.driver),
  );
  await send(s, REQ.SET_VRING_KICK, u64(0), [20]);
  await send(s, REQ.SET_VRING_ENABLE, state(0, 1));
  return mmapSize === undefined ? { fd } : { fd, mmapSize };
}

Deno.test("vhost-user inflight tracking: after a back-end dies mid-I/O, the next one resubmits exactly what never completed", async () => {
  const platform = new FakePlatform();
  const disk = await RawNode.open(new MemoryFile("disk", new Uint8Array(1 << 20)));
  const layout = splitRingLayout(128, 0x1000);
  const mem = platform.mem;
  const hdr = 0x10_0000, status = 0x10_8000;
  /** A 4 KiB write of `fill` at sector `sector`, with token `token`. */
  const write = (driver: SplitDriverQueue<number>, token: number, sector: number, fill: number) => {
    const h = hdr + 16 * token, data = 0x20_0000 + 4096 * token;
    mem.setU32(h, VIRTIO_BLK_T_OUT);
    mem.setU32(h + 8, sector);
    mem.fill(data, 4096, fill);
    driver.add([{ addr: h, length: 16 }, { addr: data, length: 4096 }], [{
      addr: status + token,
      length: 1,
    }], token);
  };
  const start = async (s: VhostUserSession, inflightFd: number | null) => {
    const r = await startTracked(s, {
      features: 1n << 32n | 1n << 30n,
      size: 128,
      base: 0,
      layout,
      inflightFd,
    });
    // Room for a packed ring's region (QEMU may ask before SET_FEATURES tells which it is).
    if (inflightFd === null) assert.equal(r.mmapSize, 32 + 128 * 32 + 32, "the packed size");
    return r.fd;
  };
  const driver = new SplitDriverQueue<number>(mem, layout, { indirect: false, eventIdx: false });
  // The first back-end: request 1 completes, then 2 and 3 hang at the disk and it dies.
  const first = holdingNode(disk);
  const model1 = new VirtioBlkModel({}, first.node);
  const session1 = new VhostUserSession(
    model1,
    new VirtioBlkBackend(first.node, model1.options, model1.shared),
    platform,
  );
  const fd = await start(session1, null);
  write(driver, 1, 0, 0x11);
  driver.kick();
  await session1.kick(0);
  assert.deepEqual([driver.getUsed()?.token], [1]);
  first.control.hold = true;
  // Far apart: virtio-blk would merge adjacent writes into one node request.
  write(driver, 2, 40, 0x22);
  write(driver, 3, 80, 0x33);
  driver.kick();
  await session1.kick(0);
  assert.equal(first.control.started, 3);
  assert.equal(driver.getUsed(), null, "2 and 3 never complete: the back-end is gone");
  // The next back-end takes the front-end's inflight area back and resubmits 2 and 3 only.
  const second = holdingNode(disk);
  const model2 = new VirtioBlkModel({}, second.node);
  const session2 = new VhostUserSession(
    model2,
    new VirtioBlkBackend(second.node, model2.options, model2.shared),
    platform,
  );
  await start(session2, fd);
  assert.ok(platform.logs.some((l) => /ring 0: resubmitting 2 request\(s\)/.test(l)));
  await session2.kick(0);
  const used: number[] = [];
  for (let u = driver.getUsed(); u !== null; u = driver.getUsed()) used.push(u.token);
  assert.deepEqual(used.sort(), [2, 3]);
  assert.equal(second.control.started, 2, "nothing written twice");
  // New requests go on from where the ring is.
  write(driver, 4, 120, 0x44);
  driver.kick();
  await session2.kick(0);
  assert.equal(driver.getUsed()?.token, 4);
  for (const [sector, fill] of [[0, 0x11], [40, 0x22], [80, 0x33], [120, 0x44]]) {
    const got = new Uint8Array(4096);
    await disk.read(sector! * 512, got);
    assert.deepEqual(got, new Uint8Array(4096).fill(fill!), `sector ${sector}`);
  }
});

Deno.test("vhost-user inflight tracking, packed ring: a chain whose slot a later completion overwrote is resubmitted from the area, and the ring's position comes from it, not from QEMU's stale base", async () => {
  const platform = new FakePlatform();
  const disk = await RawNode.open(new MemoryFile("disk", new Uint8Array(1 << 20)));
  const layout = packedRingLayout(8, 0x1000);
  const mem = platform.mem;
  const features = 1n << 34n | 1n << 32n | 1n << 30n | 1n << 28n; // packed, v1, protocol, indirect
  const write = (
    driver: PackedDriverQueue<number>,
    token: number,
    sector: number,
    fill: number,
  ) => {
    const h = 0x10_0000 + 16 * token, data = 0x20_0000 + 4096 * token, status = 0x10_8000 + token;
    mem.setU32(h, VIRTIO_BLK_T_OUT);
    mem.setU32(h + 8, sector);
    mem.fill(data, 4096, fill);
    // Token 2 goes through an indirect table: one ring slot.
    const table = token === 2 ? 0x30_0000 : undefined;
    driver.add(
      [{ addr: h, length: 16 }, { addr: data, length: 4096 }],
      [{
        addr: status,
        length: 1,
      }],
      token,
      table,
    );
  };
  // After a crash QEMU has no better base for a packed ring than the one it had at the start.
  const start = async (s: VhostUserSession, inflightFd: number | null) =>
    (await startTracked(s, { features, size: 8, base: 0x8000_8000, layout, inflightFd })).fd;
  const driver = new PackedDriverQueue<number>(mem, layout, queueFeaturesOf(features));
  const session = (node: HoldingNode) => {
    const model = new VirtioBlkModel({ packed: true }, node);
    return new VhostUserSession(
      model,
      new VirtioBlkBackend(node, model.options, model.shared),
      platform,
    );
  };
  const first = new HoldingNode(disk);
  const session1 = session(first);
  const fd = await start(session1, null);
  // Token 1 (slots 0–2) completes. Token 2 (slot 3, indirect) hangs at the disk; token 3
  // (slots 4–6) completes, and its used descriptor goes to slot 3, over token 2's.
  write(driver, 1, 0, 0x11);
  driver.kick();
  await session1.kick(0);
  assert.equal(driver.getUsed()?.token, 1);
  first.holdSectors.add(40);
  write(driver, 2, 40, 0x22);
  write(driver, 3, 80, 0x33);
  driver.kick();
  await session1.kick(0);
  assert.equal(driver.getUsed()?.token, 3);
  assert.equal(driver.getUsed(), null, "2 never completes: the back-end is gone");
  // The next back-end: token 2 again, from the area, and the ring goes on at slot 7.
  const second = new HoldingNode(disk);
  const session2 = session(second);
  await start(session2, fd);
  assert.ok(platform.logs.some((l) => /ring 0: resubmitting 1 request\(s\)/.test(l)));
  await session2.kick(0);
  assert.equal(driver.getUsed()?.token, 2);
  assert.equal(second.started, 1, "nothing written twice");
  // A new request takes slots 7, 0 and 1: the ring wraps where the area said it stood.
  write(driver, 4, 120, 0x44);
  driver.kick();
  await session2.kick(0);
  assert.equal(driver.getUsed()?.token, 4);
  const base = await session2.handle(
    parseHeader(encodeRequest(REQ.GET_VRING_BASE, state(0, 0))),
    decodeRequest(parseHeader(encodeRequest(REQ.GET_VRING_BASE, state(0, 0))), state(0, 0), []),
  );
  const v = new DataView(base.reply!.buffer, base.reply!.byteOffset + HEADER_BYTES);
  // Avail and used both at slot 2 of the next lap: wrap counters 0.
  assert.equal(v.getUint32(4, true), 2 | (2 << 16), "GET_VRING_BASE: where the ring stands");
  for (const [sector, fill] of [[0, 0x11], [40, 0x22], [80, 0x33], [120, 0x44]]) {
    const got = new Uint8Array(4096);
    await disk.read(sector! * 512, got);
    assert.deepEqual(got, new Uint8Array(4096).fill(fill!), `sector ${sector}`);
  }
});

Deno.test("vhost-user session: packed rings — the base carries both wrap counters, GET_VRING_BASE answers where the ring stands", async () => {
  const bytes = new Uint8Array(1 << 20).map((_, i) => (i * 5 + 3) & 0xff);
  const node = await RawNode.open(new MemoryFile("disk", bytes));
  const model = new VirtioBlkModel({ packed: true }, node);
  const platform = new FakePlatform();
  const session = new VhostUserSession(
    model,
    new VirtioBlkBackend(node, model.options, model.shared),
    platform,
  );
  const offered = await negotiate(session);
  assert.ok(hasFeature(offered, VIRTIO_F_RING_PACKED), "offered when the device has it");
  const layout = packedRingLayout(64, 0x1000);
  await send(session, REQ.SET_VRING_NUM, state(0, 64));
  // QEMU's encoding: avail index 0 with wrap 1, used index 0 with wrap 1.
  await send(session, REQ.SET_VRING_BASE, state(0, 0x8000_8000));
  await send(
    session,
    REQ.SET_VRING_ADDR,
    vringAddr(0, VA + layout.desc, VA + layout.device, VA + layout.driver),
  );
  await send(session, REQ.SET_VRING_KICK, u64(0), [20]);
  await send(session, REQ.SET_VRING_ENABLE, state(0, 1));
  const driver = new PackedDriverQueue<number>(platform.mem, layout, queueFeaturesOf(offered));
  const mem = platform.mem;
  const hdr = 0x10_0000, buf = 0x10_1000, status = 0x10_8000;
  for (let i = 0; i < 3; i++) {
    mem.setU32(hdr + 16 * i, VIRTIO_BLK_T_IN);
    mem.setU32(hdr + 16 * i + 8, i * 8);
    driver.add([{ addr: hdr + 16 * i, length: 16 }], [{ addr: buf + 4096 * i, length: 4096 }, {
      addr: status + i,
      length: 1,
    }], i);
  }
  driver.kick();
  await session.kick(0);
  const used: number[] = [];
  for (let u = driver.getUsed(); u !== null; u = driver.getUsed()) used.push(u.token);
  assert.deepEqual(used.sort(), [0, 1, 2]);
  for (let i = 0; i < 3; i++) {
    assert.deepEqual(mem.slice(buf + 4096 * i, 4096), bytes.subarray(4096 * i, 4096 * (i + 1)));
  }
  const base = (await send(session, REQ.GET_VRING_BASE, state(0, 0)))!;
  // Packed indices count descriptor slots: three chains of three descriptors each.
  assert.equal(new DataView(base.slice().buffer).getUint32(4, true), 0x8009_8009);
});

/** A node whose reads wait until `open()`. */
class GatedNode extends CountingNode {
  #gate = Promise.withResolvers<void>();
  open(): void {
    this.#gate.resolve();
  }
  override async read(offset: number, dst: Uint8Array): Promise<void> {
    await this.#gate.promise;
    return await super.read(offset, dst);
  }
}

Deno.test("vhost-user session: enabling another ring waits for the requests in flight, which complete (SeaBIOS's race)", async () => {
  const disk = await RawNode.open(new MemoryFile("disk", new Uint8Array(1 << 20).fill(9)));
  const node = new GatedNode(disk);
  const model = new VirtioBlkModel({ numQueues: 2 }, node);
  const platform = new FakePlatform();
  const session = new VhostUserSession(
    model,
    new VirtioBlkBackend(node, model.options, model.shared),
    platform,
  );
  const features = await negotiate(session);
  const driver = await startRing(session, platform, features);
  const mem = platform.mem;
  mem.setU32(0x10_0000, VIRTIO_BLK_T_IN);
  driver.add([{ addr: 0x10_0000, length: 16 }], [{ addr: 0x10_1000, length: 512 }, {
    addr: 0x10_2000,
    length: 1,
  }], 7);
  driver.kick();
  await session.kick(0);
  // Ring 1 is enabled while ring 0's read waits at the disk.
  let enabled = false;
  const enable = send(session, REQ.SET_VRING_ENABLE, state(1, 1)).then(() => enabled = true);
  await new Promise((resolve) => setTimeout(resolve, 10));
  assert.equal(enabled, false, "the message waits for the request in flight");
  node.open();
  await enable;
  assert.equal(driver.getUsed()?.token, 7, "the read completed, not dropped by the re-activation");
  assert.equal(mem.u8(0x10_2000), VIRTIO_BLK_S_OK);
  assert.deepEqual(mem.slice(0x10_1000, 512), new Uint8Array(512).fill(9));
});

/** QEMU setting ring 0 up again after a reset: features, size, addresses (no kick yet). */
async function ringAfterReset(
  session: VhostUserSession,
  features: bigint,
  layout: { desc: number; driver: number; device: number },
): Promise<void> {
  await send(session, REQ.SET_FEATURES, u64(features));
  await send(session, REQ.SET_VRING_NUM, state(0, 128));
  await send(
    session,
    REQ.SET_VRING_ADDR,
    vringAddr(0, VA + layout.desc, VA + layout.device, VA + layout.driver),
  );
}

/** A 512-byte read of sector 0 (the header at 0x10_0000 says VIRTIO_BLK_T_IN), token `token`. */
function readSector0(driver: SplitDriverQueue<number>, token: number): void {
  driver.add([{ addr: 0x10_0000, length: 16 }], [{ addr: 0x10_1000, length: 512 }, {
    addr: 0x10_2000,
    length: 1,
  }], token);
}

Deno.test("vhost-user session: an interrupt due before the ring has a call fd is delivered when one comes; one due on a call fd kept over a reset is delivered again on the next", async () => {
  const { session, platform } = await blkSession();
  const features = await negotiate(session);
  const layout = splitRingLayout(128, 0x1000);
  // QEMU after a RESET_DEVICE: the ring is set up and enabled, its call fd comes later.
  await send(session, REQ.SET_VRING_CALL, u64(0), [21]);
  await send(session, REQ.RESET_DEVICE);
  assert.equal(platform.closed.includes(21), false, "RESET_DEVICE keeps the call fd");
  await ringAfterReset(session, features, layout);
  await send(session, REQ.SET_VRING_CALL, u64(0), [30]);
  assert.ok(platform.closed.includes(21), "replaced by the new call fd");
  // A ring whose call fd is closed by the front-end (-1 is not allowed: take it away by reset
  // and re-setup with none): model it by a call fd set only after the I/O.
  await send(session, REQ.RESET_DEVICE);
  const driver = new SplitDriverQueue<number>(platform.mem, layout, queueFeaturesOf(features));
  await ringAfterReset(session, features, layout);
  await send(session, REQ.SET_VRING_KICK, u64(0), [31]);
  await send(session, REQ.SET_VRING_ENABLE, state(0, 1));
  platform.signals.length = 0;
  const mem = platform.mem;
  mem.setU32(0x10_0000, VIRTIO_BLK_T_IN);
  readSector0(driver, 1);
  driver.kick();
  await session.kick(0);
  assert.equal(driver.getUsed()?.token, 1);
  assert.deepEqual(platform.signals, [30], "the kept call fd gets the interrupt");
  // QEMU sends the ring's call fd again after enabling it, and no longer reads the old one: the
  // interrupt due since the reset goes to the new fd too; the next one only to the new fd.
  await send(session, REQ.SET_VRING_CALL, u64(0), [32]);
  assert.deepEqual(
    platform.signals,
    [30, 32],
    "the new call fd gets the interrupt a stale one had",
  );
  readSector0(driver, 3);
  driver.kick();
  await session.kick(0);
  assert.equal(driver.getUsed()?.token, 3);
  assert.deepEqual(platform.signals, [30, 32, 32]);
  // A ring that never had a call fd: the interrupt waits for the first one.
  const fresh = await blkSession();
  const f2 = await negotiate(fresh.session);
  await ringAfterReset(fresh.session, f2, layout);
  await send(fresh.session, REQ.SET_VRING_KICK, u64(0), [41]);
  await send(fresh.session, REQ.SET_VRING_ENABLE, state(0, 1));
  const d2 = new SplitDriverQueue<number>(fresh.platform.mem, layout, queueFeaturesOf(f2));
  fresh.platform.mem.setU32(0x10_0000, VIRTIO_BLK_T_IN);
  readSector0(d2, 2);
  d2.kick();
  await fresh.session.kick(0);
  assert.equal(d2.getUsed()?.token, 2);
  assert.deepEqual(fresh.platform.signals, [], "no call fd yet");
  await send(fresh.session, REQ.SET_VRING_CALL, u64(0), [40]);
  assert.deepEqual(fresh.platform.signals, [40], "delivered when the call fd comes");
});
