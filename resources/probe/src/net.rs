//! virtio-net over virtio-pci: for every modern virtio-net function on bus
//! 0, negotiates the offloads Linux uses, reports the configuration (MAC,
//! link status), sets up the receive (0), transmit (1) and, with
//! CTRL_VQ, control (2) queues, keeps the receive ring full of buffers and
//! checks the `virtio_net_hdr_v1` of every received frame. With
//! `probe.net.ip=` the first device then talks to the host
//! ([`crate::nettest`]).
//!
//! Receive buffers are one descriptor each ([`RX_BUF`] bytes: header and
//! frame). Transmit frames rotate through three layouts, so a device must
//! honour any layout (VERSION_1): header and frame in one descriptor, in
//! two chained descriptors, and in a two-entry indirect table.

use crate::inet::{Mac, MacText};
use crate::nettest;
use crate::pci::{Config, Function, Pci, SlotLabel};
use crate::virtio::{self, Buf, Device, Queue, QUEUE_MAX};
use crate::{io, report};

/// PCI device ID of a modern virtio-net function.
pub const DEVICE_ID: u16 = 0x1041;

// virtio-net feature bits (virtio 1.2, 5.1.3).
const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_ECN: u64 = 1 << 9;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_ECN: u64 = 1 << 13;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_CTRL_RX: u64 = 1 << 18;

// Device configuration offsets and the link bit.
const CFG_MAC: u64 = 0;
const CFG_STATUS: u64 = 6;
const STATUS_LINK_UP: u16 = 1;

// virtio_net_hdr_v1 (12 bytes with VERSION_1, whatever MRG_RXBUF says).
/// Bytes of the header in front of every frame.
pub const HDR_LEN: usize = 12;
const HDR_F_NEEDS_CSUM: u8 = 1;
const HDR_F_DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

// Control queue: class RX, command PROMISC, and the ack values.
const CTRL_RX: u8 = 0;
const CTRL_RX_PROMISC: u8 = 0;
const CTRL_OK: u8 = 0;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const CTRL_QUEUE: u16 = 2;
/// Bytes of one receive buffer: header and a 1514-byte frame, rounded up.
pub const RX_BUF: usize = 2048;
const RX_SLOTS: usize = QUEUE_MAX as usize;
/// Transmit slots own two descriptors each (header, frame).
const TX_DESC_PER_SLOT: u16 = 2;
const TX_SLOTS: usize = (QUEUE_MAX / TX_DESC_PER_SLOT) as usize;
/// Bytes of one transmit buffer (header, then the frame).
const TX_BUF: usize = 2048;
/// Largest frame the probe sends (header excluded).
pub const TX_FRAME_MAX: usize = TX_BUF - HDR_LEN;
/// How long a transmit slot or a control command may take.
const DEVICE_TIMEOUT_US: u64 = 1_000_000;
/// Receive buffers given back before the device is notified.
const RX_KICK_BATCH: usize = 8;
/// Bad headers reported one by one (the rest are only counted).
const BAD_HEADERS_SHOWN: u64 = 4;

#[repr(C, align(4096))]
struct RxMem([[u8; RX_BUF]; RX_SLOTS]);
#[repr(C, align(4096))]
struct TxMem([[u8; TX_BUF]; TX_SLOTS]);
#[repr(C, align(64))]
struct CtrlMem([u8; 64]);

static mut RX_MEM: RxMem = RxMem([[0; RX_BUF]; RX_SLOTS]);
static mut TX_MEM: TxMem = TxMem([[0; TX_BUF]; TX_SLOTS]);
static mut CTRL_MEM: CtrlMem = CtrlMem([0; 64]);

/// Device features the driver accepts when offered (and their
/// prerequisites are: see [`select_features`]).
const WANTED: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_MAC
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN
    | F_MRG_RXBUF
    | F_STATUS
    | F_CTRL_VQ
    | F_CTRL_RX;

