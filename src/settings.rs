//! Server settings, layered with figment (lowest to highest priority):
//!
//! 1. built-in defaults ([`Settings::default`]);
//! 2. a YAML settings file: `--settings PATH` or `HIVEMIND_SETTINGS`, else `config/hivemind.yaml`
//!    if it exists in the working directory;
//! 3. environment variables `HIVEMIND_*`, nested with `__` (`HIVEMIND_GRPC__ADDR=0.0.0.0:8081`);
//! 4. command-line flags.
//!
//! Unknown keys are errors that name the layer that supplied them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Yaml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use hivemind_core::settings::{InvalidSetting, SettingsCheck};
use serde::{Deserialize, Serialize};

/// Where a settings file is looked for when none is named.
pub const DEFAULT_SETTINGS_PATH: &str = "config/hivemind.yaml";
/// Where the rules are read from when none are named.
pub const DEFAULT_RULES_PATH: &str = "config/ratelimit.yaml";
/// The environment variable that names the settings file.
pub const SETTINGS_ENV: &str = "HIVEMIND_SETTINGS";
/// The prefix of environment variables that set settings.
pub const ENV_PREFIX: &str = "HIVEMIND_";

/// Every setting of the server. Each has a default; see `config/hivemind.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// How nodes agree on counts.
    pub strategy: StrategyKind,
    /// The Envoy rate limit gRPC service.
    pub grpc: GrpcSettings,
    /// The admin HTTP endpoints (health, JSON, rules dump).
    pub admin: AdminSettings,
    /// How the gRPC service is served: event loops per core.
    pub server: ServerSettings,
    /// Where the rate limit rules come from.
    pub rules: RulesSettings,
    /// The local counters every strategy uses.
    pub counters: CounterSettings,
    /// What goes into responses beyond the statuses.
    pub response: ResponseSettings,
    /// Prometheus metrics at the admin address's `/metrics`.
    pub metrics: MetricsSettings,
    /// The gossip mesh (strategy `gossip`): the gossip backend's own section.
    #[cfg(feature = "gossip")]
    pub mesh: hivemind_gossip::MeshSettings,
    /// The gossip mesh section, kept as written: this build has no gossip backend.
    #[cfg(not(feature = "gossip"))]
    pub mesh: UnusedSection,
    /// Redis (strategy `redis`): the redis backend's own section.
    #[cfg(feature = "redis")]
    pub redis: hivemind_redis::RedisSettings,
    /// The redis section, kept as written: this build has no redis backend.
    #[cfg(not(feature = "redis"))]
    pub redis: UnusedSection,
    /// Log output.
    pub log: LogSettings,
    /// OpenTelemetry traces of rate limit calls.
    pub telemetry: TelemetrySettings,
    /// Graceful shutdown.
    pub shutdown: ShutdownSettings,
}

/// A backend's settings section in a build without that backend: accepted whatever it holds,
/// so one settings file serves every build (choosing the backend is the error), and never
/// printed (it may hold secrets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnusedSection;

impl Serialize for UnusedSection {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_none()
    }
}

impl<'de> Deserialize<'de> for UnusedSection {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(de).map(|_| UnusedSection)
    }
}

/// The strategy that decides how nodes agree on counts. Every name parses in every build;
/// [`crate::strategies::AVAILABLE`] says which this build can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    /// Local counters only: exact per node (the default of a build without gossip).
    Standalone,
    /// Local counters shared over a chitchat gossip mesh (the default: a one-node mesh that
    /// others can join).
    Gossip,
    /// Counters in Redis: exact across nodes.
    Redis,
}

impl Default for StrategyKind {
    fn default() -> Self {
        if cfg!(feature = "gossip") {
            StrategyKind::Gossip
        } else {
            StrategyKind::Standalone
        }
    }
}

impl StrategyKind {
    /// The name used in settings and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::Standalone => "standalone",
            StrategyKind::Gossip => "gossip",
            StrategyKind::Redis => "redis",
        }
    }
}

