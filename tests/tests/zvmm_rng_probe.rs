//! The probe's virtio-rng driver under zvmm: with `--rng src=FILE` every
//! read is the file's next bytes, in order, up to its end (a request then
//! comes back empty); with the default `/dev/urandom` two reads differ and
//! are not all zero. `probe_rng_qemu.rs` runs the same driver under QEMU.

use std::path::Path;
use std::time::Duration;

use zvmm_tests::probe::{probe_elf, Flavour, ProbeReport};
use zvmm_tests::rng::{check_file_reads, check_random_reads, rng_reads, source_file};
use zvmm_tests::zvmm::{run_zvmm, scratch_dir, Finished};

const LIMIT: Duration = Duration::from_secs(180);

fn run_probe(cmdline: &str, extra: &[&str]) -> (ProbeReport, Finished) {
    let probe = probe_elf(Flavour::Pvh);
    let mut args: Vec<String> = [
        "--kernel",
        &probe.display().to_string(),
        "--memory",
        "128M",
        "--serial",
        "stdio",
        "--timeout",
        "170",
        "--cmdline",
        cmdline,
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    let run = run_zvmm(args, LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(report.panic_message(), None, "{run:#?}");
    assert!(report.has("rng devices=1"), "{run:#?}");
    (report, run)
}

fn src_option(path: &Path) -> String {
    format!("src={}", path.display())
}

#[test]
fn a_file_source_reads_back_as_the_file_up_to_its_end() {
    let dir = scratch_dir("rng-probe-file");
    let (file, bytes) = source_file(&dir, 10_000);
    let cmdline = "console=ttyS0 probe.rng.bytes=4096 probe.rng.reads=3";
    let (report, run) = run_probe(cmdline, &["--rng", &src_option(&file)]);
    let reads = rng_reads(&report);
    assert_eq!(reads.len(), 3, "{run:#?}");
    // 4096, 4096, then the last 1808 bytes and an empty answer.
    check_file_reads(&reads, &bytes, 4096, &format!("{run:#?}"));
    assert!(reads[2].ended, "{run:#?}");
    // Requests alternate between one buffer and two chained halves.
    assert!(reads.iter().all(|r| r.requests >= 1), "{run:#?}");
}

#[test]
fn the_default_source_gives_reads_that_differ() {
    let (report, run) = run_probe("console=ttyS0 probe.rng.bytes=64 probe.rng.reads=2", &[]);
    check_random_reads(&rng_reads(&report), 64, &format!("{run:#?}"));
}

#[test]
fn a_read_spread_over_many_requests_keeps_the_file_order() {
    let dir = scratch_dir("rng-probe-many");
    let (file, bytes) = source_file(&dir, 40_000);
    // 3 reads of 12,000 bytes: 3 requests each (4096 + 4096 + 3808),
    // alternating layouts, all within the file.
    let cmdline = "console=ttyS0 probe.rng.bytes=12000 probe.rng.reads=3";
    let (report, run) = run_probe(cmdline, &["--rng", &src_option(&file)]);
    let reads = rng_reads(&report);
    assert_eq!(reads.len(), 3, "{run:#?}");
    check_file_reads(&reads, &bytes, 12_000, &format!("{run:#?}"));
    assert!(reads.iter().all(|r| r.requests == 3), "{run:#?}");
}
