//! A user-space I/O APIC (82093AA register set, version 0x11, 24 inputs)
//! for KVM's split irqchip, where only the local APICs are in the kernel.
//!
//! The guest programs a redirection entry per input; this model turns
//! every unmasked entry into the MSI message the entry describes and hands
//! it to an [`MsiRouter`] (pin `n` → route `n`), which the VMM installs as
//! the KVM route of GSI `n`. Devices raise their line by writing the irqfd
//! on that GSI, so an interrupt never passes through this model: it only
//! runs when the guest reprograms an entry.
//!
//! Registers (memory-mapped, 32-bit accesses): `IOREGSEL` at 0x00 selects,
//! `IOWIN` at 0x10 reads or writes the selected register — 0x00 ID, 0x01
//! version (max redirection entry 23 in bits 16-23), 0x02 arbitration ID,
//! 0x10 + 2n / 0x11 + 2n the low / high half of entry n.
//!
//! Every input is treated as edge-triggered: the platform's interrupt
//! sources (COM1, the GED power button) are edge-triggered ISA-style
//! lines, and PCI functions use MSI-X. An entry programmed level-triggered
//! is delivered the same way, with its trigger bit in the message, and
//! never holds Remote IRR; the local APIC's EOI of it needs nothing here.

use std::sync::Arc;

use crate::pci::{MsiMessage, MsiRouter};
use crate::BusDevice;

/// Number of inputs.
pub const IOAPIC_PINS: usize = 24;
/// Bytes of the register window the VMM maps.
pub const IOAPIC_WINDOW: u64 = 0x20;
/// Version register value: version 0x11, max redirection entry 23.
const VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION: u8 = 0x10;
/// Redirection entry bits.
const VECTOR_MASK: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_MODE_MASK: u64 = 0x7 << DELIVERY_MODE_SHIFT;
const DEST_MODE_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const POLARITY_LOW: u64 = 1 << 13;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const DESTINATION_SHIFT: u32 = 56;
/// Bits the guest can write (the rest read as zero or are status bits).
const WRITABLE: u64 = VECTOR_MASK
    | DELIVERY_MODE_MASK
    | DEST_MODE_LOGICAL
    | POLARITY_LOW
    | TRIGGER_LEVEL
    | MASKED
    | (0xff << DESTINATION_SHIFT);
/// Delivery mode "lowest priority" (asks for the redirection hint).
const LOWEST_PRIORITY: u64 = 1;
/// MSI address base and fields.
const MSI_BASE: u64 = 0xfee0_0000;
const MSI_DEST_SHIFT: u32 = 12;
const MSI_REDIRECTION_HINT: u64 = 1 << 3;
const MSI_DEST_MODE_LOGICAL: u64 = 1 << 2;
const MSI_TRIGGER_LEVEL: u32 = 1 << 15;
const MSI_LEVEL_ASSERT: u32 = 1 << 14;

/// Counters for `vm.counters`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoApicCounters {
    /// Redirection entries (re)programmed.
    pub entry_writes: u64,
    /// Routes the router refused.
    pub route_failures: u64,
    /// Accesses that were not 32-bit at a register offset.
    pub ignored_accesses: u64,
}

/// The I/O APIC.
pub struct IoApic {
    select: u8,
    id: u32,
    entries: [u64; IOAPIC_PINS],
    routed: [Option<MsiMessage>; IOAPIC_PINS],
    router: Arc<dyn MsiRouter>,
    counters: IoApicCounters,
}

impl IoApic {
    /// An I/O APIC after reset (every entry masked) routing through
    /// `router`.
    pub fn new(router: Arc<dyn MsiRouter>) -> Self {
        Self {
            select: 0,
            id: 0,
            entries: [MASKED; IOAPIC_PINS],
            routed: [None; IOAPIC_PINS],
            router,
            counters: IoApicCounters::default(),
        }
    }

    /// The counters.
    pub fn counters(&self) -> IoApicCounters {
        self.counters
    }

