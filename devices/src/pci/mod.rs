//! PCI: configuration space of type-0 functions and the host bridge, the
//! root bus reached through ports 0xCF8/0xCFC and an ECAM window, BARs,
//! MSI-X, and the virtio-pci (1.x modern) transport.
