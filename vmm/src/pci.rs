//! The PCI side of the machine: the root bus with its host bridge, one
//! virtio-pci function per disk, and their KVM plumbing — config access
//! on ports 0xCF8/0xCFC and the ECAM window, BAR windows on the MMIO bus,
//! an ioeventfd per queue notify address (kicks never reach user space),
//! and MSI-X vectors routed through KVM GSI routes and irqfds.

use std::sync::{Arc, Mutex};

use devices::pci::virtio::{VirtioPciDevice, VIRTIO_BAR};
use devices::pci::{
    BarAllocator, BarMove, MsiMessage, MsiRouter, PciConfigIo, PciConfigMmio, PciMmioWindow,
    PciRoot, CONFIG_IO_LEN,
};
use devices::virtio::block::{Block, BlockConfig};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use loader::acpi::{AddressRange, PciHostBridge, PlatformDevice};
use loader::layout;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, BusError};
use crate::config::DiskConfig;
use crate::interrupts::{InterruptRouting, MsiRoute, MsiVector};
use crate::memory::GuestRam;

/// The PCI devices could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PciSetupError {
    /// A disk image could not be opened (the message names it).
    #[error(transparent)]
    Disk(#[from] devices::virtio::block::BlockError),
    /// The virtio transport refused the device.
    #[error("--disk {path}: cannot create its virtio-pci function")]
    Transport {
        /// The disk.
        path: String,
        /// The transport error.
        #[source]
        source: devices::pci::VirtioPciError,
    },
    /// No PCI slot or BAR space left.
    #[error("cannot place a PCI device (at most 31 devices)")]
    Placement(#[source] devices::pci::PciError),
    /// KVM refused an ioeventfd.
    #[error("KVM refused a queue notification eventfd")]
    IoEvent(#[source] kvm_ioctls::Error),
    /// Bus placement.
    #[error("PCI windows overlap other devices")]
    Bus(#[from] BusError),
    /// One image given twice, at least once writable.
    #[error("--disk {first} and --disk {second} are the same image; a writable disk can be attached once")]
    SameImageTwice {
        /// The first path given.
        first: String,
        /// The later path naming the same file.
        second: String,
    },
}

/// Refuses an image that appears twice when either use is writable (two
/// read-only views of one image are harmless).
fn check_distinct_images(disks: &[DiskConfig]) -> Result<(), PciSetupError> {
    use std::os::unix::fs::MetadataExt;
    let identity = |disk: &DiskConfig| {
        std::fs::metadata(&disk.path)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.rdev()))
    };
    for (index, later) in disks.iter().enumerate() {
        let Some(later_id) = identity(later) else {
            continue;
        };
        for earlier in &disks[..index] {
            let conflict = !(earlier.readonly && later.readonly);
            if conflict && identity(earlier) == Some(later_id) {
                return Err(PciSetupError::SameImageTwice {
                    first: earlier.path.display().to_string(),
                    second: later.path.display().to_string(),
                });
            }
        }
    }
    Ok(())
}

/// One queue's kick eventfd and where its notify register sits in BAR 0.
struct Doorbell {
    slot: u8,
    offset: u64,
    eventfd: EventFd,
}

/// The PCI root of one VM boot.
pub struct PciPlatform {
    /// The root bus, shared with the bus windows.
    pub root: Arc<Mutex<PciRoot>>,
    /// The host bridge for the ACPI tables.
    pub acpi: PlatformDevice,
}

/// Builds the PCI root with one virtio-blk function per disk and puts its
/// windows on the buses.
pub fn create_pci(
    vm: &Arc<VmFd>,
    routing: &Arc<InterruptRouting>,
    ram: &GuestRam,
    ram_size: u64,
    disks: &[DiskConfig],
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<PciPlatform, PciSetupError> {
    check_distinct_images(disks)?;
    let mmio64_start = layout::pci_mmio64_start(ram_size);
    let mut allocator = BarAllocator::new(
        layout::PCI_MMIO32_START,
        layout::PCI_MMIO32_SIZE,
        mmio64_start,
        layout::PCI_MMIO64_SIZE,
    );
    let mut root = PciRoot::new();
    let mut doorbells = Vec::new();
    for disk in disks {
        add_disk(
            vm,
            routing,
            ram,
            disk,
            &mut root,
            &mut allocator,
            &mut doorbells,
        )?;
    }
    root.set_bar_observer(Box::new(
        DoorbellMover {
            vm: vm.clone(),
            doorbells,
        }
        .into_observer(),
    ));
    let root = Arc::new(Mutex::new(root));
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        u64::from(layout::ports::PCI_CONFIG),
        CONFIG_IO_LEN,
    )?;
    mmio.insert(
        Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
    )?;
    for (start, size) in [
        (layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
        (mmio64_start, layout::PCI_MMIO64_SIZE),
    ] {
        let window = PciMmioWindow::new(root.clone(), start);
        mmio.insert(Arc::new(Mutex::new(window)), start, size)?;
    }
    let acpi = PlatformDevice::PciHostBridge(PciHostBridge {
        segment: 0,
        ecam_start: layout::PCI_ECAM_START,
        bus_start: 0,
        bus_end: 0,
        mmio32: AddressRange {
            start: layout::PCI_MMIO32_START,
            size: layout::PCI_MMIO32_SIZE,
        },
        mmio64: Some(AddressRange {
            start: mmio64_start,
            size: layout::PCI_MMIO64_SIZE,
        }),
        io: None,
    });
    Ok(PciPlatform { root, acpi })
}

fn add_disk(
    vm: &Arc<VmFd>,
    routing: &Arc<InterruptRouting>,
    ram: &GuestRam,
    disk: &DiskConfig,
    root: &mut PciRoot,
    allocator: &mut BarAllocator,
    doorbells: &mut Vec<Doorbell>,
) -> Result<(), PciSetupError> {
    let block = Block::new(BlockConfig {
        path: disk.path.clone(),
        readonly: disk.readonly,
        serial: disk.serial.clone(),
        id: disk.id.clone(),
    })?;
    let router = Arc::new(KvmMsiRouter::new(routing.clone()));
    let device = VirtioPciDevice::new(Box::new(block), ram.clone(), router).map_err(|source| {
        PciSetupError::Transport {
            path: disk.path.display().to_string(),
            source,
        }
    })?;
    let mut kicks = Vec::new();
    for (offset, _queue, eventfd) in device.notify_eventfds() {
        let eventfd = eventfd.try_clone().map_err(|e| {
            PciSetupError::IoEvent(kvm_ioctls::Error::new(
                e.raw_os_error().unwrap_or(libc::EBADF),
            ))
        })?;
        kicks.push((offset, eventfd));
    }
    let slot = root
        .add_device(Box::new(device), allocator)
        .map_err(PciSetupError::Placement)?;
    let bar = root
        .bar(slot, VIRTIO_BAR)
        .map(|(addr, _)| addr)
        .unwrap_or(0);
    for (offset, eventfd) in kicks {
        vm.register_ioevent(&eventfd, &IoEventAddress::Mmio(bar + offset), NoDatamatch)
            .map_err(PciSetupError::IoEvent)?;
        doorbells.push(Doorbell {
            slot,
            offset,
            eventfd,
        });
    }
    Ok(())
}

/// Moves queue ioeventfds when the guest moves a virtio BAR.
struct DoorbellMover {
    vm: Arc<VmFd>,
    doorbells: Vec<Doorbell>,
}

impl DoorbellMover {
    fn into_observer(mut self) -> impl FnMut(&BarMove) + Send {
        move |moved: &BarMove| self.on_move(moved)
    }

    fn on_move(&mut self, moved: &BarMove) {
        if moved.bar != VIRTIO_BAR {
            return;
        }
        for doorbell in self.doorbells.iter().filter(|d| d.slot == moved.slot) {
            let old = IoEventAddress::Mmio(moved.old + doorbell.offset);
            let new = IoEventAddress::Mmio(moved.new + doorbell.offset);
            // The old registration may not exist (BAR was unassigned).
            let _ = self
                .vm
                .unregister_ioevent(&doorbell.eventfd, &old, NoDatamatch);
            if let Err(e) = self
                .vm
                .register_ioevent(&doorbell.eventfd, &new, NoDatamatch)
            {
                // The transport still forwards notify writes in software.
                eprintln!(
                    "zvmm: PCI slot {}: kicks take the slow path: {e}",
                    moved.slot
                );
            }
        }
    }
}

/// One function's MSI-X vectors as KVM routes with irqfds, created on
/// first use.
pub struct KvmMsiRouter {
    routing: Arc<InterruptRouting>,
    vectors: Mutex<Vec<Option<MsiVector>>>,
}

impl KvmMsiRouter {
    /// A router allocating GSIs from `routing`.
    pub fn new(routing: Arc<InterruptRouting>) -> Self {
        Self {
            routing,
            vectors: Mutex::new(Vec::new()),
        }
    }
}

fn to_io(e: crate::interrupts::InterruptError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl MsiRouter for KvmMsiRouter {
    fn route(&self, vector: u16, message: Option<MsiMessage>) -> std::io::Result<()> {
        let mut vectors = self.vectors.lock().unwrap_or_else(|p| p.into_inner());
        let index = usize::from(vector);
        if vectors.len() <= index {
            vectors.resize_with(index + 1, || None);
        }
        if vectors[index].is_none() {
            if message.is_none() {
                return Ok(());
            }
            vectors[index] = Some(self.routing.allocate_msi().map_err(to_io)?);
        }
        let gsi = vectors[index].as_ref().map(|v| v.gsi).unwrap_or_default();
        let route = message.map(|m| MsiRoute {
            address: m.address,
            data: m.data,
        });
        self.routing.set_msi_route(gsi, route).map_err(to_io)
    }

    fn signal(&self, vector: u16) -> std::io::Result<()> {
        let vectors = self.vectors.lock().unwrap_or_else(|p| p.into_inner());
        match vectors.get(usize::from(vector)) {
            Some(Some(msi)) => msi.irqfd.write(1),
            _ => Err(std::io::Error::other(format!(
                "MSI-X vector {vector} is not routed"
            ))),
        }
    }

    /// The vector's irqfd (a duplicate), once it has been routed at least
    /// once; a vhost-user backend writes it to interrupt the guest through
    /// KVM directly.
    fn irqfd(&self, vector: u16) -> Option<EventFd> {
        let vectors = self.vectors.lock().unwrap_or_else(|p| p.into_inner());
        let msi = vectors.get(usize::from(vector))?.as_ref()?;
        msi.irqfd.try_clone().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &str, readonly: bool) -> DiskConfig {
        DiskConfig {
            path: path.into(),
            readonly,
            serial: None,
            id: None,
        }
    }

    #[test]
    fn the_same_image_twice_is_refused_unless_both_read_only() {
        let err = check_distinct_images(&[disk("/dev/null", false), disk("/dev/./null", true)])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--disk /dev/null and --disk /dev/./null are the same image; a writable disk can be attached once"
        );
        assert!(check_distinct_images(&[disk("/dev/null", true), disk("/dev/null", true)]).is_ok());
        assert!(
            check_distinct_images(&[disk("/dev/null", false), disk("/dev/zero", false)]).is_ok()
        );
    }
}
