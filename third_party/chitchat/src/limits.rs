//! Bounds on what peers can make a node hold or process.
//!
//! Every message a node receives is untrusted: a peer (or anyone who can send it a datagram)
//! controls every byte of it. These bounds keep a single message, and the state built from many
//! of them, within a fixed budget. A message over a bound is rejected as invalid with an error;
//! it never panics the node.
//!
//! The bounds are far above what a well-behaved cluster sends: a delta or a digest built by
//! chitchat itself always fits in one UDP datagram.

use crate::MAX_UDP_DATAGRAM_PAYLOAD_SIZE;
use crate::message::ChitchatEnvelope;

/// Most nodes one digest or one delta may name. A V0 digest entry takes at least ~40 bytes, so
/// an honest datagram names at most ~1,600 nodes; compression (V1) lets a hostile one name far
/// more.
pub const MAX_NODES_PER_MESSAGE: usize = 2_048;

/// Most key-value mutations one delta may carry.
pub const MAX_KEY_VALUES_PER_MESSAGE: usize = 100_000;

/// Most bytes a compressed stream (a V1 digest or a delta) may decompress to. Each compressed
/// block inflates to at most 64 KiB, and a datagram can hold thousands of tiny blocks: without
/// this bound one datagram could make a node allocate hundreds of megabytes.
pub const MAX_DECOMPRESSED_STREAM_LEN: usize = 8 * 1024 * 1024;

/// Most nodes a node keeps state for. Nodes named in peers' digests beyond this bound are
/// ignored until dead nodes have been garbage collected.
pub const MAX_KNOWN_NODES: usize = 4_096;

/// Bytes of a message kept for what is not the digest (the delta of a SYN-ACK, the cluster id of
/// a SYN).
pub const DIGEST_RESERVED_LEN: usize = 8 * 1024;

/// Largest serialized digest a node sends. A larger digest is truncated: this node first, then
/// the live nodes, then the others, as many as fit. Nodes left out are simply not reconciled by
/// that message.
pub const MAX_DIGEST_LEN: usize =
    MAX_UDP_DATAGRAM_PAYLOAD_SIZE - ChitchatEnvelope::HEADER_LEN - DIGEST_RESERVED_LEN;

/// Smallest MTU a delta is built for; below it the delta is left empty.
pub const MIN_DELTA_MTU: usize = 100;
