//! Boot parameters written next to the kernel: the command line, and either
//! the PVH `hvm_start_info` with its memory map and module list, or the
//! Linux zero page (`boot_params`) with its e820 map.

use std::mem::size_of;

use linux_loader::configurator::{
    linux::LinuxBootConfigurator, pvh::PvhBootConfigurator, BootConfigurator, BootParams,
};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header, LOADED_HIGH};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::initrd::LoadedInitrd;
use crate::kernel::{BootProtocol, LoadedKernel};
use crate::layout::{
    self, MemoryRange, CMDLINE_MAX_SIZE, CMDLINE_START, PAGE_SIZE, PVH_INFO_START, ZERO_PAGE_START,
};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// `hvm_start_info` version with the memory map fields.
const XEN_HVM_START_VERSION: u32 = 1;
/// `boot_flag` of a Linux boot sector.
const BOOT_FLAG: u16 = 0xaa55;
/// The "HdrS" setup header signature.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Boot protocol version claimed for a bare ELF kernel (2.15).
const ELF_BOOT_PROTOCOL: u16 = 0x020f;
/// `kernel_alignment` claimed for a bare ELF kernel.
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `type_of_loader`: "undefined" boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Boot protocol that introduced `cmdline_size`.
const CMDLINE_SIZE_PROTOCOL: u16 = 0x0206;
/// Alignment of the tables that follow `hvm_start_info`.
const PVH_TABLE_ALIGN: u64 = 16;

/// What `configure_boot` tells the kernel besides where it is.
#[derive(Clone, Copy, Debug)]
pub struct BootSetup<'a> {
    /// Guest RAM size; the memory map comes from `layout::memory_map`.
    pub ram_size: u64,
    /// Kernel command line, without the terminating NUL.
    pub cmdline: &'a str,
    /// The loaded initrd, if any.
    pub initrd: Option<LoadedInitrd>,
    /// Address of the ACPI RSDP, if ACPI tables were written.
    pub rsdp: Option<GuestAddress>,
}

/// Why the boot parameters could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte at offset {offset}; remove it")]
    CmdlineNul {
        /// Byte offset of the NUL.
        offset: usize,
    },
    /// The command line is longer than the limit.
    #[error("kernel command line is {len} bytes, but {whose} accepts at most {max}; shorten it")]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
        /// Whose limit: zvmm's or the kernel's.
        whose: &'static str,
    },
    /// The memory map does not fit in the boot structures.
    #[error(
        "guest memory map has {entries} entries, more than the {max} the boot parameters hold"
    )]
    MemoryMapTooLarge {
        /// Entries in the map.
        entries: usize,
        /// Entries that fit.
        max: usize,
    },
    /// Writing the command line failed.
    #[error("cannot write the kernel command line to guest memory at {CMDLINE_START:#x}")]
    WriteCmdline(#[source] GuestMemoryError),
    /// linux-loader's configurator failed.
    #[error("cannot write the {protocol} boot parameters to guest memory")]
    Configure {
        /// "PVH" or "Linux".
        protocol: &'static str,
        /// Underlying error.
        #[source]
        source: linux_loader::configurator::Error,
    },
}

