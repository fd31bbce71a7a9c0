/**
 * `vstor io` against real qemu-io: the same script on two copies of a raw image must print the same
 * lines (timing lines only checked for position), exit the same way and leave the same bytes.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ioMain, qemuIoMain } from "../../src/cli/io.ts";
import { ignoreWithout, runTool } from "./qemu.ts";

const ignore = ignoreWithout("qemu-io");
const MiB = 1 << 20;

/** qemu-io's statistics lines: their numbers are timings, so only their place is compared. */
const TIMING =
  /^\d+(\.\d+)? (bytes|KiB|MiB|GiB|TiB|PiB|EiB), 1 ops; (\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) \(\d+(\.\d+)? (bytes|KiB|MiB|GiB|TiB|PiB|EiB)\/sec and \d+\.\d{4} ops\/sec\)$/;
const MACHINE = /^\d+,1,\d+:\d\d:\d\d\.\d\d,\d+\.\d{3},\d+\.\d{3}$/;

interface Script {
  commands: string[];
  /** Image size; a multiple of 512, since QEMU rounds a raw image's length up to one. */
  size?: number;
  readOnly?: boolean;
  /** Leave the format to probing (no `-f raw`). */
  probe?: boolean;
  /** Feed the commands on stdin instead of as `-c` arguments. */
  stdin?: boolean;
  /** Prepare each image (both get the same treatment). */
  setup?: (path: string) => Promise<void>;
}

interface Outcome {
  code: number;
  stdout: string[];
  stderr: string[];
}

function normalize(text: string, image: string, program: string): string[] {
  const lines = text.replaceAll(image, "IMAGE").replaceAll(`${program}> `, "").split("\n");
  if (lines.at(-1) === "") lines.pop();
  return lines.map((line) =>
    TIMING.test(line)
      ? "<timing>"
      : MACHINE.test(line)
      ? "<machine>"
      : line.replace(/^qemu-io: /, "vstor: ")
  );
}

async function createImage(path: string, size: number): Promise<void> {
  const file = await Deno.open(path, { create: true, write: true, truncate: true });
  await file.truncate(size);
  file.close();
}

