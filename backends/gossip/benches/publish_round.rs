//! The gossip publisher at a million live keys (criterion, plus a printed latency report):
//!
//! - `publisher/round_1k_changed_of_1m`: one [`Publisher::round`] over 1,000,000 live keys of
//!   which 1,000 changed since the last round (each changed key turns hot, so it is published
//!   and then republished unchanged for a few rounds, as in production);
//! - `writer latency`: a writer's per-hit time (p50/p99/p99.9/max over 200,000 hits, 1 % of them
//!   new keys, paced at about 100,000 hits/s) while a publisher thread runs a round every 25 ms,
//!   with the publisher's mean round time and CPU per second (rounds × round time).
//!
//! Run: `cargo bench -p hivemind-gossip --bench publish_round`.

// criterion's macros generate undocumented public items.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion};
use hivemind_core::{Enforcement, Hit, Limit, LocalCounters, Unit, UnixTime};
use hivemind_gossip::publish::Publisher;
use hivemind_gossip::view::PeerView;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEYS: usize = 1_000_000;
const CHANGED_PER_ROUND: usize = 1_000;
/// The per-round budget (large enough that nothing waits: the bench measures the scan).
const BUDGET: usize = 10_000;
const NODES: usize = 3;
const ROUND: Duration = Duration::from_millis(25);

/// The start of an hour, so hour windows last the whole run.
fn start() -> UnixTime {
    let now = UnixTime::now().as_secs();
    UnixTime::from_secs(now - now % 3_600)
}

fn key(i: usize) -> String {
    format!("api|user=u{i}#hour")
}

fn hit(key: String, limit: u32, enforcement: Enforcement) -> Hit {
    Hit {
        key,
        limit: Limit {
            requests_per_unit: limit,
            unit: Unit::Hour,
        },
        addend: 1,
        enforcement,
    }
}

/// A million live cold keys (1 hit of a limit of 7: cold, but a significant change on 3 nodes),
/// all published once by the publisher returned, so none is changed (no refresh falls due).
fn filled(now: UnixTime) -> (LocalCounters, PeerView, Publisher) {
    let counters = LocalCounters::new(KEYS * 4);
    for i in 0..KEYS {
        counters.check(&[hit(key(i), 7, Enforcement::Enforce)], now);
    }
    assert_eq!(counters.stats().live_keys, KEYS);
    let view = PeerView::default();
    let mut publisher = Publisher::new();
    let first = publisher.round(&counters, &view, now, usize::MAX, NODES);
    assert_eq!(first.sets.len(), KEYS);
    (counters, view, publisher)
}

fn round(c: &mut Criterion) {
    let t0 = start();
    let (counters, view, mut publisher) = filled(t0);
    let mut group = c.benchmark_group("publisher");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(8));
    let mut now = t0;
    let mut next = 0usize;
    let counters = &counters;
    group.bench_function("round_1k_changed_of_1m", |b| {
        b.iter_batched(
            || {
                // 1,000 keys spread over the key space change: a shadow hit with a limit of 4
                // takes each past half its limit (hot), so it is published.
                for _ in 0..CHANGED_PER_ROUND {
                    next = (next + 7_919) % KEYS;
                    counters.check(&[hit(key(next), 4, Enforcement::Shadow)], now);
                }
                now = now.plus(ROUND);
                now
            },
            |at| black_box(publisher.round(counters, &view, at, BUDGET, NODES)),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Per-hit latency of a writer while a publisher thread runs rounds every 25 ms.
fn writer_latency() {
    const HITS: usize = 200_000;
    const PACE_EVERY: usize = 100;
    /// 100 hits per millisecond.
    const PACE: Duration = Duration::from_millis(1);
    let t0 = start();
    let (counters, view, mut publisher) = filled(t0);
    let counters = Arc::new(counters);
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let clock = move || t0.plus(began.elapsed());
    let publisher_thread = {
        let (counters, stop) = (counters.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u32;
            let mut busy = Duration::ZERO;
            let mut worst = Duration::ZERO;
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                black_box(publisher.round(&counters, &view, clock(), BUDGET, NODES));
                let took = at.elapsed();
                busy += took;
                worst = worst.max(took);
                rounds += 1;
                next += ROUND;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                } else {
                    next = Instant::now();
                }
            }
            (rounds, busy, worst)
        })
    };
    // Let the publisher start its cadence.
    std::thread::sleep(Duration::from_millis(100));
    let mut times = Vec::with_capacity(HITS);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let writer_start = Instant::now();
    for i in 0..HITS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let batch = if i % 100 == 99 {
            [hit(key(KEYS + i), 1_000_000, Enforcement::Enforce)]
        } else {
            [hit(
                key(rng as usize % KEYS),
                1_000_000,
                Enforcement::Enforce,
            )]
        };
        let now = clock();
        let at = Instant::now();
        black_box(counters.check(&batch, now));
        times.push(at.elapsed());
        if i % PACE_EVERY == PACE_EVERY - 1 {
            let due = writer_start + PACE * (i / PACE_EVERY + 1) as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        if writer_start.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let wall = writer_start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (rounds, busy, worst) = publisher_thread.join().expect("publisher thread");
    times.sort_unstable();
    let mean_round = busy / rounds.max(1);
    println!(
        "writer latency with a publisher every 25 ms over {KEYS} keys: {} hits in {:.2} s, \
         p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        times.len(),
        wall.as_secs_f64(),
        percentile(&times, 0.50),
        percentile(&times, 0.99),
        percentile(&times, 0.999),
        times[times.len() - 1],
    );
    println!(
        "publisher during the run: {rounds} rounds, mean {mean_round:?}, worst {worst:?}, \
         busy {:.1} % of one core (rounds × round time / wall)",
        100.0 * busy.as_secs_f64() / (wall + Duration::from_millis(100)).as_secs_f64(),
    );
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench`; stay quick there.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    round(&mut c);
    c.final_summary();
    writer_latency();
}
