/**
 * `vstor io` and the qemu-io drop-in: qemu-io 7.2's command line and command language over a
 * {@linkcode BlockNode}, printing what qemu-io prints, byte for byte (timing lines aside).
 *
 * This file is the session loop: the image opened, the commands run from `-c` or stdin, output
 * batched, signals raised. The pieces live in `src/cli/qemu_io/`: `command_line.ts` (the options,
 * usage and help), `text.ts` (getopt, numbers, strerror, patterns),
 * `ranges.ts` (byte-granular I/O), `open.ts` (cache/aio/discard modes, `-o` options, the `-s`
 * overlay), `session.ts` (the open image, checks, aio completions), `commands.ts` (the table) and
 * the commands by concern: `io_commands.ts`, `aio_commands.ts`, `image_commands.ts`,
 * `process_commands.ts`.
 *
 * Two faces, one parser: {@linkcode qemuIoMain} answers as qemu-io (messages start `qemu-io:`,
 * usage on stdout, exit 1 for every failure); {@linkcode ioMain} is `vstor io` (messages start
 * `vstor:`, usage errors exit 2, and `-o OPTIONS` is accepted as `open -o` takes it).
 *
 * Differences from qemu-io 7.2: sizes are exact bytes (QEMU rounds a raw image's length up to a
 * multiple of 512); VM state (`-b`) is never supported; `truncate -m falloc|full` grows by writing
 * zeroes; `aio=native` runs on io_uring (vstor has no linux-aio; QEMU's rule that it needs
 * `cache.direct=on` holds), and `Unable to use io_uring:` names io_uring_setup's errno where QEMU
 * names none; aio requests run when submitted and their completions print, in
 * submission order, when qemu-io's event loop would run (`aio_flush`, `flush`, `sleep`, `close`,
 * after a synchronous I/O command's own output, at exit), where qemu-io's order depends on thread
 * timing; `reopen -o` changes only `read-only`, `cache.direct` and `cache.no-flush`; blkdebug
 * commands fail as on a node without blkdebug, and `wait_break` fails instead of waiting forever.
 *
 * @module
 */
import type { BlockNode } from "../block/node.ts";
import { setCorruptionSink } from "../../formats/qcow2/corruption.ts";
import type { CliIo } from "./cli_io.ts";
import type { VerbHelp } from "./help.ts";
import { closeImage, COMMANDS, type IoNodeExtras, openImageInto } from "./qemu_io/commands.ts";
import {
  parseIoCommandLine,
  VSTOR_HELP,
  VSTOR_LONG_OPTIONS,
  VSTOR_SHORT_OPTIONS,
} from "./qemu_io/command_line.ts";
import { defaultRequest, parseCacheMode, parseOptionString } from "./qemu_io/open.ts";
import { Session } from "./qemu_io/session.ts";

export type { IoNodeExtras };

/** Options of {@linkcode runIoCommands}. */
export interface RunIoOptions {
  /** Where lines qemu-io writes to stderr go; default: `out`. */
  err?: (line: string) => void;
  /** The name error_report() lines start with; default `vstor`. */
  program?: string;
}

/**
 * Run qemu-io commands against an open node, one command per string, stopping after `quit`.
 * The node is used as opened (cache=writeback); `close` in the commands closes it, else it stays
 * open. Outstanding aio completions print before this returns.
 *
 * @param node The node the commands act on.
 * @param commands Command lines, e.g. `"write -P 0xab 0 64k"`.
 * @param out Receives each output line, without its newline.
 * @param options Where stderr lines go (default: `out`).
 * @returns Whether every command succeeded (qemu-io's exit status 0).
 * @example
 * ```ts
 * import { runIoCommands } from "./io.ts";
 * import { RawNode } from "../../formats/raw.ts";
 * import { MemoryFile } from "../host/memory.ts";
 * const node = await RawNode.open(new MemoryFile("mem", new Uint8Array(4096)));
 * const lines: string[] = [];
 * const ok = await runIoCommands(node, ["write -q -P 0xab 0 512", "read -q -P 0xab 0 512"], (l) => lines.push(l));
 * if (!ok || lines.length !== 0) throw new Error(lines.join("\n"));
 * ```
 */
export async function runIoCommands(
  node: BlockNode,
  commands: Iterable<string> | AsyncIterable<string>,
  out: (line: string) => void,
  options: RunIoOptions = {},
): Promise<boolean> {
  const request = {
    ...defaultRequest(),
    path: node.filename,
    format: node.format,
    readOnly: node.readOnly,
    cache: parseCacheMode("writeback")!,
  };
  const session = new Session(
    { node, request, name: node.filename, readOnly: node.readOnly },
    COMMANDS,
    { program: options.program ?? "vstor", out, err: options.err ?? out },
  );
  let ok = true;
  for await (const line of commands) {
    if (!(await session.run(line))) ok = false;
    if (session.quit) break;
  }
  session.drain();
  return ok;
}

