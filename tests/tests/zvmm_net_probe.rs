//! zvmm's virtio-net on a tap, end to end: `zvmm --net tap=NAME,mac=MAC`
//! runs inside a network namespace of the test's own, and the probe guest
//! does the exchange of `zvmm_tests::net::plan` with the test process
//! (ping answered, a UDP burst each way checked byte for byte and by
//! checksum, clean receive headers, every transmit layout, the device
//! reset). `probe_net_qemu.rs` runs the same exchange under QEMU, which
//! proves the probe, so a failure here is zvmm's.

use std::time::Duration;

use zvmm_tests::net::{
    check_exchange, exchange_cmdline, host_has_link, namespaces, run_exchange, NetNs, Peer,
    GUEST_MAC, HOST_IP,
};
use zvmm_tests::probe::{probe_elf, Flavour, ProbeReport};
use zvmm_tests::zvmm::{zvmm_bin, Running};

/// Hard limit for one VM run (the test kills zvmm past it).
const LIMIT: Duration = Duration::from_secs(90);
/// zvmm's own limit (`--timeout`), below [`LIMIT`].
const VM_TIMEOUT: &str = "80";
/// How long the probe may take to boot and say `READY`.
const BOOT_LIMIT: Duration = Duration::from_secs(30);
/// The tap inside the namespace (names are per namespace).
const TAP: &str = "ztap0";

/// zvmm arguments: the PVH probe with `cmdline`, one `--net` on `tap`.
fn zvmm_args(tap: &str, cmdline: &str) -> Vec<String> {
    let kernel = probe_elf(Flavour::Pvh).display().to_string();
    vec![
        "--kernel".into(),
        kernel,
        "--memory".into(),
        "256M".into(),
        "--timeout".into(),
        VM_TIMEOUT.into(),
        "--net".into(),
        format!("tap={tap},mac={GUEST_MAC}"),
        "--cmdline".into(),
        cmdline.into(),
    ]
}

fn namespace_with_tap() -> NetNs {
    let mut ns = NetNs::new().unwrap_or_else(|e| panic!("{e}"));
    ns.add_tap(TAP, &format!("{HOST_IP}/24"))
        .unwrap_or_else(|e| panic!("{e}"));
    ns
}

#[test]
fn virtio_net_exchange_under_zvmm() {
    let ns = namespace_with_tap();
    let ns_name = ns.name().to_string();
    let host_mac = ns.mac(TAP).unwrap_or_else(|e| panic!("{e}"));
    let peer = Peer::bind(&ns).unwrap_or_else(|e| panic!("{e}"));
    let mut command = ns.command(zvmm_bin());
    command.args(zvmm_args(TAP, &exchange_cmdline()));
    let vm = Running::spawn(command);
    let exchange = run_exchange(&ns, &peer, BOOT_LIMIT);
    let run = vm.finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("zvmm in {ns_name}: {exchange:#?}\n{run:#?}");
    let exchange = exchange.unwrap_or_else(|e| panic!("{e}: {context}"));
    assert_eq!(report.panic_message(), None, "{context}");
    assert!(report.finished(), "no 'probe: done': {context}");
    check_exchange(&report, &exchange, &host_mac, &context);
    assert_eq!(run.code(), 0, "{context}");

    drop(peer);
    drop(ns);
    let left = namespaces().unwrap_or_else(|e| panic!("{e}"));
    assert!(!left.contains(&ns_name), "namespace {ns_name} left behind");
    assert!(
        !host_has_link(TAP),
        "{TAP} leaked into the test's namespace"
    );
}

/// The device alone (no `probe.net.ip`): set up, reported and reset, and
/// the tap survives zvmm (it is persistent: zvmm must not delete it).
#[test]
fn virtio_net_setup_only_under_zvmm() {
    let ns = namespace_with_tap();
    let mut command = ns.command(zvmm_bin());
    command.args(zvmm_args(TAP, "console=ttyS0"));
    let run = Running::spawn(command).finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("{run:#?}");
    assert!(report.finished(), "{context}");
    let nic = zvmm_tests::net::nic_line(&report, &context);
    assert_eq!(nic.get("mac"), Some(GUEST_MAC), "{context}");
    assert_eq!(nic.get("link"), Some("up"), "{context}");
    assert_eq!(report.value("net devices="), Some("1"), "{context}");
    assert!(
        report
            .values("net slot=")
            .iter()
            .any(|l| l.ends_with("reset=ok")),
        "{context}"
    );
    assert_eq!(run.code(), 0, "{context}");
    let links = ns.links().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        links.iter().any(|l| l == TAP),
        "tap gone after zvmm: {links:?}"
    );
}
