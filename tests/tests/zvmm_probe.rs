//! The probe guest booted by zvmm: everything it reports (command line,
//! memory map, initrd, ACPI tables, CPUs, the all-ones read of an unclaimed
//! port, ACPI power-off) must match what the test handed zvmm, for both
//! boot protocols, several vCPU counts and memory sizes, and agree with
//! QEMU's microvm on the facts that do not depend on the machine layout.

use std::path::PathBuf;
use std::time::Duration;

use loader::layout::{self, MemoryKind};
use zvmm_tests::probe::{
    fnv1a64, probe_elf, test_bytes, Checksum, Flavour, MemmapEntry, ProbeReport,
};
use zvmm_tests::qemu;
use zvmm_tests::zvmm::{run_zvmm, scratch_dir, Finished};

/// Hard limit for one zvmm run (the probe needs ~0.2 s).
const LIMIT: Duration = Duration::from_secs(20);
/// A clean probe boot must be over well within this.
const FAST: Duration = Duration::from_secs(3);
/// Initrd length: odd, more than one page. The probe hashes it byte by
/// byte, which costs ~12 µs a byte on KVM-PVM, so it stays small.
const INITRD_LEN: usize = 5003;
/// I/O port nothing claims (COM2): must read as all-ones.
const UNCLAIMED_PORT: u16 = 0x2f8;

/// One probe boot on zvmm and what it is expected to show.
struct Boot {
    name: &'static str,
    flavour: Flavour,
    cpus: u8,
    memory: &'static str,
    ram_size: u64,
    /// zvmm options beyond kernel, initrd, command line, CPUs and memory.
    extra: &'static [&'static str],
}

/// What one boot left behind.
struct Booted {
    run: Finished,
    report: ProbeReport,
    cmdline: String,
    initrd: Vec<u8>,
}

impl Booted {
    fn context(&self) -> String {
        format!("{:#?}", self.run)
    }
}

/// A command line with quotes, spaces, a tab and shell metacharacters,
/// unique per test.
fn tricky_cmdline(name: &str) -> String {
    format!(
        "console=ttyS0 probe.token={name}-{} q=\"a b\" back\\slash  two  spaces \
         tab=\t! #%*+,-./:;<=>?@[]^_`{{|}}~ $HOME 'single' &&end",
        std::process::id()
    )
}

/// Writes `bytes` as the initrd of test `name`.
fn initrd_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir(name).join("initrd");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn boot(spec: &Boot) -> Booted {
    let cmdline = tricky_cmdline(spec.name);
    let initrd = test_bytes(INITRD_LEN, fnv1a64(spec.name.as_bytes()));
    let initrd_path = initrd_file(spec.name, &initrd);
    let cpus = spec.cpus.to_string();
    let kernel = probe_elf(spec.flavour);
    let args: Vec<std::ffi::OsString> = vec![
        "--kernel".into(),
        kernel.into(),
        "--initrd".into(),
        initrd_path.into(),
        "--cmdline".into(),
        cmdline.clone().into(),
        "--cpus".into(),
        cpus.into(),
        "--memory".into(),
        spec.memory.into(),
    ];
    let args: Vec<std::ffi::OsString> = args
        .into_iter()
        .chain(spec.extra.iter().map(Into::into))
        .collect();
    let run = run_zvmm(&args, LIMIT);
    eprintln!("{}: zvmm ran {:?}", spec.name, run.elapsed);
    let report = ProbeReport::parse(&run.stdout);
    Booted {
        run,
        report,
        cmdline,
        initrd,
    }
}

