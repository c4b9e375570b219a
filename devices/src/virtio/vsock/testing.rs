//! Test helpers for virtio-vsock: a fake guest driver on `MockSplitQueue`s
//! (the queue helpers are virtio-rng's) that posts receive buffers, sends
//! packets and reads what the device delivered, and a device whose socket
//! lives in a temporary directory.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

use super::device::{Vsock, VsockConfig};
use super::proto::{Header, HOST_CID, TYPE_STREAM};
pub use crate::virtio::rng::testing::*;
use crate::virtio::{ActivateContext, GuestMemory, VirtioDevice};

/// The guest's CID in the tests.
pub const GUEST_CID: u64 = 3;
/// Bytes of a packet header.
pub const HDR: usize = 44;
/// Payload room of each receive buffer the fake guest posts.
pub const RX_ROOM: u32 = 4096;
/// Entries of each test queue.
const QUEUE_ENTRIES: u16 = 1024;

/// A vsock device with its socket in a fresh temporary directory.
pub struct TestDevice {
    /// The device.
    pub device: Vsock,
    /// The host socket's path.
    pub socket: PathBuf,
    /// Keeps the directory alive.
    pub dir: TempDir,
}

/// A device for guest [`GUEST_CID`].
pub fn test_device() -> TestDevice {
    let dir = TempDir::new_with_prefix("/tmp/zvmm-vsock-").unwrap();
    let socket = dir.as_path().join("v.sock");
    let device = Vsock::new(VsockConfig {
        id: "_vsock0".into(),
        cid: GUEST_CID,
        socket: socket.clone(),
    })
    .unwrap();
    TestDevice {
        device,
        socket,
        dir,
    }
}

impl TestDevice {
    /// Connects a host client and sends `CONNECT <port>\n`.
    pub fn host_connect(&self, port: u32) -> UnixStream {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        writeln!(stream, "CONNECT {port}").unwrap();
        stream
    }

    /// The device's counter `name`.
    pub fn counter(&self, name: &str) -> u64 {
        let counters = self.device.counters();
        counters.iter().find(|(n, _)| *n == name).unwrap().1
    }

    /// Waits up to 10 s for counter `name` to reach `value`.
    pub fn wait_counter(&self, name: &str, value: u64) {
        wait_until(&format!("{name} = {value}"), || self.counter(name) >= value);
    }
}

/// Reads one line (up to `\n`) from `stream`.
pub fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if stream.read(&mut byte).unwrap_or(0) == 0 {
            break;
        }
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// The 44 header bytes of `header`.
pub fn encode(h: &Header) -> [u8; HDR] {
    let mut b = [0u8; HDR];
    b[0..8].copy_from_slice(&h.src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&h.dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&h.src_port.to_le_bytes());
    b[20..24].copy_from_slice(&h.dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&h.len.to_le_bytes());
    b[28..30].copy_from_slice(&h.type_.to_le_bytes());
    b[30..32].copy_from_slice(&h.op.to_le_bytes());
    b[32..36].copy_from_slice(&h.flags.to_le_bytes());
    b[36..40].copy_from_slice(&h.buf_alloc.to_le_bytes());
    b[40..44].copy_from_slice(&h.fwd_cnt.to_le_bytes());
    b
}

/// The header encoded in `b`.
pub fn decode(b: &[u8]) -> Header {
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u16_at = |at: usize| u16::from_le_bytes(b[at..at + 2].try_into().unwrap());
    Header {
        src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
        dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16_at(28),
        op: u16_at(30),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

/// `len` bytes of a pattern that differs per `seed` and per position.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8))
        .collect()
}

/// A guest packet from `src_port` to host port `dst_port`.
pub fn guest_header(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 << 10,
        ..Header::default()
    }
}

/// A fake guest driver: posts receive buffers, sends packets, reads what
/// the device used.
pub struct Guest<'m> {
    mem: &'m GuestMemory,
    rx: TestQueue<'m>,
    tx: TestQueue<'m>,
    event: TestQueue<'m>,
    kicks: [EventFd; 3],
    /// The interrupts the device raised.
    pub interrupt: Arc<RecordingInterrupt>,
    rx_next: u16,
    tx_next: u16,
    rx_seen: u16,
    buffers: HashMap<u32, u64>,
    next_addr: u64,
}

