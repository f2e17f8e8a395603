//! What this node writes into its chitchat state each round: its own counts, nearest their
//! limits first, within a budget of keys per round.
//!
//! Bookkeeping over the local counters: [`Publisher::round`] returns the key-values to set and
//! delete; the caller applies them under the chitchat lock in one go. Keys whose window ended
//! and that were not hit since are deleted (tombstoned), so the state stays bounded under key
//! churn. When more keys changed than the budget allows, the ones closest to their limit (own +
//! peers, over the limit) go first; a key that waits gains priority each round, so keys far
//! below their limit are published too, only less often.
//!
//! A round costs what changed, not how many keys there are. It reads only the keys that changed
//! since the last round ([`LocalCounters::drain_changes`]; the first round of a publisher reads
//! them all) and revisits, without touching the counters:
//!
//! - every round, the keys that need it: hot keys still to be republished unchanged, keys
//!   waiting over the budget, and keys whose own rate the view still shows as significant (a
//!   rate decays each round a key is not hit; a key's missed rounds are applied when it is next
//!   visited);
//! - at a deadline, from a queue ordered by time: the end of a key's window (then, once idle
//!   long enough, its delete) and a cold key's refresh;
//! - a slice of every key each round, so that each is looked at about once per
//!   [`SCAN_ROUNDS`] rounds (every round while there are at most [`SCAN_MIN_SLICE`]): a key
//!   this node stopped hitting can turn hot through its peers' counts.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use hivemind_core::{window_tag, CounterChange, CounterSnapshot, LocalCounters, Unit, UnixTime};

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
///
/// 20 rounds (5 gossip rounds at 4 publication rounds per gossip round) is as long as the
/// peers keep a rate before it goes stale (`mesh.rs`: 5 gossip rounds). With 4, a node that
/// admits one hit a second (10 per second on 9 nodes) was republished for one gossip round
/// after each hit: its peers heard of it about once, halved its rate once, and then
/// extrapolated half the rate of its hit (10/s over a 100 ms gossip round) for 400 ms more,
/// up to 0.75 phantom hit per peer, 3 of a limit of 10 over 8 peers. Chitchat sends only a
/// key's latest value, so the cost is one entry per gossip round per hot key that stopped,
/// for 5 gossip rounds.
const IDLE_REPUBLISH_ROUNDS: u32 = 20;

/// A key idle this long (ms) after its published window ended is deleted: a key hit again soon
/// after a window boundary keeps its entry (overwritten in place) instead of a delete and a set.
const DELETE_AFTER_IDLE_MILLIS: u32 = 10_000;

/// A cold key's count is refreshed at least this often (ms) while it changes.
const COLD_REFRESH_MILLIS: u32 = 10_000;

/// The weight of the older value in the own smoothed rate, per round.
const RATE_DECAY: f32 = 0.7;

/// An own rate below this (hits/s) is shown as 0, and the key stops being revisited for it.
/// Far below the fair share's prior ([`crate::admission::SHARE_PRIOR`]).
const RATE_FLOOR: f32 = 0.001;

/// Every key is looked at about once per this many rounds (about 10 s at the default 25 ms
/// rounds, the cold refresh interval), for changes that come from the peers.
pub const SCAN_ROUNDS: usize = 400;

/// The fewest keys looked at per round by the scan: up to this many keys, every key is looked
/// at every round.
pub const SCAN_MIN_SLICE: usize = 1024;

/// Round times remembered, to know the last round a key that went away was live in.
const ROUND_HISTORY: usize = 1024;

