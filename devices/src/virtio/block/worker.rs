//! The queue threads of one virtio-blk disk, one per queue the driver
//! enabled (`blk-<id>` for queue 0, `blk-<id>-q<N>` for the others): each
//! waits on its queue's notification eventfd and a stop eventfd, takes
//! requests off the available ring while fewer than the queue size are in
//! flight, and either runs them itself, one batch at a time (no I/O
//! threads: the serial service zvmm had before multiqueue), or completes
//! the reads the page cache holds at once (`preadv2(RWF_NOWAIT)`, a
//! memory copy that never waits for the device) and a lone read with
//! nothing else in flight, and hands every other request to the disk's
//! [`IoPool`](super::pool), whose threads complete them out of order
//! through [`QueueShared::finish`].
//!
//! A queue the driver broke (an available index running ahead of the
//! queue size, rings outside guest memory) stops being served and the
//! device asks for a reset (DEVICE_NEEDS_RESET); other queues go on.
//! Stopping (device reset, VM teardown) waits for the requests in flight
//! and returns nothing more to the used ring, so guest memory is not
//! touched once the device has stopped.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::pool::{lock, Submitter};
use super::request::{self, Backend, Prepared, RequestKind};
use crate::virtio::{GuestMemory, InterruptKind, VirtioInterrupt};

const QUEUE_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;

