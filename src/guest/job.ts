/**
 * fio-style job definitions: the option names fio uses, parsed from a command line
 * (`--name=a --rw=randread --bs=4k --iodepth=32 --verify_only …`, via `node:util` parseArgs), from
 * a JSON job file (`{ "global": {…}, "jobs": [{…}] }`) or from an fio INI job file (`[global]`,
 * `[job]`, `key=value`), all validated by one zod schema whose errors name the field:
 * `jobs[1].bs: "4q" is not a size` or `--iodepth: must be an integer from 1 to 65536`.
 *
 * Units, as fio's defaults (kb_base=1024): sizes take k, m, g, t (optionally followed by "b",
 * "ib"), case-insensitive, 1k = 1024. Times (`runtime`) are seconds when bare, or take us, ms, s,
 * m, h, d.
 *
 * Options: name, rw (readwrite) = read | write | randread | randwrite | rw (readwrite) | randrw |
 * trim | randtrim, bs (blocksize), iodepth, iodepth_batch_submit (iodepth_batch), size, offset,
 * offset_increment, io_size (io_limit), runtime, time_based, numjobs, rwmixread / rwmixwrite,
 * verify = none | pattern | crc32c, verify_pattern, verify_only, do_verify, verify_fatal,
 * randseed (seed), norandommap, filename (the disks: drive or device ids, `:`-separated); accepted
 * and ignored: direct, ioengine, group_reporting.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { z } from "zod";
import { DEFAULT_SEED } from "./random.ts";
import { VERIFY_MIN_BLOCK } from "./verify.ts";

/** fio's rw= values understood here. */
export type RwMode =
  | "read"
  | "write"
  | "randread"
  | "randwrite"
  | "rw"
  | "randrw"
  | "trim"
  | "randtrim";

/** A validated job, fio's options in camelCase; sizes in bytes, times in milliseconds. */
export interface JobSpec {
  /** The job's name (fio's `name`), shown in the report. */
  readonly name: string;
  /** The I/O pattern (fio's `rw`). */
  readonly rw: RwMode;
  /** Bytes per request (fio's `bs`). */
  readonly bs: number;
  /** Requests in flight at once per clone (fio's `iodepth`). */
  readonly iodepth: number;
  /** Requests submitted before a commit (kick): fio's iodepth_batch_submit, 1 by default. */
  readonly iodepthBatch: number;
  /** Bytes of the region a job works in; null: from `offset` to the end of the device. */
  readonly size: number | null;
  /** Where the job's region starts, in bytes (fio's `offset`). */
  readonly offset: number;
  /** Added to `offset` for each clone (numjobs > 1). */
  readonly offsetIncrement: number;
  /** Bytes of I/O before the job ends; null: `size` (one pass). */
  readonly ioSize: number | null;
  /** Time cap in ms; null: none. */
  readonly runtimeMs: number | null;
  /** Keep going (looping over the region) until runtime passes. */
  readonly timeBased: boolean;
  /** Clones of the job, each with its own region offset and queue (fio's `numjobs`). */
  readonly numjobs: number;
  /** Percentage of reads in rw/randrw. */
  readonly rwmixread: number;
  /** How written blocks are stamped and checked (fio's `verify`). */
  readonly verify: "none" | "pattern" | "crc32c";
  /** The bytes `verify=pattern` writes (fio's `verify_pattern`). */
  readonly verifyPattern: readonly number[];
  /** Do not run the workload: read back what it would have written and check it. */
  readonly verifyOnly: boolean;
  /** After a writing workload, read back and check (fio's do_verify, default true). */
  readonly doVerify: boolean;
  /** Stop the job at the first verify failure. */
  readonly verifyFatal: boolean;
  /** Seed of the random offsets and data (fio's `randseed`). */
  readonly seed: number;
  /** Random offsets may repeat (no full pass per loop). */
  readonly norandommap: boolean;
  /**
   * The disks the job runs on, as fio's `filename=` (names separated by `:`): drive ids, device
   * ids or `DEVICE/LUN`, resolved by whoever attaches the disks; null: every disk.
   */
  readonly filename: string | null;
}

