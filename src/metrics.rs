//! Prometheus metrics at `GET /metrics` on the admin address.
//!
//! Two kinds of figures:
//!
//! - **Per request**, recorded by the limiter through handles cached here: hits per domain and
//!   rule by outcome (total, within limit, near limit, over limit, shadow mode), named as
//!   envoyproxy/ratelimit's statsd stats come out of the usual Prometheus statsd mapping
//!   (`ratelimit_service_rate_limit_total_hits{domain, key}`), the decision latency histogram
//!   and strategy errors by kind. The `key` label is the rule's stat name from the rules file
//!   (its configured keys and values, never request values), so the label sets are bounded by
//!   the rules.
//! - **Per scrape**, read when `/metrics` is asked: the strategy's health, its local counters,
//!   every numeric figure of its backend details (as `hivemind_backend_*` gauges, whatever the
//!   backend), the rules hash and the reload counts.
//!
//! The recorder is this server's own (not the process-global one), so several servers in one
//! process (the tests) keep separate figures.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use hivemind_core::{Decision, ErrorKind, HealthState, Hit, StrategyStatus};
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::reload::ReloadStatus;
use crate::rules::Rule;

/// How often the server folds recorded latency samples into their buckets ([`Metrics::upkeep`]).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Bucket bounds of the decision latency histogram, seconds: 25 µs to 1 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

/// The most distinct (domain, key) series kept; keys beyond it share the `_other` key. Rules
/// files bound the series of plain rules already; this bounds `detailed_metric` rules, whose
/// keys come from requests, and a pathological rules file.
pub const MAX_RULE_SERIES: usize = 10_000;

/// The longest `detailed_metric` key (the request descriptor as `key_value.key_value`) reported
/// as its own series, in bytes; a longer one counts under the rule's stat name.
pub const MAX_DETAILED_KEY_BYTES: usize = 256;

/// Backend figures flattened into gauges, at most: a bound on what one scrape exposes.
const MAX_BACKEND_GAUGES: usize = 256;

/// A map by name, hashed with foldhash.
type RuleMap<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// The counters of one (domain, rule) pair.
#[derive(Clone)]
struct RuleCounters {
    total_hits: Counter,
    within_limit: Counter,
    near_limit: Counter,
    over_limit: Counter,
    shadow_mode: Counter,
}

/// This server's metrics: the recorder, and the handles the request path uses.
pub struct Metrics {
    /// Holds every series; renders the exposition text.
    recorder: PrometheusRecorder,
    /// Renders `recorder`'s series.
    handle: PrometheusHandle,
    /// A hit whose count reaches this fraction of its limit (and is not over) is near its limit.
    near_limit_ratio: f64,
    /// Seconds per `decide`, from the request's arrival to its response.
    decision_latency: Histogram,
    /// Strategy errors by kind (unavailable, timeout, rejected).
    errors: [Counter; 3],
    /// (domain → key → counters), filled on first use. foldhash: without flood resistance,
    /// but the keys are the rules' stat names or, for `detailed_metric` rules, at most
    /// [`MAX_RULE_SERIES`] request descriptors of bounded length.
    rules: RwLock<RuleMap<RuleMap<RuleCounters>>>,
    /// The `_other` counters, once the series cap is reached: later unknown keys count here
    /// without taking the write lock.
    overflow: OnceLock<RuleCounters>,
    /// Serializes scrapes: the gauges they set are shared.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("near_limit_ratio", &self.near_limit_ratio)
            .finish_non_exhaustive()
    }
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()))
}

