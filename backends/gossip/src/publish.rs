//! What this node writes into its chitchat state each round: its own counts, nearest their
//! limits first, within a budget of keys per round.
//!
//! Pure bookkeeping over a snapshot of the local counters: [`Publisher::round`] returns the
//! key-values to set and delete; the caller applies them under the chitchat lock in one go.
//! Keys whose window ended and that were not hit since are deleted (tombstoned), so the state
//! stays bounded under key churn. When more keys changed than the budget allows, the ones
//! closest to their limit (own + peers, over the limit) go first; a key that waits gains
//! priority each round, so keys far below their limit are published too, only less often.

use std::collections::HashMap;

use hivemind_core::{window_tag, LocalCounters, Unit, UnixTime};

use crate::view::PeerView;
use crate::wire::{entry_key, key_hash, millis_tag, CountEntry};

/// Priority a changed key gains per round it waits.
const AGING_PER_ROUND: f64 = 0.05;

/// What this node knows of one of its own counter keys.
#[derive(Debug, Clone)]
struct OwnKey {
    /// The counter key's wire hash (computed once).
    hash: u64,
    /// Its unit (fixed per key).
    unit: Unit,
    /// What was last written to chitchat (window, count), if anything.
    published: Option<(u32, u32)>,
    /// The last snapshot (window, count, millis), for the own rate.
    last_seen: (u32, u32, u32),
    /// This node's smoothed rate on the key, hits per second.
    rate: f32,
    /// Rounds the key has waited with an unpublished change.
    waiting: u32,
    /// The round the key was last seen live in (to find keys that went away).
    seen_round: u64,
}

/// The result of one round.
#[derive(Debug, Default, PartialEq)]
pub struct Round {
    /// Chitchat keys and values to set.
    pub sets: Vec<(String, String)>,
    /// Chitchat keys to delete (windows that ended).
    pub deletes: Vec<String>,
    /// Changed keys left for later rounds (over the budget).
    pub backlog: usize,
}

/// Tracks this node's published counts between rounds.
#[derive(Debug, Default)]
pub struct Publisher {
    /// Counter key → state. Keys enter when first seen live, leave when deleted.
    keys: HashMap<Box<str>, OwnKey>,
    /// Rounds run so far.
    round: u64,
}

/// One changed key competing for the round's budget.
struct Candidate<'k> {
    key: &'k str,
    priority: f64,
}

impl Publisher {
    /// A publisher that has published nothing yet.
    pub fn new() -> Self {
        Publisher::default()
    }

    /// Keys tracked (published or pending).
    pub fn tracked(&self) -> usize {
        self.keys.len()
    }

