//! virtio-vsock over virtio-pci (virtio 1.2 §5.10): for every modern
//! socket device, reads the guest CID, sets up the receive (0), transmit
//! (1) and event (2) queues, keeps the receive and event rings full, and
//! moves packets — a 44-byte [`Header`] and its payload — both ways. The
//! connections themselves (listening, connecting out, credit, shutdown)
//! are [`crate::vsocktest`]'s, run on the first device when a
//! `probe.vsock.*` option asks for it.
//!
//! Layouts, so a device must handle each (VERSION_1 lets the driver
//! choose): receive buffers alternate between header and payload in one
//! descriptor (Linux 6.2 and later) and a header descriptor chained to a
//! payload descriptor; transmitted packets rotate the same two ways.

use crate::pci::{Config, Function, Pci, SlotLabel};
use crate::virtio::{self, Buf, Device, Queue, VirtioError, QUEUE_MAX};
use crate::vsocktest;
use crate::{io, report};

/// PCI device ID of a modern virtio-vsock function (0x1040 + type 19).
pub const DEVICE_ID: u16 = 0x1053;
/// Bytes of a packet header.
pub const HDR_LEN: usize = 44;
/// Largest payload of one packet the probe sends or receives.
pub const PAYLOAD_MAX: usize = 4096;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;

/// Operations (virtio 1.2 §5.10.6).
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or aborted.
pub const OP_RST: u16 = 3;
/// The sender stops receiving and/or sending.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// The sender's credit, unasked.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks for the peer's credit.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flag: the sender receives nothing more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender sends nothing more.
pub const SHUTDOWN_SEND: u32 = 2;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Both data layouts need two descriptors at most.
const DESC_PER_SLOT: u16 = 2;
const SLOTS: usize = (QUEUE_MAX / DESC_PER_SLOT) as usize;
const EVENT_SLOTS: usize = 4;
/// Where the payload starts in a slot when it has its own descriptor.
const SPLIT_PAYLOAD_OFF: usize = 64;
const SLOT_BYTES: usize = SPLIT_PAYLOAD_OFF + PAYLOAD_MAX;
/// How long the device may keep every transmit slot.
const DEVICE_TIMEOUT_US: u64 = 2_000_000;
/// Receive buffers given back before the device is told.
const RX_KICK_BATCH: usize = 8;

#[repr(C, align(4096))]
struct SlotMem([[u8; SLOT_BYTES]; SLOTS]);
#[repr(C, align(64))]
struct EventMem([[u8; 8]; EVENT_SLOTS]);

static mut RX_MEM: SlotMem = SlotMem([[0; SLOT_BYTES]; SLOTS]);
static mut TX_MEM: SlotMem = SlotMem([[0; SLOT_BYTES]; SLOTS]);
static mut EVENT_MEM: EventMem = EventMem([[0; 8]; EVENT_SLOTS]);

/// The header of one packet (all fields little-endian on the wire).
#[derive(Clone, Copy, Default)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// The sender's receive buffer.
    pub buf_alloc: u32,
    /// Bytes the sender consumed of what it received.
    pub fwd_cnt: u32,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes a header.
    pub fn decode(b: &[u8; HDR_LEN]) -> Header {
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// Drives every virtio-vsock function; the first one runs the
/// connections the `probe.vsock.*` options ask for.
pub fn run(pci: &Pci, cmdline: &[u8]) {
    let options = vsocktest::Options::parse(cmdline);
    let mut test = options.wanted();
    let mut found = 0;
    for function in pci.functions() {
        if function.vendor == virtio::VENDOR_ID && function.device == DEVICE_ID {
            found += 1;
            let slot = function.bdf.label();
            match Vsock::new(&pci.config, function) {
                Ok(mut vsock) => {
                    if core::mem::take(&mut test) {
                        vsocktest::run(&mut vsock, &options);
                    }
                    vsock.finish();
                }
                Err(err) => report!("vsock slot={slot} error {err}"),
            }
        }
    }
    if test {
        report!("vsock test skipped=no_device");
    }
    report!("vsock devices={found}");
}

/// Counters of one device.
#[derive(Clone, Copy, Default)]
pub struct VsockStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Received packets whose length or header was out of spec.
    pub rx_bad: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Packets sent per layout: one descriptor, two chained.
    pub tx_layouts: [u64; 2],
    /// Events received.
    pub events: u64,
}

