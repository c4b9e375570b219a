//! virtio-fs (device type 26) as a vhost-user frontend: a host directory
//! shared with the guest by a vhost-user backend such as virtiofsd, which
//! serves the FUSE requests on the rings itself.
//!
//! - [`config`]: [`FsConfig`], the tag and queue checks, the configuration
//!   space (`tag[36]`, `le32 num_request_queues`) and the feature offer.
//! - [`device`]: [`Fs`], the [`VirtioDevice`](crate::virtio::VirtioDevice).
//! - `frontend`: the vhost-user connection (negotiation, memory table,
//!   rings), on the `vhost` crate's `Frontend`.
//! - `watcher`: notices a backend that dies or stops answering.
//! - `relay`: turns backend interrupts into `trigger` calls when a queue
//!   has no irqfd.
//!
//! Data path: zvmm is not on it. At DRIVER_OK the device hands the backend
//! the guest memory regions (the memfd behind `--memory shared=on`, with
//! offsets; anonymous memory is refused), and per queue its size, ring
//! addresses, the kick eventfd (KVM's ioeventfd: a guest kick wakes the
//! backend directly) and the call eventfd (the queue's MSI-X irqfd from
//! [`VirtioInterrupt::queue_eventfd`](crate::virtio::VirtioInterrupt::queue_eventfd):
//! the backend interrupts the guest through KVM). Queues without an irqfd
//! get a relay thread instead (slower; see `relay`).
//!
//! Negotiation at [`Fs::new`]: SET_OWNER, GET_FEATURES (VERSION_1 and
//! PROTOCOL_FEATURES required; the guest is offered what the backend has
//! of VERSION_1, EVENT_IDX and INDIRECT_DESC), GET/SET_PROTOCOL_FEATURES
//! (MQ, REPLY_ACK and RESET_DEVICE when offered; no CONFIG, the tag is
//! ours; no BACKEND_REQ, so no DAX window), GET_QUEUE_NUM (refusing more
//! request queues than the backend serves; without MQ it serves one).
//!
//! Reset: SET_VRING_ENABLE 0 and GET_VRING_BASE on each queue (the backend
//! stops the ring), RESET_DEVICE when negotiated, and the kick eventfds go
//! back to the transport; the next DRIVER_OK activates again on the same
//! connection (features, memory table and rings sent anew).
//!
//! Backend loss: the watcher thread polls the socket for hang-up. A
//! backend that exits or closes the socket, or that takes longer than
//! [`REPLY_TIMEOUT`] to answer an activation or reset, is reported once
//! through [`FsConfig::on_backend_lost`] with a one-line message (e.g.
//! `virtio-fs fs0: backend /run/zvmm/fs0.sock closed the connection`),
//! called from the watcher thread or the vCPU thread that drove the
//! device: it must not block on the device; the VMM typically records a
//! stop reason. The device then fails every activation ("backend is
//! gone"). It never reconnects: virtiofsd serves one connection and exits
//! after it.
//!
//! Counters ([`VirtioDevice::counters`](crate::virtio::VirtioDevice::counters)):
//! `fs_activations`, `fs_activation_failures`, `fs_resets`,
//! `fs_backend_errors` (failed requests and the loss of the backend) and
//! `fs_relayed_interrupts` (interrupts that took the relay).

pub mod config;
pub mod device;
mod frontend;
mod relay;
mod watcher;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

pub use config::{
    BackendLostCallback, FsConfig, CONFIG_SIZE, DEFAULT_QUEUE_SIZE, FS_DEVICE_TYPE, MAX_QUEUE_SIZE,
    MAX_REQUEST_QUEUES, TAG_LEN,
};
pub use device::{Fs, FsError};
pub use frontend::REPLY_TIMEOUT;
