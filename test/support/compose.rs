//! The Docker Compose scenarios of `test/docker-compose.yml` as local processes: the services of
//! one profile read from the compose file (environment, `env_file`s, mounted files, commands)
//! and started on loopback (hivemind as [`Server`]s, Redis as testkit's [`RedisServer`], Envoy as
//! [`Envoy`] with the mounted config), with only addresses and ports rewritten. Containers cannot
//! run on the machines the tests run on; this is how what the compose file describes is tested.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hivemind_testkit::RedisServer;
use serde_yaml::{Mapping, Value};

use super::{free_port, http_request, Envoy, HttpResponse, Server};

/// The compose file, relative to the repository root.
pub const COMPOSE_FILE: &str = "test/docker-compose.yml";

/// Where the image reads rules (the Dockerfile's `HIVEMIND_RULES__PATH`).
const IMAGE_RULES_DIR: &str = "/etc/hivemind/rules/";

/// The image of the hivemind services: built from the repository's Dockerfile.
const HIVEMIND_IMAGE: &str = "hivemind:compose";

/// `test/docker-compose.yml`, parsed, with YAML merge keys (`<<: *anchor`) applied.
pub struct ComposeFile {
    /// The `services` mapping.
    services: Mapping,
    /// The directory relative paths in the file are resolved from (the file's own).
    dir: PathBuf,
}

/// One service of the compose file.
pub struct Service<'c> {
    /// Its name (also its host name on the compose network).
    pub name: String,
    /// Its definition.
    spec: &'c Value,
    /// The compose file's directory, for relative paths.
    dir: &'c Path,
}

impl ComposeFile {
    /// Reads and parses [`COMPOSE_FILE`].
    pub fn load() -> ComposeFile {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(COMPOSE_FILE);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mut doc: Value = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
        apply_merge_keys(&mut doc);
        let services = doc["services"]
            .as_mapping()
            .unwrap_or_else(|| panic!("{}: no services", path.display()))
            .clone();
        ComposeFile {
            services,
            dir: path.parent().expect("the file's directory").to_owned(),
        }
    }

    /// Every service, in file order.
    pub fn services(&self) -> Vec<Service<'_>> {
        self.services
            .iter()
            .map(|(name, spec)| Service {
                name: name.as_str().expect("service names are strings").to_owned(),
                spec,
                dir: &self.dir,
            })
            .collect()
    }

    /// The services `docker compose --profile PROFILE up` starts, in file order.
    pub fn profile(&self, profile: &str) -> Vec<Service<'_>> {
        let services: Vec<Service<'_>> = self
            .services()
            .into_iter()
            .filter(|s| s.profiles().iter().any(|p| p == profile))
            .collect();
        assert!(
            !services.is_empty(),
            "{COMPOSE_FILE}: no service in profile {profile}"
        );
        services
    }
}

impl Service<'_> {
    fn strings(&self, field: &str) -> Vec<String> {
        self.spec[field]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|v| scalar(v, &format!("{}.{field}", self.name)))
            .collect()
    }

    /// Its `profiles`.
    pub fn profiles(&self) -> Vec<String> {
        self.strings("profiles")
    }

    /// Its `image`.
    pub fn image(&self) -> String {
        scalar(&self.spec["image"], &format!("{}.image", self.name))
    }

    /// Its `command` (exec form).
    pub fn command(&self) -> Vec<String> {
        self.strings("command")
    }

    /// Its network aliases, plus its own name: the host names it answers to.
    pub fn host_names(&self) -> Vec<String> {
        let mut names = vec![self.name.clone()];
        for network in self.spec["networks"].as_mapping().into_iter().flatten() {
            for alias in network.1["aliases"].as_sequence().into_iter().flatten() {
                names.push(scalar(alias, &format!("{}.networks.aliases", self.name)));
            }
        }
        names
    }

    /// The environment the container gets: the `env_file`s' variables, then `environment` (which
    /// wins, as in Compose), in that order.
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |name: String, value: String| {
            env.retain(|(n, _)| *n != name);
            env.push((name, value));
        };
        for file in self.strings("env_file") {
            let path = self.dir.join(&file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: env_file {}: {e}", self.name, path.display()));
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (name, value) = line
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{}: not NAME=VALUE: {line}", path.display()));
                set(name.to_owned(), value.to_owned());
            }
        }
        for (name, value) in self.spec["environment"].as_mapping().into_iter().flatten() {
            let name = scalar(name, &format!("{}.environment", self.name));
            let value = scalar(value, &format!("{}.environment.{name}", self.name));
            set(name, value);
        }
        env
    }

    /// Its bind mounts: (host path, container path).
    pub fn mounts(&self) -> Vec<(PathBuf, String)> {
        self.strings("volumes")
            .into_iter()
            .map(|volume| {
                let mut parts = volume.split(':');
                let (Some(source), Some(target)) = (parts.next(), parts.next()) else {
                    panic!(
                        "{}: volume {volume:?} is not SOURCE:TARGET[:MODE]",
                        self.name
                    );
                };
                (self.dir.join(source), target.to_owned())
            })
            .collect()
    }

    /// The host file mounted at `target`.
    pub fn mounted(&self, target: &str) -> PathBuf {
        self.mounts()
            .into_iter()
            .find(|(_, t)| t == target)
            .map(|(source, _)| source)
            .unwrap_or_else(|| panic!("{}: nothing mounted at {target}", self.name))
    }
}

