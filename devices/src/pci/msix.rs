//! MSI-X: the capability structure, the vector table and pending-bit array
//! a function exposes in a BAR, and delivery through an [`MsiRouter`] the
//! VMM implements (one per function: a KVM GSI route and an irqfd per
//! vector).
//!
//! A vector is *deliverable* while MSI-X is enabled, the function is not
//! masked and the vector's own mask bit is clear. Deliverable vectors have a
//! route installed with their current message; when a vector stops being
//! deliverable its route is removed. A masked vector that fires only sets
//! its pending bit; the interrupt is delivered when it is unmasked. Nothing
//! is ever signalled for a vector that is not deliverable.
//!
//! A vector's irqfd can also be handed out ([`Msix::irqfd`]) so that a
//! backend outside zvmm (vhost-user) raises it without a trip through this
//! module. Such a *direct* vector cannot record a pending bit: KVM drops a
//! write to an irqfd whose route is gone. So each time a direct vector
//! becomes deliverable again (unmasked, MSI-X re-enabled) it is signalled
//! once, in case the backend wrote while it was masked; a spurious
//! interrupt costs the driver one look at its used ring.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// MSI-X capability ID.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Length of the MSI-X capability structure.
pub const MSIX_CAPABILITY_LEN: usize = 12;
/// Offset of message control within the capability.
pub const MSIX_CONTROL_OFFSET: u16 = 2;
/// Bytes per vector table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Largest table the capability can describe.
pub const MAX_MSIX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: the vector is masked.
const ENTRY_MASKED: u32 = 1;

/// An MSI message: what the function writes to raise the interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Installs routes for and raises a function's MSI-X vectors; implemented
/// by the VMM. Called with the function's MSI-X state locked: must not
/// call back into the device.
pub trait MsiRouter: Send + Sync {
    /// Installs or updates (`Some`) or removes (`None`) the route of
    /// `vector` (the KVM GSI route for that vector's irqfd).
    fn route(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()>;
    /// Raises `vector` (writes its irqfd); only called while it is routed.
    fn signal(&self, vector: u16) -> io::Result<()>;
    /// A duplicate of the eventfd that raises `vector` (its irqfd), if the
    /// router has one, for a backend to signal directly.
    fn irqfd(&self, _vector: u16) -> Option<EventFd> {
        None
    }
}

/// MSI-X errors.
#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    /// The table size is out of range.
    #[error("msi-x table of {count} vectors is outside 1-2048")]
    VectorCount {
        /// The requested number of vectors.
        count: u16,
    },
    /// The vector is not in the table.
    #[error("msi-x vector {vector} is outside the table of {count}")]
    NoSuchVector {
        /// The vector raised.
        vector: u16,
        /// The table size.
        count: u16,
    },
    /// The router could not raise the vector.
    #[error("cannot signal msi-x vector {vector}")]
    Signal {
        /// The vector raised.
        vector: u16,
        /// The router's error.
        #[source]
        source: io::Error,
    },
}

/// Where a function's MSI-X structures live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// Number of vectors.
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixCapability {
    /// The capability body (ID 0x11, next pointer left 0, MSI-X disabled)
    /// and its write mask (enable and function-mask bits).
    pub fn bytes(&self) -> ([u8; MSIX_CAPABILITY_LEN], [u8; MSIX_CAPABILITY_LEN]) {
        let mut body = [0; MSIX_CAPABILITY_LEN];
        body[0] = MSIX_CAPABILITY_ID;
        let table_size = self.vectors.saturating_sub(1) & 0x7ff;
        body[2..4].copy_from_slice(&table_size.to_le_bytes());
        let table = self.table_offset & !7 | u32::from(self.table_bar & 7);
        body[4..8].copy_from_slice(&table.to_le_bytes());
        let pba = self.pba_offset & !7 | u32::from(self.pba_bar & 7);
        body[8..12].copy_from_slice(&pba.to_le_bytes());
        let mut mask = [0; MSIX_CAPABILITY_LEN];
        let control_mask = MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK;
        mask[2..4].copy_from_slice(&control_mask.to_le_bytes());
        (body, mask)
    }
}

