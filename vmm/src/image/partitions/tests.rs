use super::*;

const MIB: u64 = 1 << 20;

/// A disk image in memory, read like a file (zeroes past the end).
struct Disk(Vec<u8>);

impl Disk {
    fn new(size: u64) -> Disk {
        Disk(vec![0; size as usize])
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        self.0[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let start = (offset as usize).min(self.0.len());
        let end = (start + buf.len()).min(self.0.len());
        buf[..end - start].copy_from_slice(&self.0[start..end]);
        Ok(())
    }

    fn table(&self) -> Option<PartitionTable> {
        read_table(&|buf, offset| self.read(buf, offset), self.0.len() as u64).unwrap()
    }
}

fn mbr_entry(status: u8, kind: u8, start: u32, sectors: u32) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0] = status;
    e[4] = kind;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    e
}

fn put_boot_signature(disk: &mut Disk, sector: u64) {
    disk.put(sector * 512 + 510, &[0x55, 0xaa]);
}

/// GUID bytes (mixed endian) for the text form.
fn guid_bytes(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let raw: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
    b[4..6].copy_from_slice(&[raw[5], raw[4]]);
    b[6..8].copy_from_slice(&[raw[7], raw[6]]);
    b[8..].copy_from_slice(&raw[8..]);
    b
}

const EFI: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// A GPT on 512-byte sectors with `parts` (type, first LBA, last LBA, name).
fn gpt_disk(size: u64, parts: &[(&str, u64, u64, &str)]) -> Disk {
    let mut disk = Disk::new(size);
    disk.put(446, &mbr_entry(0, 0xee, 1, (size / 512 - 1) as u32));
    put_boot_signature(&mut disk, 0);
    let mut entries = vec![0u8; 128 * 128];
    for (i, (kind, first, last, name)) in parts.iter().enumerate() {
        let e = &mut entries[i * 128..(i + 1) * 128];
        e[..16].copy_from_slice(&guid_bytes(kind));
        e[16..32].copy_from_slice(&[i as u8 + 1; 16]);
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        for (j, unit) in name.encode_utf16().enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&unit.to_le_bytes());
        }
    }
    let mut header = vec![0u8; 92];
    header[..8].copy_from_slice(b"EFI PART");
    header[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    header[12..16].copy_from_slice(&92u32.to_le_bytes());
    header[24..32].copy_from_slice(&1u64.to_le_bytes());
    header[56..72].copy_from_slice(&guid_bytes("01234567-89AB-CDEF-0123-456789ABCDEF"));
    header[72..80].copy_from_slice(&2u64.to_le_bytes());
    header[80..84].copy_from_slice(&128u32.to_le_bytes());
    header[84..88].copy_from_slice(&128u32.to_le_bytes());
    header[88..92].copy_from_slice(&crc32(&entries).to_le_bytes());
    let crc = crc32(&header);
    header[16..20].copy_from_slice(&crc.to_le_bytes());
    disk.put(512, &header);
    disk.put(1024, &entries);
    disk
}

fn ext4_superblock(label: &str) -> Vec<u8> {
    let mut b = vec![0u8; 2048];
    b[1024 + 56..1024 + 58].copy_from_slice(&0xef53u16.to_le_bytes());
    b[1024 + 96..1024 + 100].copy_from_slice(&0x2c2u32.to_le_bytes());
    b[1024 + 120..1024 + 120 + label.len()].copy_from_slice(label.as_bytes());
    b
}

fn fat32_boot_sector(label: &[u8; 11]) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..3].copy_from_slice(&[0xeb, 0x58, 0x90]);
    b[11..13].copy_from_slice(&512u16.to_le_bytes());
    b[13] = 8;
    b[0x42] = 0x29;
    b[0x47..0x52].copy_from_slice(label);
    b[0x52..0x5a].copy_from_slice(b"FAT32   ");
    b[510..].copy_from_slice(&[0x55, 0xaa]);
    b
}

#[test]
fn the_crc_is_ieee_crc32() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    assert_eq!(crc32(b""), 0);
}

#[test]
fn guids_print_mixed_endian() {
    assert_eq!(guid(&guid_bytes(EFI)), EFI);
}

#[test]
fn a_gpt_lists_partitions_with_types_names_and_labels() {
    let mut disk = gpt_disk(
        64 * MIB,
        &[(EFI, 2048, 34815, "EFI"), (LINUX, 34816, 131038, "root")],
    );
    disk.put(2048 * 512, &fat32_boot_sector(b"EFI-SYSTEM "));
    disk.put(34816 * 512, &ext4_superblock("cloudimg-rootfs"));
    let table = disk.table().expect("a GPT");
    assert_eq!(table.kind, "gpt");
    assert_eq!(table.disk_id, "01234567-89AB-CDEF-0123-456789ABCDEF");
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    let [efi, root] = &table.partitions[..] else {
        panic!("two partitions: {:?}", table.partitions)
    };
    assert_eq!((efi.number, efi.start, efi.size), (1, MIB, 16 * MIB));
    assert_eq!(efi.type_name, Some("EFI System"));
    assert_eq!(efi.name.as_deref(), Some("EFI"));
    assert_eq!(
        efi.filesystem,
        Some(Filesystem {
            kind: "vfat",
            label: Some("EFI-SYSTEM".into())
        })
    );
    assert_eq!((root.number, root.start), (2, 17 * MIB));
    assert_eq!(root.size, (131038 - 34816 + 1) * 512);
    assert_eq!(root.type_name, Some("Linux filesystem"));
    assert_eq!(
        root.filesystem,
        Some(Filesystem {
            kind: "ext4",
            label: Some("cloudimg-rootfs".into())
        })
    );
}

