//! `zvmm kernel inspect`: what a kernel file is and how zvmm can boot it.
//! Recognises the same formats as the loader (reusing its header parsers),
//! decodes what a kernel developer wants to see (boot protocol fields, ELF
//! notes, entry points, segments, the Linux version, PVH firmware such as
//! rust-hypervisor-firmware) and ends with a verdict: the protocol zvmm
//! would use, or why it cannot and what to do.

mod display;

use std::mem::size_of;
use std::path::{Path, PathBuf};

use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD, PT_NOTE};
use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

use crate::extract::{self, Compression};
use crate::kernel::{
    check_elf64_x86_64, footprint_end, header_problem, hex_head, identify, identify_firmware,
    parse_notes, parse_setup_header, protocol_version, setup_size, BootProtocol, ElfProblem,
    FileKind, Firmware, HeaderProblem, ENTRY_64_OFFSET, XEN_ELFNOTE_PHYS32_ENTRY,
};
use crate::layout::{FOUR_GIB, HIGH_RAM_START, MMIO32_START};

/// Why a file could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The file could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Everything `zvmm kernel inspect` reports about a file; `Display` renders
/// it as the aligned text block the CLI prints.
#[derive(Debug)]
pub struct KernelReport {
    /// The file, when inspected by path.
    pub path: Option<PathBuf>,
    /// File size in bytes.
    pub size: usize,
    /// What the file is.
    pub format: Format,
    /// The Linux version string (without the "Linux version " prefix).
    pub linux_version: Option<String>,
    /// ELF: the firmware it is, when recognised.
    pub firmware: Option<Firmware>,
    /// Entry points the file declares.
    pub entries: EntryPoints,
    /// ELF: the PT_LOAD segments.
    pub segments: Vec<Segment>,
    /// End of the guest RAM the kernel occupies (ELF: its segments; bzImage:
    /// its code at 1 MiB and its decompression buffer).
    pub ram_end: Option<u64>,
    /// ELF: the notes of its PT_NOTE segments.
    pub notes: Vec<Note>,
    /// bzImage: its setup header and payload.
    pub bzimage: Option<BzImageInfo>,
    /// How zvmm boots it, or why it cannot.
    pub verdict: Verdict,
}

/// What a file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// ELF64 x86_64 with a Xen PVH entry note.
    ElfPvh,
    /// ELF64 x86_64 without a PVH note.
    Elf64,
    /// An ELF zvmm cannot boot, described ("32-bit ELF (i386)", ...).
    ElfOther(String),
    /// A Linux bzImage (the details are in [`KernelReport::bzimage`]).
    BzImage,
    /// A PE/EFI binary without a Linux boot header.
    Pe(Option<PeHeader>),
    /// A UEFI firmware volume (OVMF.fd, CLOUDHV.fd).
    UefiVolume,
    /// A compressed file.
    Compressed(Compression),
    /// Something else; its first bytes in hex.
    Unknown(String),
}

/// The PE header of an EFI binary or of a bzImage's EFI stub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeHeader {
    /// COFF machine type (0x8664 for x86-64).
    pub machine: u16,
    /// Optional-header magic: 0x20b for PE32+, 0x10b for PE32.
    pub magic: u16,
}

/// Entry points a kernel file declares (guest-physical addresses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryPoints {
    /// ELF `e_entry`.
    pub elf: Option<u64>,
    /// 32-bit PVH entry from the Xen `PHYS32_ENTRY` note.
    pub pvh: Option<u64>,
    /// bzImage 64-bit entry: where zvmm loads it (1 MiB) + 0x200.
    pub bzimage_64: Option<u64>,
    /// bzImage `code32_start`.
    pub code32_start: Option<u64>,
}

/// One PT_LOAD segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// File offset of its contents.
    pub offset: u64,
    /// Guest-physical load address.
    pub paddr: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory.
    pub memsz: u64,
}

/// One ELF note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Owner name, without its NUL.
    pub owner: String,
    /// Note type.
    pub kind: u32,
    /// Descriptor bytes.
    pub desc: Vec<u8>,
}

/// A bzImage's setup header and payload.
#[derive(Debug)]
pub struct BzImageInfo {
    /// The setup header.
    pub header: setup_header,
    /// The compressed payload, when the header locates one.
    pub payload: Option<Payload>,
    /// The EFI stub's PE header, when the image has one.
    pub efi_stub: Option<PeHeader>,
}

/// A bzImage's compressed payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    /// Its compression, when recognised.
    pub compression: Option<Compression>,
    /// File offset.
    pub offset: u64,
    /// Compressed size.
    pub compressed_size: u64,
    /// Decompressed size Linux records in the payload's last four bytes.
    pub uncompressed_size: u32,
}