/// What the driver accepts of `offered`: [`WANTED`] and the transport
/// features, minus any feature whose prerequisite is missing (virtio
/// 5.1.3.1); guest TSO only with mergeable buffers, since the probe's
/// receive buffers are too small for 64 KiB frames.
fn select_features(offered: u64) -> u64 {
    let mut f = offered & (WANTED | virtio::TRANSPORT_FEATURES);
    let drop_unless = |f: &mut u64, feature: u64, needs: u64| {
        if *f & needs == 0 {
            *f &= !feature;
        }
    };
    drop_unless(&mut f, F_HOST_TSO4 | F_HOST_TSO6, F_CSUM);
    drop_unless(&mut f, F_HOST_ECN, F_HOST_TSO4 | F_HOST_TSO6);
    drop_unless(&mut f, F_GUEST_TSO4 | F_GUEST_TSO6, F_GUEST_CSUM);
    drop_unless(&mut f, F_GUEST_TSO4 | F_GUEST_TSO6, F_MRG_RXBUF);
    drop_unless(&mut f, F_GUEST_ECN, F_GUEST_TSO4 | F_GUEST_TSO6);
    drop_unless(&mut f, F_CTRL_RX, F_CTRL_VQ);
    f
}

/// Drives every virtio-net function on bus 0; the first one runs the host
/// exchange when `probe.net.ip=` asks for it.
pub fn run(pci: &Pci, cmdline: &[u8]) {
    let options = nettest::Options::parse(cmdline);
    let mut exchange = options.ip.is_some();
    let mut found = 0;
    for function in pci.functions() {
        if function.vendor == virtio::VENDOR_ID && function.device == DEVICE_ID {
            found += 1;
            let slot = function.bdf.label();
            match Nic::new(&pci.config, function) {
                Ok(mut nic) => {
                    if core::mem::take(&mut exchange) {
                        nettest::run(&mut nic, &options);
                    }
                    nic.finish();
                }
                Err(err) => report!("net slot={slot} error {err}"),
            }
        }
    }
    if exchange {
        report!("net exchange skipped=no_device");
    }
    report!("net devices={found}");
}

/// Counters of one device.
#[derive(Clone, Copy, Default)]
pub struct NicStats {
    /// Frames received (first buffers).
    pub rx_frames: u64,
    /// Frame bytes received (headers excluded).
    pub rx_bytes: u64,
    /// Frames whose virtio header was out of spec.
    pub rx_bad_headers: u64,
    /// Frames spread over more than one buffer (mergeable buffers).
    pub rx_merged: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Frame bytes sent (headers excluded).
    pub tx_bytes: u64,
    /// Frames sent with `NEEDS_CSUM` for the device to complete.
    pub tx_csum_offload: u64,
    /// Frames sent per layout: one descriptor, two chained, indirect.
    pub tx_layouts: [u64; 3],
}

/// A received frame the probe holds until [`Nic::release`].
pub struct RxToken {
    slot: usize,
    len: usize,
    /// Part of a frame spread over several buffers (only the first is
    /// here): not to be parsed as a whole frame.
    pub partial: bool,
}

impl RxToken {
    /// The Ethernet frame (after the virtio header).
    pub fn frame(&self) -> &[u8] {
        // SAFETY: the device returned this buffer (used ring, after an
        // acquire fence) and it is not given back before `release`
        // consumes the token, so nothing writes it meanwhile.
        let buffer = unsafe { &(*core::ptr::addr_of!(RX_MEM)).0[self.slot] };
        &buffer[HDR_LEN..HDR_LEN + self.len]
    }
}

/// A free transmit buffer, to fill and hand to [`Nic::send`].
pub struct TxSlot {
    slot: usize,
}

impl TxSlot {
    /// The frame area (after the header), [`TX_FRAME_MAX`] bytes.
    pub fn frame_mut(&mut self) -> &mut [u8] {
        // SAFETY: the slot is idle (the device completed it or never had
        // it) and this token is its only handle.
        let buffer = unsafe { &mut (*core::ptr::addr_of_mut!(TX_MEM)).0[self.slot] };
        &mut buffer[HDR_LEN..]
    }
}

/// A live virtio-net device: its queues and buffers.
pub struct Nic {
    device: Device,
    rx: Queue,
    tx: Queue,
    /// This device's PCI slot.
    pub slot: SlotLabel,
    /// The MAC from the configuration space (zero without VIRTIO_NET_F_MAC).
    pub mac: Mac,
    tx_busy: [bool; TX_SLOTS],
    tx_next: usize,
    /// Receive buffers given back but not yet notified.
    rx_unkicked: usize,
    /// The device misbehaved (bogus used element, timeout): leave it.
    broken: bool,
    tsc_mhz: u64,
    /// Counters.
    pub stats: NicStats,
}

