//! Runs the PVH probe's virtio-fs (FUSE) client under QEMU, the reference
//! VMM (KVM only): q35 with `vhost-user-fs-pci` on a virtiofsd the test
//! starts on a directory of its own, guest RAM in a shared memfd. The
//! probe lists the directory, reads and hashes a host file, creates one
//! with a pattern and fsyncs it, makes a directory, moves a host file into
//! it, removes a file and a directory (`zvmm_tests::fs::Share`); the report
//! and the files on the host are checked. This proves the probe, so the
//! same checks under zvmm (`zvmm_fs_probe.rs`) judge zvmm's virtio-fs.
//!
//! Needs `qemu-system-x86` and virtiofsd (`cargo install virtiofsd
//! --locked`; a missing one fails the test saying so).

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use zvmm_tests::disk::line;
use zvmm_tests::fs::{plan, processes_naming, Share, Virtiofsd};
use zvmm_tests::probe::{probe_elf, Fields, Flavour, ProbeReport};
use zvmm_tests::qemu::{self, QEMU};
use zvmm_tests::zvmm::{scratch_dir, Running};

/// Hard limit for one QEMU run (q35's SeaBIOS takes a few seconds here).
const LIMIT: Duration = Duration::from_secs(90);
/// How long virtiofsd may take to exit once QEMU has gone.
const DAEMON_EXIT: Duration = Duration::from_secs(10);

/// QEMU q35 arguments: the probe with `cmdline`, guest RAM in a shared
/// memfd, one `vhost-user-fs-pci` on `socket`.
fn qemu_args(socket: &Path, cmdline: &str) -> Vec<OsString> {
    let kernel = probe_elf(Flavour::Pvh);
    let mut args = qemu::boot_args("q35", &kernel, None, cmdline);
    args.extend(
        [
            "-object".to_string(),
            "memory-backend-memfd,id=mem,size=256M,share=on".into(),
            "-machine".into(),
            "memory-backend=mem".into(),
            "-chardev".into(),
            format!("socket,id=char0,path={}", socket.display()),
            "-device".into(),
            format!(
                "vhost-user-fs-pci,chardev=char0,tag={},queue-size=1024",
                plan::TAG
            ),
        ]
        .map(OsString::from),
    );
    args
}

/// Boots QEMU on a fresh virtiofsd serving `share` with `cmdline`; checks
/// that QEMU exits 0 and that virtiofsd then exits by itself, leaving no
/// process behind. Returns the report and the context for messages.
fn run_qemu(scratch: &Path, share: &Path, cmdline: &str) -> (ProbeReport, String) {
    let socket = scratch.join("vfs.sock");
    let daemon = Virtiofsd::start(&socket, share).unwrap_or_else(|e| panic!("{e}"));
    let mut command = std::process::Command::new(QEMU);
    command.args(qemu_args(&socket, cmdline));
    let run = Running::spawn(command).finish(LIMIT);
    let (status, daemon_log) = daemon.wait(DAEMON_EXIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("{run:#?}\nvirtiofsd ({status:?}): {daemon_log}");
    assert_eq!(report.panic_message(), None, "{context}");
    assert!(report.finished(), "no 'probe: done': {context}");
    assert!(run.status.is_some_and(|s| s.success()), "{context}");
    assert!(status.is_some(), "virtiofsd still running: {context}");
    let left = processes_naming(&scratch.display().to_string());
    assert!(left.is_empty(), "left running: {left:?}: {context}");
    (report, context)
}

#[test]
fn virtio_fs_checks_under_qemu_q35() {
    let scratch = scratch_dir("probe-fs-qemu");
    let share = Share::prepare(&scratch.join("share")).unwrap_or_else(|e| panic!("{e}"));
    let (report, context) = run_qemu(&scratch, share.dir(), &share.cmdline());
    share.check(&report, &context);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The benchmark's lines with tiny sizes: every phase answered without
/// error, the counts as asked, the file gone afterwards.
#[test]
fn virtio_fs_bench_smoke_under_qemu_q35() {
    let scratch = scratch_dir("probe-fs-qemu-bench");
    let share = scratch.join("share");
    std::fs::create_dir(&share).unwrap();
    let cmdline = "console=ttyS0 probe.fs.bench=1 probe.fs.getattrs=50 probe.fs.chunk=64";
    let (report, context) = run_qemu(&scratch, &share, cmdline);
    let bench = |what: &str| {
        let rest = report
            .value(&format!("fs bench {what} "))
            .unwrap_or_else(|| panic!("no 'fs bench {what}': {context}"));
        Fields::parse(rest)
    };
    let setup = line(&report, "fs bench", "file=", &context);
    assert_eq!(setup.num("bytes"), Some(1 << 20), "{context}");
    assert_eq!(setup.num("chunk"), Some(64 * 1024), "{context}");
    let getattr = bench("getattr");
    assert_eq!(getattr.num("ops"), Some(50), "{context}");
    for phase in ["write", "read"] {
        let line = bench(phase);
        assert_eq!(line.get("errno"), Some("0"), "{phase}: {context}");
        assert_eq!(line.num("bytes"), Some(1 << 20), "{phase}: {context}");
        assert_eq!(line.num("requests"), Some(16), "{phase}: {context}");
        assert!(line.num("tsc_cycles") > Some(0), "{phase}: {context}");
        assert!(
            report.has(&format!("fs bench phase={phase} start")),
            "{context}"
        );
    }
    for line in ["getattr", "fsync", "unlink"] {
        assert_eq!(bench(line).get("errno"), Some("0"), "{line}: {context}");
    }
    zvmm_tests::fs::check_session_end(&report, 1, &context);
    assert_eq!(std::fs::read_dir(&share).unwrap().count(), 0, "{context}");
    let _ = std::fs::remove_dir_all(&scratch);
}

/// A backend that dies mid-session costs the probe `probe.fs.wait`, not a
/// hang: the request in flight times out, the device is left alone
/// (nothing more is sent), and the probe still powers off.
#[test]
fn dead_backend_is_a_timeout_not_a_hang() {
    let scratch = scratch_dir("probe-fs-qemu-dead");
    let share = scratch.join("share");
    std::fs::create_dir(&share).unwrap();
    let socket = scratch.join("vfs.sock");
    let daemon = Virtiofsd::start(&socket, &share).unwrap_or_else(|e| panic!("{e}"));
    let cmdline = "console=ttyS0 probe.fs.bench=1 probe.fs.getattrs=1000000 probe.fs.wait=1000";
    let mut command = std::process::Command::new(QEMU);
    command.args(qemu_args(&socket, cmdline));
    let vm = Running::spawn(command);
    let started = vm
        .stdout
        .wait_for("fs bench phase=getattr start", Duration::from_secs(60));
    drop(daemon);
    let run = vm.finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("{run:#?}");
    assert!(started, "the getattr phase never started: {context}");
    assert!(
        report
            .values("fs slot=")
            .iter()
            .any(|l| l.ends_with("broken reason=\"request timeout\"")),
        "{context}"
    );
    let getattr = report.value("fs bench getattr ").unwrap_or_default();
    assert!(getattr.ends_with("errno=timeout"), "{context}");
    for skipped in [
        "fs op=destroy errno=skipped",
        "fs bench unlink errno=skipped",
    ] {
        assert!(report.has(skipped), "no '{skipped}': {context}");
    }
    assert!(report.finished(), "no 'probe: done': {context}");
    assert!(run.status.is_some(), "QEMU hung: {context}");
    let _ = std::fs::remove_dir_all(&scratch);
}
