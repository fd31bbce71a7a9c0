/**
 * A real browser for tests of HTML pages: Debian's `chromium`, headless, driven over the DevTools
 * protocol (a WebSocket). {@linkcode inspectPage} loads one page from a file and reports what a
 * user would see go wrong — console errors, uncaught exceptions, network requests (a
 * self-contained page makes none) — and the values of JavaScript expressions evaluated in it.
 * Without chromium the tests are skipped ({@linkcode ignoreWithoutChromium}), unless
 * VSTOR_REQUIRE_CHROMIUM=1 (as CI sets), when its absence fails the run.
 *
 * @module
 */
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

/** The browser binary (Debian's package and command name). */
export const CHROMIUM = "chromium";

/** True when tests needing chromium must run. */
export const requireChromium = Deno.env.get("VSTOR_REQUIRE_CHROMIUM") === "1";

function haveChromium(): boolean {
  try {
    return new Deno.Command(CHROMIUM, { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

/**
 * Whether tests needing chromium should be ignored: true when it is not installed, unless
 * VSTOR_REQUIRE_CHROMIUM=1, when its absence throws (the run fails instead of skipping).
 *
 * @throws {Error} under VSTOR_REQUIRE_CHROMIUM=1 when chromium is missing
 */
export function ignoreWithoutChromium(): boolean {
  if (haveChromium()) return false;
  if (requireChromium) throw new Error(`VSTOR_REQUIRE_CHROMIUM=1 but ${CHROMIUM} is not installed`);
  return true;
}

/** One console message or log entry of the page. */
export interface ConsoleEntry {
  /** `error`, `warning`, `log`, … (console API type or Log entry level). */
  level: string;
  text: string;
}

/** What loading a page showed. */
export interface PageReport {
  /** Each check's value (JSON-serialisable, as the expression returned it). */
  values: Record<string, unknown>;
  /** Every console message and browser log entry. */
  console: ConsoleEntry[];
  /** The console messages and log entries of level error (or assert). */
  consoleErrors: string[];
  /** Uncaught exceptions (Runtime.exceptionThrown), with their text and description. */
  exceptions: string[];
  /** Every request the page made beyond the page itself (URL). */
  requests: string[];
  /** Requests that failed, the page's own included (`URL: reason`). */
  failedRequests: string[];
}

/** Options of {@linkcode inspectPage}. */
export interface InspectOptions {
  /** The whole inspection fails after this many milliseconds (default 30 s): a hang is a failure. */
  timeoutMs?: number;
  /** Viewport width and height in CSS pixels (default 1200 × 900). */
  viewport?: { width: number; height: number };
}

type Json = Record<string, unknown>;

interface CdpMessage {
  id?: number;
  method?: string;
  params?: Json;
  result?: Json;
  error?: { message: string };
  sessionId?: string;
}

/** A DevTools protocol connection: commands with replies, and events to listeners. */
class Cdp {
  readonly #ws: WebSocket;
  #next = 1;
  readonly #pending = new Map<number, { ok: (r: Json) => void; fail: (e: Error) => void }>();
  readonly #listeners: ((m: CdpMessage) => void)[] = [];
  #closed: Error | undefined;

  private constructor(ws: WebSocket) {
    this.#ws = ws;
    ws.onmessage = (ev) => {
      const msg = JSON.parse(String(ev.data)) as CdpMessage;
      if (msg.id !== undefined) {
        const waiter = this.#pending.get(msg.id);
        this.#pending.delete(msg.id);
        if (msg.error) waiter?.fail(new Error(`DevTools: ${msg.error.message}`));
        else waiter?.ok(msg.result ?? {});
        return;
      }
      for (const listener of this.#listeners) listener(msg);
    };
    ws.onclose = () => this.#fail(new Error("DevTools connection closed"));
  }

  static connect(url: string): Promise<Cdp> {
    return new Promise((ok, fail) => {
      const ws = new WebSocket(url);
      ws.onopen = () => ok(new Cdp(ws));
      ws.onerror = (e) =>
        fail(new Error(`DevTools connection failed: ${(e as ErrorEvent).message}`));
    });
  }

  #fail(e: Error): void {
    this.#closed ??= e;
    for (const waiter of this.#pending.values()) waiter.fail(e);
    this.#pending.clear();
  }

  send(method: string, params: Json = {}, sessionId?: string): Promise<Json> {
    if (this.#closed) return Promise.reject(this.#closed);
    const id = this.#next++;
    return new Promise((ok, fail) => {
      this.#pending.set(id, { ok, fail });
      this.#ws.send(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }));
    });
  }

  on(listener: (m: CdpMessage) => void): void {
    this.#listeners.push(listener);
  }

  /** Close the socket and wait until it is closed. */
  async close(): Promise<void> {
    if (this.#ws.readyState === WebSocket.CLOSED) return;
    const closed = new Promise<void>((ok) =>
      this.#ws.addEventListener("close", () => ok(), { once: true })
    );
    this.#ws.close();
    await closed;
  }
}

/** The running browser: its process, its stderr (drained, tail kept) and its profile dir. */
interface Browser {
  child: Deno.ChildProcess;
  profile: string;
  stderrTail: string[];
  devtools: Promise<string>;
  drained: Promise<void>;
  reader: ReadableStreamDefaultReader<string>;
}

function launch(): Browser {
  const profile = Deno.makeTempDirSync({ prefix: "vstor_chromium_" });
  const child = new Deno.Command(CHROMIUM, {
    args: [
      "--headless=new",
      "--no-sandbox",
      "--disable-gpu",
      "--remote-debugging-port=0",
      `--user-data-dir=${profile}`,
      "--no-first-run",
      "--no-default-browser-check",
      "--disable-extensions",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--mute-audio",
      "about:blank",
    ],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  const stderrTail: string[] = [];
  let found: (url: string) => void = () => {};
  let missing: (e: Error) => void = () => {};
  const devtools = new Promise<string>((ok, fail) => [found, missing] = [ok, fail]);
  // Read stderr to its end (chromium writes to it all along) and pick out the DevTools URL.
  const drained = (async () => {
    let pending = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pending += value;
        const lines = pending.split("\n");
        pending = lines.pop()!;
        for (const line of lines) {
          stderrTail.push(line);
          if (stderrTail.length > 20) stderrTail.shift();
          const m = /DevTools listening on (ws:\/\/\S+)/.exec(line);
          if (m) found(m[1]!);
        }
      }
    } catch {
      // Cancelled at cleanup.
    }
    missing(new Error(`chromium ended without a DevTools URL:\n${stderrTail.join("\n")}`));
  })();
  devtools.catch(() => {});
  return { child, profile, stderrTail, devtools, drained, reader };
}

/** Stop chromium (politely over DevTools, then SIGKILL) and remove its profile. */
async function shutdown(browser: Browser, cdp: Cdp | undefined): Promise<void> {
  const exited = browser.child.status;
  const wait = (ms: number) =>
    new Promise<boolean>((ok) => {
      const t = setTimeout(() => ok(false), ms);
      exited.then(() => {
        clearTimeout(t);
        ok(true);
      });
    });
  if (cdp !== undefined) {
    await Promise.race([cdp.send("Browser.close").catch(() => {}), wait(2000)]);
    await cdp.close().catch(() => {});
  }
  if (!(await wait(3000))) {
    try {
      browser.child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
    await exited;
  }
  // Its helper processes may hold stderr open a little longer: stop reading rather than wait.
  await browser.reader.cancel().catch(() => {});
  await browser.drained;
  for (let attempt = 0; attempt < 10; attempt++) {
    try {
      Deno.removeSync(browser.profile, { recursive: true });
      return;
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) return;
      // A helper may still be writing into the profile.
      await new Promise((ok) => setTimeout(ok, 100));
    }
  }
}

function remoteText(arg: Json): string {
  if ("value" in arg) return typeof arg.value === "string" ? arg.value : JSON.stringify(arg.value);
  return String(arg.description ?? arg.type ?? "");
}

/**
 * Load the page at `htmlPath` in headless chromium and evaluate `checks` in it after its load
 * event: each is a JavaScript expression (`document.querySelectorAll('svg rect').length`), its
 * value returned by value. Chromium runs with a fresh profile, removed afterwards, and is stopped
 * whatever happens.
 *
 * @param htmlPath the page's file
 * @param checks name → JavaScript expression
 * @returns what the page logged, threw and requested, and each check's value
 * @throws {Error} when chromium cannot start, the page cannot load, a check throws, or all this
 *   takes longer than `timeoutMs`
 */
export async function inspectPage(
  htmlPath: string,
  checks: Record<string, string>,
  opts: InspectOptions = {},
): Promise<PageReport> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const browser = launch();
  let cdp: Cdp | undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const watchdog = new Promise<never>((_, fail) => {
    timer = setTimeout(
      () =>
        fail(
          new Error(
            `chromium did not finish inspecting ${htmlPath} within ${timeoutMs} ms:\n` +
              browser.stderrTail.join("\n"),
          ),
        ),
      timeoutMs,
    );
  });
  try {
    const run = async (): Promise<PageReport> => {
      cdp = await Cdp.connect(await browser.devtools);
      return await inspect(cdp, resolve(htmlPath), checks, opts);
    };
    return await Promise.race([run(), watchdog]);
  } finally {
    clearTimeout(timer);
    await shutdown(browser, cdp);
  }
}

async function inspect(
  cdp: Cdp,
  path: string,
  checks: Record<string, string>,
  opts: InspectOptions,
): Promise<PageReport> {
  const url = pathToFileURL(path).href;
  const report: PageReport = {
    values: {},
    console: [],
    consoleErrors: [],
    exceptions: [],
    requests: [],
    failedRequests: [],
  };
  const { targetId } = await cdp.send("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await cdp.send("Target.attachToTarget", { targetId, flatten: true }) as {
    sessionId: string;
  };
  const requestUrls = new Map<string, string>();
  let loaded: () => void = () => {};
  const load = new Promise<void>((ok) => loaded = ok);
  cdp.on((msg) => {
    if (msg.sessionId !== sessionId) return;
    const p = msg.params ?? {};
    switch (msg.method) {
      case "Page.loadEventFired":
        loaded();
        break;
      case "Runtime.consoleAPICalled": {
        const text = ((p.args ?? []) as Json[]).map(remoteText).join(" ");
        const level = String(p.type);
        report.console.push({ level, text });
        if (level === "error" || level === "assert") report.consoleErrors.push(text);
        break;
      }
      case "Log.entryAdded": {
        const entry = p.entry as { level: string; text: string; url?: string };
        report.console.push({ level: entry.level, text: entry.text });
        if (entry.level === "error") {
          report.consoleErrors.push(entry.url ? `${entry.text} (${entry.url})` : entry.text);
        }
        break;
      }
      case "Runtime.exceptionThrown": {
        const d = p.exceptionDetails as { text: string; exception?: { description?: string } };
        report.exceptions.push(`${d.text} ${d.exception?.description ?? ""}`.trim());
        break;
      }
      case "Network.requestWillBeSent": {
        const requestUrl = (p.request as { url: string }).url;
        requestUrls.set(String(p.requestId), requestUrl);
        if (requestUrl !== url) report.requests.push(requestUrl);
        break;
      }
      case "Network.loadingFailed":
        report.failedRequests.push(
          `${requestUrls.get(String(p.requestId)) ?? "?"}: ${p.errorText}${
            p.blockedReason ? ` (${p.blockedReason})` : ""
          }`,
        );
        break;
    }
  });
  for (const domain of ["Runtime", "Log", "Page", "Network"]) {
    await cdp.send(`${domain}.enable`, {}, sessionId);
  }
  const viewport = opts.viewport ?? { width: 1200, height: 900 };
  await cdp.send("Emulation.setDeviceMetricsOverride", {
    ...viewport,
    deviceScaleFactor: 1,
    mobile: false,
  }, sessionId);
  const nav = await cdp.send("Page.navigate", { url }, sessionId);
  if (nav.errorText) throw new Error(`chromium could not load ${url}: ${nav.errorText}`);
  await load;
  for (const [name, expression] of Object.entries(checks)) {
    const r = await cdp.send("Runtime.evaluate", {
      expression,
      returnByValue: true,
      awaitPromise: true,
    }, sessionId) as { result: { value?: unknown }; exceptionDetails?: { text: string } };
    if (r.exceptionDetails) {
      throw new Error(
        `check '${name}' (${expression}) threw: ${JSON.stringify(r.exceptionDetails)}`,
      );
    }
    report.values[name] = r.result.value;
  }
  return report;
}
