//! The container image's invariants, read from the `Dockerfile` (containers cannot run on the
//! machines the tests run on): the runtime stage runs the binary the builder stage builds, as a
//! non-root user, with the documented ports, rules path and probe, and CI runs the builder's
//! build command. And the Kubernetes manifests
//! under `deploy/kubernetes/`: valid against the API schemas (`kubernetes-validate`), with
//! settings and rules that hivemind loads and an Envoy config that a real Envoy accepts.

use std::path::Path;

mod support;

/// One instruction: its keyword (upper case) and its arguments, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// One `FROM ... AS name` stage and its instructions.
#[derive(Debug)]
struct Stage {
    name: String,
    image: String,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn all(&self, keyword: &str) -> impl Iterator<Item = &str> + '_ {
        let keyword = keyword.to_owned();
        self.instructions
            .iter()
            .filter(move |i| i.keyword == keyword)
            .map(|i| i.args.as_str())
    }

    fn one(&self, keyword: &str) -> &str {
        let found: Vec<&str> = self.all(keyword).collect();
        assert_eq!(
            found.len(),
            1,
            "stage {}: one {keyword} expected",
            self.name
        );
        found[0]
    }
}

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn stages(dockerfile: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (keyword, args) = line.split_once(' ').unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.trim().to_owned();
        if keyword == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => (*name).to_owned(),
                _ => format!("stage{}", stages.len()),
            };
            stages.push(Stage {
                name,
                image: words.first().copied().unwrap_or_default().to_owned(),
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(Instruction { keyword, args });
        }
    }
    stages
}

/// The words of an exec-form (`["a", "b"]`) argument list.
fn exec_form(args: &str) -> Vec<String> {
    let words: Vec<String> = serde_json::from_str(args)
        .unwrap_or_else(|e| panic!("not exec form (a JSON array): {args}: {e}"));
    assert!(!words.is_empty(), "empty exec form");
    words
}

#[test]
fn the_image_runs_the_built_binary_as_non_root_with_ports_rules_and_probe() {
    let dockerfile = read("Dockerfile");
    let stages = stages(&dockerfile);
    let runtime = stages.last().expect("a stage");

    // The binary the builder stage builds...
    let builder = stages
        .iter()
        .find(|s| s.all("RUN").any(|r| r.starts_with("cargo build ")))
        .expect("a stage that runs cargo build");
    let build = builder
        .all("RUN")
        .find(|r| r.starts_with("cargo build "))
        .unwrap();
    let words: Vec<&str> = build.split_whitespace().collect();
    assert!(words.contains(&"--release"), "{build}");
    assert!(words.contains(&"--locked"), "{build}");
    let bin = words
        .windows(2)
        .find(|w| w[0] == "--bin")
        .map(|w| w[1])
        .expect("cargo build --bin NAME");
    assert_eq!(bin, env!("CARGO_PKG_NAME"), "the server binary");
    let workdir = stages
        .iter()
        .flat_map(|s| s.all("WORKDIR"))
        .last()
        .expect("a WORKDIR for the build");
    let built = format!("{workdir}/target/release/{bin}");

    // ...is what the runtime stage copies and runs.
    let entrypoint = exec_form(runtime.one("ENTRYPOINT"));
    let installed = entrypoint[0].clone();
    let copy = format!("--from={} {built} {installed}", builder.name);
    assert!(
        runtime.all("COPY").any(|c| c == copy),
        "runtime stage must `COPY {copy}`"
    );
    assert_ne!(
        runtime.image, builder.image,
        "the runtime image is not the build image"
    );

    // Not root: a user other than root/0 is set in the runtime stage.
    let user = runtime.one("USER");
    let name = user.split(':').next().unwrap_or_default();
    assert!(
        !name.is_empty() && name != "root" && name != "0",
        "runtime user is root: {user}"
    );

    // Ports: gRPC, admin, mesh.
    let exposed: Vec<&str> = runtime
        .all("EXPOSE")
        .flat_map(str::split_whitespace)
        .collect();
    for port in ["8081/tcp", "8080/tcp", "7946/udp"] {
        assert!(
            exposed.contains(&port),
            "EXPOSE {port} missing: {exposed:?}"
        );
    }

    // Rules are read from /etc/hivemind/rules, where the example rules are copied.
    let env = runtime.all("ENV").collect::<Vec<_>>().join(" ");
    assert!(
        env.contains("HIVEMIND_RULES__PATH=/etc/hivemind/rules"),
        "{env}"
    );
    assert!(
        runtime
            .all("COPY")
            .any(|c| c.ends_with(" /etc/hivemind/rules/ratelimit.yaml")),
        "example rules copied to /etc/hivemind/rules"
    );
    assert!(
        env.contains("HIVEMIND_SETTINGS=/etc/hivemind/hivemind.yaml"),
        "{env}"
    );

    // The health check is the installed binary's probe.
    let healthcheck = runtime.one("HEALTHCHECK");
    let probe = healthcheck
        .split_once("CMD ")
        .map(|(_, cmd)| exec_form(cmd))
        .expect("HEALTHCHECK CMD [...]");
    assert_eq!(probe, [installed.as_str(), "--healthcheck"]);
}