/// Whether and how zvmm boots a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// zvmm boots it with `protocol`; `hint` suggests something better.
    Boots {
        /// The boot protocol zvmm uses.
        protocol: BootProtocol,
        /// Advice, e.g. how to get the faster PVH boot.
        hint: Option<String>,
    },
    /// zvmm cannot boot it.
    Cannot {
        /// Why.
        why: String,
        /// What to do instead.
        todo: String,
    },
}

impl Verdict {
    /// Whether zvmm can boot the file.
    pub fn bootable(&self) -> bool {
        matches!(self, Verdict::Boots { .. })
    }

    fn cannot(why: impl Into<String>, todo: impl Into<String>) -> Self {
        Verdict::Cannot {
            why: why.into(),
            todo: todo.into(),
        }
    }
}

/// Reads and inspects the file at `path`.
pub fn inspect_file(path: &Path) -> Result<KernelReport, InspectError> {
    let bytes = std::fs::read(path).map_err(|source| InspectError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut report = inspect_named(&bytes, &path.display().to_string());
    report.path = Some(path.to_path_buf());
    Ok(report)
}

/// Inspects a kernel file's contents; commands in the verdict name it FILE.
pub fn inspect_kernel(bytes: &[u8]) -> KernelReport {
    inspect_named(bytes, "FILE")
}

fn inspect_named(bytes: &[u8], name: &str) -> KernelReport {
    let mut report = KernelReport {
        path: None,
        size: bytes.len(),
        format: Format::Unknown(hex_head(bytes)),
        linux_version: None,
        firmware: None,
        entries: EntryPoints::default(),
        segments: Vec::new(),
        ram_end: None,
        notes: Vec::new(),
        bzimage: None,
        verdict: Verdict::cannot("the file is empty", "pass an ELF vmlinux or a bzImage"),
    };
    if bytes.is_empty() {
        return report;
    }
    match identify(bytes) {
        FileKind::Elf => inspect_elf(bytes, &mut report),
        FileKind::BzImage => inspect_bzimage(bytes, &mut report),
        FileKind::Pe => inspect_pe(bytes, name, &mut report),
        FileKind::UefiVolume => {
            report.format = Format::UefiVolume;
            report.verdict = Verdict::cannot(
                "it is a UEFI firmware volume (an OVMF/EDK2 flash image such as OVMF.fd or \
                 CLOUDHV.fd); zvmm boots PVH firmware, not UEFI flash images",
                "pass rust-hypervisor-firmware's hypervisor-fw as --kernel (release asset of \
                 github.com/cloud-hypervisor/rust-hypervisor-firmware)",
            );
        }
        FileKind::Compressed(method) => {
            report.format = Format::Compressed(method);
            report.verdict = Verdict::cannot(
                format!("it is a {method}-compressed file, not a kernel image"),
                format!(
                    "decompress it (`{} {name} > vmlinux`) and inspect the result",
                    method.cat_tool()
                ),
            );
        }
        FileKind::Unknown => {
            report.verdict = Verdict::cannot(
                "it is neither an ELF vmlinux nor a bzImage",
                "pass arch/x86/boot/bzImage or vmlinux from a Linux build",
            );
        }
    }
    report
}

// ---------------------------------------------------------------- ELF

fn inspect_elf(bytes: &[u8], report: &mut KernelReport) {
    if let Err(problem) = check_elf64_x86_64(bytes) {
        let (what, why, todo) = elf_problem_text(problem);
        report.format = Format::ElfOther(what);
        report.verdict = Verdict::cannot(why, todo);
        return;
    }
    report.linux_version = find_linux_banner(bytes);
    report.firmware = identify_firmware(bytes);
    let mut ehdr = Elf64_Ehdr::default();
    ehdr.as_mut_slice()
        .copy_from_slice(&bytes[..size_of::<Elf64_Ehdr>()]);
    report.entries.elf = Some(ehdr.e_entry);
    let phdrs = match program_headers(bytes, &ehdr) {
        Ok(phdrs) => phdrs,
        Err(why) => {
            report.format = Format::Elf64;
            report.verdict = Verdict::cannot(why, "rebuild or copy the vmlinux again");
            return;
        }
    };
    report.notes = collect_notes(bytes, &phdrs);
    report.segments = phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0)
        .map(|p| Segment {
            offset: p.p_offset,
            paddr: p.p_paddr,
            filesz: p.p_filesz,
            memsz: p.p_memsz,
        })
        .collect();
    report.ram_end = report
        .segments
        .iter()
        .map(|s| s.paddr.saturating_add(s.memsz))
        .max();
    let pvh_note = report
        .notes
        .iter()
        .find(|n| n.owner == "Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY);
    report.format = if pvh_note.is_some() {
        Format::ElfPvh
    } else {
        Format::Elf64
    };
    report.entries.pvh = pvh_note
        .and_then(|n| n.desc.get(..4))
        .map(|d| u64::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]])));
    report.verdict = elf_verdict(bytes.len() as u64, report, pvh_note.is_some());
}