/// Checks every fact of a clean boot of `spec`.
fn check_clean_boot(spec: &Boot, booted: &Booted) {
    let (run, report, context) = (&booted.run, &booted.report, booted.context());
    assert_eq!(run.code(), 0, "{context}");
    assert_eq!(run.stderr, "", "{context}");
    assert!(run.elapsed < FAST, "took {:?}: {context}", run.elapsed);
    assert!(report.started(), "{context}");
    assert_eq!(report.starts(), 1, "{context}");
    assert_eq!(report.panic_message(), None, "{context}");
    assert_eq!(
        report.protocol(),
        Some(spec.flavour.protocol()),
        "{context}"
    );
    assert_eq!(
        report.cmdline().as_deref(),
        Some(booted.cmdline.as_str()),
        "{context}"
    );
    check_initrd(report, &booted.initrd, spec.ram_size, &context);
    check_memmap(report, spec.ram_size, &context);
    check_acpi(report, &context);
    check_cpus(report, spec.cpus, &context);
    assert_eq!(report.port_value(UNCLAIMED_PORT), Some(0xff), "{context}");
    let pit_wanted = spec.extra.windows(2).any(|w| w == ["--pit", "on"]);
    assert_eq!(report.pit_present(), Some(pit_wanted), "{context}");
    assert!(report.finished(), "{context}");
    let off = report.poweroff().unwrap_or_else(|| panic!("{context}"));
    assert_eq!((off.method.as_str(), off.slp_typ), ("sleep_control", 5));
    assert!(!report.poweroff_failed(), "{context}");
}

fn check_initrd(report: &ProbeReport, initrd: &[u8], ram_size: u64, context: &str) {
    let info = report.initrd().unwrap_or_else(|| panic!("{context}"));
    assert_eq!(info.size, initrd.len() as u64, "{context}");
    assert_eq!(info.fnv1a64, fnv1a64(initrd), "{context}");
    assert_eq!(info.addr % layout::PAGE_SIZE, 0, "{context}");
    let low_end = layout::low_ram_end(ram_size);
    assert!(info.addr + info.size <= low_end, "{context}");
    assert!(
        info.addr + info.size > low_end - layout::PAGE_SIZE * 4,
        "initrd not at the top of low RAM: {context}"
    );
}

/// The memory map equals `loader::layout::memory_map` and has the PC shape.
fn check_memmap(report: &ProbeReport, ram_size: u64, context: &str) {
    let expected: Vec<MemmapEntry> = layout::memory_map(ram_size)
        .iter()
        .map(|r| MemmapEntry {
            start: r.start,
            end: r.start + r.size,
            kind: match r.kind {
                MemoryKind::Ram => "ram",
                MemoryKind::Reserved => "reserved",
                MemoryKind::Acpi => "acpi",
            }
            .into(),
        })
        .collect();
    let map = report.memmap();
    assert_eq!(map, expected, "{context}");
    let entry = |start: u64| map.iter().find(|e| e.start == start);
    let low = entry(0).unwrap_or_else(|| panic!("{context}"));
    assert_eq!((low.end, low.kind.as_str()), (layout::EBDA_START, "ram"));
    let ebda = entry(layout::EBDA_START).unwrap_or_else(|| panic!("{context}"));
    assert_eq!(
        (ebda.end, ebda.kind.as_str()),
        (layout::ACPI_START, "reserved")
    );
    let acpi = entry(layout::ACPI_START).unwrap_or_else(|| panic!("{context}"));
    assert_eq!((acpi.end, acpi.kind.as_str()), (layout::ACPI_END, "acpi"));
    let high = entry(layout::HIGH_RAM_START).unwrap_or_else(|| panic!("{context}"));
    assert_eq!(high.kind, "ram", "{context}");
    assert_eq!(high.end, ram_size.min(layout::MMIO32_START), "{context}");
    let ram: u64 = map
        .iter()
        .filter(|e| e.kind == "ram")
        .map(|e| e.end - e.start)
        .sum();
    let legacy_hole = layout::HIGH_RAM_START - layout::EBDA_START;
    assert_eq!(ram, ram_size - legacy_hole, "{context}");
    assert_eq!(report.ram_bytes(), Some(ram), "{context}");
}

