//! The gossip strategy as users run it: real `hivemind` processes on loopback, joined with
//! `--peers`, answering over the admin JSON endpoint (the same decision path as gRPC).

mod support;

use std::time::{Duration, Instant};

use support::{http_get, http_request, Server};

const RULES: &str = r#"
domain: mesh
descriptors:
  - key: k
    rate_limit: { unit: minute, requests_per_unit: 60 }
"#;

fn node(id: &str, peers: Option<std::net::SocketAddr>, extra: &[&str]) -> Server {
    let mut args = vec!["--node-id", id, "--mesh-addr", "127.0.0.1:0"];
    let peer;
    if let Some(p) = peers {
        peer = p.to_string();
        args.extend(["--peers", peer.as_str()]);
    }
    args.extend_from_slice(extra);
    let server = Server::with_rules(RULES, &args);
    assert!(
        server.mesh_addr.is_some(),
        "a gossip node reports mesh= on its listening line"
    );
    server
}

/// POSTs one hit of (k, value) to `/json`; returns (HTTP status, limit_remaining).
fn hit(server: &Server, value: &str) -> (u16, u64) {
    let body = format!(
        r#"{{"domain":"mesh","descriptors":[{{"entries":[{{"key":"k","value":"{value}"}}]}}]}}"#
    );
    let r = http_request(
        server.admin_addr,
        "POST",
        "/json",
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
    .unwrap_or_else(|e| panic!("POST /json: {e}\n{}", server.stderr()));
    let json: serde_json::Value = serde_json::from_str(&r.body).expect("json body");
    let remaining = json["statuses"][0]["limitRemaining"].as_u64().unwrap_or(0);
    (r.status, remaining)
}

fn mesh(server: &Server) -> serde_json::Value {
    let r = http_get(server.admin_addr, "/mesh").expect("GET /mesh");
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).expect("mesh json")
}

fn wait_for(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minute window with at least 20 s left.
fn settle_in_minute() {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if secs >= 40 {
        std::thread::sleep(Duration::from_secs(61 - secs));
    }
}

#[test]
fn gossip_is_the_default_and_health_reports_peers() {
    // No --strategy: a one-node mesh others can join.
    let solo = Server::with_rules(RULES, &["--mesh-addr", "127.0.0.1:0"]);
    assert!(solo.mesh_addr.is_some());
    let health = http_get(solo.admin_addr, "/healthcheck").unwrap();
    assert_eq!(health.status, 200);
    assert!(health.body.starts_with("OK\n"), "{}", health.body);
    assert!(health.body.contains("peers: 0 live"), "{}", health.body);
    // The seed CLI's --mesh flag still selects it.
    let flagged = node("flagged", None, &["--mesh"]);
    assert_eq!(mesh(&flagged)["node_id"], "flagged");
}

#[test]
fn three_processes_share_counts_and_survive_a_kill() {
    settle_in_minute();
    let a = node("a", None, &[]);
    let seed = a.mesh_addr;
    let b = node("b", seed, &[]);
    let mut c = node("c", seed, &[]);
    for s in [&a, &b, &c] {
        wait_for(Duration::from_secs(10), "all three joined", || {
            mesh(s)["live"].as_array().map(Vec::len) == Some(2)
        });
    }
    let health = http_get(a.admin_addr, "/healthcheck").unwrap();
    assert!(health.body.contains("peers: 2 live"), "{}", health.body);

    // 30 hits of 60 on c: past half the limit, so every change goes out at once (keys far
    // below their limit are published lazily). a and b soon count them.
    for _ in 0..30 {
        assert_eq!(hit(&c, "shared").0, 200);
    }
    for s in [&a, &b] {
        wait_for(Duration::from_secs(5), "a and b hear of c's key", || {
            mesh(s)["peer_keys"].as_u64() >= Some(1)
        });
    }
    // The key may have gone out mid-burst: give the last changes a few rounds (100 ms each).
    std::thread::sleep(Duration::from_millis(500));
    let (_, remaining) = hit(&b, "shared");
    assert!(
        remaining <= 29,
        "b counts c's 30 hits: remaining {remaining}"
    );

    // Kill c: a and b keep answering, and c's hits still count until the window ends.
    c.kill();
    wait_for(Duration::from_secs(10), "c is noticed dead", || {
        mesh(&a)["dead"].as_array().map(Vec::len) == Some(1)
    });
    let (status, remaining) = hit(&a, "shared");
    assert_eq!(status, 200);
    assert!(
        remaining <= 29,
        "c's hits still count: remaining {remaining}"
    );
}
