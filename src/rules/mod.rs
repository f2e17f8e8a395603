//! Rate limit rules: the envoyproxy/ratelimit YAML rules files, unchanged.
//!
//! A rules file names one `domain` and a tree of `descriptors` (see `config/ratelimit.yaml` for a
//! commented example, and the README's Rules section). This module
//!
//! - loads a file, or every `*.yaml`/`*.yml` file directly inside a directory, one domain per
//!   file ([`RuleSet::load`], [`RuleSet::from_sources`]);
//! - validates them as envoyproxy/ratelimit does, reporting `file:line: message`
//!   ([`RulesError`]);
//! - answers "which limit applies to this request descriptor?" ([`DomainRules::find`]): one tree
//!   level per descriptor entry, exact value before `*` wildcard patterns before the bare key;
//! - dumps the loaded rules as JSON for the admin `/rlconfig` endpoint ([`RuleSet::to_json`]).
//!
//! How a file becomes a validated tree, in two passes and one lookup structure:
//!
//! 1. [`yaml`] parses the text (saphyr-parser) into a small tree where every node keeps the line
//!    it starts on, maps keep their entries in file order, and scalars stay as written;
//! 2. [`validate`] walks that tree once, recursively, checking each section as envoyproxy/ratelimit
//!    does and building the [`DomainRules`] of the file, or failing with the first problem and
//!    its line;
//! 3. [`matcher`] holds the descriptor tree ([`Rule`] per descriptor with a `rate_limit`) and walks
//!    it for a request descriptor.
//!
//! A [`RuleSet`] is immutable once built; hot reload builds a new one and swaps it in.

mod matcher;
mod validate;
mod yaml;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use hivemind_core::Unit;
use serde_json::json;
use sha2::{Digest, Sha256};

use matcher::{Level, Node};

/// Every loaded domain, with the hash of the sources it came from.
#[derive(Debug, Clone)]
pub struct RuleSet {
    domains: BTreeMap<String, DomainRules>,
    hash: String,
    sources: Vec<String>,
}

/// The rules of one domain: the descriptor tree of one rules file.
#[derive(Debug, Clone)]
pub struct DomainRules {
    /// The `domain` of the file.
    pub name: String,
    /// Where it came from (the display name given to [`RuleSet::from_sources`], e.g. the path).
    pub source: String,
    pub(crate) root: Level,
}

/// What [`DomainRules::find`] found for a request descriptor.
#[derive(Debug, Clone)]
pub struct Match<'r> {
    /// The rule on the node the descriptor's last entry reached.
    pub rule: &'r Rule,
    /// For each entry index whose matched node has share_threshold: true, the pattern text (the
    /// configured value with '*'): the counter key must use it instead of the request value, so
    /// all matching values share one counter. Usually empty (and then not allocated).
    pub shared_values: Vec<(usize, &'r str)>,
}

/// A descriptor that has a `rate_limit`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Its `rate_limit`: a limit, or unlimited.
    pub limit: RateLimit,
    /// Counted and reported, never enforced.
    pub shadow_mode: bool,
    /// Over only when every quota-mode descriptor of the request is over.
    pub quota_mode: bool,
    /// Metrics for this rule may carry the descriptor's values (`detailed_metric`).
    pub detailed_metric: bool,
    /// Every value matching the `*` pattern shares one counter (`share_threshold`).
    pub share_threshold: bool,
    /// The descriptor's `metadata` map, as JSON.
    pub metadata: Option<serde_json::Value>,
    /// Stable label for metrics: the configured key/value path joined like envoyproxy/ratelimit
    /// stat keys (without the domain), e.g. "tenant.user_canary": `key` or `key_value` per
    /// level, '.' between levels. Bounded: from config, never from request values.
    pub stat_name: String,
    /// The rule's descriptor path, top level first, one level per request entry that reaches
    /// it: the segments of [`stat_name`](Self::stat_name) and the levels whose descriptor has
    /// `value_to_metric: true`, where metrics show the request's value instead. Kept apart, so
    /// the metrics need not split the name on '.' (values hold dots: IPs, versions).
    pub stat_levels: Vec<StatLevel>,
    /// 1-based line of the descriptor in its file (0 only if it could not be worked out).
    pub line: usize,
    /// `name` / `replaces` of an unlimited rate_limit (upstream lets them be set there too); a
    /// limited one keeps them in [`RateLimit::Limited`]. Read through [`Rule::name`] and
    /// [`Rule::replaces`].
    unlimited_name: Option<String>,
    unlimited_replaces: Vec<String>,
}

