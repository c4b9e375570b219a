//! The firmware mode's FAT32 reader (Microsoft's FAT specification 1.03):
//! the boot sector of the EFI system partition (its BPB checked and the FAT
//! type told by the cluster count, as the specification says), cluster
//! chains through the first FAT (one cached sector), directories with VFAT
//! long names (checksummed against their short entry, else the 8.3 name
//! with its lower-case flags), path lookup without regard to ASCII case,
//! and file contents streamed sector by sector. A malformed volume (a bad
//! cluster number, a chain that loops or ends early) is an error, never a
//! hang.

use crate::fwblk::{Disk, FwError, Sector, SECTOR};
use crate::gpt::Esp;
use crate::report;
use crate::serial::Quoted;

const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_LONG_NAME: u8 = 0x0f;
const ENTRY_FREE: u8 = 0xe5;
const ENTRY_END: u8 = 0x00;
const LFN_LAST: u8 = 0x40;
/// Characters one long-name entry holds, and where.
const LFN_CHARS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
/// Longest name kept (VFAT allows 255).
pub const NAME_MAX: usize = 255;
const FAT32_MIN_CLUSTERS: u32 = 65_525;
const FAT16_MIN_CLUSTERS: u32 = 4_085;
const CLUSTER_MASK: u32 = 0x0fff_ffff;
const END_OF_CHAIN: u32 = 0x0fff_fff8;

/// One directory entry (or the root directory itself).
#[derive(Clone, Copy)]
pub struct Entry {
    name: [u8; NAME_MAX],
    name_len: usize,
    /// Attribute bits.
    pub attr: u8,
    /// First cluster (0 for an empty file).
    pub cluster: u32,
    /// Size in bytes (0 for directories).
    pub size: u32,
}

impl Entry {
    /// The long name, else the 8.3 name (ASCII; other characters `?`).
    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }

    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.attr & ATTR_DIRECTORY != 0
    }

    fn directory(cluster: u32) -> Entry {
        Entry {
            name: [0; NAME_MAX],
            name_len: 0,
            attr: ATTR_DIRECTORY,
            cluster,
            size: 0,
        }
    }
}

/// A mounted FAT32 volume.
pub struct Volume {
    start_lba: u64,
    sectors_per_cluster: u32,
    fat_lba: u64,
    data_lba: u64,
    root_cluster: u32,
    clusters: u32,
    cached_lba: u64,
    cache: Sector,
}

/// Reads and checks the boot sector at the start of `esp`.
pub fn open(disk: &mut Disk, esp: Esp) -> Result<Volume, FwError> {
    let mut boot: Sector = [0; SECTOR];
    disk.read(esp.first_lba, &mut boot)?;
    if boot[510..512] != [0x55, 0xaa] {
        return Err(FwError::new("no_boot_signature"));
    }
    let bytes_per_sector = le16(&boot, 11);
    if usize::from(bytes_per_sector) != SECTOR {
        return Err(FwError::with("sector_size", u64::from(bytes_per_sector)));
    }
    let spc = u32::from(boot[13]);
    let reserved = u32::from(le16(&boot, 14));
    let fats = u32::from(boot[16]);
    if !spc.is_power_of_two() || reserved == 0 || fats == 0 {
        return Err(FwError::new("bad_bpb"));
    }
    let root_entries = u32::from(le16(&boot, 17));
    let total = match le16(&boot, 19) {
        0 => le32(&boot, 32),
        n => u32::from(n),
    };
    let fat_sectors = match le16(&boot, 22) {
        0 => le32(&boot, 36),
        n => u32::from(n),
    };
    let root_dir_sectors = (root_entries * 32).div_ceil(SECTOR as u32);
    let meta = u64::from(reserved) + u64::from(fats) * u64::from(fat_sectors);
    let data_sectors = u64::from(total)
        .checked_sub(meta + u64::from(root_dir_sectors))
        .ok_or(FwError::new("bad_bpb"))?;
    let clusters = (data_sectors / u64::from(spc)) as u32;
    let kind = match clusters {
        n if n < FAT16_MIN_CLUSTERS => 12,
        n if n < FAT32_MIN_CLUSTERS => 16,
        _ => 32,
    };
    let root_cluster = le32(&boot, 44);
    report!(
        "fw fat type=fat{kind} sectors_per_cluster={spc} reserved={reserved} fats={fats} fat_sectors={fat_sectors} root_cluster={root_cluster} clusters={clusters} total_sectors={total} oem={} label={}",
        Quoted(trim(&boot[3..11])),
        Quoted(trim(&boot[71..82]))
    );
    if kind != 32 {
        return Err(FwError::with("not_fat32", kind));
    }
    if u64::from(total) > esp.last_lba - esp.first_lba + 1 {
        return Err(FwError::with("beyond_partition", u64::from(total)));
    }
    Ok(Volume {
        start_lba: esp.first_lba,
        sectors_per_cluster: spc,
        fat_lba: esp.first_lba + u64::from(reserved),
        data_lba: esp.first_lba + meta,
        root_cluster,
        clusters,
        cached_lba: u64::MAX,
        cache: [0; SECTOR],
    })
}

