//! Whether Redis is up, when to probe it while it is down, and what the failure policy answers
//! meanwhile. Pure: times are passed in, so every transition is tested without sleeping.
//!
//! Up → Down after `failures_to_down` consecutive failed calls, or at once on a refused or
//! dropped connection. While down, requests do not wait on Redis: they get the policy's answer,
//! and a background probe retries with exponential backoff (min → max). The first successful
//! call or probe brings it back up. Each transition is reported once (the caller logs it).

use std::time::{Duration, Instant};

use hivemind_core::{Decision, Hit, Limit, UnixTime, Window};

/// Up or down, as the strategy last saw Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Calls go to Redis.
    Up {
        /// Failed calls in a row (below the threshold).
        failures: u32,
    },
    /// Calls go to the failure policy; a probe runs at `next_probe`.
    Down {
        /// When Redis went down.
        since: Instant,
        /// When the next probe is due.
        next_probe: Instant,
        /// The wait after the next failed probe (doubles, capped).
        backoff: Duration,
    },
}

/// A change worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Redis just went down.
    WentDown,
    /// Redis answers again after being down this long.
    CameBack {
        /// How long it was down.
        down_for: Duration,
    },
}

/// The link state machine.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// The current state.
    link: Link,
    /// Consecutive failures that make Redis down.
    failures_to_down: u32,
    /// The first wait between probes.
    min_backoff: Duration,
    /// The longest wait between probes.
    max_backoff: Duration,
}

impl Tracker {
    /// Up, with these thresholds.
    pub fn new(failures_to_down: u32, min_backoff: Duration, max_backoff: Duration) -> Tracker {
        Tracker {
            link: Link::Up { failures: 0 },
            failures_to_down: failures_to_down.max(1),
            min_backoff,
            max_backoff: max_backoff.max(min_backoff),
        }
    }

    /// The current state.
    pub fn link(&self) -> Link {
        self.link
    }

    /// Whether calls go to Redis.
    pub fn is_up(&self) -> bool {
        matches!(self.link, Link::Up { .. })
    }

    /// Starts down (Redis was unreachable at startup): probe at once.
    pub fn start_down(&mut self, now: Instant) -> Option<Transition> {
        self.go_down(now)
    }

    /// A request's call succeeded. While down this changes nothing: a call sent before Redis
    /// went down may still answer, and only a probe brings Redis back (no flapping).
    pub fn on_call_success(&mut self) {
        if let Link::Up { .. } = self.link {
            self.link = Link::Up { failures: 0 };
        }
    }

    /// A probe succeeded (or the first contact at startup): Redis is up.
    pub fn on_success(&mut self, now: Instant) -> Option<Transition> {
        let was = self.link;
        self.link = Link::Up { failures: 0 };
        match was {
            Link::Down { since, .. } => Some(Transition::CameBack {
                down_for: now.saturating_duration_since(since),
            }),
            Link::Up { .. } => None,
        }
    }

    /// A call failed; `connection_lost` for a refused or dropped connection (down at once).
    pub fn on_failure(&mut self, now: Instant, connection_lost: bool) -> Option<Transition> {
        match self.link {
            Link::Up { failures } => {
                let failures = failures.saturating_add(1);
                if connection_lost || failures >= self.failures_to_down {
                    self.go_down(now)
                } else {
                    self.link = Link::Up { failures };
                    None
                }
            }
            Link::Down { .. } => {
                self.on_probe_failed(now);
                None
            }
        }
    }

    fn go_down(&mut self, now: Instant) -> Option<Transition> {
        if matches!(self.link, Link::Down { .. }) {
            return None;
        }
        self.link = Link::Down {
            since: now,
            next_probe: now + self.min_backoff,
            backoff: self.min_backoff,
        };
        Some(Transition::WentDown)
    }

    /// Whether a probe is due at `now` (always false while up).
    pub fn probe_due(&self, now: Instant) -> bool {
        matches!(self.link, Link::Down { next_probe, .. } if now >= next_probe)
    }

    /// A probe failed: the next one waits twice as long (capped).
    pub fn on_probe_failed(&mut self, now: Instant) {
        if let Link::Down { since, backoff, .. } = self.link {
            let next = (backoff * 2).min(self.max_backoff);
            self.link = Link::Down {
                since,
                next_probe: now + backoff,
                backoff: next,
            };
        }
    }
}

/// A limit for one of `expected_nodes` nodes counting alone: the limit divided by the node
/// count, rounded up (so a small limit is not blocked outright); 0 stays 0.
pub fn local_limit(limit: u32, expected_nodes: u32) -> u32 {
    limit.div_ceil(expected_nodes.max(1))
}

