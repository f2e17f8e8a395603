//! Per-window ground truth, from what the clients saw.
//!
//! The server's own counters are what is being measured, so they cannot be the reference. The
//! reference is the clients' view: every response is one [`Observation`] with the wall-clock
//! time the call was sent and the time its answer came back. Client and servers run on the same
//! machine and read the same clock, and the server decides a call somewhere between those two
//! instants, so:
//!
//! - if both instants fall in the same window (`floor(t / window_len)`, epoch-aligned like the
//!   server's windows), the server counted that call in that window: the attribution is
//!   **exact**;
//! - otherwise the call straddles a boundary and could belong to either side: it is
//!   **ambiguous**. It is counted in `ambiguous` of the window it was sent in, and an admitted
//!   one is also counted in `ambiguous_admitted` of every window its send..receive interval
//!   touches, because each of those windows may have spent quota on it.
//!
//! From exact counts, per window with limit `L`:
//!
//! - `overshoot = max(0, admitted − L)`: admitted beyond the limit. Ambiguous admissions are left
//!   out, so this is a lower bound; `overshoot_upper` adds them back and is an upper bound. With
//!   loopback latencies of a few hundred µs the two differ by a handful of calls at most.
//! - `false_rejections = min(rejected, max(0, L − admitted − ambiguous_admitted))`: rejections an
//!   exact limiter would have admitted, because the window had not yet admitted `L`. Ambiguous
//!   admissions are assumed to have used quota here, so a boundary-straddling call never shows
//!   up as a false rejection: this is the conservative (low) side, exactly 0 for an exact limiter.
//! - `would_admit = min(L, offered)`: what an exact limiter admits in that window; the
//!   denominator of the false-rejection rate.
//!
//! The first and last windows of a run are partial (the load starts and stops inside them), so
//! [`analyse`] skips them unless the caller names the windows to keep.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use serde::Serialize;

/// What the server answered to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// `OK`: the call was admitted and (for a limited descriptor) consumed quota.
    Admitted,
    /// `OVER_LIMIT`: the call was rejected and consumed nothing.
    Rejected,
    /// No decision reached the client: gRPC error, timeout or `UNKNOWN` code. Counted as offered
    /// but neither admitted nor rejected.
    Error,
}

/// Why a call got no decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No answer within the call timeout.
    Timeout,
    /// The node could not be reached or refused the call (`UNAVAILABLE`: a dead node, or a
    /// strategy that is down under policy `error`).
    Unavailable,
    /// Any other gRPC status.
    Status,
    /// An answer whose overall code was neither `OK` nor `OVER_LIMIT`.
    Undecided,
}

impl ErrorKind {
    /// The kind's name in tables and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Status => "status",
            ErrorKind::Undecided => "undecided",
        }
    }
}

/// One call as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// Index of the node the call went to, so results can be split per node.
    pub node: u32,
    /// Index of the key (descriptor value) the call carried; 0 for single-key workloads.
    pub key: u32,
    /// How late the call went out after its intended (paced) send time, µs: the queueing a
    /// coordinated-omission-aware latency adds to the round trip.
    pub queued_us: u64,
    /// Why the call got no decision, for [`Outcome::Error`] only.
    pub error: Option<ErrorKind>,
    /// Wall-clock send time, µs since the Unix epoch: the earliest the server can have decided.
    pub sent_us: u64,
    /// Wall-clock receive time, µs since the Unix epoch: the latest the server can have decided.
    pub received_us: u64,
    /// Round trip measured on the monotonic clock (wall-clock differences can jump), in µs.
    pub latency_us: u64,
    /// The decision, or that there was none.
    pub outcome: Outcome,
}

impl Observation {
    /// Latency from the intended send time (the paced tick) to the answer, µs: what a caller
    /// that sends on schedule waits, stalls of the client included (coordinated omission).
    pub fn intended_latency_us(&self) -> u64 {
        self.latency_us.saturating_add(self.queued_us)
    }
}

