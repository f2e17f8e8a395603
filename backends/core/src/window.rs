//! Rate limit units and epoch-aligned fixed windows.
//!
//! A window of unit `u` is `floor(now / u.seconds())`, as in envoyproxy/ratelimit, so every node
//! with a synchronised clock agrees on window boundaries without exchanging a message. `month` is
//! a 30-day bucket and `year` a 365-day bucket, not calendar periods; `week` windows start on a
//! Thursday (the Unix epoch's weekday).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The unit of a rate limit: how long one window lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// One second.
    Second,
    /// 60 seconds.
    Minute,
    /// 3,600 seconds.
    Hour,
    /// 86,400 seconds.
    Day,
    /// 7 days.
    Week,
    /// 30 days (a fixed bucket, not a calendar month).
    Month,
    /// 365 days (a fixed bucket, not a calendar year).
    Year,
}

impl Unit {
    /// Every unit, shortest first.
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    /// The length of one window of this unit, in seconds.
    pub const fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }

    /// Parses a unit name as the rules files spell it, ignoring ASCII case (`second`, `MINUTE`).
    pub fn parse(name: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|unit| unit.as_str().eq_ignore_ascii_case(name))
    }

    /// The lowercase name of the unit, as written in rules files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Wall-clock time as a duration since the Unix epoch.
///
/// Windows are aligned to wall-clock time (not `Instant`) so that separate processes agree on
/// them; a request reads it once, from a [`crate::Clock`] that tests can replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixTime(Duration);

impl UnixTime {
    /// The time `since_epoch` after 1970-01-01T00:00:00Z.
    pub const fn from_duration(since_epoch: Duration) -> Self {
        UnixTime(since_epoch)
    }

    /// The time `secs` whole seconds after the epoch.
    pub const fn from_secs(secs: u64) -> Self {
        UnixTime(Duration::from_secs(secs))
    }

    /// The time `millis` milliseconds after the epoch.
    pub const fn from_millis(millis: u64) -> Self {
        UnixTime(Duration::from_millis(millis))
    }

    /// The system's wall clock now (the epoch itself if the clock is set before 1970).
    pub fn now() -> Self {
        UnixTime(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        )
    }

    /// Time since the epoch.
    pub const fn since_epoch(self) -> Duration {
        self.0
    }

    /// Whole seconds since the epoch.
    pub const fn as_secs(self) -> u64 {
        self.0.as_secs()
    }

    /// This time moved forward by `by`.
    pub fn plus(self, by: Duration) -> Self {
        UnixTime(self.0.saturating_add(by))
    }
}

/// One fixed window: the `index`-th window of `unit` since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// `floor(start / unit.seconds())`.
    pub index: u64,
    /// The length of the window.
    pub unit: Unit,
}

impl Window {
    /// The window of `unit` that contains `now`.
    pub fn containing(now: UnixTime, unit: Unit) -> Self {
        Window {
            index: now.as_secs() / unit.seconds(),
            unit,
        }
    }

    /// When the window starts.
    pub fn start(self) -> UnixTime {
        UnixTime::from_secs(self.index.saturating_mul(self.unit.seconds()))
    }

    /// When the window ends (the next one starts).
    pub fn end(self) -> UnixTime {
        UnixTime::from_secs(
            self.index
                .saturating_add(1)
                .saturating_mul(self.unit.seconds()),
        )
    }

    /// Whole seconds from `now` until this window resets, as envoyproxy/ratelimit reports it in
    /// `duration_until_reset`: `unit - now % unit`, so between 1 and `unit` seconds.
    pub fn seconds_until_reset(unit: Unit, now: UnixTime) -> u64 {
        unit.seconds() - now.as_secs() % unit.seconds()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn units_parse_ignoring_case_and_reject_unknown_names() {
        assert_eq!(Unit::parse("second"), Some(Unit::Second));
        assert_eq!(Unit::parse("MINUTE"), Some(Unit::Minute));
        assert_eq!(Unit::parse("Hour"), Some(Unit::Hour));
        assert_eq!(Unit::parse("week"), Some(Unit::Week));
        assert_eq!(Unit::parse("month"), Some(Unit::Month));
        assert_eq!(Unit::parse("year"), Some(Unit::Year));
        assert_eq!(Unit::parse("fortnight"), None);
        assert_eq!(Unit::parse(""), None);
        assert_eq!(Unit::Month.seconds(), 2_592_000);
        assert_eq!(Unit::Year.seconds(), 31_536_000);
    }

    #[test]
    fn windows_align_to_the_epoch() {
        let now = UnixTime::from_millis(1_700_000_123_456);
        let minute = Window::containing(now, Unit::Minute);
        assert_eq!(minute.start(), UnixTime::from_secs(1_700_000_100));
        assert_eq!(minute.end(), UnixTime::from_secs(1_700_000_160));
        assert_eq!(Window::seconds_until_reset(Unit::Minute, now), 37);
        // A week window starts on a Thursday 00:00 UTC, like the epoch.
        let week = Window::containing(now, Unit::Week);
        assert_eq!(week.start().as_secs() % 86_400, 0);
        assert_eq!((week.start().as_secs() / 86_400 + 4) % 7, 4);
    }

    #[test]
    fn reset_is_a_whole_unit_exactly_on_a_boundary() {
        let boundary = UnixTime::from_secs(1_700_000_040);
        assert_eq!(Window::seconds_until_reset(Unit::Minute, boundary), 60);
        assert_eq!(Window::seconds_until_reset(Unit::Second, boundary), 1);
    }

    proptest! {
        #[test]
        fn a_window_contains_the_time_it_was_made_from(ms in 0u64..4_000_000_000_000, u in 0usize..7) {
            let unit = Unit::ALL[u];
            let now = UnixTime::from_millis(ms);
            let window = Window::containing(now, unit);
            prop_assert!(window.start() <= now);
            prop_assert!(now < window.end());
            prop_assert_eq!(window.end().as_secs() - window.start().as_secs(), unit.seconds());
            let reset = Window::seconds_until_reset(unit, now);
            prop_assert!(reset >= 1 && reset <= unit.seconds());
            prop_assert_eq!(now.as_secs() + reset, window.end().as_secs());
        }

        #[test]
        fn consecutive_windows_are_adjacent(secs in 0u64..4_000_000_000, u in 0usize..7) {
            let unit = Unit::ALL[u];
            let window = Window::containing(UnixTime::from_secs(secs), unit);
            let next = Window::containing(window.end(), unit);
            prop_assert_eq!(next.index, window.index + 1);
            prop_assert_eq!(next.start(), window.end());
        }
    }
}
