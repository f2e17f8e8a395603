//! Runs a [`Scenario`]: each strategy on a fresh cluster, the same workload and events, the
//! figures, the table, the JSON and the plots.
//!
//! Per strategy: a `redis-server` for the redis strategy (testkit's [`RedisServer`]), the
//! cluster ([`crate::cluster`]), readiness (for gossip: the mesh formed), then the paced load
//! ([`crate::workload`]), starting on a window boundary: `warmup_windows` windows, then the
//! measured ones. Events fire at their time from the first measured window; gossip nodes'
//! `/stats` are read at the start and end of the measured windows for the traffic figure. An
//! optional closed-loop phase then measures maximum throughput, on the lighter HTTP/2 client
//! of [`crate::closed_loop`]. A node that exits without
//! being killed by an event fails the run (a crashed server's figures mean nothing).
//!
//! Every phase shows a progress bar (on a terminal; hidden otherwise), and every wait is
//! bounded: cluster start and readiness by their timeouts, the load by its duration, calls by
//! the scenario's `request_timeout`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hivemind_testkit::RedisServer;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::closed_loop::{self, ClosedLoop, ClosedLoopError};
use crate::cluster::{Cluster, ClusterError, ClusterSpec, Strategy};
use crate::experiment::{bench_rules, bench_rules_per_value, DOMAIN, KEY, VALUE};
use crate::figures::{self, Figures, WindowPoint};
use crate::plots::{self, Line, PlotError};
use crate::report::Latency;
use crate::scenario::{Action, Scenario, Spread, StrategyRun};
use crate::truth::{window_index, window_micros};
use crate::workload::{self, unix_micros, Workload, WorkloadError};
use hivemind_testkit::http;

/// How long a cluster may take to answer its health checks (gossip: to form).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the runner needs besides the scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `hivemind` executable.
    pub binary: PathBuf,
    /// Where results go: one folder per scenario under it.
    pub out: PathBuf,
}

/// Everything one scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// The scenario as run (after any command-line overrides).
    pub scenario: Scenario,
    /// Where it ran.
    pub machine: Machine,
    /// When it started, seconds since the Unix epoch.
    pub started_unix_s: u64,
    /// One per strategy run, in the scenario's order.
    pub results: Vec<StrategyResult>,
}

/// The machine, for the reader of a result: client and servers share it.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs available to this process.
    pub cpus: usize,
    /// `std::env::consts::OS` / `ARCH`.
    pub os: String,
}

impl Machine {
    /// This machine.
    pub fn here() -> Machine {
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}

/// One strategy's figures on the scenario.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyResult {
    /// Its name in tables and plots.
    pub label: String,
    /// The strategy.
    pub strategy: String,
    /// Nodes it ran on.
    pub nodes: usize,
    /// The node environment it ran with.
    pub env: Vec<(String, String)>,
    /// Accuracy, latency, load and errors of the paced phase.
    pub figures: Figures,
    /// Gossip traffic: bytes sent per node per second over the measured windows (`None` for
    /// the other strategies, or when no node answered `/stats` twice).
    pub gossip_bytes_per_node_per_s: Option<f64>,
    /// Convergence after the load's start from idle (a burst), seconds; `None`: not converged.
    pub convergence_after_start_s: Option<f64>,
    /// The events as they happened.
    pub events: Vec<EventResult>,
    /// The closed-loop phase, if the scenario has one.
    pub max_throughput: Option<Throughput>,
    /// Per window from the load's start, summed over keys.
    pub series: Vec<WindowPoint>,
    /// `(µs, fraction)` points of the latency CDF (intended send time).
    pub latency_cdf: Vec<(u64, f64)>,
}

/// One event as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct EventResult {
    /// What it did.
    pub action: String,
    /// When it happened, seconds from the load's start.
    pub t_s: f64,
    /// What went wrong doing it, if anything (the run goes on).
    pub error: Option<String>,
    /// Whether it ends a disturbance (a resume, a restart, Redis back): convergence is
    /// measured from it.
    pub heals: bool,
    /// For events that end a disturbance: seconds until the windows were clean again (see
    /// [`crate::figures`]); `None` when they were not by the next event or the end.
    pub convergence_s: Option<f64>,
}

