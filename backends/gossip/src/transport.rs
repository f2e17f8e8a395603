//! The UDP transport hivemind's gossip mesh always uses: [`MeshTransport`], a
//! [`chitchat::transport::Transport`] over a socket the server has already bound.
//!
//! On top of chitchat's own bytes every datagram carries a small header, and, when a
//! [`MeshSecret`] is configured, a truncated HMAC-SHA256 tag:
//!
//! ```text
//! +-------+------+-----------+---------------------------+-------------------------+
//! | magic | kind | id (BE)   | payload (chitchat bytes)  | tag (only with a secret)|
//! | 1 B   | 1 B  | 4 B       | ...                       | 16 B                    |
//! +-------+------+-----------+---------------------------+-------------------------+
//! ```
//!
//! - `magic`: [`MAGIC_PLAIN`] (`0xA0`) without a secret, [`MAGIC_AUTH`] (`0xA1`) with one, so
//!   a node with a secret and a node without one reject each other's datagrams instead of
//!   half-understanding them.
//! - `kind`: 0 = a whole message, 1 = first half of a split message, 2 = second half.
//! - `id`: per-message number (a counter seeded from the clock), shared by both halves of a
//!   split message so the receiver can pair them.
//! - `tag`: the first 16 bytes of HMAC-SHA256(key, everything before the tag), where the key
//!   is SHA-256 of the configured secret. Checked in constant time.
//!
//! chitchat fills its messages up to 65,507 bytes (the largest IPv4 UDP payload), so the header
//! and tag can push a full-size message over the limit. Such a message goes out as two
//! datagrams and is reassembled on receipt (at most [`MAX_PENDING_HALVES`] halves waiting, each
//! for at most [`HALF_TTL`]).
//!
//! Datagrams that are malformed, unauthenticated, or from a link cut with [`LinkControl`] are
//! dropped and counted in [`TransportStats`]; chitchat only ever sees an error when the socket
//! itself fails.
//!
//! chitchat 0.13 keeps the (de)serialization of [`ChitchatEnvelope`] crate-private: the only
//! public code that turns an envelope into bytes and back is its own UDP socket. So each mesh
//! socket owns a private loopback pair (a `chitchat::transport::UdpSocket` and a plain "tap"
//! socket, both on 127.0.0.1) and uses it as the codec: chitchat serializes by sending to the
//! tap, and deserializes what the tap sends it (see `LoopbackCodec` below).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};
use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

/// The largest UDP payload over IPv4, and the largest message chitchat builds.
pub const MAX_DATAGRAM_LEN: usize = 65_507;

/// First byte of a datagram sent without a secret (wire format version 1, no tag).
pub const MAGIC_PLAIN: u8 = 0xA0;

/// First byte of a datagram sent with a secret (wire format version 1, 16-byte tag at the end).
pub const MAGIC_AUTH: u8 = 0xA1;

/// Bytes before the payload: magic (1) + kind (1) + message id (4).
pub const HEADER_LEN: usize = 6;

/// Bytes of the truncated HMAC-SHA256 tag appended when a secret is set.
pub const TAG_LEN: usize = 16;

/// Most split-message halves kept waiting for their other half (about 2 MiB at worst).
pub const MAX_PENDING_HALVES: usize = 64;

/// How long a split-message half waits for its other half before it is dropped.
pub const HALF_TTL: Duration = Duration::from_secs(2);

/// Rejections of one kind are logged for the first one and then every this many.
const LOG_EVERY: u64 = 1_000;

/// How long the loopback codec may take to (de)serialize one message before giving up on it.
const CODEC_TIMEOUT: Duration = Duration::from_millis(500);

/// Receive buffer size: any UDP datagram fits (IPv6 allows a few bytes more than IPv4).
const RECV_BUF_LEN: usize = 65_536;

/// Prefix of the cluster id of the marker message that closes a loopback decode round.
const SENTINEL_PREFIX: &str = "hivemind.mesh-transport.codec-sentinel.";

/// Width of the hex round number that follows [`SENTINEL_PREFIX`].
const SENTINEL_NONCE_HEX_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// Errors building a [`MeshSecret`] or framing a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportError {
    /// The configured secret is empty or only whitespace.
    #[error("the gossip mesh secret must not be empty")]
    EmptySecret,
    /// A message too large to fit even when split into two datagrams.
    #[error("gossip message of {len} bytes exceeds the {max}-byte maximum")]
    MessageTooLarge {
        /// Size of the message that was refused.
        len: usize,
        /// Largest message the framing can carry with the current settings.
        max: usize,
    },
}

/// The shared secret that authenticates the gossip mesh. Every node of a mesh must be given
/// the same one; a node with another secret (or none) cannot talk to it.
///
/// Its `Debug` output is redacted and it has no `Display`: it must never be logged.
#[derive(Clone)]
pub struct MeshSecret {
    /// HMAC-SHA256 state keyed with SHA-256(secret), cloned per datagram so the key schedule is
    /// computed once.
    mac: HmacSha256,
}

impl MeshSecret {
    /// Derives the mesh key from `secret` (SHA-256 of its UTF-8 bytes, exactly as given).
    /// Rejects an empty or whitespace-only secret.
    pub fn new(secret: &str) -> Result<MeshSecret, TransportError> {
        if secret.trim().is_empty() {
            return Err(TransportError::EmptySecret);
        }
        let key: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        // HMAC zero-pads a short key to the 64-byte block size: passing the padded block is
        // the same as passing the 32-byte key, and cannot fail.
        let mut block = [0u8; 64];
        block[..key.len()].copy_from_slice(&key);
        let mac = <HmacSha256 as hmac::digest::KeyInit>::new(&block.into());
        Ok(MeshSecret { mac })
    }

    /// The truncated tag of `data`.
    fn tag(&self, data: &[u8]) -> [u8; TAG_LEN] {
        let full = self.mac.clone().chain_update(data).finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// Whether `tag` is the truncated tag of `data`, compared in constant time.
    fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        tag.len() == TAG_LEN
            && self
                .mac
                .clone()
                .chain_update(data)
                .verify_truncated_left(tag)
                .is_ok()
    }
}

impl fmt::Debug for MeshSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshSecret(<redacted>)")
    }
}

/// A point-in-time copy of [`TransportStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransportCounts {
    /// Datagrams written to the socket (a split message counts two).
    pub datagrams_sent: u64,
    /// Bytes written to the socket, headers and tags included.
    pub bytes_sent: u64,
    /// Datagrams read from the socket, including the ones later rejected or dropped.
    pub datagrams_received: u64,
    /// Bytes read from the socket, including rejected and dropped datagrams.
    pub bytes_received: u64,
    /// Datagrams dropped because their tag was missing or wrong (bad, different or no secret).
    pub rejected_auth: u64,
    /// Datagrams or messages dropped because they were not valid mesh/chitchat data.
    pub rejected_malformed: u64,
    /// Datagrams not sent to, or discarded from, an address cut with [`LinkControl`].
    pub dropped_by_link_control: u64,
    /// Messages sent as two datagrams because they did not fit in one.
    pub split_messages: u64,
}

/// Live counters of one [`MeshTransport`], shared with whoever reports them. All updates are
/// `Relaxed`: they are statistics, not synchronization.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// See [`TransportCounts::datagrams_sent`].
    datagrams_sent: AtomicU64,
    /// See [`TransportCounts::bytes_sent`].
    bytes_sent: AtomicU64,
    /// See [`TransportCounts::datagrams_received`].
    datagrams_received: AtomicU64,
    /// See [`TransportCounts::bytes_received`].
    bytes_received: AtomicU64,
    /// See [`TransportCounts::rejected_auth`].
    rejected_auth: AtomicU64,
    /// See [`TransportCounts::rejected_malformed`].
    rejected_malformed: AtomicU64,
    /// See [`TransportCounts::dropped_by_link_control`].
    dropped_by_link_control: AtomicU64,
    /// See [`TransportCounts::split_messages`].
    split_messages: AtomicU64,
}

