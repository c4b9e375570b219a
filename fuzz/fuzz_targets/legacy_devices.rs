//! The PC platform devices a guest reaches by port I/O and MMIO, as zvmm
//! wires them: the COM1 UART (vm-superio, output through the console's
//! observed writer, host input queued into its FIFO), CMOS/RTC, the I/O
//! APIC, the i8042, the ACPI PM block and the GED event register. The
//! input is a sequence of register accesses, each to a device its first
//! byte picks.
#![no_main]

use std::sync::Arc;

use devices::legacy::{AcpiPm, Cmos, Ged, IoApic, ObservedWriter, Serial, I8042};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zvmm_fuzz::{access, apply, Input, NoMachine, NoRouter};

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let console = ObservedWriter::new(std::io::sink(), |_: &[u8]| {});
    let mut serial = Serial::with_input_room_event(eventfd(), Box::new(console), eventfd());
    let mut cmos = Cmos::new(u64::from(input.u32()) << 12, u64::from(input.u32()) << 12);
    let mut ioapic = IoApic::new(Arc::new(NoRouter::default()));
    let machine = Arc::new(NoMachine);
    let mut i8042 = I8042::new(machine.clone());
    let mut pm = AcpiPm::new(machine, 5, 1);
    let mut ged = Ged::new(eventfd());
    while !input.is_empty() {
        let target = input.u8();
        let (device, window): (&mut dyn BusDevice, u64) = match target % 7 {
            0 => (&mut serial, 8),
            1 => (&mut cmos, 2),
            2 => (&mut ioapic, 0x100),
            3 => (&mut i8042, 5),
            4 => (&mut pm, 3),
            5 => (&mut ged, 1),
            _ => {
                let _ = serial.enqueue_input(input.short_slice());
                let _ = (serial.fifo_room(), serial.lost_output_bytes());
                continue;
            }
        };
        apply(device, access(&mut input, window));
    }
    let _ = ioapic.counters();
    for pin in 0..24 {
        let _ = ioapic.entry(pin);
    }
});
