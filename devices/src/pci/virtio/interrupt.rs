//! Interrupt delivery of a virtio-pci function: the [`VirtioInterrupt`]
//! handed to the device at activation. It maps the configuration interrupt
//! to the `msix_config` vector and queue `i` to that queue's vector, sets
//! the ISR bits, and raises the vector through the function's MSI-X state
//! (which holds back masked vectors as pending). Shared between the
//! transport (vCPU threads) and the device's own threads; never takes the
//! PCI root's lock. A device whose backend lives in another process gets a
//! queue's irqfd instead ([`VirtioInterrupt::queue_eventfd`]).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use crate::pci::msix::{Msix, MsixError};
use crate::virtio::{InterruptKind, VirtioInterrupt};

/// "No vector" for `msix_config` and `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;
/// ISR bit: a queue interrupt (only without MSI-X).
pub const ISR_QUEUE: u8 = 0x1;
/// ISR bit: a configuration change.
pub const ISR_CONFIG: u8 = 0x2;

/// The interrupt state a virtio-pci function shares with its device.
pub struct InterruptState {
    msix: Mutex<Msix>,
    /// Size of the MSI-X table.
    vectors: u16,
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    config_generation: AtomicU8,
    /// The device reported it needs a reset while running.
    needs_reset: AtomicBool,
}

