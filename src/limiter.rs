//! One rate limit decision, independent of transport: the gRPC service and the admin `/json`
//! endpoint both call [`Limiter::decide`].
//!
//! A request's descriptors are resolved against the rules (or Envoy's per-descriptor override),
//! `replaces` drops superseded limits, every remaining limit becomes a [`Hit`], the strategy checks
//! them in one call, and the decisions become Envoy's response: one status per descriptor, in
//! order, and the overall code.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hivemind_core::{
    request_admitted, Clock, Decision, Enforcement, Hit, Limit, StrategyError, SyncStrategy, Unit,
};
use smallvec::SmallVec;

use crate::metrics::Metrics;
use crate::proto::{
    Code, CurrentLimit, DescriptorEntry, DescriptorStatus, HeaderValue, ProtoUnit,
    RateLimitDescriptor, RateLimitRequest, RateLimitResponse,
};
use crate::rules::{RateLimit, Rule, RuleSet};
use crate::settings::ResponseSettings;

/// The rules in force, swapped whole on reload so requests never wait for one.
pub type RulesStore = ArcSwap<RuleSet>;

/// Why a request could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The request is malformed (empty domain, no descriptors, empty descriptor).
    #[error("{0}")]
    InvalidRequest(&'static str),
    /// The strategy could not decide.
    #[error(transparent)]
    Strategy(#[from] StrategyError),
}

impl LimitError {
    /// The gRPC status for this error. Strategy failures are transient (`UNAVAILABLE`) so that
    /// Envoy's `failure_mode_deny` decides what happens.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            LimitError::InvalidRequest(msg) => tonic::Status::invalid_argument(*msg),
            LimitError::Strategy(e) if e.is_transient() => {
                tonic::Status::unavailable(e.to_string())
            }
            LimitError::Strategy(e) => tonic::Status::internal(e.to_string()),
        }
    }
}

/// What a descriptor resolved to.
#[derive(Debug, Clone, Copy)]
enum Plan<'r> {
    /// No rule matched, or the rule was replaced: OK, no limit.
    NoLimit,
    /// `unlimited: true`: OK, `limit_remaining = u32::MAX`, nothing counted.
    Unlimited,
    /// Counted as `hits[index]`.
    Counted { index: usize, name: Option<&'r str> },
}

/// Descriptors per request held without a heap allocation (Envoy routes rarely send more).
const INLINE_DESCRIPTORS: usize = 4;

/// A request's hits, in descriptor order.
type Hits = SmallVec<[Hit; INLINE_DESCRIPTORS]>;

/// Decides rate limit requests against the rules in force through one strategy.
pub struct Limiter {
    /// The rules, swapped by the reloader.
    rules: Arc<RulesStore>,
    /// Where counts live.
    strategy: Arc<dyn SyncStrategy>,
    /// Wall-clock time, read once per request (replaceable in tests).
    clock: Arc<dyn Clock>,
    /// Optional `RateLimit-*` response headers.
    response: ResponseSettings,
    /// Where decisions, latencies and strategy errors are counted (absent in benches and tests
    /// that do not look).
    metrics: Option<Arc<Metrics>>,
}

impl Limiter {
    /// A limiter over `rules` counting through `strategy`.
    pub fn new(
        rules: Arc<RulesStore>,
        strategy: Arc<dyn SyncStrategy>,
        clock: Arc<dyn Clock>,
        response: ResponseSettings,
    ) -> Self {
        Limiter {
            rules,
            strategy,
            clock,
            response,
            metrics: None,
        }
    }

    /// The same limiter, recording into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The metrics it records into, if any.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    /// The rules in force.
    pub fn rules(&self) -> &Arc<RulesStore> {
        &self.rules
    }

    /// The strategy counts go through.
    pub fn strategy(&self) -> &Arc<dyn SyncStrategy> {
        &self.strategy
    }