/// The hits of `batch` with their limits divided for policy `local`.
pub fn local_batch(batch: &[Hit], expected_nodes: u32) -> Vec<Hit> {
    batch
        .iter()
        .map(|hit| Hit {
            limit: Limit {
                requests_per_unit: local_limit(hit.limit.requests_per_unit, expected_nodes),
                unit: hit.limit.unit,
            },
            ..hit.clone()
        })
        .collect()
}

/// Policy `allow` (`over == false`) or `deny` (`over == true`): every hit answered alike,
/// nothing counted.
pub fn fixed_answer(batch: &[Hit], now: UnixTime, over: bool) -> Vec<Decision> {
    batch
        .iter()
        .map(|hit| Decision {
            over_limit: over,
            count: 0,
            remaining: if over { 0 } else { hit.limit.requests_per_unit },
            until_reset: Duration::from_secs(Window::seconds_until_reset(hit.limit.unit, now)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivemind_core::{request_admitted, Enforcement, Unit};

    const MIN: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_millis(400);

    #[test]
    fn timeouts_go_down_after_the_threshold_and_a_lost_connection_at_once() {
        let t = Instant::now();
        let mut tracker = Tracker::new(3, MIN, MAX);
        assert_eq!(tracker.on_failure(t, false), None);
        assert_eq!(tracker.on_failure(t, false), None);
        assert_eq!(tracker.on_success(t), None, "a success resets the run");
        assert_eq!(tracker.on_failure(t, false), None);
        assert_eq!(tracker.on_failure(t, false), None);
        assert_eq!(tracker.on_failure(t, false), Some(Transition::WentDown));
        assert!(!tracker.is_up());
        assert_eq!(tracker.on_failure(t, true), None, "reported once");
        tracker.on_call_success();
        assert!(
            !tracker.is_up(),
            "a late answer to an old call does not bring it back"
        );

        let mut tracker = Tracker::new(3, MIN, MAX);
        assert_eq!(tracker.on_failure(t, true), Some(Transition::WentDown));
    }

    #[test]
    fn probes_back_off_exponentially_up_to_the_cap_and_success_comes_back_once() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(1, MIN, MAX);
        tracker.on_failure(t0, true);
        assert!(!tracker.probe_due(t0));
        let mut now = t0 + MIN;
        let mut waits = Vec::new();
        for _ in 0..5 {
            assert!(tracker.probe_due(now));
            tracker.on_probe_failed(now);
            let Link::Down { next_probe, .. } = tracker.link() else {
                panic!("still down")
            };
            waits.push(next_probe - now);
            now = next_probe;
        }
        assert_eq!(
            waits,
            [50, 100, 200, 400, 400].map(Duration::from_millis),
            "doubling, capped"
        );
        assert_eq!(
            tracker.on_success(now),
            Some(Transition::CameBack { down_for: now - t0 })
        );
        assert_eq!(tracker.on_success(now), None);
        assert!(!tracker.probe_due(now + MAX), "no probes while up");
    }

    #[test]
    fn starting_down_probes_soon() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(3, MIN, MAX);
        assert_eq!(tracker.start_down(t0), Some(Transition::WentDown));
        assert!(tracker.probe_due(t0 + MIN));
    }

    #[test]
    fn local_limits_are_shares_rounded_up() {
        assert_eq!(local_limit(10, 2), 5);
        assert_eq!(local_limit(10, 3), 4);
        assert_eq!(local_limit(1, 4), 1);
        assert_eq!(local_limit(0, 4), 0);
        assert_eq!(local_limit(7, 1), 7);
        let hit = Hit {
            key: "k".into(),
            limit: Limit {
                requests_per_unit: 9,
                unit: Unit::Minute,
            },
            addend: 1,
            enforcement: Enforcement::Enforce,
        };
        assert_eq!(local_batch(&[hit], 3)[0].limit.requests_per_unit, 3);
    }

    #[test]
    fn allow_admits_and_deny_rejects() {
        let now = UnixTime::from_secs(1_700_000_070);
        let hit = Hit {
            key: "k".into(),
            limit: Limit {
                requests_per_unit: 9,
                unit: Unit::Minute,
            },
            addend: 1,
            enforcement: Enforcement::Enforce,
        };
        let allow = fixed_answer(std::slice::from_ref(&hit), now, false);
        assert!(request_admitted([(hit.enforcement, allow[0].over_limit)]));
        assert_eq!(allow[0].remaining, 9);
        let deny = fixed_answer(std::slice::from_ref(&hit), now, true);
        assert!(!request_admitted([(hit.enforcement, deny[0].over_limit)]));
        assert_eq!(deny[0].until_reset, Duration::from_secs(30));
    }
}
