//! Rules reader benchmark (criterion): load a large rules directory, 100 domain files of 100
//! descriptors each (10,000 descriptors), the way the server loads `rules.path` at start and on
//! every hot reload.
//!
//! - `rules/load_100_files_x_100_descriptors`: `RuleSet::load` on the directory (read, parse,
//!   validate, index);
//! - `rules/from_sources_100_files_x_100_descriptors`: the same texts already in memory.
//!
//! Before the measurements it prints, for one load, the bytes allocated in all and the peak of
//! live heap bytes (a counting allocator wraps the system one).
//!
//! Run: `cargo bench --bench rules_parse -- --warm-up-time 2 --measurement-time 5`.

// criterion's macros generate undocumented public items.
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{criterion_group, criterion_main, Criterion};
use hivemind::rules::RuleSet;

/// The system allocator, counting what goes through it.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
            TOTAL.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const FILES: usize = 100;
/// Per file: 25 top-level descriptors, each with 3 nested ones.
const TOP: usize = 25;
const NESTED: usize = 3;

/// One domain file in the styles real rules use: block maps, flow `rate_limit`s, comments,
/// wildcards, shadow mode, metadata, names and replaces.
fn domain_file(file: usize) -> String {
    let mut text = format!("# generated rules file {file}\ndomain: domain_{file}\ndescriptors:\n");
    for top in 0..TOP {
        let _ = writeln!(text, "  # descriptor group {top}");
        let _ = writeln!(text, "  - key: tenant_{top}");
        if top % 5 == 0 {
            let _ = writeln!(text, "    value: \"team-{top}-*\"");
            let _ = writeln!(text, "    share_threshold: true");
        }
        let _ = writeln!(
            text,
            "    rate_limit: {{ unit: minute, requests_per_unit: {} }}",
            100 + top
        );
        let _ = writeln!(text, "    descriptors:");
        for nested in 0..NESTED {
            let _ = writeln!(text, "      - key: user");
            let _ = writeln!(text, "        value: user_{nested}");
            if nested == 1 {
                let _ = writeln!(text, "        shadow_mode: true");
                let _ = writeln!(text, "        metadata: {{ owner: team_{top}, tier: 2 }}");
            }
            let _ = writeln!(text, "        rate_limit:");
            let _ = writeln!(text, "          name: limit_{top}_{nested}");
            let _ = writeln!(text, "          unit: hour");
            let _ = writeln!(text, "          requests_per_unit: {}", 1000 + nested);
            if nested == 2 {
                let _ = writeln!(text, "          replaces:");
                let _ = writeln!(text, "            - name: limit_{top}_0");
            }
        }
    }
    text
}

fn rules(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sources = Vec::with_capacity(FILES);
    for file in 0..FILES {
        let path = dir.path().join(format!("domain_{file:03}.yaml"));
        let text = domain_file(file);
        std::fs::write(&path, &text).expect("write rules file");
        sources.push((path.display().to_string(), text));
    }
    let bytes: usize = sources.iter().map(|(_, text)| text.len()).sum();

    let (total, peak) = (TOTAL.load(Ordering::Relaxed), LIVE.load(Ordering::Relaxed));
    PEAK.store(peak, Ordering::Relaxed);
    let set = RuleSet::load(dir.path()).expect("generated rules load");
    let allocated = TOTAL.load(Ordering::Relaxed) - total;
    let peak = PEAK.load(Ordering::Relaxed) - peak;
    let descriptors: usize = set.domains().map(|domain| domain.rules().count()).sum();
    assert_eq!(descriptors, FILES * TOP * (1 + NESTED));
    drop(set);
    println!(
        "rules_parse: {FILES} files, {descriptors} descriptors, {bytes} bytes of YAML; one load \
         allocates {allocated} bytes in all, peak {peak} live bytes above the start"
    );

    let mut group = c.benchmark_group("rules");
    group.sample_size(20);
    group.bench_function("load_100_files_x_100_descriptors", |b| {
        b.iter(|| black_box(RuleSet::load(black_box(dir.path())).expect("load")))
    });
    group.bench_function("from_sources_100_files_x_100_descriptors", |b| {
        b.iter(|| black_box(RuleSet::from_sources(black_box(&sources)).expect("parse")))
    });
    group.finish();
}

criterion_group!(benches, rules);
criterion_main!(benches);
