//! The figures of one run: a serialisable [`Report`], printed as markdown and written as JSON.
//!
//! Definitions (per window, see [`crate::truth`]; all percentages are over the measured
//! windows only):
//!
//! - **overshoot %** = `overshoot / limit × 100`, mean over windows and worst window. It uses
//!   exactly attributed admissions only (a lower bound); `overshoot_upper_worst_pct` is the
//!   worst window counting boundary-straddling admissions too (an upper bound).
//! - **false rejections %** = `Σ false_rejections / Σ would_admit × 100`: of the calls an exact
//!   limiter would have admitted (`min(limit, offered)` per window), the share this one rejected.
//!   Under a load of at least the limit this equals false rejections as % of the limit, the
//!   figure the design asks for; under a lighter load it stays meaningful (0 % means nothing
//!   admissible was rejected).
//! - **throughput** = calls that got a decision (admitted or rejected), sent in the measured
//!   windows, per second of measured time; **offered** = calls sent in them per second, to
//!   compare with the target rate.
//! - **latency** = of decided calls sent in the measured windows, from the intended (paced)
//!   send time to the answer, so client-side queueing counts (coordinated omission), from an
//!   HDR histogram (µs, 3 significant digits).
//!
//! Overshoot without false rejections means nothing (deny-all has zero overshoot), so both are
//! always reported side by side.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::truth::{window_index, window_micros, Observation, Outcome, WindowTruth};
use crate::workload::Load;

/// What was run: enough to reproduce it and to label a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// Strategy name (`standalone`, `gossip`, …).
    pub strategy: String,
    /// Number of server processes.
    pub nodes: usize,
    /// Admissions allowed per window.
    pub limit: u64,
    /// The limit's unit (`second`, `minute`, …).
    pub unit: String,
    /// Window length in seconds (from the unit).
    pub window_secs: f64,
    /// Offered load as a multiple of the limit.
    pub load: f64,
    /// The total offered rate asked for, calls per second (`load × limit / window`).
    pub target_rps: f64,
    /// Relative load per node (empty: even).
    pub weights: Vec<f64>,
    /// Clients (connections) per node.
    pub clients_per_node: usize,
    /// Windows measured (warm-up excluded).
    pub windows: u64,
    /// Windows of load before the measured ones.
    pub warmup_windows: u64,
    /// Extra environment given to every node.
    pub env: Vec<(String, String)>,
    /// Extra flags given to every node.
    pub args: Vec<String>,
}

/// Latency percentiles of decided calls, in µs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Calls in the histogram.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest call.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

impl Latency {
    /// The percentiles of `histogram` (all zero when it is empty).
    pub fn of(histogram: &Histogram<u64>) -> Latency {
        if histogram.is_empty() {
            return Latency::default();
        }
        Latency {
            count: histogram.len(),
            p50_us: histogram.value_at_quantile(0.50),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            mean_us: histogram.mean(),
        }
    }
}

/// An empty latency histogram: 1 µs to 1 h, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds")
}

/// The headline figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Windows the figures cover.
    pub windows: usize,
    /// Mean over windows of `overshoot / limit`, in %.
    pub overshoot_mean_pct: f64,
    /// Worst window's `overshoot / limit`, in %.
    pub overshoot_worst_pct: f64,
    /// Worst window's `overshoot_upper / limit`, in % (boundary calls counted as admitted here).
    pub overshoot_upper_worst_pct: f64,
    /// `Σ false_rejections / Σ would_admit`, in %.
    pub false_rejection_pct: f64,
    /// `Σ false_rejections` over the windows.
    pub false_rejections: u64,
    /// `Σ would_admit` over the windows: the denominator above.
    pub would_admit: u64,
    /// Mean exactly attributed admissions per window (compare with the limit).
    pub admitted_mean: f64,
    /// Calls sent per second in the measured windows.
    pub offered_rps: f64,
    /// Decided calls per second in the measured windows.
    pub throughput_rps: f64,
    /// Calls with no decision (errors, timeouts) in the measured windows.
    pub errors: u64,
    /// Calls that straddled a window boundary (attribution uncertain).
    pub ambiguous: u64,
    /// Scheduled calls the clients dropped, over the whole run, because they ran too far
    /// behind (see [`crate::workload`]): non-zero means the load generator fell short.
    pub skipped: u64,
    /// Round-trip latency of decided calls.
    pub latency: Latency,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was run.
    pub run: RunInfo,
    /// Headline figures.
    pub summary: Summary,
    /// Per-window ground truth, in window order.
    pub windows: Vec<WindowTruth>,
}

