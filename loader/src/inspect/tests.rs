//! Tests of `inspect_kernel` on the loader's test images: every format,
//! every verdict, the decoded fields, the text rendering, and robustness on
//! truncated or corrupted files.

use super::display::{describe_desc, note_type_name};
use super::*;
use crate::kernel::testimg::*;
use linux_loader::loader::bootparam::{XLF_CAN_BE_LOADED_ABOVE_4G, XLF_EFI_KEXEC, XLF_KERNEL_64};

const BANNER: &[u8] = b"Linux version 6.9.0-test (dev@host) (gcc 13) #1 SMP\n\0";
/// The banner without build number some kernels also carry.
const PLACEHOLDER_BANNER: &[u8] = b"Linux version 6.9.0-test (dev@host) (gcc 13) # SMP\n\0";

/// A vmlinux-like ELF: code with a version banner, BSS, Xen, GNU and Linux
/// notes, optionally the PVH entry.
fn vmlinux(pvh: bool) -> Vec<u8> {
    let mut code = CODE.to_vec();
    code.extend_from_slice(b"printk: Linux version %s\0");
    code.extend_from_slice(PLACEHOLDER_BANNER);
    code.extend_from_slice(BANNER);
    let mut builder = ElfBuilder::new(0x100_0000)
        .code(&code)
        .bss(0x20_0000)
        .extra_note(b"Xen\0", 6, b"linux\0")
        .extra_note(b"Xen\0", 3, &0xffff_ffff_8000_0000u64.to_le_bytes())
        .extra_note(b"Xen\0", 10, b"!writable_page_tables|pae_pgdir_above_4gb")
        .extra_note(
            b"Xen\0",
            13,
            &[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        )
        .extra_note(b"GNU\0", 3, &[0x3b, 0x43, 0xfa, 0xd5, 0x03])
        .extra_note(b"Linux\0", 0x101, &[0, 0, 0, 0]);
    if pvh {
        builder = builder.pvh_entry(0x100_0004);
    }
    builder.build()
}

/// A test bzImage with a version string and, optionally, an EFI stub.
fn bzimage(payload: &[u8], efi: bool) -> Vec<u8> {
    let mut image = BzImageBuilder::new(payload).build();
    image[0x20e..0x210].copy_from_slice(&0x400u16.to_le_bytes());
    let version = b"6.9.0-test (dev@host) #1 SMP PREEMPT_DYNAMIC\0";
    image[0x600..0x600 + version.len()].copy_from_slice(version);
    if efi {
        image[..2].copy_from_slice(b"MZ");
        image[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        image[0x80..0x84].copy_from_slice(b"PE\0\0");
        image[0x84..0x86].copy_from_slice(&0x8664u16.to_le_bytes());
        image[0x98..0x9a].copy_from_slice(&0x20bu16.to_le_bytes());
    }
    image
}

/// A payload that looks zstd-compressed, recording a 0x123456-byte vmlinux.
fn zstd_payload() -> Vec<u8> {
    let mut payload = vec![0x28, 0xb5, 0x2f, 0xfd];
    payload.extend_from_slice(&[0x11; 0x100]);
    payload.extend_from_slice(&0x12_3456u32.to_le_bytes());
    payload
}

fn cannot(report: &KernelReport) -> (&str, &str) {
    match &report.verdict {
        Verdict::Cannot { why, todo } => (why, todo),
        other => panic!("expected a refusal, got {other:?}\n{report}"),
    }
}

#[test]
fn elf_with_pvh_note_boots_via_pvh() {
    let report = inspect_kernel(&vmlinux(true));
    assert_eq!(report.format, Format::ElfPvh);
    assert_eq!(
        report.verdict,
        Verdict::Boots {
            protocol: BootProtocol::Pvh,
            hint: None
        }
    );
    assert_eq!(report.entries.elf, Some(0x100_0000));
    assert_eq!(report.entries.pvh, Some(0x100_0004));
    assert_eq!(
        report.linux_version.as_deref(),
        Some("6.9.0-test (dev@host) (gcc 13) #1 SMP")
    );
    assert_eq!(report.segments.len(), 1);
    assert_eq!(report.segments[0].paddr, 0x100_0000);
    assert_eq!(report.ram_end, Some(0x100_0000 + report.segments[0].memsz));
    let owners: Vec<&str> = report.notes.iter().map(|n| n.owner.as_str()).collect();
    assert_eq!(owners, ["Xen", "Xen", "Xen", "Xen", "GNU", "Linux", "Xen"]);
    let text = report.to_string();
    for wanted in [
        "Format:           ELF64 x86-64 with a PVH entry note",
        "Linux version:    6.9.0-test",
        "PVH           0x1000004 (32-bit, Xen PHYS32_ENTRY)",
        "RAM needed:       19 MiB",
        "Xen      6 XEN_ELFNOTE_GUEST_OS      \"linux\"",
        "Linux  257 LINUX_ELFNOTE_LTO_INFO    0x0",
        "\"linux\"",
        "3 XEN_ELFNOTE_VIRT_BASE",
        "0xffffffff80000000",
        "\"!writable_page_tables|pae_pgdir_above_4gb\"",
        "01 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00",
        "3 NT_GNU_BUILD_ID",
        "build-id 3b43fad503",
        "257 LINUX_ELFNOTE_LTO_INFO",
        "18 XEN_ELFNOTE_PHYS32_ENTRY",
        "Verdict:          zvmm boots this via PVH",
    ] {
        assert!(text.contains(wanted), "missing {wanted:?} in\n{text}");
    }
}

#[test]
fn elf_without_pvh_note_boots_via_linux64_with_a_hint() {
    let report = inspect_kernel(&vmlinux(false));
    assert_eq!(report.format, Format::Elf64);
    match &report.verdict {
        Verdict::Boots {
            protocol: BootProtocol::Linux64,
            hint: Some(hint),
        } => assert!(hint.contains("CONFIG_PVH"), "{hint}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(report.entries.pvh, None);
    let text = report.to_string();
    assert!(
        text.contains("via the 64-bit Linux boot protocol"),
        "{text}"
    );
    assert!(text.contains("Hint:"), "{text}");
}

#[test]
fn foreign_elfs_are_refused_with_advice() {
    let report = inspect_kernel(&elf32_image());
    assert_eq!(report.format, Format::ElfOther("ELF32 (i386)".into()));
    let (why, todo) = cannot(&report);
    assert!(why.contains("32-bit"), "{why}");
    assert!(todo.contains("64-bit kernel"), "{todo}");

    let arm = ElfBuilder::new(0x100_0000).code(CODE).machine(183).build();
    let report = inspect_kernel(&arm);
    assert_eq!(report.format, Format::ElfOther("ELF for aarch64".into()));
    assert!(cannot(&report).1.contains("x86_64"));

    let report = inspect_kernel(&vmlinux(true)[..40]);
    assert!(cannot(&report).0.contains("shorter than an ELF header"));
}

#[test]
fn elf_problems_the_loader_refuses_are_refused() {
    let cases: [(Vec<u8>, &str); 5] = [
        (
            ElfBuilder::new(0x20_0000)
                .no_load()
                .pvh_entry(0x20_0000)
                .build(),
            "no loadable segment",
        ),
        (ElfBuilder::new(0x8000).code(CODE).build(), "below 1 MiB"),
        (
            ElfBuilder::new(0x20_0000)
                .code(CODE)
                .entry(0x30_0000)
                .build(),
            "entry point 0x300000 is outside",
        ),
        (
            ElfBuilder::new(0x20_0000)
                .code(CODE)
                .extra_note(b"Xen\0", 18, &[1, 2])
                .build(),
            "PVH entry note",
        ),
        (
            ElfBuilder::new(MMIO32_START - 0x1000)
                .code(&[0x90; 0x2000])
                .build(),
            "MMIO hole",
        ),
    ];
    for (image, wanted) in cases {
        let report = inspect_kernel(&image);
        let (why, _) = cannot(&report);
        assert!(why.contains(wanted), "{why:?} lacks {wanted:?}");
    }
    let elf = ElfBuilder::new(0x20_0000).code(&[0x90; 0x800]).build();
    let report = inspect_kernel(&elf[..elf.len() - 1]);
    assert!(cannot(&report).0.contains("truncated"));
}

#[test]
fn bzimage_fields_are_decoded() {
    let report = inspect_kernel(&bzimage(&zstd_payload(), true));
    assert_eq!(report.format, Format::BzImage);
    match &report.verdict {
        Verdict::Boots {
            protocol: BootProtocol::Linux64,
            hint: Some(hint),
        } => assert!(hint.contains("zvmm kernel extract"), "{hint}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        report.linux_version.as_deref(),
        Some("6.9.0-test (dev@host) #1 SMP PREEMPT_DYNAMIC")
    );
    assert_eq!(report.entries.bzimage_64, Some(0x10_0200));
    assert_eq!(report.entries.code32_start, Some(0x10_0000));
    assert_eq!(report.ram_end, Some(BZ_PREF_ADDRESS + BZ_INIT_SIZE));
    let bz = report.bzimage.as_ref().unwrap();
    assert_eq!(
        bz.efi_stub,
        Some(PeHeader {
            machine: 0x8664,
            magic: 0x20b
        })
    );
    let payload = bz.payload.unwrap();
    assert_eq!(payload.compression, Some(Compression::Zstd));
    assert_eq!(payload.offset, 0xa00 + BZ_STUB_LEN as u64);
    assert_eq!(payload.compressed_size, 0x108);
    assert_eq!(payload.uncompressed_size, 0x12_3456);
    let text = report.to_string();
    for wanted in [
        "Format:           bzImage, Linux boot protocol 2.15, with an EFI stub (PE32+ x86-64)",
        "setup_sects:      4 (0xa00 bytes",
        "loadflags:        0x01 LOADED_HIGH",
        "xloadflags:       0x03 KERNEL_64 CAN_BE_LOADED_ABOVE_4G\n",
        "relocatable:      yes (kernel_alignment 0x200000)",
        "init_size:        0x200000 (2 MiB)",
        "pref_address:     0x1000000",
        "cmdline_size:     255",
        "initrd_addr_max:  0x7fffffff",
        "Payload:          zstd, 0x108 bytes at file offset 0xc40, decompresses to 0x123456 bytes (2 MiB)",
        "64-bit        0x100200",
        "code32_start  0x100000",
        "RAM needed:       18 MiB",
        "Verdict:          zvmm boots this via the 64-bit Linux boot protocol",
    ] {
        assert!(text.contains(wanted), "missing {wanted:?} in\n{text}");
    }
}

#[test]
fn all_xloadflags_are_named() {
    let image = BzImageBuilder::new(&zstd_payload())
        .xloadflags(XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G | 0x0c | XLF_EFI_KEXEC | 0x100)
        .build();
    let text = inspect_kernel(&image).to_string();
    assert!(
        text.contains(
            "xloadflags:       0x11f KERNEL_64 CAN_BE_LOADED_ABOVE_4G EFI_HANDOVER_32 \
             EFI_HANDOVER_64 EFI_KEXEC +0x100"
        ),
        "{text}"
    );
}

#[test]
fn bzimage_payload_problems_are_shown() {
    let unknown = inspect_kernel(&bzimage(&[0xde, 0xad, 0xbe, 0xef, 1, 0, 0, 0], false));
    let payload = unknown.bzimage.as_ref().unwrap().payload.unwrap();
    assert_eq!(payload.compression, None);
    assert!(unknown.verdict.bootable());
    assert!(unknown.to_string().contains("unknown compression"));
    let outside = BzImageBuilder::new(&[0; 16])
        .payload_window(0x10_0000, 16)
        .build();
    let report = inspect_kernel(&outside);
    assert!(report.bzimage.as_ref().unwrap().payload.is_none());
    assert!(report.to_string().contains("Payload:          not found"));
}

#[test]
fn bzimages_zvmm_cannot_boot_are_refused() {
    let cases = [
        (BzImageBuilder::new(&[1; 0x200]).version(0x0205), "2.05"),
        (BzImageBuilder::new(&[1; 0x200]).loadflags(0), "zImage"),
        (
            BzImageBuilder::new(&[1; 0x200]).xloadflags(0),
            "no 64-bit entry",
        ),
        (
            BzImageBuilder::new(&[1; 0x200]).version(0x020a),
            "no 64-bit entry",
        ),
    ];
    for (builder, wanted) in cases {
        let report = inspect_kernel(&builder.build());
        assert_eq!(report.format, Format::BzImage);
        let (why, _) = cannot(&report);
        assert!(why.contains(wanted), "{why:?} lacks {wanted:?}");
    }
    let image = BzImageBuilder::new(&[1; 0x200]).build();
    let report = inspect_kernel(&image[..0x210]);
    assert!(cannot(&report).0.contains("cut short"));
    let report = inspect_kernel(&image[..0xa00]);
    assert!(cannot(&report).0.contains("no protected-mode code"));
}

#[test]
fn pe_binaries_without_boot_header_are_refused() {
    let mut efi = vec![0u8; 0x200];
    efi[..2].copy_from_slice(b"MZ");
    efi[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    efi[0x80..0x84].copy_from_slice(b"PE\0\0");
    efi[0x84..0x86].copy_from_slice(&0x8664u16.to_le_bytes());
    efi[0x98..0x9a].copy_from_slice(&0x20bu16.to_le_bytes());
    let report = inspect_kernel(&efi);
    assert_eq!(
        report.format,
        Format::Pe(Some(PeHeader {
            machine: 0x8664,
            magic: 0x20b
        }))
    );
    let (why, todo) = cannot(&report);
    assert!(why.contains("without a Linux boot header"), "{why}");
    assert!(todo.contains("--only-section=.linux FILE"), "{todo}");

    efi[0x84..0x86].copy_from_slice(&0xaa64u16.to_le_bytes());
    let report = inspect_kernel(&efi);
    assert!(cannot(&report).0.contains("for arm64"));
    assert!(report.to_string().contains("PE/EFI binary (PE32+ arm64)"));

    let report = inspect_kernel(b"MZ\x90\0 not a PE file");
    assert_eq!(report.format, Format::Pe(None));
    assert!(!report.verdict.bootable());
}

#[test]
fn compressed_files_say_how_to_decompress() {
    let cases: [(&[u8], Compression, &str); 5] = [
        (
            &[0x1f, 0x8b, 8, 0],
            Compression::Gzip,
            "zcat FILE > vmlinux",
        ),
        (b"\xfd7zXZ\0\0", Compression::Xz, "xzcat FILE"),
        (
            &[0x28, 0xb5, 0x2f, 0xfd, 0],
            Compression::Zstd,
            "zstdcat FILE",
        ),
        (b"\x89LZO\0\r\n\x1a\n", Compression::Lzo, "lzop -dc FILE"),
        (b"\x02\x21\x4c\x18", Compression::Lz4, "lz4cat FILE"),
    ];
    for (bytes, method, wanted) in cases {
        let report = inspect_kernel(bytes);
        assert_eq!(report.format, Format::Compressed(method));
        let (why, todo) = cannot(&report);
        assert!(why.contains(&format!("{method}-compressed")), "{why}");
        assert!(todo.contains(wanted), "{todo}");
    }
}

#[test]
fn unknown_and_empty_files_are_refused() {
    let report = inspect_kernel(b"#!/bin/sh\necho hi\n");
    assert_eq!(
        report.format,
        Format::Unknown("23 21 2f 62 69 6e 2f 73".into())
    );
    assert!(report
        .to_string()
        .contains("unknown (starts with 23 21 2f 62"));
    assert!(!report.verdict.bootable());
    let report = inspect_kernel(&[]);
    assert!(cannot(&report).0.contains("empty"));
}

#[test]
fn inspect_file_names_the_path() {
    let file = TempFile::new("vmlinux", &vmlinux(true));
    let report = inspect_file(file.path()).unwrap();
    assert_eq!(report.path.as_deref(), Some(file.path()));
    let first = report.to_string().lines().next().unwrap().to_string();
    assert!(first.starts_with("File:             /"), "{first}");
    assert!(
        first.ends_with(&format!("({} bytes)", report.size)),
        "{first}"
    );
    let gz = TempFile::new("vmlinux.gz", &[0x1f, 0x8b, 8, 0]);
    let report = inspect_file(gz.path()).unwrap();
    let todo = cannot(&report).1.to_string();
    assert!(
        todo.contains(&format!("zcat {}", gz.path().display())),
        "{todo}"
    );
    let err = inspect_file(Path::new("/nonexistent/bzImage")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/bzImage"), "{err}");
}

#[test]
fn every_line_is_aligned() {
    for image in [vmlinux(true), bzimage(&zstd_payload(), true)] {
        let text = inspect_kernel(&image).to_string();
        for line in text.lines() {
            let (label, value) = line.split_at(18);
            assert!(
                label.trim().is_empty() || label.trim_end().ends_with(':'),
                "{line:?}"
            );
            assert!(!value.starts_with(' '), "{line:?}");
        }
    }
}

#[test]
fn banner_without_build_number_is_a_fallback() {
    assert_eq!(
        find_linux_banner(b"xx Linux version 5.1 # SMP\n").as_deref(),
        Some("5.1 # SMP")
    );
    assert_eq!(
        find_linux_banner(b"Linux version %s\0Linux version \x01"),
        None
    );
    assert_eq!(find_linux_banner(b"Linux version "), None);
}

#[test]
fn note_descriptors_are_described() {
    let note = |owner: &str, kind, desc: &[u8]| Note {
        owner: owner.into(),
        kind,
        desc: desc.to_vec(),
    };
    assert_eq!(describe_desc(&note("Xen", 7, b"2.6\0")), "\"2.6\"");
    assert_eq!(describe_desc(&note("Xen", 17, &[1, 0x88, 0, 0])), "0x8801");
    assert_eq!(describe_desc(&note("Xen", 2, &[0; 8])), "0x0");
    assert_eq!(describe_desc(&note("Xen", 9, b"yes")), "\"yes\"");
    assert_eq!(describe_desc(&note("X", 1, &[1, 2, 3])), "01 02 03");
    assert_eq!(describe_desc(&note("X", 1, &[])), "(empty)");
    assert_eq!(describe_desc(&note("X", 1, b"ab\0cd")), "61 62 00 63 64");
    assert_eq!(describe_desc(&note("GNU", 3, b"ABCD")), "build-id 41424344");
    let names = [
        (1, "ENTRY"),
        (2, "HYPERCALL_PAGE"),
        (4, "PADDR_OFFSET"),
        (5, "XEN_VERSION"),
        (7, "GUEST_VERSION"),
        (8, "LOADER"),
        (9, "PAE_MODE"),
        (11, "BSD_SYMTAB"),
        (14, "SUSPEND_CANCEL"),
        (15, "INIT_P2M"),
        (16, "MOD_START_PFN"),
        (17, "SUPPORTED_FEATURES"),
    ];
    for (kind, name) in names {
        assert_eq!(
            note_type_name("Xen", kind),
            Some(format!("XEN_ELFNOTE_{name}").as_str())
        );
    }
    assert_eq!(note_type_name("Xen", 19), None);
    assert_eq!(
        note_type_name("Linux", 0x100),
        Some("LINUX_ELFNOTE_BUILD_SALT")
    );
    assert_eq!(note_type_name("Foo", 3), None);
}

#[test]
fn truncated_and_corrupted_images_never_panic() {
    let images = [vmlinux(true), bzimage(&zstd_payload(), true)];
    for image in &images {
        for len in 0..image.len() {
            let _ = inspect_kernel(&image[..len]).to_string();
        }
    }
    let mut state = 0x1234_5678u32;
    let mut next = || {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        state >> 8
    };
    for image in &images {
        for _ in 0..2000 {
            let mut bad = image.clone();
            for _ in 0..1 + next() % 6 {
                // Mostly the headers, where the pointers and sizes are.
                let span = if next() % 4 == 0 { bad.len() } else { 0x400 };
                let pos = next() as usize % span.min(bad.len());
                bad[pos] = next() as u8;
            }
            let _ = inspect_kernel(&bad).to_string();
        }
    }
}

/// An ELF shaped like rust-hypervisor-firmware: one segment at 1 MiB, its
/// boot paths in the image, e_entry the 32-bit PVH entry (without the note
/// when `pvh` is false: a coreboot build).
fn hypervisor_fw(pvh: bool) -> Vec<u8> {
    let mut code = CODE.to_vec();
    code.extend_from_slice(b"/loader/entries\0/loader/loader.conf\0\\EFI\\BOOT\\BOOTX64.EFI\0");
    let builder = ElfBuilder::new(0x10_0000).code(&code).entry(0x10_0002);
    if pvh {
        builder.pvh_entry(0x10_0002).build()
    } else {
        builder.build()
    }
}

#[test]
fn pvh_firmware_is_named_and_boots_via_pvh() {
    let report = inspect_kernel(&hypervisor_fw(true));
    assert_eq!(report.format, Format::ElfPvh);
    assert_eq!(report.firmware, Some(Firmware::RustHypervisorFirmware));
    assert_eq!(report.linux_version, None);
    match &report.verdict {
        Verdict::Boots {
            protocol: BootProtocol::Pvh,
            hint: Some(hint),
        } => assert!(hint.contains("first --disk"), "{hint}"),
        other => panic!("{other:?}"),
    }
    let text = report.to_string();
    for wanted in [
        "Kind:             firmware: rust-hypervisor-firmware, an EFI firmware entered through PVH",
        "                  boots the EFI system partition of the first virtio-blk disk",
        "/loader/entries/*.conf (boot loader spec), else \\EFI\\BOOT\\BOOTX64.EFI;",
        "e_entry       0x100002 (the PVH entry again: 32-bit code, not a 64-bit entry)",
        "Verdict:          zvmm boots this via PVH",
        "Hint:             attach the VM's raw disk",
    ] {
        assert!(text.contains(wanted), "missing {wanted:?} in\n{text}");
    }
}

#[test]
fn firmware_without_pvh_note_is_refused() {
    let report = inspect_kernel(&hypervisor_fw(false));
    assert_eq!(report.firmware, Some(Firmware::RustHypervisorFirmware));
    let (why, todo) = cannot(&report);
    assert!(
        why.contains("rust-hypervisor-firmware without a PVH entry note"),
        "{why}"
    );
    assert!(todo.contains("hypervisor-fw release asset"), "{todo}");
}

#[test]
fn pvh_elf_without_linux_banner_is_not_called_linux() {
    let elf = ElfBuilder::new(0x10_0000)
        .code(CODE)
        .pvh_entry(0x10_0000)
        .build();
    let text = inspect_kernel(&elf).to_string();
    assert!(
        text.contains("Kind:             not a Linux kernel (no Linux version string)"),
        "{text}"
    );
    let text = inspect_kernel(&vmlinux(true)).to_string();
    assert!(!text.contains("Kind:"), "{text}");
}

#[test]
fn uefi_firmware_volumes_are_refused_with_advice() {
    let mut image = vec![0u8; 0x1000];
    image[0x28..0x2c].copy_from_slice(b"_FVH");
    let report = inspect_kernel(&image);
    assert_eq!(report.format, Format::UefiVolume);
    let (why, todo) = cannot(&report);
    assert!(why.contains("UEFI firmware volume"), "{why}");
    assert!(todo.contains("hypervisor-fw"), "{todo}");
    let text = report.to_string();
    assert!(
        text.contains("Format:           UEFI firmware volume (OVMF/EDK2 flash image)"),
        "{text}"
    );
}
