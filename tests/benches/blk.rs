//! virtio-blk benchmark: zvmm against QEMU q35 on the probe guest.
//!
//! Run with `cargo bench -p zvmm-tests --bench blk` (measured runs per VMM:
//! `ZVMM_BENCH_RUNS`, default 3). It prints a Markdown table and never
//! judges: the target (≥ 1.0× QEMU on each figure) is reported as met or
//! not; only a run that fails to boot or to finish the benchmark fails it.
//! `cargo test` does not pass `--bench`, so there it only prints how to
//! run it.
//!
//! Each run boots `probe-pvh` (1 vCPU, 256 MiB) with one disk on a scratch
//! image and `probe.blk.bench=MIB`: the probe reads [`BENCH_MIB`] MiB
//! sequentially in 64 KiB requests, writes them back (8 in flight, from
//! sector 0), then does 2000 random 4 KiB reads, and reports the guest TSC
//! cycles of each phase. Both VMMs get the same image file, the same probe
//! and the same command line, interleaved run by run after one unmeasured
//! warm-up each, so page-cache state and host drift hit both alike.
//!
//! QEMU: `-M q35` with `virtio-blk-pci,disable-legacy=on` (modern only, as
//! zvmm) and QEMU's default cache mode, `writeback`: buffered I/O through
//! the host page cache, which is what zvmm does too (plain
//! `pread`/`pwrite`, `fdatasync` only on FLUSH). `cache=none` (O_DIRECT)
//! would compare page-cache copies against device I/O instead.
//!
//! Cycles become seconds with the probe's `tsc_khz` when it knows it, else
//! with the host TSC rate measured here (`rdtsc` against `Instant` over
//! 200 ms): KVM runs the guest TSC at the host rate unless told otherwise.
//! Every run is checked for that: the benchmark's seconds must fit in the
//! VMM process's wall time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use zvmm_tests::bench::{
    bench_main, markdown_table, measure, qemu_version, runs_from_env, BenchError, Ending, Summary,
    RUNS_VAR,
};
use zvmm_tests::disk::make_image;
use zvmm_tests::probe::{probe_elf, test_bytes, Fields, Flavour, ProbeReport};
use zvmm_tests::qemu::QEMU;
use zvmm_tests::zvmm::{scratch_dir, zvmm_bin};

/// MiB the probe reads and writes per run (~6 s a zvmm run on this
/// emulated guest, most of it outside the measured phases).
const BENCH_MIB: u64 = 16;
/// Image size: the benchmark range plus as much again, all allocated.
const IMAGE_MIB: u64 = 2 * BENCH_MIB;
/// Measured runs per VMM when `ZVMM_BENCH_RUNS` is unset.
const DEFAULT_RUNS: usize = 3;
/// Unmeasured runs per VMM first.
const WARMUP_RUNS: usize = 1;
/// Hard limit for one run (q35's SeaBIOS alone takes ~10 s here).
const LIMIT: Duration = Duration::from_secs(120);
/// Guest RAM, as both VMMs spell it.
const MEMORY: &str = "256M";
/// Target: zvmm at least this fraction of QEMU on every figure.
const TARGET_RATIO: f64 = 1.0;

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

    fn command(self, kernel: &Path, image: &Path) -> Command {
        let cmdline = format!("console=ttyS0 probe.blk.bench={BENCH_MIB}");
        match self {
            Vmm::Zvmm => {
                let mut command = Command::new(zvmm_bin());
                command
                    .arg("--kernel")
                    .arg(kernel)
                    .args(["--cpus", "1", "--memory", MEMORY])
                    .args(["--timeout", &LIMIT.as_secs().to_string()])
                    .arg("--disk")
                    .arg(format!("path={}", image.display()))
                    .args(["--cmdline", &cmdline]);
                command
            }
            Vmm::QemuQ35 => {
                let mut command = Command::new(QEMU);
                command
                    .args(["-M", "q35,accel=kvm", "-cpu", "host,-arch-capabilities"])
                    .args(["-smp", "1", "-m", MEMORY])
                    .args(["-nodefaults", "-no-user-config", "-display", "none"])
                    .args(["-serial", "stdio", "-no-reboot", "-append", &cmdline])
                    .arg("-kernel")
                    .arg(kernel)
                    .arg("-drive")
                    .arg(format!("file={},if=none,id=d0,format=raw", image.display()))
                    .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]);
                command
            }
        }
    }
}

