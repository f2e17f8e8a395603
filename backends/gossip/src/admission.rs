//! How much of a limit this node may still use, given what it knows of its peers: the
//! overshoot-reduction mechanisms, each switchable so the harness can show its effect.
//!
//! - **Naive sum** (always): peers' last published counts count against the limit.
//! - **Extrapolation**: peers' counts grow by their observed rate times the age of the
//!   information (up to a horizon), so a node does not admit hits its peers have already
//!   admitted but not yet published.
//! - **Fair share**: of what remains, this node may use only its share by observed demand
//!   (hits in the window and recent rates, its own against the peers'), but never less than
//!   what the peers cannot use before they hear of its admissions. The rule binds only near
//!   the limit, where several nodes would otherwise each take the last few hits at once.
//!
//! Pure arithmetic: no I/O, no time source.

use crate::view::PeerEstimate;

/// The prior (hits/s, over [`Admission::delay_secs`]) added to this node's side of the fair
/// share. It was 1 hit/s, negligible
/// against rates of hundreds per second but not at low limits: at 10 per second on 9 nodes each
/// node admits about 1 hit/s, its share came out 2.1 / 11 ≈ 0.19 instead of 0.11, and the
/// nodes' shares summed to 1.7 (each took the last hits as if it were almost alone).
pub const SHARE_PRIOR: f64 = 0.1;

