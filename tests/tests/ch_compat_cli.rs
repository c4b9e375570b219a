//! Zero-OS's way of running cloud-hypervisor, against zvmm: the exact
//! container-mode command line its `pkg/vm` builds (flags in the random
//! order a Go map gives, multi-value flags given once with all values),
//! run as `cloud-hypervisor` found in `PATH` (a symlink to zvmm) inside a
//! network namespace with a pre-created persistent tap, one `virtiofsd
//! --xattr --socket-path S --shared-dir D` per share started first, a
//! writable disk and a cloud-init seed disk, the probe guest as kernel.
//! Then what Zero-OS does: finds the process by `/proc/*/cmdline`, reads
//! `vm.info` (boot vCPUs, memory, the serial pty — which opens and shows
//! the guest), `vm.pause` / `vm.resume` / `vm.shutdown` (exactly 204),
//! SIGTERM (the process ends); and a guest that powers off ends the
//! process by itself. Every JSON answer is checked against
//! cloud-hypervisor's OpenAPI spec.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use zvmm_tests::ch::{
    check_answers, cloud_hypervisor_link, process_argv, wait_for_ping, AgentVirtiofsd, Exchange,
    KeepAlive,
};
use zvmm_tests::disk::make_image;
use zvmm_tests::net::NetNs;
use zvmm_tests::probe::{probe_elf, Flavour};
use zvmm_tests::zvmm::{scratch_dir, zvmm_bin, Running};

/// How long the probe gets to reach its hang (2 vCPUs, two disks, two
/// shares, a NIC, on a slow KVM).
const BOOT_LIMIT: Duration = Duration::from_secs(60);
/// Zero-OS sends SIGTERM 5 s after `vm.shutdown`.
const STOP_LIMIT: Duration = Duration::from_secs(5);
/// Zero-OS's kernel command line for a container VM.
const ZOS_CMDLINE: &str =
    "rw console=ttyS0 reboot=k panic=1 root=vroot rootfstype=virtiofs rootdelay=30";
const TAP: &str = "t-zosvm1";
const MAC: &str = "52:54:00:5a:4f:01";

/// The files and daemons of one Zero-OS VM.
struct ZosVm {
    id: String,
    dir: PathBuf,
    _daemons: Vec<AgentVirtiofsd>,
}

impl ZosVm {
    fn prepare(name: &str) -> Self {
        let dir = scratch_dir(name);
        let id = format!("{name}-{}", std::process::id());
        let mut daemons = Vec::new();
        for (index, share) in ["vol1", "root"].iter().enumerate() {
            let shared = dir.join(share);
            std::fs::create_dir_all(&shared).unwrap();
            std::fs::write(shared.join("file.txt"), share.as_bytes()).unwrap();
            let socket = dir.join(format!("virtio-{id}-{index}.socket"));
            daemons.push(AgentVirtiofsd::start(&["--xattr"], &socket, &shared));
        }
        make_image(
            &dir.join("vdisk.raw"),
            16 << 20,
            &[(0, b"zos vdisk".to_vec())],
        );
        let user_data = dir.join("user-data");
        std::fs::write(&user_data, "#cloud-config\nhostname: zos\n").unwrap();
        let seed = Command::new(zvmm_bin())
            .args(["cloud-init", "build"])
            .arg(format!("user-data={}", user_data.display()))
            .arg("-o")
            .arg(dir.join("seed.img"))
            .arg("--force")
            .output()
            .unwrap();
        assert!(seed.status.success(), "{seed:?}");
        std::fs::write(dir.join("initramfs"), b"zos initramfs").unwrap();
        Self {
            id,
            dir,
            _daemons: daemons,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join(&self.id)
    }

    /// The command line's flag groups, as Zero-OS puts them in its map.
    fn flags(&self, cmdline: &str) -> Vec<Vec<String>> {
        let path = |name: &str| self.dir.join(name).display().to_string();
        let share = |index: usize, tag: &str| {
            format!(
                "tag={tag},socket={}",
                path(&format!("virtio-{}-{index}.socket", self.id))
            )
        };
        vec![
            vec![
                "--kernel".into(),
                probe_elf(Flavour::Pvh).display().to_string(),
            ],
            vec!["--initramfs".into(), path("initramfs")],
            vec!["--cmdline".into(), cmdline.into()],
            vec!["--cpus".into(), "boot=2".into()],
            vec!["--memory".into(), "size=2048M,shared=on".into()],
            vec!["--console".into(), "off".into()],
            vec!["--serial".into(), "pty".into()],
            vec!["--api-socket".into(), self.socket().display().to_string()],
            vec!["--fs".into(), share(0, "vol1"), share(1, "vroot")],
            vec![
                "--disk".into(),
                format!("path={},readonly=off", path("vdisk.raw")),
                format!("path={},readonly=on", path("seed.img")),
            ],
            vec!["--net".into(), format!("tap={TAP},mac={MAC}")],
        ]
    }
}

/// `items` in an order drawn from `seed` (printed, so a failure can be
/// replayed), like a Go map iteration.
fn shuffled<T>(mut items: Vec<T>, seed: u64) -> Vec<T> {
    let mut state = seed | 1;
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
    items
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    u64::from(nanos) ^ u64::from(std::process::id())
}

/// Starts `cloud-hypervisor` (found in `PATH`) in `ns` with the flags in
/// a random order.
fn start(ns: &NetNs, bin_dir: &Path, flags: Vec<Vec<String>>) -> (Running, Vec<String>) {
    let seed = seed();
    let args: Vec<String> = shuffled(flags, seed).into_iter().flatten().collect();
    println!("seed {seed}: cloud-hypervisor {}", args.join(" "));
    let path = std::env::var("PATH").unwrap_or_default();
    let mut command = ns.command("cloud-hypervisor");
    command
        .args(&args)
        .env("PATH", format!("{}:{path}", bin_dir.display()));
    (Running::spawn(command), args)
}

fn call(log: &mut Vec<Exchange>, socket: &Path, method: &str, endpoint: &str) -> Exchange {
    let mut client = KeepAlive::connect(socket).expect("connect to the API socket");
    let exchange = client
        .request(method, endpoint, "", &[])
        .unwrap_or_else(|e| panic!("{method} {endpoint}: {e}"));
    log.push(exchange.clone());
    exchange
}

/// Reads the pty at `path` in the background until `needle` shows.
fn watch_pty(path: &str, needle: &'static str) -> mpsc::Receiver<String> {
    let mut pty = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pty.read(&mut chunk) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&seen).into_owned();
            if text.contains(needle) {
                let _ = tx.send(text);
                return;
            }
        }
    });
    rx
}