/// (format description, why zvmm cannot boot it, what to do).
fn elf_problem_text(problem: ElfProblem) -> (String, String, String) {
    let x86_64 = "use an x86_64 kernel (ARCH=x86_64)".to_string();
    match problem {
        ElfProblem::Truncated => (
            "ELF (truncated)".into(),
            "it is shorter than an ELF header".into(),
            "copy the complete file again".into(),
        ),
        ElfProblem::Class32 => (
            "ELF32 (i386)".into(),
            "it is a 32-bit ELF; zvmm boots 64-bit kernels".into(),
            "build a 64-bit kernel (ARCH=x86_64, CONFIG_64BIT=y)".into(),
        ),
        ElfProblem::BigEndian => (
            "big-endian ELF".into(),
            "it is a big-endian ELF; zvmm boots x86_64 kernels".into(),
            x86_64,
        ),
        ElfProblem::Arch(arch) => (
            format!("ELF for {arch}"),
            format!("it is built for {arch}; zvmm boots x86_64 kernels"),
            x86_64,
        ),
        ElfProblem::BadIdent => (
            "ELF (invalid class or data encoding)".into(),
            "its ELF identification bytes are invalid".into(),
            "copy the complete file again".into(),
        ),
    }
}

/// The program headers, checked to lie in the file.
fn program_headers(bytes: &[u8], ehdr: &Elf64_Ehdr) -> Result<Vec<Elf64_Phdr>, String> {
    let entry_size = size_of::<Elf64_Phdr>();
    if usize::from(ehdr.e_phentsize) != entry_size && ehdr.e_phnum != 0 {
        return Err(format!(
            "its program header size is {} (expected 56)",
            ehdr.e_phentsize
        ));
    }
    let table = usize::try_from(ehdr.e_phoff)
        .ok()
        .and_then(|start| {
            bytes
                .get(start..)?
                .get(..usize::from(ehdr.e_phnum) * entry_size)
        })
        .ok_or("its program headers run past the end of the file")?;
    Ok(table
        .chunks_exact(entry_size)
        .map(|chunk| {
            let mut phdr = Elf64_Phdr::default();
            phdr.as_mut_slice().copy_from_slice(chunk);
            phdr
        })
        .collect())
}

fn collect_notes(bytes: &[u8], phdrs: &[Elf64_Phdr]) -> Vec<Note> {
    phdrs
        .iter()
        .filter(|p| p.p_type == PT_NOTE)
        .filter_map(|p| file_range(bytes, p.p_offset, p.p_filesz))
        .flat_map(parse_notes)
        .map(|note| Note {
            owner: String::from_utf8_lossy(note.name.strip_suffix(b"\0").unwrap_or(note.name))
                .into_owned(),
            kind: note.kind,
            desc: note.desc.to_vec(),
        })
        .collect()
}

fn file_range(bytes: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let len = usize::try_from(len).ok()?;
    bytes.get(start..start.checked_add(len)?)
}

/// The same checks `load_kernel` makes, without guest memory.
fn elf_verdict(size: u64, report: &KernelReport, has_pvh_note: bool) -> Verdict {
    if report.segments.is_empty() {
        return Verdict::cannot(
            "it has no loadable segment",
            "pass a linked vmlinux, not an object file",
        );
    }
    if let Some(problem) = report
        .segments
        .iter()
        .find_map(|s| segment_problem(size, s))
    {
        return problem;
    }
    if has_pvh_note && report.entries.pvh.is_none() {
        return Verdict::cannot(
            "its PVH entry note (Xen, type 18) is shorter than 4 bytes",
            "rebuild the kernel",
        );
    }
    let entry = report.entries.pvh.or(report.entries.elf).unwrap_or(0);
    let inside = |s: &Segment| (s.paddr..s.paddr.saturating_add(s.memsz)).contains(&entry);
    if !report.segments.iter().any(inside) {
        return Verdict::cannot(
            format!("its entry point {entry:#x} is outside its loaded segments"),
            "rebuild the kernel or check its linker script",
        );
    }
    match (has_pvh_note, report.firmware) {
        (true, Some(_)) => Verdict::Boots {
            protocol: BootProtocol::Pvh,
            hint: Some(
                "attach the VM's raw disk (GPT with an EFI system partition) as the first \
                 --disk; resources/vm-disk/build-efi-disk.sh builds one"
                    .into(),
            ),
        },
        (true, None) => Verdict::Boots {
            protocol: BootProtocol::Pvh,
            hint: None,
        },
        (false, Some(firmware)) => Verdict::cannot(
            format!("it is {firmware} without a PVH entry note (a coreboot build?)"),
            "use the PVH build (the hypervisor-fw release asset)",
        ),
        (false, None) => Verdict::Boots {
            protocol: BootProtocol::Linux64,
            hint: Some("PVH boots faster: build the kernel with CONFIG_PVH=y".into()),
        },
    }
}

