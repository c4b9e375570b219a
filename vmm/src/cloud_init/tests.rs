use std::io::{Cursor, Read};
use std::os::unix::fs::PermissionsExt;

use super::*;

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zvmm-cloud-init-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn user_data_only(path: &Path) -> CloudInitConfig {
    CloudInitConfig {
        user_data: Some(path.to_path_buf()),
        ..Default::default()
    }
}

fn gather_error(config: &CloudInitConfig) -> String {
    SeedFiles::gather(config).unwrap_err().to_string()
}

fn file(name: SeedName, bytes: &[u8]) -> SeedFile {
    SeedFile {
        name,
        bytes: bytes.to_vec(),
        generated: false,
    }
}

/// What a FAT reader finds in an image: both labels, and each root file.
struct ReadBack {
    boot_label: String,
    root_label: Option<String>,
    fat_type: fatfs::FatType,
    files: Vec<(String, Vec<u8>)>,
}

fn read_back(image: &[u8]) -> ReadBack {
    let fs = fatfs::FileSystem::new(Cursor::new(image.to_vec()), fatfs::FsOptions::new()).unwrap();
    let mut files = Vec::new();
    for entry in fs.root_dir().iter() {
        let entry = entry.unwrap();
        let mut bytes = Vec::new();
        entry.to_file().read_to_end(&mut bytes).unwrap();
        files.push((entry.file_name(), bytes));
    }
    ReadBack {
        boot_label: fs.volume_label(),
        root_label: fs.read_volume_label_from_root_dir().unwrap(),
        fat_type: fs.fat_type(),
        files,
    }
}

#[test]
fn option_forms_parse() {
    let config = parse_cloud_init("user-data=/u,meta-data=/m,network-config=/n").unwrap();
    assert_eq!(config.user_data, Some(PathBuf::from("/u")));
    assert_eq!(config.meta_data, Some(PathBuf::from("/m")));
    assert_eq!(config.network_config, Some(PathBuf::from("/n")));
    assert_eq!(config.dir, None);
    assert_eq!(
        parse_cloud_init("/u").unwrap(),
        user_data_only(Path::new("/u")),
        "a bare value is user-data"
    );
    let dir = parse_cloud_init("dir=/seed").unwrap();
    assert_eq!(dir.dir, Some(PathBuf::from("/seed")));
    let vendor = parse_cloud_init("user-data=/u,vendor-data=/v").unwrap();
    assert_eq!(vendor.vendor_data, Some(PathBuf::from("/v")));
}

#[test]
fn bad_option_forms_are_refused_with_one_line() {
    let unknown = parse_cloud_init("user-data=/u,hostname=x").unwrap_err();
    assert_eq!(
        unknown.to_string(),
        "--cloud-init: unknown key 'hostname' (known: user-data, meta-data, network-config, vendor-data, dir)"
    );
    let both = parse_cloud_init("dir=/d,user-data=/u").unwrap_err();
    assert!(both.to_string().contains("not both"), "{both}");
    let no_user_data = parse_cloud_init("meta-data=/m").unwrap_err();
    assert!(
        no_user_data
            .to_string()
            .contains("user-data=FILE (or dir=DIR) is required"),
        "{no_user_data}"
    );
    let empty = parse_cloud_init("user-data=").unwrap_err();
    assert_eq!(
        empty.to_string(),
        "--cloud-init: bad value '' for 'user-data': expected a path"
    );
    assert!(matches!(
        parse_cloud_init("user-data=/a,user-data=/b"),
        Err(ConfigError::DuplicateKey { .. })
    ));
}

#[test]
fn named_files_are_read_in_seed_order_with_meta_data_generated() {
    let dir = scratch("named");
    let config = CloudInitConfig {
        network_config: Some(write(&dir, "net.yaml", b"version: 2\n")),
        user_data: Some(write(&dir, "u.yaml", b"#cloud-config\n")),
        ..Default::default()
    };
    let files = SeedFiles::gather(&config).unwrap();
    let names: Vec<_> = files
        .files()
        .iter()
        .map(|f| (f.name, f.generated))
        .collect();
    assert_eq!(
        names,
        vec![
            (SeedName::UserData, false),
            (SeedName::MetaData, true),
            (SeedName::NetworkConfig, false),
        ]
    );
    assert_eq!(files.files()[0].bytes, b"#cloud-config\n");
    let meta = String::from_utf8(files.files()[1].bytes.clone()).unwrap();
    assert!(meta.starts_with("instance-id: iid-zvmm-"), "{meta}");
    assert!(meta.contains("\nlocal-hostname: zvmm\n"), "{meta}");
}

