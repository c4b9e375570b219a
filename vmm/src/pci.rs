//! The PCI side of the machine: one root bus with its host bridge per PCI
//! segment (`platform.num_pci_segments`, each with its own ECAM and memory
//! windows, `loader::layout::pci_segment_windows`), one virtio-pci
//! function per virtio device on the segment it names — attached by one
//! generic path, whatever the device — and their KVM plumbing: config
//! access on ports 0xCF8/0xCFC (segment 0 only, as on real machines) and
//! each segment's ECAM window, BAR windows on the MMIO bus, an
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
    #[error("{name}: cannot place it on PCI segment {segment} (at most 31 devices per segment)")]
    Placement {
        /// The device.
        name: String,
        /// The segment it asked for.
        segment: u16,
        /// Why.
        #[source]
        source: devices::pci::PciError,
    },
    /// A segment count outside 1..=16.
    #[error("{segments} PCI segments: zvmm serves 1 to 16")]
    Segments {
        /// The count asked for.
        segments: u16,
    },
    /// A device names a segment the VM does not have.
    #[error("{name}: pci_segment={segment}, but the VM has {segments} PCI segment(s) (platform num_pci_segments)")]
    NoSuchSegment {
        /// The device.
        name: String,
        /// The segment it asked for.
        segment: u16,
        /// Segments the VM has.
        segments: u16,
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
    /// The PCI segment it goes on (`pci_segment`).
    pub pci_segment: u16,
}

/// One queue's kick eventfd and where its notify register sits in BAR 0.
struct Doorbell {
    slot: u8,
    offset: u64,
    eventfd: EventFd,
}

/// The PCI roots of one VM boot.
pub struct PciPlatform {
    /// The devices, for their counters.
    pub devices: PciDevices,
    /// One host bridge per segment for the ACPI tables.
    pub acpi: Vec<PlatformDevice>,
}

/// Every segment's root bus (shared with the bus windows) and where each
/// attached device sits.
pub struct PciDevices {
    roots: Vec<Arc<Mutex<PciRoot>>>,
    /// Each attached device's counters name, segment and slot.
    slots: Vec<(String, u16, u8)>,
}