/** The streams {@linkcode ioMain} and {@linkcode qemuIoMain} use. */
export interface IoMainIo {
  stdout?: (s: string) => void;
  stderr?: (s: string) => void;
  /** Commands when no `-c` is given; default the process's stdin. */
  stdin?: ReadableStream<Uint8Array>;
  /**
   * raise(signal) for `sigraise` and `abort`; default: the signal is sent to this process. When
   * it returns, the run stops as if the process had died and exits 128 + signal.
   */
  raise?: (signal: number) => void;
}

/** How the entry answers: as qemu-io or as `vstor io`. */
interface Face {
  readonly program: "qemu-io" | "vstor";
}

/** `vstor help io`. */
export const ioHelp: VerbHelp = {
  text: VSTOR_HELP,
  options: [
    ...[...VSTOR_SHORT_OPTIONS.replaceAll(":", "")].map((c) => `-${c}`),
    ...VSTOR_LONG_OPTIONS.filter((o) => o.key.length > 1).map((o) => `--${o.name}`),
  ],
};

/** Signals whose default action is to be ignored: raise() returns and qemu-io goes on. */
const IGNORED_SIGNALS = new Set([17, 18, 23, 28]);
const SIGNAL_NAMES: Readonly<Record<number, Deno.Signal>> = {
  1: "SIGHUP",
  2: "SIGINT",
  3: "SIGQUIT",
  4: "SIGILL",
  5: "SIGTRAP",
  6: "SIGABRT",
  7: "SIGBUS",
  8: "SIGFPE",
  9: "SIGKILL",
  10: "SIGUSR1",
  11: "SIGSEGV",
  12: "SIGUSR2",
  13: "SIGPIPE",
  14: "SIGALRM",
  15: "SIGTERM",
  16: "SIGSTKFLT",
  19: "SIGSTOP",
  20: "SIGTSTP",
  21: "SIGTTIN",
  22: "SIGTTOU",
  24: "SIGXCPU",
  25: "SIGXFSZ",
  26: "SIGVTALRM",
  27: "SIGPROF",
  29: "SIGIO",
  30: "SIGPWR",
  31: "SIGSYS",
};

/** The process's own raise(): the signal where Deno can send it, else exit as a shell shows it. */
function raiseInProcess(signal: number): void {
  const name = SIGNAL_NAMES[signal];
  if (name !== undefined) {
    try {
      Deno.kill(Deno.pid, name);
    } catch {
      // fall through to exit
    }
  }
  Deno.exit(128 + signal);
}

const encoder = new TextEncoder();

function writeAllSync(target: { writeSync(p: Uint8Array): number }, text: string): void {
  let bytes = encoder.encode(text);
  while (bytes.length > 0) bytes = bytes.subarray(target.writeSync(bytes));
}

/** qemu-io reads stdin with fgets() into 1024 bytes: a longer line arrives as several commands. */
const MAX_LINE_BYTES = 1023;

function* fgetsChunks(line: string, withNewline: boolean): Generator<string> {
  const bytes = new TextEncoder().encode(withNewline ? `${line}\n` : line);
  const decoder = new TextDecoder();
  for (let at = 0; at < bytes.length; at += MAX_LINE_BYTES) {
    const chunk = decoder.decode(bytes.subarray(at, at + MAX_LINE_BYTES));
    yield chunk.endsWith("\n") ? chunk.slice(0, -1) : chunk;
  }
}

async function* lines(
  stream: ReadableStream<Uint8Array>,
  beforeEach: () => void,
): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let pending = "";
  beforeEach();
  for await (const chunk of stream) {
    pending += decoder.decode(chunk, { stream: true });
    let newline: number;
    while ((newline = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      for (const part of fgetsChunks(line, true)) {
        yield part;
        beforeEach();
      }
    }
  }
  pending += decoder.decode();
  if (pending !== "") yield* fgetsChunks(pending, false);
}

async function runMain(args: string[], io: IoMainIo, face: Face): Promise<number> {
  const stderr = io.stderr ?? ((text: string) => writeAllSync(Deno.stderr, text));
  // Corruption notices of the images the session opens go to its stderr, as QEMU prints them.
  const previous = setCorruptionSink((line) => stderr(line + "\n"));
  try {
    return await runSession(args, io, face, stderr);
  } finally {
    setCorruptionSink(previous);
  }
}

