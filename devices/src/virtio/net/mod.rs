//! virtio-net on a host tap device.
//!
//! - [`tap`]: the host side — opening, creating or adopting a tap on
//!   `/dev/net/tun` (one fd per queue pair) and its ioctls.
//! - [`device`]: [`Net`], the [`VirtioDevice`](crate::virtio::VirtioDevice)
//!   with its feature offer, configuration space and queue layout (rx0,
//!   tx0, rx1, tx1, ..., ctrl last).
//! - [`header`]: the 12-byte virtio-net header, transmit header checks and
//!   the receive offloads mirrored onto the tap.
//! - `rx`, `tx`, `ctrl`: receiving into posted buffers (with or without
//!   MRG_RXBUF), transmitting chains, answering the control queue.
//! - `worker`: the thread of one queue pair.
//!
//! I/O model: one thread per queue pair (`net-<id>-<pair>`), started on
//! activation. It sleeps in `epoll_wait` on its tap queue's fd, the
//! receive and transmit queues' notification eventfds (ioeventfds KVM
//! writes on a kick, so a kick costs no exit to userspace), a stop eventfd,
//! a wake eventfd and, on pair 0, the control queue's eventfd.
//!
//! - Transmit: each chain is checked and written to the tap with one
//!   `writev` straight from guest memory; notifications are off while the
//!   ring is drained and re-enabled (EVENT_IDX: `avail_event`) after it.
//! - Receive: a frame is read from the tap with one `read` into a
//!   per-worker 64 KiB buffer only when the guest has posted buffers, then
//!   copied into them (spanning chains with MRG_RXBUF). With no room the
//!   worker stops watching the tap, keeps the frame it holds, and arms the
//!   receive queue's kick; the kick brings it back. The tap's own queue
//!   absorbs (and past its length drops) what arrives meanwhile, so a guest
//!   that stops reading stalls neither transmit nor the VMM.
//! - Interrupts are raised once per queue per wake-up, when EVENT_IDX (or
//!   its absence) says the driver wants one.
//! - Multiqueue (VIRTIO_NET_F_MQ): the control queue's VQ_PAIRS_SET sets
//!   how many pairs are active; the tap queues of the others are detached
//!   (`TUNSETQUEUE`) so the kernel steers nothing to them.
//!
//! Per frame the only system call is the tap `read` or `writev`; per
//! wake-up, the eventfd reads, the interrupts and `epoll_wait`. The costs
//! left are the receive copy (a zero-copy `readv` into guest buffers
//! would need the frame's size before choosing buffers) and one thread per
//! pair. A ring the driver breaks stops that pair's worker and reports
//! DEVICE_NEEDS_RESET through
//! [`VirtioInterrupt::set_needs_reset`](crate::virtio::VirtioInterrupt::set_needs_reset).
//! `reset` stops and joins the workers and hands the queue eventfds back.

mod counters;
mod ctrl;
pub mod device;
pub mod header;
mod rx;
pub mod tap;
mod tx;
mod worker;

#[cfg(test)]
mod testing;

pub use counters::PairCounters;
pub use device::{
    format_mac, Net, NetConfig, NetError, DEFAULT_QUEUE_SIZE, MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE,
    MIN_QUEUE_SIZE, NET_DEVICE_TYPE,
};
pub use tap::{TapError, TapOrigin, TapSet};
pub use worker::WorkerError;
