//! Memory per counter key at a million live keys, for short keys and for keys built from huge
//! descriptor values (which `counter_key` turns into a fixed-length digest). Prints bytes per
//! key measured as resident memory growth, with the allocator the server uses (mimalloc).
//!
//! ```sh
//! cargo bench --bench key_memory
//! ```

use hivemind::limiter::counter_key;
use hivemind::proto::DescriptorEntry;
use hivemind_core::{Enforcement, Hit, Limit, LocalCounters, Unit, UnixTime};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEYS: usize = 1_000_000;

/// Resident set size of this process, in bytes.
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm resident field");
    pages * 4096
}

/// Fills fresh counters with `KEYS` keys made by `value_of(i)` and reports bytes per key.
fn measure(what: &str, value_of: impl Fn(usize) -> String) {
    let counters = LocalCounters::new(KEYS * 2);
    let now = UnixTime::now();
    let before = resident_bytes();
    for i in 0..KEYS {
        let entries = [DescriptorEntry {
            key: "user".into(),
            value: value_of(i),
        }];
        let hit = Hit {
            key: counter_key("api", &entries, &[], Unit::Minute),
            limit: Limit {
                requests_per_unit: 100,
                unit: Unit::Minute,
            },
            addend: 1,
            enforcement: Enforcement::Enforce,
        };
        counters.check(std::slice::from_ref(&hit), now);
    }
    let after = resident_bytes();
    assert_eq!(counters.stats().live_keys, KEYS);
    println!(
        "{what}: {} live keys, {:.0} bytes per key (resident growth {:.1} MiB)",
        KEYS,
        (after.saturating_sub(before)) as f64 / KEYS as f64,
        (after.saturating_sub(before)) as f64 / (1 << 20) as f64
    );
}

/// The cases, each measured in a fresh process (freed memory is not returned to the OS, so
/// one process cannot measure several).
const CASES: [&str; 3] = ["short", "near-bound", "huge-values"];

fn main() {
    // `cargo test --benches` runs bench targets with `--bench`; stay quick there.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    match std::env::args().find_map(|a| a.strip_prefix("--case=").map(String::from)) {
        Some(case) => run_case(&case),
        None => {
            let me = std::env::current_exe().expect("current exe");
            for case in CASES {
                let status = std::process::Command::new(&me)
                    .arg(format!("--case={case}"))
                    .status()
                    .expect("run a case");
                assert!(status.success(), "case {case} failed");
            }
        }
    }
}

fn run_case(case: &str) {
    match case {
        "short" => measure("short keys (user id, ~20 bytes)", |i| format!("u{i}")),
        "near-bound" => measure("keys just under the digest bound (64 bytes)", |i| {
            format!("{i:0>44}")
        }),
        "huge-values" => {
            // Each value is 4 KiB: without the digest, a million of them would take 4 GiB.
            let padding = "x".repeat(4096);
            measure("4 KiB descriptor values (digested)", |i| {
                format!("{i}{padding}")
            })
        }
        other => panic!("unknown case {other}"),
    }
}
