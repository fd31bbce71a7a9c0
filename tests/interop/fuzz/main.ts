/**
 * The differential fuzzer's command line, for long runs:
 *
 * ```sh
 * deno run -A tests/interop/fuzz/main.ts --seed 1 --cases 1000 [--verbose] [--no-shrink]
 *   [--layers 4] [--steps 14] [--out DIR] [--case K]
 * ```
 *
 * Case `k` of seed `S` is generated from `caseSeed(S, k)`, so `--seed S --case K` replays one.
 * Each divergence is shrunk and printed as a shell script once per distinct shape; `--out` also
 * writes the scripts there. Exit 1 when any divergence failed vstor (QEMU-only findings are
 * listed but do not fail the run).
 *
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { caseSeed, DEFAULT_GENERATE, generateCase } from "./generate.ts";
import { type Divergence, isFailure, runCase } from "./run.ts";
import { shape, shrink } from "./shrink.ts";
import { detailComment, reproducer } from "./script.ts";
import type { Case } from "./case.ts";

interface Finding {
  shape: string;
  count: number;
  first: string;
  script: string;
  failure: boolean;
}

async function fuzz(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      seed: { type: "string", default: "1" },
      cases: { type: "string", default: "100" },
      case: { type: "string" },
      layers: { type: "string" },
      steps: { type: "string" },
      out: { type: "string" },
      verbose: { type: "boolean", default: false },
      "no-shrink": { type: "boolean", default: false },
    },
  });
  const seed = Number(values.seed);
  const first = values.case === undefined ? 0 : Number(values.case);
  const count = values.case === undefined ? Number(values.cases) : 1;
  const gen = {
    ...DEFAULT_GENERATE,
    ...(values.layers === undefined ? {} : { maxLayers: Number(values.layers) }),
    ...(values.steps === undefined ? {} : { maxSteps: Number(values.steps) }),
  };
  if (values.out !== undefined) await Deno.mkdir(values.out, { recursive: true });
  const log = (s: string) => console.log(s);
  const findings = new Map<string, Finding>();
  const started = Date.now();
  let commands = 0, diverged = 0;

  for (let k = first; k < first + count; k++) {
    const id = `seed ${seed} case ${k}`;
    const c: Case = generateCase(caseSeed(seed, k), gen);
    const r = await runCase(c);
    commands += r.commands;
    if (values.verbose) {
      log(
        `${id}: ${c.layers.length} layers, ${c.steps.length} steps: ${
          r.divergence === null ? "same" : r.divergence.signature
        }`,
      );
    }
    if (r.divergence === null) continue;
    diverged++;
    let small = c, d: Divergence = r.divergence;
    if (!values["no-shrink"]) {
      const s = await shrink(c, r.divergence);
      [small, d] = [s.case, s.divergence];
    }
    const key = shape(small, d);
    const known = findings.get(key);
    if (known !== undefined) {
      known.count++;
      log(`${id}: ${d.signature} (known: ${key})`);
      continue;
    }
    const script = reproducer(small, d, `vstor fuzz ${id}`) + detailComment(d);
    findings.set(key, { shape: key, count: 1, first: id, script, failure: isFailure(d) });
    log(`\n==== ${id}: new divergence: ${key}\n${script}`);
    if (values.out !== undefined) {
      const name = `seed${seed}-case${k}-${d.signature.replace(/[^a-z0-9]+/gi, "_")}.sh`;
      await Deno.writeTextFile(join(values.out, name), script);
    }
  }

  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  log(
    `\nseed ${seed}: ${count} cases, ${commands} commands per side, ${diverged} diverged, ` +
      `${findings.size} distinct shapes, ${seconds} s`,
  );
  for (const f of findings.values()) log(`  ${f.count}× ${f.shape}   (first: ${f.first})`);
  return [...findings.values()].some((f) => f.failure) ? 1 : 0;
}

if (import.meta.main) Deno.exit(await fuzz(Deno.args));
