//! Text rendering of a [`KernelReport`]: one aligned `label: value` line
//! per fact (continuation lines indented under the value), tables for
//! segments and notes, the verdict last; plus the symbolic names of ELF note
//! types, setup-header flags and PE machines.

use std::fmt::{self, Write as _};

use linux_loader::loader::bootparam::{
    CAN_USE_HEAP, KEEP_SEGMENTS, LOADED_HIGH, QUIET_FLAG, XLF_5LEVEL, XLF_5LEVEL_ENABLED,
    XLF_CAN_BE_LOADED_ABOVE_4G, XLF_EFI_HANDOVER_32, XLF_EFI_HANDOVER_64, XLF_EFI_KEXEC,
    XLF_KERNEL_64, XLF_MEM_ENCRYPTION,
};

use super::{BzImageInfo, EntryPoints, Format, KernelReport, Note, PeHeader, Segment, Verdict};
use crate::kernel::{protocol_version, setup_size, BootProtocol, Firmware};

/// Width of the label column, "initrd_addr_max: " included.
const LABEL_WIDTH: usize = 18;
/// `loadflags` bit telling the kernel KASLR is on (not in linux-loader).
const KASLR_FLAG: u8 = 1 << 1;
/// First boot protocol with each of the fields shown.
const RELOCATABLE_PROTOCOL: u16 = 0x0205;
const CMDLINE_SIZE_PROTOCOL: u16 = 0x0206;
const PAYLOAD_PROTOCOL: u16 = 0x0208;
const INIT_SIZE_PROTOCOL: u16 = 0x020a;
const XLOADFLAGS_PROTOCOL: u16 = 0x020c;
const INITRD_MAX_PROTOCOL: u16 = 0x0203;

impl fmt::Display for KernelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(path) => line(
                f,
                "File",
                format!("{} ({} bytes)", path.display(), self.size),
            )?,
            None => line(f, "Size", format!("{} bytes", self.size))?,
        }
        line(f, "Format", self.format_text())?;
        if let Some(version) = &self.linux_version {
            line(f, "Linux version", version)?;
        }
        if let Some(kind) = self.kind_text() {
            line(f, "Kind", kind)?;
        }
        if let Some(bzimage) = &self.bzimage {
            write_bzimage(f, bzimage)?;
        }
        write_entries(f, &self.entries)?;
        write_segments(f, &self.segments)?;
        if let Some(end) = self.ram_end {
            let mib = end.div_ceil(1 << 20);
            line(
                f,
                "RAM needed",
                format!("{mib} MiB (the kernel ends at {end:#x})"),
            )?;
        }
        write_notes(f, &self.notes)?;
        write_verdict(f, &self.verdict)
    }
}

impl KernelReport {
    /// What an ELF is beyond its format: recognised firmware, or a PVH
    /// payload that is not Linux.
    fn kind_text(&self) -> Option<String> {
        if let Some(firmware) = self.firmware {
            return Some(firmware_text(firmware).into());
        }
        let elf = matches!(self.format, Format::ElfPvh | Format::Elf64);
        (elf && self.linux_version.is_none()).then(|| {
            "not a Linux kernel (no Linux version string): firmware or another bare-metal guest"
                .into()
        })
    }

    fn format_text(&self) -> String {
        match &self.format {
            Format::ElfPvh => "ELF64 x86-64 with a PVH entry note (Xen PHYS32_ENTRY)".into(),
            Format::Elf64 => "ELF64 x86-64 without a PVH entry note".into(),
            Format::ElfOther(what) => what.clone(),
            Format::BzImage => match &self.bzimage {
                Some(bz) => bzimage_format(bz),
                None => "bzImage".into(),
            },
            Format::Pe(Some(pe)) => {
                format!(
                    "PE/EFI binary ({}) without a Linux boot header",
                    pe_kind(pe)
                )
            }
            Format::Pe(None) => "MZ executable without a PE header or Linux boot header".into(),
            Format::UefiVolume => "UEFI firmware volume (OVMF/EDK2 flash image)".into(),
            Format::Compressed(method) => format!("{method}-compressed data"),
            Format::Unknown(head) => format!("unknown (starts with {head})"),
        }
    }
}

