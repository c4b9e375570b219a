//! One virtio-pci function as the hostile probe drives it: its capability
//! windows (common, notify, ISR, device configuration, MSI-X table and
//! PBA) resolved from the BARs bus enumeration sized, raw register access
//! with no checks of its own, and the status handshake done step by step
//! so attacks can stop or deviate anywhere.

use super::ring::QUEUE_SIZE;
use crate::io;
use crate::pci::{self, BarKind, Bdf, Config, Function, Mmio};

// Common configuration structure offsets (virtio 1.x, 4.1.4.3).
pub const CC_DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const CC_DEVICE_FEATURE: u64 = 0x04;
pub const CC_DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const CC_DRIVER_FEATURE: u64 = 0x0c;
pub const CC_NUM_QUEUES: u64 = 0x12;
pub const CC_DEVICE_STATUS: u64 = 0x14;
pub const CC_QUEUE_SELECT: u64 = 0x16;
pub const CC_QUEUE_SIZE: u64 = 0x18;
pub const CC_QUEUE_ENABLE: u64 = 0x1c;
pub const CC_QUEUE_NOTIFY_OFF: u64 = 0x1e;
pub const CC_QUEUE_DESC: u64 = 0x20;
pub const CC_QUEUE_DRIVER: u64 = 0x28;
pub const CC_QUEUE_DEVICE: u64 = 0x30;
/// Bytes of the common configuration structure.
pub const CC_LEN: u32 = 0x38;

// Device status bits.
pub const ACKNOWLEDGE: u8 = 1;
pub const DRIVER: u8 = 2;
pub const DRIVER_OK: u8 = 4;
pub const FEATURES_OK: u8 = 8;
pub const NEEDS_RESET: u8 = 0x40;

/// virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;
/// Indirect descriptor tables.
pub const F_INDIRECT_DESC: u64 = 1 << 28;

const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;
/// How long a reset may take.
const RESET_MS: u64 = 500;

/// A register window inside a BAR.
#[derive(Clone, Copy, Default)]
pub struct Window {
    /// Guest-physical address (0: absent).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

impl Window {
    /// Register access to the window.
    pub fn mmio(self) -> Mmio {
        Mmio(self.addr)
    }
}

/// What kind of virtio device a function is (by PCI device ID).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Net,
    Blk,
    Rng,
    Fs,
    Vsock,
}

impl Kind {
    /// The kind of modern virtio device ID `device`, if the probe knows it.
    pub fn of(device: u16) -> Option<Kind> {
        match device {
            0x1041 => Some(Kind::Net),
            0x1042 => Some(Kind::Blk),
            0x1044 => Some(Kind::Rng),
            0x105a => Some(Kind::Fs),
            0x1053 => Some(Kind::Vsock),
            _ => None,
        }
    }

    /// Its name in report lines.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Net => "net",
            Kind::Blk => "blk",
            Kind::Rng => "rng",
            Kind::Fs => "fs",
            Kind::Vsock => "vsock",
        }
    }

    /// Queues the probe enables for a working request (virtio-net: receive
    /// and transmit; vsock: rx, tx, event; fs: hiprio and one request
    /// queue).
    pub fn queues(self) -> u16 {
        match self {
            Kind::Blk | Kind::Rng => 1,
            Kind::Net | Kind::Fs => 2,
            Kind::Vsock => 3,
        }
    }

    /// The queue requests go to (blk/rng 0, net/vsock transmit 1, fs the
    /// request queue 1).
    pub fn request_queue(self) -> u16 {
        match self {
            Kind::Blk | Kind::Rng => 0,
            Kind::Net | Kind::Vsock | Kind::Fs => 1,
        }
    }
}

