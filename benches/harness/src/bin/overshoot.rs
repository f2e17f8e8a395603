//! `overshoot`: runs the standard experiment once and prints its table.
//!
//! ```sh
//! cargo run --release -p hivemind-harness --bin overshoot -- \
//!     --nodes 3 --strategy gossip --limit 1000 --load 2 --windows 20 \
//!     --env HIVEMIND_MESH__GOSSIP_INTERVAL=100ms --json gossip-3.json
//! ```
//!
//! Without `--binary` it builds the server first (`cargo build --release -p hivemind`, a no-op
//! when up to date) and runs `target/release/hivemind`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use hivemind_core::Unit;
use hivemind_harness::{build_hivemind, parse_env_var, Experiment, Profile, Strategy};

/// Measures overshoot, false rejections, latency and throughput of a hivemind cluster.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Number of server processes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Strategy every node runs: gossip or standalone.
    #[arg(long, default_value_t = Strategy::Gossip)]
    strategy: Strategy,
    /// Admissions allowed per window, cluster-wide.
    #[arg(long, default_value_t = 1000)]
    limit: u64,
    /// The limit's unit (second, minute, …): the window length.
    #[arg(long, default_value = "second", value_parser = parse_unit)]
    unit: Unit,
    /// Offered load as a multiple of the limit.
    #[arg(long, default_value_t = 2.0)]
    load: f64,
    /// Windows measured (after the warm-up).
    #[arg(long, default_value_t = 20)]
    windows: u64,
    /// Full windows of load before measuring.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Clients (connections) per node.
    #[arg(long, default_value_t = 4)]
    clients_per_node: usize,
    /// Relative load per node, comma-separated (default: even).
    #[arg(long, value_delimiter = ',')]
    weights: Vec<f64>,
    /// The hivemind executable [default: build and use target/release/hivemind].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// Extra environment for every node, KEY=VAL (repeatable).
    #[arg(long = "env", value_name = "KEY=VAL", value_parser = parse_env_var)]
    env: Vec<(String, String)>,
    /// Extra flag for every node (repeatable; `--arg=--flag` for flags).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    args: Vec<String>,
    /// Per-call timeout in milliseconds.
    #[arg(long, default_value_t = 1000)]
    request_timeout_ms: u64,
}

fn parse_unit(s: &str) -> Result<Unit, String> {
    Unit::parse(s).ok_or_else(|| format!("unknown unit {s:?}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("overshoot: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let binary = match args.binary {
        Some(path) => path,
        None => {
            eprintln!("overshoot: cargo build --release -p hivemind --bin hivemind");
            build_hivemind(Profile::Release).context("building the server")?
        }
    };
    let mut experiment = Experiment::new(binary, args.strategy, args.nodes, args.limit, args.unit);
    experiment.load = args.load;
    experiment.windows = args.windows;
    experiment.warmup_windows = args.warmup;
    experiment.clients_per_node = args.clients_per_node;
    experiment.weights = args.weights;
    experiment.env = args.env;
    experiment.args = args.args;
    experiment.request_timeout = Duration::from_millis(args.request_timeout_ms);

    // Whole-run bound: the load phase plus cluster start, readiness and slack.
    let bound = experiment.planned_load_time() + experiment.ready_timeout + Duration::from_secs(60);
    eprintln!(
        "overshoot: {} × {}, {:.0} req/s for about {:.0} s",
        experiment.nodes,
        experiment.strategy.as_str(),
        experiment.target_rps(),
        experiment.planned_load_time().as_secs_f64()
    );

    let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
    let report = runtime.block_on(async {
        match tokio::time::timeout(bound, experiment.run()).await {
            Ok(result) => Ok(result?),
            Err(_) => bail!("the run did not finish within {bound:?}"),
        }
    })?;
    print!("{}", report.to_markdown());
    if let Some(path) = &args.json {
        report.write_json(path)?;
        eprintln!("overshoot: wrote {}", path.display());
    }
    Ok(())
}
