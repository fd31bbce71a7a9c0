/**
 * A case as a runnable shell script: the commands through qemu-img/qemu-io in one directory, the
 * same through `deno run -A mod.ts` in another, then the comparisons the runner makes.
 *
 * @module
 */
import { fileURLToPath } from "node:url";
import { allLines, type Case, describeLayer, layerFile, lineText, shellQuote } from "./case.ts";
import type { Divergence } from "./run.ts";

/** mod.ts of this checkout, for the vstor half of a script. */
export const MOD_TS = fileURLToPath(new URL("../../../mod.ts", import.meta.url));

/** The reproducer script of `c`, headed by what diverged. */
export function reproducer(c: Case, d: Divergence | null, title: string): string {
  const lines = allLines(c);
  const out = [
    "#!/bin/sh",
    `# ${title}`,
    ...(d === null ? [] : [
      `# ${d.kind} (${d.signature})${
        d.command >= 0 ? ` after command ${d.command + 1}` : " at the end"
      }${d.layer === null ? "" : `, layer ${d.layer}`}`,
    ]),
    ...c.layers.map((l, i) => `#   L${i}: ${describeLayer(l)}`),
    "Q=$(mktemp -d) V=$(mktemp -d)",
    `VSTOR="deno run -A ${shellQuote(MOD_TS)}"`,
    'cd "$(mktemp -d)"',
    ...lines.map((l) => `${lineText(l, "Q")} || echo "  -> exit $?"`),
    ...lines.map((l) => `${lineText(l, "V", "$VSTOR")} || echo "  -> exit $?"`),
    "# guest views (QEMU reads both copies) and checks of vstor's copy",
    ...c.layers.map((l, i) =>
      `qemu-img compare -f ${l.format} -F ${l.format} "$Q/${layerFile(c, i)}" "$V/${
        layerFile(c, i)
      }"`
    ),
    ...c.layers.flatMap((l, i) =>
      l.format === "qcow2"
        ? [
          `qemu-img check -f qcow2 "$Q/${layerFile(c, i)}"`,
          `qemu-img check -f qcow2 "$V/${layerFile(c, i)}"`,
        ]
        : []
    ),
  ];
  return out.join("\n") + "\n";
}

/** What the two sides printed, as shell comments under a reproducer. */
export function detailComment(d: Divergence): string {
  return d.detail.split("\n").map((l) => `# | ${l}`).join("\n") + "\n";
}
