//! The i8042 keyboard controller, reduced to what firmware and Linux touch:
//! the status register, the controller command byte, self tests, the
//! output port and the reset line (command 0xfe), which becomes a
//! [`VmRequest::Reset`]. No keyboard or mouse is attached and no interrupt
//! is raised: bytes sent to the keyboard are answered with a timeout error,
//! and the controller reports no auxiliary (mouse) port, so drivers give up
//! on both quickly instead of waiting for interrupts.
//!
//! The window covers ports 0x60..=0x64: offset 0 is the data port, offset 4
//! the command/status port, offset 1 is port 0x61 (system control port B:
//! speaker gate, refresh and timer-2 output bits), offsets 2 and 3 answer
//! nothing.

use std::sync::Arc;

use super::{ByteRegisters, OPEN_BUS};
use crate::{VmControl, VmRequest};

/// Data port (0x60).
const DATA: u8 = 0;
/// System control port B (0x61).
const PORT_B: u8 = 1;
/// Command (write) and status (read) port (0x64).
const COMMAND: u8 = 4;

/// Status: output buffer full.
const STATUS_OUTPUT_FULL: u8 = 0x01;
/// Status: system flag (mirrors the command byte's flag).
const STATUS_SYSTEM: u8 = 0x04;
/// Status: the last write went to the command port.
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Status: keyboard not inhibited.
const STATUS_UNLOCKED: u8 = 0x10;
/// Status: the output byte comes from the auxiliary port.
const STATUS_AUX_DATA: u8 = 0x20;
/// Status: the device did not answer.
const STATUS_TIMEOUT: u8 = 0x40;

/// Command byte: system flag (POST passed).
const CTR_SYSTEM: u8 = 0x04;
/// Command byte: keyboard port disabled.
const CTR_KBD_DISABLED: u8 = 0x10;
/// Command byte: auxiliary port disabled; always set, there is none.
const CTR_AUX_DISABLED: u8 = 0x20;
/// Command byte at power-on: keyboard interrupt, system flag, scancode
/// translation, no auxiliary port.
const CTR_DEFAULT: u8 = 0x01 | CTR_SYSTEM | CTR_AUX_DISABLED | 0x40;

/// Output port bit 0: the CPU reset line (active low).
const OUTPUT_PORT_RESET_HIGH: u8 = 0x01;
/// Output port at power-on: reset line high, A20 enabled.
const OUTPUT_PORT_DEFAULT: u8 = OUTPUT_PORT_RESET_HIGH | 0x02;

/// Port B bits the guest may set: timer-2 gate, speaker data and the
/// parity/channel check disables.
const PORT_B_WRITABLE: u8 = 0x0f;
/// Port B: memory refresh toggle.
const PORT_B_REFRESH: u8 = 0x10;
/// Port B: PIT channel 2 output.
const PORT_B_TIMER2_OUT: u8 = 0x20;

/// Reply to a byte sent to an absent device.
const NO_DEVICE_REPLY: u8 = 0xfe;
/// Self-test passed.
const SELF_TEST_OK: u8 = 0x55;
/// Interface test passed.
const INTERFACE_TEST_OK: u8 = 0x00;

/// Controller commands written to port 0x64.
mod cmd {
    pub const READ_CTR: u8 = 0x20;
    pub const WRITE_CTR: u8 = 0x60;
    pub const DISABLE_AUX: u8 = 0xa7;
    pub const ENABLE_AUX: u8 = 0xa8;
    pub const TEST_AUX: u8 = 0xa9;
    pub const SELF_TEST: u8 = 0xaa;
    pub const TEST_KBD: u8 = 0xab;
    pub const DISABLE_KBD: u8 = 0xad;
    pub const ENABLE_KBD: u8 = 0xae;
    pub const READ_OUTPUT_PORT: u8 = 0xd0;
    pub const WRITE_OUTPUT_PORT: u8 = 0xd1;
    pub const WRITE_KBD_OUTPUT: u8 = 0xd2;
    pub const WRITE_AUX_OUTPUT: u8 = 0xd3;
    pub const WRITE_AUX: u8 = 0xd4;
    /// 0xf0..=0xff pulse output-port lines low for each clear bit 0-3.
    pub const PULSE_FIRST: u8 = 0xf0;
}

