//! CMOS RAM and the MC146818 real-time clock behind ports 0x70/0x71: 128
//! bytes of RAM holding the firmware memory-size bytes, and clock registers
//! that read the host's UTC wall clock (through [`WallClock`], so tests can
//! fix the time), in BCD or binary and 12- or 24-hour mode as register B
//! says. No RTC interrupt is raised.
//!
//! Guest writes to the time registers set the guest's clock: they are kept
//! as an offset from the host clock. While register B's SET bit is up the
//! time registers are frozen and plain RAM; clearing SET commits them. A
//! direct write without SET commits at once. A commit of an impossible time
//! (bad BCD digit, month 13, ...) is ignored and the old offset kept.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::ByteRegisters;

/// Index port (0x70); bit 7 of the index is the NMI mask, not an address.
const INDEX: u8 = 0;
/// Data port (0x71).
const DATA: u8 = 1;
/// Index bits that address CMOS RAM.
const INDEX_MASK: u8 = 0x7f;
/// Bytes of CMOS RAM.
const RAM_LEN: usize = 128;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// Register A: update in progress.
const A_UPDATE_IN_PROGRESS: u8 = 0x80;
/// Register A at power-on: 32.768 kHz time base, 1024 Hz periodic rate.
const A_DEFAULT: u8 = 0x26;
/// Register B: updates halted while the guest sets the time.
const B_SET: u8 = 0x80;
/// Register B: binary (not BCD) data mode.
const B_BINARY: u8 = 0x04;
/// Register B: 24-hour mode.
const B_24_HOUR: u8 = 0x02;
/// Register B at power-on: BCD, 24-hour.
const B_DEFAULT: u8 = B_24_HOUR;
/// Register D: the RAM and time are valid (battery good).
const D_VALID_RAM: u8 = 0x80;
/// 12-hour mode: PM flag in the hours register.
const HOUR_PM: u8 = 0x80;
/// The clock reports an update in progress during this window before
/// each second boundary, as the MC146818 does.
const UPDATE_WINDOW_NANOS: u32 = 244_000;

/// Base memory (below 640 KiB) in KiB, little-endian.
const BASE_MEMORY_KIB: u8 = 0x15;
/// Extended memory (above 1 MiB) in KiB, as set by POST.
const EXTENDED_MEMORY_KIB: u8 = 0x17;
/// Extended memory (above 1 MiB) in KiB, as found by the BIOS.
const EXTENDED_MEMORY_KIB_2: u8 = 0x30;
/// Memory between 16 MiB and the 32-bit hole, in 64 KiB units.
const MEMORY_ABOVE_16M: u8 = 0x34;
/// Memory above 4 GiB, in 64 KiB units (3 bytes).
const MEMORY_ABOVE_4G: u8 = 0x5b;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const UNIT_64K: u64 = 64 * KIB;
const SECONDS_PER_DAY: i64 = 86_400;

/// A source of wall-clock time.
pub trait WallClock: Send {
    /// Time elapsed since the Unix epoch (UTC).
    fn now(&self) -> Duration;
}

/// The host's real-time clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> Duration {
        // A host clock set before 1970 reads as the epoch.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let (year, month, day) = civil_from_days(secs.div_euclid(SECONDS_PER_DAY));
        let of_day = secs.rem_euclid(SECONDS_PER_DAY);
        DateTime {
            year,
            month,
            day,
            hour: clamp_u8(of_day / 3600),
            minute: clamp_u8(of_day / 60 % 60),
            second: clamp_u8(of_day % 60),
        }
    }

    fn to_unix(self) -> i64 {
        let days = days_from_civil(self.year, self.month, self.day);
        days * SECONDS_PER_DAY
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// Day of the week, 1 = Sunday.
    fn weekday(self) -> u8 {
        // 1970-01-01 was a Thursday (day 4 counting from Sunday = 0).
        let days = days_from_civil(self.year, self.month, self.day);
        clamp_u8((days + 4).rem_euclid(7) + 1)
    }
}

fn clamp_u8(value: i64) -> u8 {
    u8::try_from(value).unwrap_or(u8::MAX)
}

/// (year, month 1-12, day 1-31) of a day counted from 1970-01-01, in the
/// proleptic Gregorian calendar; eras of 400 years starting on March 1st
/// make leap days fall at the end of each year.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let shifted = days + 719_468; // days since 0000-03-01
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + i64::from(month <= 2);
    (year, clamp_u8(month), clamp_u8(day))
}

