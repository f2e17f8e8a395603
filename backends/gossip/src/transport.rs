//! The UDP transport hivemind's gossip mesh always uses: [`MeshTransport`], a
//! [`chitchat::transport::Transport`] over a socket the server has already bound. It encodes
//! and decodes chitchat messages itself (with chitchat's public envelope codec), frames them,
//! and, with a [`MeshSecret`], authenticates them and drops replays.
//!
//! Without a secret a datagram is a 6-byte header and chitchat's bytes:
//!
//! ```text
//! +------------+------+-----------+--------------------------+
//! | magic 0xA0 | kind | id (BE)   | payload (chitchat bytes) |
//! | 1 B        | 1 B  | 4 B       | ...                      |
//! +------------+------+-----------+--------------------------+
//! ```
//!
//! With a secret the header also names the sender, the time and a sequence number, and a
//! truncated HMAC-SHA256 tag covers all of it:
//!
//! ```text
//! +------------+------+---------+----------------+--------------+-------+-------------+---------+-------+
//! | magic 0xA2 | kind | id (BE) | timestamp (BE) | sequence (BE)| n     | sender id   | payload | tag   |
//! | 1 B        | 1 B  | 4 B     | 8 B, unix ms   | 8 B          | 1 B   | n B (1-255) | ...     | 16 B  |
//! +------------+------+---------+----------------+--------------+-------+-------------+---------+-------+
//! ```
//!
//! - `magic`: [`MAGIC_PLAIN`] without a secret, [`MAGIC_AUTH`] with one, so a node with a secret
//!   and a node without one reject each other's datagrams instead of half-understanding them.
//!   [`MAGIC_AUTH_V1`] (0xA1, the previous authenticated format, which had no sender, time or
//!   sequence) is refused as unauthenticated.
//! - `kind`: 0 = a whole message, 1 = first half of a split message, 2 = second half.
//! - `id`: per-message number, shared by both halves of a split message so the receiver can pair
//!   them.
//! - `timestamp`: the sender's wall clock when it sent the datagram. The receiver drops a
//!   datagram more than [`TransportOptions::freshness`] (default [`DEFAULT_FRESHNESS`]) away from
//!   its own clock, counted in [`TransportCounts::rejected_stale`].
//! - `sequence`: per sender, one more for every datagram sent; it starts at the sender's wall
//!   clock in nanoseconds when its socket opened, so a restarted sender continues above where it
//!   was. The receiver keeps, per sender id, the highest sequence seen and a bitmap of the
//!   [`REPLAY_WINDOW`] below it, and drops a datagram already seen or older than the window,
//!   counted in [`TransportCounts::rejected_replay`]. At most
//!   [`TransportOptions::max_tracked_senders`] senders are tracked (the least recently heard is
//!   forgotten first), and a sender silent for twice the freshness window is forgotten: any
//!   datagram of it that could still be replayed is stale by then.
//! - `sender id`: the sending node's id ([`TransportOptions::node_id`]), covered by the tag so
//!   a replay cannot pretend to come from a fresh sender.
//! - `tag`: the first 16 bytes of HMAC-SHA256(key, everything before the tag), where the key is
//!   derived from the secret with HKDF-SHA256 ([`KDF_SALT`], [`KDF_INFO`]). Checked in constant
//!   time, against the current secret and then against
//!   [`TransportOptions::previous_secret`], so a rolling secret change does not split the mesh.
//!
//! chitchat fills its messages up to 65,507 bytes (the largest IPv4 UDP payload), so the header
//! and tag can push a full-size message over the limit. Such a message goes out as two
//! datagrams and is reassembled on receipt (at most [`MAX_PENDING_HALVES`] halves waiting, each
//! for at most [`HALF_TTL`]).
//!
//! Datagrams that are malformed, unauthenticated, stale, replayed, or from a link cut with
//! [`LinkControl`] are dropped and counted in [`TransportStats`]; chitchat only ever sees an
//! error when the socket itself fails.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::ChitchatEnvelope;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

/// The largest UDP payload over IPv4, and the largest message chitchat builds.
pub const MAX_DATAGRAM_LEN: usize = 65_507;

/// First byte of a datagram sent without a secret (no tag).
pub const MAGIC_PLAIN: u8 = 0xA0;

/// First byte of the previous authenticated format (no sender, time or sequence): refused.
pub const MAGIC_AUTH_V1: u8 = 0xA1;

/// First byte of a datagram sent with a secret (signed header, 16-byte tag at the end).
pub const MAGIC_AUTH: u8 = 0xA2;

/// Bytes before the payload without a secret: magic (1) + kind (1) + message id (4).
pub const HEADER_LEN: usize = 6;

/// Bytes of the signed header before the sender id: magic (1) + kind (1) + message id (4) +
/// timestamp (8) + sequence (8) + sender id length (1).
pub const AUTH_HEADER_FIXED_LEN: usize = 23;

/// Longest sender id carried in the signed header. A longer node id is replaced by a hash.
pub const MAX_SENDER_ID_LEN: usize = 255;

/// Bytes of the truncated HMAC-SHA256 tag appended when a secret is set.
pub const TAG_LEN: usize = 16;

/// Most split-message halves kept waiting for their other half (about 2 MiB at worst).
pub const MAX_PENDING_HALVES: usize = 64;

/// How long a split-message half waits for its other half before it is dropped.
pub const HALF_TTL: Duration = Duration::from_secs(2);

