//! How a node's counts look in its chitchat state: one compact key-value per counter key.
//!
//! Key: `c` + 11 base64url characters of the cluster-keyed 64-bit hash of the counter key
//! ([`KeyHasher`]; a key-value must stay far below chitchat's 65,507-byte datagram).
//! Value: `{unit}{window}:{count}:{millis}`, numbers in base 36: the unit letter, the 32-bit
//! window tag, this node's own count in that window, and the wall-clock milliseconds (mod 2^32)
//! when the count was read, which lets readers estimate rates and extrapolate. Example:
//! `sgva52:h:1o7vzff`. Every byte counts: thousands of these go out per gossip round.
//!
//! The value is overwritten in place when the count or the window changes, so each counter key
//! costs one entry per node, whatever the number of windows.

use hivemind_core::Unit;

/// The prefix of every counter entry in a node's chitchat state.
pub const COUNTER_PREFIX: &str = "c";

/// base64url without padding: 11 characters for 8 bytes.
const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The keyed 64-bit hash nodes name counter keys by on the wire: SipHash-1-3 under a key
/// derived from the cluster id, identical on every node, version and platform of one cluster.
/// Keyed so that a crafted descriptor value cannot be made to share a victim key's entry (an
/// unkeyed hash such as FNV-1a can be inverted by hand); the cluster id, not the mesh secret,
/// seeds it so a secret rotation never splits the key space.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHasher {
    /// The SipHash key.
    key: [u8; 16],
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher(..)")
    }
}

impl Default for KeyHasher {
    /// The hasher of the default cluster id, `hivemind`.
    fn default() -> Self {
        KeyHasher::for_cluster("hivemind")
    }
}

impl KeyHasher {
    /// The hasher every node of `cluster_id` uses.
    pub fn for_cluster(cluster_id: &str) -> KeyHasher {
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        digest.update(b"hivemind-gossip counter key hash v1\0");
        digest.update(cluster_id.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest.finalize()[..16]);
        KeyHasher { key }
    }

    /// The hash of a counter key.
    pub fn hash(&self, counter_key: &str) -> u64 {
        use std::hash::Hasher;
        let mut hasher = siphasher::sip::SipHasher13::new_with_key(&self.key);
        hasher.write(counter_key.as_bytes());
        hasher.finish()
    }
}

