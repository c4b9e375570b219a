//! Disk images in the formats users bring, for the image tests: made by
//! `qemu-img` (qcow2 with and without a backing file, VMDK, VHD, VHDX),
//! an ISO 9660 image with a hand-written volume descriptor set, and the
//! host-side checks (`qemu-img check`, `qemu-img compare`).

use std::os::unix::fs::FileExt;
use std::path::Path;

/// Runs `qemu-img ARGS`, which must succeed; returns its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    crate::image_tools::qemu_img(args)
}

/// `qemu-img create -q -f FORMAT [OPTIONS...] PATH [SIZE]`.
pub fn create(path: &Path, format: &str, options: &[&str], size: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", format];
    args.extend_from_slice(options);
    args.push(path_str(path));
    args.extend(size);
    qemu_img(&args);
}

/// Converts the raw image `raw` into a new qcow2 image `qcow2`.
pub fn raw_to_qcow2(raw: &Path, qcow2: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path_str(raw),
        path_str(qcow2),
    ]);
}

/// A qcow2 overlay of `base` (named relative to the overlay's directory).
pub fn overlay(base_name: &str, overlay: &Path) {
    create(overlay, "qcow2", &["-b", base_name, "-F", "qcow2"], None);
}

/// Panics unless `qemu-img check` finds no errors in `image`.
pub fn assert_check_clean(image: &Path) {
    let out = qemu_img(&["check", path_str(image)]);
    assert!(
        out.contains("No errors were found"),
        "{}: {out}",
        image.display()
    );
}

/// Panics unless `qemu-img compare` finds the guest contents of `a` and
/// `b` identical.
pub fn assert_identical(a: &Path, b: &Path) {
    let out = qemu_img(&["compare", path_str(a), path_str(b)]);
    assert!(
        out.contains("Images are identical"),
        "{} vs {}: {out}",
        a.display(),
        b.display()
    );
}

/// An ISO 9660 image of `size` bytes: a primary volume descriptor at
/// sector 16 (2 KiB sectors) and the set terminator after it.
pub fn make_iso(path: &Path, size: u64) {
    let file = std::fs::File::create(path).expect("create iso");
    file.set_len(size).expect("size iso");
    let mut pvd = vec![0u8; 2048];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[6] = 1;
    pvd[40..48].copy_from_slice(b"ZVMMTEST");
    let blocks = (size / 2048) as u32;
    pvd[80..84].copy_from_slice(&blocks.to_le_bytes());
    pvd[84..88].copy_from_slice(&blocks.to_be_bytes());
    pvd[128..130].copy_from_slice(&2048u16.to_le_bytes());
    pvd[130..132].copy_from_slice(&2048u16.to_be_bytes());
    let mut end = vec![0u8; 2048];
    end[0] = 255;
    end[1..6].copy_from_slice(b"CD001");
    end[6] = 1;
    file.write_all_at(&pvd, 16 * 2048).expect("write pvd");
    file.write_all_at(&end, 17 * 2048)
        .expect("write terminator");
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}