/// One virtio-pci function with its windows.
#[derive(Clone, Copy)]
pub struct Target {
    pub bdf: Bdf,
    pub kind: Kind,
    pub common: Window,
    pub notify: Window,
    pub notify_multiplier: u32,
    pub isr: Window,
    pub device_cfg: Window,
    pub msix_table: Window,
    pub msix_pba: Window,
    /// Offset of the MSI-X capability in configuration space (0: none).
    pub msix_cap: u16,
    /// A memory BAR of the function (for rings and buffers pointed at MMIO).
    pub bar: u64,
}

impl Target {
    /// Resolves the windows of `function`; `None` if it is not a modern
    /// virtio device the probe knows or a window is unusable.
    pub fn find(config: &Config, function: &Function) -> Option<Target> {
        let kind = Kind::of(function.device).filter(|_| function.vendor == 0x1af4)?;
        let bdf = function.bdf;
        pci::enable(config, bdf);
        let bar = function
            .bars
            .iter()
            .find(|b| matches!(b.kind, BarKind::Mem32 | BarKind::Mem64) && b.addr != 0)?
            .addr;
        let mut target = Target {
            bdf,
            kind,
            common: Window::default(),
            notify: Window::default(),
            notify_multiplier: 0,
            isr: Window::default(),
            device_cfg: Window::default(),
            msix_table: Window::default(),
            msix_pba: Window::default(),
            msix_cap: 0,
            bar,
        };
        for (offset, id) in config.capabilities(bdf) {
            if id == CAP_ID_VENDOR {
                target.add_vendor_cap(config, function, offset);
            } else if id == CAP_ID_MSIX && target.msix_cap == 0 {
                target.add_msix(config, function, offset);
            }
        }
        (target.common.addr != 0 && target.common.len >= CC_LEN && target.notify.addr != 0)
            .then_some(target)
    }

    fn add_vendor_cap(&mut self, config: &Config, function: &Function, offset: u16) {
        let bdf = function.bdf;
        let bar = config.read8(bdf, offset + 4);
        let start = config.read32(bdf, offset + 8);
        let len = config.read32(bdf, offset + 12);
        let window = resolve(function, bar, start, len);
        let slot = match config.read8(bdf, offset + 3) {
            1 => &mut self.common,
            2 => &mut self.notify,
            3 => &mut self.isr,
            4 => &mut self.device_cfg,
            _ => return,
        };
        if slot.addr == 0 {
            *slot = window;
        }
        if config.read8(bdf, offset + 3) == 2 {
            self.notify_multiplier = config.read32(bdf, offset + 16);
        }
    }

    fn add_msix(&mut self, config: &Config, function: &Function, offset: u16) {
        let bdf = function.bdf;
        let entries = u32::from(config.read16(bdf, offset + 2) & 0x7ff) + 1;
        let table = config.read32(bdf, offset + 4);
        let pba = config.read32(bdf, offset + 8);
        self.msix_cap = offset;
        self.msix_table = resolve(function, (table & 7) as u8, table & !7, entries * 16);
        self.msix_pba = resolve(
            function,
            (pba & 7) as u8,
            pba & !7,
            entries.div_ceil(64) * 8,
        );
    }

    /// The status register.
    pub fn status(&self) -> u8 {
        self.common.mmio().read8(CC_DEVICE_STATUS)
    }

    /// Writes the status register as it is (no read-modify-write).
    pub fn write_status(&self, status: u8) {
        self.common.mmio().write8(CC_DEVICE_STATUS, status);
    }

    /// Sets `bits` on top of the current status.
    pub fn add_status(&self, bits: u8) {
        self.write_status(self.status() | bits);
    }

    /// Writes 0 to the status and waits (at most [`RESET_MS`]) until it
    /// reads 0.
    pub fn reset(&self) -> bool {
        self.write_status(0);
        let deadline = io::rdtsc().saturating_add(RESET_MS * 1000 * io::tsc_mhz());
        loop {
            if self.status() == 0 {
                return true;
            }
            if io::rdtsc() > deadline {
                return false;
            }
        }
    }

