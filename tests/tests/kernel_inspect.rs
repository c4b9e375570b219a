//! `zvmm kernel inspect` end to end: the Debian cloud bzImage (boot
//! protocol, lz4 payload, version, 64-bit protocol verdict), the vmlinux
//! `zvmm kernel extract` takes out of it (PVH note, entry, build-id, PVH
//! verdict, each cross-checked against the file's bytes), and the exit
//! status for files zvmm cannot boot.

use std::path::Path;
use std::time::Duration;

use linux_loader::elf::PT_NOTE;

use zvmm_tests::assets::debian_bzimage;
use zvmm_tests::zvmm::{run_zvmm, scratch_dir, Finished};

/// Inspecting or extracting the 14 MB bzImage takes well under a second.
const LIMIT: Duration = Duration::from_secs(60);

fn inspect(file: &Path) -> Finished {
    run_zvmm(
        ["kernel".as_ref(), "inspect".as_ref(), file.as_os_str()],
        LIMIT,
    )
}

fn assert_lines(out: &Finished, wanted: &[&str]) {
    for line in wanted {
        assert!(
            out.stdout.lines().any(|l| l.starts_with(line)),
            "no line starting with {line:?} in:\n{}\nstderr: {}",
            out.stdout,
            out.stderr
        );
    }
}

/// Whether a line of `text`, its whitespace runs collapsed, contains `row`.
fn has_row(text: &str, row: &str) -> bool {
    text.lines().any(|line| {
        line.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .contains(row)
    })
}

/// The descriptor of note `owner`/`kind` in the PT_NOTE segments of an
/// ELF64 file (a minimal parser of the test's own, so the report is checked
/// against something other than zvmm's parsing).
fn find_note(elf: &[u8], owner: &[u8], kind: u32) -> Vec<u8> {
    let word = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
    let quad = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap()) as usize;
    let (phoff, phnum) = (
        quad(0x20),
        usize::from(u16::from_le_bytes([elf[0x38], elf[0x39]])),
    );
    for phdr in (0..phnum).map(|i| phoff + i * 56) {
        if word(phdr) != PT_NOTE {
            continue;
        }
        let (mut pos, end) = (quad(phdr + 8), quad(phdr + 8) + quad(phdr + 32));
        while pos + 12 <= end {
            let (namesz, descsz) = (word(pos) as usize, word(pos + 4) as usize);
            let name = &elf[pos + 12..pos + 12 + namesz];
            let desc = pos + 12 + namesz.next_multiple_of(4);
            if name == owner && word(pos + 8) == kind {
                return elf[desc..desc + descsz].to_vec();
            }
            pos = desc + descsz.next_multiple_of(4);
        }
    }
    panic!("note {owner:?}/{kind} not in the file")
}

#[test]
fn debian_bzimage_boots_via_the_64bit_protocol() {
    let out = inspect(&debian_bzimage());
    assert_eq!(out.code(), 0, "{out:#?}");
    assert_lines(
        &out,
        &[
            "Format:           bzImage, Linux boot protocol 2.15",
            "Linux version:    6.1.",
            "xloadflags:       0x",
            "Payload:          lz4, 0x",
            "Entry points:     64-bit        0x100200",
            "RAM needed:       ",
            "Verdict:          zvmm boots this via the 64-bit Linux boot protocol",
        ],
    );
    assert!(out.stdout.contains("KERNEL_64"), "{}", out.stdout);
}

#[test]
fn extracted_vmlinux_boots_via_pvh() {
    let vmlinux = scratch_dir("kernel-inspect").join("vmlinux");
    let bzimage = debian_bzimage();
    let extract = run_zvmm(
        [
            "kernel".as_ref(),
            "extract".as_ref(),
            bzimage.as_os_str(),
            "-o".as_ref(),
            vmlinux.as_os_str(),
        ],
        LIMIT,
    );
    assert_eq!(extract.code(), 0, "{extract:#?}");
    let bytes = std::fs::read(&vmlinux).expect("cannot read the extracted vmlinux");
    let pvh = find_note(&bytes, b"Xen\0", 18);
    let pvh = u32::from_le_bytes(pvh[..4].try_into().unwrap());
    let build_id: String = find_note(&bytes, b"GNU\0", 3)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    let out = inspect(&vmlinux);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert_lines(
        &out,
        &[
            "Format:           ELF64 x86-64 with a PVH entry note",
            "Linux version:    6.1.",
            &format!("                  PVH           {pvh:#x} (32-bit"),
            "Segments:         paddr",
            "Verdict:          zvmm boots this via PVH",
        ],
    );
    for wanted in [
        format!("Xen 18 XEN_ELFNOTE_PHYS32_ENTRY {pvh:#x}"),
        format!("GNU 3 NT_GNU_BUILD_ID build-id {build_id}"),
        "Xen 6 XEN_ELFNOTE_GUEST_OS \"linux\"".to_string(),
    ] {
        assert!(
            has_row(&out.stdout, &wanted),
            "{wanted:?} not in:\n{}",
            out.stdout
        );
    }
}

#[test]
fn unbootable_or_missing_files_exit_1() {
    let gz = scratch_dir("kernel-inspect-gz").join("vmlinux.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).unwrap();
    let out = inspect(&gz);
    assert_eq!(out.code(), 1, "{out:#?}");
    assert_lines(&out, &["Format:           gzip-compressed data"]);
    assert!(
        out.stdout.contains(&format!(
            "zvmm cannot boot this: it is a gzip-compressed file, not a kernel image; \
             decompress it (`zcat {} > vmlinux`)",
            gz.display()
        )),
        "{}",
        out.stdout
    );

    let out = inspect(Path::new("/nonexistent/bzImage"));
    assert_eq!(out.code(), 1, "{out:#?}");
    assert!(
        out.stderr.contains("cannot read /nonexistent/bzImage"),
        "{}",
        out.stderr
    );
}
