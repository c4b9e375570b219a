//! ELF64 x86_64 kernels (vmlinux, or any PVH-capable ELF such as firmware):
//! header checks with errors that name what the file is, PT_LOAD validation
//! against guest RAM, the Xen PVH entry note, firmware recognition, and the
//! segment copy.

use std::io::{Seek, SeekFrom};
use std::mem::size_of;

use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, EM_386, EM_X86_64, PT_LOAD, PT_NOTE};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::firmware::{self, Firmware};
use super::{
    describe_ram, in_ram, BootProtocol, KernelError, KernelFile, KernelFormat, LoadedKernel,
};
use crate::layout::HIGH_RAM_START;

/// The four bytes every ELF file starts with.
pub(crate) const ELF_MAGIC: &[u8] = b"\x7fELF";

const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ELFDATA2MSB: u8 = 2;
/// Offset of `e_machine`, the same in 32- and 64-bit headers.
const E_MACHINE_OFFSET: usize = 18;
/// Xen ELF note type carrying the 32-bit PVH entry point.
pub(crate) const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Name of the Xen ELF notes, NUL included.
const XEN_NOTE_NAME: &[u8] = b"Xen\0";
/// Size of an ELF note header (namesz, descsz, type).
const NOTE_HEADER_SIZE: usize = 12;
/// Chunk of zeroes written to clear a segment's BSS.
const ZERO_CHUNK: usize = 0x1_0000;

/// Why a byte string is not an ELF64 x86_64 little-endian file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ElfProblem {
    /// Shorter than an ELF header.
    Truncated,
    /// `EI_CLASS` is 32-bit.
    Class32,
    /// Big-endian data encoding.
    BigEndian,
    /// Built for another architecture (named).
    Arch(String),
    /// Invalid `EI_CLASS` or `EI_DATA`.
    BadIdent,
}

/// One PT_LOAD segment, validated.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.paddr + self.memsz
    }

    fn contains(&self, addr: u64) -> bool {
        (self.paddr..self.end()).contains(&addr)
    }
}

/// Checks the identification bytes of an ELF file (whose magic is already
/// known) are those of a 64-bit little-endian x86_64 file.
pub(crate) fn check_elf64_x86_64(head: &[u8]) -> Result<(), ElfProblem> {
    let machine_bytes = head
        .get(E_MACHINE_OFFSET..E_MACHINE_OFFSET + 2)
        .ok_or(ElfProblem::Truncated)?;
    let data = head[EI_DATA];
    let machine = match data {
        ELFDATA2LSB => u16::from_le_bytes([machine_bytes[0], machine_bytes[1]]),
        ELFDATA2MSB => u16::from_be_bytes([machine_bytes[0], machine_bytes[1]]),
        _ => return Err(ElfProblem::BadIdent),
    };
    match (machine, head[EI_CLASS]) {
        (EM_386, _) | (EM_X86_64, 1) => Err(ElfProblem::Class32),
        (EM_X86_64, ELFCLASS64) if data == ELFDATA2LSB => {
            if head.len() < size_of::<Elf64_Ehdr>() {
                Err(ElfProblem::Truncated)
            } else {
                Ok(())
            }
        }
        (EM_X86_64, ELFCLASS64) => Err(ElfProblem::BigEndian),
        (EM_X86_64, _) => Err(ElfProblem::BadIdent),
        (other, _) => Err(ElfProblem::Arch(arch_name(other))),
    }
}

/// A readable name for an ELF `e_machine` value.
fn arch_name(machine: u16) -> String {
    let name = match machine {
        2 => "sparc",
        8 => "mips",
        20 => "powerpc",
        21 => "powerpc64",
        22 => "s390",
        40 => "arm",
        43 => "sparc64",
        50 => "ia64",
        183 => "aarch64",
        243 => "riscv",
        258 => "loongarch",
        _ => return format!("machine type {machine}"),
    };
    name.to_string()
}

