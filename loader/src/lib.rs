//! Everything zvmm writes into guest memory before the first instruction:
//! kernel and initrd images, boot parameters (Linux zero page or PVH start
//! info), the command line and ACPI tables, at addresses from [`layout`].

pub mod acpi;
pub mod boot;
pub mod extract;
pub mod initrd;
pub mod inspect;
pub mod kernel;
pub mod layout;
