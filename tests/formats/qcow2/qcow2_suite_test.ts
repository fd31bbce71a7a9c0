import assert from "node:assert/strict";
import { nodeSuite } from "../../block/node_suite.ts";
import { MemoryFile } from "../../../src/host/memory.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../../formats/qcow2/create.ts";
import { Qcow2Node } from "../../../formats/qcow2/qcow2.ts";
import { checkImage } from "../../../formats/qcow2/check.ts";

const configs: Array<[string, Qcow2CreateOptions]> = [
  ["v3, 64 KiB clusters", {}],
  ["v2, 4 KiB clusters", { compat: "0.10", clusterSize: 4096 }],
  ["v3, 512-byte clusters, refcount_bits=1", { clusterSize: 512, refcountBits: 1 }],
  ["v3, extended L2, 32 KiB clusters", { clusterSize: 32768, extendedL2: true }],
  ["v3, 2 MiB clusters, refcount_bits=64, lazy refcounts", {
    clusterSize: 2 << 20,
    refcountBits: 64,
    lazyRefcounts: true,
  }],
  ["v3, metadata preallocation", { clusterSize: 4096, preallocation: "metadata" }],
];

/** Nodes made by the suite, so each is checked for consistency after its test. */
async function make(size: number, opts: Qcow2CreateOptions): Promise<Qcow2Node> {
  const file = new MemoryFile("suite.qcow2");
  await createQcow2(file, size, opts);
  const node = await Qcow2Node.open(file, {
    cacheCleanInterval: 0,
    l2CacheSize: 4 * (opts.clusterSize ?? 65536),
  });
  // Wrap close so every suite test ends with a consistency check of the image.
  const close = node.close.bind(node);
  node.close = async () => {
    if (!node.readOnly) {
      const report = checkImage(node);
      assert.deepEqual(report.messages, [], `check after the test (${opts.clusterSize ?? 65536})`);
    }
    await close();
  };
  return node;
}

for (const [name, opts] of configs) {
  nodeSuite({ name: `qcow2 (${name})`, make: (size) => make(size, opts) });
}
