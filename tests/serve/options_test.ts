/**
 * `vstor serve`'s command line (src/serve/options.ts): qemu-storage-daemon's `--blockdev` and
 * `--export` in keyval (implied keys, dotted keys, `,,`) and JSON, `--pidfile`, `--daemonize`, the
 * short form, and the errors a qsd user would expect, each naming the option and the key.
 */
import assert from "node:assert/strict";
import { resolveNode } from "../../src/serve/blockdev.ts";
import { DEFAULT_POLL } from "../../src/serve/adaptive_poll.ts";
import { parseKeyval, parseServeArgs, ServeUsageError } from "../../src/serve/options.ts";

Deno.test("parseKeyval: implied first key, dotted keys as groups, ,, as a comma", () => {
  assert.deepEqual(
    parseKeyval("qcow2,node-name=n0,file.driver=file,file.filename=a,,b", "driver", "x"),
    {
      driver: "qcow2",
      "node-name": "n0",
      file: { driver: "file", filename: "a,b" },
    },
  );
  assert.throws(
    () => parseKeyval("a=1,a=2", null, "--blockdev 1"),
    /--blockdev 1: parameter 'a' is set more than once/,
  );
  assert.throws(() => parseKeyval("a=1,b", null, "x"), /expected key=value, got 'b'/);
  assert.throws(
    () => parseKeyval("file=x,file.driver=file", null, "x"),
    /'file' is both a value and a group/,
  );
  assert.throws(() => parseKeyval("a..b=1", null, "x"), /invalid key 'a..b'/);
});

Deno.test("qsd's vhost-user-blk command line: qcow2 over a file node, with O_DIRECT and io_uring", () => {
  const config = parseServeArgs([
    "--blockdev",
    "driver=file,node-name=f0,filename=/images/disk.qcow2,cache.direct=on,aio=io_uring",
    "--blockdev",
    "qcow2,node-name=n0,file=f0,backing=null",
    "--export",
    "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/run/vhost.sock,writable=on,num-queues=4,logical-block-size=4096",
    "--pidfile",
    "/run/vstor.pid",
    "--daemonize",
  ]);
  assert.deepEqual(config.blockdevs[0], {
    nodeName: "f0",
    driver: "file",
    filename: "/images/disk.qcow2",
    readOnly: false,
    cacheDirect: true,
    cacheNoFlush: false,
    discard: "ignore",
    detectZeroes: "off",
    aio: "io_uring",
  });
  assert.equal(config.blockdevs[1]!.file, "f0");
  assert.equal(config.blockdevs[1]!.backing, null);
  assert.deepEqual(config.exports[0], {
    type: "vhost-user-blk",
    id: "e0",
    nodeName: "n0",
    writable: true,
    socket: "/run/vhost.sock",
    numQueues: 4,
    logicalBlockSize: 4096,
    poll: DEFAULT_POLL,
  });
  assert.equal(config.pidfile, "/run/vstor.pid");
  assert.equal(config.daemonize, true);
});

Deno.test("--blockdev and --export as JSON, and a nested file node", () => {
  const config = parseServeArgs([
    "--blockdev",
    JSON.stringify({
      driver: "qcow2",
      "node-name": "n0",
      "read-only": true,
      file: { driver: "file", filename: "/x.qcow2" },
    }),
    "--export",
    JSON.stringify({
      type: "vhost-user-scsi",
      id: "s",
      "node-name": "n0",
      addr: { type: "unix", path: "/s.sock" },
      "num-queues": 2,
    }),
  ]);
  const file = config.blockdevs[0]!.file;
  assert.ok(typeof file === "object" && file.filename === "/x.qcow2" && file.driver === "file");
  assert.equal(config.blockdevs[0]!.readOnly, true);
  assert.equal(config.exports[0]!.type, "vhost-user-scsi");
  assert.equal(config.exports[0]!.numQueues, 2);
  assert.equal(config.exports[0]!.writable, false, "qsd's default: read-only exports");
});

Deno.test("the short form: IMAGE --vhost-user-blk SOCK [--writable] [-f FMT]", () => {
  const config = parseServeArgs(["disk.qcow2", "--vhost-user-blk", "/tmp/v.sock", "--writable"]);
  assert.equal(config.exports.length, 1);
  assert.equal(config.exports[0]!.writable, true);
  assert.equal(config.exports[0]!.socket, "/tmp/v.sock");
  assert.equal(config.blockdevs[0]!.probe, true, "the format is probed");
  const file = config.blockdevs[0]!.file;
  assert.ok(typeof file === "object" && file.filename === "disk.qcow2");
  const raw = parseServeArgs(["-f", "raw", "x.img", "--vhost-user-scsi=/tmp/s.sock"]);
  assert.equal(raw.blockdevs[0]!.driver, "raw");
  assert.equal(raw.blockdevs[0]!.probe, undefined);
  assert.equal(raw.exports[0]!.writable, false);
});

