/**
 * The README's examples run in order, as written, in one fresh temporary directory: one bash
 * session runs every ```sh example from the top, so a file a later example needs is one an earlier
 * example made, and a `cd` or `export` carries on as in a newcomer's terminal. The extraction and
 * comparison rules are in `readme_examples.ts`. A failure names the README line of the example.
 */
import assert from "node:assert/strict";
import { dirname, join, resolve } from "node:path";
import {
  type Example,
  extractExamples,
  outputMatches,
  skipReason,
  SKIPS,
} from "./readme_examples.ts";

const REPO = resolve(import.meta.dirname!, "..");
const README = join(REPO, "README.md");

/**
 * Examples that fail because of a vstor bug, by command text: the test requires them to still fail
 * (and says so when one passes, so the entry goes when the bug is fixed).
 */
const KNOWN_FAILURES: { command: string; reason: string }[] = [];

/** The whole session's time limit. */
const LIMIT_MS = 240_000;

/** Deno's cache, kept when HOME changes (so the session needs no network). */
async function denoDir(): Promise<string> {
  const info = await new Deno.Command(Deno.execPath(), { args: ["info", "--json"] }).output();
  return JSON.parse(new TextDecoder().decode(info.stdout)).denoDir;
}

function bashSession(examples: Example[], results: string): string {
  const out = [
    `vstor() { "$VSTOR_DENO" run -A "$VSTOR_REPO/mod.ts" "$@"; }`,
    `cd "$VSTOR_WORK" || exit 99`,
    "ulimit -c 0", // `vstor io -c abort` dumps no core
  ];
  examples.forEach((ex, i) => {
    const r = `${results}/${i}`;
    const body = ex.kind === "file"
      ? `cmp -- '${r}.expected' '${ex.file!.replaceAll("'", "'\\''")}'`
      : ex.text.replaceAll("/path/to/vstor", REPO);
    out.push(`echo ${i} >'${results}/current'; t=$EPOCHREALTIME`, `{`, body);
    out.push(`} </dev/null >'${r}.out' 2>&1`, `echo "$? $t $EPOCHREALTIME" >'${r}.rc'`);
  });
  return out.join("\n") + "\n";
}

