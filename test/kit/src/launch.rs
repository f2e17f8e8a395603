//! One real `hivemind` process on loopback: spawned with its stdout and stderr in files (not
//! pipes: a pipe nobody drains would eventually block the server's logging), ready once it has
//! printed its [`ListeningLine`], killed when its handle drops.
//!
//! The tests' `Server` (test/support) and the harness's [`crate::cluster::Cluster`] both start
//! their processes here. Starting is two steps, [`Launch::spawn`] then
//! [`Spawned::wait_listening`], so that a cluster can start every node before waiting for any;
//! [`Launch::start`] does both.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use hivemind_core::ListeningLine;

/// How long a process gets to print its listening line unless told otherwise.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong starting a process.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Its log files could not be created.
    #[error("{what}: {source}")]
    Io {
        /// What the launcher was doing.
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
    /// The process exited or stayed silent instead of printing its listening line.
    #[error("did not start: {why}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}")]
    Start {
        /// Exit status or timeout.
        why: String,
        /// What it printed on stdout.
        stdout: String,
        /// Its logs.
        stderr: String,
    },
}

/// How to start one process: the binary, its arguments and environment, where its logs go.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The `hivemind` executable.
    binary: PathBuf,
    /// Its command line after the binary.
    args: Vec<OsString>,
    /// Variables set for it, after the `HIVEMIND_*` ones of this process were removed.
    env: Vec<(OsString, OsString)>,
    /// Its working directory; `None` keeps the caller's (tests rely on the repository's
    /// `config/`).
    cwd: Option<PathBuf>,
    /// The directory of `stdout.log` and `stderr.log`.
    logs: PathBuf,
    /// The bound on [`Spawned::wait_listening`] used by [`Launch::start`].
    start_timeout: Duration,
}

