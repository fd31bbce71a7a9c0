/**
 * The runner: plays a case on two copies — QEMU's tools in one directory, vstor in another — and
 * reports the first divergence: a command one side accepts and the other refuses, a vstor crash,
 * guest views that differ (size or bytes, read by `qemu-img compare`, so QEMU is the reader of
 * both copies), or `qemu-img check` results that differ (corruption or leaks on one side only).
 * Allocation layout alone is never compared.
 *
 * @module
 */
import { join } from "node:path";
import { allLines, type Case, type CommandLine, layerFile, type Step } from "./case.ts";
import { failedRequests, type Outcome, runBoth, runQemu } from "./tools.ts";

/** What kind of difference a divergence is. */
export type DivergenceKind =
  /** One side accepted a command the other refused (or the failed requests of a session differ). */
  | "accept"
  /** vstor threw out of its CLI instead of returning an exit code. */
  | "crash"
  /** The guest view of a layer differs: size or bytes. */
  | "guest"
  /** QEMU cannot open vstor's copy of a layer (or only QEMU's copy). */
  | "unreadable"
  /** `qemu-img check` finds corruption in vstor's copy and none in QEMU's. */
  | "check-corrupt"
  /** `qemu-img check` finds leaked clusters in vstor's copy and none in QEMU's. */
  | "check-leak"
  /** `qemu-img check` cannot complete on vstor's copy but can on QEMU's. */
  | "check-error"
  /** QEMU's copy leaks (or is corrupt) and vstor's does not: noted, not a vstor failure. */
  | "qemu-only"
  /**
   * A difference that follows from where each side allocated, which QEMU leaves open: a compressed
   * write accepted on one side only where the copies' allocation differed beforehand (qcow2 refuses
   * compressed writes over allocated clusters), or a write to a backing layer showing through one
   * overlay and not the other (QEMU may turn a range that reads as zeroes into a zero cluster, or
   * copy whole clusters in commit). Noted, not a failure.
   */
  | "layout";

/** One divergence, with enough context to tell the two sides apart. */
export interface Divergence {
  kind: DivergenceKind;
  /** Index into {@linkcode allLines} of the command after which it showed (-1: at the end). */
  command: number;
  /** The layer concerned, when one is. */
  layer: number | null;
  /** A stable key for "the same problem", kept while shrinking. */
  signature: string;
  /** What each side printed or read. */
  detail: string;
}

/** Whether a divergence fails a run (everything but a QEMU-side-only finding). */
export function isFailure(d: Divergence): boolean {
  return d.kind !== "qemu-only" && d.kind !== "layout";
}

/** How thoroughly to compare. */
export interface RunOptions {
  /** Compare the guest view of the top and the touched layer after every command (default true). */
  compareEveryStep?: boolean;
  /** Keep the two directories here (q/ and v/) instead of a removed temporary directory. */
  keepDir?: string;
}

/** What a run found. */
export interface RunResult {
  divergence: Divergence | null;
  /** Commands run on each side. */
  commands: number;
}

function stepOf(c: Case, command: number): Step | undefined {
  return c.steps[command - c.layers.length];
}

function verbOf(line: CommandLine): string {
  return line.tool === "qemu-io" ? "io" : line.args[0] ?? "?";
}

function clip(text: string, max = 1200): string {
  const t = text.trim();
  return t.length > max ? `${t.slice(0, max)} …` : t;
}

function acceptance(line: CommandLine, q: Outcome, v: Outcome): string | null {
  const qok = q.code === 0, vok = v.code === 0;
  if (qok !== vok) {
    return `${verbOf(line)}: qemu ${qok ? "ok" : "failed"}, vstor ${vok ? "ok" : "failed"}`;
  }
  if (line.tool === "qemu-io") {
    const qf = failedRequests(q.output).join(","), vf = failedRequests(v.output).join(",");
    if (qf !== vf) return `io: failed requests qemu [${qf}], vstor [${vf}]`;
  }
  return null;
}

