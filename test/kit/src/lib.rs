//! hivemind-testkit: one launcher for the real third-party processes hivemind's tests and
//! harness run, on loopback with free ports, killed when their handles drop.
//!
//! - [`RedisServer`]: one `redis-server` (Debian's), persistence off, ready once it answers PING;
//!   [`RedisServer::kill`] and [`RedisServer::restart`] (same port) for failure tests,
//!   [`RedisServer::pause`]/[`RedisServer::resume`] (SIGSTOP/SIGCONT) for a hung server.
//! - [`RedisCluster`]: several `redis-server --cluster-enabled yes` joined with
//!   `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`.
//! - [`query`]: one command over a raw RESP connection (for `INFO commandstats`, `FLUSHALL`),
//!   so the tests need no Redis client of their own.
//!
//! A missing `redis-server` or `redis-cli` panics with the command that installs it: the tests
//! that need them never skip silently.
//!
//! - [`launch`]: one real `hivemind` process, ready once it printed its listening line
//!   ([`hivemind_core::ListeningLine`], the type the server prints it with), logs in files,
//!   killed on drop. The server's tests (`test/support`'s `Server`) start theirs with it.
//! - [`cluster`]: N such processes (standalone, gossip or redis), readiness waits, kill / pause /
//!   resume / restart; what the benchmark harness runs.
//! - [`http`]: the one admin client (HTTP/1.1 over loopback, bounded), blocking and async.

pub mod cluster;
pub mod http;
pub mod launch;

pub use cluster::Strategy;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How to install what the Redis tests run (Debian).
pub const REDIS_INSTALL: &str =
    "apt-get update -q && apt-get install -y -q redis-server redis-tools";

/// How long a server gets to answer PING after it starts.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `$ENV_VAR` if set, else `name` on `PATH`; panics with the install command otherwise.
fn binary(name: &str, env_var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env_var}={} is not a file", p.display());
        return p;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "{name} not found (looked at ${env_var} and PATH); the Redis tests run a real one.\n\
         Install it with:\n    {REDIS_INSTALL}\nor point {env_var} at the binary."
    );
}

/// The `redis-server` binary (`$REDIS_SERVER_BIN` or `PATH`).
pub fn redis_server_binary() -> PathBuf {
    binary("redis-server", "REDIS_SERVER_BIN")
}

/// The `redis-cli` binary (`$REDIS_CLI_BIN` or `PATH`).
pub fn redis_cli_binary() -> PathBuf {
    binary("redis-cli", "REDIS_CLI_BIN")
}

