//! What the guest view of an image holds, as far as headers say cheaply:
//! its partition table (GPT with 512- or 4096-byte sectors, or MBR with
//! its extended partitions' logical ones) and, on each partition or on a
//! disk without a table, the file system kind and label from its
//! superblock (ext2/3/4, FAT, XFS, swap, ISO 9660; LVM and LUKS by
//! signature). Reads only headers and tables, through a `read` callback
//! over the guest view, so the same code serves raw and qcow2 images.
//!
//! GPT headers and entry arrays are checked with their CRC-32s; a bad
//! primary header is not repaired from the backup (a warning says so).

use std::io;

use serde::Serialize;

/// Reads guest bytes at an offset into the buffer (zeroes past the end).
pub type ReadAt<'a> = &'a dyn Fn(&mut [u8], u64) -> io::Result<()>;

/// Most GPT entries read.
const MAX_GPT_ENTRIES: u32 = 1024;
/// Most logical partitions followed in an extended partition.
const MAX_LOGICAL: usize = 128;
/// Bytes read at the start of a partition to find its file system.
const PROBE_BYTES: usize = 0x8800;

/// A partition table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionTable {
    /// "gpt" or "mbr".
    pub kind: &'static str,
    /// The disk GUID (GPT) or the 32-bit disk signature (MBR).
    pub disk_id: String,
    /// Bytes per sector the table is laid out in.
    pub sector_size: u64,
    /// The partitions, in table order.
    pub partitions: Vec<Partition>,
    /// What looked wrong.
    pub warnings: Vec<String>,
}

/// One partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// 1-based (MBR logical partitions from 5).
    pub number: u32,
    /// Start in bytes.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// The type as written (GPT type GUID, MBR type byte as `0x83`).
    pub type_id: String,
    /// What the type means, where known.
    pub type_name: Option<&'static str>,
    /// The GPT partition name.
    pub name: Option<String>,
    /// The file system found at its start.
    pub filesystem: Option<Filesystem>,
}

/// A file system (or other signature) at the start of a partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Filesystem {
    /// "ext4", "vfat", "xfs", "swap", "iso9660", "LVM2_member", ...
    pub kind: &'static str,
    /// Its label, if it has one.
    pub label: Option<String>,
}

/// The partition table of a disk of `disk_size` bytes, if it has one,
/// with the file system of each partition.
pub fn read_table(read: ReadAt, disk_size: u64) -> io::Result<Option<PartitionTable>> {
    let mut head = vec![0u8; 2 * 4096];
    read(&mut head, 0)?;
    let mut table = match read_gpt(read, &head)? {
        Some(table) => table,
        None => match read_mbr(read, &head)? {
            Some(table) => table,
            None => return Ok(None),
        },
    };
    for partition in &mut table.partitions {
        let end = partition.start.saturating_add(partition.size);
        if end > disk_size {
            table.warnings.push(format!(
                "partition {} ends at byte {end}, past the end of the disk ({disk_size})",
                partition.number
            ));
            continue;
        }
        partition.filesystem = probe_filesystem(read, partition.start)?;
    }
    Ok(Some(table))
}

/// The file system starting at byte `start` of the guest view.
pub fn probe_filesystem(read: ReadAt, start: u64) -> io::Result<Option<Filesystem>> {
    let mut bytes = vec![0u8; PROBE_BYTES];
    read(&mut bytes, start)?;
    Ok(identify_filesystem(&bytes))
}

/// The file system whose first bytes are `b` (at least [`PROBE_BYTES`]).
fn identify_filesystem(b: &[u8]) -> Option<Filesystem> {
    let found = |kind, label| Some(Filesystem { kind, label });
    if le16(b, 1024 + 56) == 0xef53 {
        let sb = &b[1024..2048];
        let (compat, incompat) = (le32(sb, 92), le32(sb, 96));
        // extents, 64bit, flex_bg: ext4; a journal: ext3.
        let kind = if incompat & 0x2c0 != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };
        return found(kind, text(&sb[120..136]));
    }
    if b.starts_with(b"XFSB") {
        return found("xfs", text(&b[108..120]));
    }
    if &b[4086..4096] == b"SWAPSPACE2" {
        return found("swap", text(&b[1052..1068]));
    }
    if &b[0x8001..0x8006] == b"CD001" {
        return found("iso9660", text(&b[0x8028..0x8048]));
    }
    if &b[512..520] == b"LABELONE" {
        return found("LVM2_member", None);
    }
    if b.starts_with(b"LUKS\xba\xbe") {
        return found("crypto_LUKS", None);
    }
    if &b[3..11] == b"NTFS    " {
        return found("ntfs", None);
    }
    if &b[3..11] == b"EXFAT   " {
        return found("exfat", None);
    }
    fat(b)
}

