//! The probe in hostile mode (`probe.mode=hostile`,
//! `resources/probe/src/hostile.rs`) against every device zvmm has: a raw
//! disk, a qcow2 disk over a raw backing file, virtio-net on a tap in a
//! network namespace of the test's own, a virtio-fs share (zvmm runs
//! virtiofsd), vsock and rng. The probe attacks each device in turn
//! (descriptor loops, out-of-range and MMIO addresses, bogus queue set-up,
//! feature renegotiation, random register writes, ...) and checks the
//! device works again after a reset and every other device still works.
//!
//! Asserted here: zvmm neither crashed nor hung (the guest powers off
//! cleanly at the end, exit 0, no signal, no panic on stderr), every attack
//! ended in an outcome accepted for it ([`accepted`]), every check passed,
//! and the host files are unchanged (both images, the backing file, the
//! shared directory: the hostile probe never writes anything valid).
//! `hostile_probe_under_qemu` runs the same probe under QEMU for
//! comparison, asserting only that QEMU's run reached the summary.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zvmm_tests::disk::{make_image, pattern, FileState};
use zvmm_tests::fs::virtiofsd_bin;
use zvmm_tests::image_tools::qemu_img;
use zvmm_tests::net::{NetNs, GUEST_MAC, HOST_IP};
use zvmm_tests::probe::{probe_elf, Fields, Flavour, ProbeReport};
use zvmm_tests::qemu;
use zvmm_tests::zvmm::{scratch_dir, zvmm_bin, Finished, Running};

/// Hard limit for the VM run (the test kills zvmm past it). The probe
/// needs ~10 s on an idle KVM-PVM host.
const LIMIT: Duration = Duration::from_secs(280);
/// zvmm's own limit (`--timeout`), below [`LIMIT`].
const VM_TIMEOUT: &str = "240";
/// The tap inside the namespace.
const TAP: &str = "zhtap0";
/// Disk sizes (bytes).
const DISK_BYTES: u64 = 8 << 20;
/// Every device the run must have attacked (`device=` names, with count).
const DEVICES: &[(&str, usize)] = &[("blk", 2), ("net", 1), ("fs", 1), ("vsock", 1), ("rng", 1)];

/// The outcomes an attack may end in. Ring attacks must end in
/// needs-reset or an error answer (transmit-only devices can only drop:
/// `consumed`); a few deformations a device may legitimately serve
/// (lenient parsing of bounded indirect tables, overlapping buffers, a
/// used ring in guest RAM the guest calls ROM); bogus set-ups are refused
/// or need a reset; kicks and writes the device must ignore leave it
/// working (`ignored`).
fn accepted(attack: &str) -> &'static [&'static str] {
    const BROKEN: &[&str] = &["needs_reset", "error", "consumed"];
    const LENIENT: &[&str] = &["needs_reset", "error", "consumed", "served"];
    const SETUP: &[&str] = &["needs_reset", "refused"];
    const QUIET: &[&str] = &["ignored", "needs_reset"];
    match attack {
        "indirect_loop"
        | "indirect_with_next"
        | "indirect_longer_than_queue"
        | "buffers_overlap"
        | "rings_overlap"
        | "used_ring_in_rom" => LENIENT,
        a if a.starts_with("queue_size_")
            || a.starts_with("rings_")
            || a.starts_with("used_ring_") =>
        {
            SETUP
        }
        "features_not_offered" | "features_without_version_1" | "driver_ok_without_features_ok" => {
            &["refused", "needs_reset"]
        }
        "kick_before_driver_ok"
        | "kick_missing_queue"
        | "features_after_driver_ok"
        | "features_ok_cleared"
        | "features_after_features_ok" => QUIET,
        a if a.starts_with("fuzz_") => &["ignored", "needs_reset", "refused"],
        _ => BROKEN,
    }
}

/// The host files the guest can reach, to compare before and after.
struct Files {
    raw: PathBuf,
    overlay: PathBuf,
    base: PathBuf,
    share: PathBuf,
}

impl Files {
    fn prepare(dir: &Path) -> Files {
        let files = Files {
            raw: dir.join("raw.img"),
            overlay: dir.join("overlay.qcow2"),
            base: dir.join("base.raw"),
            share: dir.join("share"),
        };
        make_image(&files.raw, DISK_BYTES, &[(0, pattern(0, 64))]);
        make_image(&files.base, DISK_BYTES, &[(0, pattern(7, 64))]);
        qemu_img([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            &files.overlay.display().to_string(),
        ]);
        std::fs::create_dir(&files.share).unwrap();
        std::fs::write(
            files.share.join("hello.txt"),
            b"hostile guests read, never write\n",
        )
        .unwrap();
        std::fs::create_dir(files.share.join("sub")).unwrap();
        files
    }

