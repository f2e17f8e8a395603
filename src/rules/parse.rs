//! YAML text → validated descriptor tree, with `file:line` errors.
//!
//! Two passes over each document:
//!
//! 1. A schema-aware serde pass (the seeds and visitors below, driven by serde_yaml's
//!    deserializer) builds the tree and validates it as it goes. An error raised inside a visitor
//!    carries serde_yaml's position of the node being read (a key, a scalar, or the start of a
//!    map), so every error line is serde_yaml's own, for block and flow style alike. Strings are
//!    read with `deserialize_str`, which hands over the scalar as written: `value: 1.10` stays
//!    "1.10" and `value: 010` stays "010", as with yaml.v2 upstream.
//! 2. serde reports no position for nodes that parse fine, and `Rule::line` needs one for every
//!    descriptor. A light scanner tokenizes the text and lines its tokens up with a
//!    `serde_yaml::Value` of the same text, checking every string on the way. If the two ever
//!    disagree (YAML the scanner does not follow), each line is asked of serde_yaml itself instead,
//!    by re-parsing the text with a visitor that fails on purpose at that node (exact, but one
//!    parse per descriptor, so only within a budget).
//!
//! Upstream compatibility notes: YAML 1.1 booleans (`yes`, `on`, ...) are accepted as yaml.v2
//! does; `<<` merge keys work in descriptors and rate_limits; an empty `value` or `name` counts as
//! absent; `requests_per_unit` absent (or null) is 0.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use hivemind_core::Unit;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_yaml::Value;

use super::matcher::{composite, Level, Node};
use super::{RateLimit, Rule, RulesError};

/// Parses one rules document into its domain name and descriptor tree; also returns the line of
/// its `domain` key (for a duplicate-domain error).
pub(crate) fn parse_document(
    file: &str,
    text: &str,
) -> Result<(super::DomainRules, Option<usize>), RulesError> {
    // serde_yaml reads a leading byte order mark as a second document; editors on Windows add
    // one. It takes no line, so dropping it changes no line number.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let ctx = Ctx::default();
    let parsed = RootSeed { ctx: &ctx }.deserialize(serde_yaml::Deserializer::from_str(text));
    let (name, mut root) = parsed.map_err(|err| RulesError {
        file: file.to_owned(),
        line: err.location().map(|at| at.line()),
        message: ctx
            .failure
            .borrow_mut()
            .take()
            .unwrap_or_else(|| serde_message(&err)),
    })?;
    let located = locate(text);
    assign(&mut root.nodes, &located.descriptors, 0, "");
    let rules = super::DomainRules {
        name,
        source: file.to_owned(),
        root,
    };
    Ok((rules, located.domain_line))
}

/// serde_yaml's message without the " at line L column C" it appends (the line is reported
/// separately); libyaml syntax errors, whose text names two places, are kept whole.
fn serde_message(err: &serde_yaml::Error) -> String {
    let text = err.to_string();
    if let Some(at) = err.location() {
        let suffix = format!(" at line {} column {}", at.line(), at.column());
        if let Some(message) = text.strip_suffix(&suffix) {
            return message.to_owned();
        }
    }
    text
}

/// Sets each descriptor's line and stat name, walking the tree and the located lines together.
/// Where the two differ in shape (a merge key the locator does not follow), a descriptor gets its
/// parent's line.
fn assign(nodes: &mut [Node], lines: &[DescLines], fallback: usize, parent: &str) {
    let lines = if lines.len() == nodes.len() {
        lines
    } else {
        &[]
    };
    for (i, node) in nodes.iter_mut().enumerate() {
        let located = lines.get(i);
        let line = located.map_or(fallback, |l| l.line);
        let stat = if parent.is_empty() {
            node.composite()
        } else {
            format!("{parent}.{}", node.composite())
        };
        node.line = line;
        if let Some(rule) = &mut node.rule {
            rule.line = line;
            rule.stat_name.clone_from(&stat);
        }
        let children = located.map_or(&[][..], |l| &l.children);
        assign(&mut node.children.nodes, children, line, &stat);
    }
}

// ---------------------------------------------------------------------------------------------
// Pass 1: the schema-aware serde pass.

/// State shared by the visitors of one document: the plain message of the first error raised
/// (serde_yaml's own text would add its path and position).
#[derive(Default)]
struct Ctx {
    failure: RefCell<Option<String>>,
}

impl Ctx {
    fn fail<E: de::Error>(&self, message: impl Into<String>) -> E {
        let message = message.into();
        let err = E::custom(&message);
        self.failure.borrow_mut().get_or_insert(message);
        err
    }
}

const ROOT_KEYS: &[&str] = &["domain", "descriptors"];
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
const REPLACES_KEYS: &[&str] = &["name"];
const UNITS: &str = "second, minute, hour, day, week, month or year";

/// Implements the `visit_*` methods of the node kinds a visitor rejects, each failing with
/// `self.wrong(<what was found>)`.
macro_rules! reject {
    ($de:lifetime; $($kind:ident),*) => { $(reject!(@ $de $kind);)* };
    (@ $de:lifetime bool) => {
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Err(self.ctx.fail(self.wrong(&v.to_string())))
        }
    };
    (@ $de:lifetime i64) => {
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Err(self.ctx.fail(self.wrong(&v.to_string())))
        }
    };
    (@ $de:lifetime u64) => {
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Err(self.ctx.fail(self.wrong(&v.to_string())))
        }
    };
    (@ $de:lifetime f64) => {
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Err(self.ctx.fail(self.wrong(&v.to_string())))
        }
    };
    (@ $de:lifetime str) => {
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Err(self.ctx.fail(self.wrong(&format!("'{v}'"))))
        }
    };
    (@ $de:lifetime unit) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(self.ctx.fail(self.wrong("null")))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(self.ctx.fail(self.wrong("null")))
        }
    };
    (@ $de:lifetime seq) => {
        fn visit_seq<A: SeqAccess<$de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(self.ctx.fail(self.wrong("a list")))
        }
    };
    (@ $de:lifetime map) => {
        fn visit_map<A: MapAccess<$de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(self.ctx.fail(self.wrong("a map")))
        }
    };
}

/// The whole document: `domain` and `descriptors`.
struct RootSeed<'c> {
    ctx: &'c Ctx,
}

impl RootSeed<'_> {
    fn wrong(&self, found: &str) -> String {
        format!("a rules file must be a map with 'domain' and 'descriptors', found {found}")
    }
}

