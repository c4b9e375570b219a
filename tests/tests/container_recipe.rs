//! Container mode's recipe (`resources/container/`): the initramfs built
//! from Debian packages (its `/init`, static busybox, the virtio-fs modules
//! the kernel's configuration says it needs, in dependency order), the
//! `/init` logic run function by function in busybox's own shell, the root
//! directory script (and its refusal to touch a directory it did not
//! make), and the whole recipe booted under QEMU's TCG with the real
//! virtiofsd — which proves the recipe on any host, so a failure of the
//! ignored zvmm boot at the bottom is zvmm's.
//!
//! Needs Debian's archive on first use (like `fetch-debian-assets.sh`);
//! `cargo test -p zvmm-tests --test container_recipe`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use zvmm_tests::assets::debian_asset;
use zvmm_tests::container::{
    build_initramfs, cache_dir, config_value, elf_has_interpreter, modinfo_field, qemu_tcg_args,
    read, read_cpio, recipe_dir, run_script, CpioEntry, Virtiofsd,
};
use zvmm_tests::qemu;
use zvmm_tests::zvmm::{run_zvmm, scratch_dir};

/// The kernel options whose modules the initramfs must carry when they
/// are modules (`=m`), with those modules' names.
const ROOT_MODULES: [(&str, &str); 2] = [("VIRTIO_PCI", "virtio_pci"), ("VIRTIO_FS", "virtiofs")];
const SCRIPT_LIMIT: Duration = Duration::from_secs(300);
const QEMU_LIMIT: Duration = Duration::from_secs(300);

/// The initramfs's members, built (or found up to date) once per process.
fn initramfs() -> &'static [CpioEntry] {
    static ENTRIES: OnceLock<Vec<CpioEntry>> = OnceLock::new();
    ENTRIES.get_or_init(|| {
        debian_asset("vmlinuz");
        let path = build_initramfs().unwrap_or_else(|e| panic!("{e}"));
        read_cpio(&read(&path).unwrap()).unwrap_or_else(|e| panic!("{e}"))
    })
}

fn member<'a>(entries: &'a [CpioEntry], name: &str) -> &'a CpioEntry {
    entries
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no {name} in the initramfs"))
}

/// The kernel release of the package the recipe used
/// (`linux-image-6.1.0-57-cloud-amd64-unsigned` → `6.1.0-57-cloud-amd64`).
fn kernel_release() -> String {
    let package = std::fs::read_to_string(cache_dir().join("kernel-package")).unwrap();
    let package = package.trim();
    package
        .strip_prefix("linux-image-")
        .map(|rest| rest.strip_suffix("-unsigned").unwrap_or(rest).to_string())
        .unwrap_or_else(|| panic!("unexpected kernel package {package}"))
}

fn kernel_config() -> String {
    std::fs::read_to_string(cache_dir().join("kernel-config")).unwrap()
}

/// A scratch directory holding the initramfs's `/init`.
fn init_sandbox(name: &str) -> PathBuf {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("init"), &member(initramfs(), "init").data).unwrap();
    dir
}

