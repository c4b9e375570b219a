//! The virtio-blk device (type 2): feature offer, configuration space
//! (virtio 1.2 §5.2.4) and the life cycle of its I/O worker.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::SECTOR_SIZE;
use super::image::{DiskImage, ImageError, ImageOptions, ImageType};
use super::pool::IoPool;
use super::request::{Backend, BlockCounters, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use super::worker::{Executor, Lane, QueueShared, Worker};
use crate::virtio::{
    ActivateContext, ActivateError, GuestMemory, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Virtio device ID of a block device.
pub const BLOCK_DEVICE_TYPE: u32 = 2;
/// Default size of each request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Smallest queue size a disk may have (header, data and status fit
/// without indirect descriptors).
pub const MIN_QUEUE_SIZE: u16 = 4;
/// Largest queue size (virtio 1.2 §2.7: at most 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most queues a disk may have.
pub const MAX_QUEUES: u16 = 64;
/// Default number of I/O threads of a disk.
pub const IO_THREADS: usize = 8;
/// Most I/O threads a disk may have.
pub const MAX_IO_THREADS: usize = 64;

/// Configuration space field offsets (virtio 1.2 §5.2.4, `struct
/// virtio_blk_config`).
pub mod offsets {
    /// `le64 capacity`, in 512-byte sectors.
    pub const CAPACITY: usize = 0;
    /// `le32 size_max` (VIRTIO_BLK_F_SIZE_MAX, not offered).
    pub const SIZE_MAX: usize = 8;
    /// `le32 seg_max` (VIRTIO_BLK_F_SEG_MAX).
    pub const SEG_MAX: usize = 12;
    /// `geometry { le16 cylinders; u8 heads; u8 sectors; }` (not offered).
    pub const GEOMETRY: usize = 16;
    /// `le32 blk_size` (VIRTIO_BLK_F_BLK_SIZE).
    pub const BLK_SIZE: usize = 20;
    /// `topology.physical_block_exp` (VIRTIO_BLK_F_TOPOLOGY, not offered).
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    /// `topology.alignment_offset`.
    pub const ALIGNMENT_OFFSET: usize = 25;
    /// `topology.min_io_size`.
    pub const MIN_IO_SIZE: usize = 26;
    /// `topology.opt_io_size`.
    pub const OPT_IO_SIZE: usize = 28;
    /// `u8 writeback` (meaningful with VIRTIO_BLK_F_CONFIG_WCE only).
    pub const WRITEBACK: usize = 32;
    /// `le16 num_queues` (VIRTIO_BLK_F_MQ, offered with more than one).
    pub const NUM_QUEUES: usize = 34;
    /// `le32 max_discard_sectors` (VIRTIO_BLK_F_DISCARD).
    pub const MAX_DISCARD_SECTORS: usize = 36;
    /// `le32 max_discard_seg`.
    pub const MAX_DISCARD_SEG: usize = 40;
    /// `le32 discard_sector_alignment`.
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    /// `le32 max_write_zeroes_sectors` (VIRTIO_BLK_F_WRITE_ZEROES).
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    /// `le32 max_write_zeroes_seg`.
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    /// `u8 write_zeroes_may_unmap`.
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    /// Bytes up to and including `unused1[3]`; the secure-erase and zoned
    /// fields after it belong to features not offered.
    pub const SIZE: usize = 60;
}

/// How to attach one disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// Image file (raw or qcow2) or block device.
    pub path: PathBuf,
    /// Attach read-only (O_RDONLY, shared lock, VIRTIO_BLK_F_RO).
    pub readonly: bool,
    /// Serve the image as this type; `None`: as detected (and guard
    /// sector 0 of a raw image, see [`DiskImage::guards_sector0`]).
    pub image_type: Option<ImageType>,
    /// Follow a qcow2 image's backing file (`None`: yes; `Some(false)`:
    /// refuse an image that names one, as cloud-hypervisor's
    /// `backing_files=off`).
    pub backing_files: Option<bool>,
    /// GET_ID answer (at most 20 printable ASCII bytes); default derived
    /// from the file's device and inode numbers.
    pub serial: Option<String>,
    /// Name for the worker thread (`blk-<id>`) and messages; default the
    /// file name.
    pub id: Option<String>,
    /// Request queues (default 1; more: VIRTIO_BLK_F_MQ), at most
    /// [`MAX_QUEUES`].
    pub num_queues: Option<u16>,
    /// Size of each queue (default [`QUEUE_SIZE`]): a power of two in
    /// [`MIN_QUEUE_SIZE`]..=[`MAX_QUEUE_SIZE`].
    pub queue_size: Option<u16>,
    /// I/O threads serving the queues (default [`IO_THREADS`]); `0`: each
    /// queue thread runs its requests itself, one at a time.
    pub io_threads: Option<usize>,
}

/// A disk could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening, detecting, sizing or locking the image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// `num_queues`, `queue_size` or `io_threads` out of range.
    #[error("disk {option}={value}: {expected}")]
    Queues {
        /// The option.
        option: &'static str,
        /// The value given.
        value: usize,
        /// What is allowed.
        expected: &'static str,
    },
    /// The serial does not fit the 20-byte GET_ID answer.
    #[error("disk serial '{serial}' must be at most 20 printable ASCII characters")]
    Serial {
        /// The serial given.
        serial: String,
    },
}