impl<'de> DeserializeSeed<'de> for RootSeed<'_> {
    type Value = (String, Level);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RootSeed<'_> {
    type Value = (String, Level);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map with 'domain' and 'descriptors'")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let ctx = self.ctx;
        let (mut seen, mut domain, mut level) = (0, None, None);
        while let Some(key) =
            map.next_key_seed(KeySeed::new(ctx, ROOT_KEYS, "the rules file", &mut seen))?
        {
            match key {
                "domain" => {
                    domain = map.next_value_seed(StrSeed::new(ctx, |s| {
                        if s.is_empty() {
                            Err("domain is empty".to_owned())
                        } else {
                            Ok(s.to_owned())
                        }
                    }))?;
                }
                _ => level = Some(map.next_value_seed(ListSeed { ctx })?),
            }
        }
        let Some(domain) = domain else {
            return Err(ctx.fail("missing domain"));
        };
        Ok((domain, level.unwrap_or_default()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(self
            .ctx
            .fail("missing domain (the file has no YAML document)"))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_unit()
    }

    reject!('de; bool, i64, u64, f64, str, seq);
}

/// A map key: must be one of `keys`, and appear once.
struct KeySeed<'a> {
    ctx: &'a Ctx,
    keys: &'static [&'static str],
    context: &'static str,
    seen: &'a mut u32,
}

impl<'a> KeySeed<'a> {
    fn new(
        ctx: &'a Ctx,
        keys: &'static [&'static str],
        context: &'static str,
        seen: &'a mut u32,
    ) -> Self {
        KeySeed {
            ctx,
            keys,
            context,
            seen,
        }
    }

    fn wrong(&self, found: &str) -> String {
        format!("key is not a string: {found}")
    }
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = &'static str;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = &'static str;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        let Some(i) = self.keys.iter().position(|k| *k == key) else {
            let expected: Vec<&str> = self.keys.iter().copied().filter(|k| *k != "<<").collect();
            return Err(self.ctx.fail(format!(
                "unknown key '{key}' in {} (expected {})",
                self.context,
                expected.join(", ")
            )));
        };
        if *self.seen & (1 << i) != 0 {
            return Err(self
                .ctx
                .fail(format!("key '{key}' appears twice in one {}", self.context)));
        }
        *self.seen |= 1 << i;
        Ok(self.keys[i])
    }

    reject!('de; bool, i64, u64, f64, unit, seq, map);
}

/// A string field, as written in the file (`deserialize_str` gives plain scalars like `1.10` as
/// their text); null or absent is `None`. `parse` validates and converts the text.
struct StrSeed<'c, T> {
    ctx: &'c Ctx,
    parse: fn(&str) -> Result<T, String>,
}

impl<'c, T> StrSeed<'c, T> {
    fn new(ctx: &'c Ctx, parse: fn(&str) -> Result<T, String>) -> Self {
        StrSeed { ctx, parse }
    }
}

fn any_string(s: &str) -> Result<String, String> {
    Ok(s.to_owned())
}

impl<'de, T> DeserializeSeed<'de> for StrSeed<'_, T> {
    type Value = Option<T>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de, T> Visitor<'de> for StrSeed<'_, T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(StrVisitor(self)).map(Some)
    }
}

struct StrVisitor<'c, T>(StrSeed<'c, T>);

impl<'de, T> Visitor<'de> for StrVisitor<'_, T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0.parse)(v).map_err(|message| self.0.ctx.fail(message))
    }
}

/// A boolean flag; null is false; YAML 1.1 spellings (yes/no/on/off/y/n) are accepted, as
/// yaml.v2 does upstream.
struct BoolSeed<'c> {
    ctx: &'c Ctx,
    field: &'static str,
}

impl BoolSeed<'_> {
    fn wrong(&self, found: &str) -> String {
        format!("'{}' must be true or false, found {found}", self.field)
    }
}

impl<'de> DeserializeSeed<'de> for BoolSeed<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BoolSeed<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("true or false")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_none<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        match v {
            "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => {
                Ok(true)
            }
            "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False"
            | "FALSE" => Ok(false),
            _ => Err(self.ctx.fail(self.wrong(&format!("'{v}'")))),
        }
    }

    reject!('de; i64, u64, f64, seq, map);
}

/// `requests_per_unit`: a u32; null is 0 (as upstream, where absent is 0).
struct CountSeed<'c> {
    ctx: &'c Ctx,
}

impl CountSeed<'_> {
    fn wrong(&self, found: &str) -> String {
        format!("requests_per_unit must be a whole number from 0 to 4294967295, found {found}")
    }
}

impl<'de> DeserializeSeed<'de> for CountSeed<'_> {
    type Value = u32;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u32, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CountSeed<'_> {
    type Value = u32;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a whole number from 0 to 4294967295")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| self.ctx.fail(self.wrong(&v.to_string())))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| self.ctx.fail(self.wrong(&v.to_string())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u32, E> {
        // yaml.v2 accepts a float with no fraction (`1e3`); so do we.
        if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
            Ok(v as u32)
        } else {
            Err(self.ctx.fail(self.wrong(&v.to_string())))
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<u32, E> {
        Ok(0)
    }

    fn visit_none<E: de::Error>(self) -> Result<u32, E> {
        Ok(0)
    }

    reject!('de; bool, str, seq, map);
}

/// `metadata`: any map, kept as JSON.
struct MetadataSeed<'c> {
    ctx: &'c Ctx,
}

impl MetadataSeed<'_> {
    fn wrong(&self, found: &str) -> String {
        format!("'metadata' must be a map, found {found}")
    }
}

impl<'de> DeserializeSeed<'de> for MetadataSeed<'_> {
    type Value = Option<serde_json::Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MetadataSeed<'_> {
    type Value = Option<serde_json::Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let yaml = Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
        serde_json::to_value(&yaml).map(Some).map_err(|e| {
            self.ctx
                .fail(format!("'metadata' cannot be represented as JSON: {e}"))
        })
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    reject!('de; bool, i64, u64, f64, str, seq);
}

/// A `descriptors` list: one level of the tree.
struct ListSeed<'c> {
    ctx: &'c Ctx,
}

impl ListSeed<'_> {
    fn wrong(&self, found: &str) -> String {
        format!("'descriptors' must be a list, found {found}")
    }
}

impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
    type Value = Level;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Level, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_> {
    type Value = Level;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of descriptors")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Level, A::Error> {
        let mut siblings = HashSet::new();
        let mut nodes = Vec::new();
        while let Some(node) = seq.next_element_seed(DescriptorSeed {
            ctx: self.ctx,
            siblings: &mut siblings,
        })? {
            nodes.push(node);
        }
        Ok(Level::new(nodes))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Level, E> {
        Ok(Level::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<Level, E> {
        Ok(Level::default())
    }

    reject!('de; bool, i64, u64, f64, str, map);
}

/// A map section (descriptor or rate_limit) read field by field, with `<<` merges applied.
trait Section: Default + Sized {
    fn read<'de, A: MapAccess<'de>>(ctx: &Ctx, map: A) -> Result<Self, A::Error>;
    /// Fills the fields not set here from `other` (a merge source).
    fn fill_from(&mut self, other: Self);
}

/// The fields of one descriptor map, before validation.
#[derive(Default)]
struct DescFields {
    key: Option<String>,
    value: Option<String>,
    rate_limit: Option<LimitSpec>,
    children: Option<Level>,
    shadow_mode: Option<bool>,
    quota_mode: Option<bool>,
    detailed_metric: Option<bool>,
    value_to_metric: Option<bool>,
    share_threshold: Option<bool>,
    metadata: Option<serde_json::Value>,
}

impl Section for DescFields {
    fn read<'de, A: MapAccess<'de>>(ctx: &Ctx, mut map: A) -> Result<Self, A::Error> {
        let mut fields = DescFields::default();
        let mut merged = Vec::new();
        let mut seen = 0;
        while let Some(key) =
            map.next_key_seed(KeySeed::new(ctx, DESCRIPTOR_KEYS, "descriptor", &mut seen))?
        {
            match key {
                "key" => {
                    fields.key = map.next_value_seed(StrSeed::new(ctx, |s| {
                        if s.is_empty() {
                            Err("descriptor has empty key".to_owned())
                        } else {
                            Ok(s.to_owned())
                        }
                    }))?;
                }
                "value" => {
                    fields.value = map
                        .next_value_seed(StrSeed::new(ctx, any_string))?
                        .filter(|v| !v.is_empty());
                }
                "rate_limit" => fields.rate_limit = map.next_value_seed(RateLimitSeed { ctx })?,
                "descriptors" => fields.children = Some(map.next_value_seed(ListSeed { ctx })?),
                "metadata" => fields.metadata = map.next_value_seed(MetadataSeed { ctx })?,
                "<<" => merged = map.next_value_seed(MergeSeed::<DescFields>::new(ctx))?,
                flag => {
                    let on = Some(map.next_value_seed(BoolSeed { ctx, field: flag })?);
                    match flag {
                        "shadow_mode" => fields.shadow_mode = on,
                        "quota_mode" => fields.quota_mode = on,
                        "detailed_metric" => fields.detailed_metric = on,
                        "value_to_metric" => fields.value_to_metric = on,
                        _ => fields.share_threshold = on,
                    }
                }
            }
        }
        for source in merged {
            fields.fill_from(source);
        }
        Ok(fields)
    }

    fn fill_from(&mut self, other: Self) {
        fn fill<T>(mine: &mut Option<T>, theirs: Option<T>) {
            if mine.is_none() {
                *mine = theirs;
            }
        }
        fill(&mut self.key, other.key);
        fill(&mut self.value, other.value);
        fill(&mut self.rate_limit, other.rate_limit);
        fill(&mut self.children, other.children);
        fill(&mut self.shadow_mode, other.shadow_mode);
        fill(&mut self.quota_mode, other.quota_mode);
        fill(&mut self.detailed_metric, other.detailed_metric);
        fill(&mut self.value_to_metric, other.value_to_metric);
        fill(&mut self.share_threshold, other.share_threshold);
        fill(&mut self.metadata, other.metadata);
    }
}

/// One element of a `descriptors` list: read, merged, validated, and checked against its
/// siblings.
struct DescriptorSeed<'a> {
    ctx: &'a Ctx,
    /// `key` / `key_value` of the descriptors before this one at this level.
    siblings: &'a mut HashSet<String>,
}

impl DescriptorSeed<'_> {
    fn wrong(&self, found: &str) -> String {
        format!("list element is not a map: {found}")
    }
}

impl<'de> DeserializeSeed<'de> for DescriptorSeed<'_> {
    type Value = Node;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DescriptorSeed<'_> {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a descriptor map")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Node, A::Error> {
        let ctx = self.ctx;
        let fields = DescFields::read(ctx, map)?;
        let Some(key) = fields.key else {
            return Err(ctx.fail("descriptor has no key"));
        };
        let value = fields.value;
        let composite = composite(&key, value.as_deref());
        let share_threshold = fields.share_threshold.unwrap_or(false);
        if share_threshold && !value.as_deref().is_some_and(|v| v.contains('*')) {
            return Err(ctx.fail(format!(
                "share_threshold needs a '*' wildcard in value (descriptor '{composite}')"
            )));
        }
        if self.siblings.contains(&composite) {
            return Err(ctx.fail(format!("duplicate descriptor '{composite}'")));
        }
        self.siblings.insert(composite);
        let shadow_mode = fields.shadow_mode.unwrap_or(false);
        let quota_mode = fields.quota_mode.unwrap_or(false);
        let detailed_metric = fields.detailed_metric.unwrap_or(false);
        let value_to_metric = fields.value_to_metric.unwrap_or(false);
        let rule = fields.rate_limit.map(|spec| Rule {
            limit: spec.limit,
            shadow_mode,
            quota_mode,
            detailed_metric,
            value_to_metric,
            share_threshold,
            metadata: fields.metadata.clone(),
            stat_name: String::new(),
            line: 0,
            unlimited_name: spec.unlimited_name,
            unlimited_replaces: spec.unlimited_replaces,
        });
        Ok(Node {
            key,
            value,
            rule,
            shadow_mode,
            quota_mode,
            detailed_metric,
            value_to_metric,
            share_threshold,
            metadata: fields.metadata,
            children: fields.children.unwrap_or_default(),
            line: 0,
        })
    }

    reject!('de; bool, i64, u64, f64, str, unit, seq);
}

/// A validated `rate_limit`.
struct LimitSpec {
    limit: RateLimit,
    unlimited_name: Option<String>,
    unlimited_replaces: Vec<String>,
}

/// The fields of one rate_limit map, before validation.
#[derive(Default)]
struct RateFields {
    unit: Option<Unit>,
    requests_per_unit: Option<u32>,
    name: Option<String>,
    replaces: Option<Vec<String>>,
    unlimited: Option<bool>,
}

fn parse_unit(s: &str) -> Result<Option<Unit>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    Unit::parse(s)
        .map(Some)
        .ok_or_else(|| format!("invalid rate limit unit '{s}' (expected {UNITS})"))
}

