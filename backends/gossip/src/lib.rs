//! hivemind-gossip: the `gossip` strategy. Each node counts locally and shares its own counts
//! over a chitchat mesh (UDP); admission uses its own count plus an estimate of its peers'.
//!
//! - [`wire`]: the compact key-value a node publishes per counter key.
//! - [`publish`]: which of this node's counts go out each round (nearest their limit first).
//! - [`view`]: peers' counts folded into a read-mostly view the request path reads.
//! - [`admission`]: the overshoot-reduction arithmetic (extrapolation, fair share).
//! - [`transport`]: UDP for chitchat, optionally authenticated with a shared secret.
//! - [`settings`]: the `mesh` settings section and its translation into a [`GossipConfig`].
//! - [`mesh`]: the running node: chitchat, the publisher and absorber tasks, membership, and
//!   the [`SyncStrategy`](hivemind_core::SyncStrategy) implementation.

pub mod admission;
pub mod mesh;
pub mod publish;
pub mod settings;
pub mod transport;
pub mod view;
pub mod wire;

pub use admission::Admission;
pub use mesh::{Gossip, GossipConfig, GossipError, Membership, PeerInfo};
pub use settings::{MeshSettings, MeshSettingsError};
pub use transport::{
    LinkControl, MeshSecret, MeshTransport, TransportCounts, TransportError, TransportOptions,
    TransportStats,
};
