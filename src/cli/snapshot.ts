/**
 * `vstor snapshot [-l | -a NAME | -c NAME | -d NAME] [-f FMT] [-q] [-U] FILE`, as qemu-img snapshot.
 *
 * @module
 */
import { BlockError } from "../errors.ts";
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import { RawNode } from "../../formats/raw.ts";
import type { HostSnapshots } from "../host/host_file.ts";
import { applySnapshot, createSnapshot, deleteSnapshot } from "../../formats/qcow2/snapshot_ops.ts";
import { listedNames, type SnapshotEntry } from "../../formats/qcow2/snapshot.ts";
import { type CliIo, EXIT_OK, UsageError } from "./cli_io.ts";
import { localDate, sizeToStr, vmClock } from "./text/human.ts";
import { oneFile, openVerbImage, parseVerbArgs } from "./args.ts";
import type { ParseArgsOptionsConfig } from "node:util";
import { optionFlags, type VerbHelp } from "./help.ts";

export const SNAPSHOT_USAGE =
  "vstor snapshot [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] [-f FMT] [-q] [-U] FILE";

/** qemu-img's snapshot table: header line and one line per snapshot. */
export function snapshotTable(entries: SnapshotEntry[]): string {
  const lines = [
    "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT",
  ];
  for (const e of entries) {
    const vmSize = e.extra.length >= 8
      ? Number(new DataView(e.extra.buffer, e.extra.byteOffset).getBigUint64(0))
      : 0;
    let icount = "";
    if (e.extra.length >= 24) {
      const v = new DataView(e.extra.buffer, e.extra.byteOffset).getBigUint64(16);
      if (v !== 0xffffffffffffffffn) icount = v.toString();
    }
    const { id, name } = listedNames(e);
    lines.push(
      `${id.padEnd(9)} ${name.padEnd(16)} ${
        sizeToStr(Math.max(vmSize, e.vmStateSize)).padStart(8)
      }` +
        `${localDate(e.dateSec).padStart(20)}${vmClock(e.vmClockNsec).padStart(13)}${
          icount.padStart(11)
        }`,
    );
  }
  return lines.join("\n") + "\n";
}