/// Days from 1970-01-01 to the given date; out-of-range days roll over.
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let month_from_march = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Register encoding of clock values, per register B.
#[derive(Clone, Copy)]
struct Format {
    binary: bool,
    hour_24: bool,
}

impl Format {
    fn from_reg_b(reg_b: u8) -> Self {
        Format {
            binary: reg_b & B_BINARY != 0,
            hour_24: reg_b & B_24_HOUR != 0,
        }
    }

    fn encode(self, value: u8) -> u8 {
        if self.binary {
            value
        } else {
            ((value / 10 % 10) << 4) | (value % 10)
        }
    }

    fn decode(self, raw: u8) -> Option<u8> {
        if self.binary {
            return Some(raw);
        }
        let (tens, ones) = (raw >> 4, raw & 0x0f);
        (tens <= 9 && ones <= 9).then_some(tens * 10 + ones)
    }

    fn encode_hour(self, hour: u8) -> u8 {
        if self.hour_24 {
            return self.encode(hour);
        }
        let on_dial = match hour % 12 {
            0 => 12,
            h => h,
        };
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        self.encode(on_dial) | pm
    }

    fn decode_hour(self, raw: u8) -> Option<u8> {
        if self.hour_24 {
            return self.decode(raw);
        }
        let on_dial = self.decode(raw & !HOUR_PM)?;
        if !(1..=12).contains(&on_dial) {
            return None;
        }
        let pm = if raw & HOUR_PM != 0 { 12 } else { 0 };
        Some(on_dial % 12 + pm)
    }
}

/// CMOS RAM and RTC (window of 2 ports: index, data).
pub struct Cmos {
    index: u8,
    ram: [u8; RAM_LEN],
    clock: Box<dyn WallClock>,
    /// Guest time minus host time, in seconds.
    offset_secs: i64,
}

impl Cmos {
    /// CMOS for a guest with `low_ram_bytes` of RAM below the 32-bit hole
    /// (counted from address 0) and `high_ram_bytes` above 4 GiB, reading
    /// the host's clock.
    pub fn new(low_ram_bytes: u64, high_ram_bytes: u64) -> Self {
        Self::with_clock(low_ram_bytes, high_ram_bytes, Box::new(SystemClock))
    }

    /// Like [`Cmos::new`], reading time from `clock`.
    pub fn with_clock(low_ram_bytes: u64, high_ram_bytes: u64, clock: Box<dyn WallClock>) -> Self {
        let mut cmos = Cmos {
            index: 0,
            ram: [0; RAM_LEN],
            clock,
            offset_secs: 0,
        };
        cmos.ram[usize::from(REG_A)] = A_DEFAULT;
        cmos.ram[usize::from(REG_B)] = B_DEFAULT;
        cmos.set_memory_sizes(low_ram_bytes, high_ram_bytes);
        cmos
    }

    fn set_memory_sizes(&mut self, low_ram_bytes: u64, high_ram_bytes: u64) {
        let extended_kib = low_ram_bytes.saturating_sub(MIB) / KIB;
        let above_16m = low_ram_bytes.saturating_sub(16 * MIB) / UNIT_64K;
        let above_4g = high_ram_bytes / UNIT_64K;
        self.put_le(BASE_MEMORY_KIB, 640, 2);
        self.put_le(EXTENDED_MEMORY_KIB, extended_kib.min(0xffff), 2);
        self.put_le(EXTENDED_MEMORY_KIB_2, extended_kib.min(0xffff), 2);
        self.put_le(MEMORY_ABOVE_16M, above_16m.min(0xffff), 2);
        self.put_le(MEMORY_ABOVE_4G, above_4g.min(0xff_ffff), 3);
    }

    /// Stores the low `len` bytes of `value` little-endian at `at`.
    fn put_le(&mut self, at: u8, value: u64, len: usize) {
        let start = usize::from(at);
        let bytes = value.to_le_bytes();
        self.ram[start..start + len].copy_from_slice(&bytes[..len]);
    }

    fn reg(&self, at: u8) -> u8 {
        self.ram[usize::from(at & INDEX_MASK)]
    }

    fn set_reg(&mut self, at: u8, value: u8) {
        self.ram[usize::from(at & INDEX_MASK)] = value;
    }

