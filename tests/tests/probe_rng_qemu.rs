//! Runs the PVH probe's virtio-rng driver under QEMU, the reference VMM
//! (KVM only): q35 with a modern `virtio-rng-pci` on `-object
//! rng-random,filename=FILE` gives the file's bytes in order, as zvmm's
//! `--rng src=FILE` does (`zvmm_rng_probe.rs`), and on `/dev/urandom`
//! two reads that differ. QEMU answers nothing once a file source is read
//! through, so the reads stay within the file here.
//!
//! Needs `qemu-system-x86` (a missing one fails the test saying so).

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use zvmm_tests::probe::{probe_elf, Flavour, ProbeReport};
use zvmm_tests::qemu::{self, QemuRun};
use zvmm_tests::rng::{check_file_reads, check_random_reads, rng_reads, source_file};
use zvmm_tests::zvmm::scratch_dir;

/// Hard limit for one QEMU run: q35's SeaBIOS takes a few seconds idle,
/// but two runs at once took 89 s on a busy host.
const LIMIT: Duration = Duration::from_secs(240);

fn run_qemu(source: &Path, cmdline: &str) -> (ProbeReport, QemuRun) {
    let kernel = probe_elf(Flavour::Pvh);
    let mut args = qemu::boot_args("q35", &kernel, None, cmdline);
    args.extend(
        [
            "-object".to_string(),
            format!("rng-random,id=rng0,filename={}", source.display()),
            "-device".into(),
            "virtio-rng-pci,rng=rng0,disable-legacy=on".into(),
        ]
        .map(OsString::from),
    );
    let run = qemu::run(&args, LIMIT).unwrap_or_else(|e| panic!("{e}"));
    let report = ProbeReport::parse(&run.stdout);
    assert_eq!(report.panic_message(), None, "{run:#?}");
    assert!(report.finished(), "no 'probe: done': {run:#?}");
    assert!(run.exited_cleanly(), "{run:#?}");
    assert!(report.has("rng devices=1"), "{run:#?}");
    (report, run)
}

#[test]
fn a_file_source_reads_back_as_the_file_under_qemu() {
    let dir = scratch_dir("probe-rng-qemu-file");
    let (file, bytes) = source_file(&dir, 40_000);
    let cmdline = "console=ttyS0 probe.rng.bytes=12000 probe.rng.reads=3";
    let (report, run) = run_qemu(&file, cmdline);
    let reads = rng_reads(&report);
    assert_eq!(reads.len(), 3, "{run:#?}");
    check_file_reads(&reads, &bytes, 12_000, &format!("{run:#?}"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn urandom_gives_reads_that_differ_under_qemu() {
    let cmdline = "console=ttyS0 probe.rng.bytes=64 probe.rng.reads=2";
    let (report, run) = run_qemu(Path::new("/dev/urandom"), cmdline);
    check_random_reads(&rng_reads(&report), 64, &format!("{run:#?}"));
}
