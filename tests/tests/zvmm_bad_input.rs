//! zvmm given bad input, end to end: every case must end quickly with the
//! documented status (2 for usage errors, 1 for configuration and host
//! errors) and exactly one line on stderr that names the offending file or
//! option (and, where it helps, what to do) — never a panic, never guest
//! output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use zvmm_tests::probe::{probe_elf, test_bytes, Flavour};
use zvmm_tests::zvmm::{assert_rejected, run_zvmm, scratch_dir, Finished};

/// Hard limit for one zvmm run (a hung one is killed and the test fails).
const LIMIT: Duration = Duration::from_secs(10);
/// Exit status for a usage error.
const USAGE: i32 = 2;
/// Exit status for a configuration or host error.
const CONFIG: i32 = 1;

/// Runs zvmm with `args` and checks the rejection: status `code`, no
/// stdout, one stderr line containing every one of `needles`.
fn check_rejected<S: AsRef<std::ffi::OsStr>>(args: &[S], code: i32, needles: &[&str]) -> Finished {
    let run = run_zvmm(args, LIMIT);
    assert_rejected(&run, code, needles);
    run
}

/// Arguments booting `kernel` with `extra` appended.
fn kernel_args(kernel: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--kernel".to_string(), kernel.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Arguments booting the probe with `extra` appended.
fn probe_args(extra: &[&str]) -> Vec<String> {
    kernel_args(&probe_elf(Flavour::Pvh), extra)
}

/// A file named `name` holding `bytes` in this test's scratch directory.
fn scratch_file(test: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir(test).join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn check_bad_kernel(kernel: &Path, needles: &[&str]) {
    let path = kernel.display().to_string();
    let mut all = vec![path.as_str()];
    all.extend_from_slice(needles);
    check_rejected(&kernel_args(kernel, &["--memory", "64M"]), CONFIG, &all);
}

#[test]
fn missing_kernel_file() {
    let kernel = scratch_dir("missing-kernel").join("no-such-vmlinux");
    check_bad_kernel(&kernel, &["--kernel"]);
}

#[test]
fn kernel_that_is_a_directory() {
    check_bad_kernel(&scratch_dir("kernel-dir"), &[]);
}

#[test]
fn empty_kernel() {
    check_bad_kernel(&scratch_file("empty-kernel", "vmlinux", b""), &["empty"]);
}

#[test]
fn random_bytes_kernel() {
    let kernel = scratch_file("random-kernel", "vmlinux", &test_bytes(4096, 42));
    check_bad_kernel(&kernel, &["not an ELF"]);
}

/// A gzip-compressed ELF (as some distributions ship `vmlinux.gz`): the
/// message says so and how to decompress it.
#[test]
fn gzip_compressed_kernel() {
    let output = Command::new("gzip")
        .args(["-c", "-n"])
        .arg(probe_elf(Flavour::Pvh))
        .output()
        .unwrap_or_else(|e| panic!("cannot run gzip (apt-get install -y gzip): {e}"));
    assert!(output.status.success(), "gzip failed: {output:?}");
    let kernel = scratch_file("gzip-kernel", "vmlinux.gz", &output.stdout);
    check_bad_kernel(&kernel, &["gzip", "decompress"]);
}

/// A minimal but well-formed ELF32 i386 executable header with one
/// `PT_LOAD` segment.
fn elf32_image() -> Vec<u8> {
    const EHDR_LEN: u16 = 52;
    const PHDR_LEN: u16 = 32;
    let mut image = vec![0x7f, b'E', b'L', b'F', 1, 1, 1, 0];
    image.resize(16, 0);
    let half = |v: u16| v.to_le_bytes().to_vec();
    let word = |v: u32| v.to_le_bytes().to_vec();
    let len = u32::from(EHDR_LEN + PHDR_LEN);
    for field in [
        half(2),                   // e_type: EXEC
        half(3),                   // e_machine: 386
        word(1),                   // e_version
        word(0x10_0000),           // e_entry
        word(u32::from(EHDR_LEN)), // e_phoff
        word(0),                   // e_shoff
        word(0),                   // e_flags
        half(EHDR_LEN),            // e_ehsize
        half(PHDR_LEN),            // e_phentsize
        half(1),                   // e_phnum
        half(40),                  // e_shentsize
        half(0),                   // e_shnum
        half(0),                   // e_shstrndx
        word(1),                   // p_type: LOAD
        word(0),                   // p_offset
        word(0x10_0000),           // p_vaddr
        word(0x10_0000),           // p_paddr
        word(len),                 // p_filesz
        word(len),                 // p_memsz
        word(5),                   // p_flags: R X
        word(0x1000),              // p_align
    ] {
        image.extend(field);
    }
    assert_eq!(image.len(), len as usize);
    image
}

#[test]
fn elf32_kernel() {
    let kernel = scratch_file("elf32-kernel", "vmlinux32", &elf32_image());
    check_bad_kernel(&kernel, &["32-bit"]);
}

/// Creates a FIFO (named pipe) nobody writes to.
fn fifo(test: &str) -> PathBuf {
    let path = scratch_dir(test).join("fifo");
    let c_path = std::ffi::CString::new(path.display().to_string()).unwrap();
    // SAFETY: `c_path` is a valid NUL-terminated string for the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    path
}

/// A FIFO is not a kernel image: opening it for reading would wait for a
/// writer forever, so it must be refused up front.
#[test]
fn kernel_that_is_a_fifo() {
    check_bad_kernel(&fifo("kernel-fifo"), &[]);
}

#[test]
fn initrd_that_is_a_fifo() {
    let path = fifo("initrd-fifo").display().to_string();
    check_rejected(&probe_args(&["--initrd", &path]), CONFIG, &[&path]);
}

#[test]
fn missing_initrd_file() {
    let initrd = scratch_dir("missing-initrd").join("no-such-initrd");
    let path = initrd.display().to_string();
    check_rejected(
        &probe_args(&["--initrd", &path]),
        CONFIG,
        &[&path, "--initrd"],
    );
}

#[test]
fn initrd_that_is_a_directory() {
    let path = scratch_dir("initrd-dir").display().to_string();
    check_rejected(&probe_args(&["--initrd", &path]), CONFIG, &[&path]);
}

/// A (sparse) 1 GiB initrd in a 64 MiB guest: it does not fit, and the
/// message says to raise --memory.
#[test]
fn initrd_larger_than_guest_ram() {
    let initrd = scratch_dir("huge-initrd").join("initrd");
    let file = std::fs::File::create(&initrd).unwrap();
    file.set_len(1 << 30).unwrap();
    let path = initrd.display().to_string();
    check_rejected(
        &probe_args(&["--initrd", &path, "--memory", "64M"]),
        CONFIG,
        &[&path, "does not fit", "--memory"],
    );
}

#[test]
fn memory_size_that_is_not_a_size() {
    check_rejected(
        &probe_args(&["--memory", "size=abc"]),
        USAGE,
        &["--memory", "abc"],
    );
}

#[test]
fn memory_too_small() {
    check_rejected(&probe_args(&["--memory", "1M"]), USAGE, &["--memory"]);
}

#[test]
fn zero_cpus() {
    check_rejected(&probe_args(&["--cpus", "0"]), USAGE, &["--cpus"]);
}

#[test]
fn cpus_that_are_not_a_number() {
    check_rejected(
        &probe_args(&["--cpus", "boot=x"]),
        USAGE,
        &["--cpus", "'x'"],
    );
}

#[test]
fn unknown_serial_mode() {
    check_rejected(
        &probe_args(&["--serial", "bogus"]),
        USAGE,
        &["--serial", "bogus"],
    );
}

#[test]
fn unknown_flag() {
    check_rejected(&probe_args(&["--bogus-flag"]), USAGE, &["--bogus-flag"]);
}

#[test]
fn no_kernel_at_all() {
    check_rejected::<&str>(&[], USAGE, &["--kernel"]);
}

#[test]
fn serial_file_in_a_missing_directory() {
    check_rejected(
        &probe_args(&["--serial", "file=/nonexistent/dir/log"]),
        CONFIG,
        &["--serial", "/nonexistent/dir/log"],
    );
}

/// Longer than the 64 KiB zvmm can hand over: refused before boot, with
/// the limit in the message (and not the command line itself).
#[test]
fn command_line_too_long() {
    let cmdline = "x".repeat(70_000);
    let args = probe_args(&["--cmdline", &cmdline]);
    let run = check_rejected(&args, CONFIG, &["command line", "70000", "65535"]);
    assert!(run.stderr.len() < 1000, "{}", &run.stderr[..1000]);
}

#[test]
fn virtio_console_is_refused() {
    check_rejected(
        &probe_args(&["--console", "tty"]),
        USAGE,
        &["--console", "virtio-console"],
    );
}

/// A subcommand missing its arguments names them all on the one line.
#[test]
fn missing_arguments_are_named() {
    check_rejected(
        &["kernel", "extract"],
        2,
        &["were not provided: --output <PATH>, <BZIMAGE>"],
    );
}
