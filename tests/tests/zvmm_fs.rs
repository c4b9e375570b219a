//! `--fs` end to end with the real virtiofsd (installed by the project's
//! set-up; a missing one fails the tests with how to install it): zvmm
//! starts virtiofsd for `--fs DIR` / `tag=T,path=DIR` and leaves no
//! daemon, socket or runtime directory behind after any way the VM ends
//! (power-off, reset with --no-reboot, timeout, SIGTERM, SIGKILL of
//! zvmm aside, API vmm.shutdown); a daemon that dies while the VM runs
//! stops it with status 7 and says how; bad shares are refused with one
//! line. The guest's FUSE traffic is tested in `zvmm_fs_probe.rs`.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use zvmm_tests::api::get;
use zvmm_tests::probe::{probe_elf, Flavour};
use zvmm_tests::zvmm::{assert_rejected, run_with_limit, scratch_dir, zvmm_bin, Finished, Running};

const LIMIT: Duration = Duration::from_secs(20);

/// A test's directories: the share and zvmm's runtime base.
struct Dirs {
    share: PathBuf,
    runtime: PathBuf,
    root: PathBuf,
}

fn dirs(name: &str) -> Dirs {
    let root = scratch_dir(name);
    let share = root.join("share");
    let runtime = root.join("runtime");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::write(share.join("hello.txt"), b"hello from the host\n").unwrap();
    Dirs {
        share,
        runtime,
        root,
    }
}

fn virtiofsd_installed() {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("virtiofsd").is_file()))
        .unwrap_or(false)
        || std::env::var_os("HOME")
            .map(|home| Path::new(&home).join(".cargo/bin/virtiofsd").is_file())
            .unwrap_or(false);
    assert!(
        found,
        "virtiofsd is not installed: run `bash resources/install-host-deps.sh` (cargo install virtiofsd --locked)"
    );
}

/// zvmm booting the probe with `args`, its runtime directories under
/// `dirs.runtime`.
fn zvmm(dirs: &Dirs, cmdline: &str, args: &[&str]) -> Command {
    let mut command = Command::new(zvmm_bin());
    command
        .env("XDG_RUNTIME_DIR", &dirs.runtime)
        .arg("--kernel")
        .arg(probe_elf(Flavour::Pvh))
        .args(["--serial", "stdio"])
        .args(["--cmdline", &format!("console=ttyS0 {cmdline}")])
        .args(args);
    if !args.contains(&"--memory") {
        command.args(["--memory", "128M"]);
    }
    command
}

/// Live (not zombie) virtiofsd processes whose command line mentions
/// `needle`.
fn live_processes_naming(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'));
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let daemon = comm.trim() == "virtiofsd";
        if daemon && !zombie && String::from_utf8_lossy(&cmdline).contains(&needle) {
            found.push(pid);
        }
    }
    found
}

/// Nothing of the share's daemon may outlive the VM.
fn assert_nothing_left(dirs: &Dirs, run: &Finished) {
    assert_eq!(
        live_processes_naming(&dirs.share),
        Vec::<u32>::new(),
        "{run:#?}"
    );
    let left: Vec<_> = std::fs::read_dir(&dirs.runtime)
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "runtime dir not empty: {left:?}\n{run:#?}");
}

fn wait_for_daemon(dirs: &Dirs) -> u32 {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(&pid) = live_processes_naming(&dirs.share).first() {
            return pid;
        }
        assert!(Instant::now() < deadline, "virtiofsd never started");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_way_the_vm_ends_stops_virtiofsd_and_cleans_up() {
    virtiofsd_installed();
    let dirs = dirs("fs-endings");
    let share = format!("tag=data,path={}", dirs.share.display());
    // Power-off.
    let run = run_with_limit(zvmm(&dirs, "", &["--fs", &share]), LIMIT);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(run.stdout.contains("probe: done"), "{run:#?}");
    assert_eq!(
        run.stderr,
        "zvmm: --fs: backing guest RAM with a memfd (as --memory shared=on) so virtiofsd can map it\n"
    );
    assert_nothing_left(&dirs, &run);
    // Reset with --no-reboot, and the timeout.
    for (cmdline, extra, status) in [
        ("probe.action=reset-acpi", &["--no-reboot"][..], 3),
        ("probe.action=hang", &["--timeout", "1"][..], 124),
    ] {
        let mut args = vec!["--fs", &share];
        args.extend_from_slice(extra);
        let run = run_with_limit(zvmm(&dirs, cmdline, &args), LIMIT);
        assert_eq!(run.code(), status, "{run:#?}");
        assert_nothing_left(&dirs, &run);
    }
    // SIGTERM while it runs.
    let vm = Running::spawn(zvmm(&dirs, "probe.action=hang", &["--fs", &share]));
    wait_for_daemon(&dirs);
    assert!(vm.stdout.wait_for("probe: done", LIMIT));
    vm.signal(libc::SIGTERM);
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), 143, "{run:#?}");
    assert_nothing_left(&dirs, &run);
}

