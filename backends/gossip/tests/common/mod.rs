//! What the gossip integration tests share: the gossip interval and a node's configuration.

use std::net::UdpSocket;
use std::time::Duration;

use hivemind_gossip::transport::MeshSecret;
use hivemind_gossip::{Admission, GossipConfig};

/// The tests' gossip interval: short, so every wait stays short.
pub const INTERVAL: Duration = Duration::from_millis(50);

/// A node `node_id` on `socket`, joining through `seeds`, authenticated with `secret` if any;
/// a fresh generation (the time in ms) and every admission mechanism on.
pub fn config(
    node_id: &str,
    socket: &UdpSocket,
    seeds: &[String],
    secret: Option<&str>,
) -> GossipConfig {
    GossipConfig {
        node_id: node_id.into(),
        generation: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        cluster_id: "test".into(),
        advertise_addr: socket.local_addr().unwrap(),
        seeds: seeds.to_vec(),
        gossip_interval: INTERVAL,
        dead_node_grace_period: Duration::from_secs(60),
        secret: secret.map(|s| MeshSecret::new(s).unwrap()),
        previous_secret: None,
        max_keys_per_round: 3_000,
        admission: Admission {
            extrapolate: true,
            fair_share: true,
            horizon_millis: 150,
        },
        early_publish_fraction: 0.8,
        sweep_interval: Duration::from_millis(200),
    }
}
