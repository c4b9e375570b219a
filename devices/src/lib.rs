//! Bus-agnostic device models. A device sees offsets within its own
//! register window and knows nothing of KVM, port numbers or addresses;
//! `vmm` places it on a bus. Devices ask the machine for a power-off or
//! reset through [`VmControl`].

pub mod legacy;
pub mod pci;
pub mod virtio;

/// A device register window on a port-I/O or MMIO bus.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` within the device window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` within the device window.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// What a device can ask of the machine it is part of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRequest {
    /// The guest asked to be powered off (ACPI S5).
    PowerOff,
    /// The guest asked to be reset (i8042, ACPI reset register).
    Reset,
}

/// Receives [`VmRequest`]s; implemented by the VMM.
pub trait VmControl: Send + Sync {
    /// Hand a request to the machine. Must not block.
    fn request(&self, request: VmRequest);
}