/// One running queue thread.
struct QueueThread {
    shared: Arc<QueueShared>,
    stop: EventFd,
    thread: JoinHandle<EventFd>,
}

/// The threads of an active device.
struct Running {
    queues: Vec<QueueThread>,
    pool: Option<IoPool>,
}

/// Queue layout and I/O threads, checked.
#[derive(Clone, Debug)]
struct QueueLayout {
    sizes: Vec<u16>,
    io_threads: usize,
}

impl QueueLayout {
    fn from_config(config: &BlockConfig) -> Result<QueueLayout, BlockError> {
        let bad = |option, value, expected| BlockError::Queues {
            option,
            value,
            expected,
        };
        let count = config.num_queues.unwrap_or(1);
        if count == 0 || count > MAX_QUEUES {
            return Err(bad("num_queues", usize::from(count), "must be 1 to 64"));
        }
        let size = config.queue_size.unwrap_or(QUEUE_SIZE);
        if !size.is_power_of_two() || !(MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&size) {
            return Err(bad(
                "queue_size",
                usize::from(size),
                "must be a power of two from 4 to 32768",
            ));
        }
        let io_threads = config.io_threads.unwrap_or(IO_THREADS);
        if io_threads > MAX_IO_THREADS {
            return Err(bad("io_threads", io_threads, "must be 0 to 64"));
        }
        Ok(QueueLayout {
            sizes: vec![size; usize::from(count)],
            io_threads,
        })
    }
}

/// A virtio-blk device on a raw or qcow2 image.
pub struct Block {
    id: String,
    backend: Backend,
    avail_features: u64,
    acked_features: u64,
    config: [u8; offsets::SIZE],
    layout: QueueLayout,
    running: Option<Running>,
}

impl Block {
    /// Opens and locks the image and prepares the device.
    pub fn new(config: BlockConfig) -> Result<Block, BlockError> {
        let serial = config.serial.as_deref().map(serial_bytes).transpose()?;
        let layout = QueueLayout::from_config(&config)?;
        let options = ImageOptions {
            readonly: config.readonly,
            image_type: config.image_type,
            backing_files: config.backing_files.unwrap_or(true),
        };
        let disk = DiskImage::open_with(&config.path, &options)?;
        let id = config
            .id
            .clone()
            .unwrap_or_else(|| default_id(&config.path));
        let backend = Backend {
            id: serial.unwrap_or_else(|| derived_serial(&disk)),
            disk: Arc::new(disk),
            counters: Arc::new(BlockCounters::default()),
        };
        Ok(Block {
            id,
            avail_features: features(config.readonly, layout.sizes.len() > 1),
            acked_features: 0,
            config: config_space(&backend.disk, &layout),
            layout,
            backend,
            running: None,
        })
    }