#[test]
fn the_api_shutdown_stops_virtiofsd_and_vm_info_shows_the_share() {
    virtiofsd_installed();
    let dirs = dirs("fs-api");
    let socket = dirs.root.join("api.sock");
    let api = format!("path={}", socket.display());
    let share = dirs.share.display().to_string();
    let vm = Running::spawn(zvmm(
        &dirs,
        "probe.action=hang",
        &["--api-socket", &api, "--fs", &share],
    ));
    assert!(
        vm.stdout.wait_for("probe: done", LIMIT),
        "{}",
        vm.stderr.text()
    );
    let info = get(&socket, "vm.info").json();
    let fs = &info["config"]["fs"][0];
    assert_eq!(fs["tag"], "vroot", "{info}");
    assert_eq!(fs["path"], share.as_str(), "{info}");
    assert_eq!(info["config"]["memory"]["shared"], true, "{info}");
    assert_eq!(
        info["config"]["payload"]["cmdline"], "console=ttyS0 probe.action=hang",
        "an explicit --cmdline wins: {info}"
    );
    assert!(get(&socket, "vm.counters").json()["_fs0"].is_object());
    let answer = zvmm_tests::api::put(&socket, "vmm.shutdown", "");
    assert_eq!(answer.status, 204, "{answer:?}");
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_nothing_left(&dirs, &run);
}

#[test]
fn a_daemon_that_dies_stops_the_vm_with_status_7() {
    virtiofsd_installed();
    let dirs = dirs("fs-dies");
    let share = format!("tag=data,path={}", dirs.share.display());
    let vm = Running::spawn(zvmm(&dirs, "probe.action=hang", &["--fs", &share]));
    let pid = wait_for_daemon(&dirs);
    assert!(vm.stdout.wait_for("probe: done", LIMIT));
    // SAFETY: kill(2) on the daemon's pid, read from /proc just now.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), 7, "{run:#?}");
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("zvmm: VM stopped: --fs tag=data"))
        .unwrap_or_else(|| panic!("no stop line: {run:#?}"));
    assert!(line.contains("virtiofsd"), "{line}");
    assert_nothing_left(&dirs, &run);
}

#[test]
fn bad_shares_are_refused_with_one_line() {
    virtiofsd_installed();
    let dirs = dirs("fs-bad");
    let file = dirs.root.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let missing = dirs.root.join("missing");
    let share = dirs.share.display().to_string();
    let long_tag = format!("tag={},path={share}", "t".repeat(37));
    let two = [format!("tag=a,path={share}"), format!("tag=a,path={share}")];
    let usage: [(Vec<&str>, &[&str]); 5] = [
        (vec!["--fs", &long_tag], &["1 to 36 bytes (this one is 37)"]),
        (vec!["--fs", &two[0], &two[1]], &["tag a used twice"]),
        (vec!["--fs", "tag=,socket=/x"], &["this one is 0"]),
        (
            vec!["--memory", "size=128M,shared=off", "--fs", &share],
            &["--memory shared=off cannot go with --fs"],
        ),
        (vec!["--fs", "socket=/x"], &["expected tag=TAG"]),
    ];
    for (args, needles) in usage {
        let run = run_with_limit(zvmm(&dirs, "", &args), LIMIT);
        assert_rejected(&run, 2, needles);
    }
    let missing_dir = format!("tag=m,path={}", missing.display());
    let file_dir = format!("tag=f,path={}", file.display());
    let missing_socket = format!("tag=s,socket={}", missing.display());
    let file_socket = format!("tag=s,socket={}", file.display());
    let mute = dirs.root.join("mute.sock");
    let listener = UnixListener::bind(&mute).unwrap();
    let closer = std::thread::spawn(move || {
        // Accept and hang up at once: not a vhost-user backend.
        let _ = listener.accept();
    });
    let mute_socket = format!("tag=s,socket={}", mute.display());
    let failing = dirs.root.join("failing-virtiofsd");
    std::fs::write(
        &failing,
        "#!/bin/sh\necho 'cannot serve: out of tea' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &failing,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let failing = failing.display().to_string();
    let host: [(Vec<&str>, &[&str]); 7] = [
        (
            vec!["--fs", &missing_dir],
            &["--fs tag=m", "does not exist"],
        ),
        (
            vec!["--fs", &file_dir],
            &["--fs tag=f", "is not a directory"],
        ),
        (
            vec!["--fs", &missing_socket],
            &["--fs tag=s", "does not exist"],
        ),
        (
            vec!["--fs", &file_socket],
            &["--fs tag=s", "is not a Unix socket"],
        ),
        (vec!["--fs", &mute_socket], &["--fs tag=s", "vhost-user"]),
        (
            vec!["--virtiofsd", "/nonexistent/virtiofsd", "--fs", &share],
            &["/nonexistent/virtiofsd", "not found"],
        ),
        (
            vec!["--virtiofsd", &failing, "--fs", &share],
            &["exited at start", "out of tea"],
        ),
    ];
    for (args, needles) in host {
        let run = run_with_limit(zvmm(&dirs, "", &args), LIMIT);
        // The shared-memory note may come first; then the one error line.
        let error: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| !l.starts_with("zvmm: --fs: backing guest RAM"))
            .collect();
        assert_eq!(run.code(), 1, "{args:?}: {run:#?}");
        assert_eq!(error.len(), 1, "{args:?}: {run:#?}");
        for needle in needles {
            assert!(
                error[0].contains(needle),
                "{args:?}: no {needle:?} in {run:#?}"
            );
        }
        assert_nothing_left(&dirs, &run);
    }
    let _ = closer.join();
}

#[test]
fn more_shares_than_pci_slots_are_refused_and_every_daemon_stopped() {
    virtiofsd_installed();
    let dirs = dirs("fs-many");
    let shares: Vec<String> = (0..32)
        .map(|n| format!("tag=s{n},path={}", dirs.share.display()))
        .collect();
    let mut args = vec!["--fs"];
    args.extend(shares.iter().map(String::as_str));
    let run = run_with_limit(zvmm(&dirs, "", &args), Duration::from_secs(60));
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stderr.contains("--fs tag=s31") && run.stderr.contains("at most 31 devices"),
        "{run:#?}"
    );
    assert_nothing_left(&dirs, &run);
}
