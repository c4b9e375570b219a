//! PCI the way Linux reaches it: every segment's ECAM window from the ACPI
//! MCFG table (one entry per segment) and, on segment 0, the 0xCF8/0xCFC
//! ports; enumeration of each segment's root bus (on segment 0 through
//! both mechanisms, cross-checked and reported), BAR sizing and assignment
//! of unassigned memory BARs, the command register, capability walking,
//! and mapping MMIO that lies above the probe's 4 GiB identity map.
//!
//! Functions are named by [`Bdf::label`] in every driver's report: the
//! device number on segment 0 (`slot=3`), `S:D` elsewhere (`slot=1:3`).

use core::arch::asm;

use crate::acpi::Acpi;
use crate::io::outl;
use crate::phys::{self, u16_at, u64_at, u8_at};
use crate::report;

/// Most functions the probe keeps from all root buses.
pub const MAX_FUNCTIONS: usize = 64;
/// Most PCI segments the probe reaches (cloud-hypervisor's limit).
pub const MAX_SEGMENTS: usize = 16;
/// Number of BARs of a type-0 header.
pub const BAR_COUNT: usize = 6;

// Configuration space registers.
const REG_ID: u16 = 0x00;
const REG_COMMAND: u16 = 0x04;
const REG_CLASS: u16 = 0x08;
const REG_HEADER: u16 = 0x0c;
const REG_BAR0: u16 = 0x10;
const REG_CAP_PTR: u16 = 0x34;
const STATUS_CAP_LIST: u32 = 1 << 20; // in the dword at REG_COMMAND
/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus mastering (device DMA).
pub const COMMAND_MASTER: u16 = 1 << 2;
const HEADER_MULTI_FUNCTION: u32 = 0x80;
const CLASS_BRIDGE: u32 = 0x06;

const CF8_ADDRESS: u16 = 0xcf8;
const CF8_DATA: u16 = 0xcfc;
const CF8_ENABLE: u32 = 1 << 31;

/// Where the probe puts memory BARs nobody assigned: the 32-bit PCI hole
/// below zvmm's and QEMU microvm's ECAM window (q35's SeaBIOS assigns all).
const ASSIGN_WINDOW: (u64, u64) = (0xc000_0000, 0xe000_0000);
const TWO_MIB: u64 = 1 << 21;

/// A function on a segment's root bus.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Bdf {
    /// PCI segment (group).
    pub seg: u16,
    /// Bus number (the segment's root bus).
    pub bus: u8,
    /// Device number (0..32).
    pub slot: u8,
    /// Function number (0..8).
    pub func: u8,
}

impl Bdf {
    /// How reports name the function's device: `D` on segment 0, `S:D`
    /// on segment S.
    pub fn label(&self) -> SlotLabel {
        SlotLabel {
            seg: self.seg,
            slot: self.slot,
        }
    }
}

/// A device's name in reports (see [`Bdf::label`]).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotLabel {
    seg: u16,
    slot: u8,
}

impl core::fmt::Display for SlotLabel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.seg {
            0 => write!(f, "{}", self.slot),
            seg => write!(f, "{seg}:{}", self.slot),
        }
    }
}

/// What a BAR decodes.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub enum BarKind {
    /// Not implemented (or the upper half of a 64-bit BAR).
    #[default]
    None,
    /// I/O ports.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory.
    Mem64,
}

/// One sized BAR.
#[derive(Clone, Copy, Default)]
pub struct Bar {
    /// Base address (0 if unassigned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Decoding type.
    pub kind: BarKind,
}

/// One function found on bus 0.
#[derive(Clone, Copy, Default)]
pub struct Function {
    /// Its address.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (base, sub, prog-if) in the low 24 bits.
    pub class: u32,
    /// BARs after sizing and assignment.
    pub bars: [Bar; BAR_COUNT],
}

/// The configuration mechanisms: each segment's ECAM (the MCFG base of
/// its bus 0, mapped) and, for segment 0, the 0xCF8 ports.
#[derive(Clone, Copy)]
pub struct Config {
    ecam: [Option<u64>; MAX_SEGMENTS],
    cf8: bool,
}

