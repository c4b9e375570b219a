//! zvmm's PCI root, virtio-pci transport and virtio-blk, end to end: the
//! probe guest enumerates bus 0 through ECAM and 0xCF8, drives every disk
//! with its own split-queue driver, and each fact it reports is checked
//! against the image files the test made and what they hold afterwards
//! (content and `st_blocks`). Also where zvmm puts the BARs (below 4 GiB),
//! the `--disk` option forms, the guest moving the BARs within the 32-bit
//! window and up into the 64-bit one (zvmm must follow with its
//! ioeventfds), and every rejected image:
//! one stderr line naming it, the documented status, fast, and the image
//! untouched. `probe_blk_qemu.rs` runs the same probe under QEMU.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use loader::layout;
use zvmm_tests::disk::{
    feature, has_feature, line, make_image, pattern, range_bytes, FileState, SECTOR,
};
use zvmm_tests::probe::{fnv1a64, probe_elf, test_bytes, Flavour, ProbeReport};
use zvmm_tests::zvmm::{assert_rejected, scratch_dir, spawn_zvmm, Finished, Running};

/// Hard limit for one VM run (the test kills zvmm past it).
const LIMIT: Duration = Duration::from_secs(60);
/// zvmm's own limit (`--timeout`), below [`LIMIT`].
const VM_TIMEOUT: &str = "50";
/// Exit statuses: usage error, configuration or host error.
const USAGE: i32 = 2;
const CONFIG: i32 = 1;
/// Guest RAM; the 64-bit PCI window follows from it.
const MEMORY: u64 = 256 << 20;
/// Writable disk: 64 MiB, read-only disk: 8 MiB.
const RW_SIZE: u64 = 64 << 20;
const RO_SIZE: u64 = 8 << 20;
/// PCI slots of the first and second `--disk` (slot 0: host bridge).
const RW_SLOT: u8 = 1;
const RO_SLOT: u8 = 2;
/// `probe.blk.*` ranges (sector, count). The guest hashes written and
/// read-back bytes at ~12 µs a byte here, so they stay small.
const WRITE: (u64, u64) = (2048, 16);
const DISCARD: (u64, u64) = (4096, 2048);
const ZERO: (u64, u64) = (8192, 16);
/// Features every zvmm virtio-blk must offer.
const COMMON_FEATURES: [u32; 5] = [
    feature::VERSION_1,
    feature::RING_EVENT_IDX,
    feature::INDIRECT_DESC,
    feature::BLK_SIZE,
    feature::SEG_MAX,
];
/// Features a writable disk must offer on top.
const RW_FEATURES: [u32; 3] = [feature::FLUSH, feature::DISCARD, feature::WRITE_ZEROES];

/// `probe.blk.*` options for [`WRITE`], [`DISCARD`] and [`ZERO`].
fn blk_options() -> String {
    format!(
        "probe.blk.write={}:{} probe.blk.discard={}:{} probe.blk.zero={}:{}",
        WRITE.0, WRITE.1, DISCARD.0, DISCARD.1, ZERO.0, ZERO.1
    )
}

/// zvmm arguments: the PVH probe, [`MEMORY`], `disk_args` as given, and
/// `cmdline`.
fn vm_args(disk_args: &[String], cmdline: &str) -> Vec<String> {
    let kernel = probe_elf(Flavour::Pvh).display().to_string();
    let mut args = vec!["--kernel".to_string(), kernel];
    args.extend(["--memory".into(), format!("{}M", MEMORY >> 20)]);
    args.extend(["--timeout".into(), VM_TIMEOUT.into()]);
    args.extend(disk_args.iter().cloned());
    args.extend(["--cmdline".into(), cmdline.into()]);
    args
}

/// `--disk VALUE` for each value.
fn disks(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| ["--disk".to_string(), v.clone()])
        .collect()
}

/// Boots the probe and checks that it finished and zvmm exited 0.
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

