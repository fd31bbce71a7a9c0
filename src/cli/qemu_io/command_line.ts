/**
 * qemu-io's command line, and `vstor io`'s: the usage and help texts, the option tables, and the
 * parse of the options into an open request and the commands to run — with qemu-io's messages for
 * every mistake (`--object` types, `-T` trace patterns, invalid modes, conflicting options). The
 * session that runs the commands is `../io.ts`.
 *
 * @module
 */

import {
  defaultRequest,
  type OpenRequest,
  parseAioMode,
  parseCacheMode,
  parseDiscardMode,
  parseOptionString,
} from "./open.ts";
import { getoptLong, hostErrorText, type LongOption } from "./text.ts";

/** `vstor io`'s usage line. */
export const VSTOR_USAGE =
  "vstor io [-f FMT] [-r] [-s] [-U] [-t CACHE] [-i AIO] [-d DISCARD] [-o OPTIONS] [-c CMD]... [FILE]";

/** The qemu-io release whose behaviour this is. */
export const QEMU_VERSION = "7.2.0";

/** qemu-io's `--help` text, for the program `name`. */
export function qemuUsage(name: string): string {
  return `Usage: ${name} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '${name} -c help' for information on available commands.

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
`;
}

/** `vstor io --help`. */
export const VSTOR_HELP = `usage: ${VSTOR_USAGE}

Run qemu-io 7.2 commands on an image: each -c CMD in order, or one command per line from stdin.

  -c, --cmd CMD          run CMD (repeatable; 'help' lists the commands)
  -f, --format FMT       image format (probed when absent)
  -o, --options OPTS     open options, as the open command's -o (driver=FMT,
                         file.filename=PATH, read-only=on, cache.no-flush=on, l2-cache-size=N,
                         offset=N, size=N ...)
  -r, --read-only        open the image read-only
  -s, --snapshot         write to a temporary qcow2 overlay deleted at exit: FILE never changes
  -t, --cache=MODE       writethrough (default), writeback, unsafe, none (O_DIRECT) or
                         directsync (O_DIRECT, writes durable when they complete)
  -n, --nocache          -t none
  -d, --discard=MODE     unmap/on (default), ignore/off
  -i, --aio=MODE         threads (default: synchronous calls; given: a pool of Workers keeps
                         requests in flight), io_uring (raw images keep requests in flight
                         through io_uring), native (QEMU's linux-aio, which vstor maps to
                         io_uring; needs -t none or directsync, as in QEMU)
  -k, --native-aio       -i native
  -C, --copy-on-read     copy data read from the backing file into the image
  -m, --misalign         misalign buffers (accepted; vstor buffers need no alignment)
  -T, --trace OPTS       tracing options (accepted and ignored)
  -U, --force-share      open the image even while another process writes it
  --object, --image-opts as qemu-io's (see 'vstor qemu-io --help')
  -V, --version          print the version
  -h, --help             print this help

Commands (see -c help): abort aio_flush aio_read aio_write alloc break close discard flush help
info length map open quit read readv remove_break reopen resume sigraise sleep truncate
wait_break write writev
Exit status: 0 when every command succeeded, 1 when one failed or FILE could not be opened,
2 for a usage error.

Example: vstor io -f qcow2 -c 'write -P 0xab 0 64k' -c 'read -v 0 16' disk.qcow2
`;

/** qemu-io's long options. */
export const LONG_OPTIONS: readonly LongOption[] = [
  { name: "help", hasArg: false, key: "h" },
  { name: "version", hasArg: false, key: "V" },
  { name: "cmd", hasArg: true, key: "c" },
  { name: "format", hasArg: true, key: "f" },
  { name: "read-only", hasArg: false, key: "r" },
  { name: "snapshot", hasArg: false, key: "s" },
  { name: "nocache", hasArg: false, key: "n" },
  { name: "copy-on-read", hasArg: false, key: "C" },
  { name: "misalign", hasArg: false, key: "m" },
  { name: "native-aio", hasArg: false, key: "k" },
  { name: "aio", hasArg: true, key: "i" },
  { name: "discard", hasArg: true, key: "d" },
  { name: "cache", hasArg: true, key: "t" },
  { name: "trace", hasArg: true, key: "T" },
  { name: "object", hasArg: true, key: "object" },
  { name: "image-opts", hasArg: false, key: "image-opts" },
  { name: "force-share", hasArg: false, key: "U" },
];
/** `vstor io`'s long options: qemu-io's and `--options`. */
export const VSTOR_LONG_OPTIONS: readonly LongOption[] = [
  ...LONG_OPTIONS,
  { name: "options", hasArg: true, key: "o" },
];
/** `vstor io`'s short options, as getopt takes them. */
export const VSTOR_SHORT_OPTIONS = "hVc:d:f:rsnCmki:t:T:Uo:";

