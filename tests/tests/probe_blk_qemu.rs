//! Runs the PVH probe's PCI and virtio-blk drivers under QEMU (the reference
//! VMM, KVM only) and checks every fact against the disk images the test
//! made: q35 with a writable and a read-only `virtio-blk-pci` (modern only),
//! and microvm, whose PCIe has neither MCFG nor 0xCF8, so the probe must
//! find no bus and still finish. This proves the probe's drivers, so the
//! same report under zvmm judges zvmm's PCI and virtio-blk.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zvmm_tests::disk::{line, make_image, pattern, range_bytes, SECTOR};
use zvmm_tests::probe::{fnv1a64, probe_elf, test_bytes, Fields, Flavour, ProbeReport};
use zvmm_tests::qemu::{self, QemuRun};

/// Hard limit for one QEMU run (q35's SeaBIOS alone takes ~10 s here).
const LIMIT: Duration = Duration::from_secs(60);
/// Writable disk: 64 MiB, read-only disk: 8 MiB.
const RW_SIZE: u64 = 64 << 20;
const RO_SIZE: u64 = 8 << 20;
/// PCI slots the test pins the disks to.
const RW_SLOT: u8 = 3;
const RO_SLOT: u8 = 4;
/// Where the probe moves 64-bit BARs (above the 4 GiB identity map, where
/// zvmm's 64-bit window starts).
const MEM64_BASE: u64 = 0x40_0000_0000;
/// `probe.blk.*` ranges (sector, count).
const WRITE: (u64, u64) = (2048, 200);
const DISCARD: (u64, u64) = (4096, 2048);
const ZERO: (u64, u64) = (8192, 64);

fn scratch_dir(test: &str) -> PathBuf {
    let name = format!("zvmm-probe-blk-{}-{test}", std::process::id());
    let dir = std::env::temp_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn drive_args(path: &Path, id: &str, extra: &str, slot: u8, serial: &str) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("file={},if=none,id={id},format=raw{extra}", path.display()),
        "-device".into(),
        format!("virtio-blk-pci,drive={id},disable-legacy=on,serial={serial},addr={slot:#x}"),
    ]
}

fn run_qemu(machine: &str, cmdline: &str, extra: &[String]) -> (QemuRun, ProbeReport, String) {
    let kernel = probe_elf(Flavour::Pvh);
    let mut args = qemu::boot_args(machine, &kernel, None, cmdline);
    args.extend(extra.iter().map(Into::into));
    let run = qemu::run(&args, LIMIT).unwrap_or_else(|e| panic!("{e}"));
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("QEMU {machine}: {run:#?}");
    assert!(run.status.is_some(), "killed after {LIMIT:?}: {context}");
    assert_eq!(report.panic_message(), None, "{context}");
    assert!(report.finished(), "no 'probe: done': {context}");
    assert!(run.exited_cleanly(), "QEMU did not power off: {context}");
    (run, report, context)
}

