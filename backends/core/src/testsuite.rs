//! The conformance suite every [`SyncStrategy`] runs (feature `testsuite`).
//!
//! Each check takes a fresh strategy from the factory and drives it with explicit times, so window
//! logic is exercised without sleeping. A backend's own tests call [`run_all`]:
//!
//! ```text
//! #[tokio::test]
//! async fn conforms() {
//!     hivemind_core::testsuite::run_all(|| async { make_strategy().await }).await;
//! }
//! ```
//!
//! Counter keys are unique per check (a random run id), so backends with shared state (Redis) can
//! run the suite against one server.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::hit::{Enforcement, Hit, Limit};
use crate::strategy::SyncStrategy;
use crate::window::{Unit, UnixTime};

/// A time in the middle of a minute window: 20 s after a minute boundary.
pub const T0: UnixTime = UnixTime::from_secs(1_700_000_040 + 20);

/// Runs every conformance check against strategies made by `make`.
pub async fn run_all<S, F, Fut>(make: F)
where
    S: SyncStrategy,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let run = run_id();
    admits_up_to_the_limit_then_rejects(&make().await, &run).await;
    zero_limit_blocks_everything(&make().await, &run).await;
    a_new_window_resets_the_count(&make().await, &run).await;
    keys_and_units_count_separately(&make().await, &run).await;
    multi_hit_requests_count_all_or_nothing(&make().await, &run).await;
    hits_addend_counts_as_many_hits(&make().await, &run).await;
    shadow_hits_count_but_never_reject(&make().await, &run).await;
    quota_hits_reject_only_when_all_are_over(&make().await, &run).await;
    reports_reset_time(&make().await, &run).await;
    concurrent_requests_admit_exactly_the_limit(Arc::new(make().await), &run).await;
}

fn run_id() -> String {
    let nanos = UnixTime::now().since_epoch().as_nanos();
    format!("conformance-{:x}-{}", nanos, std::process::id())
}

/// A hit for the suite.
pub fn hit(key: &str, limit: u32, unit: Unit, addend: u32, enforcement: Enforcement) -> Hit {
    Hit {
        key: key.to_owned(),
        limit: Limit {
            requests_per_unit: limit,
            unit,
        },
        addend,
        enforcement,
    }
}

async fn over(strategy: &impl SyncStrategy, batch: &[Hit], now: UnixTime) -> Vec<bool> {
    strategy
        .check(batch, now)
        .await
        .expect("strategy check failed")
        .iter()
        .map(|d| d.over_limit)
        .collect()
}

async fn admits_up_to_the_limit_then_rejects(strategy: &impl SyncStrategy, run: &str) {
    let batch = [hit(
        &format!("{run}-basic"),
        3,
        Unit::Minute,
        1,
        Enforcement::Enforce,
    )];
    let mut seen = Vec::new();
    for _ in 0..5 {
        let d = strategy.check(&batch, T0).await.expect("check");
        assert_eq!(d.len(), 1, "one decision per hit");
        seen.push((d[0].over_limit, d[0].remaining));
    }
    assert_eq!(
        seen,
        [(false, 2), (false, 1), (false, 0), (true, 0), (true, 0)],
        "admission up to the limit"
    );
}

async fn zero_limit_blocks_everything(strategy: &impl SyncStrategy, run: &str) {
    let batch = [hit(
        &format!("{run}-zero"),
        0,
        Unit::Second,
        1,
        Enforcement::Enforce,
    )];
    assert_eq!(over(strategy, &batch, T0).await, [true]);
}

async fn a_new_window_resets_the_count(strategy: &impl SyncStrategy, run: &str) {
    let batch = [hit(
        &format!("{run}-window"),
        2,
        Unit::Minute,
        1,
        Enforcement::Enforce,
    )];
    assert_eq!(over(strategy, &batch, T0).await, [false]);
    assert_eq!(over(strategy, &batch, T0).await, [false]);
    assert_eq!(over(strategy, &batch, T0).await, [true]);
    // Still the same minute 39 s later.
    let same = T0.plus(Duration::from_secs(39));
    assert_eq!(over(strategy, &batch, same).await, [true]);
    // The next minute starts empty.
    let next = T0.plus(Duration::from_secs(40));
    assert_eq!(over(strategy, &batch, next).await, [false]);
}

async fn keys_and_units_count_separately(strategy: &impl SyncStrategy, run: &str) {
    let a = [hit(
        &format!("{run}-a"),
        1,
        Unit::Hour,
        1,
        Enforcement::Enforce,
    )];
    let b = [hit(
        &format!("{run}-b"),
        1,
        Unit::Hour,
        1,
        Enforcement::Enforce,
    )];
    assert_eq!(over(strategy, &a, T0).await, [false]);
    assert_eq!(over(strategy, &a, T0).await, [true]);
    assert_eq!(over(strategy, &b, T0).await, [false]);
}

