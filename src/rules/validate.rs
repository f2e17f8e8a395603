//! The validation pass: a parsed [`Yaml`] tree → a domain's descriptor tree, checked the way
//! envoyproxy/ratelimit checks it, failing on the first problem with its line.
//!
//! One recursive walk, in document order. Each map section (the file, a descriptor, a
//! rate_limit, a replaces entry) is read key by key: unknown and repeated keys are refused at the
//! key, a bad value at the value, and what needs the whole section (a missing key, a unit with
//! `unlimited`, a duplicate descriptor) at the section's first line. Upstream compatibility:
//! YAML 1.1 booleans (`yes`, `on`, ...) are accepted as yaml.v2 does; `<<` merge keys work in
//! descriptors and rate_limits (explicit keys win, then earlier sources); strings are taken as
//! written (`1.10`, `010`); an empty `value` or `name` counts as absent; `requests_per_unit`
//! absent or null is 0.

use std::collections::HashSet;

use hivemind_core::Unit;

use super::matcher::{composite, Level, Node};
use super::yaml::{Node as Shape, Scalar, Yaml};
use super::{RateLimit, Rule};

/// A rules document that does not validate: the 1-based line and the message.
#[derive(Debug)]
pub(crate) struct Invalid {
    pub(crate) line: usize,
    pub(crate) message: String,
}

type Result<T> = std::result::Result<T, Invalid>;

fn invalid<T>(at: &Yaml, message: impl Into<String>) -> Result<T> {
    Err(Invalid {
        line: at.line,
        message: message.into(),
    })
}

/// A validated document: the domain, the line of its `domain` key, its descriptors.
pub(crate) struct Document {
    pub(crate) domain: String,
    pub(crate) domain_line: usize,
    pub(crate) root: Level,
}

const DESCRIPTOR_KEYS: &[&str] = &[
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
    "<<",
];
const RATE_LIMIT_KEYS: &[&str] = &[
    "unit",
    "requests_per_unit",
    "name",
    "replaces",
    "unlimited",
    "<<",
];
const UNITS: &str = "second, minute, hour, day, week, month or year";

/// Validates a whole document.
pub(crate) fn document(root: &Yaml) -> Result<Document> {
    let mut path = Path::default();
    untagged(root, &path, "a map with 'domain' and 'descriptors'")?;
    let entries = match &root.node {
        Shape::Map(entries) => entries,
        _ if root.is_null() => {
            return invalid(root, "missing domain (the file has no YAML document)")
        }
        _ => {
            return invalid(
                root,
                format!(
                    "a rules file must be a map with 'domain' and 'descriptors', found {}",
                    root.found()
                ),
            )
        }
    };
    let (mut domain, mut domain_line, mut descriptors) = (None, 0, Level::default());
    let mut seen = 0;
    for (key, value) in entries {
        let name = section_key(key, &["domain", "descriptors"], "the rules file", &mut seen)?;
        path.push(name);
        if name == "domain" {
            domain_line = key.line;
            domain = string(value, &path)?;
            if domain.as_deref() == Some("") {
                return invalid(value, "domain is empty");
            }
        } else {
            descriptors = list(value, &mut path)?;
        }
        path.pop();
    }
    let Some(domain) = domain else {
        return invalid(root, "missing domain");
    };
    name_rules(&mut descriptors.nodes, "");
    Ok(Document {
        domain,
        domain_line,
        root: descriptors,
    })
}

/// Where the walk is, in serde's notation (`descriptors[0].rate_limit`), for the messages that
/// serde_yaml used to word.
#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn push(&mut self, segment: &str) {
        self.0.push(segment.to_owned());
    }

    fn pop(&mut self) {
        self.0.pop();
    }

    fn index(&mut self, i: usize) {
        if let Some(last) = self.0.last_mut() {
            last.push_str(&format!("[{i}]"));
        }
    }

    fn unindex(&mut self) {
        if let Some(last) = self.0.last_mut() {
            if let Some(at) = last.rfind('[') {
                last.truncate(at);
            }
        }
    }

    fn at(&self) -> String {
        self.0.join(".")
    }
}