impl TransportStats {
    /// Reads every counter (each read is atomic; the set is not a consistent cut).
    pub fn snapshot(&self) -> TransportCounts {
        TransportCounts {
            datagrams_sent: self.datagrams_sent.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            datagrams_received: self.datagrams_received.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            rejected_auth: self.rejected_auth.load(Ordering::Relaxed),
            rejected_malformed: self.rejected_malformed.load(Ordering::Relaxed),
            dropped_by_link_control: self.dropped_by_link_control.load(Ordering::Relaxed),
            split_messages: self.split_messages.load(Ordering::Relaxed),
        }
    }
}

/// Adds `n` to `counter` and returns its previous value.
fn bump(counter: &AtomicU64, n: u64) -> u64 {
    counter.fetch_add(n, Ordering::Relaxed)
}

/// Whether the event numbered `previous` (0-based) should be logged: the first, then every
/// [`LOG_EVERY`]th, so a flood of bad datagrams cannot flood the log.
fn should_log(previous: u64) -> bool {
    previous.is_multiple_of(LOG_EVERY)
}

/// Cuts and restores links of one [`MeshTransport`], for tests and fault injection. A blocked
/// address is sent nothing by this transport's socket, and whatever it sends is discarded on
/// receipt. Cheap to clone (shared state); cheap to check when nothing is blocked.
///
/// Addresses are compared exactly (an IPv4-mapped IPv6 address is not its IPv4 twin).
#[derive(Debug, Clone, Default)]
pub struct LinkControl {
    /// State shared by every clone and by the socket that enforces it.
    inner: Arc<LinkControlInner>,
}

/// Shared state behind [`LinkControl`].
#[derive(Debug, Default)]
struct LinkControlInner {
    /// Fast path: false whenever nothing is blocked, so the per-datagram check is one load.
    any_blocked: AtomicBool,
    /// What is blocked; only consulted when `any_blocked` is set.
    blocked: Mutex<BlockedLinks>,
}

/// The set of cut links.
#[derive(Debug, Default)]
struct BlockedLinks {
    /// Set by [`LinkControl::block_all`]: every address is blocked until `unblock_all`.
    all: bool,
    /// Addresses blocked one by one.
    addrs: HashSet<SocketAddr>,
}

impl LinkControl {
    /// Locks the blocked set; a poisoned lock still holds a valid set.
    fn lock(&self) -> MutexGuard<'_, BlockedLinks> {
        self.inner
            .blocked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Refreshes the fast-path flag; called with the lock held.
    fn refresh(&self, links: &BlockedLinks) {
        let any = links.all || !links.addrs.is_empty();
        self.inner.any_blocked.store(any, Ordering::Release);
    }

    /// Cuts the link with `addr` in both directions.
    pub fn block(&self, addr: SocketAddr) {
        let mut links = self.lock();
        links.addrs.insert(addr);
        self.refresh(&links);
    }

    /// Restores the link with `addr` (unless [`block_all`](Self::block_all) is in force).
    pub fn unblock(&self, addr: SocketAddr) {
        let mut links = self.lock();
        links.addrs.remove(&addr);
        self.refresh(&links);
    }

    /// Cuts every link: the node is isolated until [`unblock_all`](Self::unblock_all).
    pub fn block_all(&self) {
        let mut links = self.lock();
        links.all = true;
        self.refresh(&links);
    }

    /// Restores every link, including the ones blocked one by one.
    pub fn unblock_all(&self) {
        let mut links = self.lock();
        links.all = false;
        links.addrs.clear();
        self.refresh(&links);
    }

    /// Whether traffic with `addr` is currently cut.
    pub fn is_blocked(&self, addr: SocketAddr) -> bool {
        if !self.inner.any_blocked.load(Ordering::Acquire) {
            return false;
        }
        let links = self.lock();
        links.all || links.addrs.contains(&addr)
    }
}

/// hivemind's gossip transport: chitchat over an already-bound UDP socket, with the framing,
/// optional authentication, splitting, counters and link control described in the
/// [module docs](self).
///
/// [`Transport::open`] hands the socket out once; a second `open` fails.
#[derive(Debug)]
pub struct MeshTransport {
    /// The bound socket, until `open` takes it (the server binds every socket before starting
    /// chitchat, so the port is known and owned up front).
    socket: Mutex<Option<std::net::UdpSocket>>,
    /// The mesh secret; `None` sends untagged datagrams and accepts only untagged ones.
    secret: Option<MeshSecret>,
    /// Counters shared with the opened socket and with [`stats`](Self::stats) callers.
    stats: Arc<TransportStats>,
    /// Link cuts shared with the opened socket and with [`links`](Self::links) callers.
    links: LinkControl,
}

impl MeshTransport {
    /// Wraps an already bound socket. With `secret`, every datagram is tagged and every
    /// received one must carry a valid tag.
    pub fn new(socket: std::net::UdpSocket, secret: Option<MeshSecret>) -> MeshTransport {
        MeshTransport {
            socket: Mutex::new(Some(socket)),
            secret,
            stats: Arc::new(TransportStats::default()),
            links: LinkControl::default(),
        }
    }

    /// The live counters of this transport.
    pub fn stats(&self) -> Arc<TransportStats> {
        Arc::clone(&self.stats)
    }

    /// The link control of this transport (a handle sharing its state).
    pub fn links(&self) -> LinkControl {
        self.links.clone()
    }
}

#[async_trait]
impl Transport for MeshTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let std_socket = self
            .socket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .context("the gossip mesh socket was already opened")?;
        // Build the codec before consuming the socket, and give the socket back on failure so
        // a later open can retry.
        let codec = match LoopbackCodec::open().await {
            Ok(codec) => codec,
            Err(err) => {
                *self.socket.lock().unwrap_or_else(PoisonError::into_inner) = Some(std_socket);
                return Err(err);
            }
        };
        std_socket
            .set_nonblocking(true)
            .context("failed to make the gossip mesh socket non-blocking")?;
        let socket = tokio::net::UdpSocket::from_std(std_socket)
            .context("failed to register the gossip mesh socket with tokio")?;
        let local_addr = socket
            .local_addr()
            .context("failed to get the gossip mesh socket address")?;
        if local_addr != listen_addr {
            debug!(
                %listen_addr,
                %local_addr,
                "gossip mesh socket is bound to another address than chitchat's listen_addr"
            );
        }
        Ok(Box::new(MeshSocket {
            socket,
            local_addr,
            secret: self.secret.clone(),
            stats: Arc::clone(&self.stats),
            links: self.links.clone(),
            next_id: seed_u64(local_addr.port()) as u32,
            recv_buf: vec![0u8; RECV_BUF_LEN].into_boxed_slice(),
            reassembler: Reassembler::new(MAX_PENDING_HALVES, HALF_TTL),
            codec,
            transient_errors: 0,
        }))
    }
}

/// A number that differs between runs and sockets: seeds message ids and codec rounds.
fn seed_u64(salt: u16) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mixed = now.as_secs().rotate_left(32) ^ u64::from(now.subsec_nanos()) ^ u64::from(salt);
    mixed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Errors chitchat's UDP socket also treats as transient: logged, never fatal.
