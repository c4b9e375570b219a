//! Start-up and density benchmark: what a VMM costs around a guest that
//! does almost nothing (the tiny guest, `zvmm_tests::tiny`).
//!
//! Run with `cargo bench -p zvmm-tests --bench start` (runs per case:
//! `ZVMM_BENCH_RUNS`, default 10; VMs in the density table:
//! `ZVMM_DENSITY_VMS`, default 20). It prints Markdown tables and never
//! judges; the targets are reported as met or not.
//!
//! 1. **Tiny guest, process start → power-off → exit**, 64 MiB, 1 vCPU:
//!    zvmm as it is, zvmm with `--pit on` (the in-kernel PIT it used to
//!    create), QEMU microvm trimmed (`qemu-min`, see `benches/boot.rs`) and
//!    plain microvm, each with `isa-debug-exit` on port 0xf4 (the tiny
//!    guest writes it after zvmm's ACPI sleep register; QEMU then exits
//!    with status 1). Wall = spawn to exit, CPU = user + system time of the
//!    process (`wait4`), peak RSS = `ru_maxrss`. zvmm's wall time is split
//!    with its own `--boot-timer` report: *outside main* = wall − zvmm's
//!    exit mark (exec, dynamic loading, process exit), *kernel calls* = the
//!    summed set-up and teardown calls it accounts (`vmm::kernel_time`:
//!    KVM_CREATE_VM, irqchip, memory slots, vCPU set-up, VM teardown, ...),
//!    *zvmm own* = the exit mark − kernel calls (zvmm's code, thread
//!    start-up and the guest's ten port writes).
//! 2. **Guest RAM size**: the same run at 64 MiB, 1 GiB and 8 GiB (zvmm and
//!    qemu-min), to show that nothing on the start path grows with RAM.
//! 3. **Density**: N idle VMs (the tiny guest prints, then halts with
//!    interrupts off) started at once: time from the first spawn until
//!    every guest's line has arrived, summed RSS and PSS
//!    (`/proc/PID/smaps_rollup`, shared pages divided among sharers) while
//!    all run, and the per-VM figures. Then all are killed.
//!
//! Cases are interleaved run by run after one unmeasured warm-up each.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use zvmm_tests::bench::{
    bench_main, markdown_table, measure, qemu_version, runs_from_env, BenchError, Ending, Measured,
    Summary,
};
use zvmm_tests::qemu::QEMU;
use zvmm_tests::tiny::{write_tiny_elf, TinyEnd, TINY_LINE};
use zvmm_tests::zvmm::{scratch_dir, zvmm_bin};

/// Hard limit for one run.
const LIMIT: Duration = Duration::from_secs(30);
/// Unmeasured runs per case first.
const WARMUP_RUNS: usize = 1;
/// RAM of the start-up cases.
const MEMORY: &str = "64M";
/// RAM sizes of the second table.
const SIZES: [&str; 3] = ["64M", "1G", "8G"];
/// VMs in the density table unless `ZVMM_DENSITY_VMS` says otherwise.
const DEFAULT_DENSITY_VMS: usize = 20;
/// How long the density VMs get to print.
const DENSITY_LIMIT: Duration = Duration::from_secs(60);
/// Targets from the issue: boot wall and idle-VM memory.
const WALL_TARGET_MS: f64 = 14.0;
const RSS_PER_VM_TARGET_MIB: f64 = 4.0;
/// QEMU's trimmed microvm (as in benches/boot.rs) and plain microvm.
const QEMU_MIN_MACHINE: &str = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,\
isa-serial=on,pcie=off,ioapic2=off,auto-kernel-cmdline=off,accel=kvm";
const QEMU_MICROVM_MACHINE: &str = "microvm,accel=kvm";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Zvmm,
    ZvmmPit,
    QemuMin,
    QemuMicrovm,
}

