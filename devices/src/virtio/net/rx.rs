//! The receive side of one queue pair: placing a frame read from the tap
//! (virtio-net header first) into the buffers the driver posted on its
//! receive queue.
//!
//! With VIRTIO_NET_F_MRG_RXBUF a frame spans as many chains as it needs
//! and `num_buffers` says how many; without it, it must fit one chain.
//! Chains are looked at before they are taken: when the posted room is
//! not enough yet, they stay on the ring and the frame stays pending
//! until the driver posts more (its kick is armed just past the chains
//! already seen). A frame that cannot fit even a full ring (or, without
//! MRG_RXBUF, the chain at the head) is dropped and counted. Only
//! device-writable descriptors inside guest memory count as room; a chain
//! without any is returned unused, with length 0.

use std::sync::atomic::Ordering;

use virtio_queue::{Error as QueueError, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::counters::{bump, PairCounters};
use super::header::{FLAGS, MAX_RX_LEN, NUM_BUFFERS, VNET_HDR_LEN};
use crate::virtio::GuestMemory;

/// A chain taken into a frame's plan.
#[derive(Clone, Copy, Debug)]
struct Planned {
    head: u16,
    /// Its writable segments: `segments[first..end]`.
    first: usize,
    end: usize,
    room: usize,
}

/// What happened to the pending frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Written to the guest (or there was none).
    Delivered,
    /// Dropped and counted: it cannot fit the driver's buffers.
    Dropped,
    /// Kept pending until the driver posts more buffers.
    NeedBuffers,
}

/// A receive queue and its frame buffer.
pub(crate) struct Rx {
    /// The receive queue.
    pub queue: Queue,
    /// Its index, for the interrupt.
    pub index: u16,
    /// Used entries were added since the last interrupt check.
    pub used: bool,
    mrg: bool,
    guest_csum: bool,
    buf: Box<[u8]>,
    pending: Option<usize>,
    /// The driver's next kick is armed.
    armed: bool,
    /// The avail index up to which the last plan looked.
    seen: u16,
    chains: Vec<Planned>,
    segments: Vec<(GuestAddress, usize)>,
}

impl Rx {
    /// A receive queue; `mrg` and `guest_csum` say whether the driver
    /// accepted VIRTIO_NET_F_MRG_RXBUF and VIRTIO_NET_F_GUEST_CSUM.
    pub fn new(queue: Queue, index: u16, mrg: bool, guest_csum: bool) -> Self {
        Rx {
            queue,
            index,
            used: false,
            mrg,
            guest_csum,
            buf: vec![0u8; MAX_RX_LEN].into_boxed_slice(),
            pending: None,
            armed: false,
            seen: 0,
            chains: Vec::new(),
            segments: Vec::new(),
        }
    }

    /// Whether a frame waits for buffers.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The buffer to read the next frame into.
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The buffer now holds a frame of `len` bytes.
    pub fn set_pending(&mut self, len: usize) {
        self.pending = Some(len.min(self.buf.len()));
    }

    /// Forgets the pending frame; whether there was one.
    pub fn take_pending(&mut self) -> bool {
        self.pending.take().is_some()
    }

    /// Whether the driver posted chains not yet taken.
    pub fn has_buffers(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        let next = self.queue.next_avail();
        let avail = self.queue.avail_idx(mem, Ordering::Acquire)?.0;
        self.seen = next;
        Ok(avail != next)
    }

    /// Whether the driver's kick is armed.
    pub fn armed(&self) -> bool {
        self.armed
    }

    /// Asks the driver to kick when it posts past what the last plan saw;
    /// returns true if it already did (then retry rather than sleep).
    pub fn arm(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        let next = self.queue.next_avail();
        self.queue.set_next_avail(self.seen);
        let posted = self.queue.enable_notification(mem);
        self.queue.set_next_avail(next);
        self.armed = true;
        posted
    }

    /// Stops the driver's kicks: the worker is taking buffers.
    pub fn disarm(&mut self, mem: &GuestMemory) -> Result<(), QueueError> {
        self.armed = false;
        self.queue.disable_notification(mem)
    }