/// A map key of a section: a string among `keys`, not seen before (`seen` is a bit per key).
fn section_key(
    key: &Yaml,
    keys: &[&'static str],
    section: &str,
    seen: &mut u32,
) -> Result<&'static str> {
    untagged(key, &Path::default(), "a key")?;
    let Some(Scalar::Text(text)) = key.scalar() else {
        return invalid(key, format!("key is not a string: {}", key.found()));
    };
    let Some(i) = keys.iter().position(|k| *k == text) else {
        let expected: Vec<&str> = keys.iter().copied().filter(|k| *k != "<<").collect();
        return invalid(
            key,
            format!(
                "unknown key '{text}' in {section} (expected {})",
                expected.join(", ")
            ),
        );
    };
    if *seen & (1 << i) != 0 {
        return invalid(key, format!("key '{text}' appears twice in one {section}"));
    }
    *seen |= 1 << i;
    Ok(keys[i])
}

/// A string field, as written; null is `None`.
fn string(value: &Yaml, path: &Path) -> Result<Option<String>> {
    match (&value.node, value.scalar()) {
        (_, Some(Scalar::Null)) => Ok(None),
        (Shape::Scalar { text, .. }, _) => Ok(Some(text.to_string())),
        (Shape::List(_), _) => type_error(value, path, "sequence", "a string"),
        (Shape::Map(_), _) => type_error(value, path, "map", "a string"),
    }
}

/// serde's wording for a node of the wrong type, with the path serde_yaml put before it.
fn type_error<T>(value: &Yaml, path: &Path, found: &str, expected: &str) -> Result<T> {
    let message = format!("invalid type: {found}, expected {expected}");
    match path.at() {
        at if at.is_empty() => invalid(value, message),
        at => invalid(value, format!("{at}: {message}")),
    }
}

/// Refuses a node with a tag outside the core schema (`!foo`) where the schema wants a plain
/// value, as serde_yaml did (it reads such a node as an enum).
fn untagged(value: &Yaml, path: &Path, expected: &str) -> Result<()> {
    match value.tag {
        Some(_) => type_error(value, path, "enum", expected),
        None => Ok(()),
    }
}

/// serde_yaml's refusal of an integer beyond 64 bits.
fn huge<T>(value: &Yaml, path: &Path, text: &str, expected: &str) -> Result<T> {
    let kind = if text.starts_with('-') {
        "i128"
    } else {
        "u128"
    };
    let found = format!("integer `{}` as {kind}", text.trim_start_matches('+'));
    type_error(value, path, &found, expected)
}

/// A boolean flag: YAML 1.1 spellings as yaml.v2 reads them; null is false.
fn flag(value: &Yaml, field: &str, path: &Path) -> Result<bool> {
    untagged(value, path, "true or false")?;
    let on = match value.scalar() {
        Some(Scalar::Null) => Some(false),
        Some(Scalar::Bool(on)) => Some(on),
        Some(Scalar::Huge(text)) => return huge(value, path, text, "true or false"),
        Some(Scalar::Text(text)) => match text {
            "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => {
                Some(true)
            }
            "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False"
            | "FALSE" => Some(false),
            _ => None,
        },
        _ => None,
    };
    match on {
        Some(on) => Ok(on),
        None => invalid(
            value,
            format!("'{field}' must be true or false, found {}", value.found()),
        ),
    }
}

/// `requests_per_unit`: a whole number that fits in a u32 (a float with no fraction, like
/// `1e3`, too, as yaml.v2 takes it); null is 0.
fn count(value: &Yaml, path: &Path) -> Result<u32> {
    const EXPECTED: &str = "a whole number from 0 to 4294967295";
    untagged(value, path, EXPECTED)?;
    let n = match value.scalar() {
        Some(Scalar::Null) => Some(0),
        Some(Scalar::Unsigned(n)) => u32::try_from(n).ok(),
        Some(Scalar::Signed(n)) => u32::try_from(n).ok(),
        Some(Scalar::Float(f)) if f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f) => {
            Some(f as u32)
        }
        Some(Scalar::Huge(text)) => return huge(value, path, text, EXPECTED),
        _ => None,
    };
    match n {
        Some(n) => Ok(n),
        None => invalid(
            value,
            format!(
                "requests_per_unit must be {EXPECTED}, found {}",
                value.found()
            ),
        ),
    }
}

/// `metadata`: any map, kept as JSON; null is none.
fn metadata(value: &Yaml, path: &mut Path) -> Result<Option<serde_json::Value>> {
    untagged(value, path, "a map")?;
    match &value.node {
        Shape::Map(_) => json(value, path).map(Some),
        _ if value.is_null() => Ok(None),
        _ => invalid(
            value,
            format!("'metadata' must be a map, found {}", value.found()),
        ),
    }
}

