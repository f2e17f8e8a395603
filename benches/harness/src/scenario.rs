//! Scenario files (`benches/scenarios/*.yaml`): what one comparison runs.
//!
//! A scenario fixes the workload (limit and unit, keys and their distribution, offered load as
//! a multiple of the limit, traffic spread over the nodes, windows) and lists the strategies to
//! run it against, each with its own settings; every strategy gets the same workload, the same
//! key sequence (one seed) and the same timed events. Unknown fields are refused, and a bad
//! file fails with the field's path and line (`strategies[1].on_failure: unknown variant …`).
//!
//! ```yaml
//! name: steady-2x
//! limit: 500            # per key and window
//! unit: second
//! load: 2.0             # offered: 2 × the limit per window, over all keys
//! nodes: 3
//! windows: 8            # measured, after `warmup_windows` (default 1)
//! keys: { count: 1 }    # or { count: 10000, zipf: 1.0 }
//! spread: even          # or { weights: [0.8, 0.1, 0.1] } or sticky
//! strategies:
//!   - strategy: standalone
//!   - strategy: gossip
//!     gossip_interval: 100ms
//!   - strategy: redis
//!     on_failure: local
//! events:
//!   - { at: 3s, kill_node: 1 }
//! max_throughput: { duration: 3s, clients_per_node: 8 }
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hivemind_core::Unit;
use serde::{Deserialize, Serialize};

use crate::cluster::Strategy;
use crate::keys::KeyDist;

/// One scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name: the results folder and the plots' titles.
    pub name: String,
    /// What the scenario shows, for the report.
    #[serde(default)]
    pub description: String,
    /// Admissions allowed per key and window.
    pub limit: u64,
    /// The limit's unit (`second`, `minute`, …): the window length.
    #[serde(with = "unit_name")]
    pub unit: Unit,
    /// Offered load over all keys as a multiple of one key's limit per window.
    pub load: f64,
    /// Nodes per strategy (a strategy may override it).
    pub nodes: usize,
    /// Measured windows.
    pub windows: u64,
    /// Full windows of load before the measured ones (the load starts on a window boundary).
    #[serde(default = "default_warmup")]
    pub warmup_windows: u64,
    /// Clients (HTTP/2 connections) per node.
    #[serde(default = "default_clients")]
    pub clients_per_node: usize,
    /// The keys the calls carry.
    #[serde(default)]
    pub keys: Keys,
    /// How the load is spread over the nodes (`even`, `sticky` or `{ weights: [...] }`).
    #[serde(default, with = "serde_yaml::with::singleton_map")]
    pub spread: Spread,
    /// Per-call timeout.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The strategies to compare, each run on a fresh cluster.
    pub strategies: Vec<StrategyRun>,
    /// Timed events, relative to the start of the first measured window.
    #[serde(default)]
    pub events: Vec<Event>,
    /// A closed-loop phase after the paced one, for maximum throughput.
    #[serde(default)]
    pub max_throughput: Option<MaxThroughput>,
}

fn default_warmup() -> u64 {
    1
}
fn default_clients() -> usize {
    2
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(1)
}

/// How many keys, and how calls pick one.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Keys {
    /// Distinct descriptor values, each limited on its own.
    pub count: usize,
    /// Zipf exponent (key `k` drawn ∝ `1/(k+1)^s`); absent: uniform.
    #[serde(default)]
    pub zipf: Option<f64>,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            count: 1,
            zipf: None,
        }
    }
}

impl Keys {
    /// The distribution the workload draws from (`None` for one key).
    pub fn dist(&self) -> Option<KeyDist> {
        if self.count <= 1 && self.zipf.is_none() {
            return None;
        }
        Some(match self.zipf {
            Some(s) => KeyDist::zipf(self.count, s),
            None => KeyDist::uniform(self.count),
        })
    }
}

/// How the offered load is spread over the nodes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Spread {
    /// The same rate to every node.
    #[default]
    Even,
    /// Relative rates per node, in node order (`[0.8, 0.1, 0.1]`).
    Weights(Vec<f64>),
    /// Each key to one node only (`key % nodes`).
    Sticky,
}

