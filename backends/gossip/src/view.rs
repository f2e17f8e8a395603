//! What this node knows of its peers' counts: written by one background task, read by every
//! request.
//!
//! [`PeerTracker`] (the writer, owned by one task, no locks) keeps each peer's last published
//! count per counter key, estimates each peer's rate from successive publications, and folds
//! them into one [`PeerSlot`] per key in the shared [`PeerView`]. A slot is three atomics in a
//! copy-on-write shard, so a request reads a key's peer count, the peers' summed rate and the
//! age of that information with one `ArcSwap` load and three atomic loads: it never takes a
//! lock, and never waits on chitchat or on the writer.
//!
//! The global count of a key is a G-counter: the sum over nodes of each node's own count in the
//! window, never a maximum. A node that dies keeps its last counts until their window ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use hivemind_core::{window_tag, UnixTime, Window};

use crate::wire::{millis_since, millis_tag, CountEntry};

/// Shards of the view: a new key copies only its shard's map.
const SHARDS: usize = 64;

/// The peers' part of one counter key, as the request path reads it.
#[derive(Debug, Default)]
pub struct PeerSlot {
    /// `window << 32 | sum of the peers' counts in that window`.
    counts: AtomicU64,
    /// `f32 bits of the peers' summed rate (hits/s) << 32 | millis tag the counts are as of`
    /// (rate-weighted): extrapolation adds `rate × (now - as_of)`.
    trend: AtomicU64,
    /// This node's own recent rate on the key (f32 bits, hits/s), for the fair share.
    own_rate: AtomicU32,
}

impl PeerSlot {
    fn write(&self, window: u32, sum: u32, rate: f32, as_of: u32) {
        self.trend
            .store(pack(rate.to_bits(), as_of), Ordering::Release);
        self.counts.store(pack(window, sum), Ordering::Release);
    }
}

/// What a request learns of its peers for one key in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PeerEstimate {
    /// The peers' last published counts for the window, summed.
    pub published: u32,
    /// Hits the peers probably made since then (rate × age, capped by the horizon).
    pub extrapolated: u32,
    /// The peers' summed rate, hits per second.
    pub peer_rate: f32,
    /// This node's own rate on the key, hits per second.
    pub own_rate: f32,
}

impl PeerEstimate {
    /// Published plus extrapolated.
    pub fn total(&self) -> u32 {
        self.published.saturating_add(self.extrapolated)
    }

    /// Caps the estimate at `most` (the published count first, then the extrapolation).
    pub fn clamp_total(&mut self, most: u32) {
        self.published = self.published.min(most);
        self.extrapolated = self.extrapolated.min(most - self.published);
    }
}

/// One shard: key hash → slot. Replaced whole (copy-on-write) when keys come or go.
type Shard = HashMap<u64, Arc<PeerSlot>, foldhash::fast::RandomState>;

/// Keys added or removed by the writer since the last [`PeerView::flush`].
#[derive(Debug, Default)]
struct Pending {
    /// New slots (already carrying their counts), published to readers at the next flush.
    inserts: HashMap<u64, Arc<PeerSlot>, foldhash::fast::RandomState>,
    /// Keys to drop at the next flush.
    removals: Vec<u64>,
}

/// The shared map of counter key hash → [`PeerSlot`].
///
/// Readers never lock: each shard is an immutable map behind an [`ArcSwap`], and a slot's
/// counts are atomics. The single writer ([`PeerTracker`]'s task) updates existing slots in
/// place; new and dropped keys are batched and published shard by shard in
/// [`flush`](PeerView::flush), which copies only the shards that changed.
#[derive(Debug)]
pub struct PeerView {
    /// Sharded by the key hash's high bits.
    shards: Box<[ArcSwap<Shard>]>,
    /// Writer-side batch of structural changes (readers never touch it).
    pending: Mutex<Pending>,
}

impl Default for PeerView {
    fn default() -> Self {
        PeerView {
            shards: (0..SHARDS)
                .map(|_| ArcSwap::from_pointee(Shard::default()))
                .collect(),
            pending: Mutex::default(),
        }
    }
}

