//! `meshctl up`'s control port (loopback HTTP), which `meshctl status` and
//! `meshctl restart` talk to: the table of what runs where, with each
//! component's readiness asked live, and the replacement of one process.
//! The address is printed at start and kept in a file, so that the other
//! commands find the running mesh without being told.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// One component, as the table shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub pid: u32,
    pub ready: bool,
    /// Where it says it is ready (`http://addr/path`).
    pub ready_url: String,
    pub ports: Vec<(String, String)>,
}

/// What the control port asks of the running mesh.
pub enum Request {
    Status(oneshot::Sender<Vec<Row>>),
    /// Replaces the process hosting `name`, with `binary` if given; the
    /// rows of the components it hosts.
    Restart {
        name: String,
        binary: Option<PathBuf>,
        reply: oneshot::Sender<Result<Vec<Row>, String>>,
    },
}

/// Where the latest `meshctl up` says its control port is.
pub fn pointer() -> PathBuf {
    std::env::temp_dir().join(format!("meshctl-up-{}.control", nix::unistd::getuid()))
}

/// The control address: given, or the latest `meshctl up`'s.
pub fn address(given: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    if let Some(addr) = given {
        return Ok(addr);
    }
    let path = pointer();
    let text = std::fs::read_to_string(&path).map_err(|_| {
        anyhow::anyhow!(
            "no running `meshctl up` found ({} is missing); give --control",
            path.display()
        )
    })?;
    text.trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The running mesh's table, readiness asked live, from its control port
/// at `control`.
pub async fn rows(client: &reqwest::Client, control: SocketAddr) -> anyhow::Result<Vec<Row>> {
    let text = client
        .get(format!("http://{control}/status"))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("the mesh at {control} does not answer: {e}"))?
        .text()
        .await?;
    Ok(serde_json::from_str(&text)?)
}

/// Whether each row's component answers 200 on its ready URL, asked of
/// all at once: one that does not answer holds up no other.
pub async fn probe(mut rows: Vec<Row>) -> Vec<Row> {
    let ready =
        futures::future::join_all(rows.iter().map(|row| launch::is_ready(&row.ready_url))).await;
    for (row, ready) in rows.iter_mut().zip(ready) {
        row.ready = ready;
    }
    rows
}

/// The names of the rows not ready.
pub fn not_ready(rows: &[Row]) -> Vec<&str> {
    rows.iter()
        .filter(|r| !r.ready)
        .map(|r| r.name.as_str())
        .collect()
}

type Error = (StatusCode, String);

fn gone() -> Error {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the mesh is stopping\n".into(),
    )
}

pub fn router(requests: mpsc::Sender<Request>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/restart/{name}", post(restart))
        .with_state(requests)
}

async fn status(State(requests): State<mpsc::Sender<Request>>) -> Result<Json<Vec<Row>>, Error> {
    let (reply, rows) = oneshot::channel();
    requests
        .send(Request::Status(reply))
        .await
        .map_err(|_| gone())?;
    let rows = rows.await.map_err(|_| gone())?;
    Ok(Json(probe(rows).await))
}

#[derive(Deserialize)]
struct RestartQuery {
    binary: Option<PathBuf>,
}

/// Answers once every component of the new process is ready again.
async fn restart(
    State(requests): State<mpsc::Sender<Request>>,
    Path(name): Path<String>,
    Query(query): Query<RestartQuery>,
) -> Result<Json<Vec<Row>>, Error> {
    let (reply, restarted) = oneshot::channel();
    let request = Request::Restart {
        name,
        binary: query.binary,
        reply,
    };
    requests.send(request).await.map_err(|_| gone())?;
    let rows = restarted
        .await
        .map_err(|_| gone())?
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let probed = probe(rows.clone()).await;
        let waiting = not_ready(&probed);
        if waiting.is_empty() {
            return Ok(Json(probed));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err((
                StatusCode::GATEWAY_TIMEOUT,
                format!("not ready after 60 s: {}\n", waiting.join(", ")),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Prints rows as `meshctl up` and `meshctl status` show them.
pub fn print(rows: &[Row]) {
    println!("{:<22} {:>8}  {:<6} PORTS", "COMPONENT", "PID", "READY");
    for row in rows {
        let ports: Vec<String> = row
            .ports
            .iter()
            .map(|(what, addr)| format!("{what}={addr}"))
            .collect();
        let ready = if row.ready { "yes" } else { "no" };
        println!(
            "{:<22} {:>8}  {:<6} {}",
            row.name,
            row.pid,
            ready,
            ports.join(" ")
        );
    }
}
