//! The interrupt relay, for queues whose interrupt has no irqfd to hand to
//! the backend ([`VirtioInterrupt::queue_eventfd`] returned `None`: the
//! driver assigned no MSI-X vector, or the vector was never routed). The
//! backend gets an eventfd of ours as its call eventfd, and a thread
//! (`fs-<id>-irq`) turns each write into [`VirtioInterrupt::trigger`].
//!
//! Trade-off: each interrupt then costs a wake-up of this thread and a
//! trip through the transport's MSI-X state, instead of going from the
//! backend straight into KVM. In exchange `trigger` handles masking
//! exactly (pending bits), and it works whatever the transport is. The
//! direct path is what a Linux guest gets: it routes and unmasks its
//! vectors before DRIVER_OK.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::{InterruptKind, VirtioInterrupt};

/// The relay thread; stopped and joined by [`Relay::stop`] or on drop.
pub(crate) struct Relay {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays each of `queues` (index, eventfd the backend writes) to
    /// `interrupt` on thread `name`, counting relayed interrupts in
    /// `relayed`.
    pub fn spawn(
        name: String,
        queues: Vec<(u16, EventFd)>,
        interrupt: Arc<dyn VirtioInterrupt>,
        relayed: Arc<AtomicU64>,
    ) -> io::Result<Relay> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let stop_token = queues.len() as u64;
        for (token, fd) in queues
            .iter()
            .map(|(_, event)| event.as_raw_fd())
            .chain([stop.as_raw_fd()])
            .enumerate()
        {
            let event = EpollEvent::new(EventSet::IN, token as u64);
            epoll.ctl(ControlOperation::Add, fd, event)?;
        }
        let thread = crate::virtio::thread::spawn(name, move || {
            let relay = RelayLoop {
                epoll,
                queues,
                stop_token,
                interrupt,
                relayed,
            };
            if let Err(e) = relay.run() {
                eprintln!("zvmm: virtio-fs interrupt relay stopped: {e}");
            }
        })?;
        Ok(Relay {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and joins the thread.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        // If the write fails the thread is gone already; join returns.
        let _ = self.stop.write(1);
        let _ = thread.join();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shut_down();
    }
}

struct RelayLoop {
    epoll: Epoll,
    queues: Vec<(u16, EventFd)>,
    stop_token: u64,
    interrupt: Arc<dyn VirtioInterrupt>,
    relayed: Arc<AtomicU64>,
}

impl RelayLoop {
    fn run(&self) -> io::Result<()> {
        let mut events = vec![EpollEvent::default(); self.queues.len() + 1];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for event in &events[..count] {
                if event.data() == self.stop_token {
                    return Ok(());
                }
                self.relay(event.data() as usize);
            }
        }
    }

    fn relay(&self, position: usize) {
        let Some((queue, event)) = self.queues.get(position) else {
            return;
        };
        if event.read().is_err() {
            // Spurious wake-up: nothing was written.
            return;
        }
        self.relayed.fetch_add(1, Ordering::Relaxed);
        // The transport counts undeliverable interrupts itself.
        let _ = self.interrupt.trigger(InterruptKind::Queue(*queue));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    use super::*;

    #[derive(Default)]
    struct Recording {
        raised: Mutex<Vec<InterruptKind>>,
        changed: Condvar,
    }

    impl VirtioInterrupt for Recording {
        fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
            self.raised.lock().unwrap().push(kind);
            self.changed.notify_all();
            Ok(())
        }
    }

    #[test]
    fn writes_become_triggers_of_their_queue() {
        let irq = Arc::new(Recording::default());
        let relayed = Arc::new(AtomicU64::new(0));
        let (hiprio, request) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        let backend_ends = (hiprio.try_clone().unwrap(), request.try_clone().unwrap());
        let relay = Relay::spawn(
            "test-irq".into(),
            vec![(0, hiprio), (1, request)],
            irq.clone(),
            relayed.clone(),
        )
        .unwrap();
        backend_ends.1.write(1).unwrap();
        let raised = irq.raised.lock().unwrap();
        let (raised, timeout) = irq
            .changed
            .wait_timeout_while(raised, Duration::from_secs(5), |r| r.is_empty())
            .unwrap();
        assert!(!timeout.timed_out());
        assert_eq!(*raised, vec![InterruptKind::Queue(1)]);
        drop(raised);
        relay.stop();
        assert_eq!(relayed.load(Ordering::Relaxed), 1);
        backend_ends.0.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(irq.raised.lock().unwrap().len(), 1, "stopped");
    }
}
