//! Several PCI segments, served: zvmm with `--platform num_pci_segments=2`
//! puts a disk on segment 0 and the virtio-fs share on segment 1; the
//! probe guest finds both host bridges through the MCFG (one entry per
//! segment), finds each device on its own segment's root bus, with its
//! BARs in that segment's windows, and drives both: the disk's sector 0
//! read and a pattern written (checked in the image afterwards), the
//! share's FUSE checks (`zvmm_tests::fs::Share`). Then Kata's shape
//! through the API: `vm.create` with `platform.num_pci_segments: 2` and
//! the `kataShared` share on `pci_segment: 1` (a virtiofsd the test
//! started), `vm.boot`, the probe lists the share found on segment 1.
//!
//! Needs virtiofsd (`cargo install virtiofsd --locked`; a missing one
//! fails the test saying so).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use loader::layout::{pci_segment_windows, PciSegmentWindows};
use serde_json::json;
use zvmm_tests::ch::{wait_for_ping, AgentVirtiofsd, KeepAlive};
use zvmm_tests::disk::{line, make_image, pattern};
use zvmm_tests::fs::{listing, plan, virtiofsd_bin, Share};
use zvmm_tests::probe::{fnv1a64, probe_elf, Fields, Flavour, ProbeReport};
use zvmm_tests::zvmm::{scratch_dir, zvmm_bin, Finished, Running};

/// Hard limit for one VM run (the test kills zvmm past it).
const LIMIT: Duration = Duration::from_secs(300);
/// zvmm's own limit (`--timeout`), below [`LIMIT`].
const VM_TIMEOUT: &str = "280";
/// Guest RAM (shared: virtio-fs).
const MEMORY: u64 = 256 << 20;
/// The disk image's size and what its first sector holds.
const DISK_SIZE: u64 = 16 << 20;
const SECTOR0: &[u8] = b"zvmm pci segment 0 disk\n";
/// The sectors the probe writes its pattern to (`probe.blk.write=S:C`).
const WRITE: (u64, u64) = (8, 4);
/// virtio-pci device IDs: block, file system.
const VIRTIO_BLK: &str = "0x1042";
const VIRTIO_FS: &str = "0x105a";

/// Segment `segment` of two as zvmm lays it out for [`MEMORY`].
fn windows(segment: u16) -> PciSegmentWindows {
    pci_segment_windows(segment, 2, MEMORY, 0).expect("segment of two")
}

/// The probe's `pci seg=S bus=0 dev=D func=0 ...` line.
fn function(report: &ProbeReport, seg: u16, dev: u8, context: &str) -> Fields {
    let stem = format!("pci seg={seg} bus=0 dev={dev}");
    line(report, &stem, "func=0 ", context)
}

/// Both MCFG entries, both host bridges, `device` at 1:1 and the disk at
/// 0:1 (or only the host bridge of segment 0 and `device` at 1:1 when
/// `disk` is false), each BAR in its own segment's windows.
fn check_segments(report: &ProbeReport, disk: bool, context: &str) {
    assert_eq!(report.value("pci segments="), Some("2"), "{context}");
    for seg in 0..2u16 {
        let ecam = windows(seg).ecam.0;
        let entry = format!("pci ecam={ecam:#x} buses=0-0 seg={seg}");
        assert!(report.has(&entry), "no '{entry}': {context}");
        let bridge = function(report, seg, 0, context);
        assert_eq!(bridge.get("device"), Some("0x0d57"), "{context}");
        assert_eq!(bridge.get("via"), Some(via(seg)), "{context}");
    }
    let fs = function(report, 1, 1, context);
    assert_eq!(fs.get("device"), Some(VIRTIO_FS), "{context}");
    check_bars(report, "1:1", &windows(1), context);
    if disk {
        let blk = function(report, 0, 1, context);
        assert_eq!(blk.get("device"), Some(VIRTIO_BLK), "{context}");
        check_bars(report, "1", &windows(0), context);
    }
    assert!(report.value("pci mismatch").is_none(), "{context}");
}

