//! Real `hivemind` processes on loopback, one per node.
//!
//! A [`Cluster`] starts N copies of the server binary, each in its own directory with its own
//! copy of the rules file, its stdout and its stderr (files, not pipes: a pipe nobody drains
//! would eventually block the server's logging). Every node binds gRPC and admin HTTP on
//! `127.0.0.1:0` and reports the ports on one stdout line, `listening grpc=ADDR admin=ADDR`
//! (gossip nodes add ` mesh=ADDR`), which [`Cluster::start`] waits for, bounded, failing with
//! the node's stderr.
//!
//! Nodes run with their directory as working directory and without the `HIVEMIND_*` variables of
//! the calling environment, so neither a `config/hivemind.yaml` nor a stray variable of the
//! person running the benchmark changes what is measured; what the caller wants goes through
//! [`ClusterSpec::env`] and [`ClusterSpec::args`]. A [`Node`] kills its process when dropped.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    child: Child,
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
        read_lossy(&self.dir.join("stderr.log"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether [`Cluster::kill`] stopped this node.
    pub fn is_killed(&self) -> bool {
        self.killed
    }

    /// Whether the process has exited, and how, without waiting.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL and reap. Idempotent.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
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
            let node = spawn_node(&cluster.spec, cluster.dir.path(), index, listen, peers)?;
            cluster.nodes.push(node);
        }
        let deadline = Instant::now() + spec.start_timeout;
        for node in &mut cluster.nodes {
            wait_listening(node, deadline, spec.start_timeout)?;
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
        node.kill();
        Ok(())
    }

    /// Stops node `index` with SIGSTOP: it keeps its sockets but answers nothing and sends
    /// nothing, as a node cut off by a partition (or hung) would.
    pub fn pause(&mut self, index: usize) -> Result<(), ClusterError> {
        self.signal(index, "-STOP")
    }

    /// Continues a paused node (SIGCONT).
    pub fn resume(&mut self, index: usize) -> Result<(), ClusterError> {
        self.signal(index, "-CONT")
    }

    fn signal(&mut self, index: usize, which: &str) -> Result<(), ClusterError> {
        let node = self
            .nodes
            .get(index)
            .ok_or(ClusterError::NoSuchNode(index))?;
        let status = Command::new("kill")
            .args([which, &node.pid().to_string()])
            .stdin(Stdio::null())
            .status()
            .map_err(io_err("running kill"))?;
        if status.success() {
            Ok(())
        } else {
            Err(ClusterError::Io {
                what: format!("kill {which} {}", node.pid()),
                source: io::Error::other(status.to_string()),
            })
        }
    }

    /// Kills node `index` if it runs and starts it again on the same gRPC, admin and mesh
    /// addresses with the same `--node-id` (a gossip node rejoins through every other node),
    /// waiting for its listening line: a crash and a supervisor's restart.
    pub fn restart(&mut self, index: usize) -> Result<(), ClusterError> {
        let old = self
            .nodes
            .get_mut(index)
            .ok_or(ClusterError::NoSuchNode(index))?;
        old.kill();
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
        let mut node = spawn_node(&self.spec, self.dir.path(), index, listen, &peers)?;
        let deadline = Instant::now() + self.spec.start_timeout;
        wait_listening(&mut node, deadline, self.spec.start_timeout)?;
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
                let probe = http_get(admin, "/healthcheck", Duration::from_secs(1)).await;
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

/// Starts node `index` in `root/nodeI`; a restart keeps the rules file and appends to the logs
/// of the previous run (stdout starts afresh, so the new listening line is the one read).
fn spawn_node(
    spec: &ClusterSpec,
    root: &Path,
    index: usize,
    listen: Listen,
    peers: &[SocketAddr],
) -> Result<Node, ClusterError> {
    let dir = root.join(format!("node{index}"));
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let rules = dir.join("rules.yaml");
    if !rules.exists() {
        std::fs::write(&rules, &spec.rules_yaml)
            .map_err(io_err(format!("writing {}", rules.display())))?;
    }
    let stdout = File::create(dir.join("stdout.log")).map_err(io_err("creating stdout.log"))?;
    let stderr = File::options()
        .create(true)
        .append(true)
        .open(dir.join("stderr.log"))
        .map_err(io_err("creating stderr.log"))?;
    let id = format!("node{index}");

    let mut cmd = Command::new(&spec.binary);
    cmd.current_dir(&dir)
        .arg("-c")
        .arg(&rules)
        .arg("-a")
        .arg(listen.grpc.to_string())
        .arg("--admin-addr")
        .arg(listen.admin.to_string())
        .args(["--strategy", spec.strategy.as_str()]);
    let mut mesh = None;
    if let (Strategy::Gossip, Some(own)) = (spec.strategy, listen.mesh) {
        mesh = Some(own);
        cmd.args(["--node-id", &id])
            .args(["--mesh-addr", &own.to_string()]);
        if !peers.is_empty() {
            let peers: Vec<String> = peers.iter().map(SocketAddr::to_string).collect();
            cmd.args(["--peers", &peers.join(",")]);
        }
    }
    cmd.args(&spec.args);
    for key in inherited_hivemind_vars() {
        cmd.env_remove(key);
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let child = cmd.spawn().map_err(|source| ClusterError::Spawn {
        binary: spec.binary.clone(),
        source,
    })?;
    Ok(Node {
        index,
        id,
        grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        mesh,
        dir,
        child,
        killed: false,
    })
}

/// `HIVEMIND_*` variables of this process, which nodes must not inherit.
fn inherited_hivemind_vars() -> Vec<OsString> {
    std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| k.to_string_lossy().starts_with("HIVEMIND_"))
        .collect()
}

/// Polls the node's stdout file for its listening line until `deadline`.
fn wait_listening(
    node: &mut Node,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), ClusterError> {
    let stdout_path = node.dir.join("stdout.log");
    loop {
        let stdout = read_lossy(&stdout_path);
        if let Some(line) = stdout.lines().find(|l| l.starts_with("listening ")) {
            if let Some(addrs) = parse_listening(line) {
                node.grpc = addrs.grpc;
                node.admin = addrs.admin;
                node.mesh = addrs.mesh.or(node.mesh);
                return Ok(());
            }
        }
        let why = if let Some(status) = node.try_exit_status() {
            Some(format!("exited ({status})"))
        } else if Instant::now() >= deadline {
            Some(format!("no listening line within {timeout:?}"))
        } else {
            None
        };
        if let Some(why) = why {
            node.kill();
            return Err(ClusterError::Start {
                node: node.index,
                why,
                stdout: read_lossy(&stdout_path),
                stderr: node.stderr(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The addresses a node reports on its listening line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListeningLine {
    /// `grpc=ADDR`.
    pub grpc: SocketAddr,
    /// `admin=ADDR`.
    pub admin: SocketAddr,
    /// `mesh=ADDR`, printed by gossip nodes only.
    pub mesh: Option<SocketAddr>,
}

/// Parses `listening grpc=ADDR admin=ADDR [mesh=ADDR]`; tokens may come in any order and
/// unknown tokens are ignored, so the server can add more later.
pub fn parse_listening(line: &str) -> Option<ListeningLine> {
    let mut tokens = line.split_whitespace();
    if tokens.next() != Some("listening") {
        return None;
    }
    let (mut grpc, mut admin, mut mesh) = (None, None, None);
    for token in tokens {
        let Some((key, value)) = token.split_once('=') else {
            continue;
        };
        let slot = match key {
            "grpc" => &mut grpc,
            "admin" => &mut admin,
            "mesh" => &mut mesh,
            _ => continue,
        };
        *slot = Some(value.parse().ok()?);
    }
    Some(ListeningLine {
        grpc: grpc?,
        admin: admin?,
        mesh,
    })
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// `GET path` over a fresh HTTP/1.1 connection (`Connection: close`), the whole exchange
/// bounded by `timeout`: returns the status and the body.
///
/// Deliberately minimal (no chunked decoding: the admin endpoints send `Content-Length`); it
/// saves the harness an HTTP client dependency.
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        // Bounded: admin answers are small; refuse anything over 1 MiB.
        (&mut stream).take(1 << 20).read_to_end(&mut raw).await?;
        Ok::<_, io::Error>(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, format!("no answer in {timeout:?}"))
        })??;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((
        status,
        String::from_utf8_lossy(&raw[split + 4..]).into_owned(),
    ))
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
    fn listening_line_is_parsed_with_or_without_mesh() {
        let l = parse_listening("listening grpc=127.0.0.1:4001 admin=127.0.0.1:4002").unwrap();
        assert_eq!(l.grpc, "127.0.0.1:4001".parse().unwrap());
        assert_eq!(l.admin, "127.0.0.1:4002".parse().unwrap());
        assert_eq!(l.mesh, None);
        let l = parse_listening(
            "listening mesh=127.0.0.1:7000 grpc=127.0.0.1:1 admin=127.0.0.1:2 extra=x",
        )
        .unwrap();
        assert_eq!(l.mesh, Some("127.0.0.1:7000".parse().unwrap()));
    }

    #[test]
    fn other_lines_and_bad_addresses_are_not_listening_lines() {
        assert_eq!(
            parse_listening("hello grpc=127.0.0.1:1 admin=127.0.0.1:2"),
            None
        );
        assert_eq!(parse_listening("listening grpc=127.0.0.1:1"), None);
        assert_eq!(
            parse_listening("listening grpc=nope admin=127.0.0.1:2"),
            None
        );
    }

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
