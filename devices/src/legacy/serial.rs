//! The COM1 UART: a 16550A model (`vm_superio::Serial`) whose interrupt is an
//! `EventFd` (the VMM registers it as an irqfd), whose output goes to any
//! writer, flushed byte by byte, and whose input the VMM feeds without ever
//! overflowing the 64-byte receive FIFO. Also owns [`ObservedWriter`], the
//! hook through which the VMM watches guest console output.

use std::io::{self, Write};

use vm_superio::serial::{Error as UartError, SerialEvents};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::ByteRegisters;

/// Modem control register offset.
const MCR_OFFSET: u8 = 4;
/// MCR loopback bit: transmitted bytes come back as input, outside input
/// is not accepted.
const MCR_LOOP_BIT: u8 = 0x10;

/// Errors feeding input to the UART.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The input was queued but the guest could not be interrupted.
    #[error("failed to signal the serial interrupt after queueing {queued} input bytes")]
    Interrupt {
        /// How many input bytes were taken into the FIFO regardless.
        queued: usize,
        /// Why the interrupt eventfd could not be written.
        #[source]
        source: io::Error,
    },
}

/// The UART's interrupt line: one eventfd write per edge.
struct InterruptLine(EventFd);

impl Trigger for InterruptLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the VMM (optionally) when the guest has drained the receive FIFO.
struct InputRoomNotifier(Option<EventFd>);

impl SerialEvents for InputRoomNotifier {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(event) = &self.0 {
            // A failed write means the counter is already saturated, i.e.
            // the VMM already has a pending notification: nothing is lost.
            let _ = event.write(1);
        }
    }
}

type Uart = vm_superio::Serial<InterruptLine, InputRoomNotifier, Box<dyn Write + Send>>;

/// A 16550A UART (8 registers) for COM1.
pub struct Serial {
    uart: Uart,
    loopback: bool,
    lost_output_bytes: u64,
    failed_interrupts: u64,
}

impl Serial {
    /// A UART raising `interrupt` (write of 1 per edge) and sending guest
    /// output to `out`, flushed after every byte.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self::build(interrupt, out, None)
    }

    /// Like [`Serial::new`], and writes `input_room` each time the guest
    /// empties the receive FIFO, so the VMM can resume feeding input that
    /// [`Serial::enqueue_input`] did not take.
    pub fn with_input_room_event(
        interrupt: EventFd,
        out: Box<dyn Write + Send>,
        input_room: EventFd,
    ) -> Self {
        Self::build(interrupt, out, Some(input_room))
    }

    fn build(interrupt: EventFd, out: Box<dyn Write + Send>, room: Option<EventFd>) -> Self {
        Serial {
            uart: vm_superio::Serial::with_events(
                InterruptLine(interrupt),
                InputRoomNotifier(room),
                out,
            ),
            loopback: false,
            lost_output_bytes: 0,
            failed_interrupts: 0,
        }
    }

    /// The interrupt eventfd (to register as an irqfd).
    pub fn interrupt_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// Queues as much of `bytes` as the receive FIFO has room for and
    /// returns how many were taken; the caller keeps the rest for later.
    /// Takes nothing while the guest has the UART in loopback mode.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        let take = bytes.len().min(self.fifo_room());
        if take == 0 {
            return Ok(0);
        }
        match self.uart.enqueue_raw_bytes(&bytes[..take]) {
            Ok(taken) => Ok(taken),
            Err(UartError::Trigger(source)) => Err(SerialError::Interrupt {
                queued: take,
                source,
            }),
            // Neither happens: room was checked and input produces no output.
            Err(UartError::FullFifo | UartError::IOError(_)) => Ok(0),
        }
    }

    /// Free space in the receive FIFO, in bytes (0 in loopback mode).
    pub fn fifo_room(&self) -> usize {
        if self.loopback {
            0
        } else {
            self.uart.fifo_capacity()
        }
    }

    /// Guest output bytes the writer failed to take.
    pub fn lost_output_bytes(&self) -> u64 {
        self.lost_output_bytes
    }

    /// Interrupts that could not be signalled from guest register accesses.
    pub fn failed_interrupts(&self) -> u64 {
        self.failed_interrupts
    }
}