/// What a recognised firmware does once entered.
fn firmware_text(firmware: Firmware) -> &'static str {
    match firmware {
        Firmware::RustHypervisorFirmware => {
            "firmware: rust-hypervisor-firmware, an EFI firmware entered through PVH\n\
             boots the EFI system partition of the first virtio-blk disk that has one:\n\
             /loader/entries/*.conf (boot loader spec), else \\EFI\\BOOT\\BOOTX64.EFI;\n\
             --cmdline is put before the entry's options, --initrd is not used"
        }
    }
}

fn bzimage_format(bz: &BzImageInfo) -> String {
    let mut text = format!(
        "bzImage, Linux boot protocol {}",
        protocol_version(bz.header.version)
    );
    if let Some(pe) = &bz.efi_stub {
        let _ = write!(text, ", with an EFI stub ({})", pe_kind(pe));
    }
    text
}

/// Writes `label: value`, continuation lines of `value` aligned under it.
fn line(f: &mut fmt::Formatter<'_>, label: &str, value: impl fmt::Display) -> fmt::Result {
    let value = value.to_string();
    let mut lines = value.lines();
    let label = format!("{label}:");
    writeln!(
        f,
        "{label:<LABEL_WIDTH$}{}",
        lines.next().unwrap_or_default()
    )?;
    for rest in lines {
        writeln!(f, "{:LABEL_WIDTH$}{rest}", "")?;
    }
    Ok(())
}

fn write_bzimage(f: &mut fmt::Formatter<'_>, bz: &BzImageInfo) -> fmt::Result {
    let hdr = &bz.header;
    let version = hdr.version;
    let setup = setup_size(hdr);
    line(
        f,
        "setup_sects",
        format!(
            "{} ({setup:#x} bytes of boot sector and setup code)",
            hdr.setup_sects
        ),
    )?;
    line(
        f,
        "loadflags",
        flags_text(u16::from(hdr.loadflags), &LOADFLAGS),
    )?;
    if version >= XLOADFLAGS_PROTOCOL {
        line(f, "xloadflags", flags_text(hdr.xloadflags, &XLOADFLAGS))?;
    }
    if version >= RELOCATABLE_PROTOCOL {
        let relocatable = if hdr.relocatable_kernel != 0 {
            "yes"
        } else {
            "no"
        };
        let alignment = hdr.kernel_alignment;
        line(
            f,
            "relocatable",
            format!("{relocatable} (kernel_alignment {alignment:#x})"),
        )?;
    }
    if version >= INIT_SIZE_PROTOCOL {
        let init_size = hdr.init_size;
        let mib = u64::from(init_size).div_ceil(1 << 20);
        line(f, "init_size", format!("{init_size:#x} ({mib} MiB)"))?;
        let pref = hdr.pref_address;
        line(f, "pref_address", format!("{pref:#x}"))?;
    }
    if version >= CMDLINE_SIZE_PROTOCOL {
        let size = hdr.cmdline_size;
        line(f, "cmdline_size", size)?;
    }
    if version >= INITRD_MAX_PROTOCOL {
        let max = hdr.initrd_addr_max;
        line(f, "initrd_addr_max", format!("{max:#x}"))?;
    }
    if version >= PAYLOAD_PROTOCOL {
        line(f, "Payload", payload_text(bz))?;
    }
    Ok(())
}

fn payload_text(bz: &BzImageInfo) -> String {
    let Some(payload) = &bz.payload else {
        return "not found: payload_offset/payload_length point outside the file".into();
    };
    let method = match payload.compression {
        Some(method) => method.to_string(),
        None => "unknown compression".into(),
    };
    format!(
        "{method}, {:#x} bytes at file offset {:#x}, decompresses to {:#x} bytes ({} MiB)",
        payload.compressed_size,
        payload.offset,
        payload.uncompressed_size,
        u64::from(payload.uncompressed_size).div_ceil(1 << 20)
    )
}

