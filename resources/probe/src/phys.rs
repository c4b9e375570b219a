//! Physical memory access through the probe's identity map (first 4 GiB),
//! little-endian field readers, and a small set of busy address ranges.

/// End (exclusive) of the identity-mapped physical address space.
pub const MAPPED_END: u64 = 1 << 32;

/// A `len`-byte view of physical memory at `addr`, if it is non-null and
/// inside the identity map.
pub fn slice(addr: u64, len: usize) -> Option<&'static [u8]> {
    let end = addr.checked_add(len as u64)?;
    if addr == 0 || end > MAPPED_END {
        return None;
    }
    // SAFETY: the range is non-null and identity-mapped by the probe's page
    // tables; guest RAM is plain memory that nothing else writes while read.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

/// Copies `bytes` to physical memory at `addr` (inside the identity map).
pub fn copy_to(addr: u64, bytes: &[u8]) -> bool {
    let Some(end) = addr.checked_add(bytes.len() as u64) else {
        return false;
    };
    if addr == 0 || end > MAPPED_END {
        return false;
    }
    // SAFETY: the destination is non-null, identity-mapped RAM the caller
    // checked is free; it cannot overlap `bytes`, which lives in the image.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
    true
}

/// Little-endian u8 at `off` in `bytes`, 0 when out of range.
pub fn u8_at(bytes: &[u8], off: usize) -> u8 {
    bytes.get(off).copied().unwrap_or(0)
}

/// Little-endian u16 at `off` in `bytes`, 0 when out of range.
pub fn u16_at(bytes: &[u8], off: usize) -> u16 {
    le::<2>(bytes, off) as u16
}

/// Little-endian u32 at `off` in `bytes`, 0 when out of range.
pub fn u32_at(bytes: &[u8], off: usize) -> u32 {
    le::<4>(bytes, off) as u32
}

/// Little-endian u64 at `off` in `bytes`, 0 when out of range.
pub fn u64_at(bytes: &[u8], off: usize) -> u64 {
    le::<8>(bytes, off)
}

fn le<const N: usize>(bytes: &[u8], off: usize) -> u64 {
    match off.checked_add(N).and_then(|end| bytes.get(off..end)) {
        Some(field) => field
            .iter()
            .rev()
            .fold(0, |acc, &b| (acc << 8) | u64::from(b)),
        None => 0,
    }
}

/// Reads a u32 from physical memory (0 if unmapped).
pub fn read_u32(addr: u64) -> u32 {
    slice(addr, 4).map_or(0, |b| u32_at(b, 0))
}

/// Physical address ranges the probe must not overwrite (boot data, tables).
pub struct BusyRanges {
    ranges: [(u64, u64); 64],
    len: usize,
    overflowed: bool,
}

impl Default for BusyRanges {
    fn default() -> Self {
        Self::new()
    }
}

impl BusyRanges {
    /// An empty set.
    pub const fn new() -> Self {
        Self {
            ranges: [(0, 0); 64],
            len: 0,
            overflowed: false,
        }
    }

    /// Marks `[start, start + size)` busy. When the set is full everything
    /// counts as busy from then on.
    pub fn add(&mut self, start: u64, size: u64) {
        match self.ranges.get_mut(self.len) {
            Some(slot) => {
                *slot = (start, start.saturating_add(size));
                self.len += 1;
            }
            None => self.overflowed = true,
        }
    }

    /// Whether `[start, start + size)` overlaps no busy range.
    pub fn is_free(&self, start: u64, size: u64) -> bool {
        let end = start.saturating_add(size);
        !self.overflowed
            && self.ranges[..self.len]
                .iter()
                .all(|&(s, e)| end <= s || start >= e)
    }
}
