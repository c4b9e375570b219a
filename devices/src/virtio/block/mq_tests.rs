//! Tests of the device with several queues and requests in flight, on
//! mock queues: the MQ offer, every queue served, each request completed
//! exactly once, FLUSH after writes in flight, reset with requests in
//! flight, and queue set-ups a driver gets wrong.

use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

use super::device::{offsets, Block, BlockConfig, BlockError};
use super::testing::{byte_at, bytes_at, header, memory, pattern, Image, DATA, HEADER, STATUS};
use crate::virtio::testing::{
    eventfd, mock_queue, r, raw, w, wait_until, RecordingInterrupt, TestQueue,
};
use crate::virtio::{ActivateContext, ActivateError, GuestMemory, InterruptKind, VirtioDevice};

const MIB: u64 = 1 << 20;
/// Bytes each request of these tests moves.
const LEN: u32 = 16 * 1024;

fn config(image: &Image, num_queues: u16, io_threads: usize) -> BlockConfig {
    BlockConfig {
        path: image.path.clone(),
        id: Some("mq".to_string()),
        num_queues: Some(num_queues),
        io_threads: Some(io_threads),
        ..BlockConfig::default()
    }
}

/// An activated device on `image` with the queues `enabled` (sizes
/// `size`), and their mocks.
struct Rig<'m> {
    block: Block,
    queues: Vec<TestQueue<'m>>,
    kicks: Vec<vmm_sys_util::eventfd::EventFd>,
    irq: Arc<RecordingInterrupt>,
}

/// `Block::new`, retrying for a while on a lock conflict: a process
/// another test is spawning holds a copy of every open file description
/// between its fork and its exec, so a lock just dropped can linger.
fn new_block(cfg: BlockConfig) -> Block {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Block::new(cfg.clone()) {
            Ok(block) => return block,
            Err(e) if e.to_string().contains("in use") && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn activate<'m>(mem: &'m GuestMemory, cfg: BlockConfig, enabled: &[u16]) -> Rig<'m> {
    let mut block = new_block(cfg);
    block.ack_features(block.device_features());
    let irq = Arc::new(RecordingInterrupt::default());
    let queues: Vec<TestQueue> = enabled.iter().map(|&i| mock_queue(mem, i, 256)).collect();
    let kicks: Vec<_> = enabled.iter().map(|_| eventfd()).collect();
    let context = ActivateContext {
        mem: mem.clone(),
        interrupt: irq.clone(),
        queues: enabled
            .iter()
            .zip(&queues)
            .zip(&kicks)
            .map(|((&i, q), k)| (i, q.create_queue(), k.try_clone().unwrap()))
            .collect(),
    };
    block.activate(context).unwrap();
    Rig {
        block,
        queues,
        kicks,
        irq,
    }
}

/// Request `slot`'s three descriptors: header, `LEN` bytes of data at
/// `DATA + slot * LEN`, status at `STATUS + slot`.
fn request(mem: &GuestMemory, slot: u64, request_type: u32, sector: u64) -> Vec<RawDescriptor> {
    let at = HEADER + slot * 16;
    header(mem, at, request_type, sector);
    mem.write_obj(0xffu8, GuestAddress(STATUS + slot)).unwrap();
    let data = DATA + slot * u64::from(LEN);
    let descs = match request_type {
        VIRTIO_BLK_T_IN => vec![r(at, 16), w(data, LEN), w(STATUS + slot, 1)],
        VIRTIO_BLK_T_OUT => vec![r(at, 16), r(data, LEN), w(STATUS + slot, 1)],
        _ => vec![r(at, 16), w(STATUS + slot, 1)],
    };
    // Three descriptor table entries per slot (slots are below 85).
    raw(&descs, (slot % 64) as u16 * 3)
}

fn submit(rig: &Rig, queue: usize, chains: &[Vec<RawDescriptor>], first_slot: u16) {
    let all: Vec<RawDescriptor> = chains.concat();
    rig.queues[queue].add_desc_chains(&all, (first_slot % 64) * 3);
    rig.kicks[queue].write(1).unwrap();
}