/// The recipe's cached copy of the initramfs's busybox. Tests run it
/// rather than a copy they write: a file this process just wrote can be
/// "busy" when exec'd, held open by another test thread's fork.
fn cached_busybox() -> PathBuf {
    let in_initramfs = &member(initramfs(), "bin/busybox").data;
    let cached = cache_dir().join("busybox");
    assert!(
        read(&cached).unwrap() == *in_initramfs,
        "{} is not the initramfs's busybox; rm -r resources/cache/container to rebuild both",
        cached.display()
    );
    cached
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `script` in busybox's sh inside `dir` with positional `args` and
/// `env`.
fn busybox_sh(dir: &Path, script: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(cached_busybox())
        .args(["sh", "-c", script, "sh"])
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .expect("cannot run busybox sh")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn initramfs_init_is_the_recipe_script_with_a_static_busybox() {
    let entries = initramfs();
    let init = member(entries, "init");
    assert!(init.is_executable(), "{:o}", init.mode);
    assert_eq!(init.data, read(&recipe_dir().join("init.sh")).unwrap());
    let busybox = member(entries, "bin/busybox");
    assert!(busybox.is_executable());
    assert!(
        !elf_has_interpreter(&busybox.data).unwrap(),
        "busybox is not static"
    );
    for link in ["bin/sh", "sbin/insmod", "sbin/switch_root", "bin/mount"] {
        let entry = member(entries, link);
        assert!(entry.is_symlink(), "{link}");
        let target = Path::new(link).parent().unwrap().join(text(&entry.data));
        assert_eq!(normalize(&target), Path::new("bin/busybox"), "{link}");
    }
    for dir in ["dev", "proc", "sys", "newroot"] {
        assert!(member(entries, dir).is_dir(), "{dir}");
    }
    assert!(entries.iter().all(|e| e.uid == 0 && e.gid == 0));
    let sandbox = init_sandbox("container-init-syntax");
    assert_busybox_sh_parses(&cached_busybox(), &sandbox.join("init"));
}

/// `busybox sh -n script`: the script is valid busybox shell.
fn assert_busybox_sh_parses(busybox: &Path, script: &Path) {
    let check = Command::new(busybox)
        .arg("sh")
        .arg("-n")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}: {}",
        script.display(),
        text(&check.stderr)
    );
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The modules in the initramfs, by name: their path under
/// `lib/modules/<release>/` and their `.modinfo` dependencies.
fn initramfs_modules(release: &str) -> HashMap<String, (String, Vec<String>)> {
    let prefix = format!("lib/modules/{release}/");
    let mut modules = HashMap::new();
    for entry in initramfs().iter().filter(|e| e.name.contains(".ko")) {
        let path = entry
            .name
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{} is not for {release}", entry.name));
        assert!(path.ends_with(".ko"), "{path} is still compressed");
        let field = |key| modinfo_field(&entry.data, key).unwrap().unwrap_or_default();
        assert!(
            field("vermagic").starts_with(&format!("{release} ")),
            "{path}"
        );
        let depends = field("depends");
        let depends = depends
            .split(',')
            .filter(|d| !d.is_empty())
            .map(String::from);
        modules.insert(field("name"), (path.to_string(), depends.collect()));
    }
    modules
}

#[test]
fn initramfs_has_the_virtiofs_modules_the_kernel_config_needs() {
    let (config, release) = (kernel_config(), kernel_release());
    let modules = initramfs_modules(&release);
    for (option, name) in ROOT_MODULES {
        match config_value(&config, option) {
            Some("m") => assert!(
                modules.contains_key(name),
                "CONFIG_{option}=m but no {name}.ko"
            ),
            Some("y") => assert!(
                !modules.contains_key(name),
                "CONFIG_{option}=y yet {name}.ko"
            ),
            other => panic!("CONFIG_{option} is {other:?}; the recipe should have refused"),
        }
    }
    for (name, (path, depends)) in &modules {
        for dep in depends {
            assert!(
                modules.contains_key(dep),
                "{path} needs {dep}, which is missing"
            );
        }
        assert_eq!(Path::new(path).file_stem().unwrap(), name.as_str());
    }
}

#[test]
fn initramfs_loads_each_module_after_what_it_depends_on() {
    let release = kernel_release();
    let modules = initramfs_modules(&release);
    if modules.is_empty() {
        return; // Everything is built into this kernel: nothing to order.
    }
    let dir = format!("lib/modules/{release}");
    let order = text(&member(initramfs(), &format!("{dir}/modules.zvmm-order")).data);
    let order: Vec<&str> = order.lines().collect();
    let listed: BTreeSet<&str> = order.iter().copied().collect();
    let shipped: BTreeSet<&str> = modules.values().map(|(path, _)| path.as_str()).collect();
    assert_eq!(
        listed.len(),
        order.len(),
        "a module is listed twice: {order:?}"
    );
    assert_eq!(listed, shipped, "the load order is not the shipped modules");
    let position = |path: &str| order.iter().position(|p| *p == path).unwrap();
    for (path, depends) in modules.values() {
        for dep in depends {
            let (dep_path, _) = modules
                .get(dep)
                .unwrap_or_else(|| panic!("{path} needs {dep}, which is missing"));
            assert!(
                position(dep_path) < position(path),
                "{path} loads before {dep_path}: {order:?}"
            );
        }
    }
    let modules_dep = text(&member(initramfs(), &format!("{dir}/modules.dep")).data);
    for line in modules_dep.lines() {
        let (path, deps) = line.split_once(':').unwrap();
        for dep in deps.split_whitespace() {
            assert!(
                position(dep) < position(path),
                "modules.dep: {line}; order {order:?}"
            );
        }
    }
    assert_eq!(modules_dep.lines().count(), order.len());
}

/// What `zvmm_parse_cmdline` sets for `cmdline`, one `|`-separated line:
/// root_tag, root_fstype, root_delay, root_mode, new_init, on_fail; and
/// everything printed before.
fn parse_cmdline(dir: &Path, cmdline: &str) -> (String, String) {
    let script = r#". ./init; zvmm_parse_cmdline "$1"
        echo "$root_tag|$root_fstype|$root_delay|$root_mode|$new_init|$on_fail""#;
    let run = busybox_sh(dir, script, &[cmdline], &[]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let stdout = text(&run.stdout);
    let (before, last) = stdout
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", stdout.trim_end()));
    (last.to_string(), before.to_string())
}

#[test]
fn init_parses_root_rootfstype_rootdelay_init_and_the_failure_mode() {
    let dir = init_sandbox("container-init-parse");
    std::fs::write(dir.join("a-file"), b"").unwrap();
    let cases = [
        ("", "vroot|virtiofs|10|rw|/sbin/init|shell"),
        (
            "console=ttyS0 root=vroot rootfstype=virtiofs rw zvmm.poweroff",
            "vroot|virtiofs|10|rw|/sbin/init|poweroff",
        ),
        (
            "root=data rootdelay=3 ro init=/bin/sh panic=-1",
            "data|virtiofs|3|ro|/bin/sh|panic",
        ),
        (
            "panic=5 zvmm.poweroff",
            "vroot|virtiofs|10|rw|/sbin/init|panic",
        ),
        (
            "zvmm.poweroff panic=0",
            "vroot|virtiofs|10|rw|/sbin/init|panic",
        ),
        (
            "root= rootfstype= init= xroot=x root_x=y",
            "vroot|virtiofs|10|rw|/sbin/init|shell",
        ),
        (
            "root=* init=/sbin/* rootdelay=0",
            "*|virtiofs|0|rw|/sbin/*|shell",
        ),
        (
            "root=/dev/vda rootfstype=ext4 ro rw",
            "/dev/vda|ext4|10|rw|/sbin/init|shell",
        ),
    ];
    for (cmdline, expected) in cases {
        let (parsed, printed) = parse_cmdline(&dir, cmdline);
        assert_eq!(parsed, expected, "cmdline {cmdline:?}");
        assert_eq!(printed, "", "cmdline {cmdline:?}");
    }
    for bad in [
        "rootdelay=abc",
        "rootdelay=",
        "rootdelay=-1",
        "rootdelay=1.5",
    ] {
        let (parsed, printed) = parse_cmdline(&dir, bad);
        assert_eq!(parsed, "vroot|virtiofs|10|rw|/sbin/init|shell", "{bad}");
        let value = bad.strip_prefix("rootdelay=").unwrap();
        assert_eq!(
            printed,
            format!("zvmm-initramfs: ignoring rootdelay={value} (not a whole number of seconds)")
        );
    }
}

/// Runs `zvmm_mount_root /target` for `cmdline` with mount, sleep, dmesg
/// and the file-system check replaced: mount succeeds from call `ok_at`
/// on (else fails as busybox's does), dmesg prints `kernel_log`. Returns
/// stdout, the mount calls and the number of sleeps.
fn mount_root(
    dir: &Path,
    cmdline: &str,
    ok_at: u32,
    kernel_log: &str,
    have_fs: bool,
) -> (String, Vec<String>, usize) {
    let _ = std::fs::remove_file(dir.join("mounts"));
    let _ = std::fs::remove_file(dir.join("sleeps"));
    let script = r#". ./init
        mount() {
            echo "$*" >>mounts
            [ "$(wc -l <mounts)" -ge "$ok_at" ] && return 0
            echo "mount: mounting $5 on $6 failed: Permission denied" >&2
            return 1
        }
        sleep() { echo "$1" >>sleeps; }
        dmesg() { echo "$kernel_log"; }
        zvmm_have_fs() { [ "$have_fs" = yes ]; }
        zvmm_parse_cmdline "$1"
        zvmm_mount_root /target
        echo "status=$?""#;
    let ok_at = ok_at.to_string();
    let have_fs = if have_fs { "yes" } else { "no" };
    let env = [
        ("ok_at", ok_at.as_str()),
        ("kernel_log", kernel_log),
        ("have_fs", have_fs),
    ];
    let run = busybox_sh(dir, script, &[cmdline], &env);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let mounts = std::fs::read_to_string(dir.join("mounts")).unwrap_or_default();
    let sleeps = std::fs::read_to_string(dir.join("sleeps")).unwrap_or_default();
    assert!(sleeps.lines().all(|s| s == "1"), "{sleeps}");
    (
        text(&run.stdout),
        mounts.lines().map(String::from).collect(),
        sleeps.lines().count(),
    )
}

#[test]
fn init_retries_the_mount_for_rootdelay_seconds_then_says_why_in_one_line() {
    let dir = init_sandbox("container-init-mount");
    let (out, mounts, sleeps) = mount_root(&dir, "root=vroot rootdelay=3", 99, "", true);
    assert_eq!(
        out,
        "zvmm-initramfs: cannot mount virtiofs tag vroot: Permission denied\nstatus=1\n"
    );
    assert_eq!(mounts, vec!["-t virtiofs -o rw vroot /target"; 4]);
    assert_eq!(sleeps, 3);

    let (out, mounts, sleeps) = mount_root(&dir, "ro", 3, "", true);
    assert_eq!(out, "status=0\n");
    assert_eq!(mounts, vec!["-t virtiofs -o ro vroot /target"; 3]);
    assert_eq!(sleeps, 2);

    let log = "[    2.4] virtio-fs: tag <data> not found";
    let (out, mounts, sleeps) = mount_root(&dir, "root=data rootdelay=0", 99, log, true);
    assert_eq!(out, "zvmm-initramfs: cannot mount virtiofs tag data: no virtio-fs device has this tag\nstatus=1\n");
    assert_eq!((mounts.len(), sleeps), (1, 0));

    let (out, _, _) = mount_root(&dir, "rootdelay=0", 99, "", false);
    assert_eq!(out, "zvmm-initramfs: cannot mount virtiofs tag vroot: the kernel has no virtiofs file system\nstatus=1\n");
    let (out, mounts, _) = mount_root(
        &dir,
        "root=/dev/vda rootfstype=ext4 rootdelay=0",
        99,
        "",
        true,
    );
    assert_eq!(
        out,
        "zvmm-initramfs: cannot mount ext4 root /dev/vda: Permission denied\nstatus=1\n"
    );
    assert_eq!(mounts, ["-t ext4 -o rw /dev/vda /target"]);
}

fn make_rootfs(dir: &Path) -> zvmm_tests::zvmm::Finished {
    run_script("make-rootfs.sh", &[dir], SCRIPT_LIMIT)
}

/// The applets busybox links: `busybox --list-full` but itself and the
/// init we write.
fn applets(busybox: &Path) -> Vec<String> {
    let out = Command::new(busybox).arg("--list-full").output().unwrap();
    let list = text(&out.stdout);
    list.lines()
        .filter(|a| a.contains('/') && !["sbin/init", "bin/busybox"].contains(a))
        .map(String::from)
        .collect()
}

#[test]
fn make_rootfs_builds_a_root_with_busybox_links_and_an_init() {
    let root = scratch_dir("container-rootfs").join("root");
    let run = make_rootfs(&root);
    assert_eq!(run.code(), 0, "{run:#?}");
    let busybox = root.join("bin/busybox");
    assert!(
        !elf_has_interpreter(&read(&busybox).unwrap()).unwrap(),
        "busybox is not static"
    );
    let busybox = busybox.canonicalize().unwrap();
    let applets = applets(&busybox);
    assert!(applets.len() > 100, "{applets:?}");
    for applet in &applets {
        let link = root.join(applet);
        assert!(link.is_symlink(), "{applet}");
        assert_eq!(link.canonicalize().unwrap(), busybox, "{applet}");
    }
    let init = root.join("sbin/init");
    assert_eq!(
        read(&init).unwrap(),
        read(&recipe_dir().join("rootfs-init.sh")).unwrap()
    );
    assert_eq!(mode(&init), 0o755);
    assert_eq!(mode(&root.join("tmp")), 0o1777);
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("root:") && l.contains(":0:0:")),
        "{passwd}"
    );
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("root:x:0:")), "{group}");
    for dir in ["proc", "sys", "dev", "root"] {
        assert!(root.join(dir).is_dir(), "{dir}");
    }
    assert_busybox_sh_parses(&busybox, &init);
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn make_rootfs_again_keeps_changed_files_and_restores_missing_links() {
    let root = scratch_dir("container-rootfs-again").join("root");
    assert_eq!(make_rootfs(&root).code(), 0);
    std::fs::write(root.join("etc/hostname"), b"mine\n").unwrap();
    std::fs::write(root.join("root/notes"), b"keep me\n").unwrap();
    std::fs::remove_file(root.join("bin/ls")).unwrap();
    let run = make_rootfs(&root);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"mine\n");
    assert_eq!(
        std::fs::read(root.join("root/notes")).unwrap(),
        b"keep me\n"
    );
    assert!(root.join("bin/ls").is_symlink());
}