/** One bad option: where (`jobs[0].bs`, `--bs`) and what. */
export interface JobIssue {
  /** Where: `jobs[0].bs`, `--bs`, or a job file line. */
  readonly path: string;
  /** What is wrong. */
  readonly message: string;
}

/** A job definition that does not validate; the message lists each issue on its own line. */
export class JobError extends Error {
  /** Always `JobError`. */
  override readonly name = "JobError";
  /** Every issue found. */
  readonly issues: readonly JobIssue[];

  /** Makes the error listing `issues`. */
  constructor(issues: readonly JobIssue[]) {
    super(issues.map((i) => `${i.path}: ${i.message}`).join("\n"));
    this.issues = issues;
  }

  /** The first issue's path, e.g. `--bs`. */
  get field(): string {
    return this.issues[0]?.path ?? "";
  }
}

// ---- Units ---------------------------------------------------------------------------------------

const SIZE_UNITS: Record<string, number> = {
  "": 1,
  k: 1024,
  m: 1024 ** 2,
  g: 1024 ** 3,
  t: 1024 ** 4,
  p: 1024 ** 5,
};

/**
 * A size as fio reads one: `4096`, `4k`, `4KiB`, `1M`, `2g`. Returns null for anything else.
 *
 * @example
 * ```ts
 * import { parseSize } from "./job.ts";
 * if (parseSize("4k") !== 4096 || parseSize("1MiB") !== 1048576) throw new Error("units");
 * ```
 */
export function parseSize(text: string | number): number | null {
  if (typeof text === "number") return Number.isSafeInteger(text) && text >= 0 ? text : null;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$/i.exec(text);
  if (m === null) return null;
  const value = Number(m[1]) * SIZE_UNITS[m[2]!.toLowerCase()]!;
  if (!Number.isFinite(value)) return null;
  const bytes = Math.round(value);
  return Number.isSafeInteger(bytes) ? bytes : null;
}

const TIME_UNITS: Record<string, number> = {
  us: 0.001,
  ms: 1,
  s: 1000,
  "": 1000, // fio: a bare runtime is seconds
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
};

/** A time as fio reads one, in ms: `10` (seconds), `500ms`, `2m`. Null for anything else. */
export function parseTime(text: string | number): number | null {
  if (typeof text === "number") return Number.isFinite(text) && text >= 0 ? text * 1000 : null;
  const m = /^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)?\s*$/i.exec(text);
  if (m === null) return null;
  return Number(m[1]) * TIME_UNITS[(m[2] ?? "").toLowerCase()]!;
}

function parseBool(v: unknown): boolean | null {
  if (v === true || v === false) return v;
  if (v === 1 || v === "1" || v === "true" || v === "yes" || v === "on") return true;
  if (v === 0 || v === "0" || v === "false" || v === "no" || v === "off") return false;
  return null;
}

// ---- Schema --------------------------------------------------------------------------------------

const scalar = z.union([z.string(), z.number(), z.boolean()]);

const sizeField = (min: number) =>
  scalar.transform((v, ctx) => {
    const bytes = typeof v === "boolean" ? null : parseSize(v);
    if (bytes === null) {
      ctx.addIssue({
        code: "custom",
        message: `${JSON.stringify(v)} is not a size (a number with an optional k, m, g, t suffix)`,
      });
      return z.NEVER;
    }
    if (bytes < min) {
      ctx.addIssue({ code: "custom", message: `must be at least ${min} bytes` });
      return z.NEVER;
    }
    return bytes;
  });

const intField = (min: number, max: number) =>
  scalar.transform((v, ctx) => {
    const n = typeof v === "number"
      ? v
      : typeof v === "string" && /^\s*\d+\s*$/.test(v)
      ? Number(v)
      : NaN;
    if (!Number.isInteger(n) || n < min || n > max) {
      ctx.addIssue({ code: "custom", message: `must be an integer from ${min} to ${max}` });
      return z.NEVER;
    }
    return n;
  });

const boolField = scalar.transform((v, ctx) => {
  const b = parseBool(v);
  if (b === null) {
    ctx.addIssue({ code: "custom", message: `${JSON.stringify(v)} is not a boolean (0 or 1)` });
    return z.NEVER;
  }
  return b;
});

