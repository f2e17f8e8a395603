//! The figures of one strategy on one scenario, from what the clients saw.
//!
//! Every figure is computed from [`Observation`]s (ground truth: what clients saw admitted),
//! never from the servers' counters, except the gossip traffic, which only the nodes know.
//! Definitions (the README's "Figures" section repeats them):
//!
//! - **cells**: one per key and measured window the key had traffic in, each with the per-window
//!   truth of [`crate::truth::analyse`] (limit per key and window).
//! - **overshoot mean** = mean over the *contended* cells (offered ≥ limit: where the limiter
//!   has to act) of `overshoot / limit`, in %; **overshoot worst** = the largest
//!   `overshoot / limit` of any cell. Lower bounds (exactly attributed admissions);
//!   `overshoot_upper_worst_pct` counts calls straddling a boundary as admitted too.
//! - **false rejections** = `Σ false_rejections / Σ would_admit` over every cell, in %: of what
//!   an exact limiter would have admitted (`min(limit, offered)` per cell), the share rejected;
//!   at a load of at least the limit, that is % of the limit.
//! - **latency** p50/p99/p99.9 of decided calls sent in the measured windows, from the intended
//!   (paced) send time to the answer (coordinated-omission aware); `round_trip` is the same
//!   calls from their actual send time, to show what the correction adds.
//! - **offered / decided** = calls sent / calls with a decision in the measured windows, per
//!   second.
//! - **errors by kind** = calls sent in the measured windows without a decision, by
//!   [`ErrorKind`].
//! - **convergence** after an event that ends a disturbance (a resume, a restart, Redis back),
//!   and after the load's start from idle (a burst): the time from it to the end of the last
//!   window, before the next event, that was not *clean*; `None` when the last one was not. A
//!   window is clean when every key's cell has overshoot, false rejections and errors of at
//!   most [`CLEAN_PCT`] % of the limit each. Resolution: one window.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::report::{latency_histogram, Latency};
use crate::truth::{self, window_index, window_micros, Observation, Outcome, WindowTruth};

/// A window is clean when no key overshoots, falsely rejects or fails more than this % of the
/// limit.
pub const CLEAN_PCT: f64 = 5.0;

/// The figures of one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Key × window cells measured (keys with traffic in a window).
    pub cells: usize,
    /// Cells offered at least the limit: the ones the overshoot mean is taken over.
    pub contended_cells: usize,
    /// Mean over contended cells of `overshoot / limit`, %.
    pub overshoot_mean_pct: f64,
    /// Largest `overshoot / limit` of any cell, %.
    pub overshoot_worst_pct: f64,
    /// Largest `overshoot_upper / limit` of any cell, % (boundary calls counted as admitted).
    pub overshoot_upper_worst_pct: f64,
    /// `Σ false_rejections / Σ would_admit`, %.
    pub false_rejection_pct: f64,
    /// Latency from the intended send time (coordinated-omission aware).
    pub latency: Latency,
    /// Latency from the actual send time, for comparison.
    pub round_trip: Latency,
    /// Calls sent per second in the measured windows.
    pub offered_rps: f64,
    /// Calls decided per second in the measured windows.
    pub decided_rps: f64,
    /// Calls without a decision in the measured windows, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Scheduled calls the clients dropped for running too far behind (whole run).
    pub skipped: u64,
}

/// One window of the run (warm-up included), summed over keys, for the time series.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WindowPoint {
    /// Seconds from the load's start to the window's start.
    pub t_s: f64,
    /// Whether the window is measured (else warm-up).
    pub measured: bool,
    /// Calls sent in it, all keys.
    pub offered: u64,
    /// Admitted, all keys (exact attribution).
    pub admitted: u64,
    /// Rejected, all keys.
    pub rejected: u64,
    /// Errors, all keys.
    pub errors: u64,
    /// Σ overshoot over keys.
    pub overshoot: u64,
    /// Σ false rejections over keys.
    pub false_rejections: u64,
    /// Admitted for key 0 (the hottest under Zipf), to plot against the limit.
    pub key0_admitted: u64,
    /// Whether the window is clean (see the module docs).
    pub clean: bool,
}

