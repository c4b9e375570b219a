//! The VM's configuration: one serde tree ([`VmConfig`]) filled alike by the
//! command line, a JSON document or the API, checked by
//! [`VmConfig::validate`]. Option strings of the form `key=value,key=value`
//! are parsed by one helper, [`OptionParser`], shared by every option.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod fs;
mod net;
mod rng;
mod vsock;

pub use fs::{parse_fs, FsConfig, ROOT_TAG};
pub use net::{parse_mac, parse_net, random_mac, NetConfig, DEFAULT_NET_QUEUES, MAX_NET_QUEUES};
pub use rng::{parse_rng, RngConfig, DEFAULT_RNG_SOURCE, RNG_ID};
pub use vsock::{parse_vsock, VsockConfig, MAX_VSOCK_CID, MIN_VSOCK_CID};

/// Largest vCPU count zvmm accepts (APIC IDs fit in 8 bits without x2APIC).
pub const MAX_VCPUS: u8 = 254;
/// Smallest guest RAM zvmm accepts.
pub const MIN_MEMORY: u64 = 8 << 20;

/// A configuration that can't be used, with the option it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An option string has a key this option doesn't know.
    #[error("--{option}: unknown key '{key}' (known: {known})")]
    UnknownKey {
        /// The option, without dashes.
        option: String,
        /// The key given.
        key: String,
        /// The keys the option accepts.
        known: String,
    },
    /// A key was given twice.
    #[error("--{option}: '{key}' given twice")]
    DuplicateKey {
        /// The option, without dashes.
        option: String,
        /// The repeated key.
        key: String,
    },
    /// A value doesn't parse.
    #[error("--{option}: bad value '{value}' for '{key}': {why}")]
    BadValue {
        /// The option, without dashes.
        option: String,
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What was expected.
        why: String,
    },
    /// The configuration as a whole is inconsistent.
    #[error("{0}")]
    Invalid(String),
}

/// vCPU configuration (cloud-hypervisor's `cpus`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    /// vCPUs started at boot.
    pub boot_vcpus: u8,
    /// Highest vCPU count (0: `boot_vcpus`). The ones above `boot_vcpus`
    /// are in the MADT as present but not enabled (online-capable), for
    /// hotplug later.
    #[serde(default)]
    pub max_vcpus: u8,
    /// How the `max_vcpus` are arranged; zvmm presents one package of
    /// single-threaded cores, so only that shape is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot_vcpus: 1,
            max_vcpus: 1,
            topology: None,
        }
    }
}

impl CpusConfig {
    /// The vCPU count the platform is described with (`max_vcpus`, or
    /// `boot_vcpus` when that is 0 or smaller).
    pub fn max(&self) -> u8 {
        self.max_vcpus.max(self.boot_vcpus)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.boot_vcpus == 0 || self.boot_vcpus > MAX_VCPUS {
            return Err(invalid(format!(
                "--cpus: {} vCPUs requested; zvmm supports 1 to {MAX_VCPUS}",
                self.boot_vcpus
            )));
        }
        if self.max_vcpus != 0 && self.max_vcpus < self.boot_vcpus {
            return Err(invalid(format!(
                "--cpus: max={} is below boot={}",
                self.max_vcpus, self.boot_vcpus
            )));
        }
        if self.max_vcpus > MAX_VCPUS {
            return Err(invalid(format!(
                "--cpus: max={} vCPUs; zvmm supports up to {MAX_VCPUS}",
                self.max_vcpus
            )));
        }
        match &self.topology {
            Some(topology) => topology.validate(self.max()),
            None => Ok(()),
        }
    }
}

/// cloud-hypervisor's `cpus.topology`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTopology {
    /// Threads per core.
    pub threads_per_core: u8,
    /// Cores per die.
    pub cores_per_die: u8,
    /// Dies per package.
    pub dies_per_package: u8,
    /// Packages (sockets).
    pub packages: u8,
}

impl CpuTopology {
    fn validate(&self, max_vcpus: u8) -> Result<(), ConfigError> {
        let count = [
            self.threads_per_core,
            self.cores_per_die,
            self.dies_per_package,
            self.packages,
        ]
        .iter()
        .map(|&n| u32::from(n))
        .product::<u32>();
        if count != u32::from(max_vcpus) {
            return Err(invalid(format!(
                "--cpus: topology {}:{}:{}:{} describes {count} vCPUs, not max={max_vcpus}",
                self.threads_per_core, self.cores_per_die, self.dies_per_package, self.packages
            )));
        }
        if (self.threads_per_core, self.dies_per_package, self.packages) != (1, 1, 1) {
            return Err(invalid(format!(
                "--cpus: topology {}:{}:{}:{}: zvmm presents one package of single-threaded cores; give threads_per_core=1, dies_per_package=1, packages=1",
                self.threads_per_core, self.cores_per_die, self.dies_per_package, self.packages
            )));
        }
        Ok(())
    }
}

/// Guest RAM configuration (cloud-hypervisor's `memory`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes of guest RAM.
    pub size: u64,
    /// Back RAM with a memfd that other processes (vhost-user) can map.
    #[serde(default)]
    pub shared: bool,
    /// Bytes of address space kept free above RAM for memory hotplug
    /// (`loader::layout::hotplug_range`); none is plugged at boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: 512 << 20,
            shared: false,
            hotplug_size: None,
        }
    }
}

