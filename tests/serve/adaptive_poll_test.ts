/**
 * The export's polling window: it grows while the front-end's next request comes soon after the
 * last, stays while polling catches it, and collapses after a long wait — QEMU's iothread rule.
 */
import assert from "node:assert/strict";
import { AdaptivePoll, DEFAULT_POLL } from "../../src/serve/adaptive_poll.ts";

Deno.test("adaptive polling: grows from 4 µs by doubling up to poll-max-ns, stays on hits, drops on a long wait", () => {
  const poll = new AdaptivePoll(DEFAULT_POLL);
  assert.equal(poll.windowNs, 0, "no polling before any work");
  const seen: number[] = [];
  for (let i = 0; i < 6; i++) {
    poll.record(32_500); // the next request came 32.5 µs after polling began: under the limit
    seen.push(poll.windowNs);
  }
  assert.deepEqual(seen, [4_000, 8_000, 16_000, 32_000, 32_768, 32_768]);
  poll.record(10_000);
  assert.equal(poll.windowNs, 32_768, "work within the window: unchanged");
  poll.record(1_000_000);
  assert.equal(poll.windowNs, 0, "a wait past poll-max-ns: back to no polling (poll-shrink=0)");
});

Deno.test("adaptive polling: poll-grow and poll-shrink factors; poll-max-ns=0 never polls", () => {
  const poll = new AdaptivePoll({ maxNs: 100_000, grow: 3, shrink: 4 });
  poll.record(50_000);
  poll.record(50_000);
  poll.record(50_000);
  assert.equal(poll.windowNs, 36_000);
  poll.record(99_000);
  assert.equal(poll.windowNs, 100_000, "capped at the limit");
  poll.record(200_000);
  assert.equal(poll.windowNs, 25_000, "divided by poll-shrink");
  const off = new AdaptivePoll({ maxNs: 0, grow: 0, shrink: 0 });
  for (const wait of [1_000, 10_000, 1e9]) off.record(wait);
  assert.equal(off.windowNs, 0);
});
