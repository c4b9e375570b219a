//! The backend watcher: one thread per virtio-fs device (`fs-<id>-watch`)
//! that notices when the vhost-user backend goes away while the VM runs,
//! and bounds how long the device waits for the backend's answers.
//!
//! It polls a duplicate of the frontend socket for POLLRDHUP/POLLHUP (the
//! backend exited or closed the connection; it never asks for POLLIN, so
//! the answers the device is waiting for don't wake it) and a wake
//! eventfd. While a [`DeadlineGuard`] is held, the poll also times out at
//! the guard's deadline; if the exchange is still running then, the
//! watcher shuts the socket down (the device's blocked receive returns
//! end-of-file) and reports [`Loss::Timeout`]. Either way it reports once
//! and exits.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How the backend was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Loss {
    /// The backend closed the socket (exited, crashed, was killed).
    Closed,
    /// An exchange ran past its deadline; the watcher shut the socket.
    Timeout(Duration),
}

struct State {
    socket: UnixStream,
    wake: EventFd,
    stop: AtomicBool,
    deadline: Mutex<Option<(Instant, Duration)>>,
}

impl State {
    fn deadline(&self) -> MutexGuard<'_, Option<(Instant, Duration)>> {
        self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        // A full counter still wakes the thread.
        let _ = self.wake.write(1);
    }
}

/// The watcher thread; stopped and joined on drop (without a report).
pub(crate) struct Watcher {
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

/// While alive, the watcher ends the exchange at the deadline.
pub(crate) struct DeadlineGuard<'a> {
    watcher: &'a Watcher,
}

impl Drop for DeadlineGuard<'_> {
    fn drop(&mut self) {
        *self.watcher.state.deadline() = None;
    }
}

impl Watcher {
    /// Watches `socket` (a duplicate of the frontend socket) on thread
    /// `name`; calls `on_lost` once if the backend is lost.
    pub fn spawn(
        name: String,
        socket: UnixStream,
        on_lost: impl FnOnce(Loss) + Send + 'static,
    ) -> io::Result<Watcher> {
        let state = Arc::new(State {
            socket,
            wake: EventFd::new(EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            deadline: Mutex::new(None),
        });
        let thread_state = state.clone();
        let thread = crate::virtio::thread::spawn(name, move || watch(&thread_state, on_lost))?;
        Ok(Watcher {
            state,
            thread: Some(thread),
        })
    }

    /// Arms the deadline `timeout` from now until the guard is dropped.
    pub fn deadline(&self, timeout: Duration) -> DeadlineGuard<'_> {
        *self.state.deadline() = Some((Instant::now() + timeout, timeout));
        self.state.wake();
        DeadlineGuard { watcher: self }
    }

    /// Shuts the socket down (the device gave up on the connection); the
    /// watcher then reports [`Loss::Closed`] unless stopped first.
    pub fn sever(&self) {
        // Already shut down or closed by the peer is fine.
        let _ = self.state.socket.shutdown(Shutdown::Both);
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        self.state.wake();
        if let Some(thread) = self.thread.take() {
            // A panicked watcher has nothing left to report.
            let _ = thread.join();
        }
    }
}

/// What one poll saw.
enum Event {
    Hangup,
    Woken,
    TimedOut,
}

fn watch(state: &State, on_lost: impl FnOnce(Loss)) {
    loop {
        if state.stop.load(Ordering::Acquire) {
            return;
        }
        let armed = *state.deadline();
        let timeout = armed.map(|(at, _)| at.saturating_duration_since(Instant::now()));
        match poll(state, timeout) {
            Ok(Event::Hangup) => return on_lost(Loss::Closed),
            Ok(Event::Woken) => {
                // Nothing to read only means another wake-up drained it.
                let _ = state.wake.read();
            }
            Ok(Event::TimedOut) => {
                let deadline = state.deadline();
                if let Some((at, limit)) = *deadline {
                    if Instant::now() >= at && !state.stop.load(Ordering::Acquire) {
                        drop(deadline);
                        // The loss is recorded before the shutdown wakes
                        // the waiting request, so it reads as a timeout.
                        on_lost(Loss::Timeout(limit));
                        let _ = state.socket.shutdown(Shutdown::Both);
                        return;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("zvmm: virtio-fs watcher stopped: {e}");
                return;
            }
        }
    }
}

/// Polls the socket for hang-up and the wake eventfd, up to `timeout`.
fn poll(state: &State, timeout: Option<Duration>) -> io::Result<Event> {
    let mut fds = [
        libc::pollfd {
            fd: state.socket.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        },
        libc::pollfd {
            fd: state.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // Round up so a deadline 0.4 ms away does not spin.
    let timeout_ms = timeout.map_or(-1, |t| {
        i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
    });
    // SAFETY: `fds` is a valid array of two pollfds that outlives the call;
    // both descriptors are owned by `state`, which the caller keeps alive.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if ready < 0 {
        return Err(io::Error::last_os_error());
    }
    let hangup = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    Ok(if fds[0].revents & hangup != 0 {
        Event::Hangup
    } else if fds[1].revents & libc::POLLIN != 0 {
        Event::Woken
    } else {
        Event::TimedOut
    })
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn watched() -> (Watcher, UnixStream, mpsc::Receiver<Loss>) {
        let (ours, peer) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let watcher = Watcher::spawn("test-watch".into(), ours, move |loss| {
            tx.send(loss).unwrap();
        })
        .unwrap();
        (watcher, peer, rx)
    }

    const BOUND: Duration = Duration::from_secs(5);

    #[test]
    fn a_closed_peer_is_reported_once() {
        let (watcher, peer, rx) = watched();
        drop(peer);
        assert_eq!(rx.recv_timeout(BOUND).unwrap(), Loss::Closed);
        drop(watcher);
        assert!(rx.recv().is_err(), "reported once, then the thread ended");
    }

    #[test]
    fn data_from_the_peer_is_not_a_loss() {
        let (watcher, peer, rx) = watched();
        use std::io::Write;
        (&peer).write_all(b"answer").unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(watcher);
        assert!(rx.recv().is_err(), "stopping reports nothing");
    }

    #[test]
    fn an_exchange_past_its_deadline_shuts_the_socket() {
        let (watcher, peer, rx) = watched();
        let start = Instant::now();
        {
            let _quick = watcher.deadline(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(rx.try_recv().is_err(), "a dropped guard never fires");
        let _slow = watcher.deadline(Duration::from_millis(100));
        let loss = rx.recv_timeout(BOUND).unwrap();
        assert_eq!(loss, Loss::Timeout(Duration::from_millis(100)));
        assert!(start.elapsed() >= Duration::from_millis(200));
        let mut buf = [0u8; 1];
        use std::io::Read;
        assert_eq!((&peer).read(&mut buf).unwrap(), 0, "the peer sees EOF");
    }

    #[test]
    fn severing_reports_a_close() {
        let (watcher, _peer, rx) = watched();
        watcher.sever();
        assert_eq!(rx.recv_timeout(BOUND).unwrap(), Loss::Closed);
    }
}
