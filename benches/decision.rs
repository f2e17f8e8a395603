//! Micro-benchmarks of the decision path (criterion):
//!
//! - `counters/check_one`: one enforced hit on the lock-free local counters, uncontended;
//! - `counters/check_one_2_threads`: the same key hit from two threads at once (contended CAS);
//! - `counters/new_keys`: a stream of distinct keys (insert path, eviction at the cap);
//! - `limiter/decide_*`: the full handler without network: rules lookup, counter key, strategy,
//!   response; each also `_with_metrics`, recording Prometheus metrics as the server does.
//!
//! Before measuring, it prints the heap allocations one `decide` makes for each request shape
//! (the allocator is the server's, mimalloc, wrapped to count calls).
//!
//! Run: `cargo bench --bench decision`.

// criterion's macros generate undocumented public items.
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use hivemind::limiter::Limiter;
use hivemind::metrics::Metrics;
use hivemind::proto::{DescriptorEntry, RateLimitDescriptor, RateLimitRequest};
use hivemind::rules::RuleSet;
use hivemind::settings::ResponseSettings;
use hivemind_core::{
    Enforcement, Hit, Limit, LocalCounters, Standalone, SystemClock, Unit, UnixTime,
};

/// mimalloc (the server's allocator), counting allocation calls.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to mimalloc.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to mimalloc.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to mimalloc.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn hit(key: &str) -> Hit {
    Hit {
        key: key.to_owned(),
        limit: Limit {
            requests_per_unit: u32::MAX,
            unit: Unit::Hour,
        },
        addend: 1,
        enforcement: Enforcement::Enforce,
    }
}

fn counters(c: &mut Criterion) {
    let mut group = c.benchmark_group("counters");
    let now = UnixTime::now();

    let local = LocalCounters::new(1_000_000);
    let batch = [hit("bench|remote_address=10.0.0.1#hour")];
    group.bench_function("check_one", |b| {
        b.iter(|| black_box(local.check(black_box(&batch), now)))
    });

    let shared = Arc::new(LocalCounters::new(1_000_000));
    group.bench_function("check_one_2_threads", |b| {
        b.iter_custom(|iters| {
            // A second thread hammers the same key for the whole measurement.
            let stop = Arc::new(AtomicBool::new(false));
            let ready = Arc::new(Barrier::new(2));
            let other = {
                let (shared, stop, ready) = (shared.clone(), stop.clone(), ready.clone());
                std::thread::spawn(move || {
                    let batch = [hit("bench|contended#hour")];
                    ready.wait();
                    while !stop.load(Ordering::Relaxed) {
                        black_box(shared.check(&batch, now));
                    }
                })
            };
            let batch = [hit("bench|contended#hour")];
            ready.wait();
            let start = Instant::now();
            for _ in 0..iters {
                black_box(shared.check(black_box(&batch), now));
            }
            let elapsed = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            other.join().unwrap();
            elapsed
        })
    });

    let capped = LocalCounters::new(100_000);
    let mut i = 0u64;
    group.bench_function("new_keys_at_cap_100k", |b| {
        b.iter(|| {
            i += 1;
            let batch = [hit(&format!("bench|flood={i}#hour"))];
            black_box(capped.check(&batch, now))
        })
    });
    group.finish();
}

const RULES: &str = r#"
domain: bench
descriptors:
  - key: remote_address
    rate_limit: { unit: hour, requests_per_unit: 4000000000 }
  - key: tenant
    descriptors:
      - key: path
        value: /api/*/items
        rate_limit: { unit: hour, requests_per_unit: 4000000000 }
"#;

/// A request of one descriptor per entry list.
fn request(descriptors: &[&[(&str, &str)]]) -> RateLimitRequest {
    RateLimitRequest {
        domain: "bench".into(),
        descriptors: descriptors
            .iter()
            .map(|entries| RateLimitDescriptor {
                entries: entries
                    .iter()
                    .map(|(k, v)| DescriptorEntry {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        hits_addend: 1,
    }
}

fn limiter(c: &mut Criterion) {
    let mut group = c.benchmark_group("limiter");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let rules = RuleSet::from_sources(&[("bench.yaml".into(), RULES.into())]).unwrap();
    let counters = Arc::new(LocalCounters::new(1_000_000));
    let strategy = Arc::new(Standalone::new(
        counters,
        Arc::new(SystemClock),
        Duration::from_secs(1),
    ));
    let store = Arc::new(ArcSwap::from_pointee(rules));
    let limiter = Limiter::new(
        store.clone(),
        strategy.clone(),
        Arc::new(SystemClock),
        ResponseSettings::default(),
    );
    // The same, recording Prometheus metrics as the server does: the metrics' cost per call.
    let measured = Limiter::new(
        store,
        strategy,
        Arc::new(SystemClock),
        ResponseSettings::default(),
    )
    .with_metrics(Arc::new(Metrics::new(0.8)));
    let shapes = [
        (
            "decide_one_descriptor",
            request(&[&[("remote_address", "10.0.0.1")]]),
        ),
        (
            "decide_nested_wildcard",
            request(&[&[("tenant", "acme"), ("path", "/api/v1/items")]]),
        ),
        // What an Envoy route with several rate limit actions sends: two limited descriptors and
        // one no rule matches.
        (
            "decide_three_descriptors",
            request(&[
                &[("remote_address", "10.0.0.1")],
                &[("tenant", "acme"), ("path", "/api/v1/items")],
                &[("user_agent", "curl/8.0")],
            ]),
        ),
    ];
    for (name, request) in &shapes {
        runtime.block_on(limiter.decide(request)).unwrap();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let response = runtime.block_on(limiter.decide(request)).unwrap();
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        drop(response);
        println!("limiter/{name}: {allocations} heap allocations per decide");
    }
    for (name, request) in &shapes {
        group.bench_function(*name, |b| {
            b.iter(|| {
                runtime
                    .block_on(limiter.decide(black_box(request)))
                    .unwrap()
            })
        });
        group.bench_function(format!("{name}_with_metrics"), |b| {
            b.iter(|| {
                runtime
                    .block_on(measured.decide(black_box(request)))
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, counters, limiter);
criterion_main!(benches);