/** The virtual size of an image file, from its header (qcow2) or its length (raw); null if absent. */
async function virtualSize(path: string, format: string): Promise<number | null> {
  let file;
  try {
    file = await Deno.open(path);
  } catch {
    return null;
  }
  try {
    if (format === "raw") return (await file.stat()).size;
    const header = new Uint8Array(32);
    if ((await file.read(header)) !== 32) return -1;
    return Number(new DataView(header.buffer).getBigUint64(24));
  } finally {
    file.close();
  }
}

/** Hex of up to 16 bytes from `at`. */
function hex(bytes: Uint8Array, at: number): string {
  return [...bytes.subarray(at, at + 16)].map((b) => b.toString(16).padStart(2, "0")).join(" ");
}

/**
 * Where two guest views differ, exactly: both converted to raw by qemu-img, the first differing
 * byte, how long the run of differences is, and 16 bytes of each side from there.
 */
async function firstDifference(
  qp: string,
  vp: string,
  fmt: string,
  scratch: string,
): Promise<string> {
  const raw = async (src: string, dst: string) => {
    const r = await runQemu(
      { tool: "qemu-img", args: ["convert", "-f", fmt, "-O", "raw", src, dst] },
      "/",
    );
    return r.code === 0 ? await Deno.readFile(dst) : null;
  };
  const q = await raw(qp, join(scratch, "q.raw")), v = await raw(vp, join(scratch, "v.raw"));
  if (q === null || v === null) return "(qemu-img convert failed)";
  let at = 0;
  while (at < q.length && q[at] === v[at]) at++;
  let end = at;
  while (end < q.length && q[end] !== v[end]) end++;
  let diffBytes = 0;
  for (let i = at; i < q.length; i++) if (q[i] !== v[i]) diffBytes++;
  return `first difference at ${at} (0x${at.toString(16)}), ${end - at} bytes in a row, ` +
    `${diffBytes} bytes in all\nqemu's copy reads  ${hex(q, at)}\nvstor's copy reads ${hex(v, at)}`;
}

async function compareLayer(
  c: Case,
  layer: number,
  dirs: { q: string; v: string; root: string },
  command: number,
  below = false,
): Promise<Divergence | null> {
  const name = layerFile(c, layer), fmt = c.layers[layer]!.format;
  const qp = join(dirs.q, name), vp = join(dirs.v, name);
  const [qs, vs] = [await virtualSize(qp, fmt), await virtualSize(vp, fmt)];
  if (qs === null && vs === null) return null;
  const base = { command, layer };
  if (qs === null || vs === null) {
    return {
      ...base,
      kind: "accept",
      signature: "accept:leftover-file",
      detail: `${name} exists only in ${qs === null ? "vstor's" : "QEMU's"} copy`,
    };
  }
  const cmp = await runQemu(
    { tool: "qemu-img", args: ["compare", "-f", fmt, "-F", fmt, qp, vp] },
    dirs.q,
  );
  if (cmp.code < 0) {
    return {
      ...base,
      kind: "unreadable",
      signature: "unreadable:compare-hangs",
      detail: `qemu-img compare of ${name} did not finish: ${clip(cmp.output)}`,
    };
  }
  if (cmp.code === 2) {
    const info = async (p: string) =>
      (await runQemu({ tool: "qemu-img", args: ["info", "-f", fmt, p] }, "/")).code === 0;
    const [qOk, vOk] = [await info(qp), await info(vp)];
    if (qOk === vOk) return null; // Both unreadable: nothing to compare.
    return {
      ...base,
      kind: "unreadable",
      signature: `unreadable:${vOk ? "qemu" : "vstor"}`,
      detail: `qemu-img cannot open ${vOk ? "QEMU's" : "vstor's"} copy of ${name}: ${
        clip(cmp.output)
      }`,
    };
  }
  if (qs !== vs) {
    return {
      ...base,
      kind: "guest",
      signature: "guest:size",
      detail: `${name}: virtual size qemu ${qs}, vstor ${vs}`,
    };
  }
  if (cmp.code === 0) return null;
  return {
    ...base,
    kind: below ? "layout" : "guest",
    signature: below ? "layout:lower-layer-write" : "guest:bytes",
    detail: `${name}: ${clip(cmp.output)}\n${await firstDifference(qp, vp, fmt, dirs.root)}`,
  };
}

