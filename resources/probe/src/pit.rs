//! Whether an i8254 PIT answers on ports 0x40-0x43: the probe programs
//! channel 2 (the speaker channel, wired to no interrupt line, so nothing
//! fires), latches it and reads the count back. A machine without a PIT
//! answers the reads with all-ones, which a 0x8000 count can never give.

use crate::{io, report};

const CHANNEL2: u16 = 0x42;
const MODE_COMMAND: u16 = 0x43;
/// Channel 2, low byte then high byte, mode 2 (rate generator), binary.
const PROGRAM_CHANNEL2: u8 = 0xb4;
/// Counter-latch command for channel 2.
const LATCH_CHANNEL2: u8 = 0x80;
/// The count programmed; a running counter reads at most this.
const COUNT: u16 = 0x8000;

/// Reports `pit present=0|1 ch2=VALUE` (the latched channel-2 count).
pub fn report() {
    io::outb(MODE_COMMAND, PROGRAM_CHANNEL2);
    io::outb(CHANNEL2, COUNT as u8);
    io::outb(CHANNEL2, (COUNT >> 8) as u8);
    io::outb(MODE_COMMAND, LATCH_CHANNEL2);
    let low = io::inb(CHANNEL2);
    let high = io::inb(CHANNEL2);
    let value = u16::from_le_bytes([low, high]);
    let present = value <= COUNT;
    report!("pit present={} ch2={value:#06x}", u8::from(present));
}