/// Default of [`TransportOptions::freshness`]: how far a datagram's timestamp may be from the
/// receiver's clock, either way.
pub const DEFAULT_FRESHNESS: Duration = Duration::from_secs(30);

/// Default of [`TransportOptions::max_tracked_senders`].
pub const DEFAULT_MAX_TRACKED_SENDERS: usize = 1_024;

/// Sequence numbers below a sender's highest that are still accepted once (out-of-order
/// delivery); older ones are dropped as replays.
pub const REPLAY_WINDOW: u64 = 64;

/// HKDF salt of the mesh key: fixed, so every node derives the same key from the same secret.
pub const KDF_SALT: &[u8] = b"hivemind-gossip-mesh";

/// HKDF info of the mesh key: names its one use, tagging datagrams of this format.
pub const KDF_INFO: &[u8] = b"hivemind gossip datagram tag v2";

/// Rejections of one kind are logged for the first one and then every this many.
const LOG_EVERY: u64 = 1_000;

/// Receive buffer size: any UDP datagram fits (IPv6 allows a few bytes more than IPv4).
const RECV_BUF_LEN: usize = 65_536;

type HmacSha256 = Hmac<Sha256>;

/// Errors building a [`MeshSecret`] or framing a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportError {
    /// The configured secret is empty or only whitespace.
    #[error("the gossip mesh secret must not be empty")]
    EmptySecret,
    /// The mesh key could not be derived from the secret.
    #[error("the gossip mesh key could not be derived from the secret")]
    KeyDerivation,
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
/// the same one (or have it as its previous secret during a change); a node with another
/// secret (or none) cannot talk to it.
///
/// The secret is taken as the exact string given: a secret that looks like a number is not a
/// number (`"0123"` and `"123"` are different secrets). Its `Debug` output is redacted and it
/// has no `Display`: it must never be logged.
#[derive(Clone)]
pub struct MeshSecret {
    /// HMAC-SHA256 state keyed with the HKDF-derived mesh key, cloned per datagram so the key
    /// schedule is computed once.
    mac: HmacSha256,
}