impl MemoryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.size < MIN_MEMORY {
            return Err(invalid(format!(
                "--memory: {} bytes is too small; give at least {} MiB",
                self.size,
                MIN_MEMORY >> 20
            )));
        }
        if !self.size.is_multiple_of(loader::layout::PAGE_SIZE) {
            return Err(invalid(format!(
                "--memory: {} bytes is not a multiple of 4 KiB",
                self.size
            )));
        }
        let hotplug = self.hotplug_size.unwrap_or(0);
        if !hotplug.is_multiple_of(loader::layout::HOTPLUG_ALIGN) {
            return Err(invalid(format!(
                "--memory: hotplug_size={hotplug} is not a multiple of {} MiB",
                loader::layout::HOTPLUG_ALIGN >> 20
            )));
        }
        if hotplug > loader::layout::MAX_HOTPLUG_SIZE {
            return Err(invalid(format!(
                "--memory: hotplug_size={hotplug} is above zvmm's {} TiB",
                loader::layout::MAX_HOTPLUG_SIZE >> 40
            )));
        }
        Ok(())
    }
}

/// Platform-wide settings (cloud-hypervisor's `platform`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformConfig {
    /// PCI segments, each its own host bridge (ECAM, memory windows);
    /// devices choose theirs with `pci_segment`.
    #[serde(default = "one_segment")]
    pub num_pci_segments: u16,
}

fn one_segment() -> u16 {
    1
}

/// Most PCI segments cloud-hypervisor accepts.
pub const MAX_PCI_SEGMENTS: u16 = loader::layout::MAX_PCI_SEGMENTS;

impl Default for PlatformConfig {
    fn default() -> Self {
        Self {
            num_pci_segments: 1,
        }
    }
}

impl PlatformConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.num_pci_segments == 0 || self.num_pci_segments > MAX_PCI_SEGMENTS {
            return Err(invalid(format!(
                "platform: num_pci_segments={}; give 1 to {MAX_PCI_SEGMENTS}",
                self.num_pci_segments
            )));
        }
        Ok(())
    }
}

/// cloud-hypervisor's `--platform` keys zvmm does not model, with the only
/// value each accepts (its default) and what zvmm lacks for others.
const PLATFORM_DEFAULTS: &[(&str, &[&str], &str)] = &[
    ("iommu_segments", &["[]", ""], "a virtual IOMMU"),
    ("iommu_address_width", &[], "a virtual IOMMU"),
    ("serial_number", &[], "SMBIOS tables"),
    ("uuid", &[], "SMBIOS tables"),
    ("oem_strings", &["[]", ""], "SMBIOS tables"),
    ("tdx", &["off", "false"], "TDX confidential guests"),
    ("sev_snp", &["off", "false"], "SEV-SNP confidential guests"),
];

/// Parses `--platform num_pci_segments=N` (cloud-hypervisor's option);
/// its other keys are accepted at their defaults and refused by name
/// otherwise.
pub fn parse_platform(input: &str) -> Result<PlatformConfig, ConfigError> {
    let mut keys = vec!["num_pci_segments"];
    keys.extend(PLATFORM_DEFAULTS.iter().map(|(key, _, _)| *key));
    let options = OptionParser::parse("platform", &keys, input)?;
    for (key, accepted, lacks) in PLATFORM_DEFAULTS {
        let Some(value) = options.get(key) else {
            continue;
        };
        if !accepted.contains(&value.trim().to_ascii_lowercase().as_str()) {
            let why = match accepted.first() {
                Some(default) => format!("zvmm has no {lacks}; accepted: {default}"),
                None => format!("zvmm has no {lacks}; leave it out"),
            };
            return Err(options.bad_value(key, value, &why));
        }
    }
    let segments = options.number("num_pci_segments")?.unwrap_or(1);
    Ok(PlatformConfig {
        num_pci_segments: segments,
    })
}

/// What the vCPUs start executing (cloud-hypervisor's `payload`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    /// Kernel image: ELF vmlinux or bzImage.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Initial ramdisk.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
}

/// Where a console's bytes go (cloud-hypervisor's `ConsoleOutputMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    /// Discarded.
    Off,
    /// A pseudo-terminal whose path is printed at start.
    Pty,
    /// This process's terminal, input included.
    #[default]
    Tty,
    /// A file.
    File,
    /// Present, output discarded.
    Null,
    /// Standard output and a file.
    Tee,
}

/// A console device's configuration (cloud-hypervisor's `ConsoleConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    /// Where the bytes go.
    pub mode: ConsoleMode,
    /// The output file (`File`), or the allocated pty (`Pty`, filled at start).
    #[serde(default)]
    pub file: Option<PathBuf>,
}

impl ConsoleConfig {
    /// A console with output to this process's terminal.
    pub fn tty() -> Self {
        Self {
            mode: ConsoleMode::Tty,
            file: None,
        }
    }

    /// A console that is turned off.
    pub fn off() -> Self {
        Self {
            mode: ConsoleMode::Off,
            file: None,
        }
    }
}

/// What happens when the guest resets itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnReset {
    /// Start the VM again in the same process.
    #[default]
    Reboot,
    /// End zvmm with exit status 3.
    Exit,
}