    /// The redirection entry of `pin`.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.entries.get(pin).copied()
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => self.id,
            REG_VERSION => VERSION,
            reg => match redirection(reg) {
                Some((pin, high)) => half(self.entries[pin], high),
                None => 0,
            },
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = value & (0xf << 24),
            reg => {
                let Some((pin, high)) = redirection(reg) else {
                    return;
                };
                let old = self.entries[pin];
                let new = if high {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                } else {
                    (old & !0xffff_ffff) | u64::from(value)
                };
                self.entries[pin] = (new & WRITABLE) | (old & (DELIVERY_STATUS | REMOTE_IRR));
                self.counters.entry_writes += 1;
                self.update_route(pin);
            }
        }
    }

    fn update_route(&mut self, pin: usize) {
        let message = message(self.entries[pin]);
        if message == self.routed[pin] {
            return;
        }
        match self.router.route(pin as u16, message) {
            Ok(()) => self.routed[pin] = message,
            Err(_) => self.counters.route_failures += 1,
        }
    }
}

/// `(pin, high half)` of a redirection register index.
fn redirection(reg: u8) -> Option<(usize, bool)> {
    let index = usize::from(reg.checked_sub(REG_REDIRECTION)?);
    let pin = index / 2;
    (pin < IOAPIC_PINS).then_some((pin, index % 2 == 1))
}

fn half(entry: u64, high: bool) -> u32 {
    if high {
        (entry >> 32) as u32
    } else {
        entry as u32
    }
}

/// The MSI message an entry stands for; `None` when masked.
pub fn message(entry: u64) -> Option<MsiMessage> {
    if entry & MASKED != 0 {
        return None;
    }
    let delivery_mode = (entry & DELIVERY_MODE_MASK) >> DELIVERY_MODE_SHIFT;
    let destination = (entry >> DESTINATION_SHIFT) & 0xff;
    let mut address = MSI_BASE | (destination << MSI_DEST_SHIFT);
    if entry & DEST_MODE_LOGICAL != 0 {
        address |= MSI_DEST_MODE_LOGICAL;
    }
    if delivery_mode == LOWEST_PRIORITY {
        address |= MSI_REDIRECTION_HINT;
    }
    let mut data = (entry & VECTOR_MASK) as u32 | ((delivery_mode as u32) << DELIVERY_MODE_SHIFT);
    if entry & TRIGGER_LEVEL != 0 {
        data |= MSI_TRIGGER_LEVEL | MSI_LEVEL_ASSERT;
    }
    Some(MsiMessage { address, data })
}

