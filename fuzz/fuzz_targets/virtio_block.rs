//! virtio-blk as a guest drives it: features and configuration space,
//! then queues whose descriptor tables, chains, request headers, data and
//! discard segments come from the input, activated on a raw or qcow2
//! image on tmpfs (read-only or not, with or without I/O threads), every
//! request run until it is used, then the device reset.
#![no_main]

use devices::virtio::block::{Block, BlockConfig};
use libfuzzer_sys::fuzz_target;
use vmm::image::create::{create, CreateOptions};
use vmm::image::transfer::TargetFormat;
use zvmm_fuzz::{fill_buffers, guest_memory, negotiate, run, Input};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let path = zvmm_fuzz::scratch_dir().join("virtio-blk.img");
    let _ = std::fs::remove_file(&path);
    let size = (u64::from(input.u8()) + 1) << 14;
    let options = CreateOptions {
        format: match mode & 1 {
            0 => TargetFormat::Raw,
            _ => TargetFormat::Qcow2,
        },
        size: Some(size),
        backing: None,
        force: true,
    };
    create(&path, &options).expect("a scratch image");
    let config = BlockConfig {
        path: path.clone(),
        readonly: mode & 2 != 0,
        num_queues: Some(1 + u16::from(mode >> 6)),
        io_threads: Some(usize::from((mode >> 2) & 3)),
        ..BlockConfig::default()
    };
    let mut device = Block::new(config).expect("the scratch image attaches");
    let mem = guest_memory();
    let driver = negotiate(&mut device, &mem, &mut input);
    fill_buffers(&mem, &mut input);
    run(&mut device, &mem, driver, &[0, 1, 2, 3]);
});
