//! COM1 (16550 UART at port 0x3f8): 115200 8N1 setup, polled output of
//! `probe: ` report lines (serialised across CPUs by a spinlock) and polled
//! input.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::io::{inb, outb};

const COM1: u16 = 0x3f8;
const REG_DATA: u16 = 0;
const REG_IER: u16 = 1;
const REG_FCR: u16 = 2;
const REG_LCR: u16 = 3;
const REG_MCR: u16 = 4;
const REG_LSR: u16 = 5;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
/// Polls of LSR before writing anyway (a missing UART must not hang us).
const TX_POLL_LIMIT: u32 = 100_000;

static LOCK: AtomicBool = AtomicBool::new(false);
/// Bytes written without THRE having come up within [`TX_POLL_LIMIT`].
static TX_STALLS: AtomicU32 = AtomicU32::new(0);

/// Programs COM1 for 115200 baud, 8 data bits, no parity, 1 stop bit.
pub fn init() {
    outb(COM1 + REG_IER, 0x00); // no interrupts
    outb(COM1 + REG_LCR, 0x80); // DLAB on
    outb(COM1 + REG_DATA, 0x01); // divisor 1 = 115200 baud
    outb(COM1 + REG_IER, 0x00);
    outb(COM1 + REG_LCR, 0x03); // 8N1, DLAB off
    outb(COM1 + REG_FCR, 0xc7); // FIFOs on and cleared
    outb(COM1 + REG_MCR, 0x03); // DTR, RTS
}

fn put_byte(byte: u8) {
    let ready = (0..TX_POLL_LIMIT).any(|_| {
        let empty = inb(COM1 + REG_LSR) & LSR_THR_EMPTY != 0;
        core::hint::spin_loop();
        empty
    });
    if !ready {
        TX_STALLS.fetch_add(1, Ordering::Relaxed);
    }
    outb(COM1 + REG_DATA, byte);
}

/// How many bytes went out without THRE (LSR bit 5) coming up in time.
pub fn tx_stalls() -> u32 {
    TX_STALLS.load(Ordering::Relaxed)
}

/// Writes raw bytes (no `probe: ` prefix, no newline), holding the lock.
pub fn write_raw(bytes: &[u8]) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    bytes.iter().copied().for_each(put_byte);
    LOCK.store(false, Ordering::Release);
}

/// Waits until COM1 has received a byte and returns it.
pub fn read_byte() -> u8 {
    while inb(COM1 + REG_LSR) & LSR_DATA_READY == 0 {
        core::hint::spin_loop();
    }
    inb(COM1 + REG_DATA)
}

struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(put_byte);
        Ok(())
    }
}

/// Writes one `probe: <args>` line, holding the serial lock.
pub fn report(args: fmt::Arguments) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    report_unlocked(args);
    LOCK.store(false, Ordering::Release);
}

/// Writes one `probe: <args>` line without the lock (panic path only: the
/// panicking CPU may hold it).
pub fn report_unlocked(args: fmt::Arguments) {
    let _ = Com1.write_fmt(format_args!("probe: {args}\n"));
}

/// Prints one `probe: ` report line (format arguments as for `format!`).
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {
        $crate::serial::report(format_args!($($arg)*))
    };
}

/// Displays bytes as a quoted string: `"` and `\` escaped with a backslash,
/// bytes outside printable ASCII as `\xNN`.
pub struct Quoted<'a>(pub &'a [u8]);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for &b in self.0 {
            match b {
                b'"' | b'\\' => write!(f, "\\{}", b as char)?,
                0x20..=0x7e => f.write_char(b as char)?,
                _ => write!(f, "\\x{b:02x}")?,
            }
        }
        f.write_char('"')
    }
}
