//! Test actions: with `probe.action=NAME` on the command line the probe,
//! after its report, does NAME instead of powering off, so a VMM's handling
//! of guest resets, hangs, console input and unrunnable code can be tested.
//!
//! | NAME | what the probe does |
//! |---|---|
//! | `reset-i8042` | 0xfe to the i8042 command port |
//! | `reset-acpi` | FADT `RESET_VALUE` to `RESET_REG` (Linux `reboot=acpi`) |
//! | `triple-fault` | loads an empty IDT and raises `#UD` |
//! | `hang` | `cli; hlt` forever |
//! | `echo=N` | reads N bytes from COM1, reports them, powers off |
//! | `bad-exec` | jumps to [`BAD_EXEC_ADDR`], where nothing is mapped |
//! | `power-button` | waits for the ACPI power button ([`pwrbtn`]), powers off |

use crate::acpi::Acpi;
use crate::boot::BootInfo;
use crate::serial::{self, Quoted};
use crate::{io, power, pwrbtn, report};

/// Command-line key that selects an action.
const KEY: &[u8] = b"probe.action=";
/// Most bytes `echo=N` reads.
pub const ECHO_MAX: usize = 256;
/// Where `bad-exec` jumps: in the 32-bit MMIO hole (the PCI memory window
/// of zvmm and QEMU), neither RAM nor claimed by a device.
pub const BAD_EXEC_ADDR: u64 = 0xd000_0000;

/// What to do after the report.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Power off (no `probe.action`).
    PowerOff,
    /// Reset through the i8042 controller.
    ResetI8042,
    /// Reset through the FADT reset register.
    ResetAcpi,
    /// Triple-fault the boot CPU.
    TripleFault,
    /// Halt with interrupts off, forever.
    Hang,
    /// Echo this many console input bytes, then power off.
    Echo(usize),
    /// Execute from an address without memory behind it.
    BadExec,
    /// Wait for the ACPI power button, then power off.
    PowerButton,
    /// An action the probe does not know (reported, then power-off).
    Unknown(&'static [u8]),
}

impl Action {
    /// The action named on the command line, [`Action::PowerOff`] if none.
    pub fn requested(boot: &BootInfo) -> Action {
        let cmdline = boot.cmdline.unwrap_or(&[]);
        cmdline
            .split(|&b| b == b' ')
            .find_map(|word| word.strip_prefix(KEY))
            .map_or(Action::PowerOff, Action::parse)
    }

    fn parse(name: &'static [u8]) -> Action {
        match name {
            b"reset-i8042" => Action::ResetI8042,
            b"reset-acpi" => Action::ResetAcpi,
            b"triple-fault" => Action::TripleFault,
            b"hang" => Action::Hang,
            b"bad-exec" => Action::BadExec,
            b"power-button" => Action::PowerButton,
            _ => match name.strip_prefix(b"echo=").and_then(parse_decimal) {
                Some(len) if len <= ECHO_MAX => Action::Echo(len),
                _ => Action::Unknown(name),
            },
        }
    }
}

fn parse_decimal(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0usize, |acc, &d| {
        let digit = usize::from(d.checked_sub(b'0').filter(|&d| d <= 9)?);
        acc.checked_mul(10)?.checked_add(digit)
    })
}

/// Runs `action`; every path ends the probe (power-off, reset or halt).
pub fn run(action: Action, boot: &BootInfo, acpi: &Acpi) -> ! {
    match action {
        Action::PowerOff => power::power_off(acpi),
        Action::Unknown(name) => {
            report!("action unknown={}", Quoted(name));
            power::power_off(acpi)
        }
        Action::ResetI8042 => {
            report!("action name=reset-i8042");
            power::reset_i8042()
        }
        Action::ResetAcpi => {
            report!("action name=reset-acpi");
            power::reset_acpi(acpi)
        }
        Action::TripleFault => {
            report!("action name=triple-fault");
            triple_fault()
        }
        Action::Hang => {
            report!("action name=hang");
            io::halt_forever()
        }
        Action::Echo(len) => {
            report!("action name=echo len={len}");
            echo(len);
            power::power_off(acpi)
        }
        Action::PowerButton => {
            report!("action name=power-button");
            pwrbtn::run(boot, acpi)
        }
        Action::BadExec => {
            report!("action name=bad-exec addr={BAD_EXEC_ADDR:#x}");
            bad_exec()
        }
    }
}

/// Reads `len` bytes from COM1 (polled) and reports them quoted.
fn echo(len: usize) {
    let mut bytes = [0u8; ECHO_MAX];
    let len = len.min(ECHO_MAX);
    report!("echo waiting");
    for slot in &mut bytes[..len] {
        *slot = serial::read_byte();
    }
    report!("echo {}", Quoted(&bytes[..len]));
}

/// IDTR operand of `lidt`.
#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

/// Loads a zero-length IDT and raises `#UD` (`ud2`): its delivery faults
/// (#GP), that fault's delivery faults again (#DF), and the CPU shuts down.
/// (`int3` would do on hardware, but KVM-PVM emulates `int3` and reports an
/// emulation failure instead of the triple fault.)
fn triple_fault() -> ! {
    let idtr = Idtr { limit: 0, base: 0 };
    // SAFETY: the intent is to stop this CPU through a triple fault; the
    // IDTR operand is a live local and nothing runs afterwards.
    unsafe {
        core::arch::asm!(
            "lidt [{idtr}]",
            "ud2",
            "2: hlt",
            "jmp 2b",
            idtr = in(reg) &idtr,
            options(noreturn, nostack)
        )
    }
}

/// Jumps to [`BAD_EXEC_ADDR`]; the identity map covers it, but no memory
/// answers there, so the CPU (or the hypervisor's emulator) cannot fetch.
fn bad_exec() -> ! {
    // SAFETY: the intent is to make this CPU unrunnable; nothing in the
    // probe runs afterwards.
    unsafe {
        core::arch::asm!(
            "jmp {target}",
            target = in(reg) BAD_EXEC_ADDR,
            options(noreturn, nostack)
        )
    }
}
