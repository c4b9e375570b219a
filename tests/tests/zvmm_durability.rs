//! Durability: what a guest wrote and saw acknowledged after FLUSH is on
//! the image when zvmm is killed with SIGKILL right after, raw and qcow2
//! (read back from the file, and through `qemu-img check`/`convert`/
//! `compare` for qcow2); and a killed zvmm leaves nothing that blocks or
//! litters the next one: its disk lock goes with it (the next zvmm opens
//! the image writable at once), so do the tap it created and the
//! virtiofsd it started, and what cannot go by itself — the API socket,
//! the vsock socket, virtiofsd's runtime directory — is removed by the
//! next start, which says so in one line each.
//!
//! The probe does `probe.blk.write=S:C` (pattern write, read back, its
//! FNV-1a reported), then FLUSH, reporting `blk slot=N flush status=ok`
//! only once the device completed it; the test watches the serial file
//! and sends SIGKILL the moment that line appears.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use zvmm_tests::api::{get, processes_mentioning, put};
use zvmm_tests::disk::{make_image, pattern, SECTOR};
use zvmm_tests::fs::socket_listening;
use zvmm_tests::images::{assert_check_clean, assert_identical, create, qemu_img};
use zvmm_tests::net::NetNs;
use zvmm_tests::probe::{fnv1a64, probe_elf, Flavour};
use zvmm_tests::zvmm::{scratch_dir, zvmm_bin, Running};

/// How long a probe gets to report its flush (the machine may be busy).
const BOOT_LIMIT: Duration = Duration::from_secs(120);
/// How long leftovers of a killed zvmm (its virtiofsd, its tap) may take
/// to go.
const CLEANUP_LIMIT: Duration = Duration::from_secs(10);
/// Image size.
const IMAGE_BYTES: u64 = 8 << 20;
/// The range the probe writes: 64 KiB from sector 100 (with 4 KiB qcow2
/// clusters 17 of them, so L2 entries and refcounts must reach the file
/// too; more makes the probe slow on a busy KVM-PVM host).
const WRITE: (u64, u64) = (100, 128);
/// The line the probe prints once FLUSH completed.
const FLUSHED: &str = "flush status=ok";
/// The line the probe prints once it hangs.
const HANG_LINE: &str = "probe: action name=hang";

/// Polls `file` until it contains `needle`; panics with its text past
/// `limit` or when `zvmm` exited.
fn wait_for_text(file: &Path, needle: &str, zvmm: &mut Running, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if let Some(status) = zvmm.try_status() {
            panic!(
                "zvmm exited ({status}) before {needle:?}:\n{text}\n{}",
                zvmm.stderr.text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never appeared in {}:\n{text}\nstderr: {}",
            file.display(),
            zvmm.stderr.text()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// zvmm booting the probe with `cmdline` words and `extra` options,
/// serial console into `serial`.
fn probe_command(cmdline: &str, serial: &Path, extra: &[String]) -> Command {
    let mut command = Command::new(zvmm_bin());
    command
        .arg("--kernel")
        .arg(probe_elf(Flavour::Pvh))
        .args(["--memory", "64M", "--cmdline"])
        .arg(format!("console=ttyS0 probe.action=hang {cmdline}"))
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .args(extra);
    command
}

/// Kills `zvmm` with SIGKILL and checks that is how it ended.
fn kill_9(zvmm: Running) -> String {
    zvmm.signal(libc::SIGKILL);
    let done = zvmm.finish(Duration::from_secs(10));
    assert_eq!(
        done.status.and_then(|s| s.signal()),
        Some(libc::SIGKILL),
        "{done:#?}"
    );
    done.stderr
}

/// Boots the probe on `image` (format `format`), waits for its flush,
/// kills zvmm at once; returns the reported write hash.
fn write_flush_kill(dir: &Path, image: &Path, format: &str) -> u64 {
    let serial = dir.join(format!("{format}.log"));
    let disk = format!("path={},image_type={format}", image.display());
    let cmdline = format!("probe.blk.write={}:{}", WRITE.0, WRITE.1);
    let mut zvmm = Running::spawn(probe_command(&cmdline, &serial, &["--disk".into(), disk]));
    let text = wait_for_text(&serial, FLUSHED, &mut zvmm, BOOT_LIMIT);
    kill_9(zvmm);
    let write = text
        .lines()
        .find(|line| line.contains(" write sector="))
        .unwrap_or_else(|| panic!("no write line:\n{text}"));
    assert!(
        write.contains("status=ok") && write.contains("readback=ok"),
        "{write}"
    );
    let hash = write
        .split_whitespace()
        .find_map(|word| word.strip_prefix("fnv1a64=0x"))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| panic!("no hash in {write}"));
    eprintln!("durability: {format}: probe wrote {write:?}, flushed, zvmm killed");
    hash
}

/// The image a guest that wrote [`WRITE`] leaves: zeroes and the pattern.
fn expected_raw(path: &Path) {
    make_image(
        path,
        IMAGE_BYTES,
        &[(WRITE.0 * SECTOR, pattern(WRITE.0, WRITE.1))],
    );
}

fn written_range(image: &[u8]) -> &[u8] {
    let start = (WRITE.0 * SECTOR) as usize;
    &image[start..start + (WRITE.1 * SECTOR) as usize]
}

#[test]
fn flushed_writes_on_a_raw_image_survive_kill_9() {
    let dir = scratch_dir("durable-raw");
    let image = dir.join("disk.raw");
    make_image(&image, IMAGE_BYTES, &[]);
    let hash = write_flush_kill(&dir, &image, "raw");
    let expected = pattern(WRITE.0, WRITE.1);
    assert_eq!(hash, fnv1a64(&expected), "the probe wrote something else");
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(bytes.len() as u64, IMAGE_BYTES);
    assert!(
        written_range(&bytes) == expected,
        "flushed data missing from the raw image"
    );
    let reference = dir.join("expected.raw");
    expected_raw(&reference);
    assert_eq!(
        bytes,
        std::fs::read(&reference).unwrap(),
        "other bytes changed"
    );
}

#[test]
fn flushed_writes_on_a_qcow2_image_survive_kill_9() {
    let dir = scratch_dir("durable-qcow2");
    let image = dir.join("disk.qcow2");
    let size = IMAGE_BYTES.to_string();
    create(&image, "qcow2", &["-o", "cluster_size=4096"], Some(&size));
    let hash = write_flush_kill(&dir, &image, "qcow2");
    let expected = pattern(WRITE.0, WRITE.1);
    assert_eq!(hash, fnv1a64(&expected), "the probe wrote something else");
    assert_check_clean(&image);
    let converted = dir.join("converted.raw");
    let (src, dst) = (image.display().to_string(), converted.display().to_string());
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &src, &dst]);
    let bytes = std::fs::read(&converted).unwrap();
    assert!(
        written_range(&bytes) == expected,
        "flushed data missing from the qcow2 image"
    );
    let reference = dir.join("expected.raw");
    expected_raw(&reference);
    assert_identical(&image, &reference);
}

