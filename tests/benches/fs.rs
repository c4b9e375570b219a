//! virtio-fs benchmark: zvmm against QEMU q35 on the probe guest, each on
//! a virtiofsd this harness starts with the same options.
//!
//! Run with `cargo bench -p zvmm-tests --bench fs` (measured VM runs per
//! VMM: `ZVMM_BENCH_RUNS`, default 3, interleaved). It prints a Markdown
//! table and never judges; a VMM that fails to boot or to finish a phase
//! is reported as an error row (the other VMM's figures still print).
//! `cargo test` does not pass `--bench`, so there it only prints how to
//! run it.
//!
//! Each run boots `probe-pvh` (1 vCPU, 256 MiB in a shared memfd) with
//! `probe.fs.bench=MIB` on a fresh virtiofsd (`--xattr --cache auto
//! --sandbox namespace`) serving an empty scratch directory: zvmm as
//! `--fs tag=T,socket=S`, QEMU as `vhost-user-fs-pci` (queue-size=1024).
//! The probe does [`GETATTRS`] GETATTR round trips one after the other,
//! then writes [`BENCH_MIB`] MiB sequentially ([`CHUNK_KIB`] KiB requests,
//! [`DEPTH`] in flight) and reads them back the same way; rates are the
//! probe's, over its TSC time of each phase.
//!
//! CPU: the probe announces each phase on the console before it starts
//! (`fs bench phase=NAME start`) and reports it when done; this harness
//! reads, at both lines, the VMM process's CPU clock (all threads) and its
//! vCPU thread's run time (`/proc/PID/task/TID/schedstat` of zvmm's
//! `vcpu0`, QEMU's `CPU 0/KVM` with `-name debug-threads=on`), and the CPU
//! clocks of virtiofsd and its sandboxed child. The probe polls its rings,
//! so the vCPU thread is always busy; the VMM's CPU outside the vCPU thread
//! is what the VMM spends on the file system besides the guest — for zvmm,
//! a vhost-user frontend off the data path, it should be close to zero.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use zvmm_tests::api::cpu_time;
use zvmm_tests::bench::{
    bench_main, host_tsc_hz, markdown_table, qemu_version, runs_from_env, tail, vcpu_time,
    BenchError, Summary, RUNS_VAR,
};
use zvmm_tests::fs::{FsError, Virtiofsd};
use zvmm_tests::probe::{error_chain, probe_elf, Fields, Flavour, ProbeReport};
use zvmm_tests::qemu::QEMU;
use zvmm_tests::zvmm::{scratch_dir, zvmm_bin, Running};

/// MiB written and read per run.
const BENCH_MIB: u64 = 64;
/// GETATTR round trips per run.
const GETATTRS: u64 = 2000;
/// Request size of the sequential passes.
const CHUNK_KIB: u64 = 128;
/// Requests in flight in the sequential passes.
const DEPTH: u64 = 4;
/// Measured VM runs per VMM when `ZVMM_BENCH_RUNS` is unset.
const DEFAULT_RUNS: usize = 3;
/// Hard limit for one VM run.
const LIMIT: Duration = Duration::from_secs(180);
/// How long the probe may take to reach a phase, or to finish one.
const PHASE_LIMIT: Duration = Duration::from_secs(90);
/// The virtio-fs tag.
const TAG: &str = "benchfs";

/// Failures of one VMM's benchmark run.
#[derive(Debug, thiserror::Error)]
enum FsBenchError {
    /// virtiofsd could not be started.
    #[error("{vmm}: virtiofsd")]
    Daemon {
        vmm: &'static str,
        #[source]
        source: FsError,
    },
    /// The VMM ended or misbehaved.
    #[error("{vmm}: {why}\n--- stdout (tail) ---\n{stdout}\n--- stderr (tail) ---\n{stderr}")]
    Failed {
        vmm: &'static str,
        why: String,
        stdout: String,
        stderr: String,
    },
    /// A benchmark harness step failed.
    #[error(transparent)]
    Bench(#[from] BenchError),
}

/// The VMMs compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Zvmm,
    QemuQ35,
}

impl Vmm {
    const ALL: [Vmm; 2] = [Vmm::Zvmm, Vmm::QemuQ35];

