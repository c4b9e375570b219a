//! The firmware mode's disk driver, shaped like rust-hypervisor-firmware's
//! (its `src/pci.rs`, `src/block.rs`): PCI bus 0 through 0xCF8/0xCFC with
//! 32-bit accesses only, slots 0-31, function 0; memory decoding turned on
//! by a dword write to the command register, BARs sized with decoding on
//! and used where the VMM put them (never assigned; bus mastering never
//! turned on); the modern virtio-pci capabilities; one 16-entry split queue
//! without MSI-X, polled on `used.idx`; every request three descriptors
//! (header, one 512-byte sector, status) taken in turn from the ring, so a
//! FLUSH, which fills no data descriptor, carries whatever the middle one
//! held before. Unlike that firmware every wait is bounded.

use core::sync::atomic::{fence, Ordering};

use crate::io::{inl, outl, rdtsc, tsc_mhz};
use crate::pci::Mmio;
use crate::report;

/// Bytes of a sector.
pub const SECTOR: usize = 512;
/// One sector's bytes.
pub type Sector = [u8; SECTOR];

const CF8_ADDRESS: u16 = 0xcf8;
const CF8_DATA: u16 = 0xcfc;
const CF8_ENABLE: u32 = 1 << 31;
const SLOTS: u8 = 32;

const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern virtio-blk, the only device the firmware drives.
pub const VIRTIO_BLK_DEVICE: u16 = 0x1042;

const REG_COMMAND: u8 = 0x04;
const REG_BAR0: u8 = 0x10;
const REG_CAP_PTR: u8 = 0x34;
const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_MASTER: u32 = 1 << 2;
const STATUS_CAP_LIST: u32 = 1 << 20; // in the dword at REG_COMMAND
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const MSIX_ENABLE: u32 = 1 << 31; // in the capability's first dword
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_DEVICE: u8 = 4;
const BAR_COUNT: usize = 6;
/// The firmware identity-maps only the first 4 GiB.
const MAPPED_END: u64 = 1 << 32;

// Common configuration registers.
const CC_DEVICE_FEATURE_SELECT: u64 = 0x00;
const CC_DEVICE_FEATURE: u64 = 0x04;
const CC_DRIVER_FEATURE_SELECT: u64 = 0x08;
const CC_DRIVER_FEATURE: u64 = 0x0c;
const CC_STATUS: u64 = 0x14;
const CC_QUEUE_SELECT: u64 = 0x16;
const CC_QUEUE_SIZE: u64 = 0x18;
const CC_QUEUE_ENABLE: u64 = 0x1c;
const CC_QUEUE_NOTIFY_OFF: u64 = 0x1e;
const CC_QUEUE_DESC: u64 = 0x20;
const CC_QUEUE_DRIVER: u64 = 0x28;
const CC_QUEUE_DEVICE: u64 = 0x30;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 0x80;
const F_RO: u64 = 1 << 5;
const F_VERSION_1: u64 = 1 << 32;

/// The firmware's queue size (a device with a smaller queue is refused).
pub const QUEUE_SIZE: u16 = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
// Ring layout in one page: descriptors, avail ring, used ring.
const AVAIL_OFF: u64 = 0x100;
const USED_OFF: u64 = 0x200;

const T_IN: u32 = 0;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;
const S_PENDING: u8 = 0xff;
/// How long one request may take.
const REQUEST_TIMEOUT_US: u64 = 5_000_000;
const RESET_POLLS: u32 = 1_000_000;

#[repr(C, align(4096))]
struct RingPage([u8; 4096]);

#[repr(C, align(4096))]
struct IoMem {
    data: Sector,
    header: [u8; 16],
    status: u8,
}

static mut RING: RingPage = RingPage([0; 4096]);
static mut IO: IoMem = IoMem {
    data: [0; SECTOR],
    header: [0; 16],
    status: 0,
};

/// Why the firmware mode stopped: a stage-specific reason and, for some,
/// the offending value.
#[derive(Clone, Copy)]
pub struct FwError {
    /// What went wrong (`snake_case`).
    pub reason: &'static str,
    /// The value that was wrong, if one.
    pub value: Option<u64>,
}

impl FwError {
    /// An error without a value.
    pub const fn new(reason: &'static str) -> Self {
        Self {
            reason,
            value: None,
        }
    }

    /// An error naming `value`.
    pub const fn with(reason: &'static str, value: u64) -> Self {
        Self {
            reason,
            value: Some(value),
        }
    }
}

