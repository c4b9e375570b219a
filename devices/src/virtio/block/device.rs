//! The virtio-blk device (type 2): feature offer, configuration space
//! (virtio 1.2 §5.2.4) and the life cycle of its I/O worker.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::{DiskError, DiskFile, SECTOR_SIZE};
use super::request::{Backend, BlockCounters, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use super::worker::Worker;
use crate::virtio::{ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};

/// Virtio device ID of a block device.
pub const BLOCK_DEVICE_TYPE: u32 = 2;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

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
    /// `le16 num_queues` (VIRTIO_BLK_F_MQ, not offered).
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
    /// Raw image file or block device.
    pub path: PathBuf,
    /// Attach read-only (O_RDONLY, shared lock, VIRTIO_BLK_F_RO).
    pub readonly: bool,
    /// GET_ID answer (at most 20 printable ASCII bytes); default derived
    /// from the file's device and inode numbers.
    pub serial: Option<String>,
    /// Name for the worker thread (`blk-<id>`) and messages; default the
    /// file name.
    pub id: Option<String>,
}

/// A disk could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening, sizing or locking the image failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The serial does not fit the 20-byte GET_ID answer.
    #[error("disk serial '{serial}' must be at most 20 printable ASCII characters")]
    Serial {
        /// The serial given.
        serial: String,
    },
}

struct Running {
    stop: EventFd,
    thread: JoinHandle<EventFd>,
}

/// A virtio-blk device on a raw image.
pub struct Block {
    id: String,
    backend: Backend,
    avail_features: u64,
    acked_features: u64,
    config: [u8; offsets::SIZE],
    running: Option<Running>,
}

impl Block {
    /// Opens and locks the image and prepares the device.
    pub fn new(config: BlockConfig) -> Result<Block, BlockError> {
        let serial = config.serial.as_deref().map(serial_bytes).transpose()?;
        let disk = DiskFile::open(&config.path, config.readonly)?;
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
            avail_features: features(config.readonly),
            acked_features: 0,
            config: config_space(&backend.disk),
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

    fn stop_worker(&mut self) -> Vec<EventFd> {
        let Some(running) = self.running.take() else {
            return Vec::new();
        };
        // If the write fails the thread is gone already; join reports it.
        let _ = running.stop.write(1);
        match running.thread.join() {
            Ok(queue_evt) => vec![queue_evt],
            Err(_) => Vec::new(),
        }
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
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
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
        let count = queues.len();
        let Some((index, mut queue, queue_evt)) = queues.into_iter().next().filter(|_| count == 1)
        else {
            return Err(ActivateError::BadQueue(format!(
                "virtio-blk has 1 queue, the driver enabled {count}"
            )));
        };
        if !queue.is_valid(&mem) {
            return Err(ActivateError::BadQueue(format!(
                "virtio-blk queue {index}: rings outside guest memory or misaligned"
            )));
        }
        queue.set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Backend)?;
        let worker = Worker {
            queue,
            index,
            queue_evt,
            stop_evt: stop.try_clone().map_err(ActivateError::Backend)?,
            mem,
            interrupt,
            backend: self.backend.clone(),
        };
        let thread = worker
            .spawn(format!("blk-{}", self.id))
            .map_err(ActivateError::Backend)?;
        self.running = Some(Running { stop, thread });
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

/// The feature offer.
fn features(readonly: bool) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_SEG_MAX,
    ]
    .to_vec();
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
fn config_space(disk: &DiskFile) -> [u8; offsets::SIZE] {
    let mut config = [0u8; offsets::SIZE];
    let mut put =
        |offset: usize, bytes: &[u8]| config[offset..offset + bytes.len()].copy_from_slice(bytes);
    let alignment = (u64::from(disk.granularity()) / SECTOR_SIZE) as u32;
    put(offsets::CAPACITY, &disk.sectors().to_le_bytes());
    // Two descriptors of a request carry the header and the status.
    put(offsets::SEG_MAX, &u32::from(QUEUE_SIZE - 2).to_le_bytes());
    put(offsets::BLK_SIZE, &(SECTOR_SIZE as u32).to_le_bytes());
    put(offsets::WRITEBACK, &[u8::from(!disk.readonly())]);
    put(offsets::NUM_QUEUES, &1u16.to_le_bytes());
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
fn derived_serial(disk: &DiskFile) -> [u8; ID_BYTES] {
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
