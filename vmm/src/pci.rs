//! The PCI side of the machine: the root bus with its host bridge, one
//! virtio-pci function per virtio device — attached by one generic path,
//! whatever the device — and their KVM plumbing: config access on ports
//! 0xCF8/0xCFC and the ECAM window, BAR windows on the MMIO bus, an
//! ioeventfd per queue notify address (kicks never reach user space, and
//! follow the guest's BAR moves), and MSI-X vectors routed through KVM GSI
//! routes and irqfds.

use std::sync::{Arc, Mutex};

use devices::pci::virtio::{VirtioPciDevice, VIRTIO_BAR};
use devices::pci::{
    BarAllocator, BarMove, MsiMessage, MsiRouter, PciConfigIo, PciConfigMmio, PciMmioWindow,
    PciRoot, CONFIG_IO_LEN,
};
use devices::virtio::VirtioDevice;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use loader::acpi::{AddressRange, PciHostBridge, PlatformDevice};
use loader::layout;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, BusError};
use crate::interrupts::{InterruptRouting, MsiRoute, MsiVector};
use crate::memory::GuestRam;

/// The PCI devices could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PciSetupError {
    /// The virtio transport refused the device.
    #[error("{name}: cannot create its virtio-pci function")]
    Transport {
        /// The device (its option and name, e.g. `--disk /img`).
        name: String,
        /// The transport error.
        #[source]
        source: devices::pci::VirtioPciError,
    },
    /// No PCI slot or BAR space left.
    #[error("{name}: cannot place it on the PCI bus (at most 31 devices)")]
    Placement {
        /// The device.
        name: String,
        /// Why.
        #[source]
        source: devices::pci::PciError,
    },
    /// KVM refused an ioeventfd.
    #[error("KVM refused a queue notification eventfd")]
    IoEvent(#[source] kvm_ioctls::Error),
    /// Bus placement.
    #[error("PCI windows overlap other devices")]
    Bus(#[from] BusError),
}

/// A virtio device to put on the bus.
pub struct VirtioAttachment {
    /// How messages name it (`--disk /img`, `--net tap=t0`).
    pub label: String,
    /// The name its counters go under in `vm.counters` (its id).
    pub counters_name: String,
    /// The device model.
    pub device: Box<dyn VirtioDevice>,
    /// Whether queue kicks go through KVM ioeventfds. Registering one
    /// makes the VM's teardown wait ~8 ms for an SRCU grace period on
    /// this kind of host (docs/DESIGN.md), so a device whose kicks are
    /// rare (virtio-rng) takes them as MMIO exits forwarded in software.
    pub ioeventfds: bool,
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
    /// Each attached device's counters name and PCI slot.
    pub slots: Vec<(String, u8)>,
}

/// What attaching needs from the VM.
pub struct PciContext<'a> {
    /// The VM, for ioeventfds.
    pub vm: &'a Arc<VmFd>,
    /// GSI routing, for MSI-X vectors.
    pub routing: &'a Arc<InterruptRouting>,
    /// Guest RAM, where the queues live.
    pub ram: &'a GuestRam,
    /// Guest RAM size (places the 64-bit window above it).
    pub ram_size: u64,
    /// Bytes kept free above RAM for memory hotplug (below the window).
    pub hotplug_size: u64,
}

/// Builds the PCI root with one virtio-pci function per device, in order
/// (slot 1 up; slot 0 is the host bridge), and puts its windows on the
/// buses.
pub fn create_pci(
    context: &PciContext<'_>,
    devices: Vec<VirtioAttachment>,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<PciPlatform, PciSetupError> {
    let mmio64_start = layout::pci_mmio64_start_above(context.ram_size, context.hotplug_size);
    let mut allocator = BarAllocator::new(
        layout::PCI_MMIO32_START,
        layout::PCI_MMIO32_SIZE,
        mmio64_start,
        layout::PCI_MMIO64_SIZE,
    );
    let mut root = PciRoot::new();
    let mut doorbells = Vec::new();
    let mut slots = Vec::with_capacity(devices.len());
    for attachment in devices {
        let name = attachment.counters_name.clone();
        let slot = add_virtio(
            context,
            attachment,
            &mut root,
            &mut allocator,
            &mut doorbells,
        )?;
        slots.push((name, slot));
    }
    root.set_bar_observer(Box::new(
        DoorbellMover {
            vm: context.vm.clone(),
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
    Ok(PciPlatform {
        root,
        acpi: host_bridge(mmio64_start),
        slots,
    })
}

fn host_bridge(mmio64_start: u64) -> PlatformDevice {
    PlatformDevice::PciHostBridge(PciHostBridge {
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
    })
}

/// Wraps `attachment` in a virtio-pci function, places it (slot, BARs),
/// routes its MSI-X vectors through KVM and registers an ioeventfd per
/// queue at its notify address; returns the slot.
fn add_virtio(
    context: &PciContext<'_>,
    attachment: VirtioAttachment,
    root: &mut PciRoot,
    allocator: &mut BarAllocator,
    doorbells: &mut Vec<Doorbell>,
) -> Result<u8, PciSetupError> {
    let VirtioAttachment {
        label,
        device,
        ioeventfds,
        ..
    } = attachment;
    let router = Arc::new(KvmMsiRouter::new(context.routing.clone()));
    let function = VirtioPciDevice::new(device, context.ram.clone(), router).map_err(|source| {
        PciSetupError::Transport {
            name: label.clone(),
            source,
        }
    })?;
    let mut kicks = Vec::new();
    let notify = if ioeventfds {
        function.notify_eventfds()
    } else {
        Vec::new()
    };
    for (offset, _queue, eventfd) in notify {
        let eventfd = eventfd.try_clone().map_err(|e| {
            PciSetupError::IoEvent(kvm_ioctls::Error::new(
                e.raw_os_error().unwrap_or(libc::EBADF),
            ))
        })?;
        kicks.push((offset, eventfd));
    }
    let slot = root
        .add_device(Box::new(function), allocator)
        .map_err(|source| PciSetupError::Placement {
            name: label.clone(),
            source,
        })?;
    let bar = root
        .bar(slot, VIRTIO_BAR)
        .map(|(addr, _)| addr)
        .unwrap_or(0);
    for (offset, eventfd) in kicks {
        context
            .vm
            .register_ioevent(&eventfd, &IoEventAddress::Mmio(bar + offset), NoDatamatch)
            .map_err(PciSetupError::IoEvent)?;
        doorbells.push(Doorbell {
            slot,
            offset,
            eventfd,
        });
    }
    Ok(slot)
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