impl Section for RateFields {
    fn read<'de, A: MapAccess<'de>>(ctx: &Ctx, mut map: A) -> Result<Self, A::Error> {
        let mut fields = RateFields::default();
        let mut merged = Vec::new();
        let mut seen = 0;
        while let Some(key) =
            map.next_key_seed(KeySeed::new(ctx, RATE_LIMIT_KEYS, "rate_limit", &mut seen))?
        {
            match key {
                "unit" => {
                    fields.unit = map
                        .next_value_seed(StrSeed::new(ctx, parse_unit))?
                        .flatten()
                }
                "requests_per_unit" => {
                    fields.requests_per_unit = Some(map.next_value_seed(CountSeed { ctx })?);
                }
                "name" => {
                    fields.name = map
                        .next_value_seed(StrSeed::new(ctx, any_string))?
                        .filter(|name| !name.is_empty());
                }
                "replaces" => fields.replaces = Some(map.next_value_seed(ReplacesSeed { ctx })?),
                "unlimited" => {
                    fields.unlimited = Some(map.next_value_seed(BoolSeed {
                        ctx,
                        field: "unlimited",
                    })?);
                }
                _ => merged = map.next_value_seed(MergeSeed::<RateFields>::new(ctx))?,
            }
        }
        for source in merged {
            fields.fill_from(source);
        }
        Ok(fields)
    }

    fn fill_from(&mut self, other: Self) {
        self.unit = self.unit.or(other.unit);
        self.requests_per_unit = self.requests_per_unit.or(other.requests_per_unit);
        self.name = self.name.take().or(other.name);
        self.replaces = self.replaces.take().or(other.replaces);
        self.unlimited = self.unlimited.or(other.unlimited);
    }
}

/// A descriptor's `rate_limit` map, validated; null is no rate limit.
struct RateLimitSeed<'c> {
    ctx: &'c Ctx,
}

impl RateLimitSeed<'_> {
    fn wrong(&self, found: &str) -> String {
        format!("'rate_limit' must be a map, found {found}")
    }
}

impl<'de> DeserializeSeed<'de> for RateLimitSeed<'_> {
    type Value = Option<LimitSpec>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RateLimitSeed<'_> {
    type Value = Option<LimitSpec>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a rate_limit map")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let ctx = self.ctx;
        let fields = RateFields::read(ctx, map)?;
        let replaces = fields.replaces.unwrap_or_default();
        if let Some(name) = &fields.name {
            if replaces.contains(name) {
                return Err(ctx.fail(format!("rate limit '{name}' replaces itself")));
            }
        }
        let spec = if fields.unlimited.unwrap_or(false) {
            if fields.unit.is_some() {
                return Err(ctx.fail("unlimited rate_limit must not have a unit"));
            }
            LimitSpec {
                limit: RateLimit::Unlimited,
                unlimited_name: fields.name,
                unlimited_replaces: replaces,
            }
        } else {
            let Some(unit) = fields.unit else {
                return Err(ctx.fail(format!("rate_limit has no unit (expected {UNITS})")));
            };
            LimitSpec {
                limit: RateLimit::Limited {
                    requests_per_unit: fields.requests_per_unit.unwrap_or(0),
                    unit,
                    name: fields.name,
                    replaces,
                },
                unlimited_name: None,
                unlimited_replaces: Vec::new(),
            }
        };
        Ok(Some(spec))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    reject!('de; bool, i64, u64, f64, str, seq);
}

/// `replaces`: a list of `{name: ...}` maps.
struct ReplacesSeed<'c> {
    ctx: &'c Ctx,
}

impl ReplacesSeed<'_> {
    fn wrong(&self, found: &str) -> String {
        format!("'replaces' must be a list of {{name: ...}} maps, found {found}")
    }
}

impl<'de> DeserializeSeed<'de> for ReplacesSeed<'_> {
    type Value = Vec<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ReplacesSeed<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of {name: ...} maps")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut names = Vec::new();
        while let Some(name) = seq.next_element_seed(ReplaceSeed { ctx: self.ctx })? {
            names.push(name);
        }
        Ok(names)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    reject!('de; bool, i64, u64, f64, str, map);
}

/// One `replaces` entry: `{name: ...}` with a non-empty name.
struct ReplaceSeed<'c> {
    ctx: &'c Ctx,
}

impl ReplaceSeed<'_> {
    fn wrong(&self, found: &str) -> String {
        format!("list element is not a map: {found}")
    }
}

impl<'de> DeserializeSeed<'de> for ReplaceSeed<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ReplaceSeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a {name: ...} map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        let ctx = self.ctx;
        let (mut seen, mut name) = (0, None);
        while map
            .next_key_seed(KeySeed::new(
                ctx,
                REPLACES_KEYS,
                "replaces entry",
                &mut seen,
            ))?
            .is_some()
        {
            name = map.next_value_seed(StrSeed::new(ctx, |s| {
                if s.is_empty() {
                    Err("replaces entry has an empty name".to_owned())
                } else {
                    Ok(s.to_owned())
                }
            }))?;
        }
        name.ok_or_else(|| ctx.fail("replaces entry has an empty name"))
    }

    reject!('de; bool, i64, u64, f64, str, unit, seq);
}

/// The value of a `<<` merge key: a map, or a list of maps (earlier ones win).
struct MergeSeed<'c, T> {
    ctx: &'c Ctx,
    section: PhantomData<T>,
}

impl<'c, T> MergeSeed<'c, T> {
    fn new(ctx: &'c Ctx) -> Self {
        MergeSeed {
            ctx,
            section: PhantomData,
        }
    }

    fn wrong(&self, found: &str) -> String {
        format!("'<<' must merge a map or a list of maps, found {found}")
    }
}

impl<'de, T: Section> DeserializeSeed<'de> for MergeSeed<'_, T> {
    type Value = Vec<T>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<T>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, T: Section> Visitor<'de> for MergeSeed<'_, T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map or a list of maps")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Vec<T>, A::Error> {
        Ok(vec![T::read(self.ctx, map)?])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut sources = Vec::new();
        while let Some(source) = seq.next_element_seed(MergeItemSeed::<T> {
            ctx: self.ctx,
            section: PhantomData,
        })? {
            sources.push(source);
        }
        Ok(sources)
    }

    reject!('de; bool, i64, u64, f64, str, unit);
}

/// One map of a `<<: [*a, *b]` list.
struct MergeItemSeed<'c, T> {
    ctx: &'c Ctx,
    section: PhantomData<T>,
}

impl<T> MergeItemSeed<'_, T> {
    fn wrong(&self, found: &str) -> String {
        format!("'<<' must merge a map or a list of maps, found {found} in the list")
    }
}

impl<'de, T: Section> DeserializeSeed<'de> for MergeItemSeed<'_, T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, T: Section> Visitor<'de> for MergeItemSeed<'_, T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::read(self.ctx, map)
    }

    reject!('de; bool, i64, u64, f64, str, unit, seq);
}