/** QOM types QEMU 7.2 knows that vstor has no use for yet. */
const QOM_TYPES = new Set([
  "authz-list",
  "authz-listfile",
  "authz-pam",
  "authz-simple",
  "cryptodev-backend-builtin",
  "input-barrier",
  "input-linux",
  "iothread",
  "main-loop",
  "memory-backend-file",
  "memory-backend-memfd",
  "memory-backend-ram",
  "rng-builtin",
  "rng-egd",
  "rng-random",
  "throttle-group",
  "tls-cipher-suites",
  "tls-creds-anon",
  "tls-creds-psk",
  "tls-creds-x509",
]);

/** --object: secrets are accepted (vstor has no encrypted images to use them on). */
function objectProblem(text: string): string | undefined {
  const options = parseOptionString(text, () => {}, "qom-type");
  const get = (key: string) => options.findLast(([k]) => k === key)?.[1];
  const type = get("qom-type");
  if (type === undefined) return "Parameter 'qom-type' is missing";
  if (type === "secret") {
    if (get("id") === undefined) return "Parameter 'id' is missing";
    if (get("file") === undefined && get("data") === undefined) {
      return "Either 'file' or 'data' must be provided";
    }
    return undefined;
  }
  if (QOM_TYPES.has(type)) return `--object ${type} is not supported by vstor yet`;
  return `Parameter 'qom-type' does not accept value '${type}'`;
}

/** -T: the warnings QEMU prints for patterns that match no trace event; undefined after an error. */
function traceWarnings(text: string, fail: (line: string) => void): string[] | undefined {
  const options = parseOptionString(text, () => {}, "enable");
  const patterns: string[] = [];
  for (const [key, value] of options) {
    if (key === "enable") patterns.push(value);
    if (key !== "events") continue;
    let content: string;
    try {
      content = Deno.readTextFileSync(value);
    } catch (e) {
      fail(`${value}: ${hostErrorText(e)}`);
      return undefined;
    }
    for (const line of content.split("\n")) {
      const pattern = line.trim();
      if (pattern !== "" && !pattern.startsWith("#")) patterns.push(pattern);
    }
  }
  return patterns
    .map((p) => p.startsWith("-") ? p.slice(1) : p)
    .filter((p) => !/[*?]/.test(p))
    .map((p) => `warning: trace event '${p}' does not exist`);
}

/** What the command line asks for. */
export interface IoCommandLine {
  /** How to open the image (FILE, `-o`, modes). */
  readonly request: OpenRequest;
  /** The `-c` commands, in order (none: read them from stdin). */
  readonly commands: string[];
  /** `--image-opts`: FILE is an option string. */
  readonly imageOpts: boolean;
  /** `-f FMT`. */
  readonly format: string | undefined;
  /** The operands: FILE, or none. */
  readonly operands: readonly string[];
}

/** Where {@linkcode parseIoCommandLine} writes, and as whom. */
export interface IoCommandLineIo {
  /** Answer as qemu-io (else as `vstor io`). */
  readonly qemu: boolean;
  readonly stdout: (text: string) => void;
  readonly stderr: (text: string) => void;
}

/**
 * Parses the arguments after the program (or verb). Prints what qemu-io prints while parsing:
 * `-V` and `-h` output, error messages, usage, and the trace warnings QEMU prints once parsing is
 * done.
 *
 * @returns what to run, or the exit code when the run ends here (0 after `-V`/`-h`, 1 for an error,
 *   2 for a `vstor io` usage error)
 */
