//! The validation pass: a parsed [`Yaml`] tree → a domain's descriptor tree, checked the way
//! envoyproxy/ratelimit checks it, failing on the first problem with its line.
//!
//! One recursive walk. Each map section (the file, a descriptor, a rate_limit, a replaces entry) is
//! a [`Section`]: its keys are checked first (unknown and repeated keys are refused at the key),
//! then its values are read key by key by [`field`] (a bad value is refused at the value), and what
//! needs the section as a whole (a missing key, a unit with `unlimited`, a duplicate descriptor) is
//! refused at its first line once the values it needs are read. So of several problems the first in
//! that order is reported, not always the first in the file. Upstream compatibility: YAML 1.1
//! booleans (`yes`, `on`, ...) are accepted as yaml.v2 does; `<<` merge keys work in descriptors
//! and rate_limits (explicit keys win, then earlier sources); strings are taken as written (`1.10`,
//! `010`); an empty `value` or `name` counts as absent; `requests_per_unit` absent or null is 0. A
//! list or map where a string belongs keeps serde_yaml's wording without its path (`invalid type:
//! sequence, expected a string`, not `descriptors[0].key: invalid ...`); an integer beyond 64 bits
//! is named as written (`found 99999999999999999999`), and metadata keeps it as its text, a JSON
//! string (a JSON number cannot hold it exactly).

use std::collections::HashSet;

use hivemind_core::Unit;

use super::matcher::{composite, Level, Node};
use super::yaml::{Entries, Invalid, Node as Shape, Scalar, Yaml};
use super::{DomainRules, RateLimit, Rule, StatLevel};

type Result<T> = std::result::Result<T, Invalid>;

fn invalid<T>(at: &Yaml, message: impl Into<String>) -> Result<T> {
    let (line, message) = (Some(at.line), message.into());
    Err(Invalid { line, message })
}

/// `{what}, found {value}`: the message for a value of the wrong kind.
fn wrong<T>(value: &Yaml, what: &str) -> Result<T> {
    invalid(value, format!("{what}, found {}", value.found()))
}

const UNITS: &str = "second, minute, hour, day, week, month or year";

/// Validates a whole document, read from `source`: its domain's rules, and the line of its
/// `domain` key.
pub(crate) fn document(root: &Yaml, source: &str) -> Result<(DomainRules, usize)> {
    let not_a_map = "a rules file must be a map with 'domain' and 'descriptors'";
    let Some(map) = collection(root, not_a_map, Yaml::map)? else {
        return invalid(root, "missing domain (the file has no YAML document)");
    };
    FILE.check(map)?;
    let empty = "domain is empty";
    let domain = field(map, "domain", |value, _| string(value, Some(empty)))?;
    let descriptors = field(map, "descriptors", |value, _| list(value, &[]))?;
    let Some(domain) = domain else {
        return invalid(root, "missing domain");
    };
    // Checked above: the keys are strings, each at most once.
    let domain_key = map
        .iter()
        .find(|(key, _)| key.scalar() == Some(Scalar::Text("domain")));
    let rules = DomainRules {
        name: domain,
        source: source.to_owned(),
        root: descriptors.unwrap_or_default(),
    };
    Ok((rules, domain_key.map_or(0, |(key, _)| key.line)))
}

/// A map section as data: what messages call it, its keys in the order messages list them, and
/// whether `<<` may merge other maps into it.
struct Section {
    name: &'static str,
    keys: &'static [&'static str],
    merges: bool,
}

const FILE: Section = Section {
    name: "the rules file",
    keys: &["domain", "descriptors"],
    merges: false,
};

const DESCRIPTOR: Section = Section {
    name: "descriptor",
    keys: &[
        "key",
        "value",
        "rate_limit",
        "descriptors",
        "shadow_mode",
        "quota_mode",
        "detailed_metric",
        "value_to_metric",
        "share_threshold",
        "metadata",
    ],
    merges: true,
};

const RATE_LIMIT: Section = Section {
    name: "rate_limit",
    keys: &["unit", "requests_per_unit", "name", "replaces", "unlimited"],
    merges: true,
};

const REPLACES_ENTRY: Section = Section {
    name: "replaces entry",
    keys: &["name"],
    merges: false,
};

