//! The cloud-init NoCloud seed builder: any subset of the four seed files
//! with any contents (meta-data generated when absent) laid out as a FAT
//! image, which is then read back with the `fatfs` crate: every file must
//! come back byte for byte under its name, in a volume labelled CIDATA.
#![no_main]

use std::io::{Cursor, Read};

use libfuzzer_sys::fuzz_target;
use vmm::cloud_init::{SeedFile, SeedFiles, SeedImage, SeedName};
use zvmm_fuzz::Input;

const NAMES: [SeedName; 4] = [
    SeedName::UserData,
    SeedName::MetaData,
    SeedName::NetworkConfig,
    SeedName::VendorData,
];

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let chosen = input.u8();
    let mut files = Vec::new();
    for (bit, name) in NAMES.into_iter().enumerate() {
        if bit == 0 || chosen & (1 << bit) != 0 {
            let len = usize::from(input.u16());
            files.push(SeedFile {
                name,
                bytes: input.take(len).to_vec(),
                generated: false,
            });
        }
    }
    if chosen & 0x80 != 0 {
        files.reverse();
    }
    let image =
        SeedImage::build(SeedFiles::from_files(files)).expect("a seed of small files builds");
    check_read_back(&image);
});

/// Every file of `image` reads back from its FAT volume as it went in.
fn check_read_back(image: &SeedImage) {
    let volume = fatfs::FileSystem::new(Cursor::new(image.bytes.clone()), fatfs::FsOptions::new())
        .expect("the seed is a FAT volume");
    assert_eq!(volume.volume_label().trim_end(), "CIDATA");
    let root = volume.root_dir();
    for file in image.files.files() {
        let mut bytes = Vec::new();
        root.open_file(file.name.file_name())
            .expect("each seed file is in the root directory")
            .read_to_end(&mut bytes)
            .expect("readable");
        assert!(
            bytes == file.bytes,
            "{} changed in the seed",
            file.name.file_name()
        );
    }
}