type FlagNames = [(u16, &'static str)];

const LOADFLAGS: [(u16, &str); 5] = [
    (LOADED_HIGH as u16, "LOADED_HIGH"),
    (KASLR_FLAG as u16, "KASLR_FLAG"),
    (QUIET_FLAG as u16, "QUIET_FLAG"),
    (KEEP_SEGMENTS as u16, "KEEP_SEGMENTS"),
    (CAN_USE_HEAP as u16, "CAN_USE_HEAP"),
];

const XLOADFLAGS: [(u16, &str); 8] = [
    (XLF_KERNEL_64, "KERNEL_64"),
    (XLF_CAN_BE_LOADED_ABOVE_4G, "CAN_BE_LOADED_ABOVE_4G"),
    (XLF_EFI_HANDOVER_32, "EFI_HANDOVER_32"),
    (XLF_EFI_HANDOVER_64, "EFI_HANDOVER_64"),
    (XLF_EFI_KEXEC, "EFI_KEXEC"),
    (XLF_5LEVEL, "5LEVEL"),
    (XLF_5LEVEL_ENABLED, "5LEVEL_ENABLED"),
    (XLF_MEM_ENCRYPTION, "MEM_ENCRYPTION"),
];

/// "0x13 KERNEL_64 CAN_BE_LOADED_ABOVE_4G EFI_KEXEC" (unknown bits in hex).
fn flags_text(value: u16, names: &FlagNames) -> String {
    let mut text = format!("{value:#04x}");
    let mut known = 0;
    for &(bit, name) in names {
        known |= bit;
        if value & bit != 0 {
            let _ = write!(text, " {name}");
        }
    }
    if value & !known != 0 {
        let _ = write!(text, " +{:#x}", value & !known);
    }
    if value == 0 {
        text.push_str(" (none)");
    }
    text
}

fn write_entries(f: &mut fmt::Formatter<'_>, entries: &EntryPoints) -> fmt::Result {
    let mut lines = Vec::new();
    match entries.elf {
        Some(entry) if entries.pvh == Some(entry) => lines.push(format!(
            "e_entry       {entry:#x} (the PVH entry again: 32-bit code, not a 64-bit entry)"
        )),
        Some(entry) => lines.push(format!(
            "e_entry       {entry:#x} (64-bit Linux boot protocol)"
        )),
        None => {}
    }
    if let Some(entry) = entries.pvh {
        lines.push(format!(
            "PVH           {entry:#x} (32-bit, Xen PHYS32_ENTRY)"
        ));
    }
    if let Some(entry) = entries.bzimage_64 {
        lines.push(format!(
            "64-bit        {entry:#x} (load address 0x100000 + 0x200)"
        ));
    }
    if let Some(entry) = entries.code32_start {
        lines.push(format!("code32_start  {entry:#x} (32-bit)"));
    }
    if lines.is_empty() {
        return Ok(());
    }
    line(f, "Entry points", lines.join("\n"))
}

fn write_segments(f: &mut fmt::Formatter<'_>, segments: &[Segment]) -> fmt::Result {
    if segments.is_empty() {
        return Ok(());
    }
    let row = |paddr: &str, memsz: &str, filesz: &str| format!("{paddr:<12} {memsz:<12} {filesz}");
    let mut rows = vec![row("paddr", "memsz", "filesz")];
    rows.extend(segments.iter().map(|s| {
        row(
            &format!("{:#x}", s.paddr),
            &format!("{:#x}", s.memsz),
            &format!("{:#x}", s.filesz),
        )
    }));
    line(f, "Segments", rows.join("\n"))
}

fn write_notes(f: &mut fmt::Formatter<'_>, notes: &[Note]) -> fmt::Result {
    if notes.is_empty() {
        return Ok(());
    }
    let owner_width = notes.iter().map(|n| n.owner.len()).max().unwrap_or(0);
    let number_width = notes
        .iter()
        .map(|n| n.kind.to_string().len())
        .max()
        .unwrap_or(0);
    let name_width = notes
        .iter()
        .map(|n| note_type_name(&n.owner, n.kind).unwrap_or("").len())
        .max()
        .unwrap_or(0);
    let rows: Vec<String> = notes
        .iter()
        .map(|note| {
            let name = note_type_name(&note.owner, note.kind).unwrap_or("");
            format!(
                "{:<owner_width$}  {:>number_width$} {name:<name_width$}  {}",
                note.owner,
                note.kind,
                describe_desc(note)
            )
        })
        .collect();
    line(f, "Notes", rows.join("\n"))
}

fn write_verdict(f: &mut fmt::Formatter<'_>, verdict: &Verdict) -> fmt::Result {
    match verdict {
        Verdict::Boots { protocol, hint } => {
            let how = match protocol {
                BootProtocol::Pvh => "PVH",
                BootProtocol::Linux64 => "the 64-bit Linux boot protocol",
            };
            line(f, "Verdict", format!("zvmm boots this via {how}"))?;
            if let Some(hint) = hint {
                line(f, "Hint", hint)?;
            }
            Ok(())
        }
        Verdict::Cannot { why, todo } => line(
            f,
            "Verdict",
            format!("zvmm cannot boot this: {why}; {todo}"),
        ),
    }
}

/// Symbolic names of the note types Linux kernels carry.
pub(super) fn note_type_name(owner: &str, kind: u32) -> Option<&'static str> {
    const XEN: [&str; 19] = [
        "XEN_ELFNOTE_INFO",
        "XEN_ELFNOTE_ENTRY",
        "XEN_ELFNOTE_HYPERCALL_PAGE",
        "XEN_ELFNOTE_VIRT_BASE",
        "XEN_ELFNOTE_PADDR_OFFSET",
        "XEN_ELFNOTE_XEN_VERSION",
        "XEN_ELFNOTE_GUEST_OS",
        "XEN_ELFNOTE_GUEST_VERSION",
        "XEN_ELFNOTE_LOADER",
        "XEN_ELFNOTE_PAE_MODE",
        "XEN_ELFNOTE_FEATURES",
        "XEN_ELFNOTE_BSD_SYMTAB",
        "XEN_ELFNOTE_HV_START_LOW",
        "XEN_ELFNOTE_L1_MFN_VALID",
        "XEN_ELFNOTE_SUSPEND_CANCEL",
        "XEN_ELFNOTE_INIT_P2M",
        "XEN_ELFNOTE_MOD_START_PFN",
        "XEN_ELFNOTE_SUPPORTED_FEATURES",
        "XEN_ELFNOTE_PHYS32_ENTRY",
    ];
    match (owner, kind) {
        ("Xen", kind) => XEN.get(kind as usize).copied(),
        ("GNU", 1) => Some("NT_GNU_ABI_TAG"),
        ("GNU", 3) => Some("NT_GNU_BUILD_ID"),
        ("GNU", 4) => Some("NT_GNU_GOLD_VERSION"),
        ("GNU", 5) => Some("NT_GNU_PROPERTY_TYPE_0"),
        ("Linux", 0x100) => Some("LINUX_ELFNOTE_BUILD_SALT"),
        ("Linux", 0x101) => Some("LINUX_ELFNOTE_LTO_INFO"),
        _ => None,
    }
}

/// A note descriptor as text: a quoted string when printable, a number when
/// 4 or 8 bytes, hex otherwise (always hex for a GNU build-id).
pub(super) fn describe_desc(note: &Note) -> String {
    let desc = &note.desc;
    if note.owner == "GNU" && note.kind == 3 {
        return format!("build-id {}", hex(desc, ""));
    }
    if let Some(text) = printable(desc) {
        return format!("\"{text}\"");
    }
    match desc.len() {
        4 => format!(
            "{:#x}",
            u32::from_le_bytes([desc[0], desc[1], desc[2], desc[3]])
        ),
        8 => {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(desc);
            format!("{:#x}", u64::from_le_bytes(bytes))
        }
        0 => "(empty)".into(),
        _ => hex(desc, " "),
    }
}

/// The text of a NUL-terminated (or NUL-free) printable ASCII descriptor.
fn printable(desc: &[u8]) -> Option<&str> {
    let text = match desc.iter().position(|&b| b == 0) {
        Some(nul) if desc[nul..].iter().all(|&b| b == 0) => &desc[..nul],
        Some(_) => return None,
        None if desc.len() == 4 || desc.len() == 8 => return None,
        None => desc,
    };
    if text.is_empty() || !text.iter().all(|b| (0x20..0x7f).contains(b)) {
        return None;
    }
    std::str::from_utf8(text).ok()
}

fn hex(bytes: &[u8], separator: &str) -> String {
    let parts: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(separator)
}

/// "PE32+ x86-64".
fn pe_kind(pe: &PeHeader) -> String {
    let kind = match pe.magic {
        0x20b => "PE32+",
        0x10b => "PE32",
        _ => "PE",
    };
    format!("{kind} {}", pe_machine_name(pe.machine))
}

/// A readable name of a COFF machine type.
pub(super) fn pe_machine_name(machine: u16) -> String {
    let name = match machine {
        0x8664 => "x86-64",
        0x14c => "i386",
        0xaa64 => "arm64",
        0x1c0 | 0x1c2 | 0x1c4 => "arm",
        0x5032 => "riscv32",
        0x5064 => "riscv64",
        0x6264 => "loongarch64",
        _ => return format!("machine {machine:#06x}"),
    };
    name.to_string()
}
