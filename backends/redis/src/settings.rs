//! The `redis` settings section (strategy `redis`). Every field has a default (see
//! `config/hivemind.yaml`); the password inside a URL is redacted by `Debug` and `Serialize`.

use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

/// What the strategy answers while Redis cannot be reached or does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Admit every request (fail open).
    Allow,
    /// Reject every request (fail closed).
    Deny,
    /// Answer gRPC UNAVAILABLE, so Envoy's `failure_mode_deny` decides (the default).
    #[default]
    Error,
    /// Count locally with each limit divided by `expected_nodes`, until Redis answers again.
    Local,
}

impl FailurePolicy {
    /// The name used in settings.
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Allow => "allow",
            FailurePolicy::Deny => "deny",
            FailurePolicy::Error => "error",
            FailurePolicy::Local => "local",
        }
    }
}

/// The `redis` settings section.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// The server: `redis://[user[:password]@]host:port[/db]`, or `rediss://` for TLS.
    /// Ignored when `cluster_nodes` is set. Printed with the password redacted.
    #[serde(serialize_with = "redacted_url")]
    pub url: String,
    /// Redis Cluster seed nodes (URLs as `url`, comma-separated in flags and env); when
    /// non-empty the cluster client is used (it follows MOVED/ASK itself).
    #[serde(
        serialize_with = "redacted_urls",
        deserialize_with = "hivemind_core::settings::comma_separated"
    )]
    pub cluster_nodes: Vec<String>,
    /// Prepended to every key, so several deployments can share one Redis. Must not contain
    /// `{` or `}` (the hash tag follows it).
    pub key_prefix: String,
    /// How long one connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long one request's script call may take before the failure policy answers it
    /// (keep it well under Envoy's rate limit filter timeout, 20 ms by default).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// What to answer while Redis is unreachable or slow: allow, deny, error or local.
    pub on_failure: FailurePolicy,
    /// How many hivemind nodes share the limits: policy `local` divides each limit by it.
    pub expected_nodes: u32,
    /// Remember keys known to be over their limit until their window ends and answer those
    /// requests without a round trip.
    pub over_limit_cache: bool,
    /// Consecutive failed calls after which Redis counts as down (every later request goes
    /// straight to the failure policy until a probe succeeds). A refused or dropped connection
    /// counts as down at once.
    pub failures_to_down: u32,
    /// The first wait between reconnection probes while Redis is down; it doubles per failure.
    #[serde(with = "humantime_serde")]
    pub reconnect_min_backoff: Duration,
    /// The longest wait between reconnection probes.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_backoff: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: "redis://127.0.0.1:6379".into(),
            cluster_nodes: Vec::new(),
            key_prefix: "hivemind:".into(),
            connect_timeout: Duration::from_millis(500),
            timeout: Duration::from_millis(10),
            on_failure: FailurePolicy::Error,
            expected_nodes: 1,
            over_limit_cache: true,
            failures_to_down: 3,
            reconnect_min_backoff: Duration::from_millis(50),
            reconnect_max_backoff: Duration::from_secs(2),
        }
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<String> = self.cluster_nodes.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field("cluster_nodes", &nodes)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("on_failure", &self.on_failure)
            .field("expected_nodes", &self.expected_nodes)
            .field("over_limit_cache", &self.over_limit_cache)
            .field("failures_to_down", &self.failures_to_down)
            .field("reconnect_min_backoff", &self.reconnect_min_backoff)
            .field("reconnect_max_backoff", &self.reconnect_max_backoff)
            .finish()
    }
}

/// Why the redis settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("redis settings: {0}")]
pub struct RedisSettingsError(pub String);

