//! Rules hot reload as deployments change files: in-place writes, atomic renames, Kubernetes
//! ConfigMap `..data` symlink swaps; a bad file keeps the old rules; a directory of domains.

mod inproc;

use std::path::Path;
use std::time::Duration;

use hivemind::proto::Code;
use inproc::{ask, request, InProc};

fn rules(limit: u32) -> String {
    format!(
        "domain: test\ndescriptors:\n  - key: k\n    rate_limit: {{ unit: hour, requests_per_unit: {limit} }}\n"
    )
}

/// The limit the server reports for (k, v), polled until it equals `want` (bounded: 10 s).
async fn wait_for_limit(server: &InProc, value: &str, want: Option<u32>) {
    let mut client = server.client().await;
    let mut seen = None;
    for _ in 0..200 {
        let r = ask(&mut client, request("test", &[&[("k", value)]])).await;
        seen = r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit);
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("limit never became {want:?} (last seen {seen:?})");
}

async fn start(yaml: &str) -> InProc {
    InProc::start(yaml, |s| {
        s.rules.reload_interval = Duration::from_millis(100)
    })
    .await
}

#[tokio::test]
async fn in_place_writes_are_picked_up() {
    let server = start(&rules(5)).await;
    wait_for_limit(&server, "a", Some(5)).await;
    std::fs::write(&server.rules_path, rules(7)).unwrap();
    wait_for_limit(&server, "b", Some(7)).await;
}

#[tokio::test]
async fn atomic_renames_are_picked_up() {
    let server = start(&rules(5)).await;
    wait_for_limit(&server, "a", Some(5)).await;
    let staged = server.rules_path.with_extension("tmp");
    std::fs::write(&staged, rules(8)).unwrap();
    std::fs::rename(&staged, &server.rules_path).unwrap();
    wait_for_limit(&server, "a", Some(8)).await;
}

#[tokio::test]
async fn a_bad_file_keeps_the_previous_rules_and_is_reported() {
    let server = start(&rules(5)).await;
    // The server has loaded the good file before the bad one replaces it.
    wait_for_limit(&server, "a", Some(5)).await;
    std::fs::write(&server.rules_path, "domain: test\ndescriptors:\n  - key: k\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n").unwrap();
    // The error shows up in /stats; meanwhile the old limit keeps applying.
    let mut reported = serde_json::Value::Null;
    for _ in 0..200 {
        let stats: serde_json::Value = server.admin_json("/stats").await;
        if stats["rules"]["reload"]["errors"].as_u64() >= Some(1) {
            reported = stats;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = reported["rules"]["reload"]["last_error"]
        .as_str()
        .expect("reload error reported");
    assert!(error.contains("fortnight"), "{error}");
    assert!(error.contains("ratelimit.yaml:4"), "{error}");
    wait_for_limit(&server, "a", Some(5)).await;
    // Fixing the file clears the error.
    std::fs::write(&server.rules_path, rules(6)).unwrap();
    wait_for_limit(&server, "a", Some(6)).await;
}

/// Lays out a directory the way the kubelet mounts a ConfigMap:
/// `dir/..2024_x/ratelimit.yaml`, `dir/..data -> ..2024_x`, `dir/ratelimit.yaml -> ..data/ratelimit.yaml`.
fn configmap_version(dir: &Path, version: &str, yaml: &str) {
    let versioned = dir.join(version);
    std::fs::create_dir_all(&versioned).unwrap();
    std::fs::write(versioned.join("ratelimit.yaml"), yaml).unwrap();
    // Swap ..data atomically: a new symlink renamed over the old one.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("ratelimit.yaml");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/ratelimit.yaml", &link).unwrap();
    }
}

#[tokio::test]
async fn configmap_symlink_swaps_are_picked_up() {
    let mount = tempfile::tempdir().unwrap();
    configmap_version(mount.path(), "..2024_01_01_00_00_00.1", &rules(5));
    let server = InProc::start("domain: unused\n", |s| {
        s.rules.path = mount.path().to_path_buf();
        s.rules.reload_interval = Duration::from_millis(100);
    })
    .await;
    wait_for_limit(&server, "a", Some(5)).await;
    configmap_version(mount.path(), "..2024_01_01_00_00_00.2", &rules(9));
    wait_for_limit(&server, "a", Some(9)).await;
}

#[tokio::test]
async fn a_directory_holds_one_domain_per_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("test.yaml"), rules(3)).unwrap();
    std::fs::write(
        dir.path().join("other.yml"),
        "domain: other\ndescriptors:\n  - key: k\n    rate_limit: { unit: hour, requests_per_unit: 1 }\n",
    )
    .unwrap();
    let server = InProc::start("domain: unused\n", |s| {
        s.rules.path = dir.path().to_path_buf();
        s.rules.reload_interval = Duration::from_millis(100);
    })
    .await;
    let mut client = server.client().await;
    let r = ask(&mut client, request("other", &[&[("k", "x")]])).await;
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let r = ask(&mut client, request("other", &[&[("k", "x")]])).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    wait_for_limit(&server, "a", Some(3)).await;
    // A new domain file dropped into the directory.
    std::fs::write(
        dir.path().join("third.yaml"),
        "domain: third\ndescriptors:\n  - key: k\n    rate_limit: { unit: hour, requests_per_unit: 42 }\n",
    )
    .unwrap();
    for _ in 0..200 {
        let r = ask(&mut client, request("third", &[&[("k", "x")]])).await;
        if r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit)
            == Some(42)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the new domain file was never loaded");
}