impl Nic {
    /// Initialises the device, reports its configuration, sets up the
    /// queues, sets DRIVER_OK, fills the receive ring and, with a control
    /// queue, sends one command.
    fn new(config: &Config, function: &Function) -> Result<Nic, virtio::VirtioError> {
        let mut device = Device::init_with(config, function, select_features)?;
        let slot = device.bdf.label();
        let (mac, status) = read_config(&device);
        report_config(&device, mac, status);
        let rx = device.setup_queue(RX_QUEUE, 1)?;
        let tx = device.setup_queue(TX_QUEUE, TX_DESC_PER_SLOT)?;
        let ctrl = if device.has(F_CTRL_VQ) {
            Some(device.setup_queue(CTRL_QUEUE, 4)?)
        } else {
            None
        };
        device.driver_ok();
        let mut nic = Nic {
            device,
            rx,
            tx,
            slot,
            mac,
            tx_busy: [false; TX_SLOTS],
            tx_next: 0,
            rx_unkicked: 0,
            broken: false,
            tsc_mhz: io::tsc_mhz(),
            stats: NicStats::default(),
        };
        nic.fill_rx();
        match ctrl {
            Some(mut queue) => nic.control(&mut queue),
            None => report!("net slot={slot} ctrl none"),
        }
        Ok(nic)
    }

    /// Whether a feature was negotiated.
    pub fn has(&self, feature: u64) -> bool {
        self.device.has(feature)
    }

    /// Whether the device completes checksums (`VIRTIO_NET_F_CSUM`).
    pub fn csum_offload(&self) -> bool {
        self.has(F_CSUM)
    }

    /// TSC ticks per microsecond.
    pub fn tsc_mhz(&self) -> u64 {
        self.tsc_mhz
    }

    /// Whether the device misbehaved and is left alone.
    pub fn broken(&self) -> bool {
        self.broken
    }

    fn fill_rx(&mut self) {
        let slots = self.rx.slots().min(RX_SLOTS);
        for slot in 0..slots {
            self.post_rx(slot);
        }
        self.rx.kick();
        report!(
            "net slot={} rx_buffers={slots} buffer_bytes={RX_BUF} tx_slots={}",
            self.slot,
            self.tx.slots().min(TX_SLOTS)
        );
    }

    fn post_rx(&mut self, slot: usize) {
        // SAFETY: only the address is taken; `slot` < RX_SLOTS.
        let addr = unsafe { core::ptr::addr_of!((*core::ptr::addr_of!(RX_MEM)).0[slot]) } as u64;
        let buf = Buf {
            addr,
            len: RX_BUF as u32,
            device_writes: true,
        };
        self.rx.add(slot, &[buf], false);
    }

    /// The next received frame, if any, its header checked (and counted
    /// when bad). The buffers of a merged frame after the first are given
    /// back at once.
    pub fn poll(&mut self) -> Option<RxToken> {
        if self.broken {
            return None;
        }
        let Some(used) = self.rx.take_used() else {
            self.kick_rx();
            return None;
        };
        let Some(slot) = used.slot.filter(|&s| s < RX_SLOTS) else {
            self.fail("bogus rx used element");
            return None;
        };
        let len = (used.len as usize).min(RX_BUF);
        let header = rx_header(slot);
        let buffers = self.check_header(&header, used.len as usize);
        let frame_len = len.saturating_sub(HDR_LEN);
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += frame_len as u64;
        let partial = buffers > 1;
        if partial {
            self.stats.rx_merged += 1;
            self.drop_merged(buffers - 1);
        }
        Some(RxToken {
            slot,
            len: frame_len,
            partial,
        })
    }

