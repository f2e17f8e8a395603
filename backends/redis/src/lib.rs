//! hivemind-redis: the `redis` strategy. Counters live in Redis (or a Redis Cluster), so every
//! node sharing it admits exactly the limit per window.
//!
//! - [`script`]: the Lua script that checks every counter of a request and increments only if
//!   the request is admitted, in one round trip, and the pure encoding of keys and arguments.
//! - [`connection`]: one server (multiplexed `ConnectionManager`) or a cluster (cluster-async
//!   client) behind one enum, with per-call timeouts and error mapping.
//! - [`policy`]: the up/down state machine with reconnection backoff, and the failure policies'
//!   answers (`allow`, `deny`, `error`, `local`).
//! - [`settings`]: the `redis` settings section (password redacted in output).
//! - [`strategy`]: [`Redis`], the [`SyncStrategy`](hivemind_core::SyncStrategy) implementation,
//!   with the over-limit cache and its status for `/healthcheck` and `/stats`.
//!
//! Sentinel is not supported: redis-rs 1.8's Sentinel client has no `ConnectionManager`-style
//! reconnection of its own, so it would need its own failover loop; point `redis.url` at a
//! proxy or use Cluster instead.

pub mod connection;
pub mod policy;
pub mod script;
pub mod settings;
pub mod strategy;

pub use settings::{redact_url, FailurePolicy, RedisSettings, RedisSettingsError};
pub use strategy::{Redis, RedisBuildError};