fn json(value: &Yaml, path: &mut Path) -> Result<serde_json::Value> {
    use serde_json::Value as Json;
    let plain = match &value.node {
        Shape::List(items) => Json::Array(
            items
                .iter()
                .map(|item| json(item, path))
                .collect::<Result<_>>()?,
        ),
        Shape::Map(entries) => {
            let mut map = serde_json::Map::with_capacity(entries.len());
            for (key, item) in entries {
                let name = match key.scalar() {
                    Some(Scalar::Text(text)) => text.to_owned(),
                    Some(Scalar::Null) | None => {
                        return invalid(
                            value,
                            "'metadata' cannot be represented as JSON: key must be a string",
                        )
                    }
                    Some(_) => key.found(),
                };
                path.push(&name);
                let item = json(item, path)?;
                path.pop();
                if map.contains_key(&name) {
                    let message = format!("{}: duplicate entry with key \"{name}\"", path.at());
                    return invalid(value, message);
                }
                map.insert(name, item);
            }
            Json::Object(map)
        }
        Shape::Scalar { .. } => match value.scalar() {
            Some(Scalar::Bool(b)) => Json::Bool(b),
            Some(Scalar::Unsigned(n)) => Json::from(n),
            Some(Scalar::Signed(n)) => Json::from(n),
            Some(Scalar::Float(f)) => {
                serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)
            }
            Some(Scalar::Huge(text)) => return huge(value, path, text, "any YAML value"),
            Some(Scalar::Text(text)) => Json::String(text.to_owned()),
            Some(Scalar::Null) | None => Json::Null,
        },
    };
    Ok(match &value.tag {
        Some(tag) => serde_json::json!({ tag.clone(): plain }),
        None => plain,
    })
}

/// A `descriptors` list: one level of the tree; null is empty.
fn list(value: &Yaml, path: &mut Path) -> Result<Level> {
    untagged(value, path, "a list of descriptors")?;
    let items = match &value.node {
        Shape::List(items) => items,
        _ if value.is_null() => return Ok(Level::default()),
        _ => {
            return invalid(
                value,
                format!("'descriptors' must be a list, found {}", value.found()),
            )
        }
    };
    let mut siblings = HashSet::with_capacity(items.len());
    let mut nodes = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        path.index(i);
        let node = descriptor(item, path)?;
        path.unindex();
        if !siblings.insert(node.composite()) {
            return invalid(item, format!("duplicate descriptor '{}'", node.composite()));
        }
        nodes.push(node);
    }
    Ok(Level::new(nodes))
}

/// The fields of one descriptor map (with its `<<` sources), before validation as a whole.
#[derive(Default)]
struct DescriptorFields {
    key: Option<String>,
    value: Option<String>,
    rate_limit: Option<Limit>,
    children: Option<Level>,
    shadow_mode: Option<bool>,
    quota_mode: Option<bool>,
    detailed_metric: Option<bool>,
    value_to_metric: Option<bool>,
    share_threshold: Option<bool>,
    metadata: Option<serde_json::Value>,
}

/// The fields of one rate_limit map (with its `<<` sources).
#[derive(Default)]
struct LimitFields {
    unit: Option<Unit>,
    requests_per_unit: Option<u32>,
    name: Option<String>,
    replaces: Option<Vec<String>>,
    unlimited: Option<bool>,
}

/// A map section read key by key; `<<` sources fill what the map itself leaves unset.
trait Section: Default {
    const KEYS: &'static [&'static str];
    const NAME: &'static str;
    fn field(&mut self, key: &'static str, value: &Yaml, path: &mut Path) -> Result<()>;
    fn fill_from(&mut self, source: Self);

    fn read(map: &[(Yaml, Yaml)], path: &mut Path) -> Result<Self> {
        let (mut fields, mut sources, mut seen) = (Self::default(), Vec::new(), 0);
        for (key, value) in map {
            let key = section_key(key, Self::KEYS, Self::NAME, &mut seen)?;
            path.push(key);
            if key == "<<" {
                sources = merge_sources::<Self>(value, path)?;
            } else {
                fields.field(key, value, path)?;
            }
            path.pop();
        }
        for source in sources {
            fields.fill_from(source);
        }
        Ok(fields)
    }
}

