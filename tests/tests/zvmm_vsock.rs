//! `--vsock` end to end with the tiny guest (no vsock driver): bad options
//! and unusable socket paths are refused with one line (a user's file is
//! never touched); the socket exists with mode 0600 while the VM runs, a
//! stale one is replaced, and it is gone after a power-off and a SIGTERM;
//! a host `CONNECT 1024` to a guest that never answers is closed within a
//! bounded time; `vm.info` and `vm.counters` report the device. The
//! protocol itself (handshake, data, credit, resets) is covered by the
//! device's unit tests with a fake guest driver, and end to end with the
//! probe's driver by `zvmm_vsock_probe.rs`.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zvmm_tests::api::get;
use zvmm_tests::tiny::{write_tiny_elf, TinyEnd, TINY_LINE};
use zvmm_tests::zvmm::{assert_rejected, run_zvmm, scratch_dir, spawn_zvmm, Running};

const LIMIT: Duration = Duration::from_secs(20);

fn tiny_args(kernel: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--kernel", &kernel.display().to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--memory", "64M", "--serial", "stdio"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn vsock_option(socket: &Path) -> String {
    format!("cid=3,socket={}", socket.display())
}

/// Waits for the socket file (without connecting: a connection that
/// sends no line counts as a failed host connect).
fn wait_for_socket(vm: &mut Running, socket: &Path) {
    let deadline = Instant::now() + LIMIT;
    let is_socket = || std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket());
    while !is_socket() {
        if let Some(status) = vm.try_status() {
            panic!("zvmm exited with {status}: {}", vm.stderr.text());
        }
        assert!(Instant::now() < deadline, "the vsock socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn bad_vsock_options_are_refused_with_one_line() {
    let dir = scratch_dir("vsock-bad-options");
    let kernel = write_tiny_elf(&dir, TinyEnd::PowerOff);
    let socket = dir.join("v.sock").display().to_string();
    let cases: [(String, &[&str]); 6] = [
        (
            format!("cid=2,socket={socket}"),
            &["cid 2 is reserved", "3 to"],
        ),
        (format!("cid=0,socket={socket}"), &["cid 0 is reserved"]),
        (format!("socket={socket}"), &["'cid'", "expected cid=N"]),
        ("cid=3".to_string(), &["expected socket=PATH"]),
        (format!("cid=3,socket={socket},iommu=on"), &["IOMMU"]),
        (
            format!("cid=3,socket={socket},port=5"),
            &["unknown key 'port'"],
        ),
    ];
    for (value, needles) in cases {
        let run = run_zvmm(tiny_args(&kernel, &["--vsock", &value]), LIMIT);
        assert_rejected(&run, 2, needles);
        assert!(!Path::new(&socket).exists(), "{value}");
    }
}

#[test]
fn unusable_socket_paths_are_refused_and_files_left_alone() {
    let dir = scratch_dir("vsock-bad-paths");
    let kernel = write_tiny_elf(&dir, TinyEnd::PowerOff);
    let missing_dir = dir.join("no-such-dir/v.sock");
    let run = run_zvmm(
        tiny_args(&kernel, &["--vsock", &vsock_option(&missing_dir)]),
        LIMIT,
    );
    assert_rejected(&run, 1, &["--vsock cid=3", "no-such-dir", "does not exist"]);
    let file = dir.join("notes.txt");
    std::fs::write(&file, b"a user's file").unwrap();
    let run = run_zvmm(
        tiny_args(&kernel, &["--vsock", &vsock_option(&file)]),
        LIMIT,
    );
    assert_rejected(&run, 1, &["notes.txt", "is not a socket"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"a user's file");
    let live = dir.join("live.sock");
    let _listener = UnixListener::bind(&live).unwrap();
    let run = run_zvmm(
        tiny_args(&kernel, &["--vsock", &vsock_option(&live)]),
        LIMIT,
    );
    assert_rejected(&run, 1, &["live.sock", "another process is listening"]);
    assert!(live.exists(), "a live socket must stay");
}

#[test]
fn the_socket_is_private_while_the_vm_runs_and_gone_after() {
    let dir = scratch_dir("vsock-socket-life");
    let socket = dir.join("v.sock");
    // A stale socket from an earlier run is replaced.
    drop(UnixListener::bind(&socket).unwrap());
    let idle = write_tiny_elf(&dir, TinyEnd::Idle);
    let mut vm = spawn_zvmm(tiny_args(&idle, &["--vsock", &vsock_option(&socket)]));
    // The guest runs once its devices (the socket among them) are built.
    assert!(vm.stdout.wait_for(TINY_LINE, LIMIT), "{}", vm.stderr.text());
    wait_for_socket(&mut vm, &socket);
    UnixStream::connect(&socket).expect("zvmm listens on the replaced socket");
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    vm.signal(libc::SIGTERM);
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), 143, "{run:#?}");
    assert!(!socket.exists(), "socket left after SIGTERM");
    let poweroff = write_tiny_elf(&dir, TinyEnd::PowerOff);
    let run = run_zvmm(
        tiny_args(&poweroff, &["--vsock", &vsock_option(&socket)]),
        LIMIT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(run.stdout.contains(TINY_LINE), "{run:#?}");
    assert!(!socket.exists(), "socket left after power-off");
}

/// Sends `CONNECT 1024` and reads until the end; returns what came and
/// how long it took.
fn connect_to_silent_guest(socket: &Path) -> (Vec<u8>, Duration) {
    let mut client = UnixStream::connect(socket).unwrap();
    client.set_read_timeout(Some(LIMIT)).unwrap();
    let start = Instant::now();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    (got, start.elapsed())
}

#[test]
fn a_connect_to_a_guest_without_driver_fails_in_time_and_is_counted() {
    let dir = scratch_dir("vsock-silent-guest");
    let socket = dir.join("v.sock");
    let api: PathBuf = dir.join("api.sock");
    let kernel = write_tiny_elf(&dir, TinyEnd::Idle);
    let api_option = format!("path={}", api.display());
    let vsock = format!("{},id=agent", vsock_option(&socket));
    let mut vm = spawn_zvmm(tiny_args(
        &kernel,
        &["--api-socket", &api_option, "--vsock", &vsock],
    ));
    assert!(vm.stdout.wait_for(TINY_LINE, LIMIT), "{}", vm.stderr.text());
    wait_for_socket(&mut vm, &socket);
    let (got, waited) = connect_to_silent_guest(&socket);
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let info = get(&api, "vm.info").json();
    let vsock = &info["config"]["vsock"];
    assert_eq!(vsock["cid"], 3, "{info}");
    assert_eq!(vsock["socket"], socket.display().to_string(), "{info}");
    assert_eq!(vsock["id"], "agent", "{info}");
    assert_eq!(vsock["iommu"], false, "{info}");
    let counters = get(&api, "vm.counters").json();
    assert_eq!(counters["agent"]["host_connect_failures"], 1, "{counters}");
    assert_eq!(counters["agent"]["host_connections"], 0, "{counters}");
    assert!(counters["agent"]["tx_malformed"].is_u64(), "{counters}");
    vm.signal(libc::SIGTERM);
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), 143, "{run:#?}");
    assert!(!socket.exists());
}

#[test]
fn a_vm_without_vsock_reports_none() {
    let dir = scratch_dir("vsock-none");
    let api = dir.join("api.sock");
    let kernel = write_tiny_elf(&dir, TinyEnd::Idle);
    let api_option = format!("path={}", api.display());
    let vm = spawn_zvmm(tiny_args(&kernel, &["--api-socket", &api_option]));
    assert!(vm.stdout.wait_for(TINY_LINE, LIMIT), "{}", vm.stderr.text());
    let info = get(&api, "vm.info").json();
    assert!(info["config"].get("vsock").is_none(), "{info}");
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.finish(LIMIT).code(), 143);
}