/// One level of a rule's descriptor path, as the rule's stat key shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatLevel {
    /// The level's descriptor as configured, `key` or `key_value` (a wildcard value as its
    /// pattern): its segment of the stat name.
    pub segment: String,
    /// The descriptor has `value_to_metric: true`: metrics show the request's `key_value` at
    /// this level instead of `segment`.
    pub value_to_metric: bool,
}

impl Rule {
    /// Whether some level of the rule's path has `value_to_metric: true`, so that its metrics
    /// carry request values there.
    pub fn value_to_metric(&self) -> bool {
        self.stat_levels.iter().any(|level| level.value_to_metric)
    }

    /// The rate_limit's `name` (the target of other rules' `replaces`), limited or not.
    pub fn name(&self) -> Option<&str> {
        match &self.limit {
            RateLimit::Limited { name, .. } => name.as_deref(),
            RateLimit::Unlimited => self.unlimited_name.as_deref(),
        }
    }

    /// The names of other matched limits this one removes, limited or not. In
    /// envoyproxy/ratelimit an unlimited rule's `replaces` also apply.
    pub fn replaces(&self) -> &[String] {
        match &self.limit {
            RateLimit::Limited { replaces, .. } => replaces,
            RateLimit::Unlimited => &self.unlimited_replaces,
        }
    }
}

/// The `rate_limit` of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimit {
    /// `unlimited: true`: matched, answered OK, never counted.
    Unlimited,
    /// `requests_per_unit` per `unit`.
    Limited {
        /// 0 blocks everything.
        requests_per_unit: u32,
        /// The window length.
        unit: Unit,
        /// The limit's `name`, the target of other rules' `replaces`.
        name: Option<String>,
        /// Names of other matched limits this one removes from the request.
        replaces: Vec<String>,
    },
}

/// A rules file that could not be loaded: `file:line: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{}: {message}", line.map(|l| l.to_string()).unwrap_or_else(|| "-".into()))]
pub struct RulesError {
    /// The path (or display name) of the offending source.
    pub file: String,
    /// 1-based line, when the problem is at a place in the file.
    pub line: Option<usize>,
    /// What is wrong, in envoyproxy/ratelimit's words where it has them.
    pub message: String,
}

