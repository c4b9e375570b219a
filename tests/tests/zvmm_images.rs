//! Disk images as users have them, end to end: every format zvmm cannot
//! serve (made by qemu-img) refused with one line naming the file, the
//! format and the `qemu-img convert` command, the image untouched; an ISO
//! served only read-only; `image_type=` forcing and its refusals; the probe
//! guest reading and writing a qcow2 overlay while another VM runs on a
//! second overlay of the same base (checked on the host with `qemu-img
//! check` and `qemu-img compare`); and the sector-0 guard: a guest cannot
//! make a detected raw disk read as qcow2, unless `image_type=raw` says
//! the disk is raw.

use std::path::{Path, PathBuf};
use std::time::Duration;

use zvmm_tests::disk::{line, make_image, pattern, FileState, SECTOR};
use zvmm_tests::images::{
    assert_check_clean, assert_identical, create, make_iso, overlay, raw_to_qcow2,
};
use zvmm_tests::probe::{fnv1a64, probe_elf, test_bytes, Flavour, ProbeReport};
use zvmm_tests::zvmm::{assert_rejected, scratch_dir, spawn_zvmm, Finished, Running};

/// Hard limit for one VM run (the test kills zvmm past it).
const LIMIT: Duration = Duration::from_secs(60);
/// Exit statuses: configuration or host error, usage error.
const CONFIG: i32 = 1;
const USAGE: i32 = 2;
/// Virtual size of the test disks.
const SIZE: u64 = 16 << 20;
/// `probe.blk.*` ranges (sector, count), as in `zvmm_blk.rs`.
const WRITE: (u64, u64) = (2048, 16);
const DISCARD: (u64, u64) = (4096, 2048);
const ZERO: (u64, u64) = (8192, 16);
/// The qcow2 magic and version 3, as `probe.blk.put` hex.
const QCOW2_MAGIC_HEX: &str = "514649fb00000003";

/// zvmm arguments: the PVH probe, `disk_values` (one `--disk` each) and
/// `cmdline`.
fn vm_args(disk_values: &[String], cmdline: &str) -> Vec<String> {
    let kernel = probe_elf(Flavour::Pvh).display().to_string();
    let mut args = vec!["--kernel".to_string(), kernel];
    args.extend([
        "--memory".into(),
        "256M".into(),
        "--timeout".into(),
        "50".into(),
    ]);
    for value in disk_values {
        args.extend(["--disk".to_string(), value.clone()]);
    }
    args.extend(["--cmdline".into(), cmdline.into()]);
    args
}

/// Boots the probe; it must finish and zvmm exit 0.
fn run_vm(args: &[String]) -> (Finished, ProbeReport, String) {
    let run = spawn_zvmm(args).finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("zvmm {args:?}: {run:#?}");
    assert!(run.status.is_some(), "killed after {LIMIT:?}: {context}");
    assert_eq!(report.panic_message(), None, "{context}");
    assert!(report.finished(), "no 'probe: done': {context}");
    assert_eq!(run.code(), 0, "{context}");
    (run, report, context)
}

/// zvmm with `disk_value` as the only disk must refuse it with status
/// `code` and exactly the line `zvmm: {message}`, leaving the file as it
/// was.
fn check_refused(disk_value: &str, image: &Path, code: i32, message: &str) {
    let before = FileState::of(image);
    let cmdline = "console=ttyS0 probe.blk.write=0:8";
    let run = spawn_zvmm(vm_args(&[disk_value.to_string()], cmdline)).finish(LIMIT);
    assert_rejected(&run, code, &[message]);
    assert_eq!(
        run.stderr.trim_end(),
        format!("zvmm: {message}"),
        "{run:#?}"
    );
    assert_eq!(FileState::of(image), before, "{} changed", image.display());
}

/// The message for a format zvmm cannot serve.
fn unservable(path: &Path, what: &str, qemu_format: &str) -> String {
    let shown = path.display();
    let raw = path.with_extension("raw");
    format!(
        "disk image {shown} is {what}, which zvmm cannot serve; convert it to raw with \
         `qemu-img convert -f {qemu_format} -O raw {shown} {}` and attach that",
        raw.display()
    )
}

