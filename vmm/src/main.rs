//! The `zvmm` command: parses the command line (zvmm's short form and the
//! cloud-hypervisor-compatible subset) into a `VmConfig`, runs the VM and
//! turns the way it stopped into the exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use vmm::config::{self, ConfigError, OnReset, PayloadConfig, VmConfig, WatchConfig};
use vmm::lifecycle::{StopReason, EXIT_ERROR, EXIT_USAGE};

/// Exit status: the guest powered off before every --expect matched.
const EXIT_EXPECT_UNMET: i32 = 6;
use vmm::handle::Vm;

const EXIT_STATUSES: &str = "\
Exit status:
  0    the guest powered off (ACPI S5), or every --expect pattern matched
  1    configuration or host error (missing kernel, no /dev/kvm, ...)
  2    usage error (unknown option, bad option syntax)
  3    the guest reset itself and --no-reboot was given (a triple fault
       counts as a reset)
  4    KVM could not run the guest (emulation or entry failure); the vCPU
       registers are printed on stderr
  5    a --fail-on pattern matched a console line (the line is printed)
  6    the guest powered off before every --expect pattern matched
  7    a virtio-fs backend (virtiofsd) died or disconnected while the VM ran
  8    a zvmm thread made a system call its seccomp filter forbids
       (--seccomp true); the thread and the call are printed
  124  --timeout expired (unmatched --expect patterns are listed)
  130, 143  ended by SIGINT (or Ctrl-A x on the console) / SIGTERM (with
       --shutdown-grace, a guest that powers off in time exits 0)

Console: with --serial tty (the default) the terminal is put in raw mode and
every key goes to the guest; press Ctrl-A then x to quit.

Examples:
  zvmm --kernel vmlinux --initrd initrd.img --cmdline \"console=ttyS0\" --cpus 2 --memory 512M
  zvmm --kernel vmlinux --cpus boot=2 --memory size=1G,shared=on --serial pty --console off
  zvmm --kernel vmlinux --timeout 60 --expect 'Run /init' --fail-on 'Kernel panic' --boot-timer
  zvmm kernel inspect bzImage
  zvmm kernel extract bzImage -o vmlinux
  zvmm image copy image.qcow2 /dev/vdb --size 20G --force
  zvmm --kernel vmlinux --disk path=root.raw --cloud-init user-data=user.yaml --memory 1G
  zvmm cloud-init build user-data=user.yaml meta-data=meta.yaml -o seed.img";

/// zvmm: a minimal KVM microVM monitor.
#[derive(Parser, Debug)]
#[command(
    name = "zvmm",
    version,
    about,
    after_help = EXIT_STATUSES,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    vm: VmArgs,
}

