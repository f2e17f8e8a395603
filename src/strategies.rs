//! The one place that names the backends: which strategies this build has, the sockets they
//! need bound before serving, and how each is built from its own settings section.
//!
//! Everything else in the server talks to the chosen strategy through
//! [`hivemind_core::SyncStrategy`] alone (decisions, status, admin views).

use std::net::SocketAddr;
use std::sync::Arc;

use hivemind_core::{Standalone, StrategyContext, SyncStrategy};

use crate::server::ServerError;
use crate::settings::{Settings, StrategyKind};

/// The strategies compiled into this build (cargo features `gossip`, `redis`).
pub const AVAILABLE: &[StrategyKind] = &[
    StrategyKind::Standalone,
    #[cfg(feature = "gossip")]
    StrategyKind::Gossip,
    #[cfg(feature = "redis")]
    StrategyKind::Redis,
];

/// The available strategies' names, comma-separated, for messages.
pub fn available_names() -> String {
    AVAILABLE
        .iter()
        .map(|kind| kind.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sockets a strategy needs bound before the server reports its addresses (so tests and
/// scripts can use port 0 and learn the port).
#[derive(Debug, Default)]
pub struct StrategySockets {
    /// The gossip mesh's UDP socket (strategy `gossip` only).
    pub mesh: Option<std::net::UdpSocket>,
}

impl StrategySockets {
    /// Binds what the configured strategy needs.
    pub fn bind(settings: &Settings) -> Result<StrategySockets, ServerError> {
        match settings.strategy {
            #[cfg(feature = "gossip")]
            StrategyKind::Gossip => {
                let mesh = settings.mesh.bind().map_err(|source| ServerError::Bind {
                    what: "mesh",
                    addr: settings.mesh.addr,
                    source,
                })?;
                Ok(StrategySockets { mesh: Some(mesh) })
            }
            _ => Ok(StrategySockets::default()),
        }
    }

    /// The mesh socket's address, if one is bound.
    pub fn mesh_addr(&self) -> Option<SocketAddr> {
        self.mesh.as_ref().and_then(|s| s.local_addr().ok())
    }
}

/// Builds the configured strategy from its settings section, on the sockets bound for it.
pub async fn build(
    settings: &Settings,
    sockets: StrategySockets,
    context: StrategyContext,
) -> Result<Arc<dyn SyncStrategy>, ServerError> {
    let _ = &sockets;
    match settings.strategy {
        StrategyKind::Standalone => Ok(Arc::new(Standalone::from_context(&context))),
        #[cfg(feature = "gossip")]
        StrategyKind::Gossip => {
            let socket = sockets
                .mesh
                .ok_or_else(|| ServerError::Strategy("no mesh socket was bound".into()))?;
            let gossip = hivemind_gossip::Gossip::from_settings(&settings.mesh, socket, &context)
                .await
                .map_err(|e| ServerError::Strategy(e.to_string()))?;
            Ok(Arc::new(gossip))
        }
        #[cfg(feature = "redis")]
        StrategyKind::Redis => {
            let redis = hivemind_redis::Redis::from_settings(&settings.redis, &context)
                .await
                .map_err(|e| ServerError::Strategy(e.to_string()))?;
            Ok(Arc::new(redis))
        }
        #[allow(unreachable_patterns)]
        other => Err(ServerError::StrategyUnavailable {
            strategy: other.as_str(),
            available: available_names(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_is_always_available() {
        assert!(AVAILABLE.contains(&StrategyKind::Standalone));
        assert!(available_names().starts_with("standalone"));
    }

    /// Only in builds that leave a backend out (e.g. `--no-default-features`).
    #[cfg(not(all(feature = "gossip", feature = "redis")))]
    #[tokio::test]
    async fn an_unavailable_strategy_is_a_clear_error() {
        let missing = [StrategyKind::Gossip, StrategyKind::Redis]
            .into_iter()
            .find(|kind| !AVAILABLE.contains(kind))
            .expect("this build leaves a backend out");
        let settings = Settings {
            strategy: missing,
            ..Settings::default()
        };
        let context = StrategyContext {
            clock: Arc::new(hivemind_core::SystemClock),
            counters: settings.counters.config(),
        };
        let err = build(&settings, StrategySockets::default(), context)
            .await
            .err()
            .expect("an unavailable strategy must not build");
        let message = err.to_string();
        assert!(message.contains(missing.as_str()), "{message}");
        assert!(message.contains("not available in this build"), "{message}");
    }
}