/**
 * Which clusters under a session's compressed writes the layer itself allocates (an L2 entry with
 * a host offset or compressed data), as one string per copy: a compressed write over one fails.
 */
async function compressTargets(c: Case, s: Step, dir: string): Promise<string> {
  if (s.kind !== "io" || c.layers[s.layer]!.format !== "qcow2") return "";
  const ranges = s.cmds.filter((x) => x.op === "compress");
  if (ranges.length === 0) return "";
  const r = await runQemu(
    {
      tool: "qemu-img",
      args: ["map", "--output=json", "-f", "qcow2", join(dir, layerFile(c, s.layer))],
    },
    dir,
  );
  if (r.code !== 0) return `map failed`;
  type Entry = { start: number; length: number; depth: number; data: boolean; offset?: number };
  let map: Entry[];
  try {
    map = JSON.parse(r.output.slice(r.output.indexOf("["))) as Entry[];
  } catch {
    return "map unparsable";
  }
  const own = map.filter((e) => e.depth === 0 && (e.data || e.offset !== undefined));
  return ranges.map((x) =>
    own.filter((e) => e.start < x.offset + x.length && x.offset < e.start + e.length)
      .map((e) =>
        `${Math.max(e.start, x.offset)}+${
          Math.min(e.start + e.length, x.offset + x.length) - Math.max(e.start, x.offset)
        }`
      ).join(",")
  ).join(";");
}

/** Whether a compressed write of the session touches a cluster an earlier request touched. */
function compressAfterTouch(c: Case, s: Step & { kind: "io" }): boolean {
  const layer = c.layers[s.layer]!;
  const cs = layer.format === "qcow2" ? layer.clusterSize : 512;
  const clusters = (x: { offset: number; length: number }) =>
    [
      Math.floor(x.offset / cs),
      Math.floor((x.offset + Math.max(1, x.length) - 1) / cs),
    ] as const;
  return s.cmds.some((x, i) => {
    if (x.op !== "compress") return false;
    const [a, b] = clusters(x);
    return s.cmds.slice(0, i).some((y) => {
      const [p, q] = clusters(y);
      return p <= b && a <= q;
    });
  });
}

interface CheckResult {
  code: number;
  corruptions: number;
  leaks: number;
  text: string;
}

async function check(path: string): Promise<CheckResult> {
  const r = await runQemu(
    { tool: "qemu-img", args: ["check", "--output=json", "-f", "qcow2", path] },
    "/",
  );
  try {
    const json = r.output.slice(r.output.indexOf("{"), r.output.lastIndexOf("}") + 1);
    const j = JSON.parse(json) as Record<string, unknown>;
    return {
      code: r.code,
      corruptions: Number(j["corruptions"] ?? 0),
      leaks: Number(j["leaks"] ?? 0),
      text: clip(r.output, 600),
    };
  } catch {
    return { code: r.code, corruptions: 0, leaks: 0, text: clip(r.output, 600) };
  }
}

async function checkLayer(
  c: Case,
  layer: number,
  dirs: { q: string; v: string },
): Promise<Divergence | null> {
  if (c.layers[layer]!.format !== "qcow2") return null;
  const name = layerFile(c, layer);
  const qp = join(dirs.q, name), vp = join(dirs.v, name);
  if ((await virtualSize(qp, "qcow2")) === null || (await virtualSize(vp, "qcow2")) === null) {
    return null;
  }
  const [q, v] = [await check(qp), await check(vp)];
  const detail = `${name}: qemu-img check of QEMU's copy (exit ${q.code}):\n${q.text}\n` +
    `qemu-img check of vstor's copy (exit ${v.code}):\n${v.text}`;
  const base = { command: -1, layer, detail };
  if (v.corruptions > 0 && q.corruptions === 0) {
    return { ...base, kind: "check-corrupt", signature: "check-corrupt" };
  }
  if (v.leaks > 0 && q.leaks === 0 && q.corruptions === 0) {
    return { ...base, kind: "check-leak", signature: "check-leak" };
  }
  if (v.code === 1 && q.code !== 1) {
    return { ...base, kind: "check-error", signature: "check-error" };
  }
  if ((q.leaks > 0 && v.leaks === 0) || (q.corruptions > 0 && v.corruptions === 0)) {
    return {
      ...base,
      kind: "qemu-only",
      signature: q.corruptions > 0 ? "qemu-only:corrupt" : "qemu-only:leak",
    };
  }
  return null;
}

