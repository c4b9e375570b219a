//! `zvmm image` end to end, checked against the reference tools: images
//! made by qemu-img/qemu-io (and partitioned by sfdisk, formatted by
//! mformat/mkfs.ext4), every result read back with `qemu-img info`,
//! `qemu-img compare` and `qemu-img check`, allocated sizes from `stat`
//! (`st_blocks`) and `du` before and after each command (sparse images
//! stay sparse), block devices through a loop device, and a copy killed
//! midway leaving nothing at its destination.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use zvmm_tests::image_tools::{
    allocated, du_bytes, qemu_check, qemu_compare, qemu_img, qemu_info, qemu_io_write, sparse_file,
    tool, LoopDevice, MIB,
};
use zvmm_tests::zvmm::{run_zvmm, scratch_dir, zvmm_bin, Finished, Running};

const GIB: u64 = 1 << 30;
/// Every command here finishes in seconds.
const LIMIT: Duration = Duration::from_secs(120);
/// Slack for file system metadata blocks in allocated sizes.
const SLACK: u64 = 256 * 1024;

fn image<S: AsRef<OsStr>>(args: &[S]) -> Finished {
    let mut all = vec![OsStr::new("image")];
    all.extend(args.iter().map(AsRef::as_ref));
    run_zvmm(all, LIMIT)
}

/// Runs `zvmm image ARGS`, which must succeed.
fn image_ok<S: AsRef<OsStr>>(args: &[S]) -> Finished {
    let run = image(args);
    assert_eq!(run.code(), 0, "zvmm image failed: {run:#?}");
    run
}

/// Runs `zvmm image ARGS`, which must fail with `code` and one line
/// containing every needle.
fn image_refused<S: AsRef<OsStr>>(args: &[S], code: i32, needles: &[&str]) {
    let run = image(args);
    assert_eq!(run.code(), code, "{run:#?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {run:#?}");
    for needle in needles {
        assert!(lines[0].contains(needle), "no {needle:?} in {:?}", lines[0]);
    }
}

fn p(path: &Path) -> &OsStr {
    path.as_os_str()
}

/// Prints an allocated-size row for the test log (the report).
fn log_sizes(what: &str, before: &Path, after: &Path) {
    eprintln!(
        "allocated: {what}: {} {} bytes (du {}) -> {} {} bytes (du {})",
        before.display(),
        allocated(before),
        du_bytes(before),
        after.display(),
        allocated(after),
        du_bytes(after)
    );
}

/// A 1 GiB raw image with 3 MiB written by qemu-io at the start, the
/// middle and the end.
fn sparse_gib(path: &Path) {
    qemu_img([
        "create",
        "-q",
        "-f",
        "raw",
        &path.display().to_string(),
        "1G",
    ]);
    qemu_io_write(
        path,
        "raw",
        &[
            (0xab, 0, MIB),
            (0xcd, 500 * MIB, MIB),
            (0xef, GIB - MIB, MIB),
        ],
    );
}