impl RuleSet {
    /// Loads a rules file, or every `*.yaml` / `*.yml` file directly inside a directory (one
    /// domain per file, like envoyproxy/ratelimit).
    ///
    /// In a directory, hidden files (leading '.') are skipped, symlinks are followed (Kubernetes
    /// ConfigMaps mount files as symlinks into a `..data` dir) and subdirectories are not
    /// entered. An empty directory gives zero domains.
    pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
        let io_error = |at: &Path, what: &str, err: std::io::Error| RulesError {
            file: at.display().to_string(),
            line: None,
            message: format!("cannot {what}: {err}"),
        };
        let meta = fs::metadata(path).map_err(|e| io_error(path, "read rules", e))?;
        let mut files = Vec::new();
        if meta.is_dir() {
            let entries = fs::read_dir(path).map_err(|e| io_error(path, "list directory", e))?;
            for entry in entries {
                let entry = entry.map_err(|e| io_error(path, "list directory", e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    continue;
                };
                if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                    continue;
                }
                let file = entry.path();
                // fs::metadata follows symlinks: a link to a file is a file.
                let meta = fs::metadata(&file).map_err(|e| io_error(&file, "read rules", e))?;
                if meta.is_file() {
                    files.push(file);
                }
            }
            files.sort();
        } else {
            files.push(path.to_path_buf());
        }
        let mut sources = Vec::with_capacity(files.len());
        for file in files {
            let text = fs::read_to_string(&file).map_err(|e| io_error(&file, "read rules", e))?;
            sources.push((file.display().to_string(), text));
        }
        RuleSet::from_sources(&sources)
    }

    /// Parses in-memory documents: (display name, e.g. the path; YAML text). Each is one domain;
    /// two sources with the same domain are an error.
    pub fn from_sources(sources: &[(String, String)]) -> Result<RuleSet, RulesError> {
        let mut domains: BTreeMap<String, DomainRules> = BTreeMap::new();
        for (name, text) in sources {
            let (rules, domain_line) = parse_document(name, text)?;
            if let Some(previous) = domains.get(&rules.name) {
                return Err(RulesError {
                    file: name.clone(),
                    line: domain_line,
                    message: format!(
                        "duplicate domain '{}' (also in {})",
                        rules.name, previous.source
                    ),
                });
            }
            domains.insert(rules.name.clone(), rules);
        }
        Ok(RuleSet {
            domains,
            hash: hash_sources(sources),
            sources: sources.iter().map(|(name, _)| name.clone()).collect(),
        })
    }

    /// No domains: every request is answered OK.
    pub fn empty() -> RuleSet {
        RuleSet {
            domains: BTreeMap::new(),
            hash: hash_sources(&[]),
            sources: Vec::new(),
        }
    }

    /// The rules of `name`, if a file defines that domain.
    pub fn domain(&self, name: &str) -> Option<&DomainRules> {
        self.domains.get(name)
    }

    /// Every domain, sorted by name.
    pub fn domains(&self) -> impl Iterator<Item = &DomainRules> {
        self.domains.values()
    }

    /// Hex sha256 over the sources (sorted by name), for /rlconfig and reload change detection.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The display names of the sources, in load order.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// The rules as JSON for the admin /rlconfig endpoint:
    /// `{"hash", "domains": [{"domain", "source", "descriptors": [tree]}]}`, where each
    /// descriptor has `key, value, line, rate_limit {unit, requests_per_unit, name, replaces,
    /// unlimited} | null, shadow_mode, quota_mode, share_threshold, detailed_metric,
    /// value_to_metric, metadata, stat_name, descriptors`. `value_to_metric` is the descriptor's
    /// own flag, with or without a `rate_limit`, read from the rules at or below it (false where
    /// there are none: it reports nothing there); the other flags are its rule's.
    pub fn to_json(&self) -> serde_json::Value {
        let domains: Vec<serde_json::Value> = self
            .domains()
            .map(|domain| {
                json!({
                    "domain": domain.name,
                    "source": domain.source,
                    "descriptors": level_json(&domain.root, 0),
                })
            })
            .collect();
        json!({ "hash": self.hash, "domains": domains })
    }
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet::empty()
    }
}

impl DomainRules {
    /// Every descriptor of the domain that has a `rate_limit`, parents before children.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.root.walk().filter_map(|node| node.rule.as_ref())
    }
}

/// Reads one rules document into its domain's rules, with the line of its `domain` key (for a
/// duplicate-domain error).
fn parse_document(file: &str, text: &str) -> Result<(DomainRules, Option<usize>), RulesError> {
    let fail = |line, message| RulesError {
        file: file.to_owned(),
        line,
        message,
    };
    // Editors on Windows may start a file with a byte order mark; it takes no line.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let tree = yaml::parse(text).map_err(|err| fail(err.line, err.message))?;
    let (rules, domain_line) =
        validate::document(&tree, file).map_err(|err| fail(err.line, err.message))?;
    Ok((rules, Some(domain_line)))
}