fn is_transient_io_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::OutOfMemory
            // Sending to a closed peer can make recv_from fail (WSAECONNRESET on Windows).
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// The opened socket chitchat drives.
struct MeshSocket {
    /// The mesh UDP socket.
    socket: tokio::net::UdpSocket,
    /// Its address, cached for `Socket::local_addr`.
    local_addr: SocketAddr,
    /// The mesh secret, if any: tags what is sent, checks what is received.
    secret: Option<MeshSecret>,
    /// Counters shared with the transport.
    stats: Arc<TransportStats>,
    /// Link cuts shared with the transport.
    links: LinkControl,
    /// Id of the next message sent; both halves of a split message share it.
    next_id: u32,
    /// Buffer datagrams are read into.
    recv_buf: Box<[u8]>,
    /// Halves of split messages waiting for their other half.
    reassembler: Reassembler,
    /// chitchat's (de)serializer, reached through loopback sockets.
    codec: LoopbackCodec,
    /// Transient receive errors seen, to rate-limit their log.
    transient_errors: u64,
}

#[async_trait]
impl Socket for MeshSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.local_addr)
    }

    async fn send(
        &mut self,
        to_addr: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let Some(payload) = self.codec.encode(envelope).await? else {
            // The loopback lost it: as good as a datagram lost on the network.
            debug!(to = %to_addr, "gossip message lost while serializing it");
            return Ok(SendOutcome { num_bytes_sent: 0 });
        };
        let num_bytes_sent = payload.len();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let frames = encode_frames(&payload, id, self.secret.as_ref())
            .context("failed to frame a gossip message")?;
        if self.links.is_blocked(to_addr) {
            bump(&self.stats.dropped_by_link_control, frames.len() as u64);
            return Ok(SendOutcome { num_bytes_sent });
        }
        if frames.len() > 1 {
            bump(&self.stats.split_messages, 1);
        }
        for frame in &frames {
            let sent = self
                .socket
                .send_to(frame, to_addr)
                .await
                .context("failed to send chitchat message to peer")?;
            bump(&self.stats.datagrams_sent, 1);
            bump(&self.stats.bytes_sent, sent as u64);
        }
        Ok(SendOutcome { num_bytes_sent })
    }

    /// Cancel-safe: a message being decoded when the future is dropped is finished by the next
    /// call.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            if self.codec.is_decoding() {
                match self.codec.finish_decode().await? {
                    Some(DecodeOutcome::Decoded {
                        from_addr,
                        envelope,
                        num_bytes,
                    }) => {
                        return Ok(RecvOutcome {
                            from_addr,
                            envelope,
                            num_bytes_received: num_bytes,
                        });
                    }
                    Some(DecodeOutcome::Failed { from_addr, reason }) => {
                        self.reject_malformed(from_addr, reason);
                    }
                    None => {}
                }
                continue;
            }
            let (len, from_addr) = match self.socket.recv_from(&mut self.recv_buf[..]).await {
                Ok(received) => received,
                Err(err) if is_transient_io_error(&err) => {
                    if should_log(self.transient_errors) {
                        warn!(
                            error = %err,
                            count = self.transient_errors + 1,
                            "transient UDP recv error on the gossip mesh socket"
                        );
                    }
                    self.transient_errors += 1;
                    continue;
                }
                Err(err) => {
                    return Err(err).context("fatal UDP recv error on the gossip mesh socket");
                }
            };
            bump(&self.stats.datagrams_received, 1);
            bump(&self.stats.bytes_received, len as u64);
            if self.links.is_blocked(from_addr) {
                bump(&self.stats.dropped_by_link_control, 1);
                continue;
            }
            let Some(datagram) = self.recv_buf.get(..len) else {
                continue;
            };
            let frame = match open_frame(datagram, self.secret.as_ref()) {
                Ok(frame) => frame,
                Err(FrameError::Auth(reason)) => {
                    let previous = bump(&self.stats.rejected_auth, 1);
                    if should_log(previous) {
                        warn!(
                            from = %from_addr,
                            reason,
                            count = previous + 1,
                            "rejected unauthenticated gossip datagram \
                             (is the mesh secret the same on every node?)"
                        );
                    }
                    continue;
                }
                Err(FrameError::Malformed(reason)) => {
                    self.reject_malformed(from_addr, reason);
                    continue;
                }
            };
            let payload = match frame.kind {
                FrameKind::Whole => frame.payload.to_vec(),
                kind => {
                    let now = std::time::Instant::now();
                    match self
                        .reassembler
                        .accept(from_addr, frame.id, kind, frame.payload, now)
                    {
                        Some(payload) => payload,
                        None => continue,
                    }
                }
            };
            if let Err(reason) = self.codec.check_payload(&payload) {
                self.reject_malformed(from_addr, reason);
                continue;
            }
            self.codec.start_decode(from_addr, payload);
        }
    }
}

impl MeshSocket {
    /// Counts a malformed datagram or message, logging only the first and every 1000th.
    fn reject_malformed(&self, from_addr: SocketAddr, reason: &'static str) {
        let previous = bump(&self.stats.rejected_malformed, 1);
        if should_log(previous) {
            debug!(
                from = %from_addr,
                reason,
                count = previous + 1,
                "rejected malformed gossip datagram"
            );
        }
    }
}

/// What a datagram carries, from its `kind` byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameKind {
    /// A whole message.
    Whole,
    /// The first half of a split message.
    FirstHalf,
    /// The second half of a split message.
    SecondHalf,
}

impl FrameKind {
    /// The wire byte.
    fn code(self) -> u8 {
        match self {
            FrameKind::Whole => 0,
            FrameKind::FirstHalf => 1,
            FrameKind::SecondHalf => 2,
        }
    }

    /// Parses the wire byte.
    fn from_code(code: u8) -> Option<FrameKind> {
        match code {
            0 => Some(FrameKind::Whole),
            1 => Some(FrameKind::FirstHalf),
            2 => Some(FrameKind::SecondHalf),
            _ => None,
        }
    }
}

/// A checked datagram.
#[derive(Debug, PartialEq, Eq)]
struct Frame<'a> {
    /// Whole message or which half.
    kind: FrameKind,
    /// Message id, pairing the halves of a split message.
    id: u32,
    /// The chitchat bytes (or half of them), tag removed.
    payload: &'a [u8],
}

/// Why a datagram was refused.
#[derive(Debug, PartialEq, Eq)]
enum FrameError {
    /// Missing or wrong tag, or a tagged/untagged mismatch with this node's configuration.
    Auth(&'static str),
    /// Anything else that is not a valid mesh datagram.
    Malformed(&'static str),
}

/// The largest payload one datagram carries with (`true`) or without a tag.
fn max_chunk(tagged: bool) -> usize {
    MAX_DATAGRAM_LEN - HEADER_LEN - if tagged { TAG_LEN } else { 0 }
}

/// Frames `payload` as one datagram, or two if it does not fit in one.
fn encode_frames(
    payload: &[u8],
    id: u32,
    secret: Option<&MeshSecret>,
) -> Result<Vec<Vec<u8>>, TransportError> {
    let chunk = max_chunk(secret.is_some());
    if payload.len() <= chunk {
        return Ok(vec![encode_frame(FrameKind::Whole, id, payload, secret)]);
    }
    if payload.len() > 2 * chunk {
        return Err(TransportError::MessageTooLarge {
            len: payload.len(),
            max: 2 * chunk,
        });
    }
    let (first, second) = payload.split_at(payload.len().div_ceil(2));
    Ok(vec![
        encode_frame(FrameKind::FirstHalf, id, first, secret),
        encode_frame(FrameKind::SecondHalf, id, second, secret),
    ])
}

/// Frames one datagram: header, payload, and the tag when there is a secret.
fn encode_frame(kind: FrameKind, id: u32, payload: &[u8], secret: Option<&MeshSecret>) -> Vec<u8> {
    let tag_len = if secret.is_some() { TAG_LEN } else { 0 };
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len() + tag_len);
    frame.push(if secret.is_some() {
        MAGIC_AUTH
    } else {
        MAGIC_PLAIN
    });
    frame.push(kind.code());
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(payload);
    if let Some(secret) = secret {
        let tag = secret.tag(&frame);
        frame.extend_from_slice(&tag);
    }
    frame
}

/// Checks a received datagram against this node's configuration and splits it into parts.
fn open_frame<'a>(
    datagram: &'a [u8],
    secret: Option<&MeshSecret>,
) -> Result<Frame<'a>, FrameError> {
    let Some((&magic, _)) = datagram.split_first() else {
        return Err(FrameError::Malformed("empty datagram"));
    };
    let body = match (magic, secret) {
        (MAGIC_AUTH, Some(secret)) => {
            if datagram.len() < HEADER_LEN + TAG_LEN {
                return Err(FrameError::Malformed(
                    "datagram too short for header and tag",
                ));
            }
            let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
            if !secret.verify(signed, tag) {
                return Err(FrameError::Auth("wrong tag (different secret?)"));
            }
            signed
        }
        (MAGIC_PLAIN, None) => datagram,
        (MAGIC_PLAIN, Some(_)) => {
            return Err(FrameError::Auth("untagged datagram (peer has no secret)"))
        }
        (MAGIC_AUTH, None) => {
            return Err(FrameError::Auth(
                "tagged datagram (peer has a secret, this node has none)",
            ));
        }
        _ => {
            return Err(FrameError::Malformed(
                "not a gossip mesh datagram (bad magic)",
            ))
        }
    };
    let Some((header, payload)) = body.split_at_checked(HEADER_LEN) else {
        return Err(FrameError::Malformed("datagram shorter than the header"));
    };
    let kind = header
        .get(1)
        .copied()
        .and_then(FrameKind::from_code)
        .ok_or(FrameError::Malformed("unknown frame kind"))?;
    let mut id = [0u8; 4];
    id.copy_from_slice(&header[2..HEADER_LEN]);
    Ok(Frame {
        kind,
        id: u32::from_be_bytes(id),
        payload,
    })
}

