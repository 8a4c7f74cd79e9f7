//! `meshctl mcp watch`: a sink that prints what it receives, like Istio's
//! `mcpc`. It dials a source (`--server`) or, with `--listen`, serves
//! `ResourceSink` for sources that dial out.

use std::{collections::BTreeMap, io::Write, net::SocketAddr, sync::Arc};

use base64::Engine;
use clap::{Args, ValueEnum};
use component::CancellationToken;
use mcp::{
    HeldCollection, McpMetrics, Payload, Sink, SinkOptions, SinkServer, parse_endpoint,
    run_sink_client,
};
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Source to dial (`host:port`).
    #[arg(long, required_unless_present = "listen", conflicts_with = "listen")]
    pub server: Option<String>,
    /// Serve `ResourceSink` on this address instead, for sources that dial.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Collections to ask for, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub collections: Vec<String>,
    #[arg(long, value_enum, default_value_t = Output::Yaml)]
    pub output: Output,
    /// Ask for full state instead of incremental updates.
    #[arg(long)]
    pub full_state: bool,
    /// Exit after printing the first state in which every collection synced.
    #[arg(long)]
    pub once: bool,
    #[arg(long, default_value = "meshctl-watch")]
    pub sink_id: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    /// A YAML document per update.
    Yaml,
    /// A JSON object per line per update.
    Json,
}

pub async fn run(args: WatchArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut options = SinkOptions::new(&args.sink_id, args.collections.iter().cloned());
    options.incremental = !args.full_state;
    let sink = Arc::new(Sink::new(options, McpMetrics::default()));
    let mut snapshots = sink.subscribe();
    let connection = match (&args.server, args.listen) {
        (Some(server), _) => {
            let endpoint = parse_endpoint(server).map_err(anyhow::Error::msg)?;
            tokio::spawn(run_sink_client(sink.clone(), endpoint, shutdown.clone()))
        }
        (None, Some(addr)) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            eprintln!("serving ResourceSink on {}", listener.local_addr()?);
            let server = mcp::grpc_server()
                .add_service(SinkServer::new(sink.clone(), shutdown.clone()).into_service())
                .serve_with_incoming_shutdown(
                    mcp::incoming(listener),
                    shutdown.clone().cancelled_owned(),
                );
            tokio::spawn(async move {
                if let Err(e) = server.await {
                    tracing::error!(error = %e, "ResourceSink server failed");
                }
            })
        }
        (None, None) => unreachable!("clap requires --server or --listen"),
    };

    let mut printed: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        for (name, held) in &snapshot.collections {
            if held.synced && printed.get(name) != Some(&held.version) {
                print_update(name, held, args.output)?;
                printed.insert(name.clone(), held.version.clone());
            }
        }
        if args.once && snapshot.synced() {
            break;
        }
        tokio::select! {
            changed = snapshots.changed() => changed?,
            _ = shutdown.cancelled() => break,
        }
    }
    shutdown.cancel();
    let _ = connection.await;
    Ok(())
}

fn print_update(collection: &str, held: &HeldCollection, output: Output) -> anyhow::Result<()> {
    let resources: Vec<Value> = held
        .resources
        .values()
        .map(|r| {
            let body = match &r.payload {
                Payload::Decoded(body) => body.to_json(),
                Payload::Opaque => json!({
                    "typeUrl": r.body.type_url,
                    "value": base64::engine::general_purpose::STANDARD.encode(&r.body.value),
                }),
            };
            json!({
                "name": r.metadata.name,
                "version": r.metadata.version,
                "labels": r.metadata.labels,
                "annotations": r.metadata.annotations,
                "body": body,
            })
        })
        .collect();
    let update = json!({"collection": collection, "version": held.version, "resources": resources});
    let mut out = std::io::stdout().lock();
    match output {
        Output::Yaml => write!(out, "---\n{}", serde_saphyr::to_string(&update)?)?,
        Output::Json => writeln!(out, "{update}")?,
    }
    out.flush()?;
    Ok(())
}
