//! Soak: 50 VMs created, booted and deleted through the REST API, five
//! zvmm processes at once, ten rounds each; then checks that nothing
//! leaked: each zvmm's fd count and RSS after every `vm.delete` match the
//! first round's, the test process's own fd count and RSS are stable, and
//! no zvmm process is left. A second test checks that a disk image's lock
//! is held while a VM runs and released on `vm.delete`.
//!
//! Every VM is the probe with `probe.action=hang`, so it stays up until
//! shut down; the test waits for its last report line on a serial file
//! before stopping it, so the virtio-blk device (when present) was driven:
//! queue ioeventfds, MSI-X routes and irqfds, the disk thread. Rounds vary
//! the machine: a disk every other round, `shared=on` (memfd) every third,
//! two vCPUs and a shutdown → boot cycle every fourth.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zvmm_tests::api::{
    fd_count, fd_targets, get, processes_mentioning, put, rss_kib, start_api, ProbeVm,
};
use zvmm_tests::disk::make_image;
use zvmm_tests::probe::{probe_elf, Flavour};
use zvmm_tests::zvmm::{scratch_dir, zvmm_bin};

/// zvmm processes running at once.
const PROCESSES: usize = 5;
/// VMs each process creates and deletes, one after the other.
const ROUNDS: usize = 10;
/// The probe's line once it hangs.
const HANG_LINE: &str = "probe: action name=hang";
/// How long a VM gets to reach [`HANG_LINE`].
const BOOT_LIMIT: Duration = Duration::from_secs(15);
/// How long zvmm gets to exit after `vmm.shutdown`.
const EXIT_LIMIT: Duration = Duration::from_secs(5);
/// Allowed RSS growth of a zvmm process between its first and last round.
const ZVMM_RSS_SLACK_KIB: u64 = 1024;
/// Allowed RSS growth of a zvmm process over its last half of rounds.
const ZVMM_LATE_RSS_SLACK_KIB: u64 = 256;
/// Allowed RSS growth of the test process over the whole soak.
const TEST_RSS_SLACK_KIB: u64 = 4096;
/// Equal fd readings that count as settled.
const SETTLE_READS: usize = 4;
/// Size of each disk image.
const DISK_BYTES: u64 = 1 << 20;

/// The tests share this process's fd and RSS readings: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// What one zvmm process looked like after each `vm.delete`.
#[derive(Debug)]
struct Samples {
    pid: u32,
    fds: Vec<usize>,
    rss_kib: Vec<u64>,
    first_fd_targets: Vec<String>,
    last_fd_targets: Vec<String>,
}