fn labels(pairs: &[(&'static str, &str)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(name, value)| Label::new(*name, (*value).to_owned()))
        .collect()
}

impl Metrics {
    /// Metrics with the near-limit threshold at `near_limit_ratio` of each limit.
    pub fn new(near_limit_ratio: f64) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .expect("the latency buckets are a constant, non-empty list")
            .build_recorder();
        let handle = recorder.handle();
        let decision_latency = recorder.register_histogram(
            &Key::from_name("hivemind_decision_duration_seconds"),
            &metadata(),
        );
        let errors = [
            ErrorKind::Unavailable,
            ErrorKind::Timeout,
            ErrorKind::Rejected,
        ]
        .map(|kind| {
            recorder.register_counter(
                &Key::from_parts(
                    "hivemind_strategy_errors_total",
                    labels(&[("kind", kind.as_str())]),
                ),
                &metadata(),
            )
        });
        Metrics {
            recorder,
            handle,
            near_limit_ratio,
            decision_latency,
            errors,
            rules: RwLock::new(RuleMap::default()),
            overflow: OnceLock::new(),
            scrape: Mutex::new(()),
        }
    }

    /// Drains the latency samples recorded since the last upkeep into the histogram's buckets.
    /// The recorder keeps raw samples until then, so a server nobody scrapes must run this
    /// periodically ([`UPKEEP_INTERVAL`]) to keep its memory flat.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Records one decided request's latency.
    pub fn record_latency(&self, elapsed: Duration) {
        self.decision_latency.record(elapsed.as_secs_f64());
    }

    /// Records a strategy error.
    pub fn record_error(&self, kind: ErrorKind) {
        let index = match kind {
            ErrorKind::Unavailable => 0,
            ErrorKind::Timeout => 1,
            ErrorKind::Rejected => 2,
        };
        self.errors[index].increment(1);
    }

    /// Records a counted hit of `rule` in `domain` for the request descriptor `entries`, and its
    /// decision: under the rule's stat name, or for a `detailed_metric` rule under the
    /// descriptor itself ([`stat_key`]).
    pub fn record_hit<'e>(
        &self,
        domain: &str,
        rule: &Rule,
        entries: impl IntoIterator<Item = (&'e str, &'e str)>,
        hit: &Hit,
        decision: &Decision,
    ) {
        let key = stat_key(rule, entries);
        self.record_key_hit(domain, &key, hit, decision, rule.shadow_mode);
    }

    /// Records a counted hit under (`domain`, `key`). `shadow`: the rule is in shadow mode
    /// (over the limit is reported, not enforced).
    fn record_key_hit(
        &self,
        domain: &str,
        key: &str,
        hit: &Hit,
        decision: &Decision,
        shadow: bool,
    ) {
        {
            let rules = self.rules.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(counters) = rules.get(domain).and_then(|d| d.get(key)) {
                self.count(counters, hit, decision, shadow);
                return;
            }
        }
        if let Some(counters) = self.overflow.get() {
            self.count(counters, hit, decision, shadow);
            return;
        }
        let counters = self.register_rule(domain, key);
        self.count(&counters, hit, decision, shadow);
    }

    /// Adds one hit and its outcome to a rule's counters.
    fn count(&self, counters: &RuleCounters, hit: &Hit, decision: &Decision, shadow: bool) {
        let hits = u64::from(hit.addend);
        counters.total_hits.increment(hits);
        if decision.over_limit {
            counters.over_limit.increment(hits);
            if shadow {
                counters.shadow_mode.increment(hits);
            }
            return;
        }
        counters.within_limit.increment(hits);
        let limit = f64::from(hit.limit.requests_per_unit);
        if f64::from(decision.count) > (limit * self.near_limit_ratio).floor() {
            counters.near_limit.increment(hits);
        }
    }

    /// Registers the counters of (`domain`, `key`) (or finds them, registered meanwhile), or
    /// past the series cap the `_other` counters.
    fn register_rule(&self, domain: &str, key: &str) -> RuleCounters {
        let mut rules = self.rules.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(counters) = rules.get(domain).and_then(|d| d.get(key)) {
            return counters.clone();
        }
        let series: usize = rules.values().map(|d| d.len()).sum();
        let full = series >= MAX_RULE_SERIES;
        let (domain, key) = if full {
            ("_other", "_other")
        } else {
            (domain, key)
        };
        let register = |name: &'static str| {
            self.recorder.register_counter(
                &Key::from_parts(name, labels(&[("domain", domain), ("key", key)])),
                &metadata(),
            )
        };
        let counters = rules
            .entry(domain.into())
            .or_default()
            .entry(key.into())
            .or_insert_with(|| RuleCounters {
                total_hits: register("ratelimit_service_rate_limit_total_hits"),
                within_limit: register("ratelimit_service_rate_limit_within_limit"),
                near_limit: register("ratelimit_service_rate_limit_near_limit"),
                over_limit: register("ratelimit_service_rate_limit_over_limit"),
                shadow_mode: register("ratelimit_service_rate_limit_shadow_mode"),
            })
            .clone();
        if full {
            let _ = self.overflow.set(counters.clone());
        }
        counters
    }

    /// The exposition text: the request figures, with the figures of this moment set first.
    pub fn render(&self, now: &ScrapeFigures<'_>) -> String {
        let _one_scrape = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        self.set_scrape_figures(now);
        self.handle.render()
    }

    fn gauge(&self, name: &'static str, pairs: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels(pairs)), &metadata())
    }

    fn counter(&self, name: &'static str, pairs: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels(pairs)), &metadata())
    }

    fn set_scrape_figures(&self, now: &ScrapeFigures<'_>) {
        let strategy = now.strategy;
        for (state, name) in [
            (HealthState::Serving, "serving"),
            (HealthState::Degraded, "degraded"),
            (HealthState::Down, "down"),
        ] {
            let value = if now.status.health.state == state {
                1.0
            } else {
                0.0
            };
            self.gauge(
                "hivemind_strategy_health",
                &[("strategy", strategy), ("state", name)],
            )
            .set(value);
        }
        if let Some(counters) = &now.status.counters {
            self.gauge("hivemind_counter_keys", &[])
                .set(counters.live_keys as f64);
            self.gauge("hivemind_counter_keys_max", &[])
                .set(counters.max_keys as f64);
            self.counter("hivemind_counter_keys_expired_total", &[])
                .absolute(counters.expired_keys);
            self.counter("hivemind_counter_keys_evicted_total", &[])
                .absolute(counters.evicted_keys);
        }
        let mut figures = Vec::new();
        flatten_numbers("", &now.status.details, &mut figures);
        for (path, value) in figures.into_iter().take(MAX_BACKEND_GAUGES) {
            self.recorder
                .register_gauge(
                    &Key::from_parts(
                        format!("hivemind_backend_{path}"),
                        labels(&[("strategy", strategy)]),
                    ),
                    &metadata(),
                )
                .set(value);
        }
        self.gauge("hivemind_rules_info", &[("hash", now.rules_hash)])
            .set(1.0);
        if let Some(reload) = now.reload {
            self.counter("ratelimit_service_config_load_success", &[])
                .absolute(reload.loads);
            self.counter("ratelimit_service_config_load_error", &[])
                .absolute(reload.errors);
        }
    }
}