    /// Places the pending frame, if any.
    pub fn deliver(
        &mut self,
        mem: &GuestMemory,
        counters: &PairCounters,
    ) -> Result<Delivery, QueueError> {
        let Some(len) = self.pending else {
            return Ok(Delivery::Delivered);
        };
        if len < VNET_HDR_LEN {
            self.pending = None;
            bump(&counters.rx_errors, 1);
            return Ok(Delivery::Dropped);
        }
        // Each round without MRG_RXBUF either ends or takes a chain.
        loop {
            let start = self.queue.next_avail();
            let room = self.plan(mem, len)?;
            if room >= len {
                self.write_frame(mem, len)?;
                self.pending = None;
                bump(&counters.rx_frames, 1);
                bump(&counters.rx_bytes, (len - VNET_HDR_LEN) as u64);
                return Ok(Delivery::Delivered);
            }
            // Not enough room: the chains stay on the ring.
            self.queue.set_next_avail(start);
            let taken = self.chains.len();
            if !self.mrg && taken == 1 && self.chains[0].room == 0 {
                self.queue.set_next_avail(start.wrapping_add(1));
                self.return_unused(mem, self.chains[0].head)?;
                bump(&counters.rx_invalid_buffers, 1);
                continue;
            }
            let full_ring = taken == usize::from(self.queue.size());
            if (!self.mrg && taken == 1) || full_ring {
                self.pending = None;
                bump(&counters.rx_dropped, 1);
                return Ok(Delivery::Dropped);
            }
            // `taken` is at most the queue size, a u16.
            self.seen = start.wrapping_add(taken as u16);
            return Ok(Delivery::NeedBuffers);
        }
    }

    /// Takes chains off the ring until they hold `len` bytes (one chain
    /// without MRG_RXBUF); returns their room.
    fn plan(&mut self, mem: &GuestMemory, len: usize) -> Result<usize, QueueError> {
        let Rx {
            queue,
            chains,
            segments,
            mrg,
            ..
        } = self;
        chains.clear();
        segments.clear();
        let mut room = 0;
        let mut iter = queue.iter(mem)?;
        while room < len {
            let Some(chain) = iter.next() else {
                break;
            };
            let head = chain.head_index();
            let first = segments.len();
            let mut chain_room = 0usize;
            for desc in chain {
                let desc_len = desc.len() as usize;
                let usable = desc.is_write_only()
                    && desc_len > 0
                    && GuestMemoryBackend::check_range(mem, desc.addr(), desc_len);
                if usable {
                    segments.push((desc.addr(), desc_len));
                    chain_room = chain_room.saturating_add(desc_len);
                }
            }
            let end = segments.len();
            chains.push(Planned {
                head,
                first,
                end,
                room: chain_room,
            });
            room = room.saturating_add(chain_room);
            if !*mrg {
                break;
            }
        }
        Ok(room)
    }

    /// Writes the frame across the planned chains and returns them used.
    fn write_frame(&mut self, mem: &GuestMemory, len: usize) -> Result<(), QueueError> {
        let Rx {
            queue,
            chains,
            segments,
            buf,
            used,
            mrg,
            guest_csum,
            ..
        } = self;
        let frame = &mut buf[..len];
        if !*guest_csum {
            // Without GUEST_CSUM the driver must see no checksum flags.
            frame[FLAGS] = 0;
        }
        // At most the queue size (4096) chains.
        let buffers = if *mrg { chains.len() as u16 } else { 1 };
        frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&buffers.to_le_bytes());
        let mut offset = 0;
        for chain in chains.iter() {
            let mut written = 0usize;
            for &(addr, seg_len) in &segments[chain.first..chain.end] {
                let n = seg_len.min(len - offset);
                if n == 0 {
                    break;
                }
                mem.write_slice(&frame[offset..offset + n], addr)
                    .map_err(QueueError::GuestMemory)?;
                offset += n;
                written += n;
            }
            // A frame fits u32 (at most MAX_RX_LEN bytes).
            add_used(queue, mem, chain.head, written as u32)?;
            *used = true;
        }
        Ok(())
    }

    fn return_unused(&mut self, mem: &GuestMemory, head: u16) -> Result<(), QueueError> {
        add_used(&mut self.queue, mem, head, 0)?;
        self.used = true;
        Ok(())
    }
}