/// The value of a `<<` key: a map, or a list of maps (earlier ones win).
fn merge_sources<S: Section>(value: &Yaml, path: &mut Path) -> Result<Vec<S>> {
    const WRONG: &str = "'<<' must merge a map or a list of maps, found";
    untagged(value, path, "a map or a list of maps")?;
    match &value.node {
        Shape::Map(map) => Ok(vec![S::read(map, path)?]),
        Shape::List(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match &item.node {
                _ if item.tag.is_some() => untagged(item, path, "a map").map(|()| S::default()),
                Shape::Map(map) => {
                    path.index(i);
                    let source = S::read(map, path);
                    path.unindex();
                    source
                }
                _ => invalid(item, format!("{WRONG} {} in the list", item.found())),
            })
            .collect(),
        Shape::Scalar { .. } => invalid(value, format!("{WRONG} {}", value.found())),
    }
}

fn fill<T>(mine: &mut Option<T>, theirs: Option<T>) {
    if mine.is_none() {
        *mine = theirs;
    }
}

impl Section for DescriptorFields {
    const KEYS: &'static [&'static str] = DESCRIPTOR_KEYS;
    const NAME: &'static str = "descriptor";

    fn field(&mut self, key: &'static str, value: &Yaml, path: &mut Path) -> Result<()> {
        match key {
            "key" => {
                let key = string(value, path)?;
                if key.as_deref() == Some("") {
                    return invalid(value, "descriptor has empty key");
                }
                self.key = key;
            }
            "value" => self.value = string(value, path)?.filter(|v| !v.is_empty()),
            "rate_limit" => self.rate_limit = rate_limit(value, path)?,
            "descriptors" => self.children = Some(list(value, path)?),
            "metadata" => self.metadata = metadata(value, path)?,
            "shadow_mode" => self.shadow_mode = Some(flag(value, key, path)?),
            "quota_mode" => self.quota_mode = Some(flag(value, key, path)?),
            "detailed_metric" => self.detailed_metric = Some(flag(value, key, path)?),
            "value_to_metric" => self.value_to_metric = Some(flag(value, key, path)?),
            _ => self.share_threshold = Some(flag(value, key, path)?),
        }
        Ok(())
    }

    fn fill_from(&mut self, source: Self) {
        fill(&mut self.key, source.key);
        fill(&mut self.value, source.value);
        fill(&mut self.rate_limit, source.rate_limit);
        fill(&mut self.children, source.children);
        fill(&mut self.shadow_mode, source.shadow_mode);
        fill(&mut self.quota_mode, source.quota_mode);
        fill(&mut self.detailed_metric, source.detailed_metric);
        fill(&mut self.value_to_metric, source.value_to_metric);
        fill(&mut self.share_threshold, source.share_threshold);
        fill(&mut self.metadata, source.metadata);
    }
}

impl Section for LimitFields {
    const KEYS: &'static [&'static str] = RATE_LIMIT_KEYS;
    const NAME: &'static str = "rate_limit";

    fn field(&mut self, key: &'static str, value: &Yaml, path: &mut Path) -> Result<()> {
        match key {
            "unit" => {
                let unit = match string(value, path)?.filter(|u| !u.is_empty()) {
                    None => None,
                    Some(text) => match Unit::parse(&text) {
                        Some(unit) => Some(unit),
                        None => {
                            let message =
                                format!("invalid rate limit unit '{text}' (expected {UNITS})");
                            return invalid(value, message);
                        }
                    },
                };
                self.unit = unit;
            }
            "requests_per_unit" => self.requests_per_unit = Some(count(value, path)?),
            "name" => self.name = string(value, path)?.filter(|n| !n.is_empty()),
            "replaces" => self.replaces = Some(replaces(value, path)?),
            _ => self.unlimited = Some(flag(value, key, path)?),
        }
        Ok(())
    }

    fn fill_from(&mut self, source: Self) {
        fill(&mut self.unit, source.unit);
        fill(&mut self.requests_per_unit, source.requests_per_unit);
        fill(&mut self.name, source.name);
        fill(&mut self.replaces, source.replaces);
        fill(&mut self.unlimited, source.unlimited);
    }
}

