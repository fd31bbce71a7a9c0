/**
 * What every HTML report of the CLI shares (`vstor map --html`, `vstor run --html`): escaping, a
 * self-contained page shell with inline CSS (a Content-Security-Policy that forbids every network
 * fetch), SVG pieces, a legend, tables and figures, and writing the page with one clear error.
 * Everything returns markup as a string; text and attribute values are escaped here, so callers
 * pass plain text.
 *
 * @module
 */

/**
 * Escape text for HTML content and attribute values (`&`, `<`, `>`, `"`, `'`).
 *
 * @example
 * ```ts
 * import { escapeHtml } from "./page.ts";
 * if (escapeHtml(`<a href="x">&</a>`) !== "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;") {
 *   throw new Error("escapeHtml");
 * }
 * ```
 */
export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]!);
}

const ESCAPES: Record<string, string> = {
  "&": "&amp;",
  "<": "&lt;",
  ">": "&gt;",
  '"': "&quot;",
  "'": "&#39;",
};

/** Attribute values: `undefined` and `false` leave the attribute out, `true` writes it bare. */
export type Attrs = Record<string, string | number | boolean | undefined>;

/** ` name="value"…` for `attrs`, escaped, in insertion order. */
export function attrs(values: Attrs): string {
  let out = "";
  for (const [name, value] of Object.entries(values)) {
    if (value === undefined || value === false) continue;
    out += value === true ? ` ${name}` : ` ${name}="${escapeHtml(String(value))}"`;
  }
  return out;
}

/**
 * One element: `<tag attrs>children</tag>`. `children` is markup (already escaped: use
 * {@linkcode escapeHtml} or {@linkcode text} for plain text).
 */
export function el(tag: string, attributes: Attrs = {}, children: string | string[] = ""): string {
  const inner = Array.isArray(children) ? children.join("") : children;
  return `<${tag}${attrs(attributes)}>${inner}</${tag}>`;
}

/** Plain text as markup (escaped). */
export function text(value: string | number): string {
  return escapeHtml(String(value));
}

/** The CSS every page gets; a page adds its own through {@linkcode PageOptions.css}. */
export const BASE_CSS = `
:root { color-scheme: light; --fg: #1d2330; --muted: #5c6577; --line: #d7dbe3; --bg: #fff; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1200px; padding: 16px 24px 48px; color: var(--fg);
  background: var(--bg); font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
h1 { font-size: 20px; margin: 8px 0 4px; }
h2 { font-size: 16px; margin: 24px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
p.note { color: var(--muted); margin: 4px 0 8px; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f8; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.figures { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 6px 0 12px; }
dl.figures dt { color: var(--muted); }
dl.figures dd { margin: 0; font-variant-numeric: tabular-nums; }
ul.legend { list-style: none; padding: 0; margin: 6px 0 10px; display: flex; flex-wrap: wrap; gap: 6px 18px; }
ul.legend li { display: flex; align-items: center; gap: 6px; }
ul.legend .swatch { width: 14px; height: 14px; border: 1px solid #0003; display: inline-block; }
svg { display: block; max-width: 100%; height: auto; }
svg rect.cell:hover { stroke: #000; stroke-width: 1; }
`;

/** What a page is made of. */
export interface PageOptions {
  /** The document title (plain text). */
  title: string;
  /** The body (markup). */
  body: string;
  /** CSS added after {@linkcode BASE_CSS}. */
  css?: string;
  /** An inline script (plain JavaScript), run at the end of the body. */
  script?: string;
}

/**
 * A whole self-contained HTML document: inline CSS, optional inline script, and a
 * Content-Security-Policy that lets the page fetch nothing (no network, fonts or images from
 * outside), so what it shows is all in the file.
 *
 * @example
 * ```ts
 * import { page } from "./page.ts";
 * const doc = page({ title: "a < b", body: "<p>hi</p>" });
 * if (!doc.startsWith("<!DOCTYPE html>") || !doc.includes("<title>a &lt; b</title>")) {
 *   throw new Error("page");
 * }
 * ```
 */
export function page(opts: PageOptions): string {
  const csp = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; " +
    "img-src data:";
  return [
    "<!DOCTYPE html>",
    '<html lang="en">',
    "<head>",
    '<meta charset="utf-8">',
    `<meta http-equiv="Content-Security-Policy" content="${escapeHtml(csp)}">`,
    '<meta name="viewport" content="width=device-width, initial-scale=1">',
    `<title>${escapeHtml(opts.title)}</title>`,
    `<style>${BASE_CSS}${opts.css ?? ""}</style>`,
    "</head>",
    "<body>",
    opts.body,
    opts.script === undefined ? "" : `<script>${safeScript(opts.script)}</script>`,
    "</body>",
    "</html>",
    "",
  ].join("\n");
}

