//! The configuration space of a type-0 PCI function: 256 bytes of header
//! and capabilities with a per-bit write mask (reads past 256 and up to the
//! 4 KiB ECAM function size return zero), memory BARs whose size the guest
//! probes by writing all-ones, and the capability list.
//!
//! Registers the guest may change are exactly the bits set in the write
//! mask: command, cache line size, interrupt line, BAR address bits and
//! whatever a capability declares writable. Everything else, status
//! included, is read-only.

/// Size of the conventional configuration space.
pub const CONFIG_SPACE_SIZE: u16 = 256;
/// Size of one function's configuration space through ECAM.
pub const EXTENDED_CONFIG_SPACE_SIZE: u16 = 4096;
/// Number of BAR registers of a type-0 header.
pub const BAR_COUNT: u8 = 6;

/// Command register offset.
pub const COMMAND: u16 = 0x04;
/// Command bit: the function decodes its memory BARs.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Status register offset.
pub const STATUS: u16 = 0x06;
/// Status bit: the capability pointer is valid.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// First BAR register offset.
pub const BAR0: u16 = 0x10;
/// Capability pointer offset.
pub const CAPABILITY_POINTER: u16 = 0x34;
/// Interrupt line offset (scratch register for the OS).
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Interrupt pin offset (0: no INTx).
pub const INTERRUPT_PIN: u16 = 0x3d;

/// Offset of the first capability.
const FIRST_CAPABILITY: u16 = 0x40;
/// Command bits the guest may set: I/O, memory, bus master, parity error
/// response, SERR# enable, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400;
/// Cache line size register: a scratch register.
const CACHE_LINE_SIZE: u16 = 0x0c;
/// BAR type bits: 64-bit memory.
const BAR_MEM64: u32 = 0b100;
/// BAR flag: prefetchable.
const BAR_PREFETCHABLE: u32 = 0b1000;
/// Smallest memory BAR the PCI spec allows.
const MIN_BAR_SIZE: u64 = 16;

/// Errors building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciConfigError {
    /// The BAR index is out of range or already used.
    #[error("bar {index} is out of range or already in use")]
    BarIndex {
        /// The requested BAR index.
        index: u8,
    },
    /// The BAR size is not a power of two in the supported range.
    #[error("bar {index} size {size:#x} is not a power of two of at least 16 bytes (2 GiB at most for 32-bit bars)")]
    BarSize {
        /// The BAR index.
        index: u8,
        /// The requested size.
        size: u64,
    },
    /// The capability does not fit in the configuration space.
    #[error("capability of {len} bytes does not fit in configuration space")]
    CapabilityFull {
        /// Length of the rejected capability.
        len: usize,
    },
    /// A capability must be at least 2 bytes and its mask as long as it.
    #[error("malformed capability ({len} bytes, mask of {mask_len})")]
    CapabilityShape {
        /// Length of the capability body.
        len: usize,
        /// Length of its write mask.
        mask_len: usize,
    },
}

/// Identity of a function: the read-only ID registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: base class << 16 | subclass << 8 | programming interface.
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// A memory BAR to declare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// Size in bytes, a power of two.
    pub size: u64,
    /// A 64-bit BAR (takes this index and the next).
    pub is_64bit: bool,
    /// The prefetchable flag (no read side effects).
    pub prefetchable: bool,
}

/// A declared BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR index (the low register of a 64-bit BAR).
    pub index: u8,
    /// Size in bytes.
    pub size: u64,
    /// Whether it is a 64-bit BAR.
    pub is_64bit: bool,
}

/// A type-0 function's configuration space.
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE as usize],
    writable: [u8; CONFIG_SPACE_SIZE as usize],
    /// Declared BARs by index; the high half of a 64-bit BAR stays `None`.
    bars: [Option<Bar>; BAR_COUNT as usize],
    /// Offset of the last capability in the list (0: none yet).
    last_capability: u16,
    /// Where the next capability goes.
    next_capability: u16,
}

