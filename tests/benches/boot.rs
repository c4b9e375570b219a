//! Boot benchmark: zvmm against QEMU microvm on the minimal probe guest.
//!
//! Run with `cargo bench -p zvmm-tests --bench boot` (runs per case:
//! `ZVMM_BENCH_RUNS`, default 10). It prints Markdown tables, never judges:
//! the targets (wall ≤ 0.2× QEMU, peak RSS ≤ 8 MiB) are reported as met or
//! not, only a run that does not boot the probe fails it. `cargo test`
//! (even with `--all-targets`) does not pass `--bench`, so there it only
//! prints how to run it.
//!
//! Every case boots `probe-pvh` (PVH entry, 256 MiB RAM, a 256-byte initrd
//! written here, `console=ttyS0 probe.pci=off`) until the guest powers off through ACPI
//! and the process exits. Measured per run: wall time from just before
//! spawn to process exit, and the child's peak RSS (`wait4` `ru_maxrss`).
//! Cases are interleaved run by run after one unmeasured warm-up each, so
//! drift on this shared host hits every VMM alike.
//!
//! QEMU runs with `-cpu host,-arch-capabilities -nodefaults
//! -no-user-config -display none -serial stdio -no-reboot` on two machines:
//! - `qemu-min`: `microvm` trimmed to what the probe needs — ACPI stays on
//!   (the default; it powers off through the GED sleep control register),
//!   COM1 stays (`isa-serial=on`), and off go option ROMs, PIT, PIC, RTC,
//!   PCIe, the second IOAPIC and the virtio-mmio command-line entries. This
//!   is QEMU's best case and the reference for the ratios;
//! - `qemu-microvm`: plain `microvm` (defaults), for context.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use zvmm_tests::bench::{
    bench_main, check_probe_run, markdown_table, measure, qemu_version, runs_from_env, BenchError,
    Measured, Summary,
};
use zvmm_tests::probe::{probe_elf, Flavour};
use zvmm_tests::qemu::QEMU;
use zvmm_tests::zvmm::{scratch_dir, zvmm_bin};

/// Hard limit for one run.
const LIMIT: Duration = Duration::from_secs(30);
/// Guest RAM, as both VMMs spell it.
const MEMORY: &str = "256M";
/// Guest command line. `probe.pci=off`: QEMU microvm has no PCI bus, so the probe skips its bus
/// scan on both VMMs and both run the same guest work.
const CMDLINE: &str = "console=ttyS0 probe.pci=off";
/// Size of the initrd the bench writes. Kept tiny: on the KVM-PVM host the
/// probe's hashing loop runs in KVM's instruction emulator at ~10 µs per
/// byte (4 KiB would add ~45 ms to every VMM alike).
const INITRD_BYTES: usize = 256;
/// Unmeasured runs per case before the measured ones.
const WARMUP_RUNS: usize = 1;
/// vCPU counts measured.
const CPU_COUNTS: [u64; 2] = [1, 2];
/// The reference machine (see the module doc).
const QEMU_MIN_MACHINE: &str = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,\
isa-serial=on,pcie=off,ioapic2=off,auto-kernel-cmdline=off,accel=kvm";
/// Plain microvm.
const QEMU_MICROVM_MACHINE: &str = "microvm,accel=kvm";
/// Wall-time target: zvmm at most this fraction of QEMU's.
const WALL_TARGET_RATIO: f64 = 0.2;
/// Peak-RSS target for zvmm, MiB.
const RSS_TARGET_MIB: f64 = 8.0;

/// The VMMs compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Zvmm,
    QemuMin,
    QemuMicrovm,
}

impl Vmm {
    const ALL: [Vmm; 3] = [Vmm::Zvmm, Vmm::QemuMin, Vmm::QemuMicrovm];