fn pack(high: u32, low: u32) -> u64 {
    (u64::from(high) << 32) | u64::from(low)
}

fn unpack(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

fn shard_of(hash: u64) -> usize {
    (hash >> 58) as usize % SHARDS
}

impl PeerView {
    /// The peers' count for `hash` in `window` at `now_millis`; `horizon_millis` caps how far
    /// the peers' counts are extrapolated (0 turns extrapolation off).
    pub fn estimate(
        &self,
        hash: u64,
        window: u32,
        now_millis: u32,
        horizon_millis: u32,
    ) -> PeerEstimate {
        let shard = self.shards[shard_of(hash)].load();
        let Some(slot) = shard.get(&hash) else {
            return PeerEstimate::default();
        };
        let own_rate = f32::from_bits(slot.own_rate.load(Ordering::Relaxed));
        let (slot_window, published) = unpack(slot.counts.load(Ordering::Acquire));
        if slot_window != window {
            return PeerEstimate {
                own_rate,
                ..PeerEstimate::default()
            };
        }
        let (rate_bits, as_of) = unpack(slot.trend.load(Ordering::Acquire));
        let peer_rate = f32::from_bits(rate_bits);
        let age = millis_since(as_of, now_millis).min(horizon_millis);
        let extrapolated = (f64::from(peer_rate) * f64::from(age) / 1000.0).round();
        PeerEstimate {
            published,
            extrapolated: extrapolated.clamp(0.0, f64::from(u32::MAX)) as u32,
            peer_rate,
            own_rate,
        }
    }

    /// Records this node's own rate on a key the peers also count (keys only this node counts
    /// need no fair share and get no slot). Returns whether the key has a slot.
    pub fn set_own_rate(&self, hash: u64, rate: f32) -> bool {
        match self.shards[shard_of(hash)].load().get(&hash) {
            Some(slot) => {
                slot.own_rate.store(rate.to_bits(), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn store(&self, hash: u64, window: u32, sum: u32, rate: f32, as_of: u32) {
        if let Some(slot) = self.shards[shard_of(hash)].load().get(&hash) {
            slot.write(window, sum, rate, as_of);
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.removals.retain(|h| *h != hash);
        pending
            .inserts
            .entry(hash)
            .or_default()
            .write(window, sum, rate, as_of);
    }

    fn remove(&self, hash: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.inserts.remove(&hash);
        pending.removals.push(hash);
    }

    /// Publishes the writer's new and dropped keys to readers, copying each changed shard
    /// once. The writer calls it after each batch of updates.
    pub fn flush(&self) {
        let pending =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if pending.inserts.is_empty() && pending.removals.is_empty() {
            return;
        }
        let mut changed: Vec<Option<Shard>> = (0..SHARDS).map(|_| None).collect();
        for hash in pending.removals {
            let i = shard_of(hash);
            changed[i]
                .get_or_insert_with(|| (**self.shards[i].load()).clone())
                .remove(&hash);
        }
        for (hash, slot) in pending.inserts {
            let i = shard_of(hash);
            changed[i]
                .get_or_insert_with(|| (**self.shards[i].load()).clone())
                .insert(hash, slot);
        }
        for (i, shard) in changed.into_iter().enumerate() {
            if let Some(shard) = shard {
                self.shards[i].store(Arc::new(shard));
            }
        }
    }

    /// Keys readers can see (for stats).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.load().len()).sum()
    }

    /// Whether readers see no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most peers (node id and generation) tracked at once. Far above any real mesh; a flood of
/// fake node ids beyond it is dropped and counted instead of growing memory.
pub const MAX_PEER_NODES: usize = 1_024;

/// One peer's last publication for one key.
#[derive(Debug, Clone, Copy)]
struct PeerCount {
    /// Index of the peer in [`PeerTracker::nodes`].
    node: u32,
    /// What it published.
    entry: CountEntry,
    /// Its rate on the key (hits/s), smoothed over publications.
    rate: f32,
    /// The window whose hits the rate was last measured on: a rate carried over a window
    /// boundary is replaced faster (see [`carried_rate_weight`]).
    measured_in: u32,
    /// When this node received it (its own clock, ms since the epoch, 64 bits): staleness is
    /// judged by the receiver's clock, whatever the peer's clock says and however long ago.
    received_millis: u64,
}

/// Every peer's last publication for one key.
#[derive(Debug, Default)]
struct KeyRecords {
    /// The window the key's slot in the view shows, so a window change refreshes it.
    shown: u32,
    /// One record per peer (few peers per key: a Vec).
    records: Vec<PeerCount>,
}

/// Peer input the tracker refused, by reason (shown in `/mesh` and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refused {
    /// Publications for a window that has ended by this node's clock.
    pub ended_window: u64,
    /// Publications for a window more than one ahead of this node's clock (a peer's clock far
    /// ahead, or a forged window meant to hide real counts).
    pub future_window: u64,
    /// New keys of a peer that already has `max_keys_per_peer`.
    pub key_cap: u64,
    /// Publications of a node beyond [`MAX_PEER_NODES`].
    pub node_cap: u64,
}

/// The weight the rate carried over from the previous window keeps against the first rate
/// measured in the new one, from `hits` counted over that first interval.
///
/// Within a window each publication's rate is averaged half and half with the previous one.
/// Across a boundary that lags: where the last window reached its limit, the carried rate is
/// what the peer admitted while refusing (about nothing), and rebuilt by halves it was still
/// 6 % short when a limit of 1,000 per second on 9 nodes at 2× filled, half a second into the
/// window; extrapolated over a gossip round that is about 10 hits the peers made unseen, the
/// 1 % the cluster overshot. The carried rate now counts as one hit against the `hits` the new
/// interval measured: many hits (high rates) replace it almost at once, while one hit or none
/// (a few per second, a republication) keeps the half-and-half average, as single hits are too
/// noisy to trust alone.
fn carried_rate_weight(hits: u32) -> f32 {
    (1.0 / (1.0 + hits as f32)).min(0.5)
}

/// The writer side: every peer's publications, folded into the [`PeerView`].
///
/// Peer input is untrusted: only the current and the next window (by this node's clock) are
/// kept, keys per peer and peers are capped, and peers with nothing left are forgotten.
#[derive(Debug)]
pub struct PeerTracker {
    /// Node (id and generation) → small index, so per-key records stay small.
    nodes: HashMap<String, u32>,
    /// Records held per node index; a node whose count drops to zero is forgotten.
    node_keys: HashMap<u32, usize>,
    /// The next node index to hand out.
    next_node: u32,
    /// Counter key hash → each peer's last publication.
    keys: HashMap<u64, KeyRecords, foldhash::fast::RandomState>,
    /// A publication older than this no longer contributes its rate (the peer stopped hitting
    /// the key, or died): its count stays, its extrapolation stops.
    stale_after_millis: u32,
    /// The most keys one peer may have tracked (this node's own key cap).
    max_keys_per_peer: usize,
    /// What was refused, by reason.
    refused: Refused,
}

impl PeerTracker {
    /// A tracker whose rates go stale after `stale_after_millis` without a publication, with
    /// at most a million keys per peer.
    pub fn new(stale_after_millis: u32) -> Self {
        Self::with_key_cap(stale_after_millis, 1_000_000)
    }

    /// [`PeerTracker::new`] with at most `max_keys_per_peer` keys tracked per peer.
    pub fn with_key_cap(stale_after_millis: u32, max_keys_per_peer: usize) -> Self {
        PeerTracker {
            nodes: HashMap::new(),
            node_keys: HashMap::new(),
            next_node: 0,
            keys: HashMap::default(),
            stale_after_millis,
            max_keys_per_peer: max_keys_per_peer.max(1),
            refused: Refused::default(),
        }
    }

    /// The index of a node (`id/generation`), interned; `None` (counted) when
    /// [`MAX_PEER_NODES`] are already tracked.
    pub fn node_index(&mut self, node: &str) -> Option<u32> {
        if let Some(index) = self.nodes.get(node) {
            return Some(*index);
        }
        if self.nodes.len() >= MAX_PEER_NODES {
            self.refused.node_cap += 1;
            return None;
        }
        let index = self.next_node;
        self.next_node = self.next_node.wrapping_add(1);
        self.nodes.insert(node.to_owned(), index);
        self.node_keys.insert(index, 0);
        Some(index)
    }

    /// Whether node index `index` is still tracked (forgotten once it holds no record).
    pub fn has_node(&self, index: u32) -> bool {
        self.node_keys.contains_key(&index)
    }

    /// Peers tracked.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// What was refused so far.
    pub fn refused(&self) -> Refused {
        self.refused
    }

    /// Applies one publication of `node` for key `hash`, received at `now`, and refreshes the
    /// key's slot in `view`. A key new to the view is visible to readers after the next
    /// [`PeerView::flush`] (the caller batches them).
    pub fn apply(
        &mut self,
        view: &PeerView,
        node: u32,
        hash: u64,
        entry: CountEntry,
        now: UnixTime,
    ) {
        let current = window_tag(now, entry.unit);
        if entry.window < current {
            self.refused.ended_window += 1;
            return;
        }
        if entry.window > current.saturating_add(1) {
            self.refused.future_window += 1;
            return;
        }
        let received_millis = u64::try_from(now.since_epoch().as_millis()).unwrap_or(u64::MAX);
        let held = self.node_keys.get(&node).copied().unwrap_or(0);
        let key = self.keys.entry(hash).or_default();
        match key.records.iter_mut().find(|r| r.node == node) {
            Some(record) => {
                let last = record.entry;
                let later = millis_since(last.at_millis, entry.at_millis);
                // Within a window a peer's count only grows (a G-counter); a same-count
                // republication only matters if it is newer.
                if entry.window < last.window
                    || (entry.window == last.window && entry.count <= last.count && later == 0)
                {
                    return; // older than what we have, or a duplicate
                }
                if entry.window == last.window {
                    let gap = if later > 0 {
                        u64::from(later)
                    } else {
                        received_millis.saturating_sub(record.received_millis)
                    };
                    let hits = entry.count.saturating_sub(last.count);
                    let instant = hits as f32 * 1000.0 / gap.max(1) as f32;
                    let kept = if record.measured_in == entry.window {
                        0.5
                    } else {
                        carried_rate_weight(hits)
                    };
                    record.rate = kept * record.rate + (1.0 - kept) * instant;
                    record.measured_in = entry.window;
                }
                // A new window keeps the rate (traffic does not stop at a boundary) until the first
                // interval measured in it, see `carried_rate_weight`.
                record.entry = entry;
                record.received_millis = received_millis;
            }
            None => {
                if held >= self.max_keys_per_peer {
                    self.refused.key_cap += 1;
                    if key.records.is_empty() {
                        self.keys.remove(&hash);
                    }
                    return;
                }
                // First sight: the average rate since the window began.
                let into_window = now
                    .since_epoch()
                    .saturating_sub(Window::containing(now, entry.unit).start().since_epoch())
                    .as_millis()
                    .max(100) as f32;
                key.records.push(PeerCount {
                    node,
                    entry,
                    rate: entry.count as f32 * 1000.0 / into_window,
                    measured_in: entry.window,
                    received_millis,
                });
                if let Some(held) = self.node_keys.get_mut(&node) {
                    *held += 1;
                }
            }
        }
        Self::fold(view, hash, key, now, self.stale_after_millis);
    }

    /// Recomputes one key's slot from its records: the current window by this node's clock if
    /// any peer counts in it, else the next one (a peer whose clock runs a little ahead, or a
    /// boundary just crossed there); the sum of counts in it; the rate-weighted age of the fresh
    /// ones. A peer publishing ahead never hides the peers counting in the current window.
    fn fold(view: &PeerView, hash: u64, key: &mut KeyRecords, now: UnixTime, stale_after: u32) {
        let Some(unit) = key.records.first().map(|r| r.entry.unit) else {
            return;
        };
        let current = window_tag(now, unit);
        let window = if key.records.iter().any(|r| r.entry.window == current) {
            current
        } else {
            current.saturating_add(1)
        };
        let now_millis = millis_tag(now);
        let (mut sum, mut rate, mut weighted_age) = (0u32, 0f64, 0f64);
        for r in key.records.iter().filter(|r| r.entry.window == window) {
            sum = sum.saturating_add(r.entry.count);
            let age = millis_since(r.entry.at_millis, now_millis);
            if age <= stale_after && r.rate > 0.0 {
                rate += f64::from(r.rate);
                weighted_age += f64::from(r.rate) * f64::from(age);
            }
        }
        let age = if rate > 0.0 { weighted_age / rate } else { 0.0 };
        let as_of = now_millis.wrapping_sub(age as u32);
        key.shown = window;
        view.store(hash, window, sum, rate as f32, as_of);
    }

    /// Housekeeping, run periodically: drops records outside the current and next window (in
    /// the tracker and the view; a clock that stepped back leaves far-future ones), stops
    /// extrapolating stale publications, shows the new window once it begins, and forgets
    /// peers with nothing left. Returns how many keys were dropped.
    pub fn tick(&mut self, view: &PeerView, now: UnixTime) -> usize {
        let now_ms = u64::try_from(now.since_epoch().as_millis()).unwrap_or(u64::MAX);
        let stale_after = self.stale_after_millis;
        let node_keys = &mut self.node_keys;
        let mut dropped = 0;
        self.keys.retain(|hash, key| {
            key.records.retain(|r| {
                let current = window_tag(now, r.entry.unit);
                let keep = r.entry.window >= current && r.entry.window <= current.saturating_add(1);
                if !keep {
                    if let Some(held) = node_keys.get_mut(&r.node) {
                        *held = held.saturating_sub(1);
                    }
                }
                keep
            });
            if key.records.is_empty() {
                view.remove(*hash);
                dropped += 1;
                return false;
            }
            let mut refresh = false;
            for r in key.records.iter_mut() {
                if r.rate > 0.0 && now_ms.saturating_sub(r.received_millis) > u64::from(stale_after)
                {
                    r.rate = 0.0;
                    refresh = true;
                }
            }
            let current = window_tag(now, key.records[0].entry.unit);
            if key.shown != current && key.records.iter().any(|r| r.entry.window == current) {
                refresh = true;
            }
            if refresh {
                Self::fold(view, *hash, key, now, stale_after);
            }
            true
        });
        let gone: Vec<u32> = self
            .node_keys
            .iter()
            .filter(|(_, held)| **held == 0)
            .map(|(index, _)| *index)
            .collect();
        if !gone.is_empty() {
            self.node_keys.retain(|_, held| *held > 0);
            self.nodes.retain(|_, index| !gone.contains(index));
        }
        view.flush();
        dropped
    }

    /// Counter keys tracked.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivemind_core::Unit;
    use std::time::Duration;

    /// 40 s into a minute.
    const T0: UnixTime = UnixTime::from_secs(1_700_000_080);

    fn entry(count: u32, at: UnixTime) -> CountEntry {
        CountEntry {
            unit: Unit::Minute,
            window: window_tag(at, Unit::Minute),
            count,
            at_millis: millis_tag(at),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_global_count_is_the_sum_over_peers() {
        let view = PeerView::default();
        let mut tracker = PeerTracker::new(1_000);
        let (a, b) = (
            tracker.node_index("a/1").unwrap(),
            tracker.node_index("b/1").unwrap(),
        );
        tracker.apply(&view, a, 7, entry(10, T0), T0);
        view.flush();
        tracker.apply(&view, b, 7, entry(5, T0), T0);
        view.flush();
        tracker.apply(&view, a, 7, entry(12, T0.plus(ms(100))), T0.plus(ms(100)));
        view.flush();
        let w = window_tag(T0, Unit::Minute);
        let est = view.estimate(7, w, millis_tag(T0.plus(ms(100))), 0);
        assert_eq!(est.published, 17);
        assert_eq!(est.extrapolated, 0, "horizon 0: no extrapolation");
        assert_eq!(view.estimate(7, w + 1, millis_tag(T0), 0).total(), 0);
        assert_eq!(view.estimate(8, w, millis_tag(T0), 0).total(), 0);
    }

    #[test]
    fn older_or_duplicate_publications_are_ignored() {
        let view = PeerView::default();
        let mut tracker = PeerTracker::new(1_000);
        let a = tracker.node_index("a/1").unwrap();
        tracker.apply(&view, a, 1, entry(10, T0.plus(ms(200))), T0.plus(ms(200)));
        view.flush();
        tracker.apply(&view, a, 1, entry(4, T0.plus(ms(100))), T0.plus(ms(300)));
        view.flush();
        tracker.apply(&view, a, 1, entry(4, T0.plus(ms(200))), T0.plus(ms(300)));
        view.flush();
        let w = window_tag(T0, Unit::Minute);
        assert_eq!(view.estimate(1, w, millis_tag(T0), 0).published, 10);
    }

    #[test]
    fn rates_extrapolate_up_to_the_horizon_then_go_stale() {
        let view = PeerView::default();
        let mut tracker = PeerTracker::new(500);
        let a = tracker.node_index("a/1").unwrap();
        // 100 hits per 100 ms = 1,000/s, steadily.
        for i in 0..5u64 {
            let at = T0.plus(ms(100 * i));
            tracker.apply(&view, a, 1, entry(100 * i as u32, at), at);
            view.flush();
        }
        let last = T0.plus(ms(400));
        let w = window_tag(T0, Unit::Minute);
        let est = view.estimate(1, w, millis_tag(last.plus(ms(50))), 300);
        assert_eq!(est.published, 400);
        assert!((900.0..=1_100.0).contains(&est.peer_rate), "{est:?}");
        assert!((40..=60).contains(&est.extrapolated), "{est:?}");
        // Capped by the horizon.
        let far = view.estimate(1, w, millis_tag(last.plus(ms(250))), 100);
        assert!((90..=110).contains(&far.extrapolated), "{far:?}");
        // No publication for longer than stale_after: the count stays, the rate goes.
        tracker.tick(&view, last.plus(ms(600)));
        let stale = view.estimate(1, w, millis_tag(last.plus(ms(600))), 300);
        assert_eq!((stale.published, stale.extrapolated), (400, 0));
    }

    /// A per-second entry of `count` published at `at`.
    fn second_entry(count: u32, at: UnixTime) -> CountEntry {
        CountEntry {
            unit: Unit::Second,
            window: window_tag(at, Unit::Second),
            count,
            at_millis: millis_tag(at),
        }
    }

    #[test]
    fn a_rate_carried_over_a_window_boundary_gives_way_to_the_first_measured_one() {
        let view = PeerView::default();
        let mut tracker = PeerTracker::new(500);
        let a = tracker.node_index("a/1").unwrap();
        // A window that filled: the peer reached 500, then refused and republished unchanged,
        // so its rate fell to a few hits per second.
        let start = UnixTime::from_secs(1_700_000_000);
        let mut publish = |count, at: UnixTime| {
            tracker.apply(&view, a, 1, second_entry(count, at), at);
            view.flush();
        };
        publish(400, start.plus(ms(400)));
        publish(500, start.plus(ms(500)));
        for i in 6..10 {
            publish(500, start.plus(ms(100 * i)));
        }
        let next = start.plus(ms(1_000));
        let w = window_tag(next, Unit::Second);
        // The new window: 20 hits in its first 100 ms, 22 in the next 100 ms (220/s).
        publish(20, next.plus(ms(100)));
        let carried = view.estimate(1, w, millis_tag(next.plus(ms(100))), 300);
        assert!(carried.peer_rate < 100.0, "{carried:?}");
        publish(42, next.plus(ms(200)));
        let measured = view.estimate(1, w, millis_tag(next.plus(ms(200))), 300);
        assert!(
            (200.0..=225.0).contains(&measured.peer_rate),
            "22 hits replace the carried rate almost whole: {measured:?} (was {carried:?})"
        );
        // One hit, the next round, is averaged half and half as within any window.
        publish(43, next.plus(ms(300)));
        let single = view.estimate(1, w, millis_tag(next.plus(ms(300))), 300);
        let half = 0.5 * measured.peer_rate + 0.5 * 10.0;
        assert!((single.peer_rate - half).abs() < 1.0, "{single:?}");
    }

    #[test]
    fn carried_rates_keep_half_their_weight_against_one_hit_and_little_against_many() {
        assert_eq!(carried_rate_weight(0), 0.5);
        assert_eq!(carried_rate_weight(1), 0.5);
        assert!((carried_rate_weight(3) - 0.25).abs() < 1e-6);
        assert!(carried_rate_weight(99) <= 0.01);
    }

    #[test]
    fn a_dead_peers_counts_stay_until_the_window_ends() {
        let view = PeerView::default();
        let mut tracker = PeerTracker::new(500);
        let a = tracker.node_index("a/1").unwrap();
        tracker.apply(&view, a, 1, entry(30, T0), T0);
        view.flush();
        let w = window_tag(T0, Unit::Minute);
        assert_eq!(tracker.tick(&view, T0.plus(Duration::from_secs(10))), 0);
        assert_eq!(view.estimate(1, w, 0, 0).published, 30);
        // T0 is 40 s into its minute: 20 s later the window has ended.
        assert_eq!(tracker.tick(&view, T0.plus(Duration::from_secs(20))), 1);
        assert!(view.is_empty());
        assert_eq!(tracker.keys(), 0);
    }

    #[test]
    fn a_restarted_peer_is_a_new_node_and_the_old_counts_remain() {
        let view = PeerView::default();
        let mut tracker = PeerTracker::new(500);
        let old = tracker.node_index("a/1").unwrap();
        let new = tracker.node_index("a/2").unwrap();
        assert_ne!(old, new);
        tracker.apply(&view, old, 1, entry(30, T0), T0);
        view.flush();
        tracker.apply(&view, new, 1, entry(2, T0.plus(ms(10))), T0.plus(ms(10)));
        view.flush();
        let w = window_tag(T0, Unit::Minute);
        assert_eq!(view.estimate(1, w, 0, 0).published, 32);
    }

    #[test]
    fn new_keys_reach_readers_at_the_flush_and_updates_in_place() {
        let view = PeerView::default();
        let mut tracker = PeerTracker::new(500);
        let a = tracker.node_index("a/1").unwrap();
        let w = window_tag(T0, Unit::Minute);
        for hash in 0..1_000u64 {
            tracker.apply(&view, a, hash << 50, entry(1, T0), T0);
        }
        assert!(view.is_empty(), "nothing published before the flush");
        view.flush();
        assert_eq!(view.len(), 1_000);
        // An existing key changes in place, visible at once.
        tracker.apply(
            &view,
            a,
            5 << 50,
            entry(9, T0.plus(ms(10))),
            T0.plus(ms(10)),
        );
        assert_eq!(view.estimate(5 << 50, w, 0, 0).published, 9);
    }

    #[test]
    fn own_rate_is_kept_only_for_shared_keys() {
        let view = PeerView::default();
        view.set_own_rate(1, 5.0);
        assert!(view.is_empty());
        let mut tracker = PeerTracker::new(500);
        let a = tracker.node_index("a/1").unwrap();
        tracker.apply(&view, a, 1, entry(3, T0), T0);
        view.flush();
        view.set_own_rate(1, 5.0);
        let w = window_tag(T0, Unit::Minute);
        assert_eq!(view.estimate(1, w, 0, 0).own_rate, 5.0);
    }

    fn at_window(count: u32, at: UnixTime, window: u32) -> CountEntry {
        CountEntry {
            window,
            ..entry(count, at)
        }
    }

    #[test]
    fn only_the_current_and_next_window_are_taken_from_peers() {
        let view = PeerView::default();
        let mut tracker = PeerTracker::new(1_000);
        let (a, b) = (
            tracker.node_index("a/1").unwrap(),
            tracker.node_index("b/1").unwrap(),
        );
        let w = window_tag(T0, Unit::Minute);
        // A forged far-future window would hide every real peer's count: refused.
        tracker.apply(&view, a, 1, at_window(u32::MAX, T0, w + 1_000), T0);
        tracker.apply(&view, a, 1, at_window(5, T0, w - 1), T0);
        view.flush();
        assert_eq!(tracker.refused().future_window, 1);
        assert_eq!(tracker.refused().ended_window, 1);
        assert!(view.is_empty());
        // A peer whose clock runs a little ahead publishes the next window; the peer counting
        // in the current one is not hidden by it.
        tracker.apply(&view, a, 1, at_window(7, T0, w + 1), T0);
        view.flush();
        tracker.apply(&view, b, 1, entry(4, T0), T0);
        view.flush();
        assert_eq!(view.estimate(1, w, millis_tag(T0), 0).published, 4);
        // Once the next window begins here, the ahead peer's count shows, without waiting for
        // its next publication.
        let next = T0.plus(Duration::from_secs(20));
        tracker.tick(&view, next);
        assert_eq!(view.estimate(1, w + 1, millis_tag(next), 0).published, 7);
    }

    #[test]
    fn a_clock_stepping_back_drops_far_future_records() {
        let view = PeerView::default();
        let mut tracker = PeerTracker::new(1_000);
        let a = tracker.node_index("a/1").unwrap();
        let ahead = T0.plus(Duration::from_secs(600));
        tracker.apply(&view, a, 1, entry(9, ahead), ahead);
        view.flush();
        assert_eq!(tracker.keys(), 1);
        // Our clock stepped back ten minutes: that window is ten ahead, stale.
        assert_eq!(tracker.tick(&view, T0), 1);
        assert!(view.is_empty());
    }

    #[test]
    fn keys_per_peer_and_peers_are_capped_and_gone_peers_are_forgotten() {
        let view = PeerView::default();
        let mut tracker = PeerTracker::with_key_cap(1_000, 10);
        let a = tracker.node_index("a/1").unwrap();
        for hash in 0..50u64 {
            tracker.apply(&view, a, hash << 50, entry(1, T0), T0);
        }
        view.flush();
        assert_eq!(tracker.keys(), 10);
        assert_eq!(tracker.refused().key_cap, 40);
        for i in 0..(MAX_PEER_NODES + 100) {
            let _ = tracker.node_index(&format!("fake-{i}/1"));
        }
        assert_eq!(tracker.nodes(), MAX_PEER_NODES);
        assert!(tracker.refused().node_cap >= 100);
        // Nodes with no record are forgotten at the next tick; so is `a` once its window ends.
        tracker.tick(&view, T0);
        assert_eq!(tracker.nodes(), 1);
        assert!(tracker.has_node(a));
        tracker.tick(&view, T0.plus(Duration::from_secs(20)));
        assert_eq!(tracker.nodes(), 0);
        assert!(!tracker.has_node(a));
    }

    #[test]
    fn a_month_long_silence_does_not_freeze_a_key() {
        // Month windows: a peer republishing 30 days later (its millisecond tag wrapped past
        // half of 2^32) with a higher count is taken, not mistaken for a duplicate.
        let view = PeerView::default();
        let mut tracker = PeerTracker::new(1_000);
        let a = tracker.node_index("a/1").unwrap();
        let start = UnixTime::from_secs(1_700_000_000 / 2_592_000 * 2_592_000 + 60);
        let month = |count, at: UnixTime| CountEntry {
            unit: Unit::Month,
            window: window_tag(at, Unit::Month),
            count,
            at_millis: millis_tag(at),
        };
        tracker.apply(&view, a, 1, month(3, start), start);
        let later = start.plus(Duration::from_secs(26 * 24 * 3600));
        tracker.apply(&view, a, 1, month(8, later), later);
        view.flush();
        let w = window_tag(later, Unit::Month);
        assert_eq!(view.estimate(1, w, millis_tag(later), 0).published, 8);
    }

    #[test]
    fn an_estimate_is_clamped_to_what_peers_could_admit() {
        let mut estimate = PeerEstimate {
            published: u32::MAX,
            extrapolated: 5,
            ..PeerEstimate::default()
        };
        estimate.clamp_total(200);
        assert_eq!((estimate.published, estimate.extrapolated), (200, 0));
        let mut small = PeerEstimate {
            published: 50,
            extrapolated: 500,
            ..PeerEstimate::default()
        };
        small.clamp_total(200);
        assert_eq!(small.total(), 200);
    }
}
