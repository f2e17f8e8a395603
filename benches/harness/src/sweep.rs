//! Accuracy sweeps: overshoot and false rejections over a grid of limits, node counts, skews
//! and loads, one markdown table and one JSON file for the lot.
//!
//! A [`Cell`] is one experiment of the grid. Cells of one node count share one cluster, each on
//! its own descriptor value (so counters never carry over from one cell to the next); cells of
//! a per-second limit run one after the other (a few windows each), cells of a longer unit run
//! all at once (one window takes a minute, and their load is light), so the default grid of
//! [`grid`] finishes in about ten minutes.
//!
//! The goal every cell is judged against ([`Goal`]): overshoot mean ≤ 1 %, worst window ≤ 3 %,
//! false rejections ≤ 1 %. Nothing here asserts it: on a loaded machine the figures move, and
//! they belong in a report, not in a test.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use hivemind_core::Unit;
use serde::Serialize;

use crate::cluster::{Cluster, ClusterSpec, Strategy};
use crate::experiment::{bench_rules_many, Experiment, ExperimentError};
use crate::report::Summary;

/// How the load is spread over the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Skew {
    /// The same rate on every node.
    Even,
    /// 80 % of the load on node 0, the rest spread evenly (80/10/10 on 3 nodes).
    Hot80,
}

impl Skew {
    /// The weights for `nodes` nodes (empty: even).
    pub fn weights(self, nodes: usize) -> Vec<f64> {
        match self {
            Skew::Even => Vec::new(),
            Skew::Hot80 if nodes <= 1 => Vec::new(),
            Skew::Hot80 => {
                let rest = 0.2 / (nodes - 1) as f64;
                std::iter::once(0.8)
                    .chain(std::iter::repeat_n(rest, nodes - 1))
                    .collect()
            }
        }
    }

    /// Short label: `even` or `80/20`.
    pub fn label(self) -> &'static str {
        match self {
            Skew::Even => "even",
            Skew::Hot80 => "80/rest",
        }
    }

    /// Parses `even` or `80`.
    pub fn parse(s: &str) -> Option<Skew> {
        match s {
            "even" => Some(Skew::Even),
            "80" | "hot80" | "80/10/10" => Some(Skew::Hot80),
            _ => None,
        }
    }
}

/// One experiment of the grid.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cell {
    /// Server processes.
    pub nodes: usize,
    /// Admissions allowed per window.
    pub limit: u64,
    /// The limit's unit.
    #[serde(serialize_with = "unit_name")]
    pub unit: Unit,
    /// Offered load as a multiple of the limit.
    pub load: f64,
    /// Spread of the load over the nodes.
    pub skew: Skew,
}

fn unit_name<S: serde::Serializer>(unit: &Unit, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(unit.as_str())
}

impl Cell {
    /// `100/s`, `1000/min`, …
    pub fn limit_label(&self) -> String {
        let unit = match self.unit {
            Unit::Second => "s",
            Unit::Minute => "min",
            other => other.as_str(),
        };
        format!("{}/{unit}", self.limit)
    }
}

/// The accuracy goal of issue 13.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Goal {
    /// Most overshoot, mean over windows, in %.
    pub overshoot_mean_pct: f64,
    /// Most overshoot in the worst window, in %.
    pub overshoot_worst_pct: f64,
    /// Most false rejections, in %.
    pub false_rejection_pct: f64,
}

impl Default for Goal {
    fn default() -> Self {
        Goal {
            overshoot_mean_pct: 1.0,
            overshoot_worst_pct: 3.0,
            false_rejection_pct: 1.0,
        }
    }
}

impl Goal {
    /// Whether `summary` is within the goal.
    pub fn met(&self, summary: &Summary) -> bool {
        summary.overshoot_mean_pct <= self.overshoot_mean_pct
            && summary.overshoot_worst_pct <= self.overshoot_worst_pct
            && summary.false_rejection_pct <= self.false_rejection_pct
    }
}

/// The standard grid: limits 10, 100, 1,000, 10,000 per second and 100, 1,000 per minute; 3
/// and 9 nodes; even and 80 % skewed load; 2× and 1.1× the limit.
pub fn grid() -> Vec<Cell> {
    let limits = [
        (10, Unit::Second),
        (100, Unit::Second),
        (1_000, Unit::Second),
        (10_000, Unit::Second),
        (100, Unit::Minute),
        (1_000, Unit::Minute),
    ];
    let mut cells = Vec::new();
    for nodes in [3, 9] {
        for (limit, unit) in limits {
            for skew in [Skew::Even, Skew::Hot80] {
                for load in [2.0, 1.1] {
                    cells.push(Cell {
                        nodes,
                        limit,
                        unit,
                        load,
                        skew,
                    });
                }
            }
        }
    }
    cells
}

/// How a sweep runs.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// The server executable.
    pub binary: PathBuf,
    /// Strategy every node runs.
    pub strategy: Strategy,
    /// The cells to run.
    pub cells: Vec<Cell>,
    /// Measured windows of a per-second cell (after one warm-up window).
    pub windows: u64,
    /// Measured windows of a longer-unit cell (the partial window before them is the warm-up).
    pub long_windows: u64,
    /// Extra environment for every node.
    pub env: Vec<(String, String)>,
    /// Extra flags for every node.
    pub args: Vec<String>,
}

/// One cell's result.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    /// The cell.
    pub cell: Cell,
    /// Its headline figures.
    pub summary: Summary,
    /// Whether they meet the [`Goal`].
    pub goal_met: bool,
}