impl core::fmt::Display for FwError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "reason={}", self.reason)?;
        match self.value {
            Some(value) => write!(f, " value={value:#x}"),
            None => Ok(()),
        }
    }
}

/// Reads a config dword of bus 0, `slot`, function 0 through 0xCF8/0xCFC.
fn read32(slot: u8, reg: u8) -> u32 {
    outl(CF8_ADDRESS, address(slot, reg));
    inl(CF8_DATA)
}

fn write32(slot: u8, reg: u8, value: u32) {
    outl(CF8_ADDRESS, address(slot, reg));
    outl(CF8_DATA, value);
}

/// A byte of config space, taken out of its dword (the firmware never
/// makes narrower accesses).
fn read8(slot: u8, reg: u8) -> u8 {
    (read32(slot, reg & !3) >> ((reg & 3) * 8)) as u8
}

fn address(slot: u8, reg: u8) -> u32 {
    CF8_ENABLE | (u32::from(slot) << 11) | u32::from(reg & 0xfc)
}

/// Scans slots 0-31, function 0, reporting every function, and returns
/// the slots holding a modern virtio-blk (at most 32, in slot order).
pub fn scan() -> ([u8; SLOTS as usize], usize) {
    let mut found = [0u8; SLOTS as usize];
    let mut count = 0;
    for slot in 0..SLOTS {
        let id = read32(slot, 0);
        let (vendor, device) = (id as u16, (id >> 16) as u16);
        if vendor == 0xffff {
            continue;
        }
        report!("fw pci slot={slot} vendor={vendor:#06x} device={device:#06x}");
        if vendor == VIRTIO_VENDOR && device == VIRTIO_BLK_DEVICE {
            found[count] = slot;
            count += 1;
        }
    }
    (found, count)
}

/// A sized BAR.
#[derive(Clone, Copy, Default)]
struct Bar {
    addr: u64,
    size: u64,
}

/// A virtio-blk function set up and live.
pub struct Disk {
    slot: u8,
    common: Mmio,
    notify: u64,
    notify_multiplier: u32,
    /// Sectors on the disk.
    pub capacity: u64,
    next_head: u16,
    avail_idx: u16,
    tsc_mhz: u64,
    /// Requests sent.
    pub requests: u64,
}

impl Disk {
    /// Turns memory decoding on, sizes the BARs, finds the capabilities
    /// and brings the device up to DRIVER_OK.
    pub fn open(slot: u8) -> Result<Disk, FwError> {
        let before = read32(slot, REG_COMMAND);
        write32(slot, REG_COMMAND, before | COMMAND_MEMORY);
        let after = read32(slot, REG_COMMAND);
        report!(
            "fw slot={slot} command before={:#06x} after={:#06x} memory={} master={}",
            before & 0xffff,
            after & 0xffff,
            u8::from(after & COMMAND_MEMORY != 0),
            u8::from(after & COMMAND_MASTER != 0)
        );
        let bars = size_bars(slot)?;
        let caps = Caps::find(slot, &bars)?;
        let mut disk = Disk {
            slot,
            common: Mmio(caps.common),
            notify: caps.notify,
            notify_multiplier: caps.notify_multiplier,
            capacity: 0,
            next_head: 0,
            avail_idx: 0,
            tsc_mhz: tsc_mhz(),
            requests: 0,
        };
        disk.start(caps.device)?;
        Ok(disk)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 and RO only),
    /// FEATURES_OK, queue 0, DRIVER_OK.
    fn start(&mut self, device_cfg: u64) -> Result<(), FwError> {
        let common = self.common;
        if !self.reset() {
            return Err(FwError::new("reset_timeout"));
        }
        self.add_status(STATUS_ACKNOWLEDGE);
        self.add_status(STATUS_DRIVER);
        let mut offered = 0u64;
        for half in 0..2u32 {
            common.write32(CC_DEVICE_FEATURE_SELECT, half);
            offered |= u64::from(common.read32(CC_DEVICE_FEATURE)) << (32 * half);
        }
        if offered & F_VERSION_1 == 0 {
            self.add_status(STATUS_FAILED);
            return Err(FwError::with("no_version_1", offered));
        }
        let accepted = offered & (F_VERSION_1 | F_RO);
        for half in 0..2u32 {
            common.write32(CC_DRIVER_FEATURE_SELECT, half);
            common.write32(CC_DRIVER_FEATURE, (accepted >> (32 * half)) as u32);
        }
        self.add_status(STATUS_FEATURES_OK);
        if common.read8(CC_STATUS) & STATUS_FEATURES_OK == 0 {
            self.add_status(STATUS_FAILED);
            return Err(FwError::new("features_rejected"));
        }
        common.write16(CC_QUEUE_SELECT, 0);
        let max = common.read16(CC_QUEUE_SIZE);
        if max < QUEUE_SIZE {
            self.add_status(STATUS_FAILED);
            return Err(FwError::with("queue_too_small", u64::from(max)));
        }
        common.write16(CC_QUEUE_SIZE, QUEUE_SIZE);
        let ring = ring_base();
        // SAFETY: the ring page belongs to this driver; the device does not
        // see it before the addresses below are written.
        unsafe { core::ptr::write_bytes(ring as *mut u8, 0, 4096) };
        write_addr(common, CC_QUEUE_DESC, ring);
        write_addr(common, CC_QUEUE_DRIVER, ring + AVAIL_OFF);
        write_addr(common, CC_QUEUE_DEVICE, ring + USED_OFF);
        common.write16(CC_QUEUE_ENABLE, 1);
        self.add_status(STATUS_DRIVER_OK);
        let cfg = Mmio(device_cfg);
        self.capacity = u64::from(cfg.read32(0)) | (u64::from(cfg.read32(4)) << 32);
        report!(
            "fw slot={} virtio features={offered:#x} accepted={accepted:#x} queue_max={max} queue_size={QUEUE_SIZE} status={:#04x} capacity={}",
            self.slot,
            common.read8(CC_STATUS),
            self.capacity
        );
        Ok(())
    }