/// The closed-loop phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Connections in all.
    pub clients: usize,
    /// Calls in flight in all.
    pub streams: usize,
    /// How long it ran, seconds.
    pub duration_s: f64,
    /// Decided calls per second.
    pub decided_rps: f64,
    /// Calls without a decision.
    pub errors: u64,
    /// Round trips under that load.
    pub latency: Latency,
}

/// What can stop a scenario.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Starting or probing the cluster failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The load could not run.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The max-throughput load could not run.
    #[error(transparent)]
    ClosedLoop(#[from] ClosedLoopError),
    /// A helper task failed (e.g. redis-server did not start: the message says why).
    #[error("{what}: {source}")]
    Task {
        /// What the task did.
        what: &'static str,
        /// How it failed.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A node crashed during the run.
    #[error("{label}: node {node} exited during the run ({status})\n--- stderr ---\n{stderr}")]
    NodeExited {
        /// The strategy run.
        label: String,
        /// The node.
        node: usize,
        /// How it exited.
        status: std::process::ExitStatus,
        /// Its logs.
        stderr: String,
    },
    /// Writing a result failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error(transparent)]
    Plot(#[from] PlotError),
}

fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> RunError {
    move |source| RunError::Task { what, source }
}

/// Runs every strategy of `scenario`, then writes `results.json`, `results.md`,
/// `admitted.svg` and `latency-cdf.svg` under `options.out/<name>/`.
///
/// Needs a multi-thread tokio runtime: events that block (a node restart waiting for its
/// listening line, Redis coming back) run in place on their worker thread.
pub async fn run(
    scenario: &Scenario,
    options: &Options,
    bars: &MultiProgress,
) -> Result<ScenarioResult, RunError> {
    let started_unix_s = unix_micros(SystemTime::now()) / 1_000_000;
    let mut results = Vec::with_capacity(scenario.strategies.len());
    for run in &scenario.strategies {
        results.push(run_strategy(scenario, run, options, bars).await?);
    }
    let result = ScenarioResult {
        scenario: scenario.clone(),
        machine: Machine::here(),
        started_unix_s,
        results,
    };
    write(&result, &options.out.join(&scenario.name))?;
    Ok(result)
}

fn bar(bars: &MultiProgress, prefix: String, len_ms: u64) -> ProgressBar {
    let bar = bars.add(ProgressBar::new(len_ms.max(1)));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>28} [{bar:30}] {elapsed:>4} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// Moves `bar` with the clock until dropped (the ticker stops with the returned handle).
fn tick_with_clock(bar: &ProgressBar) -> tokio::task::JoinHandle<()> {
    let bar = bar.clone();
    let start = std::time::Instant::now();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(200));
        while !bar.is_finished() {
            every.tick().await;
            bar.set_position(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
        }
    })
}

async fn sleep_until_unix(at_us: u64) {
    let wait = at_us.saturating_sub(unix_micros(SystemTime::now()));
    tokio::time::sleep(Duration::from_micros(wait)).await;
}