const timeField = scalar.transform((v, ctx) => {
  const ms = typeof v === "boolean" ? null : parseTime(v);
  if (ms === null) {
    ctx.addIssue({
      code: "custom",
      message: `${JSON.stringify(v)} is not a time (seconds, or a number with us, ms, s, m, h)`,
    });
    return z.NEVER;
  }
  return ms;
});

const RW_MODES = ["read", "write", "randread", "randwrite", "rw", "randrw", "trim", "randtrim"];

const rwField = scalar.transform((v, ctx) => {
  const s = String(v) === "readwrite" ? "rw" : String(v);
  if (!RW_MODES.includes(s)) {
    ctx.addIssue({
      code: "custom",
      message: `${JSON.stringify(v)} is not one of ${RW_MODES.join(", ")}`,
    });
    return z.NEVER;
  }
  return s as RwMode;
});

const verifyField = scalar.transform((v, ctx) => {
  const s = String(v);
  if (s === "0" || s === "none" || s === "false") return "none" as const;
  if (s === "pattern" || s === "crc32c") return s as "pattern" | "crc32c";
  ctx.addIssue({ code: "custom", message: `${JSON.stringify(v)} is not none, pattern or crc32c` });
  return z.NEVER;
});

const patternField = scalar.transform((v, ctx) => {
  const s = String(v).trim();
  let bytes: number[] | null = null;
  const hex = /^0x([0-9a-f]+)$/i.exec(s);
  if (hex !== null && hex[1]!.length <= 64) {
    const digits = hex[1]!.length % 2 === 1 ? `0${hex[1]}` : hex[1]!;
    bytes = [];
    // In written order, as fio lays out a hex verify_pattern.
    for (let i = 0; i < digits.length; i += 2) bytes.push(parseInt(digits.slice(i, i + 2), 16));
  } else if (/^\d+$/.test(s) && Number(s) <= 255) {
    bytes = [Number(s)];
  }
  if (bytes === null) {
    ctx.addIssue({
      code: "custom",
      message: `${
        JSON.stringify(v)
      } is not a pattern (0x followed by up to 32 hex bytes, or 0..255)`,
    });
    return z.NEVER;
  }
  return bytes;
});

const ignored = scalar.optional();

/** One job's options, all optional (a job inherits what `global` sets). */
const jobOptionsSchema = z.strictObject({
  name: z.union([z.string().min(1).max(64), z.number()]).transform(String).optional(),
  rw: rwField.optional(),
  bs: sizeField(512).optional(),
  iodepth: intField(1, 65536).optional(),
  iodepth_batch_submit: intField(1, 65536).optional(),
  size: sizeField(1).optional(),
  offset: sizeField(0).optional(),
  offset_increment: sizeField(0).optional(),
  io_size: sizeField(1).optional(),
  runtime: timeField.optional(),
  time_based: boolField.optional(),
  numjobs: intField(1, 64).optional(),
  rwmixread: intField(0, 100).optional(),
  verify: verifyField.optional(),
  verify_pattern: patternField.optional(),
  verify_only: boolField.optional(),
  do_verify: boolField.optional(),
  verify_fatal: boolField.optional(),
  randseed: intField(0, Number.MAX_SAFE_INTEGER).optional(),
  norandommap: boolField.optional(),
  direct: ignored,
  ioengine: ignored,
  filename: z.union([z.string().min(1).max(1024), z.number()]).transform(String).optional(),
  group_reporting: ignored,
});

type JobOptions = z.output<typeof jobOptionsSchema>;

/** One job-file key as the reference documents it. */
export interface JobOptionDoc {
  /** The key (fio's name). */
  readonly key: string;
  /** What it takes: `size`, `integer 1–65536`, `boolean`, `time`, a list of values… */
  readonly type: string;
  /** Its default, as text. */
  readonly default: string;
  /** fio's equivalent (its name, or what differs). */
  readonly fio: string;
  /** What it does. */
  readonly doc: string;
  /** Other spellings fio accepts. */
  readonly aliases?: readonly string[];
}

