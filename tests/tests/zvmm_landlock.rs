//! Landlock end to end: once the VM runs, zvmm's threads cannot open a
//! path its configuration does not name (the `ZVMM_LANDLOCK_SELFTEST`
//! hook makes the first vCPU thread try, after restricting itself, and
//! print the outcome), while a boot with a disk, a virtio-fs share and
//! vsock works with Landlock on; `--landlock off` lifts it and
//! `--landlock-rules` is refused by name. Needs a kernel with Landlock:
//! the tests fail, saying so, where it is missing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use zvmm_tests::fs::virtiofsd_bin;
use zvmm_tests::probe::probe_stdio_args;
use zvmm_tests::zvmm::{run_with_limit, run_zvmm, scratch_dir, zvmm_bin, Finished};

const LIMIT: Duration = Duration::from_secs(90);

fn require_landlock() {
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns the
    // ABI version or an error.
    let abi = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, 0usize, 0usize, 1usize) };
    assert!(
        abi >= 1,
        "this kernel has no Landlock (landlock_create_ruleset: {}); the Landlock tests need it",
        std::io::Error::last_os_error()
    );
}

fn run_selftest(path: &Path, args: &[String]) -> Finished {
    let mut command = Command::new(zvmm_bin());
    command.args(args).env("ZVMM_LANDLOCK_SELFTEST", path);
    run_with_limit(command, LIMIT)
}

/// A disk, a virtio-fs share served by a virtiofsd zvmm starts, vsock.
fn devices(dir: &Path) -> Vec<String> {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let virtiofsd = virtiofsd_bin().unwrap_or_else(|e| panic!("{e}"));
    vec![
        "--disk".into(),
        format!("path={}", disk.display()),
        "--fs".into(),
        format!("tag=t,path={}", share.display()),
        "--virtiofsd".into(),
        virtiofsd.display().to_string(),
        "--vsock".into(),
        format!("cid=3,socket={}", dir.join("v.sock").display()),
    ]
}

#[test]
fn a_path_outside_the_configuration_cannot_be_opened() {
    require_landlock();
    let dir = scratch_dir("landlock-outside");
    let outside = dir.join("secret");
    std::fs::write(&outside, b"not for the VM").unwrap();
    let run = run_selftest(&outside, &probe_stdio_args(&devices(&dir)));
    assert_eq!(run.code(), 0, "{run:#?}");
    let expected = format!(
        "zvmm: landlock self-test: cannot open {}: Permission denied",
        outside.display()
    );
    assert!(run.stderr.contains(&expected), "{run:#?}");
    // The same file opens without Landlock: the refusal was Landlock's.
    let mut args = probe_stdio_args(&devices(&dir));
    args.extend(["--landlock".into(), "off".into()]);
    let run = run_selftest(&outside, &args);
    assert_eq!(run.code(), 0, "{run:#?}");
    let opened = format!("zvmm: landlock self-test: opened {}", outside.display());
    assert!(run.stderr.contains(&opened), "{run:#?}");
}

#[test]
fn a_path_the_configuration_names_can_be_opened() {
    require_landlock();
    let dir = scratch_dir("landlock-inside");
    let args = probe_stdio_args(&devices(&dir));
    let disk = dir.join("disk.img");
    let run = run_selftest(&disk, &args);
    assert_eq!(run.code(), 0, "{run:#?}");
    let opened = format!("zvmm: landlock self-test: opened {}", disk.display());
    assert!(run.stderr.contains(&opened), "{run:#?}");
    let run = run_selftest(Path::new("/etc/hostname"), &args);
    assert!(
        run.stderr
            .contains("landlock self-test: cannot open /etc/hostname: Permission denied"),
        "{run:#?}"
    );
}

#[test]
fn a_boot_with_disk_share_and_vsock_works_with_landlock_on() {
    require_landlock();
    let dir = scratch_dir("landlock-boot");
    let mut args = probe_stdio_args(&devices(&dir));
    args.extend(["--landlock".into(), "on".into()]);
    let run = run_zvmm(&args, LIMIT);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(run.stdout.contains("probe: done"), "{run:#?}");
    assert!(!dir.join("v.sock").exists(), "vsock socket left: {run:#?}");
}

#[test]
fn landlock_options_are_checked() {
    let dir = scratch_dir("landlock-options");
    let mut args = probe_stdio_args(&[]);
    args.extend([
        "--landlock-rules".into(),
        format!("path={},access=rw", dir.display()),
    ]);
    let run = run_zvmm(&args, LIMIT);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains("--landlock-rules"), "{run:#?}");
    let mut args = probe_stdio_args(&[]);
    args.extend(["--landlock".into(), "maybe".into()]);
    let run = run_zvmm(&args, LIMIT);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(
        run.stderr.contains("--landlock maybe: expected on or off"),
        "{run:#?}"
    );
}