const SNAPSHOT_OPTIONS = {
  list: { type: "boolean", short: "l", default: false },
  apply: { type: "string", short: "a" },
  create: { type: "string", short: "c" },
  delete: { type: "string", short: "d" },
  format: { type: "string", short: "f" },
  quiet: { type: "boolean", short: "q", default: false },
  "force-share": { type: "boolean", short: "U", default: false },
  help: { type: "boolean", short: "h", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help snapshot`. */
export const snapshotHelp: VerbHelp = {
  text: `usage: ${SNAPSHOT_USAGE}

List, create, apply or delete a qcow2 image's internal snapshots.

  -l            list the snapshots (the default)
  -c SNAPSHOT   create a snapshot of the current state
  -a SNAPSHOT   revert the image to a snapshot (by ID or name)
  -d SNAPSHOT   delete a snapshot (by ID or name)
  -f FMT        image format (probed when absent)
  -q            quiet: print nothing but errors
  -U            force share: list while another process writes the image
  -h, --help    print this help

Example: vstor snapshot -c before-upgrade disk.qcow2
`,
  options: optionFlags(SNAPSHOT_OPTIONS),
};

/** The snapshot verb; returns the exit code. */
export async function snapshotMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, SNAPSHOT_OPTIONS);
  if (values.help) {
    io.stdout(snapshotHelp.text);
    return EXIT_OK;
  }
  const actions = [values.list, values.apply, values.create, values.delete].filter((v) =>
    v !== undefined && v !== false
  );
  if (actions.length > 1) throw new UsageError("Cannot mix '-l', '-a', '-c', '-d'");
  const file = oneFile(positionals, io);
  const listing = actions.length === 0 || values.list;
  if (values["force-share"] && !listing) {
    throw new UsageError("--force-share/-U can only be used with -l");
  }
  const node = await openVerbImage(io, file, {
    ...(values.format === undefined ? {} : { format: values.format }),
    readOnly: listing,
    forceShare: values["force-share"],
  });
  try {
    const host = node instanceof RawNode ? node.hostSnapshots : undefined;
    if (host !== undefined) {
      hostSnapshotVerb(host, values, listing, io);
      return EXIT_OK;
    }
    if (!(node instanceof Qcow2Node)) {
      throw new BlockError(
        "unsupported",
        `Format '${node.format}' does not support internal snapshots`,
        {
          path: file,
        },
      );
    }
    if (listing) {
      if (node.snapshots.entries.length > 0) {
        io.stdout("Snapshot list:\n" + snapshotTable(node.snapshots.entries));
      }
    } else if (values.create !== undefined) {
      await createSnapshot(node, values.create).catch((e) => {
        throw rephrase(e, `Could not create snapshot '${values.create}'`);
      });
    } else if (values.apply !== undefined) {
      await applySnapshot(node, values.apply).catch((e) => {
        throw rephrase(e, `Could not apply snapshot '${values.apply}'`);
      });
    } else if (values.delete !== undefined) {
      await deleteSnapshot(node, values.delete).catch((e) => {
        throw rephrase(e, `Could not delete snapshot '${values.delete}'`);
      });
    }
  } finally {
    await node.close();
  }
  return EXIT_OK;
}

/**
 * qemu-img's snapshot table for a host's own snapshots (RBD): the name as ID and TAG, the image's
 * size then as VM SIZE, and zeroes for date, clock and instruction count, as QEMU's rbd driver
 * fills them. Empty for none.
 */
export function hostSnapshotTable(list: readonly { name: string; size: number }[]): string {
  if (list.length === 0) return "";
  const lines = ["ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"];
  for (const s of list) {
    lines.push(
      `${s.name.padEnd(9)} ${s.name.padEnd(16)} ${sizeToStr(s.size).padStart(8)}` +
        `${localDate(0).padStart(20)}${vmClock(0n).padStart(13)}${"0".padStart(11)}`,
    );
  }
  return lines.join("\n") + "\n";
}

/**
 * `snapshot` on a raw image whose host keeps snapshots (RBD), as QEMU's raw driver passes the
 * calls down: listed with the name as ID and TAG, the image's size then as VM SIZE and no date,
 * clock or instruction count (QEMU's rbd driver fills them with zeroes).
 */
function hostSnapshotVerb(
  host: HostSnapshots,
  values: { create?: string | undefined; apply?: string | undefined; delete?: string | undefined },
  listing: boolean,
  io: CliIo,
): void {
  // QEMU's words for what goes wrong (block/rbd.c and block/snapshot.c).
  const guard = (what: string, fn: () => void, words: Record<number, string>) => {
    try {
      fn();
    } catch (e) {
      const said = e instanceof BlockError ? words[e.context.errno ?? 0] : undefined;
      if (said === undefined) throw rephrase(e, what);
      throw new BlockError((e as BlockError).kind, `${what}: ${said}`, { cause: e });
    }
  };
  if (listing) {
    const table = hostSnapshotTable(host.list());
    if (table !== "") io.stdout("Snapshot list:\n" + table);
  } else if (values.create !== undefined) {
    const name = values.create;
    guard(`Could not create snapshot '${name}'`, () => host.create(name), {
      17: "-17 (File exists)",
    });
  } else if (values.apply !== undefined) {
    const name = values.apply;
    guard(`Could not apply snapshot '${name}'`, () => host.rollback(name), {
      2: "Failed to load snapshot: No such file or directory",
    });
  } else if (values.delete !== undefined) {
    const name = values.delete;
    guard(`Could not delete snapshot '${name}'`, () => host.remove(name), {
      2: "snapshot not found",
    });
  }
}

function rephrase(e: unknown, what: string): unknown {
  if (!(e instanceof BlockError)) return e;
  return new BlockError(e.kind, `${what}: ${e.message}`, { ...e.context, cause: e });
}