    /// Decides one request.
    pub async fn decide(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, LimitError> {
        if request.domain.is_empty() {
            return Err(LimitError::InvalidRequest(
                "rate limit domain must not be empty",
            ));
        }
        if request.descriptors.is_empty() {
            return Err(LimitError::InvalidRequest(
                "rate limit descriptor list must not be empty",
            ));
        }
        if request.descriptors.iter().any(|d| d.entries.is_empty()) {
            return Err(LimitError::InvalidRequest(
                "rate limit descriptor must have at least one entry",
            ));
        }
        // The metrics to record into and the request's start, read only when there are metrics.
        let recording = self
            .metrics
            .as_ref()
            .map(|metrics| (metrics, Instant::now()));
        let rules = self.rules.load();
        let now = self.clock.now();
        let request_addend = if request.hits_addend == 0 {
            1
        } else {
            request.hits_addend
        };

        // Inline up to INLINE_DESCRIPTORS: a request with a few descriptors allocates nothing
        // here (`benches/decision.rs` prints allocations per decide).
        let mut hits: Hits = SmallVec::new();
        let mut plans: SmallVec<[Plan<'_>; INLINE_DESCRIPTORS]> = SmallVec::new();
        let mut matched: SmallVec<[Option<&Rule>; INLINE_DESCRIPTORS]> = SmallVec::new();
        let domain = rules.domain(&request.domain);
        for descriptor in &request.descriptors {
            let addend = descriptor
                .hits_addend
                .map_or(request_addend, |a| u32::try_from(a).unwrap_or(u32::MAX));
            if descriptor.is_negative_hits {
                // A refund of earlier hits (newer Envoy). Not supported yet: answering OK without
                // counting is the safe reading, where counting would charge the refund as hits.
                plans.push(Plan::NoLimit);
                matched.push(None);
                continue;
            }
            if let Some(limit) = override_limit(descriptor) {
                // Envoy's override bypasses the rules (and so never runs in shadow mode).
                plans.push(Plan::Counted {
                    index: hits.len(),
                    name: None,
                });
                matched.push(None);
                hits.push(Hit {
                    key: counter_key(&request.domain, &descriptor.entries, &[], limit.unit),
                    limit,
                    addend,
                    enforcement: Enforcement::Enforce,
                });
                continue;
            }
            let found = domain.and_then(|d| {
                d.find_entries(
                    descriptor
                        .entries
                        .iter()
                        .map(|e| (e.key.as_str(), e.value.as_str())),
                )
            });
            let Some(found) = found else {
                plans.push(Plan::NoLimit);
                matched.push(None);
                continue;
            };
            match &found.rule.limit {
                RateLimit::Unlimited => {
                    plans.push(Plan::Unlimited);
                    matched.push(Some(found.rule));
                }
                RateLimit::Limited {
                    requests_per_unit,
                    unit,
                    name,
                    ..
                } => {
                    plans.push(Plan::Counted {
                        index: hits.len(),
                        name: name.as_deref(),
                    });
                    matched.push(Some(found.rule));
                    hits.push(Hit {
                        key: counter_key(
                            &request.domain,
                            &descriptor.entries,
                            &found.shared_values,
                            *unit,
                        ),
                        limit: Limit {
                            requests_per_unit: *requests_per_unit,
                            unit: *unit,
                        },
                        addend,
                        enforcement: enforcement_of(found.rule),
                    });
                }
            }
        }

        let hits = drop_replaced(&mut plans, &matched, hits);
        let decisions = if hits.is_empty() {
            Vec::new()
        } else {
            match self.strategy.check(&hits, now).await {
                Ok(decisions) => decisions,
                Err(e) => {
                    if let Some((metrics, _)) = recording {
                        metrics.record_error(e.kind());
                    }
                    return Err(e.into());
                }
            }
        };
        let response = self.respond(&plans, &hits, &decisions);
        if let Some((metrics, started)) = recording {
            // One plan and one match per request descriptor, in order.
            let counted = plans.iter().zip(&matched).zip(&request.descriptors);
            for ((plan, rule), descriptor) in counted {
                if let (Plan::Counted { index, .. }, Some(rule)) = (plan, rule) {
                    let entries = descriptor.entries.iter();
                    metrics.record_hit(
                        &request.domain,
                        rule,
                        entries.map(|e| (e.key.as_str(), e.value.as_str())),
                        &hits[*index],
                        &decisions[*index],
                    );
                }
            }
            metrics.record_latency(started.elapsed());
        }
        Ok(response)
    }

    fn respond(
        &self,
        plans: &[Plan<'_>],
        hits: &[Hit],
        decisions: &[Decision],
    ) -> RateLimitResponse {
        let mut statuses = Vec::with_capacity(plans.len());
        for plan in plans {
            let status = match *plan {
                Plan::NoLimit => DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                },
                Plan::Unlimited => DescriptorStatus {
                    code: Code::Ok as i32,
                    limit_remaining: u32::MAX,
                    ..Default::default()
                },
                Plan::Counted { index, name } => {
                    let (hit, decision) = (&hits[index], &decisions[index]);
                    let over = decision.over_limit && hit.enforcement != Enforcement::Shadow;
                    DescriptorStatus {
                        code: if over { Code::OverLimit } else { Code::Ok } as i32,
                        current_limit: Some(CurrentLimit {
                            name: name.unwrap_or_default().to_owned(),
                            requests_per_unit: hit.limit.requests_per_unit,
                            unit: proto_unit(hit.limit.unit) as i32,
                        }),
                        limit_remaining: decision.remaining,
                        duration_until_reset: Some(proto_duration(decision.until_reset)),
                        quota: None,
                    }
                }
            };
            statuses.push(status);
        }
        let admitted = request_admitted(
            hits.iter()
                .zip(decisions)
                .map(|(hit, decision)| (hit.enforcement, decision.over_limit)),
        );
        let response_headers_to_add = if self.response.rate_limit_headers {
            self.rate_limit_headers(&statuses)
        } else {
            Vec::new()
        };
        RateLimitResponse {
            overall_code: if admitted { Code::Ok } else { Code::OverLimit } as i32,
            statuses,
            response_headers_to_add,
            ..Default::default()
        }
    }

    /// `RateLimit-Limit/-Remaining/-Reset` from the limited descriptor closest to its limit.
    fn rate_limit_headers(&self, statuses: &[DescriptorStatus]) -> Vec<HeaderValue> {
        let closest = statuses
            .iter()
            .filter(|s| s.current_limit.is_some())
            .min_by_key(|s| s.limit_remaining);
        let Some(status) = closest else {
            return Vec::new();
        };
        let limit = status
            .current_limit
            .as_ref()
            .map_or(0, |l| l.requests_per_unit);
        let reset = status
            .duration_until_reset
            .as_ref()
            .map_or(0, |d| d.seconds);
        let header = |key: &str, value: String| HeaderValue {
            key: key.to_owned(),
            value,
            ..Default::default()
        };
        vec![
            header(&self.response.limit_header, limit.to_string()),
            header(
                &self.response.remaining_header,
                status.limit_remaining.to_string(),
            ),
            header(&self.response.reset_header, reset.to_string()),
        ]
    }
}

/// Drops matched limits whose `name` another matched limit `replaces`; returns the hits left,
/// renumbering the plans that point into them.
fn drop_replaced(plans: &mut [Plan<'_>], matched: &[Option<&Rule>], hits: Hits) -> Hits {
    let replaced: HashSet<&str> = matched
        .iter()
        .flatten()
        // An unlimited rule's `replaces` apply too, as in envoyproxy/ratelimit
        // (`constructLimitsToCheck` collects replaces before it drops unlimited limits).
        .flat_map(|rule| rule.replaces())
        .map(String::as_str)
        .collect();
    if replaced.is_empty() {
        return hits;
    }
    let mut kept = Hits::new();
    let mut hits: Vec<Option<Hit>> = hits.into_iter().map(Some).collect();
    for plan in plans.iter_mut() {
        if let Plan::Counted { index, name } = *plan {
            if name.is_some_and(|n| replaced.contains(n)) {
                *plan = Plan::NoLimit;
            } else if let Some(hit) = hits[index].take() {
                *plan = Plan::Counted {
                    index: kept.len(),
                    name,
                };
                kept.push(hit);
            }
        }
    }
    kept
}

fn enforcement_of(rule: &Rule) -> Enforcement {
    if rule.shadow_mode {
        Enforcement::Shadow
    } else if rule.quota_mode {
        Enforcement::Quota
    } else {
        Enforcement::Enforce
    }
}

/// Envoy's per-descriptor limit override, if it names a known unit.
fn override_limit(descriptor: &RateLimitDescriptor) -> Option<Limit> {
    let limit = descriptor.limit.as_ref()?;
    let unit = core_unit(limit.unit)?;
    Some(Limit {
        requests_per_unit: limit.requests_per_unit,
        unit,
    })
}

/// The unit of an `envoy.type.v3.RateLimitUnit` / response `Unit` number (they share values).
pub fn core_unit(value: i32) -> Option<Unit> {
    Some(match ProtoUnit::try_from(value).ok()? {
        ProtoUnit::Unknown => return None,
        ProtoUnit::Second => Unit::Second,
        ProtoUnit::Minute => Unit::Minute,
        ProtoUnit::Hour => Unit::Hour,
        ProtoUnit::Day => Unit::Day,
        ProtoUnit::Week => Unit::Week,
        ProtoUnit::Month => Unit::Month,
        ProtoUnit::Year => Unit::Year,
    })
}

/// The response unit of a rules unit.
pub fn proto_unit(unit: Unit) -> ProtoUnit {
    match unit {
        Unit::Second => ProtoUnit::Second,
        Unit::Minute => ProtoUnit::Minute,
        Unit::Hour => ProtoUnit::Hour,
        Unit::Day => ProtoUnit::Day,
        Unit::Week => ProtoUnit::Week,
        Unit::Month => ProtoUnit::Month,
        Unit::Year => ProtoUnit::Year,
    }
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// Counter keys longer than this are replaced by a fixed-length digest, so memory per key is
/// bounded by the number of keys, not by what clients send (values of up to megabytes).
pub const MAX_COUNTER_KEY_BYTES: usize = 64;

/// The counter key of a descriptor: domain, then each entry as `key=value` (or the wildcard
/// pattern where the rule has `share_threshold`), then the unit. `|`, `=`, `#` and `\` inside
/// names are escaped so distinct descriptors never share a key. Every node derives the same key.
///
/// A key longer than [`MAX_COUNTER_KEY_BYTES`] becomes `~` + the first 128 bits of its SHA-256
/// in hex + `#unit`: still the same on every node, and a crafted value cannot be made to share
/// a victim's counter (that would take a second preimage of SHA-256/128). It never equals a
/// plain key, which always holds a `|`.
pub fn counter_key(
    domain: &str,
    entries: &[DescriptorEntry],
    shared_values: &[(usize, &str)],
    unit: Unit,
) -> String {
    let len = domain.len()
        + entries
            .iter()
            .map(|e| e.key.len() + e.value.len() + 2)
            .sum::<usize>()
        + 8;
    let mut key = String::with_capacity(len);
    push_escaped(&mut key, domain);
    for (i, entry) in entries.iter().enumerate() {
        key.push('|');
        push_escaped(&mut key, &entry.key);
        key.push('=');
        let value = shared_values
            .iter()
            .find(|(at, _)| *at == i)
            .map_or(entry.value.as_str(), |(_, pattern)| pattern);
        push_escaped(&mut key, value);
    }
    key.push('#');
    key.push_str(unit.as_str());
    if key.len() > MAX_COUNTER_KEY_BYTES {
        return digest_key(&key, unit);
    }
    key
}

/// `~` + 32 hex digits of SHA-256(`key`) + `#unit`.
fn digest_key(key: &str, unit: Unit) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write as _;
    let digest = Sha256::digest(key.as_bytes());
    let mut short = String::with_capacity(1 + 32 + 1 + unit.as_str().len());
    short.push('~');
    for byte in &digest[..16] {
        let _ = write!(short, "{byte:02x}");
    }
    short.push('#');
    short.push_str(unit.as_str());
    short
}

fn push_escaped(out: &mut String, text: &str) {
    if !text.contains(['|', '=', '#', '\\']) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        if matches!(c, '|' | '=' | '#' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str) -> DescriptorEntry {
        DescriptorEntry {
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn counter_keys_are_unambiguous() {
        let a = counter_key("d", &[entry("a|b", "c")], &[], Unit::Second);
        let b = counter_key("d", &[entry("a", "b|c")], &[], Unit::Second);
        let c = counter_key("d", &[entry("a", "b"), entry("c", "")], &[], Unit::Second);
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_eq!(
            counter_key("d", &[entry("k", "v")], &[], Unit::Minute),
            "d|k=v#minute"
        );
        assert_ne!(
            counter_key("d", &[entry("k", "v")], &[], Unit::Minute),
            counter_key("d", &[entry("k", "v")], &[], Unit::Hour)
        );
    }

    #[test]
    fn long_keys_become_a_fixed_length_digest() {
        let huge = "x".repeat(4 << 20);
        let a = counter_key("d", &[entry("ua", &huge)], &[], Unit::Minute);
        assert_eq!(a.len(), 1 + 32 + "#minute".len());
        assert!(a.starts_with('~') && a.ends_with("#minute"), "{a}");
        assert!(!a.contains('|'), "never equal to a plain key");
        // Deterministic, so every node derives the same counter.
        assert_eq!(
            a,
            counter_key("d", &[entry("ua", &huge)], &[], Unit::Minute)
        );
        let mut other = huge.clone();
        other.push('y');
        assert_ne!(
            a,
            counter_key("d", &[entry("ua", &other)], &[], Unit::Minute)
        );
        // Keys within the bound stay readable.
        let short = counter_key("d", &[entry("k", "v")], &[], Unit::Minute);
        assert!(short.len() <= MAX_COUNTER_KEY_BYTES);
        assert_eq!(short, "d|k=v#minute");
        let edge = "v".repeat(MAX_COUNTER_KEY_BYTES - "d|k=#minute".len());
        let at_bound = counter_key("d", &[entry("k", &edge)], &[], Unit::Minute);
        assert_eq!(at_bound.len(), MAX_COUNTER_KEY_BYTES);
        assert!(at_bound.contains('|'));
    }

    #[test]
    fn shared_values_replace_the_request_value() {
        let key = counter_key(
            "d",
            &[entry("path", "/api/7/action")],
            &[(0, "/api/*/action")],
            Unit::Minute,
        );
        assert_eq!(key, "d|path=/api/*/action#minute");
    }

    #[test]
    fn units_map_both_ways() {
        for unit in Unit::ALL {
            assert_eq!(core_unit(proto_unit(unit) as i32), Some(unit));
        }
        assert_eq!(core_unit(0), None);
        assert_eq!(core_unit(99), None);
    }
}