Deno.test("--object iothread: an export's polling parameters, as qsd's iothreads take them", () => {
  const file = "--blockdev=driver=file,node-name=f,filename=/x";
  const config = parseServeArgs([
    file,
    "--object",
    "iothread,id=t0,poll-max-ns=0",
    "--object",
    '{"qom-type":"iothread","id":"t1","poll-max-ns":65536,"poll-grow":4,"poll-shrink":2,"aio-max-batch":16}',
    "--export",
    "vhost-user-blk,id=a,node-name=f,addr.path=/a,iothread=t0",
    "--export",
    "vhost-user-blk,id=b,node-name=f,addr.path=/b,iothread=t1",
    "--export",
    "vhost-user-blk,id=c,node-name=f,addr.path=/c",
  ]);
  assert.deepEqual(config.exports.map((e) => e.poll), [
    { maxNs: 0, grow: 0, shrink: 0 },
    { maxNs: 65536, grow: 4, shrink: 2 },
    DEFAULT_POLL,
  ]);
  const bad = (args: string[], re: RegExp) =>
    assert.throws(
      () => parseServeArgs([file, ...args]),
      (e) => e instanceof ServeUsageError && re.test(e.message),
    );
  bad(
    ["--export", "vhost-user-blk,id=a,node-name=f,addr.path=/a,iothread=t9"],
    /no iothread named 't9'/,
  );
  bad(["--object", "secret,id=s0,data=x"], /--object 1: object type 'secret' is not supported/);
  bad(["--object", "iothread,id=t0,poll-max-ns=-1"], /'poll-max-ns' expects a number/);
  bad(["--object", "iothread,id=t0,bogus=1"], /invalid parameter 'bogus'/);
  bad(["--object", "iothread,id=t0", "--object", "iothread,id=t0"], /duplicate object id 't0'/);
});

Deno.test("qsd users' mistakes are named", () => {
  const bad = (args: string[], re: RegExp) =>
    assert.throws(
      () => parseServeArgs(args),
      (e) => e instanceof ServeUsageError && re.test(e.message),
    );
  const file = "--blockdev=driver=file,node-name=f,filename=/x";
  bad([], /nothing to serve/);
  bad(["--blockdev", "driver=file,filename=/x"], /--blockdev 1: parameter 'node-name' is missing/);
  bad(
    ["--blockdev", "driver=vmdk,node-name=a,file=b"],
    /parameter 'driver' expects file, nbd, rbd, raw, qcow2/,
  );
  bad([file, "--blockdev", "qcow2,node-name=q"], /--blockdev 2: parameter 'file' is missing/);
  bad([file, "--blockdev", "qcow2,node-name=q,file=nope"], /no node named 'nope' for its file/);
  bad(["--blockdev", "driver=file,node-name=f,filename=/x,bogus=1"], /invalid parameter 'bogus'/);
  bad(
    ["--blockdev", "driver=file,node-name=f,filename=/x,cache.direct=maybe"],
    /'cache.direct' expects 'on' or 'off'/,
  );
  bad(
    ["--blockdev", "driver=file,node-name=f,filename=/x,aio=native"],
    /aio=native was specified, but it requires cache.direct=on/,
  );
  bad([file, file], /duplicate node name 'f'/);
  bad([file, "--export", "type=fuse,id=e,node-name=f"], /export type 'fuse' is not supported/);
  bad([file, "--export", "vhost-user-blk,id=e,node-name=f"], /parameter 'addr' is missing/);
  bad(
    [file, "--export", "vhost-user-blk,id=e,node-name=g,addr.path=/s"],
    /export 'e': no node named 'g'/,
  );
  bad(
    [file, "--export", "vhost-user-blk,id=e,node-name=f,addr.path=/s,num-queues=0"],
    /'num-queues' expects a number from 1 to 256/,
  );
  bad(
    [file, "--export", "vhost-user-blk,id=e,node-name=f,addr.path=/s,logical-block-size=1000"],
    /'logical-block-size'/,
  );
  bad(
    [file, "--export", "vhost-user-blk,id=e,node-name=f,addr.type=fd,addr.str=3"],
    /addr.type=fd is not supported/,
  );
  bad([
    file,
    "--export",
    "vhost-user-blk,id=e,node-name=f,addr.path=/s",
    "--export",
    "vhost-user-blk,id=e2,node-name=f,addr.path=/s",
  ], /two exports on socket '\/s'/);
  bad(["--export", "{not json"], /--export 1: /);
  bad(["a.img", "b.img", "--vhost-user-blk", "/s"], /serves one IMAGE \(got 2\)/);
  bad(["a.img"], /needs --vhost-user-blk SOCK/);
  bad(["--frobnicate"], /unknown option '--frobnicate'/);
  bad(["--pidfile"], /--pidfile needs an argument/);
});