async fn run_strategy(
    scenario: &Scenario,
    run: &StrategyRun,
    options: &Options,
    bars: &MultiProgress,
) -> Result<StrategyResult, RunError> {
    let label = run.label();
    let nodes = run.nodes(scenario);
    let mut env = run.env(scenario);
    let start_bar = bar(bars, format!("{} {label}: start", scenario.name), 1);
    start_bar.set_message(format!("{nodes} node(s)"));
    let redis = if run.strategy == Strategy::Redis {
        let server = tokio::task::spawn_blocking(RedisServer::start)
            .await
            .map_err(task("starting redis-server"))?;
        env.push(("HIVEMIND_REDIS__URL".into(), server.url()));
        Some(server)
    } else {
        None
    };
    let rules = match scenario.keys.dist() {
        Some(_) => bench_rules_per_value(scenario.limit, scenario.unit),
        None => bench_rules(scenario.limit, scenario.unit),
    };
    let mut spec = ClusterSpec::new(&options.binary, run.strategy, nodes, rules);
    spec.env.clone_from(&env);
    let mut cluster = tokio::task::spawn_blocking(move || Cluster::start(&spec))
        .await
        .map_err(task("starting the cluster"))??;
    cluster.wait_formed(READY_TIMEOUT).await?;
    start_bar.finish_with_message("ready");

    // The paced phase, from a window boundary at least 300 ms away (to connect the clients).
    let window = scenario.window();
    let wu = window_micros(window);
    let now_us = unix_micros(SystemTime::now());
    let mut first = window_index(now_us, wu) + 1;
    if first * wu - now_us < 300_000 {
        first += 1;
    }
    let load_start_us = first * wu;
    let measured =
        first + scenario.warmup_windows..first + scenario.warmup_windows + scenario.windows;
    let tail_us = window_micros((window / 2).min(Duration::from_millis(50)));
    let end_us = measured.end * wu + tail_us;
    let mut workload = Workload::new(
        DOMAIN,
        vec![(KEY.to_owned(), VALUE.to_owned())],
        scenario.target_rps(),
        Duration::from_micros(end_us - load_start_us),
    );
    workload.keys = scenario.keys.dist();
    match &scenario.spread {
        Spread::Even => {}
        Spread::Weights(w) => workload.weights.clone_from(w),
        Spread::Sticky => workload.sticky = true,
    }
    workload.clients_per_node = scenario.clients_per_node;
    workload.request_timeout = scenario.request_timeout;
    workload.start_at_us = Some(load_start_us);

    let targets = cluster.grpc_addrs();
    let admins: Vec<SocketAddr> = (0..cluster.len())
        .filter_map(|i| cluster.node(i).map(|n| n.admin))
        .collect();
    let measured_start_us = measured.start * wu;
    let measured_end_us = measured.end * wu;
    let events = scenario.events.clone();
    let events_task = tokio::spawn(async move {
        let mut cluster = cluster;
        let mut redis = redis;
        let mut done = Vec::with_capacity(events.len());
        for event in events {
            sleep_until_unix(measured_start_us + window_micros(event.at)).await;
            let at_us = unix_micros(SystemTime::now());
            let error = act(&mut cluster, redis.as_mut(), event.action);
            done.push((event.action, at_us, error));
        }
        (cluster, redis, done)
    });
    let stats_task = (run.strategy == Strategy::Gossip).then(|| {
        let admins = admins.clone();
        tokio::spawn(async move {
            sleep_until_unix(measured_start_us).await;
            let before = bytes_sent(&admins).await;
            sleep_until_unix(measured_end_us).await;
            let after = bytes_sent(&admins).await;
            (before, after)
        })
    });

    let load_bar = bar(
        bars,
        format!("{} {label}: load", scenario.name),
        (end_us - now_us) / 1_000,
    );
    load_bar.set_message(format!("{:.0} req/s", scenario.target_rps()));
    let ticker = tick_with_clock(&load_bar);
    let load = workload::run(&workload, &targets).await;
    load_bar.finish();
    ticker.abort();
    let (mut cluster, redis, done) = events_task.await.map_err(task("running the events"))?;
    let load = load?;

    let gossip_bytes_per_node_per_s = match stats_task {
        Some(t) => {
            let (before, after) = t.await.map_err(task("reading /stats"))?;
            let deltas: Vec<u64> = before
                .iter()
                .zip(&after)
                .filter_map(|(b, a)| Some(a.as_ref()?.saturating_sub(*b.as_ref()?)))
                .collect();
            let secs = (measured_end_us - measured_start_us) as f64 / 1e6;
            (!deltas.is_empty())
                .then(|| deltas.iter().sum::<u64>() as f64 / deltas.len() as f64 / secs)
        }
        None => None,
    };

    let range = first..measured.end;
    let per_key = figures::cells(&load.observations, scenario.limit, window, range.clone());
    let mut figures = figures::figures(
        &load.observations,
        &per_key,
        scenario.limit,
        window,
        measured.clone(),
    );
    figures.skipped = load.skipped;
    let series = figures::series(&per_key, scenario.limit, window, range, measured.clone());
    let end_s = (measured.end - first) as f64 * window.as_secs_f64();
    let t_of = |us: u64| us.saturating_sub(load_start_us) as f64 / 1e6;
    let first_event_s = done.first().map_or(end_s, |(_, at, _)| t_of(*at));
    let convergence_after_start_s = figures::convergence(&series, window, 0.0, first_event_s);
    let events: Vec<EventResult> = done
        .iter()
        .enumerate()
        .map(|(i, (action, at_us, error))| {
            let t_s = t_of(*at_us);
            let until = done.get(i + 1).map_or(end_s, |(_, at, _)| t_of(*at));
            EventResult {
                action: action.describe(),
                t_s,
                error: error.clone(),
                heals: action.heals(),
                convergence_s: if action.heals() {
                    figures::convergence(&series, window, t_s, until)
                } else {
                    None
                },
            }
        })
        .collect();
    let latency_cdf = figures::cdf(&figures::intended_histogram(
        &load.observations,
        window,
        measured,
    ));
    drop(load);

    let max_throughput = match &scenario.max_throughput {
        Some(m) => Some(max_throughput(scenario, &label, m, &cluster, bars).await?),
        None => None,
    };
    if let Some((node, status, stderr)) = cluster.exited().into_iter().next() {
        return Err(RunError::NodeExited {
            label,
            node,
            status,
            stderr,
        });
    }
    drop(cluster);
    drop(redis);
    Ok(StrategyResult {
        label,
        strategy: run.strategy.as_str().to_owned(),
        nodes,
        env,
        figures,
        gossip_bytes_per_node_per_s,
        convergence_after_start_s,
        events,
        max_throughput,
        series,
        latency_cdf,
    })
}