impl Section {
    /// Checks the keys of `map`, and of each map it merges with `<<`, in file order: each a
    /// string key of the section, at most once in one map; `<<` (where the section merges) a
    /// map or a list of maps.
    fn check(&self, map: &Entries) -> Result<()> {
        const NOT_MERGEABLE: &str = "'<<' must merge a map or a list of maps";
        let (name, keys) = (self.name, self.keys);
        // A bit per key, and the one after theirs for `<<`.
        let mut seen = 0u32;
        for (key, value) in map {
            let Some(Scalar::Text(text)) = key.scalar() else {
                return invalid(key, format!("key is not a string: {}", key.found()));
            };
            let merge = (self.merges && text == "<<").then_some(keys.len());
            let Some(i) = keys.iter().position(|k| *k == text).or(merge) else {
                let expected = keys.join(", ");
                let message = format!("unknown key '{text}' in {name} (expected {expected})");
                return invalid(key, message);
            };
            if seen & (1 << i) != 0 {
                return invalid(key, format!("key '{text}' appears twice in one {name}"));
            }
            seen |= 1 << i;
            if merge != Some(i) {
                continue;
            }
            if matches!(value.node, Shape::Scalar { .. }) {
                return wrong(value, NOT_MERGEABLE);
            }
            // One map is merged as a list of one.
            for source in value.list().unwrap_or(std::slice::from_ref(value)) {
                let Some(source) = source.map() else {
                    let message = format!("{NOT_MERGEABLE}, found {} in the list", source.found());
                    return invalid(source, message);
                };
                self.check(source)?;
            }
        }
        Ok(())
    }
}

/// The value of `key` in a section's `map` (its keys checked), validated by `read`: the map's
/// own value, else that of the first map it merges with `<<` (in order, each with its own
/// sources) that has one; so explicit keys win, then earlier sources. A value read as absent
/// (`None`: a null or empty string) leaves the key to the next map; flags, counts and lists are
/// never absent, their null is false, 0, empty. Every value written is read, in file order, so
/// a bad one is refused even where another wins.
fn field<T, R>(map: &Entries, key: &str, read: R) -> Result<Option<T>>
where
    R: Fn(&Yaml, &str) -> Result<Option<T>> + Copy,
{
    let (mut own, mut merged) = (None, None);
    for (name, value) in map {
        // The keys are checked strings: their text as written is the string.
        match &name.node {
            Shape::Scalar { text, .. } if text == key => own = read(value, key)?,
            Shape::Scalar { text, .. } if text == "<<" => {
                let sources = value.list().unwrap_or(std::slice::from_ref(value));
                for source in sources.iter().filter_map(Yaml::map) {
                    merged = merged.or(field(source, key, read)?);
                }
            }
            _ => {}
        }
    }
    Ok(own.or(merged))
}

/// A value that must be a map or a list (`shape` picks which, e.g. [`Yaml::map`]) or null
/// (`None`); another value is refused as `{not_shaped}, found ...`.
fn collection<'y, T: ?Sized>(
    value: &'y Yaml,
    not_shaped: &str,
    shape: fn(&'y Yaml) -> Option<&'y T>,
) -> Result<Option<&'y T>> {
    match shape(value) {
        Some(inner) => Ok(Some(inner)),
        None if value.is_null() => Ok(None),
        None => wrong(value, not_shaped),
    }
}

/// A string field, as written; null is `None`, and so is an empty string unless `empty` says why
/// it may not be (`domain`, a descriptor's `key`, a replaces `name`).
fn string(value: &Yaml, empty: Option<&str>) -> Result<Option<String>> {
    let wrong_type = |found| invalid(value, format!("invalid type: {found}, expected a string"));
    match (&value.node, empty) {
        _ if value.is_null() => Ok(None),
        (Shape::Scalar { text, .. }, Some(empty)) if text.is_empty() => invalid(value, empty),
        (Shape::Scalar { text, .. }, None) if text.is_empty() => Ok(None),
        (Shape::Scalar { text, .. }, _) => Ok(Some(text.to_string())),
        (Shape::List(_), _) => wrong_type("sequence"),
        (Shape::Map(_), _) => wrong_type("map"),
    }
}

/// The spellings of true and false yaml.v2 reads (YAML 1.1), plain or quoted.
const TRUE: [&str; 11] = [
    "y", "Y", "yes", "Yes", "YES", "on", "On", "ON", "true", "True", "TRUE",
];
const FALSE: [&str; 11] = [
    "n", "N", "no", "No", "NO", "off", "Off", "OFF", "false", "False", "FALSE",
];

/// A boolean flag, spelled as in [`TRUE`] and [`FALSE`]; null is false.
fn flag(value: &Yaml, key: &str) -> Result<Option<bool>> {
    match value.scalar() {
        Some(Scalar::Null) => Ok(Some(false)),
        Some(Scalar::Bool(on)) => Ok(Some(on)),
        Some(Scalar::Text(text)) if TRUE.contains(&text) => Ok(Some(true)),
        Some(Scalar::Text(text)) if FALSE.contains(&text) => Ok(Some(false)),
        _ => wrong(value, &format!("'{key}' must be true or false")),
    }
}