    fn format(&self) -> Format {
        Format::from_reg_b(self.reg(REG_B))
    }

    fn frozen(&self) -> bool {
        self.reg(REG_B) & B_SET != 0
    }

    fn guest_now(&self) -> DateTime {
        let host = i64::try_from(self.clock.now().as_secs()).unwrap_or(i64::MAX);
        DateTime::from_unix(host.saturating_add(self.offset_secs))
    }

    /// The time registers' values right now, in the current format.
    fn encoded_time(&self, at: u8) -> u8 {
        let now = self.guest_now();
        let format = self.format();
        match at {
            SECONDS => format.encode(now.second),
            MINUTES => format.encode(now.minute),
            HOURS => format.encode_hour(now.hour),
            WEEKDAY => format.encode(now.weekday()),
            DAY => format.encode(now.day),
            MONTH => format.encode(now.month),
            YEAR => format.encode(clamp_u8(now.year.rem_euclid(100))),
            _ => format.encode(clamp_u8(now.year.div_euclid(100).rem_euclid(100))),
        }
    }

    /// Copies the running time into the time registers.
    fn snapshot_time(&mut self) {
        for at in [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY] {
            let value = self.encoded_time(at);
            self.set_reg(at, value);
        }
    }

    /// Makes the time registers the guest's running time, if they are valid.
    fn commit_time(&mut self) {
        let Some(time) = self.time_in_registers() else {
            return;
        };
        let host = i64::try_from(self.clock.now().as_secs()).unwrap_or(i64::MAX);
        self.offset_secs = time.to_unix().saturating_sub(host);
    }

    fn time_in_registers(&self) -> Option<DateTime> {
        let format = self.format();
        let time = DateTime {
            year: i64::from(format.decode(self.reg(CENTURY))?) * 100
                + i64::from(format.decode(self.reg(YEAR))?),
            month: format.decode(self.reg(MONTH))?,
            day: format.decode(self.reg(DAY))?,
            hour: format.decode_hour(self.reg(HOURS))?,
            minute: format.decode(self.reg(MINUTES))?,
            second: format.decode(self.reg(SECONDS))?,
        };
        let valid = (1..=12).contains(&time.month)
            && (1..=31).contains(&time.day)
            && time.hour < 24
            && time.minute < 60
            && time.second < 60
            && time.year < 10_000;
        valid.then_some(time)
    }

    fn update_in_progress(&self) -> bool {
        self.clock.now().subsec_nanos() >= 1_000_000_000 - UPDATE_WINDOW_NANOS
    }

    fn read_data(&self) -> u8 {
        match self.index {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY
                if !self.frozen() =>
            {
                self.encoded_time(self.index)
            }
            REG_A if !self.frozen() && self.update_in_progress() => {
                self.reg(REG_A) | A_UPDATE_IN_PROGRESS
            }
            REG_C => 0,
            REG_D => D_VALID_RAM,
            at => self.reg(at),
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.index {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {
                if self.frozen() {
                    self.set_reg(self.index, value);
                } else {
                    self.snapshot_time();
                    self.set_reg(self.index, value);
                    self.commit_time();
                }
            }
            REG_A => self.set_reg(REG_A, value & !A_UPDATE_IN_PROGRESS),
            REG_B => self.write_reg_b(value),
            REG_C | REG_D => {}
            at => self.set_reg(at, value),
        }
    }

    fn write_reg_b(&mut self, value: u8) {
        let was_frozen = self.frozen();
        let freezing = value & B_SET != 0;
        if freezing && !was_frozen {
            self.snapshot_time();
        }
        self.set_reg(REG_B, value);
        if was_frozen && !freezing {
            self.commit_time();
        }
    }
}

impl ByteRegisters for Cmos {
    const WINDOW_LEN: u64 = 2;

    fn read_byte(&mut self, offset: u8) -> u8 {
        match offset {
            DATA => self.read_data(),
            // The index port is write-only; reads see the last index.
            _ => self.index,
        }
    }

