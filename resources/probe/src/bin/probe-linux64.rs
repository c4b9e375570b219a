//! Linux 64-bit boot protocol flavour of the probe: the library, entered at
//! `linux64_start` (the ELF entry point), without the PVH note.

#![no_std]
#![no_main]

use probe as _;