/// Loads an ELF64 x86_64 kernel whose first bytes are `head`.
pub(super) fn load<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut KernelFile,
    head: &[u8],
) -> Result<LoadedKernel, KernelError> {
    let ehdr = parse_header(kernel, head)?;
    let phdrs = read_program_headers(kernel, &ehdr)?;
    let segments = loadable_segments(mem, kernel, &phdrs)?;
    let pvh_entry = find_pvh_entry(kernel, &phdrs)?.map(u64::from);
    let (protocol, format, entry) = match (pvh_entry, find_firmware(kernel)?) {
        (Some(entry), Some(fw)) => (BootProtocol::Pvh, KernelFormat::PvhFirmware(fw), entry),
        (Some(entry), None) => (BootProtocol::Pvh, KernelFormat::ElfPvh, entry),
        (None, Some(firmware)) => {
            return Err(KernelError::FirmwareWithoutPvh {
                path: kernel.path.clone(),
                firmware,
            })
        }
        (None, None) => (BootProtocol::Linux64, KernelFormat::Elf64, ehdr.e_entry),
    };
    if !segments.iter().any(|s| s.contains(entry)) {
        return Err(KernelError::EntryOutsideImage {
            path: kernel.path.clone(),
            entry,
        });
    }
    for segment in &segments {
        copy_segment(mem, kernel, segment)?;
    }
    let end = segments
        .iter()
        .map(Segment::end)
        .max()
        .unwrap_or(HIGH_RAM_START);
    Ok(LoadedKernel {
        protocol,
        format,
        entry: GuestAddress(entry),
        end: GuestAddress(end),
        setup_header: None,
    })
}

/// Checks the identification and returns the ELF64 header.
fn parse_header(kernel: &KernelFile, head: &[u8]) -> Result<Elf64_Ehdr, KernelError> {
    let path = || kernel.path.clone();
    check_elf64_x86_64(head).map_err(|problem| match problem {
        ElfProblem::Truncated => kernel.truncated("the ELF header"),
        ElfProblem::Class32 => KernelError::Elf32 { path: path() },
        ElfProblem::BigEndian => KernelError::ElfBigEndian { path: path() },
        ElfProblem::Arch(arch) => KernelError::ElfArch { path: path(), arch },
        ElfProblem::BadIdent => malformed(kernel, "invalid class or data encoding".into()),
    })?;
    let mut ehdr = Elf64_Ehdr::default();
    let len = size_of::<Elf64_Ehdr>();
    ehdr.as_mut_slice().copy_from_slice(&head[..len]);
    if ehdr.e_phnum == 0 {
        return Err(KernelError::ElfNoLoadable { path: path() });
    }
    if usize::from(ehdr.e_phentsize) != size_of::<Elf64_Phdr>() {
        let what = format!("program header size {} (expected 56)", ehdr.e_phentsize);
        return Err(malformed(kernel, what));
    }
    Ok(ehdr)
}

fn malformed(kernel: &KernelFile, what: String) -> KernelError {
    KernelError::ElfMalformed {
        path: kernel.path.clone(),
        what,
    }
}

fn read_program_headers(
    kernel: &KernelFile,
    ehdr: &Elf64_Ehdr,
) -> Result<Vec<Elf64_Phdr>, KernelError> {
    let entry_size = size_of::<Elf64_Phdr>();
    let table = kernel.read_at(
        ehdr.e_phoff,
        usize::from(ehdr.e_phnum) * entry_size,
        "its program headers run past the end of the file",
    )?;
    Ok(table
        .chunks_exact(entry_size)
        .map(|bytes| {
            let mut phdr = Elf64_Phdr::default();
            phdr.as_mut_slice().copy_from_slice(bytes);
            phdr
        })
        .collect())
}

/// The PT_LOAD segments with memory, each checked to lie in the file and in
/// guest RAM above the low boot area.
fn loadable_segments<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &KernelFile,
    phdrs: &[Elf64_Phdr],
) -> Result<Vec<Segment>, KernelError> {
    let mut segments = Vec::new();
    for phdr in phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0)
    {
        let segment = Segment {
            offset: phdr.p_offset,
            paddr: phdr.p_paddr,
            filesz: phdr.p_filesz,
            memsz: phdr.p_memsz,
        };
        check_segment(mem, kernel, &segment)?;
        segments.push(segment);
    }
    if segments.is_empty() {
        return Err(KernelError::ElfNoLoadable {
            path: kernel.path.clone(),
        });
    }
    Ok(segments)
}