/// Options describing the VM to boot.
#[derive(Args, Debug)]
struct VmArgs {
    /// Kernel: an ELF vmlinux (PVH entry used when present) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk, placed at the top of low RAM.
    #[arg(long, visible_alias = "initramfs", value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: console=ttyS0].
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,
    /// vCPUs: N or boot=N.
    #[arg(long, value_name = "N|boot=N", default_value = "1")]
    cpus: String,
    /// Guest RAM: SIZE or size=SIZE[,shared=on] (K, M, G suffixes).
    #[arg(
        long,
        value_name = "SIZE|size=SIZE[,shared=on]",
        default_value = "512M"
    )]
    memory: String,
    /// COM1 console: tty (= stdio), pty, file=PATH, null, off.
    #[arg(long, value_name = "MODE", default_value = "tty")]
    serial: String,
    /// virtio console (cloud-hypervisor option): only `off` is supported.
    #[arg(long, value_name = "MODE", default_value = "off")]
    console: String,
    /// End with status 3 when the guest resets instead of rebooting it.
    #[arg(long)]
    no_reboot: bool,
    /// Stop the VM after SECS seconds with status 124.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// On SIGTERM, press the ACPI power button and stop the VM hard only if
    /// it has not powered off after SECS seconds (a second signal stops it
    /// at once). Without this option SIGTERM stops the VM at once.
    #[arg(long, value_name = "SECS")]
    shutdown_grace: Option<u64>,
    /// Exit 0 once console lines have matched every REGEX, in order.
    #[arg(long, value_name = "REGEX")]
    expect: Vec<String>,
    /// Exit 5 as soon as a console line matches REGEX (e.g. 'Kernel panic').
    #[arg(long, value_name = "REGEX")]
    fail_on: Vec<String>,
    /// Print the boot timeline (ms since process start) on stderr at exit.
    #[arg(long)]
    boot_timer: bool,
    /// virtio-blk disk: `path=FILE[,readonly=on][,image_type=raw|qcow2]
    /// [,backing_files=on|off][,num_queues=N][,queue_size=Q][,serial=S]
    /// [,pci_segment=S][,id=ID]` (num_queues 1-64, default 1; queue_size a
    /// power of two 4-32768, default 256); repeat the option or give
    /// several values after one --disk. FILE is a raw or qcow2 image (its
    /// backing files opened read-only, shared with other VMs; refused with
    /// backing_files=off) or a block device. The format is
    /// detected unless image_type says it; VMDK, VHD, VHDX and other formats
    /// are refused with the qemu-img command that converts them, an ISO 9660
    /// image needs readonly=on. On a detected raw disk, a guest write that
    /// would make sector 0 look like another format (qcow2, VMDK, ...) fails
    /// with an I/O error; image_type=raw allows it.
    #[arg(long, value_name = "path=FILE[,readonly=on]", num_args = 1..)]
    disk: Vec<String>,
    /// virtio-net NIC on a host tap: `tap=NAME[,mac=MAC][,ip=A,mask=M]
    /// [,num_queues=N][,queue_size=Q][,id=ID]`, or `fd=N|fd=[N,M][,mac=MAC]`
    /// for tap fds the caller opened. An existing tap is used as it is and
    /// kept; a missing one is created and removed at exit. Repeat the option
    /// or give several values after one --net.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", num_args = 1..)]
    net: Vec<String>,
    /// virtio-fs share: `DIR` (the container root, tag vroot),
    /// `tag=T,path=DIR` (zvmm starts and stops virtiofsd on DIR) or
    /// `tag=T,socket=S[,num_queues=N][,queue_size=Q][,id=ID]` (a virtiofsd
    /// already listening on S). Repeat the option or give several values
    /// after one --fs. Turns on shared (memfd) guest RAM.
    #[arg(long, value_name = "DIR|tag=T,path=DIR|tag=T,socket=S", num_args = 1..)]
    fs: Vec<String>,
    /// The virtiofsd binary zvmm starts for path shares [default: virtiofsd
    /// from PATH or ~/.cargo/bin].
    #[arg(long, value_name = "BIN")]
    virtiofsd: Option<PathBuf>,
    /// cloud-init NoCloud seed: `user-data=FILE[,meta-data=FILE]
    /// [,network-config=FILE][,vendor-data=FILE]` or `dir=DIR` (holding
    /// files of those names). zvmm builds a FAT image labelled CIDATA
    /// (meta-data generated when absent) and attaches it as the last,
    /// read-only disk.
    #[arg(long, value_name = "user-data=FILE|dir=DIR")]
    cloud_init: Option<String>,
    /// The entropy device's source (a character device, FIFO or regular
    /// file) [default: src=/dev/urandom]. Every VM has this device.
    #[arg(long, value_name = "src=PATH")]
    rng: Option<String>,
    /// virtio-vsock, hybrid: `cid=N,socket=PATH[,id=ID]`. Host programs
    /// connect to PATH and send `CONNECT <port>\n` (answered `OK <port>\n`);
    /// guest connections to host port P go to the Unix socket PATH_P.
    #[arg(long, value_name = "cid=N,socket=PATH")]
    vsock: Option<String>,
    /// Platform (cloud-hypervisor's option): `num_pci_segments=N`, 1 to 16
    /// PCI segments, each its own host bridge with its own ECAM and memory
    /// windows; a device picks one with `pci_segment=S` [default: 1].
    #[arg(long, value_name = "num_pci_segments=N")]
    platform: Option<String>,
    /// Create KVM's in-kernel i8254 PIT (ports 0x40-0x43), for guests or
    /// firmware that program it. Off by default: zvmm's ACPI is
    /// hardware-reduced and Linux does not use a PIT there.
    #[arg(long, value_name = "on|off", default_value = "off")]
    pit: String,
    /// Serve the cloud-hypervisor REST API on this Unix socket (PATH or
    /// path=PATH); without --kernel, wait for vm.create and vm.boot.
    #[arg(long, value_name = "PATH|path=PATH")]
    api_socket: Option<String>,
    /// cloud-hypervisor's verbosity (repeatable): zvmm prints the options
    /// it recorded.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    verbose: u8,
    /// Seccomp filters, one per thread kind: true (default: a forbidden
    /// system call stops zvmm with status 8), log (allowed, logged by the
    /// kernel) or false (none).
    #[arg(long, value_name = "true|false|log", value_parser = ["true", "false", "log"])]
    seccomp: Option<String>,
    /// Landlock: the VM's threads reach only the paths its configuration
    /// names. Default: on where the kernel supports Landlock; `on` (or a
    /// bare --landlock) requires it.
    #[arg(long, value_name = "on|off", num_args = 0..=1, default_missing_value = "on")]
    landlock: Option<String>,
    /// cloud-hypervisor's extra Landlock rules: refused (zvmm allows
    /// exactly the paths the configuration names).
    #[arg(long, value_name = "RULES", hide = true)]
    landlock_rules: Vec<String>,
    /// Print a thread kind's seccomp allow-list (`all`: the table) and exit.
    #[arg(long, value_name = "KIND", hide = true)]
    print_seccomp: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Tools for kernel images.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Disk images: info, create, copy, grow, convert (raw and qcow2, holes kept).
    #[command(subcommand)]
    Image(vmm::image::ImageCommand),
    /// cloud-init NoCloud seeds.
    #[command(subcommand)]
    CloudInit(CloudInitCommand),
}

