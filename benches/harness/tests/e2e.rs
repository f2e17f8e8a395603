//! End to end: real `hivemind` processes, real gRPC clients, the real measurement.
//!
//! `CARGO_BIN_EXE_hivemind` only exists inside the server's own package, so these tests run
//! the server binary cargo built beside them: `target/debug/hivemind` of the same target
//! directory, which `cargo test --workspace` (and so `test/run`) builds before any test runs,
//! because the server's own tests need it. `HIVEMIND_BIN` names another one. A test never runs
//! cargo itself; a missing binary fails with the command that builds it.
//!
//! The two runs prove the measurement both ways: one standalone node is an exact limiter, so
//! the clients must see no overshoot and no false rejection; two standalone nodes each enforce
//! the whole limit, so the clients must see the cluster admit twice the limit (overshoot ≈ 100 %).
//! Each run lasts about 3–4 s (1 s windows: the partial one, then 3 measured). The smoke test
//! runs the `hivemind-harness` binary on `benches/scenarios/quick.yaml` shrunk to one node per
//! strategy and one measured window, and checks that the JSON, markdown and SVGs carry every
//! figure for every strategy (it needs Debian's `redis-server` for the redis strategy).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use hivemind_core::Unit;
use hivemind_harness::cluster::{Cluster, ClusterSpec};
use hivemind_harness::{Experiment, Strategy};

/// The server binary under test: `$HIVEMIND_BIN`, or `hivemind` in the target directory this
/// test executable runs from (`target/debug/deps/e2e-…` → `target/debug/hivemind`).
fn hivemind() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let binary = std::env::var_os("HIVEMIND_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let exe = std::env::current_exe().expect("test executable path");
                    let profile_dir = exe.parent().and_then(|deps| deps.parent());
                    profile_dir
                        .expect("test executable under target/<profile>/deps")
                        .join(format!("hivemind{}", std::env::consts::EXE_SUFFIX))
                });
            assert!(
                binary.is_file(),
                "no server binary at {}: run the tests with `cargo test --workspace` (or \
                 test/run), which builds it, or `cargo build -p hivemind` first, or set \
                 HIVEMIND_BIN",
                binary.display()
            );
            binary
        })
        .clone()
}

/// Starts `spec`'s cluster off the async threads ([`Cluster::start`] blocks while the nodes
/// start).
async fn try_start(spec: ClusterSpec) -> Result<Cluster, hivemind_harness::ClusterError> {
    tokio::task::spawn_blocking(move || Cluster::start(&spec))
        .await
        .expect("the start task panicked")
}

/// [`try_start`], failing the test if the cluster does not start.
async fn start(spec: ClusterSpec) -> Cluster {
    try_start(spec).await.expect("start")
}