fn check_segment<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &KernelFile,
    segment: &Segment,
) -> Result<(), KernelError> {
    if segment.filesz > segment.memsz {
        let what = format!(
            "segment at {:#x} has file size {:#x} above its memory size {:#x}",
            segment.paddr, segment.filesz, segment.memsz
        );
        return Err(malformed(kernel, what));
    }
    if segment
        .offset
        .checked_add(segment.filesz)
        .is_none_or(|end| end > kernel.size)
    {
        return Err(kernel.truncated("a loadable segment runs past the end of the file"));
    }
    let start = segment.paddr;
    let Some(end) = start.checked_add(segment.memsz) else {
        let what = format!("segment at {start:#x} wraps around the address space");
        return Err(malformed(kernel, what));
    };
    if start < HIGH_RAM_START {
        return Err(KernelError::SegmentInBootArea {
            path: kernel.path.clone(),
            start,
            end,
        });
    }
    if !in_ram(mem, start, segment.memsz) {
        return Err(KernelError::SegmentOutsideRam {
            path: kernel.path.clone(),
            start,
            end,
            ram: describe_ram(mem),
        });
    }
    Ok(())
}

/// The PVH entry point from the first Xen `PHYS32_ENTRY` note of any
/// PT_NOTE segment.
fn find_pvh_entry(kernel: &KernelFile, phdrs: &[Elf64_Phdr]) -> Result<Option<u32>, KernelError> {
    for phdr in phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
        let Ok(len) = usize::try_from(phdr.p_filesz) else {
            return Err(kernel.truncated("a note segment runs past the end of the file"));
        };
        let notes = kernel.read_at(
            phdr.p_offset,
            len,
            "a note segment runs past the end of the file",
        )?;
        if let Some(desc) = find_xen_entry_note(&notes) {
            let entry = desc.get(..4).ok_or_else(|| KernelError::BadPvhNote {
                path: kernel.path.clone(),
            })?;
            return Ok(Some(u32::from_le_bytes([
                entry[0], entry[1], entry[2], entry[3],
            ])));
        }
    }
    Ok(None)
}

/// The firmware a small ELF is (a vmlinux is larger than
/// [`firmware::SCAN_LIMIT`] and never searched).
fn find_firmware(kernel: &KernelFile) -> Result<Option<Firmware>, KernelError> {
    if kernel.size > firmware::SCAN_LIMIT {
        return Ok(None);
    }
    let bytes = kernel.read_at(0, kernel.size as usize, "the file")?;
    Ok(firmware::identify(&bytes))
}

/// The descriptor of the Xen `PHYS32_ENTRY` note in a note segment, if any.
fn find_xen_entry_note(notes: &[u8]) -> Option<&[u8]> {
    parse_notes(notes)
        .find(|note| note.kind == XEN_ELFNOTE_PHYS32_ENTRY && note.name == XEN_NOTE_NAME)
        .map(|note| note.desc)
}

/// One note of an ELF note segment (little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ElfNote<'a> {
    /// Owner name as stored, NUL terminator included.
    pub(crate) name: &'a [u8],
    /// Note type.
    pub(crate) kind: u32,
    /// Descriptor bytes.
    pub(crate) desc: &'a [u8],
}

/// The notes of a note segment, in order. Iteration stops at the first note
/// that overruns the segment.
pub(crate) fn parse_notes(notes: &[u8]) -> impl Iterator<Item = ElfNote<'_>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let (note, next) = note_at(notes, pos)?;
        pos = next;
        Some(note)
    })
}

/// The note at `pos` and the offset of the next one.
fn note_at(notes: &[u8], pos: usize) -> Option<(ElfNote<'_>, usize)> {
    let header = notes.get(pos..pos.checked_add(NOTE_HEADER_SIZE)?)?;
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (namesz, descsz, kind) = (word(0) as usize, word(4) as usize, word(8));
    let name_start = pos + NOTE_HEADER_SIZE;
    let desc_start = name_start.checked_add(namesz.checked_next_multiple_of(4)?)?;
    let next = desc_start.checked_add(descsz.checked_next_multiple_of(4)?)?;
    let name = notes.get(name_start..name_start.checked_add(namesz)?)?;
    let desc = notes.get(desc_start..desc_start.checked_add(descsz)?)?;
    Some((ElfNote { name, kind, desc }, next))
}

