//! hivemind-harness: a small, bounded load generator that measures what a distributed rate
//! limiter costs.
//!
//! The figures are **overshoot** (admitted beyond the limit per window), **false rejections**
//! (rejected although an exact limiter would have admitted), latency and throughput. The ground
//! truth is what the clients saw admitted per window, never the servers' own counters. The parts:
//!
//! - [`cluster`]: N real `hivemind` processes on loopback, with their rules, flags and env;
//! - [`workload`]: paced gRPC clients offering a rate spread over the nodes;
//! - [`closed_loop`]: the max-throughput phase's client, HTTP/2 directly, as light as h2load;
//! - [`truth`]: per-window ground truth from the clients' observations;
//! - [`report`]: the summary and per-window table, as markdown and JSON;
//! - [`experiment`]: the standard run that ties them together (used by the `overshoot` binary);
//! - [`keys`]: which key each call carries (uniform or Zipf, sticky per node);
//! - [`scenario`]: scenario files (`benches/scenarios/*.yaml`);
//! - [`figures`]: a scenario's figures per strategy, from the clients' observations;
//! - [`plots`]: SVG plots of admitted per window and latency CDFs;
//! - [`run`]: runs a scenario on every strategy it lists (the `hivemind-harness` binary);
//! - [`sweep`]: a grid of experiments, overshoot and false rejections per cell (the `accuracy`
//!   binary).

pub mod closed_loop;
pub mod cluster;
pub mod experiment;
pub mod figures;
pub mod keys;
pub mod plots;
pub mod report;
pub mod run;
pub mod scenario;
pub mod sweep;
pub mod truth;
pub mod workload;

pub use cluster::{
    build_hivemind, default_binary, parse_env_var, Cluster, ClusterError, ClusterSpec, Health,
    Node, Profile, Strategy,
};
pub use experiment::{
    bench_rules, bench_rules_many, bench_rules_per_value, Experiment, ExperimentError,
};
pub use report::{Latency, Report, ReportError, RunInfo, Summary};
pub use scenario::{Scenario, ScenarioError};
pub use truth::{analyse, Observation, Outcome, WindowTruth};
pub use workload::{Load, Workload, WorkloadError};