fn wait_used(rig: &Rig, queue: usize, count: u16) {
    let q = &rig.queues[queue];
    wait_until(&format!("{count} used on queue {queue}"), || {
        q.used_idx() == count
    });
}

/// The descriptor heads on the used ring of `queue`, sorted.
fn used_heads(rig: &Rig, queue: usize) -> Vec<u32> {
    let q = &rig.queues[queue];
    let mut heads: Vec<u32> = (0..q.used_idx()).map(|i| q.used_elem(i).0).collect();
    heads.sort_unstable();
    heads
}

fn read_u16(block: &Block, offset: usize) -> u16 {
    let mut bytes = [0u8; 2];
    block.read_config(offset as u64, &mut bytes);
    u16::from_le_bytes(bytes)
}

#[test]
fn two_queues_offer_mq_and_both_are_served() {
    let image = Image::new(MIB);
    let mem = memory();
    let rig = activate(&mem, config(&image, 2, 4), &[0, 1]);
    assert_ne!(rig.block.device_features() & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_eq!(read_u16(&rig.block, offsets::NUM_QUEUES), 2);
    assert_eq!(rig.block.queue_max_sizes(), &[256, 256]);
    // A write on queue 1, read back on queue 0.
    let data = pattern(5, LEN as usize);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    submit(&rig, 1, &[request(&mem, 0, VIRTIO_BLK_T_OUT, 8)], 0);
    wait_used(&rig, 1, 1);
    assert_eq!(byte_at(&mem, STATUS), 0);
    assert_eq!(rig.queues[1].used_elem(0), (0, 1));
    rig.irq.wait_for(InterruptKind::Queue(1), 1);
    assert_eq!(&image.contents()[4096..4096 + LEN as usize], &data[..]);
    submit(&rig, 0, &[request(&mem, 1, VIRTIO_BLK_T_IN, 8)], 1);
    wait_used(&rig, 0, 1);
    rig.irq.wait_for(InterruptKind::Queue(0), 1);
    assert_eq!(byte_at(&mem, STATUS + 1), 0);
    assert_eq!(rig.queues[0].used_elem(0), (3, LEN + 1));
    assert_eq!(bytes_at(&mem, DATA + u64::from(LEN), LEN as usize), data);
}

#[test]
fn one_queue_keeps_the_single_queue_offer() {
    let image = Image::new(MIB);
    let block = new_block(config(&image, 1, 8));
    assert_eq!(block.device_features() & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_eq!(read_u16(&block, offsets::NUM_QUEUES), 1);
    let mut cfg = config(&image, 1, 8);
    cfg.queue_size = Some(64);
    drop(block);
    let block = new_block(cfg);
    assert_eq!(block.queue_max_sizes(), &[64]);
    let mut seg_max = [0u8; 4];
    block.read_config(offsets::SEG_MAX as u64, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), 62);
}

#[test]
fn bad_queue_options_are_refused_by_name() {
    let image = Image::new(MIB);
    type Set = fn(&mut BlockConfig);
    let cases: [(&str, Set); 6] = [
        ("num_queues=0", |c| c.num_queues = Some(0)),
        ("num_queues=65", |c| c.num_queues = Some(65)),
        ("queue_size=2", |c| c.queue_size = Some(2)),
        ("queue_size=100", |c| c.queue_size = Some(100)),
        ("queue_size=0", |c| c.queue_size = Some(0)),
        ("io_threads=65", |c| c.io_threads = Some(65)),
    ];
    for (name, set) in cases {
        let mut cfg = config(&image, 1, 1);
        set(&mut cfg);
        let err = Block::new(cfg).err().unwrap();
        assert!(matches!(err, BlockError::Queues { .. }), "{name}: {err:?}");
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
}

/// 48 requests on each of two queues, reads and writes of distinct
/// sectors mixed: each completes exactly once, with the right data.
#[test]
fn many_requests_in_flight_complete_once_each() {
    for io_threads in [0, 1, 8] {
        let image = Image::new(0);
        let mut before: Vec<u8> = (0..48u64)
            .flat_map(|slot| pattern(slot as u8, LEN as usize))
            .collect();
        before.resize(4 * MIB as usize, 0);
        std::fs::write(&image.path, &before).unwrap();
        let mem = memory();
        let rig = activate(&mem, config(&image, 2, io_threads), &[0, 1]);
        for queue in 0..2 {
            let chains: Vec<_> = (0..24u64)
                .map(|n| {
                    let slot = queue as u64 * 24 + n;
                    let sector = slot * u64::from(LEN) / 512;
                    if n % 2 == 0 {
                        request(&mem, slot, VIRTIO_BLK_T_IN, sector)
                    } else {
                        let fill = pattern(100 + slot as u8, LEN as usize);
                        mem.write_slice(&fill, GuestAddress(DATA + slot * u64::from(LEN)))
                            .unwrap();
                        request(&mem, slot, VIRTIO_BLK_T_OUT, sector)
                    }
                })
                .collect();
            // Descriptor slots: 0..24 on queue 0, 24..48 on queue 1.
            submit(&rig, queue, &chains, queue as u16 * 24);
        }
        for queue in 0..2 {
            wait_used(&rig, queue, 24);
            let first = queue as u32 * 24;
            let expected: Vec<u32> = (first..first + 24).map(|s| s * 3).collect();
            assert_eq!(used_heads(&rig, queue), expected, "io_threads={io_threads}");
        }
        let contents = image.contents();
        for slot in 0..48u64 {
            assert_eq!(byte_at(&mem, STATUS + slot), 0, "slot {slot}");
            let at = (slot * u64::from(LEN)) as usize;
            let on_disk = &contents[at..at + LEN as usize];
            if slot % 24 % 2 == 0 {
                let read = bytes_at(&mem, DATA + slot * u64::from(LEN), LEN as usize);
                assert_eq!(read, on_disk, "read slot {slot}");
                assert_eq!(on_disk, pattern(slot as u8, LEN as usize));
            } else {
                assert_eq!(on_disk, pattern(100 + slot as u8, LEN as usize));
            }
        }
        let counters = rig.block.counters();
        assert!(counters.contains(&("read_requests", 24)), "{counters:?}");
        assert!(counters.contains(&("write_requests", 24)), "{counters:?}");
    }
}

/// Writes on both queues with a FLUSH behind them in the same kick: all
/// complete, the FLUSH too, and the data is on the disk.
#[test]
fn flush_behind_writes_in_flight_completes_after_them() {
    let image = Image::new(4 * MIB);
    let mem = memory();
    let rig = activate(&mem, config(&image, 2, 4), &[0, 1]);
    for queue in 0..2u64 {
        let mut chains: Vec<_> = (0..8u64)
            .map(|n| {
                let slot = queue * 9 + n;
                let fill = pattern(slot as u8, LEN as usize);
                mem.write_slice(&fill, GuestAddress(DATA + slot * u64::from(LEN)))
                    .unwrap();
                request(&mem, slot, VIRTIO_BLK_T_OUT, slot * u64::from(LEN) / 512)
            })
            .collect();
        chains.push(request(&mem, queue * 9 + 8, VIRTIO_BLK_T_FLUSH, 0));
        submit(&rig, queue as usize, &chains, queue as u16 * 9);
    }
    for queue in 0..2 {
        wait_used(&rig, queue, 9);
    }
    for slot in 0..18u64 {
        assert_eq!(byte_at(&mem, STATUS + slot), 0, "slot {slot}");
    }
    let contents = image.contents();
    for slot in (0..18u64).filter(|s| s % 9 != 8) {
        let at = (slot * u64::from(LEN)) as usize;
        assert_eq!(
            &contents[at..at + LEN as usize],
            pattern(slot as u8, LEN as usize)
        );
    }
    assert!(rig.block.counters().contains(&("flush_requests", 2)));
}

/// A reset right after a burst waits for the requests in flight; after it
/// the device writes nothing more to guest memory, and it serves again
/// once re-activated.
#[test]
fn reset_with_requests_in_flight_drains_them_then_leaves_memory_alone() {
    let image = Image::new(4 * MIB);
    let mem = memory();
    let mut rig = activate(&mem, config(&image, 2, 2), &[0, 1]);
    let rig = &mut rig;
    for queue in 0..2u64 {
        let chains: Vec<_> = (0..32u64)
            .map(|n| request(&mem, queue * 32 + n, VIRTIO_BLK_T_IN, n * 32))
            .collect();
        submit(rig, queue as usize, &chains, queue as u16 * 32);
    }
    assert_eq!(rig.block.reset().len(), 2);
    let snapshot = |mem: &GuestMemory| {
        let used: Vec<u16> = rig.queues.iter().map(|q| q.used_idx()).collect();
        (
            used,
            bytes_at(mem, DATA, 64 * LEN as usize),
            bytes_at(mem, STATUS, 64),
        )
    };
    let after_reset = snapshot(&mem);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        snapshot(&mem),
        after_reset,
        "guest memory changed after reset"
    );
    let done = after_reset.0.iter().map(|&n| u64::from(n)).sum::<u64>();
    let reads = rig.block.counters();
    let (_, read) = reads.iter().find(|(n, _)| *n == "read_requests").unwrap();
    assert!(*read >= done && *read <= 64, "{read} reads, {done} used");
    // Re-activated on fresh rings, the device serves again.
    let mem2 = memory();
    let q = mock_queue(&mem2, 0, 256);
    let kick = eventfd();
    let context = ActivateContext {
        mem: mem2.clone(),
        interrupt: rig.irq.clone(),
        queues: vec![(0, q.create_queue(), kick.try_clone().unwrap())],
    };
    rig.block.activate(context).unwrap();
    let again = request(&mem2, 0, VIRTIO_BLK_T_IN, 0);
    q.add_desc_chains(&again, 0);
    kick.write(1).unwrap();
    wait_until("the request after re-activation", || q.used_idx() == 1);
    assert_eq!(byte_at(&mem2, STATUS), 0);
}

#[test]
fn queue_setups_a_driver_gets_wrong_are_refused() {
    let image = Image::new(MIB);
    let mem = memory();
    let mut block = new_block(config(&image, 2, 2));
    let irq = Arc::new(RecordingInterrupt::default());
    let q0 = mock_queue(&mem, 0, 256);
    let q1 = mock_queue(&mem, 1, 256);
    let big = mock_queue(&mem, 2, 512);
    let cases: Vec<(&str, Vec<(u16, &TestQueue)>)> = vec![
        ("no queue", vec![]),
        ("queue 2 of 2", vec![(0, &q0), (2, &q1)]),
        ("queue 0 twice", vec![(0, &q0), (0, &q1)]),
        ("512 entries", vec![(0, &big)]),
    ];
    for (what, queues) in cases {
        let context = ActivateContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues: queues
                .into_iter()
                .map(|(i, q)| (i, q.create_queue(), eventfd()))
                .collect(),
        };
        let err = block.activate(context).unwrap_err();
        assert!(matches!(err, ActivateError::BadQueue(_)), "{what}: {err:?}");
    }
    assert!(block.reset().is_empty());
    // Only queue 1 enabled (a driver with fewer vCPUs than queues may
    // leave some out): served.
    drop(block);
    let rig = activate(&mem, config(&image, 2, 2), &[1]);
    submit(&rig, 0, &[request(&mem, 0, VIRTIO_BLK_T_IN, 0)], 0);
    wait_used(&rig, 0, 1);
    rig.irq.wait_for(InterruptKind::Queue(1), 1);
}

