//! Hostile mode (`probe.mode=hostile`): the probe as a guest that drives
//! every virtio device it finds on PCI out of spec — ring and descriptor
//! attacks ([`chains`]), bogus set-up and feature renegotiation
//! ([`setup`]), random writes to every register ([`registers`]) — with a
//! device reset between attacks, then checks that the attacked device
//! works again after a reset and that every other device still works.
//!
//! Report lines (parsed by `tests/tests/zvmm_hostile.rs`):
//! - `hostile start seed=S devices=N`, one `hostile skipped write=W` per
//!   write the fuzzer never makes (those that end or reset the VM)
//! - `hostile device=D slot=S check=baseline result=ok|R`
//! - `hostile device=D slot=S attack=A result=R status=0xSS` with R one of
//!   `needs_reset error consumed served refused ignored no_answer dead`
//! - `hostile device=D slot=S check=recovered after=D:S result=ok|R`,
//!   `hostile device=D slot=S check=other after=D2:S2 result=ok|R` and, after
//!   the legacy ports, `hostile device=D slot=S check=final result=ok|R`
//! - `hostile device=legacy attack=fuzz_ports result=ignored written=N skipped=M`
//! - `hostile summary devices=N attacks=M <outcome>=count... check_failures=F`
//!
//! `probe.hostile.seed=N` changes the fuzzer's seed;
//! `probe.hostile.only=D` attacks only devices of kind D (all are checked),
//! `probe.hostile.attack=A` runs only attack A.
//! virtio-fs rings are read by virtiofsd, not the VMM, and a malformed
//! chain makes virtiofsd exit (zvmm then stops the VM, status 7): the ring
//! attacks skip fs devices (`hostile device=fs slot=S skipped=ring_attacks`,
//! and `skipped=rings_overlap`, after which virtiofsd stops answering the
//! queue for good) unless `probe.hostile.fs_rings=on`.

mod chains;
mod live;
mod registers;
mod ring;
mod setup;
mod target;

use crate::acpi::Acpi;
use crate::boot::BootInfo;
use crate::pci::{Config, Pci};
use crate::phys::u64_at;
use crate::{fnv1a64, report};

use chains::Attack;
use live::{template, Live, Outcome};
use target::{Kind, Target};

/// Set-up attacks that let a virtio-fs backend run on rings holding
/// garbage (skipped with the ring attacks): after `rings_overlap`
/// virtiofsd stops answering that queue for good, resets included.
const FS_RING_SETUPS: &[&str] = &["rings_overlap"];
/// Most devices the probe attacks.
const MAX_TARGETS: usize = 16;
/// How long a good request may take in a check.
const CHECK_MS: u64 = 3000;
/// The fuzzer's seed unless `probe.hostile.seed=` says otherwise.
const DEFAULT_SEED: u64 = 0x005e_ed0f_2026_1201;

/// Whether the command line asks for hostile mode.
pub fn requested(cmdline: &[u8]) -> bool {
    words(cmdline).any(|w| w == b"probe.mode=hostile")
}

fn words(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline.split(|&b| b == b' ')
}

fn option<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    words(cmdline).find_map(|w| w.strip_prefix(key))
}