impl MeshSecret {
    /// Derives the mesh key from `secret` (its UTF-8 bytes exactly as given) with HKDF-SHA256.
    /// Rejects an empty or whitespace-only secret.
    pub fn new(secret: &str) -> Result<MeshSecret, TransportError> {
        if secret.trim().is_empty() {
            return Err(TransportError::EmptySecret);
        }
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(Some(KDF_SALT), secret.as_bytes())
            .expand(KDF_INFO, &mut key)
            .map_err(|_| TransportError::KeyDerivation)?;
        let mac =
            <HmacSha256 as Mac>::new_from_slice(&key).map_err(|_| TransportError::KeyDerivation)?;
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

/// How a [`MeshTransport`] identifies itself and checks what it receives (see
/// [`MeshTransport::with_options`]).
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// This node's id, carried in the signed header so receivers keep one replay window per
    /// sender. Should be unique in the mesh (the chitchat node id). `None` picks a random id
    /// for this transport. Ids longer than [`MAX_SENDER_ID_LEN`] bytes are replaced by a hash.
    pub node_id: Option<String>,
    /// The mesh secret: signs every datagram sent, and received ones must carry a valid tag.
    /// `None` sends and accepts only untagged datagrams (no authentication, no replay checks).
    pub secret: Option<MeshSecret>,
    /// A second secret also accepted on receipt (never used to sign), so a rolling change of
    /// secret does not split the mesh. Ignored without `secret`.
    pub previous_secret: Option<MeshSecret>,
    /// How far a datagram's timestamp may be from this node's clock, either way, before it is
    /// dropped as stale. Bounds how long a captured datagram stays replayable, and how far the
    /// clocks of the mesh may drift apart.
    pub freshness: Duration,
    /// Most senders whose replay window is kept; bounds memory against many sender ids.
    pub max_tracked_senders: usize,
}

impl Default for TransportOptions {
    fn default() -> TransportOptions {
        TransportOptions {
            node_id: None,
            secret: None,
            previous_secret: None,
            freshness: DEFAULT_FRESHNESS,
            max_tracked_senders: DEFAULT_MAX_TRACKED_SENDERS,
        }
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
    /// Authenticated datagrams dropped because their sequence number was already seen or is
    /// older than the replay window: replays (or duplicates made by the network).
    pub rejected_replay: u64,
    /// Authenticated datagrams dropped because their timestamp is outside the freshness window
    /// (an old capture replayed, or a sender whose clock is off).
    pub rejected_stale: u64,
    /// Datagrams accepted because they were signed with the previous secret: non-zero while a
    /// secret change is rolling out, zero once every node signs with the new one.
    pub accepted_previous_secret: u64,
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
    /// See [`TransportCounts::rejected_replay`].
    rejected_replay: AtomicU64,
    /// See [`TransportCounts::rejected_stale`].
    rejected_stale: AtomicU64,
    /// See [`TransportCounts::accepted_previous_secret`].
    accepted_previous_secret: AtomicU64,
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
            rejected_replay: self.rejected_replay.load(Ordering::Relaxed),
            rejected_stale: self.rejected_stale.load(Ordering::Relaxed),
            accepted_previous_secret: self.accepted_previous_secret.load(Ordering::Relaxed),
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
/// optional authentication and replay protection, splitting, counters and link control
/// described in the [module docs](self).
///
/// [`Transport::open`] hands the socket out once; a second `open` fails.
#[derive(Debug)]
pub struct MeshTransport {
    /// The bound socket, until `open` takes it (the server binds every socket before starting
    /// chitchat, so the port is known and owned up front).
    socket: Mutex<Option<std::net::UdpSocket>>,
    /// Identity, secrets and replay settings, handed to the socket when it is opened.
    options: TransportOptions,
    /// Counters shared with the opened socket and with [`stats`](Self::stats) callers.
    stats: Arc<TransportStats>,
    /// Link cuts shared with the opened socket and with [`links`](Self::links) callers.
    links: LinkControl,
}

impl MeshTransport {
    /// Wraps an already bound socket. With `secret`, every datagram is signed and every
    /// received one must carry a valid tag and pass the freshness and replay checks. The
    /// sender id is random; prefer [`with_options`](Self::with_options) with the node id.
    pub fn new(socket: std::net::UdpSocket, secret: Option<MeshSecret>) -> MeshTransport {
        MeshTransport::with_options(
            socket,
            TransportOptions {
                secret,
                ..TransportOptions::default()
            },
        )
    }

    /// Wraps an already bound socket with `options` (node id, secret and previous secret,
    /// freshness window, replay tracking bound).
    pub fn with_options(socket: std::net::UdpSocket, options: TransportOptions) -> MeshTransport {
        MeshTransport {
            socket: Mutex::new(Some(socket)),
            options,
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
        let signer = self.options.secret.clone().map(|secret| Signer {
            secret,
            sender: sender_id(self.options.node_id.as_deref(), local_addr),
            next_seq: unix_nanos(),
        });
        let keys = Keys {
            current: self.options.secret.clone(),
            previous: self
                .options
                .secret
                .as_ref()
                .and(self.options.previous_secret.clone()),
        };
        let freshness_ms = u64::try_from(self.options.freshness.as_millis()).unwrap_or(u64::MAX);
        Ok(Box::new(MeshSocket {
            socket,
            local_addr,
            signer,
            keys,
            freshness_ms,
            replay: ReplayGuard::new(
                self.options.max_tracked_senders,
                freshness_ms.saturating_mul(2),
            ),
            stats: Arc::clone(&self.stats),
            links: self.links.clone(),
            next_id: seed_u64(local_addr.port()) as u32,
            recv_buf: vec![0u8; RECV_BUF_LEN].into_boxed_slice(),
            send_buf: Vec::with_capacity(MAX_DATAGRAM_LEN),
            reassembler: Reassembler::new(MAX_PENDING_HALVES, HALF_TTL),
            transient_errors: 0,
        }))
    }
}

/// The sender id this node signs with: its node id, a hash of it if too long, or a random id.
fn sender_id(node_id: Option<&str>, local_addr: SocketAddr) -> Vec<u8> {
    match node_id {
        Some(id) if !id.is_empty() && id.len() <= MAX_SENDER_ID_LEN => id.as_bytes().to_vec(),
        Some(id) if !id.is_empty() => {
            let hash = Sha256::digest(id.as_bytes());
            let hex: String = hash.iter().take(16).map(|b| format!("{b:02x}")).collect();
            format!("sha256:{hex}").into_bytes()
        }
        _ => {
            let salt = local_addr.port() ^ (std::process::id() as u16);
            let random = seed_u64(salt) ^ unix_nanos().rotate_left(17);
            format!("anon-{random:016x}").into_bytes()
        }
    }
}

/// The wall clock in milliseconds since the Unix epoch (0 before it).
fn unix_millis() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

/// The wall clock in nanoseconds since the Unix epoch (0 before it): the first sequence number
/// of a socket, so a restarted sender continues above its previous run.
fn unix_nanos() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_nanos()).unwrap_or(u64::MAX)
}

/// A number that differs between runs and sockets: seeds message ids and random sender ids.
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

/// What signs outgoing datagrams when a secret is set.
struct Signer {
    /// The current mesh secret (the previous one never signs).
    secret: MeshSecret,
    /// This node's sender id, carried in every signed header.
    sender: Vec<u8>,
    /// Sequence number of the next datagram sent.
    next_seq: u64,
}

/// The keys a received datagram may be signed with.
struct Keys {
    /// The current secret; `None` means the mesh runs without authentication.
    current: Option<MeshSecret>,
    /// The previous secret, still accepted during a rolling change.
    previous: Option<MeshSecret>,
}

/// The opened socket chitchat drives.
struct MeshSocket {
    /// The mesh UDP socket.
    socket: tokio::net::UdpSocket,
    /// Its address, cached for `Socket::local_addr`.
    local_addr: SocketAddr,
    /// Signs what is sent, when there is a secret.
    signer: Option<Signer>,
    /// Checks what is received.
    keys: Keys,
    /// Freshness window in milliseconds, either way of this node's clock.
    freshness_ms: u64,
    /// Per-sender sequence windows: drops replays of authenticated datagrams.
    replay: ReplayGuard,
    /// Counters shared with the transport.
    stats: Arc<TransportStats>,
    /// Link cuts shared with the transport.
    links: LinkControl,
    /// Id of the next message sent; both halves of a split message share it.
    next_id: u32,
    /// Buffer datagrams are read into.
    recv_buf: Box<[u8]>,
    /// Buffer messages are serialized into, reused.
    send_buf: Vec<u8>,
    /// Halves of split messages waiting for their other half.
    reassembler: Reassembler,
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
        self.send_buf.clear();
        envelope.serialize(&mut self.send_buf);
        let num_bytes_sent = self.send_buf.len();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        if self.links.is_blocked(to_addr) {
            let datagrams = if num_bytes_sent > max_chunk(self.signer.as_ref()) {
                2
            } else {
                1
            };
            bump(&self.stats.dropped_by_link_control, datagrams);
            return Ok(SendOutcome { num_bytes_sent });
        }
        let frames = encode_frames(&self.send_buf, id, self.signer.as_mut(), unix_millis())
            .context("failed to frame a gossip message")?;
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

