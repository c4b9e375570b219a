//! The PCI bus as the guest sees it: configuration space accesses to any
//! slot and function (header, BARs being sized and moved, capabilities,
//! the virtio PCI configuration access capability) and MMIO to the BAR of
//! a virtio-pci function — common configuration (feature negotiation,
//! queue set-up, status, reset), ISR, device configuration, notifications
//! and the MSI-X table and PBA. The function wraps virtio-rng (fed from a
//! file of zeroes), so a driver that gets as far as DRIVER_OK activates a
//! real device on the queues it set up.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use devices::pci::virtio::VIRTIO_BAR_SIZE;
use devices::pci::{BarAllocator, PciRoot, VirtioPciDevice};
use devices::virtio::rng::{Rng, RngConfig};
use libfuzzer_sys::fuzz_target;
use zvmm_fuzz::{guest_memory, Input, NoRouter};

/// A file of zeroes the device draws its entropy from.
fn source() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = zvmm_fuzz::scratch_dir().join("entropy");
        std::fs::write(&path, vec![0u8; 1 << 16]).expect("scratch file");
        path
    })
}

/// A bus with the host bridge and one virtio-rng function; its slot.
fn bus() -> (PciRoot, u8) {
    let rng = Rng::new(RngConfig {
        id: "fuzz".into(),
        source: source().clone(),
    })
    .expect("rng device");
    let function =
        VirtioPciDevice::new(Box::new(rng), guest_memory(), Arc::new(NoRouter::default()))
            .expect("virtio-pci function");
    let mut root = PciRoot::new();
    let mut allocator = BarAllocator::new(0xc000_0000, 0x1000_0000, 1 << 36, 1 << 36);
    let slot = root
        .add_device(Box::new(function), &mut allocator)
        .expect("a free slot");
    (root, slot)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let (mut root, slot) = bus();
    if input.u8() & 1 == 1 {
        // What firmware does first: memory decoding and bus mastering on.
        root.config_write(0, slot, 0, 4, &[0x06, 0]);
    }
    while !input.is_empty() {
        let op = input.u8();
        let width = 1usize << ((op >> 1) & 3);
        let write = op & 1 == 1;
        let mut data = vec![0u8; width];
        if write {
            let bytes = input.take(width);
            data[..bytes.len()].copy_from_slice(bytes);
        }
        match (op >> 3) & 3 {
            0 | 1 => {
                let target = input.u8();
                let (slot, function) = match target >> 6 {
                    0 => (target & 0x1f, 0),
                    _ => (slot, target & 7 & (target >> 3)),
                };
                let register = input.u16() % 4096;
                let bus = u8::from(op & 0x80 != 0 && op & 0x40 != 0);
                if write {
                    root.config_write(bus, slot, function, register, &data);
                } else {
                    root.config_read(bus, slot, function, register, &mut data);
                }
            }
            2 => {
                let base = root.bar(slot, 0).map_or(0, |(address, _)| address);
                let address = base.wrapping_add(u64::from(input.u16()) % VIRTIO_BAR_SIZE);
                mmio(&mut root, address, write, &mut data);
            }
            _ => {
                let address = input.u64();
                mmio(&mut root, address, write, &mut data);
            }
        }
    }
    let _ = root.counters(slot);
});

fn mmio(root: &mut PciRoot, address: u64, write: bool, data: &mut [u8]) {
    if write {
        root.mmio_write(address, data);
    } else {
        root.mmio_read(address, data);
    }
}
