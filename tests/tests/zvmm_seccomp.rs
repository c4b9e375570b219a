//! Seccomp end to end: with the default `--seccomp true`, a forbidden
//! system call from any filtered thread kind stops zvmm with status 8 and
//! one line naming the thread and the call (the `ZVMM_SECCOMP_SELFTEST`
//! hook makes a thread of the given kind call `mount` right after
//! installing its filter); `--seccomp log` lets the call through, `false`
//! installs nothing; `--print-seccomp` shows the lists.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use zvmm_tests::fs::virtiofsd_bin;
use zvmm_tests::net::NetNs;
use zvmm_tests::probe::probe_stdio_args;
use zvmm_tests::zvmm::{run_with_limit, scratch_dir, spawn_zvmm, zvmm_bin, Finished, Running};

const LIMIT: Duration = Duration::from_secs(90);
/// Exit status for a forbidden system call.
const EXIT_SECCOMP: i32 = 8;

fn with_selftest(mut command: Command, kind: &str) -> Command {
    command.env("ZVMM_SECCOMP_SELFTEST", kind);
    command
}

fn run_selftest(kind: &str, args: &[String]) -> Finished {
    let mut command = Command::new(zvmm_bin());
    command.args(args);
    run_with_limit(with_selftest(command, kind), LIMIT)
}

/// zvmm ended with status 8 and the report names `thread` (or a thread
/// whose name starts with it, for `prefix`) and `mount (165)`.
fn assert_stopped(run: &Finished, thread: &str, prefix: bool) {
    assert_eq!(run.code(), EXIT_SECCOMP, "{run:#?}");
    let line = run
        .stderr
        .lines()
        .find(|line| line.starts_with("zvmm: seccomp: thread "))
        .unwrap_or_else(|| panic!("no seccomp report: {run:#?}"));
    let rest = line.trim_start_matches("zvmm: seccomp: thread ");
    let (name, call) = rest
        .split_once(" made a forbidden system call: ")
        .unwrap_or_else(|| panic!("malformed report {line:?}"));
    if prefix {
        assert!(name.starts_with(thread), "{line:?}, wanted {thread}*");
    } else {
        assert_eq!(name, thread, "{line:?}");
    }
    assert_eq!(call, "mount (165)", "{line:?}");
}

fn disk_and_vsock(dir: &Path) -> Vec<String> {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    vec![
        "--disk".into(),
        format!("path={}", disk.display()),
        "--vsock".into(),
        format!("cid=3,socket={}", dir.join("v.sock").display()),
    ]
}

#[test]
fn a_forbidden_call_from_each_vm_thread_kind_stops_zvmm_naming_it() {
    let dir = scratch_dir("seccomp-kinds");
    let args = probe_stdio_args(&disk_and_vsock(&dir));
    let cases = [
        ("main", "main", false),
        ("vmm", "vmm", false),
        ("vcpu", "vcpu0", false),
        ("rng", "rng-", true),
        ("blk", "blk-", true),
        ("vsock", "vsock-", true),
    ];
    for (kind, thread, prefix) in cases {
        let run = run_selftest(kind, &args);
        assert_stopped(&run, thread, prefix);
    }
}

#[test]
fn a_forbidden_call_from_the_virtio_fs_threads_stops_zvmm() {
    let dir = scratch_dir("seccomp-fs");
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let virtiofsd = virtiofsd_bin().unwrap_or_else(|e| panic!("{e}"));
    let args = probe_stdio_args(&[
        "--fs".into(),
        format!("tag=t,path={}", share.display()),
        "--virtiofsd".into(),
        virtiofsd.display().to_string(),
    ]);
    for (kind, thread, prefix) in [
        ("fs-watch", "fs-", true),
        ("virtiofsd-log", "virtiofsd-log", false),
    ] {
        let run = run_selftest(kind, &args);
        assert_stopped(&run, thread, prefix);
        if kind == "fs-watch" {
            assert!(run.stderr.contains("-watch made"), "{run:#?}");
        }
    }
}

#[test]
fn a_forbidden_call_from_a_nic_worker_stops_zvmm() {
    let mut ns = NetNs::new().unwrap_or_else(|e| panic!("{e}"));
    ns.add_tap("zstap0", "10.78.0.1/24")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut command = ns.command(zvmm_bin());
    command.args(probe_stdio_args(&["--net".into(), "tap=zstap0".into()]));
    let run = Running::spawn(with_selftest(command, "net")).finish(LIMIT);
    assert_stopped(&run, "net-", true);
}

#[test]
fn a_forbidden_call_from_each_api_thread_stops_zvmm() {
    let dir = scratch_dir("seccomp-api");
    // A zvmm stopped this way leaves its socket: one path per run.
    let api = |name: &str| {
        [
            "--api-socket".to_string(),
            dir.join(name).display().to_string(),
        ]
    };

    let run = run_selftest("api-accept", &api("accept.sock"));
    assert_stopped(&run, "api-accept", false);

    // api-vm-events starts with the command line's VM.
    let mut with_vm = probe_stdio_args(&[]);
    with_vm.extend(api("events.sock"));
    let run = run_selftest("api-vm-events", &with_vm);
    assert_stopped(&run, "api-vm-events", false);

    // api-conn starts with the first connection.
    let socket = dir.join("conn.sock");
    let mut command = Command::new(zvmm_bin());
    command.args(api("conn.sock"));
    let zvmm = Running::spawn(with_selftest(command, "api-conn"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The connection dies with zvmm: nothing to read back.
    let mut stream = UnixStream::connect(&socket).unwrap_or_else(|e| panic!("{e}: {socket:?}"));
    let _ = stream.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let run = zvmm.finish(LIMIT);
    assert_stopped(&run, "api-conn", false);
}

#[test]
fn log_and_false_let_the_forbidden_call_through() {
    let dir = scratch_dir("seccomp-modes");
    for mode in ["log", "false"] {
        let mut args = probe_stdio_args(&disk_and_vsock(&dir));
        args.extend(["--seccomp".into(), mode.into()]);
        let run = run_selftest("vcpu", &args);
        assert_eq!(run.code(), 0, "--seccomp {mode}: {run:#?}");
        assert!(!run.stderr.contains("seccomp: thread"), "{run:#?}");
        assert!(run.stdout.contains("probe: done"), "{run:#?}");
    }
}

#[test]
fn print_seccomp_shows_each_kinds_list() {
    let run = run_with_limit(
        {
            let mut command = Command::new(zvmm_bin());
            command.args(["--print-seccomp", "vcpu"]);
            command
        },
        LIMIT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(run.stdout.contains("ioctl: only KVM_RUN"), "{run:#?}");
    assert!(!run.stdout.contains(" mount "), "{run:#?}");
    let mut command = Command::new(zvmm_bin());
    command.args(["--print-seccomp", "all"]);
    let run = run_with_limit(command, LIMIT);
    assert_eq!(run.code(), 0, "{run:#?}");
    for kind in [
        "main", "vmm", "vcpu", "api-conn", "blk", "net", "vsock", "rng",
    ] {
        assert!(run.stdout.contains(&format!("| `{kind}` |")), "{run:#?}");
    }
    let running = spawn_zvmm(["--print-seccomp", "nosuch"]);
    let run = running.finish(LIMIT);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains("expected all or one of"), "{run:#?}");
}