/// Failure counts (the guest-driven paths cannot return errors).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixCounters {
    /// Routes the router failed to install or remove.
    pub route_failures: u64,
    /// Signals the router failed to deliver.
    pub signal_failures: u64,
    /// Interrupts dropped because MSI-X was disabled.
    pub dropped: u64,
}

/// A function's MSI-X table, pending bits and control state.
pub struct Msix {
    /// Entries: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    /// The message each vector is routed with (`None`: no route).
    routed: Vec<Option<MsiMessage>>,
    /// Vectors whose irqfd was handed out (see the module doc).
    direct: Vec<bool>,
    router: Arc<dyn MsiRouter>,
    counters: MsixCounters,
}

impl Msix {
    /// A table of `vectors` entries, all masked, MSI-X disabled.
    pub fn new(vectors: u16, router: Arc<dyn MsiRouter>) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > MAX_MSIX_VECTORS {
            return Err(MsixError::VectorCount { count: vectors });
        }
        let count = usize::from(vectors);
        Ok(Msix {
            table: vec![[0, 0, 0, ENTRY_MASKED]; count],
            pending: vec![false; count],
            enabled: false,
            function_masked: false,
            routed: vec![None; count],
            direct: vec![false; count],
            router,
            counters: MsixCounters::default(),
        })
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Size of the table in bytes.
    pub fn table_len(&self) -> u64 {
        self.table.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Size of the PBA in bytes (whole qwords).
    pub fn pba_len(&self) -> u64 {
        self.table.len().div_ceil(64) as u64 * 8
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Failure counts so far.
    pub fn counters(&self) -> MsixCounters {
        self.counters
    }

    /// Applies the message control register the guest wrote.
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & MSIX_CONTROL_ENABLE != 0;
        self.function_masked = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        for vector in 0..self.table.len() {
            self.sync(vector);
        }
    }

    /// Reads table bytes at `offset`; bytes past the table read zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self
                .table_byte(offset.saturating_add(i as u64))
                .unwrap_or(0);
        }
    }

    fn table_byte(&self, at: u64) -> Option<u8> {
        let entry = self
            .table
            .get(usize::try_from(at / MSIX_ENTRY_SIZE).ok()?)?;
        let word = entry[(at % MSIX_ENTRY_SIZE / 4) as usize];
        Some(word.to_le_bytes()[(at % 4) as usize])
    }

    /// Writes table bytes at `offset` (bytes past the table are dropped),
    /// then updates the routes of the entries touched.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched = Vec::new();
        for (i, &value) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            let Ok(vector) = usize::try_from(at / MSIX_ENTRY_SIZE) else {
                continue;
            };
            let Some(entry) = self.table.get_mut(vector) else {
                continue;
            };
            let word = &mut entry[(at % MSIX_ENTRY_SIZE / 4) as usize];
            let mut bytes = word.to_le_bytes();
            bytes[(at % 4) as usize] = value;
            *word = u32::from_le_bytes(bytes);
            // Only the mask bit of vector control is implemented.
            entry[3] &= ENTRY_MASKED;
            if touched.last() != Some(&vector) {
                touched.push(vector);
            }
        }
        for vector in touched {
            self.sync(vector);
        }
    }

    /// The router's irqfd for `vector` (a duplicate), marking the vector
    /// direct; `None` if the vector is not in the table or the router has
    /// no irqfd for it (never routed).
    pub fn irqfd(&mut self, vector: u16) -> Option<EventFd> {
        let slot = self.direct.get_mut(usize::from(vector))?;
        let irqfd = self.router.irqfd(vector)?;
        *slot = true;
        Some(irqfd)
    }

    /// Forgets which vectors were handed out (the device was reset).
    pub fn release_irqfds(&mut self) {
        self.direct.fill(false);
    }

    /// Reads the pending-bit array at `offset` (read-only; zero past it).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = offset.saturating_add(i as u64).saturating_mul(8);
            *byte = (0..8u64)
                .filter(|bit| self.is_pending(first.saturating_add(*bit)))
                .fold(0, |acc, bit| acc | 1 << bit);
        }
    }

    /// Whether `vector` has a pending interrupt.
    pub fn is_pending(&self, vector: u64) -> bool {
        usize::try_from(vector)
            .ok()
            .and_then(|v| self.pending.get(v).copied())
            .unwrap_or(false)
    }

    /// Raises `vector`: delivered if deliverable, made pending if masked,
    /// dropped (and counted) while MSI-X is disabled.
    pub fn trigger(&mut self, vector: u16) -> Result<(), MsixError> {
        let index = usize::from(vector);
        if index >= self.table.len() {
            let count = self.vectors();
            return Err(MsixError::NoSuchVector { vector, count });
        }
        if !self.enabled {
            self.counters.dropped += 1;
            return Ok(());
        }
        if !self.deliverable(index) {
            self.pending[index] = true;
            return Ok(());
        }
        self.signal(index)
    }

    fn signal(&mut self, index: usize) -> Result<(), MsixError> {
        let vector = index as u16;
        self.router.signal(vector).map_err(|source| {
            self.counters.signal_failures += 1;
            MsixError::Signal { vector, source }
        })
    }

    fn deliverable(&self, index: usize) -> bool {
        let unmasked = self.table[index][3] & ENTRY_MASKED == 0;
        self.enabled && !self.function_masked && unmasked
    }

    fn message(&self, index: usize) -> MsiMessage {
        let [low, high, data, _] = self.table[index];
        MsiMessage {
            address: u64::from(high) << 32 | u64::from(low),
            data,
        }
    }

    /// Brings the route of `index` in line with its state and delivers a
    /// pending interrupt once it is deliverable (for a direct vector: on
    /// every return to deliverable).
    fn sync(&mut self, index: usize) {
        let deliverable = self.deliverable(index);
        let wanted = deliverable.then(|| self.message(index));
        if deliverable && self.direct[index] && self.routed[index].is_none() {
            self.pending[index] = true;
        }
        if self.routed[index] != wanted {
            if self.router.route(index as u16, wanted).is_err() {
                self.counters.route_failures += 1;
            }
            self.routed[index] = wanted;
        }
        if deliverable && self.pending[index] {
            self.pending[index] = false;
            // A failure is counted; the guest's handler polls its queues.
            let _ = self.signal(index);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// What a [`RecordingRouter`] saw.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum RouterEvent {
        /// `route(vector, message)`.
        Route(u16, Option<MsiMessage>),
        /// `signal(vector)`.
        Signal(u16),
    }

    /// Records every call; can be told to fail; hands out irqfds given to
    /// it with [`RecordingRouter::add_irqfd`].
    #[derive(Default)]
    pub struct RecordingRouter {
        events: Mutex<Vec<RouterEvent>>,
        fail: Mutex<bool>,
        irqfds: Mutex<Vec<(u16, EventFd)>>,
    }

    impl RecordingRouter {
        /// Gives `vector` an irqfd; returns the router's end to read.
        pub fn add_irqfd(&self, vector: u16) -> EventFd {
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let ours = irqfd.try_clone().unwrap();
            self.irqfds.lock().unwrap().push((vector, irqfd));
            ours
        }

        /// Returns and forgets the calls so far.
        pub fn take(&self) -> Vec<RouterEvent> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }

        /// Makes every later call fail (or succeed again).
        pub fn set_failing(&self, fail: bool) {
            *self.fail.lock().unwrap() = fail;
        }

        fn record(&self, event: RouterEvent) -> io::Result<()> {
            self.events.lock().unwrap().push(event);
            if *self.fail.lock().unwrap() {
                return Err(io::Error::other("router failure"));
            }
            Ok(())
        }
    }

    impl MsiRouter for RecordingRouter {
        fn route(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()> {
            self.record(RouterEvent::Route(vector, message))
        }
        fn signal(&self, vector: u16) -> io::Result<()> {
            self.record(RouterEvent::Signal(vector))
        }
        fn irqfd(&self, vector: u16) -> Option<EventFd> {
            let irqfds = self.irqfds.lock().unwrap();
            let (_, irqfd) = irqfds.iter().find(|(v, _)| *v == vector)?;
            Some(irqfd.try_clone().unwrap())
        }
    }

    fn msix(vectors: u16) -> (Msix, Arc<RecordingRouter>) {
        let router = Arc::new(RecordingRouter::default());
        (Msix::new(vectors, router.clone()).unwrap(), router)
    }

    fn program(msix: &mut Msix, vector: u64, address: u64, data: u32) {
        let base = vector * MSIX_ENTRY_SIZE;
        msix.write_table(base, &address.to_le_bytes());
        msix.write_table(base + 8, &data.to_le_bytes());
    }

    fn unmask(msix: &mut Msix, vector: u64, masked: bool) {
        let control = u32::from(masked);
        msix.write_table(vector * MSIX_ENTRY_SIZE + 12, &control.to_le_bytes());
    }

    const MSG: MsiMessage = MsiMessage {
        address: 0xfee0_1000,
        data: 0x4041,
    };

    #[test]
    fn capability_bytes_describe_table_and_pba() {
        let cap = MsixCapability {
            vectors: 3,
            table_bar: 0,
            table_offset: 0x4000,
            pba_bar: 2,
            pba_offset: 0x5000,
        };
        let (body, mask) = cap.bytes();
        assert_eq!(body, [0x11, 0, 2, 0, 0, 0x40, 0, 0, 2, 0x50, 0, 0]);
        assert_eq!(mask, [0, 0, 0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn table_starts_masked_and_reads_back() {
        let (mut msix, router) = msix(2);
        let mut data = [0u8; 16];
        msix.read_table(16, &mut data);
        assert_eq!(data, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        program(&mut msix, 1, MSG.address, MSG.data);
        msix.write_table(28, &[0xff, 0xff, 0xff, 0xff]);
        msix.read_table(16, &mut data);
        assert_eq!(&data[..8], &MSG.address.to_le_bytes());
        assert_eq!(&data[12..], &[1, 0, 0, 0], "reserved control bits read 0");
        assert_eq!(router.take(), vec![], "disabled: nothing routed");
        assert_eq!((msix.table_len(), msix.pba_len()), (32, 8));
    }

    #[test]
    fn masked_vector_becomes_pending_and_fires_on_unmask() {
        let (mut msix, router) = msix(4);
        msix.set_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        program(&mut msix, 2, MSG.address, MSG.data);
        unmask(&mut msix, 2, false);
        assert_eq!(router.take(), vec![], "function masked");
        msix.trigger(2).unwrap();
        assert!(msix.is_pending(2));
        let mut pba = [0u8; 8];
        msix.read_pba(0, &mut pba);
        assert_eq!(pba, [0b100, 0, 0, 0, 0, 0, 0, 0]);
        msix.set_control(MSIX_CONTROL_ENABLE);
        assert_eq!(
            router.take(),
            vec![RouterEvent::Route(2, Some(MSG)), RouterEvent::Signal(2)]
        );
        assert!(!msix.is_pending(2));
        msix.trigger(2).unwrap();
        assert_eq!(router.take(), vec![RouterEvent::Signal(2)]);
        // Masking the vector removes its route; firing makes it pending.
        unmask(&mut msix, 2, true);
        msix.trigger(2).unwrap();
        assert_eq!(router.take(), vec![RouterEvent::Route(2, None)]);
        unmask(&mut msix, 2, false);
        assert_eq!(
            router.take(),
            vec![RouterEvent::Route(2, Some(MSG)), RouterEvent::Signal(2)]
        );
    }

    #[test]
    fn message_updates_reroute_and_disable_unroutes() {
        let (mut msix, router) = msix(1);
        msix.set_control(MSIX_CONTROL_ENABLE);
        program(&mut msix, 0, MSG.address, MSG.data);
        unmask(&mut msix, 0, false);
        assert_eq!(router.take(), vec![RouterEvent::Route(0, Some(MSG))]);
        msix.write_table(8, &7u32.to_le_bytes());
        let moved = MsiMessage { data: 7, ..MSG };
        assert_eq!(router.take(), vec![RouterEvent::Route(0, Some(moved))]);
        msix.set_control(0);
        assert_eq!(router.take(), vec![RouterEvent::Route(0, None)]);
        msix.trigger(0).unwrap();
        assert_eq!(router.take(), vec![], "disabled: never signalled");
        assert!(!msix.is_pending(0));
        assert_eq!(msix.counters().dropped, 1);
    }

    #[test]
    fn bad_vectors_and_failures_are_reported() {
        assert!(Msix::new(0, Arc::new(RecordingRouter::default())).is_err());
        assert!(Msix::new(2049, Arc::new(RecordingRouter::default())).is_err());
        let (mut msix, router) = msix(1);
        assert!(matches!(
            msix.trigger(1),
            Err(MsixError::NoSuchVector {
                vector: 1,
                count: 1
            })
        ));
        msix.set_control(MSIX_CONTROL_ENABLE);
        router.set_failing(true);
        unmask(&mut msix, 0, false);
        assert!(matches!(
            msix.trigger(0),
            Err(MsixError::Signal { vector: 0, .. })
        ));
        let counters = msix.counters();
        assert_eq!((counters.route_failures, counters.signal_failures), (1, 1));
    }

    #[test]
    fn direct_vectors_are_signalled_on_every_return_to_deliverable() {
        let (mut msix, router) = msix(3);
        assert!(msix.irqfd(1).is_none(), "the router has no irqfd");
        let irqfd = router.add_irqfd(1);
        assert!(msix.irqfd(3).is_none(), "outside the table");
        msix.set_control(MSIX_CONTROL_ENABLE);
        program(&mut msix, 1, MSG.address, MSG.data);
        unmask(&mut msix, 1, false);
        router.take();
        let handed = msix.irqfd(1).unwrap();
        handed.write(1).unwrap();
        assert_eq!(irqfd.read().unwrap(), 1, "the router's own irqfd");
        // Masked then unmasked: a backend may have written meanwhile.
        unmask(&mut msix, 1, true);
        unmask(&mut msix, 1, false);
        let replay = [RouterEvent::Route(1, Some(MSG)), RouterEvent::Signal(1)];
        assert_eq!(router.take()[1..], replay);
        msix.set_control(0);
        msix.set_control(MSIX_CONTROL_ENABLE);
        assert_eq!(router.take()[1..], replay);
        // A message change while deliverable is no return: no signal.
        msix.write_table(16 + 8, &7u32.to_le_bytes());
        let moved = MsiMessage { data: 7, ..MSG };
        assert_eq!(router.take(), vec![RouterEvent::Route(1, Some(moved))]);
        // Released (device reset): plain vectors again.
        msix.release_irqfds();
        unmask(&mut msix, 1, true);
        unmask(&mut msix, 1, false);
        assert_eq!(
            router.take(),
            vec![
                RouterEvent::Route(1, None),
                RouterEvent::Route(1, Some(moved))
            ]
        );
    }

    #[test]
    fn odd_accesses_never_panic() {
        let (mut msix, _router) = msix(1);
        let mut data = [0xaau8; 32];
        msix.read_table(u64::MAX, &mut data);
        assert_eq!(data, [0; 32]);
        msix.read_table(8, &mut data);
        msix.write_table(u64::MAX - 3, &[1; 8]);
        msix.write_table(13, &[0xff; 40]);
        msix.read_pba(u64::MAX, &mut data);
        msix.read_pba(3, &mut data[..3]);
        assert_eq!(data[..3], [0, 0, 0]);
    }
}