#[test]
fn generated_instance_id_follows_the_other_files() {
    let id = |user_data: &[u8]| {
        let files = SeedFiles::from_files(vec![file(SeedName::UserData, user_data)]);
        files.files()[1].bytes.clone()
    };
    assert_eq!(id(b"a"), id(b"a"), "same files, same instance");
    assert_ne!(id(b"a"), id(b"b"), "changed user-data, new instance");
    let given = SeedFiles::from_files(vec![
        file(SeedName::MetaData, b"instance-id: mine\n"),
        file(SeedName::UserData, b""),
    ]);
    assert_eq!(given.files().len(), 2);
    assert_eq!(given.files()[1].bytes, b"instance-id: mine\n");
    assert!(!given.files()[1].generated);
}

#[test]
fn a_seed_directory_gives_its_files_and_ignores_others() {
    let dir = scratch("dir");
    write(&dir, "user-data", b"#cloud-config\n");
    write(&dir, "meta-data", b"instance-id: i-1\n");
    write(&dir, "vendor-data", b"v");
    write(&dir, "README", b"not part of the seed");
    let config = CloudInitConfig {
        dir: Some(dir.clone()),
        ..Default::default()
    };
    let files = SeedFiles::gather(&config).unwrap();
    let names: Vec<_> = files.files().iter().map(|f| f.name).collect();
    assert_eq!(
        names,
        vec![SeedName::UserData, SeedName::MetaData, SeedName::VendorData]
    );
    assert_eq!(files.files()[1].bytes, b"instance-id: i-1\n");
}

