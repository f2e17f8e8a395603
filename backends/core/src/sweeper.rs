//! The background sweep of ended windows, shared by every strategy that keeps local counters.

use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::clock::Clock;
use crate::counters::LocalCounters;

/// A thread that drops ended windows from [`LocalCounters`] every period (the first sweep one
/// period after start). Dropping the handle, or [`Sweeper::stop`], stops it.
#[derive(Debug)]
pub struct Sweeper {
    /// Dropping the sender wakes and stops the thread.
    stop: Mutex<Option<mpsc::Sender<()>>>,
}

impl Sweeper {
    /// Sweeps `counters` every `every` by `clock`.
    pub fn spawn(counters: Arc<LocalCounters>, clock: Arc<dyn Clock>, every: Duration) -> Sweeper {
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("hivemind-sweeper".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    counters.sweep(clock.now());
                }
            })
            .expect("spawning the counter sweeper thread");
        Sweeper {
            stop: Mutex::new(Some(stop)),
        }
    }

    /// Stops the thread. Idempotent.
    pub fn stop(&self) {
        self.stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}
