//! What the fuzz targets share: a cursor that turns the fuzzer's bytes
//! into numbers, a scratch directory on tmpfs, and a guest driver that
//! lays out a split virtqueue (descriptor table, available ring, buffers)
//! from those bytes the way a misbehaving guest could.

pub mod api;

use std::path::PathBuf;
use std::sync::OnceLock;

use devices::virtio::{GuestMemory, InterruptKind, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

/// Reads numbers and slices off the front of the fuzzer's input; once it
/// runs dry every read is zero (or empty).
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Input { bytes }
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The next `len` bytes (fewer at the end).
    pub fn take(&mut self, len: usize) -> &'a [u8] {
        let (head, tail) = self.bytes.split_at(len.min(self.bytes.len()));
        self.bytes = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.bytes.len())
    }

    /// A little-endian number of `N` bytes, zero-padded.
    fn number<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.number::<1>()[0]
    }

    /// The next 16-bit number.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.number())
    }

    /// The next 32-bit number.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.number())
    }

    /// The next 64-bit number.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.number())
    }

    /// A length-prefixed (one byte) slice.
    pub fn short_slice(&mut self) -> &'a [u8] {
        let len = usize::from(self.u8());
        self.take(len)
    }
}

/// This process's scratch directory on tmpfs (`/dev/shm`), removed at exit
/// only if the fuzzer exits normally; files in it are per target.
pub fn scratch_dir() -> PathBuf {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        TempDir::new_with_prefix("/dev/shm/zvmm-fuzz-")
            .or_else(|_| TempDir::new_with_prefix("/tmp/zvmm-fuzz-"))
            .expect("cannot create a scratch directory")
    })
    .as_path()
    .to_path_buf()
}

/// Guest memory size of the virtio targets.
pub const MEM_SIZE: u64 = 0x10_0000;
/// Guest memory per queue in a sane layout: descriptor table at 0,
/// available ring at 0x4000, used ring at 0x5000 (room for 1024 entries).
const QUEUE_AREA: u64 = 0x8000;
/// Queues a sane layout has room for below [`BUFFERS`].
pub const MAX_QUEUES: u16 = 4;
/// Where buffers built from the input start.
pub const BUFFERS: u64 = QUEUE_AREA * MAX_QUEUES as u64;

/// 1 MiB of guest memory at 0.
pub fn guest_memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("cannot map guest memory")
}

/// An interrupt that goes nowhere (the targets look for crashes, hangs and
/// leaks, not for the guest's view).
pub struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }
}

/// Queue `index` as a guest set up from `input`: usually a sane layout
/// (rings in the queue's own area, the size a power of two up to
/// `max_size`, available heads inside the queue) with descriptors,
/// flags, chain links and the available ring taken from the input; one
/// time in sixteen, ring addresses and size straight from the input too.
/// Most descriptors point into the buffer area at [`BUFFERS`], which
/// [`fill_buffers`] fills. `None` where the transport would refuse the
/// queue at activation (`Queue::is_valid`).
pub fn guest_queue(
    mem: &GuestMemory,
    input: &mut Input<'_>,
    index: u16,
    max_size: u16,
) -> Option<GuestQueue> {
    let mode = input.u8();
    let max_size = max_size.min(1024);
    let mut queue = Queue::new(max_size).ok()?;
    let wild = mode & 0xf == 0xf;
    let size = if wild {
        input.u16()
    } else {
        let max_shift = 15 - max_size.leading_zeros() as u16;
        1u16 << (u16::from(mode >> 4) % (max_shift + 1))
    };
    queue.set_size(size);
    let base = QUEUE_AREA * u64::from(index % MAX_QUEUES);
    let (desc, avail, used) = if wild {
        (input.u64(), input.u64(), input.u64())
    } else {
        (base, base + 0x4000, base + 0x5000)
    };
    queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_event_idx(mode & 0x10 != 0);
    queue.set_ready(true);
    let size = queue.size();
    write_descriptors(mem, input, desc, size);
    let heads = write_avail_ring(mem, input, avail, size, wild);
    let _ = mem.write_obj(0u16, GuestAddress(used.wrapping_add(2)));
    // Wild rings may never be used up; nobody waits for them.
    queue.is_valid(mem).then_some(GuestQueue {
        queue,
        used: GuestAddress(used),
        heads: if wild { 0 } else { heads },
    })
}