    /// Content hashes (and sizes) of every file, the share's entries too.
    fn state(&self) -> Vec<(String, Option<u64>, u64)> {
        let mut paths = vec![self.raw.clone(), self.overlay.clone(), self.base.clone()];
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&self.share)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        paths.push(self.share.clone());
        paths.extend(entries);
        paths
            .iter()
            .map(|p| {
                let state = FileState::of(p).unwrap_or_else(|| panic!("{} vanished", p.display()));
                (p.display().to_string(), state.fnv1a64, state.len)
            })
            .collect()
    }
}

/// The zvmm arguments: the PVH probe in hostile mode with every device.
fn zvmm_args(dir: &Path, files: &Files) -> Vec<String> {
    let virtiofsd = virtiofsd_bin().unwrap_or_else(|e| panic!("{e}"));
    let probe = probe_elf(Flavour::Pvh);
    let s = |p: &Path| p.display().to_string();
    vec![
        "--kernel".into(),
        s(&probe),
        "--memory".into(),
        "256M".into(),
        "--timeout".into(),
        VM_TIMEOUT.into(),
        "--disk".into(),
        format!("path={}", s(&files.raw)),
        format!("path={}", s(&files.overlay)),
        "--net".into(),
        format!("tap={TAP},mac={GUEST_MAC}"),
        "--fs".into(),
        format!("tag=hostile,path={}", s(&files.share)),
        "--virtiofsd".into(),
        s(&virtiofsd),
        "--vsock".into(),
        format!("cid=3,socket={}", s(&dir.join("vsock.sock"))),
        "--cmdline".into(),
        "console=ttyS0 probe.mode=hostile".into(),
    ]
}

/// The `hostile ...` lines as fields.
fn hostile_lines(report: &ProbeReport) -> Vec<Fields> {
    report
        .values("hostile ")
        .into_iter()
        .map(Fields::parse)
        .collect()
}

/// Everything wrong with the report: unaccepted outcomes, failed checks,
/// devices not attacked, a missing summary.
fn problems(report: &ProbeReport) -> Vec<String> {
    let lines = hostile_lines(report);
    let mut problems = Vec::new();
    let mut attacked: Vec<(String, String)> = Vec::new();
    for line in &lines {
        let device = line.get("device").unwrap_or("?").to_string();
        let slot = line.get("slot").unwrap_or("?").to_string();
        let result = line.get("result").unwrap_or("?");
        if let Some(attack) = line.get("attack") {
            if device != "legacy" && device != "pci" {
                attacked.push((device.clone(), slot.clone()));
            }
            let ok = if device == "legacy" || device == "pci" {
                result == "ignored"
            } else {
                accepted(attack).contains(&result)
            };
            if !ok {
                problems.push(format!("{device} slot {slot}: {attack} ended {result}"));
            }
        } else if let Some(check) = line.get("check") {
            if result != "ok" {
                let after = line.get("after").unwrap_or("-");
                problems.push(format!(
                    "{device} slot {slot}: check {check} after {after}: {result}"
                ));
            }
        }
    }
    let devices: BTreeSet<(String, String)> = attacked.into_iter().collect();
    for &(kind, want) in DEVICES {
        let got = devices.iter().filter(|(d, _)| d == kind).count();
        if got != want {
            problems.push(format!("{got} {kind} device(s) attacked, expected {want}"));
        }
    }
    match report.value("hostile summary ").map(Fields::parse) {
        Some(summary) => {
            for key in ["dead", "check_failures"] {
                if summary.get(key) != Some("0") {
                    problems.push(format!("summary {key}={:?}", summary.get(key)));
                }
            }
        }
        None => problems.push("no summary".into()),
    }
    problems
}

/// zvmm's exit: by itself, status 0, no panic.
fn assert_clean_exit(run: &Finished, context: &str) {
    use std::os::unix::process::ExitStatusExt;
    let status = run
        .status
        .unwrap_or_else(|| panic!("zvmm hung (killed at the limit): {context}"));
    assert_eq!(status.signal(), None, "zvmm died by a signal: {context}");
    assert!(!run.stderr.contains("panicked"), "zvmm panicked: {context}");
    assert_eq!(status.code(), Some(0), "zvmm exit status: {context}");
}