impl RedisSettings {
    /// Checks what serde cannot: URL schemes, the key prefix, non-zero figures.
    pub fn validate(&self) -> Result<(), RedisSettingsError> {
        let err = |m: String| Err(RedisSettingsError(m));
        let urls: Vec<&String> = if self.cluster_nodes.is_empty() {
            vec![&self.url]
        } else {
            self.cluster_nodes.iter().collect()
        };
        for url in urls {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return err(format!(
                    "{} is not a redis:// or rediss:// URL",
                    redact_url(url)
                ));
            }
        }
        if self.key_prefix.contains(['{', '}']) {
            return err(format!(
                "redis.key_prefix {:?} must not contain {{ or }} (the hash tag follows it)",
                self.key_prefix
            ));
        }
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return err("redis.timeout and redis.connect_timeout must be above 0".into());
        }
        if self.expected_nodes == 0 {
            return err("redis.expected_nodes must be at least 1".into());
        }
        if self.reconnect_min_backoff.is_zero()
            || self.reconnect_max_backoff < self.reconnect_min_backoff
        {
            return err(
                "redis.reconnect_min_backoff must be above 0 and at most reconnect_max_backoff"
                    .into(),
            );
        }
        Ok(())
    }

    /// Where the strategy connects, password redacted, for logs and `/stats`.
    pub fn target(&self) -> String {
        if self.cluster_nodes.is_empty() {
            redact_url(&self.url)
        } else {
            let nodes: Vec<String> = self.cluster_nodes.iter().map(|u| redact_url(u)).collect();
            format!("cluster {}", nodes.join(","))
        }
    }
}

/// The URL with the password (between `user:` and `@` of the authority) replaced by
/// `<redacted>`; a URL without a password is unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:<redacted>"),
        // `redis://secret@host`: a lone userinfo is the password in redis-rs.
        None if !userinfo.is_empty() => "<redacted>".to_owned(),
        None => String::new(),
    };
    format!("{}{}@{}", &url[..scheme_end + 3], shown, &rest[at + 1..])
}

fn redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

fn redacted_urls<S: Serializer>(urls: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(urls.iter().map(|u| redact_url(u)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_everywhere() {
        assert_eq!(
            redact_url("redis://alice:hunter2@h:6379/0"),
            "redis://alice:<redacted>@h:6379/0"
        );
        assert_eq!(
            redact_url("rediss://:hunter2@h:6380"),
            "rediss://:<redacted>@h:6380"
        );
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("redis://hunter2@h"), "redis://<redacted>@h");
        let settings = RedisSettings {
            url: "redis://u:hunter2@h:1".into(),
            cluster_nodes: vec!["redis://:hunter2@a:1".into()],
            ..RedisSettings::default()
        };
        let debug = format!("{settings:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        let json = serde_json::to_string(&settings).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
        assert!(json.contains("<redacted>"), "{json}");
        assert!(!settings.target().contains("hunter2"));
    }

    #[test]
    fn settings_are_validated() {
        assert!(RedisSettings::default().validate().is_ok());
        let bad = [
            RedisSettings {
                url: "http://h".into(),
                ..RedisSettings::default()
            },
            RedisSettings {
                key_prefix: "a{b}".into(),
                ..RedisSettings::default()
            },
            RedisSettings {
                expected_nodes: 0,
                ..RedisSettings::default()
            },
            RedisSettings {
                timeout: Duration::ZERO,
                ..RedisSettings::default()
            },
            RedisSettings {
                cluster_nodes: vec!["h:1".into()],
                ..RedisSettings::default()
            },
        ];
        for settings in bad {
            assert!(settings.validate().is_err(), "{settings:?}");
        }
    }

    #[test]
    fn unknown_keys_and_policies_are_errors() {
        let parsed: Result<RedisSettings, _> = serde_json::from_str(r#"{"urll":"redis://h"}"#);
        assert!(parsed.is_err());
        let parsed: Result<RedisSettings, _> = serde_json::from_str(r#"{"on_failure":"maybe"}"#);
        assert!(parsed.is_err());
        let parsed: RedisSettings = serde_json::from_str(
            r#"{"on_failure":"local","cluster_nodes":"redis://a:1, redis://b:2"}"#,
        )
        .unwrap();
        assert_eq!(parsed.on_failure, FailurePolicy::Local);
        assert_eq!(parsed.cluster_nodes, ["redis://a:1", "redis://b:2"]);
    }
}
