//! Soak with every device kind: 200 sequential and 20 concurrent VM
//! lifecycles, through the command line (one zvmm process per VM) and
//! through the REST API (create → boot → shutdown → delete over and over
//! in one long-lived process, and 20 processes at once), each VM with a
//! raw disk, a tap zvmm creates, a shared directory (`--fs`, so a
//! virtiofsd per boot) and vsock. The guest is the tiny one (zvmm_tests::
//! tiny): it powers off at once (CLI) or halts (API), so a lifecycle costs
//! what zvmm costs.
//!
//! Afterwards nothing may be left: no zvmm or virtiofsd process, no tap in
//! the test's network namespace, no socket in the scratch directory, no
//! virtiofsd runtime directory, no new mount in the test process, no fd
//! the test process gained. For the long-lived API process its fd count
//! (memfds among them) after every `vm.delete` must equal the one after
//! the first, and its RSS between the warmed-up 10th and the 200th
//! lifecycle may grow by at most [`RSS_SLACK_KIB`]. Figures (time per
//! lifecycle, fd counts, RSS first/last) go to stderr.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use zvmm_tests::api::{fd_count, fd_targets, get, processes_mentioning, put, rss_kib};
use zvmm_tests::disk::make_image;
use zvmm_tests::net::NetNs;
use zvmm_tests::tiny::{write_tiny_elf, TinyEnd, TINY_LINE};
use zvmm_tests::zvmm::{run_with_limit, scratch_dir, zvmm_bin, Running};

/// Sequential lifecycles (CLI, and API in one process).
const SEQUENTIAL: usize = 200;
/// Lifecycles at once (CLI processes; API processes).
const CONCURRENT: usize = 20;
/// Lifecycles each concurrent API process runs.
const CONCURRENT_ROUNDS: usize = 3;
/// The API process's RSS may grow this much from the 10th lifecycle on.
const RSS_SLACK_KIB: u64 = 1024;
/// The lifecycle after which RSS counts as warmed up.
const WARM: usize = 10;
/// Limit for one CLI VM (it powers off at once; the machine may be busy).
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// One VM's host resources.
struct Vm {
    disk: PathBuf,
    share: PathBuf,
    vsock: PathBuf,
    tap: String,
}

impl Vm {
    fn new(dir: &Path, index: usize) -> Vm {
        let disk = dir.join(format!("disk-{index}.raw"));
        make_image(&disk, 1 << 20, &[]);
        let share = dir.join(format!("share-{index}"));
        std::fs::create_dir_all(&share).unwrap();
        Vm {
            disk,
            share,
            vsock: dir.join(format!("vsock-{index}.sock")),
            tap: format!("zsk{index}"),
        }
    }

    fn cli_args(&self, kernel: &Path) -> Vec<String> {
        vec![
            "--kernel".into(),
            kernel.display().to_string(),
            "--memory".into(),
            "32M".into(),
            "--disk".into(),
            format!("path={}", self.disk.display()),
            "--net".into(),
            format!("tap={}", self.tap),
            "--fs".into(),
            format!("tag=share,path={}", self.share.display()),
            "--vsock".into(),
            format!("cid=3,socket={}", self.vsock.display()),
        ]
    }

    fn json(&self, kernel: &Path) -> String {
        serde_json::json!({
            "payload": {"kernel": kernel, "cmdline": "console=ttyS0"},
            "cpus": {"boot_vcpus": 1},
            "memory": {"size": 32 << 20, "shared": true},
            "serial": {"mode": "Null"},
            "console": {"mode": "Off"},
            "disks": [{"path": self.disk}],
            "net": [{"tap": self.tap}],
            "fs": [{"tag": "share", "path": self.share}],
            "vsock": {"cid": 3, "socket": self.vsock},
        })
        .to_string()
    }
}

/// The tests read this process's fds and mounts: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The scratch directory, namespace and kernels of one test.
struct Soak {
    dir: PathBuf,
    runtime: PathBuf,
    ns: NetNs,
    mounts: Vec<String>,
    fds: usize,
}

impl Soak {
    fn new(name: &str) -> Soak {
        zvmm_bin();
        let dir = scratch_dir(name);
        let runtime = dir.join("run");
        std::fs::create_dir(&runtime).unwrap();
        let ns = NetNs::new().unwrap_or_else(|e| panic!("cannot make a network namespace: {e}"));
        Soak {
            dir,
            runtime,
            ns,
            mounts: mounts(),
            fds: fd_count(std::process::id()),
        }
    }

    /// zvmm with `args` in the namespace, its runtime base in ours.
    fn command(&self, args: &[String]) -> Command {
        let mut command = self.ns.command(zvmm_bin());
        command.args(args).env("XDG_RUNTIME_DIR", &self.runtime);
        command
    }

