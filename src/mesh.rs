//! From settings to a running gossip node: node id, generation, advertise address, and the
//! [`GossipConfig`] of `hivemind-gossip`.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{SystemTime, UNIX_EPOCH};

use hivemind_gossip::transport::MeshSecret;
use hivemind_gossip::{Admission, GossipConfig};

use crate::settings::Settings;

/// Why the mesh settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("mesh settings: {0}")]
pub struct MeshSettingsError(String);

/// The gossip configuration for `settings`, for a mesh socket bound at `bound`.
pub fn gossip_config(
    settings: &Settings,
    bound: SocketAddr,
) -> Result<GossipConfig, MeshSettingsError> {
    let mesh = &settings.mesh;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let node_id = match &mesh.node_id {
        Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
        Some(_) => return Err(MeshSettingsError("mesh.node_id is empty".into())),
        None => generated_node_id(now.as_nanos()),
    };
    let secret = match &mesh.secret {
        Some(secret) => Some(
            MeshSecret::new(secret).map_err(|e| MeshSettingsError(format!("mesh.secret: {e}")))?,
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
        max_keys_per_round: mesh.max_keys_per_round.max(1),
        admission: Admission {
            extrapolate: mesh.extrapolate,
            fair_share: mesh.fair_share,
            // Peers publish every round; information older than three rounds is not extrapolated.
            horizon_millis: (interval * 3).as_millis().min(u128::from(u32::MAX)) as u32,
        },
        early_publish_fraction: mesh.early_publish_fraction,
        sweep_interval: settings.counters.sweep_interval,
    })
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
        let mut settings = Settings::default();
        settings.mesh.secret = Some(String::new());
        assert!(gossip_config(&settings, "127.0.0.1:1".parse().unwrap()).is_err());
        let mut settings = Settings::default();
        settings.mesh.node_id = Some(" ".into());
        assert!(gossip_config(&settings, "127.0.0.1:1".parse().unwrap()).is_err());
        let mut settings = Settings::default();
        settings.mesh.early_publish_fraction = 1.5;
        assert!(gossip_config(&settings, "127.0.0.1:1".parse().unwrap()).is_err());
    }

    #[test]
    fn generated_ids_differ_between_starts() {
        assert_ne!(generated_node_id(1), generated_node_id(2));
    }
}
