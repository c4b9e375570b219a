//! The PC platform around the vCPUs: the interrupt controllers (KVM's
//! split irqchip by default, the full in-kernel one with the PIT on
//! request), the legacy devices on the port-I/O bus (COM1, i8042, CMOS/RTC, the
//! ACPI power-management block, the POST port) with their interrupt lines,
//! and the matching list of devices for the ACPI tables.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::legacy::acpi_pm::AcpiPm;
use devices::legacy::cmos::Cmos;
use devices::legacy::i8042::I8042;
use devices::legacy::ignored::Ignored;
use devices::legacy::serial::Serial;
use kvm_bindings::{kvm_enable_cap, kvm_pit_config, KVM_CAP_SPLIT_IRQCHIP, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use loader::acpi::{AcpiPlatform, PlatformDevice};
use loader::layout::{self, ports};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, BusError, SharedDevice};
use crate::lifecycle::Lifecycle;

/// The platform could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A KVM VM-level ioctl failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What was being set up.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// Two devices claim the same ports.
    #[error("device placement")]
    Bus(#[from] BusError),
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PlatformError {
    move |source| PlatformError::Kvm { what, source }
}

/// Which interrupt controllers KVM emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqchipMode {
    /// KVM's split irqchip: local APICs in the kernel, the I/O APIC in
    /// zvmm (`devices::legacy::IoApic`), no 8259 PICs. The default: the
    /// full in-kernel irqchip registers devices whose removal makes VM
    /// start-up or teardown wait ~8 ms for an SRCU grace period on this
    /// kind of host (see docs/DESIGN.md).
    Split,
    /// KVM's full in-kernel irqchip (PICs, I/O APIC, local APICs) plus
    /// the i8254 PIT, which needs it (`--pit on`).
    InKernelWithPit,
}

impl IrqchipMode {
    /// The mode for a VM that wants a PIT or not.
    pub fn for_pit(pit: bool) -> Self {
        if pit {
            IrqchipMode::InKernelWithPit
        } else {
            IrqchipMode::Split
        }
    }
}

/// Creates the interrupt controllers of `mode` (before any vCPU).
pub fn create_interrupt_controllers(vm: &VmFd, mode: IrqchipMode) -> Result<(), PlatformError> {
    vm.set_tss_address(layout::KVM_TSS_START as usize)
        .map_err(kvm_error("place its TSS"))?;
    if mode == IrqchipMode::Split {
        let mut split = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        split.args[0] = u64::from(layout::IOAPIC_NUM_PINS);
        return crate::kernel_time::timed("KVM_ENABLE_CAP(SPLIT_IRQCHIP)", || {
            vm.enable_cap(&split)
        })
        .map_err(kvm_error("split its irqchip"));
    }
    crate::kernel_time::timed("KVM_CREATE_IRQCHIP", || vm.create_irq_chip())
        .map_err(kvm_error("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    crate::kernel_time::timed("KVM_CREATE_PIT2", || vm.create_pit2(pit))
        .map_err(kvm_error("create the in-kernel PIT"))
}

/// The legacy devices of one VM boot.
pub struct Platform {
    /// Port-I/O bus with every legacy device.
    pub pio: Bus,
    /// COM1, when the serial console is on.
    pub serial: Option<Arc<Mutex<Serial>>>,
    /// Devices to describe in the ACPI tables.
    pub acpi: AcpiPlatform,
}

/// Builds the legacy devices, wiring COM1 (if `serial_output` is given) to
/// its IOAPIC line through an irqfd.
pub fn create_platform(
    vm: &VmFd,
    cpus: u8,
    ram_size: u64,
    serial_output: Option<Box<dyn Write + Send>>,
    lifecycle: &Arc<Lifecycle>,
) -> Result<Platform, PlatformError> {
    let mut pio = Bus::new();
    let mut acpi_devices = Vec::new();
    let serial = match serial_output {
        Some(output) => {
            let interrupt = EventFd::new(libc::EFD_NONBLOCK).map_err(PlatformError::EventFd)?;
            vm.register_irqfd(&interrupt, ports::COM1_IRQ)
                .map_err(kvm_error("connect the COM1 interrupt"))?;
            let serial = Arc::new(Mutex::new(Serial::new(interrupt, output)));
            pio.insert(serial.clone(), u64::from(ports::COM1), 8)?;
            acpi_devices.push(PlatformDevice::Serial {
                port: ports::COM1,
                irq: ports::COM1_IRQ,
            });
            Some(serial)
        }
        None => None,
    };
    let control: Arc<dyn devices::VmControl> = lifecycle.clone();
    let i8042: SharedDevice = Arc::new(Mutex::new(I8042::new(control.clone())));
    pio.insert(i8042, u64::from(ports::I8042_DATA), 5)?;
    let (low_ram, high_ram) = split_ram(ram_size);
    pio.insert(
        Arc::new(Mutex::new(Cmos::new(low_ram, high_ram))),
        u64::from(ports::CMOS),
        2,
    )?;
    acpi_devices.push(PlatformDevice::Rtc {
        port: ports::CMOS,
        irq: ports::CMOS_IRQ,
    });
    let pm = AcpiPm::new(control, ports::ACPI_S5_SLP_TYP, ports::ACPI_RESET_VALUE);
    pio.insert(
        Arc::new(Mutex::new(pm)),
        u64::from(ports::ACPI_PM_BASE),
        u64::from(ports::ACPI_PM_LEN),
    )?;
    acpi_devices.push(PlatformDevice::PowerManagement {
        base: ports::ACPI_PM_BASE,
        len: ports::ACPI_PM_LEN,
    });
    pio.insert(
        Arc::new(Mutex::new(Ignored)),
        u64::from(ports::POST_CODE),
        1,
    )?;
    Ok(Platform {
        pio,
        serial,
        acpi: AcpiPlatform {
            cpus,
            max_cpus: cpus,
            legacy_pic: true,
            devices: acpi_devices,
        },
    })
}

/// RAM below the 32-bit hole and above 4 GiB, for the CMOS size bytes.
fn split_ram(ram_size: u64) -> (u64, u64) {
    let low = layout::low_ram_end(ram_size);
    (low, ram_size - low)
}