/// Waits until `gone()` holds, up to [`CLEANUP_LIMIT`].
fn eventually(what: &str, mut gone: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !gone() {
        assert!(
            start.elapsed() < CLEANUP_LIMIT,
            "{what} still there after {CLEANUP_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// The resources one zvmm run uses.
struct Setup {
    dir: PathBuf,
    runtime: PathBuf,
    share: PathBuf,
    disk: PathBuf,
    api: PathBuf,
    vsock: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = scratch_dir("durable-leftovers");
        let (runtime, share) = (dir.join("run"), dir.join("share"));
        std::fs::create_dir(&runtime).unwrap();
        std::fs::create_dir(&share).unwrap();
        let disk = dir.join("disk.raw");
        make_image(&disk, IMAGE_BYTES, &[]);
        let (api, vsock) = (dir.join("api.sock"), dir.join("vsock.sock"));
        Setup {
            dir,
            runtime,
            share,
            disk,
            api,
            vsock,
        }
    }

    /// zvmm in `ns` with a disk, a tap it creates, a share, vsock and the
    /// API, its virtiofsd runtime directory under [`Setup::runtime`].
    fn spawn(&self, ns: &NetNs, round: usize) -> (Running, PathBuf) {
        let serial = self.dir.join(format!("serial-{round}.log"));
        let probe = probe_command("", &serial, &[]);
        let mut command = ns.command(probe.get_program());
        command.args(probe.get_args());
        command.env("XDG_RUNTIME_DIR", &self.runtime);
        command.args([
            "--disk".to_string(),
            format!("path={}", self.disk.display()),
            "--net".into(),
            "tap=zdur0".into(),
            "--fs".into(),
            format!("tag=share,path={}", self.share.display()),
            "--vsock".into(),
            format!("cid=3,socket={}", self.vsock.display()),
            "--api-socket".into(),
            format!("path={}", self.api.display()),
        ]);
        (Running::spawn(command), serial)
    }

    /// virtiofsd processes serving this setup's share.
    fn daemons(&self) -> Vec<u32> {
        processes_mentioning(&self.share.display().to_string())
            .into_iter()
            .filter(|&pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("virtiofsd"))
            })
            .collect()
    }

    fn runtime_entries(&self) -> Vec<PathBuf> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&self.runtime)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        entries
    }
}