export function parseIoCommandLine(
  args: string[],
  io: IoCommandLineIo,
): IoCommandLine | number {
  const { qemu, stdout, stderr } = io;
  const prefix = qemu ? "qemu-io" : "vstor";
  const report = (message: string) => stderr(`${prefix}: ${message}\n`);
  /** A command-line mistake (`line` starts with the program): qemu-io prints its usage on stdout and exits 1. */
  const usageError = (line: string | undefined): number => {
    if (qemu) {
      if (line !== undefined) stderr(`${line}\n`);
      stdout(qemuUsage("qemu-io"));
      return 1;
    }
    stderr(`${line ?? "vstor io: bad arguments"}\nusage: ${VSTOR_USAGE}\n`);
    return 2;
  };

  const request = defaultRequest();
  const commands: string[] = [];
  /** Lines QEMU prints once option parsing is done (trace warnings). */
  const deferred: string[] = [];
  let imageOpts = false;
  let format: string | undefined;
  const parsed = getoptLong(
    [prefix, ...args],
    qemu ? "hVc:d:f:rsnCmki:t:T:U" : VSTOR_SHORT_OPTIONS,
    qemu ? LONG_OPTIONS : VSTOR_LONG_OPTIONS,
    qemu ? "qemu-io" : "vstor io",
  );
  for (const { c, arg } of parsed.opts) {
    switch (c) {
      case "s":
        request.snapshot = true;
        break;
      case "n":
        request.cache = { ...request.cache, direct: true, writethrough: false };
        break;
      case "C":
        request.copyOnRead = true;
        break;
      case "d": {
        const mode = parseDiscardMode(arg);
        if (mode === undefined) {
          report(`Invalid discard option: ${arg}`);
          return 1;
        }
        request.discard = mode;
        break;
      }
      case "f":
        format = arg;
        break;
      case "c":
        commands.push(arg);
        break;
      case "r":
        request.readOnly = true;
        break;
      case "m": // buffers are never misaligned for O_DIRECT: there is no O_DIRECT yet
        break;
      case "T": {
        // vstor has no trace events: every pattern QEMU would look up matches none.
        // QEMU prints this one as `qemu-io:PATH: error`, without the usual space.
        const warning = traceWarnings(arg, (line) => stderr(`${prefix}:${line}\n`));
        if (warning === undefined) return 1;
        deferred.push(...warning);
        break;
      }
      case "k":
        request.aio = "native";
        break;
      case "i": {
        const mode = parseAioMode(arg);
        if (mode === undefined) {
          report(`Invalid aio option: ${arg}`);
          return 1;
        }
        request.aio = mode;
        break;
      }
      case "t": {
        const mode = parseCacheMode(arg);
        if (mode === undefined) {
          report(`Invalid cache option: ${arg}`);
          return 1;
        }
        request.cache = mode;
        break;
      }
      case "V":
        stdout(
          `${
            qemu ? "qemu-io" : "vstor io"
          } version ${QEMU_VERSION} (vstor, Deno ${Deno.version.deno})\n` +
            "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n",
        );
        return 0;
      case "h":
        stdout(qemu ? qemuUsage("qemu-io") : VSTOR_HELP);
        return 0;
      case "U":
        request.forceShare = true;
        break;
      case "object": {
        const problem = objectProblem(arg);
        if (problem !== undefined) {
          report(problem);
          return 1;
        }
        break;
      }
      case "image-opts":
        imageOpts = true;
        break;
      case "o":
        request.options.push(...parseOptionString(arg, (message) => {
          const [first = "", ...rest] = message.split("\n");
          report(`warning: ${first}`);
          for (const line of rest) stderr(`${line}\n`);
        }));
        break;
    }
  }
  if (parsed.error !== undefined) return usageError(parsed.error);
  const operands = parsed.operands;
  if (operands.length > 1) return usageError(qemu ? undefined : "vstor io: expected one FILE");
  if (format !== undefined && imageOpts) {
    report("--image-opts and -f are mutually exclusive");
    return 1;
  }
  for (const line of deferred) report(line);
  if (!qemu && operands.length === 0 && commands.length === 0 && request.options.length === 0) {
    return usageError("vstor io: missing FILE");
  }
  return { request, commands, imageOpts, format, operands };
}