fn wait_until_exited(zvmm: &mut Running, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if zvmm.try_status().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn zero_os_command_line_and_rest_calls() {
    let mut ns = NetNs::new().unwrap();
    ns.add_tap(TAP, "10.93.0.1/24").unwrap();
    let vm = ZosVm::prepare("ch-zos");
    let bin_dir = cloud_hypervisor_link(&vm.dir);
    let cmdline = format!("{ZOS_CMDLINE} probe.action=hang");
    let (mut zvmm, args) = start(&ns, &bin_dir, vm.flags(&cmdline));
    let socket = vm.socket();
    let mut log = vec![wait_for_ping(&socket, Duration::from_secs(20))];

    // How Zero-OS finds its VMs: argv[0] and the socket's name.
    let argv = process_argv(zvmm.pid());
    assert_eq!(argv[0], "cloud-hypervisor", "{argv:?}");
    assert_eq!(argv[1..], args[..], "argv kept as given");
    let api_socket = argv
        .iter()
        .skip_while(|a| *a != "--api-socket")
        .nth(1)
        .unwrap();
    assert_eq!(Path::new(api_socket).file_name().unwrap(), vm.id.as_str());

    let info = call(&mut log, &socket, "GET", "vm.info");
    assert_eq!(info.status, 200, "{}", info.line());
    let info = info.json();
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2, "{info}");
    assert_eq!(info["config"]["memory"]["size"], 2048u64 << 20, "{info}");
    let pty = info["config"]["serial"]["file"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(pty.starts_with("/dev/pts/"), "{info}");
    let console = watch_pty(&pty, "probe: action name=hang");
    let shown = console.recv_timeout(BOOT_LIMIT).unwrap_or_else(|_| {
        panic!(
            "the pty never showed the probe's hang; stderr:\n{}",
            zvmm.stderr.text()
        )
    });
    assert!(shown.contains("probe: cpus count=2"), "{shown}");
    for endpoint in ["vm.pause", "vm.resume", "vm.shutdown"] {
        let answer = call(&mut log, &socket, "PUT", endpoint);
        assert_eq!(answer.status, 204, "{}", answer.line());
    }
    let info = call(&mut log, &socket, "GET", "vm.info");
    assert_eq!(info.json()["state"], "Shutdown", "{}", info.line());
    zvmm.signal(libc::SIGTERM);
    assert!(
        wait_until_exited(&mut zvmm, STOP_LIMIT),
        "SIGTERM did not end it"
    );
    let done = zvmm.finish(Duration::from_secs(1));
    assert!(!socket.exists(), "API socket left behind: {done:#?}");
    assert!(
        ns.links().unwrap().iter().any(|l| l == TAP),
        "the persistent tap is kept"
    );

    println!("Zero-OS transcript:");
    for exchange in &log {
        println!("  {}", exchange.line());
    }
    let problems = check_answers(&log, &[]);
    assert!(
        problems.is_empty(),
        "answers off the spec:\n{}",
        problems.join("\n")
    );
}

#[test]
fn a_guest_poweroff_ends_the_process() {
    let mut ns = NetNs::new().unwrap();
    ns.add_tap(TAP, "10.94.0.1/24").unwrap();
    let vm = ZosVm::prepare("ch-zos-off");
    let bin_dir = cloud_hypervisor_link(&vm.dir);
    let (mut zvmm, _) = start(&ns, &bin_dir, vm.flags(ZOS_CMDLINE));
    assert!(
        wait_until_exited(&mut zvmm, BOOT_LIMIT),
        "the guest's poweroff did not end the process"
    );
    let done = zvmm.finish(Duration::from_secs(1));
    assert_eq!(done.code(), 0, "{done:#?}");
    assert!(!vm.socket().exists(), "API socket left behind");
}

#[test]
fn cloud_hypervisor_values_zvmm_cannot_honour_are_refused_by_name() {
    let dir = scratch_dir("ch-cli-refused");
    let bin_dir = cloud_hypervisor_link(&dir);
    let kernel = probe_elf(Flavour::Pvh).display().to_string();
    for (args, needle) in [
        (vec!["--disk", "path=/x,direct=on"], "'direct'"),
        (vec!["--memory", "size=1G,hugepages=on"], "hugepage"),
        (vec!["--cpus", "boot=1,kvm_hyperv=on"], "Hyper-V"),
        (
            vec!["--fs", "tag=a,socket=/s,pci_segment=1"],
            "pci_segment=1, but the VM has 1 PCI segment",
        ),
        (vec!["--seccomp", "maybe"], "seccomp"),
    ] {
        let run = Command::new(bin_dir.join("cloud-hypervisor"))
            .args(["--kernel", &kernel])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
    }
    let help = Command::new(bin_dir.join("cloud-hypervisor"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: cloud-hypervisor"));
}