/// A received packet the probe holds until [`Vsock::release`].
pub struct RxPacket {
    slot: usize,
    /// Its header.
    pub header: Header,
    len: usize,
}

impl RxPacket {
    /// The payload (as long as the header says, within what the device
    /// wrote).
    pub fn payload(&self) -> &[u8] {
        let off = payload_offset(self.slot);
        // SAFETY: the device returned this buffer (used ring, after an
        // acquire fence) and it is not given back before `release`
        // consumes the packet, so nothing writes it meanwhile.
        let buffer = unsafe { &(*core::ptr::addr_of!(RX_MEM)).0[self.slot] };
        &buffer[off..off + self.len]
    }
}

/// Where slot `slot`'s payload starts: right after the header (one
/// descriptor) on even slots, at [`SPLIT_PAYLOAD_OFF`] on odd ones.
fn payload_offset(slot: usize) -> usize {
    if slot.is_multiple_of(2) {
        HDR_LEN
    } else {
        SPLIT_PAYLOAD_OFF
    }
}

/// A live virtio-vsock device.
pub struct Vsock {
    device: Device,
    rx: Queue,
    tx: Queue,
    event: Queue,
    /// This device's PCI slot.
    pub slot: SlotLabel,
    /// The guest's CID from the configuration space.
    pub cid: u64,
    tx_busy: [bool; SLOTS],
    tx_next: usize,
    tx_unkicked: bool,
    rx_unkicked: usize,
    broken: bool,
    tsc_mhz: u64,
    /// Counters.
    pub stats: VsockStats,
}

impl Vsock {
    /// Initialises the device (no device-specific features: stream
    /// sockets only), reads the CID, sets up the three queues, sets
    /// DRIVER_OK and fills the receive and event rings.
    fn new(config: &Config, function: &Function) -> Result<Vsock, VirtioError> {
        let mut device = Device::init(config, function, 0)?;
        let slot = device.bdf.label();
        let cid = read_cid(&device);
        let rx = device.setup_queue(RX_QUEUE, DESC_PER_SLOT)?;
        let tx = device.setup_queue(TX_QUEUE, DESC_PER_SLOT)?;
        let event = device.setup_queue(EVENT_QUEUE, 1)?;
        device.driver_ok();
        let mut vsock = Vsock {
            device,
            rx,
            tx,
            event,
            slot,
            cid,
            tx_busy: [false; SLOTS],
            tx_next: 0,
            tx_unkicked: false,
            rx_unkicked: 0,
            broken: false,
            tsc_mhz: io::tsc_mhz(),
            stats: VsockStats::default(),
        };
        let rx_slots = vsock.rx.slots().min(SLOTS);
        (0..rx_slots).for_each(|s| vsock.post_rx(s));
        vsock.rx.kick();
        let event_slots = vsock.event.slots().min(EVENT_SLOTS);
        (0..event_slots).for_each(|s| vsock.post_event(s));
        vsock.event.kick();
        report!(
            "vsock slot={slot} cid={cid} rx_buffers={rx_slots} buffer_bytes={PAYLOAD_MAX} tx_slots={} event_buffers={event_slots}",
            vsock.tx.slots().min(SLOTS)
        );
        Ok(vsock)
    }

    /// TSC ticks per microsecond.
    pub fn tsc_mhz(&self) -> u64 {
        self.tsc_mhz
    }

    /// Whether the device misbehaved and is left alone.
    pub fn broken(&self) -> bool {
        self.broken
    }

