//! Runs the PVH probe's virtio-net driver under QEMU (the reference VMM,
//! KVM only): q35 with a modern-only `virtio-net-pci` on a tap inside a
//! network namespace of the test's own. The host pings the probe, takes
//! its UDP burst and sends one back (`zvmm_tests::net::plan`); every fact
//! is checked against what the host saw. This proves the probe's driver
//! and tiny IP stack, so the same exchange under zvmm
//! (`zvmm_net_probe.rs`) judges zvmm's virtio-net.

use std::ffi::OsString;
use std::time::Duration;

use zvmm_tests::net::{
    check_exchange, exchange_cmdline, host_has_link, namespaces, run_exchange, NetNs, Peer,
    GUEST_MAC, HOST_IP,
};
use zvmm_tests::probe::{probe_elf, Flavour, ProbeReport};
use zvmm_tests::qemu::{self, QEMU};
use zvmm_tests::zvmm::Running;

/// Hard limit for one QEMU run.
const LIMIT: Duration = Duration::from_secs(90);
/// How long the probe may take to boot and say `READY`.
const BOOT_LIMIT: Duration = Duration::from_secs(40);
/// The tap inside the namespace (names are per namespace).
const TAP: &str = "ztap0";

/// QEMU q35 arguments: the probe with `cmdline`, one virtio-net-pci on
/// the tap `tap` (no vhost: there is no /dev/vhost-net here).
fn qemu_args(tap: &str, cmdline: &str) -> Vec<OsString> {
    let kernel = probe_elf(Flavour::Pvh);
    let mut args = qemu::boot_args("q35", &kernel, None, cmdline);
    args.extend(
        [
            "-netdev".to_string(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"),
            "-device".to_string(),
            format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC},disable-legacy=on"),
        ]
        .map(OsString::from),
    );
    args
}

/// A namespace with the tap, holding nothing else and routing nowhere.
fn isolated_namespace() -> NetNs {
    let mut ns = NetNs::new().unwrap_or_else(|e| panic!("{e}"));
    ns.add_tap(TAP, &format!("{HOST_IP}/24"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut links = ns.links().unwrap_or_else(|e| panic!("{e}"));
    links.sort();
    assert_eq!(links, ["lo", TAP], "namespace {} holds more", ns.name());
    let routes = ns.routes().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        routes
            .iter()
            .all(|r| r.starts_with("10.77.0.0/24 dev ztap0")),
        "a route leads out of the namespace: {routes:?}"
    );
    ns
}

#[test]
fn virtio_net_under_qemu_q35() {
    let ns = isolated_namespace();
    let ns_name = ns.name().to_string();
    let host_mac = ns.mac(TAP).unwrap_or_else(|e| panic!("{e}"));
    let peer = Peer::bind(&ns).unwrap_or_else(|e| panic!("{e}"));
    let mut command = ns.command(QEMU);
    command.args(qemu_args(TAP, &exchange_cmdline()));
    let vm = Running::spawn(command);
    let exchange = run_exchange(&ns, &peer, BOOT_LIMIT);
    let run = vm.finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("QEMU q35 in {ns_name}: {exchange:#?}\n{run:#?}");
    let exchange = exchange.unwrap_or_else(|e| panic!("{e}: {context}"));
    assert_eq!(report.panic_message(), None, "{context}");
    assert!(report.finished(), "no 'probe: done': {context}");
    check_exchange(&report, &exchange, &host_mac, &context);
    assert!(run.status.is_some_and(|s| s.success()), "{context}");

    drop(peer);
    drop(ns);
    let left = namespaces().unwrap_or_else(|e| panic!("{e}"));
    assert!(!left.contains(&ns_name), "namespace {ns_name} left behind");
    assert!(
        !host_has_link(TAP),
        "{TAP} leaked into the test's namespace"
    );
}

/// Without `probe.net.ip` the probe only sets the device up, reports it
/// and resets it; an absent host never makes it wait.
#[test]
fn virtio_net_setup_only_under_qemu_q35() {
    let ns = isolated_namespace();
    let mut command = ns.command(QEMU);
    command.args(qemu_args(TAP, "console=ttyS0"));
    let run = Running::spawn(command).finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("{run:#?}");
    assert!(report.finished(), "{context}");
    assert!(report.value("net exchange").is_none(), "{context}");
    let nic = zvmm_tests::net::nic_line(&report, &context);
    assert_eq!(nic.get("mac"), Some(GUEST_MAC), "{context}");
    assert_eq!(report.value("net devices="), Some("1"), "{context}");
    assert!(
        report
            .values("net slot=")
            .iter()
            .any(|l| l.ends_with("reset=ok")),
        "{context}"
    );
    assert!(run.status.is_some_and(|s| s.success()), "{context}");
}

/// A host that never answers costs the probe `probe.net.wait` seconds,
/// not a hang: an absent peer (ARP unanswered), then a peer that answers
/// ARP but sends no command (the probe keeps saying READY).
#[test]
fn silent_host_ends_the_exchange_at_the_deadline() {
    let ns = isolated_namespace();
    for (peer, phase) in [("10.77.0.9", "arp"), ("10.77.0.1", "ready")] {
        let cmdline =
            format!("console=ttyS0 probe.net.ip=10.77.0.2 probe.net.peer={peer} probe.net.wait=3");
        let mut command = ns.command(QEMU);
        command.args(qemu_args(TAP, &cmdline));
        let run = Running::spawn(command).finish(LIMIT);
        let report = ProbeReport::parse(&run.stdout);
        let context = format!("peer {peer}: {run:#?}");
        assert!(
            report.has(&format!("net timeout phase={phase}")),
            "{context}"
        );
        assert!(!report.has("net exchange done"), "{context}");
        if phase == "arp" {
            let arp = report.value("net arp peer=10.77.0.9 unanswered attempts=");
            assert!(
                arp.and_then(|n| n.parse::<u32>().ok()) >= Some(5),
                "{context}"
            );
        } else {
            let ready = report.value("net arp peer=10.77.0.1 mac=");
            assert!(ready.is_some(), "{context}");
        }
        assert!(report.finished(), "{context}");
        assert!(run.status.is_some_and(|s| s.success()), "{context}");
    }
}

/// The plumbing alone: a namespace and its tap vanish on drop, and none
/// of it is visible from the test's own namespace meanwhile.
#[test]
fn namespace_is_private_and_removed_on_drop() {
    let ns = isolated_namespace();
    let name = ns.name().to_string();
    assert!(namespaces().unwrap().contains(&name));
    assert!(!host_has_link(TAP), "{TAP} visible outside {name}");
    let socket = ns
        .udp_socket(std::net::SocketAddrV4::new(HOST_IP, 0))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        std::net::UdpSocket::bind((HOST_IP, 0)).is_err(),
        "{HOST_IP} is bindable outside {name}"
    );
    drop(socket);
    drop(ns);
    assert!(!namespaces().unwrap().contains(&name), "{name} left behind");
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
}