/// Writes the command line (at `layout::CMDLINE_START`) and the boot
/// parameters of the kernel's protocol: PVH start info, memory map and
/// initrd module at `layout::PVH_INFO_START`, or the Linux zero page at
/// `layout::ZERO_PAGE_START`. Returns the address the vCPU gets in EBX
/// (PVH) or RSI (Linux).
pub fn configure_boot<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &LoadedKernel,
    setup: &BootSetup,
) -> Result<GuestAddress, BootError> {
    check_cmdline(setup.cmdline, kernel.setup_header.as_ref())?;
    let mut bytes = Vec::with_capacity(setup.cmdline.len() + 1);
    bytes.extend_from_slice(setup.cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(BootError::WriteCmdline)?;
    let map = layout::memory_map(setup.ram_size);
    match kernel.protocol {
        BootProtocol::Pvh => write_pvh(mem, setup, &map),
        BootProtocol::Linux64 => write_zero_page(mem, kernel.setup_header, setup, &map),
    }
}

/// Checks the command line has no NUL and fits zvmm's and the kernel's
/// limits (the bzImage's `cmdline_size`, terminating NUL excluded).
fn check_cmdline(cmdline: &str, hdr: Option<&setup_header>) -> Result<(), BootError> {
    if let Some(offset) = cmdline.bytes().position(|b| b == 0) {
        return Err(BootError::CmdlineNul { offset });
    }
    let len = cmdline.len();
    if len > CMDLINE_MAX_SIZE - 1 {
        return Err(BootError::CmdlineTooLong {
            len,
            max: CMDLINE_MAX_SIZE - 1,
            whose: "zvmm",
        });
    }
    if let Some(hdr) = hdr.filter(|h| h.version >= CMDLINE_SIZE_PROTOCOL) {
        let max = hdr.cmdline_size as usize;
        if len > max {
            return Err(BootError::CmdlineTooLong {
                len,
                max,
                whose: "this kernel (bzImage cmdline_size)",
            });
        }
    }
    Ok(())
}

/// Where the PVH memory map and module list go: right after the start info.
fn pvh_table_addrs(memmap_entries: usize) -> (u64, u64) {
    let memmap =
        (PVH_INFO_START + size_of::<hvm_start_info>() as u64).next_multiple_of(PVH_TABLE_ALIGN);
    let memmap_len = (memmap_entries * size_of::<hvm_memmap_table_entry>()) as u64;
    let modlist = (memmap + memmap_len).next_multiple_of(PVH_TABLE_ALIGN);
    (memmap, modlist)
}

fn write_pvh<M: GuestMemoryBackend>(
    mem: &M,
    setup: &BootSetup,
    map: &[MemoryRange],
) -> Result<GuestAddress, BootError> {
    let (memmap_addr, modlist_addr) = pvh_table_addrs(map.len());
    let modlist_size = size_of::<hvm_modlist_entry>() as u64;
    let area_end = PVH_INFO_START + PAGE_SIZE;
    if modlist_addr + modlist_size > area_end {
        let room = area_end - memmap_addr - modlist_size - (PVH_TABLE_ALIGN - 1);
        return Err(BootError::MemoryMapTooLarge {
            entries: map.len(),
            max: (room / size_of::<hvm_memmap_table_entry>() as u64) as usize,
        });
    }
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: XEN_HVM_START_VERSION,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: setup.rsdp.map_or(0, |addr| addr.0),
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|range| hvm_memmap_table_entry {
            addr: range.start,
            size: range.size,
            type_: range.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut modules = Vec::new();
    if let Some(initrd) = setup.initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modlist_addr;
        modules.push(hvm_modlist_entry {
            paddr: initrd.addr.0,
            size: initrd.size,
            cmdline_paddr: 0,
            reserved: 0,
        });
    }
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(memmap_addr));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|source| BootError::Configure {
        protocol: "PVH",
        source,
    })?;
    Ok(GuestAddress(PVH_INFO_START))
}