/// Segment 0 answers on 0xCF8 and ECAM alike, the others on ECAM only.
fn via(seg: u16) -> &'static str {
    if seg == 0 {
        "ecam+cf8"
    } else {
        "ecam"
    }
}

/// Every memory BAR of the device `slot` names lies in `windows`.
fn check_bars(report: &ProbeReport, slot: &str, windows: &PciSegmentWindows, context: &str) {
    let bars: Vec<Fields> = report
        .values(&format!("pci slot={slot} func=0 bar"))
        .into_iter()
        .map(|rest| Fields::parse(&format!("bar{rest}")))
        .collect();
    assert!(!bars.is_empty(), "no bars of slot {slot}: {context}");
    for bar in bars {
        let size = bar.num("size").unwrap_or(0);
        let address = ["bar0", "bar1", "bar2", "bar3", "bar4", "bar5"]
            .iter()
            .find_map(|key| bar.num(key))
            .unwrap_or(0);
        let inside = |(start, len): (u64, u64)| address >= start && address + size <= start + len;
        assert!(
            inside(windows.mmio32) || inside(windows.mmio64),
            "slot {slot} bar at {address:#x} ({size:#x}) outside {windows:x?}: {context}"
        );
    }
}

fn assert_probe_done(run: &Finished, report: &ProbeReport, context: &str) {
    assert_eq!(report.panic_message(), None, "{context}");
    assert!(report.finished(), "no 'probe: done': {context}");
    assert_eq!(run.code(), 0, "{context}");
}

