//! End to end over real gRPC on loopback with the standalone strategy: every rule semantic of
//! envoyproxy/ratelimit as Envoy would see it, plus health, reflection and graceful shutdown.

mod inproc;

use hivemind::proto::{Code, ProtoUnit, RateLimitOverride, RateLimitRequest, RateLimitResponse};
use inproc::{ask, descriptor, request, Client, InProc};

const RULES: &str = r#"
domain: test
descriptors:
  - key: remote_address
    rate_limit: { unit: minute, requests_per_unit: 3 }
  - key: remote_address
    value: 50.0.0.5
    rate_limit: { unit: minute, requests_per_unit: 0 }
  - key: path
    value: /api/*/action
    share_threshold: true
    rate_limit: { unit: hour, requests_per_unit: 2 }
  - key: path
    value: /files/*
    rate_limit: { unit: hour, requests_per_unit: 1 }
  - key: tenant
    descriptors:
      - key: user
        rate_limit: { name: per_user, unit: hour, requests_per_unit: 2 }
      - key: user
        value: canary
        shadow_mode: true
        rate_limit: { unit: hour, requests_per_unit: 1 }
  - key: plan
    value: premium
    rate_limit:
      replaces: [ { name: per_user } ]
      unit: hour
      requests_per_unit: 4
  - key: internal
    rate_limit: { unlimited: true }
  - key: plan
    value: staff
    rate_limit: { unlimited: true, replaces: [ { name: per_user } ] }
  - key: quota_a
    quota_mode: true
    rate_limit: { unit: hour, requests_per_unit: 1 }
  - key: quota_b
    quota_mode: true
    rate_limit: { unit: hour, requests_per_unit: 2 }
  - key: bulk
    rate_limit: { unit: HOUR, requests_per_unit: 10 }
  - key: org
    value_to_metric: true
    descriptors:
      - key: team
        rate_limit: { unit: hour, requests_per_unit: 5 }
"#;

fn codes(response: &RateLimitResponse) -> (i32, Vec<i32>) {
    (
        response.overall_code,
        response.statuses.iter().map(|s| s.code).collect(),
    )
}

/// The overall code of one call.
async fn overall(client: &mut Client, request: RateLimitRequest) -> i32 {
    ask(client, request).await.overall_code
}

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

#[tokio::test]
async fn admits_up_to_the_limit_and_reports_the_window() {
    let server = InProc::start(RULES, |_| {}).await;
    let mut client = server.client().await;
    let req = request("test", &[&[("remote_address", "10.0.0.1")]]);
    for expected_remaining in [2, 1, 0] {
        let response = ask(&mut client, req.clone()).await;
        assert_eq!(codes(&response), (OK, vec![OK]));
        let status = &response.statuses[0];
        assert_eq!(status.limit_remaining, expected_remaining);
        let limit = status.current_limit.as_ref().expect("current_limit");
        assert_eq!(limit.requests_per_unit, 3);
        assert_eq!(limit.unit, ProtoUnit::Minute as i32);
        let reset = status.duration_until_reset.as_ref().expect("reset").seconds;
        assert!((1..=60).contains(&reset), "{reset}");
    }
    let response = ask(&mut client, req.clone()).await;
    assert_eq!(codes(&response), (OVER, vec![OVER]));
    assert_eq!(response.statuses[0].limit_remaining, 0);
    // Each distinct value of a bare key has its own counter.
    let other = request("test", &[&[("remote_address", "10.0.0.2")]]);
    let response = ask(&mut client, other).await;
    assert_eq!(codes(&response), (OK, vec![OK]));
}

#[tokio::test]
async fn exact_values_beat_bare_keys_and_unknown_input_is_not_limited() {
    let server = InProc::start(RULES, |_| {}).await;
    let mut client = server.client().await;
    let banned = request("test", &[&[("remote_address", "50.0.0.5")]]);
    let response = ask(&mut client, banned).await;
    assert_eq!(codes(&response), (OVER, vec![OVER]));

    for unmatched in [
        request("other-domain", &[&[("remote_address", "10.0.0.1")]]),
        request("test", &[&[("unknown_key", "x")]]),
        // More entries than the tree is deep.
        request("test", &[&[("remote_address", "10.0.0.1"), ("extra", "y")]]),
        // A node without a rate_limit.
        request("test", &[&[("tenant", "acme")]]),
    ] {
        let response = ask(&mut client, unmatched).await;
        assert_eq!(codes(&response), (OK, vec![OK]));
        assert!(response.statuses[0].current_limit.is_none());
    }
}

#[tokio::test]
async fn wildcards_share_a_counter_only_with_share_threshold() {
    let server = InProc::start(RULES, |_| {}).await;
    let mut client = server.client().await;
    let shared = |id: &str| request("test", &[&[("path", &format!("/api/{id}/action"))]]);
    assert_eq!(overall(&mut client, shared("1")).await, OK);
    assert_eq!(overall(&mut client, shared("2")).await, OK);
    assert_eq!(overall(&mut client, shared("3")).await, OVER);

    let own = |name: &str| request("test", &[&[("path", &format!("/files/{name}"))]]);
    assert_eq!(overall(&mut client, own("a")).await, OK);
    assert_eq!(overall(&mut client, own("a")).await, OVER);
    assert_eq!(overall(&mut client, own("b")).await, OK);
}

#[tokio::test]
async fn nested_descriptors_shadow_mode_and_replaces() {
    let server = InProc::start(RULES, |_| {}).await;
    let mut client = server.client().await;
    let user = request("test", &[&[("tenant", "acme"), ("user", "ann")]]);
    for _ in 0..2 {
        let r = ask(&mut client, user.clone()).await;
        assert_eq!(codes(&r), (OK, vec![OK]));
        assert_eq!(
            r.statuses[0].current_limit.as_ref().unwrap().name,
            "per_user"
        );
    }
    assert_eq!(codes(&ask(&mut client, user).await), (OVER, vec![OVER]));

    // Shadow mode: over its limit after one hit, still answered OK.
    let canary = request("test", &[&[("tenant", "acme"), ("user", "canary")]]);
    for _ in 0..3 {
        let r = ask(&mut client, canary.clone()).await;
        assert_eq!(codes(&r), (OK, vec![OK]));
    }

    // A premium plan descriptor replaces the per_user limit matched by the other descriptor.
    let premium = request(
        "test",
        &[
            &[("tenant", "acme"), ("user", "bob")],
            &[("plan", "premium")],
        ],
    );
    for _ in 0..4 {
        let r = ask(&mut client, premium.clone()).await;
        assert_eq!(codes(&r), (OK, vec![OK, OK]));
        assert!(
            r.statuses[0].current_limit.is_none(),
            "per_user was replaced"
        );
    }
    let r = ask(&mut client, premium).await;
    assert_eq!(codes(&r), (OVER, vec![OK, OVER]));
}

#[tokio::test]
async fn an_unlimited_rule_s_replaces_apply_too() {
    let server = InProc::start(RULES, |_| {}).await;
    let mut client = server.client().await;
    // per_user allows 2 an hour; a staff plan (unlimited) replaces it, as envoyproxy/ratelimit
    // does, so the user is never limited while the request carries it.
    let staff = request(
        "test",
        &[&[("tenant", "acme"), ("user", "sam")], &[("plan", "staff")]],
    );
    for _ in 0..5 {
        let r = ask(&mut client, staff.clone()).await;
        assert_eq!(r.overall_code, OK);
        assert!(
            r.statuses[0].current_limit.is_none(),
            "per_user was replaced"
        );
    }
    let alone = request("test", &[&[("tenant", "acme"), ("user", "sam")]]);
    assert_eq!(overall(&mut client, alone.clone()).await, OK);
    assert_eq!(overall(&mut client, alone.clone()).await, OK);
    assert_eq!(
        overall(&mut client, alone).await,
        OVER,
        "nothing was counted under staff"
    );
}

#[tokio::test]
async fn unlimited_and_quota_mode() {
    let server = InProc::start(RULES, |_| {}).await;
    let mut client = server.client().await;
    let internal = request("test", &[&[("internal", "anything")]]);
    for _ in 0..20 {
        let r = ask(&mut client, internal.clone()).await;
        assert_eq!(codes(&r), (OK, vec![OK]));
        assert_eq!(r.statuses[0].limit_remaining, u32::MAX);
        assert!(r.statuses[0].current_limit.is_none());
    }

    let quotas = request("test", &[&[("quota_a", "x")], &[("quota_b", "x")]]);
    let r = ask(&mut client, quotas.clone()).await;
    assert_eq!(codes(&r), (OK, vec![OK, OK]));
    // quota_a is spent but quota_b is not: the request passes, quota_a's status says over.
    let r = ask(&mut client, quotas.clone()).await;
    assert_eq!(codes(&r), (OK, vec![OVER, OK]));
    // Both spent: over.
    let r = ask(&mut client, quotas).await;
    assert_eq!(codes(&r), (OVER, vec![OVER, OVER]));
}

#[tokio::test]
async fn hits_addend_and_a_rejected_request_consumes_nothing() {
    let server = InProc::start(RULES, |_| {}).await;
    let mut client = server.client().await;
    let mut req = request("test", &[&[("bulk", "a")]]);
    req.hits_addend = 4;
    let r = ask(&mut client, req.clone()).await;
    assert_eq!(r.statuses[0].limit_remaining, 6);
    // The descriptor's own addend wins over the request's.
    req.descriptors[0].hits_addend = Some(5);
    let r = ask(&mut client, req.clone()).await;
    assert_eq!(r.statuses[0].limit_remaining, 1);
    // 5 more do not fit: rejected, and nothing is consumed.
    let r = ask(&mut client, req.clone()).await;
    assert_eq!(codes(&r), (OVER, vec![OVER]));
    // A request hits_addend of 0 means 1.
    let mut one = request("test", &[&[("bulk", "a")]]);
    one.hits_addend = 0;
    let r = ask(&mut client, one.clone()).await;
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 0));
    // A per-descriptor addend of 0 only reads.
    one.descriptors[0].hits_addend = Some(0);
    let r = ask(&mut client, one).await;
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 0));

    // A request rejected by one descriptor is not charged to its other descriptors.
    let both = request(
        "test",
        &[&[("bulk", "b")], &[("remote_address", "50.0.0.5")]],
    );
    for _ in 0..3 {
        let r = ask(&mut client, both.clone()).await;
        assert_eq!(codes(&r), (OVER, vec![OK, OVER]));
    }
    let alone = request("test", &[&[("bulk", "b")]]);
    let r = ask(&mut client, alone).await;
    assert_eq!(r.statuses[0].limit_remaining, 9);
}

#[tokio::test]
async fn envoy_limit_override_replaces_the_configured_limit() {
    let server = InProc::start(RULES, |_| {}).await;
    let mut client = server.client().await;
    let mut d = descriptor(&[("anything", "at-all")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 2,
        unit: ProtoUnit::Hour as i32,
    });
    let req = hivemind::proto::RateLimitRequest {
        domain: "test".into(),
        descriptors: vec![d],
        hits_addend: 1,
    };
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = ask(&mut client, req.clone()).await;
        let limit = r.statuses[0]
            .current_limit
            .as_ref()
            .expect("override limit reported");
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (2, ProtoUnit::Hour as i32)
        );
        seen.push(r.overall_code);
    }
    assert_eq!(seen, [OK, OK, OVER]);
}

#[tokio::test]
async fn rate_limit_headers_come_from_the_descriptor_closest_to_its_limit() {
    let server = InProc::start(RULES, |s| s.response.rate_limit_headers = true).await;
    let mut client = server.client().await;
    let req = request(
        "test",
        &[&[("bulk", "h")], &[("remote_address", "10.9.9.9")]],
    );
    let r = ask(&mut client, req).await;
    let headers: Vec<(String, String)> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    assert_eq!(headers[0], ("RateLimit-Limit".into(), "3".into()));
    assert_eq!(headers[1], ("RateLimit-Remaining".into(), "2".into()));
    assert_eq!(headers[2].0, "RateLimit-Reset");
    let reset: u64 = headers[2].1.parse().unwrap();
    assert!((1..=60).contains(&reset));

    let plain = InProc::start(RULES, |_| {}).await;
    let r = plain
        .client()
        .await
        .should_rate_limit(request("test", &[&[("bulk", "h")]]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.response_headers_to_add.is_empty(),
        "headers are off by default"
    );
}

#[tokio::test]
async fn grpc_health_reports_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let server = InProc::start(RULES, |_| {}).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = health
        .check(HealthCheckRequest {
            service: "envoy.service.ratelimit.v3.RateLimitService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

async fn grpc_health(addr: std::net::SocketAddr) -> i32 {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "envoy.service.ratelimit.v3.RateLimitService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test]
async fn shutdown_fails_health_first_and_serves_through_the_grace_period() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut server = InProc::start(RULES, |s| {
        s.shutdown.grace = std::time::Duration::from_secs(3);
    })
    .await;
    let mut client = server.client().await;
    assert_eq!(
        grpc_health(server.grpc_addr).await,
        ServingStatus::Serving as i32
    );
    server.begin_stop();
    // Within the grace period: health fails on both protocols, decisions still come.
    let mut failing = false;
    for _ in 0..200 {
        let health = reqwest::get(server.admin_url("/healthcheck"))
            .await
            .unwrap();
        if health.status() == 503 {
            failing = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(failing, "/healthcheck still 200 after shutdown began");
    assert_eq!(
        grpc_health(server.grpc_addr).await,
        ServingStatus::NotServing as i32
    );
    let r = ask(&mut client, request("test", &[&[("bulk", "x")]])).await;
    assert_eq!(r.overall_code, OK, "still deciding during the grace period");
    server
        .stop()
        .await
        .expect("clean shutdown after the grace period");
}

#[tokio::test]
async fn graceful_shutdown_returns_and_stops_listening() {
    let server = InProc::start(RULES, |_| {}).await;
    let addr = server.grpc_addr;
    let mut client = server.client().await;
    let r = client
        .should_rate_limit(request("test", &[&[("bulk", "x")]]))
        .await
        .unwrap();
    assert_eq!(r.into_inner().overall_code, OK);
    server.stop().await.expect("clean shutdown");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn two_event_loops_share_many_connections_round_robin() {
    let server = InProc::start(RULES, |s| s.server.threads = Some(2)).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        // Each client is its own HTTP/2 connection.
        let mut client = server.client().await;
        let r = ask(&mut client, request("test", &[&[("bulk", "x")]])).await;
        assert_eq!(r.overall_code, OK);
        clients.push(client);
    }
    for client in &mut clients {
        let r = ask(client, request("test", &[&[("bulk", "y")]])).await;
        assert_eq!(r.overall_code, OK, "every connection keeps being served");
    }
    let stats = server.admin_json("/stats").await;
    let served = &stats["server"];
    assert_eq!(served["model"], "thread_per_core", "{stats}");
    assert_eq!(served["threads"], 2, "{stats}");
    let counts: Vec<u64> = served["loops"]
        .as_array()
        .expect("loops")
        .iter()
        .map(|l| l["connections"].as_u64().expect("connections"))
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 8, "{stats}");
    assert!(
        counts.iter().all(|&n| n >= 3),
        "both loops got connections: {stats}"
    );
    server.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn zero_threads_serves_on_the_shared_multi_thread_runtime() {
    let server = InProc::start(RULES, |s| s.server.threads = Some(0)).await;
    let addr = server.grpc_addr;
    let mut client = server.client().await;
    let r = ask(&mut client, request("test", &[&[("bulk", "x")]])).await;
    assert_eq!(r.overall_code, OK);
    let stats = server.admin_json("/stats").await;
    assert_eq!(stats["server"]["model"], "multi_thread", "{stats}");
    assert_eq!(stats["server"]["threads"], 0, "{stats}");
    server.stop().await.expect("clean shutdown");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

/// The value of one series in a Prometheus exposition text.
fn series<'t>(text: &'t str, name_and_labels: &str) -> Option<&'t str> {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels))
        .map(str::trim)
}

#[tokio::test]
async fn metrics_count_hits_by_rule_and_outcome_in_envoyproxy_ratelimit_names() {
    let server = InProc::start(RULES, |_| {}).await;
    let mut client = server.client().await;
    // remote_address: 3 per minute; near limit above 0.8 × 3 = 2.4, so the third hit is near.
    for _ in 0..4 {
        overall(
            &mut client,
            request("test", &[&[("remote_address", "10.0.0.1")]]),
        )
        .await;
    }
    // The canary user's rule is in shadow mode (1 per hour): the second hit is over, reported.
    for _ in 0..2 {
        let r = ask(
            &mut client,
            request("test", &[&[("tenant", "acme"), ("user", "canary")]]),
        )
        .await;
        assert_eq!(r.overall_code, OK, "shadow mode never rejects");
    }
    // value_to_metric on org: its level shows the request's value, team its configured key.
    for team in ["t-7", "t-9"] {
        overall(
            &mut client,
            request("test", &[&[("org", "initech"), ("team", team)]]),
        )
        .await;
    }
    let response = reqwest::get(server.admin_url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        response.headers()
    );
    let text = response.text().await.unwrap();
    let remote = r#"{domain="test",key="remote_address"}"#;
    for (name, expected) in [
        ("total_hits", "4"),
        ("within_limit", "3"),
        ("near_limit", "1"),
        ("over_limit", "1"),
    ] {
        let name = format!("ratelimit_service_rate_limit_{name}{remote}");
        assert_eq!(series(&text, &name), Some(expected), "{name} in\n{text}");
    }
    let canary = r#"{domain="test",key="tenant.user_canary"}"#;
    assert_eq!(
        series(
            &text,
            &format!("ratelimit_service_rate_limit_shadow_mode{canary}")
        ),
        Some("1"),
        "{text}"
    );
    let org = r#"{domain="test",key="org_initech.team"}"#;
    assert_eq!(
        series(
            &text,
            &format!("ratelimit_service_rate_limit_total_hits{org}")
        ),
        Some("2"),
        "{text}"
    );
    assert_eq!(
        series(&text, "hivemind_decision_duration_seconds_count"),
        Some("8"),
        "{text}"
    );
    let strategy = server.admin_json("/stats").await["strategy"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        series(
            &text,
            &format!(r#"hivemind_strategy_health{{strategy="{strategy}",state="serving"}}"#)
        ),
        Some("1"),
        "{text}"
    );
    // (The space ends the name: `hivemind_counter_keys_max` is another series.)
    let keys: f64 = series(&text, "hivemind_counter_keys ")
        .and_then(|v| v.parse().ok())
        .expect("live counter keys");
    assert!(keys >= 2.0, "{text}");
    // Request values never become labels, but at value_to_metric levels: only rule names
    // from the rules file.
    assert!(!text.contains("10.0.0.1"), "{text}");
    assert!(!text.contains("acme"), "{text}");
    assert!(!text.contains("t-7") && !text.contains("t-9"), "{text}");
    server.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn metrics_can_be_switched_off() {
    let server = InProc::start(RULES, |s| s.metrics.enabled = false).await;
    let mut client = server.client().await;
    let r = ask(&mut client, request("test", &[&[("bulk", "x")]])).await;
    assert_eq!(r.overall_code, OK);
    let response = reqwest::get(server.admin_url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 404);
    server.stop().await.expect("clean shutdown");
}
