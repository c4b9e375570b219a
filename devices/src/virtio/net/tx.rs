//! The transmit side of one queue pair: each chain on the transmit queue
//! is one frame, virtio-net header first, written to the tap with one
//! `writev` straight from guest memory (no bounce buffer).
//!
//! A chain is sent only if it is device-readable throughout, ends
//! properly (no loop, no dangling `next`), lies in guest memory, holds at
//! least the 12-byte header and at most [`MAX_TX_LEN`] bytes, and its
//! header asks only for offloads the driver negotiated. Anything else is
//! dropped and counted (`tx_dropped`); a failed write is counted as
//! `tx_errors`. Either way the chain goes back to the driver with used
//! length 0, so a bad frame never stalls the queue.

use virtio_queue::{DescriptorChain, Error as QueueError, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::counters::{bump, PairCounters};
use super::header::{check_tx, TxOffloads, MAX_TX_LEN, VNET_HDR_LEN};
use super::tap::TapQueue;
use crate::virtio::GuestMemory;

/// Most iovecs one `writev` takes (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Scratch iovecs for one `writev`.
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the iovecs are scratch space of the worker that owns them: they
// are filled, passed to one writev and cleared on that thread, so their
// pointers are never used after the call or from another thread.
unsafe impl Send for Iovecs {}

/// A transmit queue.
pub(crate) struct Tx {
    /// The transmit queue.
    pub queue: Queue,
    /// Its index, for the interrupt.
    pub index: u16,
    /// Used entries were added since the last interrupt check.
    pub used: bool,
    offloads: TxOffloads,
    iovecs: Iovecs,
    /// The first descriptors of the chain, covering its header.
    header_segments: Vec<(GuestAddress, usize)>,
}

impl Tx {
    /// A transmit queue whose driver accepted `offloads`.
    pub fn new(queue: Queue, index: u16, offloads: TxOffloads) -> Self {
        Tx {
            queue,
            index,
            used: false,
            offloads,
            iovecs: Iovecs(Vec::with_capacity(64)),
            header_segments: Vec::with_capacity(4),
        }
    }

    /// Sends up to `budget` frames; returns true when chains are left
    /// over (notifications stay off: call again soon).
    pub fn process(
        &mut self,
        mem: &GuestMemory,
        tap: &TapQueue,
        counters: &PairCounters,
        budget: usize,
    ) -> Result<bool, QueueError> {
        let mut sent = 0;
        loop {
            self.queue.disable_notification(mem)?;
            while sent < budget {
                let Some(chain) = self.queue.iter(mem)?.next() else {
                    break;
                };
                self.send(chain, mem, tap, counters)?;
                sent += 1;
            }
            if sent >= budget {
                return Ok(true);
            }
            if !self.queue.enable_notification(mem)? {
                return Ok(false);
            }
        }
    }

    fn send(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        tap: &TapQueue,
        counters: &PairCounters,
    ) -> Result<(), QueueError> {
        let head = chain.head_index();
        // A head index beyond the queue names no descriptor: the driver
        // broke the ring and would wait for it forever, so the queue stops
        // and the device needs a reset.
        if head >= self.queue.size() {
            bump(&counters.tx_dropped, 1);
            return Err(QueueError::InvalidDescriptorIndex);
        }
        match self.gather(chain, mem) {
            Ok(len) => {
                // SAFETY: `gather` filled the iovecs from guest memory slices
                // of `mem`, which stays mapped across the call.
                match unsafe { tap.writev(&self.iovecs.0) } {
                    Ok(_) => {
                        bump(&counters.tx_frames, 1);
                        bump(&counters.tx_bytes, (len - VNET_HDR_LEN) as u64);
                    }
                    Err(_) => bump(&counters.tx_errors, 1),
                }
            }
            Err(_) => bump(&counters.tx_dropped, 1),
        }
        self.iovecs.0.clear();
        self.queue.add_used(mem, head, 0)?;
        self.used = true;
        Ok(())
    }

    /// Checks the chain and fills the iovecs; returns the frame length,
    /// header included.
    fn gather(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<usize, &'static str> {
        let iovecs = &mut self.iovecs.0;
        iovecs.clear();
        self.header_segments.clear();
        let mut len = 0usize;
        let mut dangling = false;
        for desc in chain {
            dangling = desc.has_next();
            if desc.is_write_only() {
                return Err("device-writable descriptor");
            }
            let desc_len = desc.len() as usize;
            len += desc_len;
            if len > MAX_TX_LEN {
                return Err("frame longer than 65550 bytes");
            }
            if desc_len == 0 {
                continue;
            }
            if len - desc_len < VNET_HDR_LEN {
                self.header_segments.push((desc.addr(), desc_len));
            }
            for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), desc_len) {
                let slice = slice.map_err(|_| "buffer outside guest memory")?;
                if iovecs.len() == IOV_MAX {
                    return Err("more than 1024 buffers");
                }
                iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        if dangling {
            return Err("descriptor chain loops or ends early");
        }
        if len < VNET_HDR_LEN {
            return Err("header shorter than 12 bytes");
        }
        let header = self.read_header(mem)?;
        check_tx(&header, len, self.offloads)?;
        Ok(len)
    }

    fn read_header(&self, mem: &GuestMemory) -> Result<[u8; VNET_HDR_LEN], &'static str> {
        let mut header = [0u8; VNET_HDR_LEN];
        let mut done = 0;
        for &(addr, len) in &self.header_segments {
            let n = len.min(VNET_HDR_LEN - done);
            mem.read_slice(&mut header[done..done + n], addr)
                .map_err(|_| "header outside guest memory")?;
            done += n;
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use virtio_queue::desc::RawDescriptor;

    use super::*;
    use crate::virtio::net::header::{CSUM_OFFSET, CSUM_START, FLAGS, GSO_SIZE, GSO_TYPE};
    use crate::virtio::net::tap::TapSet;
    use crate::virtio::net::testing::*;

    const SIZE: u16 = 64;

    struct Fixture<'m> {
        mem: &'m GuestMemory,
        vq: TestQueue<'m>,
        tx: Tx,
        taps: TapSet,
        peer: OwnedFd,
        counters: PairCounters,
        next_desc: u16,
    }

    impl<'m> Fixture<'m> {
        fn new(mem: &'m GuestMemory, offloads: TxOffloads) -> Self {
            let vq = mock_queue(mem, 1, SIZE);
            let tx = Tx::new(vq.create_queue(), 1, offloads);
            let (end, peer) = socket_pair();
            Fixture {
                mem,
                vq,
                tx,
                taps: TapSet::fake(vec![end]),
                peer,
                counters: PairCounters::default(),
                next_desc: 0,
            }
        }

        fn post_raw(&mut self, descs: Vec<RawDescriptor>) {
            let count = descs.len() as u16;
            self.vq.add_desc_chains(&descs, self.next_desc);
            self.next_desc += count;
        }

        fn post(&mut self, descs: &[Desc]) {
            self.post_raw(raw(descs, self.next_desc));
        }

        fn process(&mut self, budget: usize) -> bool {
            let tap = self.taps.queue(0).unwrap().clone();
            self.tx
                .process(self.mem, &tap, &self.counters, budget)
                .unwrap()
        }

        fn count(&self, field: fn(&PairCounters) -> &AtomicU64) -> u64 {
            field(&self.counters).load(Ordering::Relaxed)
        }

        fn next_frame(&self) -> Option<Vec<u8>> {
            receive(&self.peer, Duration::from_millis(20))
        }
    }

    #[test]
    fn a_frame_reaches_the_tap_byte_exact() {
        let mem = memory();
        let mut f = Fixture::new(&mem, TxOffloads::default());
        let bytes = frame(&pattern(2, 1500));
        // Header split over two descriptors, payload over two more.
        mem.write_slice(&bytes[..5], GuestAddress(DATA)).unwrap();
        mem.write_slice(&bytes[5..700], GuestAddress(DATA + 0x1000))
            .unwrap();
        mem.write_slice(&bytes[700..], GuestAddress(DATA + 0x2000))
            .unwrap();
        f.post(&[
            r(DATA, 5),
            r(DATA + 0x1000, 695),
            r(DATA + 0x3000, 0),
            r(DATA + 0x2000, 812),
        ]);
        assert!(!f.process(64));
        assert_eq!(f.next_frame(), Some(bytes));
        assert_eq!(f.vq.used_idx(), 1);
        assert_eq!(f.vq.used_elem(0), (0, 0));
        assert!(f.tx.used);
        assert_eq!(f.count(|c| &c.tx_frames), 1);
        assert_eq!(f.count(|c| &c.tx_bytes), 1500);
    }

    #[test]
    fn malformed_chains_are_dropped_and_returned() {
        let mem = memory();
        let mut f = Fixture::new(&mem, TxOffloads::default());
        mem.write_slice(&frame(&[9; 100]), GuestAddress(DATA))
            .unwrap();
        // A device-writable descriptor; a short header; too long; outside
        // guest memory.
        f.post(&[r(DATA, 60), w(DATA + 0x1000, 60)]);
        f.post(&[r(DATA, 11)]);
        f.post(&[r(DATA, 40_000), r(DATA + 0x1_0000, 25_551)]);
        f.post(&[r(DATA, 12), r(MEM_SIZE as u64 - 8, 64)]);
        // A loop: the last descriptor points back at the first.
        let mut looped = raw(&[r(DATA, 20), r(DATA, 20)], f.next_desc);
        looped[1] = set_next(looped[1], f.next_desc);
        f.post_raw(looped);
        // A dangling next index beyond the table.
        let mut dangling = raw(&[r(DATA, 60)], f.next_desc);
        dangling[0] = set_next(dangling[0], 1000);
        f.post_raw(dangling);
        // A partial checksum the driver did not negotiate.
        let mut header = [0u8; 12];
        header[FLAGS] = 1;
        mem.write_slice(&header, GuestAddress(DATA + 0x2000))
            .unwrap();
        f.post(&[r(DATA + 0x2000, 80)]);
        // Finally a good one.
        f.post(&[r(DATA, 112)]);
        assert!(!f.process(64));
        assert_eq!(
            f.next_frame(),
            Some(frame(&[9; 100])),
            "only the good frame"
        );
        assert_eq!(f.next_frame(), None);
        assert_eq!(f.count(|c| &c.tx_dropped), 7);
        assert_eq!(f.count(|c| &c.tx_frames), 1);
        assert_eq!(f.vq.used_idx(), 8, "every chain returned");
        for i in 0..8 {
            assert_eq!(f.vq.used_elem(i).1, 0);
        }
    }

    #[test]
    fn offloaded_frames_pass_when_negotiated() {
        let mem = memory();
        let offloads = TxOffloads {
            csum: true,
            tso4: true,
            ..TxOffloads::default()
        };
        let mut f = Fixture::new(&mem, offloads);
        let mut bytes = frame(&pattern(4, 9000));
        bytes[FLAGS] = 1;
        bytes[GSO_TYPE] = 1;
        bytes[GSO_SIZE..GSO_SIZE + 2].copy_from_slice(&1448u16.to_le_bytes());
        bytes[CSUM_START..CSUM_START + 2].copy_from_slice(&34u16.to_le_bytes());
        bytes[CSUM_OFFSET..CSUM_OFFSET + 2].copy_from_slice(&16u16.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        f.post(&[r(DATA, bytes.len() as u32)]);
        // TCPv6 was not negotiated.
        let mut v6 = bytes.clone();
        v6[GSO_TYPE] = 4;
        mem.write_slice(&v6, GuestAddress(DATA + 0x1_0000)).unwrap();
        f.post(&[r(DATA + 0x1_0000, v6.len() as u32)]);
        assert!(!f.process(64));
        assert_eq!(f.next_frame(), Some(bytes));
        assert_eq!(f.next_frame(), None);
        assert_eq!(f.count(|c| &c.tx_dropped), 1);
    }

    #[test]
    fn work_is_bounded_and_write_errors_are_counted() {
        let mem = memory();
        let mut f = Fixture::new(&mem, TxOffloads::default());
        mem.write_slice(&frame(&[3; 50]), GuestAddress(DATA))
            .unwrap();
        for _ in 0..5 {
            f.post(&[r(DATA, 62)]);
        }
        assert!(f.process(3), "two chains left");
        assert_eq!(f.count(|c| &c.tx_frames), 3);
        assert!(!f.process(3));
        assert_eq!(f.count(|c| &c.tx_frames), 5);
        // The peer is gone: writes fail, chains still come back.
        let Fixture { peer, .. } = &mut f;
        let (_, replacement) = socket_pair();
        drop(std::mem::replace(peer, replacement));
        f.post(&[r(DATA, 62)]);
        assert!(!f.process(3));
        assert_eq!(f.count(|c| &c.tx_errors), 1);
        assert_eq!(f.vq.used_idx(), 6);
    }

    #[test]
    fn a_head_index_beyond_the_queue_breaks_the_queue_without_a_used_entry() {
        let mem = memory();
        let mut f = Fixture::new(&mem, TxOffloads::default());
        // Avail entry 0 names descriptor 200 of a 64-entry queue.
        f.post(&[r(DATA, 62)]);
        f.vq.set_avail_entry(0, 200);
        let tap = f.taps.queue(0).unwrap().clone();
        let result = f.tx.process(f.mem, &tap, &f.counters, 64);
        assert!(
            matches!(result, Err(QueueError::InvalidDescriptorIndex)),
            "{result:?}"
        );
        assert_eq!(f.count(|c| &c.tx_dropped), 1);
        assert_eq!(f.vq.used_idx(), 0);
    }
}
