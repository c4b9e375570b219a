//! The bootable raw EFI disk recipe (`resources/vm-disk/build-efi-disk.sh`):
//! the disk it builds from the Debian kernel and initramfs is checked with
//! sgdisk, mtools and debugfs (sparse, GPT, the ESP's boot loader spec
//! entry and GRUB, the ext4 root partition, byte-identical kernel and
//! initramfs), its refusals, and what firmware finds on it: the probe in
//! firmware mode under zvmm resolves the boot entry and checks the kernel
//! the way rust-hypervisor-firmware does.
//!
//! The full VM-mode boot with rust-hypervisor-firmware is `#[ignore]`d:
//! the firmware is not a Debian package and a stock kernel cannot finish
//! booting on KVM-PVM. On a host with VT-x/AMD-V, download the firmware
//! from its releases (the `hypervisor-fw` asset of
//! <https://github.com/cloud-hypervisor/rust-hypervisor-firmware/releases>)
//! and run
//!
//! ```sh
//! ZVMM_HYPERVISOR_FW=/path/to/hypervisor-fw \
//!     cargo test -p zvmm-tests --test vm_disk_recipe -- --ignored
//! ```
//!
//! which boots, as Zero-OS does, `zvmm --kernel hypervisor-fw --disk
//! path=vm.raw --cloud-init user-data=... --cpus 2 --memory 1G` through the
//! boot loader spec entry and, on a second disk built with `--grub
//! --no-loader-entries`, through GRUB as `\EFI\BOOT\BOOTX64.EFI`, each to
//! the initramfs's `zvmm-guest: booted` line and power-off.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use zvmm_tests::assets::debian_asset;
use zvmm_tests::disk::FileState;
use zvmm_tests::efi_disk::{
    fw_errors, fw_line, mtools_image, sgdisk_view, ESP_TYPE_GUID, LINUX_ROOT_GUID,
};
use zvmm_tests::probe::{fnv1a64, probe_elf, Flavour, ProbeReport};
use zvmm_tests::zvmm::{spawn_zvmm, workspace_root};

/// ESP size the tests ask for (MiB).
const ESP_MIB: u64 = 64;
/// Kernel command line of the entry: the initramfs powers off after its
/// banner.
const OPTIONS: &str = "console=ttyS0 zvmm.poweroff";
/// The loader.conf the recipe writes.
const LOADER_CONF: &str = "default zvmm.conf\ntimeout 0\n";

fn recipe() -> PathBuf {
    workspace_root().join("resources/vm-disk/build-efi-disk.sh")
}

fn scratch(test: &str) -> PathBuf {
    zvmm_tests::zvmm::scratch_dir(&format!("vm-disk-{test}"))
}

/// Runs the recipe with `args`.
fn build(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(recipe())
        .args(args)
        .output()
        .expect("cannot run build-efi-disk.sh")
}

fn build_ok(args: &[&str]) {
    let out = build(args);
    assert!(out.status.success(), "build-efi-disk.sh {args:?}: {out:?}");
}

/// A file of the ESP, read with mtools.
fn esp_file(image: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", &mtools_image(image), &format!("::{path}")])
        .output()
        .expect("cannot run mtype (mtools)");
    assert!(out.status.success(), "mtype {path}: {out:?}");
    out.stdout
}

/// `image?offset=N` for libext2fs tools (debugfs).
fn ext4_at(image: &Path, first_lba: u64) -> String {
    format!("{}?offset={}", image.display(), first_lba * 512)
}

