//! The host side of hybrid vsock: the Unix socket zvmm listens on (its
//! hygiene: the parent directory must exist, a stale socket is replaced,
//! a live one or any other file is refused, mode 0600, removed when the
//! device goes), the `CONNECT <port>\n` line a host client sends first,
//! and connecting to `PATH_<port>` for a guest-initiated connection
//! without ever blocking.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Longest `CONNECT` line read (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_CONNECT_LINE: usize = 32;
/// Longest socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The listening socket cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The directory the socket would go in is missing.
    #[error("the directory {0} does not exist")]
    NoParent(PathBuf),
    /// A file that is not a socket is in the way.
    #[error("the path exists and is not a socket; zvmm replaces only a stale socket")]
    NotASocket,
    /// A live process answers on the socket.
    #[error("another process is listening on this socket")]
    InUse,
    /// The path does not fit a Unix socket address.
    #[error("the path is {0} bytes; a Unix socket path has at most 107")]
    TooLong(usize),
    /// A system call failed.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> SocketError {
    move |source| SocketError::Io { what, source }
}

/// The socket host clients connect to, removed when dropped (if it is
/// still the one zvmm bound).
#[derive(Debug)]
pub struct HostSocket {
    path: PathBuf,
    identity: (u64, u64),
    listener: UnixListener,
}

impl HostSocket {
    /// Binds `path` (non-blocking, mode 0600).
    pub fn bind(path: &Path) -> Result<HostSocket, SocketError> {
        let length = path.as_os_str().len();
        if length > MAX_SOCKET_PATH {
            return Err(SocketError::TooLong(length));
        }
        let parent = match path.parent() {
            Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
            Some(parent) => parent,
            None => Path::new("/"),
        };
        if !parent.is_dir() {
            return Err(SocketError::NoParent(parent.to_path_buf()));
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(SocketError::InUse);
                }
                std::fs::remove_file(path).map_err(io_error("remove the stale socket"))?;
                // A zvmm killed with SIGKILL cannot remove its socket.
                eprintln!(
                    "zvmm: removed stale vsock socket {} (no process listening)",
                    path.display()
                );
            }
            Ok(_) => return Err(SocketError::NotASocket),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("inspect the path")(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_error("bind the socket"))?;
        let meta = std::fs::symlink_metadata(path).map_err(io_error("inspect the socket"))?;
        let socket = HostSocket {
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
            listener,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_error("set mode 0600"))?;
        socket
            .listener
            .set_nonblocking(true)
            .map_err(io_error("make the socket non-blocking"))?;
        Ok(socket)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listener.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }
}

impl Drop for HostSocket {
    fn drop(&mut self) {
        // Someone else's file now at the path (or none) is left alone.
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.identity)
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a host client's first line asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectLine {
    /// Not complete yet.
    Incomplete,
    /// `CONNECT <port>`.
    Port(u32),
    /// Anything else, or the client went away.
    Bad,
}

/// A host client that has not sent its whole `CONNECT` line yet.
#[derive(Debug)]
pub struct PendingHost {
    /// The accepted stream, non-blocking.
    pub stream: UnixStream,
    /// When it is given up.
    pub deadline: Instant,
    line: Vec<u8>,
}

impl PendingHost {
    /// A client accepted now, to be given up at `deadline`.
    pub fn new(stream: UnixStream, deadline: Instant) -> PendingHost {
        PendingHost {
            stream,
            deadline,
            line: Vec::with_capacity(MAX_CONNECT_LINE),
        }
    }

    /// Reads what the client sent of its line, never past the newline
    /// (bytes after it are the connection's first data).
    pub fn read_line(&mut self) -> ConnectLine {
        let mut peeked = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - self.line.len();
        // SAFETY: recv writes at most `room` (≤ the buffer's length) bytes
        // into `peeked`, which lives across the call; the fd is open.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                peeked.as_mut_ptr().cast(),
                room,
                libc::MSG_PEEK,
            )
        };
        let n = match n {
            0 => return ConnectLine::Bad,
            n if n < 0 => {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {
                        ConnectLine::Incomplete
                    }
                    _ => ConnectLine::Bad,
                };
            }
            // At most `room`.
            n => n as usize,
        };
        let newline = peeked[..n].iter().position(|b| *b == b'\n');
        let take = newline.map_or(n, |at| at + 1);
        let mut consumed = vec![0u8; take];
        if self.stream.read_exact(&mut consumed).is_err() {
            return ConnectLine::Bad;
        }
        self.line.extend_from_slice(&consumed);
        match newline {
            Some(_) => parse_connect(&self.line),
            None if self.line.len() >= MAX_CONNECT_LINE => ConnectLine::Bad,
            None => ConnectLine::Incomplete,
        }
    }
}

