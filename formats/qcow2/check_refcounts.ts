/**
 * The refcount half of the check (QEMU's qcow2_check_refcounts): the counted references compared
 * with the stored refcounts, leaks and refcount errors repaired as `-r leaks` / `-r all` allow,
 * the refcount structure rebuilt when a cluster in use has refcount 0, and the COPIED flags of
 * the active L1 and L2 tables checked and repaired.
 *
 * @module
 */
import type { CheckFix, CheckHost, CheckReport } from "./check_host.ts";
import {
  calculate,
  COMPRESSED,
  COPIED,
  type Ctx,
  hex,
  L1E_OFFSET_MASK,
  L2E_OFFSET_MASK,
  newCtx,
  readU64s,
  say,
} from "./check_references.ts";
import { rebuildStructure } from "./check_rebuild.ts";

/** QEMU's compare_refcounts; returns [rebuild needed, highest cluster]. */
function compare(ctx: Ctx, fix: CheckFix): [boolean, number] {
  const { node, res, imrt } = ctx;
  const rc = node.refcounts;
  let rebuild = false;
  let highest = 0;
  for (let i = 0; i < imrt.length; i++) {
    let stored: number;
    try {
      stored = rc.get(i);
    } catch (e) {
      say(ctx, `Can't get refcount for cluster ${i}: ${(e as Error).message}`);
      res.checkErrors++;
      continue;
    }
    const counted = imrt.get(i);
    if (stored > 0 || counted > 0) highest = i;
    if (stored === counted) continue;
    let fixing: "leaks" | "errors" | undefined;
    if (stored === 0) rebuild = true;
    else if (stored > counted && fix.leaks) fixing = "leaks";
    else if (stored < counted && fix.errors) fixing = "errors";
    say(
      ctx,
      `${fixing ? "Repairing" : stored < counted ? "ERROR" : "Leaked"} cluster ${i} refcount=${
        rc.text(i)
      } reference=${counted}`,
    );
    if (fixing) {
      try {
        rc.change(i, 1, counted - stored);
        // QEMU repairs with QCOW2_DISCARD_ALWAYS: a cluster freed here is discarded.
        if (counted === 0) node.file.punchHole(i * ctx.cs, ctx.cs);
        if (fixing === "leaks") res.leaksFixed++;
        else res.corruptionsFixed++;
        continue;
      } catch {
        // Counted below as not fixed.
      }
    }
    if (stored < counted) res.corruptions++;
    else res.leaks++;
  }
  rc.flush();
  node.barrier();
  return [rebuild, highest];
}

/** QEMU's check_oflag_copied. */
function checkCopied(ctx: Ctx): void {
  const { node, res, cs } = ctx;
  const fix = ctx.fix;
  const repair = fix.errors
    ? true
    : fix.leaks
    ? res.checkErrors === 0 && res.corruptions === 0 && res.leaks === 0
    : false;
  const rc = node.refcounts;
  const ext = node.extendedL2;
  const entryWords = ext ? 2 : 1;
  const l1 = node.l1Table;
  const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  for (let i = 0; i < l1.length / 8; i++) {
    const l1Entry = l1View.getBigUint64(i * 8);
    const l2 = Number(l1Entry & L1E_OFFSET_MASK);
    if (l2 === 0) continue;
    let refcount: number;
    try {
      refcount = rc.get(Math.floor(l2 / cs));
    } catch {
      continue;
    }
    if ((refcount === 1) !== ((l1Entry & COPIED) !== 0n)) {
      res.corruptions++;
      say(
        ctx,
        `${repair ? "Repairing" : "ERROR"} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${
          hex(l1Entry)
        } refcount=${rc.text(Math.floor(l2 / cs))}`,
      );
      if (repair) {
        l1View.setBigUint64(i * 8, refcount === 1 ? l1Entry | COPIED : l1Entry & ~COPIED);
        node.file.writeAt(node.header.l1TableOffset + i * 8, l1.subarray(i * 8, i * 8 + 8));
        res.corruptions--;
        res.corruptionsFixed++;
      }
    }
    const entries = cs / (8 * entryWords);
    const table = readU64s(ctx, l2, entries * entryWords);
    let dirty = 0;
    for (let j = 0; j < entries; j++) {
      const entry = table[j * entryWords]!;
      if (entry & COMPRESSED) continue;
      const host = Number(entry & L2E_OFFSET_MASK);
      if (host === 0) continue;
      let count: number;
      try {
        count = rc.get(Math.floor(host / cs));
      } catch {
        continue;
      }
      if ((count === 1) !== ((entry & COPIED) !== 0n)) {
        res.corruptions++;
        say(
          ctx,
          `${repair ? "Repairing" : "ERROR"} OFLAG_COPIED data cluster: l2_entry=${
            hex(entry)
          } refcount=${rc.text(Math.floor(host / cs))}`,
        );
        if (repair) {
          table[j * entryWords] = count === 1 ? entry | COPIED : entry & ~COPIED;
          dirty++;
        }
      }
    }
    if (dirty > 0) {
      const bytes = new Uint8Array(cs);
      const v = new DataView(bytes.buffer);
      for (let k = 0; k < table.length; k++) v.setBigUint64(k * 8, table[k]!);
      node.l2Cache.discard(l2);
      node.file.writeAt(l2, bytes);
      res.corruptions -= dirty;
      res.corruptionsFixed += dirty;
    }
  }
  node.barrier();
}

/** QEMU's qcow2_check_refcounts, into `res`. */
export function checkRefcounts(node: CheckHost, res: CheckReport, fix: CheckFix): void {
  const ctx = newCtx(node, res, fix);
  let rebuild = calculate(ctx);
  const preCompare = { ...res, messages: [] as string[] };
  let [needRebuild, highest] = compare(ctx, {});
  rebuild ||= needRebuild;
  if (rebuild && fix.errors) {
    const old = { corruptions: res.corruptions, leaks: res.leaks };
    say(ctx, "Rebuilding refcount structure");
    rebuildStructure(node, ctx.imrt);
    res.corruptions = 0;
    res.leaks = 0;
    res.allocatedClusters = res.fragmentedClusters = res.compressedClusters = 0;
    const again = newCtx(node, res, {});
    calculate(again);
    let freshLeaks = 0;
    if (fix.leaks) {
      const saved = { ...res };
      Object.assign(res, {
        corruptions: 0,
        leaks: 0,
        checkErrors: 0,
        corruptionsFixed: 0,
        leaksFixed: 0,
      });
      [needRebuild, highest] = compare(again, { leaks: true });
      if (needRebuild) say(ctx, "ERROR rebuilt refcount structure is still broken");
      freshLeaks = res.leaks;
      Object.assign(res, { ...saved, messages: res.messages });
    }
    if (res.corruptions < old.corruptions) {
      res.corruptionsFixed += old.corruptions - res.corruptions;
    }
    if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
    res.leaks += freshLeaks;
  } else if (fix.leaks || fix.errors) {
    if (rebuild) {
      say(ctx, "ERROR need to rebuild refcount structures");
      res.checkErrors++;
      res.failed = "Input/output error";
      return;
    }
    if (res.leaks > 0 || res.corruptions > 0) {
      const messages = res.messages;
      Object.assign(res, preCompare, { messages });
      [, highest] = compare(ctx, fix);
    }
  }
  checkCopied(ctx);
  res.imageEndOffset = (highest + 1) * node.clusterSize;
}