fn experiment(nodes: usize, limit: u64, load: f64) -> Experiment {
    let mut e = Experiment::new(hivemind(), Strategy::Standalone, nodes, limit, Unit::Second);
    e.load = load;
    e.windows = 3;
    e.warmup_windows = 0;
    e.clients_per_node = 2;
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_standalone_node_is_exact() {
    let report = experiment(1, 50, 2.0).run().await.expect("run");
    println!("{}", report.to_markdown());
    let s = &report.summary;
    assert_eq!(report.windows.len(), 3);
    assert_eq!(s.errors, 0);
    for w in &report.windows {
        assert_eq!(w.overshoot, 0, "{w:?}");
        assert_eq!(w.false_rejections, 0, "{w:?}");
        // The load was offered: about 100 calls a window, every window filled to its limit
        // (up to calls straddling a boundary, whose window is uncertain).
        assert!((90..=110).contains(&w.offered), "{w:?}");
        assert!(
            w.admitted <= 50 && w.admitted + w.ambiguous_admitted >= 50,
            "{w:?}"
        );
    }
    assert_eq!(s.overshoot_worst_pct, 0.0);
    assert_eq!(s.false_rejection_pct, 0.0);
    assert!(s.latency.count > 250 && s.latency.p50_us > 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_standalone_nodes_overshoot_by_the_limit() {
    // 3× the limit spread over 2 nodes: each node sees 1.5× the limit, admits the full limit
    // itself, so the cluster admits 2× the limit and the overshoot is 100 % of the limit.
    let report = experiment(2, 50, 3.0).run().await.expect("run");
    println!("{}", report.to_markdown());
    let s = &report.summary;
    assert_eq!(report.windows.len(), 3);
    for w in &report.windows {
        assert!((45..=50).contains(&w.overshoot), "{w:?}");
        assert!(w.overshoot_upper >= 50, "{w:?}");
        assert_eq!(w.false_rejections, 0, "{w:?}");
    }
    assert!(
        (90.0..=100.0).contains(&s.overshoot_mean_pct),
        "mean overshoot {} %",
        s.overshoot_mean_pct
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_report_their_addresses_and_can_be_killed() {
    let spec = ClusterSpec::new(
        hivemind(),
        Strategy::Standalone,
        2,
        hivemind_harness::bench_rules(10, Unit::Second),
    );
    let mut cluster = start(spec).await;
    cluster
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");
    let addrs = cluster.grpc_addrs();
    assert_eq!(addrs.len(), 2);
    assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() != 0));
    assert!(cluster.node(1).unwrap().rules_path().is_file());

    cluster.kill(1).expect("kill");
    assert!(cluster.node(1).unwrap().is_killed());
    assert_eq!(cluster.live().count(), 1);
    assert!(cluster.exited().is_empty(), "a killed node is not a crash");
    cluster
        .wait_ready(Duration::from_secs(5))
        .await
        .expect("the survivor stays ready");
    assert!(cluster.kill(2).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_bad_rules_fails_fast_with_its_stderr() {
    // The server prints its listening line before it reads the rules, then exits 1: the
    // readiness wait must notice the exit at once rather than wait out its timeout.
    let spec = ClusterSpec::new(
        hivemind(),
        Strategy::Standalone,
        1,
        "domain: bench\ndescriptors:\n  - key: generic_key\n    bogus: 1\n",
    );
    let started = std::time::Instant::now();
    let result = async {
        let mut cluster = try_start(spec).await?;
        cluster.wait_ready(Duration::from_secs(20)).await
    }
    .await;
    let text = result
        .expect_err("bad rules must not become ready")
        .to_string();
    assert!(
        text.contains("bogus"),
        "stderr should name the bad key: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_node_that_cannot_parse_its_flags_fails_to_start_with_its_stderr() {
    let mut spec = ClusterSpec::new(
        hivemind(),
        Strategy::Standalone,
        1,
        hivemind_harness::bench_rules(10, Unit::Second),
    );
    spec.args = vec!["--no-such-flag".into()];
    let text = Cluster::start(&spec)
        .expect_err("must not start")
        .to_string();
    assert!(text.contains("did not start"), "{text}");
    assert!(text.contains("--no-such-flag"), "{text}");
}

#[test]
fn the_overshoot_binary_prints_the_table_and_writes_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_overshoot"))
        .args(["--nodes", "1", "--strategy", Strategy::Standalone.as_str()])
        .args(["--limit", "20"])
        .args(["--load", "2", "--windows", "1", "--warmup", "0"])
        .args(["--clients-per-node", "1", "--env", "RUST_LOG=warn"])
        .arg("--binary")
        .arg(hivemind())
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run overshoot");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("| overshoot mean | 0.00 % |"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).unwrap();
    assert_eq!(report["summary"]["windows"], 1);
    assert_eq!(report["run"]["env"][0][0], "RUST_LOG");
    assert_eq!(report["windows"][0]["overshoot"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gossip_cluster_forms_and_reports_its_mesh_addresses() {
    let mut spec = ClusterSpec::new(
        hivemind(),
        Strategy::Gossip,
        3,
        hivemind_harness::bench_rules(10, Unit::Second),
    );
    spec.env = vec![("HIVEMIND_MESH__GOSSIP_INTERVAL".into(), "100ms".into())];
    let mut cluster = start(spec).await;
    cluster
        .wait_formed(Duration::from_secs(15))
        .await
        .expect("every node sees the two others");
    let mut mesh: Vec<_> = cluster.live().map(|n| n.mesh.expect("mesh addr")).collect();
    mesh.sort();
    mesh.dedup();
    assert_eq!(mesh.len(), 3);
}

/// The figures every strategy's result must carry (`figures.*` in the JSON).
const FIGURES: &[&str] = &[
    "overshoot_mean_pct",
    "overshoot_worst_pct",
    "overshoot_upper_worst_pct",
    "false_rejection_pct",
    "offered_rps",
    "decided_rps",
    "errors",
    "skipped",
];

#[test]
fn the_quick_scenario_runs_every_strategy_and_writes_every_figure() {
    // The quick preset, shrunk: 1 node per strategy, 1 measured window, 1 s of max throughput.
    let out = tempfile::tempdir().expect("tempdir");
    let scenario = hivemind_harness::cluster::workspace_root().join("benches/scenarios/quick.yaml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hivemind-harness"))
        .arg("run")
        .arg(&scenario)
        .args(["--nodes", "1", "--windows", "1", "--warmup", "0"])
        .args(["--max-throughput-secs", "1"])
        .arg("--binary")
        .arg(hivemind())
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run hivemind-harness");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");

    let dir = out.path().join("quick");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("results.json")).expect("results.json"),
    )
    .expect("valid JSON");
    let results = json["results"].as_array().expect("results");
    let labels: Vec<&str> = results
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    let names = [Strategy::Standalone, Strategy::Gossip, Strategy::Redis].map(Strategy::as_str);
    assert_eq!(labels, names);
    for r in results {
        let label = r["label"].as_str().unwrap();
        assert_eq!(r["nodes"], 1, "{label}");
        let f = &r["figures"];
        for figure in FIGURES {
            assert!(!f[figure].is_null(), "{label}: no {figure}: {f}");
        }
        for latency in ["latency", "round_trip"] {
            for p in ["p50_us", "p99_us", "p999_us"] {
                assert!(
                    f[latency][p].as_u64().is_some_and(|v| v > 0),
                    "{label}: {latency}.{p}: {f}"
                );
            }
        }
        assert!(f["offered_rps"].as_f64().unwrap() > 0.0, "{label}: {f}");
        let t = &r["max_throughput"];
        assert!(
            t["decided_rps"].as_f64().is_some_and(|v| v > 0.0),
            "{label}: {t}"
        );
        assert!(t["latency"]["p99_us"].as_u64().is_some(), "{label}: {t}");
        // Gossip traffic is known for gossip only (a 1-node mesh may send nothing: 0 is a value).
        let bytes = &r["gossip_bytes_per_node_per_s"];
        assert_eq!(
            bytes.is_number(),
            label == Strategy::Gossip.as_str(),
            "{label}: {bytes}"
        );
        assert!(r.get("convergence_after_start_s").is_some(), "{label}");
        assert!(!r["series"].as_array().unwrap().is_empty(), "{label}");
        let cdf = r["latency_cdf"].as_array().unwrap();
        assert_eq!(cdf.last().unwrap()[1], 1.0, "{label}: {cdf:?}");
        // One standalone node is an exact limiter, seen through the same pipeline.
        if label == Strategy::Standalone.as_str() {
            assert_eq!(f["overshoot_worst_pct"], 0.0, "{f}");
        }
    }
    for svg in ["admitted.svg", "latency-cdf.svg"] {
        let text = std::fs::read_to_string(dir.join(svg)).unwrap_or_else(|e| panic!("{svg}: {e}"));
        assert!(text.starts_with("<svg"), "{svg}");
        for label in &labels {
            assert!(text.contains(label), "{svg} has no line for {label}");
        }
    }
    let md = std::fs::read_to_string(dir.join("results.md")).expect("results.md");
    for label in &labels {
        assert!(md.contains(&format!("| {label} | 1 |")), "{md}");
        assert!(stdout.contains(&format!("| {label} | 1 |")), "{stdout}");
    }
}

/// The max-throughput client counts every answer for what it is: against one standalone node
/// with a limit of 500 per hour, exactly 500 calls are admitted and every other one is over
/// the limit, none is an error, and each decided call has its round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_closed_loop_client_counts_admitted_and_over_limit_exactly() {
    use hivemind_harness::closed_loop::{self, ClosedLoop};
    let spec = ClusterSpec::new(
        hivemind(),
        Strategy::Standalone,
        1,
        hivemind_harness::bench_rules(500, Unit::Hour),
    );
    let mut cluster = start(spec).await;
    cluster
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");
    let workload = hivemind_harness::Workload::new(
        hivemind_harness::experiment::DOMAIN,
        vec![(
            hivemind_harness::experiment::KEY.into(),
            hivemind_harness::experiment::VALUE.into(),
        )],
        1.0,
        Duration::from_secs(1),
    );
    let load = ClosedLoop {
        requests: workload.requests(),
        keys: None,
        connections_per_target: 2,
        in_flight: 4,
        duration: Duration::from_secs(1),
        max_calls_per_stream: 2_000,
        request_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(5),
        seed: 1,
    };
    let tally = closed_loop::run(&load, &cluster.grpc_addrs())
        .await
        .expect("closed-loop run");
    assert_eq!(tally.admitted, 500, "{tally:?}");
    assert!(tally.rejected > 0, "{tally:?}");
    assert_eq!(tally.error_total(), 0, "{tally:?}");
    assert_eq!(tally.latency_us.len(), tally.decided());
    assert!(tally.decided() <= 2 * 4 * 2_000);
}