/// The whole VM configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// vCPUs.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// Guest RAM.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// Kernel, initrd and command line.
    #[serde(default)]
    pub payload: PayloadConfig,
    /// The 8250 UART at COM1.
    #[serde(default = "ConsoleConfig::tty")]
    pub serial: ConsoleConfig,
    /// The virtio console (not provided by zvmm: only `Off` is accepted).
    #[serde(default = "ConsoleConfig::off")]
    pub console: ConsoleConfig,
    /// Reboot or exit on guest reset.
    #[serde(default)]
    pub on_reset: OnReset,
    /// Seconds after which the VM is stopped (exit status 124).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Console patterns and the boot timeline.
    #[serde(default)]
    pub watch: WatchConfig,
    /// On SIGTERM, press the ACPI power button and stop the VM hard only
    /// after this many seconds (None: stop at once).
    #[serde(default)]
    pub shutdown_grace_secs: Option<u64>,
    /// virtio-blk disks (cloud-hypervisor's `disks`).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Create KVM's in-kernel i8254 PIT (ports 0x40-0x43). Off by default:
    /// the FADT is hardware-reduced, so Linux does not use it, and on some
    /// hosts its kernel worker makes VM teardown cost 13-25 ms.
    #[serde(default)]
    pub pit: bool,
    /// virtio-net NICs on host taps (cloud-hypervisor's `net`).
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// virtio-fs shares (cloud-hypervisor's `fs`, plus zvmm's `path`).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// The virtiofsd binary for `path` shares (default: from PATH).
    #[serde(default)]
    pub virtiofsd: Option<PathBuf>,
    /// A cloud-init NoCloud seed zvmm builds and attaches as the last,
    /// read-only disk.
    #[serde(default)]
    pub cloud_init: Option<crate::cloud_init::CloudInitConfig>,
    /// Platform-wide settings (PCI segments).
    #[serde(default)]
    pub platform: PlatformConfig,
    /// The virtio-rng device every VM has (cloud-hypervisor's `rng`).
    #[serde(default)]
    pub rng: RngConfig,
    /// A virtio-vsock device (cloud-hypervisor's `vsock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
}

/// One virtio-blk disk (cloud-hypervisor's `DiskConfig` subset).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Image file (raw or qcow2) or block device.
    pub path: PathBuf,
    /// Read-only for the guest (and opened read-only on the host).
    #[serde(default)]
    pub readonly: bool,
    /// How to serve the image (`Unknown`: detect its format).
    #[serde(default)]
    pub image_type: DiskImageType,
    /// Follow a qcow2 image's backing file (absent: yes; `false`, as
    /// cloud-hypervisor's default, refuses an image that names one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_files: Option<bool>,
    /// Serial returned to VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// Device identifier, unique in the VM.
    #[serde(default)]
    pub id: Option<String>,
    /// PCI segment of the disk (below `platform.num_pci_segments`).
    #[serde(default)]
    pub pci_segment: u16,
    /// Request queues (cloud-hypervisor's `num_queues`; more than one:
    /// multiqueue virtio-blk).
    #[serde(default = "default_disk_queues")]
    pub num_queues: u16,
    /// Entries per queue (cloud-hypervisor's `queue_size`; zvmm's default
    /// is 256, cloud-hypervisor's 128).
    #[serde(default = "default_disk_queue_size")]
    pub queue_size: u16,
}

fn default_disk_queues() -> u16 {
    1
}

fn default_disk_queue_size() -> u16 {
    devices::virtio::block::QUEUE_SIZE
}

/// Longest serial virtio-blk can return.
pub const MAX_DISK_SERIAL: usize = 20;

/// A disk's `image_type` (cloud-hypervisor's `ImageType` spelling in JSON,
/// `raw`/`qcow2` on the command line).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskImageType {
    /// Detect the format (and guard sector 0 of a raw image).
    #[default]
    Unknown,
    /// Serve the file as raw sectors, whatever it looks like.
    Raw,
    /// Serve the file as a qcow2 image.
    Qcow2,
}

impl DiskImageType {
    /// The type the device is told to use; `None` means detect.
    pub fn forced(self) -> Option<devices::virtio::block::ImageType> {
        use devices::virtio::block::ImageType;
        match self {
            DiskImageType::Unknown => None,
            DiskImageType::Raw => Some(ImageType::Raw),
            DiskImageType::Qcow2 => Some(ImageType::Qcow2),
        }
    }
}

/// What to look for on the console (kernel developers' options).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchConfig {
    /// Regexes that must all match console lines, in order; then exit 0.
    #[serde(default)]
    pub expect: Vec<String>,
    /// Regexes that end the VM with status 5 on the first matching line.
    #[serde(default)]
    pub fail_on: Vec<String>,
    /// Print the boot timeline on stderr at exit.
    #[serde(default)]
    pub boot_timer: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: PayloadConfig::default(),
            serial: ConsoleConfig::tty(),
            console: ConsoleConfig::off(),
            on_reset: OnReset::Reboot,
            timeout_secs: None,
            watch: WatchConfig::default(),
            shutdown_grace_secs: None,
            disks: Vec::new(),
            pit: false,
            net: Vec::new(),
            fs: Vec::new(),
            virtiofsd: None,
            cloud_init: None,
            platform: PlatformConfig::default(),
            rng: RngConfig::default(),
            vsock: None,
        }
    }
}

