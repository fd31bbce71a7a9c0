/**
 * The echo device's back-end (imported by its iothread): readable bytes are copied, in order, into
 * the writable buffers; used.len is the bytes copied.
 *
 * @module
 */

import type { BlockNode } from "../../src/block/node.ts";
import type { DeviceBackend } from "../../src/devices/backend.ts";
import type { CreateBackend } from "../../src/devices/device_type.ts";
import type { GuestMemory } from "../../src/virtio/memory.ts";
import type { DescriptorChain, DeviceQueue } from "../../src/virtio/queue.ts";

const SECTOR = 512;

class EchoBackend implements DeviceBackend {
  readonly #drive: BlockNode | undefined;
  readonly #crashOnActivate: boolean;
  readonly #failDrain: boolean;
  #queues: ReadonlyArray<DeviceQueue | undefined> = [];
  #logged = 0;

  constructor(drive: BlockNode | undefined, crashOnActivate: boolean, failDrain: boolean) {
    this.#drive = drive;
    this.#crashOnActivate = crashOnActivate;
    this.#failDrain = failDrain;
  }

  activate(_mem: GuestMemory, _features: bigint, queues: ReadonlyArray<DeviceQueue | undefined>) {
    this.#queues = queues;
    if (this.#crashOnActivate) {
      // Outside any promise chain: an uncaught error that kills the Worker.
      setTimeout(() => {
        throw new Error("echo back-end crashed on purpose");
      }, 0);
    }
  }

  async processQueue(index: number, interrupt: () => void): Promise<void> {
    if (this.#failDrain) throw new Error("echo back-end failed a drain on purpose");
    const queue = this.#queues[index];
    if (queue === undefined) return;
    do {
      queue.disableNotifications();
      for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
        const written = echo(chain);
        if (this.#drive !== undefined) await this.#log(chain);
        queue.push(chain, written);
      }
    } while (queue.enableNotifications());
    if (queue.publish()) interrupt();
  }

  async #log(chain: DescriptorChain): Promise<void> {
    const drive = this.#drive!;
    const first = chain.readable[0];
    if (first === undefined || drive.size < SECTOR) return;
    const sectors = Math.floor(drive.size / SECTOR);
    const at = (this.#logged++ % sectors) * SECTOR;
    const sector = new Uint8Array(SECTOR);
    sector.set(first.subarray(0, SECTOR));
    await drive.write(at, sector);
  }

  reset(): void {
    this.#queues = [];
  }

  async close(): Promise<void> {
    this.#queues = [];
    await this.#drive?.flush();
  }
}

/** Copies the readable buffers into the writable ones; returns the bytes copied. */
function echo(chain: DescriptorChain): number {
  let w = 0;
  let wAt = 0;
  let copied = 0;
  for (const src of chain.readable) {
    let at = 0;
    while (at < src.length) {
      const dst = chain.writable[w];
      if (dst === undefined) return copied;
      const n = Math.min(src.length - at, dst.length - wAt);
      dst.set(src.subarray(at, at + n), wAt);
      at += n;
      wAt += n;
      copied += n;
      if (wAt === dst.length) {
        w++;
        wAt = 0;
      }
    }
  }
  return copied;
}

/** The factory the iothread calls. */
export const createBackend: CreateBackend = ({ spec, drives }) => {
  const options = spec.options as { crashOnActivate?: boolean; failDrain?: boolean };
  return {
    backend: new EchoBackend(
      drives[0],
      options.crashOnActivate ?? false,
      options.failDrain ?? false,
    ),
    info: { echo: true },
  };
};
