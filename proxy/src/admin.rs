//! The proxy's Envoy-style admin endpoints, on the admin port (15000):
//! `/config_dump` (what it holds, as JSON: xDS versions and NACKs, its
//! certificate, and the compiled listeners, routes and clusters), `/clusters` (endpoints and
//! their state, one per line as Envoy prints them), `/stats/prometheus`,
//! `/quitquitquit` (POST: stop); besides the stats port (15090,
//! `/stats/prometheus`) and the health port (15020, `/healthz/ready`) that
//! Istio's probes and scrapers use.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::{get, post},
};
use component::{Admin, CancellationToken};
use serde_json::{Value, json};
use tokio::sync::watch;

use rustls::pki_types::{CertificateDer, pem::PemObject};

use crate::{
    agent::CredentialsWatch,
    config::{
        Snapshot,
        cluster::Discovery,
        listener::{App, Routes},
        route::Action,
        tls::Source,
    },
    secrets::Secrets,
    upstream::Upstreams,
    xds::XdsState,
};

/// What the admin endpoints show.
#[derive(Clone)]
pub struct Views {
    /// The node id the proxy gives Pilot.
    pub node: String,
    pub admin: Admin,
    pub xds: Arc<XdsState>,
    pub config: watch::Receiver<Arc<Snapshot>>,
    pub upstreams: Arc<Upstreams>,
    pub credentials: CredentialsWatch,
    /// The Gateways' credentials (SDS).
    pub secrets: Arc<Secrets>,
    pub shutdown: CancellationToken,
}

/// The admin port's own routes.
pub fn routes(views: Views) -> Router {
    Router::new()
        .route("/config_dump", get(config_dump))
        .route("/clusters", get(clusters))
        .route("/stats/prometheus", get(prometheus))
        .route("/quitquitquit", post(quit))
        .with_state(views)
}