/// A writable image with a known first page and data in the ranges the
/// probe discards and zeroes, and a read-only image full of test bytes.
struct Images {
    rw: PathBuf,
    ro: PathBuf,
    head: Vec<u8>,
    ro_bytes: Vec<u8>,
}

impl Images {
    fn new(test: &str) -> Self {
        let dir = scratch_dir(&format!("blk-{test}"));
        let (rw, ro) = (dir.join("rw.img"), dir.join("ro.img"));
        let head = test_bytes(4096, 0x5eed);
        let filled = |(sector, count): (u64, u64), byte| {
            (sector * SECTOR, vec![byte; (count * SECTOR) as usize])
        };
        let data = [(0, head.clone()), filled(DISCARD, 0xaa), filled(ZERO, 0x55)];
        make_image(&rw, RW_SIZE, &data);
        let ro_bytes = test_bytes(RO_SIZE as usize, 0x0123);
        make_image(&ro, RO_SIZE, &[(0, ro_bytes.clone())]);
        Self {
            rw,
            ro,
            head,
            ro_bytes,
        }
    }

    /// `--disk` values: the writable image, then the read-only one.
    fn disk_values(&self) -> Vec<String> {
        vec![
            format!("path={},serial=probe-serial", self.rw.display()),
            format!("path={},readonly=on,serial=probe-ro", self.ro.display()),
        ]
    }
}

/// Bus 0 as zvmm builds it: both mechanisms agree, host bridge in slot 0,
/// one modern virtio-blk function per disk in the following slots (the
/// virtio-rng after them).
fn check_pci(report: &ProbeReport, disk_count: u8, context: &str) {
    let ecam_base = line(report, "pci", "ecam=", context).num("ecam");
    assert_eq!(ecam_base, Some(layout::PCI_ECAM_START), "{context}");
    assert!(report.has("pci cf8=present"), "{context}");
    assert!(report.value("pci mismatch").is_none(), "{context}");
    let bridge = line(report, "pci slot=0", "func=0 vendor=", context);
    assert_eq!(bridge.get("vendor"), Some("0x8086"), "{context}");
    assert_eq!(bridge.get("device"), Some("0x0d57"), "{context}");
    assert_eq!(bridge.get("via"), Some("ecam+cf8"), "{context}");
    for slot in 1..=disk_count {
        let f = line(
            report,
            &format!("pci slot={slot}"),
            "func=0 vendor=",
            context,
        );
        assert_eq!(f.get("vendor"), Some("0x1af4"), "slot {slot}: {context}");
        assert_eq!(f.get("device"), Some("0x1042"), "slot {slot}: {context}");
        assert_eq!(f.get("via"), Some("ecam+cf8"), "slot {slot}: {context}");
    }
    // The host bridge, the disks and the virtio-rng every VM has.
    let functions = report.value("pci functions=");
    assert_eq!(functions, Some(&*(disk_count + 2).to_string()), "{context}");
    let devices = report.value("blk devices=");
    assert_eq!(devices, Some(&*disk_count.to_string()), "{context}");
}