/// No deadline.
const NEVER: u64 = u64::MAX;

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
    /// The last state known (window, count, millis): read from the counters when the key
    /// changed; the time moves on at each visit (an unchanged key is as of the visit).
    last_seen: (u32, u32, u32),
    /// The limit of the last hit on the key.
    limit: u32,
    /// This node's smoothed rate on the key, hits per second.
    rate: f32,
    /// The rate epoch (see [`Publisher::epoch`]) the rate is as of.
    rate_epoch: u64,
    /// Rounds the key has waited with an unpublished change.
    waiting: u32,
    /// Unchanged republications since the count last changed (see [`IDLE_REPUBLISH_ROUNDS`]).
    idle_republished: u32,
    /// Whether its global count was hot at the last visit.
    hot: bool,
    /// Whether the view has a slot for it (peers count it too) at the last visit.
    shared: bool,
    /// The round the key was last visited in (at most one visit per round).
    visited_round: u64,
    /// When the counters reported it dropped (ms since the epoch), or [`NEVER`].
    gone_at: u64,
    /// The deadline of its live entry in [`Publisher::deadlines`], or [`NEVER`].
    check_at: u64,
    /// Whether it is in [`Publisher::every_round`].
    every_round: bool,
    /// The address of its key's `Arc` in [`Publisher::keys`]: a queue entry holding another
    /// `Arc` of the same text was left by a key that went and came back. (The entry keeps its
    /// `Arc` alive, so the address is not reused meanwhile.)
    key_addr: usize,
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

/// Counter key → state; keys are shared with the revisit queues (which compare pointers to
/// tell a key's current entry from one left by a key that went and came back).
type Keys = HashMap<Arc<str>, OwnKey, foldhash::fast::RandomState>;

/// Tracks this node's published counts between rounds.
#[derive(Debug, Default)]
pub struct Publisher {
    /// Counter key → state. Keys enter when first seen live, leave when deleted.
    keys: Keys,
    /// Rounds run so far.
    round: u64,
    /// Rounds that aged the own rates (the time since the previous round was positive and
    /// under a minute): a key visited after missing some decays once per missed one.
    epoch: u64,
    /// The times (ms since the epoch) of the last rounds, oldest first.
    history: VecDeque<u64>,
    /// Keys revisited next round (each at most once, see [`OwnKey::every_round`]).
    every_round: Vec<Arc<str>>,
    /// Keys revisited at a time (ms since the epoch), earliest first.
    deadlines: BinaryHeap<Reverse<(u64, Arc<str>)>>,
    /// Every key, in the order the scan looks at them.
    scan: VecDeque<Arc<str>>,
    /// Whether the first round (which reads every key) has run.
    started: bool,
    /// Keys visited in the last round.
    visits: usize,
    /// Names counter keys on the wire (keyed per cluster).
    hasher: KeyHasher,
}

/// What a round's visits share.
struct Visit<'v> {
    view: &'v PeerView,
    round: u64,
    epoch: u64,
    /// Whether this round ages the rates (see [`Publisher::epoch`]).
    aging: bool,
    /// Since the previous round, ms.
    gap: u64,
    now_millis: u32,
    cold_step: f64,
}

/// Whether the key is live at `now`: its last known count is in the current window (or the next)
/// and the counters have not dropped it.
fn live(state: &OwnKey, now: UnixTime) -> bool {
    let window = window_tag(now, state.unit);
    state.gone_at == NEVER
        && (state.last_seen.0 == window || state.last_seen.0 == window.wrapping_add(1))
}

/// When window `window` of `unit` ends, in ms since the epoch.
fn window_end(window: u32, unit: Unit) -> u64 {
    (u64::from(window) + 1)
        .saturating_mul(unit.seconds())
        .saturating_mul(1000)
}

/// The address [`OwnKey::key_addr`] holds.
fn addr(key: &Arc<str>) -> usize {
    Arc::as_ptr(key).cast::<u8>() as usize
}

/// The key's state, if the queue entry `key` is the key's current one.
fn current<'k>(keys: &'k mut Keys, key: &Arc<str>) -> Option<&'k mut OwnKey> {
    keys.get_mut(&**key)
        .filter(|state| state.key_addr == addr(key))
}

