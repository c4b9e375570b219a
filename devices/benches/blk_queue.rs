//! Host-side virtio-blk benchmark, no guest: the device model
//! ([`Block`]) driven through a split virtqueue this program lays out in
//! guest memory and drives as a driver would — descriptors, available
//! ring, kick eventfd; completions read off the used ring after each
//! interrupt (an eventfd here).
//!
//! Run with `cargo bench -p devices --bench blk_queue` (seconds per cell:
//! `ZVMM_BENCH_SECS`, default 1). It prints a Markdown table of requests
//! per second for 4 KiB random reads (page cache hot, and with the image's
//! pages dropped before the cell, `POSIX_FADV_DONTNEED`) and 4 KiB random
//! writes (page cache), at queue depth 1, 8 and 32, on a raw and a qcow2
//! image of [`IMAGE_MIB`] MiB, for the serial service zvmm had before
//! (`io_threads=0`: the queue thread runs one request at a time) and the
//! I/O pool (`io_threads=8`, the default, and 32): the best of
//! [`REPEATS`] runs each, the services interleaved so that load from
//! elsewhere on the host hits each alike. It never judges; it reports the
//! depth-32 ratio against the serial service. Without
//! `--bench` (`cargo test`, clippy) it only says how to run it.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::{ActivateContext, GuestMemory, InterruptKind, VirtioDevice, VirtioInterrupt};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

/// Image size: large enough that a cold cell's reads mostly miss.
const IMAGE_MIB: u64 = 512;
/// Bytes per request.
const BLOCK: u64 = 4096;
/// Queue size (zvmm's default).
const QUEUE_SIZE: u16 = 256;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1_0000;
const USED_RING: u64 = 0x2_0000;
const HEADERS: u64 = 0x3_0000;
const STATUSES: u64 = 0x4_0000;
const DATA: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x40_0000;
const DEPTHS: [u16; 3] = [1, 8, 32];
/// Runs per cell; the table shows the best.
const REPEATS: usize = 3;
/// (label, io_threads).
const MODES: [(&str, usize); 3] = [("serial (before)", 0), ("pool 8", 8), ("pool 32", 32)];

/// An interrupt that wakes the driver.
struct EventInterrupt(EventFd);

impl VirtioInterrupt for EventInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        self.0.write(1)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    ReadHot,
    ReadCold,
    WriteHot,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::ReadHot, Workload::ReadCold, Workload::WriteHot];

    fn label(self) -> &'static str {
        match self {
            Workload::ReadHot => "4K rand read, cache hot",
            Workload::ReadCold => "4K rand read, cache dropped",
            Workload::WriteHot => "4K rand write, cache",
        }
    }
}

/// The driver side of one queue.
struct Driver {
    mem: GuestMemory,
    kick: EventFd,
    irq: Arc<EventInterrupt>,
    avail_idx: u16,
    used_seen: u16,
    rng: u64,
    blocks: u64,
    write: bool,
}

impl Driver {
    /// Puts request `slot` (descriptors 3*slot..) on the available ring.
    fn submit(&mut self, slot: u16) {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let sector = (self.rng % self.blocks) * (BLOCK / 512);
        let kind = if self.write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        let header = HEADERS + u64::from(slot) * 16;
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&bytes, GuestAddress(header)).unwrap();
        let data_flags = if self.write { 0 } else { VRING_DESC_F_WRITE };
        let first = slot * 3;
        let descs = [
            (header, 16, 0),
            (DATA + u64::from(slot) * BLOCK, BLOCK as u32, data_flags),
            (STATUSES + u64::from(slot), 1, VRING_DESC_F_WRITE),
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let index = first + i as u16;
            let (flags, next) = if i < 2 {
                (flags | VRING_DESC_F_NEXT, index + 1)
            } else {
                (flags, 0)
            };
            let desc = RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next));
            let at = GuestAddress(DESC_TABLE + u64::from(index) * 16);
            self.mem.write_obj(desc, at).unwrap();
        }
        let entry = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(first, GuestAddress(entry)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    /// Waits for completions; returns their slots.
    fn completions(&mut self) -> Vec<u16> {
        loop {
            fence(Ordering::SeqCst);
            let used: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
            if used != self.used_seen {
                let mut slots = Vec::new();
                while self.used_seen != used {
                    let at = USED_RING + 4 + 8 * u64::from(self.used_seen % QUEUE_SIZE);
                    let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                    let slot = (id / 3) as u16;
                    let status: u8 = self
                        .mem
                        .read_obj(GuestAddress(STATUSES + u64::from(slot)))
                        .unwrap();
                    assert_eq!(status, 0, "request failed");
                    slots.push(slot);
                    self.used_seen = self.used_seen.wrapping_add(1);
                }
                return slots;
            }
            self.irq.0.read().unwrap();
        }
    }

    /// Keeps `depth` requests in flight for `secs`; requests per second.
    fn run(&mut self, depth: u16, secs: Duration) -> f64 {
        for slot in 0..depth {
            self.submit(slot);
        }
        self.kick.write(1).unwrap();
        let start = Instant::now();
        let mut done = 0u64;
        loop {
            let slots = self.completions();
            done += slots.len() as u64;
            let elapsed = start.elapsed();
            if elapsed >= secs {
                // Let the rest finish before the device stops.
                let mut left = u64::from(depth) - slots.len() as u64;
                while left > 0 {
                    left -= self.completions().len() as u64;
                }
                return done as f64 / elapsed.as_secs_f64();
            }
            for slot in slots {
                self.submit(slot);
            }
            self.kick.write(1).unwrap();
        }
    }
}