/// Resolves YAML merge keys (`<<: *anchor`, `<<: [*a, *b]`) as Compose's YAML reader does,
/// also inside merged anchors (serde_yaml's `apply_merge` leaves a merge within a merged
/// mapping in place): keys already present win over merged ones, earlier merged maps over later.
fn apply_merge_keys(value: &mut Value) {
    match value {
        Value::Mapping(map) => {
            for (_, child) in map.iter_mut() {
                apply_merge_keys(child);
            }
            let Some(merged) = map.remove("<<") else {
                return;
            };
            let sources = match merged {
                Value::Mapping(one) => vec![one],
                Value::Sequence(many) => many
                    .into_iter()
                    .map(|m| match m {
                        Value::Mapping(m) => m,
                        other => panic!("{COMPOSE_FILE}: merging a non-mapping: {other:?}"),
                    })
                    .collect(),
                other => panic!("{COMPOSE_FILE}: merging a non-mapping: {other:?}"),
            };
            for source in sources {
                for (key, child) in source {
                    if !map.contains_key(&key) {
                        map.insert(key, child);
                    }
                }
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(apply_merge_keys),
        _ => {}
    }
}

/// A scalar as Compose reads it (numbers and booleans as their text).
fn scalar(value: &Value, what: &str) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("{COMPOSE_FILE}: {what}: not a scalar: {other:?}"),
    }
}

/// One hivemind service running as a local process.
pub struct Node {
    /// The compose service it stands for.
    pub service: String,
    /// The process.
    pub server: Server,
    /// Holds the settings file written from the service's environment while it runs.
    _settings: tempfile::TempDir,
}

/// One profile of the compose file running on loopback. Fields drop in order: Envoy first, then
/// hivemind, then Redis.
pub struct Scenario {
    /// Envoy, with the compose file's Envoy config, addresses rewritten.
    pub envoy: Envoy,
    /// Envoy's ingress listener.
    pub ingress: SocketAddr,
    /// The hivemind services, in file order.
    pub nodes: Vec<Node>,
    /// The rules file the hivemind services mount.
    pub rules: PathBuf,
    /// The scenario's Redis, if it has one.
    pub redis: Option<RedisServer>,
}