Deno.test("resolveNode: an export's node as the opener takes it", () => {
  const config = parseServeArgs([
    "--blockdev",
    "driver=file,node-name=f0,filename=/img/a.qcow2,cache.direct=on,aio=native",
    "--blockdev",
    "qcow2,node-name=n0,file=f0,backing=null",
    "--blockdev",
    "driver=file,node-name=f1,filename=/img/b.raw,cache.no-flush=on",
    "--blockdev",
    "driver=raw,node-name=r1,file=f1,read-only=on",
    "--export",
    "vhost-user-blk,id=e0,node-name=n0,addr.path=/s0,writable=on",
  ]);
  assert.deepEqual(resolveNode(config.blockdevs, "n0", true), {
    path: "/img/a.qcow2",
    options: { readOnly: false, cache: "none", format: "qcow2", aio: "io_uring", noBacking: true },
  });
  assert.deepEqual(resolveNode(config.blockdevs, "f1", false), {
    path: "/img/b.raw",
    options: { readOnly: true, cache: "unsafe", format: "raw" },
  });
  assert.throws(
    () => resolveNode(config.blockdevs, "r1", true),
    /'r1' is read-only but the export is writable=on/,
  );
  assert.throws(() => resolveNode(config.blockdevs, "zz", false), /no node named 'zz'/);
  const short = parseServeArgs(["x.img", "--vhost-user-blk", "/s"]);
  assert.deepEqual(resolveNode(short.blockdevs, "image", false).options, {
    readOnly: true,
    cache: "writeback",
  });
});

Deno.test("qsd's NBD command line: --nbd-server (unix, inet) and --export type=nbd", () => {
  const config = parseServeArgs([
    "--blockdev",
    "driver=file,node-name=f0,filename=/images/a.qcow2",
    "--blockdev",
    "qcow2,node-name=n0,file=f0",
    "--nbd-server",
    "addr.type=inet,addr.host=::,addr.port=10809,max-connections=4",
    "--export",
    "type=nbd,id=e0,node-name=n0,writable=on,allocation-depth=on",
    "--export",
    "nbd,id=e1,node-name=f0,name=raw view,description=the file",
  ]);
  assert.deepEqual(config.exports, []);
  assert.deepEqual(config.nbdServer, {
    addr: { type: "inet", host: "::", port: 10809 },
    maxConnections: 4,
  });
  assert.deepEqual(config.nbdExports, [
    {
      type: "nbd",
      id: "e0",
      nodeName: "n0",
      name: "n0",
      writable: true,
      allocationDepth: true,
    },
    {
      type: "nbd",
      id: "e1",
      nodeName: "f0",
      name: "raw view",
      description: "the file",
      writable: false,
      allocationDepth: false,
    },
  ]);
  const withBitmaps = parseServeArgs([
    "--blockdev",
    "driver=file,node-name=f0,filename=/images/a.raw",
    "--nbd-server",
    "addr.type=unix,addr.path=/run/nbd.sock",
    "--export",
    "type=nbd,id=e0,node-name=f0,bitmaps.1=second,bitmaps.0=first",
    "--export",
    JSON.stringify({ type: "nbd", id: "e1", "node-name": "f0", name: "j", bitmaps: ["x"] }),
  ]);
  assert.deepEqual(withBitmaps.nbdExports[0]!.bitmaps, ["first", "second"]);
  assert.deepEqual(withBitmaps.nbdExports[1]!.bitmaps, ["x"]);
  const unix = parseServeArgs([
    "--blockdev",
    "driver=file,node-name=f0,filename=/images/a.raw",
    "--nbd-server",
    "addr.type=unix,addr.path=/run/nbd.sock",
    "--export",
    "type=nbd,id=e0,node-name=f0",
  ]);
  assert.deepEqual(unix.nbdServer, {
    addr: { type: "unix", path: "/run/nbd.sock" },
    maxConnections: 100,
  });
});