fn queue() -> Queue {
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_size(QUEUE_SIZE);
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .unwrap();
    queue.set_ready(true);
    queue
}

/// Requests per second of `workload` at `depth` on `image`.
fn cell(image: &Path, io_threads: usize, workload: Workload, depth: u16, secs: Duration) -> f64 {
    let mut block = Block::new(BlockConfig {
        path: image.to_path_buf(),
        id: Some("bench".to_string()),
        io_threads: Some(io_threads),
        ..BlockConfig::default()
    })
    .unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    block.ack_features(block.device_features() & !(1 << VIRTIO_RING_F_EVENT_IDX));
    let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let kick = EventFd::new(0).unwrap();
    let irq = Arc::new(EventInterrupt(EventFd::new(0).unwrap()));
    block
        .activate(ActivateContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![(0, queue(), kick.try_clone().unwrap())],
        })
        .unwrap();
    if workload == Workload::ReadCold {
        drop_cache(image);
    }
    let mut driver = Driver {
        mem,
        kick,
        irq,
        avail_idx: 0,
        used_seen: 0,
        rng: 0x9e37_79b9_7f4a_7c15 ^ (depth as u64) << 32,
        blocks: IMAGE_MIB * (1 << 20) / BLOCK,
        write: workload == Workload::WriteHot,
    };
    let rate = driver.run(depth, secs);
    block.reset();
    rate
}

/// Drops the image's pages from the page cache.
fn drop_cache(image: &Path) {
    let file = File::open(image).unwrap();
    file.sync_all().ok();
    // SAFETY: plain system call on an open descriptor; no memory passed.
    let ret = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(ret, 0, "posix_fadvise");
}

/// A raw image of pseudo-random data and a qcow2 copy of it.
fn images(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("bench.raw");
    let mut file = File::create(&raw).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x1234_5678_9abc_def1u64;
    for _ in 0..IMAGE_MIB {
        for byte in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = x as u8;
        }
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    let qcow2 = dir.join("bench.qcow2");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .expect("qemu-img (qemu-utils; resources/install-host-deps.sh installs it)");
    assert!(status.success(), "qemu-img convert failed");
    (raw, qcow2)
}

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("blk_queue bench: not run here; use `cargo bench -p devices --bench blk_queue`");
        return;
    }
    let secs = std::env::var("ZVMM_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.0);
    let secs = Duration::from_secs_f64(secs);
    let dir = TempDir::new_with_prefix("/var/tmp/zvmm-blk-bench-").unwrap();
    let (raw, qcow2) = images(dir.as_path());
    println!(
        "virtio-blk device model, one queue of {QUEUE_SIZE}, {IMAGE_MIB} MiB images, {} s per cell, requests/s\n",
        secs.as_secs_f64()
    );
    println!("| image | workload | service | QD 1 | QD 8 | QD 32 | QD 32 vs serial |");
    println!("|---|---|---|---:|---:|---:|---:|");
    for (name, image) in [("raw", &raw), ("qcow2", &qcow2)] {
        for workload in Workload::ALL {
            // best[mode][depth]: the best of REPEATS runs, the modes
            // interleaved, so load from elsewhere hits each alike.
            let mut best = [[0.0f64; DEPTHS.len()]; MODES.len()];
            for (d, &depth) in DEPTHS.iter().enumerate() {
                for _ in 0..REPEATS {
                    for (m, (_, io_threads)) in MODES.iter().enumerate() {
                        let rate = cell(image, *io_threads, workload, depth, secs);
                        best[m][d] = best[m][d].max(rate);
                    }
                }
            }
            for (m, (label, _)) in MODES.iter().enumerate() {
                let rates = best[m];
                println!(
                    "| {name} | {} | {label} | {:.0} | {:.0} | {:.0} | {:.2}× |",
                    workload.label(),
                    rates[0],
                    rates[1],
                    rates[2],
                    rates[2] / best[0][2]
                );
            }
        }
    }
}
