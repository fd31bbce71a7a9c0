/**
 * Where qcow2 nodes opened without their own `onCorruption` print corruption notices
 * ("qcow2: Marking image as corrupt: …"), as QEMU prints them on standard error. The CLI points
 * the sink at its own stderr for the length of a command; a library user may point it elsewhere.
 *
 * @module
 */

let sink: (line: string) => void = (line) =>
  Deno.stderr.writeSync(new TextEncoder().encode(line + "\n"));

/** Print one corruption notice through the current sink. */
export function printCorruption(line: string): void {
  sink(line);
}

/** Replace the sink (default: standard error); returns the one it replaces. */
export function setCorruptionSink(next: (line: string) => void): (line: string) => void {
  const previous = sink;
  sink = next;
  return previous;
}