    /// Gives a received buffer back to the device; the device is told in
    /// batches of `RX_KICK_BATCH`, or as soon as nothing is left to
    /// receive.
    pub fn release(&mut self, token: RxToken) {
        if self.broken {
            return;
        }
        self.post_rx(token.slot);
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

    /// Takes and gives back the `count` further buffers of a merged frame.
    fn drop_merged(&mut self, count: usize) {
        self.kick_rx();
        for _ in 0..count {
            let start = io::rdtsc();
            let deadline = DEVICE_TIMEOUT_US.saturating_mul(self.tsc_mhz);
            let used = loop {
                if let Some(used) = self.rx.take_used() {
                    break used;
                }
                if io::rdtsc().wrapping_sub(start) > deadline {
                    self.fail("merged buffers missing");
                    return;
                }
                core::hint::spin_loop();
            };
            match used.slot.filter(|&s| s < RX_SLOTS) {
                Some(slot) => self.post_rx(slot),
                None => return self.fail("bogus rx used element"),
            }
        }
        self.rx.kick();
    }

    /// Checks one received header (`used_len`: bytes the device wrote);
    /// returns the number of buffers the frame occupies.
    fn check_header(&mut self, header: &RxHeader, used_len: usize) -> usize {
        let merged = self.has(F_MRG_RXBUF);
        let buffers = usize::from(header.num_buffers);
        let verdict = header_problem(header, used_len, self.device.negotiated);
        let verdict = verdict.or(match (merged, buffers) {
            (true, 0) => Some("num_buffers"),
            (true, n) if n > RX_SLOTS => Some("num_buffers"),
            // Without mergeable buffers the device must write 1 (QEMU up
            // to 9.x leaves the tap's 0).
            (false, n) if n > 1 => Some("num_buffers"),
            _ => None,
        });
        if let Some(reason) = verdict {
            self.stats.rx_bad_headers += 1;
            if self.stats.rx_bad_headers <= BAD_HEADERS_SHOWN {
                report!(
                    "net slot={} rx bad_header reason={reason} flags={:#04x} gso_type={:#04x} gso_size={} csum_start={} csum_offset={} num_buffers={} len={used_len}",
                    self.slot, header.flags, header.gso_type, header.gso_size,
                    header.csum_start, header.csum_offset, header.num_buffers
                );
            }
        }
        if merged && (1..=RX_SLOTS).contains(&buffers) {
            buffers
        } else {
            1
        }
    }

    /// A free transmit slot: completed slots are reclaimed first; when all
    /// are busy, waits (bounded) for one. `None` if the device is broken.
    pub fn tx_slot(&mut self) -> Option<TxSlot> {
        let slots = self.tx.slots().min(TX_SLOTS);
        let start = io::rdtsc();
        let deadline = DEVICE_TIMEOUT_US.saturating_mul(self.tsc_mhz);
        while !self.broken {
            self.reclaim_tx();
            for step in 0..slots {
                let slot = (self.tx_next + step) % slots;
                if !self.tx_busy[slot] {
                    self.tx_next = (slot + 1) % slots;
                    return Some(TxSlot { slot });
                }
            }
            if io::rdtsc().wrapping_sub(start) > deadline {
                self.fail("tx completion timeout");
            }
            core::hint::spin_loop();
        }
        None
    }

    fn reclaim_tx(&mut self) {
        while let Some(used) = self.tx.take_used() {
            match used.slot.filter(|&s| s < TX_SLOTS && self.tx_busy[s]) {
                Some(slot) => self.tx_busy[slot] = false,
                None => return self.fail("bogus tx used element"),
            }
        }
    }

    /// Waits (bounded) until the device has completed every frame sent.
    pub fn drain_tx(&mut self) -> bool {
        let start = io::rdtsc();
        let deadline = DEVICE_TIMEOUT_US.saturating_mul(self.tsc_mhz);
        while !self.broken && self.tx_busy.iter().any(|&b| b) {
            self.reclaim_tx();
            if io::rdtsc().wrapping_sub(start) > deadline {
                self.fail("tx completion timeout");
            }
            core::hint::spin_loop();
        }
        !self.broken
    }

    /// Sends the `len`-byte frame in `slot`. `csum`: `(start, offset)` for
    /// the device to fill in the checksum (only with VIRTIO_NET_F_CSUM).
    /// `kick` false leaves the notification to a later send.
    pub fn send(&mut self, slot: TxSlot, len: usize, csum: Option<(u16, u16)>, kick: bool) {
        if self.broken {
            return;
        }
        let len = len.min(TX_FRAME_MAX);
        let csum = csum.filter(|_| self.csum_offload());
        let index = slot.slot;
        let base = write_tx_header(index, csum);
        let layout = (self.stats.tx_frames % 3) as usize;
        let layout = if layout == 2 && !self.tx.indirect() {
            1
        } else {
            layout
        };
        let header = Buf {
            addr: base,
            len: HDR_LEN as u32,
            device_writes: false,
        };
        let frame = Buf {
            addr: base + HDR_LEN as u64,
            len: len as u32,
            device_writes: false,
        };
        let whole = Buf {
            len: (HDR_LEN + len) as u32,
            ..header
        };
        match layout {
            0 => self.tx.add(index, &[whole], false),
            1 => self.tx.add(index, &[header, frame], false),
            _ => self.tx.add(index, &[header, frame], true),
        }
        self.tx_busy[index] = true;
        self.stats.tx_layouts[layout] += 1;
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += len as u64;
        self.stats.tx_csum_offload += u64::from(csum.is_some());
        if kick {
            self.tx.kick();
        }
    }

    /// Notifies the device of frames sent with `kick` false.
    pub fn kick_tx(&mut self) {
        self.tx.kick();
    }

    /// Sends `VIRTIO_NET_CTRL_RX_PROMISC on` (when CTRL_RX is negotiated)
    /// and reports the device's ack.
    fn control(&mut self, queue: &mut Queue) {
        if !self.has(F_CTRL_RX) {
            report!("net slot={} ctrl queue=2 command=none", self.slot);
            return;
        }
        let mem = core::ptr::addr_of_mut!(CTRL_MEM) as u64;
        // SAFETY: the control buffer is only used here, before the device
        // has any command; the ack byte is preset so a silent device shows.
        unsafe {
            let bytes = &mut (*core::ptr::addr_of_mut!(CTRL_MEM)).0;
            bytes[..3].copy_from_slice(&[CTRL_RX, CTRL_RX_PROMISC, 1]);
            core::ptr::write_volatile(&mut bytes[8], 0xff);
        }
        let readable = |addr, len| Buf {
            addr,
            len,
            device_writes: false,
        };
        let ack = Buf {
            addr: mem + 8,
            len: 1,
            device_writes: true,
        };
        queue.add(0, &[readable(mem, 2), readable(mem + 2, 1), ack], false);
        queue.kick();
        let start = io::rdtsc();
        let deadline = DEVICE_TIMEOUT_US.saturating_mul(self.tsc_mhz);
        let done = loop {
            if queue.take_used().is_some() {
                break true;
            }
            if io::rdtsc().wrapping_sub(start) > deadline {
                break false;
            }
            core::hint::spin_loop();
        };
        // SAFETY: the device completed the command (or timed out and the
        // byte is only read); volatile because the device wrote it.
        let value = unsafe { core::ptr::read_volatile(&(*core::ptr::addr_of!(CTRL_MEM)).0[8]) };
        let slot = self.slot;
        match (done, value) {
            (false, _) => report!("net slot={slot} ctrl rx_promisc=1 ack=timeout"),
            (true, CTRL_OK) => report!("net slot={slot} ctrl rx_promisc=1 ack=ok"),
            (true, v) => report!("net slot={slot} ctrl rx_promisc=1 ack=err({v})"),
        }
    }

    fn fail(&mut self, why: &str) {
        if !self.broken {
            report!("net slot={} broken reason=\"{why}\"", self.slot);
        }
        self.broken = true;
    }

    /// Reports the counters and resets the device.
    fn finish(mut self) {
        self.drain_tx();
        let s = self.stats;
        let (rx, tx) = (self.rx.stats, self.tx.stats);
        report!(
            "net slot={} rx frames={} bytes={} bad_headers={} merged={} notifies={} suppressed={}",
            self.slot,
            s.rx_frames,
            s.rx_bytes,
            s.rx_bad_headers,
            s.rx_merged,
            rx.notifies,
            rx.suppressed
        );
        report!(
            "net slot={} tx frames={} bytes={} csum_offload={} single={} chained={} indirect={} notifies={} suppressed={}",
            self.slot,
            s.tx_frames,
            s.tx_bytes,
            s.tx_csum_offload,
            s.tx_layouts[0],
            s.tx_layouts[1],
            s.tx_layouts[2],
            tx.notifies,
            tx.suppressed
        );
        let reset = if self.device.reset() { "ok" } else { "timeout" };
        report!("net slot={} reset={reset}", self.slot);
    }
}

/// The fields of a received `virtio_net_hdr_v1`.
struct RxHeader {
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
    num_buffers: u16,
}

fn rx_header(slot: usize) -> RxHeader {
    // SAFETY: the device returned the buffer; volatile because the device
    // wrote it.
    let h: [u8; HDR_LEN] =
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!(RX_MEM.0[slot]).cast()) };
    let le = |at: usize| u16::from_le_bytes([h[at], h[at + 1]]);
    RxHeader {
        flags: h[0],
        gso_type: h[1],
        gso_size: le(4),
        csum_start: le(6),
        csum_offset: le(8),
        num_buffers: le(10),
    }
}

