//! The probe's firmware mode under QEMU q35 (the reference VMM, KVM only)
//! with a modern-only `virtio-blk-pci` holding the disk the test built
//! (GPT, FAT32 ESP with a boot loader spec entry, a data file): every line
//! is checked against the disk and its files as under zvmm
//! (`zvmm_firmware.rs`), which proves the probe's firmware-style drivers,
//! so the same report under zvmm judges zvmm. QEMU's SeaBIOS runs first
//! on q35 and has already assigned the BARs and enabled the function; the
//! probe uses them as it finds them.

use std::time::Duration;

use zvmm_tests::efi_disk::{self, check_firmware_report, fw_line, probe_esp_files, Layout};
use zvmm_tests::probe::{probe_elf, test_bytes, Flavour, ProbeReport};
use zvmm_tests::qemu;

/// Hard limit for one QEMU run (~6 s on an idle host, over a minute on a
/// busy one: q35's SeaBIOS is slow under KVM-PVM).
const LIMIT: Duration = Duration::from_secs(180);
/// The PCI slot the test pins the disk to.
const SLOT: u8 = 3;

#[test]
fn firmware_mode_under_qemu_q35() {
    let dir = std::env::temp_dir().join(format!("zvmm-probe-fw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("vm.raw");
    let data = test_bytes(6000, 0xf1f0);
    efi_disk::build(&disk, 64, &Layout::Efi(probe_esp_files(&data, true)));

    let cmdline = format!(
        "console=ttyS0 probe.mode=firmware probe.fw.file={} probe.fw.file=/no/such/file",
        efi_disk::DATA_FILE_ASKED
    );
    let mut args = qemu::boot_args("q35", &probe_elf(Flavour::Pvh), None, &cmdline);
    for arg in [
        "-drive".to_string(),
        format!("file={},if=none,id=d0,format=raw", disk.display()),
        "-device".into(),
        format!("virtio-blk-pci,drive=d0,disable-legacy=on,addr={SLOT:#x}"),
    ] {
        args.push(arg.into());
    }
    let run = qemu::run(&args, LIMIT).unwrap_or_else(|e| panic!("{e}"));
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("QEMU q35: {run:#?}");
    let context = context.as_str();
    assert!(run.status.is_some(), "killed after {LIMIT:?}: {context}");
    assert_eq!(report.panic_message(), None, "{context}");
    assert!(report.finished(), "{context}");
    assert!(run.exited_cleanly(), "QEMU did not power off: {context}");

    let found = fw_line(&report, &format!("pci slot={SLOT}"), "vendor=", context);
    assert_eq!(found.get("device"), Some("0x1042"), "{context}");
    check_firmware_report(&report, SLOT, &disk, &data, context);
    let command = fw_line(&report, &format!("slot={SLOT}"), "command ", context);
    assert_eq!(command.get("memory"), Some("1"), "{context}");
    let bars = efi_disk::fw_lines(&report, &format!("slot={SLOT}"));
    let mapped: Vec<_> = bars
        .iter()
        .filter(|f| f.get("bar").is_some())
        .filter(|f| f.get("type") != Some("io"))
        .collect();
    assert!(!mapped.is_empty(), "{context}");
    for bar in mapped {
        let end = bar.num("addr").unwrap_or(u64::MAX) + bar.num("size").unwrap_or(0);
        assert!(end <= 1 << 32, "BAR above 4 GiB: {context}");
        assert_eq!(bar.get("restored"), Some("1"), "{context}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