impl Volume {
    /// The root directory.
    pub fn root(&self) -> Entry {
        Entry::directory(self.root_cluster)
    }

    /// The entry at `path` (`/`-separated from the root, any ASCII case);
    /// `None` if a component is missing or not a directory.
    pub fn lookup(&mut self, disk: &mut Disk, path: &[u8]) -> Result<Option<Entry>, FwError> {
        let mut current = self.root();
        for part in path.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            if !current.is_dir() {
                return Ok(None);
            }
            let mut found = None;
            self.walk(disk, &current, &mut |entry| {
                let hit = entry.name().eq_ignore_ascii_case(part);
                if hit {
                    found = Some(*entry);
                }
                hit
            })?;
            match found {
                Some(entry) => current = entry,
                None => return Ok(None),
            }
        }
        Ok(Some(current))
    }

    /// Calls `visit` for every entry of directory `dir` (not `.`, `..`,
    /// deleted entries or volume labels) until it returns true.
    pub fn walk(
        &mut self,
        disk: &mut Disk,
        dir: &Entry,
        visit: &mut dyn FnMut(&Entry) -> bool,
    ) -> Result<(), FwError> {
        let mut names = LongName::default();
        let mut sector: Sector = [0; SECTOR];
        let mut cluster = dir.cluster;
        for _ in 0..=self.clusters {
            let first = self.cluster_lba(cluster)?;
            for lba in first..first + u64::from(self.sectors_per_cluster) {
                disk.read(lba, &mut sector)?;
                for raw in sector.chunks_exact(32) {
                    match raw[0] {
                        ENTRY_END => return Ok(()),
                        ENTRY_FREE => names.clear(),
                        _ if raw[11] == ATTR_LONG_NAME => names.push(raw),
                        _ if raw[11] & ATTR_VOLUME_ID != 0 => names.clear(),
                        _ => {
                            let entry = names.entry(raw);
                            names.clear();
                            if !matches!(entry.name(), b"." | b"..") && visit(&entry) {
                                return Ok(());
                            }
                        }
                    }
                }
            }
            match self.next_cluster(disk, cluster)? {
                Some(next) => cluster = next,
                None => return Ok(()),
            }
        }
        Err(FwError::with("cluster_loop", u64::from(dir.cluster)))
    }

    /// Streams the first `limit` bytes (at most the whole file) of file
    /// `entry` to `sink`, one sector's worth at a time; returns the sectors
    /// read.
    pub fn read_file(
        &mut self,
        disk: &mut Disk,
        entry: &Entry,
        limit: usize,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<u32, FwError> {
        let mut left = (entry.size as usize).min(limit);
        let (mut cluster, mut sectors) = (entry.cluster, 0u32);
        let mut sector: Sector = [0; SECTOR];
        for _ in 0..=self.clusters {
            if left == 0 {
                return Ok(sectors);
            }
            let first = self.cluster_lba(cluster)?;
            for lba in first..first + u64::from(self.sectors_per_cluster) {
                disk.read(lba, &mut sector)?;
                sectors += 1;
                let take = left.min(SECTOR);
                sink(&sector[..take]);
                left -= take;
                if left == 0 {
                    return Ok(sectors);
                }
            }
            match self.next_cluster(disk, cluster)? {
                Some(next) => cluster = next,
                None => return Err(FwError::with("chain_short", left as u64)),
            }
        }
        Err(FwError::with("cluster_loop", u64::from(entry.cluster)))
    }

    /// First sector of `cluster`, which must be a data cluster.
    fn cluster_lba(&self, cluster: u32) -> Result<u64, FwError> {
        if cluster < 2 || cluster - 2 >= self.clusters {
            return Err(FwError::with("bad_cluster", u64::from(cluster)));
        }
        Ok(self.data_lba + u64::from(cluster - 2) * u64::from(self.sectors_per_cluster))
    }

    /// The cluster after `cluster`, `None` at the end of the chain.
    fn next_cluster(&mut self, disk: &mut Disk, cluster: u32) -> Result<Option<u32>, FwError> {
        let offset = u64::from(cluster) * 4;
        let lba = self.fat_lba + offset / SECTOR as u64;
        if lba != self.cached_lba {
            disk.read(lba, &mut self.cache)?;
            self.cached_lba = lba;
        }
        let next = le32(&self.cache, (offset % SECTOR as u64) as usize) & CLUSTER_MASK;
        match next {
            n if n >= END_OF_CHAIN => Ok(None),
            n if n < 2 || n - 2 >= self.clusters => Err(FwError::with("bad_cluster", u64::from(n))),
            n => Ok(Some(n)),
        }
    }

    /// First sector of the volume.
    pub fn start_lba(&self) -> u64 {
        self.start_lba
    }
}

