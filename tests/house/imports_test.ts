/**
 * The house shows its plan (#14): no import cycle between files, none between folders, and every
 * edge points down the layers of the rule table below. Each README of `src/`, `formats/`, `tests/`
 * and `bench/` states the same rules in prose; change both together.
 *
 * @module
 */

import assert from "node:assert/strict";
import { resolve } from "node:path";
import {
  findCycles,
  folderOf,
  type ImportEdge,
  type ImportGraph,
  readImportGraph,
  specifiers,
} from "./import_graph.ts";

const ROOT = resolve(import.meta.dirname!, "../..");
const ROOTS = ["src", "formats", "mod.ts"];

/** A layer: the files under `prefix` (the longest matching prefix wins) and what they may import. */
interface Layer {
  readonly prefix: string;
  /** Folder prefixes (ending in `/`) and exact files a file of the layer may import. */
  readonly may: readonly string[];
  /** The rule in words, for the failure message. */
  readonly rule: string;
}

const GROUND = ["src/errors.ts", "src/sys/"];

/** The layering of the architecture, bottom up. */
const LAYERS: readonly Layer[] = [
  { prefix: "src/errors.ts", may: [], rule: "src/errors.ts imports nothing" },
  {
    prefix: "src/sys/",
    may: ["src/errors.ts", "src/sys/"],
    rule: "src/sys/ imports only src/errors.ts and itself",
  },
  {
    prefix: "src/host/",
    may: [...GROUND, "src/host/"],
    rule: "src/host/ imports only src/errors.ts, src/sys/ and itself",
  },
  {
    prefix: "src/block/",
    may: [...GROUND, "src/host/", "src/block/"],
    rule: "src/block/ imports only src/errors.ts, src/sys/, src/host/ and itself",
  },
  {
    prefix: "formats/",
    may: [...GROUND, "src/host/", "src/block/", "formats/"],
    rule: "formats/ imports only src/errors.ts, src/sys/, src/host/, src/block/ and itself",
  },
  {
    prefix: "src/scsi/",
    may: [...GROUND, "src/block/", "src/scsi/"],
    rule: "src/scsi/ (the SCSI target) imports only src/errors.ts, src/sys/, src/block/ and itself",
  },
  {
    prefix: "src/ata/",
    may: [...GROUND, "src/ata/"],
    rule: "src/ata/ (the ATA/AHCI vocabulary: numbers only) imports only src/errors.ts, src/sys/ " +
      "and itself",
  },
  {
    prefix: "src/virtio/",
    may: [...GROUND, "src/virtio/"],
    rule: "src/virtio/ imports only src/errors.ts, src/sys/ and itself: never guest, devices, " +
      "machine or cli",
  },
  {
    prefix: "src/devices/",
    may: [
      ...GROUND,
      "src/host/",
      "src/block/",
      "formats/",
      "src/scsi/",
      "src/ata/",
      "src/virtio/",
      "src/devices/",
    ],
    rule: "src/devices/ imports the layers below it (errors, sys, host, block, formats, scsi, " +
      "ata, virtio) and itself: never guest, machine or cli",
  },
  {
    prefix: "src/machine/",
    may: [
      ...GROUND,
      "src/host/",
      "src/block/",
      "formats/",
      "src/scsi/",
      "src/ata/",
      "src/virtio/",
      "src/devices/",
      "src/machine/",
    ],
    rule: "src/machine/ imports the layers below it and src/devices/: never guest or cli " +
      "(the vCPU entry is handed to it)",
  },
  {
    prefix: "src/guest/",
    may: [
      ...GROUND,
      "src/virtio/",
      "src/scsi/constants.ts",
      "src/scsi/sense.ts",
      "src/scsi/cdb.ts",
      "src/ata/",
      "src/guest/",
    ],
    rule: "src/guest/ talks to devices through rings and registers only: it imports " +
      "src/errors.ts, src/sys/, src/virtio/, the SCSI vocabulary (src/scsi/constants.ts, " +
      "sense.ts, cdb.ts), the ATA/AHCI vocabulary (src/ata/) and itself; never devices, " +
      "machine, formats, block, host or cli",
  },
  {
    prefix: "src/serve/",
    may: [
      ...GROUND,
      "src/host/",
      "src/block/",
      "formats/",
      "src/scsi/",
      "src/ata/",
      "src/virtio/",
      "src/devices/",
      "src/serve/",
    ],
    rule: "src/serve/ (daemons: vhost-user, NBD) imports the layers below it and src/devices/: " +
      "never guest, machine or cli",
  },
  {
    prefix: "src/cli/",
    may: ["src/", "formats/"],
    rule: "src/cli/ sits on top and may import all of src/ and formats/",
  },
  {
    prefix: "mod.ts",
    may: ["src/", "formats/"],
    rule: "mod.ts may import all of src/ and formats/",
  },
];

/**
 * Folder cycles known today, each with the change that removes it. The test fails when one of them
 * is gone (take it off the list) as well as when a new one appears. None today.
 */
const KNOWN_FOLDER_CYCLES = new Set<string>([]);

function layerOf(file: string): Layer | undefined {
  let best: Layer | undefined;
  for (const layer of LAYERS) {
    const match = layer.prefix.endsWith("/")
      ? file.startsWith(layer.prefix)
      : file === layer.prefix;
    if (match && (best === undefined || layer.prefix.length > best.prefix.length)) best = layer;
  }
  return best;
}

