//! `meshctl bench topology`: the split topology (a process per
//! control-plane component) against the monolith (one process, MCP in
//! memory), in one run, each with Bookinfo, its six sidecars and its
//! ingress gateway:
//!
//! - start to all-ready, everything started at once;
//! - the control plane's resident memory, summed over its processes;
//! - config edit to the last proxy's ACK (a VirtualService weight flipped,
//!   until every proxy has ACKed the routes Pilot sent after it);
//! - `kill -9` of Galley (in the monolith, of the whole control plane)
//!   with traffic flowing: requests that failed, time until the killed
//!   process is ready again, and time until an edit made right after the
//!   kill reaches every proxy.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;
use component::CancellationToken;
use serde_json::{Value, json};

use super::{acked, addr, delivered, ms, rss_bytes};
use crate::up::{
    Mesh, Topology, UpArgs,
    control::{self, Row},
};
use mesh_api::xds::ROUTE;

#[derive(Debug, Args)]
pub struct TopologyBenchArgs {
    /// Config edits timed per topology.
    #[arg(long, default_value_t = 5)]
    pub edits: usize,
    /// Directory holding the component binaries; next to `meshctl` when absent.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Also write the JSON figures to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Flips reviews' weights in the served config.
pub(super) fn edit(config_dir: &std::path::Path, round: usize) -> anyhow::Result<()> {
    let file = config_dir.join("virtual-services.yaml");
    let text = std::fs::read_to_string(&file)?;
    let (v1, v3) = if round.is_multiple_of(2) {
        (100, 0)
    } else {
        (0, 100)
    };
    let mut lines = Vec::new();
    for line in text.lines() {
        let line = match line.split_once("weight: ") {
            Some((head, _)) if head.contains("subset: v1") => format!("{head}weight: {v1}}}"),
            Some((head, _)) if head.contains("subset: v3") => format!("{head}weight: {v3}}}"),
            _ => line.to_string(),
        };
        lines.push(line);
    }
    std::fs::write(&file, lines.join("\n") + "\n")?;
    Ok(())
}

/// Productpage's requests, failed ones counted, until `stop`.
fn traffic(productpage: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("an HTTP client");
        while !stop.load(Ordering::Relaxed) {
            let ok = page(&client, productpage).await.is_ok();
            sent.fetch_add(1, Ordering::Relaxed);
            if !ok {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    })
}

/// One request of productpage: whole (details, a version of reviews, and a
/// rating where that version shows one), or what was missing and why.
pub(super) async fn page(client: &reqwest::Client, productpage: SocketAddr) -> Result<(), String> {
    let response = client
        .get(format!("http://{productpage}/productpage"))
        .send()
        .await
        .map_err(|e| format!("productpage: {e}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| format!("productpage's body: {e}"))?;
    let p: Value =
        serde_json::from_str(&text).map_err(|_| format!("productpage: {status}: {text}"))?;
    let error = |part: &Value| part["error"].as_str().unwrap_or("missing").to_string();
    if p["details"]["author"].is_null() {
        return Err(format!("details: {}", error(&p["details"])));
    }
    if p["reviews"]["version"].is_null() {
        return Err(format!("reviews: {}", error(&p["reviews"])));
    }
    let rating = &p["reviews"]["reviews"][0]["rating"];
    match rating["error"].as_str() {
        Some(e) => Err(format!("ratings: {e}")),
        None => Ok(()),
    }
}

async fn measure(
    topology: Topology,
    args: &TopologyBenchArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<Value> {
    let up = UpArgs::ephemeral(args.bin_dir.clone(), topology);
    let started = Instant::now();
    let mesh = Mesh::start(&up, shutdown, false).await?;
    let ready = started.elapsed();
    let rows = mesh.rows();
    let rss: u64 = mesh
        .control_plane_pids()
        .iter()
        .map(|p| rss_bytes(*p, "VmRSS:").unwrap_or(0))
        .sum();
    let config_dir = mesh.config_dir.clone();
    let pilot = addr(&rows, "pilot", "admin")?;
    let productpage = addr(&rows, "productpage-v1-proxy", "inbound")?;
    // The edits change the sidecars' routes; the gateway's stay as they are.
    let proxies = rows.iter().filter(|r| r.name.ends_with("-proxy")).count();
    let client = reqwest::Client::builder().no_proxy().build()?;
    // Supervised as under `meshctl up`, so that a killed process comes back.
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let control_addr = control.local_addr()?;
    let stop_mesh = CancellationToken::new();
    let running = tokio::spawn(mesh.run_until(control, stop_mesh.clone(), false));

    let mut edits = Vec::new();
    for round in 0..args.edits {
        let before = acked(&client, pilot, ROUTE).await?;
        let t = Instant::now();
        edit(&config_dir, round)?;
        delivered(&client, pilot, ROUTE, &before, proxies).await?;
        edits.push(t.elapsed());
    }
    edits.sort();

    // Galley dies (in the monolith, everything of the control plane).
    let stop = Arc::new(AtomicBool::new(false));
    let flowing = traffic(productpage, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let galley = |rows: Vec<Row>| rows.into_iter().find(|r| r.name == "galley");
    let victim = galley(control::rows(&client, control_addr).await?)
        .ok_or_else(|| anyhow::anyhow!("no galley"))?;
    let before = acked(&client, pilot, ROUTE).await?;
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    edit(&config_dir, args.edits)?;
    let (mut ready_again, mut edit_delivered) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready_again.is_none() || edit_delivered.is_none() {
        anyhow::ensure!(Instant::now() < deadline, "no recovery within 60 s");
        if ready_again.is_none()
            && let Ok(rows) = control::rows(&client, control_addr).await
            && galley(rows).is_some_and(|g| g.pid != victim.pid && g.ready)
        {
            ready_again = Some(killed.elapsed());
        }
        if edit_delivered.is_none()
            && let Ok(now) = acked(&client, pilot, ROUTE).await
            && now.len() == proxies
            && now.iter().all(|v| v.is_some() && !before.contains(v))
        {
            edit_delivered = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = flowing.await?;
    stop_mesh.cancel();
    running.await??;
    let (ready_again, edit_delivered) = (
        ready_again.unwrap_or_default(),
        edit_delivered.unwrap_or_default(),
    );

    Ok(json!({
        "start_to_all_ready_ms": ms(ready),
        "control_plane_processes": match topology { Topology::Split => 6, Topology::Monolith => 1 },
        "control_plane_rss_bytes": rss,
        "edit_to_last_proxy_ack_ms": {
            "p50": ms(edits[edits.len() / 2]),
            "max": ms(edits[edits.len() - 1]),
        },
        "galley_killed": {
            "requests": sent,
            "failed_requests": failed,
            "killed_process_ready_again_ms": ms(ready_again),
            "edit_made_at_kill_delivered_ms": ms(edit_delivered),
        },
    }))
}

pub async fn run(args: TopologyBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.edits > 0, "--edits must be positive");
    let shutdown = component::shutdown::on_signal();
    let split = measure(Topology::Split, &args, &shutdown).await?;
    let monolith = measure(Topology::Monolith, &args, &shutdown).await?;
    let figures = json!({
        "edits": args.edits,
        "split": split,
        "monolith": monolith,
    });
    super::report(&figures, args.out.as_deref())
}