    /// Cancel-safe: a datagram is read and fully handled without an await in between.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let (len, from_addr) = match self.socket.recv_from(&mut self.recv_buf[..]).await {
                Ok(received) => received,
                Err(err) if is_transient_io_error(&err) => {
                    if should_log(self.transient_errors) {
                        warn!(
                            error = %err,
                            count = self.transient_errors + 1,
                            "transient udp recv error on the gossip mesh socket"
                        );
                    }
                    self.transient_errors += 1;
                    continue;
                }
                Err(err) => {
                    return Err(err).context("fatal UDP recv error on the gossip mesh socket");
                }
            };
            if let Some(outcome) = self.accept(len, from_addr) {
                return Ok(outcome);
            }
        }
    }
}

impl MeshSocket {
    /// Checks the datagram of `len` bytes in the receive buffer and decodes it; `None` when it
    /// is dropped (counted) or is the first half of a split message.
    fn accept(&mut self, len: usize, from_addr: SocketAddr) -> Option<RecvOutcome> {
        bump(&self.stats.datagrams_received, 1);
        bump(&self.stats.bytes_received, len as u64);
        if self.links.is_blocked(from_addr) {
            bump(&self.stats.dropped_by_link_control, 1);
            return None;
        }
        let datagram = self.recv_buf.get(..len)?;
        let frame = match open_frame(datagram, &self.keys) {
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
                return None;
            }
            Err(FrameError::Malformed(reason)) => {
                reject_malformed(&self.stats, from_addr, reason);
                return None;
            }
        };
        if let Some(auth) = &frame.auth {
            let now_ms = unix_millis();
            if auth.timestamp_ms.abs_diff(now_ms) > self.freshness_ms {
                let previous = bump(&self.stats.rejected_stale, 1);
                if should_log(previous) {
                    warn!(
                        from = %from_addr,
                        sender = %String::from_utf8_lossy(auth.sender),
                        skew_ms = i128::from(auth.timestamp_ms) - i128::from(now_ms),
                        count = previous + 1,
                        "rejected stale gossip datagram (replayed, or clocks out of sync?)"
                    );
                }
                return None;
            }
            if !self.replay.check(auth.sender, auth.seq, now_ms) {
                let previous = bump(&self.stats.rejected_replay, 1);
                if should_log(previous) {
                    debug!(
                        from = %from_addr,
                        sender = %String::from_utf8_lossy(auth.sender),
                        count = previous + 1,
                        "rejected replayed gossip datagram"
                    );
                }
                return None;
            }
            if auth.with_previous_secret {
                bump(&self.stats.accepted_previous_secret, 1);
            }
        }
        let whole;
        let payload: &[u8] = match frame.kind {
            FrameKind::Whole => frame.payload,
            kind => {
                let now = std::time::Instant::now();
                whole = self
                    .reassembler
                    .accept(from_addr, frame.id, kind, frame.payload, now)?;
                &whole
            }
        };
        let num_bytes_received = payload.len();
        match ChitchatEnvelope::deserialize(&mut &payload[..]) {
            Ok(envelope) => Some(RecvOutcome {
                from_addr,
                envelope,
                num_bytes_received,
            }),
            Err(_) => {
                reject_malformed(
                    &self.stats,
                    from_addr,
                    "chitchat could not decode the message",
                );
                None
            }
        }
    }
}

/// Counts a malformed datagram or message, logging only the first and every 1000th.
fn reject_malformed(stats: &TransportStats, from_addr: SocketAddr, reason: &'static str) {
    let previous = bump(&stats.rejected_malformed, 1);
    if should_log(previous) {
        debug!(
            from = %from_addr,
            reason,
            count = previous + 1,
            "rejected malformed gossip datagram"
        );
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

/// The signed fields of an authenticated datagram.
#[derive(Debug, PartialEq, Eq)]
struct FrameAuth<'a> {
    /// The sender's id.
    sender: &'a [u8],
    /// The sender's clock when it sent the datagram, Unix milliseconds.
    timestamp_ms: u64,
    /// The sender's sequence number of this datagram.
    seq: u64,
    /// Whether the tag matched the previous secret rather than the current one.
    with_previous_secret: bool,
}

/// A checked datagram.
#[derive(Debug, PartialEq, Eq)]
struct Frame<'a> {
    /// Whole message or which half.
    kind: FrameKind,
    /// Message id, pairing the halves of a split message.
    id: u32,
    /// The chitchat bytes (or half of them), header and tag removed.
    payload: &'a [u8],
    /// The signed fields, when the mesh has a secret.
    auth: Option<FrameAuth<'a>>,
}

