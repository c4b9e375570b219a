//! `--net` end to end, each test in a network namespace of its own (no
//! traffic or interface leaves it): bad options and bad host interfaces
//! are refused with one line and leave nothing behind; a tap zvmm creates
//! exists (with its host address) while the VM runs and is gone after a
//! power-off, SIGTERM and SIGKILL alike; an existing persistent tap is used
//! as it is and kept; a tap fd handed over by the caller is adopted;
//! `vm.info` reports each NIC (tap, MAC — random and locally administered
//! when not given —, id) and `vm.counters` names its counters by id.
//! The guest side (ping, UDP both ways) is `zvmm_net_probe.rs`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zvmm_tests::api::get;
use zvmm_tests::net::NetNs;
use zvmm_tests::tiny::{write_tiny_elf, TinyEnd, TINY_LINE};
use zvmm_tests::zvmm::{assert_rejected, run_with_limit, scratch_dir, zvmm_bin, Running};

const LIMIT: Duration = Duration::from_secs(20);

fn tiny(name: &str, end: TinyEnd) -> PathBuf {
    write_tiny_elf(&scratch_dir(name), end)
}

/// zvmm inside `ns` with `args` after the tiny guest's kernel.
fn zvmm_in(ns: &NetNs, kernel: &Path, args: &[&str]) -> std::process::Command {
    let mut command = ns.command(zvmm_bin());
    command
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "64M", "--serial", "stdio"])
        .args(args);
    command
}

fn links(ns: &NetNs) -> Vec<String> {
    let mut links = ns.links().unwrap();
    links.sort();
    links
}