    /// The 64 offered feature bits.
    pub fn offered(&self) -> u64 {
        let common = self.common.mmio();
        (0..2u32).fold(0, |acc, half| {
            common.write32(CC_DEVICE_FEATURE_SELECT, half);
            acc | u64::from(common.read32(CC_DEVICE_FEATURE)) << (32 * half)
        })
    }

    /// Writes the 64 driver feature bits.
    pub fn write_features(&self, features: u64) {
        let common = self.common.mmio();
        for half in 0..2u32 {
            common.write32(CC_DRIVER_FEATURE_SELECT, half);
            common.write32(CC_DRIVER_FEATURE, (features >> (32 * half)) as u32);
        }
    }

    /// Reset, ACKNOWLEDGE, DRIVER, `features`, FEATURES_OK: whether the
    /// device kept FEATURES_OK.
    pub fn negotiate(&self, features: u64) -> bool {
        if !self.reset() {
            return false;
        }
        self.add_status(ACKNOWLEDGE);
        self.add_status(DRIVER);
        self.write_features(features);
        self.add_status(FEATURES_OK);
        self.status() & FEATURES_OK != 0
    }

    /// The features the probe drives: VERSION_1 and, when offered,
    /// indirect descriptors.
    pub fn plain_features(&self) -> u64 {
        self.offered() & (F_VERSION_1 | F_INDIRECT_DESC)
    }

    /// Programs queue `index` (size and ring addresses as given, no
    /// checks) and enables it.
    pub fn setup_queue(&self, index: u16, size: u16, desc: u64, avail: u64, used: u64) {
        let common = self.common.mmio();
        common.write16(CC_QUEUE_SELECT, index);
        common.write16(CC_QUEUE_SIZE, size);
        common.write64(CC_QUEUE_DESC, desc);
        common.write64(CC_QUEUE_DRIVER, avail);
        common.write64(CC_QUEUE_DEVICE, used);
        common.write16(CC_QUEUE_ENABLE, 1);
    }

    /// The maximum size of queue `index` (0: no such queue).
    pub fn queue_max(&self, index: u16) -> u16 {
        let common = self.common.mmio();
        common.write16(CC_QUEUE_SELECT, index);
        common.read16(CC_QUEUE_SIZE)
    }

    /// The size the probe gives queue `index`: [`QUEUE_SIZE`] or the
    /// largest power of two within the device's maximum (0: no queue).
    pub fn ring_size(&self, index: u16) -> u16 {
        let max = self.queue_max(index).min(QUEUE_SIZE);
        if max == 0 {
            0
        } else {
            1 << (15 - max.leading_zeros())
        }
    }

    /// Writes `value` to the notify address of queue `index`, whatever
    /// `notify_off` it has (one past the window's end is not written).
    pub fn kick(&self, index: u16, value: u16) {
        let common = self.common.mmio();
        common.write16(CC_QUEUE_SELECT, index);
        let off = u64::from(common.read16(CC_QUEUE_NOTIFY_OFF)) * u64::from(self.notify_multiplier);
        if off + 2 <= u64::from(self.notify.len) {
            self.notify.mmio().write16(off, value);
        }
    }

    /// Reads and so clears the ISR.
    pub fn read_isr(&self) -> u8 {
        if self.isr.addr == 0 {
            return 0;
        }
        self.isr.mmio().read8(0)
    }
}

/// The window `[offset, offset + len)` of BAR `bar`, mapped; absent if out
/// of the BAR or unmappable.
fn resolve(function: &Function, bar: u8, offset: u32, len: u32) -> Window {
    let Some(info) = function.bars.get(usize::from(bar)) else {
        return Window::default();
    };
    let end = u64::from(offset) + u64::from(len);
    let is_mem = matches!(info.kind, BarKind::Mem32 | BarKind::Mem64);
    if !is_mem || info.addr == 0 || end > info.size {
        return Window::default();
    }
    let addr = info.addr + u64::from(offset);
    if !pci::map_mmio(addr, u64::from(len)) {
        return Window::default();
    }
    Window { addr, len }
}