    /// Checks nothing is left, once every zvmm has exited.
    fn check_nothing_left(&self) {
        let needle = self.dir.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !processes_mentioning(&needle).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = processes_mentioning(&needle);
        assert!(left.is_empty(), "processes left: {:?}", cmdlines(&left));
        let links = self.ns.links().unwrap();
        assert_eq!(
            links,
            vec!["lo".to_string()],
            "taps left in {}",
            self.ns.name()
        );
        let sockets = find(&self.dir, |meta| {
            std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type())
        });
        assert!(sockets.is_empty(), "sockets left: {sockets:?}");
        let runtime: Vec<_> = std::fs::read_dir(&self.runtime).unwrap().collect();
        assert!(runtime.is_empty(), "runtime directories left: {runtime:?}");
        assert_eq!(mounts(), self.mounts, "the mount table changed");
        assert_eq!(
            fd_count(std::process::id()),
            self.fds,
            "the test process leaked fds"
        );
    }
}

/// This process's mount table, sorted, without mount ids (reused) and
/// without the network namespaces `ip netns` pins (tests make their own).
fn mounts() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.contains(" /run/netns/") && !l.contains(" /run/netns "))
        .map(|l| l.split(' ').skip(3).collect::<Vec<_>>().join(" "))
        .collect();
    lines.sort();
    lines
}

fn cmdlines(pids: &[u32]) -> Vec<String> {
    pids.iter()
        .map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            format!(
                "{pid}: {}",
                String::from_utf8_lossy(&raw).replace('\0', " ")
            )
        })
        .collect()
}

/// Paths under `dir` (recursively) whose metadata satisfies `wanted`.
fn find(dir: &Path, wanted: impl Fn(&std::fs::Metadata) -> bool + Copy) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if meta.is_dir() {
            found.extend(find(&entry.path(), wanted));
        } else if wanted(&meta) {
            found.push(entry.path());
        }
    }
    found
}

