//! One vsock stream connection between a guest port and a host Unix
//! stream: its state (connecting, established, closing), what it owes the
//! guest (REQUEST, RESPONSE, SHUTDOWN, credit packets, data), and the
//! credit accounting both ways (virtio 1.2 §5.10.6.3):
//!
//! - towards the guest, zvmm sends at most `peer_buf_alloc - (sent -
//!   peer_fwd_cnt)` payload bytes, reading the host stream only then, so
//!   the host stream's own buffer holds the rest; with no credit left it
//!   asks for an update (CREDIT_REQUEST, once);
//! - from the guest, zvmm advertises [`BUF_ALLOC`] and counts as forwarded
//!   (`fwd_cnt`) what reached the host stream. What the host does not take
//!   at once waits in a per-connection buffer, which the guest's credit
//!   keeps within `BUF_ALLOC`; data beyond it is a protocol violation and
//!   resets the connection. A CREDIT_UPDATE goes out when the guest's view
//!   of the free space falls below [`MAX_PAYLOAD`].
//!
//! Errors that end the connection return [`Abort`]; the muxer then drops
//! it (closing the host stream) and resets the guest side.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::{ReadVolatile, VolatileSlice, WriteVolatile};

use super::counters::{bump, VsockCounters};
use super::proto::{
    Header, BUF_ALLOC, MAX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// A connection's identity: the host-side and the guest-side port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    /// The host-side port (allocated by zvmm for host-initiated ones).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
}

/// The connection must end: the muxer drops it and resets the guest side.
#[derive(Debug, PartialEq, Eq)]
pub struct Abort;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting {
        /// Whether the REQUEST went out.
        request_sent: bool,
    },
    /// Data flows.
    Established,
    /// zvmm sent SHUTDOWN with both flags and waits for the guest's RST.
    Closing,
}

/// Host-initiated, the REQUEST not sent yet.
pub const REQUEST_UNSENT: State = State::Connecting {
    request_sent: false,
};
/// Host-initiated, the REQUEST sent.
pub const REQUEST_SENT: State = State::Connecting { request_sent: true };

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side, non-blocking.
    pub stream: UnixStream,
    /// Its ports.
    pub key: Key,
    /// Its state.
    pub state: State,
    /// When a connecting or closing connection is given up.
    pub deadline: Option<Instant>,
    /// The host stream has bytes to read (epoll said so, or it hung up).
    pub readable: bool,
    /// Whether it waits in the muxer's receive queue.
    pub queued: bool,
    /// The host closed both directions (epoll HUP).
    pub host_hup: bool,
    host_eof: bool,
    send_response: bool,
    send_shutdown: u32,
    send_credit_update: bool,
    credit_requested: bool,
    guest_shutdown: u32,
    to_host: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    fwd_cnt_sent: Wrapping<u32>,
    from_guest: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    to_guest: Wrapping<u32>,
}

impl Connection {
    fn new(stream: UnixStream, key: Key, state: State) -> Connection {
        Connection {
            stream,
            key,
            state,
            deadline: None,
            readable: false,
            queued: false,
            host_hup: false,
            host_eof: false,
            send_response: false,
            send_shutdown: 0,
            send_credit_update: false,
            credit_requested: false,
            guest_shutdown: 0,
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            from_guest: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            to_guest: Wrapping(0),
        }
    }

    /// A host client asked for the guest's `key.peer_port`; it is given up
    /// at `deadline` unless the guest answers.
    pub fn host_initiated(stream: UnixStream, key: Key, deadline: Instant) -> Connection {
        let mut conn = Self::new(stream, key, REQUEST_UNSENT);
        conn.deadline = Some(deadline);
        conn
    }

    /// The guest's REQUEST `request` reached a host listener on `stream`.
    pub fn guest_initiated(stream: UnixStream, key: Key, request: &Header) -> Connection {
        let mut conn = Self::new(stream, key, State::Established);
        conn.send_response = true;
        conn.update_peer_credit(request);
        conn
    }

