//! `meshctl mcp serve`: serves a directory of config YAML as an MCP source,
//! for testing other sinks. It serves `ResourceSource` and, with
//! `--dial-sink`, also dials a `ResourceSink`.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;
use component::CancellationToken;
use galley::DirSource;
use mcp::{IncrementalPolicy, McpMetrics, SourceServer, parse_endpoint, run_source_client};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory of Kubernetes-style YAML to serve (watched).
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub addr: SocketAddr,
    /// Also dial this `ResourceSink` (`host:port`) and serve it.
    #[arg(long)]
    pub dial_sink: Option<String>,
    /// Never answer with incremental updates, even when asked.
    #[arg(long)]
    pub full_state_only: bool,
}

pub async fn run(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.dir.is_dir(),
        "--dir {}: not a directory",
        args.dir.display()
    );
    let store = galley::new_store();
    let policy = if args.full_state_only {
        IncrementalPolicy::None
    } else {
        IncrementalPolicy::All
    };
    let metrics = McpMetrics::default();
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let (_, follow) = DirSource::new(&args.dir).start(store.clone(), shutdown.clone(), |_| {})?;
    let follow = tokio::spawn(follow);
    eprintln!(
        "serving ResourceSource for {} on {}",
        args.dir.display(),
        listener.local_addr()?
    );

    if let Some(sink) = &args.dial_sink {
        let endpoint = parse_endpoint(sink).map_err(anyhow::Error::msg)?;
        tokio::spawn(run_source_client(
            store.clone(),
            policy.clone(),
            metrics.clone(),
            endpoint,
            shutdown.clone(),
        ));
    }
    mcp::grpc_server()
        .add_service(SourceServer::new(store, policy, metrics, shutdown.clone()).into_service())
        .serve_with_incoming_shutdown(mcp::incoming(listener), shutdown.cancelled_owned())
        .await?;
    follow.await?;
    Ok(())
}
