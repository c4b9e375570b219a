//! virtio 1.x over PCI, modern transport only, driven the way Linux does:
//! the vendor capabilities (common, notify, ISR, device configuration),
//! reset and the status handshake, feature negotiation, MSI-X vectors aimed
//! at the boot CPU's local APIC, and up to [`MAX_QUEUES`] split virtqueues
//! (by index: virtio-blk's queue 0; virtio-net's receive 0, transmit 1 and
//! control 2), each with its own ring page and MSI-X entry, with direct or
//! indirect descriptor chains and EVENT_IDX. The probe polls the used rings
//! with interrupts off, but the device still gets real vectors to signal.
//!
//! Each queue's request memory is split into slots of `desc_per_slot`
//! descriptors (chosen per queue): slot `k` owns ring descriptors
//! `k * desc_per_slot ..` and one indirect table of as many entries, so no
//! free list is needed.

use core::sync::atomic::{compiler_fence, fence, Ordering};

use crate::pci::{self, BarKind, Bdf, Config, Function, Mmio};
use crate::{io, report};

/// Vendor ID of every virtio PCI device.
pub const VENDOR_ID: u16 = 0x1af4;
/// Device may use indirect descriptor tables.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// used_event / avail_event notification suppression.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// virtio 1.x (modern) device.
pub const F_VERSION_1: u64 = 1 << 32;
/// Transport features the probe accepts when offered.
pub const TRANSPORT_FEATURES: u64 = F_INDIRECT_DESC | F_EVENT_IDX | F_VERSION_1;

// Device status bits.
const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 0x80;

// Common configuration structure offsets.
const CC_DEVICE_FEATURE_SELECT: u64 = 0x00;
const CC_DEVICE_FEATURE: u64 = 0x04;
const CC_DRIVER_FEATURE_SELECT: u64 = 0x08;
const CC_DRIVER_FEATURE: u64 = 0x0c;
const CC_CONFIG_MSIX_VECTOR: u64 = 0x10;
const CC_DEVICE_STATUS: u64 = 0x14;
const CC_CONFIG_GENERATION: u64 = 0x15;
const CC_QUEUE_SELECT: u64 = 0x16;
const CC_QUEUE_SIZE: u64 = 0x18;
const CC_QUEUE_MSIX_VECTOR: u64 = 0x1a;
const CC_QUEUE_ENABLE: u64 = 0x1c;
const CC_QUEUE_NOTIFY_OFF: u64 = 0x1e;
const CC_QUEUE_DESC: u64 = 0x20;
const CC_QUEUE_DRIVER: u64 = 0x28;
const CC_QUEUE_DEVICE: u64 = 0x30;
const COMMON_CFG_LEN: u32 = 0x38;

// PCI capability IDs and virtio capability types.
const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

// MSI-X like Linux: entry 0 for configuration changes, entry 1 + i for
// queue i; with too few entries the queues share entry 1.
const MSIX_CONFIG_ENTRY: u16 = 0;
const MSIX_FIRST_QUEUE_ENTRY: u16 = 1;
/// Local APIC vector of the configuration-change message; entry `e` gets
/// vector `CONFIG_VECTOR + e` (queue 0: 0x41).
pub const CONFIG_VECTOR: u32 = 0x40;
const MSI_ADDRESS: u32 = 0xfee0_0000;
const NO_VECTOR: u16 = 0xffff;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_MASK_ALL: u16 = 1 << 14;

/// Most virtqueues one device gets (virtio-net: receive, transmit, control).
pub const MAX_QUEUES: usize = 3;
// Split virtqueue layout inside one page per queue: descriptors, driver
// area, device area, then the indirect tables (as many entries in all as
// the ring has descriptors).
/// Most entries the probe gives a queue.
pub const QUEUE_MAX: u16 = 64;
const DESC_SIZE: u64 = 16;
const AVAIL_OFF: u64 = 0x400;
const USED_OFF: u64 = 0x800;
const INDIRECT_OFF: u64 = 0xc00;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const USED_F_NO_NOTIFY: u16 = 1;
const RESET_POLLS: u32 = 1_000_000;

#[repr(C, align(4096))]
struct RingPage([u8; 4096]);

const EMPTY_RING_PAGE: RingPage = RingPage([0; 4096]);

/// One page per queue index (devices are driven one at a time and reset
/// before the next one starts).
static mut RING_PAGES: [RingPage; MAX_QUEUES] = [EMPTY_RING_PAGE; MAX_QUEUES];

