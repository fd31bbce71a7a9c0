/**
 * qemu-io 7.2's command table; the commands live in io_commands.ts, aio_commands.ts,
 * image_commands.ts and process_commands.ts.
 *
 * @module
 */
import type { Command } from "./session.ts";
import {
  discardCommand,
  flushCommand,
  readCommand,
  readvCommand,
  truncateCommand,
  writeCommand,
  writevCommand,
} from "./io_commands.ts";
import { aioFlushCommand, aioReadCommand, aioWriteCommand } from "./aio_commands.ts";
import {
  allocCommand,
  closeCommand,
  infoCommand,
  lengthCommand,
  mapCommand,
  openCommand,
  reopenCommand,
} from "./image_commands.ts";
import {
  abortCommand,
  breakCommand,
  helpCommand,
  quitCommand,
  removeBreakCommand,
  resumeCommand,
  sigraiseCommand,
  sleepCommand,
  waitBreakCommand,
} from "./process_commands.ts";

export { closeImage, openImageInto } from "./image_commands.ts";
export { type IoNodeExtras, MAX_REQUEST_BYTES } from "./io_commands.ts";

/** qemu-io 7.2's command table, sorted by name as qemu-io keeps it. */
export const COMMANDS: readonly Command[] = [
  abortCommand,
  aioFlushCommand,
  aioReadCommand,
  aioWriteCommand,
  allocCommand,
  breakCommand,
  closeCommand,
  discardCommand,
  flushCommand,
  helpCommand,
  infoCommand,
  lengthCommand,
  mapCommand,
  openCommand,
  quitCommand,
  readCommand,
  readvCommand,
  removeBreakCommand,
  reopenCommand,
  resumeCommand,
  sigraiseCommand,
  sleepCommand,
  truncateCommand,
  waitBreakCommand,
  writeCommand,
  writevCommand,
];