/// What is wrong with a header given the negotiated features (virtio
/// 5.1.6.4), `None` if nothing.
fn header_problem(h: &RxHeader, used_len: usize, negotiated: u64) -> Option<&'static str> {
    let has = |f: u64| negotiated & f != 0;
    if !(HDR_LEN..=RX_BUF).contains(&used_len) {
        return Some("len");
    }
    let known = HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID;
    if h.flags & !known != 0 || (h.flags != 0 && !has(F_GUEST_CSUM)) {
        return Some("flags");
    }
    let frame_len = used_len - HDR_LEN;
    let csum_end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
    if h.flags & HDR_F_NEEDS_CSUM != 0 && csum_end > frame_len && h.num_buffers <= 1 {
        return Some("csum_range");
    }
    let gso = h.gso_type & !GSO_ECN;
    let gso_ok = match gso {
        GSO_NONE => h.gso_type & GSO_ECN == 0,
        GSO_TCPV4 => has(F_GUEST_TSO4),
        GSO_TCPV6 => has(F_GUEST_TSO6),
        _ => false,
    };
    let ecn_ok = h.gso_type & GSO_ECN == 0 || has(F_GUEST_ECN);
    if !gso_ok
        || !ecn_ok
        || (gso != GSO_NONE && (h.gso_size == 0 || h.flags & HDR_F_NEEDS_CSUM == 0))
    {
        return Some("gso");
    }
    None
}