/// `requests_per_unit`: a whole number that fits in a u32 (a float with no fraction, like
/// `1e3`, too, as yaml.v2 takes it); null is 0.
fn count(value: &Yaml, _: &str) -> Result<Option<u32>> {
    const EXPECTED: &str = "a whole number from 0 to 4294967295";
    match value.scalar() {
        Some(Scalar::Null) => Ok(Some(0)),
        Some(Scalar::Unsigned(n)) if n <= u64::from(u32::MAX) => Ok(Some(n as u32)),
        Some(Scalar::Signed(n)) if (0..=i64::from(u32::MAX)).contains(&n) => Ok(Some(n as u32)),
        // Saturated, then compared: a fraction or an out-of-range value does not come back.
        Some(Scalar::Float(f)) if f64::from(f as u32) == f => Ok(Some(f as u32)),
        _ => wrong(value, &format!("requests_per_unit must be {EXPECTED}")),
    }
}

/// `unit`: one of [`UNITS`]; null or empty is none.
fn unit(value: &Yaml, _: &str) -> Result<Option<Unit>> {
    let Some(text) = string(value, None)? else {
        return Ok(None);
    };
    let Some(unit) = Unit::parse(&text) else {
        let message = format!("invalid rate limit unit '{text}' (expected {UNITS})");
        return invalid(value, message);
    };
    Ok(Some(unit))
}

/// `metadata`: any map, kept as JSON; null is none.
fn metadata(value: &Yaml, _: &str) -> Result<Option<serde_json::Value>> {
    let map = collection(value, "'metadata' must be a map", Yaml::map)?;
    map.map(|_| json(value)).transpose()
}

/// A metadata node as JSON, as serde_yaml converted it: a non-string key becomes its text, an
/// integer beyond 64 bits its text too, a duplicate key an error.
fn json(value: &Yaml) -> Result<serde_json::Value> {
    use serde_json::Value as Json;
    const KEY_NOT_STRING: &str = "'metadata' cannot be represented as JSON: key must be a string";
    Ok(match (&value.node, value.scalar()) {
        (Shape::List(items), _) => Json::Array(items.iter().map(json).collect::<Result<_>>()?),
        (Shape::Map(entries), _) => {
            let mut map = serde_json::Map::with_capacity(entries.len());
            for (key, item) in entries {
                let name = match key.scalar() {
                    Some(Scalar::Text(text)) => text.to_owned(),
                    Some(Scalar::Null) | None => return invalid(value, KEY_NOT_STRING),
                    Some(_) => key.found(),
                };
                let item = json(item)?;
                if map.contains_key(&name) {
                    let message = format!("duplicate entry with key \"{name}\" in 'metadata'");
                    return invalid(value, message);
                }
                map.insert(name, item);
            }
            Json::Object(map)
        }
        (_, Some(Scalar::Bool(b))) => Json::Bool(b),
        (_, Some(Scalar::Unsigned(n))) => Json::from(n),
        (_, Some(Scalar::Signed(n))) => Json::from(n),
        // Not a number (NaN, infinite) is null.
        (_, Some(Scalar::Float(f))) => Json::from(f),
        (_, Some(Scalar::Huge(text) | Scalar::Text(text))) => Json::String(text.to_owned()),
        (_, Some(Scalar::Null) | None) => Json::Null,
    })
}

/// A `descriptors` list: one level of the tree, below the levels `above`; null is empty.
fn list(value: &Yaml, above: &[StatLevel]) -> Result<Option<Level>> {
    let not_a_list = "'descriptors' must be a list";
    let items = collection(value, not_a_list, Yaml::list)?.unwrap_or_default();
    let mut siblings = HashSet::with_capacity(items.len());
    let mut nodes = Vec::with_capacity(items.len());
    for item in items {
        let node = descriptor(item, above)?;
        if !siblings.insert(node.composite()) {
            return invalid(item, format!("duplicate descriptor '{}'", node.composite()));
        }
        nodes.push(node);
    }
    Ok(Some(Level::new(nodes)))
}