/// One strategy to run, with its settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyRun {
    /// Which strategy.
    #[serde(with = "strategy_name")]
    pub strategy: Strategy,
    /// Name in tables and plots (default: the strategy, with its node count if it overrides
    /// the scenario's).
    #[serde(default)]
    pub label: Option<String>,
    /// Nodes for this run instead of the scenario's.
    #[serde(default)]
    pub nodes: Option<usize>,
    /// Gossip only: `mesh.gossip_interval`.
    #[serde(default, with = "humantime_serde")]
    pub gossip_interval: Option<Duration>,
    /// Redis only: `redis.on_failure` (`allow`, `deny`, `error`, `local`).
    #[serde(default)]
    pub on_failure: Option<OnFailure>,
    /// Any other setting, as `HIVEMIND_*` environment (e.g. the overshoot mechanisms:
    /// `HIVEMIND_MESH__EXTRAPOLATE: "false"`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Redis failure policies (the server's `redis.on_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Admit while Redis is down.
    Allow,
    /// Reject while Redis is down.
    Deny,
    /// Answer `UNAVAILABLE` while Redis is down.
    Error,
    /// Local counters with the limit split over the nodes.
    Local,
}

impl OnFailure {
    /// The setting's value.
    pub const fn as_str(self) -> &'static str {
        match self {
            OnFailure::Allow => "allow",
            OnFailure::Deny => "deny",
            OnFailure::Error => "error",
            OnFailure::Local => "local",
        }
    }
}

impl StrategyRun {
    /// Nodes this run starts.
    pub fn nodes(&self, scenario: &Scenario) -> usize {
        self.nodes.unwrap_or(scenario.nodes)
    }

    /// The run's name in tables and plots.
    pub fn label(&self) -> String {
        if let Some(label) = &self.label {
            return label.clone();
        }
        match self.nodes {
            Some(n) => format!("{}-{n}", self.strategy.as_str()),
            None => self.strategy.as_str().to_owned(),
        }
    }

    /// The node environment these settings mean (the redis URL is added by the runner).
    pub fn env(&self, scenario: &Scenario) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![("RUST_LOG".into(), "warn".into())];
        if let Some(interval) = self.gossip_interval {
            env.push((
                "HIVEMIND_MESH__GOSSIP_INTERVAL".into(),
                format!("{}ms", interval.as_millis()),
            ));
        }
        if let Some(policy) = self.on_failure {
            env.push(("HIVEMIND_REDIS__ON_FAILURE".into(), policy.as_str().into()));
        }
        if self.strategy == Strategy::Redis {
            env.push((
                "HIVEMIND_REDIS__EXPECTED_NODES".into(),
                self.nodes(scenario).to_string(),
            ));
        }
        env.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }
}

/// One timed event: `at` after the first measured window starts, one action.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// When, from the start of the first measured window.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// What happens.
    #[serde(flatten)]
    pub action: Action,
}

/// What an event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// SIGKILL node N (no graceful leave).
    KillNode(usize),
    /// SIGSTOP node N: it stops talking, as in a partition.
    PauseNode(usize),
    /// SIGCONT node N.
    ResumeNode(usize),
    /// Start node N again on its addresses (killing it first if it runs).
    RestartNode(usize),
    /// Stop the Redis server (redis strategy only; ignored by the others).
    StopRedis,
    /// Start the Redis server again on its port.
    StartRedis,
}

impl Action {
    /// The event's name in reports.
    pub fn describe(self) -> String {
        match self {
            Action::KillNode(n) => format!("kill node {n}"),
            Action::PauseNode(n) => format!("pause node {n}"),
            Action::ResumeNode(n) => format!("resume node {n}"),
            Action::RestartNode(n) => format!("restart node {n}"),
            Action::StopRedis => "stop redis".into(),
            Action::StartRedis => "start redis".into(),
        }
    }

    /// Whether this event ends a disturbance, so that convergence is measured from it (a
    /// resume, a restart, Redis back).
    pub fn heals(self) -> bool {
        matches!(
            self,
            Action::ResumeNode(_) | Action::RestartNode(_) | Action::StartRedis
        )
    }
}

/// The closed-loop phase.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MaxThroughput {
    /// How long it runs.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Connections per node.
    #[serde(default = "default_max_clients")]
    pub clients_per_node: usize,
    /// Calls in flight per connection (HTTP/2 streams, as h2load's `-m`).
    #[serde(default = "default_max_streams")]
    pub streams_per_client: usize,
}

fn default_max_clients() -> usize {
    8
}

fn default_max_streams() -> usize {
    1
}