/// Pairs the halves of split messages. Bounded: at most `max_pending` halves wait, each for
/// at most `ttl`; the oldest is evicted when full.
struct Reassembler {
    /// Halves waiting for their other half, keyed by sender and message id.
    pending: HashMap<(SocketAddr, u32), PendingHalf>,
    /// Most halves kept (memory bound against a flood of unpaired halves).
    max_pending: usize,
    /// How long a half waits before it is dropped (its pair was lost).
    ttl: Duration,
}

/// One half waiting in the [`Reassembler`].
struct PendingHalf {
    /// Which half it is.
    kind: FrameKind,
    /// Its bytes.
    bytes: Vec<u8>,
    /// When it arrived, for expiry and eviction.
    arrived: std::time::Instant,
}

impl Reassembler {
    /// An empty reassembler.
    fn new(max_pending: usize, ttl: Duration) -> Reassembler {
        Reassembler {
            pending: HashMap::new(),
            max_pending,
            ttl,
        }
    }

    /// Takes one frame's payload; returns the whole message once both halves are in.
    fn accept(
        &mut self,
        from: SocketAddr,
        id: u32,
        kind: FrameKind,
        payload: &[u8],
        now: std::time::Instant,
    ) -> Option<Vec<u8>> {
        if kind == FrameKind::Whole {
            return Some(payload.to_vec());
        }
        let ttl = self.ttl;
        self.pending
            .retain(|_, half| now.saturating_duration_since(half.arrived) < ttl);
        let key = (from, id);
        match self.pending.remove(&key) {
            Some(other) if other.kind != kind => {
                let (first, second) = if kind == FrameKind::FirstHalf {
                    (payload, &other.bytes[..])
                } else {
                    (&other.bytes[..], payload)
                };
                let mut whole = Vec::with_capacity(first.len() + second.len());
                whole.extend_from_slice(first);
                whole.extend_from_slice(second);
                Some(whole)
            }
            // First of the pair, or a duplicate of a half already waiting: keep the newest.
            _ => {
                while self.pending.len() >= self.max_pending {
                    let oldest = self
                        .pending
                        .iter()
                        .min_by_key(|(_, half)| half.arrived)
                        .map(|(key, _)| *key)?;
                    self.pending.remove(&oldest);
                }
                if self.max_pending > 0 {
                    self.pending.insert(
                        key,
                        PendingHalf {
                            kind,
                            bytes: payload.to_vec(),
                            arrived: now,
                        },
                    );
                }
                None
            }
        }
    }

    /// How many halves are waiting.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.pending.len()
    }
}

/// What finishing a decode round gave.
enum DecodeOutcome {
    /// chitchat decoded the message.
    Decoded {
        /// The peer that sent it.
        from_addr: SocketAddr,
        /// The message.
        envelope: ChitchatEnvelope,
        /// Its chitchat size in bytes.
        num_bytes: usize,
    },
    /// chitchat could not decode it, or the loopback lost it.
    Failed {
        /// The peer that sent it.
        from_addr: SocketAddr,
        /// Why, for the log.
        reason: &'static str,
    },
}

/// Where a decode round is; kept across cancelled `recv` calls so they resume it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecodeStage {
    /// The payload has not been handed to the loopback chitchat socket yet.
    SendPayload,
    /// The payload was handed over; the closing sentinel has not been.
    SendSentinel,
    /// Both were handed over; waiting for chitchat to return the sentinel.
    AwaitSentinel,
}

/// One message being decoded through the loopback.
struct PendingDecode {
    /// The peer that sent it, reported to chitchat with the result.
    from_addr: SocketAddr,
    /// Its chitchat bytes, kept until handed over so a cancelled send can be retried.
    payload: Vec<u8>,
    /// Round number, carried by this round's sentinel so stale rounds are recognized.
    nonce: u64,
    /// The serialized sentinel closing this round.
    sentinel: Vec<u8>,
    /// Progress, so a cancelled `recv` resumes where it stopped.
    stage: DecodeStage,
    /// When this round is given up (the loopback lost a datagram, or it is being flooded).
    deadline: tokio::time::Instant,
    /// The latest message chitchat decoded this round (the payload, once it has come back).
    decoded: Option<ChitchatEnvelope>,
}

/// chitchat's message (de)serializer, reached through a private pair of loopback sockets
/// because chitchat 0.13 does not expose it (see the [module docs](self)).
///
/// - Encoding: the chitchat socket sends the envelope to the tap; the tap reads the bytes.
/// - Decoding: the tap sends the bytes to the chitchat socket, then a *sentinel* (a `Syn`
///   whose cluster id names this round); chitchat returns the decoded payload, if it was
///   valid, and then the sentinel. Seeing the sentinel without the payload means chitchat
///   rejected the payload. Only datagrams from the tap are trusted by the chitchat socket and
///   only datagrams from the chitchat socket by the tap, so other local processes cannot inject
///   messages.
struct LoopbackCodec {
    /// chitchat's own UDP socket on 127.0.0.1: the public path to its (de)serializer.
    inner: chitchat::transport::UdpSocket,
    /// Its address: the only source the tap accepts.
    inner_addr: SocketAddr,
    /// The plain socket on 127.0.0.1 that exchanges raw bytes with `inner`.
    tap: tokio::net::UdpSocket,
    /// Its address: the only source whose decoded messages are accepted.
    tap_addr: SocketAddr,
    /// Buffer the tap reads serialized messages into.
    tap_buf: Box<[u8]>,
    /// A serialized sentinel with an all-zero round number, patched for each round.
    sentinel_template: Vec<u8>,
    /// Number of the next decode round.
    next_nonce: u64,
    /// The round in progress, if any.
    pending: Option<PendingDecode>,
}