impl ByteRegisters for Serial {
    const WINDOW_LEN: u64 = 8;

    fn read_byte(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    fn write_byte(&mut self, offset: u8, value: u8) {
        if offset == MCR_OFFSET {
            self.loopback = value & MCR_LOOP_BIT != 0;
        }
        match self.uart.write(offset, value) {
            Ok(()) | Err(UartError::FullFifo) => {}
            Err(UartError::IOError(_)) => {
                self.lost_output_bytes = self.lost_output_bytes.saturating_add(1);
            }
            Err(UartError::Trigger(_)) => {
                self.failed_interrupts = self.failed_interrupts.saturating_add(1);
            }
        }
    }
}

/// A writer that shows every byte to an observer before passing it on, so
/// the VMM can match boot-log lines or time the first console byte.
///
/// The observer sees the bytes even if the inner writer then fails.
pub struct ObservedWriter<W, F> {
    inner: W,
    observe: F,
}

impl<W: Write, F: FnMut(&[u8])> ObservedWriter<W, F> {
    /// Writes go to `inner` after `observe` has seen them.
    pub fn new(inner: W, observe: F) -> Self {
        ObservedWriter { inner, observe }
    }
}

impl<W: Write, F: FnMut(&[u8])> Write for ObservedWriter<W, F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            (self.observe)(buf);
            self.inner.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::legacy::test_util::SharedBuffer;
    use crate::BusDevice;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DATA_READY: u8 = 0x01;

    fn event() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn serial_with_output() -> (Serial, EventFd, SharedBuffer) {
        let irq = event();
        let out = SharedBuffer::default();
        let serial = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        (serial, irq, out)
    }

    fn read_reg(serial: &mut Serial, offset: u64) -> u8 {
        let mut data = [0u8];
        serial.read(offset, &mut data);
        data[0]
    }

    /// Whether the eventfd was signalled since last checked (and clears it).
    fn fired(evt: &EventFd) -> bool {
        evt.read().is_ok()
    }

    /// Records writes and flushes in order.
    #[derive(Clone, Default)]
    struct FlushLog(Arc<Mutex<Vec<String>>>);

