//! The probe's side of the network test (`probe.net.*` options): a tiny
//! IPv4 host on the first virtio-net device that answers ARP and ICMP echo
//! at all times, learns the peer's MAC by ARP, and follows the host's
//! commands over UDP: a checksummed burst each way, then optional
//! throughput bursts. Every wait is bounded by `probe.net.wait`.
//!
//! Ports (both sides): [`CTRL_PORT`] carries one-line ASCII commands and
//! answers, [`DATA_PORT`] the bursts. The protocol, in order:
//!
//! | who | datagram (to the other's port) | meaning |
//! |---|---|---|
//! | probe | `READY mac=M ip=A` (ctrl, every second until the host speaks) | up, peer MAC known |
//! | host | `SEND` (ctrl) | send the burst |
//! | probe | `probe.net.tx` datagrams (data), then `END count=N bytes=B fnv1a64=H` (ctrl) | the burst and what it held |
//! | host | datagrams (data), each window followed by `SYNC K` (ctrl) | K datagrams sent so far |
//! | probe | `ACK K rx=N` (ctrl) | everything before the SYNC was handled |
//! | host | `END count=N bytes=B fnv1a64=H` (ctrl) | the host's burst is over |
//! | probe | `RESULT count=N bytes=B fnv1a64=H match=0\|1` (ctrl) | what arrived |
//! | host | `BENCH tx size=S` / `BENCH rx size=S` (ctrl) | benchmark burst (`probe.net.bench`) |
//! | probe | `BENCH-READY rx size=S` (ctrl) | receiving |
//! | host | `BENCH-END` (ctrl) | receive burst over |
//! | probe | `BENCH-RESULT tx\|rx size=S frames=N bytes=B tsc_cycles=C` (ctrl) | the burst's figures |
//! | host | `DONE` (ctrl) | the probe leaves the device and powers off |
//!
//! Datagram `seq` (from 0 per burst) of `len` bytes: its first four bytes
//! are `seq` little-endian, byte `i >= 4` is [`payload_byte`]`(seq, i)`.

use core::fmt::Write;

use crate::inet::{self, Ip, IpText, Mac, MacText, Packet, UdpChecksum, UdpFlow};
use crate::net::{Nic, RxToken};
use crate::serial::Quoted;
use crate::{fnv1a64_update, io, report, FNV_OFFSET_BASIS};

/// UDP port of commands and answers, on the host and on the probe.
pub const CTRL_PORT: u16 = 7000;
/// UDP port of burst datagrams, on the host and on the probe.
pub const DATA_PORT: u16 = 7001;
const DEFAULT_TX: u32 = 16;
const DEFAULT_SIZE: usize = 256;
const DEFAULT_WAIT_S: u64 = 30;
const ARP_RETRY_US: u64 = 500_000;
const READY_EVERY_US: u64 = 1_000_000;
/// A receive benchmark ends this long after its last datagram if the
/// host's `BENCH-END` is lost.
const BENCH_IDLE_US: u64 = 2_000_000;
/// Benchmark datagrams queued per notification (below the 32 transmit
/// slots, so a full ring always holds notified frames).
const TX_KICK_BATCH: u32 = 8;
/// Longest command the probe reads.
const CTRL_MAX: usize = 128;
/// Unknown commands reported one by one.
const UNKNOWN_SHOWN: u32 = 4;

/// Byte `i` (`i >= 4`) of datagram `seq`: `(seq * 13 + i) & 0xff`.
pub fn payload_byte(seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(13) as usize).wrapping_add(i) as u8
}

/// `TEMPLATE[j] = j & 0xff`: every payload is a window of it, copied
/// rather than computed byte by byte (guest loops are slow here).
static TEMPLATE: [u8; 256 + inet::MAX_UDP_PAYLOAD] = {
    let mut t = [0u8; 256 + inet::MAX_UDP_PAYLOAD];
    let mut i = 0;
    while i < t.len() {
        t[i] = i as u8;
        i += 1;
    }
    t
};