    fn add_status(&self, bits: u8) {
        let status = self.common.read8(CC_STATUS);
        self.common.write8(CC_STATUS, status | bits);
    }

    /// Writes status 0 and waits (bounded) for it to read back.
    pub fn reset(&self) -> bool {
        self.common.write8(CC_STATUS, 0);
        (0..RESET_POLLS).any(|_| self.common.read8(CC_STATUS) == 0)
    }

    /// Reads sector `lba` into `out`.
    pub fn read(&mut self, lba: u64, out: &mut Sector) -> Result<(), FwError> {
        if lba >= self.capacity {
            return Err(FwError::with("sector_beyond_disk", lba));
        }
        let status = self.request(T_IN, lba)?;
        if status != S_OK {
            return Err(FwError::with("read_status", u64::from(status)));
        }
        // SAFETY: the request completed (acquire fence in `request`); the
        // device no longer writes the buffer.
        *out = unsafe { core::ptr::addr_of!(IO.data).read_volatile() };
        Ok(())
    }

    /// Sends a FLUSH the firmware's way and returns its status byte and
    /// the stale middle descriptor's (address, length).
    pub fn flush(&mut self) -> Result<(u8, u64, u32), FwError> {
        let middle = (self.next_head + 1) % QUEUE_SIZE;
        let (addr, len) = read_desc(middle);
        Ok((self.request(T_FLUSH, 0)?, addr, len))
    }

    /// One three-descriptor request; returns the device's status byte.
    fn request(&mut self, kind: u32, sector: u64) -> Result<u8, FwError> {
        // SAFETY: no request is in flight (each one is waited for), so the
        // device does not touch header, data or status now.
        let (header, data, status) = unsafe {
            let io = core::ptr::addr_of_mut!(IO);
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            core::ptr::addr_of_mut!((*io).header).write_volatile(header);
            core::ptr::addr_of_mut!((*io).status).write_volatile(S_PENDING);
            (
                core::ptr::addr_of!((*io).header) as u64,
                core::ptr::addr_of!((*io).data) as u64,
                core::ptr::addr_of!((*io).status) as u64,
            )
        };
        let head = self.next_head;
        let (second, third) = ((head + 1) % QUEUE_SIZE, (head + 2) % QUEUE_SIZE);
        write_desc(head, Some((header, 16)), DESC_F_NEXT, second);
        let data_flags = DESC_F_NEXT | if kind == T_IN { DESC_F_WRITE } else { 0 };
        let data_buf = (kind != T_FLUSH).then_some((data, SECTOR as u32));
        write_desc(second, data_buf, data_flags, third);
        write_desc(third, Some((status, 1)), DESC_F_WRITE, 0);
        let ring = ring_base();
        write_u16(
            ring + AVAIL_OFF + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE),
            head,
        );
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        write_u16(ring + AVAIL_OFF + 2, self.avail_idx);
        self.next_head = (third + 1) % QUEUE_SIZE;
        fence(Ordering::SeqCst);
        let notify_off = self.common.read16(CC_QUEUE_NOTIFY_OFF);
        let at = self.notify + u64::from(notify_off) * u64::from(self.notify_multiplier);
        Mmio(at).write32(0, 0);
        self.requests += 1;
        self.wait_used()?;
        // SAFETY: the device completed the request and wrote the status.
        Ok(unsafe { core::ptr::addr_of!(IO.status).read_volatile() })
    }

    /// Polls `used.idx` until it reaches `avail.idx` (bounded).
    fn wait_used(&self) -> Result<(), FwError> {
        let used_idx = ring_base() + USED_OFF + 2;
        let start = rdtsc();
        let limit = REQUEST_TIMEOUT_US.saturating_mul(self.tsc_mhz);
        while read_u16(used_idx) != self.avail_idx {
            if rdtsc().wrapping_sub(start) > limit {
                return Err(FwError::with("request_timeout", self.requests));
            }
            core::hint::spin_loop();
        }
        fence(Ordering::Acquire);
        Ok(())
    }
}

