//! KVM interrupt routing: the GSI routing table and the irqfd behind each
//! MSI route, so a device raises an interrupt with one eventfd write and
//! no exit. With the full in-kernel irqchip the table starts with the
//! IOAPIC and PIC pins (which KVM forgets once a table is set); with the
//! split irqchip, GSIs 0-23 are the user-space I/O APIC's pins, each an MSI
//! route that follows the guest's redirection entry ([`IoApicPins`]). Device
//! vectors (MSI-X) get GSIs from 24 up.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::{MsiMessage, MsiRouter};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// First GSI handed out for MSI routes (after the 24 IOAPIC pins).
pub const FIRST_MSI_GSI: u32 = 24;
/// Number of IOAPIC pins routed by default.
const IOAPIC_PINS: u32 = 24;
/// Most GSIs zvmm hands out.
const MAX_GSI: u32 = 1023;

/// Routing could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// All GSIs are in use.
    #[error("no free interrupt routes left (GSI limit {MAX_GSI})")]
    Exhausted,
    /// An eventfd could not be created.
    #[error("cannot create an irqfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused the routing table or an irqfd.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// An MSI message: where and what the device writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiRoute {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

struct Table {
    next_gsi: u32,
    msi: BTreeMap<u32, Option<MsiRoute>>,
}

/// The VM's GSI routing table.
pub struct InterruptRouting {
    vm: Arc<VmFd>,
    in_kernel_pins: bool,
    table: Mutex<Table>,
}

/// One MSI vector: a GSI, its irqfd, and its current route.
pub struct MsiVector {
    /// The GSI KVM delivers through.
    pub gsi: u32,
    /// Writing this eventfd raises the MSI.
    pub irqfd: EventFd,
}

impl InterruptRouting {
    /// The routing of a VM with the full in-kernel irqchip: installs the
    /// default IOAPIC/PIC routes.
    pub fn new(vm: Arc<VmFd>) -> Result<Self, InterruptError> {
        let routing = Self {
            vm,
            in_kernel_pins: true,
            table: Mutex::new(Table {
                next_gsi: FIRST_MSI_GSI,
                msi: BTreeMap::new(),
            }),
        };
        routing.commit()?;
        Ok(routing)
    }

    /// The routing of a VM with the split irqchip: GSIs 0-23 are reserved
    /// for the user-space I/O APIC's pins, unrouted until the guest
    /// unmasks them. Nothing is sent to KVM yet (its table starts empty).
    pub fn split(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            in_kernel_pins: false,
            table: Mutex::new(Table {
                next_gsi: FIRST_MSI_GSI,
                msi: (0..IOAPIC_PINS).map(|pin| (pin, None)).collect(),
            }),
        }
    }

    /// Allocates a GSI with an irqfd; it delivers nothing until routed.
    pub fn allocate_msi(&self) -> Result<MsiVector, InterruptError> {
        let gsi = {
            let mut table = self.lock();
            if table.next_gsi > MAX_GSI {
                return Err(InterruptError::Exhausted);
            }
            let gsi = table.next_gsi;
            table.next_gsi += 1;
            table.msi.insert(gsi, None);
            gsi
        };
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        self.vm
            .register_irqfd(&irqfd, gsi)
            .map_err(|source| InterruptError::Kvm {
                what: "attach an irqfd",
                source,
            })?;
        Ok(MsiVector { gsi, irqfd })
    }

    /// Points `gsi` at `route` (or removes its route) and updates KVM.
    pub fn set_msi_route(&self, gsi: u32, route: Option<MsiRoute>) -> Result<(), InterruptError> {
        {
            let mut table = self.lock();
            match table.msi.get_mut(&gsi) {
                Some(current) if *current == route => return Ok(()),
                Some(current) => *current = route,
                None => return Ok(()),
            }
        }
        self.commit()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn commit(&self) -> Result<(), InterruptError> {
        let entries = routing_entries(self.in_kernel_pins, &self.lock().msi);
        let mut routing = KvmIrqRouting::new(0).map_err(|_| InterruptError::Exhausted)?;
        for entry in entries {
            routing.push(entry).map_err(|_| InterruptError::Exhausted)?;
        }
        crate::kernel_time::timed("KVM_SET_GSI_ROUTING", || self.vm.set_gsi_routing(&routing))
            .map_err(|source| InterruptError::Kvm {
                what: "set the interrupt routing table",
                source,
            })
    }
}

