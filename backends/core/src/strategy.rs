//! The seam between the rate limit service and the places counts live: the [`SyncStrategy`]
//! trait, what a strategy is built with ([`StrategyContext`]), and its error type.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::Clock;
use crate::counters::LocalCounters;
use crate::hit::{Decision, Hit};
use crate::status::StrategyStatus;
use crate::window::UnixTime;

/// How nodes agree on counts: `standalone`, `gossip` or `redis`.
///
/// The service calls [`SyncStrategy::check`] once per Envoy request with every hit of it, so a
/// centralised backend can answer in one round trip. Everything else the server shows about a
/// strategy (health, figures, its own admin views) comes through [`SyncStrategy::status`] and
/// [`SyncStrategy::view`], so the server never names a concrete backend.
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

    /// Health and figures, for `/healthcheck`, `/stats` and metrics. Cheap: no I/O.
    fn status(&self) -> StrategyStatus;

    /// The names of this strategy's own admin views (gossip: `mesh`), each served as
    /// `GET /<name>` on the admin address.
    fn views(&self) -> &'static [&'static str] {
        &[]
    }

    /// One of [`SyncStrategy::views`] as JSON; `None` for a name it does not have.
    fn view(&self, name: &str) -> Option<serde_json::Value> {
        let _ = name;
        None
    }
}

/// The local counters' bounds, from the server's `counters` settings. Every strategy that
/// keeps local counters (standalone, gossip, Redis's fallback and over-limit cache) makes its
/// own with these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterConfig {
    /// The most counter keys held at once; beyond it the coldest are evicted.
    pub max_keys: usize,
    /// How often keys whose window ended are dropped.
    pub sweep_interval: Duration,
}

impl Default for CounterConfig {
    fn default() -> Self {
        CounterConfig {
            max_keys: 1_000_000,
            sweep_interval: Duration::from_secs(1),
        }
    }
}

impl CounterConfig {
    /// Fresh counters with these bounds.
    pub fn build(&self) -> Arc<LocalCounters> {
        Arc::new(LocalCounters::new(self.max_keys))
    }
}

/// What every strategy is built with, besides its own settings section.
#[derive(Clone)]
pub struct StrategyContext {
    /// Wall-clock time for background work (sweeps, publication ages); tests pass a manual one.
    pub clock: Arc<dyn Clock>,
    /// Bounds of the local counters.
    pub counters: CounterConfig,
}

impl std::fmt::Debug for StrategyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StrategyContext")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// A boxed error a backend's failure came from (redis, I/O, …).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What kind of failure a [`StrategyError`] is: whether retrying may help decides the gRPC
/// status Envoy sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The backend cannot be reached now; retrying later may work.
    Unavailable,
    /// The backend did not answer in time; retrying later may work.
    Timeout,
    /// The backend will never accept this request, whatever the retry (a script error, a key
    /// in the wrong slot, a bad reply).
    Rejected,
}

/// Why a strategy could not decide: a kind, a message, and the error it came from.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", self.kind.describe())]
pub struct StrategyError {
    /// Transient or permanent, and how.
    kind: ErrorKind,
    /// What happened, for logs and the gRPC status message (no secrets).
    message: String,
    /// The underlying error, for logs that walk the chain.
    #[source]
    source: Option<BoxError>,
}

impl ErrorKind {
    /// The kind's name in metrics labels and trace attributes: `unavailable`, `timeout`,
    /// `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Rejected => "rejected",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "rate limit backend unavailable",
            ErrorKind::Timeout => "rate limit backend timed out",
            ErrorKind::Rejected => "rate limit request rejected by the backend",
        }
    }
}

impl StrategyError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        StrategyError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// The backend cannot be reached.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// The backend did not answer within `after`.
    pub fn timeout(after: Duration) -> Self {
        Self::new(ErrorKind::Timeout, format!("no answer within {after:?}"))
    }

    /// The backend refuses the request for good.
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Rejected, message)
    }

    /// Keeps `source` as the cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Its kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether the same request may succeed if retried later (backend down or slow), as opposed
    /// to a request the backend will never accept.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable | ErrorKind::Timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_kind_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = StrategyError::unavailable("redis 127.0.0.1:1").with_source(io);
        assert!(e.is_transient());
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(
            e.to_string(),
            "rate limit backend unavailable: redis 127.0.0.1:1"
        );
        assert_eq!(
            e.source().map(|s| s.to_string()).as_deref(),
            Some("refused")
        );
        assert!(StrategyError::timeout(Duration::from_millis(5)).is_transient());
        assert!(!StrategyError::rejected("bad script").is_transient());
    }
}