impl OwnKey {
    fn new(
        key: &Arc<str>,
        hash: u64,
        live: &CounterSnapshot<'_>,
        now_millis: u32,
        epoch: u64,
    ) -> Self {
        OwnKey {
            key_addr: addr(key),
            hash,
            unit: live.unit,
            published: None,
            published_at: now_millis,
            last_seen: (live.window, 0, now_millis),
            limit: live.limit,
            rate: 0.0,
            rate_epoch: epoch,
            waiting: 0,
            idle_republished: 0,
            hot: false,
            shared: false,
            visited_round: 0,
            gone_at: NEVER,
            check_at: NEVER,
            every_round: false,
        }
    }

    /// Whether the key has a change not yet published.
    fn changed(&self) -> bool {
        self.published != Some((self.last_seen.0, self.last_seen.1))
    }

    /// Visits the key: its state now (`live`, or the last known one moved to now), its own
    /// rate, and whether it is due (`Some(priority)`).
    fn visit(&mut self, live: Option<&CounterSnapshot<'_>>, at: &Visit<'_>) -> Option<f64> {
        self.visited_round = at.round;
        let (window, count, seen) = self.last_seen;
        let (new_window, new_count) = live.map_or((window, count), |l| (l.window, l.count));
        if let Some(live) = live {
            self.limit = live.limit;
            self.gone_at = NEVER;
        }
        // The rounds missed since the last visit had no hits (a hit would have made the key
        // changed in them): each decays the rate with an instant rate of 0.
        let missed = at
            .epoch
            .saturating_sub(self.rate_epoch)
            .saturating_sub(u64::from(at.aging));
        if missed > 0 {
            self.rate *= RATE_DECAY.powi(missed.min(1_000) as i32);
        }
        let gap = millis_since(seen, at.now_millis);
        if at.aging && window == new_window && gap > 0 && gap < 60_000 {
            // The hits since the last visit all came after the previous round.
            let instant = new_count.saturating_sub(count) as f32 * 1000.0 / at.gap.max(1) as f32;
            self.rate = RATE_DECAY * self.rate + (1.0 - RATE_DECAY) * instant;
        }
        if self.rate < RATE_FLOOR {
            self.rate = 0.0;
        }
        self.rate_epoch = at.epoch;
        self.last_seen = (new_window, new_count, at.now_millis);
        self.shared = at.view.set_own_rate(self.hash, self.rate);
        let changed = self.changed();
        self.hot = false;
        if !changed && self.idle_republished >= IDLE_REPUBLISH_ROUNDS {
            return None;
        }
        let peers = at
            .view
            .estimate(self.hash, new_window, at.now_millis, 0)
            .published;
        let closeness = if self.limit == 0 {
            f64::MAX / 2.0
        } else {
            f64::from(new_count.saturating_add(peers)) / f64::from(self.limit)
        };
        self.hot = closeness >= HOT_FRACTION;
        let unpublished = match self.published {
            Some((window, count)) if window == new_window => new_count.saturating_sub(count),
            _ => new_count,
        };
        // Unchanged, only a hot key is republished (so peers stop extrapolating it).
        let due = self.hot
            || (changed
                && (f64::from(unpublished) >= (f64::from(self.limit) * at.cold_step).max(1.0)
                    || millis_since(self.published_at, at.now_millis) >= COLD_REFRESH_MILLIS));
        due.then(|| closeness + AGING_PER_ROUND * f64::from(self.waiting))
    }

    /// Whether the key is visited again next round, whatever changes.
    fn needs_every_round(&self) -> bool {
        let changed = self.changed();
        (self.hot && (changed || self.idle_republished < IDLE_REPUBLISH_ROUNDS))
            || (changed && self.waiting > 0)
            || (self.shared && self.rate > 0.0)
    }

    /// The next time the key must be looked at (ms since the epoch): its window's end, or a
    /// cold change's refresh if sooner.
    fn next_check(&self, now_ms: u64, now_millis: u32) -> u64 {
        let end = window_end(self.last_seen.0, self.unit);
        if self.changed() {
            let waited = millis_since(self.published_at, now_millis);
            let refresh = now_ms + u64::from(COLD_REFRESH_MILLIS.saturating_sub(waited));
            end.min(refresh)
        } else {
            end
        }
    }
}

