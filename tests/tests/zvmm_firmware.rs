//! VM mode on zvmm: PVH firmware passed as `--kernel` with the VM's raw
//! disk, as Zero-OS runs rust-hypervisor-firmware. The firmware here is
//! the probe in firmware mode (`probe.mode=firmware`, behaving like that
//! firmware: 0xCF8 only, BARs as zvmm left them, a polled 16-entry queue,
//! GPT and FAT32) with the firmware's boot paths appended, so zvmm's
//! loader takes it for rust-hypervisor-firmware. Every fact it reports is
//! checked against the disk the test built (sgdisk, mkfs.fat, mtools) and
//! the files on it; the disks the firmware cannot boot from (no GPT, no
//! ESP, an ESP without a file system) leave it halted, and zvmm stays in
//! control: `--timeout` ends it, `vm.shutdown` stops it. Firmware files of
//! the wrong kind are refused with one line. `probe_firmware_qemu.rs`
//! runs the same probe under QEMU q35.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use loader::layout;
use zvmm_tests::api::{get, put, start_api};
use zvmm_tests::disk::FileState;
use zvmm_tests::efi_disk::{
    self, check_firmware_report, fw_errors, fw_line, probe_esp_files, Layout, DATA_FILE_ASKED,
};
use zvmm_tests::probe::{probe_elf, test_bytes, Flavour, ProbeReport};
use zvmm_tests::zvmm::{assert_rejected, run_zvmm, scratch_dir, spawn_zvmm, Finished};

/// Hard limit for one VM run.
const LIMIT: Duration = Duration::from_secs(60);
/// The boot paths rust-hypervisor-firmware carries (what zvmm's loader
/// recognises it by).
const RHF_MARKERS: &[u8] = b"\0/loader/loader.conf\0\\EFI\\BOOT\\BOOTX64.EFI\0";
/// Size of the data file the probe reads back (it hashes ~12 us a byte).
const DATA_LEN: usize = 6000;

/// `flavour`'s probe ELF with the firmware's boot paths appended, in `dir`.
fn firmware_elf(dir: &Path, flavour: Flavour) -> PathBuf {
    let mut elf = std::fs::read(probe_elf(flavour)).expect("cannot read the probe");
    elf.extend_from_slice(RHF_MARKERS);
    let path = dir.join(format!("hypervisor-fw-{}", flavour.protocol()));
    std::fs::write(&path, elf).expect("cannot write the firmware");
    path
}

fn cmdline(extra: &str) -> String {
    format!(
        "console=ttyS0 probe.mode=firmware probe.fw.file={DATA_FILE_ASKED} probe.fw.file=/no/such/file {extra}"
    )
}

