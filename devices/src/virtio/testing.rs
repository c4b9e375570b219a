//! Test helpers every virtio device's tests share: guest memory, queues
//! on virtio-queue's `MockSplitQueue` with the used ring moved clear of the
//! available ring, descriptor chains described as (address, length,
//! direction), and an interrupt recorder.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::{GuestMemory, InterruptKind, VirtioInterrupt};

/// One descriptor of a test chain.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A device-readable descriptor.
pub fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

/// A device-writable descriptor.
pub fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

/// Raw split descriptors linking `descs` into one chain whose descriptors
/// sit at table indices `first..`.
pub fn raw(descs: &[Desc], first: u16) -> Vec<RawDescriptor> {
    let last = descs.len().saturating_sub(1);
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let mut next = 0;
            if i < last {
                flags |= VRING_DESC_F_NEXT as u16;
                next = first + i as u16 + 1;
            }
            RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next))
        })
        .collect()
}

/// `descs` as bare descriptors.
pub fn descriptors(descs: &[Desc]) -> Vec<SplitDescriptor> {
    raw(descs, 0)
        .into_iter()
        .map(SplitDescriptor::from)
        .collect()
}

/// Guest memory size of the tests.
pub const MEM_SIZE: usize = 0x100_0000;
/// Where tests put frame buffers (queues live below, 64 KiB apart).
pub const DATA: u64 = 0x10_0000;

/// 16 MiB of guest memory at 0.
pub fn memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A queue of `size` entries (up to 1024) for queue `index`, at
/// `index * 64 KiB`: `MockSplitQueue` lays out the descriptor table and
/// the available ring and writes chains; the used ring lives 32 KiB
/// further (the mock's own used ring overlaps its available ring past 8
/// entries).
pub struct TestQueue<'m> {
    /// The mock: descriptor table and available ring.
    pub vq: MockSplitQueue<'m, GuestMemory>,
    mem: &'m GuestMemory,
    used: GuestAddress,
    size: u16,
}

/// Queue `index` of `size` entries.
pub fn mock_queue(mem: &GuestMemory, index: u16, size: u16) -> TestQueue<'_> {
    let base = u64::from(index) << 16;
    TestQueue {
        vq: MockSplitQueue::create(mem, GuestAddress(base), size),
        mem,
        used: GuestAddress(base + 0x8000),
        size,
    }
}

impl TestQueue<'_> {
    /// The device's view of the queue.
    pub fn create_queue(&self) -> Queue {
        let mut queue: Queue = self.vq.create_queue().unwrap();
        queue.try_set_used_ring_address(self.used).unwrap();
        queue
    }

    /// Writes `descs` at table index `first` and makes their chains
    /// available.
    pub fn add_desc_chains(&self, descs: &[RawDescriptor], first: u16) {
        self.vq.add_desc_chains(descs, first).unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// Used ring entry `i` as (descriptor id, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i));
        let id = self.mem.read_obj(at).unwrap();
        (id, self.mem.read_obj(at.unchecked_add(4)).unwrap())
    }

    /// Where the device writes `avail_event` (EVENT_IDX).
    pub fn avail_event(&self) -> GuestAddress {
        self.used.unchecked_add(4 + 8 * u64::from(self.size))
    }

    /// Sets the available ring's index.
    pub fn set_avail_idx(&self, idx: u16) {
        self.vq.avail().idx().store(idx);
    }

    /// Sets available ring entry `i` to descriptor `head`.
    pub fn set_avail_entry(&self, i: usize, head: u16) {
        self.vq.avail().ring().ref_at(i).unwrap().store(head);
    }
}

/// A non-blocking eventfd.
pub fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// `desc` with the NEXT flag and `next` as its successor.
pub fn set_next(desc: RawDescriptor, next: u16) -> RawDescriptor {
    let d = SplitDescriptor::from(desc);
    let flags = d.flags() | VRING_DESC_F_NEXT as u16;
    RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
}

/// Reads one byte of guest memory.
pub fn byte_at(mem: &GuestMemory, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

/// Reads `len` bytes of guest memory.
pub fn bytes_at(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// Polls `done` for up to 10 s.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Records interrupts and needs-reset reports.
#[derive(Default)]
pub struct RecordingInterrupt {
    raised: Mutex<Vec<InterruptKind>>,
    needs_reset: Mutex<bool>,
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        self.raised.lock().unwrap().push(kind);
        Ok(())
    }

    fn set_needs_reset(&self) {
        *self.needs_reset.lock().unwrap() = true;
    }
}

impl RecordingInterrupt {
    /// The interrupts so far.
    pub fn raised(&self) -> Vec<InterruptKind> {
        self.raised.lock().unwrap().clone()
    }

    /// Whether the device reported it needs a reset.
    pub fn needs_reset(&self) -> bool {
        *self.needs_reset.lock().unwrap()
    }

    /// Waits up to 10 s for `count` interrupts of `kind`.
    pub fn wait_for(&self, kind: InterruptKind, count: usize) {
        wait_until(&format!("{count} interrupts {kind:?}"), || {
            self.raised().iter().filter(|k| **k == kind).count() >= count
        });
    }
}
