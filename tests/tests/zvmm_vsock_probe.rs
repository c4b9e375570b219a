//! zvmm's virtio-vsock end to end with the probe's driver
//! (`probe.vsock.*`): host-initiated connections through the socket with
//! the `CONNECT 1024\n` / `OK <port>\n` handshake, guest-initiated ones to
//! `PATH_<port>`, data both ways checked by hash and pattern (more than
//! either side's receive buffer, so credit has to flow), several
//! connections at once, a host that hangs up mid-stream, a guest port
//! nobody listens on and a host port nobody listens on.
//!
//! There is no QEMU counterpart: QEMU's vsock devices need the host's
//! `/dev/vhost-vsock` (vhost-vsock-pci) or a vhost-user daemon speaking
//! another socket scheme, and this host has no vhost-vsock module.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use zvmm_tests::probe::{fnv1a64, probe_elf, test_bytes, Flavour, ProbeReport};
use zvmm_tests::vsock::{
    conn_by_peer, handshake, listen_seed, pattern, send_then_read, serve_guest, wait_for_socket,
    ConnReport,
};
use zvmm_tests::zvmm::{scratch_dir, spawn_zvmm, Finished, Running};

/// The whole VM run (the probe's own limit is `probe.vsock.wait=`).
const LIMIT: Duration = Duration::from_secs(180);
/// How long the probe may take to reach its vsock driver.
const BOOT_LIMIT: Duration = Duration::from_secs(60);
/// The port the probe listens on, as Kata's agent does.
const AGENT_PORT: u32 = 1024;
/// The probe's `buf_alloc`: far below what the host sends it.
const PROBE_BUF: u32 = 16 << 10;

fn start_probe(socket: &Path, vsock_options: &str) -> Running {
    let probe = probe_elf(Flavour::Pvh);
    let cmdline =
        format!("console=ttyS0 probe.vsock.buf={PROBE_BUF} probe.vsock.wait=150 {vsock_options}");
    let vsock = format!("cid=3,socket={}", socket.display());
    let vm = spawn_zvmm([
        "--kernel",
        &probe.display().to_string(),
        "--memory",
        "128M",
        "--serial",
        "stdio",
        "--timeout",
        "170",
        "--vsock",
        &vsock,
        "--cmdline",
        &cmdline,
    ]);
    assert!(wait_for_socket(socket, BOOT_LIMIT), "{}", vm.stderr.text());
    vm
}

fn wait_listening(vm: &Running) {
    let line = format!("listening port={AGENT_PORT}");
    assert!(
        vm.stdout.wait_for(&line, BOOT_LIMIT),
        "the probe never listened:\n{}\n{}",
        vm.stdout.text(),
        vm.stderr.text()
    );
}

fn finish(vm: Running) -> (ProbeReport, Finished) {
    let run = vm.finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    assert_eq!(report.panic_message(), None, "{run:#?}");
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(report.finished(), "{run:#?}");
    let reset = report
        .lines()
        .iter()
        .any(|l| l.starts_with("vsock slot=") && l.ends_with(" reset=ok"));
    assert!(reset, "the vsock device was not reset: {run:#?}");
    (report, run)
}

/// Whether the probe's end-of-test line reads `summary`.
fn has_summary(report: &ProbeReport, summary: &str) -> bool {
    let tail = format!(" test {summary}");
    report
        .lines()
        .iter()
        .any(|l| l.starts_with("vsock slot=") && l.ends_with(&tail))
}

/// A host listener on `PATH_<port>` that serves one guest connection:
/// reads it to its end, answers `reply`, closes; returns what came.
fn guest_listener(socket: &Path, port: u32, reply: Vec<u8>) -> JoinHandle<Vec<u8>> {
    let path = PathBuf::from(format!("{}_{port}", socket.display()));
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        serve_guest(stream, &reply, LIMIT).unwrap()
    })
}

/// A host-initiated connection: handshake, `data` sent, the probe's
/// answer read; checks the answer's pattern. Returns the host port.
fn host_exchange(socket: &Path, data: &[u8], reply_len: usize) -> u32 {
    let mut conn = handshake(socket, AGENT_PORT, LIMIT).unwrap_or_else(|e| panic!("{e}"));
    let answer = send_then_read(&mut conn, data).unwrap();
    assert_eq!(answer.len(), reply_len, "port {}", conn.host_port);
    assert!(
        answer == pattern(listen_seed(data), reply_len),
        "port {}: the answer is not the probe's pattern",
        conn.host_port
    );
    conn.host_port
}

fn check_listen(report: &ProbeReport, host_port: u32, sent: &[u8], reply_len: usize) {
    let conn = conn_by_peer(report, host_port)
        .unwrap_or_else(|| panic!("no report of port {host_port}: {:#?}", report.lines()));
    let expected = ConnReport {
        kind: "listen".into(),
        local: AGENT_PORT,
        peer: host_port,
        rx_bytes: sent.len() as u64,
        rx_fnv1a64: fnv1a64(sent),
        tx_bytes: reply_len as u64,
        tx_fnv1a64: fnv1a64(&pattern(listen_seed(sent), reply_len)),
        seed: listen_seed(sent),
        end: "closed".into(),
        credit_violations: 0,
    };
    assert_eq!(conn, expected);
}

