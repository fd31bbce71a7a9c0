import { EMPTY_LATENCY } from "../../src/guest/latency.ts";
import assert from "node:assert/strict";
import {
  formatBytesIEC,
  formatBytesSI,
  formatCount,
  formatReport,
  reportJson,
  summarizeVirtio,
  type VirtioNumbers,
} from "../../src/guest/report.ts";
import type { DirectionResult, WorkloadResult } from "../../src/guest/workload.ts";

const NONE: DirectionResult = {
  ops: 0,
  bytes: 0,
  errors: 0,
  iops: 0,
  bandwidth: 0,
  latency: EMPTY_LATENCY,
};

const READ: DirectionResult = {
  ops: 123_456,
  bytes: 123_456 * 4096,
  errors: 0,
  iops: 12_345.6,
  bandwidth: 12_345.6 * 4096,
  latency: {
    ...EMPTY_LATENCY,
    count: 123_456,
    min: 20_500,
    avg: 40_123,
    p50: 38_912,
    p99: 120_832,
    p999: 403_456,
    max: 1_234_567,
  },
};

const WRITE: DirectionResult = {
  ops: 512,
  bytes: 512 * 65536,
  errors: 1,
  iops: 51.2,
  bandwidth: 51.2 * 65536,
  latency: {
    ...EMPTY_LATENCY,
    count: 512,
    min: 2_000_000,
    avg: 15_500_000,
    p50: 14_680_064,
    p99: 30_408_704,
    p999: 31_457_280,
    max: 32_000_000,
  },
};

const RESULT: WorkloadResult = {
  jobs: [
    {
      name: "reader",
      clone: 0,
      rw: "randread",
      bs: 4096,
      iodepth: 32,
      elapsedMs: 10_000.4,
      read: READ,
      write: NONE,
      trim: NONE,
      verify: null,
      error: null,
    },
    {
      name: "writer",
      clone: 1,
      rw: "write",
      bs: 65536,
      iodepth: 4,
      elapsedMs: 10_000,
      read: NONE,
      write: WRITE,
      trim: NONE,
      verify: {
        checked: 511,
        failed: 1,
        failures: [{
          blockOffset: 65536,
          length: 65536,
          reason: "data",
          expected: 0xa5,
          found: 0xa4,
          offset: 65536 + 300,
          expectedByte: 0xa5,
          foundByte: 0xa4,
        }],
      },
      error: { op: "write", offset: 1048576, length: 65536, status: "ioerr", detail: "injected" },
    },
  ],
  total: { elapsedMs: 10_000.4, read: READ, write: WRITE, trim: NONE },
};

const VIRTIO: VirtioNumbers = {
  queues: [
    {
      device: "disk0",
      queue: 0,
      requests: 123_456,
      kicks: 4_000,
      suppressedKicks: 119_000,
      interrupts: 3_500,
      suppressedInterrupts: 100,
      largestBatch: 32,
    },
    { device: "disk0", queue: 1, requests: 1_024, kicks: 512, suppressedKicks: 0, interrupts: 512 },
  ],
  exits: { config: 120, mmio: 4_700, doorbell: 0, ioeventfd: 4_512 },
};

const GOLDEN = `\
reader: (clone 0): rw=randread, bs=4096, iodepth=32: err=0
  read: IOPS=12.3k, BW=48.2MiB/s (50.6MB/s)(482MiB/10000msec)
    lat (usec): min=20.50, avg=40.12, p50=38.91, p99=121, p99.9=403, max=1235
writer: (clone 1): rw=write, bs=65536, iodepth=4: err=1
  write: IOPS=51.2, BW=3.2MiB/s (3.36MB/s)(32MiB/10000msec), errors=1
    lat (msec): min=2.00, avg=15.50, p50=14.68, p99=30.41, p99.9=31.46, max=32.00
  verify: 511 blocks checked, 1 failed
    verify failed in block at offset 65536 (length 65536): data byte: expected 0xa5, found 0xa4 (first bad byte at offset 65836: expected 0xa5, found 0xa4)
  error: write offset=1048576, length=65536: ioerr (injected)
total: jobs=2, elapsed=10000msec
  read: IOPS=12.3k, BW=48.2MiB/s (50.6MB/s)(482MiB/10000msec)
    lat (usec): min=20.50, avg=40.12, p50=38.91, p99=121, p99.9=403, max=1235
  write: IOPS=51.2, BW=3.2MiB/s (3.36MB/s)(32MiB/10000msec), errors=1
    lat (msec): min=2.00, avg=15.50, p50=14.68, p99=30.41, p99.9=31.46, max=32.00
virtio:
  disk0 queue 0: requests=123456, kicks=4000, suppressed kicks=119000, interrupts=3500, suppressed interrupts=100
  disk0 queue 1: requests=1024, kicks=512, suppressed kicks=0, interrupts=512
  total: requests=124480, kicks/request=0.04, interrupts/request=0.03, average batch=27.59, suppressed notifications=119100
  exits: config=120, mmio=4700 (doorbells 0), ioeventfd rings=4512, per request=0.04
`;

Deno.test("formatReport() prints jobs, total and the virtio numbers (golden)", () => {
  assert.equal(formatReport(RESULT, VIRTIO), GOLDEN);
});

Deno.test("formatReport() without virtio numbers stops after the total", () => {
  const text = formatReport(RESULT);
  assert.ok(text.endsWith("max=32.00\n"));
  assert.ok(!text.includes("virtio"));
});

Deno.test("reportJson() carries the results and the derived virtio figures", () => {
  const json = reportJson(RESULT, VIRTIO);
  assert.equal(json.jobs.length, 2);
  assert.equal(json.virtio?.requests, 124_480);
  assert.equal(json.virtio?.kicks, 4_512);
  assert.equal(json.virtio?.queues.length, 2);
  assert.equal(json.virtio?.exitsPerRequest, 4_820 / 124_480);
  assert.deepEqual(JSON.parse(JSON.stringify(json)), json, "plain JSON");
  assert.equal(reportJson(RESULT).virtio, null);
});

Deno.test("summarizeVirtio() handles zero requests without dividing by zero", () => {
  const s = summarizeVirtio({ queues: [] });
  assert.equal(s.averageBatch, 0);
  assert.equal(s.kicksPerRequest, 0);
  assert.equal(s.exitsPerRequest, null);
});

Deno.test("number formatting keeps three significant digits", () => {
  assert.equal(formatCount(999), "999");
  assert.equal(formatCount(12_345), "12.3k");
  assert.equal(formatCount(1_500_000), "1.5M");
  assert.equal(formatBytesIEC(4096), "4KiB");
  assert.equal(formatBytesIEC(50_438_144), "48.1MiB");
  assert.equal(formatBytesSI(50_438_144), "50.4MB");
  // Whole numbers keep their zeros: 8 MiB in 70 ms is 114MiB/s and 120MB/s, not 12MB/s.
  assert.equal(formatBytesSI(8 * 1024 * 1024 / 0.07), "120MB");
  assert.equal(formatBytesIEC(8 * 1024 * 1024 / 0.07), "114MiB");
  assert.equal(formatCount(120_000), "120k");
  assert.equal(formatBytesIEC(100 * 1024), "100KiB");
  assert.equal(formatCount(10), "10");
  assert.equal(formatCount(2.5), "2.5");
  assert.equal(formatBytesIEC(0), "0B");
});