/// Writes datagram `seq`'s payload into `out`.
fn fill_payload(out: &mut [u8], seq: u32) {
    let offset = (seq.wrapping_mul(13) & 0xff) as usize;
    let len = out.len().min(inet::MAX_UDP_PAYLOAD);
    out[..len].copy_from_slice(&TEMPLATE[offset..offset + len]);
    let head = out.len().min(4);
    out[..head].copy_from_slice(&seq.to_le_bytes()[..head]);
}

/// The `probe.net.*` options.
pub struct Options {
    /// `probe.net.ip=`: the probe's address; no exchange without it.
    pub ip: Option<Ip>,
    /// `probe.net.peer=`: the host's address (default: `.1` of the /24).
    pub peer: Option<Ip>,
    /// `probe.net.tx=`: datagrams in the probe's burst.
    pub tx: u32,
    /// `probe.net.size=`: payload bytes of each (at most 1472).
    pub size: usize,
    /// `probe.net.wait=`: seconds the whole exchange may take.
    pub wait_s: u64,
    /// `probe.net.bench=`: datagrams per benchmark burst (none: no
    /// benchmark commands accepted).
    pub bench: Option<u32>,
}

impl Options {
    /// Reads the `probe.net.*` words of `cmdline`, reporting bad ones.
    pub fn parse(cmdline: &[u8]) -> Options {
        let mut o = Options {
            ip: None,
            peer: None,
            tx: DEFAULT_TX,
            size: DEFAULT_SIZE,
            wait_s: DEFAULT_WAIT_S,
            bench: None,
        };
        for word in cmdline.split(|&b| b == b' ') {
            let Some(rest) = word.strip_prefix(b"probe.net.") else {
                continue;
            };
            let Some(at) = rest.iter().position(|&b| b == b'=') else {
                report!("net option unknown={}", Quoted(word));
                continue;
            };
            let (key, value) = (&rest[..at], &rest[at + 1..]);
            let number = || parse_number(value);
            let ok = match key {
                b"ip" => inet::parse_ip(value).map(|ip| o.ip = Some(ip)),
                b"peer" => inet::parse_ip(value).map(|ip| o.peer = Some(ip)),
                b"tx" => number()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(|n| o.tx = n),
                b"size" => number().map(|n| o.size = n as usize),
                b"wait" => number().map(|n| o.wait_s = n),
                b"bench" => number()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(|n| o.bench = Some(n)),
                _ => None,
            };
            if ok.is_none() {
                report!("net option bad={}", Quoted(word));
            }
        }
        if o.size > inet::MAX_UDP_PAYLOAD {
            report!(
                "net option size={} clamped={}",
                o.size,
                inet::MAX_UDP_PAYLOAD
            );
            o.size = inet::MAX_UDP_PAYLOAD;
        }
        o
    }
}

/// Decimal or `0x` hex.
fn parse_number(text: &[u8]) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        let digit = u64::from(char::from(d).to_digit(radix)?);
        acc.checked_mul(u64::from(radix))?.checked_add(digit)
    })
}

/// The `key=` value of a command, as a number.
fn field(message: &[u8], key: &[u8]) -> Option<u64> {
    message.split(|&b| b == b' ').find_map(|word| {
        let value = word.strip_prefix(key)?.strip_prefix(b"=")?;
        parse_number(value)
    })
}

/// A received burst: count, bytes, running FNV-1a.
#[derive(Clone, Copy)]
struct Tally {
    count: u64,
    bytes: u64,
    fnv: u64,
    out_of_order: u64,
}

impl Tally {
    const fn new() -> Tally {
        Tally {
            count: 0,
            bytes: 0,
            fnv: FNV_OFFSET_BASIS,
            out_of_order: 0,
        }
    }
}

/// A receive benchmark in progress.
#[derive(Clone, Copy)]
struct BenchRx {
    size: u64,
    frames: u64,
    bytes: u64,
    first: u64,
    last: u64,
    started: u64,
}

/// A short ASCII message being formatted.
struct Text {
    buf: [u8; CTRL_MAX],
    len: usize,
}

