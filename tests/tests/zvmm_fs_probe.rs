//! zvmm's virtio-fs end to end: the probe guest runs the FUSE checks of
//! `zvmm_tests::fs::Share` (list, read and hash a host file, create one
//! with a pattern and fsync it, make a directory, move a host file into
//! it, remove a file and a directory) under `zvmm --fs tag=T,path=DIR`
//! (zvmm starts and stops virtiofsd) and under `zvmm --fs tag=T,socket=S`
//! (the test starts virtiofsd). `probe_fs_qemu.rs` runs the same checks
//! under QEMU, which proves the probe, so a failure here is zvmm's.
//!
//! After each run nothing may be left: no process naming the test's
//! directory or socket, nothing listening on the socket, and no runtime
//! directory (zvmm's are made under `$XDG_RUNTIME_DIR`, which the test
//! points into its own scratch directory, or else `/run/zvmm` or `/tmp`).
//!
//! Needs virtiofsd (`cargo install virtiofsd --locked`; a missing one
//! fails the test saying so).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use zvmm_tests::fs::{
    check_session_end, listing, plan, processes_naming, socket_listening, virtiofsd_bin, Share,
    Virtiofsd,
};
use zvmm_tests::probe::{probe_elf, Flavour, ProbeReport};
use zvmm_tests::zvmm::{scratch_dir, zvmm_bin, Finished, Running};

/// Hard limit for one VM run (the test kills zvmm past it).
const LIMIT: Duration = Duration::from_secs(60);
/// zvmm's own limit (`--timeout`), below [`LIMIT`].
const VM_TIMEOUT: &str = "50";
/// How long a test-started virtiofsd may take to exit once zvmm is gone.
const DAEMON_EXIT: Duration = Duration::from_secs(10);

/// A scratch directory with the prepared share and a runtime base.
struct Scratch {
    root: PathBuf,
    share: Share,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let root = scratch_dir(name);
        std::fs::create_dir(root.join("run")).unwrap();
        let share = Share::prepare(&root.join("share")).unwrap_or_else(|e| panic!("{e}"));
        Scratch { root, share }
    }

    fn runtime_base(&self) -> PathBuf {
        self.root.join("run")
    }

    /// zvmm with the probe, the share's command line and `fs`.
    fn zvmm(&self, fs: &str) -> Command {
        self.zvmm_with(fs, &self.share.cmdline())
    }

    /// zvmm with the probe, `cmdline` and `fs`.
    fn zvmm_with(&self, fs: &str, cmdline: &str) -> Command {
        let kernel = probe_elf(Flavour::Pvh);
        let virtiofsd = virtiofsd_bin().unwrap_or_else(|e| panic!("{e}"));
        let mut command = Command::new(zvmm_bin());
        command
            .env("XDG_RUNTIME_DIR", self.runtime_base())
            .arg("--kernel")
            .arg(kernel)
            .args(["--memory", "256M", "--timeout", VM_TIMEOUT])
            .args(["--fs", fs])
            .arg("--virtiofsd")
            .arg(virtiofsd)
            .args(["--cmdline", cmdline]);
        command
    }

    /// Nothing of the run is left: processes, listening sockets, runtime
    /// directories (of zvmm `pid`).
    fn assert_nothing_left(&self, pid: u32, socket: Option<&Path>, context: &str) {
        let left = processes_naming(&self.root.display().to_string());
        assert!(left.is_empty(), "left running: {left:?}: {context}");
        if let Some(socket) = socket {
            assert!(!socket_listening(socket), "{socket:?} listens: {context}");
        }
        let runtime: Vec<_> = std::fs::read_dir(self.runtime_base())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(runtime.is_empty(), "runtime left: {runtime:?}: {context}");
        let prefix = format!("zvmm-{pid}-");
        for base in ["/run/zvmm", "/tmp"] {
            let stray: Vec<_> = std::fs::read_dir(base)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect();
            assert!(stray.is_empty(), "runtime left: {stray:?}: {context}");
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Runs `command` to the end: its pid, what it printed, the report.
fn run(command: Command) -> (u32, Finished, ProbeReport) {
    let vm = Running::spawn(command);
    let pid = vm.pid();
    let run = vm.finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    (pid, run, report)
}

fn assert_probe_done(run: &Finished, report: &ProbeReport, context: &str) {
    assert_eq!(report.panic_message(), None, "{context}");
    assert!(report.finished(), "no 'probe: done': {context}");
    assert_eq!(run.code(), 0, "{context}");
}

#[test]
fn virtio_fs_with_zvmm_started_virtiofsd() {
    let scratch = Scratch::new("zvmm-fs-path");
    let fs = format!("tag={},path={}", plan::TAG, scratch.share.dir().display());
    let (pid, run, report) = run(scratch.zvmm(&fs));
    let context = format!("zvmm --fs {fs}: {run:#?}");
    assert_probe_done(&run, &report, &context);
    scratch.share.check(&report, &context);
    scratch.assert_nothing_left(pid, None, &context);
}

#[test]
fn virtio_fs_with_a_running_virtiofsd() {
    let scratch = Scratch::new("zvmm-fs-socket");
    let socket = scratch.root.join("vfs.sock");
    let daemon = Virtiofsd::start(&socket, scratch.share.dir()).unwrap_or_else(|e| panic!("{e}"));
    let fs = format!("tag={},socket={}", plan::TAG, socket.display());
    let (pid, run, report) = run(scratch.zvmm(&fs));
    let (status, daemon_log) = daemon.wait(DAEMON_EXIT);
    let context = format!("zvmm --fs {fs}: {run:#?}\nvirtiofsd ({status:?}): {daemon_log}");
    assert_probe_done(&run, &report, &context);
    scratch.share.check(&report, &context);
    assert!(status.is_some(), "virtiofsd kept running: {context}");
    scratch.assert_nothing_left(pid, Some(&socket), &context);
}

/// `--fs DIR`: the root share, tag `vroot`; the probe lists it (a session
/// without checks) and zvmm's virtiofsd is gone afterwards.
#[test]
fn virtio_fs_root_share_is_vroot() {
    let scratch = Scratch::new("zvmm-fs-root");
    let dir = scratch.share.dir().display().to_string();
    let (pid, run, report) = run(scratch.zvmm_with(&dir, "console=ttyS0"));
    let context = format!("zvmm --fs {dir}: {run:#?}");
    assert_probe_done(&run, &report, &context);
    let device = report.value("fs slot=").unwrap_or_default();
    assert!(device.contains(" tag=\"vroot\" "), "{context}");
    let names: Vec<String> = listing(&report, "", "before").into_keys().collect();
    let mut expected = [
        plan::DOOMED_FILE,
        plan::EMPTY_DIR,
        plan::READ_FILE,
        plan::MOVE_FILE,
    ];
    expected.sort();
    assert_eq!(names, expected, "{context}");
    check_session_end(&report, 1, &context);
    scratch.assert_nothing_left(pid, None, &context);
}