/// One element of a `descriptors` list, validated as a whole (its siblings are the caller's).
fn descriptor(item: &Yaml, path: &mut Path) -> Result<Node> {
    untagged(item, path, "a descriptor map")?;
    let Shape::Map(map) = &item.node else {
        return invalid(item, format!("list element is not a map: {}", item.found()));
    };
    let fields = DescriptorFields::read(map, path)?;
    let Some(key) = fields.key else {
        return invalid(item, "descriptor has no key");
    };
    let value = fields.value;
    let share_threshold = fields.share_threshold.unwrap_or(false);
    if share_threshold && !value.as_deref().is_some_and(|v| v.contains('*')) {
        let composite = composite(&key, value.as_deref());
        return invalid(
            item,
            format!("share_threshold needs a '*' wildcard in value (descriptor '{composite}')"),
        );
    }
    let rule = fields.rate_limit.map(|limit| Rule {
        limit: limit.limit,
        shadow_mode: fields.shadow_mode.unwrap_or(false),
        quota_mode: fields.quota_mode.unwrap_or(false),
        detailed_metric: fields.detailed_metric.unwrap_or(false),
        value_to_metric: fields.value_to_metric.unwrap_or(false),
        share_threshold,
        metadata: fields.metadata,
        stat_name: String::new(),
        line: item.line,
        unlimited_name: limit.unlimited_name,
        unlimited_replaces: limit.unlimited_replaces,
    });
    Ok(Node {
        key,
        value,
        share_threshold,
        rule,
        children: fields.children.unwrap_or_default(),
        line: item.line,
    })
}

/// A validated `rate_limit`: the limit, and the `name`/`replaces` an unlimited one may carry.
struct Limit {
    limit: RateLimit,
    unlimited_name: Option<String>,
    unlimited_replaces: Vec<String>,
}

/// A descriptor's `rate_limit` map, merged and validated where it is written; null is none.
fn rate_limit(value: &Yaml, path: &mut Path) -> Result<Option<Limit>> {
    untagged(value, path, "a rate_limit map")?;
    let map = match &value.node {
        Shape::Map(map) => map,
        _ if value.is_null() => return Ok(None),
        _ => {
            let message = format!("'rate_limit' must be a map, found {}", value.found());
            return invalid(value, message);
        }
    };
    let fields = LimitFields::read(map, path)?;
    let replaces = fields.replaces.unwrap_or_default();
    if let Some(name) = fields.name.as_ref().filter(|name| replaces.contains(name)) {
        return invalid(value, format!("rate limit '{name}' replaces itself"));
    }
    if fields.unlimited.unwrap_or(false) {
        if fields.unit.is_some() {
            return invalid(value, "unlimited rate_limit must not have a unit");
        }
        return Ok(Some(Limit {
            limit: RateLimit::Unlimited,
            unlimited_name: fields.name,
            unlimited_replaces: replaces,
        }));
    }
    let Some(unit) = fields.unit else {
        return invalid(value, format!("rate_limit has no unit (expected {UNITS})"));
    };
    Ok(Some(Limit {
        limit: RateLimit::Limited {
            requests_per_unit: fields.requests_per_unit.unwrap_or(0),
            unit,
            name: fields.name,
            replaces,
        },
        unlimited_name: None,
        unlimited_replaces: Vec::new(),
    }))
}

/// `replaces`: a list of `{name: ...}` maps, each with a non-empty name; null is empty.
fn replaces(value: &Yaml, path: &mut Path) -> Result<Vec<String>> {
    untagged(value, path, "a list of {name: ...} maps")?;
    let items = match &value.node {
        Shape::List(items) => items,
        _ if value.is_null() => return Ok(Vec::new()),
        _ => {
            let found = value.found();
            let message = format!("'replaces' must be a list of {{name: ...}} maps, found {found}");
            return invalid(value, message);
        }
    };
    let mut names = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        path.index(i);
        untagged(item, path, "a {name: ...} map")?;
        let Shape::Map(map) = &item.node else {
            return invalid(item, format!("list element is not a map: {}", item.found()));
        };
        let mut name = None;
        let mut seen = 0;
        for (key, value) in map {
            section_key(key, &["name"], "replaces entry", &mut seen)?;
            path.push("name");
            name = string(value, path)?;
            path.pop();
            if name.as_deref() == Some("") {
                return invalid(value, "replaces entry has an empty name");
            }
        }
        path.unindex();
        match name {
            Some(name) => names.push(name),
            None => return invalid(item, "replaces entry has an empty name"),
        }
    }
    Ok(names)
}

/// Gives every rule its stat name: the `key` / `key_value` path from the top, joined by '.'.
fn name_rules(nodes: &mut [Node], parent: &str) {
    for node in nodes {
        let stat = if parent.is_empty() {
            node.composite()
        } else {
            format!("{parent}.{}", node.composite())
        };
        if let Some(rule) = &mut node.rule {
            rule.stat_name.clone_from(&stat);
        }
        name_rules(&mut node.children.nodes, &stat);
    }
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
        assert!(!flags.value_to_metric);
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
