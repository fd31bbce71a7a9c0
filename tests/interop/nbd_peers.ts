/**
 * Finding the NBD peers of the interop tests: nbdkit, libnbd's nbdinfo and nbdcopy, and (for
 * some tests) fio's `nbd` engine or qemu-nbd. Without them the tests are skipped, unless
 * VSTOR_REQUIRE_NBD=1, when their absence fails the run (as {@linkcode ignoreWithout} in
 * `qemu.ts` does under VSTOR_REQUIRE_QEMU=1). Also what the NBD interop tests share: vstor's CLI
 * run in-process and the shape of its map output.
 *
 * @module
 */
import { main } from "../../src/cli/main.ts";

function succeeds(tool: string, args: string[]): boolean {
  try {
    return new Deno.Command(tool, { args, stdin: "null", stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

/** True when the NBD peer tests must run. */
export const requireNbd = Deno.env.get("VSTOR_REQUIRE_NBD") === "1";

/** A tool some tests need besides nbdkit, nbdinfo and nbdcopy. */
export type NbdExtra = "fio" | "qemu-nbd";

function present(tool: string): boolean {
  // fio counts only with its nbd engine (built with libnbd).
  return tool === "fio" ? succeeds("fio", ["--enghelp=nbd"]) : succeeds(tool, ["--version"]);
}

/**
 * Whether nbdkit, nbdinfo or nbdcopy (or one of `also`) is missing and tests needing them should
 * be ignored. Throws under VSTOR_REQUIRE_NBD=1.
 */
export function ignoreWithoutNbd(...also: NbdExtra[]): boolean {
  const missing = ["nbdkit", "nbdinfo", "nbdcopy", ...also].filter((t) => !present(t));
  if (missing.length === 0) return false;
  if (requireNbd) {
    throw new Error(`VSTOR_REQUIRE_NBD=1 but ${missing.join(", ")} not installed`);
  }
  return true;
}

/** What a CLI run gave. */
export interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

/** The vstor CLI in-process. */
export async function vstor(...args: string[]): Promise<Result> {
  let stdout = "", stderr = "";
  const code = await main(args, {
    stdout: (t) => stdout += t,
    stderr: (t) => stderr += t,
  });
  return { code, stdout, stderr };
}

/** A run's exit code and output, for assertion messages. */
export function show(r: Result): string {
  return `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
}

/** `-c CMD` for each command (qemu-io's and vstor io's). */
export function cmds(list: string[]): string[] {
  return list.flatMap((c) => ["-c", c]);
}

/** One entry of `map --output=json`, the fields the tests look at. */
export interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
  offset?: number;
}

/** Bytes a map says are data. */
export function dataBytes(map: MapEntry[]): number {
  return map.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
}
