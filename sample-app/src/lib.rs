//! The Bookinfo-like sample application, one binary playing each role.
//! Services are called by name (`http://reviews.bookinfo.svc.cluster.local:9080/...`)
//! through `HTTP_PROXY`, the sidecar's outbound listener in local mode,
//! and the `end-user` header is passed on, so that routes can match it.
//!
//! - `productpage`: `/productpage` gathers details and reviews into a page
//!   (JSON), naming which reviews version answered.
//! - `details`: `/details/{id}`, a book's details.
//! - `reviews`: `/reviews/{id}`; v1 has no ratings, v2 asks ratings and shows
//!   black stars, v3 red ones.
//! - `ratings`: `/ratings/{id}`, the stars.

use std::net::SocketAddr;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::get,
};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Productpage,
    Details,
    Reviews,
    Ratings,
}

#[derive(Debug, Parser)]
#[command(
    about = "The Bookinfo-like sample application: productpage, details, reviews or ratings."
)]
pub struct Args {
    #[arg(long, value_enum)]
    pub role: Role,
    /// The version it plays (reviews: v1, v2 or v3).
    #[arg(long, default_value = "v1")]
    pub version: String,
    #[arg(long, default_value = "127.0.0.1:9080")]
    pub listen: SocketAddr,
    /// The namespace of the services it calls.
    #[arg(long, default_value = "bookinfo")]
    pub namespace: String,
}

#[derive(Clone)]
struct App {
    version: String,
    namespace: String,
    /// Calls other services; honours `HTTP_PROXY`.
    client: reqwest::Client,
}

type Answer = Result<Json<Value>, (StatusCode, String)>;

impl App {
    fn url(&self, service: &str, path: &str) -> String {
        format!(
            "http://{service}.{}.svc.cluster.local:9080{path}",
            self.namespace
        )
    }

    /// GETs `path` of `service`, passing on the caller's `end-user` and
    /// trace headers.
    async fn call(&self, service: &str, path: &str, incoming: &HeaderMap) -> Result<Value, String> {
        let mut request = self.client.get(self.url(service, path));
        for name in [
            "end-user",
            "x-request-id",
            "traceparent",
            "tracestate",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-sampled",
        ] {
            if let Some(value) = incoming.get(name) {
                request = request.header(name, value);
            }
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{service}: {e}"))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| format!("{service}: {e}"))?;
        if !status.is_success() {
            return Err(format!("{service}: {status}: {}", body.trim()));
        }
        serde_json::from_str(&body).map_err(|e| format!("{service}: {e}: {body}"))
    }
}

async fn productpage(State(app): State<App>, headers: HeaderMap) -> Answer {
    // A failing backend shows in the page, as Bookinfo's does.
    let (details, reviews) = tokio::join!(
        app.call("details", "/details/0", &headers),
        app.call("reviews", "/reviews/0", &headers)
    );
    let part = |r: Result<Value, String>| r.unwrap_or_else(|e| json!({"error": e}));
    Ok(Json(json!({
        "product": "The Comedy of Errors",
        "user": headers.get("end-user").and_then(|v| v.to_str().ok()),
        "details": part(details),
        "reviews": part(reviews),
    })))
}

async fn details(Path(id): Path<u32>) -> Answer {
    Ok(Json(json!({
        "id": id, "author": "William Shakespeare", "year": 1595, "type": "paperback",
        "pages": 200, "publisher": "PublisherA", "language": "English",
    })))
}

async fn reviews(State(app): State<App>, Path(id): Path<u32>, headers: HeaderMap) -> Answer {
    let stars = match app.version.as_str() {
        "v1" => None,
        "v2" => Some("black"),
        _ => Some("red"),
    };
    let ratings = match stars {
        None => None,
        Some(color) => Some(
            match app
                .call("ratings", &format!("/ratings/{id}"), &headers)
                .await
            {
                Ok(r) => json!({"color": color, "stars": r["ratings"]}),
                Err(e) => json!({"error": e}),
            },
        ),
    };
    Ok(Json(json!({
        "id": id,
        "version": app.version,
        "reviews": [
            {"reviewer": "Reviewer1", "text": "An extremely entertaining play by Shakespeare.", "rating": ratings.clone()},
            {"reviewer": "Reviewer2", "text": "Absolutely fun and entertaining.", "rating": ratings},
        ],
    })))
}

async fn ratings(Path(id): Path<u32>) -> Answer {
    Ok(Json(
        json!({"id": id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}),
    ))
}

/// Serves `args.role` until SIGTERM or Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    component::logging::init(component::logging::LogFormat::Text, "info");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let app = App {
        version: args.version.clone(),
        namespace: args.namespace.clone(),
        client: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()?,
    };
    let routes = match args.role {
        Role::Productpage => Router::new().route("/productpage", get(productpage)),
        Role::Details => Router::new().route("/details/{id}", get(details)),
        Role::Reviews => Router::new().route("/reviews/{id}", get(reviews)),
        Role::Ratings => Router::new().route("/ratings/{id}", get(ratings)),
    }
    .route("/health", get(|| async { "ok\n" }))
    .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(role = ?args.role, version = %args.version, addr = %args.listen, "sample app serving");
    let shutdown = component::shutdown::on_signal();
    axum::serve(listener, routes)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
