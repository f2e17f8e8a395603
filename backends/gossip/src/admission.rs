//! How much of a limit this node may still use, given what it knows of its peers: the
//! overshoot-reduction mechanisms, each switchable so the harness can show its effect.
//!
//! - **Naive sum** (always): peers' last published counts count against the limit.
//! - **Extrapolation**: peers' counts grow by their observed rate times the age of the
//!   information (up to a horizon), so a node does not admit hits its peers have already
//!   admitted but not yet published.
//! - **Fair share**: of what remains, this node may use only its share by observed demand,
//!   `own_rate / (own_rate + peer_rate)`. The rule binds only near the limit, where several
//!   nodes would otherwise each take the last few hits at once.
//!
//! Pure arithmetic: no I/O, no time source.

use crate::view::PeerEstimate;

/// Which mechanisms are on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    /// Extrapolate peers' counts by their rates.
    pub extrapolate: bool,
    /// Keep near-limit admissions to this node's fair share of the remainder.
    pub fair_share: bool,
    /// How far (ms) peers' counts are extrapolated at most: past it the information is too old
    /// to trust a rate (a peer may have stopped, or died).
    pub horizon_millis: u32,
}

impl Admission {
    /// The horizon to read peer estimates with (0 when extrapolation is off).
    pub fn read_horizon(&self) -> u32 {
        if self.extrapolate {
            self.horizon_millis
        } else {
            0
        }
    }

    /// The hits to count against `limit` on top of this node's own `own` count: the peers'
    /// estimate plus, with fair share, the part of the remainder left to the peers. A hit of
    /// `addend` is admitted iff `own + addend <= limit - offset`.
    pub fn offset(&self, peers: &PeerEstimate, own: u32, limit: u32) -> u32 {
        let counted = self.counted(peers);
        if !self.fair_share || peers.peer_rate <= 0.0 {
            return counted;
        }
        let remainder = limit.saturating_sub(own).saturating_sub(counted);
        // +1 hit/s on both sides: a node whose own rate is not measured yet still gets a share.
        let share = (f64::from(peers.own_rate) + 1.0)
            / (f64::from(peers.own_rate) + f64::from(peers.peer_rate) + 1.0);
        let mine = (f64::from(remainder) * share).floor() as u32;
        counted.saturating_add(remainder - mine.min(remainder))
    }

    /// The peers' hits as this node counts them: published, plus extrapolated if that is on.
    pub fn counted(&self, peers: &PeerEstimate) -> u32 {
        if self.extrapolate {
            peers.total()
        } else {
            peers.published
        }
    }

    /// Whether [`offset`](Self::offset) uses this node's own count (fair share on and peers
    /// hitting the key); otherwise the request path skips reading it and passes 0.
    pub fn needs_own_count(&self, peers: &PeerEstimate) -> bool {
        self.fair_share && peers.peer_rate > 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(published: u32, extrapolated: u32, peer_rate: f32, own_rate: f32) -> PeerEstimate {
        PeerEstimate {
            published,
            extrapolated,
            peer_rate,
            own_rate,
        }
    }

    const ALL: Admission = Admission {
        extrapolate: true,
        fair_share: true,
        horizon_millis: 300,
    };

    #[test]
    fn naive_sum_counts_published_counts_only() {
        let naive = Admission {
            extrapolate: false,
            fair_share: false,
            ..ALL
        };
        assert_eq!(naive.offset(&peers(40, 9, 100.0, 50.0), 10, 100), 40);
        assert_eq!(naive.read_horizon(), 0);
    }

    #[test]
    fn extrapolation_adds_the_peers_recent_hits() {
        let extrapolate = Admission {
            fair_share: false,
            ..ALL
        };
        assert_eq!(extrapolate.offset(&peers(40, 9, 100.0, 50.0), 10, 100), 49);
    }

    #[test]
    fn fair_share_binds_only_near_the_limit() {
        // Two equal nodes: far from the limit the share is plenty.
        let far = ALL.offset(&peers(100, 0, 1_000.0, 1_000.0), 100, 1_000);
        let allowed = 1_000 - 100 - far;
        assert!((399..=400).contains(&allowed), "{allowed}");
        // Near the limit: remainder 3, share ~1/2 → 1 hit left for this node.
        let near = ALL.offset(&peers(498, 0, 1_000.0, 1_000.0), 499, 1_000);
        assert_eq!(1_000 - 499 - near, 1);
        // Remainder 1 with a share of 1/3: nothing for this node, the peers take it.
        let last = ALL.offset(&peers(600, 0, 2_000.0, 1_000.0), 399, 1_000);
        assert_eq!(1_000u32.saturating_sub(399 + last), 0);
    }

    #[test]
    fn without_peer_traffic_the_whole_remainder_is_ours() {
        assert_eq!(ALL.offset(&peers(0, 0, 0.0, 0.0), 7, 10), 0);
        assert_eq!(ALL.offset(&peers(5, 0, 0.0, 3.0), 2, 10), 5);
        assert!(!ALL.needs_own_count(&peers(5, 0, 0.0, 3.0)));
    }

    #[test]
    fn offsets_never_overflow() {
        let o = ALL.offset(
            &peers(u32::MAX, u32::MAX, f32::MAX, 0.0),
            u32::MAX,
            u32::MAX,
        );
        assert_eq!(o, u32::MAX);
    }
}
