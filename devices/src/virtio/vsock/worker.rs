//! The thread of one vsock device (`vsock-<id>`), alive as long as the
//! device: one epoll set over the listening socket, the host streams, a
//! wake eventfd for the device's commands and, while the driver has the
//! device active, the three queues' notification eventfds. Each wake-up
//! handles the host events, ends what is past its deadline, takes the
//! guest's packets from the transmit queue, fills receive buffers with
//! what the host side has for the guest, and interrupts the driver at most
//! once per queue. A ring the driver broke stops queue processing (the
//! host side stays served) and reports DEVICE_NEEDS_RESET.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::counters::{bump, VsockCounters};
use super::muxer::Muxer;
use super::proto::MAX_PAYLOAD;
use crate::virtio::{GuestMemory, InterruptKind, VirtioInterrupt};

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const EVENT_TOKEN: u64 = 2;
const WAKE_TOKEN: u64 = 3;

/// The worker stopped because of a host or ring failure.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// epoll set-up or wait failed.
    #[error("epoll failed")]
    Epoll(#[source] io::Error),
    /// The driver's rings are unusable.
    #[error("virtqueue broken by the driver")]
    Queue(#[from] virtio_queue::Error),
    /// Raising a queue interrupt failed.
    #[error("cannot raise the queue interrupt")]
    Interrupt(#[source] io::Error),
}

/// One queue handed over at activation.
pub(crate) struct QueueParts {
    /// Its index.
    pub index: u16,
    /// The queue.
    pub queue: Queue,
    /// Written by KVM on a kick.
    pub evt: EventFd,
    /// Buffers were used since the last interrupt.
    pub used: bool,
}

/// What the worker serves while the driver has the device active.
pub(crate) struct Active {
    /// Guest memory.
    pub mem: GuestMemory,
    /// Interrupt delivery.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The receive queue (device to guest).
    pub rx: QueueParts,
    /// The transmit queue (guest to device).
    pub tx: QueueParts,
    /// The event queue (never used: no transport resets to report).
    pub event: Option<QueueParts>,
}

/// What the device asks of its worker.
pub(crate) enum Command {
    /// Serve these queues (after dropping any earlier ones).
    Activate(Box<Active>),
    /// Stop serving the queues, drop every connection, hand the queue
    /// eventfds back.
    Deactivate(Sender<Vec<EventFd>>),
    /// End the thread.
    Stop,
}

/// The thread's state.
pub(crate) struct Worker {
    muxer: Muxer,
    commands: Receiver<Command>,
    wake: EventFd,
    active: Option<Active>,
    /// Eventfds of queues a broken ring took out of service.
    idle: Vec<EventFd>,
    counters: Arc<VsockCounters>,
    name: String,
}

impl Worker {
    /// A worker for `muxer`, taking commands after a write to `wake`.
    pub fn new(
        muxer: Muxer,
        commands: Receiver<Command>,
        wake: EventFd,
        counters: Arc<VsockCounters>,
    ) -> io::Result<Worker> {
        let event = EpollEvent::new(EventSet::IN, WAKE_TOKEN);
        muxer
            .epoll()
            .ctl(ControlOperation::Add, wake.as_raw_fd(), event)?;
        Ok(Worker {
            muxer,
            commands,
            wake,
            active: None,
            idle: Vec::new(),
            counters,
            name: String::new(),
        })
    }

    /// Starts the thread `name`.
    pub fn spawn(mut self, name: String) -> io::Result<JoinHandle<()>> {
        self.name = name.clone();
        crate::virtio::thread::spawn(name, move || self.run())
    }

    fn run(mut self) {
        if let Err(e) = self.event_loop() {
            let name = &self.name;
            eprintln!("zvmm: {name}: stopped: {e}");
            if let Some(active) = &self.active {
                active.interrupt.set_needs_reset();
            }
        }
    }

    fn event_loop(&mut self) -> Result<(), WorkerError> {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let timeout = self.muxer.next_deadline().map_or(-1, |deadline| {
                let left = deadline.saturating_duration_since(Instant::now());
                // Rounded up, so a wake-up never comes early.
                i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
            });
            let count = match self.muxer.epoll().wait(timeout, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::Epoll(e)),
            };
            for event in &events[..count] {
                match event.data() {
                    WAKE_TOKEN => {
                        let _ = self.wake.read();
                        if !self.take_commands() {
                            return Ok(());
                        }
                    }
                    RX_TOKEN | TX_TOKEN | EVENT_TOKEN => self.read_kick(event.data()),
                    token => self.muxer.on_host_event(token, event.event_set()),
                }
            }
            self.muxer.expire(Instant::now());
            if let Err(e) = self.serve_queues() {
                self.break_down(&e);
            }
        }
    }

    /// Applies the pending commands; false on `Stop`.
    fn take_commands(&mut self) -> bool {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Activate(active) => {
                    let evts = self.deactivate();
                    self.idle.extend(evts);
                    self.activate(*active);
                }
                Command::Deactivate(reply) => {
                    let evts = self.deactivate();
                    // The device stopped waiting only if it is gone.
                    let _ = reply.send(evts);
                }
                Command::Stop => return false,
            }
        }
        true
    }

    fn activate(&mut self, active: Active) {
        let mut parts = vec![(&active.rx, RX_TOKEN), (&active.tx, TX_TOKEN)];
        parts.extend(active.event.as_ref().map(|e| (e, EVENT_TOKEN)));
        for (part, token) in parts {
            let event = EpollEvent::new(EventSet::IN, token);
            let fd = part.evt.as_raw_fd();
            if self
                .muxer
                .epoll()
                .ctl(ControlOperation::Add, fd, event)
                .is_err()
            {
                active.interrupt.set_needs_reset();
            }
        }
        self.active = Some(active);
    }

    /// Drops the queues and every connection; returns the queue eventfds.
    fn deactivate(&mut self) -> Vec<EventFd> {
        self.muxer.reset_guest_side();
        let mut evts = std::mem::take(&mut self.idle);
        if let Some(active) = self.active.take() {
            let mut parts = vec![active.rx, active.tx];
            parts.extend(active.event);
            for part in parts {
                let fd = part.evt.as_raw_fd();
                let _ = self
                    .muxer
                    .epoll()
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                evts.push(part.evt);
            }
        }
        evts
    }

    fn read_kick(&mut self, token: u64) {
        let Some(active) = &self.active else {
            return;
        };
        let evt = match token {
            RX_TOKEN => &active.rx.evt,
            TX_TOKEN => &active.tx.evt,
            _ => match &active.event {
                Some(event) => &event.evt,
                None => return,
            },
        };
        // A failed read only means no kick is pending.
        let _ = evt.read();
    }

    /// A ring is broken: stop serving the queues until the driver resets
    /// the device.
    fn break_down(&mut self, error: &WorkerError) {
        let name = &self.name;
        eprintln!("zvmm: {name}: queues stopped: {error}; the device needs a reset");
        if let Some(active) = &self.active {
            active.interrupt.set_needs_reset();
        }
        let evts = self.deactivate();
        self.idle = evts;
    }

    /// Moves packets both ways until neither side can progress, then
    /// interrupts the driver where it wants it.
    fn serve_queues(&mut self) -> Result<(), WorkerError> {
        let Some(active) = &mut self.active else {
            return Ok(());
        };
        loop {
            let tx_waits = take_tx(active, &mut self.muxer, &self.counters)?;
            let delivered = fill_rx(active, &mut self.muxer, &self.counters)?;
            // Guest packets waited for resets to drain: go on if some did.
            if !(tx_waits && delivered && !self.muxer.backlogged()) {
                break;
            }
        }
        for part in [&mut active.rx, &mut active.tx] {
            if !std::mem::take(&mut part.used) || !part.queue.needs_notification(&active.mem)? {
                continue;
            }
            active
                .interrupt
                .trigger(InterruptKind::Queue(part.index))
                .map_err(WorkerError::Interrupt)?;
        }
        Ok(())
    }
}

