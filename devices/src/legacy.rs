//! Legacy PC platform devices on port I/O: the COM1 UART, the i8042
//! controller (reset line), the CMOS/RTC, the ACPI power-management block,
//! the ACPI Generic Event Device's event register (power button)
//! and a sink for ports nobody answers (POST codes) — plus the I/O APIC
//! (memory-mapped, 32-bit registers, [`ioapic`]) for KVM's split irqchip.
//! This module owns the byte-wide register access rule the port devices
//! share.
//!
//! All of these devices have 8-bit registers. A wider access is split into
//! byte accesses at consecutive offsets, as the ISA bus does for 8-bit
//! devices; bytes that fall outside the device window read as `0xff`
//! (nothing answers) and are dropped on write.

pub mod acpi_pm;
pub mod cmos;
pub mod ged;
pub mod i8042;
pub mod ignored;
pub mod ioapic;
pub mod serial;

pub use acpi_pm::AcpiPm;
pub use cmos::{Cmos, SystemClock, WallClock};
pub use ged::Ged;
pub use i8042::I8042;
pub use ignored::Ignored;
pub use ioapic::IoApic;
pub use serial::{ObservedWriter, Serial, SerialError};

/// Value read from an offset no register answers at.
const OPEN_BUS: u8 = 0xff;

/// A window of 8-bit registers; wider accesses are split into bytes.
trait ByteRegisters {
    /// Number of register offsets in the window.
    const WINDOW_LEN: u64;
    /// Reads the register at `offset` (always `< WINDOW_LEN`).
    fn read_byte(&mut self, offset: u8) -> u8;
    /// Writes the register at `offset` (always `< WINDOW_LEN`).
    fn write_byte(&mut self, offset: u8, value: u8);
}

/// The in-window register offset of byte `index` of an access at `offset`.
fn byte_offset<D: ByteRegisters>(offset: u64, index: usize) -> Option<u8> {
    let at = offset.checked_add(u64::try_from(index).ok()?)?;
    if at < D::WINDOW_LEN {
        u8::try_from(at).ok()
    } else {
        None
    }
}

/// Every byte-register device is a bus device: accesses are split into
/// byte accesses at consecutive offsets.
impl<D: ByteRegisters + Send> crate::BusDevice for D {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(self, offset, data);
    }
}

/// Serves a guest read of `data.len()` bytes at `offset` byte by byte.
fn read_bytes<D: ByteRegisters>(device: &mut D, offset: u64, data: &mut [u8]) {
    for (index, byte) in data.iter_mut().enumerate() {
        *byte = match byte_offset::<D>(offset, index) {
            Some(at) => device.read_byte(at),
            None => OPEN_BUS,
        };
    }
}

/// Serves a guest write of `data` at `offset` byte by byte.
fn write_bytes<D: ByteRegisters>(device: &mut D, offset: u64, data: &[u8]) {
    for (index, &value) in data.iter().enumerate() {
        if let Some(at) = byte_offset::<D>(offset, index) {
            device.write_byte(at, value);
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Test doubles shared by the legacy device tests.

    use std::io::{self, Write};
    use std::sync::{Arc, Mutex};

    use crate::{VmControl, VmRequest};

    /// Records every request a device makes.
    #[derive(Default)]
    pub struct RecordingControl {
        requests: Mutex<Vec<VmRequest>>,
    }

    impl RecordingControl {
        /// The requests made so far.
        pub fn requests(&self) -> Vec<VmRequest> {
            self.requests.lock().unwrap().clone()
        }
    }

    impl VmControl for RecordingControl {
        fn request(&self, request: VmRequest) {
            self.requests.lock().unwrap().push(request);
        }
    }

    /// A writer whose output the test can inspect through a clone.
    #[derive(Clone, Default)]
    pub struct SharedBuffer(pub Arc<Mutex<Vec<u8>>>);

    impl SharedBuffer {
        /// Everything written so far.
        pub fn contents(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four scratch registers.
    struct Scratch([u8; 4]);

    impl ByteRegisters for Scratch {
        const WINDOW_LEN: u64 = 4;
        fn read_byte(&mut self, offset: u8) -> u8 {
            self.0[usize::from(offset)]
        }
        fn write_byte(&mut self, offset: u8, value: u8) {
            self.0[usize::from(offset)] = value;
        }
    }

    #[test]
    fn wide_accesses_are_split_into_bytes() {
        let mut dev = Scratch([0; 4]);
        write_bytes(&mut dev, 1, &[0x11, 0x22]);
        assert_eq!(dev.0, [0, 0x11, 0x22, 0]);
        let mut data = [0u8; 4];
        read_bytes(&mut dev, 0, &mut data);
        assert_eq!(data, [0, 0x11, 0x22, 0]);
    }

    #[test]
    fn bytes_past_the_window_read_open_bus_and_are_dropped() {
        let mut dev = Scratch([1, 2, 3, 4]);
        write_bytes(&mut dev, 3, &[9, 9, 9, 9]);
        assert_eq!(dev.0, [1, 2, 3, 9]);
        let mut data = [0u8; 2];
        read_bytes(&mut dev, 3, &mut data);
        assert_eq!(data, [9, OPEN_BUS]);
        read_bytes(&mut dev, u64::MAX, &mut data);
        assert_eq!(data, [OPEN_BUS, OPEN_BUS]);
    }
}