#[test]
fn missing_directory_and_unreadable_files_are_named() {
    let dir = scratch("bad-files");
    let missing = dir.join("nope.yaml");
    assert_eq!(
        gather_error(&user_data_only(&missing)),
        format!("cloud-init user-data {}: no such file", missing.display())
    );
    assert_eq!(
        gather_error(&user_data_only(&dir)),
        format!(
            "cloud-init user-data {0} is a directory; give a file, or dir={0} for a seed directory",
            dir.display()
        )
    );
    // Root reads any mode, but /proc/self/mem fails its first read.
    let mem = Path::new("/proc/self/mem");
    let err = SeedFiles::gather(&user_data_only(mem)).unwrap_err();
    assert!(matches!(err, CloudInitError::Read { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "cannot read cloud-init user-data /proc/self/mem"
    );
    assert!(
        gather_error(&user_data_only(Path::new("/dev/null"))).ends_with("is not a regular file")
    );
    let user_data = write(&dir, "u", b"");
    let config = CloudInitConfig {
        meta_data: Some(dir.clone()),
        ..user_data_only(&user_data)
    };
    let err = gather_error(&config);
    assert_eq!(
        err,
        format!(
            "cloud-init meta-data {} is a directory; give a file",
            dir.display()
        )
    );
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    let dir = scratch("fifo");
    let fifo = dir.join("user-data");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: c_path is a valid NUL-terminated path for the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let err = gather_error(&user_data_only(&fifo));
    assert!(err.ends_with("is not a regular file"), "{err}");
}

#[test]
fn seed_directory_problems_are_named() {
    let dir = scratch("dir-problems");
    let config = |dir: &Path| CloudInitConfig {
        dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    write(&dir, "meta-data", b"instance-id: x\n");
    assert_eq!(
        gather_error(&config(&dir)),
        format!(
            "cloud-init dir {} has no user-data file; cloud-init needs one (an empty file will do)",
            dir.display()
        )
    );
    let not_dir = write(&dir, "plain", b"");
    assert_eq!(
        gather_error(&config(&not_dir)),
        format!("cloud-init dir {} is not a directory", not_dir.display())
    );
    let gone = dir.join("gone");
    assert_eq!(
        gather_error(&config(&gone)),
        format!("cloud-init dir {}: no such directory", gone.display())
    );
    std::fs::create_dir(dir.join("user-data")).unwrap();
    let err = gather_error(&config(&dir));
    assert!(
        err.ends_with("user-data is a directory; give a file"),
        "{err}"
    );
}

#[test]
fn files_larger_than_a_seed_holds_are_refused() {
    let dir = scratch("too-large");
    let big = dir.join("big");
    File::create(&big)
        .unwrap()
        .set_len(MAX_SEED_DATA + 1)
        .unwrap();
    assert_eq!(
        gather_error(&user_data_only(&big)),
        format!(
            "cloud-init user-data {} is {} bytes; a seed holds at most 64 MiB",
            big.display(),
            MAX_SEED_DATA + 1
        )
    );
    let half = dir.join("half");
    File::create(&half)
        .unwrap()
        .set_len(MAX_SEED_DATA / 2 + 1)
        .unwrap();
    let config = CloudInitConfig {
        vendor_data: Some(half.clone()),
        ..user_data_only(&half)
    };
    assert_eq!(
        gather_error(&config),
        format!(
            "cloud-init files total {} bytes; a seed holds at most 64 MiB",
            MAX_SEED_DATA + 2
        )
    );
}

#[test]
fn a_small_seed_is_a_2_mib_fat12_labelled_cidata_in_both_places() {
    let user_data = b"#cloud-config\npassword: zvmm\n".to_vec();
    let files = SeedFiles::from_files(vec![
        file(SeedName::UserData, &user_data),
        file(SeedName::NetworkConfig, b"version: 2\n"),
    ]);
    let image = SeedImage::build(files.clone()).unwrap();
    assert_eq!(image.bytes.len() as u64, MIN_IMAGE_SIZE);
    assert_eq!(image.fat_type, "FAT12");
    let back = read_back(&image.bytes);
    assert_eq!(back.fat_type, fatfs::FatType::Fat12);
    assert_eq!(back.boot_label, "CIDATA");
    assert_eq!(back.root_label.as_deref(), Some("CIDATA"));
    let expected: Vec<_> = files
        .files()
        .iter()
        .map(|f| (f.name.file_name().to_string(), f.bytes.clone()))
        .collect();
    assert_eq!(back.files, expected);
    // The layout the probe's 4 KiB read relies on: boot sector, two FATs
    // of two sectors, one root-directory sector, then user-data.
    let head = 6 * SECTOR_SIZE as usize;
    assert_eq!(&image.bytes[head..head + user_data.len()], &user_data[..]);
    assert_eq!(&image.bytes[510..512], &[0x55, 0xaa], "boot signature");
    let fs = fatfs::FileSystem::new(Cursor::new(image.bytes.clone()), fatfs::FsOptions::new());
    let fs = fs.unwrap();
    let entry = fs.root_dir().iter().next().unwrap().unwrap();
    let epoch = fatfs::Date {
        year: 1980,
        month: 1,
        day: 1,
    };
    assert_eq!(entry.created().date, epoch, "a valid date");
    assert_eq!(entry.modified().date, epoch);
    assert_eq!(
        image.summary(),
        "2097152 bytes, FAT12 labelled CIDATA: user-data, meta-data (generated), network-config"
    );
}

#[test]
fn the_same_files_give_the_same_image() {
    let files = || SeedFiles::from_files(vec![file(SeedName::UserData, b"#!/bin/sh\n")]);
    let first = SeedImage::build(files()).unwrap();
    let second = SeedImage::build(files()).unwrap();
    assert!(first.bytes == second.bytes);
    let other = SeedImage::build(SeedFiles::from_files(vec![file(SeedName::UserData, b"x")]));
    assert!(
        other.unwrap().bytes[..512] != first.bytes[..512],
        "volume id"
    );
}

#[test]
fn the_image_grows_only_as_the_files_need() {
    for (len, fat) in [
        (2 << 20, fatfs::FatType::Fat12),
        (20 << 20, fatfs::FatType::Fat16),
    ] {
        let user_data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let image = SeedImage::build(SeedFiles::from_files(vec![
            file(SeedName::UserData, &user_data),
            file(SeedName::VendorData, &user_data[..5000]),
        ]))
        .unwrap();
        let size = image.bytes.len() as u64;
        assert!(size > len as u64 + 5000, "{len}: {size}");
        assert!(size <= len as u64 + (2 << 20), "{len}: {size} too big");
        let back = read_back(&image.bytes);
        assert_eq!(back.fat_type, fat, "{len}");
        assert!(back.files[0].1 == user_data, "{len}: user-data");
        assert!(back.files[2].1 == user_data[..5000], "{len}: vendor-data");
    }
}

#[test]
fn an_attached_seed_is_a_private_unlinked_read_only_last_disk() {
    let dir = scratch("attach");
    let mut config = VmConfig {
        cloud_init: Some(user_data_only(&write(&dir, "u", b"#cloud-config\n"))),
        disks: vec![crate::config::parse_disk("/img/root.raw").unwrap()],
        ..Default::default()
    };
    let seed = attach_seed(&mut config).unwrap().unwrap();
    assert_eq!(config.disks.len(), 2);
    let disk = &config.disks[1];
    assert!(disk.readonly);
    assert_eq!(disk.serial.as_deref(), Some(SEED_SERIAL));
    assert_eq!(disk.path, seed.path());
    let bytes = std::fs::read(&disk.path).unwrap();
    assert_eq!(bytes.len() as u64, MIN_IMAGE_SIZE);
    assert_eq!(read_back(&bytes).files[0].1, b"#cloud-config\n");
    let meta = std::fs::metadata(&disk.path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.nlink(), 0, "unlinked: nothing left behind");
    assert!(seed.summary().contains("labelled CIDATA"));
    drop(seed);
    let after = std::fs::metadata(&disk.path).map(|m| m.ino());
    assert_ne!(after.ok(), Some(meta.ino()), "closed with the guard");

    let mut plain = VmConfig::default();
    assert!(attach_seed(&mut plain).unwrap().is_none());
    assert!(plain.disks.is_empty());
}

#[test]
fn a_written_seed_replaces_nothing_without_force() {
    let dir = scratch("write");
    let config = user_data_only(&write(&dir, "u", b"#cloud-config\n"));
    let output = dir.join("seed.img");
    let image = write_seed_file(&config, &output, false).unwrap();
    let written = std::fs::read(&output).unwrap();
    assert!(written == image.bytes);
    let mode = std::fs::metadata(&output).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    std::fs::write(&output, b"keep me").unwrap();
    let err = write_seed_file(&config, &output, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{} exists; pass --force to replace it", output.display())
    );
    assert_eq!(std::fs::read(&output).unwrap(), b"keep me");
    write_seed_file(&config, &output, true).unwrap();
    assert!(std::fs::read(&output).unwrap() == image.bytes);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "no temp file left: {left:?}");

    let nowhere = dir.join("no-such-dir").join("seed.img");
    let err = write_seed_file(&config, &nowhere, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot write {}", nowhere.display())
    );
}

#[test]
fn no_replace_rename_refuses_an_existing_target() {
    let dir = scratch("rename");
    let (from, to) = (write(&dir, "from", b"new"), write(&dir, "to", b"old"));
    let err = rename(&from, &to, false).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&to).unwrap(), b"old");
    rename(&from, &to, true).unwrap();
    assert_eq!(std::fs::read(&to).unwrap(), b"new");
}

#[test]
fn the_api_spells_it_as_a_cloud_init_object() {
    let json =
        r#"{"payload":{"kernel":"/k"},"cloud_init":{"user_data":"/u","network_config":"/n"}}"#;
    let config: VmConfig = serde_json::from_str(json).unwrap();
    let cloud_init = config.cloud_init.clone().unwrap();
    assert_eq!(cloud_init.user_data, Some(PathBuf::from("/u")));
    assert_eq!(cloud_init.network_config, Some(PathBuf::from("/n")));
    assert_eq!(config.validate(), Ok(()));
    let mixed = r#"{"payload":{"kernel":"/k"},"cloud_init":{"dir":"/d","meta_data":"/m"}}"#;
    let config: VmConfig = serde_json::from_str(mixed).unwrap();
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .contains("not both"));
}