#[derive(Subcommand, Debug)]
enum CloudInitCommand {
    /// Write a NoCloud seed image (FAT labelled CIDATA), as --cloud-init
    /// attaches it.
    #[command(after_help = "\
FILES are user-data=FILE [meta-data=FILE] [network-config=FILE]
[vendor-data=FILE] (separate or joined with commas), or dir=DIR. meta-data
is generated (instance-id, local-hostname) when absent. The image is 2 MiB
unless the files need more (at most 64 MiB of files); the same files give
the same image. It is written with mode 0600 to a temp file renamed at the
end.")]
    Build {
        /// The seed's files.
        #[arg(required = true, value_name = "FILES")]
        files: Vec<String>,
        /// Where to write the image.
        #[arg(short, long, value_name = "PATH")]
        output: PathBuf,
        /// Replace OUTPUT if it exists.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KernelCommand {
    /// Write the uncompressed ELF vmlinux contained in a bzImage.
    Extract {
        /// The bzImage.
        bzimage: PathBuf,
        /// Where to write the vmlinux.
        #[arg(short, long, value_name = "PATH")]
        output: PathBuf,
    },
    /// Tell what a kernel file is and how zvmm can boot it.
    #[command(after_help = "\
Prints the format (ELF vmlinux with or without a PVH note, bzImage with its
setup header and payload, PE/EFI, compressed file), the Linux version, entry
points, ELF notes and loadable segments, the RAM the kernel needs, and a
verdict.

Exit status:
  0    zvmm can boot the file (the verdict names the boot protocol)
  1    zvmm cannot boot it (the verdict says why and what to do), or the
       file cannot be read")]
    Inspect {
        /// The kernel file.
        file: PathBuf,
    },
}

/// The command line a root share boots with when none is given.
const ROOT_SHARE_CMDLINE: &str = "console=ttyS0 root=vroot rootfstype=virtiofs rw";

impl VmArgs {
    fn into_config(self) -> Result<VmConfig, ConfigError> {
        let fs: Vec<config::FsConfig> = self
            .fs
            .iter()
            .map(|share| config::parse_fs(&vmm::api::compat::cli_option("fs", share)?))
            .collect::<Result<_, _>>()?;
        if !fs.is_empty() && config::shared_memory_given(&self.memory)? == Some(false) {
            return Err(ConfigError::Invalid(
                "--memory shared=off cannot go with --fs: virtiofsd must map guest RAM; drop shared=off".into(),
            ));
        }
        let default_cmdline = if fs.iter().any(config::FsConfig::is_root_share) {
            ROOT_SHARE_CMDLINE
        } else {
            "console=ttyS0"
        };
        let ch = vmm::api::compat::cli_option;
        let config = VmConfig {
            cpus: config::parse_cpus(&ch("cpus", &self.cpus)?)?,
            memory: config::parse_memory(&ch("memory", &self.memory)?)?,
            payload: PayloadConfig {
                kernel: self.kernel,
                cmdline: Some(self.cmdline.unwrap_or_else(|| default_cmdline.into())),
                initramfs: self.initrd,
            },
            serial: config::parse_console("serial", &self.serial)?,
            console: config::parse_console("console", &self.console)?,
            on_reset: if self.no_reboot {
                OnReset::Exit
            } else {
                OnReset::Reboot
            },
            timeout_secs: self.timeout,
            shutdown_grace_secs: self.shutdown_grace,
            watch: WatchConfig {
                expect: self.expect,
                fail_on: self.fail_on,
                boot_timer: self.boot_timer,
            },
            disks: self
                .disk
                .iter()
                .map(|disk| config::parse_disk(&ch("disk", disk)?))
                .collect::<Result<_, _>>()?,
            pit: config::parse_pit(&self.pit)?,
            net: self
                .net
                .iter()
                .map(|net| config::parse_net(&ch("net", net)?))
                .collect::<Result<_, _>>()?,
            fs,
            virtiofsd: self.virtiofsd,
            cloud_init: self
                .cloud_init
                .as_deref()
                .map(vmm::cloud_init::parse_cloud_init)
                .transpose()?,
            platform: match &self.platform {
                Some(platform) => config::parse_platform(platform)?,
                None => config::PlatformConfig::default(),
            },
            rng: match &self.rng {
                Some(rng) => config::parse_rng(&ch("rng", rng)?)?,
                None => config::RngConfig::default(),
            },
            vsock: self
                .vsock
                .as_deref()
                .map(|vsock| config::parse_vsock(&ch("vsock", vsock)?))
                .transpose()?,
        };
        config.validate()?;
        Ok(config)
    }
}

/// The name zvmm answers to when installed or linked as cloud-hypervisor.
const CLOUD_HYPERVISOR: &str = "cloud-hypervisor";

/// Parses the command line; as `cloud-hypervisor` (the file name of `argv[0]`)
/// usage and help use that name.
fn parse_cli() -> Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let invoked = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let mut command = Cli::command();
    if invoked.as_deref() == Some(CLOUD_HYPERVISOR) {
        command = command.name(CLOUD_HYPERVISOR).bin_name(CLOUD_HYPERVISOR);
    }
    Cli::from_arg_matches(&command.try_get_matches()?)
}

