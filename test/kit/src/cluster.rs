//! Real `hivemind` clusters on loopback, one process per node, started by [`crate::launch`].
//!
//! A [`Cluster`] starts N copies of the server binary, each in its own directory with its own
//! copy of the rules file, its stdout and its stderr. Every node binds gRPC and admin HTTP on
//! `127.0.0.1:0` and reports the ports on its [`ListeningLine`], which [`Cluster::start`] waits
//! for, bounded, failing with the node's stderr.
//!
//! Nodes run with their directory as working directory and without the `HIVEMIND_*` variables of
//! the calling environment, so neither a `config/hivemind.yaml` nor a stray variable of the
//! person running the benchmark changes what is measured; what the caller wants goes through
//! [`ClusterSpec::env`] and [`ClusterSpec::args`]. A [`Node`] kills its process when dropped.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::http;
pub use crate::launch::ListeningLine;
use crate::launch::{Launch, LaunchError, Process, Spawned};

/// How nodes agree on counts (the server's `--strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Local counters only: each node enforces the whole limit by itself.
    Standalone,
    /// Counts shared over the chitchat mesh; node 0 is every other node's seed peer.
    Gossip,
    /// Counts in one Redis, shared by every node; the caller points the nodes at it
    /// (`HIVEMIND_REDIS__URL` in [`ClusterSpec::env`]).
    Redis,
}

impl Strategy {
    /// The name the server's `--strategy` flag takes.
    pub const fn as_str(self) -> &'static str {
        match self {
            Strategy::Standalone => "standalone",
            Strategy::Gossip => "gossip",
            Strategy::Redis => "redis",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "standalone" => Ok(Strategy::Standalone),
            "gossip" => Ok(Strategy::Gossip),
            "redis" => Ok(Strategy::Redis),
            other => Err(format!(
                "unknown strategy {other:?} (expected standalone, gossip or redis)"
            )),
        }
    }
}

/// Everything needed to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The `hivemind` executable to run (see [`build_hivemind`]).
    pub binary: PathBuf,
    /// How many processes to start.
    pub nodes: usize,
    /// Which strategy every node runs; decides the mesh flags.
    pub strategy: Strategy,
    /// Rules file contents; each node gets its own copy, so a test can later edit one node's
    /// rules (hot reload) without touching the others.
    pub rules_yaml: String,
    /// Extra flags appended to every node's command line, after the ones the harness sets.
    pub args: Vec<String>,
    /// Extra environment for every node, e.g. `HIVEMIND_MESH__GOSSIP_INTERVAL=100ms`.
    pub env: Vec<(String, String)>,
    /// How long one node may take to print its listening line before the start fails.
    pub start_timeout: Duration,
}

