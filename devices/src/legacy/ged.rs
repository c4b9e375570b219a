//! The ACPI Generic Event Device's event register (hardware-reduced ACPI
//! has no fixed power button): the VMM records an event and raises the
//! GED interrupt; the guest's `_EVT` method reads the one-byte register,
//! which returns the pending event bits and clears them, and notifies the
//! matching device (bit 0: the `PNP0C0C` power button).

use vmm_sys_util::eventfd::EventFd;

use super::ByteRegisters;

/// Event bit: the power button was pressed.
pub const EVENT_POWER_BUTTON: u8 = 1;

/// The event register (offset 0, read-to-clear; writes are ignored).
pub struct Ged {
    interrupt: EventFd,
    pending: u8,
    raised: u64,
}

impl Ged {
    /// A GED signalling its interrupt through `interrupt` (an irqfd on an
    /// edge-triggered IOAPIC input).
    pub fn new(interrupt: EventFd) -> Self {
        Ged {
            interrupt,
            pending: 0,
            raised: 0,
        }
    }

    /// Records a power-button press and raises the interrupt.
    pub fn power_button(&mut self) -> std::io::Result<()> {
        self.pending |= EVENT_POWER_BUTTON;
        self.raised = self.raised.saturating_add(1);
        self.interrupt.write(1)
    }

    /// Events raised so far.
    pub fn raised(&self) -> u64 {
        self.raised
    }
}

impl ByteRegisters for Ged {
    const WINDOW_LEN: u64 = 1;

    fn read_byte(&mut self, _offset: u8) -> u8 {
        std::mem::take(&mut self.pending)
    }

    fn write_byte(&mut self, _offset: u8, _value: u8) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn ged() -> (Ged, EventFd) {
        let interrupt = EventFd::new(EFD_NONBLOCK).unwrap();
        let observer = interrupt.try_clone().unwrap();
        (Ged::new(interrupt), observer)
    }

    fn read(ged: &mut Ged) -> u8 {
        let mut data = [0xaa];
        ged.read(0, &mut data);
        data[0]
    }

    #[test]
    fn power_button_raises_the_interrupt_and_reads_once() {
        let (mut ged, interrupt) = ged();
        assert!(interrupt.read().is_err(), "no interrupt before a press");
        assert_eq!(read(&mut ged), 0);
        ged.power_button().unwrap();
        assert_eq!(interrupt.read().unwrap(), 1);
        assert_eq!(read(&mut ged), EVENT_POWER_BUTTON);
        assert_eq!(read(&mut ged), 0, "read clears the event");
        assert_eq!(ged.raised(), 1);
    }

    #[test]
    fn writes_are_ignored_and_the_window_is_one_byte() {
        let (mut ged, _interrupt) = ged();
        ged.power_button().unwrap();
        ged.write(0, &[0xff]);
        let mut data = [0u8; 2];
        ged.read(0, &mut data);
        assert_eq!(data, [EVENT_POWER_BUTTON, 0xff]);
    }
}
