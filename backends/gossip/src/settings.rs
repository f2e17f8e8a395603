//! The `mesh` settings section and its translation into a running node's [`GossipConfig`]:
//! node id, generation, advertise address, secret, admission switches.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use hivemind_core::settings::SettingsCheck;

use crate::admission::Admission;
use crate::mesh::GossipConfig;
use crate::transport::MeshSecret;

/// The `mesh` settings section: the gossip mesh (strategy `gossip`). Every field has a
/// default (see `config/hivemind.yaml`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshSettings {
    /// This node's id in the mesh (`--node-id`); generated when absent.
    pub node_id: Option<String>,
    /// UDP address the mesh binds (`--mesh-addr`). Loopback by default: binding an address other
    /// hosts can reach needs `secret` (or `insecure: true`).
    pub addr: SocketAddr,
    /// The address peers reach this node at; when absent, the bound address, or for an
    /// unspecified bind (0.0.0.0) the local address that routes to the first seed.
    pub advertise_addr: Option<SocketAddr>,
    /// Seed peers `host:port` to join through (`--peers`, comma-separated in flags and env).
    #[serde(deserialize_with = "hivemind_core::settings::comma_separated")]
    pub peers: Vec<String>,
    /// Nodes with another cluster id are ignored.
    pub cluster_id: String,
    /// Chitchat's gossip round interval.
    #[serde(with = "humantime_serde")]
    pub gossip_interval: Duration,
    /// How long a dead node's state is kept before it is forgotten.
    #[serde(with = "humantime_serde")]
    pub dead_node_grace_period: Duration,
    /// A shared secret authenticating every mesh datagram (HMAC-SHA256); redacted in output.
    #[serde(
        serialize_with = "hivemind_core::settings::redacted",
        deserialize_with = "hivemind_core::settings::secret_string"
    )]
    pub secret: Option<String>,
    /// The secret before the current one, still accepted on receipt (never used to sign) while
    /// a secret change rolls out: set it to the new secret everywhere first, then swap the two,
    /// then drop it. Redacted in output.
    #[serde(
        serialize_with = "hivemind_core::settings::redacted",
        deserialize_with = "hivemind_core::settings::secret_string"
    )]
    pub previous_secret: Option<String>,
    /// Run a mesh reachable from other hosts without a secret: anyone who reaches the port can
    /// join and publish counts. Logged as a warning at start. For trusted networks only.
    pub insecure: bool,
    /// The most counter keys published per gossip interval; beyond it, keys nearest their
    /// limits go first.
    pub max_keys_per_round: usize,
    /// Extrapolate peers' counts by their observed rates and the age of their last update.
    pub extrapolate: bool,
    /// Near a limit, admit only this node's share of the remainder by observed demand.
    pub fair_share: bool,
    /// Publish a key out of turn when it crosses this fraction of its limit (0 = off).
    pub early_publish_fraction: f64,
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            node_id: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 7946)),
            advertise_addr: None,
            peers: Vec::new(),
            cluster_id: "hivemind".into(),
            gossip_interval: Duration::from_millis(100),
            dead_node_grace_period: Duration::from_secs(3600),
            secret: None,
            previous_secret: None,
            insecure: false,
            max_keys_per_round: 3_000,
            extrapolate: true,
            fair_share: true,
            early_publish_fraction: 0.8,
        }
    }
}

impl std::fmt::Debug for MeshSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshSettings")
            .field("node_id", &self.node_id)
            .field("addr", &self.addr)
            .field("advertise_addr", &self.advertise_addr)
            .field("peers", &self.peers)
            .field("cluster_id", &self.cluster_id)
            .field("gossip_interval", &self.gossip_interval)
            .field("dead_node_grace_period", &self.dead_node_grace_period)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field(
                "previous_secret",
                &self.previous_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("insecure", &self.insecure)
            .field("max_keys_per_round", &self.max_keys_per_round)
            .field("extrapolate", &self.extrapolate)
            .field("fair_share", &self.fair_share)
            .field("early_publish_fraction", &self.early_publish_fraction)
            .finish()
    }
}

