//! What a strategy reports about itself: health for `/healthcheck`, figures for `/stats` and
//! metrics. Structured and serializable, so the server shows any backend without naming it.

use serde::Serialize;

use crate::counters::LocalCounters;

/// A strategy's health and figures at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StrategyStatus {
    /// Whether it can decide requests as configured.
    pub health: Health,
    /// Its local counters, when it keeps any (standalone, gossip, Redis's fallback and cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<CounterReport>,
    /// Backend-specific figures (gossip: peers and traffic; Redis: connection, round trips,
    /// failure policy), shown under `strategy` in `/stats`. `Null` when there are none.
    pub details: serde_json::Value,
}

/// How well a strategy is doing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    /// Serving, degraded or down.
    pub state: HealthState,
    /// Short lines for people and probes, e.g. `peers: 2 live, 0 dead` or
    /// `redis: unreachable since 12s, policy allow`. Shown after `OK` by `/healthcheck`.
    pub lines: Vec<String>,
}

/// The three states `/healthcheck` distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Deciding as configured.
    Serving,
    /// Deciding, but not as configured (e.g. Redis down and the failure policy answers
    /// locally): `/healthcheck` stays 200 and says why.
    Degraded,
    /// Not able to decide (e.g. Redis down under policy `error`, or the mesh task ended and has
    /// not restarted): `/healthcheck` answers 503.
    Down,
}

impl Health {
    /// Serving, with these lines.
    pub fn serving(lines: Vec<String>) -> Health {
        Health {
            state: HealthState::Serving,
            lines,
        }
    }
}

/// The local counters' figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CounterReport {
    /// Keys currently held.
    pub live_keys: usize,
    /// The cap on live keys.
    pub max_keys: usize,
    /// Keys dropped because their window ended.
    pub expired_keys: u64,
    /// Keys dropped while live, to stay under the cap.
    pub evicted_keys: u64,
    /// Eviction passes run.
    pub eviction_passes: u64,
}

impl CounterReport {
    /// The figures of `counters` now.
    pub fn of(counters: &LocalCounters) -> CounterReport {
        let stats = counters.stats();
        CounterReport {
            live_keys: stats.live_keys,
            max_keys: counters.max_keys(),
            expired_keys: stats.expired,
            evicted_keys: stats.evicted,
            eviction_passes: stats.eviction_passes,
        }
    }
}