/// One element of a `descriptors` list below the levels `above`, validated as a whole (its
/// siblings are the caller's).
fn descriptor(item: &Yaml, above: &[StatLevel]) -> Result<Node> {
    let Some(map) = item.map() else {
        return invalid(item, format!("list element is not a map: {}", item.found()));
    };
    DESCRIPTOR.check(map)?;
    let empty_key = "descriptor has empty key";
    let key = field(map, "key", |value, _| string(value, Some(empty_key)))?;
    let value = field(map, "value", |value, _| string(value, None))?;
    let value_to_metric = field(map, "value_to_metric", flag)?.unwrap_or_default();
    let Some(key) = key else {
        return invalid(item, "descriptor has no key");
    };
    // The rule's stat path, and its children's, starts with these levels, top level first.
    let (mut path, segment) = (above.to_vec(), composite(&key, value.as_deref()));
    path.push(StatLevel {
        segment,
        value_to_metric,
    });
    let rate_limit = field(map, "rate_limit", rate_limit)?;
    let children = field(map, "descriptors", |value, _| list(value, &path))?;
    let shadow_mode = field(map, "shadow_mode", flag)?.unwrap_or_default();
    let quota_mode = field(map, "quota_mode", flag)?.unwrap_or_default();
    let detailed_metric = field(map, "detailed_metric", flag)?.unwrap_or_default();
    let share_threshold = field(map, "share_threshold", flag)?.unwrap_or_default();
    let metadata = field(map, "metadata", metadata)?;
    if share_threshold && !value.as_deref().is_some_and(|v| v.contains('*')) {
        let composite = composite(&key, value.as_deref());
        let message = "share_threshold needs a '*' wildcard in value";
        return invalid(item, format!("{message} (descriptor '{composite}')"));
    }
    let segments = path.iter().map(|level| level.segment.as_str());
    let rule = rate_limit.map(|(limit, unlimited_name, unlimited_replaces)| Rule {
        limit,
        shadow_mode,
        quota_mode,
        detailed_metric,
        share_threshold,
        metadata,
        stat_name: segments.collect::<Vec<_>>().join("."),
        stat_levels: path.clone(),
        line: item.line,
        unlimited_name,
        unlimited_replaces,
    });
    Ok(Node {
        key,
        value,
        share_threshold,
        rule,
        children: children.unwrap_or_default(),
        line: item.line,
    })
}

/// A validated `rate_limit`: the limit, and the `name` and `replaces` an unlimited one carries.
type Limit = (RateLimit, Option<String>, Vec<String>);

/// A descriptor's `rate_limit` map, merged and validated where it is written; null is none.
fn rate_limit(value: &Yaml, _: &str) -> Result<Option<Limit>> {
    let Some(map) = collection(value, "'rate_limit' must be a map", Yaml::map)? else {
        return Ok(None);
    };
    RATE_LIMIT.check(map)?;
    let unit = field(map, "unit", unit)?;
    let requests_per_unit = field(map, "requests_per_unit", count)?.unwrap_or_default();
    let name = field(map, "name", |value, _| string(value, None))?;
    let replaces = field(map, "replaces", replaces)?.unwrap_or_default();
    let unlimited = field(map, "unlimited", flag)?.unwrap_or_default();
    if let Some(name) = name.as_ref().filter(|name| replaces.contains(name)) {
        return invalid(value, format!("rate limit '{name}' replaces itself"));
    }
    match (unlimited, unit) {
        (true, Some(_)) => invalid(value, "unlimited rate_limit must not have a unit"),
        (true, None) => Ok(Some((RateLimit::Unlimited, name, replaces))),
        (false, None) => invalid(value, format!("rate_limit has no unit (expected {UNITS})")),
        (false, Some(unit)) => {
            let limit = RateLimit::Limited {
                requests_per_unit,
                unit,
                name,
                replaces,
            };
            Ok(Some((limit, None, Vec::new())))
        }
    }
}

