//! `hivemind --healthcheck`: asks a running server's `GET /healthcheck` and turns the answer into
//! an exit code, for container `HEALTHCHECK`s and Kubernetes `exec` probes.
//!
//! The admin port listens on loopback by default, so a probe from outside the container (an
//! `httpGet` probe from the kubelet) cannot reach it; a probe run inside the container can, and
//! the runtime image has no `curl`. One HTTP/1.0 request on a plain socket, bounded in time and in
//! the bytes read, with no runtime to start.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// The most of the answer the probe reads: the status line and a few health lines.
const MAX_ANSWER_BYTES: u64 = 16 * 1024;

/// What the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeAnswer {
    /// The HTTP status: 200 while serving (or degraded), 503 when down or shutting down.
    pub status: u16,
    /// The body: `OK`, `OK (degraded)`, `DOWN` or `shutting down`, then the strategy's lines.
    pub body: String,
}

impl ProbeAnswer {
    /// The server can decide requests.
    pub fn serving(&self) -> bool {
        self.status == 200
    }
}

/// The address to probe for a server bound to `admin`: an unspecified bind address
/// (`0.0.0.0`, `::`) is reached on the loopback of the same family.
pub fn probe_target(admin: SocketAddr) -> SocketAddr {
    let ip = match admin.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, admin.port())
}

/// Asks `GET /healthcheck` at `admin`, giving up after `timeout` per step (connect, write, read).
pub fn healthcheck(admin: SocketAddr, timeout: Duration) -> io::Result<ProbeAnswer> {
    let target = probe_target(admin);
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /healthcheck HTTP/1.0\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.take(MAX_ANSWER_BYTES).read_to_end(&mut answer)?;
    parse_answer(&answer)
}

/// The status and body of an HTTP/1.x answer.
fn parse_answer(answer: &[u8]) -> io::Result<ProbeAnswer> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid("no end of headers in the answer"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(invalid("not an HTTP/1 answer"));
    }
    let status = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("no status code in the answer"))?;
    Ok(ProbeAnswer {
        status,
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_bind_addresses_are_probed_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(probe_target(v4), "127.0.0.1:8080".parse().unwrap());
        let v6: SocketAddr = "[::]:8080".parse().unwrap();
        assert_eq!(probe_target(v6), "[::1]:8080".parse().unwrap());
        let named: SocketAddr = "10.1.2.3:9000".parse().unwrap();
        assert_eq!(probe_target(named), named);
    }

    #[test]
    fn answers_are_read_by_status_and_malformed_ones_are_errors() {
        let ok = parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nOK\n").unwrap();
        assert!(ok.serving());
        assert_eq!(ok.body, "OK\n");
        let down = parse_answer(b"HTTP/1.0 503 Service Unavailable\r\n\r\nDOWN\n").unwrap();
        assert!(!down.serving());
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_answer(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse_answer(b"").is_err());
    }
}