#[test]
fn hostile_probe_does_not_break_zvmm_or_its_files() {
    let dir = scratch_dir("hostile");
    let files = Files::prepare(&dir);
    let before = files.state();
    let mut ns = NetNs::new().unwrap_or_else(|e| panic!("{e}"));
    ns.add_tap(TAP, &format!("{HOST_IP}/24"))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir(dir.join("run")).unwrap();
    let mut command = ns.command(zvmm_bin());
    command
        .env("XDG_RUNTIME_DIR", dir.join("run"))
        .args(zvmm_args(&dir, &files));
    let run = Running::spawn(command).finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("{run:#?}");
    assert_clean_exit(&run, &context);
    assert_eq!(report.panic_message(), None, "{context}");
    assert!(report.finished(), "no 'probe: done': {context}");
    eprintln!(
        "zvmm: hostile summary {} in {:?}",
        report.value("hostile summary ").unwrap_or("missing"),
        run.elapsed
    );
    let problems = problems(&report);
    assert!(problems.is_empty(), "{problems:#?}\n{context}");
    assert_eq!(files.state(), before, "host files changed: {context}");
}

/// The ring attacks on virtio-fs (`probe.hostile.fs_rings=on`) reach
/// virtiofsd, which exits on a malformed chain: zvmm must end the VM the
/// way it ends it for any daemon that dies (status 7, the daemon's exit
/// named), not by a seccomp trap (the watcher thread reaps the daemon) or
/// a panic, remove its runtime directory and leave the share unchanged.
#[test]
fn hostile_fs_ring_attacks_end_the_vm_cleanly() {
    let dir = scratch_dir("hostile-fs-rings");
    let share = dir.join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("kept.txt"), b"untouched\n").unwrap();
    let before = FileState::of(&share.join("kept.txt"));
    let run_dir = dir.join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let virtiofsd = virtiofsd_bin().unwrap_or_else(|e| panic!("{e}"));
    let mut command = std::process::Command::new(zvmm_bin());
    command
        .env("XDG_RUNTIME_DIR", &run_dir)
        .arg("--kernel")
        .arg(probe_elf(Flavour::Pvh))
        .args(["--memory", "256M", "--timeout", VM_TIMEOUT, "--fs"])
        .arg(format!("tag=hostile,path={}", share.display()))
        .arg("--virtiofsd")
        .arg(virtiofsd)
        .args([
            "--cmdline",
            "console=ttyS0 probe.mode=hostile probe.hostile.only=fs probe.hostile.fs_rings=on",
        ]);
    let run = Running::spawn(command).finish(LIMIT);
    let context = format!("{run:#?}");
    use std::os::unix::process::ExitStatusExt;
    let status = run
        .status
        .unwrap_or_else(|| panic!("zvmm hung (killed at the limit): {context}"));
    assert_eq!(status.signal(), None, "zvmm died by a signal: {context}");
    assert!(!run.stderr.contains("panicked"), "zvmm panicked: {context}");
    assert!(!run.stderr.contains("seccomp"), "seccomp trap: {context}");
    assert_eq!(status.code(), Some(7), "{context}");
    assert!(run.stderr.contains("virtiofsd"), "{context}");
    let left: Vec<_> = std::fs::read_dir(&run_dir).unwrap().collect();
    assert!(
        left.is_empty(),
        "runtime directory left: {left:?}: {context}"
    );
    assert_eq!(FileState::of(&share.join("kept.txt")), before, "{context}");
}

/// The same probe under QEMU q35 (virtio-blk attacked, virtio-rng checked):
/// informative, QEMU's answers are printed, not asserted; only that the run
/// got to the summary (set-up installs QEMU, so a missing one fails). The
/// rng is not attacked there: QEMU's virtio-rng writes its entropy wherever
/// the descriptor points, ECAM and the LAPIC included, which ends the guest.
#[test]
fn hostile_probe_under_qemu() {
    let dir = scratch_dir("hostile-qemu");
    let disk = dir.join("disk.img");
    make_image(&disk, DISK_BYTES, &[(0, pattern(0, 64))]);
    let probe = probe_elf(Flavour::Pvh);
    let mut args = qemu::boot_args(
        "q35",
        &probe,
        None,
        "console=ttyS0 probe.mode=hostile probe.hostile.only=blk",
    );
    for arg in [
        "-drive".to_string(),
        format!("file={},format=raw,if=none,id=d0", disk.display()),
        "-device".into(),
        "virtio-blk-pci,drive=d0,disable-legacy=on".into(),
        "-device".into(),
        "virtio-rng-pci,disable-legacy=on".into(),
    ] {
        args.push(arg.into());
    }
    let run = qemu::run(&args, LIMIT).unwrap_or_else(|e| panic!("{e}"));
    let report = ProbeReport::parse(&run.stdout);
    let summary = report.value("hostile summary ");
    eprintln!("QEMU: {}", summary.unwrap_or("no summary"));
    for line in report.values("hostile device=") {
        eprintln!("QEMU: hostile device={line}");
    }
    assert!(
        summary.is_some(),
        "QEMU run did not get to the summary: {run:#?}"
    );
}