/// Parses `CONNECT <port>\n` (also lower case, and with `\r\n`).
pub fn parse_connect(line: &[u8]) -> ConnectLine {
    let Ok(text) = std::str::from_utf8(line) else {
        return ConnectLine::Bad;
    };
    let Some(rest) = text
        .strip_prefix("CONNECT ")
        .or_else(|| text.strip_prefix("connect "))
    else {
        return ConnectLine::Bad;
    };
    match rest.trim_end_matches(['\n', '\r']).trim().parse() {
        Ok(port) => ConnectLine::Port(port),
        Err(_) => ConnectLine::Bad,
    }
}

/// Connects to the Unix socket `path` without blocking: a listener whose
/// backlog is full refuses instead of making the caller wait.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, from) in address.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    let kind = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let length = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `address` is a valid sockaddr_un of `length` bytes that
    // outlives the call; the fd is open.
    let ret = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_un).cast(),
            length,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempdir::TempDir;

    fn dir() -> TempDir {
        TempDir::new_with_prefix("/tmp/zvmm-vsock-").unwrap()
    }

    #[test]
    fn connect_lines_parse() {
        assert_eq!(parse_connect(b"CONNECT 1024\n"), ConnectLine::Port(1024));
        assert_eq!(parse_connect(b"connect 52\r\n"), ConnectLine::Port(52));
        assert_eq!(
            parse_connect(b"CONNECT 4294967295\n"),
            ConnectLine::Port(u32::MAX)
        );
        for bad in [
            &b"CONNECT\n"[..],
            b"CONNECT 4294967296\n",
            b"CONNECT -1\n",
            b"LISTEN 5\n",
            b"CONNECT 1 2\n",
            b"\xff\xfe\n",
        ] {
            assert_eq!(parse_connect(bad), ConnectLine::Bad, "{bad:?}");
        }
    }

    #[test]
    fn the_line_is_read_up_to_its_newline_only() {
        let (mut client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut pending = PendingHost::new(server, Instant::now());
        assert_eq!(pending.read_line(), ConnectLine::Incomplete);
        client.write_all(b"CONN").unwrap();
        assert_eq!(pending.read_line(), ConnectLine::Incomplete);
        client.write_all(b"ECT 7\nhello").unwrap();
        assert_eq!(pending.read_line(), ConnectLine::Port(7));
        let mut rest = [0u8; 5];
        pending.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[test]
    fn an_endless_or_abandoned_line_is_bad() {
        let (mut client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut pending = PendingHost::new(server, Instant::now());
        client.write_all(&[b'x'; MAX_CONNECT_LINE]).unwrap();
        assert_eq!(pending.read_line(), ConnectLine::Bad);
        let (client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut pending = PendingHost::new(server, Instant::now());
        drop(client);
        assert_eq!(pending.read_line(), ConnectLine::Bad);
    }

    #[test]
    fn the_socket_gets_mode_0600_and_goes_away_with_the_device() {
        let dir = dir();
        let path = dir.as_path().join("v.sock");
        let socket = HostSocket::bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        drop(socket);
        assert!(!path.exists());
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_and_files_refused() {
        let dir = dir();
        let path = dir.as_path().join("v.sock");
        drop(UnixListener::bind(&path).unwrap());
        let socket = HostSocket::bind(&path).expect("a stale socket is replaced");
        let err = HostSocket::bind(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            "another process is listening on this socket"
        );
        drop(socket);
        let file = dir.as_path().join("notes.txt");
        std::fs::write(&file, b"keep me").unwrap();
        let err = HostSocket::bind(&file).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let err = HostSocket::bind(&dir.as_path().join("no/such/v.sock")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let long = dir.as_path().join("x".repeat(120));
        assert!(matches!(
            HostSocket::bind(&long),
            Err(SocketError::TooLong(_))
        ));
    }

    #[test]
    fn a_replaced_socket_file_is_not_removed() {
        let dir = dir();
        let path = dir.as_path().join("v.sock");
        let socket = HostSocket::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(socket);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }

    #[test]
    fn nonblocking_connect_reaches_listeners_and_refuses_the_rest() {
        let dir = dir();
        let path = dir.as_path().join("v.sock_1024");
        let listener = UnixListener::bind(&path).unwrap();
        let mut stream = connect_nonblocking(&path).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        stream.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        let missing = connect_nonblocking(&dir.as_path().join("v.sock_1")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let long = dir.as_path().join("y".repeat(120));
        assert!(connect_nonblocking(&long).is_err());
    }
}