impl Config {
    /// Whether 0xCF8/0xCFC reaches `bdf`'s register `reg`: segment 0's
    /// first 256 bytes, when the ports are present.
    fn uses_cf8(&self, bdf: Bdf, reg: u16) -> bool {
        self.cf8 && bdf.seg == 0 && reg < 256
    }

    /// Reads a dword the way Linux does: 0xCF8/0xCFC for the first 256
    /// bytes of segment 0 when present, else ECAM; all-ones when neither
    /// answers.
    pub fn read32(&self, bdf: Bdf, reg: u16) -> u32 {
        let reg = reg & !3;
        let value = if self.uses_cf8(bdf, reg) {
            Some(cf8_read32(bdf, reg))
        } else {
            self.ecam_read32(bdf, reg)
        };
        value.unwrap_or(u32::MAX)
    }

    /// Reads a 16-bit register.
    pub fn read16(&self, bdf: Bdf, reg: u16) -> u16 {
        (self.read32(bdf, reg) >> ((reg & 2) * 8)) as u16
    }

    /// Reads an 8-bit register.
    pub fn read8(&self, bdf: Bdf, reg: u16) -> u8 {
        (self.read32(bdf, reg) >> ((reg & 3) * 8)) as u8
    }

    /// Writes a dword (mechanism chosen as for [`Config::read32`]).
    pub fn write32(&self, bdf: Bdf, reg: u16, value: u32) {
        let reg = reg & !3;
        if self.uses_cf8(bdf, reg) {
            outl(CF8_ADDRESS, cf8_address(bdf, reg));
            outl(CF8_DATA, value);
        } else if let Some(addr) = self.ecam_addr(bdf, reg) {
            // SAFETY: inside the ECAM window of the segment's root bus,
            // which is mapped.
            unsafe { core::ptr::write_volatile(addr as *mut u32, value) };
        }
    }

    /// Writes a 16-bit register without touching its neighbour (a
    /// read-modify-write of the dword would clear RW1C status bits).
    pub fn write16(&self, bdf: Bdf, reg: u16, value: u16) {
        let reg = reg & !1;
        if self.uses_cf8(bdf, reg) {
            outl(CF8_ADDRESS, cf8_address(bdf, reg & !3));
            crate::io::outw(CF8_DATA + (reg & 2), value);
        } else if let Some(addr) = self.ecam_addr(bdf, reg) {
            // SAFETY: as in `write32`.
            unsafe { core::ptr::write_volatile(addr as *mut u16, value) };
        }
    }

    fn ecam_addr(&self, bdf: Bdf, reg: u16) -> Option<u64> {
        let base = (*self.ecam.get(usize::from(bdf.seg))?)?;
        let offset =
            (u64::from(bdf.bus) << 20) | (u64::from(bdf.slot) << 15) | (u64::from(bdf.func) << 12);
        Some(base + offset + u64::from(reg & 0xfff))
    }

    fn ecam_read32(&self, bdf: Bdf, reg: u16) -> Option<u32> {
        let addr = self.ecam_addr(bdf, reg & !3)?;
        // SAFETY: as in `write32`.
        Some(unsafe { core::ptr::read_volatile(addr as *const u32) })
    }

    /// The capability offsets of `bdf`'s list, with their IDs.
    pub fn capabilities(&self, bdf: Bdf) -> Capabilities<'_> {
        let first = if self.read32(bdf, REG_COMMAND) & STATUS_CAP_LIST != 0 {
            self.read8(bdf, REG_CAP_PTR) & 0xfc
        } else {
            0
        };
        Capabilities {
            config: self,
            bdf,
            next: first,
            left: 48,
        }
    }
}

/// Iterator over a function's capability list: `(offset, id)`.
pub struct Capabilities<'a> {
    config: &'a Config,
    bdf: Bdf,
    next: u8,
    left: u8,
}