impl Scenario {
    /// Starts the services of `profile`: Redis, the hivemind nodes in file order (each gossip
    /// node seeded with the nodes started before it that its peers name), then Envoy in front,
    /// and warms Envoy up (one answered request per node).
    pub fn start(profile: &str) -> Scenario {
        let compose = ComposeFile::load();
        let services = compose.profile(profile);

        // Redis: testkit's redis-server with the service's arguments; its URL replaces the
        // service's host:port in the hivemind settings.
        let mut redis = None;
        let mut redis_host = String::new();
        for service in services.iter().filter(|s| s.image().starts_with("redis:")) {
            let command = service.command();
            assert_eq!(
                command.first().map(String::as_str),
                Some("redis-server"),
                "{}",
                service.name
            );
            let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
            redis = Some(RedisServer::start_with(&args));
            redis_host = format!("{}:6379", service.name);
        }

        let hivemind_names: Vec<&str> = services
            .iter()
            .filter(|s| s.image() == HIVEMIND_IMAGE)
            .map(|s| s.name.as_str())
            .collect();
        let mut nodes: Vec<Node> = Vec::new();
        let mut rules_file = None;
        let mut host_names: Vec<String> = Vec::new();
        for service in services.iter().filter(|s| s.image() == HIVEMIND_IMAGE) {
            host_names.extend(service.host_names());
            let env = service.environment();
            let rules = service
                .mounts()
                .into_iter()
                .find(|(_, target)| target.starts_with(IMAGE_RULES_DIR))
                .map(|(source, _)| source)
                .unwrap_or_else(|| {
                    panic!("{}: no rules mounted in {IMAGE_RULES_DIR}", service.name)
                });
            assert!(
                rules_file.as_ref().is_none_or(|r| *r == rules),
                "{}: every hivemind service mounts the same rules",
                service.name
            );
            rules_file = Some(rules.clone());
            let (settings_dir, settings) = settings_file(&service.name, &env);

            let mut args: Vec<String> = vec![
                "-c".into(),
                path_arg(&rules),
                "--settings".into(),
                path_arg(&settings),
            ];
            // The addresses: the mesh on loopback, seeded by the nodes started before this one
            // that the service's peers name (a node naming itself, as the first one does, needs
            // no seed); Redis at the local server.
            if let Some((_, peers)) = env.iter().find(|(n, _)| n == "HIVEMIND_MESH__PEERS") {
                args.extend(["--mesh-addr".into(), "127.0.0.1:0".into()]);
                let seeds: Vec<String> = peers
                    .split(',')
                    .map(str::trim)
                    .filter_map(|peer| {
                        let (host, port) = peer.rsplit_once(':').expect("peers are host:port");
                        assert!(
                            hivemind_names.contains(&host),
                            "{}: peer {peer} is no hivemind service of {profile}",
                            service.name
                        );
                        let mesh = env.iter().find(|(n, _)| n == "HIVEMIND_MESH__ADDR");
                        assert!(
                            mesh.is_some_and(|(_, addr)| addr.ends_with(&format!(":{port}"))),
                            "{}: peer {peer} is not on the mesh port ({mesh:?})",
                            service.name
                        );
                        nodes
                            .iter()
                            .find(|n| n.service == host)
                            .and_then(|n| n.server.mesh_addr)
                            .map(|a| a.to_string())
                    })
                    .collect();
                if !seeds.is_empty() {
                    args.extend(["--peers".into(), seeds.join(",")]);
                }
            }
            if let Some((_, url)) = env.iter().find(|(n, _)| n == "HIVEMIND_REDIS__URL") {
                let local = redis.as_ref().unwrap_or_else(|| {
                    panic!(
                        "{}: HIVEMIND_REDIS__URL but no redis service in {profile}",
                        service.name
                    )
                });
                assert!(
                    url.contains(&redis_host),
                    "{}: {url} is not {redis_host}",
                    service.name
                );
                let url = url.replace(&redis_host, &local.addr().to_string());
                args.extend(["--redis-url".into(), url]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            nodes.push(Node {
                service: service.name.clone(),
                server: Server::start(&args),
                _settings: settings_dir,
            });
        }
        assert!(
            !nodes.is_empty(),
            "{COMPOSE_FILE}: no {HIVEMIND_IMAGE} service in {profile}"
        );

        let envoy_service = services
            .iter()
            .find(|s| s.image().starts_with("envoyproxy/envoy:"))
            .unwrap_or_else(|| panic!("{COMPOSE_FILE}: no Envoy in {profile}"));
        let command = envoy_service.command();
        let config = command
            .windows(2)
            .find(|w| w[0] == "-c")
            .map(|w| envoy_service.mounted(&w[1]))
            .unwrap_or_else(|| panic!("{}: command has no -c CONFIG", envoy_service.name));
        let grpc: Vec<SocketAddr> = nodes.iter().map(|n| n.server.grpc_addr).collect();
        let envoy = Envoy::start(&local_envoy_config(&config, &host_names, &grpc));
        let ingress = envoy.listener_addr("ingress");
        let scenario = Scenario {
            envoy,
            ingress,
            nodes,
            rules: rules_file.expect("a hivemind service"),
            redis,
        };
        scenario.warm_up();
        scenario
    }

    /// One request per node (Envoy balances round robin) with its own api key, each until Envoy
    /// shows it went through hivemind: Envoy connects to each rate limit host lazily. Bounded.
    fn warm_up(&self) {
        for n in 0..self.nodes.len() {
            let key = format!("warm-up-{n}");
            let mut answered = false;
            for _ in 0..10 {
                let r = self.get("/keyed", Some(&key));
                if r.status == 200 && r.header("x-ratelimit-limit").is_some() {
                    answered = true;
                    break;
                }
                eprintln!("warm-up {key}: {r:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
            assert!(
                answered,
                "Envoy never answered with hivemind's headers\n{}",
                self.logs()
            );
        }
    }

    /// `GET path` through Envoy's ingress, with `x-api-key` if given.
    pub fn get(&self, path: &str, api_key: Option<&str>) -> HttpResponse {
        let headers: Vec<(&str, &str)> = api_key.map(|k| ("x-api-key", k)).into_iter().collect();
        http_request(self.ingress, "GET", path, &headers, b"")
            .unwrap_or_else(|e| panic!("GET {path} via Envoy: {e}\n{}", self.logs()))
    }

    /// Envoy's and every node's logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = format!("--- envoy ---\n{}", self.envoy.log());
        for node in &self.nodes {
            out.push_str(&format!(
                "--- {} ---\n{}",
                node.service,
                node.server.stderr()
            ));
        }
        out
    }
}

/// Writes a settings file holding what the service's `HIVEMIND_*` environment sets (the layer
/// the image's environment is), nested at `__`. The peers are left out: they name compose host
/// names, and the caller passes the local seeds instead.
fn settings_file(service: &str, env: &[(String, String)]) -> (tempfile::TempDir, PathBuf) {
    let mut root = Mapping::new();
    for (name, value) in env {
        let Some(path) = name.strip_prefix("HIVEMIND_") else {
            continue;
        };
        if path == "MESH__PEERS" {
            continue;
        }
        let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        let (last, parents) = keys.split_last().expect("split yields one part at least");
        let mut map = &mut root;
        for key in parents {
            map = map
                .entry(Value::from(key.as_str()))
                .or_insert_with(|| Value::Mapping(Mapping::new()))
                .as_mapping_mut()
                .unwrap_or_else(|| panic!("{service}: {name} nests under a value"));
        }
        map.insert(Value::from(last.as_str()), Value::from(value.as_str()));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hivemind.yaml");
    let yaml = serde_yaml::to_string(&root).expect("settings to YAML");
    std::fs::write(&path, yaml).expect("write settings");
    (dir, path)
}

fn path_arg(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_owned()
}

/// The Envoy config at `path` for loopback: listeners and admin on 127.0.0.1 (port 0, Envoy
/// picks; a listener a cluster also points at, like the upstream, gets one free port for both),
/// and every endpoint naming one of `host_names` replaced by one endpoint per address in
/// `rls` (what DNS gives Envoy in the compose network).
pub fn local_envoy_config(path: &Path, host_names: &[String], rls: &[SocketAddr]) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut config: Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));

    // Endpoints on Envoy's own loopback: the listeners they reach get fixed free ports.
    let mut internal: Vec<(u64, u16)> = Vec::new();
    for endpoint in endpoints(&config) {
        let socket = &endpoint["address"]["socket_address"];
        if socket["address"] == "127.0.0.1" {
            let port = socket["port_value"].as_u64().expect("endpoint port");
            if !internal.iter().any(|(p, _)| *p == port) {
                internal.push((port, free_port()));
            }
        }
    }
    let set = |socket: &mut Value, port: u64| {
        socket["address"] = Value::from("127.0.0.1");
        socket["port_value"] = Value::from(port);
    };
    set(&mut config["admin"]["address"]["socket_address"], 0);
    for listener in config["static_resources"]["listeners"]
        .as_sequence_mut()
        .expect("listeners")
    {
        let socket = &mut listener["address"]["socket_address"];
        let port = socket["port_value"].as_u64().expect("listener port");
        let local = internal
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(0, |(_, l)| *l);
        set(socket, u64::from(local));
    }
    for cluster in config["static_resources"]["clusters"]
        .as_sequence_mut()
        .expect("clusters")
    {
        for locality in cluster["load_assignment"]["endpoints"]
            .as_sequence_mut()
            .into_iter()
            .flatten()
        {
            let lb_endpoints = locality["lb_endpoints"]
                .as_sequence_mut()
                .expect("lb_endpoints");
            let mut local = Vec::new();
            for endpoint in lb_endpoints.drain(..) {
                let socket = &endpoint["endpoint"]["address"]["socket_address"];
                let host = socket["address"]
                    .as_str()
                    .expect("endpoint address")
                    .to_owned();
                if host_names.contains(&host) {
                    for addr in rls {
                        let mut one = endpoint.clone();
                        let socket = &mut one["endpoint"]["address"]["socket_address"];
                        set(socket, u64::from(addr.port()));
                        local.push(one);
                    }
                } else if host == "127.0.0.1" {
                    let port = socket["port_value"].as_u64().expect("endpoint port");
                    let (_, mapped) = internal.iter().find(|(p, _)| *p == port).unwrap();
                    let mut one = endpoint.clone();
                    set(
                        &mut one["endpoint"]["address"]["socket_address"],
                        u64::from(*mapped),
                    );
                    local.push(one);
                } else {
                    panic!("{}: endpoint {host} is neither a hivemind service nor Envoy's own loopback", path.display());
                }
            }
            *lb_endpoints = local;
        }
    }
    serde_yaml::to_string(&config).expect("Envoy config to YAML")
}

/// Every cluster endpoint (`load_assignment.endpoints[].lb_endpoints[].endpoint`).
fn endpoints(config: &Value) -> Vec<Value> {
    config["static_resources"]["clusters"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|c| {
            c["load_assignment"]["endpoints"]
                .as_sequence()
                .into_iter()
                .flatten()
        })
        .flat_map(|l| l["lb_endpoints"].as_sequence().into_iter().flatten())
        .map(|e| e["endpoint"].clone())
        .collect()
}