/// xorshift64*: the fuzzer's deterministic pseudo-random numbers.
pub struct XorShift(u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// What every attack may need to know about the machine.
pub struct Ctx {
    /// Configuration access.
    pub pci: Config,
    /// The ECAM window (0xe0000000 if the MCFG names none).
    pub ecam: u64,
    /// End of the highest RAM range below 4 GiB.
    pub ram_end: u64,
    /// A page of the reserved ROM/ACPI area below 1 MiB.
    pub rom: u64,
    /// The vsock device's guest CID (3 if none).
    pub guest_cid: u64,
    seed: u64,
}

impl Ctx {
    /// A generator for the fuzzing of `what` (fixed per seed and name).
    pub fn rng(&self, what: &str) -> XorShift {
        XorShift((self.seed ^ fnv1a64(what.as_bytes())) | 1)
    }
}

/// Attacks every virtio device on `pci`, then the legacy ports, and
/// reports it all.
pub fn run(boot: &BootInfo, acpi: &Acpi, pci: &Pci) {
    let cmdline = boot.cmdline.unwrap_or(&[]);
    let mut targets = [None; MAX_TARGETS];
    let mut count = 0;
    for function in pci.functions() {
        if let Some(target) = Target::find(&pci.config, function) {
            if count < MAX_TARGETS {
                targets[count] = Some(target);
                count += 1;
            }
        }
    }
    let targets: &[Option<Target>] = &targets[..count];
    let ctx = context(boot, acpi, pci, targets, cmdline);
    report!("hostile start seed={:#x} devices={count}", ctx.seed);
    for skipped in registers::SKIPPED {
        report!("hostile skipped write={skipped}");
    }
    let mut tally = Tally::default();
    let mut baselines = [0u64; MAX_TARGETS];
    for (i, target) in targets.iter().flatten().enumerate() {
        let result = match check(target, &ctx) {
            Ok(hash) => {
                baselines[i] = hash;
                "ok"
            }
            Err(why) => {
                tally.check_failures += 1;
                why
            }
        };
        report_check(target, "baseline", None, result);
    }
    let only = option(cmdline, b"probe.hostile.only=");
    let attack_only = option(cmdline, b"probe.hostile.attack=");
    let fs_rings = words(cmdline).any(|w| w == b"probe.hostile.fs_rings=on");
    for (i, target) in targets.iter().flatten().enumerate() {
        if only.is_some_and(|kind| kind != target.kind.name().as_bytes()) {
            continue;
        }
        let rings: &[Attack] = if target.kind == Kind::Fs && !fs_rings {
            report!(
                "hostile device=fs slot={} skipped=ring_attacks reason=virtiofsd_reads_the_rings",
                target.bdf.slot
            );
            &[]
        } else {
            chains::ATTACKS
        };
        for attack in rings.iter().chain(setup::ATTACKS).chain(registers::ATTACKS) {
            if target.kind == Kind::Fs && !fs_rings && FS_RING_SETUPS.contains(&attack.0) {
                report!(
                    "hostile device=fs slot={} skipped={} reason=virtiofsd_reads_the_rings",
                    target.bdf.slot,
                    attack.0
                );
                continue;
            }
            if attack_only.is_none_or(|name| name == attack.0.as_bytes()) {
                run_attack(target, attack, &ctx, &mut tally);
            }
        }
        check_all(targets, &baselines, Some(i), &ctx, &mut tally);
    }
    let mut rng = ctx.rng("legacy");
    let (written, skipped) = registers::fuzz_legacy(&mut rng);
    report!("hostile device=legacy attack=fuzz_ports result=ignored written={written} skipped={skipped}");
    for function in pci.functions() {
        if Kind::of(function.device).is_none() || function.vendor != 0x1af4 {
            registers::fuzz_config_space(&mut rng, &pci.config, function.bdf, 0);
            report!(
                "hostile device=pci slot={} attack=fuzz_pci_config result=ignored",
                function.bdf.slot
            );
        }
    }
    check_all(targets, &baselines, None, &ctx, &mut tally);
    tally.report(count);
}

fn context(
    boot: &BootInfo,
    acpi: &Acpi,
    pci: &Pci,
    targets: &[Option<Target>],
    cmdline: &[u8],
) -> Ctx {
    let ecam = acpi
        .mcfg
        .and_then(|mcfg| mcfg.body().get(8..24).map(|entry| u64_at(entry, 0)))
        .unwrap_or(0xe000_0000);
    let ram_end = boot
        .memmap()
        .iter()
        .filter(|r| r.kind == 1 && r.start < 1 << 32)
        .map(|r| r.start.saturating_add(r.size).min(1 << 32))
        .max()
        .unwrap_or(1 << 20);
    let guest_cid = targets
        .iter()
        .flatten()
        .find(|t| t.kind == Kind::Vsock && t.device_cfg.addr != 0)
        .map_or(3, |t| {
            let cfg = t.device_cfg.mmio();
            u64::from(cfg.read32(0)) | u64::from(cfg.read32(4)) << 32
        });
    let seed = option(cmdline, b"probe.hostile.seed=")
        .and_then(|v| core::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    Ctx {
        pci: pci.config,
        ecam,
        ram_end,
        rom: 0xf_f000,
        guest_cid,
        seed,
    }
}

/// Runs one attack, resets the device and reports the ending.
fn run_attack(target: &Target, attack: &Attack, ctx: &Ctx, tally: &mut Tally) {
    let (name, attack) = *attack;
    let outcome = attack(target, ctx);
    let status = target.status();
    let outcome = if target.reset() {
        outcome
    } else {
        Outcome::Dead
    };
    tally.add(outcome);
    report!(
        "hostile device={} slot={} attack={name} result={} status={status:#04x}",
        target.kind.name(),
        target.bdf.slot,
        outcome.name()
    );
}

/// Checks every device: the one just attacked (`attacked`) as
/// `recovered`, the others as `other`.
fn check_all(
    targets: &[Option<Target>],
    baselines: &[u64],
    attacked: Option<usize>,
    ctx: &Ctx,
    tally: &mut Tally,
) {
    let after = attacked.and_then(|i| targets[i]);
    for (j, target) in targets.iter().flatten().enumerate() {
        let what = match attacked {
            Some(i) if i == j => "recovered",
            Some(_) => "other",
            None => "final",
        };
        let result = match check(target, ctx) {
            Ok(hash) if hash == baselines[j] => "ok",
            Ok(_) => "data_changed",
            Err(why) => why,
        };
        if result != "ok" {
            tally.check_failures += 1;
        }
        report_check(target, what, after.as_ref(), result);
    }
}

fn report_check(target: &Target, what: &str, after: Option<&Target>, result: &str) {
    let (kind, slot) = (target.kind.name(), target.bdf.slot);
    match after {
        Some(a) => report!(
            "hostile device={kind} slot={slot} check={what} after={}:{} result={result}",
            a.kind.name(),
            a.bdf.slot
        ),
        None => report!("hostile device={kind} slot={slot} check={what} result={result}"),
    }
}

/// One good request on a freshly reset device: `Ok` with the hash of
/// what a blk device read (0 for the others), or why it failed. The
/// device is reset afterwards.
fn check(target: &Target, ctx: &Ctx) -> Result<u64, &'static str> {
    let Some(mut live) = Live::start(target, target.plain_features(), true) else {
        target.reset();
        return Err("setup_refused");
    };
    let request = template(target.kind, ctx.guest_cid);
    live.send(&request);
    let outcome = live.outcome(CHECK_MS);
    let hash = match target.kind {
        Kind::Blk => {
            let data = crate::phys::slice(request.bufs[1].addr, 512).unwrap_or(&[]);
            fnv1a64(data)
        }
        _ => 0,
    };
    target.reset();
    match outcome {
        Outcome::Served | Outcome::Consumed => Ok(hash),
        // A FUSE error reply still is the server answering.
        Outcome::Error if target.kind == Kind::Fs => Ok(hash),
        Outcome::Ignored => Err("no_answer"),
        Outcome::NeedsReset => Err("needs_reset"),
        _ => Err("error"),
    }
}

/// Counts of endings and failed checks.
#[derive(Default)]
struct Tally {
    counts: [u32; Outcome::ALL.len()],
    check_failures: u32,
}

impl Tally {
    fn add(&mut self, outcome: Outcome) {
        if let Some(i) = Outcome::ALL.iter().position(|&o| o == outcome) {
            self.counts[i] += 1;
        }
    }

    fn report(&self, devices: usize) {
        let attacks: u32 = self.counts.iter().sum();
        let c = |o: Outcome| self.counts[Outcome::ALL.iter().position(|&x| x == o).unwrap_or(0)];
        report!(
            "hostile summary devices={devices} attacks={attacks} needs_reset={} error={} consumed={} served={} refused={} ignored={} no_answer={} dead={} check_failures={}",
            c(Outcome::NeedsReset),
            c(Outcome::Error),
            c(Outcome::Consumed),
            c(Outcome::Served),
            c(Outcome::Refused),
            c(Outcome::Ignored),
            c(Outcome::NoAnswer),
            c(Outcome::Dead),
            self.check_failures
        );
    }
}