/// A queue the guest set up, and what the device should do with it.
pub struct GuestQueue {
    /// The queue as the transport hands it over.
    pub queue: Queue,
    /// Its used ring.
    pub used: GuestAddress,
    /// Heads made available that must each come back used unless the
    /// ring breaks (0 for a wild layout).
    pub heads: u16,
}

/// The rest of the input as the contents of the buffer area.
pub fn fill_buffers(mem: &GuestMemory, input: &mut Input<'_>) {
    let _ = mem.write_slice(input.rest(), GuestAddress(BUFFERS));
}

/// Descriptor table entries: address (mostly inside the buffer area),
/// length (mostly short), flags and next (inside the queue) from the
/// input.
fn write_descriptors(mem: &GuestMemory, input: &mut Input<'_>, table: u64, size: u16) {
    let count = u16::from(input.u8()).min(size);
    for index in 0..count {
        let kind = input.u8();
        let addr = match kind & 3 {
            0 => input.u64(),
            _ => BUFFERS + u64::from(input.u16()) * 8,
        };
        let len = match kind >> 6 {
            0 => input.u32(),
            _ => u32::from(input.u16()),
        };
        let flags = input.u16() & 0x7;
        let next = u16::from(input.u8()) % size.max(1);
        let mut entry = [0u8; 16];
        entry[..8].copy_from_slice(&addr.to_le_bytes());
        entry[8..12].copy_from_slice(&len.to_le_bytes());
        entry[12..14].copy_from_slice(&flags.to_le_bytes());
        entry[14..].copy_from_slice(&next.to_le_bytes());
        let at = table.wrapping_add(u64::from(index) * 16);
        let _ = mem.write_slice(&entry, GuestAddress(at));
    }
}

/// The available ring: flags, a count of heads (the index) and the heads;
/// returns the count. Unless `wild`, at most the queue size of heads,
/// each inside the queue.
fn write_avail_ring(
    mem: &GuestMemory,
    input: &mut Input<'_>,
    ring: u64,
    size: u16,
    wild: bool,
) -> u16 {
    let flags = input.u8() & 1;
    let idx = match wild {
        true => input.u16(),
        false => u16::from(input.u8()) % (size.min(255) + 1),
    };
    let _ = mem.write_obj(u16::from(flags), GuestAddress(ring));
    let _ = mem.write_obj(idx, GuestAddress(ring.wrapping_add(2)));
    for slot in 0..idx.min(size) {
        let head = match wild {
            true => input.u16(),
            false => u16::from(input.u8()) % size.max(1),
        };
        let at = ring.wrapping_add(4 + u64::from(slot) * 2);
        let _ = mem.write_obj(head, GuestAddress(at));
    }
    idx
}

/// An MSI router that routes and signals nothing, failing one call in
/// sixteen as a host out of GSI routes or eventfds would.
#[derive(Default)]
pub struct NoRouter {
    calls: std::sync::atomic::AtomicU32,
}

