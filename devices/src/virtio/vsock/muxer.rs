//! The connection multiplexer: routes guest packets to their connections
//! (or answers them with a reset), turns host events into packets for the
//! guest, and owns every host-side file descriptor — the listening
//! socket, clients still sending their `CONNECT` line, connected streams —
//! in one epoll set, which the worker also uses for its queues.
//!
//! Guest packets: the source CID must be the guest's and the destination
//! the host, else the packet is dropped and counted. A REQUEST to host
//! port P connects to `PATH_P` (RESPONSE, or RST when nobody listens);
//! other packets go to their connection by (host port, guest port); one
//! for no connection, of another socket type or with an unknown operation
//! is answered with RST. Resets to send wait in a queue; while it is long
//! (a guest that sends without posting receive buffers) the worker stops
//! taking guest packets, so it stays bounded.
//!
//! Host side: a client's `CONNECT <port>\n` becomes a connection with a
//! fresh host port (from 2^30 up) and a REQUEST to the guest; its RESPONSE
//! sends the client `OK <host port>\n`. A client that sends no valid line,
//! or whose request the guest neither accepts nor refuses within
//! [`CONNECT_TIMEOUT`], is disconnected — also when the guest has no
//! driver. Connections and pending clients are capped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Abort, Connection, Key, State, REQUEST_UNSENT};
use super::counters::{bump, VsockCounters};
use super::host::{connect_nonblocking, ConnectLine, HostSocket, PendingHost};
use super::proto::{
    Header, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, TYPE_STREAM,
};

/// How long a host client has for its `CONNECT` line, the guest for its
/// answer to a REQUEST, and for its RST after zvmm's SHUTDOWN.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most connections at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients still sending their `CONNECT` line.
pub const MAX_PENDING: usize = 64;
/// Resets waiting for receive buffers past which guest packets wait.
pub const MAX_RESETS: usize = 256;
/// How long the listener rests after `accept` failed for want of
/// resources (fds, memory), instead of spinning on its readiness.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The first host port of host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// Epoll token of the listening socket.
pub const LISTENER_TOKEN: u64 = 16;
/// Tokens of connected streams: this plus the fd.
const STREAM_TOKENS: u64 = 1 << 32;
/// Tokens of clients sending their line: this plus the fd.
const PENDING_TOKENS: u64 = 2 << 32;

/// The multiplexer of one vsock device.
pub struct Muxer {
    cid: u64,
    socket: HostSocket,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, PendingHost>,
    host_ports: HashSet<u32>,
    last_host_port: u32,
    resets: VecDeque<Key>,
    ready: VecDeque<Key>,
    /// When the listener is watched again after a failed `accept`.
    listener_rests: Option<Instant>,
    counters: Arc<VsockCounters>,
}

impl Muxer {
    /// A multiplexer for guest `cid` serving `socket`.
    pub fn new(cid: u64, socket: HostSocket, counters: Arc<VsockCounters>) -> io::Result<Muxer> {
        let epoll = Epoll::new()?;
        let listener = socket.listener().as_raw_fd();
        epoll.ctl(
            ControlOperation::Add,
            listener,
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Muxer {
            cid,
            socket,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            host_ports: HashSet::new(),
            last_host_port: FIRST_HOST_PORT - 1,
            resets: VecDeque::new(),
            ready: VecDeque::new(),
            listener_rests: None,
            counters,
        })
    }

    /// The epoll set, for the worker's own fds (tokens below 16).
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Whether resets pile up: guest packets should wait.
    pub fn backlogged(&self) -> bool {
        self.resets.len() >= MAX_RESETS
    }

    /// Whether a packet waits for a receive buffer.
    pub fn has_rx(&self) -> bool {
        !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// The earliest deadline of a pending client or connection.
    pub fn next_deadline(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(|c| c.deadline);
        let pending = self.pending.values().map(|p| p.deadline);
        conns.chain(pending).chain(self.listener_rests).min()
    }

    /// Forgets every connection (the driver reset the device); host
    /// clients still sending their line stay.
    pub fn reset_guest_side(&mut self) {
        for key in self.conns.keys().copied().collect::<Vec<_>>() {
            self.remove(key);
        }
        self.resets.clear();
        self.ready.clear();
    }

    /// Handles an epoll event of a host-side fd.
    pub fn on_host_event(&mut self, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_clients();
        } else if token >= PENDING_TOKENS {
            self.read_connect_line((token - PENDING_TOKENS) as RawFd);
        } else if token >= STREAM_TOKENS {
            let fd = (token - STREAM_TOKENS) as RawFd;
            if let Some(&key) = self.by_fd.get(&fd) {
                self.on_stream_event(key, events);
            }
        }
    }

