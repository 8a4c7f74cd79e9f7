//! The admin HTTP server every component runs: `/healthz` (the process is
//! alive), `/ready` (every readiness condition holds), `/metrics`
//! (Prometheus/OpenMetrics text) and whatever `/debug/*` routes the component
//! adds.

use std::sync::{Arc, Mutex, MutexGuard};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Readiness;

/// What a component exposes on its admin port: its metrics and readiness.
/// Cloning shares them, so the monolith can hand one `Admin` to every
/// component and serve them all on one port.
#[derive(Clone)]
pub struct Admin {
    registry: Arc<Mutex<Registry>>,
    readiness: Readiness,
}

impl Admin {
    /// A new admin whose metric names all start with `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            registry: Arc::new(Mutex::new(Registry::with_prefix(prefix))),
            readiness: Readiness::new(),
        }
    }

    /// The metric registry, for registering a component's metrics at start-up.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The admin routes, to serve alone or merged with a component's own.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }

    /// Serves [`Admin::router`] plus `extra` on `listener` until `shutdown`.
    pub async fn serve(
        &self,
        listener: TcpListener,
        extra: Router,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router().merge(extra))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }
}

async fn ready(State(admin): State<Admin>) -> impl IntoResponse {
    let unmet = admin.readiness.unmet();
    if unmet.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", unmet.join(", ")),
        )
    }
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    let mut body = String::new();
    if let Err(e) = encode(&mut body, &admin.registry()) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encoding metrics failed: {e}\n"),
        );
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
