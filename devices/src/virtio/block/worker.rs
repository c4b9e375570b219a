//! The I/O thread of one virtio-blk disk: waits on the queue's notification
//! eventfd and a stop eventfd, drains the available ring, runs each
//! request synchronously and returns it on the used ring, then interrupts
//! the driver when the queue says it wants one (EVENT_IDX aware).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, Backend};
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
    /// Raising the queue interrupt failed.
    #[error("cannot raise the queue interrupt")]
    Interrupt(#[source] io::Error),
}

/// Everything the I/O thread owns while the device is active.
pub(crate) struct Worker {
    /// The one request queue.
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
    /// Disk, id and counters.
    pub backend: Backend,
}

impl Worker {
    /// Starts the thread `name`; it returns the queue eventfd when stopped.
    pub fn spawn(self, name: String) -> io::Result<JoinHandle<EventFd>> {
        thread::Builder::new()
            .name(name.clone())
            .spawn(move || self.run(&name))
    }

    fn run(mut self, name: &str) -> EventFd {
        if let Err(e) = self.event_loop() {
            eprintln!("zvmm: {name}: stopped: {e}");
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
        // Requests may have been queued before the driver's first kick.
        self.process_queue()?;
        let mut events = [EpollEvent::default(); 2];
        loop {
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
                self.process_queue()?;
            }
        }
    }

    /// Runs every available request, re-checking after re-enabling
    /// notifications, and interrupts the driver if it asked for it.
    pub(crate) fn process_queue(&mut self) -> Result<(), WorkerError> {
        loop {
            self.queue
                .disable_notification(&self.mem)
                .map_err(WorkerError::Queue)?;
            self.drain()?;
            if !self
                .queue
                .enable_notification(&self.mem)
                .map_err(WorkerError::Queue)?
            {
                break;
            }
        }
        if self
            .queue
            .needs_notification(&self.mem)
            .map_err(WorkerError::Queue)?
        {
            self.interrupt
                .trigger(InterruptKind::Queue(self.index))
                .map_err(WorkerError::Interrupt)?;
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), WorkerError> {
        loop {
            let chain = self
                .queue
                .iter(&self.mem)
                .map_err(WorkerError::Queue)?
                .next();
            let Some(chain) = chain else {
                return Ok(());
            };
            let head = chain.head_index();
            let used_len = request::process(chain, &self.mem, &self.backend);
            // A head index beyond the queue names no descriptor; there is
            // nothing to return for it.
            if head < self.queue.size() {
                self.queue
                    .add_used(&self.mem, head, used_len)
                    .map_err(WorkerError::Queue)?;
            }
        }
    }
}
