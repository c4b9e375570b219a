//! Network tests' host side: a throw-away network namespace per test
//! (removed on drop, with its tap), commands run inside it (`ip netns exec`:
//! the VMM, `ping`), UDP sockets opened inside it from the test process, and
//! the host half of the probe guest's network exchange
//! (`resources/probe/src/nettest.rs`: `READY`, `SEND`/`END`, windows with
//! `SYNC`/`ACK`, `BENCH ...`, `DONE`).
//!
//! The namespace holds only `lo` and the tap, with no route out, so no
//! test traffic can leave it.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::disk::{has_feature, line};
use crate::probe::{fnv1a64, Fields, ProbeReport};

/// The host's address on the tap (a /24).
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The probe's address (`probe.net.ip=`).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The guest's MAC as the tests configure it.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
/// UDP port of commands and answers (both sides).
pub const CTRL_PORT: u16 = 7000;
/// UDP port of burst datagrams (both sides).
pub const DATA_PORT: u16 = 7001;
/// Largest UDP payload in a 1500-byte-MTU frame.
pub const MAX_PAYLOAD: usize = 1472;
/// Receive buffer asked for on the host's sockets (bursts arrive faster
/// than a test thread may read them).
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// Failures of the network test plumbing.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A program could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An `ip` command failed.
    #[error("`{command}` failed: {stderr}")]
    Ip {
        /// The command line.
        command: String,
        /// What it said.
        stderr: String,
    },
    /// Entering the namespace or opening a socket in it failed.
    #[error("cannot open a UDP socket on {addr} in namespace {ns}")]
    Socket {
        /// The namespace.
        ns: String,
        /// The address.
        addr: SocketAddrV4,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Sending or receiving a datagram failed.
    #[error("udp {what}")]
    Udp {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The probe did not answer in time.
    #[error("no {what} from the probe within {limit:?}")]
    Timeout {
        /// The answer waited for.
        what: String,
        /// How long we waited.
        limit: Duration,
    },
    /// The probe answered something unexpected.
    #[error("unexpected answer to {what}: {answer:?}")]
    Unexpected {
        /// The command.
        what: String,
        /// The answer.
        answer: String,
    },
}

fn ip_command(args: &[&str]) -> Result<String, NetError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn {
            program: "ip (install iproute2)".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(NetError::Ip {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Names of the network namespaces `ip netns` knows.
pub fn namespaces() -> Result<Vec<String>, NetError> {
    let list = ip_command(&["netns", "list"])?;
    Ok(list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Whether an interface called `name` exists in this (the test's)
/// namespace.
pub fn host_has_link(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// A network namespace of its own for one test, `zvmm-<pid>-<n>`, with
/// `lo` up; deleted (taps first) on drop.
pub struct NetNs {
    name: String,
    taps: Vec<String>,
}

impl NetNs {
    /// Creates a fresh namespace.
    pub fn new() -> Result<NetNs, NetError> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("zvmm-{}-{n}", std::process::id());
        // A namespace left by a killed run of the same pid goes first.
        let _ = ip_command(&["netns", "del", &name]);
        ip_command(&["netns", "add", &name])?;
        let ns = NetNs {
            name,
            taps: Vec::new(),
        };
        ip_command(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a persistent tap `tap` with `cidr` (e.g. `10.77.0.1/24`), up.
    pub fn add_tap(&mut self, tap: &str, cidr: &str) -> Result<(), NetError> {
        let ns = self.name.clone();
        ip_command(&["-n", &ns, "tuntap", "add", tap, "mode", "tap"])?;
        self.taps.push(tap.to_string());
        ip_command(&["-n", &ns, "addr", "add", cidr, "dev", tap])?;
        ip_command(&["-n", &ns, "link", "set", tap, "up"])?;
        Ok(())
    }

    /// The interface names inside the namespace.
    pub fn links(&self) -> Result<Vec<String>, NetError> {
        let list = ip_command(&["-n", &self.name, "-o", "link", "show"])?;
        Ok(list
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_string())
            .collect())
    }

    /// The Ethernet address of `link` inside the namespace.
    pub fn mac(&self, link: &str) -> Result<String, NetError> {
        let text = ip_command(&["-n", &self.name, "-o", "link", "show", link])?;
        let mac = text
            .split_whitespace()
            .skip_while(|word| *word != "link/ether")
            .nth(1);
        mac.map(str::to_string).ok_or_else(|| NetError::Ip {
            command: format!("ip -n {} -o link show {link}", self.name),
            stderr: format!("no link/ether in {text:?}"),
        })
    }

    /// Empties the neighbour (ARP) tables of every tap.
    pub fn forget_neighbours(&self) -> Result<(), NetError> {
        for tap in &self.taps {
            ip_command(&["-n", &self.name, "neigh", "flush", "dev", tap])?;
        }
        Ok(())
    }

    /// The IPv4 routes inside the namespace, one per line.
    pub fn routes(&self) -> Result<Vec<String>, NetError> {
        let list = ip_command(&["-n", &self.name, "-4", "route", "show"])?;
        Ok(list.lines().map(str::to_string).collect())
    }

    /// `program` to be run inside the namespace (`ip netns exec`, which
    /// execs it: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// A UDP socket bound to `addr` inside the namespace (opened by a
    /// thread that entered it; a socket stays in the namespace it was
    /// made in), with a large receive buffer.
    pub fn udp_socket(&self, addr: SocketAddrV4) -> Result<UdpSocket, NetError> {
        let path = format!("/run/netns/{}", self.name);
        let fail = |source| NetError::Socket {
            ns: self.name.clone(),
            addr,
            source,
        };
        let opened = std::thread::spawn(move || -> std::io::Result<UdpSocket> {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns(2) on a namespace file we hold open; it only
            // changes this short-lived thread's network namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let socket = UdpSocket::bind(addr)?;
            grow_receive_buffer(&socket);
            Ok(socket)
        })
        .join()
        .map_err(|_| fail(std::io::Error::other("socket thread panicked")))?;
        opened.map_err(fail)
    }

    /// `ping -c COUNT -i 0.2 -W 2 ADDR` inside the namespace.
    pub fn ping(&self, addr: Ipv4Addr, count: u32) -> Result<Ping, NetError> {
        let output = self
            .command("ping")
            .args(["-n", "-c", &count.to_string(), "-i", "0.2", "-W", "2"])
            .arg(addr.to_string())
            .output()
            .map_err(|source| NetError::Spawn {
                program: "ping (install iputils-ping)".into(),
                source,
            })?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        Ok(Ping {
            success: output.status.success(),
            transmitted: ping_count(&text, " packets transmitted"),
            received: ping_count(&text, " received"),
            output: text + &String::from_utf8_lossy(&output.stderr),
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for tap in &self.taps {
            let _ = ip_command(&["-n", &self.name, "link", "del", tap]);
        }
        let _ = ip_command(&["netns", "del", &self.name]);
    }
}

/// Asks for [`SOCKET_BUFFER`] bytes of receive buffer (the `FORCE` form
/// passes `rmem_max` as root); the default is kept if both are refused.
fn grow_receive_buffer(socket: &UdpSocket) {
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt(2) reads one c_int from our stack for a
        // socket we own.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&SOCKET_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// What `ping` reported.
#[derive(Debug)]
pub struct Ping {
    /// Exit status 0.
    pub success: bool,
    /// Echo requests sent.
    pub transmitted: Option<u32>,
    /// Replies received.
    pub received: Option<u32>,
    /// Its output.
    pub output: String,
}

/// The number before `suffix` in ping's summary line.
fn ping_count(text: &str, suffix: &str) -> Option<u32> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    line.split(", ")
        .find_map(|part| part.trim().strip_suffix(suffix.trim_start()))
        .and_then(|n| n.trim().parse().ok())
}

/// Payload of datagram `seq` with `len` bytes: `seq` little-endian in the
/// first four bytes, then byte `i` = `(seq * 13 + i) & 0xff` (the probe's
/// `nettest::payload_byte`).
pub fn payload(seq: u32, len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..len)
        .map(|i| (seq.wrapping_mul(13) as usize).wrapping_add(i) as u8)
        .collect();
    let head = len.min(4);
    bytes[..head].copy_from_slice(&seq.to_le_bytes()[..head]);
    bytes
}

/// A burst as one side saw it: datagrams, payload bytes, FNV-1a 64 over
/// the payloads in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tally {
    /// Datagrams.
    pub count: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// FNV-1a 64 of the concatenated payloads.
    pub fnv1a64: u64,
}

impl Tally {
    /// The tally of `payloads` in order.
    pub fn of(payloads: &[Vec<u8>]) -> Tally {
        Tally {
            count: payloads.len() as u64,
            bytes: payloads.iter().map(|p| p.len() as u64).sum(),
            fnv1a64: fnv1a64(&payloads.concat()),
        }
    }

    /// `count=`, `bytes=` and `fnv1a64=` of a probe line or message.
    pub fn from_fields(fields: &Fields) -> Option<Tally> {
        Some(Tally {
            count: fields.num("count")?,
            bytes: fields.num("bytes")?,
            fnv1a64: fields.num("fnv1a64")?,
        })
    }
}

/// The probe's burst as the host received it.
#[derive(Debug)]
pub struct GuestBurst {
    /// The payloads, in arrival order.
    pub payloads: Vec<Vec<u8>>,
    /// What the probe's `END` said it sent.
    pub claimed: Tally,
}

/// The host's burst and the probe's `RESULT`.
#[derive(Debug)]
pub struct HostBurst {
    /// What the host sent.
    pub sent: Tally,
    /// What the probe says it received.
    pub received: Tally,
    /// The probe's `match=` verdict.
    pub matched: bool,
}

/// One benchmark burst as the probe measured it.
#[derive(Clone, Copy, Debug)]
pub struct BenchResult {
    /// Datagrams the probe sent or received.
    pub frames: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Guest TSC cycles from first to last.
    pub tsc_cycles: u64,
    /// Datagrams the host sent (receive bursts) or received (send bursts).
    pub host_frames: u64,
}

/// The host half of the exchange: the command socket and the data socket
/// on [`HOST_IP`] inside the namespace.
pub struct Peer {
    ctrl: UdpSocket,
    data: UdpSocket,
    guest_ctrl: SocketAddrV4,
    guest_data: SocketAddrV4,
}

impl Peer {
    /// Binds both ports inside `ns` (before the guest starts, so no
    /// datagram finds them closed).
    pub fn bind(ns: &NetNs) -> Result<Peer, NetError> {
        Ok(Peer {
            ctrl: ns.udp_socket(SocketAddrV4::new(HOST_IP, CTRL_PORT))?,
            data: ns.udp_socket(SocketAddrV4::new(HOST_IP, DATA_PORT))?,
            guest_ctrl: SocketAddrV4::new(GUEST_IP, CTRL_PORT),
            guest_data: SocketAddrV4::new(GUEST_IP, DATA_PORT),
        })
    }

    /// Sends one command to the probe.
    pub fn command(&self, text: &str) -> Result<(), NetError> {
        self.ctrl
            .send_to(text.as_bytes(), self.guest_ctrl)
            .map(drop)
            .map_err(|source| NetError::Udp {
                what: "send command",
                source,
            })
    }

    /// The next message from the probe starting with `verb` within
    /// `limit`; others (repeated `READY`s) are skipped.
    pub fn expect(&self, verb: &str, limit: Duration) -> Result<String, NetError> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NetError::Timeout {
                    what: format!("'{verb}'"),
                    limit,
                });
            }
            if let Some(len) = recv_within(&self.ctrl, &mut buf, left)? {
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                if text.split(' ').next() == Some(verb) {
                    return Ok(text);
                }
            }
        }
    }

    /// Waits for the probe's `READY`.
    pub fn wait_ready(&self, limit: Duration) -> Result<String, NetError> {
        self.expect("READY", limit)
    }

    /// `SEND`: collects the probe's burst until its `END`.
    pub fn guest_burst(&self, limit: Duration) -> Result<GuestBurst, NetError> {
        self.drain_data()?;
        self.command("SEND")?;
        let end = self.expect("END", limit)?;
        let claimed =
            Tally::from_fields(&Fields::parse(&end)).ok_or_else(|| NetError::Unexpected {
                what: "SEND".into(),
                answer: end.clone(),
            })?;
        let mut payloads = Vec::new();
        let mut buf = [0u8; 2048];
        // The data went through the same tap before END: all queued now.
        while let Some(len) = recv_within(&self.data, &mut buf, Duration::from_millis(20))? {
            payloads.push(buf[..len].to_vec());
        }
        Ok(GuestBurst { payloads, claimed })
    }

    /// Sends one datagram of each size in `sizes` ([`payload`] `seq` from
    /// 0), `window` at a time followed by `SYNC K` and the probe's `ACK`,
    /// then `END`; returns the probe's `RESULT`.
    pub fn host_burst(
        &self,
        sizes: &[usize],
        window: usize,
        limit: Duration,
    ) -> Result<HostBurst, NetError> {
        let payloads: Vec<Vec<u8>> = (0u32..)
            .zip(sizes)
            .map(|(seq, &len)| payload(seq, len))
            .collect();
        for (chunk_index, chunk) in payloads.chunks(window.max(1)).enumerate() {
            for datagram in chunk {
                self.send_data(datagram)?;
            }
            let sent = chunk_index * window.max(1) + chunk.len();
            self.command(&format!("SYNC {sent}"))?;
            let ack = self.expect("ACK", limit)?;
            if !ack.starts_with(&format!("ACK {sent} ")) {
                return Err(NetError::Unexpected {
                    what: format!("SYNC {sent}"),
                    answer: ack,
                });
            }
        }
        let sent = Tally::of(&payloads);
        self.command(&format!(
            "END count={} bytes={} fnv1a64={:#018x}",
            sent.count, sent.bytes, sent.fnv1a64
        ))?;
        let result = self.expect("RESULT", limit)?;
        let fields = Fields::parse(&result);
        let received = Tally::from_fields(&fields).ok_or_else(|| NetError::Unexpected {
            what: "END".into(),
            answer: result.clone(),
        })?;
        Ok(HostBurst {
            sent,
            received,
            matched: fields.num("match") == Some(1),
        })
    }

    fn send_data(&self, payload: &[u8]) -> Result<(), NetError> {
        self.data
            .send_to(payload, self.guest_data)
            .map(drop)
            .map_err(|source| NetError::Udp {
                what: "send data",
                source,
            })
    }

    /// Throws away datagrams already queued on the data socket.
    fn drain_data(&self) -> Result<u64, NetError> {
        let mut buf = [0u8; 2048];
        let mut count = 0;
        while recv_within(&self.data, &mut buf, Duration::from_millis(1))?.is_some() {
            count += 1;
        }
        Ok(count)
    }

    /// `BENCH tx size=S`: the probe sends its benchmark burst; the host
    /// counts what arrives until the probe's `BENCH-RESULT`.
    pub fn bench_guest_to_host(
        &self,
        size: usize,
        limit: Duration,
    ) -> Result<BenchResult, NetError> {
        self.drain_data()?;
        self.command(&format!("BENCH tx size={size}"))?;
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 2048];
        let mut host_frames = 0;
        loop {
            while recv_within(&self.data, &mut buf, Duration::from_millis(1))?.is_some() {
                host_frames += 1;
            }
            if let Ok(result) = self.expect("BENCH-RESULT", Duration::from_millis(1)) {
                host_frames += self.drain_data()?;
                return bench_result(&result, host_frames, "BENCH tx");
            }
            if Instant::now() >= deadline {
                return Err(NetError::Timeout {
                    what: "'BENCH-RESULT tx'".into(),
                    limit,
                });
            }
        }
    }

    /// `BENCH rx size=S`: once the probe is ready, sends `frames`
    /// datagrams as fast as the socket takes them, then `BENCH-END` (again
    /// every second until the probe's `BENCH-RESULT`).
    pub fn bench_host_to_guest(
        &self,
        size: usize,
        frames: u64,
        limit: Duration,
    ) -> Result<BenchResult, NetError> {
        self.command(&format!("BENCH rx size={size}"))?;
        self.expect("BENCH-READY", limit)?;
        let datagram = payload(0, size);
        for _ in 0..frames {
            self.send_data(&datagram)?;
        }
        let deadline = Instant::now() + limit;
        loop {
            self.command("BENCH-END")?;
            match self.expect("BENCH-RESULT", Duration::from_secs(1)) {
                Ok(result) => return bench_result(&result, frames, "BENCH rx"),
                Err(NetError::Timeout { .. }) if Instant::now() < deadline => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// `DONE`: the probe leaves the device and powers off.
    pub fn done(&self) -> Result<(), NetError> {
        self.command("DONE")
    }
}

fn bench_result(text: &str, host_frames: u64, what: &str) -> Result<BenchResult, NetError> {
    let fields = Fields::parse(text);
    let parsed = (|| {
        Some(BenchResult {
            frames: fields.num("frames")?,
            bytes: fields.num("bytes")?,
            tsc_cycles: fields.num("tsc_cycles")?,
            host_frames,
        })
    })();
    parsed.ok_or_else(|| NetError::Unexpected {
        what: what.into(),
        answer: text.into(),
    })
}

/// One datagram within `limit` (`None` when none came).
fn recv_within(
    socket: &UdpSocket,
    buf: &mut [u8],
    limit: Duration,
) -> Result<Option<usize>, NetError> {
    let fail = |source| NetError::Udp {
        what: "receive",
        source,
    };
    socket
        .set_read_timeout(Some(limit.max(Duration::from_micros(100))))
        .map_err(fail)?;
    match socket.recv(buf) {
        Ok(len) => Ok(Some(len)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(fail(e)),
    }
}

/// virtio-net feature bits the tests check (virtio 1.2, 5.1.3).
pub mod feature {
    /// `VIRTIO_NET_F_CSUM`.
    pub const CSUM: u32 = 0;
    /// `VIRTIO_NET_F_GUEST_CSUM`.
    pub const GUEST_CSUM: u32 = 1;
    /// `VIRTIO_NET_F_MAC`.
    pub const MAC: u32 = 5;
    /// `VIRTIO_NET_F_MRG_RXBUF`.
    pub const MRG_RXBUF: u32 = 15;
    /// `VIRTIO_NET_F_STATUS`.
    pub const STATUS: u32 = 16;
    /// `VIRTIO_RING_F_INDIRECT_DESC`.
    pub const INDIRECT_DESC: u32 = 28;
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub const EVENT_IDX: u32 = 29;
    /// `VIRTIO_F_VERSION_1`.
    pub const VERSION_1: u32 = 32;
}

/// Features every device under test must offer, and the probe accept.
pub const REQUIRED_FEATURES: [u32; 8] = [
    feature::VERSION_1,
    feature::MAC,
    feature::STATUS,
    feature::MRG_RXBUF,
    feature::CSUM,
    feature::GUEST_CSUM,
    feature::EVENT_IDX,
    feature::INDIRECT_DESC,
];

/// The exchange both VMMs' tests run.
pub mod plan {
    /// Datagrams in the probe's burst (`probe.net.tx`).
    pub const GUEST_TX: u32 = 24;
    /// Their payload bytes (`probe.net.size`): full-MTU frames.
    pub const GUEST_SIZE: usize = super::MAX_PAYLOAD;
    /// Payload sizes of the host's burst, in order (repeated
    /// [`HOST_ROUNDS`] times): empty, tiny, minimum-frame and MTU-sized.
    pub const HOST_SIZES: [usize; 8] = [64, 1472, 18, 512, 0, 1000, 4, 1471];
    /// Repetitions of [`HOST_SIZES`].
    pub const HOST_ROUNDS: usize = 5;
    /// Host datagrams between `SYNC`s (the probe has 64 receive buffers).
    pub const WINDOW: usize = 16;
    /// Echo requests `ping` sends.
    pub const PINGS: u32 = 4;
    /// Seconds the probe gives the whole exchange (`probe.net.wait`).
    pub const PROBE_WAIT_S: u64 = 45;
}

/// The probe's command line for the exchange of [`plan`].
pub fn exchange_cmdline() -> String {
    format!(
        "console=ttyS0 probe.net.ip={GUEST_IP} probe.net.peer={HOST_IP} probe.net.tx={} probe.net.size={} probe.net.wait={}",
        plan::GUEST_TX,
        plan::GUEST_SIZE,
        plan::PROBE_WAIT_S
    )
}

/// What the host saw of one exchange.
#[derive(Debug)]
pub struct Exchange {
    /// The probe's `READY` message.
    pub ready: String,
    /// `ping` of the probe.
    pub ping: Ping,
    /// The probe's burst.
    pub guest: GuestBurst,
    /// The host's burst.
    pub host: HostBurst,
}

/// The host's burst of [`plan`]: sizes in order.
pub fn host_sizes() -> Vec<usize> {
    plan::HOST_SIZES.repeat(plan::HOST_ROUNDS)
}

/// Runs [`plan`] against a booting probe: `READY` (within `boot_limit`),
/// ping, the probe's burst, the host's burst, `DONE`. `DONE` is sent even
/// when a step fails, so the probe powers off and its report shows why.
pub fn run_exchange(ns: &NetNs, peer: &Peer, boot_limit: Duration) -> Result<Exchange, NetError> {
    let step = Duration::from_secs(20);
    let result = (|| {
        let ready = peer.wait_ready(boot_limit)?;
        // Forget the probe's MAC (learnt from its own ARP request) so
        // ping has to ask: the probe must answer ARP.
        ns.forget_neighbours()?;
        let ping = ns.ping(GUEST_IP, plan::PINGS)?;
        let guest = peer.guest_burst(step)?;
        let host = peer.host_burst(&host_sizes(), plan::WINDOW, step)?;
        Ok(Exchange {
            ready,
            ping,
            guest,
            host,
        })
    })();
    let _ = peer.done();
    result
}

/// The fields of the probe's `net slot=N mac=...` line.
pub fn nic_line(report: &ProbeReport, context: &str) -> Fields {
    let rest = report
        .values("net slot=")
        .into_iter()
        .find(|rest| rest.contains(" mac="))
        .unwrap_or_else(|| panic!("no 'net slot=N mac=' line: {context}"));
    Fields::parse(&format!("slot={rest}"))
}

/// The fields of the first probe line starting with `prefix`.
pub fn report_line(report: &ProbeReport, prefix: &str, context: &str) -> Fields {
    let rest = report
        .value(prefix)
        .unwrap_or_else(|| panic!("no '{prefix}...' line: {context}"));
    Fields::parse(rest)
}

/// Every check of an exchange against the probe's report: the device's
/// configuration and features, ARP both ways, every ping answered, the
/// probe's burst received byte-exact (pattern and checksum), the host's
/// burst reported with the host's count and checksum, clean headers, no
/// misbehaviour, and a device reset at the end. `host_mac` is the tap's.
pub fn check_exchange(report: &ProbeReport, exchange: &Exchange, host_mac: &str, context: &str) {
    check_device(report, context);
    let arp = report_line(report, "net arp ", context);
    assert_eq!(arp.get("peer"), Some(&*HOST_IP.to_string()), "{context}");
    assert_eq!(arp.get("mac"), Some(host_mac), "{context}");
    assert!(
        exchange.ready.contains(&format!("mac={GUEST_MAC}")),
        "{context}"
    );

    let ping = &exchange.ping;
    assert!(ping.success, "ping failed: {ping:?}: {context}");
    assert_eq!(ping.transmitted, Some(plan::PINGS), "{ping:?}: {context}");
    assert_eq!(ping.received, Some(plan::PINGS), "{ping:?}: {context}");

    let guest = &exchange.guest;
    assert_eq!(guest.payloads.len(), plan::GUEST_TX as usize, "{context}");
    for (seq, got) in (0u32..).zip(&guest.payloads) {
        assert!(
            *got == payload(seq, plan::GUEST_SIZE),
            "datagram {seq} differs: {context}"
        );
    }
    assert_eq!(Tally::of(&guest.payloads), guest.claimed, "{context}");
    let tx_line = report_line(report, "net tx_burst ", context);
    assert_eq!(
        Tally::from_fields(&tx_line),
        Some(guest.claimed),
        "{context}"
    );

    let host = &exchange.host;
    assert_eq!(host.sent.count, host_sizes().len() as u64, "{context}");
    assert_eq!(host.received, host.sent, "{context}");
    assert!(host.matched, "{context}");
    let rx_line = report_line(report, "net rx_burst ", context);
    assert_eq!(Tally::from_fields(&rx_line), Some(host.sent), "{context}");
    assert_eq!(rx_line.num("out_of_order"), Some(0), "{context}");
    assert_eq!(rx_line.get("match"), Some("1"), "{context}");

    let counters = line(report, "net exchange", "arp_replies=", context);
    let echo = counters.num("echo_replies");
    assert!(echo >= Some(u64::from(plan::PINGS)), "{context}");
    assert!(counters.num("arp_replies") >= Some(1), "{context}");
    assert_eq!(counters.num("malformed"), Some(0), "{context}");
    assert_eq!(counters.num("unknown"), Some(0), "{context}");
    assert!(report.has("net exchange done"), "{context}");
    assert_eq!(report.value("net timeout"), None, "{context}");
}

/// The device half of [`check_exchange`].
fn check_device(report: &ProbeReport, context: &str) {
    let nic = nic_line(report, context);
    let slot = nic.get("slot").unwrap_or_default().to_string();
    assert_eq!(nic.get("mac"), Some(GUEST_MAC), "{context}");
    assert_eq!(nic.get("link"), Some("up"), "{context}");
    let (offered, negotiated) = (nic.num("features"), nic.num("negotiated"));
    for bit in REQUIRED_FEATURES {
        assert!(
            has_feature(offered, bit),
            "feature {bit} not offered: {context}"
        );
        assert!(
            has_feature(negotiated, bit),
            "feature {bit} not accepted: {context}"
        );
    }
    let (offered, negotiated) = (offered.unwrap_or(0), negotiated.unwrap_or(0));
    assert_eq!(negotiated & !offered, 0, "accepted unoffered: {context}");
    let virtio = format!("virtio slot={slot}");
    assert!(
        report.has(&format!("{virtio} driver_ok status=0x0f")),
        "{context}"
    );
    for queue in ["queue=0 ", "queue=1 "] {
        let q = line(report, &virtio, queue, context);
        assert_ne!(q.get("vector"), Some("none"), "{queue}: {context}");
    }
    let stem = format!("net slot={slot}");
    if nic.get("ctrl_vq") == Some("1") {
        let ctrl = line(report, &stem, "ctrl ", context);
        assert_eq!(ctrl.get("ack"), Some("ok"), "{context}");
    }
    let rx = line(report, &stem, "rx frames=", context);
    assert_eq!(rx.num("bad_headers"), Some(0), "{context}");
    assert!(
        report.value(&format!("{stem} rx bad_header")).is_none(),
        "{context}"
    );
    let tx = line(report, &stem, "tx frames=", context);
    for layout in ["single", "chained", "indirect"] {
        assert!(
            tx.num(layout) > Some(0),
            "no {layout} transmit layout: {context}"
        );
    }
    assert!(tx.num("csum_offload") > Some(0), "{context}");
    assert!(
        report.value(&format!("{stem} broken")).is_none(),
        "{context}"
    );
    assert_eq!(
        report.value(&format!("{stem} reset=")),
        Some("ok"),
        "{context}"
    );
    assert_eq!(report.value("net devices="), Some("1"), "{context}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_follows_the_probe_pattern() {
        let p = payload(3, 10);
        assert_eq!(&p[..4], &3u32.to_le_bytes());
        assert_eq!(p[4], (3 * 13 + 4) as u8);
        assert_eq!(p[9], (3 * 13 + 9) as u8);
        assert_eq!(payload(300, 2), vec![44, 1]);
        assert_eq!(payload(7, 0), Vec::<u8>::new());
        let big = payload(20, MAX_PAYLOAD);
        assert_eq!(
            big[MAX_PAYLOAD - 1],
            ((20 * 13 + MAX_PAYLOAD - 1) & 0xff) as u8
        );
    }

    #[test]
    fn tally_matches_the_concatenation() {
        let payloads = vec![payload(0, 5), payload(1, 300)];
        let tally = Tally::of(&payloads);
        assert_eq!((tally.count, tally.bytes), (2, 305));
        assert_eq!(
            tally.fnv1a64,
            fnv1a64(&[payload(0, 5), payload(1, 300)].concat())
        );
        let fields = Fields::parse("END count=2 bytes=305 fnv1a64=0x10");
        let parsed = Tally::from_fields(&fields).unwrap();
        assert_eq!((parsed.count, parsed.bytes, parsed.fnv1a64), (2, 305, 16));
        assert_eq!(Tally::from_fields(&Fields::parse("END count=2")), None);
    }

    #[test]
    fn ping_summary_is_parsed() {
        let text = "PING 10.77.0.2 56(84) bytes of data.\n\
                    64 bytes from 10.77.0.2: icmp_seq=1 ttl=64 time=1.2 ms\n\n\
                    --- 10.77.0.2 ping statistics ---\n\
                    4 packets transmitted, 3 received, 25% packet loss, time 604ms\n";
        assert_eq!(ping_count(text, " packets transmitted"), Some(4));
        assert_eq!(ping_count(text, " received"), Some(3));
        assert_eq!(ping_count("garbage", " received"), None);
    }

    #[test]
    fn bench_results_need_every_field() {
        let ok = bench_result(
            "BENCH-RESULT tx size=64 frames=10 bytes=640 tsc_cycles=99",
            9,
            "x",
        );
        let ok = ok.unwrap();
        assert_eq!(
            (ok.frames, ok.bytes, ok.tsc_cycles, ok.host_frames),
            (10, 640, 99, 9)
        );
        assert!(bench_result("BENCH-RESULT tx error=no_bench_option", 0, "x").is_err());
    }
}