/// The full routing table: PIC and IOAPIC pins, then routed MSIs.
fn routing_entries(
    in_kernel_pins: bool,
    msi: &BTreeMap<u32, Option<MsiRoute>>,
) -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    };
    let mut entries = Vec::new();
    for gsi in (0..16).filter(|_| in_kernel_pins) {
        let chip = if gsi < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        entries.push(irqchip(gsi, chip, gsi % 8));
    }
    for gsi in (0..IOAPIC_PINS).filter(|_| in_kernel_pins) {
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, route) in msi {
        if let Some(route) = route {
            entries.push(kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_irq_routing_msi {
                        address_lo: route.address as u32,
                        address_hi: (route.address >> 32) as u32,
                        data: route.data,
                        ..Default::default()
                    },
                },
                ..Default::default()
            });
        }
    }
    entries
}

/// The user-space I/O APIC's side of the routing (split irqchip): pin `n`
/// is GSI `n`, routed as the MSI its redirection entry describes.
pub struct IoApicPins(pub Arc<InterruptRouting>);

impl MsiRouter for IoApicPins {
    fn route(&self, pin: u16, message: Option<MsiMessage>) -> std::io::Result<()> {
        let route = message.map(|m| MsiRoute {
            address: m.address,
            data: m.data,
        });
        self.0
            .set_msi_route(u32::from(pin), route)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn signal(&self, pin: u16) -> std::io::Result<()> {
        Err(std::io::Error::other(format!(
            "I/O APIC pin {pin} is raised by its device's irqfd"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_tables_hold_only_the_routed_pins() {
        let mut msi: BTreeMap<u32, Option<MsiRoute>> = (0..24).map(|pin| (pin, None)).collect();
        assert!(routing_entries(false, &msi).is_empty());
        msi.insert(
            4,
            Some(MsiRoute {
                address: 0xfee0_0000,
                data: 0x24,
            }),
        );
        let entries = routing_entries(false, &msi);
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].gsi, entries[0].type_), (4, KVM_IRQ_ROUTING_MSI));
    }

    #[test]
    fn default_table_routes_pic_and_ioapic_pins() {
        let entries = routing_entries(true, &BTreeMap::new());
        assert_eq!(entries.len(), 16 + 24);
        assert!(entries.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        // SAFETY: irqchip entries carry the irqchip union member.
        let com1 = entries
            .iter()
            .filter(|e| e.gsi == 4)
            .map(|e| unsafe { e.u.irqchip })
            .collect::<Vec<_>>();
        assert_eq!(com1.len(), 2);
        assert!(com1
            .iter()
            .any(|c| c.irqchip == KVM_IRQCHIP_IOAPIC && c.pin == 4));
    }

    #[test]
    fn only_routed_msis_enter_the_table() {
        let mut msi = BTreeMap::new();
        msi.insert(24, None);
        msi.insert(
            25,
            Some(MsiRoute {
                address: 0x1_fee0_1000,
                data: 0x4041,
            }),
        );
        let entries = routing_entries(true, &msi);
        let routed: Vec<_> = entries
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_MSI)
            .collect();
        assert_eq!(routed.len(), 1);
        assert_eq!(routed[0].gsi, 25);
        // SAFETY: MSI entries carry the msi union member.
        let message = unsafe { routed[0].u.msi };
        assert_eq!(
            (message.address_lo, message.address_hi, message.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }
}