/**
 * A guest-view difference where QEMU's copy of some layer is corrupt and vstor's is clean is
 * QEMU's (qemu-img 7.2 can overlap a compressed cluster with data it wrote in the same session):
 * noted as "qemu-only", with both sides' check results.
 */
async function blameQemu(
  c: Case,
  dirs: { q: string; v: string },
  d: Divergence,
): Promise<Divergence> {
  if (d.kind !== "guest") return d;
  for (let layer = 0; layer < c.layers.length; layer++) {
    if (c.layers[layer]!.format !== "qcow2") continue;
    const name = layerFile(c, layer);
    const qp = join(dirs.q, name), vp = join(dirs.v, name);
    if ((await virtualSize(qp, "qcow2")) === null || (await virtualSize(vp, "qcow2")) === null) {
      continue;
    }
    const [q, v] = [await check(qp), await check(vp)];
    if (q.corruptions > 0 && v.corruptions === 0) {
      return {
        ...d,
        kind: "qemu-only",
        signature: `qemu-only:corrupt-${d.signature}`,
        detail: `${d.detail}\nqemu-img check of QEMU's copy of ${name} (exit ${q.code}):\n` +
          `${q.text}\nqemu-img check of vstor's copy (exit ${v.code}):\n${v.text}`,
      };
    }
  }
  return d;
}

/** Layers whose guest view a step may change, besides the top: its own and a commit's base. */
function touched(s: Step | undefined, command: number): number[] {
  if (s === undefined) return [command]; // A create: that layer.
  const out = [s.layer];
  if (s.kind === "commit") out.push(s.base ?? Math.max(0, s.layer - 1));
  return out;
}

/**
 * Where the copies go: $VSTOR_FUZZ_TMP, else /dev/shm when present (qemu-img flushes on close, and
 * fdatasync on a disk costs more than the commands), else the system's temporary directory.
 */
function tempDirOption(): { dir?: string } {
  const env = Deno.env.get("VSTOR_FUZZ_TMP");
  if (env !== undefined) return { dir: env };
  try {
    return Deno.statSync("/dev/shm").isDirectory ? { dir: "/dev/shm" } : {};
  } catch {
    return {};
  }
}