    fn write_byte(&mut self, offset: u8, value: u8) {
        match offset {
            INDEX => self.index = value & INDEX_MASK,
            _ => self.write_data(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::BusDevice;

    /// 2024-02-29 13:45:07 UTC, a Thursday.
    const LEAP_DAY: u64 = 1_709_214_307;

    /// A clock the test sets by hand.
    #[derive(Clone)]
    struct FixedClock(Arc<Mutex<Duration>>);

    impl FixedClock {
        fn at(secs: u64) -> Self {
            FixedClock(Arc::new(Mutex::new(Duration::from_secs(secs))))
        }
        fn set(&self, time: Duration) {
            *self.0.lock().unwrap() = time;
        }
    }

    impl WallClock for FixedClock {
        fn now(&self) -> Duration {
            *self.0.lock().unwrap()
        }
    }

    fn cmos_at(secs: u64) -> (Cmos, FixedClock) {
        let clock = FixedClock::at(secs);
        (Cmos::with_clock(0, 0, Box::new(clock.clone())), clock)
    }

    fn read(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index]);
        let mut data = [0u8];
        cmos.read(1, &mut data);
        data[0]
    }

    fn write(cmos: &mut Cmos, index: u8, value: u8) {
        cmos.write(0, &[index]);
        cmos.write(1, &[value]);
    }

    fn time_regs(cmos: &mut Cmos) -> [u8; 8] {
        [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY].map(|at| read(cmos, at))
    }

    #[test]
    fn time_reads_in_bcd_24_hour_by_default() {
        let (mut cmos, _) = cmos_at(LEAP_DAY);
        assert_eq!(
            time_regs(&mut cmos),
            [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
    }

    #[test]
    fn time_reads_in_binary_mode() {
        let (mut cmos, _) = cmos_at(LEAP_DAY);
        write(&mut cmos, REG_B, B_24_HOUR | B_BINARY);
        assert_eq!(time_regs(&mut cmos), [7, 45, 13, 5, 29, 2, 24, 20]);
    }

    #[test]
    fn twelve_hour_mode_flags_pm_and_shows_midnight_as_12() {
        let (mut cmos, clock) = cmos_at(LEAP_DAY);
        write(&mut cmos, REG_B, 0);
        assert_eq!(read(&mut cmos, HOURS), HOUR_PM | 0x01);
        clock.set(Duration::from_secs(946_684_800)); // 2000-01-01 00:00:00
        assert_eq!(read(&mut cmos, HOURS), 0x12);
        assert_eq!(read(&mut cmos, WEEKDAY), 7, "a Saturday");
    }

    #[test]
    fn nmi_mask_bit_is_not_part_of_the_index() {
        let (mut cmos, _) = cmos_at(LEAP_DAY);
        assert_eq!(read(&mut cmos, 0x80 | MINUTES), 0x45);
        write(&mut cmos, 0x80 | 0x40, 0xaa);
        assert_eq!(read(&mut cmos, 0x40), 0xaa);
    }

    #[test]
    fn status_registers() {
        let (mut cmos, clock) = cmos_at(LEAP_DAY);
        assert_eq!(read(&mut cmos, REG_A), A_DEFAULT);
        assert_eq!(read(&mut cmos, REG_B), B_DEFAULT);
        assert_eq!(read(&mut cmos, REG_C), 0);
        assert_eq!(read(&mut cmos, REG_D), D_VALID_RAM);
        write(&mut cmos, REG_D, 0);
        assert_eq!(read(&mut cmos, REG_D), D_VALID_RAM);

        clock.set(Duration::new(LEAP_DAY, 999_900_000));
        assert_eq!(read(&mut cmos, REG_A), A_DEFAULT | A_UPDATE_IN_PROGRESS);
        clock.set(Duration::new(LEAP_DAY + 1, 0));
        assert_eq!(read(&mut cmos, REG_A), A_DEFAULT, "the update ends");
    }

    #[test]
    fn setting_the_time_with_set_bit_keeps_an_offset() {
        let (mut cmos, clock) = cmos_at(LEAP_DAY);
        // Linux's order: year and month first, from Feb 29 to Jan 31.
        write(&mut cmos, REG_B, B_DEFAULT | B_SET);
        clock.set(Duration::from_secs(LEAP_DAY + 30));
        assert_eq!(read(&mut cmos, SECONDS), 0x07, "frozen while SET");
        for (at, value) in [(YEAR, 0x23), (MONTH, 0x01), (DAY, 0x31), (HOURS, 0x08)] {
            write(&mut cmos, at, value);
        }
        write(&mut cmos, MINUTES, 0x00);
        write(&mut cmos, SECONDS, 0x00);
        write(&mut cmos, REG_B, B_DEFAULT);
        assert_eq!(
            time_regs(&mut cmos),
            [0x00, 0x00, 0x08, 0x03, 0x31, 0x01, 0x23, 0x20]
        );
        clock.set(Duration::from_secs(LEAP_DAY + 30 + 61));
        assert_eq!(&time_regs(&mut cmos)[..3], [0x01, 0x01, 0x08]);
    }

    #[test]
    fn a_direct_time_write_applies_at_once() {
        let (mut cmos, _) = cmos_at(LEAP_DAY);
        write(&mut cmos, MINUTES, 0x05);
        assert_eq!(&time_regs(&mut cmos)[..3], [0x07, 0x05, 0x13]);
    }

    #[test]
    fn impossible_times_are_ignored() {
        let (mut cmos, _) = cmos_at(LEAP_DAY);
        write(&mut cmos, MINUTES, 0x7a);
        write(&mut cmos, MONTH, 0x13);
        write(&mut cmos, HOURS, 0x24);
        assert_eq!(
            time_regs(&mut cmos),
            [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
    }

    #[test]
    fn memory_size_bytes_for_a_small_guest() {
        let clock = FixedClock::at(0);
        let mut cmos = Cmos::with_clock(512 * MIB, 0, Box::new(clock));
        assert_eq!([read(&mut cmos, 0x15), read(&mut cmos, 0x16)], [0x80, 0x02]);
        // 511 MiB above 1 MiB = 523264 KiB, capped at 0xffff.
        assert_eq!([read(&mut cmos, 0x30), read(&mut cmos, 0x31)], [0xff, 0xff]);
        assert_eq!([read(&mut cmos, 0x17), read(&mut cmos, 0x18)], [0xff, 0xff]);
        // (512 - 16) MiB / 64 KiB = 7936 = 0x1f00.
        assert_eq!([read(&mut cmos, 0x34), read(&mut cmos, 0x35)], [0x00, 0x1f]);
        assert_eq!([0x5b, 0x5c, 0x5d].map(|at| read(&mut cmos, at)), [0, 0, 0]);
    }

    #[test]
    fn memory_size_bytes_for_a_split_guest() {
        let clock = FixedClock::at(0);
        let mut cmos = Cmos::with_clock(3 << 30, 5 << 30, Box::new(clock));
        // (3 GiB - 16 MiB) / 64 KiB = 48896 = 0xbf00.
        assert_eq!([read(&mut cmos, 0x34), read(&mut cmos, 0x35)], [0x00, 0xbf]);
        // 5 GiB / 64 KiB = 81920 = 0x01_4000.
        assert_eq!(
            [0x5b, 0x5c, 0x5d].map(|at| read(&mut cmos, at)),
            [0x00, 0x40, 0x01]
        );
        let tiny = Cmos::with_clock(8 * MIB, 0, Box::new(FixedClock::at(0)));
        assert_eq!(tiny.reg(0x30), 0x00);
        assert_eq!(tiny.reg(0x31), 0x1c, "7 MiB = 7168 KiB = 0x1c00");
        assert_eq!(tiny.reg(0x34), 0);
    }

    #[test]
    fn calendar_conversions_round_trip() {
        for days in (-800_000..800_000).step_by(7) {
            let (year, month, day) = civil_from_days(days);
            assert!((1..=12).contains(&month) && (1..=31).contains(&day));
            assert_eq!(
                days_from_civil(year, month, day),
                days,
                "{year}-{month}-{day}"
            );
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(
            DateTime::from_unix(4_102_444_799),
            DateTime {
                year: 2099,
                month: 12,
                day: 31,
                hour: 23,
                minute: 59,
                second: 59
            }
        );
    }

    #[test]
    fn index_port_and_wide_accesses() {
        let (mut cmos, _) = cmos_at(LEAP_DAY);
        cmos.write(0, &[MINUTES, 0xff]);
        assert_eq!(read(&mut cmos, MINUTES), 0x45, "0xff is no BCD minute");
        let mut wide = [0u8; 4];
        cmos.write(0, &[0x40]);
        cmos.read(0, &mut wide);
        assert_eq!(wide, [0x40, 0x00, 0xff, 0xff]);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now().as_secs() > 1_577_836_800);
    }
}
