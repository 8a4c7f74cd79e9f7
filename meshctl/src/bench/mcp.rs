//! `meshctl bench mcp`: one source, many sinks, a large collection, over
//! real gRPC on loopback. It measures the full sync, then one change sent
//! incrementally against the same change sent as full state (the baseline,
//! in the same run), then how an incremental update's cost grows with the
//! collection's size and with the number of changed resources.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use component::CancellationToken;
use mcp::{IncrementalPolicy, McpMetrics, Sink, SinkOptions, SourceServer, Store, run_sink_client};
use mesh_api::{
    kinds::{Body, GATEWAYS},
    pb::istio::{
        mcp::v1alpha1::{Metadata, Resource},
        networking::v1alpha3::{Gateway, Port, Server},
    },
};
use serde_json::json;

use super::ms;

#[derive(Debug, Args)]
pub struct McpBenchArgs {
    #[arg(long, default_value_t = 100)]
    pub sinks: usize,
    #[arg(long, default_value_t = 10_000)]
    pub resources: usize,
    /// Sinks used for the scaling runs.
    #[arg(long, default_value_t = 10)]
    pub scaling_sinks: usize,
    /// Also write the JSON figures to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A realistic gateway body (~150 bytes encoded) at a given revision.
fn resource(i: usize, revision: u64) -> Resource {
    let body = Body::Gateway(Box::new(Gateway {
        servers: vec![Server {
            port: Some(Port {
                number: 443,
                protocol: "HTTPS".into(),
                name: format!("https-{i}"),
            }),
            hosts: vec![
                format!("app-{i}.bench.example.com"),
                format!("bench/app-{i}.internal"),
            ],
            ..Default::default()
        }],
        selector: [
            ("istio".to_string(), "ingressgateway".to_string()),
            ("rev".to_string(), revision.to_string()),
        ]
        .into(),
    }));
    Resource {
        metadata: Some(Metadata {
            name: format!("bench/gateway-{i}"),
            version: revision.to_string(),
            ..Default::default()
        }),
        body: Some(body.to_any()),
    }
}

/// A source on loopback with `size` resources, and its metrics.
struct Source {
    store: Arc<Store>,
    metrics: McpMetrics,
    addr: std::net::SocketAddr,
    stop: CancellationToken,
}

impl Source {
    async fn start(size: usize) -> anyhow::Result<Self> {
        let store = Arc::new(Store::new([GATEWAYS]));
        store.replace(GATEWAYS, (0..size).map(|i| resource(i, 1)).collect())?;
        let metrics = McpMetrics::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        SourceServer::new(
            store.clone(),
            IncrementalPolicy::All,
            metrics.clone(),
            stop.clone(),
        )
        .spawn(listener);
        Ok(Self {
            store,
            metrics,
            addr,
            stop,
        })
    }

    /// Connects `n` sinks and returns once every one has ACKed the full
    /// state, with the time that took.
    async fn connect_sinks(
        &self,
        n: usize,
        incremental: bool,
    ) -> anyhow::Result<(Sinks, Duration)> {
        let stop = CancellationToken::new();
        let acks = self.metrics.acks(GATEWAYS);
        let start = Instant::now();
        let mut sinks = Vec::with_capacity(n);
        for i in 0..n {
            let mut options = SinkOptions::new(format!("bench-sink-{i}"), [GATEWAYS]);
            options.incremental = incremental;
            let sink = Arc::new(Sink::new(options, McpMetrics::default()));
            let endpoint =
                mcp::parse_endpoint(&self.addr.to_string()).map_err(anyhow::Error::msg)?;
            tokio::spawn(run_sink_client(sink.clone(), endpoint, stop.clone()));
            sinks.push(sink);
        }
        self.wait_acks(acks + n as u64).await?;
        Ok((
            Sinks {
                _sinks: sinks,
                stop,
            },
            start.elapsed(),
        ))
    }

    /// Changes `count` resources, waits until `sinks` sinks ACKed, and
    /// returns the time and the bytes the source sent for it.
    async fn change(
        &self,
        count: usize,
        revision: u64,
        sinks: usize,
    ) -> anyhow::Result<(Duration, u64)> {
        let acks = self.metrics.acks(GATEWAYS);
        let bytes = self.metrics.bytes(GATEWAYS);
        let start = Instant::now();
        // One atomic change, so each sink gets exactly one response for it.
        self.store.upsert_many(
            GATEWAYS,
            (0..count).map(|i| resource(i, revision)).collect(),
        )?;
        self.wait_acks(acks + sinks as u64).await?;
        Ok((start.elapsed(), self.metrics.bytes(GATEWAYS) - bytes))
    }

    async fn wait_acks(&self, target: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.metrics.acks(GATEWAYS) < target {
            anyhow::ensure!(Instant::now() < deadline, "sinks did not ACK within 300s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Sinks {
    _sinks: Vec<Arc<Sink>>,
    stop: CancellationToken,
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn run(args: McpBenchArgs) -> anyhow::Result<()> {
    eprintln!(
        "bench mcp: {} sinks, {} resources",
        args.sinks, args.resources
    );
    let source = Source::start(args.resources).await?;

    let (sinks, incremental_sync) = source.connect_sinks(args.sinks, true).await?;
    let (incremental_time, incremental_bytes) = source.change(1, 2, args.sinks).await?;
    drop(sinks);

    let (sinks, full_sync) = source.connect_sinks(args.sinks, false).await?;
    let (full_time, full_bytes) = source.change(1, 3, args.sinks).await?;
    drop(sinks);
    drop(source);

    let mut scaling = Vec::new();
    for size in [args.resources / 10, args.resources] {
        let source = Source::start(size).await?;
        let (_sinks, _) = source.connect_sinks(args.scaling_sinks, true).await?;
        for (round, changed) in [1usize, 10, 100].into_iter().enumerate() {
            let (time, bytes) = source
                .change(changed, 10 + round as u64, args.scaling_sinks)
                .await?;
            scaling.push(json!({
                "collection_size": size,
                "changed_resources": changed,
                "sinks": args.scaling_sinks,
                "ms_until_all_acked": ms(time),
                "bytes_sent": bytes,
            }));
        }
    }

    let figures = json!({
        "benchmark": "mcp",
        "sinks": args.sinks,
        "resources": args.resources,
        "full_sync": {
            "incremental_sinks_ms_until_all_acked": ms(incremental_sync),
            "full_state_sinks_ms_until_all_acked": ms(full_sync),
        },
        "one_change": {
            "incremental": {"ms_until_all_acked": ms(incremental_time), "bytes_sent": incremental_bytes},
            "full_state": {"ms_until_all_acked": ms(full_time), "bytes_sent": full_bytes},
            "bytes_ratio_full_over_incremental": full_bytes as f64 / incremental_bytes.max(1) as f64,
        },
        "incremental_scaling": scaling,
    });
    super::report(&figures, args.out.as_deref())
}
