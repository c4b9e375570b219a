//! PVH flavour of the probe: the library plus the Xen PVH ELF note that
//! points at the 32-bit entry `pvh_start32`.

#![no_std]
#![no_main]

use probe as _;

// XEN_ELFNOTE_PHYS32_ENTRY (18): 32-bit physical entry point, name "Xen".
core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4
    .section .text
"#,
    options(att_syntax)
);
