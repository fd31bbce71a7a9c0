/**
 * A qemu-io session: the open image (or none), the command table, argument checks, output with
 * qemu-io's formats, and aio requests whose completions wait for the next point where qemu-io's
 * event loop would run.
 *
 * @module
 */
import type { BlockNode } from "../../block/node.ts";
import { parseSize } from "../text/size.ts";
import type { OpenRequest } from "./open.ts";
import { cvtstr, hex2, isalnum, messageOf, parsePattern, timestr } from "./text.ts";
import { formatFixed } from "../text/human.ts";

const INT64_MAX = (1n << 63n) - 1n;

/** One qemu-io command. */
export interface Command {
  readonly name: string;
  readonly altname?: string;
  readonly argmin: number;
  /** -1: no limit. */
  readonly argmax: number;
  readonly args?: string;
  readonly oneline: string;
  readonly help?: readonly string[];
  /** Needs write permission: refused up front on a read-only image (BLK_PERM_WRITE). */
  readonly write?: boolean;
  /** Runs without an open image (CMD_NOFILE_OK). */
  readonly noFile?: boolean;
  /** Runs without an open image and skips every check (CMD_FLAG_GLOBAL). */
  readonly global?: boolean;
  /** Waits for I/O: aio completions that are due print after its own output. */
  readonly polls?: boolean;
  run(s: Session, argv: string[]): Promise<boolean>;
}

/** The image a session works on. */
export interface OpenImageState {
  node: BlockNode;
  /** What opened it (for `reopen`). */
  request: OpenRequest;
  /** The name messages use. */
  name: string;
  /** Write commands are refused (`-r`, `reopen -r`). */
  readOnly: boolean;
}

/** How a session reaches the world outside the image. */
export interface SessionOptions {
  /** The name error_report() lines start with: `qemu-io` or `vstor`. */
  program: string;
  out: (line: string) => void;
  err: (line: string) => void;
  /** raise(signal) for `sigraise` and `abort`: output is flushed first; may not return. */
  raise?: (signal: number) => void;
  /** --image-opts was given: `open -o` is refused, the path is an option string. */
  imageOpts?: boolean;
}

export class Session {
  image: OpenImageState | undefined;
  readonly commands: readonly Command[];
  readonly program: string;
  readonly out: (line: string) => void;
  readonly err: (line: string) => void;
  readonly raise: ((signal: number) => void) | undefined;
  readonly imageOpts: boolean;
  quit = false;
  /** Completions of aio requests, printed in submission order when the event loop runs. */
  #pending: Array<() => void> = [];

  constructor(
    image: OpenImageState | undefined,
    commands: readonly Command[],
    options: SessionOptions,
  ) {
    this.image = image;
    this.commands = commands;
    this.program = options.program;
    this.out = options.out;
    this.err = options.err;
    this.raise = options.raise;
    this.imageOpts = options.imageOpts ?? false;
  }

  /** The open image's node; commands that need one only run when there is one. */
  get node(): BlockNode {
    if (this.image === undefined) throw new Error("no file open");
    return this.image.node;
  }

  /** QEMU's error_report(). */
  report(message: string): void {
    this.err(`${this.program}: ${message}`);
  }

  usage(cmd: Command): void {
    this.out(`${cmd.name} ${cmd.args ?? "(null)"} -- ${cmd.oneline}`);
  }

  find(name: string): Command | undefined {
    return this.commands.find((cmd) => cmd.name === name || cmd.altname === name);
  }

  /** qemu-io's cvtnum plus print_cvtnum_err; `shown` is the text the error names. */
  cvtnum(text: string, shown = text): bigint | undefined {
    const r = parseSize(text);
    if (r.ok && r.deprecatedHexSuffix) {
      this.report(`warning: Using a multiplier suffix on hex numbers is deprecated: ${text}`);
    }
    if (r.ok && r.value <= INT64_MAX) return r.value;
    if (!r.ok && r.reason === "invalid") {
      this.out(
        `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${shown}`,
      );
    } else {
      this.out(`Parsing error: argument too large -- ${shown}`);
    }
    return undefined;
  }

  pattern(arg: string): number | undefined {
    const p = parsePattern(arg);
    if (p === undefined) this.out(`${arg} is not a valid pattern byte`);
    return p;
  }

  /** print_report(): the result line and the timing line (or the -C line). */
  printReport(
    op: string,
    elapsedMs: number,
    offset: number | bigint,
    count: number,
    machine: boolean,
  ): void {
    // clock_gettime never reads 0 ns for a request; keep the rates finite as it does.
    const seconds = Math.max(elapsedMs / 1000, 1e-9);
    const time = timestr(seconds, machine);
    if (machine) {
      this.out(
        `${count},1,${time},${formatFixed(count / seconds, 3)},${formatFixed(1 / seconds, 3)}`,
      );
      return;
    }
    this.out(`${op} ${count}/${count} bytes at offset ${offset}`);
    this.out(
      `${cvtstr(count)}, 1 ops; ${time} (${cvtstr(count / seconds)}/sec and ${
        formatFixed(1 / seconds, 4)
      } ops/sec)`,
    );
  }

  dump(buf: Uint8Array, offset: bigint | number): void {
    const base = BigInt(offset);
    for (let i = 0; i < buf.length; i += 16) {
      const row = buf.subarray(i, i + 16);
      let hex = "";
      let text = "";
      for (const b of row) {
        hex += `${hex2(b)} `;
        text += isalnum(b) ? String.fromCharCode(b) : ".";
      }
      this.out(`${(base + BigInt(i)).toString(16).padStart(8, "0")}:  ${hex} ${text}`);
    }
  }

  /** Queue an aio request's completion output. */
  complete(print: () => void): void {
    this.#pending.push(print);
  }

  /** Run the event loop: print every queued aio completion. */
  drain(): void {
    const pending = this.#pending;
    this.#pending = [];
    for (const print of pending) print();
  }

  /** cache=writethrough: QEMU turns every write into a FUA write (the write cache is off). */
  get writethrough(): boolean {
    const cache = this.image?.request.cache;
    return cache !== undefined && cache.writethrough && !cache.noFlush;
  }

  /** Run one command line; false when it failed (qemu-io's negative return). */
  async run(line: string): Promise<boolean> {
    const argv = line.split(" ").filter((word) => word !== "");
    const name = argv[0];
    if (name === undefined) return true;
    const cmd = this.find(name);
    if (cmd === undefined) {
      this.err(`command "${name}" not found`);
      return false;
    }
    if (!cmd.global && !cmd.noFile && this.image === undefined) {
      this.err("no file open, try 'help open'");
      return false;
    }
    const argc = argv.length - 1;
    if (argc < cmd.argmin || (cmd.argmax !== -1 && argc > cmd.argmax)) {
      const expected = cmd.argmax === -1
        ? `at least ${cmd.argmin} arguments`
        : cmd.argmin === cmd.argmax
        ? `${cmd.argmin} arguments`
        : `between ${cmd.argmin} and ${cmd.argmax} arguments`;
      this.err(`bad argument count ${argc} to ${name}, expected ${expected}`);
      return false;
    }
    if (cmd.write && this.image !== undefined && this.image.readOnly) {
      this.report("Block node is read-only");
      return false;
    }
    try {
      return await cmd.run(this, argv);
    } catch (e) {
      this.report(messageOf(e));
      return false;
    } finally {
      if (cmd.polls) this.drain();
    }
  }
}