/// The per-key truth of `observations` over the windows `range`.
pub fn cells(
    observations: &[Observation],
    limit: u64,
    window: Duration,
    range: Range<u64>,
) -> HashMap<u32, Vec<WindowTruth>> {
    let mut by_key: HashMap<u32, Vec<Observation>> = HashMap::new();
    for o in observations {
        by_key.entry(o.key).or_default().push(*o);
    }
    by_key
        .into_iter()
        .map(|(key, obs)| {
            (
                key,
                truth::analyse(&obs, limit, window, Some(range.clone())),
            )
        })
        .collect()
}

/// The figures of the windows `measured` (see the module docs).
pub fn figures(
    observations: &[Observation],
    per_key: &HashMap<u32, Vec<WindowTruth>>,
    limit: u64,
    window: Duration,
    measured: Range<u64>,
) -> Figures {
    let pct = |x: u64| x as f64 * 100.0 / limit.max(1) as f64;
    let measured_cells: Vec<&WindowTruth> = per_key
        .values()
        .flatten()
        .filter(|w| measured.contains(&w.index))
        .collect();
    let contended: Vec<&&WindowTruth> = measured_cells
        .iter()
        .filter(|w| w.offered >= limit)
        .collect();
    let sum = |f: fn(&WindowTruth) -> u64| measured_cells.iter().map(|w| f(w)).sum::<u64>();
    let would_admit = sum(|w| w.would_admit);
    let wu = window_micros(window);
    let mut intended = latency_histogram();
    let mut round_trip = latency_histogram();
    let mut offered = 0u64;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for o in observations {
        if !measured.contains(&window_index(o.sent_us, wu)) {
            continue;
        }
        offered += 1;
        if o.outcome == Outcome::Error {
            let kind = o.error.map_or("unknown", |k| k.as_str());
            *errors.entry(kind.to_owned()).or_default() += 1;
        } else {
            intended.saturating_record(o.intended_latency_us().max(1));
            round_trip.saturating_record(o.latency_us.max(1));
        }
    }
    let secs = window.as_secs_f64() * (measured.end - measured.start) as f64;
    let decided = offered - errors.values().sum::<u64>();
    Figures {
        cells: measured_cells.len(),
        contended_cells: contended.len(),
        overshoot_mean_pct: if contended.is_empty() {
            0.0
        } else {
            contended.iter().map(|w| pct(w.overshoot)).sum::<f64>() / contended.len() as f64
        },
        overshoot_worst_pct: pct(measured_cells
            .iter()
            .map(|w| w.overshoot)
            .max()
            .unwrap_or(0)),
        overshoot_upper_worst_pct: pct(measured_cells
            .iter()
            .map(|w| w.overshoot_upper)
            .max()
            .unwrap_or(0)),
        false_rejection_pct: if would_admit == 0 {
            0.0
        } else {
            sum(|w| w.false_rejections) as f64 * 100.0 / would_admit as f64
        },
        latency: Latency::of(&intended),
        round_trip: Latency::of(&round_trip),
        offered_rps: offered as f64 / secs.max(f64::MIN_POSITIVE),
        decided_rps: decided as f64 / secs.max(f64::MIN_POSITIVE),
        errors,
        skipped: 0,
    }
}

/// Whether a cell is within [`CLEAN_PCT`] of an exact limiter.
fn clean(w: &WindowTruth, limit: u64) -> bool {
    let bound = (limit as f64 * CLEAN_PCT / 100.0).floor() as u64;
    w.errors <= bound && w.overshoot <= bound && w.false_rejections <= bound
}

/// The time series over `range` (load start first), summed over keys.
pub fn series(
    per_key: &HashMap<u32, Vec<WindowTruth>>,
    limit: u64,
    window: Duration,
    range: Range<u64>,
    measured: Range<u64>,
) -> Vec<WindowPoint> {
    let mut points: BTreeMap<u64, WindowPoint> = range
        .clone()
        .map(|i| {
            (
                i,
                WindowPoint {
                    t_s: (i - range.start) as f64 * window.as_secs_f64(),
                    measured: measured.contains(&i),
                    clean: true,
                    ..WindowPoint::default()
                },
            )
        })
        .collect();
    for (&key, windows) in per_key {
        for w in windows {
            let Some(p) = points.get_mut(&w.index) else {
                continue;
            };
            p.offered += w.offered;
            p.admitted += w.admitted;
            p.rejected += w.rejected;
            p.errors += w.errors;
            p.overshoot += w.overshoot;
            p.false_rejections += w.false_rejections;
            if key == 0 {
                p.key0_admitted = w.admitted;
            }
            p.clean &= clean(w, limit);
        }
    }
    points.into_values().collect()
}

