//! Pseudo-random writes to every register the guest can reach: each
//! virtio function's PCI configuration space (command, BARs,
//! capabilities; the header restored afterwards through 0xCF8), its
//! common, notify, ISR and device configuration windows, its MSI-X table
//! and PBA, and the legacy ports (UART, i8042, CMOS, POST, the ACPI PM
//! block, the GED event register, 0xCF8). Writes that legitimately end or
//! reset the VM are skipped by name: [`SKIPPED`].

use super::chains::Attack;
use super::live::{template, Live, Outcome};
use super::target::{Target, CC_LEN, NEEDS_RESET};
use super::{Ctx, XorShift};
use crate::io::{inb, outb, outl, outw};
use crate::pci::{Bdf, Config, Mmio};

/// Random writes per register window.
const WRITES: u32 = 96;
/// How long a request may take after the fuzzing, on a live device.
const SERVE_MS: u64 = 300;

/// The register attacks of one virtio function, in the order they run.
pub const ATTACKS: &[Attack] = &[
    ("fuzz_common_cfg", fuzz_common),
    ("fuzz_device_cfg", fuzz_device_cfg),
    ("fuzz_notify_isr", fuzz_notify_isr),
    ("fuzz_msix", fuzz_msix),
    ("fuzz_pci_config", fuzz_pci_config),
];

/// Writes the fuzzer never makes, with why.
pub const SKIPPED: &[&str] = &[
    "pm_sleep_control_slp_en(0x600 bit 5: S5 power-off)",
    "pm_reset_register_reset_value(0x602 <- 0x01: reset)",
    "i8042_pulse_reset(0x64 <- 0xf0..0xff with bit 0 clear, incl. 0xfe)",
    "i8042_write_output_port(0x64 <- 0xd1: the next data byte drives the reset line)",
    "pc_reset_control(0xcf9 bit 2: reset on PC chipsets, QEMU q35 among them)",
    "msix_delivery_mode(data bits 8-10 forced to fixed: INIT/NMI/SMI would end the probe as on hardware)",
    "uart_line_settings(restored after the fuzzing so the report goes on)",
];

/// Random writes of 1, 2 or 4 bytes at random offsets of `window`.
fn fuzz_window(
    rng: &mut XorShift,
    base: Mmio,
    len: u32,
    writes: u32,
    fix: impl Fn(u64, u32) -> u32,
) {
    if base.0 == 0 || len == 0 {
        return;
    }
    for _ in 0..writes {
        let width = 1u64 << (rng.next_u64() % 3);
        let offset = (rng.next_u64() % u64::from(len)) & !(width - 1);
        if offset + width > u64::from(len) {
            continue;
        }
        let value = fix(offset, rng.next_u64() as u32);
        match width {
            1 => base.write8(offset, value as u8),
            2 => base.write16(offset, value as u16),
            _ => base.write32(offset, value),
        }
    }
}

/// The ending of a device after its registers were fuzzed: needs-reset,
/// or a good request on a freshly started device.
fn after_fuzz(target: &Target, ctx: &Ctx) -> Outcome {
    if target.status() & NEEDS_RESET != 0 {
        return Outcome::NeedsReset;
    }
    let Some(mut live) = Live::start(target, target.plain_features(), true) else {
        return Outcome::Refused;
    };
    let request = template(target.kind, ctx.guest_cid);
    live.send(&request);
    match live.outcome(SERVE_MS) {
        Outcome::Served | Outcome::Consumed => Outcome::Ignored,
        Outcome::Ignored => Outcome::NoAnswer,
        other => other,
    }
}

/// Common configuration: queue address registers always get a non-zero
/// high half, so a ring the device might accept is never in RAM the probe
/// uses.
fn fuzz_common(target: &Target, ctx: &Ctx) -> Outcome {
    let mut rng = ctx.rng("common");
    fuzz_window(
        &mut rng,
        target.common.mmio(),
        CC_LEN,
        WRITES * 2,
        |offset, value| {
            if (0x20..0x38).contains(&(offset & !3)) {
                value | 0x8000_0000
            } else {
                value
            }
        },
    );
    after_fuzz(target, ctx)
}

fn fuzz_device_cfg(target: &Target, ctx: &Ctx) -> Outcome {
    let mut rng = ctx.rng("device");
    let cfg = target.device_cfg;
    // Live first, so writes reach a running device.
    let _live = Live::start(target, target.plain_features(), true);
    fuzz_window(&mut rng, cfg.mmio(), cfg.len, WRITES, |_, v| v);
    after_fuzz(target, ctx)
}

fn fuzz_notify_isr(target: &Target, ctx: &Ctx) -> Outcome {
    let mut rng = ctx.rng("notify");
    let _live = Live::start(target, target.plain_features(), true);
    fuzz_window(
        &mut rng,
        target.notify.mmio(),
        target.notify.len,
        WRITES,
        |_, v| v,
    );
    fuzz_window(
        &mut rng,
        target.isr.mmio(),
        target.isr.len,
        WRITES / 4,
        |_, v| v,
    );
    for _ in 0..8 {
        target.read_isr();
    }
    after_fuzz(target, ctx)
}