#[test]
fn a_killed_zvmm_leaves_nothing_that_outlives_the_next_start() {
    let ns = NetNs::new().unwrap_or_else(|e| panic!("cannot make a network namespace: {e}"));
    let setup = Setup::new();
    let (mut first, serial) = setup.spawn(&ns, 0);
    wait_for_text(&serial, HANG_LINE, &mut first, BOOT_LIMIT);
    let links = ns.links().unwrap();
    assert!(links.contains(&"zdur0".to_string()), "no tap: {links:?}");
    let daemons = setup.daemons();
    assert!(!daemons.is_empty(), "no virtiofsd found");
    let runtime_dirs = setup.runtime_entries();
    assert_eq!(runtime_dirs.len(), 1, "{runtime_dirs:?}");
    let first_stderr = kill_9(first);

    let tap_gone = eventually("tap zdur0", || {
        !ns.links().unwrap().contains(&"zdur0".to_string())
    });
    let daemons_gone = eventually("virtiofsd", || setup.daemons().is_empty());
    eprintln!(
        "durability: after SIGKILL: tap gone in {tap_gone:?}, virtiofsd {daemons:?} gone in \
         {daemons_gone:?}; left for the next start: {:?} {:?} {:?}",
        setup.api.exists().then_some(&setup.api),
        setup.vsock.exists().then_some(&setup.vsock),
        setup.runtime_entries()
    );
    for socket in [&setup.api, &setup.vsock] {
        let answered = std::os::unix::net::UnixStream::connect(socket).is_ok();
        assert!(!answered, "{} still answers", socket.display());
    }

    // The next zvmm: the disk opens writable at once, the leftovers go.
    let (mut second, serial) = setup.spawn(&ns, 1);
    wait_for_text(&serial, HANG_LINE, &mut second, BOOT_LIMIT);
    let said = second.stderr.text();
    for line in [
        format!(
            "zvmm: removed stale API socket {} (no process listening)",
            setup.api.display()
        ),
        format!(
            "zvmm: removed stale vsock socket {} (no process listening)",
            setup.vsock.display()
        ),
        format!(
            "zvmm: removed stale virtiofsd runtime directory {}",
            runtime_dirs[0].display()
        ),
    ] {
        assert!(
            said.lines().any(|l| l.starts_with(&line)),
            "no {line:?} in:\n{said}"
        );
    }
    assert_eq!(get(&setup.api, "vm.info").json()["state"], "Running");
    assert_eq!(
        setup.runtime_entries().len(),
        1,
        "{:?}",
        setup.runtime_entries()
    );
    assert_eq!(put(&setup.api, "vmm.shutdown", "").status, 204);
    let done = second.finish(Duration::from_secs(15));
    assert_eq!(done.code(), 0, "{done:#?}");
    assert!(
        !setup.api.exists() && !setup.vsock.exists(),
        "sockets left after exit"
    );
    assert_eq!(setup.runtime_entries(), Vec::<PathBuf>::new());
    assert!(setup.daemons().is_empty(), "virtiofsd left after exit");
    assert!(!ns.links().unwrap().contains(&"zdur0".to_string()));
    assert!(!first_stderr.contains("panicked"), "{first_stderr}");
}

/// Something that is not a stale socket is never removed: a socket a
/// process listens on, a regular file, a directory of a live zvmm.
#[test]
fn live_sockets_and_other_files_are_never_removed() {
    let dir = scratch_dir("durable-keep");
    let live = dir.join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let file = dir.join("file.sock");
    std::fs::write(&file, b"not a socket").unwrap();
    for path in [&live, &file] {
        for (option, value) in [
            ("--api-socket", format!("path={}", path.display())),
            ("--vsock", format!("cid=3,socket={}", path.display())),
        ] {
            let serial = dir.join("serial.log");
            let command = probe_command("", &serial, &[option.into(), value]);
            let done = zvmm_tests::zvmm::run_with_limit(command, Duration::from_secs(20));
            assert_eq!(done.code(), 1, "{option} {}: {done:#?}", path.display());
            assert_eq!(done.stderr.lines().count(), 1, "{done:#?}");
            assert!(
                done.stderr.contains(&path.display().to_string()),
                "{done:#?}"
            );
            assert!(!done.stderr.contains("removed"), "{done:#?}");
        }
    }
    assert!(socket_listening(&live), "the live socket was touched");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
    // A runtime directory of a zvmm that still runs (this process's pid).
    let runtime = dir.join("run");
    let mine = runtime.join(format!("zvmm-{}-0", std::process::id()));
    std::fs::create_dir_all(&mine).unwrap();
    let share = dir.join("share");
    std::fs::create_dir(&share).unwrap();
    let serial = dir.join("serial-fs.log");
    let mut command = probe_command("", &serial, &["--fs".into(), share.display().to_string()]);
    command
        .env("XDG_RUNTIME_DIR", &runtime)
        .args(["--timeout", "1"]);
    let done = zvmm_tests::zvmm::run_with_limit(command, Duration::from_secs(30));
    assert!(!done.stderr.contains("removed stale"), "{done:#?}");
    assert!(mine.is_dir(), "a live zvmm's runtime directory was removed");
}