/// A FAT12/16/32 boot sector and the label it carries.
fn fat(b: &[u8]) -> Option<Filesystem> {
    let bytes_per_sector = le16(b, 11);
    let plausible = b[510..512] == [0x55, 0xaa]
        && matches!(b[0], 0xeb | 0xe9)
        && bytes_per_sector.is_power_of_two()
        && (512..=4096).contains(&bytes_per_sector)
        && b[13] != 0;
    if !plausible {
        return None;
    }
    // FAT32 has no 16-bit FAT size; its extended boot record sits later.
    let (signature, label) = if le16(b, 22) == 0 {
        (b[0x42], &b[0x47..0x52])
    } else {
        (b[0x26], &b[0x2b..0x36])
    };
    let label = (signature == 0x29)
        .then(|| text(label))
        .flatten()
        .filter(|l| l != "NO NAME");
    Some(Filesystem {
        kind: "vfat",
        label,
    })
}

fn read_gpt(read: ReadAt, head: &[u8]) -> io::Result<Option<PartitionTable>> {
    for sector in [512u64, 4096] {
        let header = &head[sector as usize..sector as usize + 512];
        if header.starts_with(b"EFI PART") {
            return read_gpt_at(read, header, sector).map(Some);
        }
    }
    Ok(None)
}

fn read_gpt_at(read: ReadAt, header: &[u8], sector: u64) -> io::Result<PartitionTable> {
    let mut warnings = Vec::new();
    let header_size = (le32(header, 12) as usize).clamp(92, 512);
    let mut copy = header[..header_size].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != le32(header, 16) {
        warnings.push("the GPT header's CRC does not match (damaged or edited by hand)".into());
    }
    let count = le32(header, 80).min(MAX_GPT_ENTRIES);
    let entry_size = le32(header, 84);
    if !(128..=4096).contains(&entry_size) || !entry_size.is_multiple_of(8) {
        warnings.push(format!("GPT entry size {entry_size} is invalid"));
        return Ok(gpt_table(header, sector, Vec::new(), warnings));
    }
    let mut entries = vec![0u8; count as usize * entry_size as usize];
    let entries_at = le64(header, 72).saturating_mul(sector);
    read(&mut entries, entries_at)?;
    if count == le32(header, 80) && crc32(&entries) != le32(header, 88) {
        warnings.push("the GPT partition array's CRC does not match".into());
    }
    let partitions = entries
        .chunks(entry_size as usize)
        .enumerate()
        .filter(|(_, entry)| entry[..16].iter().any(|&b| b != 0))
        .map(|(index, entry)| gpt_partition(index as u32 + 1, entry, sector))
        .collect();
    Ok(gpt_table(header, sector, partitions, warnings))
}

fn gpt_table(
    header: &[u8],
    sector: u64,
    partitions: Vec<Partition>,
    warnings: Vec<String>,
) -> PartitionTable {
    PartitionTable {
        kind: "gpt",
        disk_id: guid(&header[56..72]),
        sector_size: sector,
        partitions,
        warnings,
    }
}

fn gpt_partition(number: u32, entry: &[u8], sector: u64) -> Partition {
    let (first, last) = (le64(entry, 32), le64(entry, 40));
    let name: Vec<u16> = entry[56..128]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&c| c != 0)
        .collect();
    let type_id = guid(&entry[..16]);
    Partition {
        number,
        start: first.saturating_mul(sector),
        size: last
            .saturating_sub(first)
            .saturating_add(1)
            .saturating_mul(sector),
        type_name: gpt_type_name(&type_id),
        type_id,
        name: Some(String::from_utf16_lossy(&name)).filter(|n| !n.is_empty()),
        filesystem: None,
    }
}