fn segment_problem(size: u64, s: &Segment) -> Option<Verdict> {
    let rebuild = "rebuild the kernel";
    let Some(end) = s.paddr.checked_add(s.memsz) else {
        let why = format!(
            "its segment at {:#x} wraps around the address space",
            s.paddr
        );
        return Some(Verdict::cannot(why, rebuild));
    };
    if s.filesz > s.memsz {
        let why = format!(
            "its segment at {:#x} is larger in the file than in memory",
            s.paddr
        );
        return Some(Verdict::cannot(why, rebuild));
    }
    if s.offset.checked_add(s.filesz).is_none_or(|e| e > size) {
        return Some(Verdict::cannot(
            "it is truncated: a loadable segment runs past the end of the file",
            "copy the complete file again",
        ));
    }
    if s.paddr < HIGH_RAM_START {
        return Some(Verdict::cannot(
            format!(
                "it loads [{:#x}, {end:#x}) below 1 MiB, where zvmm keeps boot data",
                s.paddr
            ),
            "link the kernel at 1 MiB (0x100000) or above",
        ));
    }
    if s.paddr < FOUR_GIB && end > MMIO32_START {
        return Some(Verdict::cannot(
            format!(
                "it loads [{:#x}, {end:#x}), into the MMIO hole at {MMIO32_START:#x}-{FOUR_GIB:#x}",
                s.paddr
            ),
            "link the kernel lower (CONFIG_PHYSICAL_START)",
        ));
    }
    None
}

/// The text after "Linux version " followed by a digit, up to the end of
/// the line. Kernels may carry a placeholder banner without the build number
/// ("# SMP") besides the real one ("#1 SMP"); the real one is preferred.
fn find_linux_banner(bytes: &[u8]) -> Option<String> {
    const PREFIX: &[u8] = b"Linux version ";
    let mut first = None;
    let mut from = 0;
    while let Some(pos) = find(&bytes[from..], PREFIX) {
        let start = from + pos + PREFIX.len();
        from = start;
        if !bytes.get(start).is_some_and(u8::is_ascii_digit) {
            continue;
        }
        let Some(banner) = printable_string(&bytes[start..]) else {
            continue;
        };
        if has_build_number(&banner) {
            return Some(banner);
        }
        first.get_or_insert(banner);
    }
    first
}

/// Whether a banner has "#<digit>" (the build number before "SMP" etc.).
fn has_build_number(banner: &str) -> bool {
    banner
        .as_bytes()
        .windows(2)
        .any(|w| w[0] == b'#' && w[1].is_ascii_digit())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle.first()?;
    let mut pos = 0;
    while let Some(i) = haystack.get(pos..)?.iter().position(|b| b == first) {
        let at = pos + i;
        if haystack.get(at..at + needle.len())? == needle {
            return Some(at);
        }
        pos = at + 1;
    }
    None
}

/// A printable ASCII string ended by NUL or newline (at most 256 bytes).
fn printable_string(bytes: &[u8]) -> Option<String> {
    let text: Vec<u8> = bytes
        .iter()
        .take(256)
        .take_while(|&&b| b != 0 && b != b'\n')
        .copied()
        .collect();
    if text.is_empty() || !text.iter().all(|b| (0x20..0x7f).contains(b)) {
        return None;
    }
    Some(String::from_utf8_lossy(&text).trim_end().to_string())
}

// ---------------------------------------------------------------- bzImage

/// Boot protocol that introduced `kernel_version` (the offset, minus 0x200,
/// of the version string).
const KERNEL_VERSION_PROTOCOL: u16 = 0x0200;