/// Seconds from `at_s` (since the load's start) to the end of the last unclean window among
/// those that end after `at_s` and by `until_s` (the next event: a window it falls in is its
/// own); 0 when all are clean, `None` when the last one is not (or there is none).
pub fn convergence(
    points: &[WindowPoint],
    window: Duration,
    at_s: f64,
    until_s: f64,
) -> Option<f64> {
    let len = window.as_secs_f64();
    let relevant: Vec<&WindowPoint> = points
        .iter()
        .filter(|p| p.t_s + len > at_s && p.t_s + len <= until_s + 1e-9)
        .collect();
    let last = relevant.last()?;
    if !last.clean {
        return None;
    }
    Some(
        relevant
            .iter()
            .rev()
            .find(|p| !p.clean)
            .map_or(0.0, |p| (p.t_s + len - at_s).max(0.0)),
    )
}

/// Points of the latency CDF: `(latency µs, fraction of calls at or below it)`, from the
/// median's neighbourhood out to the 99.99th percentile.
pub fn cdf(histogram: &Histogram<u64>) -> Vec<(u64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    let mut quantiles: Vec<f64> = (0..=20).map(|i| i as f64 / 20.0).collect();
    quantiles.extend([0.975, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0]);
    quantiles.sort_by(f64::total_cmp);
    quantiles.dedup();
    quantiles
        .into_iter()
        .map(|q| (histogram.value_at_quantile(q), q))
        .collect()
}

