//! The `standalone` strategy: this node's lock-free counters and nothing else.
//!
//! Exact per node. Right for a single instance, or behind a load balancer with key affinity.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::Clock;
use crate::counters::LocalCounters;
use crate::hit::{Decision, Hit};
use crate::status::{CounterReport, Health, StrategyStatus};
use crate::strategy::{StrategyContext, StrategyError, SyncStrategy};
use crate::sweeper::Sweeper;
use crate::window::UnixTime;

/// Local counters behind the [`SyncStrategy`] seam, with a background sweeper that drops ended
/// windows. Dropping the strategy (or calling `shutdown`) stops the sweeper.
pub struct Standalone {
    /// The counters every check goes to.
    counters: Arc<LocalCounters>,
    /// Drops ended windows in the background; stopped with the strategy.
    sweeper: Sweeper,
}

impl Standalone {
    /// A strategy over `counters`, sweeping ended windows every `sweep_every` by `clock`.
    pub fn new(counters: Arc<LocalCounters>, clock: Arc<dyn Clock>, sweep_every: Duration) -> Self {
        Standalone {
            sweeper: Sweeper::spawn(counters.clone(), clock, sweep_every),
            counters,
        }
    }

    /// A strategy with fresh counters bounded as `context` says.
    pub fn from_context(context: &StrategyContext) -> Self {
        Self::new(
            context.counters.build(),
            context.clock.clone(),
            context.counters.sweep_interval,
        )
    }

    /// The counters, for metrics and the admin endpoints.
    pub fn counters(&self) -> &Arc<LocalCounters> {
        &self.counters
    }
}

#[async_trait]
impl SyncStrategy for Standalone {
    async fn check(&self, batch: &[Hit], now: UnixTime) -> Result<Vec<Decision>, StrategyError> {
        Ok(self.counters.check(batch, now))
    }

    async fn shutdown(&self) {
        self.sweeper.stop();
    }

    fn name(&self) -> &'static str {
        "standalone"
    }

    fn status(&self) -> StrategyStatus {
        StrategyStatus {
            health: Health::serving(Vec::new()),
            counters: Some(CounterReport::of(&self.counters)),
            details: serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::hit::{Enforcement, Limit};
    use crate::window::Unit;

    #[test]
    fn the_sweeper_drops_ended_windows_in_the_background() {
        let clock = ManualClock::new(UnixTime::from_secs(1_700_000_000));
        let counters = Arc::new(LocalCounters::new(10));
        let strategy = Standalone::new(
            counters.clone(),
            Arc::new(clock.clone()),
            Duration::from_millis(5),
        );
        let hit = Hit {
            key: "k".into(),
            limit: Limit {
                requests_per_unit: 1,
                unit: Unit::Second,
            },
            addend: 1,
            enforcement: Enforcement::Enforce,
        };
        counters.check(&[hit], clock.now());
        assert_eq!(counters.stats().live_keys, 1);
        clock.advance(Duration::from_secs(2));
        // Bounded wait for the background thread (not a timing assertion: it only has to run once).
        for _ in 0..2_000 {
            if counters.stats().live_keys == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(counters.stats().live_keys, 0);
        assert_eq!(counters.stats().expired, 1);
        drop(strategy);
    }
}