/// The gRPC listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcSettings {
    /// Address of the `envoy.service.ratelimit.v3.RateLimitService` listener (`-a/--addr`).
    pub addr: SocketAddr,
    /// Largest request message accepted, in bytes; larger requests get RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// PEM certificate chain of the gRPC listener: with `tls_key`, the listener speaks TLS only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that client certificates must chain to: when set, every client must
    /// present one (mutual TLS). Needs `tls_cert`.
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        GrpcSettings {
            addr: SocketAddr::from(([127, 0, 0, 1], 8081)),
            max_message_bytes: 4 * 1024 * 1024,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

/// How the gRPC service is served.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Event loops serving gRPC connections, each a single-threaded runtime on its own OS
    /// thread; one acceptor hands connections to them round-robin (`--threads`). `None`: one
    /// per core. `0`: the previous model, one work-stealing runtime shared with background work
    /// (kept as a baseline to compare against).
    pub threads: Option<usize>,
}

/// The largest `server.threads` accepted.
pub const MAX_SERVER_THREADS: usize = 1024;

impl ServerSettings {
    /// The event loops to start: `threads`, or the number of cores when unset; 0 means the
    /// shared multi-thread runtime.
    pub fn event_loops(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(std::num::NonZeroUsize::get)
                .unwrap_or(1)
        })
    }
}

/// The admin HTTP listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Address of `/healthcheck`, `/json`, `/rlconfig`, `/stats` and the strategy's own views
    /// such as gossip's `/mesh` (`--admin-addr`).
    pub addr: SocketAddr,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

/// Where the rules are and how often they are checked for changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesSettings {
    /// A rules file, or a directory of domain files (`-c/--config`). When it is left at its
    /// default and `config/ratelimit.yaml` does not exist, the copy built into the binary is used.
    pub path: PathBuf,
    /// How often the rules are checked for changes (in-place writes, renames, symlink swaps).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for RulesSettings {
    fn default() -> Self {
        RulesSettings {
            path: PathBuf::from(DEFAULT_RULES_PATH),
            reload_interval: Duration::from_secs(1),
        }
    }
}

/// The local counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CounterSettings {
    /// The most counter keys held at once. Beyond it the coldest keys are evicted (logged and
    /// counted); enforcement never stops.
    pub max_keys: usize,
    /// How often keys whose window ended are dropped.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl CounterSettings {
    /// The bounds every strategy's local counters get.
    pub fn config(&self) -> hivemind_core::CounterConfig {
        hivemind_core::CounterConfig {
            max_keys: self.max_keys,
            sweep_interval: self.sweep_interval,
        }
    }
}

impl Default for CounterSettings {
    fn default() -> Self {
        CounterSettings {
            max_keys: 1_000_000,
            sweep_interval: Duration::from_secs(1),
        }
    }
}

/// Prometheus metrics (`GET /metrics` on the admin address).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Record metrics and serve them at `/metrics` (404 when off; recording costs a few hundred
    /// nanoseconds per request, see the README's results).
    pub enabled: bool,
    /// A hit whose window count passes this fraction of its limit, without going over, counts
    /// as near its limit (`ratelimit_service_rate_limit_near_limit`), as envoyproxy/ratelimit's
    /// `NEAR_LIMIT_RATIO`. Between 0 and 1.
    pub near_limit_ratio: f64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            enabled: true,
            near_limit_ratio: 0.8,
        }
    }
}

/// Optional response headers, as envoyproxy/ratelimit's `LIMIT_RESPONSE_HEADERS_ENABLED`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResponseSettings {
    /// Add `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` to responses, from the
    /// descriptor closest to its limit. Envoy's own `enable_x_ratelimit_headers` works without it.
    pub rate_limit_headers: bool,
    /// Name of the limit header.
    pub limit_header: String,
    /// Name of the remaining header.
    pub remaining_header: String,
    /// Name of the reset header.
    pub reset_header: String,
}

impl Default for ResponseSettings {
    fn default() -> Self {
        ResponseSettings {
            rate_limit_headers: false,
            limit_header: "RateLimit-Limit".into(),
            remaining_header: "RateLimit-Remaining".into(),
            reset_header: "RateLimit-Reset".into(),
        }
    }
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `hivemind=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// The shape of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// OpenTelemetry traces: one span per `ShouldRateLimit` call, exported over OTLP/gRPC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// The OTLP/gRPC collector (`http://host:4317`, `https://` for TLS). `None`: no exporter
    /// and no spans at all, so tracing costs nothing.
    pub otlp_endpoint: Option<String>,
    /// Fraction of calls arriving without a trace context (no valid `traceparent`) that are
    /// traced, 0 to 1. A parent's sampled flag always wins, so Envoy's sampling decides for the
    /// calls it traces.
    pub sampling_ratio: f64,
    /// The `service.name` resource attribute the spans are exported under.
    pub service_name: String,
    /// Longest wait for one export call (and for the final flush at shutdown).
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            service_name: "hivemind".into(),
            export_timeout: Duration::from_secs(10),
        }
    }
}