Deno.test({
  name: "README.md: every sh example runs in order on a fresh clone and prints what it shows",
  sanitizeResources: false,
  fn: async () => {
    const all = extractExamples(await Deno.readTextFile(README));
    const skipped = all.filter((ex) => skipReason(ex) !== undefined);
    const run = all.filter((ex) => skipReason(ex) === undefined);
    for (const s of SKIPS) {
      assert.ok(
        all.some((ex) => s.pattern.test(ex.text)),
        `skip rule ${s.pattern} matches nothing`,
      );
    }
    const tmp = await Deno.makeTempDir({ prefix: "vstor_readme_" });
    try {
      const work = join(tmp, "work"), home = join(tmp, "home"), results = join(tmp, "results");
      for (const d of [work, home, results]) await Deno.mkdir(d);
      for (const [i, ex] of run.entries()) {
        if (ex.kind === "file") {
          await Deno.writeTextFile(
            join(results, `${i}.expected`),
            ex.text.replaceAll("/path/to/vstor", REPO),
          );
        }
      }
      const script = join(tmp, "session.sh");
      await Deno.writeTextFile(script, bashSession(run, results));
      const started = performance.now();
      const out = await new Deno.Command("bash", {
        args: [script],
        cwd: work,
        env: {
          HOME: home,
          TMPDIR: tmp,
          DENO_DIR: await denoDir(),
          PATH: `${dirname(Deno.execPath())}:${Deno.env.get("PATH") ?? "/usr/bin:/bin"}`,
          VSTOR_DENO: Deno.execPath(),
          VSTOR_REPO: REPO,
          VSTOR_WORK: work,
        },
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(LIMIT_MS),
      }).output().catch(async (e) => {
        const current = await Deno.readTextFile(join(results, "current")).catch(() => "0");
        const ex = run[Number(current)]!;
        throw new Error(`README.md:${ex.line}: \`${ex.text}\` still running after ${LIMIT_MS} ms`, {
          cause: e,
        });
      });
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      console.log(`${run.length} README examples ran in ${seconds} s; skipped:`);
      for (const ex of skipped) {
        console.log(`  README.md:${ex.line}: ${ex.text} — ${skipReason(ex)}`);
      }

      const failures: string[] = [];
      const times: [number, Example][] = [];
      for (const [i, ex] of run.entries()) {
        const where = `README.md:${ex.line}: ${ex.text}`;
        const status = await Deno.readTextFile(join(results, `${i}.rc`)).catch(() => undefined);
        const [rc, from, to] = status?.split(" ").map(Number) ?? [];
        if (from !== undefined && to !== undefined) times.push([to - from, ex]);
        const output = await Deno.readTextFile(join(results, `${i}.out`)).catch(() => "");
        let problem: string | undefined;
        if (status === undefined) {
          problem = `did not run (the session ended: exit ${out.code})\n${
            new TextDecoder().decode(out.stderr)
          }`;
        } else if (rc !== ex.exit) {
          problem = ex.kind === "file"
            ? `${ex.file} does not hold the text shown`
            : `exit ${rc}, expected ${ex.exit}; output:\n${output}`;
        } else if (ex.expected !== null) {
          const lines = output.replace(/\n$/, "").split("\n");
          if (!outputMatches(ex.expected, lines)) {
            problem = `output differs; expected:\n${ex.expected.join("\n")}\nactual:\n${output}`;
          }
        }
        const known = KNOWN_FAILURES.find((k) => ex.text.startsWith(k.command));
        if (known && problem === undefined) {
          failures.push(`${where}\n  passes now: remove it from KNOWN_FAILURES (${known.reason})`);
        } else if (known) {
          console.log(`  known failure, README.md:${ex.line}: ${known.reason}`);
        } else if (problem !== undefined) failures.push(`${where}\n  ${problem}`);
      }
      times.sort((a, b) => b[0] - a[0]);
      console.log("slowest:");
      for (const [t, ex] of times.slice(0, 8)) {
        console.log(`  ${t.toFixed(2)} s README.md:${ex.line}: ${ex.text.split("\n")[0]}`);
      }
      for (const k of KNOWN_FAILURES) {
        assert.ok(run.some((ex) => ex.text.startsWith(k.command)), `no example ${k.command}`);
      }
      if (failures.length > 0) {
        throw new Error(`${failures.length} README example(s) failed:\n\n${failures.join("\n\n")}`);
      }
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
});

Deno.test("readme_examples: transcripts, continuations, [exit N], … and dates", () => {
  const md = [
    "text `f.txt`:",
    "```sh",
    "#!/bin/sh",
    "echo hi",
    "```",
    "```sh",
    "$ a \\",
    "    b",
    "x 2026-01-02 03:04:05 y",
    "…",
    "$ c",
    "[exit 3]",
    "```",
    "```sh",
    "mkdir d && cd d",
    "",
    "e",
    "```",
  ].join("\n");
  const ex = extractExamples(md);
  assert.deepEqual(ex.map((e) => [e.line, e.kind, e.text, e.expected, e.exit, e.file]), [
    [3, "file", "#!/bin/sh\necho hi\n", null, 0, "f.txt"],
    [7, "command", "a \\\n    b", ["x 2026-01-02 03:04:05 y", "…"], 0, undefined],
    [11, "command", "c", null, 3, undefined],
    [15, "command", "mkdir d && cd d", null, 0, undefined],
    [17, "command", "e", null, 0, undefined],
  ]);
  assert.ok(outputMatches(["x 2026-01-02 03:04:05 y", "…"], ["x 1999-12-31 23:59:59 y"]));
  assert.ok(outputMatches(["x 2026-01-02 03:04:05 y", "…"], ["x 1999-12-31 23:59:59 y", "1", "2"]));
  assert.ok(!outputMatches(["x 2026-01-02 03:04:05 y"], ["x 1999-12-31 23:59 y"]));
  assert.ok(outputMatches(["a (…)", "b"], ["a (1.2 MiB/sec)", "b"]));
  assert.ok(!outputMatches(["a (…)", "b"], ["a (1.2 MiB/sec)", "b", "c"]));
  assert.ok(!outputMatches(["a.b"], ["axb"]));
  assert.ok(outputMatches(["…", "z"], ["z"]));
});