#[test]
fn foreign_formats_are_refused_with_the_command_that_converts_them() {
    let dir = scratch_dir("images-foreign");
    let cases: [(&str, &str, &[&str], &str); 6] = [
        ("disk.vmdk", "vmdk", &[], "a VMDK image (sparse extent)"),
        (
            "desc.vmdk",
            "vmdk",
            &["-o", "subformat=monolithicFlat"],
            "a VMDK descriptor file",
        ),
        (
            "fixed.vhd",
            "vpc",
            &["-o", "subformat=fixed"],
            "a VHD image (fixed)",
        ),
        (
            "dynamic.vhd",
            "vpc",
            &["-o", "subformat=dynamic"],
            "a VHD image (dynamic)",
        ),
        ("disk.vhdx", "vhdx", &[], "a VHDX image"),
        ("disk.vdi", "vdi", &[], "a VDI image"),
    ];
    for (name, format, options, what) in cases {
        let path = dir.join(name);
        create(&path, format, options, Some("16M"));
        let message = unservable(&path, what, format);
        let shown = path.display();
        check_refused(&format!("path={shown}"), &path, CONFIG, &message);
        check_refused(
            &format!("path={shown},readonly=on"),
            &path,
            CONFIG,
            &message,
        );
    }
}

#[test]
fn an_iso_is_served_read_only_and_refused_writable() {
    let path = scratch_dir("images-iso").join("cd.iso");
    make_iso(&path, 4 << 20);
    let shown = path.display();
    let message = format!(
        "disk image {shown} is an ISO 9660 CD/DVD image, read-only media the guest must not \
         alter; attach it with readonly=on (image_type=raw serves it writable)"
    );
    check_refused(&format!("path={shown}"), &path, CONFIG, &message);
    let before = FileState::of(&path);
    let args = vm_args(&[format!("path={shown},readonly=on")], "console=ttyS0");
    let (_run, report, context) = run_vm(&args);
    let blk = line(&report, "blk slot=1", "capacity=", &context);
    assert_eq!(blk.num("capacity"), Some((4 << 20) / SECTOR), "{context}");
    assert_eq!(blk.get("ro"), Some("1"), "{context}");
    let read = line(&report, "blk slot=1", "read sector=0 ", &context);
    assert_eq!(read.num("fnv1a64"), Some(fnv1a64(&[0; 4096])), "{context}");
    assert_eq!(FileState::of(&path), before, "the ISO changed");
}

#[test]
fn image_types_and_compressed_files_are_checked() {
    let dir = scratch_dir("images-types");
    let qcow2 = dir.join("a.qcow2");
    create(&qcow2, "qcow2", &[], Some("16M"));
    let shown = qcow2.display();
    check_refused(
        &format!("path={shown},image_type=raw"),
        &qcow2,
        CONFIG,
        &format!(
            "disk image {shown} is a qcow2 image but image_type=raw was given: refused unless \
             readonly=on, because a guest writing it as raw data could rewrite the header and \
             name any host file as its backing file; drop image_type=raw to serve it as qcow2"
        ),
    );
    let top = dir.join("top.qcow2");
    overlay("a.qcow2", &top);
    let top_shown = top.display();
    check_refused(
        &format!("path={top_shown},backing_files=off"),
        &top,
        CONFIG,
        &format!(
            "disk image {top_shown} is a qcow2 image with the backing file 'a.qcow2', and \
             backing_files=off; set backing_files=on to follow it (read-only, shared)"
        ),
    );
    let raw = dir.join("plain.img");
    make_image(&raw, SIZE, &[]);
    let raw_shown = raw.display();
    check_refused(
        &format!("path={raw_shown},image_type=qcow2"),
        &raw,
        CONFIG,
        &format!(
            "disk image {raw_shown} is a raw image, not qcow2, but image_type=qcow2 was given; \
             drop image_type=qcow2 to serve it as raw"
        ),
    );
    let run = spawn_zvmm(vm_args(&[format!("path={raw_shown},image_type=vhdx")], "")).finish(LIMIT);
    assert_rejected(
        &run,
        USAGE,
        &["image_type", "vhdx", "expected raw or qcow2"],
    );
    let xz = dir.join("cloud.img.xz");
    std::fs::write(&xz, b"\xfd7zXZ\0\0\x04\xe6\xd6\xb4\x46").unwrap();
    let xz_shown = xz.display();
    check_refused(
        &format!("path={xz_shown},readonly=on"),
        &xz,
        CONFIG,
        &format!(
            "disk image {xz_shown} is an xz-compressed file, not a disk image; decompress it \
             first (`xz -dk {xz_shown}`) and attach the result"
        ),
    );
}

