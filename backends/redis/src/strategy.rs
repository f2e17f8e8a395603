//! The `redis` strategy: every request is one script call (see [`crate::script`]) on a
//! multiplexed connection, answered by the failure policy while Redis is down, and answered
//! locally when the over-limit cache already knows an enforced hit is over its limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hivemind_core::{
    CounterReport, Decision, Enforcement, Health, HealthState, Hit, LocalCounters, StrategyContext,
    StrategyError, StrategyStatus, Sweeper, SyncStrategy, UnixTime, Window,
};
use serde_json::json;

use crate::connection::{CallError, Connection};
use crate::policy::{fixed_answer, local_batch, Link, Tracker, Transition};
use crate::script::{decode, encode, SCRIPT};
use crate::settings::{FailurePolicy, RedisSettings, RedisSettingsError};

/// Why the strategy could not be built (bad settings; an unreachable Redis is not an error).
#[derive(Debug, thiserror::Error)]
pub enum RedisBuildError {
    /// The settings do not make sense.
    #[error(transparent)]
    Settings(#[from] RedisSettingsError),
    /// The client rejected the URL or options.
    #[error(transparent)]
    Client(#[from] StrategyError),
}

/// Counters of what the strategy did, for `/stats`.
#[derive(Debug, Default)]
struct Figures {
    /// Requests decided by a script call.
    script_calls: AtomicU64,
    /// Commands sent to Redis for requests (EVALSHA, plus EVAL when the script was missing).
    round_trips: AtomicU64,
    /// Calls that did not answer within `redis.timeout`.
    timeouts: AtomicU64,
    /// Calls that failed otherwise.
    errors: AtomicU64,
    /// Requests answered by the over-limit cache without Redis.
    cache_hits: AtomicU64,
    /// Requests answered by the failure policy.
    policy_answers: AtomicU64,
    /// Probes sent while Redis was down.
    probes: AtomicU64,
}

/// Keys known to be over their limit in a window: key → (window index, count seen).
struct OverLimitCache {
    /// The entries; a stale window reads as absent.
    entries: RwLock<HashMap<Box<str>, (u64, u32), foldhash::fast::RandomState>>,
    /// The most entries held; a full cache drops ended windows, then everything.
    max_keys: usize,
}

impl OverLimitCache {
    fn new(max_keys: usize) -> Self {
        OverLimitCache {
            entries: RwLock::new(HashMap::default()),
            max_keys: max_keys.max(1),
        }
    }

    /// The answer for `batch` if one of its enforced hits is known to be over its limit (then
    /// the request is rejected whatever else it holds, and nothing would be counted).
    fn answer(&self, batch: &[Hit], now: UnixTime) -> Option<Vec<Decision>> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        if entries.is_empty() {
            return None;
        }
        let known = |hit: &Hit| -> Option<u32> {
            if hit.enforcement != Enforcement::Enforce {
                return None;
            }
            let (window, count) = *entries.get(hit.key.as_str())?;
            let over =
                u64::from(count) + u64::from(hit.addend) > u64::from(hit.limit.requests_per_unit);
            (window == Window::containing(now, hit.limit.unit).index && over).then_some(count)
        };
        if !batch.iter().any(|hit| known(hit).is_some()) {
            return None;
        }
        let mut decisions = fixed_answer(batch, now, false);
        for (hit, decision) in batch.iter().zip(&mut decisions) {
            if let Some(count) = known(hit) {
                decision.over_limit = true;
                decision.count = count;
                decision.remaining = 0;
            }
        }
        Some(decisions)
    }

    /// Remembers the enforced hits Redis found at or over their limit.
    fn note(&self, batch: &[Hit], decisions: &[Decision], now: UnixTime) {
        let full: Vec<(&Hit, u32)> = batch
            .iter()
            .zip(decisions)
            .filter(|(hit, d)| {
                hit.enforcement == Enforcement::Enforce
                    && d.over_limit
                    && d.count >= hit.limit.requests_per_unit
            })
            .map(|(hit, d)| (hit, d.count))
            .collect();
        if full.is_empty() {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if entries.len() + full.len() > self.max_keys {
            entries.retain(|key, (window, _)| {
                let unit = key_unit(key);
                unit.is_some_and(|u| *window >= Window::containing(now, u).index)
            });
            if entries.len() + full.len() > self.max_keys {
                entries.clear();
            }
        }
        for (hit, count) in full {
            let window = Window::containing(now, hit.limit.unit).index;
            entries.insert(hit.key.as_str().into(), (window, count));
        }
    }

    fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The unit at the end of a counter key (`...#minute`).
fn key_unit(key: &str) -> Option<hivemind_core::Unit> {
    hivemind_core::Unit::parse(key.rsplit_once('#')?.1)
}

/// State shared with the probe task.
struct Inner {
    /// What the strategy was configured with.
    settings: RedisSettings,
    /// Where the script runs.
    connection: Connection,
    /// The script's SHA1 for EVALSHA.
    sha: String,
    /// Up or down, and when to probe.
    tracker: Mutex<Tracker>,
    /// Mirror of "up with no failures in a row", so a healthy call skips the tracker's lock.
    clean: AtomicBool,
    /// Mirror of "down", read by every request.
    down: AtomicBool,
    /// When Redis went down (wall clock), for health lines.
    down_since: Mutex<Option<Instant>>,
    /// Policy `local`'s counters.
    local: Arc<LocalCounters>,
    /// Keys known over their limit (when `over_limit_cache`).
    cache: OverLimitCache,
    /// What happened so far.
    figures: Figures,
}

/// Counters in Redis behind the [`SyncStrategy`] seam.
pub struct Redis {
    /// Shared with the probe task.
    inner: Arc<Inner>,
    /// Probes Redis while it is down; stopped on shutdown and drop.
    probe: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Drops ended windows from the local fallback counters.
    sweeper: Sweeper,
}

impl Redis {
    /// The strategy for `settings`. Checks the settings, then pings Redis once (within the
    /// connect timeout): unreachable, it starts down and answers by its failure policy, probing
    /// in the background. Must be called inside a tokio runtime.
    pub async fn from_settings(
        settings: &RedisSettings,
        context: &StrategyContext,
    ) -> Result<Redis, RedisBuildError> {
        settings.validate()?;
        let connection = Connection::open(settings)?;
        let local = context.counters.build();
        let inner = Arc::new(Inner {
            settings: settings.clone(),
            connection,
            sha: redis::Script::new(SCRIPT).get_hash().to_owned(),
            tracker: Mutex::new(Tracker::new(
                settings.failures_to_down,
                settings.reconnect_min_backoff,
                settings.reconnect_max_backoff,
            )),
            clean: AtomicBool::new(true),
            down: AtomicBool::new(false),
            down_since: Mutex::new(None),
            local: local.clone(),
            cache: OverLimitCache::new(context.counters.max_keys),
            figures: Figures::default(),
        });
        match inner
            .connection
            .ping(settings.connect_timeout + settings.timeout)
            .await
        {
            Ok(()) => tracing::info!(target = %settings.target(), "redis reachable"),
            Err(e) => {
                let transition = inner.lock_tracker().start_down(Instant::now());
                inner.apply(transition, Some(&e.error));
            }
        }
        let probe = tokio::spawn(probe_loop(inner.clone()));
        Ok(Redis {
            inner,
            probe: Mutex::new(Some(probe)),
            sweeper: Sweeper::spawn(
                local,
                context.clock.clone(),
                context.counters.sweep_interval,
            ),
        })
    }

    /// Whether calls currently go to Redis.
    pub fn is_up(&self) -> bool {
        !self.inner.down.load(Ordering::Acquire)
    }
}

impl Inner {
    fn lock_tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Mirrors the tracker into the atomics and logs a transition (once per transition).
    fn apply(&self, transition: Option<Transition>, error: Option<&StrategyError>) {
        let (up, link) = {
            let tracker = self.lock_tracker();
            (tracker.is_up(), tracker.link())
        };
        self.down.store(!up, Ordering::Release);
        self.clean
            .store(matches!(link, Link::Up { failures: 0 }), Ordering::Release);
        match transition {
            Some(Transition::WentDown) => {
                *self
                    .down_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                let cause = error.map(error_chain).unwrap_or_default();
                tracing::warn!(
                    target = %self.settings.target(),
                    policy = self.settings.on_failure.as_str(),
                    error = %cause,
                    "redis unreachable, answering by the failure policy until it is back"
                );
            }
            Some(Transition::CameBack { down_for }) => {
                *self
                    .down_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                tracing::info!(
                    target = %self.settings.target(),
                    down_for_ms = down_for.as_millis() as u64,
                    "redis reachable again, counting in redis"
                );
            }
            None => {}
        }
    }

    /// A request's call succeeded.
    fn on_call_success(&self) {
        if self.clean.load(Ordering::Acquire) {
            return;
        }
        self.lock_tracker().on_call_success();
        self.apply(None, None);
    }

    /// A probe succeeded: Redis is back if it was down.
    fn on_probe_success(&self) {
        let transition = self.lock_tracker().on_success(Instant::now());
        self.apply(transition, None);
    }

    fn on_failure(&self, e: &CallError) {
        let transition = self
            .lock_tracker()
            .on_failure(Instant::now(), e.connection_lost);
        self.apply(transition, Some(&e.error));
    }

    /// The failure policy's answer; `error` is the call's failure, if there was a call.
    fn fallback(
        &self,
        batch: &[Hit],
        now: UnixTime,
        error: Option<StrategyError>,
    ) -> Result<Vec<Decision>, StrategyError> {
        self.figures.policy_answers.fetch_add(1, Ordering::Relaxed);
        match self.settings.on_failure {
            FailurePolicy::Allow => Ok(fixed_answer(batch, now, false)),
            FailurePolicy::Deny => Ok(fixed_answer(batch, now, true)),
            FailurePolicy::Error => {
                Err(error
                    .unwrap_or_else(|| StrategyError::unavailable("redis is down (policy error)")))
            }
            FailurePolicy::Local => Ok(self
                .local
                .check(&local_batch(batch, self.settings.expected_nodes), now)),
        }
    }
}

/// The error and its causes on one line (redis errors carry the useful part as a source).
fn error_chain(e: &StrategyError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// While Redis is down, probes it when the tracker says a probe is due.
async fn probe_loop(inner: Arc<Inner>) {
    let tick = inner
        .settings
        .reconnect_min_backoff
        .min(Duration::from_millis(50));
    let probe_timeout = inner.settings.connect_timeout + inner.settings.timeout;
    loop {
        tokio::time::sleep(tick).await;
        if !inner.lock_tracker().probe_due(Instant::now()) {
            continue;
        }
        inner.figures.probes.fetch_add(1, Ordering::Relaxed);
        match inner.connection.ping(probe_timeout).await {
            Ok(()) => inner.on_probe_success(),
            Err(e) => {
                inner.lock_tracker().on_probe_failed(Instant::now());
                tracing::debug!(error = %error_chain(&e.error), "redis probe failed");
            }
        }
    }
}

#[async_trait]
impl SyncStrategy for Redis {
    async fn check(&self, batch: &[Hit], now: UnixTime) -> Result<Vec<Decision>, StrategyError> {
        let inner = &*self.inner;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if inner.settings.over_limit_cache {
            if let Some(decisions) = inner.cache.answer(batch, now) {
                inner.figures.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(decisions);
            }
        }
        if inner.down.load(Ordering::Acquire) {
            return inner.fallback(batch, now, None);
        }
        let invocation = encode(&inner.settings.key_prefix, batch, now);
        let result = inner
            .connection
            .run_script(&inner.sha, &invocation, inner.settings.timeout)
            .await;
        let figures = &inner.figures;
        match result {
            Ok(reply) => {
                figures.script_calls.fetch_add(1, Ordering::Relaxed);
                figures
                    .round_trips
                    .fetch_add(u64::from(reply.commands), Ordering::Relaxed);
                inner.on_call_success();
                let decisions = decode(&reply.values, batch, now).map_err(|e| {
                    StrategyError::rejected("unexpected reply from the redis script").with_source(e)
                })?;
                if inner.settings.over_limit_cache {
                    inner.cache.note(batch, &decisions, now);
                }
                Ok(decisions)
            }
            Err(e) => {
                figures
                    .round_trips
                    .fetch_add(u64::from(e.commands), Ordering::Relaxed);
                if e.error.kind() == hivemind_core::ErrorKind::Timeout {
                    figures.timeouts.fetch_add(1, Ordering::Relaxed);
                } else {
                    figures.errors.fetch_add(1, Ordering::Relaxed);
                }
                if !e.error.is_transient() {
                    return Err(e.error);
                }
                inner.on_failure(&e);
                inner.fallback(batch, now, Some(e.error))
            }
        }
    }

    async fn shutdown(&self) {
        if let Some(probe) = self
            .probe
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            probe.abort();
        }
        self.sweeper.stop();
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    fn status(&self) -> StrategyStatus {
        let inner = &*self.inner;
        let settings = &inner.settings;
        let policy = settings.on_failure.as_str();
        let down_for = inner
            .down_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|since| since.elapsed());
        let health = match down_for {
            None => Health::serving(vec![format!("redis: up ({})", settings.target())]),
            Some(for_) => Health {
                state: if settings.on_failure == FailurePolicy::Error {
                    HealthState::Down
                } else {
                    HealthState::Degraded
                },
                lines: vec![format!(
                    "redis: unreachable since {}s, policy {policy}",
                    for_.as_secs()
                )],
            },
        };
        let f = &inner.figures;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StrategyStatus {
            health,
            counters: (settings.on_failure == FailurePolicy::Local)
                .then(|| CounterReport::of(&inner.local)),
            details: json!({
                "target": settings.target(),
                "state": if down_for.is_some() { "down" } else { "up" },
                "down_for_ms": down_for.map(|d| d.as_millis() as u64),
                "on_failure": policy,
                "script_calls": get(&f.script_calls),
                "round_trips": get(&f.round_trips),
                "timeouts": get(&f.timeouts),
                "errors": get(&f.errors),
                "policy_answers": get(&f.policy_answers),
                "probes": get(&f.probes),
                "over_limit_cache": {
                    "enabled": settings.over_limit_cache,
                    "hits": get(&f.cache_hits),
                    "keys": inner.cache.len(),
                },
            }),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(probe) = self
            .probe
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            probe.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivemind_core::{Limit, Unit};

    fn hit(key: &str, limit: u32, addend: u32, enforcement: Enforcement) -> Hit {
        Hit {
            key: key.into(),
            limit: Limit {
                requests_per_unit: limit,
                unit: Unit::Minute,
            },
            addend,
            enforcement,
        }
    }

    #[test]
    fn the_cache_answers_only_for_enforced_hits_known_full_in_this_window() {
        let now = UnixTime::from_secs(1_700_000_070);
        let cache = OverLimitCache::new(100);
        let full = hit("d|a#minute", 2, 1, Enforcement::Enforce);
        let other = hit("d|b#minute", 9, 1, Enforcement::Enforce);
        let over = Decision {
            over_limit: true,
            count: 2,
            remaining: 0,
            until_reset: Duration::from_secs(50),
        };
        assert!(cache.answer(std::slice::from_ref(&full), now).is_none());
        cache.note(std::slice::from_ref(&full), &[over], now);
        let answer = cache.answer(&[other.clone(), full.clone()], now).unwrap();
        assert!(!answer[0].over_limit);
        assert!(answer[1].over_limit);
        assert_eq!(answer[1].count, 2);
        // An addend of 0 is not over; shadow hits are never answered; the next window is new.
        assert!(cache
            .answer(&[hit("d|a#minute", 2, 0, Enforcement::Enforce)], now)
            .is_none());
        assert!(cache
            .answer(&[hit("d|a#minute", 2, 1, Enforcement::Shadow)], now)
            .is_none());
        assert!(cache
            .answer(
                std::slice::from_ref(&full),
                now.plus(Duration::from_secs(60))
            )
            .is_none());
        // A raised limit (rules reload) is no longer over.
        assert!(cache
            .answer(&[hit("d|a#minute", 5, 1, Enforcement::Enforce)], now)
            .is_none());
    }

    #[test]
    fn a_rejection_below_the_limit_is_not_cached() {
        let now = UnixTime::from_secs(1_700_000_070);
        let cache = OverLimitCache::new(100);
        // Over only because of a large addend: a smaller one may still fit.
        let big = hit("d|a#minute", 10, 8, Enforcement::Enforce);
        let over = Decision {
            over_limit: true,
            count: 5,
            remaining: 0,
            until_reset: Duration::from_secs(50),
        };
        cache.note(std::slice::from_ref(&big), &[over], now);
        assert_eq!(cache.len(), 0);
    }
}
