//! Command-line option values as zvmm parses them: each input line is one
//! `--OPTION key=value,...` string (its first byte picks the option),
//! parsed by the parser zvmm uses for it, with cloud-hypervisor's default
//! keys stripped first as the CLI does; what parses goes into one
//! `VmConfig`, which is then completed and validated, and whose command
//! line is written to guest memory as the boot protocol would.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use loader::boot::{configure_boot, BootSetup};
use loader::kernel::{BootProtocol, KernelFormat, LoadedKernel};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::api::compat;
use vmm::config::{self, VmConfig};

/// Guest RAM for the boot parameters: 16 MiB, mapped once.
fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("guest memory")
    })
}

/// The options in the order the selector byte names them.
const OPTIONS: &[&str] = &[
    "disk",
    "net",
    "fs",
    "vsock",
    "rng",
    "cpus",
    "memory",
    "serial",
    "console",
    "pit",
    "cloud-init",
    "cmdline",
    "expect",
];

fuzz_target!(|data: &[u8]| {
    let mut vm: VmConfig =
        compat::vm_config(serde_json::json!({"payload": {"kernel": "/fuzz/vmlinux"}}))
            .expect("the base configuration parses");
    for line in data.split(|&b| b == b'\n') {
        let Some((&selector, value)) = line.split_first() else {
            continue;
        };
        let option = OPTIONS[usize::from(selector) % OPTIONS.len()];
        let value = String::from_utf8_lossy(value);
        apply(&mut vm, option, &value);
    }
    let _ = vm.complete();
    if vm.validate().is_ok() {
        let _ = serde_json::to_string(&vm);
    }
    let cmdline = vm.payload.cmdline.clone().unwrap_or_default();
    write_cmdline(&cmdline);
});

/// Parses `value` as `--option` would and puts the result into `vm`.
fn apply(vm: &mut VmConfig, option: &'static str, value: &str) {
    let _ = config::parse_size(value);
    let value = match option {
        "cmdline" | "expect" => value.to_string(),
        _ => match compat::cli_option(option, value) {
            Ok(kept) => kept,
            Err(_) => return,
        },
    };
    match option {
        "disk" => config::parse_disk(&value).map(|d| vm.disks.push(d)).is_ok(),
        "net" => config::parse_net(&value).map(|n| vm.net.push(n)).is_ok(),
        "fs" => config::parse_fs(&value).map(|f| vm.fs.push(f)).is_ok(),
        "vsock" => config::parse_vsock(&value)
            .map(|v| vm.vsock = Some(v))
            .is_ok(),
        "rng" => config::parse_rng(&value).map(|r| vm.rng = r).is_ok(),
        "cpus" => config::parse_cpus(&value).map(|c| vm.cpus = c).is_ok(),
        "memory" => config::parse_memory(&value).map(|m| vm.memory = m).is_ok(),
        "serial" => config::parse_console("serial", &value)
            .map(|s| vm.serial = s)
            .is_ok(),
        "console" => config::parse_console("console", &value)
            .map(|c| vm.console = c)
            .is_ok(),
        "pit" => config::parse_pit(&value).map(|p| vm.pit = p).is_ok(),
        "cloud-init" => vmm::cloud_init::parse_cloud_init(&value)
            .map(|c| vm.cloud_init = Some(c))
            .is_ok(),
        "cmdline" => {
            vm.payload.cmdline = Some(value);
            true
        }
        _ => {
            // Short patterns: compiling long ones is the regex crate's
            // time, not zvmm's parsing.
            vm.watch.expect.push(value.chars().take(24).collect());
            true
        }
    };
}

/// Writes `cmdline` and the boot parameters of both protocols.
fn write_cmdline(cmdline: &str) {
    for protocol in [BootProtocol::Pvh, BootProtocol::Linux64] {
        let kernel = LoadedKernel {
            protocol,
            format: KernelFormat::Elf64,
            entry: GuestAddress(0x100_0000),
            end: GuestAddress(0x200_0000),
            setup_header: None,
        };
        let setup = BootSetup {
            ram_size: 16 << 20,
            cmdline,
            initrd: None,
            rsdp: None,
        };
        let _ = configure_boot(memory(), &kernel, &setup);
    }
}
