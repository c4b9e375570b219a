//! The thread of one queue pair (`net-<id>-<pair>`): an epoll loop over
//! the tap queue, the receive and transmit queues' notification eventfds,
//! a stop eventfd, a wake eventfd (the active pair count changed) and, on
//! pair 0, the control queue. Each wake-up handles what is ready, then
//! interrupts the driver at most once per queue (EVENT_IDX aware).
//!
//! The tap is watched only while the guest has receive buffers: with
//! none (or too few for the frame already read, which stays pending) the
//! worker stops watching it and arms the receive queue's kick instead, so
//! nothing spins and no frame is lost. Transmit and receive work are
//! bounded per wake-up (one ring's worth), so neither starves the other.
//! A ring the driver broke stops the worker and marks the device as
//! needing a reset.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::counters::{bump, PairCounters};
use super::ctrl::{Ctrl, Pairs};
use super::rx::{Delivery, Rx};
use super::tap::TapQueue;
use super::tx::Tx;
use crate::virtio::{GuestMemory, InterruptKind, VirtioInterrupt};

const TAP: u64 = 0;
const RX_QUEUE: u64 = 1;
const TX_QUEUE: u64 = 2;
const CTRL_QUEUE: u64 = 3;
const STOP: u64 = 4;
const WAKE: u64 = 5;

