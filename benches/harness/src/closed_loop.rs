//! The max-throughput phase's client: closed-loop `ShouldRateLimit` calls over the `h2` crate
//! directly, about as light per call as `h2load`.
//!
//! The paced phases use tonic ([`crate::workload`]), which per call encodes the request, boxes a
//! body, runs tower layers and decodes the whole response; on a 2-core machine shared with the
//! server, that client CPU is taken from the server and the maximum-throughput figure measured
//! the client as much as the server. This client does what `h2load` does in
//! `benches/rls_throughput.sh`: each request is encoded once per key up front (one gRPC frame,
//! cloned per call without copying), `connections × in_flight` HTTP/2 streams are kept busy,
//! and of each answer only the gRPC status and the response's `overall_code` are read. Every
//! call still counts as admitted, over the limit or an error of its kind, and its round trip
//! goes into a per-stream histogram: no per-call allocation of ours, no shared lock.
//!
//! The answer is not trusted: the gRPC frame is checked (no compression, a length that fits
//! what arrived, at most [`MAX_RESPONSE_BYTES`]), the protobuf is walked field by field with
//! bounded varints, and anything undecodable is an [`ErrorKind::Undecided`] answer, never a
//! panic. Every stream loop is bounded by the deadline and by a count, every call by the call
//! timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use hivemind::proto::{Code, RateLimitRequest};
use http::{HeaderMap, HeaderValue, Request, Uri};
use prost::Message;

use crate::keys::KeyDist;
use crate::truth::ErrorKind;

/// The largest response body read; a larger one is an undecodable answer. A
/// `RateLimitResponse` for one descriptor is a few dozen bytes.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The gRPC method every call goes to.
const PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// What can stop the closed-loop load from starting.
#[derive(Debug, thiserror::Error)]
pub enum ClosedLoopError {
    /// The load makes no sense (no targets, no streams).
    #[error("invalid closed-loop load: {0}")]
    Invalid(String),
    /// A connection could not be opened or its HTTP/2 handshake failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The target.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// Connecting took longer than the connect timeout.
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
    /// A stream task panicked.
    #[error("a client task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The closed-loop load to offer.
#[derive(Debug, Clone)]
pub struct ClosedLoop {
    /// One request per key, indexed by key (see [`crate::Workload::keys`]).
    pub requests: Vec<RateLimitRequest>,
    /// Which key each call carries; `None`: always request 0.
    pub keys: Option<KeyDist>,
    /// HTTP/2 connections per target, as h2load's `-c` (per target).
    pub connections_per_target: usize,
    /// Calls in flight per connection (HTTP/2 streams), as h2load's `-m`.
    pub in_flight: usize,
    /// How long to offer load, from the common start.
    pub duration: Duration,
    /// Bound on the calls of each stream loop, besides the deadline.
    pub max_calls_per_stream: u64,
    /// Per-call bound; a call that takes longer is a timeout error.
    pub request_timeout: Duration,
    /// Bound on connecting each connection before the load starts.
    pub connect_timeout: Duration,
    /// Seed of the key draws (one generator per stream).
    pub seed: u64,
}

/// What a closed-loop run counted, over all streams.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Calls answered `OK`.
    pub admitted: u64,
    /// Calls answered `OVER_LIMIT`.
    pub rejected: u64,
    /// Calls without a decision, by kind (in [`ErrorKind`] order: timeout, unavailable,
    /// status, undecided).
    pub errors: [u64; 4],
    /// Round trips of the decided calls, µs.
    pub latency_us: Histogram<u64>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            admitted: 0,
            rejected: 0,
            errors: [0; 4],
            latency_us: crate::report::latency_histogram(),
        }
    }

    /// Calls answered `OK` or `OVER_LIMIT`.
    pub fn decided(&self) -> u64 {
        self.admitted + self.rejected
    }

    /// Calls without a decision.
    pub fn error_total(&self) -> u64 {
        self.errors.iter().sum()
    }

    fn error(&mut self, kind: ErrorKind) {
        let slot = match kind {
            ErrorKind::Timeout => 0,
            ErrorKind::Unavailable => 1,
            ErrorKind::Status => 2,
            ErrorKind::Undecided => 3,
        };
        self.errors[slot] += 1;
    }

    fn merge(&mut self, other: &Tally) {
        self.admitted += other.admitted;
        self.rejected += other.rejected;
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        // Same bounds on both sides (one constructor): adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
    }
}