#[test]
fn recipe_builds_a_sparse_efi_disk_with_a_boot_entry_grub_and_root() {
    let (kernel, initrd) = (debian_asset("vmlinuz"), debian_asset("initramfs.cpio"));
    let dir = scratch("build");
    let root_dir = dir.join("root");
    std::fs::create_dir_all(root_dir.join("etc")).unwrap();
    std::fs::write(root_dir.join("etc/hostname"), "zvmm-vm\n").unwrap();
    let image = dir.join("vm.raw");
    let esp_mib = ESP_MIB.to_string();
    let root = root_dir.display().to_string();
    let out_path = image.display().to_string();
    build_ok(&[
        "--grub",
        "--size",
        "1G",
        "--esp-mib",
        &esp_mib,
        "--options",
        OPTIONS,
        "--root-dir",
        &root,
        &out_path,
    ]);

    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    let content =
        std::fs::metadata(&kernel).unwrap().len() + std::fs::metadata(&initrd).unwrap().len();
    let grub = workspace_root().join("resources/cache/grub/grubx64.efi");
    let grub_bytes = std::fs::read(&grub).expect("the recipe fetched GRUB");
    let allocated = meta.blocks() * 512;
    assert!(
        allocated < content + grub_bytes.len() as u64 + (24 << 20),
        "not sparse: {allocated} bytes allocated"
    );
    let verify = Command::new("sgdisk")
        .arg("--verify")
        .arg(&image)
        .output()
        .unwrap();
    let verify_text = String::from_utf8_lossy(&verify.stdout);
    assert!(verify_text.contains("No problems found"), "{verify_text}");

    let (_, parts) = sgdisk_view(&image);
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!(parts[0].type_guid, ESP_TYPE_GUID);
    assert_eq!(parts[0].first_lba, 2048);
    assert_eq!(parts[0].last_lba, 2048 + (ESP_MIB << 11) - 1);
    assert_eq!(parts[0].name, "EFI system partition");
    assert_eq!(parts[1].type_guid, LINUX_ROOT_GUID);
    assert_eq!(parts[1].first_lba, parts[0].last_lba + 1);
    assert_eq!(parts[1].name, "root");

    assert_eq!(
        esp_file(&image, "/loader/loader.conf"),
        LOADER_CONF.as_bytes()
    );
    let entry = String::from_utf8(esp_file(&image, "/loader/entries/zvmm.conf")).unwrap();
    assert_eq!(
        entry,
        format!(
            "title zvmm VM (Debian kernel)\nlinux /vmlinuz\ninitrd /initramfs.cpio\noptions {OPTIONS}\n"
        )
    );
    assert!(esp_file(&image, "/vmlinuz") == std::fs::read(&kernel).unwrap());
    assert!(esp_file(&image, "/initramfs.cpio") == std::fs::read(&initrd).unwrap());
    let efi = esp_file(&image, "/EFI/BOOT/BOOTX64.EFI");
    assert!(
        efi == grub_bytes && efi.starts_with(b"MZ"),
        "BOOTX64.EFI is not GRUB"
    );
    for cfg in ["/EFI/BOOT/grub.cfg", "/EFI/debian/grub.cfg"] {
        let text = String::from_utf8(esp_file(&image, cfg)).unwrap();
        assert!(
            text.contains(&format!("linux /vmlinuz {OPTIONS}")),
            "{cfg}: {text}"
        );
        assert!(text.contains("initrd /initramfs.cpio"), "{cfg}: {text}");
    }

    let mut sb = [0u8; 0x100];
    let file = std::fs::File::open(&image).unwrap();
    file.read_exact_at(&mut sb, parts[1].first_lba * 512 + 1024)
        .unwrap();
    assert_eq!(&sb[0x38..0x3a], &[0x53, 0xef], "no ext4 superblock");
    assert_eq!(&sb[0x78..0x7d], b"root\0", "ext4 label");
    let cat = Command::new("debugfs")
        .args([
            "-R",
            "cat /etc/hostname",
            &ext4_at(&image, parts[1].first_lba),
        ])
        .output()
        .expect("cannot run debugfs (e2fsprogs)");
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "zvmm-vm\n", "{cat:?}");
}