/// What becomes of a key that is no longer live.
enum Expiry {
    /// Never published: forget it.
    Forget,
    /// Published, window ended, idle long enough: delete its entry.
    Delete,
    /// Look again at this time (ms since the epoch).
    Keep(u64),
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

    /// Keys the last round visited: those that changed, those revisited every round or whose
    /// time came, and the scan's slice.
    pub fn visited(&self) -> usize {
        self.visits
    }

    /// The time of the last round before `until` (ms since the epoch): when a key live until
    /// then was last seen live.
    fn last_round_before(&self, until: u64) -> u64 {
        let (older, newer) = self.history.as_slices();
        let before = |times: &[u64]| {
            let n = times.partition_point(|t| *t < until);
            n.checked_sub(1).map(|i| times[i])
        };
        before(newer)
            .or_else(|| before(older))
            .unwrap_or(until.saturating_sub(1))
    }

    /// What becomes of a key that is not live at `now`.
    fn expiry(&self, state: &OwnKey, now: UnixTime, now_ms: u64) -> Expiry {
        let Some((window, _)) = state.published else {
            return Expiry::Forget;
        };
        if window >= window_tag(now, state.unit) {
            return Expiry::Keep(window_end(window, state.unit));
        }
        let live_until = window_end(state.last_seen.0, state.unit).min(state.gone_at);
        let idle_from = self.last_round_before(live_until);
        let idle_until = idle_from.saturating_add(u64::from(DELETE_AFTER_IDLE_MILLIS));
        if now_ms < idle_until {
            Expiry::Keep(idle_until)
        } else {
            Expiry::Delete
        }
    }

    /// Settles a key that is not live at `now`: forgets it, deletes it (into `deletes`), or
    /// queues the next look at it.
    fn expire(&mut self, key: &Arc<str>, now: UnixTime, now_ms: u64, deletes: &mut Vec<String>) {
        let Some(state) = self.keys.get(&**key) else {
            return;
        };
        match self.expiry(state, now, now_ms) {
            Expiry::Forget => {
                self.keys.remove(&**key);
            }
            Expiry::Delete => {
                if let Some(state) = self.keys.remove(&**key) {
                    deletes.push(entry_key(state.hash));
                }
            }
            Expiry::Keep(next) => self.schedule(key, next),
        }
    }

    /// Queues a look at `key` (the key's current `Arc`) at `at` unless one is queued sooner.
    fn schedule(&mut self, key: &Arc<str>, at: u64) {
        let Some(state) = current(&mut self.keys, key) else {
            return;
        };
        if at < state.check_at {
            state.check_at = at;
            self.deadlines.push(Reverse((at, key.clone())));
        }
    }

    /// Drops the queued looks left by keys that went away or were rescheduled sooner, in one
    /// pass once they outnumber the keys.
    fn compact_deadlines(&mut self) {
        if self.deadlines.len() > 2 * self.keys.len() + SCAN_MIN_SLICE {
            let keys = &self.keys;
            self.deadlines.retain(|Reverse((at, key))| {
                keys.get(&**key)
                    .is_some_and(|state| state.key_addr == addr(key) && state.check_at == *at)
            });
        }
    }

