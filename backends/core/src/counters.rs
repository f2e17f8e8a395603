//! Lock-free local counters: one `AtomicU64` per counter key packing (window, count).
//!
//! The high 32 bits hold the low 32 bits of the window index, the low 32 bits the count in that
//! window. A count that belongs to an older window reads as zero, so a new window needs no reset
//! pass. Updates are compare-and-swap loops; the map is papaya's lock-free hash map, so the hot
//! path takes no lock at all.
//!
//! Memory is bounded two ways: [`LocalCounters::sweep`] drops keys whose window has ended, and a
//! `max_keys` cap evicts the coldest keys (lowest count) when a new key would exceed it, so a
//! flood of distinct keys can neither exhaust memory nor switch enforcement off: every key, new or
//! old, is still limited. Each eviction is counted in [`CounterStats`] and logged by the caller.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::hit::{request_admitted, Decision, Enforcement, Hit};
use crate::window::{Unit, UnixTime, Window};

/// How many keys one eviction pass frees, as a fraction of `max_keys` (1/8), so the cost of a
/// pass is spread over many new keys.
const EVICTION_BATCH_DIVISOR: usize = 8;

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
}

const fn pack(window: u32, count: u32) -> u64 {
    ((window as u64) << 32) | count as u64
}

const fn unpack(state: u64) -> (u32, u32) {
    ((state >> 32) as u32, state as u32)
}

/// The 32 bits of a window index kept in a slot. Second windows pass 2^32 in the year 2106.
fn window_tag(now: UnixTime, unit: Unit) -> u32 {
    Window::containing(now, unit).index as u32
}

impl Slot {
    fn new(unit: Unit) -> Self {
        Slot {
            state: AtomicU64::new(0),
            unit,
        }
    }

    /// The count in `window`: a count from an older window is zero. A count from a newer window
    /// (another request read the clock a moment later) is taken as current.
    fn count_in(state: u64, window: u32) -> (u32, u32) {
        let (stored, count) = unpack(state);
        if stored >= window {
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
                Ordering::AcqRel,
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
                Ordering::AcqRel,
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
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return after,
                Err(seen) => current = seen,
            }
        }
    }

    fn expired(&self, now: UnixTime) -> bool {
        unpack(self.state.load(Ordering::Acquire)).0 < window_tag(now, self.unit)
    }
}

/// The counters of one node, keyed by counter key.
pub struct LocalCounters {
    /// Counter key → slot. papaya: lock-free reads and inserts, epoch-based reclamation.
    slots: papaya::HashMap<String, Slot, foldhash::fast::RandomState>,
    /// The most keys held at once; a new key beyond it triggers an eviction pass.
    max_keys: usize,
    /// Set while one thread runs an eviction pass, so concurrent inserts do not all scan.
    evicting: AtomicBool,
    /// Keys dropped by sweeps (window ended).
    expired: AtomicU64,
    /// Keys evicted while live, to respect `max_keys`.
    evicted: AtomicU64,
    /// Eviction passes run.
    eviction_passes: AtomicU64,
}

impl std::fmt::Debug for LocalCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCounters")
            .field("max_keys", &self.max_keys)
            .field("stats", &self.stats())
            .finish()
    }
}

impl LocalCounters {
    /// Counters that hold at most `max_keys` keys (at least 1).
    pub fn new(max_keys: usize) -> Self {
        LocalCounters {
            slots: papaya::HashMap::builder()
                .hasher(foldhash::fast::RandomState::default())
                .build(),
            max_keys: max_keys.max(1),
            evicting: AtomicBool::new(false),
            expired: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            eviction_passes: AtomicU64::new(0),
        }
    }

    /// The configured cap on live keys.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// What the map holds and has dropped so far.
    pub fn stats(&self) -> CounterStats {
        CounterStats {
            live_keys: self.slots.len(),
            expired: self.expired.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            eviction_passes: self.eviction_passes.load(Ordering::Relaxed),
        }
    }

    /// The count of `key` in the window of `unit` containing `now` (0 if unknown).
    pub fn count(&self, key: &str, unit: Unit, now: UnixTime) -> u32 {
        let slots = self.slots.pin();
        slots
            .get(key)
            .map_or(0, |slot| slot.peek(window_tag(now, unit)))
    }