    fn label(self) -> &'static str {
        match self {
            Vmm::Zvmm => "zvmm",
            Vmm::QemuQ35 => "qemu-q35",
        }
    }

    fn command(self, kernel: &Path, socket: &Path) -> Result<Command, FsBenchError> {
        let cmdline = format!(
            "console=ttyS0 probe.fs.bench={BENCH_MIB} probe.fs.getattrs={GETATTRS} \
             probe.fs.chunk={CHUNK_KIB} probe.fs.depth={DEPTH}"
        );
        let mut command;
        match self {
            Vmm::Zvmm => {
                command = Command::new(built_zvmm()?);
                command
                    .arg("--kernel")
                    .arg(kernel)
                    .args(["--cpus", "1", "--memory", "256M"])
                    .args(["--timeout", &LIMIT.as_secs().to_string()])
                    .arg("--fs")
                    .arg(format!("tag={TAG},socket={}", socket.display()))
                    .args(["--cmdline", &cmdline]);
            }
            Vmm::QemuQ35 => {
                command = Command::new(QEMU);
                command
                    .args(["-M", "q35,accel=kvm,memory-backend=mem"])
                    .args(["-cpu", "host,-arch-capabilities", "-smp", "1", "-m", "256M"])
                    .arg("-object")
                    .arg("memory-backend-memfd,id=mem,size=256M,share=on")
                    .args(["-name", "bench,debug-threads=on"])
                    .args(["-nodefaults", "-no-user-config", "-display", "none"])
                    .args(["-serial", "stdio", "-no-reboot", "-append", &cmdline])
                    .arg("-chardev")
                    .arg(format!("socket,id=char0,path={}", socket.display()))
                    .arg("-device")
                    .arg(format!(
                        "vhost-user-fs-pci,chardev=char0,tag={TAG},queue-size=1024"
                    ))
                    .arg("-kernel")
                    .arg(kernel);
            }
        }
        Ok(command)
    }
}

/// zvmm's binary, or the reason it could not be built (the build's own
/// panic message is on stderr already).
fn built_zvmm() -> Result<PathBuf, FsBenchError> {
    std::panic::catch_unwind(|| zvmm_bin().to_path_buf()).map_err(|_| FsBenchError::Failed {
        vmm: "zvmm",
        why: "zvmm does not build".into(),
        stdout: String::new(),
        stderr: String::new(),
    })
}

/// The probe's benchmark phases, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Getattr,
    Write,
    Read,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Getattr, Phase::Write, Phase::Read];

    fn name(self) -> &'static str {
        match self {
            Phase::Getattr => "getattr",
            Phase::Write => "write",
            Phase::Read => "read",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Phase::Getattr => "round trips/s",
            Phase::Write | Phase::Read => "MiB/s",
        }
    }
}

/// CPU time of the VMM (all of it and its vCPU thread's) and of virtiofsd.
#[derive(Clone, Copy, Debug, Default)]
struct CpuUse {
    vmm: Duration,
    vcpu: Duration,
    daemon: Duration,
}

impl CpuUse {
    fn now(vmm: u32, daemon: u32) -> CpuUse {
        CpuUse {
            vmm: cpu_time(vmm).unwrap_or_default(),
            vcpu: vcpu_time(vmm),
            daemon: tree_cpu_time(daemon),
        }
    }

    fn since(self, before: CpuUse) -> CpuUse {
        CpuUse {
            vmm: self.vmm.saturating_sub(before.vmm),
            vcpu: self.vcpu.saturating_sub(before.vcpu),
            daemon: self.daemon.saturating_sub(before.daemon),
        }
    }
}

/// CPU clocks of `pid` and its descendants (virtiofsd's sandbox forks the
/// server into a PID namespace of its own).
fn tree_cpu_time(pid: u32) -> Duration {
    let children: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    cpu_time(pid).unwrap_or_default() + children.into_iter().map(tree_cpu_time).sum()
}

/// One phase as measured.
#[derive(Clone, Copy, Debug)]
struct Sample {
    phase: Phase,
    rate: f64,
    seconds: f64,
    requests: u64,
    cpu: CpuUse,
}

impl Sample {
    fn outside_vcpu_ms(&self) -> f64 {
        self.cpu.vmm.saturating_sub(self.cpu.vcpu).as_secs_f64() * 1e3
    }

    fn outside_vcpu_us_request(&self) -> f64 {
        self.outside_vcpu_ms() * 1e3 / self.requests.max(1) as f64
    }

    fn daemon_us_request(&self) -> f64 {
        self.cpu.daemon.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }
}

fn main() {
    bench_main("fs", run);
}

fn run() -> Result<(), FsBenchError> {
    let runs = match std::env::var_os(RUNS_VAR) {
        None => DEFAULT_RUNS,
        Some(_) => runs_from_env()?,
    };
    let qemu_version = qemu_version()?;
    let kernel = probe_elf(Flavour::Pvh);
    let mut results: Vec<(Vmm, Result<Vec<Sample>, String>)> =
        Vmm::ALL.iter().map(|&vmm| (vmm, Ok(Vec::new()))).collect();
    for run in 0..runs {
        for (vmm, result) in &mut results {
            let Ok(samples) = result else {
                continue;
            };
            match vm_run(*vmm, &kernel, run) {
                Ok(run) => samples.extend(run),
                Err(err) => *result = Err(error_chain(&err)),
            }
        }
    }
    print_header(runs, &qemu_version);
    print_results(&results);
    Ok(())
}

