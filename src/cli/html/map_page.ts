/**
 * The page of `vstor map --html`: the guest view (every cluster of the virtual disk coloured by
 * where its data lives through the chain) and, for qcow2, the host view (what each cluster of the
 * top image's file holds), with legends, the chain and the figures. Draws what
 * {@linkcode imageClusterMap} computed; computes nothing itself.
 *
 * @module
 */
import {
  type CellGrid,
  cellRange,
  type GuestClusterMap,
  type HostView,
  type ImageClusterMap,
  majorityOf,
} from "../../../formats/cluster_map.ts";
import { HOST_METADATA } from "../../../formats/qcow2/host_map.ts";
import {
  el,
  escapeHtml,
  figures,
  formatBytes,
  legend,
  page,
  percent,
  svg,
  svgRect,
  table,
  text,
} from "./page.ts";

/** Colours of the guest classes; backing layers take {@linkcode BACKING_COLORS} by depth. */
const GUEST_COLORS: Record<string, string> = {
  data: "#2e9d5b",
  zero: "#c9ced6",
  unallocated: "#ffffff",
  compressed: "#e8912d",
};

/** Backing layers by depth (1 first), repeating past the last. */
const BACKING_COLORS = ["#3b7dd8", "#7a5bd1", "#b04fb8", "#2aa6b8", "#5d6fa3", "#a3597a"];

const HOST_COLORS: Record<string, string> = {
  "header": "#1d2330",
  "refcount-table": "#8b1e3f",
  "refcount-block": "#c2456b",
  "l1": "#1f4e96",
  "snapshot-table": "#6a4c93",
  "snapshot-l1": "#9c7cc9",
  "l2": "#5c9ae0",
  "bitmap": "#c9a227",
  "compressed": "#e8912d",
  "data": "#2e9d5b",
  "leaked": "#e03c31",
  "free": "#ffffff",
};

const HOST_LABELS: Record<string, string> = {
  "header": "header",
  "refcount-table": "refcount table",
  "refcount-block": "refcount blocks",
  "l1": "L1 table",
  "snapshot-table": "snapshot table",
  "snapshot-l1": "snapshot L1 tables",
  "l2": "L2 tables",
  "bitmap": "bitmaps",
  "compressed": "compressed data",
  "data": "data",
  "leaked": "leaked (refcount, no reference)",
  "free": "free",
};

/** A view's grid: up to 4096 cells in 64 columns of big cells, more in 128 columns of small ones. */
function layout(cells: number): { columns: number; pitch: number } {
  return cells <= 4096 ? { columns: 64, pitch: 14 } : { columns: 128, pitch: 7 };
}

function guestColor(cls: string): string {
  const depth = /^backing-(\d+)$/.exec(cls);
  if (depth === null) return GUEST_COLORS[cls] ?? "#000000";
  return BACKING_COLORS[(Number(depth[1]) - 1) % BACKING_COLORS.length]!;
}

function guestLabel(cls: string, map: GuestClusterMap): string {
  const depth = /^backing-(\d+)$/.exec(cls);
  if (depth !== null) {
    const layer = map.layers[Number(depth[1])];
    return `backing depth ${depth[1]}${
      layer === undefined ? "" : ` (${baseName(layer.filename)})`
    }`;
  }
  return {
    data: "data (this layer)",
    zero: "zero (reads as zeroes)",
    unallocated: "unallocated (nothing in the chain: zeroes)",
    compressed: "compressed (this layer)",
  }[cls] ?? cls;
}

function baseName(path: string): string {
  return path.slice(path.lastIndexOf("/") + 1);
}

const hex = (n: number) => `0x${n.toString(16)}`;

/** The CSS rules giving each class its fill: `svg rect.PREFIX-CLASS { fill: … }`. */
function fills(prefix: string, colors: [string, string][]): string {
  return colors.map(([cls, color]) => `rect.${prefix}-${cls}{fill:${color}}`).join("\n");
}

/**
 * A view's grid: one rect per cell, class `cell PREFIX-CLASS` for its majority class, with a
 * tooltip giving its range and its counts per class.
 */