/// One run's figures.
struct Sample {
    read_mib_s: f64,
    write_mib_s: f64,
    randread_iops: f64,
}

/// The samples of one VMM.
struct Case {
    vmm: Vmm,
    samples: Vec<Sample>,
}

impl Case {
    fn summary(&self, figure: fn(&Sample) -> f64) -> Summary {
        let values: Vec<f64> = self.samples.iter().map(figure).collect();
        Summary::of(&values).unwrap_or(Summary {
            count: 0,
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        })
    }
}

/// A figure compared: name, unit, accessor.
type Figure = (&'static str, &'static str, fn(&Sample) -> f64);

/// The figures compared.
const FIGURES: [Figure; 3] = [
    ("seq read", "MiB/s", |s| s.read_mib_s),
    ("seq write", "MiB/s", |s| s.write_mib_s),
    ("4 KiB rand read", "IOPS", |s| s.randread_iops),
];

fn main() {
    bench_main("blk", run);
}

fn run() -> Result<(), BenchError> {
    let runs = match std::env::var_os(RUNS_VAR) {
        None => DEFAULT_RUNS,
        Some(_) => runs_from_env()?,
    };
    let qemu_version = qemu_version()?;
    let kernel = probe_elf(Flavour::Pvh);
    let image = write_image();
    let host_tsc_hz = measure_tsc_hz();
    let mut cases: Vec<Case> = Vmm::ALL
        .map(|vmm| Case {
            vmm,
            samples: Vec::new(),
        })
        .into();
    let mut tsc_source = String::new();
    for run in 0..WARMUP_RUNS + runs {
        for case in &mut cases {
            let (sample, source) = bench_run(case.vmm, &kernel, &image, host_tsc_hz, run)?;
            tsc_source = source;
            if run >= WARMUP_RUNS {
                case.samples.push(sample);
            }
        }
    }
    print_header(runs, &qemu_version, &tsc_source);
    print_results(&cases);
    Ok(())
}

/// One benchmark run of `vmm`, judged and converted to figures; also says
/// where the TSC rate came from.
fn bench_run(
    vmm: Vmm,
    kernel: &Path,
    image: &Path,
    host_tsc_hz: f64,
    run: usize,
) -> Result<(Sample, String), BenchError> {
    let measured = measure(vmm.command(kernel, image), LIMIT)?;
    let report = ProbeReport::parse(&measured.stdout);
    let failed = |why: String| BenchError::Failed {
        case: vmm.label().to_string(),
        run,
        why,
        stdout: tail(&measured.stdout),
        stderr: tail(&measured.stderr),
    };
    let exited = measured.ending == Ending::Exited(0);
    if !exited || !report.finished() {
        return Err(failed(format!(
            "ended with {:?} (finished: {})",
            measured.ending,
            report.finished()
        )));
    }
    let probe_khz = report
        .value("tsc_khz=")
        .and_then(|rest| Fields::parse(&format!("tsc_khz={rest}")).num("tsc_khz"));
    let (hz, source) = match probe_khz {
        Some(khz) => (khz as f64 * 1e3, "the probe's tsc_khz"),
        None => (
            host_tsc_hz,
            "host rdtsc vs Instant (the probe reported tsc_khz unknown)",
        ),
    };
    let phase = |key: &str| -> Result<(u64, f64), BenchError> {
        let rest = report
            .value(&format!("blk bench {key}="))
            .ok_or_else(|| failed(format!("no 'blk bench {key}=' line")))?;
        let fields = Fields::parse(&format!("{key}={rest}"));
        match (fields.num(key), fields.num("tsc_cycles")) {
            (Some(amount), Some(cycles)) if cycles > 0 => Ok((amount, cycles as f64 / hz)),
            _ => Err(failed(format!("bad 'blk bench {key}=' line: {rest}"))),
        }
    };
    let (read_bytes, read_s) = phase("seq_read_bytes")?;
    let (write_bytes, write_s) = phase("seq_write_bytes")?;
    let (ops, rand_s) = phase("randread_ops")?;
    let guest_s = read_s + write_s + rand_s;
    if guest_s > measured.wall.as_secs_f64() {
        return Err(failed(format!(
            "{guest_s:.2} s of guest TSC in {:.2} s of wall time: the guest TSC does not run at {hz:.0} Hz",
            measured.wall.as_secs_f64()
        )));
    }
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let sample = Sample {
        read_mib_s: mib(read_bytes) / read_s,
        write_mib_s: mib(write_bytes) / write_s,
        randread_iops: ops as f64 / rand_s,
    };
    Ok((sample, format!("{:.1} MHz from {source}", hz / 1e6)))
}

