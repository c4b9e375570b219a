//! The ACPI hardware-reduced power-management block: the sleep control,
//! sleep status and reset registers the FADT points at. Entering the soft-off
//! sleep state (S5) becomes [`VmRequest::PowerOff`] and writing the reset
//! value becomes [`VmRequest::Reset`]; other sleep states are not supported
//! and only counted.

use std::sync::Arc;

use super::ByteRegisters;
use crate::{VmControl, VmRequest};

/// Sleep control register (FADT SLEEP_CONTROL_REG).
const SLEEP_CONTROL: u8 = 0;
/// Reset register (FADT RESET_REG).
const RESET: u8 = 2;
/// Sleep control: enter the sleep state in SLP_TYP.
const SLP_EN: u8 = 0x20;
/// Sleep control: SLP_TYP field position and width (bits 2-4).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Sleep control (+0), sleep status (+1, reads 0) and reset (+2) registers.
pub struct AcpiPm {
    vm: Arc<dyn VmControl>,
    s5_sleep_type: u8,
    reset_value: u8,
    ignored_sleep_requests: u64,
}

impl AcpiPm {
    /// A PM block that powers off on SLP_TYP `s5_sleep_type` (the value the
    /// DSDT's `_S5_` package advertises) and resets when `reset_value` is
    /// written to the reset register (the FADT's RESET_VALUE).
    pub fn new(vm: Arc<dyn VmControl>, s5_sleep_type: u8, reset_value: u8) -> Self {
        AcpiPm {
            vm,
            s5_sleep_type: s5_sleep_type & SLP_TYP_MASK,
            reset_value,
            ignored_sleep_requests: 0,
        }
    }

    /// Requests to enter sleep states other than S5 (not supported).
    pub fn ignored_sleep_requests(&self) -> u64 {
        self.ignored_sleep_requests
    }

    fn write_sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self.s5_sleep_type {
            self.vm.request(VmRequest::PowerOff);
        } else {
            self.ignored_sleep_requests = self.ignored_sleep_requests.saturating_add(1);
        }
    }
}

impl ByteRegisters for AcpiPm {
    const WINDOW_LEN: u64 = 3;

    /// Sleep control is write-only, sleep status never reports a wake, and
    /// the reset register is write-only: all read 0.
    fn read_byte(&mut self, _offset: u8) -> u8 {
        0
    }

    fn write_byte(&mut self, offset: u8, value: u8) {
        match offset {
            SLEEP_CONTROL => self.write_sleep_control(value),
            RESET if value == self.reset_value => self.vm.request(VmRequest::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_util::RecordingControl;
    use crate::BusDevice;

    const S5: u8 = 5;
    const RESET_VALUE: u8 = 1;

    fn pm() -> (AcpiPm, Arc<RecordingControl>) {
        let control = Arc::new(RecordingControl::default());
        (AcpiPm::new(control.clone(), S5, RESET_VALUE), control)
    }

    fn sleep_control(sleep_type: u8, enable: bool) -> u8 {
        (sleep_type << SLP_TYP_SHIFT) | if enable { SLP_EN } else { 0 }
    }

    #[test]
    fn entering_s5_powers_off() {
        let (mut pm, control) = pm();
        pm.write(0, &[sleep_control(S5, true)]);
        assert_eq!(control.requests(), [VmRequest::PowerOff]);
    }

    #[test]
    fn sleep_type_without_enable_does_nothing() {
        let (mut pm, control) = pm();
        pm.write(0, &[sleep_control(S5, false)]);
        assert!(control.requests().is_empty());
        assert_eq!(pm.ignored_sleep_requests(), 0);
    }

    #[test]
    fn other_sleep_states_are_counted_not_entered() {
        let (mut pm, control) = pm();
        pm.write(0, &[sleep_control(3, true)]);
        pm.write(0, &[sleep_control(0, true)]);
        assert!(control.requests().is_empty());
        assert_eq!(pm.ignored_sleep_requests(), 2);
    }

    #[test]
    fn reset_value_resets_and_others_do_not() {
        let (mut pm, control) = pm();
        pm.write(2, &[0x06]);
        assert!(control.requests().is_empty());
        pm.write(2, &[RESET_VALUE]);
        assert_eq!(control.requests(), [VmRequest::Reset]);
    }

    #[test]
    fn registers_read_zero_and_the_window_is_three_bytes() {
        let (mut pm, control) = pm();
        let mut data = [0xaau8; 4];
        pm.read(0, &mut data);
        assert_eq!(data, [0, 0, 0, 0xff]);
        pm.write(1, &[sleep_control(S5, true), RESET_VALUE, RESET_VALUE]);
        assert_eq!(control.requests(), [VmRequest::Reset]);
    }
}