fn check_acpi(report: &ProbeReport, context: &str) {
    let rsdp = report.rsdp().unwrap_or_else(|| panic!("{context}"));
    assert_eq!(
        (rsdp.revision, rsdp.checksum),
        (2, Checksum::Ok),
        "{context}"
    );
    let tables = report.acpi_tables();
    assert!(!tables.is_empty(), "{context}");
    for table in &tables {
        let expected = if table.signature == "FACS" {
            Checksum::None
        } else {
            Checksum::Ok
        };
        assert_eq!(table.checksum, expected, "{table:?}: {context}");
        assert!(
            (layout::ACPI_START..layout::ACPI_END).contains(&table.addr),
            "{table:?} outside the ACPI area: {context}"
        );
    }
    for signature in ["XSDT", "FACP", "APIC", "DSDT"] {
        assert!(
            report.acpi_table(signature).is_some(),
            "no {signature}: {context}"
        );
    }
    assert!(!report.has("acpi rsdp none"), "{context}");
    assert!(
        report
            .ioapics()
            .iter()
            .any(|io| io.addr == layout::IOAPIC_START),
        "{context}"
    );
}

fn check_cpus(report: &ProbeReport, cpus: u8, context: &str) {
    let cpus = u64::from(cpus);
    assert_eq!(report.cpus(), Some(cpus), "{context}");
    assert_eq!(
        report.cpu_apic_ids(),
        (0..cpus).collect::<Vec<_>>(),
        "{context}"
    );
    let mut online = report.aps_online();
    online.sort_unstable();
    assert_eq!(online, (1..cpus).collect::<Vec<_>>(), "{context}");
    assert_eq!(report.ap_timeouts(), Vec::<u64>::new(), "{context}");
    assert_eq!(report.smp(), Some((cpus - 1, cpus - 1)), "{context}");
}

fn pvh(name: &'static str, cpus: u8) -> Boot {
    Boot {
        name,
        flavour: Flavour::Pvh,
        cpus,
        memory: "256M",
        ram_size: 256 << 20,
        extra: &[],
    }
}

#[test]
fn pvh_probe_on_1_vcpu() {
    let spec = pvh("pvh-1cpu", 1);
    check_clean_boot(&spec, &boot(&spec));
}

#[test]
fn pvh_probe_on_2_vcpus() {
    let spec = pvh("pvh-2cpus", 2);
    check_clean_boot(&spec, &boot(&spec));
}

#[test]
fn pvh_probe_on_4_vcpus() {
    let spec = pvh("pvh-4cpus", 4);
    check_clean_boot(&spec, &boot(&spec));
}

/// No PIT by default (ports 0x40-0x43 read all-ones, see
/// `check_clean_boot`); `--pit on` gives the guest KVM's i8254.
#[test]
fn pit_on_gives_the_guest_an_i8254() {
    let spec = Boot {
        extra: &["--pit", "on"],
        ..pvh("pvh-pit", 1)
    };
    let booted = boot(&spec);
    check_clean_boot(&spec, &booted);
    assert_eq!(
        booted.report.pit_present(),
        Some(true),
        "{}",
        booted.context()
    );
}

/// 5 GiB: RAM below the 32-bit hole up to 0xc000_0000, the remaining
/// 2 GiB from 4 GiB; the initrd at the top of the low part.
#[test]
fn memory_above_4g_is_split_around_the_hole() {
    let spec = Boot {
        name: "pvh-5g",
        flavour: Flavour::Pvh,
        cpus: 2,
        memory: "5G",
        ram_size: 5 << 30,
        extra: &[],
    };
    let booted = boot(&spec);
    check_clean_boot(&spec, &booted);
    let map = booted.report.memmap();
    let context = booted.context();
    let low = map.iter().find(|e| e.start == layout::HIGH_RAM_START);
    assert_eq!(low.map(|e| e.end), Some(layout::MMIO32_START), "{context}");
    let high = map.iter().find(|e| e.start == layout::FOUR_GIB);
    assert_eq!(
        high.map(|e| (e.end, e.kind.as_str())),
        Some((layout::FOUR_GIB + (2 << 30), "ram")),
        "{context}"
    );
    assert!(
        map.iter()
            .filter(|e| e.kind == "ram")
            .all(|e| e.end <= layout::MMIO32_START || e.start >= layout::FOUR_GIB),
        "RAM in the 32-bit hole: {context}"
    );
}