/// The `key` label of a hit of `rule` for the request descriptor `entries`: the rule's stat
/// name (its configured keys and values, `tenant.user`), or with `detailed_metric: true` the
/// descriptor's own entries as envoyproxy/ratelimit keys detailed stats, `key_value` per entry
/// (`key` alone for an empty value), '.' between them: `tenant_acme.user_alice`.
///
/// Request values are not trusted: characters that would need escaping in the exposition
/// format or that a stat name cannot hold (control characters, `"`, `\`) become `_`, and a
/// descriptor longer than [`MAX_DETAILED_KEY_BYTES`] counts under the rule's stat name.
pub fn stat_key<'r, 'e>(
    rule: &'r Rule,
    entries: impl IntoIterator<Item = (&'e str, &'e str)>,
) -> Cow<'r, str> {
    if !rule.detailed_metric {
        return Cow::Borrowed(&rule.stat_name);
    }
    let mut key = String::new();
    for (name, value) in entries {
        if !key.is_empty() {
            key.push('.');
        }
        key.push_str(name);
        if !value.is_empty() {
            key.push('_');
            key.push_str(value);
        }
        if key.len() > MAX_DETAILED_KEY_BYTES {
            return Cow::Borrowed(&rule.stat_name);
        }
    }
    let unfit = |c: char| c.is_control() || c == '"' || c == '\\';
    if key.contains(unfit) {
        key = key
            .chars()
            .map(|c| if unfit(c) { '_' } else { c })
            .collect();
    }
    Cow::Owned(key)
}

/// What a scrape reads at its moment.
pub struct ScrapeFigures<'a> {
    /// The strategy's name (`gossip`, `standalone`, `redis`).
    pub strategy: &'a str,
    /// Its status now.
    pub status: &'a StrategyStatus,
    /// The hash of the rules in force.
    pub rules_hash: &'a str,
    /// The reloader's counts, when the rules come from a watched path.
    pub reload: Option<&'a ReloadStatus>,
}

/// Every number under `value`, named by its path (`a_b_c`, non-alphanumerics as `_`); booleans
/// count as 0/1. Arrays are skipped: their positions are not stable names.
fn flatten_numbers(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, f64)>) {
    match value {
        serde_json::Value::Number(n) => {
            if let (false, Some(v)) = (prefix.is_empty(), n.as_f64()) {
                out.push((prefix.to_owned(), v));
            }
        }
        serde_json::Value::Bool(b) if !prefix.is_empty() => {
            out.push((prefix.to_owned(), f64::from(u8::from(*b))));
        }
        serde_json::Value::Object(map) => {
            for (name, child) in map {
                let name: String = name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let path = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}_{name}")
                };
                flatten_numbers(&path, child, out);
            }
        }
        _ => {}
    }
}