impl Iterator for Capabilities<'_> {
    type Item = (u16, u8);

    fn next(&mut self) -> Option<(u16, u8)> {
        if self.next < 0x40 || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let offset = u16::from(self.next);
        let id = self.config.read8(self.bdf, offset);
        self.next = self.config.read8(self.bdf, offset + 1) & 0xfc;
        Some((offset, id))
    }
}

fn cf8_address(bdf: Bdf, reg: u16) -> u32 {
    CF8_ENABLE
        | (u32::from(bdf.bus) << 16)
        | (u32::from(bdf.slot) << 11)
        | (u32::from(bdf.func) << 8)
        | u32::from(reg & 0xfc)
}

fn cf8_read32(bdf: Bdf, reg: u16) -> u32 {
    outl(CF8_ADDRESS, cf8_address(bdf, reg));
    inl(CF8_DATA)
}

fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: port reads have no memory effects; the probe owns the machine.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack)) };
    value
}

/// Whether 0xCF8 holds what is written to it (Linux's type-1 check).
fn cf8_present() -> bool {
    outl(CF8_ADDRESS, CF8_ENABLE);
    let present = inl(CF8_ADDRESS) == CF8_ENABLE;
    outl(CF8_ADDRESS, 0);
    present
}

/// The root buses: their configuration mechanisms and functions.
pub struct Pci {
    /// Configuration access.
    pub config: Config,
    functions: [Function; MAX_FUNCTIONS],
    count: usize,
}

impl Pci {
    /// The functions found, segment by segment.
    pub fn functions(&self) -> &[Function] {
        &self.functions[..self.count]
    }
}

/// A segment's root bus to scan.
#[derive(Clone, Copy, Default)]
struct RootBus {
    seg: u16,
    bus: u8,
}

/// Finds the configuration mechanisms, enumerates every segment's root
/// bus (segment 0 through both mechanisms), sizes the BARs (assigning
/// unassigned memory BARs) and reports it all.
/// `probe.pci.mem64=ADDR` on `cmdline` (test aid) places every 64-bit
/// memory BAR from ADDR upwards, whatever the firmware chose.
pub fn discover(acpi: &Acpi, cmdline: &[u8]) -> Pci {
    let mut config = Config {
        ecam: [None; MAX_SEGMENTS],
        cf8: cf8_present(),
    };
    let (roots, count) = ecam_windows(acpi, &mut config);
    report!("pci cf8={}", if config.cf8 { "present" } else { "absent" });
    let mut pci = Pci {
        config,
        functions: [Function::default(); MAX_FUNCTIONS],
        count: 0,
    };
    for root in &roots[..count] {
        scan_bus(&mut pci, *root);
    }
    report!("pci segments={count}");
    report!("pci functions={}", pci.count);
    size_all_bars(&mut pci, mem64_option(cmdline));
    pci
}

/// Enumerates the devices and functions of one root bus.
fn scan_bus(pci: &mut Pci, root: RootBus) {
    for slot in 0..32 {
        for func in 0..8 {
            let bdf = Bdf {
                seg: root.seg,
                bus: root.bus,
                slot,
                func,
            };
            let Some(function) = identify(&pci.config, bdf) else {
                if func == 0 {
                    break;
                }
                continue;
            };
            pci.add(function);
            let header = pci.config.read32(bdf, REG_HEADER) >> 16;
            if func == 0 && header & HEADER_MULTI_FUNCTION == 0 {
                break;
            }
        }
    }
}

/// The value of `probe.pci.mem64=` (`0x` hex or decimal).
fn mem64_option(cmdline: &[u8]) -> Option<u64> {
    let value = cmdline
        .split(|&b| b == b' ')
        .find_map(|word| word.strip_prefix(b"probe.pci.mem64="))?;
    let text = core::str::from_utf8(value).ok()?;
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    };
    if parsed.is_none() {
        report!("pci option bad_mem64={}", crate::serial::Quoted(value));
    }
    parsed
}

impl Pci {
    fn add(&mut self, function: Function) {
        match self.functions.get_mut(self.count) {
            Some(slot) => {
                *slot = function;
                self.count += 1;
            }
            None => report!("pci slot={} ignored reason=too_many", function.bdf.label()),
        }
    }
}