impl<'m> Guest<'m> {
    /// A guest on `mem` with empty queues.
    pub fn new(mem: &'m GuestMemory) -> Guest<'m> {
        Guest {
            mem,
            rx: mock_queue(mem, 0, QUEUE_ENTRIES),
            tx: mock_queue(mem, 1, QUEUE_ENTRIES),
            event: mock_queue(mem, 2, QUEUE_ENTRIES),
            kicks: [eventfd(), eventfd(), eventfd()],
            interrupt: Arc::default(),
            rx_next: 0,
            tx_next: 0,
            rx_seen: 0,
            buffers: HashMap::new(),
            next_addr: DATA,
        }
    }

    /// Activates `device` on this guest's three queues.
    pub fn activate(&self, device: &mut Vsock) {
        let queues = [&self.rx, &self.tx, &self.event]
            .into_iter()
            .zip(&self.kicks)
            .enumerate()
            .map(|(i, (q, kick))| (i as u16, q.create_queue(), kick.try_clone().unwrap()))
            .collect();
        device
            .activate(ActivateContext {
                mem: self.mem.clone(),
                interrupt: self.interrupt.clone(),
                queues,
            })
            .unwrap();
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_addr;
        self.next_addr += u64::from(len).next_multiple_of(0x1000);
        addr
    }

    /// Posts `count` receive buffers (one descriptor each: header and
    /// [`RX_ROOM`] bytes) and kicks.
    pub fn post_rx(&mut self, count: usize) {
        for _ in 0..count {
            let len = HDR as u32 + RX_ROOM;
            let addr = self.alloc(len);
            self.post_rx_chain(&[w(addr, len)]);
        }
    }

    /// Posts one receive chain made of `descs` (the header goes at the
    /// first one's address) and kicks.
    pub fn post_rx_chain(&mut self, descs: &[Desc]) {
        self.buffers.insert(u32::from(self.rx_next), descs[0].addr);
        self.rx
            .add_desc_chains(&raw(descs, self.rx_next), self.rx_next);
        self.rx_next += descs.len() as u16;
        self.kicks[0].write(1).unwrap();
    }

    /// Sends `header` (its `len` set to the payload's) with `payload` in a
    /// second descriptor, and kicks.
    pub fn send(&mut self, header: Header, payload: &[u8]) {
        let header = Header {
            len: payload.len() as u32,
            ..header
        };
        self.send_raw(&encode(&header), payload);
    }

    /// Sends header bytes `header` and `payload` as they are.
    pub fn send_raw(&mut self, header: &[u8], payload: &[u8]) {
        let at = self.alloc(header.len() as u32);
        self.mem.write_slice(header, GuestAddress(at)).unwrap();
        let mut descs = vec![r(at, header.len() as u32)];
        if !payload.is_empty() {
            let data = self.alloc(payload.len() as u32);
            self.mem.write_slice(payload, GuestAddress(data)).unwrap();
            descs.push(r(data, payload.len() as u32));
        }
        self.send_chain(&descs);
    }

    /// Sends a chain of `descs` as it is, and kicks.
    pub fn send_chain(&mut self, descs: &[Desc]) {
        self.tx
            .add_desc_chains(&raw(descs, self.tx_next), self.tx_next);
        self.tx_next += descs.len() as u16;
        self.kicks[1].write(1).unwrap();
    }

    /// Makes transmit avail entry `slot` name descriptor `head` (the avail
    /// index one past it) and kicks.
    pub fn send_head(&mut self, slot: u16, head: u16) {
        self.tx.set_avail_entry(usize::from(slot), head);
        self.tx.set_avail_idx(slot + 1);
        self.kicks[1].write(1).unwrap();
    }

    /// Transmit chains the device returned.
    pub fn tx_used(&self) -> u16 {
        self.tx.used_idx()
    }

    /// Receive buffers the device used so far (taken or not).
    pub fn rx_used(&self) -> u16 {
        self.rx.used_idx()
    }

    /// The next packet the device delivered within `wait`: its header and
    /// payload; panics if the used length disagrees with the header.
    pub fn try_recv(&mut self, wait: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        while self.rx.used_idx() == self.rx_seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (id, used_len) = self.rx.used_elem(self.rx_seen);
        self.rx_seen += 1;
        let addr = self.buffers[&id];
        let header = decode(&bytes_at(self.mem, addr, HDR));
        assert_eq!(used_len, HDR as u32 + header.len, "{header:?}");
        let payload = bytes_at(self.mem, addr + HDR as u64, header.len as usize);
        Some((header, payload))
    }

    /// The next packet the device delivers (waiting up to 10 s).
    pub fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(Duration::from_secs(10))
            .expect("no packet from the device within 10 s")
    }
}