#[test]
fn make_rootfs_refuses_a_directory_it_did_not_make() {
    let base = scratch_dir("container-rootfs-refuse");
    let foreign = base.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("thesis.tex"), b"years of work\n").unwrap();
    let run = make_rootfs(&foreign);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert_eq!(
        run.stderr,
        format!("make-rootfs: {} is not empty and was not made by make-rootfs.sh; give a new or empty directory\n", foreign.display())
    );
    let left: Vec<_> = std::fs::read_dir(&foreign)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["thesis.tex"]);
    assert_eq!(
        std::fs::read(foreign.join("thesis.tex")).unwrap(),
        b"years of work\n"
    );

    let file = base.join("a-file");
    std::fs::write(&file, b"data").unwrap();
    let run = make_rootfs(&file);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stderr.contains("exists and is not a directory"),
        "{run:#?}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"data");

    let empty = base.join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_eq!(make_rootfs(&empty).code(), 0);
    let run = run_script("make-rootfs.sh", &[], SCRIPT_LIMIT);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert_eq!(run.stderr, "usage: make-rootfs.sh DIR\n");
}

/// A root directory from the recipe plus `/sbin/test-init`, which writes
/// `/from-guest` through the shared root and then runs the real init.
fn rootfs_with_test_init(name: &str) -> (PathBuf, PathBuf) {
    let base = scratch_dir(name);
    let root = base.join("root");
    assert_eq!(make_rootfs(&root).code(), 0);
    let test_init = root.join("sbin/test-init");
    std::fs::write(
        &test_init,
        "#!/bin/sh\necho written by the guest >/from-guest\nexec /sbin/init\n",
    )
    .unwrap();
    set_mode(&test_init, 0o755);
    (base, root)
}