fn read_mbr(read: ReadAt, head: &[u8]) -> io::Result<Option<PartitionTable>> {
    if head[510..512] != [0x55, 0xaa] {
        return Ok(None);
    }
    let entries = mbr_entries(&head[..512]);
    let valid = entries
        .iter()
        .all(|e| matches!(e.status, 0x00 | 0x80) || e.kind == 0);
    if !valid || entries.iter().all(|e| e.kind == 0) || fat(head).is_some() {
        return Ok(None);
    }
    let mut table = PartitionTable {
        kind: "mbr",
        disk_id: format!("0x{:08x}", le32(head, 440)),
        sector_size: 512,
        partitions: Vec::new(),
        warnings: Vec::new(),
    };
    for (index, entry) in entries.iter().enumerate() {
        if entry.kind == 0 {
            continue;
        }
        if entry.kind == 0xee {
            table
                .warnings
                .push("a protective MBR for GPT, but no valid GPT header".into());
        }
        table.partitions.push(entry.partition(index as u32 + 1, 0));
        if is_extended(entry.kind) {
            read_logical(read, u64::from(entry.start), &mut table)?;
        }
    }
    Ok(Some(table))
}

/// Follows the chain of extended boot records starting at sector `base`.
fn read_logical(read: ReadAt, base: u64, table: &mut PartitionTable) -> io::Result<()> {
    let mut next = 0u64;
    let mut seen = Vec::new();
    while seen.len() < MAX_LOGICAL {
        let ebr_at = base + next;
        if seen.contains(&ebr_at) {
            table
                .warnings
                .push("the extended partition's chain loops".into());
            return Ok(());
        }
        seen.push(ebr_at);
        let mut ebr = vec![0u8; 512];
        read(&mut ebr, ebr_at * 512)?;
        if ebr[510..512] != [0x55, 0xaa] {
            table
                .warnings
                .push(format!("no extended boot record at sector {ebr_at}"));
            return Ok(());
        }
        let [logical, link, ..] = mbr_entries(&ebr);
        if logical.kind != 0 {
            let number = 5 + table.partitions.iter().filter(|p| p.number >= 5).count() as u32;
            table.partitions.push(logical.partition(number, ebr_at));
        }
        if link.kind == 0 || !is_extended(link.kind) {
            return Ok(());
        }
        next = u64::from(link.start);
    }
    table
        .warnings
        .push(format!("more than {MAX_LOGICAL} logical partitions"));
    Ok(())
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

#[derive(Clone, Copy)]
struct MbrEntry {
    status: u8,
    kind: u8,
    start: u32,
    sectors: u32,
}

impl MbrEntry {
    fn partition(&self, number: u32, base: u64) -> Partition {
        Partition {
            number,
            start: (base + u64::from(self.start)) * 512,
            size: u64::from(self.sectors) * 512,
            type_id: format!("0x{:02x}", self.kind),
            type_name: mbr_type_name(self.kind),
            name: None,
            filesystem: None,
        }
    }
}

fn mbr_entries(sector: &[u8]) -> [MbrEntry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        MbrEntry {
            status: e[0],
            kind: e[4],
            start: le32(e, 8),
            sectors: le32(e, 12),
        }
    })
}

fn gpt_type_name(guid: &str) -> Option<&'static str> {
    Some(match guid {
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "8484680C-9521-48C6-9C11-B0720656F69E" => "Linux /usr (x86-64)",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915" => "Linux home",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "CA7D7CCB-63ED-4C53-861C-1742536059CC" => "Linux LUKS",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        _ => return None,
    })
}

fn mbr_type_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        0x01 => "FAT12",
        0x04 | 0x06 => "FAT16",
        0x05 => "Extended",
        0x07 => "HPFS/NTFS/exFAT",
        0x0b => "W95 FAT32",
        0x0c => "W95 FAT32 (LBA)",
        0x0e => "W95 FAT16 (LBA)",
        0x0f => "W95 Extended (LBA)",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x85 => "Linux extended",
        0x8e => "Linux LVM",
        0xee => "GPT protective",
        0xef => "EFI (FAT-12/16/32)",
        0xfd => "Linux RAID autodetect",
        _ => return None,
    })
}

/// A mixed-endian GUID as `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`.
fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        le32(b, 0),
        le16(b, 4),
        le16(b, 6),
        b[8],
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02X}"))
            .collect::<String>()
    )
}

/// A NUL- or space-padded label; `None` when empty.
fn text(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let label = String::from_utf8_lossy(&bytes[..end])
        .trim_end()
        .to_string();
    (!label.is_empty()).then_some(label)
}

/// CRC-32 (IEEE, reflected), as GPT uses.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests;
