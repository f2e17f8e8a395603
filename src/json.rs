//! Envoy's JSON mapping of `RateLimitRequest` and `RateLimitResponse`, for the admin `POST /json`
//! endpoint (as envoyproxy/ratelimit's). Field names are lowerCamelCase; the original snake_case
//! names are accepted too, as protobuf JSON parsers do.

use serde::{Deserialize, Serialize};

use crate::limiter::{core_unit, proto_unit};
use crate::proto::{
    Code, DescriptorEntry, RateLimitDescriptor, RateLimitOverride, RateLimitRequest,
    RateLimitResponse,
};

/// `RateLimitRequest` in JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonRequest {
    /// The rules domain.
    #[serde(default)]
    pub domain: String,
    /// The descriptors, each an ordered list of entries.
    #[serde(default)]
    pub descriptors: Vec<JsonDescriptor>,
    /// Hits to add for every descriptor; 0 means 1.
    #[serde(default, alias = "hits_addend")]
    #[serde(rename = "hitsAddend")]
    pub hits_addend: u32,
}

/// `RateLimitDescriptor` in JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonDescriptor {
    /// The (key, value) entries.
    #[serde(default)]
    pub entries: Vec<JsonEntry>,
    /// Envoy's override of the configured limit.
    #[serde(default)]
    pub limit: Option<JsonLimit>,
    /// This descriptor's own hits addend (wins over the request's, 0 allowed). protobuf JSON
    /// writes 64-bit integers as strings; both forms are accepted.
    #[serde(default, alias = "hits_addend", rename = "hitsAddend")]
    #[serde(deserialize_with = "u64_number_or_string")]
    pub hits_addend: Option<u64>,
    /// Envoy's refund flag: the hits are given back instead of consumed.
    #[serde(default, alias = "is_negative_hits", rename = "isNegativeHits")]
    pub is_negative_hits: bool,
}

/// A descriptor entry in JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonEntry {
    /// The descriptor key.
    pub key: String,
    /// The descriptor value.
    #[serde(default)]
    pub value: String,
}

/// A limit in JSON: `{"requestsPerUnit": 10, "unit": "MINUTE"}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonLimit {
    /// The limit's name (responses only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Requests allowed per unit.
    #[serde(default, alias = "requests_per_unit", rename = "requestsPerUnit")]
    pub requests_per_unit: u32,
    /// `SECOND` … `YEAR`.
    pub unit: String,
}

/// `RateLimitResponse` in JSON.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JsonResponse {
    /// `OK` or `OVER_LIMIT`.
    pub overall_code: &'static str,
    /// One status per request descriptor, in order.
    pub statuses: Vec<JsonStatus>,
    /// Headers the server asks Envoy to add.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub response_headers_to_add: Vec<JsonHeader>,
}

/// A descriptor status in JSON.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JsonStatus {
    /// `OK` or `OVER_LIMIT`.
    pub code: &'static str,
    /// The limit that applied, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_limit: Option<JsonLimit>,
    /// Hits left in the window.
    pub limit_remaining: u32,
    /// Time until the window resets, as a protobuf JSON duration (`"37s"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_until_reset: Option<String>,
}

/// A header in JSON.
#[derive(Debug, Serialize)]
pub struct JsonHeader {
    /// Header name.
    pub key: String,
    /// Header value.
    pub value: String,
}

fn u64_number_or_string<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrString {
        Number(u64),
        Text(String),
    }
    match Option::<NumberOrString>::deserialize(de)? {
        None => Ok(None),
        Some(NumberOrString::Number(n)) => Ok(Some(n)),
        Some(NumberOrString::Text(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("invalid hitsAddend {s:?}"))),
    }
}

/// Why a JSON request could not become a `RateLimitRequest`.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// Not JSON, or not the request's shape.
    #[error("invalid RateLimitRequest JSON: {0}")]
    Syntax(#[from] serde_json::Error),
    /// A limit override names an unknown unit.
    #[error(
        "invalid rate limit unit {0:?} (expected SECOND, MINUTE, HOUR, DAY, WEEK, MONTH or YEAR)"
    )]
    Unit(String),
}