/// The virtio-pci side of one disk: features, MSI-X, queue, status.
fn check_transport(report: &ProbeReport, slot: u8, readonly: bool, context: &str) {
    let virtio = format!("virtio slot={slot}");
    let features = line(report, &virtio, "features ", context);
    let offered = features.num("offered");
    let mut wanted = COMMON_FEATURES.to_vec();
    if readonly {
        wanted.push(feature::RO);
    } else {
        wanted.extend(RW_FEATURES);
    }
    for bit in wanted {
        assert!(
            has_feature(offered, bit),
            "slot {slot}: feature bit {bit} not offered: {context}"
        );
    }
    assert_eq!(
        has_feature(offered, feature::RO),
        readonly,
        "slot {slot}: RO: {context}"
    );
    assert_eq!(features.get("status"), Some("0x0b"), "{context}");
    let msix = line(report, &virtio, "msix ", context);
    assert_eq!(msix.num("entries"), Some(2), "slot {slot}: {context}");
    assert_eq!(msix.get("config_vector"), Some("0"), "{context}");
    let queue = line(report, &virtio, "queue=0 ", context);
    assert_eq!(queue.get("vector"), Some("1"), "slot {slot}: {context}");
    assert!(
        report.has(&format!("{virtio} driver_ok status=0x0f")),
        "{context}"
    );
    let blk = line(report, &format!("blk slot={slot}"), "capacity=", context);
    let ro = if readonly { "1" } else { "0" };
    assert_eq!(blk.get("ro"), Some(ro), "slot {slot}: {context}");
    assert_eq!(blk.num("blk_size"), Some(SECTOR), "{context}");
    assert_eq!(blk.get("indirect"), Some("1"), "slot {slot}: {context}");
    assert_eq!(blk.get("event_idx"), Some("1"), "slot {slot}: {context}");
    let stem = format!("blk slot={slot}");
    let stats = line(report, &stem, "requests=", context);
    assert!(stats.num("indirect") > Some(0), "slot {slot}: {context}");
    assert!(stats.num("notifies") > Some(0), "slot {slot}: {context}");
    assert_eq!(report.value(&format!("{stem} reset=")), Some("ok"));
    assert!(
        report.value(&format!("{stem} broken")).is_none(),
        "{context}"
    );
}

/// Capacity, ID, first page and out-of-range read of the disk in `slot`.
fn check_reads(report: &ProbeReport, slot: u8, size: u64, id: &str, head: &[u8], context: &str) {
    let stem = format!("blk slot={slot}");
    let capacity = line(report, &stem, "capacity=", context).num("capacity");
    assert_eq!(capacity, Some(size / SECTOR), "slot {slot}: {context}");
    let got_id = line(report, &stem, "id=", context);
    assert_eq!(got_id.get("id"), Some(id), "slot {slot}: {context}");
    let read = line(report, &stem, "read sector=0 ", context);
    assert_eq!(read.get("status"), Some("ok"), "slot {slot}: {context}");
    assert_eq!(read.num("len"), Some(4096), "{context}");
    assert_eq!(
        read.num("fnv1a64"),
        Some(fnv1a64(&head[..4096])),
        "{context}"
    );
    let oor = line(report, &stem, "read_out_of_range ", context);
    assert_eq!(oor.num("sector"), capacity, "{context}");
    assert_eq!(oor.get("status"), Some("ioerr"), "slot {slot}: {context}");
}

/// The probe's write, discard, write-zeroes and flush on a writable disk.
fn check_rw_requests(report: &ProbeReport, slot: u8, context: &str) {
    let stem = format!("blk slot={slot}");
    let write = line(report, &stem, "write ", context);
    assert_eq!(write.get("status"), Some("ok"), "{context}");
    assert_eq!(write.get("readback"), Some("ok"), "{context}");
    let written = fnv1a64(&pattern(WRITE.0, WRITE.1));
    assert_eq!(write.num("fnv1a64"), Some(written), "{context}");
    let discard = line(report, &stem, "discard ", context);
    assert_eq!(discard.get("status"), Some("ok"), "{context}");
    let zero = line(report, &stem, "write_zeroes ", context);
    assert_eq!(zero.get("status"), Some("ok"), "{context}");
    assert_eq!(zero.get("readback"), Some("zero"), "{context}");
    let flush = line(report, &stem, "flush ", context);
    assert_eq!(flush.get("status"), Some("ok"), "{context}");
}