/// Why a virtio device could not be set up.
#[derive(Clone, Copy)]
pub enum VirtioError {
    /// A required vendor capability is missing.
    MissingCapability(&'static str),
    /// A capability points outside its BAR or at an unusable BAR.
    BadCapability(&'static str),
    /// A BAR range could not be mapped.
    Unmappable(u64),
    /// The device did not finish its reset.
    ResetTimeout,
    /// The device does not offer VIRTIO_F_VERSION_1.
    NotModern,
    /// The device cleared FEATURES_OK.
    FeaturesRejected,
    /// The queue is missing or too small (its maximum size).
    QueueSize(u16),
    /// The probe has no ring memory for this queue index.
    QueueIndex(u16),
}

impl core::fmt::Display for VirtioError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VirtioError::MissingCapability(c) => write!(f, "missing_capability={c}"),
            VirtioError::BadCapability(c) => write!(f, "bad_capability={c}"),
            VirtioError::Unmappable(a) => write!(f, "unmappable={a:#x}"),
            VirtioError::ResetTimeout => f.write_str("reset_timeout"),
            VirtioError::NotModern => f.write_str("no_version_1"),
            VirtioError::FeaturesRejected => f.write_str("features_rejected"),
            VirtioError::QueueSize(n) => write!(f, "queue_size={n}"),
            VirtioError::QueueIndex(n) => write!(f, "queue_index={n}"),
        }
    }
}

/// A virtio capability resolved to an address.
#[derive(Clone, Copy)]
struct Region {
    bar: u8,
    offset: u32,
    addr: u64,
    len: u32,
}

/// An initialised (features negotiated) virtio-pci device.
pub struct Device {
    /// Its PCI address.
    pub bdf: Bdf,
    common: Mmio,
    notify: Region,
    notify_multiplier: u32,
    /// Device-specific configuration.
    pub device_cfg: Mmio,
    /// Length of the device-specific configuration window.
    pub device_cfg_len: u32,
    msix: Option<Msix>,
    /// Features the device offered.
    pub offered: u64,
    /// Features both sides agreed on.
    pub negotiated: u64,
}

impl Device {
    /// Enables the PCI function, finds its capabilities, resets it and
    /// negotiates `wanted` (plus the transport features the probe drives)
    /// up to FEATURES_OK; programs the MSI-X table.
    pub fn init(config: &Config, function: &Function, wanted: u64) -> Result<Device, VirtioError> {
        Device::init_with(config, function, |offered| {
            offered & (wanted | TRANSPORT_FEATURES)
        })
    }

    /// As [`Device::init`], with the driver's features chosen by `select`
    /// from what the device offers (for features that depend on others).
    pub fn init_with(
        config: &Config,
        function: &Function,
        select: impl FnOnce(u64) -> u64,
    ) -> Result<Device, VirtioError> {
        let bdf = function.bdf;
        pci::enable(config, bdf);
        let caps = Caps::find(config, function)?;
        let common = caps
            .common
            .ok_or(VirtioError::MissingCapability("common"))?;
        let notify = caps
            .notify
            .ok_or(VirtioError::MissingCapability("notify"))?;
        let device_cfg = caps
            .device
            .ok_or(VirtioError::MissingCapability("device"))?;
        if common.len < COMMON_CFG_LEN {
            return Err(VirtioError::BadCapability("common"));
        }
        report_caps(bdf, &caps, common, notify, device_cfg);
        let mut device = Device {
            bdf,
            common: Mmio(common.addr),
            notify,
            notify_multiplier: caps.notify_multiplier,
            device_cfg: Mmio(device_cfg.addr),
            device_cfg_len: device_cfg.len,
            msix: caps.msix,
            offered: 0,
            negotiated: 0,
        };
        if !device.reset() {
            return Err(VirtioError::ResetTimeout);
        }
        device.add_status(STATUS_ACKNOWLEDGE);
        device.add_status(STATUS_DRIVER);
        device.negotiate(select)?;
        device.setup_msix(config);
        Ok(device)
    }