impl TelemetrySettings {
    /// Adds every unusable telemetry value to `check`. The endpoint is never echoed: it could
    /// carry credentials.
    fn check(&self, check: &mut SettingsCheck) {
        if let Some(endpoint) = &self.otlp_endpoint {
            if let Err(problem) = check_otlp_endpoint(endpoint) {
                check.invalid("telemetry.otlp_endpoint", problem);
            }
        }
        let ratio = self.sampling_ratio;
        if !(0.0..=1.0).contains(&ratio) {
            check.invalid(
                "telemetry.sampling_ratio",
                format!("is {ratio}; it must be between 0 and 1"),
            );
        }
        if self.service_name.trim().is_empty() {
            check.invalid("telemetry.service_name", "must not be empty");
        }
        check.duration(
            "telemetry.export_timeout",
            self.export_timeout,
            Duration::from_millis(1),
            Duration::from_secs(60),
        );
    }
}

/// Why `endpoint` cannot be an OTLP/gRPC collector address, if it cannot.
fn check_otlp_endpoint(endpoint: &str) -> Result<(), &'static str> {
    const SHAPE: &str =
        "is not an http:// or https:// URL with a host (e.g. http://127.0.0.1:4317)";
    let uri: tonic::codegen::http::Uri = endpoint.parse().map_err(|_| SHAPE)?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(SHAPE);
    }
    let authority = uri.authority().ok_or(SHAPE)?;
    if authority.as_str().contains('@') {
        // gRPC never sends URL userinfo: credentials would be ignored, and printed by whoever
        // logs the URL.
        return Err(
            "carries credentials (user@ or user:password@), which OTLP/gRPC does not send; \
                    use OTEL_EXPORTER_OTLP_HEADERS for an authorization header",
        );
    }
    if authority.host().is_empty() {
        return Err(SHAPE);
    }
    Ok(())
}

/// Graceful shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long in-flight calls may take to finish after SIGTERM before the server exits anyway.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long the server keeps serving after SIGTERM/SIGINT with its health already failing
    /// (gRPC health NOT_SERVING, `/healthcheck` 503), so load balancers and Envoy's health
    /// checks move traffic away before the listeners close.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            drain_timeout: Duration::from_secs(10),
            grace: Duration::ZERO,
        }
    }
}

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A settings file named by `--settings` or `HIVEMIND_SETTINGS` does not exist.
    #[error("settings file {0} does not exist")]
    MissingFile(PathBuf),
    /// A layer holds an unknown key, a value of the wrong type, or bad YAML. figment's message
    /// names the key and the layer (file path, `HIVEMIND_` environment variables or flags).
    #[error("invalid settings: {0}")]
    Invalid(Box<figment::Error>),
    /// Values that parse but cannot be used, one line each naming the setting and its layer.
    #[error("invalid settings:\n  {}", .0.join("\n  "))]
    OutOfRange(Vec<String>),
}

/// Values from command-line flags, the highest layer. Only flags given on the command line are
/// set, so an absent flag never hides a lower layer.
#[derive(Debug, Clone, Default)]
pub struct FlagValues {
    /// Dotted setting path → value.
    values: Vec<(&'static str, Value)>,
}

impl FlagValues {
    /// Sets `path` (dotted, e.g. `grpc.addr`) to `value`.
    pub fn set(&mut self, path: &'static str, value: impl Into<Value>) {
        self.values.push((path, value.into()));
    }
}

impl Provider for FlagValues {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flags")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (path, value) in &self.values {
            insert_path(&mut root, path, value.clone());
        }
        Ok(Map::from([(Profile::Default, root)]))
    }
}

fn insert_path(dict: &mut Dict, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            dict.insert(path.to_owned(), value);
        }
        Some((head, rest)) => {
            let child = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, child) = child {
                insert_path(child, rest, value);
            }
        }
    }
}

/// Where the settings file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingsFile {
    /// Named explicitly: it must exist.
    Named(PathBuf),
    /// The default path: read if present.
    Default(PathBuf),
}

impl SettingsFile {
    /// `--settings` if given, else `HIVEMIND_SETTINGS`, else the default path.
    pub fn resolve(flag: Option<PathBuf>, env: Option<std::ffi::OsString>) -> Self {
        match flag.or_else(|| env.map(PathBuf::from)) {
            Some(path) => SettingsFile::Named(path),
            None => SettingsFile::Default(PathBuf::from(DEFAULT_SETTINGS_PATH)),
        }
    }
}

