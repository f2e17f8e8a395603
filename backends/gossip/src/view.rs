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
    /// need no fair share and get no slot).
    pub fn set_own_rate(&self, hash: u64, rate: f32) {
        if let Some(slot) = self.shards[shard_of(hash)].load().get(&hash) {
            slot.own_rate.store(rate.to_bits(), Ordering::Relaxed);
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

/// One peer's last publication for one key.
#[derive(Debug, Clone, Copy)]
struct PeerCount {
    /// Index of the peer in [`PeerTracker::nodes`].
    node: u32,
    /// What it published.
    entry: CountEntry,
    /// Its rate on the key (hits/s), smoothed over publications.
    rate: f32,
}

/// The writer side: every peer's publications, folded into the [`PeerView`].
#[derive(Debug)]
pub struct PeerTracker {
    /// Node (id and generation) → small index, so per-key records stay small.
    nodes: HashMap<String, u32>,
    /// Counter key hash → each peer's last publication (few peers per key: a Vec).
    keys: HashMap<u64, Vec<PeerCount>, foldhash::fast::RandomState>,
    /// A publication older than this no longer contributes its rate (the peer stopped hitting
    /// the key, or died): its count stays, its extrapolation stops.
    stale_after_millis: u32,
}

impl PeerTracker {
    /// A tracker whose rates go stale after `stale_after_millis` without a publication.
    pub fn new(stale_after_millis: u32) -> Self {
        PeerTracker {
            nodes: HashMap::new(),
            keys: HashMap::default(),
            stale_after_millis,
        }
    }

    /// The index of a node (`id/generation`), interned.
    pub fn node_index(&mut self, node: &str) -> u32 {
        let next = self.nodes.len() as u32;
        *self.nodes.entry(node.to_owned()).or_insert(next)
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
        let records = self.keys.entry(hash).or_default();
        match records.iter_mut().find(|r| r.node == node) {
            Some(record) => {
                let last = record.entry;
                if entry.window < last.window
                    || (entry.window == last.window
                        && millis_since(last.at_millis, entry.at_millis) == 0)
                {
                    return; // older than what we have, or a duplicate
                }
                if entry.window == last.window {
                    let gap = millis_since(last.at_millis, entry.at_millis).max(1);
                    let instant =
                        entry.count.saturating_sub(last.count) as f32 * 1000.0 / gap as f32;
                    record.rate = 0.5 * record.rate + 0.5 * instant;
                }
                // A new window keeps the rate: traffic does not stop at a boundary.
                record.entry = entry;
            }
            None => {
                // First sight: the average rate since the window began.
                let into_window = now
                    .since_epoch()
                    .saturating_sub(Window::containing(now, entry.unit).start().since_epoch())
                    .as_millis()
                    .max(100) as f32;
                records.push(PeerCount {
                    node,
                    entry,
                    rate: entry.count as f32 * 1000.0 / into_window,
                });
            }
        }
        Self::fold(
            view,
            hash,
            records,
            millis_tag(now),
            self.stale_after_millis,
        );
    }

    /// Recomputes one key's slot from its records: the newest window among them, the sum of
    /// counts in it, and the rate-weighted age of the fresh ones.
    fn fold(view: &PeerView, hash: u64, records: &[PeerCount], now_millis: u32, stale_after: u32) {
        let Some(window) = records.iter().map(|r| r.entry.window).max() else {
            return;
        };
        let (mut sum, mut rate, mut weighted_age) = (0u32, 0f64, 0f64);
        for r in records.iter().filter(|r| r.entry.window == window) {
            sum = sum.saturating_add(r.entry.count);
            let age = millis_since(r.entry.at_millis, now_millis);
            if age <= stale_after && r.rate > 0.0 {
                rate += f64::from(r.rate);
                weighted_age += f64::from(r.rate) * f64::from(age);
            }
        }
        let age = if rate > 0.0 { weighted_age / rate } else { 0.0 };
        let as_of = now_millis.wrapping_sub(age as u32);
        view.store(hash, window, sum, rate as f32, as_of);
    }

    /// Housekeeping, run periodically: drops keys whose window has ended (in the tracker and the
    /// view) and stops extrapolating stale publications. Returns how many keys were dropped.
    pub fn tick(&mut self, view: &PeerView, now: UnixTime) -> usize {
        let now_millis = millis_tag(now);
        let stale_after = self.stale_after_millis;
        let mut dropped = 0;
        self.keys.retain(|hash, records| {
            records.retain(|r| r.entry.window >= window_tag(now, r.entry.unit));
            if records.is_empty() {
                view.remove(*hash);
                dropped += 1;
                return false;
            }
            let refresh = records
                .iter()
                .any(|r| r.rate > 0.0 && millis_since(r.entry.at_millis, now_millis) > stale_after);
            if refresh {
                for r in records.iter_mut() {
                    if millis_since(r.entry.at_millis, now_millis) > stale_after {
                        r.rate = 0.0;
                    }
                }
                Self::fold(view, *hash, records, now_millis, stale_after);
            }
            true
        });
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
        let (a, b) = (tracker.node_index("a/1"), tracker.node_index("b/1"));
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
        let a = tracker.node_index("a/1");
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
        let a = tracker.node_index("a/1");
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

    #[test]
    fn a_dead_peers_counts_stay_until_the_window_ends() {
        let view = PeerView::default();
        let mut tracker = PeerTracker::new(500);
        let a = tracker.node_index("a/1");
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
        let old = tracker.node_index("a/1");
        let new = tracker.node_index("a/2");
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
        let a = tracker.node_index("a/1");
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
        let a = tracker.node_index("a/1");
        tracker.apply(&view, a, 1, entry(3, T0), T0);
        view.flush();
        view.set_own_rate(1, 5.0);
        let w = window_tag(T0, Unit::Minute);
        assert_eq!(view.estimate(1, w, 0, 0).own_rate, 5.0);
    }
}