/// A raw image holding a known first page and data where the probe
/// discards and zeroes, converted to a qcow2 base: (base.raw, base.qcow2).
fn make_base(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let (raw, qcow2) = (dir.join("base.raw"), dir.join("base.qcow2"));
    let head = test_bytes(4096, 0x5eed);
    let filled = |(sector, count): (u64, u64), byte| {
        (sector * SECTOR, vec![byte; (count * SECTOR) as usize])
    };
    let data = [(0, head.clone()), filled(DISCARD, 0xaa), filled(ZERO, 0x55)];
    make_image(&raw, SIZE, &data);
    raw_to_qcow2(&raw, &qcow2);
    (raw, qcow2, head)
}

/// What the probe's write, discard and write-zeroes leave on the disk
/// when it started as `base`.
fn expected_after_probe(base: &Path, into: &Path) {
    let mut bytes = std::fs::read(base).unwrap();
    let at = |(sector, count): (u64, u64)| {
        (sector * SECTOR) as usize..((sector + count) * SECTOR) as usize
    };
    bytes[at(WRITE)].copy_from_slice(&pattern(WRITE.0, WRITE.1));
    bytes[at(DISCARD)].fill(0);
    bytes[at(ZERO)].fill(0);
    std::fs::write(into, bytes).unwrap();
}

/// A VM holding `disk_value`, halted after the probe's report.
fn holder_vm(disk_value: String) -> Running {
    let args = vm_args(&[disk_value], "console=ttyS0 probe.action=hang");
    let holder = spawn_zvmm(&args);
    let up = holder.stdout.wait_for("probe: action name=hang", LIMIT);
    assert!(up, "holder VM did not come up: {}", holder.stdout.text());
    holder
}

#[test]
fn the_probe_reads_and_writes_a_qcow2_overlay_of_a_shared_base() {
    let dir = scratch_dir("images-qcow2");
    let (base_raw, base, head) = make_base(&dir);
    let (mine, other) = (dir.join("vm1.qcow2"), dir.join("vm2.qcow2"));
    overlay("base.qcow2", &mine);
    overlay("base.qcow2", &other);
    let base_before = FileState::of(&base);
    // Another VM runs on its own overlay of the same base meanwhile.
    let holder = holder_vm(format!("path={}", other.display()));
    let base_shown = base.display().to_string();
    let pid = format!("pid {}", holder.pid());
    let run = spawn_zvmm(vm_args(&[format!("path={base_shown}")], "console=ttyS0")).finish(LIMIT);
    assert_rejected(&run, CONFIG, &[&base_shown, "in use by", &pid]);

    let options = format!(
        "console=ttyS0 probe.blk.write={}:{} probe.blk.discard={}:{} probe.blk.zero={}:{}",
        WRITE.0, WRITE.1, DISCARD.0, DISCARD.1, ZERO.0, ZERO.1
    );
    let args = vm_args(
        &[format!("path={},serial=overlay", mine.display())],
        &options,
    );
    let (_run, report, context) = run_vm(&args);
    let context = context.as_str();
    let stem = "blk slot=1";
    let blk = line(&report, stem, "capacity=", context);
    assert_eq!(blk.num("capacity"), Some(SIZE / SECTOR), "{context}");
    assert_eq!(blk.get("ro"), Some("0"), "{context}");
    let read = line(&report, stem, "read sector=0 ", context);
    assert_eq!(
        read.num("fnv1a64"),
        Some(fnv1a64(&head)),
        "base not read: {context}"
    );
    let write = line(&report, stem, "write ", context);
    assert_eq!(
        (write.get("status"), write.get("readback")),
        (Some("ok"), Some("ok"))
    );
    let discard = line(&report, stem, "discard ", context);
    assert_eq!(discard.get("status"), Some("ok"), "{context}");
    let zero = line(&report, stem, "write_zeroes ", context);
    assert_eq!(
        (zero.get("status"), zero.get("readback")),
        (Some("ok"), Some("zero"))
    );
    assert_eq!(
        line(&report, stem, "flush ", context).get("status"),
        Some("ok")
    );

    holder.signal(libc::SIGTERM);
    let ended = holder.finish(LIMIT);
    assert!(ended.status.is_some(), "holder did not stop: {ended:#?}");
    let expected = dir.join("expected.raw");
    expected_after_probe(&base_raw, &expected);
    assert_check_clean(&mine);
    assert_identical(&mine, &expected);
    assert_eq!(FileState::of(&base), base_before, "the base changed");
    assert_identical(&base, &base_raw);
    assert_identical(&other, &base_raw);
}

