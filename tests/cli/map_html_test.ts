import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/main.ts";
import { DEFAULT_MAX_CELLS } from "../../formats/cluster_map.ts";
import { ignoreWithout, runTool } from "../interop/qemu.ts";
import { ignoreWithoutChromium, inspectPage } from "../html/browser.ts";

const dir = Deno.makeTempDirSync({ prefix: "vstor_map_html_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

const noQemu = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");
const noBrowser = noQemu || ignoreWithoutChromium();
const CS = 65536;

async function vstor(...args: string[]) {
  let stdout = "", stderr = "";
  const code = await main(args, { stdout: (s) => stdout += s, stderr: (s) => stderr += s });
  return { code, stdout, stderr };
}

async function tool(name: string, ...args: string[]): Promise<string> {
  const r = await runTool(name, args);
  assert.equal(r.code, 0, `${name} ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

async function qemuIo(fmt: string, file: string, ...commands: string[]): Promise<void> {
  await tool("qemu-io", "-f", fmt, ...commands.flatMap((c) => ["-c", c]), file);
}

/**
 * A three-layer chain of 8 MiB: a raw base with holes, a qcow2 middle, and a qcow2 top with data
 * written out of order (host fragmentation), a zero write, a compressed write and a discard.
 */
const chain = noQemu ? "" : await (async () => {
  const base = join(dir, "base.raw"), mid = join(dir, "mid.qcow2"), top = join(dir, "top.qcow2");
  await tool("qemu-img", "create", "-q", "-f", "raw", base, "8M");
  await qemuIo("raw", base, "write -P 0x11 0 2M", "write -P 0x12 6M 1M");
  await tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", mid);
  await qemuIo("qcow2", mid, "write -P 0x21 1M 1M", "write -P 0x22 3M 512k");
  await tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top);
  await qemuIo(
    "qcow2",
    top,
    "write -P 0x31 64k 64k",
    "write -P 0x31 0 64k",
    "write -P 0x32 128k 128k",
    "write -P 0x33 5M 128k",
    "write -z 1536k 128k",
    "write -c -P 0x34 4M 64k",
    "write -P 0x35 7M 192k",
    "discard 7232k 64k",
  );
  return top;
})();

interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** What the page should say, worked out from qemu-img map's JSON cluster by cluster. */
async function expectedFromQemu(image: string) {
  const entries = JSON.parse(
    await tool("qemu-img", "map", "--output=json", image),
  ) as QemuMapEntry[];
  const clusters: { cls: string; host?: number }[] = [];
  for (const e of entries) {
    assert.equal(e.start % CS, 0, "the test image's runs are cluster-aligned");
    assert.equal(e.length % CS, 0, "the test image's runs are cluster-aligned");
    const cls = !e.present
      ? "unallocated"
      : e.zero
      ? "zero"
      : e.depth > 0
      ? `backing-${e.depth}`
      : e.offset === undefined
      ? "compressed"
      : "data";
    for (let at = 0; at < e.length; at += CS) {
      clusters.push(cls === "data" ? { cls, host: e.offset! + at } : { cls });
    }
  }
  const counts: Record<string, number> = {};
  for (const c of clusters) counts[c.cls] = (counts[c.cls] ?? 0) + 1;
  let pairs = 0, discontiguous = 0, runs = 0;
  clusters.forEach((c, i) => {
    if (c.cls !== "data") return;
    const prev = clusters[i - 1];
    const adjacent = prev?.cls === "data";
    const contiguous = adjacent && prev.host! + CS === c.host;
    if (adjacent) pairs++;
    if (adjacent && !contiguous) discontiguous++;
    if (!contiguous) runs++;
  });
  return { clusters: clusters.length, counts, pairs, discontiguous, runs };
}

/** The value of a figure (`<dt>label</dt><dd>value</dd>`) of the page. */
function figure(html: string, label: string): string {
  const m = new RegExp(`<dt>${label}</dt><dd>([^<]*)</dd>`).exec(html);
  assert.ok(m, `figure '${label}' on the page`);
  return m[1]!;
}

/** Cells of each class in the SVG with `id` (their class `cell PREFIX-CLASS`). */
function cellsByClass(html: string, id: string, prefix: string): Record<string, number> {
  const start = html.indexOf(`<svg`, html.indexOf(`id="${id}"`) - 400);
  const svg = html.slice(start, html.indexOf("</svg>", start));
  const counts: Record<string, number> = {};
  for (const m of svg.matchAll(new RegExp(`class="cell ${prefix}-([a-z0-9-]+)"`, "g"))) {
    counts[m[1]!] = (counts[m[1]!] ?? 0) + 1;
  }
  return counts;
}

/** The rows of the chain table: depth, file, format and clusters read from the layer. */
function chainRows(html: string): { depth: number; file: string; format: string; read: number }[] {
  const table = html.slice(
    html.indexOf("<h3>Chain</h3>"),
    html.indexOf("</table>", html.indexOf("<h3>Chain</h3>")),
  );
  return [...table.matchAll(
    /<tr><td class="num">(\d+)<\/td><td><code>([^<]*)<\/code><\/td><td>([^<]*)<\/td>.*?<td class="num">(\d+)<\/td><\/tr>/g,
  )].map((m) => ({ depth: Number(m[1]), file: m[2]!, format: m[3]!, read: Number(m[4]) }));
}

Deno.test({
  name: "vstor map --html draws a qcow2 chain whose class counts are what qemu-img map says",
  ignore: noQemu,
  fn: async () => {
    const out = join(dir, "chain.html");
    const r = await vstor("map", "--html", out, chain);
    assert.deepEqual(r, { code: 0, stdout: "", stderr: "" });
    const html = Deno.readTextFileSync(out);
    const want = await expectedFromQemu(chain);
    assert.equal(want.clusters, 128);
    const n = (cls: string) => want.counts[cls] ?? 0;
    // The figures.
    assert.equal(figure(html, "guest clusters"), "128");
    assert.equal(figure(html, "chain depth"), "2 (3 layers)");
    assert.match(
      figure(html, "allocated in this layer"),
      new RegExp(`^${n("data") + n("compressed")} `),
    );
    assert.match(figure(html, "zero"), new RegExp(`^${n("zero")} `));
    assert.match(figure(html, "compressed"), new RegExp(`^${n("compressed")} `));
    assert.match(figure(html, "unallocated"), new RegExp(`^${n("unallocated")} `));
    assert.equal(figure(html, "data clusters mapped 1:1 \\(this layer\\)"), String(n("data")));
    assert.equal(figure(html, "host runs of that data"), String(want.runs));
    assert.match(
      figure(html, "fragmentation"),
      new RegExp(`^${want.discontiguous} of ${want.pairs} guest-consecutive`),
    );
    // The numbers are the ones this image was built to have, not just whatever both tools say.
    assert.deepEqual(
      [n("data"), n("compressed"), n("zero"), n("backing-1"), n("backing-2")],
      [8, 1, 69, 22, 28],
    );
    assert.deepEqual([want.pairs, want.discontiguous, want.runs], [4, 2, 6]);
    // One cell per cluster, coloured by its class.
    assert.deepEqual(cellsByClass(html, "guest-map", "g"), want.counts);
    // The chain, top first, with what each layer serves.
    assert.deepEqual(chainRows(html), [
      { depth: 0, file: chain, format: "qcow2", read: n("data") + n("compressed") },
      { depth: 1, file: join(dir, "mid.qcow2"), format: "qcow2", read: n("backing-1") },
      { depth: 2, file: join(dir, "base.raw"), format: "raw", read: n("backing-2") },
    ]);
    // The host view: qemu-img check's numbers, and every cluster of the file in one class.
    const check = JSON.parse(await tool("qemu-img", "check", "--output=json", chain));
    const fileClusters = Math.ceil(Deno.statSync(chain).size / CS);
    assert.equal(figure(html, "host clusters"), String(fileClusters));
    const host = cellsByClass(html, "host-map", "h");
    assert.equal(Object.values(host).reduce((a, b) => a + b, 0), fileClusters);
    assert.equal(host.data, check["allocated-clusters"] - check["compressed-clusters"]);
    assert.equal(host.compressed, check["compressed-clusters"]);
    assert.deepEqual(
      [host.header, host["refcount-table"], host["refcount-block"], host.l1, host.l2],
      [1, 1, 1, 1, 1],
    );
    // The discarded cluster is free again; nothing leaked.
    assert.deepEqual([host.free, host.leaked], [1, undefined]);
    assert.match(figure(html, "leaked"), /^0$/);
  },
});

Deno.test({
  name:
    "vstor map --html on a raw image shows data and holes as qemu-img map does, and no host view",
  ignore: noQemu,
  fn: async () => {
    const raw = join(dir, "plain.raw"), out = join(dir, "raw.html");
    await tool("qemu-img", "create", "-q", "-f", "raw", raw, "4M");
    await qemuIo("raw", raw, "write -P 1 0 256k", "write -P 2 3M 64k");
    const r = await vstor("map", "--html", out, raw);
    assert.deepEqual(r, { code: 0, stdout: "", stderr: "" });
    const html = Deno.readTextFileSync(out);
    const want = await expectedFromQemu(raw);
    assert.deepEqual(want.counts, { data: 5, zero: 59 });
    assert.deepEqual(cellsByClass(html, "guest-map", "g"), want.counts);
    assert.equal(figure(html, "chain depth"), "0 (1 layer)");
    assert.match(html, /id="host-none"/);
    assert.ok(!html.includes('id="host-map"'));
  },
});

Deno.test("vstor map --html sums a big image into cells, each titled with its range and counts", async () => {
  const big = join(dir, "big.qcow2"), out = join(dir, "big.html");
  assert.equal((await vstor("create", "-q", "-f", "qcow2", big, "64G")).code, 0);
  const { openImage } = await import("../../formats/open.ts");
  const node = await openImage(big);
  await node.write(0, new Uint8Array(3 * CS).fill(1));
  await node.write(40 * 2 ** 30, new Uint8Array(CS).fill(2));
  await node.close();
  const r = await vstor("map", "--html", out, big);
  assert.deepEqual(r, { code: 0, stdout: "", stderr: "" });
  const html = Deno.readTextFileSync(out);
  const cells = cellsByClass(html, "guest-map", "g");
  // 2^20 clusters in 16384 cells of 64: the written clusters are a minority of their cells.
  assert.deepEqual(cells, { unallocated: DEFAULT_MAX_CELLS });
  assert.match(
    html,
    /<title>clusters 0–63 \(guest 0x0–0x3fffff\): data 3, unallocated 61<\/title>/,
  );
  assert.match(figure(html, "allocated in this layer"), /^4 /);
  assert.ok(html.length < 4 << 20, `a big image's page stays small (${html.length} bytes)`);
});

Deno.test("vstor map --html: an unwritable page, a missing image, misuse and qemu-img drop-in mode", async () => {
  const img = join(dir, "small.qcow2");
  assert.equal((await vstor("create", "-q", "-f", "qcow2", img, "1M")).code, 0);
  const nowhere = join(dir, "no", "such", "dir", "page.html");
  let r = await vstor("map", "--html", nowhere, img);
  assert.deepEqual(r, {
    code: 1,
    stdout: "",
    stderr: `vstor: Could not write '${nowhere}': No such file or directory\n`,
  });
  r = await vstor("map", "--html", dir, img);
  assert.deepEqual(r, {
    code: 1,
    stdout: "",
    stderr: `vstor: Could not write '${dir}': Is a directory\n`,
  });
  r = await vstor("map", "--html", join(dir, "x.html"), join(dir, "missing.qcow2"));
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^vstor: .*missing\.qcow2.*No such file or directory\n$/);
  assert.throws(() => Deno.statSync(join(dir, "x.html")));
  for (
    const args of [
      ["map", img, "--html"],
      ["map", "--html=", img],
      ["map", "--html", join(dir, "y.html"), "--output=json", img],
      ["map", "--html", join(dir, "y.html"), "--start-offset=64k", img],
    ]
  ) {
    r = await vstor(...args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, /^vstor map: .*\nusage: /);
  }
  r = await vstor("map", "--help");
  assert.equal(r.code, 0);
  assert.match(r.stdout, /--html=PAGE/);
  r = await vstor("qemu-img", "map", "--html", join(dir, "z.html"), img);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^qemu-img: unrecognized option '--html'\n/);
});