/// MSI-X table (delivery mode forced to fixed), PBA and the capability's
/// control word, then a live request so the device signals through what
/// was written. The control word is restored.
fn fuzz_msix(target: &Target, ctx: &Ctx) -> Outcome {
    let mut rng = ctx.rng("msix");
    let config = ctx.pci;
    let control_reg = target.msix_cap + 2;
    let control = if target.msix_cap != 0 {
        config.read16(target.bdf, control_reg)
    } else {
        0
    };
    if target.msix_cap != 0 {
        config.write16(
            target.bdf,
            control_reg,
            0x8000 | (rng.next_u64() as u16 & 0x4000),
        );
    }
    let table = target.msix_table;
    fuzz_window(
        &mut rng,
        table.mmio(),
        table.len,
        WRITES,
        |offset, value| {
            if offset % 16 == 8 {
                value & !0x700
            } else if offset % 16 == 9 {
                value & !0x7
            } else {
                value
            }
        },
    );
    let pba = target.msix_pba;
    fuzz_window(&mut rng, pba.mmio(), pba.len, WRITES / 4, |_, v| v);
    let outcome = after_fuzz(target, ctx);
    if target.msix_cap != 0 {
        config.write16(target.bdf, control_reg, control);
    }
    target.reset();
    outcome
}

/// Configuration space: random dword and word writes over the whole 4 KiB
/// (ECAM) and the first 256 bytes (0xCF8), then the header (command,
/// BARs) and the MSI-X control word are restored through 0xCF8.
fn fuzz_pci_config(target: &Target, ctx: &Ctx) -> Outcome {
    let mut rng = ctx.rng("pci");
    fuzz_config_space(&mut rng, &ctx.pci, target.bdf, target.msix_cap);
    after_fuzz(target, ctx)
}

/// Random config-space writes to `bdf`, its header restored afterwards.
pub fn fuzz_config_space(rng: &mut XorShift, config: &Config, bdf: Bdf, msix_cap: u16) {
    let mut saved = [0u32; 16];
    for (i, dword) in saved.iter_mut().enumerate() {
        *dword = config.read32(bdf, 4 * i as u16);
    }
    let msix_control = (msix_cap != 0).then(|| config.read16(bdf, msix_cap + 2));
    for _ in 0..WRITES {
        let reg = (rng.next_u64() % 4096) as u16;
        let value = rng.next_u64() as u32;
        if rng.next_u64().is_multiple_of(2) {
            config.write32(bdf, reg & !3, value);
        } else {
            config.write16(bdf, reg & !1, value as u16);
        }
    }
    // Decoding off, BARs back, then the command register.
    config.write16(bdf, 0x04, 0);
    for (i, &dword) in saved.iter().enumerate().skip(4).take(6) {
        config.write32(bdf, 4 * i as u16, dword);
    }
    config.write32(bdf, 0x30, saved[12]);
    config.write32(bdf, 0x3c, saved[15]);
    if let Some(control) = msix_control {
        config.write16(bdf, msix_cap + 2, control);
    }
    config.write16(bdf, 0x04, saved[1] as u16);
}

/// One legacy port range and what must not be written there.
struct PortRange {
    base: u16,
    len: u16,
    name: &'static str,
}

const PORTS: &[PortRange] = &[
    PortRange {
        base: 0x3f8,
        len: 8,
        name: "uart",
    },
    PortRange {
        base: 0x60,
        len: 5,
        name: "i8042",
    },
    PortRange {
        base: 0x70,
        len: 2,
        name: "cmos",
    },
    PortRange {
        base: 0x80,
        len: 1,
        name: "post",
    },
    PortRange {
        base: 0x600,
        len: 3,
        name: "pm",
    },
    PortRange {
        base: 0x610,
        len: 1,
        name: "ged",
    },
    PortRange {
        base: 0xcf8,
        len: 4,
        name: "pci_address",
    },
    PortRange {
        base: 0x2f8,
        len: 8,
        name: "unclaimed",
    },
];

/// Whether writing `value` to `port` would legitimately end or reset the
/// VM (or make the i8042's next data byte do so).
fn ends_vm(port: u16, value: u8) -> bool {
    match port {
        0x600 => value & 0x20 != 0,
        0x602 => value == 0x01,
        0x64 => (value >= 0xf0 && value & 1 == 0) || value == 0xd1,
        0xcf9 => value & 0x04 != 0,
        _ => false,
    }
}

/// Random byte, word and dword writes (and reads) to every legacy port
/// range; returns how many writes were skipped. The UART, the CMOS index
/// and 0xCF8 are put back afterwards, the i8042 output buffer drained.
pub fn fuzz_legacy(rng: &mut XorShift) -> (u32, u32) {
    let mut written = 0;
    let mut skipped = 0;
    for range in PORTS {
        for _ in 0..WRITES {
            let port = range.base + (rng.next_u64() % u64::from(range.len)) as u16;
            let value = rng.next_u64() as u32;
            // Wider writes only where they stay inside the range.
            let mut width = rng.next_u64() % 3;
            if port + (1 << width) > range.base + range.len {
                width = 0;
            }
            let bytes = value.to_le_bytes();
            let span = 1u16 << width;
            let ends = (0..span).any(|i| ends_vm(port.wrapping_add(i), bytes[usize::from(i)]));
            if ends {
                skipped += 1;
                continue;
            }
            match width {
                0 => outb(port, value as u8),
                1 => outw(port, value as u16),
                _ => outl(port, value),
            }
            let _ = inb(port);
            written += 1;
        }
        let _ = range.name;
    }
    restore_legacy();
    (written, skipped)
}

fn restore_legacy() {
    outl(0xcf8, 0);
    outb(0x70, 0);
    for _ in 0..16 {
        if inb(0x64) & 1 == 0 {
            break;
        }
        let _ = inb(0x60);
    }
    crate::serial::init();
}
