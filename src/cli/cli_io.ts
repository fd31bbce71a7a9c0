/**
 * What every verb shares: where output goes (`CliIo`), the exit codes, the program a run answers
 * to (vstor, or qemu-img/qemu-io in drop-in mode), usage mistakes and error lines.
 *
 * @module
 */
import { BlockError } from "../errors.ts";

/**
 * The name a run answers to: `vstor` (its own prefix, usage errors exit 2), or `qemu-img` /
 * `qemu-io` in drop-in mode (their prefixes, messages and exit codes).
 */
export type Program = "vstor" | "qemu-img" | "qemu-io";

/** Where a command writes: swappable so tests can capture output. */
export interface CliIo {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
  /** The program messages are printed as; `vstor` when absent. */
  program?: Program;
}

/** Exit codes scripts can trust. */
export const EXIT_OK = 0;
export const EXIT_ERROR = 1;
export const EXIT_USAGE = 2;

/** The program a run's messages are printed as. */
export function programName(io: CliIo): Program {
  return io.program ?? "vstor";
}

/** Print `PROGRAM: message` on stderr, as the program this run answers to. */
export function errorLine(io: CliIo, message: string): void {
  io.stderr(`${programName(io)}: ${message}\n`);
}

/**
 * A usage mistake: plain vstor prints it with the verb's usage and exits 2; qemu-img prints
 * `qemu-img: MESSAGE`, then (for what qemu-img reports through its error_exit) `Try 'qemu-img
 * --help' for more information`, and exits 1.
 */
export class UsageError extends Error {
  override readonly name = "UsageError";
  /** Whether qemu-img follows this message with its "Try 'qemu-img --help'" line. */
  readonly tryHelp: boolean;
  /** qemu-img's words for the mistake, where they differ from vstor's. */
  readonly qemuMessage: string | undefined;

  constructor(
    message: string,
    options: { tryHelp?: boolean; qemu?: string; cause?: unknown } = {},
  ) {
    super(message, options.cause === undefined ? {} : { cause: options.cause });
    this.tryHelp = options.tryHelp ?? true;
    this.qemuMessage = options.qemu;
  }
}

const encoder = new TextEncoder();

/** Write all of `text`: a pipe may take less than asked for in one write. */
function writeAll(target: { writeSync(p: Uint8Array): number }, text: string): void {
  let bytes = encoder.encode(text);
  while (bytes.length > 0) bytes = bytes.subarray(target.writeSync(bytes));
}

export const stdio: CliIo = {
  stdout: (text) => writeAll(Deno.stdout, text),
  stderr: (text) => writeAll(Deno.stderr, text),
};

/** Print one error line the way every verb does: `PROGRAM: FILE: what is wrong`. */
export function reportError(e: unknown, io: CliIo): void {
  if (e instanceof BlockError) {
    // qemu-img names the file only where its message does; vstor always says which file.
    const path = programName(io) === "vstor" ? e.context.path : undefined;
    const prefix = path !== undefined && !e.message.includes(path) ? `${path}: ` : "";
    errorLine(io, `${prefix}${e.message}`);
  } else if (e instanceof Error) {
    errorLine(io, programName(io) === "vstor" ? plainMessage(e.message) : e.message);
  } else {
    errorLine(io, String(e));
  }
}

/**
 * A runtime's message in the words vstor prints: Deno's `TEXT (os error N): OP 'PATH'` becomes
 * `Could not open 'PATH': TEXT`, as qemu-img words a file it cannot use.
 */
function plainMessage(message: string): string {
  const os = /^(.*?) \(os error \d+\)(?:: \w+ '(.*)')?$/.exec(message);
  if (os === null) return message;
  return os[2] === undefined ? os[1]! : `Could not open '${os[2]}': ${os[1]}`;
}