/// What the guest's requests left in the writable image.
fn check_rw_image(images: &Images, blocks_before: u64) {
    let image = std::fs::read(&images.rw).unwrap();
    assert_eq!(image.len() as u64, RW_SIZE, "image size changed");
    assert!(image[..4096] == images.head[..], "sectors 0..8 changed");
    assert!(
        range_bytes(&image, WRITE) == pattern(WRITE.0, WRITE.1),
        "the probe's pattern is not in the image"
    );
    let zeroed = |range| range_bytes(&image, range).iter().all(|&b| b == 0);
    assert!(zeroed(DISCARD), "discarded range does not read zero");
    assert!(zeroed(ZERO), "write-zeroes range does not read zero");
    let blocks_after = std::fs::metadata(&images.rw).unwrap().blocks();
    assert!(
        blocks_after + DISCARD.1 / 2 <= blocks_before,
        "discard freed nothing: st_blocks {blocks_before} -> {blocks_after}"
    );
}

/// A read-only disk refuses the write and offers only what it can do.
fn check_ro_requests(report: &ProbeReport, slot: u8, context: &str) {
    let stem = format!("blk slot={slot}");
    let write = line(report, &stem, "write ", context);
    assert_eq!(write.get("status"), Some("ioerr"), "{context}");
    assert_eq!(write.get("ro"), Some("1"), "{context}");
    let offered = line(report, &format!("virtio slot={slot}"), "features ", context).num("offered");
    for (name, bit, refused) in [
        ("discard ", feature::DISCARD, "ioerr"),
        ("write_zeroes ", feature::WRITE_ZEROES, "ioerr"),
        ("flush ", feature::FLUSH, "ok"),
    ] {
        let f = line(report, &stem, name, context);
        if has_feature(offered, bit) {
            assert_eq!(f.get("status"), Some(refused), "{name}: {context}");
        } else {
            assert_eq!(f.get("skipped"), Some("no_feature"), "{name}: {context}");
        }
    }
}

/// Two disks as in the QEMU q35 test: every reported fact against the
/// images, and the images afterwards.
#[test]
fn two_disks_read_write_and_read_only() {
    let images = Images::new("two");
    let rw_before = FileState::of(&images.rw).unwrap();
    let ro_before = FileState::of(&images.ro).unwrap();
    let cmdline = format!("console=ttyS0 {}", blk_options());
    let args = vm_args(&disks(&images.disk_values()), &cmdline);
    let (_run, report, context) = run_vm(&args);
    let context = context.as_str();

    check_pci(&report, 2, context);
    check_bars_below_4g(&report, 2, context);

    check_transport(&report, RW_SLOT, false, context);
    check_reads(
        &report,
        RW_SLOT,
        RW_SIZE,
        "probe-serial",
        &images.head,
        context,
    );
    check_rw_requests(&report, RW_SLOT, context);
    check_rw_image(&images, rw_before.blocks);

    check_transport(&report, RO_SLOT, true, context);
    let ro_head = &images.ro_bytes[..4096];
    check_reads(&report, RO_SLOT, RO_SIZE, "probe-ro", ro_head, context);
    check_ro_requests(&report, RO_SLOT, context);
    assert!(
        std::fs::read(&images.ro).unwrap() == images.ro_bytes,
        "read-only image changed"
    );
    assert_eq!(
        FileState::of(&images.ro),
        Some(ro_before),
        "read-only image touched"
    );
}

/// zvmm assigns every BAR itself, below 4 GiB (firmware that maps only the
/// first 4 GiB and assigns nothing must reach them): the 64-bit BAR 0 of
/// each function in the 32-bit window, slot 1 first, without overlaps.
fn check_bars_below_4g(report: &ProbeReport, disk_count: u8, context: &str) {
    let window = layout::PCI_MMIO32_START..layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE;
    let mut placed = Vec::new();
    for slot in 1..=disk_count {
        let stem = format!("pci slot={slot}");
        let bar = line(report, &stem, "func=0 bar0=", context);
        let (at, size) = (bar.num("bar0").unwrap_or(0), bar.num("size").unwrap_or(0));
        assert_eq!(bar.get("type"), Some("mem64"), "slot {slot}: {context}");
        assert_eq!(bar.get("assigned"), Some("firmware"), "{context}");
        assert!(
            window.contains(&at) && at + size <= window.end,
            "slot {slot}: bar0 {at:#x} outside the 32-bit window: {context}"
        );
        assert_eq!(at % size.max(1), 0, "slot {slot}: unaligned: {context}");
        placed.push((at, at + size));
    }
    assert_eq!(placed.first().map(|r| r.0), Some(window.start), "{context}");
    placed.sort_unstable();
    for pair in placed.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "overlapping bars: {context}");
    }
}

