//! A clonable handle on one output stream, so the serial console's host
//! side outlives each VM boot (a guest reset rebuilds the UART, not the
//! console).

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A shared, locked `Write`.
#[derive(Clone)]
pub struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedWriter {
    /// Shares `inner`.
    pub fn new(inner: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(inner)))
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}
