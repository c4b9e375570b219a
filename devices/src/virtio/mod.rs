//! Virtio devices, independent of the transport: the [`VirtioDevice`]
//! trait that a transport (virtio-pci) drives through feature
//! negotiation, configuration space and activation, and the
//! [`VirtioInterrupt`] a device raises towards the driver.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Feature bit: the device complies with virtio 1.x (VIRTIO_F_VERSION_1).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Which interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device configuration changed.
    Config,
    /// Buffers were used on this queue.
    Queue(u16),
}

/// Delivers device interrupts to the driver (MSI-X vectors on PCI).
pub trait VirtioInterrupt: Send + Sync {
    /// Raises `kind`; must not block.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
    /// A duplicate of the eventfd that raises queue `queue`'s interrupt
    /// without zvmm (an MSI-X vector's KVM irqfd), for a backend in another
    /// process to signal directly; `None` when there is none (no vector,
    /// vector never routed): then use [`VirtioInterrupt::trigger`].
    fn queue_eventfd(&self, _queue: u16) -> Option<EventFd> {
        None
    }
    /// Reports that the device stopped working until the driver resets
    /// it (e.g. a ring the driver broke): the transport sets
    /// DEVICE_NEEDS_RESET and raises the configuration interrupt. A
    /// transport without that status bit has nothing to report it with.
    fn set_needs_reset(&self) {}
}

/// Activation failed; the transport sets DEVICE_NEEDS_RESET / FAILED.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up queues the device can't use.
    #[error("bad queue setup: {0}")]
    BadQueue(String),
    /// A host resource (thread, eventfd, file) could not be set up.
    #[error("cannot start the device backend")]
    Backend(#[source] std::io::Error),
}

/// What a transport hands a device when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemory,
    /// Interrupt delivery.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The queues the driver enabled, in index order, with their
    /// notification eventfds (ioeventfds written by KVM on a kick).
    pub queues: Vec<(u16, Queue, EventFd)>,
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block, 1 = net, 26 = fs).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (VERSION_1 included).
    fn device_features(&self) -> u64;
    /// The features the driver accepted (a subset of the offer).
    fn ack_features(&mut self, features: u64);
    /// Reads device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts processing the queues (driver set DRIVER_OK).
    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError>;
    /// Stops processing and forgets negotiated state (driver reset);
    /// returns the queue eventfds handed over at activation, if any.
    fn reset(&mut self) -> Vec<EventFd>;
    /// Per-device counters (requests, bytes, errors) for `vm.counters`.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Copies `data.len()` bytes of a read-only configuration space from
/// `offset`; bytes past its end (or at an absurd offset) read as zero.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Refuses activation when a queue's rings are not usable in `mem`. The
/// virtio-pci transport checks this before activating; devices check again
/// because nothing else stands between them and a caller that skips it.
pub fn check_queues(
    device: &str,
    queues: &[(u16, Queue, EventFd)],
    mem: &GuestMemory,
) -> Result<(), ActivateError> {
    use virtio_queue::QueueT;
    match queues.iter().find(|(_, queue, _)| !queue.is_valid(mem)) {
        Some((index, _, _)) => Err(ActivateError::BadQueue(format!(
            "{device} queue {index}: rings outside guest memory or misaligned"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod testing;

pub mod block;
pub mod fs;
pub mod net;
pub mod rng;
pub mod thread;
pub mod vsock;
