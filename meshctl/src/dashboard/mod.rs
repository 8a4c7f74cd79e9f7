//! `meshctl dashboard`: one page, served from this binary (no CDN, no
//! Grafana or Kiali), showing a running mesh live: the service graph and
//! each service's golden signals from the telemetry Mixer's metrics
//! ([`telemetry`]), every proxy's sync state per xDS type with its NACK
//! (Pilot's `/debug/syncz`), Galley's config problems, the proxies'
//! certificates and each component's readiness; a proxy's listeners,
//! routes, clusters and endpoints on a click. Everything is read from the
//! components' own ports, found in `meshctl up`'s table or given by
//! address ([`Mesh`]).

mod telemetry;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use clap::Args;
use serde_json::{Value, json};

use crate::up::control::{self, Row};

#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Where to serve the page.
    #[arg(long, default_value = "127.0.0.1:15080")]
    pub listen: SocketAddr,
    /// The mesh's control address; the latest `meshctl up`'s when absent.
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// A component of a mesh not started by `meshctl up` (on Kubernetes,
    /// reached through `kubectl port-forward`): `NAME=HOST:PORT`, its admin
    /// address; what it is is read from its `/version`. Repeatable.
    #[arg(long = "component", value_name = "NAME=ADMIN", value_parser = named_address, conflicts_with = "control")]
    pub components: Vec<(String, String)>,
    /// A telemetry Mixer's Prometheus address (its `--prometheus-addr`;
    /// Istio's 42422), for the graph and the golden signals, with
    /// `--component`; repeatable, one per replica, whose counts add up.
    #[arg(long, value_name = "HOST:PORT", requires = "components")]
    pub telemetry_metrics: Vec<String>,
    /// How often the telemetry Mixer's metrics are read.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub scrape_interval: Duration,
    /// The window rates, error rates and latencies are taken over.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub rate_window: Duration,
    /// How far back the golden signals' plots go.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub history: Duration,
}

/// `NAME=HOST:PORT`.
fn named_address(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, addr)) if !name.is_empty() && addr.contains(':') => {
            Ok((name.to_string(), addr.to_string()))
        }
        _ => Err(format!("{text:?} is not NAME=HOST:PORT")),
    }
}

/// Where the dashboard finds the mesh's components.
#[derive(Clone)]
enum Mesh {
    /// A `meshctl up` mesh: its control port's table.
    Up(SocketAddr),
    /// Components given by admin address, and the telemetry Mixers'
    /// Prometheus addresses.
    Given {
        components: Arc<[(String, String)]>,
        telemetry: Arc<[String]>,
    },
}

impl Mesh {
    /// Its components as `meshctl up`'s table has them, readiness probed.
    async fn rows(&self, client: &reqwest::Client) -> anyhow::Result<Vec<Row>> {
        match self {
            Self::Up(control) => control::rows(client, *control).await,
            Self::Given { components, .. } => {
                let rows = components
                    .iter()
                    .map(|(name, admin)| Row {
                        name: name.clone(),
                        pid: 0,
                        ready: false,
                        ready_url: launch::ready_url(admin),
                        ports: vec![("admin".into(), admin.clone())],
                    })
                    .collect();
                Ok(control::probe(rows).await)
            }
        }
    }

    /// Where the telemetry Mixers' metrics are: given, or in `meshctl up`'s
    /// table.
    async fn telemetry(&self, client: &reqwest::Client) -> anyhow::Result<Vec<String>> {
        let found: Vec<String> = match self {
            Self::Up(_) => self
                .rows(client)
                .await?
                .iter()
                .filter(|r| r.name == "mixer-telemetry")
                .filter_map(|r| port(r, "metrics"))
                .map(String::from)
                .collect(),
            Self::Given { telemetry, .. } => telemetry.to_vec(),
        };
        anyhow::ensure!(
            !found.is_empty(),
            match self {
                Self::Up(_) => "the mesh runs no telemetry Mixer with a metrics port",
                Self::Given { .. } =>
                    "no --telemetry-metrics, a telemetry Mixer's Prometheus address, was given",
            }
        );
        Ok(found)
    }
}

/// What the page's requests share.
#[derive(Clone)]
struct Dashboard {
    mesh: Mesh,
    client: reqwest::Client,
    history: Arc<Mutex<telemetry::History>>,
    rate_window: Duration,
    /// Why the last scrape failed, if it did.
    scrape_error: Arc<Mutex<Option<String>>>,
}

const PAGE: &str = include_str!("page.html");

