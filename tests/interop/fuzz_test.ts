/**
 * The differential fuzzer in CI: random chains of raw/qcow2 layers and random commands played
 * through qemu-img/qemu-io on one copy and through vstor on another, over fixed seeds printed in
 * the test names. A divergence that is vstor's (a command accepted by one side only, a different
 * guest view, corruption or leaks only in vstor's copy, a crash) fails the test with a shrunk
 * reproducer shell script; QEMU-only leaks and compressed writes refused because the allocation
 * differed are listed, not failed. VSTOR_FUZZ_CASES sets the cases per seed; long runs use
 * `deno run -A tests/interop/fuzz/main.ts --seed N --cases M`.
 */
import { ignoreWithout } from "./qemu.ts";
import { caseSeed, DEFAULT_GENERATE, generateCase } from "./fuzz/generate.ts";
import { type Divergence, isFailure, runCase } from "./fuzz/run.ts";
import { ddmin, shape, shrink, withoutLayer } from "./fuzz/shrink.ts";
import assert from "node:assert/strict";
import { detailComment, reproducer } from "./fuzz/script.ts";
import { allLines, type Case, lineText } from "./fuzz/case.ts";

const ignore = ignoreWithout("qemu-img") || ignoreWithout("qemu-io");
const CASES = Number(Deno.env.get("VSTOR_FUZZ_CASES") ?? "100");
const SEEDS = [0x13, 0x1313, 0x131313];
/** Cases stay small in CI: up to 3 layers and 10 commands. */
const GENERATE = { ...DEFAULT_GENERATE, maxLayers: 3, maxSteps: 10 };
/** Distinct failures shrunk per seed (shrinking reruns the case many times). */
const SHRINK_AT_MOST = 2;

for (const seed of SEEDS) {
  Deno.test({
    name: `vstor and QEMU agree on ${CASES} random chains and commands (fuzz seed ${seed})`,
    ignore,
    sanitizeResources: false,
    sanitizeOps: false,
    fn: async () => {
      const failures: string[] = [];
      const notes: string[] = [];
      const shrunkSignatures = new Set<string>();
      for (let k = 0; k < CASES; k++) {
        const id = `seed ${seed} case ${k}`;
        const c: Case = generateCase(caseSeed(seed, k), GENERATE);
        const { divergence } = await runCase(c);
        if (divergence === null) continue;
        if (!isFailure(divergence)) {
          notes.push(`${id}: ${divergence.signature}`);
          continue;
        }
        if (shrunkSignatures.has(divergence.signature) || shrunkSignatures.size >= SHRINK_AT_MOST) {
          failures.push(`${id}: ${divergence.signature} (not shrunk)`);
          continue;
        }
        shrunkSignatures.add(divergence.signature);
        const s = await shrink(c, divergence, { maxRuns: 150, maxMillis: 20_000 });
        const d: Divergence = s.divergence;
        failures.push(
          `${id}: ${shape(s.case, d)}\n${reproducer(s.case, d, `vstor fuzz ${id}`)}${
            detailComment(d)
          }`,
        );
      }
      if (notes.length > 0) console.log(`not vstor failures:\n  ${notes.join("\n  ")}`);
      if (failures.length > 0) {
        throw new Error(
          `${failures.length} of ${CASES} cases diverged (replay one with ` +
            `deno run -A tests/interop/fuzz/main.ts --seed ${seed} --case K ` +
            `--layers ${GENERATE.maxLayers} --steps ${GENERATE.maxSteps}):\n\n` +
            failures.join("\n"),
        );
      }
    },
  });
}

Deno.test("ddmin() keeps exactly the elements a failure needs", async () => {
  const items = Array.from({ length: 40 }, (_, i) => i);
  const needed = [3, 17, 31];
  let runs = 0;
  const kept = await ddmin(items, async (candidate) => {
    runs++;
    return needed.every((n) => candidate.includes(n));
  });
  assert.deepEqual(kept, needed);
  assert.ok(runs < 200, `${runs} runs`);
});

Deno.test("withoutLayer() re-links the chain and renumbers the commands", () => {
  const c = generateCase(caseSeed(7, 0), { maxLayers: 1, maxSteps: 1, maxIoCmds: 1 });
  const layer = c.layers[0]!;
  const three: Case = {
    layers: [layer, { ...layer, format: "qcow2" }, { ...layer, format: "qcow2" }],
    steps: [
      { kind: "resize", layer: 2, size: 1024, shrink: false },
      { kind: "rebase", layer: 2, backing: 0, unsafe: true },
      { kind: "snapshot", layer: 1, op: "create", name: "s1" },
    ],
  };
  const two = withoutLayer(three, 1);
  assert.equal(two.layers.length, 2);
  assert.deepEqual(two.steps, [
    { kind: "resize", layer: 1, size: 1024, shrink: false },
    { kind: "rebase", layer: 1, backing: 0, unsafe: true },
  ]);
  // The overlay that was L2 is created on L0, now as L1.
  assert.match(lineText(allLines(two)[1]!, "Q"), /-b L0\.\w+ -F \w+ "\$Q"\/L1\.qcow2/);
});
