/**
 * The `ide-hd` device type: a disk on the machine's PIIX3 IDE controller, as QEMU's `ide-hd` on
 * `piix3-ide`. Every `ide-hd` of a machine shares the one controller, each the master of a
 * channel of its own (primary, then secondary, in configuration order), so that the guest can run
 * both at once: a machine holds two at most. `mode` is how the guest driver moves data: `pio` through the 16-bit data port (one exit
 * per two bytes) or `dma` through the bus-master engine.
 *
 * @module
 */

import { z } from "zod";
import type { EmulatedDeviceType } from "./emulated.ts";
import { IdeController } from "./ide.ts";

/** Options of an `ide-hd` device. */
export const ideHdOptionsSchema = z.strictObject({
  /** How the guest driver transfers data (default `dma`, as Linux's ata_piix uses). */
  mode: z.enum(["pio", "dma"]).default("dma"),
  /** IDENTIFY DEVICE's serial number (20 characters at most). */
  serial: z.string().max(20).optional(),
});

/** The `ide-hd` device type (registered by the machine's registry). */
export const deviceType: EmulatedDeviceType = {
  kind: "emulated",
  name: "ide-hd",
  drives: { min: 1, max: 1 },
  optionsSchema: ideHdOptionsSchema,
  perController: 2,
  maxControllers: 1,
  intxLines: 2,
  create({ members, memory, vcpu, intxSources }) {
    const first = members[0]!.spec;
    const serial = first.options.serial;
    return new IdeController({
      // Masters only: [primary master, primary slave, secondary master, secondary slave].
      drives: [members[0]?.drives[0] ?? null, null, members[1]?.drives[0] ?? null, null],
      memory,
      irq: (channel, level) => vcpu.setIntx(intxSources[channel]!, level),
      ...(typeof serial === "string" ? { serial } : {}),
      // As QEMU: the write cache is on unless the drive is writethrough or directsync.
      writeCache: !members.some((m) =>
        m.spec.drives[0]?.cache === "writethrough" || m.spec.drives[0]?.cache === "directsync"
      ),
    });
  },
};