/** Play `c` on both sides and return the first divergence (null when none). */
export async function runCase(c: Case, opts: RunOptions = {}): Promise<RunResult> {
  const root = opts.keepDir ??
    await Deno.makeTempDir({ prefix: "vstor-fuzz-", ...tempDirOption() });
  const dirs = { q: join(root, "q"), v: join(root, "v"), root };
  await Deno.mkdir(dirs.q, { recursive: true });
  await Deno.mkdir(dirs.v, { recursive: true });
  const lines = allLines(c);
  const top = c.layers.length - 1;
  /** Each layer's backing layer as the commands left it (rebase changes it). */
  const backing = c.layers.map((_, i) => (i === 0 ? null : i - 1) as number | null);
  /**
   * Layers whose guest view QEMU leaves undefined: those between a `commit -b` base and its top
   * ("all images between BASE and the top image will be invalid", qemu-img(1)), and the top too
   * unless `-d` kept it (it is emptied over an invalid layer).
   */
  const invalid = new Set<number>();
  /** Whether a layer or one in its chain is invalid. */
  const undefinedView = (layer: number) => {
    for (let l: number | null = layer, n = 0; l !== null && n <= c.layers.length; n++) {
      if (invalid.has(l)) return true;
      l = backing[l] ?? null;
    }
    return false;
  };
  let commands = 0;
  try {
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i]!;
      const step = stepOf(c, i);
      const layout = step?.kind === "io" && step.cmds.some((x) => x.op === "compress")
        ? [await compressTargets(c, step, dirs.q), await compressTargets(c, step, dirs.v)]
        : undefined;
      const { qemu, vstor } = await runBoth(line, dirs);
      commands++;
      const both = `qemu printed (exit ${qemu.code}):\n${clip(qemu.output)}\n` +
        `vstor printed (exit ${vstor.code}):\n${clip(vstor.output)}`;
      if (vstor.code === -1) {
        const first = /uncaught: (.*)/.exec(vstor.output)?.[1] ?? "";
        return {
          commands,
          divergence: {
            kind: "crash",
            command: i,
            layer: null,
            signature: `crash:${verbOf(line)}:${first.replace(/\d+/g, "N").slice(0, 80)}`,
            detail: both,
          },
        };
      }
      if (qemu.code === 0 && step?.kind === "rebase") backing[step.layer] = step.backing;
      if (qemu.code === 0 && step?.kind === "commit" && step.base !== null) {
        for (let l = backing[step.layer] ?? null, n = 0; l !== null && l !== step.base; n++) {
          if (n > c.layers.length) break; // A loop: no base below.
          invalid.add(l);
          l = backing[l] ?? null;
        }
        if (!step.drop) invalid.add(step.layer);
      }
      const accept = acceptance(line, qemu, vstor);
      if (accept !== null && step?.kind === "io" && compressAfterTouch(c, step)) {
        return {
          commands,
          divergence: {
            kind: "layout",
            command: i,
            layer: step.layer,
            signature: "layout:compress-in-session",
            detail: `${accept}\na compressed write follows a request to the same cluster in ` +
              `the session: whether it may go there depends on allocation\n${both}`,
          },
        };
      }
      if (accept !== null && layout !== undefined && layout[0] !== layout[1]) {
        return {
          commands,
          divergence: {
            kind: "layout",
            command: i,
            layer: step?.layer ?? null,
            signature: "layout:compress",
            detail: `${accept}\nallocated under the compressed writes before: qemu [${
              layout[0]
            }], vstor [${layout[1]}]\n${both}`,
          },
        };
      }
      if (accept !== null) {
        const side = qemu.code === 0 ? "vstor-refuses" : "qemu-refuses";
        return {
          commands,
          divergence: {
            kind: "accept",
            command: i,
            layer: step?.layer ?? i,
            signature: `accept:${verbOf(line)}:${line.tool === "qemu-io" ? "requests" : side}`,
            detail: `${accept}\n${both}`,
          },
        };
      }
      if (opts.compareEveryStep ?? true) {
        const layers = new Set([...touched(step, i), top]);
        // A write to a lower layer may show through every layer above it: look at them now, so
        // that a layout difference it reveals is told from the command that revealed it.
        if (step?.kind === "io") { for (let l = step.layer + 1; l < top; l++) layers.add(l); }
        for (const layer of layers) {
          if (undefinedView(layer)) continue;
          if (layer > Math.min(i, top)) continue; // Not created yet.
          // A write below a layer shows through it only where the layer left the range to its
          // backing file: such differences come from where each side allocated.
          const below = step?.kind === "io" && step.layer < layer;
          const d = await compareLayer(c, layer, dirs, i, below);
          if (d !== null && d.kind === "guest" && layout !== undefined && layout[0] !== layout[1]) {
            // Compressed writes over clusters allocated on one side only: qcow2 refuses those
            // clusters, so the sides may write different parts of a request.
            return {
              commands,
              divergence: {
                ...d,
                kind: "layout",
                signature: "layout:compress-partial",
                detail: `${d.detail}\nallocated under the compressed writes before: qemu [${
                  layout[0]
                }], vstor [${layout[1]}]`,
              },
            };
          }
          if (d !== null) return { commands, divergence: await blameQemu(c, dirs, d) };
        }
      }
    }
    // At the end: the guest view of every layer, then `qemu-img check` of every qcow2 layer.
    let note: Divergence | null = null;
    for (let layer = 0; layer <= top; layer++) {
      if (undefinedView(layer)) continue;
      const d = await compareLayer(c, layer, dirs, -1);
      if (d !== null) return { commands, divergence: await blameQemu(c, dirs, d) };
    }
    for (let layer = 0; layer <= top; layer++) {
      const d = await checkLayer(c, layer, dirs);
      if (d !== null && isFailure(d)) return { commands, divergence: d };
      note ??= d;
    }
    return { commands, divergence: note };
  } finally {
    if (opts.keepDir === undefined) await Deno.remove(root, { recursive: true });
  }
}
