//! The Debian cloud kernel under zvmm: vmlinux extracted from the
//! package's bzImage by zvmm's own code, booted through PVH with
//! `earlyprintk`; the kernel's own log lines must show our command line,
//! our e820 map, our ACPI tables and our CPU count.
//!
//! On this project's CI host /dev/kvm is KVM-PVM, where a stock kernel
//! cannot finish booting (it dies in PVM's instruction emulator) and its
//! early boot takes tens of seconds, so the test stops the VM once the
//! lines it needs have appeared. The full boot to a busybox shell is the
//! ignored test at the bottom; run it on a host with VT-x or AMD-V:
//! `cargo test -p zvmm-tests --test debian_kernel -- --ignored`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use loader::layout::{memory_map, MemoryKind};
use zvmm_tests::assets::debian_bzimage;
use zvmm_tests::zvmm::{scratch_dir, zvmm_bin};

const MEMORY: u64 = 512 << 20;
/// Early boot up to the SMP line takes about 40 s on KVM-PVM.
const BUDGET: Duration = Duration::from_secs(240);

/// The vmlinux inside the Debian bzImage, extracted with `loader::extract`
/// once per test process.
fn debian_vmlinux() -> PathBuf {
    static VMLINUX: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VMLINUX.get_or_init(extract_debian_vmlinux).clone()
}

fn extract_debian_vmlinux() -> PathBuf {
    let image = std::fs::read(debian_bzimage()).expect("cannot read the Debian bzImage");
    let vmlinux = loader::extract::extract_vmlinux(&image).expect("extracting vmlinux failed");
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    let path = scratch_dir("debian-vmlinux").join("vmlinux");
    std::fs::write(&path, vmlinux).expect("cannot write vmlinux");
    path
}

/// The e820 lines Linux prints for zvmm's memory map.
fn expected_e820_lines(ram: u64) -> Vec<String> {
    memory_map(ram)
        .iter()
        .map(|range| {
            let kind = match range.kind {
                MemoryKind::Ram => "usable",
                MemoryKind::Reserved => "reserved",
                MemoryKind::Acpi => "ACPI data",
            };
            format!(
                "BIOS-e820: [mem {:#018x}-{:#018x}] {kind}",
                range.start,
                range.start + range.size - 1
            )
        })
        .collect()
}

/// Runs zvmm until every line in `wanted` was printed (or the budget ran
/// out), then kills it; returns the console log.
fn boot_until(args: &[String], wanted: &[String]) -> (String, Vec<String>) {
    let mut child = Command::new(zvmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start zvmm");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BUDGET;
    let mut log = String::new();
    let mut missing: Vec<String> = wanted.to_vec();
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                missing.retain(|w| !line.contains(w.as_str()));
                log.push_str(&line);
                log.push('\n');
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    (log, missing)
}

#[test]
fn debian_kernel_early_boot_sees_our_platform() {
    let vmlinux = debian_vmlinux();
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 zvmm.test=debian-early";
    let args: Vec<String> = vec![
        "--kernel".into(),
        vmlinux.display().to_string(),
        "--cmdline".into(),
        cmdline.into(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "512M".into(),
        "--no-reboot".into(),
    ];
    let mut wanted = vec![format!("Command line: {cmdline}")];
    wanted.extend(expected_e820_lines(MEMORY));
    wanted.extend(
        [
            "ACPI: RSDP 0x00000000000E0000 000024 (v02 ZVMM  )",
            "ACPI: XSDT 0x",
            "ACPI: FACP 0x",
            "ACPI: DSDT 0x",
            "ACPI: APIC 0x",
            "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
            "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
        ]
        .map(String::from),
    );
    let started = Instant::now();
    let (log, missing) = boot_until(&args, &wanted);
    assert!(
        missing.is_empty(),
        "after {:?} the kernel had not printed {missing:#?}\nconsole:\n{log}",
        started.elapsed()
    );
    assert!(!log.contains("Kernel panic"), "{log}");
    eprintln!(
        "Debian kernel early boot verified in {:?}",
        started.elapsed()
    );
}

/// A kernel that prints nothing before the timeout (no console on its
/// command line) gets a hint naming the console options.
#[test]
fn silent_kernel_gets_a_console_hint() {
    let vmlinux = debian_vmlinux();
    let output = Command::new(zvmm_bin())
        .args([
            "--kernel",
            &vmlinux.display().to_string(),
            "--cmdline",
            "quiet",
        ])
        .args(["--memory", "256M", "--timeout", "2"])
        .stdin(Stdio::null())
        .output()
        .expect("cannot run zvmm");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(124), "{stderr}");
    assert!(output.stdout.is_empty(), "{stderr}");
    assert!(
        stderr.contains("zvmm: hint: the guest printed nothing and its command line names no serial console; add console=ttyS0"),
        "{stderr}"
    );
}

/// Full boot of the Debian bzImage with the busybox initramfs to its
/// `/init`, which powers off. Needs hardware virtualization (not KVM-PVM).
#[test]
#[ignore = "needs VT-x/AMD-V; KVM-PVM cannot complete a stock kernel boot"]
fn debian_kernel_boots_busybox_and_powers_off() {
    let bzimage = debian_bzimage();
    let initramfs = zvmm_tests::assets::debian_asset("initramfs.cpio");
    let args: Vec<String> = vec![
        "--kernel".into(),
        bzimage.display().to_string(),
        "--initrd".into(),
        initramfs.display().to_string(),
        "--cmdline".into(),
        "console=ttyS0 panic=-1 zvmm.poweroff".into(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "512M".into(),
        "--no-reboot".into(),
        "--timeout".into(),
        "120".into(),
    ];
    let output = Command::new(zvmm_bin())
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run zvmm");
    let console = String::from_utf8_lossy(&output.stdout);
    assert!(console.contains("zvmm-guest: booted"), "{console}");
    assert!(console.contains("with 2 CPUs"), "{console}");
    assert_eq!(output.status.code(), Some(0), "{console}");
}
