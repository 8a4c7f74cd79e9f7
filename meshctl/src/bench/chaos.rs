//! `meshctl bench chaos`: Bookinfo under a fixed request rate for a few
//! minutes while the mesh is broken on purpose, in both topologies, each
//! supervised as under `meshctl up` (a killed process comes back):
//!
//! - config edited ten times a second throughout;
//! - every control-plane process killed (`kill -9`) in turn; Citadel's
//!   signing CA rotated to a new intermediate under the same root as it
//!   goes down (in the monolith, as the one process does);
//! - the sidecars' certificates short-lived, so that each renews several
//!   times;
//! - one proxy (details') killed and restarted.
//!
//! The load is an open loop: a request every 1/rate seconds, whatever the
//! latency, so that a stall shows as latency and failures rather than as
//! fewer requests. The first part of the run has no faults: its latency is
//! the baseline the rest is read against. Figures: requests sent and
//! failed (those while the restarted proxy was away counted apart), latency
//! per window, each fault with its recovery time, certificates renewed,
//! and each process's RSS at the end of the quiet part and at the end.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use component::CancellationToken;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

use super::{
    addr, ms, percentile, rss_bytes,
    topology::{edit, page},
};
use crate::up::{
    Mesh, Topology, UpArgs,
    control::{self, Row},
};

#[derive(Debug, Args)]
pub struct ChaosBenchArgs {
    /// Requests per second sent to productpage's sidecar.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// How long each topology runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3m")]
    pub duration: Duration,
    /// Config edits per second (reviews' weights flipped).
    #[arg(long, default_value_t = 10)]
    pub edits_per_second: u32,
    /// Lifetime of the sidecars' certificates: short, so that each renews
    /// (at half its life) several times in the run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "40s")]
    pub cert_ttl: Duration,
    /// Width of the latency windows reported.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub window: Duration,
    /// Run one topology only; both when absent.
    #[arg(long, value_enum)]
    pub topology: Option<Topology>,
    /// Directory holding the component binaries; next to `meshctl` when absent.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Also write the JSON figures to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Requests in flight at most; beyond it a tick is counted as not sent
/// (the mesh, or this machine, cannot keep up with the rate).
const IN_FLIGHT: usize = 2_000;
/// A request that takes longer has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The proxy restarted on purpose.
const RESTARTED_PROXY: &str = "details-v1-proxy";
/// The share of the run before the first fault: the baseline.
const QUIET: f64 = 0.15;

/// One request's outcome, timed from the start of the run.
struct Sample {
    at: Duration,
    latency: Duration,
    /// Why it failed, when it did.
    failure: Option<String>,
}

/// What was done to the mesh, and when it was whole again.
#[derive(Debug)]
struct Fault {
    what: String,
    at: Duration,
    recovered_after: Duration,
}

/// Sends a request every `1/rate` until `until`; the outcomes, and how
/// many ticks found `IN_FLIGHT` requests outstanding.
async fn load(
    productpage: SocketAddr,
    rate: u32,
    started: Instant,
    until: Instant,
) -> anyhow::Result<(Vec<Sample>, u64)> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut not_sent = 0;
    while Instant::now() < until {
        ticker.tick().await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            not_sent += 1;
            continue;
        };
        let (client, tx) = (client.clone(), tx.clone());
        tokio::spawn(async move {
            let sent = Instant::now();
            let outcome = page(&client, productpage).await;
            let _ = tx.send(Sample {
                at: sent - started,
                latency: sent.elapsed(),
                failure: outcome.err(),
            });
            drop(slot);
        });
    }
    drop(tx);
    let mut samples = Vec::new();
    while let Some(s) = rx.recv().await {
        samples.push(s);
    }
    samples.sort_by_key(|s| s.at);
    Ok((samples, not_sent))
}

/// Writes config edits at `per_second` until `stop`; how many.
async fn edits(config_dir: PathBuf, per_second: u32, stop: CancellationToken) -> usize {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second as f64));
    let mut done = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return done,
            _ = ticker.tick() => {}
        }
        match edit(&config_dir, done) {
            Ok(()) => done += 1,
            Err(e) => tracing::warn!("config edit failed: {e:#}"),
        }
    }
}