    impl Write for FlushLog {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let text = String::from_utf8_lossy(buf).into_owned();
            self.0.lock().unwrap().push(text);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.lock().unwrap().push("flush".into());
            Ok(())
        }
    }

    /// A writer whose sink is gone.
    struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_bytes_reach_the_writer_each_flushed() {
        let log = FlushLog::default();
        let mut serial = Serial::new(event(), Box::new(log.clone()));
        serial.write(THR, b"o");
        serial.write(THR, b"k");
        assert_eq!(*log.0.lock().unwrap(), ["o", "flush", "k", "flush"]);
    }

    #[test]
    fn thr_write_interrupts_only_when_enabled() {
        let (mut serial, irq, out) = serial_with_output();
        serial.write(THR, b"a");
        assert!(!fired(&irq));

        serial.write(IER, &[IER_THRE]);
        assert!(fired(&irq), "enabling THRE with an empty THR asserts it");
        assert_eq!(read_reg(&mut serial, IIR), 0xc2, "THR empty, FIFOs on");
        assert_eq!(
            read_reg(&mut serial, IIR),
            0xc1,
            "reading IIR acknowledged it"
        );

        serial.write(THR, b"b");
        assert!(fired(&irq));
        assert_eq!(out.contents(), b"ab");
        assert_eq!(serial.failed_interrupts(), 0);
    }

    #[test]
    fn input_is_limited_to_the_fifo_room() {
        let (mut serial, _irq, _out) = serial_with_output();
        let input: Vec<u8> = (0..100).collect();
        assert_eq!(serial.fifo_room(), 64);
        assert_eq!(serial.enqueue_input(&input).unwrap(), 64);
        assert_eq!(serial.fifo_room(), 0);
        assert_eq!(serial.enqueue_input(&input[64..]).unwrap(), 0);

        for expected in 0..64u8 {
            assert_ne!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
            assert_eq!(read_reg(&mut serial, THR), expected);
        }
        assert_eq!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(serial.fifo_room(), 64);
        assert_eq!(serial.enqueue_input(&input[64..]).unwrap(), 36);
    }

    #[test]
    fn input_interrupts_when_rda_is_enabled() {
        let (mut serial, irq, _out) = serial_with_output();
        assert_eq!(serial.enqueue_input(b"x").unwrap(), 1);
        assert!(!fired(&irq));
        serial.write(IER, &[IER_RDA]);
        assert!(fired(&irq), "enabling RDA with data pending asserts it");
        assert_eq!(read_reg(&mut serial, THR), b'x');
        assert_eq!(serial.enqueue_input(b"y").unwrap(), 1);
        assert!(fired(&irq));
    }

    #[test]
    fn draining_the_fifo_signals_input_room() {
        let room = event();
        let mut serial =
            Serial::with_input_room_event(event(), Box::new(io::sink()), room.try_clone().unwrap());
        serial.enqueue_input(b"ab").unwrap();
        read_reg(&mut serial, THR);
        assert!(!fired(&room));
        read_reg(&mut serial, THR);
        assert!(fired(&room));
    }

    #[test]
    fn loopback_mode_takes_no_outside_input() {
        let (mut serial, _irq, out) = serial_with_output();
        serial.write(MCR, &[MCR_LOOP_BIT]);
        assert_eq!(serial.fifo_room(), 0);
        assert_eq!(serial.enqueue_input(b"x").unwrap(), 0);
        serial.write(THR, b"z");
        assert_eq!(read_reg(&mut serial, THR), b'z');
        assert!(out.contents().is_empty());
        serial.write(MCR, &[0]);
        assert_eq!(serial.fifo_room(), 64);
    }

    #[test]
    fn failed_interrupt_reports_what_was_queued() {
        let (mut serial, irq, _out) = serial_with_output();
        serial.write(IER, &[IER_RDA]);
        // Saturate the eventfd counter so the next write would overflow.
        irq.write(u64::MAX - 1).unwrap();
        match serial.enqueue_input(b"abc") {
            Err(SerialError::Interrupt { queued, .. }) => assert_eq!(queued, 3),
            other => panic!("expected an interrupt error, got {other:?}"),
        }
        assert_eq!(serial.fifo_room(), 61);
    }

    #[test]
    fn broken_output_counts_lost_bytes_and_still_interrupts() {
        let irq = event();
        let mut serial = Serial::new(irq.try_clone().unwrap(), Box::new(BrokenPipe));
        serial.write(IER, &[IER_THRE]);
        read_reg(&mut serial, IIR);
        fired(&irq);
        serial.write(THR, b"a");
        assert_eq!(serial.lost_output_bytes(), 1);
        assert!(fired(&irq), "the guest must not wait forever for THRE");
    }

    #[test]
    fn wide_and_out_of_window_accesses_are_safe() {
        let (mut serial, _irq, _out) = serial_with_output();
        serial.write(SCR, &[0x5a, 0xff, 0xff, 0xff]);
        assert_eq!(read_reg(&mut serial, SCR), 0x5a);
        let mut wide = [0u8; 4];
        serial.read(LCR, &mut wide);
        assert_eq!(wide, [0x03, 0x08, 0x60, 0xb0]);
        serial.read(SCR, &mut wide);
        assert_eq!(wide, [0x5a, 0xff, 0xff, 0xff]);
        serial.read(100, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        serial.write(100, &[1, 2]);
        serial.read(0, &mut []);
    }

    #[test]
    fn observed_writer_sees_bytes_even_when_the_sink_fails() {
        let seen = SharedBuffer::default();
        let mut seen_clone = seen.clone();
        let mut writer = ObservedWriter::new(BrokenPipe, move |bytes: &[u8]| {
            seen_clone.write_all(bytes).unwrap();
        });
        assert!(writer.write_all(b"boot").is_err());
        assert_eq!(seen.contents(), b"boot");
    }

    #[test]
    fn observed_writer_passes_bytes_on() {
        let out = SharedBuffer::default();
        let mut count = 0usize;
        let mut writer = ObservedWriter::new(out.clone(), |bytes: &[u8]| count += bytes.len());
        writer.write_all(b"hello").unwrap();
        writer.flush().unwrap();
        drop(writer);
        assert_eq!(count, 5);
        assert_eq!(out.contents(), b"hello");
    }
}