impl Sweep {
    /// The experiment of one cell, on descriptor value `value`.
    pub fn experiment(&self, cell: &Cell, value: String) -> Experiment {
        let mut e = Experiment::new(
            &self.binary,
            self.strategy,
            cell.nodes,
            cell.limit,
            cell.unit,
        );
        e.load = cell.load;
        e.weights = cell.skew.weights(cell.nodes);
        e.value = value;
        e.env.clone_from(&self.env);
        e.args.clone_from(&self.args);
        if cell.unit == Unit::Second {
            e.windows = self.windows;
            e.warmup_windows = 1;
        } else {
            e.windows = self.long_windows;
            e.warmup_windows = 0;
        }
        e
    }

    /// Runs every cell, calling `progress` after each, and returns the results in cell order.
    pub async fn run(
        &self,
        mut progress: impl FnMut(&CellResult),
    ) -> Result<Vec<CellResult>, ExperimentError> {
        let goal = Goal::default();
        let mut results: Vec<Option<CellResult>> = vec![None; self.cells.len()];
        let mut node_counts: Vec<usize> = self.cells.iter().map(|c| c.nodes).collect();
        node_counts.sort_unstable();
        node_counts.dedup();
        for nodes in node_counts {
            let mine: Vec<(usize, Experiment)> = self
                .cells
                .iter()
                .enumerate()
                .filter(|(_, c)| c.nodes == nodes)
                .map(|(i, c)| (i, self.experiment(c, format!("cell{i}"))))
                .collect();
            let rules: Vec<(String, u64, Unit)> = mine
                .iter()
                .map(|(_, e)| (e.value.clone(), e.limit, e.unit))
                .collect();
            let mut spec =
                ClusterSpec::new(&self.binary, self.strategy, nodes, bench_rules_many(&rules));
            spec.env.clone_from(&self.env);
            spec.args.clone_from(&self.args);
            let mut cluster = tokio::task::spawn_blocking(move || Cluster::start(&spec)).await??;
            cluster.wait_formed(Duration::from_secs(30)).await?;
            let addrs = cluster.grpc_addrs();
            // Longer units all at once, then the per-second cells one by one.
            let (long, short): (Vec<_>, Vec<_>) =
                mine.into_iter().partition(|(_, e)| e.unit != Unit::Second);
            let runs = long.iter().map(|(i, e)| {
                let (i, e, addrs) = (*i, e.clone(), addrs.clone());
                async move { (i, e.run_load(&addrs).await) }
            });
            for (i, report) in futures_join_all(runs).await {
                let summary = report?.summary;
                let r = CellResult {
                    cell: self.cells[i],
                    goal_met: goal.met(&summary),
                    summary,
                };
                progress(&r);
                results[i] = Some(r);
            }
            for (i, e) in &short {
                let summary = e.run_on(&mut cluster).await?.summary;
                let r = CellResult {
                    cell: self.cells[*i],
                    goal_met: goal.met(&summary),
                    summary,
                };
                progress(&r);
                results[*i] = Some(r);
            }
            if let Some((node, status, stderr)) = cluster.exited().into_iter().next() {
                return Err(ExperimentError::NodeExited {
                    node,
                    status,
                    stderr,
                });
            }
        }
        Ok(results.into_iter().flatten().collect())
    }
}

/// Runs futures concurrently (one task each) and returns their outputs in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("sweep task panicked"));
    }
    out
}

/// The results as one markdown table: overshoot and false rejections side by side.
pub fn to_markdown(results: &[CellResult]) -> String {
    let mut out = String::from(
        "| nodes | limit | load | skew | overshoot mean | overshoot worst | false rejections | admitted / window | goal |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in results {
        let s = &r.summary;
        let _ = writeln!(
            out,
            "| {} | {} | {}× | {} | {:.2} % | {:.2} % | {:.2} % | {:.1} | {} |",
            r.cell.nodes,
            r.cell.limit_label(),
            r.cell.load,
            r.cell.skew.label(),
            s.overshoot_mean_pct,
            s.overshoot_worst_pct,
            s.false_rejection_pct,
            s.admitted_mean,
            if r.goal_met { "✓" } else { "✗" },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_covers_the_issue_range() {
        let cells = grid();
        assert_eq!(cells.len(), 2 * 6 * 2 * 2);
        assert!(cells
            .iter()
            .any(|c| c.nodes == 9 && c.limit == 10 && c.load == 1.1 && c.skew == Skew::Hot80));
        assert_eq!(cells.iter().filter(|c| c.unit == Unit::Minute).count(), 16);
    }

    #[test]
    fn skewed_weights_put_80_percent_on_one_node() {
        assert_eq!(Skew::Hot80.weights(3), vec![0.8, 0.1, 0.1]);
        let w = Skew::Hot80.weights(9);
        assert_eq!(w.len(), 9);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(Skew::Even.weights(9).is_empty());
    }

    #[test]
    fn the_goal_needs_both_figures() {
        let goal = Goal::default();
        let mut s = Summary {
            overshoot_mean_pct: 0.5,
            overshoot_worst_pct: 2.0,
            false_rejection_pct: 0.5,
            ..Summary::default()
        };
        assert!(goal.met(&s));
        s.false_rejection_pct = 6.4;
        assert!(!goal.met(&s), "deny-all has no overshoot");
    }

    #[test]
    fn rules_name_one_descriptor_per_cell() {
        let yaml = bench_rules_many(&[
            ("cell0".into(), 10, Unit::Second),
            ("cell1".into(), 100, Unit::Minute),
        ]);
        assert!(yaml.contains(
            "value: cell1\n    rate_limit:\n      unit: minute\n      requests_per_unit: 100\n"
        ));
    }
}