function grid(
  opts: {
    id: string;
    prefix: string;
    label: string;
    grid: CellGrid;
    classes: readonly string[];
    clusterSize: number;
    /** Words for a cell's range, e.g. "guest" or "host". */
    space: string;
  },
): string {
  const g = opts.grid;
  const { columns: most, pitch } = layout(g.cells);
  const columns = Math.max(1, Math.min(most, g.cells));
  const rows = Math.ceil(g.cells / columns);
  const rects: string[] = [];
  for (let cell = 0; cell < g.cells; cell++) {
    const cls = opts.classes[majorityOf(g, cell)]!;
    const { first, count } = cellRange(g, cell);
    const parts: string[] = [];
    for (let c = 0; c < g.classes; c++) {
      const n = g.counts[cell * g.classes + c]!;
      if (n > 0) parts.push(count === 1 ? opts.classes[c]! : `${opts.classes[c]} ${n}`);
    }
    const clusters = count === 1 ? `cluster ${first}` : `clusters ${first}–${first + count - 1}`;
    const bytes = `${opts.space} ${hex(first * opts.clusterSize)}–${
      hex((first + count) * opts.clusterSize - 1)
    }`;
    rects.push(svgRect({
      x: (cell % columns) * pitch,
      y: Math.floor(cell / columns) * pitch,
      width: pitch - 1,
      height: pitch - 1,
      title: `${clusters} (${bytes}): ${parts.join(", ")}`,
      attrs: { class: `cell ${opts.prefix}-${cls}` },
    }));
  }
  return svg({
    width: Math.max(pitch, columns * pitch - 1),
    height: Math.max(pitch, rows * pitch - 1),
    label: opts.label,
    attrs: { id: opts.id, "data-cells": g.cells },
  }, rects);
}

function cellNote(g: CellGrid, what: string): string {
  return g.unit === 1
    ? `One cell per ${what} cluster (${g.cells} cells).`
    : `${g.cells} cells of ${g.unit} ${what} clusters each; a cell has the colour of the class ` +
      "most of its clusters have (hover for the counts).";
}

function guestSection(map: GuestClusterMap): string {
  const cs = map.clusterSize;
  const count = (cls: string) => map.counts[map.classes.indexOf(cls)] ?? 0;
  const rows = map.classes.map((cls, i) => [
    { html: el("span", { class: "swatch-inline", style: `background:${guestColor(cls)}` }) },
    guestLabel(cls, map),
    map.counts[i]!,
    percent(map.counts[i]!, map.clusters),
  ]);
  const frag = map.fragmentation;
  const allocated = count("data") + count("compressed");
  return [
    el("h2", {}, "Guest view: where each cluster of the virtual disk reads from"),
    el("p", { class: "note" }, escapeHtml(cellNote(map.cells, "guest"))),
    legend(map.classes.map((cls, i) => ({
      color: guestColor(cls),
      label: guestLabel(cls, map),
      detail: String(map.counts[i]),
    }))),
    grid({
      id: "guest-map",
      prefix: "g",
      label: "guest clusters by where their data lives",
      grid: map.cells,
      classes: map.classes,
      clusterSize: cs,
      space: "guest",
    }),
    el("h2", {}, "Figures"),
    figures([
      ["virtual size", `${formatBytes(map.size)} (${map.size} bytes)`],
      ["cluster size", `${formatBytes(cs)} (${cs} bytes)`],
      ["guest clusters", map.clusters],
      [
        "chain depth",
        `${map.layers.length - 1} (${map.layers.length} layer${
          map.layers.length === 1 ? "" : "s"
        })`,
      ],
      ["allocated in this layer", `${allocated} (${percent(allocated, map.clusters)})`],
      ["zero", `${count("zero")} (${percent(count("zero"), map.clusters)})`],
      ["compressed", `${count("compressed")} (${percent(count("compressed"), map.clusters)})`],
      ["unallocated", `${count("unallocated")} (${percent(count("unallocated"), map.clusters)})`],
      ["data clusters mapped 1:1 (this layer)", frag.dataClusters],
      ["host runs of that data", frag.hostRuns],
      [
        "fragmentation",
        `${frag.discontiguousPairs} of ${frag.adjacentPairs} guest-consecutive data cluster ` +
        `pairs are not consecutive on the host (${
          percent(frag.discontiguousPairs, frag.adjacentPairs)
        })`,
      ],
    ]),
    el("h3", {}, "Clusters by class"),
    table(["", "class", "clusters", "share"], rows),
    el("h3", {}, "Chain"),
    table(
      ["depth", "file", "format", "virtual size", "cluster size", "clusters read from it"],
      map.layers.map((layer) => [
        layer.depth,
        { html: el("code", {}, text(layer.filename)) },
        layer.format,
        formatBytes(layer.size),
        layer.clusterSize === undefined ? "—" : formatBytes(layer.clusterSize),
        layer.depth === 0 ? allocated : count(`backing-${layer.depth}`),
      ]),
    ),
  ].join("\n");
}