/// The chitchat key holding the counter whose key hashes to `hash`.
pub fn entry_key(hash: u64) -> String {
    let mut key = String::with_capacity(12);
    key.push_str(COUNTER_PREFIX);
    // 64 bits as 11 six-bit digits, most significant first (the first holds the top 4 bits).
    for i in (0..11).rev() {
        key.push(BASE64URL[((hash >> (6 * i)) & 0x3f) as usize] as char);
    }
    key
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = [0u8; 7];
    let mut at = out.len();
    loop {
        at -= 1;
        out[at] = DIGITS[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    String::from_utf8_lossy(&out[at..]).into_owned()
}

fn parse_base36(s: &str) -> Option<u32> {
    if s.is_empty()
        || s.len() > 7
        || s.bytes()
            .any(|b| !b.is_ascii_digit() && !b.is_ascii_lowercase())
    {
        return None;
    }
    u32::from_str_radix(s, 36).ok()
}

/// One node's published count for one counter key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountEntry {
    /// The unit of the counter's limit (tells readers when the window ends).
    pub unit: Unit,
    /// The window tag the count belongs to ([`hivemind_core::window_tag`]).
    pub window: u32,
    /// The publishing node's own count in that window.
    pub count: u32,
    /// Wall-clock milliseconds since the epoch, mod 2^32, when the count was read.
    pub at_millis: u32,
}

impl CountEntry {
    /// The chitchat value for this entry.
    pub fn encode(&self) -> String {
        format!(
            "{}{}:{}:{}",
            unit_letter(self.unit),
            base36(self.window),
            base36(self.count),
            base36(self.at_millis)
        )
    }

    /// Parses a chitchat value; `None` for anything malformed (a peer of another version, or
    /// garbage), which readers ignore.
    pub fn decode(value: &str) -> Option<CountEntry> {
        let mut chars = value.chars();
        let unit = letter_unit(chars.next()?)?;
        let mut fields = chars.as_str().split(':');
        let window = parse_base36(fields.next()?)?;
        let count = parse_base36(fields.next()?)?;
        let at_millis = parse_base36(fields.next()?)?;
        if fields.next().is_some() {
            return None;
        }
        Some(CountEntry {
            unit,
            window,
            count,
            at_millis,
        })
    }
}

/// Parses a chitchat key of a counter entry into its hash.
pub fn decode_entry_key(key: &str) -> Option<u64> {
    let digits = key.strip_prefix(COUNTER_PREFIX)?;
    if digits.len() != 11 {
        return None;
    }
    digits.bytes().try_fold(0u64, |hash, b| {
        let digit = BASE64URL.iter().position(|&c| c == b)? as u64;
        Some((hash << 6) | digit)
    })
}

fn unit_letter(unit: Unit) -> char {
    match unit {
        Unit::Second => 's',
        Unit::Minute => 'm',
        Unit::Hour => 'h',
        Unit::Day => 'd',
        Unit::Week => 'w',
        Unit::Month => 'M',
        Unit::Year => 'y',
    }
}

fn letter_unit(letter: char) -> Option<Unit> {
    Some(match letter {
        's' => Unit::Second,
        'm' => Unit::Minute,
        'h' => Unit::Hour,
        'd' => Unit::Day,
        'w' => Unit::Week,
        'M' => Unit::Month,
        'y' => Unit::Year,
        _ => return None,
    })
}

/// Wall-clock milliseconds mod 2^32, the timestamp format of [`CountEntry::at_millis`].
pub fn millis_tag(now: hivemind_core::UnixTime) -> u32 {
    now.since_epoch().as_millis() as u32
}

/// Milliseconds from `earlier` to `later` (both [`millis_tag`]s), or 0 if `earlier` is in the
/// future (clock skew between nodes). Valid for gaps below ~24 days.
pub fn millis_since(earlier: u32, later: u32) -> u32 {
    let gap = later.wrapping_sub(earlier);
    if gap > u32::MAX / 2 {
        0
    } else {
        gap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_for_every_unit() {
        for unit in Unit::ALL {
            let entry = CountEntry {
                unit,
                window: 28_333_334,
                count: u32::MAX,
                at_millis: 3_641_220_123,
            };
            assert_eq!(CountEntry::decode(&entry.encode()), Some(entry));
        }
        let example = CountEntry {
            unit: Unit::Second,
            window: 28_333_334,
            count: 17,
            at_millis: 3_641_220_123,
        };
        assert_eq!(example.encode(), "sgva52:h:1o7vzff");
        assert_eq!(CountEntry::decode("sgva52:h:1o7vzff"), Some(example));
        let max = CountEntry {
            count: u32::MAX,
            ..example
        };
        assert_eq!(CountEntry::decode(&max.encode()), Some(max));
    }

    #[test]
    fn malformed_values_are_ignored() {
        for bad in [
            "",
            "s",
            "x1:2:3",
            "s1:2",
            "s1:2:3:4",
            "s-1:2:3",
            "s1:TWO:3",
            "s1:2:",
            "szzzzzzzz:1:1",
        ] {
            assert_eq!(CountEntry::decode(bad), None, "{bad:?}");
        }
    }

    const PINNED_EMPTY: u64 = 0x7c0d_4ed6_3694_be0d;
    const PINNED_A: u64 = 0x1205_dfe3_38df_094b;

    #[test]
    fn keys_are_compact_and_stable() {
        // Pinned: the hash must never change between versions (nodes of a cluster running
        // different versions must name keys alike).
        let hasher = KeyHasher::default();
        assert_eq!(hasher.hash(""), PINNED_EMPTY);
        assert_eq!(hasher.hash("a"), PINNED_A);
        // Another cluster names the same key differently.
        assert_ne!(KeyHasher::for_cluster("other").hash("a"), hasher.hash("a"));
        let long = "k".repeat(65_536);
        let key = entry_key(hasher.hash(&long));
        assert_eq!(key.len(), 12);
        assert_eq!(decode_entry_key(&key), Some(hasher.hash(&long)));
        for hash in [0, 1, u64::MAX, 0x8000_0000_0000_0000, 0xdead_beef_cafe_f00d] {
            assert_eq!(decode_entry_key(&entry_key(hash)), Some(hash));
        }
        assert_eq!(entry_key(0), "cAAAAAAAAAAA");
        assert_eq!(decode_entry_key("cxyz"), None);
        assert_eq!(decode_entry_key("c:AAAAAAAAAA"), None);
        assert_eq!(decode_entry_key("other"), None);
    }

    #[test]
    fn millis_wrap_and_skew() {
        assert_eq!(millis_since(10, 30), 20);
        assert_eq!(millis_since(u32::MAX - 5, 4), 10);
        assert_eq!(
            millis_since(30, 10),
            0,
            "a timestamp from the future counts as now"
        );
    }
}