/// Why a datagram was refused.
#[derive(Debug, PartialEq, Eq)]
enum FrameError {
    /// Missing or wrong tag, or a tagged/untagged mismatch with this node's configuration.
    Auth(&'static str),
    /// Anything else that is not a valid mesh datagram.
    Malformed(&'static str),
}

/// The largest payload one datagram carries with `signer`'s header and tag, or without.
fn max_chunk(signer: Option<&Signer>) -> usize {
    match signer {
        Some(signer) => MAX_DATAGRAM_LEN - AUTH_HEADER_FIXED_LEN - signer.sender.len() - TAG_LEN,
        None => MAX_DATAGRAM_LEN - HEADER_LEN,
    }
}

/// Frames `payload` as one datagram, or two if it does not fit in one. Each datagram signed
/// by `signer` takes the next sequence number.
fn encode_frames(
    payload: &[u8],
    id: u32,
    mut signer: Option<&mut Signer>,
    now_ms: u64,
) -> Result<Vec<Vec<u8>>, TransportError> {
    let chunk = max_chunk(signer.as_deref());
    if payload.len() <= chunk {
        return Ok(vec![encode_frame(
            FrameKind::Whole,
            id,
            payload,
            signer,
            now_ms,
        )]);
    }
    if payload.len() > 2 * chunk {
        return Err(TransportError::MessageTooLarge {
            len: payload.len(),
            max: 2 * chunk,
        });
    }
    let (first, second) = payload.split_at(payload.len().div_ceil(2));
    Ok(vec![
        encode_frame(
            FrameKind::FirstHalf,
            id,
            first,
            signer.as_deref_mut(),
            now_ms,
        ),
        encode_frame(FrameKind::SecondHalf, id, second, signer, now_ms),
    ])
}

/// Frames one datagram: header, payload, and the tag when there is a signer.
fn encode_frame(
    kind: FrameKind,
    id: u32,
    payload: &[u8],
    signer: Option<&mut Signer>,
    now_ms: u64,
) -> Vec<u8> {
    let Some(signer) = signer else {
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        frame.push(MAGIC_PLAIN);
        frame.push(kind.code());
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(payload);
        return frame;
    };
    let seq = signer.next_seq;
    signer.next_seq = signer.next_seq.wrapping_add(1);
    let sender = &signer.sender[..signer.sender.len().min(MAX_SENDER_ID_LEN)];
    let mut frame =
        Vec::with_capacity(AUTH_HEADER_FIXED_LEN + sender.len() + payload.len() + TAG_LEN);
    frame.push(MAGIC_AUTH);
    frame.push(kind.code());
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(&now_ms.to_be_bytes());
    frame.extend_from_slice(&seq.to_be_bytes());
    frame.push(sender.len() as u8);
    frame.extend_from_slice(sender);
    frame.extend_from_slice(payload);
    let tag = signer.secret.tag(&frame);
    frame.extend_from_slice(&tag);
    frame
}

/// Reads a big-endian u64 at `at` in `bytes`, if it is there.
fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let raw: [u8; 8] = bytes.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_be_bytes(raw))
}

/// Reads a big-endian u32 at `at` in `bytes`, if it is there.
fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(raw))
}

/// Checks a received datagram against this node's keys and splits it into parts. Freshness
/// and replay are checked by the caller, which knows the clock and the senders seen.
fn open_frame<'a>(datagram: &'a [u8], keys: &Keys) -> Result<Frame<'a>, FrameError> {
    let Some(&magic) = datagram.first() else {
        return Err(FrameError::Malformed("empty datagram"));
    };
    match (magic, &keys.current) {
        (MAGIC_AUTH, Some(current)) => {
            if datagram.len() < AUTH_HEADER_FIXED_LEN + TAG_LEN {
                return Err(FrameError::Malformed(
                    "datagram too short for header and tag",
                ));
            }
            let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
            let with_previous_secret = if current.verify(signed, tag) {
                false
            } else if keys
                .previous
                .as_ref()
                .is_some_and(|previous| previous.verify(signed, tag))
            {
                true
            } else {
                return Err(FrameError::Auth("wrong tag (different secret?)"));
            };
            let kind = signed
                .get(1)
                .copied()
                .and_then(FrameKind::from_code)
                .ok_or(FrameError::Malformed("unknown frame kind"))?;
            let malformed = FrameError::Malformed("datagram shorter than its signed header");
            let id = be_u32(signed, 2).ok_or(FrameError::Malformed("no message id"))?;
            let timestamp_ms = be_u64(signed, 6).ok_or(FrameError::Malformed("no timestamp"))?;
            let seq = be_u64(signed, 14).ok_or(FrameError::Malformed("no sequence"))?;
            let sender_len = usize::from(*signed.get(22).ok_or(FrameError::Malformed("no sender"))?);
            if sender_len == 0 {
                return Err(FrameError::Malformed("empty sender id"));
            }
            let payload_start = AUTH_HEADER_FIXED_LEN + sender_len;
            let sender = signed.get(AUTH_HEADER_FIXED_LEN..payload_start).ok_or(malformed)?;
            let payload = signed.get(payload_start..).unwrap_or_default();
            Ok(Frame {
                kind,
                id,
                payload,
                auth: Some(FrameAuth {
                    sender,
                    timestamp_ms,
                    seq,
                    with_previous_secret,
                }),
            })
        }
        (MAGIC_PLAIN, None) => {
            let Some((header, payload)) = datagram.split_at_checked(HEADER_LEN) else {
                return Err(FrameError::Malformed("datagram shorter than the header"));
            };
            let kind = header
                .get(1)
                .copied()
                .and_then(FrameKind::from_code)
                .ok_or(FrameError::Malformed("unknown frame kind"))?;
            let id = be_u32(header, 2).ok_or(FrameError::Malformed("no message id"))?;
            Ok(Frame {
                kind,
                id,
                payload,
                auth: None,
            })
        }
        (MAGIC_PLAIN, Some(_)) => Err(FrameError::Auth("untagged datagram (peer has no secret)")),
        (MAGIC_AUTH, None) => Err(FrameError::Auth(
            "tagged datagram (peer has a secret, this node has none)",
        )),
        (MAGIC_AUTH_V1, _) => Err(FrameError::Auth(
            "previous authenticated format without replay protection (peer runs an older hivemind?)",
        )),
        _ => Err(FrameError::Malformed(
            "not a gossip mesh datagram (bad magic)",
        )),
    }
}

