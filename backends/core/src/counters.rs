//! Lock-free local counters: one `AtomicU64` per counter key packing (window, count).
//!
//! The high 32 bits hold the low 32 bits of the window index, the low 32 bits the count in that
//! window. A count that belongs to an older window reads as zero, so a new window needs no reset
//! pass. Updates are compare-and-swap loops on the slot. The key index is sharded: finding an
//! existing key takes one shard's read lock (shared), so no request waits on another's count.
//!
//! Memory is bounded two ways: [`LocalCounters::sweep`] drops keys whose window has ended, and a
//! `max_keys` cap (split evenly over the shards) evicts a shard's coldest keys (lowest count) when
//! a new key would exceed it. So a flood of distinct keys can neither exhaust memory nor switch
//! enforcement off: every key, new or old, is still limited. Each eviction is counted in
//! [`CounterStats`] and logged by the caller.
//!
//! A strategy that shares counts (gossip) asks for the keys that changed since it last asked
//! ([`LocalCounters::drain_changes`]) instead of scanning every key. Each slot has a dirty flag:
//! the first change after a drain flips it and pushes the key onto its shard's change list (a
//! short mutex push); later changes only read the flag. Keys that sweeps and evictions drop are
//! put on the list too, so the reader learns they are gone. Until the first drain nothing is
//! tracked (slots are born dirty and never pushed), so strategies that never drain pay nothing.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::hit::{request_admitted, Decision, Enforcement, Hit};
use crate::window::{Unit, UnixTime, Window};

/// How many keys one eviction pass frees, as a fraction of a shard's cap (1/8), so the cost of a
/// pass is spread over many new keys.
const EVICTION_BATCH_DIVISOR: usize = 8;

/// The fewest keys a shard is sized for: a cap below `2 * MIN_KEYS_PER_SHARD` keeps one shard.
const MIN_KEYS_PER_SHARD: usize = 4096;

/// The most shards: enough to spread writers on any machine hivemind runs on.
const MAX_SHARDS: usize = 64;

/// Counts of what the bounded map had to do, for metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterStats {
    /// Keys currently held.
    pub live_keys: usize,
    /// Keys dropped by sweeps because their window ended.
    pub expired: u64,
    /// Keys dropped while still in their window, to stay under `max_keys`.
    pub evicted: u64,
    /// Eviction passes run (each one frees about `max_keys / 8` keys).
    pub eviction_passes: u64,
}

/// One counter.
#[derive(Debug)]
struct Slot {
    /// `(window index as u32) << 32 | count`.
    state: AtomicU64,
    /// The unit of the limit that created the slot: the counter key includes the unit, so it is
    /// fixed for the slot's life and tells a sweep when the slot's window has ended.
    unit: Unit,
    /// The limit the last hit carried: lets a strategy that shares counts (gossip) rank keys by
    /// how close they are to their limit. Written only when it changes (a rules reload).
    limit: AtomicU32,
    /// Changed since the last [`LocalCounters::drain_changes`] (and on its shard's change list).
    /// Slots are born dirty while nobody drains, so nothing is pushed. Fits in the padding: the
    /// slot stays 16 bytes.
    dirty: AtomicBool,
}

/// One shard's keys that changed since the last drain, or were dropped.
#[derive(Debug, Default)]
struct ChangeList {
    /// Keys in the order of their first change (or drop) since the last drain.
    keys: Vec<Box<str>>,
    /// The list reached the shard's size and was cleared: the next drain scans the whole shard
    /// for dirty slots instead (dropped keys pushed meanwhile are not reported).
    overflowed: bool,
}

/// What [`LocalCounters::drain_changes`] reports of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterChange<'k> {
    /// The key changed and is live: its current state.
    Live(CounterSnapshot<'k>),
    /// The key was dropped (its window ended and a sweep took it, or it was evicted).
    Gone(&'k str),
}

/// One live counter as [`LocalCounters::for_each_live`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterSnapshot<'k> {
    /// The counter key.
    pub key: &'k str,
    /// Its unit (fixed for the key).
    pub unit: Unit,
    /// The low 32 bits of the window index the count belongs to.
    pub window: u32,
    /// This node's count in that window.
    pub count: u32,
    /// The limit of the last hit on the key.
    pub limit: u32,
}

const fn pack(window: u32, count: u32) -> u64 {
    ((window as u64) << 32) | count as u64
}

const fn unpack(state: u64) -> (u32, u32) {
    ((state >> 32) as u32, state as u32)
}

/// The 32 bits of a window index kept in a slot and shared between nodes. Second windows pass
/// 2^32 in the year 2106.
pub fn window_tag(now: UnixTime, unit: Unit) -> u32 {
    Window::containing(now, unit).index as u32
}

impl Slot {
    fn new(unit: Unit, limit: u32, dirty: bool) -> Self {
        Slot {
            state: AtomicU64::new(0),
            unit,
            limit: AtomicU32::new(limit),
            dirty: AtomicBool::new(dirty),
        }
    }