    /// The device's name (thread `blk-<id>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.backend.disk.sectors()
    }

    /// Whether the disk is read-only.
    pub fn readonly(&self) -> bool {
        self.backend.disk.readonly()
    }

    /// The 20-byte GET_ID answer (NUL-padded).
    pub fn serial(&self) -> [u8; ID_BYTES] {
        self.backend.id
    }

    /// Stops the queue threads, waits for the requests in flight and
    /// stops the I/O threads; returns the queue eventfds.
    fn stop_worker(&mut self) -> Vec<EventFd> {
        let Some(running) = self.running.take() else {
            return Vec::new();
        };
        stop_running(running)
    }

    /// Starts one queue thread per enabled queue, on an I/O pool unless
    /// the disk has none.
    fn start(
        &self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<(u16, Queue, EventFd)>,
    ) -> Result<Running, ActivateError> {
        let name = format!("blk-{}", self.id.replace('\0', ""));
        let pool = match self.layout.io_threads {
            0 => None,
            threads => Some(
                IoPool::start(self.backend.clone(), threads, &name)
                    .map_err(ActivateError::Backend)?,
            ),
        };
        let mut running = Running {
            queues: Vec::new(),
            pool,
        };
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for (index, mut queue, queue_evt) in queues {
            queue.set_event_idx(event_idx);
            let shared = Arc::new(QueueShared::new(
                (index, queue),
                name.clone(),
                mem.clone(),
                interrupt.clone(),
            ));
            let executor = match &running.pool {
                Some(pool) => Executor::Pool(pool.submitter()),
                None => Executor::Inline(self.backend.clone()),
            };
            let thread_name = match index {
                0 => name.clone(),
                n => format!("{name}-q{n}"),
            };
            match spawn_queue(shared, queue_evt, executor, thread_name) {
                Ok(thread) => running.queues.push(thread),
                Err(e) => {
                    stop_running(running);
                    return Err(ActivateError::Backend(e));
                }
            }
        }
        Ok(running)
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.layout.sizes
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only without VIRTIO_BLK_F_CONFIG_WCE.
    }

    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError> {
        self.stop_worker();
        let ActivateContext {
            mem,
            interrupt,
            queues,
        } = context;
        crate::virtio::check_queues("virtio-blk", &queues, &mem)?;
        self.check_enabled(&queues)?;
        self.running = Some(self.start(mem, interrupt, queues)?);
        Ok(())
    }

    fn reset(&mut self) -> Vec<EventFd> {
        self.acked_features = 0;
        self.stop_worker()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.backend.counters.snapshot()
    }
}

impl Block {
    /// The driver may enable any non-empty subset of the queues (Linux
    /// enables one per vCPU at most), each once, none beyond the offer.
    fn check_enabled(&self, queues: &[(u16, Queue, EventFd)]) -> Result<(), ActivateError> {
        let offered = self.layout.sizes.len();
        if queues.is_empty() {
            return Err(ActivateError::BadQueue(
                "virtio-blk: the driver enabled no queue".to_string(),
            ));
        }
        let mut seen = vec![false; offered];
        for (index, queue, _) in queues {
            let slot = seen.get_mut(usize::from(*index));
            match slot {
                Some(seen) if !*seen => *seen = true,
                _ => {
                    return Err(ActivateError::BadQueue(format!(
                        "virtio-blk has {offered} queues; the driver enabled queue {index} (twice or beyond them)"
                    )))
                }
            }
            if queue.size() > self.layout.sizes[usize::from(*index)] {
                return Err(ActivateError::BadQueue(format!(
                    "virtio-blk queue {index}: size {} above the maximum {}",
                    queue.size(),
                    self.layout.sizes[usize::from(*index)]
                )));
            }
        }
        Ok(())
    }
}