/// A pseudo-random number in [0, 1) that is a pure function of what this node knows: its own
/// count, the peers' published counts, both smoothed rates (bit patterns that differ between
/// nodes and change every publication round) and the limit.
///
/// A pure function rather than a random source keeps admission deterministic and testable, and
/// gives one draw per state rather than per request: a node that was refused the last hits keeps
/// being refused until something changes (a publication, its own rate refreshed each round), so
/// repeated requests in one round do not multiply its chance. The extrapolated part is left out
/// on purpose: it changes every millisecond and would re-draw on every request.
fn dither(peers: &PeerEstimate, own: u32, limit: u32) -> f64 {
    let mut h = u64::from(own) | (u64::from(peers.published) << 32);
    h ^= (u64::from(peers.own_rate.to_bits()) << 32 | u64::from(peers.peer_rate.to_bits()))
        .rotate_left(17);
    h ^= u64::from(limit).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64 finaliser.
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

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
        if !self.needs_own_count(peers) {
            return counted;
        }
        let remainder = limit.saturating_sub(own).saturating_sub(counted);
        // This node may take its share of the remainder, and never less than what the peers
        // cannot use before they hear of it: the reserve is for hits they make meanwhile. Near
        // a limit of 1,000 per second the peers make ~100 hits in that time, more than the
        // remainder, and the share decides alone; at 10 per second they make about one, and
        // the share decides only the last hit or two instead of the whole window.
        let remainder_f = f64::from(remainder);
        let exact = (remainder_f * self.share(peers, own)).max(remainder_f - self.in_flight(peers));
        // Dithered rounding: `floor(exact + u)` with `u` uniform in [0, 1). A plain floor gives
        // every node 0 once `exact < 1`, so with `n` equal nodes all of them stop while about
        // `n - 1` hits remain: a reserve of 8 % of a limit of 100 on 9 nodes, that nobody ever
        // takes. Dithered, each node takes the last hits with probability `exact`, so the
        // nodes together take `remainder` on average.
        let mine = (exact + dither(peers, own, limit))
            .floor()
            .clamp(0.0, remainder_f) as u32;
        counted.saturating_add(remainder - mine.min(remainder))
    }

    /// This node's share of the remainder by observed demand: its hits in the window plus
    /// those it makes before its peers hear of them (its rate over [`Self::delay_secs`]),
    /// against the same for all nodes (the peers' counted estimate and their rate). Counts
    /// make the share of a node that admits a few hits per second what it is: its rate alone, refreshed every publication round, is
    /// near its peak just after a hit and near 0 just before the next one, so at the moment it
    /// asks it was a fraction of the peers' (a tenth at 10 per second on 3 nodes), and the
    /// shares of all nodes summed to far less than 1. Counts of one window are the same
    /// figures on every node, so the shares sum to about 1 whatever the rate. The rates still
    /// count early in a window, when few hits are in, and [`SHARE_PRIOR`] hits/s on this
    /// node's side give a share to a node that has neither yet.
    pub fn share(&self, peers: &PeerEstimate, own: u32) -> f64 {
        let ahead = self.delay_secs();
        let own_rate = f64::from(peers.own_rate).max(0.0);
        let peer_rate = f64::from(peers.peer_rate).max(0.0);
        let mine = f64::from(own) + (own_rate + SHARE_PRIOR) * ahead;
        let theirs = f64::from(self.counted(peers)) + peer_rate * ahead;
        mine / (mine + theirs)
    }

    /// How long (s) an admission takes to reach the peers: half the horizon, a publication
    /// round plus about one gossip round (the horizon being three gossip rounds), at least
    /// 1 ms.
    pub fn delay_secs(&self) -> f64 {
        f64::from((self.horizon_millis / 2).max(1)) / 1000.0
    }

    /// The hits the peers are expected to make before this node's next admission reaches
    /// them: their rate over [`Self::delay_secs`].
    pub fn in_flight(&self, peers: &PeerEstimate) -> f64 {
        f64::from(peers.peer_rate).max(0.0) * self.delay_secs()
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
        // Two equal nodes (100 hits each so far): far from the limit this node may use all but
        // what the peer makes before it hears of it (1,000/s × 150 ms).
        let far = ALL.offset(&peers(100, 0, 1_000.0, 1_000.0), 100, 1_000);
        let allowed = 1_000 - 100 - far;
        assert!((649..=651).contains(&allowed), "{allowed}");
        // Near the limit: remainder 3, share ~1/2 → 1 or 2 hits left for this node.
        let near = ALL.offset(&peers(498, 0, 1_000.0, 1_000.0), 499, 1_000);
        assert!((1..=2).contains(&(1_000 - 499 - near)));
        // Nothing left: nothing for this node.
        let last = ALL.offset(&peers(601, 0, 2_000.0, 1_000.0), 399, 1_000);
        assert_eq!(1_000u32.saturating_sub(399 + last), 0);
    }

    #[test]
    fn without_peer_traffic_the_whole_remainder_is_ours() {
        assert_eq!(ALL.offset(&peers(0, 0, 0.0, 0.0), 7, 10), 0);
        assert_eq!(ALL.offset(&peers(5, 0, 0.0, 3.0), 2, 10), 5);
        assert!(!ALL.needs_own_count(&peers(5, 0, 0.0, 3.0)));
    }

    /// Whether a node of `n` equal ones admits its next hit, `remainder` hits before the limit
    /// of 100 by its view (own and peers counted evenly), in pseudo-random state `seed`.
    fn admits(n: u32, remainder: u32, seed: u32) -> bool {
        let limit = 100;
        let used = limit - remainder;
        let own = used / n;
        let rate = 20.0 + seed as f32 * 0.013;
        let est = peers(used - own, 0, rate * (n - 1) as f32, rate);
        own < limit - ALL.offset(&est, own, limit)
    }

    #[test]
    fn the_last_hits_of_a_limit_are_not_reserved_for_nobody() {
        // 9 equal nodes, 5 hits left. The plain floor of 5 × 1/9 gave every node 0: all nine
        // refused while 5 % of a limit of 100 remained (the 92–96 admitted of 100).
        // Dithered, a node admits with probability 5 × share ≈ 0.55, so the nodes together
        // take about 5.
        let draws = 1_000;
        for (n, remainder) in [(9, 5), (9, 1), (9, 8), (3, 1), (3, 2)] {
            let admitted = (0..draws).filter(|s| admits(n, remainder, *s)).count();
            let expected_per_node = f64::from(remainder) / f64::from(n);
            let per_node = admitted as f64 / f64::from(draws);
            assert!(
                (per_node - expected_per_node).abs() < 0.1 * expected_per_node.max(0.3),
                "{n} nodes, {remainder} left: {per_node} vs {expected_per_node}"
            );
        }
        // Nothing left: nobody admits, whatever the draw.
        assert!((0..draws).all(|s| !admits(9, 0, s)));
        // Far enough from the limit (remainder × share ≥ 1) every node admits, every draw.
        assert!((0..draws).all(|s| admits(9, 10, s)));
        assert!((0..draws).all(|s| admits(3, 4, s)));
    }

    #[test]
    fn one_draw_per_state_not_per_request() {
        // The same state gives the same answer: a refused node stays refused until something
        // it knows changes, so repeated requests do not multiply its chance.
        let est = peers(95, 0, 160.0, 20.0);
        let first = ALL.offset(&est, 11, 100);
        assert!((0..100).all(|_| ALL.offset(&est, 11, 100) == first));
    }

    /// `n` nodes hitting a key evenly at `rate` per second in total, `used` of `limit` admitted
    /// so far (this node's part `used / n`); this node's own rate is `own_rate` (its smoothed
    /// rate swings between hits). Whether it admits its next hit in state `seed`.
    fn admits_at(n: u32, rate: f32, used: u32, limit: u32, own_rate: f32, seed: u32) -> bool {
        let own = used / n;
        let peer_rate = rate * (n - 1) as f32 / n as f32 + seed as f32 * 1e-4;
        let est = peers(used - own, 0, peer_rate, own_rate);
        own < limit - ALL.offset(&est, own, limit)
    }

    #[test]
    fn a_few_hits_per_second_are_not_refused_for_peers_that_cannot_use_them() {
        // 10 per second on 3 nodes, 6 admitted, this node's rate at the low point before its
        // next hit (0.3 hit/s against the peers' 6.7). By rates alone its share was 0.06, 4 × 0.06
        // admitted a quarter of its hits: the 47 % false rejections. The peers make
        // about one hit before they hear of this node's: it may take the other three.
        for own_rate in [0.3, 3.3, 12.0] {
            assert!((0..1_000).all(|s| admits_at(3, 10.0, 6, 10, own_rate, s)));
        }
        // 10 per second on 9 nodes, 7 admitted: the peers make ~1.3 hits meanwhile, so of the 3
        // left this node takes one for sure.
        assert!((0..1_000).all(|s| admits_at(9, 10.0, 7, 10, 0.1, s)));
        // 100 per second on 9 nodes, 80 admitted, this node idle for a while.
        assert!((0..1_000).all(|s| admits_at(9, 100.0, 80, 100, 0.2, s)));
        // The last hit is still shared: 1 left on 3 nodes, about a third of the draws take it.
        let last = (0..1_000)
            .filter(|s| admits_at(3, 10.0, 9, 10, 3.3, *s))
            .count();
        assert!((230..440).contains(&last), "{last} of 1000");
    }

    #[test]
    fn the_cap_leaves_the_last_hits_of_a_large_limit_to_the_share() {
        // 1,000 per second on 3 nodes, 995 admitted: the peers make ~100 hits before they hear
        // of this node's, far more than the 5 left, so the share alone decides (as before the
        // cap): this node takes about 5 / 3 of them.
        let est = peers(663, 0, 667.0, 333.0);
        let share = ALL.share(&est, 332);
        assert!((0.32..0.35).contains(&share), "{share}");
        assert!(ALL.in_flight(&est) > 5.0);
        let mean = (0..1_000u32)
            .map(|s| {
                let est = peers(663, 0, 667.0 + s as f32 * 0.01, 333.0);
                f64::from(1_000 - 332 - ALL.offset(&est, 332, 1_000))
            })
            .sum::<f64>()
            / 1_000.0;
        assert!((1.5..1.85).contains(&mean), "{mean}");
    }

    #[test]
    fn the_share_does_not_swing_with_the_own_rate_between_hits() {
        // 3 nodes at 10 per second, 3 of this node's hits and 6 of the peers' in: its rate just
        // after a hit (12/s) and just before the next (0.3/s) give about the same share.
        let high = ALL.share(&peers(6, 0, 6.7, 12.0), 3);
        let low = ALL.share(&peers(6, 0, 6.7, 0.3), 3);
        assert!((0.25..0.45).contains(&low), "{low}");
        assert!(high / low < 1.6, "{high} vs {low}");
    }

    #[test]
    fn shares_sum_to_about_one_at_low_rates() {
        // 9 nodes at 10 per second, 8 admitted by 8 of them, one hit each: every view counts the
        // same hits, so the shares sum to ~1 whether a node is at the top or the bottom of its
        // rate between hits.
        for own_rate in [0.1, 1.1, 2.0] {
            let one = ALL.share(&peers(7, 0, 8.0 * 1.1, own_rate), 1);
            let none = ALL.share(&peers(8, 0, 8.0 * 1.1, own_rate), 0);
            let sum = 8.0 * one + none;
            assert!((0.85..1.15).contains(&sum), "{own_rate}: {sum}");
        }
        // 80/10/10 skew at 100 per second, 60 admitted: the hot node gets about 80 % of what
        // remains, the cold ones 10 %.
        let hot = ALL.share(&peers(12, 0, 20.0, 80.0), 48);
        let cold = ALL.share(&peers(54, 0, 90.0, 10.0), 6);
        assert!((0.77..0.83).contains(&hot), "{hot}");
        assert!((0.08..0.12).contains(&cold), "{cold}");
    }

    #[test]
    fn low_limits_on_nine_nodes_are_reachable() {
        // A limit of 10 on 9 nodes, 8 admitted (1 here, 7 by peers): the peers make ~1.2 hits
        // before they hear of this one's, so of the last 2 this node takes one most of the
        // time, not never (the old floor) nor a fifth of the time (the rate share alone).
        let admitted = (0..1_000u32)
            .filter(|s| {
                let est = peers(7, 0, 8.0 + *s as f32 * 1e-4, 1.0);
                1 < 10 - ALL.offset(&est, 1, 10)
            })
            .count();
        assert!((650..950).contains(&admitted), "{admitted} of 1000");
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