/// The shared handle the limiter and the admin router hold.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleSet;
    use hivemind_core::{Enforcement, Health, Limit, Unit};

    fn hit(limit: u32, addend: u32) -> Hit {
        Hit {
            key: "d|k=v#minute".into(),
            limit: Limit {
                requests_per_unit: limit,
                unit: Unit::Minute,
            },
            addend,
            enforcement: Enforcement::Enforce,
        }
    }

    fn decision(count: u32, over_limit: bool) -> Decision {
        Decision {
            over_limit,
            count,
            remaining: 0,
            until_reset: Duration::from_secs(1),
        }
    }

    fn line<'t>(text: &'t str, series: &str) -> Option<&'t str> {
        text.lines()
            .find(|l| l.starts_with(series))
            .map(|l| l[series.len()..].trim())
    }

    #[test]
    fn hits_are_counted_by_outcome_with_the_near_limit_ratio() {
        let metrics = Metrics::new(0.8);
        // Limit 10: counts 1..=8 within, 9 and 10 near, then over.
        for count in 1..=10 {
            metrics.record_key_hit("api", "user", &hit(10, 1), &decision(count, false), false);
        }
        metrics.record_key_hit("api", "user", &hit(10, 2), &decision(10, true), true);
        metrics.record_error(ErrorKind::Timeout);
        metrics.record_error(ErrorKind::Timeout);
        let status = StrategyStatus {
            health: Health::serving(Vec::new()),
            counters: None,
            details: serde_json::json!({"peers": {"live": 2}, "name": "x", "up": true}),
        };
        let text = metrics.render(&ScrapeFigures {
            strategy: "gossip",
            status: &status,
            rules_hash: "abc",
            reload: None,
        });
        let labels = r#"{domain="api",key="user"}"#;
        let value = |name: &str| line(&text, &format!("{name}{labels}"));
        assert_eq!(
            value("ratelimit_service_rate_limit_total_hits"),
            Some("12"),
            "{text}"
        );
        assert_eq!(
            value("ratelimit_service_rate_limit_within_limit"),
            Some("10")
        );
        assert_eq!(value("ratelimit_service_rate_limit_near_limit"), Some("2"));
        assert_eq!(value("ratelimit_service_rate_limit_over_limit"), Some("2"));
        assert_eq!(value("ratelimit_service_rate_limit_shadow_mode"), Some("2"));
        assert_eq!(
            line(&text, r#"hivemind_backend_peers_live{strategy="gossip"}"#),
            Some("2"),
            "{text}"
        );
        assert_eq!(
            line(&text, r#"hivemind_backend_up{strategy="gossip"}"#),
            Some("1")
        );
        assert_eq!(
            line(
                &text,
                r#"hivemind_strategy_health{strategy="gossip",state="serving"}"#
            ),
            Some("1")
        );
        assert_eq!(line(&text, r#"hivemind_rules_info{hash="abc"}"#), Some("1"));
        assert_eq!(
            line(&text, r#"hivemind_strategy_errors_total{kind="timeout"}"#),
            Some("2")
        );
        assert_eq!(
            line(
                &text,
                r#"hivemind_strategy_errors_total{kind="unavailable"}"#
            ),
            Some("0")
        );
        // Strings in the details are not numbers: no series.
        assert!(!text.contains("hivemind_backend_name"), "{text}");
    }

    #[test]
    fn rule_series_are_bounded() {
        let metrics = Metrics::new(0.8);
        for i in 0..MAX_RULE_SERIES + 5 {
            let key = format!("k{i}");
            metrics.record_key_hit("d", &key, &hit(10, 1), &decision(1, false), false);
        }
        let rules = metrics.rules.read().unwrap();
        let series: usize = rules.values().map(|d| d.len()).sum();
        assert_eq!(series, MAX_RULE_SERIES + 1, "the rest share _other");
        assert!(rules["_other"].contains_key("_other"));
        drop(rules);
        let text = render(&metrics);
        assert_eq!(
            line(
                &text,
                r#"ratelimit_service_rate_limit_total_hits{domain="_other",key="_other"}"#
            ),
            Some("5"),
        );
    }

    fn render(metrics: &Metrics) -> String {
        let status = StrategyStatus {
            health: Health::serving(Vec::new()),
            counters: None,
            details: serde_json::json!({}),
        };
        metrics.render(&ScrapeFigures {
            strategy: "standalone",
            status: &status,
            rules_hash: "h",
            reload: None,
        })
    }

    const DETAILED: &str = r#"
domain: api
descriptors:
  - key: api_key
    detailed_metric: true
    rate_limit: { unit: minute, requests_per_unit: 3 }
  - key: tenant
    descriptors:
      - key: user
        detailed_metric: true
        rate_limit: { unit: hour, requests_per_unit: 10 }
  - key: plan
    rate_limit: { unit: minute, requests_per_unit: 5 }
"#;

    /// Records one hit of the rule `entries` match in [`DETAILED`].
    fn hit_rule(metrics: &Metrics, rules: &RuleSet, entries: &[(&str, &str)]) {
        let found = rules.domain("api").unwrap().find(entries).expect("a rule");
        let entries = entries.iter().copied();
        metrics.record_hit("api", found.rule, entries, &hit(10, 1), &decision(1, false));
    }

    #[test]
    fn detailed_metric_rules_report_the_request_values_and_plain_rules_do_not() {
        let rules = RuleSet::from_sources(&[("api.yaml".into(), DETAILED.into())]).unwrap();
        let metrics = Metrics::new(0.8);
        hit_rule(&metrics, &rules, &[("api_key", "alice")]);
        hit_rule(&metrics, &rules, &[("api_key", "alice")]);
        hit_rule(&metrics, &rules, &[("api_key", "bob")]);
        hit_rule(&metrics, &rules, &[("tenant", "acme"), ("user", "carol")]);
        hit_rule(&metrics, &rules, &[("plan", "gold")]);
        hit_rule(&metrics, &rules, &[("plan", "silver")]);
        let text = render(&metrics);
        let hits = |key: &str| {
            line(
                &text,
                &format!(r#"ratelimit_service_rate_limit_total_hits{{domain="api",key="{key}"}}"#),
            )
        };
        assert_eq!(hits("api_key_alice"), Some("2"), "{text}");
        assert_eq!(hits("api_key_bob"), Some("1"));
        assert_eq!(
            hits("tenant_acme.user_carol"),
            Some("1"),
            "every level's value"
        );
        assert_eq!(
            hits("api_key"),
            None,
            "a detailed rule has no rolled-up series"
        );
        // The plain rule: its stat name only, no request value.
        assert_eq!(hits("plan"), Some("2"));
        assert!(!text.contains("gold") && !text.contains("silver"), "{text}");
        // The other outcome series carry the same keys.
        assert_eq!(
            line(
                &text,
                r#"ratelimit_service_rate_limit_within_limit{domain="api",key="api_key_bob"}"#
            ),
            Some("1")
        );
    }

    #[test]
    fn detailed_keys_from_requests_are_sanitized_and_bounded() {
        let rules = RuleSet::from_sources(&[("api.yaml".into(), DETAILED.into())]).unwrap();
        let rule = rules
            .domain("api")
            .unwrap()
            .find(&[("api_key", "x")])
            .unwrap()
            .rule;
        let key = |value: &str| stat_key(rule, [("api_key", value)]).into_owned();
        assert_eq!(key("a\"}\n\\b"), "api_key_a_}__b");
        assert_eq!(
            key(""),
            "api_key",
            "an empty value adds nothing, as upstream"
        );
        let long = "v".repeat(MAX_DETAILED_KEY_BYTES);
        assert_eq!(key(&long), "api_key", "too long: the rule's stat name");

        // Past the series cap every new value counts under _other, which renders once.
        let metrics = Metrics::new(0.8);
        for i in 0..MAX_RULE_SERIES + 100 {
            let value = format!("k{i}");
            hit_rule(&metrics, &rules, &[("api_key", &value)]);
        }
        let text = render(&metrics);
        let other = r#"ratelimit_service_rate_limit_total_hits{domain="_other",key="_other"}"#;
        assert_eq!(line(&text, other), Some("100"));
        assert_eq!(text.matches(other).count(), 1);
        assert!(!text.contains(&format!("api_key_k{MAX_RULE_SERIES}\"")));
    }
}
