/// <reference lib="deno.worker" />
/**
 * A vCPU for the exit-channel tests: runs the accesses its payload lists and returns what each
 * read gave or each failure said.
 *
 * @module
 */

import { runVcpu } from "../../src/virtio/exits.ts";

/** One access. */
export type Access =
  | { op: "configRead"; slot: number; offset: number; size: 1 | 2 | 4 }
  | { op: "configWrite"; slot: number; offset: number; size: 1 | 2 | 4; value: number }
  | { op: "mmioRead"; gpa: number; size: 1 | 2 | 4 }
  | { op: "mmioWrite"; gpa: number; size: 1 | 2 | 4; value: number }
  | { op: "mmioRead64"; gpa: number }
  | { op: "mmioWrite64"; gpa: number; value: bigint }
  | { op: "ioRead"; port: number; size: 1 | 2 | 4 }
  | { op: "ioWrite"; port: number; size: 1 | 2 | 4; value: number };

/** What each access gave: a number (reads), null (writes), or `{ error }`. */
export type Outcome = number | bigint | null | { error: string };

runVcpu(self, {
  main(ctx) {
    const out: Outcome[] = [];
    for (const a of ctx.payload as Access[]) {
      try {
        switch (a.op) {
          case "configRead":
            out.push(ctx.bus.configRead(a.slot, a.offset, a.size));
            break;
          case "configWrite":
            ctx.bus.configWrite(a.slot, a.offset, a.size, a.value);
            out.push(null);
            break;
          case "mmioRead":
            out.push(ctx.bus.mmioRead(a.gpa, a.size));
            break;
          case "mmioWrite":
            ctx.bus.mmioWrite(a.gpa, a.size, a.value);
            out.push(null);
            break;
          case "mmioRead64":
            out.push(ctx.bus.mmioRead64(a.gpa));
            break;
          case "mmioWrite64":
            ctx.bus.mmioWrite64(a.gpa, a.value);
            out.push(null);
            break;
          case "ioRead":
            out.push(ctx.bus.ioRead(a.port, a.size));
            break;
          case "ioWrite":
            ctx.bus.ioWrite(a.port, a.size, a.value);
            out.push(null);
            break;
        }
      } catch (error) {
        out.push({ error: `${(error as Error).name}: ${(error as Error).message}` });
      }
    }
    return out;
  },
});