/// Maps and records the ECAM window of every MCFG entry (one per
/// segment), reporting each; returns the root buses to scan by segment,
/// segment 0 always (through 0xCF8 alone when it has no ECAM).
fn ecam_windows(acpi: &Acpi, config: &mut Config) -> ([RootBus; MAX_SEGMENTS], usize) {
    let mut roots = [RootBus::default(); MAX_SEGMENTS];
    let mut count = 1; // segment 0, bus 0 unless its MCFG entry says otherwise
    let Some(mcfg) = acpi.mcfg else {
        report!("pci ecam none");
        return (roots, count);
    };
    // Body: 8 reserved bytes, then 16-byte entries (base, segment, buses).
    let entries = mcfg.body().get(8..).unwrap_or(&[]);
    for entry in entries.chunks_exact(16) {
        let (base, seg) = (u64_at(entry, 0), u16_at(entry, 8));
        let (first, last) = (u8_at(entry, 10), u8_at(entry, 11));
        report!("pci ecam={base:#x} buses={first}-{last} seg={seg}");
        let Some(place) = config.ecam.get_mut(usize::from(seg)) else {
            report!("pci ecam seg={seg} ignored reason=beyond_{MAX_SEGMENTS}");
            continue;
        };
        if place.is_some() {
            report!("pci ecam seg={seg} ignored reason=duplicate");
            continue;
        }
        if !map_mmio(base + (u64::from(first) << 20), 1 << 20) {
            report!("pci ecam seg={seg} unmappable");
            continue;
        }
        *place = Some(base);
        let root = RootBus { seg, bus: first };
        if seg == 0 {
            roots[0] = root;
        } else if let Some(free) = roots.get_mut(count) {
            *free = root;
            count += 1;
        }
    }
    if config.ecam[0].is_none() {
        report!("pci ecam none reason=no_segment0");
    }
    roots[1..count].sort_unstable_by_key(|root| root.seg);
    (roots, count)
}

/// Reads `bdf`'s IDs and class through both mechanisms, reports them and
/// any disagreement; `None` if no function answers.
fn identify(config: &Config, bdf: Bdf) -> Option<Function> {
    let read_ids = |read: &dyn Fn(u16) -> u32| (read(REG_ID), read(REG_CLASS));
    let by_cf8 = config
        .uses_cf8(bdf, REG_ID)
        .then(|| read_ids(&|reg| cf8_read32(bdf, reg)));
    let by_ecam = config
        .ecam_addr(bdf, REG_ID)
        .map(|_| read_ids(&|reg| config.ecam_read32(bdf, reg).unwrap_or(u32::MAX)));
    let present = |ids: &(u32, u32)| ids.0 as u16 != 0xffff;
    let via = match (by_ecam, by_cf8) {
        (Some(e), Some(c)) if e != c && (present(&e) || present(&c)) => {
            report!(
                "pci mismatch slot={} func={} ecam_id={:#010x} ecam_class={:#010x} cf8_id={:#010x} cf8_class={:#010x}",
                bdf.label(), bdf.func, e.0, e.1, c.0, c.1
            );
            "mismatch"
        }
        (Some(_), Some(_)) => "ecam+cf8",
        (Some(_), None) => "ecam",
        _ => "cf8",
    };
    let (id, class) = by_ecam.filter(present).or(by_cf8.filter(present))?;
    let function = Function {
        bdf,
        vendor: id as u16,
        device: (id >> 16) as u16,
        class: class >> 8,
        bars: [Bar::default(); BAR_COUNT],
    };
    let (vendor, device, class) = (function.vendor, function.device, function.class);
    report!(
        "pci seg={} bus={} dev={} func={} vendor={vendor:#06x} device={device:#06x} class={class:#08x} via={via}",
        bdf.seg,
        bdf.bus,
        bdf.slot,
        bdf.func,
    );
    if bdf.seg == 0 {
        // The line older report readers look for.
        report!(
            "pci slot={} func={} vendor={vendor:#06x} device={device:#06x} class={class:#08x} via={via}",
            bdf.slot,
            bdf.func,
        );
    }
    Some(function)
}

