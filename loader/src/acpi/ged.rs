//! The hardware-reduced ACPI power button: a Generic Event Device
//! (`GED0`, `_HID "ACPI0013"`) whose `_CRS` names its interrupt and whose
//! `_EVT` method reads the one-byte event register and, when the power
//! button bit is set, does `Notify (\_SB.PWRB, 0x80)`; and the power button
//! itself (`PWRB`, `PNP0C0C`), which Linux's ACPI button driver turns into
//! a KEY_POWER press.

use acpi_tables::aml::{
    And, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If,
    Interrupt, Local, Method, Name, Notify, OpRegion, OpRegionSpace, Path, ResourceTemplate, Store,
};

use super::{aml_bytes, AcpiError};
use crate::layout;

/// Event-register bit of a power-button press.
pub(super) const EVENT_POWER_BUTTON: u8 = 1;
/// Notify value for "button pressed" (ACPI 6.x, 4.8.2.2.1.3).
const NOTIFY_PRESSED: u8 = 0x80;

/// `GED0` and `PWRB`, for a GED with its event register at `event_port`
/// and an edge-triggered, active-high interrupt on `gsi`.
pub(super) fn power_button(event_port: u16, gsi: u32) -> Result<Vec<u8>, AcpiError> {
    if gsi >= layout::IOAPIC_NUM_PINS {
        return Err(AcpiError::Irq {
            kind: "generic event device",
            irq: gsi,
            max: layout::IOAPIC_NUM_PINS - 1,
        });
    }
    let mut bytes = ged(event_port, gsi);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
    let uid = Name::new("_UID".into(), &0u8);
    bytes.extend(aml_bytes(&Device::new("PWRB".into(), vec![&hid, &uid])));
    Ok(bytes)
}

fn ged(event_port: u16, gsi: u32) -> Vec<u8> {
    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &0u8);
    let interrupt = Interrupt::new(true, true, false, false, gsi);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&interrupt]));
    let port = u64::from(event_port);
    let region = OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &port, &1u8);
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 8)],
    );
    let register = Path::new("GDAT");
    let read = Store::new(&Local(0), &register);
    let masked = And::new(&Local(1), &Local(0), &EVENT_POWER_BUTTON);
    let button = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&button, &NOTIFY_PRESSED);
    let on_button = If::new(&masked, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&read, &on_button]);
    aml_bytes(&Device::new(
        "GED0".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn declares_ged_with_its_interrupt_register_and_button() {
        let aml = power_button(layout::GED_EVENT_PORT, layout::GED_GSI).unwrap();
        assert!(find(&aml, b"GED0"));
        assert!(find(&aml, b"ACPI0013\0"));
        assert!(find(&aml, b"_EVT"));
        assert!(find(&aml, b"PWRB"));
        // PNP0C0C as an EISA ID.
        assert!(find(&aml, &[0x41, 0xd0, 0x0c, 0x0c]));
        // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { GSI }
        let mut irq = vec![0x89, 6, 0, 0x03, 1];
        irq.extend_from_slice(&layout::GED_GSI.to_le_bytes());
        assert!(find(&aml, &irq));
        // OperationRegion (GDST, SystemIO, port, 1)
        let [lo, hi] = layout::GED_EVENT_PORT.to_le_bytes();
        assert!(find(
            &aml,
            &[b'G', b'D', b'S', b'T', 0x01, 0x0b, lo, hi, 0x01]
        ));
    }

    #[test]
    fn a_gsi_outside_the_ioapic_is_refused() {
        let err = power_button(layout::GED_EVENT_PORT, 24).unwrap_err();
        assert_eq!(
            err.to_string(),
            "generic event device irq 24 is not an ioapic input (0-23)"
        );
    }
}
