//! qcow2 through the request path (`request::process` on mock-queue
//! chains): writes, reads, discards and write-zeroes on images and
//! overlays made by qemu-img, checked against an equivalent raw image with
//! `qemu-img check` and `qemu-img compare`; locking of the chain; the
//! chain errors.

use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use super::*;
use crate::virtio::block::image::{DiskImage, ImageError, ImageType};
use crate::virtio::block::request::Backend;
use crate::virtio::block::testing::*;
use crate::virtio::GuestMemory;

const MIB: u64 = 1 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNMAP: u32 = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// A scratch directory (alive as long as the returned image).
fn scratch() -> (Image, PathBuf) {
    let dir = Image::new(0);
    let path = dir.path.parent().unwrap().to_path_buf();
    (dir, path)
}

fn create(path: &Path, args: &[&str], size: Option<&str>) {
    let mut command = vec!["create", "-q", "-f", "qcow2"];
    command.extend_from_slice(args);
    command.push(path.to_str().unwrap());
    command.extend(size);
    qemu_img(&command);
}

fn open(path: &Path, readonly: bool) -> Backend {
    backend_on(open_image(path, readonly, None))
}

fn open_err(path: &Path, readonly: bool) -> String {
    DiskImage::open(path, readonly, None)
        .unwrap_err()
        .to_string()
}

