//! `meshctl bench traces`: what tracing the control plane costs. Two
//! identical clusters, each a Galley and a Pilot as processes serving
//! Bookinfo's config to `--proxies` simulated sidecars: one exports its
//! spans over OTLP to a receiver in this process, the other has no
//! endpoint, as by default. Each edit is written to one cluster and then
//! the other (the order alternating), each timed from the file write to
//! its last sidecar's ACK; the CPU seconds the Galleys and Pilots spent
//! over the edits, and the spans they exported, are the cost.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;
use component::CancellationToken;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use serde_json::json;
use tokio::sync::mpsc;

use super::{
    clusters::{Cluster, edit, spread},
    cpu_seconds, rss_bytes,
};

#[derive(Debug, Args)]
pub struct TracesBenchArgs {
    /// Config edits timed in each cluster.
    #[arg(long, default_value_t = 20)]
    pub edits: usize,
    /// Sidecars connected to each cluster's Pilot.
    #[arg(long, default_value_t = 100)]
    pub proxies: usize,
    /// Directory holding the component binaries; next to `meshctl` when absent.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Also write the JSON figures to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// An OTLP trace receiver that counts the spans exported to it that
/// started since a time it is given (Unix nanoseconds): spans arrive in
/// batches, seconds after they end.
#[derive(Clone, Default)]
struct SpanCounter {
    since: Arc<AtomicU64>,
    counted: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for SpanCounter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let since = self.since.load(Ordering::Relaxed);
        let spans = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .filter(|s| s.start_time_unix_nano >= since)
            .count();
        self.counted.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl SpanCounter {
    /// Serves OTLP on a loopback port until `stop`; the endpoint's URL.
    async fn serve(&self, stop: &CancellationToken) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(self.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(server);
        Ok(endpoint)
    }

    /// Counts from now on only the spans that start from now on.
    fn count_from_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.since.store(now.as_nanos() as u64, Ordering::Relaxed);
        self.counted.store(0, Ordering::Relaxed);
    }

    fn spans(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
    }
}

pub async fn run(args: TracesBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.edits > 0 && args.proxies > 0,
        "--edits and --proxies must be positive"
    );
    super::raise_open_files_limit()?;
    let bins = crate::binaries::dir(args.bin_dir.as_deref())?;
    let received = SpanCounter::default();
    let receiving = CancellationToken::new();
    let _stop_receiving = receiving.clone().drop_guard();
    let endpoint = received.serve(&receiving).await?;

    // Cluster 0 untraced, cluster 1 traced.
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    for dir in &dirs {
        for (name, text) in crate::up::bookinfo_config() {
            std::fs::write(dir.path().join(name), text)?;
        }
        edit(dir.path(), 0)?;
    }
    let traced_env = [(component::trace::ENDPOINT, endpoint.as_str())];
    let mut clusters = [
        Cluster::start(&bins, dirs[0].path(), None, &[]).await?,
        Cluster::start(&bins, dirs[1].path(), None, &traced_env).await?,
    ];
    let stop = CancellationToken::new();
    let (acked, mut acks) = mpsc::unbounded_channel();
    for (id, cluster) in clusters.iter().enumerate() {
        cluster.connect(id, args.proxies, &acked, &stop).await?;
    }
    while acks.try_recv().is_ok() {}

    let pids = |c: &Cluster| [c.galley.pid(), c.pilot.pid()];
    let cpu = |c: &Cluster| pids(c).map(|pid| cpu_seconds(pid).unwrap_or_default());
    let cpu_before = clusters.each_ref().map(cpu);
    received.count_from_now();
    let mut times: [Vec<Duration>; 2] = Default::default();
    for round in 1..=args.edits {
        let order = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for cluster in order {
            let t = Instant::now();
            edit(dirs[cluster].path(), round)?;
            let (mut count, mut last) = (0, t);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while count < args.proxies {
                let (from, edit, at) = tokio::time::timeout_at(deadline, acks.recv())
                    .await
                    .map_err(|_| anyhow::anyhow!("edit {round} not ACKed in 60 s"))?
                    .ok_or_else(|| anyhow::anyhow!("the sidecars stopped"))?;
                if (from, edit) == (cluster, round) {
                    count += 1;
                    last = last.max(at);
                }
            }
            times[cluster].push(last - t);
        }
    }
    let cpu_after = clusters.each_ref().map(cpu);
    let rss = clusters
        .each_ref()
        .map(|c| pids(c).map(|pid| rss_bytes(pid, "VmRSS:").unwrap_or_default()));
    // The sidecars, then each Pilot before the Galley it follows: every
    // span batched so far reaches the receiver as they exit.
    stop.cancel();
    for cluster in &mut clusters {
        cluster.pilot.terminate().await?;
        cluster.galley.terminate().await?;
    }
    let spans = received.spans();

    let [untraced, traced] = [0, 1].map(|c| {
        let cpu = |i: usize| ((cpu_after[c][i] - cpu_before[c][i]) * 1e3).round() / 1e3;
        json!({
            "edit_to_last_ack_ms": spread(std::mem::take(&mut times[c])),
            "galley_cpu_seconds_over_the_edits": cpu(0),
            "pilot_cpu_seconds_over_the_edits": cpu(1),
            "galley_rss_bytes": rss[c][0],
            "pilot_rss_bytes": rss[c][1],
        })
    });
    let figures = json!({
        "benchmark": "traces",
        "edits": args.edits,
        "proxies_per_cluster": args.proxies,
        "untraced": untraced,
        "traced": traced,
        "spans_exported_over_the_edits": spans,
        "spans_per_edit": (spans as f64 / args.edits as f64).round(),
    });
    super::report(&figures, args.out.as_deref())
}
