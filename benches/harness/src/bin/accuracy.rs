//! `accuracy`: runs the accuracy grid (see `hivemind_harness::sweep`) and prints one markdown
//! table, overshoot and false rejections side by side per cell.
//!
//! ```sh
//! cargo build --release -p hivemind -p hivemind-harness
//! target/release/accuracy --json accuracy.json            # the whole grid, ~10 min
//! target/release/accuracy --nodes 9 --limits 100/s --loads 1.1
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use hivemind_core::Unit;
use hivemind_harness::sweep::{self, Cell, Skew, Sweep};
use hivemind_harness::{build_hivemind, parse_env_var, Profile, Strategy};

/// Overshoot and false rejections over limits, node counts, skews and loads.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Node counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [3usize, 9])]
    nodes: Vec<usize>,
    /// Limits as N/s or N/min (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10/s,100/s,1000/s,10000/s,100/min,1000/min"
    )]
    limits: Vec<String>,
    /// Loads, multiples of the limit (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [2.0f64, 1.1])]
    loads: Vec<f64>,
    /// Skews: even, 80 (80 % on one node, the rest even).
    #[arg(long, value_delimiter = ',', default_value = "even,80")]
    skews: Vec<String>,
    /// Measured windows per per-second cell (after one warm-up window).
    #[arg(long, default_value_t = 4)]
    windows: u64,
    /// Measured windows per per-minute cell (these run all at once).
    #[arg(long, default_value_t = 1)]
    long_windows: u64,
    /// Strategy every node runs.
    #[arg(long, default_value_t = Strategy::Gossip)]
    strategy: Strategy,
    /// The hivemind executable [default: build and use target/release/hivemind].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// Extra environment for every node, KEY=VAL (repeatable).
    #[arg(long = "env", value_name = "KEY=VAL", value_parser = parse_env_var)]
    env: Vec<(String, String)>,
}

fn parse_limit(s: &str) -> anyhow::Result<(u64, Unit)> {
    let (n, unit) = s.split_once('/').context("a limit is N/s or N/min")?;
    let unit = match unit {
        "s" => Unit::Second,
        "min" => Unit::Minute,
        other => Unit::parse(other).with_context(|| format!("unknown unit {other:?}"))?,
    };
    Ok((n.parse().with_context(|| format!("limit {n:?}"))?, unit))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("accuracy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let limits = args
        .limits
        .iter()
        .map(|s| parse_limit(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut skews = Vec::new();
    for s in &args.skews {
        match Skew::parse(s) {
            Some(skew) => skews.push(skew),
            None => bail!("unknown skew {s:?} (even or 80)"),
        }
    }
    let cells: Vec<Cell> = sweep::grid()
        .into_iter()
        .filter(|c| args.nodes.contains(&c.nodes))
        .filter(|c| limits.contains(&(c.limit, c.unit)))
        .filter(|c| args.loads.contains(&c.load))
        .filter(|c| skews.contains(&c.skew))
        .collect();
    if cells.is_empty() {
        bail!("no cell of the grid matches");
    }
    let binary = match args.binary {
        Some(path) => path,
        None => build_hivemind(Profile::Release).context("building the server")?,
    };
    let sweep = Sweep {
        binary,
        strategy: args.strategy,
        cells,
        windows: args.windows,
        long_windows: args.long_windows,
        env: args.env,
        args: Vec::new(),
    };
    eprintln!("accuracy: {} cell(s)", sweep.cells.len());
    let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
    let results = runtime.block_on(sweep.run(|r| {
        eprintln!(
            "accuracy: {} nodes {} {}× {}: overshoot {:.2} % / {:.2} %, false rejections {:.2} %",
            r.cell.nodes,
            r.cell.limit_label(),
            r.cell.load,
            r.cell.skew.label(),
            r.summary.overshoot_mean_pct,
            r.summary.overshoot_worst_pct,
            r.summary.false_rejection_pct
        );
    }))?;
    print!("{}", sweep::to_markdown(&results));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&results)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("accuracy: wrote {}", path.display());
    }
    Ok(())
}