Deno.test("the NBD short form: IMAGE --nbd unix:PATH|tcp:HOST:PORT [--export-name NAME]", () => {
  const config = parseServeArgs(["disk.qcow2", "--nbd", "tcp::10810", "--writable"]);
  assert.deepEqual(config.nbdServer, {
    addr: { type: "inet", host: "0.0.0.0", port: 10810 },
    maxConnections: 100,
  });
  assert.equal(config.nbdExports[0]!.name, "");
  assert.equal(config.nbdExports[0]!.writable, true);
  const named = parseServeArgs(["disk.raw", "--nbd", "unix:/tmp/n.sock", "--export-name", "d"]);
  assert.deepEqual(named.nbdServer!.addr, { type: "unix", path: "/tmp/n.sock" });
  assert.equal(named.nbdExports[0]!.name, "d");
  assert.equal(named.nbdExports[0]!.writable, false);
});

Deno.test("NBD mistakes are named", () => {
  const file = ["--blockdev", "driver=file,node-name=f0,filename=/a.raw"];
  const server = ["--nbd-server", "addr.type=unix,addr.path=/n.sock"];
  for (
    const [args, message] of [
      [[...file, "--export", "type=nbd,id=e0,node-name=f0"], /the NBD server is not running/],
      [
        [...file, ...server, "--export", "type=nbd,id=e0,node-name=f0,bitmaps.0=b,bitmaps.1=b"],
        /a bitmap is named twice/,
      ],
      [[...file, ...server, "--export", "type=nbd,id=e0,node-name=f0,bitmaps.x=b"], /list index/],
      [
        [...file, "--nbd-server", "addr.type=unix,addr.path=/n,tls-creds=t"],
        /no tls-creds object named 't'/,
      ],
      [[...file, "--nbd-server", "addr.type=inet,addr.host=h,addr.port=http"], /not a port number/],
      [[...file, "--nbd-server", "addr.type=inet,addr.host=h,addr.port=70000"], /not a port/],
      [[...file, "--nbd-server", "addr.type=fd,addr.str=3"], /addr.type=fd is not supported/],
      [[...file, ...server, ...server], /already given/],
      [
        [
          ...file,
          ...server,
          "--export",
          "type=nbd,id=e0,node-name=f0,name=x",
          "--export",
          "type=nbd,id=e1,node-name=f0,name=x",
        ],
        /two NBD exports named 'x'/,
      ],
      [[...file, ...server, "--export", "type=nbd,id=e0,node-name=zz"], /no node named 'zz'/],
      [["a.raw", "--nbd", "udp:x"], /neither unix:PATH nor tcp:HOST:PORT/],
      [
        [...file, ...server, "--export", "type=nbd,id=e0,node-name=f0,bogus=1"],
        /invalid parameter 'bogus'/,
      ],
    ] as const
  ) {
    assert.throws(() => parseServeArgs([...args]), (e: unknown) => {
      assert.ok(e instanceof ServeUsageError, String(e));
      assert.match(e.message, message);
      return true;
    });
  }
});

Deno.test("--blockdev driver=nbd (QEMU's server.* and export) is a protocol node under raw or qcow2", () => {
  const config = parseServeArgs([
    "--blockdev",
    "driver=nbd,node-name=src,server.type=unix,server.path=/run/a b.sock,export=disk",
    "--blockdev",
    "driver=nbd,node-name=tcp,server.type=inet,server.host=::1,server.port=10810,reconnect-delay=5",
    "--blockdev",
    "qcow2,node-name=q,file=tcp",
    "--nbd-server",
    "addr.type=unix,addr.path=/run/re.sock",
    "--export",
    "type=nbd,id=e0,node-name=src,name=re",
    "--export",
    "type=nbd,id=e1,node-name=q,name=q",
  ]);
  assert.equal(config.blockdevs[0]!.filename, "nbd+unix:///disk?socket=%2Frun%2Fa%20b.sock");
  assert.equal(config.blockdevs[1]!.filename, "nbd://[::1]:10810/");
  assert.deepEqual(resolveNode(config.blockdevs, "src", false), {
    path: "nbd+unix:///disk?socket=%2Frun%2Fa%20b.sock",
    options: { readOnly: true, cache: "writeback", format: "raw" },
  });
  assert.equal(resolveNode(config.blockdevs, "q", false).path, "nbd://[::1]:10810/");
  assert.equal(resolveNode(config.blockdevs, "q", false).options.format, "qcow2");
  assert.deepEqual(resolveNode(config.blockdevs, "q", false).options.nbd, { reconnectDelay: 5 });
  for (
    const [spec, message] of [
      ["driver=nbd,node-name=n", /parameter 'server' is missing/],
      ["driver=nbd,node-name=n,server.type=unix", /'path' is missing|server.path/],
      ["driver=nbd,node-name=n,server.type=inet,server.host=h,server.port=x", /not a port/],
      ["driver=nbd,node-name=n,server.type=unix,server.path=/s,tls-creds=t", /TLS/],
      ["driver=nbd,node-name=n,server.type=unix,server.path=/s,aio=io_uring", /aio/],
    ] as const
  ) {
    assert.throws(() => parseServeArgs(["--blockdev", spec]), message, spec);
  }
});