impl BusDevice for IoApic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOREGSEL, 4) => u32::from(self.select),
            (IOWIN, 4) => self.read_register(),
            _ => {
                self.counters.ignored_accesses += 1;
                data.fill(0);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.counters.ignored_accesses += 1;
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value as u8,
            IOWIN => self.write_register(value),
            _ => self.counters.ignored_accesses += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Routes(Mutex<Vec<(u16, Option<MsiMessage>)>>);

    impl MsiRouter for Routes {
        fn route(&self, vector: u16, message: Option<MsiMessage>) -> std::io::Result<()> {
            self.0.lock().unwrap().push((vector, message));
            Ok(())
        }

        fn signal(&self, _vector: u16) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn ioapic() -> (IoApic, Arc<Routes>) {
        let routes = Arc::new(Routes::default());
        (IoApic::new(routes.clone()), routes)
    }

    fn write_reg(ioapic: &mut IoApic, reg: u8, value: u32) {
        ioapic.write(IOREGSEL, &u32::from(reg).to_le_bytes());
        ioapic.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(ioapic: &mut IoApic, reg: u8) -> u32 {
        ioapic.write(IOREGSEL, &u32::from(reg).to_le_bytes());
        let mut data = [0; 4];
        ioapic.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn version_names_24_inputs_and_entries_start_masked() {
        let (mut ioapic, routes) = ioapic();
        assert_eq!(read_reg(&mut ioapic, REG_VERSION), 0x0017_0011);
        for pin in 0..IOAPIC_PINS as u8 {
            assert_eq!(read_reg(&mut ioapic, REG_REDIRECTION + 2 * pin), 1 << 16);
        }
        assert!(routes.0.lock().unwrap().is_empty());
    }

    #[test]
    fn an_unmasked_entry_becomes_its_msi_route() {
        let (mut ioapic, routes) = ioapic();
        // COM1 as Linux programs it: vector 0x24, fixed, physical, edge,
        // destination APIC 1; high half first, then unmask with the low.
        write_reg(&mut ioapic, REG_REDIRECTION + 9, 0x0100_0000);
        write_reg(&mut ioapic, REG_REDIRECTION + 8, 0x24);
        let last = *routes.0.lock().unwrap().last().unwrap();
        assert_eq!(
            last,
            (
                4,
                Some(MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x24
                })
            )
        );
        assert_eq!(read_reg(&mut ioapic, REG_REDIRECTION + 8), 0x24);
        assert_eq!(read_reg(&mut ioapic, REG_REDIRECTION + 9), 0x0100_0000);
        // Masking removes the route.
        write_reg(&mut ioapic, REG_REDIRECTION + 8, 0x1_0024);
        assert_eq!(*routes.0.lock().unwrap().last().unwrap(), (4, None));
    }

    #[test]
    fn logical_lowest_priority_and_level_entries_set_their_msi_bits() {
        let entry = 0x31 | (1 << 8) | DEST_MODE_LOGICAL | TRIGGER_LEVEL | (0x3 << 56);
        let msi = message(entry).unwrap();
        assert_eq!(msi.address, 0xfee0_3000 | 0x8 | 0x4);
        assert_eq!(msi.data, 0x31 | (1 << 8) | (1 << 15) | (1 << 14));
        assert_eq!(message(entry | MASKED), None);
    }

    #[test]
    fn status_bits_are_read_only_and_bad_accesses_are_ignored() {
        let (mut ioapic, routes) = ioapic();
        write_reg(&mut ioapic, REG_REDIRECTION, 0xffff_ffff);
        let low = read_reg(&mut ioapic, REG_REDIRECTION);
        assert_eq!(low & (DELIVERY_STATUS | REMOTE_IRR) as u32, 0);
        let writes = routes.0.lock().unwrap().len();
        // Registers past entry 23, a byte access and an unknown offset.
        write_reg(&mut ioapic, REG_REDIRECTION + 48, 0);
        ioapic.write(IOWIN, &[0]);
        ioapic.write(0x08, &0u32.to_le_bytes());
        let mut byte = [0xaa];
        ioapic.read(IOWIN, &mut byte);
        assert_eq!(byte, [0]);
        assert_eq!(read_reg(&mut ioapic, REG_REDIRECTION + 48), 0);
        assert_eq!(routes.0.lock().unwrap().len(), writes);
        assert_eq!(ioapic.counters().ignored_accesses, 3);
    }

    #[test]
    fn rewriting_the_same_entry_does_not_reroute() {
        let (mut ioapic, routes) = ioapic();
        write_reg(&mut ioapic, REG_REDIRECTION + 10, 0x25);
        write_reg(&mut ioapic, REG_REDIRECTION + 10, 0x25);
        assert_eq!(routes.0.lock().unwrap().len(), 1);
        assert_eq!(ioapic.counters().entry_writes, 2);
    }

    #[test]
    fn the_id_register_keeps_bits_24_to_27() {
        let (mut ioapic, _) = ioapic();
        write_reg(&mut ioapic, REG_ID, 0xffff_ffff);
        assert_eq!(read_reg(&mut ioapic, REG_ID), 0x0f00_0000);
        assert_eq!(read_reg(&mut ioapic, REG_ARBITRATION), 0x0f00_0000);
    }
}