impl Settings {
    /// Builds the layered settings: defaults, the settings file, `HIVEMIND_*` variables from
    /// `env`, then `flags`.
    pub fn load(
        file: &SettingsFile,
        env: impl IntoIterator<Item = (String, String)>,
        flags: FlagValues,
    ) -> Result<Settings, SettingsError> {
        let mut figment =
            Figment::from(figment::providers::Serialized::defaults(Settings::default()));
        match file {
            SettingsFile::Named(path) if !path.exists() => {
                return Err(SettingsError::MissingFile(path.clone()))
            }
            SettingsFile::Named(path) => figment = figment.merge(Yaml::file_exact(path)),
            SettingsFile::Default(path) if path.exists() => {
                figment = figment.merge(Yaml::file_exact(path))
            }
            SettingsFile::Default(_) => {}
        }
        let figment = figment.merge(env_layer(env)).merge(flags);
        let settings: Settings = figment
            .extract()
            .map_err(|e| SettingsError::Invalid(Box::new(e)))?;
        let problems = settings.check();
        if problems.is_empty() {
            return Ok(settings);
        }
        let described = problems
            .iter()
            .map(|p| {
                let layer = figment.find_metadata(&p.key).map_or_else(
                    || "built-in defaults".to_owned(),
                    |m| match &m.source {
                        Some(source) => format!("{} {source}", m.name),
                        None => m.name.to_string(),
                    },
                );
                format!("{}: {} (set by {layer})", p.key, p.problem)
            })
            .collect();
        Err(SettingsError::OutOfRange(described))
    }

    /// Every value that parses but cannot be used (zero intervals, overflowing durations, a mesh
    /// reachable from other hosts without a secret), each naming its setting.
    pub fn check(&self) -> Vec<InvalidSetting> {
        let mut check = SettingsCheck::default();
        let hour = Duration::from_secs(3600);
        check.duration(
            "rules.reload_interval",
            self.rules.reload_interval,
            Duration::from_millis(10),
            hour,
        );
        check.duration(
            "counters.sweep_interval",
            self.counters.sweep_interval,
            Duration::from_millis(10),
            hour,
        );
        check.count(
            "counters.max_keys",
            self.counters.max_keys as u64,
            1,
            1 << 32,
        );
        check.count(
            "grpc.max_message_bytes",
            self.grpc.max_message_bytes as u64,
            1024,
            1 << 30,
        );
        check.duration(
            "shutdown.drain_timeout",
            self.shutdown.drain_timeout,
            Duration::ZERO,
            hour,
        );
        check.duration("shutdown.grace", self.shutdown.grace, Duration::ZERO, hour);
        match (&self.grpc.tls_cert, &self.grpc.tls_key) {
            (Some(_), None) => {
                check.invalid("grpc.tls_cert", "is set without grpc.tls_key; give both")
            }
            (None, Some(_)) => {
                check.invalid("grpc.tls_key", "is set without grpc.tls_cert; give both")
            }
            _ => {}
        }
        if self.grpc.tls_client_ca.is_some() && self.grpc.tls_cert.is_none() {
            check.invalid(
                "grpc.tls_client_ca",
                "needs grpc.tls_cert and grpc.tls_key (client certificates are checked over TLS)",
            );
        }
        let ratio = self.metrics.near_limit_ratio;
        if !(ratio > 0.0 && ratio <= 1.0) {
            check.invalid(
                "metrics.near_limit_ratio",
                format!("is {ratio}; it must be above 0 and at most 1"),
            );
        }
        if let Some(threads) = self.server.threads {
            check.count(
                "server.threads",
                threads as u64,
                0,
                MAX_SERVER_THREADS as u64,
            );
        }
        self.telemetry.check(&mut check);
        #[cfg(feature = "gossip")]
        if self.strategy == StrategyKind::Gossip {
            self.mesh.check(&mut check);
        }
        #[cfg(feature = "redis")]
        if self.strategy == StrategyKind::Redis {
            if let Err(e) = self.redis.validate() {
                check.invalid("redis", e.0);
            }
            check.duration(
                "redis.timeout",
                self.redis.timeout,
                Duration::from_micros(100),
                Duration::from_secs(60),
            );
        }
        check.problems
    }