fn hash_sources(sources: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = sources.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Sha256::new();
    for (name, text) in sorted {
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The descriptors of `level`, `depth` levels below the top.
fn level_json(level: &Level, depth: usize) -> Vec<serde_json::Value> {
    let node = |node| node_json(node, depth);
    level.nodes.iter().map(node).collect()
}

fn node_json(node: &Node, depth: usize) -> serde_json::Value {
    let rate_limit = node.rule.as_ref().map(|rule| match &rule.limit {
        RateLimit::Unlimited => json!({
            "unit": null,
            "requests_per_unit": null,
            "name": rule.name(),
            "replaces": rule.replaces(),
            "unlimited": true,
        }),
        RateLimit::Limited {
            requests_per_unit,
            unit,
            name,
            replaces,
        } => json!({
            "unit": unit.as_str(),
            "requests_per_unit": requests_per_unit,
            "name": name,
            "replaces": replaces,
            "unlimited": false,
        }),
    });
    let rule = node.rule.as_ref();
    let flag = |get: fn(&Rule) -> bool| rule.is_some_and(get);
    // The descriptor's `value_to_metric` lives on the rules of its path: read it from the first
    // rule at or below it (none: it affects nothing, and reads false).
    let below = node.children.walk().filter_map(|node| node.rule.as_ref());
    let value_to_metric = rule.into_iter().chain(below).next().is_some_and(|rule| {
        rule.stat_levels
            .get(depth)
            .is_some_and(|level| level.value_to_metric)
    });
    json!({
        "key": node.key,
        "value": node.value,
        "line": node.line,
        "rate_limit": rate_limit,
        "shadow_mode": flag(|rule| rule.shadow_mode),
        "quota_mode": flag(|rule| rule.quota_mode),
        "share_threshold": node.share_threshold,
        "detailed_metric": flag(|rule| rule.detailed_metric),
        "value_to_metric": value_to_metric,
        "metadata": rule.and_then(|rule| rule.metadata.as_ref()),
        "stat_name": rule.map(|rule| rule.stat_name.as_str()),
        "descriptors": level_json(&node.children, depth + 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("test/fixtures/rules")
    }

    fn source(name: &str, text: &str) -> (String, String) {
        (name.to_owned(), text.to_owned())
    }

    const A: &str = "domain: a\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 1 }\n";
    const B: &str = "domain: b\ndescriptors:\n  - key: k\n    rate_limit: { unit: minute, requests_per_unit: 2 }\n";

    /// Every invalid fixture, with the message fragment and line it must fail with. A fixture
    /// without an entry here fails the test, so adding one means saying what it must report.
    #[rustfmt::skip]
    fn invalid_expectations() -> BTreeMap<&'static str, (&'static str, usize)> {
        BTreeMap::from([
            ("bad_bool.yaml", ("'shadow_mode' must be true or false, found 'maybe'", 4)),
            ("bad_requests_per_unit.yaml", ("requests_per_unit must be a whole number from 0 to 4294967295, found -1", 6)),
            ("bad_requests_per_unit_fraction.yaml", ("requests_per_unit must be a whole number from 0 to 4294967295, found 2.5", 6)),
            ("bad_requests_per_unit_string.yaml", ("requests_per_unit must be a whole number from 0 to 4294967295, found 'ten'", 5)),
            ("bad_unit.yaml", ("invalid rate limit unit 'fortnight' (expected second, minute, hour, day, week, month or year)", 7)),
            ("bad_yaml.yaml", ("did not find expected", 5)),
            ("descriptors_not_a_list.yaml", ("'descriptors' must be a list, found a map", 3)),
            ("duplicate_bare_key.yaml", ("duplicate descriptor 'key1'", 6)),
            ("duplicate_composite_key.yaml", ("duplicate descriptor 'a_b'", 6)),
            ("duplicate_key.yaml", ("duplicate descriptor 'key1_value1'", 10)),
            ("duplicate_nested_key.yaml", ("duplicate descriptor 'user_canary'", 10)),
            ("duplicate_yaml_key.yaml", ("key 'rate_limit' appears twice in one descriptor", 6)),
            ("empty_domain.yaml", ("domain is empty", 1)),
            ("empty_file.yaml", ("missing domain (the file has no YAML document)", 1)),
            ("empty_key.yaml", ("descriptor has empty key", 4)),
            ("empty_replaces_name.yaml", ("replaces entry has an empty name", 8)),
            ("flow_bad_unit.yaml", ("invalid rate limit unit 'minutes'", 4)),
            ("flow_unknown_key.yaml", ("unknown key 'requestsperunit' in rate_limit", 5)),
            ("key_not_a_string.yaml", ("invalid type: sequence, expected a string", 3)),
            ("metadata_not_a_map.yaml", ("'metadata' must be a map, found a list", 5)),
            ("missing_domain.yaml", ("missing domain", 2)),
            ("missing_key.yaml", ("descriptor has no key", 3)),
            ("missing_replaces_name.yaml", ("replaces entry has an empty name", 8)),
            ("missing_unit.yaml", ("rate_limit has no unit", 5)),
            ("non_string_key.yaml", ("key is not a string: 0.25", 4)),
            ("not_a_map.yaml", ("list element is not a map: 'a'", 3)),
            ("rate_limit_not_a_map.yaml", ("'rate_limit' must be a map, found 10", 4)),
            ("replaces_not_a_list.yaml", ("'replaces' must be a list of {name: ...} maps, found 'other'", 7)),
            ("replaces_self.yaml", ("rate limit 'my_name' replaces itself", 5)),
            ("requests_per_unit_too_large.yaml", ("found 4294967296", 6)),
            ("root_not_a_map.yaml", ("a rules file must be a map with 'domain' and 'descriptors', found a list", 1)),
            ("share_threshold_without_wildcard.yaml", ("share_threshold needs a '*' wildcard in value (descriptor 'files_abc')", 3)),
            ("unknown_key.yaml", ("unknown key 'ratelimit' in descriptor (expected key, value, rate_limit, descriptors, shadow_mode, quota_mode, detailed_metric, value_to_metric, share_threshold, metadata)", 5)),
            ("unknown_rate_limit_key.yaml", ("unknown key 'requestsperunit' in rate_limit", 7)),
            ("unknown_replaces_key.yaml", ("unknown key 'nmae' in replaces entry (expected name)", 8)),
            ("unknown_root_key.yaml", ("unknown key 'domian' in the rules file (expected domain, descriptors)", 2)),
            ("unlimited_with_unit.yaml", ("unlimited rate_limit must not have a unit", 5)),
        ])
    }

    #[test]
    fn every_invalid_fixture_fails_with_its_message_and_line() {
        let expectations = invalid_expectations();
        let dir = fixtures().join("invalid");
        let mut seen = Vec::new();
        let mut wrong = Vec::new();
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            let Some(&(fragment, line)) = expectations.get(name.as_str()) else {
                panic!("{name}: no expectation in invalid_expectations()");
            };
            match RuleSet::load(&path) {
                Ok(_) => wrong.push(format!("{name}: loaded")),
                Err(err) => {
                    let prefix = format!("{}:{line}: ", path.display());
                    if !err.message.contains(fragment)
                        || err.line != Some(line)
                        || err.file != path.display().to_string()
                        || !err.to_string().starts_with(&prefix)
                    {
                        wrong.push(format!(
                            "{name}: got {err:?}, want {fragment:?} at line {line}"
                        ));
                    }
                }
            }
            seen.push(name);
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        seen.sort();
        let expected: Vec<&str> = expectations.keys().copied().collect();
        assert_eq!(
            seen, expected,
            "a fixture listed in invalid_expectations() is missing"
        );
    }

    #[test]
    fn duplicate_domain_in_a_directory() {
        let dir = fixtures().join("invalid_dirs/duplicate_domain");
        let err = RuleSet::load(&dir).unwrap_err();
        assert_eq!(err.file, dir.join("b.yaml").display().to_string());
        assert_eq!(err.line, Some(2));
        assert_eq!(
            err.message,
            format!(
                "duplicate domain 'shared' (also in {})",
                dir.join("a.yaml").display()
            )
        );
    }

    #[test]
    fn every_valid_fixture_loads() {
        let dir = fixtures().join("valid");
        let set = RuleSet::load(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert!(set.domains().count() >= 5);
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ratelimit.yaml");
        RuleSet::load(&example).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn example_config_has_what_the_envoy_test_relies_on() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ratelimit.yaml");
        let set = RuleSet::load(&path).unwrap();
        let domain = set.domain("hivemind").expect("domain hivemind");
        let limit = |entries: &[(&str, &str)]| match domain.find(entries).map(|m| &m.rule.limit) {
            Some(RateLimit::Limited {
                requests_per_unit,
                unit,
                ..
            }) => Some((*requests_per_unit, *unit)),
            _ => None,
        };
        assert_eq!(
            limit(&[("generic_key", "default")]),
            Some((5, Unit::Minute))
        );
        assert_eq!(limit(&[("api_key", "abc")]), Some((3, Unit::Minute)));
        assert_eq!(limit(&[("api_key", "premium")]), Some((1000, Unit::Minute)));
        assert_eq!(
            limit(&[("remote_address", "10.0.0.1")]),
            Some((100, Unit::Second))
        );
        assert_eq!(
            limit(&[("tenant", "a"), ("user", "b")]),
            Some((1000, Unit::Hour))
        );
        let canary = domain.find(&[("tenant", "a"), ("user", "canary")]).unwrap();
        assert!(canary.rule.shadow_mode);
        let shared = domain.find(&[("path", "/api/v1/action")]).unwrap();
        assert_eq!(shared.shared_values, vec![(0, "/api/*/action")]);
        let internal = domain.find(&[("internal", "x")]).unwrap();
        assert_eq!(internal.rule.limit, RateLimit::Unlimited);
        assert!(domain.find(&[("health_check", "x")]).is_none());
    }

    #[test]
    fn load_a_single_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rules.yml");
        fs::write(&file, A).unwrap();
        let set = RuleSet::load(&file).unwrap();
        assert_eq!(set.domains().count(), 1);
        let domain = set.domain("a").unwrap();
        assert_eq!(domain.source, file.display().to_string());
        assert!(domain.find(&[("k", "v")]).is_some());
        assert_eq!(set.sources(), [file.display().to_string()]);
    }

    #[test]
    fn load_a_directory_follows_symlinks_and_skips_hidden_files_and_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.yaml"), A).unwrap();
        fs::write(dir.path().join("notes.txt"), "not rules").unwrap();
        fs::write(dir.path().join(".hidden.yaml"), "this: is not: valid").unwrap();
        // A Kubernetes ConfigMap: files are symlinks into `..data`, itself a link to a
        // timestamped directory. Neither directory may be read as rules.
        let stamped = dir.path().join("..2024_01_01_00_00_00.000");
        fs::create_dir(&stamped).unwrap();
        fs::write(stamped.join("b.yaml"), B).unwrap();
        fs::write(stamped.join("a.yaml"), A).unwrap();
        std::os::unix::fs::symlink(&stamped, dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("..data/b.yaml"), dir.path().join("b.yaml"))
            .unwrap();
        let sub = dir.path().join("sub.yaml");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("a.yaml"), A).unwrap();

        let set = RuleSet::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = set.domains().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            set.domain("b").unwrap().source,
            dir.path().join("b.yaml").display().to_string()
        );
        assert!(set.domain("b").unwrap().find(&[("k", "v")]).is_some());
    }

    #[test]
    fn load_an_empty_directory_gives_no_domains() {
        let dir = tempfile::tempdir().unwrap();
        let set = RuleSet::load(dir.path()).unwrap();
        assert_eq!(set.domains().count(), 0);
        assert_eq!(set.hash(), RuleSet::empty().hash());
    }

    #[test]
    fn load_reports_a_missing_path() {
        let err = RuleSet::load(Path::new("/nonexistent/rules.yaml")).unwrap_err();
        assert_eq!(err.file, "/nonexistent/rules.yaml");
        assert_eq!(err.line, None);
        assert!(err
            .to_string()
            .starts_with("/nonexistent/rules.yaml:-: cannot read rules"));
    }

    #[test]
    fn hash_depends_on_content_not_on_order() {
        let ab = RuleSet::from_sources(&[source("a", A), source("b", B)]).unwrap();
        let ba = RuleSet::from_sources(&[source("b", B), source("a", A)]).unwrap();
        assert_eq!(ab.hash(), ba.hash());
        assert_eq!(ab.hash().len(), 64);
        let changed =
            RuleSet::from_sources(&[source("a", A), source("b", &B.replace('2', "3"))]).unwrap();
        assert_ne!(ab.hash(), changed.hash());
        assert_ne!(ab.hash(), RuleSet::empty().hash());
        // sha256 of nothing.
        assert_eq!(
            RuleSet::empty().hash(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn domains_are_listed_by_name() {
        let set = RuleSet::from_sources(&[source("b", B), source("a", A)]).unwrap();
        let names: Vec<&str> = set.domains().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(set.domain("c").is_none());
        assert_eq!(set.domain("a").unwrap().rules().count(), 1);
    }

    #[test]
    fn to_json_dumps_the_tree() {
        let yaml = r#"domain: d
descriptors:
  - key: tenant
    descriptors:
      - key: user
        value: "u*"
        share_threshold: true
        metadata: { a: 1 }
        rate_limit: { unit: Hour, requests_per_unit: 10, name: n, replaces: [ { name: m } ] }
  - key: free
    rate_limit: { unlimited: true, name: free, replaces: [ { name: n } ] }
"#;
        let set = RuleSet::from_sources(&[source("d.yaml", yaml)]).unwrap();
        let dump = set.to_json();
        assert_eq!(dump["hash"], set.hash());
        let domain = &dump["domains"][0];
        assert_eq!(domain["domain"], "d");
        assert_eq!(domain["source"], "d.yaml");
        let tenant = &domain["descriptors"][0];
        assert_eq!(tenant["key"], "tenant");
        assert_eq!(tenant["value"], serde_json::Value::Null);
        assert_eq!(tenant["rate_limit"], serde_json::Value::Null);
        assert_eq!(tenant["line"], 3);
        let user = &tenant["descriptors"][0];
        assert_eq!(
            user,
            &json!({
                "key": "user",
                "value": "u*",
                "line": 5,
                "rate_limit": {
                    "unit": "hour",
                    "requests_per_unit": 10,
                    "name": "n",
                    "replaces": ["m"],
                    "unlimited": false,
                },
                "shadow_mode": false,
                "quota_mode": false,
                "share_threshold": true,
                "detailed_metric": false,
                "value_to_metric": false,
                "metadata": { "a": 1 },
                "stat_name": "tenant.user_u*",
                "descriptors": [],
            })
        );
        let free = &domain["descriptors"][1];
        assert_eq!(
            free["rate_limit"],
            json!({
                "unit": null,
                "requests_per_unit": null,
                "name": "free",
                "replaces": ["n"],
                "unlimited": true,
            })
        );
        let rule = set
            .domain("d")
            .unwrap()
            .find(&[("free", "x")])
            .unwrap()
            .rule;
        assert_eq!(rule.name(), Some("free"));
        assert_eq!(rule.replaces(), ["n"]);
    }

    #[test]
    fn to_json_shows_value_to_metric_on_the_descriptor_that_sets_it() {
        let yaml = "domain: d\ndescriptors:\n  - key: tenant\n    value_to_metric: true\n    descriptors:\n      - key: user\n        rate_limit: { unit: hour }\n      - key: team\n        value_to_metric: true\n        rate_limit: { unit: hour }\n  - key: idle\n    value_to_metric: true\n";
        let set = RuleSet::from_sources(&[source("d.yaml", yaml)]).unwrap();
        let dump = set.to_json();
        let tenant = &dump["domains"][0]["descriptors"][0];
        assert_eq!(tenant["value_to_metric"], true, "{dump}");
        assert_eq!(tenant["rate_limit"], serde_json::Value::Null);
        assert_eq!(tenant["descriptors"][0]["value_to_metric"], false);
        assert_eq!(tenant["descriptors"][0]["stat_name"], "tenant.user");
        assert_eq!(tenant["descriptors"][1]["value_to_metric"], true);
        // No rule at or below it: the flag affects nothing and reads false.
        assert_eq!(
            dump["domains"][0]["descriptors"][1]["value_to_metric"],
            false
        );
    }

    #[test]
    fn errors_display_as_file_line_message() {
        let err = RulesError {
            file: "x.yaml".into(),
            line: Some(3),
            message: "boom".into(),
        };
        assert_eq!(err.to_string(), "x.yaml:3: boom");
        let err = RulesError { line: None, ..err };
        assert_eq!(err.to_string(), "x.yaml:-: boom");
    }
}