fn boot_under_qemu(cmdline: &str, fs: Option<(&Path, &Path)>) -> qemu::QemuRun {
    let initramfs = cache_dir().join("initramfs.cpio");
    let daemon = fs.map(|(root, base)| {
        Virtiofsd::start(root, &base.join("fs.sock"), &base.join("virtiofsd.log"))
            .unwrap_or_else(|e| panic!("{e}"))
    });
    let socket = fs.map(|(_, base)| base.join("fs.sock"));
    let args = qemu_tcg_args(
        &debian_asset("vmlinuz"),
        &initramfs,
        cmdline,
        socket.as_deref(),
    );
    let run = qemu::run(&args, QEMU_LIMIT).unwrap_or_else(|e| panic!("{e}"));
    drop(daemon);
    run
}

/// The recipe boots the stock Debian kernel to the shared root's init,
/// which writes through virtio-fs and powers off.
#[test]
fn recipe_boots_to_the_shared_root_under_qemu_tcg() {
    initramfs();
    let (base, root) = rootfs_with_test_init("container-qemu-boot");
    let cmdline =
        "console=ttyS0 root=vroot rootfstype=virtiofs rw init=/sbin/test-init zvmm.poweroff";
    let run = boot_under_qemu(cmdline, Some((&root, &base)));
    let console = &run.stdout;
    let up = format!("zvmm-container: up {}", kernel_release());
    assert!(
        console.lines().any(|l| l.trim_end() == up),
        "no {up:?}: {run:#?}"
    );
    assert!(!console.contains("zvmm-initramfs:"), "{run:#?}");
    assert!(run.exited_cleanly(), "{run:#?}");
    assert_eq!(
        std::fs::read_to_string(root.join("from-guest")).unwrap(),
        "written by the guest\n"
    );
    eprintln!("QEMU TCG boot to the shared root in {:?}", run.elapsed);
}

