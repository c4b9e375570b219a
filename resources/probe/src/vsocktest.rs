//! The probe's stream connections over virtio-vsock (`probe.vsock.*`
//! options), with the protocol's full semantics: REQUEST / RESPONSE / RST,
//! RW within the peer's credit (`buf_alloc - (sent - fwd_cnt)`, a
//! CREDIT_REQUEST when it runs out), CREDIT_UPDATE when asked and
//! whenever half of the probe's own `buf_alloc` was consumed, SHUTDOWN
//! both ways, and the event queue's transport reset.
//!
//! | option | meaning |
//! |---|---|
//! | `probe.vsock.listen=PORT` | accept host connections to PORT (Kata's agent listens on 1024) |
//! | `probe.vsock.conns=K` | serve K of them, one after another or at once (default 1) |
//! | `probe.vsock.reply=N` | bytes the probe answers on each (default 4096) |
//! | `probe.vsock.connect=PORT` | connect to host port PORT (repeatable, at most [`MAX_CONNECTS`]) |
//! | `probe.vsock.send=N` | bytes the probe sends on each of those (default 4096) |
//! | `probe.vsock.buf=N` | the probe's `buf_alloc` per connection (default 16384) |
//! | `probe.vsock.wait=S` | seconds the whole test may take (default 60) |
//!
//! A connection the host opened: the host sends its bytes and shuts its
//! sending side (SHUTDOWN with SEND); the probe hashes what came, answers
//! with `reply` bytes of [`pattern`] seeded with the low byte of that
//! hash, then shuts both ways and waits for the host's RST. A connection
//! the probe opened: the probe sends `send` bytes of [`pattern`] seeded
//! with the low byte of the host port and shuts its sending side; the host
//! answers and closes (SHUTDOWN both ways), the probe hashes the answer
//! and resets the connection. Each connection ends with one line:
//!
//! `probe: vsock conn=N kind=listen|connect local=P peer=P rx_bytes=N
//! rx_fnv1a64=H tx_bytes=N tx_fnv1a64=H seed=S end=E credit_violations=N
//! credit_requests_sent=N credit_requests_received=N credit_updates_sent=N`
//!
//! where E is `closed` (the orderly end above), `peer_shutdown` (the host
//! closed before the probe could send everything), `reset` (RST while
//! open), `refused` (RST to a REQUEST), `transport_reset` or `timeout`.

use crate::serial::Quoted;
use crate::vsock::{
    Header, RxPacket, Vsock, EVENT_TRANSPORT_RESET, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
    OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, PAYLOAD_MAX, SHUTDOWN_RCV, SHUTDOWN_SEND,
    TYPE_STREAM,
};
use crate::{fnv1a64_update, io, report, FNV_OFFSET_BASIS};

/// Most `probe.vsock.connect=` ports.
pub const MAX_CONNECTS: usize = 4;
/// Most connections open at once.
const MAX_CONNS: usize = 8;
/// The first local port of connections the probe opens.
const FIRST_LOCAL_PORT: u32 = 50_000;
const DEFAULT_REPLY: u64 = 4096;
const DEFAULT_SEND: u64 = 4096;
const DEFAULT_BUF: u32 = 16 << 10;
const DEFAULT_WAIT_S: u64 = 60;
/// Packets one connection sends per turn, so the others get theirs.
const PACKETS_PER_TURN: usize = 8;
/// Odd packets reported one by one (the rest are only counted).
const ODD_SHOWN: u64 = 4;

/// Byte `i` of a stream seeded `seed`: `(seed + i) & 0xff`.
pub fn pattern(seed: u8, i: u64) -> u8 {
    seed.wrapping_add(i as u8)
}

/// `TEMPLATE[j] = j & 0xff`: every pattern chunk is a window of it.
static TEMPLATE: [u8; 256 + PAYLOAD_MAX] = {
    let mut t = [0u8; 256 + PAYLOAD_MAX];
    let mut i = 0;
    while i < t.len() {
        t[i] = i as u8;
        i += 1;
    }
    t
};

/// `len` bytes of the pattern `seed` from stream offset `at`.
fn pattern_chunk(seed: u8, at: u64, len: usize) -> &'static [u8] {
    let start = usize::from(pattern(seed, at));
    &TEMPLATE[start..start + len.min(PAYLOAD_MAX)]
}

