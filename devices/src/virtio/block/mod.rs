//! virtio-blk on raw images, qcow2 images and block devices.
//!
//! - [`format`](mod@format): what an image file holds, by its magic numbers (raw,
//!   qcow2, VMDK, VHD, VHDX, ISO 9660, ...), its size and backing file.
//! - [`image`]: [`DiskImage`], which format an image is served as (the
//!   refusals, the sector-0 guard) and the one interface requests use.
//! - [`disk`]: raw files and block devices — open, lock, size, vectored
//!   I/O, flush, discard, write-zeroes.
//! - [`qcow2`]: qcow2 images and their backing chains through imago.
//! - [`request`]: parsing, validating and running one request.
//! - [`device`]: [`Block`], the [`VirtioDevice`](crate::virtio::VirtioDevice)
//!   with its feature offer and configuration space.
//! - `worker`: the queue threads; `pool`: the disk's I/O threads.
//!
//! I/O model: one queue thread per queue the driver enabled (`blk-<id>`,
//! `blk-<id>-q<N>`), started on activation, and a pool of I/O threads per
//! disk (`blk-<id>-io<N>`, 8 by default) shared by its queues. A queue
//! thread sleeps in `epoll_wait` on the queue's notification eventfd (an
//! ioeventfd KVM signals on a kick, so a kick costs no VM exit to
//! userspace) and a stop eventfd, then takes requests off the available
//! ring while fewer than the queue size are in flight. A read whose bytes
//! the page cache holds it completes at once (`preadv2(RWF_NOWAIT)`: a
//! memory copy that never waits for the device), a lone read with
//! nothing else in flight, and writes and qcow2 reads while they stay
//! fast (`worker::Lane`); everything else goes to the pool, whose
//! threads run it with one synchronous `preadv`/`pwritev` straight between
//! the file and guest memory (a qcow2 request through imago, which splits
//! it at cluster boundaries) and complete it on its queue as soon as it is
//! done: out of order, each completion interrupting the driver when
//! EVENT_IDX says it is wanted. A FLUSH waits for every write queued
//! before it on any queue of the disk, then syncs. `io_threads=0` keeps
//! the serial service zvmm had before: the queue thread runs every request
//! itself, one at a time. Why a thread pool and not io_uring: qcow2 goes
//! through imago's synchronous API, which needs threads anyway; on raw
//! images the page-cache fast path already serves hot data without a
//! thread hop, and what is left — requests that wait for the device —
//! overlaps as well on 8 threads as in a ring at the depths guests use
//! (see `docs/DESIGN.md` for the measurements). `reset` stops the queue
//! threads, waits for the requests in flight (returning none of them to
//! the used ring), joins the pool and hands the queue eventfds back.

pub mod device;
pub mod disk;
pub mod format;
pub mod image;
mod pool;
pub mod qcow2;
pub mod request;
mod worker;

#[cfg(test)]
mod mq_tests;
#[cfg(test)]
mod testing;

pub use device::{
    Block, BlockConfig, BlockError, BLOCK_DEVICE_TYPE, IO_THREADS, MAX_IO_THREADS, MAX_QUEUES,
    MAX_QUEUE_SIZE, MIN_QUEUE_SIZE, QUEUE_SIZE,
};
pub use disk::{DiskError, DiskFile, LockedImage, SECTOR_SIZE};
pub use format::{detect, ImageFormat, ImageInfo};
pub use image::{DiskImage, ImageError, ImageOptions, ImageType};
pub use qcow2::{Qcow2Disk, Qcow2Error};
pub use request::{BlockCounters, RequestError};
pub use worker::WorkerError;