/// `replaces`: a list of `{name: ...}` maps, each with a non-empty name; null is empty.
fn replaces(value: &Yaml, _: &str) -> Result<Option<Vec<String>>> {
    let not_a_list = "'replaces' must be a list of {name: ...} maps";
    let items = collection(value, not_a_list, Yaml::list)?.unwrap_or_default();
    let mut names = Vec::with_capacity(items.len());
    for item in items {
        let Some(map) = item.map() else {
            return invalid(item, format!("list element is not a map: {}", item.found()));
        };
        REPLACES_ENTRY.check(map)?;
        let empty = "replaces entry has an empty name";
        let Some(name) = field(map, "name", |value, _| string(value, Some(empty)))? else {
            return invalid(item, empty);
        };
        names.push(name);
    }
    Ok(Some(names))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{parse_document, DomainRules, RuleSet, RulesError};
    use proptest::prelude::*;
    use std::path::Path;

    fn parse(text: &str) -> DomainRules {
        parse_document("t.yaml", text)
            .unwrap_or_else(|e| panic!("{e}"))
            .0
    }

    fn parse_err(text: &str) -> RulesError {
        parse_document("t.yaml", text).map(|_| ()).unwrap_err()
    }

    fn rule_lines(rules: &DomainRules) -> Vec<(String, usize)> {
        rules
            .root
            .walk()
            .map(|node| (node.composite(), node.line))
            .collect()
    }

    #[test]
    fn descriptor_lines_in_block_style() {
        let rules = parse(
            "# comment\n\
             domain: d\n\
             descriptors:\n\
             \x20 - key: a          # line 4\n\
             \x20   rate_limit: { unit: second, requests_per_unit: 1 }\n\
             \n\
             \x20 -\n\
             \x20   key: b          # line 8 (the map starts after the dash)\n\
             \x20   descriptors:\n\
             \x20   - key: c        # line 10\n\
             \x20     rate_limit:\n\
             \x20       unit: minute\n\
             \x20   - value: v      # line 13: the map's first key, not `key`\n\
             \x20     key: c\n",
        );
        assert_eq!(
            rule_lines(&rules),
            [
                ("a".into(), 4),
                ("b".into(), 8),
                ("c".into(), 10),
                ("c_v".into(), 13)
            ]
        );
        assert_eq!(rules.find(&[("a", "x")]).unwrap().rule.line, 4);
    }

    #[test]
    fn descriptor_lines_in_flow_style() {
        let text = "domain: d\n\
                    descriptors: [ {key: a, rate_limit: {unit: second}},\n\
                    \x20 {key: b,\n\
                    \x20  descriptors: [\n\
                    \x20    {key: c, rate_limit: {unit: second}}, {key: d}]},\n\
                    \x20 {\n\
                    \x20   key: e}]\n";
        let rules = parse(text);
        assert_eq!(
            rule_lines(&rules),
            [
                ("a".into(), 2),
                ("b".into(), 3),
                ("c".into(), 5),
                ("d".into(), 5),
                ("e".into(), 6)
            ]
        );
    }

    #[test]
    fn crlf_line_endings() {
        let text = "domain: d\r\ndescriptors:\r\n  - key: a\r\n    value: \"q\"\r\n    rate_limit: {unit: second}\r\n  - key: b\r\n    value: plain\r\n";
        let rules = parse(text);
        assert_eq!(
            rule_lines(&rules),
            [("a_q".into(), 3), ("b_plain".into(), 6)]
        );
        assert!(rules.find(&[("a", "q")]).is_some());
        let err = parse_err("domain: d\r\ndescriptors:\r\n  - key: a\r\n    nope: 1\r\n");
        assert_eq!(err.line, Some(4));
    }

    #[test]
    fn basic_fixture_lines() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("test/fixtures/rules/valid/basic.yaml"),
        )
        .unwrap();
        let (rules, domain_line) = parse_document("basic.yaml", &text).unwrap();
        assert_eq!(domain_line, Some(2));
        let lines: Vec<usize> = rules.root.walk().map(|node| node.line).collect();
        assert_eq!(lines, [5, 9, 15, 22, 28, 35, 38, 43, 48, 51]);
    }

    #[test]
    fn scalars_are_read_as_written() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("test/fixtures/rules/valid/scalars.yaml"),
        )
        .unwrap();
        let rules = parse(&text);
        let count = |entries: &[(&str, &str)]| match rules.find(entries).map(|m| &m.rule.limit) {
            Some(RateLimit::Limited {
                requests_per_unit, ..
            }) => Some(*requests_per_unit),
            _ => None,
        };
        assert_eq!(count(&[("version", "1.10")]), Some(1));
        assert_eq!(count(&[("version", "1.1")]), None);
        assert_eq!(count(&[("version", "010")]), Some(2));
        assert_eq!(count(&[("443", "true")]), Some(3));
        assert_eq!(count(&[("key", "it's")]), None);
        assert_eq!(count(&[("it's", "tab\there")]), Some(1000));
        assert_eq!(count(&[("long", "a plain value that continues")]), Some(4));
        assert_eq!(
            count(&[("quoted", "a quoted value over two lines")]),
            Some(5)
        );
        assert_eq!(
            count(&[("empty_value", "anything")]),
            Some(6),
            "'' is no value"
        );
        let flags = rules.find(&[("flags", "x")]).unwrap().rule;
        assert!(flags.shadow_mode && !flags.quota_mode && flags.detailed_metric);
        assert!(!flags.value_to_metric());
        assert_eq!(
            count(&[("flags", "x")]),
            Some(0),
            "null requests_per_unit is 0"
        );
        assert_eq!(
            rule_lines(&rules)
                .into_iter()
                .map(|(_, line)| line)
                .collect::<Vec<_>>(),
            [4, 7, 10, 13, 16, 24, 28, 32]
        );
    }

    #[test]
    fn anchors_aliases_and_merge_keys() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("test/fixtures/rules/valid/anchors.yaml"),
        )
        .unwrap();
        let rules = parse(&text);
        let limit = |entries: &[(&str, &str)]| rules.find(entries).unwrap().rule.clone();
        let minute = |n| RateLimit::Limited {
            requests_per_unit: n,
            unit: Unit::Minute,
            name: None,
            replaces: vec![],
        };
        assert_eq!(limit(&[("a", "x")]).limit, minute(10));
        assert_eq!(limit(&[("b", "x")]).limit, minute(10));
        assert_eq!(limit(&[("c", "x")]).limit, minute(20));
        let user = limit(&[("user", "bob")]);
        assert!(user.shadow_mode);
        let vip = limit(&[("user", "vip")]);
        assert!(!vip.shadow_mode, "explicit keys beat merged ones");
        assert_eq!(vip.limit, user.limit);
        assert_eq!(vip.line, 18);
    }

    #[test]
    fn merge_sources_are_validated_once_merged() {
        let err = parse_err(
            "domain: d\n\
             descriptors:\n\
             \x20 - key: a\n\
             \x20   rate_limit: &partial { requests_per_unit: 1 }\n",
        );
        assert!(err.message.contains("rate_limit has no unit"), "{err}");
        let rules = parse(
            "domain: d\n\
             x: &unit { unit: hour }\n"
                .replace("x: &unit { unit: hour }\n", "descriptors:\n  - key: a\n    rate_limit: { <<: [ {unit: hour}, {unit: day, requests_per_unit: 3} ] }\n")
                .as_str(),
        );
        assert_eq!(
            rules.find(&[("a", "x")]).unwrap().rule.limit,
            RateLimit::Limited {
                requests_per_unit: 3,
                unit: Unit::Hour,
                name: None,
                replaces: vec![]
            }
        );
        let err = parse_err("domain: d\ndescriptors:\n  - key: a\n    <<: 5\n");
        assert!(err.message.contains("'<<' must merge a map"), "{err}");
        assert_eq!(err.line, Some(4));
    }

    #[test]
    fn syntax_errors_report_serde_yaml_s_line() {
        let err = parse_err("domain: d\ndescriptors:\n  - key: a\n  rate_limit: [\n");
        let serde_line = serde_yaml::from_str::<serde_yaml::Value>(
            "domain: d\ndescriptors:\n  - key: a\n  rate_limit: [\n",
        )
        .unwrap_err()
        .location()
        .unwrap()
        .line();
        assert_eq!(err.line, Some(serde_line));
        let err = parse_err("domain: d\n---\ndomain: e\n");
        assert!(err.message.contains("more than one document"), "{err}");
    }

    #[test]
    fn block_scalars_are_placed_at_their_content() {
        let err = parse_err("domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: >-\n        fortnight\n");
        assert!(err.message.contains("unit 'fortnight'"), "{err}");
        assert_eq!(err.line, Some(6), "the content's line, not the header's");
    }

    #[test]
    fn tags_outside_the_core_schema_are_refused_at_the_tagged_node() {
        for (text, tag, line) in [
            ("domain: !name d\n", "!name", 1),
            (
                "domain: d\ndescriptors:\n  - !rule\n    key: a\n",
                "!rule",
                3,
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: !limit\n      unit: hour\n",
                "!limit",
                4,
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    metadata:\n      owner: !team x\n",
                "!team",
                5,
            ),
            ("domain: d\n!key descriptors: []\n", "!key", 2),
            // Refused where it is written, even if nothing reads it.
            ("domain: d\nx: &unused !big [1, [2, 3]]\n", "!big", 2),
        ] {
            let err = parse_err(text);
            let message = format!("YAML tag '{tag}' is not supported in rules files");
            assert_eq!((err.message, err.line), (message, Some(line)), "{text}");
        }
        // Core-schema tags are read as before: `!!str` keeps a number as text.
        let rules = parse("domain: d\ndescriptors:\n  - key: !!str 10\n    value: !!str true\n    rate_limit: { unit: !!str hour, requests_per_unit: !!int 3 }\n");
        assert_eq!(
            rules.find(&[("10", "true")]).unwrap().rule.limit,
            RateLimit::Limited {
                requests_per_unit: 3,
                unit: Unit::Hour,
                name: None,
                replaces: vec![]
            }
        );
    }

    #[test]
    fn huge_integers_are_named_as_written() {
        let descriptor = |body: &str| format!("domain: d\ndescriptors:\n  - key: a\n{body}");
        let err = parse_err(&descriptor(
            "    rate_limit: { unit: hour, requests_per_unit: 99999999999999999999 }\n",
        ));
        let message = "requests_per_unit must be a whole number from 0 to 4294967295, found \
                       99999999999999999999";
        assert_eq!((err.message.as_str(), err.line), (message, Some(4)));
        let err = parse_err(&descriptor("    shadow_mode: -18446744073709551617\n"));
        let message = "'shadow_mode' must be true or false, found -18446744073709551617";
        assert_eq!((err.message.as_str(), err.line), (message, Some(4)));
        // In metadata: the text as written (a JSON number cannot hold it exactly).
        let rules = parse(&descriptor(
            "    rate_limit: { unit: hour }\n    metadata: { id: 0x1ffffffffffffffff }\n",
        ));
        let metadata = rules.find(&[("a", "x")]).unwrap().rule.metadata.clone();
        assert_eq!(
            metadata,
            Some(serde_json::json!({ "id": "0x1ffffffffffffffff" }))
        );
    }

    #[test]
    fn metadata_keys_must_make_a_json_object() {
        let descriptor = |metadata: &str| {
            format!("domain: d\ndescriptors:\n  - key: a\n    metadata:\n{metadata}")
        };
        let err = parse_err(&descriptor("      owner: x\n      team: { a: 1, a: 2 }\n"));
        let message = "duplicate entry with key \"a\" in 'metadata'";
        assert_eq!((err.message.as_str(), err.line), (message, Some(6)));
        let err = parse_err(&descriptor("      [a]: x\n"));
        assert!(err.message.contains("key must be a string"), "{err}");
        let rules = parse(&descriptor(
            "      10: x\n      true: y\n    rate_limit: { unit: hour }\n",
        ));
        let metadata = rules.find(&[("a", "x")]).unwrap().rule.metadata.clone();
        assert_eq!(
            metadata,
            Some(serde_json::json!({ "10": "x", "true": "y" }))
        );
    }

    #[test]
    fn unknown_keys_name_the_section_and_the_expected_keys() {
        let err = parse_err("domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, shadow_mode: true }\n");
        assert_eq!(err.line, Some(4));
        assert_eq!(
            err.message,
            "unknown key 'shadow_mode' in rate_limit (expected unit, requests_per_unit, name, replaces, unlimited)"
        );
    }

    #[test]
    fn unlimited_may_have_a_name_and_replaces() {
        let rules = parse("domain: d\ndescriptors:\n  - key: vip\n    rate_limit: { unlimited: true, name: vip, replaces: [ {name: per_user} ] }\n");
        let rule = rules.find(&[("vip", "x")]).unwrap().rule;
        assert_eq!(rule.limit, RateLimit::Unlimited);
        assert_eq!(rule.name(), Some("vip"));
        assert_eq!(rule.replaces(), ["per_user"]);
        // `unlimited: false` is an ordinary limit.
        let rules = parse("domain: d\ndescriptors:\n  - key: k\n    rate_limit: { unlimited: false, unit: second, requests_per_unit: 2 }\n");
        assert!(matches!(
            rules.find(&[("k", "x")]).unwrap().rule.limit,
            RateLimit::Limited {
                requests_per_unit: 2,
                ..
            }
        ));
    }

    #[test]
    fn value_to_metric_lands_on_the_rules_below_it_level_by_level() {
        let rules = parse(
            "domain: d\n\
             descriptors:\n\
             \x20 - key: tenant\n\
             \x20   value_to_metric: true\n\
             \x20   descriptors:\n\
             \x20     - key: user\n\
             \x20       rate_limit: { unit: hour }\n\
             \x20     - key: ip\n\
             \x20       value: 10.0.*\n\
             \x20       value_to_metric: true\n\
             \x20       rate_limit: { unit: hour }\n\
             \x20 - key: plan\n\
             \x20   rate_limit: { unit: hour }\n\
             \x20   descriptors:\n\
             \x20     - key: user\n\
             \x20       value_to_metric: yes\n\
             \x20       rate_limit: { unit: hour }\n",
        );
        let levels = |entries: &[(&str, &str)]| {
            let rule = rules.find(entries).unwrap().rule;
            let levels = rule.stat_levels.iter();
            let levels = levels.map(|l| (l.segment.as_str(), l.value_to_metric));
            (levels.collect::<Vec<_>>(), rule.stat_name.as_str())
        };
        // On an intermediate level without a rate_limit: carried down to the rule.
        assert_eq!(
            levels(&[("tenant", "acme"), ("user", "bob")]),
            (vec![("tenant", true), ("user", false)], "tenant.user")
        );
        // A wildcard level keeps its pattern as the configured segment, dots and all.
        assert_eq!(
            levels(&[("tenant", "acme"), ("ip", "10.0.0.1")]),
            (
                vec![("tenant", true), ("ip_10.0.*", true)],
                "tenant.ip_10.0.*"
            )
        );
        // On the leaf only; the parent's own rule is a path of one plain level.
        assert_eq!(
            levels(&[("plan", "gold"), ("user", "bob")]),
            (vec![("plan", false), ("user", true)], "plan.user")
        );
        assert_eq!(levels(&[("plan", "gold")]), (vec![("plan", false)], "plan"));
        assert!(!rules
            .find(&[("plan", "gold")])
            .unwrap()
            .rule
            .value_to_metric());
        assert!(rules
            .find(&[("plan", "gold"), ("user", "x")])
            .unwrap()
            .rule
            .value_to_metric());
    }

    /// A random descriptor tree, written out in block or flow style with comments and blank
    /// lines, remembering the line each descriptor starts on.
    #[derive(Debug, Clone)]
    struct Gen {
        key: String,
        value: Option<String>,
        limit: Option<u32>,
        flow: bool,
        padding: usize,
        children: Vec<Gen>,
    }

    fn gen_tree() -> impl Strategy<Value = Vec<Gen>> {
        let word = prop_oneof![
            "[a-z_]{1,8}",
            Just("it's".to_owned()),
            Just("with space".to_owned()),
            Just("a: b".to_owned()),
            Just("#hash".to_owned()),
            Just("1.10".to_owned()),
            Just("*".to_owned()),
            Just("ü/é*".to_owned()),
        ];
        let leaf = (
            word.clone(),
            proptest::option::of(word),
            proptest::option::of(0u32..1000),
            any::<bool>(),
            0usize..3,
        )
            .prop_map(|(key, value, limit, flow, padding)| Gen {
                key,
                value,
                limit,
                flow,
                padding,
                children: vec![],
            });
        let tree = leaf.prop_recursive(3, 24, 4, |inner| {
            (inner.clone(), proptest::collection::vec(inner, 0..4)).prop_map(|(mut node, kids)| {
                node.children = kids;
                node
            })
        });
        proptest::collection::vec(tree, 0..5)
    }

    fn quote(s: &str) -> String {
        format!("'{}'", s.replace('\'', "''"))
    }

    /// Unique keys per level (duplicates are an error, tested elsewhere).
    fn dedupe(list: &mut Vec<Gen>) {
        let mut seen = HashSet::new();
        list.retain(|g| seen.insert(composite(&g.key, g.value.as_deref())));
        for g in list {
            dedupe(&mut g.children);
        }
    }

    fn emit(list: &[Gen], indent: usize, out: &mut Vec<String>, expected: &mut Vec<usize>) {
        let pad = " ".repeat(indent);
        for g in list {
            for i in 0..g.padding {
                out.push(if i % 2 == 0 {
                    String::new()
                } else {
                    format!("{pad}# comment")
                });
            }
            expected.push(out.len() + 1);
            let limit = g
                .limit
                .map(|n| format!("{{unit: second, requests_per_unit: {n}}}"));
            if g.flow {
                // One flow map on one line per descriptor, children as a flow list.
                fn flow(g: &Gen) -> String {
                    let mut parts = vec![format!("key: {}", quote(&g.key))];
                    if let Some(v) = &g.value {
                        parts.push(format!("value: {}", quote(v)));
                    }
                    if let Some(n) = g.limit {
                        parts.push(format!(
                            "rate_limit: {{unit: second, requests_per_unit: {n}}}"
                        ));
                    }
                    if !g.children.is_empty() {
                        let kids: Vec<String> = g.children.iter().map(flow).collect();
                        parts.push(format!("descriptors: [{}]", kids.join(", ")));
                    }
                    format!("{{{}}}", parts.join(", "))
                }
                out.push(format!("{pad}- {}", flow(g)));
                // Children share the line.
                fn same_line(g: &Gen, line: usize, expected: &mut Vec<usize>) {
                    for kid in &g.children {
                        expected.push(line);
                        same_line(kid, line, expected);
                    }
                }
                same_line(g, out.len(), expected);
                continue;
            }
            out.push(format!("{pad}- key: {}  # trailing", quote(&g.key)));
            if let Some(v) = &g.value {
                out.push(format!("{pad}  value: {}", quote(v)));
            }
            if let Some(limit) = limit {
                out.push(format!("{pad}  rate_limit: {limit}"));
            }
            if !g.children.is_empty() {
                out.push(format!("{pad}  descriptors:"));
                emit(&g.children, indent + 4, out, expected);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn generated_documents_get_the_right_lines(mut tree in gen_tree()) {
            dedupe(&mut tree);
            let mut out = vec!["# generated".to_owned(), "domain: gen".to_owned(), "descriptors:".to_owned()];
            let mut expected = Vec::new();
            emit(&tree, 2, &mut out, &mut expected);
            let text = out.join("\n") + "\n";
            let rules = parse(&text);
            let got: Vec<usize> = rules.root.walk().map(|n| n.line).collect();
            prop_assert_eq!(&got, &expected, "{}", text);
        }
    }

    #[test]
    fn ruleset_from_sources_uses_these_lines() {
        let set = RuleSet::from_sources(&[(
            "x.yaml".to_owned(),
            "domain: x\ndescriptors:\n\n  - key: k\n    rate_limit: {unit: second}\n".to_owned(),
        )])
        .unwrap();
        assert_eq!(
            set.domain("x")
                .unwrap()
                .find(&[("k", "v")])
                .unwrap()
                .rule
                .line,
            4
        );
    }
}