/// Writing a report failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The file could not be written.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Serialisation failed (not expected for these types).
    #[error("serialising the report: {0}")]
    Json(#[from] serde_json::Error),
}

impl Report {
    /// Builds the report of a run from its per-window truth and what the load produced (its
    /// observations give the latency, taken over calls sent in the reported windows).
    pub fn new(
        run: RunInfo,
        limit: u64,
        window: Duration,
        windows: Vec<WindowTruth>,
        load: &Load,
    ) -> Report {
        let mut summary = summarise(limit, window, &windows, &load.observations);
        summary.skipped = load.skipped;
        Report {
            run,
            summary,
            windows,
        }
    }

    /// The report as markdown: a summary table, then one row per window.
    pub fn to_markdown(&self) -> String {
        let r = &self.run;
        let s = &self.summary;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "### {} × {} — limit {}/{}, load {}× ({:.0} req/s), {} client(s)/node, {} window(s)\n",
            r.nodes,
            r.strategy,
            r.limit,
            r.unit,
            r.load,
            r.target_rps,
            r.clients_per_node,
            s.windows
        );
        let rows = [
            ("overshoot mean", format!("{:.2} %", s.overshoot_mean_pct)),
            (
                "overshoot worst (upper bound)",
                format!(
                    "{:.2} % ({:.2} %)",
                    s.overshoot_worst_pct, s.overshoot_upper_worst_pct
                ),
            ),
            (
                "false rejections",
                format!(
                    "{:.2} % ({} of {})",
                    s.false_rejection_pct, s.false_rejections, s.would_admit
                ),
            ),
            (
                "admitted per window (mean)",
                format!("{:.1}", s.admitted_mean),
            ),
            (
                "offered / decided",
                format!("{:.0} / {:.0} req/s", s.offered_rps, s.throughput_rps),
            ),
            (
                "latency p50 / p99 / p99.9 / max",
                format!(
                    "{} / {} / {} / {} µs",
                    s.latency.p50_us, s.latency.p99_us, s.latency.p999_us, s.latency.max_us
                ),
            ),
            (
                "errors / ambiguous / skipped",
                format!("{} / {} / {}", s.errors, s.ambiguous, s.skipped),
            ),
        ];
        out.push_str("| metric | value |\n| --- | --- |\n");
        for (name, value) in rows {
            let _ = writeln!(out, "| {name} | {value} |");
        }
        out.push_str(
            "\n| window | offered | admitted | rejected | ambiguous | errors | overshoot | \
             false rej. |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        let first = self.windows.first().map_or(0, |w| w.index);
        for w in &self.windows {
            let overshoot = if w.overshoot_upper > w.overshoot {
                format!("{}..{}", w.overshoot, w.overshoot_upper)
            } else {
                w.overshoot.to_string()
            };
            let _ = writeln!(
                out,
                "| +{} | {} | {} | {} | {} | {} | {} | {} |",
                w.index - first,
                w.offered,
                w.admitted,
                w.rejected,
                w.ambiguous,
                w.errors,
                overshoot,
                w.false_rejections
            );
        }
        out
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> Result<String, ReportError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Writes [`Report::to_json`] to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), ReportError> {
        let json = self.to_json()?;
        std::fs::write(path, json + "\n").map_err(|source| ReportError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

/// The headline figures of `windows`, with latency from the `observations` sent in them.
pub fn summarise(
    limit: u64,
    window: Duration,
    windows: &[WindowTruth],
    observations: &[Observation],
) -> Summary {
    let n = windows.len();
    if n == 0 {
        return Summary::default();
    }
    let pct = |x: u64| {
        if limit == 0 {
            0.0
        } else {
            x as f64 * 100.0 / limit as f64
        }
    };
    let sum = |f: fn(&WindowTruth) -> u64| windows.iter().map(f).sum::<u64>();
    let false_rejections = sum(|w| w.false_rejections);
    let would_admit = sum(|w| w.would_admit);
    let offered = sum(|w| w.offered);
    let decided = offered - sum(|w| w.errors);
    let measured_secs = window.as_secs_f64() * n as f64;

    let wu = window_micros(window);
    let (lo, hi) = (windows[0].index, windows[n - 1].index);
    let mut histogram = latency_histogram();
    for o in observations {
        let w = window_index(o.sent_us, wu);
        if (lo..=hi).contains(&w) && o.outcome != Outcome::Error {
            histogram.saturating_record(o.intended_latency_us().max(1));
        }
    }
    let latency = Latency::of(&histogram);

    Summary {
        windows: n,
        overshoot_mean_pct: windows.iter().map(|w| pct(w.overshoot)).sum::<f64>() / n as f64,
        overshoot_worst_pct: pct(windows.iter().map(|w| w.overshoot).max().unwrap_or(0)),
        overshoot_upper_worst_pct: pct(windows
            .iter()
            .map(|w| w.overshoot_upper)
            .max()
            .unwrap_or(0)),
        false_rejection_pct: if would_admit == 0 {
            0.0
        } else {
            false_rejections as f64 * 100.0 / would_admit as f64
        },
        false_rejections,
        would_admit,
        admitted_mean: sum(|w| w.admitted) as f64 / n as f64,
        offered_rps: offered as f64 / measured_secs,
        throughput_rps: decided as f64 / measured_secs,
        errors: sum(|w| w.errors),
        ambiguous: sum(|w| w.ambiguous),
        // Only the load knows what it did not send; Report::new fills it in.
        skipped: 0,
        latency,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(index: u64, offered: u64, admitted: u64, rejected: u64, limit: u64) -> WindowTruth {
        WindowTruth {
            index,
            offered,
            admitted,
            rejected,
            overshoot: admitted.saturating_sub(limit),
            overshoot_upper: admitted.saturating_sub(limit),
            false_rejections: rejected.min(limit.saturating_sub(admitted)),
            would_admit: offered.min(limit),
            ..WindowTruth::default()
        }
    }

    fn run_info() -> RunInfo {
        RunInfo {
            strategy: "standalone".into(),
            nodes: 2,
            limit: 100,
            unit: "second".into(),
            window_secs: 1.0,
            load: 2.0,
            target_rps: 200.0,
            weights: Vec::new(),
            clients_per_node: 1,
            windows: 2,
            warmup_windows: 0,
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    #[test]
    fn summary_averages_overshoot_and_pools_false_rejections() {
        let windows = [window(10, 200, 120, 80, 100), window(11, 200, 90, 110, 100)];
        let obs: Vec<Observation> = (0..100)
            .map(|i| Observation {
                node: 0,
                key: 0,
                queued_us: 0,
                error: None,
                sent_us: 10_000_000 + i * 1_000,
                received_us: 10_000_000 + i * 1_000 + 100 + i,
                latency_us: 100 + i,
                outcome: Outcome::Admitted,
            })
            .collect();
        let s = summarise(100, Duration::from_secs(1), &windows, &obs);
        assert_eq!(s.windows, 2);
        assert!((s.overshoot_mean_pct - 10.0).abs() < 1e-9);
        assert!((s.overshoot_worst_pct - 20.0).abs() < 1e-9);
        assert_eq!((s.false_rejections, s.would_admit), (10, 200));
        assert!((s.false_rejection_pct - 5.0).abs() < 1e-9);
        assert!((s.admitted_mean - 105.0).abs() < 1e-9);
        assert!((s.offered_rps - 200.0).abs() < 1e-9);
        assert_eq!(s.latency.count, 100);
        assert!((149..=150).contains(&s.latency.p50_us), "{:?}", s.latency);
        assert_eq!(s.latency.max_us, 199);
    }

    #[test]
    fn no_windows_gives_an_empty_summary() {
        assert_eq!(
            summarise(10, Duration::from_secs(1), &[], &[]),
            Summary::default()
        );
    }

    #[test]
    fn markdown_and_json_carry_the_figures() {
        let windows = vec![
            window(10, 200, 120, 80, 100),
            window(11, 200, 100, 100, 100),
        ];
        let load = Load {
            observations: Vec::new(),
            skipped: 3,
        };
        let report = Report::new(run_info(), 100, Duration::from_secs(1), windows, &load);
        let md = report.to_markdown();
        assert!(md.contains("| overshoot mean | 10.00 % |"), "{md}");
        assert!(
            md.contains("| +1 | 200 | 100 | 100 | 0 | 0 | 0 | 0 |"),
            "{md}"
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        assert_eq!(json["summary"]["overshoot_worst_pct"], 20.0);
        assert_eq!(json["windows"][0]["admitted"], 120);
        assert_eq!(json["run"]["strategy"], "standalone");
        assert_eq!(json["summary"]["skipped"], 3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        report.write_json(&path).unwrap();
        assert!(std::fs::read_to_string(path)
            .unwrap()
            .contains("\"overshoot_mean_pct\""));
    }
}