/// `qemu-img check` passes and `qemu-img compare` finds `a` and `b` equal.
fn assert_consistent_and_equal(a: &Path, b: &Path) {
    let check = qemu_img(&["check", a.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
    let compare = qemu_img(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(compare.contains("Images are identical"), "{compare}");
}

/// Runs the same requests against every backend and checks each reads
/// back what the first one does.
struct Twins<'a> {
    mem: &'a GuestMemory,
    backends: Vec<&'a Backend>,
}

impl Twins<'_> {
    fn write(&self, sector: u64, data: &[u8]) {
        for b in &self.backends {
            assert_eq!(
                write_sectors(self.mem, b, sector, data),
                OK,
                "write {sector}"
            );
        }
    }

    fn request(&self, kind: u32, range: (u64, u32), flags: u32) {
        for b in &self.backends {
            assert_eq!(discard_or_zero(self.mem, b, kind, range, flags), OK);
        }
    }

    fn read(&self, sector: u64, len: u32) -> Vec<u8> {
        let results: Vec<_> = self
            .backends
            .iter()
            .map(|b| read_sectors(self.mem, b, sector, len))
            .collect();
        for result in &results {
            assert_eq!(result, &results[0], "read {sector}+{len}");
        }
        results[0].1.clone()
    }
}

#[test]
fn guest_io_lands_in_a_qcow2_image_qemu_img_accepts() {
    let (_dir, dir) = scratch();
    let (qcow2, raw) = (dir.join("a.qcow2"), dir.join("a.raw"));
    create(&qcow2, &[], Some("8M"));
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let mem = memory();
    let (q, r) = (open(&qcow2, false), open(&raw, false));
    assert_eq!(q.disk.image_type(), ImageType::Qcow2);
    assert_eq!(
        (q.disk.sectors(), q.disk.granularity()),
        (8 * MIB / 512, 65536)
    );
    let twins = Twins {
        mem: &mem,
        backends: vec![&q, &r],
    };
    let last = 8 * MIB / 512 - 1;
    for (seed, sector) in [(1u8, 0u64), (2, 1), (3, 7), (4, 1000), (5, last)] {
        twins.write(sector, &pattern(seed, 512));
        assert_eq!(twins.read(sector, 512), pattern(seed, 512));
    }
    // Across a cluster boundary, and a whole cluster.
    twins.write(127, &pattern(6, 4096));
    assert_eq!(
        twins.read(120, 8192)[7 * 512..7 * 512 + 4096],
        pattern(6, 4096)
    );
    twins.write(2048, &pattern(7, 65536));
    // Discard and write-zeroes, with and without unmap, partly unaligned.
    twins.request(VIRTIO_BLK_T_DISCARD, (2048, 128), 0);
    assert_eq!(twins.read(2048, 65536), vec![0; 65536]);
    twins.write(4096, &pattern(8, 65536));
    twins.request(VIRTIO_BLK_T_WRITE_ZEROES, (4100, 100), UNMAP);
    twins.request(VIRTIO_BLK_T_WRITE_ZEROES, (4000, 20), 0);
    assert_eq!(twins.read(4100, 512 * 100), vec![0; 512 * 100]);
    assert_eq!(twins.read(4096, 2048), pattern(8, 2048));
    assert_eq!(flush(&mem, &q), OK);
    assert_eq!(counter(&q, "write_requests"), 8);
    drop((q, r));
    assert_consistent_and_equal(&qcow2, &raw);
}

#[test]
fn an_overlay_reads_its_base_and_writes_only_itself() {
    let (_dir, dir) = scratch();
    let base = dir.join("base.qcow2");
    let overlay = dir.join("overlay.qcow2");
    let (base_raw, overlay_raw) = (dir.join("base.raw"), dir.join("overlay.raw"));
    create(&base, &[], Some("4M"));
    std::fs::File::create(&base_raw)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let mem = memory();
    {
        let (b, r) = (open(&base, false), open(&base_raw, false));
        let twins = Twins {
            mem: &mem,
            backends: vec![&b, &r],
        };
        twins.write(10, &pattern(1, 8192));
        twins.write(3000, &pattern(2, 512));
    }
    std::fs::copy(&base_raw, &overlay_raw).unwrap();
    // A relative backing name, resolved next to the overlay.
    create(&overlay, &["-b", "base.qcow2", "-F", "qcow2"], None);
    let base_bytes = std::fs::read(&base).unwrap();
    {
        let (o, r) = (open(&overlay, false), open(&overlay_raw, false));
        assert_eq!(o.disk.backing_chain(), std::slice::from_ref(&base));
        assert_eq!(o.disk.sectors(), 4 * MIB / 512);
        let twins = Twins {
            mem: &mem,
            backends: vec![&o, &r],
        };
        assert_eq!(twins.read(10, 8192), pattern(1, 8192));
        twins.write(12, &pattern(3, 1024));
        assert_eq!(twins.read(10, 2048)[1024..], pattern(3, 1024)[..]);
        // Zeroes over base data read as zeroes, not the base.
        twins.request(VIRTIO_BLK_T_DISCARD, (0, 128), 0);
        twins.request(VIRTIO_BLK_T_WRITE_ZEROES, (3000, 1), UNMAP);
        assert_eq!(twins.read(0, 65536), vec![0; 65536]);
        assert_eq!(twins.read(3000, 512), vec![0; 512]);
        assert_eq!(flush(&mem, &o), OK);
    }
    assert_consistent_and_equal(&overlay, &overlay_raw);
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "base changed");
    assert_consistent_and_equal(&base, &base_raw);
}

#[test]
fn the_overlay_is_locked_exclusive_and_the_chain_shared() {
    let (_dir, dir) = scratch();
    let (base, one, two) = (
        dir.join("b.qcow2"),
        dir.join("1.qcow2"),
        dir.join("2.qcow2"),
    );
    create(&base, &[], Some("1M"));
    for overlay in [&one, &two] {
        create(
            overlay,
            &["-b", base.to_str().unwrap(), "-F", "qcow2"],
            None,
        );
    }
    let first = open_image(&one, false, None);
    // A second VM on its own overlay of the same base, and readers.
    let second = open_image(&two, false, None);
    let reader = open_image(&base, true, None);
    // Nobody may write the base or the overlay in use.
    let err = open_err(&base, false);
    assert!(err.contains("is in use by this zvmm (pid"), "{err}");
    let err = open_err(&one, false);
    assert!(err.contains("1.qcow2 is in use by this zvmm (pid"), "{err}");
    let err = open_err(&one, true);
    assert!(
        err.contains("is open for writing by this zvmm (pid"),
        "{err}"
    );
    drop((first, second, reader));
    open_image(&base, false, None);
}