/// `-v`: says what the cloud-hypervisor options zvmm records amount to.
fn describe_recorded(vm: &VmArgs) {
    if vm.verbose == 0 {
        return;
    }
    let seccomp = vm.seccomp.as_deref().unwrap_or("true");
    let landlock = if !vmm::sandbox::landlock::enabled() {
        "off".to_string()
    } else {
        format!("on (kernel ABI {})", vmm::sandbox::landlock::kernel_abi())
    };
    eprintln!(
        "zvmm: -v x{}: zvmm has one log level; --seccomp {seccomp} recorded and in force; Landlock {landlock}",
        vm.verbose
    );
}

/// `--seccomp`, `--landlock`: sets up confinement before any other thread
/// exists; the exit status on a bad option or an unusable kernel.
fn set_up_sandbox(vm: &VmArgs) -> Result<(), i32> {
    use vmm::sandbox::{LandlockMode, SeccompMode};
    if !vm.landlock_rules.is_empty() {
        eprintln!("zvmm: --landlock-rules: zvmm takes no extra Landlock rules; it allows exactly the paths the VM's configuration names");
        return Err(EXIT_USAGE);
    }
    let seccomp = SeccompMode::parse(vm.seccomp.as_deref().unwrap_or("true"));
    let landlock = match vm.landlock.as_deref() {
        None => Ok(LandlockMode::Auto),
        Some(value) => LandlockMode::parse(value),
    };
    let (seccomp, landlock) = match (seccomp, landlock) {
        (Ok(seccomp), Ok(landlock)) => (seccomp, landlock),
        (Err(e), _) => return Err(usage(&e)),
        (_, Err(e)) => return Err(usage(&e)),
    };
    vmm::sandbox::init(seccomp, landlock).map_err(|e| {
        eprintln!("zvmm: {}", vmm::sandbox::error_chain(&e));
        EXIT_ERROR
    })
}

fn usage(e: &dyn std::error::Error) -> i32 {
    eprintln!("zvmm: {e}");
    EXIT_USAGE
}