impl Vmm {
    fn label(self) -> &'static str {
        match self {
            Vmm::Zvmm => "zvmm",
            Vmm::ZvmmPit => "zvmm --pit on",
            Vmm::QemuMin => "qemu-min",
            Vmm::QemuMicrovm => "qemu-microvm",
        }
    }

    fn is_zvmm(self) -> bool {
        matches!(self, Vmm::Zvmm | Vmm::ZvmmPit)
    }

    /// The status a clean run ends with (QEMU's isa-debug-exit: 0 << 1 | 1).
    fn clean_status(self) -> i32 {
        if self.is_zvmm() {
            0
        } else {
            1
        }
    }

    fn command(self, kernel: &Path, memory: &str) -> Command {
        match self {
            Vmm::Zvmm | Vmm::ZvmmPit => {
                let mut command = Command::new(zvmm_bin());
                command.arg("--kernel").arg(kernel);
                command.args(["--memory", memory, "--serial", "stdio", "--boot-timer"]);
                if self == Vmm::ZvmmPit {
                    command.args(["--pit", "on"]);
                }
                command
            }
            Vmm::QemuMin => qemu_command(QEMU_MIN_MACHINE, kernel, memory),
            Vmm::QemuMicrovm => qemu_command(QEMU_MICROVM_MACHINE, kernel, memory),
        }
    }
}

fn qemu_command(machine: &str, kernel: &Path, memory: &str) -> Command {
    let mut command = Command::new(QEMU);
    command
        .args(["-M", machine, "-cpu", "host,-arch-capabilities"])
        .args(["-smp", "1", "-m", memory])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1"])
        .arg("-kernel")
        .arg(kernel);
    command
}

/// zvmm's own account of one run, from `--boot-timer`.
#[derive(Clone, Debug, Default)]
struct Breakdown {
    /// The timeline's exit mark, ms since zvmm's main started.
    exit_ms: f64,
    /// Summed kernel calls, ms.
    kernel_ms: f64,
    /// The costliest kernel call, with its ms.
    top_call: (String, f64),
}

impl Breakdown {
    /// Parses the `--boot-timer` lines: `  <ms>  exit` in the timeline,
    /// `  <ms>  <call> (xN)` and `  <ms>  total` in the kernel-call list.
    fn parse(stderr: &str) -> Option<Self> {
        let mut breakdown = Breakdown::default();
        let mut in_calls = false;
        for line in stderr.lines() {
            if line.starts_with("zvmm: kernel calls") {
                in_calls = true;
                continue;
            }
            let Some((ms, what)) = line.trim().split_once("  ") else {
                continue;
            };
            let Ok(ms) = ms.trim().parse::<f64>() else {
                continue;
            };
            let what = what.trim();
            match (in_calls, what) {
                (false, "exit") => breakdown.exit_ms = ms,
                (true, "total") => breakdown.kernel_ms = ms,
                (true, call) if ms > breakdown.top_call.1 => {
                    breakdown.top_call = (call.to_string(), ms)
                }
                _ => {}
            }
        }
        (breakdown.exit_ms > 0.0).then_some(breakdown)
    }
}

/// The samples of one VMM at one RAM size.
struct Case {
    vmm: Vmm,
    memory: &'static str,
    wall_ms: Vec<f64>,
    cpu_ms: Vec<f64>,
    rss_mib: Vec<f64>,
    outside_ms: Vec<f64>,
    kernel_ms: Vec<f64>,
    own_ms: Vec<f64>,
    top_call: Option<(String, f64)>,
}

impl Case {
    fn new(vmm: Vmm, memory: &'static str) -> Self {
        Self {
            vmm,
            memory,
            wall_ms: Vec::new(),
            cpu_ms: Vec::new(),
            rss_mib: Vec::new(),
            outside_ms: Vec::new(),
            kernel_ms: Vec::new(),
            own_ms: Vec::new(),
            top_call: None,
        }
    }

    fn name(&self) -> String {
        format!("{} {}", self.vmm.label(), self.memory)
    }

    fn check(&self, measured: &Measured, run: usize) -> Result<(), BenchError> {
        let printed = measured.stdout.contains(TINY_LINE);
        if measured.ending == Ending::Exited(self.vmm.clean_status()) && printed {
            return Ok(());
        }
        Err(BenchError::Failed {
            case: self.name(),
            run,
            why: format!("ended {:?}, printed the line: {printed}", measured.ending),
            stdout: measured.stdout.clone(),
            stderr: measured.stderr.clone(),
        })
    }

