/**
 * A guest bus that counts every access the guest makes on it — each would be a VM exit — by kind,
 * and port accesses by port: what the IDE and AHCI driver tests measure their exits with.
 */
import type { AccessSize, GuestBus } from "../../src/virtio/bus.ts";

/** Forwards to `inner`, counting. */
export class CountingBus implements GuestBus {
  readonly inner: GuestBus;
  config = 0;
  mmioReads = 0;
  mmioWrites = 0;
  pio = 0;
  /** Port accesses by port. */
  readonly ports = new Map<number, number>();

  constructor(inner: GuestBus) {
    this.inner = inner;
  }

  /** MMIO accesses, reads and writes. */
  get mmio(): number {
    return this.mmioReads + this.mmioWrites;
  }

  /** Every access so far. */
  get exits(): number {
    return this.config + this.mmio + this.pio;
  }

  /** Starts counting from zero. */
  reset(): void {
    this.config =
      this.mmioReads =
      this.mmioWrites =
      this.pio =
        0;
    this.ports.clear();
  }

  configRead(slot: number, offset: number, size: AccessSize): number {
    this.config++;
    return this.inner.configRead(slot, offset, size);
  }

  configWrite(slot: number, offset: number, size: AccessSize, value: number): void {
    this.config++;
    this.inner.configWrite(slot, offset, size, value);
  }

  mmioRead(gpa: number, size: AccessSize): number {
    this.mmioReads++;
    return this.inner.mmioRead(gpa, size);
  }

  mmioWrite(gpa: number, size: AccessSize, value: number): void {
    this.mmioWrites++;
    this.inner.mmioWrite(gpa, size, value);
  }

  ioRead(port: number, size: AccessSize): number {
    this.#port(port);
    return this.inner.ioRead(port, size);
  }

  ioWrite(port: number, size: AccessSize, value: number): void {
    this.#port(port);
    this.inner.ioWrite(port, size, value);
  }

  #port(port: number): void {
    this.pio++;
    this.ports.set(port, (this.ports.get(port) ?? 0) + 1);
  }
}
