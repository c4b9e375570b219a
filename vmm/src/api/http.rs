//! A small HTTP/1.1 server for the API socket: it owns the wire format and
//! nothing else. Requests are read with `recvmsg` (rust-vmm's
//! [`ScmSocket`]), so file descriptors a client attaches with SCM_RIGHTS
//! (a tap for `vm.add-net`) arrive with the request they were sent with.
//! A request is a request line, headers and a `Content-Length` body; a
//! connection serves requests until the client closes it or asks to
//! (keep-alive). Sizes are bounded, a started request must arrive within
//! [`REQUEST_TIMEOUT`], and anything malformed is answered with a JSON
//! error and the connection closed, never a panic or a hang.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Largest request line plus headers.
pub const MAX_HEAD: usize = 16 << 10;
/// Largest request body (a VM configuration is a few KiB).
pub const MAX_BODY: usize = 1 << 20;
/// Most headers in one request.
const MAX_HEADERS: usize = 64;
/// Most file descriptors one `recvmsg` may carry.
pub const MAX_FDS: usize = 16;
/// Most file descriptors one request may carry in all.
const MAX_REQUEST_FDS: usize = 64;
/// How long the rest of a request may take once its first byte arrived.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay idle between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Bytes read per `recvmsg`.
const READ_CHUNK: usize = 8 << 10;

/// A request could not be read; answered (when a status is given) and the
/// connection closed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The client closed the connection between requests.
    #[error("connection closed")]
    Closed,
    /// The client went quiet between requests for too long.
    #[error("connection idle for too long")]
    Idle,
    /// The request is not HTTP/1.x as this server reads it.
    #[error("bad request: {0}")]
    Malformed(String),
    /// The request did not arrive in time.
    #[error("the request did not arrive within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    /// The request line and headers are too long.
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The body is too long.
    #[error("request body of {0} bytes is larger than {MAX_BODY}")]
    BodyTooLarge(usize),
    /// A body without a length.
    #[error("chunked request bodies are not supported; send Content-Length")]
    Chunked,
    /// More descriptors than the server takes.
    #[error("too many file descriptors attached (at most {MAX_REQUEST_FDS})")]
    TooManyFds,
    /// The socket failed.
    #[error("socket error")]
    Io(#[source] std::io::Error),
}

impl HttpError {
    /// The status to answer with, if the client should get an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Closed | HttpError::Idle | HttpError::Io(_) => None,
            HttpError::Malformed(_) | HttpError::TooManyFds => Some(400),
            HttpError::Timeout => Some(408),
            HttpError::BodyTooLarge(_) => Some(413),
            HttpError::HeadTooLarge => Some(431),
            HttpError::Chunked => Some(411),
        }
    }
}

/// One request as read from the socket.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The request target (`/api/v1/vm.info`).
    pub target: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
    /// Descriptors that came with the request's bytes.
    pub fds: Vec<OwnedFd>,
    /// The client wants the connection closed after the answer.
    pub close: bool,
}

/// What to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// A JSON document, or nothing (204).
    pub body: Option<String>,
}

impl Response {
    /// The bytes on the wire; `close` adds `Connection: close`.
    pub fn encode(&self, close: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: zvmm\r\n",
            self.status,
            reason(self.status)
        );
        if close {
            head.push_str("Connection: close\r\n");
        }
        let mut bytes = match &self.body {
            Some(body) => {
                head.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                ));
                let mut bytes = head.into_bytes();
                bytes.extend_from_slice(body.as_bytes());
                bytes
            }
            None if self.status == 204 || self.status < 200 => {
                head.push_str("\r\n");
                head.into_bytes()
            }
            None => {
                head.push_str("Content-Length: 0\r\n\r\n");
                head.into_bytes()
            }
        };
        bytes.shrink_to_fit();
        bytes
    }
}