    /// The settings as YAML, for `--check-config`.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# unprintable settings: {e}\n"))
    }

    /// Whether the rules path is the built-in default (so the embedded rules may stand in).
    pub fn rules_path_is_default(&self) -> bool {
        self.rules.path == Path::new(DEFAULT_RULES_PATH)
    }
}

/// Settings (by last path segment) whose environment values are taken as written, never parsed
/// as numbers or booleans.
const VERBATIM_SETTINGS: &[&str] = &[
    "secret",
    "url",
    "node_id",
    "cluster_id",
    "key_prefix",
    "otlp_endpoint",
    "service_name",
];

/// The `HIVEMIND_*` environment layer over the given variables (tests pass their own; the binary
/// passes `std::env::vars()`). `HIVEMIND_SETTINGS` names the file and is not a setting.
fn env_layer(env: impl IntoIterator<Item = (String, String)>) -> impl Provider {
    let vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX) && name != SETTINGS_ENV)
        .collect();
    // figment's Env reads the process environment; feed it the filtered list instead so that
    // tests and `--check-config` see exactly what was passed.
    let mut dict = Dict::new();
    for (name, value) in vars {
        let path = name[ENV_PREFIX.len()..]
            .to_ascii_lowercase()
            .replace("__", ".");
        // Secrets and URLs stay exactly as written: `0123` must not become the number 123.
        let verbatim = VERBATIM_SETTINGS.iter().any(|k| path.ends_with(k));
        let parsed: Value = if verbatim {
            Value::from(value)
        } else {
            value.parse().unwrap_or_else(|_| Value::from(value.clone()))
        };
        insert_path(&mut dict, &path, parsed);
    }
    EnvLayer(dict)
}