function allowed(layer: Layer, to: string): boolean {
  return layer.may.some((m) => m.endsWith("/") ? to.startsWith(m) : to === m);
}

/** Every edge that breaks its layer's rule, as `from:line → to breaks "rule"`. */
function layeringViolations(graph: ImportGraph): string[] {
  const out: string[] = [];
  for (const file of graph.files) {
    if (layerOf(file) === undefined) {
      out.push(`${file} belongs to no layer of the rule table: add its folder to LAYERS`);
    }
  }
  for (const e of graph.edges) {
    const layer = layerOf(e.from);
    if (layer === undefined || allowed(layer, e.to)) continue;
    out.push(`${e.from}:${e.line} → ${e.to} (${e.kind}) breaks "${layer.rule}"`);
  }
  return out;
}

function fileCycles(graph: ImportGraph): string[] {
  return findCycles(graph.files, graph.edges.map((e) => [e.from, e.to] as const))
    .map((c) => c.join(" → "));
}

function folderCycles(graph: ImportGraph): string[] {
  const edges = graph.edges
    .filter((e) => folderOf(e.from) !== folderOf(e.to))
    .map((e) => [folderOf(e.from), folderOf(e.to)] as const);
  return findCycles([...new Set(graph.files.map(folderOf))], edges).map((c) => c.join(" → "));
}

/** The edges that make a folder cycle, so the message says which imports to cut. */
function edgesOf(graph: ImportGraph, cycle: string): string[] {
  const folders = cycle.split(" → ");
  const out: string[] = [];
  for (let k = 0; k + 1 < folders.length; k++) {
    const [a, b] = [folders[k]!, folders[k + 1]!];
    for (const e of graph.edges) {
      if (folderOf(e.from) === a && folderOf(e.to) === b) {
        out.push(`  ${e.from}:${e.line} → ${e.to}`);
      }
    }
  }
  return out;
}

const graph = await readImportGraph(ROOT, ROOTS);

Deno.test("no import cycle between files of src/, formats/ and mod.ts", () => {
  const cycles = fileCycles(graph);
  assert.deepEqual(cycles, [], `import cycles between files:\n${cycles.join("\n")}`);
});

Deno.test("no import cycle between folders", () => {
  const cycles = folderCycles(graph);
  const unknown = cycles.filter((c) => !KNOWN_FOLDER_CYCLES.has(c));
  assert.deepEqual(
    unknown,
    [],
    `import cycles between folders:\n${
      unknown.map((c) => [c, ...edgesOf(graph, c)].join("\n")).join("\n")
    }`,
  );
  const gone = [...KNOWN_FOLDER_CYCLES].filter((c) => !cycles.includes(c));
  assert.deepEqual(
    gone,
    [],
    `known folder cycles that are gone: take them off KNOWN_FOLDER_CYCLES`,
  );
});

Deno.test("every import points down the layers", () => {
  const broken = layeringViolations(graph);
  assert.deepEqual(broken, [], `layering broken:\n${broken.join("\n")}`);
});

Deno.test("the import graph sees every kind of edge", () => {
  const source = [
    'import { a } from "./a.ts";',
    'import type { B } from "./b.ts";',
    'import "./c.ts";',
    'export { d } from "./d.ts";',
    'export * as e from "./e.ts";',
    'export type { F } from "./f.ts";',
    'const g = await import("./g.ts");',
    'type H = typeof import("./h.ts");',
    'const i = new URL("./i.ts", import.meta.url);',
    '// import { no } from "./comment.ts";',
    '/* export * from "./block_comment.ts"; */',
    'const s = "import x from \\"./string.ts\\"";',
    'const t = `import("./template.ts") ${`nested ${1}`}`;',
    'const r = /import "\\.\\/regex.ts"/;',
    "const j = new URL(import.meta.url);",
    "import {",
    "  k,",
    '} from "./k.ts";',
  ].join("\n");
  assert.deepEqual(specifiers(source).map((s) => `${s.kind} ${s.specifier} ${s.line}`), [
    "import ./a.ts 1",
    "import ./b.ts 2",
    "import ./c.ts 3",
    "export ./d.ts 4",
    "export ./e.ts 5",
    "export ./f.ts 6",
    "dynamic ./g.ts 7",
    "dynamic ./h.ts 8",
    "url ./i.ts 9",
    "import ./k.ts 18",
  ]);
});

Deno.test("cycles and layering breaks are reported edge by edge", () => {
  const edges: ImportEdge[] = [
    { from: "src/host/a.ts", to: "src/block/b.ts", line: 3, kind: "import" },
    { from: "src/block/b.ts", to: "src/host/a.ts", line: 4, kind: "import" },
  ];
  const toy: ImportGraph = { files: ["src/block/b.ts", "src/host/a.ts"], edges };
  assert.deepEqual(fileCycles(toy), ["src/block/b.ts → src/host/a.ts → src/block/b.ts"]);
  assert.deepEqual(folderCycles(toy), ["src/block → src/host → src/block"]);
  assert.deepEqual(layeringViolations(toy), [
    'src/host/a.ts:3 → src/block/b.ts (import) breaks "src/host/ imports only src/errors.ts, ' +
    'src/sys/ and itself"',
  ]);
});
