//! The seam between the rate limit service and the places counts live.

use async_trait::async_trait;

use crate::hit::{Decision, Hit};
use crate::window::UnixTime;

/// How nodes agree on counts: `standalone`, `gossip` or `redis`.
///
/// The service calls [`SyncStrategy::check`] once per Envoy request with every hit of it, so a
/// centralised backend can answer in one round trip.
#[async_trait]
pub trait SyncStrategy: Send + Sync + 'static {
    /// Checks every hit of one request and counts them only if the request is admitted
    /// (see [`crate::request_admitted`]). Returns one decision per hit, in order.
    ///
    /// `now` is wall-clock time read once for the request; windows derive from it.
    async fn check(&self, batch: &[Hit], now: UnixTime) -> Result<Vec<Decision>, StrategyError>;

    /// Flushes pending state and stops background work. Idempotent.
    async fn shutdown(&self);

    /// The strategy's name as configured (`standalone`, `gossip`, `redis`).
    fn name(&self) -> &'static str;
}

/// Why a strategy could not decide.
#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    /// The backend cannot be reached now; retrying later may work.
    #[error("rate limit backend unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer in time.
    #[error("rate limit backend timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The request cannot be decided by this backend, whatever the retry.
    #[error("rate limit request rejected by the backend: {0}")]
    Rejected(String),
}

impl StrategyError {
    /// Whether the same request may succeed if retried later (backend down or slow), as opposed
    /// to a request the backend will never accept.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StrategyError::Unavailable(_) | StrategyError::Timeout(_)
        )
    }
}