/// The setup header for a bare ELF kernel, which has none of its own.
fn elf_setup_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        version: ELF_BOOT_PROTOCOL,
        loadflags: LOADED_HIGH,
        kernel_alignment: ELF_KERNEL_ALIGNMENT,
        ..Default::default()
    }
}

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    bzimage_header: Option<setup_header>,
    setup: &BootSetup,
    map: &[MemoryRange],
) -> Result<GuestAddress, BootError> {
    let mut params = boot_params::default();
    if map.len() > params.e820_table.len() {
        return Err(BootError::MemoryMapTooLarge {
            entries: map.len(),
            max: params.e820_table.len(),
        });
    }
    params.hdr = bzimage_header.unwrap_or_else(elf_setup_header);
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = setup.cmdline.len() as u32;
    if let Some(initrd) = setup.initrd {
        // The initrd sits below the 32-bit MMIO hole, so both fit in u32.
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = setup.rsdp.map_or(0, |addr| addr.0);
    for (slot, range) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: range.start,
            size: range.size,
            r#type: range.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    let params = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&params, mem).map_err(|source| {
        BootError::Configure {
            protocol: "Linux",
            source,
        }
    })?;
    Ok(GuestAddress(ZERO_PAGE_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testimg::{
        guest_memory, read_guest, test_setup_header, BZ_CMDLINE_SIZE, TEST_RAM,
    };
    use crate::kernel::KernelFormat;
    use linux_loader::loader::bootparam::XLF_KERNEL_64;
    use vm_memory::GuestMemoryMmap;

    const CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
    const RSDP: GuestAddress = GuestAddress(layout::ACPI_START);
    const INITRD: LoadedInitrd = LoadedInitrd {
        addr: GuestAddress(0x300_0000),
        size: 0x1234,
    };

    fn kernel(protocol: BootProtocol, setup_header: Option<setup_header>) -> LoadedKernel {
        let format = match (protocol, setup_header) {
            (BootProtocol::Pvh, _) => KernelFormat::ElfPvh,
            (_, Some(_)) => KernelFormat::BzImage,
            (_, None) => KernelFormat::Elf64,
        };
        LoadedKernel {
            protocol,
            format,
            entry: GuestAddress(0x100_0000),
            end: GuestAddress(0x200_0000),
            setup_header,
        }
    }

    fn setup(cmdline: &str, initrd: Option<LoadedInitrd>) -> BootSetup<'_> {
        BootSetup {
            ram_size: TEST_RAM,
            cmdline,
            initrd,
            rsdp: Some(RSDP),
        }
    }

    fn check_cmdline_in_guest(mem: &GuestMemoryMmap, cmdline: &str) {
        let bytes = read_guest(mem, CMDLINE_START, cmdline.len() + 1);
        assert_eq!(&bytes[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(bytes[cmdline.len()], 0);
    }

    #[test]
    fn pvh_start_info_memmap_and_module() {
        let mem = guest_memory(TEST_RAM);
        let kernel = kernel(BootProtocol::Pvh, None);
        let addr = configure_boot(&mem, &kernel, &setup(CMDLINE, Some(INITRD))).unwrap();
        assert_eq!(addr, GuestAddress(PVH_INFO_START));
        check_cmdline_in_guest(&mem, CMDLINE);
        let info: hvm_start_info = mem.read_obj(addr).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.rsdp_paddr, RSDP.0);
        let map = layout::memory_map(TEST_RAM);
        assert_eq!(info.memmap_entries as usize, map.len());
        for (i, range) in map.iter().enumerate() {
            let at = info.memmap_paddr + (i * size_of::<hvm_memmap_table_entry>()) as u64;
            let entry: hvm_memmap_table_entry = mem.read_obj(GuestAddress(at)).unwrap();
            assert_eq!(
                (entry.addr, entry.size, entry.type_),
                (range.start, range.size, range.kind as u32)
            );
        }
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (INITRD.addr.0, INITRD.size));
        assert!(info.modlist_paddr + size_of::<hvm_modlist_entry>() as u64 <= ZERO_PAGE_START);
        assert!(info.memmap_paddr >= PVH_INFO_START + size_of::<hvm_start_info>() as u64);
    }

    #[test]
    fn pvh_without_initrd_has_no_modules() {
        let mem = guest_memory(TEST_RAM);
        let kernel = kernel(BootProtocol::Pvh, None);
        let addr = configure_boot(&mem, &kernel, &setup("", None)).unwrap();
        let info: hvm_start_info = mem.read_obj(addr).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        check_cmdline_in_guest(&mem, "");
    }

    fn read_zero_page(mem: &GuestMemoryMmap, addr: GuestAddress) -> boot_params {
        assert_eq!(addr, GuestAddress(ZERO_PAGE_START));
        mem.read_obj(addr).unwrap()
    }

    fn check_common_zero_page(params: &boot_params, cmdline: &str) {
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, cmdline.len() as u32);
        assert_eq!({ params.acpi_rsdp_addr }, RSDP.0);
        let map = layout::memory_map(TEST_RAM);
        assert_eq!(params.e820_entries as usize, map.len());
        for (entry, range) in params.e820_table.iter().zip(&map) {
            let got = ({ entry.addr }, { entry.size }, { entry.r#type });
            assert_eq!(got, (range.start, range.size, range.kind as u32));
        }
    }

    #[test]
    fn zero_page_for_bare_elf() {
        let mem = guest_memory(TEST_RAM);
        let kernel = kernel(BootProtocol::Linux64, None);
        let addr = configure_boot(&mem, &kernel, &setup(CMDLINE, Some(INITRD))).unwrap();
        let params = read_zero_page(&mem, addr);
        check_common_zero_page(&params, CMDLINE);
        check_cmdline_in_guest(&mem, CMDLINE);
        let hdr = params.hdr;
        assert!({ hdr.version } >= 0x020c);
        assert_eq!({ hdr.kernel_alignment }, 0x100_0000);
        assert_eq!({ hdr.loadflags } & LOADED_HIGH, LOADED_HIGH);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x300_0000, 0x1234)
        );
    }

    #[test]
    fn zero_page_for_bzimage_keeps_its_header() {
        let mem = guest_memory(TEST_RAM);
        let bz_header = test_setup_header();
        let kernel = kernel(BootProtocol::Linux64, Some(bz_header));
        let addr = configure_boot(&mem, &kernel, &setup(CMDLINE, None)).unwrap();
        let params = read_zero_page(&mem, addr);
        check_common_zero_page(&params, CMDLINE);
        let hdr = params.hdr;
        assert_eq!({ hdr.version }, { bz_header.version });
        assert_eq!({ hdr.init_size }, { bz_header.init_size });
        assert_eq!({ hdr.kernel_alignment }, { bz_header.kernel_alignment });
        assert_eq!({ hdr.xloadflags } & XLF_KERNEL_64, XLF_KERNEL_64);
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0, 0));
    }

    #[test]
    fn overlong_cmdline_is_refused_with_both_numbers() {
        let mem = guest_memory(TEST_RAM);
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        let elf = kernel(BootProtocol::Linux64, None);
        let err = configure_boot(&mem, &elf, &setup(&long, None)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&CMDLINE_MAX_SIZE.to_string()), "{msg}");
        assert!(msg.contains(&(CMDLINE_MAX_SIZE - 1).to_string()), "{msg}");
        let fits = "a".repeat(CMDLINE_MAX_SIZE - 1);
        configure_boot(&mem, &elf, &setup(&fits, None)).unwrap();
        check_cmdline_in_guest(&mem, &fits);
    }

    #[test]
    fn cmdline_over_the_bzimage_limit_is_refused() {
        let mem = guest_memory(TEST_RAM);
        let bz = kernel(BootProtocol::Linux64, Some(test_setup_header()));
        let max = BZ_CMDLINE_SIZE as usize;
        configure_boot(&mem, &bz, &setup(&"b".repeat(max), None)).unwrap();
        let err = configure_boot(&mem, &bz, &setup(&"b".repeat(max + 1), None)).unwrap_err();
        assert!(
            matches!(err, BootError::CmdlineTooLong { len, max: m, .. } if len == max + 1 && m == max)
        );
        assert!(err.to_string().contains("this kernel"), "{err}");
    }

    #[test]
    fn cmdline_with_nul_is_refused() {
        let mem = guest_memory(TEST_RAM);
        let elf = kernel(BootProtocol::Pvh, None);
        let err = configure_boot(&mem, &elf, &setup("console=ttyS0\0 quiet", None)).unwrap_err();
        assert!(
            matches!(err, BootError::CmdlineNul { offset: 13 }),
            "{err:?}"
        );
    }

    #[test]
    fn pvh_area_holds_a_large_memory_map() {
        let (_, modlist) = pvh_table_addrs(layout::memory_map(8 << 30).len() + 100);
        assert!(modlist + size_of::<hvm_modlist_entry>() as u64 <= PVH_INFO_START + PAGE_SIZE);
    }
}