    /// The key's state if it is live at `now` (a count above zero in the current window, or the
    /// next one).
    fn live<'k>(&self, key: &'k str, now: UnixTime) -> Option<CounterSnapshot<'k>> {
        let window = window_tag(now, self.unit);
        // SeqCst: read after the dirty flag was cleared (see `LocalCounters::mark`).
        let (stored, count) = unpack(self.state.load(Ordering::SeqCst));
        ((stored == window || stored == window.wrapping_add(1)) && count > 0).then(|| {
            CounterSnapshot {
                key,
                unit: self.unit,
                window: stored,
                count,
                limit: self.limit.load(Ordering::Relaxed),
            }
        })
    }

    /// Records the limit of a hit, writing only when it changed (no shared-line write per hit).
    fn note_limit(&self, limit: u32) {
        if self.limit.load(Ordering::Relaxed) != limit {
            self.limit.store(limit, Ordering::Relaxed);
        }
    }

    /// The count in `window`: a count from an older window is zero. A count from the next window
    /// (another request read the clock a moment later) is taken as current. A count from further
    /// ahead is stale (the clock stepped back): zero, so the key is not blocked until the clock
    /// catches up.
    fn count_in(state: u64, window: u32) -> (u32, u32) {
        let (stored, count) = unpack(state);
        if stored == window || stored == window.wrapping_add(1) {
            (stored, count)
        } else {
            (window, 0)
        }
    }

    fn peek(&self, window: u32) -> u32 {
        Slot::count_in(self.state.load(Ordering::Acquire), window).1
    }

    /// Adds `addend` if the result stays within `limit`. Returns the new count, or the current
    /// count if the addend does not fit.
    fn try_add(&self, window: u32, addend: u32, limit: u32) -> Result<u32, u32> {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let (stored, count) = Slot::count_in(current, window);
            let after = u64::from(count) + u64::from(addend);
            if after > u64::from(limit) {
                return Err(count);
            }
            let after = after as u32;
            match self.state.compare_exchange_weak(
                current,
                pack(stored, after),
                Ordering::SeqCst,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(after),
                Err(seen) => current = seen,
            }
        }
    }

    /// Adds `addend` unconditionally (saturating). Returns the new count.
    fn add(&self, window: u32, addend: u32) -> u32 {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let (stored, count) = Slot::count_in(current, window);
            let after = count.saturating_add(addend);
            match self.state.compare_exchange_weak(
                current,
                pack(stored, after),
                Ordering::SeqCst,
                Ordering::Acquire,
            ) {
                Ok(_) => return after,
                Err(seen) => current = seen,
            }
        }
    }

    /// Takes back `addend` added in `window`, unless that window has already ended.
    fn take_back(&self, window: u32, addend: u32) -> u32 {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let (stored, count) = unpack(current);
            if stored != window {
                return Slot::count_in(current, window).1;
            }
            let after = count.saturating_sub(addend);
            match self.state.compare_exchange_weak(
                current,
                pack(stored, after),
                Ordering::SeqCst,
                Ordering::Acquire,
            ) {
                Ok(_) => return after,
                Err(seen) => current = seen,
            }
        }
    }

    /// Whether the count belongs to an ended window, or to one more than a window ahead (left by
    /// a clock that stepped back).
    fn expired(&self, now: UnixTime) -> bool {
        let stored = unpack(self.state.load(Ordering::Acquire)).0;
        let window = window_tag(now, self.unit);
        stored < window || stored > window.wrapping_add(1)
    }
}

/// One shard's keys: counter key → slot.
type ShardMap = HashMap<Box<str>, Slot, foldhash::fast::RandomState>;

/// The counters of one node, keyed by counter key.
///
/// The key index is split into shards, each behind its own `RwLock`: the hot path (a key that
/// already exists) takes one shard's read lock, shared with every other reader, and updates the
/// slot with a CAS; only a new key takes a shard's write lock. No lock spans shards.
pub struct LocalCounters {
    /// The key index; the shard of a key is picked by its hash.
    shards: Box<[RwLock<ShardMap>]>,
    /// Picks a key's shard (independent of the maps' own hashing).
    shard_hasher: foldhash::fast::RandomState,
    /// The most keys a shard holds; `shards.len() * shard_cap <= max_keys`.
    shard_cap: usize,
    /// The configured cap on live keys.
    max_keys: usize,
    /// Keys dropped by sweeps (window ended).
    expired: AtomicU64,
    /// Keys evicted while live, to respect `max_keys`.
    evicted: AtomicU64,
    /// Eviction passes run.
    eviction_passes: AtomicU64,
    /// Per shard, the keys changed or dropped since the last drain (same index as `shards`).
    changes: Box<[Mutex<ChangeList>]>,
    /// Set by the first [`drain_changes`](Self::drain_changes): new slots are born clean (and
    /// pushed at their first change), dropped keys are reported.
    tracking: AtomicBool,
}

impl std::fmt::Debug for LocalCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCounters")
            .field("max_keys", &self.max_keys)
            .field("shards", &self.shards.len())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Reads a shard; a poisoned lock (a panic elsewhere while it was held) still holds valid slots.