/// The probe moves both 64-bit BARs to `moved` and up: config reads,
/// MSI-X and queue kicks (ioeventfds re-registered) must follow them, and
/// the BARs stay below `window_end`.
fn check_bar_move(test: &str, moved: u64, window_end: u64) {
    let images = Images::new(test);
    let cmdline = format!("console=ttyS0 probe.pci.mem64={moved:#x} {}", blk_options());
    let args = vm_args(&disks(&images.disk_values()), &cmdline);
    let (_run, report, context) = run_vm(&args);
    let context = context.as_str();

    check_pci(&report, 2, context);
    for slot in [RW_SLOT, RO_SLOT] {
        let bar = line(
            &report,
            &format!("pci slot={slot}"),
            "func=0 bar0=",
            context,
        );
        let at = bar.num("bar0").unwrap_or(0);
        assert!((moved..window_end).contains(&at), "slot {slot}: {context}");
        assert_eq!(bar.get("assigned"), Some("probe"), "slot {slot}: {context}");
        let virtio = line(&report, &format!("virtio slot={slot}"), "common=", context);
        let common = virtio.get("common").and_then(|c| c.split('@').nth(1));
        let common = common.and_then(zvmm_tests::probe::parse_num);
        assert!(
            common >= Some(moved),
            "slot {slot}: common cfg not moved: {context}"
        );
        check_transport(&report, slot, slot == RO_SLOT, context);
    }
    check_reads(
        &report,
        RW_SLOT,
        RW_SIZE,
        "probe-serial",
        &images.head,
        context,
    );
    check_rw_requests(&report, RW_SLOT, context);
    let ro_head = &images.ro_bytes[..4096];
    check_reads(&report, RO_SLOT, RO_SIZE, "probe-ro", ro_head, context);
    check_ro_requests(&report, RO_SLOT, context);
    let image = std::fs::read(&images.rw).unwrap();
    assert!(range_bytes(&image, WRITE) == pattern(WRITE.0, WRITE.1));
}

/// The guest moves both BARs elsewhere in the 32-bit window, where zvmm
/// put them.
#[test]
fn bars_moved_inside_the_32bit_window() {
    let moved = layout::PCI_MMIO32_START + 0x1000_0000;
    let window_end = layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE;
    check_bar_move("bar-move-low", moved, window_end);
}

/// The guest moves both 64-bit BARs up into the 64-bit window (as an OS
/// that re-assigns may), which zvmm decodes too.
#[test]
fn bars_moved_up_into_the_64bit_window() {
    let moved = layout::pci_mmio64_start(MEMORY) + 0x10_0000;
    let window_end = layout::pci_mmio64_start(MEMORY) + layout::PCI_MMIO64_SIZE;
    check_bar_move("bar-move-high", moved, window_end);
}

