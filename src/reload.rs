//! Rules hot reload: polls the rules path and swaps in a new [`RuleSet`] when it changes.
//!
//! Polling a cheap fingerprint (file names, inode, size and modification time, following
//! symlinks) catches in-place writes, atomic renames and Kubernetes ConfigMap `..data` symlink
//! swaps alike, where inotify-style watching misses some of them. A changed fingerprint triggers a
//! full load; a bad new file keeps the old rules, logs why and is recorded in [`ReloadStatus`].
//! Requests never wait: the rules sit behind an `ArcSwap`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::limiter::RulesStore;
use crate::rules::RuleSet;

/// What the reloader has seen, for health, `/rlconfig` and `/stats`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReloadStatus {
    /// Successful loads, the first one included.
    pub loads: u64,
    /// Failed loads (the previous rules stayed in force).
    pub errors: u64,
    /// The last failure, cleared by the next successful load.
    pub last_error: Option<String>,
}

/// A file's identity and version as seen through symlinks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    /// The path as listed (not resolved), so a rename into place changes the fingerprint.
    path: PathBuf,
    /// Inode and device: an atomic rename or a symlink swap changes them.
    inode: (u64, u64),
    /// Size in bytes.
    len: u64,
    /// Modification time: an in-place write changes it.
    modified: Option<SystemTime>,
}

/// The fingerprint of the rules path: a stamp per file (a directory's direct entries, sorted).
fn fingerprint(path: &Path) -> Vec<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let stamp = |p: PathBuf| {
        std::fs::metadata(&p).ok().map(|m| FileStamp {
            inode: (m.dev(), m.ino()),
            len: m.len(),
            modified: m.modified().ok(),
            path: p,
        })
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            let mut stamps: Vec<FileStamp> = std::fs::read_dir(path)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.path())
                        .filter_map(stamp)
                        .collect()
                })
                .unwrap_or_default();
            stamps.sort_by(|a, b| a.path.cmp(&b.path));
            stamps
        }
        _ => stamp(path.to_path_buf()).into_iter().collect(),
    }
}

/// Stops the reloader when dropped.
#[derive(Debug)]
pub struct ReloadHandle {
    /// The polling task.
    task: JoinHandle<()>,
    /// Shared with the task.
    status: Arc<Mutex<ReloadStatus>>,
}

impl ReloadHandle {
    /// What the reloader has seen so far.
    pub fn status(&self) -> ReloadStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The shared status, for the admin endpoints.
    pub fn status_cell(&self) -> Arc<Mutex<ReloadStatus>> {
        self.status.clone()
    }
}

impl Drop for ReloadHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches `path` every `interval` and stores each good new rule set in `store`. The rules in
/// `store` are taken as loaded from `path` now.
pub fn spawn(path: PathBuf, interval: Duration, store: Arc<RulesStore>) -> ReloadHandle {
    let status = Arc::new(Mutex::new(ReloadStatus {
        loads: 1,
        ..Default::default()
    }));
    let shared = status.clone();
    let task = tokio::spawn(async move {
        let mut seen = fingerprint(&path);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let probe = path.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&probe)).await else {
                continue;
            };
            if now == seen {
                continue;
            }
            seen = now;
            let load = path.clone();
            let loaded = tokio::task::spawn_blocking(move || RuleSet::load(&load)).await;
            let mut status = match shared.lock() {
                Ok(status) => status,
                Err(poisoned) => poisoned.into_inner(),
            };
            match loaded {
                Ok(Ok(rules)) => {
                    if rules.hash() != store.load().hash() {
                        info!(
                            path = %path.display(),
                            hash = rules.hash(),
                            domains = rules.domains().count(),
                            "rules reloaded"
                        );
                        store.store(Arc::new(rules));
                    }
                    status.loads += 1;
                    status.last_error = None;
                }
                Ok(Err(e)) => {
                    warn!(path = %path.display(), error = %e, "rules reload failed; keeping the previous rules");
                    status.errors += 1;
                    status.last_error = Some(e.to_string());
                }
                Err(e) => {
                    warn!(error = %e, "rules reload task failed; keeping the previous rules");
                    status.errors += 1;
                    status.last_error = Some(e.to_string());
                }
            }
        }
    });
    ReloadHandle { task, status }
}