/// Takes the guest's packets; returns true if some wait because resets
/// pile up.
fn take_tx(
    active: &mut Active,
    muxer: &mut Muxer,
    counters: &VsockCounters,
) -> Result<bool, WorkerError> {
    let Active { mem, tx, .. } = active;
    loop {
        if muxer.backlogged() {
            return Ok(true);
        }
        let chain = tx.queue.iter(&*mem)?.next();
        let Some(mut chain) = chain else {
            return Ok(false);
        };
        let head = chain.head_index();
        // A head index beyond the queue names no descriptor: the driver
        // broke the ring and would wait for that packet forever.
        if head >= tx.queue.size() {
            bump(&counters.tx_malformed, 1);
            return Err(virtio_queue::Error::InvalidDescriptorIndex.into());
        }
        match VsockPacket::from_tx_virtq_chain(&*mem, &mut chain, MAX_PAYLOAD) {
            Ok(packet) => muxer.on_guest_packet(&packet),
            Err(_) => bump(&counters.tx_malformed, 1),
        }
        tx.queue.add_used(&*mem, head, 0)?;
        tx.used = true;
    }
}

/// Fills receive buffers while the muxer has packets; returns whether
/// any was delivered.
fn fill_rx(
    active: &mut Active,
    muxer: &mut Muxer,
    counters: &VsockCounters,
) -> Result<bool, WorkerError> {
    let Active { mem, rx, .. } = active;
    let mut delivered = false;
    while muxer.has_rx() {
        let chain = rx.queue.iter(&*mem)?.next();
        let Some(mut chain) = chain else {
            break;
        };
        let head = chain.head_index();
        if head >= rx.queue.size() {
            bump(&counters.rx_bad_buffers, 1);
            return Err(virtio_queue::Error::InvalidDescriptorIndex.into());
        }
        let len = match VsockPacket::from_rx_virtq_chain(&*mem, &mut chain, MAX_PAYLOAD) {
            Ok(mut packet) => match muxer.fill_rx(&mut packet) {
                Some(len) => {
                    delivered = true;
                    len
                }
                None => {
                    rx.queue.go_to_previous_position();
                    break;
                }
            },
            Err(_) => {
                bump(&counters.rx_bad_buffers, 1);
                0
            }
        };
        rx.queue.add_used(&*mem, head, len)?;
        rx.used = true;
    }
    Ok(delivered)
}