/// `--disk a b` (several values after one flag), a bare path, `id=` (a
/// name only: the guest sees the serial, or one derived from the image)
/// and a serial of the full 20 bytes.
#[test]
fn disk_option_forms_ids_and_serials() {
    let dir = scratch_dir("blk-forms");
    let sizes = [4u64 << 20, 6 << 20, 8 << 20];
    let paths: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("d{i}.img"))).collect();
    for (path, size) in paths.iter().zip(sizes) {
        make_image(path, size, &[]);
    }
    let long_serial = "serial-of-20-bytes-x";
    assert_eq!(long_serial.len(), 20);
    let mut args = vec![
        "--disk".to_string(),
        format!("path={},id=system", paths[0].display()),
        paths[1].display().to_string(),
    ];
    args.extend(disks(&[format!(
        "path={},readonly=on,serial={long_serial},id=data",
        paths[2].display()
    )]));
    let (_run, report, context) = run_vm(&vm_args(&args, "console=ttyS0"));
    let context = context.as_str();
    check_pci(&report, 3, context);
    let zero_head = [0u8; 4096];
    for (slot, path) in (1..).zip(&paths[..2]) {
        let derived = derived_serial(path);
        check_reads(
            &report,
            slot,
            sizes[usize::from(slot) - 1],
            &derived,
            &zero_head,
            context,
        );
        check_transport(&report, slot, false, context);
    }
    let id1 = line(&report, "blk slot=1", "id=", context);
    let id2 = line(&report, "blk slot=2", "id=", context);
    assert_ne!(id1.get("id"), id2.get("id"), "two images, one serial");
    check_reads(&report, 3, sizes[2], long_serial, &zero_head, context);
    check_transport(&report, 3, true, context);
}

/// The serial zvmm derives when none is given: 20 hex digits ending in the
/// image's inode number (so it is stable across boots).
fn derived_serial(path: &Path) -> String {
    let meta = std::fs::metadata(path).unwrap();
    format!(
        "{:08x}{:012x}",
        meta.dev() & 0xffff_ffff,
        meta.ino() & 0xffff_ffff_ffff
    )
}

// ---- rejected input -------------------------------------------------------

/// A command line that would write to the first disk if the VM ever ran.
fn writing_cmdline() -> String {
    "console=ttyS0 probe.blk.write=0:8 probe.blk.zero=8:8".to_string()
}

/// Runs zvmm with `args` and checks the rejection: status `code`, fast, no
/// guest output, one `zvmm: ` line on stderr containing all `needles`.
/// Returns the run and zvmm's pid.
fn check_rejected(args: &[String], code: i32, needles: &[&str]) -> (Finished, u32) {
    let running = spawn_zvmm(args);
    let pid = running.pid();
    let run = running.finish(LIMIT);
    assert_rejected(&run, code, needles);
    (run, pid)
}

/// Rejects `path` as the only disk (exit 1, message naming it) and checks
/// the path is exactly as before.
fn check_bad_image(path: &Path, needles: &[&str]) {
    let before = FileState::of(path);
    let shown = path.display().to_string();
    let mut all = vec![shown.as_str()];
    all.extend_from_slice(needles);
    let args = vm_args(&disks(&[format!("path={shown}")]), &writing_cmdline());
    check_rejected(&args, CONFIG, &all);
    assert_eq!(FileState::of(path), before, "{shown} changed");
}

#[test]
fn missing_image_is_refused_and_not_created() {
    let path = scratch_dir("blk-missing").join("no-such.img");
    check_bad_image(&path, &["does not exist"]);
    assert!(!path.exists(), "zvmm created {}", path.display());
}

#[test]
fn directory_image_is_refused() {
    check_bad_image(&scratch_dir("blk-dir"), &["directory"]);
}

#[test]
fn zero_length_image_is_refused() {
    let path = scratch_dir("blk-empty").join("empty.img");
    std::fs::write(&path, b"").unwrap();
    check_bad_image(&path, &["empty"]);
}

#[test]
fn image_not_a_multiple_of_512_is_refused() {
    let path = scratch_dir("blk-unaligned").join("odd.img");
    std::fs::write(&path, test_bytes(1000, 9)).unwrap();
    check_bad_image(&path, &["512"]);
}

/// A VM holding `image` writable, halted after the probe's report.
fn holder_vm(image: &Path) -> Running {
    let value = format!("path={}", image.display());
    let args = vm_args(&disks(&[value]), "console=ttyS0 probe.action=hang");
    let holder = spawn_zvmm(&args);
    let up = holder.stdout.wait_for("probe: action name=hang", LIMIT);
    assert!(up, "holder VM did not come up: {}", holder.stdout.text());
    holder
}

