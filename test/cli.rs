//! The `hivemind` binary as a user runs it: `--check-config`, `--healthcheck`, errors for bad
//! settings and rules, the embedded default rules, graceful exit on SIGTERM, and the
//! listening line and strategy names the test launcher shares with the server.

mod support;

use std::process::Command;
use std::time::Duration;

use hivemind::settings::StrategyKind;
use hivemind_core::ListeningLine;
use hivemind_testkit::Strategy;
use support::{http_get, Server};

fn hivemind() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hivemind"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd.env_remove("HIVEMIND_SETTINGS");
    cmd
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("run hivemind");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_the_effective_settings_and_validates_rules() {
    let (code, stdout, stderr) = run(hivemind()
        .args(["--check-config", "-a", "127.0.0.1:9999"])
        .env("HIVEMIND_COUNTERS__MAX_KEYS", "1234"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("addr: 127.0.0.1:9999"), "{stdout}");
    assert!(stdout.contains("max_keys: 1234"), "{stdout}");
    assert!(stdout.contains("# rules ok"), "{stdout}");
}

#[test]
fn check_config_rejects_bad_rules_with_file_and_line() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/test/fixtures/rules/invalid/bad_unit.yaml"
    );
    let (code, _, stderr) = run(hivemind().args(["--check-config", "-c", fixture]));
    assert_eq!(code, 1);
    assert!(stderr.contains("bad_unit.yaml:"), "{stderr}");
    assert!(stderr.contains("unit"), "{stderr}");
}

#[test]
fn unknown_settings_are_errors_naming_their_layer() {
    let (code, _, stderr) = run(hivemind()
        .arg("--check-config")
        .env("HIVEMIND_GRPC__ADRESS", "127.0.0.1:1"));
    assert_eq!(code, 1);
    assert!(stderr.contains("adress"), "{stderr}");
    assert!(stderr.contains("HIVEMIND_"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("settings.yaml");
    std::fs::write(&file, "stratgy: redis\n").unwrap();
    let (code, _, stderr) = run(hivemind()
        .arg("--check-config")
        .arg("--settings")
        .arg(&file));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("stratgy") && stderr.contains("settings.yaml"),
        "{stderr}"
    );

    let (code, _, stderr) =
        run(hivemind().args(["--check-config", "--settings", "/nonexistent.yaml"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent.yaml"), "{stderr}");

    let (code, _, stderr) = run(hivemind().args(["-a", "not-an-address"]));
    assert_eq!(code, 2, "clap usage error");
    assert!(stderr.contains("not-an-address"), "{stderr}");
}

#[test]
fn the_server_refuses_to_start_on_bad_rules() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/test/fixtures/rules/invalid/unknown_key.yaml"
    );
    let (code, _, stderr) = run(hivemind().args([
        "-c",
        fixture,
        "-a",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]));
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown_key.yaml:"), "{stderr}");
}

#[test]
fn the_embedded_rules_stand_in_when_the_default_file_is_missing() {
    // From a directory without config/ratelimit.yaml, the default rules come from the binary.
    let empty = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(hivemind().current_dir(empty.path()).arg("--check-config"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("Embedded"), "{stdout}");
    // A path named explicitly must exist.
    let (code, _, stderr) =
        run(hivemind()
            .current_dir(empty.path())
            .args(["--check-config", "-c", "missing.yaml"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("missing.yaml"), "{stderr}");
}

/// A standalone server on free loopback ports, once it answers (testkit's launcher).
fn spawn_standalone() -> Server {
    Server::start(&["--strategy", Strategy::Standalone.as_str()])
}

#[test]
fn healthcheck_probes_the_running_server_by_exit_code() {
    let mut server = spawn_standalone();
    let admin = server.admin_addr.to_string();
    let (code, stdout, stderr) = run(hivemind().args(["--healthcheck", "--admin-addr", &admin]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("OK\n"), "{stdout}");
    // The same probe of an address nobody serves fails, saying where it looked.
    server.kill();
    let (code, _, stderr) = run(hivemind().args(["--healthcheck", "--admin-addr", &admin]));
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("no healthcheck answer from {admin}")),
        "{stderr}"
    );
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut server = spawn_standalone();
    let health = http_get(server.admin_addr, "/healthcheck").expect("GET /healthcheck");
    assert_eq!(health.status, 200, "{}", health.body);
    let process = server.process();
    process.signal("TERM").expect("send SIGTERM");
    let status = process
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("still running 30 s after SIGTERM\n{}", process.stderr()));
    let stderr = process.stderr();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("shutdown complete"), "{stderr}");
}

#[test]
fn the_launcher_reads_the_listening_line_the_server_prints() {
    let server = spawn_standalone();
    assert_eq!(server.mesh_addr, None, "standalone has no mesh");
    let stdout = std::fs::read_to_string(server.logs().join("stdout.log")).unwrap();
    let line: ListeningLine = stdout.lines().next().unwrap().parse().unwrap();
    assert_eq!(line.to_string(), stdout.lines().next().unwrap());
    assert_eq!(
        (line.grpc, line.admin),
        (server.grpc_addr, server.admin_addr)
    );
    let health = http_get(server.admin_addr, "/healthcheck").expect("GET /healthcheck");
    assert_eq!(health.status, 200, "{}", health.body);
}

#[test]
fn testkit_strategy_names_are_the_servers() {
    use clap::ValueEnum;
    for kind in StrategyKind::value_variants() {
        let name = kind.as_str();
        let strategy: Strategy = name.parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(strategy.as_str(), name);
    }
    for strategy in [Strategy::Standalone, Strategy::Gossip, Strategy::Redis] {
        let kind = StrategyKind::from_str(strategy.as_str(), false).unwrap();
        assert_eq!(kind.as_str(), strategy.as_str());
    }
}

#[test]
fn check_config_redacts_the_mesh_secret() {
    let (code, stdout, stderr) = run(hivemind()
        .arg("--check-config")
        .env("HIVEMIND_MESH__SECRET", "hunter2-very-secret"));
    assert_eq!(code, 0, "{stderr}");
    // A build without the gossip backend keeps the section as written, shown as ignored.
    #[cfg(feature = "gossip")]
    assert!(stdout.contains("secret: <redacted>"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[cfg(feature = "gossip")]
#[test]
fn a_mesh_reachable_from_other_hosts_without_a_secret_refuses_to_start() {
    let (code, _, stderr) = run(hivemind()
        .args(["--mesh-addr", "0.0.0.0:0", "-a", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0"])
        .env_remove("HIVEMIND_MESH__SECRET"));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("mesh.addr"), "{stderr}");
    assert!(stderr.contains("HIVEMIND_MESH__SECRET"), "{stderr}");
    assert!(
        stderr.contains("command-line flags"),
        "names the layer: {stderr}"
    );

    let (code, _, stderr) = run(hivemind()
        .args(["--check-config", "--mesh-addr", "0.0.0.0:0"])
        .env("HIVEMIND_MESH__INSECURE", "true"));
    assert_eq!(code, 0, "an explicit opt-out is accepted: {stderr}");
}
