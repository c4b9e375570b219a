//! cloud-init NoCloud seeds built by zvmm, end to end: `zvmm cloud-init
//! build` images read back with mtools (label, file names, contents) and,
//! where present, blkid and file; `--cloud-init` seeds read by the probe
//! guest through virtio-blk as the last, read-only disk (its first 4 KiB
//! — boot sector, FATs, root directory and the head of user-data — must
//! hash like the image the subcommand writes for the same files), leaving
//! nothing behind; and every bad input refused with one line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use zvmm_tests::disk::{line, make_image, SECTOR};
use zvmm_tests::probe::{fnv1a64, probe_elf, ProbeReport};
use zvmm_tests::zvmm::{assert_rejected, run_zvmm, scratch_dir, zvmm_bin, Finished, Running};

/// Hard limit for one VM run.
const LIMIT: Duration = Duration::from_secs(60);
/// Hard limit for a run that builds an image or refuses input.
const QUICK: Duration = Duration::from_secs(10);
/// Exit statuses: usage error, configuration or host error.
const USAGE: i32 = 2;
const CONFIG: i32 = 1;
/// The seed size when the files fit (what host agents make by hand).
const SEED_SIZE: u64 = 2 << 20;

const USER_DATA: &[u8] = b"#cloud-config\nhostname: zvmm-guest\nssh_pwauth: false\n";
const NETWORK_CONFIG: &[u8] = b"version: 2\nethernets:\n  eth0:\n    dhcp4: true\n";

/// A scratch directory holding `user-data` and `network-config` (and
/// `meta-data` when given).
fn seed_dir(test: &str, meta_data: Option<&[u8]>) -> PathBuf {
    let dir = scratch_dir(&format!("cloud-init-{test}"));
    std::fs::write(dir.join("user-data"), USER_DATA).unwrap();
    std::fs::write(dir.join("network-config"), NETWORK_CONFIG).unwrap();
    if let Some(meta_data) = meta_data {
        std::fs::write(dir.join("meta-data"), meta_data).unwrap();
    }
    dir
}

/// `zvmm cloud-init build ARGS... -o OUTPUT`.
fn build(args: &[String], output: &Path) -> Finished {
    let mut all = vec!["cloud-init".to_string(), "build".into()];
    all.extend(args.iter().cloned());
    all.extend(["-o".into(), output.display().to_string()]);
    run_zvmm(&all, QUICK)
}

fn build_ok(args: &[String], output: &Path) -> Vec<u8> {
    let run = build(args, output);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(run.stderr.contains("labelled CIDATA"), "{run:#?}");
    std::fs::read(output).unwrap()
}

