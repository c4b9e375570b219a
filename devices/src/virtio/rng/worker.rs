//! The thread of one virtio-rng device: waits on the queue's notification
//! eventfd and a stop eventfd (and on the source while it has nothing to
//! give), fills each available chain from the source and returns it on
//! the used ring, then interrupts the driver if it wants one.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryBackend, Permissions, ReadVolatile, VolatileSlice};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{bump, RngCounters, MAX_REQUEST_BYTES};
use crate::virtio::{GuestMemory, InterruptKind, VirtioInterrupt};

const QUEUE: u64 = 0;
const STOP: u64 = 1;
const SOURCE: u64 = 2;

/// The worker stopped because of a host or ring failure.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// epoll set-up or wait failed.
    #[error("epoll failed")]
    Epoll(#[source] io::Error),
    /// The driver's rings are unusable.
    #[error("virtqueue broken by the driver")]
    Queue(#[from] virtio_queue::Error),
    /// Raising the queue interrupt failed.
    #[error("cannot raise the queue interrupt")]
    Interrupt(#[source] io::Error),
}

/// Whether the queue was drained or waits for the source.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// No chain left.
    Drained,
    /// The source has nothing yet; chains wait.
    SourceEmpty,
}

/// What became of one chain.
enum Fill {
    /// Filled with this many bytes (0 at the source's end).
    Done(u32),
    /// Out of spec: returned empty.
    Invalid,
    /// The source has nothing yet: the chain goes back to wait.
    SourceEmpty,
}

/// Everything the thread owns while the device is active.
pub(crate) struct Worker {
    /// The request queue.
    pub queue: Queue,
    /// Its index, for the interrupt.
    pub index: u16,
    /// Written by KVM when the driver kicks the queue.
    pub queue_evt: EventFd,
    /// Written by the device to stop the thread.
    pub stop_evt: EventFd,
    /// Guest memory.
    pub mem: GuestMemory,
    /// Interrupt delivery.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The entropy source, non-blocking.
    pub source: File,
    /// Shared with the device.
    pub counters: Arc<RngCounters>,
}

impl Worker {
    /// Starts the thread `name`; it returns the queue eventfd when stopped.
    pub fn spawn(self, name: String) -> io::Result<JoinHandle<EventFd>> {
        crate::virtio::thread::spawn(name.clone(), move || self.run(&name))
    }

    fn run(mut self, name: &str) -> EventFd {
        if let Err(e) = self.event_loop() {
            eprintln!("zvmm: {name}: stopped: {e}; the device needs a reset");
            self.interrupt.set_needs_reset();
        }
        self.queue_evt
    }

    fn event_loop(&mut self) -> Result<(), WorkerError> {
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        for (fd, token) in [
            (self.queue_evt.as_raw_fd(), QUEUE),
            (self.stop_evt.as_raw_fd(), STOP),
        ] {
            watch(&epoll, ControlOperation::Add, fd, token)?;
        }
        let mut watching_source = false;
        let mut events = [EpollEvent::default(); 3];
        // Requests may have been queued before the driver's first kick.
        let mut progress = self.process_queue()?;
        loop {
            let want_source = progress == Progress::SourceEmpty;
            if want_source != watching_source {
                let op = if want_source {
                    ControlOperation::Add
                } else {
                    ControlOperation::Delete
                };
                watch(&epoll, op, self.source.as_raw_fd(), SOURCE)?;
                watching_source = want_source;
            }
            let count = match epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::Epoll(e)),
            };
            let ready = &events[..count];
            if ready.iter().any(|e| e.data() == STOP) {
                return Ok(());
            }
            if ready.iter().any(|e| e.data() == QUEUE) {
                // A failed read only means no kick is pending.
                let _ = self.queue_evt.read();
            }
            progress = self.process_queue()?;
        }
    }

    /// Fills every available chain until the ring is empty or the source
    /// has nothing yet, and interrupts the driver if it asked for it.
    pub(crate) fn process_queue(&mut self) -> Result<Progress, WorkerError> {
        let Worker {
            queue,
            mem,
            source,
            counters,
            ..
        } = self;
        let mut used = false;
        let progress = loop {
            let chain = queue.iter(&*mem)?.next();
            let Some(chain) = chain else {
                break Progress::Drained;
            };
            let head = chain.head_index();
            // A head index beyond the queue names no descriptor: the driver
            // broke the ring and would wait for that request forever.
            if head >= queue.size() {
                bump(&counters.invalid_requests, 1);
                return Err(WorkerError::Queue(
                    virtio_queue::Error::InvalidDescriptorIndex,
                ));
            }
            let len = match fill(source, counters, mem, chain) {
                Fill::Done(len) => {
                    bump(&counters.requests, 1);
                    bump(&counters.bytes, u64::from(len));
                    len
                }
                Fill::Invalid => {
                    bump(&counters.invalid_requests, 1);
                    0
                }
                Fill::SourceEmpty => {
                    queue.go_to_previous_position();
                    break Progress::SourceEmpty;
                }
            };
            queue.add_used(&*mem, head, len)?;
            used = true;
        };
        if used && self.queue.needs_notification(&self.mem)? {
            self.interrupt
                .trigger(InterruptKind::Queue(self.index))
                .map_err(WorkerError::Interrupt)?;
        }
        Ok(progress)
    }
}