impl Launch {
    /// Runs `binary` with no arguments, logs in `logs` (created if missing), the caller's
    /// working directory and a [`START_TIMEOUT`] bound.
    pub fn new(binary: impl Into<PathBuf>, logs: impl Into<PathBuf>) -> Self {
        Launch {
            binary: binary.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            logs: logs.into(),
            start_timeout: START_TIMEOUT,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets one environment variable. The process never inherits this process's `HIVEMIND_*`
    /// variables, so a stray one of the person running the tests changes nothing; what the
    /// caller wants goes through here.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the process in `dir`.
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Bounds [`Launch::start`]'s wait for the listening line.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Spawns and waits for the listening line.
    pub fn start(&self) -> Result<Process, LaunchError> {
        let deadline = Instant::now() + self.start_timeout;
        self.spawn()?.wait_listening(deadline)
    }

    /// Spawns without waiting. `stdout.log` starts afresh; `stderr.log` is appended to, so a
    /// restart in the same directory keeps the previous run's logs.
    pub fn spawn(&self) -> Result<Spawned, LaunchError> {
        let io_err = |what: String| move |source| LaunchError::Io { what, source };
        std::fs::create_dir_all(&self.logs)
            .map_err(io_err(format!("creating {}", self.logs.display())))?;
        let stdout = File::create(self.logs.join("stdout.log"))
            .map_err(io_err("creating stdout.log".into()))?;
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(self.logs.join("stderr.log"))
            .map_err(io_err("creating stderr.log".into()))?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HIVEMIND_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        Ok(Spawned {
            child,
            logs: self.logs.clone(),
            timeout: self.start_timeout,
        })
    }
}

/// A process spawned but not yet known to listen; killed and reaped when dropped.
#[derive(Debug)]
pub struct Spawned {
    /// The process.
    child: Child,
    /// Where its logs are.
    logs: PathBuf,
    /// Its launch's start timeout, to say what was exceeded.
    timeout: Duration,
}

impl Spawned {
    /// Polls its stdout for the listening line until `deadline`; on exit or timeout kills it
    /// and fails with what it printed.
    pub fn wait_listening(mut self, deadline: Instant) -> Result<Process, LaunchError> {
        loop {
            let stdout = read_lossy(&self.logs.join("stdout.log"));
            // Whole lines only: a line still being written could carry a cut-off port.
            let mut lines = stdout.split_inclusive('\n').filter(|l| l.ends_with('\n'));
            if let Some(listening) = lines.find_map(|l| l.trim_end().parse().ok()) {
                return Ok(Process {
                    spawned: self,
                    listening,
                });
            }
            let why = if let Ok(Some(status)) = self.child.try_wait() {
                format!("exited ({status})")
            } else if Instant::now() >= deadline {
                format!("no listening line within {:?}", self.timeout)
            } else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            self.kill();
            return Err(LaunchError::Start {
                why,
                stdout: read_lossy(&self.logs.join("stdout.log")),
                stderr: read_lossy(&self.logs.join("stderr.log")),
            });
        }
    }

    /// SIGKILL and reap. Idempotent.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running process that printed its listening line; killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Process {
    /// The process and its logs.
    spawned: Spawned,
    /// The addresses it reported.
    listening: ListeningLine,
}

impl Process {
    /// The addresses it reported.
    pub fn listening(&self) -> ListeningLine {
        self.listening
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.spawned.child.id()
    }

    /// The directory holding its `stdout.log` and `stderr.log`.
    pub fn logs(&self) -> &Path {
        &self.spawned.logs
    }

    /// What it has logged so far (its stderr).
    pub fn stderr(&self) -> String {
        read_lossy(&self.spawned.logs.join("stderr.log"))
    }

    /// What it has printed on stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.spawned.logs.join("stdout.log"))
    }

    /// Whether it has exited, and how, without waiting.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.spawned.child.try_wait().ok().flatten()
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`) with `kill(1)`.
    pub fn signal(&self, name: &str) -> io::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .stdin(Stdio::null())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "kill -{name} {}: {status}",
                self.pid()
            )))
        }
    }

    /// Waits at most `timeout` for it to exit on its own (e.g. after SIGTERM); `None` if it
    /// still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap. Idempotent.
    pub fn kill(&mut self) {
        self.spawned.kill();
    }
}

/// A file's contents as text, empty if it cannot be read.
pub(crate) fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_exits_without_listening_fails_with_its_output() {
        let logs = tempfile::tempdir().unwrap();
        let err = Launch::new("sh", logs.path())
            .args(["-c", "echo starting; echo oops >&2; exit 3"])
            .start()
            .unwrap_err();
        let LaunchError::Start {
            why,
            stdout,
            stderr,
        } = &err
        else {
            panic!("{err}");
        };
        assert!(why.contains("exited"), "{why}");
        assert_eq!((stdout.as_str(), stderr.as_str()), ("starting\n", "oops\n"));
    }

    #[test]
    fn the_listening_line_is_read_and_the_environment_is_clean() {
        let logs = tempfile::tempdir().unwrap();
        let line = ListeningLine {
            grpc: "127.0.0.1:1".parse().unwrap(),
            admin: "127.0.0.1:2".parse().unwrap(),
            mesh: None,
        };
        // What the launch sets reaches the process (stderr), and stdout carries the line.
        let script = format!("echo \"$HIVEMIND_PROBE\" >&2; echo '{line}'; exec sleep 30");
        let mut p = Launch::new("sh", logs.path())
            .args(["-c", script.as_str()])
            .env("HIVEMIND_PROBE", "given")
            .start()
            .unwrap();
        assert_eq!(p.listening(), line);
        assert_eq!(
            p.wait_exit(Duration::from_millis(50)),
            None,
            "still running"
        );
        p.signal("TERM").unwrap();
        let status = p.wait_exit(Duration::from_secs(10)).expect("exits on TERM");
        assert!(!status.success());
        assert_eq!(p.stderr(), "given\n");
    }

    #[test]
    fn a_line_still_being_written_is_not_read() {
        let logs = tempfile::tempdir().unwrap();
        // The admin port's last digit arrives half a second after the rest of the line.
        let script = "printf 'listening grpc=127.0.0.1:1 admin=127.0.0.1:2'; sleep 0.5; \
                      printf '0\\n'; exec sleep 30";
        let p = Launch::new("sh", logs.path())
            .args(["-c", script])
            .start()
            .unwrap();
        assert_eq!(p.listening().admin, "127.0.0.1:20".parse().unwrap());
    }

    #[test]
    fn a_silent_process_times_out_and_is_killed() {
        let logs = tempfile::tempdir().unwrap();
        let err = Launch::new("sleep", logs.path())
            .args(["30"])
            .start_timeout(Duration::from_millis(200))
            .start()
            .unwrap_err();
        assert!(
            err.to_string().contains("no listening line within"),
            "{err}"
        );
    }
}