#[test]
fn recipe_refuses_to_overwrite_and_names_missing_inputs() {
    let dir = scratch("refusals");
    let image = dir.join("vm.raw");
    std::fs::write(&image, b"precious").unwrap();
    let before = FileState::of(&image);
    let path = image.display().to_string();
    let input = dir.join("input");
    std::fs::write(&input, b"not a kernel").unwrap();
    let input = input.display().to_string();
    let out = build(&["--kernel", &input, "--initrd", &input, &path]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("exists; pass --force"), "{stderr}");
    assert_eq!(FileState::of(&image), before);
    let fresh = dir.join("fresh.raw").display().to_string();
    let out = build(&["--kernel", "/no/such/vmlinuz", &fresh]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("kernel /no/such/vmlinuz not found"),
        "{stderr}"
    );
    let out = build(&["--esp-mib", "8", &fresh]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 40 MiB"), "{stderr}");
    assert!(!dir.join("fresh.raw").exists());
}

#[test]
fn firmware_finds_the_recipe_boot_entry_under_zvmm() {
    let kernel = debian_asset("vmlinuz");
    let initrd = debian_asset("initramfs.cpio");
    let dir = scratch("firmware");
    let image = dir.join("vm.raw");
    let esp_mib = ESP_MIB.to_string();
    build_ok(&[
        "--size",
        "512M",
        "--esp-mib",
        &esp_mib,
        "--options",
        OPTIONS,
        &image.display().to_string(),
    ]);
    // The probe as firmware: rust-hypervisor-firmware's boot paths appended.
    let mut firmware = std::fs::read(probe_elf(Flavour::Pvh)).unwrap();
    firmware.extend_from_slice(b"\0/loader/loader.conf\0\\EFI\\BOOT\\BOOTX64.EFI\0");
    let firmware_path = dir.join("hypervisor-fw");
    std::fs::write(&firmware_path, firmware).unwrap();
    let args = [
        "--kernel".to_string(),
        firmware_path.display().to_string(),
        "--disk".into(),
        format!("path={}", image.display()),
        "--timeout".into(),
        "50".into(),
        "--cmdline".into(),
        "console=ttyS0 probe.mode=firmware probe.fw.file=/loader/entries/zvmm.conf".into(),
    ];
    let run = spawn_zvmm(&args).finish(Duration::from_secs(60));
    let report = ProbeReport::parse(&run.stdout);
    let context = format!("{run:#?}");
    let context = context.as_str();
    assert_eq!(run.code(), 0, "{context}");
    assert_eq!(fw_errors(&report), [], "{context}");
    let entry = fw_line(&report, "bls", "entry=", context);
    assert_eq!(entry.get("entry"), Some("zvmm.conf"), "{context}");
    assert_eq!(entry.get("linux"), Some("/vmlinuz"), "{context}");
    assert_eq!(entry.get("initrd"), Some("/initramfs.cpio"), "{context}");
    assert_eq!(entry.get("options"), Some(OPTIONS), "{context}");
    let bz = fw_line(&report, "bls", "kernel ", context);
    assert_eq!(
        bz.num("size"),
        Some(std::fs::metadata(&kernel).unwrap().len()),
        "{context}"
    );
    assert_eq!(bz.get("hdrs"), Some("1"), "{context}");
    assert_eq!(bz.get("relocatable"), Some("1"), "{context}");
    assert!(bz.num("version") >= Some(0x205), "{context}");
    let rd = fw_line(&report, "bls", "initrd ", context);
    assert_eq!(
        rd.num("size"),
        Some(std::fs::metadata(&initrd).unwrap().len()),
        "{context}"
    );
    assert!(report.has("fw boot method=bls"), "{context}");
    let file = fw_line(&report, "file", "path=", context);
    let text = esp_file(&image, "/loader/entries/zvmm.conf");
    assert_eq!(file.num("fnv1a64"), Some(fnv1a64(&text)), "{context}");
    assert!(report.value("fw result=ok").is_some(), "{context}");
}

/// The firmware named by `ZVMM_HYPERVISOR_FW`.
fn hypervisor_fw() -> PathBuf {
    let path = std::env::var_os("ZVMM_HYPERVISOR_FW")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "set ZVMM_HYPERVISOR_FW to rust-hypervisor-firmware's hypervisor-fw \
             (https://github.com/cloud-hypervisor/rust-hypervisor-firmware/releases)"
            )
        });
    assert!(
        path.is_file(),
        "ZVMM_HYPERVISOR_FW={} is not a file",
        path.display()
    );
    path
}

/// Boots the disk built with `recipe_args` under zvmm with the real
/// firmware and a cloud-init seed, expecting `expect` in order.
fn boot_with_hypervisor_fw(test: &str, recipe_args: &[&str], expect: &[&str]) {
    let firmware = hypervisor_fw();
    let dir = scratch(test);
    let image = dir.join("vm.raw");
    let path = image.display().to_string();
    let mut args: Vec<&str> = recipe_args.to_vec();
    args.extend(["--options", OPTIONS, &path]);
    build_ok(&args);
    let user_data = dir.join("user-data");
    std::fs::write(&user_data, "#cloud-config\n").unwrap();
    let mut zvmm = vec![
        "--kernel".to_string(),
        firmware.display().to_string(),
        "--disk".into(),
        format!("path={path}"),
        "--cloud-init".into(),
        format!("user-data={}", user_data.display()),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "1G".into(),
        "--timeout".into(),
        "600".into(),
    ];
    for pattern in expect {
        zvmm.extend(["--expect".to_string(), pattern.to_string()]);
    }
    let run = spawn_zvmm(&zvmm).finish(Duration::from_secs(660));
    assert_eq!(run.code(), 0, "{run:#?}");
}

#[test]
#[ignore = "needs rust-hypervisor-firmware (ZVMM_HYPERVISOR_FW) and VT-x/AMD-V"]
fn rust_hypervisor_firmware_boots_the_recipe_disk() {
    boot_with_hypervisor_fw(
        "rhf-bls",
        &[],
        &[
            "Virtio block device configured",
            "Found EFI partition",
            "Filesystem ready",
            "Jumping to kernel",
            "zvmm-guest: booted",
        ],
    );
}

#[test]
#[ignore = "needs rust-hypervisor-firmware (ZVMM_HYPERVISOR_FW) and VT-x/AMD-V"]
fn rust_hypervisor_firmware_boots_grub_from_the_recipe_disk() {
    boot_with_hypervisor_fw(
        "rhf-grub",
        &["--grub", "--no-loader-entries"],
        &[
            "Using EFI boot",
            "Executable loaded",
            "Welcome to GRUB",
            "zvmm-guest: booted",
        ],
    );
}