/// Sizes every BAR of every non-bridge type-0 function, then assigns
/// unassigned memory BARs from [`ASSIGN_WINDOW`] above any assigned one,
/// and every 64-bit memory BAR from `mem64` upwards if given.
fn size_all_bars(pci: &mut Pci, mem64: Option<u64>) {
    let config = pci.config;
    let mut next = ASSIGN_WINDOW.0;
    for function in pci.functions[..pci.count].iter_mut() {
        let header = (config.read32(function.bdf, REG_HEADER) >> 16) & 0x7f;
        if header != 0 || function.class >> 16 == CLASS_BRIDGE {
            continue;
        }
        function.bars = size_bars(&config, function.bdf);
        for bar in function.bars.iter().filter(|b| is_mem(b) && b.addr != 0) {
            let end = bar.addr.saturating_add(bar.size);
            if (ASSIGN_WINDOW.0..ASSIGN_WINDOW.1).contains(&bar.addr) {
                next = next.max(end);
            }
        }
    }
    let mut high = mem64;
    for function in pci.functions[..pci.count].iter_mut() {
        for index in 0..BAR_COUNT {
            let bar = function.bars[index];
            let placed = if is_mem(&bar) && bar.kind == BarKind::Mem64 && high.is_some() {
                Some(high.as_mut().and_then(|at| assign(at, bar.size, u64::MAX)))
            } else if is_mem(&bar) && bar.addr == 0 {
                Some(assign(&mut next, bar.size, ASSIGN_WINDOW.1))
            } else {
                None
            };
            let source = match placed {
                None => "firmware",
                Some(None) => "none",
                Some(Some(addr)) => {
                    move_bar(&config, function.bdf, index, bar.kind, addr);
                    function.bars[index].addr = addr;
                    "probe"
                }
            };
            if bar.kind != BarKind::None {
                report_bar(function, index, source);
            }
        }
    }
}

fn is_mem(bar: &Bar) -> bool {
    matches!(bar.kind, BarKind::Mem32 | BarKind::Mem64) && bar.size != 0
}

fn report_bar(function: &Function, index: usize, source: &str) {
    let bar = function.bars[index];
    let kind = match bar.kind {
        BarKind::Io => "io",
        BarKind::Mem32 => "mem32",
        BarKind::Mem64 => "mem64",
        BarKind::None => "none",
    };
    report!(
        "pci slot={} func={} bar{index}={:#x} size={:#x} type={kind} assigned={source}",
        function.bdf.label(),
        function.bdf.func,
        bar.addr,
        bar.size
    );
}

/// Takes a naturally aligned `size`-byte range at `next`, below `limit`.
fn assign(next: &mut u64, size: u64, limit: u64) -> Option<u64> {
    let addr = next.checked_next_multiple_of(size)?;
    let end = addr.checked_add(size)?;
    (end <= limit).then(|| {
        *next = end;
        addr
    })
}

/// Sizes the BARs of `bdf` with decoding off, restoring every register.
fn size_bars(config: &Config, bdf: Bdf) -> [Bar; BAR_COUNT] {
    let mut bars = [Bar::default(); BAR_COUNT];
    let command = config.read16(bdf, REG_COMMAND);
    config.write16(bdf, REG_COMMAND, command & !(COMMAND_MEMORY | 1));
    let mut index = 0;
    while index < BAR_COUNT {
        let reg = REG_BAR0 + 4 * index as u16;
        let low = config.read32(bdf, reg);
        let low_mask = probe_register(config, bdf, reg, low);
        let (kind, addr, mask) = if low & 1 == 1 {
            (
                BarKind::Io,
                u64::from(low & !3),
                u64::from(low_mask & 0xfffc) | !0xffff,
            )
        } else if (low >> 1) & 3 == 2 && index + 1 < BAR_COUNT {
            let high = config.read32(bdf, reg + 4);
            let high_mask = probe_register(config, bdf, reg + 4, high);
            let wide = |h: u32, l: u32| (u64::from(h) << 32) | u64::from(l & !0xf);
            (BarKind::Mem64, wide(high, low), wide(high_mask, low_mask))
        } else {
            let mask = u64::from(low_mask & !0xf) | !0xffff_ffff;
            (BarKind::Mem32, u64::from(low & !0xf), mask)
        };
        // A BAR whose address bits do not stick is not implemented.
        if low_mask != 0 && ![0, !0xffff, !0xffff_ffff].contains(&mask) {
            bars[index] = Bar {
                addr,
                size: (!mask).wrapping_add(1),
                kind,
            };
        }
        index += if kind == BarKind::Mem64 { 2 } else { 1 };
    }
    config.write16(bdf, REG_COMMAND, command);
    bars
}