impl ClusterSpec {
    /// A spec with no extra args or env and a 30 s start timeout.
    pub fn new(
        binary: impl Into<PathBuf>,
        strategy: Strategy,
        nodes: usize,
        rules_yaml: impl Into<String>,
    ) -> Self {
        ClusterSpec {
            binary: binary.into(),
            nodes,
            strategy,
            rules_yaml: rules_yaml.into(),
            args: Vec::new(),
            env: Vec::new(),
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// What can go wrong starting, probing or stopping a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A cluster needs at least one node.
    #[error("a cluster needs at least one node")]
    NoNodes,
    /// Files or sockets the harness needs could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The process could not be started at all.
    #[error("cannot run {binary}: {source}")]
    Spawn {
        /// The executable.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A node exited or stayed silent instead of printing its listening line.
    #[error("node {node} did not start: {why}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}")]
    Start {
        /// The node index.
        node: usize,
        /// Exit status or timeout.
        why: String,
        /// What it printed on stdout.
        stdout: String,
        /// Its logs.
        stderr: String,
    },
    /// A node never satisfied the readiness check in time.
    #[error("node {node} not ready within {timeout:?}: {last}")]
    NotReady {
        /// The first node that was not ready.
        node: usize,
        /// The bound that was exceeded.
        timeout: Duration,
        /// The last answer (or error) from its admin endpoint.
        last: String,
    },
    /// A node exited on its own (not through [`Cluster::kill`]).
    #[error("node {node} exited ({status})\n--- stderr ---\n{stderr}")]
    Exited {
        /// The node index.
        node: usize,
        /// How it exited.
        status: ExitStatus,
        /// Its logs.
        stderr: String,
    },
    /// A node index that does not exist.
    #[error("no node {0}")]
    NoSuchNode(usize),
    /// Building the server with cargo failed.
    #[error("cargo build of hivemind failed: {0}")]
    Build(String),
}

impl ClusterError {
    /// Node `node`'s launch failure as a cluster error.
    fn launch(node: usize, e: LaunchError) -> Self {
        match e {
            LaunchError::Io { what, source } => ClusterError::Io { what, source },
            LaunchError::Spawn { binary, source } => ClusterError::Spawn { binary, source },
            LaunchError::Start {
                why,
                stdout,
                stderr,
            } => ClusterError::Start {
                node,
                why,
                stdout,
                stderr,
            },
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// One running server process; killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Node {
    /// Position in the cluster (0 is the gossip seed).
    pub index: usize,
    /// The `--node-id` it was given (`node0`, `node1`, …), to match mesh views to processes.
    pub id: String,
    /// Where its RLS gRPC service listens: what load goes to.
    pub grpc: SocketAddr,
    /// Where its admin HTTP listens: readiness and stats.
    pub admin: SocketAddr,
    /// Its mesh UDP address: the one it printed, else the one it was given (gossip only).
    pub mesh: Option<SocketAddr>,
    /// Its directory: rules file, stdout and stderr.
    pub dir: PathBuf,
    /// The process; `kill` and drop use it.
    process: Process,
    /// Set by [`Cluster::kill`]: the node's exit was wanted, not a crash.
    killed: bool,
}

impl Node {
    /// The node's rules file (edit it to exercise hot reload on this node only).
    pub fn rules_path(&self) -> PathBuf {
        self.dir.join("rules.yaml")
    }

    /// What the node has logged so far (its stderr).
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether [`Cluster::kill`] stopped this node.
    pub fn is_killed(&self) -> bool {
        self.killed
    }

    /// Whether the process has exited, and how, without waiting.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.process.try_exit_status()
    }
}

/// One node's answer to the readiness probe (`GET /healthcheck` on its admin address).
#[derive(Debug, Clone)]
pub struct Health {
    /// Which node answered.
    pub node: usize,
    /// HTTP status (200 while serving, 503 while shutting down).
    pub status: u16,
    /// The body, for checks that need more than the status (e.g. the mesh's peer count).
    pub body: String,
}

/// N running nodes plus the temporary directory that holds their files.
#[derive(Debug)]
pub struct Cluster {
    /// Every node started, killed ones included, so indices stay stable and results per node
    /// keep their meaning.
    nodes: Vec<Node>,
    /// What the nodes run: decides what "formed" means in [`Cluster::wait_formed`].
    strategy: Strategy,
    /// What the nodes were started with (the binary made absolute), to restart one.
    spec: ClusterSpec,
    /// Declared after `nodes` so the processes die before their files are removed.
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts every node of `spec` and waits until each has printed its listening line.
    ///
    /// Gossip nodes get `--node-id nodeI --mesh-addr 127.0.0.1:PORT`, and every node but node 0
    /// `--peers` with node 0's mesh address. Mesh ports are picked by binding UDP
    /// `127.0.0.1:0` and releasing the socket just before the nodes start.
    pub fn start(spec: &ClusterSpec) -> Result<Cluster, ClusterError> {
        if spec.nodes == 0 {
            return Err(ClusterError::NoNodes);
        }
        let dir = tempfile::Builder::new()
            .prefix("hivemind-harness-")
            .tempdir()
            .map_err(io_err("creating the cluster directory"))?;
        let mesh_addrs = match spec.strategy {
            Strategy::Gossip => free_udp_addrs(spec.nodes)?,
            Strategy::Standalone | Strategy::Redis => Vec::new(),
        };
        let binary = std::path::absolute(&spec.binary)
            .map_err(io_err(format!("resolving {}", spec.binary.display())))?;

        let mut cluster = Cluster {
            nodes: Vec::with_capacity(spec.nodes),
            strategy: spec.strategy,
            spec: ClusterSpec {
                binary,
                ..spec.clone()
            },
            dir,
        };
        // Every node spawns before any is waited for, so they start side by side.
        let mut spawned = Vec::with_capacity(spec.nodes);
        for index in 0..spec.nodes {
            // Node 0 is every other node's seed (empty for strategies without a mesh).
            let peers = match index {
                0 => &[][..],
                _ => mesh_addrs.get(..1).unwrap_or_default(),
            };
            let listen = Listen {
                grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
                admin: SocketAddr::from(([127, 0, 0, 1], 0)),
                mesh: mesh_addrs.get(index).copied(),
            };
            spawned.push(spawn_node(
                &cluster.spec,
                cluster.dir.path(),
                index,
                listen,
                peers,
            )?);
        }
        let deadline = Instant::now() + spec.start_timeout;
        for starting in spawned {
            let node = starting.wait_listening(deadline)?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    /// How many nodes were started (killed ones included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `index` (killed or not), if it exists.
    pub fn node(&self, index: usize) -> Option<&Node> {
        self.nodes.get(index)
    }

    /// The nodes not killed, in index order.
    pub fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| !n.killed)
    }

    /// Every node's gRPC address by index, killed nodes included (calls to them fail, which
    /// is what a node-failure run wants to see).
    pub fn grpc_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.grpc).collect()
    }

    /// The directory holding every node's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills node `index` (SIGKILL: no graceful leave, as in a crash). Killing a killed node
    /// is a no-op.
    pub fn kill(&mut self, index: usize) -> Result<(), ClusterError> {
        let node = self
            .nodes
            .get_mut(index)
            .ok_or(ClusterError::NoSuchNode(index))?;
        node.killed = true;
        node.process.kill();
        Ok(())
    }

    /// Stops node `index` with SIGSTOP: it keeps its sockets but answers nothing and sends
    /// nothing, as a node cut off by a partition (or hung) would.
    pub fn pause(&mut self, index: usize) -> Result<(), ClusterError> {
        self.signal(index, "STOP")
    }

    /// Continues a paused node (SIGCONT).
    pub fn resume(&mut self, index: usize) -> Result<(), ClusterError> {
        self.signal(index, "CONT")
    }

    fn signal(&mut self, index: usize, which: &str) -> Result<(), ClusterError> {
        let node = self
            .nodes
            .get(index)
            .ok_or(ClusterError::NoSuchNode(index))?;
        node.process
            .signal(which)
            .map_err(io_err(format!("signalling node {index}")))
    }

    /// Kills node `index` if it runs and starts it again on the same gRPC, admin and mesh
    /// addresses with the same `--node-id` (a gossip node rejoins through every other node),
    /// waiting for its listening line: a crash and a supervisor's restart.
    pub fn restart(&mut self, index: usize) -> Result<(), ClusterError> {
        let old = self
            .nodes
            .get_mut(index)
            .ok_or(ClusterError::NoSuchNode(index))?;
        old.process.kill();
        let listen = Listen {
            grpc: old.grpc,
            admin: old.admin,
            mesh: old.mesh,
        };
        let peers: Vec<SocketAddr> = self
            .nodes
            .iter()
            .filter(|n| n.index != index)
            .filter_map(|n| n.mesh)
            .collect();
        let deadline = Instant::now() + self.spec.start_timeout;
        let node = spawn_node(&self.spec, self.dir.path(), index, listen, &peers)?
            .wait_listening(deadline)?;
        self.nodes[index] = node;
        Ok(())
    }

    /// Nodes that exited without being killed through [`Cluster::kill`], with their status
    /// and stderr: a crashed server invalidates a measurement.
    pub fn exited(&mut self) -> Vec<(usize, ExitStatus, String)> {
        self.nodes
            .iter_mut()
            .filter(|n| !n.killed)
            .filter_map(|n| {
                n.try_exit_status()
                    .map(|status| (n.index, status, n.stderr()))
            })
            .collect()
    }

    /// Waits until every live node's `GET /healthcheck` answers 200.
    ///
    /// Gossip nodes that need the mesh formed first: [`Cluster::wait_formed`].
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), ClusterError> {
        self.wait_until(timeout, |health| health.status == 200)
            .await
    }

    /// Waits until every live node answers 200 and, for gossip, reports at least every other
    /// live node as a live peer (`peers: N live` in its health body), so that measurements
    /// start on a formed mesh. For standalone this is [`Cluster::wait_ready`].
    ///
    /// "At least": a killed node may still look live to the others until failure detection
    /// catches up. A gossip node whose health body has no peer count never counts as formed,
    /// so a change of that format fails loudly (the error shows the body).
    pub async fn wait_formed(&mut self, timeout: Duration) -> Result<(), ClusterError> {
        if self.strategy != Strategy::Gossip {
            return self.wait_ready(timeout).await;
        }
        let others = self.live().count().saturating_sub(1);
        self.wait_until(timeout, |health| {
            health.status == 200 && live_peers(&health.body).is_some_and(|n| n >= others)
        })
        .await
    }

    /// Polls every live node's `GET /healthcheck` (every 50 ms, each probe bounded to 1 s)
    /// until `ready` holds for all of them at once, or `timeout` passes. A node that exits
    /// meanwhile (e.g. on invalid rules, which the server reads after it starts listening)
    /// fails the wait at once, with its stderr.
    pub async fn wait_until(
        &mut self,
        timeout: Duration,
        ready: impl Fn(&Health) -> bool,
    ) -> Result<(), ClusterError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((node, status, stderr)) = self.exited().into_iter().next() {
                return Err(ClusterError::Exited {
                    node,
                    status,
                    stderr,
                });
            }
            let mut not_ready = None;
            let probes: Vec<(usize, SocketAddr)> =
                self.live().map(|n| (n.index, n.admin)).collect();
            for (index, admin) in probes {
                let probe = http::get(admin, "/healthcheck", Duration::from_secs(1)).await;
                let verdict = match probe {
                    Ok((status, body)) => {
                        let health = Health {
                            node: index,
                            status,
                            body,
                        };
                        if ready(&health) {
                            None
                        } else {
                            Some(format!("HTTP {status}: {}", health.body.trim()))
                        }
                    }
                    Err(e) => Some(format!("GET /healthcheck: {e}")),
                };
                if let Some(last) = verdict {
                    not_ready = Some((index, last));
                    break;
                }
            }
            let Some((node, last)) = not_ready else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::NotReady {
                    node,
                    timeout,
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The live peer count in a gossip node's health body (`OK`, then `peers: N live, M dead`).
pub fn live_peers(health_body: &str) -> Option<usize> {
    health_body.lines().find_map(|line| {
        line.trim()
            .strip_prefix("peers:")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// `n` loopback UDP addresses that were free a moment ago. All sockets are held until all
/// ports are known, so the ports are distinct.
fn free_udp_addrs(n: usize) -> Result<Vec<SocketAddr>, ClusterError> {
    let sockets = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err("binding a free UDP port"))?;
    sockets
        .iter()
        .map(UdpSocket::local_addr)
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err("reading a UDP port"))
}

/// Where a node listens (port 0: any free port, reported on its listening line).
#[derive(Debug, Clone, Copy)]
struct Listen {
    /// gRPC address.
    grpc: SocketAddr,
    /// Admin HTTP address.
    admin: SocketAddr,
    /// Mesh UDP address (gossip only).
    mesh: Option<SocketAddr>,
}

/// A node spawned, not yet known to listen.
struct SpawnedNode {
    /// Position in the cluster.
    index: usize,
    /// Its `--node-id`.
    id: String,
    /// The mesh address it was given (gossip only).
    mesh: Option<SocketAddr>,
    /// Its directory.
    dir: PathBuf,
    /// The process.
    spawned: Spawned,
}

impl SpawnedNode {
    /// Waits for the listening line until `deadline`: the node, or the failure with its output.
    fn wait_listening(self, deadline: Instant) -> Result<Node, ClusterError> {
        let index = self.index;
        let process = self
            .spawned
            .wait_listening(deadline)
            .map_err(|e| ClusterError::launch(index, e))?;
        let listening = process.listening();
        Ok(Node {
            index,
            id: self.id,
            grpc: listening.grpc,
            admin: listening.admin,
            mesh: listening.mesh.or(self.mesh),
            dir: self.dir,
            process,
            killed: false,
        })
    }
}

/// Starts node `index` in `root/nodeI`; a restart keeps the rules file and appends to the logs
/// of the previous run (stdout starts afresh, so the new listening line is the one read).
fn spawn_node(
    spec: &ClusterSpec,
    root: &Path,
    index: usize,
    listen: Listen,
    peers: &[SocketAddr],
) -> Result<SpawnedNode, ClusterError> {
    let dir = root.join(format!("node{index}"));
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let rules = dir.join("rules.yaml");
    if !rules.exists() {
        std::fs::write(&rules, &spec.rules_yaml)
            .map_err(io_err(format!("writing {}", rules.display())))?;
    }
    let id = format!("node{index}");

    let mut launch = Launch::new(&spec.binary, &dir)
        .current_dir(&dir)
        .arg("-c")
        .arg(&rules)
        .arg("-a")
        .arg(listen.grpc.to_string())
        .arg("--admin-addr")
        .arg(listen.admin.to_string())
        .args(["--strategy", spec.strategy.as_str()])
        .start_timeout(spec.start_timeout);
    let mut mesh = None;
    if let (Strategy::Gossip, Some(own)) = (spec.strategy, listen.mesh) {
        mesh = Some(own);
        launch = launch
            .args(["--node-id", &id])
            .arg("--mesh-addr")
            .arg(own.to_string());
        if !peers.is_empty() {
            let peers: Vec<String> = peers.iter().map(SocketAddr::to_string).collect();
            launch = launch.arg("--peers").arg(peers.join(","));
        }
    }
    launch = launch.args(&spec.args);
    for (key, value) in &spec.env {
        launch = launch.env(key, value);
    }
    let spawned = launch.spawn().map_err(|e| ClusterError::launch(index, e))?;
    Ok(SpawnedNode {
        index,
        id,
        mesh,
        dir,
        spawned,
    })
}

/// A cargo build profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `cargo build` (fast to build, for tests).
    Debug,
    /// `cargo build --release` (for figures worth reporting).
    Release,
}

/// The workspace this crate belongs to (two levels above its manifest).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where `cargo build` puts the server by default: `target/{debug,release}/hivemind` in the
/// workspace (or under `$CARGO_TARGET_DIR`).
pub fn default_binary(profile: Profile) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let dir = match profile {
        Profile::Debug => "debug",
        Profile::Release => "release",
    };
    target.join(dir).join("hivemind")
}

/// One `KEY=VAL` of extra node environment, as the harness binaries' `--env` takes it.
pub fn parse_env_var(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VAL, got {s:?}")),
    }
}

/// Runs `cargo build [--release] -p hivemind --bin hivemind` in the workspace and returns the
/// executable cargo reports (so a custom target directory works too). Cargo's own output is
/// kept and returned in the error if the build fails.
pub fn build_hivemind(profile: Profile) -> Result<PathBuf, ClusterError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "-p", "hivemind", "--bin", "hivemind"])
        .arg("--message-format=json-render-diagnostics");
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("running cargo"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(ClusterError::Build(format!("{}\n{stderr}", output.status)));
    }
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "hivemind")
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| ClusterError::Build(format!("no hivemind executable reported\n{stderr}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_peers_are_read_from_the_gossip_health_body() {
        assert_eq!(live_peers("OK\npeers: 8 live, 0 dead\n"), Some(8));
        assert_eq!(live_peers("OK\npeers: 0 live, 2 dead"), Some(0));
        assert_eq!(live_peers("OK\n"), None);
        assert_eq!(live_peers("OK\npeers: many\n"), None);
    }

    #[test]
    fn free_udp_ports_are_distinct() {
        let addrs = free_udp_addrs(5).unwrap();
        let mut ports: Vec<u16> = addrs.iter().map(SocketAddr::port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 5);
    }

    #[test]
    fn strategy_names_round_trip() {
        for s in [Strategy::Standalone, Strategy::Gossip, Strategy::Redis] {
            assert_eq!(s.as_str().parse::<Strategy>(), Ok(s));
        }
        assert!("memcached".parse::<Strategy>().is_err());
    }

    #[test]
    fn a_missing_binary_fails_to_spawn_with_its_path() {
        let spec = ClusterSpec::new("/nonexistent/hivemind", Strategy::Standalone, 1, "");
        let err = Cluster::start(&spec).unwrap_err();
        assert!(matches!(err, ClusterError::Spawn { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/hivemind"));
    }

    #[test]
    fn zero_nodes_is_an_error() {
        let spec = ClusterSpec::new("hivemind", Strategy::Standalone, 0, "");
        assert!(matches!(Cluster::start(&spec), Err(ClusterError::NoNodes)));
    }
}