/// The ground truth for one window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WindowTruth {
    /// Epoch-aligned window index: `floor(start / window_len)`, the server's own numbering.
    pub index: u64,
    /// Calls sent in this window, whatever happened to them: the load the limiter faced.
    pub offered: u64,
    /// Admitted calls sent and answered within this window (exact attribution).
    pub admitted: u64,
    /// Rejected calls sent and answered within this window (exact attribution).
    pub rejected: u64,
    /// Calls sent in this window and answered in a later one: their window is uncertain.
    pub ambiguous: u64,
    /// Admitted ambiguous calls whose send..receive interval touches this window, so that may
    /// have consumed this window's quota (both bounds below use it).
    pub ambiguous_admitted: u64,
    /// Calls sent in this window that got no decision (errors, timeouts).
    pub errors: u64,
    /// `max(0, admitted − limit)`: the lower bound of admissions beyond the limit.
    pub overshoot: u64,
    /// `max(0, admitted + ambiguous_admitted − limit)`: the upper bound.
    pub overshoot_upper: u64,
    /// `min(rejected, max(0, limit − admitted − ambiguous_admitted))`: rejections an exact
    /// limiter would have admitted (conservative: boundary calls never count as false).
    pub false_rejections: u64,
    /// `min(limit, offered)`: what an exact limiter admits here; false rejections are a share
    /// of this.
    pub would_admit: u64,
}

/// The window containing `t_us` (µs since the epoch) for windows of `window_us` µs.
///
/// Panics if `window_us` is 0.
pub fn window_index(t_us: u64, window_us: u64) -> u64 {
    t_us / window_us
}