/// One gRPC message frame: flag 0 (not compressed), big-endian length, the encoded request.
pub fn grpc_frame(request: &RateLimitRequest) -> Bytes {
    let len = request.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    // Encoding into a buffer with the exact capacity reserved cannot run out of room.
    let _ = request.encode(&mut out);
    out.freeze()
}

/// The `overall_code` of a gRPC-framed `RateLimitResponse`, read without decoding the rest:
/// `None` for anything that is not exactly one uncompressed frame holding a well-formed
/// message. A message without the field has code 0 (`UNKNOWN`), as protobuf defaults it.
pub fn overall_code(body: &[u8]) -> Option<i32> {
    let (&flag, rest) = body.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let (len, message) = rest.split_at(4);
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len != message.len() || len > MAX_RESPONSE_BYTES {
        return None;
    }
    let mut code = 0;
    let mut at = message;
    while !at.is_empty() {
        let key = varint(&mut at)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let value = varint(&mut at)?;
                if field == 1 {
                    // An out-of-range enum value stays out of range (and so undecided).
                    code = i32::try_from(value).unwrap_or(-1);
                }
            }
            1 => at = at.get(8..)?,
            2 => {
                let n = usize::try_from(varint(&mut at)?).ok()?;
                at = at.get(n..)?;
            }
            5 => at = at.get(4..)?,
            _ => return None,
        }
        if field == 0 {
            return None;
        }
    }
    Some(code)
}

/// Reads one protobuf varint (at most 10 bytes) off the front of `at`.
fn varint(at: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &byte) in at.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *at = &at[i + 1..];
            return Some(value);
        }
    }
    None
}

/// The kind of a gRPC status other than 0 (`grpc-status` header or trailer).
fn status_kind(code: &[u8]) -> ErrorKind {
    match code {
        b"14" => ErrorKind::Unavailable,
        b"4" | b"1" => ErrorKind::Timeout,
        _ => ErrorKind::Status,
    }
}

/// The gRPC status in `headers`: `None` when absent, `Some(Ok)` for 0, else the error kind.
fn grpc_status(headers: &HeaderMap) -> Option<Result<(), ErrorKind>> {
    let status = headers.get("grpc-status")?.as_bytes();
    Some(if status == b"0" {
        Ok(())
    } else {
        Err(status_kind(status))
    })
}

/// Offers `load` to `targets` (gRPC addresses) as fast as they answer; what was counted.
///
/// The client runs on one thread of its own (a current-thread runtime), as `h2load -t 1` in
/// `benches/rls_throughput.sh` does: every stream and connection of the load then shares one
/// thread, without cross-thread wake-ups or contention on `h2`'s per-connection lock, and the
/// rest of the cores are left to the servers. Every connection is open before the clock
/// starts; the load then runs for `load.duration`.
pub async fn run(load: &ClosedLoop, targets: &[SocketAddr]) -> Result<Tally, ClosedLoopError> {
    let (load, targets) = (load.clone(), targets.to_vec());
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClosedLoopError::Invalid(format!("no client runtime: {e}")))?
            .block_on(run_here(&load, &targets))
    })
    .await?
}

/// [`run`] on the current runtime.
async fn run_here(load: &ClosedLoop, targets: &[SocketAddr]) -> Result<Tally, ClosedLoopError> {
    if targets.is_empty() || load.requests.is_empty() {
        return Err(ClosedLoopError::Invalid("no targets or no requests".into()));
    }
    if load.connections_per_target == 0 || !(1..=1_000).contains(&load.in_flight) {
        return Err(ClosedLoopError::Invalid(
            "connections ≥ 1 and in-flight between 1 and 1,000".into(),
        ));
    }
    let frames: std::sync::Arc<[Bytes]> = load.requests.iter().map(grpc_frame).collect();
    let mut connections = Vec::new();
    for &addr in targets {
        for _ in 0..load.connections_per_target {
            connections.push((addr, connect(addr, load.connect_timeout).await?));
        }
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let deadline = start + load.duration;
    let mut tasks = Vec::new();
    for (addr, (sender, _)) in &connections {
        let uri: Uri =
            format!("http://{addr}{PATH}")
                .parse()
                .map_err(|e: http::uri::InvalidUri| ClosedLoopError::Connect {
                    addr: *addr,
                    reason: e.to_string(),
                })?;
        for _ in 0..load.in_flight {
            let stream = Stream {
                sender: sender.clone(),
                uri: uri.clone(),
                frames: frames.clone(),
                keys: load.keys.clone(),
                rng: fastrand::Rng::with_seed(load.seed.wrapping_add(tasks.len() as u64)),
                request_timeout: load.request_timeout,
                max_calls: load.max_calls_per_stream,
            };
            tasks.push(tokio::spawn(stream.run(start, deadline)));
        }
    }
    let mut tally = Tally::new();
    for task in tasks {
        tally.merge(&task.await?);
    }
    for (_, (_, driver)) in connections {
        driver.abort();
    }
    Ok(tally)
}

/// An open connection: the stream opener and the task driving the connection (aborted when
/// the load is done).
type Connection = (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>);

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Connection, ClosedLoopError> {
    let failed = |e: &dyn std::fmt::Display| ClosedLoopError::Connect {
        addr,
        reason: e.to_string(),
    };
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| failed(&e))?;
        tcp.set_nodelay(true).map_err(|e| failed(&e))?;
        let (sender, connection) = h2::client::handshake(tcp).await.map_err(|e| failed(&e))?;
        // Ends with the connection (the server closed it, or the driver was aborted); its
        // error, if any, shows up as failed calls.
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let sender = sender.ready().await.map_err(|e| failed(&e))?;
        Ok((sender, driver))
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| ClosedLoopError::ConnectTimeout(addr))?
}

