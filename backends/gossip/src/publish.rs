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
use crate::wire::{entry_key, millis_since, millis_tag, CountEntry, KeyHasher};

/// Priority a changed key gains per round it waits.
const AGING_PER_ROUND: f64 = 0.05;

/// A key whose global count (own + peers' published) is at least this fraction of its limit is
/// hot: every change goes out in the next round.
const HOT_FRACTION: f64 = 0.5;

/// Below [`HOT_FRACTION`], the share of the limit that all nodes' unpublished hits may add up
/// to: each node publishes a cold key once its unpublished hits reach `COLD_SLACK / nodes` of
/// the limit, so a key turns hot before the hits nobody has heard of can matter.
const COLD_SLACK: f64 = 0.4;

/// A hot key whose count stopped changing is republished unchanged (same count, new time) in
/// this many rounds after its last change. Peers extrapolate a key by the rate they last saw,
/// and a node that stops admitting publishes nothing, so without this its peers keep adding
/// `rate × age` hits that never happen (up to the extrapolation horizon, until the rate goes
/// stale): near the limit every node ends up refusing the last hits of the window. Each
/// unchanged republication shows a rate of 0 (the receiver halves its smoothed rate) and restarts
/// the age of the information.
const IDLE_REPUBLISH_ROUNDS: u32 = 4;

/// A key idle this long (ms) after its published window ended is deleted: a key hit again soon
/// after a window boundary keeps its entry (overwritten in place) instead of a delete and a set.
const DELETE_AFTER_IDLE_MILLIS: u32 = 10_000;

/// A cold key's count is refreshed at least this often (ms) while it changes.
const COLD_REFRESH_MILLIS: u32 = 10_000;

/// What this node knows of one of its own counter keys.
#[derive(Debug, Clone)]
struct OwnKey {
    /// The counter key's wire hash (computed once).
    hash: u64,
    /// Its unit (fixed per key).
    unit: Unit,
    /// What was last written to chitchat (window, count), if anything.
    published: Option<(u32, u32)>,
    /// When it was written (millis tag).
    published_at: u32,
    /// The last snapshot (window, count, millis), for the own rate.
    last_seen: (u32, u32, u32),
    /// This node's smoothed rate on the key, hits per second.
    rate: f32,
    /// Rounds the key has waited with an unpublished change.
    waiting: u32,
    /// Unchanged republications since the count last changed (see [`IDLE_REPUBLISH_ROUNDS`]).
    idle_republished: u32,
    /// The round the key was last seen live in (to find keys that went away).
    seen_round: u64,
    /// When it was last seen live (millis tag).
    seen_at: u32,
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
    /// Names counter keys on the wire (keyed per cluster).
    hasher: KeyHasher,
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

    /// A publisher naming keys with `hasher` (the cluster's).
    pub fn with_hasher(hasher: KeyHasher) -> Self {
        Publisher {
            hasher,
            ..Publisher::default()
        }
    }

    /// Keys tracked (published or pending).
    pub fn tracked(&self) -> usize {
        self.keys.len()
    }