async fn multi_hit_requests_count_all_or_nothing(strategy: &impl SyncStrategy, run: &str) {
    let roomy = format!("{run}-roomy");
    let tight = format!("{run}-tight");
    let both = [
        hit(&roomy, 10, Unit::Minute, 1, Enforcement::Enforce),
        hit(&tight, 1, Unit::Minute, 1, Enforcement::Enforce),
    ];
    let first = strategy.check(&both, T0).await.expect("check");
    assert_eq!((first[0].remaining, first[1].remaining), (9, 0));
    // The tight limit is reached: the request is rejected and the roomy counter is not charged.
    for _ in 0..3 {
        assert_eq!(over(strategy, &both, T0).await, [false, true]);
    }
    let alone = [hit(&roomy, 10, Unit::Minute, 1, Enforcement::Enforce)];
    let d = strategy.check(&alone, T0).await.expect("check");
    assert_eq!(
        d[0].count, 2,
        "rejected requests were counted against another descriptor"
    );
}

async fn hits_addend_counts_as_many_hits(strategy: &impl SyncStrategy, run: &str) {
    let key = format!("{run}-addend");
    let four = [hit(&key, 10, Unit::Minute, 4, Enforcement::Enforce)];
    let d = strategy.check(&four, T0).await.expect("check");
    assert_eq!((d[0].over_limit, d[0].count, d[0].remaining), (false, 4, 6));
    let d = strategy.check(&four, T0).await.expect("check");
    assert_eq!((d[0].over_limit, d[0].remaining), (false, 2));
    // 8 + 4 > 10: rejected whole, nothing added.
    assert_eq!(over(strategy, &four, T0).await, [true]);
    let huge = [hit(&key, 10, Unit::Minute, u32::MAX, Enforcement::Enforce)];
    assert_eq!(over(strategy, &huge, T0).await, [true]);
    let two = [hit(&key, 10, Unit::Minute, 2, Enforcement::Enforce)];
    let d = strategy.check(&two, T0).await.expect("check");
    assert_eq!(
        (d[0].over_limit, d[0].count, d[0].remaining),
        (false, 10, 0)
    );
    // An addend of 0 reads without counting.
    let peek = [hit(&key, 10, Unit::Minute, 0, Enforcement::Enforce)];
    let d = strategy.check(&peek, T0).await.expect("check");
    assert_eq!((d[0].over_limit, d[0].count), (false, 10));
}

async fn shadow_hits_count_but_never_reject(strategy: &impl SyncStrategy, run: &str) {
    let key = format!("{run}-shadow");
    let shadow = [hit(&key, 1, Unit::Minute, 1, Enforcement::Shadow)];
    assert_eq!(over(strategy, &shadow, T0).await, [false]);
    let d = strategy.check(&shadow, T0).await.expect("check");
    assert!(d[0].over_limit, "shadow hits report over the limit");
    assert_eq!(d[0].count, 2, "shadow hits are counted");
    // A shadow hit over its limit does not stop an enforced hit of the same request.
    let mixed = [
        hit(&key, 1, Unit::Minute, 1, Enforcement::Shadow),
        hit(
            &format!("{run}-beside"),
            5,
            Unit::Minute,
            1,
            Enforcement::Enforce,
        ),
    ];
    let d = strategy.check(&mixed, T0).await.expect("check");
    assert_eq!(
        (d[0].over_limit, d[1].over_limit, d[1].count),
        (true, false, 1)
    );
}

async fn quota_hits_reject_only_when_all_are_over(strategy: &impl SyncStrategy, run: &str) {
    let small = format!("{run}-quota-small");
    let large = format!("{run}-quota-large");
    let both = [
        hit(&small, 1, Unit::Minute, 1, Enforcement::Quota),
        hit(&large, 2, Unit::Minute, 1, Enforcement::Quota),
    ];
    assert_eq!(over(strategy, &both, T0).await, [false, false]);
    // The small quota is spent, the large one admits the request.
    assert_eq!(over(strategy, &both, T0).await, [true, false]);
    // Both spent: rejected.
    assert_eq!(over(strategy, &both, T0).await, [true, true]);
}

async fn reports_reset_time(strategy: &impl SyncStrategy, run: &str) {
    let batch = [
        hit(
            &format!("{run}-reset-m"),
            5,
            Unit::Minute,
            1,
            Enforcement::Enforce,
        ),
        hit(
            &format!("{run}-reset-h"),
            5,
            Unit::Hour,
            1,
            Enforcement::Enforce,
        ),
    ];
    let d = strategy.check(&batch, T0).await.expect("check");
    assert_eq!(d[0].until_reset, Duration::from_secs(40));
    assert_eq!(
        d[1].until_reset,
        Duration::from_secs(3_600 - T0.as_secs() % 3_600)
    );
}

async fn concurrent_requests_admit_exactly_the_limit<S: SyncStrategy>(strategy: Arc<S>, run: &str) {
    let key = format!("{run}-concurrent");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let strategy = strategy.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let batch = [hit(&key, 100, Unit::Hour, 1, Enforcement::Enforce)];
                let mut admitted = 0u32;
                for _ in 0..50 {
                    let d = strategy.check(&batch, T0).await.expect("check");
                    admitted += u32::from(!d[0].over_limit);
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += task.await.expect("task panicked");
    }
    assert_eq!(admitted, 100, "400 concurrent hits against a limit of 100");
}
