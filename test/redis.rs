//! The redis strategy as users run it: real `hivemind` processes (`--strategy redis`) on real
//! `redis-server` processes started by each test (hivemind-testkit), driven over gRPC with
//! bounded concurrent load.
//!
//! - two processes sharing one Redis admit exactly the limit under ≥ 50 concurrent calls, for
//!   single- and multi-descriptor requests; each request is one Redis command
//!   (`INFO commandstats`);
//! - Redis killed mid-load then restarted, once per failure policy: each answers as specified,
//!   no call outlasts the timeout plus a margin, and traffic goes back to Redis;
//! - a hivemind started before its Redis follows its policy, then uses Redis;
//! - a real three-node Redis Cluster: limits hold across slots, multi-descriptor requests work.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hivemind::proto::{
    Code, DescriptorEntry, RateLimitDescriptor, RateLimitRequest, RateLimitServiceClient,
};
use hivemind_testkit::{RedisCluster, RedisServer, Strategy};
use support::{http_get, Server};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

const RULES: &str = r#"
domain: rl
descriptors:
  - key: k
    rate_limit: { unit: hour, requests_per_unit: 100 }
  - key: small
    rate_limit: { unit: hour, requests_per_unit: 40 }
  - key: big
    rate_limit: { unit: hour, requests_per_unit: 1000 }
  - key: local
    rate_limit: { unit: hour, requests_per_unit: 10 }
"#;

/// A settings file for `--strategy redis` with these `redis:` lines, in a temp dir kept with
/// the returned handle.
fn settings_file(redis_lines: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hivemind.yaml");
    std::fs::write(&path, format!("strategy: redis\nredis:\n{redis_lines}")).expect("write");
    (dir, path)
}

/// A hivemind on `RULES` with `redis:` settings `lines`.
fn node(lines: &str) -> (Server, tempfile::TempDir) {
    let (dir, path) = settings_file(lines);
    let path = path.to_str().expect("utf-8").to_owned();
    (
        Server::with_rules(RULES, &["--settings", path.as_str()]),
        dir,
    )
}