impl PciDevices {
    /// Each attached device's counters name and counters, in slot order.
    pub fn counters(&self) -> Vec<(String, Vec<(&'static str, u64)>)> {
        self.slots
            .iter()
            .map(|(name, segment, slot)| {
                let counters = self.roots.get(usize::from(*segment)).map(|root| {
                    let root = root.lock().unwrap_or_else(|p| p.into_inner());
                    root.counters(*slot)
                });
                (name.clone(), counters.unwrap_or_default())
            })
            .collect()
    }
}

/// One segment while devices are attached.
struct Segment {
    root: PciRoot,
    allocator: BarAllocator,
    doorbells: Vec<Doorbell>,
    windows: layout::PciSegmentWindows,
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
    /// PCI segments (1..=16), each its own host bridge.
    pub pci_segments: u16,
}

/// Builds one PCI root per segment with one virtio-pci function per
/// device, in order on the segment each names (slot 1 up; slot 0 is the
/// host bridge), and puts their windows on the buses.
pub fn create_pci(
    context: &PciContext<'_>,
    devices: Vec<VirtioAttachment>,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<PciPlatform, PciSetupError> {
    if context.pci_segments == 0 {
        return Err(PciSetupError::Segments { segments: 0 });
    }
    let mut segments: Vec<Segment> = (0..context.pci_segments)
        .map(|index| new_segment(context, index))
        .collect::<Result<_, _>>()?;
    let mut slots = Vec::with_capacity(devices.len());
    for attachment in devices {
        let name = attachment.counters_name.clone();
        let index = attachment.pci_segment;
        let Some(segment) = segments.get_mut(usize::from(index)) else {
            return Err(PciSetupError::NoSuchSegment {
                name: attachment.label,
                segment: index,
                segments: context.pci_segments,
            });
        };
        let slot = add_virtio(context, attachment, segment)?;
        slots.push((name, index, slot));
    }
    let mut roots = Vec::with_capacity(segments.len());
    let mut acpi = Vec::with_capacity(segments.len());
    for (index, segment) in (0u16..).zip(segments) {
        acpi.push(host_bridge(index, &segment.windows));
        roots.push(attach_segment(context, index, segment, pio, mmio)?);
    }
    Ok(PciPlatform {
        devices: PciDevices { roots, slots },
        acpi,
    })
}

/// An empty segment: its host bridge and BAR allocator over its windows.
fn new_segment(context: &PciContext<'_>, index: u16) -> Result<Segment, PciSetupError> {
    let segments = context.pci_segments;
    let (ram_size, hotplug_size) = (context.ram_size, context.hotplug_size);
    let windows = layout::pci_segment_windows(index, segments, ram_size, hotplug_size)
        .ok_or(PciSetupError::Segments { segments })?;
    let allocator = BarAllocator::new(
        windows.mmio32.0,
        windows.mmio32.1,
        windows.mmio64.0,
        windows.mmio64.1,
    );
    Ok(Segment {
        root: PciRoot::new(),
        allocator,
        doorbells: Vec::new(),
        windows,
    })
}

/// Puts `segment`'s config and memory windows on the buses (the 0xCF8
/// ports only for segment 0) and returns its shared root.
fn attach_segment(
    context: &PciContext<'_>,
    index: u16,
    segment: Segment,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<Arc<Mutex<PciRoot>>, PciSetupError> {
    let Segment {
        mut root,
        doorbells,
        windows,
        ..
    } = segment;
    root.set_bar_observer(Box::new(
        DoorbellMover {
            vm: context.vm.clone(),
            segment: index,
            doorbells,
        }
        .into_observer(),
    ));
    let root = Arc::new(Mutex::new(root));
    if index == 0 {
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
            u64::from(layout::ports::PCI_CONFIG),
            CONFIG_IO_LEN,
        )?;
    }
    let (ecam_start, ecam_size) = windows.ecam;
    mmio.insert(
        Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
        ecam_start,
        ecam_size,
    )?;
    for (start, size) in [windows.mmio32, windows.mmio64] {
        let window = PciMmioWindow::new(root.clone(), start);
        mmio.insert(Arc::new(Mutex::new(window)), start, size)?;
    }
    Ok(root)
}

/// The ACPI host bridge of segment `segment`: bus 0 only.
fn host_bridge(segment: u16, windows: &layout::PciSegmentWindows) -> PlatformDevice {
    let range = |(start, size): (u64, u64)| AddressRange { start, size };
    PlatformDevice::PciHostBridge(PciHostBridge {
        segment,
        ecam_start: windows.ecam.0,
        bus_start: 0,
        bus_end: 0,
        mmio32: range(windows.mmio32),
        mmio64: Some(range(windows.mmio64)),
        io: None,
    })
}

/// Wraps `attachment` in a virtio-pci function, places it (slot, BARs),
/// routes its MSI-X vectors through KVM and registers an ioeventfd per
/// queue at its notify address; returns the slot.
fn add_virtio(
    context: &PciContext<'_>,
    attachment: VirtioAttachment,
    segment: &mut Segment,
) -> Result<u8, PciSetupError> {
    let pci_segment = attachment.pci_segment;
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
    let slot = segment
        .root
        .add_device(Box::new(function), &mut segment.allocator)
        .map_err(|source| PciSetupError::Placement {
            name: label.clone(),
            segment: pci_segment,
            source,
        })?;
    let bar = segment
        .root
        .bar(slot, VIRTIO_BAR)
        .map(|(addr, _)| addr)
        .unwrap_or(0);
    for (offset, eventfd) in kicks {
        context
            .vm
            .register_ioevent(&eventfd, &IoEventAddress::Mmio(bar + offset), NoDatamatch)
            .map_err(PciSetupError::IoEvent)?;
        segment.doorbells.push(Doorbell {
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
    segment: u16,
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
                    "zvmm: PCI segment {} slot {}: kicks take the slow path: {e}",
                    self.segment, moved.slot
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
    use devices::virtio::rng::{Rng, RngConfig};

    /// A virtio-rng attachment (no ioeventfds) on `pci_segment`.
    fn rng_on(pci_segment: u16) -> VirtioAttachment {
        let config = RngConfig {
            id: format!("rng{pci_segment}"),
            source: "/dev/urandom".into(),
        };
        VirtioAttachment {
            label: format!("--rng on {pci_segment}"),
            counters_name: format!("rng{pci_segment}"),
            device: Box::new(Rng::new(config).unwrap()),
            ioeventfds: false,
            pci_segment,
        }
    }

    /// Builds the PCI side of a small VM with `segments` segments.
    fn build(
        segments: u16,
        devices: Vec<VirtioAttachment>,
    ) -> (Result<PciPlatform, PciSetupError>, Bus, Bus) {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("a KVM VM"));
        let routing = Arc::new(InterruptRouting::split(vm.clone()));
        let ram = crate::memory::create_guest_ram(64 << 20, false).unwrap();
        let context = PciContext {
            vm: &vm,
            routing: &routing,
            ram: &ram,
            ram_size: 64 << 20,
            hotplug_size: 0,
            pci_segments: segments,
        };
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let result = create_pci(&context, devices, &mut pio, &mut mmio);
        (result, pio, mmio)
    }

    /// The vendor/device dword of `slot` on `segment` through its ECAM.
    fn ecam_id(mmio: &Bus, segment: u16, slot: u64) -> u32 {
        let windows = layout::pci_segment_windows(segment, 2, 64 << 20, 0).unwrap();
        let mut data = [0u8; 4];
        mmio.read(windows.ecam.0 + (slot << 15), &mut data);
        u32::from_le_bytes(data)
    }

    /// The same through ports 0xCF8/0xCFC.
    fn cf8_id(pio: &Bus, slot: u32) -> u32 {
        let port = u64::from(layout::ports::PCI_CONFIG);
        pio.write(port, &(1u32 << 31 | slot << 11).to_le_bytes());
        let mut data = [0u8; 4];
        pio.read(port + 4, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn each_segment_has_its_own_bus_and_bridge_and_only_segment_0_has_cf8() {
        let devices = vec![rng_on(1), rng_on(0)];
        let (pci, pio, mmio) = build(2, devices);
        let pci = pci.unwrap();
        let (bridge, rng) = (0x0d57_8086, 0x1044_1af4);
        assert_eq!(ecam_id(&mmio, 0, 0), bridge);
        assert_eq!(ecam_id(&mmio, 1, 0), bridge, "segment 1's own host bridge");
        assert_eq!(ecam_id(&mmio, 1, 1), rng, "first device of segment 1");
        assert_eq!(ecam_id(&mmio, 0, 1), rng, "first device of segment 0");
        assert_eq!(ecam_id(&mmio, 1, 2), u32::MAX, "one device on segment 1");
        assert_eq!(cf8_id(&pio, 1), rng);
        assert_eq!(cf8_id(&pio, 2), u32::MAX, "0xCF8 reaches segment 0 only");
        let segments: Vec<u16> = pci
            .acpi
            .iter()
            .map(|device| match device {
                PlatformDevice::PciHostBridge(bridge) => bridge.segment,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(segments, [0, 1]);
        let names: Vec<String> = pci.devices.counters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["rng1", "rng0"]);
    }

    #[test]
    fn a_device_on_a_missing_segment_is_an_error_naming_it() {
        let (result, _, _) = build(2, vec![rng_on(2)]);
        let err = result.err().expect("segment 2 of 2");
        assert_eq!(
            err.to_string(),
            "--rng on 2: pci_segment=2, but the VM has 2 PCI segment(s) (platform num_pci_segments)"
        );
        for segments in [0, 17] {
            let (result, _, _) = build(segments, Vec::new());
            assert!(matches!(result, Err(PciSetupError::Segments { .. })));
        }
    }
}
