//! The probe guest (`resources/probe`): building it once per test process,
//! reading its ELF headers, and parsing the `probe: ` report it prints on the
//! serial port (whatever VMM ran it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Which of the two probe binaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// PVH ELF (`XEN_ELFNOTE_PHYS32_ENTRY`, 32-bit entry, `hvm_start_info`).
    Pvh,
    /// Linux 64-bit boot protocol ELF (64-bit entry, `boot_params`).
    Linux64,
}

impl Flavour {
    /// Cargo binary name.
    pub fn bin_name(self) -> &'static str {
        match self {
            Flavour::Pvh => "probe-pvh",
            Flavour::Linux64 => "probe-linux64",
        }
    }

    /// The `boot protocol=` value the probe reports.
    pub fn protocol(self) -> &'static str {
        match self {
            Flavour::Pvh => "pvh",
            Flavour::Linux64 => "linux64",
        }
    }
}

/// Failures building or reading the probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The bare-metal Rust target is missing.
    #[error("rust target x86_64-unknown-none is not installed; run: rustup target add x86_64-unknown-none")]
    TargetMissing,
    /// A tool could not be started.
    #[error("cannot run {tool}")]
    Spawn {
        /// The program.
        tool: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `cargo build` of the probe failed.
    #[error("building the probe in {dir} failed:\n{stderr}")]
    Build {
        /// The probe's directory.
        dir: PathBuf,
        /// Cargo's diagnostics.
        stderr: String,
    },
    /// An ELF file could not be read.
    #[error("cannot read ELF {path}")]
    ReadElf {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An ELF file is malformed or not ELF64 little-endian.
    #[error("{path} is not a valid ELF64 file: {what}")]
    BadElf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
}

/// `resources/probe` in this repository.
pub fn probe_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("resources")
        .join("probe")
}

/// zvmm's arguments for the PVH probe on 128 MiB with its serial on
/// stdio and a 60 s timeout, then `extra`: the probe runs its checks and
/// powers off.
pub fn probe_stdio_args(extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        probe_elf(Flavour::Pvh).display().to_string(),
        "--memory".into(),
        "128M".into(),
        "--serial".into(),
        "stdio".into(),
        "--timeout".into(),
        "60".into(),
    ];
    args.extend(extra.iter().cloned());
    args
}

/// Builds both probe flavours (once per process) and returns the path of
/// `flavour`'s ELF. Panics with the build error: meant for tests.
pub fn probe_elf(flavour: Flavour) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let release = BUILT.get_or_init(|| build_probe().map_err(|e| error_chain(&e)));
    match release {
        Ok(dir) => dir.join(flavour.bin_name()),
        Err(msg) => panic!("{msg}"),
    }
}

/// Runs `cargo build --release --target x86_64-unknown-none` in
/// `resources/probe` (target dir `resources/probe/target`) and returns the
/// directory holding both ELFs.
pub fn build_probe() -> Result<PathBuf, ProbeError> {
    check_target_installed()?;
    let dir = probe_dir();
    let target_dir = dir.join("target");
    let output = Command::new("cargo")
        .args(["build", "--release", "--target", "x86_64-unknown-none"])
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|source| ProbeError::Spawn {
            tool: "cargo".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(ProbeError::Build {
            dir,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(target_dir.join("x86_64-unknown-none").join("release"))
}

fn check_target_installed() -> Result<(), ProbeError> {
    let output = Command::new("rustc")
        .args([
            "--print",
            "target-libdir",
            "--target",
            "x86_64-unknown-none",
        ])
        .output()
        .map_err(|source| ProbeError::Spawn {
            tool: "rustc".into(),
            source,
        })?;
    let libdir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let has_core = std::fs::read_dir(&libdir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
        })
        .unwrap_or(false);
    if output.status.success() && has_core {
        Ok(())
    } else {
        Err(ProbeError::TargetMissing)
    }
}

/// An error and its causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        msg.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    msg
}

/// FNV-1a, 64-bit: the hash the probe reports for the initrd.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    })
}

/// The boot-relevant parts of an ELF64 file's headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfSummary {
    /// `e_entry`.
    pub entry: u64,
    /// `(p_paddr, p_memsz)` of every `PT_LOAD` segment.
    pub loads: Vec<(u64, u64)>,
    /// Entry point from a `Xen` note of type `XEN_ELFNOTE_PHYS32_ENTRY`.
    pub pvh_entry: Option<u64>,
}