    /// Ends what is past its deadline.
    pub fn expire(&mut self, now: Instant) {
        if self.listener_rests.is_some_and(|until| until <= now) {
            let watched = self.watch_listener(ControlOperation::Add);
            self.listener_rests = (!watched).then_some(now + ACCEPT_BACKOFF);
        }
        let late: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            self.drop_pending(fd);
            bump(&self.counters.host_connect_failures, 1);
        }
        let late: Vec<(Key, State)> = self
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|d| d <= now))
            .map(|c| (c.key, c.state))
            .collect();
        for (key, state) in late {
            if matches!(state, State::Connecting { .. }) {
                bump(&self.counters.host_connect_failures, 1);
            }
            self.abort(key);
        }
    }

    fn accept_clients(&mut self) {
        loop {
            let stream = match self.socket.listener().accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // Out of fds or memory: the client waits in the
                    // backlog while the listener rests.
                    let _ = self.watch_listener(ControlOperation::Delete);
                    self.listener_rests = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            };
            let full = self.pending.len() >= MAX_PENDING || self.conns.len() >= MAX_CONNECTIONS;
            if full || stream.set_nonblocking(true).is_err() {
                bump(&self.counters.host_connect_failures, 1);
                continue;
            }
            let fd = stream.as_raw_fd();
            let event = EpollEvent::new(EventSet::IN, PENDING_TOKENS + fd as u64);
            if self.epoll.ctl(ControlOperation::Add, fd, event).is_err() {
                bump(&self.counters.host_connect_failures, 1);
                continue;
            }
            let deadline = Instant::now() + CONNECT_TIMEOUT;
            self.pending.insert(fd, PendingHost::new(stream, deadline));
        }
    }

    /// Adds the listener to the epoll set or takes it out; false if
    /// epoll refused.
    fn watch_listener(&self, op: ControlOperation) -> bool {
        let fd = self.socket.listener().as_raw_fd();
        self.epoll
            .ctl(op, fd, EpollEvent::new(EventSet::IN, LISTENER_TOKEN))
            .is_ok()
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(pending) = self.pending.get_mut(&fd) else {
            return;
        };
        match pending.read_line() {
            ConnectLine::Incomplete => {}
            ConnectLine::Bad => {
                self.drop_pending(fd);
                bump(&self.counters.host_connect_failures, 1);
            }
            ConnectLine::Port(port) => {
                let Some(pending) = self.drop_pending(fd) else {
                    return;
                };
                if self.conns.len() >= MAX_CONNECTIONS {
                    bump(&self.counters.host_connect_failures, 1);
                    return;
                }
                let key = Key {
                    local_port: self.allocate_host_port(),
                    peer_port: port,
                };
                let deadline = Instant::now() + CONNECT_TIMEOUT;
                let conn = Connection::host_initiated(pending.stream, key, deadline);
                if !self.insert(conn) {
                    bump(&self.counters.host_connect_failures, 1);
                }
            }
        }
    }

    fn drop_pending(&mut self, fd: RawFd) -> Option<PendingHost> {
        let pending = self.pending.remove(&fd)?;
        // Closing the fd would remove it from the set anyway.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        Some(pending)
    }

    fn allocate_host_port(&mut self) -> u32 {
        loop {
            self.last_host_port = self.last_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            if self.host_ports.insert(self.last_host_port) {
                return self.last_host_port;
            }
        }
    }

    /// Adds `conn`, watching its stream; false (and `conn` closed) if
    /// epoll refuses it.
    fn insert(&mut self, conn: Connection) -> bool {
        let key = conn.key;
        let fd = conn.stream.as_raw_fd();
        let event = EpollEvent::new(EventSet::empty(), STREAM_TOKENS + fd as u64);
        if self.epoll.ctl(ControlOperation::Add, fd, event).is_err() {
            if key.local_port >= FIRST_HOST_PORT {
                self.host_ports.remove(&key.local_port);
            }
            return false;
        }
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.sync(key);
        true
    }

    /// Drops `key` without telling the guest.
    fn remove(&mut self, key: Key) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        let fd = conn.stream.as_raw_fd();
        self.by_fd.remove(&fd);
        if !conn.host_hup {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        if key.local_port >= FIRST_HOST_PORT {
            self.host_ports.remove(&key.local_port);
        }
    }

    /// Drops `key` and resets the guest's side, if the guest knows of it.
    fn abort(&mut self, key: Key) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let told = conn.state != REQUEST_UNSENT;
        self.remove(key);
        if told {
            self.resets.push_back(key);
        }
    }

    /// Answers a guest packet for no connection with a reset.
    fn refuse(&mut self, header: &Header) {
        bump(&self.counters.tx_refused, 1);
        self.resets.push_back(Key {
            local_port: header.dst_port,
            peer_port: header.src_port,
        });
    }

    /// Brings the epoll interest and the receive queue up to date after
    /// `key` changed.
    fn sync(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.has_pending() && !conn.queued {
            conn.queued = true;
            self.ready.push_back(key);
        }
        if conn.host_hup {
            return;
        }
        let (read, write) = conn.interest();
        let mut events = EventSet::empty();
        if read {
            events |= EventSet::IN;
        }
        if write {
            events |= EventSet::OUT;
        }
        let fd = conn.stream.as_raw_fd();
        let event = EpollEvent::new(events, STREAM_TOKENS + fd as u64);
        if self.epoll.ctl(ControlOperation::Modify, fd, event).is_err() {
            self.abort(key);
        }
    }

    fn on_stream_event(&mut self, key: Key, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let hung_up = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        let finished = if hung_up && matches!(conn.state, State::Connecting { .. }) {
            // The client gave up before the guest answered.
            true
        } else if hung_up {
            let fd = conn.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            conn.on_host_hup();
            false
        } else {
            if events.contains(EventSet::IN) {
                conn.readable = true;
            }
            events.contains(EventSet::OUT) && conn.flush() != Ok(false)
        };
        if finished {
            self.abort(key);
        } else {
            self.sync(key);
        }
    }

    /// Takes one packet from the guest.
    pub fn on_guest_packet(&mut self, packet: &VsockPacket<'_, ()>) {
        let header = Header::of(packet);
        let counters = self.counters.clone();
        bump(&counters.tx_packets, 1);
        if header.src_cid != self.cid || header.dst_cid != HOST_CID {
            bump(&self.counters.tx_bad_address, 1);
            return;
        }
        let key = Key {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if header.type_ != TYPE_STREAM {
            if header.op != OP_RST {
                self.refuse(&header);
            }
            if self.conns.contains_key(&key) {
                self.abort(key);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match header.op {
                OP_REQUEST => self.guest_connect(&header),
                OP_RST => {}
                _ => self.refuse(&header),
            }
            return;
        };
        conn.update_peer_credit(&header);
        let outcome = match header.op {
            OP_RST => return self.remove_refused(key),
            OP_RESPONSE => conn.accept_response().map(|()| {
                bump(&counters.host_connections, 1);
                false
            }),
            OP_RW => conn.on_data(packet.data_slice(), &counters).map(|()| false),
            OP_SHUTDOWN => conn.on_shutdown(header.flags),
            OP_CREDIT_UPDATE => Ok(false),
            OP_CREDIT_REQUEST => {
                conn.on_credit_request();
                Ok(false)
            }
            // REQUEST on a live connection, or an unknown operation.
            _ => {
                bump(&counters.tx_refused, 1);
                Err(Abort)
            }
        };
        match outcome {
            Ok(false) => self.sync(key),
            // Finished, or broken: reset and forget it.
            Ok(true) | Err(Abort) => self.abort(key),
        }
    }

    /// The guest reset `key`: a host client still waiting was refused.
    fn remove_refused(&mut self, key: Key) {
        if let Some(conn) = self.conns.get(&key) {
            if matches!(conn.state, State::Connecting { .. }) {
                bump(&self.counters.host_connect_failures, 1);
            }
        }
        self.remove(key);
    }

    /// A guest REQUEST for host port `dst_port`: connect to `PATH_<port>`.
    fn guest_connect(&mut self, header: &Header) {
        let key = Key {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        let mut path = self.socket.path().as_os_str().to_owned();
        path.push(format!("_{}", header.dst_port));
        let connected = if self.conns.len() < MAX_CONNECTIONS {
            connect_nonblocking(&PathBuf::from(path)).ok()
        } else {
            None
        };
        let inserted = connected
            .map(|stream| self.insert(Connection::guest_initiated(stream, key, header)))
            .unwrap_or(false);
        if inserted {
            bump(&self.counters.guest_connections, 1);
        } else {
            bump(&self.counters.guest_connect_refused, 1);
            self.resets.push_back(key);
        }
    }

    /// Fills one receive buffer: a reset first, else the next connection
    /// with something to say. Returns the used length, or `None` when
    /// nothing was written (the buffer goes back to the ring).
    pub fn fill_rx(&mut self, packet: &mut VsockPacket<'_, ()>) -> Option<u32> {
        if let Some(key) = self.resets.pop_front() {
            let header = Header {
                src_port: key.local_port,
                dst_port: key.peer_port,
                op: OP_RST,
                ..Header::default()
            };
            bump(&self.counters.rst_sent, 1);
            return self.deliver(packet, header);
        }
        // Each connection gets one chance per buffer.
        for _ in 0..self.ready.len() {
            let key = self.ready.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let closing = Instant::now() + CONNECT_TIMEOUT;
            match conn.next_packet(packet.data_slice(), closing) {
                Ok(Some(header)) => {
                    self.sync(key);
                    return self.deliver(packet, header);
                }
                Ok(None) => self.sync(key),
                Err(Abort) => {
                    self.abort(key);
                    return self.fill_rx(packet);
                }
            }
        }
        None
    }

    /// Writes `header` (from the host to the guest) into `packet`.
    fn deliver(&mut self, packet: &mut VsockPacket<'_, ()>, header: Header) -> Option<u32> {
        let header = Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            type_: TYPE_STREAM,
            ..header
        };
        header.write_to(packet).ok()?;
        bump(&self.counters.rx_packets, 1);
        bump(&self.counters.rx_bytes, u64::from(header.len));
        // The header is 44 bytes.
        Some(packet.header_slice().len() as u32 + header.len)
    }
}