/// A VFAT long name being collected from its entries (stored last part
/// first, each with the short entry's checksum).
#[derive(Default)]
struct LongName {
    chars: Chars,
    next: u8,
    checksum: u8,
    valid: bool,
}

/// The characters of a long name (13 per entry, at most 20 entries).
struct Chars([u8; 260]);

impl Default for Chars {
    fn default() -> Self {
        Chars([0; 260])
    }
}

impl LongName {
    fn clear(&mut self) {
        self.valid = false;
        self.next = 0;
    }

    fn push(&mut self, raw: &[u8]) {
        let order = raw[0];
        let seq = order & 0x1f;
        if order & LFN_LAST != 0 {
            self.chars.0.fill(0);
            self.valid = (1..=20).contains(&seq);
            self.next = seq;
            self.checksum = raw[13];
        }
        if !self.valid || seq != self.next || raw[13] != self.checksum {
            self.valid = false;
            return;
        }
        let base = usize::from(seq - 1) * LFN_CHARS.len();
        for (i, &at) in LFN_CHARS.iter().enumerate() {
            let unit = u16::from_le_bytes([raw[at], raw[at + 1]]);
            self.chars.0[base + i] = match unit {
                0 | 0xffff => 0,
                u if u < 0x80 => u as u8,
                _ => b'?',
            };
        }
        self.next -= 1;
    }

    /// The entry of short entry `raw`, named by the collected long name if
    /// it belongs to it.
    fn entry(&self, raw: &[u8]) -> Entry {
        let mut entry = Entry {
            name: [0; NAME_MAX],
            name_len: 0,
            attr: raw[11],
            cluster: (u32::from(le16(raw, 20)) << 16) | u32::from(le16(raw, 26)),
            size: le32(raw, 28),
        };
        if self.valid && self.next == 0 && short_checksum(&raw[..11]) == self.checksum {
            let len = self.chars.0.iter().position(|&c| c == 0).unwrap_or(260);
            let len = len.min(NAME_MAX);
            entry.name[..len].copy_from_slice(&self.chars.0[..len]);
            entry.name_len = len;
        } else {
            entry.name_len = short_name(raw, &mut entry.name);
        }
        entry
    }
}

/// The 8.3 name of `raw` into `out` (base and extension lower-cased as the
/// entry's case flags say); returns its length.
fn short_name(raw: &[u8], out: &mut [u8; NAME_MAX]) -> usize {
    let (base, ext) = (trim(&raw[..8]), trim(&raw[8..11]));
    let lower = |flag: u8, b: u8| {
        if raw[12] & flag != 0 {
            b.to_ascii_lowercase()
        } else {
            b
        }
    };
    let mut len = 0;
    for (i, &b) in base.iter().enumerate() {
        let b = if i == 0 && b == 0x05 { ENTRY_FREE } else { b };
        out[len] = lower(0x08, b);
        len += 1;
    }
    if !ext.is_empty() {
        out[len] = b'.';
        len += 1;
        for &b in ext {
            out[len] = lower(0x10, b);
            len += 1;
        }
    }
    len
}

/// The checksum a long name's entries carry of their short name.
fn short_checksum(name: &[u8]) -> u8 {
    name.iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

/// `bytes` without trailing spaces (and NULs).
fn trim(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