/// Reads the entry point, load segments and PVH note of an ELF64 file.
pub fn elf_summary(path: &Path) -> Result<ElfSummary, ProbeError> {
    let bytes = std::fs::read(path).map_err(|source| ProbeError::ReadElf {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |what| ProbeError::BadElf {
        path: path.to_path_buf(),
        what,
    };
    if bytes.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err(bad("no ELF64 little-endian magic"));
    }
    let field = |off: usize, len: usize| -> Result<u64, ProbeError> {
        let raw = bytes.get(off..off + len).ok_or(bad("truncated"))?;
        Ok(raw
            .iter()
            .rev()
            .fold(0, |acc, &b| (acc << 8) | u64::from(b)))
    };
    let (phoff, phentsize, phnum) = (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?);
    let mut summary = ElfSummary {
        entry: field(0x18, 8)?,
        loads: Vec::new(),
        pvh_entry: None,
    };
    for index in 0..phnum {
        let ph = usize::try_from(phoff + index * phentsize).map_err(|_| bad("bad phoff"))?;
        let (kind, offset, paddr) = (field(ph, 4)?, field(ph + 8, 8)?, field(ph + 24, 8)?);
        let (filesz, memsz) = (field(ph + 32, 8)?, field(ph + 40, 8)?);
        match kind {
            1 => summary.loads.push((paddr, memsz)),
            4 => {
                let start = usize::try_from(offset).map_err(|_| bad("bad note"))?;
                let end = start + usize::try_from(filesz).map_err(|_| bad("bad note"))?;
                let notes = bytes.get(start..end).ok_or(bad("note out of file"))?;
                summary.pvh_entry = summary.pvh_entry.or(pvh_note(notes));
            }
            _ => {}
        }
    }
    Ok(summary)
}

/// The `Xen`/18 note's value in a PT_NOTE segment's bytes.
fn pvh_note(mut notes: &[u8]) -> Option<u64> {
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let word = |b: &[u8], off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
    };
    while notes.len() >= 12 {
        let (namesz, descsz, kind) = (word(notes, 0)?, word(notes, 4)?, word(notes, 8)?);
        let name_end = 12 + (namesz as usize).next_multiple_of(4);
        let desc_end = name_end + (descsz as usize).next_multiple_of(4);
        let name = notes.get(12..12 + namesz as usize)?;
        let desc = notes.get(name_end..name_end + descsz as usize)?;
        if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            return Some(
                desc.iter()
                    .rev()
                    .fold(0, |acc, &b| (acc << 8) | u64::from(b)),
            );
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

/// The probe's report: the text after `probe: ` of every line holding it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeReport {
    lines: Vec<String>,
}

/// One memory-map entry as reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemmapEntry {
    /// First address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `ram`, `reserved`, `acpi`, `nvs`, `unusable` or `other(N)`.
    pub kind: String,
}

/// The reported initrd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdInfo {
    /// Physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// FNV-1a 64 of its bytes.
    pub fnv1a64: u64,
}

/// Outcome of a checksum the probe verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// Bytes sum to zero.
    Ok,
    /// They do not.
    Bad,
    /// The structure has no checksum (FACS).
    None,
}

/// One ACPI table as reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// Four-character signature.
    pub signature: String,
    /// Physical address.
    pub addr: u64,
    /// Length from its header.
    pub len: u64,
    /// Checksum verdict.
    pub checksum: Checksum,
}

/// The RSDP as reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RsdpInfo {
    /// Physical address.
    pub addr: u64,
    /// ACPI revision field.
    pub revision: u64,
    /// OEM ID.
    pub oem: String,
    /// Checksum verdict (both checksums for revision 2).
    pub checksum: Checksum,
}

/// One IOAPIC from the MADT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApicInfo {
    /// IOAPIC ID.
    pub id: u64,
    /// MMIO base.
    pub addr: u64,
    /// First GSI.
    pub gsi_base: u64,
}

/// How the probe tried to power off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PowerOffInfo {
    /// `sleep_control` or `pm1`.
    pub method: String,
    /// SLP_TYPa from `_S5_`.
    pub slp_typ: u64,
}