/// The reason phrase of `status`.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The parsed request line and the headers this server cares about.
#[derive(Debug, Default, PartialEq, Eq)]
struct Head {
    method: String,
    target: String,
    content_length: usize,
    close: bool,
    expect_continue: bool,
}

/// One client connection: the socket, bytes read past the last request,
/// and descriptors received with them.
pub struct Connection {
    stream: UnixStream,
    buffer: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Connection {
    /// Wraps an accepted socket.
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buffer: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Reads the next request: `Err(Closed)` when the client closed the
    /// connection cleanly between requests.
    pub fn read_request(&mut self) -> Result<Request, HttpError> {
        let head_end = self.read_head()?;
        let head_bytes: Vec<u8> = self.buffer.drain(..head_end).collect();
        let head = parse_head(&head_bytes)?;
        if head.content_length > MAX_BODY {
            return Err(HttpError::BodyTooLarge(head.content_length));
        }
        if head.expect_continue && head.content_length > self.buffer.len() {
            let continue_line = Response {
                status: 100,
                body: None,
            };
            self.send_raw(&continue_line.encode(false))?;
        }
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        while self.buffer.len() < head.content_length {
            self.fill(deadline, true)?;
        }
        let body: Vec<u8> = self.buffer.drain(..head.content_length).collect();
        Ok(Request {
            method: head.method,
            target: head.target,
            body,
            fds: std::mem::take(&mut self.fds),
            close: head.close,
        })
    }

    /// Sends an answer.
    pub fn send(&mut self, response: &Response, close: bool) -> Result<(), HttpError> {
        self.send_raw(&response.encode(close))
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Result<(), HttpError> {
        let _ = self.stream.set_write_timeout(Some(REQUEST_TIMEOUT));
        self.stream.write_all(bytes).map_err(HttpError::Io)
    }

    /// Reads until the buffer holds a whole head; returns where it ends
    /// (after the blank line).
    fn read_head(&mut self) -> Result<usize, HttpError> {
        // Blank lines before a request are allowed (RFC 9112 2.2).
        let idle_deadline = Instant::now() + IDLE_TIMEOUT;
        loop {
            let leading = self
                .buffer
                .iter()
                .take_while(|b| **b == b'\r' || **b == b'\n')
                .count();
            self.buffer.drain(..leading);
            if !self.buffer.is_empty() {
                break;
            }
            self.fill(idle_deadline, false)?;
        }
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            if let Some(at) = find(&self.buffer, b"\r\n\r\n") {
                return Ok(at + 4);
            }
            if self.buffer.len() > MAX_HEAD {
                return Err(HttpError::HeadTooLarge);
            }
            self.fill(deadline, true)?;
        }
    }

    /// One `recvmsg` into the buffer, keeping received descriptors.
    /// `started`: a request is under way (EOF or the deadline is an
    /// error, not a clean close).
    fn fill(&mut self, deadline: Instant, started: bool) -> Result<(), HttpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(if started {
                HttpError::Timeout
            } else {
                HttpError::Idle
            });
        }
        self.stream
            .set_read_timeout(Some(left))
            .map_err(HttpError::Io)?;
        let mut chunk = vec![0u8; READ_CHUNK];
        let mut raw_fds = [-1 as RawFd; MAX_FDS];
        let received = loop {
            let mut iov = [libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            }];
            // SAFETY: the iovec points into `chunk`, which outlives the call
            // and is `iov_len` bytes long; the kernel writes at most that.
            match unsafe { self.stream.recv_with_fds(&mut iov, &mut raw_fds) } {
                Ok(counts) => break counts,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EWOULDBLOCK => {
                    return Err(if started {
                        HttpError::Timeout
                    } else {
                        HttpError::Idle
                    })
                }
                Err(e) if e.errno() == libc::ENOBUFS => return Err(HttpError::TooManyFds),
                Err(e) => return Err(HttpError::Io(std::io::Error::from_raw_os_error(e.errno()))),
            }
        };
        let (bytes, fd_count) = received;
        self.adopt_fds(&raw_fds[..fd_count])?;
        if bytes == 0 {
            return Err(if started || !self.buffer.is_empty() {
                HttpError::Malformed("connection closed in the middle of a request".into())
            } else {
                HttpError::Closed
            });
        }
        self.buffer.extend_from_slice(&chunk[..bytes]);
        Ok(())
    }

    /// Takes ownership of received descriptors (close-on-exec, so no child
    /// inherits them).
    fn adopt_fds(&mut self, raw: &[RawFd]) -> Result<(), HttpError> {
        for &fd in raw {
            // SAFETY: the kernel just installed `fd` in this process for us;
            // nothing else owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: F_SETFD on a descriptor we own changes only its flags.
            unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            self.fds.push(owned);
        }
        if self.fds.len() > MAX_REQUEST_FDS {
            self.fds.clear();
            return Err(HttpError::TooManyFds);
        }
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses a request head (request line and headers, CRLF-terminated).
fn parse_head(bytes: &[u8]) -> Result<Head, HttpError> {
    let malformed = |why: &str| HttpError::Malformed(why.to_string());
    let text = std::str::from_utf8(bytes).map_err(|_| malformed("the head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("expected METHOD TARGET HTTP/1.1"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(malformed("bad method"));
    }
    if !target.starts_with('/') {
        return Err(malformed("the target must be a path"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(malformed("only HTTP/1.0 and HTTP/1.1 are served")),
    };
    let mut head = Head {
        method: method.to_string(),
        target: target.to_string(),
        close: http10,
        ..Head::default()
    };
    let mut length_seen = false;
    for (count, line) in lines.filter(|l| !l.is_empty()).enumerate() {
        if count >= MAX_HEADERS {
            return Err(malformed("too many headers"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| malformed("a header line without ':'"))?;
        if name.is_empty() || name.ends_with(' ') || name.ends_with('\t') {
            return Err(malformed("bad header name"));
        }
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                let length = value
                    .parse::<usize>()
                    .ok()
                    .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| malformed("bad Content-Length"))?;
                if length_seen && length != head.content_length {
                    return Err(malformed("conflicting Content-Length headers"));
                }
                head.content_length = length;
                length_seen = true;
            }
            "transfer-encoding" if !value.eq_ignore_ascii_case("identity") => {
                return Err(HttpError::Chunked)
            }
            "connection" => {
                let value = value.to_ascii_lowercase();
                if value.split(',').any(|t| t.trim() == "close") {
                    head.close = true;
                } else if value.split(',').any(|t| t.trim() == "keep-alive") {
                    head.close = false;
                }
            }
            "expect" => head.expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    fn pair() -> (Connection, UnixStream) {
        let (server, client) = UnixStream::pair().unwrap();
        (Connection::new(server), client)
    }

    #[test]
    fn heads_parse_with_length_and_connection() {
        let head = parse_head(
            b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\ncontent-length: 12\r\n\
              Connection: Close\r\n\r\n",
        )
        .unwrap();
        assert_eq!(head.method, "PUT");
        assert_eq!(head.target, "/api/v1/vm.create");
        assert_eq!((head.content_length, head.close), (12, true));
        let old = parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(old.close, "HTTP/1.0 closes by default");
        let kept = parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(!kept.close);
    }

    #[test]
    fn bad_heads_are_refused_with_a_reason() {
        for (head, why) in [
            (&b"GET\r\n\r\n"[..], "METHOD TARGET"),
            (b"get / HTTP/1.1\r\n\r\n", "method"),
            (b"GET vm.info HTTP/1.1\r\n\r\n", "path"),
            (b"GET / HTTP/2\r\n\r\n", "HTTP/1.0"),
            (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", "':'"),
            (
                b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                "Content-Length",
            ),
            (
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "conflicting",
            ),
            (b"GET / HTTP/1.1\r\n\xff: x\r\n\r\n", "UTF-8"),
        ] {
            let err = parse_head(head).unwrap_err();
            assert!(err.to_string().contains(why), "{head:?}: {err}");
            assert_eq!(err.status(), Some(400));
        }
        let chunked = parse_head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(chunked.unwrap_err().status(), Some(411));
    }

    #[test]
    fn keep_alive_serves_several_requests_on_one_connection() {
        let (mut server, mut client) = pair();
        client
            .write_all(
                b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n\
                  PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}\
                  PUT /api/v1/vm.boot HTTP/1.1\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let first = server.read_request().unwrap();
        assert_eq!((first.method.as_str(), first.close), ("GET", false));
        let second = server.read_request().unwrap();
        assert_eq!(second.target, "/api/v1/vm.create");
        assert_eq!(second.body, b"{}");
        let third = server.read_request().unwrap();
        assert!(third.close && third.body.is_empty());
        drop(client);
        assert!(matches!(server.read_request(), Err(HttpError::Closed)));
    }

    #[test]
    fn a_body_split_over_reads_is_put_together() {
        let (mut server, mut client) = pair();
        let writer = std::thread::spawn(move || {
            client
                .write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234")
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            client.write_all(b"56789").unwrap();
            client
        });
        let request = server.read_request().unwrap();
        assert_eq!(request.body, b"0123456789");
        drop(writer.join().unwrap());
    }

    #[test]
    fn expect_continue_gets_a_100_before_the_body() {
        let (mut server, mut client) = pair();
        client
            .write_all(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
            .unwrap();
        let reader = std::thread::spawn(move || {
            let mut interim = [0u8; 39];
            client.read_exact(&mut interim).unwrap();
            client.write_all(b"abc").unwrap();
            (interim, client)
        });
        let request = server.read_request().unwrap();
        assert_eq!(request.body, b"abc");
        let (interim, _client) = reader.join().unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\nServer: zvmm\r\n\r\n");
    }

    #[test]
    fn oversized_and_truncated_requests_are_errors_not_hangs() {
        let (mut server, mut client) = pair();
        let huge = format!(
            "PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        client.write_all(huge.as_bytes()).unwrap();
        assert_eq!(server.read_request().unwrap_err().status(), Some(413));

        let (mut server, mut client) = pair();
        let long_header = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD + 1));
        client.write_all(long_header.as_bytes()).unwrap();
        assert_eq!(server.read_request().unwrap_err().status(), Some(431));

        let (mut server, mut client) = pair();
        client
            .write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
            .unwrap();
        drop(client);
        let err = server.read_request().unwrap_err();
        assert!(err.to_string().contains("middle"), "{err}");
    }

    #[test]
    fn descriptors_arrive_with_their_request() {
        let (mut server, client) = pair();
        let (tap_like, _other) = UnixStream::pair().unwrap();
        let request = b"PUT /api/v1/vm.add-net HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        client
            .send_with_fd(&request[..], tap_like.as_fd().as_raw_fd())
            .unwrap();
        let plain = b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n";
        client.send_with_fds(&[&plain[..]], &[]).unwrap();
        let with_fd = server.read_request().unwrap();
        assert_eq!(with_fd.fds.len(), 1);
        // SAFETY: F_GETFD only reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(with_fd.fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let without = server.read_request().unwrap();
        assert!(without.fds.is_empty());
    }

    #[test]
    fn responses_carry_json_type_and_length() {
        let ok = Response {
            status: 200,
            body: Some("{\"a\":1}".into()),
        };
        let text = String::from_utf8(ok.encode(false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("Content-Type: application/json\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with("Content-Length: 7\r\n\r\n{\"a\":1}"),
            "{text}"
        );
        let none = Response {
            status: 204,
            body: None,
        };
        let text = String::from_utf8(none.encode(true)).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 204 No Content\r\nServer: zvmm\r\nConnection: close\r\n\r\n"
        );
    }
}