/// The parsed `HIVEMIND_*` variables as a figment layer.
struct EnvLayer(Dict);

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named("`HIVEMIND_` environment variable(s)")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Map::from([(Profile::Default, self.0.clone())]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(dir: &tempfile::TempDir, text: &str) -> SettingsFile {
        let path = dir.path().join("hivemind.yaml");
        std::fs::write(&path, text).unwrap();
        SettingsFile::Named(path)
    }

    #[test]
    fn defaults_apply_without_any_layer() {
        let missing = SettingsFile::Default(PathBuf::from("/nonexistent/hivemind.yaml"));
        let settings = Settings::load(&missing, vars(&[]), FlagValues::default()).unwrap();
        assert_eq!(settings, Settings::default());
        assert_eq!(settings.grpc.addr.to_string(), "127.0.0.1:8081");
        assert_eq!(settings.admin.addr.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn the_shipped_settings_file_states_the_defaults() {
        let shipped = SettingsFile::Named(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/hivemind.yaml"
        )));
        let settings = Settings::load(&shipped, vars(&[]), FlagValues::default()).unwrap();
        // The file names gossip, the default of a full build.
        let expected = Settings {
            strategy: StrategyKind::Gossip,
            ..Settings::default()
        };
        assert_eq!(settings, expected);
    }

    #[test]
    fn layers_override_in_order_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = file(
            &dir,
            "grpc: { addr: 127.0.0.1:1111 }\nadmin: { addr: 127.0.0.1:2222 }\ncounters: { max_keys: 7 }\n",
        );
        let env = vars(&[
            ("HIVEMIND_ADMIN__ADDR", "127.0.0.1:3333"),
            ("HIVEMIND_COUNTERS__MAX_KEYS", "9"),
            ("HIVEMIND_MESH__PEERS", "a:1, b:2"),
            ("UNRELATED", "x"),
        ]);
        let mut flags = FlagValues::default();
        flags.set("counters.max_keys", 11u64);
        let settings = Settings::load(&file, env, flags).unwrap();
        assert_eq!(settings.grpc.addr.to_string(), "127.0.0.1:1111");
        assert_eq!(settings.admin.addr.to_string(), "127.0.0.1:3333");
        assert_eq!(settings.counters.max_keys, 11);
        #[cfg(feature = "gossip")]
        assert_eq!(settings.mesh.peers, ["a:1", "b:2"]);
    }

    #[cfg(feature = "redis")]
    #[test]
    fn the_redis_url_comes_from_the_environment_and_its_password_is_never_printed() {
        let none = SettingsFile::Default(PathBuf::from("/nonexistent"));
        let env = vars(&[
            ("HIVEMIND_STRATEGY", "redis"),
            ("HIVEMIND_REDIS__URL", "redis://app:s3cret@10.0.0.5:6380/2"),
            ("HIVEMIND_REDIS__ON_FAILURE", "local"),
            ("HIVEMIND_REDIS__EXPECTED_NODES", "3"),
        ]);
        let settings = Settings::load(&none, env, FlagValues::default()).unwrap();
        assert_eq!(settings.strategy, StrategyKind::Redis);
        assert_eq!(settings.redis.url, "redis://app:s3cret@10.0.0.5:6380/2");
        assert_eq!(
            settings.redis.on_failure,
            hivemind_redis::FailurePolicy::Local
        );
        assert_eq!(settings.redis.expected_nodes, 3);
        let yaml = settings.to_yaml();
        assert!(!yaml.contains("s3cret"), "{yaml}");
        assert!(
            yaml.contains("redis://app:<redacted>@10.0.0.5:6380/2"),
            "{yaml}"
        );
        let debug = format!("{settings:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn durations_are_human_readable() {
        let dir = tempfile::tempdir().unwrap();
        let file = file(&dir, "rules: { reload_interval: 250ms }\n");
        let settings = Settings::load(&file, vars(&[]), FlagValues::default()).unwrap();
        assert_eq!(settings.rules.reload_interval, Duration::from_millis(250));
    }

    #[test]
    fn unknown_keys_name_their_layer() {
        let dir = tempfile::tempdir().unwrap();
        let bad_file = file(&dir, "grpc: { adress: 127.0.0.1:1 }\n");
        let err = Settings::load(&bad_file, vars(&[]), FlagValues::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("adress"), "{err}");
        assert!(err.contains("hivemind.yaml"), "{err}");

        let none = SettingsFile::Default(PathBuf::from("/nonexistent"));
        let err = Settings::load(
            &none,
            vars(&[("HIVEMIND_STRATEGI", "redis")]),
            FlagValues::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("strategi"), "{err}");
        assert!(err.contains("HIVEMIND_"), "{err}");
    }

    #[test]
    fn bad_values_are_errors() {
        let none = SettingsFile::Default(PathBuf::from("/nonexistent"));
        for (name, value) in [
            ("HIVEMIND_STRATEGY", "quantum"),
            ("HIVEMIND_GRPC__ADDR", "not-an-address"),
            ("HIVEMIND_COUNTERS__MAX_KEYS", "-3"),
            ("HIVEMIND_RULES__RELOAD_INTERVAL", "soon"),
        ] {
            let err = Settings::load(&none, vars(&[(name, value)]), FlagValues::default());
            assert!(err.is_err(), "{name}={value} was accepted");
        }
    }

    #[test]
    fn values_that_would_crash_a_task_are_refused_naming_setting_and_layer() {
        let none = SettingsFile::Default(PathBuf::from("/nonexistent"));
        for (name, value, key) in [
            (
                "HIVEMIND_RULES__RELOAD_INTERVAL",
                "0s",
                "rules.reload_interval",
            ),
            (
                "HIVEMIND_COUNTERS__SWEEP_INTERVAL",
                "0s",
                "counters.sweep_interval",
            ),
            ("HIVEMIND_COUNTERS__MAX_KEYS", "0", "counters.max_keys"),
            ("HIVEMIND_SHUTDOWN__GRACE", "400years", "shutdown.grace"),
            ("HIVEMIND_SERVER__THREADS", "100000", "server.threads"),
            (
                "HIVEMIND_METRICS__NEAR_LIMIT_RATIO",
                "1.5",
                "metrics.near_limit_ratio",
            ),
            (
                "HIVEMIND_METRICS__NEAR_LIMIT_RATIO",
                "0",
                "metrics.near_limit_ratio",
            ),
            (
                "HIVEMIND_GRPC__TLS_CERT",
                "/etc/tls/cert.pem",
                "grpc.tls_key",
            ),
            (
                "HIVEMIND_GRPC__TLS_KEY",
                "/etc/tls/key.pem",
                "grpc.tls_cert",
            ),
            (
                "HIVEMIND_GRPC__TLS_CLIENT_CA",
                "/etc/tls/ca.pem",
                "grpc.tls_client_ca",
            ),
        ] {
            let err = Settings::load(&none, vars(&[(name, value)]), FlagValues::default())
                .expect_err(&format!("{name}={value} was accepted"))
                .to_string();
            assert!(err.contains(key), "{err}");
            assert!(err.contains("HIVEMIND_"), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let bad = file(&dir, "rules: { reload_interval: 0ms }\n");
        let err = Settings::load(&bad, vars(&[]), FlagValues::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rules.reload_interval") && err.contains("hivemind.yaml"),
            "{err}"
        );
    }

    #[cfg(feature = "gossip")]
    #[test]
    fn a_numeric_secret_keeps_every_character() {
        let none = SettingsFile::Default(PathBuf::from("/nonexistent"));
        let settings = Settings::load(
            &none,
            vars(&[
                ("HIVEMIND_MESH__SECRET", "0123"),
                ("HIVEMIND_MESH__NODE_ID", "007"),
            ]),
            FlagValues::default(),
        )
        .unwrap();
        assert_eq!(settings.mesh.secret.as_deref(), Some("0123"));
        assert_eq!(settings.mesh.node_id.as_deref(), Some("007"));
        let dir = tempfile::tempdir().unwrap();
        let unquoted = file(&dir, "mesh: { secret: 98765 }\n");
        let err = Settings::load(&unquoted, vars(&[]), FlagValues::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("quote it"), "{err}");
        assert!(!err.contains("98765"), "the secret is never printed: {err}");
    }

    #[cfg(feature = "gossip")]
    #[test]
    fn a_previous_secret_rolls_with_the_current_one_and_is_never_printed() {
        let none = SettingsFile::Default(PathBuf::from("/nonexistent"));
        let err = Settings::load(
            &none,
            vars(&[("HIVEMIND_MESH__PREVIOUS_SECRET", "old-one")]),
            FlagValues::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("mesh.previous_secret"), "{err}");
        let settings = Settings::load(
            &none,
            vars(&[
                ("HIVEMIND_MESH__SECRET", "new-one"),
                ("HIVEMIND_MESH__PREVIOUS_SECRET", "0042"),
            ]),
            FlagValues::default(),
        )
        .unwrap();
        assert_eq!(settings.mesh.previous_secret.as_deref(), Some("0042"));
        let shown = format!("{}{settings:?}", settings.to_yaml());
        assert!(
            !shown.contains("new-one") && !shown.contains("0042"),
            "{shown}"
        );
    }

    #[cfg(feature = "gossip")]
    #[test]
    fn gossip_durations_are_bounded() {
        let none = SettingsFile::Default(PathBuf::from("/nonexistent"));
        for value in ["0s", "1ms", "100000000h"] {
            let err = Settings::load(
                &none,
                vars(&[("HIVEMIND_MESH__GOSSIP_INTERVAL", value)]),
                FlagValues::default(),
            )
            .expect_err(value)
            .to_string();
            assert!(err.contains("mesh.gossip_interval"), "{err}");
        }
    }

    #[cfg(feature = "gossip")]
    #[test]
    fn a_mesh_other_hosts_can_reach_needs_a_secret_or_an_explicit_opt_out() {
        let none = SettingsFile::Default(PathBuf::from("/nonexistent"));
        let open = vars(&[("HIVEMIND_MESH__ADDR", "0.0.0.0:7946")]);
        let err = Settings::load(&none, open.clone(), FlagValues::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("mesh.addr"), "{err}");
        assert!(err.contains("mesh.secret"), "{err}");
        assert!(
            err.contains("HIVEMIND_MESH__SECRET"),
            "says how to set one: {err}"
        );

        let mut with_secret = open.clone();
        with_secret.push(("HIVEMIND_MESH__SECRET".into(), "s3cret".into()));
        Settings::load(&none, with_secret, FlagValues::default()).unwrap();
        let mut insecure = open.clone();
        insecure.push(("HIVEMIND_MESH__INSECURE".into(), "true".into()));
        Settings::load(&none, insecure, FlagValues::default()).unwrap();
        // Loopback (the default) needs neither; another strategy opens no mesh at all.
        let defaults = Settings::load(&none, vars(&[]), FlagValues::default()).unwrap();
        assert!(defaults.mesh.addr.ip().is_loopback());
        let mut standalone = open;
        standalone.push(("HIVEMIND_STRATEGY".into(), "standalone".into()));
        Settings::load(&none, standalone, FlagValues::default()).unwrap();
    }

    #[test]
    fn server_threads_default_to_the_cores_and_zero_is_the_shared_runtime() {
        let none = SettingsFile::Default(PathBuf::from("/nonexistent"));
        let defaults = Settings::load(&none, vars(&[]), FlagValues::default()).unwrap();
        assert_eq!(defaults.server.threads, None);
        assert!(defaults.server.event_loops() >= 1);
        for (value, loops) in [("2", 2), ("0", 0)] {
            let settings = Settings::load(
                &none,
                vars(&[("HIVEMIND_SERVER__THREADS", value)]),
                FlagValues::default(),
            )
            .unwrap();
            assert_eq!(settings.server.event_loops(), loops);
        }
        let err = Settings::load(
            &none,
            vars(&[("HIVEMIND_SERVER__THREADS", "-1")]),
            FlagValues::default(),
        );
        assert!(err.is_err(), "negative thread count accepted");
    }

    #[test]
    fn telemetry_values_are_checked_and_an_endpoint_is_never_echoed() {
        let none = SettingsFile::Default(PathBuf::from("/nonexistent"));
        let defaults = Settings::load(&none, vars(&[]), FlagValues::default()).unwrap();
        assert_eq!(
            defaults.telemetry.otlp_endpoint, None,
            "no exporter by default"
        );
        let settings = Settings::load(
            &none,
            vars(&[
                (
                    "HIVEMIND_TELEMETRY__OTLP_ENDPOINT",
                    "https://collector:4317",
                ),
                ("HIVEMIND_TELEMETRY__SAMPLING_RATIO", "0"),
                ("HIVEMIND_TELEMETRY__SERVICE_NAME", "0042"),
            ]),
            FlagValues::default(),
        )
        .unwrap();
        assert_eq!(
            settings.telemetry.otlp_endpoint.as_deref(),
            Some("https://collector:4317")
        );
        assert_eq!(settings.telemetry.sampling_ratio, 0.0);
        assert_eq!(settings.telemetry.service_name, "0042");
        for (name, value, key) in [
            (
                "HIVEMIND_TELEMETRY__SAMPLING_RATIO",
                "1.5",
                "telemetry.sampling_ratio",
            ),
            (
                "HIVEMIND_TELEMETRY__SAMPLING_RATIO",
                "-0.1",
                "telemetry.sampling_ratio",
            ),
            (
                "HIVEMIND_TELEMETRY__SAMPLING_RATIO",
                "NaN",
                "telemetry.sampling_ratio",
            ),
            (
                "HIVEMIND_TELEMETRY__OTLP_ENDPOINT",
                "collector:4317",
                "telemetry.otlp_endpoint",
            ),
            (
                "HIVEMIND_TELEMETRY__OTLP_ENDPOINT",
                "ftp://collector:4317",
                "telemetry.otlp_endpoint",
            ),
            (
                "HIVEMIND_TELEMETRY__OTLP_ENDPOINT",
                "not a url",
                "telemetry.otlp_endpoint",
            ),
            (
                "HIVEMIND_TELEMETRY__SERVICE_NAME",
                " ",
                "telemetry.service_name",
            ),
            (
                "HIVEMIND_TELEMETRY__EXPORT_TIMEOUT",
                "0s",
                "telemetry.export_timeout",
            ),
        ] {
            let err = Settings::load(&none, vars(&[(name, value)]), FlagValues::default())
                .expect_err(&format!("{name}={value} was accepted"))
                .to_string();
            assert!(err.contains(key) && err.contains("HIVEMIND_"), "{err}");
        }
        let err = Settings::load(
            &none,
            vars(&[(
                "HIVEMIND_TELEMETRY__OTLP_ENDPOINT",
                "https://tracer:hunter2@collector:4317",
            )]),
            FlagValues::default(),
        )
        .expect_err("an endpoint with credentials was accepted")
        .to_string();
        assert!(err.contains("credentials"), "{err}");
        assert!(
            !err.contains("hunter2"),
            "the password is never printed: {err}"
        );
    }

    #[test]
    fn a_named_settings_file_must_exist() {
        let named = SettingsFile::Named(PathBuf::from("/nonexistent/settings.yaml"));
        let err = Settings::load(&named, vars(&[]), FlagValues::default()).unwrap_err();
        assert!(matches!(err, SettingsError::MissingFile(_)));
        assert_eq!(
            SettingsFile::resolve(None, Some("/x.yaml".into())),
            SettingsFile::Named("/x.yaml".into())
        );
        assert_eq!(
            SettingsFile::resolve(Some("/flag.yaml".into()), Some("/x.yaml".into())),
            SettingsFile::Named("/flag.yaml".into())
        );
    }
}