/// Sizes the six BARs with memory decoding on (as the firmware does),
/// restoring each, and reports them; a BAR of a reserved type is an error.
fn size_bars(slot: u8) -> Result<[Bar; BAR_COUNT], FwError> {
    let mut bars = [Bar::default(); BAR_COUNT];
    let mut index = 0;
    while index < BAR_COUNT {
        let reg = REG_BAR0 + 4 * index as u8;
        let low = read32(slot, reg);
        let (bar, width) = match (low & 1, (low >> 1) & 3) {
            (1, _) => (size_io(slot, reg, low), 1),
            (_, 0) => (size_mem32(slot, reg, low), 1),
            (_, 2) if index + 1 < BAR_COUNT => (size_mem64(slot, reg, low), 2),
            _ => return Err(FwError::with("bar_type", u64::from(low))),
        };
        if bar.size != 0 {
            let kind = match (low & 1, width) {
                (1, _) => "io",
                (_, 2) => "mem64",
                _ => "mem32",
            };
            let restored = read32(slot, reg) == low;
            report!(
                "fw slot={slot} bar={index} addr={:#x} size={:#x} type={kind} restored={}",
                bar.addr,
                bar.size,
                u8::from(restored)
            );
        }
        bars[index] = if low & 1 == 1 { Bar::default() } else { bar };
        index += width;
    }
    Ok(bars)
}

/// Writes all-ones to `reg`, returns what sticks, writes `original` back.
fn probe(slot: u8, reg: u8, original: u32) -> u32 {
    write32(slot, reg, u32::MAX);
    let mask = read32(slot, reg);
    write32(slot, reg, original);
    mask
}

fn size_io(slot: u8, reg: u8, low: u32) -> Bar {
    let mask = probe(slot, reg, low) & 0xffff_fffc;
    Bar {
        addr: u64::from(low & !3),
        size: u64::from((!mask).wrapping_add(1) & 0xffff),
    }
}

fn size_mem32(slot: u8, reg: u8, low: u32) -> Bar {
    let mask = probe(slot, reg, low) & !0xf;
    Bar {
        addr: u64::from(low & !0xf),
        size: if mask == 0 {
            0
        } else {
            u64::from((!mask).wrapping_add(1))
        },
    }
}

fn size_mem64(slot: u8, reg: u8, low: u32) -> Bar {
    let low_mask = probe(slot, reg, low) & !0xf;
    let high = read32(slot, reg + 4);
    let high_mask = probe(slot, reg + 4, high);
    let mask = (u64::from(high_mask) << 32) | u64::from(low_mask);
    Bar {
        addr: (u64::from(high) << 32) | u64::from(low & !0xf),
        size: if mask == 0 {
            0
        } else {
            (!mask).wrapping_add(1)
        },
    }
}

/// Where the virtio structures are.
struct Caps {
    common: u64,
    notify: u64,
    notify_multiplier: u32,
    device: u64,
}

