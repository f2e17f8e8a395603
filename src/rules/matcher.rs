//! The descriptor tree and its walk: exact value, then wildcard patterns, then the bare key, one
//! level per request entry; plus the small glob matcher behind wildcard values.

use std::collections::HashMap;

use super::{DomainRules, Match, Rule};

/// One level of the descriptor tree: the descriptors listed under one `descriptors:` key.
#[derive(Debug, Clone, Default)]
pub(crate) struct Level {
    /// In file order.
    pub(crate) nodes: Vec<Node>,
    /// Request key → where to look at this level.
    index: HashMap<String, KeyIndex>,
}

/// The descriptors of one level that share a `key`.
#[derive(Debug, Clone, Default)]
struct KeyIndex {
    /// Configured value → node. Wildcard values are here too, so a request value equal to the
    /// pattern text finds it first, as in envoyproxy/ratelimit.
    exact: HashMap<String, usize>,
    /// Nodes whose value contains '*', in file order.
    wildcards: Vec<usize>,
    /// The node with this key and no value.
    bare: Option<usize>,
}

/// One configured descriptor: what the walk matches on. Everything about counting and reporting
/// (shadow/quota mode, metrics, metadata) is on its [`Rule`], the one model of a limit.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) key: String,
    /// `None` for a bare key (an empty `value` counts as none, as upstream).
    pub(crate) value: Option<String>,
    /// Whether request values matching this node's wildcard share one counter. The walk needs it
    /// at every level, also where the descriptor has no `rate_limit`.
    pub(crate) share_threshold: bool,
    /// Present when the descriptor has a `rate_limit`.
    pub(crate) rule: Option<Rule>,
    pub(crate) children: Level,
    /// 1-based line of the descriptor in its file; 0 when unknown.
    pub(crate) line: usize,
}

impl Node {
    /// `key` or `key_value`: the composite upstream uses for duplicate detection and stat names.
    pub(crate) fn composite(&self) -> String {
        composite(&self.key, self.value.as_deref())
    }
}

/// `key` or `key_value`.
pub(crate) fn composite(key: &str, value: Option<&str>) -> String {
    match value {
        Some(value) => format!("{key}_{value}"),
        None => key.to_owned(),
    }
}

impl Level {
    /// Indexes `nodes` (already checked for duplicates by the parser).
    pub(crate) fn new(nodes: Vec<Node>) -> Level {
        let mut index: HashMap<String, KeyIndex> = HashMap::new();
        for (i, node) in nodes.iter().enumerate() {
            let entry = index.entry(node.key.clone()).or_default();
            match &node.value {
                None => {
                    entry.bare.get_or_insert(i);
                }
                Some(value) => {
                    entry.exact.entry(value.clone()).or_insert(i);
                    if value.contains('*') {
                        entry.wildcards.push(i);
                    }
                }
            }
        }
        Level { nodes, index }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node one request entry reaches at this level: exact value, then the first matching
    /// wildcard pattern, then the bare key.
    fn lookup(&self, key: &str, value: &str) -> Option<&Node> {
        let index = self.index.get(key)?;
        if let Some(&i) = index.exact.get(value) {
            return Some(&self.nodes[i]);
        }
        for &i in &index.wildcards {
            let node = &self.nodes[i];
            if node
                .value
                .as_deref()
                .is_some_and(|pattern| glob_match(pattern, value))
            {
                return Some(node);
            }
        }
        index.bare.map(|i| &self.nodes[i])
    }

    /// Every node of this level and below, parents before children.
    pub(crate) fn walk(&self) -> impl Iterator<Item = &Node> {
        let mut stack: Vec<&Node> = self.nodes.iter().rev().collect();
        std::iter::from_fn(move || {
            let node = stack.pop()?;
            stack.extend(node.children.nodes.iter().rev());
            Some(node)
        })
    }
}

impl DomainRules {
    /// Walks the tree one level per request descriptor entry (entries as (key, value) pairs).
    ///
    /// At each level: exact `key_value` first, then wildcard patterns for that key (in file
    /// order), then the bare `key` entry. Returns the node reached by the LAST entry if it has a
    /// rate_limit; `None` if no match at some level, if the request has more entries than the
    /// tree depth, or if the final node has no rate_limit. An empty entry list matches nothing.
    pub fn find<'r>(&'r self, entries: &[(&str, &str)]) -> Option<Match<'r>> {
        self.find_entries(entries.iter().copied())
    }

    /// [`find`](Self::find) over any sequence of entries, so the request path can walk a
    /// descriptor's entries in place without collecting them first.
    pub fn find_entries<'r, 'e>(
        &'r self,
        entries: impl ExactSizeIterator<Item = (&'e str, &'e str)>,
    ) -> Option<Match<'r>> {
        let last = entries.len().checked_sub(1)?;
        let mut level = &self.root;
        let mut shared_values = Vec::new();
        for (i, (key, value)) in entries.enumerate() {
            let node = level.lookup(key, value)?;
            if node.share_threshold {
                if let Some(pattern) = node.value.as_deref() {
                    shared_values.push((i, pattern));
                }
            }
            if i == last {
                return node.rule.as_ref().map(|rule| Match {
                    rule,
                    shared_values,
                });
            }
            if node.children.is_empty() {
                // The request has more entries than the tree is deep.
                return None;
            }
            level = &node.children;
        }
        None
    }
}