fn wait_for_link(ns: &NetNs, link: &str) {
    let deadline = Instant::now() + LIMIT;
    while !ns.links().unwrap().iter().any(|l| l == link) {
        assert!(Instant::now() < deadline, "{link} never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn addresses(ns: &NetNs, link: &str) -> String {
    let output = ns
        .command("ip")
        .args(["-4", "-o", "addr", "show", "dev", link])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn bad_net_options_are_refused_with_one_line() {
    let ns = NetNs::new().unwrap();
    let kernel = tiny("net-bad-options", TinyEnd::PowerOff);
    let cases: [(&[&str], &[&str]); 9] = [
        (
            &["--net", "tap=t0,mac=01:00:5e:00:00:01"],
            &["'mac'", "multicast"],
        ),
        (
            &["--net", "tap=t0,mac=02:00:00:00:01"],
            &["'mac'", "expected a MAC address"],
        ),
        (
            &["--net", "tap=t0,num_queues=3"],
            &["num_queues=3", "even number from 2 to 254"],
        ),
        (&["--net", "tap=t0,num_queues=512"], &["num_queues=512"]),
        (
            &["--net", "tap=t0,queue_size=100"],
            &["queue_size=100", "power of two"],
        ),
        (&["--net", "tap=t0", "tap=t0"], &["tap t0 given twice"]),
        (&["--net", "tap=t0,fd=3"], &["give tap= or fd=, not both"]),
        (&["--net", "fd=1"], &["'fd'", "standard streams"]),
        (&["--net", "tap=t0,speed=10G"], &["unknown key 'speed'"]),
    ];
    for (args, needles) in cases {
        let run = run_with_limit(zvmm_in(&ns, &kernel, args), LIMIT);
        assert_rejected(&run, 2, needles);
    }
    assert_eq!(links(&ns), ["lo"], "nothing may be left behind");
}

#[test]
fn interfaces_that_are_not_usable_taps_are_refused_by_name() {
    let ns = NetNs::new().unwrap();
    let kernel = tiny("net-bad-interfaces", TinyEnd::Idle);
    let veth = ns
        .command("ip")
        .args(["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        .status()
        .unwrap();
    assert!(veth.success());
    for (tap, needle) in [
        ("lo", "interface lo exists but is not a tap device"),
        ("v0", "interface v0 exists but is not a tap device"),
    ] {
        let run = run_with_limit(
            zvmm_in(&ns, &kernel, &["--net", &format!("tap={tap}")]),
            LIMIT,
        );
        assert_rejected(&run, 1, &[&format!("--net tap={tap}"), needle]);
    }
    // A tap another zvmm holds.
    let holder = Running::spawn(zvmm_in(&ns, &kernel, &["--net", "tap=t0"]));
    assert!(
        holder.stdout.wait_for(TINY_LINE, LIMIT),
        "{}",
        holder.stderr.text()
    );
    let run = run_with_limit(zvmm_in(&ns, &kernel, &["--net", "tap=t0"]), LIMIT);
    assert_rejected(&run, 1, &["tap t0 is already in use by another process"]);
    holder.signal(libc::SIGTERM);
    let held = holder.finish(LIMIT);
    assert_eq!(held.code(), 143, "{held:#?}");
    // fd= that is not open, and one that is open but not a tap.
    let run = run_with_limit(zvmm_in(&ns, &kernel, &["--net", "fd=57"]), LIMIT);
    assert_rejected(&run, 1, &["--net fd=57", "fd 57 is not open in zvmm"]);
    let (reader, _writer) = pipe();
    let mut command = zvmm_in(&ns, &kernel, &["--net", "fd=5"]);
    inherit_as(&mut command, reader, 5);
    let run = run_with_limit(command, LIMIT);
    assert_rejected(&run, 1, &["--net fd=5", "fd 5 is not a tap device fd"]);
    assert_eq!(links(&ns), ["lo", "v0", "v1"], "nothing may be left behind");
}

#[test]
fn a_tap_zvmm_creates_lives_exactly_as_long_as_zvmm() {
    let ns = NetNs::new().unwrap();
    let idle = tiny("net-lifetime", TinyEnd::Idle);
    let poweroff = tiny("net-lifetime-off", TinyEnd::PowerOff);
    // Power-off: exit 0, tap gone.
    let run = run_with_limit(zvmm_in(&ns, &poweroff, &["--net", "tap=tc0"]), LIMIT);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(links(&ns), ["lo"], "{run:#?}");
    for (signal, status) in [(libc::SIGTERM, Some(143)), (libc::SIGKILL, None)] {
        let args = ["--net", "tap=tc1,ip=10.91.0.1,mask=255.255.255.0"];
        let vm = Running::spawn(zvmm_in(&ns, &idle, &args));
        assert!(vm.stdout.wait_for(TINY_LINE, LIMIT), "{}", vm.stderr.text());
        wait_for_link(&ns, "tc1");
        let address = addresses(&ns, "tc1");
        assert!(address.contains("10.91.0.1/24"), "{address}");
        vm.signal(signal);
        let run = vm.finish(LIMIT);
        assert_eq!(run.status.and_then(|s| s.code()), status, "{run:#?}");
        assert_eq!(links(&ns), ["lo"], "signal {signal}: tap left behind");
    }
}

#[test]
fn an_existing_persistent_tap_is_used_as_it_is_and_kept() {
    let mut ns = NetNs::new().unwrap();
    ns.add_tap("tp0", "10.92.0.1/24").unwrap();
    let kernel = tiny("net-existing", TinyEnd::PowerOff);
    let args = ["--net", "tap=tp0,ip=10.93.0.1,mac=02:00:00:00:00:42"];
    let run = run_with_limit(zvmm_in(&ns, &kernel, &args), LIMIT);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(
        run.stderr
            .contains("tap tp0 already existed; ip/mask are not applied"),
        "{run:#?}"
    );
    assert_eq!(links(&ns), ["lo", "tp0"]);
    let address = addresses(&ns, "tp0");
    assert!(address.contains("10.92.0.1/24"), "{address}");
    assert!(!address.contains("10.93.0.1"), "{address}");
}

#[test]
fn vm_info_reports_each_nic_and_counters_go_by_id() {
    let mut ns = NetNs::new().unwrap();
    ns.add_tap("tk0", "10.94.0.1/24").unwrap();
    let tap_fd = open_tap_in(&ns, "tk0");
    let dir = scratch_dir("net-info");
    let kernel = write_tiny_elf(&dir, TinyEnd::Idle);
    let socket = dir.join("api.sock");
    let api = format!("path={}", socket.display());
    let mut command = zvmm_in(
        &ns,
        &kernel,
        &[
            "--api-socket",
            &api,
            "--net",
            "tap=tr0",
            "fd=6,mac=02:aa:bb:cc:dd:ee,id=eth1",
        ],
    );
    inherit_as(&mut command, tap_fd, 6);
    let vm = Running::spawn(command);
    assert!(vm.stdout.wait_for(TINY_LINE, LIMIT), "{}", vm.stderr.text());
    let deadline = Instant::now() + LIMIT;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the API socket never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
    let info = get(&socket, "vm.info").json();
    let nets = info["config"]["net"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(nets.len(), 2, "{info}");
    assert_eq!(nets[0]["tap"], "tr0", "{info}");
    let mac = nets[0]["mac"].as_str().unwrap_or_default();
    let first = u8::from_str_radix(mac.get(..2).unwrap_or("01"), 16).unwrap();
    assert_eq!(first & 0x03, 0x02, "random MAC {mac} must be local unicast");
    assert_eq!(nets[0]["num_queues"], 2, "{info}");
    assert_eq!(nets[1]["tap"], "tk0", "the adopted fd's tap: {info}");
    assert_eq!(nets[1]["mac"], "02:aa:bb:cc:dd:ee", "{info}");
    assert_eq!(nets[1]["id"], "eth1", "{info}");
    let counters = get(&socket, "vm.counters").json();
    for id in ["_net0", "eth1"] {
        for key in [
            "rx_bytes",
            "rx_frames",
            "tx_bytes",
            "tx_frames",
            "rx_dropped",
        ] {
            assert!(counters[id][key].is_u64(), "{id}.{key} in {counters}");
        }
    }
    vm.signal(libc::SIGTERM);
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), 143, "{run:#?}");
    assert_eq!(
        links(&ns),
        ["lo", "tk0"],
        "created tap gone, persistent kept"
    );
}

/// A pipe's (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Makes `fd` the child's descriptor `number` (inherited across exec).
fn inherit_as(command: &mut std::process::Command, fd: OwnedFd, number: RawFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; `fd` stays open in the parent
    // (moved into the closure) until the command has been spawned.
    unsafe {
        command.pre_exec(move || {
            let _keep = &fd;
            if libc::dup2(raw, number) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Opens tap `name` of `ns` the way Kata does (IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR), from a thread inside the namespace.
fn open_tap_in(ns: &NetNs, name: &str) -> OwnedFd {
    let path = format!("/run/netns/{}", ns.name());
    let name = name.to_string();
    std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a namespace file we hold; affects this thread only.
        assert_eq!(
            unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        // SAFETY: all-zero is a valid ifreq.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        assert_eq!(
            rc,
            0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        OwnedFd::from(tun)
    })
    .join()
    .unwrap()
}

/// `num_queues=4`: a multi-queue tap with one queue per pair, and a device
/// offering MQ with a control queue (the probe reports what it was offered).
#[test]
fn four_queues_make_a_multi_queue_tap_and_offer_mq() {
    let ns = NetNs::new().unwrap();
    let idle = tiny("net-mq", TinyEnd::Idle);
    let vm = Running::spawn(zvmm_in(&ns, &idle, &["--net", "tap=tq0,num_queues=4"]));
    assert!(vm.stdout.wait_for(TINY_LINE, LIMIT), "{}", vm.stderr.text());
    let output = ns
        .command("ip")
        .args(["-d", "link", "show", "tq0"])
        .output()
        .unwrap();
    let details = String::from_utf8_lossy(&output.stdout);
    assert!(details.contains("multi_queue numqueues 2"), "{details}");
    assert!(details.contains("vnet_hdr on"), "{details}");
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.finish(LIMIT).code(), 143);

    let probe = zvmm_tests::probe::probe_elf(zvmm_tests::probe::Flavour::Pvh);
    let mut command = ns.command(zvmm_bin());
    command
        .arg("--kernel")
        .arg(probe)
        .args(["--memory", "128M", "--serial", "stdio"])
        .args(["--net", "tap=tq0,num_queues=4"]);
    let run = run_with_limit(command, LIMIT);
    assert_eq!(run.code(), 0, "{run:#?}");
    let report = zvmm_tests::probe::ProbeReport::parse(&run.stdout);
    let line = report
        .value("net slot=1 mac=")
        .unwrap_or_else(|| panic!("{run:#?}"));
    let offered = line
        .split(' ')
        .find_map(|field| field.strip_prefix("features="))
        .and_then(|hex| u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("{line}"));
    const MQ: u64 = 1 << 22;
    const CTRL_VQ: u64 = 1 << 17;
    assert_eq!(offered & (MQ | CTRL_VQ), MQ | CTRL_VQ, "{line}");
    assert!(line.contains("ctrl_vq=1"), "{line}");
    assert_eq!(links(&ns), ["lo"]);
}
