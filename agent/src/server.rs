//! The HTTP endpoint: `/metrics` from the snapshot pre-rendered by the last tick (no I/O to /proc,
//! cgroupfs or NVML here), `/healthz` from heartbeats, `/readyz` from readiness.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tally_exporters::prometheus_text::CONTENT_TYPE;

use crate::health::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let rendered = shared.rendered();
    let gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|enc| {
            let mut parts = enc.trim().split(';');
            let name = parts.next().unwrap_or("");
            let refused = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            name.eq_ignore_ascii_case("gzip") && !refused
        });
    let content_type = (header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    let vary = (header::VARY, HeaderValue::from_static("accept-encoding"));
    if gzip && rendered.gzip.is_empty() {
        // Not compressed this tick because nobody had asked: plain text is always acceptable,
        // and the next tick compresses.
        shared.want_gzip();
    }
    if gzip && !rendered.gzip.is_empty() {
        let encoding = (header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        ([content_type, encoding, vary], rendered.gzip.clone()).into_response()
    } else {
        ([content_type, vary], rendered.text.clone()).into_response()
    }
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let (healthy, components) = shared.health();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "components": components,
    });
    (status, Json(body)).into_response()
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}
