//! zvmm's virtual machine monitor: KVM, guest memory, vCPUs, the platform,
//! the event loop and the VM lifecycle. [`vm::Vmm`] runs one VM from a
//! [`config::VmConfig`]; the `zvmm` binary is a thin command line over it.

pub mod api;
pub mod bus;
pub mod cloud_init;
pub mod config;
pub mod console;
pub mod control;
pub mod cpuid;
pub mod fs;
pub mod handle;
pub mod image;
pub mod interrupts;
pub mod kernel_time;
pub mod lifecycle;
pub mod memory;
pub mod net;
pub mod pci;
pub mod platform;
pub mod regs;
pub mod sandbox;
pub mod signals;
pub mod vcpu;
pub mod virtio_devices;
pub mod virtiofsd;
pub mod vm;
pub mod watch;
pub mod writer;