/// Per-sender sliding windows of authenticated sequence numbers: a datagram whose sequence was
/// already accepted, or is more than [`REPLAY_WINDOW`] below the sender's highest, is a replay.
/// Bounded: at most `max_senders` windows (the least recently heard is forgotten first), and a
/// window idle for `forget_after_ms` is forgotten (what it protected is stale by then).
struct ReplayGuard {
    /// Windows by sender id.
    senders: HashMap<Vec<u8>, SenderWindow>,
    /// Most windows kept.
    max_senders: usize,
    /// Idle time after which a window is forgotten, in milliseconds.
    forget_after_ms: u64,
}

/// The sequence numbers accepted from one sender.
struct SenderWindow {
    /// The highest sequence number accepted.
    highest: u64,
    /// Bit `i` set: `highest - i` was accepted.
    seen: u64,
    /// This node's clock when the sender was last accepted, Unix milliseconds.
    last_heard_ms: u64,
}

impl ReplayGuard {
    /// No sender tracked yet.
    fn new(max_senders: usize, forget_after_ms: u64) -> ReplayGuard {
        ReplayGuard {
            senders: HashMap::new(),
            max_senders: max_senders.max(1),
            forget_after_ms,
        }
    }

    /// Whether `seq` from `sender` is new; records it if so.
    fn check(&mut self, sender: &[u8], seq: u64, now_ms: u64) -> bool {
        let forget_after_ms = self.forget_after_ms;
        if let Some(window) = self.senders.get_mut(sender) {
            if now_ms.saturating_sub(window.last_heard_ms) <= forget_after_ms {
                let accepted = window.accept(seq);
                if accepted {
                    window.last_heard_ms = now_ms;
                }
                return accepted;
            }
            // Idle long enough that anything it protected is stale: start afresh.
            *window = SenderWindow::starting_at(seq, now_ms);
            return true;
        }
        while self.senders.len() >= self.max_senders {
            let Some(oldest) = self
                .senders
                .iter()
                .min_by_key(|(_, window)| window.last_heard_ms)
                .map(|(sender, _)| sender.clone())
            else {
                break;
            };
            self.senders.remove(&oldest);
        }
        self.senders
            .insert(sender.to_vec(), SenderWindow::starting_at(seq, now_ms));
        true
    }

    /// How many senders are tracked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.senders.len()
    }
}

impl SenderWindow {
    /// A window whose only accepted sequence is `seq`.
    fn starting_at(seq: u64, now_ms: u64) -> SenderWindow {
        SenderWindow {
            highest: seq,
            seen: 1,
            last_heard_ms: now_ms,
        }
    }

    /// Whether `seq` is new to this window; records it if so.
    fn accept(&mut self, seq: u64) -> bool {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.seen = if shift >= REPLAY_WINDOW {
                1
            } else {
                (self.seen << shift) | 1
            };
            self.highest = seq;
            return true;
        }
        let behind = self.highest - seq;
        if behind >= REPLAY_WINDOW {
            return false;
        }
        let bit = 1u64 << behind;
        if self.seen & bit != 0 {
            return false;
        }
        self.seen |= bit;
        true
    }
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

#[cfg(test)]
mod tests {
    use std::task::Poll;
    use std::time::Instant;

    use tokio::time::timeout;

    use chitchat::{ChitchatMessage, ProtocolVersion};
    use std::net::Ipv4Addr;

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

    fn signer(s: &str, sender: &str) -> Signer {
        Signer {
            secret: MeshSecret::new(s).unwrap(),
            sender: sender.as_bytes().to_vec(),
            next_seq: 1_000,
        }
    }

    fn keys(current: Option<&str>, previous: Option<&str>) -> Keys {
        Keys {
            current: current.map(|s| MeshSecret::new(s).unwrap()),
            previous: previous.map(|s| MeshSecret::new(s).unwrap()),
        }
    }

    const NOW_MS: u64 = 1_700_000_000_000;