/// Whether `text` matches `pattern`, where each '*' matches any run of characters (including an
/// empty one) and every other character matches itself.
///
/// Linear-ish and allocation-free: the literal head must be a prefix and the literal tail a
/// suffix; the literal pieces between stars are then found left to right with a substring search.
/// Taking the leftmost occurrence of each piece is always safe (it leaves the most text for the
/// pieces after it), so there is no backtracking.
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    let Some((head, tail)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let (middle, last) = tail.rsplit_once('*').unwrap_or(("", tail));
    let Some(rest) = text.strip_prefix(head) else {
        return false;
    };
    let Some(mut rest) = rest.strip_suffix(last) else {
        return false;
    };
    for piece in middle.split('*').filter(|piece| !piece.is_empty()) {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{RateLimit, RuleSet};
    use hivemind_core::Unit;
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    fn domain(yaml: &str) -> DomainRules {
        let set = RuleSet::from_sources(&[("test.yaml".to_owned(), yaml.to_owned())])
            .unwrap_or_else(|e| panic!("{e}"));
        let domain = set.domains().next().expect("one domain").clone();
        domain
    }

    fn limit_of(rules: &DomainRules, entries: &[(&str, &str)]) -> Option<u32> {
        rules.find(entries).map(|m| match m.rule.limit {
            RateLimit::Limited {
                requests_per_unit, ..
            } => requests_per_unit,
            RateLimit::Unlimited => u32::MAX,
        })
    }

    const PRECEDENCE: &str = r#"
domain: d
descriptors:
  - key: k
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: k
    value: "a*"
    rate_limit: { unit: second, requests_per_unit: 2 }
  - key: k
    value: abc
    rate_limit: { unit: second, requests_per_unit: 3 }
  - key: k
    value: "ab*"
    rate_limit: { unit: second, requests_per_unit: 4 }
"#;

    #[test]
    fn exact_beats_wildcard_beats_bare_key() {
        let rules = domain(PRECEDENCE);
        assert_eq!(limit_of(&rules, &[("k", "abc")]), Some(3), "exact");
        // Both "a*" and "ab*" match "abd": the first in file order wins.
        assert_eq!(limit_of(&rules, &[("k", "abd")]), Some(2), "first wildcard");
        assert_eq!(
            limit_of(&rules, &[("k", "a")]),
            Some(2),
            "'*' matches empty"
        );
        assert_eq!(limit_of(&rules, &[("k", "zzz")]), Some(1), "bare key");
        assert_eq!(limit_of(&rules, &[("other", "abc")]), None, "unknown key");
        // A request value equal to a pattern's text is an exact match of that pattern.
        assert_eq!(limit_of(&rules, &[("k", "ab*")]), Some(4));
    }

    #[test]
    fn empty_request_matches_nothing() {
        let rules = domain(PRECEDENCE);
        assert!(rules.find(&[]).is_none());
    }

    const NESTED: &str = r#"
domain: d
descriptors:
  - key: tenant
    descriptors:
      - key: user
        rate_limit: { unit: hour, requests_per_unit: 1000 }
      - key: user
        value: canary
        shadow_mode: true
        rate_limit: { unit: hour, requests_per_unit: 10 }
  - key: tenant
    value: acme
    rate_limit: { unit: hour, requests_per_unit: 7 }
  - key: leaf
    rate_limit: { unit: minute, requests_per_unit: 5 }
  - key: whitelisted
  - key: parent
    rate_limit: { unit: minute, requests_per_unit: 50 }
    descriptors:
      - key: child
        rate_limit: { unit: minute, requests_per_unit: 51 }
"#;

    #[test]
    fn nested_descriptors_use_the_node_reached_by_the_last_entry() {
        let rules = domain(NESTED);
        assert_eq!(
            limit_of(&rules, &[("tenant", "globex"), ("user", "bob")]),
            Some(1000)
        );
        let canary = rules
            .find(&[("tenant", "globex"), ("user", "canary")])
            .unwrap();
        assert_eq!(canary.rule.stat_name, "tenant.user_canary");
        assert!(canary.rule.shadow_mode);
        assert_eq!(limit_of(&rules, &[("parent", "x")]), Some(50));
        assert_eq!(
            limit_of(&rules, &[("parent", "x"), ("child", "y")]),
            Some(51)
        );
        // The exact tenant "acme" has no children: it does not fall back to the bare tenant.
        assert_eq!(
            limit_of(&rules, &[("tenant", "acme"), ("user", "bob")]),
            None
        );
        assert_eq!(limit_of(&rules, &[("tenant", "acme")]), Some(7));
    }

    #[test]
    fn node_without_rate_limit_matches_nothing() {
        let rules = domain(NESTED);
        assert!(rules.find(&[("tenant", "globex")]).is_none());
        assert!(rules.find(&[("whitelisted", "x")]).is_none());
    }

    #[test]
    fn more_entries_than_the_tree_is_deep_match_nothing() {
        let rules = domain(NESTED);
        assert!(rules.find(&[("leaf", "x"), ("more", "y")]).is_none());
        assert!(rules
            .find(&[("tenant", "a"), ("user", "b"), ("extra", "c")])
            .is_none());
        assert!(rules.find(&[("tenant", "a"), ("nobody", "b")]).is_none());
    }

    #[test]
    fn wildcards_anywhere_and_repeated() {
        let rules = domain(
            r#"
domain: d
descriptors:
  - key: path
    value: /api/*/action
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: path
    value: "*.png"
    rate_limit: { unit: minute, requests_per_unit: 2 }
  - key: path
    value: /v*/users/*/items/*
    rate_limit: { unit: minute, requests_per_unit: 3 }
  - key: any
    value: "*"
    rate_limit: { unit: minute, requests_per_unit: 4 }
"#,
        );
        assert_eq!(limit_of(&rules, &[("path", "/api/x/action")]), Some(1));
        assert_eq!(limit_of(&rules, &[("path", "/api//action")]), Some(1));
        assert_eq!(limit_of(&rules, &[("path", "/api/a/b/action")]), Some(1));
        assert_eq!(limit_of(&rules, &[("path", "/api/x/action2")]), None);
        assert_eq!(limit_of(&rules, &[("path", "/img/logo.png")]), Some(2));
        assert_eq!(
            limit_of(&rules, &[("path", "/v2/users/7/items/9")]),
            Some(3)
        );
        assert_eq!(limit_of(&rules, &[("path", "/v2/users/7/things/9")]), None);
        assert_eq!(limit_of(&rules, &[("any", "")]), Some(4));
        assert_eq!(limit_of(&rules, &[("any", "whatever")]), Some(4));
        // Wildcard matching is per key: a pattern never matches another key.
        assert_eq!(limit_of(&rules, &[("other", "/api/x/action")]), None);
    }

    #[test]
    fn share_threshold_reports_the_pattern_for_each_shared_entry() {
        let rules = domain(
            r#"
domain: d
descriptors:
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: { unit: minute, requests_per_unit: 100 }
  - key: user
    value: user/*
    share_threshold: true
    descriptors:
      - key: resource
        value: res/*
        share_threshold: false
        descriptors:
          - key: action
            rate_limit: { unit: minute, requests_per_unit: 150 }
      - key: item
        value: "i*"
        share_threshold: true
        rate_limit: { unit: minute, requests_per_unit: 5 }
  - key: plain
    value: "p*"
    rate_limit: { unit: minute, requests_per_unit: 1 }
"#,
        );
        let m = rules.find(&[("files", "files/a.txt")]).unwrap();
        assert_eq!(m.shared_values, vec![(0, "files/*")]);

        let m = rules
            .find(&[("user", "user/1"), ("resource", "res/2"), ("action", "get")])
            .unwrap();
        assert_eq!(m.shared_values, vec![(0, "user/*")]);

        let m = rules.find(&[("user", "user/1"), ("item", "i42")]).unwrap();
        assert_eq!(m.shared_values, vec![(0, "user/*"), (1, "i*")]);

        let m = rules.find(&[("plain", "p1")]).unwrap();
        assert!(m.shared_values.is_empty());
        assert_eq!(
            m.shared_values.capacity(),
            0,
            "no allocation without share_threshold"
        );
    }

    #[test]
    fn rule_fields_are_carried() {
        let rules = domain(
            r#"
domain: d
descriptors:
  - key: internal
    rate_limit: { unlimited: true }
  - key: svc
    value: billing
    quota_mode: true
    detailed_metric: true
    value_to_metric: true
    metadata: { plan: { name: gold }, tier: 3 }
    rate_limit: { unit: DAY, requests_per_unit: 1000000, name: billing }
  - key: plan
    value: vip
    shadow_mode: true
    rate_limit:
      unit: Hour
      requests_per_unit: 5000
      replaces: [ { name: per_user }, { name: billing_old } ]
"#,
        );
        let internal = rules.find(&[("internal", "x")]).unwrap();
        assert_eq!(internal.rule.limit, RateLimit::Unlimited);
        assert_eq!(internal.rule.stat_name, "internal");
        assert_eq!(internal.rule.line, 4);

        let svc = rules.find(&[("svc", "billing")]).unwrap().rule;
        assert_eq!(
            svc.limit,
            RateLimit::Limited {
                requests_per_unit: 1_000_000,
                unit: Unit::Day,
                name: Some("billing".to_owned()),
                replaces: vec![],
            }
        );
        assert!(svc.quota_mode && svc.detailed_metric && svc.value_to_metric());
        assert!(!svc.shadow_mode && !svc.share_threshold);
        assert_eq!(
            svc.metadata,
            Some(serde_json::json!({ "plan": { "name": "gold" }, "tier": 3 }))
        );
        assert_eq!(svc.stat_name, "svc_billing");
        assert_eq!(svc.line, 6);

        let vip = rules.find(&[("plan", "vip")]).unwrap().rule;
        assert!(vip.shadow_mode && !vip.quota_mode);
        assert_eq!(
            vip.limit,
            RateLimit::Limited {
                requests_per_unit: 5000,
                unit: Unit::Hour,
                name: None,
                replaces: vec!["per_user".to_owned(), "billing_old".to_owned()],
            }
        );
        assert_eq!(vip.replaces(), ["per_user", "billing_old"]);
        assert_eq!(vip.line, 13);
    }

    #[test]
    fn units_are_case_insensitive() {
        for (text, unit) in [
            ("second", Unit::Second),
            ("MINUTE", Unit::Minute),
            ("Hour", Unit::Hour),
            ("dAy", Unit::Day),
            ("week", Unit::Week),
            ("Month", Unit::Month),
            ("YEAR", Unit::Year),
        ] {
            let rules = domain(&format!(
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{ unit: {text}, requests_per_unit: 1 }}\n"
            ));
            let rule = rules.find(&[("k", "v")]).unwrap().rule;
            assert!(
                matches!(rule.limit, RateLimit::Limited { unit: u, .. } if u == unit),
                "{text}"
            );
        }
    }

    #[test]
    fn absent_requests_per_unit_is_zero() {
        let rules =
            domain("domain: d\ndescriptors:\n  - key: k\n    rate_limit: { unit: second }\n");
        assert_eq!(limit_of(&rules, &[("k", "v")]), Some(0));
    }

    #[test]
    fn glob_examples() {
        for (pattern, text, expected) in [
            ("", "", true),
            ("", "a", false),
            ("abc", "abc", true),
            ("abc", "abd", false),
            ("*", "", true),
            ("*", "anything", true),
            ("**", "", true),
            ("a*", "a", true),
            ("a*", "ba", false),
            ("*a", "ba", true),
            ("*a", "ab", false),
            ("a*b", "ab", true),
            ("a*b", "axxb", true),
            ("a*b", "axxbc", false),
            ("ab*b", "ab", false),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("*a*b*c*", "xaybzc", true),
            ("*a*b*c*", "xcybza", false),
            ("a**b", "ab", true),
            ("é*ü", "éxyü", true),
            ("*ü", "ü", true),
        ] {
            assert_eq!(
                glob_match(pattern, text),
                expected,
                "{pattern:?} vs {text:?}"
            );
        }
    }

    #[test]
    fn glob_has_no_exponential_blowup() {
        let text = "a".repeat(64 * 1024);
        let start = Instant::now();
        assert!(!glob_match("*a*a*a*a*a*b", &text));
        assert!(!glob_match(
            "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b*",
            &text
        ));
        assert!(glob_match("*a*a*a*a*a*a", &text));
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
    }

    /// The obvious exponential definition, for checking `glob_match` on short strings.
    fn reference_glob(pattern: &[u8], text: &[u8]) -> bool {
        match pattern.split_first() {
            None => text.is_empty(),
            Some((b'*', rest)) => (0..=text.len()).any(|skip| reference_glob(rest, &text[skip..])),
            Some((c, rest)) => text.first() == Some(c) && reference_glob(rest, &text[1..]),
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_the_reference(pattern in "[ab*]{0,8}", text in "[ab]{0,10}") {
            prop_assert_eq!(
                glob_match(&pattern, &text),
                reference_glob(pattern.as_bytes(), text.as_bytes())
            );
        }

        #[test]
        fn exact_values_always_match_themselves(value in "[a-z0-9/._*-]{1,20}") {
            let yaml = format!(
                "domain: d\ndescriptors:\n  - key: k\n    value: '{value}'\n    rate_limit: {{ unit: second, requests_per_unit: 9 }}\n"
            );
            let rules = domain(&yaml);
            let found = rules.find(&[("k", &value)]);
            prop_assert!(found.is_some());
            prop_assert_eq!(found.unwrap().rule.stat_name.clone(), format!("k_{value}"));
            prop_assert!(glob_match(&value, &value));
        }
    }
}
