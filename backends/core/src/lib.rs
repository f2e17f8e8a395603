//! hivemind-core: the contract between hivemind's rate limit service and the places counts live.
//!
//! - [`window`]: rate limit units, wall-clock time and the epoch-aligned fixed windows every node
//!   agrees on without talking.
//! - [`hit`]: what a request asks of a strategy ([`Hit`]) and what it gets back ([`Decision`]).
//! - [`strategy`]: the [`SyncStrategy`] trait every backend implements, what it is built with,
//!   and its error type.
//! - [`status`]: what a strategy reports about itself (health, counters, backend figures).
//! - [`counters`]: lock-free local counters (packed window|count in one `AtomicU64`), bounded in
//!   memory.
//! - [`sweeper`]: the background sweep of ended windows from the local counters.
//! - [`standalone`]: the strategy that uses only the local counters.
//! - [`settings`]: what the settings sections share (list and secret serde, range checks).
//! - [`listening`]: the line a serving process prints with its addresses, printed by the server
//!   and parsed by the test launcher.
//! - `testsuite` (feature `testsuite`): the conformance suite every strategy runs.
//!
//! This crate has no network dependencies on purpose: the gRPC server and the gossip and Redis
//! backends depend on it, never the other way round.

pub mod clock;
pub mod counters;
pub mod hit;
pub mod listening;
pub mod settings;
pub mod standalone;
pub mod status;
pub mod strategy;
pub mod sweeper;
#[cfg(feature = "testsuite")]
pub mod testsuite;
pub mod window;

pub use clock::{Clock, ManualClock, SystemClock};
pub use counters::{window_tag, CounterChange, CounterSnapshot, CounterStats, LocalCounters};
pub use hit::{request_admitted, Decision, Enforcement, Hit, Limit};
pub use listening::{ListeningLine, ListeningLineError};
pub use standalone::Standalone;
pub use status::{CounterReport, Health, HealthState, StrategyStatus};
pub use strategy::{
    BoxError, CounterConfig, ErrorKind, StrategyContext, StrategyError, SyncStrategy,
};
pub use sweeper::Sweeper;
pub use window::{Unit, UnixTime, Window};