/// Carries out one event; what went wrong, if anything. Blocking steps (a restart waits for
/// the node's listening line) run in place on this worker thread.
fn act(cluster: &mut Cluster, redis: Option<&mut RedisServer>, action: Action) -> Option<String> {
    let result = match action {
        Action::KillNode(n) => cluster.kill(n),
        Action::PauseNode(n) => cluster.pause(n),
        Action::ResumeNode(n) => cluster.resume(n),
        Action::RestartNode(n) => tokio::task::block_in_place(|| cluster.restart(n)),
        Action::StopRedis | Action::StartRedis => {
            let Some(redis) = redis else {
                return Some("no redis-server in this run".into());
            };
            // The testkit's Redis launcher panics on failure (it is built for tests): keep a
            // failed restart an event error, not the end of the run.
            let outcome = tokio::task::block_in_place(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match action {
                    Action::StopRedis => redis.kill(),
                    _ => redis.restart(),
                }))
            });
            return outcome.err().map(|_| "redis-server did not restart".into());
        }
    };
    result.err().map(|e| e.to_string())
}

/// Every node's `bytes_sent` from `GET /stats` (`backend.mesh.transport` or wherever the
/// strategy puts it), `None` for a node that did not answer.
async fn bytes_sent(admins: &[SocketAddr]) -> Vec<Option<u64>> {
    let mut out = Vec::with_capacity(admins.len());
    for &admin in admins {
        let value = match http::get(admin, "/stats", Duration::from_secs(1)).await {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|json| find_u64(&json["backend"], "bytes_sent")),
            _ => None,
        };
        out.push(value);
    }
    out
}

/// The first number under key `name` anywhere in `json` (depth-first).
fn find_u64(json: &serde_json::Value, name: &str) -> Option<u64> {
    match json {
        serde_json::Value::Object(map) => map
            .get(name)
            .and_then(serde_json::Value::as_u64)
            .or_else(|| map.values().find_map(|v| find_u64(v, name))),
        serde_json::Value::Array(items) => items.iter().find_map(|v| find_u64(v, name)),
        _ => None,
    }
}