pub async fn run(
    args: DashboardArgs,
    shutdown: component::CancellationToken,
) -> anyhow::Result<()> {
    let mesh = match args.components.is_empty() {
        true => Mesh::Up(control::address(args.control)?),
        false => Mesh::Given {
            components: args.components.into(),
            telemetry: args.telemetry_metrics.into(),
        },
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    // Fails early when no mesh answers.
    mesh.rows(&client).await?;
    let dashboard = Dashboard {
        mesh,
        client,
        history: Arc::new(Mutex::new(telemetry::History::new(args.history))),
        rate_window: args.rate_window,
        scrape_error: Arc::default(),
    };
    tokio::spawn(scrape(
        dashboard.clone(),
        args.scrape_interval,
        shutdown.clone(),
    ));
    let app = Router::new()
        .route("/", get(page))
        .route("/api/state", get(state))
        .route("/api/proxy/{name}", get(proxy))
        .with_state(dashboard);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
    println!("dashboard: http://{}/", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

/// A component's port of purpose `what`.
fn port<'a>(row: &'a Row, what: &str) -> Option<&'a str> {
    row.ports
        .iter()
        .find(|(w, _)| w == what)
        .map(|(_, a)| a.as_str())
}

impl Dashboard {
    async fn json(&self, url: &str) -> anyhow::Result<Value> {
        let response = self.client.get(url).send().await?.error_for_status()?;
        Ok(serde_json::from_str(&response.text().await?)?)
    }

    /// The mesh's table; each row with an admin port says what it is
    /// (`/version`'s component).
    async fn rows(&self) -> anyhow::Result<Vec<(Row, Option<String>)>> {
        let rows = self.mesh.rows(&self.client).await?;
        let kinds = futures::future::join_all(rows.iter().map(|row| async {
            let admin = port(row, "admin")?;
            let version = self.json(&format!("http://{admin}/version")).await.ok()?;
            version["component"].as_str().map(String::from)
        }))
        .await;
        Ok(rows.into_iter().zip(kinds).collect())
    }

    /// One scrape of the telemetry Mixers' metrics into the history: of
    /// every replica, or none (a sum short of one replica would read as a
    /// drop, then a burst).
    async fn scrape_once(&self) -> anyhow::Result<()> {
        let replicas = self.mesh.telemetry(&self.client).await?;
        let texts = futures::future::try_join_all(replicas.iter().map(|metrics| async move {
            let url = format!("http://{metrics}/metrics");
            let response = self.client.get(&url).send().await;
            let text = async { response?.error_for_status()?.text().await };
            text.await.map_err(|e| anyhow::anyhow!("{url}: {e}"))
        }))
        .await?;
        let sample = telemetry::parse(texts.iter().map(String::as_str), SystemTime::now())?;
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sample);
        Ok(())
    }
}

async fn scrape(dashboard: Dashboard, every: Duration, shutdown: component::CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let failed = dashboard
            .scrape_once()
            .await
            .err()
            .map(|e| format!("{e:#}"));
        *dashboard
            .scrape_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = failed;
    }
}

type Failure = (StatusCode, String);

fn unavailable(e: anyhow::Error) -> Failure {
    (StatusCode::BAD_GATEWAY, format!("{e:#}\n"))
}