#[test]
fn raw_backing_files_are_followed_and_left_alone() {
    let (_dir, dir) = scratch();
    let (base, overlay) = (dir.join("base.img"), dir.join("o.qcow2"));
    std::fs::write(&base, [pattern(4, 4096), vec![0; 4096]].concat()).unwrap();
    create(&overlay, &["-b", "base.img", "-F", "raw"], None);
    let mem = memory();
    let o = open(&overlay, false);
    assert_eq!(read_sectors(&mem, &o, 0, 4096), (OK, pattern(4, 4096)));
    assert_eq!(write_sectors(&mem, &o, 1, &pattern(5, 512)), OK);
    assert_eq!(read_sectors(&mem, &o, 1, 512), (OK, pattern(5, 512)));
    drop(o);
    assert_eq!(std::fs::read(&base).unwrap()[..4096], pattern(4, 4096)[..]);
}

#[test]
fn a_readonly_qcow2_refuses_writes_and_stays_unchanged() {
    let (_dir, dir) = scratch();
    let path = dir.join("ro.qcow2");
    create(&path, &[], Some("1M"));
    let before = std::fs::read(&path).unwrap();
    let mem = memory();
    let b = open(&path, true);
    assert_eq!(write_sectors(&mem, &b, 0, &[7; 512]), IOERR);
    let zero = discard_or_zero(&mem, &b, VIRTIO_BLK_T_WRITE_ZEROES, (0, 8), 0);
    assert_eq!(zero, IOERR);
    assert_eq!(read_sectors(&mem, &b, 0, 512), (OK, vec![0; 512]));
    drop(b);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn version_2_images_zero_by_writing_and_ignore_discards() {
    let (_dir, dir) = scratch();
    let (qcow2, raw) = (dir.join("v2.qcow2"), dir.join("v2.raw"));
    create(&qcow2, &["-o", "compat=0.10"], Some("2M"));
    let mem = memory();
    let q = open(&qcow2, false);
    assert_eq!(write_sectors(&mem, &q, 64, &pattern(9, 4096)), OK);
    // No zero clusters in v2: the discard is a successful no-op.
    assert_eq!(
        discard_or_zero(&mem, &q, VIRTIO_BLK_T_DISCARD, (64, 8), 0),
        OK
    );
    assert_eq!(read_sectors(&mem, &q, 64, 4096), (OK, pattern(9, 4096)));
    for flags in [0, UNMAP] {
        assert_eq!(write_sectors(&mem, &q, 64, &pattern(9, 4096)), OK);
        let status = discard_or_zero(&mem, &q, VIRTIO_BLK_T_WRITE_ZEROES, (65, 2), flags);
        assert_eq!(status, OK);
        let (_, data) = read_sectors(&mem, &q, 64, 2048);
        assert_eq!(data[..512], pattern(9, 512)[..]);
        assert_eq!(data[512..1536], [0; 1024]);
    }
    drop(q);
    let mut expected = vec![0u8; 2 * MIB as usize];
    expected[64 * 512..64 * 512 + 4096].copy_from_slice(&pattern(9, 4096));
    expected[65 * 512..67 * 512].fill(0);
    std::fs::write(&raw, expected).unwrap();
    assert_consistent_and_equal(&qcow2, &raw);
}

#[test]
fn discarded_clusters_are_reused_inside_the_image() {
    let (_dir, dir) = scratch();
    let path = dir.join("d.qcow2");
    create(&path, &[], Some("16M"));
    let mem = memory();
    let q = open(&path, false);
    let chunk = pattern(3, 65536);
    for i in 0..16 {
        assert_eq!(write_sectors(&mem, &q, i * 128, &chunk), OK);
    }
    assert_eq!(flush(&mem, &q), OK);
    let full = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        discard_or_zero(&mem, &q, VIRTIO_BLK_T_DISCARD, (0, 16 * 128), 0),
        OK
    );
    for i in 16..32 {
        assert_eq!(write_sectors(&mem, &q, i * 128, &chunk), OK);
    }
    assert_eq!(flush(&mem, &q), OK);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), full, "file grew");
    assert_eq!(read_sectors(&mem, &q, 0, 65536), (OK, vec![0; 65536]));
    drop(q);
    let check = qemu_img(&["check", path.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn broken_chains_are_refused_by_name() {
    let (_dir, dir) = scratch();
    let shown = |p: &Path| p.display().to_string();
    // A missing backing file.
    let (base, overlay) = (dir.join("gone.qcow2"), dir.join("o.qcow2"));
    create(&base, &[], Some("1M"));
    create(&overlay, &["-b", "gone.qcow2", "-F", "qcow2"], None);
    std::fs::remove_file(&base).unwrap();
    assert_eq!(
        open_err(&overlay, false),
        format!(
            "backing file {} of {} does not exist",
            shown(&base),
            shown(&overlay)
        )
    );
    // A backing file in a format zvmm does not follow.
    let vmdk = dir.join("b.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "1M"]);
    let on_vmdk = dir.join("v.qcow2");
    create(&on_vmdk, &["-b", "b.vmdk", "-F", "vmdk"], None);
    let err = open_err(&on_vmdk, false);
    assert!(
        err.starts_with(&format!(
            "backing file {} of {} is named as backing format 'vmdk'; zvmm follows raw and \
             qcow2 backing files only",
            shown(&vmdk),
            shown(&on_vmdk)
        )),
        "{err}"
    );
    // A loop: a -> b -> a.
    let (a, b) = (dir.join("a.qcow2"), dir.join("b.qcow2"));
    create(&a, &[], Some("1M"));
    create(&b, &["-b", "a.qcow2", "-F", "qcow2"], None);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
    ]);
    let err = open_err(&b, false);
    assert_eq!(
        err,
        format!(
            "the backing chain of {} loops: {} appears twice",
            shown(&b),
            shown(&b)
        )
    );
    // Encryption.
    let encrypted = dir.join("e.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        encrypted.to_str().unwrap(),
        "1M",
    ]);
    assert_eq!(
        open_err(&encrypted, true),
        format!(
            "disk image {} is an encrypted qcow2 image, which zvmm cannot open; decrypt it \
             with `qemu-img convert` first",
            shown(&encrypted)
        )
    );
    assert!(matches!(
        DiskImage::open(&encrypted, true, None),
        Err(ImageError::Qcow2(Qcow2Error::Encrypted { .. }))
    ));
}