/// The closed-loop phase, on the light HTTP/2 client of [`crate::closed_loop`] (the same
/// requests and keys as the paced phase): decided calls per second and their round trips.
async fn max_throughput(
    scenario: &Scenario,
    label: &str,
    m: &crate::scenario::MaxThroughput,
    cluster: &Cluster,
    bars: &MultiProgress,
) -> Result<Throughput, RunError> {
    let targets: Vec<SocketAddr> = cluster.live().map(|n| n.grpc).collect();
    // Only for its requests (one per key): the phase itself is unpaced.
    let mut workload = Workload::new(
        DOMAIN,
        vec![(KEY.to_owned(), VALUE.to_owned())],
        1.0,
        m.duration,
    );
    workload.keys = scenario.keys.dist();
    let load = ClosedLoop {
        requests: workload.requests(),
        keys: workload.keys,
        connections_per_target: m.clients_per_node,
        in_flight: m.streams_per_client,
        duration: m.duration,
        // Far more than a loopback server answers in that time, within the paced phases'
        // bound on planned calls.
        max_calls_per_stream: (workload::MAX_PLANNED_CALLS as u64)
            / (targets.len() * m.clients_per_node * m.streams_per_client).max(1) as u64,
        request_timeout: scenario.request_timeout,
        connect_timeout: workload.connect_timeout,
        seed: workload.seed,
    };
    let bar = bar(
        bars,
        format!("{} {label}: max throughput", scenario.name),
        u64::try_from(m.duration.as_millis()).unwrap_or(u64::MAX),
    );
    let ticker = tick_with_clock(&bar);
    let tally = closed_loop::run(&load, &targets).await;
    bar.finish();
    ticker.abort();
    let tally = tally?;
    let secs = m.duration.as_secs_f64();
    Ok(Throughput {
        clients: targets.len() * m.clients_per_node,
        streams: targets.len() * m.clients_per_node * m.streams_per_client,
        duration_s: secs,
        decided_rps: tally.decided() as f64 / secs,
        errors: tally.error_total(),
        latency: Latency::of(&tally.latency_us),
    })
}

fn pct(x: f64) -> String {
    format!("{x:.2} %")
}

fn opt_s(x: Option<f64>) -> String {
    x.map_or("not converged".into(), |s| format!("{s:.1} s"))
}