/// One call in flight on one connection, over and over.
struct Stream {
    /// Opens the stream of each call on the shared connection.
    sender: h2::client::SendRequest<Bytes>,
    /// Where every call goes.
    uri: Uri,
    /// The pre-encoded request frame per key.
    frames: std::sync::Arc<[Bytes]>,
    /// Which key each call carries; `None`: always frame 0.
    keys: Option<KeyDist>,
    /// This stream's own seeded generator for the key draws.
    rng: fastrand::Rng,
    /// Per-call bound.
    request_timeout: Duration,
    /// Bound on this stream's calls, besides the deadline.
    max_calls: u64,
}

impl Stream {
    async fn run(mut self, start: tokio::time::Instant, deadline: tokio::time::Instant) -> Tally {
        let mut tally = Tally::new();
        tokio::time::sleep_until(start).await;
        // Holds a response body that came in several DATA frames (rare); reused.
        let mut scratch = Vec::new();
        for _ in 0..self.max_calls {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let key = self.keys.as_ref().map_or(0, |d| d.sample(&mut self.rng));
            let Some(frame) = self.frames.get(key as usize).cloned() else {
                break;
            };
            let sent = Instant::now();
            let call = tokio::time::timeout(self.request_timeout, self.call(frame, &mut scratch));
            match call.await {
                Ok(Ok(code)) => {
                    match Code::try_from(code) {
                        Ok(Code::Ok) => tally.admitted += 1,
                        Ok(Code::OverLimit) => tally.rejected += 1,
                        _ => {
                            tally.error(ErrorKind::Undecided);
                            continue;
                        }
                    }
                    let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                    tally.latency_us.saturating_record(us.max(1));
                }
                Ok(Err(kind)) => tally.error(kind),
                Err(_) => tally.error(ErrorKind::Timeout),
            }
        }
        tally
    }

