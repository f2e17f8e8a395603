//! The gRPC face of the limiter: `envoy.service.ratelimit.v3.RateLimitService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{debug, Instrument};

use crate::limiter::{LimitError, Limiter};
use crate::proto::{Code, RateLimitRequest, RateLimitResponse, RateLimitService};
use crate::telemetry;

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
        let span = telemetry::request_span(
            request.metadata(),
            &request.get_ref().domain,
            request.get_ref().descriptors.len(),
            self.limiter.strategy().name(),
        );
        let request = request.into_inner();
        let decided = if span.is_disabled() {
            self.limiter.decide(&request).await
        } else {
            let decided = self.limiter.decide(&request).instrument(span.clone()).await;
            let (outcome, error) = outcome(&decided);
            telemetry::record_outcome(&span, outcome, error);
            decided
        };
        match decided {
            Ok(response) => Ok(Response::new(response)),
            Err(e) => {
                debug!(domain = %request.domain, error = %e, "rate limit request not decided");
                Err(e.to_status())
            }
        }
    }
}

/// How a call ended, for its span: `ok`, `over_limit` or the error's kind, and whether it is
/// an error.
fn outcome(decided: &Result<RateLimitResponse, LimitError>) -> (&'static str, bool) {
    match decided {
        Ok(response) if response.overall_code == Code::OverLimit as i32 => ("over_limit", false),
        Ok(_) => ("ok", false),
        Err(LimitError::InvalidRequest(_)) => ("invalid_request", true),
        Err(LimitError::Strategy(e)) => (e.kind().as_str(), true),
    }
}