    /// Records the credit every guest packet carries.
    pub fn update_peer_credit(&mut self, header: &Header) {
        let more = header.buf_alloc != self.peer_buf_alloc
            || Wrapping(header.fwd_cnt) != self.peer_fwd_cnt;
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
        if more {
            self.credit_requested = false;
        }
    }

    /// Payload bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.to_guest - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host data may go to the guest (credit aside).
    fn may_send_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_pending(&self) -> bool {
        self.state == REQUEST_UNSENT
            || self.send_response
            || self.send_shutdown != 0
            || self.send_credit_update
            || (self.may_send_data() && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// The events the host stream is watched for: readable while data
    /// may flow to the guest and none is known to wait, writable while
    /// bytes wait for the host.
    pub fn interest(&self) -> (bool, bool) {
        let read = self.state == State::Established
            && !self.readable
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0;
        (read, !self.to_host.is_empty())
    }

    /// The guest accepted a host-initiated connection: tell the host
    /// client its port with `OK <port>\n`.
    pub fn accept_response(&mut self) -> Result<(), Abort> {
        if self.state != REQUEST_SENT {
            return Err(Abort);
        }
        let line = format!("OK {}\n", self.key.local_port);
        // A fresh stream takes a dozen bytes at once, or it is unusable.
        match self.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            _ => return Err(Abort),
        }
        self.state = State::Established;
        self.deadline = None;
        Ok(())
    }

    /// The guest sent `data` (an RW packet).
    pub fn on_data(
        &mut self,
        data: Option<&VolatileSlice<'_>>,
        counters: &VsockCounters,
    ) -> Result<(), Abort> {
        let Some(data) = data else {
            return Ok(());
        };
        if self.host_hup {
            // Nobody reads the host side any more.
            return Err(Abort);
        }
        if self.state != State::Established
            || self.guest_shutdown & SHUTDOWN_SEND != 0
            || self.to_host.len() + data.len() > BUF_ALLOC as usize
        {
            bump(&counters.tx_refused, 1);
            return Err(Abort);
        }
        // At most MAX_PAYLOAD.
        self.from_guest += data.len() as u32;
        bump(&counters.tx_bytes, data.len() as u64);
        let mut written = 0;
        if self.to_host.is_empty() {
            written = match self.stream.write_volatile(data) {
                Ok(n) => n,
                Err(vm_memory::VolatileMemoryError::IOError(e))
                    if e.kind() == io::ErrorKind::WouldBlock =>
                {
                    0
                }
                Err(_) => return Err(Abort),
            };
        }
        if written < data.len() {
            let mut rest = vec![0u8; data.len() - written];
            data.subslice(written, rest.len())
                .map_err(|_| Abort)?
                .copy_to(&mut rest[..]);
            self.to_host.extend(rest);
        }
        self.forwarded(written);
        Ok(())
    }

    /// Writes what waits for the host; at the end of it, carries out a
    /// guest shutdown. Returns whether the connection is finished (the
    /// guest shut both ways and everything reached the host).
    pub fn flush(&mut self) -> Result<bool, Abort> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.forwarded(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Abort),
            }
        }
        if self.guest_shutdown & SHUTDOWN_SEND != 0 {
            // Already shut, or the host went away: nothing more to tell it.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(self.guest_shutdown == SHUTDOWN_BOTH)
    }

    fn forwarded(&mut self, bytes: usize) {
        // At most BUF_ALLOC at a time.
        self.fwd_cnt += bytes as u32;
        let unseen = (self.from_guest - self.fwd_cnt_sent).0;
        if self.fwd_cnt != self.fwd_cnt_sent && BUF_ALLOC.saturating_sub(unseen) < MAX_PAYLOAD {
            self.send_credit_update = true;
        }
    }

    /// The guest shut the connection down one or both ways; returns
    /// whether it is finished.
    pub fn on_shutdown(&mut self, flags: u32) -> Result<bool, Abort> {
        self.guest_shutdown |= flags & SHUTDOWN_BOTH;
        if self.host_hup {
            self.to_host.clear();
        }
        self.flush()
    }

    /// The guest asked for our credit.
    pub fn on_credit_request(&mut self) {
        self.send_credit_update = true;
    }

    /// The host hung up both ways: what it left is still read; nothing
    /// more can reach it.
    pub fn on_host_hup(&mut self) {
        self.host_hup = true;
        self.readable = true;
        self.to_host.clear();
        // Without further reads (all read, or the guest takes no more)
        // the guest hears of it now; otherwise at the end of the data.
        if self.host_eof || self.guest_shutdown & SHUTDOWN_RCV != 0 {
            self.send_shutdown |= SHUTDOWN_BOTH;
        }
    }

    /// The next packet for the guest, if any: control packets first, then
    /// host data read straight into `data` (the receive buffer's payload
    /// area), within the guest's credit.
    pub fn next_packet(
        &mut self,
        data: Option<&VolatileSlice<'_>>,
        closing_deadline: Instant,
    ) -> Result<Option<Header>, Abort> {
        let op = if self.state == REQUEST_UNSENT {
            self.state = REQUEST_SENT;
            Some((OP_REQUEST, 0, 0))
        } else if std::mem::take(&mut self.send_response) {
            Some((OP_RESPONSE, 0, 0))
        } else if let Some(len) = self.read_host(data)? {
            Some((OP_RW, 0, len))
        } else if self.send_shutdown != 0 {
            let flags = std::mem::take(&mut self.send_shutdown);
            if flags == SHUTDOWN_BOTH {
                self.state = State::Closing;
                self.deadline = Some(closing_deadline);
            }
            Some((OP_SHUTDOWN, flags, 0))
        } else if self.send_credit_update {
            Some((OP_CREDIT_UPDATE, 0, 0))
        } else if self.may_send_data() && self.peer_credit() == 0 && !self.credit_requested {
            self.credit_requested = true;
            Some((OP_CREDIT_REQUEST, 0, 0))
        } else {
            None
        };
        Ok(op.map(|(op, flags, len)| self.header(op, flags, len)))
    }

    /// Reads host data into `data` when the guest can take some; at the
    /// host's end of data, queues a SHUTDOWN instead.
    fn read_host(&mut self, data: Option<&VolatileSlice<'_>>) -> Result<Option<u32>, Abort> {
        let credit = self.peer_credit().min(MAX_PAYLOAD) as usize;
        let Some(data) = data.filter(|_| self.may_send_data() && credit > 0) else {
            return Ok(None);
        };
        let mut room = data
            .subslice(0, data.len().min(credit))
            .map_err(|_| Abort)?;
        loop {
            return match self.stream.read_volatile(&mut room) {
                Ok(0) => {
                    self.host_eof = true;
                    self.readable = false;
                    self.send_shutdown |= if self.host_hup {
                        SHUTDOWN_BOTH
                    } else {
                        SHUTDOWN_SEND
                    };
                    Ok(None)
                }
                Ok(n) => {
                    // At most MAX_PAYLOAD.
                    self.to_guest += n as u32;
                    Ok(Some(n as u32))
                }
                Err(vm_memory::VolatileMemoryError::IOError(e)) => match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock if !self.host_hup => {
                        self.readable = false;
                        Ok(None)
                    }
                    _ => Err(Abort),
                },
                Err(_) => Err(Abort),
            };
        }
    }

    /// A header from the host side of this connection, carrying our
    /// credit (which then counts as told).
    fn header(&mut self, op: u16, flags: u32, len: u32) -> Header {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.send_credit_update = false;
        Header {
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
            ..Header::default()
        }
    }
}