    fn post_rx(&mut self, slot: usize) {
        // SAFETY: only the address is taken; `slot` < SLOTS.
        let base = unsafe { core::ptr::addr_of!((*core::ptr::addr_of!(RX_MEM)).0[slot]) } as u64;
        let writable = |addr, len: usize| Buf {
            addr,
            len: len as u32,
            device_writes: true,
        };
        if payload_offset(slot) == HDR_LEN {
            self.rx
                .add(slot, &[writable(base, HDR_LEN + PAYLOAD_MAX)], false);
        } else {
            let payload = writable(base + SPLIT_PAYLOAD_OFF as u64, PAYLOAD_MAX);
            self.rx
                .add(slot, &[writable(base, HDR_LEN), payload], false);
        }
    }

    fn post_event(&mut self, slot: usize) {
        // SAFETY: only the address is taken; `slot` < EVENT_SLOTS.
        let addr = unsafe { core::ptr::addr_of!((*core::ptr::addr_of!(EVENT_MEM)).0[slot]) } as u64;
        let buf = Buf {
            addr,
            len: 4,
            device_writes: true,
        };
        self.event.add(slot, &[buf], false);
    }

    /// The next received packet, if any. A used element that is too short
    /// or names no slot is counted and its buffer reposted; a bogus head
    /// breaks the device.
    pub fn poll(&mut self) -> Option<RxPacket> {
        loop {
            if self.broken {
                return None;
            }
            let Some(used) = self.rx.take_used() else {
                self.kick_rx();
                return None;
            };
            let Some(slot) = used.slot.filter(|&s| s < SLOTS) else {
                self.fail("bogus rx used element");
                return None;
            };
            self.stats.rx_packets += 1;
            let header = rx_header(slot);
            let written = used.len as usize;
            let payload_room = written.saturating_sub(HDR_LEN).min(PAYLOAD_MAX);
            let len = header.len as usize;
            let fits = written >= HDR_LEN && len <= payload_room;
            if fits {
                return Some(RxPacket { slot, header, len });
            }
            self.stats.rx_bad += 1;
            report!(
                "vsock slot={} rx bad_packet used_len={written} len={len} op={}",
                self.slot,
                header.op
            );
            self.repost_rx(slot);
        }
    }

    /// Gives a received buffer back; the device is told in batches.
    pub fn release(&mut self, packet: RxPacket) {
        self.repost_rx(packet.slot);
    }

    fn repost_rx(&mut self, slot: usize) {
        if self.broken {
            return;
        }
        self.post_rx(slot);
        self.rx_unkicked += 1;
        if self.rx_unkicked >= RX_KICK_BATCH {
            self.kick_rx();
        }
    }

    fn kick_rx(&mut self) {
        if self.rx_unkicked > 0 {
            self.rx_unkicked = 0;
            self.rx.kick();
        }
    }