impl ScenarioResult {
    /// The results table (one row per strategy) and the events, as markdown.
    pub fn to_markdown(&self) -> String {
        let s = &self.scenario;
        let mut out = String::new();
        let spread = match &s.spread {
            Spread::Even => "even".to_owned(),
            Spread::Weights(w) => format!("weights {w:?}"),
            Spread::Sticky => "sticky".to_owned(),
        };
        let keys = match s.keys.zipf {
            Some(e) => format!("{} keys, Zipf {e}", s.keys.count),
            None => format!("{} key(s), uniform", s.keys.count),
        };
        let _ = writeln!(
            out,
            "### {}\n\n{}{}limit {} per {} per key, load {}× ({:.0} req/s), {keys}, spread {spread}, \
             {} measured windows after {} warm-up; {} CPUs shared by client and servers.\n",
            s.name,
            s.description.trim(),
            if s.description.trim().is_empty() { "" } else { "\n\n" },
            s.limit,
            s.unit.as_str(),
            s.load,
            s.target_rps(),
            s.windows,
            s.warmup_windows,
            self.machine.cpus,
        );
        out.push_str(
            "| strategy | nodes | overshoot mean | overshoot worst | false rej. | p50 / p99 / p99.9 | \
             offered / decided (skipped) | max throughput | gossip B/node/s | convergence | errors |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for r in &self.results {
            let f = &r.figures;
            let errors = if f.errors.is_empty() {
                "0".to_owned()
            } else {
                f.errors
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut convergence = format!("start {}", opt_s(r.convergence_after_start_s));
            for e in r.events.iter().filter(|e| e.heals) {
                let _ = write!(convergence, "; {} {}", e.action, opt_s(e.convergence_s));
            }
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} / {} / {} µs | {:.0} / {:.0} ({}) | {} | {} | {} | {} |",
                r.label,
                r.nodes,
                pct(f.overshoot_mean_pct),
                pct(f.overshoot_worst_pct),
                pct(f.false_rejection_pct),
                f.latency.p50_us,
                f.latency.p99_us,
                f.latency.p999_us,
                f.offered_rps,
                f.decided_rps,
                f.skipped,
                r.max_throughput.as_ref().map_or("–".into(), |t| {
                    if t.errors == 0 {
                        format!("{:.0} /s", t.decided_rps)
                    } else {
                        format!("{:.0} /s ({} errors)", t.decided_rps, t.errors)
                    }
                }),
                r.gossip_bytes_per_node_per_s
                    .map_or("–".into(), |b| format!("{b:.0}")),
                convergence,
                errors,
            );
        }
        let failed: Vec<String> = self
            .results
            .iter()
            .flat_map(|r| {
                r.events.iter().filter_map(move |e| {
                    e.error.as_ref().map(|why| {
                        format!(
                            "- {}: {} at {:.1} s failed: {why}",
                            r.label, e.action, e.t_s
                        )
                    })
                })
            })
            .collect();
        if !failed.is_empty() {
            let _ = writeln!(out, "\nEvents that failed:\n{}", failed.join("\n"));
        }
        out
    }
}

/// Writes the JSON, the markdown and both plots into `dir`.
pub fn write(result: &ScenarioResult, dir: &Path) -> Result<(), RunError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| RunError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let json = dir.join("results.json");
    let text = serde_json::to_string_pretty(result).map_err(|e| RunError::Io {
        path: json.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&json, text + "\n").map_err(io(&json))?;
    let md = dir.join("results.md");
    std::fs::write(&md, result.to_markdown()).map_err(io(&md))?;

    let name = &result.scenario.name;
    let admitted: Vec<Line> = result
        .results
        .iter()
        .map(|r| Line {
            label: r.label.clone(),
            points: r
                .series
                .iter()
                .map(|p| (p.t_s, p.key0_admitted as f64))
                .collect(),
        })
        .collect();
    let mut events: BTreeMap<String, (f64, String)> = BTreeMap::new();
    for r in &result.results {
        for e in &r.events {
            events
                .entry(e.action.clone())
                .or_insert((e.t_s, e.action.clone()));
        }
    }
    let events: Vec<(f64, String)> = events.into_values().collect();
    plots::admitted(
        &dir.join("admitted.svg"),
        &format!("{name}: admitted per window (key 0) against the limit"),
        result.scenario.limit,
        &admitted,
        &events,
    )?;
    let cdf: Vec<Line> = result
        .results
        .iter()
        .map(|r| Line {
            label: r.label.clone(),
            points: r
                .latency_cdf
                .iter()
                .map(|&(us, q)| (us as f64, q))
                .collect(),
        })
        .collect();
    plots::latency_cdf(
        &dir.join("latency-cdf.svg"),
        &format!("{name}: decision latency CDF (intended send time)"),
        &cdf,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_sent_is_found_wherever_the_strategy_nests_it() {
        let json: serde_json::Value = serde_json::json!({
            "backend": {"mesh": {"peers": [1, 2], "transport": {"bytes_sent": 1234}}}
        });
        assert_eq!(find_u64(&json["backend"], "bytes_sent"), Some(1234));
        assert_eq!(
            find_u64(&serde_json::json!({"x": [{"bytes_sent": 5}]}), "bytes_sent"),
            Some(5)
        );
        assert_eq!(
            find_u64(&serde_json::json!({"bytes_sent": "many"}), "bytes_sent"),
            None
        );
    }
}