    /// Runs one round at `now`: reads the live counters, refreshes this node's own rates in
    /// `view`, and returns at most `budget` keys to set (plus every delete that is due).
    /// `nodes` is the mesh size (this node included), which sets how much a cold key may drift
    /// before it is published.
    pub fn round(
        &mut self,
        counters: &LocalCounters,
        view: &PeerView,
        now: UnixTime,
        budget: usize,
        nodes: usize,
    ) -> Round {
        let cold_step = COLD_SLACK / nodes.max(1) as f64;
        self.round += 1;
        let round = self.round;
        let now_millis = millis_tag(now);
        let mut candidates: Vec<Candidate<'_>> = Vec::new();
        let mut priorities: HashMap<Box<str>, f64> = HashMap::new();

        counters.for_each_live(now, |live| {
            let state = match self.keys.get_mut(live.key) {
                Some(state) => state,
                None => self.keys.entry(live.key.into()).or_insert(OwnKey {
                    hash: self.hasher.hash(live.key),
                    unit: live.unit,
                    published: None,
                    published_at: now_millis,
                    last_seen: (live.window, 0, now_millis),
                    rate: 0.0,
                    waiting: 0,
                    idle_republished: 0,
                    seen_round: round,
                    seen_at: now_millis,
                }),
            };
            state.seen_round = round;
            state.seen_at = now_millis;
            let (window, count, at) = state.last_seen;
            let gap = millis_since(at, now_millis);
            if window == live.window && gap > 0 && gap < 60_000 {
                let instant = live.count.saturating_sub(count) as f32 * 1000.0 / gap as f32;
                state.rate = 0.7 * state.rate + 0.3 * instant;
            }
            state.last_seen = (live.window, live.count, now_millis);
            view.set_own_rate(state.hash, state.rate);
            let changed = state.published != Some((live.window, live.count));
            if changed || state.idle_republished < IDLE_REPUBLISH_ROUNDS {
                let peers = view
                    .estimate(state.hash, live.window, now_millis, 0)
                    .published;
                let closeness = if live.limit == 0 {
                    f64::MAX / 2.0
                } else {
                    f64::from(live.count.saturating_add(peers)) / f64::from(live.limit)
                };
                let unpublished = match state.published {
                    Some((window, count)) if window == live.window => {
                        live.count.saturating_sub(count)
                    }
                    _ => live.count,
                };
                // Unchanged, only a hot key is republished (so peers stop extrapolating it).
                let due = closeness >= HOT_FRACTION
                    || (changed
                        && (f64::from(unpublished)
                            >= (f64::from(live.limit) * cold_step).max(1.0)
                            || millis_since(state.published_at, now_millis)
                                >= COLD_REFRESH_MILLIS));
                if !due {
                    return;
                }
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
            if state.published == Some((window, count)) {
                state.idle_republished = state.idle_republished.saturating_add(1);
            } else {
                state.idle_republished = 0;
            }
            state.published = Some((window, count));
            state.published_at = now_millis;
            state.waiting = 0;
        }

        // Keys not live this round: delete their entry once its window has ended and the key
        // has been idle for a while.
        let mut deletes = Vec::new();
        self.keys.retain(|_, state| {
            if state.seen_round == round {
                return true;
            }
            match state.published {
                Some((window, _)) if window >= window_tag(now, state.unit) => true,
                Some(_) if millis_since(state.seen_at, now_millis) < DELETE_AFTER_IDLE_MILLIS => {
                    true
                }
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
        hit(&counters, "a", 10, Unit::Minute, 6, T0);
        let round = publisher.round(&counters, &view, T0, 100, 1);
        let sets = decoded(&round);
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].0, entry_key(KeyHasher::default().hash("a")));
        assert_eq!(sets[0].1.count, 6);
        assert_eq!(sets[0].1.window, window_tag(T0, Unit::Minute));
        // Nothing changed: a hot key (6 of 10) is republished unchanged a few rounds, so peers
        // see its rate fall; then nothing is sent.
        for _ in 0..IDLE_REPUBLISH_ROUNDS {
            assert_eq!(
                decoded(&publisher.round(&counters, &view, T0, 100, 1))[0]
                    .1
                    .count,
                6
            );
        }
        assert_eq!(
            publisher.round(&counters, &view, T0, 100, 1),
            Round::default()
        );
        hit(&counters, "a", 10, Unit::Minute, 1, T0);
        assert_eq!(
            decoded(&publisher.round(&counters, &view, T0, 100, 1))[0]
                .1
                .count,
            7
        );
    }

    #[test]
    fn over_budget_the_keys_nearest_their_limit_go_first_and_the_rest_follow() {
        let counters = LocalCounters::new(1_000);
        let view = PeerView::default();
        let mut publisher = Publisher::new();
        for i in 0..10 {
            hit(&counters, &format!("cold{i}"), 2, Unit::Minute, 1, T0);
        }
        hit(&counters, "hot", 10, Unit::Minute, 9, T0);
        let first = publisher.round(&counters, &view, T0, 3, 1);
        assert_eq!(first.sets.len(), 3);
        assert_eq!(first.backlog, 8);
        assert!(first
            .sets
            .iter()
            .any(|(k, _)| *k == entry_key(KeyHasher::default().hash("hot"))));
        let mut published: std::collections::HashSet<String> =
            first.sets.into_iter().map(|(k, _)| k).collect();
        for _ in 0..10 {
            let round = publisher.round(&counters, &view, T0, 3, 1);
            published.extend(round.sets.into_iter().map(|(k, _)| k));
        }
        assert_eq!(
            published.len(),
            11,
            "every changed key is published eventually"
        );
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
                    2,
                    Unit::Second,
                    1,
                    now,
                );
            }
            let round = publisher.round(&counters, &view, now, 10_000, 1);
            total_sets += round.sets.len();
            total_deletes += round.deletes.len();
            assert!(publisher.tracked() <= 12_000, "{}", publisher.tracked());
            counters.sweep(now);
            now = now.plus(Duration::from_secs(1));
        }
        assert_eq!(total_sets, 50_000);
        // Each second's keys go once idle for 10 s: those of the first 40 seconds by now.
        assert_eq!(total_deletes, 40_000);
    }