/// A tag no device has: one clear line, then `panic=` is the kernel's.
#[test]
fn recipe_names_a_missing_tag_and_follows_panic_under_qemu_tcg() {
    initramfs();
    let (base, root) = rootfs_with_test_init("container-qemu-tag");
    let cmdline = "console=ttyS0 root=nosuchtag rootdelay=1 panic=-1";
    let run = boot_under_qemu(cmdline, Some((&root, &base)));
    let lines: Vec<&str> = run.stdout.lines().map(str::trim_end).collect();
    let said: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("zvmm-initramfs:"))
        .collect();
    assert_eq!(
        said,
        [
            "zvmm-initramfs: cannot mount virtiofs tag nosuchtag: no virtio-fs device has this tag",
            "zvmm-initramfs: exiting; the kernel panics and follows panic="
        ],
        "{run:#?}"
    );
    assert!(
        run.stdout
            .contains("Kernel panic - not syncing: Attempted to kill init"),
        "{run:#?}"
    );
    assert!(
        run.exited_cleanly(),
        "panic=-1 reboots, which ends QEMU with -no-reboot: {run:#?}"
    );
    assert!(!root.join("from-guest").exists());
}

/// The full container boot under zvmm. Needs VT-x/AMD-V (KVM-PVM cannot
/// complete a stock kernel boot):
///
/// ```sh
/// bash resources/container/build-initramfs.sh
/// bash resources/container/make-rootfs.sh /tmp/zvmm-root
/// zvmm --kernel resources/cache/debian/vmlinuz --initrd resources/cache/container/initramfs.cpio \
///      --fs /tmp/zvmm-root --cmdline "console=ttyS0 root=vroot rootfstype=virtiofs rw zvmm.poweroff" \
///      --memory 512M --timeout 120 --expect "zvmm-container: up"
/// ```
///
/// `cargo test -p zvmm-tests --test container_recipe -- --ignored`
#[test]
#[ignore = "needs VT-x/AMD-V; KVM-PVM cannot complete a stock kernel boot"]
fn zvmm_boots_the_container_recipe() {
    initramfs();
    let root = scratch_dir("container-zvmm").join("root");
    assert_eq!(make_rootfs(&root).code(), 0);
    let initramfs = cache_dir().join("initramfs.cpio");
    let mut args: Vec<std::ffi::OsString> = vec!["--kernel".into(), debian_asset("vmlinuz").into()];
    args.extend([
        "--initrd".into(),
        initramfs.into(),
        "--fs".into(),
        root.into(),
    ]);
    args.extend(
        [
            "--cmdline",
            "console=ttyS0 root=vroot rootfstype=virtiofs rw zvmm.poweroff",
            "--memory",
            "512M",
            "--timeout",
            "120",
            "--expect",
            "zvmm-container: up",
        ]
        .map(Into::into),
    );
    let run = run_zvmm(args, Duration::from_secs(180));
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(
        run.stdout
            .contains(&format!("zvmm-container: up {}", kernel_release())),
        "{run:#?}"
    );
}