#[test]
fn a_guest_cannot_make_a_detected_raw_disk_look_like_qcow2() {
    let path = scratch_dir("images-sector0").join("raw.img");
    let head = test_bytes(4096, 0xb007);
    make_image(&path, SIZE, &[(0, head.clone())]);
    let before = FileState::of(&path);
    let shown = path.display().to_string();
    let put = format!("console=ttyS0 probe.blk.put=0:{QCOW2_MAGIC_HEX}");

    let (run, report, context) = run_vm(&vm_args(&[format!("path={shown}")], &put));
    let put_line = line(&report, "blk slot=1", "put ", &context);
    assert_eq!(put_line.get("status"), Some("ioerr"), "{context}");
    let refusal = format!(
        "zvmm: disk {shown}: refused a guest write that would make sector 0 look like a qcow2 \
         image (the raw format was detected, not given; image_type=raw allows such writes)"
    );
    let refusals = run
        .stderr
        .lines()
        .filter(|l| l.contains("refused a guest write"));
    assert_eq!(
        refusals.collect::<Vec<_>>(),
        [refusal.as_str()],
        "{context}"
    );
    assert_eq!(FileState::of(&path), before, "the image changed");

    // Given image_type=raw, the guest's disk is raw data, whatever it holds.
    let forced = format!("path={shown},image_type=raw");
    let (run, report, context) = run_vm(&vm_args(&[forced], &put));
    let put_line = line(&report, "blk slot=1", "put ", &context);
    assert_eq!(put_line.get("status"), Some("ok"), "{context}");
    assert_eq!(put_line.get("readback"), Some("ok"), "{context}");
    assert!(!run.stderr.contains("refused a guest write"), "{context}");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"QFI\xfb\0\0\0\x03");
    assert_eq!(&bytes[512..4096], &head[512..]);

    // Detected again, the file is now a (broken) qcow2 and never raw.
    let run = spawn_zvmm(vm_args(&[format!("path={shown}")], "console=ttyS0")).finish(LIMIT);
    assert_rejected(
        &run,
        CONFIG,
        &[&format!("cannot open qcow2 image {shown}"), "cluster size"],
    );
}

#[test]
fn a_base_given_writable_next_to_its_overlay_is_refused() {
    let dir = scratch_dir("images-base-twice");
    let base = dir.join("base.qcow2");
    create(&base, "qcow2", &[], Some("16M"));
    let top = dir.join("top.qcow2");
    overlay("base.qcow2", &top);
    let (base_before, top_before) = (FileState::of(&base), FileState::of(&top));
    let values = [
        format!("path={}", base.display()),
        format!("path={}", top.display()),
    ];
    let run = spawn_zvmm(vm_args(&values, "console=ttyS0")).finish(LIMIT);
    let shown = base.display().to_string();
    assert_rejected(
        &run,
        CONFIG,
        &[
            &shown,
            "open for writing by this zvmm (pid",
            "a backing file of one",
        ],
    );
    assert_eq!(FileState::of(&base), base_before, "the base changed");
    assert_eq!(FileState::of(&top), top_before, "the overlay changed");
}
