//! Disk images for the virtio-blk tests (QEMU and zvmm alike): making
//! sparse raw images, the byte pattern the probe writes, snapshots proving
//! a run left a file alone, the virtio-blk feature bits the tests check,
//! and reading one `probe: blk ...` line as fields.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use crate::probe::{fnv1a64, Fields, ProbeReport};

/// Bytes per virtio-blk sector.
pub const SECTOR: u64 = 512;

/// virtio feature bit numbers (virtio 1.x, §5.2.3 and §6).
pub mod feature {
    /// `VIRTIO_BLK_F_SEG_MAX`.
    pub const SEG_MAX: u32 = 2;
    /// `VIRTIO_BLK_F_RO`.
    pub const RO: u32 = 5;
    /// `VIRTIO_BLK_F_BLK_SIZE`.
    pub const BLK_SIZE: u32 = 6;
    /// `VIRTIO_BLK_F_FLUSH`.
    pub const FLUSH: u32 = 9;
    /// `VIRTIO_BLK_F_DISCARD`.
    pub const DISCARD: u32 = 13;
    /// `VIRTIO_BLK_F_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u32 = 14;
    /// `VIRTIO_RING_F_INDIRECT_DESC`.
    pub const INDIRECT_DESC: u32 = 28;
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub const RING_EVENT_IDX: u32 = 29;
    /// `VIRTIO_F_VERSION_1`.
    pub const VERSION_1: u32 = 32;
}

/// Byte `i` of sector `sector` as the probe writes it (`probe.blk.write`).
pub fn pattern_byte(sector: u64, i: u64) -> u8 {
    ((sector * 31 + i) & 0xff) as u8
}

/// Everything `probe.blk.write=S:C` writes for `(sector, count)`.
pub fn pattern(sector: u64, count: u64) -> Vec<u8> {
    (sector..sector + count)
        .flat_map(|s| (0..SECTOR).map(move |i| pattern_byte(s, i)))
        .collect()
}

/// Creates a sparse image of `size` bytes with `data` written at the given
/// byte offsets, synced to disk. Panics on failure (test helper).
pub fn make_image(path: &Path, size: u64, data: &[(u64, Vec<u8>)]) {
    let fail = |what: &str, e: std::io::Error| -> ! {
        panic!("cannot {what} image {}: {e}", path.display())
    };
    let file = std::fs::File::create(path).unwrap_or_else(|e| fail("create", e));
    file.set_len(size).unwrap_or_else(|e| fail("size", e));
    for (offset, bytes) in data {
        file.write_all_at(bytes, *offset)
            .unwrap_or_else(|e| fail("write", e));
    }
    file.sync_all().unwrap_or_else(|e| fail("sync", e));
}

/// The bytes of `(sector, count)` in a whole image read into memory.
pub fn range_bytes(image: &[u8], (sector, count): (u64, u64)) -> &[u8] {
    &image[(sector * SECTOR) as usize..((sector + count) * SECTOR) as usize]
}

/// The fields of the first report line `{stem} {start}...`, parsed from
/// `start` on (so `start`'s own key is included). Panics with `context`
/// when there is no such line (test helper).
pub fn line(report: &ProbeReport, stem: &str, start: &str, context: &str) -> Fields {
    let prefix = format!("{stem} ");
    let rest = report
        .values(&prefix)
        .into_iter()
        .find(|rest| rest.starts_with(start))
        .unwrap_or_else(|| panic!("no line '{prefix}{start}...': {context}"));
    Fields::parse(rest)
}

/// Whether bit `bit` is set in a reported feature word (`0x...`).
pub fn has_feature(features: Option<u64>, bit: u32) -> bool {
    features.is_some_and(|f| f & (1 << bit) != 0)
}

/// What a run could have changed about a file or directory: size,
/// modification time, allocated blocks and (files) the content's FNV-1a.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileState {
    /// `st_size`.
    pub len: u64,
    /// `st_mtime` in nanoseconds.
    pub mtime_ns: i128,
    /// `st_blocks`.
    pub blocks: u64,
    /// Hash of the content; `None` for a directory.
    pub fnv1a64: Option<u64>,
}

impl FileState {
    /// Snapshots `path`; `None` if it does not exist.
    pub fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        let fnv1a64 = if meta.is_dir() {
            None
        } else {
            Some(fnv1a64(&std::fs::read(path).ok()?))
        };
        Some(Self {
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            blocks: meta.blocks(),
            fnv1a64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_matches_the_probe_formula() {
        let bytes = pattern(2, 2);
        assert_eq!(bytes.len(), 1024);
        assert_eq!(bytes[0], 62);
        assert_eq!(bytes[1], 63);
        assert_eq!(bytes[512], 93);
        assert_eq!(bytes[512 + 200], ((93 + 200) & 0xff) as u8);
    }

    #[test]
    fn image_is_sparse_and_holds_the_data() {
        let dir = std::env::temp_dir().join(format!("zvmm-disk-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        make_image(&path, 8 << 20, &[(4096, vec![7; 512])]);
        let state = FileState::of(&path).unwrap();
        assert_eq!(state.len, 8 << 20);
        assert!(state.blocks < 1024, "{state:?}");
        let image = std::fs::read(&path).unwrap();
        assert!(range_bytes(&image, (8, 1)).iter().all(|&b| b == 7));
        assert!(range_bytes(&image, (9, 1)).iter().all(|&b| b == 0));
        std::fs::write(&path, b"x").unwrap();
        assert_ne!(FileState::of(&path), Some(state));
        assert_eq!(FileState::of(&dir.join("none")), None);
        assert_eq!(FileState::of(&dir).unwrap().fnv1a64, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lines_and_features_are_read() {
        let report = ProbeReport::parse(
            "probe: blk slot=1 id=\"a b\"\nprobe: blk slot=1 read sector=0 status=ok\n",
        );
        let read = line(&report, "blk slot=1", "read ", "ctx");
        assert_eq!(read.get("status"), Some("ok"));
        assert_eq!(
            line(&report, "blk slot=1", "id=", "ctx").get("id"),
            Some("a b")
        );
        assert!(has_feature(Some(1 << 32), feature::VERSION_1));
        assert!(!has_feature(Some(1 << 32), feature::RO));
        assert!(!has_feature(None, feature::RO));
    }

    #[test]
    #[should_panic(expected = "no line 'blk slot=2 id=...': ctx")]
    fn missing_line_panics_with_context() {
        line(&ProbeReport::default(), "blk slot=2", "id=", "ctx");
    }
}
