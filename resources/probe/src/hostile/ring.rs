//! Split-virtqueue memory the hostile probe writes by hand: one page per
//! queue index (descriptor table at 0, avail ring at 0x400, used ring at
//! 0x800, an indirect table at 0xc00) and a data area for buffers, all in
//! the probe's identity-mapped RAM. Nothing here checks what it writes:
//! the attacks decide every field.

use core::sync::atomic::{fence, Ordering};

/// Queue indexes with a ring page.
pub const RING_QUEUES: usize = 3;
/// Most entries of a queue the probe sets up (attacks may claim others).
pub const QUEUE_SIZE: u16 = 16;
const AVAIL_OFF: u64 = 0x400;
const USED_OFF: u64 = 0x800;
const INDIRECT_OFF: u64 = 0xc00;
/// Most entries of the indirect table.
pub const INDIRECT_MAX: u16 = 64;
/// Bytes of the data area.
pub const DATA_LEN: u64 = 16 * 1024;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

#[repr(C, align(4096))]
struct Pages([[u8; 4096]; RING_QUEUES]);

#[repr(C, align(4096))]
struct Data([u8; DATA_LEN as usize]);

static mut PAGES: Pages = Pages([[0; 4096]; RING_QUEUES]);
static mut DATA: Data = Data([0; DATA_LEN as usize]);

/// A descriptor as the attacks write it.
#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Guest-physical address of the data area plus `offset`.
pub fn data(offset: u64) -> u64 {
    (core::ptr::addr_of_mut!(DATA) as u64) + offset
}

/// Fills `len` bytes of the data area at `offset` with `byte`.
pub fn fill(offset: u64, len: u64, byte: u8) {
    let len = len.min(DATA_LEN.saturating_sub(offset));
    // SAFETY: inside the static data area; the device is reset or idle.
    unsafe { core::ptr::write_bytes(data(offset) as *mut u8, byte, len as usize) };
}

/// Reads a byte of the data area (volatile: the device writes it).
pub fn data_byte(offset: u64) -> u8 {
    // SAFETY: inside the static data area.
    unsafe { core::ptr::read_volatile(data(offset) as *const u8) }
}

/// Writes `bytes` into the data area at `offset` (clipped to the area).
pub fn put(offset: u64, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        let at = offset + i as u64;
        if at < DATA_LEN {
            // SAFETY: inside the static data area.
            unsafe { core::ptr::write_volatile(data(at) as *mut u8, b) };
        }
    }
}

/// The ring memory of one queue index and the driver's view of it.
pub struct Ring {
    pub base: u64,
    pub size: u16,
    next_avail: u16,
    last_used: u16,
}

impl Ring {
    /// The zeroed ring page of queue `index` for `size` entries (`None`
    /// past [`RING_QUEUES`] or above [`QUEUE_SIZE`]).
    pub fn new(index: u16, size: u16) -> Option<Ring> {
        let index = usize::from(index);
        if index >= RING_QUEUES || size == 0 || size > QUEUE_SIZE {
            return None;
        }
        // SAFETY: only the address is taken.
        let base = unsafe { core::ptr::addr_of_mut!(PAGES.0[index]) } as u64;
        // SAFETY: the page is this queue's, and the device was reset.
        unsafe { core::ptr::write_bytes(base as *mut u8, 0, 4096) };
        Some(Ring {
            base,
            size,
            next_avail: 0,
            last_used: 0,
        })
    }

    pub fn desc_addr(&self) -> u64 {
        self.base
    }
    pub fn avail_addr(&self) -> u64 {
        self.base + AVAIL_OFF
    }
    pub fn used_addr(&self) -> u64 {
        self.base + USED_OFF
    }
    pub fn indirect_addr(&self) -> u64 {
        self.base + INDIRECT_OFF
    }

    /// Writes descriptor `index` of the ring (indexes past the page's
    /// table space are not written).
    pub fn set_desc(&self, index: u16, desc: Desc) {
        if u64::from(index) * 16 + 16 <= AVAIL_OFF {
            write_desc(self.base + u64::from(index) * 16, desc);
        }
    }

    /// Writes entry `index` of the indirect table.
    pub fn set_indirect(&self, index: u16, desc: Desc) {
        if index < INDIRECT_MAX {
            write_desc(self.indirect_addr() + u64::from(index) * 16, desc);
        }
    }

    /// Puts `head` in the next avail slot (not yet published).
    pub fn push(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        write16(self.avail_addr() + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes the avail index: what was pushed, plus `extra` (an avail
    /// index running ahead of the ring when non-zero).
    pub fn publish(&mut self, extra: u16) {
        fence(Ordering::SeqCst);
        write16(self.avail_addr() + 2, self.next_avail.wrapping_add(extra));
        fence(Ordering::SeqCst);
    }

    /// The used index the device wrote.
    pub fn used_idx(&self) -> u16 {
        read16(self.used_addr() + 2)
    }

    /// The next used element `(id, len)`, if any.
    pub fn take_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let elem = self.used_addr() + 4 + 8 * u64::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        Some((read32(elem), read32(elem + 4)))
    }
}

fn write_desc(at: u64, desc: Desc) {
    // SAFETY: `at` is a 16-byte slot of a static ring page.
    unsafe {
        core::ptr::write_volatile(at as *mut u64, desc.addr);
        core::ptr::write_volatile((at + 8) as *mut u32, desc.len);
        core::ptr::write_volatile((at + 12) as *mut u16, desc.flags);
        core::ptr::write_volatile((at + 14) as *mut u16, desc.next);
    }
}

fn write16(addr: u64, value: u16) {
    // SAFETY: inside a static ring page.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) };
}

fn read16(addr: u64) -> u16 {
    // SAFETY: inside a static ring page; the device writes it.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

fn read32(addr: u64) -> u32 {
    // SAFETY: as for `read16`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}
