//! The control queue (virtio 1.2 §5.1.6.5) and the set of active queue
//! pairs it steers. Each command is a chain of the device-readable
//! `class`, `command` and data, then one device-writable ack byte (the
//! last writable byte of the chain). Only VIRTIO_NET_CTRL_MQ /
//! VQ_PAIRS_SET is supported (1 to the usable pairs, with
//! VIRTIO_NET_F_MQ); everything else, and any malformed command, is
//! answered VIRTIO_NET_ERR. A chain without a writable byte is returned
//! with used length 0.

use std::sync::atomic::{AtomicU16, Ordering};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Error as QueueError, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::GuestMemory;

/// Most command bytes looked at (class, command, data); longer commands
/// are of classes not supported and are refused.
const MAX_COMMAND: usize = 64;

/// The queue pairs the driver uses, shared by the workers.
pub(crate) struct Pairs {
    active: AtomicU16,
    usable: u16,
    mq: bool,
    wakes: Vec<EventFd>,
}

impl Pairs {
    /// `usable` pairs have workers, woken through `wakes` when the active
    /// count changes; one pair is active until the driver sets more.
    pub fn new(usable: u16, mq: bool, wakes: Vec<EventFd>) -> Self {
        Pairs {
            active: AtomicU16::new(1),
            usable,
            mq,
            wakes,
        }
    }

    /// Pairs the driver uses.
    pub fn active(&self) -> u16 {
        self.active.load(Ordering::Acquire)
    }

    /// VQ_PAIRS_SET: whether `pairs` is acceptable; if so it is applied
    /// and every worker woken.
    pub fn set_active(&self, pairs: u16) -> bool {
        if !self.mq || pairs == 0 || pairs > self.usable {
            return false;
        }
        self.active.store(pairs, Ordering::Release);
        for wake in &self.wakes {
            // A full counter already wakes the worker.
            let _ = wake.write(1);
        }
        true
    }
}

/// The control queue.
pub(crate) struct Ctrl {
    /// The control queue.
    pub queue: Queue,
    /// Its index, for the interrupt.
    pub index: u16,
    /// Used entries were added since the last interrupt check.
    pub used: bool,
}

impl Ctrl {
    /// Wraps the driver's control queue.
    pub fn new(queue: Queue, index: u16) -> Self {
        Ctrl {
            queue,
            index,
            used: false,
        }
    }

    /// Answers every available command.
    pub fn process(&mut self, mem: &GuestMemory, pairs: &Pairs) -> Result<(), QueueError> {
        loop {
            self.queue.disable_notification(mem)?;
            while let Some(chain) = self.queue.iter(mem)?.next() {
                let head = chain.head_index();
                // A head beyond the queue: the driver broke the ring.
                if head >= self.queue.size() {
                    return Err(QueueError::InvalidDescriptorIndex);
                }
                let used_len = answer(chain, mem, pairs);
                self.queue.add_used(mem, head, used_len)?;
                self.used = true;
            }
            if !self.queue.enable_notification(mem)? {
                return Ok(());
            }
        }
    }
}

/// A command chain, collected.
struct Command {
    bytes: [u8; MAX_COMMAND],
    readable: usize,
    ack: Option<GuestAddress>,
    malformed: bool,
}

/// Runs one command; returns the used length (1 with an ack, else 0).
fn answer<I>(descriptors: I, mem: &GuestMemory, pairs: &Pairs) -> u32
where
    I: IntoIterator<Item = Descriptor>,
{
    let command = collect(descriptors, mem);
    let Some(ack_addr) = command.ack else {
        return 0;
    };
    let ack = if !command.malformed && execute(&command, pairs) {
        VIRTIO_NET_OK
    } else {
        VIRTIO_NET_ERR
    };
    // The ack codes are 0 and 1.
    match mem.write_obj(ack as u8, ack_addr) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

fn collect<I>(descriptors: I, mem: &GuestMemory) -> Command
where
    I: IntoIterator<Item = Descriptor>,
{
    let mut command = Command {
        bytes: [0; MAX_COMMAND],
        readable: 0,
        ack: None,
        malformed: false,
    };
    let mut dangling = false;
    for desc in descriptors {
        dangling = desc.has_next();
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            command.malformed = true;
            continue;
        }
        if desc.is_write_only() {
            // The ack is the last writable byte; `len` is at least 1.
            command.ack = desc.addr().checked_add(len as u64 - 1);
            continue;
        }
        if command.ack.is_some() {
            command.malformed = true;
        }
        let start = command.readable.min(MAX_COMMAND);
        let n = len.min(MAX_COMMAND - start);
        if mem
            .read_slice(&mut command.bytes[start..start + n], desc.addr())
            .is_err()
        {
            command.malformed = true;
        }
        command.readable = command.readable.saturating_add(len);
    }
    command.malformed |= dangling;
    command
}

