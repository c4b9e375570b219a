//! virtio-net benchmark: zvmm against QEMU q35 on the probe guest, each on
//! a tap in a network namespace of its own.
//!
//! Run with `cargo bench -p zvmm-tests --bench net` (measured VM runs per
//! VMM: `ZVMM_BENCH_RUNS`, default 3). It prints a Markdown table and never
//! judges; only a VMM that fails to boot or to finish a burst is reported
//! (as an error row: the other VMM's figures still print). `cargo test`
//! does not pass `--bench`, so there it only prints how to run it.
//!
//! Each run boots `probe-pvh` (1 vCPU, 256 MiB) with
//! `probe.net.bench=FRAMES` and drives it from this process
//! (`zvmm_tests::net::Peer`): for each payload size, a guest→host burst
//! (`BENCH tx`: the probe sends [`GUEST_FRAMES`] datagrams as fast as the
//! device takes them) and a host→guest burst (`BENCH rx`: this process
//! sends [`HOST_FRAMES`] datagrams as fast as its socket takes them; the
//! probe counts what arrives). Rates are the probe's: frames and payload
//! bytes over the guest TSC time from the first to the last frame.
//!
//! VMM CPU: the VMM process's CPU clock (user + system, all threads, the
//! kernel's per-process clock: the `/proc/PID/stat` utime + stime figure
//! at nanosecond resolution) read just before the command that starts a
//! burst and just after its result arrives, per frame. The probe polls its
//! rings with interrupts off, so its vCPU thread is always busy and that
//! figure is mostly guest time; the table therefore also gives the CPU of
//! every thread but the vCPU's (process clock minus the vCPU thread's
//! `/proc/PID/task/TID/schedstat` run time; zvmm names it `vcpu0`, QEMU
//! `CPU 0/KVM` with `-name debug-threads=on`): what the device model and the tap
//! cost per frame.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use zvmm_tests::api::cpu_time;
use zvmm_tests::bench::{
    bench_main, host_tsc_hz, markdown_table, qemu_version, runs_from_env, tail, vcpu_time,
    BenchError, Summary, RUNS_VAR,
};
use zvmm_tests::net::{
    BenchResult, NetError, NetNs, Peer, GUEST_IP, GUEST_MAC, HOST_IP, MAX_PAYLOAD,
};
use zvmm_tests::probe::{error_chain, probe_elf, Fields, Flavour, ProbeReport};
use zvmm_tests::qemu::QEMU;
use zvmm_tests::zvmm::{zvmm_bin, Running};

/// Payload sizes compared: small frames and full-MTU frames.
const SIZES: [usize; 2] = [64, MAX_PAYLOAD];
/// Datagrams per guest→host burst (`probe.net.bench`).
const GUEST_FRAMES: u64 = 2000;
/// Datagrams per host→guest burst.
const HOST_FRAMES: u64 = 2000;
/// Measured VM runs per VMM when `ZVMM_BENCH_RUNS` is unset.
const DEFAULT_RUNS: usize = 3;
/// Hard limit for one VM run.
const LIMIT: Duration = Duration::from_secs(180);
/// How long the probe may take to boot and say `READY`.
const BOOT_LIMIT: Duration = Duration::from_secs(40);
/// Limit for one burst and its result.
const BURST_LIMIT: Duration = Duration::from_secs(60);
/// The tap inside each namespace.
const TAP: &str = "ztap0";