/// The worker stopped processing because of a host or ring failure.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// epoll set-up or wait failed.
    #[error("epoll failed")]
    Epoll(#[source] io::Error),
    /// The driver's rings are unusable (e.g. an available index that
    /// runs ahead of the queue size, or rings outside guest memory).
    #[error("virtqueue broken by the driver")]
    Queue(#[source] virtio_queue::Error),
    /// An available entry names a descriptor beyond the queue: there is
    /// no chain to complete, and the driver would wait for it forever.
    #[error("available entry names descriptor {0}, beyond the queue")]
    HeadOutOfRange(u16),
    /// Raising the queue interrupt failed.
    #[error("cannot raise the queue interrupt")]
    Interrupt(#[source] io::Error),
}

/// Requests in flight on a queue and whether it is stopping.
#[derive(Default)]
struct Flow {
    in_flight: usize,
    stopping: bool,
}

/// One queue, shared by its queue thread and the I/O threads completing
/// its requests.
pub(crate) struct QueueShared {
    queue: Mutex<Queue>,
    index: u16,
    name: String,
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// Most requests in flight (the queue size).
    limit: usize,
    flow: Mutex<Flow>,
    flow_changed: Condvar,
    broken: AtomicBool,
}

impl QueueShared {
    /// Queue `index` (named `name` in messages) of a device.
    pub fn new(
        (index, queue): (u16, Queue),
        name: String,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> QueueShared {
        QueueShared {
            limit: usize::from(queue.size()).max(1),
            queue: Mutex::new(queue),
            index,
            name,
            mem,
            interrupt,
            flow: Mutex::new(Flow::default()),
            flow_changed: Condvar::new(),
            broken: AtomicBool::new(false),
        }
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// Returns finished requests (head, used length) on the used ring and
    /// interrupts the driver if it wants one; nothing is returned once the
    /// queue is stopping or broken.
    pub fn finish(&self, done: &[(u16, u32)]) {
        let stopping = lock(&self.flow).stopping;
        if !stopping && !self.broken.load(Ordering::Acquire) {
            if let Err(e) = self.return_used(done) {
                self.mark_broken(&e);
            }
        }
        let mut flow = lock(&self.flow);
        flow.in_flight = flow.in_flight.saturating_sub(done.len());
        drop(flow);
        self.flow_changed.notify_all();
    }

    fn return_used(&self, done: &[(u16, u32)]) -> Result<(), WorkerError> {
        let mut queue = lock(&self.queue);
        for &(head, used_len) in done {
            queue
                .add_used(&self.mem, head, used_len)
                .map_err(WorkerError::Queue)?;
        }
        if queue
            .needs_notification(&self.mem)
            .map_err(WorkerError::Queue)?
        {
            drop(queue);
            self.interrupt
                .trigger(InterruptKind::Queue(self.index))
                .map_err(WorkerError::Interrupt)?;
        }
        Ok(())
    }

    /// Stops serving the queue and asks the driver for a device reset.
    fn mark_broken(&self, error: &WorkerError) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            eprintln!("zvmm: {}: queue {} stopped: {error}", self.name, self.index);
            self.interrupt.set_needs_reset();
        }
        self.flow_changed.notify_all();
    }

    /// Room for more requests: blocks while `limit` are in flight; `None`
    /// once stopping or broken.
    fn wait_for_room(&self) -> Option<usize> {
        let mut flow = lock(&self.flow);
        loop {
            if flow.stopping || self.broken.load(Ordering::Acquire) {
                return None;
            }
            if flow.in_flight < self.limit {
                return Some(self.limit - flow.in_flight);
            }
            flow = self
                .flow_changed
                .wait(flow)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Takes up to `room` requests off the available ring and counts them
    /// in flight; an empty batch means the ring is empty and notifications
    /// are enabled again.
    fn pop(&self, room: usize) -> Result<Vec<(u16, Prepared)>, WorkerError> {
        let mut queue = lock(&self.queue);
        let mut batch = Vec::new();
        loop {
            queue
                .disable_notification(&self.mem)
                .map_err(WorkerError::Queue)?;
            while batch.len() < room {
                let chain = queue.iter(&self.mem).map_err(WorkerError::Queue)?.next();
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                if head >= queue.size() {
                    // The queue is broken: the device needs a reset, and
                    // the requests taken with this one are dropped.
                    return Err(WorkerError::HeadOutOfRange(head));
                }
                batch.push((head, request::prepare(chain, &self.mem)));
            }
            if !batch.is_empty()
                || !queue
                    .enable_notification(&self.mem)
                    .map_err(WorkerError::Queue)?
            {
                break;
            }
        }
        drop(queue);
        lock(&self.flow).in_flight += batch.len();
        Ok(batch)
    }

    /// Requests taken off the ring and not yet finished.
    fn in_flight(&self) -> usize {
        lock(&self.flow).in_flight
    }

    /// Asks the queue thread to stop taking requests.
    pub fn request_stop(&self) {
        lock(&self.flow).stopping = true;
        self.flow_changed.notify_all();
    }

    /// Blocks until no request of this queue is in flight.
    pub fn wait_idle(&self) {
        let mut flow = lock(&self.flow);
        while flow.in_flight > 0 {
            flow = self
                .flow_changed
                .wait(flow)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// Who runs the requests a queue thread takes.
pub(crate) enum Executor {
    /// The queue thread itself, one batch at a time.
    Inline(Backend),
    /// The disk's I/O threads.
    Pool(Submitter),
}

/// Everything one queue thread owns.
pub(crate) struct Worker {
    /// The queue.
    pub shared: Arc<QueueShared>,
    /// Written by KVM when the driver kicks the queue.
    pub queue_evt: EventFd,
    /// Written by the device to stop the thread.
    pub stop_evt: EventFd,
    /// Who runs the requests.
    pub executor: Executor,
    /// Whether likely-fast requests run on this thread.
    pub lane: Lane,
}

impl Worker {
    /// Starts the thread `name`; it returns the queue eventfd when stopped.
    pub fn spawn(self, name: String) -> io::Result<JoinHandle<EventFd>> {
        crate::virtio::thread::spawn(name, move || self.run())
    }

    fn run(mut self) -> EventFd {
        if let Err(e) = self.event_loop() {
            self.shared.mark_broken(&e);
        }
        self.queue_evt
    }

    fn event_loop(&mut self) -> Result<(), WorkerError> {
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        for (fd, token) in [
            (self.queue_evt.as_raw_fd(), QUEUE_TOKEN),
            (self.stop_evt.as_raw_fd(), STOP_TOKEN),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(WorkerError::Epoll)?;
        }
        let mut events = [EpollEvent::default(); 2];
        // Requests may have been queued before the driver's first kick.
        while self.dispatch()? {
            let count = match epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::Epoll(e)),
            };
            let ready = &events[..count];
            if ready.iter().any(|e| e.data() == STOP_TOKEN) {
                return Ok(());
            }
            if ready.iter().any(|e| e.data() == QUEUE_TOKEN) {
                // A failed read only means no kick is pending.
                let _ = self.queue_evt.read();
            }
        }
        Ok(())
    }

    /// Takes and starts requests until the ring is empty (`true`) or the
    /// queue stops (`false`).
    fn dispatch(&mut self) -> Result<bool, WorkerError> {
        loop {
            let Some(room) = self.shared.wait_for_room() else {
                return Ok(false);
            };
            let batch = self.shared.pop(room)?;
            if batch.is_empty() {
                return Ok(true);
            }
            match &self.executor {
                Executor::Inline(backend) => {
                    let mem = self.shared.mem();
                    let done: Vec<(u16, u32)> = batch
                        .iter()
                        .map(|(head, req)| (*head, request::complete(req, mem, backend)))
                        .collect();
                    self.shared.finish(&done);
                }
                Executor::Pool(pool) => {
                    let pool = pool.clone();
                    self.dispatch_pooled(&pool, batch);
                }
            }
        }
    }

    /// Runs on this thread what is known or likely to be fast, hands the
    /// rest to the pool, and returns what completed here.
    fn dispatch_pooled(&mut self, pool: &Submitter, batch: Vec<(u16, Prepared)>) {
        let mem = self.shared.mem();
        let backend = pool.backend();
        // A lone read with nothing else in flight gains nothing from
        // another thread but the hand-over's latency.
        let alone = batch.len() == 1 && self.shared.in_flight() == 1;
        let mut done = Vec::new();
        for (head, req) in batch {
            if let Some(used_len) = request::try_complete_cached(&req, mem, backend) {
                done.push((head, used_len));
                continue;
            }
            let kind = req.kind();
            // Whether a raw read would wait is known (it did not come from
            // the page cache); for writes and qcow2 reads only the lane
            // guesses.
            let known_slow = kind == RequestKind::Read && backend.disk.reads_nowait();
            let inline = match kind {
                RequestKind::Other => true,
                RequestKind::Flush => false,
                RequestKind::Read if alone => true,
                _ => !known_slow && self.lane.open(),
            };
            if inline {
                let start = Instant::now();
                done.push((head, pool.run_inline(&req, mem)));
                if kind != RequestKind::Other {
                    self.lane.record(start.elapsed());
                }
            } else {
                self.lane.passed();
                pool.submit(&self.shared, head, req);
            }
        }
        if !done.is_empty() {
            self.shared.finish(&done);
        }
    }
}

/// Whether the queue thread runs requests it cannot know to be fast (a
/// write, a qcow2 read) itself: yes while they have been, each within
/// [`Lane::FAST`]; after a slower one, the next [`Lane::REPROBE`] go to
/// the pool. Requests served from the page cache cost less than handing
/// them to another thread; requests that wait for the device must not
/// hold up the queue.
#[derive(Debug, Default)]
pub(crate) struct Lane {
    shut_for: u32,
}

impl Lane {
    /// Longest a request run on the queue thread may take to keep the
    /// lane open (a page-cache copy takes a few microseconds).
    const FAST: Duration = Duration::from_micros(50);
    /// Requests sent to the pool before the lane is tried again.
    const REPROBE: u32 = 64;

    fn open(&self) -> bool {
        self.shut_for == 0
    }

    fn record(&mut self, took: Duration) {
        if took > Self::FAST {
            self.shut_for = Self::REPROBE;
        }
    }

    fn passed(&mut self) {
        self.shut_for = self.shut_for.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::testing::{memory, HEADER, STATUS};
    use crate::virtio::testing::{mock_queue, r, raw, w, RecordingInterrupt};
    use vm_memory::{Address, Bytes};

    /// Completions in any order land on the used ring in that order, each
    /// once; EVENT_IDX decides the interrupts; nothing is returned once
    /// stopping.
    #[test]
    fn out_of_order_completions_fill_the_used_ring_in_completion_order() {
        let mem = memory();
        let vq = mock_queue(&mem, 0, 16);
        let chains: Vec<_> = (0..4u16)
            .flat_map(|n| {
                let descs = [r(HEADER, 16), w(STATUS + u64::from(n), 1)];
                raw(&descs, n * 2)
            })
            .collect();
        vq.add_desc_chains(&chains, 0);
        let mut queue = vq.create_queue();
        queue.set_event_idx(true);
        let irq = Arc::new(RecordingInterrupt::default());
        let shared = QueueShared::new((3, queue), "t".to_string(), mem.clone(), irq.clone());
        let batch = shared.pop(16).unwrap();
        let heads: Vec<u16> = batch.iter().map(|(head, _)| *head).collect();
        assert_eq!(heads, [0, 2, 4, 6]);
        assert_eq!(lock(&shared.flow).in_flight, 4);
        // used_event is 0: the first completion interrupts, the next not.
        shared.finish(&[(4, 1)]);
        shared.finish(&[(0, 1)]);
        assert_eq!(irq.raised(), [InterruptKind::Queue(3)]);
        // The driver asks for an interrupt after the third.
        let used_event = vq.vq.avail_addr().unchecked_add(4 + 2 * 16);
        mem.write_obj(2u16, used_event).unwrap();
        shared.finish(&[(6, 7)]);
        assert_eq!(irq.raised().len(), 2);
        assert_eq!(vq.used_idx(), 3);
        let used: Vec<(u32, u32)> = (0..3).map(|i| vq.used_elem(i)).collect();
        assert_eq!(used, [(4, 1), (0, 1), (6, 7)]);
        // Stopping: the last one is counted done but not returned.
        shared.request_stop();
        shared.finish(&[(2, 1)]);
        assert_eq!(vq.used_idx(), 3);
        assert_eq!(lock(&shared.flow).in_flight, 0);
        shared.wait_idle();
        assert_eq!(shared.wait_for_room(), None);
    }

    #[test]
    fn the_lane_shuts_after_a_slow_request_and_reopens_later() {
        let mut lane = Lane::default();
        assert!(lane.open());
        lane.record(Duration::from_micros(5));
        assert!(lane.open());
        lane.record(Duration::from_millis(2));
        for _ in 0..Lane::REPROBE {
            assert!(!lane.open());
            lane.passed();
        }
        assert!(lane.open());
    }

    #[test]
    fn pop_stops_at_the_room_left() {
        let mem = memory();
        let vq = mock_queue(&mem, 0, 16);
        let chains: Vec<_> = (0..5u16)
            .flat_map(|n| raw(&[r(HEADER, 16), w(STATUS, 1)], n * 2))
            .collect();
        vq.add_desc_chains(&chains, 0);
        let irq = Arc::new(RecordingInterrupt::default());
        let shared = QueueShared::new((0, vq.create_queue()), "t".into(), mem.clone(), irq);
        assert_eq!(shared.pop(2).unwrap().len(), 2);
        assert_eq!(shared.wait_for_room(), Some(14));
        assert_eq!(shared.pop(8).unwrap().len(), 3);
        assert!(shared.pop(8).unwrap().is_empty());
        assert_eq!(lock(&shared.flow).in_flight, 5);
    }
}