/// CI (`.ci/run`) runs the builder stage's build command verbatim, so a change that breaks the
/// image's build fails CI even though no container is built there.
#[test]
fn ci_runs_the_image_build_command() {
    let stages = stages(&read("Dockerfile"));
    let build = stages
        .iter()
        .flat_map(|s| s.all("RUN"))
        .find(|r| r.starts_with("cargo build "))
        .expect("a stage that runs cargo build");
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == build),
        ".ci/run must run the Dockerfile's `{build}` on a line of its own"
    );
}

#[test]
fn the_build_context_leaves_out_build_output_and_vcs_data() {
    let ignore = read(".dockerignore");
    let entries: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in ["target/", ".git/", ".venv-test/"] {
        assert!(entries.contains(&needed), "{needed} not in .dockerignore");
    }
    // What the build needs stays in: every workspace member and declared target.
    for kept in [
        "src",
        "backends",
        "test",
        "benches",
        "third_party",
        "proto",
        "config",
    ] {
        assert!(
            !entries
                .iter()
                .any(|e| e.trim_end_matches('/') == kept || *e == "*"),
            "{kept} must stay in the build context"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// deploy/kubernetes: schema-valid manifests whose hivemind settings, rules and Envoy config load
// ---------------------------------------------------------------------------------------------

/// The command that installs the manifest validator the tests expect (from the repository root).
const KUBERNETES_VALIDATE_INSTALL: &str =
    "python3 -m venv .venv-test && .venv-test/bin/pip install kubernetes-validate==1.37.0";

/// Where the image reads rules from, and where the manifests must mount them.
const IMAGE_RULES_DIR: &str = "/etc/hivemind/rules";

/// The manifests a user applies: the shared part and each variant.
const MANIFESTS: [&str; 3] = [
    "deploy/kubernetes/common.yaml",
    "deploy/kubernetes/gossip.yaml",
    "deploy/kubernetes/redis.yaml",
];

/// `$KUBERNETES_VALIDATE`, else `.venv-test/bin/kubernetes-validate`; panics with the install
/// command when neither exists (the test never skips).
fn kubernetes_validate() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("KUBERNETES_VALIDATE") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-test/bin/kubernetes-validate");
    assert!(
        venv.is_file(),
        "kubernetes-validate not found ($KUBERNETES_VALIDATE, {}). Install it from the \
         repository root with:\n    {KUBERNETES_VALIDATE_INSTALL}",
        venv.display()
    );
    venv
}

/// Every document of a multi-document YAML file.
fn documents(path: &str) -> Vec<serde_yaml::Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

/// The document of `kind` named `name`.
fn resource<'d>(docs: &'d [serde_yaml::Value], kind: &str, name: &str) -> &'d serde_yaml::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

fn string(value: &serde_yaml::Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value:?}"))
}