fn inspect_bzimage(bytes: &[u8], report: &mut KernelReport) {
    report.format = Format::BzImage;
    let Some(header) = parse_setup_header(bytes) else {
        report.verdict = Verdict::cannot(
            "the bzImage setup header is cut short",
            "copy the complete image again",
        );
        return;
    };
    report.linux_version = bzimage_version(bytes, &header);
    let load_addr = HIGH_RAM_START;
    report.entries.bzimage_64 = Some(load_addr + ENTRY_64_OFFSET);
    report.entries.code32_start = Some(u64::from(header.code32_start));
    let setup = setup_size(&header);
    let code_size = (bytes.len() as u64).saturating_sub(setup);
    report.ram_end = Some(footprint_end(&header, load_addr, code_size));
    report.bzimage = Some(BzImageInfo {
        header,
        payload: payload_info(bytes, &header),
        efi_stub: pe_header(bytes),
    });
    report.verdict = if setup >= bytes.len() as u64 {
        Verdict::cannot(
            "the bzImage has no protected-mode code (truncated)",
            "copy the complete image again",
        )
    } else {
        bzimage_verdict(&header)
    };
}

fn bzimage_version(bytes: &[u8], header: &setup_header) -> Option<String> {
    if header.version < KERNEL_VERSION_PROTOCOL || header.kernel_version == 0 {
        return None;
    }
    let offset = usize::from(header.kernel_version) + 0x200;
    printable_string(bytes.get(offset..)?)
}

fn payload_info(bytes: &[u8], header: &setup_header) -> Option<Payload> {
    let payload = extract::payload(bytes).ok()?;
    let tail = &payload[payload.len() - 4..];
    Some(Payload {
        compression: Compression::from_magic(payload),
        offset: setup_size(header) + u64::from(header.payload_offset),
        compressed_size: payload.len() as u64,
        uncompressed_size: u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]),
    })
}

fn bzimage_verdict(header: &setup_header) -> Verdict {
    let version = protocol_version(header.version);
    match header_problem(header) {
        None => Verdict::Boots {
            protocol: BootProtocol::Linux64,
            hint: Some(
                "`zvmm kernel extract` gives the vmlinux inside, which boots faster via PVH \
                 when the kernel has CONFIG_PVH=y"
                    .into(),
            ),
        },
        Some(HeaderProblem::TooOld) => Verdict::cannot(
            format!("it uses boot protocol {version}; zvmm needs 2.06 or later"),
            "use a Linux 2.6.22 or newer kernel",
        ),
        Some(HeaderProblem::NotHigh) => Verdict::cannot(
            "it is a zImage, loaded below 1 MiB",
            "build a bzImage (make bzImage)",
        ),
        Some(HeaderProblem::Not64) => Verdict::cannot(
            format!("it has no 64-bit entry point (boot protocol {version}, XLF_KERNEL_64 unset)"),
            "build a 64-bit kernel (ARCH=x86_64, CONFIG_64BIT=y)",
        ),
    }
}

// ---------------------------------------------------------------- PE

/// Offset of the PE header's offset in an MZ file.
const PE_POINTER_OFFSET: usize = 0x3c;
/// COFF machine type of x86-64.
const PE_MACHINE_X86_64: u16 = 0x8664;

/// The PE header of an MZ file, if it has one.
fn pe_header(bytes: &[u8]) -> Option<PeHeader> {
    if !bytes.starts_with(b"MZ") {
        return None;
    }
    let word = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let pointer = bytes.get(PE_POINTER_OFFSET..PE_POINTER_OFFSET + 4)?;
    let pe = u32::from_le_bytes([pointer[0], pointer[1], pointer[2], pointer[3]]) as usize;
    if bytes.get(pe..pe.checked_add(4)?)? != b"PE\0\0" {
        return None;
    }
    // COFF header: machine at +4; the optional header follows its 20 bytes.
    Some(PeHeader {
        machine: word(pe + 4)?,
        magic: word(pe + 24).unwrap_or(0),
    })
}

fn inspect_pe(bytes: &[u8], name: &str, report: &mut KernelReport) {
    let header = pe_header(bytes);
    report.format = Format::Pe(header);
    // `identify` reports PE only for files without the Linux boot header.
    report.verdict = match header.filter(|h| h.machine != PE_MACHINE_X86_64) {
        Some(h) => Verdict::cannot(
            format!(
                "it is a PE/EFI binary for {}; zvmm boots x86_64 kernels",
                display::pe_machine_name(h.machine)
            ),
            "use an x86_64 kernel (ARCH=x86_64)",
        ),
        None => Verdict::cannot(
            "it is a PE/EFI binary without a Linux boot header (not a bzImage)",
            format!(
                "boot the kernel's vmlinux or bzImage; from a unified kernel image, take \
                 the bzImage with `objcopy -O binary --only-section=.linux {name} bzImage`"
            ),
        ),
    };
}

#[cfg(test)]
mod tests;