/// A scenario file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid YAML for a scenario (the message names the field and line).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// serde_yaml's error: field path, problem, line and column.
        #[source]
        source: serde_yaml::Error,
    },
    /// Valid YAML, but values that make no sense.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// Which field and why.
        why: String,
    },
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: name.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ScenarioError::Parse { source, .. } => ScenarioError::Parse { path: name, source },
            ScenarioError::Invalid { why, .. } => ScenarioError::Invalid { path: name, why },
            other => other,
        })
    }

    /// Parses and checks scenario YAML.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario =
            serde_yaml::from_str(text).map_err(|source| ScenarioError::Parse {
                path: "<scenario>".into(),
                source,
            })?;
        scenario.validate().map_err(|why| ScenarioError::Invalid {
            path: "<scenario>".into(),
            why,
        })?;
        Ok(scenario)
    }

    /// One window.
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.unit.seconds())
    }

    /// Total offered rate, calls per second.
    pub fn target_rps(&self) -> f64 {
        self.load * self.limit as f64 / self.window().as_secs_f64()
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(format!(
                "name: {:?} must be non-empty letters, digits, - or _",
                self.name
            ));
        }
        if self.limit == 0 {
            return Err("limit: must be at least 1".into());
        }
        if !(self.load.is_finite() && self.load > 0.0) {
            return Err(format!("load: must be positive, got {}", self.load));
        }
        if self.windows == 0 || self.warmup_windows + self.windows > 10_000 {
            return Err("windows: between 1 and 10,000 (with warmup_windows)".into());
        }
        if self.clients_per_node == 0 {
            return Err("clients_per_node: at least 1".into());
        }
        if self.keys.count == 0 || self.keys.count > crate::keys::MAX_KEYS {
            return Err(format!(
                "keys.count: between 1 and {}",
                crate::keys::MAX_KEYS
            ));
        }
        if self.keys.zipf.is_some_and(|s| !(s.is_finite() && s >= 0.0)) {
            return Err("keys.zipf: a finite exponent ≥ 0".into());
        }
        if self.strategies.is_empty() {
            return Err("strategies: at least one".into());
        }
        let mut labels = std::collections::BTreeSet::new();
        for (i, run) in self.strategies.iter().enumerate() {
            let nodes = run.nodes(self);
            if nodes == 0 || nodes > 64 {
                return Err(format!("strategies[{i}].nodes: between 1 and 64"));
            }
            if !labels.insert(run.label()) {
                return Err(format!(
                    "strategies[{i}]: label {:?} used twice (set `label`)",
                    run.label()
                ));
            }
            if run.gossip_interval.is_some() && run.strategy != Strategy::Gossip {
                return Err(format!("strategies[{i}].gossip_interval: gossip only"));
            }
            if run.on_failure.is_some() && run.strategy != Strategy::Redis {
                return Err(format!("strategies[{i}].on_failure: redis only"));
            }
            if let Spread::Weights(w) = &self.spread {
                if w.len() != nodes {
                    return Err(format!(
                        "spread.weights: {} weights for strategies[{i}]'s {nodes} nodes",
                        w.len()
                    ));
                }
            }
            for (j, event) in self.events.iter().enumerate() {
                let node = match event.action {
                    Action::KillNode(n)
                    | Action::PauseNode(n)
                    | Action::ResumeNode(n)
                    | Action::RestartNode(n) => n,
                    Action::StopRedis | Action::StartRedis => continue,
                };
                if node >= nodes {
                    return Err(format!(
                        "events[{j}]: node {node} but strategies[{i}] has {nodes} nodes"
                    ));
                }
            }
        }
        if let Spread::Weights(w) = &self.spread {
            if w.iter().any(|x| !x.is_finite() || *x < 0.0) || w.iter().sum::<f64>() <= 0.0 {
                return Err("spread.weights: finite, ≥ 0, not all zero".into());
            }
        }
        let measured = self.window() * self.windows as u32;
        if let Some(j) = self.events.iter().position(|e| e.at >= measured) {
            return Err(format!("events[{j}].at: after the last measured window"));
        }
        if let Some(m) = &self.max_throughput {
            if m.duration.is_zero()
                || m.duration > Duration::from_secs(120)
                || m.clients_per_node == 0
                || !(1..=1_000).contains(&m.streams_per_client)
            {
                return Err("max_throughput: duration in (0, 120 s], clients_per_node ≥ 1, streams_per_client in 1..=1000".into());
            }
        }
        Ok(())
    }
}

mod unit_name {
    use hivemind_core::Unit;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(unit: &Unit, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(unit.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Unit, D::Error> {
        let name = String::deserialize(d)?;
        Unit::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!("unknown unit {name:?} (second, minute, hour, day)"))
        })
    }
}