    fn negotiate(&mut self, select: impl FnOnce(u64) -> u64) -> Result<(), VirtioError> {
        let common = self.common;
        let mut offered = 0;
        for half in 0..2u32 {
            common.write32(CC_DEVICE_FEATURE_SELECT, half);
            offered |= u64::from(common.read32(CC_DEVICE_FEATURE)) << (32 * half);
        }
        self.offered = offered;
        if offered & F_VERSION_1 == 0 {
            self.add_status(STATUS_FAILED);
            return Err(VirtioError::NotModern);
        }
        self.negotiated = offered & select(offered);
        for half in 0..2u32 {
            common.write32(CC_DRIVER_FEATURE_SELECT, half);
            common.write32(CC_DRIVER_FEATURE, (self.negotiated >> (32 * half)) as u32);
        }
        self.add_status(STATUS_FEATURES_OK);
        let status = self.status();
        report!(
            "virtio slot={} features offered={offered:#x} accepted={:#x} status={status:#04x}",
            self.bdf.label(),
            self.negotiated
        );
        if status & STATUS_FEATURES_OK == 0 {
            self.add_status(STATUS_FAILED);
            return Err(VirtioError::FeaturesRejected);
        }
        Ok(())
    }

    /// Whether feature bit(s) `feature` were negotiated.
    pub fn has(&self, feature: u64) -> bool {
        self.negotiated & feature == feature
    }

    /// Programs MSI-X like Linux: enable with the function masked, fill
    /// the config entry and one entry per possible queue (fixed delivery to
    /// the boot CPU, vector `CONFIG_VECTOR + entry`), unmask the function,
    /// then point the configuration vector at its entry.
    fn setup_msix(&mut self, config: &Config) {
        let Some(Msix {
            table,
            entries,
            cap,
        }) = self.msix
        else {
            report!("virtio slot={} msix none", self.bdf.label());
            return;
        };
        let control = config.read16(self.bdf, cap + 2) & !MSIX_MASK_ALL;
        config.write16(self.bdf, cap + 2, control | MSIX_ENABLE | MSIX_MASK_ALL);
        let destination = io::apic_id() << 12;
        let last = MSIX_FIRST_QUEUE_ENTRY + MAX_QUEUES as u16;
        for entry in MSIX_CONFIG_ENTRY..last.min(entries) {
            let at = u64::from(entry) * 16;
            table.write32(at, MSI_ADDRESS | destination);
            table.write32(at + 4, 0);
            table.write32(at + 8, CONFIG_VECTOR + u32::from(entry));
            table.write32(at + 12, 0); // unmasked
        }
        config.write16(self.bdf, cap + 2, control | MSIX_ENABLE);
        self.common
            .write16(CC_CONFIG_MSIX_VECTOR, MSIX_CONFIG_ENTRY);
        let readback = self.common.read16(CC_CONFIG_MSIX_VECTOR);
        report!(
            "virtio slot={} msix entries={entries} config_vector={}",
            self.bdf.label(),
            vector_name(readback)
        );
    }

    /// Sets up queue `index` (at most [`QUEUE_MAX`] entries, request slots
    /// of `desc_per_slot` descriptors) with its MSI-X vector and enables it.
    pub fn setup_queue(&mut self, index: u16, desc_per_slot: u16) -> Result<Queue, VirtioError> {
        let base = ring_page(index).ok_or(VirtioError::QueueIndex(index))?;
        let common = self.common;
        common.write16(CC_QUEUE_SELECT, index);
        let max = common.read16(CC_QUEUE_SIZE);
        let size = prev_power_of_two(max.min(QUEUE_MAX));
        let desc_per_slot = desc_per_slot.max(1);
        if size < desc_per_slot {
            return Err(VirtioError::QueueSize(max));
        }
        // SAFETY: the ring page is only used by this queue of the one device
        // being driven (the previous one was reset); zero it before the
        // device sees it.
        unsafe { core::ptr::write_bytes(base as *mut u8, 0, 4096) };
        common.write16(CC_QUEUE_SIZE, size);
        common.write64(CC_QUEUE_DESC, base);
        common.write64(CC_QUEUE_DRIVER, base + AVAIL_OFF);
        common.write64(CC_QUEUE_DEVICE, base + USED_OFF);
        let vector = match self.msix {
            Some(msix) => {
                let own = MSIX_FIRST_QUEUE_ENTRY + index;
                let entry = if own < msix.entries {
                    own
                } else {
                    MSIX_FIRST_QUEUE_ENTRY
                };
                common.write16(CC_QUEUE_MSIX_VECTOR, entry);
                vector_name(common.read16(CC_QUEUE_MSIX_VECTOR))
            }
            None => VectorName(None),
        };
        let notify_off = common.read16(CC_QUEUE_NOTIFY_OFF);
        let offset = u64::from(notify_off) * u64::from(self.notify_multiplier);
        if offset + 2 > u64::from(self.notify.len) {
            return Err(VirtioError::BadCapability("notify_off"));
        }
        common.write16(CC_QUEUE_ENABLE, 1);
        report!(
            "virtio slot={} queue={index} size={size} max={max} notify_off={notify_off} vector={vector}",
            self.bdf.label()
        );
        Ok(Queue {
            base,
            size,
            index,
            desc_per_slot,
            notify: Mmio(self.notify.addr + offset),
            next_avail: 0,
            kicked_avail: 0,
            last_used: 0,
            event_idx: self.has(F_EVENT_IDX),
            indirect: self.has(F_INDIRECT_DESC),
            stats: QueueStats::default(),
        })
    }