#[test]
fn qcow2_features_imago_lacks_are_refused_with_the_fix() {
    let (_dir, dir) = scratch();
    for (name, option, what) in [
        (
            "z.qcow2",
            "compression_type=zstd",
            "uses zstd-compressed clusters",
        ),
        ("e.qcow2", "extended_l2=on", "uses extended L2 entries"),
    ] {
        let path = dir.join(name);
        create(&path, &["-o", option], Some("1M"));
        let err = open_err(&path, false);
        let shown = path.display();
        assert!(
            err.starts_with(&format!("qcow2 image {shown} {what}")),
            "{err}"
        );
        assert!(
            err.ends_with(&format!(
                "convert it with `qemu-img convert -O qcow2 -o \
                 compression_type=zlib,extended_l2=off {shown} NEW` and attach NEW"
            )),
            "{err}"
        );
    }
    // A dirty image (lazy refcounts, not closed): set the bit by hand.
    let path = dir.join("dirty.qcow2");
    create(&path, &["-o", "lazy_refcounts=on"], Some("1M"));
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &1u64.to_be_bytes(), 72).unwrap();
    assert_eq!(
        open_err(&path, false),
        format!(
            "qcow2 image {} was not closed cleanly (dirty, lazy refcounts); repair it with \
             `qemu-img check -r all {}`",
            path.display(),
            path.display()
        )
    );
}