#[test]
fn virtio_blk_under_qemu_q35() {
    let dir = scratch_dir("q35");
    let (rw, ro) = (dir.join("rw.img"), dir.join("ro.img"));
    let head = test_bytes(4096, 0x5eed);
    make_image(
        &rw,
        RW_SIZE,
        &[
            (0, head.clone()),
            (
                DISCARD.0 * SECTOR,
                vec![0xaa; (DISCARD.1 * SECTOR) as usize],
            ),
            (ZERO.0 * SECTOR, vec![0x55; (ZERO.1 * SECTOR) as usize]),
        ],
    );
    let ro_bytes = test_bytes(RO_SIZE as usize, 0x0123);
    make_image(&ro, RO_SIZE, &[(0, ro_bytes.clone())]);
    let blocks_before = std::fs::metadata(&rw).unwrap().blocks();

    let cmdline = format!(
        "console=ttyS0 probe.pci.mem64={MEM64_BASE:#x} probe.blk.write={}:{} probe.blk.discard={}:{} probe.blk.zero={}:{}",
        WRITE.0, WRITE.1, DISCARD.0, DISCARD.1, ZERO.0, ZERO.1
    );
    let mut extra = drive_args(&rw, "d0", ",discard=unmap", RW_SLOT, "probe-serial");
    extra.extend(drive_args(&ro, "d1", ",readonly=on", RO_SLOT, "probe-ro"));
    let (_run, report, context) = run_qemu("q35", &cmdline, &extra);
    let context = context.as_str();

    // PCI: both mechanisms, same answers, the disks where they were put.
    assert!(report.value("pci ecam=0x").is_some(), "{context}");
    assert!(report.has("pci cf8=present"), "{context}");
    assert!(report.value("pci mismatch").is_none(), "{context}");
    for slot in [RW_SLOT, RO_SLOT] {
        let f = line(
            &report,
            &format!("pci slot={slot}"),
            "func=0 vendor=",
            context,
        );
        assert_eq!(f.get("via"), Some("ecam+cf8"), "{context}");
        assert_eq!(f.get("device"), Some("0x1042"), "{context}");
        assert_eq!(f.get("class"), Some("0x010000"), "{context}");
        let bars = report.values(&format!("pci slot={slot} func=0 bar"));
        let high = bars
            .iter()
            .map(|b| Fields::parse(b))
            .any(|b| b.get("type") == Some("mem64") && b.get("assigned") == Some("probe"));
        assert!(high, "no 64-bit BAR moved to {MEM64_BASE:#x}: {context}");
        let virtio = line(&report, &format!("virtio slot={slot}"), "common=", context);
        let common = virtio.get("common").unwrap_or_default();
        let at = common
            .split('@')
            .nth(1)
            .and_then(zvmm_tests::probe::parse_num);
        assert!(
            at >= Some(MEM64_BASE),
            "common cfg not above 4 GiB: {context}"
        );
        let msix = line(&report, &format!("virtio slot={slot}"), "msix ", context);
        assert_eq!(msix.get("config_vector"), Some("0"), "{context}");
        let queue = line(&report, &format!("virtio slot={slot}"), "queue=0 ", context);
        assert_eq!(queue.get("vector"), Some("1"), "{context}");
    }
    assert_eq!(report.value("blk devices="), Some("2"), "{context}");

    // The writable disk.
    let rw_cfg = line(
        &report,
        &format!("blk slot={RW_SLOT}"),
        "capacity=",
        context,
    );
    let capacity = rw_cfg.num("capacity");
    assert_eq!(capacity, Some(RW_SIZE / SECTOR), "{context}");
    assert_eq!(rw_cfg.get("ro"), Some("0"), "{context}");
    assert_eq!(rw_cfg.get("indirect"), Some("1"), "{context}");
    assert_eq!(rw_cfg.get("event_idx"), Some("1"), "{context}");
    check_common(&report, RW_SLOT, "probe-serial", &head, context);
    let written = pattern(WRITE.0, WRITE.1);
    let write = line(&report, &format!("blk slot={RW_SLOT}"), "write ", context);
    assert_eq!(write.get("status"), Some("ok"), "{context}");
    assert_eq!(write.get("readback"), Some("ok"), "{context}");
    assert_eq!(write.num("fnv1a64"), Some(fnv1a64(&written)), "{context}");
    let discard = line(&report, &format!("blk slot={RW_SLOT}"), "discard ", context);
    assert_eq!(discard.get("status"), Some("ok"), "{context}");
    let zero = line(
        &report,
        &format!("blk slot={RW_SLOT}"),
        "write_zeroes ",
        context,
    );
    assert_eq!(zero.get("status"), Some("ok"), "{context}");
    assert_eq!(zero.get("readback"), Some("zero"), "{context}");
    let stats = line(
        &report,
        &format!("blk slot={RW_SLOT}"),
        "requests=",
        context,
    );
    assert!(stats.num("indirect") > Some(0), "{context}");
    assert!(stats.num("notifies") > Some(0), "{context}");
    assert_eq!(
        report.value(&format!("blk slot={RW_SLOT} reset=")),
        Some("ok"),
        "{context}"
    );

    // What reached the image files.
    let image = std::fs::read(&rw).unwrap();
    assert_eq!(&image[..4096], &head[..], "sectors 0..8 changed");
    assert!(
        range_bytes(&image, WRITE) == written,
        "pattern not in image"
    );
    assert!(range_bytes(&image, DISCARD).iter().all(|&b| b == 0));
    assert!(range_bytes(&image, ZERO).iter().all(|&b| b == 0));
    let blocks_after = std::fs::metadata(&rw).unwrap().blocks();
    assert!(
        blocks_after + DISCARD.1 / 2 <= blocks_before,
        "discard freed nothing: st_blocks {blocks_before} -> {blocks_after}"
    );

    // The read-only disk.
    let ro_cfg = line(
        &report,
        &format!("blk slot={RO_SLOT}"),
        "capacity=",
        context,
    );
    let capacity = ro_cfg.num("capacity");
    assert_eq!(capacity, Some(RO_SIZE / SECTOR), "{context}");
    assert_eq!(ro_cfg.get("ro"), Some("1"), "{context}");
    check_common(&report, RO_SLOT, "probe-ro", &ro_bytes[..4096], context);
    let write = line(&report, &format!("blk slot={RO_SLOT}"), "write ", context);
    assert_eq!(write.get("status"), Some("ioerr"), "{context}");
    assert_eq!(write.get("ro"), Some("1"), "{context}");
    assert!(
        std::fs::read(&ro).unwrap() == ro_bytes,
        "read-only image changed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// ID, first page, out-of-range read and flush of the disk in `slot`.
fn check_common(report: &ProbeReport, slot: u8, id: &str, head: &[u8], context: &str) {
    let blk = format!("blk slot={slot}");
    assert_eq!(
        line(report, &blk, "id=", context).get("id"),
        Some(id),
        "{context}"
    );
    let read = line(
        report,
        &format!("blk slot={slot}"),
        "read sector=0 ",
        context,
    );
    assert_eq!(read.get("status"), Some("ok"), "{context}");
    assert_eq!(read.num("len"), Some(4096), "{context}");
    assert_eq!(read.num("fnv1a64"), Some(fnv1a64(head)), "{context}");
    let oor = line(
        report,
        &format!("blk slot={slot}"),
        "read_out_of_range ",
        context,
    );
    assert_eq!(oor.get("status"), Some("ioerr"), "{context}");
    let flush = line(report, &format!("blk slot={slot}"), "flush ", context);
    assert_eq!(flush.get("status"), Some("ok"), "{context}");
}

/// microvm's PCIe host has no MCFG table and no 0xCF8 ports: the probe
/// finds no configuration mechanism, no disk, and still powers off.
#[test]
fn no_pci_mechanism_under_qemu_microvm_pcie() {
    let dir = scratch_dir("microvm");
    let rw = dir.join("microvm.img");
    make_image(&rw, RW_SIZE, &[]);
    let extra = drive_args(&rw, "d0", "", 1, "probe-serial");
    let (_run, report, context) = run_qemu("microvm,acpi=on,pcie=on", "console=ttyS0", &extra);
    assert!(report.has("pci ecam none"), "{context}");
    assert!(report.has("pci cf8=absent"), "{context}");
    assert_eq!(report.value("pci functions="), Some("0"), "{context}");
    assert_eq!(report.value("blk devices="), Some("0"), "{context}");
    let _ = std::fs::remove_dir_all(&dir);
}
