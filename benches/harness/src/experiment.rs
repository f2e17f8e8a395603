//! One overshoot run, end to end: rules → cluster → warm-up → measured windows → report.
//!
//! The pieces ([`crate::cluster`], [`crate::workload`], [`crate::truth`], [`crate::report`])
//! stay usable on their own; this module fixes the shape of the standard experiment so that
//! the `overshoot` binary and the tests measure the same thing:
//!
//! - one descriptor, `generic_key=bench` in domain `bench`, limited to `limit` per `unit`;
//! - load at `load × limit` per window, spread over every node;
//! - the load starts at once; the rest of the current (partial) window and `warmup_windows`
//!   full windows are not measured; then `windows` full windows are; the load stops shortly
//!   after the last measured window ends. Windows are the server's: epoch-aligned.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, SystemTime};

use hivemind_core::Unit;

use crate::cluster::{Cluster, ClusterError, ClusterSpec, Strategy};
use crate::report::{Report, RunInfo};
use crate::truth::{self, window_micros};
use crate::workload::{self, unix_micros, Workload, WorkloadError};

/// The domain of the benchmark rules.
pub const DOMAIN: &str = "bench";
/// The descriptor key every call sends.
pub const KEY: &str = "generic_key";
/// The descriptor value every call sends.
pub const VALUE: &str = "bench";

/// The rules file of the standard experiment: `generic_key=bench` limited to `limit` per
/// `unit` in domain `bench`.
pub fn bench_rules(limit: u64, unit: Unit) -> String {
    format!(
        "domain: {DOMAIN}\ndescriptors:\n  - key: {KEY}\n    value: {VALUE}\n    rate_limit:\n      \
         unit: {unit}\n      requests_per_unit: {limit}\n"
    )
}

/// The rules file of a many-key scenario: `generic_key` without a value, so that every value
/// (`bench-0`, `bench-1`, …) has its own counter limited to `limit` per `unit`.
pub fn bench_rules_per_value(limit: u64, unit: Unit) -> String {
    format!(
        "domain: {DOMAIN}\ndescriptors:\n  - key: {KEY}\n    rate_limit:\n      unit: {unit}\n      \
         requests_per_unit: {limit}\n"
    )
}

/// A rules file with one `generic_key` descriptor per `(value, limit, unit)`, in domain `bench`.
pub fn bench_rules_many(descriptors: &[(String, u64, Unit)]) -> String {
    let mut yaml = format!("domain: {DOMAIN}\ndescriptors:\n");
    for (value, limit, unit) in descriptors {
        yaml.push_str(&format!(
            "  - key: {KEY}\n    value: {value}\n    rate_limit:\n      unit: {unit}\n      \
             requests_per_unit: {limit}\n"
        ));
    }
    yaml
}

/// A standard overshoot experiment.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// The server executable.
    pub binary: PathBuf,
    /// Strategy every node runs.
    pub strategy: Strategy,
    /// Number of nodes.
    pub nodes: usize,
    /// Admissions allowed per window, cluster-wide.
    pub limit: u64,
    /// The limit's unit: sets the window length.
    pub unit: Unit,
    /// Offered load as a multiple of the limit (2.0 = twice what may be admitted).
    pub load: f64,
    /// Relative load per node (empty: even).
    pub weights: Vec<f64>,
    /// Clients (connections) per node.
    pub clients_per_node: usize,
    /// Full windows of load before measuring, so the cluster (and gossip) reach steady state.
    pub warmup_windows: u64,
    /// Windows measured.
    pub windows: u64,
    /// Extra flags for every node.
    pub args: Vec<String>,
    /// Extra environment for every node (`HIVEMIND_MESH__GOSSIP_INTERVAL=100ms`, …).
    pub env: Vec<(String, String)>,
    /// Bound on the cluster answering its health checks after start.
    pub ready_timeout: Duration,
    /// Bound on each call.
    pub request_timeout: Duration,
    /// The descriptor value every call sends ([`VALUE`] by default): several experiments can
    /// share one cluster on different keys (see [`crate::sweep`]).
    pub value: String,
}