fn request(descriptors: &[(&str, &str)]) -> RateLimitRequest {
    RateLimitRequest {
        domain: "rl".into(),
        descriptors: descriptors
            .iter()
            .map(|(k, v)| RateLimitDescriptor {
                entries: vec![DescriptorEntry {
                    key: (*k).into(),
                    value: (*v).into(),
                }],
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    }
}

async fn client(addr: SocketAddr) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to hivemind")
}

/// What a batch of calls got back.
#[derive(Debug, Default, Clone)]
struct Outcomes {
    ok: usize,
    over: usize,
    unavailable: usize,
    other: Vec<String>,
    slowest: Duration,
}

/// `calls` calls of `request`, `concurrency` at a time, spread over `servers` round-robin;
/// bounded by a 60 s deadline.
async fn blast(
    servers: &[SocketAddr],
    concurrency: usize,
    calls: usize,
    request: RateLimitRequest,
) -> Outcomes {
    let mut clients = Vec::new();
    for addr in servers {
        clients.push(client(*addr).await);
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let request = request.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut out = Outcomes::default();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                    let start = Instant::now();
                    let answer = client.should_rate_limit(request.clone()).await;
                    out.slowest = out.slowest.max(start.elapsed());
                    match answer {
                        Ok(r) if r.get_ref().overall_code == Code::Ok as i32 => out.ok += 1,
                        Ok(r) if r.get_ref().overall_code == Code::OverLimit as i32 => {
                            out.over += 1
                        }
                        Ok(r) => out.other.push(format!("{:?}", r.get_ref())),
                        Err(s) if s.code() == tonic::Code::Unavailable => out.unavailable += 1,
                        Err(s) => out.other.push(s.to_string()),
                    }
                }
                out
            })
        })
        .collect();
    let mut total = Outcomes::default();
    let all = async {
        for task in tasks {
            let out = task.await.expect("load task");
            total.ok += out.ok;
            total.over += out.over;
            total.unavailable += out.unavailable;
            total.other.extend(out.other);
            total.slowest = total.slowest.max(out.slowest);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("load finished within 60 s");
    total
}

/// Waits for the next hour if fewer than 30 s of this one are left, so one test's counts never
/// straddle a window boundary.
fn settle_in_hour() {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 3600;
    if secs >= 3570 {
        std::thread::sleep(Duration::from_secs(3601 - secs));
    }
}

fn stats(server: &Server) -> serde_json::Value {
    let r = http_get(server.admin_addr, "/stats").expect("GET /stats");
    serde_json::from_str(&r.body).expect("stats json")
}

async fn wait_for(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The rate limit service's `grpc.health.v1` status at `addr`.
async fn grpc_health(addr: SocketAddr) -> i32 {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect for health");
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "envoy.service.ratelimit.v3.RateLimitService".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

/// Waits (at most `limit`, polling) until gRPC health at `addr` reports `status`.
async fn wait_for_grpc_health(addr: SocketAddr, status: ServingStatus, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = grpc_health(addr).await;
        if now == status as i32 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "grpc health still {now} after {limit:?}, expected {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn url_lines(redis: &RedisServer, extra: &str) -> String {
    format!("  url: {}\n  timeout: 1s\n{extra}", redis.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_redis_admit_exactly_the_limit() {
    settle_in_hour();
    let redis = RedisServer::start();
    let (a, _da) = node(&url_lines(&redis, ""));
    let (b, _db) = node(&url_lines(&redis, ""));
    let both = [a.grpc_addr, b.grpc_addr];

    // One descriptor, limit 100: 300 calls, 64 at a time, over both nodes.
    let out = blast(&both, 64, 300, request(&[("k", "one")])).await;
    assert!(out.other.is_empty(), "{:?}", out.other);
    assert_eq!(
        (out.ok, out.over, out.unavailable),
        (100, 200, 0),
        "exactly the limit is admitted"
    );

    // Two descriptors per request, limits 40 and 1000: 40 admitted, and the rejected
    // requests consumed nothing of the roomy descriptor.
    let out = blast(&both, 64, 200, request(&[("big", "x"), ("small", "x")])).await;
    assert!(out.other.is_empty(), "{:?}", out.other);
    assert_eq!((out.ok, out.over), (40, 160), "multi-descriptor exactness");
    let mut c = client(a.grpc_addr).await;
    let r = c
        .should_rate_limit(request(&[("big", "x")]))
        .await
        .expect("call")
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 1000 - 41);

    let s = stats(&a);
    assert_eq!(s["strategy"], "redis", "{s}");
    assert_eq!(s["backend"]["state"], "up", "{s}");
    let health = http_get(a.admin_addr, "/healthcheck").unwrap();
    assert_eq!(health.status, 200);
    assert!(health.body.contains("redis: up"), "{}", health.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_one_redis_round_trip() {
    let redis = RedisServer::start();
    // The cache off: every call must reach Redis.
    let (a, _d) = node(&url_lines(&redis, "  over_limit_cache: false\n"));
    let mut c = client(a.grpc_addr).await;
    // The first call loads the script (EVALSHA answers NOSCRIPT, then EVAL).
    c.should_rate_limit(request(&[("k", "warm")]))
        .await
        .expect("warm-up call");
    redis.query(&["CONFIG", "RESETSTAT"]);
    let calls = 200;
    let out = blast(
        &[a.grpc_addr],
        50,
        calls,
        request(&[("big", "rt"), ("small", "rt"), ("k", "rt")]),
    )
    .await;
    assert_eq!(out.ok + out.over, calls, "{out:?}");
    let info = redis.query(&["INFO", "commandstats"]);
    assert_eq!(
        redis.command_calls("evalsha"),
        calls as u64,
        "one EVALSHA per request\n{info}"
    );
    // commandstats also counts the commands the script runs inside Redis (GET, INCRBY,
    // PEXPIRE); nothing else may come from the client.
    let from_client: Vec<&str> = info
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .map(|l| &l[..l.find(':').unwrap_or(l.len())])
        .filter(|name| !["evalsha", "get", "incrby", "pexpire", "info"].contains(name))
        .filter(|name| !name.starts_with("config"))
        .collect();
    assert!(
        from_client.is_empty(),
        "other commands sent: {from_client:?}\n{info}"
    );
    assert_eq!(redis.command_calls("get"), 3 * calls as u64, "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_over_limit_cache_answers_without_redis() {
    let redis = RedisServer::start();
    let (a, _d) = node(&url_lines(&redis, ""));
    let out = blast(&[a.grpc_addr], 10, 200, request(&[("small", "cached")])).await;
    assert_eq!((out.ok, out.over), (40, 160));
    let s = stats(&a);
    let hits = s["backend"]["over_limit_cache"]["hits"].as_u64().unwrap();
    // Calls in flight when the key filled went to Redis; the rest were answered locally.
    assert!(hits >= 100, "cache hits {hits}: {s}");
    let script_calls = s["backend"]["script_calls"].as_u64().unwrap();
    assert_eq!(
        script_calls + hits,
        200,
        "every call not answered by the cache made a script call"
    );
    assert!(redis.command_calls("evalsha") <= script_calls, "{s}");
}

/// What a policy answers while Redis is down.
#[derive(Debug, Clone, Copy)]
enum Expect {
    AllOk,
    AllOver,
    AllUnavailable,
    /// A fresh key admits this many (the limit divided by expected_nodes).
    LocalLimit(usize),
}

async fn outage(policy: &str, expect: Expect) {
    settle_in_hour();
    let mut redis = RedisServer::start();
    let timeout = Duration::from_millis(100);
    let (a, _d) = node(&format!(
        "  url: {}\n  timeout: 100ms\n  on_failure: {policy}\n  expected_nodes: 2\n  \
         reconnect_max_backoff: 200ms\n",
        redis.url()
    ));
    let addr = a.grpc_addr;
    let margin = Duration::from_secs(1);

    // Load running while Redis is killed: every call answers within the timeout + margin.
    let load =
        tokio::spawn(async move { blast(&[addr], 50, 3000, request(&[("big", "during")])).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    redis.kill();
    let during = load.await.expect("load");
    assert!(
        during.slowest < timeout + margin,
        "{policy}: slowest call {:?}",
        during.slowest
    );
    assert!(during.other.is_empty(), "{policy}: {:?}", during.other);

    // Down now: the policy answers, health says so once.
    wait_for(Duration::from_secs(5), "reported down", || {
        stats(&a)["backend"]["state"] == "down"
    })
    .await;
    let health = http_get(a.admin_addr, "/healthcheck").unwrap();
    assert!(
        health.body.contains("redis: unreachable") && health.body.contains(policy),
        "{}",
        health.body
    );
    assert_eq!(
        health.status,
        if policy == "error" { 503 } else { 200 },
        "{}",
        health.body
    );
    // gRPC health follows: NOT_SERVING only when the strategy cannot decide at all.
    let expected = if policy == "error" {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    };
    wait_for_grpc_health(addr, expected, Duration::from_secs(5)).await;
    let out = blast(&[addr], 50, 60, request(&[("local", "down")])).await;
    assert!(
        out.slowest < timeout + margin,
        "{policy}: {:?}",
        out.slowest
    );
    match expect {
        Expect::AllOk => assert_eq!(out.ok, 60, "{policy}: {out:?}"),
        Expect::AllOver => assert_eq!(out.over, 60, "{policy}: {out:?}"),
        Expect::AllUnavailable => assert_eq!(out.unavailable, 60, "{policy}: {out:?}"),
        Expect::LocalLimit(n) => assert_eq!((out.ok, out.over), (n, 60 - n), "{policy}"),
    }
    let logs = a.stderr();
    assert_eq!(
        logs.matches("answering by the failure policy").count(),
        1,
        "{policy}: the transition is logged once\n{logs}"
    );

    // Redis back: traffic returns to it (counted there, exact again).
    redis.restart();
    wait_for(Duration::from_secs(10), "back up", || {
        stats(&a)["backend"]["state"] == "up"
    })
    .await;
    wait_for_grpc_health(addr, ServingStatus::Serving, Duration::from_secs(5)).await;
    let out = blast(&[addr], 50, 150, request(&[("k", "after")])).await;
    assert_eq!((out.ok, out.over), (100, 50), "{policy}: exact again");
    assert!(redis.command_calls("evalsha") + redis.command_calls("eval") >= 100);
    let logs = a.stderr();
    assert_eq!(logs.matches("redis reachable again").count(), 1, "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_with_policy_allow_admits() {
    outage("allow", Expect::AllOk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_with_policy_deny_rejects() {
    outage("deny", Expect::AllOver).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_with_policy_error_is_unavailable() {
    outage("error", Expect::AllUnavailable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_with_policy_local_counts_a_share_locally() {
    // limit 10, expected_nodes 2: 5 per node while Redis is down.
    outage("local", Expect::LocalLimit(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_before_redis_follows_the_policy_then_uses_redis() {
    let port = hivemind_testkit::free_port();
    let (a, _d) = node(&format!(
        "  url: redis://127.0.0.1:{port}\n  timeout: 1s\n  on_failure: deny\n  \
         reconnect_max_backoff: 200ms\n"
    ));
    let out = blast(&[a.grpc_addr], 5, 10, request(&[("k", "early")])).await;
    assert_eq!(out.over, 10, "deny while Redis is absent: {out:?}");
    let redis = RedisServer::start_on(port);
    wait_for(Duration::from_secs(10), "redis found", || {
        stats(&a)["backend"]["state"] == "up"
    })
    .await;
    let out = blast(&[a.grpc_addr], 5, 10, request(&[("k", "early")])).await;
    assert_eq!(out.ok, 10, "{out:?}");
    assert!(redis.command_calls("evalsha") + redis.command_calls("eval") >= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_holds_limits_across_slots() {
    settle_in_hour();
    let cluster = RedisCluster::start(3);
    let nodes = cluster.urls().join(",");
    // Several domains: the domain is the hash tag, so their keys land in different slots.
    let dir = tempfile::tempdir().unwrap();
    let domains = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];
    for d in domains {
        std::fs::write(
            dir.path().join(format!("{d}.yaml")),
            format!(
                "domain: {d}\ndescriptors:\n  - key: k\n    rate_limit: {{ unit: hour, \
                 requests_per_unit: 30 }}\n  - key: big\n    rate_limit: {{ unit: hour, \
                 requests_per_unit: 1000 }}\n"
            ),
        )
        .unwrap();
    }
    let rules = dir.path().to_str().unwrap().to_owned();
    // A generous call timeout: the machine is shared; this test is about exactness.
    let (_settings_dir, settings) = settings_file("  timeout: 1s\n");
    let settings = settings.to_str().unwrap().to_owned();
    let args = [
        "-c",
        rules.as_str(),
        "--settings",
        settings.as_str(),
        "--strategy",
        Strategy::Redis.as_str(),
        "--redis-cluster-nodes",
        nodes.as_str(),
    ];
    let a = Server::start(&args);
    let b = Server::start(&args);
    for d in domains {
        let mut req = request(&[("k", "v"), ("big", "v")]);
        req.domain = d.into();
        let out = blast(&[a.grpc_addr, b.grpc_addr], 50, 90, req).await;
        assert!(out.other.is_empty(), "{d}: {:?}", out.other);
        assert_eq!((out.ok, out.over), (30, 60), "{d}: exact on the cluster");
    }
    let holding = cluster
        .nodes
        .iter()
        .filter(|n| n.query(&["DBSIZE"]) != "0")
        .count();
    assert!(holding >= 2, "keys spread over {holding} of 3 nodes");
    assert_eq!(stats(&a)["backend"]["state"], "up");
}