#[test]
fn host_and_guest_initiated_connections_carry_data_both_ways() {
    let dir = scratch_dir("vsock-probe-both-ways");
    let socket = dir.join("v.sock");
    const GUEST_PORT: u32 = 5000;
    let host_reply = test_bytes(10_240, 7);
    let served = guest_listener(&socket, GUEST_PORT, host_reply.clone());
    let vm = start_probe(
        &socket,
        &format!(
            "probe.vsock.listen={AGENT_PORT} probe.vsock.reply=20000 \
             probe.vsock.connect={GUEST_PORT} probe.vsock.send=300000"
        ),
    );
    wait_listening(&vm);
    // 100 KB towards a probe that advertises 16 KiB: credit must flow.
    let sent = test_bytes(100_000, 1);
    let host_port = host_exchange(&socket, &sent, 20_000);
    assert!(host_port >= 1 << 30, "{host_port}");
    // 300 KB from the probe: more than zvmm's 256 KiB buf_alloc.
    let from_guest = served.join().unwrap();
    assert_eq!(from_guest.len(), 300_000);
    assert!(from_guest == pattern(GUEST_PORT as u8, 300_000));
    let (report, run) = finish(vm);
    check_listen(&report, host_port, &sent, 20_000);
    let conn = conn_by_peer(&report, GUEST_PORT).expect("the guest's connection");
    assert_eq!(conn.kind, "connect", "{run:#?}");
    assert_eq!(conn.tx_fnv1a64, fnv1a64(&from_guest), "{conn:?}");
    assert_eq!(conn.rx_bytes, host_reply.len() as u64, "{conn:?}");
    assert_eq!(conn.rx_fnv1a64, fnv1a64(&host_reply), "{conn:?}");
    assert_eq!(conn.end, "closed", "{conn:?}");
    assert_eq!(conn.credit_violations, 0, "{conn:?}");
    assert!(
        has_summary(
            &report,
            "listen_served=1 connects_done=1 odd_packets=0 broken=0"
        ),
        "{run:#?}"
    );
    assert!(!socket.exists(), "socket left after power-off");
}

#[test]
fn several_connections_at_once_and_peers_that_close() {
    let dir = scratch_dir("vsock-probe-several");
    let socket = dir.join("v.sock");
    // Guest-initiated: 6000 refused (nobody listens), 6001 accepted and
    // closed at once by the host.
    let closer = UnixListener::bind(format!("{}_6001", socket.display())).unwrap();
    let closing = std::thread::spawn(move || drop(closer.accept().unwrap()));
    let vm = start_probe(
        &socket,
        &format!(
            "probe.vsock.listen={AGENT_PORT} probe.vsock.conns=4 probe.vsock.reply=8192 \
             probe.vsock.connect=6000 probe.vsock.connect=6001 probe.vsock.send=100000"
        ),
    );
    wait_listening(&vm);
    // A port nobody listens on in the guest: its RST closes the client.
    let refused = handshake(&socket, AGENT_PORT + 1, LIMIT).err();
    assert_eq!(refused.as_deref(), Some("answer \"\""));
    // Three at once, each with its own data.
    let clients: Vec<_> = (0..3u64)
        .map(|i| {
            let socket = socket.clone();
            let data = test_bytes(30_000 + 1000 * i as usize, 10 + i);
            std::thread::spawn(move || (host_exchange(&socket, &data, 8192), data))
        })
        .collect();
    // One that hangs up after 5000 bytes, without reading the answer.
    let hangup_data = test_bytes(5000, 99);
    let hangup_port = {
        let mut conn = handshake(&socket, AGENT_PORT, LIMIT).unwrap_or_else(|e| panic!("{e}"));
        std::io::Write::write_all(&mut conn.stream, &hangup_data).unwrap();
        conn.host_port
    };
    let exchanged: Vec<(u32, Vec<u8>)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    closing.join().unwrap();
    let (report, run) = finish(vm);
    for (port, data) in &exchanged {
        check_listen(&report, *port, data, 8192);
    }
    let hung = conn_by_peer(&report, hangup_port).expect("the hang-up's report");
    assert_eq!(hung.end, "peer_shutdown", "{hung:?}");
    assert_eq!(
        hung.rx_bytes, 5000,
        "what the host left is still read: {hung:?}"
    );
    assert_eq!(hung.rx_fnv1a64, fnv1a64(&hangup_data), "{hung:?}");
    assert_eq!(hung.tx_bytes, 0, "{hung:?}");
    let refused = conn_by_peer(&report, 6000).expect("port 6000's report");
    assert_eq!(refused.end, "refused", "{refused:?}");
    let closed = conn_by_peer(&report, 6001).expect("port 6001's report");
    assert!(
        ["peer_shutdown", "reset"].contains(&closed.end.as_str()),
        "{closed:?}"
    );
    assert!(
        has_summary(
            &report,
            "listen_served=4 connects_done=2 odd_packets=0 broken=0"
        ),
        "{run:#?}"
    );
    // The client the guest refused is not a connection; the others are.
    assert!(
        UnixStream::connect(&socket).is_err(),
        "socket left after power-off"
    );
}