impl ConfigSpace {
    /// A header with `ids`, no BARs, no capabilities and no INTx pin.
    pub fn new(ids: &PciIds) -> Self {
        let mut space = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE as usize],
            writable: [0; CONFIG_SPACE_SIZE as usize],
            bars: [None; BAR_COUNT as usize],
            last_capability: 0,
            next_capability: FIRST_CAPABILITY,
        };
        space.set_u16(0x00, ids.vendor);
        space.set_u16(0x02, ids.device);
        space.bytes[0x08] = ids.revision;
        space.bytes[0x09..0x0c].copy_from_slice(&ids.class.to_le_bytes()[..3]);
        space.set_u16(0x2c, ids.subsystem_vendor);
        space.set_u16(0x2e, ids.subsystem);
        space.set_mask(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        space.set_mask(CACHE_LINE_SIZE, &[0xff]);
        space.set_mask(INTERRUPT_LINE, &[0xff]);
        space
    }

    /// Declares memory BAR `index` (unassigned: address 0).
    pub fn add_bar(&mut self, index: u8, spec: BarSpec) -> Result<(), PciConfigError> {
        let span = if spec.is_64bit { 2 } else { 1 };
        let free = |i: u8| i < BAR_COUNT && self.bars[usize::from(i)].is_none();
        if !(index..index + span).all(free) || self.is_high_half(index) {
            return Err(PciConfigError::BarIndex { index });
        }
        let max = if spec.is_64bit { 1 << 63 } else { 1 << 31 };
        if !spec.size.is_power_of_two() || spec.size < MIN_BAR_SIZE || spec.size > max {
            let size = spec.size;
            return Err(PciConfigError::BarSize { index, size });
        }
        let mut flags = 0;
        if spec.is_64bit {
            flags |= BAR_MEM64;
        }
        if spec.prefetchable {
            flags |= BAR_PREFETCHABLE;
        }
        let offset = bar_offset(index);
        let address_mask = !(spec.size - 1);
        self.set_u32(offset, flags);
        self.set_mask(offset, &((address_mask as u32) & !0xf).to_le_bytes());
        if spec.is_64bit {
            self.set_mask(offset + 4, &((address_mask >> 32) as u32).to_le_bytes());
        }
        self.bars[usize::from(index)] = Some(Bar {
            index,
            size: spec.size,
            is_64bit: spec.is_64bit,
        });
        Ok(())
    }

    /// Whether `index` is the high register of a declared 64-bit BAR.
    fn is_high_half(&self, index: u8) -> bool {
        index
            .checked_sub(1)
            .and_then(|low| self.bars.get(usize::from(low)).copied().flatten())
            .is_some_and(|bar| bar.is_64bit)
    }

    /// The declared BARs, in index order.
    pub fn bars(&self) -> impl Iterator<Item = Bar> + '_ {
        self.bars.iter().flatten().copied()
    }

    /// The declared BAR `index`, if any.
    pub fn bar(&self, index: u8) -> Option<Bar> {
        self.bars.get(usize::from(index)).copied().flatten()
    }

    /// The address BAR `index` is programmed with.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let bar = self.bar(index)?;
        let offset = bar_offset(index);
        let low = u64::from(self.u32_at(offset) & !0xf);
        let high = if bar.is_64bit {
            u64::from(self.u32_at(offset + 4))
        } else {
            0
        };
        Some(high << 32 | low)
    }

    /// Programs BAR `index` with `address` (its low bits are dropped to the
    /// BAR's alignment), as firmware would.
    pub fn set_bar_address(&mut self, index: u8, address: u64) {
        let Some(bar) = self.bar(index) else {
            return;
        };
        let offset = bar_offset(index);
        let address = address & !(bar.size - 1);
        let flags = self.u32_at(offset) & 0xf;
        self.set_u32(offset, address as u32 & !0xf | flags);
        if bar.is_64bit {
            self.set_u32(offset + 4, (address >> 32) as u32);
        }
    }

    /// Whether BAR `index` holds the all-ones size probe pattern in either
    /// half (the guest is sizing it, not placing it).
    pub fn bar_is_probing(&self, index: u8) -> bool {
        let Some(bar) = self.bar(index) else {
            return false;
        };
        let offset = bar_offset(index);
        let low_mask = (!(bar.size - 1)) as u32 & !0xf;
        let low_probing = low_mask != 0 && self.u32_at(offset) & low_mask == low_mask;
        low_probing || (bar.is_64bit && self.u32_at(offset + 4) == u32::MAX)
    }

    /// Whether the function decodes its memory BARs (command bit 1).
    pub fn memory_enabled(&self) -> bool {
        self.u16_at(COMMAND) & COMMAND_MEMORY != 0
    }

    /// Appends a capability. `body[0]` is the capability ID and `body[1]`
    /// is overwritten with the next pointer; `mask` gives the bits the guest
    /// may write. Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], mask: &[u8]) -> Result<u16, PciConfigError> {
        let (len, mask_len) = (body.len(), mask.len());
        if len < 2 || mask_len != len {
            return Err(PciConfigError::CapabilityShape { len, mask_len });
        }
        let offset = self.next_capability;
        let end = usize::from(offset) + len;
        if end > usize::from(CONFIG_SPACE_SIZE) {
            return Err(PciConfigError::CapabilityFull { len });
        }
        let start = usize::from(offset);
        self.bytes[start..end].copy_from_slice(body);
        self.bytes[start + 1] = 0;
        self.writable[start..end].copy_from_slice(mask);
        self.writable[start..start + 2].fill(0);
        let link = if self.last_capability == 0 {
            CAPABILITY_POINTER
        } else {
            self.last_capability + 1
        };
        self.bytes[usize::from(link)] = offset as u8;
        self.last_capability = offset;
        self.next_capability = end.next_multiple_of(4) as u16;
        let status = self.u16_at(STATUS) | STATUS_CAPABILITIES;
        self.set_u16(STATUS, status);
        Ok(offset)
    }

    /// Reads `data.len()` bytes at `offset`: zero past the first 256 bytes,
    /// all-ones past the 4 KiB function space.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::from(offset) + i;
            *byte = match self.bytes.get(at) {
                Some(value) => *value,
                None if at < usize::from(EXTENDED_CONFIG_SPACE_SIZE) => 0,
                None => 0xff,
            };
        }
    }

    /// Writes `data` at `offset` through the write mask; bytes past the
    /// first 256 are dropped.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, value) in data.iter().enumerate() {
            let at = usize::from(offset) + i;
            if let (Some(byte), Some(mask)) = (self.bytes.get_mut(at), self.writable.get(at)) {
                *byte = (*byte & !mask) | (value & mask);
            }
        }
    }

    /// The byte at `offset` (0 past the first 256 bytes).
    pub fn u8_at(&self, offset: u16) -> u8 {
        let mut data = [0];
        self.read(offset, &mut data);
        data[0]
    }

    /// The little-endian 16-bit register at `offset`.
    pub fn u16_at(&self, offset: u16) -> u16 {
        let mut data = [0; 2];
        self.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    /// The little-endian 32-bit register at `offset`.
    pub fn u32_at(&self, offset: u16) -> u32 {
        let mut data = [0; 4];
        self.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Sets the 16-bit register at `offset`, ignoring the write mask.
    pub fn set_u16(&mut self, offset: u16, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets the 32-bit register at `offset`, ignoring the write mask.
    pub fn set_u32(&mut self, offset: u16, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets bytes at `offset`, ignoring the write mask (device-side update).
    pub fn set_bytes(&mut self, offset: u16, data: &[u8]) {
        let start = usize::from(offset);
        if let Some(bytes) = self.bytes.get_mut(start..start + data.len()) {
            bytes.copy_from_slice(data);
        }
    }

    fn set_mask(&mut self, offset: u16, mask: &[u8]) {
        let start = usize::from(offset);
        if let Some(bytes) = self.writable.get_mut(start..start + mask.len()) {
            bytes.copy_from_slice(mask);
        }
    }
}

/// Configuration-space offset of BAR register `index`.
pub fn bar_offset(index: u8) -> u16 {
    BAR0 + 4 * u16::from(index)
}

/// Whether the access `[offset, offset + len)` overlaps `[start, start + size)`.
pub fn overlaps(offset: u16, len: usize, start: u16, size: usize) -> bool {
    let (offset, start) = (usize::from(offset), usize::from(start));
    offset < start + size && start < offset + len
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: PciIds = PciIds {
        vendor: 0x1af4,
        device: 0x1042,
        revision: 1,
        class: 0x01_00_00,
        subsystem_vendor: 0x1af4,
        subsystem: 0x40,
    };

    fn probe(space: &mut ConfigSpace, offset: u16) -> u32 {
        space.write(offset, &u32::MAX.to_le_bytes());
        space.u32_at(offset)
    }

    #[test]
    fn ids_are_read_only() {
        let mut space = ConfigSpace::new(&IDS);
        assert_eq!(space.u32_at(0), 0x1042_1af4);
        assert_eq!(space.u32_at(0x08), 0x0100_0001);
        assert_eq!(space.u32_at(0x2c), 0x0040_1af4);
        space.write(0, &[0; 64]);
        assert_eq!(space.u32_at(0), 0x1042_1af4);
        assert_eq!(space.u32_at(0x08), 0x0100_0001);
        assert_eq!(space.u8_at(INTERRUPT_PIN), 0);
    }

    #[test]
    fn command_and_scratch_registers_are_masked() {
        let mut space = ConfigSpace::new(&IDS);
        space.write(COMMAND, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(space.u16_at(COMMAND), COMMAND_WRITABLE);
        assert_eq!(space.u16_at(STATUS), 0);
        assert!(space.memory_enabled());
        space.write(INTERRUPT_LINE, &[0x0b, 0x01]);
        assert_eq!(space.u8_at(INTERRUPT_LINE), 0x0b);
        assert_eq!(space.u8_at(INTERRUPT_PIN), 0);
    }

    #[test]
    fn bar32_probe_returns_size_mask_and_flags() {
        let mut space = ConfigSpace::new(&IDS);
        let spec = BarSpec {
            size: 0x4000,
            is_64bit: false,
            prefetchable: true,
        };
        space.add_bar(1, spec).unwrap();
        assert_eq!(probe(&mut space, bar_offset(1)), 0xffff_c008);
        assert!(space.bar_is_probing(1));
        space.write(bar_offset(1), &0xc000_1234u32.to_le_bytes());
        assert_eq!(space.u32_at(bar_offset(1)), 0xc000_0008);
        assert_eq!(space.bar_address(1), Some(0xc000_0000));
        assert!(!space.bar_is_probing(1));
        // Unused BARs read zero and size to zero.
        assert_eq!(probe(&mut space, bar_offset(0)), 0);
        assert_eq!(probe(&mut space, 0x30), 0, "no expansion rom");
    }

    #[test]
    fn bar64_probe_covers_both_halves() {
        let mut space = ConfigSpace::new(&IDS);
        let spec = BarSpec {
            size: 0x8000,
            is_64bit: true,
            prefetchable: false,
        };
        space.add_bar(0, spec).unwrap();
        assert_eq!(probe(&mut space, bar_offset(0)), 0xffff_8004);
        assert_eq!(probe(&mut space, bar_offset(1)), u32::MAX);
        space.set_bar_address(0, 0x40_0000_8000);
        assert_eq!(space.bar_address(0), Some(0x40_0000_8000));
        assert_eq!(space.u32_at(bar_offset(0)), 0x8004);
        assert_eq!(space.u32_at(bar_offset(1)), 0x40);
        assert_eq!(space.bars().count(), 1);
        assert_eq!(space.bar(1), None);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut space = ConfigSpace::new(&IDS);
        let spec = |size, is_64bit| BarSpec {
            size,
            is_64bit,
            prefetchable: false,
        };
        assert!(space.add_bar(5, spec(0x1000, true)).is_err());
        assert!(space.add_bar(6, spec(0x1000, false)).is_err());
        assert!(space.add_bar(0, spec(0x1800, false)).is_err());
        assert!(space.add_bar(0, spec(8, false)).is_err());
        assert!(space.add_bar(0, spec(1 << 32, false)).is_err());
        space.add_bar(2, spec(0x1000, true)).unwrap();
        assert!(space.add_bar(2, spec(0x1000, false)).is_err());
        assert!(space.add_bar(3, spec(0x1000, false)).is_err());
        assert!(space.add_bar(1, spec(0x1000, true)).is_err());
        space.add_bar(1, spec(0x1000, false)).unwrap();
    }

    #[test]
    fn capabilities_are_chained() {
        let mut space = ConfigSpace::new(&IDS);
        let first = space
            .add_capability(&[0x11, 0xee, 1, 2, 3], &[0xff; 5])
            .unwrap();
        let second = space.add_capability(&[0x09, 0, 7, 7], &[0; 4]).unwrap();
        assert_eq!(
            space.u16_at(STATUS) & STATUS_CAPABILITIES,
            STATUS_CAPABILITIES
        );
        assert_eq!((first, second), (0x40, 0x48));
        assert_eq!(space.u8_at(CAPABILITY_POINTER), 0x40);
        assert_eq!(space.u16_at(first), 0x4811, "id and next pointer");
        assert_eq!(space.u16_at(second), 0x0009);
        space.write(first, &[0, 0, 0xaa]);
        assert_eq!(
            space.u32_at(first),
            0x02aa_4811,
            "id and next are read-only"
        );
        space.write(second + 2, &[0]);
        assert_eq!(space.u8_at(second + 2), 7);
    }

    #[test]
    fn capability_space_runs_out_cleanly() {
        let mut space = ConfigSpace::new(&IDS);
        let big = [0x09u8; 100];
        space.add_capability(&big, &[0; 100]).unwrap();
        assert_eq!(
            space.add_capability(&big, &[0; 100]),
            Err(PciConfigError::CapabilityFull { len: 100 })
        );
        assert!(space.add_capability(&[9], &[0]).is_err());
        assert!(space.add_capability(&[9, 0], &[0]).is_err());
    }

    #[test]
    fn extended_space_reads_zero_and_never_panics() {
        let mut space = ConfigSpace::new(&IDS);
        let mut data = [0xaa; 8];
        space.read(0xffc, &mut data);
        assert_eq!(data, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        space.read(u16::MAX, &mut data);
        space.write(0xfe, &[1, 2, 3, 4]);
        space.write(u16::MAX, &[1, 2, 3, 4]);
        space.set_bytes(0xfe, &[1, 2, 3, 4]);
        assert_eq!(space.u16_at(0xfe), 0);
    }
}