/// Makes Citadel's CA directory an intermediate under the root it holds:
/// Citadel signs with it once it starts again, and every certificate still
/// chains to the root the proxies trust.
fn rotate_ca(ca_dir: &Path, round: usize) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let (root, next) = (scratch.path().join("root"), scratch.path().join("next"));
    std::fs::create_dir_all(&root)?;
    for file in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        std::fs::copy(ca_dir.join(file), root.join(file))?;
    }
    let name = format!("rotated CA {round}");
    crate::ca::intermediate(&root, &next, &name, Duration::from_secs(86_400))?;
    for file in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        let staged = ca_dir.join(format!(".{file}.next"));
        std::fs::copy(next.join(file), &staged)?;
        std::fs::rename(&staged, ca_dir.join(file))?;
    }
    Ok(())
}

/// `kill -9` of the process hosting `name`; then waits until a new
/// process hosts it and is ready, and says how long that took.
async fn kill_and_wait(
    client: &reqwest::Client,
    control: SocketAddr,
    name: &str,
) -> anyhow::Result<Duration> {
    let row = |rows: Vec<Row>| rows.into_iter().find(|r| r.name == name);
    let victim = row(control::rows(client, control).await?)
        .ok_or_else(|| anyhow::anyhow!("no {name} in the mesh"))?;
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let deadline = killed + Duration::from_secs(120);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "{name} not back within 120 s");
        if let Ok(rows) = control::rows(client, control).await
            && row(rows).is_some_and(|r| r.pid != victim.pid && r.ready)
        {
            return Ok(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The processes of the control plane, one name for each (in the
/// monolith, one process hosts them all).
fn control_plane(mesh: &Mesh) -> Vec<String> {
    let pids = mesh.control_plane_pids();
    let mut names = Vec::new();
    let mut seen = Vec::new();
    for row in mesh.rows() {
        if pids.contains(&row.pid) && !seen.contains(&row.pid) {
            seen.push(row.pid);
            names.push(row.name);
        }
    }
    names
}

/// Each mesh process's RSS, by name.
fn rss(rows: &[Row]) -> BTreeMap<String, (u32, u64)> {
    rows.iter()
        .filter_map(|r| Some((r.name.clone(), (r.pid, rss_bytes(r.pid, "VmRSS:").ok()?))))
        .collect()
}

/// Every process's RSS in MB, by name, each `every` until `until`: a leak
/// climbs, a high-water mark steps up and stays.
async fn rss_over_time(
    client: reqwest::Client,
    control: SocketAddr,
    every: Duration,
    started: Instant,
    until: Instant,
) -> Vec<Value> {
    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(every);
    while Instant::now() < until {
        ticker.tick().await;
        let Ok(rows) = control::rows(&client, control).await else {
            continue;
        };
        let mut sample: BTreeMap<String, Value> = rss(&rows)
            .into_iter()
            .map(|(name, (_, bytes))| (name, json!(bytes / (1 << 20))))
            .collect();
        sample.insert("at_s".into(), json!(started.elapsed().as_secs()));
        samples.push(json!(sample));
    }
    samples
}

/// A metric's value summed over the proxies' admin ports.
async fn proxies_metric(client: &reqwest::Client, rows: &[Row], metric: &str) -> u64 {
    let mut total = 0;
    for row in rows.iter().filter(|r| r.name.ends_with("-proxy")) {
        let Some((_, admin)) = row.ports.iter().find(|(p, _)| p == "admin") else {
            continue;
        };
        let Ok(response) = client.get(format!("http://{admin}/metrics")).send().await else {
            continue;
        };
        let text = response.text().await.unwrap_or_default();
        total += text
            .lines()
            .find_map(|l| l.strip_prefix(metric))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// How many requests failed for each reason, the reason's first 160
/// characters (the rest names addresses and times that differ each time).
fn reasons(failed: &[&Sample]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for s in failed {
        let reason: String = s
            .failure
            .as_deref()
            .unwrap_or_default()
            .chars()
            .take(160)
            .collect();
        *out.entry(reason).or_default() += 1;
    }
    out
}

/// Latency and failures of `samples`, per window of `width`.
fn windows(samples: &[Sample], width: Duration) -> Vec<Value> {
    let mut out: BTreeMap<u64, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        let w = (s.at.as_secs_f64() / width.as_secs_f64()) as u64;
        out.entry(w).or_default().push(s);
    }
    out.into_iter()
        .map(|(w, ss)| {
            let mut latencies: Vec<Duration> = ss.iter().map(|s| s.latency).collect();
            latencies.sort();
            json!({
                "from_s": w as f64 * width.as_secs_f64(),
                "requests": ss.len(),
                "failed": ss.iter().filter(|s| s.failure.is_some()).count(),
                "p50_ms": percentile(&latencies, 0.5),
                "p99_ms": percentile(&latencies, 0.99),
                "max_ms": percentile(&latencies, 1.0),
            })
        })
        .collect()
}

async fn measure(
    topology: Topology,
    args: &ChaosBenchArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<Value> {
    let mut up = UpArgs::ephemeral(args.bin_dir.clone(), topology);
    up.workload_cert_ttl = args.cert_ttl;
    let mesh = Mesh::start(&up, shutdown, false).await?;
    let rows = mesh.rows();
    let productpage = addr(&rows, "productpage-v1-proxy", "inbound")?;
    let victims = control_plane(&mesh);
    let (config_dir, ca_dir) = (mesh.config_dir.clone(), mesh.ca_dir());
    let client = reqwest::Client::builder().no_proxy().build()?;
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let control_addr = control.local_addr()?;
    let stop_mesh = CancellationToken::new();
    let running = tokio::spawn(mesh.run_until(control, stop_mesh.clone(), false));

    let started = Instant::now();
    let at = |share: f64| started + args.duration.mul_f64(share);
    let traffic = tokio::spawn(load(productpage, args.rate, started, at(1.0)));
    let stop_edits = CancellationToken::new();
    let editing = tokio::spawn(edits(config_dir, args.edits_per_second, stop_edits.clone()));
    let renewals_before = proxies_metric(&client, &rows, "proxy_certificates_issued_total ").await;
    let sampling = tokio::spawn(rss_over_time(
        client.clone(),
        control_addr,
        args.window,
        started,
        at(1.0),
    ));

    tokio::time::sleep_until(at(QUIET).into()).await;
    let rss_start = rss(&control::rows(&client, control_addr).await?);
    let mut faults = Vec::new();
    // The control plane, one process at a time, then the proxy.
    let step = (0.8 - QUIET) / (victims.len() + 1) as f64;
    for (i, name) in victims.iter().enumerate() {
        tokio::time::sleep_until(at(QUIET + step * i as f64).into()).await;
        let hosts_citadel = name == "citadel" || topology == Topology::Monolith;
        let what = if hosts_citadel {
            rotate_ca(&ca_dir, i)?;
            format!("kill -9 {name}, Citadel's CA rotated")
        } else {
            format!("kill -9 {name}")
        };
        let fault_at = started.elapsed();
        let recovered = kill_and_wait(&client, control_addr, name).await?;
        faults.push(Fault {
            what,
            at: fault_at,
            recovered_after: recovered,
        });
    }
    tokio::time::sleep_until(at(0.85).into()).await;
    let proxy_at = started.elapsed();
    let proxy_back = kill_and_wait(&client, control_addr, RESTARTED_PROXY).await?;
    faults.push(Fault {
        what: format!("kill -9 {RESTARTED_PROXY} (restarted)"),
        at: proxy_at,
        recovered_after: proxy_back,
    });

    let (samples, not_sent) = traffic.await??;
    let rss_samples = sampling.await?;
    stop_edits.cancel();
    let edited = editing.await?;
    let rows_end = control::rows(&client, control_addr).await?;
    let rss_end = rss(&rows_end);
    let renewals = proxies_metric(&client, &rows_end, "proxy_certificates_issued_total ").await;
    stop_mesh.cancel();
    running.await??;

    // Failures while the restarted proxy was away (and a second after, as
    // its callers' connections to it close) are its app's.
    let away = proxy_at..proxy_at + proxy_back + Duration::from_secs(1);
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.failure.is_some()).collect();
    let failed_restarted = failed.iter().filter(|s| away.contains(&s.at)).count();
    let quiet_end = args.duration.mul_f64(QUIET);
    let mut quiet: Vec<Duration> = samples
        .iter()
        .filter(|s| s.at < quiet_end)
        .map(|s| s.latency)
        .collect();
    let mut faulted: Vec<Duration> = samples
        .iter()
        .filter(|s| s.at >= quiet_end)
        .map(|s| s.latency)
        .collect();
    quiet.sort();
    faulted.sort();
    let memory: BTreeMap<String, Value> = rss_end
        .iter()
        .filter_map(|(name, (pid, end))| {
            let (start_pid, start) = rss_start.get(name)?;
            Some((
                name.clone(),
                json!({
                    "start_bytes": start,
                    "end_bytes": end,
                    "growth_pct": ((*end as f64 / *start as f64 - 1.0) * 1000.0).round() / 10.0,
                    "restarted": pid != start_pid,
                }),
            ))
        })
        .collect();
    let not_restarted_growth = memory
        .values()
        .filter(|m| m["restarted"] == false)
        .filter_map(|m| m["growth_pct"].as_f64())
        .fold(f64::MIN, f64::max);
    Ok(json!({
        "requests_sent": samples.len(),
        "ticks_not_sent": not_sent,
        "achieved_rate_per_s": (samples.len() as f64 / args.duration.as_secs_f64()).round(),
        "failed": failed.len(),
        "failed_to_the_restarted_proxy": failed_restarted,
        "failed_otherwise": failed.len() - failed_restarted,
        "failures_by_reason": reasons(&failed),
        "latency_quiet_ms": {"p50": percentile(&quiet, 0.5), "p99": percentile(&quiet, 0.99), "max": percentile(&quiet, 1.0)},
        "latency_under_faults_ms": {"p50": percentile(&faulted, 0.5), "p99": percentile(&faulted, 0.99), "max": percentile(&faulted, 1.0)},
        "config_edits": edited,
        "certificates_issued_during_run": renewals.saturating_sub(renewals_before),
        "faults": faults.iter().map(|f| json!({
            "what": f.what,
            "at_s": (f.at.as_secs_f64() * 10.0).round() / 10.0,
            "ready_again_ms": ms(f.recovered_after),
        })).collect::<Vec<_>>(),
        "rss": memory,
        "rss_mb_over_time": rss_samples,
        "max_rss_growth_pct_of_processes_not_restarted": not_restarted_growth,
        "windows": windows(&samples, args.window),
    }))
}

pub async fn run(args: ChaosBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0, "--rate must be positive");
    anyhow::ensure!(
        args.edits_per_second > 0,
        "--edits-per-second must be positive"
    );
    anyhow::ensure!(
        args.duration >= Duration::from_secs(20),
        "--duration must be at least 20s: every control-plane process is killed in turn"
    );
    let shutdown = component::shutdown::on_signal();
    let topologies = match args.topology {
        Some(t) => vec![t],
        None => vec![Topology::Split, Topology::Monolith],
    };
    let mut figures = json!({
        "rate_per_s": args.rate,
        "duration_s": args.duration.as_secs(),
        "edits_per_s": args.edits_per_second,
        "cert_ttl_s": args.cert_ttl.as_secs(),
    });
    for topology in topologies {
        let name = match topology {
            Topology::Split => "split",
            Topology::Monolith => "monolith",
        };
        figures[name] = measure(topology, &args, &shutdown).await?;
    }
    super::report(&figures, args.out.as_deref())
}
