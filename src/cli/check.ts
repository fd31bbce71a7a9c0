/**
 * `vstor check [-f FMT] [--output=human|json] [-r leaks|all] [-q] [-U] FILE`, as qemu-img check,
 * with its exit codes: 0 clean, 1 check errors, 2 corruptions, 3 leaks only, 63 no checks for the
 * format; after -r, the code describes the image after repair.
 *
 * @module
 */
import { Qcow2Node } from "../../formats/qcow2/qcow2.ts";
import { checkImage, type CheckReport } from "../../formats/qcow2/check.ts";
import { type CliIo, errorLine, EXIT_OK, UsageError } from "./cli_io.ts";
import { probedRawWarning } from "./text/messages.ts";
import { formatFixed } from "./text/human.ts";
import { oneFile, openVerbImage, parseVerbArgs } from "./args.ts";
import type { ParseArgsOptionsConfig } from "node:util";
import { optionFlags, type VerbHelp } from "./help.ts";

export const CHECK_USAGE =
  "vstor check [-f FMT] [--output=human|json] [-r leaks|all] [-q] [-U] FILE";

export const CHECK_ERRORS = 1;
export const CHECK_CORRUPTIONS = 2;
export const CHECK_LEAKS = 3;
export const CHECK_UNSUPPORTED = 63;

/** The exit code qemu-img gives a check result. */
export function checkExitCode(r: CheckReport): number {
  if (r.checkErrors > 0) return CHECK_ERRORS;
  if (r.corruptions > 0) return CHECK_CORRUPTIONS;
  if (r.leaks > 0) return CHECK_LEAKS;
  return EXIT_OK;
}

/** qemu-img's JSON for a check: fields in its order, numbers only when non-zero. */
export function checkJson(
  r: CheckReport,
  filename: string,
  format: string,
): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const put = (key: string, value: number) => {
    if (value !== 0) out[key] = value;
  };
  put("image-end-offset", r.imageEndOffset);
  put("total-clusters", r.totalClusters);
  put("corruptions", r.corruptions);
  put("leaks", r.leaks);
  put("corruptions-fixed", r.corruptionsFixed);
  put("leaks-fixed", r.leaksFixed);
  out["check-errors"] = r.checkErrors;
  put("allocated-clusters", r.allocatedClusters);
  put("fragmented-clusters", r.fragmentedClusters);
  put("compressed-clusters", r.compressedClusters);
  out["filename"] = filename;
  out["format"] = format;
  return out;
}

/** qemu-img's human summary of a check. */
export function checkHuman(r: CheckReport): string {
  let text = "";
  if (r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0) {
    text += "No errors were found on the image.\n";
  } else {
    if (r.corruptions > 0) {
      text += `\n${r.corruptions} errors were found on the image.\n` +
        "Data may be corrupted, or further writes to the image may corrupt it.\n";
    }
    if (r.leaks > 0) {
      text += `\n${r.leaks} leaked clusters were found on the image.\n` +
        "This means waste of disk space, but no harm to data.\n";
    }
    if (r.checkErrors > 0) {
      text += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
    }
  }
  if (r.totalClusters !== 0 && r.allocatedClusters !== 0) {
    // printf's %0.2f: exact value, ties to even (3.125 prints as 3.12).
    const pct = (n: number, d: number) => formatFixed(n * 100.0 / d, 2);
    text +=
      `${r.allocatedClusters}/${r.totalClusters} = ${
        pct(r.allocatedClusters, r.totalClusters)
      }% allocated, ` +
      `${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ` +
      `${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters\n`;
  }
  if (r.imageEndOffset !== 0) text += `Image end offset: ${r.imageEndOffset}\n`;
  return text;
}

/** What the check printed while it ran; error_report lines after the program name. */
function printMessages(io: CliIo, report: CheckReport): void {
  const reported = new Set(report.reported);
  report.messages.forEach((line, i) => {
    if (reported.has(i)) errorLine(io, line);
    else io.stderr(line + "\n");
  });
}

const CHECK_OPTIONS = {
  format: { type: "string", short: "f" },
  output: { type: "string", default: "human" },
  repair: { type: "string", short: "r" },
  quiet: { type: "boolean", short: "q", default: false },
  "force-share": { type: "boolean", short: "U", default: false },
  help: { type: "boolean", short: "h", default: false },
} satisfies ParseArgsOptionsConfig;

/** `vstor help check`. */
export const checkHelp: VerbHelp = {
  text: `usage: ${CHECK_USAGE}

Check an image for consistency (qcow2: refcounts, L1/L2 tables, snapshots), and repair it.

  -f FMT                image format (probed when absent)
  --output=human|json   output format (default human; json has qemu-img's field names)
  -r leaks              free leaked clusters
  -r all                also fix refcount errors and COPIED flags, rebuilding the refcount
                        structure if needed
  -q                    quiet: print nothing but errors
  -U                    force share: check while another process writes the image (no repair)
  -h, --help            print this help

Exit codes: 0 clean, 1 check errors, 2 corruptions, 3 leaks only, 63 format has no checks.

Example: vstor check -r leaks disk.qcow2
`,
  options: optionFlags(CHECK_OPTIONS),
};

/** The check verb; returns qemu-img check's exit code. */
export async function checkMain(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseVerbArgs(args, CHECK_OPTIONS);
  if (values.help) {
    io.stdout(checkHelp.text);
    return EXIT_OK;
  }
  if (values.output !== "human" && values.output !== "json") {
    throw new UsageError(`--output must be human or json, not '${values.output}'`);
  }
  if (values.repair !== undefined && values.repair !== "leaks" && values.repair !== "all") {
    throw new UsageError(
      `Unknown option value for -r (expecting 'leaks' or 'all'): ${values.repair}`,
    );
  }
  const file = oneFile(positionals, io);
  const repair = values.repair;
  const node = await openVerbImage(io, file, {
    ...(values.format === undefined ? {} : { format: values.format }),
    readOnly: repair === undefined,
    forceShare: values["force-share"],
    check: true,
  });
  if (repair !== undefined && values.format === undefined && node.format === "raw") {
    io.stderr(probedRawWarning(file));
  }
  try {
    if (!(node instanceof Qcow2Node)) {
      errorLine(io, "This image format does not support checks");
      return CHECK_UNSUPPORTED;
    }
    const fix = { leaks: repair !== undefined, errors: repair === "all" };
    let report = checkImage(node, fix);
    printMessages(io, report);
    if (report.failed !== undefined) {
      errorLine(io, `Check failed: ${report.failed}`);
      return CHECK_ERRORS;
    }
    const human = values.output === "human" && !values.quiet;
    if (report.leaksFixed > 0 || report.corruptionsFixed > 0) {
      if (human) {
        io.stdout(
          "The following inconsistencies were found and repaired:\n\n" +
            `    ${report.leaksFixed} leaked clusters\n    ${report.corruptionsFixed} corruptions\n\n` +
            "Double checking the fixed image now...\n",
        );
      }
      const { leaksFixed, corruptionsFixed } = report;
      report = checkImage(node);
      printMessages(io, report);
      if (report.failed !== undefined) {
        errorLine(io, `Check failed: ${report.failed}`);
        return CHECK_ERRORS;
      }
      report.leaksFixed = leaksFixed;
      report.corruptionsFixed = corruptionsFixed;
    }
    if (values.output === "json") {
      io.stdout(JSON.stringify(checkJson(report, file, node.format), null, 4) + "\n");
    } else if (human) {
      io.stdout(checkHuman(report));
    }
    return checkExitCode(report);
  } finally {
    await node.close();
  }
}