/// Boots the probe under `vmm` on a fresh virtiofsd and measures every
/// phase.
fn vm_run(vmm: Vmm, kernel: &Path, run: usize) -> Result<Vec<Sample>, FsBenchError> {
    let label = vmm.label();
    let scratch = scratch_dir(&format!("bench-fs-{label}-{run}"));
    let share = scratch.join("share");
    std::fs::create_dir(&share).map_err(|source| BenchError::Write {
        path: share.clone(),
        source,
    })?;
    let socket = scratch.join("vfs.sock");
    let daemon = Virtiofsd::start(&socket, &share)
        .map_err(|source| FsBenchError::Daemon { vmm: label, source })?;
    let mut vm = Running::spawn(vmm.command(kernel, &socket)?);
    let phases = watch_phases(&mut vm, daemon.pid());
    let finished = vm.finish(LIMIT);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&scratch);
    let failed = |why: String| FsBenchError::Failed {
        vmm: label,
        why,
        stdout: tail(&finished.stdout, 20),
        stderr: tail(&finished.stderr, 20),
    };
    let phases = phases.map_err(failed)?;
    if !finished.status.is_some_and(|s| s.success()) {
        return Err(failed(format!("ended with {:?}", finished.status)));
    }
    let report = ProbeReport::parse(&finished.stdout);
    samples(&report, &phases, finished.elapsed).map_err(failed)
}

/// Reads the clocks at each phase's start and end line; the CPU used in
/// each phase, in [`Phase::ALL`] order.
fn watch_phases(vm: &mut Running, daemon: u32) -> Result<Vec<CpuUse>, String> {
    let pid = vm.pid();
    let mut used = Vec::new();
    for phase in Phase::ALL {
        let start = format!("fs bench phase={} start", phase.name());
        let end = format!("fs bench {} ", phase.name());
        if !vm.stdout.wait_for(&start, PHASE_LIMIT) {
            return Err(format!("no '{start}' within {PHASE_LIMIT:?}"));
        }
        let before = CpuUse::now(pid, daemon);
        if !vm.stdout.wait_for(&end, PHASE_LIMIT) {
            return Err(format!("no '{end}...' within {PHASE_LIMIT:?}"));
        }
        used.push(CpuUse::now(pid, daemon).since(before));
    }
    Ok(used)
}

/// The probe's figures of each phase with the CPU it cost; checks every
/// phase succeeded and its TSC time fits in the run's wall time.
fn samples(report: &ProbeReport, cpu: &[CpuUse], wall: Duration) -> Result<Vec<Sample>, String> {
    let probe_khz = report
        .value("tsc_khz=")
        .and_then(|rest| Fields::parse(&format!("tsc_khz={rest}")).num("tsc_khz"));
    // KVM runs the guest TSC at the host's rate unless told otherwise.
    let tsc_hz = probe_khz.map_or_else(host_tsc_hz, |khz| khz as f64 * 1e3);
    let mut samples = Vec::new();
    for (phase, &cpu) in Phase::ALL.iter().zip(cpu) {
        let line = report
            .value(&format!("fs bench {} ", phase.name()))
            .map(Fields::parse)
            .ok_or_else(|| format!("no 'fs bench {}' line", phase.name()))?;
        if line.get("errno") != Some("0") {
            return Err(format!(
                "{} failed: errno={:?}",
                phase.name(),
                line.get("errno")
            ));
        }
        let seconds = line.num("tsc_cycles").unwrap_or(0) as f64 / tsc_hz;
        if seconds <= 0.0 || seconds > wall.as_secs_f64() {
            return Err(format!(
                "{}: {seconds:.3} s of guest TSC in a {:.3} s run: the guest TSC does not run at {tsc_hz:.0} Hz",
                phase.name(),
                wall.as_secs_f64()
            ));
        }
        let (rate, requests) = match phase {
            Phase::Getattr => {
                let ops = line.num("ops").unwrap_or(0);
                (ops as f64 / seconds, ops)
            }
            Phase::Write | Phase::Read => {
                let bytes = line.num("bytes").unwrap_or(0) as f64;
                (
                    bytes / f64::from(1 << 20) / seconds,
                    line.num("requests").unwrap_or(0),
                )
            }
        };
        samples.push(Sample {
            phase: *phase,
            rate,
            seconds,
            requests,
            cpu,
        });
    }
    Ok(samples)
}