    #[test]
    fn small_payload_is_one_frame() {
        let frames = encode_frames(b"hello", 7, None, NOW_MS).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].len(), HEADER_LEN + 5);
        let frame = open_frame(&frames[0], &keys(None, None)).unwrap();
        assert_eq!(
            frame,
            Frame {
                kind: FrameKind::Whole,
                id: 7,
                payload: b"hello",
                auth: None,
            }
        );

        let mut s = signer("k", "node-1");
        let frames = encode_frames(b"hello", 7, Some(&mut s), NOW_MS).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].len(), AUTH_HEADER_FIXED_LEN + 6 + 5 + TAG_LEN);
        assert_eq!(s.next_seq, 1_001);
        let frame = open_frame(&frames[0], &keys(Some("k"), None)).unwrap();
        assert_eq!(
            frame,
            Frame {
                kind: FrameKind::Whole,
                id: 7,
                payload: b"hello",
                auth: Some(FrameAuth {
                    sender: b"node-1",
                    timestamp_ms: NOW_MS,
                    seq: 1_000,
                    with_previous_secret: false,
                }),
            }
        );
    }

    #[test]
    fn largest_unsplit_payload() {
        let mut s = signer("k", "node-1");
        for signed in [false, true] {
            let chunk = max_chunk(signed.then_some(&s));
            let mut signer = signed.then_some(&mut s);
            let frames =
                encode_frames(&vec![1u8; chunk], 1, signer.as_deref_mut(), NOW_MS).unwrap();
            assert_eq!(frames.len(), 1);
            assert_eq!(frames[0].len(), MAX_DATAGRAM_LEN);
            let frames =
                encode_frames(&vec![1u8; chunk + 1], 1, signer.as_deref_mut(), NOW_MS).unwrap();
            assert_eq!(frames.len(), 2);
            let err = encode_frames(&vec![1u8; 2 * chunk + 1], 1, signer, NOW_MS).unwrap_err();
            assert!(matches!(err, TransportError::MessageTooLarge { .. }));
        }
    }

    #[test]
    fn split_and_reassemble_full_size_payload() {
        let from: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let payload: Vec<u8> = (0..MAX_DATAGRAM_LEN as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut s = signer("k", "node-1");
        let frames = encode_frames(&payload, 0xDEAD_BEEF, Some(&mut s), NOW_MS).unwrap();
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.len() <= MAX_DATAGRAM_LEN));
        let k = keys(Some("k"), None);
        let first = open_frame(&frames[0], &k).unwrap();
        let second = open_frame(&frames[1], &k).unwrap();
        assert_eq!((first.kind, first.id), (FrameKind::FirstHalf, 0xDEAD_BEEF));
        assert_eq!(
            (second.kind, second.id),
            (FrameKind::SecondHalf, 0xDEAD_BEEF)
        );
        // Each datagram has its own sequence number.
        assert_eq!(
            first.auth.as_ref().unwrap().seq + 1,
            second.auth.unwrap().seq
        );
        let now = Instant::now();
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

    #[test]
    fn tampered_frames_are_rejected() {
        let k = keys(Some("k"), None);
        let frame = encode_frames(b"payload", 1, Some(&mut signer("k", "n")), NOW_MS)
            .unwrap()
            .remove(0);
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x01;
            assert!(open_frame(&bad, &k).is_err(), "byte {i} flipped");
        }
        // Truncated tag.
        assert!(matches!(
            open_frame(&frame[..frame.len() - 1], &k),
            Err(FrameError::Auth(_))
        ));
        assert!(matches!(
            open_frame(&frame, &keys(Some("other"), None)),
            Err(FrameError::Auth(_))
        ));
        assert!(matches!(
            open_frame(&frame, &keys(None, None)),
            Err(FrameError::Auth(_))
        ));
        let plain = encode_frames(b"payload", 1, None, NOW_MS)
            .unwrap()
            .remove(0);
        assert!(matches!(open_frame(&plain, &k), Err(FrameError::Auth(_))));
        // The previous authenticated format is refused even with a valid-looking layout.
        let mut v1 = frame.clone();
        v1[0] = MAGIC_AUTH_V1;
        assert!(matches!(open_frame(&v1, &k), Err(FrameError::Auth(_))));
        assert!(matches!(open_frame(b"", &k), Err(FrameError::Malformed(_))));
        assert!(matches!(
            open_frame(&[MAGIC_PLAIN, 0], &keys(None, None)),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            open_frame(&[0x42; 40], &k),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            open_frame(&[MAGIC_AUTH; 60], &k),
            Err(FrameError::Auth(_))
        ));
    }

    /// Signed frames whose sender length points past the end, or is zero, are malformed (never
    /// an out-of-bounds read).
    #[test]
    fn inconsistent_sender_length_is_malformed() {
        let secret = MeshSecret::new("k").unwrap();
        for sender_len in [0u8, 200, 255] {
            let mut frame = vec![MAGIC_AUTH, 0, 0, 0, 0, 1];
            frame.extend_from_slice(&NOW_MS.to_be_bytes());
            frame.extend_from_slice(&5u64.to_be_bytes());
            frame.push(sender_len);
            frame.extend_from_slice(b"abc");
            let tag = secret.tag(&frame);
            frame.extend_from_slice(&tag);
            assert!(
                matches!(
                    open_frame(&frame, &keys(Some("k"), None)),
                    Err(FrameError::Malformed(_))
                ),
                "sender length {sender_len}"
            );
        }
    }

    #[test]
    fn previous_secret_is_accepted_and_flagged() {
        let frame = encode_frames(b"p", 1, Some(&mut signer("old", "n")), NOW_MS)
            .unwrap()
            .remove(0);
        let opened = open_frame(&frame, &keys(Some("new"), Some("old"))).unwrap();
        assert!(opened.auth.unwrap().with_previous_secret);
        assert!(matches!(
            open_frame(&frame, &keys(Some("new"), None)),
            Err(FrameError::Auth(_))
        ));
        let current = encode_frames(b"p", 1, Some(&mut signer("new", "n")), NOW_MS)
            .unwrap()
            .remove(0);
        let opened = open_frame(&current, &keys(Some("new"), Some("old"))).unwrap();
        assert!(!opened.auth.unwrap().with_previous_secret);
    }

    #[test]
    fn replay_window_accepts_each_sequence_once() {
        let mut guard = ReplayGuard::new(16, 60_000);
        assert!(guard.check(b"a", 100, NOW_MS));
        assert!(!guard.check(b"a", 100, NOW_MS), "exact replay");
        // Out of order within the window, once each.
        assert!(guard.check(b"a", 105, NOW_MS));
        assert!(guard.check(b"a", 103, NOW_MS));
        assert!(!guard.check(b"a", 103, NOW_MS));
        assert!(guard.check(b"a", 101, NOW_MS));
        // Far ahead, then older than the window.
        assert!(guard.check(b"a", 1_000, NOW_MS));
        assert!(!guard.check(b"a", 1_000 - REPLAY_WINDOW, NOW_MS));
        assert!(guard.check(b"a", 1_000 - REPLAY_WINDOW + 1, NOW_MS));
        assert!(!guard.check(b"a", 105, NOW_MS));
        // Another sender has its own window.
        assert!(guard.check(b"b", 100, NOW_MS));
        // A sender idle past the forget time starts afresh.
        assert!(guard.check(b"a", 50, NOW_MS + 60_001));
        assert!(!guard.check(b"a", 50, NOW_MS + 60_002));
    }

    #[test]
    fn replay_guard_is_bounded() {
        let mut guard = ReplayGuard::new(8, 60_000);
        for i in 0..100u64 {
            assert!(guard.check(format!("s{i}").as_bytes(), 1, NOW_MS + i));
            assert!(guard.len() <= 8);
        }
        // The most recent senders are still tracked; the oldest were forgotten.
        assert!(!guard.check(b"s99", 1, NOW_MS + 100));
        assert!(guard.check(b"s0", 1, NOW_MS + 100));
    }

    #[test]
    fn long_node_ids_are_hashed_and_missing_ones_are_random() {
        let addr: SocketAddr = "127.0.0.1:7946".parse().unwrap();
        assert_eq!(sender_id(Some("node-1"), addr), b"node-1".to_vec());
        let long = "x".repeat(MAX_SENDER_ID_LEN + 1);
        let hashed = sender_id(Some(&long), addr);
        assert!(hashed.len() <= MAX_SENDER_ID_LEN && hashed.starts_with(b"sha256:"));
        assert_ne!(hashed, sender_id(Some(&"y".repeat(300)), addr));
        assert!(sender_id(None, addr).starts_with(b"anon-"));
    }

    /// Garbage and a well-framed but undecodable payload are rejected as malformed; a good
    /// message then still arrives.
    async fn garbage_then_good(secret_b: Option<&str>) {
        let (tb, mut b, addr_b) = open_mesh(secret_b.and_then(secret)).await;
        let raw = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let mut s = secret_b.map(|k| signer(k, "garbage"));
        let magic = if s.is_some() { MAGIC_AUTH } else { MAGIC_PLAIN };
        let good = syn("c", ProtocolVersion::V0).serialize_to_vec();
        let mut wrong_type = good.clone();
        wrong_type[3] = 200;
        let now = unix_millis();
        let mut garbage: Vec<Vec<u8>> = vec![b"junk".to_vec(), Vec::new(), vec![magic, 0, 1]];
        for payload in [&b"x"[..], &good[..5], &wrong_type[..]] {
            garbage.push(
                encode_frames(payload, 1, s.as_mut(), now)
                    .unwrap()
                    .remove(0),
            );
        }
        for datagram in &garbage {
            raw.send_to(datagram, addr_b).await.unwrap();
        }
        let frame = encode_frames(&good, 5, s.as_mut(), now).unwrap().remove(0);
        raw.send_to(&frame, addr_b).await.unwrap();
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
        // Replaying the good frame is refused with a secret, delivered again without one.
        raw.send_to(&frame, addr_b).await.unwrap();
        if secret_b.is_some() {
            assert_nothing_received(&mut b).await;
            assert_eq!(tb.stats().snapshot().rejected_replay, 1);
        } else {
            assert_eq!(
                recv_within(&mut b).await.envelope,
                syn("c", ProtocolVersion::V0)
            );
        }
        // A stale one is refused with a secret.
        if let Some(s) = s.as_mut() {
            let stale = encode_frames(&good, 6, Some(s), now - 31_000)
                .unwrap()
                .remove(0);
            raw.send_to(&stale, addr_b).await.unwrap();
            assert_nothing_received(&mut b).await;
            assert_eq!(tb.stats().snapshot().rejected_stale, 1);
        }
    }

    #[tokio::test]
    async fn garbage_is_rejected_and_good_messages_still_arrive() {
        garbage_then_good(None).await;
    }

    #[tokio::test]
    async fn garbage_is_rejected_and_good_messages_still_arrive_with_secret() {
        garbage_then_good(Some("s3cret")).await;
    }
}
