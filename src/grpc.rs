//! The gRPC face of the limiter: `envoy.service.ratelimit.v3.RateLimitService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::debug;

use crate::limiter::Limiter;
use crate::proto::{RateLimitRequest, RateLimitResponse, RateLimitService};

/// Answers Envoy's `ShouldRateLimit` calls with the shared [`Limiter`].
#[derive(Clone)]
pub struct RateLimitGrpc {
    /// The decision logic shared with the admin `/json` endpoint.
    limiter: Arc<Limiter>,
}

impl RateLimitGrpc {
    /// A service deciding with `limiter`.
    pub fn new(limiter: Arc<Limiter>) -> Self {
        RateLimitGrpc { limiter }
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitGrpc {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        match self.limiter.decide(&request).await {
            Ok(response) => Ok(Response::new(response)),
            Err(e) => {
                debug!(domain = %request.domain, error = %e, "rate limit request not decided");
                Err(e.to_status())
            }
        }
    }
}