async function runSession(
  args: string[],
  io: IoMainIo,
  face: Face,
  stderr: (text: string) => void,
): Promise<number> {
  const stdout = io.stdout ?? ((text: string) => writeAllSync(Deno.stdout, text));
  const qemu = face.program === "qemu-io";
  const prefix = qemu ? "qemu-io" : "vstor";
  const commandLine = parseIoCommandLine(args, { qemu, stdout, stderr });
  if (typeof commandLine === "number") return commandLine;
  const { request, commands, imageOpts, format, operands } = commandLine;

  // Output is batched per command (and per 64 KiB); stderr lines flush it first to keep order.
  let pending: string[] = [];
  let pendingBytes = 0;
  const flushOut = () => {
    if (pending.length === 0) return;
    stdout(pending.join(""));
    pending = [];
    pendingBytes = 0;
  };
  const outLine = (line: string) => {
    pending.push(`${line}\n`);
    pendingBytes += line.length + 1;
    if (pendingBytes >= 1 << 16) flushOut();
  };
  const errLine = (line: string) => {
    flushOut();
    stderr(`${line}\n`);
  };
  let killedBy = 0;
  const session: Session = new Session(undefined, COMMANDS, {
    program: prefix,
    out: outLine,
    err: errLine,
    imageOpts,
    raise: (signal) => {
      flushOut();
      if (IGNORED_SIGNALS.has(signal)) return;
      killedBy = signal;
      session.quit = true;
      (io.raise ?? raiseInProcess)(signal);
    },
  });

  const file = operands[0];
  if (file === undefined && request.options.length > 0) {
    // vstor io -o driver=raw,file.filename=PATH: the options name the image.
    if (format !== undefined) request.options.unshift(["driver", format]);
    const opened = await openImageInto(session, request, undefined);
    flushOut();
    if (!opened) return 1;
  } else if (file !== undefined) {
    if (imageOpts) {
      request.options.push(...parseOptionString(file, (message) => {
        const [first = "", ...rest] = message.split("\n");
        errLine(`${prefix}: warning: ${first}`);
        for (const line of rest) errLine(line);
      }));
    } else {
      if (format !== undefined) request.options.unshift(["driver", format]);
      request.path = file;
    }
    const opened = await openImageInto(session, request, imageOpts ? undefined : file);
    flushOut();
    if (!opened) return 1;
  }

  const interactive = qemu || (io.stdin === undefined && Deno.stdin.isTerminal());
  let ok = true;
  try {
    if (commands.length > 0) {
      for (const command of commands) {
        if (!(await session.run(command))) ok = false;
        flushOut();
        if (session.quit) break;
      }
    } else {
      const beforeEach = () => {
        flushOut();
        if (interactive) stdout(`${prefix}> `);
      };
      for await (const line of lines(io.stdin ?? Deno.stdin.readable, beforeEach)) {
        if (!(await session.run(line))) ok = false;
        if (session.quit) break;
      }
    }
  } finally {
    if (killedBy === 0) session.drain();
    flushOut();
    if (!(await closeImage(session))) ok = false;
    flushOut();
  }
  if (killedBy !== 0) return 128 + killedBy;
  return ok ? 0 : 1;
}

/**
 * The `vstor io` command line: qemu-io's options (`-f FMT -r -s -n -C -U -t CACHE -i AIO
 * -d DISCARD -c CMD…`, `--image-opts`) plus `-o OPTIONS`; commands from stdin (one per line) when
 * no `-c` is given. Messages start with `vstor:`.
 *
 * @param args The arguments after the verb `io`.
 * @param io Output and input streams; default the process's.
 * @returns The exit code: 0 ok, 1 a command failed or FILE did not open, 2 usage.
 * @example
 * ```ts
 * import { ioMain } from "./io.ts";
 * let err = "";
 * const code = await ioMain([], { stderr: (s) => err += s });
 * if (code !== 2 || !err.includes("usage")) throw new Error("expected a usage error");
 * ```
 */
export async function ioMain(args: string[], io: IoMainIo = {}): Promise<number> {
  return await runMain(args, io, { program: "vstor" });
}

/**
 * `vstor qemu-io ARGS…`: behaves as qemu-io 7.2 — its usage text (on stdout), `qemu-io:` messages,
 * the `qemu-io> ` prompt before each stdin command, and exit status 1 when the image does not open,
 * the command line is wrong or any command failed (128 + signal after `sigraise`/`abort`).
 *
 * @param args qemu-io's arguments.
 * @param io Where output goes (a {@linkcode CliIo}, optionally with `stdin` and `raise`).
 * @returns The exit code.
 * @example
 * ```ts
 * import { qemuIoMain } from "./io.ts";
 * let out = "";
 * const code = await qemuIoMain(["-c", "help quit"], { stdout: (s) => out += s, stderr: () => {} });
 * if (code !== 0 || out !== "quit -- exit the program\n") throw new Error(out);
 * ```
 */
export async function qemuIoMain(args: string[], io: CliIo & IoMainIo): Promise<number> {
  return await runMain(args, io, { program: "qemu-io" });
}
