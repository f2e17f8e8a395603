//! `docs/configuration.md` against the code: every setting `--check-config` prints has a row,
//! every row names a setting that exists, and each row's default, environment variable and flags
//! are the ones the code has.

use std::collections::{BTreeMap, BTreeSet};

use clap::CommandFactory;
use hivemind::cli::Cli;
use hivemind::settings::Settings;
use serde_yaml::Value;

const PAGE: &str = include_str!("../docs/configuration.md");

/// Sections this build has no backend for: their rows are documented but not in the settings.
fn absent_sections() -> Vec<&'static str> {
    let mut absent = Vec::new();
    if cfg!(not(feature = "gossip")) {
        absent.push("mesh");
    }
    if cfg!(not(feature = "redis")) {
        absent.push("redis");
    }
    absent
}

/// The default settings as `--check-config` prints them, flattened to dotted leaf path → value
/// as written in YAML. `Option` settings print as `null`, so they are leaves too.
fn code_settings() -> BTreeMap<String, String> {
    let yaml: Value = serde_yaml::from_str(&Settings::default().to_yaml()).unwrap();
    let mut leaves = BTreeMap::new();
    flatten("", &yaml, &mut leaves);
    let absent = absent_sections();
    leaves.retain(|path, _| !absent.contains(&path.as_str()));
    leaves
}

fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Mapping(map) if !map.is_empty() => {
            for (key, child) in map {
                let key = key.as_str().expect("settings keys are strings");
                let path = if prefix.is_empty() {
                    key.to_owned()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, child, out);
            }
        }
        leaf => {
            out.insert(prefix.to_owned(), scalar(leaf));
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Sequence(list) if list.is_empty() => "[]".into(),
        other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
    }
}

/// One settings row of the page: `| `path` | type | default | env | flag | what |`.
struct Row {
    path: String,
    default: String,
    env: String,
    flag: String,
}

/// The rows whose first cell is a backquoted dotted path.
fn documented_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for line in PAGE.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(first) = cells.get(1) else { continue };
        let Some(path) = first
            .strip_prefix('`')
            .and_then(|p| p.strip_suffix('`'))
            .filter(|p| {
                !p.is_empty()
                    && p.split('.').all(|segment| {
                        !segment.is_empty()
                            && segment
                                .chars()
                                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    })
            })
        else {
            continue;
        };
        // "", path, type, default, env, flag, what, "".
        assert_eq!(cells.len(), 8, "a settings row has six cells: {line}");
        rows.push(Row {
            path: path.to_owned(),
            default: cells[3].to_owned(),
            env: cells[4].to_owned(),
            flag: cells[5].to_owned(),
        });
    }
    rows
}

/// The first backquoted span of a cell.
fn first_code(cell: &str) -> Option<&str> {
    let start = cell.find('`')? + 1;
    let len = cell[start..].find('`')?;
    Some(&cell[start..start + len])
}

#[test]
fn every_setting_is_documented_and_every_documented_setting_exists() {
    let code = code_settings();
    let absent = absent_sections();
    let rows = documented_rows();
    let mut documented = BTreeSet::new();
    for row in &rows {
        assert!(
            documented.insert(row.path.clone()),
            "{} is documented twice",
            row.path
        );
    }
    documented.retain(|path| {
        !absent
            .iter()
            .any(|section| path.starts_with(&format!("{section}.")))
    });
    let in_code: BTreeSet<String> = code.keys().cloned().collect();
    let missing: Vec<_> = in_code.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&in_code).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/configuration.md is out of step with the settings\n  \
         undocumented settings: {missing:?}\n  documented but not settings: {extra:?}"
    );
}

#[test]
fn each_row_states_the_default_and_the_environment_variable() {
    let code = code_settings();
    let mut wrong = Vec::new();
    for row in documented_rows() {
        let expected_env = format!(
            "`HIVEMIND_{}`",
            row.path.to_ascii_uppercase().replace('.', "__")
        );
        if row.env != expected_env {
            wrong.push(format!(
                "{}: env is {}, expected {expected_env}",
                row.path, row.env
            ));
        }
        let Some(default) = code.get(&row.path) else {
            continue; // a section this build lacks, or a stale row the other test reports
        };
        // The page states a full build's default; a build without gossip defaults to standalone.
        if row.path == "strategy" && cfg!(not(feature = "gossip")) {
            continue;
        }
        if first_code(&row.default) != Some(default.as_str()) {
            wrong.push(format!(
                "{}: default cell {:?}, the code's default is `{default}`",
                row.path, row.default
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn documented_flags_exist_and_every_flag_is_documented() {
    let command = Cli::command();
    let longs: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter(|long| !matches!(*long, "help" | "version"))
        .map(|long| format!("--{long}"))
        .collect();
    let mut wrong = Vec::new();
    for row in documented_rows() {
        for word in row.flag.split(['`', ',', ' ']) {
            if word.starts_with("--") && !longs.contains(word) {
                wrong.push(format!("{}: no flag {word}", row.path));
            }
        }
    }
    for long in &longs {
        let named = PAGE.match_indices(long.as_str()).any(|(at, _)| {
            let next = PAGE[at + long.len()..].chars().next();
            !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
        });
        if !named {
            wrong.push(format!("flag {long} is not documented"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