/** Every job-file key: the reference in the README and `vstor run --schema` come from this. */
export const JOB_OPTIONS: readonly JobOptionDoc[] = [
  {
    key: "name",
    type: "string",
    default: "job<N>",
    fio: "name",
    doc: "The job's name in the report.",
  },
  {
    key: "rw",
    type: RW_MODES.join(" | "),
    default: "read",
    fio: "rw",
    doc: "The I/O pattern; rw and randrw mix reads and writes by rwmixread.",
    aliases: ["readwrite"],
  },
  {
    key: "bs",
    type: "size (multiple of 512)",
    default: "4k",
    fio: "bs",
    doc: "Bytes per request.",
    aliases: ["blocksize"],
  },
  {
    key: "iodepth",
    type: "integer 1–65536",
    default: "1",
    fio: "iodepth",
    doc: "Requests in flight per clone (capped by the queue).",
  },
  {
    key: "iodepth_batch_submit",
    type: "integer 1–65536",
    default: "1",
    fio: "iodepth_batch_submit",
    doc: "Requests added to the ring before one kick (notification).",
    aliases: ["iodepth_batch"],
  },
  {
    key: "size",
    type: "size",
    default: "to the end of the disk",
    fio: "size",
    doc: "Bytes of the region the job works in, from offset.",
  },
  {
    key: "offset",
    type: "size (multiple of 512)",
    default: "0",
    fio: "offset",
    doc: "Where the region starts.",
  },
  {
    key: "offset_increment",
    type: "size (multiple of 512)",
    default: "0",
    fio: "offset_increment",
    doc: "Added to offset for each clone (numjobs).",
  },
  {
    key: "io_size",
    type: "size",
    default: "size (one pass)",
    fio: "io_size",
    doc: "Bytes of I/O before the job ends (it loops over the region).",
    aliases: ["io_limit"],
  },
  {
    key: "runtime",
    type: "time (s, or us/ms/s/m/h/d)",
    default: "none",
    fio: "runtime",
    doc: "Stop after this long.",
  },
  {
    key: "time_based",
    type: "boolean",
    default: "0",
    fio: "time_based",
    doc: "Keep looping until runtime passes (needs runtime).",
  },
  {
    key: "numjobs",
    type: "integer 1–64",
    default: "1",
    fio: "numjobs",
    doc: "Clones of the job, each on its own queue when the device has enough.",
  },
  {
    key: "rwmixread",
    type: "integer 0–100",
    default: "50",
    fio: "rwmixread (rwmixwrite = 100 − rwmixread)",
    doc: "Percentage of reads in rw/randrw.",
  },
  {
    key: "verify",
    type: "none | pattern | crc32c",
    default: "none",
    fio: "verify",
    doc: "Stamp written blocks and check them when read back.",
  },
  {
    key: "verify_pattern",
    type: "0x hex bytes (≤ 32) or 0–255",
    default: "0xa5",
    fio: "verify_pattern",
    doc: "The pattern of verify=pattern.",
  },
  {
    key: "verify_only",
    type: "boolean",
    default: "0",
    fio: "verify_only",
    doc: "Do not write: read back what the job would have written and check it.",
  },
  {
    key: "do_verify",
    type: "boolean",
    default: "1",
    fio: "do_verify",
    doc: "After a writing job, read back and check (with verify).",
  },
  {
    key: "verify_fatal",
    type: "boolean",
    default: "0",
    fio: "verify_fatal",
    doc: "Stop the job at the first verify failure.",
  },
  {
    key: "randseed",
    type: "integer ≥ 0",
    default: String(DEFAULT_SEED),
    fio: "randseed",
    doc: "Seed of the random offsets, directions and verify stamps.",
    aliases: ["seed"],
  },
  {
    key: "norandommap",
    type: "boolean",
    default: "0",
    fio: "norandommap",
    doc: "Random offsets may repeat within a pass.",
  },
  {
    key: "filename",
    type: "disk names, ':'-separated",
    default: "every disk",
    fio: "filename (disks instead of files)",
    doc:
      "The disks the job runs on: drive ids, virtio-blk device ids, or DEVICE/LUN of a virtio-scsi disk.",
  },
  {
    key: "direct",
    type: "boolean",
    default: "—",
    fio: "direct",
    doc: "Accepted and ignored: the guest has no page cache.",
  },
  {
    key: "ioengine",
    type: "string",
    default: "—",
    fio: "ioengine",
    doc: "Accepted and ignored: the guest's engine is its virtio driver.",
  },
  {
    key: "group_reporting",
    type: "boolean",
    default: "—",
    fio: "group_reporting",
    doc: "Accepted and ignored: the report has per-disk totals.",
  },
];