/// Starts the thread serving one queue.
fn spawn_queue(
    shared: Arc<QueueShared>,
    queue_evt: EventFd,
    executor: Executor,
    name: String,
) -> std::io::Result<QueueThread> {
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let worker = Worker {
        shared: shared.clone(),
        queue_evt,
        stop_evt: stop.try_clone()?,
        executor,
        lane: Lane::default(),
    };
    let thread = worker.spawn(name)?;
    Ok(QueueThread {
        shared,
        stop,
        thread,
    })
}

/// Stops the queue threads, lets the requests in flight finish (nothing
/// more reaches the used rings) and joins the I/O threads.
fn stop_running(mut running: Running) -> Vec<EventFd> {
    for queue in &running.queues {
        queue.shared.request_stop();
        // If the write fails the thread is gone already; join reports it.
        let _ = queue.stop.write(1);
    }
    let mut evts = Vec::new();
    for queue in running.queues {
        if let Ok(evt) = queue.thread.join() {
            evts.push(evt);
        }
        queue.shared.wait_idle();
    }
    if let Some(pool) = running.pool.as_mut() {
        pool.stop();
    }
    evts
}

/// The feature offer.
fn features(readonly: bool, multiqueue: bool) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_SEG_MAX,
    ]
    .to_vec();
    if multiqueue {
        bits.push(VIRTIO_BLK_F_MQ);
    }
    if readonly {
        bits.push(VIRTIO_BLK_F_RO);
    } else {
        bits.extend([
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ]);
    }
    bits.into_iter().fold(0, |acc, bit| acc | 1u64 << bit)
}

/// The configuration space of `disk`.
fn config_space(disk: &DiskImage, layout: &QueueLayout) -> [u8; offsets::SIZE] {
    let mut config = [0u8; offsets::SIZE];
    let mut put =
        |offset: usize, bytes: &[u8]| config[offset..offset + bytes.len()].copy_from_slice(bytes);
    let alignment = (u64::from(disk.granularity()) / SECTOR_SIZE) as u32;
    put(offsets::CAPACITY, &disk.sectors().to_le_bytes());
    // Two descriptors of a request carry the header and the status.
    let queue_size = layout.sizes.first().copied().unwrap_or(QUEUE_SIZE);
    put(offsets::SEG_MAX, &u32::from(queue_size - 2).to_le_bytes());
    put(offsets::BLK_SIZE, &(SECTOR_SIZE as u32).to_le_bytes());
    put(offsets::WRITEBACK, &[u8::from(!disk.readonly())]);
    // At most MAX_QUEUES (64), so the cast is lossless.
    put(
        offsets::NUM_QUEUES,
        &(layout.sizes.len() as u16).to_le_bytes(),
    );
    put(
        offsets::MAX_DISCARD_SECTORS,
        &MAX_DISCARD_SECTORS.to_le_bytes(),
    );
    put(
        offsets::MAX_DISCARD_SEG,
        &(MAX_DISCARD_SEGMENTS as u32).to_le_bytes(),
    );
    put(offsets::DISCARD_SECTOR_ALIGNMENT, &alignment.to_le_bytes());
    put(
        offsets::MAX_WRITE_ZEROES_SECTORS,
        &MAX_DISCARD_SECTORS.to_le_bytes(),
    );
    put(
        offsets::MAX_WRITE_ZEROES_SEG,
        &(MAX_DISCARD_SEGMENTS as u32).to_le_bytes(),
    );
    put(offsets::WRITE_ZEROES_MAY_UNMAP, &[1]);
    config
}