/** Run `script` through qemu-io and `vstor io`; assert they agree and return qemu-io's outcome. */
async function compare(script: Script): Promise<Outcome> {
  const dir = await Deno.makeTempDir({ prefix: "vstor_qemu_io_" });
  try {
    const qemuImage = join(dir, "qemu.raw");
    const vstorImage = join(dir, "vstor.raw");
    for (const path of [qemuImage, vstorImage]) {
      await createImage(path, script.size ?? MiB);
      await script.setup?.(path);
    }
    const flags = [...(script.probe ? [] : ["-f", "raw"]), ...(script.readOnly ? ["-r"] : [])];
    const commandArgs = script.stdin ? [] : script.commands.flatMap((c) => ["-c", c]);
    const stdin = script.stdin ? `${script.commands.join("\n")}\n` : undefined;

    const qemu = await runTool("qemu-io", [...flags, ...commandArgs, qemuImage], stdin);
    let stdout = "";
    let stderr = "";
    const code = await ioMain([...flags, ...commandArgs, vstorImage], {
      stdout: (s) => stdout += s,
      stderr: (s) => stderr += s,
      ...(stdin === undefined
        ? {}
        : { stdin: ReadableStream.from([new TextEncoder().encode(stdin)]) }),
    });

    const expected: Outcome = {
      code: qemu.code,
      stdout: normalize(qemu.stdout, qemuImage, "qemu-io"),
      stderr: normalize(qemu.stderr, qemuImage, "qemu-io"),
    };
    const actual: Outcome = {
      code,
      stdout: normalize(stdout, vstorImage, "vstor"),
      stderr: normalize(stderr, vstorImage, "vstor"),
    };
    assert.deepEqual(actual, expected);
    const [qemuBytes, vstorBytes] = await Promise.all([
      Deno.readFile(qemuImage),
      Deno.readFile(vstorImage),
    ]);
    assert.equal(vstorBytes.length, qemuBytes.length, "image sizes differ");
    const differ = vstorBytes.findIndex((b, i) => b !== qemuBytes[i]);
    assert.equal(differ, -1, `images differ first at byte ${differ}`);
    return expected;
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test({
  name: "vstor io prints what qemu-io prints for pattern writes, reads and dumps",
  ignore,
  async fn() {
    const outcome = await compare({
      commands: [
        "write 0 64k",
        "write -P 0xab 64k 64k",
        "read 0 64k",
        "read -P 0xcd 0 64k",
        "read -P 0xcd 64k 512",
        "read -P 0xab -s 512 -l 1k 64k 4k",
        "read -v 65530 40",
        "read -v -q 0 16",
        "write -P 0x41 100 30",
        "read -v 96 40",
        "length",
        "info",
        "flush",
      ],
    });
    assert.equal(outcome.code, 1); // the pattern mismatch
    assert.ok(outcome.stdout.includes("Pattern verification failed at offset 65536, 512 bytes"));
  },
});

Deno.test({
  name: "vstor io zeroes, discards and writes byte ranges exactly as qemu-io does",
  ignore,
  async fn() {
    const outcome = await compare({
      commands: [
        "write -P 0x11 0 1M",
        "write -z 4k 4k",
        "write -z -u 64k 64k",
        "write -z -n 8k 4k",
        "discard 128k 64k",
        "discard 300000 5000",
        "write -P 0x22 3 5",
        "write -P 0x33 1000 3000",
        "write -z 2500 7",
        "read -v 0 16",
        "read -P 0 4k 4k",
        "read -P 0 64k 128k",
        "read -P 0x33 1000 1500",
        "read -P 0 2500 7",
        "read -P 0x33 2507 1493",
        "read -P 0 300000 5000",
        "read -P 0x11 299999 1",
        "write -f 0 512",
        "map",
      ],
    });
    assert.equal(outcome.code, 0);
  },
});

Deno.test({
  name: "vstor io fails out-of-range requests and bad numbers with qemu-io's messages",
  ignore,
  async fn() {
    const outcome = await compare({
      commands: [
        "read 1048320 512",
        "write 1048320 512",
        "write -z 1M 1",
        "discard 1M 1",
        "read 2M 0",
        "read 1M 0",
        "write 1M 0",
        "read 1E 1",
        "read 0x7fffffffffffffff 1",
        "read 0 x",
        "read x 1",
        "read 0 8E",
        "read 0 2G",
        "write 0 2G",
        "write -z -n 0 2G",
        "discard 0 2G",
        "read 1.5 1",
        "read 0 1KiB",
        "read 1.k 0",
        "alloc 0x10k",
        "alloc 1.5k",
        "alloc -1",
        "read -P 300 0 1",
        "read -P x 0 1",
        "write -P 0xcdx 0 1",
        "write -P 012 0 1",
        "read -P 10 0 1",
        "foo",
        "read\t0 1",
      ],
    });
    assert.equal(outcome.code, 1);
  },
});

Deno.test({
  name: "vstor io parses options and argument counts the way qemu-io's getopt does",
  ignore,
  async fn() {
    await compare({
      commands: [
        "read 0 512 -q",
        "read -qv 0 2",
        "read -P0 -q -- 0 1",
        "read -- 0 1",
        "read -q -- -1 1",
        "r -Q 0 1",
        "read 0 1 -P",
        "read 0 -1",
        "read 0 1 2",
        "read -a 0 1",
        "read -l 2 0 5",
        "read -s 600 -P 1 0 512",
        "discard -x 0 1",
        "read 0",
        "length 1",
        "map 1",
        "alloc",
        "alloc 1 2 3",
        "flush 1",
        "info x",
        "help a b",
        "truncate -m off 1M 2",
        "write -u 0 1",
        "write -n 0 1",
        "write -z -P 1 0 1",
        "write -b -z 0 1",
        "write -f -c 0 1",
        "write -c -z 1 1",
        "w -q 0 1",
        "r -q 0 1",
        "d -q 0 1",
      ],
    });
  },
});

Deno.test({
  name: "vstor io reports length, map, alloc and truncate like qemu-io on a raw image",
  ignore,
  async fn() {
    await compare({
      size: 4 * MiB,
      commands: [
        "length",
        "map",
        "alloc 0",
        "alloc 0 4M",
        "alloc 60k 8k",
        "alloc 4095k 8k",
        "alloc 5M",
        "alloc 1088 0",
        "alloc 1056 0",
        "alloc 1048575 0",
        "alloc 0 0",
        "write -q 64k 64k",
        "discard -q 1M 1M",
        "map",
        "truncate 6M",
        "length",
        "truncate 1536",
        "length",
        "map",
        "alloc 0 1M",
        "truncate 3072",
        "t 2M",
        "l",
        "truncate x",
        "truncate -m off x",
        "truncate -m bogus 1M",
        "truncate -m",
        "map",
      ],
    });
  },
});

Deno.test({
  name: "vstor io refuses writes on a read-only image as qemu-io does",
  ignore,
  async fn() {
    const outcome = await compare({
      readOnly: true,
      setup: async (path) => {
        const file = await Deno.open(path, { write: true });
        await file.write(new Uint8Array(512).fill(0x5a));
        file.close();
      },
      commands: [
        "write 0 512",
        "write -z 0 512",
        "discard 0 512",
        "truncate 2M",
        "write -c 0 512",
        "flush",
        "read -P 0x5a 0 512",
        "length",
      ],
    });
    assert.equal(outcome.code, 1);
  },
});

Deno.test({
  name: "vstor io prints qemu-io's help for the commands it implements",
  ignore,
  async fn() {
    await compare({
      commands: [
        "help read",
        "help write",
        "help discard",
        "help alloc",
        "help map",
        "help flush",
        "help truncate",
        "help length",
        "help info",
        "help help",
        "help quit",
        "help r",
        "? w",
        "help q",
        "help foo",
      ],
    });
  },
});

Deno.test({
  name: "vstor io takes commands from stdin like qemu-io and stops at quit",
  ignore,
  async fn() {
    const outcome = await compare({
      stdin: true,
      commands: [
        "write 0 512",
        "read -P 0xcd 0 512",
        "foo",
        "",
        "read 0 x",
        "quit",
        "write 0 1M",
      ],
    });
    assert.equal(outcome.code, 1);
  },
});

Deno.test({
  name: "vstor io exits like qemu-io when quit follows or precedes a failure",
  ignore,
  async fn() {
    assert.equal((await compare({ commands: ["read 2M 1", "quit", "read 0 1"] })).code, 1);
    assert.equal((await compare({ commands: ["quit", "read 2M 1"] })).code, 0);
    assert.equal((await compare({ commands: ["q 1 2", "read 2M 1"] })).code, 0);
  },
});

Deno.test({
  name: "vstor io matches qemu-io for -C statistics, VM state, compression and -s source files",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_qemu_io_src_" });
    try {
      const source = join(dir, "source");
      await Deno.writeTextFile(source, "vstor!\n");
      await Deno.writeTextFile(join(dir, "empty"), "");
      await compare({
        commands: [
          "write -C 0 512",
          "read -C -v 0 1",
          "discard -C 0 512",
          "write -b 0 512",
          "read -b 0 512",
          "write -b 1 512",
          "read -b 0 1",
          "write -c 0 64k",
          "write -c 1 512",
          "write -c 0 511",
          `write -s ${source} 5 20`,
          `write -s ${source} -q 100 3`,
          "read -v 0 112",
          `write -s ${join(dir, "missing")} 0 1`,
          `write -s ${join(dir, "empty")} 0 1`,
          `write -s ${dir} 0 1`,
          `write -s ${source} -P 1 0 1`,
        ],
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "vstor io warns about a probed raw image and guards its first sector like qemu-io",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vstor_qemu_io_src_" });
    try {
      // A qcow2 magic and version: writing it to sector 0 of a probed raw image is refused.
      const header = join(dir, "header");
      await Deno.writeFile(header, Uint8Array.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]));
      const outcome = await compare({
        probe: true,
        commands: [
          `write -s ${header} 0 512`,
          `write -s ${header} 512 512`,
          "write -z 0 512",
          "write -P 0x51 0 4",
        ],
      });
      assert.equal(outcome.code, 1);
      assert.ok(outcome.stdout.includes("write failed: Operation not permitted"));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

// ---------------------------------------------------------------------------------------------
// The drop-in: `vstor qemu-io ARGS…` (qemuIoMain) against qemu-io with the same arguments

interface DropIn {
  /** qemu-io's arguments; `IMAGE` (anywhere in an argument) is the image's path. */
  args: string[];
  /** How the image is made: raw (zeroes) or qemu-img create's options after `-f qcow2` (1 MiB). */
  image?: { raw: number } | { qcow2: string[] };
  stdin?: string;
  /** Images must be equal byte for byte (else equal as qemu-img compare sees them). */
  sameBytes?: boolean;
  /** Prepare the directory both images live in (before the image is made). */
  setup?: (dir: string) => Promise<void>;
  /** Change the image once it is made (byte pokes). */
  patch?: (image: string) => Promise<void>;
  /** Skip the final `qemu-img compare` (for images qemu-img cannot open by itself). */
  noCompare?: boolean;
}

interface DropInOutcome {
  code: number;
  stdout: string[];
  stderr: string[];
}

function normalizeDropIn(text: string, dir: string): string[] {
  // getopt names argv[0] as run (a full path when spawned): a shell user types `qemu-io`.
  const lines = text.replaceAll(dir, "DIR").replace(/^\/\S*\/qemu-io: /gm, "qemu-io: ")
    .split("\n");
  if (lines.at(-1) === "") lines.pop();
  return lines.map((line) =>
    TIMING.test(line) ? "<timing>" : MACHINE.test(line) ? "<machine>" : line
  );
}

/** Run `case` through qemu-io and qemuIoMain in two directories; assert they agree. */
async function dropIn(c: DropIn): Promise<DropInOutcome> {
  const dirs = [
    await Deno.makeTempDir({ prefix: "vstor_qio_q" }),
    await Deno.makeTempDir({ prefix: "vstor_qio_v" }),
  ];
  try {
    const images: string[] = [];
    for (const dir of dirs) {
      await c.setup?.(dir);
      const image = join(dir, "img");
      const spec = c.image ?? { raw: MiB };
      if ("raw" in spec) {
        await createImage(image, spec.raw);
      } else {
        const made = await runTool("qemu-img", [
          "create",
          "-q",
          "-f",
          "qcow2",
          ...spec.qcow2,
          image,
          String(MiB),
        ]);
        assert.equal(made.code, 0, made.stderr);
      }
      await c.patch?.(image);
      images.push(image);
    }
    const [qdir = "", vdir = ""] = dirs;
    const [qimage = "", vimage = ""] = images;
    const qemu = await runTool(
      "qemu-io",
      c.args.map((a) => a.replaceAll("IMAGE", qimage)),
      c.stdin,
    );
    let stdout = "";
    let stderr = "";
    const signals: number[] = [];
    const code = await qemuIoMain(c.args.map((a) => a.replaceAll("IMAGE", vimage)), {
      stdout: (t) => stdout += t,
      stderr: (t) => stderr += t,
      raise: (signal) => signals.push(signal),
      ...(c.stdin === undefined
        ? {}
        : { stdin: ReadableStream.from([new TextEncoder().encode(c.stdin)]) }),
    });
    const expected: DropInOutcome = {
      code: qemu.code,
      stdout: normalizeDropIn(qemu.stdout, qdir),
      stderr: normalizeDropIn(qemu.stderr, qdir),
    };
    const actual: DropInOutcome = {
      code,
      stdout: normalizeDropIn(stdout, vdir),
      stderr: normalizeDropIn(stderr, vdir),
    };
    assert.deepEqual(actual, expected);
    if (!c.noCompare) {
      const same = await runTool("qemu-img", ["compare", "-q", qimage, vimage]);
      assert.equal(same.code, 0, `images differ: ${same.stdout}${same.stderr}`);
    }
    if (c.sameBytes) {
      const [a, b] = await Promise.all([Deno.readFile(qimage), Deno.readFile(vimage)]);
      assert.equal(b.length, a.length, "image sizes differ");
      assert.equal(b.findIndex((x, i) => x !== a[i]), -1, "image bytes differ");
    }
    return expected;
  } finally {
    for (const dir of dirs) await Deno.remove(dir, { recursive: true });
  }
}

function qcow2(...options: string[]): { qcow2: string[] } {
  return { qcow2: options.flatMap((o) => ["-o", o]) };
}

function cmds(...commands: string[]): string[] {
  return commands.flatMap((c) => ["-c", c]);
}

Deno.test({
  name: "qemu-io drop-in: readv and writev on raw and qcow2 print and write what qemu-io does",
  ignore,
  async fn() {
    const script = cmds(
      "writev -P 3 512 1k 100 3",
      "readv -P 3 512 1k 103",
      "readv -v 510 4 4",
      "writev -C -f -P 0x7e 64k 4k 4k",
      "readv -q -P 0x7e 64k 8k",
      "readv -P 1 0 512",
      "readv 0 x",
      "readv 0 3G",
      "readv 0 1G 1G 1G",
      "writev 2M 512",
      "readv 1M 1",
      "readv -x 0 1",
      "writev 0 0",
      "readv 0 0",
    );
    const raw = await dropIn({ args: ["-f", "raw", "IMAGE", ...script], sameBytes: true });
    assert.equal(raw.code, 1);
    await dropIn({ args: ["IMAGE", ...script], image: qcow2(), sameBytes: true });
  },
});

Deno.test({
  name: "qemu-io drop-in: aio_read, aio_write and aio_flush print completions as qemu-io does",
  ignore,
  async fn() {
    // One request in flight at a time: qemu-io's completion order among several is thread timing.
    const script = cmds(
      "aio_write -P 1 0 4k",
      "aio_flush",
      "aio_write -P 2 4k 4k 4k",
      "length",
      "aio_flush",
      "aio_read -P 1 0 4k",
      "aio_flush",
      "aio_read -v -P 2 4k 32",
      "aio_flush",
      "aio_read -C -P 2 4k 512 512",
      "aio_flush",
      "aio_write -f -q -P 3 64k 64k",
      "aio_flush",
      "aio_write -P 1 2M 4k",
      "aio_flush",
      "aio_read 2M 4k",
      "aio_flush",
      "aio_write -z 0 4k 4k",
      "aio_write -u 0 4k",
      "aio_read -i 0 1",
      "aio_write -i 0 1",
      "aio_read -x 0 1",
      "aio_read 0",
      "aio_write -P 0x100 0 1",
      "aio_read -P 3 64k 64k",
      "aio_flush",
      "aio_write -z -q 128k 64k",
    ); // the last completion prints at exit
    await dropIn({ args: ["-f", "raw", "IMAGE", ...script], sameBytes: true });
    await dropIn({ args: ["IMAGE", ...script], image: qcow2(), sameBytes: true });
  },
});

Deno.test({
  name: "qemu-io drop-in: commands without a file, open, close and open's errors",
  ignore,
  async fn() {
    const outcome = await dropIn({
      args: cmds(
        "read 0 1",
        "length",
        "open -r -o driver=raw IMAGE",
        "read -q 0 1",
        "write 0 1",
        "open IMAGE",
        "close",
        "close",
        "open -o driver=raw,file.filename=IMAGE",
        "length",
        "close",
        "open -o driver=raw -o file.filename=IMAGE",
        "info",
        "close",
        "open -o driver=raw,foo=bar IMAGE",
        "open -o driver=raw",
        "open -o size",
        "open -o size=x,driver=raw IMAGE",
        "open -o driver=raw,read-only=x IMAGE",
        "open -f raw IMAGE",
        "open IMAGE IMAGE",
        "open",
        "open -t bogus IMAGE",
        "open -d bogus IMAGE",
        "open -i bogus IMAGE",
        "open -k -o driver=raw IMAGE",
        "open -i native -o driver=raw IMAGE",
        "open -U -o driver=raw,force-share=off IMAGE",
        "open -o driver=qcow2 IMAGE",
        "open -o driver=raw IMAGE.missing",
        "open -t writeback -d ignore -o driver=raw IMAGE",
        "write -q -P 9 0 1",
        "help quit",
      ),
    });
    assert.equal(outcome.code, 1);
  },
});

Deno.test({
  name: "qemu-io drop-in: reopen -r/-w/-c/-o and their errors",
  ignore,
  async fn() {
    await dropIn({
      args: [
        "-f",
        "raw",
        "IMAGE",
        ...cmds(
          "reopen -r",
          "write 0 1",
          "reopen -w",
          "write -q -P 0x11 0 1",
          "reopen -r -w",
          "reopen -c bogus",
          "reopen -r -o read-only=on",
          "reopen -o foo=bar",
          "reopen x",
          "reopen -c writeback",
          "reopen -c unsafe -o cache.no-flush=on",
          "reopen -x",
          "reopen -c writethrough",
          "read -P 0x11 0 1",
        ),
      ],
      sameBytes: true,
    });
  },
});

Deno.test({
  name:
    "qemu-io drop-in: reopen -o takes qcow2's runtime options, checks them as QEMU, keeps earlier ones",
  ignore,
  async fn() {
    // iotest 137's valid and invalid values, and the options a reopen keeps from the last.
    await dropIn({
      args: [
        "IMAGE",
        ...cmds(
          "reopen -o lazy-refcounts=on,pass-discard-request=on",
          "reopen -o pass-discard-snapshot=off,pass-discard-other=on",
          "reopen -o overlap-check=none",
          "reopen -o overlap-check.template=all,overlap-check.inactive-l2=off",
          "reopen -o cache-size=1M",
          "reopen -o l2-cache-size=512k",
          "reopen -o refcount-cache-size=128k",
          "reopen -o cache-size=1M,l2-cache-size=64k,refcount-cache-size=64k",
          "reopen -o cache-size=1M,l2-cache-size=2M",
          "reopen -o cache-size=1M,refcount-cache-size=2M",
          "reopen -o l2-cache-entry-size=33k",
          "reopen -o l2-cache-entry-size=128k",
          "reopen -o l2-cache-entry-size=512",
          "reopen -o refcount-cache-size=256T",
          "reopen -o overlap-check=constant,overlap-check.template=all",
          "reopen -o overlap-check.template=blubb",
          "reopen -o cache-clean-interval=-1",
          "reopen -o cache-clean-interval=x",
          "reopen -o lazy-refcounts=42",
          "reopen -o l2-cache-size=x",
          "reopen -o cache-clean-interval=0",
          "write -P 55 0 512k",
          "read -P 55 0 512k",
          "discard 0 256k",
          "write -z 256k 256k",
          "read -P 0 0 512k",
          "reopen -r -o l2-cache-entry-size=4k",
          "read -P 0 0 64k",
        ),
      ],
      image: qcow2(),
      sameBytes: true,
    });
    // A refused option changes nothing: lazy refcounts stay off, so the image stays clean.
    await dropIn({
      args: [
        "IMAGE",
        ...cmds("reopen -o lazy-refcounts=on,overlap-check=blubb", "write -P 0x5a 0 512"),
      ],
      image: qcow2(),
      sameBytes: true,
    });
    // A lazy-refcounts request on a v2 image, at open and on reopen.
    await dropIn({
      args: ["IMAGE", ...cmds("reopen -o lazy-refcounts=on", "open -o lazy-refcounts=on IMAGE")],
      image: qcow2("compat=0.10"),
      sameBytes: true,
    });
  },
});

Deno.test({
  name:
    "qemu-io drop-in: an L2 table allocated at offset 0 (refcounts zeroed) marks the image corrupt",
  ignore,
  async fn() {
    // iotest 137's last case: the first refcount block's entries are zeroed, so the free-cluster
    // search finds the header cluster.
    await dropIn({
      args: ["IMAGE", ...cmds("reopen -o overlap-check=none,lazy-refcounts=42", "write 64k 64k")],
      image: qcow2(),
      patch: async (image) => {
        const file = await Deno.open(image, { write: true });
        await file.seek(0x20000, Deno.SeekMode.Start);
        await file.write(new Uint8Array(8));
        file.close();
      },
      noCompare: true,
      sameBytes: true,
    });
  },
});

Deno.test({
  name:
    "qemu-io drop-in: cache=none and directsync (O_DIRECT) write, flush and read back what qemu-io does, unaligned too",
  ignore,
  async fn() {
    const script = cmds(
      "write -P 0x11 0 64k",
      "write -P 0x22 100 1000",
      "write -P 0x33 4095 2",
      "writev -P 0x44 65000 300 700 5",
      "flush",
      "read -P 0x22 100 1000",
      "read -P 0x33 4095 2",
      "readv -P 0x44 65000 1005",
      "read -v 96 8",
      "write -z 200k 3k",
      "discard 300k 64k",
      "aio_write -P 0x55 1M 4k",
      "aio_flush",
      "read -P 0x55 1M 4k",
      "map",
    );
    for (const mode of ["none", "directsync"]) {
      await dropIn({ args: ["-t", mode, "-f", "raw", "IMAGE", ...script], sameBytes: true });
      await dropIn({ args: ["-t", mode, "IMAGE", ...script], image: qcow2(), sameBytes: true });
      await dropIn({
        args: ["-t", mode, "IMAGE", ...script],
        image: qcow2("cluster_size=16k", "extended_l2=on"),
        sameBytes: true,
      });
    }
    await dropIn({ args: ["-n", "-f", "raw", "IMAGE", ...script], sameBytes: true });
    // Switching O_DIRECT on and off on an open image.
    await dropIn({
      args: [
        "IMAGE",
        ...cmds(
          "write -P 1 0 4k",
          "reopen -c none",
          "write -P 2 512 100",
          "reopen -o cache.direct=off",
          "read -P 2 512 100",
          "reopen -c directsync",
          "read -P 1 0 512",
        ),
      ],
      image: qcow2(),
      sameBytes: true,
    });
  },
});

Deno.test({
  name:
    "qemu-io drop-in: -i io_uring and -i native (O_DIRECT and page cache) write, flush and read back what qemu-io does, unaligned and in flight together",
  ignore,
  async fn() {
    const script = cmds(
      "write -P 0x11 0 64k",
      "write -P 0x22 100 1000",
      "write -P 0x33 4095 2",
      "writev -P 0x44 65000 300 700 5",
      // In flight together; -q because the order they complete in is the host's.
      "aio_write -q -P 0x55 1M 4k",
      "aio_write -q -P 0x56 1028k 4k",
      "aio_write -q -P 0x57 1032k 300",
      "aio_read -q -P 0x11 8k 4k",
      "aio_flush",
      "flush",
      "read -P 0x22 100 1000",
      "read -P 0x33 4095 2",
      "readv -P 0x44 65000 1005",
      "read -v 96 8",
      "read -P 0x55 1M 4k",
      "read -P 0x56 1028k 4k",
      "read -P 0x57 1032k 300",
      "write -z 200k 3k",
      "discard 300k 64k",
      "read -P 0 300k 64k",
      "map",
    );
    for (const args of [["-t", "none", "-i", "io_uring"], ["-i", "io_uring"], ["-k", "-n"]]) {
      await dropIn({
        args: [...args, "-f", "raw", "IMAGE", ...script],
        image: { raw: 2 * MiB },
        sameBytes: true,
      });
      await dropIn({ args: [...args, "IMAGE", ...script], image: qcow2(), sameBytes: true });
    }
    // aio=native without O_DIRECT: QEMU's refusal.
    await dropIn({ args: ["-i", "native", "-f", "raw", "IMAGE", ...cmds("read 0 1")] });
  },
});

Deno.test({
  name: "qemu-io drop-in: -s writes to a temporary overlay; the image file stays as it was",
  ignore,
  async fn() {
    const script = cmds(
      "write -P 5 0 4k",
      "read -P 5 0 4k",
      "info",
      "map",
      "alloc 0 64k",
      "length",
      "truncate 2M",
      "length",
      "write -z 64k 64k",
      "map",
    );
    await dropIn({ args: ["-s", "-f", "raw", "IMAGE", ...script], sameBytes: true });
    await dropIn({ args: ["-s", "IMAGE", ...script], image: qcow2(), sameBytes: true });
    await dropIn({ args: ["-s", "-r", "-f", "raw", "IMAGE", ...cmds("write 0 1", "read -q 0 1")] });
    await dropIn({ args: cmds("open -s -o driver=raw IMAGE", "write -q 0 1", "map", "close") });
  },
});

Deno.test({
  name: "qemu-io drop-in: info prints the format specific block of each qcow2 variant",
  ignore,
  async fn() {
    for (
      const options of [
        [],
        ["compat=0.10"],
        ["lazy_refcounts=on", "refcount_bits=8"],
        ["extended_l2=on", "cluster_size=128k", "compression_type=zstd"],
        ["cluster_size=4k", "refcount_bits=1"],
      ]
    ) {
      await dropIn({
        args: ["-r", "IMAGE", "-c", "info"],
        image: qcow2(...options),
        sameBytes: true,
      });
    }
    await dropIn({ args: ["-r", "-f", "raw", "IMAGE", "-c", "info", "-c", "i"], sameBytes: true });
  },
});

Deno.test({
  name: "qemu-io drop-in: command-line errors, cache/aio/discard modes and exit codes",
  ignore,
  async fn() {
    const runs: string[][] = [
      ["-x"],
      ["-o", "driver=raw", "IMAGE"],
      ["-f", "raw", "IMAGE", "IMAGE"],
      ["-t", "bogus", "-f", "raw", "IMAGE"],
      ["-i", "bogus", "-f", "raw", "IMAGE"],
      ["-d", "bogus", "-f", "raw", "IMAGE"],
      ["-i", "native", "-f", "raw", "IMAGE", "-c", "length"],
      ["-k", "-f", "raw", "IMAGE", "-c", "length"],
      ["--image-opts", "-f", "raw", "driver=raw,file.filename=IMAGE"],
      ["--image-opts", "driver=raw,file.filename=IMAGE", "-c", "length"],
      ["-f", "raw", "IMAGE.missing", "-c", "length"],
      ["-f", "bogus", "IMAGE", "-c", "length"],
      ["-c", "read 0 1"],
      ["-c", "help"],
      ["-h"],
      ["--help"],
      ["--cmd"],
      ["--format=raw", "--read-only", "IMAGE", "--cmd=length"],
      [
        "-t",
        "writeback",
        "-d",
        "ignore",
        "-f",
        "raw",
        "IMAGE",
        ...cmds("write -q 0 4k", "discard 0 4k", "flush"),
      ],
      ["-t", "unsafe", "-d", "unmap", "-f", "raw", "IMAGE", ...cmds("write -z -u 0 4k", "flush")],
      ["-t", "writethrough", "-i", "threads", "-m", "-f", "raw", "IMAGE", ...cmds("write -f 0 4k")],
      ["-U", "-f", "raw", "IMAGE", "-c", "length"],
      ["-U", "-r", "-f", "raw", "IMAGE", "-c", "length"],
      ["-f", "raw", "IMAGE", ...cmds("read 2M 1", "quit", "read 0 1")],
      ["--object", "secret,id=sec0,data=x", "-c", "help quit"],
      ["--object", "secret,id=sec0"],
      ["--object", "nosuchtype,id=x"],
      ["-T", "foo", "-T", "-bar", "-T", "enable=baz*", "-c", "help quit"],
      ["-T", "events=/nonexistent/events"],
    ];
    for (const args of runs) await dropIn({ args, sameBytes: true });
  },
});

Deno.test({
  name: "qemu-io drop-in: help for every command is qemu-io's",
  ignore,
  async fn() {
    const names = [
      "abort",
      "aio_flush",
      "aio_read",
      "aio_write",
      "alloc",
      "break",
      "close",
      "discard",
      "flush",
      "help",
      "info",
      "length",
      "map",
      "open",
      "quit",
      "read",
      "readv",
      "remove_break",
      "reopen",
      "resume",
      "sigraise",
      "sleep",
      "truncate",
      "wait_break",
      "write",
      "writev",
      "a",
      "c",
      "d",
      "f",
      "?",
      "i",
      "l",
      "o",
      "q",
      "r",
      "t",
      "w",
      "nope",
    ];
    await dropIn({ args: names.flatMap((n) => ["-c", `help ${n}`]) });
  },
});

Deno.test({
  name: "qemu-io drop-in: stdin commands with qemu-io's prompt, sleep, blkdebug commands, sigraise",
  ignore,
  async fn() {
    await dropIn({
      args: ["-f", "raw", "IMAGE"],
      stdin: `read -q 0 1 ${"x".repeat(1100)}\n` + // fgets() cuts it after 1023 bytes
        "write -P 7 0 512\nread -P 7 0 512\nbogus\nbreak a b\nremove_break b\nresume b\nsleep 5\nsleep x\nsigraise 66\nsigraise 0\nsigraise 17\nlength\n",
    });
    const killed = await dropIn({
      args: ["-f", "raw", "IMAGE", ...cmds("length", "sigraise 15", "length")],
    });
    assert.equal(killed.code, 143);
    assert.equal((await dropIn({ args: cmds("abort") })).code, 134);
  },
});

Deno.test({
  name: "qemu-io drop-in: -C copies backing data into the overlay on read",
  ignore,
  async fn() {
    await dropIn({
      setup: async (dir) => {
        const base = join(dir, "base.raw");
        await createImage(base, MiB);
        const w = await runTool("qemu-io", ["-f", "raw", "-c", "write -q -P 0x44 0 128k", base]);
        assert.equal(w.code, 0, w.stderr);
      },
      image: { qcow2: ["-b", "base.raw", "-F", "raw"] },
      args: [
        "-C",
        "IMAGE",
        ...cmds("map", "read -P 0x44 0 4k", "map", "readv -P 0x44 64k 512", "map"),
      ],
      sameBytes: true,
    });
  },
});

Deno.test({
  name:
    "qemu-io drop-in: open -o backing.driver=FMT overrides a backing format the image names wrongly",
  ignore,
  async fn() {
    await dropIn({
      setup: async (dir) => {
        const base = join(dir, "base.raw");
        await createImage(base, MiB);
        const w = await runTool("qemu-io", ["-f", "raw", "-c", "write -q -P 0x5c 0 64k", base]);
        assert.equal(w.code, 0, w.stderr);
      },
      image: { qcow2: ["-b", "base.raw", "-F", "raw"] },
      // The image says its backing file is 'foo', a format neither tool has (iotest 114).
      patch: async (image) => {
        const bytes = await Deno.readFile(image);
        const at = new TextDecoder("latin1").decode(bytes.subarray(0, 4096)).indexOf("raw");
        bytes.set(new TextEncoder().encode("foo"), at);
        await Deno.writeFile(image, bytes);
      },
      args: [...cmds("open IMAGE", "open -o backing.driver=raw IMAGE", "read -P 0x5c 0 4k")],
      noCompare: true,
    });
  },
});

Deno.test({
  name:
    "qemu-io drop-in: cache-size, l2-cache-size, refcount-cache-size and l2-cache-entry-size as QEMU checks them",
  ignore,
  async fn() {
    for (
      const options of [
        "cache-size=1.25M,l2-cache-size=1M,refcount-cache-size=0.25M",
        "cache-size=1M,l2-cache-size=2M",
        "cache-size=1M,refcount-cache-size=2M",
        "cache-size=0,l2-cache-size=0,refcount-cache-size=0",
        "l2-cache-entry-size=256",
        "l2-cache-entry-size=4242",
        "l2-cache-entry-size=128k",
        "cache-size=0",
        "l2-cache-size=0",
        "cache-size=2M,refcount-cache-size=1M",
        "l2-cache-entry-size=16k",
      ]
    ) {
      await dropIn({
        image: qcow2(),
        args: cmds(`open -o ${options} IMAGE`, "read -q 0 64k"),
      });
    }
  },
});

Deno.test({
  name:
    "qemu-io drop-in: the file, host_device and host_cdrom drivers check the file's type as QEMU does",
  ignore,
  async fn() {
    // (A host_cdrom that opens is a drive without a medium in QEMU; vstor has no such node,
    // so host_cdrom is only tried where both refuse the file.)
    for (const driver of ["file", "host_device", "host_cdrom"]) {
      for (const ro of [["-r"], []]) {
        const targets = driver === "host_cdrom" ? ["IMAGE"] : ["IMAGE", "/dev/null,locking=off"];
        for (const target of targets) {
          await dropIn({
            args: cmds(`open ${ro.join(" ")} -o driver=${driver},filename=${target}`, "length"),
          });
        }
      }
    }
  },
});