mod strategy_name {
    use crate::cluster::Strategy;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(strategy: &Strategy, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(strategy.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Strategy, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
name: t
limit: 100
unit: second
load: 2
nodes: 3
windows: 4
keys: { count: 100, zipf: 1.1 }
spread: { weights: [0.8, 0.1, 0.1] }
strategies:
  - strategy: standalone
  - strategy: gossip
    gossip_interval: 25ms
    env: { HIVEMIND_MESH__EXTRAPOLATE: 'false' }
  - strategy: redis
    on_failure: local
events:
  - { at: 1s, pause_node: 1 }
  - { at: 2500ms, resume_node: 1 }
  - { at: 3s, stop_redis: null }
max_throughput: { duration: 2s }
";

    #[test]
    fn a_full_scenario_parses() {
        let s = Scenario::parse(GOOD).unwrap();
        assert_eq!(s.target_rps(), 200.0);
        assert_eq!(s.warmup_windows, 1);
        assert_eq!(s.events[1].at, Duration::from_millis(2500));
        assert_eq!(s.events[1].action, Action::ResumeNode(1));
        assert_eq!(s.events[2].action, Action::StopRedis);
        assert_eq!(s.max_throughput.as_ref().unwrap().clients_per_node, 8);
        let gossip = &s.strategies[1];
        let env = gossip.env(&s);
        assert!(env.contains(&("HIVEMIND_MESH__GOSSIP_INTERVAL".into(), "25ms".into())));
        assert!(env.contains(&("HIVEMIND_MESH__EXTRAPOLATE".into(), "false".into())));
        let redis = s.strategies[2].env(&s);
        assert!(redis.contains(&("HIVEMIND_REDIS__ON_FAILURE".into(), "local".into())));
        assert!(redis.contains(&("HIVEMIND_REDIS__EXPECTED_NODES".into(), "3".into())));
        assert_eq!(s.keys.dist().unwrap().len(), 100);
    }

    #[test]
    fn a_bad_field_is_named_in_the_error() {
        let bad = GOOD.replace("on_failure: local", "on_failure: maybe");
        let e = Scenario::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("strategies[2].on_failure"), "{e}");
        assert!(e.contains("line"), "{e}");
        let bad = GOOD.replace("nodes: 3", "nodes: 3\nnode: 4");
        let e = Scenario::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("unknown field `node`"), "{e}");
        let bad = GOOD.replace("unit: second", "unit: fortnight");
        let e = Scenario::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("unit") && e.contains("fortnight"), "{e}");
    }

    #[test]
    fn inconsistent_values_are_refused_with_the_field() {
        for (from, to, field) in [
            ("limit: 100", "limit: 0", "limit"),
            ("[0.8, 0.1, 0.1]", "[0.8, 0.2]", "spread.weights"),
            ("pause_node: 1", "pause_node: 7", "events[0]"),
            ("at: 3s", "at: 4s", "events[2].at"),
            ("count: 100,", "count: 0,", "keys.count"),
            (
                "    on_failure: local",
                "    on_failure: local\n    gossip_interval: 1s",
                "strategies[2].gossip_interval",
            ),
        ] {
            let bad = GOOD.replace(from, to);
            let e = Scenario::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(field), "{from} → {to}: {e}");
        }
    }

    #[test]
    fn labels_default_to_the_strategy_and_must_be_unique() {
        let s = Scenario::parse(GOOD).unwrap();
        assert_eq!(s.strategies[0].label(), "standalone");
        let twice = GOOD.replace(
            "  - strategy: standalone\n",
            "  - strategy: standalone\n  - strategy: standalone\n",
        );
        let e = Scenario::parse(&twice).unwrap_err().to_string();
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn a_scenario_survives_yaml_and_json() {
        let s = Scenario::parse(GOOD).unwrap();
        let yaml = serde_yaml::to_string(&s).unwrap();
        let again = Scenario::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(again.events.len(), s.events.len());
        assert_eq!(again.events[2].action, Action::StopRedis);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["unit"], "second");
        assert_eq!(json["strategies"][2]["strategy"], "redis");
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    #[test]
    fn every_shipped_scenario_file_is_valid() {
        let root = crate::cluster::workspace_root().join("benches/scenarios");
        let mut files = Vec::new();
        for dir in [root.clone(), root.join("suite")] {
            for entry in
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    files.push(path);
                }
            }
        }
        assert!(files.len() >= 12, "{files:?}");
        let mut names = std::collections::BTreeSet::new();
        for path in files {
            let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                names.insert(s.name.clone()),
                "two scenarios named {}",
                s.name
            );
        }
    }
}