/// Where the next byte written to the data port goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataTarget {
    Keyboard,
    CommandByte,
    OutputPort,
    KeyboardOutput,
    AuxOutput,
    AuxDevice,
}

/// The byte waiting in the output buffer.
#[derive(Clone, Copy, Debug)]
struct OutputByte {
    value: u8,
    aux: bool,
    timeout: bool,
}

/// An i8042 with no devices attached (window of 5 ports, 0x60..=0x64).
pub struct I8042 {
    vm: Arc<dyn VmControl>,
    command_byte: u8,
    output_port: u8,
    output: Option<OutputByte>,
    last_read: u8,
    data_target: DataTarget,
    last_was_command: bool,
    port_b: u8,
    port_b_phase: bool,
}

impl I8042 {
    /// A controller that asks `vm` to reset when the guest pulses the
    /// reset line.
    pub fn new(vm: Arc<dyn VmControl>) -> Self {
        I8042 {
            vm,
            command_byte: CTR_DEFAULT,
            output_port: OUTPUT_PORT_DEFAULT,
            output: None,
            last_read: 0,
            data_target: DataTarget::Keyboard,
            last_was_command: false,
            port_b: 0,
            port_b_phase: false,
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_UNLOCKED;
        if self.command_byte & CTR_SYSTEM != 0 {
            status |= STATUS_SYSTEM;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        if let Some(byte) = self.output {
            status |= STATUS_OUTPUT_FULL;
            if byte.aux {
                status |= STATUS_AUX_DATA;
            }
            if byte.timeout {
                status |= STATUS_TIMEOUT;
            }
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        if let Some(byte) = self.output.take() {
            self.last_read = byte.value;
        }
        self.last_read
    }

    /// Port 0x61: the refresh and timer-2 output bits flip on every read so
    /// that guests polling either edge never spin; NMI status bits read 0.
    fn read_port_b(&mut self) -> u8 {
        self.port_b_phase = !self.port_b_phase;
        let toggling = if self.port_b_phase {
            PORT_B_REFRESH | PORT_B_TIMER2_OUT
        } else {
            0
        };
        (self.port_b & PORT_B_WRITABLE) | toggling
    }

    /// Puts a reply in the output buffer, replacing any unread byte.
    fn reply(&mut self, value: u8) {
        self.output = Some(OutputByte {
            value,
            aux: false,
            timeout: false,
        });
    }

    fn reset(&self) {
        self.vm.request(VmRequest::Reset);
    }

    fn write_command(&mut self, command: u8) {
        self.data_target = DataTarget::Keyboard;
        match command {
            cmd::READ_CTR => self.reply(self.command_byte),
            cmd::WRITE_CTR => self.data_target = DataTarget::CommandByte,
            cmd::DISABLE_AUX | cmd::ENABLE_AUX => {}
            cmd::TEST_AUX | cmd::TEST_KBD => self.reply(INTERFACE_TEST_OK),
            cmd::SELF_TEST => self.reply(SELF_TEST_OK),
            cmd::DISABLE_KBD => self.command_byte |= CTR_KBD_DISABLED,
            cmd::ENABLE_KBD => self.command_byte &= !CTR_KBD_DISABLED,
            cmd::READ_OUTPUT_PORT => self.reply(self.output_port),
            cmd::WRITE_OUTPUT_PORT => self.data_target = DataTarget::OutputPort,
            cmd::WRITE_KBD_OUTPUT => self.data_target = DataTarget::KeyboardOutput,
            cmd::WRITE_AUX_OUTPUT => self.data_target = DataTarget::AuxOutput,
            cmd::WRITE_AUX => self.data_target = DataTarget::AuxDevice,
            cmd::PULSE_FIRST..=u8::MAX if command & OUTPUT_PORT_RESET_HIGH == 0 => self.reset(),
            _ => {}
        }
    }

    fn write_data(&mut self, value: u8) {
        let target = std::mem::replace(&mut self.data_target, DataTarget::Keyboard);
        match target {
            DataTarget::CommandByte => self.command_byte = value | CTR_AUX_DISABLED,
            DataTarget::OutputPort => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_HIGH == 0 {
                    self.reset();
                }
            }
            DataTarget::KeyboardOutput => self.reply(value),
            DataTarget::AuxOutput => {
                self.output = Some(OutputByte {
                    value,
                    aux: true,
                    timeout: false,
                });
            }
            DataTarget::Keyboard | DataTarget::AuxDevice => {
                self.output = Some(OutputByte {
                    value: NO_DEVICE_REPLY,
                    aux: target == DataTarget::AuxDevice,
                    timeout: true,
                });
            }
        }
    }
}

impl ByteRegisters for I8042 {
    const WINDOW_LEN: u64 = 5;

    fn read_byte(&mut self, offset: u8) -> u8 {
        match offset {
            DATA => self.read_data(),
            PORT_B => self.read_port_b(),
            COMMAND => self.status(),
            _ => OPEN_BUS,
        }
    }

    fn write_byte(&mut self, offset: u8, value: u8) {
        match offset {
            DATA => {
                self.last_was_command = false;
                self.write_data(value);
            }
            PORT_B => self.port_b = value & PORT_B_WRITABLE,
            COMMAND => {
                self.last_was_command = true;
                self.write_command(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_util::RecordingControl;
    use crate::BusDevice;

    const DATA_PORT: u64 = 0;
    const PORT_61: u64 = 1;
    const CMD_PORT: u64 = 4;

    fn controller() -> (I8042, Arc<RecordingControl>) {
        let control = Arc::new(RecordingControl::default());
        (I8042::new(control.clone()), control)
    }

    fn inb(dev: &mut I8042, offset: u64) -> u8 {
        let mut data = [0u8];
        dev.read(offset, &mut data);
        data[0]
    }

    /// Sends a controller command the way Linux's `i8042_command` does:
    /// wait for IBF clear, write, then poll OBF (bounded) for the reply.
    fn command(dev: &mut I8042, command: u8, param: Option<u8>) -> Option<u8> {
        assert_eq!(inb(dev, CMD_PORT) & 0x02, 0, "input buffer never full");
        dev.write(CMD_PORT, &[command]);
        if let Some(param) = param {
            dev.write(DATA_PORT, &[param]);
        }
        (inb(dev, CMD_PORT) & STATUS_OUTPUT_FULL != 0).then(|| inb(dev, DATA_PORT))
    }

    #[test]
    fn reset_pulse_requests_reset() {
        let (mut dev, control) = controller();
        dev.write(CMD_PORT, &[0xff]);
        assert!(control.requests().is_empty(), "0xff pulses no line");
        dev.write(CMD_PORT, &[0xfe]);
        assert_eq!(control.requests(), [VmRequest::Reset]);
    }

    #[test]
    fn output_port_reset_line_requests_reset() {
        let (mut dev, control) = controller();
        command(&mut dev, cmd::WRITE_OUTPUT_PORT, Some(0xdf));
        assert!(control.requests().is_empty(), "A20 enable keeps reset high");
        assert_eq!(command(&mut dev, cmd::READ_OUTPUT_PORT, None), Some(0xdf));
        command(&mut dev, cmd::WRITE_OUTPUT_PORT, Some(0xde));
        assert_eq!(control.requests(), [VmRequest::Reset]);
    }

    #[test]
    fn self_and_interface_tests_pass() {
        let (mut dev, _) = controller();
        assert_eq!(command(&mut dev, cmd::SELF_TEST, None), Some(SELF_TEST_OK));
        assert_eq!(command(&mut dev, cmd::TEST_KBD, None), Some(0x00));
        assert_eq!(command(&mut dev, cmd::TEST_AUX, None), Some(0x00));
        assert_eq!(inb(&mut dev, CMD_PORT) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn command_byte_round_trips_without_an_aux_port() {
        let (mut dev, _) = controller();
        assert_eq!(command(&mut dev, cmd::READ_CTR, None), Some(CTR_DEFAULT));
        assert_eq!(command(&mut dev, cmd::WRITE_CTR, Some(0x44)), None);
        assert_eq!(
            command(&mut dev, cmd::READ_CTR, None),
            Some(0x44 | CTR_AUX_DISABLED)
        );

        command(&mut dev, cmd::DISABLE_KBD, None);
        let ctr = command(&mut dev, cmd::READ_CTR, None).unwrap();
        assert_ne!(ctr & CTR_KBD_DISABLED, 0);
        command(&mut dev, cmd::ENABLE_KBD, None);
        let ctr = command(&mut dev, cmd::READ_CTR, None).unwrap();
        assert_eq!(ctr & CTR_KBD_DISABLED, 0);

        // Linux's bit-assignment test: AUXDIS must clear on 0xa8 for an aux
        // port to exist. It does not, so Linux skips its AUX IRQ test.
        command(&mut dev, cmd::ENABLE_AUX, None);
        let ctr = command(&mut dev, cmd::READ_CTR, None).unwrap();
        assert_ne!(ctr & CTR_AUX_DISABLED, 0);
    }

    #[test]
    fn system_flag_follows_the_command_byte() {
        let (mut dev, _) = controller();
        assert_ne!(inb(&mut dev, CMD_PORT) & STATUS_SYSTEM, 0);
        command(&mut dev, cmd::WRITE_CTR, Some(0));
        assert_eq!(inb(&mut dev, CMD_PORT) & STATUS_SYSTEM, 0);
    }

    #[test]
    fn aux_loopback_echoes_as_aux_data() {
        let (mut dev, _) = controller();
        dev.write(CMD_PORT, &[cmd::WRITE_AUX_OUTPUT]);
        dev.write(DATA_PORT, &[0x5a]);
        let status = inb(&mut dev, CMD_PORT);
        assert_eq!(status & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA), 0x21);
        assert_eq!(inb(&mut dev, DATA_PORT), 0x5a);
        assert_eq!(
            command(&mut dev, cmd::WRITE_KBD_OUTPUT, Some(0x1c)),
            Some(0x1c)
        );
    }

    #[test]
    fn bytes_for_absent_devices_time_out() {
        let (mut dev, _) = controller();
        dev.write(DATA_PORT, &[0xff]);
        let status = inb(&mut dev, CMD_PORT);
        assert_eq!(
            status & (STATUS_OUTPUT_FULL | STATUS_TIMEOUT | STATUS_AUX_DATA),
            0x41
        );
        assert_eq!(status & STATUS_LAST_WAS_COMMAND, 0);
        assert_eq!(inb(&mut dev, DATA_PORT), NO_DEVICE_REPLY);

        dev.write(CMD_PORT, &[cmd::WRITE_AUX]);
        dev.write(DATA_PORT, &[0xf4]);
        let status = inb(&mut dev, CMD_PORT);
        assert_eq!(
            status & (STATUS_OUTPUT_FULL | STATUS_TIMEOUT | STATUS_AUX_DATA),
            0x61
        );
    }

    #[test]
    fn a_command_reply_replaces_an_unread_byte() {
        let (mut dev, _) = controller();
        dev.write(DATA_PORT, &[0xf2]);
        assert_eq!(command(&mut dev, cmd::SELF_TEST, None), Some(SELF_TEST_OK));
    }

    #[test]
    fn flushing_terminates_and_stale_reads_repeat() {
        let (mut dev, _) = controller();
        command(&mut dev, cmd::READ_CTR, None);
        dev.write(CMD_PORT, &[cmd::SELF_TEST]);
        let mut flushed = 0;
        while inb(&mut dev, CMD_PORT) & STATUS_OUTPUT_FULL != 0 {
            inb(&mut dev, DATA_PORT);
            flushed += 1;
            assert!(flushed < 16, "output buffer never drains");
        }
        assert_eq!(flushed, 1);
        assert_eq!(inb(&mut dev, DATA_PORT), SELF_TEST_OK);
    }

    #[test]
    fn port_61_toggles_timer2_output_and_keeps_nmi_bits_clear() {
        let (mut dev, _) = controller();
        dev.write(PORT_61, &[0xff]);
        let first = inb(&mut dev, PORT_61);
        let second = inb(&mut dev, PORT_61);
        assert_eq!(first & 0xc0, 0);
        assert_eq!(first & PORT_B_WRITABLE, 0x0f);
        assert_ne!((first ^ second) & PORT_B_TIMER2_OUT, 0);
        assert_eq!((first ^ second) & PORT_B_WRITABLE, 0);
    }

    #[test]
    fn unused_ports_answer_nothing() {
        let (mut dev, control) = controller();
        dev.write(2, &[0xfe]);
        dev.write(3, &[0xfe]);
        assert_eq!(inb(&mut dev, 2), 0xff);
        assert_eq!(inb(&mut dev, 3), 0xff);
        let mut wide = [0u8; 4];
        dev.read(CMD_PORT, &mut wide);
        assert_eq!(wide[1..], [0xff; 3]);
        assert!(control.requests().is_empty());
    }
}