/// Failures of one VMM's benchmark run.
#[derive(Debug, thiserror::Error)]
enum NetBenchError {
    /// The network plumbing or the exchange failed.
    #[error("{vmm}: {step}")]
    Net {
        vmm: &'static str,
        step: &'static str,
        #[source]
        source: NetError,
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

    fn command(self, ns: &NetNs, kernel: &Path) -> Result<Command, NetBenchError> {
        let cmdline = format!(
            "console=ttyS0 probe.net.ip={GUEST_IP} probe.net.peer={HOST_IP} probe.net.bench={GUEST_FRAMES} probe.net.wait={}",
            LIMIT.as_secs()
        );
        let mut command;
        match self {
            Vmm::Zvmm => {
                command = ns.command(built_zvmm()?);
                command
                    .arg("--kernel")
                    .arg(kernel)
                    .args(["--cpus", "1", "--memory", "256M"])
                    .args(["--timeout", &LIMIT.as_secs().to_string()])
                    .args(["--net", &format!("tap={TAP},mac={GUEST_MAC}")])
                    .args(["--cmdline", &cmdline]);
            }
            Vmm::QemuQ35 => {
                command = ns.command(QEMU);
                command
                    .args(["-M", "q35,accel=kvm", "-cpu", "host,-arch-capabilities"])
                    .args(["-smp", "1", "-m", "256M"])
                    .args(["-name", "bench,debug-threads=on"])
                    .args(["-nodefaults", "-no-user-config", "-display", "none"])
                    .args(["-serial", "stdio", "-no-reboot", "-append", &cmdline])
                    .arg("-netdev")
                    .arg(format!(
                        "tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"
                    ))
                    .arg("-device")
                    .arg(format!(
                        "virtio-net-pci,netdev=n0,mac={GUEST_MAC},disable-legacy=on"
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
fn built_zvmm() -> Result<PathBuf, NetBenchError> {
    std::panic::catch_unwind(|| zvmm_bin().to_path_buf()).map_err(|_| NetBenchError::Failed {
        vmm: "zvmm",
        why: "zvmm does not build".into(),
        stdout: String::new(),
        stderr: String::new(),
    })
}

/// One direction and payload size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    GuestToHost,
    HostToGuest,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::GuestToHost => "guest→host",
            Direction::HostToGuest => "host→guest",
        }
    }
}

/// One burst as measured.
#[derive(Clone, Copy, Debug)]
struct Burst {
    direction: Direction,
    size: usize,
    probe: BenchResult,
    wall: Duration,
    cpu: CpuUse,
}

/// One VM run: its bursts and the guest TSC rate.
struct VmRun {
    bursts: Vec<Burst>,
    tsc_hz: f64,
}

/// CPU time of the VMM process: all of it, and its vCPU threads'.
#[derive(Clone, Copy, Debug, Default)]
struct CpuUse {
    process: Duration,
    vcpu: Duration,
}

impl CpuUse {
    /// The VMM's CPU so far.
    fn now(pid: u32) -> Result<CpuUse, NetError> {
        let process = cpu_time(pid).ok_or_else(|| NetError::Unexpected {
            what: "the VMM's CPU clock".into(),
            answer: "process gone".into(),
        })?;
        Ok(CpuUse {
            process,
            vcpu: vcpu_time(pid),
        })
    }

    fn since(self, before: CpuUse) -> CpuUse {
        CpuUse {
            process: self.process.saturating_sub(before.process),
            vcpu: self.vcpu.saturating_sub(before.vcpu),
        }
    }
}

/// A burst turned into figures.
#[derive(Clone, Copy, Debug)]
struct Sample {
    direction: Direction,
    size: usize,
    frames_s: f64,
    mib_s: f64,
    cpu_us_frame: f64,
    outside_vcpu_us_frame: f64,
    loss: f64,
}

impl Burst {
    fn sample(&self, tsc_hz: f64) -> Sample {
        let seconds = self.probe.tsc_cycles as f64 / tsc_hz;
        let frames = self.probe.frames.max(1) as f64;
        let cpu = self.cpu.process.as_secs_f64();
        let outside = self.cpu.process.saturating_sub(self.cpu.vcpu).as_secs_f64();
        let sent = match self.direction {
            Direction::GuestToHost => self.probe.frames,
            Direction::HostToGuest => self.probe.host_frames,
        };
        let arrived = match self.direction {
            Direction::GuestToHost => self.probe.host_frames,
            Direction::HostToGuest => self.probe.frames,
        };
        Sample {
            direction: self.direction,
            size: self.size,
            frames_s: self.probe.frames as f64 / seconds,
            mib_s: self.probe.bytes as f64 / f64::from(1 << 20) / seconds,
            cpu_us_frame: cpu * 1e6 / frames,
            outside_vcpu_us_frame: outside * 1e6 / frames,
            loss: 1.0 - arrived as f64 / sent.max(1) as f64,
        }
    }
}

fn main() {
    bench_main("net", run);
}

fn run() -> Result<(), NetBenchError> {
    let runs = match std::env::var_os(RUNS_VAR) {
        None => DEFAULT_RUNS,
        Some(_) => runs_from_env()?,
    };
    let qemu_version = qemu_version()?;
    let kernel = probe_elf(Flavour::Pvh);
    let mut results: Vec<(Vmm, Result<Vec<Sample>, String>)> =
        Vmm::ALL.iter().map(|&vmm| (vmm, Ok(Vec::new()))).collect();
    for _ in 0..runs {
        for (vmm, result) in &mut results {
            let Ok(samples) = result else {
                continue;
            };
            match vm_run(*vmm, &kernel) {
                Ok(run) => samples.extend(run.bursts.iter().map(|b| b.sample(run.tsc_hz))),
                Err(err) => *result = Err(error_chain(&err)),
            }
        }
    }
    print_header(runs, &qemu_version);
    print_results(&results);
    Ok(())
}

/// Boots the probe under `vmm` in a fresh namespace and runs every burst.
fn vm_run(vmm: Vmm, kernel: &Path) -> Result<VmRun, NetBenchError> {
    let label = vmm.label();
    let net = |step| {
        move |source| NetBenchError::Net {
            vmm: label,
            step,
            source,
        }
    };
    let mut ns = NetNs::new().map_err(net("namespace"))?;
    ns.add_tap(TAP, &format!("{HOST_IP}/24"))
        .map_err(net("tap"))?;
    let peer = Peer::bind(&ns).map_err(net("sockets"))?;
    let mut vm = Running::spawn(vmm.command(&ns, kernel)?);
    let bursts = drive(&mut vm, &peer);
    let _ = peer.done();
    let finished = vm.finish(LIMIT);
    let failed = |why: String| NetBenchError::Failed {
        vmm: label,
        why,
        stdout: tail(&finished.stdout, 20),
        stderr: tail(&finished.stderr, 20),
    };
    let bursts = bursts.map_err(failed)?;
    if !finished.status.is_some_and(|s| s.success()) {
        return Err(failed(format!("ended with {:?}", finished.status)));
    }
    let report = ProbeReport::parse(&finished.stdout);
    let probe_khz = report
        .value("tsc_khz=")
        .and_then(|rest| Fields::parse(&format!("tsc_khz={rest}")).num("tsc_khz"));
    // KVM runs the guest TSC at the host's rate unless told otherwise.
    let tsc_hz = probe_khz.map_or_else(host_tsc_hz, |khz| khz as f64 * 1e3);
    for burst in &bursts {
        let guest_s = burst.probe.tsc_cycles as f64 / tsc_hz;
        if guest_s > burst.wall.as_secs_f64() {
            return Err(failed(format!(
                "{guest_s:.3} s of guest TSC in a {:.3} s burst: the guest TSC does not run at {tsc_hz:.0} Hz",
                burst.wall.as_secs_f64()
            )));
        }
    }
    Ok(VmRun { bursts, tsc_hz })
}

/// Waits for `READY` (giving up early if the VMM exits), then runs both
/// directions for every size. Errors say what went wrong (the caller adds
/// the VMM's output).
fn drive(vm: &mut Running, peer: &Peer) -> Result<Vec<Burst>, String> {
    let net = |step: &'static str| move |err: NetError| format!("{step}: {}", error_chain(&err));
    let start = Instant::now();
    while peer.expect("READY", Duration::from_secs(1)).is_err() {
        if let Some(status) = vm.try_status() {
            return Err(format!("{status} before the probe's READY"));
        }
        if start.elapsed() > BOOT_LIMIT {
            return Err(format!("no READY from the probe within {BOOT_LIMIT:?}"));
        }
    }
    let pid = vm.pid();
    let mut bursts = Vec::new();
    for size in SIZES {
        for direction in [Direction::GuestToHost, Direction::HostToGuest] {
            let ((wall, cpu), probe) = measure_with(pid, || match direction {
                Direction::GuestToHost => peer.bench_guest_to_host(size, BURST_LIMIT),
                Direction::HostToGuest => peer.bench_host_to_guest(size, HOST_FRAMES, BURST_LIMIT),
            })
            .map_err(net("burst"))?;
            bursts.push(Burst {
                direction,
                size,
                probe,
                wall,
                cpu,
            });
        }
    }
    Ok(bursts)
}

/// Wall and VMM CPU time of `f`, and its result.
fn measure_with<T>(
    pid: u32,
    f: impl FnOnce() -> Result<T, NetError>,
) -> Result<((Duration, CpuUse), T), NetError> {
    let (before, start) = (CpuUse::now(pid)?, Instant::now());
    let value = f()?;
    let (after, wall) = (CpuUse::now(pid)?, start.elapsed());
    Ok(((wall, after.since(before)), value))
}

fn print_header(runs: usize, qemu_version: &str) {
    println!("## virtio-net benchmark: probe-pvh, zvmm against QEMU q35\n");
    println!(
        "Guest: probe-pvh, 1 vCPU, 256 MiB, one virtio-net on a tap in a private network \
         namespace, {runs} VM run(s) per VMM, interleaved; figures are medians (min-max) over \
         runs. Per size: the probe sends {GUEST_FRAMES} UDP datagrams as fast as the device takes \
         them (guest→host), then this process sends {HOST_FRAMES} as fast as its socket takes \
         them (host→guest). frames/s and MiB/s (UDP payload) are the probe's, timed with its TSC \
         from first to last frame (the probe's tsc_khz, else the host TSC rate measured here); \
         loss = datagrams sent but not counted by the other side. Where frames/s ties, the \
         probe's own (emulated, here) code per frame is the bottleneck and the VMMs differ only \
         in CPU."
    );
    println!(
        "VMM CPU: the VMM process's CPU clock (= /proc/PID/stat utime+stime, all threads, ns \
         resolution) read just before each burst's command and just after its result, per frame \
         the probe counted. The probe busy-polls (its vCPU thread never idles), so that is mostly \
         guest time; 'outside vCPU' subtracts the vCPU thread's own run time \
         (/proc/PID/task/TID/schedstat of zvmm's vcpu0, QEMU's CPU 0/KVM): the device model, \
         event loop and tap cost per frame."
    );
    println!(
        "QEMU: {qemu_version}, `-M q35`, `virtio-net-pci,disable-legacy=on`, tap with vhost=off.\n"
    );
}

/// Figures compared: name, accessor, decimals.
type Figure = (&'static str, fn(&Sample) -> f64, usize);

const FIGURES: [Figure; 5] = [
    ("frames/s", |s| s.frames_s, 0),
    ("MiB/s", |s| s.mib_s, 2),
    ("VMM CPU µs/frame", |s| s.cpu_us_frame, 1),
    ("outside vCPU µs/frame", |s| s.outside_vcpu_us_frame, 1),
    ("loss", |s| s.loss, 3),
];

/// The samples for one direction and size.
fn cell_samples(samples: &[Sample], direction: Direction, size: usize) -> Vec<Sample> {
    samples
        .iter()
        .filter(|s| s.direction == direction && s.size == size)
        .copied()
        .collect()
}

fn summary(samples: &[Sample], figure: fn(&Sample) -> f64) -> Option<Summary> {
    Summary::of(&samples.iter().map(figure).collect::<Vec<_>>())
}

fn print_results(results: &[(Vmm, Result<Vec<Sample>, String>)]) {
    let mut header = vec!["direction", "payload B", "vmm"];
    header.extend(FIGURES.iter().map(|(name, _, _)| *name));
    let mut rows = Vec::new();
    for size in SIZES {
        for direction in [Direction::GuestToHost, Direction::HostToGuest] {
            rows.extend(case_rows(results, direction, size));
        }
    }
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

/// One row per VMM for `direction` and `size`, then the zvmm/QEMU ratios.
fn case_rows(
    results: &[(Vmm, Result<Vec<Sample>, String>)],
    direction: Direction,
    size: usize,
) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut medians: Vec<Option<Vec<f64>>> = Vec::new();
    for (vmm, result) in results {
        let mut row = vec![
            direction.label().into(),
            size.to_string(),
            vmm.label().into(),
        ];
        match result {
            Ok(samples) => {
                let cell = cell_samples(samples, direction, size);
                let sums: Vec<Option<Summary>> =
                    FIGURES.iter().map(|(_, f, _)| summary(&cell, *f)).collect();
                row.extend(FIGURES.iter().zip(&sums).map(|((_, _, d), s)| match s {
                    Some(s) => format!("{:.d$} ({:.d$}-{:.d$})", s.median, s.min, s.max, d = *d),
                    None => "-".into(),
                }));
                medians.push(
                    sums.iter()
                        .map(|s| s.map(|s| s.median))
                        .collect::<Option<Vec<f64>>>(),
                );
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