// ---------------------------------------------------------------------------------------------
// Pass 2: descriptor lines.

/// The line of one descriptor and of the descriptors under it.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct DescLines {
    pub(crate) line: usize,
    pub(crate) children: Vec<DescLines>,
}

/// The lines pass 2 finds in one document.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Located {
    pub(crate) domain_line: Option<usize>,
    pub(crate) descriptors: Vec<DescLines>,
}

/// One step from a YAML node to a child, by position (maps keep their file order).
#[derive(Debug, Clone, Copy)]
enum Step {
    /// The key of the i-th entry of a map.
    Key(usize),
    /// The value of the i-th entry of a map.
    Entry(usize),
    /// The i-th element of a list.
    Elem(usize),
}

/// Where lines come from: the scanner's positions, or serde_yaml probes.
trait LineSource {
    /// The 1-based line where the node at `path` starts (for `Key`, the key's line).
    fn line(&self, path: &[Step]) -> Option<usize>;
}

/// Total bytes the probe fallback may parse for one document (each probe parses it all).
const PROBE_BUDGET: usize = 16 << 20;

pub(crate) fn locate(text: &str) -> Located {
    let Ok(value) = serde_yaml::from_str::<Value>(text) else {
        return Located::default();
    };
    match scan::positions(text, &value) {
        Some(pos) => locate_with(&value, &pos),
        None => locate_with(&value, &Probe::new(text)),
    }
}

fn untag(value: &Value) -> &Value {
    match value {
        Value::Tagged(tagged) => untag(&tagged.value),
        value => value,
    }
}

fn locate_with(value: &Value, source: &dyn LineSource) -> Located {
    let mut located = Located::default();
    let Some(root) = untag(value).as_mapping() else {
        return located;
    };
    for (j, (key, value)) in root.iter().enumerate() {
        match key.as_str() {
            Some("domain") => located.domain_line = source.line(&[Step::Key(j)]),
            Some("descriptors") => {
                let fallback = source.line(&[Step::Key(j)]).unwrap_or(0);
                let mut path = vec![Step::Entry(j)];
                located.descriptors = desc_lines(value, &mut path, source, fallback);
            }
            _ => {}
        }
    }
    located
}

fn desc_lines(
    list: &Value,
    path: &mut Vec<Step>,
    source: &dyn LineSource,
    fallback: usize,
) -> Vec<DescLines> {
    let Some(list) = untag(list).as_sequence() else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, element) in list.iter().enumerate() {
        path.push(Step::Elem(i));
        let line = source.line(path).unwrap_or(fallback);
        let mut children = Vec::new();
        if let Some(map) = untag(element).as_mapping() {
            let nested = map
                .iter()
                .enumerate()
                .find(|(_, (key, _))| key.as_str() == Some("descriptors"));
            if let Some((j, (_, nested))) = nested {
                path.push(Step::Entry(j));
                children = desc_lines(nested, path, source, line);
                path.pop();
            }
        }
        path.pop();
        out.push(DescLines { line, children });
    }
    out
}

impl LineSource for scan::Pos {
    fn line(&self, path: &[Step]) -> Option<usize> {
        let mut node = self;
        for step in path {
            let (Step::Key(i) | Step::Entry(i) | Step::Elem(i)) = *step;
            node = node.kids.get(i)?;
        }
        (node.line > 0).then_some(node.line)
    }
}

/// Asks serde_yaml for a node's line by parsing the text with a visitor that fails on purpose
/// when it reaches the node: serde_yaml stamps the failure with the node's position.
struct Probe<'t> {
    text: &'t str,
    budget: Cell<usize>,
}

/// The message of the deliberate failure, to tell it from a real one.
const PROBE_MESSAGE: &str = "hivemind line probe";

impl<'t> Probe<'t> {
    fn new(text: &'t str) -> Self {
        Probe {
            text,
            budget: Cell::new(PROBE_BUDGET),
        }
    }
}

impl LineSource for Probe<'_> {
    fn line(&self, path: &[Step]) -> Option<usize> {
        let left = self.budget.get().checked_sub(self.text.len().max(1))?;
        self.budget.set(left);
        let err = Nav(path)
            .deserialize(serde_yaml::Deserializer::from_str(self.text))
            .err()?;
        if err.to_string().contains(PROBE_MESSAGE) {
            err.location().map(|at| at.line())
        } else {
            None
        }
    }
}

/// Walks `path` through the document, skipping everything else, and fails at its end.
struct Nav<'p>(&'p [Step]);

impl Nav<'_> {
    fn here<E: de::Error>(&self) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::custom(PROBE_MESSAGE))
        } else {
            Err(E::custom("probe path not found"))
        }
    }
}

impl<'de> DeserializeSeed<'de> for Nav<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Nav<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.here()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.here()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.here()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.here()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.here()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.here()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.here()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Step::Elem(i), rest)) = self.0.split_first() else {
            return self.here();
        };
        for _ in 0..*i {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom("probe path not found"));
            }
        }
        seq.next_element_seed(Nav(rest))?;
        Err(de::Error::custom("probe path not found"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (j, rest, at_key) = match self.0.split_first() {
            Some((Step::Key(j), rest)) => (*j, rest, true),
            Some((Step::Entry(j), rest)) => (*j, rest, false),
            _ => return self.here(),
        };
        for _ in 0..j {
            if map.next_key::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom("probe path not found"));
            }
            map.next_value::<IgnoredAny>()?;
        }
        if at_key {
            map.next_key_seed(Nav(rest))?;
        } else if map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(Nav(rest))?;
        }
        Err(de::Error::custom("probe path not found"))
    }
}

/// The light YAML scanner behind the fast path of pass 2.
///
/// It splits the text into tokens (scalars, aliases, flow brackets, block sequence dashes), each
/// with its line, skipping comments, anchors, tags and other indicators, and then walks a
/// `serde_yaml::Value` of the same text in document order, taking tokens as it goes. Every string
/// that fits on one line is compared with its token, so a misreading shows up as a mismatch and
/// `positions` returns `None` (the caller then asks serde_yaml). It only ever runs on text
/// serde_yaml has already accepted.
mod scan {
    use std::collections::HashMap;

    use serde_yaml::Value;

    /// The position of a node: its first line, and its children's (for a map, one per entry,
    /// with the key's line and the value's children).
    #[derive(Debug, Clone)]
    pub(crate) struct Pos {
        pub(crate) line: usize,
        pub(crate) kids: Vec<Pos>,
    }

