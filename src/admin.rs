//! The admin HTTP endpoints, on their own listener (`admin.addr`):
//!
//! - `GET /healthcheck`: 200 `OK` while serving, 503 once shutdown has begun;
//! - `POST /json`: a `RateLimitRequest` in Envoy's JSON mapping, the response back (200 OK,
//!   429 OVER_LIMIT, 400 malformed, 503 backend unavailable), as envoyproxy/ratelimit's;
//! - `GET /rlconfig`: the rules in force, their hash and the reload status;
//! - `GET /stats`: counters and reload figures as JSON;
//! - `GET /mesh`: gossip membership (live and dead peers, generations) and mesh traffic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hivemind_core::LocalCounters;
use hivemind_gossip::{Gossip, PeerInfo};
use serde_json::json;

use crate::json::{parse_request, response_json};
use crate::limiter::{LimitError, Limiter};
use crate::proto::Code;
use crate::reload::ReloadStatus;

/// What the admin endpoints read.
pub struct AdminState {
    /// Decides `/json` requests, and holds the rules `/rlconfig` shows.
    pub limiter: Arc<Limiter>,
    /// The reloader's status, if the rules come from a watched path.
    pub reload: Option<Arc<Mutex<ReloadStatus>>>,
    /// The local counters, for `/stats`.
    pub counters: Arc<LocalCounters>,
    /// The gossip node, when the strategy is `gossip`: membership for `/healthcheck`, `/mesh`.
    pub gossip: Option<Arc<Gossip>>,
    /// Cleared when shutdown begins, so load balancers stop sending traffic.
    pub serving: Arc<AtomicBool>,
}

/// The admin router.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .route("/json", post(json_request))
        .route("/rlconfig", get(rlconfig))
        .route("/stats", get(stats))
        .route("/mesh", get(mesh))
        .with_state(state)
}

async fn healthcheck(State(state): State<Arc<AdminState>>) -> Response {
    if state.serving.load(Ordering::Acquire) {
        match &state.gossip {
            // The first line stays `OK` (what envoyproxy/ratelimit answers); the peer count
            // follows for people and probes that want it.
            Some(gossip) => {
                let m = gossip.membership();
                let body = format!("OK\npeers: {} live, {} dead\n", m.live.len(), m.dead.len());
                (StatusCode::OK, body).into_response()
            }
            None => (StatusCode::OK, "OK\n").into_response(),
        }
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    }
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
    let counters = state.counters.stats();
    Json(json!({
        "strategy": state.limiter.strategy().name(),
        "counters": {
            "live_keys": counters.live_keys,
            "max_keys": state.counters.max_keys(),
            "expired_keys": counters.expired,
            "evicted_keys": counters.evicted,
            "eviction_passes": counters.eviction_passes,
        },
        "rules": {
            "hash": state.limiter.rules().load().hash(),
            "reload": reload_status(&state),
        },
    }))
    .into_response()
}

async fn mesh(State(state): State<Arc<AdminState>>) -> Response {
    let Some(gossip) = &state.gossip else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "the strategy is not gossip: there is no mesh" })),
        )
            .into_response();
    };
    let m = gossip.membership();
    let (node_id, generation) = gossip.node();
    let peers = |list: &[PeerInfo]| -> Vec<serde_json::Value> {
        list.iter()
            .map(|p| json!({ "node_id": p.node_id, "generation": p.generation, "addr": p.addr.to_string() }))
            .collect()
    };
    let t = m.transport;
    Json(json!({
        "node_id": node_id,
        "generation": generation,
        "live": peers(&m.live),
        "dead": peers(&m.dead),
        "published_keys": m.published_keys,
        "peer_keys": m.peer_keys,
        "backlog": m.backlog,
        "absorb_dropped": m.absorb_dropped,
        "transport": {
            "datagrams_sent": t.datagrams_sent,
            "bytes_sent": t.bytes_sent,
            "datagrams_received": t.datagrams_received,
            "bytes_received": t.bytes_received,
            "rejected_auth": t.rejected_auth,
            "rejected_malformed": t.rejected_malformed,
        },
    }))
    .into_response()
}