impl LoopbackCodec {
    /// Binds the loopback pair and learns the sentinel's serialized form.
    async fn open() -> anyhow::Result<LoopbackCodec> {
        let loopback: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
        let inner = chitchat::transport::UdpSocket::open(loopback)
            .await
            .context("failed to bind the gossip codec's loopback chitchat socket")?;
        let inner_addr = inner.local_addr()?;
        let tap = tokio::net::UdpSocket::bind(loopback)
            .await
            .context("failed to bind the gossip codec's loopback tap socket")?;
        let tap_addr = tap
            .local_addr()
            .context("failed to get the gossip codec's tap socket address")?;
        let mut codec = LoopbackCodec {
            inner,
            inner_addr,
            tap,
            tap_addr,
            tap_buf: vec![0u8; RECV_BUF_LEN].into_boxed_slice(),
            sentinel_template: Vec::new(),
            next_nonce: seed_u64(tap_addr.port()),
            pending: None,
        };
        let zero_id = sentinel_cluster_id(0);
        let template = codec
            .encode(sentinel_envelope(0))
            .await?
            .context("the gossip codec's loopback did not return the sentinel")?;
        // chitchat writes a Syn's cluster id last, so the round number is the template's tail.
        anyhow::ensure!(
            template.ends_with(zero_id.as_bytes()),
            "unexpected chitchat serialization: the codec sentinel cannot be patched"
        );
        codec.sentinel_template = template;
        Ok(codec)
    }

    /// Serializes `envelope` with chitchat. `Ok(None)` if the loopback lost it.
    async fn encode(&mut self, envelope: ChitchatEnvelope) -> anyhow::Result<Option<Vec<u8>>> {
        let SendOutcome { num_bytes_sent } = self
            .inner
            .send(self.tap_addr, envelope)
            .await
            .context("the gossip codec's loopback chitchat socket failed")?;
        let deadline = tokio::time::Instant::now() + CODEC_TIMEOUT;
        loop {
            let received =
                tokio::time::timeout_at(deadline, self.tap.recv_from(&mut self.tap_buf[..])).await;
            match received {
                Err(_elapsed) => return Ok(None),
                Ok(Err(err)) if is_transient_io_error(&err) => continue,
                Ok(Err(err)) => {
                    return Err(err).context("the gossip codec's loopback tap socket failed");
                }
                // Anything not from our chitchat socket (another local process) or of another
                // length (left over from a cancelled encode) is not this message.
                Ok(Ok((len, from))) if from == self.inner_addr && len == num_bytes_sent => {
                    return Ok(self.tap_buf.get(..len).map(<[u8]>::to_vec));
                }
                Ok(Ok(_)) => continue,
            }
        }
    }

    /// Cheap check before a decode round: the chitchat header's magic number (learned from the
    /// sentinel) and the size chitchat can receive.
    fn check_payload(&self, payload: &[u8]) -> Result<(), &'static str> {
        if payload.len() > MAX_DATAGRAM_LEN {
            return Err("message larger than chitchat accepts");
        }
        let magic = self.sentinel_template.get(..2).unwrap_or_default();
        if payload.len() < 4 || !payload.starts_with(magic) {
            return Err("payload is not a chitchat message");
        }
        Ok(())
    }

    /// Whether a round is in progress (the next `finish_decode` continues it).
    fn is_decoding(&self) -> bool {
        self.pending.is_some()
    }

    /// Starts a decode round for `payload` from `from_addr`.
    fn start_decode(&mut self, from_addr: SocketAddr, payload: Vec<u8>) {
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        let mut sentinel = self.sentinel_template.clone();
        let tail = sentinel.len().saturating_sub(SENTINEL_NONCE_HEX_LEN);
        if let Some(digits) = sentinel.get_mut(tail..) {
            digits.copy_from_slice(format!("{nonce:016x}").as_bytes());
        }
        self.pending = Some(PendingDecode {
            from_addr,
            payload,
            nonce,
            sentinel,
            stage: DecodeStage::SendPayload,
            deadline: tokio::time::Instant::now() + CODEC_TIMEOUT,
            decoded: None,
        });
    }

    /// Drives the round in progress to its end. Cancel-safe: progress is kept in `self`.
    /// `Ok(None)` if no round was in progress; `Err` only if a loopback socket is broken.
    async fn finish_decode(&mut self) -> anyhow::Result<Option<DecodeOutcome>> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(None);
        };
        let failure = loop {
            match pending.stage {
                DecodeStage::SendPayload | DecodeStage::SendSentinel => {
                    let bytes = if pending.stage == DecodeStage::SendPayload {
                        &pending.payload
                    } else {
                        &pending.sentinel
                    };
                    let sent = tokio::time::timeout_at(
                        pending.deadline,
                        self.tap.send_to(bytes, self.inner_addr),
                    )
                    .await;
                    match sent {
                        Ok(Ok(_)) => {
                            pending.stage = if pending.stage == DecodeStage::SendPayload {
                                DecodeStage::SendSentinel
                            } else {
                                DecodeStage::AwaitSentinel
                            };
                        }
                        Ok(Err(err)) => {
                            debug!(error = %err, "gossip codec loopback send failed");
                            break "loopback send failed";
                        }
                        Err(_elapsed) => break "timed out decoding",
                    }
                }
                DecodeStage::AwaitSentinel => {
                    let received =
                        tokio::time::timeout_at(pending.deadline, self.inner.recv()).await;
                    let outcome = match received {
                        Err(_elapsed) => break "timed out decoding",
                        Ok(Err(err)) => {
                            return Err(
                                err.context("the gossip codec's loopback chitchat socket failed")
                            );
                        }
                        Ok(Ok(outcome)) => outcome,
                    };
                    if outcome.from_addr != self.tap_addr {
                        // Another local process wrote to the loopback socket: not mesh traffic.
                        continue;
                    }
                    match sentinel_nonce(&outcome.envelope) {
                        Some(nonce) if nonce == pending.nonce => {
                            let from_addr = pending.from_addr;
                            let num_bytes = pending.payload.len();
                            let decoded = pending.decoded.take();
                            self.pending = None;
                            return Ok(Some(match decoded {
                                Some(envelope) => DecodeOutcome::Decoded {
                                    from_addr,
                                    envelope,
                                    num_bytes,
                                },
                                None => DecodeOutcome::Failed {
                                    from_addr,
                                    reason: "chitchat could not decode the message",
                                },
                            }));
                        }
                        // An earlier, abandoned round ended: what came before was not ours.
                        Some(_) => pending.decoded = None,
                        None => pending.decoded = Some(outcome.envelope),
                    }
                }
            }
        };
        let from_addr = pending.from_addr;
        self.pending = None;
        Ok(Some(DecodeOutcome::Failed {
            from_addr,
            reason: failure,
        }))
    }
}

/// The cluster id of the sentinel for round `nonce`.
fn sentinel_cluster_id(nonce: u64) -> String {
    format!(
        "{SENTINEL_PREFIX}{nonce:0width$x}",
        width = SENTINEL_NONCE_HEX_LEN
    )
}

/// The sentinel message for round `nonce`.
fn sentinel_envelope(nonce: u64) -> ChitchatEnvelope {
    ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::Syn {
            cluster_id: sentinel_cluster_id(nonce),
            digest: Default::default(),
        },
    }
}