/// Whole microseconds of a window length, at least 1 so that division is always defined.
pub fn window_micros(window: Duration) -> u64 {
    u64::try_from(window.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Per-window ground truth for `observations`, with `limit` admissions allowed per window of
/// length `window`.
///
/// `range` names the window indices to report (half-open). `None` keeps every window between
/// the first window a call was sent in and the last window an answer arrived in, both excluded
/// (they are partial). Either way only windows the observations span are reported, so the
/// result is bounded by the data, and windows without any call in them are reported with zeros.
pub fn analyse(
    observations: &[Observation],
    limit: u64,
    window: Duration,
    range: Option<Range<u64>>,
) -> Vec<WindowTruth> {
    let wu = window_micros(window);
    let Some(first) = observations
        .iter()
        .map(|o| window_index(o.sent_us, wu))
        .min()
    else {
        return Vec::new();
    };
    let last = observations
        .iter()
        .map(|o| window_index(o.received_us.max(o.sent_us), wu))
        .max()
        .unwrap_or(first);
    let span = first..last.saturating_add(1);
    let range = range.unwrap_or(first.saturating_add(1)..last);
    let keep = range.start.max(span.start)..range.end.min(span.end);
    if keep.is_empty() {
        return Vec::new();
    }

    let mut windows: BTreeMap<u64, WindowTruth> = keep
        .clone()
        .map(|index| {
            (
                index,
                WindowTruth {
                    index,
                    ..WindowTruth::default()
                },
            )
        })
        .collect();

    for o in observations {
        let sent = window_index(o.sent_us, wu);
        let received = window_index(o.received_us.max(o.sent_us), wu);
        if let Some(w) = windows.get_mut(&sent) {
            w.offered += 1;
            match o.outcome {
                Outcome::Error => w.errors += 1,
                _ if received != sent => w.ambiguous += 1,
                Outcome::Admitted => w.admitted += 1,
                Outcome::Rejected => w.rejected += 1,
            }
        }
        if o.outcome == Outcome::Admitted && received != sent {
            // Every kept window the interval touches may have spent quota on this call; the
            // loop is bounded by the kept range, not by how late the answer came.
            let touched = sent.max(keep.start)..received.saturating_add(1).min(keep.end);
            for index in touched {
                if let Some(w) = windows.get_mut(&index) {
                    w.ambiguous_admitted += 1;
                }
            }
        }
    }

    windows
        .into_values()
        .map(|mut w| {
            let possibly_admitted = w.admitted + w.ambiguous_admitted;
            w.overshoot = w.admitted.saturating_sub(limit);
            w.overshoot_upper = possibly_admitted.saturating_sub(limit);
            w.false_rejections = w.rejected.min(limit.saturating_sub(possibly_admitted));
            w.would_admit = w.offered.min(limit);
            w
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(1);
    /// Start of window 1,000 (1 s windows), in µs: a realistic, non-zero epoch offset.
    const BASE: u64 = 1_000 * 1_000_000;

    fn obs(sent_us: u64, received_us: u64, outcome: Outcome) -> Observation {
        Observation {
            node: 0,
            key: 0,
            queued_us: 0,
            error: None,
            sent_us,
            received_us,
            latency_us: received_us - sent_us,
            outcome,
        }
    }

    /// `n` calls inside window `BASE/1e6 + k`, each answered 100 µs later.
    fn burst(k: u64, n: u64, outcome: Outcome) -> Vec<Observation> {
        (0..n)
            .map(|i| {
                let t = BASE + k * 1_000_000 + 1_000 + i * 10;
                obs(t, t + 100, outcome)
            })
            .collect()
    }

    #[test]
    fn window_index_is_floor_of_time_over_length() {
        assert_eq!(window_index(0, 1_000_000), 0);
        assert_eq!(window_index(999_999, 1_000_000), 0);
        assert_eq!(window_index(1_000_000, 1_000_000), 1);
        assert_eq!(window_index(BASE + 1, window_micros(W)), 1_000);
        assert_eq!(window_micros(Duration::ZERO), 1);
        assert_eq!(window_micros(Duration::from_millis(250)), 250_000);
    }

    #[test]
    fn empty_input_gives_no_windows() {
        assert!(analyse(&[], 10, W, None).is_empty());
    }

    #[test]
    fn first_and_last_windows_are_skipped_by_default() {
        let mut all = Vec::new();
        for k in 0..5 {
            all.extend(burst(k, 3, Outcome::Admitted));
        }
        let windows = analyse(&all, 10, W, None);
        let indices: Vec<u64> = windows.iter().map(|w| w.index).collect();
        assert_eq!(indices, [1_001, 1_002, 1_003]);
        assert!(windows.iter().all(|w| w.offered == 3 && w.admitted == 3));
    }

    #[test]
    fn explicit_range_is_clamped_to_the_data_and_fills_quiet_windows() {
        let mut all = burst(0, 2, Outcome::Admitted);
        all.extend(burst(3, 2, Outcome::Admitted));
        let windows = analyse(&all, 10, W, Some(0..u64::MAX));
        let indices: Vec<u64> = windows.iter().map(|w| w.index).collect();
        assert_eq!(indices, [1_000, 1_001, 1_002, 1_003]);
        let quiet = WindowTruth {
            index: 1_001,
            ..WindowTruth::default()
        };
        assert_eq!(windows[1], quiet);
        assert!(analyse(&all, 10, W, Some(2_000..2_010)).is_empty());
    }

    #[test]
    fn exact_limiter_shows_no_overshoot_and_no_false_rejection() {
        let mut all = Vec::new();
        for k in 0..4 {
            all.extend(burst(k, 10, Outcome::Admitted));
            all.extend(burst(k, 10, Outcome::Rejected));
        }
        for w in analyse(&all, 10, W, Some(1_000..1_004)) {
            assert_eq!((w.offered, w.admitted, w.rejected), (20, 10, 10));
            assert_eq!(
                (w.overshoot, w.overshoot_upper, w.false_rejections),
                (0, 0, 0)
            );
            assert_eq!(w.would_admit, 10);
        }
    }

    #[test]
    fn overshoot_is_admitted_beyond_the_limit() {
        let mut all = burst(1, 15, Outcome::Admitted);
        all.extend(burst(1, 5, Outcome::Rejected));
        let w = &analyse(&all, 10, W, Some(1_001..1_002))[0];
        assert_eq!((w.admitted, w.rejected, w.offered), (15, 5, 20));
        assert_eq!((w.overshoot, w.overshoot_upper), (5, 5));
        assert_eq!(w.false_rejections, 0);
    }

    #[test]
    fn false_rejections_are_rejections_below_the_limit() {
        // 4 admitted, 9 rejected, limit 10: an exact limiter would have admitted 6 more.
        let mut all = burst(1, 4, Outcome::Admitted);
        all.extend(burst(1, 9, Outcome::Rejected));
        let w = &analyse(&all, 10, W, Some(1_001..1_002))[0];
        assert_eq!(w.false_rejections, 6);
        assert_eq!(w.would_admit, 10);
        // Fewer rejections than the room left: all of them are false.
        let mut all = burst(1, 4, Outcome::Admitted);
        all.extend(burst(1, 2, Outcome::Rejected));
        let w = &analyse(&all, 10, W, Some(1_001..1_002))[0];
        assert_eq!(w.false_rejections, 2);
        assert_eq!(w.would_admit, 6);
        // Deny-all: zero overshoot, everything below the limit is a false rejection.
        let all = burst(1, 30, Outcome::Rejected);
        let w = &analyse(&all, 10, W, Some(1_001..1_002))[0];
        assert_eq!(
            (w.overshoot, w.false_rejections, w.would_admit),
            (0, 10, 10)
        );
    }

    #[test]
    fn a_call_straddling_a_boundary_is_ambiguous_in_its_send_window() {
        let end_of_1 = BASE + 2 * 1_000_000; // start of window 1,002
        let straddling = obs(end_of_1 - 50, end_of_1 + 50, Outcome::Admitted);
        let windows = analyse(&[straddling], 10, W, Some(1_001..1_003));
        let (w1, w2) = (&windows[0], &windows[1]);
        assert_eq!((w1.offered, w1.ambiguous, w1.admitted), (1, 1, 0));
        assert_eq!((w2.offered, w2.ambiguous, w2.admitted), (0, 0, 0));
        // Both windows may have spent quota on it.
        assert_eq!((w1.ambiguous_admitted, w2.ambiguous_admitted), (1, 1));
        // A rejected straddler costs no quota anywhere.
        let rejected = obs(end_of_1 - 50, end_of_1 + 50, Outcome::Rejected);
        let windows = analyse(&[rejected], 10, W, Some(1_001..1_003));
        assert_eq!(windows[0].ambiguous, 1);
        assert_eq!(windows[0].rejected, 0);
        assert!(windows.iter().all(|w| w.ambiguous_admitted == 0));
    }

    #[test]
    fn ambiguous_admissions_bound_overshoot_and_suppress_false_rejections() {
        // Window 1,001 (limit 10): 9 exact admissions, 5 exact rejections, and one admitted call
        // sent in 1,000 and answered in 1,001 that the server counted in 1,001. An exact
        // limiter, seen through the clients: no false rejection, overshoot between 0 and 0.
        let start_of_1 = BASE + 1_000_000;
        let mut all = vec![obs(start_of_1 - 30, start_of_1 + 30, Outcome::Admitted)];
        all.extend(burst(1, 9, Outcome::Admitted));
        all.extend(burst(1, 5, Outcome::Rejected));
        let w = &analyse(&all, 10, W, Some(1_001..1_002))[0];
        assert_eq!((w.admitted, w.ambiguous, w.ambiguous_admitted), (9, 0, 1));
        assert_eq!(
            (w.overshoot, w.overshoot_upper, w.false_rejections),
            (0, 0, 0)
        );
        // Two more exact admissions: overshoot 1 for sure, 2 at most.
        all.extend(burst(1, 2, Outcome::Admitted));
        let w = &analyse(&all, 10, W, Some(1_001..1_002))[0];
        assert_eq!((w.overshoot, w.overshoot_upper), (1, 2));
    }

    #[test]
    fn a_very_late_answer_touches_only_kept_windows() {
        let sent = BASE + 500_000;
        let late = obs(sent, sent + 1_000 * 1_000_000, Outcome::Admitted);
        let windows = analyse(&[late], 10, W, Some(1_000..1_003));
        assert_eq!(windows.len(), 3);
        assert!(windows.iter().all(|w| w.ambiguous_admitted == 1));
        assert_eq!(windows[0].ambiguous, 1);
    }

    #[test]
    fn errors_are_offered_but_never_decided() {
        let mut all = burst(1, 3, Outcome::Error);
        all.extend(burst(1, 2, Outcome::Admitted));
        let w = &analyse(&all, 10, W, Some(1_001..1_002))[0];
        assert_eq!((w.offered, w.errors, w.admitted, w.rejected), (5, 3, 2, 0));
        assert_eq!(w.would_admit, 5);
    }

    #[test]
    fn sub_second_windows_work_the_same() {
        let window = Duration::from_millis(100);
        let all: Vec<Observation> = (0..30u64)
            .map(|i| {
                let t = BASE + i * 10_000 + 1;
                obs(t, t + 10, Outcome::Admitted)
            })
            .collect();
        // 30 calls 10 ms apart over 300 ms: windows of 100 ms hold 10 each; first and last
        // dropped.
        let windows = analyse(&all, 8, window, None);
        assert_eq!(windows.len(), 1);
        assert_eq!((windows[0].admitted, windows[0].overshoot), (10, 2));
    }
}