fn serial_bytes(serial: &str) -> Result<[u8; ID_BYTES], BlockError> {
    let bytes = serial.as_bytes();
    if bytes.len() > ID_BYTES || !bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Err(BlockError::Serial {
            serial: serial.to_string(),
        });
    }
    let mut id = [0u8; ID_BYTES];
    id[..bytes.len()].copy_from_slice(bytes);
    Ok(id)
}

/// 20 hex digits: the low 32 bits of the device number and the low 48
/// bits of the inode (block devices: their device number), so the same
/// image gets the same serial across boots.
fn derived_serial(disk: &DiskImage) -> [u8; ID_BYTES] {
    let (dev, ino) = disk.identity();
    let text = format!("{:08x}{:012x}", dev & 0xffff_ffff, ino & 0xffff_ffff_ffff);
    let mut id = [0u8; ID_BYTES];
    for (byte, digit) in id.iter_mut().zip(text.bytes()) {
        *byte = digit;
    }
    id
}

fn default_id(path: &std::path::Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".to_string())
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_blk::{virtio_blk_config, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::testing::*;
    use crate::virtio::{GuestMemory, InterruptKind, VirtioInterrupt};

    const MIB: u64 = 1 << 20;

    fn config(image: &Image, readonly: bool) -> BlockConfig {
        BlockConfig {
            path: image.path.clone(),
            readonly,
            image_type: None,
            backing_files: None,
            serial: None,
            id: Some("t0".to_string()),
            ..BlockConfig::default()
        }
    }

    fn read_u32(block: &Block, offset: usize) -> u32 {
        let mut bytes = [0u8; 4];
        block.read_config(offset as u64, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    #[test]
    fn config_offsets_match_virtio_blk_config() {
        use offsets::*;
        let fields = [
            (CAPACITY, offset_of!(virtio_blk_config, capacity)),
            (SIZE_MAX, offset_of!(virtio_blk_config, size_max)),
            (SEG_MAX, offset_of!(virtio_blk_config, seg_max)),
            (GEOMETRY, offset_of!(virtio_blk_config, geometry)),
            (BLK_SIZE, offset_of!(virtio_blk_config, blk_size)),
            (
                PHYSICAL_BLOCK_EXP,
                offset_of!(virtio_blk_config, physical_block_exp),
            ),
            (
                ALIGNMENT_OFFSET,
                offset_of!(virtio_blk_config, alignment_offset),
            ),
            (MIN_IO_SIZE, offset_of!(virtio_blk_config, min_io_size)),
            (OPT_IO_SIZE, offset_of!(virtio_blk_config, opt_io_size)),
            (WRITEBACK, offset_of!(virtio_blk_config, wce)),
            (NUM_QUEUES, offset_of!(virtio_blk_config, num_queues)),
            (
                MAX_DISCARD_SECTORS,
                offset_of!(virtio_blk_config, max_discard_sectors),
            ),
            (
                MAX_DISCARD_SEG,
                offset_of!(virtio_blk_config, max_discard_seg),
            ),
            (
                DISCARD_SECTOR_ALIGNMENT,
                offset_of!(virtio_blk_config, discard_sector_alignment),
            ),
            (
                MAX_WRITE_ZEROES_SECTORS,
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            ),
            (
                MAX_WRITE_ZEROES_SEG,
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
            ),
            (
                WRITE_ZEROES_MAY_UNMAP,
                offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            ),
            (
                SIZE,
                offset_of!(virtio_blk_config, max_secure_erase_sectors),
            ),
        ];
        for (ours, spec) in fields {
            assert_eq!(ours, spec);
        }
    }

    #[test]
    fn config_space_describes_the_disk() {
        let image = Image::new(3 * MIB);
        let block = Block::new(config(&image, false)).unwrap();
        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 3 * MIB / 512);
        assert_eq!(block.capacity(), 3 * MIB / 512);
        assert_eq!(read_u32(&block, offsets::SEG_MAX), 254);
        assert_eq!(read_u32(&block, offsets::BLK_SIZE), 512);
        assert_eq!(
            read_u32(&block, offsets::MAX_DISCARD_SECTORS),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(read_u32(&block, offsets::MAX_DISCARD_SEG), 1);
        let alignment = read_u32(&block, offsets::DISCARD_SECTOR_ALIGNMENT);
        assert_eq!(alignment * 512, block.backend.disk.granularity());
        assert_eq!(
            read_u32(&block, offsets::MAX_WRITE_ZEROES_SECTORS),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(read_u32(&block, offsets::MAX_WRITE_ZEROES_SEG), 1);
        let mut unmap = [9u8];
        block.read_config(offsets::WRITE_ZEROES_MAY_UNMAP as u64, &mut unmap);
        assert_eq!(unmap, [1]);
        // A read crossing the end is zero-padded; one past it is all zero.
        let mut tail = [9u8; 8];
        block.read_config(offsets::SIZE as u64 - 4, &mut tail);
        assert_eq!(tail, [1, 0, 0, 0, 0, 0, 0, 0]);
        for offset in [offsets::SIZE as u64, u64::MAX] {
            let mut beyond = [9u8; 4];
            block.read_config(offset, &mut beyond);
            assert_eq!(beyond, [0; 4]);
        }
    }

    #[test]
    fn features_follow_readonly() {
        let bit = |b: u32| 1u64 << b;
        let common = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_SEG_MAX);
        let write =
            bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        let image = Image::new(MIB);
        let mut rw = Block::new(config(&image, false)).unwrap();
        assert_eq!(rw.device_features(), common | write);
        assert_eq!(rw.device_type(), 2);
        assert_eq!(rw.queue_max_sizes(), &[256]);
        rw.ack_features(u64::MAX);
        assert_eq!(rw.acked_features, common | write);
        drop(rw);
        let ro = Block::new(config(&image, true)).unwrap();
        assert_eq!(ro.device_features(), common | bit(VIRTIO_BLK_F_RO));
        assert!(ro.readonly());
    }

    #[test]
    fn serials_are_checked_or_derived() {
        let image = Image::new(MIB);
        let mut cfg = config(&image, true);
        cfg.serial = Some("data disk 1".to_string());
        assert_eq!(
            &Block::new(cfg.clone()).unwrap().serial(),
            b"data disk 1\0\0\0\0\0\0\0\0\0"
        );
        for bad in ["a-serial-longer-than-20", "tab\there"] {
            cfg.serial = Some(bad.to_string());
            let err = Block::new(cfg.clone()).err().unwrap();
            assert!(matches!(err, BlockError::Serial { .. }), "{err:?}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        cfg.serial = None;
        let derived = Block::new(cfg.clone()).unwrap().serial();
        assert!(derived.iter().all(u8::is_ascii_hexdigit), "{derived:?}");
        assert_eq!(Block::new(cfg).unwrap().serial(), derived);
    }

    #[test]
    fn disk_errors_pass_through() {
        let image = Image::new(MIB);
        let mut cfg = config(&image, false);
        cfg.path = image.path.with_file_name("nope.raw");
        let err = Block::new(cfg).err().unwrap();
        assert!(matches!(
            err,
            BlockError::Image(ImageError::Disk(
                crate::virtio::block::DiskError::Missing { .. }
            ))
        ));
        assert!(err.to_string().contains("nope.raw does not exist"), "{err}");
        let _first = Block::new(config(&image, false)).unwrap();
        let err = Block::new(config(&image, false)).err().unwrap();
        assert!(
            err.to_string()
                .contains("disk.raw is in use by this zvmm (pid"),
            "{err}"
        );
    }

    #[derive(Default)]
    struct RecordingInterrupt {
        raised: Mutex<Vec<InterruptKind>>,
        changed: Condvar,
    }

    impl VirtioInterrupt for RecordingInterrupt {
        fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
            self.raised.lock().unwrap().push(kind);
            self.changed.notify_all();
            Ok(())
        }
    }

    impl RecordingInterrupt {
        fn wait_for(&self, count: usize) -> Vec<InterruptKind> {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut raised = self.raised.lock().unwrap();
            while raised.len() < count {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(
                    !left.is_zero(),
                    "only {} interrupts after 10 s",
                    raised.len()
                );
                raised = self.changed.wait_timeout(raised, left).unwrap().0;
            }
            raised.clone()
        }
    }

    /// Queues `descs` at descriptor index `first`, kicks, waits for the
    /// used index to reach `used` and the interrupt count `interrupts`.
    fn submit(
        vq: &MockSplitQueue<GuestMemory>,
        kick: &EventFd,
        irq: &RecordingInterrupt,
        descs: &[Desc],
        first: u16,
        (used, interrupts): (u16, usize),
    ) {
        vq.add_desc_chains(&raw(descs, first), first).unwrap();
        kick.write(1).unwrap();
        assert_eq!(irq.wait_for(interrupts).len(), interrupts);
        let deadline = Instant::now() + Duration::from_secs(10);
        while vq.used().idx().load() != used {
            assert!(
                Instant::now() < deadline,
                "used index stuck at {}",
                vq.used().idx().load()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn worker_serves_the_queue_end_to_end() {
        let image = Image::new(MIB);
        let mut block = Block::new(config(&image, false)).unwrap();
        block.ack_features(block.device_features());
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(RecordingInterrupt::default());
        let queues = vec![(
            0,
            vq.create_queue::<Queue>().unwrap(),
            kick.try_clone().unwrap(),
        )];
        let interrupt = irq.clone();
        block
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt,
                queues,
            })
            .unwrap();

        // A write: completes and interrupts (used_event is 0).
        let data = pattern(8, 1024);
        header(&mem, HEADER, VIRTIO_BLK_T_OUT, 4);
        mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        let write = [r(HEADER, 16), r(DATA, 1024), w(STATUS, 1)];
        submit(&vq, &kick, &irq, &write, 0, (1, 1));
        assert_eq!(irq.wait_for(1), vec![InterruptKind::Queue(0)]);
        assert_eq!(byte_at(&mem, STATUS), 0);
        assert_eq!(&image.contents()[2048..3072], &data[..]);

        // A read: with used_event still 0, EVENT_IDX suppresses its interrupt.
        header(&mem, HEADER + 0x100, VIRTIO_BLK_T_IN, 4);
        let read = [
            r(HEADER + 0x100, 16),
            w(DATA + 0x1000, 1024),
            w(STATUS + 1, 1),
        ];
        submit(&vq, &kick, &irq, &read, 3, (2, 1));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(irq.raised.lock().unwrap().len(), 1, "EVENT_IDX ignored");
        let used = vq.used().ring().ref_at(1).unwrap().load();
        assert_eq!((used.id(), used.len()), (3, 1025));
        assert_eq!(bytes_at(&mem, DATA + 0x1000, 1024), data);

        // The driver asks for an interrupt after the third completion.
        let used_event = vq.avail_addr().unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
        mem.write_obj(2u16, used_event).unwrap();
        header(&mem, HEADER + 0x200, VIRTIO_BLK_T_IN, 0);
        let read = [
            r(HEADER + 0x200, 16),
            w(DATA + 0x2000, 512),
            w(STATUS + 2, 1),
        ];
        submit(&vq, &kick, &irq, &read, 6, (3, 2));
        assert_eq!(
            irq.wait_for(2).len(),
            2,
            "the second request must not have interrupted"
        );

        let counters = block.counters();
        assert!(counters.contains(&("write_requests", 1)), "{counters:?}");
        assert!(counters.contains(&("read_requests", 2)), "{counters:?}");
        assert_eq!(block.reset().len(), 1);
        assert_eq!(block.reset().len(), 0);
    }

    #[test]
    fn worker_serves_a_qcow2_overlay() {
        let dir = Image::new(0);
        let file = |name: &str| dir.path.with_file_name(name).display().to_string();
        let (base, overlay) = (file("base.qcow2"), file("overlay.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", &base, "2M"]);
        let qemu_io = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 7 1024 512", &base])
            .output()
            .expect("qemu-io (qemu-utils)");
        assert!(qemu_io.status.success(), "{qemu_io:?}");
        let backing = ["-b", "base.qcow2", "-F", "qcow2"];
        qemu_img(&[&["create", "-q", "-f", "qcow2"][..], &backing, &[&overlay]].concat());
        let mut cfg = config(&dir, false);
        cfg.path = overlay.clone().into();
        let mut block = Block::new(cfg).unwrap();
        assert_eq!(block.capacity(), 2 * MIB / 512);
        block.ack_features(block.device_features());
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(RecordingInterrupt::default());
        let queue = vq.create_queue::<Queue>().unwrap();
        let context = ActivateContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![(0, queue, kick.try_clone().unwrap())],
        };
        block.activate(context).unwrap();
        // The base's sector 2 shows through; a write goes to the overlay.
        header(&mem, HEADER, VIRTIO_BLK_T_IN, 2);
        let read = [r(HEADER, 16), w(DATA, 512), w(STATUS, 1)];
        submit(&vq, &kick, &irq, &read, 0, (1, 1));
        assert_eq!(byte_at(&mem, STATUS), 0);
        assert_eq!(bytes_at(&mem, DATA, 512), vec![7; 512]);
        let data = pattern(3, 1024);
        header(&mem, HEADER, VIRTIO_BLK_T_OUT, 3);
        mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        let write = [r(HEADER, 16), r(DATA, 1024), w(STATUS, 1)];
        submit(&vq, &kick, &irq, &write, 3, (2, 1));
        assert_eq!(byte_at(&mem, STATUS), 0);
        assert_eq!(block.reset().len(), 1);
        drop(block);
        // On the host: the overlay is base + the write, the base as it was.
        let mut expected = vec![0u8; 2 * MIB as usize];
        expected[1024..1536].fill(7);
        std::fs::write(file("base.raw"), &expected).unwrap();
        expected[1536..2560].copy_from_slice(&data);
        std::fs::write(file("overlay.raw"), &expected).unwrap();
        for (image, raw) in [(&overlay, file("overlay.raw")), (&base, file("base.raw"))] {
            assert!(qemu_img(&["check", image]).contains("No errors were found"));
            let compare = qemu_img(&["compare", image, &raw]);
            assert!(
                compare.contains("Images are identical"),
                "{image}: {compare}"
            );
        }
    }

    #[test]
    fn activation_needs_exactly_one_queue() {
        let image = Image::new(MIB);
        let mut block = Block::new(config(&image, false)).unwrap();
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let queue = || {
            let evt = EventFd::new(EFD_NONBLOCK).unwrap();
            (0, vq.create_queue::<Queue>().unwrap(), evt)
        };
        let irq: Arc<dyn VirtioInterrupt> = Arc::new(RecordingInterrupt::default());
        for queues in [vec![], vec![queue(), queue()]] {
            let context = ActivateContext {
                mem: mem.clone(),
                interrupt: irq.clone(),
                queues,
            };
            let err = block.activate(context).unwrap_err();
            assert!(matches!(err, ActivateError::BadQueue(_)), "{err:?}");
        }
        let mut bad = queue();
        bad.1.set_desc_table_address(Some(0xffff_f000), Some(0));
        let context = ActivateContext {
            mem,
            interrupt: irq,
            queues: vec![bad],
        };
        assert!(matches!(
            block.activate(context),
            Err(ActivateError::BadQueue(_))
        ));
        assert!(block.reset().is_empty());
    }
}
