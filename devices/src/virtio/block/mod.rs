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
//! - `worker`: the per-disk I/O thread.
//!
//! I/O model: one thread per disk (`blk-<id>`), started on activation. It
//! sleeps in `epoll_wait` on the queue's notification eventfd (an ioeventfd
//! KVM signals on a kick, so a kick costs no VM exit to userspace on the
//! vCPU side) and a stop eventfd; it then drains the available ring,
//! running each request with one synchronous `preadv`/`pwritev` straight
//! between the file and guest memory (no bounce buffer; a qcow2 request
//! goes through imago, which splits it at cluster boundaries and reads or
//! writes each piece the same way), and interrupts
//! the driver once per batch when EVENT_IDX says it is wanted. Per request
//! the only system calls are the I/O itself; per batch, the eventfd read,
//! the interrupt and `epoll_wait`. This is simple and matches what the page
//! cache does best (buffered I/O, sequential readahead, write-back). Its
//! limit is one request in flight per disk: a deep random-read workload on
//! a cold cache is bound by a single thread's latency. io_uring (or a pool
//! of I/O threads) would overlap requests and batch submissions, at the
//! cost of completion tracking and out-of-order used entries; measure
//! first. `reset` stops and joins the thread and hands the queue eventfd
//! back.

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