/// Waits until `file` holds `count` occurrences of `needle`.
fn wait_for_count(file: &Path, needle: &str, count: usize) {
    let deadline = Instant::now() + BOOT_LIMIT;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} x{count} never appeared in {}:\n{text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `pid`'s fd count once connection teardown (the API server closes the
/// last request's socket on its own thread) has settled: polled until it
/// is at most `baseline`, or the same for [`SETTLE_READS`] reads in a row;
/// a leaked fd stays and is seen.
fn settled_fd_count(pid: u32, baseline: Option<usize>) -> usize {
    let deadline = Instant::now() + Duration::from_millis(500);
    let (mut last, mut same) = (fd_count(pid), 1);
    while Instant::now() < deadline {
        if baseline.is_some_and(|b| last <= b) || (baseline.is_none() && same >= SETTLE_READS) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        let now = fd_count(pid);
        same = if now == last { same + 1 } else { 1 };
        last = now;
    }
    last
}

/// The VM of `round`.
fn round_vm(dir: &Path, disk: &Path, round: usize) -> ProbeVm {
    let mut vm = ProbeVm::new("probe.action=hang");
    vm.serial_file = Some(dir.join(format!("serial-{round}.log")));
    if round.is_multiple_of(2) {
        vm.disks.push(disk.to_path_buf());
    }
    vm.shared = round.is_multiple_of(3);
    if round % 4 == 1 {
        vm.cpus = 2;
    }
    vm
}

/// One zvmm process through [`ROUNDS`] create → boot → delete cycles.
fn soak_one(dir: PathBuf) -> Samples {
    let socket = dir.join("api.sock");
    let disk = dir.join("disk.img");
    make_image(&disk, DISK_BYTES, &[]);
    let zvmm = start_api(&socket, &[]);
    let pid = zvmm.pid();
    let mut samples = Samples {
        pid,
        fds: Vec::new(),
        rss_kib: Vec::new(),
        first_fd_targets: Vec::new(),
        last_fd_targets: Vec::new(),
    };
    for round in 0..ROUNDS {
        let vm = round_vm(&dir, &disk, round);
        let serial = vm.serial_file.clone().unwrap_or_default();
        let created = put(&socket, "vm.create", &vm.json());
        assert_eq!(created.status, 204, "round {round}: {created:?}");
        assert_eq!(put(&socket, "vm.boot", "").status, 204, "round {round}");
        wait_for_count(&serial, HANG_LINE, 1);
        if round % 4 == 1 {
            assert_eq!(put(&socket, "vm.shutdown", "").status, 204);
            assert_eq!(put(&socket, "vm.boot", "").status, 204);
            wait_for_count(&serial, HANG_LINE, 2);
        }
        let info = get(&socket, "vm.info").json();
        assert_eq!(info["state"], "Running", "round {round}: {info}");
        assert_eq!(put(&socket, "vm.shutdown", "").status, 204);
        assert_eq!(put(&socket, "vm.delete", "").status, 204);
        assert_eq!(
            get(&socket, "vm.info").status,
            500,
            "deleted VM still there"
        );
        let baseline = samples.fds.first().copied();
        samples.fds.push(settled_fd_count(pid, baseline));
        samples.rss_kib.push(rss_kib(pid));
        if round == 0 {
            samples.first_fd_targets = fd_targets(pid);
        }
    }
    samples.last_fd_targets = fd_targets(pid);
    assert_eq!(put(&socket, "vmm.shutdown", "").status, 204);
    let done = zvmm.finish(EXIT_LIMIT);
    assert_eq!(done.code(), 0, "{done:#?}");
    assert!(!socket.exists(), "socket left behind");
    samples
}

fn check_samples(samples: &Samples) {
    let first = samples.fds[0];
    assert!(
        samples.fds.iter().all(|&n| n == first),
        "zvmm {} fd count per round {:?}\nfirst: {:?}\nlast: {:?}",
        samples.pid,
        samples.fds,
        samples.first_fd_targets,
        samples.last_fd_targets
    );
    let rss_first = samples.rss_kib[0];
    let rss_max = samples.rss_kib.iter().copied().max().unwrap_or(0);
    assert!(
        rss_max <= rss_first + ZVMM_RSS_SLACK_KIB,
        "zvmm {} RSS per round (KiB) {:?}",
        samples.pid,
        samples.rss_kib
    );
    // Early rounds warm caches up; later ones must not keep growing.
    let half = samples.rss_kib.len() / 2;
    let late_growth = rss_max.saturating_sub(samples.rss_kib[half]);
    assert!(
        late_growth <= ZVMM_LATE_RSS_SLACK_KIB,
        "zvmm {} RSS still grows in the second half (KiB) {:?}",
        samples.pid,
        samples.rss_kib
    );
}

#[test]
fn fifty_vms_created_and_deleted_leak_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Build everything first: the builds open files and spawn cargo.
    zvmm_bin();
    probe_elf(Flavour::Pvh);
    let root = scratch_dir("soak");
    let me = std::process::id();
    let (fds_before, rss_before) = (fd_count(me), rss_kib(me));
    let start = Instant::now();
    let workers: Vec<_> = (0..PROCESSES)
        .map(|index| {
            let dir = root.join(format!("zvmm-{index}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::thread::spawn(move || soak_one(dir))
        })
        .collect();
    let all: Vec<Samples> = workers
        .into_iter()
        .map(|w| w.join().expect("a soak worker failed"))
        .collect();
    let elapsed = start.elapsed();
    for samples in &all {
        check_samples(samples);
    }
    let (fds_after, rss_after) = (fd_count(me), rss_kib(me));
    for samples in &all {
        eprintln!(
            "soak: zvmm {}: fds after each delete {:?}, RSS KiB {:?} (first {} max {} last {})",
            samples.pid,
            samples.fds,
            samples.rss_kib,
            samples.rss_kib[0],
            samples.rss_kib.iter().max().unwrap_or(&0),
            samples.rss_kib.last().unwrap_or(&0)
        );
    }
    eprintln!(
        "soak: {} VMs in {elapsed:.1?}; test process fds {fds_before} -> {fds_after}, \
         RSS {rss_before} -> {rss_after} KiB",
        PROCESSES * ROUNDS
    );
    assert_eq!(fds_after, fds_before, "the test process leaked fds");
    assert!(
        rss_after <= rss_before + TEST_RSS_SLACK_KIB,
        "test process RSS {rss_before} -> {rss_after} KiB"
    );
    let left = processes_mentioning(&root.display().to_string());
    assert!(left.is_empty(), "processes left running: {left:?}");
}

#[test]
fn disk_lock_is_held_while_running_and_released_on_delete() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("soak-lock");
    let disk = dir.join("shared.img");
    make_image(&disk, DISK_BYTES, &[]);
    let (first_socket, second_socket) = (dir.join("first.sock"), dir.join("second.sock"));
    let first = start_api(&first_socket, &[]);
    let second = start_api(&second_socket, &[]);
    let vm = |name: &str| {
        let mut vm = ProbeVm::new("probe.action=hang");
        vm.serial_file = Some(dir.join(format!("{name}.log")));
        vm.disks.push(disk.clone());
        vm
    };
    assert_eq!(
        put(&first_socket, "vm.create", &vm("first").json()).status,
        204
    );
    assert_eq!(put(&first_socket, "vm.boot", "").status, 204);
    wait_for_count(&dir.join("first.log"), HANG_LINE, 1);

    assert_eq!(
        put(&second_socket, "vm.create", &vm("second").json()).status,
        204
    );
    let refused = put(&second_socket, "vm.boot", "");
    assert_eq!(refused.status, 500, "{refused:?}");
    assert!(
        refused.body.contains(&disk.display().to_string()),
        "{refused:?}"
    );
    assert_eq!(put(&first_socket, "vm.delete", "").status, 204);
    let booted = put(&second_socket, "vm.boot", "");
    assert_eq!(booted.status, 204, "lock not released: {booted:?}");
    wait_for_count(&dir.join("second.log"), HANG_LINE, 1);

    for (socket, zvmm) in [(&first_socket, first), (&second_socket, second)] {
        assert_eq!(put(socket, "vmm.shutdown", "").status, 204);
        assert_eq!(zvmm.finish(EXIT_LIMIT).code(), 0);
    }
    let left = processes_mentioning(&dir.display().to_string());
    assert!(left.is_empty(), "processes left running: {left:?}");
}
