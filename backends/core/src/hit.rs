//! What the rate limit service asks of a strategy and what it gets back.
//!
//! One Envoy request becomes a batch of [`Hit`]s, one per request descriptor that matched a limit.
//! A strategy answers with one [`Decision`] per hit. The batch is admitted or rejected as a whole
//! ([`request_admitted`]); only an admitted batch is counted, so a client hammering a limit cannot
//! push a window past it.

use std::time::Duration;

use crate::window::Unit;

/// A limit: at most `requests_per_unit` hits in each window of `unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Hits allowed per window; 0 blocks everything.
    pub requests_per_unit: u32,
    /// The window length.
    pub unit: Unit,
}

/// How a hit's outcome affects the request (the rules' `shadow_mode` and `quota_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Enforcement {
    /// Over the limit rejects the request.
    #[default]
    Enforce,
    /// Counted and reported, never rejects (`shadow_mode: true`).
    Shadow,
    /// A soft limit: the request is rejected only if every quota hit of it is over
    /// (`quota_mode: true`).
    Quota,
}

/// One counter increment that a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The counter this hit goes to; every node derives the same key for the same descriptor.
    /// It does not include the window: strategies pair it with the window themselves.
    pub key: String,
    /// The limit that applies to the counter.
    pub limit: Limit,
    /// How many hits this request adds (Envoy's `hits_addend`, at least 1 unless a descriptor
    /// asks for 0).
    pub addend: u32,
    /// Whether being over the limit rejects the request.
    pub enforcement: Enforcement,
}

/// A strategy's answer for one hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The counter plus this hit's addend exceeds the limit.
    pub over_limit: bool,
    /// The window's count after this request (unchanged if the request was not counted).
    pub count: u32,
    /// `limit - count`, 0 when over the limit.
    pub remaining: u32,
    /// Time until the window resets (whole seconds, as envoyproxy/ratelimit reports it).
    pub until_reset: Duration,
}

/// Whether a request with these hit outcomes is admitted: no enforced hit is over its limit, and
/// if the request has quota-mode hits, at least one of them is within its limit. Shadow hits never
/// reject. This is the overall code of envoyproxy/ratelimit's `shouldRateLimitWorker`.
pub fn request_admitted(outcomes: impl IntoIterator<Item = (Enforcement, bool)>) -> bool {
    let mut quota_hits = 0usize;
    let mut quota_over = 0usize;
    for (enforcement, over_limit) in outcomes {
        match enforcement {
            Enforcement::Enforce if over_limit => return false,
            Enforcement::Enforce | Enforcement::Shadow => {}
            Enforcement::Quota => {
                quota_hits += 1;
                quota_over += usize::from(over_limit);
            }
        }
    }
    quota_hits == 0 || quota_over < quota_hits
}

#[cfg(test)]
mod tests {
    use super::*;
    use Enforcement::*;

    #[test]
    fn an_enforced_hit_over_its_limit_rejects_the_request() {
        assert!(request_admitted([]));
        assert!(request_admitted([(Enforce, false), (Enforce, false)]));
        assert!(!request_admitted([(Enforce, false), (Enforce, true)]));
    }

    #[test]
    fn shadow_hits_never_reject() {
        assert!(request_admitted([(Shadow, true)]));
        assert!(!request_admitted([(Shadow, false), (Enforce, true)]));
    }

    #[test]
    fn quota_hits_reject_only_when_all_are_over() {
        assert!(request_admitted([(Quota, true), (Quota, false)]));
        assert!(!request_admitted([(Quota, true), (Quota, true)]));
        assert!(!request_admitted([(Quota, true)]));
        assert!(!request_admitted([(Quota, false), (Enforce, true)]));
        assert!(request_admitted([(Quota, false), (Shadow, true)]));
    }
}