    #[test]
    fn cold_keys_wait_for_a_significant_change_or_the_refresh() {
        let counters = LocalCounters::new(100);
        let view = PeerView::default();
        let mut publisher = Publisher::new();
        // Limit 100 on a 4-node mesh: a cold key goes out after 10 unpublished hits.
        hit(&counters, "cold", 100, Unit::Minute, 9, T0);
        assert!(publisher
            .round(&counters, &view, T0, 100, 4)
            .sets
            .is_empty());
        hit(&counters, "cold", 100, Unit::Minute, 1, T0);
        assert_eq!(
            decoded(&publisher.round(&counters, &view, T0, 100, 4))[0]
                .1
                .count,
            10
        );
        // One more hit: not significant, until the refresh interval has passed.
        hit(&counters, "cold", 100, Unit::Minute, 1, T0);
        assert!(publisher
            .round(&counters, &view, T0, 100, 4)
            .sets
            .is_empty());
        let later = T0.plus(Duration::from_millis(u64::from(COLD_REFRESH_MILLIS)));
        assert_eq!(
            decoded(&publisher.round(&counters, &view, later, 100, 4))[0]
                .1
                .count,
            11
        );
        // Past half the limit every change goes out.
        hit(&counters, "cold", 100, Unit::Minute, 40, later);
        publisher.round(&counters, &view, later, 100, 4);
        hit(&counters, "cold", 100, Unit::Minute, 1, later);
        assert_eq!(
            decoded(&publisher.round(&counters, &view, later, 100, 4))[0]
                .1
                .count,
            52
        );
    }

    #[test]
    fn only_hot_keys_are_republished_unchanged() {
        let counters = LocalCounters::new(100);
        let view = PeerView::default();
        let mut publisher = Publisher::new();
        hit(&counters, "cold", 100, Unit::Minute, 20, T0);
        hit(&counters, "hot", 100, Unit::Minute, 60, T0);
        assert_eq!(publisher.round(&counters, &view, T0, 100, 2).sets.len(), 2);
        let later: Vec<_> = (0..10)
            .map(|_| decoded(&publisher.round(&counters, &view, T0, 100, 2)))
            .collect();
        let republished = later.iter().filter(|sets| !sets.is_empty()).count();
        assert_eq!(republished as u32, IDLE_REPUBLISH_ROUNDS);
        assert!(later
            .iter()
            .flatten()
            .all(|(k, e)| *k == entry_key(KeyHasher::default().hash("hot")) && e.count == 60));
        // A new hit restarts the count of unchanged republications.
        hit(&counters, "hot", 100, Unit::Minute, 1, T0);
        let mut sent = 0;
        for _ in 0..10 {
            sent += publisher.round(&counters, &view, T0, 100, 2).sets.len();
        }
        assert_eq!(sent as u32, 1 + IDLE_REPUBLISH_ROUNDS);
    }

    #[test]
    fn own_rates_reach_the_view_for_shared_keys() {
        let counters = LocalCounters::new(100);
        let view = PeerView::default();
        let mut tracker = crate::view::PeerTracker::new(1_000);
        let peer = tracker.node_index("peer/1").unwrap();
        let entry = CountEntry {
            unit: Unit::Minute,
            window: window_tag(T0, Unit::Minute),
            count: 1,
            at_millis: millis_tag(T0),
        };
        tracker.apply(&view, peer, KeyHasher::default().hash("shared"), entry, T0);
        view.flush();
        let mut publisher = Publisher::new();
        let mut now = T0;
        for _ in 0..20 {
            hit(&counters, "shared", 1_000_000, Unit::Minute, 10, now);
            publisher.round(&counters, &view, now, 100, 1);
            now = now.plus(Duration::from_millis(100));
        }
        let rate = view
            .estimate(
                KeyHasher::default().hash("shared"),
                window_tag(T0, Unit::Minute),
                millis_tag(now),
                0,
            )
            .own_rate;
        assert!((80.0..=120.0).contains(&rate), "{rate}");
    }
}