Deno.test({
  name: "the map page loads in chromium without errors or requests, one SVG cell per cluster",
  ignore: noBrowser,
  fn: async () => {
    const out = join(dir, "browser.html");
    assert.equal((await vstor("map", "--html", out, chain)).code, 0);
    const want = await expectedFromQemu(chain);
    const html = Deno.readTextFileSync(out);
    const countCells = (id: string, prefix: string) =>
      `(() => { const c = {}; for (const r of document.querySelectorAll('#${id} rect.cell')) {
         const k = [...r.classList].find((x) => x.startsWith('${prefix}-')).slice(2);
         c[k] = (c[k] || 0) + 1; } return c; })()`;
    const page = await inspectPage(out, {
      guest: countCells("guest-map", "g"),
      host: countCells("host-map", "h"),
      titled: "document.querySelectorAll('#guest-map rect.cell > title').length",
      width: "document.getElementById('guest-map').getBoundingClientRect().width",
      dataFill: "getComputedStyle(document.querySelector('#guest-map rect.g-data')).fill",
      freeFill: "getComputedStyle(document.querySelector('#host-map rect.h-free')).fill",
      title: "document.title",
    }, { timeoutMs: 30_000 });
    assert.deepEqual(page.consoleErrors, []);
    assert.deepEqual(page.exceptions, []);
    assert.deepEqual(page.requests, []);
    assert.deepEqual(page.failedRequests, []);
    assert.deepEqual(page.values.guest, want.counts);
    assert.deepEqual(page.values.host, cellsByClass(html, "host-map", "h"));
    assert.equal(page.values.titled, 128);
    assert.ok((page.values.width as number) > 600, `the grid is drawn (${page.values.width} px)`);
    // The class colours come from the page's own CSS.
    assert.equal(page.values.dataFill, "rgb(46, 157, 91)");
    assert.equal(page.values.freeFill, "rgb(255, 255, 255)");
    assert.equal(page.values.title, "vstor map top.qcow2");
  },
});

Deno.test({
  name: "inspectPage reports a page's console errors, exceptions and network requests",
  ignore: ignoreWithoutChromium(),
  fn: async () => {
    const bad = join(dir, "bad.html");
    Deno.writeTextFileSync(
      bad,
      '<!DOCTYPE html><html><body><img src="http://example.invalid/x.png">' +
        '<script>console.error("boom"); throw new Error("oops");</script></body></html>',
    );
    const page = await inspectPage(bad, { images: "document.images.length" });
    assert.equal(page.values.images, 1);
    assert.ok(page.consoleErrors.includes("boom"), page.consoleErrors.join("; "));
    assert.match(page.exceptions.join("\n"), /Error: oops/);
    assert.deepEqual(page.requests, ["http://example.invalid/x.png"]);
    assert.equal(page.failedRequests.length, 1);
  },
});