/// Why the mesh settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("mesh settings: {0}")]
pub struct MeshSettingsError(String);

impl MeshSettings {
    /// Range and safety checks, run when the settings load: every problem, each naming its key.
    pub fn check(&self, check: &mut SettingsCheck) {
        check.duration(
            "mesh.gossip_interval",
            self.gossip_interval,
            Duration::from_millis(10),
            Duration::from_secs(60),
        );
        check.duration(
            "mesh.dead_node_grace_period",
            self.dead_node_grace_period,
            Duration::from_secs(1),
            Duration::from_secs(30 * 24 * 3600),
        );
        check.count(
            "mesh.max_keys_per_round",
            self.max_keys_per_round as u64,
            1,
            1_000_000,
        );
        if !(0.0..1.0).contains(&self.early_publish_fraction) {
            check.invalid(
                "mesh.early_publish_fraction",
                format!("must be in [0, 1), not {}", self.early_publish_fraction),
            );
        }
        if self
            .node_id
            .as_deref()
            .is_some_and(|id| id.trim().is_empty())
        {
            check.invalid("mesh.node_id", "is empty; leave it unset to generate one");
        }
        if self.secret.as_deref().is_some_and(str::is_empty) {
            check.invalid(
                "mesh.secret",
                "is empty; leave it unset or set a real secret",
            );
        }
        if self.previous_secret.is_some() && self.secret.is_none() {
            check.invalid(
                "mesh.previous_secret",
                "is set without mesh.secret; it is only accepted beside a current secret",
            );
        }
        if self.reachable_from_other_hosts() && self.secret.is_none() && !self.insecure {
            check.invalid(
                "mesh.addr",
                format!(
                    "{} is reachable from other hosts but the mesh has no secret: anyone who \
                     reaches it could join and publish counts. Set mesh.secret (e.g. \
                     HIVEMIND_MESH__SECRET=$(openssl rand -hex 32), the same on every node), \
                     or mesh.insecure: true to run unauthenticated on a trusted network",
                    self.addr
                ),
            );
        }
    }

    /// Whether the mesh binds an address other hosts can reach (anything but loopback).
    pub fn reachable_from_other_hosts(&self) -> bool {
        !self.addr.ip().is_loopback()
    }

    /// The gossip configuration for these settings, for a mesh socket bound at `bound`, with
    /// local counters swept every `sweep_interval`.
    pub fn gossip_config(
        &self,
        bound: SocketAddr,
        sweep_interval: Duration,
    ) -> Result<GossipConfig, MeshSettingsError> {
        let mesh = self;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let node_id = match &mesh.node_id {
            Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
            Some(_) => return Err(MeshSettingsError("mesh.node_id is empty".into())),
            None => generated_node_id(now.as_nanos()),
        };
        let previous_secret = match &mesh.previous_secret {
            Some(secret) => Some(
                MeshSecret::new(secret)
                    .map_err(|e| MeshSettingsError(format!("mesh.previous_secret: {e}")))?,
            ),
            None => None,
        };
        let secret = match &mesh.secret {
            Some(secret) => Some(
                MeshSecret::new(secret)
                    .map_err(|e| MeshSettingsError(format!("mesh.secret: {e}")))?,
            ),
            None => None,
        };
        if !(0.0..1.0).contains(&mesh.early_publish_fraction) {
            return Err(MeshSettingsError(format!(
                "mesh.early_publish_fraction must be in [0, 1), not {}",
                mesh.early_publish_fraction
            )));
        }
        let interval = mesh.gossip_interval;
        Ok(GossipConfig {
            node_id,
            // Start time in ms: grows on every restart, as chitchat requires.
            generation: now.as_millis() as u64,
            cluster_id: mesh.cluster_id.clone(),
            advertise_addr: advertise_addr(mesh.advertise_addr, bound, &mesh.peers),
            seeds: mesh.peers.clone(),
            gossip_interval: interval,
            dead_node_grace_period: mesh.dead_node_grace_period,
            secret,
            previous_secret,
            max_keys_per_round: mesh.max_keys_per_round.max(1),
            admission: Admission {
                extrapolate: mesh.extrapolate,
                fair_share: mesh.fair_share,
                // Peers publish every round; information older than three rounds is not extrapolated.
                horizon_millis: (interval * 3).as_millis().min(u128::from(u32::MAX)) as u32,
            },
            early_publish_fraction: mesh.early_publish_fraction,
            sweep_interval,
        })
    }