/** A script's text made safe inside `<script>`: no `</script` can end it early. */
function safeScript(script: string): string {
  return script.replace(/<\/(script)/gi, "<\\/$1");
}

/** An inline `<svg>` of `width` × `height` user units; `label` becomes its accessible name. */
export function svg(
  opts: { width: number; height: number; label: string; attrs?: Attrs },
  children: string | string[],
): string {
  return el("svg", {
    xmlns: "http://www.w3.org/2000/svg",
    width: opts.width,
    height: opts.height,
    viewBox: `0 0 ${opts.width} ${opts.height}`,
    role: "img",
    "aria-label": opts.label,
    ...opts.attrs,
  }, children);
}

/** An SVG rectangle; `title` (plain text) becomes its tooltip, `attrs` go on the rect. */
export function svgRect(
  r: { x: number; y: number; width: number; height: number; title?: string; attrs?: Attrs },
): string {
  const geometry = attrs({ x: r.x, y: r.y, width: r.width, height: r.height, ...r.attrs });
  return r.title === undefined
    ? `<rect${geometry}/>`
    : `<rect${geometry}><title>${escapeHtml(r.title)}</title></rect>`;
}

/** SVG text (plain) at `x`, `y`. */
export function svgText(t: { x: number; y: number; text: string; attrs?: Attrs }): string {
  return el("text", { x: t.x, y: t.y, ...t.attrs }, escapeHtml(t.text));
}

/** One legend entry: a colour swatch, a label and an optional figure (plain text). */
export interface LegendItem {
  color: string;
  label: string;
  detail?: string;
}

/** A legend: one swatch per item, in order. */
export function legend(items: LegendItem[]): string {
  return el(
    "ul",
    { class: "legend" },
    items.map((item) =>
      el("li", {}, [
        el("span", { class: "swatch", style: `background:${item.color}` }),
        el("span", {}, escapeHtml(item.label)),
        item.detail === undefined ? "" : el("span", { class: "mono" }, escapeHtml(item.detail)),
      ])
    ),
  );
}

/** A cell of {@linkcode table}: plain text, or a number (right-aligned), or markup. */
export type Cell = string | number | { html: string };

/** A table with a header row; numbers are right-aligned, strings escaped. */
export function table(headers: string[], rows: Cell[][]): string {
  const cell = (tag: "th" | "td", c: Cell) =>
    typeof c === "number"
      ? el(tag, { class: "num" }, text(c))
      : typeof c === "string"
      ? el(tag, {}, escapeHtml(c))
      : el(tag, {}, c.html);
  return el("table", {}, [
    el("thead", {}, el("tr", {}, headers.map((h) => cell("th", h)))),
    el("tbody", {}, rows.map((row) => el("tr", {}, row.map((c) => cell("td", c))))),
  ]);
}

/** Named figures as a definition list (`label: value`), both plain text. */
export function figures(items: [label: string, value: string | number][]): string {
  return el(
    "dl",
    { class: "figures" },
    items.map(([label, value]) => el("dt", {}, escapeHtml(label)) + el("dd", {}, text(value))),
  );
}

const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/**
 * A byte count in binary units with up to three significant digits (`"64 KiB"`, `"4.5 GiB"`).
 *
 * @example
 * ```ts
 * import { formatBytes } from "./page.ts";
 * const shown = [512, 65536, 983040, 4.5 * 2 ** 30].map(formatBytes).join(", ");
 * if (shown !== "512 B, 64 KiB, 960 KiB, 4.5 GiB") throw new Error(shown);
 * ```
 */
export function formatBytes(bytes: number): string {
  let value = bytes, unit = 0;
  while (Math.abs(value) >= 1024 && unit < BYTE_UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  const digits = Number.isInteger(value)
    ? 0
    : Math.abs(value) < 10
    ? 2
    : Math.abs(value) < 100
    ? 1
    : 0;
  const shown = value.toFixed(digits).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  return `${shown} ${BYTE_UNITS[unit]}`;
}

/** `part` of `whole` as a percentage with one decimal (`"12.5%"`), `"0%"` for an empty whole. */
export function percent(part: number, whole: number): string {
  return whole === 0 ? "0%" : `${(part / whole * 100).toFixed(1)}%`;
}

/**
 * Write a page to `path`; a failure (missing directory, no permission, a directory in the way)
 * becomes one clear error naming the file.
 *
 * @throws {Error} `Could not write 'PATH': REASON`
 */
export function writePage(path: string, html: string): void {
  if (path === "") throw new Error("Could not write the page: empty file name");
  try {
    Deno.writeTextFileSync(path, html);
  } catch (e) {
    // Deno's message ends with "(os error N): open '…'"; the reason is what is before it.
    const reason = e instanceof Error ? e.message.replace(/ \(os error \d+\).*$/s, "") : String(e);
    throw new Error(`Could not write '${path}': ${reason}`);
  }
}
