//! The admin HTTP server every component runs: `/healthz` (the process is
//! alive), `/ready` (every readiness condition holds), `/metrics`
//! (Prometheus/OpenMetrics text) and the JSON pages under `/debug/` that the
//! component registers (`/debug` lists them), `/version` (what runs, for
//! `meshctl version --remote`), POST `/logging?level=...`
//! (the log level, changed while running), and any routes of the
//! component's own (the proxy's Envoy-style endpoints).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Readiness;

/// A `/debug/{name}` page: a snapshot of some state, as JSON, shaped by
/// the query; an error is the client's (400).
type DebugPage =
    Arc<dyn Fn(&BTreeMap<String, String>) -> Result<serde_json::Value, String> + Send + Sync>;

/// What a component exposes on its admin port: its metrics, readiness and
/// debug pages. Cloning shares them, so the monolith can hand one `Admin` to
/// every component and serve them all on one port.
#[derive(Clone)]
pub struct Admin {
    /// The component's name: its metrics' prefix.
    name: Arc<str>,
    registry: Arc<Mutex<Registry>>,
    readiness: Readiness,
    debug_pages: Arc<Mutex<BTreeMap<String, DebugPage>>>,
    routes: Arc<Mutex<Router>>,
}

impl Admin {
    /// A new admin whose metric names all start with `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            name: prefix.into(),
            registry: Arc::new(Mutex::new(Registry::with_prefix(prefix))),
            readiness: Readiness::new(),
            debug_pages: Arc::default(),
            routes: Arc::default(),
        }
    }

    /// Adds a component's own routes; registered before the admin server
    /// starts serving (at the start of the component's run).
    pub fn add_routes(&self, routes: Router) {
        let mut current = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        *current = std::mem::take(&mut *current).merge(routes);
    }

    /// Serves `page()` as JSON at `/debug/{name}`.
    pub fn debug_page(
        &self,
        name: &str,
        page: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) {
        self.debug_query_page(name, move |_| Ok(page()));
    }

    /// Serves `page(query)` as JSON at `/debug/{name}?query`; its error
    /// is answered 400, as the query's fault.
    pub fn debug_query_page(
        &self,
        name: &str,
        page: impl Fn(&BTreeMap<String, String>) -> Result<serde_json::Value, String>
        + Send
        + Sync
        + 'static,
    ) {
        self.debug_pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), Arc::new(page));
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
            .route("/version", get(version))
            .route("/debug", get(debug_index))
            .route("/debug/{name}", get(debug_page))
            .route("/logging", axum::routing::post(logging))
            .with_state(self.clone())
            .merge(
                self.routes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            )
    }

    /// Serves [`Admin::router`] on `listener` until `shutdown`.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }
}

async fn ready(State(admin): State<Admin>) -> impl IntoResponse {
    let unmet = admin.readiness.unmet();
    let (status, mut text) = if unmet.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", unmet.join(", ")),
        )
    };
    for note in admin.readiness.notes() {
        text.push_str(&format!("note: {note}\n"));
    }
    (status, text)
}

/// The component, its version and the binary it runs in (the monolith
/// hosts several): upgraded one at a time, a mesh can run several versions.
async fn version(State(admin): State<Admin>) -> Json<serde_json::Value> {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_default();
    Json(serde_json::json!({
        "component": &*admin.name,
        "version": env!("CARGO_PKG_VERSION"),
        "binary": binary,
    }))
}

async fn debug_index(State(admin): State<Admin>) -> Json<Vec<String>> {
    Json(
        admin
            .debug_pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .map(|k| format!("/debug/{k}"))
            .collect(),
    )
}

async fn debug_page(
    State(admin): State<Admin>,
    Path(name): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let page = admin
        .debug_pages
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&name)
        .cloned();
    match page.map(|page| page(&query)) {
        Some(Ok(json)) => Json(json).into_response(),
        Some(Err(e)) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("no debug page {name:?}; see /debug\n"),
        )
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
struct LoggingQuery {
    level: String,
}

/// POST `/logging?level=debug`: what is logged from now on.
async fn logging(axum::extract::Query(q): axum::extract::Query<LoggingQuery>) -> Response {
    match crate::logging::set_level(&q.level) {
        Ok(()) => {
            tracing::info!(level = %q.level, "log level changed");
            format!("log level: {}\n", q.level).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
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
