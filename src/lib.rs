//! hivemind: a rate limit service for Envoy.
//!
//! It answers Envoy's global rate limit gRPC API (`envoy.service.ratelimit.v3`) with rules in the
//! envoyproxy/ratelimit YAML format, and counts through one of several strategies (see
//! `hivemind_core::SyncStrategy`). The parts, in request order:
//!
//! - [`settings`]: layered configuration (defaults, file, `HIVEMIND_*` env, flags);
//! - [`rules`]: the rules files: parsing, validation, matching; [`reload`] watches them;
//! - [`limiter`]: one request's decision: descriptors → hits → strategy → response;
//! - [`grpc`]: the tonic service around the limiter; [`admin`]: the admin HTTP endpoints;
//!   [`metrics`]: Prometheus figures at `/metrics`;
//! - [`strategies`]: the one place that names the backends and builds the configured one;
//! - [`server`]: wiring, listeners and graceful shutdown; [`event_loops`]: thread-per-core
//!   serving of the gRPC service; [`telemetry`]: logs; [`probe`]: `--healthcheck`, a probe of a
//!   running server for containers.

pub mod admin;
pub mod cli;
pub mod event_loops;
pub mod grpc;
pub mod json;
pub mod limiter;
pub mod metrics;
pub mod probe;
pub mod proto;
pub mod reload;
pub mod rules;
pub mod server;
pub mod settings;
pub mod strategies;
pub mod telemetry;
