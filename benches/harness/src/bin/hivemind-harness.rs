//! `hivemind-harness`: the comparison of strategies on identical workloads.
//!
//! ```sh
//! cargo run --release -p hivemind-harness -- run benches/scenarios/quick.yaml
//! cargo run --release -p hivemind-harness -- run benches/scenarios/suite/*.yaml
//! ```
//!
//! Each scenario file lists the strategies to compare; each runs on a fresh cluster of real
//! `hivemind` processes (and a real `redis-server` for redis) on loopback. The results table is
//! printed as markdown; JSON, markdown and SVG plots go to `--out/<scenario>/`. Without
//! `--binary` the server is built first (`cargo build --release -p hivemind`, a no-op when up
//! to date).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hivemind_harness::run::{self, Options};
use hivemind_harness::scenario::Spread;
use hivemind_harness::{build_hivemind, Profile, Scenario};
use indicatif::MultiProgress;

/// Runs scenario files against every strategy they list.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs scenarios, prints their tables, writes JSON and SVG plots.
    Run(RunArgs),
    /// Checks scenario files without running anything.
    Check {
        /// Scenario files.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Scenario files, run in order.
    #[arg(required = true)]
    scenarios: Vec<PathBuf>,
    /// Results folder (one subfolder per scenario).
    #[arg(long, default_value = "target/harness-results")]
    out: PathBuf,
    /// The hivemind executable [default: build and use target/release/hivemind].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Override: nodes for every strategy (weights become even), e.g. 1 for a smoke run.
    #[arg(long)]
    nodes: Option<usize>,
    /// Override: measured windows.
    #[arg(long)]
    windows: Option<u64>,
    /// Override: warm-up windows.
    #[arg(long)]
    warmup: Option<u64>,
    /// Override: seconds of the max-throughput phase (where the scenario has one).
    #[arg(long)]
    max_throughput_secs: Option<u64>,
}

fn main() -> ExitCode {
    match run_cli(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hivemind-harness: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(paths: &[PathBuf]) -> anyhow::Result<Vec<Scenario>> {
    paths
        .iter()
        .map(|p| Scenario::load(p).map_err(anyhow::Error::from))
        .collect()
}

/// Applies the command-line overrides and checks the result again.
fn overridden(mut s: Scenario, args: &RunArgs) -> anyhow::Result<Scenario> {
    if let Some(n) = args.nodes {
        s.nodes = n;
        for run in &mut s.strategies {
            run.nodes = None;
        }
        if matches!(s.spread, Spread::Weights(_)) {
            s.spread = Spread::Even;
        }
    }
    if let Some(w) = args.windows {
        s.windows = w;
    }
    if let Some(w) = args.warmup {
        s.warmup_windows = w;
    }
    if let (Some(secs), Some(m)) = (args.max_throughput_secs, s.max_throughput.as_mut()) {
        m.duration = std::time::Duration::from_secs(secs);
    }
    let yaml = serde_yaml::to_string(&s).context("re-serialising the scenario")?;
    Scenario::parse(&yaml).with_context(|| format!("{} after the overrides", s.name))
}

fn run_cli(cli: Cli) -> anyhow::Result<()> {
    let args = match cli.command {
        Command::Check { scenarios } => {
            for s in load(&scenarios)? {
                println!("{}: ok ({} strategies)", s.name, s.strategies.len());
            }
            return Ok(());
        }
        Command::Run(args) => args,
    };
    let scenarios = load(&args.scenarios)?
        .into_iter()
        .map(|s| overridden(s, &args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let binary = match &args.binary {
        Some(path) => path.clone(),
        None => {
            eprintln!("hivemind-harness: cargo build --release -p hivemind --bin hivemind");
            build_hivemind(Profile::Release).context("building the server")?
        }
    };
    let options = Options {
        binary,
        out: args.out.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let bars = MultiProgress::new();
    let mut tables = String::new();
    for scenario in &scenarios {
        // Whole-scenario bound: every phase is bounded; this catches anything that is not.
        let per_strategy = scenario.window()
            * (scenario.warmup_windows + scenario.windows + 3) as u32
            + run::READY_TIMEOUT * 2
            + scenario
                .max_throughput
                .as_ref()
                .map_or(Default::default(), |m| m.duration)
            + std::time::Duration::from_secs(60);
        let bound = per_strategy * scenario.strategies.len() as u32;
        let result = runtime.block_on(async {
            match tokio::time::timeout(bound, run::run(scenario, &options, &bars)).await {
                Ok(result) => Ok(result?),
                Err(_) => bail!("{} did not finish within {bound:?}", scenario.name),
            }
        })?;
        let table = result.to_markdown();
        println!("{table}");
        eprintln!(
            "hivemind-harness: wrote {}",
            options.out.join(&scenario.name).display()
        );
        tables.push_str(&table);
        tables.push('\n');
    }
    if scenarios.len() > 1 {
        let path = options.out.join("summary.md");
        std::fs::write(&path, &tables).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("hivemind-harness: wrote {}", path.display());
    }
    Ok(())
}