impl NoRouter {
    fn outcome(&self) -> std::io::Result<()> {
        let call = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if call % 16 == 15 {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
}

impl devices::pci::MsiRouter for NoRouter {
    fn route(
        &self,
        _vector: u16,
        _message: Option<devices::pci::MsiMessage>,
    ) -> std::io::Result<()> {
        self.outcome()
    }

    fn signal(&self, _vector: u16) -> std::io::Result<()> {
        self.outcome()
    }
}

/// A machine that takes power-off and reset requests and does nothing.
pub struct NoMachine;

impl devices::VmControl for NoMachine {
    fn request(&self, _request: devices::VmRequest) {}
}

/// One guest register access: `(write, offset, data)`; reads carry a
/// buffer of the access width. Widths are 1, 2, 4 or 8 bytes; offsets
/// stay below `window` most of the time, past it one time in eight.
pub fn access(input: &mut Input<'_>, window: u64) -> (bool, u64, Vec<u8>) {
    let op = input.u8();
    let width = 1usize << ((op >> 1) & 3);
    let offset = match op >> 5 {
        0 => input.u64(),
        _ => u64::from(input.u16()) % window.max(1),
    };
    let mut data = vec![0u8; width];
    if op & 1 == 1 {
        let bytes = input.take(width);
        data[..bytes.len()].copy_from_slice(bytes);
    }
    (op & 1 == 1, offset, data)
}

/// Runs `access` on `device`.
pub fn apply(device: &mut dyn devices::BusDevice, (write, offset, mut data): (bool, u64, Vec<u8>)) {
    if write {
        device.write(offset, &data);
    } else {
        device.read(offset, &mut data);
    }
}

/// What a device reported to its driver.
#[derive(Default)]
pub struct Recorder {
    needs_reset: std::sync::atomic::AtomicBool,
}

impl VirtioInterrupt for Recorder {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }

    fn set_needs_reset(&self) {
        self.needs_reset
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The driver's side of a device before DRIVER_OK: features acked,
/// configuration space read and written, queues set up.
pub struct Driver {
    /// The queues, by index.
    pub queues: Vec<(u16, GuestQueue)>,
}

/// Negotiates features and pokes configuration space as the input says,
/// then sets up queues (a subset of the device's, from a bit mask).
pub fn negotiate(
    device: &mut dyn VirtioDevice,
    mem: &GuestMemory,
    input: &mut Input<'_>,
) -> Driver {
    let offered = device.device_features();
    device.ack_features(offered & input.u64());
    for _ in 0..input.u8() % 4 {
        let op = input.u8();
        let offset = u64::from(input.u8());
        let mut data = vec![0u8; 1 << (op & 3)];
        if op & 4 == 4 {
            let bytes = input.take(data.len());
            data[..bytes.len()].copy_from_slice(bytes);
            device.write_config(offset, &data);
        } else {
            device.read_config(offset, &mut data);
        }
    }
    let sizes = device.queue_max_sizes().to_vec();
    let mask = input.u8() | 1;
    let mut queues = Vec::new();
    for (index, max) in sizes.iter().enumerate().take(usize::from(MAX_QUEUES)) {
        if mask & (1 << index) == 0 {
            continue;
        }
        if let Some(queue) = guest_queue(mem, input, index as u16, *max) {
            queues.push((index as u16, queue));
        }
    }
    Driver { queues }
}

/// How long a device gets to use the chains it was given.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Sets DRIVER_OK (activation), kicks every queue, waits until the queues
/// in `wait_on` have used every head made available on them (or the
/// device reported needs-reset, or [`SETTLE`] passed), then resets the
/// device as a driver would and reads its counters.
pub fn run(device: &mut dyn VirtioDevice, mem: &GuestMemory, driver: Driver, wait_on: &[u16]) {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let recorder = std::sync::Arc::new(Recorder::default());
    let mut watched = Vec::new();
    let mut queues = Vec::new();
    for (index, queue) in driver.queues {
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        kick.write(1).expect("kick");
        if wait_on.contains(&index) && queue.heads > 0 {
            watched.push((queue.used, queue.heads));
        }
        queues.push((index, queue.queue, kick));
    }
    let context = devices::virtio::ActivateContext {
        mem: mem.clone(),
        interrupt: recorder.clone(),
        queues,
    };
    if device.activate(context).is_ok() {
        let deadline = std::time::Instant::now() + SETTLE;
        while std::time::Instant::now() < deadline
            && !recorder
                .needs_reset
                .load(std::sync::atomic::Ordering::SeqCst)
            && watched.iter().any(|&(used, heads)| {
                mem.read_obj::<u16>(used.unchecked_add(2)).unwrap_or(heads) != heads
            })
        {
            std::thread::yield_now();
        }
    }
    let _ = device.reset();
    let _ = device.counters();
}
