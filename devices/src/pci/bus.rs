//! PCI bus 0: the host bridge at 00:00.0 and up to 31 single-function
//! devices, reached through three bus windows that all share one
//! [`PciRoot`]:
//!
//! - [`PciConfigIo`]: ports 0xCF8-0xCFF, the configuration address register
//!   (dword at 0xCF8, enable bit 31) and the data window 0xCFC-0xCFF;
//! - [`PciConfigMmio`]: the ECAM window, offset `bus << 20 | device << 15 |
//!   function << 12 | register`;
//! - [`PciMmioWindow`]: a memory window (32-bit or 64-bit) in which the
//!   root decodes device BARs at whatever address they currently hold, so
//!   the VMM's MMIO bus never changes when the guest moves a BAR.
//!
//! Absent functions, functions other than 0 and buses other than 0 read as
//! all-ones. When a BAR ends up at a new address while its function decodes
//! memory, the root reports a [`BarMove`] so the VMM can move what it keeps
//! at BAR addresses (KVM ioeventfds). It also owns [`BarAllocator`], which
//! assigns the initial BAR addresses: below 4 GiB unless a BAR is large,
//! so firmware that maps only the first 4 GiB and assigns no BARs itself
//! (rust-hypervisor-firmware on the PVH path) can use every device.

use std::sync::{Arc, Mutex, MutexGuard};

use super::config::{BAR_COUNT, EXTENDED_CONFIG_SPACE_SIZE};
use super::{HostBridge, PciDevice};
use crate::BusDevice;

/// Number of ports of the 0xCF8 configuration window.
pub const CONFIG_IO_LEN: u64 = 8;
/// Device slots on the bus (slot 0 is the host bridge).
const SLOTS: usize = 32;
/// Enable bit of the configuration address register.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Implemented bits of the configuration address register.
const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00ff_fffc;
/// Offset of the data window within the 0xCF8 window.
const CONFIG_DATA: u64 = 4;
/// Size of ECAM for all 256 buses.
const ECAM_SIZE: u64 = 256 << 20;

/// Errors placing a device on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// All 31 device slots are taken.
    #[error("no free pci slot (31 devices at most)")]
    NoFreeSlot,
    /// A BAR does not fit in the memory windows.
    #[error("no room for a {size:#x}-byte bar in the pci memory windows")]
    BarSpace {
        /// The BAR size.
        size: u64,
    },
}

/// A BAR that now decodes at a different address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    /// Device slot on bus 0.
    pub slot: u8,
    /// BAR index.
    pub bar: u8,
    /// Address the BAR decoded at before (as last reported or assigned).
    pub old: u64,
    /// Address it decodes at now.
    pub new: u64,
    /// BAR size.
    pub size: u64,
}

/// Called with the root locked for every [`BarMove`]; must not lock the
/// root.
pub type BarObserver = Box<dyn FnMut(&BarMove) + Send>;

/// The root bus shared by its access windows.
pub type SharedPciRoot = Arc<Mutex<PciRoot>>;

struct Slot {
    device: Box<dyn PciDevice>,
    /// The address each BAR was last reported (or assigned) at.
    reported: [u64; BAR_COUNT as usize],
}

/// Bus 0 and its functions.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    observer: Option<BarObserver>,
}

