//! virtio-rng (entropy device, type 4) fed from a host file.
//!
//! - [`device`]: [`Rng`], the [`VirtioDevice`](crate::virtio::VirtioDevice):
//!   one request queue, no configuration space, the source opened and
//!   checked when the device is built (a character device such as
//!   `/dev/urandom`, a FIFO or a regular file).
//! - `worker`: the thread that fills the guest's buffers.
//!
//! I/O model: one thread per device (`rng-<id>`), started on activation.
//! It sleeps in `epoll_wait` on the queue's notification eventfd (which
//! the transport writes on a kick: no ioeventfd is registered for this
//! queue, so a VM's teardown does not wait for KVM to drop one) and a stop
//! eventfd. Each available chain
//! must be device-writable only; its buffers are filled with `read`s from
//! the source straight into guest memory, at most
//! [`MAX_REQUEST_BYTES`] per chain, and the chain is returned with the
//! count written. The source is read without blocking: when it has nothing
//! yet (an empty FIFO) the chain waits and the source joins the epoll set
//! until it is readable, so a slow source never stalls a stop. At the
//! source's end (a regular file read through, a FIFO without writer) a
//! chain is returned with what it got, possibly nothing; Linux's hwrng
//! core then sleeps before asking again. Chains out of spec (a
//! device-readable buffer, a loop, a buffer outside guest memory) are
//! returned empty and counted. `reset` stops and joins the thread and
//! hands the queue eventfd back.

pub mod device;
mod worker;

#[cfg(test)]
pub(crate) mod testing;

pub use device::{Rng, RngConfig, RngCounters, RngError, MAX_REQUEST_BYTES, QUEUE_SIZE};
pub use worker::WorkerError;