impl VmConfig {
    /// Checks the configuration as a whole; on success it can be booted.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cpus.validate()?;
        self.memory.validate()?;
        self.platform.validate()?;
        if self.payload.kernel.is_none() {
            return Err(invalid(
                "no kernel given: pass --kernel PATH (an ELF vmlinux or a bzImage)".into(),
            ));
        }
        let needs_file = matches!(self.serial.mode, ConsoleMode::File | ConsoleMode::Tee);
        if needs_file && self.serial.file.is_none() {
            return Err(invalid(
                "--serial file/tee: needs a path (file=PATH)".into(),
            ));
        }
        let watching = !self.watch.expect.is_empty() || !self.watch.fail_on.is_empty();
        if watching && self.serial.mode == ConsoleMode::Off {
            return Err(invalid(
                "--expect/--fail-on: need the serial console; don't pass --serial off".into(),
            ));
        }
        for (option, patterns) in [
            ("expect", &self.watch.expect),
            ("fail-on", &self.watch.fail_on),
        ] {
            crate::watch::compile(option, patterns).map_err(|e| invalid(e.one_line()))?;
        }
        self.validate_disks()?;
        self.validate_segments()?;
        net::validate_nets(&self.net)?;
        fs::validate_fs(&self.fs)?;
        rng::validate_rng(&self.rng)?;
        if let Some(vsock) = &self.vsock {
            vsock::validate_vsock(vsock)?;
        }
        if let Some(cloud_init) = &self.cloud_init {
            cloud_init.validate()?;
        }
        if self.console.mode != ConsoleMode::Off {
            return Err(invalid(
                "--console: zvmm has no virtio-console; use --console off and --serial".into(),
            ));
        }
        if self.timeout_secs == Some(0) {
            return Err(invalid("--timeout: must be at least 1 second".into()));
        }
        Ok(())
    }
}

impl VmConfig {
    /// Fills in what the configuration leaves to zvmm (random MACs,
    /// netmasks next to addresses, shared RAM for virtio-fs), so that
    /// `vm.info` reports what the guest gets and reboots keep it; returns
    /// what was decided that the user should hear about.
    pub fn complete(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        net::complete_nets(&mut self.net);
        if !self.fs.is_empty() && !self.memory.shared {
            self.memory.shared = true;
            notes.push(
                "--fs: backing guest RAM with a memfd (as --memory shared=on) so virtiofsd can map it"
                    .to_string(),
            );
        }
        notes
    }

    /// Refuses, by name, a device on a PCI segment the VM does not have.
    fn validate_segments(&self) -> Result<(), ConfigError> {
        let segments = self.platform.num_pci_segments;
        let disks = self.disks.iter().map(|d| {
            let label = format!("--disk path={}", d.path.display());
            (label, d.pci_segment)
        });
        let nets = self
            .net
            .iter()
            .map(|n| (format!("--net {}", n.label()), n.pci_segment));
        let shares = self
            .fs
            .iter()
            .map(|f| (format!("--fs {}", f.label()), f.pci_segment));
        let vsock = self
            .vsock
            .iter()
            .map(|v| (format!("--vsock {}", v.label()), v.pci_segment));
        let mut devices = disks.chain(nets).chain(shares).chain(vsock);
        match devices.find(|(_, segment)| *segment >= segments) {
            Some((label, segment)) => Err(invalid(format!(
                "{label}: pci_segment={segment}, but the VM has {segments} PCI segment(s) \
                 (--platform num_pci_segments={} or more)",
                segment + 1
            ))),
            None => Ok(()),
        }
    }

    fn validate_disks(&self) -> Result<(), ConfigError> {
        let mut ids = std::collections::BTreeSet::new();
        for (index, disk) in self.disks.iter().enumerate() {
            let id = disk.id.clone().unwrap_or_else(|| format!("_disk{index}"));
            if !ids.insert(id.clone()) {
                return Err(invalid(format!("--disk: id '{id}' used twice")));
            }
            check_disk_queues(disk)?;
            if let Some(serial) = &disk.serial {
                if serial.len() > MAX_DISK_SERIAL {
                    return Err(invalid(format!(
                        "--disk: serial '{serial}' is {} bytes; virtio-blk allows {MAX_DISK_SERIAL}",
                        serial.len()
                    )));
                }
            }
        }
        Ok(())
    }
}

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid(message)
}

/// `num_queues` 1 to 64, `queue_size` a power of two from 4 to 32768.
fn check_disk_queues(disk: &DiskConfig) -> Result<(), ConfigError> {
    use devices::virtio::block::{MAX_QUEUES, MAX_QUEUE_SIZE, MIN_QUEUE_SIZE};
    let path = disk.path.display();
    if disk.num_queues == 0 || disk.num_queues > MAX_QUEUES {
        return Err(invalid(format!(
            "--disk {path}: num_queues={} must be 1 to {MAX_QUEUES}",
            disk.num_queues
        )));
    }
    let size = disk.queue_size;
    if !size.is_power_of_two() || !(MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&size) {
        return Err(invalid(format!(
            "--disk {path}: queue_size={size} must be a power of two from {MIN_QUEUE_SIZE} to {MAX_QUEUE_SIZE}"
        )));
    }
    Ok(())
}

/// Parses one option's `key=value,key=value` string. A bare first item
/// (`512M`, `stdio`) is taken as the value of the option's default key.
pub struct OptionParser {
    option: &'static str,
    values: BTreeMap<String, String>,
}