impl Caps {
    /// Walks the capability list with dword reads; reports MSI-X's state.
    fn find(slot: u8, bars: &[Bar; BAR_COUNT]) -> Result<Caps, FwError> {
        if read32(slot, REG_COMMAND) & STATUS_CAP_LIST == 0 {
            return Err(FwError::new("no_capabilities"));
        }
        let (mut common, mut notify, mut device) = (None, None, None);
        let mut notify_multiplier = 0;
        let mut msix = None;
        let mut next = read8(slot, REG_CAP_PTR);
        for _ in 0..48 {
            if next < 0x40 {
                break;
            }
            let first = read32(slot, next);
            let id = first as u8;
            if id == CAP_MSIX {
                msix = Some(first & MSIX_ENABLE != 0);
            } else if id == CAP_VENDOR {
                let cfg_type = (first >> 24) as u8;
                let place = || region(slot, next, bars);
                match cfg_type {
                    CFG_COMMON if common.is_none() => common = Some(place()?),
                    CFG_NOTIFY if notify.is_none() => {
                        notify = Some(place()?);
                        notify_multiplier = read32(slot, next + 16);
                    }
                    CFG_DEVICE if device.is_none() => device = Some(place()?),
                    _ => {}
                }
            }
            next = ((first >> 8) as u8) & 0xfc;
        }
        let msix = match msix {
            Some(true) => "on",
            Some(false) => "off",
            None => "none",
        };
        let missing = |what| FwError::new(what);
        let caps = Caps {
            common: common.ok_or(missing("no_common_cfg"))?,
            notify: notify.ok_or(missing("no_notify_cfg"))?,
            notify_multiplier,
            device: device.ok_or(missing("no_device_cfg"))?,
        };
        report!(
            "fw slot={slot} caps common={:#x} notify={:#x} multiplier={notify_multiplier} device={:#x} msix={msix}",
            caps.common,
            caps.notify,
            caps.device
        );
        Ok(caps)
    }
}

/// The address a vendor capability at `cap` points to; it must lie in a
/// memory BAR the VMM programmed below 4 GiB.
fn region(slot: u8, cap: u8, bars: &[Bar; BAR_COUNT]) -> Result<u64, FwError> {
    let bar_index = read8(slot, cap + 4);
    let offset = u64::from(read32(slot, cap + 8));
    let len = u64::from(read32(slot, cap + 12));
    let bar = bars
        .get(usize::from(bar_index))
        .copied()
        .filter(|bar| bar.size != 0)
        .ok_or(FwError::with("capability_bar", u64::from(bar_index)))?;
    if bar.addr == 0 {
        return Err(FwError::with("bar_unassigned", u64::from(bar_index)));
    }
    let (start, end) = (bar.addr + offset, bar.addr + offset + len);
    if offset + len > bar.size {
        return Err(FwError::with("capability_outside_bar", offset));
    }
    if end > MAPPED_END {
        return Err(FwError::with("bar_above_4gib", bar.addr));
    }
    Ok(start)
}

fn ring_base() -> u64 {
    core::ptr::addr_of!(RING) as u64
}

/// Writes descriptor `index`; `buf` `None` leaves address and length as
/// they were (the firmware's FLUSH).
fn write_desc(index: u16, buf: Option<(u64, u32)>, flags: u16, next: u16) {
    let at = ring_base() + 16 * u64::from(index);
    // SAFETY: `at` is a descriptor inside the ring page; the device reads
    // it only after the avail index below is published.
    unsafe {
        if let Some((addr, len)) = buf {
            core::ptr::write_volatile(at as *mut u64, addr);
            core::ptr::write_volatile((at + 8) as *mut u32, len);
        }
        core::ptr::write_volatile((at + 12) as *mut u16, flags);
        core::ptr::write_volatile((at + 14) as *mut u16, next);
    }
}

fn read_desc(index: u16) -> (u64, u32) {
    let at = ring_base() + 16 * u64::from(index);
    // SAFETY: as for `write_desc`; reading is harmless.
    unsafe {
        (
            core::ptr::read_volatile(at as *const u64),
            core::ptr::read_volatile((at + 8) as *const u32),
        )
    }
}

fn write_u16(addr: u64, value: u16) {
    // SAFETY: `addr` lies in the ring page.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) };
}

fn read_u16(addr: u64) -> u16 {
    // SAFETY: `addr` lies in the ring page; the device writes it, hence
    // volatile.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

/// A 64-bit queue address as two dword writes, low first.
fn write_addr(common: Mmio, offset: u64, addr: u64) {
    common.write32(offset, addr as u32);
    common.write32(offset + 4, (addr >> 32) as u32);
}