/// A queue whose available index runs ahead of its size, or whose
/// available entry names a descriptor beyond the queue, marks the device
/// as needing a reset; the other queue goes on serving.
#[test]
fn a_broken_queue_needs_reset_and_the_other_queue_goes_on() {
    for (io_threads, bad_head) in [(0, false), (2, false), (0, true), (2, true)] {
        let image = Image::new(MIB);
        let mem = memory();
        let rig = activate(&mem, config(&image, 2, io_threads), &[0, 1]);
        if bad_head {
            rig.queues[0].set_avail_entry(0, 300);
            rig.queues[0].set_avail_idx(1);
        } else {
            rig.queues[0].set_avail_idx(1000);
        }
        rig.kicks[0].write(1).unwrap();
        wait_until("needs-reset", || rig.irq.needs_reset());
        submit(&rig, 1, &[request(&mem, 1, VIRTIO_BLK_T_IN, 0)], 1);
        wait_used(&rig, 1, 1);
        assert_eq!(byte_at(&mem, STATUS + 1), 0);
        assert_eq!(rig.queues[0].used_idx(), 0);
    }
}

/// Bytes the page cache holds are read without waiting (`RWF_NOWAIT`);
/// qcow2 images never take that path; only well-formed reads do.
#[test]
fn cached_reads_complete_at_once_and_only_reads() {
    use super::request::{prepare, try_complete_cached};
    use super::testing::{backend_on, chain, open_image, qemu_img};
    use crate::virtio::testing::descriptors;

    let image = Image::new(0);
    let data = pattern(7, 2 * MIB as usize);
    // Just written: in the page cache.
    std::fs::write(&image.path, &data).unwrap();
    let disk = open_image(&image.path, false, None);
    let mut buf = vec![0u8; 8192];
    let slice = vm_memory::VolatileSlice::from(&mut buf[..]);
    assert!(disk.read_at_nowait(&[slice], 4096));
    assert_eq!(buf, &data[4096..4096 + 8192]);

    let mem = memory();
    let backend = backend_on(disk);
    header(&mem, HEADER, VIRTIO_BLK_T_IN, 16);
    let read = [r(HEADER, 16), w(DATA, 4096), w(STATUS, 1)];
    let prepared = prepare(chain(&mem, &read), &mem);
    assert_eq!(try_complete_cached(&prepared, &mem, &backend), Some(4097));
    assert_eq!(byte_at(&mem, STATUS), 0);
    assert_eq!(bytes_at(&mem, DATA, 4096), &data[8192..8192 + 4096]);
    assert!(backend.counters.snapshot().contains(&("read_requests", 1)));
    // A write, a read beyond the disk, a read with readable data: not here.
    header(&mem, HEADER, VIRTIO_BLK_T_OUT, 16);
    let write = [r(HEADER, 16), r(DATA, 4096), w(STATUS, 1)];
    assert_eq!(
        try_complete_cached(&prepare(descriptors(&write), &mem), &mem, &backend),
        None
    );
    header(&mem, HEADER, VIRTIO_BLK_T_IN, 2 * MIB / 512);
    assert_eq!(
        try_complete_cached(&prepare(descriptors(&read), &mem), &mem, &backend),
        None
    );
    header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);
    let odd = [r(HEADER, 16), r(DATA, 512), w(DATA, 512), w(STATUS, 1)];
    assert_eq!(
        try_complete_cached(&prepare(descriptors(&odd), &mem), &mem, &backend),
        None
    );

    drop(backend);
    let qcow2 = image.path.with_file_name("d.qcow2");
    let raw_path = image.path.display().to_string();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &raw_path,
        &qcow2.display().to_string(),
    ]);
    let disk = open_image(&qcow2, true, None);
    let slice = vm_memory::VolatileSlice::from(&mut buf[..]);
    assert!(!disk.read_at_nowait(&[slice], 0));
}