/// Parses a JSON `RateLimitRequest`.
pub fn parse_request(body: &[u8]) -> Result<RateLimitRequest, JsonError> {
    let json: JsonRequest = serde_json::from_slice(body)?;
    let mut descriptors = Vec::with_capacity(json.descriptors.len());
    for d in json.descriptors {
        let limit = match d.limit {
            None => None,
            Some(limit) => Some(RateLimitOverride {
                requests_per_unit: limit.requests_per_unit,
                unit: unit_number(&limit.unit).ok_or(JsonError::Unit(limit.unit))?,
            }),
        };
        descriptors.push(RateLimitDescriptor {
            entries: d
                .entries
                .into_iter()
                .map(|e| DescriptorEntry {
                    key: e.key,
                    value: e.value,
                })
                .collect(),
            limit,
            hits_addend: d.hits_addend,
            is_negative_hits: d.is_negative_hits,
        });
    }
    Ok(RateLimitRequest {
        domain: json.domain,
        descriptors,
        hits_addend: json.hits_addend,
    })
}

fn unit_number(name: &str) -> Option<i32> {
    let unit = hivemind_core::Unit::parse(name)?;
    Some(proto_unit(unit) as i32)
}

fn code_name(code: i32) -> &'static str {
    match Code::try_from(code) {
        Ok(Code::Ok) => "OK",
        Ok(Code::OverLimit) => "OVER_LIMIT",
        _ => "UNKNOWN",
    }
}

/// The JSON form of a response.
pub fn response_json(response: &RateLimitResponse) -> JsonResponse {
    JsonResponse {
        overall_code: code_name(response.overall_code),
        statuses: response
            .statuses
            .iter()
            .map(|s| JsonStatus {
                code: code_name(s.code),
                current_limit: s.current_limit.as_ref().map(|l| JsonLimit {
                    name: l.name.clone(),
                    requests_per_unit: l.requests_per_unit,
                    unit: core_unit(l.unit)
                        .map_or("UNKNOWN".to_owned(), |u| u.as_str().to_ascii_uppercase()),
                }),
                limit_remaining: s.limit_remaining,
                duration_until_reset: s
                    .duration_until_reset
                    .as_ref()
                    .map(|d| format!("{}s", d.seconds)),
            })
            .collect(),
        response_headers_to_add: response
            .response_headers_to_add
            .iter()
            .map(|h| JsonHeader {
                key: h.key.clone(),
                value: h.value.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_camel_and_snake_case_requests() {
        let camel = br#"{"domain":"d","descriptors":[{"entries":[{"key":"k","value":"v"}],"hitsAddend":"3","limit":{"requestsPerUnit":5,"unit":"MINUTE"}}],"hitsAddend":2}"#;
        let request = parse_request(camel).unwrap();
        assert_eq!(request.domain, "d");
        assert_eq!(request.hits_addend, 2);
        assert_eq!(request.descriptors[0].hits_addend, Some(3));
        let limit = request.descriptors[0].limit.as_ref().unwrap();
        assert_eq!(
            (limit.requests_per_unit, core_unit(limit.unit)),
            (5, Some(hivemind_core::Unit::Minute))
        );

        let snake = br#"{"domain":"d","descriptors":[{"entries":[{"key":"k"}],"hits_addend":4}],"hits_addend":1}"#;
        let request = parse_request(snake).unwrap();
        assert_eq!(request.descriptors[0].hits_addend, Some(4));
        assert_eq!(request.descriptors[0].entries[0].value, "");
    }

    #[test]
    fn rejects_malformed_requests_with_a_reason() {
        for (body, fragment) in [
            (&b"not json"[..], "invalid RateLimitRequest JSON"),
            (br#"{"domain": 5}"#, "invalid type"),
            (br#"{"domian":"d"}"#, "unknown field"),
            (br#"{"domain":"d","descriptors":[{"entries":[{"key":"k"}],"limit":{"requestsPerUnit":1,"unit":"FORTNIGHT"}}]}"#, "FORTNIGHT"),
            (br#"{"domain":"d","descriptors":[{"entries":[],"hitsAddend":"many"}]}"#, "many"),
        ] {
            let err = parse_request(body).unwrap_err().to_string();
            assert!(err.contains(fragment), "{err}");
        }
    }
}