/// Fills `chain`'s buffers from `source`.
fn fill(
    source: &mut File,
    counters: &RngCounters,
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> Fill {
    let Some(buffers) = writable_buffers(mem, chain) else {
        return Fill::Invalid;
    };
    let mut written = 0usize;
    for mut slice in buffers {
        match read_into(source, &mut slice) {
            Ok(0) => {
                bump(&counters.source_ends, 1);
                break;
            }
            Ok(n) => {
                written += n;
                if n < slice.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && written == 0 => {
                return Fill::SourceEmpty;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => {
                bump(&counters.source_errors, 1);
                break;
            }
        }
    }
    // At most MAX_REQUEST_BYTES.
    Fill::Done(written as u32)
}

fn watch(epoll: &Epoll, op: ControlOperation, fd: i32, token: u64) -> Result<(), WorkerError> {
    epoll
        .ctl(op, fd, EpollEvent::new(EventSet::IN, token))
        .map_err(WorkerError::Epoll)
}

/// One `read` of the source into `slice`, retried on EINTR.
fn read_into(source: &mut File, slice: &mut VolatileSlice<'_>) -> io::Result<usize> {
    loop {
        match source.read_volatile(slice) {
            Err(vm_memory::VolatileMemoryError::IOError(e))
                if e.kind() == io::ErrorKind::Interrupted => {}
            Err(vm_memory::VolatileMemoryError::IOError(e)) => return Err(e),
            Err(e) => return Err(io::Error::other(e)),
            Ok(n) => return Ok(n),
        }
    }
}

/// The guest memory of `chain`'s buffers, up to [`MAX_REQUEST_BYTES`];
/// `None` when the chain is out of spec: a device-readable descriptor, a
/// loop or a dangling next index, a buffer outside guest memory, or no
/// device-writable byte at all.
fn writable_buffers<'m>(
    mem: &'m GuestMemory,
    chain: DescriptorChain<&'m GuestMemory>,
) -> Option<Vec<VolatileSlice<'m>>> {
    let mut slices = Vec::new();
    let mut budget = MAX_REQUEST_BYTES as usize;
    let mut total = 0u64;
    let mut dangling = false;
    for desc in chain {
        dangling = desc.has_next();
        let len = desc.len() as usize;
        if !desc.is_write_only()
            || !vm_memory::GuestMemory::check_range(mem, desc.addr(), len, Permissions::Write)
        {
            return None;
        }
        total += u64::from(desc.len());
        let take = len.min(budget);
        if take == 0 {
            continue;
        }
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), take) {
            slices.push(slice.ok()?);
        }
        budget -= take;
    }
    (!dangling && total > 0).then_some(slices)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;
    use crate::virtio::rng::testing::*;

    fn worker(mem: &GuestMemory, queue: &TestQueue<'_>, source: File) -> Worker {
        Worker {
            queue: queue.create_queue(),
            index: 0,
            queue_evt: eventfd(),
            stop_evt: eventfd(),
            mem: mem.clone(),
            interrupt: Arc::new(RecordingInterrupt::default()),
            source,
            counters: Arc::default(),
        }
    }

    fn urandom() -> File {
        File::open("/dev/urandom").unwrap()
    }

    #[test]
    fn buffers_are_filled_from_the_source() {
        let mem = memory();
        let queue = mock_queue(&mem, 0, 16);
        queue.add_desc_chains(&raw(&[w(DATA, 100), w(DATA + 0x1000, 28)], 0), 0);
        let mut worker = worker(&mem, &queue, urandom());
        assert_eq!(worker.process_queue().unwrap(), Progress::Drained);
        assert_eq!(queue.used_idx(), 1);
        assert_eq!(queue.used_elem(0), (0, 128));
        // 128 random bytes are not all zero (probability 2^-1024).
        assert!(bytes_at(&mem, DATA, 100).iter().any(|b| *b != 0));
        assert!(bytes_at(&mem, DATA + 0x1000, 28).iter().any(|b| *b != 0));
        let counters = worker.counters.snapshot();
        assert!(counters.contains(&("requests", 1)));
        assert!(counters.contains(&("bytes", 128)));
    }

    #[test]
    fn a_request_gets_at_most_the_bound() {
        let mem = memory();
        let queue = mock_queue(&mem, 0, 16);
        let big = MAX_REQUEST_BYTES + 4096;
        queue.add_desc_chains(&raw(&[w(DATA, big)], 0), 0);
        let mut worker = worker(&mem, &queue, urandom());
        worker.process_queue().unwrap();
        assert_eq!(queue.used_elem(0), (0, MAX_REQUEST_BYTES));
        let beyond = bytes_at(&mem, DATA + u64::from(MAX_REQUEST_BYTES), 4096);
        assert!(beyond.iter().all(|b| *b == 0), "written past the bound");
    }

    #[test]
    fn out_of_spec_chains_are_returned_empty_and_counted() {
        let mem = memory();
        let queue = mock_queue(&mem, 0, 16);
        let mut descs = raw(&[r(DATA, 64)], 0);
        descs.extend(raw(&[w(DATA, 64), r(DATA + 0x100, 64)], 1));
        descs.extend(raw(&[w(MEM_SIZE as u64 - 16, 64)], 3));
        descs.extend(raw(&[w(DATA, 0)], 4));
        // Last (the mock splits chains at descriptors without NEXT): a
        // descriptor that points back at itself.
        descs.extend([set_next(raw(&[w(DATA, 64)], 5)[0], 5)]);
        queue.add_desc_chains(&descs, 0);
        let mut worker = worker(&mem, &queue, urandom());
        assert_eq!(worker.process_queue().unwrap(), Progress::Drained);
        assert_eq!(queue.used_idx(), 5);
        for i in 0..5 {
            assert_eq!(queue.used_elem(i).1, 0, "chain {i}");
        }
        assert!(bytes_at(&mem, DATA, 64).iter().all(|b| *b == 0));
        assert!(worker
            .counters
            .snapshot()
            .contains(&("invalid_requests", 5)));
    }

    #[test]
    fn a_file_source_gives_its_bytes_then_nothing() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/zvmm-rng-").unwrap();
        let path = dir.as_path().join("seed");
        std::fs::write(&path, b"0123456789").unwrap();
        let mem = memory();
        let queue = mock_queue(&mem, 0, 16);
        let mut descs = raw(&[w(DATA, 8)], 0);
        descs.extend(raw(&[w(DATA + 0x100, 8)], 1));
        descs.extend(raw(&[w(DATA + 0x200, 8)], 2));
        queue.add_desc_chains(&descs, 0);
        let mut worker = worker(&mem, &queue, File::open(&path).unwrap());
        worker.process_queue().unwrap();
        assert_eq!(queue.used_elem(0), (0, 8));
        assert_eq!(queue.used_elem(1), (1, 2));
        assert_eq!(queue.used_elem(2), (2, 0));
        assert_eq!(bytes_at(&mem, DATA, 8), b"01234567");
        assert_eq!(bytes_at(&mem, DATA + 0x100, 2), b"89");
        assert!(worker.counters.snapshot().contains(&("source_ends", 1)));
    }

    #[test]
    fn an_empty_fifo_makes_the_request_wait_for_data() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/zvmm-rng-").unwrap();
        let path = dir.as_path().join("fifo");
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path and touches no memory of ours.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let mut writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mem = memory();
        let queue = mock_queue(&mem, 0, 16);
        queue.add_desc_chains(&raw(&[w(DATA, 16)], 0), 0);
        let interrupt = Arc::new(RecordingInterrupt::default());
        let mut worker = worker(&mem, &queue, reader);
        worker.interrupt = interrupt.clone();
        let stop = worker.stop_evt.try_clone().unwrap();
        let thread = worker.spawn("rng-test".into()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(queue.used_idx(), 0, "answered before the source had data");
        writer.write_all(b"entropy!").unwrap();
        interrupt.wait_for(InterruptKind::Queue(0), 1);
        assert_eq!(queue.used_elem(0), (0, 8));
        assert_eq!(bytes_at(&mem, DATA, 8), b"entropy!");
        stop.write(1).unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn a_head_index_beyond_the_queue_breaks_the_ring() {
        let mem = memory();
        let queue = mock_queue(&mem, 0, 16);
        queue.add_desc_chains(&raw(&[w(DATA, 64)], 0), 0);
        queue.set_avail_entry(0, 200);
        let mut worker = worker(&mem, &queue, urandom());
        let result = worker.process_queue();
        assert!(
            matches!(
                result,
                Err(WorkerError::Queue(
                    virtio_queue::Error::InvalidDescriptorIndex
                ))
            ),
            "{result:?}"
        );
        assert_eq!(queue.used_idx(), 0);
    }

    #[test]
    fn a_broken_ring_stops_the_worker_and_asks_for_a_reset() {
        let mem = memory();
        let queue = mock_queue(&mem, 0, 16);
        queue.set_avail_idx(100);
        let interrupt = Arc::new(RecordingInterrupt::default());
        let mut worker = worker(&mem, &queue, urandom());
        worker.interrupt = interrupt.clone();
        let thread = worker.spawn("rng-test".into()).unwrap();
        thread.join().unwrap();
        assert!(interrupt.needs_reset());
    }
}