/// Returns chain `head` with `len` bytes written; a head index beyond the
/// queue names no descriptor: the driver broke the ring, the queue stops
/// (and the device needs a reset).
fn add_used(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
    if head >= queue.size() {
        return Err(QueueError::InvalidDescriptorIndex);
    }
    queue.add_used(mem, head, len)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::virtio::net::header::{GSO_TYPE, VNET_HDR_LEN};
    use crate::virtio::net::testing::*;

    const SIZE: u16 = 16;

    struct Fixture<'m> {
        mem: &'m GuestMemory,
        vq: TestQueue<'m>,
        rx: Rx,
        counters: PairCounters,
        next_desc: u16,
    }

    impl<'m> Fixture<'m> {
        fn new(mem: &'m GuestMemory, mrg: bool) -> Self {
            let vq = mock_queue(mem, 0, SIZE);
            let rx = Rx::new(vq.create_queue(), 0, mrg, true);
            Fixture {
                mem,
                vq,
                rx,
                counters: PairCounters::default(),
                next_desc: 0,
            }
        }

        /// Posts one chain of `descs`.
        fn post(&mut self, descs: &[Desc]) {
            self.vq
                .add_desc_chains(&raw(descs, self.next_desc), self.next_desc);
            self.next_desc += descs.len() as u16;
        }

        /// Makes `bytes` the pending frame and delivers it.
        fn deliver(&mut self, bytes: &[u8]) -> Delivery {
            self.rx.buffer_mut()[..bytes.len()].copy_from_slice(bytes);
            self.rx.set_pending(bytes.len());
            self.rx.deliver(self.mem, &self.counters).unwrap()
        }

        fn count(&self, field: fn(&PairCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
            field(&self.counters).load(Ordering::Relaxed)
        }
    }

    #[test]
    fn mergeable_buffers_span_chains_and_count_them() {
        let mem = memory();
        let mut f = Fixture::new(&mem, true);
        for i in 0..4 {
            f.post(&[w(DATA + i * 0x1000, 1000)]);
        }
        let payload = pattern(3, 2500 - VNET_HDR_LEN);
        let bytes = frame(&payload);
        assert_eq!(f.deliver(&bytes), Delivery::Delivered);
        assert!(!f.rx.has_pending());
        assert_eq!(f.vq.used_idx(), 3, "three of the four chains");
        assert_eq!(
            [f.vq.used_elem(0), f.vq.used_elem(1), f.vq.used_elem(2)],
            [(0, 1000), (1, 1000), (2, 500)]
        );
        let header = bytes_at(&mem, DATA, VNET_HDR_LEN);
        assert_eq!(&header[NUM_BUFFERS..], &3u16.to_le_bytes(), "num_buffers");
        let mut received = bytes_at(&mem, DATA + 12, 988);
        received.extend(bytes_at(&mem, DATA + 0x1000, 1000));
        received.extend(bytes_at(&mem, DATA + 0x2000, 500));
        assert_eq!(received, payload);
        assert!(f.rx.used);
        assert_eq!(f.count(|c| &c.rx_frames), 1);
        assert_eq!(f.count(|c| &c.rx_bytes), payload.len() as u64);
    }

    #[test]
    fn a_head_index_beyond_the_queue_breaks_the_queue() {
        let mem = memory();
        let mut f = Fixture::new(&mem, false);
        f.post(&[w(DATA, 1600)]);
        // Avail entry 0 names descriptor 200 of a 16-entry queue.
        f.vq.set_avail_entry(0, 200);
        let bytes = frame(&[1; 60]);
        f.rx.buffer_mut()[..bytes.len()].copy_from_slice(&bytes);
        f.rx.set_pending(bytes.len());
        let result = f.rx.deliver(f.mem, &f.counters);
        assert!(
            matches!(result, Err(QueueError::InvalidDescriptorIndex)),
            "{result:?}"
        );
        assert_eq!(f.vq.used_idx(), 0);
    }

    #[test]
    fn without_mergeable_buffers_a_frame_uses_one_chain() {
        let mem = memory();
        let mut f = Fixture::new(&mem, false);
        // A chain of two writable descriptors holds the whole frame.
        f.post(&[w(DATA, 12), w(DATA + 0x100, 1514)]);
        f.post(&[w(DATA + 0x1000, 100)]);
        let mut bytes = frame(&pattern(5, 1514));
        bytes[NUM_BUFFERS] = 9;
        assert_eq!(f.deliver(&bytes), Delivery::Delivered);
        assert_eq!(f.vq.used_elem(0), (0, 1526));
        assert_eq!(
            &bytes_at(&mem, DATA, 12)[NUM_BUFFERS..],
            &[1, 0],
            "num_buffers 1"
        );
        assert_eq!(bytes_at(&mem, DATA + 0x100, 1514), pattern(5, 1514));
        // Too big for the chain at the head: dropped, the chain stays.
        assert_eq!(f.deliver(&frame(&[7; 200])), Delivery::Dropped);
        assert_eq!(f.count(|c| &c.rx_dropped), 1);
        assert_eq!(f.vq.used_idx(), 1);
        assert_eq!(f.deliver(&frame(&[7; 88])), Delivery::Delivered);
        assert_eq!(f.vq.used_elem(1), (2, 100));
    }

    #[test]
    fn with_no_room_the_frame_stays_pending_until_buffers_come() {
        let mem = memory();
        let mut f = Fixture::new(&mem, true);
        f.rx.queue.set_event_idx(true);
        let avail_event = f.vq.avail_event();
        assert!(!f.rx.has_buffers(&mem).unwrap());
        let bytes = frame(&pattern(9, 3000));
        assert_eq!(f.deliver(&bytes), Delivery::NeedBuffers);
        assert!(f.rx.has_pending());
        // Arming asks for a kick at the next buffer.
        mem.write_obj(0xffffu16, avail_event).unwrap();
        assert!(!f.rx.arm(&mem).unwrap());
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 0);
        f.post(&[w(DATA, 2048)]);
        assert_eq!(
            f.deliver(&bytes),
            Delivery::NeedBuffers,
            "one is not enough"
        );
        assert_eq!(f.vq.used_idx(), 0, "nothing taken");
        // Armed past the chain already seen: posting another is noticed.
        assert!(!f.rx.arm(&mem).unwrap());
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 1);
        f.post(&[w(DATA + 0x1000, 2048)]);
        assert!(
            f.rx.arm(&mem).unwrap(),
            "the new chain is seen while arming"
        );
        f.rx.disarm(&mem).unwrap();
        assert_eq!(f.deliver(&bytes), Delivery::Delivered);
        assert_eq!(
            [f.vq.used_elem(0), f.vq.used_elem(1)],
            [(0, 2048), (1, 964)]
        );
        assert_eq!(f.count(|c| &c.rx_dropped), 0);
    }

    #[test]
    fn a_frame_larger_than_a_full_ring_is_dropped() {
        let mem = memory();
        let mut f = Fixture::new(&mem, true);
        for i in 0..u64::from(SIZE) {
            f.post(&[w(DATA + i * 0x1000, 1024)]);
        }
        let big = frame(&pattern(1, 16 * 1024));
        assert_eq!(f.deliver(&big), Delivery::Dropped);
        assert_eq!(f.count(|c| &c.rx_dropped), 1);
        assert_eq!(f.vq.used_idx(), 0, "no buffer consumed");
        assert_eq!(f.deliver(&frame(&[1; 100])), Delivery::Delivered);
    }

    #[test]
    fn chains_without_writable_room_are_returned_empty() {
        let mem = memory();
        let mut f = Fixture::new(&mem, false);
        // Readable only, then writable outside memory: no room either.
        f.post(&[r(DATA, 2048)]);
        f.post(&[w(MEM_SIZE as u64 - 16, 2048)]);
        f.post(&[r(DATA, 12), w(DATA + 0x1000, 2048)]);
        assert_eq!(f.deliver(&frame(&[4; 64])), Delivery::Delivered);
        assert_eq!(
            [f.vq.used_elem(0), f.vq.used_elem(1), f.vq.used_elem(2)],
            [(0, 0), (1, 0), (2, 76)]
        );
        assert_eq!(f.count(|c| &c.rx_invalid_buffers), 2);
    }

    #[test]
    fn checksum_flags_need_guest_csum_and_short_frames_are_errors() {
        let mem = memory();
        let mut f = Fixture::new(&mem, true);
        f.rx.guest_csum = false;
        f.post(&[w(DATA, 2048)]);
        let mut bytes = frame(&[1; 60]);
        bytes[FLAGS] = 2; // DATA_VALID, as a tap reports it.
        bytes[GSO_TYPE] = 0;
        assert_eq!(f.deliver(&bytes), Delivery::Delivered);
        assert_eq!(byte_at(&mem, DATA), 0, "flags cleared");
        assert_eq!(f.deliver(&[0; 5]), Delivery::Dropped);
        assert_eq!(f.count(|c| &c.rx_errors), 1);
    }
}
