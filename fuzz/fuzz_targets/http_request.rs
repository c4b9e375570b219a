//! The REST server's request path: the input is the byte stream a client
//! sends on the API socket (any number of pipelined HTTP/1.1 requests),
//! read request by request as a connection does, each routed to the
//! endpoint it names and answered, until the stream ends or must close.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vmm::api::http::{Connection, Response};
use vmm::api::routes::{route, Method};
use zvmm_fuzz::api::ConfigOnly;

/// At most this many requests per input (answers are drained between).
const MAX_REQUESTS: usize = 32;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(64 << 10)];
    let (server, mut client) = UnixStream::pair().expect("socket pair");
    client
        .write_all(data)
        .expect("the input fits the socket buffer");
    client.shutdown(Shutdown::Write).expect("shutdown");
    client.set_nonblocking(true).expect("non-blocking");
    let backend = ConfigOnly::default();
    let mut connection = Connection::new(server);
    for _ in 0..MAX_REQUESTS {
        let Ok(request) = connection.read_request() else {
            break;
        };
        let answer = route(
            &backend,
            Method::parse(&request.method),
            &request.target,
            &request.body,
            request.fds,
        );
        let response = Response {
            status: answer.status,
            body: (!answer.body.is_empty()).then_some(answer.body),
        };
        let close = request.close || answer.exit_after;
        if connection.send(&response, close).is_err() || close {
            break;
        }
        let mut sink = [0u8; 4096];
        while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
    }
});