    #[derive(Debug)]
    enum Tok<'t> {
        /// `text` is `None` when it cannot be compared (multi-line, block scalars).
        Scalar {
            line: usize,
            text: Option<String>,
            plain: bool,
        },
        Alias {
            line: usize,
            name: &'t str,
        },
        Open {
            line: usize,
        },
        Close,
        Dash {
            line: usize,
        },
        /// An anchor or tag: the node it belongs to starts here.
        Prop {
            line: usize,
            anchor: Option<&'t str>,
        },
    }

    pub(crate) fn positions(text: &str, value: &Value) -> Option<Pos> {
        let mut lexer = Lexer::new(text);
        lexer.run()?;
        let mut matcher = Matcher {
            toks: &lexer.toks,
            at: 0,
            anchors: HashMap::new(),
        };
        let pos = matcher.node(value)?;
        (matcher.at == lexer.toks.len()).then_some(pos)
    }

    fn blank_or_end(c: u8) -> bool {
        matches!(c, b' ' | b'\t' | b'\r' | b'\n' | 0)
    }

    fn flow_indicator(c: u8) -> bool {
        matches!(c, b',' | b'[' | b']' | b'{' | b'}')
    }

    struct Lexer<'t> {
        text: &'t str,
        b: &'t [u8],
        i: usize,
        line: usize,
        /// Index where the current line starts.
        line_start: usize,
        /// Depth of flow collections.
        flow: usize,
        /// Column of the innermost block collection: the last key (or dash) seen. A block
        /// scalar's content, or a plain scalar's next line, must be indented more than this.
        parent: isize,
        /// (line, column) of the last scalar or alias, to spot keys.
        last: Option<(usize, usize)>,
        /// Index just after the last quoted scalar (for JSON-like `{"a":1}`).
        quoted_end: usize,
        toks: Vec<Tok<'t>>,
    }

    impl<'t> Lexer<'t> {
        fn new(text: &'t str) -> Self {
            let start = if text.starts_with('\u{feff}') { 3 } else { 0 };
            Lexer {
                text,
                b: text.as_bytes(),
                i: start,
                line: 1,
                line_start: start,
                flow: 0,
                parent: -1,
                last: None,
                quoted_end: usize::MAX,
                toks: Vec::new(),
            }
        }

        fn col(&self) -> usize {
            self.i - self.line_start
        }

        fn peek(&self, ahead: usize) -> u8 {
            self.b.get(self.i + ahead).copied().unwrap_or(0)
        }

        fn newline(&mut self) {
            self.i += 1;
            self.line += 1;
            self.line_start = self.i;
        }

        fn skip_to_eol(&mut self) {
            while self.i < self.b.len() && self.b[self.i] != b'\n' {
                self.i += 1;
            }
        }

        fn run(&mut self) -> Option<()> {
            while self.i < self.b.len() {
                if self.i == self.line_start && self.flow == 0 {
                    self.document_markers();
                    if self.i >= self.b.len() {
                        break;
                    }
                }
                let c = self.b[self.i];
                match c {
                    b'\n' => self.newline(),
                    b' ' | b'\t' | b'\r' => self.i += 1,
                    b'#' => self.skip_to_eol(),
                    b'-' if self.flow == 0 && blank_or_end(self.peek(1)) => {
                        self.parent = self.col() as isize;
                        self.toks.push(Tok::Dash { line: self.line });
                        self.i += 1;
                    }
                    b'?' if blank_or_end(self.peek(1)) => {
                        if self.flow == 0 {
                            self.parent = self.col() as isize;
                        }
                        self.i += 1;
                    }
                    b':' if self.value_indicator() => {
                        if self.flow == 0 {
                            if let Some((line, col)) = self.last {
                                if line == self.line {
                                    self.parent = col as isize;
                                }
                            }
                        }
                        self.i += 1;
                    }
                    b'[' | b'{' => {
                        self.flow += 1;
                        self.toks.push(Tok::Open { line: self.line });
                        self.i += 1;
                    }
                    b']' | b'}' if self.flow > 0 => {
                        self.flow -= 1;
                        self.toks.push(Tok::Close);
                        self.i += 1;
                    }
                    b',' if self.flow > 0 => self.i += 1,
                    b'&' | b'!' => {
                        let line = self.line;
                        let name = self.skip_property();
                        let anchor = (c == b'&').then_some(name);
                        self.toks.push(Tok::Prop { line, anchor });
                    }
                    b'*' => {
                        self.last = Some((self.line, self.col()));
                        let line = self.line;
                        let name = self.skip_property();
                        self.toks.push(Tok::Alias { line, name });
                    }
                    b'\'' => self.single_quoted()?,
                    b'"' => self.double_quoted()?,
                    b'|' | b'>' if self.flow == 0 => self.block_scalar(),
                    _ => self.plain(),
                }
            }
            (self.flow == 0).then_some(())
        }

        /// `---`, `...` and `%` directives at the start of a line.
        fn document_markers(&mut self) {
            let rest = &self.b[self.i..];
            let marker =
                |m: &[u8]| rest.starts_with(m) && blank_or_end(rest.get(3).copied().unwrap_or(0));
            if marker(b"---") {
                self.i += 3;
                self.parent = -1;
            } else if marker(b"...") {
                self.i += 3;
            } else if rest.first() == Some(&b'%') {
                self.skip_to_eol();
            }
        }

        fn value_indicator(&self) -> bool {
            let next = self.peek(1);
            blank_or_end(next)
                || (self.flow > 0 && (flow_indicator(next) || self.quoted_end == self.i))
        }

        /// An anchor (`&a`), tag (`!t`) or alias (`*a`); returns its name.
        fn skip_property(&mut self) -> &'t str {
            self.i += 1;
            let start = self.i;
            while self.i < self.b.len() {
                let c = self.b[self.i];
                if blank_or_end(c) || (self.flow > 0 && flow_indicator(c)) {
                    break;
                }
                self.i += 1;
            }
            &self.text[start..self.i]
        }

        fn push_scalar(&mut self, line: usize, col: usize, text: Option<String>, plain: bool) {
            self.last = Some((line, col));
            self.toks.push(Tok::Scalar { line, text, plain });
        }

        fn single_quoted(&mut self) -> Option<()> {
            let (line, col) = (self.line, self.col());
            self.i += 1;
            let mut text = String::new();
            let mut one_line = true;
            loop {
                match *self.b.get(self.i)? {
                    b'\'' if self.peek(1) == b'\'' => {
                        text.push('\'');
                        self.i += 2;
                    }
                    b'\'' => {
                        self.i += 1;
                        break;
                    }
                    b'\n' => {
                        one_line = false;
                        self.newline();
                    }
                    _ => {
                        let ch = self.text[self.i..].chars().next()?;
                        text.push(ch);
                        self.i += ch.len_utf8();
                    }
                }
            }
            self.quoted_end = self.i;
            self.push_scalar(line, col, one_line.then_some(text), false);
            Some(())
        }

        fn double_quoted(&mut self) -> Option<()> {
            let (line, col) = (self.line, self.col());
            self.i += 1;
            let mut text = String::new();
            let mut comparable = true;
            loop {
                match *self.b.get(self.i)? {
                    b'"' => {
                        self.i += 1;
                        break;
                    }
                    b'\\' => {
                        let escaped = self.peek(1);
                        if escaped == b'\n' || escaped == b'\r' {
                            comparable = false;
                            self.i += 1;
                            continue;
                        }
                        self.i += 2;
                        let hex = match escaped {
                            b'x' => 2,
                            b'u' => 4,
                            b'U' => 8,
                            _ => 0,
                        };
                        let ch = if hex > 0 {
                            let digits = self.text.get(self.i..self.i + hex)?;
                            self.i += hex;
                            u32::from_str_radix(digits, 16)
                                .ok()
                                .and_then(char::from_u32)
                        } else {
                            match escaped {
                                b'0' => Some('\0'),
                                b'a' => Some('\x07'),
                                b'b' => Some('\x08'),
                                b't' | b'\t' => Some('\t'),
                                b'n' => Some('\n'),
                                b'v' => Some('\x0b'),
                                b'f' => Some('\x0c'),
                                b'r' => Some('\r'),
                                b'e' => Some('\x1b'),
                                b' ' => Some(' '),
                                b'"' => Some('"'),
                                b'/' => Some('/'),
                                b'\\' => Some('\\'),
                                b'N' => Some('\u{85}'),
                                b'_' => Some('\u{a0}'),
                                b'L' => Some('\u{2028}'),
                                b'P' => Some('\u{2029}'),
                                _ => None,
                            }
                        };
                        match ch {
                            Some(ch) => text.push(ch),
                            None => comparable = false,
                        }
                    }
                    b'\n' => {
                        comparable = false;
                        self.newline();
                    }
                    _ => {
                        let ch = self.text[self.i..].chars().next()?;
                        text.push(ch);
                        self.i += ch.len_utf8();
                    }
                }
            }
            self.quoted_end = self.i;
            self.push_scalar(line, col, comparable.then_some(text), false);
            Some(())
        }

        /// `|` or `>`: the header, then every line indented deeper than the parent collection
        /// (at least as deep as the first content line), and blank lines.
        fn block_scalar(&mut self) {
            let (line, col) = (self.line, self.col());
            self.i += 1;
            let mut explicit = None;
            while let Some(&c) = self.b.get(self.i) {
                match c {
                    b'1'..=b'9' => explicit = Some(usize::from(c - b'0')),
                    b'+' | b'-' => {}
                    _ => break,
                }
                self.i += 1;
            }
            self.skip_to_eol();
            let parent = self.parent;
            let mut content = explicit.map(|d| parent.max(0) as usize + d);
            while self.i < self.b.len() {
                // self.i is at the '\n' ending the previous line.
                let start = self.i + 1;
                let mut j = start;
                while j < self.b.len() && self.b[j] == b' ' {
                    j += 1;
                }
                let indent = j - start;
                let rest = &self.b[j..];
                let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
                let blank = rest[..end]
                    .iter()
                    .all(|c| matches!(c, b' ' | b'\t' | b'\r'));
                let inside = blank
                    || match content {
                        Some(content) => indent >= content,
                        None if indent as isize > parent => {
                            content = Some(indent);
                            true
                        }
                        None => false,
                    };
                if !inside || start >= self.b.len() {
                    break;
                }
                self.newline();
                self.skip_to_eol();
            }
            self.push_scalar(line, col, None, false);
        }

        /// A plain scalar: to `: `, ` #`, the end of the line (or a flow indicator in flow
        /// context), then on following lines while they continue it.
        fn plain(&mut self) {
            let (line, col, start) = (self.line, self.col(), self.i);
            let mut first_end = None;
            self.i += 1;
            loop {
                while self.i < self.b.len() {
                    let c = self.b[self.i];
                    let next = self.peek(1);
                    if c == b'\n'
                        || (c == b':'
                            && (blank_or_end(next) || (self.flow > 0 && flow_indicator(next))))
                        || (self.flow > 0 && flow_indicator(c))
                        || (c == b'#' && matches!(self.b[self.i - 1], b' ' | b'\t'))
                    {
                        break;
                    }
                    self.i += 1;
                }
                first_end.get_or_insert(self.i);
                if self.i >= self.b.len() || self.b[self.i] != b'\n' {
                    break;
                }
                let Some(next) = self.continuation() else {
                    break;
                };
                first_end = Some(usize::MAX); // spans lines: not comparable
                while self.i < next {
                    if self.b[self.i] == b'\n' {
                        self.newline();
                    } else {
                        self.i += 1;
                    }
                }
            }
            let text = first_end.filter(|&end| end != usize::MAX).map(|end| {
                self.text[start..end]
                    .trim_end_matches([' ', '\t', '\r'])
                    .to_owned()
            });
            self.push_scalar(line, col, text, true);
        }

        /// Where a plain scalar continues after the line break at `self.i`, if it does.
        fn continuation(&self) -> Option<usize> {
            let mut j = self.i;
            loop {
                let start = j + 1;
                let mut k = start;
                while k < self.b.len() && matches!(self.b[k], b' ' | b'\t') {
                    k += 1;
                }
                match self.b.get(k).copied() {
                    None => return None,
                    Some(b'\n') => j = k,
                    Some(b'\r') if self.b.get(k + 1) == Some(&b'\n') => j = k + 1,
                    Some(b'#') => return None,
                    Some(c) if self.flow > 0 => {
                        return (!flow_indicator(c) && c != b':').then_some(k);
                    }
                    Some(_) => {
                        let at_column_0 = k == start;
                        let marker =
                            self.b[k..].starts_with(b"---") || self.b[k..].starts_with(b"...");
                        if (k - start) as isize <= self.parent || (at_column_0 && marker) {
                            return None;
                        }
                        return Some(k);
                    }
                }
            }
        }
    }

    /// Walks a `Value` in document order, taking tokens.
    struct Matcher<'a, 't> {
        toks: &'a [Tok<'t>],
        at: usize,
        /// The positions of anchored nodes: an alias gets those of its anchor, as in serde_yaml,
        /// which replays the anchor's events (with their positions) for an alias.
        anchors: HashMap<&'t str, Pos>,
    }

    impl<'t> Matcher<'_, 't> {
        fn leaf(line: usize) -> Pos {
            Pos {
                line,
                kids: Vec::new(),
            }
        }

        fn node(&mut self, value: &Value) -> Option<Pos> {
            // Anchors and tags before a node: serde_yaml places the node there.
            let (mut prop, mut anchor) = (None, None);
            while let Some(Tok::Prop { line, anchor: name }) = self.toks.get(self.at) {
                prop.get_or_insert(*line);
                anchor = anchor.or(*name);
                self.at += 1;
            }
            let mut pos = self.bare_node(value)?;
            if let Some(line) = prop {
                pos.line = line;
            }
            if let Some(name) = anchor {
                self.anchors.insert(name, pos.clone());
            }
            Some(pos)
        }

        fn bare_node(&mut self, value: &Value) -> Option<Pos> {
            if let Some(Tok::Alias { line, name }) = self.toks.get(self.at) {
                self.at += 1;
                return Some(
                    self.anchors
                        .get(name)
                        .cloned()
                        .unwrap_or_else(|| Self::leaf(*line)),
                );
            }
            match value {
                Value::Tagged(tagged) => self.node(&tagged.value),
                Value::Null => match self.toks.get(self.at) {
                    Some(Tok::Scalar {
                        line,
                        text: Some(text),
                        plain: true,
                    }) if matches!(text.as_str(), "~" | "null" | "Null" | "NULL") => {
                        self.at += 1;
                        Some(Self::leaf(*line))
                    }
                    _ => Some(Self::leaf(0)),
                },
                Value::Bool(_) | Value::Number(_) | Value::String(_) => {
                    let Some(Tok::Scalar { line, text, .. }) = self.toks.get(self.at) else {
                        return None;
                    };
                    if let (Value::String(expected), Some(text)) = (value, text) {
                        if expected != text {
                            return None;
                        }
                    }
                    self.at += 1;
                    Some(Self::leaf(*line))
                }
                Value::Sequence(items) => {
                    if let Some(Tok::Open { line }) = self.toks.get(self.at) {
                        self.at += 1;
                        let kids = items
                            .iter()
                            .map(|item| self.node(item))
                            .collect::<Option<Vec<_>>>()?;
                        self.close()?;
                        return Some(Pos { line: *line, kids });
                    }
                    let mut kids = Vec::with_capacity(items.len());
                    for item in items {
                        let Some(Tok::Dash { line: dash }) = self.toks.get(self.at) else {
                            return None;
                        };
                        self.at += 1;
                        let mut pos = self.node(item)?;
                        if pos.line == 0 {
                            pos.line = *dash;
                        }
                        kids.push(pos);
                    }
                    let line = kids.first().map_or(0, |kid| kid.line);
                    Some(Pos { line, kids })
                }
                Value::Mapping(entries) => {
                    let open = match self.toks.get(self.at) {
                        Some(Tok::Open { line }) => {
                            self.at += 1;
                            Some(*line)
                        }
                        _ => None,
                    };
                    let mut kids = Vec::with_capacity(entries.len());
                    for (key, value) in entries {
                        let key = self.node(key)?;
                        let value = self.node(value)?;
                        let line = if key.line > 0 { key.line } else { value.line };
                        kids.push(Pos {
                            line,
                            kids: value.kids,
                        });
                    }
                    if open.is_some() {
                        self.close()?;
                    }
                    let line = open.unwrap_or_else(|| kids.first().map_or(0, |kid| kid.line));
                    Some(Pos { line, kids })
                }
            }
        }

        fn close(&mut self) -> Option<()> {
            match self.toks.get(self.at) {
                Some(Tok::Close) => {
                    self.at += 1;
                    Some(())
                }
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{DomainRules, RuleSet};
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

    /// Lines from the scanner, and from serde_yaml probes, for the same text.
    fn both_ways(text: &str) -> (Option<Located>, Located) {
        let value: Value = serde_yaml::from_str(text).unwrap();
        let scanned = scan::positions(text, &value).map(|pos| locate_with(&value, &pos));
        (scanned, locate_with(&value, &Probe::new(text)))
    }

    fn lines(located: &Located) -> Vec<usize> {
        fn walk(list: &[DescLines], out: &mut Vec<usize>) {
            for d in list {
                out.push(d.line);
                walk(&d.children, out);
            }
        }
        let mut out = Vec::new();
        walk(&located.descriptors, &mut out);
        out
    }

    fn rule_lines(rules: &DomainRules) -> Vec<(String, usize)> {
        rules
            .root
            .walk()
            .map(|node| (node.composite(), node.line))
            .collect()
    }

    fn fixture_texts() -> Vec<(String, String)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut texts = vec![(
            "config/ratelimit.yaml".to_owned(),
            std::fs::read_to_string(root.join("config/ratelimit.yaml")).unwrap(),
        )];
        for entry in std::fs::read_dir(root.join("test/fixtures/rules/valid")).unwrap() {
            let path = entry.unwrap().path();
            texts.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
        texts
    }

    #[test]
    fn scanner_and_serde_yaml_agree_on_every_valid_fixture() {
        for (name, text) in fixture_texts() {
            let (scanned, probed) = both_ways(&text);
            let Some(scanned) = scanned else {
                panic!("{name}: the scanner could not follow it");
            };
            assert_eq!(scanned, probed, "{name}");
        }
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
        let (scanned, probed) = both_ways(text);
        assert_eq!(scanned.unwrap(), probed);
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
    fn the_probe_fallback_gives_the_same_lines() {
        // Feed the probe path directly: it must agree with the scanner on ordinary YAML, and it
        // is what runs when the scanner cannot follow a document.
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("test/fixtures/rules/valid/basic.yaml"),
        )
        .unwrap();
        let value: Value = serde_yaml::from_str(&text).unwrap();
        let probed = locate_with(&value, &Probe::new(&text));
        assert_eq!(probed.domain_line, Some(2));
        assert_eq!(lines(&probed), [5, 9, 15, 22, 28, 35, 38, 43, 48, 51]);
    }

    #[test]
    fn the_probe_budget_is_bounded() {
        let probe = Probe {
            text: "domain: d\ndescriptors:\n  - key: a\n",
            budget: Cell::new(40),
        };
        let path = [Step::Entry(1), Step::Elem(0)];
        assert_eq!(probe.line(&path), Some(3));
        assert_eq!(probe.line(&path), None, "budget spent");
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
        let serde_line =
            serde_yaml::from_str::<Value>("domain: d\ndescriptors:\n  - key: a\n  rate_limit: [\n")
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
            let (scanned, probed) = both_ways(&text);
            prop_assert!(scanned.is_some(), "scanner failed on\n{}", text);
            prop_assert_eq!(scanned.unwrap(), probed);
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