async fn config_dump(State(v): State<Views>) -> impl IntoResponse {
    let snapshot = v.config.borrow().clone();
    let xds = v
        .xds
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let listeners: Vec<Value> = snapshot
        .listeners
        .values()
        .map(|l| {
            let chains: Vec<Value> = l
                .chains
                .iter()
                .map(|c| {
                    let app = match &c.app {
                        App::Http(h) => match &h.routes {
                            Routes::Rds(name) => json!({"http": {"rds": name}}),
                            Routes::Inline(t) => json!({"http": {"routes": t.name}}),
                        },
                        App::Tcp(t) => json!({"tcp": {"clusters": t.clusters}}),
                    };
                    json!({
                        "destination_port": c.destination_port,
                        "transport": c.transport,
                        "alpn": c.alpn,
                        "tls": c.tls.as_ref().map(|t| json!({
                            "require_client_certificate": t.require_client_certificate,
                            "peer_identities": t.peer_identities,
                        })),
                        "app": app,
                    })
                })
                .collect();
            json!({"name": l.name, "address": l.address.to_string(), "bind": l.bind, "chains": chains})
        })
        .collect();
    let mut routes: Vec<Value> = snapshot
        .routes
        .values()
        .map(|t| {
            let hosts: Vec<Value> = t
                .virtual_hosts
                .iter()
                .map(|vh| {
                    let routes: Vec<Value> = vh
                        .routes
                        .iter()
                        .map(|r| {
                            let action = match &r.action {
                                Action::Forward(f) => json!({"clusters": f.clusters.iter().map(|c| json!([c.name, c.weight])).collect::<Vec<_>>(), "timeout_ms": f.timeout.map(|t| t.as_millis() as u64), "retries": f.retry.as_ref().map(|r| r.attempts)}),
                                Action::Redirect { host, path, code } => json!({"redirect": {"host": host, "path": path, "code": code}}),
                                Action::Direct { status, .. } => json!({"direct": status}),
                            };
                            json!({"name": r.name, "action": action, "fault": r.fault.is_some()})
                        })
                        .collect();
                    json!({"name": vh.name, "routes": routes})
                })
                .collect();
            json!({"name": t.name, "virtual_hosts": hosts})
        })
        .collect();
    routes.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let clusters: Vec<Value> = v
        .upstreams
        .all()
        .iter()
        .map(|c| {
            let discovery = match &c.config.discovery {
                Discovery::Eds(name) => json!({"eds": name}),
                Discovery::Fixed(targets) => json!({"fixed": targets}),
                Discovery::OriginalDst => json!("original_dst"),
                Discovery::BlackHole => json!("black_hole"),
            };
            json!({
                "name": c.config.name,
                "discovery": discovery,
                "lb": format!("{:?}", c.config.lb),
                "http2": c.config.http2,
                "tls": c.config.tls.as_ref().map(|t| json!({"peer_identities": t.peer_identities, "alpn": t.alpn})),
                "endpoints": c.endpoints().iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let certificate = v.credentials.borrow().as_ref().map(|c| {
        let mut leaf = c.chain.first().map(|der| validity(der)).unwrap_or_default();
        leaf["identity"] = json!(c.identity.to_string());
        leaf["root"] = validity(&c.root);
        leaf
    });
    // The Gateways' credentials the listeners present, as found now.
    let named: std::collections::BTreeSet<&str> = snapshot
        .listeners
        .values()
        .flat_map(|l| &l.chains)
        .filter_map(|c| match c.tls.as_ref()?.certificate.as_ref()? {
            (Source::Credential(name), _) => Some(name.as_str()),
            _ => None,
        })
        .collect();
    let gateway_credentials: Vec<Value> = named
        .into_iter()
        .map(|name| {
            let mut found = match v.secrets.certificate(name) {
                Ok((pem, _)) => match CertificateDer::pem_slice_iter(&pem).next() {
                    Some(Ok(der)) => validity(&der),
                    _ => json!({"error": "its certificate is not PEM"}),
                },
                Err(e) => json!({"error": e}),
            };
            found["name"] = json!(name);
            found
        })
        .collect();
    let flavour = *v.xds.mode.lock().unwrap_or_else(|e| e.into_inner());
    axum::Json(json!({
        "node": v.node,
        "xds": xds,
        "xds_flavour": flavour,
        "certificate": certificate,
        "gateway_credentials": gateway_credentials,
        "synced": snapshot.synced,
        "listeners": listeners,
        "routes": routes,
        "clusters": clusters,
    }))
}

/// A certificate's serial number and validity, as `proxy-config secret`
/// shows them.
fn validity(der: &[u8]) -> Value {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return json!({"error": "the certificate does not parse"});
    };
    let time = |t: x509_parser::time::ASN1Time| {
        let at =
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.timestamp().max(0) as u64);
        humantime::format_rfc3339_seconds(at).to_string()
    };
    json!({
        "serial_number": cert.raw_serial_as_string().replace(':', ""),
        "not_before": time(cert.validity().not_before),
        "not_after": time(cert.validity().not_after),
    })
}

async fn clusters(State(v): State<Views>) -> String {
    let now = Instant::now();
    let mut out = String::new();
    for c in v.upstreams.all() {
        for e in c.endpoints().iter() {
            let name = &c.config.name;
            let health = if e.ejected(now) {
                "/failed_outlier_check"
            } else {
                "healthy"
            };
            let active = e.active();
            out.push_str(&format!(
                "{name}::{addr}::health_flags::{health}\n{name}::{addr}::weight::{w}\n{name}::{addr}::rq_active::{active}\n",
                addr = e.addr,
                w = e.weight,
            ));
        }
    }
    out
}

async fn prometheus(State(v): State<Views>) -> impl IntoResponse {
    stats_text(&v.admin)
}

fn stats_text(admin: &Admin) -> impl IntoResponse + use<> {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &admin.registry()) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encoding stats failed: {e}\n"),
        ),
    }
}

async fn quit(State(v): State<Views>) -> &'static str {
    tracing::info!("stopping, as /quitquitquit asked");
    v.shutdown.cancel();
    "OK\n"
}

/// Serves the stats port (`/stats/prometheus`) and the health port
/// (`/healthz/ready`) until `shutdown`.
pub async fn serve_ports(
    admin: &Admin,
    stats: SocketAddr,
    health: SocketAddr,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let bind = |addr: SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("binding {what} {addr}: {e}"))
    };
    let stats_port = bind(stats, "--stats-addr").await?;
    let health_port = bind(health, "--health-addr").await?;
    let scraped = admin.clone();
    let stats_router = Router::new().route(
        "/stats/prometheus",
        get(move || {
            let admin = scraped.clone();
            async move { stats_text(&admin) }
        }),
    );
    let readiness = admin.readiness().clone();
    let health_router = Router::new().route(
        "/healthz/ready",
        get(move || {
            let unmet = readiness.unmet();
            async move {
                if unmet.is_empty() {
                    (StatusCode::OK, "ready\n".to_string())
                } else {
                    let why = format!("not ready: {}\n", unmet.join(", "));
                    (StatusCode::SERVICE_UNAVAILABLE, why)
                }
            }
        }),
    );
    for (listener, router) in [(stats_port, stats_router), (health_port, health_router)] {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!("stats or health port stopped: {e}");
            }
        });
    }
    Ok(())
}