/**
 * The JSON Schema of a JSON job file (`{ "global": {…}, "jobs": [{…}] }`), generated from the
 * zod schema the files are validated with, each key described from {@linkcode JOB_OPTIONS}.
 */
export function jobFileJsonSchema(): Record<string, unknown> {
  const docs = new Map(JOB_OPTIONS.map((d) => [d.key, d]));
  const shape: Record<string, z.ZodType> = {};
  const describe = (d: JobOptionDoc, alias?: string) =>
    `${
      alias === undefined ? "" : `Alias of ${d.key}. `
    }${d.doc} Takes: ${d.type}. Default: ${d.default}. fio: ${d.fio}.`;
  for (const [key, field] of Object.entries(jobOptionsSchema.shape)) {
    const d = docs.get(key);
    shape[key] = d === undefined ? field : field.meta({ description: describe(d) });
    for (const alias of d?.aliases ?? []) {
      shape[alias] = field.meta({ description: describe(d!, alias) });
    }
  }
  shape.rwmixwrite = jobOptionsSchema.shape.rwmixread.meta({
    description: "Percentage of writes in rw/randrw (100 − rwmixread).",
  });
  const options = z.strictObject(shape);
  const file = z.strictObject({
    global: options.optional().meta({ description: "Options every job inherits." }),
    jobs: z.array(options).min(1).meta({ description: "The jobs; all run at once." }),
  }).meta({
    title: "vstor run job file",
    description:
      "fio-style jobs for `vstor run --job FILE` (JSON; fio's INI format is accepted too).",
  });
  return z.toJSONSchema(file, { io: "input", unrepresentable: "any" }) as Record<string, unknown>;
}

/** A job file: options shared by every job, and the jobs. */
const jobFileSchema = z.strictObject({
  global: z.record(z.string(), scalar).optional(),
  jobs: z.array(z.record(z.string(), scalar)).min(1, { error: "needs at least one job" }),
});

/** Option spellings fio accepts for the same thing. */
const ALIASES: Record<string, string> = {
  readwrite: "rw",
  blocksize: "bs",
  iodepth_batch: "iodepth_batch_submit",
  io_limit: "io_size",
  seed: "randseed",
};

const BOOLEAN_OPTIONS = new Set([
  "time_based",
  "verify_only",
  "do_verify",
  "verify_fatal",
  "norandommap",
  "group_reporting",
  "direct",
]);

/** Renames aliases and turns rwmixwrite into rwmixread. */
function canonical(raw: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(raw)) {
    const name = ALIASES[key] ?? key;
    if (name === "rwmixwrite") {
      const n = Number(value);
      out.rwmixread = Number.isInteger(n) && n >= 0 && n <= 100 ? 100 - n : value;
    } else {
      out[name] = value;
    }
  }
  return out;
}

/** Validates one job's merged options (global first, then its own) into a {@linkcode JobSpec}. */
function buildJob(
  merged: Record<string, unknown>,
  index: number,
  pathOf: (key: string) => string,
): JobSpec {
  const parsed = jobOptionsSchema.safeParse(canonical(merged));
  if (!parsed.success) {
    throw new JobError(parsed.error.issues.map((issue) => {
      if (issue.code === "unrecognized_keys") {
        const key = issue.keys[0] ?? "";
        return { path: pathOf(key), message: `unknown option "${key}"` };
      }
      return { path: pathOf(String(issue.path[0] ?? "")), message: issue.message };
    }));
  }
  return finishJob(parsed.data, index, pathOf);
}