/// `--print-seccomp KIND|all`.
fn print_seccomp(kind: &str) -> i32 {
    use vmm::sandbox::{seccomp, ThreadKind};
    if kind == "all" {
        print!("{}", seccomp::markdown_table());
        return 0;
    }
    match ThreadKind::from_name(kind) {
        Some(kind) => {
            print!("{}", seccomp::describe(kind));
            0
        }
        None => {
            let kinds: Vec<&str> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
            eprintln!(
                "zvmm: --print-seccomp {kind}: expected all or one of {}",
                kinds.join(", ")
            );
            EXIT_USAGE
        }
    }
}

fn main() -> ExitCode {
    vmm::watch::process_start();
    limit_malloc_arenas();
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            eprintln!(
                "zvmm: {}; see zvmm --help",
                first_line(&e.render().to_string())
            );
            return ExitCode::from(EXIT_USAGE as u8);
        }
        Err(e) => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Some(kind) = &cli.vm.print_seccomp {
        return ExitCode::from(print_seccomp(kind) as u8);
    }
    if cli.command.is_none() {
        if let Err(status) = set_up_sandbox(&cli.vm) {
            return ExitCode::from(status as u8);
        }
    }
    describe_recorded(&cli.vm);
    let status = match cli.command {
        Some(Command::Kernel(command)) => report(run_kernel_command(command)),
        Some(Command::Image(command)) => vmm::image::cli::run(command),
        Some(Command::CloudInit(command)) => run_cloud_init_command(command),
        None if cli.vm.api_socket.is_some() => api(cli.vm),
        None => match cli.vm.into_config() {
            Ok(config) => report(boot(config)),
            Err(e) => {
                eprintln!("zvmm: {e}");
                EXIT_USAGE
            }
        },
    };
    ExitCode::from(status as u8)
}

/// `--api-socket`: serves the REST API; boots the command line's VM too
/// when it names a kernel. Ends like a command-line run.
fn api(mut vm: VmArgs) -> i32 {
    let socket = vm.api_socket.take().unwrap_or_default();
    let path = config::OptionParser::parse("api-socket", &["path"], &socket).and_then(|options| {
        match options.get("path") {
            Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
            _ => Err(options.bad_value("path", "", "expected a socket path")),
        }
    });
    let config = match vm.kernel {
        Some(_) => vm.into_config().map(Some),
        None => Ok(None),
    };
    let (path, config) = match (path, config) {
        (Ok(path), Ok(config)) => (path, config),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("zvmm: {e}");
            return EXIT_USAGE;
        }
    };
    report(
        vmm::api::run(&path, config)
            .map(|reason| {
                describe_stop(&reason);
                reason.exit_status()
            })
            .map_err(Into::into),
    )
}

/// One VM per process needs few malloc arenas: glibc would otherwise give
/// each new thread (vCPUs, device workers, one per API connection) its own,
/// and RSS creeps up by ~100 KiB per VM an API client creates and deletes.
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator tunable; called before any
    // other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

/// Clap's message without its "error: " prefix and usage block.
fn first_line(rendered: &str) -> String {
    let mut lines = rendered.lines();
    let first = lines.next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    if !first.ends_with(':') {
        return first.to_string();
    }
    // "the following required arguments were not provided:" lists them
    // on the indented lines after it.
    let listed: Vec<&str> = lines
        .take_while(|line| line.starts_with("  "))
        .map(str::trim)
        .collect();
    format!("{} {}", first, listed.join(", "))
}

/// Prints an error as one line with its causes; returns the exit status.
fn report(result: anyhow::Result<i32>) -> i32 {
    result.unwrap_or_else(|e| {
        eprintln!("zvmm: {e:#}");
        EXIT_ERROR
    })
}