    /// Runs one round at `now`: reads the counters that changed, refreshes this node's own
    /// rates in `view`, and returns at most `budget` keys to set (plus every delete that is
    /// due). `nodes` is the mesh size (this node included), which sets how much a cold key may
    /// drift before it is published.
    pub fn round(
        &mut self,
        counters: &LocalCounters,
        view: &PeerView,
        now: UnixTime,
        budget: usize,
        nodes: usize,
    ) -> Round {
        self.round += 1;
        let now_millis = millis_tag(now);
        let now_ms = u64::try_from(now.since_epoch().as_millis()).unwrap_or(u64::MAX);
        let gap = self
            .history
            .back()
            .map_or(0, |previous| now_ms.saturating_sub(*previous));
        let aging = gap > 0 && gap < 60_000;
        if aging {
            self.epoch += 1;
        }
        let previous_round = self.history.back().copied().unwrap_or(now_ms);
        if self.history.len() >= ROUND_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(now_ms);
        let at = Visit {
            view,
            round: self.round,
            epoch: self.epoch,
            aging,
            gap,
            now_millis,
            cold_step: COLD_SLACK / nodes.max(1) as f64,
        };
        // Keys visited this round, and the due ones with their priority.
        let mut visited: Vec<Arc<str>> = Vec::new();
        let mut candidates: Vec<(Arc<str>, f64)> = Vec::new();
        let mut deletes = Vec::new();

        // What changed (everything, in a publisher's first round).
        let everything = !std::mem::replace(&mut self.started, true);
        {
            let Publisher {
                keys, scan, hasher, ..
            } = self;
            counters.drain_changes(now, everything, |change| match change {
                CounterChange::Live(live) => {
                    let key = match keys.get_key_value(live.key) {
                        Some((key, _)) => key.clone(),
                        None => {
                            let key: Arc<str> = live.key.into();
                            scan.push_back(key.clone());
                            let hash = hasher.hash(live.key);
                            keys.insert(
                                key.clone(),
                                OwnKey::new(&key, hash, &live, now_millis, at.epoch),
                            );
                            key
                        }
                    };
                    let Some(state) = keys.get_mut(&*key) else {
                        return;
                    };
                    if state.visited_round == at.round {
                        return;
                    }
                    if let Some(priority) = state.visit(Some(&live), &at) {
                        candidates.push((key.clone(), priority));
                    }
                    visited.push(key);
                }
                CounterChange::Gone(key) => {
                    let Some(state) = keys.get_mut(key) else {
                        return;
                    };
                    if state.gone_at != NEVER || state.visited_round == at.round {
                        return;
                    }
                    // Live until the previous round, at most.
                    state.gone_at = now_ms.min(previous_round.saturating_add(1));
                    if state.published.is_none() {
                        keys.remove(key);
                    } else {
                        state.check_at = NEVER;
                        let key = keys.get_key_value(key).map(|(k, _)| k.clone());
                        if let Some(key) = key {
                            visited.push(key);
                        }
                    }
                }
            });
        }

        // Keys that need a visit every round, a slice of every key, and the keys whose time came.
        let mut revisit = std::mem::take(&mut self.every_round);
        let slice = SCAN_MIN_SLICE
            .max(self.scan.len().div_ceil(SCAN_ROUNDS))
            .min(self.scan.len());
        for _ in 0..slice {
            let Some(key) = self.scan.pop_front() else {
                break;
            };
            if current(&mut self.keys, &key).is_some() {
                self.scan.push_back(key.clone());
                revisit.push(key);
            }
        }
        for key in revisit {
            let Some(state) = current(&mut self.keys, &key) else {
                continue;
            };
            state.every_round = false;
            if state.visited_round == at.round || !live(state, now) {
                continue;
            }
            if let Some(priority) = state.visit(None, &at) {
                candidates.push((key.clone(), priority));
            }
            visited.push(key);
        }
        while let Some(Reverse((when, _))) = self.deadlines.peek() {
            if *when > now_ms {
                break;
            }
            let Some(Reverse((when, key))) = self.deadlines.pop() else {
                break;
            };
            let Some(state) = current(&mut self.keys, &key) else {
                continue;
            };
            if state.check_at != when {
                continue;
            }
            state.check_at = NEVER;
            if state.visited_round == at.round {
                continue;
            }
            if live(state, now) {
                if let Some(priority) = state.visit(None, &at) {
                    candidates.push((key.clone(), priority));
                }
                visited.push(key);
                continue;
            }
            self.expire(&key, now, now_ms, &mut deletes);
        }

        // The budget goes to the keys nearest their limit.
        let backlog = candidates.len().saturating_sub(budget);
        if backlog > 0 {
            candidates.select_nth_unstable_by(budget, |a, b| b.1.total_cmp(&a.1));
        }
        let mut sets = Vec::with_capacity(candidates.len().min(budget));
        for (i, (key, _)) in candidates.iter().enumerate() {
            let Some(state) = self.keys.get_mut(&**key) else {
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

        // When to look at the visited keys again.
        self.visits = visited.len();
        for key in visited {
            let Some(state) = current(&mut self.keys, &key) else {
                continue;
            };
            if !live(state, now) {
                // Gone: its delete is due once idle long enough.
                self.expire(&key, now, now_ms, &mut deletes);
                continue;
            }
            if state.needs_every_round() && !state.every_round {
                state.every_round = true;
                self.every_round.push(key.clone());
            }
            let next = state.next_check(now_ms, now_millis);
            if next < state.check_at {
                state.check_at = next;
                self.deadlines.push(Reverse((next, key)));
            }
        }
        self.compact_deadlines();
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
        let rounds = IDLE_REPUBLISH_ROUNDS + 6;
        let later: Vec<_> = (0..rounds)
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
        for _ in 0..rounds {
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

    /// The own smoothed rate the old every-round scan computed: one step per round.
    fn step(rate: f32, hits: u32, gap_ms: u32) -> f32 {
        0.7 * rate + 0.3 * hits as f32 * 1000.0 / gap_ms as f32
    }

    /// Enough keys that the scan looks at each only every few rounds.
    fn filler(counters: &LocalCounters, n: usize, now: UnixTime) {
        for i in 0..n {
            hit(
                counters,
                &format!("filler{i}"),
                1_000_000,
                Unit::Hour,
                1,
                now,
            );
        }
    }

    fn share(view: &PeerView, key: &str, now: UnixTime) {
        let mut tracker = crate::view::PeerTracker::new(1_000);
        let peer = tracker.node_index("peer/1").unwrap();
        let entry = CountEntry {
            unit: Unit::Hour,
            window: window_tag(now, Unit::Hour),
            count: 1,
            at_millis: millis_tag(now),
        };
        tracker.apply(view, peer, KeyHasher::default().hash(key), entry, now);
        view.flush();
    }

    fn own_rate(view: &PeerView, key: &str, now: UnixTime) -> f32 {
        view.estimate(
            KeyHasher::default().hash(key),
            window_tag(now, Unit::Hour),
            millis_tag(now),
            0,
        )
        .own_rate
    }

    #[test]
    fn a_round_visits_what_changed_not_every_key() {
        let counters = LocalCounters::new(1_000_000);
        let view = PeerView::default();
        let mut publisher = Publisher::new();
        let mut now = T0;
        filler(&counters, 200_000, now);
        publisher.round(&counters, &view, now, 100, 3);
        assert_eq!(
            publisher.visited(),
            200_000,
            "the first round reads everything"
        );
        for round in 0..5u32 {
            now = now.plus(Duration::from_millis(25));
            for i in 0..10 {
                hit(
                    &counters,
                    &format!("filler{}", round * 10 + i),
                    4,
                    Unit::Hour,
                    3,
                    now,
                );
            }
            let sets = publisher.round(&counters, &view, now, 100, 3).sets.len();
            assert_eq!(sets, 10 * (round as usize + 1).min(5));
            // The changes, the hot keys republished unchanged, and the scan's slice.
            assert!(
                publisher.visited() <= 50 + SCAN_MIN_SLICE.max(200_000 / SCAN_ROUNDS),
                "{}",
                publisher.visited()
            );
        }
    }

    #[test]
    fn an_idle_keys_rate_decays_in_the_view_round_by_round() {
        let counters = LocalCounters::new(1_000_000);
        let view = PeerView::default();
        let mut publisher = Publisher::new();
        let mut now = T0;
        filler(&counters, 100_000, now);
        share(&view, "shared", now);
        let mut expected = 0.0;
        for i in 0..20 {
            now = now.plus(Duration::from_millis(25));
            hit(&counters, "shared", 1_000_000, Unit::Hour, 5, now);
            publisher.round(&counters, &view, now, 100, 2);
            // A key's first sighting sets no rate (no earlier count to compare with).
            if i > 0 {
                expected = step(expected, 5, 25);
            }
        }
        // Not hit any more: it is still revisited every round, and its rate decays as before.
        expected = step(expected, 0, 25);
        for _ in 0..20 {
            now = now.plus(Duration::from_millis(25));
            publisher.round(&counters, &view, now, 100, 2);
            let rate = own_rate(&view, "shared", now);
            assert!(
                (rate - expected).abs() <= expected * 1e-3,
                "{rate} vs {expected}"
            );
            expected = step(expected, 0, 25);
        }
        // Until it is negligible: then 0, and no longer revisited for it.
        for _ in 0..40 {
            now = now.plus(Duration::from_millis(25));
            publisher.round(&counters, &view, now, 100, 2);
        }
        assert_eq!(own_rate(&view, "shared", now), 0.0);
    }

    #[test]
    fn a_key_visited_after_idle_rounds_decays_once_per_missed_round() {
        let counters = LocalCounters::new(1_000_000);
        let view = PeerView::default();
        let mut publisher = Publisher::new();
        let mut now = T0;
        filler(&counters, 400_000, now);
        let mut expected = 0.0;
        for i in 0..10 {
            now = now.plus(Duration::from_millis(25));
            hit(&counters, "solo", 1_000_000, Unit::Hour, 4, now);
            publisher.round(&counters, &view, now, 100, 2);
            // A key's first sighting sets no rate (no earlier count to compare with).
            if i > 0 {
                expected = step(expected, 4, 25);
            }
        }
        // Idle for 7 rounds (and not shared, so not revisited for its rate; the scan's slice
        // reaches it at most once), then peers start counting it and it is hit again.
        for _ in 0..7 {
            now = now.plus(Duration::from_millis(25));
            publisher.round(&counters, &view, now, 100, 2);
            expected = step(expected, 0, 25);
        }
        share(&view, "solo", now);
        now = now.plus(Duration::from_millis(25));
        hit(&counters, "solo", 1_000_000, Unit::Hour, 2, now);
        publisher.round(&counters, &view, now, 100, 2);
        expected = step(expected, 2, 25);
        let rate = own_rate(&view, "solo", now);
        assert!(
            (rate - expected).abs() <= expected * 1e-3,
            "{rate} vs {expected}"
        );
    }

    #[test]
    fn evicted_keys_are_deleted_once_their_window_ended_and_forgotten_if_unpublished() {
        // Room for one key: each new key evicts the one before.
        let counters = LocalCounters::new(1);
        let view = PeerView::default();
        let mut publisher = Publisher::new();
        // Hot (1 of 2) and published.
        hit(&counters, "victim", 2, Unit::Minute, 1, T0);
        assert_eq!(publisher.round(&counters, &view, T0, 100, 1).sets.len(), 1);
        // A flood of cold, unpublished keys evicts it (and each other).
        for i in 0..300 {
            hit(&counters, &format!("flood{i}"), 1_000, Unit::Minute, 2, T0);
        }
        assert_eq!(counters.count("victim", Unit::Minute, T0), 0, "evicted");
        let mut now = T0;
        let victim = entry_key(KeyHasher::default().hash("victim"));
        let mut deleted_at = None;
        for _ in 0..(60 + 30) * 4 {
            now = now.plus(Duration::from_millis(250));
            let round = publisher.round(&counters, &view, now, 100, 1);
            assert!(publisher.tracked() <= 2, "{}", publisher.tracked());
            if round.deletes.contains(&victim) {
                assert!(deleted_at.is_none());
                deleted_at = Some(now);
            }
        }
        // The minute of T0 ends 30 s later; evicted in the first round, the key was idle since.
        assert_eq!(
            deleted_at,
            Some(T0.plus(Duration::from_secs(30))),
            "deleted when its window ended"
        );
        // The unpublished flood keys left with their window.
        assert_eq!(publisher.tracked(), 0);
    }
}
