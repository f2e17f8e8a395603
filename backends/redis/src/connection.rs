//! One Redis or a Redis Cluster behind one small enum: multiplexed async connections (every
//! concurrent request pipelines on the same socket), the script call with its NOSCRIPT reload,
//! a probe, per-call timeouts, and the mapping of redis errors onto [`StrategyError`] kinds.
//!
//! - One server: redis-rs's `ConnectionManager` (one multiplexed connection, replaced in the
//!   background when it breaks), created lazily, so an unreachable Redis at startup is not an
//!   error.
//! - Cluster: redis-rs's cluster-async client (one multiplexed connection per node; it follows
//!   MOVED/ASK and refreshes slots itself). Its first connection needs a reachable node, so it is
//!   made by the first call or probe that finds one.

use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisError, ServerErrorKind};

use hivemind_core::StrategyError;

use crate::script::{Invocation, SCRIPT};
use crate::settings::RedisSettings;

/// A script reply, and how many commands it took (1, or 2 when the script had to be loaded).
#[derive(Debug)]
pub struct Reply {
    /// `[admitted, count, over, ...]`.
    pub values: Vec<i64>,
    /// Commands sent for this call.
    pub commands: u32,
}

/// Why a call failed, with what the failure policy needs to know.
#[derive(Debug)]
pub struct CallError {
    /// The error as the server reports it.
    pub error: StrategyError,
    /// The connection was refused or dropped (Redis counts as down at once).
    pub connection_lost: bool,
    /// Commands sent before it failed.
    pub commands: u32,
}

/// Where the script runs.
pub enum Connection {
    /// One Redis server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(Box<Cluster>),
}

/// The cluster client and its connection once made.
pub struct Cluster {
    /// Makes the connection (seed nodes, timeouts, credentials).
    client: ClusterClient,
    /// The connection, once a seed answered.
    connection: ArcSwapOption<ClusterConnection>,
    /// How long connecting may take.
    connect_timeout: Duration,
}

impl Connection {
    /// A connection as `settings` say; nothing is contacted yet.
    pub fn open(settings: &RedisSettings) -> Result<Connection, StrategyError> {
        let invalid = |e: RedisError| {
            StrategyError::rejected(format!("redis settings: {}", settings.target())).with_source(e)
        };
        if settings.cluster_nodes.is_empty() {
            let client = redis::Client::open(settings.url.as_str()).map_err(invalid)?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(settings.connect_timeout))
                // The per-call timeout is applied around each call instead (see `timed`).
                .set_response_timeout(None)
                // One attempt per reconnection: the strategy's probe paces the retries.
                .set_number_of_retries(1)
                .set_min_delay(settings.reconnect_min_backoff)
                .set_max_delay(settings.reconnect_max_backoff);
            let manager =
                ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)?;
            Ok(Connection::Single(manager))
        } else {
            let client =
                ClusterClientBuilder::new(settings.cluster_nodes.iter().map(String::as_str))
                    .connection_timeout(settings.connect_timeout)
                    .response_timeout(settings.timeout)
                    .retries(2)
                    .build()
                    .map_err(invalid)?;
            Ok(Connection::Cluster(Box::new(Cluster {
                client,
                connection: ArcSwapOption::empty(),
                connect_timeout: settings.connect_timeout,
            })))
        }
    }

    /// Runs the script for `invocation` (EVALSHA by `sha`, then EVAL if Redis does not have
    /// it yet), within `timeout`.
    pub async fn run_script(
        &self,
        sha: &str,
        invocation: &Invocation,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let mut commands = 0u32;
        let result = tokio::time::timeout(timeout, async {
            let mut evalsha = redis::cmd("EVALSHA");
            evalsha
                .arg(sha)
                .arg(invocation.keys.len())
                .arg(&invocation.keys)
                .arg(&invocation.args);
            commands += 1;
            match self.query(&evalsha).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    let mut eval = redis::cmd("EVAL");
                    eval.arg(SCRIPT)
                        .arg(invocation.keys.len())
                        .arg(&invocation.keys)
                        .arg(&invocation.args);
                    commands += 1;
                    self.query(&eval).await
                }
                other => other,
            }
        })
        .await;
        match result {
            Ok(Ok(values)) => Ok(Reply { values, commands }),
            Ok(Err(e)) => Err(CallError {
                connection_lost: connection_lost(&e),
                error: map_error(e),
                commands,
            }),
            Err(_) => Err(CallError {
                error: StrategyError::timeout(timeout),
                connection_lost: false,
                commands,
            }),
        }
    }

    /// PING within `timeout` (on a cluster, connecting first if needed).
    pub async fn ping(&self, timeout: Duration) -> Result<(), CallError> {
        let result = tokio::time::timeout(timeout, self.query::<String>(&redis::cmd("PING"))).await;
        match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(CallError {
                connection_lost: connection_lost(&e),
                error: map_error(e),
                commands: 1,
            }),
            Err(_) => Err(CallError {
                error: StrategyError::timeout(timeout),
                connection_lost: false,
                commands: 1,
            }),
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        match self {
            Connection::Single(manager) => {
                let mut manager = manager.clone();
                cmd.query_async(&mut manager).await
            }
            Connection::Cluster(cluster) => {
                let mut connection = cluster.connection().await?;
                cmd.query_async(&mut connection).await
            }
        }
    }
}

impl Cluster {
    /// The cluster connection, made now if there is none yet.
    async fn connection(&self) -> Result<ClusterConnection, RedisError> {
        if let Some(connection) = self.connection.load_full() {
            return Ok((*connection).clone());
        }
        let made = tokio::time::timeout(self.connect_timeout, self.client.get_async_connection())
            .await
            .map_err(|_| {
                RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no cluster node answered in time",
                ))
            })??;
        self.connection
            .store(Some(std::sync::Arc::new(made.clone())));
        Ok(made)
    }
}

/// Whether `e` means the connection itself is gone (refused, reset, closed).
fn connection_lost(e: &RedisError) -> bool {
    e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.kind() == ErrorKind::ClusterConnectionNotFound
}

/// The [`StrategyError`] kind of a redis error: connection and cluster-state failures are
/// unavailable, timeouts are timeouts, anything else (script errors, bad replies) is rejected.
pub fn map_error(e: RedisError) -> StrategyError {
    let unavailable = e.is_io_error()
        || e.is_cluster_error()
        || connection_lost(&e)
        || matches!(
            e.kind(),
            ErrorKind::AuthenticationFailed
                | ErrorKind::Server(ServerErrorKind::BusyLoading)
                | ErrorKind::Server(ServerErrorKind::MasterDown)
                | ErrorKind::Server(ServerErrorKind::ReadOnly)
        );
    if e.is_timeout() {
        StrategyError::new(hivemind_core::ErrorKind::Timeout, "redis call timed out").with_source(e)
    } else if unavailable {
        StrategyError::unavailable("redis unreachable").with_source(e)
    } else {
        StrategyError::rejected("redis refused the script call").with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivemind_core::ErrorKind as Kind;

    #[test]
    fn redis_errors_map_onto_strategy_error_kinds() {
        let refused = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(connection_lost(&refused));
        assert_eq!(map_error(refused).kind(), Kind::Unavailable);
        let slow = RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "slow"));
        assert_eq!(map_error(slow).kind(), Kind::Timeout);
        let script =
            RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "ERR bad"));
        assert_eq!(map_error(script).kind(), Kind::Rejected);
        let down = RedisError::from((ErrorKind::Server(ServerErrorKind::ClusterDown), "down"));
        assert_eq!(map_error(down).kind(), Kind::Unavailable);
    }
}