/// The `probe.vsock.*` options.
pub struct Options {
    /// `probe.vsock.listen=`.
    pub listen: Option<u32>,
    /// `probe.vsock.conns=`.
    pub conns: u32,
    /// `probe.vsock.reply=`.
    pub reply: u64,
    /// `probe.vsock.connect=` ports.
    pub connect: [u32; MAX_CONNECTS],
    /// How many of `connect` are given.
    pub connects: usize,
    /// `probe.vsock.send=`.
    pub send: u64,
    /// `probe.vsock.buf=`.
    pub buf: u32,
    /// `probe.vsock.wait=`.
    pub wait_s: u64,
}

impl Options {
    /// Reads the `probe.vsock.*` words of `cmdline`, reporting bad ones.
    pub fn parse(cmdline: &[u8]) -> Options {
        let mut o = Options {
            listen: None,
            conns: 1,
            reply: DEFAULT_REPLY,
            connect: [0; MAX_CONNECTS],
            connects: 0,
            send: DEFAULT_SEND,
            buf: DEFAULT_BUF,
            wait_s: DEFAULT_WAIT_S,
        };
        for word in cmdline.split(|&b| b == b' ') {
            let Some(rest) = word.strip_prefix(b"probe.vsock.") else {
                continue;
            };
            let Some(at) = rest.iter().position(|&b| b == b'=') else {
                report!("vsock option unknown={}", Quoted(word));
                continue;
            };
            let (key, value) = (&rest[..at], &rest[at + 1..]);
            let number = parse_number(value);
            let port = number.and_then(|n| u32::try_from(n).ok());
            let ok = match key {
                b"listen" => port.map(|p| o.listen = Some(p)),
                b"conns" => port.map(|n| o.conns = n),
                b"reply" => number.map(|n| o.reply = n),
                b"connect" if o.connects < MAX_CONNECTS => port.map(|p| {
                    o.connect[o.connects] = p;
                    o.connects += 1;
                }),
                b"send" => number.map(|n| o.send = n),
                b"buf" => port.filter(|&n| n > 0).map(|n| o.buf = n),
                b"wait" => number.map(|n| o.wait_s = n),
                _ => None,
            };
            if ok.is_none() {
                report!("vsock option bad={}", Quoted(word));
            }
        }
        o
    }

    /// Whether any connection is asked for.
    pub fn wanted(&self) -> bool {
        self.listen.is_some() || self.connects > 0
    }
}

fn parse_number(text: &[u8]) -> Option<u64> {
    let text = core::str::from_utf8(text).ok()?;
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Where a connection is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The probe sent a REQUEST.
    Requested,
    /// Data flows.
    Open,
    /// The probe shut both ways and waits for the RST.
    Closing,
}

/// Who opened a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Listen,
    Connect,
}

/// The credit counters of one connection.
#[derive(Clone, Copy, Default)]
struct CreditStats {
    violations: u64,
    requests_sent: u64,
    requests_received: u64,
    updates_sent: u64,
}

/// One connection.
struct Conn {
    number: u32,
    kind: Kind,
    local: u32,
    peer: u32,
    phase: Phase,
    end: Option<&'static str>,
    rx_bytes: u64,
    rx_hash: u64,
    peer_sends_no_more: bool,
    peer_takes_no_more: bool,
    to_send: u64,
    sent: u64,
    seed: Option<u8>,
    tx_hash: u64,
    shutdown_sent: bool,
    fwd_cnt: u32,
    fwd_told: u32,
    owe_update: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_requested: bool,
    credit: CreditStats,
}

impl Conn {
    fn new(number: u32, kind: Kind, local: u32, peer: u32, to_send: u64) -> Conn {
        Conn {
            number,
            kind,
            local,
            peer,
            phase: Phase::Requested,
            end: None,
            rx_bytes: 0,
            rx_hash: FNV_OFFSET_BASIS,
            peer_sends_no_more: false,
            peer_takes_no_more: false,
            to_send,
            sent: 0,
            seed: None,
            tx_hash: FNV_OFFSET_BASIS,
            shutdown_sent: false,
            fwd_cnt: 0,
            fwd_told: 0,
            owe_update: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            credit: CreditStats::default(),
        }
    }

