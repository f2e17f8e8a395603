//! The one admin client of the tests and the harness: an HTTP/1.1 request over a fresh loopback
//! connection (`Connection: close`), the whole exchange bounded in time and size.
//!
//! Blocking std code, so it works from `#[test]` and from inside a tokio runtime alike (the
//! async [`get`] runs it on tokio's blocking pool). Deliberately minimal: it saves the tests and
//! the harness an HTTP client dependency, and decodes the two body framings the admin endpoints
//! and Envoy send (`Content-Length` up to close, and `Transfer-Encoding: chunked`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The largest response read; admin answers are far smaller, so more means something is wrong.
pub const MAX_RESPONSE: u64 = 8 << 20;

/// One answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names lower-cased, in order, for tests that check response headers.
    pub headers: Vec<(String, String)>,
    /// The body (dechunked), lossily decoded as UTF-8.
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path`, bounded by `timeout`.
pub fn get_blocking(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<HttpResponse> {
    request(addr, "GET", path, &[], b"", timeout)
}

/// `GET path` from async code, bounded by `timeout`: returns the status and the body.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let path = path.to_owned();
    let answer = tokio::task::spawn_blocking(move || get_blocking(addr, &path, timeout))
        .await
        .map_err(io::Error::other)??;
    Ok((answer.status, answer.body))
}

/// One request with extra `headers` and `body`, the whole exchange (connect, write, read)
/// bounded by `timeout`.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer in {timeout:?}"),
            ))
        } else {
            Ok(left)
        }
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()?)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.set_write_timeout(Some(left()?))?;
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;

    let mut raw = Vec::new();
    let mut limited = (&mut stream).take(MAX_RESPONSE);
    let mut buf = [0u8; 16 * 1024];
    loop {
        limited.get_ref().set_read_timeout(Some(left()?))?;
        match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    parse_response(&raw)
}

/// Splits a whole response into status, headers and (dechunked) body.
fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad HTTP response: {what}"),
        )
    };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body).ok_or_else(|| bad("chunked body"))?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Decodes a `Transfer-Encoding: chunked` body; `None` if it is malformed or cut short.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size.checked_add(2)?..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot loopback server that answers `response` and hands back the request it read.
    fn serve_once(response: &'static [u8]) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "client closed before its request ended");
                request.extend_from_slice(&buf[..n]);
            }
            conn.write_all(response).unwrap();
            String::from_utf8(request).unwrap()
        });
        (addr, server)
    }

    #[test]
    fn a_chunked_answer_is_decoded_and_headers_are_sent_and_read() {
        let (addr, server) = serve_once(
            b"HTTP/1.1 429 Too Many Requests\r\nX-RateLimit-Limit: 5\r\n\
              Transfer-Encoding: chunked\r\n\r\n3\r\nove\r\n6;x=y\r\nrshoot\r\n0\r\n\r\n",
        );
        let r = request(
            addr,
            "GET",
            "/limited",
            &[("x-api-key", "k1")],
            b"",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
        assert_eq!(r.body, "overshoot");
        let sent = server.join().unwrap();
        assert!(sent.starts_with("GET /limited HTTP/1.1\r\n"), "{sent}");
        assert!(sent.contains("\r\nx-api-key: k1\r\n"), "{sent}");
    }

    #[tokio::test]
    async fn the_async_get_returns_status_and_body() {
        let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nOK\n");
        let (status, body) = get(addr, "/healthcheck", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "OK\n"));
        server.join().unwrap();
    }

    #[test]
    fn a_silent_server_times_out_within_the_bound() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted by the kernel's backlog, never answered.
        let err = get_blocking(addr, "/", Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            "{err}"
        );
        drop(listener);
    }

    #[test]
    fn malformed_answers_are_errors() {
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }
}