#[test]
fn copy_keeps_a_sparse_raw_image_sparse() {
    let dir = scratch_dir("image-copy-raw");
    let (src, dst) = (dir.join("src.raw"), dir.join("dst.raw"));
    sparse_gib(&src);
    assert!(
        allocated(&src) <= 3 * MIB + SLACK,
        "qemu-io left {}",
        allocated(&src)
    );
    let run = image_ok(&[OsStr::new("copy"), p(&src), p(&dst)]);
    log_sizes("copy raw", &src, &dst);
    assert!(
        run.stderr.contains("3 MiB of data written"),
        "{}",
        run.stderr
    );
    assert!(qemu_compare(&src, &dst), "contents differ");
    let info = qemu_info(&dst);
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual-size"], GIB);
    assert!(
        allocated(&dst) <= 3 * MIB + SLACK,
        "{} allocated",
        allocated(&dst)
    );
    assert!(du_bytes(&dst) <= 3 * MIB + SLACK);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn copy_reads_qcow2_and_its_backing_chain_into_a_sparse_raw_file() {
    let dir = scratch_dir("image-copy-qcow2");
    let (raw, base, top, flat) = (
        dir.join("src.raw"),
        dir.join("base.qcow2"),
        dir.join("top.qcow2"),
        dir.join("flat.raw"),
    );
    sparse_gib(&raw);
    let d = |path: &Path| path.display().to_string();
    qemu_img(["convert", "-q", "-O", "qcow2", &d(&raw), &d(&base)]);
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &d(&top),
    ]);
    // The overlay changes one megabyte and adds one; the rest shows through.
    qemu_io_write(
        &top,
        "qcow2",
        &[(0x11, 500 * MIB, MIB), (0x22, 700 * MIB, MIB)],
    );
    let run = image_ok(&[OsStr::new("copy"), p(&top), p(&flat)]);
    log_sizes("copy qcow2 overlay", &top, &flat);
    assert!(
        run.stderr.contains("read through 1 backing file"),
        "{}",
        run.stderr
    );
    assert!(qemu_compare(&top, &flat), "contents differ");
    assert!(
        !qemu_compare(&raw, &flat),
        "the overlay's writes are missing"
    );
    assert_eq!(qemu_info(&flat)["virtual-size"], GIB);
    assert!(
        allocated(&flat) <= 4 * MIB + SLACK,
        "{} allocated",
        allocated(&flat)
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn copy_size_grows_the_destination_and_never_shrinks() {
    let dir = scratch_dir("image-copy-size");
    let (src, dst) = (dir.join("src.raw"), dir.join("dst.raw"));
    sparse_gib(&src);
    image_ok(&[
        OsStr::new("copy"),
        p(&src),
        p(&dst),
        OsStr::new("--size"),
        OsStr::new("4G"),
    ]);
    log_sizes("copy --size 4G", &src, &dst);
    assert_eq!(qemu_info(&dst)["virtual-size"], 4 * GIB);
    assert!(
        qemu_compare(&src, &dst),
        "the first GiB differs or the rest is not zero"
    );
    assert!(allocated(&dst) <= 3 * MIB + SLACK);
    let small = dir.join("small.raw");
    image_refused(
        &[
            OsStr::new("copy"),
            p(&src),
            p(&small),
            OsStr::new("--size"),
            OsStr::new("512M"),
        ],
        1,
        &["src.raw", "never shrinks", "1073741824"],
    );
    assert!(!small.exists());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_existing_destination_is_replaced_only_with_force() {
    let dir = scratch_dir("image-force");
    let (src, dst) = (dir.join("src.raw"), dir.join("dst.raw"));
    sparse_file(&src, 8 * MIB, &[(7, MIB, MIB)]);
    fs::write(&dst, b"precious").unwrap();
    for command in ["copy", "convert"] {
        image_refused(
            &[OsStr::new(command), p(&src), p(&dst)],
            1,
            &["dst.raw exists", "--force"],
        );
        assert_eq!(fs::read(&dst).unwrap(), b"precious");
    }
    image_refused(
        &[OsStr::new("create"), p(&dst), OsStr::new("1G")],
        1,
        &["exists"],
    );
    assert_eq!(fs::read(&dst).unwrap(), b"precious");
    image_ok(&[OsStr::new("copy"), p(&src), p(&dst), OsStr::new("--force")]);
    assert!(qemu_compare(&src, &dst));
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["dst.raw", "src.raw"],
        "a temporary file was left behind"
    );
    fs::remove_dir_all(dir).unwrap();
}

/// The unnamed file a running `zvmm image copy` writes (`O_TMPFILE` in
/// `dir`) and its allocated bytes, if it has one open.
fn unnamed_output(pid: u32, dir: &Path) -> Option<u64> {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    fds.filter_map(Result::ok).find_map(|fd| {
        let target = fs::read_link(fd.path()).ok()?;
        let text = target.to_string_lossy();
        let in_dir = target.parent() == Some(dir) && text.ends_with("(deleted)");
        in_dir.then(|| fs::metadata(fd.path()).map(|m| allocated_meta(&m)).ok())?
    })
}

fn allocated_meta(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

#[test]
fn a_copy_killed_midway_leaves_nothing_at_the_destination() {
    let dir = scratch_dir("image-killed");
    let (src, dst) = (dir.join("src.raw"), dir.join("dst.raw"));
    // 64 MiB of data inside 1 GiB; the test-only throttle makes each
    // megabyte take 40 ms, so the copy runs for about 2.5 s.
    let fills: Vec<(u8, u64, u64)> = (0..64).map(|i| (i as u8 + 1, i * 8 * MIB, MIB)).collect();
    sparse_file(&src, GIB, &fills);
    let mut command = Command::new(zvmm_bin());
    command
        .args([OsStr::new("image"), OsStr::new("copy"), p(&src), p(&dst)])
        .env("ZVMM_IMAGE_THROTTLE_MS", "40");
    let mut running = Running::spawn(command);
    let deadline = Instant::now() + Duration::from_secs(20);
    let written = loop {
        match unnamed_output(running.pid(), &dir) {
            Some(bytes) if bytes >= 8 * MIB => break bytes,
            _ if Instant::now() > deadline => panic!("the copy never got going"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert!(
        running.try_status().is_none(),
        "the copy ended before it was killed"
    );
    running.signal(libc::SIGKILL);
    let killed = running.finish(LIMIT);
    assert!(killed.status.unwrap().code().is_none(), "{killed:#?}");
    eprintln!("killed the copy with {written} bytes of 64 MiB written");
    let names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["src.raw"], "the killed copy left something behind");
    // The same copy, left alone, completes.
    image_ok(&[OsStr::new("copy"), p(&src), p(&dst)]);
    log_sizes("copy after a killed one", &src, &dst);
    assert!(qemu_compare(&src, &dst));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn convert_between_raw_and_qcow2_keeps_holes() {
    let dir = scratch_dir("image-convert");
    let (raw, qcow2, back) = (dir.join("a.raw"), dir.join("a.qcow2"), dir.join("b.raw"));
    sparse_gib(&raw);
    let run = image_ok(&[OsStr::new("convert"), p(&raw), p(&qcow2)]);
    log_sizes("convert raw -> qcow2", &raw, &qcow2);
    assert!(run.stderr.contains("(qcow2, 1 GiB"), "{}", run.stderr);
    let info = qemu_info(&qcow2);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], GIB);
    assert!(info.get("backing-filename").is_none());
    qemu_check(&qcow2);
    assert!(qemu_compare(&raw, &qcow2), "contents differ");
    assert!(
        allocated(&qcow2) <= 4 * MIB,
        "{} allocated",
        allocated(&qcow2)
    );
    image_ok(&[OsStr::new("convert"), p(&qcow2), p(&back)]);
    log_sizes("convert qcow2 -> raw", &qcow2, &back);
    assert_eq!(qemu_info(&back)["format"], "raw");
    assert!(qemu_compare(&qcow2, &back));
    assert!(allocated(&back) <= 3 * MIB + SLACK);
    // An explicit --format; raw to raw is a copy.
    let copy = dir.join("c.raw");
    image_ok(&[
        OsStr::new("convert"),
        p(&raw),
        p(&copy),
        OsStr::new("--format"),
        OsStr::new("raw"),
    ]);
    assert_eq!(qemu_info(&copy)["format"], "raw");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn create_makes_what_qemu_img_reads() {
    let dir = scratch_dir("image-create");
    let (raw, qcow2, base, overlay) = (
        dir.join("new.raw"),
        dir.join("new.qcow2"),
        dir.join("base.raw"),
        dir.join("overlay.qcow2"),
    );
    image_ok(&[OsStr::new("create"), p(&raw), OsStr::new("10G")]);
    let info = qemu_info(&raw);
    assert_eq!(
        (info["format"].as_str(), info["virtual-size"].as_u64()),
        (Some("raw"), Some(10 * GIB))
    );
    eprintln!(
        "allocated: create raw 10G: {} bytes (du {})",
        allocated(&raw),
        du_bytes(&raw)
    );
    assert_eq!(allocated(&raw), 0);
    image_ok(&[
        OsStr::new("create"),
        p(&qcow2),
        OsStr::new("10G"),
        OsStr::new("--format"),
        OsStr::new("qcow2"),
    ]);
    let info = qemu_info(&qcow2);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 10 * GIB);
    qemu_check(&qcow2);
    eprintln!(
        "allocated: create qcow2 10G: {} bytes (du {})",
        allocated(&qcow2),
        du_bytes(&qcow2)
    );
    assert!(allocated(&qcow2) <= MIB);
    sparse_file(&base, 64 * MIB, &[(9, 0, MIB)]);
    image_ok(&[
        OsStr::new("create"),
        p(&overlay),
        OsStr::new("--format"),
        OsStr::new("qcow2"),
        OsStr::new("--backing"),
        OsStr::new("base.raw"),
    ]);
    let info = qemu_info(&overlay);
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(
        info["virtual-size"],
        64 * MIB,
        "the size is the backing file's"
    );
    qemu_check(&overlay);
    assert!(qemu_compare(&base, &overlay));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn create_refuses_bad_sizes_and_options() {
    let dir = scratch_dir("image-create-bad");
    let file = dir.join("x.raw");
    image_refused(
        &[OsStr::new("create"), p(&file), OsStr::new("10Q")],
        2,
        &["10Q", "not a size"],
    );
    image_refused(
        &[OsStr::new("create"), p(&file), OsStr::new("1000")],
        1,
        &["multiple of 512", "1024"],
    );
    image_refused(&[OsStr::new("create"), p(&file)], 2, &["SIZE"]);
    image_refused(
        &[
            OsStr::new("create"),
            p(&file),
            OsStr::new("1G"),
            OsStr::new("--backing"),
            OsStr::new("b.raw"),
        ],
        2,
        &["--backing needs --format qcow2"],
    );
    image_refused(
        &[
            OsStr::new("create"),
            p(&file),
            OsStr::new("--format"),
            OsStr::new("qcow2"),
            OsStr::new("--backing"),
            OsStr::new("missing.raw"),
        ],
        1,
        &["missing.raw", "does not exist"],
    );
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        0,
        "a refused create left a file"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn grow_raw_and_qcow2_without_touching_data() {
    let dir = scratch_dir("image-grow");
    let (raw, copy, qcow2) = (
        dir.join("a.raw"),
        dir.join("before.raw"),
        dir.join("a.qcow2"),
    );
    sparse_gib(&raw);
    image_ok(&[OsStr::new("copy"), p(&raw), p(&copy)]);
    let before = allocated(&raw);
    image_ok(&[OsStr::new("grow"), p(&raw), OsStr::new("2G")]);
    eprintln!(
        "allocated: grow raw 1G -> 2G: {before} -> {} bytes (du {})",
        allocated(&raw),
        du_bytes(&raw)
    );
    assert_eq!(qemu_info(&raw)["virtual-size"], 2 * GIB);
    assert_eq!(allocated(&raw), before);
    assert!(
        qemu_compare(&copy, &raw),
        "data changed or the new space is not zero"
    );
    image_refused(
        &[OsStr::new("grow"), p(&raw), OsStr::new("1G")],
        1,
        &["a.raw is 2 GiB", "2147483648", "never shrinks"],
    );
    let same = image_ok(&[OsStr::new("grow"), p(&raw), OsStr::new("2G")]);
    assert!(same.stderr.contains("nothing to do"), "{}", same.stderr);
    let d = |path: &Path| path.display().to_string();
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.raw",
        "-F",
        "raw",
        &d(&qcow2),
    ]);
    qemu_io_write(&qcow2, "qcow2", &[(0x33, 100 * MIB, MIB)]);
    let before = allocated(&qcow2);
    image_ok(&[OsStr::new("grow"), p(&qcow2), OsStr::new("+1G")]);
    eprintln!(
        "allocated: grow qcow2 2G -> 3G: {before} -> {} bytes (du {})",
        allocated(&qcow2),
        du_bytes(&qcow2)
    );
    let info = qemu_info(&qcow2);
    assert_eq!(info["virtual-size"], 3 * GIB);
    assert_eq!(
        info["backing-filename"], "a.raw",
        "the backing file was lost"
    );
    qemu_check(&qcow2);
    assert!(allocated(&qcow2) <= before + SLACK);
    let flat = dir.join("grown.raw");
    image_ok(&[OsStr::new("copy"), p(&qcow2), p(&flat)]);
    assert!(qemu_compare(&qcow2, &flat));
    assert_eq!(qemu_info(&flat)["virtual-size"], 3 * GIB);
    qemu_io_read_pattern(&qcow2, 0x33, 100 * MIB, MIB);
    fs::remove_dir_all(dir).unwrap();
}

fn qemu_io_read_pattern(path: &Path, pattern: u8, offset: u64, len: u64) {
    let out = tool(
        "qemu-io",
        [
            "-f".to_string(),
            "qcow2".into(),
            "-c".into(),
            format!("read -P {pattern} {offset} {len}"),
            path.display().to_string(),
        ],
        "",
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn grow_refuses_block_devices_and_other_formats() {
    let dir = scratch_dir("image-grow-bad");
    let vmdk = dir.join("a.vmdk");
    qemu_img([
        "create",
        "-q",
        "-f",
        "vmdk",
        &vmdk.display().to_string(),
        "64M",
    ]);
    image_refused(
        &[OsStr::new("grow"), p(&vmdk), OsStr::new("1G")],
        1,
        &["a.vmdk", "VMDK", "qemu-img convert"],
    );
    let backing = dir.join("loop.raw");
    sparse_file(&backing, 16 * MIB, &[]);
    let device = LoopDevice::attach(&backing);
    image_refused(
        &[OsStr::new("grow"), p(&device.path), OsStr::new("1G")],
        1,
        &["block device", "volume"],
    );
    image_refused(
        &[
            OsStr::new("grow"),
            p(&dir.join("none.raw")),
            OsStr::new("1G"),
        ],
        1,
        &["none.raw", "does not exist"],
    );
    drop(device);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn copy_onto_a_block_device_zeroes_holes_and_keeps_its_backing_sparse() {
    let dir = scratch_dir("image-copy-device");
    let (src, backing) = (dir.join("src.raw"), dir.join("volume.raw"));
    sparse_file(&src, 32 * MIB, &[(0x5a, 0, MIB), (0x6b, 20 * MIB, 2 * MIB)]);
    // The volume holds old data everywhere; holes must read as zeroes.
    sparse_file(&backing, 64 * MIB, &[(0xff, 0, 64 * MIB)]);
    let device = LoopDevice::attach(&backing);
    image_refused(
        &[OsStr::new("copy"), p(&src), p(&device.path)],
        1,
        &["block device", "--force"],
    );
    let before = allocated(&backing);
    let run = image_ok(&[
        OsStr::new("copy"),
        p(&src),
        p(&device.path),
        OsStr::new("--force"),
    ]);
    eprintln!("{}", run.stderr.trim());
    tool("sync", std::iter::empty::<&str>(), "");
    let head: Vec<u8> = fs::read(&device.path).unwrap()[..32 * MIB as usize].to_vec();
    let wanted = fs::read(&src).unwrap();
    assert!(
        head == wanted,
        "the device's first 32 MiB differ from the source"
    );
    let tail = &fs::read(&device.path).unwrap()[32 * MIB as usize..];
    assert!(
        tail.iter().all(|&b| b == 0xff),
        "past the image, the device was touched"
    );
    eprintln!(
        "allocated: copy onto a loop device: its backing file {before} -> {} bytes",
        allocated(&backing)
    );
    // The loop device punches holes in its file for discarded ranges.
    assert!(
        allocated(&backing) <= 32 * MIB + 3 * MIB + SLACK,
        "{}",
        allocated(&backing)
    );
    drop(device);
    fs::remove_dir_all(dir).unwrap();
}

/// Partitions a 64 MiB raw image like a cloud image (GPT: an EFI system
/// partition with FAT, a root partition with ext4).
fn partitioned_disk(path: &Path) -> serde_json::Value {
    sparse_file(path, 64 * MIB, &[]);
    let layout = "label: gpt\nsize=16MiB, type=U, name=\"EFI\"\ntype=L, name=\"root\"\n";
    tool("sfdisk", [OsStr::new("-q"), p(path)], layout);
    let image = path.display().to_string();
    tool(
        "mformat",
        [
            "-i",
            &format!("{image}@@1M"),
            "-v",
            "ESP",
            "-T",
            "32768",
            "-h",
            "64",
            "-s",
            "32",
            "::",
        ],
        "",
    );
    let offset = format!("offset={}", 17 * MIB);
    tool(
        "mkfs.ext4",
        ["-q", "-L", "rootfs", "-E", &offset, &image, "47M"],
        "",
    );
    let table = tool("sfdisk", [OsStr::new("--json"), p(path)], "");
    serde_json::from_str(&table).expect("sfdisk prints JSON")
}

fn info_json(path: &Path) -> serde_json::Value {
    let run = image_ok(&[OsStr::new("info"), OsStr::new("--json"), p(path)]);
    serde_json::from_str(&run.stdout).expect("zvmm image info --json prints JSON")
}

#[test]
fn info_lists_partitions_and_labels_as_sfdisk_and_blkid_see_them() {
    let dir = scratch_dir("image-info");
    let raw = dir.join("disk.raw");
    let sfdisk = partitioned_disk(&raw);
    let qcow2 = dir.join("disk.qcow2");
    qemu_img([
        "convert",
        "-q",
        "-O",
        "qcow2",
        &raw.display().to_string(),
        &qcow2.display().to_string(),
    ]);
    for path in [&raw, &qcow2] {
        // Settle delayed allocation first, so both reads of st_blocks agree.
        std::fs::File::open(path).unwrap().sync_all().unwrap();
        let info = info_json(path);
        let qemu = qemu_info(path);
        assert_eq!(info["format"], qemu["format"]);
        assert_eq!(info["virtual_size"], qemu["virtual-size"]);
        assert_eq!(info["allocated_size"], allocated(path));
        let table = &info["partition_table"];
        assert_eq!(table["kind"], "gpt");
        assert_eq!(table["disk_id"], sfdisk["partitiontable"]["id"]);
        let expected = sfdisk["partitiontable"]["partitions"].as_array().unwrap();
        let found = table["partitions"].as_array().unwrap();
        assert_eq!(found.len(), expected.len());
        for (mine, theirs) in found.iter().zip(expected) {
            assert_eq!(
                mine["start"].as_u64(),
                theirs["start"].as_u64().map(|s| s * 512)
            );
            assert_eq!(
                mine["size"].as_u64(),
                theirs["size"].as_u64().map(|s| s * 512)
            );
            assert_eq!(mine["type_id"], theirs["type"]);
            assert_eq!(mine["name"], theirs["name"]);
        }
        assert_eq!(found[0]["filesystem"]["kind"], "vfat");
        assert_eq!(found[0]["filesystem"]["label"], "ESP");
        assert_eq!(found[1]["filesystem"]["kind"], "ext4");
        assert_eq!(found[1]["filesystem"]["label"], "rootfs");
    }
    let blkid = tool(
        "blkid",
        [
            "-p",
            "-O",
            &(17 * MIB).to_string(),
            &raw.display().to_string(),
        ],
        "",
    );
    assert!(
        blkid.contains("LABEL=\"rootfs\"") && blkid.contains("TYPE=\"ext4\""),
        "{blkid}"
    );
    let text = image_ok(&[OsStr::new("info"), p(&raw)]).stdout;
    for needle in [
        "format:         raw",
        "virtual size:   64 MiB",
        "GPT (2 partitions",
        "EFI System",
        "vfat \"ESP\"",
        "ext4 \"rootfs\"",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn info_reports_backing_files_mbr_layouts_and_other_formats() {
    let dir = scratch_dir("image-info-more");
    let d = |path: &PathBuf| path.display().to_string();
    let (mbr, top) = (dir.join("mbr.raw"), dir.join("top.qcow2"));
    sparse_file(&mbr, 64 * MIB, &[]);
    // A primary partition, an extended one with two logical ones inside.
    let layout = "label: dos\nstart=2048, size=16384, type=83, bootable\n\
                  start=18432, size=81920, type=5\nstart=20480, size=16384, type=82\n\
                  start=38912, size=16384, type=83\n";
    tool("sfdisk", [OsStr::new("-q"), p(&mbr)], layout);
    let info = info_json(&mbr);
    let found: Vec<(String, u64, u64)> = info["partition_table"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let number = p["number"].as_u64().unwrap();
            (
                format!("mbr.raw{number}"),
                p["start"].as_u64().unwrap() / 512,
                p["size"].as_u64().unwrap() / 512,
            )
        })
        .collect();
    let sfdisk: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", [OsStr::new("--json"), p(&mbr)], "")).unwrap();
    let expected: Vec<(String, u64, u64)> = sfdisk["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = Path::new(p["node"].as_str().unwrap()).file_name().unwrap();
            (
                node.to_string_lossy().into_owned(),
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(found, expected);
    assert_eq!(info["partition_table"]["kind"], "mbr");
    assert_eq!(
        info["partition_table"]["partitions"][2]["type_name"],
        "Linux swap"
    );
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mbr.raw",
        "-F",
        "raw",
        &d(&top),
    ]);
    let info = info_json(&top);
    let qemu = qemu_info(&top);
    assert_eq!(info["backing_file"], qemu["backing-filename"]);
    assert_eq!(info["backing_format"], qemu["backing-filename-format"]);
    assert_eq!(
        info["partition_table"]["kind"], "mbr",
        "read through the backing file"
    );
    fs::remove_file(&mbr).unwrap();
    let info = info_json(&top);
    assert!(
        info["contents_note"].as_str().unwrap().contains("mbr.raw"),
        "{info}"
    );
    for format in ["vmdk", "vhdx", "vpc"] {
        let other = dir.join(format!("disk.{format}"));
        qemu_img(["create", "-q", "-f", format, &d(&other), "64M"]);
        let info = info_json(&other);
        assert_eq!(info["format"], format);
        assert!(
            info["contents_note"]
                .as_str()
                .unwrap()
                .contains("qemu-img convert"),
            "{info}"
        );
        image_refused(
            &[OsStr::new("copy"), p(&other), p(&dir.join("out.raw"))],
            1,
            &["zvmm image reads raw and qcow2 images only"],
        );
    }
    fs::remove_dir_all(dir).unwrap();
}

/// Holds an OFD write lock on `path` (as a VM writing it does) until
/// dropped.
struct WriteLock(std::process::Child);

impl WriteLock {
    fn take(path: &Path) -> WriteLock {
        use std::io::{BufRead, BufReader};
        let script = "import fcntl, os, struct, sys, time\n\
                      fd = os.open(sys.argv[1], os.O_RDWR)\n\
                      fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hhqqixxxx', fcntl.F_WRLCK, 0, 0, 0, 0))\n\
                      print('locked', flush=True)\n\
                      time.sleep(600)\n";
        let mut child = Command::new("python3")
            .args([OsStr::new("-c"), OsStr::new(script), p(path)])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cannot run python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked", "the lock holder failed");
        WriteLock(child)
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn images_in_use_are_refused_but_can_be_inspected() {
    let dir = scratch_dir("image-locked");
    let (src, dst) = (dir.join("busy.raw"), dir.join("out.raw"));
    sparse_file(&src, 16 * MIB, &[(1, 0, MIB)]);
    let lock = WriteLock::take(&src);
    let holder = format!("pid {}", lock.0.id());
    image_refused(
        &[OsStr::new("copy"), p(&src), p(&dst)],
        1,
        &["busy.raw is open for writing by", &holder, "stop it first"],
    );
    assert!(!dst.exists());
    image_refused(
        &[OsStr::new("grow"), p(&src), OsStr::new("1G")],
        1,
        &["busy.raw is in use by", &holder],
    );
    assert_eq!(fs::metadata(&src).unwrap().len(), 16 * MIB);
    let info = info_json(&src);
    assert_eq!(info["virtual_size"], 16 * MIB);
    drop(lock);
    image_ok(&[OsStr::new("copy"), p(&src), p(&dst)]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn copy_decodes_compressed_qcow2_clusters() {
    let dir = scratch_dir("image-compressed");
    let (raw, packed, flat) = (
        dir.join("a.raw"),
        dir.join("packed.qcow2"),
        dir.join("flat.raw"),
    );
    sparse_gib(&raw);
    let d = |path: &Path| path.display().to_string();
    qemu_img(["convert", "-q", "-c", "-O", "qcow2", &d(&raw), &d(&packed)]);
    let run = image_ok(&[OsStr::new("copy"), p(&packed), p(&flat)]);
    log_sizes("copy compressed qcow2", &packed, &flat);
    assert!(
        run.stderr.contains("3 MiB of data written"),
        "{}",
        run.stderr
    );
    assert!(qemu_compare(&raw, &flat), "contents differ");
    assert!(allocated(&flat) <= 3 * MIB + SLACK);
    fs::remove_dir_all(dir).unwrap();
}
