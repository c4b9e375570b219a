//! Test helpers for virtio-net: guest memory, descriptor chains on
//! `MockSplitQueue`s, a `SOCK_SEQPACKET` socket pair standing in for a tap
//! (one frame per message, like a tap fd), and an interrupt recorder.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::header::VNET_HDR_LEN;
pub use crate::virtio::testing::{descriptors, r, raw, w, Desc};
use crate::virtio::{GuestMemory, InterruptKind, VirtioInterrupt};

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

/// `len` bytes of a pattern that differs per `seed` and per position.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) | 1)
        .collect()
}

/// A frame: a zero virtio-net header, then `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0u8; VNET_HDR_LEN];
    bytes.extend_from_slice(payload);
    bytes
}

/// A connected, non-blocking `SOCK_SEQPACKET` pair: (device end, peer).
pub fn socket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socketpair fills the two-element array.
    let ret = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Sends one frame from the peer end.
pub fn send(peer: &OwnedFd, bytes: &[u8]) {
    // SAFETY: `bytes` is valid for reads of its length; the fd is open.
    let n = unsafe { libc::send(peer.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

/// The next frame at the peer end, if one arrives within `wait`.
pub fn receive(peer: &OwnedFd, wait: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 70_000];
    loop {
        // SAFETY: `buf` is valid for writes of its length; the fd is open.
        let n = unsafe { libc::recv(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Some(buf);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `body` on a thread in a fresh network namespace (needs root and
/// /dev/net/tun; fails with a clear message without them). The namespace
/// and every interface in it vanish when the thread ends.
pub fn in_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: these tests need the tun module"
    );
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) moves only this thread into a new
        // network namespace; no memory is involved.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET) failed: {} (these tests need root)",
            std::io::Error::last_os_error()
        );
        body()
    });
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// CPU time (user + system, in clock ticks) of this process's thread
/// named `name` (waiting up to 10 s for a new thread to take its name).
pub fn thread_cpu_ticks(name: &str) -> u64 {
    let mut ticks = None;
    wait_until(&format!("a thread named {name}"), || {
        ticks = find_thread_ticks(name);
        ticks.is_some()
    });
    ticks.unwrap_or_default()
}

fn find_thread_ticks(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).ok()?;
        // Fields after the parenthesised name: state is field 3, utime 14.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        return Some(field(11)? + field(12)?);
    }
    None
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