    /// Binds the mesh's UDP socket (non-blocking, as chitchat's tokio socket needs).
    pub fn bind(&self) -> std::io::Result<UdpSocket> {
        let socket = UdpSocket::bind(self.addr)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    }
}

/// `hostname-xxxxxx`: readable, and unique enough across restarts and replicas.
fn generated_node_id(nanos: u128) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "hivemind".into());
    format!(
        "{host}-{:06x}",
        (nanos ^ u128::from(std::process::id())) as u32 & 0xff_ffff
    )
}

/// The configured advertise address; else the bound one; for an unspecified bind (0.0.0.0),
/// the local address that routes to the first resolvable seed, or loopback without seeds.
fn advertise_addr(
    configured: Option<SocketAddr>,
    bound: SocketAddr,
    seeds: &[String],
) -> SocketAddr {
    if let Some(addr) = configured {
        return addr;
    }
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let routed = seeds
        .iter()
        .filter_map(|seed| seed.to_socket_addrs().ok()?.next())
        .find_map(|seed| {
            let probe = UdpSocket::bind(SocketAddr::new(bound.ip(), 0)).ok()?;
            probe.connect(seed).ok()?;
            probe.local_addr().ok()
        });
    match routed {
        Some(local) => SocketAddr::new(local.ip(), bound.port()),
        None if bound.is_ipv4() => SocketAddr::from(([127, 0, 0, 1], bound.port())),
        None => SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), bound.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_secret() {
        let settings = MeshSettings {
            secret: Some("hunter2".into()),
            ..MeshSettings::default()
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn advertise_prefers_configuration_then_the_bound_address() {
        let bound: SocketAddr = "127.0.0.2:7000".parse().unwrap();
        let set: SocketAddr = "10.0.0.1:7946".parse().unwrap();
        assert_eq!(advertise_addr(Some(set), bound, &[]), set);
        assert_eq!(advertise_addr(None, bound, &[]), bound);
        let any: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        assert_eq!(
            advertise_addr(None, any, &[]),
            "127.0.0.1:7000".parse().unwrap()
        );
        assert_eq!(
            advertise_addr(None, any, &["127.0.0.1:7001".into()]),
            "127.0.0.1:7000".parse().unwrap()
        );
    }

    #[test]
    fn bad_mesh_settings_are_errors() {
        let bound = "127.0.0.1:1".parse().unwrap();
        let sweep = Duration::from_secs(1);
        let settings = MeshSettings {
            secret: Some(String::new()),
            ..MeshSettings::default()
        };
        assert!(settings.gossip_config(bound, sweep).is_err());
        let settings = MeshSettings {
            node_id: Some(" ".into()),
            ..MeshSettings::default()
        };
        assert!(settings.gossip_config(bound, sweep).is_err());
        let settings = MeshSettings {
            early_publish_fraction: 1.5,
            ..MeshSettings::default()
        };
        assert!(settings.gossip_config(bound, sweep).is_err());
    }

    #[test]
    fn generated_ids_differ_between_starts() {
        assert_ne!(generated_node_id(1), generated_node_id(2));
    }
}
