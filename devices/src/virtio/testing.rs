//! Test helpers every virtio device's tests share: descriptor chains
//! described as (address, length, direction) and linked into raw split
//! descriptors for virtio-queue's `MockSplitQueue`.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

/// One descriptor of a test chain.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A device-readable descriptor.
pub fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

/// A device-writable descriptor.
pub fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

/// Raw split descriptors linking `descs` into one chain whose descriptors
/// sit at table indices `first..`.
pub fn raw(descs: &[Desc], first: u16) -> Vec<RawDescriptor> {
    let last = descs.len().saturating_sub(1);
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let mut next = 0;
            if i < last {
                flags |= VRING_DESC_F_NEXT as u16;
                next = first + i as u16 + 1;
            }
            RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next))
        })
        .collect()
}

/// `descs` as bare descriptors.
pub fn descriptors(descs: &[Desc]) -> Vec<SplitDescriptor> {
    raw(descs, 0)
        .into_iter()
        .map(SplitDescriptor::from)
        .collect()
}
