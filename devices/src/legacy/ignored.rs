//! A sink for ports that must not fault but mean nothing to the VMM, such as
//! the POST diagnostic port 0x80: reads see an empty bus (all ones) and
//! writes are dropped.

use crate::BusDevice;

/// Answers every access to its window: reads all ones, drops writes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ignored;

impl Ignored {
    /// A sink for any number of ports.
    pub fn new() -> Self {
        Ignored
    }
}

impl BusDevice for Ignored {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(super::OPEN_BUS);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_all_ones_whatever_was_written() {
        let mut port = Ignored::new();
        port.write(0, &[0x00, 0x12]);
        let mut data = [0u8; 4];
        port.read(0, &mut data);
        assert_eq!(data, [0xff; 4]);
        port.read(u64::MAX, &mut data[..1]);
        assert_eq!(data[0], 0xff);
    }
}