fn boot(config: VmConfig) -> anyhow::Result<i32> {
    let boot_timer = config.watch.boot_timer;
    let cmdline = config.payload.cmdline.clone().unwrap_or_default();
    let vm = Vm::create(config)?;
    vm.boot()?;
    // From here the main thread only waits and reports.
    vmm::sandbox::confine_current(vmm::sandbox::ThreadKind::Main)?;
    let report = vm.wait();
    // Closes the console and restores the terminal before printing.
    vm.quit();
    let report = report.context("the VMM thread ended without a stop report")?;
    let reason = report.outcome?;
    let summary = report.summary;
    describe_stop(&reason);
    let mut status = reason.exit_status();
    if !summary.unmatched.is_empty() {
        eprintln!(
            "zvmm: --expect never matched: {}",
            summary.unmatched.join(", ")
        );
        if reason == StopReason::PowerOff {
            status = EXIT_EXPECT_UNMET;
        }
    }
    if let Some(hint) = silent_guest_hint(&reason, summary.saw_output, &cmdline) {
        eprintln!("zvmm: hint: {hint}");
    }
    if boot_timer {
        eprint!("{}", summary.timeline.render());
        eprint!(
            "{}",
            vmm::kernel_time::render(&vmm::kernel_time::snapshot())
        );
    }
    Ok(status)
}

/// Advice when a guest that failed never wrote to the console.
fn silent_guest_hint(reason: &StopReason, saw_output: bool, cmdline: &str) -> Option<&'static str> {
    let failed = !matches!(
        reason,
        StopReason::PowerOff | StopReason::Expected | StopReason::Signal(_) | StopReason::Requested
    );
    if saw_output || !failed {
        return None;
    }
    let has_console = cmdline.contains("console=ttyS0") || cmdline.contains("console=uart");
    let has_early = cmdline.contains("earlyprintk=") || cmdline.contains("earlycon");
    Some(match (has_console, has_early) {
        (false, false) => {
            "the guest printed nothing and its command line names no serial console; add console=ttyS0 (and earlyprintk=serial,ttyS0,115200 to see early boot)"
        }
        (true, false) => {
            "the guest printed nothing; add earlyprintk=serial,ttyS0,115200 to the command line to see early boot messages"
        }
        _ => "the guest printed nothing, even with an early console: it stopped before its console code ran (try zvmm kernel inspect on the image)",
    })
}

fn describe_stop(reason: &StopReason) {
    match reason {
        StopReason::PowerOff => {}
        StopReason::Reset => eprintln!("zvmm: guest reset (--no-reboot given)"),
        StopReason::TripleFault { vcpu } => {
            eprintln!("zvmm: vCPU {vcpu} triple-faulted (guest reset; --no-reboot given)")
        }
        StopReason::Crash { vcpu, detail } => eprintln!("zvmm: vCPU {vcpu} stopped: {detail}"),
        StopReason::Timeout => eprintln!("zvmm: timeout: VM stopped"),
        StopReason::Expected => {}
        StopReason::FailPattern { pattern, line } => {
            eprintln!("zvmm: --fail-on '{pattern}' matched: {line}")
        }
        StopReason::Signal(signal) => eprintln!("zvmm: stopped by signal {signal}"),
        StopReason::Requested => {}
        StopReason::BackendLost { detail } => eprintln!("zvmm: VM stopped: {detail}"),
    }
}

/// `zvmm cloud-init build`: 2 for bad FILES syntax, 1 for unusable files.
fn run_cloud_init_command(command: CloudInitCommand) -> i32 {
    let CloudInitCommand::Build {
        files,
        output,
        force,
    } = command;
    let config = match vmm::cloud_init::parse_cloud_init(&files.join(",")) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("zvmm: {e}");
            return EXIT_USAGE;
        }
    };
    report(
        vmm::cloud_init::write_seed_file(&config, &output, force)
            .map(|image| {
                eprintln!("zvmm: wrote {} ({})", output.display(), image.summary());
                0
            })
            .map_err(Into::into),
    )
}

fn run_kernel_command(command: KernelCommand) -> anyhow::Result<i32> {
    match command {
        KernelCommand::Extract { bzimage, output } => {
            let image = std::fs::read(&bzimage)
                .with_context(|| format!("cannot read {}", bzimage.display()))?;
            let vmlinux = loader::extract::extract_vmlinux(&image)
                .with_context(|| format!("{}", bzimage.display()))?;
            std::fs::write(&output, &vmlinux)
                .with_context(|| format!("cannot write {}", output.display()))?;
            eprintln!(
                "zvmm: wrote {} ({} bytes, ELF vmlinux)",
                output.display(),
                vmlinux.len()
            );
            Ok(0)
        }
        KernelCommand::Inspect { file } => {
            let report = loader::inspect::inspect_file(&file)?;
            print!("{report}");
            Ok(if report.verdict.bootable() { 0 } else { 1 })
        }
    }
}