impl Write for Text {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        let room = self.buf.get_mut(self.len..end).ok_or(core::fmt::Error)?;
        room.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Runs the exchange on `nic` as `options` say.
pub fn run(nic: &mut Nic, options: &Options) {
    let Some(me) = options.ip else {
        return;
    };
    let peer = options.peer.unwrap_or([me[0], me[1], me[2], 1]);
    report!(
        "net exchange ip={} peer={} tx={} size={} wait={} bench={}",
        IpText(me),
        IpText(peer),
        options.tx,
        options.size,
        options.wait_s,
        options.bench.unwrap_or(0)
    );
    let mut session = Session::new(nic, options, me, peer);
    if session.resolve_peer() {
        session.serve();
    }
    session.report_counters();
}

/// The exchange's state.
struct Session<'a> {
    nic: &'a mut Nic,
    options: &'a Options,
    me: Ip,
    peer: Ip,
    peer_mac: Option<Mac>,
    tick_us: u64,
    deadline: u64,
    rx: Tally,
    bench_rx: Option<BenchRx>,
    readies: u32,
    host_spoke: bool,
    tsc_reported: bool,
    done: bool,
    arp_replies: u64,
    echo_replies: u64,
    controls: u64,
    unknown: u32,
    ignored: u64,
    malformed: u64,
}

