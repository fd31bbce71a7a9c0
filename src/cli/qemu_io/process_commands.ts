/**
 * qemu-io's commands outside the image: sigraise, sleep, abort, blkdebug's break/resume, help, quit.
 *
 * @module
 */

import type { Command } from "./session.ts";
import { ENOTSUP, strerror, strtol } from "./text.ts";

/** NSIG on Linux: signals are 1..64, raise(65) fails quietly. */
const NSIG = 65;

export const sigraiseCommand: Command = {
  name: "sigraise",
  argmin: 1,
  argmax: 1,
  noFile: true,
  args: "signal",
  oneline: "raises a signal",
  help: [
    "",
    " raises the given signal",
    "",
    " Example:",
    " 'sigraise 15' - raises SIGTERM",
    "",
    ' Invokes raise(signal), where "signal" is the mandatory integer argument',
    " given to sigraise.",
    "",
  ],
  run(s, argv) {
    const text = argv[1] ?? "";
    const sig = s.cvtnum(text);
    if (sig === undefined) return Promise.resolve(false);
    if (sig > BigInt(NSIG)) {
      s.out(`signal argument '${text}' is too large to be a valid signal`);
      return Promise.resolve(false);
    }
    if (sig > 0n && sig < BigInt(NSIG)) s.raise?.(Number(sig));
    return Promise.resolve(true);
  },
};

export const sleepCommand: Command = {
  name: "sleep",
  argmin: 1,
  argmax: 1,
  noFile: true,
  oneline: "waits for the given value in milliseconds",
  async run(s, argv) {
    const text = argv[1] ?? "";
    const { value, whole } = strtol(text);
    if (value < 0n || !whole) {
      s.out(`${text} is not a valid number`);
      return false;
    }
    s.drain(); // the main loop runs while qemu-io sleeps
    let ms = Number(value);
    while (ms > 0) {
      const step = Math.min(ms, 2 ** 31 - 1);
      await new Promise((resolve) => setTimeout(resolve, step));
      ms -= step;
    }
    return true;
  },
};

export const abortCommand: Command = {
  name: "abort",
  argmin: 0,
  argmax: 0,
  noFile: true,
  oneline: "simulate a program crash using abort(3)",
  run(s) {
    s.raise?.(6);
    return Promise.resolve(false);
  },
};

/** blkdebug's commands: vstor has no blkdebug node, so they fail as QEMU's do on other nodes. */
export const breakCommand: Command = {
  name: "break",
  argmin: 2,
  argmax: 2,
  args: "event tag",
  oneline: "sets a breakpoint on event and tags the stopped request as tag",
  run(s) {
    s.out(`Could not set breakpoint: ${strerror(ENOTSUP)}`);
    return Promise.resolve(false);
  },
};

export const removeBreakCommand: Command = {
  name: "remove_break",
  argmin: 1,
  argmax: 1,
  args: "tag",
  oneline: "remove a breakpoint by tag",
  run(s, argv) {
    s.out(`Could not remove breakpoint ${argv[1]}: ${strerror(ENOTSUP)}`);
    return Promise.resolve(false);
  },
};

export const resumeCommand: Command = {
  name: "resume",
  argmin: 1,
  argmax: 1,
  args: "tag",
  oneline: "resumes the request tagged as tag",
  run(s) {
    s.out(`Could not resume request: ${strerror(ENOTSUP)}`);
    return Promise.resolve(false);
  },
};

export const waitBreakCommand: Command = {
  name: "wait_break",
  argmin: 1,
  argmax: 1,
  args: "tag",
  oneline: "waits for the suspension of a request",
  run(s, argv) {
    // qemu-io waits forever here when no blkdebug node exists; never hang.
    s.report(`wait_break ${argv[1]}: no blkdebug node, so no request can be suspended`);
    return Promise.resolve(false);
  },
};

// ---------------------------------------------------------------------------------------------
// help and quit

function helpLine(typed: string, cmd: Command): string {
  return `${typed} ${cmd.args === undefined ? "" : `${cmd.args} `}-- ${cmd.oneline}`;
}

export const helpCommand: Command = {
  name: "help",
  altname: "?",
  argmin: 0,
  argmax: 1,
  global: true,
  args: "[command]",
  oneline: "help for one or all commands",
  run(s, argv) {
    const topic = argv[1];
    if (topic === undefined) {
      for (const cmd of s.commands) s.out(helpLine(cmd.name, cmd));
      s.out("");
      s.out("Use 'help commandname' for extended help.");
      return Promise.resolve(true);
    }
    const cmd = s.find(topic);
    if (cmd === undefined) {
      s.out(`command ${topic} not found`);
      return Promise.resolve(false);
    }
    s.out(helpLine(topic, cmd));
    for (const line of cmd.help ?? []) s.out(line);
    return Promise.resolve(true);
  },
};

export const quitCommand: Command = {
  name: "quit",
  altname: "q",
  argmin: -1,
  argmax: -1,
  global: true,
  oneline: "exit the program",
  run(s) {
    s.quit = true;
    return Promise.resolve(true);
  },
};