/// The round number if `envelope` is a codec sentinel.
fn sentinel_nonce(envelope: &ChitchatEnvelope) -> Option<u64> {
    let ChitchatMessage::Syn { cluster_id, .. } = &envelope.message else {
        return None;
    };
    let digits = cluster_id.strip_prefix(SENTINEL_PREFIX)?;
    if digits.len() != SENTINEL_NONCE_HEX_LEN {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use std::task::Poll;
    use std::time::Instant;

    use tokio::time::timeout;

    use super::*;

    /// Bound on every wait for something that should happen.
    const WAIT: Duration = Duration::from_secs(5);
    /// How long to wait to conclude that something did not happen.
    const QUIET: Duration = Duration::from_millis(300);

    fn syn(cluster_id: &str, version: ProtocolVersion) -> ChitchatEnvelope {
        ChitchatEnvelope {
            version,
            message: ChitchatMessage::Syn {
                cluster_id: cluster_id.to_string(),
                digest: Default::default(),
            },
        }
    }

    fn secret(s: &str) -> Option<MeshSecret> {
        Some(MeshSecret::new(s).unwrap())
    }

    fn bind_local() -> std::net::UdpSocket {
        std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap()
    }

    /// A transport on 127.0.0.1:0, opened; returns it, its socket and its address.
    async fn open_mesh(secret: Option<MeshSecret>) -> (MeshTransport, Box<dyn Socket>, SocketAddr) {
        let std_socket = bind_local();
        let addr = std_socket.local_addr().unwrap();
        let transport = MeshTransport::new(std_socket, secret);
        let socket = transport.open(addr).await.unwrap();
        assert_eq!(socket.local_addr().unwrap(), addr);
        (transport, socket, addr)
    }

    async fn recv_within(socket: &mut Box<dyn Socket>) -> RecvOutcome {
        timeout(WAIT, socket.recv())
            .await
            .expect("timed out waiting for a message")
            .unwrap()
    }

    async fn assert_nothing_received(socket: &mut Box<dyn Socket>) {
        if let Ok(outcome) = timeout(QUIET, socket.recv()).await {
            panic!("unexpected delivery: {outcome:?}");
        }
    }

    async fn round_trip(secret_a: Option<MeshSecret>, secret_b: Option<MeshSecret>) {
        let (ta, mut a, addr_a) = open_mesh(secret_a).await;
        let (tb, mut b, addr_b) = open_mesh(secret_b).await;
        for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
            let sent = timeout(WAIT, a.send(addr_b, syn("cluster-x", version)))
                .await
                .unwrap()
                .unwrap();
            let received = recv_within(&mut b).await;
            assert_eq!(received.from_addr, addr_a);
            assert_eq!(received.envelope, syn("cluster-x", version));
            assert_eq!(received.num_bytes_received, sent.num_bytes_sent);
            assert!(sent.num_bytes_sent > 0);
        }
        // And back.
        timeout(WAIT, b.send(addr_a, syn("reply", ProtocolVersion::V0)))
            .await
            .unwrap()
            .unwrap();
        let received = recv_within(&mut a).await;
        assert_eq!(received.from_addr, addr_b);
        assert_eq!(received.envelope, syn("reply", ProtocolVersion::V0));
        let (ca, cb) = (ta.stats().snapshot(), tb.stats().snapshot());
        assert_eq!(ca.datagrams_sent, 2);
        assert_eq!(cb.datagrams_received, 2);
        assert_eq!(ca.bytes_sent, cb.bytes_received);
        assert_eq!(cb.rejected_auth + cb.rejected_malformed, 0);
    }

    #[tokio::test]
    async fn round_trip_without_secret() {
        round_trip(None, None).await;
    }

    #[tokio::test]
    async fn round_trip_with_secret() {
        round_trip(secret("hunter2"), secret("hunter2")).await;
    }

    #[tokio::test]
    async fn bad_cluster_round_trips() {
        let (_ta, mut a, addr_a) = open_mesh(secret("s")).await;
        let (_tb, mut b, addr_b) = open_mesh(secret("s")).await;
        let envelope = ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::BadCluster,
        };
        a.send(addr_b, envelope).await.unwrap();
        let received = recv_within(&mut b).await;
        assert_eq!(received.from_addr, addr_a);
        assert_eq!(received.envelope.message, ChitchatMessage::BadCluster);
    }

    /// `a` sends to `b`; `b` must reject it as unauthenticated.
    async fn assert_rejected_auth(secret_a: Option<MeshSecret>, secret_b: Option<MeshSecret>) {
        let (_ta, mut a, _) = open_mesh(secret_a).await;
        let (tb, mut b, addr_b) = open_mesh(secret_b).await;
        a.send(addr_b, syn("c", ProtocolVersion::V0)).await.unwrap();
        assert_nothing_received(&mut b).await;
        let counts = tb.stats().snapshot();
        assert_eq!(counts.rejected_auth, 1, "{counts:?}");
        assert_eq!(counts.datagrams_received, 1);
    }

    #[tokio::test]
    async fn wrong_secret_is_rejected() {
        assert_rejected_auth(secret("one"), secret("two")).await;
    }

    #[tokio::test]
    async fn no_secret_to_secret_is_rejected() {
        assert_rejected_auth(None, secret("two")).await;
    }

    #[tokio::test]
    async fn secret_to_no_secret_is_rejected() {
        assert_rejected_auth(secret("one"), None).await;
    }

    async fn garbage_then_good(secret_b: Option<MeshSecret>) {
        let (tb, mut b, addr_b) = open_mesh(secret_b.clone()).await;
        let raw = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let magic = if secret_b.is_some() {
            MAGIC_AUTH
        } else {
            MAGIC_PLAIN
        };
        // Bad magic, empty, too short for the header, unknown kind, valid frame around a
        // non-chitchat payload, valid frame around a chitchat-looking but broken payload.
        let mut garbage: Vec<Vec<u8>> = vec![
            b"junk".to_vec(),
            Vec::new(),
            vec![magic, 0, 1],
            encode_frame(FrameKind::Whole, 1, b"x", secret_b.as_ref()),
        ];
        let mut bad_kind = encode_frame(FrameKind::Whole, 2, b"abcd", None);
        bad_kind[1] = 9;
        if let Some(s) = &secret_b {
            bad_kind[0] = MAGIC_AUTH;
            let tag = s.tag(&bad_kind);
            bad_kind.extend_from_slice(&tag);
        }
        garbage.push(bad_kind);
        let good = {
            let (_ta, mut a, _) = open_mesh(None).await;
            // Capture a real serialized Syn through a plain socket to corrupt it.
            let capture = bind_local();
            let capture_addr = capture.local_addr().unwrap();
            a.send(capture_addr, syn("c", ProtocolVersion::V0))
                .await
                .unwrap();
            let mut buf = vec![0u8; RECV_BUF_LEN];
            capture.set_read_timeout(Some(WAIT)).unwrap();
            let (len, _) = capture.recv_from(&mut buf).unwrap();
            buf[HEADER_LEN..len].to_vec()
        };
        // A chitchat header followed by a truncated body: chitchat itself rejects it.
        garbage.push(encode_frame(
            FrameKind::Whole,
            3,
            &good[..5],
            secret_b.as_ref(),
        ));
        // Wrong chitchat message type.
        let mut wrong_type = good.clone();
        wrong_type[3] = 200;
        garbage.push(encode_frame(
            FrameKind::Whole,
            4,
            &wrong_type,
            secret_b.as_ref(),
        ));
        for datagram in &garbage {
            raw.send_to(datagram, addr_b).await.unwrap();
        }
        raw.send_to(
            &encode_frame(FrameKind::Whole, 5, &good, secret_b.as_ref()),
            addr_b,
        )
        .await
        .unwrap();
        let received = recv_within(&mut b).await;
        assert_eq!(received.envelope, syn("c", ProtocolVersion::V0));
        assert_eq!(received.from_addr, raw.local_addr().unwrap());
        let counts = tb.stats().snapshot();
        assert_eq!(
            counts.rejected_malformed,
            garbage.len() as u64,
            "{counts:?}"
        );
        assert_eq!(counts.rejected_auth, 0);
        assert_eq!(counts.datagrams_received, garbage.len() as u64 + 1);
        // Nothing else is queued: the failed decode rounds left nothing behind.
        assert_nothing_received(&mut b).await;
    }

    #[tokio::test]
    async fn garbage_is_rejected_and_good_messages_still_arrive() {
        garbage_then_good(None).await;
    }

    #[tokio::test]
    async fn garbage_is_rejected_and_good_messages_still_arrive_with_secret() {
        garbage_then_good(secret("s3cret")).await;
    }

    /// A full-size chitchat message (65,507 bytes) goes out split and arrives whole.
    async fn full_size_message(secret_ab: Option<MeshSecret>) {
        let (ta, mut a, addr_a) = open_mesh(secret_ab.clone()).await;
        let (tb, mut b, addr_b) = open_mesh(secret_ab).await;
        // Syn V0 with an empty digest: 4 header + 2 digest + 2 length + the cluster id.
        let big = "x".repeat(MAX_DATAGRAM_LEN - 8);
        let sent = timeout(WAIT, a.send(addr_b, syn(&big, ProtocolVersion::V0)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sent.num_bytes_sent, MAX_DATAGRAM_LEN);
        let received = recv_within(&mut b).await;
        assert_eq!(received.from_addr, addr_a);
        assert_eq!(received.num_bytes_received, MAX_DATAGRAM_LEN);
        assert_eq!(received.envelope, syn(&big, ProtocolVersion::V0));
        let (ca, cb) = (ta.stats().snapshot(), tb.stats().snapshot());
        assert_eq!(ca.split_messages, 1);
        assert_eq!(ca.datagrams_sent, 2);
        assert_eq!(cb.datagrams_received, 2);
    }

    #[tokio::test]
    async fn full_size_message_is_split_and_reassembled() {
        full_size_message(None).await;
    }

    #[tokio::test]
    async fn full_size_message_is_split_and_reassembled_with_secret() {
        full_size_message(secret("k")).await;
    }

    #[tokio::test]
    async fn link_control_blocks_and_unblocks() {
        let (ta, mut a, addr_a) = open_mesh(secret("k")).await;
        let (tb, mut b, addr_b) = open_mesh(secret("k")).await;

        // Sender side cut.
        ta.links().block(addr_b);
        assert!(ta.links().is_blocked(addr_b));
        a.send(addr_b, syn("1", ProtocolVersion::V0)).await.unwrap();
        assert_nothing_received(&mut b).await;
        assert_eq!(ta.stats().snapshot().dropped_by_link_control, 1);
        assert_eq!(ta.stats().snapshot().datagrams_sent, 0);
        ta.links().unblock(addr_b);
        a.send(addr_b, syn("2", ProtocolVersion::V0)).await.unwrap();
        assert_eq!(
            recv_within(&mut b).await.envelope,
            syn("2", ProtocolVersion::V0)
        );

        // Receiver side cut.
        let links_b = tb.links();
        links_b.block(addr_a);
        a.send(addr_b, syn("3", ProtocolVersion::V0)).await.unwrap();
        assert_nothing_received(&mut b).await;
        assert_eq!(tb.stats().snapshot().dropped_by_link_control, 1);
        links_b.unblock(addr_a);
        a.send(addr_b, syn("4", ProtocolVersion::V0)).await.unwrap();
        assert_eq!(
            recv_within(&mut b).await.envelope,
            syn("4", ProtocolVersion::V0)
        );

        // Isolation, and unblock_all also lifts single blocks.
        links_b.block(addr_a);
        links_b.block_all();
        links_b.unblock(addr_a);
        assert!(links_b.is_blocked(addr_a), "block_all still in force");
        a.send(addr_b, syn("5", ProtocolVersion::V0)).await.unwrap();
        assert_nothing_received(&mut b).await;
        links_b.block(addr_a);
        links_b.unblock_all();
        assert!(!links_b.is_blocked(addr_a));
        a.send(addr_b, syn("6", ProtocolVersion::V0)).await.unwrap();
        assert_eq!(
            recv_within(&mut b).await.envelope,
            syn("6", ProtocolVersion::V0)
        );
        assert_eq!(tb.stats().snapshot().dropped_by_link_control, 2);
    }

    #[tokio::test]
    async fn second_open_fails() {
        let std_socket = bind_local();
        let addr = std_socket.local_addr().unwrap();
        let transport = MeshTransport::new(std_socket, None);
        let _socket = transport.open(addr).await.unwrap();
        assert!(transport.open(addr).await.is_err());
    }

    /// `recv` cancelled at any point (as chitchat's select loop does) loses nothing.
    #[tokio::test]
    async fn recv_is_cancel_safe() {
        let (_ta, mut a, _) = open_mesh(secret("k")).await;
        let (_tb, mut b, addr_b) = open_mesh(secret("k")).await;
        const N: usize = 20;
        for i in 0..N {
            a.send(addr_b, syn(&format!("m{i}"), ProtocolVersion::V0))
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        let mut cancelled = 0usize;
        timeout(WAIT, async {
            while got.len() < N {
                // Poll a fresh recv future exactly once, then drop it if it is not done.
                let mut fut = b.recv();
                let polled = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
                match polled {
                    Poll::Ready(outcome) => got.push(outcome.unwrap().envelope),
                    Poll::Pending => cancelled += 1,
                }
                drop(fut);
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("messages lost across cancelled recv calls");
        let expected: Vec<_> = (0..N)
            .map(|i| syn(&format!("m{i}"), ProtocolVersion::V0))
            .collect();
        assert_eq!(got, expected);
        assert!(cancelled > 0, "no recv call was cancelled mid-way");
    }

    /// Two chitchat nodes over the mesh transport, with a secret, replicate ~100 KB of state
    /// (more than one full-size message) to each other.
    #[tokio::test]
    async fn chitchat_nodes_gossip_over_the_mesh() {
        use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatId, FailureDetectorConfig};

        async fn node(
            name: &str,
            seeds: Vec<String>,
            kvs: Vec<(String, String)>,
        ) -> (chitchat::ChitchatHandle, MeshTransport, ChitchatId) {
            let std_socket = bind_local();
            let addr = std_socket.local_addr().unwrap();
            let transport = MeshTransport::new(std_socket, secret("mesh"));
            let id = ChitchatId::new(name, 0, addr);
            let config = ChitchatConfig {
                chitchat_id: id.clone(),
                cluster_id: "test".to_string(),
                gossip_interval: Duration::from_millis(50),
                listen_addr: addr,
                seed_nodes: seeds,
                failure_detector_config: FailureDetectorConfig::default(),
                marked_for_deletion_grace_period: Duration::from_secs(3600),
                catchup_callback: None,
                extra_liveness_predicate: None,
                protocol_version: ProtocolVersion::V0,
            };
            let handle = spawn_chitchat(config, kvs, &transport).await.unwrap();
            (handle, transport, id)
        }

        let kvs: Vec<(String, String)> = (0..100)
            .map(|i| (format!("key-{i:03}"), "v".repeat(1_000)))
            .collect();
        let (ha, ta, id_a) = node("a", Vec::new(), kvs).await;
        let (hb, tb, _id_b) = node(
            "b",
            vec![id_a.gossip_advertise_addr.to_string()],
            Vec::new(),
        )
        .await;
        timeout(Duration::from_secs(20), async {
            loop {
                let done = hb
                    .with_chitchat(|c| {
                        c.node_state(&id_a).is_some_and(|s| {
                            s.get("key-099").is_some() && s.get("key-000").is_some()
                        })
                    })
                    .await;
                if done {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("b never learned a's state over the mesh");
        let (ca, cb) = (ta.stats().snapshot(), tb.stats().snapshot());
        assert!(ca.datagrams_received > 0 && cb.datagrams_received > 0);
        assert_eq!(ca.rejected_auth + cb.rejected_auth, 0);
        assert_eq!(ca.rejected_malformed + cb.rejected_malformed, 0);
        ha.shutdown().await.unwrap();
        hb.shutdown().await.unwrap();
    }

    #[test]
    fn secret_rules_and_redaction() {
        assert_eq!(
            MeshSecret::new("").unwrap_err(),
            TransportError::EmptySecret
        );
        assert_eq!(
            MeshSecret::new(" \n").unwrap_err(),
            TransportError::EmptySecret
        );
        let s = MeshSecret::new("do-not-print-me").unwrap();
        assert_eq!(format!("{s:?}"), "MeshSecret(<redacted>)");
        assert_eq!(
            format!("{:?}", Some(s.clone())),
            "Some(MeshSecret(<redacted>))"
        );
        // Same string, same key; different string, different key.
        let t = MeshSecret::new("do-not-print-me").unwrap();
        let u = MeshSecret::new("do-not-print-me!").unwrap();
        assert_eq!(s.tag(b"data"), t.tag(b"data"));
        assert_ne!(s.tag(b"data"), u.tag(b"data"));
        assert!(s.verify(b"data", &t.tag(b"data")));
        assert!(!s.verify(b"data", &u.tag(b"data")));
        assert!(!s.verify(b"data", &[]));
    }

    #[test]
    fn small_payload_is_one_frame() {
        for secret in [None, secret("k")] {
            let frames = encode_frames(b"hello", 7, secret.as_ref()).unwrap();
            assert_eq!(frames.len(), 1);
            let tag_len = if secret.is_some() { TAG_LEN } else { 0 };
            assert_eq!(frames[0].len(), HEADER_LEN + 5 + tag_len);
            let frame = open_frame(&frames[0], secret.as_ref()).unwrap();
            assert_eq!(
                frame,
                Frame {
                    kind: FrameKind::Whole,
                    id: 7,
                    payload: b"hello"
                }
            );
        }
    }

    #[test]
    fn largest_unsplit_payload() {
        for secret in [None, secret("k")] {
            let chunk = max_chunk(secret.is_some());
            let frames = encode_frames(&vec![1u8; chunk], 1, secret.as_ref()).unwrap();
            assert_eq!(frames.len(), 1);
            assert_eq!(frames[0].len(), MAX_DATAGRAM_LEN);
            let frames = encode_frames(&vec![1u8; chunk + 1], 1, secret.as_ref()).unwrap();
            assert_eq!(frames.len(), 2);
            let err = encode_frames(&vec![1u8; 2 * chunk + 1], 1, secret.as_ref()).unwrap_err();
            assert!(matches!(err, TransportError::MessageTooLarge { .. }));
        }
    }

    #[test]
    fn split_and_reassemble_full_size_payload() {
        let from: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        for secret in [None, secret("k")] {
            let payload: Vec<u8> = (0..MAX_DATAGRAM_LEN as u32)
                .map(|i| (i % 251) as u8)
                .collect();
            let frames = encode_frames(&payload, 0xDEAD_BEEF, secret.as_ref()).unwrap();
            assert_eq!(frames.len(), 2);
            assert!(frames.iter().all(|f| f.len() <= MAX_DATAGRAM_LEN));
            let first = open_frame(&frames[0], secret.as_ref()).unwrap();
            let second = open_frame(&frames[1], secret.as_ref()).unwrap();
            assert_eq!((first.kind, first.id), (FrameKind::FirstHalf, 0xDEAD_BEEF));
            assert_eq!(
                (second.kind, second.id),
                (FrameKind::SecondHalf, 0xDEAD_BEEF)
            );

            let now = Instant::now();
            // In order.
            let mut r = Reassembler::new(MAX_PENDING_HALVES, HALF_TTL);
            assert_eq!(
                r.accept(from, first.id, first.kind, first.payload, now),
                None
            );
            assert_eq!(
                r.accept(from, second.id, second.kind, second.payload, now),
                Some(payload.clone())
            );
            assert_eq!(r.len(), 0);
            // Out of order.
            assert_eq!(
                r.accept(from, second.id, second.kind, second.payload, now),
                None
            );
            assert_eq!(
                r.accept(from, first.id, first.kind, first.payload, now),
                Some(payload.clone())
            );
            // Halves from another sender, or with another id, do not pair.
            let other: SocketAddr = "127.0.0.1:4001".parse().unwrap();
            assert_eq!(
                r.accept(from, 1, FrameKind::FirstHalf, first.payload, now),
                None
            );
            assert_eq!(
                r.accept(other, 1, FrameKind::SecondHalf, second.payload, now),
                None
            );
            assert_eq!(
                r.accept(from, 2, FrameKind::SecondHalf, second.payload, now),
                None
            );
            assert_eq!(r.len(), 3);
        }
    }

    #[test]
    fn tampered_frames_are_rejected() {
        let k = secret("k");
        let frame = encode_frames(b"payload", 1, k.as_ref()).unwrap().remove(0);
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x01;
            assert!(open_frame(&bad, k.as_ref()).is_err(), "byte {i} flipped");
        }
        // Truncated tag.
        assert!(matches!(
            open_frame(&frame[..frame.len() - 1], k.as_ref()),
            Err(FrameError::Auth(_))
        ));
        assert!(matches!(
            open_frame(&frame, secret("other").as_ref()),
            Err(FrameError::Auth(_))
        ));
        assert!(matches!(open_frame(&frame, None), Err(FrameError::Auth(_))));
        let plain = encode_frames(b"payload", 1, None).unwrap().remove(0);
        assert!(matches!(
            open_frame(&plain, k.as_ref()),
            Err(FrameError::Auth(_))
        ));
        assert!(matches!(
            open_frame(b"", None),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            open_frame(&[MAGIC_PLAIN, 0], None),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            open_frame(&[0x42; 40], k.as_ref()),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn reassembler_is_bounded_and_expires() {
        let from: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let start = Instant::now();
        let mut r = Reassembler::new(MAX_PENDING_HALVES, HALF_TTL);
        for id in 0..200u32 {
            let now = start + Duration::from_millis(u64::from(id));
            assert_eq!(r.accept(from, id, FrameKind::FirstHalf, b"a", now), None);
            assert!(r.len() <= MAX_PENDING_HALVES);
        }
        let now = start + Duration::from_millis(200);
        // The oldest were evicted: their second half finds nothing.
        assert_eq!(r.accept(from, 0, FrameKind::SecondHalf, b"b", now), None);
        // A recent one still pairs.
        assert_eq!(
            r.accept(from, 199, FrameKind::SecondHalf, b"b", now),
            Some(b"ab".to_vec())
        );
        // After the TTL everything is gone.
        let later = now + HALF_TTL;
        assert_eq!(
            r.accept(from, 198, FrameKind::SecondHalf, b"b", later),
            None
        );
        assert_eq!(r.len(), 1, "only the half just added remains");
    }

    #[test]
    fn counts_snapshot() {
        let stats = TransportStats::default();
        bump(&stats.rejected_auth, 2);
        bump(&stats.split_messages, 1);
        assert_eq!(
            stats.snapshot(),
            TransportCounts {
                rejected_auth: 2,
                split_messages: 1,
                ..TransportCounts::default()
            }
        );
    }

    #[test]
    fn rate_limited_logging() {
        let logged: Vec<u64> = (0..3_001).filter(|n| should_log(*n)).collect();
        assert_eq!(logged, vec![0, 1_000, 2_000, 3_000]);
    }

    #[test]
    fn sentinel_ids_parse() {
        assert_eq!(sentinel_nonce(&sentinel_envelope(0xABC)), Some(0xABC));
        assert_eq!(sentinel_nonce(&sentinel_envelope(u64::MAX)), Some(u64::MAX));
        assert_eq!(sentinel_nonce(&syn("cluster", ProtocolVersion::V0)), None);
        assert_eq!(
            sentinel_nonce(&syn(&format!("{SENTINEL_PREFIX}12"), ProtocolVersion::V0)),
            None
        );
    }
}
