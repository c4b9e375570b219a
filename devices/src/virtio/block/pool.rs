//! The I/O threads of one virtio-blk disk, shared by all its queues: a FIFO
//! of prepared requests served by `threads` threads (`blk-<id>-io<N>`),
//! each completing its request on the queue it came from (used ring,
//! EVENT_IDX-aware interrupt) as soon as it is done, so requests complete
//! out of order.
//!
//! FLUSH ordering: every request gets a ticket when it is queued; the
//! tickets of writes (OUT, DISCARD, WRITE_ZEROES) still running are kept,
//! and a FLUSH waits until no write with a smaller ticket runs, then
//! syncs. The FIFO hands requests out in ticket order, so every write a
//! FLUSH waits for already runs on another thread: the wait always ends.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(test)]
use std::thread;
use std::thread::JoinHandle;

use super::request::{self, Backend, Prepared, RequestKind};
use super::worker::QueueShared;
use crate::virtio::GuestMemory;

/// One request on its way through the pool.
struct Job {
    request: Prepared,
    head: u16,
    ticket: u64,
    queue: Arc<QueueShared>,
}

#[derive(Default)]
struct Jobs {
    waiting: VecDeque<Job>,
    next_ticket: u64,
    stopping: bool,
}

struct Shared {
    backend: Backend,
    jobs: Mutex<Jobs>,
    job_ready: Condvar,
    /// Tickets of the writes queued or running.
    writes: Mutex<BTreeSet<u64>>,
    write_done: Condvar,
}

/// The I/O threads of one disk; [`IoPool::stop`] joins them.
pub(crate) struct IoPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Queues requests on an [`IoPool`]; one per queue thread.
#[derive(Clone)]
pub(crate) struct Submitter {
    shared: Arc<Shared>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked cannot leave these structures inconsistent
    // (each update is a single push, pop or insert).
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl IoPool {
    /// Starts `threads` (at least one) I/O threads named `<name>-io<N>`.
    pub fn start(backend: Backend, threads: usize, name: &str) -> io::Result<IoPool> {
        let shared = Arc::new(Shared {
            backend,
            jobs: Mutex::new(Jobs::default()),
            job_ready: Condvar::new(),
            writes: Mutex::new(BTreeSet::new()),
            write_done: Condvar::new(),
        });
        let mut pool = IoPool {
            shared,
            threads: Vec::new(),
        };
        for n in 0..threads.max(1) {
            let shared = pool.shared.clone();
            let thread =
                crate::virtio::thread::spawn(format!("{name}-io{n}"), move || serve(&shared));
            match thread {
                Ok(thread) => pool.threads.push(thread),
                Err(e) => {
                    pool.stop();
                    return Err(e);
                }
            }
        }
        Ok(pool)
    }

    /// A handle that queues requests on the pool.
    pub fn submitter(&self) -> Submitter {
        Submitter {
            shared: self.shared.clone(),
        }
    }

    /// Lets the threads finish the queued requests, then joins them.
    pub fn stop(&mut self) {
        lock(&self.shared.jobs).stopping = true;
        self.shared.job_ready.notify_all();
        for thread in self.threads.drain(..) {
            // A panicked thread has nothing left to join.
            let _ = thread.join();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Submitter {
    /// The disk the pool serves.
    pub fn backend(&self) -> &Backend {
        &self.shared.backend
    }

    /// Runs `request` on the calling thread; a write is counted among
    /// the writes in flight meanwhile, so a FLUSH queued after it waits.
    pub fn run_inline(&self, request: &Prepared, mem: &GuestMemory) -> u32 {
        let ticket = (request.kind() == RequestKind::Write).then(|| {
            let mut jobs = lock(&self.shared.jobs);
            let ticket = jobs.next_ticket;
            jobs.next_ticket += 1;
            lock(&self.shared.writes).insert(ticket);
            ticket
        });
        let used_len = request::complete(request, mem, &self.shared.backend);
        if let Some(ticket) = ticket {
            lock(&self.shared.writes).remove(&ticket);
            self.shared.write_done.notify_all();
        }
        used_len
    }

    /// Queues `request` (head `head` of `queue`, already counted in its
    /// in-flight number) for the next free thread.
    pub fn submit(&self, queue: &Arc<QueueShared>, head: u16, request: Prepared) {
        let mut jobs = lock(&self.shared.jobs);
        let ticket = jobs.next_ticket;
        jobs.next_ticket += 1;
        if request.kind() == RequestKind::Write {
            lock(&self.shared.writes).insert(ticket);
        }
        jobs.waiting.push_back(Job {
            request,
            head,
            ticket,
            queue: queue.clone(),
        });
        drop(jobs);
        self.shared.job_ready.notify_one();
    }
}

/// An I/O thread: runs jobs until the pool stops and the FIFO is empty.
fn serve(shared: &Shared) {
    while let Some(job) = next_job(shared) {
        let kind = job.request.kind();
        if kind == RequestKind::Flush {
            wait_for_writes_before(shared, job.ticket);
        }
        let mem = job.queue.mem();
        let used_len = request::complete(&job.request, mem, &shared.backend);
        if kind == RequestKind::Write {
            lock(&shared.writes).remove(&job.ticket);
            shared.write_done.notify_all();
        }
        job.queue.finish(&[(job.head, used_len)]);
    }
}

fn next_job(shared: &Shared) -> Option<Job> {
    let mut jobs = lock(&shared.jobs);
    loop {
        if let Some(job) = jobs.waiting.pop_front() {
            return Some(job);
        }
        if jobs.stopping {
            return None;
        }
        jobs = shared
            .job_ready
            .wait(jobs)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
}

/// Blocks until every write queued before `ticket` has completed.
fn wait_for_writes_before(shared: &Shared, ticket: u64) {
    let mut writes = lock(&shared.writes);
    while writes.first().is_some_and(|&first| first < ticket) {
        writes = shared
            .write_done
            .wait(writes)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::virtio::block::testing::{backend_on, open_image, Image};

    /// A FLUSH with ticket 5 waits for the write with ticket 2, not for the
    /// one with ticket 7 queued after it.
    #[test]
    fn a_flush_waits_only_for_writes_queued_before_it() {
        let image = Image::new(1 << 20);
        let backend = backend_on(open_image(&image.path, false, None));
        let shared = Arc::new(Shared {
            backend,
            jobs: Mutex::new(Jobs::default()),
            job_ready: Condvar::new(),
            writes: Mutex::new(BTreeSet::from([2, 7])),
            write_done: Condvar::new(),
        });
        let released = Arc::new(AtomicBool::new(false));
        let flush = {
            let (shared, released) = (shared.clone(), released.clone());
            thread::spawn(move || {
                wait_for_writes_before(&shared, 5);
                released.store(true, Ordering::SeqCst);
            })
        };
        thread::sleep(Duration::from_millis(100));
        assert!(
            !released.load(Ordering::SeqCst),
            "flush passed a write before it"
        );
        lock(&shared.writes).remove(&2);
        shared.write_done.notify_all();
        flush.join().unwrap();
        assert!(released.load(Ordering::SeqCst));
        // Nothing before ticket 1: no wait at all.
        wait_for_writes_before(&shared, 1);
    }
}