/// A running `redis-server` on 127.0.0.1, killed on drop.
pub struct RedisServer {
    /// The process while it runs (`None` after [`RedisServer::kill`]).
    child: Option<Child>,
    /// The port it listens on, kept across restarts.
    port: u16,
    /// Extra arguments (cluster mode), repeated on restart.
    extra: Vec<String>,
    /// Holds the working directory (cluster config, logs) as long as the server runs.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a standalone server on a free port with persistence off and waits for PING.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a standalone server on `port` (e.g. one a hivemind was pointed at before any
    /// Redis ran there) and waits for PING.
    pub fn start_on(port: u16) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port,
            extra: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        server
            .spawn()
            .unwrap_or_else(|why| panic!("redis-server on port {port} did not start: {why}"));
        server
    }

    /// Starts a server with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // A free port can be taken between the probe and redis binding it: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            let mut server = RedisServer {
                child: None,
                port: free_port(),
                extra: extra.clone(),
                dir: tempfile::tempdir().expect("tempdir"),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(why) => last = why,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let bin = redis_server_binary();
        let log = self.dir.path().join(format!("redis-{}.log", self.port));
        let mut child = Command::new(&bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut err);
                }
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("exited ({status}): {err}\n{log}"));
            }
            if query(self.addr(), &["PING"]).is_ok_and(|r| r == "PONG") {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no PONG within {STARTUP_TIMEOUT:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills it (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: persistence is off) and waits for PING.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The old socket may linger a moment.
                Err(why) if Instant::now() > deadline => panic!("redis-server restart: {why}"),
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Stops the process (SIGSTOP) without closing its sockets: a hung server.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Continues a paused process (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let pid = self.pid().expect("redis-server is not running");
        let status = Command::new("kill")
            .args([which, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {which} {pid} failed");
    }

    /// One command's reply (see [`query`]); panics on an I/O error.
    pub fn query(&self, args: &[&str]) -> String {
        query(self.addr(), args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// The `calls` figure of one command in `INFO commandstats` (e.g. `evalsha`), 0 if absent.
    pub fn command_calls(&self, command: &str) -> u64 {
        command_calls(&self.query(&["INFO", "commandstats"]), command)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a paused (SIGSTOPped) process too.
        self.kill();
    }
}

/// The `calls=N` figure of `cmdstat_<command>` in an `INFO commandstats` reply.
pub fn command_calls(info: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{}:", command.to_ascii_lowercase());
    info.lines()
        .find_map(|line| line.trim().strip_prefix(prefix.as_str()))
        .and_then(|fields| {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Several `redis-server --cluster-enabled yes` joined into one cluster (no replicas).
pub struct RedisCluster {
    /// The member servers, in the order given to `redis-cli --cluster create`.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` (at least 3) cluster-enabled servers, creates the cluster, and waits until
    /// every node reports `cluster_state:ok`.
    pub fn start(n: usize) -> RedisCluster {
        assert!(
            n >= 3,
            "redis-cli --cluster create needs at least 3 primaries"
        );
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|s| s.addr().to_string()).collect();
        let cli = redis_cli_binary();
        let out = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", cli.display()));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while !cluster
            .nodes
            .iter()
            .all(|s| s.query(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {STARTUP_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// `redis://127.0.0.1:P` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The sum of one command's `calls` over the nodes.
    pub fn command_calls(&self, command: &str) -> u64 {
        self.nodes.iter().map(|s| s.command_calls(command)).sum()
    }
}

/// Sends one command over a fresh RESP connection and returns its reply as text: simple
/// strings, integers and bulk strings as they are, arrays as their items one per line, errors as
/// `Err`. 5 s timeouts.
pub fn query(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let timeout = Duration::from_secs(5);
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    (&stream).write_all(out.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let reply = read_reply(&mut reader)?;
    reply.map_err(std::io::Error::other)
}

type Reply = Result<String, String>;

fn read_reply(reader: &mut impl BufRead) -> std::io::Result<Reply> {
    use std::io::{Error, ErrorKind};
    let bad = |what: &str| Error::new(ErrorKind::InvalidData, format!("bad RESP: {what}"));
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(bad("connection closed"));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(1.min(line.len()));
    match kind {
        "+" | ":" => Ok(Ok(rest.to_owned())),
        "-" => Ok(Err(rest.to_owned())),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| bad("bulk length"))?;
            if len < 0 {
                return Ok(Ok(String::new()));
            }
            let mut buf = vec![0u8; len as usize + 2];
            reader.read_exact(&mut buf)?;
            buf.truncate(len as usize);
            Ok(Ok(String::from_utf8_lossy(&buf).into_owned()))
        }
        "*" => {
            let len: i64 = rest.parse().map_err(|_| bad("array length"))?;
            let mut items = Vec::new();
            for _ in 0..len.max(0) {
                match read_reply(reader)? {
                    Ok(item) => items.push(item),
                    Err(e) => return Ok(Err(e)),
                }
            }
            Ok(Ok(items.join("\n")))
        }
        _ => Err(bad(line)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_calls_are_read() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=12,usec=3,usec_per_call=0.25\r\n\
                    cmdstat_eval:calls=1,usec=9\r\n";
        assert_eq!(command_calls(info, "evalsha"), 12);
        assert_eq!(command_calls(info, "EVAL"), 1);
        assert_eq!(command_calls(info, "get"), 0);
    }

    #[test]
    fn a_server_starts_restarts_and_answers() {
        let mut redis = RedisServer::start();
        assert_eq!(redis.query(&["SET", "k", "v"]), "OK");
        assert_eq!(redis.query(&["GET", "k"]), "v");
        let port = redis.port();
        redis.kill();
        assert!(query(redis.addr(), &["PING"]).is_err());
        redis.restart();
        assert_eq!(redis.port(), port);
        assert_eq!(redis.query(&["GET", "k"]), "", "persistence is off");
    }
}