impl OptionParser {
    /// Splits `input` for `--option`, accepting only `keys`; the first key
    /// is the default for a bare value.
    pub fn parse(option: &'static str, keys: &[&str], input: &str) -> Result<Self, ConfigError> {
        let mut values = BTreeMap::new();
        for (index, item) in split_items(input).into_iter().enumerate() {
            let (key, value) = match item.split_once('=') {
                Some((key, value)) => (key.trim(), value),
                None if index == 0 && !keys.is_empty() => (keys[0], item),
                None => (item.trim(), ""),
            };
            if !keys.contains(&key) {
                return Err(ConfigError::UnknownKey {
                    option: option.into(),
                    key: key.into(),
                    known: keys.join(", "),
                });
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(ConfigError::DuplicateKey {
                    option: option.into(),
                    key: key.into(),
                });
            }
        }
        Ok(Self { option, values })
    }

    /// The raw string value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// `key` as a byte size (`512M`, `2G`, `65536`, `64K`).
    pub fn size(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        self.convert(key, parse_size, "a size like 512M or 2G")
    }

    /// `key` as an unsigned number.
    pub fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, ConfigError> {
        self.convert(key, |v| v.parse().ok(), "a number")
    }

    /// `key` as a switch: `on`/`off` (also `true`/`false`).
    pub fn toggle(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.convert(key, parse_toggle, "on or off")
    }

    fn convert<T>(
        &self,
        key: &str,
        parse: impl Fn(&str) -> Option<T>,
        expected: &str,
    ) -> Result<Option<T>, ConfigError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        parse(value)
            .map(Some)
            .ok_or_else(|| self.bad_value(key, value, &format!("expected {expected}")))
    }

    /// An error about `key`'s value.
    pub fn bad_value(&self, key: &str, value: &str, why: &str) -> ConfigError {
        ConfigError::BadValue {
            option: self.option.into(),
            key: key.into(),
            value: value.into(),
            why: why.into(),
        }
    }
}

/// Parses `--pit on|off`.
pub fn parse_pit(input: &str) -> Result<bool, ConfigError> {
    let options = OptionParser::parse("pit", &["enabled"], input)?;
    Ok(options.toggle("enabled")?.unwrap_or(false))
}

/// Splits an option string at commas outside brackets, so a list value
/// such as `fd=[3,4]` stays one item.
pub(crate) fn split_items(input: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (at, c) in input.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&input[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    items.push(&input[start..]);
    items
}

/// Parses `512M`, `2G`, `64K`, `1T` or a plain byte count.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 10),
        (i, 'M' | 'm') => (&text[..i], 20),
        (i, 'G' | 'g') => (&text[..i], 30),
        (i, 'T' | 't') => (&text[..i], 40),
        _ => (text, 0),
    };
    let number: u64 = digits.parse().ok()?;
    number.checked_mul(1u64 << shift)
}