impl ProbeReport {
    /// Extracts the probe lines from serial output (firmware chatter,
    /// `\r` and anything before `probe: ` on a line are dropped).
    pub fn parse(serial: &str) -> Self {
        let lines = serial
            .lines()
            .filter_map(|line| line.find("probe: ").map(|at| &line[at + 7..]))
            .map(|rest| rest.trim_end_matches('\r').to_string())
            .collect();
        Self { lines }
    }

    /// The report lines, without the `probe: ` prefix.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Whether the exact line (without prefix) was reported.
    pub fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }

    /// The rest of the first line starting with `key_prefix`, e.g.
    /// `value("boot protocol=") == Some("pvh")`.
    pub fn value(&self, key_prefix: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| l.strip_prefix(key_prefix))
    }

    /// The rest of every line starting with `key_prefix`.
    pub fn values(&self, key_prefix: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix(key_prefix))
            .collect()
    }

    /// Parsed `key=value` fields of every line starting with `prefix`.
    fn records(&self, prefix: &str) -> impl Iterator<Item = Fields> {
        let records: Vec<Fields> = self.values(prefix).into_iter().map(Fields::parse).collect();
        records.into_iter()
    }

    /// Whether an i8254 PIT answered on ports 0x40-0x43 (`pit present=`).
    pub fn pit_present(&self) -> Option<bool> {
        let line = self.value("pit present=")?;
        match line.split(' ').next()? {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        }
    }

    /// `start` was printed (the probe reached Rust code).
    pub fn started(&self) -> bool {
        self.has("start")
    }

    /// `done` was printed (the probe got to power-off).
    pub fn finished(&self) -> bool {
        self.has("done")
    }

    /// The boot protocol (`pvh` or `linux64`).
    pub fn protocol(&self) -> Option<&str> {
        self.value("boot protocol=")
    }

    /// The command line, unescaped; `None` if absent or unparsable.
    pub fn cmdline(&self) -> Option<String> {
        let line = self.lines.iter().find(|l| l.starts_with("cmdline="))?;
        Fields::parse(line).get("cmdline").map(str::to_string)
    }

    /// The memory map entries.
    pub fn memmap(&self) -> Vec<MemmapEntry> {
        self.records("memmap ")
            .filter_map(|f| {
                Some(MemmapEntry {
                    start: f.num("start")?,
                    end: f.num("end")?,
                    kind: f.get("type")?.to_string(),
                })
            })
            .collect()
    }

    /// Total RAM bytes the probe added up.
    pub fn ram_bytes(&self) -> Option<u64> {
        parse_num(self.value("memory ram_bytes=")?)
    }

    /// The initrd, if one was reported with a checksum.
    pub fn initrd(&self) -> Option<InitrdInfo> {
        let f = self.records("initrd ").next()?;
        Some(InitrdInfo {
            addr: f.num("addr")?,
            size: f.num("size")?,
            fnv1a64: f.num("fnv1a64")?,
        })
    }

    /// The initrd's FNV-1a 64 hash.
    pub fn initrd_checksum(&self) -> Option<u64> {
        self.initrd().map(|i| i.fnv1a64)
    }

    /// The RSDP.
    pub fn rsdp(&self) -> Option<RsdpInfo> {
        let f = self.records("acpi ").find(|f| f.get("rsdp").is_some())?;
        Some(RsdpInfo {
            addr: f.num("rsdp")?,
            revision: f.num("revision")?,
            oem: f.get("oem")?.to_string(),
            checksum: f.checksum()?,
        })
    }

    /// Every ACPI table reported (root table, its entries, DSDT, FACS).
    pub fn acpi_tables(&self) -> Vec<AcpiTable> {
        self.records("acpi ")
            .filter_map(|f| {
                Some(AcpiTable {
                    signature: f.get("table")?.to_string(),
                    addr: f.num("addr")?,
                    len: f.num("len")?,
                    checksum: f.checksum()?,
                })
            })
            .collect()
    }

    /// The reported table with `signature`, if any.
    pub fn acpi_table(&self, signature: &str) -> Option<AcpiTable> {
        self.acpi_tables()
            .into_iter()
            .find(|t| t.signature == signature)
    }

    /// Number of enabled CPUs in the MADT.
    pub fn cpus(&self) -> Option<u64> {
        parse_num(self.value("cpus count=")?)
    }

    /// APIC IDs of the enabled CPUs in the MADT.
    pub fn cpu_apic_ids(&self) -> Vec<u64> {
        self.values("cpu apic_id=")
            .into_iter()
            .filter_map(parse_num)
            .collect()
    }

    /// The IOAPICs in the MADT.
    pub fn ioapics(&self) -> Vec<IoApicInfo> {
        self.records("ioapic ")
            .filter_map(|f| {
                Some(IoApicInfo {
                    id: f.num("id")?,
                    addr: f.num("addr")?,
                    gsi_base: f.num("gsi_base")?,
                })
            })
            .collect()
    }

    /// APIC IDs of the APs that reported `online`.
    pub fn aps_online(&self) -> Vec<u64> {
        self.ap_ids_with("online")
    }

    /// APIC IDs of the APs that never checked in.
    pub fn ap_timeouts(&self) -> Vec<u64> {
        self.ap_ids_with("timeout")
    }

    fn ap_ids_with(&self, state: &str) -> Vec<u64> {
        self.records("ap ")
            .filter(|f| f.has_flag(state))
            .filter_map(|f| f.num("apic_id"))
            .collect()
    }

    /// `(online, of)` from the `smp` summary line.
    pub fn smp(&self) -> Option<(u64, u64)> {
        let f = self.records("smp ").find(|f| f.get("online").is_some())?;
        Some((f.num("online")?, f.num("of")?))
    }

    /// The power-off attempt.
    pub fn poweroff(&self) -> Option<PowerOffInfo> {
        let f = self
            .records("poweroff ")
            .find(|f| f.get("method").is_some())?;
        Some(PowerOffInfo {
            method: f.get("method")?.to_string(),
            slp_typ: f.num("slp_typ")?,
        })
    }

    /// The probe said power-off did not work.
    pub fn poweroff_failed(&self) -> bool {
        self.has("poweroff failed")
    }

    /// The panic message, if the probe panicked.
    pub fn panic_message(&self) -> Option<&str> {
        self.value("panic ")
    }

    /// How many times the probe started (more than once after a reboot).
    pub fn starts(&self) -> usize {
        self.lines.iter().filter(|l| *l == "start").count()
    }

    /// The value the probe read from I/O port `port`.
    pub fn port_value(&self, port: u16) -> Option<u64> {
        let name = format!("{port:#x}");
        self.records("port ")
            .find(|f| f.has_flag(&name))
            .and_then(|f| f.num("value"))
    }

    /// The test action the probe ran (`probe.action=`), if any.
    pub fn action(&self) -> Option<String> {
        self.records("action ")
            .find_map(|f| f.get("name").map(str::to_string))
    }

    /// The address `bad-exec` jumped to.
    pub fn bad_exec_addr(&self) -> Option<u64> {
        self.records("action ")
            .find(|f| f.get("name") == Some("bad-exec"))
            .and_then(|f| f.num("addr"))
    }

    /// The reset method the probe used (`i8042`, `acpi`).
    pub fn reset_method(&self) -> Option<String> {
        self.records("reset ")
            .find_map(|f| f.get("method").map(str::to_string))
    }

    /// The bytes `echo=N` read from the console, unescaped.
    pub fn echo(&self) -> Option<String> {
        let quoted = self.value("echo \"")?;
        Some(unquote(&mut quoted.chars().peekable()))
    }
}