#[test]
fn a_disk_on_segment_0_and_a_share_on_segment_1_are_both_driven() {
    let dir = scratch_dir("pci-segments");
    let share = Share::prepare(&dir.join("share")).unwrap_or_else(|e| panic!("{e}"));
    let image = dir.join("disk.raw");
    make_image(&image, DISK_SIZE, &[(0, SECTOR0.to_vec())]);
    let virtiofsd = virtiofsd_bin().unwrap_or_else(|e| panic!("{e}"));
    let fs = format!(
        "tag={},path={},pci_segment=1",
        plan::TAG,
        share.dir().display()
    );
    let disk = format!("path={},pci_segment=0", image.display());
    let cmdline = format!(
        "{} probe.blk.write={}:{}",
        share.cmdline(),
        WRITE.0,
        WRITE.1
    );
    let mut command = Command::new(zvmm_bin());
    command
        .env("XDG_RUNTIME_DIR", &dir)
        .arg("--kernel")
        .arg(probe_elf(Flavour::Pvh))
        .args(["--memory", "256M", "--timeout", VM_TIMEOUT])
        .args(["--platform", "num_pci_segments=2"])
        .args(["--disk", &disk, "--fs", &fs])
        .arg("--virtiofsd")
        .arg(virtiofsd)
        .args(["--cmdline", &cmdline]);
    let run = Running::spawn(command).finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("zvmm --disk {disk} --fs {fs}: {run:#?}");
    assert_probe_done(&run, &report, &context);
    check_segments(&report, true, &context);

    // The disk on segment 0: sector 0 read, the pattern written.
    let read = line(&report, "blk slot=1", "read sector=0 ", &context);
    let mut first = vec![0u8; 4096];
    first[..SECTOR0.len()].copy_from_slice(SECTOR0);
    assert_eq!(read.num("fnv1a64"), Some(fnv1a64(&first)), "{context}");
    let bytes = std::fs::read(&image).unwrap();
    let written = &bytes[(WRITE.0 * 512) as usize..((WRITE.0 + WRITE.1) * 512) as usize];
    assert!(
        written == pattern(WRITE.0, WRITE.1),
        "pattern not on disk: {context}"
    );

    // The share on segment 1: the probe names it 1:1 and runs every check.
    let device = line(&report, "fs", "slot=", &context);
    assert_eq!(device.get("slot"), Some("1:1"), "{context}");
    share.check(&report, &context);
    assert_eq!(report.value("blk devices="), Some("1"), "{context}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device on a segment the VM lacks is refused by name, before boot.
#[test]
fn a_device_on_a_missing_segment_is_refused_by_name() {
    let kernel = probe_elf(Flavour::Pvh);
    let run = Command::new(zvmm_bin())
        .arg("--kernel")
        .arg(&kernel)
        .args(["--platform", "num_pci_segments=2"])
        .args(["--disk", "path=/dev/null,readonly=on,pci_segment=2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--disk path=/dev/null: pci_segment=2, but the VM has 2 PCI segment(s)"),
        "{stderr}"
    );
    for platform in ["num_pci_segments=0", "num_pci_segments=17", "tdx=on"] {
        let run = Command::new(zvmm_bin())
            .arg("--kernel")
            .arg(&kernel)
            .args(["--platform", platform])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{platform}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
}

/// Kata's `vm.create` shape: two segments, `kataShared` on segment 1.
fn kata_body(dir: &Path, fs_socket: &Path) -> serde_json::Value {
    json!({
        "payload": {"kernel": probe_elf(Flavour::Pvh), "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false, "nested": true},
        "memory": {"size": MEMORY, "shared": true, "mergeable": false, "hugepages": false,
                   "hotplug_method": "Acpi", "prefault": false, "thp": true},
        "rng": {"src": "/dev/urandom", "iommu": false},
        "serial": {"mode": "Tty", "iommu": false},
        "console": {"mode": "Off", "iommu": false},
        "fs": [{"tag": "kataShared", "socket": fs_socket, "num_queues": 1,
                "queue_size": 1024, "pci_segment": 1}],
        "vsock": {"cid": 3, "socket": dir.join("kata.sock"), "iommu": false, "pci_segment": 0},
        "iommu": false,
        "watchdog": false,
        "pvpanic": false,
        "platform": {"num_pci_segments": 2, "iommu_segments": [], "tdx": false,
                     "sev_snp": false, "iommufd": false, "vfio_p2p_dma": true},
    })
}

#[test]
fn kata_shared_on_segment_1_through_the_api_is_served() {
    let dir = scratch_dir("pci-segments-kata");
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("kata.txt"), b"on segment 1\n").unwrap();
    let fs_socket = dir.join("virtiofsd.sock");
    let _virtiofsd = AgentVirtiofsd::start(&["--cache", "auto"], &fs_socket, &shared);
    let socket = dir.join("api.sock");
    let mut command = Command::new(zvmm_bin());
    command.arg("--api-socket").arg(&socket);
    let zvmm = Running::spawn(command);
    wait_for_ping(&socket, Duration::from_secs(30));
    let mut client = KeepAlive::connect(&socket).unwrap();
    let body = kata_body(&dir, &fs_socket).to_string();
    let mut call = |method: &str, endpoint: &str, body: &str| {
        let answer = client.request(method, endpoint, body, &[]).unwrap();
        (answer.status, answer.line(), answer)
    };
    let (status, created, _) = call("PUT", "vm.create", &body);
    assert_eq!(status, 204, "{created}");
    let (status, info, answer) = call("GET", "vm.info", "");
    assert_eq!(status, 200, "{info}");
    let config = &answer.json()["config"];
    assert_eq!(config["platform"]["num_pci_segments"], 2, "{info}");
    assert_eq!(config["fs"][0]["pci_segment"], 1, "{info}");
    let (status, booted, _) = call("PUT", "vm.boot", "");
    assert_eq!(status, 204, "{booted}");
    let done = zvmm.stdout.wait_for("probe: done", LIMIT);
    // The guest's poweroff may already have ended zvmm.
    let _ = client.request("PUT", "vmm.shutdown", "", &[]);
    let run = zvmm.finish(Duration::from_secs(30));
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("{created}\n{booted}\n{run:#?}");
    assert!(done, "no 'probe: done': {context}");
    assert_eq!(report.panic_message(), None, "{context}");
    check_segments(&report, false, &context);
    let device = line(&report, "fs", "slot=", &context);
    assert_eq!(device.get("slot"), Some("1:1"), "{context}");
    assert_eq!(device.get("tag"), Some("kataShared"), "{context}");
    let names: Vec<String> = listing(&report, "", "before").into_keys().collect();
    assert_eq!(names, ["kata.txt"], "{context}");
    let _ = std::fs::remove_dir_all(&dir);
}