/// A container's environment as the kubelet would set it: literal values with `$(VAR)`
/// expanded from the variables before them; field and secret references get stand-ins.
fn container_env(container: &serde_yaml::Value) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_sequence().into_iter().flatten() {
        let name = string(&var["name"]).to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            let mut expanded = value.to_owned();
            for (earlier, set) in &env {
                expanded = expanded.replace(&format!("$({earlier})"), set);
            }
            assert!(!expanded.contains("$("), "{name}: unresolved {expanded}");
            expanded
        } else {
            match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("status.podIP") => "10.1.2.3".to_owned(),
                Some("metadata.name") => "app-7d9f8-x2x4q".to_owned(),
                Some(other) => panic!("{name}: fieldRef {other} has no stand-in"),
                None => {
                    assert!(
                        var["valueFrom"]["secretKeyRef"]["name"].is_string(),
                        "{name}: neither a value, a field nor a secret"
                    );
                    "a-secret-from-the-kubernetes-secret".to_owned()
                }
            }
        };
        env.push((name, value));
    }
    env
}

#[test]
fn the_kubernetes_manifests_validate_against_the_api_schemas() {
    let out = std::process::Command::new(kubernetes_validate())
        .args(["--strict", "--quiet"])
        .args(MANIFESTS)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run kubernetes-validate");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_sidecar_settings_and_rules_in_the_manifests_load() {
    let common = documents(MANIFESTS[0]);
    let rules = resource(&common, "ConfigMap", "hivemind-rules");
    let rules_dir = tempfile::tempdir().unwrap();
    let files = rules["data"].as_mapping().expect("rules data");
    assert!(!files.is_empty());
    for (file, text) in files {
        std::fs::write(rules_dir.path().join(string(file)), string(text)).unwrap();
    }
    let entrypoint = exec_form(
        stages(&read("Dockerfile"))
            .last()
            .unwrap()
            .one("ENTRYPOINT"),
    );

    for (manifest, strategy) in [(MANIFESTS[1], "gossip"), (MANIFESTS[2], "redis")] {
        let docs = documents(manifest);
        let pod = &resource(&docs, "Deployment", "app")["spec"]["template"]["spec"];
        let hivemind = pod["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "hivemind")
            .expect("a hivemind container");
        // The probes are the image's binary's own.
        for probe in ["readinessProbe", "livenessProbe"] {
            let command: Vec<&str> = hivemind[probe]["exec"]["command"]
                .as_sequence()
                .unwrap_or_else(|| panic!("{manifest}: {probe} is an exec probe"))
                .iter()
                .map(string)
                .collect();
            assert_eq!(
                command,
                [entrypoint[0].as_str(), "--healthcheck"],
                "{manifest}"
            );
        }
        // The rules ConfigMap is mounted where the image reads rules.
        let mount = hivemind["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == IMAGE_RULES_DIR)
            .unwrap_or_else(|| panic!("{manifest}: nothing mounted at {IMAGE_RULES_DIR}"));
        let volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mounted volume");
        assert_eq!(volume["configMap"]["name"], "hivemind-rules", "{manifest}");

        // The settings the pod gives hivemind load, with the rules, as the image runs them.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hivemind"))
            .arg("--check-config")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("HIVEMIND_SETTINGS")
            .env("HIVEMIND_SETTINGS", "config/hivemind.yaml")
            .env("HIVEMIND_RULES__PATH", rules_dir.path())
            .envs(container_env(hivemind))
            .output()
            .expect("run hivemind --check-config");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{manifest}: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("strategy: {strategy}")),
            "{stdout}"
        );
        assert!(stdout.contains("# rules ok"), "{stdout}");
        assert!(
            !stdout.contains("a-secret-from-the-kubernetes-secret"),
            "{manifest}: a secret printed: {stdout}"
        );
    }
}

#[test]
fn the_envoy_sidecar_config_is_valid_for_envoy_and_points_at_hivemind() {
    let common = documents(MANIFESTS[0]);
    let config = string(&resource(&common, "ConfigMap", "envoy-sidecar")["data"]["envoy.yaml"]);
    assert!(
        config.contains("socket_address: { address: 127.0.0.1, port_value: 8081 }"),
        "the hivemind cluster is the sidecar's default gRPC address"
    );
    assert!(config.contains("domain: hivemind"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(support::envoy_binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .output()
        .expect("run envoy --mode validate");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