    /// Payload bytes the peer can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent as u32).wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, header: &Header) {
        if header.buf_alloc != self.peer_buf_alloc || header.fwd_cnt != self.peer_fwd_cnt {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    fn finish(&mut self, end: &'static str) {
        if self.end.is_none() {
            self.end = Some(end);
        }
    }

    fn report(&self) {
        let kind = match self.kind {
            Kind::Listen => "listen",
            Kind::Connect => "connect",
        };
        let c = self.credit;
        report!(
            "vsock conn={} kind={kind} local={} peer={} rx_bytes={} rx_fnv1a64={:#018x} tx_bytes={} tx_fnv1a64={:#018x} seed={} end={} credit_violations={} credit_requests_sent={} credit_requests_received={} credit_updates_sent={}",
            self.number,
            self.local,
            self.peer,
            self.rx_bytes,
            self.rx_hash,
            self.sent,
            self.tx_hash,
            self.seed.unwrap_or(0),
            self.end.unwrap_or("open"),
            c.violations,
            c.requests_sent,
            c.requests_received,
            c.updates_sent
        );
    }
}

/// The test's state: the connections and what is left to do.
struct Session<'a> {
    options: &'a Options,
    conns: [Option<Conn>; MAX_CONNS],
    opened: u32,
    listen_served: u32,
    connects_done: usize,
    odd: u64,
    sends_failed: bool,
}

/// Runs the connections `options` asks for on `vsock`.
pub fn run(vsock: &mut Vsock, options: &Options) {
    let mut session = Session {
        options,
        conns: Default::default(),
        opened: 0,
        listen_served: 0,
        connects_done: 0,
        odd: 0,
        sends_failed: false,
    };
    if let Some(port) = options.listen {
        report!(
            "vsock slot={} listening port={port} conns={} reply={} buf_alloc={}",
            vsock.slot,
            options.conns,
            options.reply,
            options.buf
        );
    }
    for (i, &port) in options.connect[..options.connects].iter().enumerate() {
        session.connect(vsock, FIRST_LOCAL_PORT + i as u32, port);
    }
    let start = io::rdtsc();
    let deadline = options.wait_s.saturating_mul(1_000_000) * vsock.tsc_mhz();
    while !session.complete() && !vsock.broken() && !session.sends_failed {
        if io::rdtsc().wrapping_sub(start) > deadline {
            break;
        }
        session.turn(vsock);
    }
    session.end_all("timeout");
    report!(
        "vsock slot={} test listen_served={} connects_done={} odd_packets={} broken={}",
        vsock.slot,
        session.listen_served,
        session.connects_done,
        session.odd,
        u8::from(vsock.broken() || session.sends_failed)
    );
}