/// Writes all-ones to a BAR register, returns what sticks, restores it.
fn probe_register(config: &Config, bdf: Bdf, reg: u16, original: u32) -> u32 {
    config.write32(bdf, reg, u32::MAX);
    let mask = config.read32(bdf, reg);
    config.write32(bdf, reg, original);
    mask
}

/// Programs BAR `index` with memory decoding off meanwhile.
fn move_bar(config: &Config, bdf: Bdf, index: usize, kind: BarKind, addr: u64) {
    let command = config.read16(bdf, REG_COMMAND);
    config.write16(bdf, REG_COMMAND, command & !COMMAND_MEMORY);
    let reg = REG_BAR0 + 4 * index as u16;
    config.write32(bdf, reg, addr as u32);
    if kind == BarKind::Mem64 {
        config.write32(bdf, reg + 4, (addr >> 32) as u32);
    }
    config.write16(bdf, REG_COMMAND, command);
}

/// Turns on memory decoding and bus mastering (Linux `pci_enable_device`
/// plus `pci_set_master`); reports the command register read back through
/// both mechanisms.
pub fn enable(config: &Config, bdf: Bdf) {
    let command = config.read16(bdf, REG_COMMAND);
    config.write16(bdf, REG_COMMAND, command | COMMAND_MEMORY | COMMAND_MASTER);
    let cf8 = config
        .uses_cf8(bdf, REG_COMMAND)
        .then(|| cf8_read32(bdf, REG_COMMAND) as u16);
    let ecam = config.ecam_read32(bdf, REG_COMMAND).map(|v| v as u16);
    let value = config.read16(bdf, REG_COMMAND);
    let agree = cf8.unwrap_or(value) == value && ecam.unwrap_or(value) == value;
    report!(
        "pci slot={} func={} command={value:#06x} readback={}",
        bdf.label(),
        bdf.func,
        if agree { "ok" } else { "mismatch" }
    );
}

// Page-table entry bits.
const PTE_PRESENT_WRITABLE: u64 = 0x3;
const PTE_UNCACHED: u64 = 0x18; // PWT | PCD
const PTE_LARGE: u64 = 0x80;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
/// Page tables the probe can add for MMIO above 4 GiB.
const TABLE_POOL: usize = 6;

#[repr(C, align(4096))]
struct TablePool([[u64; 512]; TABLE_POOL]);

static mut TABLES: TablePool = TablePool([[0; 512]; TABLE_POOL]);
static TABLES_USED: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Makes `[addr, addr + len)` accessible: below 4 GiB the identity map
/// already covers it; above, 2 MiB uncached identity pages are added to
/// the live page tables. False if the range is beyond the CPU's physical
/// address width or the table pool is exhausted.
pub fn map_mmio(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    if end <= phys::MAPPED_END {
        return true;
    }
    if end > 1u64 << phys_address_bits() {
        return false;
    }
    let mut page = addr & !(TWO_MIB - 1);
    while page < end {
        if !map_2mib(page) {
            return false;
        }
        page += TWO_MIB;
    }
    // SAFETY: reloading CR3 with its own value only flushes the TLB.
    unsafe {
        asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack));
    }
    true
}