impl PciRoot {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Box::new(HostBridge::new()),
            reported: [0; BAR_COUNT as usize],
        });
        PciRoot {
            slots,
            observer: None,
        }
    }

    /// Puts `device` in the first free slot, assigns its BARs from
    /// `allocator` and returns the slot. Memory decoding stays off until
    /// the guest turns it on.
    pub fn add_device(
        &mut self,
        mut device: Box<dyn PciDevice>,
        allocator: &mut BarAllocator,
    ) -> Result<u8, PciError> {
        let slot = (1..SLOTS)
            .find(|&slot| self.slots[slot].is_none())
            .ok_or(PciError::NoFreeSlot)?;
        let mut reported = [0; BAR_COUNT as usize];
        let bars: Vec<_> = device.config().bars().collect();
        for bar in bars {
            let address = allocator.allocate(bar.size, bar.is_64bit)?;
            device.config_mut().set_bar_address(bar.index, address);
            reported[usize::from(bar.index)] = address;
        }
        self.slots[slot] = Some(Slot { device, reported });
        Ok(slot as u8)
    }

    /// Sets the function called for every [`BarMove`].
    pub fn set_bar_observer(&mut self, observer: BarObserver) {
        self.observer = Some(observer);
    }

    /// The (address, size) BAR `bar` of `slot` was last reported at: its
    /// assigned address until a [`BarMove`] says otherwise.
    pub fn bar(&self, slot: u8, bar: u8) -> Option<(u64, u64)> {
        let entry = self.slot(slot)?;
        let size = entry.device.config().bar(bar)?.size;
        Some((entry.reported[usize::from(bar)], size))
    }

    /// The counters of the device in `slot`.
    pub fn counters(&self, slot: u8) -> Vec<(&'static str, u64)> {
        self.slot(slot)
            .map(|entry| entry.device.counters())
            .unwrap_or_default()
    }

    fn slot(&self, slot: u8) -> Option<&Slot> {
        self.slots.get(usize::from(slot))?.as_ref()
    }

    fn function(&mut self, bus: u8, slot: u8, function: u8) -> Option<&mut Slot> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get_mut(usize::from(slot))?.as_mut()
    }

    /// A configuration read of register `register` of bus:slot.function;
    /// all-ones if nothing answers or the access leaves the function.
    pub fn config_read(&mut self, bus: u8, slot: u8, function: u8, register: u16, data: &mut [u8]) {
        let in_range =
            usize::from(register) + data.len() <= usize::from(EXTENDED_CONFIG_SPACE_SIZE);
        match self.function(bus, slot, function) {
            Some(entry) if in_range => entry.device.read_config(register, data),
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; dropped if nothing answers.
    pub fn config_write(&mut self, bus: u8, slot: u8, function: u8, register: u16, data: &[u8]) {
        let in_range =
            usize::from(register) + data.len() <= usize::from(EXTENDED_CONFIG_SPACE_SIZE);
        if let Some(entry) = self.function(bus, slot, function) {
            if in_range {
                entry.device.write_config(register, data);
                self.report_bar_moves(usize::from(slot));
            }
        }
    }

    /// Reports the BARs of `slot` that decode somewhere new.
    fn report_bar_moves(&mut self, slot: usize) {
        let Some(entry) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let config = entry.device.config();
        if !config.memory_enabled() {
            return;
        }
        let mut moves = Vec::new();
        for bar in config.bars() {
            let Some(new) = config.bar_address(bar.index) else {
                continue;
            };
            let old = &mut entry.reported[usize::from(bar.index)];
            if new != *old && !config.bar_is_probing(bar.index) {
                let (bar, size) = (bar.index, bar.size);
                let slot = slot as u8;
                moves.push(BarMove {
                    slot,
                    bar,
                    old: *old,
                    new,
                    size,
                });
                *old = new;
            }
        }
        if let Some(observer) = &mut self.observer {
            moves.iter().for_each(observer);
        }
    }

    /// The device and BAR decoding `[address, address + len)`, with the
    /// offset in the BAR.
    fn decode(&mut self, address: u64, len: usize) -> Option<(&mut dyn PciDevice, u8, u64)> {
        for entry in self.slots.iter_mut().flatten() {
            let config = entry.device.config();
            if !config.memory_enabled() {
                continue;
            }
            let hit = config.bars().find_map(|bar| {
                let start = config.bar_address(bar.index)?;
                let offset = address.checked_sub(start)?;
                let end = offset.checked_add(len as u64)?;
                (end <= bar.size).then_some((bar.index, offset))
            });
            if let Some((bar, offset)) = hit {
                return Some((entry.device.as_mut(), bar, offset));
            }
        }
        None
    }

    /// A guest read at `address` in a PCI memory window; returns whether a
    /// BAR decoded it (otherwise `data` reads all-ones).
    pub fn mmio_read(&mut self, address: u64, data: &mut [u8]) -> bool {
        match self.decode(address, data.len()) {
            Some((device, bar, offset)) => {
                device.read_bar(bar, offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A guest write at `address` in a PCI memory window; returns whether a
    /// BAR decoded it.
    pub fn mmio_write(&mut self, address: u64, data: &[u8]) -> bool {
        match self.decode(address, data.len()) {
            Some((device, bar, offset)) => {
                device.write_bar(bar, offset, data);
                true
            }
            None => false,
        }
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

/// Locks the root, carrying on after a panic elsewhere (plain data).
fn lock(root: &SharedPciRoot) -> MutexGuard<'_, PciRoot> {
    root.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Ports 0xCF8-0xCFF ([`CONFIG_IO_LEN`] ports): configuration mechanism #1.
pub struct PciConfigIo {
    root: SharedPciRoot,
    address: u32,
}

impl PciConfigIo {
    /// The port window onto `root`.
    pub fn new(root: SharedPciRoot) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// The function and register the data window at `offset` addresses,
    /// if the address register is enabled and the access stays in the
    /// dword.
    fn target(&self, offset: u64, len: usize) -> Option<(u8, u8, u8, u16)> {
        let byte = offset.checked_sub(CONFIG_DATA)?;
        if self.address & CONFIG_ADDRESS_ENABLE == 0 || byte + len as u64 > 4 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        let register = (self.address & 0xfc) as u16 + byte as u16;
        Some((bus, slot, function, register))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        match self.target(offset, data.len()) {
            Some((bus, slot, function, register)) => {
                lock(&self.root).config_read(bus, slot, function, register, data);
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Ok(value) = <[u8; 4]>::try_from(data) {
                self.address = u32::from_le_bytes(value) & CONFIG_ADDRESS_MASK;
            }
            return;
        }
        if let Some((bus, slot, function, register)) = self.target(offset, data.len()) {
            lock(&self.root).config_write(bus, slot, function, register, data);
        }
    }
}

/// The ECAM window (256 MiB for buses 0-255; only bus 0 answers).
pub struct PciConfigMmio {
    root: SharedPciRoot,
}

impl PciConfigMmio {
    /// The ECAM window onto `root`.
    pub fn new(root: SharedPciRoot) -> Self {
        PciConfigMmio { root }
    }
}

/// Splits an ECAM offset into (bus, slot, function, register) for a
/// naturally aligned access of 1, 2 or 4 bytes.
fn ecam_target(offset: u64, len: usize) -> Option<(u8, u8, u8, u16)> {
    let aligned = matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len as u64);
    if !aligned || offset >= ECAM_SIZE {
        return None;
    }
    let bus = (offset >> 20) as u8;
    let slot = ((offset >> 15) & 0x1f) as u8;
    let function = ((offset >> 12) & 0x7) as u8;
    Some((bus, slot, function, (offset & 0xfff) as u16))
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match ecam_target(offset, data.len()) {
            Some((bus, slot, function, register)) => {
                lock(&self.root).config_read(bus, slot, function, register, data);
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bus, slot, function, register)) = ecam_target(offset, data.len()) {
            lock(&self.root).config_write(bus, slot, function, register, data);
        }
    }
}

/// A PCI memory window starting at guest-physical `base`, in which the
/// root decodes BARs at their current addresses.
pub struct PciMmioWindow {
    root: SharedPciRoot,
    base: u64,
}

impl PciMmioWindow {
    /// The window at `base` onto `root`; insert it on the MMIO bus over the
    /// whole window.
    pub fn new(root: SharedPciRoot, base: u64) -> Self {
        PciMmioWindow { root, base }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.base.checked_add(offset) {
            Some(address) => {
                lock(&self.root).mmio_read(address, data);
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(address) = self.base.checked_add(offset) {
            lock(&self.root).mmio_write(address, data);
        }
    }
}

/// One memory window handing out naturally aligned ranges, first fit: a
/// small BAR may take the gap an aligned large one left.
#[derive(Clone, Debug)]
struct Window {
    start: u64,
    end: u64,
    /// Ranges handed out, `(start, end)`, sorted and disjoint.
    taken: Vec<(u64, u64)>,
}

impl Window {
    fn new(start: u64, size: u64) -> Self {
        Window {
            start,
            end: start.saturating_add(size),
            taken: Vec::new(),
        }
    }

    fn allocate(&mut self, size: u64) -> Option<u64> {
        let mut floor = self.start;
        for index in 0..=self.taken.len() {
            let ceiling = self.taken.get(index).map_or(self.end, |range| range.0);
            let start = floor.checked_next_multiple_of(size)?;
            if start.checked_add(size)? <= ceiling {
                self.taken.insert(index, (start, start + size));
                return Some(start);
            }
            floor = self.taken.get(index).map_or(floor, |range| range.1);
        }
        None
    }
}

/// 64-bit BARs of at least this many bytes go to the 64-bit window first;
/// smaller ones go below 4 GiB.
pub const LARGE_BAR_SIZE: u64 = 256 << 20;

/// Assigns BAR addresses from the 32-bit and 64-bit PCI memory windows
/// (the windows the ACPI `_CRS` of the host bridge describes). Every BAR
/// goes to the 32-bit window — 64-bit BARs included, which stay 64-bit
/// capable so the guest may move them up — except that a 64-bit BAR of
/// [`LARGE_BAR_SIZE`] or more goes to the 64-bit window first, and a 64-bit
/// BAR that no longer fits below 4 GiB goes above. 32-bit BARs only ever
/// go to the 32-bit window.
pub struct BarAllocator {
    mmio32: Window,
    mmio64: Window,
}

impl BarAllocator {
    /// An allocator over `[mmio32_start, +mmio32_size)` and
    /// `[mmio64_start, +mmio64_size)`.
    pub fn new(mmio32_start: u64, mmio32_size: u64, mmio64_start: u64, mmio64_size: u64) -> Self {
        BarAllocator {
            mmio32: Window::new(mmio32_start, mmio32_size),
            mmio64: Window::new(mmio64_start, mmio64_size),
        }
    }

    /// A naturally aligned address for a BAR of `size` bytes (rounded up to
    /// a power of two), placed as the type documentation says.
    pub fn allocate(&mut self, size: u64, is_64bit: bool) -> Result<u64, PciError> {
        let size = size.max(1).next_power_of_two();
        let placed = if !is_64bit {
            self.mmio32.allocate(size)
        } else if size >= LARGE_BAR_SIZE {
            self.mmio64
                .allocate(size)
                .or_else(|| self.mmio32.allocate(size))
        } else {
            self.mmio32
                .allocate(size)
                .or_else(|| self.mmio64.allocate(size))
        };
        placed.ok_or(PciError::BarSpace { size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{bar_offset, BarSpec, ConfigSpace, PciIds, COMMAND, COMMAND_MEMORY};

    /// A function with a 64-bit BAR0 and a 32-bit BAR2 whose registers
    /// read back as their offset; records writes.
    struct TestDevice {
        config: ConfigSpace,
        writes: BarWrites,
    }

    /// (bar, offset, bytes) of every BAR write.
    type BarWrites = Arc<Mutex<Vec<(u8, u64, Vec<u8>)>>>;

    impl TestDevice {
        fn new(device_id: u16) -> (Self, BarWrites) {
            let ids = PciIds {
                vendor: 0x1234,
                device: device_id,
                revision: 0,
                class: 0xff_00_00,
                subsystem_vendor: 0,
                subsystem: 0,
            };
            let mut config = ConfigSpace::new(&ids);
            let bar = |size, is_64bit| BarSpec {
                size,
                is_64bit,
                prefetchable: false,
            };
            config.add_bar(0, bar(0x4000, true)).unwrap();
            config.add_bar(2, bar(0x1000, false)).unwrap();
            let writes = Arc::new(Mutex::new(Vec::new()));
            (
                TestDevice {
                    config,
                    writes: writes.clone(),
                },
                writes,
            )
        }
    }

    impl PciDevice for TestDevice {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            data.fill(bar * 0x10 + offset as u8);
        }
        fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
            self.writes
                .lock()
                .unwrap()
                .push((bar, offset, data.to_vec()));
        }
    }

    const MMIO32: u64 = 0xc000_0000;
    const MMIO64: u64 = 0x40_0000_0000;

    fn allocator() -> BarAllocator {
        BarAllocator::new(MMIO32, 0x2000_0000, MMIO64, 0x40_0000_0000)
    }

    fn root_with_devices(count: u16) -> SharedPciRoot {
        let mut root = PciRoot::new();
        let mut allocator = allocator();
        for id in 0..count {
            let (device, _) = TestDevice::new(0x100 + id);
            root.add_device(Box::new(device), &mut allocator).unwrap();
        }
        Arc::new(Mutex::new(root))
    }

    fn cf8_read(io: &mut PciConfigIo, slot: u8, register: u16, len: usize) -> u32 {
        let address = CONFIG_ADDRESS_ENABLE | u32::from(slot) << 11 | u32::from(register & 0xfc);
        io.write(0, &address.to_le_bytes());
        let mut data = [0u8; 4];
        io.read(CONFIG_DATA + u64::from(register & 3), &mut data[..len]);
        u32::from_le_bytes(data)
    }

    fn cf8_write(io: &mut PciConfigIo, slot: u8, register: u16, value: u32) {
        let address = CONFIG_ADDRESS_ENABLE | u32::from(slot) << 11 | u32::from(register);
        io.write(0, &address.to_le_bytes());
        io.write(CONFIG_DATA, &value.to_le_bytes());
    }

    fn ecam_offset(bus: u64, slot: u64, function: u64, register: u64) -> u64 {
        bus << 20 | slot << 15 | function << 12 | register
    }

    fn ecam_read(ecam: &mut PciConfigMmio, slot: u8, register: u16, len: usize) -> u32 {
        let mut data = [0u8; 4];
        let offset = ecam_offset(0, u64::from(slot), 0, u64::from(register));
        ecam.read(offset, &mut data[..len]);
        u32::from_le_bytes(data)
    }

    #[test]
    fn host_bridge_and_devices_read_the_same_through_both_windows() {
        let root = root_with_devices(2);
        let mut io = PciConfigIo::new(root.clone());
        let mut ecam = PciConfigMmio::new(root);
        assert_eq!(cf8_read(&mut io, 0, 0, 4), 0x0d57_8086);
        assert_eq!(cf8_read(&mut io, 0, 0x08, 4) >> 8, 0x06_00_00);
        for slot in 0..4 {
            for register in [0u16, 2, 0x08, 0x0e, 0x10, 0x14, 0x18] {
                for len in [1, 2, 4] {
                    let register = register & !(len as u16 - 1);
                    let via_io = cf8_read(&mut io, slot, register, len);
                    let via_ecam = ecam_read(&mut ecam, slot, register, len);
                    assert_eq!(via_io, via_ecam, "slot {slot} reg {register:#x} len {len}");
                }
            }
        }
        assert_eq!(cf8_read(&mut io, 1, 0, 4), 0x0100_1234);
        assert_eq!(ecam_read(&mut ecam, 2, 2, 2), 0x0101);
        assert_eq!(cf8_read(&mut io, 3, 0, 4), u32::MAX, "absent slot");
        assert_eq!(ecam_read(&mut ecam, 31, 0, 4), u32::MAX);
        assert_eq!(
            cf8_read(&mut io, 1, 0x10, 4),
            0xc000_0004,
            "64-bit bar0 low"
        );
        assert_eq!(cf8_read(&mut io, 1, 0x14, 4), 0, "bar0 below 4 GiB");
        assert_eq!(cf8_read(&mut io, 1, 0x18, 4), 0xc000_4000, "bar2");
        assert_eq!(cf8_read(&mut io, 2, 0x10, 4), 0xc000_8004, "next device");
    }

    #[test]
    fn other_buses_functions_and_disabled_addresses_read_all_ones() {
        let root = root_with_devices(1);
        let mut io = PciConfigIo::new(root.clone());
        let mut ecam = PciConfigMmio::new(root);
        let mut data = [0u8; 4];
        ecam.read(ecam_offset(1, 0, 0, 0), &mut data);
        assert_eq!(data, [0xff; 4]);
        ecam.read(ecam_offset(0, 1, 1, 0), &mut data);
        assert_eq!(data, [0xff; 4]);
        ecam.read(ecam_offset(0, 1, 0, 0x100), &mut data);
        assert_eq!(data, [0; 4], "extended space of a present function");
        io.write(0, &(1u32 << 16).to_le_bytes());
        io.read(CONFIG_DATA, &mut data);
        assert_eq!(data, [0xff; 4], "enable bit clear");
        io.write(0, &(CONFIG_ADDRESS_ENABLE | 1 << 16).to_le_bytes());
        io.read(CONFIG_DATA, &mut data);
        assert_eq!(data, [0xff; 4], "bus 1");
        io.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), CONFIG_ADDRESS_ENABLE | 1 << 16);
    }

    #[test]
    fn bar_probing_works_through_both_windows() {
        let root = root_with_devices(1);
        let mut io = PciConfigIo::new(root.clone());
        let mut ecam = PciConfigMmio::new(root);
        cf8_write(&mut io, 1, 0x10, u32::MAX);
        assert_eq!(cf8_read(&mut io, 1, 0x10, 4), 0xffff_c004);
        assert_eq!(ecam_read(&mut ecam, 1, 0x10, 4), 0xffff_c004);
        ecam.write(ecam_offset(0, 1, 0, 0x18), &u32::MAX.to_le_bytes());
        assert_eq!(cf8_read(&mut io, 1, 0x18, 4), 0xffff_f000);
        ecam.write(ecam_offset(0, 1, 0, 0x1c), &u32::MAX.to_le_bytes());
        assert_eq!(cf8_read(&mut io, 1, 0x1c, 4), 0, "no bar3");
    }

    #[test]
    fn config_data_window_honours_byte_lanes() {
        let root = root_with_devices(1);
        let mut io = PciConfigIo::new(root);
        // Byte write to the interrupt line at 0x3c through port 0xCFC.
        let address = CONFIG_ADDRESS_ENABLE | 1 << 11 | 0x3c;
        io.write(0, &address.to_le_bytes());
        io.write(CONFIG_DATA, &[0x0b]);
        assert_eq!(cf8_read(&mut io, 1, 0x3c, 4) & 0xff, 0x0b);
        // Word at 0xCFE is register 0x02: the device ID.
        assert_eq!(cf8_read(&mut io, 1, 0x02, 2), 0x0100);
        // Accesses crossing the dword, or partial address writes, do nothing.
        io.write(0, &address.to_le_bytes());
        let mut data = [0u8; 4];
        io.read(CONFIG_DATA + 2, &mut data);
        assert_eq!(data, [0xff; 4]);
        io.write(0, &[0x12]);
        io.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), address);
        io.read(1, &mut data[..1]);
        assert_eq!(data[0], 0xff);
    }

    #[test]
    fn bars_decode_only_with_memory_enabled_and_moves_are_reported() {
        let (device, writes) = TestDevice::new(1);
        let mut root = PciRoot::new();
        root.add_device(Box::new(device), &mut allocator()).unwrap();
        let root = Arc::new(Mutex::new(root));
        let moves = Arc::new(Mutex::new(Vec::new()));
        let seen = moves.clone();
        lock(&root).set_bar_observer(Box::new(move |m| seen.lock().unwrap().push(*m)));
        let mut window = PciMmioWindow::new(root.clone(), MMIO32);
        let mut ecam = PciConfigMmio::new(root.clone());
        let mut data = [0u8; 4];
        window.read(0x4010, &mut data);
        assert_eq!(data, [0xff; 4], "decoding off");
        let command = ecam_offset(0, 1, 0, u64::from(COMMAND));
        ecam.write(command, &COMMAND_MEMORY.to_le_bytes());
        window.read(0x4010, &mut data);
        assert_eq!(data, [0x30; 4], "bar2 at offset 0x10");
        window.read(0x10, &mut data);
        assert_eq!(data, [0x10; 4], "bar0 at offset 0x10");
        assert!(
            moves.lock().unwrap().is_empty(),
            "enabling at the assigned address"
        );

        // Firmware style: decoding off, size and move, decoding on.
        ecam.write(command, &[0, 0]);
        let bar2 = ecam_offset(0, 1, 0, u64::from(bar_offset(2)));
        ecam.write(bar2, &u32::MAX.to_le_bytes());
        ecam.write(bar2, &0xc010_0000u32.to_le_bytes());
        assert!(moves.lock().unwrap().is_empty());
        ecam.write(command, &COMMAND_MEMORY.to_le_bytes());
        let moved = BarMove {
            slot: 1,
            bar: 2,
            old: MMIO32 + 0x4000,
            new: 0xc010_0000,
            size: 0x1000,
        };
        assert_eq!(*moves.lock().unwrap(), vec![moved]);
        assert_eq!(lock(&root).bar(1, 2), Some((0xc010_0000, 0x1000)));
        window.write(0x10_0ffc, &[1, 2, 3, 4]);
        window.write(0x4000, &[9]);
        window.write(0x10_0ffe, &[1, 2, 3, 4]);

        // Sizing with decoding on is not a move.
        ecam.write(bar2, &u32::MAX.to_le_bytes());
        assert_eq!(moves.lock().unwrap().len(), 1);
        ecam.write(bar2, &0xc010_0000u32.to_le_bytes());
        assert_eq!(moves.lock().unwrap().len(), 1);
        assert_eq!(*writes.lock().unwrap(), vec![(2, 0xffc, vec![1, 2, 3, 4])]);
    }

    #[test]
    fn allocator_places_bars_below_4g_first_and_aligns() {
        let mut allocator = BarAllocator::new(MMIO32, 0x10000, MMIO64, 0x40_0000_0000);
        assert_eq!(allocator.allocate(0x1000, false), Ok(MMIO32));
        assert_eq!(
            allocator.allocate(0x4000, true),
            Ok(MMIO32 + 0x4000),
            "aligned"
        );
        assert_eq!(
            allocator.allocate(0x1000, true),
            Ok(MMIO32 + 0x1000),
            "first fit: the alignment gap"
        );
        assert_eq!(
            allocator.allocate(0x1001, false),
            Ok(MMIO32 + 0x2000),
            "rounded up to 0x2000"
        );
        assert_eq!(
            allocator.allocate(0, true),
            Ok(MMIO32 + 0x8000),
            "empty bar"
        );
        assert_eq!(
            allocator.allocate(0x8000, true),
            Ok(MMIO64),
            "no aligned 0x8000 left below 4 GiB"
        );
    }

    #[test]
    fn large_64bit_bars_go_high_and_small_ones_only_when_low_is_full() {
        let mut allocator = BarAllocator::new(MMIO32, 0x2000_0000, MMIO64, 0x40_0000_0000);
        assert_eq!(allocator.allocate(LARGE_BAR_SIZE, true), Ok(MMIO64));
        assert_eq!(
            allocator.allocate(LARGE_BAR_SIZE / 2, true),
            Ok(MMIO32),
            "128 MiB stays low"
        );
        assert_eq!(
            allocator.allocate(LARGE_BAR_SIZE, false),
            Ok(MMIO32 + LARGE_BAR_SIZE),
            "a large 32-bit bar has nowhere else to go"
        );
        assert_eq!(
            allocator.allocate(LARGE_BAR_SIZE / 2, true),
            Ok(MMIO32 + LARGE_BAR_SIZE / 2),
            "the gap below the aligned 32-bit bar is used"
        );
        assert_eq!(
            allocator.allocate(0x8000, true),
            Ok(MMIO64 + LARGE_BAR_SIZE),
            "low window full: above 4 GiB"
        );
        assert_eq!(
            allocator.allocate(0x1000, false),
            Err(PciError::BarSpace { size: 0x1000 }),
            "32-bit bars never go high"
        );
    }

    #[test]
    fn large_bars_fall_back_low_and_running_out_is_an_error() {
        let mut no_high = BarAllocator::new(MMIO32, 0x2000_0000, 0, 0);
        assert_eq!(no_high.allocate(LARGE_BAR_SIZE, true), Ok(MMIO32));
        assert_eq!(
            no_high.allocate(LARGE_BAR_SIZE, true),
            Ok(MMIO32 + LARGE_BAR_SIZE)
        );
        assert_eq!(
            no_high.allocate(0x1000, true),
            Err(PciError::BarSpace { size: 0x1000 })
        );
        let mut tiny = BarAllocator::new(MMIO32, 0x4000, MMIO64, 0x8000);
        assert_eq!(tiny.allocate(0x4000, true), Ok(MMIO32));
        assert_eq!(tiny.allocate(0x8000, true), Ok(MMIO64));
        assert_eq!(
            tiny.allocate(0x1000, true),
            Err(PciError::BarSpace { size: 0x1000 })
        );
        assert_eq!(
            tiny.allocate(1 << 63, true),
            Err(PciError::BarSpace { size: 1 << 63 })
        );
    }

    #[test]
    fn thirty_one_devices_fit_below_4g() {
        let mut root = PciRoot::new();
        let mut allocator = allocator();
        for id in 0..31 {
            let (device, _) = TestDevice::new(id);
            assert_eq!(
                root.add_device(Box::new(device), &mut allocator),
                Ok(id as u8 + 1)
            );
        }
        for slot in 1..32 {
            for bar in [0, 2] {
                let (address, size) = root.bar(slot, bar).unwrap();
                assert!(address >= MMIO32 && address + size <= MMIO32 + 0x2000_0000);
            }
        }
        let (device, _) = TestDevice::new(99);
        assert_eq!(
            root.add_device(Box::new(device), &mut allocator),
            Err(PciError::NoFreeSlot)
        );
    }

    #[test]
    fn odd_accesses_never_panic() {
        let root = root_with_devices(1);
        let mut io = PciConfigIo::new(root.clone());
        let mut ecam = PciConfigMmio::new(root.clone());
        let mut window = PciMmioWindow::new(root, u64::MAX - 4);
        let mut big = [0u8; 16];
        for offset in [0, 1, 3, 4, 5, 7, 8, 100, u64::MAX] {
            io.read(offset, &mut big);
            io.write(offset, &big);
            io.read(offset, &mut big[..0]);
        }
        for offset in [0, 1, 0xfff, 0x1000, ECAM_SIZE - 1, ECAM_SIZE, u64::MAX] {
            ecam.read(offset, &mut big);
            ecam.read(offset, &mut big[..1]);
            ecam.write(offset, &big[..8]);
        }
        window.read(0, &mut big);
        window.read(u64::MAX, &mut big);
        window.write(8, &big);
        assert_eq!(big, [0xff; 16]);
    }
}