/// Whether the command succeeded.
fn execute(command: &Command, pairs: &Pairs) -> bool {
    let [class, cmd, data @ ..] = &command.bytes;
    if command.readable < 2 || u32::from(*class) != VIRTIO_NET_CTRL_MQ {
        return false;
    }
    if u32::from(*cmd) != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET || command.readable != 4 {
        return false;
    }
    pairs.set_active(u16::from_le_bytes([data[0], data[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::testing::*;

    fn pairs(usable: u16, mq: bool) -> (Pairs, Vec<EventFd>) {
        let wakes: Vec<EventFd> = (0..usable).map(|_| eventfd()).collect();
        let clones = wakes.iter().map(|w| w.try_clone().unwrap()).collect();
        (Pairs::new(usable, mq, clones), wakes)
    }

    /// Writes `bytes` at `DATA` and answers a chain of them plus an ack
    /// byte at `ACK`; returns (used length, ack).
    fn run(pairs: &Pairs, bytes: &[u8], descs: &[Desc]) -> (u32, u8) {
        let mem = memory();
        mem.write_slice(bytes, GuestAddress(DATA)).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(ACK)).unwrap();
        let used = answer(descriptors(descs), &mem, pairs);
        (used, mem.read_obj(GuestAddress(ACK)).unwrap())
    }

    const ACK: u64 = 0x30_0000;

    fn set_pairs(n: u16) -> Vec<u8> {
        let mut bytes = vec![
            VIRTIO_NET_CTRL_MQ as u8,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
        ];
        bytes.extend_from_slice(&n.to_le_bytes());
        bytes
    }

    #[test]
    fn vq_pairs_set_accepts_1_to_the_usable_pairs_and_wakes_workers() {
        let (pairs, wakes) = pairs(4, true);
        assert_eq!(pairs.active(), 1);
        let chain = [r(DATA, 4), w(ACK, 1)];
        assert_eq!(run(&pairs, &set_pairs(3), &chain), (1, VIRTIO_NET_OK as u8));
        assert_eq!(pairs.active(), 3);
        for wake in &wakes {
            assert_eq!(wake.read().unwrap(), 1);
        }
        for bad in [0, 5, u16::MAX] {
            assert_eq!(
                run(&pairs, &set_pairs(bad), &chain),
                (1, VIRTIO_NET_ERR as u8)
            );
            assert_eq!(pairs.active(), 3, "{bad} ignored");
        }
        assert!(wakes[0].read().is_err(), "refused commands wake no one");
        // Header and data split across descriptors.
        let split = [r(DATA, 1), r(DATA + 1, 3), w(ACK - 8, 9)];
        assert_eq!(run(&pairs, &set_pairs(4), &split), (1, 0));
        assert_eq!(pairs.active(), 4);
    }

    #[test]
    fn vq_pairs_set_needs_mq() {
        let (pairs, _wakes) = pairs(1, false);
        let chain = [r(DATA, 4), w(ACK, 1)];
        assert_eq!(
            run(&pairs, &set_pairs(1), &chain),
            (1, VIRTIO_NET_ERR as u8)
        );
    }

    #[test]
    fn unknown_and_malformed_commands_get_err() {
        let (pairs, _wakes) = pairs(2, true);
        let err = (1, VIRTIO_NET_ERR as u8);
        // CTRL_RX promisc, CTRL_MAC, MQ RSS config: not supported.
        for bytes in [[0u8, 0, 1, 0], [1, 1, 0, 0], [4, 1, 0, 0]] {
            assert_eq!(
                run(&pairs, &bytes, &[r(DATA, 4), w(ACK, 1)]),
                err,
                "{bytes:?}"
            );
        }
        let good = set_pairs(2);
        // Too short, too long, data after the ack, outside memory.
        assert_eq!(run(&pairs, &good, &[r(DATA, 1), w(ACK, 1)]), err);
        assert_eq!(run(&pairs, &good, &[r(DATA, 5), w(ACK, 1)]), err);
        assert_eq!(
            run(&pairs, &good, &[r(DATA, 2), w(ACK, 1), r(DATA + 2, 2)]),
            err
        );
        assert_eq!(
            run(
                &pairs,
                &good,
                &[r(DATA, 4), r(MEM_SIZE as u64, 4), w(ACK, 1)]
            ),
            err
        );
        assert_eq!(pairs.active(), 1, "nothing applied");
        // No writable byte: nothing to answer into.
        assert_eq!(run(&pairs, &good, &[r(DATA, 4)]), (0, 0xee));
        assert_eq!(run(&pairs, &good, &[]), (0, 0xee));
    }

    #[test]
    fn the_control_queue_answers_in_order_and_survives_loops() {
        let mem = memory();
        let (pairs, _wakes) = pairs(2, true);
        let vq = mock_queue(&mem, 0, 16);
        mem.write_slice(&set_pairs(2), GuestAddress(DATA)).unwrap();
        vq.add_desc_chains(&raw(&[r(DATA, 4), w(ACK, 1)], 0), 0);
        // A chain whose last descriptor points back at its first.
        let mut looped = raw(&[r(DATA, 4), w(ACK + 1, 1)], 2);
        let last = looped.len() - 1;
        looped[last] = set_next(looped[last], 2);
        vq.add_desc_chains(&looped, 2);
        let mut ctrl = Ctrl::new(vq.create_queue(), 4);
        ctrl.process(&mem, &pairs).unwrap();
        assert!(ctrl.used);
        assert_eq!(vq.used_idx(), 2);
        assert_eq!(vq.used_elem(0), (0, 1));
        assert_eq!(vq.used_elem(1), (2, 1));
        assert_eq!(byte_at(&mem, ACK), VIRTIO_NET_OK as u8);
        assert_eq!(byte_at(&mem, ACK + 1), VIRTIO_NET_ERR as u8, "loop refused");
        assert_eq!(pairs.active(), 2);
    }
}