/// Runs one CLI VM to its power-off and checks it ended well.
fn cli_lifecycle(soak: &Soak, vm: &Vm, kernel: &Path) -> Duration {
    let run = run_with_limit(soak.command(&vm.cli_args(kernel)), RUN_LIMIT);
    assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{run:#?}");
    assert!(run.stdout.contains(TINY_LINE), "{run:#?}");
    assert!(!run.stderr.contains("panicked"), "{run:#?}");
    run.elapsed
}

fn summary(times: &mut [Duration]) -> String {
    times.sort();
    let total: Duration = times.iter().sum();
    format!(
        "mean {:.1?}, median {:.1?}, max {:.1?}",
        total / times.len().max(1) as u32,
        times[times.len() / 2],
        times[times.len() - 1]
    )
}

#[test]
fn cli_lifecycles_with_every_device_leave_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let soak = Soak::new("soak-cli");
    let kernel = write_tiny_elf(&soak.dir, TinyEnd::PowerOff);
    let vm = Vm::new(&soak.dir, 0);
    let start = Instant::now();
    let mut times: Vec<Duration> = (0..SEQUENTIAL)
        .map(|_| cli_lifecycle(&soak, &vm, &kernel))
        .collect();
    let sequential = start.elapsed();
    let vms: Vec<Vm> = (1..=CONCURRENT).map(|i| Vm::new(&soak.dir, i)).collect();
    let start = Instant::now();
    let mut concurrent: Vec<Duration> = std::thread::scope(|scope| {
        let runs: Vec<_> = vms
            .iter()
            .map(|vm| scope.spawn(|| cli_lifecycle(&soak, vm, &kernel)))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let together = start.elapsed();
    soak.check_nothing_left();
    eprintln!(
        "soak cli: {SEQUENTIAL} sequential VMs (disk, tap, --fs, vsock) in {sequential:.1?} \
         ({}); {CONCURRENT} at once in {together:.1?} ({})",
        summary(&mut times),
        summary(&mut concurrent)
    );
}

/// What one API process looked like after each `vm.delete`.
struct Samples {
    fds: Vec<usize>,
    memfds: Vec<usize>,
    rss_kib: Vec<u64>,
    times: Vec<Duration>,
}

/// zvmm serving the API in the namespace, once its socket answers.
fn start_api(soak: &Soak, socket: &Path) -> Running {
    let args = [
        "--api-socket".to_string(),
        format!("path={}", socket.display()),
    ];
    let mut zvmm = Running::spawn(soak.command(&args));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(status) = zvmm.try_status() {
            panic!("zvmm exited with {status}: {}", zvmm.stderr.text());
        }
        assert!(Instant::now() < deadline, "the API socket never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
    zvmm
}

/// `rounds` create → boot → shutdown → delete cycles of `vm` on `socket`.
fn api_lifecycles(zvmm: &Running, socket: &Path, vm: &Vm, kernel: &Path, rounds: usize) -> Samples {
    let pid = zvmm.pid();
    let mut samples = Samples {
        fds: Vec::new(),
        memfds: Vec::new(),
        rss_kib: Vec::new(),
        times: Vec::new(),
    };
    let json = vm.json(kernel);
    for round in 0..rounds {
        let start = Instant::now();
        for (endpoint, body) in [("vm.create", json.as_str()), ("vm.boot", "")] {
            let answer = put(socket, endpoint, body);
            assert_eq!(answer.status, 204, "round {round} {endpoint}: {answer:?}");
        }
        assert_eq!(get(socket, "vm.info").json()["state"], "Running");
        for endpoint in ["vm.shutdown", "vm.delete"] {
            let answer = put(socket, endpoint, "");
            assert_eq!(answer.status, 204, "round {round} {endpoint}: {answer:?}");
        }
        samples.times.push(start.elapsed());
        samples
            .fds
            .push(settled_fds(pid, samples.fds.first().copied()));
        let targets = fd_targets(pid);
        samples
            .memfds
            .push(targets.iter().filter(|t| t.contains("memfd:")).count());
        samples.rss_kib.push(rss_kib(pid));
    }
    samples
}

/// `pid`'s fd count once the last connection's teardown settled (the
/// server closes it on its own thread): polled until it is at most
/// `baseline`, for up to a second; a leaked fd stays and is seen.
fn settled_fds(pid: u32, baseline: Option<usize>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let now = fd_count(pid);
        if baseline.is_none_or(|b| now <= b) || Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stop_api(zvmm: Running, socket: &Path) {
    assert_eq!(put(socket, "vmm.shutdown", "").status, 204);
    let done = zvmm.finish(Duration::from_secs(20));
    assert_eq!(done.code(), 0, "{done:#?}");
    assert!(!done.stderr.contains("panicked"), "{done:#?}");
}

#[test]
fn api_lifecycles_with_every_device_leave_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let soak = Soak::new("soak-api");
    let kernel = write_tiny_elf(&soak.dir, TinyEnd::Idle);
    let socket = soak.dir.join("api.sock");
    let zvmm = start_api(&soak, &socket);
    let vm = Vm::new(&soak.dir, 0);
    let start = Instant::now();
    let mut samples = api_lifecycles(&zvmm, &socket, &vm, &kernel, SEQUENTIAL);
    let sequential = start.elapsed();
    let first_targets = fd_targets(zvmm.pid());
    stop_api(zvmm, &socket);
    let first = samples.fds[0];
    let odd: Vec<_> = samples
        .fds
        .iter()
        .enumerate()
        .filter(|(_, &n)| n != first)
        .collect();
    assert!(
        odd.is_empty(),
        "fd count after each delete changed: {odd:?} (first {first}): {first_targets:?}"
    );
    assert!(
        samples.memfds.iter().all(|&n| n == 0),
        "memfds kept: {:?}",
        samples.memfds
    );
    let (warm, last) = (samples.rss_kib[WARM - 1], samples.rss_kib[SEQUENTIAL - 1]);
    assert!(
        last <= warm + RSS_SLACK_KIB,
        "RSS grew {warm} -> {last} KiB: {:?}",
        samples.rss_kib
    );

    let vms: Vec<Vm> = (1..=CONCURRENT).map(|i| Vm::new(&soak.dir, i)).collect();
    let start = Instant::now();
    let mut concurrent: Vec<Duration> = std::thread::scope(|scope| {
        let runs: Vec<_> = vms
            .iter()
            .enumerate()
            .map(|(i, vm)| {
                let (soak, kernel) = (&soak, &kernel);
                scope.spawn(move || {
                    let socket = soak.dir.join(format!("api-{i}.sock"));
                    let zvmm = start_api(soak, &socket);
                    let samples = api_lifecycles(&zvmm, &socket, vm, kernel, CONCURRENT_ROUNDS);
                    stop_api(zvmm, &socket);
                    assert!(
                        samples.fds.iter().all(|&n| n == samples.fds[0]),
                        "{:?}",
                        samples.fds
                    );
                    samples.times
                })
            })
            .collect();
        runs.into_iter().flat_map(|r| r.join().unwrap()).collect()
    });
    let together = start.elapsed();
    soak.check_nothing_left();
    eprintln!(
        "soak api: {SEQUENTIAL} create/boot/shutdown/delete cycles (disk, tap, fs, vsock) in one \
         process in {sequential:.1?} ({}); fds after each delete {first} (first) .. {} (last), \
         memfds 0; RSS first {} KiB, 10th {warm} KiB, last {last} KiB",
        summary(&mut samples.times),
        samples.fds[SEQUENTIAL - 1],
        samples.rss_kib[0]
    );
    eprintln!(
        "soak api: {CONCURRENT} processes x {CONCURRENT_ROUNDS} cycles at once in {together:.1?} ({})",
        summary(&mut concurrent)
    );
}
