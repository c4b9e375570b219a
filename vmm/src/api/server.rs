//! The API socket's threads: one (`api-accept`) accepts connections until
//! told to stop, one per connection (`api-conn`) reads requests with
//! [`Connection`], routes them to the [`Backend`] and writes the
//! answers, keeping the connection open between requests. At most
//! [`MAX_CONNECTIONS`] are served at once; more get a 503.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::http::{Connection, HttpError, Response};
use super::routes::{route, Answer, Backend, Method};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;

/// What the server needs from the process besides the routes.
pub trait Service: Send + Sync + 'static {
    /// What the routes drive.
    fn backend(&self) -> &dyn Backend;
    /// `vmm.shutdown` was answered: the process must end.
    fn exit_requested(&self);
}

/// The running accept thread; [`Server::stop`] ends it.
pub struct Server {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts accepting on `listener` for `service`.
    pub fn start(listener: UnixListener, service: Arc<dyn Service>) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let wake = stop.try_clone()?;
        let thread = devices::virtio::thread::spawn("api-accept".into(), move || {
            accept_loop(&listener, &wake, &service)
        })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting (connections being served finish on their own).
    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits for a connection or the stop eventfd; `false` on stop.
fn wait_readable(listener: &UnixListener, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false;
        }
        return fds[1].revents == 0;
    }
}

fn accept_loop(listener: &UnixListener, stop: &EventFd, service: &Arc<dyn Service>) {
    let active = Arc::new(AtomicUsize::new(0));
    while wait_readable(listener, stop) {
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            refuse_busy(stream);
            continue;
        }
        let (service, counter) = (service.clone(), active.clone());
        let spawned = devices::virtio::thread::spawn("api-conn".into(), move || {
            serve_connection(Connection::new(stream), service.as_ref());
            counter.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn refuse_busy(stream: UnixStream) {
    let mut connection = Connection::new(stream);
    let answer = Answer::error(
        503,
        format!("too many API connections (at most {MAX_CONNECTIONS}); close idle ones"),
    );
    let _ = connection.send(&response(answer.status, answer.body), true);
}

fn response(status: u16, body: String) -> Response {
    Response {
        status,
        body: (!body.is_empty()).then_some(body),
    }
}

/// Answers requests on one connection until it closes or must close.
pub fn serve_connection(mut connection: Connection, service: &dyn Service) {
    loop {
        let request = match connection.read_request() {
            Ok(request) => request,
            Err(e) => {
                if let Some(status) = e.status() {
                    let answer = Answer::error(status, e.to_string());
                    let _ = connection.send(&response(answer.status, answer.body), true);
                }
                return;
            }
        };
        let answer = route(
            service.backend(),
            Method::parse(&request.method),
            &request.target,
            &request.body,
            request.fds,
        );
        let close = request.close || answer.exit_after;
        let sent = connection.send(&response(answer.status, answer.body), close);
        if answer.exit_after {
            service.exit_requested();
        }
        if close || matches!(sent, Err(HttpError::Io(_))) {
            return;
        }
    }
}