/// Copies a segment's file bytes to its physical address and zeroes the rest
/// of its memory (BSS), so a reload into used memory starts clean.
fn copy_segment<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut KernelFile,
    segment: &Segment,
) -> Result<(), KernelError> {
    let path = kernel.path.clone();
    kernel
        .file
        .seek(SeekFrom::Start(segment.offset))
        .map_err(|source| KernelError::Read {
            path: path.clone(),
            source,
        })?;
    let guest_err = |addr: u64| {
        let path = path.clone();
        move |source| KernelError::GuestMemory { path, addr, source }
    };
    // The segment was checked to lie in guest RAM, so its sizes fit usize.
    let filesz = segment.filesz as usize;
    mem.read_exact_volatile_from(GuestAddress(segment.paddr), &mut kernel.file, filesz)
        .map_err(guest_err(segment.paddr))?;
    let zeroes = vec![0u8; ZERO_CHUNK];
    let mut addr = segment.paddr + segment.filesz;
    while addr < segment.end() {
        let len = (segment.end() - addr).min(ZERO_CHUNK as u64) as usize;
        mem.write_slice(&zeroes[..len], GuestAddress(addr))
            .map_err(guest_err(addr))?;
        addr += len as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::load_kernel;
    use crate::kernel::testimg::*;

    fn load_bytes(image: &[u8]) -> Result<LoadedKernel, KernelError> {
        let mem = guest_memory(TEST_RAM);
        let file = TempFile::new("vmlinux", image);
        load_kernel(&mem, file.path())
    }

    #[test]
    fn elf_without_note_boots_linux64() {
        let mem = guest_memory(TEST_RAM);
        let elf = ElfBuilder::new(0x20_0000).code(CODE).bss(0x3000).build();
        let file = TempFile::new("vmlinux", &elf);
        let kernel = load_kernel(&mem, file.path()).unwrap();
        assert_eq!(kernel.protocol, BootProtocol::Linux64);
        assert_eq!(kernel.format, KernelFormat::Elf64);
        assert_eq!(kernel.entry, GuestAddress(0x20_0000));
        assert_eq!(
            kernel.end,
            GuestAddress(0x20_0000 + CODE.len() as u64 + 0x3000)
        );
        assert!(kernel.setup_header.is_none());
        assert_eq!(read_guest(&mem, 0x20_0000, CODE.len()), CODE);
    }

    #[test]
    fn elf_with_pvh_note_boots_pvh() {
        let mem = guest_memory(TEST_RAM);
        let elf = ElfBuilder::new(0x10_0000)
            .code(CODE)
            .pvh_entry(0x10_0004)
            .build();
        let file = TempFile::new("pvh.elf", &elf);
        let kernel = load_kernel(&mem, file.path()).unwrap();
        assert_eq!(kernel.protocol, BootProtocol::Pvh);
        assert_eq!(kernel.format, KernelFormat::ElfPvh);
        assert_eq!(kernel.entry, GuestAddress(0x10_0004));
        assert_eq!(read_guest(&mem, 0x10_0000, CODE.len()), CODE);
    }

    /// Code bytes carrying rust-hypervisor-firmware's boot paths.
    fn firmware_code() -> Vec<u8> {
        let mut code = CODE.to_vec();
        code.extend_from_slice(b"/loader/loader.conf\0\\EFI\\BOOT\\BOOTX64.EFI\0");
        code
    }

    #[test]
    fn pvh_firmware_boots_pvh_and_is_named() {
        let elf = ElfBuilder::new(0x10_0000)
            .code(&firmware_code())
            .pvh_entry(0x10_0000)
            .build();
        let kernel = load_bytes(&elf).unwrap();
        assert_eq!(kernel.protocol, BootProtocol::Pvh);
        assert_eq!(
            kernel.format,
            KernelFormat::PvhFirmware(Firmware::RustHypervisorFirmware)
        );
        assert_eq!(kernel.entry, GuestAddress(0x10_0000));
    }

    #[test]
    fn firmware_without_pvh_note_is_refused() {
        let elf = ElfBuilder::new(0x10_0000).code(&firmware_code()).build();
        let err = load_bytes(&elf).unwrap_err();
        assert!(
            matches!(err, KernelError::FirmwareWithoutPvh { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("is rust-hypervisor-firmware without a PVH entry note"),
            "{msg}"
        );
    }

    #[test]
    fn pvh_note_after_other_notes_is_found() {
        let elf = ElfBuilder::new(0x10_0000)
            .code(CODE)
            .extra_note(b"GNU\0", 3, &[1, 2, 3, 4, 5])
            .pvh_entry(0x10_0008)
            .build();
        let kernel = load_bytes(&elf).unwrap();
        assert_eq!(kernel.entry, GuestAddress(0x10_0008));
    }

    #[test]
    fn bss_is_zeroed_over_old_contents() {
        let mem = guest_memory(TEST_RAM);
        mem.write_slice(&[0xaa; 0x100], GuestAddress(0x20_0000 + CODE.len() as u64))
            .unwrap();
        let elf = ElfBuilder::new(0x20_0000).code(CODE).bss(0x100).build();
        let file = TempFile::new("vmlinux", &elf);
        load_kernel(&mem, file.path()).unwrap();
        let bss = read_guest(&mem, 0x20_0000 + CODE.len() as u64, 0x100);
        assert!(bss.iter().all(|&b| b == 0));
    }

    #[test]
    fn elf32_is_refused() {
        let err = load_bytes(&elf32_image()).unwrap_err();
        assert!(matches!(err, KernelError::Elf32 { .. }), "{err:?}");
        assert!(err.to_string().contains("32-bit"), "{err}");
    }

    #[test]
    fn aarch64_elf_is_refused_by_name() {
        let elf = ElfBuilder::new(0x20_0000).code(CODE).machine(183).build();
        let err = load_bytes(&elf).unwrap_err();
        assert!(matches!(err, KernelError::ElfArch { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("is an ELF for aarch64; zvmm boots x86_64"),
            "{err}"
        );
    }

    #[test]
    fn truncated_elf_is_refused() {
        let elf = ElfBuilder::new(0x20_0000).code(&[0x90; 0x800]).build();
        for len in [40, 100, elf.len() - 1] {
            let err = load_bytes(&elf[..len]).unwrap_err();
            assert!(
                matches!(err, KernelError::Truncated { .. }),
                "{len}: {err:?}"
            );
        }
    }

    #[test]
    fn elf_without_loadable_segment_is_refused() {
        let elf = ElfBuilder::new(0x20_0000)
            .no_load()
            .pvh_entry(0x20_0000)
            .build();
        let err = load_bytes(&elf).unwrap_err();
        assert!(matches!(err, KernelError::ElfNoLoadable { .. }), "{err:?}");
    }

    #[test]
    fn segment_below_1mib_is_refused() {
        let elf = ElfBuilder::new(0x8000).code(CODE).build();
        let err = load_bytes(&elf).unwrap_err();
        assert!(
            matches!(err, KernelError::SegmentInBootArea { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn segment_outside_ram_is_refused() {
        for addr in [TEST_RAM - 2, layout_mmio_hole()] {
            let elf = ElfBuilder::new(addr).code(CODE).build();
            let err = load_bytes(&elf).unwrap_err();
            assert!(
                matches!(err, KernelError::SegmentOutsideRam { .. }),
                "{err:?}"
            );
            assert!(err.to_string().contains("--memory"), "{err}");
        }
    }

    #[test]
    fn segments_may_use_ram_above_4gib_but_not_the_hole() {
        use crate::layout::{FOUR_GIB, MMIO32_START};
        let mem = guest_memory(FOUR_GIB + (64 << 20));
        let across_hole = ElfBuilder::new(MMIO32_START - 0x1000)
            .code(&[0x90; 0x2000])
            .build();
        let file = TempFile::new("vmlinux", &across_hole);
        let err = load_kernel(&mem, file.path()).unwrap_err();
        assert!(
            matches!(err, KernelError::SegmentOutsideRam { .. }),
            "{err:?}"
        );
        let high = ElfBuilder::new(FOUR_GIB + 0x1000).code(CODE).build();
        let file = TempFile::new("vmlinux", &high);
        let kernel = load_kernel(&mem, file.path()).unwrap();
        assert_eq!(
            kernel.end,
            GuestAddress(FOUR_GIB + 0x1000 + CODE.len() as u64)
        );
        assert_eq!(read_guest(&mem, FOUR_GIB + 0x1000, CODE.len()), CODE);
    }

    #[test]
    fn entry_outside_segments_is_refused() {
        let elf = ElfBuilder::new(0x20_0000)
            .code(CODE)
            .entry(0x30_0000)
            .build();
        let err = load_bytes(&elf).unwrap_err();
        assert!(
            matches!(err, KernelError::EntryOutsideImage { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn short_pvh_note_is_refused() {
        let elf = ElfBuilder::new(0x20_0000)
            .code(CODE)
            .extra_note(XEN_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY, &[1, 2])
            .build();
        let err = load_bytes(&elf).unwrap_err();
        assert!(matches!(err, KernelError::BadPvhNote { .. }), "{err:?}");
    }

    fn layout_mmio_hole() -> u64 {
        crate::layout::MMIO32_START + 0x1000
    }
}