/// The worker stopped because of a host or ring failure.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// epoll set-up or wait failed.
    #[error("epoll failed")]
    Epoll(#[source] io::Error),
    /// The driver's rings are unusable.
    #[error("virtqueue broken by the driver")]
    Queue(#[source] virtio_queue::Error),
    /// Raising a queue interrupt failed.
    #[error("cannot raise the queue interrupt")]
    Interrupt(#[source] io::Error),
}

impl From<virtio_queue::Error> for WorkerError {
    fn from(error: virtio_queue::Error) -> Self {
        WorkerError::Queue(error)
    }
}

/// What every worker of a device shares.
pub(crate) struct Shared {
    /// Guest memory.
    pub mem: GuestMemory,
    /// Interrupt delivery (and the needs-reset report).
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Counters, one entry per pair.
    pub counters: Arc<[PairCounters]>,
    /// The active pair count.
    pub pairs: Arc<Pairs>,
}

/// One queue pair's queues, host side and eventfds.
pub(crate) struct PairSetup {
    /// The pair's number.
    pub pair: u16,
    /// Receive queue and its notification eventfd.
    pub rx: (Rx, EventFd),
    /// Transmit queue and its notification eventfd.
    pub tx: (Tx, EventFd),
    /// The control queue (pair 0 only).
    pub ctrl: Option<(Ctrl, EventFd)>,
    /// The tap queue of this pair.
    pub tap: Arc<TapQueue>,
    /// Readable when the device stops.
    pub stop: EventFd,
    /// Written when the active pair count changes.
    pub wake: EventFd,
}

/// Everything the thread of one queue pair owns.
pub(crate) struct Worker {
    /// The thread's name, for messages.
    name: String,
    pair: u16,
    rx: Rx,
    rx_evt: EventFd,
    tx: Tx,
    tx_evt: EventFd,
    ctrl: Option<(Ctrl, EventFd)>,
    tap: Arc<TapQueue>,
    /// Kept open while registered in `epoll`.
    _stop: EventFd,
    wake: EventFd,
    shared: Shared,
    epoll: Epoll,
    active: bool,
    tap_watched: bool,
    tap_broken: bool,
    tx_backlog: bool,
}

impl Worker {
    /// A worker for `setup`, with its epoll set registered.
    pub fn new(setup: PairSetup, shared: Shared) -> io::Result<Self> {
        let PairSetup {
            pair,
            rx: (rx, rx_evt),
            tx: (tx, tx_evt),
            ctrl,
            tap,
            stop,
            wake,
        } = setup;
        let epoll = Epoll::new()?;
        let mut fds = vec![
            (rx_evt.as_raw_fd(), RX_QUEUE),
            (tx_evt.as_raw_fd(), TX_QUEUE),
            (stop.as_raw_fd(), STOP),
            (wake.as_raw_fd(), WAKE),
        ];
        if let Some((_, evt)) = &ctrl {
            fds.push((evt.as_raw_fd(), CTRL_QUEUE));
        }
        for (fd, token) in fds {
            let event = EpollEvent::new(EventSet::IN, token);
            epoll.ctl(ControlOperation::Add, fd, event)?;
        }
        Ok(Worker {
            name: String::new(),
            pair,
            rx,
            rx_evt,
            tx,
            tx_evt,
            ctrl,
            tap,
            _stop: stop,
            wake,
            shared,
            epoll,
            active: false,
            tap_watched: false,
            tap_broken: false,
            tx_backlog: false,
        })
    }

    /// Starts the thread `name`; it returns the queue eventfds when stopped.
    pub fn spawn(mut self, name: String) -> io::Result<JoinHandle<Vec<EventFd>>> {
        self.name = name.clone();
        crate::virtio::thread::spawn(name, move || self.run())
    }

    fn run(mut self) -> Vec<EventFd> {
        if let Err(e) = self.event_loop() {
            let name = &self.name;
            eprintln!("zvmm: {name}: stopped: {e}; the device needs a reset");
            self.shared.interrupt.set_needs_reset();
        }
        let mut evts = vec![self.rx_evt, self.tx_evt];
        evts.extend(self.ctrl.map(|(_, evt)| evt));
        evts
    }

    fn event_loop(&mut self) -> Result<(), WorkerError> {
        // Buffers and frames may have been queued before the first kick.
        self.sync_active()?;
        self.handle(true, true, true)?;
        let mut events = [EpollEvent::default(); 6];
        loop {
            let timeout = if self.tx_backlog { 0 } else { -1 };
            let count = match self.epoll.wait(timeout, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::Epoll(e)),
            };
            let ready = &events[..count];
            if ready.iter().any(|e| e.data() == STOP) {
                return Ok(());
            }
            let (mut rx, mut tx, mut ctrl) = (false, self.tx_backlog, false);
            for event in ready {
                // A failed eventfd read only means no kick is pending.
                match event.data() {
                    TAP => rx = true,
                    RX_QUEUE => rx = self.rx_evt.read().is_ok() || rx,
                    TX_QUEUE => tx = self.tx_evt.read().is_ok() || tx,
                    CTRL_QUEUE => ctrl = true,
                    WAKE => {
                        let _ = self.wake.read();
                        self.sync_active()?;
                        rx = true;
                    }
                    _ => {}
                }
            }
            self.handle(rx, tx, ctrl)?;
        }
    }

    /// Runs the ready work, then interrupts the driver where it asked.
    fn handle(&mut self, rx: bool, tx: bool, ctrl: bool) -> Result<(), WorkerError> {
        let mem = &self.shared.mem;
        if ctrl {
            if let Some((ctrl, evt)) = &mut self.ctrl {
                let _ = evt.read();
                ctrl.process(mem, &self.shared.pairs)?;
            }
        }
        if tx {
            let counters = &self.shared.counters[usize::from(self.pair)];
            let budget = usize::from(self.tx.queue.size());
            self.tx_backlog = self.tx.process(mem, &self.tap, counters, budget)?;
        }
        if rx {
            self.process_rx()?;
        }
        self.signal()
    }

    /// Follows the active pair count: an inactive pair's tap queue is
    /// detached (the kernel steers nothing to it) and its pending frame
    /// dropped.
    fn sync_active(&mut self) -> Result<(), WorkerError> {
        let active = self.pair < self.shared.pairs.active();
        let all = Arc::clone(&self.shared.counters);
        let counters = &all[usize::from(self.pair)];
        if self.tap.set_attached(active).is_err() {
            bump(&counters.rx_errors, 1);
        }
        if active == self.active {
            return Ok(());
        }
        self.active = active;
        if !active {
            self.watch_tap(false)?;
            if self.rx.take_pending() {
                bump(&counters.rx_dropped, 1);
            }
        }
        Ok(())
    }

    /// Moves frames from the tap into the receive queue while the guest
    /// has buffers, at most a ring's worth per call.
    fn process_rx(&mut self) -> Result<(), WorkerError> {
        if !self.active || self.tap_broken {
            return Ok(());
        }
        let mem = &self.shared.mem;
        if self.rx.armed() {
            self.rx.disarm(mem)?;
        }
        let budget = usize::from(self.rx.queue.size());
        let mut frames = 0;
        let all = Arc::clone(&self.shared.counters);
        let counters = &all[usize::from(self.pair)];
        loop {
            if !self.rx.has_pending() {
                if frames == budget {
                    // The tap stays watched: epoll comes straight back.
                    return self.watch_tap(true);
                }
                if !self.rx.has_buffers(&self.shared.mem)? {
                    if self.wait_for_buffers()? {
                        continue;
                    }
                    return Ok(());
                }
                match self.tap.read(self.rx.buffer_mut()) {
                    Ok(len) => self.rx.set_pending(len),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return self.watch_tap(true);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        bump(&counters.rx_errors, 1);
                        return self.tap_failed(&e);
                    }
                }
                frames += 1;
            }
            match self.rx.deliver(&self.shared.mem, counters)? {
                Delivery::Delivered | Delivery::Dropped => {}
                Delivery::NeedBuffers => {
                    if !self.wait_for_buffers()? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Stops watching the tap and arms the receive queue's kick; returns
    /// true if buffers arrived meanwhile (retry instead of sleeping).
    fn wait_for_buffers(&mut self) -> Result<bool, WorkerError> {
        self.watch_tap(false)?;
        let mem = &self.shared.mem;
        let posted = self.rx.arm(mem)?;
        if posted {
            self.rx.disarm(mem)?;
        }
        Ok(posted)
    }

    /// A tap read failed for good (e.g. the interface was deleted):
    /// receiving stops until the device is reset.
    fn tap_failed(&mut self, error: &io::Error) -> Result<(), WorkerError> {
        let name = &self.name;
        eprintln!("zvmm: {name}: tap read failed: {error}; receive stopped until reset");
        self.tap_broken = true;
        self.watch_tap(false)
    }

    fn watch_tap(&mut self, watch: bool) -> Result<(), WorkerError> {
        if watch == self.tap_watched {
            return Ok(());
        }
        let fd = self.tap.as_raw_fd();
        let (op, events) = if watch {
            (ControlOperation::Add, EventSet::IN)
        } else {
            (ControlOperation::Delete, EventSet::empty())
        };
        self.epoll
            .ctl(op, fd, EpollEvent::new(events, TAP))
            .map_err(WorkerError::Epoll)?;
        self.tap_watched = watch;
        Ok(())
    }

    /// Interrupts the driver for each queue with new used entries, if it
    /// wants one.
    fn signal(&mut self) -> Result<(), WorkerError> {
        let Worker {
            rx,
            tx,
            ctrl,
            shared,
            ..
        } = self;
        let mut queues: [Option<(&mut Queue, &mut bool, u16)>; 3] = [
            Some((&mut rx.queue, &mut rx.used, rx.index)),
            Some((&mut tx.queue, &mut tx.used, tx.index)),
            ctrl.as_mut()
                .map(|(c, _)| (&mut c.queue, &mut c.used, c.index)),
        ];
        for (queue, used, index) in queues.iter_mut().flatten() {
            if !std::mem::take(*used) || !queue.needs_notification(&shared.mem)? {
                continue;
            }
            shared
                .interrupt
                .trigger(InterruptKind::Queue(*index))
                .map_err(WorkerError::Interrupt)?;
        }
        Ok(())
    }
}
