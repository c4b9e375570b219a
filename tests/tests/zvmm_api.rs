//! The REST API end to end, as a host agent uses it: zvmm started with only
//! `--api-socket`, driven through the Unix socket with plain HTTP/1.1
//! (`zvmm_tests::api`'s small client): ping, create the probe guest, boot, info,
//! pause, resume, counters, shutdown, `vmm.shutdown` ending the process;
//! bad requests answered with 4xx; a stale socket replaced and any other
//! file refused.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zvmm_tests::api::{get, put, request, start_api};
use zvmm_tests::probe::{probe_elf, Flavour};
use zvmm_tests::zvmm::{run_zvmm, scratch_dir};

/// How long zvmm gets to exit after being told to.
const EXIT_LIMIT: Duration = Duration::from_secs(5);

/// A VM configuration for the probe with `action`, in cloud-hypervisor's
/// JSON shape.
fn probe_config(action: &str) -> String {
    serde_json::json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 128u64 << 20},
        "payload": {
            "kernel": probe_elf(Flavour::Pvh),
            "cmdline": format!("console=ttyS0 probe.action={action}"),
        },
        "serial": {"mode": "Pty"},
        "console": {"mode": "Off"},
    })
    .to_string()
}

fn state(socket: &Path) -> String {
    get(socket, "vm.info").json()["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn socket_path(dir: &Path) -> PathBuf {
    dir.join("api.sock")
}

#[test]
fn host_agent_drives_a_vm_over_the_socket_only() {
    let dir = scratch_dir("api-agent");
    let socket = socket_path(&dir);
    let zvmm = start_api(&socket, &[]);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let ping = get(&socket, "vmm.ping").json();
    assert_eq!(ping["pid"], zvmm.pid());
    assert!(ping["version"].is_string(), "{ping}");
    assert!(ping["build_version"].is_string(), "{ping}");

    assert_eq!(put(&socket, "vm.create", &probe_config("hang")).status, 204);
    let info = get(&socket, "vm.info").json();
    assert_eq!(info["state"], "Created", "{info}");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2, "{info}");
    assert_eq!(info["config"]["memory"]["size"], 128u64 << 20, "{info}");
    assert_eq!(info["config"]["serial"]["mode"], "Pty", "{info}");
    let pty = info["config"]["serial"]["file"]
        .as_str()
        .unwrap_or_default();
    assert!(pty.starts_with("/dev/pts/"), "{info}");

    assert_eq!(put(&socket, "vm.boot", "").status, 204);
    assert_eq!(state(&socket), "Running");
    let again = put(&socket, "vm.boot", "");
    assert_eq!(again.status, 500, "{again:?}");

    assert_eq!(put(&socket, "vm.pause", "").status, 204);
    assert_eq!(state(&socket), "Paused");
    let twice = put(&socket, "vm.pause", "");
    assert_eq!(twice.status, 500, "{twice:?}");
    assert!(twice.body.contains("paused"), "{twice:?}");
    assert_eq!(put(&socket, "vm.resume", "").status, 204);
    assert_eq!(state(&socket), "Running");
    let resumed = put(&socket, "vm.resume", "");
    assert_eq!(resumed.status, 500, "{resumed:?}");

    let counters = get(&socket, "vm.counters").json();
    assert!(
        counters["pio-bus"]["unclaimed_reads"].is_u64(),
        "{counters}"
    );

    assert_eq!(put(&socket, "vm.reboot", "").status, 204);
    assert_eq!(state(&socket), "Running");
    assert_eq!(put(&socket, "vm.shutdown", "").status, 204);
    assert_eq!(state(&socket), "Shutdown");
    assert_eq!(put(&socket, "vm.pause", "").status, 500);
    assert_eq!(put(&socket, "vm.boot", "").status, 204);
    assert_eq!(state(&socket), "Running");

    assert_eq!(put(&socket, "vmm.shutdown", "").status, 204);
    let done = zvmm.finish(EXIT_LIMIT);
    assert_eq!(done.code(), 0, "{done:#?}");
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn bad_requests_get_4xx_and_wrong_states_500() {
    let dir = scratch_dir("api-bad");
    let socket = socket_path(&dir);
    let zvmm = start_api(&socket, &[]);
    let not_created = put(&socket, "vm.pause", "");
    assert_eq!(not_created.status, 500, "{not_created:?}");
    assert!(not_created.body.contains("vm.create"), "{not_created:?}");
    assert_eq!(get(&socket, "vm.info").status, 500);
    for body in ["", "{", "{\"cpus\": {\"boot_vcpus\": \"two\"}}"] {
        let answer = put(&socket, "vm.create", body);
        assert_eq!(answer.status, 400, "{body}: {answer:?}");
    }
    let missing = put(&socket, "vm.create", r#"{"cpus": {"boot_vcpus": 1}}"#);
    assert_eq!(missing.status, 400, "{missing:?}");
    assert!(missing.body.contains("kernel"), "{missing:?}");
    assert_eq!(get(&socket, "vm.nonsense").status, 404);
    assert_eq!(get(&socket, "../etc/passwd").status, 404);
    assert_eq!(get(&socket, "vm.boot").status, 405);
    assert_eq!(put(&socket, "vmm.ping", "").status, 405);
    assert_eq!(request(&socket, "DELETE", "vm.info", "").status, 405);
    assert_eq!(get(&socket, "vmm.ping").status, 200, "still serving");
    zvmm.signal(libc::SIGTERM);
    let done = zvmm.finish(EXIT_LIMIT);
    assert_eq!(done.code(), 143, "{done:#?}");
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn guest_poweroff_ends_the_process_with_status_0() {
    let dir = scratch_dir("api-poweroff");
    let socket = socket_path(&dir);
    let zvmm = start_api(&socket, &[]);
    let config = probe_config("none").replace("probe.action=none", "");
    assert_eq!(put(&socket, "vm.create", &config).status, 204);
    assert_eq!(put(&socket, "vm.boot", "").status, 204);
    let done = zvmm.finish(EXIT_LIMIT);
    assert_eq!(done.code(), 0, "{done:#?}");
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn stale_socket_is_replaced_and_other_files_refused() {
    let dir = scratch_dir("api-stale");
    let socket = socket_path(&dir);
    drop(UnixListener::bind(&socket).unwrap());
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());
    let zvmm = start_api(&socket, &[]);
    assert_eq!(get(&socket, "vmm.ping").status, 200);
    let second = run_zvmm(
        ["--api-socket".to_string(), socket.display().to_string()],
        EXIT_LIMIT,
    );
    assert_eq!(second.code(), 1, "{second:#?}");
    assert!(second.stderr.contains("another process"), "{second:#?}");
    assert_eq!(put(&socket, "vmm.shutdown", "").status, 204);
    assert_eq!(zvmm.finish(EXIT_LIMIT).code(), 0);

    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"keep").unwrap();
    let refused = run_zvmm(
        ["--api-socket".to_string(), file.display().to_string()],
        EXIT_LIMIT,
    );
    assert_eq!(refused.code(), 1, "{refused:#?}");
    assert!(
        refused.stderr.contains(&file.display().to_string()),
        "{refused:#?}"
    );
    assert!(refused.stderr.contains("not a socket"), "{refused:#?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}
