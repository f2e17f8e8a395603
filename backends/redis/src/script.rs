//! The Lua script that decides one request in one round trip, and the pure encoding of a
//! request into its keys and arguments and of the reply into decisions (no I/O here).
//!
//! The script applies the same rules as [`hivemind_core::request_admitted`] and the local
//! counters, in the same order: each enforced or quota hit reserves its addend if it fits its
//! limit (a later hit of the same key sees the reservation), a shadow hit only reads; then if
//! the request is admitted the hits that did not reserve are added (shadow hits, quota hits over
//! their limit), and if it is rejected nothing is written at all. Redis runs a script atomically,
//! so check and increment are one step and nodes sharing a Redis admit exactly the limit.
//!
//! Keys are `PREFIX{DOMAIN}REST:WINDOW`: the hash tag is the request's domain (every hit of one
//! request has the same domain), so a request's keys share one Cluster slot, and the same
//! descriptor always maps to the same key whatever else a request carries. The window index is
//! `floor(now / unit)` from hivemind's clock (not Redis `TIME`), and a key's TTL is the window's
//! remaining time, set when the script first creates it.

use std::time::Duration;

use hivemind_core::{Decision, Enforcement, Hit, UnixTime, Window};

/// The script. `KEYS[i]` is the window key of hit `i`; `ARGV` holds four values per hit: the
/// limit, the addend, the mode (`0` enforce, `1` shadow, `2` quota) and the key's TTL in ms.
/// Returns `[admitted, count_1, over_1, count_2, over_2, ...]` (integers).
pub const SCRIPT: &str = r#"
local MAX = 4294967295
local n = #KEYS
local value, stored = {}, {}
local counts, over, reserved = {}, {}, {}
for i = 1, n do
  local key = KEYS[i]
  if value[key] == nil then
    local v = tonumber(redis.call('GET', key) or '0') or 0
    value[key] = v
    stored[key] = v
  end
  local b = (i - 1) * 4
  local limit = tonumber(ARGV[b + 1])
  local addend = tonumber(ARGV[b + 2])
  local current = value[key]
  if ARGV[b + 3] == '1' then
    over[i] = current + addend > limit
    counts[i] = current
    reserved[i] = false
  elseif current + addend <= limit then
    value[key] = current + addend
    counts[i] = value[key]
    over[i] = false
    reserved[i] = true
  else
    over[i] = true
    counts[i] = current
    reserved[i] = false
  end
end
local admitted = true
local quota_hits, quota_over = 0, 0
for i = 1, n do
  local mode = ARGV[(i - 1) * 4 + 3]
  if mode == '0' and over[i] then
    admitted = false
  elseif mode == '2' then
    quota_hits = quota_hits + 1
    if over[i] then quota_over = quota_over + 1 end
  end
end
if quota_hits > 0 and quota_over == quota_hits then admitted = false end
local reply = { admitted and 1 or 0 }
for i = 1, n do
  local key = KEYS[i]
  local addend = tonumber(ARGV[(i - 1) * 4 + 2])
  if admitted and not reserved[i] then
    value[key] = math.min(value[key] + addend, MAX)
    counts[i] = value[key]
  elseif (not admitted) and reserved[i] then
    value[key] = math.max(value[key] - addend, 0)
    counts[i] = value[key]
  end
  reply[#reply + 1] = counts[i]
  reply[#reply + 1] = over[i] and 1 or 0
end
if admitted then
  for i = 1, n do
    local key = KEYS[i]
    local delta = value[key] - stored[key]
    if delta ~= 0 then
      local after = redis.call('INCRBY', key, delta)
      if after == delta then
        redis.call('PEXPIRE', key, ARGV[(i - 1) * 4 + 4])
      end
      stored[key] = value[key]
    end
  end
end
return reply
"#;

/// The part of a counter key that names its domain: everything before the first unescaped `|`
/// or `#` (hivemind's counter keys are `domain|entry=value...#unit`, with `\` escapes).
pub fn domain_of(counter_key: &str) -> &str {
    let bytes = counter_key.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'|' | b'#' => return &counter_key[..i],
            _ => i += 1,
        }
    }
    counter_key
}

/// The Redis key of `counter_key` in window `index`: `PREFIX{DOMAIN}REST:INDEX`.
pub fn window_key(prefix: &str, counter_key: &str, index: u64) -> String {
    let domain = domain_of(counter_key);
    let rest = &counter_key[domain.len()..];
    let mut key = String::with_capacity(prefix.len() + counter_key.len() + 24);
    key.push_str(prefix);
    key.push('{');
    key.push_str(domain);
    key.push('}');
    key.push_str(rest);
    key.push(':');
    key.push_str(&index.to_string());
    key
}

/// A request encoded for the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// One window key per hit, in order.
    pub keys: Vec<String>,
    /// Four values per hit: limit, addend, mode, TTL in ms.
    pub args: Vec<u64>,
}

/// The script's mode number of an enforcement.
pub fn mode(enforcement: Enforcement) -> u64 {
    match enforcement {
        Enforcement::Enforce => 0,
        Enforcement::Shadow => 1,
        Enforcement::Quota => 2,
    }
}