/// Runs an mtools command on `image`; its stdout.
fn mtools(tool: &str, image: &Path, args: &[&str]) -> String {
    let output = Command::new(tool)
        .arg("-i")
        .arg(image)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool}: {e} (install mtools: bash resources/install-host-deps.sh)")
        });
    assert!(output.status.success(), "{tool} {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The files of `image`'s root directory as `mdir -b` lists them.
fn root_files(image: &Path) -> Vec<String> {
    mtools("mdir", image, &["-b", "::"])
        .lines()
        .map(|l| l.trim_start_matches("::/").to_string())
        .collect()
}

/// A tool's stdout, or `None` when the tool is not installed.
fn optional_tool(tool: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(tool).args(args).output().ok()?;
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn built_seed_reads_back_with_mtools() {
    let dir = seed_dir("mtools", None);
    let image = dir.join("seed.img");
    let args = vec![
        format!("user-data={}", dir.join("user-data").display()),
        format!("network-config={}", dir.join("network-config").display()),
    ];
    let bytes = build_ok(&args, &image);
    assert_eq!(bytes.len() as u64, SEED_SIZE);

    let label = mtools("mlabel", &image, &["-s", "::"]);
    assert_eq!(label.trim(), "Volume label is CIDATA", "{label:?}");
    assert_eq!(
        root_files(&image),
        ["user-data", "meta-data", "network-config"]
    );
    let listing = mtools("mdir", &image, &["::"]);
    assert!(listing.contains("Volume in drive : is CIDATA"), "{listing}");
    assert!(listing.contains("1980-01-01"), "valid dates: {listing}");
    assert_eq!(
        mtools("mtype", &image, &["::user-data"]).as_bytes(),
        USER_DATA
    );
    let net = mtools("mtype", &image, &["::network-config"]);
    assert_eq!(net.as_bytes(), NETWORK_CONFIG);
    let meta = mtools("mtype", &image, &["::meta-data"]);
    assert!(meta.starts_with("instance-id: iid-zvmm-"), "{meta}");
    assert!(meta.contains("local-hostname: zvmm\n"), "{meta}");

    let path = image.display().to_string();
    if let Some(blkid) = optional_tool("blkid", &[&path]) {
        assert!(blkid.contains(r#"LABEL="CIDATA""#), "{blkid}");
        assert!(blkid.contains(r#"TYPE="vfat""#), "{blkid}");
    }
    if let Some(file) = optional_tool("file", &[&path]) {
        assert!(file.contains("FAT (12 bit)"), "{file}");
        assert!(file.contains(r#"label: "CIDATA     ""#), "{file}");
    }

    // The same files, given separately or as a directory: the same image.
    let joined = vec![args.join(",")];
    assert!(build_ok(&joined, &dir.join("joined.img")) == bytes);
    let from_dir = vec![format!("dir={}", dir.display())];
    let dir_image = build_ok(&from_dir, &dir.join("dir.img"));
    assert!(dir_image == bytes, "dir= differs");
}

#[test]
fn a_given_meta_data_is_kept_and_large_files_grow_the_seed() {
    let meta_data = b"instance-id: i-0123\nlocal-hostname: web1\n";
    let dir = seed_dir("large", Some(meta_data));
    let vendor: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.join("vendor-data"), &vendor).unwrap();
    let image = dir.join("seed.img");
    let bytes = build_ok(&[format!("dir={}", dir.display())], &image);
    let size = bytes.len() as u64;
    assert!(size > vendor.len() as u64 && size <= 5 << 20, "{size}");
    assert_eq!(
        root_files(&image),
        ["user-data", "meta-data", "network-config", "vendor-data"]
    );
    assert_eq!(
        mtools("mtype", &image, &["::meta-data"]).as_bytes(),
        meta_data
    );
    let copy = dir.join("vendor-copy");
    let target = copy.display().to_string();
    mtools("mcopy", &image, &["::vendor-data", &target]);
    assert!(
        std::fs::read(&copy).unwrap() == vendor,
        "vendor-data differs"
    );
}

/// zvmm arguments booting the PVH probe with `extra` appended.
fn probe_args(extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        probe_elf(zvmm_tests::probe::Flavour::Pvh)
            .display()
            .to_string(),
        "--memory".into(),
        "256M".into(),
        "--timeout".into(),
        "50".into(),
        "--cmdline".into(),
        "console=ttyS0 probe.blk.write=2048:8".into(),
    ];
    args.extend(extra.iter().cloned());
    args
}

/// The probe sees the seed as the last virtio-blk disk, read-only, with
/// serial `cidata`, the size and first 4 KiB of the image the subcommand
/// writes for the same files; its write is refused; zvmm leaves no file in
/// its temp directory.
#[test]
fn the_guest_reads_the_seed_as_the_last_read_only_disk() {
    let dir = seed_dir("guest", None);
    let expected = build_ok(&[format!("dir={}", dir.display())], &dir.join("seed.img"));
    let head = USER_DATA.len();
    assert!(
        expected[6 * 512..6 * 512 + head] == *USER_DATA,
        "user-data is inside the 4 KiB the probe reads"
    );
    let disk = dir.join("data.img");
    make_image(&disk, 4 << 20, &[]);
    let tmp = dir.join("tmp");
    std::fs::create_dir(&tmp).unwrap();

    let args = probe_args(&[
        "--disk".into(),
        disk.display().to_string(),
        "--cloud-init".into(),
        format!("dir={}", dir.display()),
    ]);
    let mut command = Command::new(zvmm_bin());
    command.args(&args).env("TMPDIR", &tmp);
    let run = Running::spawn(command).finish(LIMIT);
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("zvmm {args:?}: {run:#?}");
    let context = context.as_str();
    assert!(report.finished(), "no 'probe: done': {context}");
    assert_eq!(run.code(), 0, "{context}");

    assert_eq!(report.value("blk devices="), Some("2"), "{context}");
    let stem = "blk slot=2";
    let config = line(&report, stem, "capacity=", context);
    assert_eq!(
        config.num("capacity"),
        Some(SEED_SIZE / SECTOR),
        "{context}"
    );
    assert_eq!(config.get("ro"), Some("1"), "{context}");
    assert_eq!(
        line(&report, stem, "id=", context).get("id"),
        Some("cidata")
    );
    let read = line(&report, stem, "read sector=0 ", context);
    assert_eq!(read.get("status"), Some("ok"), "{context}");
    assert_eq!(
        read.num("fnv1a64"),
        Some(fnv1a64(&expected[..4096])),
        "{context}"
    );
    let write = line(&report, stem, "write ", context);
    assert_eq!(write.get("status"), Some("ioerr"), "{context}");
    let first = line(&report, "blk slot=1", "capacity=", context);
    assert_eq!(
        first.get("ro"),
        Some("0"),
        "the --disk comes first: {context}"
    );

    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
}

// ---- bad input ------------------------------------------------------------

/// A VM run with `--cloud-init VALUE`, refused with `code` and one line
/// holding `needles`.
fn check_refused(value: &str, code: i32, needles: &[&str]) {
    let run = run_zvmm(probe_args(&["--cloud-init".into(), value.into()]), QUICK);
    assert_rejected(&run, code, needles);
}

#[test]
fn missing_user_data() {
    let path = scratch_dir("cloud-init-missing").join("user-data");
    let value = format!("user-data={}", path.display());
    let shown = path.display().to_string();
    check_refused(
        &value,
        CONFIG,
        &["cloud-init user-data", &shown, "no such file"],
    );
}

#[test]
fn user_data_that_is_a_directory() {
    let dir = scratch_dir("cloud-init-is-dir");
    let shown = dir.display().to_string();
    let hint = format!("dir={shown}");
    check_refused(&shown, CONFIG, &["is a directory", &hint]);
}

#[test]
fn unreadable_user_data() {
    // A regular file whose first read fails, even for root.
    check_refused(
        "user-data=/proc/self/mem",
        CONFIG,
        &["cannot read cloud-init user-data /proc/self/mem", "error"],
    );
}

#[test]
fn seed_directory_without_user_data() {
    let dir = scratch_dir("cloud-init-no-user-data");
    std::fs::write(dir.join("meta-data"), b"instance-id: x\n").unwrap();
    let shown = dir.display().to_string();
    check_refused(
        &format!("dir={shown}"),
        CONFIG,
        &[&shown, "has no user-data file"],
    );
}

#[test]
fn unknown_keys_and_mixed_forms() {
    check_refused(
        "user-data=/x,hostname=web",
        USAGE,
        &["--cloud-init", "unknown key 'hostname'"],
    );
    check_refused("dir=/a,user-data=/b", USAGE, &["--cloud-init", "not both"]);
    check_refused(
        "meta-data=/m",
        USAGE,
        &["user-data=FILE (or dir=DIR) is required"],
    );
}

#[test]
fn user_data_larger_than_a_seed_holds() {
    let path = scratch_dir("cloud-init-too-large").join("user-data");
    std::fs::File::create(&path)
        .unwrap()
        .set_len((64 << 20) + 1)
        .unwrap();
    let value = format!("user-data={}", path.display());
    check_refused(&value, CONFIG, &["is 67108865 bytes", "at most 64 MiB"]);
}

#[test]
fn build_refuses_an_existing_output_unless_forced() {
    let dir = seed_dir("exists", None);
    let output = dir.join("seed.img");
    std::fs::write(&output, b"precious").unwrap();
    let args = vec![format!("dir={}", dir.display())];
    let run = build(&args, &output);
    let shown = output.display().to_string();
    assert_rejected(&run, CONFIG, &[&shown, "exists; pass --force"]);
    assert_eq!(std::fs::read(&output).unwrap(), b"precious");

    let mut forced = args.clone();
    forced.push("--force".into());
    let bytes = build_ok(&forced, &output);
    assert_eq!(bytes.len() as u64, SEED_SIZE);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(names.is_empty(), "temp files left: {names:?}");

    let bad = build(&["user-data=/x,colour=red".into()], &dir.join("x.img"));
    assert_rejected(&bad, USAGE, &["unknown key 'colour'"]);
    assert!(!dir.join("x.img").exists());
}