/// Writes the scratch image: [`IMAGE_MIB`] MiB of test bytes, every block
/// allocated, so the first run reads data like the later ones.
fn write_image() -> PathBuf {
    let path = scratch_dir("bench-blk").join("bench.img");
    let size = IMAGE_MIB << 20;
    make_image(&path, size, &[(0, test_bytes(size as usize, 0xb10c))]);
    path
}

/// Host TSC ticks per second: `rdtsc` against `Instant` over ~200 ms.
fn measure_tsc_hz() -> f64 {
    let start = Instant::now();
    let first = rdtsc();
    std::thread::sleep(Duration::from_millis(200));
    let last = rdtsc();
    let elapsed = start.elapsed().as_secs_f64();
    last.wrapping_sub(first) as f64 / elapsed
}

/// The time-stamp counter of the CPU this thread runs on.
fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads a counter; every x86_64 CPU has it and it
    // touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn print_header(runs: usize, qemu_version: &str, tsc_source: &str) {
    println!("## virtio-blk benchmark: probe-pvh, zvmm against QEMU q35\n");
    println!(
        "Guest: probe-pvh, 1 vCPU, {MEMORY}, `probe.blk.bench={BENCH_MIB}` on a {IMAGE_MIB} MiB \
         fully allocated raw image: sequential 64 KiB reads then writes (8 in flight) over \
         {BENCH_MIB} MiB, then 2000 random 4 KiB reads. {runs} measured runs per VMM after \
         {WARMUP_RUNS} warm-up, interleaved; figures are medians (min-max). TSC rate: \
         {tsc_source}."
    );
    println!(
        "QEMU: {qemu_version}, `-M q35`, `virtio-blk-pci,disable-legacy=on`, default \
         cache=writeback (host page cache, as zvmm's pread/pwrite).\n"
    );
}

fn print_results(cases: &[Case]) {
    let mut header = vec!["vmm".to_string(), "runs".to_string()];
    header.extend(
        FIGURES
            .iter()
            .map(|(name, unit, _)| format!("{name} {unit}")),
    );
    let mut rows: Vec<Vec<String>> = cases
        .iter()
        .map(|case| {
            let mut row = vec![case.vmm.label().to_string(), case.samples.len().to_string()];
            row.extend(FIGURES.iter().map(|(_, _, figure)| {
                let s = case.summary(*figure);
                format!("{:.0} ({:.0}-{:.0})", s.median, s.min, s.max)
            }));
            row
        })
        .collect();
    let ratios = ratios(cases);
    let mut ratio_row = vec!["zvmm/qemu".to_string(), String::new()];
    ratio_row.extend(ratios.iter().map(|r| format!("{r:.2}x")));
    rows.push(ratio_row);
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    println!("{}", markdown_table(&header, &rows));
    let verdicts: Vec<String> = FIGURES
        .iter()
        .zip(&ratios)
        .map(|((name, _, _), ratio)| {
            let met = if *ratio >= TARGET_RATIO {
                "met"
            } else {
                "NOT met"
            };
            format!("{name} {ratio:.2}x {met}")
        })
        .collect();
    println!(
        "Target (informational): zvmm >= {TARGET_RATIO}x QEMU on each: {}.",
        verdicts.join("; ")
    );
}

/// zvmm's median over QEMU's, per figure.
fn ratios(cases: &[Case]) -> Vec<f64> {
    let find = |vmm| cases.iter().find(|c| c.vmm == vmm);
    FIGURES
        .iter()
        .map(
            |(_, _, figure)| match (find(Vmm::Zvmm), find(Vmm::QemuQ35)) {
                (Some(z), Some(q)) => z.summary(*figure).median / q.summary(*figure).median,
                _ => f64::NAN,
            },
        )
        .collect()
}

/// The last 20 lines of `text`.
fn tail(text: &str) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(20)..].join("\n")
}
