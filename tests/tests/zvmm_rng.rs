//! The entropy device end to end: every VM has one, as the last PCI
//! function (after a vsock device), fed from `/dev/urandom` unless `--rng
//! src=` says otherwise; unusable sources and options are refused with
//! one line; `vm.info` and `vm.counters` report it.

use std::path::Path;
use std::time::Duration;

use zvmm_tests::api::get;
use zvmm_tests::probe::{probe_elf, Flavour};
use zvmm_tests::tiny::{write_tiny_elf, TinyEnd, TINY_LINE};
use zvmm_tests::zvmm::{assert_rejected, run_zvmm, scratch_dir, spawn_zvmm};

const LIMIT: Duration = Duration::from_secs(60);

/// The virtio-pci device IDs of an entropy and a socket device (0x1040 +
/// the virtio device type).
const RNG_PCI_ID: &str = "device=0x1044";
const VSOCK_PCI_ID: &str = "device=0x1053";

fn tiny_args(kernel: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        kernel.display().to_string(),
        "--memory".into(),
        "64M".into(),
        "--serial".into(),
        "stdio".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn bad_sources_and_options_are_refused_with_one_line() {
    let dir = scratch_dir("rng-bad");
    let kernel = write_tiny_elf(&dir, TinyEnd::PowerOff);
    let missing = dir.join("missing");
    let src = format!("src={}", missing.display());
    let run = run_zvmm(tiny_args(&kernel, &["--rng", &src]), LIMIT);
    assert_rejected(&run, 1, &["--rng src=", "missing", "no such file"]);
    let folder = format!("src={}", dir.display());
    let run = run_zvmm(tiny_args(&kernel, &["--rng", &folder]), LIMIT);
    assert_rejected(&run, 1, &["is a directory", "/dev/urandom"]);
    let cases: [(&str, &[&str]); 3] = [
        ("src=", &["'src'", "expected a path"]),
        ("iommu=on", &["IOMMU"]),
        ("source=/dev/urandom", &["unknown key 'source'"]),
    ];
    for (value, needles) in cases {
        let run = run_zvmm(tiny_args(&kernel, &["--rng", value]), LIMIT);
        assert_rejected(&run, 2, needles);
    }
}

#[test]
fn the_rng_is_the_last_pci_function_after_vsock() {
    let dir = scratch_dir("rng-slots");
    let probe = probe_elf(Flavour::Pvh);
    let socket = dir.join("v.sock");
    let vsock = format!("cid=3,socket={}", socket.display());
    let run = run_zvmm(
        [
            "--kernel",
            &probe.display().to_string(),
            "--memory",
            "128M",
            "--serial",
            "stdio",
            "--vsock",
            &vsock,
            "--timeout",
            "50",
        ],
        LIMIT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    let functions: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("probe: pci slot=") && l.contains("vendor="))
        .collect();
    let last = functions.last().copied().unwrap_or_default();
    assert!(last.contains(RNG_PCI_ID), "{functions:#?}");
    let before = functions[functions.len().saturating_sub(2)];
    assert!(before.contains(VSOCK_PCI_ID), "{functions:#?}");
    assert!(!socket.exists(), "socket left after power-off");
}

#[test]
fn vm_info_and_counters_report_the_rng() {
    let dir = scratch_dir("rng-info");
    let kernel = write_tiny_elf(&dir, TinyEnd::Idle);
    let seed = dir.join("seed.bin");
    std::fs::write(&seed, [7u8; 4096]).unwrap();
    let api = dir.join("api.sock");
    let api_option = format!("path={}", api.display());
    let src = format!("src={}", seed.display());
    let vm = spawn_zvmm(tiny_args(
        &kernel,
        &["--api-socket", &api_option, "--rng", &src],
    ));
    assert!(vm.stdout.wait_for(TINY_LINE, LIMIT), "{}", vm.stderr.text());
    let info = get(&api, "vm.info").json();
    assert_eq!(
        info["config"]["rng"]["src"],
        seed.display().to_string(),
        "{info}"
    );
    assert_eq!(info["config"]["rng"]["iommu"], false, "{info}");
    let counters = get(&api, "vm.counters").json();
    for key in ["requests", "bytes", "invalid_requests", "source_errors"] {
        assert!(counters["__rng"][key].is_u64(), "{key} in {counters}");
    }
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.finish(LIMIT).code(), 143);
}

#[test]
fn the_default_source_is_urandom() {
    let dir = scratch_dir("rng-default");
    let kernel = write_tiny_elf(&dir, TinyEnd::Idle);
    let api = dir.join("api.sock");
    let api_option = format!("path={}", api.display());
    let vm = spawn_zvmm(tiny_args(&kernel, &["--api-socket", &api_option]));
    assert!(vm.stdout.wait_for(TINY_LINE, LIMIT), "{}", vm.stderr.text());
    let info = get(&api, "vm.info").json();
    assert_eq!(info["config"]["rng"]["src"], "/dev/urandom", "{info}");
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.finish(LIMIT).code(), 143);
}