    /// The next event's ID, if any (its buffer is reposted).
    pub fn poll_event(&mut self) -> Option<u32> {
        let used = self.event.take_used()?;
        let slot = used.slot.filter(|&s| s < EVENT_SLOTS)?;
        self.stats.events += 1;
        // SAFETY: the device returned the buffer; volatile because the
        // device wrote it.
        let id: [u8; 4] = unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!(EVENT_MEM.0[slot]).cast::<[u8; 4]>())
        };
        self.post_event(slot);
        self.event.kick();
        Some(u32::from_le_bytes(id))
    }

    /// Queues one packet from this guest (CIDs and type filled in); the
    /// device hears of it at [`Vsock::kick_tx`] or when the ring is full.
    /// Returns false if no transmit slot came free in time.
    pub fn send(&mut self, header: &Header, payload: &[u8]) -> bool {
        let Some(index) = self.free_tx_slot() else {
            return false;
        };
        let len = payload.len().min(PAYLOAD_MAX);
        let header = Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            type_: TYPE_STREAM,
            len: len as u32,
            ..*header
        };
        let layout = (self.stats.tx_packets % 2) as usize;
        let off = if layout == 0 {
            HDR_LEN
        } else {
            SPLIT_PAYLOAD_OFF
        };
        // SAFETY: the slot is idle (the device completed it or never had
        // it) and the device reads it only after the chain is published.
        let base = unsafe {
            let buffer = &mut (*core::ptr::addr_of_mut!(TX_MEM)).0[index];
            buffer[..HDR_LEN].copy_from_slice(&header.encode());
            buffer[off..off + len].copy_from_slice(&payload[..len]);
            buffer.as_ptr() as u64
        };
        let readable = |addr, len: usize| Buf {
            addr,
            len: len as u32,
            device_writes: false,
        };
        if layout == 0 {
            self.tx.add(index, &[readable(base, HDR_LEN + len)], false);
        } else {
            let data = readable(base + off as u64, len);
            self.tx.add(index, &[readable(base, HDR_LEN), data], false);
        }
        self.tx_busy[index] = true;
        self.tx_unkicked = true;
        self.stats.tx_layouts[layout] += 1;
        self.stats.tx_packets += 1;
        true
    }

    /// Tells the device of packets queued by [`Vsock::send`].
    pub fn kick_tx(&mut self) {
        if core::mem::take(&mut self.tx_unkicked) {
            self.tx.kick();
        }
    }

    /// A free transmit slot: completed ones are reclaimed first; when all
    /// are busy the queued ones are kicked and the device waited for
    /// (bounded).
    fn free_tx_slot(&mut self) -> Option<usize> {
        let slots = self.tx.slots().min(SLOTS);
        let start = io::rdtsc();
        let deadline = DEVICE_TIMEOUT_US.saturating_mul(self.tsc_mhz);
        while !self.broken {
            self.reclaim_tx();
            for step in 0..slots {
                let slot = (self.tx_next + step) % slots;
                if !self.tx_busy[slot] {
                    self.tx_next = (slot + 1) % slots;
                    return Some(slot);
                }
            }
            self.kick_tx();
            if io::rdtsc().wrapping_sub(start) > deadline {
                self.fail("transmit ring stuck");
            }
            core::hint::spin_loop();
        }
        None
    }

    fn reclaim_tx(&mut self) {
        while let Some(used) = self.tx.take_used() {
            match used.slot.filter(|&s| s < SLOTS) {
                Some(slot) => self.tx_busy[slot] = false,
                None => return self.fail("bogus tx used element"),
            }
        }
    }

    fn fail(&mut self, why: &str) {
        if !self.broken {
            report!("vsock slot={} broken reason=\"{why}\"", self.slot);
        }
        self.broken = true;
    }

    /// Waits (bounded) for the device to take what was sent, reports the
    /// counters and resets the device.
    fn finish(mut self) {
        self.kick_tx();
        let start = io::rdtsc();
        let deadline = DEVICE_TIMEOUT_US.saturating_mul(self.tsc_mhz);
        while !self.broken
            && self.tx_busy.iter().any(|&b| b)
            && io::rdtsc().wrapping_sub(start) < deadline
        {
            self.reclaim_tx();
            core::hint::spin_loop();
        }
        let s = self.stats;
        report!(
            "vsock slot={} rx packets={} bad={} notifies={} tx packets={} single={} chained={} notifies={} suppressed={} events={}",
            self.slot,
            s.rx_packets,
            s.rx_bad,
            self.rx.stats.notifies,
            s.tx_packets,
            s.tx_layouts[0],
            s.tx_layouts[1],
            self.tx.stats.notifies,
            self.tx.stats.suppressed,
            s.events
        );
        let reset = if self.device.reset() { "ok" } else { "timeout" };
        report!("vsock slot={} reset={reset}", self.slot);
    }
}

fn rx_header(slot: usize) -> Header {
    // SAFETY: the device returned the buffer; volatile because the device
    // wrote it.
    let bytes: [u8; HDR_LEN] =
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!(RX_MEM.0[slot]).cast()) };
    Header::decode(&bytes)
}

/// `le64 guest_cid`, read consistently (two 32-bit halves).
fn read_cid(device: &Device) -> u64 {
    let cfg = device.device_cfg;
    let read = || u64::from(cfg.read32(0)) | u64::from(cfg.read32(4)) << 32;
    let mut cid = read();
    for _ in 0..8 {
        let before = device.config_generation();
        cid = read();
        if device.config_generation() == before {
            break;
        }
    }
    cid
}