impl<'a> Session<'a> {
    fn new(nic: &'a mut Nic, options: &'a Options, me: Ip, peer: Ip) -> Session<'a> {
        let tick_us = nic.tsc_mhz();
        let deadline = io::rdtsc().saturating_add(options.wait_s * 1_000_000 * tick_us);
        Session {
            nic,
            options,
            me,
            peer,
            peer_mac: None,
            tick_us,
            deadline,
            rx: Tally::new(),
            bench_rx: None,
            readies: 0,
            host_spoke: false,
            tsc_reported: false,
            done: false,
            arp_replies: 0,
            echo_replies: 0,
            controls: 0,
            unknown: 0,
            ignored: 0,
            malformed: 0,
        }
    }

    /// Whether the exchange must end: the deadline passed (reported as
    /// `net timeout phase=PHASE`) or the device broke (already reported).
    fn expired(&self, phase: &str) -> bool {
        if self.nic.broken() {
            return true;
        }
        let late = io::rdtsc() > self.deadline;
        if late {
            report!("net timeout phase={phase}");
        }
        late
    }

    /// Broadcasts ARP requests for the peer (every 500 ms) until it
    /// answers, serving frames meanwhile.
    fn resolve_peer(&mut self) -> bool {
        let mut attempts = 0u32;
        let mut next = 0u64;
        while self.peer_mac.is_none() {
            if self.expired("arp") {
                report!(
                    "net arp peer={} unanswered attempts={attempts}",
                    IpText(self.peer)
                );
                return false;
            }
            let now = io::rdtsc();
            if now >= next {
                attempts += 1;
                next = now + ARP_RETRY_US * self.tick_us;
                self.send_arp(inet::ARP_REQUEST, inet::BROADCAST, self.peer);
            }
            self.serve_one();
        }
        let mac = self.peer_mac.unwrap_or_default();
        report!(
            "net arp peer={} mac={} attempts={attempts}",
            IpText(self.peer),
            MacText(mac)
        );
        true
    }

    /// Serves frames and commands until `DONE`, the deadline, or a broken
    /// device.
    fn serve(&mut self) {
        let mut next_ready = 0u64;
        while !self.done {
            let phase = if self.host_spoke { "serve" } else { "ready" };
            if self.expired(phase) {
                return;
            }
            let now = io::rdtsc();
            if !self.host_spoke && now >= next_ready {
                next_ready = now + READY_EVERY_US * self.tick_us;
                self.readies += 1;
                let (mac, ip) = (MacText(self.nic.mac), IpText(self.me));
                self.send_ctrl(format_args!("READY mac={mac} ip={ip}"));
            }
            self.serve_one();
            self.check_bench_idle();
        }
        report!("net exchange done");
    }

    /// Handles at most one received frame.
    fn serve_one(&mut self) {
        let Some(token) = self.nic.poll() else {
            core::hint::spin_loop();
            return;
        };
        let mut command = None;
        if token.partial {
            self.ignored += 1;
        } else {
            command = self.handle(&token);
        }
        self.nic.release(token);
        if let Some((buf, len)) = command {
            self.command(&buf[..len]);
        }
    }

    /// Handles one frame; a command is copied out (and run after the
    /// buffer is given back).
    fn handle(&mut self, token: &RxToken) -> Option<([u8; CTRL_MAX], usize)> {
        let frame = token.frame();
        match inet::parse(frame) {
            Packet::Arp(arp) => self.on_arp(arp),
            Packet::EchoRequest { dst } if dst == self.me => self.echo(frame),
            Packet::Udp(udp) if udp.dst == self.me && udp.dport == DATA_PORT => {
                self.on_data(udp.payload)
            }
            Packet::Udp(udp) if udp.dst == self.me && udp.dport == CTRL_PORT => {
                let mut buf = [0u8; CTRL_MAX];
                let len = udp.payload.len().min(CTRL_MAX);
                buf[..len].copy_from_slice(&udp.payload[..len]);
                if udp.src == self.peer {
                    self.peer_mac = Some(udp.src_mac);
                }
                return Some((buf, len));
            }
            Packet::Malformed => self.malformed += 1,
            _ => self.ignored += 1,
        }
        None
    }

    fn on_arp(&mut self, arp: inet::Arp) {
        if arp.spa == self.peer && arp.sha != [0; 6] {
            self.peer_mac = Some(arp.sha);
        }
        if arp.op == inet::ARP_REQUEST && arp.tpa == self.me {
            self.arp_replies += 1;
            self.send_arp(inet::ARP_REPLY, arp.sha, arp.spa);
        }
    }

    fn send_arp(&mut self, op: u16, dst: Mac, tpa: Ip) {
        let Some(mut slot) = self.nic.tx_slot() else {
            return;
        };
        let len = inet::arp(slot.frame_mut(), op, (self.nic.mac, self.me), dst, tpa);
        self.nic.send(slot, len, None, true);
    }

    fn echo(&mut self, request: &[u8]) {
        let Some(mut slot) = self.nic.tx_slot() else {
            return;
        };
        match inet::echo_reply(request, slot.frame_mut(), self.nic.mac) {
            Some(len) => {
                self.echo_replies += 1;
                self.nic.send(slot, len, None, true);
            }
            None => self.malformed += 1,
        }
    }

    fn on_data(&mut self, payload: &[u8]) {
        if let Some(bench) = self.bench_rx.as_mut() {
            let now = io::rdtsc();
            if bench.frames == 0 {
                bench.first = now;
            }
            bench.last = now;
            bench.frames += 1;
            bench.bytes += payload.len() as u64;
            return;
        }
        let tally = &mut self.rx;
        if payload.len() >= 4 {
            let seq = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
            tally.out_of_order += u64::from(u64::from(seq) != tally.count);
        }
        tally.count += 1;
        tally.bytes += payload.len() as u64;
        tally.fnv = fnv1a64_update(tally.fnv, payload);
    }

    /// Runs one host command.
    fn command(&mut self, message: &[u8]) {
        if !self.host_spoke {
            self.host_spoke = true;
            report!(
                "net host first_command={} readies={}",
                Quoted(message),
                self.readies
            );
        }
        self.controls += 1;
        let verb = message.split(|&b| b == b' ').next().unwrap_or(&[]);
        let second = message.split(|&b| b == b' ').nth(1).unwrap_or(&[]);
        match (verb, second) {
            (b"SEND", _) => self.tx_burst(),
            (b"SYNC", _) => {
                let (k, rx) = (field_word(second), self.rx.count);
                self.send_ctrl(format_args!("ACK {k} rx={rx}"));
            }
            (b"END", _) => self.end_rx_burst(message),
            (b"BENCH", b"tx") => self.bench_tx(field(message, b"size").unwrap_or(0)),
            (b"BENCH", b"rx") => self.start_bench_rx(field(message, b"size").unwrap_or(0)),
            (b"BENCH-END", _) => self.finish_bench_rx(),
            (b"DONE", _) => self.done = true,
            _ => {
                self.unknown += 1;
                if self.unknown <= UNKNOWN_SHOWN {
                    report!("net command unknown={}", Quoted(message));
                }
            }
        }
    }

    /// Sends `len` payload bytes of a datagram to the peer's `dport`,
    /// filled by `fill`; `offload` asks the device for the checksum.
    fn send_udp(&mut self, dport: u16, len: usize, offload: bool, fill: impl FnOnce(&mut [u8])) {
        self.send_udp_kick(dport, len, offload, true, fill);
    }

    /// [`Session::send_udp`], notifying the device only if `kick`.
    fn send_udp_kick(
        &mut self,
        dport: u16,
        len: usize,
        offload: bool,
        kick: bool,
        fill: impl FnOnce(&mut [u8]),
    ) {
        let Some(mac) = self.peer_mac else {
            return;
        };
        let Some(mut slot) = self.nic.tx_slot() else {
            return;
        };
        let flow = UdpFlow {
            src_mac: self.nic.mac,
            dst_mac: mac,
            src: self.me,
            dst: self.peer,
            sport: dport,
            dport,
        };
        let offload = offload && self.nic.csum_offload();
        let csum = if offload {
            UdpChecksum::Partial
        } else {
            UdpChecksum::None
        };
        let frame = slot.frame_mut();
        let len = len.min(frame.len() - inet::UDP_HEADERS);
        let frame_len = inet::udp_headers(frame, &flow, len, csum);
        fill(&mut frame[inet::UDP_HEADERS..frame_len]);
        let start = (inet::ETH_LEN + inet::IP_LEN) as u16;
        let csum = offload.then_some((start, inet::UDP_CSUM_OFFSET));
        self.nic.send(slot, frame_len, csum, kick);
    }

    fn send_ctrl(&mut self, args: core::fmt::Arguments) {
        let mut text = Text {
            buf: [0; CTRL_MAX],
            len: 0,
        };
        let _ = text.write_fmt(args);
        let bytes = &text.buf[..text.len];
        self.send_udp(CTRL_PORT, bytes.len(), false, |out| {
            out.copy_from_slice(bytes)
        });
    }

    /// `probe.net.tx` datagrams of `probe.net.size` bytes to the peer's
    /// data port (every other one with checksum offload when negotiated),
    /// then `END` with what they held.
    fn tx_burst(&mut self) {
        let (count, size) = (self.options.tx, self.options.size);
        let start = io::rdtsc();
        let mut fnv = FNV_OFFSET_BASIS;
        for seq in 0..count {
            let offload = seq % 2 == 0;
            self.send_udp(DATA_PORT, size, offload, |payload| {
                fill_payload(payload, seq);
                fnv = fnv1a64_update(fnv, payload);
            });
        }
        self.nic.drain_tx();
        let cycles = io::rdtsc().wrapping_sub(start);
        let bytes = u64::from(count) * size as u64;
        report!(
            "net tx_burst count={count} size={size} bytes={bytes} fnv1a64={fnv:#018x} tsc_cycles={cycles}"
        );
        self.send_ctrl(format_args!(
            "END count={count} bytes={bytes} fnv1a64={fnv:#018x}"
        ));
    }

    /// The host's `END count= bytes= fnv1a64=`: reports the receive burst
    /// against the host's figures and answers `RESULT`.
    fn end_rx_burst(&mut self, message: &[u8]) {
        let rx = self.rx;
        let host = (
            field(message, b"count"),
            field(message, b"bytes"),
            field(message, b"fnv1a64"),
        );
        let matches = host == (Some(rx.count), Some(rx.bytes), Some(rx.fnv));
        report!(
            "net rx_burst count={} bytes={} fnv1a64={:#018x} out_of_order={} host_count={} host_bytes={} host_fnv1a64={:#018x} match={}",
            rx.count,
            rx.bytes,
            rx.fnv,
            rx.out_of_order,
            host.0.unwrap_or(0),
            host.1.unwrap_or(0),
            host.2.unwrap_or(0),
            u8::from(matches)
        );
        self.send_ctrl(format_args!(
            "RESULT count={} bytes={} fnv1a64={:#018x} match={}",
            rx.count,
            rx.bytes,
            rx.fnv,
            u8::from(matches)
        ));
    }

    /// `BENCH tx size=S`: `probe.net.bench` datagrams as fast as the
    /// device takes them, notified in batches of [`TX_KICK_BATCH`] (no
    /// checksums; only the sequence number of the payload is written, the
    /// rest is whatever the slot held).
    fn bench_tx(&mut self, size: u64) {
        let Some(frames) = self.options.bench else {
            self.send_ctrl(format_args!("BENCH-RESULT tx error=no_bench_option"));
            return;
        };
        let size = (size as usize).min(inet::MAX_UDP_PAYLOAD);
        self.report_tsc_once();
        let start = io::rdtsc();
        for seq in 0..frames {
            let kick = seq % TX_KICK_BATCH == TX_KICK_BATCH - 1 || seq + 1 == frames;
            self.send_udp_kick(DATA_PORT, size, false, kick, |payload| {
                let head = payload.len().min(4);
                payload[..head].copy_from_slice(&seq.to_le_bytes()[..head]);
            });
        }
        self.nic.drain_tx();
        let cycles = io::rdtsc().wrapping_sub(start);
        let bytes = u64::from(frames) * size as u64;
        report!("net bench tx size={size} frames={frames} bytes={bytes} tsc_cycles={cycles}");
        self.send_ctrl(format_args!(
            "BENCH-RESULT tx size={size} frames={frames} bytes={bytes} tsc_cycles={cycles}"
        ));
    }

    fn start_bench_rx(&mut self, size: u64) {
        if self.options.bench.is_none() {
            self.send_ctrl(format_args!("BENCH-RESULT rx error=no_bench_option"));
            return;
        }
        self.report_tsc_once();
        self.bench_rx = Some(BenchRx {
            size,
            frames: 0,
            bytes: 0,
            first: 0,
            last: 0,
            started: io::rdtsc(),
        });
        self.send_ctrl(format_args!("BENCH-READY rx size={size}"));
    }

    /// Ends a receive benchmark whose `BENCH-END` did not come.
    fn check_bench_idle(&mut self) {
        let Some(bench) = self.bench_rx else {
            return;
        };
        let since = if bench.frames == 0 {
            bench.started
        } else {
            bench.last
        };
        let idle = BENCH_IDLE_US * self.tick_us * if bench.frames == 0 { 5 } else { 1 };
        if io::rdtsc().wrapping_sub(since) > idle {
            report!("net bench rx idle_end=1");
            self.finish_bench_rx();
        }
    }

    fn finish_bench_rx(&mut self) {
        let Some(b) = self.bench_rx.take() else {
            return;
        };
        let cycles = b.last.wrapping_sub(b.first);
        report!(
            "net bench rx size={} frames={} bytes={} tsc_cycles={cycles}",
            b.size,
            b.frames,
            b.bytes
        );
        self.send_ctrl(format_args!(
            "BENCH-RESULT rx size={} frames={} bytes={} tsc_cycles={cycles}",
            b.size, b.frames, b.bytes
        ));
    }

    /// The TSC rate, once, before the first benchmark line.
    fn report_tsc_once(&mut self) {
        if !core::mem::replace(&mut self.tsc_reported, true) {
            io::report_tsc_khz();
        }
    }

    fn report_counters(&self) {
        report!(
            "net exchange arp_replies={} echo_replies={} commands={} unknown={} ignored={} malformed={}",
            self.arp_replies,
            self.echo_replies,
            self.controls,
            self.unknown,
            self.ignored,
            self.malformed
        );
    }
}

/// A bare number word (`SYNC K`), 0 if it is not one.
fn field_word(word: &[u8]) -> u64 {
    parse_number(word).unwrap_or(0)
}