    /// Sets DRIVER_OK: the device is live.
    pub fn driver_ok(&self) {
        self.add_status(STATUS_DRIVER_OK);
        report!(
            "virtio slot={} driver_ok status={:#04x}",
            self.bdf.label(),
            self.status()
        );
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.common.read8(CC_DEVICE_STATUS)
    }

    fn add_status(&self, bits: u8) {
        let status = self.status();
        self.common.write8(CC_DEVICE_STATUS, status | bits);
    }

    /// The configuration generation counter.
    pub fn config_generation(&self) -> u8 {
        self.common.read8(CC_CONFIG_GENERATION)
    }

    /// Writes 0 to the status and waits (bounded) until it reads back 0:
    /// the device then no longer touches the queue memory.
    pub fn reset(&self) -> bool {
        self.common.write8(CC_DEVICE_STATUS, 0);
        (0..RESET_POLLS).any(|_| {
            core::hint::spin_loop();
            self.status() == 0
        })
    }
}

fn prev_power_of_two(n: u16) -> u16 {
    if n == 0 {
        0
    } else {
        1 << (15 - n.leading_zeros())
    }
}

/// The ring page of queue `index`, if the probe has one.
fn ring_page(index: u16) -> Option<u64> {
    let index = usize::from(index);
    // SAFETY: only the address is taken (no reference is formed).
    (index < MAX_QUEUES).then(|| unsafe { core::ptr::addr_of_mut!(RING_PAGES[index]) } as u64)
}

/// An MSI-X vector register read back: its entry, or `none` (0xffff: the
/// device refused the vector).
struct VectorName(Option<u16>);

fn vector_name(value: u16) -> VectorName {
    VectorName((value != NO_VECTOR).then_some(value))
}

impl core::fmt::Display for VectorName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("none"),
        }
    }
}

/// The capabilities of one virtio-pci function.
#[derive(Default)]
struct Caps {
    common: Option<Region>,
    notify: Option<Region>,
    notify_multiplier: u32,
    isr: Option<Region>,
    device: Option<Region>,
    msix: Option<Msix>,
}

/// The MSI-X capability and its table.
#[derive(Clone, Copy)]
struct Msix {
    table: Mmio,
    entries: u16,
    cap: u16,
}

impl Caps {
    /// Walks the capability list; the first capability of each type wins.
    fn find(config: &Config, function: &Function) -> Result<Caps, VirtioError> {
        let bdf = function.bdf;
        let mut caps = Caps::default();
        for (offset, id) in config.capabilities(bdf) {
            match id {
                CAP_ID_VENDOR => {
                    let cfg_type = config.read8(bdf, offset + 3);
                    let slot = match cfg_type {
                        CFG_COMMON => &mut caps.common,
                        CFG_NOTIFY => &mut caps.notify,
                        CFG_ISR => &mut caps.isr,
                        CFG_DEVICE => &mut caps.device,
                        _ => continue,
                    };
                    if slot.is_some() {
                        continue;
                    }
                    *slot = Some(region(config, function, offset)?);
                    if cfg_type == CFG_NOTIFY {
                        caps.notify_multiplier = config.read32(bdf, offset + 16);
                    }
                }
                CAP_ID_MSIX if caps.msix.is_none() => {
                    let control = config.read16(bdf, offset + 2);
                    let entries = (control & 0x7ff) + 1;
                    let table = config.read32(bdf, offset + 4);
                    let bar = (table & 7) as u8;
                    let len = u32::from(entries) * 16;
                    let msix = resolve(function, bar, table & !7, len, "msix")?;
                    caps.msix = Some(Msix {
                        table: Mmio(msix.addr),
                        entries,
                        cap: offset,
                    });
                }
                _ => {}
            }
        }
        Ok(caps)
    }
}