    /// Runs one round at `now`: reads the live counters, refreshes this node's own rates in
    /// `view`, and returns at most `budget` keys to set (plus every delete that is due).
    pub fn round(
        &mut self,
        counters: &LocalCounters,
        view: &PeerView,
        now: UnixTime,
        budget: usize,
    ) -> Round {
        self.round += 1;
        let round = self.round;
        let now_millis = millis_tag(now);
        let mut candidates: Vec<Candidate<'_>> = Vec::new();
        let mut priorities: HashMap<Box<str>, f64> = HashMap::new();

        counters.for_each_live(now, |live| {
            let state = match self.keys.get_mut(live.key) {
                Some(state) => state,
                None => self.keys.entry(live.key.into()).or_insert(OwnKey {
                    hash: key_hash(live.key),
                    unit: live.unit,
                    published: None,
                    last_seen: (live.window, 0, now_millis),
                    rate: 0.0,
                    waiting: 0,
                    seen_round: round,
                }),
            };
            state.seen_round = round;
            let (window, count, at) = state.last_seen;
            let gap = now_millis.wrapping_sub(at);
            if window == live.window && gap > 0 && gap < 60_000 {
                let instant = live.count.saturating_sub(count) as f32 * 1000.0 / gap as f32;
                state.rate = 0.7 * state.rate + 0.3 * instant;
            }
            state.last_seen = (live.window, live.count, now_millis);
            view.set_own_rate(state.hash, state.rate);
            if state.published != Some((live.window, live.count)) {
                let peers = view
                    .estimate(state.hash, live.window, now_millis, 0)
                    .published;
                let closeness = if live.limit == 0 {
                    f64::MAX / 2.0
                } else {
                    f64::from(live.count.saturating_add(peers)) / f64::from(live.limit)
                };
                priorities.insert(
                    live.key.into(),
                    closeness + AGING_PER_ROUND * f64::from(state.waiting),
                );
            }
        });

        for (key, priority) in &priorities {
            candidates.push(Candidate {
                key,
                priority: *priority,
            });
        }
        let backlog = candidates.len().saturating_sub(budget);
        if backlog > 0 {
            candidates.select_nth_unstable_by(budget, |a, b| b.priority.total_cmp(&a.priority));
        }
        let mut sets = Vec::with_capacity(candidates.len().min(budget));
        for (i, candidate) in candidates.iter().enumerate() {
            let Some(state) = self.keys.get_mut(candidate.key) else {
                continue;
            };
            if i >= budget {
                state.waiting = state.waiting.saturating_add(1);
                continue;
            }
            let (window, count, at_millis) = state.last_seen;
            let entry = CountEntry {
                unit: state.unit,
                window,
                count,
                at_millis,
            };
            sets.push((entry_key(state.hash), entry.encode()));
            state.published = Some((window, count));
            state.waiting = 0;
        }

        // Keys not live this round: delete their entry once its window has ended.
        let mut deletes = Vec::new();
        self.keys.retain(|_, state| {
            if state.seen_round == round {
                return true;
            }
            match state.published {
                Some((window, _)) if window >= window_tag(now, state.unit) => true,
                Some(_) => {
                    deletes.push(entry_key(state.hash));
                    false
                }
                None => false,
            }
        });
        Round {
            sets,
            deletes,
            backlog,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivemind_core::{Enforcement, Hit, Limit};
    use std::time::Duration;

    /// 30 s into a minute.
    const T0: UnixTime = UnixTime::from_secs(1_700_000_070);

    fn hit(counters: &LocalCounters, key: &str, limit: u32, unit: Unit, n: u32, now: UnixTime) {
        let h = Hit {
            key: key.into(),
            limit: Limit {
                requests_per_unit: limit,
                unit,
            },
            addend: n,
            enforcement: Enforcement::Enforce,
        };
        counters.check(&[h], now);
    }

    fn decoded(round: &Round) -> Vec<(String, CountEntry)> {
        let mut v: Vec<_> = round
            .sets
            .iter()
            .map(|(k, v)| (k.clone(), CountEntry::decode(v).unwrap()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn changed_counts_are_published_once() {
        let counters = LocalCounters::new(100);
        let view = PeerView::default();
        let mut publisher = Publisher::new();
        hit(&counters, "a", 10, Unit::Minute, 3, T0);
        let round = publisher.round(&counters, &view, T0, 100);
        let sets = decoded(&round);
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].0, entry_key(key_hash("a")));
        assert_eq!(sets[0].1.count, 3);
        assert_eq!(sets[0].1.window, window_tag(T0, Unit::Minute));
        // Nothing changed: nothing to send.
        assert_eq!(publisher.round(&counters, &view, T0, 100), Round::default());
        hit(&counters, "a", 10, Unit::Minute, 1, T0);
        assert_eq!(
            decoded(&publisher.round(&counters, &view, T0, 100))[0]
                .1
                .count,
            4
        );
    }

    #[test]
    fn over_budget_the_keys_nearest_their_limit_go_first_and_the_rest_follow() {
        let counters = LocalCounters::new(1_000);
        let view = PeerView::default();
        let mut publisher = Publisher::new();
        for i in 0..10 {
            hit(&counters, &format!("cold{i}"), 1_000, Unit::Minute, 1, T0);
        }
        hit(&counters, "hot", 10, Unit::Minute, 9, T0);
        let first = publisher.round(&counters, &view, T0, 3);
        assert_eq!(first.sets.len(), 3);
        assert_eq!(first.backlog, 8);
        assert!(first
            .sets
            .iter()
            .any(|(k, _)| *k == entry_key(key_hash("hot"))));
        let mut published = first.sets.len();
        for _ in 0..10 {
            published += publisher.round(&counters, &view, T0, 3).sets.len();
        }
        assert_eq!(published, 11, "every changed key is published eventually");
    }

    #[test]
    fn ended_windows_are_deleted_and_the_state_stays_bounded() {
        let counters = LocalCounters::new(100_000);
        let view = PeerView::default();
        let mut publisher = Publisher::new();
        let mut now = T0;
        let mut total_sets = 0;
        let mut total_deletes = 0;
        // 50 seconds, 1,000 new per-second keys each second.
        for second in 0..50u32 {
            for i in 0..1_000u32 {
                hit(
                    &counters,
                    &format!("k{second}-{i}"),
                    5,
                    Unit::Second,
                    1,
                    now,
                );
            }
            let round = publisher.round(&counters, &view, now, 10_000);
            total_sets += round.sets.len();
            total_deletes += round.deletes.len();
            assert!(publisher.tracked() <= 2_000, "{}", publisher.tracked());
            counters.sweep(now);
            now = now.plus(Duration::from_secs(1));
        }
        assert_eq!(total_sets, 50_000);
        assert_eq!(total_deletes, 49_000);
    }

    #[test]
    fn own_rates_reach_the_view_for_shared_keys() {
        let counters = LocalCounters::new(100);
        let view = PeerView::default();
        let mut tracker = crate::view::PeerTracker::new(1_000);
        let peer = tracker.node_index("peer/1");
        let entry = CountEntry {
            unit: Unit::Minute,
            window: window_tag(T0, Unit::Minute),
            count: 1,
            at_millis: millis_tag(T0),
        };
        tracker.apply(&view, peer, key_hash("shared"), entry, T0);
        let mut publisher = Publisher::new();
        let mut now = T0;
        for _ in 0..20 {
            hit(&counters, "shared", 1_000_000, Unit::Minute, 10, now);
            publisher.round(&counters, &view, now, 100);
            now = now.plus(Duration::from_millis(100));
        }
        let rate = view
            .estimate(
                key_hash("shared"),
                window_tag(T0, Unit::Minute),
                millis_tag(now),
                0,
            )
            .own_rate;
        assert!((80.0..=120.0).contains(&rate), "{rate}");
    }
}
