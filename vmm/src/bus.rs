//! An address-range bus (one for port I/O, one for MMIO) that dispatches
//! vCPU exits to [`devices::BusDevice`]s. Built before the vCPUs start and
//! then only read, so every vCPU thread shares it without a lock; each
//! device has its own mutex. Accesses nothing claims read as all-ones and
//! are counted, never fatal.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::BusDevice;

/// A device shared between the bus and whoever else drives it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Placing a device on the bus failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already taken.
    #[error("bus range {start:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {start:#x} has zero length")]
    Empty {
        /// Start of the rejected range.
        start: u64,
    },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
    unclaimed_reads: AtomicU64,
    unclaimed_writes: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[start, start + len)`.
    pub fn insert(&mut self, device: SharedDevice, start: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { start });
        }
        let end = start
            .checked_add(len)
            .ok_or(BusError::Overlap { start, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((&other, entry)) = before {
            if other + entry.len > start {
                return Err(BusError::Overlap { start, len });
            }
        }
        self.ranges.insert(start, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&start, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - start;
        (offset + size as u64 <= entry.len).then_some((offset, &entry.device))
    }

    /// A guest read at `addr`; returns whether a device claimed it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed_reads.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// A guest write at `addr`; returns whether a device claimed it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => {
                self.unclaimed_writes.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Accesses no device claimed, as (reads, writes).
    pub fn unclaimed(&self) -> (u64, u64) {
        (
            self.unclaimed_reads.load(Ordering::Relaxed),
            self.unclaimed_writes.load(Ordering::Relaxed),
        )
    }
}

/// Locks a device, carrying on if another thread panicked while holding it
/// (device state is plain data; a poisoned lock is no reason to stop).
pub fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_offset() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(device.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(device.lock().unwrap().writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn unclaimed_accesses_read_all_ones_and_are_counted() {
        let bus = Bus::new();
        let mut data = [0u8; 2];
        assert!(!bus.read(0x2f8, &mut data));
        assert_eq!(data, [0xff, 0xff]);
        assert!(!bus.write(0x2f8, &[1]));
        assert_eq!(bus.unclaimed(), (1, 1));
    }

    #[test]
    fn accesses_straddling_the_end_are_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x70, 2)
            .unwrap();
        let mut data = [0u8; 2];
        assert!(!bus.read(0x71, &mut data));
        assert!(bus.read(0x70, &mut data));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        let device = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(device(), 0x60, 5).unwrap();
        assert_eq!(
            bus.insert(device(), 0x64, 1),
            Err(BusError::Overlap {
                start: 0x64,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(device(), 0x5f, 2),
            Err(BusError::Overlap {
                start: 0x5f,
                len: 2
            })
        );
        assert!(bus.insert(device(), 0x65, 1).is_ok());
        assert_eq!(
            bus.insert(device(), 0x10, 0),
            Err(BusError::Empty { start: 0x10 })
        );
    }
}