/// Deterministic pseudo-random bytes (xorshift64 from `seed`), for initrds
/// whose checksum must come back unchanged.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// `key=value` fields of one report line; bare words are flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields {
    pairs: Vec<(String, Option<String>)>,
}

impl Fields {
    /// Splits a line on spaces outside double quotes; quoted values are
    /// unescaped (`\"`, `\\`, `\xNN`).
    pub fn parse(line: &str) -> Self {
        let mut pairs = Vec::new();
        let mut chars = line.chars().peekable();
        loop {
            while chars.next_if_eq(&' ').is_some() {}
            if chars.peek().is_none() {
                break;
            }
            let key: String =
                std::iter::from_fn(|| chars.next_if(|&c| c != ' ' && c != '=')).collect();
            let value = chars.next_if_eq(&'=').map(|_| {
                if chars.next_if_eq(&'"').is_some() {
                    unquote(&mut chars)
                } else {
                    std::iter::from_fn(|| chars.next_if(|&c| c != ' ')).collect()
                }
            });
            pairs.push((key, value));
        }
        Self { pairs }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The value of `key` as a number (decimal or `0x` hex).
    pub fn num(&self, key: &str) -> Option<u64> {
        parse_num(self.get(key)?)
    }

    /// Whether the bare word `flag` is present.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.pairs.iter().any(|(k, v)| k == flag && v.is_none())
    }