    fn label(self) -> &'static str {
        match self {
            Vmm::Zvmm => "zvmm",
            Vmm::QemuMin => "qemu-min",
            Vmm::QemuMicrovm => "qemu-microvm",
        }
    }

    fn command(self, kernel: &Path, initrd: &Path, cpus: u64) -> Command {
        match self {
            Vmm::Zvmm => zvmm_command(kernel, initrd, cpus),
            Vmm::QemuMin => qemu_command(QEMU_MIN_MACHINE, kernel, initrd, cpus),
            Vmm::QemuMicrovm => qemu_command(QEMU_MICROVM_MACHINE, kernel, initrd, cpus),
        }
    }
}

fn zvmm_command(kernel: &Path, initrd: &Path, cpus: u64) -> Command {
    let mut command = Command::new(zvmm_bin());
    command
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", CMDLINE, "--memory", MEMORY])
        .args(["--cpus", &cpus.to_string()]);
    command
}

fn qemu_command(machine: &str, kernel: &Path, initrd: &Path, cpus: u64) -> Command {
    let mut command = Command::new(QEMU);
    command
        .args(["-M", machine, "-cpu", "host,-arch-capabilities"])
        .args(["-smp", &cpus.to_string(), "-m", MEMORY])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-append", CMDLINE])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd);
    command
}

/// The samples of one VMM at one vCPU count.
struct Case {
    vmm: Vmm,
    cpus: u64,
    wall_ms: Vec<f64>,
    rss_mib: Vec<f64>,
}

impl Case {
    fn name(&self) -> String {
        format!("{} with {} vCPU(s)", self.vmm.label(), self.cpus)
    }

    fn record(&mut self, measured: &Measured) {
        self.wall_ms.push(measured.wall.as_secs_f64() * 1e3);
        self.rss_mib.push(measured.max_rss_kib as f64 / 1024.0);
    }

    fn wall(&self) -> Summary {
        Summary::of(&self.wall_ms).unwrap_or(EMPTY)
    }

    fn rss(&self) -> Summary {
        Summary::of(&self.rss_mib).unwrap_or(EMPTY)
    }
}

/// Placeholder for a case without samples (runs ≥ 1, so never printed).
const EMPTY: Summary = Summary {
    count: 0,
    median: f64::NAN,
    min: f64::NAN,
    max: f64::NAN,
};

fn main() {
    bench_main("boot", run);
}

fn run() -> Result<(), BenchError> {
    let runs = runs_from_env()?;
    let qemu_version = qemu_version()?;
    let kernel = probe_elf(Flavour::Pvh);
    let zvmm = zvmm_bin();
    let initrd = write_initrd()?;
    let mut cases: Vec<Case> = CPU_COUNTS
        .iter()
        .flat_map(|&cpus| {
            Vmm::ALL.map(|vmm| Case {
                vmm,
                cpus,
                wall_ms: Vec::new(),
                rss_mib: Vec::new(),
            })
        })
        .collect();
    for run in 0..WARMUP_RUNS + runs {
        for case in &mut cases {
            let command = case.vmm.command(&kernel, &initrd, case.cpus);
            let measured = measure(command, LIMIT)?;
            check_probe_run(&measured, case.cpus, &case.name(), run)?;
            if run >= WARMUP_RUNS {
                case.record(&measured);
            }
        }
    }
    print_header(runs, zvmm, &qemu_version);
    print_results(&cases);
    Ok(())
}