function finishJob(o: JobOptions, index: number, pathOf: (key: string) => string): JobSpec {
  const issues: JobIssue[] = [];
  const issue = (key: string, message: string) => issues.push({ path: pathOf(key), message });
  const rw = o.rw ?? "read";
  const bs = o.bs ?? 4096;
  const writes = rw === "write" || rw === "randwrite" || rw === "rw" || rw === "randrw";
  const trims = rw === "trim" || rw === "randtrim";
  let verify: JobSpec["verify"] = o.verify ?? (o.verify_pattern !== undefined ? "pattern" : "none");
  if (o.verify === undefined && o.verify_only === true && o.verify_pattern === undefined) {
    verify = "crc32c"; // verify_only without a verify mode: check with the default checksum
  }
  if (bs % 512 !== 0) issue("bs", `${bs} is not a multiple of 512`);
  if (verify !== "none" && bs < VERIFY_MIN_BLOCK) {
    issue("bs", `must be at least ${VERIFY_MIN_BLOCK} bytes with verify`);
  }
  if (verify !== "none" && trims) issue("verify", `a ${rw} job writes nothing to verify`);
  if (o.verify_only === true && !writes) {
    issue("verify_only", `rw=${rw} writes nothing; give the writing workload to check`);
  }
  if (o.time_based === true && o.runtime === undefined) {
    issue("time_based", "needs runtime");
  }
  if (o.offset !== undefined && o.offset % 512 !== 0) {
    issue("offset", `${o.offset} is not a multiple of 512`);
  }
  if (o.offset_increment !== undefined && o.offset_increment % 512 !== 0) {
    issue("offset_increment", `${o.offset_increment} is not a multiple of 512`);
  }
  if (o.size !== undefined && o.size < bs) issue("size", `${o.size} is smaller than bs ${bs}`);
  if (issues.length > 0) throw new JobError(issues);
  const iodepth = o.iodepth ?? 1;
  return {
    name: o.name ?? `job${index}`,
    rw,
    bs,
    iodepth,
    iodepthBatch: Math.min(o.iodepth_batch_submit ?? 1, iodepth),
    size: o.size ?? null,
    offset: o.offset ?? 0,
    offsetIncrement: o.offset_increment ?? 0,
    ioSize: o.io_size ?? null,
    runtimeMs: o.runtime ?? null,
    timeBased: o.time_based ?? false,
    numjobs: o.numjobs ?? 1,
    rwmixread: o.rwmixread ?? 50,
    verify,
    verifyPattern: o.verify_pattern ?? [0xa5],
    verifyOnly: o.verify_only ?? false,
    doVerify: o.do_verify ?? true,
    verifyFatal: o.verify_fatal ?? false,
    seed: o.randseed ?? DEFAULT_SEED,
    norandommap: o.norandommap ?? false,
    filename: o.filename ?? null,
  };
}

/**
 * Parses fio-style command-line options into jobs. Options before the first `--name` are global;
 * each `--name` starts a job. Flags may be bare (`--verify_only`) or valued (`--verify_only=1`).
 *
 * @example
 * ```ts
 * import { parseJobArgs } from "./job.ts";
 * const [job] = parseJobArgs(["--rw=randread", "--bs=4k", "--iodepth=32", "--name=a"]);
 * if (job?.bs !== 4096 || job.iodepth !== 32) throw new Error("parse");
 * ```
 *
 * @throws {JobError} naming the option (`--bs: "4q" is not a size …`)
 */
export function parseJobArgs(argv: readonly string[]): JobSpec[] {
  const options: Record<string, { type: "string" | "boolean" }> = {};
  for (const key of [...Object.keys(jobOptionsSchema.shape), ...Object.keys(ALIASES)]) {
    options[key] = { type: BOOLEAN_OPTIONS.has(key) ? "boolean" : "string" };
  }
  options.rwmixwrite = { type: "string" };
  const { tokens } = parseArgs({ args: [...argv], options, strict: false, tokens: true });
  const global: Record<string, unknown> = {};
  const jobs: Record<string, unknown>[] = [];
  const issues: JobIssue[] = [];
  for (const token of tokens) {
    if (token.kind === "positional") {
      issues.push({
        path: `argument ${token.index + 1}`,
        message: `unexpected "${token.value}" (options are --option=value)`,
      });
      continue;
    }
    if (token.kind !== "option") continue;
    const key = token.name;
    if (!(key in options)) {
      issues.push({ path: `--${key}`, message: `unknown option "${key}"` });
      continue;
    }
    let value: unknown = token.value;
    if (value === undefined) {
      if (!BOOLEAN_OPTIONS.has(key)) {
        issues.push({ path: `--${key}`, message: "needs a value (--option=value)" });
        continue;
      }
      value = true;
    }
    if (key === "name") jobs.push({ name: value });
    else (jobs.at(-1) ?? global)[key] = value;
  }
  if (issues.length > 0) throw new JobError(issues);
  if (jobs.length === 0) jobs.push({});
  return expandJobs(global, jobs, () => (key) => `--${key}`);
}

