//! virtio-vsock in the hybrid scheme of Firecracker and cloud-hypervisor:
//! guest stream sockets reach host programs through Unix sockets.
//!
//! - [`device`]: [`Vsock`], the [`VirtioDevice`](crate::virtio::VirtioDevice)
//!   (rx, tx and event queues; `guest_cid` in configuration space).
//! - [`host`]: the listening socket `PATH` (stale sockets replaced, other
//!   files refused, mode 0600, removed with the device), the `CONNECT`
//!   line, non-blocking connects to `PATH_<port>`.
//! - [`proto`]: operations, flags and sizes of the wire protocol; packets
//!   themselves are parsed and built with rust-vmm's `virtio-vsock`.
//! - `connection`: one connection's state and credit accounting.
//! - `muxer`: routing between guest packets and host streams.
//! - `worker`: the device's thread.
//!
//! Host-initiated: a program connects to `PATH` and writes
//! `CONNECT <port>\n`; zvmm sends the guest a REQUEST for that port from
//! a fresh host port (2^30 and up), and on the guest's RESPONSE writes
//! `OK <host port>\n` to the program; from then on the stream carries the
//! connection's bytes both ways. A guest RST, no answer within 2 s (also
//! when the guest has no driver) or a bad line closes the program's
//! stream. Guest-initiated: a REQUEST for host port P connects to the Unix
//! socket `PATH_P` (RESPONSE), or is refused with RST when nobody listens.
//!
//! I/O model: one thread per device (`vsock-<id>`) for the device's whole
//! life, sleeping in `epoll_wait` on the listening socket, every host
//! stream, the queues' notification eventfds (ioeventfds KVM writes on a
//! kick) and a wake eventfd through which the device activates, resets
//! and stops it; a timeout covers the nearest deadline. Guest payload is
//! written to the host stream straight from guest memory, host data read
//! straight into the guest's receive buffer — and only when the guest has
//! credit and a buffer for it, so a slow guest leaves data in the host
//! stream's socket buffer (back-pressure to the host program) and a slow
//! host program leaves it in a per-connection buffer the guest's credit
//! bounds (256 KiB). Host streams are watched for reading only while no
//! unread data is known, so nothing spins. Each malformed guest packet is
//! dropped and counted, or answered with RST; resets waiting for receive
//! buffers are capped by pausing the transmit queue. `reset` drops every
//! connection and hands the queue eventfds back; dropping the device ends
//! the thread and removes the socket.

mod connection;
pub mod counters;
pub mod device;
pub mod host;
mod muxer;
pub mod proto;
mod worker;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

pub use counters::VsockCounters;
pub use device::{
    Vsock, VsockConfig, VsockError, MAX_GUEST_CID, MIN_GUEST_CID, QUEUE_SIZE, VSOCK_DEVICE_TYPE,
};
pub use host::SocketError;
pub use muxer::CONNECT_TIMEOUT;
pub use worker::WorkerError;
