//! The admin HTTP endpoints, on their own listener (`admin.addr`):
//!
//! - `GET /healthcheck`: 200 `OK` while serving (then the strategy's own lines, e.g. the peer
//!   count), 503 once shutdown has begun or while the strategy is down;
//! - `POST /json`: a `RateLimitRequest` in Envoy's JSON mapping, the response back (200 OK,
//!   429 OVER_LIMIT, 400 malformed, 503 backend unavailable), as envoyproxy/ratelimit's;
//! - `GET /rlconfig`: the rules in force, their hash and the reload status;
//! - `GET /stats`: the strategy's health, counters and figures, reload figures, and the gRPC
//!   serving model with each event loop's connection count, as JSON;
//! - `GET /metrics`: Prometheus metrics ([`crate::metrics`]);
//! - `GET /<view>`: each view the strategy offers ([`SyncStrategy::views`]), e.g. gossip's
//!   `/mesh` (live and dead peers, generations, mesh traffic).
//!
//! Nothing here names a backend: what a strategy shows comes through its status and views.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hivemind_core::{HealthState, SyncStrategy};
use serde_json::json;

use crate::event_loops::ServingStats;
use crate::json::{parse_request, response_json};
use crate::limiter::{LimitError, Limiter};
use crate::metrics::ScrapeFigures;
use crate::proto::Code;
use crate::reload::ReloadStatus;

/// What the admin endpoints read.
pub struct AdminState {
    /// Decides `/json` requests, and holds the rules `/rlconfig` shows.
    pub limiter: Arc<Limiter>,
    /// The reloader's status, if the rules come from a watched path.
    pub reload: Option<Arc<Mutex<ReloadStatus>>>,
    /// Cleared when shutdown begins, so load balancers stop sending traffic.
    pub serving: Arc<AtomicBool>,
    /// The gRPC serving model and per-event-loop connection counts, shown in `/stats`.
    pub server: Arc<ServingStats>,
}

/// The admin router.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .route("/json", post(json_request))
        .route("/rlconfig", get(rlconfig))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/{view}", get(strategy_view))
        .with_state(state)
}

fn strategy(state: &AdminState) -> &Arc<dyn SyncStrategy> {
    state.limiter.strategy()
}

async fn healthcheck(State(state): State<Arc<AdminState>>) -> Response {
    if !state.serving.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let health = strategy(&state).status().health;
    // The first line stays `OK` (what envoyproxy/ratelimit answers) while the strategy can
    // decide; its own lines (peers, Redis state) follow for people and probes that want them.
    let (code, first) = match health.state {
        HealthState::Serving => (StatusCode::OK, "OK"),
        HealthState::Degraded => (StatusCode::OK, "OK (degraded)"),
        HealthState::Down => (StatusCode::SERVICE_UNAVAILABLE, "DOWN"),
    };
    let mut body = format!("{first}\n");
    for line in &health.lines {
        body.push_str(line);
        body.push('\n');
    }
    (code, body).into_response()
}

async fn json_request(State(state): State<Arc<AdminState>>, body: Bytes) -> Response {
    let request = match parse_request(&body) {
        Ok(request) => request,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": e.to_string() })),
            )
                .into_response()
        }
    };
    match state.limiter.decide(&request).await {
        Ok(response) => {
            let status = if response.overall_code == Code::OverLimit as i32 {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::OK
            };
            (status, Json(response_json(&response))).into_response()
        }
        Err(e) => {
            let status = match &e {
                LimitError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
                LimitError::Strategy(s) if s.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
                LimitError::Strategy(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, Json(json!({ "error": e.to_string() }))).into_response()
        }
    }
}

fn reload_status(state: &AdminState) -> Option<ReloadStatus> {
    state
        .reload
        .as_ref()
        .map(|r| r.lock().map(|s| s.clone()).unwrap_or_default())
}

async fn rlconfig(State(state): State<Arc<AdminState>>) -> Response {
    let rules = state.limiter.rules().load();
    let mut body = rules.to_json();
    if let Some(object) = body.as_object_mut() {
        object.insert("reload".into(), json!(reload_status(&state)));
    }
    Json(body).into_response()
}

async fn stats(State(state): State<Arc<AdminState>>) -> Response {
    let strategy = strategy(&state);
    let status = strategy.status();
    Json(json!({
        "strategy": strategy.name(),
        "health": status.health,
        "counters": status.counters,
        "backend": status.details,
        "server": state.server.to_json(),
        "rules": {
            "hash": state.limiter.rules().load().hash(),
            "reload": reload_status(&state),
        },
    }))
    .into_response()
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let Some(metrics) = state.limiter.metrics() else {
        return (
            StatusCode::NOT_FOUND,
            "metrics are not recorded by this server\n",
        )
            .into_response();
    };
    let strategy = strategy(&state);
    let status = strategy.status();
    let rules = state.limiter.rules().load();
    let reload = reload_status(&state);
    let body = metrics.render(&ScrapeFigures {
        strategy: strategy.name(),
        status: &status,
        rules_hash: rules.hash(),
        reload: reload.as_ref(),
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn strategy_view(State(state): State<Arc<AdminState>>, Path(view): Path<String>) -> Response {
    let strategy = strategy(&state);
    match strategy.view(&view) {
        Some(body) => Json(body).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({
                "error": format!(
                    "no admin endpoint /{view}: strategy {} offers {:?}",
                    strategy.name(),
                    strategy.views()
                ),
            })),
        )
            .into_response(),
    }
}