fn args(firmware: &Path, disks: &[&Path], timeout: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        firmware.display().to_string(),
        "--cmdline".into(),
        cmdline(""),
        "--timeout".into(),
        timeout.into(),
    ];
    for disk in disks {
        args.extend(["--disk".into(), format!("path={}", disk.display())]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run(args: &[String]) -> (Finished, ProbeReport, String) {
    let run = spawn_zvmm(args).finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("zvmm {args:?}: {run:#?}");
    assert!(run.status.is_some(), "killed after {LIMIT:?}: {context}");
    assert_eq!(report.panic_message(), None, "{context}");
    (run, report, context)
}

/// The slots of the virtio-blk functions the firmware found, in order.
fn blk_slots(report: &ProbeReport) -> Vec<u8> {
    efi_disk::fw_lines(report, "pci")
        .iter()
        .filter(|f| f.get("device") == Some("0x1042"))
        .filter_map(|f| f.num("slot").map(|s| s as u8))
        .collect()
}

#[test]
fn firmware_boots_the_vm_disk_like_rust_hypervisor_firmware() {
    let dir = scratch_dir("fw-vm-mode");
    let firmware = firmware_elf(&dir, Flavour::Pvh);
    let inspect = run_zvmm(
        ["kernel", "inspect", &firmware.display().to_string()],
        LIMIT,
    );
    assert_eq!(inspect.code(), 0, "{inspect:#?}");
    assert!(
        inspect
            .stdout
            .contains("Kind:             firmware: rust-hypervisor-firmware"),
        "{inspect:#?}"
    );
    let data = test_bytes(DATA_LEN, 0xf1f0);
    let disk = dir.join("vm.raw");
    efi_disk::build(&disk, 64, &Layout::Efi(probe_esp_files(&data, true)));
    let user_data = dir.join("user-data");
    std::fs::write(&user_data, "#cloud-config\n").unwrap();
    let seed = format!("user-data={}", user_data.display());
    // Zero-OS's VM mode: the disk first, the cloud-init seed last.
    let extra = ["--cpus", "2", "--memory", "1G", "--cloud-init", &seed];
    let (run, report, context) = run(&args(&firmware, &[&disk], "50", &extra));
    let context = context.as_str();
    assert_eq!(run.code(), 0, "{context}");
    assert!(report.finished(), "{context}");

    assert_eq!(blk_slots(&report), [1, 2], "disk and seed: {context}");
    check_firmware_report(&report, 1, &disk, &data, context);
    // zvmm leaves memory decoding off; the firmware turns it on with a
    // dword write and never turns on bus mastering.
    let command = fw_line(&report, "slot=1", "command ", context);
    assert_eq!(command.get("before"), Some("0x0000"), "{context}");
    assert_eq!(command.get("after"), Some("0x0002"), "{context}");
    assert_eq!(command.get("master"), Some("0"), "{context}");
    let bar = fw_line(&report, "slot=1", "bar=0 ", context);
    let window = layout::PCI_MMIO32_START..layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE;
    assert!(window.contains(&bar.num("addr").unwrap_or(0)), "{context}");
    assert_eq!(
        bar.get("restored"),
        Some("1"),
        "sized with decoding on: {context}"
    );
    let start_info = fw_line(&report, "start_info", "version=", context);
    assert_eq!(
        start_info.num("rsdp"),
        Some(layout::ACPI_START),
        "{context}"
    );
    let map = layout::memory_map(1 << 30);
    assert_eq!(
        start_info.num("memmap_entries"),
        Some(map.len() as u64),
        "{context}"
    );
    // The EFI console's NUL bytes pass through the serial console.
    assert!(
        run.stdout
            .contains(&format!("{}probe: fw serial", "\0".repeat(64))),
        "{context}"
    );
    // The seed is never touched: the first disk booted.
    assert!(report.value("fw slot=2 ").is_none(), "{context}");
}

#[test]
fn firmware_falls_back_to_the_efi_binary_and_tries_disks_in_order() {
    let dir = scratch_dir("fw-efi-fallback");
    let firmware = firmware_elf(&dir, Flavour::Pvh);
    let (blank, esp_only) = (dir.join("blank.raw"), dir.join("efi.raw"));
    efi_disk::build(&blank, 8, &Layout::NoGpt);
    let data = test_bytes(DATA_LEN, 0xfeed);
    efi_disk::build(&esp_only, 64, &Layout::Efi(probe_esp_files(&data, false)));
    let (run, report, context) = run(&args(&firmware, &[&blank, &esp_only], "50", &[]));
    let context = context.as_str();
    assert_eq!(run.code(), 0, "{context}");
    assert_eq!(blk_slots(&report), [1, 2], "{context}");
    assert_eq!(
        fw_errors(&report),
        [("gpt".to_string(), "no_gpt".to_string())],
        "{context}"
    );
    assert!(report.has("fw gpt none mbr=none"), "{context}");
    assert!(report.has("fw slot=1 reset=ok"), "{context}");
    assert!(
        report.has("fw bls failed reason=no_loader_conf"),
        "{context}"
    );
    let efi = fw_line(&report, "efi", "path=", context);
    assert_eq!(efi.get("path"), Some("/EFI/BOOT/BOOTX64.EFI"), "{context}");
    assert_eq!(efi.get("mz"), Some("1"), "{context}");
    assert_eq!(efi.get("machine"), Some("0x8664"), "{context}");
    assert!(report.has("fw boot method=efi"), "{context}");
    let file = fw_line(&report, "file", "path=", context);
    assert_eq!(
        file.num("fnv1a64"),
        Some(zvmm_tests::probe::fnv1a64(&data)),
        "{context}"
    );
    assert!(report.value("fw result=ok").is_some(), "{context}");
}

#[test]
fn unbootable_disks_leave_the_firmware_halted_until_the_timeout() {
    let dir = scratch_dir("fw-unbootable");
    let firmware = firmware_elf(&dir, Flavour::Pvh);
    let disks: Vec<PathBuf> = ["blank", "no-esp", "raw-esp"]
        .iter()
        .map(|name| dir.join(format!("{name}.raw")))
        .collect();
    efi_disk::build(&disks[0], 8, &Layout::NoGpt);
    efi_disk::build(&disks[1], 16, &Layout::NoEsp);
    efi_disk::build(&disks[2], 64, &Layout::UnformattedEsp);
    let paths: Vec<&Path> = disks.iter().map(PathBuf::as_path).collect();
    let before: Vec<_> = disks.iter().map(|d| FileState::of(d)).collect();
    let start = Instant::now();
    let (run, report, context) = run(&args(&firmware, &paths, "5", &[]));
    let context = context.as_str();
    assert_eq!(run.code(), 124, "{context}");
    assert!(start.elapsed() < Duration::from_secs(15), "{context}");
    let reason = |r: &str| r.to_string();
    assert_eq!(
        fw_errors(&report),
        [
            (reason("gpt"), reason("no_gpt")),
            (reason("gpt"), reason("no_esp")),
            (reason("fat"), reason("no_boot_signature")),
            (reason("boot"), reason("no_bootable_disk")),
        ],
        "{context}"
    );
    assert!(report.has("fw gpt used=1 esp=0"), "{context}");
    assert!(report.has("fw halt"), "{context}");
    assert!(!report.finished(), "{context}");
    assert!(run.stderr.contains("timeout"), "{context}");
    let after: Vec<_> = disks.iter().map(|d| FileState::of(d)).collect();
    assert_eq!(before, after, "the firmware only reads: {context}");
}

#[test]
fn a_halted_firmware_is_stopped_with_vm_shutdown() {
    let dir = scratch_dir("fw-shutdown");
    let firmware = firmware_elf(&dir, Flavour::Pvh);
    let disk = dir.join("no-esp.raw");
    efi_disk::build(&disk, 16, &Layout::NoEsp);
    let socket = dir.join("api.sock");
    let vm = args(&firmware, &[&disk], "50", &[]);
    let extra: Vec<&str> = vm.iter().map(String::as_str).collect();
    let zvmm = start_api(&socket, &extra);
    assert!(
        zvmm.stdout.wait_for("probe: fw halt", LIMIT),
        "{}",
        zvmm.stdout.text()
    );
    let counters = get(&socket, "vm.counters").json();
    let disk0 = &counters["_disk0"];
    assert!(disk0["read_requests"].as_u64() > Some(2), "{counters}");
    for clean in ["io_errors", "invalid_chains", "unsupported"] {
        assert_eq!(disk0[clean], 0, "{clean}: {counters}");
    }
    assert_eq!(put(&socket, "vm.shutdown", "").status, 204);
    assert_eq!(get(&socket, "vm.info").json()["state"], "Shutdown");
    assert_eq!(put(&socket, "vmm.shutdown", "").status, 204);
    let done = zvmm.finish(Duration::from_secs(10));
    assert_eq!(done.code(), 0, "{done:#?}");
    let report = ProbeReport::parse(&done.stdout);
    assert_eq!(
        fw_errors(&report).first(),
        Some(&("gpt".to_string(), "no_esp".to_string())),
        "{done:#?}"
    );
}

#[test]
fn firmware_files_of_the_wrong_kind_are_refused_with_one_line() {
    let dir = scratch_dir("fw-wrong-kind");
    let disk = dir.join("vm.raw");
    efi_disk::build(&disk, 8, &Layout::NoGpt);
    let refuse = |firmware: &Path, code: i32, needles: &[&str]| {
        let run = run_zvmm(args(firmware, &[&disk], "5", &[]), LIMIT);
        assert_rejected(&run, code, needles);
    };

    let whole = std::fs::read(firmware_elf(&dir, Flavour::Pvh)).unwrap();
    let truncated = dir.join("truncated-fw");
    std::fs::write(&truncated, &whole[..whole.len() / 2]).unwrap();
    refuse(
        &truncated,
        1,
        &["truncated-fw is truncated", "copy the complete image"],
    );

    let coreboot = firmware_elf(&dir, Flavour::Linux64);
    refuse(
        &coreboot,
        1,
        &[
            "is rust-hypervisor-firmware without a PVH entry note",
            "hypervisor-fw",
        ],
    );

    let mut volume = vec![0u8; 2 << 20];
    volume[0x28..0x2c].copy_from_slice(b"_FVH");
    let cloudhv = dir.join("CLOUDHV.fd");
    std::fs::write(&cloudhv, volume).unwrap();
    refuse(
        &cloudhv,
        1,
        &["CLOUDHV.fd is a UEFI firmware volume", "hypervisor-fw"],
    );
    // Options that make no sense with firmware: it loads the initrd from
    // the disk, and without a disk it has nothing to boot.
    let firmware = firmware_elf(&dir, Flavour::Pvh);
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, b"unused").unwrap();
    let initrd_arg = initrd.display().to_string();
    let with_initrd = run_zvmm(
        args(&firmware, &[&disk], "5", &["--initrd", &initrd_arg]),
        LIMIT,
    );
    assert_rejected(
        &with_initrd,
        1,
        &["is rust-hypervisor-firmware", "drop --initrd"],
    );
    let no_disk = run_zvmm(args(&firmware, &[], "5", &[]), LIMIT);
    assert_rejected(&no_disk, 1, &["boots from a disk", "add --disk"]);
    let inspect = run_zvmm(["kernel", "inspect", &cloudhv.display().to_string()], LIMIT);
    assert_eq!(inspect.code(), 1, "{inspect:#?}");
    assert!(
        inspect
            .stdout
            .contains("UEFI firmware volume (OVMF/EDK2 flash image)"),
        "{inspect:#?}"
    );
}