/// A second VM (writable or read-only) must be refused with the holder's
/// pid while the first runs.
#[test]
fn image_locked_by_another_vm_is_refused() {
    let path = scratch_dir("blk-locked").join("shared.img");
    make_image(&path, 1 << 20, &[(0, test_bytes(4096, 3))]);
    let before = FileState::of(&path);
    let holder = holder_vm(&path);
    let pid = format!("pid {}", holder.pid());
    let shown = path.display().to_string();
    for value in [format!("path={shown}"), format!("path={shown},readonly=on")] {
        let args = vm_args(&disks(&[value]), &writing_cmdline());
        check_rejected(&args, CONFIG, &[&shown, &pid]);
    }
    holder.signal(libc::SIGTERM);
    let ended = holder.finish(LIMIT);
    assert!(ended.status.is_some(), "holder did not stop: {ended:#?}");
    assert_eq!(FileState::of(&path), before, "locked image changed");
}

/// One image given twice to one VM (also spelled differently): refused by
/// name, without blaming this very VM as another holder.
#[test]
fn same_image_twice_in_one_vm_is_refused() {
    let dir = scratch_dir("blk-twice");
    let path = dir.join("twice.img");
    make_image(&path, 1 << 20, &[(0, test_bytes(4096, 4))]);
    let before = FileState::of(&path);
    let other_spelling = dir.join(".").join("twice.img");
    let shown = path.display().to_string();
    let second_forms = [
        format!("path={shown}"),
        format!("path={}", other_spelling.display()),
        format!("path={shown},readonly=on"),
    ];
    for second in second_forms {
        let values = [format!("path={shown}"), second];
        let args = vm_args(&disks(&values), &writing_cmdline());
        let (run, pid) = check_rejected(&args, CONFIG, &["twice.img"]);
        assert!(
            !run.stderr.contains(&format!("pid {pid}")),
            "zvmm blames itself (pid {pid}) as the image's other user: {}",
            run.stderr
        );
    }
    assert_eq!(FileState::of(&path), before, "image changed");
}

/// `chattr +i` on `path` until dropped (even when the test fails).
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Self {
        chattr("+i", path);
        Self(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, path: &Path) {
    let status = Command::new("chattr")
        .arg(flag)
        .arg(path)
        .status()
        .unwrap_or_else(|e| panic!("cannot run chattr ({e}): install e2fsprogs"));
    assert!(status.success(), "chattr {flag} {} failed", path.display());
}

/// A file nobody may write (even root: immutable) given without
/// `readonly=on`: refused with the hint, nothing written.
#[test]
fn read_only_file_opened_writable_is_refused() {
    let path = scratch_dir("blk-immutable").join("immutable.img");
    make_image(&path, 1 << 20, &[(0, test_bytes(4096, 5))]);
    let _guard = Immutable::set(&path);
    let writable = std::fs::OpenOptions::new().write(true).open(&path);
    assert!(writable.is_err(), "chattr +i did not stop writes");
    check_bad_image(&path, &["readonly=on"]);
}

#[test]
fn disk_without_path_is_a_usage_error() {
    for value in ["path=", "readonly=on", "serial=x,id=y"] {
        let args = vm_args(&disks(&[value.to_string()]), &writing_cmdline());
        check_rejected(&args, USAGE, &["--disk", "path"]);
    }
}

#[test]
fn duplicate_id_and_long_serial_are_usage_errors() {
    let dir = scratch_dir("blk-options");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    make_image(&a, 1 << 20, &[]);
    make_image(&b, 1 << 20, &[]);
    let values = [
        format!("path={},id=same", a.display()),
        format!("path={},id=same", b.display()),
    ];
    let args = vm_args(&disks(&values), &writing_cmdline());
    check_rejected(&args, USAGE, &["--disk", "same"]);
    let serial = "serial-of-21-bytes-xy";
    let values = [format!("path={},serial={serial}", a.display())];
    let args = vm_args(&disks(&values), &writing_cmdline());
    check_rejected(&args, USAGE, &["--disk", serial, "20"]);
}