    fn record(&mut self, measured: &Measured) {
        let wall = measured.wall.as_secs_f64() * 1e3;
        self.wall_ms.push(wall);
        self.cpu_ms.push(measured.cpu.as_secs_f64() * 1e3);
        self.rss_mib.push(measured.max_rss_kib as f64 / 1024.0);
        if let Some(b) = Breakdown::parse(&measured.stderr) {
            self.outside_ms.push(wall - b.exit_ms);
            self.kernel_ms.push(b.kernel_ms);
            self.own_ms.push(b.exit_ms - b.kernel_ms);
            if self.top_call.as_ref().is_none_or(|t| b.top_call.1 > t.1) {
                self.top_call = Some(b.top_call);
            }
        }
    }
}

fn median(samples: &[f64]) -> String {
    Summary::of(samples).map_or("-".into(), |s| format!("{:.2}", s.median))
}

fn range(samples: &[f64]) -> String {
    Summary::of(samples).map_or("-".into(), |s| format!("{:.1}-{:.1}", s.min, s.max))
}

fn main() {
    bench_main("start", run);
}

fn run() -> Result<(), BenchError> {
    let runs = runs_from_env()?;
    let qemu_version = qemu_version()?;
    let dir = scratch_dir("bench-start");
    let poweroff = write_tiny_elf(&dir, TinyEnd::PowerOff);
    let idle = write_tiny_elf(&dir, TinyEnd::Idle);
    let mut cases: Vec<Case> = [Vmm::Zvmm, Vmm::ZvmmPit, Vmm::QemuMin, Vmm::QemuMicrovm]
        .map(|vmm| Case::new(vmm, MEMORY))
        .into_iter()
        .chain(
            SIZES[1..]
                .iter()
                .flat_map(|&size| [Case::new(Vmm::Zvmm, size), Case::new(Vmm::QemuMin, size)]),
        )
        .collect();
    for run in 0..WARMUP_RUNS + runs {
        for case in &mut cases {
            let measured = measure(case.vmm.command(&poweroff, case.memory), LIMIT)?;
            case.check(&measured, run)?;
            if run >= WARMUP_RUNS {
                case.record(&measured);
            }
        }
    }
    println!("## Start-up: tiny guest, process start to power-off to exit\n");
    println!(
        "{runs} runs per case after {WARMUP_RUNS} warm-up, interleaved; 1 vCPU. zvmm: `{}`. {qemu_version}.\n",
        zvmm_bin().display()
    );
    let first: Vec<&Case> = cases.iter().filter(|c| c.memory == MEMORY).collect();
    println!("{}", start_table(&first));
    let sized: Vec<&Case> = SIZES
        .iter()
        .flat_map(|&size| {
            cases
                .iter()
                .filter(move |c| c.memory == size && matches!(c.vmm, Vmm::Zvmm | Vmm::QemuMin))
        })
        .collect();
    println!("### By guest RAM size\n");
    println!("{}", start_table(&sized));
    let density = density_vms()?;
    println!("## Density: {density} idle 64 MiB VMs started at once\n");
    let mut rows = Vec::new();
    for vmm in [Vmm::Zvmm, Vmm::QemuMin] {
        rows.push(density_row(vmm, &idle, density)?);
    }
    let header = [
        "vmm",
        "all printed after ms",
        "summed RSS MiB",
        "RSS per VM MiB",
        "summed PSS MiB",
        "PSS per VM MiB",
    ];
    println!("{}", markdown_table(&header, &rows));
    println!("{}", targets_line(&cases, &rows));
    Ok(())
}

fn start_table(cases: &[&Case]) -> String {
    let header = [
        "vmm",
        "RAM",
        "wall median ms",
        "wall min-max",
        "CPU median ms",
        "peak RSS MiB",
        "outside main ms",
        "kernel calls ms",
        "zvmm own ms",
        "costliest kernel call (max ms)",
    ];
    let rows: Vec<Vec<String>> = cases
        .iter()
        .map(|c| {
            vec![
                c.vmm.label().to_string(),
                c.memory.to_string(),
                median(&c.wall_ms),
                range(&c.wall_ms),
                median(&c.cpu_ms),
                median(&c.rss_mib),
                median(&c.outside_ms),
                median(&c.kernel_ms),
                median(&c.own_ms),
                c.top_call
                    .as_ref()
                    .map_or("-".into(), |(name, ms)| format!("{name} ({ms:.2})")),
            ]
        })
        .collect();
    markdown_table(&header, &rows)
}