function hostSection(host: HostView | undefined, top: string): string {
  if (host === undefined) {
    return [
      el("h2", {}, "Host view"),
      el(
        "p",
        { class: "note", id: "host-none" },
        `${
          text(baseName(top))
        } is not qcow2: its host file is the guest disk itself, as the guest view shows.`,
      ),
    ].join("\n");
  }
  const metadata = HOST_METADATA.reduce((sum, cls) => sum + host.counts[cls], 0);
  const present = host.classes.filter((cls) => host.counts[cls] > 0 || cls === "free");
  return [
    el("h2", {}, `Host view: what each cluster of ${text(baseName(host.filename))} holds`),
    el("p", { class: "note" }, escapeHtml(cellNote(host.cells, "host"))),
    legend(present.map((cls) => ({
      color: HOST_COLORS[cls]!,
      label: HOST_LABELS[cls]!,
      detail: String(host.counts[cls]),
    }))),
    grid({
      id: "host-map",
      prefix: "h",
      label: "host clusters by what they hold",
      grid: host.cells,
      classes: host.classes,
      clusterSize: host.clusterSize,
      space: "host",
    }),
    figures([
      ["host file size", `${formatBytes(host.fileSize)} (${host.fileSize} bytes)`],
      ["host clusters", host.clusters],
      ["metadata", `${metadata} (${percent(metadata, host.clusters)})`],
      ["data", `${host.counts.data} (${percent(host.counts.data, host.clusters)})`],
      ["compressed", `${host.counts.compressed}`],
      ["leaked", `${host.counts.leaked}`],
      ["free", `${host.counts.free}`],
      ...(host.conflicts + host.corruptions > 0
        ? [[
          "inconsistencies",
          `${host.conflicts} clusters in two roles, ${host.corruptions} corruptions (run vstor check)`,
        ] as [string, string]]
        : []),
    ]),
    table(
      ["", "holds", "host clusters", "share"],
      present.map((cls) => [
        { html: el("span", { class: "swatch-inline", style: `background:${HOST_COLORS[cls]}` }) },
        HOST_LABELS[cls]!,
        host.counts[cls],
        percent(host.counts[cls], host.clusters),
      ]),
    ),
  ].join("\n");
}

/**
 * The whole page for `map` of the image at `filename`.
 *
 * @example
 * ```ts
 * import { createImage, openImage } from "../../../formats/open.ts";
 * import { imageClusterMap } from "../../../formats/cluster_map.ts";
 * import { renderMapPage } from "./map_page.ts";
 * const path = Deno.makeTempFileSync({ suffix: ".qcow2" });
 * await createImage(path, "qcow2", 1 << 20);
 * const node = await openImage(path);
 * const html = renderMapPage(await imageClusterMap(node));
 * await node.close();
 * Deno.removeSync(path);
 * if (!html.includes('id="guest-map"') || !html.includes('id="host-map"')) throw new Error("page");
 * ```
 */
export function renderMapPage(map: ImageClusterMap): string {
  const top = map.guest.layers[0]!;
  const colors: [string, string][] = map.guest.classes.map((cls) => [cls, guestColor(cls)]);
  const css = [
    "svg#guest-map, svg#host-map { background: #e4e7ec; margin: 8px 0 12px; }",
    ".swatch-inline { width: 12px; height: 12px; display: inline-block; border: 1px solid #0003; }",
    "h3 { font-size: 14px; margin: 16px 0 4px; }",
    fills("g", colors),
    fills("h", Object.entries(HOST_COLORS)),
  ].join("\n");
  const body = [
    el("h1", {}, `vstor map: ${text(baseName(top.filename))}`),
    el(
      "p",
      { class: "note" },
      `${el("code", {}, text(top.filename))} · ${text(top.format)} · ${
        text(formatBytes(top.size))
      } · chain depth ${map.guest.layers.length - 1}`,
    ),
    guestSection(map.guest),
    hostSection(map.host, top.filename),
  ].join("\n");
  return page({ title: `vstor map ${baseName(top.filename)}`, body, css });
}
