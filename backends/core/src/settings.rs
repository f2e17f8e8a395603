//! What the settings sections of the server and the backends share: serde helpers for lists
//! and secrets, and the range checks every section runs when the settings load.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Accepts a list or one comma-separated string (the form flags and env variables give).
pub fn comma_separated<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(de)? {
        OneOrMany::One(joined) => joined
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        OneOrMany::Many(list) => list,
    })
}

/// Serializes a secret as `<redacted>` (or null when unset), so dumps never show it.
pub fn redacted<S: Serializer>(secret: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

/// Reads a secret, which must be a string: a YAML scalar such as `0123` would reach here as a
/// number with its leading zero (or its octal reading) lost, so it is refused with a hint to
/// quote it. Environment variables for secrets reach here as strings, unparsed.
pub fn secret_string<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Other(serde::de::IgnoredAny),
    }
    match Option::<Scalar>::deserialize(de)? {
        None => Ok(None),
        Some(Scalar::Text(secret)) => Ok(Some(secret)),
        Some(Scalar::Other(_)) => Err(serde::de::Error::custom(
            "a secret must be a string: quote it (secret: \"0123\"), or set it through an environment variable",
        )),
    }
}

/// A setting whose value cannot be used, found when the settings load (so `--check-config`
/// catches it and no background task is handed a zero interval or an overflowing one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSetting {
    /// The dotted setting path, e.g. `mesh.gossip_interval`.
    pub key: String,
    /// What is wrong and what is accepted.
    pub problem: String,
}

/// Collects [`InvalidSetting`]s for one settings section.
#[derive(Debug, Default)]
pub struct SettingsCheck {
    /// The problems found so far.
    pub problems: Vec<InvalidSetting>,
}

impl SettingsCheck {
    /// Records a problem with `key`.
    pub fn invalid(&mut self, key: &str, problem: impl Into<String>) {
        self.problems.push(InvalidSetting {
            key: key.to_owned(),
            problem: problem.into(),
        });
    }

    /// `value` must lie in `min..=max`.
    pub fn duration(&mut self, key: &str, value: Duration, min: Duration, max: Duration) {
        if value < min || value > max {
            self.invalid(
                key,
                format!("{value:?} is out of range: between {min:?} and {max:?}"),
            );
        }
    }

    /// `value` must lie in `min..=max`.
    pub fn count(&mut self, key: &str, value: u64, min: u64, max: u64) {
        if value < min || value > max {
            self.invalid(
                key,
                format!("{value} is out of range: between {min} and {max}"),
            );
        }
    }
}
