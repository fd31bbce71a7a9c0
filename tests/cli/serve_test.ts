/**
 * `vstor serve` as a command: --daemonize returns once the export listens (the daemon in its own
 * session, its pid in the pid file), SIGTERM ends it with the socket and pid file removed; a daemon
 * that cannot start makes --daemonize fail with its error; usage mistakes exit 2.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { EXIT_USAGE, main } from "../../src/cli/main.ts";

const MOD = new URL("../../mod.ts", import.meta.url).pathname;

async function vstor(...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MOD, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

Deno.test("vstor serve --daemonize returns once the export listens; SIGTERM stops the daemon clean", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vstor_daemonize_" });
  try {
    const image = join(dir, "d.raw"), sock = join(dir, "v.sock"), pid = join(dir, "d.pid");
    await Deno.writeFile(image, new Uint8Array(1 << 20));
    const r = await vstor(
      "serve",
      image,
      "-f",
      "raw",
      "--vhost-user-blk",
      sock,
      "--daemonize",
      "--pidfile",
      pid,
    );
    assert.equal(r.code, 0, r.stderr);
    assert.ok(exists(sock), "listening when the command returns");
    const daemonPid = Number(Deno.readTextFileSync(pid).trim());
    assert.ok(daemonPid > 0 && daemonPid !== Deno.pid);
    // Its own session: detached from this one's terminal and signals.
    const stat = Deno.readTextFileSync(`/proc/${daemonPid}/stat`);
    const session = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[3]);
    assert.equal(session, daemonPid, "the daemon leads its own session");
    Deno.kill(daemonPid, "SIGTERM");
    for (let i = 0; i < 100 && exists(`/proc/${daemonPid}`); i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.ok(!exists(sock) && !exists(pid), "socket and pid file removed at the end");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("vstor serve --daemonize fails with the daemon's error when it cannot start", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vstor_daemonize_" });
  try {
    const r = await vstor(
      "serve",
      join(dir, "missing.raw"),
      "-f",
      "raw",
      "--vhost-user-blk",
      join(dir, "v.sock"),
      "--daemonize",
    );
    assert.equal(r.code, 1);
    assert.match(r.stderr, /Could not open '.*missing\.raw': No such file or directory/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("vstor serve usage mistakes exit 2 naming the option", async () => {
  let stderr = "";
  const code = await main(["serve", "--export", "type=fuse,id=e,node-name=n"], {
    stdout: () => {},
    stderr: (t) => stderr += t,
  });
  assert.equal(code, EXIT_USAGE);
  assert.match(stderr, /export type 'fuse' is not supported/);
});