/// Writes the deterministic initrd into a scratch directory.
fn write_initrd() -> Result<PathBuf, BenchError> {
    let path = scratch_dir("bench-boot").join("initrd");
    let bytes: Vec<u8> = (0..INITRD_BYTES).map(|i| (i * 131 % 251) as u8).collect();
    std::fs::write(&path, bytes).map_err(|source| BenchError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

fn print_header(runs: usize, zvmm: &Path, qemu_version: &str) {
    let zvmm_kib = std::fs::metadata(zvmm).map(|m| m.len() / 1024).unwrap_or(0);
    println!("## Boot benchmark: probe-pvh to ACPI power-off\n");
    println!(
        "Guest: probe-pvh (PVH), {MEMORY} RAM, {INITRD_BYTES}-byte initrd, cmdline `{CMDLINE}`. \
         {runs} measured runs per case after {WARMUP_RUNS} warm-up, interleaved. \
         Wall = spawn to process exit; peak RSS = `wait4` ru_maxrss."
    );
    println!(
        "zvmm: `{}` ({zvmm_kib} KiB). {qemu_version}.",
        zvmm.display()
    );
    println!("qemu-min: `-M {QEMU_MIN_MACHINE}`; qemu-microvm: `-M {QEMU_MICROVM_MACHINE}`.\n");
}

fn print_results(cases: &[Case]) {
    let header = [
        "guest",
        "vmm",
        "runs",
        "wall median ms",
        "wall min-max ms",
        "peak RSS median MiB",
        "peak RSS min-max MiB",
    ];
    let rows: Vec<Vec<String>> = cases.iter().map(result_row).collect();
    println!("{}", markdown_table(&header, &rows));
    let header = [
        "vCPUs",
        "wall zvmm/qemu-min",
        "RSS zvmm/qemu-min",
        "wall zvmm/qemu-microvm",
        "RSS zvmm/qemu-microvm",
    ];
    let rows: Vec<Vec<String>> = CPU_COUNTS.iter().map(|&n| ratio_row(cases, n)).collect();
    println!("{}", markdown_table(&header, &rows));
    println!("{}", targets_line(cases));
}

fn result_row(case: &Case) -> Vec<String> {
    let (wall, rss) = (case.wall(), case.rss());
    vec![
        format!("probe-pvh {} vCPU {MEMORY}", case.cpus),
        case.vmm.label().to_string(),
        wall.count.to_string(),
        format!("{:.1}", wall.median),
        format!("{:.1}-{:.1}", wall.min, wall.max),
        format!("{:.2}", rss.median),
        format!("{:.2}-{:.2}", rss.min, rss.max),
    ]
}

fn find(cases: &[Case], vmm: Vmm, cpus: u64) -> Option<&Case> {
    cases.iter().find(|c| c.vmm == vmm && c.cpus == cpus)
}

/// zvmm's median over `other`'s median: (wall ratio, RSS ratio).
fn ratios(cases: &[Case], other: Vmm, cpus: u64) -> (f64, f64) {
    match (find(cases, Vmm::Zvmm, cpus), find(cases, other, cpus)) {
        (Some(z), Some(o)) => (
            z.wall().median / o.wall().median,
            z.rss().median / o.rss().median,
        ),
        _ => (f64::NAN, f64::NAN),
    }
}

fn ratio_row(cases: &[Case], cpus: u64) -> Vec<String> {
    let (min_wall, min_rss) = ratios(cases, Vmm::QemuMin, cpus);
    let (mvm_wall, mvm_rss) = ratios(cases, Vmm::QemuMicrovm, cpus);
    [cpus as f64, min_wall, min_rss, mvm_wall, mvm_rss]
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if i == 0 {
                format!("{v}")
            } else {
                format!("{v:.2}x")
            }
        })
        .collect()
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// The informational targets line (never a failure).
fn targets_line(cases: &[Case]) -> String {
    let mut parts = Vec::new();
    for cpus in CPU_COUNTS {
        let (wall, _) = ratios(cases, Vmm::QemuMin, cpus);
        parts.push(format!(
            "wall <= {WALL_TARGET_RATIO}x qemu-min @{cpus} vCPU: {wall:.2}x {}",
            verdict(wall <= WALL_TARGET_RATIO)
        ));
        if let Some(zvmm) = find(cases, Vmm::Zvmm, cpus) {
            let rss = zvmm.rss().median;
            parts.push(format!(
                "peak RSS <= {RSS_TARGET_MIB} MiB @{cpus} vCPU: {rss:.2} MiB {}",
                verdict(rss <= RSS_TARGET_MIB)
            ));
        }
    }
    format!("Targets (informational): {}.", parts.join("; "))
}