fn read(shard: &RwLock<ShardMap>) -> RwLockReadGuard<'_, ShardMap> {
    shard.read().unwrap_or_else(PoisonError::into_inner)
}

/// Writes a shard; see [`read`].
fn write(shard: &RwLock<ShardMap>) -> RwLockWriteGuard<'_, ShardMap> {
    shard.write().unwrap_or_else(PoisonError::into_inner)
}

/// Locks a change list; see [`read`].
fn lock(list: &Mutex<ChangeList>) -> MutexGuard<'_, ChangeList> {
    list.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalCounters {
    /// Counters that hold at most `max_keys` keys (at least 1).
    pub fn new(max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        // Enough shards to spread writers over, each still big enough that per-shard eviction
        // picks the coldest keys from a representative sample.
        let shards = 1usize << (max_keys / MIN_KEYS_PER_SHARD).clamp(1, MAX_SHARDS).ilog2();
        LocalCounters {
            shards: (0..shards)
                .map(|_| RwLock::new(ShardMap::default()))
                .collect(),
            shard_hasher: foldhash::fast::RandomState::default(),
            shard_cap: max_keys / shards,
            max_keys,
            expired: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            eviction_passes: AtomicU64::new(0),
            changes: (0..shards).map(|_| Mutex::default()).collect(),
            tracking: AtomicBool::new(false),
        }
    }

    /// The configured cap on live keys.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// What the map holds and has dropped so far.
    pub fn stats(&self) -> CounterStats {
        CounterStats {
            live_keys: self.shards.iter().map(|shard| read(shard).len()).sum(),
            expired: self.expired.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            eviction_passes: self.eviction_passes.load(Ordering::Relaxed),
        }
    }

    /// The count of `key` in the window of `unit` containing `now` (0 if unknown).
    pub fn count(&self, key: &str, unit: Unit, now: UnixTime) -> u32 {
        read(&self.shards[self.shard_index(key)])
            .get(key)
            .map_or(0, |slot| slot.peek(window_tag(now, unit)))
    }

    /// Checks a request's hits and counts them only if the request is admitted
    /// ([`request_admitted`]). Enforced and quota hits are reserved with a compare-and-swap that
    /// never takes a counter past its limit; if the request is then rejected the reservations are
    /// taken back. Shadow hits, and quota hits over their limit in an admitted request, are added
    /// as they are: they are counted but never enforced.
    pub fn check(&self, batch: &[Hit], now: UnixTime) -> Vec<Decision> {
        self.check_with_offsets(batch, &[], now)
    }

    /// [`check`](Self::check) with counts known from elsewhere: `offsets[i]` hits of the same key
    /// and window that other nodes made (missing entries are 0). A hit is admitted only if
    /// `offset + own count + addend` stays within its limit, and each decision's `count` and
    /// `remaining` include the offset. Only this node's own count is stored.
    pub fn check_with_offsets(
        &self,
        batch: &[Hit],
        offsets: &[u32],
        now: UnixTime,
    ) -> Vec<Decision> {
        let offset_of = |i: usize| offsets.get(i).copied().unwrap_or(0);
        let mut decisions = Vec::with_capacity(batch.len());
        for (i, hit) in batch.iter().enumerate() {
            let unit = hit.limit.unit;
            let window = window_tag(now, unit);
            let limit = hit.limit.requests_per_unit;
            let offset = offset_of(i);
            let (over_limit, count) = self.with_slot(hit, now, |slot| {
                slot.note_limit(limit);
                match hit.enforcement {
                    Enforcement::Enforce | Enforcement::Quota if offset > limit => {
                        ((true, slot.peek(window)), false)
                    }
                    Enforcement::Enforce | Enforcement::Quota => {
                        match slot.try_add(window, hit.addend, limit - offset) {
                            Ok(count) => ((false, count), hit.addend > 0),
                            Err(count) => ((true, count), false),
                        }
                    }
                    Enforcement::Shadow => {
                        let count = slot.peek(window);
                        (
                            (
                                u64::from(offset) + u64::from(count) + u64::from(hit.addend)
                                    > u64::from(limit),
                                count,
                            ),
                            false,
                        )
                    }
                }
            });
            decisions.push(Decision {
                over_limit,
                count,
                remaining: 0,
                until_reset: std::time::Duration::from_secs(Window::seconds_until_reset(unit, now)),
            });
        }

        let admitted = request_admitted(
            batch
                .iter()
                .zip(&decisions)
                .map(|(hit, decision)| (hit.enforcement, decision.over_limit)),
        );
        for (i, (hit, decision)) in batch.iter().zip(decisions.iter_mut()).enumerate() {
            let reserved = hit.enforcement != Enforcement::Shadow && !decision.over_limit;
            let window = window_tag(now, hit.limit.unit);
            if admitted && !reserved {
                decision.count = self.with_slot(hit, now, |slot| {
                    (slot.add(window, hit.addend), hit.addend > 0)
                });
            } else if !admitted && reserved {
                decision.count = self.with_slot(hit, now, |slot| {
                    (slot.take_back(window, hit.addend), hit.addend > 0)
                });
            }
            decision.count = decision.count.saturating_add(offset_of(i));
            decision.remaining = if decision.over_limit {
                0
            } else {
                hit.limit.requests_per_unit.saturating_sub(decision.count)
            };
        }
        decisions
    }

    /// Calls `f` with every key whose count is in the current window of its unit and above zero,
    /// one shard at a time (a shard is read-locked while its keys are reported, so keep `f` short).
    pub fn for_each_live(&self, now: UnixTime, mut f: impl FnMut(CounterSnapshot<'_>)) {
        for shard in self.shards.iter() {
            for (key, slot) in read(shard).iter() {
                if let Some(live) = slot.live(key, now) {
                    f(live);
                }
            }
        }
    }

    /// Calls `f` with every key that changed since the last call (its state now, if live) and
    /// every key dropped since (by a sweep or an eviction), one shard at a time under its read
    /// lock (keep `f` short). A key changed several times is reported once; a dropped key may be
    /// reported twice. With `everything`, every live key is reported (and every flag cleared),
    /// changed or not: for a reader starting afresh. The first call also turns tracking on and
    /// reports everything.
    ///
    /// One reader at a time: two would split the changes between them.
    pub fn drain_changes(
        &self,
        now: UnixTime,
        everything: bool,
        mut f: impl FnMut(CounterChange<'_>),
    ) {
        let everything = !self.tracking.swap(true, Ordering::SeqCst) || everything;
        for (shard, changes) in self.shards.iter().zip(self.changes.iter()) {
            let list = std::mem::take(&mut *lock(changes));
            let map = read(shard);
            if everything || list.overflowed {
                for (key, slot) in map.iter() {
                    // Clear the flag before reading the state (see `mark`).
                    let dirty = slot.dirty.load(Ordering::SeqCst)
                        && slot.dirty.swap(false, Ordering::SeqCst);
                    if dirty || everything {
                        if let Some(live) = slot.live(key, now) {
                            f(CounterChange::Live(live));
                        }
                    }
                }
                for key in list.keys.iter().filter(|key| !map.contains_key(&***key)) {
                    f(CounterChange::Gone(key));
                }
                continue;
            }
            for key in &list.keys {
                match map.get(&**key) {
                    Some(slot) => {
                        // Clear the flag before reading the state (see `mark`).
                        if slot.dirty.swap(false, Ordering::SeqCst) {
                            if let Some(live) = slot.live(key, now) {
                                f(CounterChange::Live(live));
                            }
                        }
                    }
                    None => f(CounterChange::Gone(key)),
                }
            }
        }
    }

    /// Drops every key whose window ended before `now`. Returns how many were dropped.
    pub fn sweep(&self, now: UnixTime) -> usize {
        let tracking = self.tracking.load(Ordering::Relaxed);
        let mut dropped = 0;
        for (shard, changes) in self.shards.iter().zip(self.changes.iter()) {
            let mut map = write(shard);
            let before = map.len();
            self.drop_where(&mut map, changes, tracking, |slot| slot.expired(now));
            dropped += before - map.len();
        }
        self.expired.fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    /// Drops the slots `gone` picks, and when tracking puts their keys on the change list.
    fn drop_where(
        &self,
        map: &mut ShardMap,
        changes: &Mutex<ChangeList>,
        tracking: bool,
        mut gone: impl FnMut(&Slot) -> bool,
    ) {
        if !tracking {
            map.retain(|_, slot| !gone(slot));
            return;
        }
        let mut dropped = Vec::new();
        map.retain(|key, slot| {
            let drop = gone(slot);
            if drop {
                dropped.push(key.clone());
            }
            !drop
        });
        if !dropped.is_empty() {
            let mut list = lock(changes);
            for key in dropped {
                self.push(&mut list, key);
            }
        }
    }

    /// Appends to a change list, unless it outgrew the shard (then it is cleared and the next
    /// drain scans the shard: the list never holds more keys than a shard does).
    fn push(&self, list: &mut ChangeList, key: Box<str>) {
        if list.overflowed {
            return;
        }
        if list.keys.len() >= self.shard_cap.max(MIN_KEYS_PER_SHARD) {
            list.keys = Vec::new();
            list.overflowed = true;
            return;
        }
        list.keys.push(key);
    }

    /// Notes that `slot` (of `key`, in shard `index`) changed: the first change since a drain
    /// puts the key on the shard's change list; later ones only read the flag.
    ///
    /// The count was written (SeqCst) before the flag is read (SeqCst), and a drain clears the
    /// flag (SeqCst) before it reads the count (SeqCst): either the drain sees this change, or
    /// this sees the cleared flag and pushes the key for the next drain.
    fn mark(&self, index: usize, key: &str, slot: &Slot) {
        if slot.dirty.load(Ordering::SeqCst) || slot.dirty.swap(true, Ordering::SeqCst) {
            return;
        }
        self.push(&mut lock(&self.changes[index]), key.into());
    }

    /// The index of the shard that holds `key`.
    fn shard_index(&self, key: &str) -> usize {
        let hash = self.shard_hasher.hash_one(key);
        // The high bits: the maps inside use the low ones.
        (hash >> 32) as usize & (self.shards.len() - 1)
    }

    /// Runs `op` on the slot of the hit's key, creating it (making room first if the shard is
    /// full). `op` returns its result and whether it changed the count.
    fn with_slot<R>(&self, hit: &Hit, now: UnixTime, op: impl Fn(&Slot) -> (R, bool)) -> R {
        let key = hit.key.as_str();
        let index = self.shard_index(key);
        let shard = &self.shards[index];
        if let Some(slot) = read(shard).get(key) {
            let (result, changed) = op(slot);
            if changed {
                self.mark(index, key, slot);
            }
            return result;
        }
        let mut map = write(shard);
        if !map.contains_key(key) && map.len() >= self.shard_cap {
            self.make_room(&mut map, &self.changes[index], now);
        }
        // Born clean only if someone drains: otherwise dirty, never pushed.
        let born_dirty = !self.tracking.load(Ordering::SeqCst);
        let slot = map
            .entry(key.into())
            .or_insert_with(|| Slot::new(hit.limit.unit, hit.limit.requests_per_unit, born_dirty));
        let (result, changed) = op(slot);
        if changed {
            self.mark(index, key, slot);
        }
        result
    }

    /// Frees room in a full shard: first expired windows, then, if still full, its coldest keys
    /// (lowest count in their current window) until about 1/8 of the shard is free, so the cost
    /// of a pass is spread over many new keys.
    fn make_room(&self, map: &mut ShardMap, changes: &Mutex<ChangeList>, now: UnixTime) {
        let tracking = self.tracking.load(Ordering::Relaxed);
        let before = map.len();
        self.drop_where(map, changes, tracking, |slot| slot.expired(now));
        let after_sweep = map.len();
        self.expired
            .fetch_add((before - after_sweep) as u64, Ordering::Relaxed);
        let target = self.shard_cap - (self.shard_cap / EVICTION_BATCH_DIVISOR).max(1);
        if after_sweep <= target {
            return;
        }
        let excess = after_sweep - target;
        let mut counts: Vec<u32> = map
            .values()
            .map(|slot| slot.peek(window_tag(now, slot.unit)))
            .collect();
        let threshold = *counts.select_nth_unstable(excess - 1).1;
        // Drop keys at or below the threshold count, no more than `excess` of them.
        let mut budget = excess;
        self.drop_where(map, changes, tracking, |slot| {
            if budget > 0 && slot.peek(window_tag(now, slot.unit)) <= threshold {
                budget -= 1;
                true
            } else {
                false
            }
        });
        self.evicted
            .fetch_add((excess - budget) as u64, Ordering::Relaxed);
        self.eviction_passes.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hit::Limit;
    use std::sync::Arc;

    fn hit(key: &str, limit: u32, unit: Unit, addend: u32, enforcement: Enforcement) -> Hit {
        Hit {
            key: key.to_owned(),
            limit: Limit {
                requests_per_unit: limit,
                unit,
            },
            addend,
            enforcement,
        }
    }

    const T0: UnixTime = UnixTime::from_secs(1_700_000_040);

    #[test]
    fn packing_round_trips() {
        for (w, c) in [(0, 0), (1, 2), (u32::MAX, u32::MAX), (1_700_000_000, 7)] {
            assert_eq!(unpack(pack(w, c)), (w, c));
        }
    }

    #[test]
    fn admits_up_to_the_limit_then_rejects_without_counting() {
        let counters = LocalCounters::new(100);
        let h = [hit("k", 3, Unit::Minute, 1, Enforcement::Enforce)];
        let remaining: Vec<_> = (0..5)
            .map(|_| counters.check(&h, T0)[0])
            .map(|d| (d.over_limit, d.remaining))
            .collect();
        assert_eq!(
            remaining,
            [(false, 2), (false, 1), (false, 0), (true, 0), (true, 0)]
        );
        assert_eq!(counters.count("k", Unit::Minute, T0), 3);
    }

    #[test]
    fn a_clock_stepping_back_does_not_leave_a_full_key_blocked() {
        let counters = LocalCounters::new(100);
        let h = [hit("k", 2, Unit::Second, 1, Enforcement::Enforce)];
        let ahead = T0.plus(std::time::Duration::from_secs(30));
        // The clock ran 30 s ahead and the key filled up there.
        assert!(!counters.check(&h, ahead)[0].over_limit);
        assert!(!counters.check(&h, ahead)[0].over_limit);
        assert!(counters.check(&h, ahead)[0].over_limit);
        // Stepped back: that window is 30 ahead, stale, not the current one.
        let back = counters.check(&h, T0)[0];
        assert!(
            !back.over_limit,
            "blocked by a window the clock left behind"
        );
        assert_eq!(back.count, 1);
        // A count one window ahead (a request that read the clock a moment later) still counts.
        let next = T0.plus(std::time::Duration::from_secs(1));
        assert!(!counters.check(&h, next)[0].over_limit);
        assert_eq!(
            counters.count("k", Unit::Second, T0),
            1,
            "window T0+1 is taken as current"
        );
        // A sweep drops a key stored far ahead.
        counters.check(
            &[hit("far", 2, Unit::Second, 1, Enforcement::Enforce)],
            ahead,
        );
        counters.sweep(T0);
        assert_eq!(counters.count("far", Unit::Second, ahead), 0);
    }

    #[test]
    fn a_new_window_starts_from_zero() {
        let counters = LocalCounters::new(100);
        let h = [hit("k", 1, Unit::Second, 1, Enforcement::Enforce)];
        assert!(!counters.check(&h, T0)[0].over_limit);
        assert!(counters.check(&h, T0)[0].over_limit);
        let next = T0.plus(std::time::Duration::from_secs(1));
        assert!(!counters.check(&h, next)[0].over_limit);
    }

    #[test]
    fn a_rejected_request_takes_back_its_other_hits() {
        let counters = LocalCounters::new(100);
        let batch = [
            hit("roomy", 10, Unit::Minute, 1, Enforcement::Enforce),
            hit("full", 0, Unit::Minute, 1, Enforcement::Enforce),
        ];
        let decisions = counters.check(&batch, T0);
        assert!(!decisions[0].over_limit);
        assert!(decisions[1].over_limit);
        assert_eq!(decisions[0].count, 0);
        assert_eq!(decisions[0].remaining, 10);
        assert_eq!(counters.count("roomy", Unit::Minute, T0), 0);
    }

    #[test]
    fn shadow_hits_count_but_never_reject() {
        let counters = LocalCounters::new(100);
        let batch = [hit("s", 1, Unit::Minute, 1, Enforcement::Shadow)];
        assert!(!counters.check(&batch, T0)[0].over_limit);
        let second = counters.check(&batch, T0)[0];
        assert!(second.over_limit);
        assert_eq!(second.count, 2);
        assert_eq!(counters.count("s", Unit::Minute, T0), 2);
    }

    #[test]
    fn hits_addend_larger_than_the_remainder_is_rejected_whole() {
        let counters = LocalCounters::new(100);
        let five = [hit("k", 10, Unit::Hour, 5, Enforcement::Enforce)];
        let max = [hit("k", 10, Unit::Hour, u32::MAX, Enforcement::Enforce)];
        assert_eq!(counters.check(&five, T0)[0].remaining, 5);
        assert!(counters.check(&max, T0)[0].over_limit);
        assert_eq!(counters.check(&five, T0)[0].remaining, 0);
        assert!(counters.check(&five, T0)[0].over_limit);
    }

    #[test]
    fn sweep_drops_ended_windows_only() {
        let counters = LocalCounters::new(100);
        counters.check(&[hit("sec", 5, Unit::Second, 1, Enforcement::Enforce)], T0);
        counters.check(&[hit("hour", 5, Unit::Hour, 1, Enforcement::Enforce)], T0);
        assert_eq!(counters.sweep(T0), 0);
        assert_eq!(
            counters.sweep(T0.plus(std::time::Duration::from_secs(2))),
            1
        );
        assert_eq!(counters.stats().live_keys, 1);
        assert_eq!(counters.count("hour", Unit::Hour, T0), 1);
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_under_the_cap_and_keeps_enforcing() {
        let counters = LocalCounters::new(1_000);
        // A hot key near its limit survives eviction because it is not among the coldest.
        let hot = [hit("hot", 100, Unit::Hour, 1, Enforcement::Enforce)];
        for _ in 0..100 {
            assert!(!counters.check(&hot, T0)[0].over_limit);
        }
        for i in 0..20_000 {
            let key = format!("flood-{i}");
            let d = counters.check(&[hit(&key, 1, Unit::Hour, 1, Enforcement::Enforce)], T0);
            assert!(!d[0].over_limit);
            assert!(counters.stats().live_keys <= 1_000);
        }
        let stats = counters.stats();
        assert!(stats.evicted >= 19_000, "{stats:?}");
        assert!(stats.eviction_passes > 0);
        assert!(
            counters.check(&hot, T0)[0].over_limit,
            "hot key was evicted"
        );
    }

    /// Insert/evict churn far past the cap (the pattern that livelocked a lock-free map this
    /// crate used before): memory and time stay bounded by the cap, and enforcement stays on.
    #[test]
    fn sustained_churn_past_the_cap_stays_bounded() {
        let counters = LocalCounters::new(10_000);
        for i in 0..300_000 {
            let key = format!("churn-{i}");
            let d = counters.check(&[hit(&key, 1, Unit::Hour, 1, Enforcement::Enforce)], T0);
            assert!(!d[0].over_limit);
        }
        let stats = counters.stats();
        assert!(stats.live_keys <= 10_000, "{stats:?}");
        assert!(stats.live_keys >= 10_000 * 7 / 8 - 64, "{stats:?}");
        assert_eq!(
            stats.evicted as usize + stats.live_keys,
            300_000,
            "{stats:?}"
        );
        let again = [hit("churn-299999", 1, Unit::Hour, 1, Enforcement::Enforce)];
        assert!(
            counters.check(&again, T0)[0].over_limit,
            "the newest key is still counted"
        );
    }

    #[test]
    fn shards_never_hold_more_than_max_keys_together() {
        for max_keys in [1, 7, 4_095, 8_192, 100_000, 1_000_000, 10_000_000] {
            let counters = LocalCounters::new(max_keys);
            let shards = counters.shards.len();
            assert!(shards.is_power_of_two() && shards <= MAX_SHARDS);
            assert!(shards * counters.shard_cap <= max_keys, "{max_keys}");
            assert!(
                counters.shard_cap >= (max_keys / 2).min(MIN_KEYS_PER_SHARD),
                "{max_keys}"
            );
        }
    }

    #[test]
    fn offsets_count_against_the_limit_but_are_not_stored() {
        let counters = LocalCounters::new(100);
        let h = [hit("k", 10, Unit::Minute, 1, Enforcement::Enforce)];
        let d = counters.check_with_offsets(&h, &[7], T0)[0];
        assert_eq!((d.over_limit, d.count, d.remaining), (false, 8, 2));
        counters.check_with_offsets(&h, &[7], T0);
        counters.check_with_offsets(&h, &[7], T0);
        let d = counters.check_with_offsets(&h, &[7], T0)[0];
        assert_eq!((d.over_limit, d.count, d.remaining), (true, 10, 0));
        assert_eq!(counters.count("k", Unit::Minute, T0), 3);
        // Peers already past the limit: over, nothing counted.
        let d = counters.check_with_offsets(&h, &[u32::MAX], T0)[0];
        assert!(d.over_limit);
        assert_eq!(counters.count("k", Unit::Minute, T0), 3);
        // Shadow hits see the offset too.
        let s = [hit("s", 5, Unit::Minute, 1, Enforcement::Shadow)];
        assert!(counters.check_with_offsets(&s, &[5], T0)[0].over_limit);
        assert_eq!(counters.count("s", Unit::Minute, T0), 1);
    }

    #[test]
    fn for_each_live_reports_current_nonzero_counts_with_their_limit() {
        let counters = LocalCounters::new(100);
        counters.check(&[hit("a", 10, Unit::Minute, 2, Enforcement::Enforce)], T0);
        counters.check(&[hit("b", 3, Unit::Second, 1, Enforcement::Enforce)], T0);
        counters.check(&[hit("z", 0, Unit::Minute, 1, Enforcement::Enforce)], T0);
        let later = T0.plus(std::time::Duration::from_secs(1));
        let mut seen = Vec::new();
        counters.for_each_live(later, |c| {
            seen.push((c.key.to_owned(), c.unit, c.count, c.limit))
        });
        assert_eq!(seen, [("a".to_owned(), Unit::Minute, 2, 10)]);
    }

    /// Drains into (live key → count) and the gone keys.
    fn drain(counters: &LocalCounters, now: UnixTime) -> (Vec<(String, u32)>, Vec<String>) {
        let (mut live, mut gone) = (Vec::new(), Vec::new());
        counters.drain_changes(now, false, |change| match change {
            CounterChange::Live(c) => live.push((c.key.to_owned(), c.count)),
            CounterChange::Gone(key) => gone.push(key.to_owned()),
        });
        live.sort();
        gone.sort();
        // A key dropped after a change is on the list twice.
        gone.dedup();
        (live, gone)
    }

    #[test]
    fn a_slot_stays_16_bytes_with_its_dirty_flag() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
    }

    #[test]
    fn drains_report_each_changed_key_once_then_only_new_changes() {
        let counters = LocalCounters::new(100);
        let a = [hit("a", 10, Unit::Minute, 1, Enforcement::Enforce)];
        counters.check(&a, T0);
        counters.check(&[hit("b", 1, Unit::Minute, 1, Enforcement::Enforce)], T0);
        // The first drain reports every live key.
        assert_eq!(drain(&counters, T0).0, [("a".into(), 1), ("b".into(), 1)]);
        assert_eq!(drain(&counters, T0), (vec![], vec![]));
        // Two hits: one report, with the latest count. A rejected hit changes nothing.
        counters.check(&a, T0);
        counters.check(&a, T0);
        counters.check(&[hit("b", 1, Unit::Minute, 1, Enforcement::Enforce)], T0);
        assert_eq!(drain(&counters, T0).0, [("a".into(), 3)]);
        // Shadow hits count, so they are changes.
        counters.check(&[hit("b", 1, Unit::Minute, 1, Enforcement::Shadow)], T0);
        assert_eq!(drain(&counters, T0).0, [("b".into(), 2)]);
        // A rejected request's reservation taken back is a change too (the count is the same).
        let batch = [
            hit("a", 10, Unit::Minute, 1, Enforcement::Enforce),
            hit("full", 0, Unit::Minute, 1, Enforcement::Enforce),
        ];
        counters.check(&batch, T0);
        assert_eq!(drain(&counters, T0).0, [("a".into(), 3)]);
        // `everything` reports every live key, changed or not.
        let mut all = 0;
        counters.drain_changes(T0, true, |_| all += 1);
        assert_eq!(all, 2);
    }

    #[test]
    fn swept_and_evicted_keys_are_reported_gone() {
        let counters = LocalCounters::new(100);
        counters.check(&[hit("sec", 5, Unit::Second, 1, Enforcement::Enforce)], T0);
        counters.check(&[hit("min", 5, Unit::Minute, 1, Enforcement::Enforce)], T0);
        drain(&counters, T0);
        counters.sweep(T0.plus(std::time::Duration::from_secs(2)));
        assert_eq!(drain(&counters, T0).1, ["sec".to_owned()]);
        // A flood evicts the coldest keys: each is reported gone (or, if it came back, live).
        for i in 0..300 {
            let key = format!("flood-{i}");
            counters.check(&[hit(&key, 5, Unit::Minute, 2, Enforcement::Enforce)], T0);
        }
        let (live, gone) = drain(&counters, T0);
        let held = |key: &str| counters.count(key, Unit::Minute, T0) > 0;
        assert_eq!(gone.contains(&"min".to_owned()), !held("min"));
        assert!(
            !held("min") || !live.iter().any(|(k, _)| k == "min"),
            "unchanged"
        );
        for i in 0..300 {
            let key = format!("flood-{i}");
            let reported_live = live.iter().any(|(k, _)| *k == key);
            assert_eq!(reported_live, held(&key), "{key}");
            assert_eq!(gone.contains(&key), !held(&key), "{key}");
        }
        assert!(gone.len() >= 200, "{}", gone.len());
    }

    #[test]
    fn nothing_is_tracked_until_someone_drains() {
        let counters = LocalCounters::new(100);
        for i in 0..50 {
            let key = format!("k{i}");
            counters.check(&[hit(&key, 5, Unit::Second, 1, Enforcement::Enforce)], T0);
        }
        counters.sweep(T0.plus(std::time::Duration::from_secs(2)));
        for i in 0..50 {
            let key = format!("k{i}");
            counters.check(&[hit(&key, 5, Unit::Minute, 1, Enforcement::Enforce)], T0);
        }
        assert!(counters
            .changes
            .iter()
            .all(|list| lock(list).keys.is_empty()));
    }

    #[test]
    fn an_overflowing_change_list_falls_back_to_a_scan() {
        let counters = LocalCounters::new(100);
        drain(&counters, T0);
        // Churn: more evictions and new keys than the list holds before a drain.
        for i in 0..20_000 {
            let key = format!("churn-{i}");
            counters.check(&[hit(&key, 5, Unit::Minute, 1, Enforcement::Enforce)], T0);
        }
        assert!(lock(&counters.changes[0]).overflowed);
        let (live, _) = drain(&counters, T0);
        assert_eq!(live.len(), counters.stats().live_keys);
        assert!(!lock(&counters.changes[0]).overflowed);
        assert_eq!(drain(&counters, T0), (vec![], vec![]));
    }

    /// A drain racing writers never loses a change: after the writers stop, the last count each
    /// drain reported for a key is the key's count.
    #[test]
    fn concurrent_drains_miss_no_change() {
        let counters = Arc::new(LocalCounters::new(10_000));
        drain(&counters, T0);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..2)
            .map(|t| {
                let counters = counters.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        let key = format!("k{}", (i * 7 + t) % 64);
                        counters.check(
                            &[hit(&key, u32::MAX, Unit::Hour, 1, Enforcement::Enforce)],
                            T0,
                        );
                    }
                })
            })
            .collect();
        let reader = {
            let (counters, stop) = (counters.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut last = HashMap::new();
                while !stop.load(Ordering::Relaxed) {
                    for (key, count) in drain(&counters, T0).0 {
                        last.insert(key, count);
                    }
                }
                last
            })
        };
        for writer in writers {
            writer.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let mut last = reader.join().unwrap();
        for (key, count) in drain(&counters, T0).0 {
            last.insert(key, count);
        }
        assert_eq!(last.len(), 64);
        for (key, count) in last {
            assert_eq!(count, counters.count(&key, Unit::Hour, T0), "{key}");
        }
    }

    #[test]
    fn concurrent_checks_never_admit_past_the_limit() {
        let counters = Arc::new(LocalCounters::new(100));
        let admitted = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counters = counters.clone();
                let admitted = admitted.clone();
                std::thread::spawn(move || {
                    let batch = [hit("shared", 1_000, Unit::Hour, 1, Enforcement::Enforce)];
                    for _ in 0..1_000 {
                        if !counters.check(&batch, T0)[0].over_limit {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
        assert_eq!(counters.count("shared", Unit::Hour, T0), 1_000);
    }
}