fn parse_toggle(text: &str) -> Option<bool> {
    match text {
        "on" | "true" | "yes" | "" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// Parses `--cpus N` or `--cpus boot=N[,max=N][,topology=T:C:D:P]`.
pub fn parse_cpus(input: &str) -> Result<CpusConfig, ConfigError> {
    let options = OptionParser::parse("cpus", &["boot", "max", "topology"], input)?;
    let boot_vcpus = vcpu_count(&options, "boot")?.unwrap_or(1);
    let max_vcpus = vcpu_count(&options, "max")?.unwrap_or(boot_vcpus);
    let topology = match options.get("topology") {
        Some(value) => Some(parse_topology(value).ok_or_else(|| {
            options.bad_value(
                "topology",
                value,
                "expected threads_per_core:cores_per_die:dies_per_package:packages",
            )
        })?),
        None => None,
    };
    Ok(CpusConfig {
        boot_vcpus,
        max_vcpus,
        topology,
    })
}

/// A vCPU count: a number, and one zvmm supports.
fn vcpu_count(options: &OptionParser, key: &str) -> Result<Option<u8>, ConfigError> {
    let Some(count) = options.number::<u64>(key)? else {
        return Ok(None);
    };
    match u8::try_from(count) {
        Ok(count) if count <= MAX_VCPUS => Ok(Some(count)),
        _ => Err(options.bad_value(
            key,
            &count.to_string(),
            &format!("zvmm supports 1 to {MAX_VCPUS} vCPUs"),
        )),
    }
}

/// `1:4:1:1` as threads per core, cores per die, dies per package,
/// packages.
fn parse_topology(value: &str) -> Option<CpuTopology> {
    let numbers: Vec<u8> = value
        .split(':')
        .map(|n| n.trim().parse().ok())
        .collect::<Option<_>>()?;
    match numbers[..] {
        [threads_per_core, cores_per_die, dies_per_package, packages] => Some(CpuTopology {
            threads_per_core,
            cores_per_die,
            dies_per_package,
            packages,
        }),
        _ => None,
    }
}

/// The keys `--memory` takes.
const MEMORY_KEYS: [&str; 3] = ["size", "shared", "hotplug_size"];

/// Parses `--memory 512M` or `--memory size=512M[,shared=on]
/// [,hotplug_size=SIZE]`.
pub fn parse_memory(input: &str) -> Result<MemoryConfig, ConfigError> {
    let options = OptionParser::parse("memory", &MEMORY_KEYS, input)?;
    let defaults = MemoryConfig::default();
    Ok(MemoryConfig {
        size: options.size("size")?.unwrap_or(defaults.size),
        shared: options.toggle("shared")?.unwrap_or(false),
        hotplug_size: options.size("hotplug_size")?,
    })
}

/// The `shared=` value of a `--memory` string when given explicitly.
pub fn shared_memory_given(input: &str) -> Result<Option<bool>, ConfigError> {
    OptionParser::parse("memory", &MEMORY_KEYS, input)?.toggle("shared")
}

/// Parses one `--disk path=P[,readonly=on][,image_type=raw|qcow2]
/// [,backing_files=on|off][,serial=S][,id=ID][,num_queues=N][,queue_size=Q]`
/// (a bare value is the path).
pub fn parse_disk(input: &str) -> Result<DiskConfig, ConfigError> {
    let keys = [
        "path",
        "readonly",
        "image_type",
        "backing_files",
        "serial",
        "id",
        "pci_segment",
        "num_queues",
        "queue_size",
    ];
    let options = OptionParser::parse("disk", &keys, input)?;
    let path = match options.get("path") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => return Err(options.bad_value("path", "", "expected path=FILE")),
    };
    let image_type = match options.get("image_type") {
        None => DiskImageType::Unknown,
        Some(value) => match value.to_ascii_lowercase().as_str() {
            "raw" => DiskImageType::Raw,
            "qcow2" => DiskImageType::Qcow2,
            _ => {
                let why = "expected raw or qcow2 (zvmm serves no other image types)";
                return Err(options.bad_value("image_type", value, why));
            }
        },
    };
    Ok(DiskConfig {
        path,
        readonly: options.toggle("readonly")?.unwrap_or(false),
        image_type,
        backing_files: options.toggle("backing_files")?,
        serial: options.get("serial").map(String::from),
        id: options.get("id").map(String::from),
        pci_segment: options.number("pci_segment")?.unwrap_or(0),
        num_queues: options
            .number("num_queues")?
            .unwrap_or_else(default_disk_queues),
        queue_size: options
            .number("queue_size")?
            .unwrap_or_else(default_disk_queue_size),
    })
}

/// Parses `--serial` / `--console`: `off`, `pty`, `tty`, `stdio`, `null`,
/// `file=PATH`, `tee=PATH` (stdout and a file).
pub fn parse_console(option: &'static str, input: &str) -> Result<ConsoleConfig, ConfigError> {
    let options = OptionParser::parse(option, &["mode", "file", "tee"], input)?;
    for (key, mode) in [("file", ConsoleMode::File), ("tee", ConsoleMode::Tee)] {
        if let Some(file) = options.get(key) {
            if file.is_empty() {
                return Err(options.bad_value(key, file, "expected a path"));
            }
            return Ok(ConsoleConfig {
                mode,
                file: Some(PathBuf::from(file)),
            });
        }
    }
    let mode = options.get("mode").unwrap_or("tty");
    let mode = match mode {
        "off" => ConsoleMode::Off,
        "pty" => ConsoleMode::Pty,
        "tty" | "stdio" => ConsoleMode::Tty,
        "null" => ConsoleMode::Null,
        other => {
            return Err(options.bad_value(
                "mode",
                other,
                "expected off, pty, tty, stdio, null, file=PATH or tee=PATH",
            ))
        }
    };
    Ok(ConsoleConfig { mode, file: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_inside_brackets_do_not_split() {
        assert_eq!(split_items("fd=[3,4],mac=x"), vec!["fd=[3,4]", "mac=x"]);
        assert_eq!(split_items("a,b"), vec!["a", "b"]);
        assert_eq!(split_items(""), vec![""]);
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn cpus_accept_bare_and_keyed_forms() {
        assert_eq!(parse_cpus("2").unwrap().boot_vcpus, 2);
        let cpus = parse_cpus("boot=4").unwrap();
        assert_eq!((cpus.boot_vcpus, cpus.max_vcpus), (4, 4));
        assert!(matches!(
            parse_cpus("boot=x"),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            parse_cpus("bot=2"),
            Err(ConfigError::UnknownKey { .. })
        ));
        for too_many in ["1000", "boot=2,max=255"] {
            let err = parse_cpus(too_many).unwrap_err().to_string();
            assert!(err.contains("1 to 254 vCPUs"), "{too_many}: {err}");
        }
        assert!(matches!(
            parse_cpus("boot=2,boot=3"),
            Err(ConfigError::DuplicateKey { .. })
        ));
    }

    #[test]
    fn max_vcpus_above_boot_with_a_one_package_topology_is_accepted() {
        let mut config = bootable();
        config.cpus = parse_cpus("boot=1,max=4,topology=1:4:1:1").unwrap();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.cpus.max(), 4);
        let message = |cpus: &str| {
            let mut config = bootable();
            config.cpus = parse_cpus(cpus).unwrap();
            config.validate().unwrap_err().to_string()
        };
        assert!(message("boot=4,max=2").contains("max=2 is below boot=4"));
        assert!(message("boot=1,max=4,topology=1:2:1:1").contains("describes 2 vCPUs"));
        assert!(message("boot=1,max=4,topology=2:2:1:1").contains("single-threaded"));
        let too_many = parse_cpus("boot=1,max=255").unwrap_err().to_string();
        assert!(too_many.contains("1 to 254"), "{too_many}");
        assert!(parse_cpus("topology=1:2").is_err());
        let json = r#"{"boot_vcpus": 1, "max_vcpus": 8, "topology": {"threads_per_core": 1,
            "cores_per_die": 8, "dies_per_package": 1, "packages": 1}}"#;
        let cpus: CpusConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cpus.topology.unwrap().cores_per_die, 8);
        assert!(!serde_json::to_string(&CpusConfig::default())
            .unwrap()
            .contains("topology"));
    }

    #[test]
    fn hotplug_size_and_pci_segments_are_checked() {
        let mut config = bootable();
        config.memory = parse_memory("size=1G,hotplug_size=4G").unwrap();
        assert_eq!(config.memory.hotplug_size, Some(4 << 30));
        assert_eq!(config.validate(), Ok(()));
        config.memory.hotplug_size = Some((4 << 30) + 4096);
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a multiple of 128 MiB"));
        let mut config = bootable();
        config.platform.num_pci_segments = 0;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("1 to 16"));
        let parsed: VmConfig =
            serde_json::from_str(r#"{"platform": {"num_pci_segments": 2}}"#).unwrap();
        assert_eq!(parsed.platform.num_pci_segments, 2);
    }

    #[test]
    fn platform_option_parses_segments_and_refuses_what_zvmm_lacks() {
        assert_eq!(
            parse_platform("num_pci_segments=4")
                .unwrap()
                .num_pci_segments,
            4
        );
        assert_eq!(
            parse_platform("tdx=off,sev_snp=false").unwrap(),
            PlatformConfig::default()
        );
        assert_eq!(
            parse_platform("num_pci_segments=2,iommu_segments=[]")
                .unwrap()
                .num_pci_segments,
            2
        );
        let err = |input: &str| parse_platform(input).unwrap_err().to_string();
        assert!(err("num_pci_segments=x").contains("'num_pci_segments'"));
        assert!(err("num_pci_segments=-1").contains("a number"));
        assert_eq!(
            err("tdx=on"),
            "--platform: bad value 'on' for 'tdx': zvmm has no TDX confidential guests; accepted: off"
        );
        assert!(err("iommu_segments=[1]").contains("virtual IOMMU"));
        assert!(err("uuid=1234").contains("SMBIOS"));
        assert!(err("frobs=1").contains("unknown key 'frobs'"));
        let mut config = bootable();
        config.platform = parse_platform("num_pci_segments=17").unwrap();
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "platform: num_pci_segments=17; give 1 to 16"
        );
    }

    #[test]
    fn devices_name_an_existing_segment() {
        let mut config = bootable();
        config
            .disks
            .push(parse_disk("path=/a,pci_segment=0").unwrap());
        config
            .fs
            .push(parse_fs("tag=k,socket=/s,pci_segment=1").unwrap());
        assert_eq!(config.fs[0].pci_segment, 1);
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "--fs tag=k,socket=/s: pci_segment=1, but the VM has 1 PCI segment(s) \
             (--platform num_pci_segments=2 or more)"
        );
        config.platform.num_pci_segments = 2;
        assert_eq!(config.validate(), Ok(()));
        config.net.push(parse_net("tap=t0,pci_segment=2").unwrap());
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--net tap=t0: pci_segment=2"));
        config.net.clear();
        config.vsock = Some(parse_vsock("cid=3,socket=/v,pci_segment=5").unwrap());
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("pci_segment=5"));
        config.vsock = None;
        config.disks[0].pci_segment = 7;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--disk path=/a: pci_segment=7"));
        let json: DiskConfig = serde_json::from_str(r#"{"path":"/a","pci_segment":1}"#).unwrap();
        assert_eq!(json.pci_segment, 1);
        assert!(parse_disk("path=/a,pci_segment=x").is_err());
    }

    #[test]
    fn memory_accepts_bare_and_keyed_forms() {
        assert_eq!(parse_memory("512M").unwrap().size, 512 << 20);
        let memory = parse_memory("size=1G,shared=on").unwrap();
        assert_eq!((memory.size, memory.shared), (1 << 30, true));
        let err = parse_memory("size=1G,shared=maybe").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--memory: bad value 'maybe' for 'shared': expected on or off"
        );
    }

    #[test]
    fn console_modes_parse() {
        assert_eq!(
            parse_console("serial", "off").unwrap().mode,
            ConsoleMode::Off
        );
        assert_eq!(
            parse_console("serial", "stdio").unwrap().mode,
            ConsoleMode::Tty
        );
        assert_eq!(
            parse_console("serial", "pty").unwrap().mode,
            ConsoleMode::Pty
        );
        let file = parse_console("serial", "file=/tmp/log").unwrap();
        assert_eq!(file.mode, ConsoleMode::File);
        assert_eq!(file.file, Some(PathBuf::from("/tmp/log")));
        let tee = parse_console("serial", "tee=/tmp/log").unwrap();
        assert_eq!(
            (tee.mode, tee.file),
            (ConsoleMode::Tee, Some(PathBuf::from("/tmp/log")))
        );
        assert!(parse_console("serial", "socket").is_err());
        assert!(parse_console("serial", "file=").is_err());
    }

    #[test]
    fn disks_parse_in_both_forms() {
        let disk = parse_disk("path=/img/root.raw,readonly=on,serial=abc,id=root").unwrap();
        assert_eq!(disk.path, PathBuf::from("/img/root.raw"));
        assert!(disk.readonly);
        assert_eq!(
            (disk.serial.as_deref(), disk.id.as_deref()),
            (Some("abc"), Some("root"))
        );
        let bare = parse_disk("/img/data.raw").unwrap();
        assert_eq!(
            (bare.path, bare.readonly),
            (PathBuf::from("/img/data.raw"), false)
        );
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=/x,readonly=perhaps").is_err());
        assert!(parse_disk("path=/x,cache=none").is_err());
    }

    #[test]
    fn disk_image_types_parse_and_serialize_like_cloud_hypervisor() {
        let image_type = |input: &str| parse_disk(input).map(|d| d.image_type);
        assert_eq!(image_type("/x").unwrap(), DiskImageType::Unknown);
        assert_eq!(
            image_type("path=/x,image_type=raw").unwrap(),
            DiskImageType::Raw
        );
        assert_eq!(
            image_type("path=/x,image_type=QCOW2").unwrap(),
            DiskImageType::Qcow2
        );
        let err = image_type("path=/x,image_type=vhdx")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vhdx") && err.contains("expected raw or qcow2"),
            "{err}"
        );
        assert_eq!(DiskImageType::Unknown.forced(), None);
        assert_eq!(
            DiskImageType::Qcow2.forced(),
            Some(devices::virtio::block::ImageType::Qcow2)
        );
        let json = r#"{"path":"/x","image_type":"Qcow2"}"#;
        let disk: DiskConfig = serde_json::from_str(json).unwrap();
        assert_eq!(disk.image_type, DiskImageType::Qcow2);
        let disk: DiskConfig = serde_json::from_str(r#"{"path":"/x"}"#).unwrap();
        assert_eq!(disk.image_type, DiskImageType::Unknown);
        let text = serde_json::to_string(&disk).unwrap();
        assert!(text.contains(r#""image_type":"Unknown""#), "{text}");
        assert!(!text.contains("backing_files"), "{text}");
        let backing = |input: &str| parse_disk(input).map(|d| d.backing_files);
        assert_eq!(backing("/x").unwrap(), None);
        assert_eq!(backing("path=/x,backing_files=off").unwrap(), Some(false));
        assert_eq!(backing("path=/x,backing_files=on").unwrap(), Some(true));
        let json = r#"{"path":"/x","backing_files":false}"#;
        let disk: DiskConfig = serde_json::from_str(json).unwrap();
        assert_eq!(disk.backing_files, Some(false));
    }

    #[test]
    fn validate_checks_disk_ids_and_serials() {
        let mut config = bootable();
        config.disks = vec![
            parse_disk("path=/a,id=x").unwrap(),
            parse_disk("path=/b,id=x").unwrap(),
        ];
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("id 'x' used twice"));
        config.disks = vec![parse_disk("path=/a,serial=012345678901234567890").unwrap()];
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("allows 20"));
    }

    #[test]
    fn disk_queues_parse_and_bad_values_name_the_option() {
        let disk = parse_disk("path=/x,num_queues=4,queue_size=64").unwrap();
        assert_eq!((disk.num_queues, disk.queue_size), (4, 64));
        let plain = parse_disk("/x").unwrap();
        assert_eq!((plain.num_queues, plain.queue_size), (1, 256));
        for input in ["num_queues=two", "queue_size=65536", "num_queues=-1"] {
            let err = parse_disk(&format!("path=/x,{input}")).unwrap_err();
            let key = input.split('=').next().unwrap();
            assert!(err.to_string().contains(key), "{input}: {err}");
        }
        let mut config = bootable();
        for input in [
            "num_queues=0",
            "num_queues=65",
            "queue_size=2",
            "queue_size=100",
            "queue_size=0",
        ] {
            config.disks = vec![parse_disk(&format!("path=/x,{input}")).unwrap()];
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(input), "{input}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        config.disks = vec![parse_disk("path=/x,num_queues=64,queue_size=32768").unwrap()];
        config.validate().unwrap();
    }

    fn bootable() -> VmConfig {
        VmConfig {
            payload: PayloadConfig {
                kernel: Some("/k".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn validate_accepts_a_plain_config() {
        assert_eq!(bootable().validate(), Ok(()));
    }

    #[test]
    fn validate_rejects_bad_combinations() {
        let mut config = bootable();
        config.cpus.boot_vcpus = 0;
        assert!(config.validate().is_err());
        let mut config = bootable();
        config.memory.size = 1 << 20;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("too small"));
        let mut config = bootable();
        config.payload.kernel = None;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--kernel"));
        let mut config = bootable();
        config.console.mode = ConsoleMode::Tty;
        assert!(config.validate().is_err());
        let mut config = bootable();
        config.timeout_secs = Some(0);
        assert!(config.validate().is_err());
        let mut config = bootable();
        config.watch.fail_on = vec!["(".into()];
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--fail-on"));
        let mut config = bootable();
        config.watch.expect = vec!["login".into()];
        config.serial = ConsoleConfig::off();
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--serial off"));
    }

    #[test]
    fn config_round_trips_through_json() {
        let config = bootable();
        let json = serde_json::to_string(&config).unwrap();
        let back: VmConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        let minimal: VmConfig =
            serde_json::from_str(r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":2}}"#).unwrap();
        assert_eq!(minimal.cpus.boot_vcpus, 2);
        assert_eq!(minimal.memory.size, 512 << 20);
    }
}