/// The intended-send-time latency histogram of decided calls sent in `measured`.
pub fn intended_histogram(
    observations: &[Observation],
    window: Duration,
    measured: Range<u64>,
) -> Histogram<u64> {
    let wu = window_micros(window);
    let mut h = latency_histogram();
    for o in observations {
        if o.outcome != Outcome::Error && measured.contains(&window_index(o.sent_us, wu)) {
            h.saturating_record(o.intended_latency_us().max(1));
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::truth::ErrorKind;

    const W: Duration = Duration::from_secs(1);
    const BASE: u64 = 5_000 * 1_000_000;

    fn call(key: u32, window: u64, i: u64, outcome: Outcome) -> Observation {
        let t = BASE + window * 1_000_000 + 1_000 + i * 50;
        Observation {
            node: 0,
            key,
            queued_us: 0,
            error: (outcome == Outcome::Error).then_some(ErrorKind::Unavailable),
            sent_us: t,
            received_us: t + 10,
            latency_us: 10,
            outcome,
        }
    }

    fn calls(key: u32, window: u64, admitted: u64, rejected: u64) -> Vec<Observation> {
        (0..admitted)
            .map(|i| call(key, window, i, Outcome::Admitted))
            .chain((0..rejected).map(|i| call(key, window, admitted + i, Outcome::Rejected)))
            .collect()
    }

    #[test]
    fn overshoot_is_averaged_over_contended_cells_only() {
        // Limit 10. Key 0, windows 0 and 1: 12 and 10 admitted out of 20 (contended).
        // Key 1: 3 admitted of 3 (not contended, no overshoot possible). Key 2: 4 admitted,
        // 2 rejected of 6: 2 false rejections.
        let mut obs = calls(0, 0, 12, 8);
        obs.extend(calls(0, 1, 10, 10));
        obs.extend(calls(1, 0, 3, 0));
        obs.extend(calls(2, 1, 4, 2));
        let start = BASE / 1_000_000;
        let range = start..start + 2;
        let per_key = cells(&obs, 10, W, range.clone());
        let f = figures(&obs, &per_key, 10, W, range);
        assert_eq!((f.cells, f.contended_cells), (4, 2));
        assert!((f.overshoot_mean_pct - 10.0).abs() < 1e-9, "{f:?}");
        assert!((f.overshoot_worst_pct - 20.0).abs() < 1e-9);
        // would_admit: 10 + 10 + 3 + 6 = 29; false rejections 2.
        assert!((f.false_rejection_pct - 200.0 / 29.0).abs() < 1e-9, "{f:?}");
        // 49 calls over 2 windows of 1 s.
        assert!((f.offered_rps - 24.5).abs() < 1e-9);
        assert!(f.errors.is_empty());
    }

    #[test]
    fn errors_are_counted_by_kind_and_excluded_from_latency() {
        let mut obs = calls(0, 0, 5, 0);
        obs.push(call(0, 0, 99, Outcome::Error));
        let mut timeout = call(0, 0, 100, Outcome::Error);
        timeout.error = Some(ErrorKind::Timeout);
        obs.push(timeout);
        let start = BASE / 1_000_000;
        let per_key = cells(&obs, 10, W, start..start + 1);
        let f = figures(&obs, &per_key, 10, W, start..start + 1);
        assert_eq!(f.errors.get("unavailable"), Some(&1));
        assert_eq!(f.errors.get("timeout"), Some(&1));
        assert_eq!(f.latency.count, 5);
        assert!((f.decided_rps - 5.0).abs() < 1e-9);
    }

    #[test]
    fn latency_counts_from_the_intended_send_time() {
        // A paced client (1 ms period) stalls behind one 50 ms call: the 20 calls that were due
        // meanwhile go out late, each answered in 10 µs. Round trips hide the stall; latency
        // from the intended send time shows it for every late call.
        let mut obs = Vec::new();
        for i in 0..1_000u64 {
            let mut o = call(0, 0, i, Outcome::Admitted);
            if i == 500 {
                o.latency_us = 50_000;
            }
            if (501..521).contains(&i) {
                o.queued_us = 50_000 - (i - 500) * 1_000;
            }
            obs.push(o);
        }
        let start = BASE / 1_000_000;
        let per_key = cells(&obs, 10_000, W, start..start + 1);
        let f = figures(&obs, &per_key, 10_000, W, start..start + 1);
        // 21 of 1,000 calls (2.1 %) waited ≥ 30 ms from their intended time: p99 sees it.
        assert!(f.latency.p99_us >= 30_000, "{:?}", f.latency);
        assert!(f.round_trip.p99_us <= 10, "{:?}", f.round_trip);
        assert!(
            (49_000..=50_100).contains(&f.latency.max_us),
            "{:?}",
            f.latency
        );
    }

    #[test]
    fn series_sums_keys_and_marks_unclean_windows() {
        let mut obs = calls(0, 0, 10, 10);
        obs.extend(calls(1, 0, 10, 10));
        obs.extend(calls(0, 1, 15, 5)); // overshoot 5 of 10 > 5 %: unclean
        obs.extend(calls(0, 2, 10, 10));
        let start = BASE / 1_000_000;
        let per_key = cells(&obs, 10, W, start..start + 3);
        let s = series(&per_key, 10, W, start..start + 3, start + 1..start + 3);
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].admitted, s[0].key0_admitted, s[0].measured),
            (20, 10, false)
        );
        assert_eq!((s[1].overshoot, s[1].clean), (5, false));
        assert!(s[0].clean && s[2].clean);
        assert_eq!(s[2].t_s, 2.0);
        // Event at 0.5 s: the unclean window 1 ends at 2 s, so convergence took 1.5 s.
        assert_eq!(convergence(&s, W, 0.5, 3.0), Some(1.5));
        // After window 1: clean at once.
        assert_eq!(convergence(&s, W, 2.0, 3.0), Some(0.0));
        // Bounded by the next event at 2 s: window 1 is the last one and it is unclean.
        assert_eq!(convergence(&s, W, 0.5, 2.0), None);
        // A next event inside window 1 leaves window 0 only, which is clean.
        assert_eq!(convergence(&s, W, 0.0, 1.5), Some(0.0));
    }

    #[test]
    fn a_window_is_clean_up_to_five_percent_of_the_limit() {
        let cell = |overshoot, false_rejections, errors| WindowTruth {
            overshoot,
            false_rejections,
            errors,
            ..WindowTruth::default()
        };
        assert!(clean(&cell(5, 5, 5), 100));
        assert!(!clean(&cell(6, 0, 0), 100));
        assert!(!clean(&cell(0, 6, 0), 100));
        assert!(!clean(&cell(0, 0, 6), 100));
        // Under 20 per window, 5 % rounds down to nothing: exact.
        assert!(!clean(&cell(0, 0, 1), 10));
    }

    #[test]
    fn the_cdf_rises_to_one_through_the_tail() {
        let mut h = latency_histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let points = cdf(&h);
        assert_eq!(points.last().unwrap().1, 1.0);
        assert!(points
            .windows(2)
            .all(|p| p[0].0 <= p[1].0 && p[0].1 < p[1].1));
        let p99 = points.iter().find(|p| p.1 == 0.99).unwrap().0;
        assert!((9_890..=9_910).contains(&p99), "{p99}");
        assert!(cdf(&latency_histogram()).is_empty());
    }
}
