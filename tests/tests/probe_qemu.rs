//! Runs the PVH probe under QEMU (the reference VMM, KVM only) on the
//! microvm and q35 machines and checks every fact it reports against what
//! the test handed QEMU. This proves the probe right, so the same report
//! under zvmm judges zvmm.

use std::path::PathBuf;
use std::time::Duration;

use zvmm_tests::probe::{fnv1a64, probe_elf, Checksum, Flavour, ProbeReport};
use zvmm_tests::qemu;

/// Hard limit for one QEMU run (q35's SeaBIOS alone takes ~10 s here).
const LIMIT: Duration = Duration::from_secs(30);

/// Deterministic initrd content with an odd length.
fn initrd_bytes() -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..150_001)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zvmm-probe-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Boots the PVH probe on `machine` and checks the whole report.
/// `extra_cmdline` is appended to the command line, `protocol` is the boot
/// protocol the report must show and `poweroff_method` is what the
/// machine's FADT calls for.
fn check_machine(machine: &str, extra_cmdline: &str, protocol: &str, poweroff_method: &str) {
    let kernel = probe_elf(Flavour::Pvh);
    let initrd = initrd_bytes();
    let tag = format!("{}-{protocol}", machine.split(',').next().unwrap());
    let initrd_path = scratch_file(&format!("initrd-{tag}"), &initrd);
    let cmdline = format!(
        "console=ttyS0 probe.token={tag}-{}-{:x} quoted=\"a b\\c\"{extra_cmdline}",
        std::process::id(),
        fnv1a64(machine.as_bytes())
    );
    let args = qemu::boot_args(machine, &kernel, Some(&initrd_path), &cmdline);
    let run = qemu::run(&args, LIMIT).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&initrd_path);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("QEMU {machine}: {run:#?}");

    assert!(run.status.is_some(), "killed after {LIMIT:?}: {context}");
    assert!(report.started(), "no 'probe: start': {context}");
    assert_eq!(report.panic_message(), None, "{context}");
    assert_eq!(report.protocol(), Some(protocol), "{context}");
    assert_eq!(
        report.cmdline().as_deref(),
        Some(cmdline.as_str()),
        "{context}"
    );

    let info = report
        .initrd()
        .unwrap_or_else(|| panic!("no initrd: {context}"));
    assert_eq!(info.size, initrd.len() as u64, "{context}");
    assert_eq!(info.fnv1a64, fnv1a64(&initrd), "{context}");
    let memmap = report.memmap();
    let in_ram = memmap
        .iter()
        .any(|r| r.kind == "ram" && r.start <= info.addr && info.addr + info.size <= r.end);
    assert!(in_ram, "initrd outside RAM: {context}");
    let ram = report.ram_bytes().unwrap_or(0);
    assert!(
        (250 << 20..=256 << 20).contains(&ram),
        "ram_bytes={ram}: {context}"
    );

    let rsdp = report
        .rsdp()
        .unwrap_or_else(|| panic!("no RSDP: {context}"));
    assert_eq!(rsdp.checksum, Checksum::Ok, "{context}");
    let tables = report.acpi_tables();
    for table in &tables {
        let expected = if table.signature == "FACS" {
            Checksum::None
        } else {
            Checksum::Ok
        };
        assert_eq!(table.checksum, expected, "{table:?}: {context}");
    }
    for signature in ["FACP", "APIC", "DSDT"] {
        assert!(
            report.acpi_table(signature).is_some(),
            "no {signature}: {context}"
        );
    }
    assert!(
        report.ioapics().iter().any(|io| io.addr == 0xfec0_0000),
        "{context}"
    );

    assert_eq!(report.cpus(), Some(2), "{context}");
    assert_eq!(report.aps_online().len(), 1, "{context}");
    assert_eq!(report.ap_timeouts(), Vec::<u64>::new(), "{context}");
    assert_eq!(report.smp(), Some((1, 1)), "{context}");

    assert!(report.finished(), "no 'probe: done': {context}");
    let off = report
        .poweroff()
        .unwrap_or_else(|| panic!("no poweroff line: {context}"));
    assert_eq!(off.method, poweroff_method, "{context}");
    assert!(!report.poweroff_failed(), "{context}");
    assert!(
        run.exited_cleanly(),
        "QEMU did not power off by itself: {context}"
    );
}

#[test]
fn pvh_probe_under_qemu_microvm() {
    check_machine("microvm,acpi=on", "", "pvh", "sleep_control");
}

#[test]
fn pvh_probe_under_qemu_q35() {
    check_machine("q35", "", "pvh", "pm1");
}

/// QEMU cannot boot an ELF through the Linux 64-bit protocol, so the PVH
/// probe rebuilds a `boot_params` from its start info and re-enters itself
/// at `linux64_start`: the linux64 entry and `boot_params` parsing must then
/// report the same facts.
#[test]
fn linux64_entry_relaunched_under_qemu_microvm() {
    check_machine(
        "microvm,acpi=on",
        " probe.relaunch=linux64",
        "linux64",
        "sleep_control",
    );
}

#[test]
fn probe_elfs_have_their_entry_points() {
    let pvh = zvmm_tests::probe::elf_summary(&probe_elf(Flavour::Pvh)).unwrap();
    let linux64 = zvmm_tests::probe::elf_summary(&probe_elf(Flavour::Linux64)).unwrap();
    assert_eq!(
        pvh.pvh_entry,
        Some(pvh.entry),
        "PVH note points at the 32-bit entry"
    );
    assert_eq!(linux64.pvh_entry, None, "linux64 flavour has no PVH note");
    assert_ne!(
        linux64.entry, pvh.entry,
        "linux64 enters at its 64-bit entry"
    );
    for summary in [&pvh, &linux64] {
        assert!(
            summary.loads.iter().all(|&(paddr, _)| paddr >= 0x10_0000),
            "{summary:?}"
        );
        let (start, end) = (
            summary.loads[0].0,
            summary.loads.iter().map(|l| l.0 + l.1).max().unwrap(),
        );
        assert!(start == 0x10_0000 && end < 0x100_0000, "{summary:?}");
        assert!((start..end).contains(&summary.entry), "{summary:?}");
    }
}