Deno.test("--object tls-creds-x509 and --nbd-server tls-creds, as qsd takes them", () => {
  const config = parseServeArgs([
    "--object",
    "tls-creds-x509,id=t0,dir=/etc/pki/vstor,endpoint=server",
    "--blockdev",
    "driver=file,node-name=f0,filename=/a.raw",
    "--nbd-server",
    "addr.type=inet,addr.host=::,addr.port=10809,tls-creds=t0",
    "--export",
    "type=nbd,id=e0,node-name=f0",
  ]);
  assert.deepEqual(config.nbdServer!.tls, { id: "t0", dir: "/etc/pki/vstor", verifyPeer: true });
  const off = parseServeArgs([
    "--object",
    "tls-creds-x509,id=t0,dir=/d,endpoint=server,verify-peer=off",
    "--blockdev",
    "driver=file,node-name=f0,filename=/a.raw",
    "--nbd-server",
    "addr.type=unix,addr.path=/s,tls-creds=t0",
    "--export",
    "type=nbd,id=e0,node-name=f0",
  ]);
  assert.equal(off.nbdServer!.tls!.verifyPeer, false);
  const file = ["--blockdev", "driver=file,node-name=f0,filename=/a.raw"];
  for (
    const [args, message] of [
      [
        ["--nbd-server", "addr.type=unix,addr.path=/s,tls-creds=nope"],
        /no tls-creds object named 'nope'/,
      ],
      [["--object", "tls-creds-x509,id=t0,dir=/d,endpoint=client"], /endpoint=server/],
      [["--object", "tls-creds-x509,id=t0,endpoint=server"], /'dir' is missing/],
      [["--nbd-server", "addr.type=unix,addr.path=/s,tls-authz=a"], /tls-authz is not supported/],
      [
        ["--object", "tls-creds-x509,id=x,dir=/d,endpoint=server", "--object", "iothread,id=x"],
        /duplicate object id 'x'/,
      ],
    ] as const
  ) {
    assert.throws(() => parseServeArgs([...file, ...args]), message);
  }
});

Deno.test("--blockdev driver=rbd (QEMU's pool, image, snapshot, conf, user) is an rbd: name under raw or qcow2", () => {
  const config = parseServeArgs([
    "--blockdev",
    "driver=rbd,node-name=r,pool=rbd,image=disk,conf=/etc/ceph/ceph.conf,user=admin",
    "--blockdev",
    "driver=rbd,node-name=s,pool=rbd,image=a:b,snapshot=s1",
    "--blockdev",
    "qcow2,node-name=q,file=r",
    "--nbd-server",
    "addr.type=unix,addr.path=/s",
    "--export",
    "type=nbd,id=e0,node-name=q",
  ]);
  assert.equal(
    config.blockdevs[0]!.filename,
    "rbd:rbd/disk:conf=/etc/ceph/ceph.conf:id=admin",
  );
  assert.equal(config.blockdevs[1]!.filename, "rbd:rbd/a\\:b@s1");
  assert.deepEqual(resolveNode(config.blockdevs, "q", false).options.format, "qcow2");
  assert.equal(resolveNode(config.blockdevs, "r", false).options.format, "raw");
  assert.throws(
    () => parseServeArgs(["--blockdev", "driver=rbd,node-name=r,pool=p"]),
    /'image' is missing/,
  );
  assert.throws(
    () => parseServeArgs(["--blockdev", "driver=rbd,node-name=r,pool=p,image=i,key-secret=k"]),
    /key-secret/,
  );
});