/// Writes the transmit header of `slot` (checksum offload or none) and
/// returns the buffer's address.
fn write_tx_header(slot: usize, csum: Option<(u16, u16)>) -> u64 {
    let mut header = [0u8; HDR_LEN];
    if let Some((start, offset)) = csum {
        header[0] = HDR_F_NEEDS_CSUM;
        header[6..8].copy_from_slice(&start.to_le_bytes());
        header[8..10].copy_from_slice(&offset.to_le_bytes());
    }
    // SAFETY: the slot is idle (its `TxSlot` was handed out) and the
    // device reads it only after the chain is published.
    unsafe {
        let buffer = &mut (*core::ptr::addr_of_mut!(TX_MEM)).0[slot];
        buffer[..HDR_LEN].copy_from_slice(&header);
        buffer.as_ptr() as u64
    }
}

/// MAC and status from the device configuration, read consistently.
fn read_config(device: &Device) -> (Mac, u16) {
    let cfg = device.device_cfg;
    let read = || {
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = cfg.read8(CFG_MAC + i as u64);
        }
        (mac, cfg.read16(CFG_STATUS))
    };
    let mut value = read();
    for _ in 0..8 {
        let before = device.config_generation();
        value = read();
        if device.config_generation() == before {
            break;
        }
    }
    if !device.has(F_MAC) {
        value.0 = [0; 6];
    }
    value
}

fn report_config(device: &Device, mac: Mac, status: u16) {
    let flag = |f: u64| u8::from(device.negotiated & f != 0);
    let link = if !device.has(F_STATUS) {
        "unknown"
    } else if status & STATUS_LINK_UP != 0 {
        "up"
    } else {
        "down"
    };
    report!(
        "net slot={} mac={} link={link} status={status:#x} features={:#x} negotiated={:#x} mrg_rxbuf={} csum={} guest_csum={} host_tso={} guest_tso={} ecn={} ctrl_vq={} event_idx={} indirect={}",
        device.bdf.label(),
        MacText(mac),
        device.offered,
        device.negotiated,
        flag(F_MRG_RXBUF),
        flag(F_CSUM),
        flag(F_GUEST_CSUM),
        flag(F_HOST_TSO4 | F_HOST_TSO6),
        flag(F_GUEST_TSO4 | F_GUEST_TSO6),
        flag(F_HOST_ECN | F_GUEST_ECN),
        flag(F_CTRL_VQ),
        flag(virtio::F_EVENT_IDX),
        flag(virtio::F_INDIRECT_DESC),
    );
}