fn phys_address_bits() -> u32 {
    if crate::io::cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        crate::io::cpuid(0x8000_0008, 0).eax & 0xff
    } else {
        36
    }
}

/// Identity-maps the 2 MiB page at `page` (uncached), adding a PDPT or PD
/// from the pool where missing.
fn map_2mib(page: u64) -> bool {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let pml4 = (cr3 & PTE_ADDR) as *mut u64;
    let Some(pdpt) = next_table(pml4, (page >> 39) & 511) else {
        return false;
    };
    let pdpt_entry = (page >> 30) & 511;
    // SAFETY: `pdpt` is a live page table in the identity map.
    if unsafe { pdpt.add(pdpt_entry as usize).read_volatile() } & PTE_LARGE != 0 {
        return true; // already a 1 GiB page
    }
    let Some(pd) = next_table(pdpt, pdpt_entry) else {
        return false;
    };
    let entry = page | PTE_PRESENT_WRITABLE | PTE_UNCACHED | PTE_LARGE;
    // SAFETY: `pd` is a page directory in the identity map; the entry maps
    // device memory nothing else uses, and the TLB is flushed afterwards.
    unsafe { pd.add(((page >> 21) & 511) as usize).write_volatile(entry) };
    true
}

/// The table `table[index]` points to, taking one from the pool if absent.
fn next_table(table: *mut u64, index: u64) -> Option<*mut u64> {
    // SAFETY: `table` is a page table of the live hierarchy (identity
    // mapped, below 4 GiB) and `index` < 512.
    let slot = unsafe { table.add(index as usize) };
    // SAFETY: as above.
    let entry = unsafe { slot.read_volatile() };
    if entry & 1 != 0 {
        return Some((entry & PTE_ADDR) as *mut u64);
    }
    let used = TABLES_USED.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    if used >= TABLE_POOL {
        return None;
    }
    // SAFETY: each pool page is handed out once (the counter above) and
    // only the BSP maps MMIO; the pool is zeroed .bss in the identity map.
    let new = unsafe { core::ptr::addr_of_mut!(TABLES.0[used]) }.cast::<u64>();
    // SAFETY: `slot` is the empty entry read above.
    unsafe { slot.write_volatile(new as u64 | PTE_PRESENT_WRITABLE) };
    Some(new)
}

/// Volatile access to a device register window (identity-mapped).
#[derive(Clone, Copy)]
pub struct Mmio(pub u64);

impl Mmio {
    /// Reads an 8-bit register at `offset`.
    pub fn read8(self, offset: u64) -> u8 {
        // SAFETY: the window was mapped with `map_mmio` (or lies below
        // 4 GiB) and belongs to a device the probe drives.
        unsafe { core::ptr::read_volatile((self.0 + offset) as *const u8) }
    }

    /// Reads a 16-bit register at `offset`.
    pub fn read16(self, offset: u64) -> u16 {
        // SAFETY: as for `read8`.
        unsafe { core::ptr::read_volatile((self.0 + offset) as *const u16) }
    }

    /// Reads a 32-bit register at `offset`.
    pub fn read32(self, offset: u64) -> u32 {
        // SAFETY: as for `read8`.
        unsafe { core::ptr::read_volatile((self.0 + offset) as *const u32) }
    }

    /// Writes an 8-bit register at `offset`.
    pub fn write8(self, offset: u64, value: u8) {
        // SAFETY: as for `read8`.
        unsafe { core::ptr::write_volatile((self.0 + offset) as *mut u8, value) }
    }

    /// Writes a 16-bit register at `offset`.
    pub fn write16(self, offset: u64, value: u16) {
        // SAFETY: as for `read8`.
        unsafe { core::ptr::write_volatile((self.0 + offset) as *mut u16, value) }
    }

    /// Writes a 32-bit register at `offset`.
    pub fn write32(self, offset: u64, value: u32) {
        // SAFETY: as for `read8`.
        unsafe { core::ptr::write_volatile((self.0 + offset) as *mut u32, value) }
    }

    /// Writes a 64-bit register as two dwords, low first (as Linux does).
    pub fn write64(self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}
