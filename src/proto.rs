//! Generated Envoy rate limit service types (`envoy.service.ratelimit.v3`) from the vendored
//! protos in `proto/`, and the short names the rest of the server uses.

#![allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]

include!(concat!(env!("OUT_DIR"), "/envoy_rls.rs"));

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_rls_descriptor.bin"));

pub use envoy::config::core::v3::HeaderValue;
pub use envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::{Entry as DescriptorEntry, RateLimitOverride},
    RateLimitDescriptor,
};
pub use envoy::service::ratelimit::v3::{
    rate_limit_response::{
        rate_limit::Unit as ProtoUnit, Code, DescriptorStatus, RateLimit as CurrentLimit,
    },
    rate_limit_service_client::RateLimitServiceClient,
    rate_limit_service_server::{RateLimitService, RateLimitServiceServer},
    RateLimitRequest, RateLimitResponse,
};