/// What can stop an experiment.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// The parameters make no sense.
    #[error("invalid experiment: {0}")]
    Invalid(String),
    /// Starting or probing the cluster failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The load could not run.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// A server died during the run, so its figures mean nothing.
    #[error("node {node} exited during the run ({status})\n--- stderr ---\n{stderr}")]
    NodeExited {
        /// The node index.
        node: usize,
        /// How it exited.
        status: ExitStatus,
        /// Its logs.
        stderr: String,
    },
    /// A background task failed.
    #[error("task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl Experiment {
    /// An experiment with load 2×, 4 clients per node, 1 warm-up window, 20 measured windows,
    /// no extra args or env, a 30 s ready timeout and a 1 s call timeout.
    pub fn new(
        binary: impl Into<PathBuf>,
        strategy: Strategy,
        nodes: usize,
        limit: u64,
        unit: Unit,
    ) -> Self {
        Experiment {
            binary: binary.into(),
            strategy,
            nodes,
            limit,
            unit,
            load: 2.0,
            weights: Vec::new(),
            clients_per_node: 4,
            warmup_windows: 1,
            windows: 20,
            args: Vec::new(),
            env: Vec::new(),
            ready_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(1),
            value: VALUE.to_owned(),
        }
    }

    /// One window: the unit's length.
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.unit.seconds())
    }

    /// The total offered rate, calls per second.
    pub fn target_rps(&self) -> f64 {
        self.load * self.limit as f64 / self.window().as_secs_f64()
    }

    /// Load that keeps going after the last measured window, so it ends like the others.
    fn tail(&self) -> Duration {
        (self.window() / 2).min(Duration::from_millis(50))
    }

    /// The longest the load phase can take: the partial window, warm-up, measured windows and
    /// the tail (cluster start and readiness come on top, bounded by their own timeouts).
    pub fn planned_load_time(&self) -> Duration {
        self.window() * (1 + self.warmup_windows + self.windows) as u32 + self.tail()
    }

    /// The cluster this experiment runs on.
    pub fn cluster_spec(&self) -> ClusterSpec {
        let mut spec = ClusterSpec::new(
            &self.binary,
            self.strategy,
            self.nodes,
            bench_rules(self.limit, self.unit),
        );
        spec.args.clone_from(&self.args);
        spec.env.clone_from(&self.env);
        spec
    }

    /// The run's description for the report.
    pub fn run_info(&self) -> RunInfo {
        RunInfo {
            strategy: self.strategy.as_str().to_owned(),
            nodes: self.nodes,
            limit: self.limit,
            unit: self.unit.as_str().to_owned(),
            window_secs: self.window().as_secs_f64(),
            load: self.load,
            target_rps: self.target_rps(),
            weights: self.weights.clone(),
            clients_per_node: self.clients_per_node,
            windows: self.windows,
            warmup_windows: self.warmup_windows,
            env: self.env.clone(),
            args: self.args.clone(),
        }
    }

    fn validate(&self) -> Result<(), ExperimentError> {
        let bad = |why: String| Err(ExperimentError::Invalid(why));
        if self.nodes == 0 {
            return bad("at least one node".into());
        }
        if self.limit == 0 {
            return bad("the limit must be at least 1 (0 blocks everything)".into());
        }
        if !(self.load.is_finite() && self.load > 0.0) {
            return bad(format!("load must be positive, got {}", self.load));
        }
        if self.windows == 0 {
            return bad("at least one measured window".into());
        }
        if self.warmup_windows + self.windows > 10_000 {
            return bad("more than 10,000 windows".into());
        }
        Ok(())
    }

    /// Starts the cluster, waits until it is formed (every node healthy; for gossip, every node
    /// seeing all the others), runs, and stops the cluster.
    pub async fn run(&self) -> Result<Report, ExperimentError> {
        self.validate()?;
        let spec = self.cluster_spec();
        let mut cluster = tokio::task::spawn_blocking(move || Cluster::start(&spec)).await??;
        cluster.wait_formed(self.ready_timeout).await?;
        self.run_on(&mut cluster).await
    }

    /// Runs the load on an already started (and ready) cluster: for runs that prepare the
    /// cluster themselves (their own readiness check, a node to kill later).
    pub async fn run_on(&self, cluster: &mut Cluster) -> Result<Report, ExperimentError> {
        let report = self.run_load(&cluster.grpc_addrs()).await?;
        if let Some((node, status, stderr)) = cluster.exited().into_iter().next() {
            return Err(ExperimentError::NodeExited {
                node,
                status,
                stderr,
            });
        }
        Ok(report)
    }

    /// Runs the load against `targets` (the nodes' gRPC addresses) and reports; the caller
    /// checks that no node exited meanwhile. Several can run at once on one cluster, each on
    /// its own descriptor [`value`](Self::value).
    pub async fn run_load(
        &self,
        targets: &[std::net::SocketAddr],
    ) -> Result<Report, ExperimentError> {
        self.validate()?;
        let window = self.window();
        let wu = window_micros(window);
        let now_us = unix_micros(SystemTime::now());
        let first = truth::window_index(now_us, wu) + 1 + self.warmup_windows;
        let measured = first..first + self.windows;
        let tail_us = window_micros(self.tail());
        let end_us = measured.end * wu + tail_us;
        let duration = Duration::from_micros(end_us.saturating_sub(now_us));

        let mut workload = Workload::new(
            DOMAIN,
            vec![(KEY.to_owned(), self.value.clone())],
            self.target_rps(),
            duration,
        );
        workload.weights.clone_from(&self.weights);
        workload.clients_per_node = self.clients_per_node;
        workload.request_timeout = self.request_timeout;

        let load = workload::run(&workload, targets).await?;
        let windows = truth::analyse(&load.observations, self.limit, window, Some(measured));
        Ok(Report::new(
            self.run_info(),
            self.limit,
            window,
            windows,
            &load,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_rules_name_the_descriptor_and_limit() {
        let yaml = bench_rules(1000, Unit::Second);
        assert_eq!(
            yaml,
            "domain: bench\ndescriptors:\n  - key: generic_key\n    value: bench\n    \
             rate_limit:\n      unit: second\n      requests_per_unit: 1000\n"
        );
    }

    #[test]
    fn rate_and_runtime_follow_the_unit() {
        let mut e = Experiment::new("hivemind", Strategy::Standalone, 3, 1000, Unit::Second);
        e.load = 2.0;
        e.windows = 10;
        assert_eq!(e.target_rps(), 2000.0);
        assert_eq!(e.planned_load_time(), Duration::from_millis(12_050));
        let e = Experiment::new("hivemind", Strategy::Standalone, 3, 600, Unit::Minute);
        assert_eq!(e.target_rps(), 20.0);
    }

    #[test]
    fn nonsense_is_refused_before_anything_starts() {
        let ok = Experiment::new("hivemind", Strategy::Standalone, 1, 10, Unit::Second);
        assert!(ok.validate().is_ok());
        for broken in [
            Experiment {
                nodes: 0,
                ..ok.clone()
            },
            Experiment {
                limit: 0,
                ..ok.clone()
            },
            Experiment {
                load: 0.0,
                ..ok.clone()
            },
            Experiment {
                windows: 0,
                ..ok.clone()
            },
        ] {
            assert!(matches!(
                broken.validate(),
                Err(ExperimentError::Invalid(_))
            ));
        }
    }
}