/// Everything the page shows but a proxy's config.
async fn state(State(d): State<Dashboard>) -> Result<Json<Value>, Failure> {
    let rows = d.rows().await.map_err(unavailable)?;
    let d = &d;
    let admin_of = |component: &str| {
        rows.iter()
            .find(|(_, kind)| kind.as_deref() == Some(component))
            .and_then(|(row, _)| port(row, "admin"))
    };
    // Each Pilot replica serves proxies of its own: every one's, each
    // named with the Pilot it is on.
    let syncz: Vec<Value> = futures::future::join_all(
        rows.iter()
            .filter(|(_, kind)| kind.as_deref() == Some("pilot"))
            .filter_map(|(row, _)| Some((row, port(row, "admin")?)))
            .map(|(row, admin)| async move {
                let syncz = d.json(&format!("http://{admin}/debug/syncz")).await.ok();
                let proxies = syncz.as_ref().and_then(Value::as_array).cloned();
                proxies.unwrap_or_default().into_iter().map(|mut sync| {
                    sync["pilot"] = json!(row.name);
                    sync
                })
            }),
    )
    .await
    .into_iter()
    .flatten()
    .collect();
    let config = match admin_of("galley") {
        Some(admin) => d.json(&format!("http://{admin}/debug/config")).await.ok(),
        None => None,
    };
    let ca = match admin_of("citadel") {
        Some(admin) => d.json(&format!("http://{admin}/debug/root")).await.ok(),
        None => None,
    };
    // One that does not answer is listed too, not ready.
    let components: Vec<Value> = rows
        .iter()
        .filter(|(row, kind)| port(row, "admin").is_some() && kind.as_deref() != Some("proxy"))
        .map(|(row, kind)| {
            let pid = (row.pid != 0).then_some(row.pid);
            json!({"name": row.name, "component": kind, "ready": row.ready, "pid": pid})
        })
        .collect();
    let dumps = futures::future::join_all(
        rows.iter()
            .filter(|(_, kind)| kind.as_deref() == Some("proxy"))
            .map(|(row, _)| async move {
                let admin = port(row, "admin").unwrap_or_default();
                (
                    row,
                    d.json(&format!("http://{admin}/config_dump")).await.ok(),
                )
            }),
    )
    .await;
    let proxies = proxy_rows(&dumps, &syncz);
    let (graph, signals) = {
        let history = d.history.lock().unwrap_or_else(|e| e.into_inner());
        (history.graph(d.rate_window), history.signals(d.rate_window))
    };
    let scrape_error = d
        .scrape_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(Json(json!({
        "components": components,
        "proxies": proxies,
        "ca": ca.map(|ca| json!({"trust_domain": ca["trust_domain"], "not_after": ca["not_after"]})),
        "problems": config.as_ref().map(|c| c["problems"].clone()),
        "warnings": config.as_ref().map(|c| c["warnings"].clone()),
        "graph": graph,
        "signals": signals,
        "rate_window_seconds": d.rate_window.as_secs_f64(),
        "telemetry_error": scrape_error,
    })))
}

/// Every proxy a Pilot serves or the mesh runs, by name: its Pilot, its
/// sync state per xDS type (from that Pilot, by the node id its own config
/// dump gives) and its certificate. A client of Pilot the mesh does not run
/// is named by its pod; a proxy of the mesh no Pilot knows is NOT
/// CONNECTED.
fn proxy_rows(dumps: &[(&Row, Option<Value>)], connected: &[Value]) -> Vec<Value> {
    let node_of = |dump: &Option<Value>| {
        dump.as_ref()
            .and_then(|d| d["node"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let types = |sync: Option<&Value>| -> serde_json::Map<String, Value> {
        [
            ("CDS", mesh_api::xds::CLUSTER),
            ("LDS", mesh_api::xds::LISTENER),
            ("EDS", mesh_api::xds::ENDPOINT),
            ("RDS", mesh_api::xds::ROUTE),
        ]
        .into_iter()
        .map(|(short, url)| {
            let state = match sync {
                Some(s) => crate::proxy_status::state(s["types"].get(url)),
                None => "NOT CONNECTED".into(),
            };
            (short.to_string(), json!(state))
        })
        .collect()
    };
    let mut out: Vec<Value> = connected
        .iter()
        .map(|sync| {
            let node = sync["node"].as_str().unwrap_or_default();
            let ours = dumps.iter().find(|(_, dump)| node_of(dump) == node);
            let pod = node.split('~').nth(2).unwrap_or(node);
            json!({
                "name": ours.map_or(pod, |(row, _)| row.name.as_str()),
                "node": node,
                "pilot": sync["pilot"],
                "version": sync["version"],
                "protocol": sync["protocol"],
                "sync": types(Some(sync)),
                "certificate": ours.and_then(|(_, dump)| Some(dump.as_ref()?["certificate"].clone())),
                "admin": ours.is_some(),
            })
        })
        .collect();
    for (row, dump) in dumps {
        let node = node_of(dump);
        if !connected.iter().any(|s| s["node"] == node.as_str()) {
            out.push(json!({
                "name": row.name,
                "node": node,
                "sync": types(None),
                "certificate": dump.as_ref().map(|d| d["certificate"].clone()),
                "admin": true,
            }));
        }
    }
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    out
}

/// A proxy's listeners, routes, clusters and endpoints: its config dump.
async fn proxy(
    State(d): State<Dashboard>,
    Path(name): Path<String>,
) -> Result<Json<Value>, Failure> {
    let rows = d.mesh.rows(&d.client).await.map_err(unavailable)?;
    let admin = crate::admin::find_admin(&rows, &name)
        .map_err(|e| (StatusCode::NOT_FOUND, format!("the mesh {e:#}\n")))?;
    let dump = d
        .json(&format!("http://{admin}/config_dump"))
        .await
        .map_err(unavailable)?;
    Ok(Json(dump))
}