#[test]
fn backing_names_resolve_next_to_the_image() {
    let image = Path::new("/img/vm/o.qcow2");
    let resolve = |name| resolve_backing(image, name).map_err(|e| e.to_string());
    assert_eq!(
        resolve("base.qcow2"),
        Ok(PathBuf::from("/img/vm/base.qcow2"))
    );
    assert_eq!(resolve("../b.raw"), Ok(PathBuf::from("/img/vm/../b.raw")));
    assert_eq!(resolve("/abs/b.raw"), Ok(PathBuf::from("/abs/b.raw")));
    assert_eq!(resolve("file:b.raw"), Ok(PathBuf::from("/img/vm/b.raw")));
    assert_eq!(
        resolve("tag:v1.raw"),
        Ok(PathBuf::from("/img/vm/tag:v1.raw"))
    );
    for bad in ["json:{}", "nbd://host/x", "https://x/y.qcow2", ""] {
        let err = resolve(bad).unwrap_err();
        assert!(err.contains("is not a file name zvmm can open"), "{err}");
    }
}

#[test]
fn absurd_table_sizes_are_refused_quickly() {
    let (_dir, dir) = scratch();
    let good = dir.join("good.qcow2");
    create(&good, &[], Some("4M"));
    // l1_size, refcount_table_clusters (u32 fields at 36 and 56).
    for (at, value) in [(36, u32::MAX), (36, 1 << 28), (56, u32::MAX), (56, 1 << 20)] {
        let mut bad = std::fs::read(&good).unwrap();
        bad[at..at + 4].copy_from_slice(&value.to_be_bytes());
        let path = dir.join("bad.qcow2");
        std::fs::write(&path, &bad).unwrap();
        let started = std::time::Instant::now();
        let err = open_err(&path, false);
        assert!(err.starts_with("cannot open qcow2 image"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}

/// Damages 1-3 eight-byte entries of the header or the first six clusters
/// (refcount table and block, L1, L2) of `bytes`.
fn damage(bytes: &mut [u8], rand: &mut impl FnMut() -> u64) {
    for _ in 0..1 + rand() % 3 {
        let span = if rand().is_multiple_of(4) {
            104
        } else {
            (6 * 65536).min(bytes.len() as u64)
        };
        let at = (rand() % span) as usize & !7;
        let value = match rand() % 4 {
            0 => rand(),
            1 => rand() % (1 << 24),
            2 => (rand() % 64) << 16 | (rand() & (1 << 63)),
            _ => u64::MAX,
        };
        bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
    }
}

/// Corrupted metadata (an image from an untrusted source) ends in an open
/// error or I/O errors, never in a panic (zvmm aborts on panics).
#[test]
fn corrupted_metadata_never_panics() {
    let (_dir, dir) = scratch();
    let good = dir.join("good.qcow2");
    create(&good, &[], Some("4M"));
    let mem = memory();
    {
        let q = open(&good, false);
        for i in 0..8u64 {
            assert_eq!(
                write_sectors(&mem, &q, i * 1000, &pattern(i as u8, 4096)),
                OK
            );
        }
    }
    let bytes = std::fs::read(&good).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut refused, mut failing) = (0, 0);
    for round in 0..200 {
        let mut bad = bytes.clone();
        damage(&mut bad, &mut rand);
        let path = dir.join("bad.qcow2");
        std::fs::write(&path, &bad).unwrap();
        let Ok(disk) = DiskImage::open(&path, false, None) else {
            refused += 1;
            continue;
        };
        let b = backend_on(disk);
        let mut statuses = Vec::new();
        for i in 0..8u64 {
            statuses.push(read_sectors(&mem, &b, i * 1000, 4096).0);
            statuses.push(write_sectors(&mem, &b, i * 1000 + 7, &[1; 512]));
        }
        statuses.push(flush(&mem, &b));
        assert!(
            statuses.iter().all(|&s| s == OK || s == IOERR),
            "round {round}"
        );
        failing += usize::from(statuses.contains(&IOERR));
    }
    // The damage did reach the metadata.
    assert!(
        refused > 50 && failing > 10,
        "{refused} refused, {failing} failing"
    );
}