fn density_vms() -> Result<usize, BenchError> {
    match std::env::var("ZVMM_DENSITY_VMS") {
        Err(_) => Ok(DEFAULT_DENSITY_VMS),
        Ok(value) => value
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or(BenchError::BadRuns { value }),
    }
}

/// Starts `count` idle VMs, waits for every line, reads their memory,
/// kills them; returns the table row.
fn density_row(vmm: Vmm, kernel: &Path, count: usize) -> Result<Vec<String>, BenchError> {
    let start = Instant::now();
    let (printed_tx, printed_rx) = mpsc::channel();
    let mut children = Vec::new();
    for _ in 0..count {
        let mut command = vmm.command(kernel, "64M");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| BenchError::Spawn {
                program: vmm.label().into(),
                source,
            })?;
        let stdout = child.stdout.take();
        let tx = printed_tx.clone();
        std::thread::spawn(move || watch_for_line(stdout, tx));
        children.push(KillOnDrop(child));
    }
    drop(printed_tx);
    let mut printed = 0;
    while printed < count {
        let left = DENSITY_LIMIT.saturating_sub(start.elapsed());
        match printed_rx.recv_timeout(left) {
            Ok(()) => printed += 1,
            Err(_) => {
                return Err(BenchError::Failed {
                    case: format!("density {}", vmm.label()),
                    run: 0,
                    why: format!("only {printed} of {count} guests printed"),
                    stdout: String::new(),
                    stderr: String::new(),
                })
            }
        }
    }
    let all_printed = start.elapsed();
    let pids: Vec<u32> = children.iter().map(|c| c.0.id()).collect();
    let rss_kib: u64 = pids.iter().map(|&pid| status_kib(pid, "VmRSS:")).sum();
    let pss_kib: u64 = pids.iter().map(|&pid| pss_kib(pid)).sum();
    drop(children);
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(vec![
        vmm.label().to_string(),
        format!("{:.0}", all_printed.as_secs_f64() * 1e3),
        format!("{:.1}", mib(rss_kib)),
        format!("{:.2}", mib(rss_kib) / count as f64),
        format!("{:.1}", mib(pss_kib)),
        format!("{:.2}", mib(pss_kib) / count as f64),
    ])
}

/// Sends one message when the tiny guest's line shows on `stdout`, then
/// keeps draining it.
fn watch_for_line(stdout: Option<std::process::ChildStdout>, tx: mpsc::Sender<()>) {
    let Some(stdout) = stdout else { return };
    let mut sent = false;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if !sent && line.contains(TINY_LINE) {
            let _ = tx.send(());
            sent = true;
        }
    }
}

/// A child killed and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `kB` field of `/proc/PID/status`.
fn status_kib(pid: u32, field: &str) -> u64 {
    proc_field(&PathBuf::from(format!("/proc/{pid}/status")), field)
}

/// Proportional set size from `/proc/PID/smaps_rollup`.
fn pss_kib(pid: u32) -> u64 {
    proc_field(&PathBuf::from(format!("/proc/{pid}/smaps_rollup")), "Pss:")
}

fn proc_field(path: &Path, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn targets_line(cases: &[Case], density: &[Vec<String>]) -> String {
    let wall = cases
        .iter()
        .find(|c| c.vmm == Vmm::Zvmm && c.memory == MEMORY)
        .and_then(|c| Summary::of(&c.wall_ms))
        .map_or(f64::NAN, |s| s.median);
    let per_vm: f64 = density
        .first()
        .and_then(|row| row.get(3)?.parse().ok())
        .unwrap_or(f64::NAN);
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    format!(
        "Targets (informational): tiny-guest wall <= {WALL_TARGET_MS} ms: {wall:.2} ms {}; \
         RSS per idle VM <= {RSS_PER_VM_TARGET_MIB} MiB: {per_vm:.2} MiB {}.",
        verdict(wall <= WALL_TARGET_MS),
        verdict(per_vm <= RSS_PER_VM_TARGET_MIB)
    )
}