impl Session<'_> {
    fn complete(&self) -> bool {
        let listened = self.options.listen.is_none() || self.listen_served >= self.options.conns;
        listened && self.connects_done >= self.options.connects
    }

    /// One round: every received packet and event handled, every
    /// connection given a turn to send, the device told.
    fn turn(&mut self, vsock: &mut Vsock) {
        while let Some(packet) = vsock.poll() {
            self.on_packet(vsock, &packet);
            vsock.release(packet);
        }
        while let Some(id) = vsock.poll_event() {
            report!("vsock slot={} event id={id}", vsock.slot);
            if id == EVENT_TRANSPORT_RESET {
                self.end_all("transport_reset");
            }
        }
        for index in 0..MAX_CONNS {
            if let Some(conn) = self.conns[index].as_mut() {
                let ok = pump(vsock, conn, self.options.buf);
                self.sends_failed |= !ok;
            }
            self.retire(index);
        }
        vsock.kick_tx();
    }

    fn free_index(&self) -> Option<usize> {
        self.conns.iter().position(|c| c.is_none())
    }

    fn connect(&mut self, vsock: &mut Vsock, local: u32, port: u32) {
        let Some(index) = self.free_index() else {
            report!("vsock connect port={port} skipped=too_many");
            self.connects_done += 1;
            return;
        };
        self.opened += 1;
        let conn = Conn::new(self.opened, Kind::Connect, local, port, self.options.send);
        let request = control(&conn, OP_REQUEST, 0, self.options.buf);
        self.sends_failed |= !vsock.send(&request, &[]);
        self.conns[index] = Some(conn);
    }

    fn find(&self, local: u32, peer: u32) -> Option<usize> {
        self.conns.iter().position(|c| {
            c.as_ref()
                .is_some_and(|c| c.local == local && c.peer == peer)
        })
    }

    fn on_packet(&mut self, vsock: &mut Vsock, packet: &RxPacket) {
        let h = packet.header;
        if h.src_cid != HOST_CID || h.dst_cid != vsock.cid || h.type_ != TYPE_STREAM {
            self.odd_packet(vsock, &h, "address");
            if h.type_ != TYPE_STREAM && h.op != OP_RST {
                self.reset(vsock, &h);
            }
            return;
        }
        let Some(index) = self.find(h.dst_port, h.src_port) else {
            return self.on_stray(vsock, &h);
        };
        if let Some(conn) = self.conns[index].as_mut() {
            on_conn_packet(vsock, conn, packet, self.options.buf);
        }
        self.retire(index);
    }

    /// A packet for no connection: a REQUEST to the listening port opens
    /// one, an RST is dropped, anything else is answered with RST.
    fn on_stray(&mut self, vsock: &mut Vsock, h: &Header) {
        match h.op {
            OP_RST => {}
            OP_REQUEST if Some(h.dst_port) == self.options.listen && self.wants_listen() => {
                match self.free_index() {
                    Some(index) => self.accept(vsock, index, h),
                    None => self.reset(vsock, h),
                }
            }
            OP_REQUEST => self.reset(vsock, h),
            _ => {
                self.odd_packet(vsock, h, "no_connection");
                self.reset(vsock, h);
            }
        }
    }

    /// Whether more host connections are to be served than are open.
    fn wants_listen(&self) -> bool {
        let open = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.kind == Kind::Listen)
            .count() as u32;
        self.listen_served + open < self.options.conns
    }

    fn accept(&mut self, vsock: &mut Vsock, index: usize, h: &Header) {
        self.opened += 1;
        let mut conn = Conn::new(
            self.opened,
            Kind::Listen,
            h.dst_port,
            h.src_port,
            self.options.reply,
        );
        conn.update_peer_credit(h);
        conn.phase = Phase::Open;
        let response = control(&conn, OP_RESPONSE, 0, self.options.buf);
        self.sends_failed |= !vsock.send(&response, &[]);
        report!(
            "vsock conn={} accepted local={} peer={} peer_buf_alloc={}",
            conn.number,
            conn.local,
            conn.peer,
            conn.peer_buf_alloc
        );
        self.conns[index] = Some(conn);
    }

    fn reset(&mut self, vsock: &mut Vsock, h: &Header) {
        let rst = Header {
            src_port: h.dst_port,
            dst_port: h.src_port,
            op: OP_RST,
            ..Header::default()
        };
        self.sends_failed |= !vsock.send(&rst, &[]);
    }

    fn odd_packet(&mut self, vsock: &Vsock, h: &Header, why: &str) {
        self.odd += 1;
        if self.odd <= ODD_SHOWN {
            report!(
                "vsock slot={} odd_packet reason={why} src={}:{} dst={}:{} type={} op={}",
                vsock.slot,
                h.src_cid,
                h.src_port,
                h.dst_cid,
                h.dst_port,
                h.type_,
                h.op
            );
        }
    }

    /// Reports and frees connection `index` if it ended.
    fn retire(&mut self, index: usize) {
        let Some(conn) = self.conns[index].take_if(|c| c.end.is_some()) else {
            return;
        };
        conn.report();
        match conn.kind {
            Kind::Listen => self.listen_served += 1,
            Kind::Connect => self.connects_done += 1,
        }
    }

    /// Ends every open connection with `end`.
    fn end_all(&mut self, end: &'static str) {
        for index in 0..MAX_CONNS {
            if let Some(conn) = self.conns[index].as_mut() {
                conn.finish(end);
            }
            self.retire(index);
        }
    }
}

/// A payload-less packet of `conn` carrying the probe's credit.
fn control(conn: &Conn, op: u16, flags: u32, buf: u32) -> Header {
    Header {
        src_port: conn.local,
        dst_port: conn.peer,
        op,
        flags,
        buf_alloc: buf,
        fwd_cnt: conn.fwd_cnt,
        ..Header::default()
    }
}

/// Sends `header` for `conn` (its credit then counts as told).
fn send(vsock: &mut Vsock, conn: &mut Conn, header: Header, payload: &[u8]) -> bool {
    conn.fwd_told = header.fwd_cnt;
    conn.owe_update = false;
    vsock.send(&header, payload)
}

/// Handles a packet for `conn`.
fn on_conn_packet(vsock: &mut Vsock, conn: &mut Conn, packet: &RxPacket, buf: u32) {
    let h = packet.header;
    conn.update_peer_credit(&h);
    match h.op {
        OP_RESPONSE if conn.phase == Phase::Requested => conn.phase = Phase::Open,
        OP_RST => conn.finish(match conn.phase {
            Phase::Requested => "refused",
            Phase::Closing => "closed",
            Phase::Open => "reset",
        }),
        OP_RW if conn.phase != Phase::Requested && !conn.peer_sends_no_more => {
            on_data(conn, packet.payload(), buf)
        }
        OP_SHUTDOWN => on_shutdown(vsock, conn, h.flags, buf),
        OP_CREDIT_UPDATE => {}
        OP_CREDIT_REQUEST => {
            conn.credit.requests_received += 1;
            conn.owe_update = true;
        }
        // A RESPONSE when none is due, data before the RESPONSE or after
        // the peer's SHUTDOWN, an unknown operation: reset.
        _ => {
            let rst = control(conn, OP_RST, 0, buf);
            send(vsock, conn, rst, &[]);
            conn.finish("reset_sent");
        }
    }
}