impl InterruptState {
    /// State for `queues` queues raising vectors of `msix`, all vectors
    /// unassigned.
    pub fn new(msix: Msix, queues: u16) -> Self {
        InterruptState {
            vectors: msix.vectors(),
            msix: Mutex::new(msix),
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            config_generation: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    /// The function's MSI-X state, locked.
    pub fn msix(&self) -> MutexGuard<'_, Msix> {
        self.msix
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `vector` if the MSI-X table has it, else [`NO_VECTOR`] (what the
    /// driver reads back when a vector cannot be used).
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.vectors {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// The configuration-change vector.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    /// Sets the configuration-change vector (invalid: [`NO_VECTOR`]).
    pub fn set_config_vector(&self, vector: u16) {
        let vector = self.checked_vector(vector);
        self.config_vector.store(vector, Ordering::Release);
    }

    /// The vector of `queue` ([`NO_VECTOR`] for an unknown queue).
    pub fn queue_vector(&self, queue: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(queue))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    /// Sets the vector of `queue` (invalid: [`NO_VECTOR`]).
    pub fn set_queue_vector(&self, queue: u16, vector: u16) {
        let vector = self.checked_vector(vector);
        if let Some(slot) = self.queue_vectors.get(usize::from(queue)) {
            slot.store(vector, Ordering::Release);
        }
    }

    /// Reads and clears the ISR status.
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    /// The configuration generation counter.
    pub fn config_generation(&self) -> u8 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Device reset: vectors unassigned, ISR clear, irqfds handed out
    /// forgotten.
    pub fn reset(&self) {
        self.msix().release_irqfds();
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for vector in &self.queue_vectors {
            vector.store(NO_VECTOR, Ordering::Release);
        }
        self.isr.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    /// Whether the device reported, since the last reset, that it needs one.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }
}

impl VirtioInterrupt for InterruptState {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let mut msix = self.msix();
        let vector = match kind {
            InterruptKind::Config => {
                self.config_generation.fetch_add(1, Ordering::AcqRel);
                self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
                self.config_vector()
            }
            InterruptKind::Queue(queue) => {
                if usize::from(queue) >= self.queue_vectors.len() {
                    let message = format!("interrupt for unknown virtio queue {queue}");
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
                }
                if !msix.enabled() {
                    self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
                }
                self.queue_vector(queue)
            }
        };
        if vector == NO_VECTOR {
            return Ok(());
        }
        msix.trigger(vector).map_err(|error| match error {
            MsixError::Signal { source, .. } => source,
            other => io::Error::new(io::ErrorKind::InvalidInput, other),
        })
    }

    fn queue_eventfd(&self, queue: u16) -> Option<EventFd> {
        let vector = self.queue_vector(queue);
        if vector == NO_VECTOR {
            return None;
        }
        self.msix().irqfd(vector)
    }

    fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            // Nothing more can be done if the vector cannot be raised; the
            // driver still sees the status bit when it next reads it.
            let _ = self.trigger(InterruptKind::Config);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pci::msix::tests::{RecordingRouter, RouterEvent};
    use crate::pci::msix::MSIX_CONTROL_ENABLE;

    fn state(vectors: u16, queues: u16) -> (InterruptState, Arc<RecordingRouter>) {
        let router = Arc::new(RecordingRouter::default());
        let msix = Msix::new(vectors, router.clone()).unwrap();
        (InterruptState::new(msix, queues), router)
    }

    fn enable_all(state: &InterruptState) {
        let mut msix = state.msix();
        msix.set_control(MSIX_CONTROL_ENABLE);
        for vector in 0..u64::from(msix.vectors()) {
            msix.write_table(vector * 16 + 12, &[0, 0, 0, 0]);
        }
    }

    #[test]
    fn vectors_out_of_the_table_read_back_as_no_vector() {
        let (state, _) = state(2, 2);
        state.set_config_vector(1);
        state.set_queue_vector(0, 2);
        state.set_queue_vector(1, 0);
        state.set_queue_vector(7, 0);
        assert_eq!(state.config_vector(), 1);
        assert_eq!(state.queue_vector(0), NO_VECTOR);
        assert_eq!(state.queue_vector(1), 0);
        assert_eq!(state.queue_vector(7), NO_VECTOR);
        state.reset();
        assert_eq!(
            (state.config_vector(), state.queue_vector(1)),
            (NO_VECTOR, NO_VECTOR)
        );
    }

    #[test]
    fn kinds_map_to_their_vectors_and_isr_bits() {
        let (state, router) = state(3, 2);
        enable_all(&state);
        router.take();
        state.set_config_vector(0);
        state.set_queue_vector(1, 2);
        state.trigger(InterruptKind::Queue(1)).unwrap();
        state.trigger(InterruptKind::Config).unwrap();
        state.trigger(InterruptKind::Queue(0)).unwrap();
        assert_eq!(
            router.take(),
            vec![RouterEvent::Signal(2), RouterEvent::Signal(0)],
            "queue 0 has no vector"
        );
        assert_eq!(state.take_isr(), ISR_CONFIG, "no queue bit with msi-x on");
        assert_eq!(state.take_isr(), 0, "read clears");
        assert_eq!(state.config_generation(), 1);
        assert!(state.trigger(InterruptKind::Queue(2)).is_err());
    }

    #[test]
    fn without_msix_only_the_isr_is_set() {
        let (state, router) = state(3, 1);
        state.set_queue_vector(0, 1);
        state.trigger(InterruptKind::Queue(0)).unwrap();
        assert_eq!(state.take_isr(), ISR_QUEUE);
        assert_eq!(router.take(), vec![]);
    }

    #[test]
    fn queue_eventfds_are_the_vectors_irqfds() {
        let (state, router) = state(3, 2);
        let irqfd = router.add_irqfd(2);
        state.set_queue_vector(0, 2);
        assert!(state.queue_eventfd(1).is_none(), "queue 1 has no vector");
        assert!(state.queue_eventfd(5).is_none(), "no such queue");
        state.queue_eventfd(0).unwrap().write(1).unwrap();
        assert_eq!(irqfd.read().unwrap(), 1);
        state.set_queue_vector(1, 1);
        assert!(state.queue_eventfd(1).is_none(), "vector 1 has no irqfd");
    }

    #[test]
    fn router_failures_surface_as_io_errors() {
        let (state, router) = state(1, 1);
        enable_all(&state);
        state.set_queue_vector(0, 0);
        router.set_failing(true);
        let error = state.trigger(InterruptKind::Queue(0)).unwrap_err();
        assert_eq!(error.to_string(), "router failure");
    }
}
