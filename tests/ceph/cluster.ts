/**
 * A throwaway one-node Ceph cluster for the RBD interop tests (#19): started by
 * `tests/ceph/one_node.sh` on first use, once per test process, and stopped when the process
 * unloads (or, should it crash, by the watcher the script leaves behind). Without Ceph's tools the
 * tests are skipped, unless VSTOR_REQUIRE_CEPH=1 (as CI sets), when their absence — or a cluster
 * that fails to start — fails the run.
 *
 * @module
 */

/** A running cluster: what a client needs to reach it. */
export interface CephCluster {
  /** Path of its `ceph.conf` (names the monitor, the keyring and fail-fast client timeouts). */
  conf: string;
  /** Path of the `client.admin` keyring. */
  keyring: string;
  /** A pool initialised for RBD. */
  pool: string;
}

/** Result of running a tool. */
export interface CephToolResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** True when the Ceph tests must run. */
export const requireCeph = Deno.env.get("VSTOR_REQUIRE_CEPH") === "1";

const SCRIPT = `${import.meta.dirname}/one_node.sh`;
/** What `one_node.sh` needs (the first four named, the rest ship in the same packages). */
const TOOLS = ["ceph-mon", "ceph-osd", "ceph", "rbd", "ceph-authtool", "monmaptool", "timeout"];
const INSTALL = "apt-get install --no-install-recommends ceph-mon ceph-osd ceph-common";
/** Bound on `one_node.sh start` as a whole; it normally takes about 2 s. */
const START_LIMIT_S = 120;
/** Bound on one `rbd` command. */
const RBD_LIMIT_S = 60;

function onPath(tool: string): boolean {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    if (dir === "") continue;
    try {
      const info = Deno.statSync(`${dir}/${tool}`);
      if (info.isFile && ((info.mode ?? 0o111) & 0o111) !== 0) return true;
    } catch {
      // not in this directory
    }
  }
  return false;
}

/** The tools of {@linkcode TOOLS} that are not on PATH. */
function missingTools(): string[] {
  return TOOLS.filter((tool) => !onPath(tool));
}

/**
 * Whether the Ceph tests should be ignored (its tools are missing), for `Deno.test({ ignore })`.
 * Throws under VSTOR_REQUIRE_CEPH=1 when they are missing.
 */
export const ignoreWithoutCeph: boolean = (() => {
  const missing = missingTools();
  if (missing.length === 0) return false;
  if (requireCeph) {
    throw new Error(`VSTOR_REQUIRE_CEPH=1 but ${missing.join(", ")} missing (${INSTALL})`);
  }
  return true;
})();

function decode(bytes: Uint8Array): string {
  return new TextDecoder().decode(bytes);
}

async function run(
  cmd: string,
  args: string[],
  env?: Record<string, string>,
): Promise<CephToolResult> {
  const out = await new Deno.Command(cmd, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    ...(env === undefined ? {} : { env }),
  }).output();
  return { code: out.code, stdout: decode(out.stdout), stderr: decode(out.stderr) };
}

/** `one_node.sh stop DIR`, synchronously (it runs from the unload event). */
function stopSync(dir: string): void {
  try {
    const out = new Deno.Command("timeout", {
      args: ["-k", "5", "30", SCRIPT, "stop", dir],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).outputSync();
    if (!out.success) console.error(`ceph: stopping ${dir} failed:\n${decode(out.stderr)}`);
  } catch (e) {
    console.error(`ceph: stopping ${dir} failed: ${e}`);
  }
}

/** Cannot test; skip (saying why, once), or fail under VSTOR_REQUIRE_CEPH=1. */
function unavailable(reason: string): null {
  if (requireCeph) throw new Error(`VSTOR_REQUIRE_CEPH=1 but ${reason}`);
  console.warn(`ceph: skipping the Ceph tests: ${reason}`);
  return null;
}

async function start(): Promise<CephCluster | null> {
  const missing = missingTools();
  if (missing.length > 0) return unavailable(`${missing.join(", ")} missing (${INSTALL})`);
  // Under /tmp whatever TMPDIR says: admin socket paths must stay under 108 bytes.
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "vstor-ceph-" });
  globalThis.addEventListener("unload", () => stopSync(dir));
  const out = await run("timeout", ["-k", "5", String(START_LIMIT_S), SCRIPT, "start", dir], {
    VSTOR_CEPH_OWNER_PID: String(Deno.pid),
  });
  const conf = out.stdout.trim();
  if (out.code !== 0 || conf !== `${dir}/ceph.conf`) {
    stopSync(dir);
    // The tools are here: a cluster that will not start is a broken setup, never a skip.
    throw new Error(
      `the one-node cluster did not start (exit ${out.code}):\n${out.stderr.slice(-4000)}`,
    );
  }
  return { conf, keyring: `${dir}/keyring`, pool: "rbd" };
}

let cluster: Promise<CephCluster | null> | undefined;

/**
 * The cluster of this process, started on first call; null when Ceph's tools are missing (or it
 * failed to start) and the caller should skip.
 *
 * @throws {Error} under VSTOR_REQUIRE_CEPH=1 when the tools are missing or the cluster fails to
 * start
 */
export function cephCluster(): Promise<CephCluster | null> {
  cluster ??= start();
  return cluster;
}

/**
 * Runs the `rbd` CLI against the cluster (`rbd -c CONF ...args`), bounded in time.
 *
 * @throws {Error} when there is no cluster
 */
export async function rbd(...args: string[]): Promise<CephToolResult> {
  const c = await cephCluster();
  if (c === null) throw new Error("rbd: no Ceph cluster (check cephCluster() first)");
  return await run("timeout", ["-k", "5", String(RBD_LIMIT_S), "rbd", "-c", c.conf, ...args]);
}