/// How long a key of `unit` made at `now` lives: the rest of its window, at least 1 ms.
pub fn ttl_millis(hit: &Hit, now: UnixTime) -> u64 {
    let end = Window::containing(now, hit.limit.unit).end().since_epoch();
    let left = end.saturating_sub(now.since_epoch());
    u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The keys and arguments of one request at `now`.
pub fn encode(prefix: &str, batch: &[Hit], now: UnixTime) -> Invocation {
    let mut keys = Vec::with_capacity(batch.len());
    let mut args = Vec::with_capacity(batch.len() * 4);
    for hit in batch {
        let window = Window::containing(now, hit.limit.unit);
        keys.push(window_key(prefix, &hit.key, window.index));
        args.extend([
            u64::from(hit.limit.requests_per_unit),
            u64::from(hit.addend),
            mode(hit.enforcement),
            ttl_millis(hit, now),
        ]);
    }
    Invocation { keys, args }
}

/// A script reply that does not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected script reply: {0}")]
pub struct ReplyError(pub String);

/// The decisions in a script reply for `batch` at `now`.
pub fn decode(reply: &[i64], batch: &[Hit], now: UnixTime) -> Result<Vec<Decision>, ReplyError> {
    if reply.len() != 1 + 2 * batch.len() {
        return Err(ReplyError(format!(
            "{} integers for {} hits",
            reply.len(),
            batch.len()
        )));
    }
    let decisions = batch
        .iter()
        .zip(reply[1..].chunks_exact(2))
        .map(|(hit, pair)| {
            let count = u32::try_from(pair[0].max(0)).unwrap_or(u32::MAX);
            let over_limit = pair[1] != 0;
            Decision {
                over_limit,
                count,
                remaining: if over_limit {
                    0
                } else {
                    hit.limit.requests_per_unit.saturating_sub(count)
                },
                until_reset: Duration::from_secs(Window::seconds_until_reset(hit.limit.unit, now)),
            }
        })
        .collect();
    Ok(decisions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivemind_core::{Limit, Unit};

    fn hit(key: &str, limit: u32, unit: Unit, addend: u32, enforcement: Enforcement) -> Hit {
        Hit {
            key: key.into(),
            limit: Limit {
                requests_per_unit: limit,
                unit,
            },
            addend,
            enforcement,
        }
    }

    #[test]
    fn the_domain_is_the_hash_tag() {
        assert_eq!(domain_of("d|k=v#minute"), "d");
        assert_eq!(domain_of("d#minute"), "d");
        assert_eq!(domain_of(r"a\|b|k=v#hour"), r"a\|b");
        assert_eq!(domain_of("plain"), "plain");
        assert_eq!(
            window_key("hm:", "d|k=v#minute", 42),
            "hm:{d}|k=v#minute:42"
        );
        // Two descriptors of one request share the tag, so one Cluster slot.
        let a = window_key("", "api|user=a#second", 1);
        let b = window_key("", "api|path=/x#hour", 1);
        assert_eq!(&a[..5], &b[..5]);
    }

    #[test]
    fn requests_encode_one_key_and_four_arguments_per_hit() {
        let now = UnixTime::from_millis(1_700_000_070_250); // 30.25 s into a minute
        let batch = [
            hit("d|a=1#minute", 5, Unit::Minute, 1, Enforcement::Enforce),
            hit("d|b=2#second", 7, Unit::Second, 3, Enforcement::Shadow),
            hit("d|c=3#hour", 9, Unit::Hour, 2, Enforcement::Quota),
        ];
        let inv = encode("p:", &batch, now);
        assert_eq!(
            inv.keys,
            [
                format!("p:{{d}}|a=1#minute:{}", 1_700_000_070 / 60),
                format!("p:{{d}}|b=2#second:{}", 1_700_000_070),
                format!("p:{{d}}|c=3#hour:{}", 1_700_000_070 / 3600),
            ]
        );
        assert_eq!(&inv.args[..4], &[5, 1, 0, 29_750]);
        assert_eq!(&inv.args[4..8], &[7, 3, 1, 750]);
        assert_eq!(inv.args[10], 2);
        assert_eq!(
            inv.args[11],
            (3_600_000 - (1_700_000_070_250u64 % 3_600_000))
        );
    }

    #[test]
    fn replies_decode_into_decisions() {
        let now = UnixTime::from_secs(1_700_000_070);
        let batch = [
            hit("d|a#minute", 5, Unit::Minute, 1, Enforcement::Enforce),
            hit("d|b#minute", 1, Unit::Minute, 1, Enforcement::Enforce),
        ];
        let d = decode(&[0, 3, 0, 1, 1], &batch, now).unwrap();
        assert_eq!((d[0].over_limit, d[0].count, d[0].remaining), (false, 3, 2));
        assert_eq!((d[1].over_limit, d[1].count, d[1].remaining), (true, 1, 0));
        assert_eq!(d[0].until_reset, Duration::from_secs(30));
        assert!(decode(&[1, 3], &batch, now).is_err());
    }
}