/// Resolves the vendor capability at `offset` to a mapped BAR range.
fn region(config: &Config, function: &Function, offset: u16) -> Result<Region, VirtioError> {
    let bdf = function.bdf;
    let bar = config.read8(bdf, offset + 4);
    let start = config.read32(bdf, offset + 8);
    let len = config.read32(bdf, offset + 12);
    let name = match config.read8(bdf, offset + 3) {
        CFG_COMMON => "common",
        CFG_NOTIFY => "notify",
        CFG_ISR => "isr",
        _ => "device",
    };
    resolve(function, bar, start, len, name)
}

fn resolve(
    function: &Function,
    bar: u8,
    offset: u32,
    len: u32,
    name: &'static str,
) -> Result<Region, VirtioError> {
    let Some(info) = function.bars.get(usize::from(bar)) else {
        return Err(VirtioError::BadCapability(name));
    };
    let end = u64::from(offset) + u64::from(len);
    let is_mem = matches!(info.kind, BarKind::Mem32 | BarKind::Mem64);
    if !is_mem || info.addr == 0 || end > info.size {
        return Err(VirtioError::BadCapability(name));
    }
    let addr = info.addr + u64::from(offset);
    if !pci::map_mmio(addr, u64::from(len)) {
        return Err(VirtioError::Unmappable(addr));
    }
    Ok(Region {
        bar,
        offset,
        addr,
        len,
    })
}

fn report_caps(bdf: Bdf, caps: &Caps, common: Region, notify: Region, device: Region) {
    let isr = caps.isr.map_or(Where(None), |r| Where(Some(r)));
    report!(
        "virtio slot={} common={} notify={} multiplier={} isr={isr} device={} device_len={}",
        bdf.label(),
        Where(Some(common)),
        Where(Some(notify)),
        caps.notify_multiplier,
        Where(Some(device)),
        device.len
    );
}

/// Displays a region as `barN+0xOFF@0xADDR`, or `none`.
struct Where(Option<Region>);

impl core::fmt::Display for Where {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(r) => write!(f, "bar{}+{:#x}@{:#x}", r.bar, r.offset, r.addr),
            None => f.write_str("none"),
        }
    }
}

/// One buffer of a request, in identity-mapped RAM.
#[derive(Clone, Copy)]
pub struct Buf {
    /// Physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else it reads it).
    pub device_writes: bool,
}

/// Counters of one queue.
#[derive(Clone, Copy, Default)]
pub struct QueueStats {
    /// Requests made available.
    pub requests: u64,
    /// Of those, sent through an indirect table.
    pub indirect: u64,
    /// Notifications written to the notify register.
    pub notifies: u64,
    /// Notifications skipped because the device asked not to be told.
    pub suppressed: u64,
}

/// A completed request taken from the used ring.
#[derive(Clone, Copy)]
pub struct Used {
    /// The request slot, `None` if the device returned a bogus head.
    pub slot: Option<usize>,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// One queue of a device, split layout, polled.
pub struct Queue {
    base: u64,
    size: u16,
    /// Queue index (what a notification names).
    index: u16,
    desc_per_slot: u16,
    notify: Mmio,
    next_avail: u16,
    kicked_avail: u16,
    last_used: u16,
    event_idx: bool,
    indirect: bool,
    /// Counters.
    pub stats: QueueStats,
}

impl Queue {
    /// How many request slots (requests in flight) the queue holds.
    pub fn slots(&self) -> usize {
        usize::from(self.size / self.desc_per_slot)
    }

    /// Entries in the rings.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Whether indirect tables were negotiated.
    pub fn indirect(&self) -> bool {
        self.indirect
    }