    /// Checks a request's hits and counts them only if the request is admitted
    /// ([`request_admitted`]). Enforced and quota hits are reserved with a compare-and-swap that
    /// never takes a counter past its limit; if the request is then rejected the reservations are
    /// taken back. Shadow hits, and quota hits over their limit in an admitted request, are added
    /// as they are: they are counted but never enforced.
    pub fn check(&self, batch: &[Hit], now: UnixTime) -> Vec<Decision> {
        let slots = self.slots.pin();
        let mut decisions = Vec::with_capacity(batch.len());
        for hit in batch {
            let unit = hit.limit.unit;
            let window = window_tag(now, unit);
            let slot = self.slot(&slots, &hit.key, unit, now);
            let limit = hit.limit.requests_per_unit;
            let (over_limit, count) = match hit.enforcement {
                Enforcement::Enforce | Enforcement::Quota => {
                    match slot.try_add(window, hit.addend, limit) {
                        Ok(count) => (false, count),
                        Err(count) => (true, count),
                    }
                }
                Enforcement::Shadow => {
                    let count = slot.peek(window);
                    (
                        u64::from(count) + u64::from(hit.addend) > u64::from(limit),
                        count,
                    )
                }
            };
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
        for (hit, decision) in batch.iter().zip(decisions.iter_mut()) {
            let reserved = hit.enforcement != Enforcement::Shadow && !decision.over_limit;
            let window = window_tag(now, hit.limit.unit);
            if admitted && !reserved {
                decision.count = self
                    .slot(&slots, &hit.key, hit.limit.unit, now)
                    .add(window, hit.addend);
            } else if !admitted && reserved {
                decision.count = self
                    .slot(&slots, &hit.key, hit.limit.unit, now)
                    .take_back(window, hit.addend);
            }
            decision.remaining = if decision.over_limit {
                0
            } else {
                hit.limit.requests_per_unit.saturating_sub(decision.count)
            };
        }
        decisions
    }

    /// Drops every key whose window ended before `now`. Returns how many were dropped.
    pub fn sweep(&self, now: UnixTime) -> usize {
        let slots = self.slots.pin();
        let before = slots.len();
        slots.retain(|_, slot| !slot.expired(now));
        let dropped = before.saturating_sub(slots.len());
        self.expired.fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    fn slot<'g>(
        &self,
        slots: &'g papaya::HashMapRef<
            '_,
            String,
            Slot,
            foldhash::fast::RandomState,
            papaya::LocalGuard<'_>,
        >,
        key: &str,
        unit: Unit,
        now: UnixTime,
    ) -> &'g Slot {
        if let Some(slot) = slots.get(key) {
            return slot;
        }
        if slots.len() >= self.max_keys {
            self.make_room(slots, now);
        }
        slots.get_or_insert_with(key.to_owned(), || Slot::new(unit))
    }

    /// Frees room for new keys: first expired windows, then, if still full, the coldest keys
    /// (lowest count) until about `max_keys / 8` are free. One thread at a time runs it; others
    /// insert meanwhile, so the cap can be passed by at most the number of concurrent inserts.
    fn make_room(
        &self,
        slots: &papaya::HashMapRef<
            '_,
            String,
            Slot,
            foldhash::fast::RandomState,
            papaya::LocalGuard<'_>,
        >,
        now: UnixTime,
    ) {
        if self
            .evicting
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let target = self.max_keys - (self.max_keys / EVICTION_BATCH_DIVISOR).max(1);
        let before = slots.len();
        slots.retain(|_, slot| !slot.expired(now));
        let after_sweep = slots.len();
        self.expired
            .fetch_add(before.saturating_sub(after_sweep) as u64, Ordering::Relaxed);
        if after_sweep > target {
            let mut counts: Vec<u32> = slots
                .iter()
                .map(|(_, slot)| slot.peek(window_tag(now, slot.unit)))
                .collect();
            let excess = after_sweep - target;
            if excess < counts.len() {
                let (_, threshold, _) = counts.select_nth_unstable(excess - 1);
                let threshold = *threshold;
                // Drop keys at or below the threshold count, no more than `excess` of them.
                let mut budget = excess;
                slots.retain(|_, slot| {
                    if budget > 0 && slot.peek(window_tag(now, slot.unit)) <= threshold {
                        budget -= 1;
                        false
                    } else {
                        true
                    }
                });
                let evicted = (excess - budget) as u64;
                self.evicted.fetch_add(evicted, Ordering::Relaxed);
            }
            self.eviction_passes.fetch_add(1, Ordering::Relaxed);
        }
        self.evicting.store(false, Ordering::Release);
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