/// Data arrived: checked against the credit the probe gave, hashed and
/// counted as consumed at once.
fn on_data(conn: &mut Conn, data: &[u8], buf: u32) {
    let len = data.len() as u32;
    // The peer may send up to `buf` bytes past the last fwd_cnt it heard.
    let after = conn.fwd_cnt.wrapping_add(len);
    if after.wrapping_sub(conn.fwd_told) > buf {
        conn.credit.violations += 1;
    }
    conn.rx_hash = fnv1a64_update(conn.rx_hash, data);
    conn.rx_bytes += u64::from(len);
    conn.fwd_cnt = after;
    if conn.fwd_cnt.wrapping_sub(conn.fwd_told) >= buf / 2 {
        conn.owe_update = true;
    }
}

/// The peer shut one or both ways; once it neither sends nor receives,
/// the probe resets the connection.
fn on_shutdown(vsock: &mut Vsock, conn: &mut Conn, flags: u32, buf: u32) {
    conn.peer_sends_no_more |= flags & SHUTDOWN_SEND != 0;
    conn.peer_takes_no_more |= flags & SHUTDOWN_RCV != 0;
    if conn.peer_takes_no_more && conn.peer_sends_no_more {
        let rst = control(conn, OP_RST, 0, buf);
        send(vsock, conn, rst, &[]);
        conn.finish(if conn.sent == conn.to_send && conn.shutdown_sent {
            "closed"
        } else {
            "peer_shutdown"
        });
    }
}

/// Gives `conn` its turn: a credit update it owes, data within the
/// peer's credit (a CREDIT_REQUEST when there is none), its SHUTDOWN once
/// everything went. False if the device took no packet.
fn pump(vsock: &mut Vsock, conn: &mut Conn, buf: u32) -> bool {
    if conn.end.is_some() || conn.phase == Phase::Requested {
        return true;
    }
    if conn.owe_update {
        conn.credit.updates_sent += 1;
        let update = control(conn, OP_CREDIT_UPDATE, 0, buf);
        if !send(vsock, conn, update, &[]) {
            return false;
        }
    }
    let may_send = match conn.kind {
        Kind::Listen => conn.peer_sends_no_more,
        Kind::Connect => true,
    };
    if !may_send || conn.peer_takes_no_more || conn.phase != Phase::Open {
        return true;
    }
    let seed = *conn.seed.get_or_insert(match conn.kind {
        Kind::Listen => conn.rx_hash as u8,
        Kind::Connect => conn.peer as u8,
    });
    for _ in 0..PACKETS_PER_TURN {
        let left = conn.to_send - conn.sent;
        if left == 0 {
            break;
        }
        let credit = conn.peer_credit();
        if credit == 0 {
            if !conn.credit_requested {
                conn.credit_requested = true;
                conn.credit.requests_sent += 1;
                let request = control(conn, OP_CREDIT_REQUEST, 0, buf);
                return send(vsock, conn, request, &[]);
            }
            return true;
        }
        let len = left.min(u64::from(credit)).min(PAYLOAD_MAX as u64) as usize;
        let chunk = pattern_chunk(seed, conn.sent, len);
        let data = control(conn, OP_RW, 0, buf);
        if !send(vsock, conn, data, chunk) {
            return false;
        }
        conn.tx_hash = fnv1a64_update(conn.tx_hash, chunk);
        conn.sent += len as u64;
    }
    if conn.sent == conn.to_send && !conn.shutdown_sent {
        conn.shutdown_sent = true;
        let flags = match conn.kind {
            // Answered: nothing more either way; the host resets.
            Kind::Listen => {
                conn.phase = Phase::Closing;
                SHUTDOWN_SEND | SHUTDOWN_RCV
            }
            // Asked: the host answers, then closes.
            Kind::Connect => SHUTDOWN_SEND,
        };
        let shutdown = control(conn, OP_SHUTDOWN, flags, buf);
        return send(vsock, conn, shutdown, &[]);
    }
    true
}