    /// Makes the chain `bufs` (at most `desc_per_slot`) available in
    /// `slot`, through an indirect table when `indirect` is asked for and
    /// negotiated. The device sees it at the next [`Queue::kick`].
    pub fn add(&mut self, slot: usize, bufs: &[Buf], indirect: bool) {
        let per_slot = self.desc_per_slot;
        let count = bufs.len().min(usize::from(per_slot));
        let head = (slot % self.slots()) as u16 * per_slot;
        if indirect && self.indirect {
            let table = self.base + INDIRECT_OFF + u64::from(head) * DESC_SIZE;
            for (i, buf) in bufs[..count].iter().enumerate() {
                let (flags, next) = chain_link(buf, i + 1 == count, i as u16 + 1);
                write_desc(table + i as u64 * DESC_SIZE, buf.addr, buf.len, flags, next);
            }
            let len = count as u32 * DESC_SIZE as u32;
            write_desc(self.desc_addr(head), table, len, DESC_F_INDIRECT, 0);
            self.stats.indirect += 1;
        } else {
            for (i, buf) in bufs[..count].iter().enumerate() {
                let index = head + i as u16;
                let (flags, next) = chain_link(buf, i + 1 == count, index + 1);
                write_desc(self.desc_addr(index), buf.addr, buf.len, flags, next);
            }
        }
        let ring_slot = u64::from(self.next_avail % self.size);
        self.write_u16(self.base + AVAIL_OFF + 4 + 2 * ring_slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.stats.requests += 1;
    }

    /// Publishes the new avail index and notifies the device unless it
    /// asked not to be (avail_event with EVENT_IDX, else the used flags).
    pub fn kick(&mut self) {
        compiler_fence(Ordering::SeqCst);
        self.write_u16(self.base + AVAIL_OFF + 2, self.next_avail);
        fence(Ordering::SeqCst);
        let (old, new) = (self.kicked_avail, self.next_avail);
        self.kicked_avail = new;
        let notify = if self.event_idx {
            let event = self.read_u16(self.base + USED_OFF + 4 + 8 * u64::from(self.size));
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.read_u16(self.base + USED_OFF) & USED_F_NO_NOTIFY == 0
        };
        if notify {
            self.notify.write16(0, self.index);
            self.stats.notifies += 1;
        } else {
            self.stats.suppressed += 1;
        }
    }

    /// The next completed request, if any. With EVENT_IDX the driver then
    /// asks to be signalled at the following completion (used_event).
    pub fn take_used(&mut self) -> Option<Used> {
        let used_idx = self.read_u16(self.base + USED_OFF + 2);
        if used_idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let elem = self.base + USED_OFF + 4 + 8 * u64::from(self.last_used % self.size);
        let id = self.read_u32(elem);
        let len = self.read_u32(elem + 4);
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            let used_event = self.base + AVAIL_OFF + 4 + 2 * u64::from(self.size);
            self.write_u16(used_event, self.last_used);
        }
        let per_slot = u32::from(self.desc_per_slot);
        let valid = id < u32::from(self.size) && id.is_multiple_of(per_slot);
        let slot = (id / per_slot) as usize;
        Some(Used {
            slot: (valid && slot < self.slots()).then_some(slot),
            len,
        })
    }

    fn desc_addr(&self, index: u16) -> u64 {
        self.base + u64::from(index) * DESC_SIZE
    }

    fn write_u16(&self, addr: u64, value: u16) {
        // SAFETY: `addr` is inside this queue's ring page (offsets derived
        // from the queue size, at most QUEUE_MAX) in the identity map.
        unsafe { core::ptr::write_volatile(addr as *mut u16, value) };
    }

    fn read_u16(&self, addr: u64) -> u16 {
        // SAFETY: as for `write_u16`; the device may write it concurrently,
        // hence volatile.
        unsafe { core::ptr::read_volatile(addr as *const u16) }
    }

    fn read_u32(&self, addr: u64) -> u32 {
        // SAFETY: as for `read_u16`.
        unsafe { core::ptr::read_volatile(addr as *const u32) }
    }
}

/// Flags and `next` of a chain element (`next` is 0 for the last one).
fn chain_link(buf: &Buf, last: bool, next: u16) -> (u16, u16) {
    let write = if buf.device_writes { DESC_F_WRITE } else { 0 };
    if last {
        (write, 0)
    } else {
        (write | DESC_F_NEXT, next)
    }
}

/// Writes one descriptor at `at` (ring or indirect table).
fn write_desc(at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    // SAFETY: `at` is a 16-byte descriptor inside the ring page, which the
    // device does not read until the chain is published by `kick`.
    unsafe {
        core::ptr::write_volatile(at as *mut u64, addr);
        core::ptr::write_volatile((at + 8) as *mut u32, len);
        core::ptr::write_volatile((at + 12) as *mut u16, flags);
        core::ptr::write_volatile((at + 14) as *mut u16, next);
    }
}