fn print_header(runs: usize, qemu_version: &str) {
    println!("## virtio-fs benchmark: probe-pvh, zvmm against QEMU q35\n");
    println!(
        "Guest: probe-pvh, 1 vCPU, 256 MiB shared memfd RAM, one virtio-fs device on a fresh \
         virtiofsd (`--xattr --cache auto --sandbox namespace`, an empty scratch directory) per \
         VM run, {runs} run(s) per VMM, interleaved; figures are medians (min-max) over runs. \
         The probe does {GETATTRS} GETATTR round trips one after the other, then writes \
         {BENCH_MIB} MiB sequentially in {CHUNK_KIB} KiB requests ({DEPTH} in flight) and reads \
         them back the same way; rates are the probe's, over its TSC time of each phase (its \
         tsc_khz, else the host TSC rate measured here)."
    );
    println!(
        "CPU per phase, read when the probe announces the phase and when it reports it: the \
         VMM process's CPU clock minus its vCPU thread's run time (zvmm's vcpu0, QEMU's CPU \
         0/KVM; the probe busy-polls, so the vCPU thread is always on the CPU) — what the VMM \
         itself spends while the guest does file I/O — and virtiofsd's (parent and sandboxed \
         child), per request."
    );
    println!(
        "zvmm: `--fs tag={TAG},socket=S`. QEMU: {qemu_version}, `-M q35`, \
         `vhost-user-fs-pci,queue-size=1024`, memory-backend-memfd share=on.\n"
    );
}

/// Figures compared: name, accessor, decimals.
type Figure = (&'static str, fn(&Sample) -> f64, usize);

const FIGURES: [Figure; 6] = [
    ("rate", |s| s.rate, 1),
    ("requests", |s| s.requests as f64, 0),
    ("guest s", |s| s.seconds, 3),
    ("VMM CPU outside vCPU ms", Sample::outside_vcpu_ms, 1),
    ("… µs/request", Sample::outside_vcpu_us_request, 2),
    ("virtiofsd CPU µs/request", Sample::daemon_us_request, 1),
];

fn summary(samples: &[Sample], phase: Phase, figure: fn(&Sample) -> f64) -> Option<Summary> {
    let values: Vec<f64> = samples
        .iter()
        .filter(|s| s.phase == phase)
        .map(figure)
        .collect();
    Summary::of(&values)
}

fn print_results(results: &[(Vmm, Result<Vec<Sample>, String>)]) {
    let mut header = vec!["phase", "unit", "vmm"];
    header.extend(FIGURES.iter().map(|(name, _, _)| *name));
    let rows: Vec<Vec<String>> = Phase::ALL
        .iter()
        .flat_map(|&phase| phase_rows(results, phase))
        .collect();
    println!("{}", markdown_table(&header, &rows));
    for (vmm, result) in results {
        if let Err(err) = result {
            println!(
                "**{} failed**: {}\n",
                vmm.label(),
                err.replace('\n', "  \n")
            );
        }
    }
}

/// One row per VMM for `phase`, then the zvmm/QEMU ratios.
fn phase_rows(results: &[(Vmm, Result<Vec<Sample>, String>)], phase: Phase) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut medians: Vec<Option<Vec<f64>>> = Vec::new();
    for (vmm, result) in results {
        let mut row = vec![
            phase.name().to_string(),
            phase.unit().to_string(),
            vmm.label().to_string(),
        ];
        match result {
            Ok(samples) => {
                let sums: Vec<Option<Summary>> = FIGURES
                    .iter()
                    .map(|(_, f, _)| summary(samples, phase, *f))
                    .collect();
                row.extend(FIGURES.iter().zip(&sums).map(|((_, _, d), s)| match s {
                    Some(s) => format!("{:.d$} ({:.d$}-{:.d$})", s.median, s.min, s.max, d = *d),
                    None => "-".into(),
                }));
                medians.push(sums.iter().map(|s| s.map(|s| s.median)).collect());
            }
            Err(_) => {
                row.extend(FIGURES.iter().map(|_| "error (below)".to_string()));
                medians.push(None);
            }
        }
        rows.push(row);
    }
    if let [Some(z), Some(q)] = &medians[..] {
        let mut row = vec![String::new(), String::new(), "zvmm/qemu".into()];
        row.extend(z.iter().zip(q).map(|(z, q)| match z / q {
            r if r.is_finite() => format!("{r:.2}x"),
            _ => "-".into(),
        }));
        rows.push(row);
    }
    rows
}
