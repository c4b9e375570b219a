use std::fs;
use std::os::unix::fs::FileExt;

use super::*;
use crate::image::create::{create, CreateOptions};
use crate::image::sparse::{region_at, Region};

const MIB: u64 = 1 << 20;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zvmm-transfer-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A sparse raw image of `size` bytes with a distinct megabyte at each of
/// `data_at` (all non-zero bytes).
fn raw_image(path: &Path, size: u64, data_at: &[u64]) {
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    for &at in data_at {
        let fill = (at / MIB % 200 + 1) as u8;
        file.write_all_at(&vec![fill; MIB as usize], at).unwrap();
    }
    file.sync_all().unwrap();
}

/// The data/hole map of a file, in MiB.
fn map(path: &Path) -> Vec<(Region, u64, u64)> {
    let file = File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let mut regions = Vec::new();
    let mut at = 0;
    while at < size {
        let (region, end) = region_at(&file, at, size).unwrap();
        regions.push((region, at / MIB, end.div_ceil(MIB)));
        at = end;
    }
    regions
}

fn allocated(path: &Path) -> u64 {
    sparse::allocated_bytes(&fs::metadata(path).unwrap())
}

#[test]
fn a_raw_copy_keeps_data_and_holes() {
    let dir = scratch("raw");
    let (src, dst) = (dir.join("src.raw"), dir.join("dst.raw"));
    raw_image(&src, 64 * MIB, &[0, 10 * MIB, 11 * MIB, 63 * MIB]);
    let done = copy(&src, &dst, None, false).unwrap();
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    assert_eq!(map(&src), map(&dst));
    assert_eq!(done.counts.data, 4 * MIB);
    assert_eq!(done.counts.holes, 60 * MIB);
    assert_eq!(done.target_allocated, Some(allocated(&dst)));
    assert!(
        allocated(&dst) <= 4 * MIB + 64 * 1024,
        "{}",
        allocated(&dst)
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn copy_size_grows_and_never_shrinks() {
    let dir = scratch("size");
    let (src, dst) = (dir.join("src.raw"), dir.join("dst.raw"));
    raw_image(&src, 8 * MIB, &[MIB]);
    let done = copy(&src, &dst, Some(32 * MIB), false).unwrap();
    assert_eq!(done.size, 32 * MIB);
    assert_eq!(fs::metadata(&dst).unwrap().len(), 32 * MIB);
    assert_eq!(
        fs::read(&dst).unwrap()[..8 * MIB as usize],
        fs::read(&src).unwrap()
    );
    let refused = copy(&src, &dir.join("small.raw"), Some(4 * MIB), false).unwrap_err();
    assert!(matches!(refused, ImageError::Shrink { .. }), "{refused}");
    assert!(!dir.join("small.raw").exists());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_existing_destination_needs_force() {
    let dir = scratch("force");
    let (src, dst) = (dir.join("src.raw"), dir.join("dst.raw"));
    raw_image(&src, 4 * MIB, &[0]);
    fs::write(&dst, b"precious").unwrap();
    let refused = copy(&src, &dst, None, false).unwrap_err();
    assert!(matches!(refused, ImageError::Exists(_)), "{refused}");
    assert_eq!(fs::read(&dst).unwrap(), b"precious");
    copy(&src, &dst, None, true).unwrap();
    assert_eq!(fs::read(&dst).unwrap(), fs::read(&src).unwrap());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn raw_to_qcow2_and_back_is_the_same_disk() {
    let dir = scratch("qcow2");
    let (src, qcow2, back) = (dir.join("a.raw"), dir.join("a.qcow2"), dir.join("b.raw"));
    raw_image(&src, 48 * MIB, &[2 * MIB, 30 * MIB]);
    let there = convert(&src, &qcow2, None, false).unwrap();
    assert_eq!(there.target_format, TargetFormat::Qcow2);
    assert_eq!(there.counts.data, 2 * MIB);
    assert!(allocated(&qcow2) < 3 * MIB, "{}", allocated(&qcow2));
    let again = convert(&qcow2, &back, None, false).unwrap();
    assert_eq!(again.source_format, ImageFormat::Qcow2);
    assert_eq!(again.target_format, TargetFormat::Raw);
    assert_eq!(again.counts.data, 2 * MIB);
    assert_eq!(fs::read(&src).unwrap(), fs::read(&back).unwrap());
    assert_eq!(map(&src), map(&back));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn zero_data_is_left_out_of_qcow2() {
    let dir = scratch("zeroes");
    let (src, qcow2) = (dir.join("a.raw"), dir.join("a.qcow2"));
    let file = File::create(&src).unwrap();
    file.write_all_at(&vec![0; 4 * MIB as usize], 0).unwrap();
    file.write_all_at(&[1; 512], 3 * MIB).unwrap();
    drop(file);
    let done = convert(&src, &qcow2, None, false).unwrap();
    assert_eq!(done.counts.data, QCOW2_GRANULE as u64);
    assert_eq!(done.counts.zero_data, 4 * MIB - QCOW2_GRANULE as u64);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_overlay_reads_through_to_its_backing_file() {
    let dir = scratch("overlay");
    let (base, overlay, flat) = (
        dir.join("base.raw"),
        dir.join("top.qcow2"),
        dir.join("flat.raw"),
    );
    raw_image(&base, 16 * MIB, &[5 * MIB]);
    let options = CreateOptions {
        format: TargetFormat::Qcow2,
        size: None,
        backing: Some(PathBuf::from("base.raw")),
        force: false,
    };
    create(&overlay, &options).unwrap();
    let done = copy(&overlay, &flat, None, false).unwrap();
    assert_eq!(done.backing_chain, [dir.join("base.raw")]);
    assert_eq!(fs::read(&flat).unwrap(), fs::read(&base).unwrap());
    assert_eq!(map(&flat), map(&base));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn formats_zvmm_cannot_read_are_refused() {
    let dir = scratch("vmdk");
    let src = dir.join("disk.vmdk");
    let mut header = vec![0u8; 4096];
    header[..4].copy_from_slice(b"KDMV");
    fs::write(&src, header).unwrap();
    let refused = copy(&src, &dir.join("out.raw"), None, false).unwrap_err();
    assert!(
        refused.to_string().contains("qemu-img convert -O raw"),
        "{refused}"
    );
    assert!(!dir.join("out.raw").exists());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn runs_group_granules_of_one_kind() {
    let mut buf = vec![0u8; 8 * 4096];
    buf[2 * 4096] = 1;
    buf[3 * 4096 + 5] = 1;
    assert_eq!(next_run_end(&buf, 0, 4096, true), 2 * 4096);
    assert_eq!(next_run_end(&buf, 2 * 4096, 4096, false), 4 * 4096);
    assert_eq!(next_run_end(&buf, 4 * 4096, 4096, true), 8 * 4096);
}

#[test]
fn info_refuses_a_fifo_without_hanging() {
    let dir = scratch("fifo");
    let fifo = dir.join("pipe");
    let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path and nothing else.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let refused = crate::image::info::inspect(&fifo).unwrap_err();
    assert!(
        matches!(refused, ImageError::NotAnImage { .. }),
        "{refused}"
    );
    let refused = copy(&fifo, &dir.join("out.raw"), None, false).unwrap_err();
    assert!(
        refused.to_string().contains("not a regular file"),
        "{refused}"
    );
    fs::remove_dir_all(dir).unwrap();
}