    fn checksum(&self) -> Option<Checksum> {
        match self.get("checksum")? {
            "ok" => Some(Checksum::Ok),
            "bad" => Some(Checksum::Bad),
            "none" => Some(Checksum::None),
            _ => None,
        }
    }
}

/// Reads a quoted value after its opening quote, up to the closing quote.
fn unquote(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    let mut out = Vec::new();
    while let Some(c) = chars.next() {
        match c {
            '"' => break,
            '\\' => match chars.next() {
                Some('x') => {
                    let hex: String = chars.by_ref().take(2).collect();
                    out.push(u8::from_str_radix(&hex, 16).unwrap_or(b'?'));
                }
                Some(other) => push_char(&mut out, other),
                None => break,
            },
            other => push_char(&mut out, other),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn push_char(out: &mut Vec<u8>, c: char) {
    let mut buf = [0; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// Parses `0x`-prefixed hex or decimal.
pub fn parse_num(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
SeaBIOS junk\r\n\
probe: start\r\n\
probe: boot protocol=pvh\n\
probe: boot start_info=0xf31e0\n\
probe: cmdline=\"console=ttyS0 q=\\\"a b\\\" t=\\x01\"\n\
probe: memmap start=0x0 end=0x9fc00 type=ram\n\
probe: memmap start=0x9fc00 end=0xa0000 type=reserved\n\
probe: memmap start=0x0 end=0x0 type=other(0)\n\
probe: memory ram_bytes=654336\n\
garbage probe: initrd addr=0xffe7000 size=100000 fnv1a64=0xbafc08ea1fff2cc9\n\
probe: acpi rsdp_source=start_info\n\
probe: acpi rsdp=0xf34d0 revision=2 oem=\"BOCHS \" checksum=ok\n\
probe: acpi table=XSDT addr=0xeff8f len=52 checksum=ok\n\
probe: acpi table=FACP addr=0xefe29 len=268 checksum=bad\n\
probe: acpi table=FACS addr=0xffe0000 len=64 checksum=none\n\
probe: ioapic id=0 addr=0xfec00000 gsi_base=0\n\
probe: cpu apic_id=0\n\
probe: cpu apic_id=1\n\
probe: cpu apic_id=2\n\
probe: cpus count=3\n\
probe: smp trampoline=0x10000\n\
probe: ap apic_id=1 online\n\
probe: ap apic_id=2 timeout\n\
probe: smp online=1 of=2\n\
probe: done\n\
probe: poweroff method=sleep_control slp_typ=5\n";

    #[test]
    fn fnv1a64_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn parse_keeps_only_probe_lines() {
        let report = ProbeReport::parse(SAMPLE);
        assert_eq!(report.lines()[0], "start");
        assert!(report.lines().iter().all(|l| !l.contains('\r')));
        assert!(report.started() && report.finished());
        assert_eq!(report.protocol(), Some("pvh"));
        assert_eq!(report.value("boot start_info="), Some("0xf31e0"));
    }

    #[test]
    fn cmdline_is_unescaped() {
        let report = ProbeReport::parse(SAMPLE);
        assert_eq!(
            report.cmdline().as_deref(),
            Some("console=ttyS0 q=\"a b\" t=\u{1}")
        );
    }

    #[test]
    fn memmap_and_initrd_are_parsed() {
        let report = ProbeReport::parse(SAMPLE);
        let map = report.memmap();
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            MemmapEntry {
                start: 0,
                end: 0x9fc00,
                kind: "ram".into()
            }
        );
        assert_eq!(map[2].kind, "other(0)");
        assert_eq!(report.ram_bytes(), Some(654_336));
        assert_eq!(
            report.initrd(),
            Some(InitrdInfo {
                addr: 0xffe7000,
                size: 100_000,
                fnv1a64: 0xbafc08ea1fff2cc9
            })
        );
    }

    #[test]
    fn acpi_lines_are_parsed() {
        let report = ProbeReport::parse(SAMPLE);
        let rsdp = report.rsdp().unwrap();
        assert_eq!((rsdp.addr, rsdp.revision), (0xf34d0, 2));
        assert_eq!(rsdp.oem, "BOCHS ");
        let tables = report.acpi_tables();
        let sigs: Vec<_> = tables.iter().map(|t| t.signature.as_str()).collect();
        assert_eq!(sigs, ["XSDT", "FACP", "FACS"]);
        assert_eq!(tables[1].checksum, Checksum::Bad);
        assert_eq!(tables[2].checksum, Checksum::None);
        assert_eq!(report.acpi_table("XSDT").map(|t| t.len), Some(52));
        assert_eq!(
            report.ioapics(),
            [IoApicInfo {
                id: 0,
                addr: 0xfec00000,
                gsi_base: 0
            }]
        );
    }

    #[test]
    fn smp_and_poweroff_lines_are_parsed() {
        let report = ProbeReport::parse(SAMPLE);
        assert_eq!(report.cpus(), Some(3));
        assert_eq!(report.cpu_apic_ids(), [0, 1, 2]);
        assert_eq!(report.aps_online(), [1]);
        assert_eq!(report.ap_timeouts(), [2]);
        assert_eq!(report.smp(), Some((1, 2)));
        let off = report.poweroff().unwrap();
        assert_eq!((off.method.as_str(), off.slp_typ), ("sleep_control", 5));
        assert!(!report.poweroff_failed());
        assert_eq!(report.panic_message(), None);
    }

    #[test]
    fn action_lines_are_parsed() {
        let report = ProbeReport::parse(
            "probe: start\nprobe: start\nprobe: port 0x2f8 value=0xff\n\
             probe: action name=bad-exec addr=0xd0000000\n\
             probe: reset method=acpi space=io addr=0x602 value=0x1\n\
             probe: echo waiting\nprobe: echo \"he\\\"l\\x01o\"\n",
        );
        assert_eq!(report.starts(), 2);
        assert_eq!(report.port_value(0x2f8), Some(0xff));
        assert_eq!(report.port_value(0x3f8), None);
        assert_eq!(report.action().as_deref(), Some("bad-exec"));
        assert_eq!(report.bad_exec_addr(), Some(0xd000_0000));
        assert_eq!(report.reset_method().as_deref(), Some("acpi"));
        assert_eq!(report.echo().as_deref(), Some("he\"l\u{1}o"));
        assert_eq!(ProbeReport::parse("probe: echo waiting\n").echo(), None);
    }

    #[test]
    fn test_bytes_are_deterministic() {
        assert_eq!(test_bytes(100, 7), test_bytes(100, 7));
        assert_ne!(test_bytes(100, 7), test_bytes(100, 8));
        assert_eq!(test_bytes(5, 1).len(), 5);
    }

    #[test]
    fn missing_facts_are_none() {
        let report =
            ProbeReport::parse("probe: start\nprobe: initrd none\nprobe: panic boom at x:1\n");
        assert!(report.started() && !report.finished());
        assert_eq!(report.initrd(), None);
        assert_eq!(report.cmdline(), None);
        assert_eq!(report.smp(), None);
        assert_eq!(report.panic_message(), Some("boom at x:1"));
    }

    /// `const NAME: usize = VALUE;` items of a probe source file.
    fn probe_consts(file: &str) -> std::collections::HashMap<String, usize> {
        let src = std::fs::read_to_string(probe_dir().join("src").join(file)).unwrap();
        src.lines()
            .filter_map(|line| {
                let rest = line.trim().trim_start_matches("pub(crate) ");
                let (name, value) = rest.strip_prefix("const ")?.split_once(": usize = ")?;
                let value = parse_num(&value.trim_end_matches(';').replace('_', ""))?;
                Some((name.to_string(), usize::try_from(value).ok()?))
            })
            .collect()
    }

    /// The probe's hand-written offsets against linux-loader's bindgen
    /// layouts (generated from the Linux and Xen headers).
    #[test]
    fn probe_boot_offsets_match_the_linux_and_xen_headers() {
        use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
        use linux_loader::loader::elf::start_info::{
            hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
        };
        use std::mem::{offset_of, size_of};
        let consts = probe_consts("boot.rs");
        let hdr = offset_of!(boot_params, hdr);
        let expected = [
            ("BP_ACPI_RSDP", offset_of!(boot_params, acpi_rsdp_addr)),
            (
                "BP_EXT_RAMDISK_IMAGE",
                offset_of!(boot_params, ext_ramdisk_image),
            ),
            (
                "BP_EXT_RAMDISK_SIZE",
                offset_of!(boot_params, ext_ramdisk_size),
            ),
            (
                "BP_EXT_CMD_LINE_PTR",
                offset_of!(boot_params, ext_cmd_line_ptr),
            ),
            ("BP_E820_ENTRIES", offset_of!(boot_params, e820_entries)),
            ("BP_E820_TABLE", offset_of!(boot_params, e820_table)),
            (
                "BP_RAMDISK_IMAGE",
                hdr + offset_of!(setup_header, ramdisk_image),
            ),
            (
                "BP_RAMDISK_SIZE",
                hdr + offset_of!(setup_header, ramdisk_size),
            ),
            (
                "BP_CMD_LINE_PTR",
                hdr + offset_of!(setup_header, cmd_line_ptr),
            ),
            (
                "BP_CMDLINE_SIZE",
                hdr + offset_of!(setup_header, cmdline_size),
            ),
            ("E820_ENTRY_SIZE", size_of::<boot_e820_entry>()),
            ("ZERO_PAGE_SIZE", size_of::<boot_params>()),
            ("SI_VERSION", offset_of!(hvm_start_info, version)),
            ("SI_NR_MODULES", offset_of!(hvm_start_info, nr_modules)),
            ("SI_MODLIST", offset_of!(hvm_start_info, modlist_paddr)),
            ("SI_CMDLINE", offset_of!(hvm_start_info, cmdline_paddr)),
            ("SI_RSDP", offset_of!(hvm_start_info, rsdp_paddr)),
            ("SI_MEMMAP", offset_of!(hvm_start_info, memmap_paddr)),
            (
                "SI_MEMMAP_ENTRIES",
                offset_of!(hvm_start_info, memmap_entries),
            ),
            ("SI_SIZE", size_of::<hvm_start_info>()),
            ("MODLIST_ENTRY_SIZE", size_of::<hvm_modlist_entry>()),
            ("MEMMAP_ENTRY_SIZE", size_of::<hvm_memmap_table_entry>()),
        ];
        for (name, offset) in expected {
            assert_eq!(consts.get(name), Some(&offset), "{name}");
        }
        let relaunch = probe_consts("relaunch.rs");
        assert_eq!(
            relaunch.get("BP_BOOT_FLAG"),
            Some(&(hdr + offset_of!(setup_header, boot_flag)))
        );
        assert_eq!(
            relaunch.get("BP_HEADER"),
            Some(&(hdr + offset_of!(setup_header, header)))
        );
        assert_eq!(consts.get("MAX_E820"), Some(&128));
    }

    #[test]
    fn pvh_note_is_found_only_with_the_right_name_and_type() {
        let note = |name: &[u8], kind: u32| {
            let mut n = Vec::new();
            n.extend_from_slice(&(name.len() as u32).to_le_bytes());
            n.extend_from_slice(&4u32.to_le_bytes());
            n.extend_from_slice(&kind.to_le_bytes());
            n.extend_from_slice(name);
            n.resize(12 + name.len().next_multiple_of(4), 0);
            n.extend_from_slice(&0x0010_0000u32.to_le_bytes());
            n
        };
        assert_eq!(pvh_note(&note(b"Xen\0", 18)), Some(0x10_0000));
        assert_eq!(pvh_note(&note(b"Xen\0", 1)), None);
        assert_eq!(pvh_note(&note(b"GNU\0", 18)), None);
        let mut two = note(b"GNU\0", 3);
        two.extend(note(b"Xen\0", 18));
        assert_eq!(pvh_note(&two), Some(0x10_0000));
    }
}