    /// One call: the response's `overall_code`, or the kind of error it ended in.
    async fn call(&mut self, frame: Bytes, scratch: &mut Vec<u8>) -> Result<i32, ErrorKind> {
        let mut request = Request::post(self.uri.clone());
        if let Some(headers) = request.headers_mut() {
            headers.insert("content-type", HeaderValue::from_static("application/grpc"));
            headers.insert("te", HeaderValue::from_static("trailers"));
        }
        let request = request.body(()).map_err(|_| ErrorKind::Status)?;
        // A refused or closed connection: the node is not there (any more).
        let mut sender = self
            .sender
            .clone()
            .ready()
            .await
            .map_err(|_| ErrorKind::Unavailable)?;
        let (response, mut body) = sender
            .send_request(request, false)
            .map_err(|_| ErrorKind::Unavailable)?;
        body.send_data(frame, true)
            .map_err(|_| ErrorKind::Unavailable)?;
        let response = response.await.map_err(|_| ErrorKind::Unavailable)?;
        if response.status() != http::StatusCode::OK {
            return Err(ErrorKind::Status);
        }
        // Trailers-only: the status is in the headers and there is no body.
        if let Some(status) = grpc_status(response.headers()) {
            status?;
            return Err(ErrorKind::Undecided);
        }
        let mut body = response.into_body();
        let mut first: Option<Bytes> = None;
        scratch.clear();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|_| ErrorKind::Unavailable)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            match &first {
                None if scratch.is_empty() => first = Some(chunk),
                _ => {
                    if let Some(head) = first.take() {
                        scratch.extend_from_slice(&head);
                    }
                    if scratch.len() + chunk.len() > MAX_RESPONSE_BYTES + 5 {
                        return Err(ErrorKind::Undecided);
                    }
                    scratch.extend_from_slice(&chunk);
                }
            }
        }
        let trailers = body.trailers().await.map_err(|_| ErrorKind::Unavailable)?;
        match trailers.as_ref().and_then(grpc_status) {
            Some(Ok(())) => {}
            Some(Err(kind)) => return Err(kind),
            None => return Err(ErrorKind::Undecided),
        }
        let message = first.as_deref().unwrap_or(scratch);
        overall_code(message).ok_or(ErrorKind::Undecided)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivemind::proto::RateLimitResponse;

    fn framed(response: &RateLimitResponse) -> Vec<u8> {
        let message = response.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(&message);
        out
    }

    #[test]
    fn the_overall_code_of_a_real_response_is_read() {
        for code in [Code::Ok, Code::OverLimit, Code::Unknown] {
            let mut response = RateLimitResponse {
                overall_code: code as i32,
                ..RateLimitResponse::default()
            };
            response.statuses.push(hivemind::proto::DescriptorStatus {
                code: Code::OverLimit as i32,
                limit_remaining: 7,
                ..Default::default()
            });
            response.raw_body = b"later fields are skipped".to_vec();
            assert_eq!(overall_code(&framed(&response)), Some(code as i32));
        }
    }

    #[test]
    fn malformed_responses_are_undecodable_not_panics() {
        let good = framed(&RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..RateLimitResponse::default()
        });
        assert_eq!(overall_code(&good), Some(1));
        // Truncated anywhere, or a byte too many: the length no longer fits.
        for cut in 0..good.len() {
            assert_eq!(overall_code(&good[..cut]), None, "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(overall_code(&long), None);
        // Compressed flag, a length beyond the bound, an unterminated varint, one longer than
        // 10 bytes, a length-
        // delimited field running past the end, a group wire type, field number 0.
        let mut compressed = good.clone();
        compressed[0] = 1;
        assert_eq!(overall_code(&compressed), None);
        let mut huge = vec![0, 0xff, 0xff, 0xff, 0xff];
        huge.extend(std::iter::repeat_n(0u8, 64));
        assert_eq!(overall_code(&huge), None);
        let frame = |message: &[u8]| {
            let mut out = vec![0];
            out.extend_from_slice(&(message.len() as u32).to_be_bytes());
            out.extend_from_slice(message);
            out
        };
        assert_eq!(overall_code(&frame(&[0x08, 0x80, 0x80])), None);
        let mut overlong = vec![0x08];
        overlong.extend([0xff; 10]);
        overlong.push(0x01);
        assert_eq!(overall_code(&frame(&overlong)), None);
        assert_eq!(overall_code(&frame(&[0x12, 0x05, 1, 2])), None);
        assert_eq!(overall_code(&frame(&[0x0b, 0x00])), None);
        assert_eq!(overall_code(&frame(&[0x00, 0x01])), None);
        // An out-of-range code is read as such and decides nothing.
        let odd = frame(&[0x08, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(Code::try_from(overall_code(&odd).unwrap()).is_err());
        // An empty message: the default code, UNKNOWN.
        assert_eq!(overall_code(&frame(&[])), Some(0));
    }

    #[test]
    fn the_request_frame_is_the_grpc_framed_message() {
        let request = crate::Workload::new(
            "bench",
            vec![("generic_key".into(), "bench".into())],
            1.0,
            Duration::from_secs(1),
        )
        .request();
        let frame = grpc_frame(&request);
        assert_eq!(frame[0], 0);
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(len, frame.len() - 5);
        assert_eq!(RateLimitRequest::decode(&frame[5..]).unwrap(), request);
    }

    #[test]
    fn grpc_status_kinds() {
        let mut headers = HeaderMap::new();
        assert!(grpc_status(&headers).is_none());
        headers.insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(grpc_status(&headers), Some(Ok(())));
        for (code, kind) in [
            ("14", ErrorKind::Unavailable),
            ("4", ErrorKind::Timeout),
            ("13", ErrorKind::Status),
        ] {
            headers.insert("grpc-status", HeaderValue::from_static(code));
            assert_eq!(grpc_status(&headers), Some(Err(kind)));
        }
    }
}