function expandJobs(
  global: Record<string, unknown>,
  jobs: readonly Record<string, unknown>[],
  pathFor: (index: number) => (key: string) => string,
): JobSpec[] {
  const out: JobSpec[] = [];
  const issues: JobIssue[] = [];
  for (const [index, job] of jobs.entries()) {
    try {
      out.push(buildJob({ ...canonical(global), ...canonical(job) }, index, pathFor(index)));
    } catch (error) {
      if (!(error instanceof JobError)) throw error;
      issues.push(...error.issues);
    }
  }
  if (issues.length > 0) throw new JobError(issues);
  return out;
}

/**
 * Parses a job file: JSON (`{ "global": {…}, "jobs": [{…}, …] }`) or fio's INI format
 * (`[global]` then one `[name]` section per job, `key=value` or bare `key` lines, `;`/`#`
 * comments).
 *
 * @throws {JobError} naming the field (`jobs[1].bs`, or `[name].bs` for INI files)
 */
export function parseJobFile(text: string): JobSpec[] {
  if (text.trimStart().startsWith("{")) {
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (error) {
      throw new JobError([{ path: "(file)", message: `not valid JSON: ${String(error)}` }]);
    }
    return parseJobObject(json);
  }
  return parseIni(text);
}

/**
 * Validates a job file already parsed from JSON.
 *
 * @throws {JobError} naming the field (`jobs[0].rw: …`)
 */
export function parseJobObject(json: unknown): JobSpec[] {
  const parsed = jobFileSchema.safeParse(json);
  if (!parsed.success) {
    throw new JobError(parsed.error.issues.map((issue) => ({
      path: issue.code === "unrecognized_keys"
        ? (issue.keys[0] ?? "(file)")
        : issue.path.map((p, i) =>
          typeof p === "number" ? `[${p}]` : i === 0 ? String(p) : `.${String(p)}`
        )
          .join("") || "(file)",
      message: issue.code === "unrecognized_keys"
        ? `unknown key "${issue.keys[0] ?? ""}" (a job file holds "global" and "jobs")`
        : issue.code === "invalid_type" && issue.path.length === 1 && issue.path[0] === "jobs"
        ? 'is required: a list of jobs ({ "jobs": [{ "rw": "randread", … }] })'
        : issue.code === "invalid_type" && issue.path.length === 0
        ? 'must be an object ({ "global": {…}, "jobs": [{…}] })'
        : issue.message,
    })));
  }
  const { global = {}, jobs } = parsed.data;
  return expandJobs(global, jobs, (index) => (key) => {
    // An option set in global but invalid is named where it was written.
    const inJob = Object.keys(jobs[index] ?? {}).some((k) => (ALIASES[k] ?? k) === key);
    return inJob || !(key in canonical(global)) ? `jobs[${index}].${key}` : `global.${key}`;
  });
}

function parseIni(text: string): JobSpec[] {
  const global: Record<string, unknown> = {};
  const jobs: Record<string, unknown>[] = [];
  const names: string[] = [];
  let section: Record<string, unknown> | null = null;
  const issues: JobIssue[] = [];
  for (const [n, raw] of text.split(/\r?\n/).entries()) {
    const line = raw.replace(/[;#].*$/, "").trim();
    if (line === "") continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header !== null) {
      const name = header[1]!.trim();
      if (name === "global") section = global;
      else {
        section = { name };
        jobs.push(section);
        names.push(name);
      }
      continue;
    }
    if (section === null) {
      issues.push({ path: `line ${n + 1}`, message: "option outside a [section]" });
      continue;
    }
    const eq = line.indexOf("=");
    if (eq < 0) section[line] = true;
    else section[line.slice(0, eq).trim()] = line.slice(eq + 1).trim();
  }
  if (issues.length > 0) throw new JobError(issues);
  if (jobs.length === 0) {
    throw new JobError([{ path: "(file)", message: "needs at least one job" }]);
  }
  return expandJobs(global, jobs, (index) => (key) => `[${names[index]}].${key}`);
}