/// `shared=on` backs RAM with a memfd; the guest must not notice.
#[test]
fn shared_memory_boots_the_same() {
    let spec = Boot {
        name: "pvh-shared",
        flavour: Flavour::Pvh,
        cpus: 2,
        memory: "size=256M,shared=on",
        ram_size: 256 << 20,
        extra: &[],
    };
    check_clean_boot(&spec, &boot(&spec));
}

/// The linux64 flavour has no PVH note: zvmm must boot it through the
/// 64-bit Linux boot protocol (`boot_params`, e820) with the same facts.
#[test]
fn linux64_probe_reports_the_same_facts() {
    let spec = Boot {
        name: "linux64-2cpus",
        flavour: Flavour::Linux64,
        cpus: 2,
        memory: "256M",
        ram_size: 256 << 20,
        extra: &[],
    };
    let booted = boot(&spec);
    check_clean_boot(&spec, &booted);
    assert_eq!(
        booted.report.value("boot boot_params="),
        Some(format!("{:#x}", layout::ZERO_PAGE_START).as_str()),
        "{}",
        booted.context()
    );
}

/// The same probe, initrd and command line on zvmm and on QEMU microvm
/// (2 vCPUs, 256 MiB each): the machine-independent facts must agree.
/// Memory maps and table addresses legitimately differ.
#[test]
fn zvmm_and_qemu_microvm_agree() {
    let spec = pvh("vs-qemu", 2);
    let zvmm = boot(&spec);
    check_clean_boot(&spec, &zvmm);

    let initrd_path = initrd_file("vs-qemu-qemu", &zvmm.initrd);
    let kernel = probe_elf(Flavour::Pvh);
    let args = qemu::boot_args(
        "microvm,acpi=on",
        &kernel,
        Some(&initrd_path),
        &zvmm.cmdline,
    );
    let qemu_run = qemu::run(&args, LIMIT).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("vs-qemu: QEMU ran {:?}", qemu_run.elapsed);
    let theirs = ProbeReport::parse(&qemu_run.stdout);
    let ours = &zvmm.report;
    let context = format!("zvmm: {}\nQEMU: {qemu_run:#?}", zvmm.context());

    assert!(qemu_run.exited_cleanly(), "{context}");
    assert_eq!(theirs.cmdline(), ours.cmdline(), "{context}");
    assert_eq!(theirs.cmdline().as_deref(), Some(zvmm.cmdline.as_str()));
    let checksum = Some(fnv1a64(&zvmm.initrd));
    assert_eq!(theirs.initrd_checksum(), checksum, "{context}");
    assert_eq!(ours.initrd_checksum(), checksum, "{context}");
    assert_eq!(theirs.cpus(), ours.cpus(), "{context}");
    assert_eq!(theirs.cpu_apic_ids(), ours.cpu_apic_ids(), "{context}");
    assert_eq!(theirs.aps_online(), ours.aps_online(), "{context}");
    assert_eq!(theirs.smp(), ours.smp(), "{context}");
    assert_eq!(theirs.port_value(UNCLAIMED_PORT), Some(0xff), "{context}");
    // QEMU's microvm has an i8254 by default: the probe's PIT check works.
    assert_eq!(theirs.pit_present(), Some(true), "{context}");
    for report in [ours, &theirs] {
        assert!(report.finished() && !report.poweroff_failed(), "{context}");
        assert_eq!(report.poweroff().map(|p| p.slp_typ), Some(5), "{context}");
    }
}