#[test]
fn a_damaged_gpt_header_is_reported() {
    let mut disk = gpt_disk(8 * MIB, &[(LINUX, 2048, 4095, "data")]);
    disk.put(512 + 24, &7u64.to_le_bytes());
    let table = disk.table().unwrap();
    assert_eq!(table.partitions.len(), 1);
    assert!(table.warnings[0].contains("CRC"), "{:?}", table.warnings);
}

#[test]
fn a_partition_past_the_end_is_a_warning_not_a_read() {
    let disk = gpt_disk(4 * MIB, &[(LINUX, 2048, 1 << 40, "huge")]);
    let table = disk.table().unwrap();
    assert_eq!(table.partitions[0].filesystem, None);
    assert!(
        table.warnings[0].contains("past the end"),
        "{:?}",
        table.warnings
    );
}

#[test]
fn an_mbr_follows_logical_partitions() {
    let mut disk = Disk::new(64 * MIB);
    disk.put(440, &0xdead_beefu32.to_le_bytes());
    disk.put(446, &mbr_entry(0x80, 0x83, 2048, 16384));
    disk.put(462, &mbr_entry(0, 0x05, 18432, 100000));
    put_boot_signature(&mut disk, 0);
    // First EBR: a logical partition and a link to the second EBR.
    disk.put(18432 * 512 + 446, &mbr_entry(0, 0x82, 2048, 8192));
    disk.put(18432 * 512 + 462, &mbr_entry(0, 0x05, 20480, 30000));
    put_boot_signature(&mut disk, 18432);
    disk.put(38912 * 512 + 446, &mbr_entry(0, 0x83, 2048, 4096));
    put_boot_signature(&mut disk, 38912);
    disk.put(2048 * 512, &ext4_superblock("boot"));
    let table = disk.table().expect("an MBR");
    assert_eq!(table.kind, "mbr");
    assert_eq!(table.disk_id, "0xdeadbeef");
    let numbers: Vec<(u32, u64, &str)> = table
        .partitions
        .iter()
        .map(|p| (p.number, p.start / 512, p.type_id.as_str()))
        .collect();
    assert_eq!(
        numbers,
        [
            (1, 2048, "0x83"),
            (2, 18432, "0x05"),
            (5, 20480, "0x82"),
            (6, 40960, "0x83")
        ]
    );
    assert_eq!(
        table.partitions[0]
            .filesystem
            .as_ref()
            .unwrap()
            .label
            .as_deref(),
        Some("boot")
    );
}

#[test]
fn a_looping_extended_chain_stops() {
    let mut disk = Disk::new(16 * MIB);
    disk.put(446, &mbr_entry(0, 0x05, 2048, 20000));
    put_boot_signature(&mut disk, 0);
    disk.put(2048 * 512 + 446, &mbr_entry(0, 0x83, 63, 100));
    disk.put(2048 * 512 + 462, &mbr_entry(0, 0x05, 0, 100));
    put_boot_signature(&mut disk, 2048);
    let table = disk.table().unwrap();
    assert_eq!(table.partitions.len(), 2);
    assert!(table.warnings[0].contains("loops"), "{:?}", table.warnings);
}

#[test]
fn a_fat_disk_without_partitions_is_no_table() {
    let mut disk = Disk::new(4 * MIB);
    disk.put(0, &fat32_boot_sector(b"CIDATA     "));
    assert_eq!(disk.table(), None);
    let fs = probe_filesystem(&|buf, offset| disk.read(buf, offset), 0).unwrap();
    assert_eq!(
        fs,
        Some(Filesystem {
            kind: "vfat",
            label: Some("CIDATA".into())
        })
    );
}

#[test]
fn blank_disks_have_neither_table_nor_file_system() {
    let disk = Disk::new(MIB);
    assert_eq!(disk.table(), None);
    let fs = probe_filesystem(&|buf, offset| disk.read(buf, offset), 0).unwrap();
    assert_eq!(fs, None);
}

#[test]
fn other_signatures_are_named() {
    let mut swap = vec![0u8; PROBE_BYTES];
    swap[4086..4096].copy_from_slice(b"SWAPSPACE2");
    swap[1052..1056].copy_from_slice(b"swap");
    let mut xfs = vec![0u8; PROBE_BYTES];
    xfs[..4].copy_from_slice(b"XFSB");
    xfs[108..112].copy_from_slice(b"data");
    let mut iso = vec![0u8; PROBE_BYTES];
    iso[0x8001..0x8006].copy_from_slice(b"CD001");
    iso[0x8028..0x8048].copy_from_slice(b"cidata                          ");
    let kinds: Vec<_> = [swap, xfs, iso]
        .iter()
        .map(|b| identify_filesystem(b).map(|f| (f.kind, f.label)))
        .collect();
    assert_eq!(
        kinds,
        [
            Some(("swap", Some("swap".into()))),
            Some(("xfs", Some("data".into()))),
            Some(("iso9660", Some("cidata".into())))
        ]
    );
}
